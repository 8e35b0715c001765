//! One HTTP/2 client connection: the frames it reads and writes, its streams and their
//! flow-control windows, all on the connection's own task.
//!
//! The [`Driver`] reads frames, decodes header blocks and opens a stream per request; each
//! stream is a future in the driver's [`FuturesUnordered`] that runs the request path and then
//! pipes the response body. Driver and streams share the connection's [`State`] (a mutex that
//! is never contended: everything runs on one task): the frames to write, the send windows
//! and, per stream, the request DATA not yet read. Every frame a pass produces leaves in one
//! write at the end of the pass.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use http::HeaderMap;
use hyper::body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::frame::{self, Head, Reason};
use super::hpack::{self, HeaderList};
use super::request::{self, BodyError, H2Request, RequestBody};
use crate::head::ProxyResponse;
use crate::service::{self, ClientInfo, ClientIo, Shared};

/// How often an HTTP/2 connection is asked for a PING answer.
pub(crate) const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is closed.
pub(crate) const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Flow-control windows the proxy grants its clients: larger than the protocol's 64 KB
/// default, which would hold a request body to one window per round trip.
pub(crate) const STREAM_WINDOW: u32 = 1024 * 1024;
pub(crate) const CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Streams a client may have open at once.
pub(crate) const MAX_STREAMS: usize = 200;
/// Streams the proxy may reset because of the client's errors before it closes the
/// connection (a client that makes the proxy reset stream after stream).
const MAX_LOCAL_RESETS: usize = 1024;
/// Streams a client may cancel while they run, when it cancels more than half of those it
/// opens, before the connection is closed.
const MAX_CANCELLED: usize = 1024;
/// Bytes waiting for the socket past which streams stop adding to them and frames are no
/// longer read (a client that does not read what it asks for).
const WRITE_HIGH: usize = 256 * 1024;
/// Room kept free in the read buffer before each read.
const READ_CHUNK: usize = frame::DEFAULT_MAX_FRAME + frame::HEAD_LEN;

/// How HTTP/2 connections are served: made once per listener.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) client_write_timeout: Duration,
    pub(crate) keep_alive_interval: Duration,
    pub(crate) keep_alive_timeout: Duration,
    pub(crate) max_header_bytes: usize,
}

impl Settings {
    pub(crate) fn new(cfg: &crate::config::ProxyConfig) -> Self {
        Settings {
            client_write_timeout: cfg.client_write_timeout,
            keep_alive_interval: KEEP_ALIVE_INTERVAL,
            keep_alive_timeout: KEEP_ALIVE_TIMEOUT,
            max_header_bytes: cfg.max_header_bytes,
        }
    }
}

/// Locks the connection's state (never contended; a panic elsewhere does not poison it for
/// the rest of the connection).
pub(crate) fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Stream ids hash to themselves.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0 << 8 | u64::from(b);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }
}

/// What the connection's task shares between its driver and its streams.
pub(crate) struct State {
    /// Frames waiting for the socket.
    wbuf: Vec<u8>,
    /// A header block being encoded.
    scratch: Vec<u8>,
    /// What the client lets the proxy send on the connection.
    send_window: i64,
    /// The client's SETTINGS_INITIAL_WINDOW_SIZE.
    initial_send_window: i64,
    /// The client's SETTINGS_MAX_FRAME_SIZE.
    max_frame: usize,
    /// What the client may still send on the connection.
    recv_window: i64,
    /// Received bytes read (or thrown away) and not yet given back to the client.
    unreleased: u32,
    streams: HashMap<u32, Slot, BuildHasherDefault<IdHasher>>,
    /// The stream table's capacity before an idle connection gave it back: taken again at once
    /// when streams next open, instead of growing slot by slot.
    stream_room: usize,
    /// Streams waiting for `wbuf` to drain.
    blocked: Vec<Waker>,
    /// Streams reset because of the client's errors.
    local_resets: usize,
}

/// An open stream.
struct Slot {
    send_window: i64,
    recv_window: i64,
    /// DATA received and not yet read by the request path.
    recv: VecDeque<Bytes>,
    buffered: usize,
    /// Read bytes not yet given back to the client.
    unreleased: u32,
    recv_end: bool,
    trailers: Option<HeaderMap>,
    content_length: Option<u64>,
    received: u64,
    /// The stream is over: reset by the client or by the proxy (with this code).
    reset: Option<Reason>,
    /// The stream's future, waiting for DATA, window or a reset.
    waker: Option<Waker>,
}

impl Slot {
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn park(&mut self, cx: &Context<'_>) {
        match &self.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => self.waker = Some(cx.waker().clone()),
        }
    }
}

impl State {
    fn new() -> Self {
        State {
            wbuf: Vec::new(),
            scratch: Vec::new(),
            send_window: frame::DEFAULT_WINDOW,
            initial_send_window: frame::DEFAULT_WINDOW,
            max_frame: frame::DEFAULT_MAX_FRAME,
            recv_window: i64::from(CONNECTION_WINDOW),
            unreleased: 0,
            streams: HashMap::default(),
            stream_room: 0,
            blocked: Vec::new(),
            local_resets: 0,
        }
    }

