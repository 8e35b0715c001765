//! HTTP/1.1 wire format (RFC 9112) for the upstream side: request heads, response heads, how a
//! response body is delimited, and chunked coding (also used for client bodies). Pure
//! functions over byte buffers; the socket work is in [`crate::pool`] and [`crate::server`].

use std::io::Write as _;
use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, StatusCode};

use crate::h1_scan::{self, Scan};
use crate::head::Span;

/// The most header lines a backend's response may carry.
const MAX_RESPONSE_HEADERS: usize = 128;
/// The largest response head a backend may send, in bytes.
pub(crate) const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// The longest chunk-size or trailer line accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// The most trailer bytes accepted (and dropped) at the end of a chunked body.
const MAX_TRAILERS: usize = 64 * 1024;

/// A backend broke HTTP/1.1.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    #[error("response head larger than {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLarge,
    #[error("conflicting or invalid content-length")]
    ContentLength,
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
}

/// How the request body goes to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestFraming {
    /// No body (and no length header is added).
    None,
    /// Exactly this many bytes, announced by `content-length`.
    Length(u64),
    /// Unknown length: `transfer-encoding: chunked`.
    Chunked,
}

/// Appends a request line for `target` (origin form).
pub(crate) fn write_request_line(out: &mut Vec<u8>, method: &Method, target: &str) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// Appends one header line. `value` must be a valid field value (see [`is_header_value`]).
pub(crate) fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends a field whose value is the decimal number `n`.
pub(crate) fn write_number_header(out: &mut Vec<u8>, name: &[u8], n: u64) {
    write_header(out, name, itoa::Buffer::new().format(n).as_bytes());
}

/// Whether `value` may be sent as a field value: no control characters but tab.
pub(crate) fn is_header_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&c| c == b'\t' || (c >= 0x20 && c != 0x7f))
}

/// Ends a request head: the body's framing header, then the blank line.
pub(crate) fn end_request_head(out: &mut Vec<u8>, framing: RequestFraming) {
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => write_number_header(out, b"content-length", n),
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one chunk of a chunked body.
pub(crate) fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        // A zero-length chunk would end the body.
        return;
    }
    encode_chunk_head(out, data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the size line of a chunk of `len` (non-zero) bytes; the data and a CRLF follow.
pub(crate) fn encode_chunk_head(out: &mut Vec<u8>, len: usize) {
    let _ = write!(out, "{len:x}\r\n");
}

/// The last chunk of a chunked request body (no trailers).
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A parsed response head, ready to forward.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) status: StatusCode,
    /// The header lines to forward (`name: value\r\n`, names lower case): no hop-by-hop
    /// fields (except on a `101`, whose `Connection` and `Upgrade` the client needs) and no
    /// framing, except the `content-length` of a response without a body (to a HEAD, a 304).
    pub(crate) fields: Vec<u8>,
    /// Whether `fields` holds a `date`.
    pub(crate) has_date: bool,
    /// How the body is delimited.
    pub(crate) framing: ResponseFraming,
    /// Whether the connection may carry another request after this response.
    pub(crate) keep_alive: bool,
    /// Server-sent events (`content-type: text/event-stream`): the body may rightly pause
    /// between events for long, so it has its own idle timeout.
    pub(crate) event_stream: bool,
}

/// The most `Connection`-listed field names honoured in one message.
const MAX_CONNECTION_TOKENS: usize = 16;

/// What a message's `Connection` fields say (RFC 9110 §7.6.1): `close`, `keep-alive`,
/// `upgrade`, and the other names they list, which are hop-by-hop fields of that message.
pub(crate) struct ConnectionOptions<'a> {
    pub(crate) close: bool,
    pub(crate) keep_alive: bool,
    pub(crate) upgrade: bool,
    listed: [&'a [u8]; MAX_CONNECTION_TOKENS],
    n_listed: usize,
}

