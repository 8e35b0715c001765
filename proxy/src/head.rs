//! Request and response heads as the request path sees them, whichever server read the request.
//!
//! HTTP/1.1 requests ([`RawRequest`]) keep their head as the bytes the client sent: field
//! names are lower-cased in place and each field is a pair of spans into those bytes, so no
//! header map is built and nothing is copied. HTTP/2 requests are their decoded header block
//! ([`crate::http2::request::H2Request`]); tests build heads as [`http::request::Parts`]. All
//! are read through [`RequestHead`].
//!
//! A response ([`ProxyResponse`]) carries its fields as the header lines that go to the client
//! (`name: value\r\n`, hop-by-hop fields and framing already removed): the HTTP/1.1 server
//! copies them out in one go; the HTTP/2 server encodes them into its header block.

use bytes::BytesMut;
use http::header::HeaderValue;
use http::{Method, StatusCode, Uri};

use crate::forward::ProxyBody;

/// What the request path reads of a request head. Field names are lower case.
pub(crate) trait RequestHead {
    fn method(&self) -> &Method;
    /// The target in origin form: path and query (`/` when the request named none).
    fn target(&self) -> &str;
    /// The authority of an absolute-form target or an HTTP/2 request.
    fn authority(&self) -> Option<&str>;
    /// Every field, as lower-case name and value, in the order the client sent them.
    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])>;

    /// [`RequestHead::fields`], each with its whole line (`name: value\r\n`) when the head
    /// holds it exactly so, lower-case name included: it can be forwarded in one copy.
    fn field_lines(&self) -> impl Iterator<Item = (&[u8], &[u8], Option<&[u8]>)> {
        self.fields().map(|(n, v)| (n, v, None))
    }

    /// The first value of a field the request path reads on every request (see [`Known`]).
    fn known(&self, field: Known) -> Option<&[u8]> {
        self.get(field.name())
    }

    /// Every value of a field the request path reads on every request.
    fn known_all(&self, field: Known) -> impl Iterator<Item = &[u8]> {
        self.get_all(field.name())
    }

    /// The first value of field `name` (lower case).
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields()
            .find(|(n, _)| *n == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// Every value of field `name` (lower case).
    fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.fields()
            .filter(move |(n, _)| *n == name.as_bytes())
            .map(|(_, v)| v)
    }

    /// The query of the target, without the `?`.
    fn query(&self) -> Option<&str> {
        split_target(self.target()).1
    }

    /// The path of the target, without the query.
    fn path(&self) -> &str {
        split_target(self.target()).0
    }
}

/// A target's path and query (without the `?`), split at its first `?` by a byte search (16
/// at a time): `split_once`'s general one cost several times as much on a short target. The
/// `?` is ASCII, so both sides of it are whole characters.
fn split_target(t: &str) -> (&str, Option<&str>) {
    match crate::h1_scan::find_byte(t.as_bytes(), 0, b'?') {
        Some(at) => (&t[..at], Some(&t[at + 1..])),
        None => (t, None),
    }
}

/// Fields that the request path reads on every request (or that parsing a request head
/// must see). An HTTP/1.1 head notes where the first of each lies as it is parsed, so that
/// looking one up reads no other field, and a request without one (most have no `Connection`,
/// `Upgrade` or `Cookie`) costs nothing to ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Known {
    // Looked up after parsing (and so indexed): these come first.
    Host,
    Authorization,
    ContentLength,
    Connection,
    Upgrade,
    Cookie,
    XForwardedFor,
    HangarBackend,
    // Read only while the head is parsed.
    TransferEncoding,
    Expect,
}

impl Known {
    #[cfg(test)]
    pub(crate) const ALL: [Known; 10] = [
        Known::Host,
        Known::Authorization,
        Known::ContentLength,
        Known::Connection,
        Known::Upgrade,
        Known::Cookie,
        Known::XForwardedFor,
        Known::HangarBackend,
        Known::TransferEncoding,
        Known::Expect,
    ];

    /// How many are indexed: the head is moved several times per request, so its index is
    /// kept to a word.
    const INDEXED: usize = 8;

    /// The field's name, lower case.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Known::Host => "host",
            Known::Authorization => "authorization",
            Known::ContentLength => "content-length",
            Known::TransferEncoding => "transfer-encoding",
            Known::Connection => "connection",
            Known::Upgrade => "upgrade",
            Known::Cookie => "cookie",
            Known::Expect => "expect",
            Known::XForwardedFor => "x-forwarded-for",
            Known::HangarBackend => hangar_core::route::BACKEND_HEADER,
        }
    }

    /// The known field named `name` (lower case), if it is one.
    pub(crate) fn of(name: &[u8]) -> Option<Known> {
        Some(match name {
            b"host" => Known::Host,
            b"authorization" => Known::Authorization,
            b"content-length" => Known::ContentLength,
            b"transfer-encoding" => Known::TransferEncoding,
            b"connection" => Known::Connection,
            b"upgrade" => Known::Upgrade,
            b"cookie" => Known::Cookie,
            b"expect" => Known::Expect,
            b"x-forwarded-for" => Known::XForwardedFor,
            b"x-hangar-backend" => Known::HangarBackend,
            _ => return None,
        })
    }
}

