//! Store records and their key layout. Records are JSON so that an operator can read them
//! with `etcdctl get` and so that fields can be added without a migration.

use serde::{Deserialize, Serialize};

use hangar_core::api::{BackendView, Resources};
use hangar_core::drone::{SchedulerMessage, SpawnCommand};
use hangar_core::route::{Route, RouteState};
use hangar_core::{BackendId, BackendState, KeyRef, UnixMillis};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Prefix of every backend record.
pub const BACKENDS_PREFIX: &str = "/hangar/backends/";
/// Prefix of every key record.
pub const KEYS_PREFIX: &str = "/hangar/keys/";

pub fn backend_key(id: &str) -> String {
    format!("{BACKENDS_PREFIX}{id}")
}

pub fn key_key(key: &KeyRef) -> String {
    format!("{KEYS_PREFIX}{}/{}", key.namespace, key.name)
}

/// What the backend runs, resolved against the cluster defaults at connect time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResolvedSpawn {
    pub command: Option<Vec<String>>,
    pub image: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub idle_timeout_s: Option<u64>,
    pub lifetime_s: Option<u64>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default = "default_pool")]
    pub pool: String,
}

pub fn default_pool() -> String {
    "default".to_string()
}

/// The variable a warm backend finds its claim secret in.
pub const CLAIM_TOKEN_ENV: &str = "HANGAR_CLAIM_TOKEN";

/// One backend: its spec, where it runs and where it is in its life.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendRecord {
    pub id: BackendId,
    pub key: Option<KeyRef>,
    /// The key's fencing epoch when this backend was assigned to it.
    pub epoch: u64,
    pub spawn: ResolvedSpawn,
    pub user: Option<String>,
    pub public: bool,
    pub state: BackendState,
    pub drone: Option<String>,
    /// The agent process the backend was handed to; events from any other run are stale.
    pub drone_run_id: Option<String>,
    pub address: Option<SocketAddr>,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    pub ready_at: Option<UnixMillis>,
    pub terminated_at: Option<UnixMillis>,
    /// When terminating began (for repeating a stop that does not complete).
    #[serde(default)]
    pub terminating_at: Option<UnixMillis>,
    /// When the leader escalated the stop to a kill (the stop did not complete in time): the
    /// instance holding the drone's session relays a hard stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_requested_at: Option<UnixMillis>,
    pub message: Option<String>,
    /// The API token that created it (a `connect` token sees its own backends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// The pool it was started from, if any: warm (started ahead, keyless until claimed) or
    /// cold for a connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolMember>,
}

/// A backend's membership of a pool ([`crate::pools`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolMember {
    pub name: String,
    /// The generation of the pool's template it runs.
    pub generation: u64,
    /// When a connect claimed it (a warm backend until then; a cold start is claimed at its
    /// creation). Idle timeout and lifetime count from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_at: Option<UnixMillis>,
    /// The secret a warm backend is started with (`HANGAR_CLAIM_TOKEN`), which its claim
    /// request carries so that nobody else can claim it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_secret: Option<String>,
}

impl BackendRecord {
    /// A new record, `scheduled` on drone `drone`'s run `run_id` at `now`, with no key (set
    /// the rest with struct update syntax).
    pub fn scheduled(spawn: ResolvedSpawn, drone: &str, run_id: &str, now: UnixMillis) -> Self {
        BackendRecord {
            id: BackendId::generate(),
            key: None,
            epoch: 0,
            spawn,
            user: None,
            public: false,
            state: BackendState::Scheduled,
            drone: Some(drone.to_string()),
            drone_run_id: Some(run_id.to_string()),
            address: None,
            created_at: now,
            updated_at: now,
            ready_at: None,
            terminated_at: None,
            terminating_at: None,
            kill_requested_at: None,
            message: None,
            created_by: None,
            pool: None,
        }
    }

    /// True for a warm backend nobody has claimed yet: keyless, not routable, not subject to
    /// idle timeout or lifetime.
    pub fn is_unclaimed(&self) -> bool {
        self.pool.as_ref().is_some_and(|p| p.claimed_at.is_none())
    }

    /// When its session began: the claim of a pool backend, the creation of any other.
    pub fn session_start(&self) -> UnixMillis {
        self.pool
            .as_ref()
            .and_then(|p| p.claimed_at)
            .unwrap_or(self.created_at)
    }

    pub fn view(&self) -> BackendView {
        BackendView {
            id: self.id.clone(),
            key: self.key.clone(),
            epoch: self.epoch,
            state: self.state.clone(),
            drone: self.drone.clone(),
            address: self.address,
            public: self.public,
            user: self.user.clone(),
            idle_timeout_s: self.spawn.idle_timeout_s,
            lifetime_s: self.spawn.lifetime_s,
            created_at: self.created_at,
            updated_at: self.updated_at,
            ready_at: self.ready_at,
            terminated_at: self.terminated_at,
            message: self.message.clone(),
            pool: self.pool.as_ref().map(|p| p.name.clone()),
        }
    }

    /// The proxy's view of this backend.
    pub fn route(&self) -> Route {
        let state = match &self.state {
            // A warm backend is reached only once claimed (it has no key, and no token is
            // ever signed for it).
            _ if self.is_unclaimed() => RouteState::Gone,
            BackendState::Ready => RouteState::Ready,
            s if s.is_starting() => RouteState::Starting,
            _ => RouteState::Gone,
        };
        Route {
            backend: self.id.clone(),
            state,
            address: self.address,
            public: self.public,
            drone: self.drone.as_deref().map(Into::into),
            pool: Some(self.spawn.pool.as_str().into()),
            key: self.key.as_ref().map(|k| k.to_string().into()),
            epoch: if self.key.is_some() { self.epoch } else { 0 },
        }
    }

