//! The upstream client against scripted raw-TCP backends: every response framing, connection
//! reuse, idle connections the backend closed, truncated bodies and request body framing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::h1;
use crate::pool::{SendError, UpstreamPool, request_framing};

/// One request as the backend saw it.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
    conn: usize,
}

/// What the backend does with a request: the bytes to answer and whether to close afterwards.
type Reply = Box<dyn Fn(&Seen) -> (Vec<u8>, bool) + Send + Sync>;

struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    seen: tokio::sync::mpsc::UnboundedReceiver<Seen>,
}

/// Reads one request (head plus a content-length or chunked body) from `s`.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    // Where the search for the head's end goes on from (a large head comes in many reads).
    let mut from = 0;
    loop {
        if let Some(end) = buf[from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + from)
        {
            let head = String::from_utf8(buf[..end + 4].to_vec()).unwrap();
            buf.drain(..end + 4);
            let lower = head.to_ascii_lowercase();
            let body = if let Some(i) = lower.find("content-length: ") {
                let n: usize = lower[i + 16..].split("\r\n").next()?.parse().ok()?;
                while buf.len() < n {
                    read_more(s, buf).await?;
                }
                buf.drain(..n).collect()
            } else if lower.contains("transfer-encoding: chunked") {
                while !buf.windows(5).any(|w| w == b"0\r\n\r\n") {
                    read_more(s, buf).await?;
                }
                let end = buf.windows(5).position(|w| w == b"0\r\n\r\n").unwrap() + 5;
                buf.drain(..end).collect()
            } else {
                Vec::new()
            };
            return Some((head, body));
        }
        from = buf.len().saturating_sub(3);
        read_more(s, buf).await?;
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 4096];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

async fn backend(reply: Reply) -> Backend {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
    let reply = Arc::new(reply);
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let conn = count.fetch_add(1, Ordering::SeqCst) + 1;
            let (reply, tx) = (reply.clone(), tx.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((head, body)) = read_request(&mut s, &mut buf).await {
                    let seen = Seen { head, body, conn };
                    let (answer, close) = reply(&seen);
                    let _ = tx.send(seen);
                    if s.write_all(&answer).await.is_err() || close {
                        break;
                    }
                }
            });
        }
    });
    Backend {
        addr,
        accepted,
        seen,
    }
}

fn pool() -> Arc<UpstreamPool> {
    pool_answering_within(Duration::from_secs(20))
}

fn pool_answering_within(response_timeout: Duration) -> Arc<UpstreamPool> {
    let mut cfg = crate::tests::config();
    cfg.upstream_idle_per_backend = 8;
    cfg.upstream_connect_timeout = Duration::from_secs(2);
    cfg.upstream_response_timeout = response_timeout;
    Arc::new(UpstreamPool::new(&cfg))
}

fn req(method: Method, path: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "b1.test")
        .body(Empty::new())
        .unwrap()
}

/// Sends a request through the pool, its head encoded from its header map.
async fn send<B>(
    pool: &Arc<UpstreamPool>,
    addr: SocketAddr,
    r: Request<B>,
) -> Result<crate::pool::UpstreamResponse, SendError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = r.into_parts();
    let mut head = Vec::new();
    h1::write_request_line(&mut head, &parts.method, parts.uri.path());
    for (name, value) in &parts.headers {
        h1::write_header(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    let framing = request_framing(&body, false);
    pool.send(
        addr,
        &parts.method,
        |out| out.extend_from_slice(&head),
        framing,
        body,
    )
    .await
}

/// Sends a request and collects the whole response body.
async fn exchange<B>(
    pool: &Arc<UpstreamPool>,
    addr: SocketAddr,
    r: Request<B>,
) -> (StatusCode, Vec<u8>)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let resp = match send(pool, addr, r).await {
        Ok(r) => r,
        Err(e) => panic!("send failed: {e:?}"),
    };
    let status = resp.head.status;
    let body = resp.body.collect().await.unwrap().to_bytes();
    (status, body.to_vec())
}

