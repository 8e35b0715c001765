//! The conformance suite every [`Store`] implementation must pass.
//!
//! Each check is a public async function taking a fresh store, so another implementation
//! (etcd) runs exactly the same assertions.
//! [`store_conformance_tests!`](crate::store_conformance_tests) expands to one
//! `#[tokio::test]` per check:
//!
//! ```text
//! async fn fresh() -> (Arc<dyn Store>, tempfile::TempDir) { /* a new, empty store */ }
//! hangar_scheduler::store_conformance_tests!(fresh);
//! ```
//!
//! The factory returns the store and a guard kept alive for the whole test (a temp dir, a
//! namespace…). The checks compare revisions relatively (`>`), never as absolute numbers, so
//! a backend shared with other writers passes too; exact `+1` bookkeeping and anything that
//! needs control over the backend (compaction, restarts) is tested per implementation.
//!
//! [`lease_expiry`] needs a way to move time: the macro runs it on a paused tokio clock and
//! passes `tokio::time::advance`; with `real_time` (for a backend whose client must not see
//! time jump) it passes `tokio::time::sleep` instead.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::{
    CasOutcome, Compare, Expect, KeyValue, MAX_TXN_OPS, Revision, Store, StoreError, TxnOp,
    TxnOutcome, WatchEvent, WatchStream,
};

/// How long a check waits for an expected watch event before failing. A bound on a hang, not
/// a sleep: events normally arrive immediately.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The next event of `stream`, failing the test if the stream ends or stays silent.
pub async fn next_event(stream: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(EVENT_TIMEOUT, stream.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("watch stream closed while an event was expected"),
        Err(_) => panic!("no watch event within {EVENT_TIMEOUT:?}"),
    }
}

/// Asserts `stream` has nothing queued right now. The embedded store queues events before the
/// write that caused them returns, so there "nothing queued" after the writes means "nothing
/// sent"; etcd delivers them asynchronously, so there it only means "nothing arrived yet" (the
/// checks still see every expected event, in order, through [`next_event`]).
pub fn assert_no_event(stream: &mut WatchStream) {
    if let Ok(event) = stream.try_recv() {
        panic!("unexpected watch event {event:?}");
    }
}

fn expect_put(event: WatchEvent) -> KeyValue {
    match event {
        WatchEvent::Put(kv) => kv,
        other => panic!("expected a put event, got {other:?}"),
    }
}

fn expect_delete(event: WatchEvent) -> (String, Revision, Option<KeyValue>) {
    match event {
        WatchEvent::Delete {
            key,
            revision,
            prev,
        } => (key, revision, prev),
        other => panic!("expected a delete event, got {other:?}"),
    }
}

/// Put, get and the metadata a put maintains.
pub async fn put_get_metadata(store: Arc<dyn Store>) {
    let key = "conf/put_get/a";
    assert_eq!(store.get(key).await.unwrap(), None);
    let before = store.revision().await.unwrap();

    let r1 = store.put(key, b"one".to_vec(), None).await.unwrap();
    assert!(r1 > before, "a put must bump the revision");
    assert!(store.revision().await.unwrap() >= r1);
    let kv = store.get(key).await.unwrap().expect("key just written");
    assert_eq!(
        kv,
        KeyValue {
            key: key.to_owned(),
            value: b"one".to_vec(),
            create_revision: r1,
            mod_revision: r1,
            version: 1,
            lease: None,
        }
    );

    let r2 = store.put(key, b"two".to_vec(), None).await.unwrap();
    assert!(r2 > r1);
    let kv = store.get(key).await.unwrap().expect("key just written");
    assert_eq!(kv.value, b"two");
    assert_eq!(
        kv.create_revision, r1,
        "an overwrite keeps the creation revision"
    );
    assert_eq!(kv.mod_revision, r2);
    assert_eq!(kv.version, 2);

    // Empty values are values, not deletions.
    let r3 = store.put(key, Vec::new(), None).await.unwrap();
    let kv = store
        .get(key)
        .await
        .unwrap()
        .expect("empty value is still a key");
    assert_eq!((kv.value.len(), kv.mod_revision, kv.version), (0, r3, 3));

    // Other keys are untouched.
    assert_eq!(store.get("conf/put_get/b").await.unwrap(), None);
}

/// Attaching a lease that does not exist fails and writes nothing.
pub async fn put_with_unknown_lease_fails(store: Arc<dyn Store>) {
    let key = "conf/bad_lease/a";
    let before = store.revision().await.unwrap();
    let bogus = 0xdead_beef;
    match store.put(key, b"v".to_vec(), Some(bogus)).await {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, bogus),
        other => panic!("expected LeaseNotFound, got {other:?}"),
    }
    match store
        .compare_and_swap(key, Expect::Absent, b"v".to_vec(), Some(bogus))
        .await
    {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, bogus),
        other => panic!("expected LeaseNotFound, got {other:?}"),
    }
    assert_eq!(store.get(key).await.unwrap(), None);
    assert_eq!(store.revision().await.unwrap(), before);
}

