//! The upstream side: an HTTP/1.1 client written for the proxy path, with keep-alive
//! connections pooled per backend address.
//!
//! A request is written and its response head read by the request's own future, on the
//! client connection's task: no connection task, no channel between the two, no second
//! header map. The response body ([`UpstreamBody`]) reads straight from the backend's socket
//! and returns the connection to its backend's idle list the moment the body ends; a body
//! dropped half-way, or that stalls for the body timeout (the SSE timeout for server-sent
//! events), closes it. Idle connections the backend has closed are noticed on checkout from
//! the socket's readiness (no system call when nothing happened) and dropped.
//! Wire-format details are in [`crate::h1`].

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::h1::{self, BodyDecoder, Decoded, RequestFraming, ResponseFraming, ResponseHead};
use crate::head::Span;

/// Idle entries are swept of closed connections when the map grows past this many addresses.
const SWEEP_AT: usize = 1024;
/// A connection's read buffer grows by this much when it runs low.
const READ_CHUNK: usize = 8 * 1024;
/// Body pieces smaller than this are copied out of the read buffer (which then keeps its
/// allocation); larger ones are split off without copying.
const COPY_BELOW: usize = 8 * 1024;
/// Request body bytes gathered before they are written to the backend.
const WRITE_BATCH: usize = 64 * 1024;

/// Why a request could not be sent.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection to the backend (refused, unreachable, timed out).
    Connect(String),
    /// The connection failed while sending or before a complete response head arrived, or
    /// the backend's response was not valid HTTP/1.1.
    Request(String),
    /// The client's request body failed (the client went away or sent a broken body).
    ClientBody(String),
    /// The client stopped sending its request body.
    ClientBodyStalled(std::time::Duration),
    /// The client's request body grew past the largest accepted (this many bytes).
    ClientBodyTooLarge(u64),
    /// The request was sent and no response head arrived within the response timeout.
    Timeout,
}

/// One keep-alive connection to a backend, with its read and write buffers. Always boxed
/// (allocated once per connection, which the pool keeps): a response body holds it, and the
/// response is moved several times on every request's way to the client, where a pointer
/// copies cheaper than the connection's hundred bytes
/// (`request_and_response_moves_stay_small`).
struct Conn {
    stream: TcpStream,
    /// Bytes read from the backend and not yet consumed.
    rbuf: BytesMut,
    /// Where each field of a response head lies while it is parsed (kept for the next).
    places: Vec<(Span, Span)>,
    /// The request head (and small body pieces) being written.
    wbuf: Vec<u8>,
    /// Bounds the wait for each response head, then for each piece of its body; one per
    /// connection, moved forward per request and whenever the body has to wait.
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The backend's address: where the connection goes back to in the pool.
    addr: SocketAddr,
    /// How long the current response's body may send nothing (kept here, not in the body,
    /// for the same reason as the box).
    body_idle: Duration,
}

