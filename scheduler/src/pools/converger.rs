//! The pool converger (the leader's): keeps each pool's warm backends at their targets and
//! drives its rollout.
//!
//! It has no loop of its own to remember: every pass reads the pools and their live members
//! as they are (level-triggered, so a missed event or a partial failure is corrected by the
//! next pass), asks the pure planner ([`hangar_core::pool::plan`]) for a bounded step, and
//! applies it with conditional writes fenced by the leader's term. Passes run on every change
//! of the pools or the route table and on a period, at most one per [`MIN_GAP`].
//!
//! What it remembers between passes is only what makes its steps careful: the slow-start
//! step after failed starts (1, 2, 4, then the bound, so a broken image does not flood the
//! drones) and the start tallies it last saw, to tell new failures from old ones. A new
//! leader starts from the tallies as they are.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_core::pool::plan::{Desired, Member, next_slow_start, plan};
use hangar_core::pool::{Bounds, Pool, PoolStatus};
use hangar_core::{BackendState, TerminationReason};
use hangar_store::{Compare, Revision, Store, TxnOp, TxnOutcome};
use rand::RngCore;
use tokio_util::sync::CancellationToken;

use super::{Pools, finish_rollout};
use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::error::ApiError;
use crate::leader::LEADER_KEY;
use crate::lifecycle::{Backends, encode};
use crate::placement::Placement;
use crate::records::{BackendRecord, PoolMember, backend_key};
use crate::routes::{Routes, SETTLE, StartTally};

/// The shortest time between two passes: changes arriving meanwhile fold into the next.
pub const MIN_GAP: Duration = Duration::from_millis(50);

/// A status that only counts backends is written at most this often (a claim changes it, and
/// a store write per claim would double the cost of a connect); failures and rollout changes
/// are written at once.
pub const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Removals per pass for a deleted pool's warm backends.
const DELETED_POOL_BOUNDS: Bounds = Bounds {
    max_add: 0,
    max_remove: 8,
};

/// What the converger remembers of one pool.
#[derive(Debug, Default)]
struct Memory {
    /// The slow-start step (`None`: the full bound).
    slow_start: Option<u32>,
    /// The start tallies last seen, per generation (absent until the first pass).
    seen: Option<HashMap<u64, StartTally>>,
    /// When the pool's status was last written.
    status_written: Option<tokio::time::Instant>,
}

/// What changed in a pool's starts since the last pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Outcomes {
    ready: u64,
    failed: u64,
    failed_after_ready: u64,
    last_failure: Option<(u64, String)>,
    /// The rollout generation's share of the above: (healthy, failed).
    rollout: (u64, u64),
    last_rollout_ready: Option<u64>,
}

pub(crate) struct Converger {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: Arc<SchedulerConfig>,
    pools: Arc<Pools>,
    routes: Arc<Routes>,
    placement: Arc<Placement>,
    /// The leader's fenced view.
    backends: Arc<Backends>,
    /// The leader's fencing token.
    token: Revision,
    memory: Mutex<HashMap<String, Memory>>,
}

