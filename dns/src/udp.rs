//! The UDP transport: one loop per socket that reads every datagram waiting, answers it and
//! sends the answer, without a task, a channel or an allocation per query.
//!
//! A query is answered by the fast path (`fast`) when it is the common case, and otherwise
//! the way hickory-server's UDP transport answers it, step for step: datagrams without a
//! readable header and responses are dropped, a header followed by an unparsable message gets
//! FORMERR, everything else goes to the [`Handler`] and is encoded with hickory's rules for
//! UDP (512 bytes without EDNS, the negotiated size with it, truncation with TC). Sources that
//! cannot be answered (port 0, unspecified or broadcast addresses) are ignored, as hickory
//! ignores them.

use std::io;
use std::net::{IpAddr, SocketAddr};

use hickory_proto::op::{Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder, Queries};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::fast::{self, Answered};
use crate::metrics;
use crate::server::{DnsError, EDNS_PAYLOAD, Handler};

/// The largest datagram read, as in hickory's transport: longer ones are cut (and then fail
/// to parse or parse as their first 4 KiB).
const RECEIVE_BUFFER: usize = 4096;

/// Datagrams answered before the loop yields to other tasks on its thread.
const BATCH: usize = 64;

/// The query counter's handles for the fast path's four outcomes, looked up on first use
/// (a registry lookup per query costs more than the rest of a fast answer).
#[derive(Default)]
struct FastCounters([Option<::metrics::Counter>; 4]);

impl FastCounters {
    fn count(&mut self, answered: Answered) {
        let nx = answered.rcode == ResponseCode::NXDomain;
        let slot = usize::from(answered.aaaa) * 2 + usize::from(nx);
        self.0[slot]
            .get_or_insert_with(|| {
                let qtype = if answered.aaaa { "AAAA" } else { "A" };
                ::metrics::counter!(
                    metrics::QUERIES_TOTAL,
                    "type" => qtype,
                    "rcode" => metrics::rcode_label(answered.rcode)
                )
            })
            .increment(1);
    }
}

/// Serves `socket` until `shutdown` fires. Fails only when the socket is gone.
pub(crate) async fn serve(
    socket: UdpSocket,
    handler: Handler,
    shutdown: CancellationToken,
) -> Result<(), DnsError> {
    let mut buf = vec![0u8; RECEIVE_BUFFER];
    let mut out = Vec::with_capacity(usize::from(EDNS_PAYLOAD));
    let mut counters = FastCounters::default();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            ready = socket.readable() => ready.map_err(|e| DnsError::Serve(e.to_string()))?,
        }
        for _ in 0..BATCH {
            let (len, src) = match socket.try_recv_from(&mut buf) {
                Ok(received) => received,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if unrecoverable(&e) => return Err(DnsError::Serve(e.to_string())),
                Err(error) => {
                    tracing::warn!(%error, "error receiving a dns query on udp");
                    continue;
                }
            };
            if !answerable(src) {
                tracing::debug!(%src, "ignoring a dns query from an address that cannot be answered");
                continue;
            }
            let query = &buf[..len];
            let reply = match fast::answer(&handler.zone, query, EDNS_PAYLOAD, &mut out) {
                Some(answered) => {
                    counters.count(answered);
                    &out[..]
                }
                None => match general_answer(&handler, query, src) {
                    Some(bytes) => {
                        out = bytes;
                        &out[..]
                    }
                    None => continue,
                },
            };
            send(&socket, reply, src).await;
        }
        tokio::task::consume_budget().await;
    }
}

/// Sends one answer; waits for room only when the socket's buffer is full.
async fn send(socket: &UdpSocket, reply: &[u8], dst: SocketAddr) {
    let sent = match socket.try_send_to(reply, dst) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.send_to(reply, dst).await,
        other => other,
    };
    if let Err(error) = sent {
        tracing::debug!(%error, %dst, "cannot send a dns response");
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
