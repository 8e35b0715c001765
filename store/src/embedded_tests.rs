//! Tests of [`EmbeddedStore`]: the shared conformance suite plus what only the embedded store
//! can be made to show (exact revision numbers, restarts, compaction, slow watchers, an
//! injected lease clock).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use super::{EmbeddedOptions, EmbeddedStore, LeaseClock, TokioClock, decode, encode};
use crate::conformance::{assert_no_event, next_event};
use crate::{
    CasOutcome, Compare, Expect, KeyValue, Store, StoreError, TxnOp, TxnOutcome, WatchEvent,
};

async fn fresh() -> (Arc<dyn Store>, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_default(dir.path().join("store.redb"))
        .await
        .unwrap();
    (store, dir)
}

crate::store_conformance_tests!(fresh);

async fn open_in(dir: &TempDir) -> Arc<EmbeddedStore> {
    EmbeddedStore::open_default(dir.path().join("store.redb"))
        .await
        .unwrap()
}

async fn open_with_options(dir: &TempDir, options: EmbeddedOptions) -> Arc<EmbeddedStore> {
    EmbeddedStore::open_with(dir.path().join("store.redb"), Arc::new(TokioClock), options)
        .await
        .unwrap()
}

fn delete_of(event: WatchEvent) -> (String, u64) {
    match event {
        WatchEvent::Delete { key, revision, .. } => (key, revision),
        other => panic!("expected a delete event, got {other:?}"),
    }
}

/// A clock the test moves by hand, independent of tokio time, to show that deadlines are
/// enforced on every operation and not only by the sweeper.
struct ManualClock {
    base: Instant,
    offset: Mutex<Duration>,
}

impl ManualClock {
    fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap() += by;
    }
}

impl LeaseClock for ManualClock {
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn revisions_count_every_write_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir).await;
    assert_eq!(store.revision().await.unwrap(), 0, "an empty store is at 0");
    assert_eq!(store.list("").await.unwrap().revision, 0);

    assert_eq!(store.put("k", b"1".to_vec(), None).await.unwrap(), 1);
    assert_eq!(store.put("k", b"2".to_vec(), None).await.unwrap(), 2);
    assert_eq!(
        store
            .compare_and_swap("k", Expect::ModRevision(2), b"3".to_vec(), None)
            .await
            .unwrap(),
        CasOutcome::Written(3)
    );
    // Conflicts, missed deletes and lease grants write nothing.
    assert!(matches!(
        store
            .compare_and_swap("k", Expect::Absent, b"x".to_vec(), None)
            .await
            .unwrap(),
        CasOutcome::Conflict(Some(_))
    ));
    assert!(!store.delete("missing").await.unwrap());
    assert!(!store.delete_if_revision("k", 1).await.unwrap());
    let lease = store.lease_grant(Duration::from_secs(5)).await.unwrap();
    assert_eq!(store.revision().await.unwrap(), 3);

    assert!(store.delete("k").await.unwrap());
    assert_eq!(store.revision().await.unwrap(), 4);

    // A lease expiring with three keys bumps the revision three times, one event each.
    for key in ["l/a", "l/b", "l/c"] {
        store.put(key, b"v".to_vec(), Some(lease)).await.unwrap();
    }
    assert_eq!(store.revision().await.unwrap(), 7);
    let mut stream = store.watch("l/", 0).await.unwrap();
    tokio::time::advance(Duration::from_secs(6)).await;
    let mut deletes = Vec::new();
    for _ in 0..3 {
        deletes.push(delete_of(next_event(&mut stream).await));
    }
    assert_eq!(
        deletes,
        [
            ("l/a".to_owned(), 8),
            ("l/b".to_owned(), 9),
            ("l/c".to_owned(), 10)
        ]
    );
    assert_eq!(store.revision().await.unwrap(), 10);
}

