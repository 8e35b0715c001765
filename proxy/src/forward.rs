//! Forwarding to backends: the upstream HTTP/1.1 client with its keep-alive pool, header
//! hygiene (hop-by-hop and `x-hangar-*` stripping), the request body wrapper that counts the
//! bytes a backend receives, and the response body wrapper that keeps a backend marked busy
//! until the response has been fully sent (and counts the bytes it sends).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::activity::{ActivityGuard, ReceivedBytes};

/// The body of every response the proxy sends: a backend's streamed body, or a small body the
/// proxy wrote itself (errors).
pub(crate) type ProxyBody = Either<GuardedBody, Full<Bytes>>;

/// A request body on its way to a backend: counts its bytes, adding them to the backend's
/// traffic once when it ends (not per frame).
pub(crate) struct CountingBody {
    inner: Incoming,
    bytes: u64,
    sink: Option<ReceivedBytes>,
}

impl CountingBody {
    pub(crate) fn new(inner: Incoming, sink: ReceivedBytes) -> Self {
        CountingBody {
            inner,
            bytes: 0,
            sink: Some(sink),
        }
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            self.bytes += n;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountingBody {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take()
            && self.bytes > 0
        {
            sink.add(self.bytes);
        }
    }
}

/// A backend's response body that holds the backend's activity guard until it ends.
pub(crate) struct GuardedBody {
    inner: Incoming,
    _guard: Option<ActivityGuard>,
    /// The upstream connection, returned to the pool when the body has been read to its end.
    checkout: Option<crate::pool::Checkout>,
}

impl GuardedBody {
    pub(crate) fn new(
        inner: Incoming,
        guard: Option<ActivityGuard>,
        checkout: Option<crate::pool::Checkout>,
    ) -> Self {
        GuardedBody {
            inner,
            _guard: guard,
            checkout,
        }
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        // hyper stops polling a body whose length is reached, so the end is often seen here:
        // a body read to its end returns its connection; one dropped half-way closes it.
        if let Some(c) = self.checkout.take()
            && self.inner.is_end_stream()
        {
            c.release();
        }
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if let Some(guard) = self._guard.as_mut() {
                        guard.add_sent(n);
                    }
                }
            }
            // Release the guard and the connection as soon as the body ends, not when hyper
            // drops the body later.
            Poll::Ready(None) => {
                self._guard = None;
                if let Some(c) = self.checkout.take() {
                    c.release();
                }
            }
            _ => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client side of an upgraded connection: counts the bytes read from the client and
/// written to it (plain fields: one task owns it).
pub(crate) struct CountingIo<T> {
    inner: T,
    pub(crate) read: u64,
    pub(crate) written: u64,
}

impl<T> CountingIo<T> {
    pub(crate) fn new(inner: T) -> Self {
        CountingIo {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            self.read += (buf.filled().len() - before) as u64;
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = poll {
            self.written += n as u64;
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
];

/// Removes hop-by-hop headers (and those the `Connection` header names). When `upgrade` is
/// set, keeps `Connection: upgrade` and `Upgrade` so the backend sees the upgrade request.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Names listed in Connection are hop-by-hop too.
    if let Some(conn) = headers.get(header::CONNECTION)
        && let Ok(conn) = conn.to_str()
        && conn.contains(',')
    {
        let listed: Vec<HeaderName> = conn
            .split(',')
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .filter(|n| n != header::UPGRADE)
            .collect();
        for n in listed {
            headers.remove(n);
        }
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove(header::TRANSFER_ENCODING);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Removes every inbound `x-hangar-*` header: only the proxy may set them.
pub(crate) fn strip_hangar_headers(headers: &mut HeaderMap) {
    let has_any = headers.keys().any(|k| k.as_str().starts_with("x-hangar-"));
    if !has_any {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-hangar-"))
        .cloned()
        .collect();
    for n in names {
        headers.remove(n);
    }
}

/// True if the request asks to switch protocols (WebSocket and the like).
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_hangar_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-hangar-user", HeaderValue::from_static("mallory"));
        h.insert("x-hangar-backend-id", HeaderValue::from_static("b9"));
        h.insert("x-other", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        strip_hangar_headers(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("x-hangar-user").is_none());
        assert!(h.get("x-hangar-backend-id").is_none());
        assert_eq!(h.get("x-other").unwrap(), "kept");
    }

    #[test]
    fn upgrade_detection_keeps_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        let mut plain = HeaderMap::new();
        plain.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!is_upgrade(&plain));
    }
}