impl Conn {
    /// Whether the backend closed (or wrote to) this idle connection since it was last used.
    /// Costs a system call only when the socket has reported an event.
    fn is_stale(&self) -> bool {
        let mut probe = [0u8; 1];
        match self.stream.try_read(&mut probe) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            // End of stream, stray bytes or an error: unusable.
            _ => true,
        }
    }

    /// Writes the request (head in `wbuf`, then the body). Returns whether the backend
    /// answered before the whole body was sent: it may refuse an upload (a 413, a 401) without
    /// reading it, and waiting to finish the upload first would stall until the response
    /// timeout. The connection cannot carry another request after such an early answer.
    async fn write_request<B>(
        &mut self,
        method: &Method,
        body: &mut B,
        framing: RequestFraming,
        started: &mut bool,
    ) -> Result<bool, WriteError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        if framing == RequestFraming::None || body.is_end_stream() {
            let Conn { stream, wbuf, .. } = self;
            // No body (the common case): the head alone, in one write. It is tried at once
            // (a pooled connection is usually writable: no readiness poll, no waker) and
            // waited for only if not all of it went.
            let sent = match stream.try_write(wbuf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(WriteError::Upstream(e)),
            };
            wbuf.drain(..sent);
            flush(stream, wbuf).await.map_err(WriteError::Upstream)?;
            return Ok(false);
        }
        // Boxed: the body's writer and the watch for an early answer are most of this
        // future's size, which every request's future would carry otherwise (a bodyless one,
        // the usual, would then need the allocator's slower path for large blocks).
        Box::pin(self.write_with_body(method, body, framing, started)).await
    }

    /// [`Conn::write_request`] for a request with a body.
    async fn write_with_body<B>(
        &mut self,
        method: &Method,
        body: &mut B,
        framing: RequestFraming,
        started: &mut bool,
    ) -> Result<bool, WriteError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let Conn {
            stream, rbuf, wbuf, ..
        } = self;
        let (rd, mut wr) = stream.split();
        let write = write_body(&mut wr, wbuf, body, framing, started);
        tokio::pin!(write);
        loop {
            tokio::select! {
                biased;
                done = &mut write => return done.map(|()| false),
                ready = rd.readable() => {
                    ready.map_err(WriteError::Upstream)?;
                    if rbuf.capacity() - rbuf.len() < 1024 {
                        rbuf.reserve(READ_CHUNK);
                    }
                    match rd.try_read_buf(rbuf) {
                        // Closed: stop writing; reading the head reports it.
                        Ok(0) => return Ok(true),
                        Ok(_) => {
                            // Stop at a final head (or a broken one); an interim 1xx stays in
                            // the buffer for `read_head` and the body goes on.
                            match h1::parse_response_head(rbuf, method) {
                                Ok(Some((head, _))) if head.status.is_informational()
                                    && head.status != StatusCode::SWITCHING_PROTOCOLS => {}
                                Ok(Some(_)) | Err(_) => return Ok(true),
                                Ok(None) => {}
                            }
                        }
                        // A stale readiness report: nothing to read yet.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(WriteError::Upstream(e)),
                    }
                }
            }
        }
    }

    /// Reads until a final response head (or `101`) is complete, for at most `timeout`;
    /// interim `1xx` heads are skipped.
    async fn read_head(
        &mut self,
        method: &Method,
        timeout: Duration,
    ) -> Result<ResponseHead, ReadError> {
        let Conn {
            stream,
            rbuf,
            places,
            timer,
            ..
        } = self;
        let deadline = tokio::time::Instant::now() + timeout;
        crate::forward::arm(timer.as_mut(), deadline);
        let read = async {
            let mut got_any = !rbuf.is_empty();
            loop {
                if !rbuf.is_empty() {
                    match h1::parse_response_head_with(rbuf, method, places) {
                        Ok(Some((head, used))) => {
                            rbuf.advance(used);
                            if head.status.is_informational()
                                && head.status != StatusCode::SWITCHING_PROTOCOLS
                            {
                                continue;
                            }
                            return Ok(head);
                        }
                        Ok(None) => {}
                        Err(e) => return Err(ReadError::Invalid(e)),
                    }
                }
                if rbuf.capacity() - rbuf.len() < 1024 {
                    rbuf.reserve(READ_CHUNK);
                }
                let n = stream.read_buf(rbuf).await.map_err(ReadError::Io)?;
                if n == 0 {
                    return Err(if got_any {
                        ReadError::Truncated
                    } else {
                        ReadError::ClosedEarly
                    });
                }
                got_any = true;
            }
        };
        tokio::pin!(read);
        loop {
            tokio::select! {
                biased;
                r = &mut read => return r,
                _ = timer.as_mut() => {
                    if crate::forward::deadline_passed(timer.as_mut(), deadline) {
                        return Err(ReadError::TimedOut);
                    }
                }
            }
        }
    }
}

/// Writes what is gathered in `wbuf`, if anything, and empties it.
pub(crate) async fn flush<W: AsyncWrite + Unpin>(w: &mut W, wbuf: &mut Vec<u8>) -> io::Result<()> {
    if !wbuf.is_empty() {
        w.write_all(wbuf).await?;
        wbuf.clear();
    }
    Ok(())
}

/// The body's next frame, for a writer that gathers small pieces in `wbuf`: when the body has
/// none at hand, what is gathered is written first, so nothing waits in the buffer while the
/// body waits for more. Used for request bodies here and response bodies in the server.
pub(crate) async fn next_frame<B, W>(
    body: &mut B,
    w: &mut W,
    wbuf: &mut Vec<u8>,
) -> io::Result<Option<Result<Frame<B::Data>, B::Error>>>
where
    B: Body + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        // Waits for the body only while nothing is gathered.
        let at_hand = std::future::poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(Some(f)),
            Poll::Pending if wbuf.is_empty() => Poll::Pending,
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        match at_hand {
            Some(f) => return Ok(f),
            None => flush(w, wbuf).await?,
        }
    }
}