    /// `n` received bytes were read or dropped: given back to the client once half the
    /// connection's window is owed.
    fn release(&mut self, n: usize) {
        self.unreleased = self.unreleased.saturating_add(n as u32);
        if self.unreleased >= CONNECTION_WINDOW / 2 {
            frame::write_window_update(&mut self.wbuf, 0, self.unreleased);
            self.recv_window += i64::from(self.unreleased);
            self.unreleased = 0;
        }
    }

    /// Resets stream `id` because of the client's error.
    fn reset_stream(&mut self, id: u32, reason: Reason) {
        tracing::debug!(
            stream = id,
            code = reason.0,
            "HTTP/2 stream reset for the client's error"
        );
        frame::write_rst_stream(&mut self.wbuf, id, reason);
        self.local_resets += 1;
        if let Some(slot) = self.streams.get_mut(&id) {
            slot.reset = Some(reason);
            slot.wake();
        }
    }

    fn wake_all(&mut self) {
        for slot in self.streams.values_mut() {
            slot.wake();
        }
    }

    /// The next piece of stream `id`'s request body (see [`RequestBody`]).
    pub(crate) fn poll_body(
        &mut self,
        id: u32,
        cx: &Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(slot) = self.streams.get_mut(&id) else {
            return Poll::Ready(Some(Err(BodyError::Closed)));
        };
        if let Some(data) = slot.recv.pop_front() {
            let n = data.len();
            slot.buffered -= n;
            if !slot.recv_end {
                slot.unreleased = slot.unreleased.saturating_add(n as u32);
                if slot.unreleased >= STREAM_WINDOW / 2 {
                    frame::write_window_update(&mut self.wbuf, id, slot.unreleased);
                    slot.recv_window += i64::from(slot.unreleased);
                    slot.unreleased = 0;
                }
            }
            self.release(n);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(r) = slot.reset {
            return Poll::Ready(Some(Err(BodyError::Reset(r.0))));
        }
        if slot.recv_end {
            return Poll::Ready(slot.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        slot.park(cx);
        Poll::Pending
    }

    pub(crate) fn body_ended(&self, id: u32) -> bool {
        self.streams
            .get(&id)
            .is_none_or(|s| s.recv_end && s.recv.is_empty() && s.trailers.is_none())
    }
}

/// Serves one HTTP/2 client connection (whose preface `io` still holds) until it closes.
pub(crate) async fn serve<I>(
    settings: &Settings,
    shared: Arc<Shared>,
    io: I,
    client: Arc<ClientInfo>,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let limit = settings.client_write_timeout;
    let (shared, client) = (&shared, &client);
    let state = new_state();
    serve_with(
        settings,
        io,
        shutdown,
        &state,
        move |conn, id, req, body| stream(shared, client, conn, id, req, body, limit),
    )
    .await
}

/// A connection's shared state, before its first frame.
pub(crate) fn new_state() -> Mutex<State> {
    Mutex::new(State::new())
}

/// Serves a connection whose state is `state` (from [`new_state`]), answering each stream
/// with the future `answer` makes for it.
pub(crate) async fn serve_with<'a, I, F, A>(
    settings: &Settings,
    io: I,
    shutdown: CancellationToken,
    state: &'a Mutex<State>,
    answer: A,
) where
    I: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = ()>,
    A: FnMut(&'a Mutex<State>, u32, H2Request, RequestBody<'a>) -> F,
{
    let mut driver = Driver {
        io,
        conn: state,
        streams: None,
        answer,
        rbuf: BytesMut::with_capacity(READ_CHUNK),
        decoder: hpack::Decoder::new(4096),
        list: HeaderList::new(),
        pending: None,
        preface: false,
        settled: false,
        last_stream: 0,
        opened: 0,
        cancelled: 0,
        read_closed: false,
        draining: None,
        peer_gone: false,
        error: None,
        shutdown: Some(Box::pin(shutdown.cancelled_owned())),
        max_header_bytes: settings.max_header_bytes,
        write_limit: settings.client_write_timeout,
        write_timer: None,
        ping_interval: settings.keep_alive_interval,
        ping_timeout: settings.keep_alive_timeout,
        ping_timer: Box::pin(tokio::time::sleep(settings.keep_alive_interval)),
        awaiting_pong: false,
    };
    {
        let mut st = lock(state);
        frame::write_settings(
            &mut st.wbuf,
            &[
                (frame::SETTINGS_ENABLE_PUSH, 0),
                (frame::SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS as u32),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (
                    frame::SETTINGS_MAX_HEADER_LIST_SIZE,
                    settings.max_header_bytes.try_into().unwrap_or(u32::MAX),
                ),
            ],
        );
        frame::write_window_update(
            &mut st.wbuf,
            0,
            CONNECTION_WINDOW - frame::DEFAULT_WINDOW as u32,
        );
    }
    poll_fn(|cx| driver.poll_conn(cx)).await;
}

/// A header block waiting for its CONTINUATION frames.
struct Pending {
    stream: u32,
    end_stream: bool,
    block: Vec<u8>,
}

/// The connection and its streams, polled together (see the module).
struct Driver<'a, I, F, A> {
    io: I,
    conn: &'a Mutex<State>,
    /// The streams being answered; none while there are none to run (see `release_if_idle`).
    streams: Option<FuturesUnordered<F>>,
    answer: A,
    rbuf: BytesMut,
    decoder: hpack::Decoder,
    /// Decoded fields (moved into the request they make).
    list: HeaderList,
    pending: Option<Pending>,
    /// The client's preface has been read.
    preface: bool,
    /// The client's first SETTINGS has been read.
    settled: bool,
    /// The highest stream id the client has opened.
    last_stream: u32,
    /// Streams served, and those of them the client reset while they ran.
    opened: usize,
    cancelled: usize,
    read_closed: bool,
    /// A GOAWAY was sent for shutdown: streams above this id are not served.
    draining: Option<u32>,
    /// The client sent GOAWAY.
    peer_gone: bool,
    /// A connection error: GOAWAY is written, then the connection closes.
    error: Option<Reason>,
    shutdown: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    max_header_bytes: usize,
    /// Bounds a write the client does not take.
    write_limit: Duration,
    write_timer: Option<Pin<Box<Sleep>>>,
    ping_interval: Duration,
    ping_timeout: Duration,
    ping_timer: Pin<Box<Sleep>>,
    awaiting_pong: bool,
}

/// The PING payload of the proxy's keep-alive.
const PING_PAYLOAD: [u8; 8] = *b"hangar\0\0";

impl<'a, I, F, A> Driver<'a, I, F, A>
where
    I: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = ()>,
    A: FnMut(&'a Mutex<State>, u32, H2Request, RequestBody<'a>) -> F,
{
    fn poll_conn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let this = self;
        if let Some(s) = this.shutdown.as_mut()
            && s.as_mut().poll(cx).is_ready()
        {
            this.shutdown = None;
            this.draining = Some(this.last_stream);
            frame::write_goaway(
                &mut lock(this.conn).wbuf,
                this.last_stream,
                Reason::NO_ERROR,
            );
        }
        if this.keep_alive_expired(cx) {
            tracing::debug!("HTTP/2 client did not answer a PING in time; closing");
            return Poll::Ready(());
        }
        loop {
            let mut progress = false;
            if this.error.is_none() && !this.read_closed && lock(this.conn).wbuf.len() < WRITE_HIGH
            {
                if this.rbuf.capacity() - this.rbuf.len() < READ_CHUNK {
                    this.rbuf.reserve(READ_CHUNK);
                }
                match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.rbuf) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => this.read_closed = true,
                    Poll::Ready(Ok(_)) => progress = true,
                    Poll::Pending => {}
                }
                this.read_frames();
            }
            if this.error.is_none()
                && let Some(streams) = this.streams.as_mut()
            {
                while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
            }
            match this.flush(cx) {
                Poll::Ready(Ok(wrote)) => progress |= wrote,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => {}
            }
            let idle = lock(this.conn).wbuf.is_empty();
            if this.error.is_some() || this.read_closed {
                // A connection error or a client that closed: what is written goes out, then
                // the connection ends (its streams with it).
                if idle {
                    let _ = Pin::new(&mut this.io).poll_shutdown(cx);
                    return Poll::Ready(());
                }
                if !progress {
                    return this.poll_write_timer(cx);
                }
                continue;
            }
            if (this.draining.is_some() || this.peer_gone) && this.no_streams() && idle {
                let _ = Pin::new(&mut this.io).poll_shutdown(cx);
                return Poll::Ready(());
            }
            if !progress {
                if idle {
                    this.write_timer = None;
                    this.release_if_idle();
                    return Poll::Pending;
                }
                return this.poll_write_timer(cx);
            }
        }
    }

    /// A connection with no stream open and nothing half read or unsent gives its buffers
    /// back while it waits (as HTTP/1.1 connections do): idle clients, such as browsers that
    /// keep a connection for later, cost no buffers. The next read allocates again.
    ///
    /// The same goes for the room that serving streams left behind: the stream set (whose stub
    /// task is as large as a stream's future, about 2 KB), the stream table's slots and the
    /// decoded-field list's room. With those and the dynamic table's room taken only as entries
    /// need it (`hpack`), an idle connection holds little beyond its task. The table and the
    /// list remember their size and take it back in one allocation each when the next streams
    /// open (a busy connection goes idle between bursts; growing them step by step each time
    /// cost 2.7% more instructions per h2c request in the benchmark).
    fn release_if_idle(&mut self) {
        if !self.no_streams() || !self.rbuf.is_empty() || self.pending.is_some() {
            return;
        }
        self.rbuf = BytesMut::new();
        self.streams = None;
        self.list.release();
        let mut st = lock(self.conn);
        if st.wbuf.is_empty() {
            st.wbuf = Vec::new();
            st.scratch = Vec::new();
        }
        if st.streams.is_empty() && st.streams.capacity() > 0 {
            st.stream_room = st.streams.capacity();
            st.streams = HashMap::default();
        }
        if st.blocked.is_empty() {
            st.blocked = Vec::new();
        }
    }

    fn no_streams(&self) -> bool {
        self.streams.as_ref().is_none_or(FuturesUnordered::is_empty)
    }

    /// Waiting on a client that takes no bytes: closes the connection after the write limit.
    fn poll_write_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let limit = self.write_limit;
        let timer = self
            .write_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            tracing::debug!(?limit, "HTTP/2 client took no bytes in time; closing");
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Writes what is waiting; `Ok(true)` if anything went out.
    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        let mut st = lock(self.conn);
        let mut written = 0;
        while written < st.wbuf.len() {
            match Pin::new(&mut self.io).poll_write(cx, &st.wbuf[written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if written > 0 {
            st.wbuf.drain(..written);
            // Progress: the write limit counts from here.
            self.write_timer = None;
            if st.wbuf.len() < WRITE_HIGH / 2 {
                for w in st.blocked.drain(..) {
                    w.wake();
                }
            }
        }
        if st.wbuf.is_empty() {
            drop(st);
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            return Poll::Ready(Ok(written > 0));
        }
        if written > 0 {
            Poll::Ready(Ok(true))
        } else {
            Poll::Pending
        }
    }

    /// Sends a PING every interval; true once one went unanswered for the timeout.
    fn keep_alive_expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.ping_timer.as_mut().poll(cx).is_ready() {
            if self.awaiting_pong {
                return true;
            }
            frame::write_ping(&mut lock(self.conn).wbuf, false, PING_PAYLOAD);
            self.awaiting_pong = true;
            self.ping_timer
                .as_mut()
                .reset(Instant::now() + self.ping_timeout);
        }
        false
    }

    /// A connection error (RFC 9113 §5.4.1): GOAWAY, then close.
    fn fail(&mut self, reason: Reason) {
        if self.error.is_none() {
            tracing::debug!(code = reason.0, "HTTP/2 connection error; closing");
            self.error = Some(reason);
            // After what is already queued (a frame may be half written).
            frame::write_goaway(&mut lock(self.conn).wbuf, self.last_stream, reason);
        }
    }

    /// Handles every complete frame in the read buffer.
    fn read_frames(&mut self) {
        if !self.preface {
            if self.rbuf.len() < frame::PREFACE.len() {
                return;
            }
            if self.rbuf[..frame::PREFACE.len()] != frame::PREFACE[..] {
                self.fail(Reason::PROTOCOL_ERROR);
                return;
            }
            self.rbuf.advance(frame::PREFACE.len());
            self.preface = true;
        }
        while self.error.is_none() && self.rbuf.len() >= frame::HEAD_LEN {
            let head = Head::parse(&self.rbuf);
            if head.len > frame::DEFAULT_MAX_FRAME {
                self.fail(Reason::FRAME_SIZE_ERROR);
                return;
            }
            if self.rbuf.len() < frame::HEAD_LEN + head.len {
                return;
            }
            if !self.settled && (head.kind != frame::SETTINGS || head.has(frame::ACK)) {
                self.fail(Reason::PROTOCOL_ERROR);
                return;
            }
            if self.pending.is_some() && head.kind != frame::CONTINUATION {
                self.fail(Reason::PROTOCOL_ERROR);
                return;
            }
            if head.kind == frame::DATA {
                let data = self.rbuf.split_to(frame::HEAD_LEN + head.len).freeze();
                self.on_data(head, data.slice(frame::HEAD_LEN..));
            } else {
                self.rbuf.advance(frame::HEAD_LEN);
                let payload = self.rbuf.split_to(head.len);
                self.on_frame(head, &payload);
            }
        }
    }

    fn on_frame(&mut self, head: Head, payload: &[u8]) {
        match head.kind {
            frame::HEADERS => self.on_headers(head, payload),
            frame::CONTINUATION => self.on_continuation(head, payload),
            frame::PRIORITY => {
                if head.stream == 0 {
                    self.fail(Reason::PROTOCOL_ERROR);
                } else if head.len != 5 {
                    lock(self.conn).reset_stream(head.stream, Reason::FRAME_SIZE_ERROR);
                }
            }
            frame::RST_STREAM => self.on_rst_stream(head, payload),
            frame::SETTINGS => self.on_settings(head, payload),
            frame::PUSH_PROMISE => self.fail(Reason::PROTOCOL_ERROR),
            frame::PING => {
                if head.stream != 0 {
                    self.fail(Reason::PROTOCOL_ERROR);
                } else if head.len != 8 {
                    self.fail(Reason::FRAME_SIZE_ERROR);
                } else if head.has(frame::ACK) {
                    if payload == PING_PAYLOAD && self.awaiting_pong {
                        self.awaiting_pong = false;
                        self.ping_timer
                            .as_mut()
                            .reset(Instant::now() + self.ping_interval);
                    }
                } else {
                    let mut p = [0; 8];
                    p.copy_from_slice(payload);
                    frame::write_ping(&mut lock(self.conn).wbuf, true, p);
                }
            }
            frame::GOAWAY => {
                if head.stream != 0 {
                    self.fail(Reason::PROTOCOL_ERROR);
                } else if head.len < 8 {
                    self.fail(Reason::FRAME_SIZE_ERROR);
                } else {
                    self.peer_gone = true;
                }
            }
            frame::WINDOW_UPDATE => self.on_window_update(head, payload),
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => {}
        }
    }

    fn on_settings(&mut self, head: Head, payload: &[u8]) {
        if head.stream != 0 {
            return self.fail(Reason::PROTOCOL_ERROR);
        }
        if head.has(frame::ACK) {
            if head.len != 0 {
                self.fail(Reason::FRAME_SIZE_ERROR);
            }
            return;
        }
        if !head.len.is_multiple_of(6) {
            return self.fail(Reason::FRAME_SIZE_ERROR);
        }
        self.settled = true;
        let mut st = lock(self.conn);
        for s in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match id {
                frame::SETTINGS_ENABLE_PUSH if v > 1 => {
                    drop(st);
                    return self.fail(Reason::PROTOCOL_ERROR);
                }
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    let v = i64::from(v);
                    if v > frame::MAX_WINDOW {
                        drop(st);
                        return self.fail(Reason::FLOW_CONTROL_ERROR);
                    }
                    let delta = v - st.initial_send_window;
                    st.initial_send_window = v;
                    let mut overflow = false;
                    for slot in st.streams.values_mut() {
                        slot.send_window += delta;
                        overflow |= slot.send_window > frame::MAX_WINDOW;
                        slot.wake();
                    }
                    if overflow {
                        drop(st);
                        return self.fail(Reason::FLOW_CONTROL_ERROR);
                    }
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME as u32..=frame::MAX_MAX_FRAME).contains(&v) {
                        drop(st);
                        return self.fail(Reason::PROTOCOL_ERROR);
                    }
                    st.max_frame = v as usize;
                }
                // The encoder never indexes, so the client's table size does not matter;
                // push is never used; the header list size is advisory.
                _ => {}
            }
        }
        frame::write_settings_ack(&mut st.wbuf);
    }

    fn on_window_update(&mut self, head: Head, payload: &[u8]) {
        if head.len != 4 {
            return self.fail(Reason::FRAME_SIZE_ERROR);
        }
        let inc = i64::from(
            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff,
        );
        let mut st = lock(self.conn);
        if head.stream == 0 {
            if inc == 0 {
                drop(st);
                return self.fail(Reason::PROTOCOL_ERROR);
            }
            st.send_window += inc;
            if st.send_window > frame::MAX_WINDOW {
                drop(st);
                return self.fail(Reason::FLOW_CONTROL_ERROR);
            }
            st.wake_all();
            return;
        }
        if head.stream > self.last_stream {
            drop(st);
            return self.fail(Reason::PROTOCOL_ERROR);
        }
        let Some(slot) = st.streams.get_mut(&head.stream) else {
            // A stream that is over: nothing to do.
            return;
        };
        if inc == 0 {
            return st.reset_stream(head.stream, Reason::PROTOCOL_ERROR);
        }
        slot.send_window += inc;
        if slot.send_window > frame::MAX_WINDOW {
            return st.reset_stream(head.stream, Reason::FLOW_CONTROL_ERROR);
        }
        slot.wake();
    }

    fn on_rst_stream(&mut self, head: Head, payload: &[u8]) {
        if head.stream == 0 {
            return self.fail(Reason::PROTOCOL_ERROR);
        }
        if head.len != 4 {
            return self.fail(Reason::FRAME_SIZE_ERROR);
        }
        if head.stream > self.last_stream {
            return self.fail(Reason::PROTOCOL_ERROR);
        }
        let code = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let cancelled = {
            let mut st = lock(self.conn);
            match st.streams.get_mut(&head.stream) {
                Some(slot) if slot.reset.is_none() => {
                    slot.reset = Some(Reason(code));
                    slot.wake();
                    true
                }
                _ => false,
            }
        };
        // Opening streams and cancelling them at once makes the proxy start request after
        // request (and drop backend connections mid-request) for a few bytes each: a client
        // that cancels more than it lets run is cut off ("rapid reset").
        if cancelled {
            self.cancelled += 1;
            if self.cancelled > MAX_CANCELLED && self.cancelled * 2 > self.opened {
                self.fail(Reason::ENHANCE_YOUR_CALM);
            }
        }
    }

    fn on_data(&mut self, head: Head, payload: Bytes) {
        if head.stream == 0 {
            return self.fail(Reason::PROTOCOL_ERROR);
        }
        let mut st = lock(self.conn);
        st.recv_window -= head.len as i64;
        if st.recv_window < 0 {
            drop(st);
            return self.fail(Reason::FLOW_CONTROL_ERROR);
        }
        let Some((start, end)) = frame::unpad(&head, &payload) else {
            drop(st);
            return self.fail(Reason::PROTOCOL_ERROR);
        };
        let data_len = end - start;
        // Padding is given back at once.
        st.release(head.len - data_len);
        let Some(slot) = st.streams.get_mut(&head.stream) else {
            if head.stream > self.last_stream {
                drop(st);
                return self.fail(Reason::PROTOCOL_ERROR);
            }
            // A stream that is over (answered or reset): the bytes are dropped.
            st.release(data_len);
            return;
        };
        if slot.recv_end || slot.reset.is_some() {
            let reset = slot.reset.is_some();
            st.release(data_len);
            if !reset {
                st.reset_stream(head.stream, Reason::STREAM_CLOSED);
            }
            return;
        }
        slot.recv_window -= head.len as i64;
        slot.unreleased = slot.unreleased.saturating_add((head.len - data_len) as u32);
        slot.received += data_len as u64;
        let over = slot.recv_window < 0;
        let end_stream = head.has(frame::END_STREAM);
        let bad_length = slot
            .content_length
            .is_some_and(|cl| slot.received > cl || (end_stream && slot.received != cl));
        if over || bad_length {
            st.release(data_len);
            let reason = if over {
                Reason::FLOW_CONTROL_ERROR
            } else {
                Reason::PROTOCOL_ERROR
            };
            return st.reset_stream(head.stream, reason);
        }
        if data_len > 0 {
            slot.recv.push_back(payload.slice(start..end));
            slot.buffered += data_len;
        }
        slot.recv_end = end_stream;
        slot.wake();
    }

    fn on_headers(&mut self, head: Head, payload: &[u8]) {
        let id = head.stream;
        if id == 0 {
            return self.fail(Reason::PROTOCOL_ERROR);
        }
        let Some((mut start, end)) = frame::unpad(&head, payload) else {
            return self.fail(Reason::PROTOCOL_ERROR);
        };
        if head.has(frame::PRIORITY_FLAG) {
            start += 5;
            if start > end {
                return self.fail(Reason::FRAME_SIZE_ERROR);
            }
        }
        let fragment = &payload[start..end];
        let end_stream = head.has(frame::END_STREAM);
        if head.has(frame::END_HEADERS) {
            self.on_block(id, end_stream, fragment);
        } else {
            self.pending = Some(Pending {
                stream: id,
                end_stream,
                block: fragment.to_vec(),
            });
        }
    }

    fn on_continuation(&mut self, head: Head, payload: &[u8]) {
        let Some(p) = self.pending.as_mut().filter(|p| p.stream == head.stream) else {
            return self.fail(Reason::PROTOCOL_ERROR);
        };
        p.block.extend_from_slice(payload);
        // A block can only be thrown away whole (the decoder's table must stay in step), so
        // one that grows past any sensible size ends the connection.
        if p.block.len() > 2 * self.max_header_bytes.max(frame::DEFAULT_MAX_FRAME) {
            return self.fail(Reason::ENHANCE_YOUR_CALM);
        }
        if head.has(frame::END_HEADERS) {
            let p = self.pending.take().expect("checked above");
            self.on_block(p.stream, p.end_stream, &p.block);
        }
    }

    /// A complete header block: a new request, or a request's trailers.
    fn on_block(&mut self, id: u32, end_stream: bool, block: &[u8]) {
        if self
            .decoder
            .decode(block, self.max_header_bytes, &mut self.list)
            .is_err()
        {
            return self.fail(Reason::COMPRESSION_ERROR);
        }
        if id <= self.last_stream {
            return self.on_trailers(id, end_stream);
        }
        if id.is_multiple_of(2) {
            return self.fail(Reason::PROTOCOL_ERROR);
        }
        self.last_stream = id;
        if self.draining.is_some_and(|last| id > last) || self.peer_gone {
            // After GOAWAY: not served (the client may retry it elsewhere).
            return;
        }
        let mut st = lock(self.conn);
        if st.local_resets > MAX_LOCAL_RESETS {
            drop(st);
            return self.fail(Reason::ENHANCE_YOUR_CALM);
        }
        if self.list.too_large() {
            // Answered at once; the client learns why.
            st.scratch.clear();
            hpack::encode_status(431, &mut st.scratch);
            let st = &mut *st;
            frame::write_headers(&mut st.wbuf, id, &st.scratch, true, st.max_frame);
            if !end_stream {
                frame::write_rst_stream(&mut st.wbuf, id, Reason::NO_ERROR);
            }
            return;
        }
        if st.streams.len() >= MAX_STREAMS {
            frame::write_rst_stream(&mut st.wbuf, id, Reason::REFUSED_STREAM);
            return;
        }
        let next = self.list.with_room_of();
        let list = std::mem::replace(&mut self.list, next);
        let req = match H2Request::new(list) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "malformed HTTP/2 request; stream reset");
                frame::write_rst_stream(&mut st.wbuf, id, Reason::PROTOCOL_ERROR);
                st.local_resets += 1;
                return;
            }
        };
        if end_stream && req.content_length.is_some_and(|n| n > 0) {
            // A body announced and none sent (RFC 9113 §8.1.1).
            frame::write_rst_stream(&mut st.wbuf, id, Reason::PROTOCOL_ERROR);
            st.local_resets += 1;
            return;
        }
        let send_window = st.initial_send_window;
        if st.streams.capacity() == 0 {
            let room = st.stream_room;
            st.streams.reserve(room);
        }
        st.streams.insert(
            id,
            Slot {
                send_window,
                recv_window: i64::from(STREAM_WINDOW),
                recv: VecDeque::new(),
                buffered: 0,
                unreleased: 0,
                recv_end: end_stream,
                trailers: None,
                content_length: req.content_length,
                received: 0,
                reset: None,
                waker: None,
            },
        );
        drop(st);
        self.opened += 1;
        let body = RequestBody::new(self.conn, id, req.content_length, end_stream);
        let fut = (self.answer)(self.conn, id, req, body);
        self.streams
            .get_or_insert_with(FuturesUnordered::new)
            .push(fut);
    }

    fn on_trailers(&mut self, id: u32, end_stream: bool) {
        let mut st = lock(self.conn);
        let Some(slot) = st.streams.get_mut(&id) else {
            // Trailers of a stream that is over: decoded (for the table) and dropped.
            return;
        };
        if slot.recv_end || slot.reset.is_some() {
            return;
        }
        let trailers = if end_stream && !self.list.too_large() {
            request::trailers(&self.list).ok()
        } else {
            None
        };
        let Some(trailers) = trailers else {
            // Trailers must end the stream, and be well formed.
            return st.reset_stream(id, Reason::PROTOCOL_ERROR);
        };
        if slot.content_length.is_some_and(|cl| cl != slot.received) {
            return st.reset_stream(id, Reason::PROTOCOL_ERROR);
        }
        slot.trailers = Some(trailers);
        slot.recv_end = true;
        slot.wake();
    }
}

