//! The client side of HTTP/1.1: Hangar's own connection loop, written for the proxy path.
//!
//! One task per client connection reads a request head into the connection's buffer, parses
//! it in place (header values are slices of that buffer, not copies), runs the request path
//! ([`crate::service::respond`]) on the same task and writes the response head and body with
//! as few writes as the body allows (a small body that is already at hand goes out with its
//! head in one write). The request body streams from the same buffer and socket
//! ([`ClientBody`]). Pipelined requests are answered in order.
//!
//! Limits: the whole head must fit in `max_header_bytes` (431 past it, with at most
//! [`MAX_REQUEST_HEADERS`] fields); a head must arrive within `header_read_timeout` of its first
//! byte (408, then close) and a keep-alive connection with no request in flight is closed after
//! `keep_alive_timeout`; a client that accepts no response bytes for `client_write_timeout` is
//! dropped (with the response's backend connection). On shutdown an idle connection closes at
//! once and a busy one after its response. A connection that starts with the HTTP/2 preface is
//! handed back to the listener, which serves it with [`crate::http2`] (h2c with prior
//! knowledge).

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode, Version};
use http_body_util::Either;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use crate::error::ProxyError;
use crate::forward::{self, Prefixed};
use crate::h1::{self, BodyDecoder, Decoded};
use crate::h1_scan::{self, Scan};
use crate::head::{FieldIndex, Known, ProxyResponse, RawRequest, RequestHead, Span};
use crate::pool::{flush, next_frame};
use crate::service::{ClientInfo, ClientIo, ClientUpgrade, Shared};

/// The most header fields a request may carry (more is a 431).
pub(crate) const MAX_REQUEST_HEADERS: usize = 100;
/// What a client that speaks HTTP/2 with prior knowledge sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The read buffer grows by this much when it runs low.
const READ_CHUNK: usize = 8 * 1024;
/// The read buffer's size when a first read brought at most half of it (mimalloc's small
/// blocks go up to 1 KiB).
const FIRST_READ: usize = 1024;
/// A write buffer larger than this is given back while the connection is idle.
const IDLE_WBUF: usize = 1024;
/// Body pieces smaller than this are copied out of the read buffer (which keeps its
/// allocation); larger ones are split off without copying.
const COPY_BELOW: usize = 8 * 1024;
/// Response bytes gathered before they are written; larger body pieces are written directly.
const WRITE_BATCH: usize = 64 * 1024;
/// After a response that leaves part of a request body unread, the connection is closed; this
/// much of the rest is read and dropped first (for at most [`LINGER`]) so that the client
/// gets the response rather than a reset.
const LINGER_BYTES: usize = 256 * 1024;
const LINGER: Duration = Duration::from_secs(2);
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Shutdown as a connection sees it: a flag read after every response and on every wake of
/// an idle connection (an atomic load; the token's own check takes a lock shared by every
/// connection), and a second token, cancelled once the flag is set, waited on while a
/// connection is idle (so that the flag is set whenever that wait ends).
#[derive(Clone)]
pub(crate) struct Shutdown {
    /// The server's token (HTTP/2 connections wait on it).
    pub(crate) token: CancellationToken,
    stopping: Arc<AtomicBool>,
    /// Cancelled by [`Shutdown::begin`] after it sets `stopping`.
    stopped: CancellationToken,
}

impl Shutdown {
    pub(crate) fn new(token: CancellationToken) -> Self {
        Shutdown {
            token,
            stopping: Arc::new(AtomicBool::new(false)),
            stopped: CancellationToken::new(),
        }
    }

