//! [`EtcdStore`]: the [`Store`] on an etcd cluster (v3 API, through etcd-client), for several
//! `hangar serve` instances sharing state.
//!
//! The trait is shaped like etcd's API, so most calls are one etcd request: a put is a `Put`,
//! a compare-and-swap a `Txn` with one compare, a [`Store::txn`] one `Txn` (so it commits at
//! one revision, as in the embedded store). What the mapping has to take care of:
//!
//! - **Keys** are prefixed with [`EtcdOptions::prefix`] (verbatim) on the way in and stripped
//!   on the way out, so several clusters or tests can share one etcd. Leases and the revision
//!   are etcd's own and shared by every prefix.
//! - **Compares.** etcd reports a missing key's revisions as 0, so [`Expect::Absent`] is
//!   `create_revision == 0`, [`Expect::Exists`] `create_revision > 0`, and
//!   `ModRevision(0)`/`CreateRevision(0)` (which never hold) a compare that never holds.
//! - **Failed transactions** ([`TxnOutcome::Failed`]): etcd says only that some compare failed.
//!   The failure branch of every transaction reads each compared key, at the same revision as
//!   the compares, and the compares are evaluated again on those values to name the first one
//!   that failed and its key's current value.
//! - **Retries** (see the `retry` module and [`RetryPolicy`]): etcd-client does not retry. Every call runs in a bounded
//!   retry loop with backoff; reads, unconditional puts, lease calls and watch creation are
//!   retried after any transient failure; conditional writes (compare-and-swap,
//!   delete-if-revision, transactions) only when the failed attempt certainly never reached
//!   etcd, and otherwise fail with a transient "outcome unknown" error: the caller reads again
//!   rather than taking its own success for a conflict. An unconditional delete is retried too,
//!   but if an earlier attempt may have deleted the key and a later one finds it gone, whether
//!   it existed is unknown and that is the error.
//! - **Lease keep-alive** is one renewal on a keep-alive stream opened for it (etcd-client's
//!   `keep_alive` sends the first request and consumes its answer); TTL 0 in the answer is
//!   [`StoreError::LeaseNotFound`]. Lease ids are chosen here (random, positive) so that a
//!   grant whose answer was lost can be retried: "lease already exists" then means it was
//!   granted. TTLs are whole seconds (rounded up; etcd raises very short ones to its minimum,
//!   about 2 s), and etcd gives every lease its full TTL again when it elects a new leader.
//! - **Watches** ask for `prev_kv` (deletes carry the previous value). A background task per
//!   watch forwards events and, when the stream breaks (its member died, lost its leader),
//!   opens it again from the revision after the last one delivered. A watch from a compacted
//!   revision fails with [`StoreError::Compacted`] when `watch` is called; if compaction
//!   overtakes a stream later (or it cannot be reopened), the stream closes and the consumer
//!   lists again. Watch events arrive asynchronously: unlike the embedded store, a write can
//!   return before its event is queued.
//! - **Limits**: a transaction has at most [`MAX_TXN_OPS`](crate::MAX_TXN_OPS) compares and
//!   operations (etcd's `--max-txn-ops`), and a request at most
//!   [`MAX_REQUEST_BYTES`] (etcd's `--max-request-bytes`); larger requests fail with
//!   [`StoreError::RequestTooLarge`] before they are sent.
//!
//! Dropping the store stops the watch tasks (their streams close).

mod retry;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, KvClient, LeaseClient,
    LeaseGrantOptions, PutOptions, Txn, TxnOp as EtcdTxnOp, TxnOpResponse, WatchClient,
    WatchOptions,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::retry::RetryPolicy;
use self::retry::{Answer, CallError, Safety};
use crate::{
    CasOutcome, Compare, Expect, KeyValue, LeaseId, Listing, MAX_REQUEST_BYTES, Page, Revision,
    Store, StoreError, StoreResult, TxnOp, TxnOutcome, WatchEvent, WatchStream, validate_txn,
};

/// The end of the range of keys starting with `prefix` (etcd's convention: `[0]` for every
/// key, when the prefix is empty or all `0xff`).
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// etcd's largest lease TTL, in seconds.
const MAX_TTL_SECS: i64 = 9_000_000_000;

/// How many events a watch stream buffers for a slow consumer before the forwarding task waits
/// for it (etcd then holds the rest; nothing is dropped).
const WATCH_BUFFER: usize = 1024;

/// How long `watch` waits for etcd to say how far a watched revision was compacted, once a
/// read has shown it was (etcd sends that within its 100 ms watcher sync period).
const COMPACTION_NOTICE: Duration = Duration::from_secs(5);

