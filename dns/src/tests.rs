//! Tests against a real server on `127.0.0.1:0`, queried with hickory's client over UDP and
//! TCP and with raw packets (malformed, truncated, random).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::BackendId;
use hangar_core::route::{Route, RouteState, RouteTable};
use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::{Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{DnsConfig, DnsError, DnsServer, bind};

const ZONE: &str = "hangar.localhost";

/// A task aborted when dropped, so a failing test leaves nothing running.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A server on an ephemeral port, following a route feed the test controls.
struct TestServer {
    addr: SocketAddr,
    server: DnsServer,
    routes: watch::Sender<Arc<RouteTable>>,
    cancel: CancellationToken,
    task: Option<AbortOnDrop<Result<(), DnsError>>>,
    _feed: AbortOnDrop<()>,
}

impl TestServer {
    async fn start() -> TestServer {
        let mut cfg = DnsConfig::new(
            ZONE,
            vec![
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from([127, 0, 0, 2]),
                "::1".parse().unwrap(),
            ],
        );
        cfg.nameserver_addresses = vec![IpAddr::from([127, 0, 0, 1])];
        let server = DnsServer::new(&cfg).unwrap();
        let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = udp.local_addr().unwrap();
        assert_eq!(
            tcp.local_addr().unwrap(),
            addr,
            "udp and tcp share the port"
        );
        let cancel = CancellationToken::new();
        let task = {
            let server = server.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move { server.run(udp, tcp, cancel).await })
        };
        let (routes, rx) = watch::channel(Arc::new(RouteTable::default()));
        let feed = {
            let server = server.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move { server.follow_routes(rx, cancel).await })
        };
        TestServer {
            addr,
            server,
            routes,
            cancel,
            task: Some(AbortOnDrop(task)),
            _feed: AbortOnDrop(feed),
        }
    }

    fn set_routes(&self, revision: u64, routes: &[(&str, RouteState)]) {
        self.routes.send_replace(Arc::new(RouteTable::new(
            revision,
            routes
                .iter()
                .map(|(id, state)| Route::new(BackendId::parse(id).unwrap(), *state)),
        )));
    }

    /// Stops the server and checks that it shut down cleanly and promptly.
    async fn shutdown(mut self) {
        self.cancel.cancel();
        let mut task = self.task.take().unwrap();
        let res = tokio::time::timeout(Duration::from_secs(5), &mut task.0)
            .await
            .expect("the server did not stop within 5 s of shutdown");
        res.unwrap().unwrap();
    }
}

/// hickory's client with its background task.
struct Dns {
    client: Client<TokioRuntimeProvider>,
    _bg: AbortOnDrop<()>,
}

impl Dns {
    fn udp(addr: SocketAddr) -> Dns {
        let conn = UdpClientStream::builder(addr, TokioRuntimeProvider::default())
            .with_timeout(Some(Duration::from_secs(2)))
            .build();
        let (client, bg) = Client::<TokioRuntimeProvider>::from_sender(conn);
        Dns {
            client,
            _bg: AbortOnDrop(tokio::spawn(async move {
                let _ = bg.await;
            })),
        }
    }

    async fn tcp(addr: SocketAddr) -> Dns {
        let (stream, sender) = TcpClientStream::new(
            addr,
            None,
            Some(Duration::from_secs(2)),
            TokioRuntimeProvider::new(),
        );
        let (client, bg) =
            Client::<TokioRuntimeProvider>::new(stream.await.expect("tcp connect"), sender);
        Dns {
            client,
            _bg: AbortOnDrop(tokio::spawn(async move {
                let _ = bg.await;
            })),
        }
    }

    async fn ask(&mut self, name: &str, qtype: RecordType) -> Message {
        let resp = self
            .client
            .query(Name::from_ascii(name).unwrap(), DNSClass::IN, qtype)
            .await
            .unwrap_or_else(|e| panic!("query {name} {qtype}: {e}"));
        resp.into_message()
    }
}

fn rdata(msg: &Message) -> Vec<String> {
    let mut v: Vec<String> = msg.answers.iter().map(|r| r.data.to_string()).collect();
    v.sort();
    v
}

fn has_soa_authority(msg: &Message) -> bool {
    msg.authorities
        .iter()
        .any(|r| r.record_type() == RecordType::SOA)
}