/// The embedded store's bookkeeping for a revocation (the conformance suite only asks for the
/// deletes to come after it began): one revision per deleted key, in key order.
#[tokio::test]
async fn revoke_deletes_each_key_at_a_revision_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir).await;
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    for key in ["l/b", "l/a", "l/c"] {
        store.put(key, b"v".to_vec(), Some(lease)).await.unwrap();
    }
    store.put("l/plain", b"p".to_vec(), None).await.unwrap();
    assert_eq!(store.revision().await.unwrap(), 4);
    let mut stream = store.watch("l/", 0).await.unwrap();
    store.lease_revoke(lease).await.unwrap();
    let mut deletes = Vec::new();
    for _ in 0..3 {
        deletes.push(delete_of(next_event(&mut stream).await));
    }
    assert_eq!(
        deletes,
        [
            ("l/a".to_owned(), 5),
            ("l/b".to_owned(), 6),
            ("l/c".to_owned(), 7)
        ]
    );
    assert_eq!(store.revision().await.unwrap(), 7);
    assert_no_event(&mut stream);
}

#[tokio::test]
async fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (lease, kept, plain, revision) = {
        let store = open_in(&dir).await;
        let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
        store.put("a/plain", b"p1".to_vec(), None).await.unwrap();
        store.put("a/plain", b"p2".to_vec(), None).await.unwrap();
        store
            .put("a/leased", b"l".to_vec(), Some(lease))
            .await
            .unwrap();
        store.put("a/gone", b"g".to_vec(), None).await.unwrap();
        store.delete("a/gone").await.unwrap();
        let kept = store.get("a/leased").await.unwrap().unwrap();
        let plain = store.get("a/plain").await.unwrap().unwrap();
        let revision = store.revision().await.unwrap();
        (lease, kept, plain, revision)
    };
    assert_eq!(revision, 5);

    let store = open_in(&dir).await;
    assert_eq!(store.revision().await.unwrap(), revision);
    assert_eq!(
        store.get("a/plain").await.unwrap(),
        Some(KeyValue {
            key: "a/plain".to_owned(),
            value: b"p2".to_vec(),
            create_revision: 1,
            mod_revision: 2,
            version: 2,
            lease: None,
        })
    );
    assert_eq!(store.get("a/leased").await.unwrap(), Some(kept.clone()));
    assert_eq!(store.get("a/gone").await.unwrap(), None);
    let listing = store.list("a/").await.unwrap();
    assert_eq!(listing.kvs, [kept, plain]);
    assert_eq!(listing.revision, revision);

    // History is gone: only a watch from the next revision can be served.
    assert!(matches!(
        store.watch("a/", revision).await,
        Err(StoreError::Compacted { requested, oldest })
            if requested == revision && oldest == revision + 1
    ));
    let mut stream = store.watch("a/", revision + 1).await.unwrap();

    // The lease survived, is still attached to its key, and ids are not reused.
    store.lease_keep_alive(lease).await.unwrap();
    let newer = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    assert!(
        newer > lease,
        "lease ids must not be reused after a restart"
    );
    store.lease_revoke(lease).await.unwrap();
    assert_eq!(
        delete_of(next_event(&mut stream).await),
        ("a/leased".to_owned(), revision + 1)
    );
    assert_eq!(store.revision().await.unwrap(), revision + 1);
    assert_no_event(&mut stream);
}

