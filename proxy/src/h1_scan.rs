//! A fast scanner for the HTTP/1.1 heads proxies see most: plain ASCII, `\r\n` line ends,
//! `name: value` fields. It accepts a strict subset of what `httparse` (with the default
//! configuration Hangar uses) accepts, and finds the same parts in it; anything else (a
//! non-ASCII byte, a bare `\n`, a tab or space before the colon, an empty line before the
//! request line, a status line without a reason phrase, more fields than the caller has room
//! for) is [`Scan::Other`], and the caller parses the head with `httparse`, which decides
//! whether it is valid and why not. The property tests hold the two together on random and
//! mutated heads.
//!
//! It is faster because it does less: it stops at the first byte it does not expect instead
//! of classifying it, scans field values and request targets 16 bytes at a time for the
//! bytes that end them (SSE2 on x86-64, eight bytes in a `u64` elsewhere), writes where
//! each part lies straight into the caller's list, and lower-cases each field name in place
//! in the same pass that checks it (the only change it makes to the buffer).

use crate::head::Span;

/// What a scan found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scan<T> {
    /// A complete head.
    Complete(T),
    /// So far so good: the head is not complete yet.
    Partial,
    /// Something the scanner leaves to `httparse` (which may accept or refuse it).
    Other,
}

/// The parts of a request head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RequestParts {
    /// Bytes of the head, `\r\n\r\n` included.
    pub(crate) used: usize,
    pub(crate) method: Span,
    /// A request target of bytes `!` to `~`.
    pub(crate) target: Span,
    /// The `x` of `HTTP/1.x` (0 or 1).
    pub(crate) minor: u8,
}

/// The parts of a response head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ResponseParts {
    /// Bytes of the head, `\r\n\r\n` included.
    pub(crate) used: usize,
    /// Three digits.
    pub(crate) code: u16,
    /// The `x` of `HTTP/1.x` (0 or 1).
    pub(crate) minor: u8,
}

/// `tchar` (RFC 9110 §5.6.2).
static TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        i += 1;
    }
    t
};

/// Scans a request head at the front of `buf`; the fields are appended to `fields` (cleared
/// first), at most `max_fields` of them (a head with more is [`Scan::Other`]). Field names are
/// lower-cased in place as they are checked (see [`lower_token`]).
pub(crate) fn request(
    buf: &mut [u8],
    fields: &mut Vec<(Span, Span)>,
    max_fields: usize,
) -> Scan<RequestParts> {
    fields.clear();
    // The method: a token, then one space.
    let mut i = 0;
    while i < buf.len() && TOKEN[buf[i] as usize] {
        i += 1;
    }
    if i == buf.len() {
        return Scan::Partial;
    }
    if i == 0 || buf[i] != b' ' {
        return Scan::Other;
    }
    let method = Span::new(0, i);
    // The target: visible ASCII, then one space.
    let start = i + 1;
    let end = match find_special(buf, start, 0x21) {
        None => return Scan::Partial,
        Some(e) if e > start && buf[e] == b' ' => e,
        Some(_) => return Scan::Other,
    };
    let target = Span::new(start, end - start);
    let (minor, next) = match version(buf, end + 1, b"\r\n") {
        Scan::Complete(v) => v,
        Scan::Partial => return Scan::Partial,
        Scan::Other => return Scan::Other,
    };
    match scan_fields(buf, next, max_fields, |name, value| {
        fields.push((name, value))
    }) {
        Scan::Complete(used) => Scan::Complete(RequestParts {
            used,
            method,
            target,
            minor,
        }),
        Scan::Partial => Scan::Partial,
        Scan::Other => Scan::Other,
    }
}

