//! Drone lease expiry with a paused clock and a real scheduler on the embedded store.

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
