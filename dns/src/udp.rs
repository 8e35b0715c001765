//! The UDP transport: one loop per socket that reads the datagrams waiting, answers each in
//! order and sends the answers, without a task, a channel or an allocation per query.
//!
//! By default each datagram is read with a `recvfrom` and answered with a `sendto`
//! ([`Io::Single`]), made straight rather than through the C library's wrappers. With
//! [`crate::DnsConfig::udp_batching`] (Linux only), a batch is read with one `recvmmsg` and
//! its answers leave with one `sendmmsg` ([`Io::Batched`]): fewer system calls, but the
//! kernel copies a message header and its iovec in and writes lengths back for every
//! datagram, which on this project's test machines (Linux 6.18, AMD EPYC, no page-table
//! isolation) cost more than the calls saved (`docs/benchmarks.md`). A kernel that refuses
//! those calls falls back to [`Io::Single`]. The bytes sent are the same either way.
//!
//! A query is answered by the fast path (`fast`) when it is the common case, and otherwise
//! the way hickory-server's UDP transport answers it, step for step: datagrams without a
//! readable header and responses are dropped, a header followed by an unparsable message gets
//! FORMERR, everything else goes to the [`Handler`] and is encoded with hickory's rules for
//! UDP (512 bytes without EDNS, the negotiated size with it, truncation with TC). Sources that
//! cannot be answered (port 0, unspecified or broadcast addresses) are ignored, as hickory
//! ignores them. An answer that cannot be sent is logged and skipped; the rest of its batch
//! still goes out.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hickory_proto::op::{Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::fast::{self, Answered};
use crate::metrics;
use crate::server::{DnsError, EDNS_PAYLOAD, Handler};

/// The largest datagram read, as in hickory's transport: longer ones are cut (and then fail
/// to parse or parse as their first 4 KiB).
const RECEIVE_BUFFER: usize = 4096;

/// Datagrams read at once (one `recvmmsg`, and one `sendmmsg` for their answers); the loop
/// offers to yield to other tasks on its thread after each batch.
const BATCH: usize = 64;

/// The source recorded for a datagram whose address cannot be read: never answered.
const UNANSWERABLE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// How the loop reads and sends datagrams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Io {
    /// `recvmmsg` and `sendmmsg`: a system call per batch each way.
    #[cfg(target_os = "linux")]
    Batched,
    /// `recvfrom` and `sendto`: a system call per datagram each way.
    Single,
}

impl Io {
    /// The calls a configuration asks for: batched only where the platform has them.
    pub(crate) fn configured(batching: bool) -> Io {
        #[cfg(target_os = "linux")]
        if batching {
            return Io::Batched;
        }
        let _ = batching;
        Io::Single
    }
}

/// Every way of moving datagrams this platform has; the tests run the loop with each.
#[cfg(all(test, target_os = "linux"))]
pub(crate) const ALL_IO: &[Io] = &[Io::Batched, Io::Single];
#[cfg(all(test, not(target_os = "linux")))]
pub(crate) const ALL_IO: &[Io] = &[Io::Single];

/// The query counter for the fast path's four outcomes: counted here per query and added to
/// the registry's counters once per batch, an interlocked add per outcome rather than per
/// query, through handles looked up on first use (a registry lookup per query costs more
/// than the rest of a fast answer).
#[derive(Default)]
struct FastCounters {
    handles: [Option<::metrics::Counter>; 4],
    pending: [u64; 4],
}

