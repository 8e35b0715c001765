//! The proxy's traffic metrics, recorded by a real proxy in front of a real upstream into a
//! debugging recorder: what is counted, under which labels (label hygiene), and that a
//! backend that ends is published a last time and forgotten.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hangar_core::BackendId;
use hangar_core::route::{Route, RouteState, RouteTable};
use hangar_core::token::TokenKey;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::{Proxy, ProxyConfig};

const DOMAIN: &str = "hangar.test";
const ID: &str = "bmetrics";

/// An upstream: `/` answers 200, `/missing` 404, `/echo` echoes the body, `/ws` upgrades and
/// echoes bytes.
async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(|mut req: Request<Incoming>| async move {
                    let resp = match req.uri().path() {
                        "/missing" => {
                            let mut r = Response::new(Full::new(Bytes::from_static(b"no")));
                            *r.status_mut() = StatusCode::NOT_FOUND;
                            r
                        }
                        "/echo" => {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            Response::new(Full::new(body))
                        }
                        "/ws" => {
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(on.await.unwrap());
                                let mut buf = [0u8; 64];
                                loop {
                                    match io.read(&mut buf).await {
                                        Ok(0) | Err(_) => return,
                                        Ok(n) => {
                                            if io.write_all(&buf[..n]).await.is_err() {
                                                return;
                                            }
                                        }
                                    }
                                }
                            });
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            r.headers_mut()
                                .insert("connection", "upgrade".parse().unwrap());
                            r.headers_mut().insert("upgrade", "echo".parse().unwrap());
                            r
                        }
                        _ => Response::new(Full::new(Bytes::from_static(b"ok"))),
                    };
                    Ok::<_, std::convert::Infallible>(resp)
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

fn route(up: SocketAddr, state: RouteState) -> Route {
    Route {
        backend: BackendId::parse(ID).unwrap(),
        state,
        address: Some(up),
        public: true,
        drone: Some("d1".into()),
        pool: Some("blue".into()),
        key: None,
        epoch: 0,
    }
}

/// Sends one HTTP/1.1 request over a fresh connection and returns the status.
async fn send(addr: SocketAddr, method: &str, path: &str, body: &'static [u8]) -> StatusCode {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("{ID}.{DOMAIN}"))
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    status
}

/// Values by (name, sorted labels).
type Values = HashMap<(String, Vec<(String, String)>), DebugValue>;

fn values(snapshotter: &Snapshotter) -> Values {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _, _, v)| {
            let key = ck.key();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            labels.sort();
            ((key.name().to_string(), labels), v)
        })
        .collect()
}

fn backend_labels(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut l: Vec<(String, String)> = [("backend", ID), ("drone", "d1"), ("pool", "blue")]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    l
}

fn counter(v: &Values, name: &str, extra: &[(&str, &str)]) -> u64 {
    match v.get(&(name.to_string(), backend_labels(extra))) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name} {extra:?}: {other:?}"),
    }
}

fn gauge(v: &Values, name: &str) -> f64 {
    match v.get(&(name.to_string(), backend_labels(&[]))) {
        Some(DebugValue::Gauge(g)) => g.into_inner(),
        other => panic!("{name}: {other:?}"),
    }
}

