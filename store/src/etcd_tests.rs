//! Tests of [`EtcdStore`] against real etcd processes: the shared conformance suite on a fresh
//! single-member etcd per test, plus what only etcd shows (compaction, reopening, prefixes,
//! request limits, a member dying in a three-member cluster).
//!
//! The harness ([`crate::testing`], shared with other crates' tests behind the `conformance`
//! feature) starts `etcd` (Debian's `etcd-server`) as child processes on free loopback ports
//! with temporary data directories, waits until they answer, and SIGKILLs them on drop.
//! Without etcd installed these tests fail: install it with `apt-get install etcd-server`
//! (scripts/test.sh does).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{EtcdOptions, EtcdStore, RetryPolicy};
use crate::conformance::{assert_no_event, next_event};
use crate::testing::{EtcdCluster, Ready, free_ports};
use crate::{
    CasOutcome, Compare, Expect, LocationError, MAX_REQUEST_BYTES, Revision, Store, StoreError,
    StoreLocation, TxnOp, TxnOutcome, WatchEvent,
};

/// The conformance factory: a fresh single-member etcd, and a store on it under a key prefix
/// (so every call also exercises prefixing and stripping).
async fn fresh_etcd() -> (Arc<dyn Store>, EtcdCluster) {
    let etcd = EtcdCluster::start(1).await;
    let store = EtcdStore::connect(etcd.options().with_prefix("/conformance"))
        .await
        .unwrap();
    (store, etcd)
}

crate::store_conformance_tests!(fresh_etcd, real_time);

fn delete_of(event: WatchEvent) -> (String, Revision) {
    match event {
        WatchEvent::Delete { key, revision, .. } => (key, revision),
        other => panic!("expected a delete event, got {other:?}"),
    }
}

fn put_of(event: WatchEvent) -> (String, Revision) {
    match event {
        WatchEvent::Put(kv) => (kv.key, kv.mod_revision),
        other => panic!("expected a put event, got {other:?}"),
    }
}

/// Waits for `stream` to end (closed by the store), failing the test if events arrive first or
/// it stays open.
async fn assert_closed(stream: &mut crate::WatchStream) {
    match tokio::time::timeout(Duration::from_secs(20), stream.recv()).await {
        Ok(None) => {}
        Ok(Some(event)) => panic!("expected the stream to close, got {event:?}"),
        Err(_) => panic!("the stream stayed open"),
    }
}

#[tokio::test]
async fn watch_from_a_compacted_revision_is_compacted() {
    let etcd = EtcdCluster::start(1).await;
    let store = EtcdStore::connect(etcd.options()).await.unwrap();
    let first = store.put("c/a", b"1".to_vec(), None).await.unwrap();
    store.put("c/a", b"2".to_vec(), None).await.unwrap();
    let kept = store.put("c/b", b"1".to_vec(), None).await.unwrap();
    etcd.compact(kept).await;

    for from in [first, kept - 1] {
        match store.watch("c/", from).await {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (from, kept));
            }
            other => panic!("watch from {from}: expected Compacted, got {other:?}"),
        }
    }
    // The compaction revision itself is still there, and so is the future.
    let mut stream = store.watch("c/", kept).await.unwrap();
    assert_eq!(
        put_of(next_event(&mut stream).await),
        ("c/b".to_owned(), kept)
    );
    let later = store.put("c/c", b"1".to_vec(), None).await.unwrap();
    assert_eq!(
        put_of(next_event(&mut stream).await),
        ("c/c".to_owned(), later)
    );
    let mut future = store.watch("c/", later + 2).await.unwrap();
    store.put("c/d", b"1".to_vec(), None).await.unwrap();
    let last = store.put("c/e", b"1".to_vec(), None).await.unwrap();
    assert_eq!(
        put_of(next_event(&mut future).await),
        ("c/e".to_owned(), last)
    );
    assert_no_event(&mut future);
    assert!(
        StoreError::Compacted {
            requested: 1,
            oldest: 2
        }
        .is_transient()
    );
}

