//! The watch on HTTP/2 stream tasks: first on paused time, with a stand-in for hyper's stream
//! task that asks the body for a frame only once its "client" grants room for the previous
//! one; then with HTTP/2 clients against a real proxy and a scripted backend on
//! `127.0.0.1:0` (a client that grants no window, one that stops reading its socket, one
//! that reads slowly, and server-sent events).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hangar_core::BackendId;
use hangar_core::route::{Route, RouteState, RouteTable};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::{Body, Frame, Incoming};
use hyper::rt::Executor as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::{StreamExec, hand_over};
use crate::tests::{DOMAIN, ID, Running, config, start};

const LIMIT: Duration = Duration::from_secs(10);

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

/// A stream task under test, seen from outside.
struct Stream {
    backend: mpsc::Sender<Bytes>,
    /// Gets the number of frames sent when the body has ended; dropped unanswered if the
    /// stream is given up.
    done: oneshot::Receiver<usize>,
    /// How many times the body has been polled.
    polls: Arc<AtomicUsize>,
}

/// Spawns, through the executor under test, what hyper's stream task does with a response:
/// hands it over, then asks its body for the next frame once the previous one has been sent,
/// which takes a permit of `window` (the client's flow-control window).
fn stream(window: Arc<Semaphore>) -> Stream {
    let (backend, rx) = mpsc::channel(64);
    let (done_tx, done) = oneshot::channel();
    let polls = Arc::new(AtomicUsize::new(0));
    let body = Backend(rx, polls.clone());
    StreamExec::new(LIMIT).execute(async move {
        let mut body = hand_over(Response::new(body)).into_body();
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            let Ok(_frame) = frame;
            window.acquire().await.unwrap().forget();
            frames += 1;
        }
        let _ = done_tx.send(frames);
    });
    Stream {
        backend,
        done,
        polls,
    }
}

/// Waits for the stream task to drop the body, failing if it is still there long after the
/// limit (time is paused: this takes no real time).
async fn body_dropped(backend: &mpsc::Sender<Bytes>) {
    tokio::time::timeout(LIMIT * 10, backend.closed())
        .await
        .expect("the stream was never given up");
}

async fn send_frames(backend: &mpsc::Sender<Bytes>, n: usize) {
    for _ in 0..n {
        backend.send(Bytes::from_static(b"x")).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_stream_whose_client_grants_no_room_is_dropped_after_the_limit() {
    let window = Arc::new(Semaphore::new(1));
    let Stream { backend, done, .. } = stream(window);
    send_frames(&backend, 3).await;
    let start = Instant::now();
    body_dropped(&backend).await;
    let waited = start.elapsed();
    assert!(
        waited >= LIMIT && waited < LIMIT + Duration::from_millis(10),
        "{waited:?}"
    );
    assert!(done.await.is_err(), "the stream was given up, not finished");
}

#[tokio::test(start_paused = true)]
async fn the_limit_counts_from_the_last_frame_the_client_took() {
    let window = Arc::new(Semaphore::new(0));
    let Stream { backend, done, .. } = stream(window.clone());
    send_frames(&backend, 3).await;
    let start = Instant::now();
    tokio::time::sleep(LIMIT / 2).await;
    window.add_permits(1);
    body_dropped(&backend).await;
    let waited = start.elapsed();
    let expected = LIMIT / 2 + LIMIT;
    assert!(
        waited >= expected && waited < expected + Duration::from_millis(10),
        "{waited:?}"
    );
    assert!(done.await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_client_that_takes_a_frame_now_and_then_keeps_its_stream() {
    let window = Arc::new(Semaphore::new(0));
    let Stream { backend, done, .. } = stream(window.clone());
    send_frames(&backend, 10).await;
    drop(backend);
    let start = Instant::now();
    let grant = async {
        loop {
            tokio::time::sleep(LIMIT * 3 / 4).await;
            window.add_permits(1);
        }
    };
    let frames = tokio::select! {
        frames = done => frames.expect("the stream was given up"),
        () = grant => unreachable!(),
        () = tokio::time::sleep(LIMIT * 100) => panic!("the stream never ended"),
    };
    assert_eq!(frames, 10);
    assert!(start.elapsed() > LIMIT * 7, "{:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_stream_waiting_on_its_backend_is_not_timed_by_the_client_limit() {
    let window = Arc::new(Semaphore::new(100));
    let Stream {
        backend,
        done,
        polls,
    } = stream(window);
    send_frames(&backend, 1).await;
    // Quiet for far longer than the limit (the backend's own body timeout bounds this): the
    // watch's timer does not even wake the task.
    tokio::time::sleep(LIMIT * 10).await;
    let quiet = polls.load(Ordering::Relaxed);
    assert_eq!(quiet, 2, "a frame, then a wait for the next");
    send_frames(&backend, 1).await;
    drop(backend);
    assert_eq!(done.await.expect("the stream was given up"), 2);
}

/// The stream task's future is held once, not twice (as an async block around it would).
#[test]
fn the_watch_adds_little_to_a_stream_tasks_size() {
    let stream = async {
        let big = [0u8; 2000];
        tokio::task::yield_now().await;
        std::hint::black_box(&big);
    };
    let inner = std::mem::size_of_val(&stream);
    let watched = super::Watched {
        stream,
        watch: super::Watch::new(LIMIT),
    };
    let size = std::mem::size_of_val(&watched);
    assert!(size <= inner + 64, "{inner} bytes watched are {size}");
}

// With a real proxy.

/// A backend the test scripts, routed as `ID`.
async fn scripted_backend(r: &Running) -> TcpListener {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    r.proxy.routes().publish(Arc::new(RouteTable::new(
        2,
        [Route {
            address: Some(backend.local_addr().unwrap()),
            public: true,
            ..Route::new(BackendId::parse(ID).unwrap(), RouteState::Ready)
        }],
    )));
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