/// Polls `cond` until it holds (the proxy finishes a request after the client has its answer).
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what} never happened");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn traffic_is_counted_per_backend_under_route_labels_only() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Thread-local: this test's runtime is single-threaded, so every proxy task records here.
    let _guard = metrics::set_default_local_recorder(&recorder);

    let up = upstream().await;
    let proxy = Arc::new(Proxy::new(ProxyConfig::new(DOMAIN, TokenKey::generate())));
    proxy
        .routes()
        .publish(Arc::new(RouteTable::new(1, [route(up, RouteState::Ready)])));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cancel = CancellationToken::new();
    {
        let (p, c) = (proxy.clone(), cancel.clone());
        tokio::spawn(async move { p.run(l, c).await.unwrap() });
    }

    for _ in 0..3 {
        assert_eq!(send(addr, "GET", "/", b"").await, StatusCode::OK);
    }
    assert_eq!(
        send(addr, "GET", "/missing", b"").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(addr, "POST", "/echo", b"0123456789").await,
        StatusCode::OK
    );

    // A WebSocket-style upgrade: counted as one request (1xx) and, while open, as a socket.
    let mut ws = TcpStream::connect(addr).await.unwrap();
    crate::tests::switch_protocols(&mut ws, &format!("{ID}.{DOMAIN}"), "/ws").await;
    ws.write_all(b"hello").await.unwrap();
    let mut echo = [0u8; 5];
    ws.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"hello");

    let activity = proxy.activity();
    eventually("the plain requests to finish", || {
        activity.snapshot().first().is_some_and(|r| r.open == 1)
    })
    .await;
    activity.publish_metrics();
    let v = values(&snapshotter);
    assert_eq!(
        counter(&v, BACKEND_REQUESTS_TOTAL, &[("status_class", "2xx")]),
        4
    );
    assert_eq!(
        counter(&v, BACKEND_REQUESTS_TOTAL, &[("status_class", "4xx")]),
        1
    );
    assert_eq!(
        counter(&v, BACKEND_REQUESTS_TOTAL, &[("status_class", "1xx")]),
        1
    );
    // Classes that never happened have no series.
    assert!(!v.contains_key(&(
        BACKEND_REQUESTS_TOTAL.to_string(),
        backend_labels(&[("status_class", "5xx")])
    )));
    assert_eq!(counter(&v, BACKEND_RECEIVED_BYTES_TOTAL, &[]), 10);
    // "ok" ×3, "no", the 10 echoed bytes.
    assert_eq!(counter(&v, BACKEND_SENT_BYTES_TOTAL, &[]), 18);
    assert_eq!(gauge(&v, BACKEND_OPEN_CONNECTIONS), 1.0);
    assert_eq!(gauge(&v, BACKEND_OPEN_WEBSOCKETS), 1.0);
    match v.get(&(
        BACKEND_REQUEST_DURATION_SECONDS.to_string(),
        backend_labels(&[]),
    )) {
        Some(DebugValue::Histogram(samples)) => {
            assert_eq!(samples.len(), 6, "one duration per request");
            assert!(samples.iter().all(|s| s.into_inner() >= 0.0));
        }
        other => panic!("histogram: {other:?}"),
    }
    let mode = |m: &str| {
        v.get(&(
            PROXY_REQUESTS_TOTAL.to_string(),
            vec![("mode".to_string(), m.to_string())],
        ))
    };
    assert_eq!(mode("host"), Some(&DebugValue::Counter(6)));

    // Label hygiene: per-backend series carry exactly backend, drone and pool (plus the
    // status class of requests); nothing else has a backend label; every name is hangar_*.
    for (name, labels) in v.keys() {
        assert!(name.starts_with("hangar_"), "{name}");
        let keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        if name.starts_with("hangar_backend_") {
            let want: &[&str] = if name == BACKEND_REQUESTS_TOTAL {
                &["backend", "drone", "pool", "status_class"]
            } else {
                &["backend", "drone", "pool"]
            };
            assert_eq!(keys, want, "{name}");
        } else {
            assert!(!keys.contains(&"backend"), "{name} {keys:?}");
        }
        assert!(!keys.contains(&"key") && !keys.contains(&"user"), "{name}");
    }

    // The socket closes: its bytes are counted and the gauges drop to zero.
    drop(ws);
    eventually("the upgraded connection to close", || {
        activity.snapshot().first().is_some_and(|r| r.open == 0)
    })
    .await;
    activity.publish_metrics();
    let v = values(&snapshotter);
    assert_eq!(gauge(&v, BACKEND_OPEN_WEBSOCKETS), 0.0);
    assert_eq!(gauge(&v, BACKEND_OPEN_CONNECTIONS), 0.0);
    assert_eq!(counter(&v, BACKEND_RECEIVED_BYTES_TOTAL, &[]), 15);
    assert_eq!(counter(&v, BACKEND_SENT_BYTES_TOTAL, &[]), 23);
    let reported = activity.snapshot();
    assert_eq!(
        reported[0].requests, 6,
        "cumulative requests for the scheduler"
    );

    // The backend ends: one last publish, then the proxy forgets it (the exporter drops its
    // series after the grace period).
    assert_eq!(send(addr, "GET", "/", b"").await, StatusCode::OK);
    eventually("the last request to finish", || {
        activity.snapshot().first().is_some_and(|r| r.open == 0)
    })
    .await;
    activity.prune(&RouteTable::new(2, [route(up, RouteState::Gone)]));
    assert!(activity.is_empty());
    let v = values(&snapshotter);
    assert_eq!(
        counter(&v, BACKEND_REQUESTS_TOTAL, &[("status_class", "2xx")]),
        5,
        "the request after the last publish is not lost"
    );
    cancel.cancel();
}

#[test]
fn status_classes() {
    let cases = [
        (101, "1xx"),
        (200, "2xx"),
        (204, "2xx"),
        (302, "3xx"),
        (404, "4xx"),
        (499, "4xx"),
        (502, "5xx"),
        (0, "5xx"),
        (700, "5xx"),
    ];
    for (status, class) in cases {
        assert_eq!(STATUS_CLASSES[status_class(status)], class, "{status}");
    }
}
