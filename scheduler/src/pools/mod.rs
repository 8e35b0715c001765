//! Pools: a spawn template, the warm backends kept for it, and its generations (rollouts).
//!
//! Pool records (`/hangar/pools/<name>`, a [`Pool`] in JSON) are mirrored by every instance.
//! Operators change them through the API (any instance: compare-and-swap on the record);
//! the leader's [`converger::Converger`] keeps each pool's warm backends at their target and
//! drives rollouts, writing through its fenced store. A connect claims a warm backend in
//! [`crate::connect`] (one conditional write) and tells it its key ([`claim`]).

pub mod claim;
pub mod converger;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use hangar_core::BackendId;
use hangar_core::api::{ConnectRequest, SpawnSpec};
use hangar_core::pool::{
    Bounds, CreatePool, DEFAULT_POOL, Generation, HISTORY, Pool, PoolSettings, RollbackRequest,
    Rollout, RolloutRequest, Template, validate_name,
};
use hangar_store::{Compare, Expect, Revision, Store, TxnOp, TxnOutcome};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::error::ApiError;
use crate::leader::LEADER_KEY;
use crate::lifecycle::encode;
use crate::records::ResolvedSpawn;

/// Prefix of pool records.
pub const POOLS_PREFIX: &str = "/hangar/pools/";

pub fn pool_key(name: &str) -> String {
    format!("{POOLS_PREFIX}{name}")
}

/// The most warm backends a pool may ask for.
pub const MAX_WARM: u32 = 10_000;

/// Healthy starts after which a canary promotes itself, unless the pool says otherwise.
pub const DEFAULT_PROMOTE_AFTER: u32 = 3;

/// How long a rollout may take to prove itself before it reverts, unless it says otherwise.
pub const DEFAULT_DEADLINE_S: u64 = 300;

/// The failure rate past which a rollout reverts, unless it says otherwise.
pub const DEFAULT_MAX_FAILURE_PERCENT: u8 = 50;

/// The pool records, as mirrored, and the warm backends being claimed right now here.
pub struct Pools {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: Arc<SchedulerConfig>,
    pools: RwLock<HashMap<String, (Arc<Pool>, Revision)>>,
    /// Bumped on every change, so the converger runs again.
    changed: watch::Sender<u64>,
    /// Warm backends a connect on this instance is claiming (so concurrent connects pick
    /// different ones instead of racing for the same).
    claiming: Mutex<HashSet<BackendId>>,
}