#[tokio::test(start_paused = true)]
async fn reopened_leases_get_a_fresh_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let lease = {
        let store = open_in(&dir).await;
        let lease = store.lease_grant(Duration::from_secs(10)).await.unwrap();
        store.put("k", b"v".to_vec(), Some(lease)).await.unwrap();
        // 8 of 10 seconds used up before the "crash".
        tokio::time::advance(Duration::from_secs(8)).await;
        lease
    };
    let store = open_in(&dir).await;
    let mut stream = store.watch("", 0).await.unwrap();
    // 13 s after the grant but only 5 s after the restart: alive.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(store.get("k").await.unwrap().is_some());
    assert_no_event(&mut stream);
    // 11 s after the restart: expired by the sweeper of the reopened store.
    tokio::time::advance(Duration::from_secs(6)).await;
    assert_eq!(
        delete_of(next_event(&mut stream).await),
        ("k".to_owned(), 2)
    );
    assert!(matches!(
        store.lease_keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

#[tokio::test]
async fn watch_before_retained_history_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        history_capacity: 3,
        ..EmbeddedOptions::default()
    };
    let store = open_with_options(&dir, options).await;
    for i in 1..=5u64 {
        assert_eq!(store.put("k", vec![i as u8], None).await.unwrap(), i);
    }
    for from in [1, 2] {
        assert!(matches!(
            store.watch("k", from).await,
            Err(StoreError::Compacted { requested, oldest: 3 }) if requested == from
        ));
    }
    let mut stream = store.watch("k", 3).await.unwrap();
    for revision in 3..=5 {
        assert_eq!(next_event(&mut stream).await.revision(), revision);
    }
    assert_no_event(&mut stream);
    // A watch from the future waits for it.
    let mut future = store.watch("k", 7).await.unwrap();
    store.put("k", b"6".to_vec(), None).await.unwrap();
    store.put("k", b"7".to_vec(), None).await.unwrap();
    assert_eq!(next_event(&mut future).await.revision(), 7);
    assert_no_event(&mut future);
}

#[tokio::test]
async fn slow_watcher_is_closed_without_blocking_writers() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        watch_buffer: 4,
        ..EmbeddedOptions::default()
    };
    let store = open_with_options(&dir, options).await;
    let mut slow = store.watch("k", 0).await.unwrap();
    let mut fast = store.watch("k", 0).await.unwrap();
    for i in 1..=10u64 {
        assert_eq!(store.put("k", vec![i as u8], None).await.unwrap(), i);
        // The fast watcher keeps up and is never dropped.
        assert_eq!(next_event(&mut fast).await.revision(), i);
    }
    // The slow one gets what fit, in order, then the end of its stream.
    for revision in 1..=4 {
        assert_eq!(slow.recv().await.unwrap().revision(), revision);
    }
    assert_eq!(slow.recv().await, None);
    assert_eq!(store.watcher_count(), 1);
}

#[tokio::test]
async fn dropped_watchers_are_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir).await;
    let a = store.watch("a/", 0).await.unwrap();
    let _b = store.watch("b/", 0).await.unwrap();
    assert_eq!(store.watcher_count(), 2);
    drop(a);
    // Noticed on the next event, even one under another prefix...
    store.put("b/1", b"v".to_vec(), None).await.unwrap();
    assert_eq!(store.watcher_count(), 1);
    // ...or at the next registration.
    let c = store.watch("c/", 0).await.unwrap();
    drop(c);
    let _d = store.watch("d/", 0).await.unwrap();
    assert_eq!(store.watcher_count(), 2);
}

#[tokio::test]
async fn expiry_is_enforced_on_access_with_an_injected_clock() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock {
        base: Instant::now(),
        offset: Mutex::new(Duration::ZERO),
    });
    let store = EmbeddedStore::open(dir.path().join("store.redb"), clock.clone())
        .await
        .unwrap();
    let lease = store.lease_grant(Duration::from_secs(10)).await.unwrap();
    let other = store.lease_grant(Duration::from_secs(10)).await.unwrap();
    store.put("k", b"v".to_vec(), Some(lease)).await.unwrap();
    store.put("o", b"v".to_vec(), Some(other)).await.unwrap();

    // Tokio time has not moved, so the sweeper is still asleep: only the operations see it.
    clock.advance(Duration::from_secs(9));
    store.lease_keep_alive(other).await.unwrap();
    clock.advance(Duration::from_secs(2));
    assert_eq!(store.get("k").await.unwrap(), None);
    assert_eq!(
        store.revision().await.unwrap(),
        3,
        "one delete for the expired key"
    );
    assert!(
        store.get("o").await.unwrap().is_some(),
        "renewed lease survives"
    );
    assert!(matches!(
        store.lease_keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(matches!(
        store.put("k", b"v".to_vec(), Some(lease)).await,
        Err(StoreError::LeaseNotFound(_))
    ));

    // Renewal at the deadline is too late, and deletes the keys before reporting it.
    clock.advance(Duration::from_secs(10));
    assert!(matches!(
        store.lease_keep_alive(other).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert_eq!(store.list("").await.unwrap().kvs, []);
}

#[tokio::test]
async fn dropping_the_store_closes_streams_and_releases_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir).await;
    store.lease_grant(Duration::from_secs(60)).await.unwrap();
    let mut stream = store.watch("", 0).await.unwrap();
    // The file is locked while open.
    assert!(matches!(
        EmbeddedStore::open_default(store.path()).await,
        Err(StoreError::Open { .. })
    ));
    drop(store);
    assert_eq!(stream.recv().await, None);
    // Reopening right away works: the sweeper did not keep the database alive.
    let store = open_in(&dir).await;
    store.put("k", b"v".to_vec(), None).await.unwrap();
}

#[tokio::test]
async fn open_reports_the_path_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("store.redb");
    match EmbeddedStore::open_default(&path).await {
        Err(StoreError::Open { path: reported, .. }) => {
            assert_eq!(reported, path.display().to_string());
        }
        other => panic!("expected an open error, got {other:?}"),
    }
}