#[tokio::test]
async fn every_response_framing_arrives_whole_on_one_reused_connection() {
    let b = backend(Box::new(|s: &Seen| {
        let path = s.head.split(' ').nth(1).unwrap().to_string();
        let answer: &[u8] = match path.as_str() {
            "/length" => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\ntrailer: 1\r\n\r\n",
            "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
            "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n",
            "/continue" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
        };
        (answer.to_vec(), false)
    }))
    .await;
    let p = pool();
    assert_eq!(
        exchange(&p, b.addr, req(Method::GET, "/length")).await,
        (StatusCode::OK, b"hello".to_vec())
    );
    assert_eq!(
        p.idle_count(b.addr),
        1,
        "the connection is back in the pool"
    );
    assert_eq!(
        exchange(&p, b.addr, req(Method::GET, "/chunked")).await,
        (StatusCode::OK, b"abcdefg".to_vec())
    );
    assert_eq!(
        exchange(&p, b.addr, req(Method::HEAD, "/head")).await,
        (StatusCode::OK, vec![])
    );
    assert_eq!(
        exchange(&p, b.addr, req(Method::GET, "/empty")).await,
        (StatusCode::NO_CONTENT, vec![])
    );
    assert_eq!(
        exchange(&p, b.addr, req(Method::GET, "/continue")).await,
        (StatusCode::CREATED, b"ok".to_vec())
    );
    assert_eq!(
        exchange(&p, b.addr, req(Method::GET, "/nope")).await,
        (StatusCode::NOT_FOUND, vec![])
    );
    assert_eq!(
        b.accepted.load(Ordering::SeqCst),
        1,
        "one connection carried all six"
    );
    assert_eq!(p.idle_count(b.addr), 1);
}

#[tokio::test]
async fn close_delimited_and_connection_close_responses_are_not_pooled() {
    let b = backend(Box::new(|s: &Seen| {
        if s.head.starts_with("GET /until-close") {
            (b"HTTP/1.1 200 OK\r\n\r\nall of it".to_vec(), true)
        } else {
            (
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi".to_vec(),
                true,
            )
        }
    }))
    .await;
    let p = pool();
    assert_eq!(
        exchange(&p, b.addr, req(Method::GET, "/until-close")).await,
        (StatusCode::OK, b"all of it".to_vec())
    );
    assert_eq!(p.idle_count(b.addr), 0);
    assert_eq!(
        exchange(&p, b.addr, req(Method::GET, "/close")).await,
        (StatusCode::OK, b"hi".to_vec())
    );
    assert_eq!(p.idle_count(b.addr), 0);
    assert_eq!(b.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_idle_connection_the_backend_closed_is_replaced_without_an_error() {
    // Answers keep-alive but closes every connection right after answering.
    let mut b = backend(Box::new(|_: &Seen| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
            true,
        )
    }))
    .await;
    let p = pool();
    for n in 1..=3 {
        assert_eq!(
            exchange(&p, b.addr, req(Method::GET, "/")).await,
            (StatusCode::OK, b"ok".to_vec())
        );
        let seen = b.seen.recv().await.unwrap();
        assert_eq!(seen.conn, n, "request {n} went out on a fresh connection");
    }
    assert_eq!(b.accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_the_connection_is_dropped() {
    let b = backend(Box::new(|_: &Seen| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nonly5".to_vec(),
            true,
        )
    }))
    .await;
    let p = pool();
    let resp = send(&p, b.addr, req(Method::GET, "/"))
        .await
        .ok()
        .unwrap()
        .body;
    assert!(resp.collect().await.is_err());
    assert_eq!(p.idle_count(b.addr), 0);

    let garbage = backend(Box::new(|_: &Seen| (b"SMTP ready\r\n\r\n".to_vec(), true))).await;
    match send(&p, garbage.addr, req(Method::GET, "/")).await {
        Err(SendError::Request(detail)) => assert!(detail.contains("malformed"), "{detail}"),
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(_) => panic!("garbage was accepted as a response"),
    }
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    assert!(matches!(
        send(&p, closed, req(Method::GET, "/")).await,
        Err(SendError::Connect(_))
    ));
}