/// Received messages may be as large as etcd sends (a listing of a large prefix, a watch
/// catching up): etcd's own send limit is `i32::MAX`, tonic's default 4 MiB.
const MAX_DECODING_BYTES: usize = i32::MAX as usize;

/// Where the etcd store connects and how it behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdOptions {
    /// The cluster's client endpoints, `host:port` (plain HTTP) or full `http://` URLs.
    pub endpoints: Vec<String>,
    /// Prepended verbatim to every key. Hangar's keys start with `/hangar/`, so a prefix like
    /// `/team-a` keeps clusters apart; empty (the default) uses keys as they are.
    pub prefix: String,
    pub retry: RetryPolicy,
    /// How long opening a TCP connection to one member may take.
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive: a connection (and the watch streams on it) whose member does not
    /// answer a ping within `keep_alive.1` of sending it, every `keep_alive.0`, is closed, so a
    /// member that vanished without a reset is noticed.
    pub keep_alive: (Duration, Duration),
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            prefix: String::new(),
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(2),
            keep_alive: (Duration::from_secs(10), Duration::from_secs(5)),
        }
    }

    pub fn with_prefix(mut self, prefix: impl Into<String>) -> EtcdOptions {
        self.prefix = prefix.into();
        self
    }

    /// The endpoints as given, comma-separated (for messages).
    pub fn endpoints_display(&self) -> String {
        self.endpoints.join(",")
    }
}

