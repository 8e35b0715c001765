//! Backend lifecycle operations against the store: connect (find or create the key's backend),
//! terminate, and applying drone events. Every write is a compare-and-swap on the record's
//! revision, and every state change is checked by [`check_transition`], so that concurrent
//! writers (API calls, drone events, the reconciler, other scheduler instances) can only ever
//! move a record forward.

use std::time::Duration;

use hangar_core::api::{ConnectRequest, ConnectResponse, Resources};
use hangar_core::drone::{BackendEvent, SchedulerMessage, SpawnCommand};
use hangar_core::lifecycle::check_transition;
use hangar_core::{BackendId, BackendState, KeyRef, TerminationReason};

use crate::error::ApiError;
use crate::records::{BackendRecord, KeyRecord, ResolvedSpawn, backend_key, key_key};
use crate::scheduler::Inner;
use hangar_store::{CasOutcome, Expect, KeyValue};

/// Longest a connect waits for the route table to include its new backend.
const ROUTE_WAIT: Duration = Duration::from_secs(2);

/// Attempts at the key compare-and-swap before giving up (each attempt re-reads).
const CONNECT_ATTEMPTS: usize = 64;

fn decode_backend(kv: &KeyValue) -> Result<BackendRecord, ApiError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Internal(format!("backend record {} is unreadable: {e}", kv.key)))
}

fn decode_key(kv: &KeyValue) -> Result<KeyRecord, ApiError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Internal(format!("key record {} is unreadable: {e}", kv.key)))
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain records to JSON cannot fail (no maps with non-string keys).
    serde_json::to_vec(v).unwrap_or_default()
}

/// Variables the drone sets for every backend; a spawn may not override them.
const RESERVED_ENV: [&str; 4] = ["PORT", "HANGAR_BACKEND_ID", "HANGAR_KEY", "HANGAR_EPOCH"];

/// Validates a connect request; errors name the field.
pub fn validate_connect(req: &ConnectRequest) -> Result<(), ApiError> {
    if let Some(key) = &req.key {
        key.validate()
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    if let Some(user) = &req.user
        && (user.len() > 200 || user.contains(['\n', '\r']) || user.chars().any(char::is_control))
    {
        return Err(ApiError::BadRequest(
            "user must be at most 200 characters with no control characters".into(),
        ));
    }
    if let Some(spawn) = &req.spawn {
        if let Some(cmd) = &spawn.command
            && (cmd.is_empty() || cmd[0].is_empty())
        {
            return Err(ApiError::BadRequest(
                "spawn.command must name an executable: a non-empty list of strings".into(),
            ));
        }
        if spawn.command.is_some() && spawn.image.is_some() {
            return Err(ApiError::BadRequest(
                "spawn.command and spawn.image are exclusive: give one".into(),
            ));
        }
        if let Some(image) = &spawn.image
            && image.trim().is_empty()
        {
            return Err(ApiError::BadRequest("spawn.image is empty".into()));
        }
        if spawn.idle_timeout_s == Some(0) {
            return Err(ApiError::BadRequest(
                "spawn.idle_timeout_s must be at least 1 (omit it for the default)".into(),
            ));
        }
        if spawn.lifetime_s == Some(0) {
            return Err(ApiError::BadRequest(
                "spawn.lifetime_s must be at least 1 (omit it for no limit)".into(),
            ));
        }
        for k in spawn.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(ApiError::BadRequest(format!(
                    "spawn.env has an invalid variable name {k:?}"
                )));
            }
            if RESERVED_ENV.contains(&k.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "spawn.env may not set {k}: Hangar sets {} itself",
                    RESERVED_ENV.join(", ")
                )));
            }
        }
        if let Some(Resources {
            cpu_millis,
            memory_mb,
        }) = spawn.resources
        {
            if cpu_millis == Some(0) {
                return Err(ApiError::BadRequest(
                    "spawn.resources.cpu_millis must be at least 1".into(),
                ));
            }
            if memory_mb == Some(0) {
                return Err(ApiError::BadRequest(
                    "spawn.resources.memory_mb must be at least 1".into(),
                ));
            }
        }
    }
    Ok(())
}

