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

/// An event whose write fails is not acknowledged: the session closes with "try again" and the
/// drone, which keeps unacknowledged events, sends it again on its next session, where it is
/// applied. (Events used to be acknowledged whatever happened, so a lost `exited` left the
/// record `ready`.)
#[tokio::test]
async fn an_event_that_cannot_be_written_is_not_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::open(dir.path()).await;
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