    /// Called once the token is cancelled (or the listener failed): connections finish what
    /// is in flight and close; idle ones close now.
    pub(crate) fn begin(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stopped.cancel();
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// How a connection ended.
pub(crate) enum Served<I> {
    /// Closed (by either side, a limit, or shutdown).
    Closed,
    /// The client sent the HTTP/2 preface: serve the connection as HTTP/2, starting with the
    /// bytes already read.
    Http2(Prefixed<I>),
}

/// Serves HTTP/1.1 requests on `io` until the client closes, a limit or error ends the
/// connection, or shutdown begins. A connection that starts with the HTTP/2 preface is
/// returned unserved.
pub(crate) async fn serve<I>(
    shared: Arc<Shared>,
    mut io: I,
    peer: SocketAddr,
    tls: bool,
    shutdown: Shutdown,
) -> Served<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &shared.config;
    let client = ClientInfo::new(peer, tls);
    // Allocated when the first bytes arrive, and given back whenever the connection waits for
    // its next request (see [`read_some`]): an idle connection holds no buffers.
    let mut rbuf = BytesMut::new();
    // Where a head's fields lie in the buffer while it is parsed (kept, not zeroed, per request).
    let mut spans = Vec::new();
    let mut wbuf: Vec<u8> = Vec::new();
    // One timer per connection, moved forward (cheaply) for each request.
    let timer = tokio::time::sleep(cfg.header_read_timeout);
    tokio::pin!(timer);
    let cancelled = shutdown.stopped.cancelled();
    tokio::pin!(cancelled);
    // Both are polled only when that can tell something new (see `forward::Watch`).
    let (mut timer_watch, mut cancel_watch) =
        (forward::Watch::default(), forward::Watch::default());
    let mut first = true;
    loop {
        // Read and parse the next request head.
        // The phase the timer is armed for and when its wait ends (the timer itself may be set
        // sooner: see `forward::arm`).
        let mut armed: Option<(Phase, tokio::time::Instant)> = None;
        let head = loop {
            // A new connection that could be opening with the HTTP/2 preface is not parsed as
            // HTTP/1.1 until it is clear that it is not.
            let maybe_h2 = first && {
                let n = rbuf.len().min(H2_PREFACE.len());
                rbuf[..n] == H2_PREFACE[..n]
            };
            if maybe_h2 && rbuf.len() >= H2_PREFACE.len() {
                return Served::Http2(Prefixed::new(rbuf.freeze(), io));
            }
            if !maybe_h2 && !rbuf.is_empty() {
                match parse_request(&mut rbuf, cfg.max_header_bytes, &mut spans) {
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                    Err(e) => {
                        Box::pin(answer_and_close(
                            &shared,
                            &mut io,
                            timer.as_mut(),
                            &mut wbuf,
                            e,
                        ))
                        .await;
                        return Served::Closed;
                    }
                }
            }

            // More bytes are needed. Idle (nothing of the next request yet): shutdown closes
            // the connection, and the keep-alive timeout applies; once a head has started, or
            // on a new connection, the head must be complete within the header-read timeout.
            let idle = rbuf.is_empty();
            if idle && shutdown.is_stopping() {
                return Served::Closed;
            }
            let phase = if idle && !first {
                Phase::Idle
            } else {
                Phase::Head
            };
            let deadline = match armed {
                Some((p, deadline)) if p == phase => deadline,
                _ => {
                    let deadline = tokio::time::Instant::now() + phase.limit(cfg);
                    forward::arm(timer.as_mut(), deadline);
                    armed = Some((phase, deadline));
                    deadline
                }
            };
            if idle {
                // Nothing buffered: give the buffers back while the client thinks (a
                // response's gathered body can leave the write buffer large).
                rbuf = BytesMut::new();
                if wbuf.capacity() > IDLE_WBUF {
                    wbuf = Vec::new();
                }
            } else if rbuf.capacity() - rbuf.len() < 1024 {
                rbuf.reserve(READ_CHUNK);
            }
            let event = tokio::select! {
                biased;
                r = read_some(&mut io, &mut rbuf) => match r {
                    Ok(0) | Err(_) => Wait::Closed,
                    Ok(_) => Wait::Read,
                },
                () = std::future::poll_fn(|cx| {
                    cancel_watch.poll_cancelled(cancelled.as_mut(), shutdown.is_stopping(), cx)
                }), if idle => Wait::Closed,
                () = std::future::poll_fn(|cx| timer_watch.poll_timer(timer.as_mut(), cx)) => if forward::deadline_passed(timer.as_mut(), deadline) {
                    Wait::TimedOut
                } else {
                    Wait::Early
                },
            };
            match event {
                Wait::Read | Wait::Early => {}
                Wait::Closed => return Served::Closed,
                Wait::TimedOut => {
                    if !idle {
                        // A slow client: cut off, with a 408 it may read.
                        let e = ProxyError::HeadTimeout(phase.limit(cfg));
                        Box::pin(answer_and_close(
                            &shared,
                            &mut io,
                            timer.as_mut(),
                            &mut wbuf,
                            e,
                        ))
                        .await;
                    }
                    return Served::Closed;
                }
            }
        };
        first = false;

        // Run the request path. The request body reads from this connection's buffer and
        // socket, so it borrows them until the response head is ready.
        let keep_alive = head.keep_alive;
        let method_is_head = *head.head.method() == Method::HEAD;
        let version = head.version;
        let mut body = BodyState::new(head.body, head.expect_continue);
        let mut upgrade: Option<oneshot::Sender<Box<dyn ClientIo>>> = None;
        let response = {
            // The request body and the watch for a client that goes away share the socket;
            // both run on this task, so the lock is never contended.
            let side = Mutex::new(ClientSide {
                io: &mut io,
                rbuf: &mut rbuf,
                state: &mut body,
            });
            // Boxed: the request path's state is the largest part of this future, and a
            // connection waiting for its next request should not carry it.
            let respond = Box::pin(crate::service::respond(
                &shared,
                &head.head,
                ClientBody { side: &side },
                &client,
                || {
                    let (tx, rx) = oneshot::channel();
                    upgrade = Some(tx);
                    Box::pin(async move {
                        rx.await
                            .map_err(|_| "the client connection closed before the upgrade".into())
                    }) as ClientUpgrade
                },
            ));
            tokio::select! {
                biased;
                response = respond => Some(response),
                () = client_gone(&side, cfg.max_header_bytes) => None,
            }
        };
        spans = head.head.into_fields();
        let Some(response) = response else {
            // Dropping the request path closed its backend connection mid-request (the
            // request counts as answered with nothing, like nginx's 499).
            tracing::debug!("the client closed its connection before the response");
            return Served::Closed;
        };

        if response.status == StatusCode::SWITCHING_PROTOCOLS
            && let Some(tx) = upgrade
        {
            // The backend switched protocols: write the 101 and hand the socket, with any
            // bytes the client sent after its request head, to the copy task.
            encode_head(&mut wbuf, &response, Framing::None, true, version);
            let written = TimedWrite::new(&mut io, timer.as_mut(), cfg.client_write_timeout)
                .write_all(&wbuf)
                .await;
            if written.is_ok() {
                let _ = tx.send(Box::new(Prefixed::new(rbuf.freeze(), io)));
            }
            return Served::Closed;
        }

        let body_read = body.is_done() || body.skip_buffered(&mut rbuf);
        let keep = keep_alive && body_read && !shutdown.is_stopping();
        let mut out = TimedWrite::new(&mut io, timer.as_mut(), cfg.client_write_timeout);
        // A response that is whole in the buffer once its head is encoded (the usual small
        // one) is written here; one whose body is still coming is written by a boxed future,
        // as the request path is, so that a waiting connection does not carry its state.
        let pending = start_response(&mut wbuf, response, method_is_head, version, keep);
        // `pending` is let go of whole before either write (dropped, or moved into the boxed
        // writer), so that the connection's future keeps no room for a body across them.
        let written = if let Pending::Flush(keep) = pending {
            drop(pending);
            flush(&mut out, &mut wbuf).await.map(|()| keep)
        } else {
            Box::pin(write_pending(&mut out, &mut wbuf, pending)).await
        };
        match written {
            Ok(true) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                // A client that stopped reading: dropping the connection drops the response
                // body, which closes its backend connection.
                tracing::debug!(error = %e, "client write timed out; connection dropped");
                return Served::Closed;
            }
            Ok(false) | Err(_) => {
                Box::pin(close(out, &mut rbuf, !body_read)).await;
                return Served::Closed;
            }
        }
        if wbuf.capacity() > 4 * WRITE_BATCH {
            // A large response grew the buffer: do not keep that much per idle connection.
            wbuf = Vec::new();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of the next request on a keep-alive connection.
    Idle,
    /// Waiting for the rest of a request head (or the first on a new connection).
    Head,
}

impl Phase {
    fn limit(self, cfg: &crate::config::ProxyConfig) -> Duration {
        match self {
            Phase::Idle => cfg.keep_alive_timeout,
            Phase::Head => cfg.header_read_timeout,
        }
    }
}

/// What ended a wait for request bytes.
enum Wait {
    Read,
    Closed,
    TimedOut,
    /// The timer fired before the wait's deadline (it was set for an earlier wait) and has
    /// been moved on.
    Early,
}

/// Answers a request the proxy refuses before it has a head (400, 408, 431) and closes.
async fn answer_and_close<I: AsyncWrite + Unpin>(
    shared: &Shared,
    io: &mut I,
    timer: Pin<&mut Sleep>,
    wbuf: &mut Vec<u8>,
    e: ProxyError,
) {
    tracing::debug!(error = %e, code = e.code(), "client request refused");
    shared.activity.count_error(e.code());
    let resp = crate::service::error_response(&e);
    let mut out = TimedWrite::new(io, timer, shared.config.client_write_timeout);
    if write_response(&mut out, wbuf, resp, false, Version::HTTP_11, false)
        .await
        .is_ok()
    {
        let _ = out.shutdown().await;
    }
}

/// Reads what the client sent into `buf`. A buffer with no allocation (a connection that
/// was waiting for its next request) is read through the stack first and allocated only
/// once bytes arrived, so the wait itself holds no buffer: the stack array lives for one
/// poll, not in the connection's future.
async fn read_some<I: AsyncRead + Unpin>(io: &mut I, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.capacity() > 0 {
        return io.read_buf(buf).await;
    }
    std::future::poll_fn(|cx| poll_read_unallocated(io, cx, buf)).await
}

/// Reads into `buf`, which has no allocation, through the stack: `buf` is allocated only if
/// bytes arrived.
fn poll_read_unallocated<I: AsyncRead + Unpin>(
    io: &mut I,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut read = tokio::io::ReadBuf::uninit(&mut stack);
    ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
    let got = read.filled();
    if !got.is_empty() {
        // A request head usually fits in a small block, which the allocator hands out
        // faster than a large one; the buffer grows if more follows.
        buf.reserve(if got.len() <= FIRST_READ / 2 {
            FIRST_READ
        } else {
            READ_CHUNK
        });
        buf.extend_from_slice(got);
    }
    Poll::Ready(Ok(got.len()))
}

/// Closes the connection after a response; if part of the request body was left unread, reads
/// and drops a bounded amount of it first so the client reads the response, not a reset.
async fn close<I: AsyncRead + AsyncWrite + Unpin>(
    mut out: TimedWrite<'_, I>,
    rbuf: &mut BytesMut,
    linger: bool,
) {
    // Bounded by the write timeout (a TLS close_notify is a write).
    if out.shutdown().await.is_err() || !linger {
        return;
    }
    let io = out.io;
    let drain = async {
        let mut dropped = 0;
        loop {
            rbuf.clear();
            if rbuf.capacity() < READ_CHUNK {
                rbuf.reserve(READ_CHUNK);
            }
            match io.read_buf(rbuf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    dropped += n;
                    if dropped >= LINGER_BYTES {
                        return;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// The client connection while the proxy writes to it: a write, flush or shutdown that makes
/// no progress for `limit` fails with [`io::ErrorKind::TimedOut`], so a client that stops
/// reading cannot hold its task and backend connection forever. It counts down on the
/// connection's one timer (unused while a response is written), armed only when a write has
/// to wait and disarmed by the next progress: writes that go through at once cost nothing.
struct TimedWrite<'a, I> {
    io: &'a mut I,
    timer: Pin<&'a mut Sleep>,
    limit: Duration,
    /// Whether the timer counts down the current wait.
    armed: bool,
}

impl<'a, I> TimedWrite<'a, I> {
    fn new(io: &'a mut I, timer: Pin<&'a mut Sleep>, limit: Duration) -> Self {
        TimedWrite {
            io,
            timer,
            limit,
            armed: false,
        }
    }

    /// What the inner write's `poll` means with the time limit applied.
    fn limited<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.armed = false;
            return poll;
        }
        if !self.armed {
            self.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + self.limit);
            self.armed = true;
        }
        ready!(self.timer.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client accepted no bytes for {:?}", self.limit),
        )))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TimedWrite<'_, I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut *this.io).poll_write(cx, buf);
        this.limited(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let poll = Pin::new(&mut *this.io).poll_write_vectored(cx, bufs);
        this.limited(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = Pin::new(&mut *this.io).poll_flush(cx);
        this.limited(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = Pin::new(&mut *this.io).poll_shutdown(cx);
        this.limited(cx, poll)
    }
}

/// A parsed request head and what it says about the body and the connection.
pub(crate) struct ParsedRequest {
    pub(crate) head: RawRequest,
    pub(crate) version: Version,
    pub(crate) body: BodyLength,
    /// Whether the client lets the connection carry another request.
    pub(crate) keep_alive: bool,
    /// `Expect: 100-continue` on a request with a body.
    pub(crate) expect_continue: bool,
}

/// How a request body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    Length(u64),
    Chunked,
}

/// Parses a request head from the front of `buf`: `Ok(None)` if it is not complete yet;
/// otherwise the head, which is split off `buf` (field names lower-cased in place; the head
/// keeps the bytes and where each field lies in them, in `spans`' allocation).
pub(crate) fn parse_request(
    buf: &mut BytesMut,
    max_head: usize,
    spans: &mut Vec<(Span, Span)>,
) -> Result<Option<ParsedRequest>, ProxyError> {
    // The fast scan reads the usual head (lower-casing its field names as it goes); what it
    // does not expect, httparse decides on.
    let ((used, method, target, minor), lowered) =
        match h1_scan::request(buf, spans, MAX_REQUEST_HEADERS) {
            Scan::Complete(p) => ((p.used, p.method, p.target, p.minor), true),
            Scan::Partial if buf.len() >= max_head => {
                return Err(ProxyError::HeadTooLarge(max_head));
            }
            Scan::Partial => return Ok(None),
            Scan::Other => match parse_with_httparse(buf, max_head, spans)? {
                Some(parts) => (parts, false),
                None => return Ok(None),
            },
        };
    if used > max_head {
        return Err(ProxyError::HeadTooLarge(max_head));
    }
    let method = Method::from_bytes(&buf[method.range()])
        .map_err(|_| ProxyError::BadRequest("invalid request method"))?;
    // Origin-form (`/path`) or absolute-form (`http://host/path`) only: an authority-form or
    // bare target (`CONNECT host:80`, `abc`) used to be rewritten to `/`.
    // Bytes, not `str` slices: a target may hold UTF-8, and a character across byte 7 used to
    // panic (found by fuzzing).
    let t = &buf[target.range()];
    let origin_form = t.first() == Some(&b'/');
    let absolute_form = t.len() > 7
        && (t[..7].eq_ignore_ascii_case(b"http://")
            || t.get(..8)
                .is_some_and(|t| t.eq_ignore_ascii_case(b"https://")));
    let asterisk = t == b"*" && method == Method::OPTIONS;
    if method == Method::CONNECT || !(origin_form || absolute_form || asterisk) {
        return Err(ProxyError::BadRequest(
            "the request target must be a path (/...) or an absolute http(s) URL; CONNECT is not served",
        ));
    }
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // The scan (or httparse) checked that names are tokens and values hold no control
    // characters; names httparse read are lower-cased here.
    if !lowered {
        for (name, _) in spans.iter() {
            buf[name.range()].make_ascii_lowercase();
        }
    }
    // The head keeps its bytes: the whole buffer when nothing follows it (no shared owner to
    // allocate; the next read takes a new buffer, as it would after an idle wait anyway),
    // else its part of it.
    let head = if buf.len() == used {
        std::mem::take(buf)
    } else {
        buf.split_to(used)
    };

    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut hosts = 0;
    let mut close = false;
    let mut keep_alive = false;
    let mut expect_continue = false;
    // The fields the request path reads are noted as they go by (see `Known`).
    let mut index = FieldIndex::default();
    for (i, &(name, value)) in spans.iter().enumerate() {
        let value = &head[value.range()];
        match index.note(i, &head[name.range()]) {
            Some(Known::ContentLength) => {
                length = Some(h1::content_length(value, length).map_err(|_| {
                    ProxyError::BadRequest("invalid or conflicting content-length")
                })?);
            }
            Some(Known::TransferEncoding) => {
                // Exactly `chunked`: another coding would be dropped on the way to the
                // backend (nginx answers 501 too).
                if !value.trim_ascii().eq_ignore_ascii_case(b"chunked") || chunked.is_some() {
                    return Err(ProxyError::NotImplemented(
                        "only transfer-encoding: chunked is supported in a request",
                    ));
                }
                chunked = Some(true);
            }
            Some(Known::Host) => hosts += 1,
            Some(Known::Connection) => {
                let o = h1::ConnectionOptions::parse([value]);
                close |= o.close;
                keep_alive |= o.keep_alive;
            }
            Some(Known::Expect) => expect_continue = value.eq_ignore_ascii_case(b"100-continue"),
            _ => {}
        }
    }
    if version == Version::HTTP_11 && hosts != 1 {
        return Err(ProxyError::BadRequest(
            "an HTTP/1.1 request must carry exactly one host field",
        ));
    }
    let body = match (chunked, length) {
        (Some(_), _) if version == Version::HTTP_10 => {
            return Err(ProxyError::BadRequest(
                "transfer-encoding is not allowed in an HTTP/1.0 request",
            ));
        }
        (Some(false), _) => {
            return Err(ProxyError::BadRequest(
                "transfer-encoding must end with chunked in a request",
            ));
        }
        (Some(true), Some(_)) => {
            // Both: the transfer coding wins, and the connection is not trusted with another
            // request (RFC 9112 §6.3, a smuggling guard).
            close = true;
            BodyLength::Chunked
        }
        (Some(true), None) => BodyLength::Chunked,
        (None, n) => BodyLength::Length(n.unwrap_or(0)),
    };
    let keep_alive = !close && (version == Version::HTTP_11 || keep_alive);
    let expect_continue =
        expect_continue && version == Version::HTTP_11 && body != BodyLength::Length(0);
    let head = RawRequest::indexed(head, method, target, std::mem::take(spans), index)
        .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    // An absolute-form target names the host the request is routed by (and the backend's
    // Host); credentials in it are refused (RFC 9110 §4.2.4).
    if head
        .authority()
        .is_some_and(|a| a.is_empty() || a.contains('@'))
    {
        return Err(ProxyError::BadRequest(
            "the request target's authority must be a host (and port), without userinfo",
        ));
    }
    Ok(Some(ParsedRequest {
        head,
        version,
        body,
        keep_alive,
        expect_continue,
    }))
}

/// [`parse_request`] for a head the fast scan leaves to httparse: the head's length, where its
/// method and target lie, and its minor version; the fields go to `spans`.
fn parse_with_httparse(
    buf: &[u8],
    max_head: usize,
    spans: &mut Vec<(Span, Span)>,
) -> Result<Option<(usize, Span, Span, u8)>, ProxyError> {
    let mut storage =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let used = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut storage,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Err(ProxyError::HeadTooLarge(max_head));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ProxyError::HeadTooLarge(max_head));
        }
        Err(_) => return Err(ProxyError::BadRequest("malformed request head")),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(ProxyError::BadRequest("malformed request head"));
    };
    let base = buf.as_ptr();
    spans.clear();
    spans.extend(
        req.headers
            .iter()
            .map(|h| (Span::of(base, h.name.as_bytes()), Span::of(base, h.value))),
    );
    Ok(Some((
        used,
        Span::of(base, method.as_bytes()),
        Span::of(base, target.as_bytes()),
        minor,
    )))
}

