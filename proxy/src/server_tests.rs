//! Tests of Hangar's HTTP/1.1 server side: head parsing, and raw HTTP/1.x clients against a
//! real proxy and upstream on `127.0.0.1:0` (pipelining, HTTP/1.0, `100-continue`, refused
//! heads, keep-alive and shutdown).

use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{Method, StatusCode, Version};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::{BodyLength, parse_request};
use crate::error::ProxyError;
use crate::head::RequestHead as _;
use crate::tests::{DOMAIN, ID, Running, config, route_to, start};

fn parse(raw: &[u8]) -> Result<Option<super::ParsedRequest>, ProxyError> {
    parse_request(&mut BytesMut::from(raw), 16 * 1024, &mut Vec::new())
}

/// `raw` with a `Host` field after its request line when it has none (an HTTP/1.1 request
/// needs exactly one), for the tests about something else.
fn with_host(raw: &str) -> String {
    if raw.to_ascii_lowercase().contains("\r\nhost:") {
        return raw.to_string();
    }
    match raw.split_once("\r\n") {
        Some((line, rest)) => format!("{line}\r\nHost: b1.hangar.test\r\n{rest}"),
        None => raw.to_string(),
    }
}

#[test]
fn heads_parse_incrementally_and_keep_what_follows() {
    let raw = b"POST /p?q=1 HTTP/1.1\r\nHost: b1.hangar.test\r\nContent-Length: 3\r\nX-A: 1\r\nx-a: 2\r\n\r\nabcGET";
    let head_len = raw.len() - 6;
    for cut in 0..head_len {
        assert!(parse(&raw[..cut]).unwrap().is_none(), "complete at {cut}");
    }
    let mut buf = BytesMut::from(&raw[..]);
    let head = parse_request(&mut buf, 16 * 1024, &mut Vec::new())
        .unwrap()
        .unwrap();
    assert_eq!(*head.head.method(), Method::POST);
    assert_eq!(head.head.target(), "/p?q=1");
    assert_eq!(head.version, Version::HTTP_11);
    assert_eq!(head.head.get("host"), Some(&b"b1.hangar.test"[..]));
    assert_eq!(
        head.head.get_all("x-a").collect::<Vec<_>>(),
        [b"1", b"2"],
        "names are matched in lower case"
    );
    assert_eq!(head.body, BodyLength::Length(3));
    assert!(head.keep_alive && !head.expect_continue);
    // The body and the next request stay in the buffer.
    assert_eq!(&buf[..], b"abcGET");
}