impl<'a> ConnectionOptions<'a> {
    /// Reads the values of every `Connection` field of a message.
    pub(crate) fn parse(values: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut o = ConnectionOptions {
            close: false,
            keep_alive: false,
            upgrade: false,
            listed: [b""; MAX_CONNECTION_TOKENS],
            n_listed: 0,
        };
        for t in values
            .into_iter()
            .flat_map(|v| v.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
        {
            if t.eq_ignore_ascii_case(b"close") {
                o.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                o.keep_alive = true;
            } else if t.eq_ignore_ascii_case(b"upgrade") {
                o.upgrade = true;
            } else if !t.is_empty() && o.n_listed < o.listed.len() {
                o.listed[o.n_listed] = t;
                o.n_listed += 1;
            }
        }
        o
    }

    /// Whether field `name` (lower case) is listed, and so hop-by-hop.
    pub(crate) fn lists(&self, name: &[u8]) -> bool {
        self.listed[..self.n_listed]
            .iter()
            .any(|l| name.eq_ignore_ascii_case(l))
    }
}

/// Parses a response head to the request `method` from the front of `buf`: `Ok(None)` if it is
/// not complete yet, otherwise the head and how many bytes of `buf` it used. The field names
/// in `buf` may be lower-cased in place.
pub(crate) fn parse_response_head(
    buf: &mut [u8],
    method: &Method,
) -> Result<Option<(ResponseHead, usize)>, H1Error> {
    parse_response_head_with(buf, method, &mut Vec::new())
}

/// [`parse_response_head`] with a list for where each field lies, kept by the caller from one
/// head to the next (a backend connection keeps one) so that its room is allocated once.
pub(crate) fn parse_response_head_with(
    buf: &mut [u8],
    method: &Method,
    places: &mut Vec<(Span, Span)>,
) -> Result<Option<(ResponseHead, usize)>, H1Error> {
    places.clear();
    // The fast scan reads the usual head (lower-casing its field names as it goes); what it
    // does not expect, httparse decides on.
    let mut lowered = true;
    let (used, code, minor) =
        match h1_scan::response(buf, MAX_RESPONSE_HEADERS, |n, v| places.push((n, v))) {
            Scan::Complete(p) => (p.used, p.code, p.minor),
            Scan::Partial if buf.len() > MAX_RESPONSE_HEAD => return Err(H1Error::HeadTooLarge),
            Scan::Partial => return Ok(None),
            Scan::Other => {
                lowered = false;
                places.clear();
                let mut storage =
                    [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
                let mut resp = httparse::Response::new(&mut []);
                let used = match httparse::ParserConfig::default()
                    .parse_response_with_uninit_headers(&mut resp, buf, &mut storage)
                {
                    Ok(httparse::Status::Complete(n)) => n,
                    Ok(httparse::Status::Partial) => {
                        return if buf.len() > MAX_RESPONSE_HEAD {
                            Err(H1Error::HeadTooLarge)
                        } else {
                            Ok(None)
                        };
                    }
                    Err(e) => return Err(H1Error::Head(e)),
                };
                let base = buf.as_ptr();
                for h in resp.headers.iter() {
                    places.push((Span::of(base, h.name.as_bytes()), Span::of(base, h.value)));
                }
                let code = resp.code.ok_or(H1Error::Head(httparse::Error::Status))?;
                (used, code, resp.version.unwrap_or(1))
            }
        };
    let fields_at = places.as_slice();
    if used > MAX_RESPONSE_HEAD {
        return Err(H1Error::HeadTooLarge);
    }
    let status = StatusCode::from_u16(code).map_err(|_| H1Error::Head(httparse::Error::Status))?;
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;

    // Connection options first: they decide keep-alive and name more hop-by-hop fields.
    let connection = ConnectionOptions::parse(
        fields_at
            .iter()
            .filter(|(n, _)| buf[n.range()].eq_ignore_ascii_case(b"connection"))
            .map(|(_, v)| &buf[v.range()]),
    );

    let mut chunked = None;
    let mut length: Option<u64> = None;
    let mut has_date = false;
    let mut event_stream = false;
    let mut fields = Vec::with_capacity(used);
    for &(name_at, value_at) in fields_at {
        let value = &buf[value_at.range()];
        // The name goes out in lower case (as HTTP/2 needs it); it is written first and taken
        // back if the field is not forwarded. A line as it is sent back (`name: value\r\n`,
        // the usual one) is copied whole, in one go.
        let start = fields.len();
        let line = crate::head::whole_line(buf, name_at, value_at);
        fields.extend_from_slice(line.unwrap_or(&buf[name_at.range()]));
        let whole = line.is_some();
        let name_len = name_at.range().len();
        if !lowered {
            fields[start..start + name_len].make_ascii_lowercase();
        }
        let name = &fields[start..start + name_len];
        match name {
            b"transfer-encoding" => chunked = Some(ends_chunked(value)),
            b"content-length" => length = Some(content_length(value, length)?),
            b"content-type" => event_stream = is_event_stream(value),
            _ => {}
        }
        if name == b"content-length"
            || (!switching
                && (crate::forward::is_hop_by_hop(name)
                    || name == b"upgrade"
                    || connection.lists(name)))
        {
            fields.truncate(start);
            continue;
        }
        has_date |= name == b"date";
        if !whole {
            fields.extend_from_slice(b": ");
            fields.extend_from_slice(value);
            fields.extend_from_slice(b"\r\n");
        }
    }

    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        ResponseFraming::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => ResponseFraming::Chunked,
            (Some(false), _) => ResponseFraming::Close,
            (None, Some(n)) => ResponseFraming::Length(n),
            (None, None) => ResponseFraming::Close,
        }
    };
    if let (ResponseFraming::Empty, Some(n)) = (framing, length) {
        // No body follows, but the length tells a HEAD or 304 client what one would have.
        write_number_header(&mut fields, b"content-length", n);
    }
    // A response framed both ways, or an HTTP/1.0 one with a transfer coding, leaves what
    // follows on the connection in doubt (RFC 9112 §6.1, §6.3): never reuse it, or another
    // client's request could get the leftover bytes as its answer.
    let doubtful = (chunked.is_some() && length.is_some()) || (chunked.is_some() && minor == 0);
    let keep_alive = framing != ResponseFraming::Close
        && !doubtful
        && !connection.close
        && (minor >= 1 || connection.keep_alive);
    Ok(Some((
        ResponseHead {
            status,
            fields,
            has_date,
            framing,
            keep_alive,
            event_stream,
        },
        used,
    )))
}