fn put_of(event: WatchEvent) -> (String, u64) {
    match event {
        WatchEvent::Put(kv) => (kv.key, kv.mod_revision),
        other => panic!("expected a put event, got {other:?}"),
    }
}

#[tokio::test]
async fn txn_revision_is_exact_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open_in(&dir).await;
        assert_eq!(store.put("a", b"a1".to_vec(), None).await.unwrap(), 1);
        assert_eq!(store.put("c", b"c1".to_vec(), None).await.unwrap(), 2);
        let outcome = store
            .txn(
                vec![Compare::mod_revision("a", 1), Compare::absent("b")],
                vec![
                    TxnOp::put("b", b"b1".to_vec(), None),
                    TxnOp::put("a", b"a2".to_vec(), None),
                    TxnOp::delete("c"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(outcome, TxnOutcome::Committed(3));
        // Failed and empty transactions leave it there.
        assert!(matches!(
            store
                .txn(
                    vec![Compare::absent("a")],
                    vec![TxnOp::put("x", b"x".to_vec(), None)]
                )
                .await
                .unwrap(),
            TxnOutcome::Failed { compare: 0, .. }
        ));
        assert_eq!(
            store.txn(Vec::new(), Vec::new()).await.unwrap(),
            TxnOutcome::Committed(3)
        );
        assert_eq!(store.revision().await.unwrap(), 3);
    }

    let store = open_in(&dir).await;
    assert_eq!(store.revision().await.unwrap(), 3);
    let kv = |key: &str, value: &[u8], create_revision, version| KeyValue {
        key: key.to_owned(),
        value: value.to_vec(),
        create_revision,
        mod_revision: 3,
        version,
        lease: None,
    };
    assert_eq!(
        store.list("").await.unwrap().kvs,
        [kv("a", b"a2", 1, 2), kv("b", b"b1", 3, 1)]
    );
    assert_eq!(
        store
            .txn(
                vec![Compare::create_revision("b", 3)],
                vec![TxnOp::put("b", b"b2".to_vec(), None)]
            )
            .await
            .unwrap(),
        TxnOutcome::Committed(4)
    );
    assert_eq!(store.put("a", b"a3".to_vec(), None).await.unwrap(), 5);
}

#[tokio::test]
async fn watch_replay_from_a_txn_revision_gets_all_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        history_capacity: 4,
        ..EmbeddedOptions::default()
    };
    let store = open_with_options(&dir, options).await;
    let mut live = store.watch("", 0).await.unwrap();
    let txn = |keys: &[&str]| {
        let ops = keys
            .iter()
            .map(|key| TxnOp::put(*key, b"v".to_vec(), None))
            .collect();
        store.txn(Vec::new(), ops)
    };
    let events = async |stream: &mut crate::WatchStream, n: usize| {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(put_of(next_event(stream).await));
        }
        assert_no_event(stream);
        out
    };
    let at = |revision: u64, keys: &[&str]| -> Vec<(String, u64)> {
        keys.iter()
            .map(|key| ((*key).to_owned(), revision))
            .collect()
    };

    assert_eq!(store.put("x", b"1".to_vec(), None).await.unwrap(), 1);
    assert_eq!(
        txn(&["t/1", "t/2", "t/3"]).await.unwrap(),
        TxnOutcome::Committed(2)
    );
    let mut from_2 = store.watch("", 2).await.unwrap();
    assert_eq!(events(&mut from_2, 3).await, at(2, &["t/1", "t/2", "t/3"]));
    // Only the watch's prefix, still whole.
    let mut narrow = store.watch("t/2", 2).await.unwrap();
    assert_eq!(events(&mut narrow, 1).await, at(2, &["t/2"]));

    // Revision 1 drops out of the ring of four: revision 2 is still whole.
    assert_eq!(store.put("x", b"3".to_vec(), None).await.unwrap(), 3);
    let mut from_2 = store.watch("", 2).await.unwrap();
    let mut expected = at(2, &["t/1", "t/2", "t/3"]);
    expected.extend(at(3, &["x"]));
    assert_eq!(events(&mut from_2, 4).await, expected);

    // Revision 4 pushes out one event of revision 2, so all of revision 2 goes: a watch from
    // it is compacted rather than served half.
    assert_eq!(store.put("x", b"4".to_vec(), None).await.unwrap(), 4);
    assert!(matches!(
        store.watch("", 2).await,
        Err(StoreError::Compacted {
            requested: 2,
            oldest: 3
        })
    ));
    let mut from_3 = store.watch("", 3).await.unwrap();
    assert_eq!(
        events(&mut from_3, 2).await,
        [at(3, &["x"]), at(4, &["x"])].concat()
    );

    // A transaction larger than the ring cannot be replayed at all, but is delivered live.
    let five = ["u/1", "u/2", "u/3", "u/4", "u/5"];
    assert_eq!(txn(&five).await.unwrap(), TxnOutcome::Committed(5));
    assert!(matches!(
        store.watch("", 5).await,
        Err(StoreError::Compacted {
            requested: 5,
            oldest: 6
        })
    ));
    let mut expected = at(1, &["x"]);
    expected.extend(at(2, &["t/1", "t/2", "t/3"]));
    expected.extend(at(3, &["x"]));
    expected.extend(at(4, &["x"]));
    expected.extend(at(5, &five));
    assert_eq!(events(&mut live, expected.len()).await, expected);
    let mut from_6 = store.watch("", 6).await.unwrap();
    assert_eq!(store.put("x", b"6".to_vec(), None).await.unwrap(), 6);
    assert_eq!(events(&mut from_6, 1).await, at(6, &["x"]));
}

