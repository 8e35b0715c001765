//! Connect: find the live backend that holds a key, or place a new one and write its record
//! and the key's claim in one store transaction. The key record's fencing epoch only grows, so a backend handed epoch `n`
//! knows every later owner of its key has a higher one.

use std::sync::Arc;
use std::time::Duration;

use hangar_core::api::{ConnectRequest, ConnectResponse};
use hangar_core::token::TokenKey;
use hangar_core::{BackendId, BackendState};
use hangar_store::{Compare, Expect, KeyValue, Revision, Store, TxnOp, TxnOutcome, WatchEvent};
use tokio::time::Instant;

use crate::api_tokens::{Caller, Scope};
use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::error::ApiError;
use crate::leader::{LEADER_KEY, Leadership, Role};
use crate::lifecycle::{decode_backend, encode};
use crate::placement::Placement;
use crate::records::{BackendRecord, KeyRecord, ResolvedSpawn, backend_key, key_key};
use crate::routes::Routes;

/// A placement transaction: the backend record's compare and write, plus (for a keyed
/// connect) the key's claim for `backend` at `epoch`, if the key is as read (`expect`).
fn with_key_claim(
    compare: Compare,
    op: TxnOp,
    req: &ConnectRequest,
    backend: &BackendId,
    epoch: u64,
    expect: Expect,
) -> (Vec<Compare>, Vec<TxnOp>) {
    let mut compares = vec![compare];
    let mut ops = vec![op];
    if let Some(key) = &req.key {
        let kr = KeyRecord {
            backend: backend.clone(),
            epoch,
        };
        compares.push(Compare::new(key_key(key), expect));
        ops.push(TxnOp::put(key_key(key), encode(&kr), None));
    }
    (compares, ops)
}

/// A random value for a keyless connect's canary bucket.
fn rand_hash() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

/// Attempts at claiming the key before giving up (each attempt re-reads).
const CONNECT_ATTEMPTS: usize = 64;

fn decode_key(kv: &KeyValue) -> Result<KeyRecord, ApiError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Internal(format!("key record {} is unreadable: {e}", kv.key)))
}

pub use crate::validate::validate_connect;

/// Answers connects.
pub struct Connector {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: Arc<SchedulerConfig>,
    pub(crate) token_key: TokenKey,
    pub(crate) placement: Arc<Placement>,
    pub(crate) routes: Arc<Routes>,
    /// Placement is the leader's: a connect carries its fencing token.
    pub(crate) leadership: Arc<Leadership>,
    pub(crate) quotas: Arc<crate::quotas::Quotas>,
    pub(crate) pools: Arc<crate::pools::Pools>,
    pub(crate) backends: Arc<crate::lifecycle::Backends>,
}

/// How a connect got its new backend.
enum Placed {
    /// A new record was written (cold start).
    Cold(BackendRecord),
    /// A warm backend was claimed.
    Warm(BackendRecord),
}

impl Connector {
    fn response(&self, rec: &BackendRecord, spawned: bool, user: &str) -> ConnectResponse {
        let expires = self.clock.now_ms() / 1000 + self.config.token_ttl.as_secs();
        ConnectResponse {
            backend_id: rec.id.clone(),
            key: rec.key.clone(),
            spawned,
            warm: false,
            status: rec.state.name().to_string(),
            url: self.config.backend_url(rec.id.as_str()),
            token: self.token_key.sign(rec.id.as_str(), user, expires),
            status_url: format!("{}/v1/backends/{}", self.config.api_base_url, rec.id),
        }
    }

    fn not_leader(&self) -> ApiError {
        let leader = match self.leadership.role() {
            Role::Follower {
                leader: Some(leader),
            } => format!("; the leader is {} at {}", leader.instance, leader.api_url),
            _ => "; no leader is elected right now".to_string(),
        };
        ApiError::Fenced(format!(
            "this instance does not lead, and only the leader places backends{leader}: retry"
        ))
    }