#[test]
fn framing_and_keep_alive_follow_rfc_9112() {
    let head = |raw: &str| parse(with_host(raw).as_bytes()).unwrap().unwrap();
    let h = head("GET / HTTP/1.0\r\n\r\n");
    assert!(!h.keep_alive, "HTTP/1.0 closes by default");
    assert_eq!(h.body, BodyLength::Length(0));
    assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
    assert!(!head("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").keep_alive);
    let h = head("PUT / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n");
    assert_eq!(h.body, BodyLength::Chunked);
    assert!(h.keep_alive);
    // Both framings: chunked wins and the connection is not reused (request smuggling).
    let h = head("PUT / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert_eq!(h.body, BodyLength::Chunked);
    assert!(!h.keep_alive);
    assert!(
        head("PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n").expect_continue
    );
    assert!(
        !head("GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").expect_continue,
        "nothing to wait for without a body"
    );
    assert_eq!(
        head("PUT / HTTP/1.1\r\nContent-Length: 7, 7\r\n\r\n").body,
        BodyLength::Length(7)
    );
}

#[test]
fn broken_or_oversized_heads_are_refused_with_the_right_status() {
    let status = |raw: &[u8]| {
        let raw = with_host(&String::from_utf8_lossy(raw));
        parse(raw.as_bytes()).err().map(|e| e.status().as_u16())
    };
    let unhosted = |raw: &[u8]| parse(raw).err().map(|e| e.status().as_u16());
    // Targets that are not UTF-8, or hold control bytes, are refused, never rewritten (a
    // target that is not UTF-8 used to reach the backend as `/`); UTF-8 passes as it came.
    for bad in [
        &b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"GET /a\xc3 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        assert_eq!(unhosted(bad), Some(400), "{}", String::from_utf8_lossy(bad));
    }
    let utf8 = parse(b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(utf8.head.target(), "/caf\u{e9}");
    // Host missing or repeated in HTTP/1.1 (it used to be accepted).
    assert_eq!(unhosted(b"GET / HTTP/1.1\r\n\r\n"), Some(400));
    assert_eq!(
        unhosted(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        Some(400)
    );
    assert_eq!(
        unhosted(b"GET / HTTP/1.0\r\n\r\n"),
        None,
        "HTTP/1.0 needs none"
    );
    // A transfer coding other than exactly `chunked` (gzip used to be dropped silently).
    for coded in [
        &b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
        b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        assert_eq!(
            status(coded),
            Some(501),
            "{}",
            String::from_utf8_lossy(coded)
        );
    }
    for bad in [
        // Targets that are not a path or an absolute URL (they used to be rewritten to `/`).
        &b"GET abc HTTP/1.1\r\n\r\n"[..],
        b"GET evil.example:80 HTTP/1.1\r\n\r\n",
        b"CONNECT host:80 HTTP/1.1\r\n\r\n",
        b"GET * HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
        b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"\x00\x01garbage\r\n\r\n",
    ] {
        assert_eq!(status(bad), Some(400), "{}", String::from_utf8_lossy(bad));
    }
    // A partial head that has reached the limit, and too many fields.
    assert_eq!(
        status(format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(16 * 1024)).as_bytes()),
        Some(431)
    );
    let many: String = (0..super::MAX_REQUEST_HEADERS + 1)
        .map(|i| format!("x-{i}: 1\r\n"))
        .collect();
    assert_eq!(
        status(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
        Some(431)
    );
}

/// One response read from `r`: status, lower-cased head text and body (content-length or
/// chunked framing).
async fn read_response<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> (u16, String, Vec<u8>) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).await.unwrap();
        assert!(n > 0, "connection closed in a response head: {head}");
        if line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    let status: u16 = head[9..12].parse().unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
    };
    let mut body = Vec::new();
    if let Some(n) = header("content-length") {
        body.resize(n.trim().parse().unwrap(), 0);
        r.read_exact(&mut body).await.unwrap();
    } else if header("transfer-encoding").as_deref() == Some("chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await.unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    (status, head, body)
}

/// Waits for the server to close `r` (end of stream), at most 10 s.
async fn closed_by_server<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut rest)).await,
        Ok(Ok(_))
    ) && rest.is_empty()
}

/// A backend the test scripts (accepts, reads and answers itself), which `ID` routes to.
async fn scripted_backend(r: &Running) -> TcpListener {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    route_to(r, &[(ID, backend.local_addr().unwrap())]);
    backend
}

/// A raw client connection to the proxy.
async fn connect(r: &Running) -> BufReader<TcpStream> {
    BufReader::new(TcpStream::connect(r.addr).await.unwrap())
}

async fn send(s: &mut BufReader<TcpStream>, raw: impl AsRef<[u8]>) {
    s.get_mut().write_all(raw.as_ref()).await.unwrap();
}

/// A GET of `/` for the test backend over `version` (`1.0` or `1.1`), with `extra` header lines.
fn get(version: &str, extra: &str) -> String {
    format!("GET / HTTP/{version}\r\nhost: {ID}.{DOMAIN}\r\n{extra}\r\n")
}

/// A POST to the echo path with the given header lines (framing included) and body bytes.
fn raw_post(headers: &str, body: &str) -> String {
    format!("POST /echo-body HTTP/1.1\r\nhost: {ID}.{DOMAIN}\r\n{headers}\r\n{body}")
}

/// A POST of `body` with its content-length and `extra` header lines.
fn post(body: &str, extra: &str) -> String {
    raw_post(&format!("content-length: {}\r\n{extra}", body.len()), body)
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let r = start(config(), None).await;
    let mut s = connect(&r).await;
    let all = format!(
        "{}{}GET / HTTP/1.1\r\nhost: {ID}.{DOMAIN}\r\n\r\n{}",
        post("one", ""),
        post("two", ""),
        post("three", "connection: close\r\n")
    );
    send(&mut s, all).await;
    for want in ["one", "two", "ok", "three"] {
        let (status, head, body) = read_response(&mut s).await;
        assert_eq!(status, 200, "{head}");
        assert_eq!(String::from_utf8(body).unwrap(), want);
        assert!(head.contains("date: "), "a date is added: {head}");
    }
    assert!(
        closed_by_server(&mut s).await,
        "closed after `connection: close`"
    );
}

