//! In-process tests of the proxy's listener: h2c, TLS with ALPN and certificate reload, the
//! header timeout, the header size limit, the connection cap and graceful shutdown. Each test
//! runs a real upstream and a real proxy on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hangar_core::BackendId;
use hangar_core::route::{Route, RouteState, RouteTable};
use hangar_core::token::TokenKey;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{CertStore, Proxy, ProxyConfig, TlsFiles};

pub(crate) const DOMAIN: &str = "hangar.test";
pub(crate) const ID: &str = "b1";

/// An upstream answering `ok` (and `/slow` after 500 ms), until the test ends.
async fn upstream(tasks: &TaskTracker) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tasks.spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(|mut req: Request<Incoming>| async move {
                    if req.uri().path() == "/echo-body" {
                        // Answers with the body it got and how it was framed.
                        let framing = if req.headers().contains_key("transfer-encoding") {
                            "chunked".to_string()
                        } else {
                            format!("length {:?}", req.headers().get("content-length"))
                        };
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let mut resp = hyper::Response::new(http_body_util::Full::new(body));
                        resp.headers_mut()
                            .insert("x-framing", framing.parse().unwrap());
                        return Ok::<_, std::convert::Infallible>(resp);
                    }
                    if req.uri().path() == "/hangar-key" {
                        // Answers with every `x-hangar-key` and `x-hangar-epoch` it got.
                        let values = |name| {
                            req.headers()
                                .get_all(name)
                                .iter()
                                .map(|v| v.to_str().unwrap())
                                .collect::<Vec<_>>()
                                .join(",")
                        };
                        let body = format!(
                            "key=[{}] epoch=[{}]",
                            values("x-hangar-key"),
                            values("x-hangar-epoch")
                        );
                        return Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(Bytes::from(body)),
                        ));
                    }
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    if req.uri().path() == "/echo" && req.headers().contains_key("upgrade") {
                        // A minimal upgrade: switch protocols, then echo raw bytes.
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(up) = upgrade.await {
                                let mut io = TokioIo::new(up);
                                let mut buf = [0u8; 1024];
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        });
                        let mut resp =
                            hyper::Response::new(http_body_util::Full::new(Bytes::new()));
                        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut()
                            .insert("connection", "upgrade".parse().unwrap());
                        resp.headers_mut()
                            .insert("upgrade", "echo".parse().unwrap());
                        return Ok::<_, std::convert::Infallible>(resp);
                    }
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

pub(crate) struct Running {
    pub(crate) proxy: Arc<Proxy>,
    pub(crate) addr: SocketAddr,
    pub(crate) shutdown: CancellationToken,
    pub(crate) done: tokio::task::JoinHandle<()>,
    _tasks: TaskTracker,
}

pub(crate) async fn start(mut cfg: ProxyConfig, tls: Option<Arc<rustls::ServerConfig>>) -> Running {
    let tasks = TaskTracker::new();
    let up = upstream(&tasks).await;
    cfg.domain = DOMAIN.into();
    let proxy = Arc::new(Proxy::new(cfg));
    proxy.routes().publish(Arc::new(RouteTable::new(
        1,
        [Route {
            address: Some(up),
            public: true,
            ..Route::new(BackendId::parse(ID).unwrap(), RouteState::Ready)
        }],
    )));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let (p, s) = (proxy.clone(), shutdown.clone());
    let done = tokio::spawn(async move {
        match tls {
            Some(t) => p.run_tls(l, t, s).await.unwrap(),
            None => p.run(l, s).await.unwrap(),
        }
    });
    Running {
        proxy,
        addr,
        shutdown,
        done,
        _tasks: tasks,
    }
}

/// Routes `id.DOMAIN` to `addr` for each pair (replacing the test's default route table).
pub(crate) fn route_to(r: &Running, routes: &[(&str, SocketAddr)]) {
    r.proxy.routes().publish(Arc::new(RouteTable::new(
        2,
        routes.iter().map(|&(id, addr)| Route {
            address: Some(addr),
            public: true,
            ..Route::new(BackendId::parse(id).unwrap(), RouteState::Ready)
        }),
    )));
}

