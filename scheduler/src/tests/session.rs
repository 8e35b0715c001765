//! The drone session over a real WebSocket: an event is acknowledged only once it is written.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::{SinkExt, StreamExt};
use hangar_core::BackendState;
use hangar_core::drone::{BackendEvent, CLOSE_TRY_AGAIN, FromDrone, SchedulerMessage, ToDrone};
use hangar_core::token::TokenKey;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use super::{TestStore, hello, key};
use crate::{ManualClock, Scheduler, SchedulerConfig};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn session(api: std::net::SocketAddr) -> Ws {
    let mut req = format!("ws://{api}/v1/drones/connect")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let hello = serde_json::to_string(&FromDrone::Hello(hello("d1", "r1"))).unwrap();
    ws.send(Message::text(hello)).await.unwrap();
    assert!(matches!(next(&mut ws).await, Some(ToDrone::Welcome { .. })));
    ws
}

/// The next message from the scheduler; `None` with the close code once it closes.
async fn next(ws: &mut Ws) -> Option<ToDrone> {
    match ws.next().await? {
        Ok(Message::Text(t)) => Some(serde_json::from_str(&t).unwrap()),
        _ => None,
    }
}

async fn send(ws: &mut Ws, m: &FromDrone) {
    ws.send(Message::text(serde_json::to_string(m).unwrap()))
        .await
        .unwrap();
}

/// A started scheduler on `store` (drone secret `s3cret`, the clock standing still) serving
/// its API on `127.0.0.1:0`: stopped by cancelling the token, then awaiting the server.
async fn serving(
    store: &Arc<TestStore>,
) -> (
    Scheduler,
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let mut cfg = SchedulerConfig::new("hangar.test", "http://127.0.0.1:1");
    cfg.defaults.command = Some(vec!["true".into()]);
    cfg.drone_secret = Some("s3cret".into());
    let sched = Scheduler::new(
        cfg,
        store.clone(),
        TokenKey::generate(),
        Arc::new(ManualClock::new(1_000_000)),
    );
    let cancel = CancellationToken::new();
    sched.start(cancel.clone()).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let server = {
        let (s, c) = (sched.clone(), cancel.clone());
        tokio::spawn(async move { s.serve_api(listener, c).await })
    };
    (sched, api, cancel, server)
}

/// An event whose write fails is not acknowledged: the session closes with "try again" and the
/// drone, which keeps unacknowledged events, sends it again on its next session, where it is
/// applied. (Events used to be acknowledged whatever happened, so a lost `exited` left the
/// record `ready`.)
#[tokio::test]
async fn an_event_that_cannot_be_written_is_not_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::open(dir.path()).await;
    let (sched, api, cancel, server) = serving(&store).await;

    let mut ws = session(api).await;
    let a = sched.handles().connector.connect(key("doc")).await.unwrap();
    let Some(ToDrone::Command {
        id,
        message: SchedulerMessage::Spawn(spawn),
    }) = next(&mut ws).await
    else {
        panic!("expected the spawn");
    };
    assert_eq!(spawn.backend, a.backend_id);
    send(&mut ws, &FromDrone::Ack { id }).await;

    // The store fails the write: no acknowledgement, the session closes with "try again".
    store.failing.store(true, Ordering::SeqCst);
    let starting = FromDrone::Event {
        seq: 1,
        backend: a.backend_id.clone(),
        event: BackendEvent::Starting,
    };
    send(&mut ws, &starting).await;
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), CLOSE_TRY_AGAIN, "{frame:?}");
            assert!(frame.reason.contains("connection refused"), "{frame:?}");
        }
        other => panic!("expected a close without an ack, got {other:?}"),
    }
    let state = |s: &Scheduler| {
        let backends = s.handles().backends.clone();
        let id = a.backend_id.clone();
        async move { backends.get(id.as_str()).await.unwrap().unwrap().0.state }
    };
    assert_eq!(state(&sched).await, BackendState::Scheduled);

    // The store is back; the drone reconnects and sends the event again: applied and acked.
    store.failing.store(false, Ordering::SeqCst);
    let mut ws = session(api).await;
    send(&mut ws, &starting).await;
    loop {
        match next(&mut ws).await {
            Some(ToDrone::EventAck { seq }) => {
                assert_eq!(seq, 1);
                break;
            }
            // The scheduled backend's spawn is re-sent on readmission.
            Some(ToDrone::Command { .. }) => {}
            other => panic!("expected the ack, got {other:?}"),
        }
    }
    assert_eq!(state(&sched).await, BackendState::Starting);
    cancel.cancel();
    let _ = server.await;
    sched.wait().await;
}

