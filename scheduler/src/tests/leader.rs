//! Leader election through the store, fenced writes, and stepping down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hangar_core::api::ConnectRequest;
use hangar_core::token::TokenKey;
use hangar_core::{BackendState, TerminationReason};
use hangar_store::Store;
use hangar_store::embedded::EmbeddedStore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{TestStore, hello, key};
use crate::leader::{LEADER_KEY, Leadership, Role};
use crate::{ApiError, Clock, ManualClock, Scheduler, SchedulerConfig};

fn instance(store: Arc<dyn Store>, name: &str) -> Arc<Leadership> {
    Arc::new(Leadership::new(
        store,
        Arc::new(ManualClock::new(1_000)),
        name.into(),
        format!("http://{name}:7070"),
        Duration::from_secs(10),
    ))
}

/// Two instances share a store: one leads, the other follows and names it; when the leader's
/// lease ends the other is elected with a higher token, and the deposed leader's writes are
/// refused by the store as fenced (never a conflict to retry).
#[tokio::test]
async fn one_leads_and_a_deposed_leaders_writes_are_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = EmbeddedStore::open_default(dir.path().join("s.redb"))
        .await
        .unwrap();
    let mut cfg = SchedulerConfig::new("hangar.test", "http://a:7070");
    cfg.defaults.command = Some(vec!["true".into()]);
    cfg.instance_id = "a".into();
    let a = Scheduler::new(
        cfg.clone(),
        store.clone(),
        TokenKey::generate(),
        Arc::new(ManualClock::new(1_000)),
    );
    let cancel = CancellationToken::new();
    a.start(cancel.clone()).await.unwrap();
    let Role::Leader { token: first } = a.handles().leadership.role() else {
        panic!("the first instance leads");
    };
    let _d = a
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), false)
        .await
        .unwrap();
    let r = a.handles().connector.connect(key("doc")).await.unwrap();

    let b = instance(store.clone(), "b");
    assert!(b.campaign().await.unwrap().is_none());
    match b.role() {
        Role::Follower {
            leader: Some(leader),
        } => assert_eq!(leader.instance, "a"),
        other => panic!("b should follow a: {other:?}"),
    }

    // a's leadership ends behind its back (its key is deleted, as a lease expiry would).
    assert!(store.delete(LEADER_KEY).await.unwrap());
    let (_, second) = b.campaign().await.unwrap().expect("b is elected");
    assert!(second > first, "a new term has a higher token");

    // a still believes it leads for a moment: whatever it writes as leader is fenced.
    let fenced = a.handles().backends.fenced(first);
    let err = fenced
        .terminate(r.backend_id.as_str(), TerminationReason::Requested, false)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Fenced(_)), "{err:?}");
    assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    let (rec, _) = a
        .handles()
        .backends
        .get(r.backend_id.as_str())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.state, BackendState::Scheduled, "nothing was written");
    // b's term writes.
    let b_view = a.handles().backends.fenced(second);
    let rec = b_view
        .terminate(r.backend_id.as_str(), TerminationReason::Requested, false)
        .await
        .unwrap();
    assert!(matches!(rec.state, BackendState::Terminating { .. }));
    cancel.cancel();
    a.wait().await;
}

/// A connect on an instance that does not lead is refused (503) and names the leader.
#[tokio::test]
async fn a_follower_does_not_place() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = EmbeddedStore::open_default(dir.path().join("s.redb"))
        .await
        .unwrap();
    let other = instance(store.clone(), "elsewhere");
    other.campaign().await.unwrap().expect("elected");
    let mut cfg = SchedulerConfig::new("hangar.test", "http://a:7070");
    cfg.defaults.command = Some(vec!["true".into()]);
    let s = Scheduler::new(
        cfg,
        store,
        TokenKey::generate(),
        Arc::new(ManualClock::new(1_000)),
    );
    let cancel = CancellationToken::new();
    s.start(cancel.clone()).await.unwrap();
    let _d = s
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), false)
        .await
        .unwrap();
    let err = s
        .handles()
        .connector
        .connect(ConnectRequest::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Fenced(_)), "{err:?}");
    assert!(err.to_string().contains("elsewhere"), "{err}");
    cancel.cancel();
    s.wait().await;
}