/// Whether a `content-type` value is `text/event-stream` (any parameters, any case).
fn is_event_stream(value: &[u8]) -> bool {
    const SSE: &[u8] = b"text/event-stream";
    let v = value.trim_ascii_start();
    v.len() >= SSE.len()
        // `text/e`: most types differ by then, and one byte costs less than the comparison.
        && v[5].eq_ignore_ascii_case(&b'e')
        && v[..SSE.len()].eq_ignore_ascii_case(SSE)
        && matches!(v.get(SSE.len()), None | Some(b';' | b' ' | b'\t'))
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    /// No body: a HEAD request, or a 1xx, 204 or 304 response.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the backend closes the connection.
    Close,
}

/// What [`ChunkedDecoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    /// The buffer holds no complete piece: read more.
    NeedMore,
    /// The last chunk and the trailers have been consumed.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers(usize),
    Done,
}

/// Decodes a chunked body incrementally from a read buffer. Chunk extensions and trailers are
/// dropped.
#[derive(Debug)]
pub(crate) struct ChunkedDecoder {
    state: ChunkState,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
        }
    }
}

/// Splits off the first line of `buf` (without its line ending), if it is complete.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, H1Error> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_CHUNK_LINE => Err(H1Error::Chunked("line too long")),
        None => Ok(None),
    }
}

impl ChunkedDecoder {
    /// Consumes from the front of `buf`. Data larger than `copy_below` is split off without
    /// copying; smaller pieces are copied so the buffer keeps its allocation.
    pub(crate) fn decode(
        &mut self,
        buf: &mut BytesMut,
        copy_below: usize,
    ) -> Result<Decoded, H1Error> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let digits = line
                        .iter()
                        .position(|b| !b.is_ascii_hexdigit())
                        .unwrap_or(line.len());
                    if digits == 0 || digits > 16 {
                        return Err(H1Error::Chunked("bad chunk size"));
                    }
                    let rest = &line[digits..];
                    if !rest.is_empty() && !matches!(rest[0], b';' | b' ' | b'\t') {
                        return Err(H1Error::Chunked("bad chunk size"));
                    }
                    let hex = std::str::from_utf8(&line[..digits]).unwrap_or("0");
                    let size = u64::from_str_radix(hex, 16)
                        .map_err(|_| H1Error::Chunked("bad chunk size"))?;
                    self.state = if size == 0 {
                        ChunkState::Trailers(0)
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = (left as usize).min(buf.len());
                    let data = take_bytes(buf, n, copy_below);
                    self.state = if left == n as u64 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - n as u64)
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        if buf.first() == Some(&b'\n') {
                            buf.advance(1);
                            self.state = ChunkState::Size;
                            continue;
                        }
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] == b"\r\n" {
                        buf.advance(2);
                    } else if buf[0] == b'\n' {
                        buf.advance(1);
                    } else {
                        return Err(H1Error::Chunked("missing CRLF after chunk data"));
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers(seen) => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if line.is_empty() {
                        self.state = ChunkState::Done;
                        return Ok(Decoded::Done);
                    }
                    let seen = seen + line.len();
                    if seen > MAX_TRAILERS {
                        return Err(H1Error::Chunked("trailers too large"));
                    }
                    self.state = ChunkState::Trailers(seen);
                }
                ChunkState::Done => return Ok(Decoded::Done),
            }
        }
    }
}