/// Writes the head in `wbuf` and the body. Small bodies that are already at hand go out in the
/// same write as the head.
async fn write_body<W, B>(
    w: &mut W,
    wbuf: &mut Vec<u8>,
    body: &mut B,
    framing: RequestFraming,
    started: &mut bool,
) -> Result<(), WriteError>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let chunked = framing == RequestFraming::Chunked;
    loop {
        let frame = next_frame(body, w, wbuf)
            .await
            .map_err(WriteError::Upstream)?;
        match frame {
            Some(Ok(frame)) => {
                *started = true;
                if let Ok(data) = frame.into_data() {
                    if chunked {
                        h1::encode_chunk(wbuf, &data);
                    } else {
                        wbuf.extend_from_slice(&data);
                    }
                }
            }
            Some(Err(e)) => return Err(WriteError::Client(e.into())),
            None => {
                if chunked {
                    wbuf.extend_from_slice(h1::LAST_CHUNK);
                }
                break;
            }
        }
        if wbuf.len() >= WRITE_BATCH {
            flush(w, wbuf).await.map_err(WriteError::Upstream)?;
        }
    }
    flush(w, wbuf).await.map_err(WriteError::Upstream)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

enum WriteError {
    Upstream(io::Error),
    Client(BoxError),
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("the backend closed the connection without answering")]
    ClosedEarly,
    #[error("the backend closed the connection in the middle of the response head")]
    Truncated,
    #[error("reading the response: {0}")]
    Io(io::Error),
    #[error("{0}")]
    Invalid(h1::H1Error),
    #[error("no response head within the response timeout")]
    TimedOut,
}

/// Keep-alive connections per backend address.
pub(crate) struct UpstreamPool {
    /// A std mutex: held only to push or pop a connection, never across an `.await`.
    /// Hashed with foldhash (fast; keys are backend addresses from the route table).
    /// Connections stay in the box they were opened in (see [`Conn`]): taken out and put
    /// back per request, they are never allocated again.
    #[allow(clippy::vec_box)]
    idle: Mutex<HashMap<SocketAddr, Vec<Box<Conn>>, foldhash::fast::RandomState>>,
    max_idle: usize,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// The longest wait for the next bytes of a response body (`sse_timeout` for server-sent
    /// events).
    body_timeout: Duration,
    sse_timeout: Duration,
}

/// A backend's response: its head, a body that streams from the backend, and for a `101` the
/// switched connection.
pub(crate) struct UpstreamResponse {
    pub(crate) head: ResponseHead,
    pub(crate) body: UpstreamBody,
    pub(crate) upgraded: Option<Box<Upgraded>>,
}

/// How a request body goes to the backend: not at all when it is empty (an explicit
/// `content-length: 0` is kept), with its length when known, chunked otherwise.
pub(crate) fn request_framing<B: Body>(body: &B, had_content_length: bool) -> RequestFraming {
    if body.is_end_stream() {
        if had_content_length {
            RequestFraming::Length(0)
        } else {
            RequestFraming::None
        }
    } else {
        match body.size_hint().exact() {
            Some(n) => RequestFraming::Length(n),
            None => RequestFraming::Chunked,
        }
    }
}

/// Methods a client may repeat without changing the outcome (RFC 9110 §9.2.2): sent again on
/// a fresh connection if a reused one closes before answering.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

