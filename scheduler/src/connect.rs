//! Connect: find the live backend that holds a key, or place a new one and write its record
//! and the key's claim in one store transaction. The key record's fencing epoch only grows, so a backend handed epoch `n`
//! knows every later owner of its key has a higher one.

use std::sync::Arc;
use std::time::Duration;

use hangar_core::api::{ConnectRequest, ConnectResponse, Resources};
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

/// Attempts at claiming the key before giving up (each attempt re-reads).
const CONNECT_ATTEMPTS: usize = 64;

fn decode_key(kv: &KeyValue) -> Result<KeyRecord, ApiError> {
    serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Internal(format!("key record {} is unreadable: {e}", kv.key)))
}

/// Variables the drone sets for every backend; a spawn may not override them.
const RESERVED_ENV: [&str; 5] = [
    "PORT",
    "HANGAR_BIND",
    "HANGAR_BACKEND_ID",
    "HANGAR_KEY",
    "HANGAR_EPOCH",
];

/// Bounds on what a spawn may carry.
const MAX_ENV: usize = 64;
const MAX_ENV_NAME: usize = 128;
const MAX_ENV_VALUE: usize = 4096;
const MAX_ARGS: usize = 64;
const MAX_ARG: usize = 4096;
const MAX_IMAGE: usize = 255;

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
        if spawn.env.len() > MAX_ENV {
            return Err(ApiError::BadRequest(format!(
                "spawn.env has {} variables: at most {MAX_ENV} are allowed",
                spawn.env.len()
            )));
        }
        for (k, v) in &spawn.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || k.len() > MAX_ENV_NAME {
                return Err(ApiError::BadRequest(format!(
                    "spawn.env has an invalid variable name {k:?} (1 to {MAX_ENV_NAME} bytes, no '=' or NUL)"
                )));
            }
            if RESERVED_ENV.contains(&k.as_str())
                || k.eq_ignore_ascii_case("PORT")
                || k.to_ascii_uppercase().starts_with("HANGAR_")
            {
                return Err(ApiError::BadRequest(format!(
                    "spawn.env may not set {k}: PORT and HANGAR_* are Hangar's ({} are set for every backend)",
                    RESERVED_ENV.join(", ")
                )));
            }
            if v.len() > MAX_ENV_VALUE || v.contains('\0') {
                return Err(ApiError::BadRequest(format!(
                    "spawn.env.{k} must be at most {MAX_ENV_VALUE} bytes with no NUL"
                )));
            }
        }
        if let Some(cmd) = &spawn.command
            && (cmd.len() > MAX_ARGS || cmd.iter().any(|a| a.len() > MAX_ARG || a.contains('\0')))
        {
            return Err(ApiError::BadRequest(format!(
                "spawn.command must have at most {MAX_ARGS} arguments of at most {MAX_ARG} bytes each, with no NUL"
            )));
        }
        if let Some(image) = &spawn.image
            && (image.len() > MAX_IMAGE
                || image.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ApiError::BadRequest(format!(
                "spawn.image must be an image reference of at most {MAX_IMAGE} characters, without spaces"
            )));
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
}

impl Connector {
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
            let spawn = self.resolve_spawn(&req);
            // Counted against the namespace's live quota until the route table counts it.
            let _placing = self
                .quotas
                .place(&namespace, self.routes.live_in_namespace(&namespace))?;
            let reservation = self.placement.place(&spawn)?;
            let drone = reservation.drone.clone();
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
                kill_requested_at: None,
                message: None,
                created_by: created_by.clone(),
            };
            // 3. One transaction: the backend record and the key's claim, or neither (no orphan
            //    record if the claim loses, no claim without its record).
            let bkey = backend_key(rec.id.as_str());
            let mut compares = vec![Compare::absent(bkey.clone())];
            let mut ops = vec![TxnOp::put(bkey, encode(&rec), None)];
            if let Some(key) = &req.key {
                let kr = KeyRecord {
                    backend: rec.id.clone(),
                    epoch,
                };
                compares.push(Compare::new(key_key(key), expect));
                ops.push(TxnOp::put(key_key(key), encode(&kr), None));
            }
            let fence = compares.len();
            compares.push(Compare::create_revision(LEADER_KEY, token));
            let brev = match self.store.txn(compares, ops).await? {
                TxnOutcome::Committed(r) => {
                    metrics::counter!(crate::metrics::LEADER_WRITES_TOTAL).increment(1);
                    // The record is the spawn command: the instance holding the drone's
                    // session relays it.
                    metrics::counter!(crate::metrics::LEADER_COMMANDS_TOTAL).increment(1);
                    reservation.written(r);
                    r
                }
                TxnOutcome::Failed { compare, .. } if compare == fence => {
                    metrics::counter!(crate::metrics::FENCED_WRITES_TOTAL).increment(1);
                    return Err(ApiError::Fenced(format!(
                        "this instance stopped leading (term {token}) during the connect: retry"
                    )));
                }
                // A random id collided, try another; or another connect claimed the key
                // first, reuse theirs.
                TxnOutcome::Failed { .. } => continue,
            };
            // Answer only once the route table has the backend, so a client that uses the
            // URL right away finds it starting in the proxy instead of unknown.
            self.routes.wait_for(brev).await;
            metrics::counter!(crate::metrics::SPAWNS_TOTAL).increment(1);
            tracing::info!(backend = %rec.id, key = ?rec.key.as_ref().map(|k| k.to_string()), drone = %drone.name, "backend scheduled");
            return Ok(self.response(&rec, true, &user));
        }
        Err(ApiError::Conflict(
            "the key is contended by too many concurrent connects; retry".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_core::KeyRef;
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
                req(SpawnSpec {
                    env: [("hangar_token".to_string(), "x".to_string())].into(),
                    ..Default::default()
                }),
                "hangar_token",
            ),
            (
                req(SpawnSpec {
                    env: [("port".to_string(), "1".to_string())].into(),
                    ..Default::default()
                }),
                "port",
            ),
            (
                req(SpawnSpec {
                    env: (0..65).map(|i| (format!("V{i}"), String::new())).collect(),
                    ..Default::default()
                }),
                "spawn.env",
            ),
            (
                req(SpawnSpec {
                    env: [("BIG".to_string(), "x".repeat(4097))].into(),
                    ..Default::default()
                }),
                "spawn.env.BIG",
            ),
            (
                req(SpawnSpec {
                    command: Some(vec!["x".to_string(); 65]),
                    ..Default::default()
                }),
                "spawn.command",
            ),
            (
                req(SpawnSpec {
                    image: Some("a b".into()),
                    ..Default::default()
                }),
                "spawn.image",
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
}