impl Converger {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: Arc<SchedulerConfig>,
        pools: Arc<Pools>,
        routes: Arc<Routes>,
        placement: Arc<Placement>,
        backends: Arc<Backends>,
        token: Revision,
    ) -> Self {
        Converger {
            store,
            clock,
            config,
            pools,
            routes,
            placement,
            backends,
            token,
            memory: Mutex::default(),
        }
    }

    pub(crate) async fn run(self, cancel: CancellationToken) {
        let mut routes = self.routes.subscribe();
        let mut pools = self.pools.subscribe();
        let mut tick = tokio::time::interval(self.config.pool_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
                r = routes.changed() => if r.is_err() { return },
                r = pools.changed() => if r.is_err() { return },
            }
            match self.pass().await {
                Ok(()) => {}
                Err(ApiError::Fenced(_)) => return,
                Err(e) => tracing::warn!(error = %e, "pool converger pass failed; retrying"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(MIN_GAP) => {}
            }
        }
    }

    /// One pass over every pool (and the warm backends of deleted ones).
    pub(crate) async fn pass(&self) -> Result<(), ApiError> {
        let pools = self.pools.list();
        let names: HashSet<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        for pool in &pools {
            match self.converge(pool).await {
                Ok(()) => {}
                Err(e @ ApiError::Fenced(_)) => return Err(e),
                Err(e) => tracing::warn!(pool = %pool.name, error = %e, "pool pass failed"),
            }
        }
        for gone in self.routes.pools_with_members() {
            if names.contains(gone.as_str()) {
                continue;
            }
            let (warm, _) = self.members(&gone);
            let desired = Desired {
                targets: BTreeMap::new(),
                max_live: None,
                claimed: 0,
            };
            let step = plan(&desired, &warm, DELETED_POOL_BOUNDS, None);
            self.remove(&gone, &step.remove).await?;
        }
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| names.contains(name.as_str()));
        Ok(())
    }

    /// The pool's unclaimed members and how many are claimed.
    fn members(&self, pool: &str) -> (Vec<Member>, u32) {
        let mut warm = Vec::new();
        let mut claimed = 0;
        for (id, f) in self.routes.pool_members(pool) {
            if f.unclaimed {
                warm.push(Member {
                    id: id.to_string(),
                    generation: f.generation,
                    ready: f.ready,
                    created_at: f.created_at,
                });
            } else {
                claimed += 1;
            }
        }
        (warm, claimed)
    }

    /// What happened to the pool's starts since the last pass (nothing on the first).
    fn outcomes(&self, pool: &Pool) -> Outcomes {
        let mut generations: Vec<u64> = pool.generations.iter().map(|g| g.number).collect();
        generations.push(pool.generation);
        generations.sort_unstable();
        generations.dedup();
        let now: HashMap<u64, StartTally> = generations
            .iter()
            .map(|g| (*g, self.routes.start_tally(&pool.name, *g)))
            .collect();
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let m = memory.entry(pool.name.clone()).or_default();
        let Some(seen) = m.seen.replace(now.clone()) else {
            return Outcomes::default();
        };
        let mut out = Outcomes::default();
        let rollout = pool.rollout.as_ref().map(|r| r.generation);
        for (g, t) in &now {
            let before = seen.get(g).cloned().unwrap_or_default();
            // Counts only grow, unless the route feed re-listed (then start over from here).
            if t.ready < before.ready
                || t.failed < before.failed
                || t.failed_after_ready < before.failed_after_ready
            {
                continue;
            }
            let ready = t.ready - before.ready;
            let failed = t.failed - before.failed;
            let after = t.failed_after_ready - before.failed_after_ready;
            out.ready += ready;
            out.failed += failed;
            out.failed_after_ready += after;
            if failed + after > 0
                && t.last_failure.as_ref().map(|f| f.0) > out.last_failure.as_ref().map(|f| f.0)
            {
                out.last_failure = t.last_failure.clone();
            }
            if Some(*g) == rollout {
                out.rollout = (ready.saturating_sub(after), failed + after);
                out.last_rollout_ready = t.last_ready_at;
            }
        }
        out
    }

    async fn converge(&self, pool: &Arc<Pool>) -> Result<(), ApiError> {
        let now = self.clock.now_ms();
        let (warm, claimed) = self.members(&pool.name);
        let out = self.outcomes(pool);
        let failed = out.failed + out.failed_after_ready;
        let step = {
            let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
            let m = memory.entry(pool.name.clone()).or_default();
            m.slow_start = next_slow_start(
                m.slow_start,
                failed > 0,
                out.ready > 0 && failed == 0,
                pool.bounds,
            );
            m.slow_start
        };
        if failed > 0 {
            metrics::counter!(crate::metrics::POOL_FAILED_STARTS_TOTAL, "pool" => pool.name.clone())
                .increment(failed);
        }

        // The record as it should be: status, and the rollout's verdict.
        let mut next = (**pool).clone();
        next.status = PoolStatus {
            warm_ready: warm.iter().filter(|m| m.ready).count() as u32,
            warm_starting: warm.iter().filter(|m| !m.ready).count() as u32,
            claimed,
            failed_starts: pool.status.failed_starts + failed,
            consecutive_failures: if failed > 0 {
                pool.status.consecutive_failures + failed as u32
            } else if out.ready > 0 {
                0
            } else {
                pool.status.consecutive_failures
            },
            last_failure: out
                .last_failure
                .as_ref()
                .map(|f| f.1.clone())
                .or(pool.status.last_failure.clone()),
            last_failure_at: out
                .last_failure
                .as_ref()
                .map(|f| f.0)
                .or(pool.status.last_failure_at),
            slow_start: step,
        };
        if let Some(r) = next.rollout.as_mut() {
            r.healthy += out.rollout.0 as u32;
            r.failed += out.rollout.1 as u32;
            let (healthy, failed, generation) = (r.healthy, r.failed, r.generation);
            let total = u64::from(healthy) + u64::from(failed);
            let verdict = if failed >= 2
                && u64::from(failed) * 100 >= u64::from(r.max_failure_percent) * total
            {
                let why = next.status.last_failure.clone().unwrap_or_default();
                Some((
                    "reverted",
                    format!("{failed} of {total} starts failed ({why})"),
                ))
            } else if now >= r.deadline_at {
                Some((
                    "reverted",
                    format!(
                        "not promoted by its deadline: {healthy} healthy starts of the {} needed",
                        next.promote_after
                    ),
                ))
            } else if healthy >= next.promote_after
                && out
                    .last_rollout_ready
                    .is_none_or(|at| now >= at + SETTLE.as_millis() as u64)
            {
                Some(("stable", format!("promoted after {healthy} healthy starts")))
            } else {
                None
            };
            if let Some((status, why)) = verdict {
                tracing::info!(pool = %pool.name, generation, status, %why, "rollout ended");
                finish_rollout(&mut next, status, &why);
            }
        }
        for (state, n) in [
            ("warm_ready", next.status.warm_ready),
            ("warm_starting", next.status.warm_starting),
            ("claimed", next.status.claimed),
        ] {
            metrics::gauge!(crate::metrics::POOL_BACKENDS, "pool" => pool.name.clone(), "state" => state)
                .set(f64::from(n));
        }
        let urgent = next.rollout != pool.rollout
            || next.status.failed_starts != pool.status.failed_starts
            || next.status.slow_start != pool.status.slow_start;
        let due = {
            let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
            let m = memory.entry(pool.name.clone()).or_default();
            let due = urgent
                || (next.status != pool.status
                    && m.status_written.is_none_or(|t| t.elapsed() >= STATUS_EVERY));
            if due {
                m.status_written = Some(tokio::time::Instant::now());
            }
            due
        };
        if due {
            let (status, rollout, generation, generations) = (
                next.status.clone(),
                next.rollout.clone(),
                next.generation,
                next.generations.clone(),
            );
            let rollout_ended = pool.rollout.is_some() && rollout.is_none();
            next = self
                .pools
                .modify(&pool.name, Some(self.token), |p, _| {
                    p.status = status.clone();
                    // Operators may have changed the rollout meanwhile: only a verdict on the
                    // same rollout is applied, and counts only to it.
                    if p.rollout.as_ref().map(|r| r.generation)
                        == pool.rollout.as_ref().map(|r| r.generation)
                    {
                        if rollout_ended {
                            p.rollout = None;
                            p.generation = generation;
                            p.generations = generations.clone();
                        } else {
                            p.rollout = rollout.clone();
                        }
                    }
                    Ok(())
                })
                .await?;
        }

        let desired = Desired {
            targets: next.warm_targets(),
            max_live: next.max_live,
            claimed,
        };
        let step = plan(&desired, &warm, next.bounds, step);
        self.add(&next, &step.add).await?;
        self.remove(&next.name, &step.remove).await?;
        Ok(())
    }

    /// Starts warm backends of the given generations (stops at the first that has no drone).
    async fn add(&self, pool: &Pool, generations: &[u64]) -> Result<(), ApiError> {
        for &generation in generations {
            let spawn = self.pools.resolve(pool, generation, None)?;
            let reservation = match self.placement.place(&spawn) {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(pool = %pool.name, error = %e, "no drone for a warm backend");
                    return Ok(());
                }
            };
            let drone = reservation.drone.clone();
            let now = self.clock.now_ms();
            let mut secret = [0u8; 24];
            rand::rng().fill_bytes(&mut secret);
            let rec = BackendRecord {
                pool: Some(PoolMember {
                    name: pool.name.clone(),
                    generation,
                    claimed_at: None,
                    claim_secret: Some(hex(&secret)),
                }),
                ..BackendRecord::scheduled(spawn, &drone.name, &drone.run_id, now)
            };
            let key = backend_key(rec.id.as_str());
            let compares = vec![
                Compare::absent(key.clone()),
                Compare::create_revision(LEADER_KEY, self.token),
            ];
            match self
                .store
                .txn(compares, vec![TxnOp::put(key, encode(&rec), None)])
                .await?
            {
                TxnOutcome::Committed(r) => {
                    reservation.written(r);
                    metrics::counter!(crate::metrics::LEADER_WRITES_TOTAL).increment(1);
                    metrics::counter!(crate::metrics::LEADER_COMMANDS_TOTAL).increment(1);
                    metrics::counter!(crate::metrics::POOL_CONVERGER_ACTIONS_TOTAL, "pool" => pool.name.clone(), "action" => "add").increment(1);
                    tracing::debug!(pool = %pool.name, backend = %rec.id, generation, drone = %drone.name, "warm backend scheduled");
                }
                TxnOutcome::Failed { compare: 0, .. } => {}
                TxnOutcome::Failed { .. } => {
                    metrics::counter!(crate::metrics::FENCED_WRITES_TOTAL).increment(1);
                    return Err(ApiError::Fenced(
                        "this instance is no longer the leader: the converger stops".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Stops warm backends the pool no longer needs: only while they are still unclaimed (a
    /// connect that claimed one first keeps it).
    async fn remove(&self, pool: &str, ids: &[String]) -> Result<(), ApiError> {
        for id in ids {
            let stopped = self
                .backends
                .update(id, |r| {
                    if !r.is_unclaimed() || !r.holds_key() {
                        return false;
                    }
                    r.state = BackendState::Terminating {
                        reason: TerminationReason::Surplus,
                    };
                    true
                })
                .await?;
            if stopped.is_some() {
                self.backends.count_command();
                metrics::counter!(crate::metrics::POOL_CONVERGER_ACTIONS_TOTAL, "pool" => pool.to_string(), "action" => "remove").increment(1);
                tracing::debug!(%pool, backend = %id, "surplus warm backend stopped");
            }
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
