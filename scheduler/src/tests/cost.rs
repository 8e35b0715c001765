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

/// A scheduler on `store` that leads but is not started: passes are run by hand, and only its
/// route publisher runs (stopped by cancelling the token, then awaiting the task).
async fn leading(
    store: &Arc<TestStore>,
    clock: Arc<ManualClock>,
) -> (
    Scheduler,
    hangar_store::Revision,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let mut cfg = SchedulerConfig::new("hangar.test", "http://127.0.0.1:1");
    cfg.defaults.command = Some(vec!["true".into()]);
    // Nothing renews the leadership here (the scheduler is not started): it must outlast
    // loading a long history on a slow debug build.
    cfg.leader_ttl = std::time::Duration::from_secs(600);
    let sched = Scheduler::new(cfg, store.clone(), TokenKey::generate(), clock);
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
    (sched, token, cancel, publisher)
}

/// A route feed alone on `store`, loaded and running (stopped by cancelling the token, then
/// awaiting the task).
async fn route_feed(
    store: &Arc<TestStore>,
) -> (
    Arc<crate::routes::Routes>,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let mut cfg = SchedulerConfig::new("hangar.test", "http://127.0.0.1:1");
    cfg.defaults.command = Some(vec!["true".into()]);
    let routes = Arc::new(crate::routes::Routes::default());
    let feed = crate::routes::RouteFeed::new(store.clone(), Arc::new(cfg), routes.clone());
    let loaded = feed.load().await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let publisher = tokio::spawn(feed.run(loaded, cancel.clone()));
    (routes, cancel, publisher)
}

/// Connects `n` new keys named `{prefix}-{k}`.
async fn connect_new(sched: &Scheduler, prefix: &str, n: usize) {
    for k in 0..n {
        sched
            .handles()
            .connector
            .connect(ConnectRequest {
                key: Some(KeyRef::new("default", format!("{prefix}-{k}"))),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_reconciler_pass_reads_no_backend_history_and_removes_only_what_is_due() {
    const NOW: u64 = 100_000_000;
    const HISTORY: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::open(dir.path()).await;
    // History: 100,000 ended backends, 5 of them past the retention.
    let retention = SchedulerConfig::new("hangar.test", "http://127.0.0.1:1")
        .terminated_retention
        .as_millis() as u64;
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
    let (sched, token, cancel, publisher) = leading(&store, Arc::new(ManualClock::new(NOW))).await;
    let _d = sched
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), false)
        .await
        .unwrap();
    connect_new(&sched, "live", 10).await;
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
    let (routes, cancel, publisher) = route_feed(&store).await;
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

/// After a term's first pass, a pass looks only at what changed or came due: with 1,400 live
/// backends and nothing due, none of them; after three connects, those three; after a drone's
/// run is gone, that drone's records (closed as lost); and every live record again once
/// [`RECHECK_EVERY`](crate::reconciler::RECHECK_EVERY) has passed.
#[tokio::test]
async fn a_reconciler_pass_looks_only_at_what_changed_or_came_due() {
    const NOW: u64 = 100_000_000;
    const PER_DRONE: usize = 700;
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::open(dir.path()).await;
    let clock = Arc::new(ManualClock::new(NOW));
    let (sched, token, cancel, publisher) = leading(&store, clock.clone()).await;
    let routes = sched.handles().routes.clone();
    let sessions = &sched.handles().sessions;
    let _d1 = sessions.admit(&hello("d1", "r1"), false).await.unwrap();
    let _d2 = sessions.admit(&hello("d2", "r2"), false).await.unwrap();
    // Ready backends with neither an idle timeout nor a lifetime: nothing about them is due.
    let live = |i: usize, drone: &str, run: &str| BackendRecord {
        state: BackendState::Ready,
        terminated_at: None,
        drone: Some(drone.into()),
        drone_run_id: Some(run.into()),
        ..ended(i, NOW - 1_000)
    };
    write_records(
        &store,
        (0..PER_DRONE)
            .map(|i| live(i, "d1", "r1"))
            .chain((PER_DRONE..2 * PER_DRONE).map(|i| live(i, "d2", "r2"))),
    )
    .await;
    let settle = |n: usize| {
        let routes = routes.clone();
        async move {
            let mut tables = routes.subscribe();
            tables
                .wait_for(|_| routes.live_records().len() == n)
                .await
                .unwrap();
        }
    };
    settle(2 * PER_DRONE).await;

    let reconciler = sched.reconciler(token, 0);
    assert_eq!(
        reconciler.pass().await.unwrap(),
        2 * PER_DRONE,
        "a first pass looks at all"
    );
    assert_eq!(
        reconciler.pass().await.unwrap(),
        0,
        "nothing changed, nothing due"
    );

    connect_new(&sched, "new", 3).await;
    assert_eq!(reconciler.pass().await.unwrap(), 3, "only the new backends");
    assert_eq!(reconciler.pass().await.unwrap(), 0);

    // d2's run is gone (its record expired): every record on it is looked at and closed.
    let on_d2 = routes
        .live_on_runs(&[("d2".to_string(), "r2".to_string())])
        .len();
    assert!(on_d2 >= PER_DRONE);
    store
        .delete(&crate::records::drone_key("d2"))
        .await
        .unwrap();
    assert_eq!(reconciler.pass().await.unwrap(), on_d2);
    let left = 2 * PER_DRONE + 3 - on_d2;
    settle(left).await;
    assert_eq!(
        reconciler.pass().await.unwrap(),
        0,
        "the closed records are no longer live"
    );

    // Whatever its deadlines say, each live record is looked at again within a minute.
    clock.advance_ms(crate::reconciler::RECHECK_EVERY.as_millis() as u64);
    assert_eq!(reconciler.pass().await.unwrap(), left);
    assert_eq!(reconciler.pass().await.unwrap(), 0);
    cancel.cancel();
    publisher.await.unwrap();
}

/// A burst of changes larger than a watcher's buffer ends the route feed's watch (the store
/// does not hold its writers for a slow reader); the feed resumes from the last revision it
/// applied, replaying what the store kept, instead of listing every record again, and misses
/// nothing.
#[tokio::test]
async fn a_route_feed_that_falls_behind_resumes_its_watch_without_listing_again() {
    const LIVE: usize = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let options = hangar_store::embedded::EmbeddedOptions {
        watch_buffer: 8,
        ..Default::default()
    };
    let store = TestStore::open_with(dir.path(), options).await;
    let (routes, cancel, publisher) = route_feed(&store).await;
    let lists = store.backend_lists.load(Ordering::SeqCst);

    // Transactions of 100 records, many at once: each is more than the watcher can queue.
    let record = |i: usize| BackendRecord {
        state: BackendState::Ready,
        terminated_at: None,
        ..ended(i, 1_000)
    };
    write_records(&store, (0..LIVE).map(record)).await;
    let mut tables = routes.subscribe();
    tables.wait_for(|t| t.len() == LIVE).await.unwrap();
    assert_eq!(routes.live_records().len(), LIVE);
    assert_eq!(
        store.backend_lists.load(Ordering::SeqCst),
        lists,
        "the feed resumed its watch; it did not list the records again"
    );
    cancel.cancel();
    publisher.await.unwrap();
}
