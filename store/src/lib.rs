//! hangar-store: the state store, an etcd-shaped key-value API that every piece of scheduler
//! logic is written against.
//!
//! Keys are strings ordered bytewise; values are bytes. Every write bumps a store-wide
//! revision; each key carries the revision of its creation and of its last modification, and
//! conditional writes compare on them. Leases have a TTL and keys attached to a lease vanish
//! (with a delete event) when it expires or is revoked. Watches deliver every change under a
//! prefix, in revision order, starting from a given revision.
//!
//! Writes that must happen together go through [`Store::txn`], shaped like etcd's `Txn`: a
//! list of [`Compare`]s, then a list of [`TxnOp`]s applied all or nothing at one revision.
//! It is how a record and its index are written without an orphan window, and how a leader
//! fences its writes (every write compares the leader key's creation revision).
//!
//! Implementations: [`embedded::EmbeddedStore`] (redb file, the default) and
//! [`etcd::EtcdStore`] (an etcd cluster shared by several `serve` instances), chosen by a
//! [`StoreLocation`] and opened with [`open`]. Both pass the conformance suite (`conformance`,
//! behind the `conformance` feature so other implementations and tests reuse it, with `testing`,
//! a real etcd cluster of child processes for tests).

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod embedded;
pub mod etcd;
mod location;
pub mod mirror;
#[cfg(any(test, feature = "conformance"))]
pub mod testing;

pub use location::{EMBEDDED_FILE, LocationError, StoreLocation, open};

/// A store revision: increases with every successful write (by one for a put, a delete, a
/// committed [`Store::txn`] however many keys it writes). A lease that expires or is revoked
/// deletes its keys at revisions after the current one, each with its delete event: how many
/// revisions that takes is the implementation's (the embedded store uses one per key, etcd one
/// for all of them).
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

/// A change seen by a watch. The events of one [`Store::txn`] share its revision and arrive in
/// the order of its operations.
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

/// The condition of a compare-and-swap or of one [`Compare`] of a transaction.
///
/// A key that exists has revisions of at least 1, so `ModRevision(0)` and
/// `CreateRevision(0)` never hold. (etcd reports a missing key's revisions as 0; an etcd
/// implementation must spell [`Expect::Absent`] as `create == 0` and must not turn
/// `ModRevision(0)` into `mod == 0`, which would hold on a missing key.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist, whatever its revisions.
    Exists,
    /// The key must exist with exactly this `mod_revision`: nobody wrote it since.
    ModRevision(Revision),
    /// The key must exist with exactly this `create_revision`: it was not deleted and created
    /// again since, whatever was written to it meanwhile. A leader key's creation revision is
    /// the leader's fencing token.
    CreateRevision(Revision),
}

impl Expect {
    /// Whether the condition holds for a key whose current state is `current`.
    pub fn holds(self, current: Option<&KeyValue>) -> bool {
        self.holds_revisions(current.map(|kv| (kv.create_revision, kv.mod_revision)))
    }

    /// [`Expect::holds`] for a key known only by its `(create_revision, mod_revision)`, or
    /// `None` if it does not exist.
    pub fn holds_revisions(self, current: Option<(Revision, Revision)>) -> bool {
        match (self, current) {
            (Expect::Absent, None) | (Expect::Exists, Some(_)) => true,
            (Expect::ModRevision(revision), Some((_, modified))) => modified == revision,
            (Expect::CreateRevision(revision), Some((created, _))) => created == revision,
            _ => false,
        }
    }
}

/// Result of a conditional write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written at this revision.
    Written(Revision),
    /// The condition did not hold; nothing was written. Carries the current value, if any.
    Conflict(Option<KeyValue>),
}

/// The most compares, and separately the most operations, one [`Store::txn`] may carry:
/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

/// The largest request (a put's key and value, or a transaction's keys and values together)
/// a store accepts: etcd's default `--max-request-bytes`, 1.5 MiB. The etcd store refuses
/// larger requests with [`StoreError::RequestTooLarge`]; the embedded store has no such limit.
pub const MAX_REQUEST_BYTES: usize = 3 * 512 * 1024;

/// One condition of a [`Store::txn`]: `expect` must hold for `key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub expect: Expect,
}

impl Compare {
    pub fn new(key: impl Into<String>, expect: Expect) -> Compare {
        Compare {
            key: key.into(),
            expect,
        }
    }

    /// `key` must not exist.
    pub fn absent(key: impl Into<String>) -> Compare {
        Compare::new(key, Expect::Absent)
    }

    /// `key` must exist.
    pub fn exists(key: impl Into<String>) -> Compare {
        Compare::new(key, Expect::Exists)
    }

    /// `key` must exist, last written at `revision`.
    pub fn mod_revision(key: impl Into<String>, revision: Revision) -> Compare {
        Compare::new(key, Expect::ModRevision(revision))
    }

    /// `key` must exist, created at `revision` (the fencing check).
    pub fn create_revision(key: impl Into<String>, revision: Revision) -> Compare {
        Compare::new(key, Expect::CreateRevision(revision))
    }
}

/// One write of a [`Store::txn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    /// As [`Store::put`]: replaces the value and the lease (none included).
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    /// As [`Store::delete`]: deleting a missing key is no error and no event.
    Delete { key: String },
}

