//! Connect writes the backend record and the key's claim in one transaction.

use hangar_core::api::ConnectRequest;
use hangar_core::{BackendId, KeyRef};
use hangar_store::{Store, WatchEvent};

use super::{Fixture, hello};
use crate::records::{BACKENDS_PREFIX, KEYS_PREFIX};

/// Twenty concurrent connects for one key: every one answers with the same backend, and no
/// other backend record is ever written (not even briefly: a losing connect used to write its
/// record, lose the key and delete it again, leaving an orphan window in between).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_for_one_key_write_one_record() {
    let f = Fixture::start(|_| {}).await;
    let (sched, store) = (&f.sched, &f.store);
    let _commands = sched
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), false)
        .await
        .unwrap();

    let from = store.revision().await.unwrap() + 1;
    let mut backends = store.watch(BACKENDS_PREFIX, from).await.unwrap();
    let mut keys = store.watch(KEYS_PREFIX, from).await.unwrap();

    let mut connects = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let connector = sched.handles().connector.clone();
        connects.spawn(async move {
            connector
                .connect(ConnectRequest {
                    key: Some(KeyRef::new("default", "doc")),
                    ..Default::default()
                })
                .await
                .unwrap()
        });
    }
    let mut answered: Vec<BackendId> = Vec::new();
    let mut spawned = 0;
    while let Some(r) = connects.join_next().await {
        let r = r.unwrap();
        spawned += usize::from(r.spawned);
        answered.push(r.backend_id);
    }
    assert_eq!(spawned, 1, "exactly one connect starts the backend");
    assert!(answered.iter().all(|id| *id == answered[0]), "{answered:?}");

    // Every backend-record write so far, and the key's: one record, one claim, at the same
    // revision (one transaction).
    let mut puts = Vec::new();
    // The store queues a write's events before the write returns: all are here.
    while let Ok(ev) = backends.try_recv() {
        match ev {
            WatchEvent::Put(kv) => puts.push(kv),
            WatchEvent::Delete { key, .. } => panic!("record {key} was written and withdrawn"),
        }
    }
    let created: Vec<_> = puts.iter().filter(|kv| kv.version == 1).collect();
    assert_eq!(
        created.len(),
        1,
        "one backend record is created: {created:?}"
    );
    assert!(created[0].key.ends_with(answered[0].as_str()));
    let claim = match keys.try_recv().unwrap() {
        WatchEvent::Put(kv) => kv,
        other => panic!("{other:?}"),
    };
    assert_eq!(claim.mod_revision, created[0].mod_revision);
    assert!(keys.try_recv().is_err(), "the key is claimed once");
    f.stop().await;
}

/// A namespace's live quota bounds new backends (429), never the reuse of a live one, and
/// other namespaces are not affected.
#[tokio::test]
async fn a_live_quota_refuses_new_backends_but_not_existing_ones() {
    let f = Fixture::start(|_| {}).await;
    let s = &f.sched;
    let _d = s
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), false)
        .await
        .unwrap();
    s.handles()
        .quotas
        .set(
            "team-a",
            crate::quotas::Quota {
                max_live: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let in_team = |name: &str| ConnectRequest {
        key: Some(KeyRef::new("team-a", name)),
        ..Default::default()
    };
    let first = s.handles().connector.connect(in_team("one")).await.unwrap();
    let err = s
        .handles()
        .connector
        .connect(in_team("two"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), http::StatusCode::TOO_MANY_REQUESTS, "{err}");
    let again = s.handles().connector.connect(in_team("one")).await.unwrap();
    assert_eq!(again.backend_id, first.backend_id);
    assert!(!again.spawned);
    s.handles()
        .connector
        .connect(super::key("elsewhere"))
        .await
        .unwrap();
    f.stop().await;
}

/// With many drones placement samples a few instead of evaluating all: backends spread over
/// the pool, and drones that cannot take one (draining, full) are never chosen, even when
/// only two can (sampling then falls back to looking at every drone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_among_many_drones_spreads_and_never_picks_one_that_cannot_take_it() {
    let f = Fixture::start(|_| {}).await;
    let s = &f.sched;
    let names: Vec<String> = (0..40).map(|i| format!("d{i:02}")).collect();
    let mut sessions = Vec::new();
    for name in &names {
        sessions.push(
            s.handles()
                .sessions
                .admit(&hello(name, "r1"), false)
                .await
                .unwrap(),
        );
    }
    // All but two drain.
    for name in &names[..38] {
        s.handles().drains.start(name, 1, None).await.unwrap();
    }
    let placed_on = |id: BackendId| async move {
        let (rec, _) = s
            .handles()
            .backends
            .get(id.as_str())
            .await
            .unwrap()
            .unwrap();
        rec.drone.unwrap()
    };
    for n in 0..30 {
        let r = s
            .handles()
            .connector
            .connect(super::key(&format!("drain-{n}")))
            .await
            .unwrap();
        let drone = placed_on(r.backend_id).await;
        assert!(
            drone == "d38" || drone == "d39",
            "placed on draining {drone}"
        );
    }
    for name in &names[..38] {
        s.handles().drains.cancel(name).await.unwrap();
    }
    let mut used = std::collections::BTreeMap::<String, usize>::new();
    for n in 0..200 {
        let r = s
            .handles()
            .connector
            .connect(super::key(&format!("spread-{n}")))
            .await
            .unwrap();
        *used.entry(placed_on(r.backend_id).await).or_default() += 1;
    }
    assert!(
        used.len() >= 30,
        "200 backends on only {} of 40 drones",
        used.len()
    );
    // The two that already had 15 each take few more: two choices prefer the less loaded.
    let old = used.get("d38").copied().unwrap_or(0) + used.get("d39").copied().unwrap_or(0);
    assert!(old <= 6, "the loaded drones took {old} more: {used:?}");
    drop(sessions);
    f.stop().await;
}
