//! The session races that could let a key run twice or leave a dead backend `ready`, each
//! reproduced against a real scheduler (embedded store) with the drone played by hand.

use std::time::Duration;

use hangar_core::drone::{BackendEvent, InventoryItem, SchedulerMessage};
use hangar_core::{BackendId, BackendState, TerminationReason};
use tokio::sync::mpsc;

use super::{Fixture, hello, key};
use crate::ApiError;
use crate::Scheduler;
use crate::drone_session::AdmitError;
use hangar_store::Store;

async fn state_of(s: &Scheduler, id: &BackendId) -> BackendState {
    s.handles()
        .backends
        .get(id.as_str())
        .await
        .unwrap()
        .unwrap()
        .0
        .state
}

/// Plays the drone: the backend starts and becomes ready at a made-up address.
async fn run_to_ready(s: &Scheduler, drone: &str, run: &str, id: &BackendId) {
    let address = "127.0.0.1:9".parse().unwrap();
    for ev in [
        BackendEvent::Starting,
        BackendEvent::Waiting { address },
        BackendEvent::Ready { address },
    ] {
        s.handles()
            .backends
            .apply_event(drone, run, id, ev)
            .await
            .unwrap();
    }
}

/// The commands queued for a drone right now.
fn queued(commands: &mut mpsc::UnboundedReceiver<SchedulerMessage>) -> Vec<SchedulerMessage> {
    let mut out = Vec::new();
    while let Ok(m) = commands.try_recv() {
        out.push(m);
    }
    out
}

/// Terminate while the drone is briefly disconnected: the record used to go straight to
/// `terminated` without a stop, freeing the key for a second backend while the first still
/// ran. Now it stays `terminating` (a connect for the key waits, then answers 409 with
/// Retry-After), the stop is sent when the run reconnects, and the key moves on only once
/// the drone reports the exit.
#[tokio::test]
async fn terminate_while_the_drone_is_away_holds_the_key_until_the_exit_is_reported() {
    let f = Fixture::start(|cfg| cfg.predecessor_wait = Duration::from_millis(300)).await;
    let s = &f.sched;
    let sessions = &s.handles().sessions;
    let first = sessions.admit(&hello("d1", "r1"), false).await.unwrap();
    let a = s.handles().connector.connect(key("doc")).await.unwrap();
    run_to_ready(s, "d1", "r1", &a.backend_id).await;

    // The session drops; the operator terminates meanwhile.
    s.handles().drones.remove_session("d1", first.session);
    let rec = s
        .handles()
        .backends
        .terminate(a.backend_id.as_str(), TerminationReason::Requested, false)
        .await
        .unwrap();
    assert_eq!(
        rec.state,
        BackendState::Terminating {
            reason: TerminationReason::Requested
        },
        "closed without a stop while its process may still run"
    );

    // A connect for the key must not place a second process next to the first.
    let err = s.handles().connector.connect(key("doc")).await.unwrap_err();
    let ApiError::Busy { retry_after, .. } = &err else {
        panic!("expected 409 busy, got {err:?}");
    };
    assert!(*retry_after >= Duration::from_secs(1));
    assert_eq!(err.status(), http::StatusCode::CONFLICT);

    // The run reconnects: the stop is sent; the drone reports the exit; the key moves on.
    let mut again = sessions.admit(&hello("d1", "r1"), false).await.unwrap();
    assert!(
        queued(&mut again.commands).iter().any(|m| matches!(
            m,
            SchedulerMessage::Terminate { backend, .. } if *backend == a.backend_id
        )),
        "the stop is sent again on reconnect"
    );
    s.handles()
        .backends
        .apply_event(
            "d1",
            "r1",
            &a.backend_id,
            BackendEvent::Exited { exit_code: Some(0) },
        )
        .await
        .unwrap();
    let b = s.handles().connector.connect(key("doc")).await.unwrap();
    assert!(b.spawned && b.backend_id != a.backend_id);
    f.stop().await;
}