    /// What this record asks of the drone run it names, if anything: a `scheduled` backend is
    /// to be started, a `terminating` one stopped (killed once the leader escalated). The
    /// instance holding that run's session relays it ([`crate::relay`]).
    pub fn command(&self, startup_timeout: std::time::Duration) -> Option<SchedulerMessage> {
        match self.state {
            BackendState::Scheduled => Some(SchedulerMessage::Spawn(SpawnCommand {
                backend: self.id.clone(),
                key: self.key.as_ref().map(KeyRef::to_string),
                epoch: self.epoch,
                command: self.spawn.command.clone(),
                image: self.spawn.image.clone(),
                env: match self.pool.as_ref().and_then(|p| p.claim_secret.as_ref()) {
                    Some(secret) => {
                        let mut env = self.spawn.env.clone();
                        env.insert(CLAIM_TOKEN_ENV.to_string(), secret.clone());
                        env
                    }
                    None => self.spawn.env.clone(),
                },
                resources: self.spawn.resources,
                startup_timeout_ms: startup_timeout.as_millis() as u64,
            })),
            BackendState::Terminating { .. } => Some(SchedulerMessage::Terminate {
                backend: self.id.clone(),
                hard: self.kill_requested_at.is_some(),
            }),
            _ => None,
        }
    }

    /// Whether a hard stop would change this record: it is stopping and no kill was asked yet.
    pub fn escalates_to_kill(&self) -> bool {
        matches!(self.state, BackendState::Terminating { .. }) && self.kill_requested_at.is_none()
    }

    /// True while this backend holds its key: not yet terminating or terminated.
    pub fn holds_key(&self) -> bool {
        !matches!(
            self.state,
            BackendState::Terminating { .. } | BackendState::Terminated { .. }
        )
    }
}

/// A key's assignment: the backend that owns it and the fencing epoch, which only grows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub backend: BackendId,
    pub epoch: u64,
}

/// Prefix of drone records (each attached to the drone's session lease).
pub const DRONES_PREFIX: &str = "/hangar/drones/";
/// Prefix of drain records (not leased: a drain survives reconnects and restarts).
pub const DRAINS_PREFIX: &str = "/hangar/drains/";

pub fn drone_key(name: &str) -> String {
    format!("{DRONES_PREFIX}{name}")
}

pub fn drain_key(name: &str) -> String {
    format!("{DRAINS_PREFIX}{name}")
}

/// A connected drone, as long as its lease lives (the key vanishes when it expires).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DroneRecord {
    pub name: String,
    pub run_id: String,
    pub runtime: String,
    pub pool: String,
    pub capacity: hangar_core::drone::Capacity,
    pub connected_at: UnixMillis,
    /// The session lease; `None` for an in-process drone (dev), which lives with the process.
    pub lease: Option<u64>,
    /// The host the agent runs on, as it said in its hello.
    #[serde(default)]
    pub host: Option<String>,
    /// Why its runtime cannot take work (e.g. Docker is down), as its last heartbeat said.
    #[serde(default)]
    pub unhealthy: Option<String>,
    /// The control-plane instance holding its session (which relays commands to it).
    #[serde(default)]
    pub instance: Option<String>,
}

/// A drain in progress: placement avoids the drone; at `deadline_at` its remaining backends
/// are terminated with reason `drained`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRecord {
    pub started_at: UnixMillis,
    pub deadline_at: Option<UnixMillis>,
}

/// A decoded record with where it is stored (for conditional writes).
#[derive(Clone, Debug)]
pub struct Stored<T> {
    pub key: String,
    pub mod_revision: hangar_store::Revision,
    pub record: T,
}

/// Every record under `prefix` that decodes as `T`, in key order; unreadable ones are logged
/// and skipped.
pub async fn list_records<T: serde::de::DeserializeOwned>(
    store: &dyn hangar_store::Store,
    prefix: &str,
) -> hangar_store::StoreResult<Vec<Stored<T>>> {
    let listing = store.list(prefix).await?;
    Ok(listing
        .kvs
        .into_iter()
        .filter_map(|kv| match serde_json::from_slice(&kv.value) {
            Ok(record) => Some(Stored {
                key: kv.key,
                mod_revision: kv.mod_revision,
                record,
            }),
            Err(e) => {
                tracing::error!(key = %kv.key, error = %e, "skipping an unreadable record");
                None
            }
        })
        .collect())
}

/// Every backend record.
pub async fn list_backends(
    store: &dyn hangar_store::Store,
) -> hangar_store::StoreResult<Vec<Stored<BackendRecord>>> {
    list_records(store, BACKENDS_PREFIX).await
}

/// Drone records (present while their lease lives), by name.
pub async fn list_drones(
    store: &dyn hangar_store::Store,
) -> hangar_store::StoreResult<std::collections::BTreeMap<String, DroneRecord>> {
    Ok(list_records::<DroneRecord>(store, DRONES_PREFIX)
        .await?
        .into_iter()
        .map(|s| (s.record.name.clone(), s.record))
        .collect())
}

/// Drains in progress, by drone name.
pub async fn list_drains(
    store: &dyn hangar_store::Store,
) -> hangar_store::StoreResult<std::collections::BTreeMap<String, DrainRecord>> {
    Ok(list_records::<DrainRecord>(store, DRAINS_PREFIX)
        .await?
        .into_iter()
        .filter_map(|s| Some((s.key.strip_prefix(DRAINS_PREFIX)?.to_string(), s.record)))
        .collect())
}