/// Where a request body stands; lives in the connection loop so that it is known after the
/// request path is done with the body whether the connection can take another request.
struct BodyState {
    decoder: BodyDecoder,
    /// The body broke off (the client closed or sent a malformed chunk).
    failed: bool,
    /// Bytes of the `100 Continue` answer still to write before reading the body.
    continue_left: usize,
}

impl BodyState {
    fn new(length: BodyLength, expect_continue: bool) -> Self {
        let decoder = match length {
            BodyLength::Length(n) => BodyDecoder::length(n),
            BodyLength::Chunked => BodyDecoder::chunked(),
        };
        let continue_left = if expect_continue { CONTINUE.len() } else { 0 };
        BodyState {
            decoder,
            failed: false,
            continue_left,
        }
    }

    fn is_done(&self) -> bool {
        self.decoder.is_done()
    }

    /// Drops the rest of the body if it is already in `rbuf` (a request answered without
    /// reading its small body); returns whether the body has ended.
    fn skip_buffered(&mut self, rbuf: &mut BytesMut) -> bool {
        while !self.failed {
            match self.decoder.decode(rbuf, 0) {
                Ok(Decoded::Data(_)) => {}
                Ok(Decoded::Done) => return true,
                Ok(Decoded::NeedMore) => return false,
                Err(_) => self.failed = true,
            }
        }
        false
    }
}

