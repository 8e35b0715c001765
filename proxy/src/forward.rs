//! Forwarding to backends (the upstream client itself is [`crate::pool`]): header
//! hygiene (hop-by-hop and `x-hangar-*` stripping), the request body wrapper that counts the
//! bytes a backend receives, and the response body wrapper that keeps a backend marked busy
//! until the response has been fully sent (and counts the bytes it sends).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::activity::{ActivityGuard, ReceivedBytes};
use crate::head::{Known, RequestHead};
use crate::pool::UpstreamBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the proxy sends: a backend's streamed body, or a small body the
/// proxy wrote itself (errors).
pub(crate) type ProxyBody = Either<GuardedBody, Full<Bytes>>;

/// A request body on its way to a backend: counts its bytes, adding them to the backend's
/// traffic once when it ends (not per frame), fails with [`BodyStalled`] if the client
/// sends nothing for `idle` while the body is incomplete, and with [`BodyTooLarge`] once it
/// has grown past `max` bytes (a chunked body; a longer `content-length` is refused before).
pub(crate) struct CountingBody<B> {
    inner: B,
    bytes: u64,
    max: u64,
    sink: Option<ReceivedBytes>,
    idle: Duration,
    /// Made the first time the body has to wait (bodiless requests never need one), armed
    /// while waiting.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

/// The client stopped sending a request body.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body bytes for {0:?}")]
pub(crate) struct BodyStalled(pub(crate) Duration);

/// A request body grew past the largest accepted.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than {0} bytes")]
pub(crate) struct BodyTooLarge(pub(crate) u64);

impl<B> CountingBody<B> {
    pub(crate) fn new(inner: B, sink: ReceivedBytes, idle: Duration, max: u64) -> Self {
        CountingBody {
            inner,
            bytes: 0,
            max,
            sink: Some(sink),
            idle,
            timer: None,
            armed: false,
        }
    }
}

impl<B> Body for CountingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                if let Some(Ok(f)) = &frame
                    && let Some(data) = f.data_ref()
                {
                    this.bytes += data.len() as u64;
                    if this.bytes > this.max {
                        return Poll::Ready(Some(Err(BodyTooLarge(this.max).into())));
                    }
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.armed {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)))
                        .as_mut()
                        .reset(deadline);
                    this.armed = true;
                }
                match this.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => Poll::Ready(Some(Err(BodyStalled(this.idle).into()))),
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for CountingBody<B> {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take()
            && self.bytes > 0
        {
            sink.add(self.bytes);
        }
    }
}

/// A backend's response body that holds the backend's activity guard until it ends and counts
/// the bytes sent to the client. The upstream connection goes back to the pool from inside
/// [`UpstreamBody`] when the body has been read to its end.
pub(crate) struct GuardedBody {
    inner: UpstreamBody,
    guard: Option<ActivityGuard>,
}

impl GuardedBody {
    pub(crate) fn new(inner: UpstreamBody, guard: Option<ActivityGuard>) -> Self {
        GuardedBody { inner, guard }
    }

    /// [`UpstreamBody::take_buffered`]: the bytes count as sent and, the body having ended,
    /// the guard is released, as when the last piece is polled.
    pub(crate) fn take_buffered(&mut self, out: &mut Vec<u8>, max: usize) -> Option<usize> {
        let n = self.inner.take_buffered(out, max)?;
        if let Some(mut guard) = self.guard.take() {
            guard.add_sent(n as u64);
        }
        Some(n)
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Some(guard) = self.guard.as_mut()
                {
                    guard.add_sent(data.len() as u64);
                }
            }
            // Release the guard as soon as the body ends, not when hyper drops the body later.
            Poll::Ready(None) => self.guard = None,
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
/// written to it. The counters are shared with the copy task's idle check, which reads them
/// while the copy holds the connection (one task: relaxed loads and stores, no contention).
pub(crate) struct CountingIo<'c, T> {
    inner: T,
    read: &'c AtomicU64,
    written: &'c AtomicU64,
}

impl<'c, T> CountingIo<'c, T> {
    pub(crate) fn new(inner: T, read: &'c AtomicU64, written: &'c AtomicU64) -> Self {
        CountingIo {
            inner,
            read,
            written,
        }
    }
}