/// Scans a response head at the front of `buf`, calling `field` with each field (at most
/// `max_fields` of them: a head with more is [`Scan::Other`]). Field names are lower-cased in
/// place as they are checked (see [`lower_token`]).
pub(crate) fn response(
    buf: &mut [u8],
    max_fields: usize,
    field: impl FnMut(Span, Span),
) -> Scan<ResponseParts> {
    let (minor, i) = match version(buf, 0, b" ") {
        Scan::Complete(v) => v,
        Scan::Partial => return Scan::Partial,
        Scan::Other => return Scan::Other,
    };
    // Three digits and a space.
    let Some(status) = buf.get(i..i + 4) else {
        return if buf[i..].iter().all(u8::is_ascii_digit) {
            Scan::Partial
        } else {
            Scan::Other
        };
    };
    if !status[..3].iter().all(u8::is_ascii_digit) || status[3] != b' ' {
        return Scan::Other;
    }
    let code = status[..3]
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    // The reason phrase, as a field value is scanned.
    let next = match line_end(buf, i + 4) {
        Scan::Complete((_, next)) => next,
        Scan::Partial => return Scan::Partial,
        Scan::Other => return Scan::Other,
    };
    match scan_fields(buf, next, max_fields, field) {
        Scan::Complete(used) => Scan::Complete(ResponseParts { used, code, minor }),
        Scan::Partial => Scan::Partial,
        Scan::Other => Scan::Other,
    }
}

/// `HTTP/1.0` or `HTTP/1.1` at `at`, followed by `then`: the minor version and where the rest
/// starts.
fn version(buf: &[u8], at: usize, then: &[u8]) -> Scan<(u8, usize)> {
    const V10: &[u8] = b"HTTP/1.0";
    const V11: &[u8] = b"HTTP/1.1";
    let end = at + V10.len() + then.len();
    let Some(got) = buf.get(at..end) else {
        let rest = buf.get(at..).unwrap_or_default();
        let prefix = |v: &[u8]| {
            let n = rest.len().min(v.len());
            rest[..n] == v[..n] && (rest.len() <= v.len() || then.starts_with(&rest[v.len()..]))
        };
        return if prefix(V10) || prefix(V11) {
            Scan::Partial
        } else {
            Scan::Other
        };
    };
    let minor = match &got[..V10.len()] {
        v if v == V11 => 1,
        v if v == V10 => 0,
        _ => return Scan::Other,
    };
    if &got[V10.len()..] != then {
        return Scan::Other;
    }
    Scan::Complete((minor, end))
}

/// The header fields from `at` to the empty line that ends the head: calls `field` with each
/// and returns the head's length.
fn scan_fields(
    buf: &mut [u8],
    mut at: usize,
    max_fields: usize,
    mut field: impl FnMut(Span, Span),
) -> Scan<usize> {
    let mut count = 0;
    loop {
        match buf.get(at..at + 2) {
            Some(b"\r\n") => return Scan::Complete(at + 2),
            Some([b'\r', _]) => return Scan::Other,
            None if buf.get(at) == Some(&b'\r') || at == buf.len() => return Scan::Partial,
            _ => {}
        }
        // The name: a token, then the colon. A name of letters, digits and `-` shorter than
        // 16 bytes (nearly every one) is checked and lower-cased 16 bytes at a time. Otherwise
        // the colon is found first and what comes before it checked whole (without a branch
        // per byte): a line without one shows as bytes that are not a token's.
        #[cfg(target_arch = "x86_64")]
        let wide = lower_name_sse2(buf, at).filter(|&i| i > at);
        #[cfg(not(target_arch = "x86_64"))]
        let wide = None;
        let i = match wide {
            Some(i) => i,
            None => match find_byte(buf, at, b':') {
                Some(i) if i > at && lower_token(&mut buf[at..i]) => i,
                None if is_token(&buf[at..]) => return Scan::Partial,
                _ => return Scan::Other,
            },
        };
        if count == max_fields {
            return Scan::Other;
        }
        let name = Span::new(at, i - at);
        // Optional whitespace (usually one space), the value (trailing whitespace trimmed),
        // CRLF.
        let mut start = i + 1;
        if buf.get(start) == Some(&b' ') {
            start += 1;
        }
        while start < buf.len() && matches!(buf[start], b' ' | b'\t') {
            start += 1;
        }
        let (end, next) = match line_end(buf, start) {
            Scan::Complete(x) => x,
            Scan::Partial => return Scan::Partial,
            Scan::Other => return Scan::Other,
        };
        let value = buf[start..end].trim_ascii_end();
        field(name, Span::new(start, value.len()));
        count += 1;
        at = next;
    }
}

