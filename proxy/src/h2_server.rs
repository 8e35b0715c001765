//! The client side of HTTP/2 (h2c with prior knowledge, and `h2` by ALPN), served on the `h2`
//! crate directly: one task per client connection drives the connection and all of its
//! streams.
//!
//! hyper's HTTP/2 server ran every stream on a task of its own: a spawn per request, and a
//! wake-up of the connection's task (often on another pass of the scheduler) each time a
//! stream had frames to send, so the responses of one connection left in as many writes as
//! there were scheduler passes. Here the connection's task holds its streams in a
//! [`FuturesUnordered`]: a stream whose backend answered is polled on the connection's own
//! task, and the frames of every stream answered in one pass leave in one write when the
//! connection is driven next, in the same poll.
//!
//! A stream runs the request path ([`crate::service::respond`]) while watching for the
//! client's `RST_STREAM`, then sends the response head and pipes the body ([`pipe`]): it asks
//! the body for its next frame only once the stream has room for it (the client's
//! flow-control window and the connection's send buffer). A client that grants no window for
//! a stream, or stops reading its socket, would leave the stream waiting for room for ever,
//! holding its backend connection; so a stream that has waited on its client for
//! `client_write_timeout` without getting any room is reset (`CANCEL`) and its body dropped
//! (which closes the backend connection: it is never pooled mid-body). A stream waiting on its
//! backend is not timed by that limit (the backend's body and SSE timeouts bound it).
//!
//! The connection sends a PING every [`KEEP_ALIVE_INTERVAL`] and is closed if the answer
//! does not come within [`KEEP_ALIVE_TIMEOUT`]: that ends a client that stopped reading its
//! socket while no stream is open. On shutdown the connection sends GOAWAY, finishes its open
//! streams and closes.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use h2::server::SendResponse;
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::header::{CONTENT_LENGTH, DATE};
use http::{HeaderMap, HeaderValue, Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::forward::ProxyBody;
use crate::service::{self, ClientInfo, ClientIo, Shared};

/// How often an HTTP/2 connection is asked for a PING answer.
pub(crate) const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is closed.
pub(crate) const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Flow-control windows the proxy grants its clients: larger than the protocol's 64 KB
/// default, which would hold a request body to one window per round trip.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Response bytes buffered per stream beyond what the client's window lets out.
const SEND_BUFFER: usize = 400 * 1024;
/// Streams a client may have open at once.
const MAX_STREAMS: u32 = 200;
/// Streams the proxy may reset because of the client's errors before it closes the
/// connection (a client that makes the proxy reset stream after stream).
const MAX_LOCAL_RESETS: usize = 1024;

/// How HTTP/2 connections are served: made once per listener.
#[derive(Clone, Debug)]
pub(crate) struct H2Settings {
    builder: h2::server::Builder,
    client_write_timeout: Duration,
    keep_alive_interval: Duration,
    keep_alive_timeout: Duration,
}

impl H2Settings {
    pub(crate) fn new(cfg: &crate::config::ProxyConfig) -> Self {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(cfg.max_header_bytes.try_into().unwrap_or(u32::MAX))
            .max_concurrent_streams(MAX_STREAMS)
            .max_send_buffer_size(SEND_BUFFER)
            .max_local_error_reset_streams(Some(MAX_LOCAL_RESETS));
        H2Settings {
            builder,
            client_write_timeout: cfg.client_write_timeout,
            keep_alive_interval: KEEP_ALIVE_INTERVAL,
            keep_alive_timeout: KEEP_ALIVE_TIMEOUT,
        }
    }

    #[cfg(test)]
    pub(crate) fn with_keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keep_alive_interval = interval;
        self.keep_alive_timeout = timeout;
        self
    }
}

/// Serves one HTTP/2 client connection (whose preface `io` still holds) until it closes.
pub(crate) async fn serve<I>(
    settings: &H2Settings,
    shared: Arc<Shared>,
    io: I,
    client: Arc<ClientInfo>,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let limit = settings.client_write_timeout;
    // Each stream borrows what the connection holds: no reference count moves per request.
    let (shared, client) = (&shared, &client);
    serve_with(settings, io, shutdown, move |req, reply| {
        stream(shared, client, req, reply, limit)
    })
    .await
}