#[tokio::test]
async fn a_watcher_gets_a_whole_txn_or_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        watch_buffer: 2,
        ..EmbeddedOptions::default()
    };
    let store = open_with_options(&dir, options).await;
    let mut behind = store.watch("", 0).await.unwrap();
    assert_eq!(store.put("k", b"1".to_vec(), None).await.unwrap(), 1);
    let mut keeping_up = store.watch("", 0).await.unwrap();
    // `behind` has room for one more event, the transaction brings two.
    let outcome = store
        .txn(
            Vec::new(),
            vec![
                TxnOp::put("a", b"a".to_vec(), None),
                TxnOp::put("b", b"b".to_vec(), None),
            ],
        )
        .await
        .unwrap();
    assert_eq!(outcome, TxnOutcome::Committed(2));
    assert_eq!(
        put_of(next_event(&mut keeping_up).await),
        ("a".to_owned(), 2)
    );
    assert_eq!(
        put_of(next_event(&mut keeping_up).await),
        ("b".to_owned(), 2)
    );
    assert_eq!(put_of(behind.recv().await.unwrap()), ("k".to_owned(), 1));
    assert_eq!(behind.recv().await, None, "closed before the transaction");
    assert_eq!(store.watcher_count(), 1);
}

#[tokio::test]
async fn txn_compares_and_leases_see_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock {
        base: Instant::now(),
        offset: Mutex::new(Duration::ZERO),
    });
    let store = EmbeddedStore::open(dir.path().join("store.redb"), clock.clone())
        .await
        .unwrap();
    let lease = store.lease_grant(Duration::from_secs(10)).await.unwrap();
    store
        .put("leader", b"me".to_vec(), Some(lease))
        .await
        .unwrap();
    let mut stream = store.watch("", 0).await.unwrap();

    // The sweeper has not run (tokio time stands still); the transaction expires the lease
    // first, at its own revision, and then sees the key gone.
    clock.advance(Duration::from_secs(11));
    let outcome = store
        .txn(
            vec![Compare::absent("leader")],
            vec![TxnOp::put("leader", b"you".to_vec(), None)],
        )
        .await
        .unwrap();
    assert_eq!(outcome, TxnOutcome::Committed(3));
    assert_eq!(
        delete_of(next_event(&mut stream).await),
        ("leader".to_owned(), 2)
    );
    assert_eq!(
        put_of(next_event(&mut stream).await),
        ("leader".to_owned(), 3)
    );
    assert!(matches!(
        store
            .txn(Vec::new(), vec![TxnOp::put("k", b"v".to_vec(), Some(lease))])
            .await,
        Err(StoreError::LeaseNotFound(id)) if id == lease
    ));
    assert_eq!(store.revision().await.unwrap(), 3);
    assert_no_event(&mut stream);
}