impl Inner {
    fn resolve_spawn(&self, req: &ConnectRequest) -> ResolvedSpawn {
        let d = &self.config.defaults;
        let s = req.spawn.clone().unwrap_or_default();
        let (command, image) = match (s.command, s.image) {
            (None, None) => (d.command.clone(), d.image.clone()),
            (c, i) => (c, i),
        };
        ResolvedSpawn {
            command,
            image,
            env: s.env,
            idle_timeout_s: s.idle_timeout_s.or(d.idle_timeout_s),
            lifetime_s: s.lifetime_s.or(d.lifetime_s),
            resources: s.resources.unwrap_or_default(),
            pool: s.pool.unwrap_or_else(crate::records::default_pool),
        }
    }

    fn response(&self, rec: &BackendRecord, spawned: bool, user: &str) -> ConnectResponse {
        let expires = self.clock.now_ms() / 1000 + self.config.token_ttl.as_secs();
        ConnectResponse {
            backend_id: rec.id.clone(),
            key: rec.key.clone(),
            spawned,
            status: rec.state.name().to_string(),
            url: self.config.backend_url(rec.id.as_str()),
            token: self.token_key.sign(rec.id.as_str(), user, expires),
            status_url: format!("{}/v1/backends/{}", self.config.api_base_url, rec.id),
        }
    }