impl FastCounters {
    /// Each slot's labels, in the order of [`Self::slot`].
    const SLOTS: [(&'static str, ResponseCode); 4] = [
        ("A", ResponseCode::NoError),
        ("A", ResponseCode::NXDomain),
        ("AAAA", ResponseCode::NoError),
        ("AAAA", ResponseCode::NXDomain),
    ];

    fn slot(answered: Answered) -> usize {
        let nx = answered.rcode == ResponseCode::NXDomain;
        usize::from(answered.aaaa) * 2 + usize::from(nx)
    }

    fn count(&mut self, answered: Answered) {
        self.pending[Self::slot(answered)] += 1;
    }

    /// Adds what was counted since the last flush to the registry's counters.
    fn flush(&mut self) {
        for ((handle, pending), (qtype, rcode)) in self
            .handles
            .iter_mut()
            .zip(&mut self.pending)
            .zip(Self::SLOTS)
        {
            if *pending > 0 {
                handle
                    .get_or_insert_with(|| {
                        ::metrics::counter!(
                            metrics::QUERIES_TOTAL,
                            "type" => qtype,
                            "rcode" => metrics::rcode_label(rcode)
                        )
                    })
                    .increment(std::mem::take(pending));
            }
        }
    }
}

/// Serves `socket` until `shutdown` fires, starting with the calls of `io` (the tests run
/// each). Fails only when the socket is gone.
pub(crate) async fn serve_with(
    socket: UdpSocket,
    handler: Handler,
    shutdown: CancellationToken,
    mut io: Io,
) -> Result<(), DnsError> {
    let mut socket =
        Registered::new(socket.into_std().map_err(serve_error)?).map_err(serve_error)?;
    let mut round = Round::new();
    let mut views = fast::Views::new(&handler.zone);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            ready = socket.fd().readable() => ready.map_err(serve_error)?.retain_ready(),
        }
        // Batches until the socket has nothing more to read.
        loop {
            let received = match round.receive(socket.fd(), io) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if unsupported(io, &e) => {
                    tracing::warn!(error = %e, "recvmmsg is unavailable; reading one dns query per call");
                    io = Io::Single;
                    continue;
                }
                Err(e) if unrecoverable(&e) => return Err(serve_error(e)),
                Err(error) => {
                    tracing::warn!(%error, "error receiving a dns query on udp");
                    0
                }
            };
            let answers = round.answer(&handler, &mut views, received);
            round.send(&mut socket, &mut io, answers, &shutdown).await?;
            tokio::task::consume_budget().await;
            if shutdown.is_cancelled() {
                return Ok(());
            }
        }
    }
}

/// The loop's buffers, allocated once: a batch of datagrams and their answers.
struct Round {
    /// One receive buffer per datagram of a batch.
    queries: Box<[[u8; RECEIVE_BUFFER]; BATCH]>,
    /// The length and source of the datagram in each buffer.
    received: [(usize, SocketAddr); BATCH],
    /// The batch's answers, in the order of their queries (only the first few are this
    /// batch's), each with room for the largest answer the fast path writes.
    answers: Vec<Vec<u8>>,
    /// Where each answer goes.
    dsts: [SocketAddr; BATCH],
    counters: FastCounters,
}

impl Round {
    fn new() -> Round {
        let queries = vec![[0u8; RECEIVE_BUFFER]; BATCH].into_boxed_slice();
        Round {
            queries: queries.try_into().expect("BATCH receive buffers"),
            received: [(0, UNANSWERABLE); BATCH],
            answers: (0..BATCH)
                .map(|_| Vec::with_capacity(usize::from(EDNS_PAYLOAD)))
                .collect(),
            dsts: [UNANSWERABLE; BATCH],
            counters: FastCounters::default(),
        }
    }

    /// Reads the datagrams waiting, up to a batch, without waiting; `WouldBlock` when there
    /// are none.
    fn receive(&mut self, socket: &AsyncFd<std::net::UdpSocket>, io: Io) -> io::Result<usize> {
        match io {
            // `try_io` clears the socket's readiness when the call would block, so that the
            // loop then waits for the next datagram.
            #[cfg(target_os = "linux")]
            Io::Batched => socket.try_io(Interest::READABLE, |socket| {
                batched::receive(socket, &mut self.queries, &mut self.received)
            }),
            Io::Single => {
                let mut received = 0;
                for (buf, slot) in self.queries.iter_mut().zip(&mut self.received) {
                    match socket.try_io(Interest::READABLE, |socket| single::receive(socket, buf)) {
                        Ok(datagram) => *slot = datagram,
                        Err(e) if received == 0 => return Err(e),
                        // An error after some datagrams ends the batch, as it does recvmmsg's.
                        Err(error) => {
                            if error.kind() != io::ErrorKind::WouldBlock {
                                tracing::warn!(%error, "error receiving a dns query on udp");
                            }
                            break;
                        }
                    }
                    received += 1;
                }
                Ok(received)
            }
        }
    }