/// Serves a connection, answering each stream with the future `answer` makes for it.
pub(crate) async fn serve_with<I, F, A>(
    settings: &H2Settings,
    io: I,
    shutdown: CancellationToken,
    answer: A,
) where
    I: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = ()>,
    A: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> F + Unpin,
{
    let mut conn = match settings.builder.handshake::<_, Bytes>(io).await {
        Ok(c) => c,
        Err(e) => {
            tracing::trace!(error = %e, "HTTP/2 handshake failed");
            return;
        }
    };
    let keep_alive = conn.ping_pong().map(|pp| KeepAlive {
        pp,
        interval: settings.keep_alive_interval,
        timeout: settings.keep_alive_timeout,
        timer: Box::pin(tokio::time::sleep(settings.keep_alive_interval)),
        awaiting_pong: false,
    });
    let shutdown = pin!(shutdown.cancelled_owned());
    let driver = Driver {
        conn,
        streams: FuturesUnordered::new(),
        answer,
        keep_alive,
        shutdown: Some(shutdown),
    };
    if let Err(e) = driver.await {
        tracing::trace!(error = %e, "HTTP/2 client connection ended with an error");
    }
}

/// A connection and its streams, polled together (see the module).
struct Driver<'a, I, F, A> {
    conn: h2::server::Connection<I, Bytes>,
    streams: FuturesUnordered<F>,
    answer: A,
    keep_alive: Option<KeepAlive>,
    /// Until shutdown begins.
    shutdown: Option<Pin<&'a mut tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<I, F, A> Future for Driver<'_, I, F, A>
where
    I: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = ()>,
    A: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> F + Unpin,
{
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // `FuturesUnordered` pins the streams' futures itself.
        let this = Pin::into_inner(self);
        if let Some(s) = this.shutdown.as_mut()
            && s.as_mut().poll(cx).is_ready()
        {
            this.shutdown = None;
            // GOAWAY: no new streams; the open ones finish, then the connection closes.
            this.conn.graceful_shutdown();
        }
        if let Some(ka) = this.keep_alive.as_mut()
            && ka.poll_expired(cx)
        {
            tracing::debug!("HTTP/2 client did not answer a PING in time; closing");
            this.conn.abrupt_shutdown(Reason::NO_ERROR);
            this.keep_alive = None;
        }
        loop {
            // The streams first: what they send goes out when the connection is driven
            // below, in this same poll.
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            match ready!(this.conn.poll_accept(cx)) {
                Some(Ok((req, reply))) => this.streams.push((this.answer)(req, reply)),
                Some(Err(e)) => return Poll::Ready(Err(e)),
                // Closed, with every stream finished or reset.
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// The connection's PINGs (see the module).
struct KeepAlive {
    pp: PingPong,
    interval: Duration,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    awaiting_pong: bool,
}

impl KeepAlive {
    /// Whether a PING went unanswered for the timeout.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.awaiting_pong {
                match self.pp.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.awaiting_pong = false;
                        self.timer.as_mut().reset(Instant::now() + self.interval);
                    }
                    // The connection is closing: its own error ends it.
                    Poll::Ready(Err(_)) => return false,
                    Poll::Pending => {}
                }
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.awaiting_pong {
                return true;
            }
            if self.pp.send_ping(Ping::opaque()).is_err() {
                return false;
            }
            self.awaiting_pong = true;
            self.timer.as_mut().reset(Instant::now() + self.timeout);
        }
    }
}