/// From `at`, over a field value's bytes (space to `~`, and tab) to the `\r\n` that ends the
/// line: where the value ends and where the next line starts.
fn line_end(buf: &[u8], mut at: usize) -> Scan<(usize, usize)> {
    loop {
        let Some(p) = find_special(buf, at, 0x20) else {
            return Scan::Partial;
        };
        match buf[p] {
            b'\t' => at = p + 1,
            b'\r' => {
                return match buf.get(p + 1) {
                    Some(b'\n') => Scan::Complete((p, p + 2)),
                    Some(_) => Scan::Other,
                    None => Scan::Partial,
                };
            }
            _ => return Scan::Other,
        }
    }
}

/// Whether every byte of `name` is a `tchar`.
#[inline]
fn is_token(name: &[u8]) -> bool {
    name.iter().fold(true, |ok, &b| ok & TOKEN[b as usize])
}

/// Each byte lower-cased, and whether it is a `tchar` (bit 8).
static LOWER_TOKEN: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = (i as u8).to_ascii_lowercase() as u16 | ((TOKEN[i] as u16) << 8);
        i += 1;
    }
    t
};

/// [`is_token`], lower-casing `name` in place in the same pass (the caller would do it next).
/// Only ASCII letters change, whatever the answer: a name refused here is left to `httparse`,
/// for which case makes no difference.
#[inline]
fn lower_token(name: &mut [u8]) -> bool {
    let mut ok = 1;
    for b in name {
        let t = LOWER_TOKEN[*b as usize];
        ok &= t >> 8;
        *b = t as u8;
    }
    ok != 0
}

/// The colon that ends a field name within the 16 bytes from `at`, once the name before it
/// (letters, digits and `-` only) is lower-cased in place; `None` if fewer than 16 bytes are
/// left, no colon is among them, or the name holds any other byte (left to the bytewise path,
/// which decides whether it is a token).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lower_name_sse2(buf: &mut [u8], at: usize) -> Option<usize> {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi8, _mm_and_si128, _mm_cmpeq_epi8, _mm_cmpgt_epi8, _mm_cmplt_epi8,
        _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8, _mm_setr_epi8,
        _mm_storeu_si128,
    };
    if at.checked_add(16)? > buf.len() {
        return None;
    }
    // SAFETY: SSE2 is part of x86-64; the load and the store touch the 16 bytes from `at`,
    // which lie within `buf` (checked above), and the store writes back every byte it loaded
    // unchanged except the ASCII capitals before the colon, which become small letters.
    #[allow(unsafe_code)]
    unsafe {
        let p = buf.as_mut_ptr().add(at).cast::<__m128i>();
        let v = _mm_loadu_si128(p);
        let colons = _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b':' as i8))) as u32;
        if colons == 0 {
            return None;
        }
        let len = colons.trailing_zeros();
        // Signed comparisons: bytes from 0x80 are below every bound, so never in a range.
        let within = |lo: u8, hi: u8| {
            _mm_and_si128(
                _mm_cmpgt_epi8(v, _mm_set1_epi8(lo as i8 - 1)),
                _mm_cmplt_epi8(v, _mm_set1_epi8(hi as i8 + 1)),
            )
        };
        let upper = within(b'A', b'Z');
        let ok = _mm_or_si128(
            _mm_or_si128(upper, within(b'a', b'z')),
            _mm_or_si128(
                within(b'0', b'9'),
                _mm_cmpeq_epi8(v, _mm_set1_epi8(b'-' as i8)),
            ),
        );
        let name = (1u32 << len) - 1;
        if _mm_movemask_epi8(ok) as u32 & name != name {
            return None;
        }
        // Only the capitals before the colon gain 0x20.
        let index = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let in_name = _mm_cmplt_epi8(index, _mm_set1_epi8(len as i8));
        let add = _mm_and_si128(_mm_and_si128(upper, in_name), _mm_set1_epi8(0x20));
        _mm_storeu_si128(p, _mm_add_epi8(v, add));
        Some(at + len as usize)
    }
}

/// Whether `buf` holds `byte`: eight bytes at a time, for the short slices a field name is,
/// where [`find_byte`]'s 16-byte steps do not start and `contains`' general search costs more
/// to set up than the search itself.
#[inline]
pub(crate) fn contains_byte(buf: &[u8], byte: u8) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let bytes = u64::from_ne_bytes([byte; 8]);
    let mut words = buf.chunks_exact(8);
    for w in &mut words {
        // A zero byte where `byte` was; the test for one is exact (no false hits).
        let x = u64::from_ne_bytes(w.try_into().expect("eight bytes")) ^ bytes;
        if x.wrapping_sub(ONES) & !x & HIGHS != 0 {
            return true;
        }
    }
    // A loop over the last few bytes: `contains` is the general search again.
    #[allow(clippy::manual_contains)]
    words.remainder().iter().any(|&b| b == byte)
}

