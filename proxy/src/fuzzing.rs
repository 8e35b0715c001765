//! The bodies of the cargo-fuzz targets over the proxy's HTTP/1.1 wire format
//! (`fuzz/fuzz_targets/{request_head,body_decoders,response_head}.rs`) and HTTP/2 header
//! blocks (`h2_header_block.rs`), shared with the
//! regression tests that replay `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/` in the
//! normal suite. Each takes arbitrary bytes, runs the real parsers on them and panics when a
//! property fails. Not an API.

use bytes::BytesMut;
use hangar_core::BackendId;
use hangar_core::route::{self, RequestNames, TOKEN_COOKIE, TOKEN_QUERY};
use http::{Method, StatusCode, Version};

use crate::forward::{is_hop_by_hop, is_upgrade};
use crate::h1::{self, BodyDecoder, Decoded, RequestFraming, ResponseFraming};
use crate::head::RequestHead;
use crate::server::{BodyLength, ParsedRequest, parse_request};
use crate::service::{ClientInfo, Forwarding, upstream_head};

/// The request head limit the target parses with (the default is 64 KiB; a smaller one lets
/// inputs of a few KiB reach the 431 path).
const MAX_HEAD: usize = 2048;
/// The domain requests are routed under.
const DOMAIN: &str = "hangar.test";
/// The most pipelined requests read from one input.
const MAX_PIPELINED: usize = 16;

/// `request_head`: the input is what a client sends on one connection. Parses request heads
/// out of it as the connection loop does (each followed by its body, pipelined requests after
/// it), checks what the parser promises (lower-case names, one `Host` on HTTP/1.1, framing,
/// an origin-form target), finds the route the request names, and encodes the head the
/// backend would get, which must parse and carry no Hangar token and no forged `x-hangar-*`.
pub fn fuzz_request_head(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut spans = Vec::new();
    for _ in 0..MAX_PIPELINED {
        let before = buf.len();
        let parsed = match parse_request(&mut buf, MAX_HEAD, &mut spans) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => {
                assert_eq!(
                    buf.len(),
                    before,
                    "an incomplete head is left in the buffer"
                );
                assert!(
                    before < MAX_HEAD,
                    "an incomplete head past the limit is a 431"
                );
                return;
            }
            Err(_) => return,
        };
        assert!(buf.len() < before, "a parsed head is taken off the buffer");
        check_request(&parsed);
        check_upstream(&parsed.head);

        // The body, then the next request, as the connection loop reads them.
        let mut body = match parsed.body {
            BodyLength::Length(n) => BodyDecoder::length(n),
            BodyLength::Chunked => BodyDecoder::chunked(),
        };
        loop {
            match body.decode(&mut buf, 0) {
                Ok(Decoded::Data(d)) => assert!(!d.is_empty()),
                Ok(Decoded::Done) => break,
                Ok(Decoded::NeedMore) | Err(_) => return,
            }
        }
        if !parsed.keep_alive {
            return;
        }
        spans = parsed.head.into_fields();
    }
}

fn check_request(p: &ParsedRequest) {
    let head = &p.head;
    let hosts = check_head(head);
    if p.version == Version::HTTP_11 {
        assert_eq!(hosts, 1, "an HTTP/1.1 request has exactly one host");
    }
    if p.expect_continue {
        assert_eq!(p.version, Version::HTTP_11);
        assert_ne!(p.body, BodyLength::Length(0));
    }
    let te = head.get("transfer-encoding").is_some();
    let cl = head.get("content-length");
    if te {
        assert_eq!(p.body, BodyLength::Chunked);
        assert_eq!(p.version, Version::HTTP_11);
        if cl.is_some() {
            assert!(
                !p.keep_alive,
                "a request framed both ways closes its connection"
            );
        }
    } else {
        let n = match cl {
            Some(_) => head
                .get_all("content-length")
                .try_fold(None, |seen, v| h1::content_length(v, seen).map(Some))
                .expect("the parser checked the lengths")
                .unwrap_or(0),
            None => 0,
        };
        assert_eq!(p.body, BodyLength::Length(n));
    }
}