/// Ends a stream when its future ends or is dropped: the slot is removed, the window its
/// unread DATA held is given back, and the client learns of an early end.
pub(crate) struct StreamGuard<'a> {
    conn: &'a Mutex<State>,
    id: u32,
    /// The response was sent whole.
    done: bool,
    /// Why the stream ended early.
    reason: Reason,
}

impl<'a> StreamGuard<'a> {
    pub(crate) fn new(conn: &'a Mutex<State>, id: u32) -> Self {
        StreamGuard {
            conn,
            id,
            done: false,
            reason: Reason::CANCEL,
        }
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        let mut st = lock(self.conn);
        let Some(slot) = st.streams.remove(&self.id) else {
            return;
        };
        st.release(slot.buffered);
        if slot.reset.is_none() {
            if !self.done {
                tracing::debug!(
                    stream = self.id,
                    code = self.reason.0,
                    "HTTP/2 stream ended early"
                );
                frame::write_rst_stream(&mut st.wbuf, self.id, self.reason);
            } else if !slot.recv_end {
                // Answered before the request body ended: the client may stop sending it
                // (RFC 9113 §8.1).
                frame::write_rst_stream(&mut st.wbuf, self.id, Reason::NO_ERROR);
            }
        }
    }
}

/// Answers one stream: the request path, then the response.
async fn stream<'c>(
    shared: &Arc<Shared>,
    client: &ClientInfo,
    conn: &'c Mutex<State>,
    id: u32,
    req: H2Request,
    body: RequestBody<'c>,
    limit: Duration,
) {
    let mut guard = StreamGuard::new(conn, id);
    let resp = {
        let mut path = pin!(service::respond(shared, &req, body, client, || {
            // HTTP/2 requests never ask to switch protocols (the field is refused).
            Box::pin(async { Err::<Box<dyn ClientIo>, _>("HTTP/2 cannot switch protocols".into()) })
        }));
        let answered = poll_fn(|cx| {
            if let Poll::Ready(resp) = path.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            // The client may give up on the stream while the backend works.
            let mut st = lock(conn);
            match st.streams.get_mut(&id) {
                Some(slot) if slot.reset.is_none() => {
                    slot.park(cx);
                    Poll::Pending
                }
                _ => Poll::Ready(None),
            }
        })
        .await;
        match answered {
            Some(resp) => resp,
            None => return,
        }
    };
    let ProxyResponse {
        status,
        fields,
        has_date,
        body,
    } = resp;
    send_response(conn, &mut guard, status, &fields, has_date, body, limit).await;
}

