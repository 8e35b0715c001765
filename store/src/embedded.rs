//! [`EmbeddedStore`]: the single-node [`Store`] backed by one redb file.
//!
//! Durable state (keys with their metadata, the store revision, leases with their TTL, the
//! lease id counter) lives in redb and every mutation is one write transaction that also
//! bumps the revision, so a crash can never separate a write from its revision. A
//! [`Store::txn`] is one redb write transaction too, its writes all at one revision. What does
//! not need to survive a restart lives in memory: lease deadlines (a restarted store gives
//! every lease a fresh full TTL, as etcd does), the ring of recent watch events, and the
//! watchers.
//!
//! One revision may carry several events (a transaction's). The history ring only ever holds
//! whole revisions, so a watch from a revision gets all of its events or fails as compacted,
//! and a watcher is handed all of a commit's events or, if they do not fit its buffer, none
//! (its stream closes).
//!
//! Group commit: every write is queued, and one combiner (a blocking thread, started by the
//! write that finds none running) takes everything queued and runs it, in queue order, in one
//! redb transaction with one fsync, then takes what queued meanwhile, until the queue is
//! empty. Each write keeps revisions of its own, sees the writes queued before it, and learns
//! its outcome only once its batch is durable. A write that fails a check (a compare, a dead
//! lease) writes nothing and fails alone; a write that fails after writing (an I/O error)
//! aborts the whole batch, and every write in it gets the error. Lease checks inside a batch
//! see the lease changes of the writes before them (a revoke, a key attached), which reach
//! memory only after the commit.
//!
//! Locking: `writer` serialises write transactions together with the in-memory bookkeeping
//! that must follow their commit in revision order. It spans an fsync, so it is only ever
//! taken on blocking threads ([`tokio::task::spawn_blocking`]). `state` guards the in-memory
//! part and is never held across I/O, so async code may take it briefly; `queue` is held only
//! to push or take writes, never while taking another lock. Lock order is `writer` then `state`.
//!
//! Lease expiry happens in a background sweeper task owned by the store (aborted when the
//! store is dropped) that sleeps on tokio time until the next deadline, and lazily on every
//! operation, so an expired lease is never observable even if the sweeper is late.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::{
    CasOutcome, Compare, Expect, KeyValue, LeaseId, Listing, Page, Revision, Store, StoreError,
    StoreResult, TxnOp, TxnOutcome, WatchEvent, WatchStream, validate_txn,
};

/// Key → encoded record (see [`encode`]).
const KV: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("kv");
/// Store-wide counters.
const META: TableDefinition<'static, &str, u64> = TableDefinition::new("meta");
/// Lease id → TTL in nanoseconds.
const LEASES: TableDefinition<'static, u64, u64> = TableDefinition::new("leases");

const META_REVISION: &str = "revision";
const META_NEXT_LEASE: &str = "next_lease";

/// Record layout version, so a future layout change can be detected rather than misread.
const RECORD_FORMAT: u8 = 1;
/// Format byte + create revision + mod revision + version + lease (0 = none).
const RECORD_HEADER: usize = 1 + 8 * 4;

/// How long the sweeper waits before retrying after a failed expiry, so a persistent backend
/// failure does not turn into a hot loop.
const SWEEP_RETRY: Duration = Duration::from_secs(1);

/// The time source lease deadlines are measured on.
///
/// It returns tokio's [`Instant`] because the background sweeper sleeps on tokio time: with
/// [`TokioClock`], tests can drive expiry with `tokio::time::pause`/`advance`. Another clock
/// still works (every operation checks deadlines against it), but the sweeper only wakes when
/// tokio time says a deadline should have passed.
pub trait LeaseClock: Send + Sync + 'static {
    fn now(&self) -> Instant;
}

/// The default clock: `tokio::time::Instant::now()`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

impl LeaseClock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Tuning knobs of [`EmbeddedStore`].
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// How many recent events are kept for watches that start in the past; a watch from an
    /// older revision fails with [`StoreError::Compacted`].
    pub history_capacity: usize,
    /// Per-watcher channel capacity beyond the replayed history. A watcher that falls this far
    /// behind has its stream closed instead of blocking writers.
    pub watch_buffer: usize,
    /// Commit every queued write in one transaction (one fsync) rather than one transaction
    /// per write. On by default; off only to measure what it saves.
    pub group_commit: bool,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            history_capacity: 10_000,
            watch_buffer: 1024,
            group_commit: true,
        }
    }
}

/// A stored record that cannot be decoded.
#[derive(Debug, thiserror::Error)]
#[error("corrupt record for key {key:?}")]
struct CorruptRecord {
    key: String,
}

/// A lock whose holder panicked: the in-memory state may be inconsistent with the file.
#[derive(Debug, thiserror::Error)]
#[error("store state lock poisoned by an earlier panic")]
struct Poisoned;

/// The persisted lease id counter reached `u64::MAX`.
#[derive(Debug, thiserror::Error)]
#[error("lease ids exhausted")]
struct LeaseIdsExhausted;

/// A replayed event did not fit a channel sized for it (a bug, not a runtime condition).
#[derive(Debug, thiserror::Error)]
#[error("watch channel too small for replayed history")]
struct ReplayOverflow;

/// A queued write was dropped without an outcome (its batch's thread panicked).
#[derive(Debug, thiserror::Error)]
#[error("store write lost: its batch did not complete")]
struct BatchDropped;

/// The batch a write was committed with failed; the message is the batch's error.
#[derive(Debug, thiserror::Error)]
#[error("store write batch failed: {0}")]
struct BatchFailed(String);

/// Writes waiting for the combiner.
#[derive(Default)]
struct WriteQueue {
    jobs: Vec<Job>,
    /// A combiner is running and will take every job queued before it sees the queue empty.
    combining: bool,
}