/// A connect that finds the key's backend terminating waits for it, and proceeds as soon as
/// the exit is reported (within the wait).
#[tokio::test]
async fn a_connect_waits_for_the_previous_backend_to_exit() {
    let f = Fixture::start(|cfg| cfg.predecessor_wait = Duration::from_secs(30)).await;
    let s = &f.sched;
    let _d = s
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), false)
        .await
        .unwrap();
    let a = s.handles().connector.connect(key("doc")).await.unwrap();
    run_to_ready(s, "d1", "r1", &a.backend_id).await;
    s.handles()
        .backends
        .terminate(a.backend_id.as_str(), TerminationReason::Requested, false)
        .await
        .unwrap();
    let connector = s.handles().connector.clone();
    let waiting = tokio::spawn(async move { connector.connect(key("doc")).await });
    // The waiting connect has placed nothing: the only backend is still the first.
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    s.handles()
        .backends
        .apply_event(
            "d1",
            "r1",
            &a.backend_id,
            BackendEvent::Exited { exit_code: Some(0) },
        )
        .await
        .unwrap();
    let b = waiting.await.unwrap().unwrap();
    assert!(b.spawned && b.backend_id != a.backend_id);
    let epoch = |id: &BackendId| {
        let backends = s.handles().backends.clone();
        let id = id.clone();
        async move { backends.get(id.as_str()).await.unwrap().unwrap().0.epoch }
    };
    assert_eq!(epoch(&b.backend_id).await, epoch(&a.backend_id).await + 1);
    f.stop().await;
}