/// Sends a response on the guard's stream: its head (the header lines `fields`, as
/// [`ProxyResponse`] holds them), then its body (see [`pipe`]).
pub(crate) async fn send_response<B>(
    conn: &Mutex<State>,
    guard: &mut StreamGuard<'_>,
    status: http::StatusCode,
    fields: &[u8],
    has_date: bool,
    body: B,
    limit: Duration,
) where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let id = guard.id;
    let end = body.is_end_stream();
    {
        let mut st = lock(conn);
        if st.streams.get(&id).is_none_or(|s| s.reset.is_some()) {
            return;
        }
        let st = &mut *st;
        st.scratch.clear();
        let length = if end { None } else { body.size_hint().exact() };
        encode_response(status, fields, has_date, length, &mut st.scratch);
        frame::write_headers(&mut st.wbuf, id, &st.scratch, end, st.max_frame);
    }
    if end {
        guard.done = true;
        return;
    }
    pipe(conn, body, limit, guard).await;
}

/// The response head as a header block: the fields the backend sent (names lower-cased), a
/// `date` if it sent none, and the body's length when it is known.
pub(crate) fn encode_response(
    status: http::StatusCode,
    fields: &[u8],
    has_date: bool,
    length: Option<u64>,
    out: &mut Vec<u8>,
) {
    hpack::encode_status(status.as_u16(), out);
    for (name, value) in crate::head::field_lines(fields) {
        hpack::encode_field(name, value, out);
    }
    if !has_date {
        crate::head::with_date(|d| hpack::encode_field(b"date", d.as_bytes(), out));
    }
    if let Some(n) = length {
        let mut b = itoa::Buffer::new();
        hpack::encode_field(b"content-length", b.format(n).as_bytes(), out);
    }
}

