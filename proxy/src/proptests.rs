//! Property tests of the HTTP/1.1 wire format: heads built from random parts parse back to
//! those parts, bodies encoded from random data decode back to it whatever the read sizes, and
//! the fuzz targets' properties hold on well-formed input too.

use bytes::BytesMut;
use http::{Method, StatusCode, Version};
use proptest::prelude::*;

use crate::h1::{self, BodyDecoder, Decoded, ResponseFraming};
use crate::head::{Known, RequestHead as _, Span};
use crate::server::{BodyLength, parse_request};

/// Field names the request parser gives a meaning to; the random fields avoid them.
const SPECIAL: [&str; 7] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "expect",
    "upgrade",
    "keep-alive",
];

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::HEAD),
        Just(Method::PATCH),
        Just(Method::OPTIONS),
        "[A-Z]{1,12}"
            .prop_filter("not CONNECT", |m| m != "CONNECT")
            .prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

/// An origin-form target: a path and maybe a query.
fn target() -> impl Strategy<Value = String> {
    (
        "(/[A-Za-z0-9._~!$&'()*+,;=:@%-]{0,12}){1,4}",
        proptest::option::of("[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,24}"),
    )
        .prop_map(|(path, query)| match query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        })
}

/// A field: a token name in any case (none the parser reads) and a value with no leading or
/// trailing whitespace (which the parser trims).
fn field() -> impl Strategy<Value = (String, String)> {
    (
        "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}",
        "([!-~]([ \t!-~]{0,30}[!-~])?)?",
    )
        .prop_filter("a name the parser reads", |(n, _)| {
            !SPECIAL.contains(&n.to_ascii_lowercase().as_str())
        })
}