/// Concurrent connects used to exceed `--max-backends` (and reservations): placement read a
/// load that the route table updates only after the record is written. Twenty parallel
/// connects for new keys against a drone that takes one backend: exactly one is placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_parallel_connects_against_max_backends_one_place_exactly_one() {
    let f = Fixture::start(|_| {}).await;
    let s = &f.sched;
    let mut one = hello("d1", "r1");
    one.capacity.max_backends = 1;
    let _d = s.handles().sessions.admit(&one, false).await.unwrap();
    let mut connects = tokio::task::JoinSet::new();
    for i in 0..20 {
        let connector = s.handles().connector.clone();
        connects.spawn(async move { connector.connect(key(&format!("k{i}"))).await });
    }
    let (mut placed, mut refused) = (0, 0);
    while let Some(r) = connects.join_next().await {
        match r.unwrap() {
            Ok(_) => placed += 1,
            Err(ApiError::Unavailable(m)) => {
                assert!(m.contains("maximum of 1"), "{m}");
                refused += 1;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((placed, refused), (1, 19));
    f.stop().await;
}

/// Two drones started with the same `--name` on different hosts used to knock out each
/// other's backends. The second is refused while the first holds a live lease (retried with
/// backoff: only a bad secret stops a drone for good), with a message that says so; a new
/// agent on the first's host takes over.
#[tokio::test]
async fn a_name_held_by_another_host_is_refused_while_its_lease_lives() {
    let f = Fixture::start(|_| {}).await;
    let sessions = &f.sched.handles().sessions;
    let on = |run: &str, host: &str| {
        let mut h = hello("d1", run);
        h.host = Some(host.into());
        h
    };
    let first = sessions.admit(&on("r1", "host-a"), true).await.unwrap();
    let e = sessions.admit(&on("r2", "host-b"), true).await.unwrap_err();
    assert!(matches!(e, AdmitError::NameTaken { .. }) && e.is_transient());
    let text = e.to_string();
    assert!(
        text.contains("host-a") && text.contains("--name"),
        "says who holds it and what to do: {text}"
    );
    // The agent on host-a restarts (a new run): it takes over its own name.
    let second = sessions.admit(&on("r3", "host-a"), true).await.unwrap();
    // Once host-a's lease is gone, host-b may have the name.
    f.store.lease_revoke(first.lease.unwrap()).await.unwrap();
    f.store.lease_revoke(second.lease.unwrap()).await.unwrap();
    sessions.admit(&on("r4", "host-b"), true).await.unwrap();
    f.stop().await;
}

/// A lost `exited` (applied or acknowledged wrongly) used to leave the record `ready` for a
/// process that is gone. When the run is admitted again, a started backend its inventory
/// does not list is closed; one it lists stays.
#[tokio::test]
async fn readmission_closes_started_backends_the_drone_no_longer_runs() {
    let f = Fixture::start(|_| {}).await;
    let s = &f.sched;
    let sessions = &s.handles().sessions;
    let _d = sessions.admit(&hello("d1", "r1"), false).await.unwrap();
    let gone = s.handles().connector.connect(key("gone")).await.unwrap();
    let kept = s.handles().connector.connect(key("kept")).await.unwrap();
    run_to_ready(s, "d1", "r1", &gone.backend_id).await;
    run_to_ready(s, "d1", "r1", &kept.backend_id).await;
    let mut h = hello("d1", "r1");
    h.inventory = vec![InventoryItem {
        backend: kept.backend_id.clone(),
        address: "127.0.0.1:9".parse().unwrap(),
        run_id: None,
    }];
    let _again = sessions.admit(&h, false).await.unwrap();
    assert_eq!(
        state_of(s, &gone.backend_id).await,
        BackendState::Terminated {
            reason: TerminationReason::Failed { exit_code: None }
        }
    );
    assert_eq!(state_of(s, &kept.backend_id).await, BackendState::Ready);
    f.stop().await;
}

/// A re-adopted backend that was terminating used to get no stop: only a reconnect of the
/// same run re-sent stops. A new agent run that adopts it gets the stop again.
#[tokio::test]
async fn a_readopted_terminating_backend_gets_its_stop_again() {
    let f = Fixture::start(|_| {}).await;
    let s = &f.sched;
    let sessions = &s.handles().sessions;
    let first = sessions.admit(&hello("d1", "r1"), false).await.unwrap();
    let a = s.handles().connector.connect(key("doc")).await.unwrap();
    run_to_ready(s, "d1", "r1", &a.backend_id).await;
    s.handles().drones.remove_session("d1", first.session);
    s.handles()
        .backends
        .terminate(a.backend_id.as_str(), TerminationReason::Requested, false)
        .await
        .unwrap();
    // The agent restarts (run r2) and reports the backend still running.
    let mut h = hello("d1", "r2");
    h.inventory = vec![InventoryItem {
        backend: a.backend_id.clone(),
        address: "127.0.0.1:9".parse().unwrap(),
        run_id: Some("r1".into()),
    }];
    let mut restarted = sessions.admit(&h, false).await.unwrap();
    assert!(
        queued(&mut restarted.commands).iter().any(|m| matches!(
            m,
            SchedulerMessage::Terminate { backend, .. } if *backend == a.backend_id
        )),
        "the adopted, terminating backend is stopped"
    );
    assert!(matches!(
        state_of(s, &a.backend_id).await,
        BackendState::Terminating { .. }
    ));
    f.stop().await;
}

/// A lease granted before waiting for the admission lock could run out while a long pass held
/// it; the admission then failed as a refusal and the drone exited for good. The lease is now
/// granted once the lock is held.
#[tokio::test(start_paused = true)]
async fn a_lease_cannot_run_out_while_admission_waits_for_the_lock() {
    let f = Fixture::start(|cfg| cfg.lease_ttl = Duration::from_secs(10)).await;
    let sessions = f.sched.handles().sessions.clone();
    let held = sessions.exclusive().await;
    let waiting = {
        let sessions = sessions.clone();
        tokio::spawn(async move { sessions.admit(&hello("d1", "r1"), true).await })
    };
    tokio::time::advance(Duration::from_secs(15)).await;
    drop(held);
    let admitted = waiting.await.unwrap().unwrap();
    f.store
        .lease_keep_alive(admitted.lease.unwrap())
        .await
        .expect("the session's lease is alive");
    f.stop().await;
}

/// A backend its drone stopped by self-fencing ends as `fenced`, saying so, not as a failure.
#[tokio::test]
async fn a_fenced_backend_ends_as_fenced() {
    let f = Fixture::start(|_| {}).await;
    let s = &f.sched;
    let _d = s
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), false)
        .await
        .unwrap();
    let a = s.handles().connector.connect(key("doc")).await.unwrap();
    run_to_ready(s, "d1", "r1", &a.backend_id).await;
    s.handles()
        .backends
        .apply_event(
            "d1",
            "r1",
            &a.backend_id,
            BackendEvent::Fenced {
                exit_code: Some(137),
            },
        )
        .await
        .unwrap();
    let (rec, _) = s
        .handles()
        .backends
        .get(a.backend_id.as_str())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rec.state,
        BackendState::Terminated {
            reason: TerminationReason::Fenced
        }
    );
    assert!(
        rec.message.unwrap_or_default().contains("self-fencing"),
        "the message says what happened"
    );
    f.stop().await;
}