/// Fails the queued writes when the combiner stops without emptying the queue.
struct CombinerStop<'a> {
    shared: &'a Shared,
    reason: &'static str,
}

impl Drop for CombinerStop<'_> {
    fn drop(&mut self) {
        let jobs = {
            let mut queue = self.shared.lock_queue();
            queue.combining = false;
            std::mem::take(&mut queue.jobs)
        };
        for job in jobs {
            job.fail(self.reason);
        }
    }
}

/// Tells a queued write its outcome once its batch is settled: `Some(error)` if the batch
/// failed, whatever the write itself returned.
type Completion = Box<dyn FnOnce(Option<&str>) + Send>;

/// One queued write: the operation and where its outcome goes.
type Job = Box<dyn QueuedWrite>;

trait QueuedWrite: Send {
    /// Runs the write in the batch's transaction. Returns how to tell the caller its outcome
    /// once the batch is settled, and an error if the write failed after changing the
    /// transaction (which spoils the whole batch).
    fn run(self: Box<Self>, shared: &Shared, txn: &mut Txn) -> (Completion, Option<String>);
    /// Fails the write without running it: the batch could not begin.
    fn fail(self: Box<Self>, error: &str);
}

struct Write<T, F> {
    op: F,
    done: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> QueuedWrite for Write<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Shared, &mut Txn) -> StoreResult<T> + Send + 'static,
{
    fn run(self: Box<Self>, shared: &Shared, txn: &mut Txn) -> (Completion, Option<String>) {
        let Write { op, done } = *self;
        let before = txn.mark();
        let out = op(shared, txn);
        txn.end_write();
        // Every check comes before the first write, so a write that failed having changed
        // nothing leaves the batch intact; one that changed something failed on I/O, and its
        // changes cannot be taken out of the transaction alone.
        let spoiled = match &out {
            Err(error) if txn.mark() != before => Some(error.to_string()),
            _ => None,
        };
        let complete: Completion = Box::new(move |failure| {
            let out = match failure {
                Some(failure) => Err(backend_error(BatchFailed(failure.to_owned()))),
                None => out,
            };
            // The caller may have stopped waiting; the outcome stands regardless.
            let _ = done.send(out);
        });
        (complete, spoiled)
    }

    fn fail(self: Box<Self>, error: &str) {
        let _ = self
            .done
            .send(Err(backend_error(BatchFailed(error.to_owned()))));
    }
}

fn backend_error(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Backend(Box::new(e))
}

/// Maps any redb error into [`StoreError::Backend`].
trait OrBackend<T> {
    fn backend(self) -> StoreResult<T>;
}

impl<T, E: Into<redb::Error>> OrBackend<T> for Result<T, E> {
    fn backend(self) -> StoreResult<T> {
        self.map_err(|e| backend_error(e.into()))
    }
}