proptest! {
    #[test]
    fn well_formed_request_heads_parse_back_to_their_parts(
        method in method(),
        target in target(),
        fields in proptest::collection::vec(field(), 0..12),
        host_at in any::<prop::sample::Index>(),
        host in "[a-z0-9]{1,10}\\.hangar\\.test(:[0-9]{1,5})?",
        rest in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut fields = fields;
        fields.insert(host_at.index(fields.len() + 1), ("Host".into(), host));
        let mut raw = format!("{method} {target} HTTP/1.1\r\n");
        for (n, v) in &fields {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        let head_len = raw.len();
        let mut buf = BytesMut::from(raw.as_bytes());
        buf.extend_from_slice(&rest);

        for cut in [0, head_len / 2, head_len - 1] {
            let mut partial = BytesMut::from(&raw.as_bytes()[..cut]);
            prop_assert!(parse_request(&mut partial, 64 * 1024, &mut Vec::new()).unwrap().is_none());
        }
        let parsed = parse_request(&mut buf, 64 * 1024, &mut Vec::new())
            .unwrap()
            .expect("a complete head");
        prop_assert_eq!(&buf[..], &rest[..], "what follows the head stays in the buffer");
        prop_assert_eq!(parsed.head.method(), &method);
        prop_assert_eq!(parsed.head.target(), target.as_str());
        prop_assert_eq!(parsed.version, Version::HTTP_11);
        prop_assert_eq!(parsed.body, BodyLength::Length(0));
        prop_assert!(parsed.keep_alive && !parsed.expect_continue);
        let got: Vec<(Vec<u8>, Vec<u8>)> =
            parsed.head.fields().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        let want: Vec<(Vec<u8>, Vec<u8>)> = fields
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase().into_bytes(), v.clone().into_bytes()))
            .collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn chunked_bodies_decode_back_whatever_the_read_sizes(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
        extension in proptest::option::of("[a-z]{1,8}=[a-z0-9]{0,8}"),
        trailers in proptest::collection::vec(("[a-z-]{1,10}", "[ -~]{0,20}"), 0..3),
        reads in proptest::collection::vec(1usize..40, 1..64),
        copy_below in prop_oneof![Just(0usize), Just(4), Just(8192)],
        after in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let mut wire = Vec::new();
        for c in &chunks {
            match (&extension, c.is_empty()) {
                (Some(ext), false) => {
                    wire.extend_from_slice(format!("{:X};{ext}\r\n", c.len()).as_bytes());
                    wire.extend_from_slice(c);
                    wire.extend_from_slice(b"\r\n");
                }
                _ => h1::encode_chunk(&mut wire, c),
            }
        }
        wire.extend_from_slice(b"0\r\n");
        for (n, v) in &trailers {
            wire.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(&after);

        let mut decoder = BodyDecoder::chunked();
        let mut buf = BytesMut::new();
        let (mut fed, mut step) = (0, 0);
        let mut body = Vec::new();
        loop {
            match decoder.decode(&mut buf, copy_below).unwrap() {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::Done => break,
                Decoded::NeedMore => {
                    prop_assert!(fed < wire.len(), "the decoder wants more than the body");
                    let end = (fed + reads[step % reads.len()]).min(wire.len());
                    step += 1;
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
        prop_assert_eq!(body, chunks.concat());
        let mut left = buf.to_vec();
        left.extend_from_slice(&wire[fed..]);
        prop_assert_eq!(left, after, "what follows the body is left for the next message");
    }

    #[test]
    fn a_length_body_yields_exactly_its_length(
        n in 0u64..200,
        data in proptest::collection::vec(any::<u8>(), 0..300),
        reads in proptest::collection::vec(1usize..50, 1..16),
    ) {
        let mut decoder = BodyDecoder::length(n);
        let mut buf = BytesMut::new();
        let (mut fed, mut step) = (0, 0);
        let mut body = Vec::new();
        loop {
            match decoder.decode(&mut buf, 4).unwrap() {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::Done => break,
                Decoded::NeedMore if fed == data.len() => break,
                Decoded::NeedMore => {
                    let end = (fed + reads[step % reads.len()]).min(data.len());
                    step += 1;
                    buf.extend_from_slice(&data[fed..end]);
                    fed = end;
                }
            }
            prop_assert!(body.len() as u64 <= n);
        }
        let expect = data.len().min(n as usize);
        prop_assert_eq!(&body[..], &data[..expect]);
        prop_assert_eq!(decoder.is_done(), body.len() as u64 == n);
    }

    #[test]
    fn well_formed_response_heads_parse_back(
        status in 200u16..600,
        fields in proptest::collection::vec(field(), 0..12),
        length in proptest::option::of(0u64..1_000_000),
    ) {
        let mut raw = format!("HTTP/1.1 {status} Whatever\r\n");
        for (n, v) in &fields {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        if let Some(n) = length {
            raw.push_str(&format!("Content-Length: {n}\r\n"));
        }
        raw.push_str("\r\n");
        let (head, used) = h1::parse_response_head(&mut raw.as_bytes().to_vec(), &Method::GET)
            .unwrap()
            .expect("a complete head");
        prop_assert_eq!(used, raw.len());
        prop_assert_eq!(head.status, StatusCode::from_u16(status).unwrap());
        let forwarded: String = fields
            .iter()
            .filter(|(n, _)| !crate::forward::is_hop_by_hop(n.to_ascii_lowercase().as_bytes()))
            .map(|(n, v)| format!("{}: {v}\r\n", n.to_ascii_lowercase()))
            .collect();
        let bodiless = status == 204 || status == 304;
        let mut want = forwarded;
        if let (true, Some(n)) = (bodiless, length) {
            want.push_str(&format!("content-length: {n}\r\n"));
        }
        prop_assert_eq!(String::from_utf8(head.fields).unwrap(), want);
        let framing = match (bodiless, length) {
            (true, _) => ResponseFraming::Empty,
            (false, Some(n)) => ResponseFraming::Length(n),
            (false, None) => ResponseFraming::Close,
        };
        prop_assert_eq!(head.framing, framing);
        prop_assert_eq!(head.keep_alive, framing != ResponseFraming::Close);
    }

    /// A parsed head's index of the fields the request path reads finds what a search of its
    /// fields finds, for each such name: absent, once or repeated, anywhere, in any case.
    #[test]
    fn known_fields_are_found_as_a_search_finds_them(
        picks in proptest::collection::vec((0usize..10, "[a-z0-9]{1,8}", any::<bool>()), 0..14),
        host_at in any::<prop::sample::Index>(),
        length_at in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        const NAMES: [&str; 10] = [
            "authorization", "cookie", "connection", "upgrade", "x-forwarded-for",
            "x-hangar-backend", "accept", "x-other", "expect", "x-hangar-backend-x",
        ];
        let mut fields: Vec<(String, String)> = picks
            .iter()
            .map(|(n, v, upper)| {
                let name = if *upper { NAMES[*n].to_ascii_uppercase() } else { NAMES[*n].to_string() };
                (name, v.clone())
            })
            .collect();
        fields.insert(host_at.index(fields.len() + 1), ("Host".into(), "h.test".into()));
        if let Some(at) = length_at {
            fields.insert(at.index(fields.len() + 1), ("Content-Length".into(), "0".into()));
        }
        let mut raw = String::from("GET / HTTP/1.1\r\n");
        for (n, v) in &fields {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        let mut buf = BytesMut::from(raw.as_bytes());
        let parsed = parse_request(&mut buf, 64 * 1024, &mut Vec::new())
            .unwrap()
            .expect("a complete head");
        for known in Known::ALL {
            let name = known.name();
            prop_assert_eq!(parsed.head.known(known), parsed.head.get(name), "{}", name);
            prop_assert_eq!(
                parsed.head.known_all(known).collect::<Vec<_>>(),
                parsed.head.get_all(name).collect::<Vec<_>>(),
                "{}", name
            );
            let sent: Vec<&[u8]> = fields
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes())
                .collect();
            prop_assert_eq!(parsed.head.known_all(known).collect::<Vec<_>>(), sent, "{}", name);
        }
    }

    /// The fuzz targets' properties on inputs that get far: well-formed requests with a body.
    #[test]
    fn the_request_head_target_holds_on_well_formed_requests(
        method in method(),
        target in target(),
        fields in proptest::collection::vec(field(), 0..6),
        body in proptest::collection::vec(any::<u8>(), 0..32),
        chunked in any::<bool>(),
    ) {
        let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: b1.hangar.test\r\n").into_bytes();
        for (n, v) in &fields {
            raw.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        if chunked {
            raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            h1::encode_chunk(&mut raw, &body);
            raw.extend_from_slice(h1::LAST_CHUNK);
        } else {
            raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            raw.extend_from_slice(&body);
        }
        let twice = [&raw[..], &raw[..]].concat();
        crate::fuzzing::fuzz_request_head(&twice);
    }
}

/// Pieces that random heads are made of: the parts of well-formed heads, and the bytes the
/// fast scan must not take for them.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => Just(b"\r\n".to_vec()),
        3 => "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,8}".prop_map(String::into_bytes),
        2 => Just(b": ".to_vec()),
        2 => Just(b":".to_vec()),
        2 => Just(b" ".to_vec()),
        1 => Just(b"\t".to_vec()),
        1 => Just(b"\n".to_vec()),
        1 => Just(b"\r".to_vec()),
        1 => Just(b"HTTP/1.1".to_vec()),
        1 => Just(b"HTTP/1.0".to_vec()),
        1 => Just(b"HTTP/1.".to_vec()),
        1 => Just(b"/".to_vec()),
        1 => "[0-9]{1,4}".prop_map(String::into_bytes),
        1 => "[ -~]{1,20}".prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 1..4),
    ]
}

/// A request head that is mostly well formed: a plain request line, then pieces.
fn request_like() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(b"GET / HTTP/1.1\r\n".to_vec()), Just(Vec::new())],
        proptest::collection::vec(piece(), 0..40),
        proptest::collection::vec(any::<(prop::sample::Index, u8)>(), 0..3),
    )
        .prop_map(|(start, pieces, flips)| {
            let mut b = start;
            for p in pieces {
                b.extend_from_slice(&p);
            }
            for (at, byte) in flips {
                if !b.is_empty() {
                    let i = at.index(b.len());
                    b[i] = byte;
                }
            }
            b
        })
}