#[tokio::test]
async fn a_watch_resumes_after_its_member_restarts_and_closes_if_compacted_meanwhile() {
    let mut etcd = EtcdCluster::start(1).await;
    let initial_cluster = etcd.initial_cluster.clone();
    // Long enough for the forwarder to keep trying while the member is moved around below.
    let mut options = etcd.options();
    options.retry.deadline = Duration::from_secs(60);
    let store = EtcdStore::connect(options).await.unwrap();
    let mut stream = store.watch("r/", 0).await.unwrap();
    let r1 = store.put("r/a", b"1".to_vec(), None).await.unwrap();
    assert_eq!(
        put_of(next_event(&mut stream).await),
        ("r/a".to_owned(), r1)
    );

    // The only member dies and comes back: the stream is reopened from the revision after the
    // last one delivered; nothing is lost or repeated.
    etcd.restart(0).await;
    let r2 = store.put("r/b", b"1".to_vec(), None).await.unwrap();
    assert_eq!(
        put_of(next_event(&mut stream).await),
        ("r/b".to_owned(), r2)
    );
    assert_no_event(&mut stream);

    // It dies again and comes back where the store cannot reach it, history the stream has
    // not seen is written and compacted away, and it comes back where the store can: the
    // stream cannot resume, so it closes (its consumer lists again).
    let hidden = free_ports(1)[0];
    etcd.members[0].kill();
    etcd.members[0].start_listening(&initial_cluster, &[hidden]);
    assert!(matches!(etcd.wait_ready().await, Ready::Yes));
    let mut client = etcd.client().await;
    client.put("r/c", "1", None).await.unwrap();
    let r4 = client.put("r/c", "2", None).await.unwrap();
    let r4 = r4.header().unwrap().revision() as Revision;
    etcd.compact(r4).await;
    etcd.members[0].kill();
    let client_port = etcd.members[0].client_port;
    etcd.members[0].start_listening(&initial_cluster, &[client_port, hidden]);
    assert!(matches!(etcd.wait_ready().await, Ready::Yes));
    assert_closed(&mut stream).await;

    // The store itself is fine: a new watch from the listing works.
    let listing = store.list("r/").await.unwrap();
    assert_eq!(listing.kvs.len(), 3);
    let mut stream = store.watch("r/", listing.revision + 1).await.unwrap();
    let r5 = store.put("r/d", b"1".to_vec(), None).await.unwrap();
    assert_eq!(
        put_of(next_event(&mut stream).await),
        ("r/d".to_owned(), r5)
    );
}

#[tokio::test]
async fn a_reopened_store_sees_the_data() {
    let etcd = EtcdCluster::start(1).await;
    let (lease, revision, plain, leased) = {
        let store = EtcdStore::connect(etcd.options()).await.unwrap();
        let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
        store.put("a/plain", b"p1".to_vec(), None).await.unwrap();
        store.put("a/plain", b"p2".to_vec(), None).await.unwrap();
        store
            .put("a/leased", b"l".to_vec(), Some(lease))
            .await
            .unwrap();
        let plain = store.get("a/plain").await.unwrap().unwrap();
        let leased = store.get("a/leased").await.unwrap().unwrap();
        (lease, store.revision().await.unwrap(), plain, leased)
    };

    let store = EtcdStore::connect(etcd.options()).await.unwrap();
    assert_eq!(store.revision().await.unwrap(), revision);
    let listing = store.list("a/").await.unwrap();
    assert_eq!(listing.kvs, [leased.clone(), plain.clone()]);
    assert_eq!(listing.revision, revision);
    assert_eq!(plain.version, 2);
    // etcd keeps history (until compacted): a watch from the first write replays it.
    let mut stream = store.watch("a/", plain.create_revision).await.unwrap();
    for expected in [
        plain.create_revision,
        plain.mod_revision,
        leased.mod_revision,
    ] {
        assert_eq!(next_event(&mut stream).await.revision(), expected);
    }
    // The lease is etcd's, not the store's: it is still alive and still owns its key.
    store.lease_keep_alive(lease).await.unwrap();
    store.lease_revoke(lease).await.unwrap();
    let (key, deleted_at) = delete_of(next_event(&mut stream).await);
    assert_eq!(key, "a/leased");
    assert!(deleted_at > revision);
    assert_eq!(store.get("a/leased").await.unwrap(), None);
}

