//! The loop's batching on real sockets: bursts from several clients that fill batches with
//! every kind of datagram, each answered (or not) exactly as the general path says and sent to
//! its own source; shutdown under a flood; the rule for going on after a failed send; and the
//! socket's registration, for writability only while an answer waits for room.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hangar_core::BackendId;
use hangar_core::route::{Route, RouteState, RouteTable};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ALL_IO, Io, Registered, advance, general_answer, serve_with};
use crate::config::DnsConfig;
use crate::fast::tests::Q;
use crate::server::Handler;
use crate::zone::Zone;

const A: u16 = 1;
const SOA: u16 = 6;
const TXT: u16 = 16;
const AAAA: u16 = 28;
const PROBE_ID: u16 = 0xFEED;

/// A task aborted when dropped, so a failing test leaves nothing running.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn handler() -> Handler {
    let mut config = DnsConfig::new(
        "hangar.localhost",
        vec![IpAddr::from([127, 0, 0, 1]), "::1".parse().unwrap()],
    );
    config.nameserver_addresses = vec![IpAddr::from([127, 0, 0, 53])];
    let zone = Zone::new(&config).unwrap();
    zone.publish_routes(Arc::new(RouteTable::new(
        3,
        [Route::new(
            BackendId::parse("bready").unwrap(),
            RouteState::Ready,
        )],
    )));
    zone.publish_txt([("_acme-challenge.hangar.localhost", "v1")]);
    Handler {
        zone: Arc::new(zone),
    }
}

/// A query with RD set: `flags` high byte 0x01; `edns` adds a plain OPT record.
fn query(id: u16, flags: u8, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let q = Q::new(name, qtype).id(id).flags([flags, 0]);
    let q = if edns { q.edns(1232, 0, 0, 0, &[]) } else { q };
    q.bytes()
}

/// The datagrams a batch mixes: fast-path answers, general-path answers (SOA, TXT, REFUSED,
/// FORMERR) and datagrams the loop drops (a response, a headless scrap).
fn datagram(kind: usize, id: u16) -> Vec<u8> {
    match kind % 9 {
        0 => query(id, 0x01, "bready.hangar.localhost", A, false),
        1 => query(id, 0x01, "BReady.hangar.localhost", AAAA, true),
        2 => query(id, 0x01, "bunknown.hangar.localhost", A, false),
        3 => query(id, 0x01, "hangar.localhost", SOA, false),
        4 => query(id, 0x01, "example.com", A, false),
        5 => query(id, 0x01, "_acme-challenge.hangar.localhost", TXT, true),
        6 => {
            let full = query(id, 0x01, "bready.hangar.localhost", A, false);
            full[..full.len() - 3].to_vec()
        }
        7 => query(id, 0x81, "bready.hangar.localhost", A, false),
        _ => id.to_be_bytes().to_vec(),
    }
}

/// Receives one datagram on `sock`, failing after 5 s.
async fn recv(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 4096];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    (buf[..n].to_vec(), from)
}

#[tokio::test]
async fn a_burst_from_many_clients_gets_each_answer_at_its_source_in_order() {
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 20;
    const CLOSED: usize = 6;
    for &io in ALL_IO {
        let handler = handler();
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();

        // Every datagram is queued before the loop starts, so that its first batch is full and
        // holds every client's datagrams of every kind, interleaved; the rest make a second
        // batch. A client that closes its socket before the answers come is in the first.
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            clients.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        }
        let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut expected = vec![Vec::new(); CLIENTS];
        for j in 0..PER_CLIENT {
            for (c, client) in clients.iter().enumerate() {
                let id = ((c as u16) << 8) | j as u16;
                let packet = datagram(c + j, id);
                let src = client.local_addr().unwrap();
                expected[c].extend(general_answer(&handler, &packet, src));
                client.send_to(&packet, addr).await.unwrap();
            }
            if j < CLOSED {
                let packet = datagram(j, 0xC000 | j as u16);
                closed.send_to(&packet, addr).await.unwrap();
            }
        }
        drop(closed);
        assert!(
            expected.iter().all(|e| e.len() > PER_CLIENT / 2),
            "most datagrams are answered"
        );

        let cancel = CancellationToken::new();
        let mut task = AbortOnDrop(tokio::spawn(serve_with(
            server,
            handler,
            cancel.clone(),
            io,
        )));
        for (c, client) in clients.iter().enumerate() {
            for (k, want) in expected[c].iter().enumerate() {
                let (got, from) = recv(client).await;
                assert_eq!(from, addr, "{io:?}");
                assert_eq!(&got, want, "{io:?}: client {c}, answer {k}");
            }
        }
        // Nothing more: the next datagram each client gets answers its probe.
        for client in &clients {
            let probe = query(PROBE_ID, 0x01, "bready.hangar.localhost", A, false);
            client.send_to(&probe, addr).await.unwrap();
            let (got, _) = recv(client).await;
            assert_eq!(got[..2], PROBE_ID.to_be_bytes(), "{io:?}: an extra answer");
        }

        cancel.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(5), &mut task.0)
            .await
            .expect("the loop stops within 5 s of shutdown");
        stopped.unwrap().unwrap();
    }
}