/// Answers one stream: the request path, then the response (see the module).
async fn stream(
    shared: &Arc<Shared>,
    client: &ClientInfo,
    req: Request<RecvStream>,
    mut reply: SendResponse<Bytes>,
    limit: Duration,
) {
    let (parts, recv) = req.into_parts();
    let body = RequestBody::new(recv, &parts.headers);
    let resp = {
        let mut path = pin!(service::respond(shared, &parts, body, client, || {
            // A request over HTTP/2 cannot carry `connection: upgrade` (h2 refuses the
            // field), so this is not called; extended CONNECT is not enabled.
            Box::pin(async { Err::<Box<dyn ClientIo>, _>("HTTP/2 cannot switch protocols".into()) })
        }));
        let answered = poll_fn(|cx| {
            if let Poll::Ready(resp) = path.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            // The client may give up on the stream while the backend works.
            match reply.poll_reset(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match answered {
            Some(resp) => resp,
            None => return,
        }
    };
    let (head, body) = resp.into_h2();
    if body.is_end_stream() {
        let _ = reply.send_response(head, true);
        return;
    }
    let Ok(tx) = reply.send_response(head, false) else {
        return;
    };
    pipe(body, tx, limit).await;
}

/// Sends `body` on `tx`, a frame at a time as the stream has room (see the module); gives up
/// (resetting the stream) when the client takes nothing for `limit`, or resets it itself.
pub(crate) async fn pipe<B>(mut body: B, mut tx: SendStream<Bytes>, limit: Duration)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut stall = Stall::new(limit);
    poll_fn(|cx| {
        loop {
            // Room for the next frame first: the body is read no faster than the client
            // takes it.
            tx.reserve_capacity(1);
            if tx.capacity() == 0 {
                loop {
                    match tx.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(0))) => continue,
                        Poll::Ready(Some(Ok(_))) => break,
                        // Reset by the client, or the connection is gone.
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                        Poll::Pending => {
                            if stall.poll_expired(cx) {
                                tracing::debug!(
                                    ?limit,
                                    "HTTP/2 client accepted no response bytes in time; stream reset"
                                );
                                tx.send_reset(Reason::CANCEL);
                                return Poll::Ready(());
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
            stall.progress();
            match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let end = body.is_end_stream();
                        if tx.send_data(data, end).is_err() || end {
                            return Poll::Ready(());
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = tx.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    // The backend broke off: the client must not take a truncated body for a
                    // whole one.
                    tracing::debug!(error = %e, "response body failed; HTTP/2 stream reset");
                    tx.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
                Poll::Ready(None) => {
                    let _ = tx.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Poll::Pending => {
                    // Waiting on the backend; the client may reset the stream meanwhile.
                    return match tx.poll_reset(cx) {
                        Poll::Ready(_) => Poll::Ready(()),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    })
    .await
}

/// Times a stream's wait on its client: from the first `Pending` after progress.
struct Stall {
    limit: Duration,
    /// Made the first time the stream waits on its client (most never do).
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer counts down the current wait.
    armed: bool,
}

impl Stall {
    fn new(limit: Duration) -> Self {
        Stall {
            limit,
            timer: None,
            armed: false,
        }
    }

    /// The client took something: the next wait counts from its own start.
    fn progress(&mut self) {
        self.armed = false;
    }

    /// Whether the current wait has lasted the limit (registers the timer if not).
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if !self.armed {
            timer.as_mut().reset(Instant::now() + limit);
            self.armed = true;
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

/// A request body as it arrives on an HTTP/2 stream: the window it takes is given back to
/// the client as each piece is handed on.
pub(crate) struct RequestBody {
    recv: RecvStream,
    /// The `content-length` the request announced (h2 checks that the DATA frames match it).
    length: Option<u64>,
    data_done: bool,
}

impl RequestBody {
    fn new(recv: RecvStream, headers: &HeaderMap) -> Self {
        let length = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        RequestBody {
            recv,
            length,
            data_done: false,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = this.length.as_mut() {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl crate::head::ProxyResponse {
    /// The response as an HTTP/2 head and body: the values share the block of header lines
    /// (one allocation for the whole block, not one copy per value), a `date` is added if the
    /// response has none, and a body of known length gets its `content-length`.
    pub(crate) fn into_h2(self) -> (Response<()>, ProxyBody) {
        let has_date = self.has_date;
        let mut resp = self.into_http();
        if !has_date {
            resp.headers_mut()
                .insert(DATE, crate::head::with_date(HeaderValue::clone));
        }
        if !resp.body().is_end_stream()
            && let Some(n) = resp.body().size_hint().exact()
        {
            resp.headers_mut()
                .entry(CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(n));
        }
        let (parts, body) = resp.into_parts();
        (Response::from_parts(parts, ()), body)
    }
}

#[cfg(test)]
#[path = "h2_server_tests.rs"]
mod tests;