/// Where the first field of each [`Known`] name lies in a head's field list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FieldIndex {
    /// The position of the first such field, or `u8::MAX` for none (a head has at most
    /// [`crate::server::MAX_REQUEST_HEADERS`] fields).
    first: [u8; Known::INDEXED],
}

impl Default for FieldIndex {
    fn default() -> Self {
        FieldIndex {
            first: [u8::MAX; Known::INDEXED],
        }
    }
}

impl FieldIndex {
    /// Notes field number `i`, named `name` (lower case): which known field it is, if any.
    pub(crate) fn note(&mut self, i: usize, name: &[u8]) -> Option<Known> {
        let known = Known::of(name)?;
        if let Some(slot) = self.first.get_mut(known as usize)
            && *slot == u8::MAX
        {
            *slot = u8::try_from(i).expect("a head has at most 100 fields");
        }
        Some(known)
    }

    /// The position of the first field of `known`, if there is one; `Err` if the index does
    /// not keep it (then the fields must be searched).
    fn first(&self, known: Known) -> Result<Option<usize>, ()> {
        match self.first.get(known as usize) {
            Some(&u8::MAX) => Ok(None),
            Some(&i) => Ok(Some(usize::from(i))),
            None => Err(()),
        }
    }
}

#[cfg(test)]
impl RequestHead for http::request::Parts {
    fn method(&self) -> &Method {
        &self.method
    }

    fn target(&self) -> &str {
        self.uri.path_and_query().map_or("/", |pq| pq.as_str())
    }

    fn authority(&self) -> Option<&str> {
        self.uri.authority().map(|a| a.as_str())
    }

    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
    }
}

/// A byte range within a buffer: 32-bit offsets, as a head is at most a few MiB (the
/// configured limit) and a head's span list is half as large and its moves cheaper.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Span {
    start: u32,
    len: u32,
}

impl Span {
    pub(crate) fn new(start: usize, len: usize) -> Span {
        let start = u32::try_from(start).expect("a head is far shorter than 4 GiB");
        let len = u32::try_from(len).expect("a head is far shorter than 4 GiB");
        Span { start, len }
    }

    /// Where `part` lies within the buffer that starts at `base`.
    pub(crate) fn of(base: *const u8, part: &[u8]) -> Span {
        Span::new(part.as_ptr() as usize - base as usize, part.len())
    }

    /// Where the range starts.
    pub(crate) fn start(self) -> usize {
        self.start as usize
    }

    pub(crate) fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// The whole line of the field whose name and value lie at `name` and `value` in `buf`, when
/// it is exactly `name: value\r\n` (one space, nothing trailing): it can be forwarded in one
/// copy.
pub(crate) fn whole_line(buf: &[u8], name: Span, value: Span) -> Option<&[u8]> {
    let (name_end, value_end) = (name.range().end, value.range().end);
    let whole = value.start() == name_end + 2
        && buf.get(name_end..name_end + 2) == Some(b": ")
        && buf.get(value_end..value_end + 2) == Some(b"\r\n");
    whole.then(|| &buf[name.start()..value_end + 2])
}

/// An HTTP/1.1 request head: the bytes the client sent (names lower-cased) and where its parts
/// lie in them.
pub(crate) struct RawRequest {
    /// The head's own buffer: the connection's read buffer taken whole when nothing followed
    /// the head (the usual request), so that no shared owner is allocated for it.
    buf: BytesMut,
    method: Method,
    /// The target as sent: in origin form (`/path?query`) unless `uri` holds it parsed.
    target: Span,
    /// An absolute-form (or asterisk) target, parsed (boxed: rare, and the head is moved on
    /// every request).
    uri: Option<Box<Uri>>,
    fields: Vec<(Span, Span)>,
    index: FieldIndex,
}

impl RawRequest {
    /// `buf` holds the head; `target` and `fields` are spans into it, names already lower case.
    /// A target that is not in origin form must parse as a URI.
    #[cfg(test)]
    pub(crate) fn new(
        buf: impl Into<BytesMut>,
        method: Method,
        target: Span,
        fields: Vec<(Span, Span)>,
    ) -> Result<Self, http::uri::InvalidUri> {
        let buf = buf.into();
        let mut index = FieldIndex::default();
        for (i, (name, _)) in fields.iter().enumerate() {
            index.note(i, &buf[name.range()]);
        }
        Self::indexed(buf, method, target, fields, index)
    }