#[test]
fn records_round_trip_and_corruption_is_detected() {
    let kv = KeyValue {
        key: "k".to_owned(),
        value: b"value".to_vec(),
        create_revision: 3,
        mod_revision: u64::MAX,
        version: 7,
        lease: Some(42),
    };
    assert_eq!(decode("k", &encode(&kv)).unwrap(), kv);
    let no_lease = KeyValue {
        lease: None,
        value: Vec::new(),
        ..kv.clone()
    };
    assert_eq!(decode("k", &encode(&no_lease)).unwrap(), no_lease);

    let bytes = encode(&kv);
    assert!(matches!(
        decode("k", &bytes[..10]),
        Err(StoreError::Backend(_))
    ));
    let mut wrong_format = bytes;
    wrong_format[0] = 99;
    let error = decode("k", &wrong_format).unwrap_err();
    assert!(error.to_string().contains("corrupt record"), "{error}");
}

/// Holds the writer lock on a thread of its own until the returned sender is dropped or sent
/// to, so writes issued meanwhile queue up for one batch.
async fn hold_writer(store: &Arc<EmbeddedStore>) -> std::sync::mpsc::Sender<()> {
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (locked, is_locked) = tokio::sync::oneshot::channel();
    let held = store.clone();
    std::thread::spawn(move || {
        let _writer = held.hold_writer();
        let _ = locked.send(());
        let _ = released.recv();
    });
    is_locked.await.unwrap();
    release
}

/// Waits until `n` writes are queued (each write queues itself before it waits for the lock).
async fn queued(store: &EmbeddedStore, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.queued() < n {
        assert!(Instant::now() < deadline, "{n} writes never queued");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Runs the write `write` makes on a task of its own and waits until it is queued behind the
/// held writer (after the writes already in `jobs`).
async fn enqueue<F, W>(
    store: &Arc<EmbeddedStore>,
    jobs: &mut Vec<tokio::task::JoinHandle<crate::StoreResult<()>>>,
    write: F,
) where
    F: FnOnce(Arc<EmbeddedStore>) -> W,
    W: std::future::Future<Output = crate::StoreResult<()>> + Send + 'static,
{
    jobs.push(tokio::spawn(write(store.clone())));
    queued(store, jobs.len()).await;
}

#[tokio::test]
async fn writes_queued_together_commit_in_one_transaction_with_revisions_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir).await;
    let mut stream = store.watch("g/", 0).await.unwrap();
    let before = store.commits();
    let release = hold_writer(&store).await;
    let mut writes = Vec::new();
    for n in 0..50 {
        let s = store.clone();
        writes.push(tokio::spawn(async move {
            s.put(&format!("g/{n:02}"), n.to_string().into_bytes(), None)
                .await
        }));
        // One at a time, so queue order (and so revision order) is known.
        queued(&store, n + 1).await;
    }
    drop(release);
    let mut revisions = Vec::new();
    for write in writes {
        revisions.push(write.await.unwrap().unwrap());
    }
    assert_eq!(
        revisions,
        (1..=50).collect::<Vec<_>>(),
        "queue order, one each"
    );
    assert_eq!(store.commits() - before, 1, "50 writes, one transaction");
    for n in 0..50u64 {
        let (key, revision) = put_of(next_event(&mut stream).await);
        assert_eq!((key, revision), (format!("g/{n:02}"), n + 1));
    }
    assert_no_event(&mut stream);
    // Durable as one: all of it is there after a reopen.
    drop(stream);
    drop(store);
    let store = open_in(&dir).await;
    assert_eq!(store.revision().await.unwrap(), 50);
    assert_eq!(store.list("g/").await.unwrap().kvs.len(), 50);
}

