//! The UDP fast path: answers the common query (one question, A or AAAA, class IN, for a
//! name in the zone, optionally with a plain EDNS(0) OPT record) straight from the wire bytes
//! and the zone's snapshots, without decoding it into hickory's types or building records.
//!
//! It writes exactly the bytes the general path (hickory's `MessageResponse` over
//! [`Zone::lookup`]) writes for the same query: the question echoed as sent, the answer owner
//! spelled as asked and compressed the way hickory's encoder compresses it, the SOA with its
//! names compressed against its owner, the OPT record last. Anything it does not recognise
//! (other types and classes, names outside the zone, names touched by TXT records, EDNS
//! options or versions, compression pointers in the question, trailing bytes, unusual label
//! bytes, answers that would be truncated) is [`None`] and goes the general way: the fast path
//! only ever declines, it never guesses. The `fast_path_matches_hickory` tests and the
//! `dns_query` fuzz target check the equality.

use std::sync::Arc;

use arc_swap::ArcSwap;
use arc_swap::cache::Cache;
use hangar_core::route::RouteTable;
use hickory_proto::op::ResponseCode;

use crate::zone::{TxtRecords, Zone};

/// Header length.
const HEADER: usize = 12;
/// The longest name on the wire, root included (RFC 1035 section 2.3.4).
const MAX_NAME: usize = 255;
/// The largest UDP answer without EDNS (RFC 1035 section 4.2.1).
const PLAIN_UDP_PAYLOAD: u16 = 512;

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_SOA: u16 = 6;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

/// The SOA timers after the serial; the same values as the general path's `Zone::soa`.
const SOA_TIMERS: [i32; 3] = [3600, 600, 86_400];

/// What the fast path answered, for the query counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Answered {
    pub aaaa: bool,
    pub rcode: ResponseCode,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Label bytes the fast path accepts: what backend ids, the zone and ACME names are made of.
/// Anything else (dots or zero bytes inside a label, non-ASCII) takes the general path.
fn plain_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// `src` in ASCII lowercase, in the start of `buf` (at least as long).
fn lowercase<'b>(buf: &'b mut [u8], src: &[u8]) -> &'b [u8] {
    let out = &mut buf[..src.len()];
    for (l, &b) in out.iter_mut().zip(src) {
        *l = b.to_ascii_lowercase();
    }
    out
}

/// A zone as the fast path reads it, one per UDP loop: its route table and TXT records each
/// an `Arc` taken again only when the zone has published a new one since the last query.
/// Checking costs one pointer load, where an `ArcSwap` load per query costs two interlocked
/// operations (and its guard's release two more).
pub(crate) struct Views<'z> {
    zone: &'z Zone,
    routes: Cache<&'z ArcSwap<RouteTable>, Arc<RouteTable>>,
    txt: Cache<&'z ArcSwap<TxtRecords>, Arc<TxtRecords>>,
}