#[tokio::test]
async fn prefixes_keep_stores_apart() {
    let etcd = EtcdCluster::start(1).await;
    let a = EtcdStore::connect(etcd.options().with_prefix("/team-a"))
        .await
        .unwrap();
    let b = EtcdStore::connect(etcd.options().with_prefix("/team-b"))
        .await
        .unwrap();
    let bare = EtcdStore::connect(etcd.options()).await.unwrap();
    assert_eq!(a.prefix(), "/team-a");
    let mut watch_a = a.watch("", 0).await.unwrap();

    a.put("/hangar/x", b"a".to_vec(), None).await.unwrap();
    let rb = b.put("/hangar/x", b"b".to_vec(), None).await.unwrap();
    assert_eq!(a.get("/hangar/x").await.unwrap().unwrap().value, b"a");
    assert_eq!(b.get("/hangar/x").await.unwrap().unwrap().value, b"b");
    let keys = |listing: crate::Listing| -> Vec<String> {
        listing.kvs.into_iter().map(|kv| kv.key).collect()
    };
    assert_eq!(keys(a.list("").await.unwrap()), ["/hangar/x"]);
    assert_eq!(
        keys(bare.list("").await.unwrap()),
        ["/team-a/hangar/x", "/team-b/hangar/x"]
    );
    // Compares, transactions and watches see only their own prefix.
    let outcome = a
        .txn(
            vec![Compare::mod_revision("/hangar/x", rb)],
            vec![TxnOp::delete("/hangar/x")],
        )
        .await
        .unwrap();
    let TxnOutcome::Failed {
        compare: 0,
        current: Some(current),
    } = outcome
    else {
        panic!("the compare sees team-a's key, not team-b's: {outcome:?}");
    };
    assert_eq!(
        (current.key.as_str(), current.value.as_slice()),
        ("/hangar/x", &b"a"[..])
    );
    assert_eq!(put_of(next_event(&mut watch_a).await).0, "/hangar/x");
    assert!(b.delete("/hangar/x").await.unwrap());
    assert!(a.get("/hangar/x").await.unwrap().is_some());
    a.put("/hangar/y", b"a".to_vec(), None).await.unwrap();
    assert_eq!(put_of(next_event(&mut watch_a).await).0, "/hangar/y");
    assert_no_event(&mut watch_a);
}

#[tokio::test]
async fn requests_over_the_size_limit_are_refused() {
    let etcd = EtcdCluster::start(1).await;
    let store = EtcdStore::connect(etcd.options()).await.unwrap();
    let before = store.revision().await.unwrap();
    // Over the limit by the keys and values alone: refused before it is sent.
    match store
        .put("big", vec![b'x'; MAX_REQUEST_BYTES + 1], None)
        .await
    {
        Err(StoreError::RequestTooLarge { bytes, max }) => {
            assert_eq!(
                (bytes, max),
                (Some(MAX_REQUEST_BYTES + 4), MAX_REQUEST_BYTES)
            );
        }
        other => panic!("expected RequestTooLarge, got {other:?}"),
    }
    let half = vec![b'x'; MAX_REQUEST_BYTES / 2 + 1];
    match store
        .txn(
            Vec::new(),
            vec![
                TxnOp::put("big/1", half.clone(), None),
                TxnOp::put("big/2", half.clone(), None),
            ],
        )
        .await
    {
        Err(StoreError::RequestTooLarge { .. }) => {}
        other => panic!("expected RequestTooLarge, got {other:?}"),
    }
    // Exactly at the limit with the keys and values, over it with etcd's own framing: etcd
    // refuses it, and says so in the same terms.
    let at_limit = vec![b'x'; MAX_REQUEST_BYTES - 3];
    let error = store.put("big", at_limit, None).await.unwrap_err();
    assert!(
        matches!(error, StoreError::RequestTooLarge { bytes: None, .. }),
        "{error:?}"
    );
    assert!(!error.is_transient());
    assert_eq!(store.revision().await.unwrap(), before);
    // Comfortably under it: stored.
    let value = vec![b'y'; MAX_REQUEST_BYTES - 4096];
    store.put("big", value.clone(), None).await.unwrap();
    assert_eq!(store.get("big").await.unwrap().unwrap().value, value);
}