/// The client connection while a request is in flight: the socket, what has been read of it,
/// and where the request body stands.
struct ClientSide<'c, I> {
    io: &'c mut I,
    rbuf: &'c mut BytesMut,
    state: &'c mut BodyState,
}

impl<I> ClientSide<'_, I> {
    fn lock<'a, 'c>(side: &'a Mutex<ClientSide<'c, I>>) -> MutexGuard<'a, ClientSide<'c, I>> {
        side.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Resolves when the client closes its connection (or it fails) while its request waits for
/// the backend's response, so that the request is abandoned and its backend connection freed
/// rather than held until the backend answers (a long poll, a slow backend). Watches only once
/// the request body has been read: until then the client's bytes are the body's. Bytes that
/// arrive meanwhile (a pipelined request) are kept for the connection loop, up to `limit`.
async fn client_gone<I: AsyncRead + Unpin>(side: &Mutex<ClientSide<'_, I>>, limit: usize) {
    std::future::poll_fn(|cx| {
        let mut guard = ClientSide::lock(side);
        let s = &mut *guard;
        loop {
            if !s.state.is_done() || s.rbuf.len() >= limit {
                // Polled again whenever the request path makes progress (same task).
                return Poll::Pending;
            }
            // Room for what the client sends next (usually nothing until the response): a
            // buffer the head took whole is read into through the stack (allocated only if
            // bytes come); one with some room left is read into, and grown when it runs out.
            let read = if s.rbuf.capacity() == 0 {
                poll_read_unallocated(&mut *s.io, cx, s.rbuf)
            } else {
                if s.rbuf.capacity() - s.rbuf.len() < 64 {
                    s.rbuf.reserve(FIRST_READ);
                }
                tokio_util::io::poll_read_buf(Pin::new(&mut *s.io), cx, &mut *s.rbuf)
            };
            match ready!(read) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => {}
            }
        }
    })
    .await
}

