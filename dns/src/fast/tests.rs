//! The fast path against the general path (hickory's decoding and encoding around
//! `Zone::lookup`), byte for byte, for a table of queries; and the whole UDP transport against
//! hickory-server's own UDP transport with the same handler, on the wire.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hangar_core::BackendId;
use hangar_core::route::{Route, RouteState, RouteTable};
use hickory_proto::op::{Message, ResponseCode};
use hickory_server::Server;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::DnsConfig;
use crate::server::{EDNS_PAYLOAD, Handler};
use crate::udp;
use crate::zone::Zone;

const A: u16 = 1;
const NS: u16 = 2;
const SOA: u16 = 6;
const MX: u16 = 15;
const TXT: u16 = 16;
const AAAA: u16 = 28;
const AXFR: u16 = 252;
const ANY: u16 = 255;

fn zone_with(proxies: &[&str], revision: u64) -> Arc<Zone> {
    let mut config = DnsConfig::new(
        "Hangar.Localhost.",
        proxies.iter().map(|a| a.parse().unwrap()).collect(),
    );
    config.nameserver_addresses = vec![IpAddr::from([127, 0, 0, 53])];
    config.ttl = 7;
    let zone = Zone::new(&config).unwrap();
    let route = |id: &str, state| Route::new(BackendId::parse(id).unwrap(), state);
    zone.publish_routes(Arc::new(RouteTable::new(
        revision,
        [
            route("bready", RouteState::Ready),
            route("bstarting", RouteState::Starting),
            route("bgone", RouteState::Gone),
            route("babove", RouteState::Ready),
        ],
    )));
    zone.publish_txt([
        ("_acme-challenge.hangar.localhost", "v1"),
        ("_acme-challenge.api.hangar.localhost", "v2"),
        ("_acme-challenge.babove.hangar.localhost", "v3"),
    ]);
    Arc::new(zone)
}

fn zone() -> Arc<Zone> {
    // The revision does not fit the SOA serial: it wraps, on both paths.
    zone_with(&["127.0.0.1", "127.0.0.2", "::1"], (7 << 32) | 42)
}

/// A query as built by a test case.
#[derive(Clone)]
pub(crate) struct Q {
    id: u16,
    flags: [u8; 2],
    counts: [u16; 4],
    name: Vec<u8>,
    qtype: u16,
    qclass: u16,
    /// The additional section, raw (an OPT record, say).
    additional: Vec<u8>,
    trailer: Vec<u8>,
}

impl Q {
    pub(crate) fn new(name: &str, qtype: u16) -> Q {
        let mut wire = Vec::new();
        for label in name
            .trim_end_matches('.')
            .split('.')
            .filter(|l| !l.is_empty())
        {
            wire.push(label.len() as u8);
            wire.extend_from_slice(label.as_bytes());
        }
        wire.push(0);
        Q {
            id: 0x1234,
            flags: [0x01, 0x00],
            counts: [1, 0, 0, 0],
            name: wire,
            qtype,
            qclass: 1,
            additional: Vec::new(),
            trailer: Vec::new(),
        }
    }

    /// Adds an OPT record: payload size, extended RCODE, version, flags, raw options.
    pub(crate) fn edns(
        mut self,
        payload: u16,
        ext_rcode: u8,
        version: u8,
        flags: u16,
        opts: &[u8],
    ) -> Q {
        self.counts[3] += 1;
        self.additional.push(0);
        self.additional.extend_from_slice(&41u16.to_be_bytes());
        self.additional.extend_from_slice(&payload.to_be_bytes());
        self.additional.extend_from_slice(&[ext_rcode, version]);
        self.additional.extend_from_slice(&flags.to_be_bytes());
        self.additional
            .extend_from_slice(&(opts.len() as u16).to_be_bytes());
        self.additional.extend_from_slice(opts);
        self
    }

    pub(crate) fn flags(mut self, flags: [u8; 2]) -> Q {
        self.flags = flags;
        self
    }

    pub(crate) fn id(mut self, id: u16) -> Q {
        self.id = id;
        self
    }

