//! DNS load benchmark: queries per second and latency (p50/p99) of the in-process server over
//! UDP loopback, with a 10,000-route table.
//!
//! `cargo bench --bench dns` runs the full measurement (bounded: a fixed number of queries per
//! scenario, and at most 30 s each). Without `--bench` (as `cargo test --benches` runs it) it
//! does a short smoke run.
//!
//! The client is deliberately thin (pre-encoded queries, raw sockets) so that the figures are
//! the server's. Client and server share the machine's cores.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::BackendId;
use hangar_core::route::{Route, RouteState, RouteTable};
use hangar_dns::{DnsConfig, DnsServer};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

const ROUTES: usize = 10_000;
/// No scenario runs longer than this, whatever its query count.
const TIME_LIMIT: Duration = Duration::from_secs(30);

/// A query in wire format: header (RD set, one question), then the name, type and class IN.
fn encode_query(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

struct Scenario {
    name: &'static str,
    /// Clients, each with its own socket and one query in flight.
    clients: usize,
    queries: usize,
}

struct Outcome {
    queries: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// Response codes seen (index = RCODE).
    rcodes: [usize; 16],
}

/// One client: sends the queries in turn, waiting for each answer.
async fn client(
    server: SocketAddr,
    queries: Arc<Vec<Vec<u8>>>,
    count: usize,
    deadline: Instant,
) -> (Vec<Duration>, [usize; 16]) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(server).await.unwrap();
    let mut latencies = Vec::with_capacity(count);
    let mut rcodes = [0usize; 16];
    let mut buf = [0u8; 1500];
    for i in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let mut q = queries[i % queries.len()].clone();
        let id = (i as u16).wrapping_mul(7919);
        q[..2].copy_from_slice(&id.to_be_bytes());
        let started = Instant::now();
        sock.send(&q).await.unwrap();
        // Loopback does not drop at one query in flight per socket; a lost answer would show
        // as a stall, so give up on this client rather than hang.
        loop {
            let n = match tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf)).await {
                Ok(r) => r.unwrap(),
                Err(_) => panic!("no answer within 2 s: the server stalled"),
            };
            if n >= 4 && buf[..2] == id.to_be_bytes() {
                rcodes[(buf[3] & 0x0f) as usize] += 1;
                break;
            }
        }
        latencies.push(started.elapsed());
    }
    (latencies, rcodes)
}

async fn run(server: SocketAddr, queries: Arc<Vec<Vec<u8>>>, s: &Scenario) -> Outcome {
    let deadline = Instant::now() + TIME_LIMIT;
    let per_client = s.queries / s.clients;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for c in 0..s.clients {
        // Each client starts at a different place in the query mix.
        let mut mine: Vec<Vec<u8>> = queries.to_vec();
        mine.rotate_left(c * 7 % queries.len());
        set.spawn(client(server, Arc::new(mine), per_client, deadline));
    }
    let mut latencies = Vec::with_capacity(s.queries);
    let mut rcodes = [0usize; 16];
    while let Some(r) = set.join_next().await {
        let (l, r) = r.unwrap();
        latencies.extend(l);
        for (a, b) in rcodes.iter_mut().zip(r) {
            *a += b;
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Outcome {
        queries: latencies.len(),
        elapsed,
        latencies,
        rcodes,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dns = DnsServer::new(&DnsConfig::new(
            "hangar.localhost",
            vec![IpAddr::from([127, 0, 0, 1])],
        ))
        .unwrap();
        // Half the routes live, half gone.
        let ids: Vec<String> = (0..ROUTES).map(|i| format!("b{i:08}")).collect();
        dns.publish_routes(Arc::new(RouteTable::new(
            1,
            ids.iter().enumerate().map(|(i, id)| {
                let state = if i % 2 == 0 {
                    RouteState::Ready
                } else {
                    RouteState::Gone
                };
                Route::new(BackendId::parse(id).unwrap(), state)
            }),
        )));
        let (udp, tcp) = hangar_dns::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = udp.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let server = {
            let dns = dns.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move { dns.run(udp, tcp, cancel).await })
        };

        // The mix: live backends (A), gone backends (NXDOMAIN), the apex SOA, outside the zone.
        let mut mix = Vec::new();
        for i in 0..64 {
            mix.push(encode_query(&format!("{}.hangar.localhost", ids[i * 2]), 1));
            mix.push(encode_query(
                &format!("{}.hangar.localhost", ids[i * 2 + 1]),
                1,
            ));
        }
        mix.push(encode_query("hangar.localhost", 6));
        mix.push(encode_query("example.com", 1));
        let mix = Arc::new(mix);

        let scale = if full { 1 } else { 100 };
        let scenarios = [
            Scenario {
                name: "1 client, 1 query in flight",
                clients: 1,
                queries: 20_000 / scale,
            },
            Scenario {
                name: "16 clients, 1 query in flight each",
                clients: 16,
                queries: 160_000 / scale,
            },
        ];
        // Warm up (sockets, allocator, branch predictors).
        run(
            addr,
            mix.clone(),
            &Scenario {
                name: "warm-up",
                clients: 4,
                queries: 4_000 / scale,
            },
        )
        .await;
        println!("| Scenario | Queries | QPS | p50 | p99 |");
        println!("| --- | --- | --- | --- | --- |");
        for s in &scenarios {
            let o = run(addr, mix.clone(), s).await;
            let qps = o.queries as f64 / o.elapsed.as_secs_f64();
            println!(
                "| {} | {} | {:.0} | {:.0} µs | {:.0} µs |",
                s.name,
                o.queries,
                qps,
                percentile(&o.latencies, 0.50).as_secs_f64() * 1e6,
                percentile(&o.latencies, 0.99).as_secs_f64() * 1e6,
            );
            assert_eq!(o.rcodes[2], 0, "SERVFAIL answers: {:?}", o.rcodes);
            assert!(
                o.rcodes[0] > 0 && o.rcodes[3] > 0 && o.rcodes[5] > 0,
                "the mix gets NOERROR, NXDOMAIN and REFUSED: {:?}",
                o.rcodes
            );
        }
        cancel.cancel();
        server.await.unwrap().unwrap();
    });
}