pub(crate) fn config() -> ProxyConfig {
    ProxyConfig::new(DOMAIN, TokenKey::generate())
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(format!("http://{ID}.{DOMAIN}{path}"))
        .header("host", format!("{ID}.{DOMAIN}"))
        .body(Empty::new())
        .unwrap()
}

/// An HTTP/2 (prior knowledge) client connection to `addr`.
async fn h2c_client<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let s = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

#[tokio::test]
async fn h2c_with_prior_knowledge() {
    let r = start(config(), None).await;
    let mut send = h2c_client(r.addr).await;
    for _ in 0..3 {
        let resp = send.send_request(get("/")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    }
}

#[tokio::test]
async fn request_bodies_reach_the_backend_with_their_framing_over_http1_and_http2() {
    let r = start(config(), None).await;
    let payload = Bytes::from(vec![b'x'; 100_000]);
    let post = |body: http_body_util::Full<Bytes>| {
        Request::post(format!("http://{ID}.{DOMAIN}/echo-body"))
            .header("host", format!("{ID}.{DOMAIN}"))
            .body(body)
            .unwrap()
    };

    // HTTP/1.1 with a content-length: forwarded with its length.
    let s = TcpStream::connect(r.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(post(http_body_util::Full::new(payload.clone())))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-framing"], "length Some(\"100000\")");
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        payload
    );

    // HTTP/2 without a content-length: the proxy cannot know the length, so it goes chunked.
    let mut send = h2c_client(r.addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    let req = Request::post(format!("http://{ID}.{DOMAIN}/echo-body"))
        .body(crate::pool_tests::ChannelBody(rx))
        .unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..10 {
            tx.send(Bytes::from(vec![b'y'; 10_000])).await.unwrap();
        }
    });
    let resp = send.send_request(req).await.unwrap();
    writer.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-framing"], "chunked");
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), 100_000);
    assert!(got.iter().all(|&b| b == b'y'));
}

/// The route's key and epoch reach the backend over HTTP/1.1 and HTTP/2 alike (both servers
/// share the request path), replacing whatever the client sent; a keyless route sends neither.
#[tokio::test]
async fn the_backend_gets_the_routes_key_and_epoch_over_http1_and_http2() {
    let r = start(config(), None).await;
    let forged = || {
        Request::get(format!("http://{ID}.{DOMAIN}/hangar-key"))
            .header("host", format!("{ID}.{DOMAIN}"))
            .header("x-hangar-key", "evil/mallory")
            .header("x-hangar-epoch", "999")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let s = TcpStream::connect(r.addr).await.unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut h2 = h2c_client(r.addr).await;
    let mut ask = async |http2: bool| {
        let resp = if http2 {
            h2.send_request(forged()).await.unwrap()
        } else {
            h1.send_request(forged()).await.unwrap()
        };
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    };

    for http2 in [false, true] {
        assert_eq!(
            ask(http2).await,
            "key=[] epoch=[]",
            "keyless, http2 {http2}"
        );
    }
    let keyless = r.proxy.routes().load().get(ID).unwrap().clone();
    r.proxy.routes().publish(Arc::new(RouteTable::new(
        2,
        [Route {
            key: Some("team/alice".into()),
            epoch: 7,
            ..keyless
        }],
    )));
    for http2 in [false, true] {
        assert_eq!(
            ask(http2).await,
            "key=[team/alice] epoch=[7]",
            "keyed, http2 {http2}"
        );
    }
}

/// Asks `host` for an `echo` upgrade of `path` on `io` and reads the response head, which must
/// be a `101`.
pub(crate) async fn switch_protocols<S>(io: &mut S, host: &str, path: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    io.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
}

struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// Writes a leaf certificate for `*.DOMAIN` to cert.pem/key.pem; returns its DER.
    fn write_leaf(&self) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![format!("*.{DOMAIN}")]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        write_atomic(&self.dir.path().join("cert.pem"), cert.pem().as_bytes());
        write_atomic(
            &self.dir.path().join("key.pem"),
            key.serialize_pem().as_bytes(),
        );
        cert.der().to_vec()
    }

    fn files(&self) -> Vec<TlsFiles> {
        vec![TlsFiles {
            cert: self.dir.path().join("cert.pem"),
            key: self.dir.path().join("key.pem"),
        }]
    }

    fn client(&self, alpn: &[u8]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }
}