#[tokio::test]
async fn request_bodies_go_out_with_their_length_or_chunked() {
    let mut b = backend(Box::new(|_: &Seen| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
            false,
        )
    }))
    .await;
    let p = pool();
    let fixed = Request::post("/upload")
        .header("host", "b1.test")
        .body(Full::new(Bytes::from_static(b"0123456789")))
        .unwrap();
    assert_eq!(exchange(&p, b.addr, fixed).await.0, StatusCode::OK);
    let seen = b.seen.recv().await.unwrap();
    assert!(
        seen.head.contains("content-length: 10\r\n"),
        "{}",
        seen.head
    );
    assert_eq!(seen.body, b"0123456789");

    // A body of unknown length, arriving in pieces, goes out chunked.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let streamed = Request::post("/stream")
        .header("host", "b1.test")
        .body(ChannelBody(rx))
        .unwrap();
    let sender = tokio::spawn(async move {
        for piece in [&b"abc"[..], b"", b"defgh"] {
            tx.send(Bytes::from_static(piece)).await.unwrap();
        }
    });
    assert_eq!(exchange(&p, b.addr, streamed).await.0, StatusCode::OK);
    sender.await.unwrap();
    let seen = b.seen.recv().await.unwrap();
    assert!(
        seen.head.contains("transfer-encoding: chunked\r\n"),
        "{}",
        seen.head
    );
    assert_eq!(seen.body, b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n");
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
}

/// A request body of unknown length fed from a channel (a client uploading in pieces).
pub(crate) struct ChannelBody(pub(crate) tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d))))
    }
}

#[tokio::test]
async fn large_bodies_stream_intact_both_ways_and_the_connection_is_reused() {
    // 1 MiB of a pattern that shows any lost, doubled or reordered byte.
    let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let body = big.clone();
    let mut b = backend(Box::new(move |s: &Seen| {
        let mut answer = Vec::new();
        if s.head.starts_with("GET /chunked") {
            answer.extend_from_slice(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
            for piece in body.chunks(10_000) {
                answer.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                answer.extend_from_slice(piece);
                answer.extend_from_slice(b"\r\n");
            }
            answer.extend_from_slice(b"0\r\n\r\n");
        } else if s.head.starts_with("GET /length") {
            answer.extend_from_slice(
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes(),
            );
            answer.extend_from_slice(&body);
        } else {
            // An upload: answer with its size.
            let n = s.body.len().to_string();
            answer.extend_from_slice(
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{n}", n.len()).as_bytes(),
            );
        }
        (answer, false)
    }))
    .await;
    let p = pool();
    let (status, got) = exchange(&p, b.addr, req(Method::GET, "/length")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        got == big,
        "content-length body differs ({} bytes)",
        got.len()
    );
    let (_, got) = exchange(&p, b.addr, req(Method::GET, "/chunked")).await;
    assert!(got == big, "chunked body differs ({} bytes)", got.len());
    let upload = Request::post("/upload")
        .header("host", "b1.test")
        .body(Full::new(Bytes::from(big.clone())))
        .unwrap();
    let (_, got) = exchange(&p, b.addr, upload).await;
    assert_eq!(got, (1u32 << 20).to_string().as_bytes());
    for _ in 0..3 {
        let seen = b.seen.recv().await.unwrap();
        assert_eq!(seen.conn, 1, "every exchange reused the first connection");
    }
    assert_eq!(b.seen.try_recv().ok().map(|s| s.body.len()), None);
    assert_eq!(b.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_backend_that_refuses_an_upload_without_reading_it_answers_at_once() {
    // Reads the request head only, answers 413 and keeps the connection open without reading
    // the body (as a server rejecting an upload by its headers does).
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (hold_tx, mut hold_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = Vec::new();
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            read_more(&mut s, &mut buf).await.unwrap();
        }
        s.write_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 4\r\n\r\nbig!")
            .await
            .unwrap();
        // Keep the socket open (and unread) until the test ends.
        let _ = hold_tx.send(s);
    });
    let p = pool();
    // Far more than loopback's socket buffers hold.
    let upload = Request::post("/upload")
        .header("host", "b1.test")
        .body(Full::new(Bytes::from(vec![b'u'; 64 << 20])))
        .unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(20), exchange(&p, addr, upload))
        .await
        .expect("the 413 was not passed on while the upload was still being written");
    assert_eq!(answered, (StatusCode::PAYLOAD_TOO_LARGE, b"big!".to_vec()));
    assert_eq!(
        p.idle_count(addr),
        0,
        "a connection with an unsent body is not reused"
    );
    assert!(hold_rx.recv().await.is_some());
}

#[tokio::test]
async fn a_backend_that_never_answers_times_out_and_its_connection_is_dropped() {
    // A backend that reads requests and never answers.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    let pool = pool_answering_within(Duration::from_millis(150));
    let started = std::time::Instant::now();
    let sent = send(&pool, addr, req(Method::GET, "/")).await;
    assert!(matches!(sent, Err(SendError::Timeout)));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(140) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert_eq!(
        pool.idle_count(addr),
        0,
        "a timed-out connection is not reused"
    );
}