/// A warm backend held for one connect's claim; released when dropped.
pub struct Claiming<'a> {
    pools: &'a Pools,
    pub id: BackendId,
}

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        self.pools
            .claiming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl Pools {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, config: Arc<SchedulerConfig>) -> Self {
        Pools {
            store,
            clock,
            config,
            pools: RwLock::default(),
            changed: watch::channel(0).0,
            claiming: Mutex::default(),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Pool>> {
        self.pools
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|(p, _)| p.clone())
    }

    /// Every pool, by name.
    pub fn list(&self) -> Vec<Arc<Pool>> {
        let mut pools: Vec<_> = self
            .pools
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(p, _)| p.clone())
            .collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        pools
    }

    /// Wakes on every change of the pool records.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The pool a connect draws from: the one it names (which must exist), else `default`
    /// if it exists. `None`: the connect starts cold from the cluster's default or from its
    /// own raw spawn, outside any pool.
    pub fn for_connect(&self, req: &ConnectRequest) -> Result<Option<Arc<Pool>>, ApiError> {
        let raw = req
            .spawn
            .as_ref()
            .is_some_and(|s| s.command.is_some() || s.image.is_some());
        match &req.pool {
            Some(name) if raw => Err(ApiError::BadRequest(format!(
                "pool {name:?} and spawn.command/spawn.image are exclusive: a pool defines what runs"
            ))),
            Some(name) => self.get(name).map(Some).ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no pool {name:?}: see `hangar pool ls`, or create it with `hangar pool create {name}`"
                ))
            }),
            None if raw => Ok(None),
            None => Ok(self.get(DEFAULT_POOL)),
        }
    }

    /// Holds the first ready warm backend of `pool`'s generation `generation` that no other
    /// connect here is claiming and that is not in `passed` (those this connect already
    /// failed to claim), in the order the converger would keep them (oldest first, so none
    /// grows stale).
    pub fn hold_warm<'a>(
        &'a self,
        routes: &crate::routes::Routes,
        pool: &str,
        generation: u64,
        passed: &[BackendId],
    ) -> Option<Claiming<'a>> {
        let mut members = routes.ready_warm(pool, generation);
        members.sort_by(|(a, at), (b, bt)| at.cmp(bt).then(a.cmp(b)));
        let mut claiming = self.claiming.lock().unwrap_or_else(|e| e.into_inner());
        let (id, _) = members
            .into_iter()
            .find(|(id, _)| !claiming.contains(id) && !passed.contains(id))?;
        claiming.insert(id.clone());
        Some(Claiming { pools: self, id })
    }

    /// What a backend of `pool`'s generation `generation` runs, with the connect's own
    /// settings (`overrides`, never a command or image) over the template's.
    pub fn resolve(
        &self,
        pool: &Pool,
        generation: u64,
        overrides: Option<&SpawnSpec>,
    ) -> Result<ResolvedSpawn, ApiError> {
        let t = pool.template(generation).ok_or_else(|| {
            ApiError::Internal(format!(
                "pool {} has no generation {generation} in its history",
                pool.name
            ))
        })?;
        // The connect's own settings over the template's (never a command or image).
        let o = overrides.cloned().unwrap_or_default();
        let mut env = t.env.clone();
        env.extend(o.env);
        Ok(self.config.resolve_spawn(SpawnSpec {
            env,
            idle_timeout_s: o.idle_timeout_s.or(t.idle_timeout_s),
            lifetime_s: o.lifetime_s.or(t.lifetime_s),
            resources: o.resources.or(t.resources),
            pool: Some(pool.drone_pool.clone()),
            ..t.spec()
        }))
    }

    /// `POST /v1/pools`.
    pub async fn create(&self, req: CreatePool) -> Result<Pool, ApiError> {
        validate_name(&req.name).map_err(ApiError::BadRequest)?;
        validate_template(&req.template)?;
        let now = self.clock.now_ms();
        let warm = req.settings.warm.unwrap_or(0);
        let mut pool = Pool {
            name: req.name.clone(),
            warm,
            max_live: None,
            drone_pool: hangar_core::pool::DEFAULT_POOL.to_string(),
            bounds: Bounds::for_warm(warm),
            promote_after: DEFAULT_PROMOTE_AFTER,
            generation: 1,
            rollout: None,
            generations: vec![Generation {
                number: 1,
                template: req.template,
                created_at: now,
                status: "stable".into(),
                message: None,
            }],
            status: Default::default(),
            created_at: now,
            updated_at: now,
        };
        apply_settings(&mut pool, &req.settings)?;
        let key = pool_key(&pool.name);
        match self
            .store
            .txn(
                vec![Compare::new(key.clone(), Expect::Absent)],
                vec![TxnOp::put(key, encode(&pool), None)],
            )
            .await?
        {
            TxnOutcome::Committed(r) => {
                self.remember(pool.clone(), r);
                tracing::info!(pool = %pool.name, warm = pool.warm, "pool created");
                Ok(pool)
            }
            TxnOutcome::Failed { .. } => Err(ApiError::Conflict(format!(
                "pool {:?} exists: change it with `hangar pool set`",
                req.name
            ))),
        }
    }

    /// `PATCH /v1/pools/{name}`.
    pub async fn set(&self, name: &str, settings: PoolSettings) -> Result<Pool, ApiError> {
        self.modify(name, None, |p, _| apply_settings(p, &settings))
            .await
    }

    /// `DELETE /v1/pools/{name}`: the record goes; the converger stops its warm backends
    /// (claimed ones live on).
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        if !self.store.delete(&pool_key(name)).await? {
            return Err(not_found(name));
        }
        self.pools
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.changed.send_modify(|n| *n += 1);
        tracing::info!(pool = %name, "pool deleted");
        Ok(())
    }

    /// `POST /v1/pools/{name}/rollout`: a new generation for new sessions (all of them, or
    /// a canary share by key hash).
    pub async fn rollout(&self, name: &str, req: RolloutRequest) -> Result<Pool, ApiError> {
        let canary = req.canary_percent.unwrap_or(100);
        if !(1..=100).contains(&canary) {
            return Err(ApiError::BadRequest(
                "canary_percent must be 1 to 100".into(),
            ));
        }
        let failure = req
            .max_failure_percent
            .unwrap_or(DEFAULT_MAX_FAILURE_PERCENT);
        if !(1..=100).contains(&failure) {
            return Err(ApiError::BadRequest(
                "max_failure_percent must be 1 to 100".into(),
            ));
        }
        if req.image.is_none() && req.command.is_none() && req.env.is_none() {
            return Err(ApiError::BadRequest(
                "a rollout changes something: give image, command or env".into(),
            ));
        }
        let deadline_s = req.deadline_s.unwrap_or(DEFAULT_DEADLINE_S);
        if deadline_s == 0 {
            return Err(ApiError::BadRequest("deadline_s must be at least 1".into()));
        }
        self.modify(name, None, |p, now| {
            if let Some(r) = &p.rollout {
                return Err(ApiError::Conflict(format!(
                    "pool {} is rolling out generation {} already: promote it or roll back first",
                    p.name, r.generation
                )));
            }
            let base = p.template(p.generation).cloned().unwrap_or_default();
            let template = match (&req.image, &req.command) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::BadRequest(
                        "image and command are exclusive: give one".into(),
                    ));
                }
                (Some(image), None) => Template {
                    image: Some(image.clone()),
                    command: None,
                    ..base.clone()
                },
                (None, Some(command)) => Template {
                    command: Some(command.clone()),
                    image: None,
                    ..base.clone()
                },
                (None, None) => base.clone(),
            };
            let template = Template {
                env: req.env.clone().unwrap_or(template.env.clone()),
                ..template
            };
            validate_template(&template)?;
            let number = p.generations.iter().map(|g| g.number).max().unwrap_or(0) + 1;
            push_generation(
                p,
                Generation {
                    number,
                    template,
                    created_at: now,
                    status: "rolling".into(),
                    message: None,
                },
            );
            p.rollout = Some(Rollout {
                generation: number,
                canary_percent: canary,
                started_at: now,
                deadline_at: now + deadline_s * 1000,
                max_failure_percent: failure,
                healthy: 0,
                failed: 0,
            });
            Ok(())
        })
        .await
    }

    /// `POST /v1/pools/{name}/promote`: the rollout's generation becomes the one every new
    /// session gets.
    pub async fn promote(&self, name: &str) -> Result<Pool, ApiError> {
        self.modify(name, None, |p, _| {
            if p.rollout.is_none() {
                return Err(ApiError::Conflict(format!(
                    "pool {} has no rollout in progress",
                    p.name
                )));
            }
            finish_rollout(p, "stable", "promoted by an operator");
            Ok(())
        })
        .await
    }

    /// `POST /v1/pools/{name}/rollback`: new sessions go back to generation `to` (default:
    /// the one before the current); a rollout in progress is abandoned.
    pub async fn rollback(&self, name: &str, req: RollbackRequest) -> Result<Pool, ApiError> {
        self.modify(name, None, |p, _| {
            if p.rollout.is_some() && req.to.is_none() {
                finish_rollout(p, "rolled_back", "rolled back by an operator");
                return Ok(());
            }
            let to = match req.to {
                Some(to) => to,
                None => p
                    .generations
                    .iter()
                    .map(|g| g.number)
                    .filter(|n| *n < p.generation)
                    .max()
                    .ok_or_else(|| {
                        ApiError::Conflict(format!(
                            "pool {} has no generation before {} to roll back to",
                            p.name, p.generation
                        ))
                    })?,
            };
            if p.template(to).is_none() {
                return Err(ApiError::NotFound(format!(
                    "pool {} has no generation {to} in its history (see `hangar pool show {}`)",
                    p.name, p.name
                )));
            }
            if p.rollout.is_some() {
                finish_rollout(p, "rolled_back", "rolled back by an operator");
            }
            let from = p.generation;
            for g in &mut p.generations {
                if g.number == from && from != to {
                    g.status = "rolled_back".into();
                    g.message = Some(format!("rolled back to generation {to}"));
                }
                if g.number == to {
                    g.status = "stable".into();
                }
            }
            p.generation = to;
            Ok(())
        })
        .await
    }

    /// Changes pool `name` with compare-and-swap (retrying on conflict), fenced by the
    /// leader's `fence` token when one is given. `change` gets the pool and the time.
    pub(crate) async fn modify(
        &self,
        name: &str,
        fence: Option<Revision>,
        mut change: impl FnMut(&mut Pool, u64) -> Result<(), ApiError>,
    ) -> Result<Pool, ApiError> {
        let key = pool_key(name);
        loop {
            let kv = self.store.get(&key).await?.ok_or_else(|| not_found(name))?;
            let mut pool: Pool = serde_json::from_slice(&kv.value)
                .map_err(|e| ApiError::Internal(format!("pool record {key} is unreadable: {e}")))?;
            let now = self.clock.now_ms();
            let before = pool.clone();
            change(&mut pool, now)?;
            if pool == before {
                return Ok(pool);
            }
            pool.updated_at = now;
            let mut compares = vec![Compare::mod_revision(key.clone(), kv.mod_revision)];
            if let Some(token) = fence {
                compares.push(Compare::create_revision(LEADER_KEY, token));
            }
            match self
                .store
                .txn(compares, vec![TxnOp::put(key.clone(), encode(&pool), None)])
                .await?
            {
                TxnOutcome::Committed(r) => {
                    self.remember(pool.clone(), r);
                    return Ok(pool);
                }
                TxnOutcome::Failed { compare: 0, .. } => continue,
                TxnOutcome::Failed { .. } => {
                    metrics::counter!(crate::metrics::FENCED_WRITES_TOTAL).increment(1);
                    return Err(ApiError::Fenced(format!(
                        "this instance is no longer the leader: pool {name} was not changed"
                    )));
                }
            }
        }
    }

    /// Takes a record this instance wrote (the mirror brings it too, later).
    fn remember(&self, pool: Pool, revision: Revision) {
        let mut pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
        let newer = pools.get(&pool.name).is_none_or(|(_, r)| *r < revision);
        if newer {
            pools.insert(pool.name.clone(), (Arc::new(pool), revision));
        }
        drop(pools);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Mirrors the pool records until `cancel` fires.
    pub async fn follow(&self, cancel: CancellationToken) {
        hangar_store::mirror::mirror_prefix::<Pool>(
            self.store.as_ref(),
            POOLS_PREFIX,
            cancel,
            |records: &BTreeMap<String, Pool>, revision| {
                let mut pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
                // Keep a record this instance wrote after the mirror's revision.
                let mine: HashMap<String, (Arc<Pool>, Revision)> =
                    pools.drain().filter(|(_, (_, r))| *r > revision).collect();
                for p in records.values() {
                    pools.insert(p.name.clone(), (Arc::new(p.clone()), revision));
                }
                pools.extend(mine);
                drop(pools);
                self.changed.send_modify(|n| *n += 1);
            },
        )
        .await
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("no pool {name:?}: see `hangar pool ls`"))
}