    pub(crate) fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.flags);
        for c in self.counts {
            out.extend_from_slice(&c.to_be_bytes());
        }
        out.extend_from_slice(&self.name);
        out.extend_from_slice(&self.qtype.to_be_bytes());
        out.extend_from_slice(&self.qclass.to_be_bytes());
        out.extend_from_slice(&self.additional);
        out.extend_from_slice(&self.trailer);
        out
    }
}

/// (what, query, whether the fast path answers it)
fn cases() -> Vec<(&'static str, Vec<u8>, bool)> {
    let mut v: Vec<(&'static str, Vec<u8>, bool)> = vec![
        ("live A", Q::new("bready.hangar.localhost", A).bytes(), true),
        (
            "live AAAA",
            Q::new("bready.hangar.localhost", AAAA).bytes(),
            true,
        ),
        (
            "starting A",
            Q::new("bstarting.hangar.localhost", A).bytes(),
            true,
        ),
        (
            "mixed case",
            Q::new("BReady.HANGAR.localhost", A).bytes(),
            true,
        ),
        (
            "mixed case AAAA",
            Q::new("bReAdY.hAnGaR.LoCaLhOsT", AAAA).bytes(),
            true,
        ),
        ("gone", Q::new("bgone.hangar.localhost", A).bytes(), true),
        (
            "unknown",
            Q::new("bunknown.hangar.localhost", A).bytes(),
            true,
        ),
        (
            "unknown AAAA uppercase",
            Q::new("BUNKNOWN.Hangar.Localhost", AAAA).bytes(),
            true,
        ),
        (
            "deeper",
            Q::new("x.bstarting.hangar.localhost", A).bytes(),
            true,
        ),
        ("apex A", Q::new("hangar.localhost", A).bytes(), true),
        ("apex AAAA", Q::new("Hangar.Localhost", AAAA).bytes(), true),
        ("ns A", Q::new("ns.hangar.localhost", A).bytes(), true),
        // The name server has no IPv6 address: NODATA with the SOA.
        ("ns AAAA", Q::new("NS.hangar.localhost", AAAA).bytes(), true),
        (
            "underscore label",
            Q::new("_x.hangar.localhost", A).bytes(),
            true,
        ),
        (
            "long label",
            Q::new(&format!("{}.hangar.localhost", "b".repeat(63)), A).bytes(),
            true,
        ),
        (
            "RD clear",
            Q::new("bready.hangar.localhost", A)
                .flags([0x00, 0x00])
                .bytes(),
            true,
        ),
        (
            "CD, AD, Z and TC set, a stray RCODE",
            Q::new("bunknown.hangar.localhost", A)
                .flags([0x03, 0x7F])
                .bytes(),
            true,
        ),
        (
            "AA and RA set",
            Q::new("bready.hangar.localhost", A)
                .flags([0x05, 0x80])
                .bytes(),
            true,
        ),
        (
            "EDNS 4096",
            Q::new("bready.hangar.localhost", A)
                .edns(4096, 0, 0, 0, &[])
                .bytes(),
            true,
        ),
        (
            "EDNS 1232 NXDOMAIN",
            Q::new("bunknown.hangar.localhost", AAAA)
                .edns(1232, 0, 0, 0, &[])
                .bytes(),
            true,
        ),
        (
            "EDNS below 512",
            Q::new("bready.hangar.localhost", A)
                .edns(100, 0, 0, 0, &[])
                .bytes(),
            true,
        ),
        (
            "EDNS with DO",
            Q::new("bready.hangar.localhost", AAAA)
                .edns(1400, 0, 0, 0x8000, &[])
                .bytes(),
            true,
        ),
        (
            "EDNS with an extended RCODE",
            Q::new("bready.hangar.localhost", A)
                .edns(1232, 1, 0, 0, &[])
                .bytes(),
            true,
        ),
        // The general path.
        (
            "EDNS version 1",
            Q::new("bready.hangar.localhost", A)
                .edns(1232, 0, 1, 0, &[])
                .bytes(),
            false,
        ),
        (
            "EDNS with a cookie",
            Q::new("bready.hangar.localhost", A)
                .edns(1232, 0, 0, 0, &[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8])
                .bytes(),
            false,
        ),
        (
            "EDNS with a bad option",
            Q::new("bready.hangar.localhost", A)
                .edns(1232, 0, 0, 0, &[0, 8, 0, 1, 9])
                .bytes(),
            false,
        ),
        (
            "two OPT records",
            Q::new("bready.hangar.localhost", A)
                .edns(1232, 0, 0, 0, &[])
                .edns(1232, 0, 0, 0, &[])
                .bytes(),
            false,
        ),
        ("MX", Q::new("bready.hangar.localhost", MX).bytes(), false),
        ("ANY", Q::new("bready.hangar.localhost", ANY).bytes(), false),
        ("apex SOA", Q::new("hangar.localhost", SOA).bytes(), false),
        ("apex NS", Q::new("hangar.localhost", NS).bytes(), false),
        ("AXFR", Q::new("hangar.localhost", AXFR).bytes(), false),
        (
            "TXT owner A",
            Q::new("_acme-challenge.hangar.localhost", A).bytes(),
            false,
        ),
        (
            "TXT",
            Q::new("_acme-challenge.hangar.localhost", TXT).bytes(),
            false,
        ),
        (
            "empty non-terminal",
            Q::new("API.hangar.localhost", A).bytes(),
            false,
        ),
        (
            "live backend above a TXT owner",
            Q::new("babove.hangar.localhost", A).bytes(),
            false,
        ),
        ("outside", Q::new("example.com", A).bytes(), false),
        ("parent", Q::new("localhost", A).bytes(), false),
        ("root", Q::new("", A).bytes(), false),
        (
            "suffix but not a label boundary",
            Q::new("xhangar.localhost", A).bytes(),
            false,
        ),
        (
            "a query marked as a response",
            Q::new("bready.hangar.localhost", A)
                .flags([0x81, 0x00])
                .bytes(),
            false,
        ),
        (
            "NOTIFY",
            Q::new("bready.hangar.localhost", A)
                .flags([0x21, 0x00])
                .bytes(),
            false,
        ),
        ("header only", Q::new("", A).bytes()[..12].to_vec(), false),
        ("short", vec![0x12, 0x34, 1], false),
        ("empty", Vec::new(), false),
    ];
    let mut q = Q::new("bready.hangar.localhost", A);
    q.qclass = 3;
    v.push(("class CH", q.bytes(), false));
    let mut q = Q::new("bready.hangar.localhost", A);
    q.qclass = 255;
    v.push(("class ANY", q.bytes(), false));
    let mut q = Q::new("bready.hangar.localhost", A);
    q.trailer = vec![0];
    v.push(("a trailing byte", q.bytes(), false));
    let mut q = Q::new("bready.hangar.localhost", A);
    q.counts[0] = 2;
    v.push(("two questions claimed", q.bytes(), false));
    let mut q = Q::new("bready.hangar.localhost", A);
    q.counts[1] = 1;
    v.push(("an answer in the query", q.bytes(), false));
    let mut q = Q::new("bready.hangar.localhost", A);
    q.counts[0] = 0;
    v.push(("no question", q.bytes(), false));
    let mut q = Q::new("bready.hangar.localhost", A);
    q.name = vec![6, b'b', b'r', b'e', b'a', b'd', b'y', 0xC0, 12];
    v.push(("a compression pointer", q.bytes(), false));
    let mut q = Q::new("bready.hangar.localhost", A);
    q.name[1] = b'.';
    v.push(("a dot inside a label", q.bytes(), false));
    let mut q = Q::new("bready.hangar.localhost", A);
    q.name[1] = 0xC3;
    v.push(("a non-ASCII label", q.bytes(), false));
    let full = Q::new("bready.hangar.localhost", A).bytes();
    for cut in [13, 20, full.len() - 4, full.len() - 1] {
        v.push(("cut short", full[..cut].to_vec(), false));
    }
    v
}