/// A request body read from the client connection it came on.
pub(crate) struct ClientBody<'s, 'c, I> {
    side: &'s Mutex<ClientSide<'c, I>>,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Body for ClientBody<'_, '_, I> {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let mut guard = ClientSide::lock(self.side);
        let this = &mut *guard;
        loop {
            if this.state.failed {
                return Poll::Ready(Some(Err(io::Error::other("the request body broke off"))));
            }
            match this.state.decoder.decode(this.rbuf, COPY_BELOW) {
                Ok(Decoded::Data(data)) => {
                    this.state.continue_left = 0;
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Done) => return Poll::Ready(None),
                Ok(Decoded::NeedMore) => {}
                Err(e) => {
                    this.state.failed = true;
                    return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, e))));
                }
            }
            // The client waits for a go-ahead before sending the body.
            while this.state.continue_left > 0 {
                let sent = CONTINUE.len() - this.state.continue_left;
                let n = ready!(Pin::new(&mut *this.io).poll_write(cx, &CONTINUE[sent..]))?;
                if n == 0 {
                    return Poll::Ready(Some(Err(io::ErrorKind::WriteZero.into())));
                }
                this.state.continue_left -= n;
            }
            if this.rbuf.capacity() - this.rbuf.len() < 1024 {
                this.rbuf.reserve(READ_CHUNK);
            }
            let n = match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *this.io),
                cx,
                this.rbuf
            )) {
                Ok(n) => n,
                Err(e) => {
                    this.state.failed = true;
                    return Poll::Ready(Some(Err(e)));
                }
            };
            if n == 0 {
                this.state.failed = true;
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection in the middle of the request body",
                ))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        ClientSide::lock(self.side).state.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        ClientSide::lock(self.side)
            .state
            .decoder
            .remaining()
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// How a response body is delimited on the client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body is sent (HEAD, 1xx, 204, 304): the backend's headers go as they are.
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    Close,
}