    /// [`RawRequest::new`] for fields already noted in `index`.
    pub(crate) fn indexed(
        buf: BytesMut,
        method: Method,
        target: Span,
        fields: Vec<(Span, Span)>,
        index: FieldIndex,
    ) -> Result<Self, http::uri::InvalidUri> {
        // A target that is not UTF-8, or holds control bytes, is refused (400); one in UTF-8 is
        // forwarded as it came. Never rewritten: `target` used to make a target that is not
        // UTF-8 into `/`.
        let bytes = &buf[target.range()];
        // (The ASCII check first: the usual target is ASCII, and it costs far less than
        // `from_utf8`'s.)
        let utf8 = bytes.is_ascii() || std::str::from_utf8(bytes).is_ok();
        if !utf8 || bytes.iter().any(u8::is_ascii_control) {
            return Err(Uri::try_from(&b"\0"[..]).expect_err("NUL is not a URI"));
        }
        let uri = if buf.get(target.start()) == Some(&b'/') {
            None
        } else {
            let uri = Uri::try_from(bytes)?;
            // An empty path (`http://h?q`) is `/` in origin form (RFC 9112 §3.2.1): the
            // backend used to get `?q` as its request target (found by fuzzing).
            let uri = match (uri.scheme_str(), uri.authority(), uri.path_and_query()) {
                (Some(scheme), Some(authority), Some(pq)) if pq.as_str().starts_with('?') => {
                    Uri::try_from(format!("{scheme}://{authority}/{}", pq.as_str()))?
                }
                _ => uri,
            };
            Some(Box::new(uri))
        };
        Ok(RawRequest {
            buf,
            method,
            target,
            uri,
            fields,
            index,
        })
    }

    /// Gives back the field list's allocation for the connection's next request.
    pub(crate) fn into_fields(self) -> Vec<(Span, Span)> {
        let mut fields = self.fields;
        fields.clear();
        fields
    }

    /// The origin-form target, checked once in [`RawRequest::new`].
    fn origin_target(&self) -> Option<&str> {
        if self.uri.is_some() {
            return None;
        }
        let bytes = &self.buf[self.target.range()];
        // SAFETY: `indexed` refused a target that is not UTF-8, and neither the bytes (the
        // buffer is private to the head, and nothing writes to it after `indexed`) nor the
        // span change after it. The request path reads the target several
        // times per request; checking it again each time was 2% of the proxy's instructions.
        #[allow(unsafe_code)]
        unsafe {
            Some(std::str::from_utf8_unchecked(bytes))
        }
    }
}

impl RequestHead for RawRequest {
    fn method(&self) -> &Method {
        &self.method
    }

    fn target(&self) -> &str {
        match (self.origin_target(), &self.uri) {
            (Some(target), _) => target,
            (None, Some(uri)) => uri.path_and_query().map_or("/", |pq| pq.as_str()),
            (None, None) => "/",
        }
    }

    fn authority(&self) -> Option<&str> {
        self.uri
            .as_deref()
            .and_then(Uri::authority)
            .map(|a| a.as_str())
    }

    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|&(n, v)| (&self.buf[n.range()], &self.buf[v.range()]))
    }

    fn field_lines(&self) -> impl Iterator<Item = (&[u8], &[u8], Option<&[u8]>)> {
        self.fields.iter().map(|&(n, v)| {
            let line = whole_line(&self.buf, n, v);
            (&self.buf[n.range()], &self.buf[v.range()], line)
        })
    }

    fn known(&self, field: Known) -> Option<&[u8]> {
        match self.index.first(field) {
            Ok(at) => {
                let (_, value) = self.fields[at?];
                Some(&self.buf[value.range()])
            }
            Err(()) => self.get(field.name()),
        }
    }

    fn known_all(&self, field: Known) -> impl Iterator<Item = &[u8]> {
        // From the first such field on (none at all when there is none).
        let from = match self.index.first(field) {
            Ok(at) => at.unwrap_or(self.fields.len()),
            Err(()) => 0,
        };
        let name = field.name().as_bytes();
        self.fields[from..]
            .iter()
            .filter(move |(n, _)| &self.buf[n.range()] == name)
            .map(|&(_, v)| &self.buf[v.range()])
    }
}

/// A response on its way to the client.
pub(crate) struct ProxyResponse {
    pub(crate) status: StatusCode,
    /// Header lines (`name: value\r\n`) that go to the client as they are: no hop-by-hop
    /// fields (but on a `101`) and no framing, which the server adds.
    pub(crate) fields: Vec<u8>,
    /// Whether `fields` holds a `date`.
    pub(crate) has_date: bool,
    pub(crate) body: ProxyBody,
}