fn src() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5353))
}

#[test]
fn fast_path_matches_the_general_path() {
    let zone = zone();
    let handler = Handler { zone: zone.clone() };
    let mut views = super::Views::new(&zone);
    let mut out = Vec::new();
    for (what, query, fast) in cases() {
        let general = udp::general_answer(&handler, &query, src());
        let answered = super::answer(&mut views, &query, EDNS_PAYLOAD, &mut out);
        assert_eq!(answered.is_some(), fast, "{what}: fast path taken");
        if answered.is_some() {
            let general = general.unwrap_or_else(|| panic!("{what}: the general path is silent"));
            assert_eq!(out, general, "{what}: the answers differ");
            // And it is a real answer: it decodes, with the rcode the fast path reported.
            let msg = Message::from_vec(&out).unwrap();
            assert_eq!(
                Some(msg.metadata.response_code),
                answered.map(|a| a.rcode),
                "{what}"
            );
            assert!(msg.metadata.authoritative, "{what}");
        }
    }
}

#[test]
fn answers_that_need_truncation_take_the_general_path() {
    // 40 proxy addresses: the A answer does not fit 512 bytes, so only EDNS gets it whole.
    let proxies: Vec<String> = (1..=40).map(|i| format!("10.0.0.{i}")).collect();
    let proxies: Vec<&str> = proxies.iter().map(String::as_str).collect();
    let zone = zone_with(&proxies, 1);
    let handler = Handler { zone: zone.clone() };
    let mut out = Vec::new();
    let plain = Q::new("bready.hangar.localhost", A).bytes();
    assert_eq!(
        super::answer(
            &mut super::Views::new(&zone),
            &plain,
            EDNS_PAYLOAD,
            &mut out
        ),
        None
    );
    let truncated =
        Message::from_vec(&udp::general_answer(&handler, &plain, src()).unwrap()).unwrap();
    assert!(truncated.metadata.truncation);

    let edns = Q::new("bready.hangar.localhost", A)
        .edns(1232, 0, 0, 0, &[])
        .bytes();
    let answered =
        super::answer(&mut super::Views::new(&zone), &edns, EDNS_PAYLOAD, &mut out).unwrap();
    assert_eq!(answered.rcode, ResponseCode::NoError);
    assert_eq!(
        out,
        udp::general_answer(&handler, &edns, src()).unwrap(),
        "a 40-address answer with EDNS"
    );
    assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 40);
}

