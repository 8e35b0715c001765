//! The HTTP/2 server against a client that writes raw frames: what it acknowledges, which
//! requests it refuses (stream errors, after which the connection goes on) and which frames
//! end the connection (GOAWAY with the error's code), flow-control and concurrency limits,
//! trailers, and shutdown. Each connection is in memory, answered by a test handler that reads
//! the whole request body and echoes it.

use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use http_body_util::{BodyExt as _, Full};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::conn::{CONNECTION_WINDOW, MAX_STREAMS, STREAM_WINDOW, Settings, StreamGuard};
use super::conn::{new_state, send_response, serve_with};
use super::frame::{self, Head, Reason};
use super::hpack::{self, HeaderList};
use crate::head::RequestHead;
use crate::test_alloc::Held;

const WAIT: Duration = Duration::from_secs(5);
const MAX_HEADER_BYTES: usize = 8 * 1024;

/// What the test's handler does with a request.
#[derive(Clone, Copy)]
enum Handler {
    /// Reads the body whole and answers 200 with it, a field per request field count and
    /// trailer count.
    Echo,
    /// Never answers (nor reads the body).
    Hang,
    /// Reads the body, then never answers; ends when the client resets the stream.
    Wait,
}

/// A raw client on a connection to a served connection (in memory unless a test says).
struct Raw<C = DuplexStream> {
    io: C,
    rbuf: Vec<u8>,
    decoder: hpack::Decoder,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

fn serve(handler: Handler, gate: Option<oneshot::Receiver<()>>) -> Raw {
    let (client, server_io) = tokio::io::duplex(4 << 20);
    serve_on(client, server_io, handler, gate, None)
}

/// Serves `server_io`, `client`'s other end; with `held`, the connection's task counts what it
/// keeps allocated there (see [`Held`]).
fn serve_on<C, S>(
    client: C,
    server_io: S,
    handler: Handler,
    gate: Option<oneshot::Receiver<()>>,
    held: Option<&'static AtomicIsize>,
) -> Raw<C>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shutdown = CancellationToken::new();
    let settings = Settings {
        max_header_bytes: MAX_HEADER_BYTES,
        ..Settings::new(&crate::tests::config())
    };
    let token = shutdown.clone();
    let mut gate = gate;
    let conn = async move {
        let state = new_state();
        serve_with(
            &settings,
            server_io,
            token,
            &state,
            |conn, id, req, body| {
                let gate = gate.take();
                async move {
                    let mut guard = StreamGuard::new(conn, id);
                    if matches!(handler, Handler::Hang) {
                        std::future::pending::<()>().await;
                    }
                    if matches!(handler, Handler::Wait) {
                        if body.collect().await.is_ok() {
                            std::future::pending::<()>().await;
                        }
                        return;
                    }
                    if let Some(g) = gate {
                        let _ = g.await;
                    }
                    let fields = req.fields().count();
                    let Ok(collected) = body.collect().await else {
                        return;
                    };
                    let trailers = collected.trailers().map_or(0, |t| t.len());
                    let lines = format!(
                        "x-fields: {fields}\r\nx-trailers: {trailers}\r\nx-path: {}\r\n",
                        req.target()
                    );
                    let body = Full::new(collected.to_bytes());
                    send_response(
                        conn,
                        &mut guard,
                        StatusCode::OK,
                        lines.as_bytes(),
                        true,
                        body,
                        WAIT,
                    )
                    .await;
                }
            },
        )
        .await
    };
    let server = match held {
        Some(counter) => tokio::spawn(Held::new(counter, conn)),
        None => tokio::spawn(conn),
    };
    Raw {
        io: client,
        rbuf: Vec::new(),
        decoder: hpack::Decoder::new(4096),
        shutdown,
        server,
    }
}