/// A message body taken out of a read buffer by its framing: the one decoder for client request
/// bodies ([`crate::server`]) and backend response bodies ([`crate::pool`]).
#[derive(Debug)]
pub(crate) enum BodyDecoder {
    Done,
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Everything until the connection closes (the reader ends it at end of stream).
    Close,
}

impl BodyDecoder {
    /// The decoder for a body of `length` bytes.
    pub(crate) fn length(length: u64) -> Self {
        if length == 0 {
            BodyDecoder::Done
        } else {
            BodyDecoder::Length(length)
        }
    }

    pub(crate) fn chunked() -> Self {
        BodyDecoder::Chunked(ChunkedDecoder::default())
    }

    /// The next piece of the body at the front of `buf` (see [`take_bytes`] for
    /// `copy_below`), [`Decoded::NeedMore`] if `buf` holds none, or [`Decoded::Done`].
    pub(crate) fn decode(
        &mut self,
        buf: &mut BytesMut,
        copy_below: usize,
    ) -> Result<Decoded, H1Error> {
        match self {
            BodyDecoder::Done => Ok(Decoded::Done),
            _ if buf.is_empty() => Ok(Decoded::NeedMore),
            BodyDecoder::Length(left) => {
                let n = (*left).min(buf.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    *self = BodyDecoder::Done;
                }
                Ok(Decoded::Data(take_bytes(buf, n, copy_below)))
            }
            BodyDecoder::Close => {
                let n = buf.len();
                Ok(Decoded::Data(take_bytes(buf, n, copy_below)))
            }
            BodyDecoder::Chunked(dec) => {
                let decoded = dec.decode(buf, copy_below)?;
                if decoded == Decoded::Done {
                    *self = BodyDecoder::Done;
                }
                Ok(decoded)
            }
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        matches!(self, BodyDecoder::Done)
    }

    /// The bytes still to come, when known.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self {
            BodyDecoder::Done => Some(0),
            BodyDecoder::Length(n) => Some(*n),
            BodyDecoder::Chunked(_) | BodyDecoder::Close => None,
        }
    }
}

/// Reads a `content-length` field value (a list of equal lengths is allowed), which must agree
/// with `seen`, the length of an earlier such field.
pub(crate) fn content_length(value: &[u8], seen: Option<u64>) -> Result<u64, H1Error> {
    // The usual value, a few digits and nothing else, is read in place (19 digits always fit
    // a `u64`); anything else (a list, whitespace, a longer number) goes the general way.
    if (1..=19).contains(&value.len()) && value.iter().all(u8::is_ascii_digit) {
        let n = value
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        return match seen {
            Some(l) if l != n => Err(H1Error::ContentLength),
            _ => Ok(n),
        };
    }
    content_length_list(value, seen)
}

/// [`content_length`] for any value: a comma-separated list of equal numbers.
fn content_length_list(value: &[u8], seen: Option<u64>) -> Result<u64, H1Error> {
    let mut length = seen;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        let n = std::str::from_utf8(part)
            .ok()
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<u64>().ok())
            .ok_or(H1Error::ContentLength)?;
        if length.is_some_and(|l| l != n) {
            return Err(H1Error::ContentLength);
        }
        length = Some(n);
    }
    length.ok_or(H1Error::ContentLength)
}

/// Whether a `transfer-encoding` field value ends with `chunked`: the last coding of the last
/// field decides how the body is framed (RFC 9112 §6.3).
pub(crate) fn ends_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .map(<[u8]>::trim_ascii)
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
}