/// Encodes the status line and header lines of `resp` into `out` (cleared first), adding the
/// framing, a `date` if the response has none, and the connection's fate.
fn encode_head(
    out: &mut Vec<u8>,
    resp: &ProxyResponse,
    framing: Framing,
    keep_alive: bool,
    version: Version,
) {
    out.clear();
    let status = resp.status;
    if status == StatusCode::OK {
        // The usual status line in one copy.
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&resp.fields);
    if !resp.has_date {
        write_date(out);
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::Close => {}
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // The backend's own Connection and Upgrade fields are among the fields.
    } else if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends a `date` header ([`crate::head::with_date`]).
fn write_date(out: &mut Vec<u8>) {
    crate::head::with_date(|date| h1::write_header(out, b"date", date.as_bytes()));
}

/// Writes `resp` to the client. Returns whether the connection can carry another request.
async fn write_response<I: AsyncWrite + Unpin>(
    io: &mut I,
    wbuf: &mut Vec<u8>,
    resp: ProxyResponse,
    head_request: bool,
    version: Version,
    keep_alive: bool,
) -> io::Result<bool> {
    let pending = start_response(wbuf, resp, head_request, version, keep_alive);
    write_pending(io, wbuf, pending).await
}

/// What is left to do for a response once [`start_response`] has put its head in the write
/// buffer.
// Short-lived (made per response, taken apart at once or by the boxed writer): boxing the
// large variant would cost an allocation per streamed response for nothing.
#[allow(clippy::large_enum_variant)]
enum Pending {
    /// The whole response is in the buffer: write it; whether the connection can carry
    /// another request.
    Flush(bool),
    /// The body is still to be read from the backend ([`write_pending`]).
    Body(BodyToWrite),
}

/// A response body still to be read and written, and how.
struct BodyToWrite {
    body: crate::forward::ProxyBody,
    framing: Framing,
    keep_alive: bool,
}

/// Encodes the head of `resp` into `wbuf` (cleared first) and, when its body is empty or came
/// whole with the backend's head (the usual small answer), the body too: then nothing is left
/// but to write the buffer, with no future of its own for the body.
fn start_response(
    wbuf: &mut Vec<u8>,
    resp: ProxyResponse,
    head_request: bool,
    version: Version,
    mut keep_alive: bool,
) -> Pending {
    let status = resp.status;
    let bodyless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodyless {
        Framing::None
    } else {
        match resp.body.size_hint().exact() {
            Some(n) => Framing::Length(n),
            None if version == Version::HTTP_11 => Framing::Chunked,
            None => {
                keep_alive = false;
                Framing::Close
            }
        }
    };
    encode_head(wbuf, &resp, framing, keep_alive, version);
    let mut body = resp.body;
    if bodyless {
        return Pending::Flush(keep_alive);
    }
    // A small body that came whole with the head goes into the write buffer straight from the
    // backend connection's buffer: no pieces to poll.
    if let (Framing::Length(_), Either::Left(upstream)) = (framing, &mut body)
        && upstream.take_buffered(wbuf, COPY_BELOW).is_some()
    {
        return Pending::Flush(keep_alive);
    }
    Pending::Body(BodyToWrite {
        body,
        framing,
        keep_alive,
    })
}

/// Writes what [`start_response`] left: the head in `wbuf` and then the body, piece by piece
/// as the backend sends it. Returns whether the connection can carry another request.
async fn write_pending<I: AsyncWrite + Unpin>(
    io: &mut I,
    wbuf: &mut Vec<u8>,
    pending: Pending,
) -> io::Result<bool> {
    let BodyToWrite {
        mut body,
        framing,
        keep_alive,
    } = match pending {
        Pending::Flush(keep_alive) => return flush(io, wbuf).await.map(|()| keep_alive),
        Pending::Body(rest) => rest,
    };
    let chunked = framing == Framing::Chunked;
    let mut sent: u64 = 0;
    loop {
        match next_frame(&mut body, io, wbuf).await? {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                if let Framing::Length(n) = framing
                    && sent > n
                {
                    return Err(io::Error::other(
                        "the response body is longer than announced",
                    ));
                }
                if chunked {
                    h1::encode_chunk_head(wbuf, data.len());
                }
                if data.len() >= COPY_BELOW {
                    // Large pieces go out as they are, after what is gathered.
                    flush(io, wbuf).await?;
                    io.write_all(&data).await?;
                } else {
                    wbuf.extend_from_slice(&data);
                }
                if chunked {
                    wbuf.extend_from_slice(b"\r\n");
                }
            }
            Some(Err(e)) => {
                // The backend's body broke off: the client sees the response end early.
                tracing::debug!(error = %e, "response body failed");
                return Err(io::Error::other(e));
            }
            None => {
                if chunked {
                    wbuf.extend_from_slice(h1::LAST_CHUNK);
                }
                break;
            }
        }
        if wbuf.len() >= WRITE_BATCH {
            flush(io, wbuf).await?;
        }
    }
    if let Framing::Length(n) = framing
        && sent != n
    {
        return Err(io::Error::other(
            "the response body is shorter than announced",
        ));
    }
    flush(io, wbuf).await?;
    Ok(keep_alive && framing != Framing::Close)
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