/// The checks every in-zone answer passes: authoritative, no recursion offered.
fn assert_authoritative(msg: &Message, rcode: ResponseCode) {
    assert_eq!(msg.metadata.response_code, rcode, "{msg:?}");
    assert!(msg.metadata.authoritative, "AA must be set: {msg:?}");
    assert!(!msg.metadata.recursion_available, "RA must be clear");
    assert_eq!(msg.metadata.message_type, MessageType::Response);
}

#[tokio::test]
async fn live_backend_resolves_to_the_proxies_until_it_is_gone() {
    let t = TestServer::start().await;
    let mut dns = Dns::udp(t.addr);
    let name = "bweb1.hangar.localhost.";

    // Unknown: NXDOMAIN with the SOA for negative caching.
    let m = dns.ask(name, RecordType::A).await;
    assert_authoritative(&m, ResponseCode::NXDomain);
    assert!(m.answers.is_empty());
    assert!(has_soa_authority(&m), "NXDOMAIN carries the SOA: {m:?}");

    // Starting, then ready: the proxies' addresses with the configured TTL.
    t.set_routes(1, &[("bweb1", RouteState::Starting)]);
    let m = wait_for_rcode(&mut dns, name, RecordType::A, ResponseCode::NoError).await;
    assert_authoritative(&m, ResponseCode::NoError);
    assert_eq!(rdata(&m), ["127.0.0.1", "127.0.0.2"]);
    assert!(m.answers.iter().all(|r| r.ttl == 5));
    t.set_routes(2, &[("bweb1", RouteState::Ready)]);
    let m = dns.ask("BWeb1.Hangar.Localhost.", RecordType::AAAA).await;
    assert_authoritative(&m, ResponseCode::NoError);
    assert_eq!(rdata(&m), ["::1"]);
    assert_eq!(m.answers[0].name.to_string(), "BWeb1.Hangar.Localhost.");

    // A type it has no records of: NODATA (NOERROR, empty, SOA).
    let m = dns.ask(name, RecordType::MX).await;
    assert_authoritative(&m, ResponseCode::NoError);
    assert!(m.answers.is_empty() && has_soa_authority(&m));

    // Gone: NXDOMAIN as soon as the table says so.
    t.set_routes(3, &[("bweb1", RouteState::Gone)]);
    let m = wait_for_rcode(&mut dns, name, RecordType::A, ResponseCode::NXDomain).await;
    assert_authoritative(&m, ResponseCode::NXDomain);
    assert!(has_soa_authority(&m));
    t.shutdown().await;
}

/// Asks until the answer has `rcode` (the route pump runs in another task), failing after 5 s.
async fn wait_for_rcode(
    dns: &mut Dns,
    name: &str,
    qtype: RecordType,
    rcode: ResponseCode,
) -> Message {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = dns.ask(name, qtype).await;
        if m.metadata.response_code == rcode {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{name} {qtype} never answered {rcode}: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn apex_answers_a_soa_and_ns() {
    let t = TestServer::start().await;
    t.set_routes(7, &[]);
    let mut dns = Dns::udp(t.addr);
    let m = dns.ask("hangar.localhost.", RecordType::A).await;
    assert_authoritative(&m, ResponseCode::NoError);
    assert_eq!(rdata(&m), ["127.0.0.1", "127.0.0.2"]);

    let m = wait_for_rcode(
        &mut dns,
        "hangar.localhost.",
        RecordType::SOA,
        ResponseCode::NoError,
    )
    .await;
    assert_authoritative(&m, ResponseCode::NoError);
    let soa = m
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some(soa.clone()),
            _ => None,
        })
        .expect("an SOA answer");
    assert_eq!(soa.mname.to_string(), "ns.hangar.localhost.");
    assert_eq!(soa.minimum, 5);

    let m = dns.ask("hangar.localhost.", RecordType::NS).await;
    assert_authoritative(&m, ResponseCode::NoError);
    assert_eq!(rdata(&m), ["ns.hangar.localhost."]);
    let glue: Vec<String> = m.additionals.iter().map(|r| r.data.to_string()).collect();
    assert_eq!(glue, ["127.0.0.1"], "glue for the name server");

    let m = dns.ask("ns.hangar.localhost.", RecordType::A).await;
    assert_eq!(rdata(&m), ["127.0.0.1"]);
    t.shutdown().await;
}