#[tokio::test]
async fn connecting_to_no_etcd_fails_clearly_and_in_bounded_time() {
    let port = free_ports(1)[0];
    let mut options = EtcdOptions::new(vec![format!("127.0.0.1:{port}")]);
    options.retry = RetryPolicy {
        deadline: Duration::from_secs(1),
        ..RetryPolicy::default()
    };
    let started = Instant::now();
    let error = EtcdStore::connect(options).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let message = error.to_string();
    assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
    assert!(
        message.contains(&format!("127.0.0.1:{port}")) && message.contains("no etcd member"),
        "{message}"
    );
}

#[tokio::test]
async fn open_connects_to_an_etcd_location() {
    let etcd = EtcdCluster::start(1).await;
    let url = format!("etcd://{}/opened", etcd.endpoints().join(","));
    let location: StoreLocation = url.parse().unwrap();
    assert_eq!(location.to_string(), url);
    let dir = tempfile::tempdir().unwrap();
    let store = crate::open(&location, dir.path()).await.unwrap();
    store.put("/k", b"v".to_vec(), None).await.unwrap();
    let bare = EtcdStore::connect(etcd.options()).await.unwrap();
    assert!(bare.get("/opened/k").await.unwrap().is_some());
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "an etcd store writes nothing to the data directory"
    );
    assert_eq!(
        "etcd://".parse::<StoreLocation>(),
        Err(LocationError::NoEndpoint)
    );
}

