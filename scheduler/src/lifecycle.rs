//! Backend records and their lifecycle: reading and updating records, terminating (the stop
//! written into the record, for the relay to send), applying drone events, closing backends whose drone
//! run is gone. Every write is a compare-and-swap on the record's revision, and every state
//! change is checked by [`check_transition`], so that concurrent writers (API calls, drone
//! events, the reconciler, other scheduler instances) can only ever move a record forward.
//!
//! [`Backends`] is the only writer of backend records after they are created (by
//! [`crate::connect`]); it sends nothing to drones: commands are in the records
//! ([`crate::relay`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hangar_core::drone::BackendEvent;
use hangar_core::lifecycle::check_transition;
use hangar_core::{BackendId, BackendState, TerminationReason};
use hangar_store::{Compare, KeyValue, Store, TxnOp, TxnOutcome};

use crate::activity::ActivityBook;
use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::error::ApiError;
use crate::records::{BackendRecord, Stored, backend_key, list_backends};

pub(crate) fn decode_backend(kv: &KeyValue) -> Result<BackendRecord, ApiError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Internal(format!("backend record {} is unreadable: {e}", kv.key)))
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain records to JSON cannot fail (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}

/// Backend records closed as lost per store transaction (at most half of a transaction's
/// operations, so the compares and the fence fit too).
const LOST_BATCH: usize = 63;

/// Batches of lost backends written at once (the embedded store commits them together; on
/// etcd they share the round trips).
const LOST_IN_FLIGHT: usize = 16;

/// Backend records and what changes them.
#[derive(Clone)]
pub struct Backends {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: Arc<SchedulerConfig>,
    /// Forgotten when a backend ends.
    activity: Arc<ActivityBook>,
    /// The leader's fencing token every write compares, for a leader's view; `None` for
    /// writes any instance may make (drone events and admission on the instance holding the
    /// session).
    fence: Option<hangar_store::Revision>,
}

