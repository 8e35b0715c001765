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

use bytes::Bytes;
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
        self.target().split_once('?').map(|(_, q)| q)
    }

    /// The path of the target, without the query.
    fn path(&self) -> &str {
        let t = self.target();
        t.split_once('?').map_or(t, |(p, _)| p)
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

/// An HTTP/1.1 request head: the bytes the client sent (names lower-cased) and where its parts
/// lie in them.
pub(crate) struct RawRequest {
    buf: Bytes,
    method: Method,
    /// The origin-form target (`/path?query`), or `None` when `uri` holds another form.
    target: Option<Span>,
    /// An absolute-form (or asterisk) target, parsed (boxed: rare, and the head is moved on
    /// every request).
    uri: Option<Box<Uri>>,
    fields: Vec<(Span, Span)>,
}

impl RawRequest {
    /// `buf` holds the head; `target` and `fields` are spans into it, names already lower case.
    /// A target that is not in origin form must parse as a URI.
    pub(crate) fn new(
        buf: Bytes,
        method: Method,
        target: Span,
        fields: Vec<(Span, Span)>,
    ) -> Result<Self, http::uri::InvalidUri> {
        // A target that is not UTF-8, or holds control bytes, is refused (400); one in UTF-8 is
        // forwarded as it came. Never rewritten: `target` used to make a target that is not
        // UTF-8 into `/`.
        let bytes = &buf[target.range()];
        if std::str::from_utf8(bytes).is_err() || bytes.iter().any(u8::is_ascii_control) {
            return Err(Uri::try_from(&b"\0"[..]).expect_err("NUL is not a URI"));
        }
        let (target, uri) = if buf.get(target.start()) == Some(&b'/') {
            (Some(target), None)
        } else {
            let uri = Uri::from_maybe_shared(buf.slice(target.range()))?;
            // An empty path (`http://h?q`) is `/` in origin form (RFC 9112 §3.2.1): the
            // backend used to get `?q` as its request target (found by fuzzing).
            let uri = match (uri.scheme_str(), uri.authority(), uri.path_and_query()) {
                (Some(scheme), Some(authority), Some(pq)) if pq.as_str().starts_with('?') => {
                    Uri::try_from(format!("{scheme}://{authority}/{}", pq.as_str()))?
                }
                _ => uri,
            };
            (None, Some(Box::new(uri)))
        };
        Ok(RawRequest {
            buf,
            method,
            target,
            uri,
            fields,
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
        let bytes = &self.buf[self.target?.range()];
        // SAFETY: `new` refused a target that is not UTF-8, and neither the bytes (`Bytes` is
        // immutable) nor the span change after it. The request path reads the target several
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
