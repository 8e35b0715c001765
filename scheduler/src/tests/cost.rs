//! A reconciler pass costs what is live and due, not what the store has seen: with a long
//! history of ended backends in the store (100,000 here, and 10 live), a pass reads no
//! backend record from it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hangar_core::api::ConnectRequest;
use hangar_core::token::TokenKey;
use hangar_core::{BackendId, BackendState, KeyRef, TerminationReason};
use hangar_store::{Store, TxnOp, TxnOutcome};

use super::{TestStore, hello};
use crate::records::{BackendRecord, ResolvedSpawn, backend_key};
use crate::{ManualClock, Scheduler, SchedulerConfig};

fn ended(i: usize, terminated_at: u64) -> BackendRecord {
    BackendRecord {
        id: BackendId::parse(&format!("bold{i}")).unwrap(),
        key: None,
        epoch: 1,
        spawn: ResolvedSpawn {
            command: None,
            image: None,
            env: Default::default(),
            idle_timeout_s: None,
            lifetime_s: None,
            resources: Default::default(),
            pool: "default".into(),
        },
        user: None,
        public: false,
        state: BackendState::Terminated {
            reason: TerminationReason::Idle,
        },
        drone: Some("d1".into()),
        drone_run_id: Some("r0".into()),
        address: None,
        created_at: terminated_at,
        updated_at: terminated_at,
        ready_at: None,
        terminated_at: Some(terminated_at),
        terminating_at: None,
        kill_requested_at: None,
        created_by: None,
        pool: None,
        message: None,
    }
}

/// Writes `records` 100 to a transaction, many transactions at once (the store commits them
/// in groups).
async fn write_records(store: &Arc<TestStore>, records: impl Iterator<Item = BackendRecord>) {
    let records: Vec<BackendRecord> = records.collect();
    let mut writes = tokio::task::JoinSet::new();
    for chunk in records.chunks(100) {
        let ops = chunk
            .iter()
            .map(|rec| {
                TxnOp::put(
                    backend_key(rec.id.as_str()),
                    serde_json::to_vec(rec).unwrap(),
                    None,
                )
            })
            .collect();
        let store = store.clone();
        writes.spawn(async move { store.txn(Vec::new(), ops).await });
    }
    while let Some(done) = writes.join_next().await {
        assert!(matches!(done.unwrap().unwrap(), TxnOutcome::Committed(_)));
    }
}