/// With a paused clock: a leader whose renewals hang steps down at its renew deadline (the
/// TTL after the send time of the last acknowledged renewal), cancels its tasks and waits for
/// them before it campaigns again.
#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_steps_down_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::open(dir.path()).await;
    let leader = instance(store.clone(), "a");
    let elected = leader.campaign().await.unwrap();
    assert!(elected.is_some());
    let stopped = Arc::new(AtomicBool::new(false));
    let flag = stopped.clone();
    let tasks: crate::leader::LeaderTasks = Box::new(move |term, tracker: &TaskTracker| {
        let c = term.cancel.clone();
        let flag = flag.clone();
        tracker.spawn(async move {
            c.cancelled().await;
            flag.store(true, Ordering::SeqCst);
        });
    });
    let cancel = CancellationToken::new();
    let run = tokio::spawn(leader.clone().run(elected, tasks, cancel.clone()));
    // Renewals work for a while.
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert!(leader.token().is_some());
    assert!(!stopped.load(Ordering::SeqCst));
    // The store stops answering renewals (they fail without saying the lease is gone).
    let first = leader.token().unwrap();
    store.hang_keep_alives.store(true, Ordering::SeqCst);
    let cut = tokio::time::Instant::now();
    while !stopped.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            cut.elapsed() < Duration::from_secs(11),
            "never stepped down"
        );
    }
    assert!(
        cut.elapsed() <= Duration::from_secs(10),
        "stepped down after {:?}: later than the TTL after the last acknowledged renewal",
        cut.elapsed()
    );
    // Its tasks ended, then it campaigned again (the store still takes writes here): a new
    // term, with a new token.
    while leader.token().is_none_or(|t| t == first) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "never campaigned again"
        );
    }
    assert!(leader.token().unwrap() > first);
    cancel.cancel();
    run.await.unwrap();
}

/// A new leader gives a drone whose record vanished while nobody led one lease TTL from its
/// election to reconnect before its backends are declared lost; after that they are.
#[tokio::test]
async fn a_new_term_gives_drones_one_ttl_before_declaring_them_lost() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = EmbeddedStore::open_default(dir.path().join("s.redb"))
        .await
        .unwrap();
    let clock = ManualClock::new(1_000_000);
    let mut cfg = SchedulerConfig::new("hangar.test", "http://a:7070");
    cfg.defaults.command = Some(vec!["true".into()]);
    cfg.lease_ttl = Duration::from_secs(10);
    let s = Scheduler::new(
        cfg,
        store.clone(),
        TokenKey::generate(),
        Arc::new(clock.clone()),
    );
    // Not started: passes are run by hand; only the route publisher runs, and this instance
    // leads.
    let token = s.handles().leadership.campaign().await.unwrap().unwrap().1;
    let feed = crate::routes::RouteFeed::new(
        store.clone(),
        Arc::new(s.config().clone()),
        s.handles().routes.clone(),
    );
    let loaded = feed.load().await.unwrap();
    let cancel = CancellationToken::new();
    let publisher = tokio::spawn(feed.run(loaded, cancel.clone()));
    let admitted = s
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), true)
        .await
        .unwrap();
    let r = s.handles().connector.connect(key("doc")).await.unwrap();
    // While nobody watched, the drone's lease ran out: its record is gone.
    store.lease_revoke(admitted.lease.unwrap()).await.unwrap();
    let elected_at = clock.now_ms();
    let state = |s: &Scheduler| {
        let backends = s.handles().backends.clone();
        let id = r.backend_id.clone();
        async move { backends.get(id.as_str()).await.unwrap().unwrap().0.state }
    };
    s.reconciler(token, elected_at).pass().await.unwrap();
    assert_eq!(state(&s).await, BackendState::Scheduled, "within the grace");
    clock.advance_ms(10_001);
    s.reconciler(token, elected_at).pass().await.unwrap();
    assert_eq!(
        state(&s).await,
        BackendState::Terminated {
            reason: TerminationReason::Lost
        }
    );
    cancel.cancel();
    publisher.await.unwrap();
}