/// Each request on a reused connection gets the whole response timeout: the connection's timer,
/// still set from the request before, fires early and is moved on rather than ending a
/// response that is within its own time.
#[tokio::test]
async fn a_reused_connection_gives_each_response_the_whole_timeout() {
    // Answers the first request at once and each later one after 200 ms.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut answered = 0;
                while read_request(&mut s, &mut buf).await.is_some() {
                    if answered > 0 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    answered += 1;
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let pool = pool_answering_within(Duration::from_millis(300));
    let first = send(&pool, addr, req(Method::GET, "/")).await.ok().unwrap();
    assert_eq!(first.head.status, StatusCode::OK);
    first.body.collect().await.unwrap();
    // Sent 200 ms after the first: its answer comes 400 ms after the first request's
    // deadline was set, within its own 300 ms.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..2 {
        let resp = send(&pool, addr, req(Method::GET, "/")).await.ok().unwrap();
        assert_eq!(resp.head.status, StatusCode::OK);
        resp.body.collect().await.unwrap();
    }
    assert_eq!(pool.idle_count(addr), 1, "one connection carried them all");
}

/// A backend that stopped sending in the middle of a body used to hold the request (and its
/// client) until the backend closed the connection, however long that took.
#[tokio::test]
async fn a_body_that_stalls_fails_after_the_body_timeout_and_its_connection_is_dropped() {
    // Sends half the body it announces and keeps the connection open.
    let b = backend(Box::new(|_: &Seen| {
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello".to_vec(),
            false,
        )
    }))
    .await;
    let mut cfg = crate::tests::config();
    cfg.upstream_body_timeout = Duration::from_millis(150);
    let p = Arc::new(UpstreamPool::new(&cfg));
    let resp = send(&p, b.addr, req(Method::GET, "/")).await.ok().unwrap();
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), resp.body.collect())
        .await
        .expect("a stalled body was waited for without end")
        .unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(
        waited >= Duration::from_millis(140) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(
        p.idle_count(b.addr),
        0,
        "a stalled connection is not reused"
    );
}

/// A request head and a response with its body are moved several times per request on their
/// way (out of the parser, out of the pool, out of the request path, into the writer), and
/// every move copies the whole value: a `memcpy` call for each past 128 bytes, a few vector
/// moves up to that. With the backend connection, the absolute-form URI and the upgraded
/// connection held inline, and 64-bit spans, they were 136-304 bytes.
#[test]
fn request_and_response_moves_stay_small() {
    use std::mem::size_of;
    let sizes = [
        ("ParsedRequest", size_of::<crate::server::ParsedRequest>()),
        (
            "UpstreamResponse",
            size_of::<crate::pool::UpstreamResponse>(),
        ),
        ("ProxyResponse", size_of::<crate::head::ProxyResponse>()),
        (
            "Result<ProxyResponse, ProxyError>",
            size_of::<Result<crate::head::ProxyResponse, crate::error::ProxyError>>(),
        ),
    ];
    for (name, size) in sizes {
        assert!(size <= 128, "{name} is {size} bytes");
    }
}

/// A head the socket cannot take at once (far more than its buffer) goes out in part when it
/// is tried, and the rest once the backend reads: the backend gets all of it, in order, and
/// the connection stays usable.
#[tokio::test]
async fn a_head_larger_than_the_socket_buffer_reaches_the_backend_whole() {
    let b = backend(Box::new(|s: &Seen| {
        let n = s.head.len().to_string();
        let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{n}", n.len());
        (answer.into_bytes(), false)
    }));
    let mut b = b.await;
    let p = pool();
    let big: String = (0..8 * 1024 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let r = Request::get("/big")
        .header("host", "b1.test")
        .header("x-big", &big)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (status, body) = exchange(&p, b.addr, r).await;
    assert_eq!(status, StatusCode::OK);
    let seen = b.seen.recv().await.unwrap();
    assert_eq!(body, seen.head.len().to_string().into_bytes());
    assert!(
        seen.head == format!("GET /big HTTP/1.1\r\nhost: b1.test\r\nx-big: {big}\r\n\r\n"),
        "the head arrived whole and in order ({} bytes)",
        seen.head.len()
    );
    assert_eq!(
        exchange(&p, b.addr, req(Method::GET, "/after")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        b.accepted.load(Ordering::SeqCst),
        1,
        "one connection for both"
    );
}
