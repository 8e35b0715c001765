//! Drone lease expiry with a paused clock and a real scheduler on the embedded store.

use std::sync::Arc;
use std::time::Duration;

use hangar_core::api::ConnectRequest;
use hangar_core::drone::SchedulerMessage;
use hangar_core::{BackendState, TerminationReason};
use hangar_store::Store;

use super::{Fixture, hello, key};
use crate::Scheduler;

async fn state_of(s: &Scheduler, id: &str) -> BackendState {
    s.handles().backends.get(id).await.unwrap().unwrap().0.state
}

/// With a paused clock: a drone whose lease is renewed keeps its backends; once the
/// renewals stop, the lease expires, the drone record vanishes and every live backend
/// of that run is closed as lost, while a record already moved to a newer run is left
/// alone.
#[tokio::test(start_paused = true)]
async fn an_expired_lease_closes_the_runs_backends_as_lost() {
    // The leader's own lease outlasts the test's time jumps: one term throughout.
    let f = Fixture::start(|cfg| {
        cfg.lease_ttl = Duration::from_secs(10);
        cfg.leader_ttl = Duration::from_secs(3600);
    })
    .await;
    let (sched, store) = (&f.sched, &f.store);
    let admitted = sched
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), true)
        .await
        .unwrap();
    let lease = admitted.lease.unwrap();
    let mut commands = admitted.commands;
    let a = sched.handles().connector.connect(key("a")).await.unwrap();
    assert!(matches!(
        commands.recv().await,
        Some(SchedulerMessage::Spawn(_))
    ));

    // Renewed every 5 s for 30 s: nothing is lost.
    for _ in 0..6 {
        tokio::time::advance(Duration::from_secs(5)).await;
        store.lease_keep_alive(lease).await.unwrap();
    }
    assert_eq!(
        state_of(sched, a.backend_id.as_str()).await,
        BackendState::Scheduled
    );

    // Renewals stop: after the TTL the backend is lost.
    tokio::time::advance(Duration::from_secs(11)).await;
    let mut state = state_of(sched, a.backend_id.as_str()).await;
    for _ in 0..100 {
        if !state.is_live() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        state = state_of(sched, a.backend_id.as_str()).await;
    }
    assert_eq!(
        state,
        BackendState::Terminated {
            reason: TerminationReason::Lost
        }
    );
    assert!(store.lease_keep_alive(lease).await.is_err());
    // The drone-loss handler also forgets the session (the reconciler may have closed the
    // record first).
    for _ in 0..100 {
        if sched.handles().drones.get("d1").is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(sched.handles().drones.get("d1").is_none());

    // A record that names a newer run is never overwritten by the old run's loss.
    let _second = sched
        .handles()
        .sessions
        .admit(&hello("d1", "r2"), true)
        .await
        .unwrap();
    let b = sched
        .handles()
        .connector
        .connect(ConnectRequest::default())
        .await
        .unwrap();
    assert!(
        !sched
            .handles()
            .backends
            .mark_lost(b.backend_id.as_str(), "r1", "stale")
            .await
            .unwrap()
    );
    assert_eq!(
        state_of(sched, b.backend_id.as_str()).await,
        BackendState::Scheduled
    );
    f.stop().await;
}

/// A lost drone's backends are closed in batched writes: more than one batch, only those
/// still on the lost run, and a deposed leader's batch is fenced, not retried.
#[tokio::test]
async fn a_lost_runs_backends_close_in_batches() {
    // No reconciler pass after the first: it would close the backend moved to run r2 (whose
    // drone has no such run) itself, racing the assertions below on a loaded machine.
    let f = Fixture::start(|c| c.reconcile_interval = Duration::from_secs(3600)).await;
    let s = &f.sched;
    let _d = s
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), false)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..70 {
        ids.push(
            s.handles()
                .connector
                .connect(key(&format!("b{i}")))
                .await
                .unwrap()
                .backend_id,
        );
    }
    // The records as an index read them, before one of them moved on to another run: that
    // one's batch meets the newer revision and falls back to closing its records one by one,
    // leaving the moved one alone.
    let on_run: Vec<_> = ids
        .iter()
        .map(|id| Arc::new(s.handles().routes.live_record(id).expect("a live record")))
        .collect();
    s.handles()
        .backends
        .update(ids[0].as_str(), |r| {
            r.drone_run_id = Some("r2".into());
            true
        })
        .await
        .unwrap();
    let token = s.handles().leadership.token().expect("it leads");
    let stale = s.handles().backends.fenced(token + 1_000_000);
    let err = stale
        .mark_lost_many(&on_run, "lost in a test")
        .await
        .unwrap_err();
    assert!(matches!(err, crate::ApiError::Fenced(_)), "{err:?}");
    let closed = s
        .handles()
        .backends
        .fenced(token)
        .mark_lost_many(&on_run, "lost in a test")
        .await
        .unwrap();
    assert_eq!(closed, 69);
    assert!(state_of(s, ids[0].as_str()).await.is_live());
    for id in &ids[1..] {
        assert_eq!(
            state_of(s, id.as_str()).await,
            BackendState::Terminated {
                reason: TerminationReason::Lost
            }
        );
    }
    f.stop().await;
}