impl Backends {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: Arc<SchedulerConfig>,
        activity: Arc<ActivityBook>,
    ) -> Self {
        Backends {
            store,
            clock,
            config,
            activity,
            fence: None,
        }
    }

    /// Every backend record, with where it is stored.
    pub async fn list(&self) -> Result<Vec<Stored<BackendRecord>>, ApiError> {
        Ok(list_backends(self.store.as_ref()).await?)
    }

    /// Deletes the record at `key` if it is unchanged since `revision` (retention of ended
    /// backends).
    pub(crate) async fn remove_if_unchanged(
        &self,
        key: &str,
        revision: hangar_store::Revision,
    ) -> Result<bool, ApiError> {
        self.write(key, revision, None).await
    }

    /// Reads a backend record.
    pub async fn get(&self, id: &str) -> Result<Option<(BackendRecord, u64)>, ApiError> {
        match self.store.get(&backend_key(id)).await? {
            Some(kv) => Ok(Some((decode_backend(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Applies `change` to a backend record with compare-and-swap, retrying on conflict.
    /// `change` returns `false` to leave the record alone; a change that would move the state
    /// backwards is dropped. Returns the record as written, or `None` if nothing was written.
    pub async fn update(
        &self,
        id: &str,
        mut change: impl FnMut(&mut BackendRecord) -> bool,
    ) -> Result<Option<BackendRecord>, ApiError> {
        self.rewrite(id, |rec, now, passed| {
            let mut next = rec.clone();
            if !change(&mut next) {
                return None;
            }
            advance(rec, next, now, passed)
        })
        .await
    }

    /// The compare-and-swap loop of [`Backends::update`] and [`Backends::apply_events`]:
    /// reads record `id`, has `make` build its next version at `now` (noting in `passed`,
    /// through [`advance`], each state it enters; `None` leaves the record alone), writes it
    /// if the record is unchanged since the read (else starts over from a fresh read) and
    /// records the state changes it went through. Returns the record as written.
    async fn rewrite(
        &self,
        id: &str,
        mut make: impl FnMut(
            &BackendRecord,
            u64,
            &mut Vec<(BackendState, u64)>,
        ) -> Option<BackendRecord>,
    ) -> Result<Option<BackendRecord>, ApiError> {
        loop {
            let Some((rec, rev)) = self.get(id).await? else {
                return Ok(None);
            };
            let now = self.clock.now_ms();
            // Every state the record passes through, each with when it was entered.
            let mut passed = vec![(rec.state.clone(), rec.updated_at)];
            let Some(next) = make(&rec, now, &mut passed) else {
                return Ok(None);
            };
            if self
                .write(&backend_key(id), rev, Some(encode(&next)))
                .await?
            {
                for pair in passed.windows(2) {
                    let ((from, entered), (to, _)) = (&pair[0], &pair[1]);
                    crate::metrics::state_changed(from, to, *entered, rec.created_at, now);
                }
                return Ok(Some(next));
            }
        }
    }

    /// Writes `value` to `key` (or deletes it, with `None`) if it is unchanged since
    /// `revision`, and, for a leader's view ([`Backends::fenced`]), only while its term lasts.
    /// `false`: the record changed meanwhile. A write of a deposed leader is
    /// [`ApiError::Fenced`], never a conflict to retry.
    async fn write(
        &self,
        key: &str,
        revision: hangar_store::Revision,
        value: Option<Vec<u8>>,
    ) -> Result<bool, ApiError> {
        let mut compares = vec![Compare::mod_revision(key, revision)];
        if let Some(token) = self.fence {
            compares.push(Compare::create_revision(crate::leader::LEADER_KEY, token));
        }
        let op = match value {
            Some(v) => TxnOp::put(key, v, None),
            None => TxnOp::delete(key),
        };
        match self.store.txn(compares, vec![op]).await? {
            TxnOutcome::Committed(_) => {
                if self.fence.is_some() {
                    metrics::counter!(crate::metrics::LEADER_WRITES_TOTAL).increment(1);
                }
                Ok(true)
            }
            TxnOutcome::Failed { compare: 0, .. } => Ok(false),
            TxnOutcome::Failed { .. } => {
                metrics::counter!(crate::metrics::FENCED_WRITES_TOTAL).increment(1);
                Err(ApiError::Fenced(format!(
                    "this instance is no longer the leader (term {} ended): the write was refused",
                    self.fence.unwrap_or_default()
                )))
            }
        }
    }

    /// The same records, written as the leader of the term with fencing token `token`: every
    /// write also requires that term to last.
    pub fn fenced(&self, token: hangar_store::Revision) -> Backends {
        Backends {
            fence: Some(token),
            ..self.clone()
        }
    }

    /// Asks for a backend to stop for `reason` (`hard`: kill it at once). The request is
    /// written into the record, and the instance holding the session of the drone run that
    /// has the backend relays it ([`crate::relay`]); if that run is not connected right now,
    /// the record stays `terminating` (its process may still run, so its key stays held) until
    /// the run reconnects and gets the stop, or its lease expires and the backend is closed as
    /// lost. Ended and terminating backends keep their first reason; a hard terminate of a
    /// terminating backend still escalates its stop to a kill. Returns the record after the
    /// call.
    pub async fn terminate(
        &self,
        id: &str,
        reason: TerminationReason,
        hard: bool,
    ) -> Result<BackendRecord, ApiError> {
        let now = self.clock.now_ms();
        let updated = self
            .update(id, |r| {
                if r.holds_key() {
                    r.state = BackendState::Terminating {
                        reason: reason.clone(),
                    };
                } else if !(hard && r.escalates_to_kill()) {
                    return false;
                }
                if hard {
                    r.kill_requested_at = Some(now);
                }
                true
            })
            .await?;
        match updated {
            Some(rec) => {
                tracing::info!(backend = %rec.id, %reason, hard, "terminating backend");
                self.count_command();
                Ok(rec)
            }
            None => self
                .get(id)
                .await?
                .map(|(r, _)| r)
                .ok_or_else(|| ApiError::NotFound(format!("no backend {id}"))),
        }
    }

    /// Escalates the stop of a `terminating` backend to a kill, once per terminate timeout
    /// (the reconciler calls it on every pass while the stop is overdue). Returns whether
    /// the kill was requested now.
    pub(crate) async fn request_kill(&self, id: &str) -> Result<bool, ApiError> {
        let now = self.clock.now_ms();
        let again_after = self.config.terminate_timeout.as_millis() as u64;
        let written = self
            .update(id, |r| {
                let due = r
                    .kill_requested_at
                    .is_none_or(|at| now.saturating_sub(at) >= again_after);
                if !matches!(r.state, BackendState::Terminating { .. }) || !due {
                    return false;
                }
                r.kill_requested_at = Some(now);
                true
            })
            .await?;
        if written.is_some() {
            self.count_command();
        }
        Ok(written.is_some())
    }

    /// Counts a command written as the leader.
    pub(crate) fn count_command(&self) {
        if self.fence.is_some() {
            metrics::counter!(crate::metrics::LEADER_COMMANDS_TOTAL).increment(1);
        }
    }

    /// Applies one event from drone `drone` (agent run `run_id`). Events from a run other than
    /// the one the record names are stale and ignored.
    pub async fn apply_event(
        &self,
        drone: &str,
        run_id: &str,
        backend: &BackendId,
        event: BackendEvent,
    ) -> Result<(), ApiError> {
        self.apply_events(drone, run_id, backend, std::slice::from_ref(&event))
            .await
    }

    /// Applies events of one backend from drone `drone` (agent run `run_id`), in order, with
    /// one write: each is applied as it would be alone (a step backwards in the lifecycle is
    /// ignored), and the record is written once with the outcome of all of them. A drone
    /// that reports `starting`, `waiting` and `ready` in one burst costs one read and one
    /// write instead of three of each. Events from a run other than the one the record names
    /// are stale and ignored.
    pub async fn apply_events(
        &self,
        drone: &str,
        run_id: &str,
        backend: &BackendId,
        events: &[BackendEvent],
    ) -> Result<(), ApiError> {
        let updated = self
            .rewrite(backend.as_str(), |rec, now, passed| {
                if rec.drone.as_deref() != Some(drone)
                    || rec.drone_run_id.as_deref() != Some(run_id)
                {
                    return None;
                }
                let mut next = rec.clone();
                let mut accepted = false;
                for event in events {
                    let mut step = next.clone();
                    apply_one(&mut step, event);
                    if let Some(step) = advance(&next, step, now, passed) {
                        next = step;
                        accepted = true;
                    }
                }
                accepted.then_some(next)
            })
            .await?;
        if let Some(rec) = updated {
            tracing::debug!(backend = %rec.id, state = %rec.state, "backend state");
            if !rec.state.is_live() {
                self.activity.forget(rec.id.as_str());
            }
        }
        Ok(())
    }

    /// Closes a backend whose agent run is gone, if the record still names that run.
    pub async fn mark_lost(&self, id: &str, run_id: &str, why: &str) -> Result<bool, ApiError> {
        self.close_run(id, run_id, TerminationReason::Lost, why)
            .await
    }

    /// Closes as lost every one of `records` (live records from the route feed's index, of
    /// lost drone runs) that is still live on the run it names, up to [`LOST_BATCH`] per store
    /// transaction and [`LOST_IN_FLIGHT`] transactions at a time: each batch compares the
    /// revisions the index holds instead of reading its records again, so losing a thousand
    /// drones costs a few dozen writes and no reads. A batch that meets a change the index
    /// has not seen yet falls back to closing its records one by one (each re-read). Logs one
    /// line per drone run (a mass loss closes a hundred thousand backends: a line each would
    /// be a large share of the work) and returns how many were closed.
    pub async fn mark_lost_many(
        &self,
        records: &[Arc<Stored<BackendRecord>>],
        why: &str,
    ) -> Result<usize, ApiError> {
        use futures_util::StreamExt;
        let mut chunks = records.chunks(LOST_BATCH);
        let mut running = futures_util::stream::FuturesUnordered::new();
        let mut closed: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        let mut failed = None;
        while failed.is_none() {
            while running.len() < LOST_IN_FLIGHT
                && let Some(chunk) = chunks.next()
            {
                running.push(self.mark_lost_batch(chunk, why));
            }
            match running.next().await {
                Some(Ok(batch)) => {
                    for rec in batch {
                        let drone = rec.drone.as_deref().unwrap_or_default();
                        let run = rec.drone_run_id.as_deref().unwrap_or_default();
                        *closed.entry((drone, run)).or_default() += 1;
                    }
                }
                Some(Err(e)) => failed = Some(e),
                None => break,
            }
        }
        // What was closed is logged, also when a batch failed (the caller logs why).
        for ((drone, run_id), backends) in &closed {
            tracing::warn!(
                drone,
                run_id,
                backends,
                reason = "lost",
                why,
                "backends closed: their drone run no longer has them"
            );
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(closed.values().sum()),
        }
    }

    /// One transaction of [`Backends::mark_lost_many`]: the records it closed.
    async fn mark_lost_batch<'a>(
        &self,
        chunk: &'a [Arc<Stored<BackendRecord>>],
        why: &str,
    ) -> Result<Vec<&'a BackendRecord>, ApiError> {
        let now = self.clock.now_ms();
        let (mut compares, mut ops, mut changes) = (Vec::new(), Vec::new(), Vec::new());
        for stored in chunk {
            let rec = &stored.record;
            let Some(run_id) = rec.drone_run_id.as_deref() else {
                continue;
            };
            let mut next = rec.clone();
            next.state = BackendState::Terminated {
                reason: TerminationReason::Lost,
            };
            if !rec.state.is_live() || check_transition(&rec.state, &next.state).is_err() {
                continue;
            }
            next.message = Some(why.to_string());
            next.updated_at = now;
            next.terminated_at = Some(now);
            compares.push(Compare::mod_revision(
                stored.key.clone(),
                stored.mod_revision,
            ));
            ops.push(TxnOp::put(stored.key.clone(), encode(&next), None));
            changes.push((rec, next, run_id));
        }
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let fence_at = compares.len();
        if let Some(token) = self.fence {
            compares.push(Compare::create_revision(crate::leader::LEADER_KEY, token));
        }
        match self.store.txn(compares, ops).await? {
            TxnOutcome::Committed(_) => {
                if self.fence.is_some() {
                    metrics::counter!(crate::metrics::LEADER_WRITES_TOTAL).increment(1);
                }
                for (rec, next, run_id) in &changes {
                    crate::metrics::state_changed(
                        &rec.state,
                        &next.state,
                        rec.updated_at,
                        rec.created_at,
                        next.updated_at,
                    );
                    self.activity.forget(rec.id.as_str());
                    tracing::debug!(backend = %rec.id, %run_id, reason = "lost", why, "backend closed: its drone run no longer has it");
                }
                Ok(changes.into_iter().map(|(rec, _, _)| rec).collect())
            }
            TxnOutcome::Failed { compare, .. } if compare == fence_at => {
                metrics::counter!(crate::metrics::FENCED_WRITES_TOTAL).increment(1);
                Err(ApiError::Fenced(format!(
                    "this instance is no longer the leader (term {} ended): the write was refused",
                    self.fence.unwrap_or_default()
                )))
            }
            TxnOutcome::Failed { .. } => {
                let mut closed = Vec::new();
                for (rec, _, run_id) in changes {
                    if self.mark_lost(rec.id.as_str(), run_id, why).await? {
                        closed.push(rec);
                    }
                }
                Ok(closed)
            }
        }
    }

    /// Closes a backend of run `run_id` that its drone no longer runs although the record says
    /// it started (its exit event was lost): `failed`, with `why`.
    pub async fn close_gone(&self, id: &str, run_id: &str, why: &str) -> Result<bool, ApiError> {
        self.close_run(
            id,
            run_id,
            TerminationReason::Failed { exit_code: None },
            why,
        )
        .await
    }

    /// Ends a live backend of run `run_id` for `reason`, if the record still names that run.
    async fn close_run(
        &self,
        id: &str,
        run_id: &str,
        reason: TerminationReason,
        why: &str,
    ) -> Result<bool, ApiError> {
        let updated = self
            .update(id, |r| {
                if r.drone_run_id.as_deref() != Some(run_id) || !r.state.is_live() {
                    return false;
                }
                r.state = BackendState::Terminated {
                    reason: reason.clone(),
                };
                r.message = Some(why.to_string());
                true
            })
            .await?;
        if updated.is_some() {
            tracing::warn!(backend = %id, run_id, %reason, why, "backend closed: its drone run no longer has it");
            self.activity.forget(id);
        }
        Ok(updated.is_some())
    }
}

/// How long the whole stop of a backend may take before it is repeated as a kill.
pub fn stop_overdue(terminating_at: u64, now: u64, timeout: Duration) -> bool {
    now.saturating_sub(terminating_at) >= timeout.as_millis() as u64
}

/// What one drone event makes of a backend's record (its state, address, message); whether
/// the change is a step forward is the caller's to check.
fn apply_one(r: &mut BackendRecord, event: &BackendEvent) {
    match event {
        BackendEvent::Starting => r.state = BackendState::Starting,
        BackendEvent::Waiting { address } => {
            r.state = BackendState::Waiting;
            r.address = Some(*address);
        }
        BackendEvent::Ready { address } => {
            r.state = BackendState::Ready;
            r.address = Some(*address);
        }
        BackendEvent::StartupTimeout => {
            r.state = BackendState::Terminating {
                reason: TerminationReason::StartupTimeout,
            };
            r.message = Some("the backend did not answer its readiness probe in time".into());
        }
        BackendEvent::SpawnFailed { message } => {
            r.state = BackendState::Terminated {
                reason: TerminationReason::Failed { exit_code: None },
            };
            r.message = Some(message.clone());
        }
        BackendEvent::Fenced { exit_code } => {
            r.state = BackendState::Terminated {
                reason: TerminationReason::Fenced,
            };
            r.message = Some(format!(
                "its drone could not renew its lease in time and stopped it (self-fencing; exit code {})",
                exit_code.map_or_else(|| "unknown".to_string(), |c| c.to_string())
            ));
        }
        BackendEvent::Exited { exit_code } => {
            let reason = match &r.state {
                BackendState::Terminating { reason } => reason.clone(),
                _ => {
                    r.message = Some(match exit_code {
                        Some(c) => {
                            format!("the backend exited on its own with code {c}")
                        }
                        None => "the backend exited on its own".into(),
                    });
                    TerminationReason::Failed {
                        exit_code: *exit_code,
                    }
                }
            };
            r.state = BackendState::Terminated { reason };
        }
    }
}

/// `to` as the next version of `from` at `now`: `None` if it would move the state backwards;
/// a record entering a new state is stamped with `now` and the state noted in `passed`.
fn advance(
    from: &BackendRecord,
    mut to: BackendRecord,
    now: u64,
    passed: &mut Vec<(BackendState, u64)>,
) -> Option<BackendRecord> {
    if to.state != from.state {
        check_transition(&from.state, &to.state).ok()?;
        to.updated_at = now;
        match &to.state {
            BackendState::Ready => to.ready_at = Some(now),
            BackendState::Terminating { .. } => to.terminating_at = Some(now),
            BackendState::Terminated { .. } => to.terminated_at = Some(now),
            _ => {}
        }
        passed.push((to.state.clone(), now));
    }
    Some(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overdue_stop() {
        assert!(!stop_overdue(1000, 1500, Duration::from_secs(1)));
        assert!(stop_overdue(1000, 2000, Duration::from_secs(1)));
    }
}