#[tokio::test]
async fn http_1_0_clients_get_keep_alive_only_when_they_ask() {
    let r = start(config(), None).await;
    let get10 = get("1.0", "connection: keep-alive\r\n");
    let mut s = connect(&r).await;
    for _ in 0..2 {
        send(&mut s, &get10).await;
        let (status, head, body) = read_response(&mut s).await;
        assert_eq!((status, &body[..]), (200, &b"ok"[..]));
        assert!(head.contains("connection: keep-alive"), "{head}");
    }
    send(&mut s, get("1.0", "")).await;
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 200);
    assert!(head.contains("connection: close"), "{head}");
    assert!(closed_by_server(&mut s).await);
}

#[tokio::test]
async fn a_client_that_expects_100_continue_gets_it_before_sending_its_body() {
    let r = start(config(), None).await;
    let mut s = connect(&r).await;
    send(
        &mut s,
        raw_post("content-length: 5\r\nexpect: 100-continue\r\n", ""),
    )
    .await;
    let (status, _, _) = read_response(&mut s).await;
    assert_eq!(status, 100);
    send(&mut s, b"hello").await;
    let (status, head, body) = read_response(&mut s).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, b"hello");
    assert!(
        head.contains("x-framing: length some(\"5\")"),
        "the backend never sees the expectation: {head}"
    );
}

#[tokio::test]
async fn chunked_request_bodies_are_decoded_and_reframed() {
    let r = start(config(), None).await;
    let mut s = connect(&r).await;
    send(
        &mut s,
        raw_post(
            "transfer-encoding: chunked\r\n",
            "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
        ),
    )
    .await;
    let (status, head, body) = read_response(&mut s).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, b"hello world");
    assert!(head.contains("x-framing: chunked"), "{head}");
    // A chunk that breaks the coding: the request fails, the connection closes.
    send(&mut s, raw_post("transfer-encoding: chunked\r\n", "zz\r\n")).await;
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 400, "{head}");
    assert!(closed_by_server(&mut s).await);
}