#[tokio::test]
async fn acme_challenge_txt_lifecycle() {
    let t = TestServer::start().await;
    let mut dns = Dns::udp(t.addr);
    let name = "_acme-challenge.hangar.localhost.";
    let m = dns.ask(name, RecordType::TXT).await;
    assert_authoritative(&m, ResponseCode::NXDomain);

    t.server.publish_acme_challenges([
        ("_acme-challenge.hangar.localhost", "token-one"),
        ("_acme-challenge.hangar.localhost", "token-two"),
    ]);
    let m = dns.ask(name, RecordType::TXT).await;
    assert_authoritative(&m, ResponseCode::NoError);
    assert_eq!(rdata(&m), ["token-one", "token-two"]);

    // Clearing one value keeps the other; clearing all makes the name vanish.
    t.server
        .publish_acme_challenges([("_acme-challenge.hangar.localhost", "token-two")]);
    assert_eq!(rdata(&dns.ask(name, RecordType::TXT).await), ["token-two"]);
    t.server.publish_acme_challenges([]);
    let m = dns.ask(name, RecordType::TXT).await;
    assert_authoritative(&m, ResponseCode::NXDomain);
    assert!(has_soa_authority(&m));
    t.shutdown().await;
}

#[tokio::test]
async fn names_outside_the_zone_are_refused_without_recursion() {
    let t = TestServer::start().await;
    let mut dns = Dns::udp(t.addr);
    for name in ["example.com.", "localhost.", "xhangar.localhost.", "."] {
        let m = dns.ask(name, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(!m.metadata.authoritative, "{name}");
        assert!(!m.metadata.recursion_available, "{name}");
        assert!(m.answers.is_empty() && m.authorities.is_empty(), "{name}");
    }
    t.shutdown().await;
}

#[tokio::test]
async fn tcp_answers_like_udp() {
    let t = TestServer::start().await;
    t.set_routes(1, &[("btcp", RouteState::Ready)]);
    let mut dns = Dns::tcp(t.addr).await;
    let m = wait_for_rcode(
        &mut dns,
        "btcp.hangar.localhost.",
        RecordType::A,
        ResponseCode::NoError,
    )
    .await;
    assert_authoritative(&m, ResponseCode::NoError);
    assert_eq!(rdata(&m), ["127.0.0.1", "127.0.0.2"]);
    // Several queries on one connection.
    for _ in 0..20 {
        let m = dns.ask("nope.hangar.localhost.", RecordType::A).await;
        assert_authoritative(&m, ResponseCode::NXDomain);
    }
    let m = dns.ask("example.org.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    t.shutdown().await;
}

/// Encodes a query the way a stub resolver would (RD set, optionally EDNS).
fn encode_query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut meta = Metadata::new(id, MessageType::Query, OpCode::Query);
    meta.recursion_desired = true;
    let mut msg = Message::new(meta.id, meta.message_type, meta.op_code);
    msg.metadata = meta;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    msg.to_vec().unwrap()
}

#[tokio::test]
async fn raw_edge_cases_get_the_right_codes() {
    let t = TestServer::start().await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(t.addr).await.unwrap();
    let mut buf = [0u8; 4096];
    let mut exchange = async |packet: Vec<u8>| -> Message {
        sock.send(&packet).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
            .await
            .expect("no answer within 2 s")
            .unwrap();
        Message::from_vec(&buf[..n]).expect("answers parse")
    };

    // Two questions: FORMERR.
    let mut msg = Message::from_vec(&encode_query(1, "hangar.localhost.", RecordType::A)).unwrap();
    msg.add_query(Query::query(
        Name::from_str("ns.hangar.localhost.").unwrap(),
        RecordType::A,
    ));
    let m = exchange(msg.to_vec().unwrap()).await;
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);

    // An UPDATE: not implemented.
    let mut msg =
        Message::from_vec(&encode_query(2, "hangar.localhost.", RecordType::SOA)).unwrap();
    msg.metadata.op_code = OpCode::Update;
    let m = exchange(msg.to_vec().unwrap()).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);

    // A header and a question cut short: FORMERR, with the same id.
    let full = encode_query(0x4242, "bweb.hangar.localhost.", RecordType::A);
    let m = exchange(full[..full.len() - 3].to_vec()).await;
    assert_eq!(m.metadata.id, 0x4242);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);

    // RD is echoed, RA is not offered, the id matches.
    let m = exchange(encode_query(7, "hangar.localhost.", RecordType::A)).await;
    assert_eq!(m.metadata.id, 7);
    assert!(m.metadata.recursion_desired && !m.metadata.recursion_available);
    assert!(m.metadata.authoritative);
    t.shutdown().await;
}