/// `Expect::Absent`: writes only a missing key; a conflict reports the current value.
pub async fn cas_absent(store: Arc<dyn Store>) {
    let key = "conf/cas_absent/a";
    let first = store
        .compare_and_swap(key, Expect::Absent, b"first".to_vec(), None)
        .await
        .unwrap();
    let CasOutcome::Written(r1) = first else {
        panic!("CAS(Absent) on a missing key must write, got {first:?}");
    };
    let current = store.get(key).await.unwrap().expect("written");
    assert_eq!((current.mod_revision, current.version), (r1, 1));

    let second = store
        .compare_and_swap(key, Expect::Absent, b"second".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(second, CasOutcome::Conflict(Some(current.clone())));
    assert_eq!(store.get(key).await.unwrap(), Some(current));
    assert_eq!(
        store.revision().await.unwrap(),
        r1,
        "a conflict writes nothing"
    );
}

/// `Expect::ModRevision`: writes only over exactly that revision.
pub async fn cas_mod_revision(store: Arc<dyn Store>) {
    let key = "conf/cas_rev/a";
    // On a missing key the condition cannot hold.
    let missing = store
        .compare_and_swap(key, Expect::ModRevision(1), b"x".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(missing, CasOutcome::Conflict(None));
    assert_eq!(store.get(key).await.unwrap(), None);

    let r1 = store.put(key, b"v1".to_vec(), None).await.unwrap();
    let CasOutcome::Written(r2) = store
        .compare_and_swap(key, Expect::ModRevision(r1), b"v2".to_vec(), None)
        .await
        .unwrap()
    else {
        panic!("CAS on the current mod revision must write");
    };
    assert!(r2 > r1);
    let current = store.get(key).await.unwrap().expect("written");
    assert_eq!(current.value, b"v2");
    assert_eq!(
        (
            current.create_revision,
            current.mod_revision,
            current.version
        ),
        (r1, r2, 2)
    );

    // The stale revision no longer matches.
    let stale = store
        .compare_and_swap(key, Expect::ModRevision(r1), b"v3".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(stale, CasOutcome::Conflict(Some(current.clone())));
    assert_eq!(store.get(key).await.unwrap(), Some(current));
}

/// Unconditional and conditional deletes.
pub async fn delete_and_delete_if_revision(store: Arc<dyn Store>) {
    let key = "conf/delete/a";
    assert!(!store.delete(key).await.unwrap(), "nothing to delete");

    let r1 = store.put(key, b"v".to_vec(), None).await.unwrap();
    assert!(store.delete(key).await.unwrap());
    assert_eq!(store.get(key).await.unwrap(), None);
    assert!(
        store.revision().await.unwrap() > r1,
        "a delete bumps the revision"
    );
    let after_delete = store.revision().await.unwrap();
    assert!(!store.delete(key).await.unwrap());
    assert_eq!(
        store.revision().await.unwrap(),
        after_delete,
        "deleting a missing key writes nothing"
    );

    // Re-creating starts a new life: new creation revision, version 1.
    let r2 = store.put(key, b"again".to_vec(), None).await.unwrap();
    let kv = store.get(key).await.unwrap().expect("re-created");
    assert_eq!((kv.create_revision, kv.version), (r2, 1));

    let r3 = store.put(key, b"newer".to_vec(), None).await.unwrap();
    assert!(!store.delete_if_revision(key, r2).await.unwrap(), "stale");
    assert!(store.get(key).await.unwrap().is_some());
    assert!(store.delete_if_revision(key, r3).await.unwrap());
    assert_eq!(store.get(key).await.unwrap(), None);
    assert!(!store.delete_if_revision(key, r3).await.unwrap(), "gone");
}

/// Listing returns exactly the prefix's keys, in key order, with the current revision.
pub async fn list_prefix(store: Arc<dyn Store>) {
    let empty = store.list("conf/list/").await.unwrap();
    assert!(empty.kvs.is_empty());
    assert_eq!(empty.revision, store.revision().await.unwrap());

    // Inserted out of order, with neighbours that share a textual prefix but not the `/`.
    for key in [
        "conf/list/c",
        "conf/list/a",
        "conf/list/b/nested",
        "conf/list/b",
        "conf/lisu",
        "conf/list",
        "conf/listing/x",
    ] {
        store.put(key, key.as_bytes().to_vec(), None).await.unwrap();
    }
    let last = store
        .put("conf/list/a", b"a2".to_vec(), None)
        .await
        .unwrap();

    let listing = store.list("conf/list/").await.unwrap();
    let keys: Vec<&str> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "conf/list/a",
            "conf/list/b",
            "conf/list/b/nested",
            "conf/list/c"
        ]
    );
    assert_eq!(listing.revision, last);
    assert_eq!(listing.revision, store.revision().await.unwrap());
    // Listed values carry full metadata.
    let a = &listing.kvs[0];
    assert_eq!(
        (a.value.as_slice(), a.mod_revision, a.version),
        (&b"a2"[..], last, 2)
    );
    assert_eq!(Some(a.clone()), store.get("conf/list/a").await.unwrap());

    // A prefix is a byte prefix, not a path component.
    let wider = store.list("conf/list").await.unwrap();
    let keys: Vec<&str> = wider.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "conf/list",
            "conf/list/a",
            "conf/list/b",
            "conf/list/b/nested",
            "conf/list/c",
            "conf/listing/x"
        ]
    );
}