impl TxnOp {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: Option<LeaseId>) -> TxnOp {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    pub fn delete(key: impl Into<String>) -> TxnOp {
        TxnOp::Delete { key: key.into() }
    }

    /// The key the operation writes.
    pub fn key(&self) -> &str {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } => key,
        }
    }
}

/// Result of a [`Store::txn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every compare held and every operation was applied, at this revision. If no operation
    /// changed anything (none given, or only deletes of missing keys), the revision did not
    /// move and this is the current one.
    Committed(Revision),
    /// `compares[compare]` is the first compare that did not hold; nothing was written.
    /// `current` is that key's current value (`None` if it does not exist).
    Failed {
        compare: usize,
        current: Option<KeyValue>,
    },
}

/// Checks the parts of a [`Store::txn`] request that do not depend on the store's state: at
/// most [`MAX_TXN_OPS`] compares and operations, and no key written twice. Every
/// implementation calls it before touching anything, so all of them refuse the same requests.
///
/// etcd also refuses a put and a delete of the same key; it allows two deletes of one key,
/// which this refuses too (a request that does it is confused, and refusing is what every
/// implementation can do alike).
pub fn validate_txn(compares: &[Compare], ops: &[TxnOp]) -> StoreResult<()> {
    if compares.len() > MAX_TXN_OPS || ops.len() > MAX_TXN_OPS {
        return Err(StoreError::TxnTooLarge {
            compares: compares.len(),
            ops: ops.len(),
        });
    }
    let mut keys = std::collections::HashSet::with_capacity(ops.len());
    for op in ops {
        if !keys.insert(op.key()) {
            return Err(StoreError::TxnDuplicateKey {
                key: op.key().to_owned(),
            });
        }
    }
    Ok(())
}

/// Result of listing a prefix: the keys and the store revision the listing reflects (start a
/// watch at `revision + 1` to miss nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

/// One page of a listing ([`Store::list_page`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub kvs: Vec<KeyValue>,
    /// The revision the page reflects.
    pub revision: Revision,
    /// Whether keys of the prefix remain after the last one here.
    pub more: bool,
}

/// A stream of watch events. The sender side closes when the store shuts down, the watcher
/// falls too far behind, or the store cannot continue it (etcd compacted the history it would
/// resume from, or stayed unreachable): the watcher should then list again and re-watch.
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
    #[error(
        "transaction has {compares} compares and {ops} operations but at most {max} of each are allowed: split the writes into several transactions",
        max = MAX_TXN_OPS
    )]
    TxnTooLarge { compares: usize, ops: usize },
    #[error(
        "key {key:?} is written more than once in one transaction: write each key at most once per transaction"
    )]
    TxnDuplicateKey { key: String },
    #[error(
        "request of {} exceeds the store's limit of {max} bytes: store less under one key or split the transaction",
        bytes.map_or_else(|| "more bytes".to_owned(), |b| format!("{b} bytes"))
    )]
    RequestTooLarge { bytes: Option<usize>, max: usize },
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// Whether the same call may succeed later: the backend failed (I/O, an unreachable
    /// member) or history was compacted (list again). Configuration and usage errors
    /// (a bad path, an expired lease, an oversized transaction, a closed store) are not.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Backend(_) | StoreError::Compacted { .. })
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The etcd-shaped store API. All scheduler logic uses only this trait; every write that could
/// race is conditional ([`Store::compare_and_swap`], [`Store::delete_if_revision`],
/// [`Store::txn`]).
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

    /// Atomically: if every compare holds, applies every operation; otherwise writes nothing.
    ///
    /// Compares are evaluated in order on the state before the transaction; the first that
    /// does not hold makes it [`TxnOutcome::Failed`] (no write, no revision, no event).
    /// Otherwise the operations are applied in order as one write, as in etcd: the revision
    /// goes up once; every key put gets that `mod_revision` (and `create_revision` if it is
    /// new, version 1); watchers see the events in operation order, all at that revision; a
    /// delete of a missing key is no error and no event. A transaction that changes nothing
    /// (no operations, or only deletes of missing keys) commits at the current revision
    /// without moving it.
    ///
    /// Errors, with nothing written: [`StoreError::TxnTooLarge`] and
    /// [`StoreError::TxnDuplicateKey`] (see [`validate_txn`]) before anything is read, and
    /// [`StoreError::LeaseNotFound`] if a put names a lease that is not live. The lease is only
    /// checked once the compares held: as in etcd (and [`Store::compare_and_swap`]), a failed
    /// compare wins over a bad lease.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<TxnOutcome>;

    /// Unconditional delete; returns whether the key existed.
    async fn delete(&self, key: &str) -> StoreResult<bool>;

    /// Deletes only if the key's `mod_revision` equals `revision`; returns whether it did.
    async fn delete_if_revision(&self, key: &str, revision: Revision) -> StoreResult<bool>;

    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> StoreResult<Listing>;

    /// At most `limit` (at least 1) keys starting with `prefix` and after `start_after` (from
    /// the first with `None`), in key order, as of revision `at` (the current one with `None`):
    /// a listing too large for one request, read page by page at the first page's revision.
    /// Fails with [`StoreError::Compacted`] once `at` is no longer readable (etcd compacted
    /// it; the embedded store, which keeps no history, has moved past it).
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        at: Option<Revision>,
    ) -> StoreResult<Page>;

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