#[test]
fn random_variations_match_the_general_path() {
    // Single-byte changes to queries the fast path answers: whatever it still answers must be
    // what the general path says.
    let zone = zone();
    let handler = Handler { zone: zone.clone() };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xfa57);
    let seeds: Vec<Vec<u8>> = cases().into_iter().filter(|c| c.2).map(|c| c.1).collect();
    let mut views = super::Views::new(&zone);
    let mut out = Vec::new();
    let mut fast = 0;
    for _ in 0..20_000 {
        let mut query = seeds[rng.random_range(0..seeds.len())].clone();
        let at = rng.random_range(0..query.len());
        query[at] = rng.random();
        if super::answer(&mut views, &query, EDNS_PAYLOAD, &mut out).is_some() {
            fast += 1;
            let general = udp::general_answer(&handler, &query, src());
            assert_eq!(Some(&out), general.as_ref(), "query {query:02x?}");
        }
    }
    assert!(
        fast > 1_000,
        "the variations mostly leave the fast path: {fast}"
    );
}

#[test]
fn the_origin_is_found_only_at_a_label_boundary() {
    // The origin's first label is 48 octets long, so its length octet is b'0', a byte labels
    // may hold: the name `a0<label>.test` ends with the origin's wire form from inside its
    // first label, and is not in the zone.
    let label = "l".repeat(48);
    let origin = format!("{label}.test");
    let mut config = DnsConfig::new(&origin, vec![IpAddr::from([127, 0, 0, 1])]);
    config.nameserver_addresses = vec![IpAddr::from([127, 0, 0, 53])];
    let zone = Zone::new(&config).unwrap();
    let handler = Handler {
        zone: Arc::new(zone),
    };
    let zone = &handler.zone;
    let mut views = super::Views::new(zone);
    let mut out = Vec::new();
    let outside = Q::new(&format!("a0{label}.test"), A).bytes();
    assert_eq!(
        super::answer(&mut views, &outside, EDNS_PAYLOAD, &mut out),
        None
    );
    let general = Message::from_vec(&udp::general_answer(&handler, &outside, src()).unwrap());
    assert_eq!(
        general.unwrap().metadata.response_code,
        ResponseCode::Refused
    );
    // The apex and a name below it are the zone's.
    for (name, rcode) in [
        (origin.clone(), ResponseCode::NoError),
        (format!("ns.{origin}"), ResponseCode::NoError),
        (format!("bnothere.{origin}"), ResponseCode::NXDomain),
        (format!("a.b.{origin}"), ResponseCode::NXDomain),
    ] {
        let query = Q::new(&name, A).bytes();
        let answered = super::answer(&mut views, &query, EDNS_PAYLOAD, &mut out);
        assert_eq!(answered.map(|a| a.rcode), Some(rcode), "{name}");
        assert_eq!(
            Some(&out),
            udp::general_answer(&handler, &query, src()).as_ref()
        );
    }
}