#[tokio::test]
async fn a_write_that_fails_its_check_fails_alone_in_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir).await;
    store.put("c/k", b"0".to_vec(), None).await.unwrap();
    let before = store.commits();
    let release = hold_writer(&store).await;
    let s = store.clone();
    let first = tokio::spawn(async move { s.put("c/a", b"a".to_vec(), None).await });
    queued(&store, 1).await;
    let s = store.clone();
    let unknown_lease = tokio::spawn(async move { s.put("c/x", b"x".to_vec(), Some(999)).await });
    queued(&store, 2).await;
    let s = store.clone();
    let conflict = tokio::spawn(async move {
        s.compare_and_swap("c/k", Expect::ModRevision(99), b"1".to_vec(), None)
            .await
    });
    queued(&store, 3).await;
    let s = store.clone();
    let last = tokio::spawn(async move { s.put("c/b", b"b".to_vec(), None).await });
    queued(&store, 4).await;
    drop(release);
    assert_eq!(first.await.unwrap().unwrap(), 2);
    assert!(matches!(
        unknown_lease.await.unwrap(),
        Err(StoreError::LeaseNotFound(999))
    ));
    assert!(matches!(
        conflict.await.unwrap().unwrap(),
        CasOutcome::Conflict(Some(KeyValue {
            mod_revision: 1,
            ..
        }))
    ));
    assert_eq!(last.await.unwrap().unwrap(), 3);
    assert_eq!(store.commits() - before, 1);
    assert!(store.get("c/x").await.unwrap().is_none());
    assert_eq!(store.get("c/k").await.unwrap().unwrap().value, b"0");
}

/// A compare reads a key's header once for its put; in a batch of writes sharing one
/// transaction, a header read by one write's compare must not stand in for the key after
/// another write changed it (deleted, re-created, put again).
#[tokio::test]
async fn a_header_read_by_a_compare_is_not_reused_after_the_key_changes_in_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir).await;
    store.put("h/k", b"0".to_vec(), None).await.unwrap();
    let release = hold_writer(&store).await;
    let mut jobs = Vec::new();
    // 2: a compare on h/k that holds, with a write elsewhere.
    enqueue(&store, &mut jobs, |s| async move {
        s.txn(
            vec![Compare::mod_revision("h/k", 1)],
            vec![TxnOp::put("h/other", b"o".to_vec(), None)],
        )
        .await
        .map(|_| ())
    })
    .await;
    // 3: h/k deleted; 4: created again.
    enqueue(&store, &mut jobs, |s| async move {
        s.delete("h/k").await.map(|_| ())
    })
    .await;
    enqueue(&store, &mut jobs, |s| async move {
        s.put("h/k", b"new".to_vec(), None).await.map(|_| ())
    })
    .await;
    // 5: a compare-and-swap on the new key; 6: a plain put after it.
    enqueue(&store, &mut jobs, |s| async move {
        match s
            .compare_and_swap("h/k", Expect::ModRevision(4), b"cas".to_vec(), None)
            .await?
        {
            CasOutcome::Written(5) => Ok(()),
            other => panic!("the swap saw the re-created key at revision 4: {other:?}"),
        }
    })
    .await;
    enqueue(&store, &mut jobs, |s| async move {
        s.put("h/k", b"last".to_vec(), None).await.map(|_| ())
    })
    .await;
    let before = store.commits();
    drop(release);
    for job in jobs {
        job.await.unwrap().unwrap();
    }
    assert_eq!(
        store.commits() - before,
        1,
        "the five writes shared a transaction"
    );
    let kv = store.get("h/k").await.unwrap().unwrap();
    assert_eq!(kv.value, b"last");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version),
        (4, 6, 3),
        "created again at 4, then swapped and put"
    );
}