/// The first `byte` at or after `at`.
#[inline]
pub(crate) fn find_byte(buf: &[u8], at: usize, byte: u8) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    let (i, found) = find_sse2(buf, at, Stop::At(byte));
    #[cfg(not(target_arch = "x86_64"))]
    let (i, found) = (at, None);
    found.or_else(|| buf[i..].iter().position(|&b| b == byte).map(|p| i + p))
}

/// The first byte at or after `at` that is below `low`, not ASCII, or DEL (`low` is `0x20`
/// for field values, `0x21` for request targets), or `None` if there is none.
#[inline]
fn find_special(buf: &[u8], at: usize, low: u8) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    let (i, found) = find_sse2(buf, at, Stop::Special(low));
    #[cfg(not(target_arch = "x86_64"))]
    let (i, found) = find_special_swar(buf, at, low);
    found.or_else(|| {
        buf[i..]
            .iter()
            .position(|&b| b < low || b >= 0x7f)
            .map(|p| i + p)
    })
}

/// What [`find_sse2`] looks for.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Stop {
    /// This byte.
    At(u8),
    /// A byte below this one, not ASCII, or DEL.
    Special(u8),
}

/// [`find_byte`] and [`find_special`] 16 bytes at a time, while 16 are left: what it found, or
/// where it stopped.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn find_sse2(buf: &[u8], mut i: usize, stop: Stop) -> (usize, Option<usize>) {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_cmplt_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    // SAFETY: SSE2 is part of x86-64; each load reads 16 bytes that lie within `buf`
    // (`i + 16 <= buf.len()`).
    #[allow(unsafe_code)]
    unsafe {
        let (Stop::At(b) | Stop::Special(b)) = stop;
        let (b, del) = (_mm_set1_epi8(b as i8), _mm_set1_epi8(0x7f));
        while i + 16 <= buf.len() {
            let v = _mm_loadu_si128(buf.as_ptr().add(i).cast::<__m128i>());
            let hit = match stop {
                Stop::At(_) => _mm_cmpeq_epi8(v, b),
                // Signed: bytes from 0x80 compare below `low` too.
                Stop::Special(_) => _mm_or_si128(_mm_cmplt_epi8(v, b), _mm_cmpeq_epi8(v, del)),
            };
            let mask = _mm_movemask_epi8(hit) as u32;
            if mask != 0 {
                return (i, Some(i + mask.trailing_zeros() as usize));
            }
            i += 16;
        }
    }
    (i, None)
}