#[test]
fn views_follow_what_the_zone_publishes() {
    // One set of views for the loop's life: each query sees the routes and TXT records
    // published before it, as a load per query would.
    let zone = zone();
    let mut views = super::Views::new(&zone);
    let mut out = Vec::new();
    let rcode = |views: &mut super::Views<'_>, out: &mut Vec<u8>, name: &str| {
        let query = Q::new(name, A).bytes();
        super::answer(views, &query, EDNS_PAYLOAD, out).map(|a| a.rcode)
    };
    assert_eq!(
        rcode(&mut views, &mut out, "bnew.hangar.localhost"),
        Some(ResponseCode::NXDomain)
    );
    let route = |id: &str| Route::new(BackendId::parse(id).unwrap(), RouteState::Ready);
    zone.publish_routes(Arc::new(RouteTable::new(9, [route("bnew")])));
    assert_eq!(
        rcode(&mut views, &mut out, "bnew.hangar.localhost"),
        Some(ResponseCode::NoError)
    );
    assert_eq!(
        rcode(&mut views, &mut out, "bready.hangar.localhost"),
        Some(ResponseCode::NXDomain),
        "a route the new table does not hold"
    );
    // A TXT record below the name turns it over to the general path.
    zone.publish_txt([("_acme-challenge.bnew.hangar.localhost", "v")]);
    assert_eq!(rcode(&mut views, &mut out, "bnew.hangar.localhost"), None);
}

/// hickory-server's UDP transport (`Server::register_socket`) with our handler: what the
/// server answered before it had its own UDP loop.
async fn hickory_udp(zone: Arc<Zone>) -> (SocketAddr, Server<Handler>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let mut server = Server::new(Handler { zone });
    server.register_socket(socket);
    (addr, server)
}

/// Sends `query`, then a probe, and returns what came back before the probe's answer: the
/// answer to `query`, or `None` if the server stayed silent. Both servers answer in order on
/// the test's current-thread runtime (hickory runs one task per query, first come first run).
async fn exchange(sock: &UdpSocket, server: SocketAddr, query: &[u8]) -> Option<Vec<u8>> {
    const PROBE_ID: u16 = 0xFEED;
    let probe = Q {
        id: PROBE_ID,
        ..Q::new("hangar.localhost", A)
    };
    let mut buf = [0u8; 4096];
    sock.send_to(query, server).await.unwrap();
    sock.send_to(&probe.bytes(), server).await.unwrap();
    let mut answer = None;
    loop {
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        if buf[..n].starts_with(&PROBE_ID.to_be_bytes()) {
            return answer;
        }
        assert!(answer.is_none(), "two answers to one query");
        answer = Some(buf[..n].to_vec());
    }
}

#[tokio::test]
async fn the_udp_loop_answers_like_hickorys_udp_transport() {
    let zone = zone();
    let (reference, mut hickory) = hickory_udp(zone.clone()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // With the batched calls and with one datagram per call.
    for &io in udp::ALL_IO {
        let ours = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ours_addr = ours.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(udp::serve_with(
            ours,
            Handler { zone: zone.clone() },
            cancel.clone(),
            io,
        ));
        for (what, query, _) in cases() {
            let want = exchange(&client, reference, &query).await;
            let got = exchange(&client, ours_addr, &query).await;
            assert_eq!(got, want, "{io:?}, {what}: {query:02x?}");
        }
        cancel.cancel();
        task.await.unwrap().unwrap();
    }
    hickory.shutdown_gracefully().await.unwrap();
}