/// A put with a lease queued behind that lease's revoke in the same batch: the revoke is not
/// yet applied to memory when the put runs, so a check against memory alone would let the put
/// attach a key to a lease that no longer exists, and the key would never expire.
#[tokio::test]
async fn a_put_behind_its_leases_revoke_in_one_batch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir).await;
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    let release = hold_writer(&store).await;
    let s = store.clone();
    let revoke = tokio::spawn(async move { s.lease_revoke(lease).await });
    queued(&store, 1).await;
    let s = store.clone();
    let put = tokio::spawn(async move { s.put("o/k", b"v".to_vec(), Some(lease)).await });
    queued(&store, 2).await;
    let s = store.clone();
    let txn_put = tokio::spawn(async move {
        s.txn(
            Vec::new(),
            vec![TxnOp::Put {
                key: "o/t".into(),
                value: b"t".to_vec(),
                lease: Some(lease),
            }],
        )
        .await
    });
    queued(&store, 3).await;
    drop(release);
    revoke.await.unwrap().unwrap();
    assert!(matches!(
        put.await.unwrap(),
        Err(StoreError::LeaseNotFound(l)) if l == lease
    ));
    assert!(matches!(
        txn_put.await.unwrap(),
        Err(StoreError::LeaseNotFound(l)) if l == lease
    ));
    assert!(store.list("o/").await.unwrap().kvs.is_empty());
}

/// A revoke queued behind a put attaching a key to the lease, in the same batch: the revoke
/// must delete that key too, though memory learns of the attachment only after the commit.
#[tokio::test]
async fn a_revoke_behind_a_put_on_its_lease_in_one_batch_deletes_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_in(&dir).await;
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    store
        .put("o/old", b"v".to_vec(), Some(lease))
        .await
        .unwrap();
    let mut stream = store.watch("o/", 0).await.unwrap();
    let release = hold_writer(&store).await;
    let s = store.clone();
    let put = tokio::spawn(async move { s.put("o/new", b"v".to_vec(), Some(lease)).await });
    queued(&store, 1).await;
    let s = store.clone();
    // Moves o/old off the lease before the revoke: the revoke must leave it alone.
    let detach = tokio::spawn(async move { s.put("o/old", b"kept".to_vec(), None).await });
    queued(&store, 2).await;
    let s = store.clone();
    let revoke = tokio::spawn(async move { s.lease_revoke(lease).await });
    queued(&store, 3).await;
    drop(release);
    put.await.unwrap().unwrap();
    detach.await.unwrap().unwrap();
    revoke.await.unwrap().unwrap();
    let left = store.list("o/").await.unwrap().kvs;
    assert_eq!(left.len(), 1, "only the detached key stays: {left:?}");
    assert_eq!(left[0].key, "o/old");
    assert_eq!(left[0].value, b"kept");
    assert_eq!(put_of(next_event(&mut stream).await).0, "o/new");
    assert_eq!(put_of(next_event(&mut stream).await).0, "o/old");
    assert_eq!(delete_of(next_event(&mut stream).await).0, "o/new");
    assert_no_event(&mut stream);
    // The lease is gone for good.
    assert!(matches!(
        store.put("o/again", b"v".to_vec(), Some(lease)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

/// The combiner lets go of the store before it tells the last writers their outcome: a store
/// dropped right after a write returned can be opened again at once (the file is released).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_dropped_after_its_last_write_returns_releases_the_file() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..200u64 {
        let store = EmbeddedStore::open_default(dir.path().join("store.redb"))
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        store
            .put("k", round.to_string().into_bytes(), None)
            .await
            .unwrap();
        drop(store);
    }
}
