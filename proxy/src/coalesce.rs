//! Fewer, larger writes on HTTP/2 client connections.
//!
//! hyper's HTTP/2 server runs every stream on a task of its own; a stream task that answers
//! hands its frames to the connection and wakes the connection's task, which tokio runs next
//! (its LIFO slot), and that task writes what it has at once. Under load that is one `sendto`
//! per response, although the responses of other streams on the same connection are ready on
//! tasks that the same wake-up of the I/O driver queued: measured with 8 connections × 8
//! streams, 0.86 client-side writes per request where haproxy makes 0.13 (`docs/benchmarks.md`).
//!
//! [`Coalesce`] sits between hyper and the socket: the first write after a flush yields once
//! (the task wakes itself and returns `Pending`, which tokio treats as a yield: to the back of
//! the run queue), so the stream tasks already queued run first and their frames join the
//! same write. It costs one extra poll of the connection task per write, and never more than
//! one scheduler round of latency: a yielded task is polled again in the same pass of the
//! run queue. Everything else is passed through.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection whose writes wait one scheduler round after each flush (see the module).
pub(crate) struct Coalesce<S> {
    inner: S,
    /// Whether this burst of writes has yielded already; reset by a flush.
    yielded: bool,
}

impl<S> Coalesce<S> {
    pub(crate) fn new(inner: S) -> Self {
        Coalesce {
            inner,
            yielded: false,
        }
    }

    /// `Pending` (having woken the task) the first time in a burst of writes.
    fn yield_once(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.yield_once(cx));
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.yield_once(cx));
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        if poll.is_ready() {
            self.yielded = false;
        }
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The first write of a burst yields once, then goes through; a flush starts a new burst.
    #[tokio::test]
    async fn the_first_write_after_a_flush_yields_once_and_nothing_is_lost() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Coalesce::new(a);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(Pin::new(&mut w).poll_write(&mut cx, b"one").is_pending());
        assert!(matches!(
            Pin::new(&mut w).poll_write(&mut cx, b"one"),
            Poll::Ready(Ok(3))
        ));
        assert!(matches!(
            Pin::new(&mut w).poll_write(&mut cx, b"two"),
            Poll::Ready(Ok(3))
        ));
        assert!(Pin::new(&mut w).poll_flush(&mut cx).is_ready());
        assert!(Pin::new(&mut w).poll_write(&mut cx, b"3").is_pending());
        // Through the async helpers the yield is invisible.
        w.write_all(b"3").await.unwrap();
        w.flush().await.unwrap();
        let mut got = [0; 7];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"onetwo3");
    }
}