impl UpstreamPool {
    /// The pool for `cfg`'s upstream limits: idle connections per backend, the connect
    /// timeout, the response timeout (for a response head, once the request has been written)
    /// and the body timeouts (between pieces of a response body).
    pub(crate) fn new(cfg: &crate::config::ProxyConfig) -> Self {
        UpstreamPool {
            idle: Mutex::new(HashMap::default()),
            max_idle: cfg.upstream_idle_per_backend,
            connect_timeout: cfg.upstream_connect_timeout,
            response_timeout: cfg.upstream_response_timeout,
            body_timeout: cfg.upstream_body_timeout,
            sse_timeout: cfg.upstream_sse_timeout,
        }
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&addr)?;
        while let Some(c) = list.pop() {
            if !c.is_stale() {
                return Some(c);
            }
        }
        None
    }

    /// Keeps `conn` for the next request to its backend (whether the backend has closed it
    /// since is checked when it is taken out again).
    fn release(&self, conn: Box<Conn>) {
        if !conn.rbuf.is_empty() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() > SWEEP_AT {
            idle.retain(|_, v| {
                v.retain(|c| !c.is_stale());
                !v.is_empty()
            });
        }
        let list = idle.entry(conn.addr).or_default();
        if list.len() < self.max_idle {
            list.push(conn);
        }
    }

    /// Idle connections held for `addr`.
    #[cfg(test)]
    pub(crate) fn idle_count(&self, addr: SocketAddr) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get(&addr).map_or(0, Vec::len)
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Box<Conn>, SendError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                SendError::Connect(format!("no connection within {:?}", self.connect_timeout))
            })?
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        Ok(Box::new(Conn {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            places: Vec::new(),
            wbuf: Vec::with_capacity(1024),
            timer: Box::pin(tokio::time::sleep(self.response_timeout)),
            addr,
            body_idle: self.body_timeout,
        }))
    }

    /// Sends a request to `addr` on an idle connection or a new one, and returns the response
    /// once its head has arrived. `head` appends the request line and fields (origin-form
    /// target, hop-by-hop headers already removed) to the connection's write buffer, where
    /// they go out from without a copy; it is called again if the request is retried on
    /// another connection.
    pub(crate) async fn send<B>(
        self: &Arc<Self>,
        addr: SocketAddr,
        method: &Method,
        head: impl Fn(&mut Vec<u8>),
        framing: RequestFraming,
        mut body: B,
    ) -> Result<UpstreamResponse, SendError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let mut body_started = false;
        loop {
            let (mut conn, reused) = match self.take_idle(addr) {
                Some(c) => (c, true),
                // Boxed: a rare path that would otherwise enlarge every request's future.
                None => (Box::pin(self.connect(addr)).await?, false),
            };
            // A reused connection the backend closed a moment ago fails before anything of
            // the request was processed: the request goes out again on another connection.
            let retry = |started: bool| reused && !started;
            conn.wbuf.clear();
            head(&mut conn.wbuf);
            h1::end_request_head(&mut conn.wbuf, framing);
            let answered_early = match conn
                .write_request(method, &mut body, framing, &mut body_started)
                .await
            {
                Ok(early) => early,
                Err(WriteError::Upstream(_)) if retry(body_started) => continue,
                Err(WriteError::Upstream(e)) => {
                    return Err(SendError::Request(format!("sending the request: {e}")));
                }
                Err(WriteError::Client(e)) => {
                    // The backend connection, mid-body, is dropped (closed) here.
                    if let Some(stalled) = e.downcast_ref::<crate::forward::BodyStalled>() {
                        return Err(SendError::ClientBodyStalled(stalled.0));
                    }
                    if let Some(large) = e.downcast_ref::<crate::forward::BodyTooLarge>() {
                        return Err(SendError::ClientBodyTooLarge(large.0));
                    }
                    return Err(SendError::ClientBody(e.to_string()));
                }
            };
            match conn.read_head(method, self.response_timeout).await {
                Ok(mut head) => {
                    // Part of the request body is still unsent: the connection is spent.
                    head.keep_alive &= !answered_early;
                    return Ok(self.respond(conn, head));
                }
                Err(ReadError::ClosedEarly | ReadError::Io(_))
                    if retry(body_started) && idempotent(method) =>
                {
                    continue;
                }
                Err(ReadError::TimedOut) => return Err(SendError::Timeout),
                Err(e) => return Err(SendError::Request(e.to_string())),
            }
        }
    }

    fn respond(self: &Arc<Self>, mut conn: Box<Conn>, head: ResponseHead) -> UpstreamResponse {
        let (body, upgraded) = if head.status == StatusCode::SWITCHING_PROTOCOLS {
            let upgraded = Upgraded::new(std::mem::take(&mut conn.rbuf).freeze(), conn.stream);
            (UpstreamBody::empty(), Some(Box::new(upgraded)))
        } else {
            let decoder = match head.framing {
                ResponseFraming::Empty => BodyDecoder::Done,
                ResponseFraming::Length(n) => BodyDecoder::length(n),
                ResponseFraming::Chunked => BodyDecoder::chunked(),
                ResponseFraming::Close => BodyDecoder::Close,
            };
            conn.body_idle = if head.event_stream {
                self.sse_timeout
            } else {
                self.body_timeout
            };
            let mut body = UpstreamBody {
                conn: Some(conn),
                pool: Some(self.clone()),
                keep_alive: head.keep_alive,
                decoder,
                armed: false,
            };
            if body.is_end_stream() {
                body.finish();
            }
            (body, None)
        };
        UpstreamResponse {
            head,
            body,
            upgraded,
        }
    }
}