/// The redb store. Cheap to share behind the `Arc` that [`EmbeddedStore::open`] returns;
/// dropping the last reference stops the lease sweeper, closes every watch stream and releases
/// the file.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    sweeper: tokio::task::AbortHandle,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // The sweeper holds only a weak reference, so aborting it is all that is needed for
        // the database (and with it the file lock) to go away with `shared`.
        self.sweeper.abort();
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store at `path` with the tokio clock and default
    /// options.
    pub async fn open_default(path: impl AsRef<Path>) -> StoreResult<Arc<EmbeddedStore>> {
        Self::open(path, Arc::new(TokioClock)).await
    }

    /// Opens (creating if needed) the store at `path`, measuring leases on `clock`.
    pub async fn open(
        path: impl AsRef<Path>,
        clock: Arc<dyn LeaseClock>,
    ) -> StoreResult<Arc<EmbeddedStore>> {
        Self::open_with(path, clock, EmbeddedOptions::default()).await
    }

    /// Opens (creating if needed) the store at `path` with explicit options. Must be called
    /// within a tokio runtime: it spawns the lease sweeper.
    pub async fn open_with(
        path: impl AsRef<Path>,
        clock: Arc<dyn LeaseClock>,
        options: EmbeddedOptions,
    ) -> StoreResult<Arc<EmbeddedStore>> {
        let path = path.as_ref().to_path_buf();
        let shared = tokio::task::spawn_blocking(move || Shared::load(path, clock, options))
            .await
            .map_err(backend_error)??;
        let shared = Arc::new(shared);
        let sweeper = tokio::spawn(sweep(Arc::downgrade(&shared), shared.wake.clone()));
        Ok(Arc::new(EmbeddedStore {
            shared,
            sweeper: sweeper.abort_handle(),
        }))
    }

    /// The file backing this store.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Runs `f` on a blocking thread: redb transactions do file I/O (and fsync on commit).
    async fn blocking<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> StoreResult<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(backend_error)?
    }

    /// Queues `op` for the next batch, starting the combiner if none runs, and waits until the
    /// batch holding it is committed (see [`Shared::combine`]).
    async fn write<T, F>(&self, op: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared, &mut Txn) -> StoreResult<T> + Send + 'static,
    {
        let (done, outcome) = oneshot::channel();
        if self.shared.enqueue(Box::new(Write { op, done })) {
            let shared = self.shared.clone();
            // Not awaited: the combiner outlives this write if more keep coming, and ends
            // when the queue is empty. Each write waits for its own outcome.
            drop(tokio::task::spawn_blocking(move || Shared::combine(shared)));
        }
        outcome.await.map_err(|_| backend_error(BatchDropped))?
    }

    /// How many write transactions (each one fsync) have been committed since open: with
    /// group commit, fewer than the writes.
    pub fn commits(&self) -> u64 {
        self.shared
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many writes wait for a batch (for tests of group commit).
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.shared.lock_queue().jobs.len()
    }

    /// Holds the writer lock so tests can queue several writes into one batch.
    #[cfg(test)]
    pub(crate) fn hold_writer(&self) -> MutexGuard<'_, ()> {
        self.shared.writer.lock().unwrap()
    }

    /// How many watchers are registered (for tests of watcher cleanup).
    #[cfg(test)]
    pub(crate) fn watcher_count(&self) -> usize {
        self.shared
            .lock_state()
            .map(|state| state.watchers.len())
            .unwrap_or(0)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        // One key from a read snapshot is a lookup in redb's page cache, shorter than handing
        // it to a blocking thread and waking this task again (which cost more than the read
        // under load). Only when a lease is due does the read first take the writer lock and
        // write the expiry, which must not happen on an async thread.
        if !self.shared.any_due()? {
            let snapshot = self.shared.db.begin_read().backend()?;
            return read_one(&snapshot, key);
        }
        let key = key.to_owned();
        self.blocking(move |shared| read_one(&shared.snapshot()?, &key))
            .await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> StoreResult<Revision> {
        let key = key.to_owned();
        self.write(move |shared, txn| {
            shared.check_lease(txn, lease)?;
            txn.put(&key, value, lease)
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> StoreResult<CasOutcome> {
        let key = key.to_owned();
        self.write(move |shared, txn| {
            // As in an etcd transaction, a failed comparison never evaluates the write, so a
            // conflict wins over a bad lease.
            if let Err(current) = txn.check(&key, expect)? {
                return Ok(CasOutcome::Conflict(current));
            }
            shared.check_lease(txn, lease)?;
            Ok(CasOutcome::Written(txn.put(&key, value, lease)?))
        })
        .await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<TxnOutcome> {
        validate_txn(&compares, &ops)?;
        self.write(move |shared, txn| {
            // Due leases were expired just before this transaction began, so the compares see
            // their keys as gone.
            for (index, compare) in compares.iter().enumerate() {
                if let Err(current) = txn.check(&compare.key, compare.expect)? {
                    return Ok(TxnOutcome::Failed {
                        compare: index,
                        current,
                    });
                }
            }
            // Every lease before the first write. A failure later would still write nothing
            // (the redb transaction is dropped uncommitted), but checking first keeps that
            // from depending on it.
            for op in &ops {
                if let TxnOp::Put { lease, .. } = op {
                    shared.check_lease(txn, *lease)?;
                }
            }
            txn.one_revision();
            for op in ops {
                match op {
                    TxnOp::Put { key, value, lease } => {
                        txn.put(&key, value, lease)?;
                    }
                    TxnOp::Delete { key } => {
                        txn.delete(&key)?;
                    }
                }
            }
            // The revision of the writes, or the current one if nothing changed.
            Ok(TxnOutcome::Committed(txn.revision))
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        let key = key.to_owned();
        self.write(move |_, txn| txn.delete(&key)).await
    }

    async fn delete_if_revision(&self, key: &str, revision: Revision) -> StoreResult<bool> {
        let key = key.to_owned();
        self.write(move |_, txn| match txn.get(&key)? {
            Some(kv) if kv.mod_revision == revision => txn.delete(&key),
            _ => Ok(false),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> StoreResult<Listing> {
        let prefix = prefix.to_owned();
        self.blocking(move |shared| {
            // One snapshot for both, so the revision is exactly the one the keys reflect.
            let snapshot = shared.snapshot()?;
            let revision = read_revision(&snapshot)?;
            let table = snapshot.open_table(KV).backend()?;
            let mut kvs = Vec::new();
            for entry in table.range::<&str>(prefix.as_str()..).backend()? {
                let (key, value) = entry.backend()?;
                let key = key.value();
                // Keys are ordered bytewise, so the prefix's keys are one contiguous run.
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                kvs.push(decode(key, value.value())?);
            }
            Ok(Listing { kvs, revision })
        })
        .await
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        at: Option<Revision>,
    ) -> StoreResult<Page> {
        let prefix = prefix.to_owned();
        let start_after = start_after.map(str::to_owned);
        let limit = limit.max(1);
        self.blocking(move |shared| {
            let snapshot = shared.snapshot()?;
            let revision = read_revision(&snapshot)?;
            if let Some(at) = at
                && at != revision
            {
                // No history is kept: only the current revision can be read.
                return Err(StoreError::Compacted {
                    requested: at,
                    oldest: revision,
                });
            }
            let table = snapshot.open_table(KV).backend()?;
            let from = match start_after.as_deref() {
                Some(after) if after > prefix.as_str() => after,
                _ => prefix.as_str(),
            };
            let mut kvs = Vec::new();
            let mut more = false;
            for entry in table.range::<&str>(from..).backend()? {
                let (key, value) = entry.backend()?;
                let key = key.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                if start_after.as_deref() == Some(key) {
                    continue;
                }
                if kvs.len() == limit {
                    more = true;
                    break;
                }
                kvs.push(decode(key, value.value())?);
            }
            Ok(Page {
                kvs,
                revision,
                more,
            })
        })
        .await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> StoreResult<WatchStream> {
        self.shared.register_watch(prefix, from)
    }

    async fn revision(&self) -> StoreResult<Revision> {
        self.blocking(|shared| read_revision(&shared.snapshot()?))
            .await
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let id = self.write(move |_, txn| txn.grant(ttl)).await?;
        // The new deadline may be earlier than the one the sweeper is sleeping towards.
        self.shared.wake.notify_one();
        Ok(id)
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> StoreResult<()> {
        // Deadlines are in-memory only, so a renewal needs no transaction.
        match self.shared.renew(lease)? {
            Renewal::Renewed => Ok(()),
            Renewal::Unknown => Err(StoreError::LeaseNotFound(lease)),
            Renewal::Expired => {
                // Delete its keys now rather than when the sweeper gets to it, so a caller
                // told "expired" never still sees them.
                self.blocking(|shared| shared.expire_due()).await?;
                Err(StoreError::LeaseNotFound(lease))
            }
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        self.write(move |shared, txn| {
            let keys = shared
                .lease_keys(txn, lease)?
                .ok_or(StoreError::LeaseNotFound(lease))?;
            txn.remove_lease(lease, keys)
        })
        .await?;
        self.shared.wake.notify_one();
        Ok(())
    }
}

/// Everything the store and its sweeper share.
struct Shared {
    db: Database,
    path: PathBuf,
    clock: Arc<dyn LeaseClock>,
    options: EmbeddedOptions,
    /// Serialises write transactions and the bookkeeping after their commit. Blocking threads
    /// only: it is held across fsync.
    writer: Mutex<()>,
    /// Writes waiting for the next batch, oldest first.
    queue: Mutex<WriteQueue>,
    /// Committed redb write transactions (each one fsync).
    commits: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
    /// Wakes the sweeper when deadlines change. `notify_one` stores a permit, so a change made
    /// while the sweeper is busy is not lost.
    wake: Arc<Notify>,
}

/// The in-memory part of the store.
struct State {
    /// Last revision whose events have been published.
    revision: Revision,
    leases: HashMap<LeaseId, LeaseEntry>,
    /// No lease's deadline is before this (`None`: no lease). A lower bound, not the minimum:
    /// renewals only move deadlines later and are not tracked here, so checking whether any
    /// lease is due (on every read) costs a comparison, not a scan; a scan that finds nothing
    /// due sets it to the true minimum again.
    earliest: Option<Instant>,
    /// Recent events, oldest first.
    history: VecDeque<WatchEvent>,
    /// The oldest revision a watch may start from: every event from here on is in `history`.
    history_start: Revision,
    watchers: Vec<Watcher>,
}

struct LeaseEntry {
    ttl: Duration,
    deadline: Instant,
    /// Keys currently attached, so expiry need not scan the whole table.
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    /// Events below this revision are not for this watcher (it asked to start later).
    from: Revision,
    tx: mpsc::Sender<WatchEvent>,
}

enum Renewal {
    Renewed,
    Expired,
    Unknown,
}

/// In-memory consequences of a committed transaction, applied in order after the commit.
enum LeaseChange {
    Grant(LeaseId, Duration),
    Remove(LeaseId),
    Attach(LeaseId, String),
    Detach(LeaseId, String),
}

struct Committed {
    revision: Revision,
    events: Vec<WatchEvent>,
    changes: Vec<LeaseChange>,
}

impl Shared {
    fn load(
        path: PathBuf,
        clock: Arc<dyn LeaseClock>,
        options: EmbeddedOptions,
    ) -> StoreResult<Shared> {
        let open_error = |e: redb::Error| StoreError::Open {
            path: path.display().to_string(),
            source: Box::new(e),
        };
        let db = Database::create(&path).map_err(|e| open_error(e.into()))?;
        Self::init_tables(&db).map_err(open_error)?;

        let snapshot = db.begin_read().backend()?;
        let revision = read_revision(&snapshot)?;
        // A restarted store cannot know how much of a lease's TTL had elapsed, so each lease
        // gets a full TTL from now (etcd does the same).
        let now = clock.now();
        let mut leases = HashMap::new();
        for entry in snapshot.open_table(LEASES).backend()?.iter().backend()? {
            let (id, ttl) = entry.backend()?;
            let ttl = Duration::from_nanos(ttl.value());
            leases.insert(
                id.value(),
                LeaseEntry {
                    ttl,
                    deadline: deadline_after(now, ttl),
                    keys: BTreeSet::new(),
                },
            );
        }
        for entry in snapshot.open_table(KV).backend()?.iter().backend()? {
            let (key, value) = entry.backend()?;
            let key = key.value();
            let Some(lease) = decode_header(key, value.value())?.lease else {
                continue;
            };
            match leases.get_mut(&lease) {
                Some(entry) => {
                    entry.keys.insert(key.to_owned());
                }
                // Keys and leases are written in the same transactions, so this means a
                // damaged file; keep the key rather than guess.
                None => tracing::warn!(key, lease, "stored key refers to an unknown lease"),
            }
        }
        drop(snapshot);
        let earliest = earliest_deadline(&leases);

        Ok(Shared {
            db,
            path,
            clock,
            options,
            writer: Mutex::new(()),
            queue: Mutex::new(WriteQueue::default()),
            commits: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(State {
                revision,
                leases,
                earliest,
                history: VecDeque::new(),
                // History is not persisted: only watches from the next revision can be served.
                history_start: revision + 1,
                watchers: Vec::new(),
            }),
            wake: Arc::new(Notify::new()),
        })
    }

    /// Creates the tables on first open, so read transactions can always open them.
    fn init_tables(db: &Database) -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        txn.open_table(KV)?;
        txn.open_table(META)?;
        txn.open_table(LEASES)?;
        txn.commit()?;
        Ok(())
    }

    fn lock_state(&self) -> StoreResult<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| backend_error(Poisoned))
    }

    fn lock_writer(&self) -> StoreResult<MutexGuard<'_, ()>> {
        self.writer.lock().map_err(|_| backend_error(Poisoned))
    }

    /// The queue holds no invariant a panic could break, so a poisoned lock is still usable.
    fn lock_queue(&self) -> MutexGuard<'_, WriteQueue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a write; true if the caller must start the combiner (none is running).
    fn enqueue(&self, job: Job) -> bool {
        let mut queue = self.lock_queue();
        queue.jobs.push(job);
        !std::mem::replace(&mut queue.combining, true)
    }

    /// The combiner: commits batches until the queue is empty, taking the writer lock for each
    /// (so the lease sweeper and readers expiring leases get in between). If it stops early
    /// (a poisoned writer lock, a panic), the writes left in the queue fail rather than wait
    /// for a combiner that will never come. It lets go of the store before it tells the last
    /// batch's writers their outcome, so a caller that drops the store after its last write
    /// has returned finds the file released.
    fn combine(self: Arc<Self>) {
        loop {
            let mut stop = CombinerStop {
                shared: &self,
                reason: "store writer stopped unexpectedly",
            };
            let Ok(writer) = self.lock_writer() else {
                stop.reason = "store writer lock poisoned by an earlier panic";
                return;
            };
            let jobs = {
                let mut queue = self.lock_queue();
                if self.options.group_commit {
                    std::mem::take(&mut queue.jobs)
                } else if queue.jobs.is_empty() {
                    Vec::new()
                } else {
                    vec![queue.jobs.remove(0)]
                }
            };
            let (completions, failure) = self.commit_batch(jobs);
            drop(writer);
            let last = {
                let mut queue = self.lock_queue();
                let last = queue.jobs.is_empty();
                if last {
                    queue.combining = false;
                }
                last
            };
            std::mem::forget(stop);
            if last {
                drop(self);
                for complete in completions {
                    complete(failure.as_deref());
                }
                return;
            }
            for complete in completions {
                complete(failure.as_deref());
            }
        }
    }

    /// Runs `jobs` in one transaction. Caller holds the writer lock. Returns how to tell each
    /// its outcome, and the batch's failure if it failed.
    fn commit_batch(&self, jobs: Vec<Job>) -> (Vec<Completion>, Option<String>) {
        let mut txn = match self.expire_due_locked().and_then(|()| Txn::begin(&self.db)) {
            Ok(txn) => txn,
            Err(error) => {
                let error = error.to_string();
                for job in jobs {
                    job.fail(&error);
                }
                return (Vec::new(), None);
            }
        };
        let writes = jobs.len();
        let mut completions = Vec::with_capacity(writes);
        let mut failure = None;
        let mut jobs = jobs.into_iter();
        for job in jobs.by_ref() {
            let (complete, spoiled) = job.run(self, &mut txn);
            completions.push(complete);
            if spoiled.is_some() {
                failure = spoiled;
                break;
            }
        }
        if let Some(error) = &failure {
            // The writes after the spoiling one never run.
            for job in jobs {
                job.fail(error);
            }
            txn.abort();
        } else {
            match txn.commit() {
                Ok(Some(committed)) => {
                    self.commits
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Err(error) = self.apply(committed) {
                        failure = Some(error.to_string());
                    }
                }
                Ok(None) => {}
                Err(error) => failure = Some(error.to_string()),
            }
        }
        if let Some(error) = &failure {
            tracing::warn!(%error, writes, "store write batch failed");
        }
        (completions, failure)
    }

    /// A read snapshot that reflects every lease expiry due by now.
    fn snapshot(&self) -> StoreResult<ReadTransaction> {
        if self.any_due()? {
            let _writer = self.lock_writer()?;
            self.expire_due_locked()?;
        }
        self.db.begin_read().backend()
    }

    /// Expires due leases (blocking; takes the writer lock).
    fn expire_due(&self) -> StoreResult<()> {
        let _writer = self.lock_writer()?;
        self.expire_due_locked()
    }

    /// Deletes the keys of every lease past its deadline and the leases themselves, one delete
    /// event (and revision) per key. Caller holds the writer lock.
    fn expire_due_locked(&self) -> StoreResult<()> {
        let now = self.clock.now();
        let mut due: Vec<(LeaseId, Vec<String>)> = {
            let state = self.lock_state()?;
            state
                .leases
                .iter()
                .filter(|(_, lease)| lease.deadline <= now)
                .map(|(id, lease)| (*id, lease.keys.iter().cloned().collect()))
                .collect()
        };
        if !due.is_empty() {
            // Deterministic event order across leases.
            due.sort_by_key(|(id, _)| *id);
            let mut txn = Txn::begin(&self.db)?;
            for (id, keys) in due {
                tracing::debug!(lease = id, keys = keys.len(), "lease expired");
                txn.remove_lease(id, keys)?;
            }
            if let Some(committed) = txn.commit()? {
                self.apply(committed)?;
            }
        }
        // Renewals since the last scan moved deadlines later: the bound is exact again.
        let mut state = self.lock_state()?;
        state.earliest = earliest_deadline(&state.leases);
        Ok(())
    }

    /// Whether a lease may be due (see [`State::earliest`]).
    fn any_due(&self) -> StoreResult<bool> {
        let now = self.clock.now();
        let state = self.lock_state()?;
        Ok(state.earliest.is_some_and(|at| at <= now))
    }

    /// No lease is due before this.
    fn next_deadline(&self) -> StoreResult<Option<Instant>> {
        Ok(self.lock_state()?.earliest)
    }

    /// Fails unless `lease` (if any) is live, counting the lease changes `txn` has made so far
    /// (an earlier write of the same batch may have revoked it).
    fn check_lease(&self, txn: &Txn, lease: Option<LeaseId>) -> StoreResult<()> {
        let Some(id) = lease else {
            return Ok(());
        };
        match txn.lease_fate(id) {
            Some(true) => return Ok(()),
            Some(false) => return Err(StoreError::LeaseNotFound(id)),
            None => {}
        }
        let now = self.clock.now();
        let state = self.lock_state()?;
        match state.leases.get(&id) {
            Some(entry) if entry.deadline > now => Ok(()),
            _ => Err(StoreError::LeaseNotFound(id)),
        }
    }

    /// The keys attached to lease `id`, counting the keys `txn` has attached and detached so
    /// far; `None` if there is no such lease.
    fn lease_keys(&self, txn: &Txn, id: LeaseId) -> StoreResult<Option<Vec<String>>> {
        let mut keys = {
            let state = self.lock_state()?;
            state.leases.get(&id).map(|lease| lease.keys.clone())
        };
        for change in &txn.changes {
            match change {
                LeaseChange::Grant(granted, _) if *granted == id => keys = Some(BTreeSet::new()),
                LeaseChange::Remove(removed) if *removed == id => keys = None,
                LeaseChange::Attach(lease, key) if *lease == id => {
                    if let Some(keys) = keys.as_mut() {
                        keys.insert(key.clone());
                    }
                }
                LeaseChange::Detach(lease, key) if *lease == id => {
                    if let Some(keys) = keys.as_mut() {
                        keys.remove(key);
                    }
                }
                _ => {}
            }
        }
        Ok(keys.map(|keys| keys.into_iter().collect()))
    }

    fn renew(&self, id: LeaseId) -> StoreResult<Renewal> {
        let now = self.clock.now();
        let mut state = self.lock_state()?;
        Ok(match state.leases.get_mut(&id) {
            // Past its deadline a lease is dead even if the sweeper has not deleted it yet:
            // reviving it would resurrect keys other instances may already consider gone.
            Some(lease) if lease.deadline <= now => Renewal::Expired,
            Some(lease) => {
                lease.deadline = deadline_after(now, lease.ttl);
                Renewal::Renewed
            }
            None => Renewal::Unknown,
        })
    }

    /// Applies a committed transaction's in-memory consequences and publishes its events.
    fn apply(&self, committed: Committed) -> StoreResult<()> {
        let now = self.clock.now();
        let mut state = self.lock_state()?;
        for change in committed.changes {
            match change {
                LeaseChange::Grant(id, ttl) => {
                    let deadline = deadline_after(now, ttl);
                    state.earliest = Some(state.earliest.map_or(deadline, |at| at.min(deadline)));
                    state.leases.insert(
                        id,
                        LeaseEntry {
                            ttl,
                            deadline,
                            keys: BTreeSet::new(),
                        },
                    );
                }
                LeaseChange::Remove(id) => {
                    state.leases.remove(&id);
                }
                LeaseChange::Attach(id, key) => {
                    if let Some(lease) = state.leases.get_mut(&id) {
                        lease.keys.insert(key);
                    }
                }
                LeaseChange::Detach(id, key) => {
                    if let Some(lease) = state.leases.get_mut(&id) {
                        lease.keys.remove(&key);
                    }
                }
            }
        }
        state.revision = committed.revision;
        state.publish(committed.events, self.options.history_capacity);
        Ok(())
    }

    fn register_watch(&self, prefix: &str, from: Revision) -> StoreResult<WatchStream> {
        let mut state = self.lock_state()?;
        // Receivers dropped since the last event would otherwise linger until the next write
        // under their prefix.
        state.watchers.retain(|watcher| !watcher.tx.is_closed());
        let from = if from == 0 { state.revision + 1 } else { from };
        if from < state.history_start {
            return Err(StoreError::Compacted {
                requested: from,
                oldest: state.history_start,
            });
        }
        let replay: Vec<WatchEvent> = state
            .history
            .iter()
            .filter(|event| event.revision() >= from && event.key().starts_with(prefix))
            .cloned()
            .collect();
        // Room for the whole replay on top of the live buffer, so replay never counts as
        // falling behind.
        let (tx, rx) = mpsc::channel(self.options.watch_buffer.max(1) + replay.len());
        for event in replay {
            tx.try_send(event)
                .map_err(|_| backend_error(ReplayOverflow))?;
        }
        state.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            from,
            tx,
        });
        Ok(rx)
    }
}

impl State {
    /// Hands one commit's `events` to every interested watcher and records them in the
    /// history ring.
    fn publish(&mut self, events: Vec<WatchEvent>, capacity: usize) {
        let Some(last) = events.last().map(WatchEvent::revision) else {
            return;
        };
        self.watchers.retain(|watcher| {
            let wanted: Vec<&WatchEvent> = events
                .iter()
                .filter(|event| {
                    event.revision() >= watcher.from && event.key().starts_with(&watcher.prefix)
                })
                .collect();
            if wanted.is_empty() {
                return !watcher.tx.is_closed();
            }
            // All of a commit or none of it, so no watcher sees half a transaction and then
            // the end of its stream. This is the only sender and it holds the state lock, so
            // the room seen here can only grow before the sends below.
            if watcher.tx.capacity() < wanted.len() {
                if !watcher.tx.is_closed() {
                    // Blocking here would stall every writer behind one slow reader;
                    // dropping the sender closes its stream, telling it to list and re-watch.
                    tracing::warn!(
                        prefix = watcher.prefix,
                        revision = last,
                        "watcher fell behind; closing its stream"
                    );
                }
                return false;
            }
            wanted
                .into_iter()
                .all(|event| watcher.tx.try_send(event.clone()).is_ok())
        });
        if capacity == 0 {
            self.history_start = last + 1;
            return;
        }
        self.history.extend(events);
        while self.history.len() > capacity {
            match self.history.pop_front() {
                Some(old) => self.history_start = old.revision() + 1,
                None => break,
            }
        }
        // Only whole revisions stay: a revision that lost some of its events can no longer be
        // replayed, and a watch from a later one would skip the rest anyway.
        while self
            .history
            .front()
            .is_some_and(|event| event.revision() < self.history_start)
        {
            self.history.pop_front();
        }
    }
}

/// One write transaction plus the events and in-memory changes it will cause once committed.
struct Txn {
    txn: WriteTransaction,
    /// The revision of the last change so far (the store's revision before any change).
    revision: Revision,
    /// Set by [`Txn::one_revision`] to the revision before the transaction: every change then
    /// lands at the one after it instead of at a revision of its own.
    single_revision_base: Option<Revision>,
    dirty: bool,
    events: Vec<WatchEvent>,
    changes: Vec<LeaseChange>,
    /// Headers a compare read that held, until the key is written: a compare and a put of the
    /// same key (a compare-and-swap, a batch of conditional puts) look the key up once.
    checked: HashMap<String, Option<Header>>,
}

impl Txn {
    fn begin(db: &Database) -> StoreResult<Txn> {
        let txn = db.begin_write().backend()?;
        let revision = read_counter(&txn, META_REVISION)?;
        Ok(Txn {
            txn,
            revision,
            single_revision_base: None,
            dirty: false,
            events: Vec::new(),
            changes: Vec::new(),
            checked: HashMap::new(),
        })
    }

    /// From now on every change of this transaction lands at one revision, the next one (a
    /// [`Store::txn`]). Without it each change gets a revision of its own.
    fn one_revision(&mut self) {
        self.single_revision_base = Some(self.revision);
    }

    /// Whether this transaction has granted (`Some(true)`) or removed (`Some(false)`) lease
    /// `id`, the later change winning; `None` if it has done neither.
    fn lease_fate(&self, id: LeaseId) -> Option<bool> {
        self.changes.iter().rev().find_map(|change| match change {
            LeaseChange::Grant(granted, _) if *granted == id => Some(true),
            LeaseChange::Remove(removed) if *removed == id => Some(false),
            _ => None,
        })
    }

    /// How many changes this transaction holds: unchanged across a write that wrote nothing.
    fn mark(&self) -> (usize, usize, bool) {
        (self.events.len(), self.changes.len(), self.dirty)
    }

    /// Ends one write of a batch: the next one gets revisions of its own again.
    fn end_write(&mut self) {
        self.single_revision_base = None;
    }

    /// The revision of the next change.
    fn next_revision(&mut self) -> Revision {
        self.revision = match self.single_revision_base {
            Some(base) => base + 1,
            None => self.revision + 1,
        };
        self.revision
    }

    /// `read` of `key`'s stored bytes, if it exists.
    fn lookup<T>(
        &self,
        key: &str,
        read: impl FnOnce(&str, &[u8]) -> StoreResult<T>,
    ) -> StoreResult<Option<T>> {
        let table = self.txn.open_table(KV).backend()?;
        let found = table.get(key).backend()?;
        found.map(|guard| read(key, guard.value())).transpose()
    }

    fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        self.lookup(key, decode)
    }

    /// A key's revisions and lease without its value: what compares and puts need of the
    /// current record (copying values of a hundred records per transaction only to read their
    /// revisions was a twelfth of serve's work while it closed a thousand drones' backends).
    fn header(&self, key: &str) -> StoreResult<Option<Header>> {
        self.lookup(key, decode_header)
    }

    /// Whether `expect` holds for `key`; `Err` carries the key's current state (value
    /// included) when it does not, for a failed transaction or compare-and-swap.
    fn check(&mut self, key: &str, expect: Expect) -> StoreResult<Result<(), Option<KeyValue>>> {
        let header = self.header(key)?;
        let revisions = header.as_ref().map(|h| (h.create_revision, h.mod_revision));
        if expect.holds_revisions(revisions) {
            self.checked.insert(key.to_owned(), header);
            Ok(Ok(()))
        } else {
            Ok(Err(self.get(key)?))
        }
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> StoreResult<Revision> {
        let prev = match self.checked.remove(key) {
            Some(checked) => checked,
            None => self.header(key)?,
        };
        let revision = self.next_revision();
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease,
        };
        self.txn
            .open_table(KV)
            .backend()?
            .insert(key, encode(&kv).as_slice())
            .backend()?;
        // A put replaces the key's lease (none included), as in etcd.
        let prev_lease = prev.and_then(|p| p.lease);
        if prev_lease != lease {
            if let Some(old) = prev_lease {
                self.changes.push(LeaseChange::Detach(old, key.to_owned()));
            }
            if let Some(new) = lease {
                self.changes.push(LeaseChange::Attach(new, key.to_owned()));
            }
        }
        self.events.push(WatchEvent::Put(kv));
        self.dirty = true;
        Ok(revision)
    }

    fn delete(&mut self, key: &str) -> StoreResult<bool> {
        self.checked.remove(key);
        let Some(prev) = self.get(key)? else {
            return Ok(false);
        };
        self.txn.open_table(KV).backend()?.remove(key).backend()?;
        let revision = self.next_revision();
        if let Some(lease) = prev.lease {
            self.changes
                .push(LeaseChange::Detach(lease, key.to_owned()));
        }
        self.events.push(WatchEvent::Delete {
            key: key.to_owned(),
            revision,
            prev: Some(prev),
        });
        self.dirty = true;
        Ok(true)
    }

    fn grant(&mut self, ttl: Duration) -> StoreResult<LeaseId> {
        // Ids come from a persisted counter, so they are never reused across restarts.
        let id = read_counter(&self.txn, META_NEXT_LEASE)?.max(1);
        let next = id
            .checked_add(1)
            .ok_or_else(|| backend_error(LeaseIdsExhausted))?;
        let ttl_nanos = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        self.txn
            .open_table(LEASES)
            .backend()?
            .insert(id, ttl_nanos)
            .backend()?;
        self.txn
            .open_table(META)
            .backend()?
            .insert(META_NEXT_LEASE, next)
            .backend()?;
        self.changes
            .push(LeaseChange::Grant(id, Duration::from_nanos(ttl_nanos)));
        self.dirty = true;
        Ok(id)
    }

    /// Deletes `keys` that are still attached to `id`, then the lease.
    fn remove_lease(&mut self, id: LeaseId, keys: Vec<String>) -> StoreResult<()> {
        for key in keys {
            if self.get(&key)?.is_some_and(|kv| kv.lease == Some(id)) {
                self.delete(&key)?;
            }
        }
        self.txn
            .open_table(LEASES)
            .backend()?
            .remove(id)
            .backend()?;
        self.changes.push(LeaseChange::Remove(id));
        self.dirty = true;
        Ok(())
    }

    /// Drops every change of this transaction.
    fn abort(self) {
        if let Err(error) = self.txn.abort() {
            tracing::warn!(%error, "aborting a store write transaction failed");
        }
    }

    /// Commits if anything was written (with the new revision), else aborts without an fsync.
    fn commit(self) -> StoreResult<Option<Committed>> {
        let Txn {
            txn,
            revision,
            single_revision_base: _,
            checked: _,
            dirty,
            events,
            changes,
        } = self;
        if !dirty {
            txn.abort().backend()?;
            return Ok(None);
        }
        txn.open_table(META)
            .backend()?
            .insert(META_REVISION, revision)
            .backend()?;
        txn.commit().backend()?;
        Ok(Some(Committed {
            revision,
            events,
            changes,
        }))
    }
}

fn read_one(snapshot: &ReadTransaction, key: &str) -> StoreResult<Option<KeyValue>> {
    let table = snapshot.open_table(KV).backend()?;
    let found = table.get(key).backend()?;
    found.map(|guard| decode(key, guard.value())).transpose()
}

fn read_counter(txn: &WriteTransaction, name: &str) -> StoreResult<u64> {
    let table = txn.open_table(META).backend()?;
    let value = table.get(name).backend()?.map_or(0, |guard| guard.value());
    Ok(value)
}

fn read_revision(snapshot: &ReadTransaction) -> StoreResult<Revision> {
    let table = snapshot.open_table(META).backend()?;
    let value = table
        .get(META_REVISION)
        .backend()?
        .map_or(0, |guard| guard.value());
    Ok(value)
}

/// The earliest deadline of `leases` (`None`: no lease).
fn earliest_deadline(leases: &HashMap<LeaseId, LeaseEntry>) -> Option<Instant> {
    leases.values().map(|lease| lease.deadline).min()
}

/// `now + ttl`, with TTLs beyond 30 years treated as 30 years so an absurd TTL cannot
/// overflow the instant (tokio's own "far future" is the same 30 years from now).
fn deadline_after(now: Instant, ttl: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    now + ttl.min(FAR)
}

/// Record layout: format byte, create revision, mod revision, version, lease (0 = none), all
/// little-endian u64, then the value bytes.
fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER + kv.value.len());
    out.push(RECORD_FORMAT);
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

struct Header {
    create_revision: Revision,
    mod_revision: Revision,
    version: u64,
    lease: Option<LeaseId>,
}

fn decode_header(key: &str, bytes: &[u8]) -> StoreResult<Header> {
    let corrupt = || {
        backend_error(CorruptRecord {
            key: key.to_owned(),
        })
    };
    if bytes.len() < RECORD_HEADER || bytes[0] != RECORD_FORMAT {
        return Err(corrupt());
    }
    let field = |index: usize| -> StoreResult<u64> {
        let start = 1 + 8 * index;
        let raw: [u8; 8] = bytes[start..start + 8].try_into().map_err(|_| corrupt())?;
        Ok(u64::from_le_bytes(raw))
    };
    let lease = field(3)?;
    Ok(Header {
        create_revision: field(0)?,
        mod_revision: field(1)?,
        version: field(2)?,
        lease: (lease != 0).then_some(lease),
    })
}

fn decode(key: &str, bytes: &[u8]) -> StoreResult<KeyValue> {
    let header = decode_header(key, bytes)?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: bytes[RECORD_HEADER..].to_vec(),
        create_revision: header.create_revision,
        mod_revision: header.mod_revision,
        version: header.version,
        lease: header.lease,
    })
}

/// The lease sweeper: sleeps until the earliest deadline (or until deadlines change) and then
/// expires what is due. Holds only a weak reference so dropping the store frees it.
async fn sweep(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let sleep_for = match shared.upgrade() {
            None => return,
            Some(shared) => match shared.next_deadline() {
                Ok(deadline) => {
                    // Sleep on tokio time for as long as the lease clock says is left.
                    deadline.map(|d| d.saturating_duration_since(shared.clock.now()))
                }
                Err(error) => {
                    tracing::error!(%error, "lease sweeper stopping");
                    return;
                }
            },
        };
        match sleep_for {
            None => {
                wake.notified().await;
                continue;
            }
            Some(duration) if !duration.is_zero() => {
                tokio::select! {
                    () = tokio::time::sleep(duration) => {}
                    () = wake.notified() => continue,
                }
            }
            Some(_) => {}
        }
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let result = tokio::task::spawn_blocking(move || strong.expire_due()).await;
        let error = match result {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        tracing::warn!(%error, "lease expiry failed; retrying");
        tokio::time::sleep(SWEEP_RETRY).await;
    }
}

#[cfg(test)]
#[path = "embedded_tests.rs"]
mod tests;