/// Sends `body` on the guard's stream, a piece at a time as the client's windows let it
/// (reading the body no faster); resets the stream when the client gives no room for `limit`.
async fn pipe<B>(conn: &Mutex<State>, mut body: B, limit: Duration, guard: &mut StreamGuard<'_>)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let id = guard.id;
    let mut stall = Stall::new(limit);
    // A piece read from the body and not yet all sent, and whether it is the last.
    let mut piece: Option<(Bytes, bool)> = None;
    poll_fn(|cx| {
        loop {
            {
                let mut st = lock(conn);
                let st = &mut *st;
                let Some(slot) = st.streams.get_mut(&id) else {
                    return Poll::Ready(());
                };
                if slot.reset.is_some() {
                    return Poll::Ready(());
                }
                if let Some((data, true)) = &piece
                    && data.is_empty()
                {
                    // The end of the body takes no window.
                    frame::write_head(&mut st.wbuf, 0, frame::DATA, frame::END_STREAM, id);
                    guard.done = true;
                    return Poll::Ready(());
                }
                let room = slot.send_window.min(st.send_window);
                if room <= 0 || st.wbuf.len() >= WRITE_HIGH {
                    if room <= 0 {
                        slot.park(cx);
                    } else {
                        st.blocked.push(cx.waker().clone());
                    }
                    if stall.poll_expired(cx) {
                        tracing::debug!(
                            ?limit,
                            "HTTP/2 client accepted no response bytes in time; stream reset"
                        );
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
                stall.progress();
                if let Some((data, last)) = piece.as_mut() {
                    let n = data.len().min(room as usize).min(st.max_frame);
                    let end = *last && n == data.len();
                    frame::write_head(
                        &mut st.wbuf,
                        n,
                        frame::DATA,
                        if end { frame::END_STREAM } else { 0 },
                        id,
                    );
                    st.wbuf.extend_from_slice(&data[..n]);
                    data.advance(n);
                    slot.send_window -= n as i64;
                    st.send_window -= n as i64;
                    if end {
                        guard.done = true;
                        return Poll::Ready(());
                    }
                    if data.is_empty() {
                        piece = None;
                    }
                    continue;
                }
            }
            match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let last = body.is_end_stream();
                        if !data.is_empty() || last {
                            piece = Some((data, last));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let mut st = lock(conn);
                            let st = &mut *st;
                            st.scratch.clear();
                            for (n, v) in &trailers {
                                hpack::encode_field(
                                    n.as_str().as_bytes(),
                                    v.as_bytes(),
                                    &mut st.scratch,
                                );
                            }
                            frame::write_headers(&mut st.wbuf, id, &st.scratch, true, st.max_frame);
                            guard.done = true;
                            return Poll::Ready(());
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    // The backend broke off: the client must not take a truncated body for a
                    // whole one.
                    tracing::debug!(error = %e, "response body failed; HTTP/2 stream reset");
                    guard.reason = Reason::INTERNAL_ERROR;
                    return Poll::Ready(());
                }
                Poll::Ready(None) => {
                    piece = Some((Bytes::new(), true));
                }
                Poll::Pending => {
                    // Waiting on the backend; the client may reset the stream meanwhile.
                    let mut st = lock(conn);
                    return match st.streams.get_mut(&id) {
                        Some(slot) if slot.reset.is_none() => {
                            slot.park(cx);
                            Poll::Pending
                        }
                        _ => Poll::Ready(()),
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

#[cfg(test)]
#[path = "conn_tests.rs"]
mod tests;