/// Takes `n` bytes off the front of `buf`: copied when small (so `buf` keeps its allocation
/// for the next read), split off without copying when large.
pub(crate) fn take_bytes(buf: &mut BytesMut, n: usize, copy_below: usize) -> Bytes {
    if n < copy_below {
        let b = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        b
    } else {
        buf.split_to(n).freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_length_is_read_as_the_list_reading_reads_it() {
        let mut values: Vec<Vec<u8>> = Vec::new();
        for digits in 1..=22 {
            values.push(vec![b'9'; digits]);
            values.push((0..digits).map(|i| b"0123456789"[i % 10]).collect());
            values.push([&b"0"[..], &vec![b'7'; digits]].concat());
        }
        values.extend(
            [
                &b"0"[..],
                b"18446744073709551615",
                b"18446744073709551616",
                b"",
                b" 5",
                b"5 ",
                b"5, 5",
                b"5,6",
                b"+5",
                b"-1",
                b"5\xff",
                b"0x10",
                b"\xd9\xa3",
            ]
            .map(<[u8]>::to_vec),
        );
        for v in &values {
            for seen in [None, Some(0), Some(5), Some(999_999_999), Some(u64::MAX)] {
                let fast = content_length(v, seen).map_err(|e| e.to_string());
                let list = content_length_list(v, seen).map_err(|e| e.to_string());
                assert_eq!(
                    fast,
                    list,
                    "{:?} after {seen:?}",
                    String::from_utf8_lossy(v)
                );
            }
        }
        assert_eq!(content_length(b"1234", None).unwrap(), 1234);
        assert_eq!(
            content_length(b"9999999999999999999", Some(9_999_999_999_999_999_999)).unwrap(),
            9_999_999_999_999_999_999
        );
        assert!(content_length(b"12", Some(13)).is_err());
    }

    fn head(raw: &str) -> ResponseHead {
        parse_response_head(&mut raw.as_bytes().to_vec(), &Method::GET)
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn response_heads_parse_incrementally_and_reject_garbage() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-a: 1\r\nx-a: 2\r\n\r\nabc";
        for cut in 0..raw.len() - 3 {
            assert!(
                parse_response_head(&mut raw[..cut].to_vec(), &Method::GET)
                    .unwrap()
                    .is_none(),
                "cut {cut}"
            );
        }
        let (h, used) = parse_response_head(&mut raw.to_vec(), &Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(used, raw.len() - 3);
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(
            h.fields, b"x-a: 1\r\nx-a: 2\r\n",
            "framing is the server's to add"
        );
        let bad = |raw: &[u8]| parse_response_head(&mut raw.to_vec(), &Method::GET).unwrap_err();
        assert!(matches!(bad(b"HTTP/1.1 2000 OK\r\n\r\n"), H1Error::Head(_)));
        assert!(matches!(bad(b"hello\r\n\r\n"), H1Error::Head(_)));
        let huge = format!(
            "HTTP/1.1 200 OK\r\nx: {}",
            "a".repeat(MAX_RESPONSE_HEAD + 1)
        );
        assert!(matches!(bad(huge.as_bytes()), H1Error::HeadTooLarge));
        assert!(matches!(
            bad(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\n"),
            H1Error::ContentLength
        ));
        assert!(matches!(
            bad(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n"),
            H1Error::ContentLength
        ));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let f = |raw: &str, m: Method| {
            parse_response_head(&mut raw.as_bytes().to_vec(), &m)
                .unwrap()
                .unwrap()
                .0
                .framing
        };
        use ResponseFraming::*;
        let cl7 = "HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n";
        assert_eq!(f(cl7, Method::GET), Length(7));
        assert_eq!(f(cl7, Method::HEAD), Empty);
        assert_eq!(f("HTTP/1.1 204 No Content\r\n\r\n", Method::GET), Empty);
        assert_eq!(
            f(
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
                Method::GET
            ),
            Empty
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n",
                Method::GET
            ),
            Chunked
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                Method::GET
            ),
            Close
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\n\r\n", Method::GET), Close);
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\n\r\n",
                Method::GET
            ),
            Length(4)
        );
    }

    #[test]
    fn keep_alive_depends_on_version_connection_and_framing() {
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").keep_alive);
        assert!(
            !head("HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n").keep_alive
        );
        assert!(!head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").keep_alive);
        assert!(
            head("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n")
                .keep_alive
        );
        assert!(
            !head("HTTP/1.1 200 OK\r\n\r\n").keep_alive,
            "a body delimited by close"
        );
    }

    #[test]
    fn hop_by_hop_response_fields_are_dropped_except_on_101() {
        let h = head(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive, x-secret\r\nx-secret: 1\r\nkeep-alive: timeout=5\r\ntransfer-encoding: chunked\r\nupgrade: h2c\r\nproxy-authenticate: Basic\r\nx-other: kept\r\n\r\n",
        );
        assert_eq!(h.fields, b"x-other: kept\r\n");
        assert_eq!(h.framing, ResponseFraming::Chunked);
        let h = head(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        );
        assert_eq!(h.fields, b"connection: upgrade\r\nupgrade: websocket\r\n");
    }

    #[test]
    fn forwarded_names_are_lower_case_and_bodiless_responses_keep_their_length() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nDate: today\r\nX-Mixed: Case\r\n\r\n";
        let h = head(raw);
        assert_eq!(h.fields, b"date: today\r\nx-mixed: Case\r\n");
        assert!(h.has_date);
        let (h, _) = parse_response_head(&mut raw.as_bytes().to_vec(), &Method::HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(
            h.fields,
            b"date: today\r\nx-mixed: Case\r\ncontent-length: 7\r\n"
        );
        assert!(!head("HTTP/1.1 204 No Content\r\n\r\n").has_date);
    }

    /// A line sent as it goes out is copied whole; any other spacing (none, several, a tab,
    /// trailing whitespace, a line httparse reads) goes out as `name: value`, lower case.
    #[test]
    fn every_forwarded_line_goes_out_as_name_colon_space_value() {
        let h = head(
            "HTTP/1.1 200 OK\r\nX-A: 1\r\nx-b:2\r\nX-C:   3 \r\nx-d:\t4\t\r\nx-e: \r\nX-F: six  words  \r\n\r\n",
        );
        assert_eq!(
            String::from_utf8(h.fields).unwrap(),
            "x-a: 1\r\nx-b: 2\r\nx-c: 3\r\nx-d: 4\r\nx-e: \r\nx-f: six  words\r\n"
        );
        // A head the fast scan leaves to httparse (a space before a colon would be refused,
        // so: a bare `\n` line end).
        let h = head("HTTP/1.1 200 OK\nX-A: 1\nx-b:2 \n\n");
        assert_eq!(String::from_utf8(h.fields).unwrap(), "x-a: 1\r\nx-b: 2\r\n");
    }

    #[test]
    fn server_sent_events_are_recognised_by_their_content_type() {
        for (content_type, sse) in [
            ("text/event-stream", true),
            ("Text/Event-Stream; charset=utf-8", true),
            ("  text/event-stream ", true),
            ("text/event-streams", false),
            ("text/plain", false),
            ("application/json", false),
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\n\r\n");
            assert_eq!(head(&raw).event_stream, sse, "{content_type:?}");
        }
        assert!(!head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").event_stream);
    }

    fn decode_all(input: &[u8], step: usize) -> Result<Vec<u8>, H1Error> {
        let mut dec = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match dec.decode(&mut buf, 4)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::Done => return Ok(out),
                Decoded::NeedMore => {
                    if fed == input.len() {
                        return Err(H1Error::Chunked("truncated"));
                    }
                    let end = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    /// A malformed response used to leave its connection in the pool: both framings, or an
    /// HTTP/1.0 response with a transfer coding.
    #[test]
    fn a_response_framed_in_doubt_closes_its_connection() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            let (head, _) = parse_response_head(&mut raw.to_vec(), &Method::GET)
                .unwrap()
                .unwrap();
            assert!(!head.keep_alive, "{}", String::from_utf8_lossy(raw));
        }
        let (head, _) = parse_response_head(
            &mut b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(head.keep_alive, "a well-framed response keeps it");
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_sizes() {
        let body =
            b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in 1..body.len() {
            assert_eq!(
                decode_all(body, step).unwrap(),
                b"helloabcdefghijklmnopqrstuvwxyz",
                "step {step}"
            );
        }
        // Bare LF line endings are tolerated.
        assert_eq!(decode_all(b"3\nabc\n0\n\n", 2).unwrap(), b"abc");
        assert!(decode_all(b"zz\r\n", 10).is_err());
        assert!(decode_all(b"3\r\nabcX\r\n0\r\n\r\n", 50).is_err());
        assert!(decode_all(b"3\r\nabc\r\n", 50).is_err(), "no last chunk");
        let long = format!("{}\r\n", "1".repeat(MAX_CHUNK_LINE + 1));
        assert!(decode_all(long.as_bytes(), long.len()).is_err());
        // Bytes after the body stay in the buffer for the next response.
        let mut dec = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&b"1\r\na\r\n0\r\n\r\nHTTP/1.1"[..]);
        assert_eq!(
            dec.decode(&mut buf, 0).unwrap(),
            Decoded::Data(Bytes::from_static(b"a"))
        );
        assert_eq!(dec.decode(&mut buf, 0).unwrap(), Decoded::Done);
        assert_eq!(&buf[..], b"HTTP/1.1");
    }
}