/// What every parsed head promises, whichever version it came in, and the route it names;
/// returns how many `host` fields it has.
fn check_head(head: &impl RequestHead) -> usize {
    let mut hosts = 0;
    for (name, value) in head.fields() {
        assert!(!name.is_empty(), "empty field name");
        assert!(
            !name.iter().any(u8::is_ascii_uppercase),
            "names are lower case: {:?}",
            String::from_utf8_lossy(name)
        );
        assert!(
            !value.iter().any(|&b| b == b'\r' || b == b'\n'),
            "a field value holds a line break"
        );
        hosts += usize::from(name == b"host");
    }
    let target = head.target();
    assert!(
        target.starts_with('/') || (target == "*" && *head.method() == Method::OPTIONS),
        "the target is in origin form: {target:?}"
    );
    assert!(
        target.bytes().all(|b| b > b' ' && b != 0x7f),
        "the target holds no space or control character: {target:?}"
    );
    assert_eq!(
        format!(
            "{}{}",
            head.path(),
            head.query().map_or(String::new(), |q| format!("?{q}"))
        ),
        target
    );
    if let Some(authority) = head.authority() {
        assert!(
            !authority.is_empty() && !authority.contains('@'),
            "{authority:?}"
        );
    }
    assert_ne!(*head.method(), Method::CONNECT);

    // Which backend the request names, gathered as `service::find_route` does.
    fn text(v: &[u8]) -> Option<&str> {
        std::str::from_utf8(v).ok()
    }
    let host = head.authority().or_else(|| head.get("host").and_then(text));
    let cookies: Vec<&str> = head.get_all("cookie").filter_map(text).take(8).collect();
    let names = RequestNames {
        host,
        header: head.get(route::BACKEND_HEADER).and_then(text),
        cookies: &cookies,
    };
    let _ = route::resolve(&names, DOMAIN);
    hosts
}

/// Whether a credential (`Authorization` value, as text) is a bearer Hangar token in any
/// spelling a backend could read.
fn bearer_token(value: &str) -> bool {
    let v = value.trim_start();
    let Some(scheme) = v.get(..6) else {
        return false;
    };
    let rest = &v[6..];
    scheme.eq_ignore_ascii_case("bearer")
        && rest.starts_with(|c: char| c.is_ascii_whitespace())
        && rest
            .trim()
            .trim_matches('"')
            .get(..3)
            .is_some_and(|p| p.eq_ignore_ascii_case("v1."))
        && rest.trim().trim_matches('"').len() > 3
}

fn check_upstream(head: &impl RequestHead) {
    let backend = BackendId::parse("b1").unwrap();
    let client = ClientInfo::new(([10, 0, 0, 1], 4567).into(), false);
    let f = Forwarding {
        backend: &backend,
        user: "alice",
        verified_authorization: None,
        key: Some("team/alice"),
        epoch: 3,
        client: &client,
        upgrade: is_upgrade(head),
    };
    let mut up = upstream_head(head, &f);
    h1::end_request_head(&mut up, RequestFraming::None);

    let mut headers = vec![httparse::EMPTY_HEADER; 2 * crate::server::MAX_REQUEST_HEADERS + 16];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&up) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, up.len()),
        other => panic!(
            "the backend cannot parse the head it gets ({other:?}): {:?}",
            String::from_utf8_lossy(&up)
        ),
    }
    let lossy = String::from_utf8_lossy(&up);
    assert_eq!(req.method, Some(head.method().as_str()), "{lossy}");
    let target = req.path.unwrap_or_default();
    assert!(target.starts_with('/') || target == "*", "{lossy}");
    if let Some((_, query)) = target.split_once('?') {
        assert!(
            !route::has_query_param(query, TOKEN_QUERY),
            "the token query parameter reaches the backend: {lossy}"
        );
    }
    let (mut backend_ids, mut users, mut protos, mut keys, mut epochs) = (0, 0, 0, 0, 0);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = String::from_utf8_lossy(h.value);
        assert!(!name.iter().any(u8::is_ascii_uppercase), "{lossy}");
        assert!(!name.contains(&b'_'), "a name with an underscore: {lossy}");
        if !f.upgrade {
            assert!(
                !is_hop_by_hop(name) && name != b"upgrade",
                "a hop-by-hop field reaches the backend: {lossy}"
            );
        }
        match name {
            b"x-hangar-backend-id" => {
                backend_ids += 1;
                assert_eq!(h.value, b"b1", "{lossy}");
            }
            b"x-hangar-user" => {
                users += 1;
                assert_eq!(h.value, b"alice", "{lossy}");
            }
            b"x-hangar-key" => {
                keys += 1;
                assert_eq!(h.value, b"team/alice", "{lossy}");
            }
            b"x-hangar-epoch" => {
                epochs += 1;
                assert_eq!(h.value, b"3", "{lossy}");
            }
            n if n.starts_with(b"x-hangar-") => panic!("a client's x-hangar-* field: {lossy}"),
            b"x-forwarded-proto" => {
                protos += 1;
                assert_eq!(h.value, b"http", "{lossy}");
            }
            b"forwarded" | b"content-length" | b"expect" => panic!("{lossy}"),
            b"authorization" => assert!(
                !bearer_token(&value),
                "a bearer token reaches the backend: {lossy}"
            ),
            b"cookie" => assert!(
                route::cookie_value(&value, TOKEN_COOKIE).is_none(),
                "the token cookie reaches the backend: {lossy}"
            ),
            _ => {}
        }
    }
    assert_eq!(
        (backend_ids, users, protos, keys, epochs),
        (1, 1, 1, 1, 1),
        "{lossy}"
    );
}