/// Pages of a prefix, read at the first page's revision, add up to its listing; a page at a
/// revision the store has moved past reflects that revision or fails as compacted, never
/// silently mixes in later writes.
pub async fn list_pages(store: Arc<dyn Store>) {
    for key in [
        "conf/page/e",
        "conf/page/a",
        "conf/page/c",
        "conf/page/b",
        "conf/page/d",
        "conf/page",
        "conf/pagf",
        "conf/pag",
    ] {
        store.put(key, key.as_bytes().to_vec(), None).await.unwrap();
    }
    let listing = store.list("conf/page/").await.unwrap();
    let keys = |kvs: &[KeyValue]| -> Vec<String> { kvs.iter().map(|kv| kv.key.clone()).collect() };

    let first = store.list_page("conf/page/", None, 2, None).await.unwrap();
    assert_eq!(keys(&first.kvs), ["conf/page/a", "conf/page/b"]);
    assert!(first.more);
    assert_eq!(first.revision, listing.revision);
    let mut all = first.kvs.clone();
    let mut after = all.last().map(|kv| kv.key.clone());
    let mut pages = 1;
    loop {
        let page = store
            .list_page("conf/page/", after.as_deref(), 2, Some(first.revision))
            .await
            .unwrap();
        assert_eq!(page.revision, first.revision);
        pages += 1;
        all.extend(page.kvs.iter().cloned());
        after = page.kvs.last().map(|kv| kv.key.clone());
        if !page.more {
            break;
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(
        all, listing.kvs,
        "the pages add up to the listing, metadata included"
    );

    // A limit above the count: one page. A start before the prefix starts at the prefix.
    let whole = store
        .list_page("conf/page/", Some("conf/a"), 100, None)
        .await
        .unwrap();
    assert_eq!(whole.kvs, listing.kvs);
    assert!(!whole.more);
    let none = store
        .list_page("conf/page/", Some("conf/page/e"), 100, None)
        .await
        .unwrap();
    assert!(none.kvs.is_empty() && !none.more);

    // Past the first page's revision: the old revision or a refusal, never the new state.
    store.delete("conf/page/c").await.unwrap();
    store
        .put("conf/page/bb", b"later".to_vec(), None)
        .await
        .unwrap();
    match store
        .list_page("conf/page/", Some("conf/page/b"), 2, Some(first.revision))
        .await
    {
        Ok(page) => assert_eq!(keys(&page.kvs), ["conf/page/c", "conf/page/d"]),
        Err(StoreError::Compacted { requested, .. }) => assert_eq!(requested, first.revision),
        Err(other) => panic!("neither the old revision nor compacted: {other}"),
    }
}

/// A watch from `listing.revision + 1` sees every later change under the prefix, in order,
/// and nothing outside it.
pub async fn watch_from_listing(store: Arc<dyn Store>) {
    let prefix = "conf/watch/";
    store
        .put("conf/watch/old", b"old".to_vec(), None)
        .await
        .unwrap();
    let listing = store.list(prefix).await.unwrap();
    let mut stream = store.watch(prefix, listing.revision + 1).await.unwrap();
    assert_no_event(&mut stream);

    let r1 = store
        .put("conf/watch/a", b"1".to_vec(), None)
        .await
        .unwrap();
    store
        .put("conf/other/a", b"x".to_vec(), None)
        .await
        .unwrap();
    let r2 = store
        .put("conf/watch/a", b"2".to_vec(), None)
        .await
        .unwrap();
    let r3 = store
        .put("conf/watch/b", b"1".to_vec(), None)
        .await
        .unwrap();
    assert!(store.delete("conf/watch/a").await.unwrap());
    let r4 = store.revision().await.unwrap();
    let CasOutcome::Written(r5) = store
        .compare_and_swap("conf/watch/b", Expect::ModRevision(r3), b"2".to_vec(), None)
        .await
        .unwrap()
    else {
        panic!("CAS must write");
    };
    assert!(
        store
            .delete_if_revision("conf/watch/old", listing.kvs[0].mod_revision)
            .await
            .unwrap()
    );
    let r6 = store.revision().await.unwrap();

    let kv = expect_put(next_event(&mut stream).await);
    assert_eq!(
        (kv.key.as_str(), kv.value.as_slice(), kv.mod_revision),
        ("conf/watch/a", &b"1"[..], r1)
    );
    let kv = expect_put(next_event(&mut stream).await);
    assert_eq!(
        (kv.key.as_str(), kv.mod_revision, kv.version),
        ("conf/watch/a", r2, 2)
    );
    let kv = expect_put(next_event(&mut stream).await);
    assert_eq!((kv.key.as_str(), kv.mod_revision), ("conf/watch/b", r3));
    let (key, revision, prev) = expect_delete(next_event(&mut stream).await);
    assert_eq!((key.as_str(), revision), ("conf/watch/a", r4));
    let prev = prev.expect("a delete carries the previous value");
    assert_eq!((prev.value.as_slice(), prev.mod_revision), (&b"2"[..], r2));
    let kv = expect_put(next_event(&mut stream).await);
    assert_eq!(
        (kv.key.as_str(), kv.value.as_slice(), kv.mod_revision),
        ("conf/watch/b", &b"2"[..], r5)
    );
    let (key, revision, _) = expect_delete(next_event(&mut stream).await);
    assert_eq!((key.as_str(), revision), ("conf/watch/old", r6));
    assert_no_event(&mut stream);
}

/// A watch from a past revision replays what happened since, then continues live.
pub async fn watch_replays_history(store: Arc<dyn Store>) {
    let prefix = "conf/replay/";
    let r1 = store
        .put("conf/replay/a", b"1".to_vec(), None)
        .await
        .unwrap();
    let r2 = store
        .put("conf/replay/b", b"1".to_vec(), None)
        .await
        .unwrap();
    store
        .put("conf/elsewhere", b"1".to_vec(), None)
        .await
        .unwrap();
    assert!(store.delete("conf/replay/a").await.unwrap());
    let r3 = store.revision().await.unwrap();

    let mut stream = store.watch(prefix, r2).await.unwrap();
    let kv = expect_put(next_event(&mut stream).await);
    assert_eq!((kv.key.as_str(), kv.mod_revision), ("conf/replay/b", r2));
    let (key, revision, _) = expect_delete(next_event(&mut stream).await);
    assert_eq!((key.as_str(), revision), ("conf/replay/a", r3));
    assert_no_event(&mut stream);

    let r4 = store
        .put("conf/replay/c", b"1".to_vec(), None)
        .await
        .unwrap();
    let kv = expect_put(next_event(&mut stream).await);
    assert_eq!((kv.key.as_str(), kv.mod_revision), ("conf/replay/c", r4));

    // From the very first write: everything, in revision order.
    let mut all = store.watch(prefix, r1).await.unwrap();
    let mut revisions = Vec::new();
    for _ in 0..4 {
        revisions.push(next_event(&mut all).await.revision());
    }
    assert_eq!(revisions, [r1, r2, r3, r4]);
    assert_no_event(&mut all);
}

/// `from == 0` means "from now": no replay, only later changes.
pub async fn watch_from_zero_is_live(store: Arc<dyn Store>) {
    store
        .put("conf/live/a", b"old".to_vec(), None)
        .await
        .unwrap();
    let mut stream = store.watch("conf/live/", 0).await.unwrap();
    assert_no_event(&mut stream);
    let r = store
        .put("conf/live/b", b"new".to_vec(), None)
        .await
        .unwrap();
    let kv = expect_put(next_event(&mut stream).await);
    assert_eq!((kv.key.as_str(), kv.mod_revision), ("conf/live/b", r));
    assert_no_event(&mut stream);
}

/// Several watchers on overlapping prefixes each get their own complete view.
pub async fn watch_multiple_watchers(store: Arc<dyn Store>) {
    let mut narrow = store.watch("conf/multi/a/", 0).await.unwrap();
    let mut wide = store.watch("conf/multi/", 0).await.unwrap();
    let r1 = store
        .put("conf/multi/a/1", b"1".to_vec(), None)
        .await
        .unwrap();
    let r2 = store
        .put("conf/multi/b/1", b"1".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(next_event(&mut narrow).await.revision(), r1);
    assert_no_event(&mut narrow);
    assert_eq!(next_event(&mut wide).await.revision(), r1);
    assert_eq!(next_event(&mut wide).await.revision(), r2);
    // A dropped watcher does not disturb the others.
    drop(narrow);
    let r3 = store
        .put("conf/multi/a/2", b"1".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(next_event(&mut wide).await.revision(), r3);
}

/// Lease grant, keep-alive and revoke: revoking deletes exactly the attached keys, each with
/// a delete event carrying its previous value at a revision after the revocation began, and
/// the lease is gone afterwards. (How many revisions the deletes take is the implementation's:
/// the embedded store's tests check its one per key.)
pub async fn lease_keep_alive_and_revoke(store: Arc<dyn Store>) {
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    let other = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    assert_ne!(lease, 0, "lease ids are non-zero");
    assert_ne!(lease, other, "lease ids are unique");

    let r1 = store
        .put("conf/lease/a", b"a".to_vec(), Some(lease))
        .await
        .unwrap();
    let CasOutcome::Written(r2) = store
        .compare_and_swap("conf/lease/b", Expect::Absent, b"b".to_vec(), Some(lease))
        .await
        .unwrap()
    else {
        panic!("CAS must write");
    };
    store
        .put("conf/lease/plain", b"p".to_vec(), None)
        .await
        .unwrap();
    store
        .put("conf/lease/other", b"o".to_vec(), Some(other))
        .await
        .unwrap();
    // Re-putting without the lease detaches the key from it (etcd semantics).
    store
        .put("conf/lease/detached", b"d".to_vec(), Some(lease))
        .await
        .unwrap();
    store
        .put("conf/lease/detached", b"d2".to_vec(), None)
        .await
        .unwrap();

    let a = store.get("conf/lease/a").await.unwrap().expect("written");
    assert_eq!((a.lease, a.mod_revision), (Some(lease), r1));
    let b = store.get("conf/lease/b").await.unwrap().expect("written");
    assert_eq!((b.lease, b.mod_revision), (Some(lease), r2));
    assert_eq!(
        store
            .get("conf/lease/detached")
            .await
            .unwrap()
            .unwrap()
            .lease,
        None
    );

    store.lease_keep_alive(lease).await.unwrap();
    store.lease_keep_alive(other).await.unwrap();

    let mut stream = store.watch("conf/lease/", 0).await.unwrap();
    let before = store.revision().await.unwrap();
    store.lease_revoke(lease).await.unwrap();

    let mut deleted = Vec::new();
    for _ in 0..2 {
        let (key, revision, prev) = expect_delete(next_event(&mut stream).await);
        assert!(revision > before);
        deleted.push((key, prev));
    }
    deleted.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        deleted,
        [
            ("conf/lease/a".to_owned(), Some(a)),
            ("conf/lease/b".to_owned(), Some(b))
        ]
    );
    assert!(store.revision().await.unwrap() > before);
    assert_no_event(&mut stream);

    assert_eq!(store.get("conf/lease/a").await.unwrap(), None);
    assert_eq!(store.get("conf/lease/b").await.unwrap(), None);
    assert!(store.get("conf/lease/plain").await.unwrap().is_some());
    assert!(store.get("conf/lease/other").await.unwrap().is_some());
    assert!(store.get("conf/lease/detached").await.unwrap().is_some());

    assert!(matches!(
        store.lease_keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(id)) if id == lease
    ));
    assert!(matches!(
        store
            .put("conf/lease/late", b"x".to_vec(), Some(lease))
            .await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(matches!(
        store.lease_revoke(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    // The other lease is unaffected.
    store.lease_keep_alive(other).await.unwrap();
}

/// A lease expires `ttl` after its grant or last keep-alive, without anyone calling the
/// store: its keys vanish with delete events and the lease cannot be renewed any more.
///
/// `advance` moves time forward (`tokio::time::advance` on a paused clock, or a real sleep).
/// The margins are a fifth of the TTL on both sides so neither clock granularity nor the time
/// the store operations take can flip the outcome.
pub async fn lease_expiry<A, Fut>(store: Arc<dyn Store>, ttl: Duration, advance: A)
where
    A: Fn(Duration) -> Fut,
    Fut: Future<Output = ()>,
{
    let step = ttl * 3 / 5;
    let lease = store.lease_grant(ttl).await.unwrap();
    let keeper = store.lease_grant(ttl * 10).await.unwrap();
    store
        .put("conf/expiry/a", b"a".to_vec(), Some(lease))
        .await
        .unwrap();
    store
        .put("conf/expiry/b", b"b".to_vec(), Some(lease))
        .await
        .unwrap();
    store
        .put("conf/expiry/kept", b"k".to_vec(), Some(keeper))
        .await
        .unwrap();
    let mut stream = store.watch("conf/expiry/", 0).await.unwrap();

    // 0.6 TTL in: renew. At 1.2 TTL since the grant, the key must still be there because only
    // 0.6 TTL has passed since the renewal.
    advance(step).await;
    store.lease_keep_alive(lease).await.unwrap();
    advance(step).await;
    assert!(
        store.get("conf/expiry/a").await.unwrap().is_some(),
        "renewed lease expired early"
    );
    assert_no_event(&mut stream);

    // 1.2 TTL since the renewal: expired. Nothing calls the store before the events arrive.
    advance(step).await;
    let mut deleted = Vec::new();
    for _ in 0..2 {
        let (key, _, prev) = expect_delete(next_event(&mut stream).await);
        assert_eq!(prev.and_then(|p| p.lease), Some(lease));
        deleted.push(key);
    }
    deleted.sort();
    assert_eq!(deleted, ["conf/expiry/a", "conf/expiry/b"]);
    assert_no_event(&mut stream);

    assert_eq!(store.get("conf/expiry/a").await.unwrap(), None);
    assert!(matches!(
        store.lease_keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(id)) if id == lease
    ));
    assert!(matches!(
        store.put("conf/expiry/c", b"c".to_vec(), Some(lease)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    // The longer lease is still alive.
    assert!(store.get("conf/expiry/kept").await.unwrap().is_some());
    store.lease_keep_alive(keeper).await.unwrap();
}

/// 50 concurrent `CAS(Absent)` on one key: exactly one wins, everyone else sees the winner.
/// Then 50 concurrent `CAS(ModRevision)` on the winner's revision: again exactly one wins.
pub async fn concurrent_cas_single_winner(store: Arc<dyn Store>) {
    const CONTENDERS: usize = 50;
    let key = "conf/race/a";

    let race = |expect: Expect| {
        let tasks: Vec<_> = (0..CONTENDERS)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let value = format!("{expect:?}-{i}").into_bytes();
                    (
                        i,
                        store
                            .compare_and_swap(key, expect, value, None)
                            .await
                            .unwrap(),
                    )
                })
            })
            .collect();
        async move {
            let mut outcomes = Vec::new();
            for task in tasks {
                outcomes.push(task.await.unwrap());
            }
            outcomes
        }
    };

    for round in 0..2 {
        let expect = match round {
            0 => Expect::Absent,
            _ => Expect::ModRevision(store.get(key).await.unwrap().unwrap().mod_revision),
        };
        let outcomes = race(expect).await;
        let winners: Vec<_> = outcomes
            .iter()
            .filter_map(|(i, outcome)| match outcome {
                CasOutcome::Written(revision) => Some((*i, *revision)),
                CasOutcome::Conflict(_) => None,
            })
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one CAS wins: {winners:?}"
        );
        let (winner, revision) = winners[0];
        let current = store.get(key).await.unwrap().unwrap();
        assert_eq!(current.value, format!("{expect:?}-{winner}").into_bytes());
        assert_eq!(current.mod_revision, revision);
        assert_eq!(current.version, round + 1);
        for (_, outcome) in &outcomes {
            if let CasOutcome::Conflict(seen) = outcome {
                // A loser that lost to the winner sees it (none can see an older state: the
                // winner was the only write).
                let seen = seen.as_ref().expect("the key exists once anyone lost");
                assert!(seen.mod_revision <= revision);
            }
        }
    }
}

fn expect_committed(outcome: TxnOutcome) -> Revision {
    match outcome {
        TxnOutcome::Committed(revision) => revision,
        other => panic!("expected the transaction to commit, got {other:?}"),
    }
}

/// A transaction whose compares hold applies all its operations at one revision: the
/// revision goes up once, every key written carries it, and watchers see the events in
/// operation order, all at that revision, live and replayed.
pub async fn txn_commits_all_at_one_revision(store: Arc<dyn Store>) {
    let prefix = "conf/txn_commit/";
    let (a, b, c) = (
        "conf/txn_commit/a",
        "conf/txn_commit/b",
        "conf/txn_commit/c",
    );
    let missing = "conf/txn_commit/missing";
    let ra = store.put(a, b"a1".to_vec(), None).await.unwrap();
    let rc = store.put(c, b"c1".to_vec(), None).await.unwrap();
    let c_before = store.get(c).await.unwrap().expect("just written");
    let mut stream = store.watch(prefix, 0).await.unwrap();
    let before = store.revision().await.unwrap();

    let outcome = store
        .txn(
            vec![
                Compare::mod_revision(a, ra),
                Compare::absent(b),
                Compare::create_revision(c, rc),
            ],
            vec![
                TxnOp::put(b, b"b1".to_vec(), None),
                TxnOp::put(a, b"a2".to_vec(), None),
                TxnOp::delete(c),
                // A delete of a missing key is no error and no event.
                TxnOp::delete(missing),
            ],
        )
        .await
        .unwrap();
    let r = expect_committed(outcome);
    assert_eq!(r, before + 1, "a transaction bumps the revision once");
    assert_eq!(store.revision().await.unwrap(), r);

    let kv_a = store.get(a).await.unwrap().expect("written by the txn");
    assert_eq!(
        kv_a,
        KeyValue {
            key: a.to_owned(),
            value: b"a2".to_vec(),
            create_revision: ra,
            mod_revision: r,
            version: 2,
            lease: None,
        }
    );
    let kv_b = store.get(b).await.unwrap().expect("created by the txn");
    assert_eq!(
        kv_b,
        KeyValue {
            key: b.to_owned(),
            value: b"b1".to_vec(),
            create_revision: r,
            mod_revision: r,
            version: 1,
            lease: None,
        }
    );
    assert_eq!(store.get(c).await.unwrap(), None);
    assert_eq!(store.get(missing).await.unwrap(), None);
    let listing = store.list(prefix).await.unwrap();
    assert_eq!(listing.kvs, [kv_a.clone(), kv_b.clone()]);
    assert_eq!(listing.revision, r);

    // Live: in operation order, all at the transaction's revision.
    let check = |events: [WatchEvent; 3]| {
        let [first, second, third] = events;
        assert_eq!(expect_put(first), kv_b);
        assert_eq!(expect_put(second), kv_a);
        let (key, revision, prev) = expect_delete(third);
        assert_eq!((key.as_str(), revision), (c, r));
        assert_eq!(prev, Some(c_before.clone()));
    };
    check([
        next_event(&mut stream).await,
        next_event(&mut stream).await,
        next_event(&mut stream).await,
    ]);
    assert_no_event(&mut stream);

    // Replayed from the transaction's revision: all of it, not part.
    let mut replay = store.watch(prefix, r).await.unwrap();
    check([
        next_event(&mut replay).await,
        next_event(&mut replay).await,
        next_event(&mut replay).await,
    ]);
    assert_no_event(&mut replay);

    // A transaction that changes nothing commits at the current revision without moving it.
    let empty = store
        .txn(vec![Compare::exists(a)], Vec::new())
        .await
        .unwrap();
    assert_eq!(empty, TxnOutcome::Committed(r));
    let no_op = store
        .txn(Vec::new(), vec![TxnOp::delete(missing)])
        .await
        .unwrap();
    assert_eq!(no_op, TxnOutcome::Committed(r));
    assert_eq!(store.revision().await.unwrap(), r);
    assert_no_event(&mut stream);
}

/// One compare that does not hold (here the second of three) makes the whole transaction
/// fail: nothing is written, the revision does not move, no event is sent, and the outcome
/// names the failing compare with its key's current value.
pub async fn txn_is_all_or_nothing(store: Arc<dyn Store>) {
    let prefix = "conf/txn_fail/";
    let (a, b, new) = ("conf/txn_fail/a", "conf/txn_fail/b", "conf/txn_fail/new");
    let ra = store.put(a, b"a1".to_vec(), None).await.unwrap();
    store.put(b, b"b1".to_vec(), None).await.unwrap();
    store.put(b, b"b2".to_vec(), None).await.unwrap();
    let kv_a = store.get(a).await.unwrap().expect("just written");
    let kv_b = store.get(b).await.unwrap().expect("just written");
    let mut stream = store.watch(prefix, 0).await.unwrap();
    let before = store.revision().await.unwrap();
    let ops = || {
        vec![
            TxnOp::put(a, b"a2".to_vec(), None),
            TxnOp::put(new, b"n".to_vec(), None),
            TxnOp::delete(b),
        ]
    };

    // `b` was written since `ra`: the second compare fails, the third is never reached.
    let outcome = store
        .txn(
            vec![
                Compare::mod_revision(a, ra),
                Compare::mod_revision(b, ra),
                Compare::absent(new),
            ],
            ops(),
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        TxnOutcome::Failed {
            compare: 1,
            current: Some(kv_b.clone()),
        }
    );

    // A compare on a missing key reports no current value.
    let outcome = store
        .txn(
            vec![Compare::absent(new), Compare::exists("conf/txn_fail/none")],
            ops(),
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        TxnOutcome::Failed {
            compare: 1,
            current: None,
        }
    );

    // As for compare-and-swap, a failed compare wins over a bad lease: the writes are never
    // looked at.
    let outcome = store
        .txn(
            vec![Compare::absent(a)],
            vec![TxnOp::put(new, b"n".to_vec(), Some(0xdead_beef))],
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        TxnOutcome::Failed {
            compare: 0,
            current: Some(kv_a.clone()),
        }
    );

    assert_eq!(store.revision().await.unwrap(), before);
    assert_eq!(store.get(a).await.unwrap(), Some(kv_a.clone()));
    assert_eq!(store.get(b).await.unwrap(), Some(kv_b.clone()));
    assert_eq!(store.get(new).await.unwrap(), None);
    assert_no_event(&mut stream);

    // The same operations go through once the compares hold.
    let r = expect_committed(
        store
            .txn(
                vec![
                    Compare::mod_revision(a, ra),
                    Compare::mod_revision(b, kv_b.mod_revision),
                    Compare::absent(new),
                ],
                ops(),
            )
            .await
            .unwrap(),
    );
    assert!(r > before);
    assert_eq!(store.get(b).await.unwrap(), None);
    let keys: Vec<String> = store
        .list(prefix)
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, [a, new]);
}

/// Every kind of compare, holding and not, on an existing and a missing key; and
/// compare-and-swap with the same conditions.
pub async fn txn_compare_kinds(store: Arc<dyn Store>) {
    let key = "conf/txn_kinds/k";
    let missing = "conf/txn_kinds/missing";
    let marker = "conf/txn_kinds/marker";
    let created = store.put(key, b"1".to_vec(), None).await.unwrap();
    let modified = store.put(key, b"2".to_vec(), None).await.unwrap();
    let current = store.get(key).await.unwrap().expect("just written");

    let cases = [
        (key, Expect::Absent, false),
        (missing, Expect::Absent, true),
        (key, Expect::Exists, true),
        (missing, Expect::Exists, false),
        (key, Expect::ModRevision(modified), true),
        (key, Expect::ModRevision(created), false),
        (missing, Expect::ModRevision(modified), false),
        (key, Expect::CreateRevision(created), true),
        (key, Expect::CreateRevision(modified), false),
        (missing, Expect::CreateRevision(created), false),
        // Revisions of an existing key are never 0.
        (key, Expect::ModRevision(0), false),
        (missing, Expect::ModRevision(0), false),
        (missing, Expect::CreateRevision(0), false),
    ];
    for (index, (compared, expect, holds)) in cases.into_iter().enumerate() {
        let value = index.to_string().into_bytes();
        let outcome = store
            .txn(
                vec![Compare::new(compared, expect)],
                vec![TxnOp::put(marker, value.clone(), None)],
            )
            .await
            .unwrap();
        let seen = store.get(compared).await.unwrap();
        if holds {
            let r = expect_committed(outcome);
            let written = store.get(marker).await.unwrap().expect("txn committed");
            assert_eq!(
                (written.value, written.mod_revision),
                (value, r),
                "{compared} {expect:?}"
            );
        } else {
            assert_eq!(
                outcome,
                TxnOutcome::Failed {
                    compare: 0,
                    current: seen.clone(),
                },
                "{compared} {expect:?}"
            );
            assert_ne!(
                store.get(marker).await.unwrap().map(|kv| kv.value),
                Some(value),
                "{compared} {expect:?} wrote"
            );
        }
        assert_eq!(
            seen.as_ref(),
            (compared == key).then_some(&current),
            "compares write nothing"
        );
    }

    // Compare-and-swap takes the same conditions.
    assert_eq!(
        store
            .compare_and_swap(missing, Expect::Exists, b"x".to_vec(), None)
            .await
            .unwrap(),
        CasOutcome::Conflict(None)
    );
    assert_eq!(
        store
            .compare_and_swap(key, Expect::CreateRevision(modified), b"x".to_vec(), None)
            .await
            .unwrap(),
        CasOutcome::Conflict(Some(current.clone()))
    );
    let CasOutcome::Written(r3) = store
        .compare_and_swap(key, Expect::CreateRevision(created), b"3".to_vec(), None)
        .await
        .unwrap()
    else {
        panic!("CAS on the creation revision must write");
    };
    let CasOutcome::Written(r4) = store
        .compare_and_swap(key, Expect::Exists, b"4".to_vec(), None)
        .await
        .unwrap()
    else {
        panic!("CAS(Exists) on an existing key must write");
    };
    assert!(r4 > r3);

    // The fencing case: after a delete and a re-creation the old creation revision no longer
    // matches, though the key exists again.
    assert!(store.delete(key).await.unwrap());
    let recreated = store.put(key, b"new life".to_vec(), None).await.unwrap();
    let outcome = store
        .txn(
            vec![Compare::create_revision(key, created)],
            vec![TxnOp::put(marker, b"fenced".to_vec(), None)],
        )
        .await
        .unwrap();
    assert!(
        matches!(&outcome, TxnOutcome::Failed { compare: 0, current: Some(kv) } if kv.create_revision == recreated),
        "{outcome:?}"
    );
    expect_committed(
        store
            .txn(
                vec![Compare::create_revision(key, recreated)],
                vec![TxnOp::put(marker, b"leader".to_vec(), None)],
            )
            .await
            .unwrap(),
    );
}

/// Requests no implementation accepts fail before anything is written, whatever the
/// compares say: too many compares or operations, a key written twice, a lease that does not
/// exist.
pub async fn txn_rejects_bad_requests(store: Arc<dyn Store>) {
    let prefix = "conf/txn_bad/";
    let key = |i: usize| format!("conf/txn_bad/{i:03}");
    let mut stream = store.watch(prefix, 0).await.unwrap();
    let before = store.revision().await.unwrap();

    let puts = |n: usize| -> Vec<TxnOp> {
        (0..n)
            .map(|i| TxnOp::put(key(i), b"v".to_vec(), None))
            .collect()
    };
    match store.txn(Vec::new(), puts(MAX_TXN_OPS + 1)).await {
        Err(StoreError::TxnTooLarge { ops, .. }) => assert_eq!(ops, MAX_TXN_OPS + 1),
        other => panic!("expected TxnTooLarge, got {other:?}"),
    }
    let compares: Vec<Compare> = (0..=MAX_TXN_OPS).map(|i| Compare::absent(key(i))).collect();
    match store.txn(compares, puts(1)).await {
        Err(StoreError::TxnTooLarge { compares, .. }) => assert_eq!(compares, MAX_TXN_OPS + 1),
        other => panic!("expected TxnTooLarge, got {other:?}"),
    }

    let a = "conf/txn_bad/a";
    for ops in [
        vec![
            TxnOp::put(a, b"1".to_vec(), None),
            TxnOp::put(key(1), b"v".to_vec(), None),
            TxnOp::put(a, b"2".to_vec(), None),
        ],
        vec![TxnOp::put(a, b"1".to_vec(), None), TxnOp::delete(a)],
        vec![TxnOp::delete(a), TxnOp::delete(a)],
    ] {
        match store.txn(vec![Compare::absent(a)], ops).await {
            Err(StoreError::TxnDuplicateKey { key }) => assert_eq!(key, a),
            other => panic!("expected TxnDuplicateKey, got {other:?}"),
        }
    }

    // The lease of the second put does not exist: the first put is not written either.
    let bogus = 0xdead_beef;
    match store
        .txn(
            vec![Compare::absent(a)],
            vec![
                TxnOp::put(a, b"1".to_vec(), None),
                TxnOp::put(key(1), b"v".to_vec(), Some(bogus)),
            ],
        )
        .await
    {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, bogus),
        other => panic!("expected LeaseNotFound, got {other:?}"),
    }

    assert_eq!(store.revision().await.unwrap(), before);
    assert!(store.list(prefix).await.unwrap().kvs.is_empty());
    assert_no_event(&mut stream);

    // Exactly the limit is fine.
    let r = expect_committed(store.txn(Vec::new(), puts(MAX_TXN_OPS)).await.unwrap());
    let listing = store.list(prefix).await.unwrap();
    assert_eq!(listing.kvs.len(), MAX_TXN_OPS);
    assert!(listing.kvs.iter().all(|kv| kv.mod_revision == r));
}

/// Keys put by a transaction with a lease belong to it like any other: revoking the lease
/// deletes them, and a transaction's put without the lease detaches a key from it.
pub async fn txn_put_with_lease(store: Arc<dyn Store>) {
    let prefix = "conf/txn_lease/";
    let (a, b, plain, detached) = (
        "conf/txn_lease/a",
        "conf/txn_lease/b",
        "conf/txn_lease/plain",
        "conf/txn_lease/detached",
    );
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    store
        .put(detached, b"d".to_vec(), Some(lease))
        .await
        .unwrap();

    let r = expect_committed(
        store
            .txn(
                vec![Compare::absent(a), Compare::absent(b)],
                vec![
                    TxnOp::put(a, b"a".to_vec(), Some(lease)),
                    TxnOp::put(b, b"b".to_vec(), Some(lease)),
                    TxnOp::put(plain, b"p".to_vec(), None),
                    TxnOp::put(detached, b"d2".to_vec(), None),
                ],
            )
            .await
            .unwrap(),
    );
    for (key, expected) in [
        (a, Some(lease)),
        (b, Some(lease)),
        (plain, None),
        (detached, None),
    ] {
        let kv = store.get(key).await.unwrap().expect("written by the txn");
        assert_eq!((kv.lease, kv.mod_revision), (expected, r), "{key}");
    }

    let mut stream = store.watch(prefix, 0).await.unwrap();
    store.lease_revoke(lease).await.unwrap();
    let mut deleted = Vec::new();
    for _ in 0..2 {
        let (key, revision, prev) = expect_delete(next_event(&mut stream).await);
        assert!(revision > r);
        assert_eq!(prev.and_then(|p| p.lease), Some(lease));
        deleted.push(key);
    }
    deleted.sort();
    assert_eq!(deleted, [a, b]);
    assert_no_event(&mut stream);

    let keys: Vec<String> = store
        .list(prefix)
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, [detached, plain]);
}

/// Expands to one `#[tokio::test]` per conformance check, each on a fresh store from
/// `$factory` (`async fn() -> (Arc<dyn Store>, impl Sized)`, the second element being a guard
/// kept alive until the test ends).
///
/// `store_conformance_tests!(factory)` runs
/// [`lease_expiry`](crate::conformance::lease_expiry) on a paused tokio clock;
/// `store_conformance_tests!(factory, real_time)` runs it with real sleeps (slower; for
/// backends behind a network client).
#[macro_export]
macro_rules! store_conformance_tests {
    (@common $factory:expr) => {
        $crate::store_conformance_tests!(@each $factory;
            conformance_put_get_metadata => put_get_metadata,
            conformance_put_with_unknown_lease_fails => put_with_unknown_lease_fails,
            conformance_cas_absent => cas_absent,
            conformance_cas_mod_revision => cas_mod_revision,
            conformance_delete_and_delete_if_revision => delete_and_delete_if_revision,
            conformance_list_prefix => list_prefix,
            conformance_list_pages => list_pages,
            conformance_watch_from_listing => watch_from_listing,
            conformance_watch_replays_history => watch_replays_history,
            conformance_watch_from_zero_is_live => watch_from_zero_is_live,
            conformance_watch_multiple_watchers => watch_multiple_watchers,
            conformance_lease_keep_alive_and_revoke => lease_keep_alive_and_revoke,
            conformance_txn_commits_all_at_one_revision => txn_commits_all_at_one_revision,
            conformance_txn_is_all_or_nothing => txn_is_all_or_nothing,
            conformance_txn_compare_kinds => txn_compare_kinds,
            conformance_txn_rejects_bad_requests => txn_rejects_bad_requests,
            conformance_txn_put_with_lease => txn_put_with_lease,
        );

        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_concurrent_cas_single_winner() {
            let (store, _guard) = ($factory)().await;
            $crate::conformance::concurrent_cas_single_winner(store).await;
        }
    };
    (@each $factory:expr; $($name:ident => $check:ident,)*) => {
        $(
            $crate::store_conformance_tests!(@test $factory, $name, $check);
        )*
    };
    (@test $factory:expr, $name:ident, $check:ident) => {
        #[::tokio::test]
        async fn $name() {
            let (store, _guard) = ($factory)().await;
            $crate::conformance::$check(store).await;
        }
    };
    ($factory:expr) => {
        $crate::store_conformance_tests!(@common $factory);

        #[::tokio::test(start_paused = true)]
        async fn conformance_lease_expiry() {
            let (store, _guard) = ($factory)().await;
            $crate::conformance::lease_expiry(
                store,
                ::std::time::Duration::from_secs(10),
                ::tokio::time::advance,
            )
            .await;
        }
    };
    ($factory:expr, real_time) => {
        $crate::store_conformance_tests!(@common $factory);

        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_lease_expiry() {
            let (store, _guard) = ($factory)().await;
            $crate::conformance::lease_expiry(
                store,
                ::std::time::Duration::from_secs(5),
                ::tokio::time::sleep,
            )
            .await;
        }
    };
}
