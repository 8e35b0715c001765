//! HTTP/2 streams toward clients: first the response pipe on paused time, with a real h2
//! client over an in-memory connection whose flow-control window the test grants; then with
//! HTTP/2 clients against a real proxy and a scripted backend on `127.0.0.1:0` (a client that
//! grants no window, one that stops reading its socket, one that reads slowly, server-sent
//! events, and PINGs left unanswered).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Settings, StreamGuard, new_state, send_response, serve_with};
use crate::tests::{DOMAIN, ID, Running, config, route_to, start};

const LIMIT: Duration = Duration::from_secs(10);
/// Each frame the test's backend body hands out.
const PIECE: usize = 1000;

/// A backend's response body: the frames the test sends, ended when it drops the sender
/// (whose `closed()` tells the test that the body was dropped). Counts its polls.
struct Backend(mpsc::Receiver<Bytes>, Arc<AtomicUsize>);

impl Body for Backend {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// One stream under test, seen from outside: the backend body's sender and poll count, and
/// the client's side of the stream.
struct Stream {
    backend: mpsc::Sender<Bytes>,
    polls: Arc<AtomicUsize>,
    body: h2::RecvStream,
    /// Ends when the server's connection future does (for a test's task to outlive nothing).
    _server: tokio::task::JoinHandle<()>,
    _client: tokio::task::JoinHandle<()>,
}

/// A server connection (in memory) whose one stream is answered by [`send_response`] with a body the
/// test feeds, and a client that opens that stream with `window` bytes of stream window and
/// grants more only when the test releases what it read.
async fn stream(window: u32) -> Stream {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let (backend, rx) = mpsc::channel(64);
    let polls = Arc::new(AtomicUsize::new(0));
    let mut body = Some(Backend(rx, polls.clone()));
    let settings = Settings::new(&config());
    let server = tokio::spawn(async move {
        let state = new_state();
        serve_with(
            &settings,
            server_io,
            CancellationToken::new(),
            &state,
            move |conn, id, _req, _body| {
                let body = body.take().expect("one stream");
                async move {
                    let mut guard = StreamGuard::new(conn, id);
                    send_response(conn, &mut guard, StatusCode::OK, b"", true, body, LIMIT).await;
                }
            },
        )
        .await
    });
    let (mut send, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .initial_connection_window_size(1 << 30)
        .handshake::<_, Bytes>(client_io)
        .await
        .unwrap();
    let client = tokio::spawn(async move {
        let _ = conn.await;
    });
    let (resp, _) = send
        .send_request(Request::get("http://x/").body(()).unwrap(), true)
        .unwrap();
    let body = resp.await.unwrap().into_body();
    Stream {
        backend,
        polls,
        body,
        _server: server,
        _client: client,
    }
}

/// Waits for the stream to drop the body, failing if it is still there long after the limit
/// (time is paused: this takes no real time).
async fn body_dropped(backend: &mpsc::Sender<Bytes>) {
    tokio::time::timeout(LIMIT * 10, backend.closed())
        .await
        .expect("the stream was never given up");
}

async fn send_frames(backend: &mpsc::Sender<Bytes>, n: usize) {
    for _ in 0..n {
        backend.send(Bytes::from(vec![b'x'; PIECE])).await.unwrap();
    }
}

/// Reads what the client has received, giving the window back; the stream's reset ends it.
async fn take(body: &mut h2::RecvStream, bytes: usize) -> Result<usize, h2::Error> {
    let mut got = 0;
    while got < bytes {
        match body.data().await {
            Some(Ok(d)) => {
                got += d.len();
                body.flow_control().release_capacity(d.len()).unwrap();
            }
            Some(Err(e)) => return Err(e),
            None => break,
        }
    }
    Ok(got)
}

#[tokio::test(start_paused = true)]
async fn a_stream_whose_client_grants_no_room_is_reset_after_the_limit() {
    // Room for one piece, then none.
    let Stream {
        backend, mut body, ..
    } = stream(PIECE as u32).await;
    send_frames(&backend, 3).await;
    let start = Instant::now();
    body_dropped(&backend).await;
    let waited = start.elapsed();
    assert!(
        waited >= LIMIT && waited < LIMIT + Duration::from_millis(10),
        "{waited:?}"
    );
    // The client got what its window let through, then the reset.
    assert_eq!(body.data().await.unwrap().unwrap().len(), PIECE);
    let err = body
        .data()
        .await
        .unwrap()
        .expect_err("the stream was reset");
    assert_eq!(err.reason(), Some(h2::Reason::CANCEL), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn the_limit_counts_from_the_last_room_the_client_gave() {
    let Stream {
        backend, mut body, ..
    } = stream(PIECE as u32).await;
    send_frames(&backend, 3).await;
    tokio::time::sleep(LIMIT / 2).await;
    let start = Instant::now();
    // The client takes the first piece: room for the second.
    assert_eq!(take(&mut body, PIECE).await.unwrap(), PIECE);
    body_dropped(&backend).await;
    let waited = start.elapsed();
    assert!(
        waited >= LIMIT && waited < LIMIT + Duration::from_millis(10),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_takes_a_piece_now_and_then_keeps_its_stream() {
    let Stream {
        backend, mut body, ..
    } = stream(PIECE as u32).await;
    send_frames(&backend, 10).await;
    drop(backend);
    let start = Instant::now();
    let mut got = 0;
    loop {
        tokio::time::sleep(LIMIT * 3 / 4).await;
        match body.data().await {
            Some(d) => {
                let d = d.expect("the stream was reset");
                got += d.len();
                body.flow_control().release_capacity(d.len()).unwrap();
            }
            None => break,
        }
    }
    assert_eq!(got, 10 * PIECE);
    assert!(start.elapsed() > LIMIT * 7, "{:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_stream_waiting_on_its_backend_is_not_timed_by_the_client_limit() {
    let Stream {
        backend,
        mut body,
        polls,
        ..
    } = stream(1 << 20).await;
    send_frames(&backend, 1).await;
    assert_eq!(take(&mut body, PIECE).await.unwrap(), PIECE);
    // The client's WINDOW_UPDATE for that piece may wake the stream once more.
    tokio::time::sleep(LIMIT / 10).await;
    let settled = polls.load(Ordering::Relaxed);
    // Quiet for far longer than the limit (the backend's own body timeout bounds this): the
    // stream is not even woken.
    tokio::time::sleep(LIMIT * 10).await;
    assert_eq!(polls.load(Ordering::Relaxed), settled, "polled while quiet");
    send_frames(&backend, 1).await;
    drop(backend);
    assert_eq!(take(&mut body, usize::MAX).await.unwrap(), PIECE);
}

/// Serves an in-memory connection with keep-alive PINGs every `interval`, each to be answered
/// within `timeout`; resolves when the server's connection ends.
fn keep_alive_server(
    io: tokio::io::DuplexStream,
    interval: Duration,
    timeout: Duration,
) -> tokio::task::JoinHandle<()> {
    let settings = Settings {
        keep_alive_interval: interval,
        keep_alive_timeout: timeout,
        ..Settings::new(&config())
    };
    tokio::spawn(async move {
        let state = new_state();
        serve_with(
            &settings,
            io,
            CancellationToken::new(),
            &state,
            |_conn, _id, _req, _body| async {},
        )
        .await
    })
}

#[tokio::test(start_paused = true)]
async fn a_connection_whose_client_answers_no_ping_is_closed() {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let server = keep_alive_server(server_io, LIMIT, LIMIT);
    // The client's side is never driven after its preface: it answers nothing.
    let (_send, _conn) = h2::client::handshake(client_io).await.unwrap();
    let start = Instant::now();
    tokio::time::timeout(LIMIT * 10, server)
        .await
        .expect("the connection stayed open")
        .unwrap();
    let took = start.elapsed();
    assert!(
        took >= LIMIT * 2 && took < LIMIT * 2 + Duration::from_millis(10),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_connection_whose_client_answers_pings_stays_open() {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let server = keep_alive_server(server_io, LIMIT, LIMIT);
    let (send, conn) = h2::client::handshake(client_io).await.unwrap();
    let client = tokio::spawn(conn);
    tokio::time::sleep(LIMIT * 20).await;
    assert!(!server.is_finished(), "the connection was closed");
    // The client closes: so does the server's side.
    drop(send);
    client.abort();
    tokio::time::timeout(LIMIT, server)
        .await
        .expect("the server's side outlived its client")
        .unwrap();
}

// With a real proxy.

/// A backend the test scripts, routed as `ID`.
async fn scripted_backend(r: &Running) -> TcpListener {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    route_to(r, &[(ID, backend.local_addr().unwrap())]);
    backend
}

/// Accepts the proxy's connection and reads one request head from it.
async fn accept_request(backend: &TcpListener) -> TcpStream {
    let (mut up, _) = backend.accept().await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = up.read(&mut byte).await.unwrap();
        assert!(n > 0, "the proxy closed the backend connection mid-head");
        head.push(byte[0]);
    }
    up
}

/// Answers the next request with a head announcing a gigabyte, then writes the body until
/// the connection fails (the proxy closed it: `Err`) or all of it went (`Ok`).
fn feed_forever(backend: TcpListener) -> tokio::task::JoinHandle<std::io::Result<u64>> {
    const ANNOUNCED: u64 = 1 << 30;
    tokio::spawn(async move {
        let mut up = accept_request(&backend).await;
        up.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {ANNOUNCED}\r\n\r\n").as_bytes())
            .await?;
        let piece = vec![b'z'; 64 * 1024];
        let mut sent = 0u64;
        while sent < ANNOUNCED {
            up.write_all(&piece).await?;
            sent += piece.len() as u64;
        }
        Ok(sent)
    })
}

/// A client's socket whose reading the test can stop: once `deaf` is set, reads never
/// complete (the client stops reading; the kernel's buffers fill).
struct Deafened {
    io: TcpStream,
    deaf: Arc<AtomicBool>,
}

impl AsyncRead for Deafened {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.deaf.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Deafened {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An HTTP/2 (prior knowledge) client over `io` whose streams and connection get the given
/// initial windows (the client grants more only as its response bodies are read).
async fn h2_client(
    io: Deafened,
    stream_window: u32,
    connection_window: u32,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(stream_window)
        .initial_connection_window_size(connection_window)
        .adaptive_window(false)
        .handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

fn get() -> Request<Empty<Bytes>> {
    Request::get(format!("http://{ID}.{DOMAIN}/"))
        .body(Empty::new())
        .unwrap()
}

/// Waits (bounded) until the proxy has no request open for the backend.
async fn nothing_open(r: &Running) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.proxy.activity().snapshot().iter().any(|a| a.open != 0) {
        assert!(Instant::now() < deadline, "the request is still open");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads `body` to its end: the bytes, and the error it broke off with, if it did.
async fn read_all(mut body: Incoming) -> (u64, Option<hyper::Error>) {
    let mut got = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => got += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => return (got, Some(e)),
        }
    }
    (got, None)
}

/// A client that grants no flow-control window for its stream used to hold the stream, its
/// task and the backend connection for as long as the backend had something to send.
#[tokio::test]
async fn an_h2_client_that_grants_no_window_has_its_stream_reset_and_backend_closed() {
    let mut cfg = config();
    cfg.client_write_timeout = Duration::from_millis(300);
    let r = start(cfg, None).await;
    let feeder = feed_forever(scripted_backend(&r).await);
    let io = Deafened {
        io: TcpStream::connect(r.addr).await.unwrap(),
        deaf: Default::default(),
    };
    let mut client = h2_client(io, 1024, 1 << 20).await;
    // The body is not read (so no window is granted) until the stream is over.
    let resp = client.send_request(get()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let stalled = std::time::Instant::now();

    let fed = tokio::time::timeout(Duration::from_secs(10), feeder)
        .await
        .expect("the backend connection stayed open for a client that grants no window")
        .unwrap();
    let waited = stalled.elapsed();
    assert!(
        fed.is_err(),
        "the backend could send the whole body: {fed:?}"
    );
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    nothing_open(&r).await;

    // The client gets what its window let through, then the stream's reset.
    let (got, err) = read_all(resp.into_body()).await;
    assert!(got <= 1024, "{got}");
    let err = err.expect("the body ended as if it were complete");
    assert!(format!("{err:?}").contains("CANCEL"), "{err:?}");
}

/// A client that stops reading its socket (with windows it never exhausts) fills the
/// connection's buffers; the stream is given up like one without window.
#[tokio::test]
async fn an_h2_client_that_stops_reading_its_socket_has_its_backend_connection_closed() {
    let mut cfg = config();
    cfg.client_write_timeout = Duration::from_millis(300);
    let r = start(cfg, None).await;
    let feeder = feed_forever(scripted_backend(&r).await);
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let deaf = Arc::new(AtomicBool::new(false));
    let io = Deafened {
        io: socket.connect(r.addr).await.unwrap(),
        deaf: deaf.clone(),
    };
    const MAX_WINDOW: u32 = (1 << 31) - 1;
    let mut client = h2_client(io, MAX_WINDOW, MAX_WINDOW).await;
    let resp = client.send_request(get()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    deaf.store(true, Ordering::Relaxed);

    let fed = tokio::time::timeout(Duration::from_secs(10), feeder)
        .await
        .expect("the backend connection stayed open for a client that stopped reading")
        .unwrap();
    assert!(
        fed.is_err(),
        "the backend could send the whole body: {fed:?}"
    );
    nothing_open(&r).await;
}

/// A client that reads slowly but steadily takes longer than the write timeout for the whole
/// body, and gets all of it.
#[tokio::test]
async fn a_slow_but_steady_h2_client_gets_the_whole_body() {
    let mut cfg = config();
    cfg.client_write_timeout = Duration::from_millis(500);
    let r = start(cfg, None).await;
    let backend = scripted_backend(&r).await;
    const LEN: usize = 96 * 1024;
    let serve = tokio::spawn(async move {
        let mut up = accept_request(&backend).await;
        let mut resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {LEN}\r\n\r\n").into_bytes();
        resp.resize(resp.len() + LEN, b'z');
        up.write_all(&resp).await.unwrap();
        up
    });
    let io = Deafened {
        io: TcpStream::connect(r.addr).await.unwrap(),
        deaf: Default::default(),
    };
    // 4 KB of window at a time, a frame every 30 ms: 24 frames or more, and a few frames for
    // each piece the proxy reads from the backend.
    let mut client = h2_client(io, 4096, 1 << 20).await;
    let resp = client.send_request(get()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let started = std::time::Instant::now();
    let mut body = resp.into_body();
    let mut got = 0;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("the slow client's stream was reset");
            got += frame.data_ref().map_or(0, |d| d.len());
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the body did not arrive");
    assert_eq!(got, LEN);
    let took = started.elapsed();
    assert!(took > Duration::from_millis(500), "{took:?}");
    let _up = serve.await.unwrap();
}

/// Server-sent events over HTTP/2 keep their stream through pauses longer than the body and
/// client write timeouts while the client reads them.
#[tokio::test]
async fn server_sent_events_over_h2_stay_open_while_the_client_reads() {
    let mut cfg = config();
    cfg.upstream_body_timeout = Duration::from_millis(100);
    cfg.upstream_sse_timeout = Duration::from_secs(30);
    cfg.client_write_timeout = Duration::from_millis(200);
    let r = start(cfg, None).await;
    let backend = scripted_backend(&r).await;
    let (next_tx, next) = oneshot::channel::<()>();
    let serve = tokio::spawn(async move {
        let mut up = accept_request(&backend).await;
        up.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n",
        )
        .await
        .unwrap();
        next.await.unwrap();
        up.write_all(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
            .await
            .unwrap();
        up
    });
    let io = Deafened {
        io: TcpStream::connect(r.addr).await.unwrap(),
        deaf: Default::default(),
    };
    let mut client = h2_client(io, 65_535, 1 << 20).await;
    let resp = client.send_request(get()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut events = Vec::new();
    while events != b"data: 1\n\n" {
        let frame = body.frame().await.expect("the stream ended early").unwrap();
        events.extend_from_slice(frame.data_ref().unwrap());
    }

    // Quiet for more than twice both timeouts (the pause under test), then the next event
    // and the end.
    tokio::time::sleep(Duration::from_millis(500)).await;
    next_tx.send(()).unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(10), read_all(body))
        .await
        .expect("the rest of the stream did not arrive");
    assert!(rest.1.is_none(), "the stream broke off: {:?}", rest.1);
    assert_eq!(rest.0, b"data: 2\n\n".len() as u64);
    let _up = serve.await.unwrap();
}