#[tokio::test]
async fn shutdown_stops_the_loop_under_a_flood() {
    for &io in ALL_IO {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let mut task = AbortOnDrop(tokio::spawn(serve_with(
            server,
            handler(),
            cancel.clone(),
            io,
        )));
        let client = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let flood = {
            let client = client.clone();
            AbortOnDrop(tokio::spawn(async move {
                let packet = query(1, 0x01, "bready.hangar.localhost", A, false);
                loop {
                    // A full buffer only drops datagrams.
                    let _ = client.send_to(&packet, addr).await;
                    tokio::task::yield_now().await;
                }
            }))
        };
        // The loop is busy answering the flood.
        recv(&client).await;
        cancel.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(5), &mut task.0)
            .await
            .expect("the loop stops within 5 s of shutdown");
        stopped.unwrap().unwrap();
        drop(flood);
    }
}

#[test]
fn sending_goes_on_past_what_left_and_past_a_failed_answer() {
    let refused = || Err(io::Error::from(io::ErrorKind::ConnectionRefused));
    let full = || Err(io::Error::from(io::ErrorKind::WouldBlock));
    let cases: [(usize, io::Result<usize>, Option<usize>); 6] = [
        // All of them, or some: the next call starts after them.
        (0, Ok(5), Some(5)),
        (3, Ok(2), Some(5)),
        // The first failed: the next call starts after it.
        (3, refused(), Some(4)),
        (0, Err(io::Error::from_raw_os_error(13)), Some(1)),
        // No room: the same answers again once the socket is writable.
        (3, full(), None),
        // Nothing sent and no error (never seen): move on rather than spin.
        (2, Ok(0), Some(3)),
    ];
    for (next, tried, want) in cases {
        assert_eq!(advance(next, &tried), want, "from {next} after {tried:?}");
    }
}

/// Whether `socket` is ready to write, as the runtime knows it after a turn of its driver.
async fn known_writable(socket: &Registered) -> bool {
    tokio::task::yield_now().await;
    tokio::select! {
        biased;
        ready = socket.fd().writable() => {
            ready.unwrap().retain_ready();
            true
        }
        () = std::future::ready(()) => false,
    }
}

#[tokio::test]
async fn the_socket_is_registered_for_writability_only_while_an_answer_waits() {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let mut socket = Registered::new(server.into_std().unwrap()).unwrap();
    // An idle socket has room, but a registration for reading only never says so: answers
    // sent wake nothing.
    assert!(!known_writable(&socket).await);
    socket.set_writable(true).unwrap();
    socket.fd().writable().await.unwrap().retain_ready();
    assert!(known_writable(&socket).await);

    // A datagram that arrives while registered for both, and is still waiting when the
    // socket goes back to reading only, is found by the new registration.
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(b"query", addr).await.unwrap();
    socket.set_writable(false).unwrap();
    assert!(!known_writable(&socket).await);
    let mut guard = socket.fd().readable().await.unwrap();
    let mut buf = [0u8; 16];
    let (len, from) = guard
        .try_io(|s| s.get_ref().recv_from(&mut buf))
        .expect("readable")
        .unwrap();
    assert_eq!(
        (&buf[..len], from),
        (&b"query"[..], client.local_addr().unwrap())
    );
    // Asking for what it has already changes nothing.
    socket.set_writable(false).unwrap();
    assert!(!known_writable(&socket).await);
}

#[test]
fn batching_is_off_unless_configured_and_only_where_the_calls_exist() {
    assert_eq!(Io::configured(false), Io::Single);
    #[cfg(target_os = "linux")]
    assert_eq!(Io::configured(true), Io::Batched);
    #[cfg(not(target_os = "linux"))]
    assert_eq!(Io::configured(true), Io::Single);
    assert!(!crate::DnsConfig::new("hangar.localhost", Vec::new()).udp_batching);
}