/// [`find_special`] eight bytes at a time in a `u64`, while eight are left.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
#[inline]
fn find_special_swar(buf: &[u8], mut i: usize, low: u8) -> (usize, Option<usize>) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(word) = buf.get(i..i + 8) {
        let x = u64::from_le_bytes(word.try_into().unwrap_or_default());
        // The lowest flagged byte of each term is exact (borrows only carry upward, from a
        // flagged byte).
        let below = x.wrapping_sub(ONES * u64::from(low)) & !x;
        let y = x ^ (ONES * 0x7f);
        let del = y.wrapping_sub(ONES) & !y;
        let mask = (below | del | x) & HIGH;
        if mask != 0 {
            return (i, Some(i + mask.trailing_zeros() as usize / 8));
        }
        i += 8;
    }
    (i, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Method, target, minor version and fields, as text.
    type Read = (String, String, u8, Vec<(String, String)>);

    fn req(s: &[u8]) -> Scan<Read> {
        let mut fields = Vec::new();
        let mut buf = s.to_vec();
        let scan = request(&mut buf, &mut fields, 100);
        // Only the case of ASCII letters ever changes.
        assert!(buf.eq_ignore_ascii_case(s));
        let s = &buf[..];
        match scan {
            Scan::Complete(p) => {
                assert_eq!(p.used, s.len());
                let text = |sp: Span| String::from_utf8(s[sp.range()].to_vec()).unwrap();
                Scan::Complete((
                    text(p.method),
                    text(p.target),
                    p.minor,
                    fields.iter().map(|&(n, v)| (text(n), text(v))).collect(),
                ))
            }
            Scan::Partial => Scan::Partial,
            Scan::Other => Scan::Other,
        }
    }

    #[test]
    fn a_plain_request_is_read_in_full() {
        let Scan::Complete((method, target, minor, fields)) = req(
            b"GET /count?A=1 HTTP/1.1\r\nHost: X.example\r\nAccept:*/*\r\nx-e:\r\nX-T: A\tb \t\r\n\r\n",
        ) else {
            panic!("not complete")
        };
        assert_eq!(
            (method.as_str(), target.as_str(), minor),
            ("GET", "/count?A=1", 1)
        );
        let fields: Vec<_> = fields
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                // Names lower-cased in place; nothing else changes.
                ("host", "X.example"),
                ("accept", "*/*"),
                ("x-e", ""),
                ("x-t", "A\tb")
            ]
        );
    }

    #[test]
    fn every_prefix_of_a_request_is_partial() {
        let head = b"POST /upload HTTP/1.0\r\nhost: h\r\ncontent-length: 3\r\n\r\n";
        for n in 0..head.len() {
            assert_eq!(req(&head[..n]), Scan::Partial, "{n} bytes");
        }
        assert!(matches!(req(head), Scan::Complete((_, _, 0, _))));
    }

    #[test]
    fn what_it_does_not_expect_is_left_to_httparse() {
        for head in [
            &b"\r\nGET / HTTP/1.1\r\n\r\n"[..],
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost : x\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: \xc3\xa9\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: a\x7fb\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: a\n\r\n",
            b"GET / HTTP/1.1\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\n\rx",
            b"GET / HTTP/1.1\r\nhost\r\nx: y\r\n\r\n",
            b"GET / HTTP/1.1\r\n: y\r\n\r\n",
            b"GET / HTTP/1.1\r\nho(st: y\r\n\r\n",
        ] {
            assert_eq!(req(head), Scan::Other, "{}", head.escape_ascii());
        }
    }

    #[test]
    fn too_many_fields_are_left_to_httparse() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..3 {
            head.extend_from_slice(format!("f{i}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let mut fields = Vec::new();
        assert!(matches!(
            request(&mut head.clone(), &mut fields, 3),
            Scan::Complete(_)
        ));
        assert_eq!(request(&mut head, &mut fields, 2), Scan::Other);
    }

    #[test]
    fn a_response_head_is_read_with_its_status() {
        let head = &mut b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\nbody".to_vec();
        let mut fields = Vec::new();
        let Scan::Complete(parts) = response(head, 10, |n, v| fields.push((n, v))) else {
            panic!("not complete")
        };
        assert_eq!(
            (parts.used, parts.code, parts.minor),
            (head.len() - 4, 404, 1)
        );
        assert_eq!(&head[fields[0].0.range()], b"content-length");
        assert_eq!(&head[fields[0].1.range()], b"0");
        for n in 0..head.len() - 4 {
            assert_eq!(
                response(&mut head[..n], 10, |_, _| {}),
                Scan::Partial,
                "{n} bytes"
            );
        }
        for odd in [
            &b"HTTP/1.1 200\r\n\r\n"[..],
            b"HTTP/1.1 20x OK\r\n\r\n",
            b"HTTP/1.2 200 OK\r\n\r\n",
        ] {
            assert_eq!(response(&mut odd.to_vec(), 10, |_, _| {}), Scan::Other);
        }
    }

    /// What [`find_special`] finds with the eight-byte scan.
    fn swar(buf: &[u8], low: u8) -> Option<usize> {
        let (i, found) = find_special_swar(buf, 0, low);
        found.or_else(|| {
            buf[i..]
                .iter()
                .position(|&b| b < low || b >= 0x7f)
                .map(|p| i + p)
        })
    }

    /// What the bytewise path makes of the name before the first colon from `at`: the colon
    /// and the buffer after lower-casing, or `None` if it is not a token.
    fn bytewise(buf: &[u8], at: usize) -> Option<(usize, Vec<u8>)> {
        let mut buf = buf.to_vec();
        let i = find_byte(&buf, at, b':')?;
        lower_token(&mut buf[at..i]).then_some((i, buf))
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_wide_name_check_agrees_with_the_bytewise_one_on_every_byte() {
        // Every byte value at every place of names of every length the wide path takes, with
        // more name-like bytes (capitals included) and a colon after it: whenever the wide path
        // answers, it found the same colon, changed the buffer as the bytewise path does, and
        // only for a name the bytewise path takes too.
        let mut taken = 0;
        for len in 1..16 {
            for place in 0..len {
                for byte in 0..=255u8 {
                    let mut buf = b"..Content-X-Y1z-AbCdEfGhIjK: V: Al-UE\r\n".to_vec();
                    let at = 2;
                    buf[at + len] = b':';
                    buf[at + place] = byte;
                    let want = bytewise(&buf, at);
                    let mut got = buf.clone();
                    let Some(colon) = lower_name_sse2(&mut got, at) else {
                        assert_eq!(got, buf, "declined, so unchanged: {len} {place} {byte}");
                        continue;
                    };
                    taken += 1;
                    assert_eq!(Some((colon, got)), want, "{len} {place} {byte:#x}");
                    // Only the name's capitals changed.
                    assert!(buf[colon..] == bytewise(&buf, at).unwrap().1[colon..]);
                }
            }
        }
        // Letters, digits and `-` at every place of every length were taken (a colon at the
        // place itself ends the name there).
        assert!(taken >= 15 * 8 * 63 / 2, "only {taken} taken");
        // Fewer than 16 bytes left, no colon among them, or an empty name: declined.
        assert_eq!(lower_name_sse2(&mut b"Host: x\r\n\r\n".to_vec(), 0), None);
        assert_eq!(
            lower_name_sse2(&mut b"Sixteen-Bytes-Nm: x\r\n".to_vec(), 0),
            None
        );
        assert_eq!(
            lower_name_sse2(&mut b": empty name here\r\n".to_vec(), 0),
            Some(0)
        );
    }

    #[test]
    fn an_underscore_is_found_wherever_it_is() {
        for len in 0..40 {
            assert!(!contains_byte(&vec![b'a'; len], b'_'), "{len}");
            for at in 0..len {
                for (byte, want) in [
                    (b'_', true),
                    (b'^', false),
                    (b'`', false),
                    (0xdf, false),
                    (0x5e, false),
                ] {
                    let mut name = vec![b'x'; len];
                    name[at] = byte;
                    assert_eq!(contains_byte(&name, b'_'), want, "{len} {at} {byte:#x}");
                    // Every byte value elsewhere leaves the answer to the underscore alone.
                    name[at] = b'_';
                    for other in 0..=255u8 {
                        name[(at + 1) % len.max(1)] = if (at + 1) % len.max(1) == at {
                            b'_'
                        } else {
                            other
                        };
                        assert!(contains_byte(&name, b'_'));
                    }
                }
            }
        }
        for other in (0..=255u8).filter(|&b| b != b'_') {
            assert!(!contains_byte(&[other; 17], b'_'), "{other:#x}");
        }
    }

    #[test]
    fn the_wide_scan_finds_the_first_special_byte_anywhere() {
        for len in 0..40 {
            for at in 0..len {
                for special in [b'\r', b'\t', 0x00, 0x7f, 0x80, 0xff, b' '] {
                    let mut buf = vec![b'a'; len];
                    buf[at] = special;
                    let low = 0x21;
                    assert_eq!(find_special(&buf, 0, low), Some(at), "{len} {at} {special}");
                    assert_eq!(swar(&buf, low), Some(at), "{len} {at} {special}");
                    if at > 0 {
                        assert_eq!(find_special(&buf, at, low), Some(at));
                    }
                    // A byte before where the search starts is never found.
                    assert_eq!(find_special(&buf, at + 1, low), None, "past {len} {at}");
                    let mut colon = vec![b'a'; len];
                    colon[at] = b':';
                    assert_eq!(find_byte(&colon, 0, b':'), Some(at), "{len} {at}");
                    assert_eq!(find_byte(&colon, at + 1, b':'), None, "past {len} {at}");
                    if special == b' ' {
                        assert_eq!(find_special(&buf, 0, 0x20), None);
                        assert_eq!(swar(&buf, 0x20), None);
                    }
                }
            }
            assert_eq!(find_special(&vec![b'~'; len], 0, 0x20), None);
        }
    }
}