/// The fields the fast scan found, as (name, value).
fn scanned_fields<'a>(buf: &'a [u8], fields: &[(Span, Span)]) -> Vec<(&'a [u8], &'a [u8])> {
    fields
        .iter()
        .map(|(n, v)| (&buf[n.range()], &buf[v.range()]))
        .collect()
}

/// The fields httparse found, as (lower-case name, value).
fn parsed_fields<'a>(headers: &[httparse::Header<'a>]) -> Vec<(Vec<u8>, &'a [u8])> {
    headers
        .iter()
        .map(|h| (h.name.as_bytes().to_ascii_lowercase(), h.value))
        .collect()
}

/// What the fast scan left in `scanned` (a copy of `original` it scanned): only the case of
/// ASCII letters may change, and on a complete head exactly the field names are lower case.
fn check_lowered(
    original: &[u8],
    scanned: &[u8],
    complete: bool,
    fields: &[(Span, Span)],
) -> Result<(), TestCaseError> {
    prop_assert!(scanned.eq_ignore_ascii_case(original));
    if complete {
        let mut want = original.to_vec();
        for (name, _) in fields {
            want[name.range()].make_ascii_lowercase();
        }
        prop_assert_eq!(scanned, &want[..]);
    }
    Ok(())
}

/// [`scanned_fields`] with owned names, to compare with [`parsed_fields`].
fn scanned_owned<'a>(buf: &'a [u8], fields: &[(Span, Span)]) -> Vec<(Vec<u8>, &'a [u8])> {
    scanned_fields(buf, fields)
        .into_iter()
        .map(|(n, v)| (n.to_vec(), v))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// What the fast scan reads, httparse reads the same way; what it calls incomplete,
    /// httparse calls incomplete.
    #[test]
    fn the_fast_request_scan_agrees_with_httparse(buf in request_like(), max in 0usize..6) {
        let mut fields = Vec::new();
        let mut scanned = buf.clone();
        let fast = crate::h1_scan::request(&mut scanned, &mut fields, max);
        check_lowered(&buf, &scanned, matches!(fast, crate::h1_scan::Scan::Complete(_)), &fields)?;
        let mut headers = vec![httparse::EMPTY_HEADER; max];
        let mut req = httparse::Request::new(&mut headers);
        let slow = req.parse(&buf);
        match fast {
            crate::h1_scan::Scan::Complete(p) => {
                prop_assert_eq!(slow, Ok(httparse::Status::Complete(p.used)));
                prop_assert_eq!(req.method.unwrap().as_bytes(), &scanned[p.method.range()]);
                prop_assert_eq!(req.path.unwrap().as_bytes(), &scanned[p.target.range()]);
                prop_assert_eq!(req.version, Some(p.minor));
                prop_assert_eq!(scanned_owned(&scanned, &fields), parsed_fields(req.headers));
            }
            crate::h1_scan::Scan::Partial => prop_assert_eq!(slow, Ok(httparse::Status::Partial)),
            crate::h1_scan::Scan::Other => {}
        }
    }

    #[test]
    fn the_fast_response_scan_agrees_with_httparse(
        line in prop_oneof![
            Just(b"HTTP/1.1 200 OK\r\n".to_vec()),
            Just(b"HTTP/1.0 404 Not Found\r\n".to_vec()),
            "HTTP/1\\.[01] [0-9]{3} [ -~]{0,12}\r\n".prop_map(String::into_bytes),
            Just(Vec::new()),
        ],
        rest in request_like(),
        max in 0usize..6,
    ) {
        // The request-like pieces after a status line, without their request line.
        let rest = rest.strip_prefix(b"GET / HTTP/1.1\r\n").unwrap_or(&rest);
        let buf = [&line[..], rest].concat();
        let mut fields = Vec::new();
        let mut scanned = buf.clone();
        let fast = crate::h1_scan::response(&mut scanned, max, |n, v| fields.push((n, v)));
        check_lowered(&buf, &scanned, matches!(fast, crate::h1_scan::Scan::Complete(_)), &fields)?;
        let mut headers = vec![httparse::EMPTY_HEADER; max];
        let mut resp = httparse::Response::new(&mut headers);
        let slow = resp.parse(&buf);
        match fast {
            crate::h1_scan::Scan::Complete(p) => {
                prop_assert_eq!(slow, Ok(httparse::Status::Complete(p.used)));
                prop_assert_eq!(resp.code, Some(p.code));
                prop_assert_eq!(resp.version, Some(p.minor));
                prop_assert_eq!(scanned_owned(&scanned, &fields), parsed_fields(resp.headers));
            }
            crate::h1_scan::Scan::Partial => prop_assert_eq!(slow, Ok(httparse::Status::Partial)),
            crate::h1_scan::Scan::Other => {}
        }
    }
}