/// HPACK integer with an `n`-bit prefix.
fn int(out: &mut Vec<u8>, mut v: usize, n: u32, flags: u8) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literal fields (names as given, upper case included).
fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, v) in fields {
        out.push(0);
        int(&mut out, n.len(), 7, 0);
        out.extend_from_slice(n.as_bytes());
        int(&mut out, v.len(), 7, 0);
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// A request's pseudo-header fields.
fn head<'a>(method: &'a str, path: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        (":method", method),
        (":scheme", "http"),
        (":path", path),
        (":authority", "b1.test"),
    ]
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::write_head(&mut out, payload.len(), kind, flags, stream);
    out.extend_from_slice(payload);
    out
}

impl Raw {
    /// The preface and an empty SETTINGS; reads the server's SETTINGS, WINDOW_UPDATE and
    /// SETTINGS ACK.
    async fn start(handler: Handler) -> Raw {
        let mut raw = serve(handler, None);
        raw.handshake().await;
        raw
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin> Raw<C> {
    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    async fn handshake(&mut self) {
        let mut hello = frame::PREFACE.to_vec();
        hello.extend(frame(frame::SETTINGS, 0, 0, &[]));
        self.send(&hello).await;
        let (h, settings) = self.next().await.expect("settings");
        assert_eq!((h.kind, h.flags), (frame::SETTINGS, 0));
        let values: Vec<(u16, u32)> = settings
            .chunks(6)
            .map(|c| {
                (
                    u16::from_be_bytes([c[0], c[1]]),
                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect();
        assert!(values.contains(&(frame::SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS as u32)));
        assert!(values.contains(&(frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW)));
        assert!(values.contains(&(
            frame::SETTINGS_MAX_HEADER_LIST_SIZE,
            MAX_HEADER_BYTES as u32
        )));
        let (h, inc) = self.next().await.expect("window update");
        assert_eq!((h.kind, h.stream), (frame::WINDOW_UPDATE, 0));
        assert_eq!(
            u32::from_be_bytes(inc[..4].try_into().unwrap()),
            CONNECTION_WINDOW - 65_535
        );
        let (h, _) = self.next().await.expect("settings ack");
        assert_eq!((h.kind, h.flags), (frame::SETTINGS, frame::ACK));
    }

    /// The next frame, or `None` once the server closed the connection.
    async fn next(&mut self) -> Option<(Head, Vec<u8>)> {
        loop {
            if self.rbuf.len() >= frame::HEAD_LEN {
                let h = Head::parse(&self.rbuf);
                if self.rbuf.len() >= frame::HEAD_LEN + h.len {
                    let payload = self.rbuf[frame::HEAD_LEN..frame::HEAD_LEN + h.len].to_vec();
                    self.rbuf.drain(..frame::HEAD_LEN + h.len);
                    return Some((h, payload));
                }
            }
            let mut buf = [0u8; 65536];
            let n = tokio::time::timeout(WAIT, self.io.read(&mut buf))
                .await
                .expect("the server sent nothing")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.rbuf.extend_from_slice(&buf[..n]);
        }
    }

    /// Sends a request (its fields as literals) with `body` in one DATA frame.
    async fn request(&mut self, stream: u32, fields: &[(&str, &str)], body: Option<&[u8]>) {
        let b = block(fields);
        let flags = frame::END_HEADERS | if body.is_none() { frame::END_STREAM } else { 0 };
        let mut out = frame(frame::HEADERS, flags, stream, &b);
        if let Some(body) = body {
            out.extend(frame(frame::DATA, frame::END_STREAM, stream, body));
        }
        self.send(&out).await;
    }

    async fn get(&mut self, stream: u32, path: &str) {
        self.request(stream, &head("GET", path), None).await;
    }

    /// Reads frames until stream `stream`'s response has ended: its fields and body. Other
    /// streams' frames, pings and window updates are skipped.
    async fn response(&mut self, stream: u32) -> (Vec<(String, String)>, Vec<u8>) {
        let mut fields = Vec::new();
        let mut body = Vec::new();
        loop {
            let (h, p) = self
                .next()
                .await
                .expect("the connection closed mid-response");
            if h.stream != stream {
                continue;
            }
            match h.kind {
                frame::HEADERS => {
                    assert!(h.has(frame::END_HEADERS), "a response head in one frame");
                    let mut list = HeaderList::new();
                    self.decoder.decode(&p, usize::MAX, &mut list).unwrap();
                    fields.extend(list.iter().map(|(n, v)| {
                        (
                            String::from_utf8_lossy(n).into_owned(),
                            String::from_utf8_lossy(v).into_owned(),
                        )
                    }));
                }
                frame::DATA => body.extend_from_slice(&p),
                frame::RST_STREAM => panic!("stream {stream} reset: {p:?}"),
                _ => {}
            }
            if h.has(frame::END_STREAM) && matches!(h.kind, frame::HEADERS | frame::DATA) {
                return (fields, body);
            }
        }
    }

    /// Reads frames until a RST_STREAM for `stream`; returns its code.
    async fn reset_of(&mut self, stream: u32) -> Reason {
        loop {
            let (h, p) = self.next().await.expect("the connection closed");
            assert_ne!(h.kind, frame::GOAWAY, "the connection failed: {p:?}");
            if h.kind == frame::RST_STREAM && h.stream == stream {
                return Reason(u32::from_be_bytes(p[..4].try_into().unwrap()));
            }
        }
    }

    /// Reads frames until GOAWAY; returns its last stream and code, after checking that the
    /// connection then closes.
    async fn goaway(&mut self) -> (u32, Reason) {
        loop {
            let (h, p) = self.next().await.expect("closed without GOAWAY");
            if h.kind == frame::GOAWAY {
                let last = u32::from_be_bytes(p[..4].try_into().unwrap());
                let code = Reason(u32::from_be_bytes(p[4..8].try_into().unwrap()));
                return (last, code);
            }
        }
    }

    async fn closed(&mut self) {
        while self.next().await.is_some() {}
        tokio::time::timeout(WAIT, &mut self.server)
            .await
            .expect("the server's connection outlived its close")
            .unwrap();
    }
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn requests_are_answered_and_pings_and_settings_acknowledged() {
    let mut c = Raw::start(Handler::Echo).await;
    c.send(&frame(frame::PING, 0, 0, b"12345678")).await;
    let (h, p) = c.next().await.unwrap();
    assert_eq!(
        (h.kind, h.flags, p.as_slice()),
        (frame::PING, frame::ACK, &b"12345678"[..])
    );

    c.get(1, "/a?b=c").await;
    let (fields, body) = c.response(1).await;
    assert_eq!(field(&fields, ":status"), Some("200"));
    assert_eq!(field(&fields, "x-path"), Some("/a?b=c"));
    assert_eq!(field(&fields, "x-fields"), Some("0"));
    assert!(body.is_empty());

    // A request body, in two DATA frames (one padded), is echoed with its length.
    let mut fields = head("POST", "/post");
    fields.push(("content-length", "11"));
    let mut out = frame(frame::HEADERS, frame::END_HEADERS, 3, &block(&fields));
    out.extend(frame(frame::DATA, frame::PADDED, 3, b"\x03hello\0\0\0"));
    out.extend(frame(frame::DATA, frame::END_STREAM, 3, b" world"));
    c.send(&out).await;
    let (fields, body) = c.response(3).await;
    assert_eq!(body, b"hello world");
    assert_eq!(field(&fields, "content-length"), Some("11"));
    assert_eq!(field(&fields, "x-fields"), Some("1"));
}

#[tokio::test]
async fn trailers_reach_the_request_body() {
    let mut c = Raw::start(Handler::Echo).await;
    let mut out = frame(
        frame::HEADERS,
        frame::END_HEADERS,
        1,
        &block(&head("POST", "/t")),
    );
    out.extend(frame(frame::DATA, 0, 1, b"abc"));
    out.extend(frame(
        frame::HEADERS,
        frame::END_HEADERS | frame::END_STREAM,
        1,
        &block(&[("x-checksum", "1"), ("x-more", "2")]),
    ));
    c.send(&out).await;
    let (fields, body) = c.response(1).await;
    assert_eq!(body, b"abc");
    assert_eq!(field(&fields, "x-trailers"), Some("2"));
}

#[tokio::test]
async fn malformed_requests_are_reset_and_the_connection_goes_on() {
    let base: Vec<(&str, &str)> = vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "b1.test"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut f = base.clone();
        f.extend_from_slice(extra);
        f
    };
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("an upper-case name", with(&[("X-Upper", "1")])),
        ("a connection field", with(&[("connection", "close")])),
        (
            "transfer-encoding",
            with(&[("transfer-encoding", "chunked")]),
        ),
        ("te other than trailers", with(&[("te", "gzip")])),
        ("a value with a newline", with(&[("x-a", "a\nb")])),
        (
            "a value with a control character",
            with(&[("x-a", "a\u{1}b")]),
        ),
        ("a value with DEL", with(&[("x-a", "a\u{7f}")])),
        ("a value with surrounding space", with(&[("x-a", " a")])),
        (
            "an unknown pseudo-header",
            with(&[(":protocol", "websocket")]),
        ),
        ("a pseudo-header after a field", {
            let mut f = vec![(":method", "GET"), (":scheme", "http"), ("x-a", "1")];
            f.push((":path", "/"));
            f
        }),
        ("a repeated :path", with(&[(":path", "/b")])),
        ("no :path", base[..2].to_vec()),
        ("a path that is not origin form", {
            let mut f = base.clone();
            f[2].1 = "http://h/";
            f
        }),
        ("a path with a space", {
            let mut f = base.clone();
            f[2].1 = "/a b";
            f
        }),
        ("an authority with userinfo", {
            let mut f = base.clone();
            f[3].1 = "u@b1.test";
            f
        }),
        (
            "CONNECT",
            vec![(":method", "CONNECT"), (":authority", "b1.test:443")],
        ),
        (
            "two content-lengths",
            with(&[("content-length", "1"), ("content-length", "2")]),
        ),
        (
            "a content-length on a request without a body",
            with(&[("content-length", "3")]),
        ),
    ];
    let mut c = Raw::start(Handler::Echo).await;
    let mut id = 1;
    for (what, fields) in &cases {
        c.request(id, fields, None).await;
        assert_eq!(c.reset_of(id).await, Reason::PROTOCOL_ERROR, "{what}");
        id += 2;
    }
    // A body longer or shorter than its content-length.
    for (len, body) in [("2", &b"abc"[..]), ("4", b"abc")] {
        let fields = with(&[("content-length", len)]);
        c.request(id, &fields, Some(body)).await;
        assert_eq!(c.reset_of(id).await, Reason::PROTOCOL_ERROR, "length {len}");
        id += 2;
    }
    c.get(id, "/still").await;
    let (fields, _) = c.response(id).await;
    assert_eq!(field(&fields, "x-path"), Some("/still"));
}

#[tokio::test]
async fn protocol_violations_end_the_connection_with_their_code() {
    let headers = block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")]);
    let cases: Vec<(&str, Vec<u8>, Reason)> = vec![
        (
            "DATA on stream 0",
            frame(frame::DATA, 0, 0, b"x"),
            Reason::PROTOCOL_ERROR,
        ),
        (
            "HEADERS on an even stream",
            frame(
                frame::HEADERS,
                frame::END_HEADERS | frame::END_STREAM,
                2,
                &headers,
            ),
            Reason::PROTOCOL_ERROR,
        ),
        (
            "CONTINUATION without HEADERS",
            frame(frame::CONTINUATION, frame::END_HEADERS, 1, &headers),
            Reason::PROTOCOL_ERROR,
        ),
        (
            "another frame inside a header block",
            [
                frame(frame::HEADERS, frame::END_STREAM, 1, &headers),
                frame(frame::PING, 0, 0, b"12345678"),
            ]
            .concat(),
            Reason::PROTOCOL_ERROR,
        ),
        (
            "a header block that does not decode",
            frame(
                frame::HEADERS,
                frame::END_HEADERS | frame::END_STREAM,
                1,
                &[0x80],
            ),
            Reason::COMPRESSION_ERROR,
        ),
        (
            "a frame larger than the largest",
            frame(frame::PING, 0, 0, &[0; frame::DEFAULT_MAX_FRAME + 1]),
            Reason::FRAME_SIZE_ERROR,
        ),
        (
            "a PING of the wrong size",
            frame(frame::PING, 0, 0, b"1234567"),
            Reason::FRAME_SIZE_ERROR,
        ),
        (
            "a connection window past 2^31-1",
            frame(frame::WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes()),
            Reason::FLOW_CONTROL_ERROR,
        ),
        (
            "a window update of 0",
            frame(frame::WINDOW_UPDATE, 0, 0, &0u32.to_be_bytes()),
            Reason::PROTOCOL_ERROR,
        ),
        (
            "an initial window past 2^31-1",
            frame(frame::SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0]),
            Reason::FLOW_CONTROL_ERROR,
        ),
        (
            "a max frame size below the smallest",
            frame(frame::SETTINGS, 0, 0, &[0, 5, 0, 0, 0x10, 0]),
            Reason::PROTOCOL_ERROR,
        ),
        (
            "a client's PUSH_PROMISE",
            frame(frame::PUSH_PROMISE, frame::END_HEADERS, 1, &[0, 0, 0, 2]),
            Reason::PROTOCOL_ERROR,
        ),
        (
            "RST_STREAM on a stream never opened",
            frame(frame::RST_STREAM, 0, 9, &[0, 0, 0, 8]),
            Reason::PROTOCOL_ERROR,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut c = Raw::start(Handler::Echo).await;
        c.send(&bytes).await;
        assert_eq!(c.goaway().await.1, code, "{what}");
        c.closed().await;
    }

    // Before the first SETTINGS: a wrong preface, or another frame first.
    for (what, bytes) in [
        (
            "a wrong preface",
            b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        ),
        (
            "PING before SETTINGS",
            [&frame::PREFACE[..], &frame(frame::PING, 0, 0, b"12345678")].concat(),
        ),
    ] {
        let mut c = serve(Handler::Echo, None);
        c.send(&bytes).await;
        assert_eq!(c.goaway().await.1, Reason::PROTOCOL_ERROR, "{what}");
        c.closed().await;
    }
}

#[tokio::test]
async fn data_past_the_connection_window_ends_the_connection() {
    let mut c = Raw::start(Handler::Hang).await;
    let post = block(&head("POST", "/"));
    c.send(&frame(frame::HEADERS, frame::END_HEADERS, 1, &post))
        .await;
    // The handler reads nothing: the window is never given back.
    let piece = vec![0u8; frame::DEFAULT_MAX_FRAME];
    for _ in 0..(CONNECTION_WINDOW as usize / piece.len()) {
        c.send(&frame(frame::DATA, 0, 1, &piece)).await;
    }
    c.send(&frame(frame::DATA, 0, 1, b"x")).await;
    assert_eq!(c.goaway().await, (1, Reason::FLOW_CONTROL_ERROR));
    c.closed().await;
}

#[tokio::test]
async fn streams_past_the_limit_are_refused() {
    let mut c = Raw::start(Handler::Hang).await;
    for i in 0..MAX_STREAMS as u32 {
        c.get(2 * i + 1, "/").await;
    }
    let over = 2 * MAX_STREAMS as u32 + 1;
    c.get(over, "/").await;
    assert_eq!(c.reset_of(over).await, Reason::REFUSED_STREAM);
}

#[tokio::test]
async fn a_client_that_makes_the_proxy_reset_stream_after_stream_is_cut_off() {
    let mut c = Raw::start(Handler::Echo).await;
    let bad = block(&[(":method", "GET"), (":scheme", "http"), (":path", "no")]);
    let mut out = Vec::new();
    for i in 0..1100u32 {
        out.extend(frame(
            frame::HEADERS,
            frame::END_HEADERS | frame::END_STREAM,
            2 * i + 1,
            &bad,
        ));
    }
    c.send(&out).await;
    assert_eq!(c.goaway().await.1, Reason::ENHANCE_YOUR_CALM);
    c.closed().await;
}

#[tokio::test]
async fn header_blocks_past_the_limit_are_answered_431_or_end_the_connection() {
    let mut c = Raw::start(Handler::Echo).await;
    let big = "x".repeat(MAX_HEADER_BYTES);
    let mut fields = head("GET", "/");
    fields.push(("x-big", &big));
    // In a HEADERS and a CONTINUATION.
    let b = block(&fields);
    let (first, rest) = b.split_at(100);
    let mut out = frame(frame::HEADERS, frame::END_STREAM, 1, first);
    out.extend(frame(frame::CONTINUATION, frame::END_HEADERS, 1, rest));
    c.send(&out).await;
    let (resp, _) = c.response(1).await;
    assert_eq!(field(&resp, ":status"), Some("431"));
    // The connection goes on.
    c.get(3, "/after").await;
    let (resp, _) = c.response(3).await;
    assert_eq!(field(&resp, "x-path"), Some("/after"));

    // CONTINUATION frames without end: the connection is cut off.
    let mut out = frame(
        frame::HEADERS,
        frame::END_STREAM,
        5,
        &block(&[(":method", "GET")]),
    );
    // Table size updates of 0 (never decoded: the block never ends).
    let filler = vec![0x20u8; 4096];
    for _ in 0..10 {
        out.extend(frame(frame::CONTINUATION, 0, 5, &filler));
    }
    c.send(&out).await;
    assert_eq!(c.goaway().await.1, Reason::ENHANCE_YOUR_CALM);
    c.closed().await;
}

#[tokio::test]
async fn shutdown_sends_goaway_and_finishes_the_open_streams() {
    let (open, gate) = oneshot::channel();
    let mut c = serve(Handler::Echo, Some(gate));
    c.handshake().await;
    c.get(1, "/open").await;
    // Wait until the server has seen stream 1 (a PING round trip orders it after).
    c.send(&frame(frame::PING, 0, 0, b"ordering")).await;
    let (h, _) = c.next().await.unwrap();
    assert_eq!(h.kind, frame::PING);
    c.shutdown.cancel();
    assert_eq!(c.goaway().await, (1, Reason::NO_ERROR));
    // A stream opened after the GOAWAY is not served; the open one finishes.
    c.get(3, "/late").await;
    open.send(()).unwrap();
    let (fields, _) = c.response(1).await;
    assert_eq!(field(&fields, "x-path"), Some("/open"));
    c.closed().await;
}

#[tokio::test]
async fn a_reset_stream_drops_its_request_path_and_bodies_of_ended_streams_are_dropped() {
    let mut c = Raw::start(Handler::Hang).await;
    c.get(1, "/").await;
    c.send(&frame(
        frame::RST_STREAM,
        0,
        1,
        &Reason::CANCEL.0.to_be_bytes(),
    ))
    .await;
    // DATA for the reset stream is dropped (its window given back), not an error.
    c.send(&frame(frame::DATA, frame::END_STREAM, 1, b"late"))
        .await;
    c.send(&frame(frame::PING, 0, 0, b"stillok!")).await;
    loop {
        let (h, p) = c.next().await.expect("the connection closed");
        assert_ne!(h.kind, frame::GOAWAY, "{p:?}");
        if h.kind == frame::PING {
            assert_eq!(p, b"stillok!");
            break;
        }
    }
}

#[tokio::test]
async fn a_client_that_cancels_stream_after_stream_is_cut_off() {
    let mut c = Raw::start(Handler::Wait).await;
    let post = block(&head("POST", "/"));
    // In batches under the stream limit (a stream refused for the limit costs nothing).
    let cancel = Reason::CANCEL.0.to_be_bytes();
    let mut id = 1;
    let mut cut_off = None;
    for _ in 0..11 {
        let mut out = Vec::new();
        for _ in 0..100 {
            out.extend(frame(frame::HEADERS, frame::END_HEADERS, id, &post));
            out.extend(frame(frame::RST_STREAM, 0, id, &cancel));
            id += 2;
        }
        out.extend(frame(frame::PING, 0, 0, b"batchend"));
        c.send(&out).await;
        let (h, p) = c.next().await.expect("the connection closed");
        if h.kind == frame::GOAWAY {
            cut_off = Some(Reason(u32::from_be_bytes(p[4..8].try_into().unwrap())));
            break;
        }
        assert_eq!(h.kind, frame::PING);
    }
    assert_eq!(cut_off, Some(Reason::ENHANCE_YOUR_CALM));
    c.closed().await;

    // Cancelling now and then, among streams that run their course, is allowed.
    let mut c = Raw::start(Handler::Wait).await;
    let mut id = 1;
    for _ in 0..1100 {
        for _ in 0..2 {
            c.request(id, &head("POST", "/"), Some(b"x")).await;
            id += 2;
        }
        c.send(&frame(frame::HEADERS, frame::END_HEADERS, id, &post))
            .await;
        c.send(&frame(frame::RST_STREAM, 0, id, &cancel)).await;
        id += 2;
    }
    c.send(&frame(frame::PING, 0, 0, b"stillok!")).await;
    loop {
        let (h, p) = c.next().await.expect("the connection closed");
        assert_ne!(h.kind, frame::GOAWAY, "{p:?}");
        if h.kind == frame::PING {
            break;
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

    /// Whatever frames a client sends after its preface and SETTINGS, the connection neither
    /// panics nor outlives its client: once the client has closed its side, the server ends.
    #[test]
    fn arbitrary_frames_never_panic_or_hang_the_server(
        frames in proptest::collection::vec(
            (0u8..11, proptest::prelude::any::<u8>(), 0u32..6, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)),
            0..24,
        ),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let mut c = serve(Handler::Echo, None);
            let mut out = frame::PREFACE.to_vec();
            out.extend(frame(frame::SETTINGS, 0, 0, &[]));
            for (kind, flags, stream, payload) in &frames {
                // Header blocks that decode now and then: a plain GET.
                let payload = if *kind == frame::HEADERS && flags & 1 == 0 {
                    block(&[(":method", "GET"), (":scheme", "http"), (":path", "/")])
                } else {
                    payload.clone()
                };
                out.extend(frame(*kind, *flags, *stream, &payload));
            }
            let _ = c.io.write_all(&out).await;
            let _ = c.io.shutdown().await;
            let mut sink = Vec::new();
            let read = tokio::time::timeout(WAIT, c.io.read_to_end(&mut sink)).await;
            assert!(read.is_ok(), "the server kept the connection open after its client closed");
            tokio::time::timeout(WAIT, &mut c.server)
                .await
                .expect("the server's connection outlived its client")
                .expect("the server's connection panicked");
        });
    }
}

/// What serving a stream needed is given back once the connection is idle again: its read and
/// write buffers, the stream set (whose stub task is the size of a stream's future), the stream
/// table's slots and the decoded-field list. Counted by the allocator while the connection's
/// task runs, over a real socket (an in-memory pipe's buffer would be counted with it).
#[tokio::test]
async fn an_idle_connection_keeps_nothing_its_streams_needed() {
    static HELD: AtomicIsize = AtomicIsize::new(0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server_io, _) = listener.accept().await.unwrap();
    let mut c = serve_on(client, server_io, Handler::Echo, None, Some(&HELD));
    c.handshake().await;

    // A PING answered is a moment when the server has nothing left to do.
    async fn settled<C: AsyncRead + AsyncWrite + Unpin>(c: &mut Raw<C>) -> isize {
        c.send(&frame(frame::PING, 0, 0, b"settled!")).await;
        loop {
            let (h, _) = c.next().await.expect("the connection closed");
            if h.kind == frame::PING && h.has(frame::ACK) {
                return HELD.load(Ordering::Relaxed);
            }
        }
    }
    let before = settled(&mut c).await;
    let padding = "p".repeat(2000);
    let mut fields = head("POST", "/upload");
    fields.push(("content-length", "16000"));
    fields.push(("x-padding", &padding));
    c.request(1, &fields, Some(&[7u8; 16000])).await;
    let (got, body) = c.response(1).await;
    assert_eq!(field(&got, ":status"), Some("200"));
    assert_eq!(body.len(), 16000);
    let after = settled(&mut c).await;
    assert!(
        after - before <= 0,
        "an idle connection kept {} bytes that its finished stream needed",
        after - before
    );
}