/// Failures of the etcd store, inside [`StoreError::Backend`] and [`StoreError::Open`].
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error(
        "no etcd member at {endpoints} answered the {op} ({attempts} attempts within {deadline:?}); last error: {last}"
    )]
    Unavailable {
        op: &'static str,
        endpoints: String,
        attempts: u32,
        deadline: Duration,
        last: String,
    },
    #[error(
        "etcd did not confirm the {op} and it may have been applied ({cause}): read the keys again before retrying"
    )]
    OutcomeUnknown { op: &'static str, cause: String },
    #[error("etcd refused the {op}: {source}")]
    Refused {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd returned key {key:?}, which is not UTF-8 under prefix {prefix:?}")]
    ForeignKey { key: String, prefix: String },
    #[error("etcd answered the {op} without the {what}")]
    Malformed {
        op: &'static str,
        what: &'static str,
    },
}

fn backend(error: EtcdError) -> StoreError {
    StoreError::Backend(Box::new(error))
}

/// The etcd-backed store. Share it behind the `Arc` that [`EtcdStore::connect`] returns.
pub struct EtcdStore {
    conn: Conn,
    /// See [`EtcdOptions::prefix`].
    prefix: String,
    /// The watch forwarding tasks; `cancel` stops them when the store is dropped.
    tasks: TaskTracker,
    cancel: CancellationToken,
}

/// The etcd clients with the retry policy they are called under: what the store and its watch
/// forwarding tasks share. Cloning is cheap (the clients share one channel).
#[derive(Clone)]
struct Conn {
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
    retry: RetryPolicy,
    /// The endpoints as configured, for messages.
    endpoints: Arc<str>,
    /// Attempts that failed transiently and were tried again, over the store's life.
    retried: Arc<AtomicU64>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.conn.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl EtcdStore {
    /// Connects to the cluster and checks that it answers (one read, retried under the
    /// policy). Fails with [`StoreError::Open`] if no member answers before the retry deadline.
    pub async fn connect(options: EtcdOptions) -> StoreResult<Arc<EtcdStore>> {
        let endpoints = options.endpoints_display();
        let open_error = |source: EtcdError| StoreError::Open {
            path: format!("etcd://{endpoints}"),
            source: Box::new(source),
        };
        let urls: Vec<String> = options
            .endpoints
            .iter()
            .map(|endpoint| {
                if endpoint.contains("://") {
                    endpoint.clone()
                } else {
                    format!("http://{endpoint}")
                }
            })
            .collect();
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(options.keep_alive.0, options.keep_alive.1)
            // A member cut off from its leader refuses requests ("no leader", which is safe to
            // retry on another member) and closes its watch streams instead of stalling them.
            .with_require_leader(true);
        // Connecting is lazy: this fails only for malformed endpoints.
        let client = Client::connect(&urls, Some(connect))
            .await
            .map_err(|source| {
                open_error(EtcdError::Refused {
                    op: "connection",
                    source,
                })
            })?;
        let store = Arc::new(EtcdStore {
            conn: Conn {
                kv: client
                    .kv_client()
                    .max_decoding_message_size(MAX_DECODING_BYTES),
                watch: client
                    .watch_client()
                    .max_decoding_message_size(MAX_DECODING_BYTES),
                lease: client.lease_client(),
                retry: options.retry,
                endpoints: endpoints.as_str().into(),
                retried: Arc::new(AtomicU64::new(0)),
            },
            prefix: options.prefix,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        });
        match store.revision().await {
            Ok(_) => Ok(store),
            Err(StoreError::Backend(source)) => Err(StoreError::Open {
                path: format!("etcd://{endpoints}"),
                source,
            }),
            Err(other) => Err(other),
        }
    }

    /// The key prefix this store writes under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many attempts failed transiently and were tried again since the store was opened
    /// (a member down, an election): for metrics and tests.
    pub fn retried(&self) -> u64 {
        self.conn.retried.load(Ordering::Relaxed)
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.prefix.len() + key.len());
        full.extend_from_slice(self.prefix.as_bytes());
        full.extend_from_slice(key.as_bytes());
        full
    }

    /// A key whose read tells the current revision. etcd refuses an empty key.
    fn revision_key(&self) -> Vec<u8> {
        let mut key = self.full_key("");
        key.push(0);
        key
    }

    /// Converts an etcd key-value, stripping the prefix.
    fn key_value(&self, kv: &etcd_client::KeyValue) -> StoreResult<KeyValue> {
        Ok(KeyValue {
            key: self.strip(kv.key())?,
            value: kv.value().to_vec(),
            create_revision: revision(kv.create_revision()),
            mod_revision: revision(kv.mod_revision()),
            version: revision(kv.version()),
            lease: lease_of(kv.lease()),
        })
    }

    fn strip(&self, key: &[u8]) -> StoreResult<String> {
        let foreign = || {
            backend(EtcdError::ForeignKey {
                key: String::from_utf8_lossy(key).into_owned(),
                prefix: self.prefix.clone(),
            })
        };
        let rest = key
            .strip_prefix(self.prefix.as_bytes())
            .ok_or_else(foreign)?;
        String::from_utf8(rest.to_vec()).map_err(|_| foreign())
    }

    /// The compare of `expect` on `key` (already prefixed).
    fn compare(key: Vec<u8>, expect: Expect) -> EtcdCompare {
        // A compare that never holds: no revision is negative.
        let never = |key| EtcdCompare::create_revision(key, CompareOp::Less, 0);
        let exact = |revision: Revision| i64::try_from(revision).ok().filter(|r| *r > 0);
        match expect {
            Expect::Absent => EtcdCompare::create_revision(key, CompareOp::Equal, 0),
            Expect::Exists => EtcdCompare::create_revision(key, CompareOp::Greater, 0),
            Expect::ModRevision(revision) => match exact(revision) {
                Some(revision) => EtcdCompare::mod_revision(key, CompareOp::Equal, revision),
                None => never(key),
            },
            Expect::CreateRevision(revision) => match exact(revision) {
                Some(revision) => EtcdCompare::create_revision(key, CompareOp::Equal, revision),
                None => never(key),
            },
        }
    }

    /// Sends `txn` (conditional: see [`retry`]) whose failure branch reads `read` (prefixed
    /// keys), and returns the header revision and, if it failed, the keys' values in the order
    /// of `read`.
    async fn send_txn(
        &self,
        op: &'static str,
        txn: Txn,
        read: usize,
        leases: &[LeaseId],
    ) -> StoreResult<(Revision, Option<Vec<Option<KeyValue>>>)> {
        let answer = self
            .conn
            .call(
                op,
                Safety::Conditional,
                |mut kv, txn| async move { kv.txn(txn).await },
                txn,
            )
            .await;
        let response = match answer {
            Ok(answer) => answer.value,
            Err(error) => return Err(self.lease_error(error, leases).await),
        };
        let revision = header_revision(op, response.header())?;
        if response.succeeded() {
            return Ok((revision, None));
        }
        let responses = response.op_responses();
        if responses.len() != read {
            return Err(backend(EtcdError::Malformed {
                op,
                what: "reads of its failure branch",
            }));
        }
        let mut values = Vec::with_capacity(read);
        for response in responses {
            let TxnOpResponse::Get(get) = response else {
                return Err(backend(EtcdError::Malformed {
                    op,
                    what: "reads of its failure branch",
                }));
            };
            values.push(get.kvs().first().map(|kv| self.key_value(kv)).transpose()?);
        }
        Ok((revision, Some(values)))
    }

    /// Names the lease of a "lease not found" refusal: the only one the request attached, or
    /// the first that etcd no longer knows.
    async fn lease_error(&self, error: StoreError, leases: &[LeaseId]) -> StoreError {
        let StoreError::LeaseNotFound(_) = error else {
            return error;
        };
        let mut distinct: Vec<LeaseId> = Vec::new();
        for lease in leases {
            if !distinct.contains(lease) {
                distinct.push(*lease);
            }
        }
        if distinct.len() > 1 {
            for &lease in &distinct {
                if !self.lease_exists(lease).await.unwrap_or(true) {
                    return StoreError::LeaseNotFound(lease);
                }
            }
        }
        StoreError::LeaseNotFound(distinct.first().copied().unwrap_or(0))
    }

    async fn lease_exists(&self, lease: LeaseId) -> StoreResult<bool> {
        let Ok(id) = i64::try_from(lease) else {
            return Ok(false);
        };
        let answer = self
            .conn
            .lease_call(
                "lease lookup",
                Safety::Idempotent,
                |mut client| async move { client.time_to_live(id, None).await },
            )
            .await?;
        // etcd answers TTL -1 for a lease it does not know.
        Ok(answer.value.ttl() > 0)
    }
}

impl Conn {
    /// Runs `attempt` in the retry loop (see [`retry`]).
    async fn run<T, F, Fut>(
        &self,
        op: &'static str,
        safety: Safety,
        attempt: F,
    ) -> StoreResult<Answer<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        retry::run(&self.retry, safety, &self.retried, attempt)
            .await
            .map_err(|error| call_error(op, &self.endpoints, &self.retry, error))
    }

    /// Runs a call on the key-value client in the retry loop; `arg` is cloned per attempt.
    async fn call<T, F, Fut, A>(
        &self,
        op: &'static str,
        safety: Safety,
        f: F,
        arg: A,
    ) -> StoreResult<Answer<T>>
    where
        F: Fn(KvClient, A) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
        A: Clone,
    {
        self.run(op, safety, || f(self.kv.clone(), arg.clone()))
            .await
    }

    /// Runs a call on the lease client in the retry loop.
    async fn lease_call<T, F, Fut>(
        &self,
        op: &'static str,
        safety: Safety,
        f: F,
    ) -> StoreResult<Answer<T>>
    where
        F: Fn(LeaseClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.run(op, safety, || f(self.lease.clone())).await
    }

    /// Opens an etcd watch stream on `key` (a prefix, with the store's prefix) from `start` and
    /// waits for etcd to confirm it. Fails with [`StoreError::Compacted`] if `start` was
    /// compacted.
    async fn open_watch(
        &self,
        key: Vec<u8>,
        start: Revision,
    ) -> StoreResult<etcd_client::WatchStream> {
        let start_i64 = i64::try_from(start).unwrap_or(i64::MAX);
        let created = self
            .run("watch", Safety::Idempotent, || {
                let mut watch = self.watch.clone();
                let key = key.clone();
                async move {
                    let options = WatchOptions::new()
                        .with_prefix()
                        .with_prev_key()
                        .with_progress_notify()
                        .with_start_revision(start_i64);
                    let mut stream = watch.watch(key, Some(options)).await?;
                    match stream.message().await? {
                        Some(response) if response.created() && !response.canceled() => {
                            Ok(Ok(stream))
                        }
                        Some(response) if response.compact_revision() > 0 => {
                            Ok(Err(revision(response.compact_revision())))
                        }
                        Some(response) => Err(etcd_client::Error::WatchError(format!(
                            "watch not created: {}",
                            response.cancel_reason()
                        ))),
                        None => Err(etcd_client::Error::WatchError(
                            "watch stream closed before it was created".into(),
                        )),
                    }
                }
            })
            .await?;
        let mut stream = match created.value {
            Ok(stream) => stream,
            Err(oldest) => {
                return Err(StoreError::Compacted {
                    requested: start,
                    oldest,
                });
            }
        };

        // etcd creates a watch from a compacted revision and cancels it shortly after. A read
        // at `start` fails exactly when the watch will be cancelled, so it tells now.
        let compacted = self
            .call(
                "watch",
                Safety::Idempotent,
                |mut kv, key| async move {
                    let options = GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_limit(1)
                        .with_revision(start_i64);
                    match kv.get(key, Some(options)).await {
                        Ok(_) => Ok(false),
                        Err(etcd_client::Error::GRpcStatus(status))
                            if status.message().contains("future revision") =>
                        {
                            Ok(false)
                        }
                        Err(etcd_client::Error::GRpcStatus(status))
                            if status.message().contains("compacted") =>
                        {
                            Ok(true)
                        }
                        Err(error) => Err(error),
                    }
                },
                key.clone(),
            )
            .await?;
        if !compacted.value {
            return Ok(stream);
        }
        // Compacted: etcd's cancellation says up to where.
        let notice = tokio::time::timeout(COMPACTION_NOTICE, async {
            while let Ok(Some(response)) = stream.message().await {
                if response.compact_revision() > 0 {
                    return Some(revision(response.compact_revision()));
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        Err(StoreError::Compacted {
            requested: start,
            // Without etcd's notice, all that is known is that `start` is gone.
            oldest: notice.unwrap_or(start + 1),
        })
    }
}

/// Maps a call that did not succeed to the store's errors.
fn call_error(
    op: &'static str,
    endpoints: &str,
    policy: &RetryPolicy,
    error: CallError,
) -> StoreError {
    match error {
        CallError::Refused(source) => refused(op, source),
        CallError::OutcomeUnknown(cause) => backend(EtcdError::OutcomeUnknown {
            op,
            cause: cause.to_string(),
        }),
        CallError::Unavailable { attempts, last } => backend(EtcdError::Unavailable {
            op,
            endpoints: endpoints.to_owned(),
            attempts,
            deadline: policy.deadline,
            last: last.to_string(),
        }),
    }
}

/// Maps an etcd refusal to the store's errors.
fn refused(op: &'static str, source: etcd_client::Error) -> StoreError {
    if let etcd_client::Error::GRpcStatus(status) = &source {
        let message = status.message();
        if message.contains("lease not found") {
            // The caller names the lease (see `EtcdStore::lease_error`).
            return StoreError::LeaseNotFound(0);
        }
        if message.contains("request is too large") || message.contains("larger than max") {
            return StoreError::RequestTooLarge {
                bytes: None,
                max: MAX_REQUEST_BYTES,
            };
        }
    }
    backend(EtcdError::Refused { op, source })
}

/// Refuses a request whose keys and values alone (`bytes`) exceed etcd's limit, before
/// sending it. etcd's own framing adds a little more, which etcd refuses itself.
fn check_size(bytes: usize) -> StoreResult<()> {
    if bytes > MAX_REQUEST_BYTES {
        return Err(StoreError::RequestTooLarge {
            bytes: Some(bytes),
            max: MAX_REQUEST_BYTES,
        });
    }
    Ok(())
}

fn header_revision(
    op: &'static str,
    header: Option<&etcd_client::ResponseHeader>,
) -> StoreResult<Revision> {
    header.map(|h| revision(h.revision())).ok_or_else(|| {
        backend(EtcdError::Malformed {
            op,
            what: "response header",
        })
    })
}

/// etcd's revisions and versions are non-negative `i64`s.
fn revision(value: i64) -> Revision {
    u64::try_from(value).unwrap_or(0)
}

fn lease_of(value: i64) -> Option<LeaseId> {
    u64::try_from(value).ok().filter(|id| *id != 0)
}

/// etcd lease ids are positive `i64`s; anything else cannot name a live lease.
fn etcd_lease(lease: LeaseId) -> StoreResult<i64> {
    i64::try_from(lease)
        .ok()
        .filter(|id| *id > 0)
        .ok_or(StoreError::LeaseNotFound(lease))
}

fn put_options(lease: Option<LeaseId>) -> StoreResult<Option<PutOptions>> {
    lease
        .map(|lease| etcd_lease(lease).map(|id| PutOptions::new().with_lease(id)))
        .transpose()
}

/// A lease TTL in etcd's whole seconds: rounded up, at least 1, at most etcd's maximum.
fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs)
        .unwrap_or(i64::MAX)
        .clamp(1, MAX_TTL_SECS)
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        let answer = self
            .conn
            .call(
                "get",
                Safety::Idempotent,
                |mut kv, key| async move { kv.get(key, None).await },
                self.full_key(key),
            )
            .await?;
        answer
            .value
            .kvs()
            .first()
            .map(|kv| self.key_value(kv))
            .transpose()
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> StoreResult<Revision> {
        check_size(self.prefix.len() + key.len() + value.len())?;
        let options = put_options(lease)?;
        // Unconditional: sending the same value again is harmless, so any transient failure
        // is retried.
        let answer = self
            .conn
            .call(
                "put",
                Safety::Idempotent,
                |mut kv, (key, value, options)| async move { kv.put(key, value, options).await },
                (self.full_key(key), value, options),
            )
            .await
            .map_err(|error| match error {
                StoreError::LeaseNotFound(_) => StoreError::LeaseNotFound(lease.unwrap_or(0)),
                other => other,
            })?;
        header_revision("put", answer.value.header())
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> StoreResult<CasOutcome> {
        // The key three times: compared, written, and read if the compare fails.
        check_size(3 * (self.prefix.len() + key.len()) + value.len())?;
        let options = put_options(lease)?;
        let full = self.full_key(key);
        let txn = Txn::new()
            .when([Self::compare(full.clone(), expect)])
            .and_then([EtcdTxnOp::put(full.clone(), value, options)])
            .or_else([EtcdTxnOp::get(full, None)]);
        let leases: Vec<LeaseId> = lease.into_iter().collect();
        match self.send_txn("compare-and-swap", txn, 1, &leases).await? {
            (revision, None) => Ok(CasOutcome::Written(revision)),
            (_, Some(mut values)) => Ok(CasOutcome::Conflict(values.pop().flatten())),
        }
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> StoreResult<TxnOutcome> {
        validate_txn(&compares, &ops)?;
        // Compared keys twice (the compare and the failure branch's read), written keys once.
        let key_bytes = |key: &str| self.prefix.len() + key.len();
        let bytes = compares
            .iter()
            .map(|c| 2 * key_bytes(&c.key))
            .sum::<usize>()
            + ops
                .iter()
                .map(|op| match op {
                    TxnOp::Put { key, value, .. } => key_bytes(key) + value.len(),
                    TxnOp::Delete { key } => key_bytes(key),
                })
                .sum::<usize>();
        check_size(bytes)?;

        // The failure branch reads every compared key once, in the order of first mention.
        let mut read: Vec<&str> = Vec::new();
        for compare in &compares {
            if !read.contains(&compare.key.as_str()) {
                read.push(&compare.key);
            }
        }
        let mut leases = Vec::new();
        let mut then = Vec::with_capacity(ops.len());
        for op in &ops {
            then.push(match op {
                TxnOp::Put { key, value, lease } => {
                    leases.extend(*lease);
                    EtcdTxnOp::put(self.full_key(key), value.clone(), put_options(*lease)?)
                }
                TxnOp::Delete { key } => EtcdTxnOp::delete(self.full_key(key), None),
            });
        }
        let txn = Txn::new()
            .when(
                compares
                    .iter()
                    .map(|c| Self::compare(self.full_key(&c.key), c.expect))
                    .collect::<Vec<_>>(),
            )
            .and_then(then)
            .or_else(
                read.iter()
                    .map(|key| EtcdTxnOp::get(self.full_key(key), None))
                    .collect::<Vec<_>>(),
            );

        let (revision, failed) = self
            .send_txn("transaction", txn, read.len(), &leases)
            .await?;
        let Some(values) = failed else {
            return Ok(TxnOutcome::Committed(revision));
        };
        let current: HashMap<&str, Option<KeyValue>> = read.into_iter().zip(values).collect();
        for (index, compare) in compares.iter().enumerate() {
            let value = current.get(compare.key.as_str()).cloned().flatten();
            if !compare.expect.holds(value.as_ref()) {
                return Ok(TxnOutcome::Failed {
                    compare: index,
                    current: value,
                });
            }
        }
        // The reads happen at the compares' revision, so one of them must fail.
        Err(backend(EtcdError::Malformed {
            op: "transaction",
            what: "failing compare among the values read at its revision",
        }))
    }

    async fn delete(&self, key: &str) -> StoreResult<bool> {
        // Retried after any transient failure: the key ends up absent either way. But if an
        // earlier attempt may have deleted it, "nothing to delete" does not say whether it
        // existed.
        let answer = self
            .conn
            .call(
                "delete",
                Safety::Idempotent,
                |mut kv, key| async move { kv.delete(key, None).await },
                self.full_key(key),
            )
            .await?;
        let deleted = answer.value.deleted() > 0;
        if !deleted && answer.after_unknown {
            return Err(backend(EtcdError::OutcomeUnknown {
                op: "delete",
                cause: "an earlier attempt may have deleted the key".into(),
            }));
        }
        Ok(deleted)
    }

    async fn delete_if_revision(&self, key: &str, revision: Revision) -> StoreResult<bool> {
        let full = self.full_key(key);
        let txn = Txn::new()
            .when([Self::compare(full.clone(), Expect::ModRevision(revision))])
            .and_then([EtcdTxnOp::delete(full, None)]);
        let (_, failed) = self.send_txn("delete-if-revision", txn, 0, &[]).await?;
        // The compare implies the key exists, so a committed transaction deleted it.
        Ok(failed.is_none())
    }

    async fn list(&self, prefix: &str) -> StoreResult<Listing> {
        let answer = self
            .conn
            .call(
                "list",
                Safety::Idempotent,
                |mut kv, prefix| async move {
                    kv.get(prefix, Some(GetOptions::new().with_prefix())).await
                },
                self.full_key(prefix),
            )
            .await?;
        let response = answer.value;
        let kvs = response
            .kvs()
            .iter()
            .map(|kv| self.key_value(kv))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Listing {
            kvs,
            revision: header_revision("list", response.header())?,
        })
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        at: Option<Revision>,
    ) -> StoreResult<Page> {
        let full_prefix = self.full_key(prefix);
        // The range: from just after `start_after` (or the prefix) to the end of the prefix.
        let mut start = match start_after {
            Some(after) if after > prefix => {
                let mut k = self.full_key(after);
                k.push(0);
                k
            }
            _ => full_prefix.clone(),
        };
        if start.is_empty() {
            // etcd refuses an empty key; "\0" sorts before every other key.
            start.push(0);
        }
        let end = range_end(&full_prefix);
        let limit = limit.max(1);
        let answer = self
            .conn
            .call(
                "list a page",
                Safety::Idempotent,
                |mut kv, (start, end)| async move {
                    let mut options = GetOptions::new()
                        .with_range(end)
                        .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
                    if let Some(at) = at {
                        options = options.with_revision(i64::try_from(at).unwrap_or(i64::MAX));
                    }
                    match kv.get(start, Some(options)).await {
                        Ok(response) => Ok(Some(response)),
                        // Not an outage: retrying cannot help.
                        Err(etcd_client::Error::GRpcStatus(status))
                            if status.message().contains("compacted") =>
                        {
                            Ok(None)
                        }
                        Err(error) => Err(error),
                    }
                },
                (start, end),
            )
            .await?;
        let Some(response) = answer.value else {
            let requested = at.unwrap_or_default();
            return Err(StoreError::Compacted {
                requested,
                // All that is known is that `requested` is gone.
                oldest: requested + 1,
            });
        };
        let kvs = response
            .kvs()
            .iter()
            .map(|kv| self.key_value(kv))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Page {
            kvs,
            revision: at.unwrap_or(header_revision("list a page", response.header())?),
            more: response.more(),
        })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> StoreResult<WatchStream> {
        // "From now" is from the revision after the current one as read here, not as the
        // member that serves the watch knows it (a lagging member would replay older writes).
        let start = match from {
            0 => self.revision().await? + 1,
            from => from,
        };
        let key = self.full_key(prefix);
        let stream = self.conn.open_watch(key.clone(), start).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let task = Forwarder {
            conn: self.conn.clone(),
            prefix: self.prefix.clone(),
            key,
            next: start,
            tx,
            cancel: self.cancel.clone(),
        };
        self.tasks.spawn(task.run(stream));
        Ok(rx)
    }

    async fn revision(&self) -> StoreResult<Revision> {
        let answer =
            self.conn
                .call(
                    "revision read",
                    Safety::Idempotent,
                    |mut kv, key| async move {
                        kv.get(key, Some(GetOptions::new().with_keys_only())).await
                    },
                    self.revision_key(),
                )
                .await?;
        header_revision("revision read", answer.value.header())
    }

    async fn lease_grant(&self, ttl: Duration) -> StoreResult<LeaseId> {
        let ttl = ttl_secs(ttl);
        // The id is chosen here so that a retry after a lost answer grants the same lease (or
        // learns that it exists) instead of a second one.
        for _ in 0..3 {
            let id = rand::random_range(1..=i64::MAX);
            let answer = self
                .conn
                .lease_call("lease grant", Safety::Idempotent, |mut client| async move {
                    let options = LeaseGrantOptions::new().with_id(id);
                    match client.grant(ttl, Some(options)).await {
                        Ok(_) => Ok(true),
                        Err(etcd_client::Error::GRpcStatus(status))
                            if status.message().contains("lease already exists") =>
                        {
                            Ok(false)
                        }
                        Err(error) => Err(error),
                    }
                })
                .await?;
            // "Already exists" after an attempt that may have been applied: that attempt
            // granted it. Otherwise the id was taken (one chance in 2^63): draw another.
            if answer.value || answer.after_unknown {
                return Ok(id as LeaseId);
            }
        }
        Err(backend(EtcdError::Malformed {
            op: "lease grant",
            what: "acceptance of any of three random lease ids",
        }))
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> StoreResult<()> {
        let id = etcd_lease(lease)?;
        // One renewal: etcd-client's `keep_alive` opens a keep-alive stream, sends one request
        // and reads its answer (TTL 0: the lease is gone). Dropping the keeper closes it.
        let answer = self
            .conn
            .lease_call(
                "lease keep-alive",
                Safety::Idempotent,
                |mut client| async move {
                    match client.keep_alive(id).await {
                        Ok(_) => Ok(true),
                        Err(etcd_client::Error::LeaseKeepAliveError(message))
                            if retry::is_lease_not_found(&message) =>
                        {
                            Ok(false)
                        }
                        Err(error) => Err(error),
                    }
                },
            )
            .await?;
        if answer.value {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(lease))
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> StoreResult<()> {
        let id = etcd_lease(lease)?;
        let answer = self
            .conn
            .lease_call(
                "lease revoke",
                Safety::Idempotent,
                |mut client| async move {
                    match client.revoke(id).await {
                        Ok(_) => Ok(true),
                        Err(etcd_client::Error::GRpcStatus(status))
                            if status.message().contains("lease not found") =>
                        {
                            Ok(false)
                        }
                        Err(error) => Err(error),
                    }
                },
            )
            .await?;
        // Not found after an attempt that may have been applied: that attempt revoked it.
        if answer.value || answer.after_unknown {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(lease))
        }
    }
}

/// Forwards one watch's events from etcd to its consumer, reopening the etcd stream when it
/// breaks.
struct Forwarder {
    conn: Conn,
    /// The store's key prefix, stripped from the events' keys.
    prefix: String,
    /// The watched prefix, with the store's prefix.
    key: Vec<u8>,
    /// The first revision not yet delivered: where a reopened stream starts.
    next: Revision,
    tx: mpsc::Sender<WatchEvent>,
    /// The store's: fires when it is dropped.
    cancel: CancellationToken,
}

impl Forwarder {
    async fn run(mut self, mut stream: etcd_client::WatchStream) {
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                () = self.tx.closed() => return,
                () = self.cancel.cancelled() => return,
            };
            match message {
                Ok(Some(response)) => {
                    if response.canceled() {
                        tracing::warn!(
                            prefix = %String::from_utf8_lossy(&self.key),
                            next = self.next,
                            compacted = response.compact_revision(),
                            reason = response.cancel_reason(),
                            "etcd cancelled a watch; closing its stream"
                        );
                        return;
                    }
                    if response.events().is_empty() {
                        // A progress notice: every event up to its revision was delivered.
                        if let Some(header) = response.header() {
                            self.next = self.next.max(revision(header.revision()) + 1);
                        }
                        continue;
                    }
                    let mut last = None;
                    for event in response.events() {
                        last = event.kv().map(|kv| revision(kv.mod_revision())).or(last);
                        let Some(event) = self.event(event) else {
                            continue;
                        };
                        tokio::select! {
                            sent = self.tx.send(event) => {
                                if sent.is_err() {
                                    return;
                                }
                            }
                            () = self.cancel.cancelled() => return,
                        }
                    }
                    // etcd sends all of a revision's events in one response (no `fragment`),
                    // so a reopened stream resumes after the last revision of this one.
                    if let Some(last) = last {
                        self.next = self.next.max(last + 1);
                    }
                }
                Ok(None) | Err(_) => {
                    if let Err(error) = &message {
                        tracing::info!(%error, next = self.next, "etcd watch stream broke; reopening");
                    }
                    let reopened = tokio::select! {
                        reopened = self.conn.open_watch(self.key.clone(), self.next) => reopened,
                        () = self.tx.closed() => return,
                        () = self.cancel.cancelled() => return,
                    };
                    match reopened {
                        Ok(reopened) => stream = reopened,
                        Err(error) => {
                            tracing::warn!(%error, "cannot reopen an etcd watch; closing its stream");
                            return;
                        }
                    }
                }
            }
        }
    }

    fn event(&self, event: &etcd_client::Event) -> Option<WatchEvent> {
        let kv = event.kv()?;
        let convert = |kv: &etcd_client::KeyValue| -> Option<KeyValue> {
            let key = kv.key().strip_prefix(self.prefix.as_bytes())?;
            Some(KeyValue {
                key: String::from_utf8(key.to_vec()).ok()?,
                value: kv.value().to_vec(),
                create_revision: revision(kv.create_revision()),
                mod_revision: revision(kv.mod_revision()),
                version: revision(kv.version()),
                lease: lease_of(kv.lease()),
            })
        };
        let Some(current) = convert(kv) else {
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "skipping a watched key that is not UTF-8");
            return None;
        };
        Some(match event.event_type() {
            etcd_client::EventType::Put => WatchEvent::Put(current),
            etcd_client::EventType::Delete => WatchEvent::Delete {
                key: current.key,
                revision: current.mod_revision,
                prev: event.prev_kv().and_then(convert),
            },
        })
    }
}

#[cfg(test)]
#[path = "etcd_tests.rs"]
mod tests;