    /// Answers the first `received` datagrams in order; returns how many answers there are
    /// (datagrams dropped have none).
    fn answer(&mut self, handler: &Handler, views: &mut fast::Views<'_>, received: usize) -> usize {
        let mut answers = 0;
        for (buf, &(len, src)) in self.queries.iter().zip(&self.received).take(received) {
            if !answerable(src) {
                tracing::debug!(%src, "ignoring a dns query from an address that cannot be answered");
                continue;
            }
            let query = &buf[..len];
            let out = &mut self.answers[answers];
            match fast::answer(views, query, EDNS_PAYLOAD, out) {
                Some(answered) => self.counters.count(answered),
                None => match general_answer(handler, query, src) {
                    // Copied, so that the buffer keeps its room for the fast path.
                    Some(bytes) => {
                        out.clear();
                        out.extend_from_slice(&bytes);
                    }
                    None => continue,
                },
            }
            self.dsts[answers] = src;
            answers += 1;
        }
        self.counters.flush();
        answers
    }

    /// Sends the first `count` answers, waiting for room only when the socket's buffer is
    /// full (registered for writability only while it waits). An answer that cannot be sent
    /// is logged and skipped. Returns early, with answers unsent, when `shutdown` fires while
    /// it waits.
    async fn send(
        &self,
        socket: &mut Registered,
        io: &mut Io,
        count: usize,
        shutdown: &CancellationToken,
    ) -> Result<(), DnsError> {
        let mut next = 0;
        while next < count {
            let (answers, dsts) = (&self.answers[next..count], &self.dsts[next..count]);
            // Straight calls: the registration has no writability to gate them on.
            let tried = match *io {
                #[cfg(target_os = "linux")]
                Io::Batched => batched::send(socket.fd().get_ref(), answers, dsts),
                Io::Single => single::send(socket.fd().get_ref(), &answers[0], dsts[0]).map(|_| 1),
            };
            if let Err(error) = &tried {
                if unsupported(*io, error) {
                    tracing::warn!(%error, "sendmmsg is unavailable; sending one dns response per call");
                    *io = Io::Single;
                    continue;
                }
                if error.kind() != io::ErrorKind::WouldBlock {
                    tracing::debug!(%error, dst = %dsts[0], "cannot send a dns response");
                }
            }
            match advance(next, &tried) {
                Some(after) => next = after,
                None => {
                    socket.set_writable(true).map_err(serve_error)?;
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(()),
                        // Cleared before the next try, so that a try that finds no room
                        // again waits for the next time room is made.
                        ready = socket.fd().writable() => ready.map_err(serve_error)?.clear_ready(),
                    }
                }
            }
        }
        socket.set_writable(false).map_err(serve_error)
    }
}

/// The socket's registration with the runtime: for readability, and for writability only
/// while an answer waits for room. Registered for both, a UDP socket is woken each time the
/// kernel frees the buffer of an answer sent (an `EPOLLOUT` edge): at 20,000 queries a second
/// that was a second `epoll_wait` for every one that brought a query (`docs/benchmarks.md`).
struct Registered {
    /// Always `Some` between calls; empty only inside [`Self::set_writable`], or after it
    /// failed (and the loop ended with its error).
    fd: Option<AsyncFd<std::net::UdpSocket>>,
    writable: bool,
}

impl Registered {
    fn new(socket: std::net::UdpSocket) -> io::Result<Registered> {
        Ok(Registered {
            fd: Some(register(socket, Interest::READABLE)?),
            writable: false,
        })
    }

    fn fd(&self) -> &AsyncFd<std::net::UdpSocket> {
        self.fd.as_ref().expect("the dns socket is registered")
    }

    /// Registers the socket again, for writability too (`true`) or for readability only,
    /// unless it is registered so already. Readiness is found anew: the kernel reports what
    /// is ready when a descriptor is added, so a datagram waiting is not missed.
    fn set_writable(&mut self, writable: bool) -> io::Result<()> {
        if self.writable == writable {
            return Ok(());
        }
        let socket = self
            .fd
            .take()
            .expect("the dns socket is registered")
            .into_inner();
        let interest = if writable {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        self.fd = Some(register(socket, interest)?);
        self.writable = writable;
        Ok(())
    }
}

#[allow(unsafe_code)]
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: the `AsyncFd` owns the socket, so its descriptor stays open and the same until
    // the `AsyncFd` is dropped or hands the socket back (`into_inner`).
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(|e| e.into_parts().1)
}