/// Adds `n` to a counter only its own task writes.
fn bump(counter: &AtomicU64, n: usize) {
    counter.store(
        counter.load(Ordering::Relaxed) + n as u64,
        Ordering::Relaxed,
    );
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            bump(self.read, buf.filled().len() - before);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = poll {
            bump(self.written, n);
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

/// How many times per idle timeout an upgraded connection's counters are looked at.
const IDLE_CHECKS: u32 = 4;

/// Sets `timer` for a wait that ends at `deadline`, moving it only when it would fire later or
/// has fired: moving a timer is dearer than this check, and a busy connection then moves its
/// timer once per limit rather than once per request. A timer left set sooner fires early;
/// [`deadline_passed`] tells that apart and moves it on.
pub(crate) fn arm(timer: Pin<&mut Sleep>, deadline: tokio::time::Instant) {
    if timer.deadline() > deadline || timer.is_elapsed() {
        timer.reset(deadline);
    }
}

/// Polls a connection's timer, or its shutdown signal, only when a poll can tell something
/// new. Each stays registered with the waker it was last polled with until it fires, so a task
/// that waits on it again and again (an idle connection, once per request) need not poll it
/// each time: that cost two polls of tokio's bookkeeping per request (a waker comparison
/// under a lock for the shutdown signal, a budget and waker check for the timer). It is
/// polled through when the waker differs from the one noted, when the timer was moved to
/// another deadline since (a timer that fired has let go of its waker, and moving it does not
/// register one), and when it may have fired. (Not for a pooled backend connection's timer:
/// the connection moves between client tasks, and the waker differs nearly every time.)
#[derive(Default)]
pub(crate) struct Watch {
    /// The waker of the last poll that left it pending, and the timer's deadline then.
    seen: Option<(Waker, Option<tokio::time::Instant>)>,
}

impl Watch {
    /// Whether the last poll that left it pending used `cx`'s waker, for `deadline`.
    fn current(&self, cx: &Context<'_>, deadline: Option<tokio::time::Instant>) -> bool {
        self.seen
            .as_ref()
            .is_some_and(|(w, d)| *d == deadline && w.will_wake(cx.waker()))
    }

    /// Notes a poll that left it pending.
    fn note(&mut self, cx: &Context<'_>, deadline: Option<tokio::time::Instant>) {
        match &mut self.seen {
            Some((w, d)) if w.will_wake(cx.waker()) => *d = deadline,
            _ => self.seen = Some((cx.waker().clone(), deadline)),
        }
    }

    /// [`Sleep`]'s poll, skipped while it is registered with this waker for this deadline
    /// and has not fired.
    pub(crate) fn poll_timer(
        &mut self,
        mut timer: Pin<&mut Sleep>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let deadline = Some(timer.deadline());
        if self.current(cx, deadline) && !timer.is_elapsed() {
            return Poll::Pending;
        }
        let polled = timer.as_mut().poll(cx);
        match polled {
            Poll::Pending => self.note(cx, deadline),
            Poll::Ready(()) => self.seen = None,
        }
        polled
    }

    /// The shutdown signal's poll, skipped while it is registered with this waker and has not
    /// `fired` (a flag set before the token is cancelled: the token's own check takes a lock).
    pub(crate) fn poll_cancelled(
        &mut self,
        cancelled: Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
        fired: bool,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        if self.current(cx, None) && !fired {
            return Poll::Pending;
        }
        let polled = cancelled.poll(cx);
        if polled.is_pending() {
            self.note(cx, None);
        }
        polled
    }
}

/// For a `timer` set by [`arm`] that has fired: whether the wait that ends at `deadline` is
/// over; if not (it fired early), the timer is moved on to `deadline`.
pub(crate) fn deadline_passed(timer: Pin<&mut Sleep>, deadline: tokio::time::Instant) -> bool {
    if tokio::time::Instant::now() >= deadline {
        return true;
    }
    timer.reset(deadline);
    false
}

/// Runs `copy`, an upgraded connection's two directions, until it ends (`Some`) or `moved`
/// (the bytes moved either way so far) stays the same for `idle` (`None`; dropping the copy
/// closes both sides). The counters are looked at every quarter of `idle` on one timer, not on
/// every read or write, so an idle connection is closed between `idle` and 1¼ `idle` after its
/// last byte, and a busy one costs a timer reset every quarter of `idle`.
pub(crate) async fn until_idle<F: Future>(
    copy: F,
    idle: Duration,
    moved: impl Fn() -> u64,
) -> Option<F::Output> {
    let tick = (idle / IDLE_CHECKS).max(Duration::from_millis(1));
    let timer = tokio::time::sleep(tick);
    tokio::pin!(timer, copy);
    let mut seen = moved();
    let mut quiet = Duration::ZERO;
    loop {
        tokio::select! {
            biased;
            done = &mut copy => return Some(done),
            () = &mut timer => {
                let now = moved();
                if now == seen {
                    quiet += tick;
                    if quiet >= idle {
                        return None;
                    }
                } else {
                    seen = now;
                    quiet = Duration::ZERO;
                }
                // From now, not from the deadline: a late wake-up never counts as quiet time.
                timer.as_mut().reset(tokio::time::Instant::now() + tick);
            }
        }
    }
}

/// A connection some of whose bytes were read already: those come first, then the stream's
/// (a backend's socket after its `101`, a client's after its upgrade request or HTTP/2
/// preface).
pub(crate) struct Prefixed<S> {
    prefix: Bytes,
    stream: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: impl Into<Bytes>, stream: S) -> Self {
        Prefixed {
            prefix: prefix.into(),
            stream,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // An emptied `Bytes` still holds the whole buffer the prefix was read into (an
                // HTTP/1.1 read buffer of 8 KiB, for a connection that turned out to be HTTP/2):
                // let it go, or every such connection keeps it for its lifetime.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    // Passed through: HTTP/2 writes its frame buffer and the DATA payloads chained to it in
    // one `writev` when the socket takes vectors, one `write` per piece otherwise.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Whether field `name` (lower case) describes one hop only (RFC 9110 §7.6.1), not counting
/// the names a `Connection` field lists.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"proxy-authenticate"
            | b"proxy-authorization"
            | b"te"
            | b"trailer"
            | b"transfer-encoding"
    )
}

/// True if the request asks to switch protocols (WebSocket and the like).
pub(crate) fn is_upgrade(head: &impl RequestHead) -> bool {
    head.known(Known::Upgrade).is_some()
        && crate::h1::ConnectionOptions::parse(head.known_all(Known::Connection)).upgrade
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that `wait` has not ended a second later (the clock is paused).
    async fn still_waiting_after_a_second(wait: impl Future<Output = ()>) {
        tokio::select! {
            biased;
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = wait => panic!("the wait ended early"),
        }
    }

    /// Waits on `timer` through `watch`, as an idle connection does.
    async fn watched(watch: &mut Watch, timer: Pin<&mut Sleep>) {
        let mut timer = timer;
        std::future::poll_fn(|cx| watch.poll_timer(timer.as_mut(), cx)).await;
    }

    /// A timer waited on through a `Watch` fires when it should however it was moved
    /// between the waits: kept, moved sooner, moved after it fired (it then has no waker, and a
    /// wait that skipped the poll would never end), or waited on from another task.
    #[tokio::test(start_paused = true)]
    async fn a_watched_timer_fires_at_its_deadline_however_it_was_moved() {
        use tokio::time::{Instant, sleep, timeout};
        let t0 = Instant::now();
        let timer = tokio::time::sleep(Duration::from_secs(100));
        tokio::pin!(timer);
        let mut watch = Watch::default();
        // Many waits that end before the timer (the requests of a busy connection): the
        // timer is polled once and then only looked at.
        for _ in 0..5 {
            still_waiting_after_a_second(watched(&mut watch, timer.as_mut())).await;
        }
        // Moved sooner while registered: fires then.
        arm(timer.as_mut(), t0 + Duration::from_secs(20));
        timeout(Duration::from_secs(60), watched(&mut watch, timer.as_mut()))
            .await
            .expect("a timer moved sooner fires");
        assert_eq!(Instant::now(), t0 + Duration::from_secs(20));
        // Registered through the watch, fired while nobody waited on it (a connection busy
        // with a request), then moved on: its waker went with the firing, so the next wait
        // must register it again.
        arm(timer.as_mut(), Instant::now() + Duration::from_secs(2));
        still_waiting_after_a_second(watched(&mut watch, timer.as_mut())).await;
        sleep(Duration::from_secs(4)).await;
        assert!(timer.is_elapsed());
        timer
            .as_mut()
            .reset(Instant::now() + Duration::from_secs(7));
        for _ in 0..3 {
            still_waiting_after_a_second(watched(&mut watch, timer.as_mut())).await;
        }
        timeout(Duration::from_secs(60), watched(&mut watch, timer.as_mut()))
            .await
            .expect("a timer moved after it fired fires again");
        assert_eq!(Instant::now(), t0 + Duration::from_secs(32));
        // Polled from one task, then waited on from another (a pooled connection changing
        // hands): the other task is woken.
        let mut timer = Box::pin(tokio::time::sleep(Duration::from_secs(5)));
        let mut watch = Watch::default();
        let start = Instant::now();
        still_waiting_after_a_second(watched(&mut watch, timer.as_mut())).await;
        let moved = tokio::spawn(async move {
            timeout(Duration::from_secs(60), watched(&mut watch, timer.as_mut())).await
        });
        moved.await.unwrap().expect("the other task is woken");
        assert_eq!(Instant::now(), start + Duration::from_secs(5));
    }

    /// The shutdown signal waited on through a `Watch` ends the wait when the token is
    /// cancelled, though it is polled only once.
    #[tokio::test(start_paused = true)]
    async fn a_watched_shutdown_ends_the_wait_when_cancelled() {
        use tokio::time::{Instant, sleep, timeout};
        let token = tokio_util::sync::CancellationToken::new();
        let cancelled = token.cancelled();
        tokio::pin!(cancelled);
        let mut watch = Watch::default();
        for _ in 0..5 {
            still_waiting_after_a_second(std::future::poll_fn(|cx| {
                watch.poll_cancelled(cancelled.as_mut(), token.is_cancelled(), cx)
            }))
            .await;
        }
        let t0 = Instant::now();
        let canceller = token.clone();
        tokio::spawn(async move {
            sleep(Duration::from_secs(3)).await;
            canceller.cancel();
        });
        timeout(
            Duration::from_secs(60),
            std::future::poll_fn(|cx| {
                watch.poll_cancelled(cancelled.as_mut(), token.is_cancelled(), cx)
            }),
        )
        .await
        .expect("the cancellation ends the wait");
        assert_eq!(Instant::now(), t0 + Duration::from_secs(3));
    }

    #[test]
    fn upgrades_need_both_upgrade_and_connection_upgrade() {
        let head = |r: http::request::Builder| r.body(()).unwrap().into_parts().0;
        let ws = head(
            http::Request::get("/")
                .header("connection", "keep-alive, Upgrade")
                .header("upgrade", "websocket"),
        );
        assert!(is_upgrade(&ws));
        assert!(!is_upgrade(&head(
            http::Request::get("/").header("upgrade", "h2c")
        )));
        assert!(is_hop_by_hop(b"te") && !is_hop_by_hop(b"x-te"));
    }

    /// A prefix read to its end no longer holds the buffer it came from (for an HTTP/2
    /// connection, the HTTP/1.1 read buffer its preface was read into), while the stream's
    /// bytes still follow it.
    #[tokio::test]
    async fn a_prefix_read_to_its_end_lets_its_buffer_go() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buffer = bytes::BytesMut::with_capacity(8192);
        buffer.extend_from_slice(b"PRI * HTTP/2.0");
        let prefix = buffer.freeze();
        let watch = prefix.clone();
        let (client, mut server_side) = tokio::io::duplex(64);
        let mut io = Prefixed::new(prefix, client);
        server_side.write_all(b" then the socket").await.unwrap();
        drop(server_side);
        let mut got = [0u8; 10];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"PRI * HTTP");
        // Part of the prefix is left: the buffer is still shared.
        let watch = watch
            .try_into_mut()
            .expect_err("the prefix is still being read");
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"/2.0 then the socket");
        assert!(
            watch.try_into_mut().is_ok(),
            "the emptied prefix still holds its buffer"
        );
    }
}