fn write_atomic(path: &Path, data: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

async fn tls_connect(
    pki: &Pki,
    addr: SocketAddr,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let s = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(format!("{ID}.{DOMAIN}")).unwrap();
    pki.client(alpn).connect(name, s).await.unwrap()
}

#[tokio::test]
async fn tls_serves_http1_and_http2_by_alpn_and_reloads_without_dropping_connections() {
    let pki = Pki::new();
    let first_der = pki.write_leaf();
    let store = CertStore::load(pki.files()).unwrap();
    let r = start(config(), Some(store.server_config().unwrap())).await;

    // HTTP/2 via ALPN.
    let tls = tls_connect(&pki, r.addr, b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = h2.send_request(get("/")).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);

    // HTTP/1.1 via ALPN, kept open across a certificate reload.
    let tls = tls_connect(&pki, r.addr, b"http/1.1").await;
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(served, first_der);
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = h1.send_request(get("/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();

    let second_der = pki.write_leaf();
    assert_ne!(first_der, second_der);
    store.reload().unwrap();

    // The open connection keeps working...
    let resp = h1.send_request(get("/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // ...and new handshakes get the new certificate.
    let tls = tls_connect(&pki, r.addr, b"http/1.1").await;
    assert_eq!(
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
        second_der
    );

    // A broken file keeps the previous certificate in service.
    std::fs::write(pki.dir.path().join("cert.pem"), b"not a certificate").unwrap();
    let err = store.reload().unwrap_err();
    assert!(err.to_string().contains("cert.pem"), "{err}");
    let tls = tls_connect(&pki, r.addr, b"http/1.1").await;
    assert_eq!(
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
        second_der
    );
}

#[tokio::test]
async fn slow_clients_are_cut_off_by_the_header_timeout() {
    let mut cfg = config();
    cfg.header_read_timeout = Duration::from_millis(300);
    let r = start(cfg, None).await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: b1.hangar.test\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    // The server closes the connection (possibly after a 408); reading hits EOF.
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection was not closed");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let mut cfg = config();
    cfg.max_header_bytes = 16 * 1024;
    let r = start(cfg, None).await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    let big = "a".repeat(64 * 1024);
    let req = format!("GET / HTTP/1.1\r\nHost: b1.hangar.test\r\nX-Big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
}

#[tokio::test]
async fn the_connection_cap_applies_back_pressure_and_recovers() {
    let mut cfg = config();
    cfg.max_connections = 2;
    let r = start(cfg, None).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let s = TcpStream::connect(r.addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = send.send_request(get("/")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        held.push(send);
    }
    // A third client is queued (the kernel accepts the TCP connection, the proxy does not
    // serve it) while two connections are open...
    let s = TcpStream::connect(r.addr).await.unwrap();
    let (mut third, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let pending = third.send_request(get("/"));
    tokio::pin!(pending);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), pending.as_mut())
            .await
            .is_err(),
        "served past the connection cap"
    );
    // ...and is served as soon as one closes.
    held.pop();
    let resp = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("served after a slot freed")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn graceful_shutdown_completes_a_slow_request() {
    let r = start(config(), None).await;
    let s = TcpStream::connect(r.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let slow = tokio::spawn(async move {
        let resp = send.send_request(get("/slow")).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    });
    // Shut down once the request is in flight at the upstream.
    let deadline = Instant::now() + Duration::from_secs(10);
    while r
        .proxy
        .activity()
        .snapshot()
        .first()
        .is_none_or(|a| a.open == 0)
    {
        assert!(Instant::now() < deadline, "request never reached the proxy");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    r.shutdown.cancel();
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok");
    tokio::time::timeout(Duration::from_secs(10), r.done)
        .await
        .expect("run() returned after the request finished")
        .unwrap();
    // New connections are refused after shutdown.
    assert!(TcpStream::connect(r.addr).await.is_err());
}

#[tokio::test]
async fn upgraded_connections_work_through_tls() {
    let pki = Pki::new();
    pki.write_leaf();
    let store = CertStore::load(pki.files()).unwrap();
    let r = start(config(), Some(store.server_config().unwrap())).await;
    let mut tls = tls_connect(&pki, r.addr, b"http/1.1").await;
    switch_protocols(&mut tls, &format!("{ID}.{DOMAIN}"), "/echo").await;
    for msg in [&b"over tls"[..], &b"and again"[..]] {
        tls.write_all(msg).await.unwrap();
        let mut echo = vec![0u8; msg.len()];
        tls.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, msg);
    }
}

#[tokio::test]
async fn a_backend_that_does_not_answer_in_time_is_a_504_and_the_client_connection_lives_on() {
    let mut cfg = config();
    cfg.upstream_response_timeout = Duration::from_millis(100);
    let r = start(cfg, None).await;
    let s = TcpStream::connect(r.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let started = Instant::now();
    // `/slow` answers after 500 ms.
    let resp = send.send_request(get("/slow")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(resp.headers()["x-hangar-error"], "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("did not answer within"));
    let resp = send.send_request(get("/")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// An upgraded connection on which nobody sent anything used to stay open (with its backend
/// connection and task) until one side closed it.
#[tokio::test]
async fn an_idle_upgraded_connection_is_closed_and_a_busy_one_stays_open() {
    let mut cfg = config();
    cfg.upgrade_idle_timeout = Duration::from_millis(300);
    let r = start(cfg, None).await;
    let host = format!("{ID}.{DOMAIN}");
    let mut busy = TcpStream::connect(r.addr).await.unwrap();
    switch_protocols(&mut busy, &host, "/echo").await;
    let mut idle = TcpStream::connect(r.addr).await.unwrap();
    switch_protocols(&mut idle, &host, "/echo").await;
    let idle_since = Instant::now();
    let idle_end = tokio::spawn(async move {
        let mut buf = [0u8; 16];
        let read = idle.read(&mut buf).await;
        (read.map_err(|e| e.kind()), idle_since.elapsed())
    });

    // A message every 100 ms for three times the idle timeout: never idle for as long as it.
    for i in 0..9 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let msg = format!("ping {i}");
        busy.write_all(msg.as_bytes()).await.unwrap();
        let mut echo = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), busy.read_exact(&mut echo))
            .await
            .expect("no echo")
            .expect("the busy upgraded connection was closed");
        assert_eq!(echo, msg.as_bytes());
    }

    let (read, after) = tokio::time::timeout(Duration::from_secs(10), idle_end)
        .await
        .expect("the idle upgraded connection stayed open")
        .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        after >= Duration::from_millis(250) && after < Duration::from_secs(5),
        "{after:?}"
    );
    // Its copy task ended: only the busy connection is still open for the backend.
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.proxy.activity().snapshot()[0].open != 1 {
        assert!(
            Instant::now() < deadline,
            "the idle connection is still counted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An upstream that answers every request with `body`, until the test ends.
async fn answering(tasks: &TaskTracker, body: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tasks.spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |_: Request<Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from_static(body.as_bytes())),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A Host of `<id>.<domain>` names the backend whatever the `x-hangar-backend` header and the
/// `hangar-backend` cookie say; only a Host that names none lets the header, then the cookie,
/// choose (the proxy looks for those two only then).
#[tokio::test]
async fn the_host_names_the_backend_first_then_the_header_then_the_cookie() {
    let r = start(config(), None).await;
    let tasks = TaskTracker::new();
    let (a, b, c) = (
        answering(&tasks, "a").await,
        answering(&tasks, "b").await,
        answering(&tasks, "c").await,
    );
    route_to(&r, &[("ba", a), ("bb", b), ("bc", c)]);
    // Host, header, cookie and what answers: a backend's body, or the proxy's status.
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        Result<&'a str, StatusCode>,
    );
    let cases: [Case<'_>; 7] = [
        ("ba.hangar.test", Some("bb"), Some("bc"), Ok("a")),
        ("BA.Hangar.Test:8080", Some("bb"), Some("bc"), Ok("a")),
        ("localhost", Some("bb"), Some("bc"), Ok("b")),
        ("x.y.hangar.test", Some("bb"), None, Ok("b")),
        ("localhost", None, Some("bc"), Ok("c")),
        ("localhost", Some("  "), Some("bc"), Ok("c")),
        ("localhost", None, None, Err(StatusCode::NOT_FOUND)),
    ];
    for (host, header, cookie, want) in cases {
        let s = TcpStream::connect(r.addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::get("/").header("host", host);
        if let Some(h) = header {
            req = req.header("x-hangar-backend", h);
        }
        if let Some(c) = cookie {
            req = req.header("cookie", format!("theme=dark; hangar-backend={c}"));
        }
        let resp = send
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let got = if status == StatusCode::OK {
            Ok(std::str::from_utf8(&body).unwrap().to_string())
        } else {
            Err(status)
        };
        assert_eq!(
            got,
            want.map(str::to_string),
            "host {host}, header {header:?}, cookie {cookie:?}"
        );
    }
}

/// A revocation published to the proxy refuses a token it has verified (and cached) before, at
/// once; a set emptied again lets the token through. Requests skip the set while it is empty,
/// so this checks that each publish is seen both ways.
#[tokio::test]
async fn a_published_revocation_refuses_a_cached_token_and_an_emptied_set_lets_it_through() {
    use hangar_core::feed::{Revocation, Revocations};
    let key = TokenKey::generate();
    let r = start(ProxyConfig::new(DOMAIN, key.clone()), None).await;
    // The test's route, with tokens checked.
    let address = r.proxy.routes().load().get(ID).unwrap().address;
    r.proxy.routes().publish(Arc::new(RouteTable::new(
        2,
        [Route {
            address,
            public: false,
            ..Route::new(BackendId::parse(ID).unwrap(), RouteState::Ready)
        }],
    )));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = key.sign(ID, "alice", now + 3600);
    let mut send = h2c_client(r.addr).await;
    let mut ask = async |want: StatusCode, code: Option<&str>| {
        let mut req = get("/");
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), want);
        assert_eq!(
            resp.headers()
                .get("x-hangar-error")
                .map(|v| v.to_str().unwrap()),
            code
        );
    };
    // Verified twice: the second is a cache hit.
    ask(StatusCode::OK, None).await;
    ask(StatusCode::OK, None).await;
    let backend = BackendId::parse(ID).unwrap();
    r.proxy
        .publish_revocations(Arc::new(Revocations::new([Revocation::User {
            backend: backend.clone(),
            user: "alice".into(),
        }])));
    ask(StatusCode::UNAUTHORIZED, Some("token_revoked")).await;
    // Another user's revocation leaves alice's token alone.
    r.proxy
        .publish_revocations(Arc::new(Revocations::new([Revocation::User {
            backend,
            user: "bob".into(),
        }])));
    ask(StatusCode::OK, None).await;
    r.proxy
        .publish_revocations(Arc::new(Revocations::default()));
    ask(StatusCode::OK, None).await;
}