#[tokio::test]
async fn a_refused_request_with_a_small_body_keeps_the_connection() {
    let r = start(config(), None).await;
    let mut s = connect(&r).await;
    // Unknown backend: 404 before the body is read; the body is skipped, not parsed as a
    // request.
    let unknown = "POST / HTTP/1.1\r\nhost: nobody.hangar.test\r\ncontent-length: 18\r\n\r\nGET /evil HTTP/1.1";
    send(&mut s, unknown).await;
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 404, "{head}");
    assert!(head.contains("x-hangar-error: unknown_backend"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    send(&mut s, post("again", "")).await;
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!((status, &body[..]), (200, &b"again"[..]));
}

#[tokio::test]
async fn malformed_heads_get_400_and_the_connection_closes() {
    let r = start(config(), None).await;
    let mut s = connect(&r).await;
    send(&mut s, b"GET / HTTP/1.1\r\ncontent-length: 1, 2\r\n\r\n").await;
    let (status, head, body) = read_response(&mut s).await;
    assert_eq!(status, 400);
    assert!(head.contains("x-hangar-error: bad_request"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("content-length"));
    assert!(closed_by_server(&mut s).await);
    assert_eq!(
        r.proxy.activity().len(),
        0,
        "a refused head reaches no backend"
    );
}

#[tokio::test]
async fn head_responses_keep_their_length_and_send_no_body() {
    let r = start(config(), None).await;
    let mut s = connect(&r).await;
    send(
        &mut s,
        format!("HEAD / HTTP/1.1\r\nhost: {ID}.{DOMAIN}\r\n\r\n"),
    )
    .await;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        head.push_str(&line.to_ascii_lowercase());
    }
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-length: 2"), "{head}");
    // The next response follows the head directly: no body bytes in between.
    send(&mut s, get("1.1", "")).await;
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
}

/// Waits for the server to close `s`, which has just been answered, and checks that it waited
/// for about the 300 ms keep-alive timeout the tests set.
async fn closes_after_idling_about_300ms(s: &mut BufReader<TcpStream>) {
    let idle_since = Instant::now();
    assert!(closed_by_server(s).await, "idle connection kept open");
    let idle = idle_since.elapsed();
    assert!(
        idle >= Duration::from_millis(250) && idle < Duration::from_secs(5),
        "{idle:?}"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_close_after_the_timeout_or_at_shutdown() {
    let mut cfg = config();
    cfg.keep_alive_timeout = Duration::from_millis(300);
    let r = start(cfg, None).await;
    let mut s = connect(&r).await;
    send(&mut s, get("1.1", "")).await;
    assert_eq!(read_response(&mut s).await.0, 200);
    closes_after_idling_about_300ms(&mut s).await;

    // With the default (75 s) keep-alive, shutdown closes an idle connection at once.
    let r = start(config(), None).await;
    let mut s = connect(&r).await;
    send(&mut s, get("1.1", "")).await;
    assert_eq!(read_response(&mut s).await.0, 200);
    r.shutdown.cancel();
    assert!(closed_by_server(&mut s).await, "idle connection kept open");
    tokio::time::timeout(Duration::from_secs(10), r.done)
        .await
        .expect("run() returned")
        .unwrap();
}

/// The keep-alive timer is moved only when it must fire sooner: one set for an earlier wait
/// fires early and is moved on, so a connection that keeps sending requests outlives the
/// deadline of its first wait, and still closes a whole timeout after its last request.
#[tokio::test]
async fn a_busy_keep_alive_connection_outlives_its_first_deadline() {
    let mut cfg = config();
    cfg.keep_alive_timeout = Duration::from_millis(300);
    let r = start(cfg, None).await;
    let mut s = connect(&r).await;
    let started = Instant::now();
    for _ in 0..8 {
        send(&mut s, get("1.1", "")).await;
        assert_eq!(read_response(&mut s).await.0, 200);
        // The client thinks for a third of the timeout between requests.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(800));
    send(&mut s, get("1.1", "")).await;
    assert_eq!(read_response(&mut s).await.0, 200);
    closes_after_idling_about_300ms(&mut s).await;
}

#[tokio::test]
async fn a_slow_head_gets_408_before_the_connection_closes() {
    let mut cfg = config();
    cfg.header_read_timeout = Duration::from_millis(200);
    let r = start(cfg, None).await;
    let mut s = connect(&r).await;
    send(&mut s, format!("GET / HTTP/1.1\r\nhost: {ID}.{DOMAIN}\r\n")).await;
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT.as_u16(), "{head}");
    assert!(
        head.contains("x-hangar-error: request_head_timeout"),
        "{head}"
    );
    assert!(closed_by_server(&mut s).await);
}

#[tokio::test]
async fn a_stalled_request_body_gets_408_but_a_slow_steady_one_gets_through() {
    let mut cfg = config();
    cfg.client_body_timeout = Duration::from_millis(300);
    let r = start(cfg, None).await;

    // Ten bytes announced, a piece every 100 ms: slower than the whole timeout, never idle
    // for as long as it.
    let mut s = connect(&r).await;
    send(&mut s, raw_post("content-length: 10\r\n", "")).await;
    for piece in ["ab", "cd", "ef", "gh", "ij"] {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(&mut s, piece).await;
    }
    let (status, head, body) = read_response(&mut s).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, b"abcdefghij");

    // Three of ten bytes, then nothing.
    let mut s = connect(&r).await;
    send(&mut s, raw_post("content-length: 10\r\n", "abc")).await;
    let started = Instant::now();
    let (status, head, _) = tokio::time::timeout(Duration::from_secs(10), read_response(&mut s))
        .await
        .expect("a stalled body was waited for without end");
    let waited = started.elapsed();
    assert_eq!(status, 408, "{head}");
    assert!(
        head.contains("x-hangar-error: request_body_timeout"),
        "{head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert!(closed_by_server(&mut s).await);
}

/// Reads one request head from a backend's side of a connection (into `buf`, then drops it).
async fn backend_reads_head(up: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            buf.drain(..end + 4);
            return head;
        }
        let mut chunk = [0u8; 4096];
        let n = up.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the proxy closed the backend connection mid-head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_client_that_leaves_mid_request_frees_its_backend_connection() {
    let r = start(config(), None).await;
    // A backend scripted by the test: it answers only when told to.
    let backend = scripted_backend(&r).await;
    let mut s = connect(&r).await;
    send(&mut s, get("1.1", "")).await;
    let (mut up, _) = backend.accept().await.unwrap();
    let mut buf = Vec::new();
    backend_reads_head(&mut up, &mut buf).await;

    // A pipelined request sent while the first waits is kept for later, not taken for the
    // client leaving.
    send(&mut s, get("1.1", "")).await;
    for answer in ["one", "two"] {
        let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n{answer}");
        up.write_all(resp.as_bytes()).await.unwrap();
        let (status, head, body) = read_response(&mut s).await;
        assert_eq!((status, body), (200, answer.as_bytes().to_vec()), "{head}");
        if answer == "one" {
            backend_reads_head(&mut up, &mut buf).await;
        }
    }

    // The client leaves while its next request waits: the proxy closes the backend connection
    // at once instead of holding it until the backend answers.
    send(&mut s, get("1.1", "")).await;
    backend_reads_head(&mut up, &mut buf).await;
    drop(s);
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), up.read(&mut rest))
        .await
        .expect("the backend connection stayed open after its client left")
        .unwrap_or(0);
    assert_eq!(n, 0, "the backend connection ends, with nothing more sent");
}

#[test]
fn absolute_form_targets_keep_their_authority_and_refuse_userinfo() {
    let h = parse(b"GET http://b2.hangar.test:8080/p?q=1 HTTP/1.1\r\nHost: b1.hangar.test\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(h.head.authority(), Some("b2.hangar.test:8080"));
    assert_eq!(h.head.target(), "/p?q=1");
    for bad in [
        &b"GET http://user@b2.hangar.test/ HTTP/1.1\r\nHost: b2.hangar.test\r\n\r\n"[..],
        b"GET http://b2.hangar.test@evil.example/ HTTP/1.1\r\nHost: b2.hangar.test\r\n\r\n",
    ] {
        let e = parse(bad).err();
        assert_eq!(
            e.as_ref().map(|e| e.status().as_u16()),
            Some(400),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

/// The authority of an absolute-form target used to be ignored in favour of `Host`, and the
/// backend got the `Host` the client sent rather than the target's authority.
#[tokio::test]
async fn an_absolute_form_target_is_routed_by_its_authority_and_forwarded_in_origin_form() {
    let r = start(config(), None).await;
    let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let default = TcpListener::bind("127.0.0.1:0").await.unwrap();
    route_to(
        &r,
        &[
            (ID, default.local_addr().unwrap()),
            ("b2", other.local_addr().unwrap()),
        ],
    );
    let mut s = connect(&r).await;
    // The Host names b1; the target names b2, and wins.
    send(
        &mut s,
        format!("GET http://b2.{DOMAIN}:8080/p?q=1 HTTP/1.1\r\nhost: {ID}.{DOMAIN}\r\n\r\n"),
    )
    .await;
    let (mut up, _) = tokio::time::timeout(Duration::from_secs(10), other.accept())
        .await
        .expect("the request did not reach the backend its target names")
        .unwrap();
    let head = backend_reads_head(&mut up, &mut Vec::new()).await;
    assert!(head.starts_with("GET /p?q=1 HTTP/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!("\r\nhost: b2.{DOMAIN}:8080\r\n")),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nx-forwarded-host: b2.{DOMAIN}:8080\r\n")),
        "{head}"
    );
    assert!(!head.contains(&format!("{ID}.{DOMAIN}")), "{head}");
    assert_eq!(
        head.matches("host: ").count(),
        2,
        "one host, one x-forwarded-host: {head}"
    );
    up.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nb2")
        .await
        .unwrap();
    let (status, head, body) = read_response(&mut s).await;
    assert_eq!((status, &body[..]), (200, &b"b2"[..]), "{head}");
}

/// There was no limit on the size of a request body.
#[tokio::test]
async fn a_body_announced_larger_than_the_limit_gets_413_without_reaching_the_backend() {
    let mut cfg = config();
    cfg.max_body_bytes = 1000;
    let r = start(cfg, None).await;
    let backend = scripted_backend(&r).await;

    // The head alone: the 413 comes at once, before (and instead of) a 100 Continue.
    let mut s = connect(&r).await;
    send(
        &mut s,
        raw_post("content-length: 1001\r\nexpect: 100-continue\r\n", ""),
    )
    .await;
    let (status, head, body) = tokio::time::timeout(Duration::from_secs(10), read_response(&mut s))
        .await
        .expect("no answer to a body announced past the limit");
    assert_eq!(status, 413, "{head}");
    assert!(
        head.contains("x-hangar-error: request_body_too_large"),
        "{head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("1000 bytes"));
    assert!(closed_by_server(&mut s).await);

    // A body at the limit goes through; it is the first request the backend sees.
    let mut s = connect(&r).await;
    send(&mut s, post(&"x".repeat(1000), "")).await;
    let (mut up, _) = backend.accept().await.unwrap();
    let head = backend_reads_head(&mut up, &mut Vec::new()).await;
    assert!(head.contains("content-length: 1000\r\n"), "{head}");
}

/// A chunked body that grows past the limit is cut off with a 413, and its backend
/// connection, which has part of the body, is closed rather than reused.
#[tokio::test]
async fn a_chunked_body_that_grows_past_the_limit_gets_413_and_its_backend_connection_closes() {
    let mut cfg = config();
    cfg.max_body_bytes = 1000;
    let r = start(cfg, None).await;
    let backend = scripted_backend(&r).await;
    let chunk = format!("258\r\n{}\r\n", "c".repeat(0x258)); // 600 bytes
    let mut s = connect(&r).await;
    send(&mut s, raw_post("transfer-encoding: chunked\r\n", &chunk)).await;
    let (mut up, _) = backend.accept().await.unwrap();
    let mut got = Vec::new();
    let head = backend_reads_head(&mut up, &mut got).await;
    assert!(head.contains("transfer-encoding: chunked"), "{head}");

    // 1200 bytes in all.
    send(&mut s, &chunk).await;
    let (status, head, _) = tokio::time::timeout(Duration::from_secs(10), read_response(&mut s))
        .await
        .expect("no answer to a body past the limit");
    assert_eq!(status, 413, "{head}");
    assert!(
        head.contains("x-hangar-error: request_body_too_large"),
        "{head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    assert!(closed_by_server(&mut s).await);
    let ended = tokio::time::timeout(Duration::from_secs(10), up.read_to_end(&mut got))
        .await
        .expect("the backend connection stayed open with half a body");
    assert!(ended.is_ok(), "{ended:?}");
    assert!(
        !got.windows(5).any(|w| w == b"0\r\n\r\n"),
        "the backend never sees the body end"
    );
    assert_eq!(r.proxy.activity().snapshot()[0].open, 0);
}

/// A backend that stopped sending mid-body used to hold the client's connection (and the
/// proxy's task) for as long as it kept its connection open.
#[tokio::test]
async fn a_backend_that_stalls_mid_body_is_cut_off_and_the_client_connection_closes() {
    let mut cfg = config();
    cfg.upstream_body_timeout = Duration::from_millis(200);
    let r = start(cfg, None).await;
    let backend = scripted_backend(&r).await;
    let mut s = connect(&r).await;
    send(&mut s, get("1.1", "")).await;
    let (mut up, _) = backend.accept().await.unwrap();
    backend_reads_head(&mut up, &mut Vec::new()).await;
    up.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let stalled = Instant::now();

    // The client gets the head and what the backend sent, then the connection closes.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the client connection stayed open")
        .unwrap();
    let waited = stalled.elapsed();
    let got = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(got.starts_with("http/1.1 200"), "{got}");
    assert!(got.contains("content-length: 10\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\nabc"), "{got}");
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // The backend connection is closed, not pooled.
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), up.read(&mut rest))
        .await
        .expect("the stalled backend connection stayed open")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// Server-sent events keep their stream through pauses longer than the body timeout.
#[tokio::test]
async fn server_sent_events_may_stay_quiet_longer_than_the_body_timeout() {
    let mut cfg = config();
    cfg.upstream_body_timeout = Duration::from_millis(100);
    cfg.upstream_sse_timeout = Duration::from_secs(30);
    let r = start(cfg, None).await;
    let backend = scripted_backend(&r).await;
    let mut s = connect(&r).await;
    send(&mut s, get("1.1", "")).await;
    let (mut up, _) = backend.accept().await.unwrap();
    backend_reads_head(&mut up, &mut Vec::new()).await;
    up.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n",
    )
    .await
    .unwrap();
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        s.read_line(&mut head).await.unwrap();
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut events = Vec::new();
    while events != b"data: 1\n\n" {
        events.extend(read_chunk(&mut s).await.expect("the stream ended early"));
    }

    // Quiet for four body timeouts (the pause under test), then the next event and the end.
    tokio::time::sleep(Duration::from_millis(400)).await;
    up.write_all(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    events.clear();
    let rest = async {
        while let Some(data) = read_chunk(&mut s).await {
            events.extend(data);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), rest)
        .await
        .expect("the rest of the stream did not arrive");
    assert_eq!(events, b"data: 2\n\n", "the stream went on and ended whole");
}

/// One chunk's data from a chunked body, or `None` at the last chunk (whose end is read too).
async fn read_chunk<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<Vec<u8>> {
    let mut size = String::new();
    let n = r.read_line(&mut size).await.unwrap();
    assert!(n > 0, "the connection closed mid-body");
    let len = usize::from_str_radix(size.trim(), 16).unwrap();
    let mut data = vec![0; len + 2];
    r.read_exact(&mut data).await.unwrap();
    assert!(data.ends_with(b"\r\n"));
    data.truncate(len);
    (len > 0).then_some(data)
}

/// A client that never read its response used to keep its task and its backend connection
/// for as long as the backend had something to send.
#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_and_its_backend_connection_closed() {
    let mut cfg = config();
    cfg.client_write_timeout = Duration::from_millis(300);
    let r = start(cfg, None).await;
    let backend = scripted_backend(&r).await;
    // A small receive window, so the proxy's writes block soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut client = socket.connect(r.addr).await.unwrap();
    client.write_all(get("1.1", "").as_bytes()).await.unwrap();

    // A gigabyte, written until the proxy closes the connection.
    let (mut up, _) = backend.accept().await.unwrap();
    backend_reads_head(&mut up, &mut Vec::new()).await;
    const ANNOUNCED: u64 = 1 << 30;
    let feeder = tokio::spawn(async move {
        up.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {ANNOUNCED}\r\n\r\n").as_bytes())
            .await?;
        let piece = vec![b'z'; 64 * 1024];
        let mut sent = 0u64;
        while sent < ANNOUNCED {
            up.write_all(&piece).await?;
            sent += piece.len() as u64;
        }
        Ok::<u64, std::io::Error>(sent)
    });
    let fed = tokio::time::timeout(Duration::from_secs(10), feeder)
        .await
        .expect("the backend connection stayed open for a client that never reads")
        .unwrap();
    assert!(
        fed.is_err(),
        "the backend could send the whole body: {fed:?}"
    );

    // The request's task has ended: nothing is open for the backend any more.
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.proxy.activity().snapshot()[0].open != 0 {
        assert!(Instant::now() < deadline, "the request is still open");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The client's connection ends too, short of the body.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
        .await
        .expect("the client connection stayed open");
    assert!((got.len() as u64) < ANNOUNCED, "{}", got.len());
}

/// A body that arrives with its head goes to the client straight from the backend
/// connection's buffer, and one that arrives in pieces piece by piece (the client gets the
/// first piece before the backend has sent the rest); either way the connection then serves
/// the next request (the backend accepts just one) and the client gets each body whole.
#[tokio::test]
async fn bodies_that_come_with_their_head_or_after_it_reach_the_client_whole_on_one_connection() {
    let r = start(config(), None).await;
    let backend = scripted_backend(&r).await;
    let mut s = connect(&r).await;
    let mut up = None;
    let mut buf = Vec::new();
    for (i, split) in [false, true, false, true].into_iter().enumerate() {
        send(&mut s, get("1.1", "")).await;
        if up.is_none() {
            up = Some(backend.accept().await.unwrap().0);
        }
        let up = up.as_mut().unwrap();
        tokio::time::timeout(Duration::from_secs(10), backend_reads_head(up, &mut buf))
            .await
            .unwrap_or_else(|_| panic!("request {i} did not come on the first connection"));
        let body = format!("answer {i}");
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        if !split {
            up.write_all(format!("{head}{body}").as_bytes())
                .await
                .unwrap();
            let (status, head, got) = read_response(&mut s).await;
            assert_eq!((status, got), (200, body.into_bytes()), "{head}");
            continue;
        }
        let (first, rest) = body.split_at(3);
        up.write_all(format!("{head}{first}").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        while line != "\r\n" {
            line.clear();
            s.read_line(&mut line).await.unwrap();
        }
        let mut got = vec![0u8; body.len()];
        s.read_exact(&mut got[..3]).await.unwrap();
        up.write_all(rest.as_bytes()).await.unwrap();
        s.read_exact(&mut got[3..]).await.unwrap();
        assert_eq!(got, body.as_bytes());
    }
}