/// Writes through `store` for `rounds` rounds, every kind of call, and checks that each one
/// succeeds and that `stream` (watching `k/` from before the first) sees every write once, in
/// order.
async fn every_call_succeeds(store: &EtcdStore, lease: u64, rounds: usize) {
    let mut stream = store.watch("k/", 0).await.unwrap();
    let mut expected = Vec::new();
    let mut cas = store.put("k/cas", b"0".to_vec(), None).await.unwrap();
    expected.push(cas);
    for i in 0..rounds {
        let r = store
            .put(&format!("k/{i:03}"), b"v".to_vec(), Some(lease))
            .await
            .unwrap();
        expected.push(r);
        assert!(store.get(&format!("k/{i:03}")).await.unwrap().is_some());
        match store
            .compare_and_swap(
                "k/cas",
                Expect::ModRevision(cas),
                i.to_string().into_bytes(),
                None,
            )
            .await
            .unwrap()
        {
            CasOutcome::Written(r) => cas = r,
            other => panic!("round {i}: {other:?}"),
        }
        expected.push(cas);
        let committed = store
            .txn(
                vec![Compare::mod_revision("k/cas", cas)],
                vec![TxnOp::put(format!("k/txn{i:03}"), b"t".to_vec(), None)],
            )
            .await
            .unwrap();
        let TxnOutcome::Committed(r) = committed else {
            panic!("round {i}: {committed:?}");
        };
        expected.push(r);
        assert!(store.list("k/").await.unwrap().revision >= r);
        store.lease_keep_alive(lease).await.unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        seen.push(next_event(&mut stream).await.revision());
    }
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_keeps_serving_with_a_follower_killed() {
    let mut etcd = EtcdCluster::start(3).await;
    let started = Instant::now();
    let store = EtcdStore::connect(etcd.options()).await.unwrap();
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    every_call_succeeds(&store, lease, 5).await;

    let leader = etcd.leader().await;
    let follower = (leader + 1) % 3;
    etcd.kill(follower);
    // Without retries about a quarter of these calls would fail ("connection refused"): the
    // client keeps picking the dead member.
    let retried = store.retried();
    every_call_succeeds(&store, lease, 60).await;
    assert!(
        store.retried() > retried,
        "no call met the dead member: the test shows nothing"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_keeps_serving_when_its_leader_is_killed() {
    let mut etcd = EtcdCluster::start(3).await;
    let store = EtcdStore::connect(etcd.options()).await.unwrap();
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    let mut stream = store.watch("l/", 0).await.unwrap();
    let before = store.put("l/before", b"1".to_vec(), None).await.unwrap();
    let mut cas = before;

    let leader = etcd.leader().await;
    etcd.kill(leader);
    let killed = Instant::now();
    // Unconditional calls ride out the election (retried); a conditional write sent to a
    // member that has not noticed yet may be reported as "outcome unknown" (transient), never
    // as a conflict or a success it did not have.
    let mut unknown = 0;
    let mut written = Vec::new();
    for i in 0..20 {
        written.push(
            store
                .put(&format!("l/{i:02}"), b"v".to_vec(), Some(lease))
                .await
                .unwrap(),
        );
        store.lease_keep_alive(lease).await.unwrap();
        match store
            .compare_and_swap(
                "l/before",
                Expect::ModRevision(cas),
                i.to_string().into_bytes(),
                None,
            )
            .await
        {
            Ok(CasOutcome::Written(r)) => {
                cas = r;
                written.push(r);
            }
            Ok(CasOutcome::Conflict(Some(current))) if unknown > 0 => {
                // An earlier "unknown" write had in fact been applied.
                cas = current.mod_revision;
                written.push(current.mod_revision);
            }
            Ok(other) => panic!("round {i}: {other:?}"),
            Err(error) => {
                assert!(error.is_transient(), "{error}");
                assert!(
                    error.to_string().contains("may have been applied"),
                    "{error}"
                );
                unknown += 1;
            }
        }
    }
    assert!(killed.elapsed() < Duration::from_secs(60));
    assert!(
        unknown <= 3,
        "{unknown} conditional writes had an unknown outcome"
    );
    // Every write reported (and nothing else but the "unknown" ones that were applied) is
    // seen, once, in revision order.
    written.sort_unstable();
    written.dedup();
    let mut seen = vec![next_event(&mut stream).await.revision()];
    assert_eq!(seen[0], before);
    while seen.len() <= written.len() + unknown {
        match tokio::time::timeout(Duration::from_secs(2), stream.recv()).await {
            Ok(Some(event)) => seen.push(event.revision()),
            Ok(None) => panic!("the watch stream closed"),
            Err(_) => break,
        }
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(
        written.iter().all(|r| seen.contains(r)),
        "written {written:?}, seen {seen:?}"
    );
    store
        .get("l/00")
        .await
        .unwrap()
        .expect("written after the kill");
}

#[tokio::test]
async fn lease_errors_name_the_missing_lease() {
    let etcd = EtcdCluster::start(1).await;
    let store = EtcdStore::connect(etcd.options()).await.unwrap();
    let live = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    let gone = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    store.lease_revoke(gone).await.unwrap();
    for ops in [
        vec![
            TxnOp::put("m/a", b"1".to_vec(), Some(live)),
            TxnOp::put("m/b", b"1".to_vec(), Some(gone)),
        ],
        vec![
            TxnOp::put("m/a", b"1".to_vec(), Some(gone)),
            TxnOp::put("m/b", b"1".to_vec(), Some(live)),
        ],
    ] {
        match store.txn(Vec::new(), ops).await {
            Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, gone),
            other => panic!("expected LeaseNotFound({gone}), got {other:?}"),
        }
    }
    // Ids etcd cannot hold fail without asking it.
    let huge = u64::MAX;
    assert!(matches!(
        store.put("m/a", b"1".to_vec(), Some(huge)).await,
        Err(StoreError::LeaseNotFound(id)) if id == huge
    ));
    assert!(matches!(
        store.lease_keep_alive(huge).await,
        Err(StoreError::LeaseNotFound(id)) if id == huge
    ));
    assert!(store.list("m/").await.unwrap().kvs.is_empty());
    // Short TTLs are whole seconds: a lease of 1 ms is still alive right after its grant.
    let short = store.lease_grant(Duration::from_millis(1)).await.unwrap();
    store
        .put("m/short", b"s".to_vec(), Some(short))
        .await
        .unwrap();
    store.lease_keep_alive(short).await.unwrap();
}
