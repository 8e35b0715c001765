//! Admission errors say which step failed and whether the drone should retry: a store hiccup
//! is transient (the session closes with "try again", the drone backs off and reconnects), a
//! bad hello is a refusal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hangar_core::drone::{Capacity, Hello};
use hangar_core::token::TokenKey;
use hangar_store::embedded::EmbeddedStore;
use hangar_store::{
    CasOutcome, Compare, Expect, KeyValue, LeaseId, Listing, Revision, Store, StoreError,
    StoreResult, TxnOp, TxnOutcome, WatchStream,
};

use crate::drone_session::AdmitError;
use crate::{ApiError, ManualClock, Scheduler, SchedulerConfig};

/// The embedded store, with puts that fail while `failing` is set (a store member that is
/// briefly unreachable).
struct FlakyStore {
    inner: Arc<EmbeddedStore>,
    failing: AtomicBool,
}

impl FlakyStore {
    fn check(&self) -> StoreResult<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("connection refused".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for FlakyStore {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> StoreResult<Revision> {
        self.check()?;
        self.inner.put(key, value, lease).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> StoreResult<CasOutcome> {
        self.check()?;
        self.inner.compare_and_swap(key, expect, value, lease).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<TxnOutcome> {
        self.check()?;
        self.inner.txn(compares, ops).await
    }
    async fn delete(&self, key: &str) -> StoreResult<bool> {
        self.inner.delete(key).await
    }
    async fn delete_if_revision(&self, key: &str, revision: Revision) -> StoreResult<bool> {
        self.inner.delete_if_revision(key, revision).await
    }
    async fn list(&self, prefix: &str) -> StoreResult<Listing> {
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

fn hello(name: &str) -> Hello {
    Hello {
        drone: name.into(),
        run_id: "r1".into(),
        capacity: Capacity::default(),
        pool: "default".into(),
        runtime: "process".into(),
        inventory: vec![],
        unhealthy: None,
        host: None,
    }
}

#[tokio::test]
async fn a_store_hiccup_during_admission_is_transient_and_a_bad_hello_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FlakyStore {
        inner: EmbeddedStore::open_default(dir.path().join("s.redb"))
            .await
            .unwrap(),
        failing: AtomicBool::new(true),
    });
    let sched = Scheduler::new(
        SchedulerConfig::new("hangar.test", "http://127.0.0.1:1"),
        store.clone(),
        TokenKey::generate(),
        Arc::new(ManualClock::new(1_000_000)),
    );
    let sessions = &sched.handles().sessions;

    let e = sessions.admit(&hello("d1"), false).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("write the drone record") && text.contains("connection refused"),
        "the message names the step and the cause: {text}"
    );
    assert!(matches!(ApiError::from(e), ApiError::Unavailable(_)));
    assert!(sched.handles().drones.get("d1").is_none());

    let e = sessions.admit(&hello("Bad Name"), false).await.unwrap_err();
    assert!(
        matches!(e, AdmitError::Invalid(_)) && !e.is_transient(),
        "{e}"
    );
    assert!(matches!(ApiError::from(e), ApiError::BadRequest(_)));

    // The store is back: the same hello is admitted.
    store.failing.store(false, Ordering::SeqCst);
    sessions.admit(&hello("d1"), false).await.unwrap();
    assert!(sched.handles().drones.get("d1").is_some());
}