impl<'z> Views<'z> {
    pub(crate) fn new(zone: &'z Zone) -> Views<'z> {
        Views {
            zone,
            routes: Cache::new(&zone.routes),
            txt: Cache::new(&zone.txt),
        }
    }
}

/// Answers `query` into `out` (cleared first) when it is the common case; `None` leaves `out`
/// unspecified and the query to the general path. `udp_payload` is the largest answer the
/// server sends over UDP with EDNS (the general path clamps the client's size to it).
pub(crate) fn answer(
    views: &mut Views<'_>,
    query: &[u8],
    udp_payload: u16,
    out: &mut Vec<u8>,
) -> Option<Answered> {
    let zone = views.zone;
    if query.len() < HEADER + 5 {
        return None;
    }
    // QR clear (a query) and opcode QUERY; the other request bits do not matter.
    if query[2] & 0xF8 != 0 {
        return None;
    }
    let additionals = be16(query, 10);
    if be16(query, 4) != 1 || be16(query, 6) != 0 || be16(query, 8) != 0 || additionals > 1 {
        return None;
    }

    // The question name: plain labels only (no compression pointers), at most 255 octets.
    // Where each label (and the root) starts, as bits by offset into the name, for finding
    // the origin at a label boundary.
    let mut label_starts = [0u64; MAX_NAME.div_ceil(64)];
    let mut at = HEADER;
    loop {
        let len = *query.get(at)? as usize;
        let end = at + 1 + len;
        let offset = at - HEADER;
        if end - HEADER > MAX_NAME || len > 63 {
            return None;
        }
        label_starts[offset / 64] |= 1 << (offset % 64);
        if len == 0 {
            at = end;
            break;
        }
        let label = query.get(at + 1..end)?;
        if !label.iter().all(|&b| plain_label_byte(b)) {
            return None;
        }
        at = end;
    }
    let name = &query[HEADER..at];
    let type_and_class = query.get(at..at + 4)?;
    let qtype = be16(type_and_class, 0);
    let qclass = be16(type_and_class, 2);
    let question_end = at + 4;
    let aaaa = match qtype {
        TYPE_A => false,
        TYPE_AAAA => true,
        _ => return None,
    };
    if qclass != CLASS_IN {
        return None;
    }

    // An OPT record with version 0 and no options, and nothing after it.
    let edns_payload = if additionals == 1 {
        let opt = query.get(question_end..)?;
        if opt.len() != 11 || opt[0] != 0 || be16(opt, 1) != TYPE_OPT {
            return None;
        }
        // opt[5] is the requester's extended RCODE, which answers ignore.
        if opt[6] != 0 || be16(opt, 9) != 0 {
            return None;
        }
        Some(be16(opt, 3).clamp(PLAIN_UDP_PAYLOAD, udp_payload))
    } else if query.len() == question_end {
        None
    } else {
        return None;
    };

    // In the zone: the name ends with the origin (lowercase) at a label boundary, or is it.
    // Length octets are below 64 and so never letters: comparing the wire forms without
    // regard to ASCII case compares the names.
    let origin = zone.origin_wire.as_slice();
    let at_origin = name.len().checked_sub(origin.len())?;
    let boundary = label_starts[at_origin / 64] & (1 << (at_origin % 64)) != 0;
    if !boundary || !name[at_origin..].eq_ignore_ascii_case(origin) {
        return None;
    }
    let txt = views.txt.load();
    if txt.is_related() && txt.relates_to(lowercase(&mut [0; MAX_NAME], name)) {
        return None;
    }
    // The rest of `Zone::lookup` for names no TXT record touches: the apex, `ns`, a live
    // backend, or nothing.
    let routes = views.routes.load();
    let none: (bool, &[_], &[_]) = (false, &[], &[]);
    let (exists, v4, v6) = if at_origin == 0 {
        (true, &zone.proxy_v4[..], &zone.proxy_v6[..])
    } else if at_origin == 1 + usize::from(name[0]) {
        // One label below the origin.
        let mut lower = [0; 63];
        let label = lowercase(&mut lower, &name[1..at_origin]);
        if label == crate::NS_LABEL.as_bytes() {
            (true, &zone.ns_v4[..], &zone.ns_v6[..])
        } else if std::str::from_utf8(label).is_ok_and(|l| routes.is_live(l)) {
            (true, &zone.proxy_v4[..], &zone.proxy_v6[..])
        } else {
            none
        }
    } else {
        none
    };
    let count = if aaaa { v6.len() } else { v4.len() };
    let (rcode, rcode_bits) = if exists {
        (ResponseCode::NoError, 0)
    } else {
        (ResponseCode::NXDomain, 3)
    };

    // Header: the query's (its id, one question), then QR, the opcode (QUERY), AA and the
    // request's RD; the request's CD and the RCODE; the answers, the SOA when there are none,
    // the OPT record. Then the question as sent.
    out.clear();
    out.extend_from_slice(&query[..question_end]);
    out[2] = 0x80 | 0x04 | (query[2] & 0x01);
    out[3] = (query[3] & 0x10) | rcode_bits;
    out[6..8].copy_from_slice(&(count as u16).to_be_bytes());
    out[8..10].copy_from_slice(&u16::from(count == 0).to_be_bytes());
    out[10..12].copy_from_slice(&u16::from(edns_payload.is_some()).to_be_bytes());

    let ttl = zone.ttl.to_be_bytes();
    if count > 0 {
        // The first owner is the name as asked, in full (hickory's encoder does not compress
        // against the question); the others point at it.
        let first_owner = out.len();
        let rdata_len: u16 = if aaaa { 16 } else { 4 };
        // Type, class, TTL and the data's length: the same for every answer.
        let mut fixed = [0u8; 10];
        fixed[0..2].copy_from_slice(&qtype.to_be_bytes());
        fixed[2..4].copy_from_slice(&CLASS_IN.to_be_bytes());
        fixed[4..8].copy_from_slice(&ttl);
        fixed[8..10].copy_from_slice(&rdata_len.to_be_bytes());
        for i in 0..count {
            if i == 0 {
                out.extend_from_slice(name);
            } else {
                out.extend_from_slice(&(0xC000 | first_owner as u16).to_be_bytes());
            }
            out.extend_from_slice(&fixed);
            if aaaa {
                out.extend_from_slice(&v6[i].octets());
            } else {
                out.extend_from_slice(&v4[i].octets());
            }
        }
    } else {
        // NXDOMAIN or NODATA: the SOA, its owner the origin in full, its names pointing at it.
        let soa_owner = out.len();
        if soa_owner > 0x3FFF {
            return None;
        }
        let pointer = (0xC000 | soa_owner as u16).to_be_bytes();
        out.extend_from_slice(origin);
        out.extend_from_slice(&TYPE_SOA.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl);
        let mname = crate::NS_LABEL.as_bytes();
        let rname = b"hostmaster";
        let rdata_len = (1 + mname.len() + 2) + (1 + rname.len() + 2) + 20;
        out.extend_from_slice(&(rdata_len as u16).to_be_bytes());
        for label in [mname, rname.as_slice()] {
            out.push(label.len() as u8);
            out.extend_from_slice(label);
            out.extend_from_slice(&pointer);
        }
        // The serial follows the route table revision, wrapping like the general path's.
        out.extend_from_slice(&(routes.revision as u32).to_be_bytes());
        for timer in SOA_TIMERS {
            out.extend_from_slice(&timer.to_be_bytes());
        }
        out.extend_from_slice(&ttl);
    }
    let limit = match edns_payload {
        Some(payload) => {
            // Root owner, OPT, the payload size, extended RCODE 0, version 0, no flags, no
            // options.
            let mut opt = [0u8; 11];
            opt[1..3].copy_from_slice(&TYPE_OPT.to_be_bytes());
            opt[3..5].copy_from_slice(&payload.to_be_bytes());
            out.extend_from_slice(&opt);
            payload
        }
        None => PLAIN_UDP_PAYLOAD,
    };
    // An answer that does not fit is truncated by the general path.
    if out.len() > usize::from(limit) {
        return None;
    }
    Some(Answered { aaaa, rcode })
}

#[cfg(test)]
pub(crate) mod tests;