/// A template must run something the cluster allows, within the connect limits.
fn validate_template(t: &Template) -> Result<(), ApiError> {
    let req = ConnectRequest {
        spawn: Some(t.spec()),
        ..Default::default()
    };
    crate::validate::validate_connect(&req)
        .map_err(|e| ApiError::BadRequest(format!("template: {e}")))
}

fn apply_settings(p: &mut Pool, s: &PoolSettings) -> Result<(), ApiError> {
    if let Some(warm) = s.warm {
        if warm > MAX_WARM {
            return Err(ApiError::BadRequest(format!(
                "warm must be at most {MAX_WARM}"
            )));
        }
        // Bounds that were the defaults follow the new size.
        if p.bounds == Bounds::for_warm(p.warm) {
            p.bounds = Bounds::for_warm(warm);
        }
        p.warm = warm;
    }
    match s.max_live {
        Some(0) => p.max_live = None,
        Some(n) => p.max_live = Some(n),
        None => {}
    }
    if let Some(d) = &s.drone_pool {
        hangar_core::ids::validate_label(d).map_err(|_| {
            ApiError::BadRequest(format!(
                "drone_pool {d:?} must be lowercase letters, digits and '-' (at most 63)"
            ))
        })?;
        p.drone_pool = d.clone();
    }
    if let Some(n) = s.max_add {
        p.bounds.max_add = n;
    }
    if let Some(n) = s.max_remove {
        p.bounds.max_remove = n;
    }
    if p.bounds.max_add == 0 || p.bounds.max_remove == 0 {
        return Err(ApiError::BadRequest(
            "max_add and max_remove must be at least 1".into(),
        ));
    }
    if let Some(n) = s.promote_after {
        if n == 0 {
            return Err(ApiError::BadRequest(
                "promote_after must be at least 1".into(),
            ));
        }
        p.promote_after = n;
    }
    if let Some(max) = p.max_live
        && max < p.warm
    {
        return Err(ApiError::BadRequest(format!(
            "max_live ({max}) is below warm ({}): the pool could never be full",
            p.warm
        )));
    }
    Ok(())
}

/// Appends a generation, keeping the last [`HISTORY`] (never the current one or the
/// rollout's).
fn push_generation(p: &mut Pool, g: Generation) {
    for old in &mut p.generations {
        if old.status == "stable" && old.number != p.generation {
            old.status = "superseded".into();
        }
    }
    p.generations.push(g);
    while p.generations.len() > HISTORY {
        let keep = [p.generation, p.rollout.as_ref().map_or(0, |r| r.generation)];
        match p.generations.iter().position(|g| !keep.contains(&g.number)) {
            Some(i) => {
                p.generations.remove(i);
            }
            None => break,
        }
    }
}

/// Ends the rollout with its generation's new `status`: `stable` promotes it (it becomes
/// current); `reverted` or `rolled_back` leave new sessions on the current one.
pub(crate) fn finish_rollout(p: &mut Pool, status: &str, why: &str) {
    let promoted = status == "stable";
    let Some(r) = p.rollout.take() else { return };
    let old = p.generation;
    for g in &mut p.generations {
        if promoted && g.number == old {
            g.status = "superseded".into();
        }
        if g.number == r.generation {
            g.status = status.into();
            g.message = Some(why.to_string());
        }
    }
    if promoted {
        p.generation = r.generation;
    }
}