#[tokio::test]
async fn a_reconciler_pass_reads_no_backend_history_and_removes_only_what_is_due() {
    const NOW: u64 = 100_000_000;
    const HISTORY: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::open(dir.path()).await;
    // History: 100,000 ended backends, 5 of them past the retention.
    let mut cfg = SchedulerConfig::new("hangar.test", "http://127.0.0.1:1");
    cfg.defaults.command = Some(vec!["true".into()]);
    // Nothing renews the leadership here (the scheduler is not started): it must outlast
    // loading the history on a slow debug build.
    cfg.leader_ttl = std::time::Duration::from_secs(600);
    let retention = cfg.terminated_retention.as_millis() as u64;
    write_records(
        &store,
        (0..HISTORY).map(|i| {
            let at = if i < 5 {
                NOW - retention - 1
            } else {
                NOW - 1_000
            };
            ended(i, at)
        }),
    )
    .await;
    let sched = Scheduler::new(
        cfg,
        store.clone(),
        TokenKey::generate(),
        Arc::new(ManualClock::new(NOW)),
    );
    // Not started: passes are run by hand below; only the route publisher runs, and this
    // instance leads (placement and the reconciler are the leader's).
    let (_, token) = sched
        .handles()
        .leadership
        .campaign()
        .await
        .unwrap()
        .expect("the only instance leads");
    let feed = crate::routes::RouteFeed::new(
        store.clone(),
        Arc::new(sched.config().clone()),
        sched.handles().routes.clone(),
    );
    let loaded = feed.load().await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let publisher = tokio::spawn(feed.run(loaded, cancel.clone()));
    let _d = sched
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), false)
        .await
        .unwrap();
    for k in 0..10 {
        sched
            .handles()
            .connector
            .connect(ConnectRequest {
                key: Some(KeyRef::new("default", format!("live-{k}"))),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // A connect answers once the publisher has its record: the index has all ten.
    assert_eq!(sched.handles().routes.live_records().len(), 10);

    let reconciler = sched.reconciler(token, 0);
    let (lists, gets) = (
        store.backend_lists.load(Ordering::SeqCst),
        store.backend_gets.load(Ordering::SeqCst),
    );
    reconciler.pass().await.unwrap();
    assert_eq!(
        store.backend_lists.load(Ordering::SeqCst),
        lists,
        "a pass lists no backend records"
    );
    assert_eq!(
        store.backend_gets.load(Ordering::SeqCst),
        gets,
        "nothing live needed a change, so nothing was read"
    );
    assert_eq!(
        store.deletes.load(Ordering::SeqCst),
        5,
        "only the records past the retention are removed"
    );
    for i in 0..5 {
        assert!(
            store
                .get(&backend_key(&format!("bold{i}")))
                .await
                .unwrap()
                .is_none()
        );
    }
    assert!(store.get(&backend_key("bold5")).await.unwrap().is_some());
    cancel.cancel();
    publisher.await.unwrap();
}

/// A route change costs what it touches: with 5,000 backends published, ending one produces
/// a table that shares every shard but one with the last, a delta of exactly that route, and
/// the drone's reservations and the directory of live backends follow it; so does deleting
/// a record.
#[tokio::test]
async fn a_route_change_is_a_delta_and_copies_one_shard_of_the_table() {
    const LIVE: usize = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::open(dir.path()).await;
    let record = |i: usize, state: BackendState| BackendRecord {
        state,
        terminated_at: None,
        ..ended(i, 1_000)
    };
    write_records(&store, (0..LIVE).map(|i| record(i, BackendState::Ready))).await;
    let mut cfg = SchedulerConfig::new("hangar.test", "http://127.0.0.1:1");
    cfg.defaults.command = Some(vec!["true".into()]);
    let routes = Arc::new(crate::routes::Routes::default());
    let feed = crate::routes::RouteFeed::new(store.clone(), Arc::new(cfg), routes.clone());
    let loaded = feed.load().await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let publisher = tokio::spawn(feed.run(loaded, cancel.clone()));
    assert_eq!(routes.current().len(), LIVE);
    assert_eq!(routes.load_of("d1").backends, LIVE as u64);
    assert_eq!(routes.directory().len(), LIVE);

    // One backend ends.
    let before = routes.current();
    let mut deltas = routes.follow_deltas();
    let gone = record(
        7,
        BackendState::Terminated {
            reason: TerminationReason::Idle,
        },
    );
    let rev = store
        .put(
            &backend_key(gone.id.as_str()),
            serde_json::to_vec(&gone).unwrap(),
            None,
        )
        .await
        .unwrap();
    let delta = deltas.recv().await.unwrap();
    let hangar_core::feed::FeedMessage::Delta {
        revision,
        upserts,
        removals,
        ..
    } = delta.message()
    else {
        panic!("not a delta")
    };
    assert_eq!(revision, rev);
    assert_eq!(upserts, vec![gone.route()]);
    assert!(removals.is_empty());
    let after = routes.current();
    assert_eq!(after.revision, rev);
    assert_eq!(after.shards_not_shared_with(&before), 1, "one shard copied");
    assert_eq!(after.len(), LIVE);
    assert_eq!(routes.load_of("d1").backends, LIVE as u64 - 1);
    assert_eq!(routes.directory().len(), LIVE - 1);

    // Its record is deleted.
    store.delete(&backend_key(gone.id.as_str())).await.unwrap();
    let delta = deltas.recv().await.unwrap();
    let hangar_core::feed::FeedMessage::Delta {
        upserts, removals, ..
    } = delta.message()
    else {
        panic!("not a delta")
    };
    assert!(upserts.is_empty());
    assert_eq!(removals, vec![gone.id.clone()]);
    let last = routes.current();
    assert_eq!(last.shards_not_shared_with(&after), 1);
    assert_eq!(last.len(), LIVE - 1);
    assert!(last.get(gone.id.as_str()).is_none());
    // The same state listed afresh makes the same table.
    assert_eq!(
        *last,
        hangar_core::route::RouteTable::new(last.revision, last.routes().cloned())
    );
    cancel.cancel();
    publisher.await.unwrap();
}
