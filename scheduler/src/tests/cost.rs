//! A reconciler pass costs what is live and due, not what the store has seen: with a long
//! history of ended backends in the store, a pass reads no backend record from it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hangar_core::api::ConnectRequest;
use hangar_core::token::TokenKey;
use hangar_core::{BackendId, BackendState, KeyRef, TerminationReason};
use hangar_store::embedded::EmbeddedStore;
use hangar_store::{
    CasOutcome, Compare, Expect, KeyValue, LeaseId, Listing, Revision, Store, StoreResult, TxnOp,
    TxnOutcome, WatchStream,
};

use super::hello;
use crate::records::{BACKENDS_PREFIX, BackendRecord, ResolvedSpawn, backend_key};
use crate::{ManualClock, Scheduler, SchedulerConfig};

/// The embedded store, counting the reads and deletes of backend records.
struct CountingStore {
    inner: Arc<EmbeddedStore>,
    backend_lists: AtomicUsize,
    backend_gets: AtomicUsize,
    deletes: AtomicUsize,
}

#[async_trait]
impl Store for CountingStore {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        if key.starts_with(BACKENDS_PREFIX) {
            self.backend_gets.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.get(key).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> StoreResult<Revision> {
        self.inner.put(key, value, lease).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> StoreResult<CasOutcome> {
        self.inner.compare_and_swap(key, expect, value, lease).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<TxnOutcome> {
        let deletes = ops
            .iter()
            .filter(|op| matches!(op, TxnOp::Delete { .. }))
            .count();
        self.deletes.fetch_add(deletes, Ordering::SeqCst);
        self.inner.txn(compares, ops).await
    }
    async fn delete(&self, key: &str) -> StoreResult<bool> {
        self.inner.delete(key).await
    }
    async fn delete_if_revision(&self, key: &str, revision: Revision) -> StoreResult<bool> {
        if key.starts_with(BACKENDS_PREFIX) {
            self.deletes.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.delete_if_revision(key, revision).await
    }
    async fn list(&self, prefix: &str) -> StoreResult<Listing> {
        if prefix.starts_with(BACKENDS_PREFIX) {
            self.backend_lists.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.list(prefix).await
    }
    async fn watch(&self, prefix: &str, from: Revision) -> StoreResult<WatchStream> {
        self.inner.watch(prefix, from).await
    }
    async fn revision(&self) -> StoreResult<Revision> {
        self.inner.revision().await
    }
    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, lease: LeaseId) -> StoreResult<()> {
        self.inner.lease_keep_alive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        self.inner.lease_revoke(lease).await
    }
}

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
        message: None,
    }
}

#[tokio::test]
async fn a_reconciler_pass_reads_no_backend_history_and_removes_only_what_is_due() {
    const NOW: u64 = 100_000_000;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(CountingStore {
        inner: EmbeddedStore::open_default(dir.path().join("s.redb"))
            .await
            .unwrap(),
        backend_lists: AtomicUsize::new(0),
        backend_gets: AtomicUsize::new(0),
        deletes: AtomicUsize::new(0),
    });
    // History: 2,000 ended backends, 5 of them past the retention.
    let mut cfg = SchedulerConfig::new("hangar.test", "http://127.0.0.1:1");
    cfg.defaults.command = Some(vec!["true".into()]);
    let retention = cfg.terminated_retention.as_millis() as u64;
    for chunk in (0..2_000).collect::<Vec<_>>().chunks(100) {
        let ops = chunk
            .iter()
            .map(|&i| {
                let at = if i < 5 {
                    NOW - retention - 1
                } else {
                    NOW - 1_000
                };
                let rec = ended(i, at);
                TxnOp::put(
                    backend_key(rec.id.as_str()),
                    serde_json::to_vec(&rec).unwrap(),
                    None,
                )
            })
            .collect();
        let done = store.txn(Vec::new(), ops).await.unwrap();
        assert!(matches!(done, TxnOutcome::Committed(_)));
    }
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
    for k in ["a", "b", "c"] {
        sched
            .handles()
            .connector
            .connect(ConnectRequest {
                key: Some(KeyRef::new("default", k)),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // A connect answers once the publisher has its record: the index has all three.
    assert_eq!(sched.handles().routes.live_records().len(), 3);

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