/// The loop's end on a socket error it cannot go on after.
fn serve_error(e: io::Error) -> DnsError {
    DnsError::Serve(e.to_string())
}

/// Where sending a batch's answers goes on after an attempt that started at answer `next`
/// (`tried` is how many answers left, or why the first of them did not): past the answers
/// sent; past the first one when it failed, so that one unreachable client does not hold up
/// the others; or nowhere (`None`) until the socket has room again.
fn advance(next: usize, tried: &io::Result<usize>) -> Option<usize> {
    match tried {
        // Sending nothing without an error does not happen; moving on guarantees progress.
        Ok(sent) => Some(next + (*sent).max(1)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(_) => Some(next + 1),
    }
}

/// Whether `e` says the batched calls do not exist here (an old kernel, a seccomp filter).
#[cfg(target_os = "linux")]
fn unsupported(io: Io, e: &io::Error) -> bool {
    io == Io::Batched && e.raw_os_error() == Some(nix::libc::ENOSYS)
}

#[cfg(not(target_os = "linux"))]
fn unsupported(_: Io, _: &io::Error) -> bool {
    false
}

/// `recvfrom` and `sendto`, through rustix: straight system calls. std's (and so tokio's)
/// go through the C library's wrappers, which in a process with more than one thread mark
/// each call as a cancellation point with two interlocked operations: 0.07 µs a query in a
/// profile where the whole fast answer took 0.08 (`docs/benchmarks.md`).
mod single {
    use std::io;
    use std::net::SocketAddr;

    use rustix::net::{RecvFlags, SendFlags, recvfrom, sendto};

    use super::UNANSWERABLE;

    /// One datagram into `buf` (cut to its length), with its source; `WouldBlock` when none
    /// is waiting (the socket does not block).
    pub(super) fn receive(
        socket: &std::net::UdpSocket,
        buf: &mut [u8],
    ) -> io::Result<(usize, SocketAddr)> {
        let (len, _, src) = recvfrom(socket, buf, RecvFlags::empty())?;
        let src = src
            .and_then(|a| SocketAddr::try_from(a).ok())
            .unwrap_or(UNANSWERABLE);
        Ok((len, src))
    }

    /// Sends `answer` to `dst`; `WouldBlock` when the socket's buffer is full.
    pub(super) fn send(
        socket: &std::net::UdpSocket,
        answer: &[u8],
        dst: SocketAddr,
    ) -> io::Result<usize> {
        Ok(sendto(socket, answer, SendFlags::empty(), &dst)?)
    }
}

/// The batched system calls, through nix (`recvmmsg`) and rustix (`sendmmsg`).
#[cfg(target_os = "linux")]
mod batched {
    use std::cell::RefCell;
    use std::io::{self, IoSlice, IoSliceMut};
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
    use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny, sendmmsg};

    use super::{BATCH, RECEIVE_BUFFER, UNANSWERABLE};

    thread_local! {
        /// `recvmmsg`'s message headers. They hold raw pointers, which makes them neither
        /// `Send` nor `Sync`, so they cannot live in the loop's future (tokio moves it between
        /// threads): each thread keeps one set, borrowed only inside [`receive`], never across
        /// an `.await`. nix points each header at its own address slot once and never resets
        /// the slot's length; a socket's sources all have its family's length, so the slot
        /// always has room.
        static HEADERS: RefCell<MultiHeaders<SockaddrStorage>> =
            RefCell::new(MultiHeaders::preallocate(BATCH, None));
    }

    /// One `recvmmsg` without waiting: the datagrams go to `queries` in order, their lengths
    /// and sources to `received`; returns how many there are.
    pub(super) fn receive(
        socket: &std::net::UdpSocket,
        queries: &mut [[u8; RECEIVE_BUFFER]; BATCH],
        received: &mut [(usize, SocketAddr); BATCH],
    ) -> io::Result<usize> {
        HEADERS.with_borrow_mut(|headers| {
            let mut iovs = queries.each_mut().map(|buf| [IoSliceMut::new(buf)]);
            let datagrams = recvmmsg(
                socket.as_raw_fd(),
                headers,
                iovs.iter_mut(),
                MsgFlags::MSG_DONTWAIT,
                None,
            )?;
            let mut count = 0;
            for (datagram, slot) in datagrams.zip(received.iter_mut()) {
                let src = datagram.address.and_then(socket_addr);
                *slot = (datagram.bytes, src.unwrap_or(UNANSWERABLE));
                count += 1;
            }
            Ok(count)
        })
    }

    fn socket_addr(addr: SockaddrStorage) -> Option<SocketAddr> {
        match addr.as_sockaddr_in() {
            Some(v4) => Some(SocketAddr::from(*v4)),
            None => addr.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6)),
        }
    }

    /// One `sendmmsg` without waiting of each answer to its destination (a batch at most):
    /// returns how many left, or the error of the first when none did. The message headers
    /// are built for this batch's answers only: a batch is usually a few datagrams, and
    /// headers for all [`BATCH`] (each with a 128-byte address) cost more than the call.
    pub(super) fn send(
        socket: &std::net::UdpSocket,
        answers: &[Vec<u8>],
        dsts: &[SocketAddr],
    ) -> io::Result<usize> {
        let count = answers.len().min(dsts.len()).min(BATCH);
        let addrs: Vec<SocketAddrAny> = dsts[..count]
            .iter()
            .map(|&dst| SocketAddrAny::from(dst))
            .collect();
        let iovs: Vec<[IoSlice<'_>; 1]> = answers[..count]
            .iter()
            .map(|answer| [IoSlice::new(answer)])
            .collect();
        let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
            (0..count).map(|_| SendAncillaryBuffer::default()).collect();
        let mut messages: Vec<MMsgHdr<'_>> = controls
            .iter_mut()
            .zip(addrs.iter().zip(&iovs))
            .map(|(control, (addr, iov))| MMsgHdr::new_with_addr(addr, iov, control))
            .collect();
        Ok(sendmmsg(socket, &mut messages, SendFlags::DONTWAIT)?)
    }
}