/// Thousands of random, truncated and bit-flipped packets over UDP and garbage over TCP: the
/// server answers only with well-formed responses, and answers a valid query promptly
/// throughout and afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_do_not_crash_or_stall_the_server() {
    const UDP_PACKETS: usize = 5_000;
    const PROBE_EVERY: usize = 250;
    const TCP_CONNECTIONS: usize = 64;
    const SENTINEL: u16 = 0xbeef;

    let t = TestServer::start().await;
    t.set_routes(1, &[("bfuzz", RouteState::Ready)]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let valid: Vec<Vec<u8>> = [
        ("bfuzz.hangar.localhost.", RecordType::A),
        ("hangar.localhost.", RecordType::SOA),
        ("_acme-challenge.hangar.localhost.", RecordType::TXT),
        ("example.com.", RecordType::A),
    ]
    .iter()
    .enumerate()
    .map(|(i, (n, q))| encode_query(i as u16, n, *q))
    .collect();

    let fuzz = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    fuzz.connect(t.addr).await.unwrap();
    // Every response the fuzzing socket gets must be a well-formed DNS response. The reader
    // stops at the answer to a sentinel query sent after the flood.
    let reader = {
        let fuzz = fuzz.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut rcodes: BTreeMap<String, usize> = BTreeMap::new();
            let mut buf = [0u8; 65_536];
            loop {
                let n = fuzz
                    .recv(&mut buf)
                    .await
                    .expect("recv on the fuzzing socket");
                let msg = Message::from_vec(&buf[..n]).expect("the server sent a malformed packet");
                assert_eq!(msg.metadata.message_type, MessageType::Response);
                if msg.metadata.id == SENTINEL && msg.answers.len() == 2 {
                    return rcodes;
                }
                *rcodes
                    .entry(msg.metadata.response_code.to_string())
                    .or_default() += 1;
            }
        }))
    };

    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    probe.connect(t.addr).await.unwrap();
    let mut probes = Vec::new();
    for i in 0..UDP_PACKETS {
        let packet = match i % 4 {
            // Random bytes of random length (including empty and header-only sizes).
            0 => {
                let len = rng.random_range(0..600);
                (0..len).map(|_| rng.random()).collect()
            }
            // A valid query cut at a random point.
            1 => {
                let v = &valid[rng.random_range(0..valid.len())];
                v[..rng.random_range(0..v.len())].to_vec()
            }
            // A valid query with random bits flipped.
            2 => {
                let mut v = valid[rng.random_range(0..valid.len())].clone();
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..v.len());
                    v[at] ^= 1 << rng.random_range(0..8);
                }
                v
            }
            // A plausible header (one question, query opcode) followed by garbage.
            _ => {
                let mut v = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
                let len = rng.random_range(0..64);
                v.extend((0..len).map(|_| rng.random::<u8>()));
                v
            }
        };
        // A full socket buffer only drops packets; that is fine here.
        let _ = fuzz.send(&packet).await;
        if i % PROBE_EVERY == PROBE_EVERY - 1 {
            probes.push(probe_udp(&probe, i as u16).await);
        }
    }

    // Over TCP: garbage behind plausible and absurd length prefixes, cut-off messages, and
    // one connection that stalls mid-message while the others are served.
    let stalled = {
        let mut s = TcpStream::connect(t.addr).await.unwrap();
        s.write_all(&[0x00, 0x40, 0x12]).await.unwrap();
        s
    };
    for i in 0..TCP_CONNECTIONS {
        let mut s = TcpStream::connect(t.addr).await.unwrap();
        let payload: Vec<u8> = match i % 3 {
            0 => {
                let len = rng.random_range(0..300u16);
                let mut v = len.to_be_bytes().to_vec();
                v.extend((0..len).map(|_| rng.random::<u8>()));
                v
            }
            1 => {
                let v = &valid[rng.random_range(0..valid.len())];
                let cut = rng.random_range(0..v.len());
                let mut p = (v.len() as u16).to_be_bytes().to_vec();
                p.extend_from_slice(&v[..cut]);
                p
            }
            _ => {
                let mut p = 0xffffu16.to_be_bytes().to_vec();
                p.extend((0..100).map(|_| rng.random::<u8>()));
                p
            }
        };
        let _ = s.write_all(&payload).await;
        // Dropping closes the connection mid-message.
    }
    let mut dns = Dns::tcp(t.addr).await;
    let started = Instant::now();
    let m = dns.ask("bfuzz.hangar.localhost.", RecordType::A).await;
    assert_authoritative(&m, ResponseCode::NoError);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "tcp answer took {:?}",
        started.elapsed()
    );
    drop(stalled);

    // And UDP still answers promptly afterwards.
    probes.push(probe_udp(&probe, 0xfff0).await);
    let worst = probes.iter().max().unwrap();
    assert!(
        *worst < Duration::from_secs(1),
        "a probe took {worst:?} during the flood"
    );

    // The sentinel (resent in case the flood made the socket drop it) ends the reader.
    let sentinel = encode_query(SENTINEL, "bfuzz.hangar.localhost.", RecordType::A);
    let mut reader = reader;
    let deadline = Instant::now() + Duration::from_secs(10);
    let rcodes = loop {
        fuzz.send(&sentinel).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(500), &mut reader.0).await {
            Ok(joined) => break joined.expect("the fuzz reader failed"),
            Err(_) => assert!(Instant::now() < deadline, "the sentinel was never answered"),
        }
    };
    assert!(
        rcodes.get("Form Error").copied().unwrap_or(0) > 100,
        "malformed queries are answered FORMERR: {rcodes:?}"
    );
    t.shutdown().await;
}