    /// Waits until backend `rec` (read at `revision`) is terminated or removed, or answers
    /// 409 with `Retry-After` at `until`.
    async fn wait_gone(
        &self,
        rec: &BackendRecord,
        revision: Revision,
        until: Instant,
    ) -> Result<(), ApiError> {
        let key = backend_key(rec.id.as_str());
        let mut watch = self.store.watch(&key, revision + 1).await?;
        let busy = || ApiError::Busy {
            message: format!(
                "the key's previous backend {} is still stopping on drone {}: retry once it is gone",
                rec.id,
                rec.drone.as_deref().unwrap_or("?")
            ),
            retry_after: Duration::from_secs(1),
        };
        loop {
            match tokio::time::timeout_at(until, watch.recv()).await {
                Err(_) => return Err(busy()),
                Ok(None) => return Ok(()), // the watch broke: read again
                Ok(Some(WatchEvent::Delete { .. })) => return Ok(()),
                Ok(Some(WatchEvent::Put(kv))) => {
                    if !decode_backend(&kv)?.state.is_live() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Writes a new backend record and the key's claim in one fenced transaction, once the
    /// route table has it. `None`: the key or the id was taken meanwhile (read again).
    #[allow(clippy::too_many_arguments)]
    async fn place_cold(
        &self,
        req: &ConnectRequest,
        spawn: ResolvedSpawn,
        pool: Option<crate::records::PoolMember>,
        epoch: u64,
        expect: Expect,
        token: Revision,
        created_by: Option<String>,
    ) -> Result<Option<BackendRecord>, ApiError> {
        let reservation = self.placement.place(&spawn)?;
        let drone = reservation.drone.clone();
        let now = self.clock.now_ms();
        let rec = BackendRecord {
            key: req.key.clone(),
            epoch,
            user: req.user.clone(),
            public: req.public,
            created_by,
            pool,
            ..BackendRecord::scheduled(spawn, &drone.name, &drone.run_id, now)
        };
        // One transaction: the backend record and the key's claim, or neither (no orphan
        // record if the claim loses, no claim without its record).
        let bkey = backend_key(rec.id.as_str());
        let (compares, ops) = with_key_claim(
            Compare::absent(bkey.clone()),
            TxnOp::put(bkey, encode(&rec), None),
            req,
            &rec.id,
            epoch,
            expect,
        );
        let brev = self.commit(compares, ops, token).await?;
        let Some(brev) = brev else { return Ok(None) };
        // The record is the spawn command: the instance holding the drone's session relays it.
        metrics::counter!(crate::metrics::LEADER_COMMANDS_TOTAL).increment(1);
        reservation.written(brev);
        // Answer only once the route table has the backend, so a client that uses the URL
        // right away finds it starting in the proxy instead of unknown.
        self.routes.wait_for(brev).await;
        Ok(Some(rec))
    }

    /// Claims warm backend `id` for the connect's key: one fenced transaction moves it from
    /// warm to claimed (with the key, its next epoch and the caller) if it is still warm and
    /// unchanged, and writes the key's claim; then the backend is told its key. `None`:
    /// someone claimed or removed it first, or the key changed (read again).
    async fn claim(
        &self,
        id: &BackendId,
        req: &ConnectRequest,
        epoch: u64,
        expect: Expect,
        token: Revision,
        created_by: Option<String>,
    ) -> Result<Option<BackendRecord>, ApiError> {
        let Some(stored) = self.routes.live_record(id) else {
            return Ok(None);
        };
        let mut rec = stored.record;
        if !rec.is_unclaimed() || rec.state != BackendState::Ready {
            return Ok(None);
        }
        let now = self.clock.now_ms();
        rec.key = req.key.clone();
        rec.epoch = if req.key.is_some() { epoch } else { rec.epoch };
        rec.user = req.user.clone();
        rec.public = req.public;
        rec.created_by = created_by;
        rec.updated_at = now;
        let secret = rec.pool.as_ref().and_then(|p| p.claim_secret.clone());
        if let Some(p) = rec.pool.as_mut() {
            p.claimed_at = Some(now);
        }
        let bkey = backend_key(rec.id.as_str());
        let (compares, ops) = with_key_claim(
            Compare::mod_revision(bkey.clone(), stored.mod_revision),
            TxnOp::put(bkey, encode(&rec), None),
            req,
            &rec.id,
            epoch,
            expect,
        );
        let Some(brev) = self.commit(compares, ops, token).await? else {
            return Ok(None);
        };
        // The backend learns its key before the connect answers (and the route table routes
        // it only from this revision on).
        if let (Some(address), Some(secret)) = (rec.address, secret) {
            let key = rec.key.as_ref().map(|k| k.to_string()).unwrap_or_default();
            let told =
                async { crate::pools::claim::send_claim(address, &secret, &key, rec.epoch).await };
            let (answer, ()) = tokio::join!(told, self.routes.wait_for(brev));
            if let crate::pools::claim::ClaimAnswer::Refused(why) = answer {
                // It holds the key now, but cannot be trusted with it: stop it, and let the
                // connect wait for it to go and start a cold one.
                tracing::warn!(backend = %rec.id, %why, "a claimed warm backend refused its claim; stopping it");
                let backends = self.backends.fenced(token);
                backends
                    .terminate(
                        rec.id.as_str(),
                        hangar_core::TerminationReason::Failed { exit_code: None },
                        false,
                    )
                    .await?;
                return Ok(None);
            }
        } else {
            self.routes.wait_for(brev).await;
        }
        Ok(Some(rec))
    }

    /// Commits a placement transaction with the leader's fence. `None`: a compare other
    /// than the fence failed.
    async fn commit(
        &self,
        mut compares: Vec<Compare>,
        ops: Vec<TxnOp>,
        token: Revision,
    ) -> Result<Option<Revision>, ApiError> {
        let fence = compares.len();
        compares.push(Compare::create_revision(LEADER_KEY, token));
        match self.store.txn(compares, ops).await? {
            TxnOutcome::Committed(r) => {
                metrics::counter!(crate::metrics::LEADER_WRITES_TOTAL).increment(1);
                Ok(Some(r))
            }
            TxnOutcome::Failed { compare, .. } if compare == fence => {
                metrics::counter!(crate::metrics::FENCED_WRITES_TOTAL).increment(1);
                Err(ApiError::Fenced(format!(
                    "this instance stopped leading (term {token}) during the connect: retry"
                )))
            }
            TxnOutcome::Failed { .. } => Ok(None),
        }
    }

    /// Connects with everything allowed (in-process callers and tests).
    pub async fn connect(&self, req: ConnectRequest) -> Result<ConnectResponse, ApiError> {
        self.connect_as(req, &Caller::Open).await
    }

    /// `POST /v1/connect`: returns the key's live backend, or starts one, for `caller`: a raw
    /// `spawn.command` or `spawn.image` needs the admin scope (others get what the operator
    /// defined), and a namespace-bound token only reaches keys of its namespace.
    pub async fn connect_as(
        &self,
        req: ConnectRequest,
        caller: &Caller,
    ) -> Result<ConnectResponse, ApiError> {
        validate_connect(&req)?;
        if let Some(spawn) = &req.spawn
            && (spawn.command.is_some() || spawn.image.is_some())
        {
            caller.require(Scope::Admin, "a raw spawn.command or spawn.image")?;
        }
        if let Caller::Token {
            namespace: Some(ns),
            ..
        } = caller
            && req.key.as_ref().is_some_and(|k| k.namespace != *ns)
        {
            return Err(ApiError::Forbidden(format!(
                "this token is bound to namespace {ns:?}: it cannot connect keys of another namespace"
            )));
        }
        let created_by = caller.token_id().map(str::to_owned);
        let namespace = req
            .key
            .as_ref()
            .map_or("default", |k| k.namespace.as_str())
            .to_string();
        self.quotas.admit_connect(&namespace)?;
        let user = req.user.clone().unwrap_or_default();
        let wait_until = Instant::now() + self.config.predecessor_wait;
        // Warm backends this connect failed to claim: claimed or stopped meanwhile. The feed
        // may not have applied that change yet, and would offer them again.
        let mut passed = Vec::new();
        for _ in 0..CONNECT_ATTEMPTS {
            // 1. The key's current assignment, if any, and whether its backend still holds it.
            let mut expect = Expect::Absent;
            let mut epoch = 1;
            if let Some(key) = &req.key
                && let Some(kv) = self.store.get(&key_key(key)).await?
            {
                let kr = decode_key(&kv)?;
                expect = Expect::ModRevision(kv.mod_revision);
                epoch = kr.epoch + 1;
                if let Some(bkv) = self.store.get(&backend_key(kr.backend.as_str())).await? {
                    let rec = decode_backend(&bkv)?;
                    if rec.holds_key() {
                        return Ok(self.response(&rec, false, &user));
                    }
                    if rec.state.is_live() {
                        // Terminating: its process may still run. A key never has two running
                        // processes, so the next one is placed only once this one is gone.
                        self.wait_gone(&rec, bkv.mod_revision, wait_until).await?;
                        continue;
                    }
                }
            }
            // 2. Place a new backend: the leader's job.
            let token = self.leadership.token().ok_or_else(|| self.not_leader())?;
            let pool = self.pools.for_connect(&req)?;
            // Counted against the namespace's live quota until the route table counts it.
            let _placing = self
                .quotas
                .place(&namespace, self.routes.live_in_namespace(&namespace))?;
            let placed = match &pool {
                Some(pool) => {
                    let hash = match &req.key {
                        Some(k) => hangar_core::pool::key_hash(&k.to_string()),
                        None => rand_hash(),
                    };
                    let generation = pool.generation_for(hash);
                    // A warm backend serves only a connect that asks for nothing of its own.
                    let warm = if req.spawn.is_none() {
                        self.pools
                            .hold_warm(&self.routes, &pool.name, generation, &passed)
                    } else {
                        None
                    };
                    match warm {
                        Some(held) => {
                            match self
                                .claim(&held.id, &req, epoch, expect, token, created_by.clone())
                                .await?
                            {
                                Some(rec) => Placed::Warm(rec),
                                // Claimed or removed by someone else meanwhile: read again.
                                None => {
                                    passed.push(held.id.clone());
                                    continue;
                                }
                            }
                        }
                        None => {
                            if let Some(max) = pool.max_live {
                                let live = self.routes.pool_size(&pool.name) as u64;
                                if live >= u64::from(max) {
                                    return Err(ApiError::TooMany {
                                        message: format!(
                                            "pool {} may have at most {max} live backends and has {live}: raise it with `hangar pool set {} --max-live N`",
                                            pool.name, pool.name
                                        ),
                                        retry_after: Duration::from_secs(5),
                                    });
                                }
                            }
                            let spawn = self.pools.resolve(pool, generation, req.spawn.as_ref())?;
                            let member = crate::records::PoolMember {
                                name: pool.name.clone(),
                                generation,
                                claimed_at: Some(self.clock.now_ms()),
                                claim_secret: None,
                            };
                            match self
                                .place_cold(
                                    &req,
                                    spawn,
                                    Some(member),
                                    epoch,
                                    expect,
                                    token,
                                    created_by.clone(),
                                )
                                .await?
                            {
                                Some(rec) => Placed::Cold(rec),
                                None => continue,
                            }
                        }
                    }
                }
                None => {
                    let spawn = self
                        .config
                        .resolve_spawn(req.spawn.clone().unwrap_or_default());
                    match self
                        .place_cold(&req, spawn, None, epoch, expect, token, created_by.clone())
                        .await?
                    {
                        Some(rec) => Placed::Cold(rec),
                        None => continue,
                    }
                }
            };
            return Ok(match placed {
                Placed::Cold(rec) => {
                    metrics::counter!(crate::metrics::SPAWNS_TOTAL).increment(1);
                    if let Some(p) = &rec.pool {
                        crate::metrics::pool_claim(&p.name, "cold");
                    }
                    tracing::info!(backend = %rec.id, key = ?rec.key.as_ref().map(|k| k.to_string()), drone = ?rec.drone, "backend scheduled");
                    self.response(&rec, true, &user)
                }
                Placed::Warm(rec) => {
                    if let Some(p) = &rec.pool {
                        crate::metrics::pool_claim(&p.name, "warm");
                    }
                    tracing::info!(backend = %rec.id, key = ?rec.key.as_ref().map(|k| k.to_string()), drone = ?rec.drone, "warm backend claimed");
                    ConnectResponse {
                        warm: true,
                        ..self.response(&rec, true, &user)
                    }
                }
            });
        }
        Err(ApiError::Conflict(
            "the key is contended by too many concurrent connects; retry".into(),
        ))
    }
}
