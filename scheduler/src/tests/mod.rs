//! Tests that drive a whole [`crate::Scheduler`] (real embedded store, hand-moved or paused
//! clock) through its components. They sit above the composition root, so no component
//! module imports the scheduler.

mod admission;
mod auth;
mod connect;
mod cost;
mod forward;
mod layers;
mod leader;
mod lease_expiry;
mod logs;
mod monitor;
mod pools;
mod races;
mod relay;
mod session;
mod ui;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hangar_core::drone::{Capacity, Hello};
use hangar_core::token::TokenKey;
use hangar_store::embedded::EmbeddedStore;
use hangar_store::{
    CasOutcome, Compare, Expect, KeyValue, LeaseId, Listing, Page, Revision, Store, StoreError,
    StoreResult, TxnOp, TxnOutcome, WatchStream,
};
use tokio_util::sync::CancellationToken;

use crate::records::BACKENDS_PREFIX;
use crate::{ManualClock, Scheduler, SchedulerConfig};

/// A started scheduler on a fresh embedded store and a hand-moved clock; stop it with
/// [`Fixture::stop`].
struct Fixture {
    sched: Scheduler,
    store: Arc<EmbeddedStore>,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// `configure` adjusts a test configuration whose default spawn runs `true`.
    async fn start(configure: impl FnOnce(&mut SchedulerConfig)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_default(dir.path().join("s.redb"))
            .await
            .unwrap();
        let mut cfg = SchedulerConfig::new("hangar.test", "http://127.0.0.1:1");
        cfg.defaults.command = Some(vec!["true".into()]);
        configure(&mut cfg);
        let sched = Scheduler::new(
            cfg,
            store.clone(),
            TokenKey::generate(),
            Arc::new(ManualClock::new(1_000_000)),
        );
        let cancel = CancellationToken::new();
        sched.start(cancel.clone()).await.unwrap();
        Fixture {
            sched,
            store,
            cancel,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.sched.wait().await;
    }
}

/// A connect for key `name` in the default namespace.
fn key(name: &str) -> hangar_core::api::ConnectRequest {
    hangar_core::api::ConnectRequest {
        key: Some(hangar_core::KeyRef::new("default", name)),
        ..Default::default()
    }
}

/// A process drone's hello with room for many backends.
fn hello(drone: &str, run: &str) -> Hello {
    Hello {
        drone: drone.into(),
        run_id: run.into(),
        capacity: Capacity {
            cpu_millis: 100_000,
            memory_mb: 100_000,
            max_backends: 1000,
        },
        pool: "default".into(),
        runtime: "process".into(),
        inventory: vec![],
        unhealthy: None,
        host: None,
    }
}

/// The embedded store, with puts that fail while `failing` is set (a store member that is
/// briefly unreachable), lease renewals that hang while `hang_keep_alives` is set, and
/// counters of the reads and deletes of backend records.
struct TestStore {
    inner: Arc<EmbeddedStore>,
    failing: AtomicBool,
    /// Lease renewals never answer while set.
    hang_keep_alives: AtomicBool,
    backend_lists: AtomicUsize,
    backend_gets: AtomicUsize,
    /// Backend records written by transactions (as every state change is).
    backend_puts: AtomicUsize,
    deletes: AtomicUsize,
}

impl TestStore {
    /// A fresh embedded store in `dir`, healthy and with every counter at zero.
    async fn open(dir: &std::path::Path) -> Arc<Self> {
        Self::open_with(dir, hangar_store::embedded::EmbeddedOptions::default()).await
    }

    /// [`TestStore::open`] with the embedded store's `options`.
    async fn open_with(
        dir: &std::path::Path,
        options: hangar_store::embedded::EmbeddedOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: EmbeddedStore::open_with(
                dir.join("s.redb"),
                Arc::new(hangar_store::embedded::TokioClock),
                options,
            )
            .await
            .unwrap(),
            failing: AtomicBool::new(false),
            hang_keep_alives: AtomicBool::new(false),
            backend_lists: AtomicUsize::new(0),
            backend_gets: AtomicUsize::new(0),
            backend_puts: AtomicUsize::new(0),
            deletes: AtomicUsize::new(0),
        })
    }

    fn check(&self) -> StoreResult<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::Backend("connection refused".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for TestStore {
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
        let deletes = ops
            .iter()
            .filter(|op| matches!(op, TxnOp::Delete { .. }))
            .count();
        self.deletes.fetch_add(deletes, Ordering::SeqCst);
        let puts = ops
            .iter()
            .filter(|op| matches!(op, TxnOp::Put { key, .. } if key.starts_with(BACKENDS_PREFIX)))
            .count();
        self.backend_puts.fetch_add(puts, Ordering::SeqCst);
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
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        at: Option<Revision>,
    ) -> StoreResult<Page> {
        if prefix.starts_with(BACKENDS_PREFIX) {
            self.backend_lists.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.list_page(prefix, start_after, limit, at).await
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
        if self.hang_keep_alives.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.lease_keep_alive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        self.inner.lease_revoke(lease).await
    }
}