/// Sends a valid query from `sock` and returns how long the answer took; retries twice (UDP may
/// drop under the flood) and fails after that.
async fn probe_udp(sock: &UdpSocket, id: u16) -> Duration {
    let query = encode_query(id, "bfuzz.hangar.localhost.", RecordType::A);
    let mut buf = [0u8; 4096];
    for _ in 0..3 {
        let started = Instant::now();
        sock.send(&query).await.unwrap();
        let deadline = started + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Ok(n)) = tokio::time::timeout(left, sock.recv(&mut buf)).await else {
                break;
            };
            let msg = Message::from_vec(&buf[..n]).unwrap();
            if msg.metadata.id == id {
                assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
                assert_eq!(msg.answers.len(), 2);
                return started.elapsed();
            }
        }
    }
    panic!("the server did not answer probe {id} within three tries of 2 s");
}

#[tokio::test]
async fn queries_are_counted_by_type_and_rcode() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    // A current-thread runtime runs the server on this thread, so a thread-local recorder
    // sees its counters without a process-wide install.
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let t = TestServer::start().await;
    t.set_routes(1, &[("bm", RouteState::Ready)]);
    let mut dns = Dns::udp(t.addr);
    wait_for_rcode(
        &mut dns,
        "bm.hangar.localhost.",
        RecordType::A,
        ResponseCode::NoError,
    )
    .await;
    dns.ask("bm.hangar.localhost.", RecordType::A).await;
    dns.ask("gone.hangar.localhost.", RecordType::AAAA).await;
    dns.ask("example.com.", RecordType::TXT).await;
    dns.ask("hangar.localhost.", RecordType::from(65_000)).await;
    t.shutdown().await;

    let counts: BTreeMap<(String, String), u64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| k.key().name() == crate::metrics::QUERIES_TOTAL)
        .map(|(k, _, _, v)| {
            let label = |n: &str| {
                k.key()
                    .labels()
                    .find(|l| l.key() == n)
                    .map(|l| l.value().to_string())
                    .unwrap()
            };
            let DebugValue::Counter(c) = v else {
                panic!("not a counter")
            };
            ((label("type"), label("rcode")), c)
        })
        .collect();
    let get = |t: &str, r: &str| counts.get(&(t.into(), r.into())).copied().unwrap_or(0);
    assert!(get("A", "NOERROR") >= 2, "{counts:?}");
    assert_eq!(get("AAAA", "NXDOMAIN"), 1, "{counts:?}");
    assert_eq!(get("TXT", "REFUSED"), 1, "{counts:?}");
    assert_eq!(get("other", "NOERROR"), 1, "{counts:?}");
}

#[tokio::test]
async fn bind_shares_one_port_between_udp_and_tcp_and_reports_conflicts() {
    let (udp, tcp) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = udp.local_addr().unwrap();
    assert_ne!(addr.port(), 0);
    assert_eq!(tcp.local_addr().unwrap(), addr);
    // The same fixed address again: the UDP bind fails and says which address.
    let err = bind(addr).await.unwrap_err();
    assert!(matches!(err, DnsError::BindUdp { .. }), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