/// A little xorshift generator: read sizes from one input byte.
struct Steps(u32);

impl Steps {
    fn next(&mut self, max: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        1 + self.0 as usize % max
    }
}

/// How a decoder ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The body ended; what was left (in the buffer and not yet fed).
    Done(Vec<u8>),
    /// The input ran out first.
    Truncated,
    Error,
}

/// Feeds `input` to `decoder` in reads of the sizes `steps` gives (`None`: all at once) and
/// returns the body and how it ended.
fn drive(
    mut decoder: BodyDecoder,
    input: &[u8],
    mut steps: Option<Steps>,
    max_step: usize,
    copy_below: usize,
) -> (Vec<u8>, End) {
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut out = Vec::new();
    let length = decoder.remaining();
    // Every call makes progress: bounded by the bytes there are to consume.
    for _ in 0..=4 * input.len() + 8 {
        let decoded = decoder.decode(&mut buf, copy_below);
        if let Some(n) = length {
            assert!(
                out.len() as u64 <= n,
                "a length body yields more than its length"
            );
        }
        match decoded {
            Ok(Decoded::Data(d)) => {
                assert!(!d.is_empty(), "an empty piece of body");
                out.extend_from_slice(&d);
                if let (Some(n), Some(left)) = (length, decoder.remaining()) {
                    assert_eq!(left + out.len() as u64, n);
                }
            }
            Ok(Decoded::Done) => {
                assert!(decoder.is_done());
                let mut rest = buf.to_vec();
                rest.extend_from_slice(&input[fed..]);
                return (out, End::Done(rest));
            }
            Ok(Decoded::NeedMore) => {
                if fed == input.len() {
                    return (out, End::Truncated);
                }
                let end = match steps.as_mut() {
                    Some(s) => (fed + s.next(max_step)).min(input.len()),
                    None => input.len(),
                };
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            Err(_) => return (out, End::Error),
        }
    }
    panic!("the decoder stopped making progress");
}

/// `body_decoders`: `<mode><read-size seed><length: 2 bytes, length mode only><body>`. The
/// chunked, length and read-to-close decoders, fed in reads of arbitrary sizes, never panic
/// and always make progress; a length body yields exactly its prefix of the input and never
/// more than its length; a chunked body decodes to the same data, end and leftover whatever
/// the read sizes.
pub fn fuzz_body_decoders(data: &[u8]) {
    let [mode, seed, rest @ ..] = data else {
        return;
    };
    let copy_below = [0, 1, 4, 8192][usize::from(mode >> 6)];
    let max_step = usize::from(mode & 0x0f) + 1;
    let steps = || Some(Steps(u32::from(*seed) | 0x100));
    match (mode >> 4) & 0x03 {
        0 | 1 => {
            let (once, end_once) = drive(BodyDecoder::chunked(), rest, None, 1, 0);
            let (split, end_split) =
                drive(BodyDecoder::chunked(), rest, steps(), max_step, copy_below);
            assert_eq!(end_once, end_split, "the end depends on the read sizes");
            assert_eq!(once, split, "the body depends on the read sizes");
            if let End::Done(left) = &end_once {
                assert!(once.len() + left.len() < rest.len().max(1));
            }
        }
        2 => {
            let [a, b, body @ ..] = rest else {
                return;
            };
            let n = u64::from(u16::from_le_bytes([*a, *b]));
            let (out, end) = drive(BodyDecoder::length(n), body, steps(), max_step, copy_below);
            let expect = body.len().min(n as usize);
            assert_eq!(
                out,
                body[..expect],
                "a length body is its prefix of the input"
            );
            match end {
                End::Done(left) => {
                    assert_eq!(out.len() as u64, n);
                    assert_eq!(left, body[expect..]);
                }
                End::Truncated => assert!((body.len() as u64) < n),
                End::Error => panic!("a length body cannot be malformed"),
            }
        }
        _ => {
            let (out, end) = drive(BodyDecoder::Close, rest, steps(), max_step, copy_below);
            assert_eq!(out, rest);
            assert_eq!(end, End::Truncated);
        }
    }
}

/// `response_head`: `<method selector><what a backend sends>`. The backend response head
/// parser never panics; a head it accepts ends where the input's first blank line does (no
/// prefix of it is complete), its forwarded fields are well-formed lower-case header lines
/// without hop-by-hop fields or framing (but on a 101, and the length of a bodiless response),
/// a response whose framing is in doubt never keeps its connection, and its body decodes.
pub fn fuzz_response_head(data: &[u8]) {
    let Some((&selector, buf)) = data.split_first() else {
        return;
    };
    let method = match selector % 4 {
        0 => Method::GET,
        1 => Method::HEAD,
        2 => Method::POST,
        _ => Method::OPTIONS,
    };
    let (head, used) = match h1::parse_response_head(&mut buf.to_vec(), &method) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            assert!(buf.len() <= h1::MAX_RESPONSE_HEAD);
            return;
        }
        Err(_) => return,
    };
    assert!(used > 0 && used <= buf.len() && used <= h1::MAX_RESPONSE_HEAD);
    for cut in [used - 1, used / 2] {
        assert!(
            matches!(
                h1::parse_response_head(&mut buf[..cut].to_vec(), &method),
                Ok(None)
            ),
            "a prefix of a head is complete or wrong"
        );
    }

    let mut block = head.fields.clone();
    block.extend_from_slice(b"\r\n");
    let mut headers = vec![httparse::EMPTY_HEADER; 256];
    let fields = match httparse::parse_headers(&block, &mut headers) {
        Ok(httparse::Status::Complete((n, fields))) if n == block.len() => fields,
        other => panic!(
            "forwarded fields are not header lines ({other:?}): {:?}",
            String::from_utf8_lossy(&head.fields)
        ),
    };
    let switching = head.status == StatusCode::SWITCHING_PROTOCOLS;
    let mut lengths = 0;
    for h in fields {
        let name = h.name.as_bytes();
        assert!(!name.iter().any(u8::is_ascii_uppercase));
        if !switching {
            assert!(!is_hop_by_hop(name) && name != b"upgrade", "{:?}", h.name);
        }
        if name == b"content-length" {
            lengths += 1;
        }
        if name == b"date" {
            assert!(head.has_date);
        }
    }
    assert!(lengths <= usize::from(head.framing == ResponseFraming::Empty));
    if head.keep_alive {
        assert_ne!(head.framing, ResponseFraming::Close);
    }
    if method == Method::HEAD || head.status.is_informational() {
        assert_eq!(head.framing, ResponseFraming::Empty);
    }

    // The body, as the pool reads it.
    let mut body = match head.framing {
        ResponseFraming::Empty => BodyDecoder::Done,
        ResponseFraming::Length(n) => BodyDecoder::length(n),
        ResponseFraming::Chunked => BodyDecoder::chunked(),
        ResponseFraming::Close => BodyDecoder::Close,
    };
    let mut rest = BytesMut::from(&buf[used..]);
    for _ in 0..=rest.len() + 1 {
        match body.decode(&mut rest, 4) {
            Ok(Decoded::Data(d)) => assert!(!d.is_empty()),
            Ok(Decoded::Done | Decoded::NeedMore) | Err(_) => break,
        }
    }

    // What the HTTP/2 side makes of the fields.
    let mut block = Vec::new();
    crate::http2::conn::encode_response(head.status, &head.fields, head.has_date, None, &mut block);
    let mut list = crate::http2::hpack::HeaderList::new();
    crate::http2::hpack::Decoder::new(4096)
        .decode(&block, usize::MAX, &mut list)
        .expect("the HTTP/2 head encoded from a response decodes");
}

