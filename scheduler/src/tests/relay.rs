//! Commands travel through the records: the leader writes them, the instance holding the
//! drone's session relays them, whoever that is.

use std::sync::Arc;
use std::time::Duration;

use hangar_core::TerminationReason;
use hangar_core::drone::SchedulerMessage;
use hangar_core::token::TokenKey;
use hangar_store::Store;
use hangar_store::embedded::EmbeddedStore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{hello, key};
use crate::leader::Role;
use crate::{ManualClock, Scheduler, SchedulerConfig};

/// Starts instance `name` on `store`.
async fn instance(store: Arc<dyn Store>, name: &str, cancel: &CancellationToken) -> Scheduler {
    let mut cfg = SchedulerConfig::new("hangar.test", format!("http://{name}:7070"));
    cfg.defaults.command = Some(vec!["true".into()]);
    cfg.instance_id = name.into();
    let s = Scheduler::new(
        cfg,
        store,
        TokenKey::generate(),
        Arc::new(ManualClock::new(1_000_000)),
    );
    s.start(cancel.clone()).await.unwrap();
    s
}

/// Instances `a` (which leads) and `b` on one embedded store.
async fn two_instances() -> (tempfile::TempDir, CancellationToken, Scheduler, Scheduler) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = EmbeddedStore::open_default(dir.path().join("s.redb"))
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let a = instance(store.clone(), "a", &cancel).await;
    let b = instance(store, "b", &cancel).await;
    (dir, cancel, a, b)
}

/// The next command queued for the drone (failing the test if none comes).
async fn next(commands: &mut mpsc::UnboundedReceiver<SchedulerMessage>) -> SchedulerMessage {
    tokio::time::timeout(Duration::from_secs(10), commands.recv())
        .await
        .expect("a command within 10 s")
        .expect("the session is open")
}

/// A drone whose session the follower holds: the leader places on it (it sees the drone
/// through the store's records only) and every command reaches it through the follower.
#[tokio::test]
async fn the_leaders_commands_reach_a_drone_held_by_a_follower() {
    let (_dir, cancel, a, b) = two_instances().await;
    assert!(matches!(a.handles().leadership.role(), Role::Leader { .. }));
    assert!(matches!(
        b.handles().leadership.role(),
        Role::Follower { .. }
    ));

    let mut held = b
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), true)
        .await
        .unwrap();
    // The leader learns of the drone from its record.
    let mut seen = a.handles().directory.get("d1");
    let mut changes = 0;
    while seen.is_none() {
        assert!(changes < 1000, "the leader never saw the drone's record");
        tokio::time::sleep(Duration::from_millis(5)).await;
        seen = a.handles().directory.get("d1");
        changes += 1;
    }
    assert_eq!(seen.unwrap().run_id, "r1");
    assert!(a.handles().drones.get("d1").is_none(), "a holds no session");

    let r = a.handles().connector.connect(key("doc")).await.unwrap();
    match next(&mut held.commands).await {
        SchedulerMessage::Spawn(cmd) => {
            assert_eq!(cmd.backend, r.backend_id);
            assert_eq!(cmd.key.as_deref(), Some("default/doc"));
        }
        other => panic!("expected the spawn, got {other:?}"),
    }

    let leader = a.handles().leadership.token().expect("a leads");
    let fenced = a.handles().backends.fenced(leader);
    let id = r.backend_id.as_str();
    fenced
        .terminate(id, TerminationReason::Requested, false)
        .await
        .unwrap();
    assert_eq!(
        next(&mut held.commands).await,
        SchedulerMessage::Terminate {
            backend: r.backend_id.clone(),
            hard: false
        }
    );
    // An overdue stop escalates to a kill, at most once per terminate timeout.
    assert!(fenced.request_kill(id).await.unwrap());
    assert!(!fenced.request_kill(id).await.unwrap(), "not again at once");
    assert_eq!(
        next(&mut held.commands).await,
        SchedulerMessage::Terminate {
            backend: r.backend_id.clone(),
            hard: true
        }
    );
    cancel.cancel();
    a.wait().await;
    b.wait().await;
}

/// A maintenance window begun on the leader reaches the drones whose sessions a follower
/// holds (every instance follows the record); it can be lengthened, never shortened, and a
/// length outside 1 s to 7 days is refused.
#[tokio::test]
async fn a_maintenance_window_reaches_the_drones_of_every_instance() {
    let (_dir, cancel, a, b) = two_instances().await;
    let mut told_b = b.handles().maintenance.subscribe();

    let minute = Duration::from_secs(60);
    let window = crate::api::begin_maintenance(a.handles(), minute)
        .await
        .unwrap();
    let hold = tokio::time::timeout(Duration::from_secs(10), told_b.recv())
        .await
        .expect("b tells its drones within 10 s")
        .unwrap();
    assert_eq!(hold, minute, "the hold lasts until the window's end");
    assert_eq!(
        b.handles().maintenance.current().await.unwrap(),
        Some(window.clone())
    );
    // A shorter request keeps the window as it is.
    let kept = crate::api::begin_maintenance(a.handles(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(kept, window);
    for bad in [Duration::ZERO, Duration::from_secs(8 * 86_400)] {
        let err = crate::api::begin_maintenance(a.handles(), bad)
            .await
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::BAD_REQUEST, "{err}");
    }
    cancel.cancel();
    a.wait().await;
    b.wait().await;
}
