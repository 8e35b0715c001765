//! HTTP/2 streams whose client stops taking the response: hyper's HTTP/2 server runs every
//! stream on a task of its own, spawned through the executor the server is built with
//! ([`StreamExec`]), and asks the response body for its next frame only once the previous one
//! could be handed to the connection, which takes it only while the client's flow-control
//! window and the connection's send buffer leave room. A client that grants no window
//! (`WINDOW_UPDATE`) for a stream, or stops reading its socket, would leave the stream waiting
//! for capacity for ever, holding its task and the backend connection its body reads from;
//! flow control alone bounds the bytes, not the time.
//!
//! So every stream task is watched: the response body ([`WatchedBody`]) notes in a task-local
//! ([`PROGRESS`]) whether it last handed out a frame (the stream now waits on the client) or
//! waited on its backend (bounded by the backend's own body or SSE timeout), and each time it
//! is polled. When the stream's task has waited on the client without the body being polled
//! again for `client_write_timeout`, the task ends: dropping hyper's stream future drops the
//! body (which closes its backend connection, never pooled mid-body) and the stream's send
//! handle (h2 resets the stream with `CANCEL`). This is HTTP/1.1's `client_write_timeout`
//! (a write that makes no progress) at the granularity of a body frame (what one read from
//! the backend brought, some KB), so a client that reads slowly but steadily keeps its stream,
//! and so do server-sent events while the client reads them.
//!
//! Cost on the request path: a task-local scope around each poll of a stream's task and a
//! task-local update per body frame; the timer is boxed only for a stream that had to wait
//! on its client, and moved forward only when it waits again after progress. A connection
//! whose socket is not read at all also answers no PING: hyper's keep-alive (configured by
//! the listener) closes it.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::Response;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

tokio::task_local! {
    /// What the response body of the stream this task serves last did; set only while a
    /// stream task spawned by [`StreamExec`] is polled.
    static PROGRESS: Cell<Progress>;
}

/// Where a stream's response stands, as its body reports it.
#[derive(Clone, Copy, Default, Debug)]
struct Progress {
    /// The response waits on the client: the body handed out a frame (or the head was handed
    /// to hyper) and has not been asked for more since.
    owed: bool,
    /// How many times the body has been polled (wrapping): a change between two polls of the
    /// task is progress.
    polls: u32,
}

/// The executor of hyper's HTTP/2 server: spawns every stream task (and HTTP/2 upgrade
/// task) with a watch that ends it when its client takes no response bytes for `limit`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamExec {
    limit: Duration,
}

impl StreamExec {
    pub(crate) fn new(limit: Duration) -> Self {
        StreamExec { limit }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        // Like hyper-util's `TokioExecutor`: a stream task belongs to its connection, which
        // ends it by resetting or closing the stream (and so does the watch).
        tokio::spawn(Watched {
            stream: fut,
            watch: Watch::new(self.limit),
        });
    }
}

pin_project_lite::pin_project! {
    /// A stream task under its watch. (A struct rather than an async block, which would hold
    /// the stream's future twice: as the block's capture and pinned in its body.)
    struct Watched<F> {
        #[pin]
        stream: F,
        watch: Watch,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        this.watch.poll(this.stream, cx)
    }
}

/// Watches one stream task (see the module's documentation).
struct Watch {
    limit: Duration,
    progress: Progress,
    /// `progress.polls` when the timer was last moved forward.
    seen: u32,
    /// Made the first time the stream waits on its client (most never do).
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer counts down the current wait on the client.
    armed: bool,
}

impl Watch {
    fn new(limit: Duration) -> Self {
        Watch {
            limit,
            progress: Progress::default(),
            seen: 0,
            timer: None,
            armed: false,
        }
    }

    /// Polls the stream task; ready when it has finished or has been given up on (the caller
    /// then drops it).
    fn poll<F: Future<Output = ()>>(
        &mut self,
        stream: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let (poll, progress) = PROGRESS.sync_scope(Cell::new(self.progress), || {
            let poll = stream.poll(cx);
            (poll, PROGRESS.with(Cell::get))
        });
        self.progress = progress;
        if poll.is_ready() {
            return Poll::Ready(());
        }
        if !progress.owed {
            // Waiting on the backend (or on the request): not the client's doing.
            self.armed = false;
            return Poll::Pending;
        }
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if !self.armed || progress.polls != self.seen {
            // A new wait on the client, or progress since the last one: count from now.
            // (Moving a timer's deadline later is cheap in tokio: no re-registration.)
            timer.as_mut().reset(Instant::now() + limit);
            self.seen = progress.polls;
            self.armed = true;
        }
        ready!(timer.as_mut().poll(cx));
        tracing::debug!(
            limit = ?self.limit,
            "HTTP/2 client accepted no response bytes in time; stream reset"
        );
        Poll::Ready(())
    }
}

/// Hands a response to hyper's HTTP/2 server: from now it waits on the client, and its body
/// reports its progress to the stream's watch.
pub(crate) fn hand_over<B>(resp: Response<B>) -> Response<WatchedBody<B>> {
    let _ = PROGRESS.try_with(|p| {
        p.set(Progress {
            owed: true,
            ..p.get()
        })
    });
    resp.map(|inner| WatchedBody { inner })
}

/// A response body on an HTTP/2 stream: tells the stream's watch, each time it is polled,
/// whether the stream now waits on the client.
pub(crate) struct WatchedBody<B> {
    inner: B,
}

impl<B: Body + Unpin> Body for WatchedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        let owed = matches!(poll, Poll::Ready(Some(Ok(_))));
        // Outside a watched task (never, in the proxy) there is nothing to tell.
        let _ = PROGRESS.try_with(|p| {
            let polls = p.get().polls.wrapping_add(1);
            p.set(Progress { owed, polls });
        });
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[path = "h2_stream_tests.rs"]
mod tests;
