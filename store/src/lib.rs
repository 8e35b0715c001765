//! hangar-store: the state store, an etcd-shaped key-value API that every piece of scheduler
//! logic is written against.
//!
//! Keys are strings ordered bytewise; values are bytes. Every write bumps a store-wide
//! revision; each key carries the revision of its creation and of its last modification, and
//! conditional writes compare on the latter. Leases have a TTL and keys attached to a lease
//! vanish (with a delete event) when it expires or is revoked. Watches deliver every change
//! under a prefix, in revision order, starting from a given revision.
//!
//! Implementations: [`embedded::EmbeddedStore`] (redb file, the default). An etcd-backed
//! implementation comes with multi-instance `serve`. Both must pass the conformance suite
//! (`conformance`, behind the `conformance` feature so other implementations and tests reuse
//! it).

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod embedded;
pub mod mirror;

/// A store revision: increases by one with every successful write (put, delete, lease expiry
/// deleting keys counts once per deleted key).
pub type Revision = u64;

/// A lease id (non-zero).
pub type LeaseId = u64;

/// One stored key with its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision at which the key was (last) created.
    pub create_revision: Revision,
    /// Revision of the last write to the key: what compare-and-swap compares.
    pub mod_revision: Revision,
    /// Number of writes since creation (1 after creation).
    pub version: u64,
    pub lease: Option<LeaseId>,
}

/// A change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    /// The key was deleted (explicitly or by lease expiry) at `revision`; `prev` is the value
    /// it had.
    Delete {
        key: String,
        revision: Revision,
        prev: Option<KeyValue>,
    },
}

impl WatchEvent {
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

/// The condition of a compare-and-swap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist with exactly this `mod_revision`.
    ModRevision(Revision),
}

/// Result of a conditional write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written at this revision.
    Written(Revision),
    /// The condition did not hold; nothing was written. Carries the current value, if any.
    Conflict(Option<KeyValue>),
}

/// Result of listing a prefix: the keys and the store revision the listing reflects (start a
/// watch at `revision + 1` to miss nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

/// A stream of watch events. The sender side closes when the store shuts down or the watcher
/// falls too far behind (the watcher should then list again and re-watch).
pub type WatchStream = mpsc::Receiver<WatchEvent>;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("store backend failed: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error(
        "revision {requested} has been compacted (oldest available is {oldest}): list again and watch from the listing's revision"
    )]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("store is closed")]
    Closed,
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The etcd-shaped store API. All scheduler logic uses only this trait; every write that could
/// race is conditional ([`Store::compare_and_swap`], [`Store::delete_if_revision`]).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The current value of `key`.
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>>;

    /// Unconditional write. Attaching a lease that does not exist is an error.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>)
    -> StoreResult<Revision>;

    /// Writes only if `expect` holds for the key's current state.
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> StoreResult<CasOutcome>;

    /// Unconditional delete; returns whether the key existed.
    async fn delete(&self, key: &str) -> StoreResult<bool>;

    /// Deletes only if the key's `mod_revision` equals `revision`; returns whether it did.
    async fn delete_if_revision(&self, key: &str, revision: Revision) -> StoreResult<bool>;

    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> StoreResult<Listing>;

    /// Changes under `prefix` with revision ≥ `from` (use `listing.revision + 1`), then live.
    /// Fails with [`StoreError::Compacted`] if history before `from` is no longer kept.
    async fn watch(&self, prefix: &str, from: Revision) -> StoreResult<WatchStream>;

    /// The current store revision.
    async fn revision(&self) -> StoreResult<Revision>;

    /// A new lease that expires `ttl` after its grant or last keep-alive.
    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId>;

    /// Renews a live lease; fails with [`StoreError::LeaseNotFound`] once it has expired.
    async fn lease_keep_alive(&self, lease: LeaseId) -> StoreResult<()>;

    /// Ends a lease now, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()>;
}