/// Events that arrive together are applied together: `starting`, `waiting` and `ready` of one
/// backend in one burst cost one write of its record, each is acknowledged, and a message
/// between events (a heartbeat) is still answered in its place.
#[tokio::test]
async fn events_that_arrive_together_are_written_once_per_backend() {
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::open(dir.path()).await;
    let (sched, api, cancel, server) = serving(&store).await;
    let mut ws = session(api).await;
    let mut spawned = Vec::new();
    for name in ["a", "b"] {
        let c = sched.handles().connector.connect(key(name)).await.unwrap();
        let Some(ToDrone::Command { id, .. }) = next(&mut ws).await else {
            panic!("expected the spawn");
        };
        send(&mut ws, &FromDrone::Ack { id }).await;
        spawned.push(c.backend_id);
    }
    let record = |id: &hangar_core::BackendId| {
        let backends = sched.handles().backends.clone();
        let id = id.clone();
        async move { backends.get(id.as_str()).await.unwrap().unwrap().0 }
    };
    let address: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap();
    let event = |seq, backend: &hangar_core::BackendId, event| {
        Message::text(
            serde_json::to_string(&FromDrone::Event {
                seq,
                backend: backend.clone(),
                event,
            })
            .unwrap(),
        )
    };
    let puts = store.backend_puts.load(Ordering::SeqCst);
    // One burst: a's start, b's start and a heartbeat between them.
    let (a, b) = (&spawned[0], &spawned[1]);
    let burst = [
        event(1, a, BackendEvent::Starting),
        event(2, b, BackendEvent::Starting),
        event(3, a, BackendEvent::Waiting { address }),
        Message::text(
            serde_json::to_string(&FromDrone::Heartbeat {
                unhealthy: Default::default(),
            })
            .unwrap(),
        ),
        event(4, a, BackendEvent::Ready { address }),
        event(5, b, BackendEvent::Waiting { address }),
        event(6, b, BackendEvent::Ready { address }),
    ];
    for m in burst {
        ws.feed(m).await.unwrap();
    }
    ws.flush().await.unwrap();
    let mut answers = Vec::new();
    while answers.len() < 7 {
        match next(&mut ws).await {
            Some(ToDrone::EventAck { seq }) => answers.push(format!("ack {seq}")),
            Some(ToDrone::HeartbeatAck) => answers.push("heartbeat".into()),
            other => panic!("expected acks, got {other:?}"),
        }
    }
    // The heartbeat is answered after the events read before it, before those after it.
    let at = |s: &str| answers.iter().position(|a| a == s).unwrap();
    for early in ["ack 1", "ack 2", "ack 3"] {
        assert!(at(early) < at("heartbeat"), "{answers:?}");
    }
    for late in ["ack 4", "ack 5", "ack 6"] {
        assert!(at(late) > at("heartbeat"), "{answers:?}");
    }
    for id in [a, b] {
        let r = record(id).await;
        assert_eq!(r.state, BackendState::Ready, "{id}");
        assert_eq!(r.address, Some(address));
    }
    // Events 1-3 (a twice, b once) and 4-6 (a once, b twice): two writes per burst, one per
    // backend, instead of one per event.
    assert_eq!(store.backend_puts.load(Ordering::SeqCst) - puts, 4);
    cancel.cancel();
    let _ = server.await;
    sched.wait().await;
}