/// The fields of a block of header lines (`name: value\r\n` each).
pub(crate) fn field_lines(block: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    block
        .split(|&b| b == b'\n')
        .filter_map(|line| line.strip_suffix(b"\r"))
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            Some((&line[..colon], line[colon + 1..].trim_ascii_start()))
        })
}

/// Calls `f` with the current `date` value (IMF-fixdate), formatted at most once a second per
/// thread; both servers take a response's `date` from here.
pub(crate) fn with_date<R>(f: impl FnOnce(&HeaderValue) -> R) -> R {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, HeaderValue)> =
            const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, value)| {
        if *at != secs {
            *at = secs;
            // An IMF-fixdate is visible ASCII.
            *value = HeaderValue::from_str(&httpdate::fmt_http_date(now))
                .unwrap_or_else(|_| HeaderValue::from_static(""));
        }
        f(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn parsed_heads_find_each_field_their_fields_list() {
        let (parts, ()) = http::Request::get("/")
            .header("Authorization", "Bearer a")
            .header("content-length", "3")
            .header("host", "h.test")
            .header("upgrade", "websocket")
            .header("x-hangar-backend", "b1")
            .header("x-other", "o")
            .body(())
            .unwrap()
            .into_parts();
        for name in [
            "authorization",
            "content-length",
            "host",
            "upgrade",
            "x-hangar-backend",
            "x-other",
            "cookie",
        ] {
            let listed = parts.fields().find(|(n, _)| *n == name.as_bytes());
            assert_eq!(parts.get(name), listed.map(|(_, v)| v), "{name}");
        }
        assert_eq!(parts.get("authorization"), Some(&b"Bearer a"[..]));
        assert_eq!(parts.get("cookie"), None);
    }

    /// A target's path and query split where `split_once('?')` splits it, wherever the `?` is
    /// (before, inside or after the 16-byte steps of the search) and whatever is around it.
    #[test]
    fn a_target_splits_at_its_first_question_mark() {
        let mut targets = vec![
            "/".to_string(),
            "/?".into(),
            "/a?b?c".into(),
            "/é?ü=1".into(),
        ];
        for len in 1..50 {
            for at in (1..len).step_by(3) {
                let mut t: Vec<char> = std::iter::once('/')
                    .chain((1..len).map(|i| char::from(b'a' + (i % 26) as u8)))
                    .collect();
                t[at] = '?';
                if at + 2 < len {
                    t[at + 2] = '?';
                }
                targets.push(t.into_iter().collect());
            }
            targets.push(format!("/{}", "ü".repeat(len)));
        }
        for target in targets {
            let buf = Bytes::from(format!("GET {target} HTTP/1.1\r\n"));
            let span = Span::new(4, target.len());
            let raw = RawRequest::new(buf, Method::GET, span, Vec::new()).unwrap();
            let want = target.split_once('?');
            assert_eq!(raw.query(), want.map(|(_, q)| q), "{target}");
            assert_eq!(raw.path(), want.map_or(&target[..], |(p, _)| p), "{target}");
        }
    }

    #[test]
    fn raw_heads_read_like_parsed_ones() {
        let buf =
            Bytes::from_static(b"GET /a?b=1 HTTP/1.1\r\nhost: x\r\ncookie: a\r\ncookie: b\r\n");
        let f = |s: &[u8]| Span::of(buf.as_ptr(), s);
        let fields = vec![
            (f(&buf[21..25]), f(&buf[27..28])),
            (f(&buf[30..36]), f(&buf[38..39])),
            (f(&buf[41..47]), f(&buf[49..50])),
        ];
        let raw = RawRequest::new(buf.clone(), Method::GET, f(&buf[4..10]), fields).unwrap();
        assert_eq!(raw.target(), "/a?b=1");
        assert_eq!((raw.path(), raw.query()), ("/a", Some("b=1")));
        assert_eq!(raw.get("host"), Some(&b"x"[..]));
        assert_eq!(raw.get_all("cookie").collect::<Vec<_>>(), [b"a", b"b"]);
        assert_eq!(raw.get("x-none"), None);
        assert_eq!(raw.authority(), None);

        let buf = Bytes::from_static(b"http://h.test:8/p?q");
        let raw = RawRequest::new(
            buf.clone(),
            Method::GET,
            Span::of(buf.as_ptr(), &buf),
            vec![],
        )
        .unwrap();
        assert_eq!((raw.target(), raw.authority()), ("/p?q", Some("h.test:8")));
        let buf = Bytes::from_static(b"ht tp://");
        assert!(
            RawRequest::new(
                buf.clone(),
                Method::GET,
                Span::of(buf.as_ptr(), &buf),
                vec![]
            )
            .is_err()
        );
    }
}