/// `h2_header_block`: the input is what an HTTP/2 client sends as header blocks on one
/// connection (HPACK, the dynamic table starting empty), split in two blocks at the offset its
/// first byte gives so that the table carries from one to the next. Each block that decodes
/// and makes a request ([`crate::http2::request::H2Request`]) must keep the promises an
/// HTTP/1.1 head keeps (lower-case names, no line break in a value, an origin-form target, no
/// CONNECT), and the head the backend gets must parse and carry no Hangar token and no forged
/// `x-hangar-*`.
pub fn fuzz_h2_header_block(data: &[u8]) {
    use crate::http2::hpack::{Decoder, HeaderList};
    use crate::http2::request::H2Request;
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(first).min(rest.len());
    let mut decoder = Decoder::new(4096);
    for block in [&rest[..cut], &rest[cut..]] {
        let mut list = HeaderList::new();
        if decoder.decode(block, MAX_HEAD, &mut list).is_err() {
            return;
        }
        if list.too_large() {
            continue;
        }
        if let Ok(req) = H2Request::new(list) {
            check_head(&req);
            check_upstream(&req);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn replay(target: &str, run: fn(&[u8])) {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut n = 0;
        for dir in ["corpus", "artifacts"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                if std::panic::catch_unwind(|| run(&data)).is_err() {
                    panic!("fuzz input {} fails", path.display());
                }
                n += 1;
            }
        }
        assert!(n > 0, "fuzz/corpus/{target} holds the target's corpus");
    }

    /// Found by fuzzing (`fuzz/artifacts/request_head/`): a UTF-8 target with a character
    /// across its byte 7 panicked, and an absolute-form target with an empty path reached the
    /// backend as `?q`, not `/?q`.
    #[test]
    fn request_targets_found_by_fuzzing() {
        use crate::head::RequestHead as _;
        let parse = |raw: &str| {
            crate::server::parse_request(
                &mut bytes::BytesMut::from(raw.as_bytes()),
                16 * 1024,
                &mut Vec::new(),
            )
        };
        let h = parse("GET /abcde\u{617} HTTP/1.1\r\nHost: b1.hangar.test\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.head.target(), "/abcde\u{617}");
        let e = parse("GET abcdef\u{617} HTTP/1.1\r\nHost: b1.hangar.test\r\n\r\n").err();
        assert_eq!(e.map(|e| e.status().as_u16()), Some(400));
        for (raw, target) in [
            ("GET http://b1.hangar.test?x=1 HTTP/1.1\r\n", "/?x=1"),
            ("GET HTTPS://b1.hangar.test:8080?x HTTP/1.1\r\n", "/?x"),
            ("GET http://b1.hangar.test HTTP/1.1\r\n", "/"),
        ] {
            let h = parse(&format!("{raw}Host: other\r\n\r\n"))
                .unwrap()
                .unwrap();
            assert_eq!(h.head.target(), target, "{raw}");
            assert!(
                h.head
                    .authority()
                    .is_some_and(|a| a.starts_with("b1.hangar.test"))
            );
        }
    }

    #[test]
    fn request_head_corpus_replays() {
        replay("request_head", super::fuzz_request_head);
    }

    #[test]
    fn body_decoders_corpus_replays() {
        replay("body_decoders", super::fuzz_body_decoders);
    }

    #[test]
    fn h2_header_block_corpus_replays() {
        replay("h2_header_block", super::fuzz_h2_header_block);
    }

    #[test]
    fn response_head_corpus_replays() {
        replay("response_head", super::fuzz_response_head);
    }
}