    /// `POST /v1/connect`: returns the key's live backend, or starts one.
    pub async fn connect(&self, req: ConnectRequest) -> Result<ConnectResponse, ApiError> {
        validate_connect(&req)?;
        let user = req.user.clone().unwrap_or_default();
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
                }
            }
            // 2. Place and record a new backend, then claim the key for it.
            let spawn = self.resolve_spawn(&req);
            let drone = self.place(&spawn)?;
            let now = self.clock.now_ms();
            let rec = BackendRecord {
                id: BackendId::generate(),
                key: req.key.clone(),
                epoch,
                spawn,
                user: req.user.clone(),
                public: req.public,
                state: BackendState::Scheduled,
                drone: Some(drone.name.clone()),
                drone_run_id: Some(drone.run_id.clone()),
                address: None,
                created_at: now,
                updated_at: now,
                ready_at: None,
                terminated_at: None,
                terminating_at: None,
                message: None,
            };
            let bkey = backend_key(rec.id.as_str());
            let brev = match self
                .store
                .compare_and_swap(&bkey, Expect::Absent, encode(&rec), None)
                .await?
            {
                CasOutcome::Written(r) => r,
                // A random id collided: try another.
                CasOutcome::Conflict(_) => continue,
            };
            if let Some(key) = &req.key {
                let kr = KeyRecord {
                    backend: rec.id.clone(),
                    epoch,
                };
                match self
                    .store
                    .compare_and_swap(&key_key(key), expect, encode(&kr), None)
                    .await?
                {
                    CasOutcome::Written(_) => {}
                    CasOutcome::Conflict(_) => {
                        // Another connect claimed the key first: withdraw ours and reuse theirs.
                        self.store.delete_if_revision(&bkey, brev).await?;
                        continue;
                    }
                }
            }
            // Answer only once the route table has the backend, so a client that uses the
            // URL right away finds it starting in the proxy instead of unknown.
            self.wait_routes(brev).await;
            self.send_spawn(&rec, &drone).await;
            metrics::counter!(crate::metrics::SPAWNS_TOTAL).increment(1);
            tracing::info!(backend = %rec.id, key = ?rec.key.as_ref().map(|k| k.to_string()), drone = %drone.name, "backend scheduled");
            return Ok(self.response(&rec, true, &user));
        }
        Err(ApiError::Conflict(
            "the key is contended by too many concurrent connects; retry".into(),
        ))
    }

    /// Waits (bounded) until the published route table reflects store revision `revision`.
    pub(crate) async fn wait_routes(&self, revision: u64) {
        let mut rx = self.routes.subscribe();
        let wait = rx.wait_for(|t| t.revision >= revision);
        if tokio::time::timeout(ROUTE_WAIT, wait).await.is_err() {
            tracing::warn!(revision, "route table lags the store; answering anyway");
        }
    }

    /// The spawn command for a backend record.
    pub(crate) fn spawn_command(&self, rec: &BackendRecord) -> SpawnCommand {
        SpawnCommand {
            backend: rec.id.clone(),
            key: rec.key.as_ref().map(KeyRef::to_string),
            epoch: rec.epoch,
            command: rec.spawn.command.clone(),
            image: rec.spawn.image.clone(),
            env: rec.spawn.env.clone(),
            resources: rec.spawn.resources,
            startup_timeout_ms: self.config.startup_timeout.as_millis() as u64,
        }
    }

    async fn send_spawn(&self, rec: &BackendRecord, drone: &crate::drones::DroneConn) {
        let cmd = self.spawn_command(rec);
        if drone.tx.send(SchedulerMessage::Spawn(cmd)).await.is_err() {
            // The drone went away between placement and send; the reconciler closes the
            // record as lost when the drone's absence is confirmed.
            tracing::warn!(backend = %rec.id, drone = %drone.name, "drone disconnected before spawn");
        }
    }

    /// Reads a backend record.
    pub async fn get_backend(&self, id: &str) -> Result<Option<(BackendRecord, u64)>, ApiError> {
        match self.store.get(&backend_key(id)).await? {
            Some(kv) => Ok(Some((decode_backend(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Applies `change` to a backend record with compare-and-swap, retrying on conflict.
    /// `change` returns `false` to leave the record alone; a change that would move the state
    /// backwards is dropped. Returns the record as written, or `None` if nothing was written.
    pub async fn update_backend(
        &self,
        id: &str,
        mut change: impl FnMut(&mut BackendRecord) -> bool,
    ) -> Result<Option<BackendRecord>, ApiError> {
        loop {
            let Some((rec, rev)) = self.get_backend(id).await? else {
                return Ok(None);
            };
            let mut next = rec.clone();
            if !change(&mut next) {
                return Ok(None);
            }
            if next.state != rec.state {
                if check_transition(&rec.state, &next.state).is_err() {
                    return Ok(None);
                }
                let now = self.clock.now_ms();
                next.updated_at = now;
                match &next.state {
                    BackendState::Ready => next.ready_at = Some(now),
                    BackendState::Terminating { .. } => next.terminating_at = Some(now),
                    BackendState::Terminated { .. } => next.terminated_at = Some(now),
                    _ => {}
                }
            }
            match self
                .store
                .compare_and_swap(
                    &backend_key(id),
                    Expect::ModRevision(rev),
                    encode(&next),
                    None,
                )
                .await?
            {
                CasOutcome::Written(_) => {
                    if next.state != rec.state {
                        crate::metrics::state_changed(
                            &rec.state,
                            &next.state,
                            rec.updated_at,
                            rec.created_at,
                            next.updated_at,
                        );
                    }
                    return Ok(Some(next));
                }
                CasOutcome::Conflict(_) => continue,
            }
        }
    }

    /// Asks for a backend to stop for `reason`. Terminal and terminating backends are left
    /// alone (the first reason wins). Returns the record after the call.
    pub async fn terminate(
        &self,
        id: &str,
        reason: TerminationReason,
        hard: bool,
    ) -> Result<BackendRecord, ApiError> {
        let updated = self
            .update_backend(id, |r| {
                if !r.holds_key() {
                    return false;
                }
                r.state = BackendState::Terminating {
                    reason: reason.clone(),
                };
                true
            })
            .await?;
        let rec = match updated {
            Some(rec) => rec,
            None => match self.get_backend(id).await? {
                Some((rec, _)) => {
                    // Already terminating: a hard terminate still escalates to a kill.
                    if hard && matches!(rec.state, BackendState::Terminating { .. }) {
                        self.send_terminate(&rec, true).await?;
                    }
                    return Ok(rec);
                }
                None => return Err(ApiError::NotFound(format!("no backend {id}"))),
            },
        };
        tracing::info!(backend = %rec.id, %reason, "terminating backend");
        self.send_terminate(&rec, hard).await?;
        self.get_backend(id)
            .await?
            .map(|(r, _)| r)
            .ok_or_else(|| ApiError::NotFound(format!("no backend {id}")))
    }

    /// Sends the stop to the backend's drone; if the drone (run) that has it is not connected,
    /// there is nothing to stop and the record is closed at once.
    pub async fn send_terminate(&self, rec: &BackendRecord, hard: bool) -> Result<(), ApiError> {
        let conn = rec
            .drone
            .as_deref()
            .and_then(|d| self.drones.get(d))
            .filter(|c| Some(&c.run_id) == rec.drone_run_id.as_ref());
        let sent = match conn {
            Some(c) => {
                c.tx.send(SchedulerMessage::Terminate {
                    backend: rec.id.clone(),
                    hard,
                })
                .await
                .is_ok()
            }
            None => false,
        };
        if !sent {
            let id = rec.id.clone();
            self.update_backend(id.as_str(), |r| match &r.state {
                BackendState::Terminating { reason } => {
                    r.state = BackendState::Terminated {
                        reason: reason.clone(),
                    };
                    r.message = Some("its drone is not connected; closed without a stop".into());
                    true
                }
                _ => false,
            })
            .await?;
        }
        Ok(())
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
        let updated = self
            .update_backend(backend.as_str(), |r| {
                if r.drone.as_deref() != Some(drone) || r.drone_run_id.as_deref() != Some(run_id) {
                    return false;
                }
                match &event {
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
                        r.message =
                            Some("the backend did not answer its readiness probe in time".into());
                    }
                    BackendEvent::SpawnFailed { message } => {
                        r.state = BackendState::Terminated {
                            reason: TerminationReason::Failed { exit_code: None },
                        };
                        r.message = Some(message.clone());
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
                true
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
        let updated = self
            .update_backend(id, |r| {
                if r.drone_run_id.as_deref() != Some(run_id) || !r.state.is_live() {
                    return false;
                }
                r.state = BackendState::Terminated {
                    reason: TerminationReason::Lost,
                };
                r.message = Some(why.to_string());
                true
            })
            .await?;
        if updated.is_some() {
            tracing::warn!(backend = %id, run_id, why, "backend lost");
            self.activity.forget(id);
        }
        Ok(updated.is_some())
    }
}

/// How long the whole stop of a backend may take before it is repeated as a kill.
pub fn stop_overdue(terminating_at: u64, now: u64, timeout: Duration) -> bool {
    now.saturating_sub(terminating_at) >= timeout.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_core::api::SpawnSpec;

    fn req(spawn: SpawnSpec) -> ConnectRequest {
        ConnectRequest {
            spawn: Some(spawn),
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_fields() {
        let cases = [
            (
                req(SpawnSpec {
                    command: Some(vec![]),
                    ..Default::default()
                }),
                "spawn.command",
            ),
            (
                req(SpawnSpec {
                    idle_timeout_s: Some(0),
                    ..Default::default()
                }),
                "spawn.idle_timeout_s",
            ),
            (
                req(SpawnSpec {
                    lifetime_s: Some(0),
                    ..Default::default()
                }),
                "spawn.lifetime_s",
            ),
            (
                req(SpawnSpec {
                    env: [("PORT".to_string(), "1".to_string())].into(),
                    ..Default::default()
                }),
                "PORT",
            ),
            (
                ConnectRequest {
                    key: Some(KeyRef::new("default", "")),
                    ..Default::default()
                },
                "key.name",
            ),
        ];
        for (r, field) in cases {
            let e = validate_connect(&r).unwrap_err();
            assert!(matches!(e, ApiError::BadRequest(_)));
            assert!(e.to_string().contains(field), "{e} should name {field}");
        }
        assert!(validate_connect(&ConnectRequest::default()).is_ok());
    }

    #[test]
    fn overdue_stop() {
        assert!(!stop_overdue(1000, 1500, Duration::from_secs(1)));
        assert!(stop_overdue(1000, 2000, Duration::from_secs(1)));
    }
}