/// hickory's check of the source before answering: never to port 0, an unspecified address
/// or the IPv4 broadcast address.
fn answerable(src: SocketAddr) -> bool {
    src.port() != 0
        && match src.ip() {
            IpAddr::V4(ip) => !ip.is_unspecified() && !ip.is_broadcast(),
            IpAddr::V6(ip) => !ip.is_unspecified(),
        }
}

/// Socket errors after which hickory's transport stops serving.
fn unrecoverable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotConnected | io::ErrorKind::ConnectionAborted
    )
}

/// The general path: the answer hickory-server's UDP transport sends for `query` with our
/// handler, or `None` when it sends nothing.
pub(crate) fn general_answer(handler: &Handler, query: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
    let header = Header::read(&mut BinDecoder::new(query)).ok()?;
    match Request::from_bytes(query.to_vec(), src, Protocol::Udp) {
        Err(error) => {
            tracing::debug!(%error, %src, "answering an unparsable dns query with FORMERR");
            let queries = Queries::read(&mut BinDecoder::new(&[]), 0).ok()?;
            let response = MessageResponseBuilder::new(&queries, None)
                .error_msg(&header.metadata, ResponseCode::FormErr);
            Some(encode(response))
        }
        // Never answer responses (reflection).
        Ok(request) if request.metadata.message_type == MessageType::Response => None,
        Ok(request) => Some(encode(handler.prepare(&request).response(&request))),
    }
}

/// Encodes a response as hickory-server does for UDP: at most 512 bytes without EDNS and the
/// EDNS payload size with it (truncating with TC), and a bare SERVFAIL header if it cannot be
/// encoded.
fn encode<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> Vec<u8> {
    let id = response.metadata().id;
    let max = response.edns().map_or(512, |e| e.max_payload());
    let mut bytes = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(max);
    let error = match response.destructive_emit(&mut encoder) {
        Ok(_) => return bytes,
        Err(error) => error,
    };
    tracing::error!(%error, "cannot encode a dns response");
    bytes.clear();
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(512);
    let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
    metadata.response_code = ResponseCode::ServFail;
    let header = Header {
        metadata,
        counts: HeaderCounts::default(),
    };
    // A bare header always fits in 512 bytes.
    let _ = hickory_proto::serialize::binary::BinEncodable::emit(&header, &mut encoder);
    bytes
}

#[cfg(test)]
mod tests;