/// A response body read straight from the backend's connection. A backend that sends none of
/// it for its idle limit has the connection closed and the body fails: the connection's timer
/// is armed when a read has to wait (not per piece) and disarmed by the next bytes.
pub(crate) struct UpstreamBody {
    conn: Option<Box<Conn>>,
    pool: Option<Arc<UpstreamPool>>,
    keep_alive: bool,
    decoder: BodyDecoder,
    /// Whether the connection's timer counts down the current wait.
    armed: bool,
}

impl UpstreamBody {
    fn empty() -> Self {
        UpstreamBody {
            conn: None,
            pool: None,
            keep_alive: false,
            decoder: BodyDecoder::Done,
            armed: false,
        }
    }

    /// The rest of the body, when all of it is in the connection's buffer already (it came
    /// with the head, as a small answer does) and it is shorter than `max` bytes: appended to
    /// `out` (the client's write buffer) with no piece of its own, and the body ends (the
    /// connection goes back to the pool). Returns its length; `None`, having done nothing,
    /// for any other body, which is then read piece by piece.
    pub(crate) fn take_buffered(&mut self, out: &mut Vec<u8>, max: usize) -> Option<usize> {
        let BodyDecoder::Length(left) = self.decoder else {
            return None;
        };
        let conn = self.conn.as_mut()?;
        let n = usize::try_from(left)
            .ok()
            .filter(|&n| n < max && n <= conn.rbuf.len())?;
        out.extend_from_slice(&conn.rbuf[..n]);
        conn.rbuf.advance(n);
        self.finish();
        Some(n)
    }

    /// The body has ended: the connection goes back to the pool if it can carry another
    /// request.
    fn finish(&mut self) {
        self.decoder = BodyDecoder::Done;
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.as_ref())
            && self.keep_alive
        {
            pool.release(conn);
        }
    }

    fn fail(&mut self, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
        self.fail_as(io::ErrorKind::InvalidData, e)
    }

    /// The body broke off: the connection is closed (never pooled).
    fn fail_as(
        &mut self,
        kind: io::ErrorKind,
        e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> io::Error {
        self.conn = None;
        self.decoder = BodyDecoder::Done;
        io::Error::new(kind, e)
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.rbuf, COPY_BELOW) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Done) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
            }
            if conn.rbuf.capacity() - conn.rbuf.len() < 1024 {
                conn.rbuf.reserve(READ_CHUNK);
            }
            let read =
                match tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.rbuf)
                {
                    Poll::Ready(read) => {
                        this.armed = false;
                        read
                    }
                    Poll::Pending => {
                        if !this.armed {
                            let deadline = tokio::time::Instant::now() + conn.body_idle;
                            conn.timer.as_mut().reset(deadline);
                            this.armed = true;
                        }
                        ready!(conn.timer.as_mut().poll(cx));
                        let idle = conn.body_idle;
                        return Poll::Ready(Some(Err(this.fail_as(
                            io::ErrorKind::TimedOut,
                            format!("the backend sent no response body bytes for {idle:?}"),
                        ))));
                    }
                };
            match read {
                Ok(0) if matches!(this.decoder, BodyDecoder::Close) => {
                    this.conn = None;
                    this.decoder = BodyDecoder::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return Poll::Ready(Some(Err(
                        this.fail("the backend closed the connection in the middle of the body")
                    )));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(this.fail(e)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder
            .remaining()
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A backend connection that switched protocols (`101`): the bytes the backend sent after its
/// response head come first, then the socket.
pub(crate) type Upgraded = crate::forward::Prefixed<TcpStream>;
