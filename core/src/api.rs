//! The JSON types of the HTTP API (`/v1/...`), shared by the scheduler (server) and the CLI
//! (client). Request types deny unknown fields so a typo is a 400 that names the field.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::UnixMillis;
use crate::ids::{BackendId, KeyRef};
use crate::lifecycle::BackendState;

/// `POST /v1/connect`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    /// Without a key, a new backend is always started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyRef>,
    /// Without a spawn, the cluster's configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawn: Option<SpawnSpec>,
    /// The user the token is issued to; empty if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A public backend needs no token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
    /// The pool whose template (and warm backends) a new backend comes from (default:
    /// `default`, when that pool exists; otherwise the cluster's configured default). An
    /// explicit `spawn.command` or `spawn.image` starts cold, outside any pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// What to run for a backend. Every field is optional; the cluster default fills gaps.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnSpec {
    /// An executable and its arguments (process runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// A container image (Docker runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Only drones of this pool may run it (default: `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// Reservations and caps for a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
}

/// Answer to `POST /v1/connect`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectResponse {
    pub backend_id: BackendId,
    pub key: Option<KeyRef>,
    /// False when an existing live backend was returned.
    pub spawned: bool,
    /// True when the new backend is a warm one of a pool, claimed for this key (it was
    /// started ahead, so it is ready already).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm: bool,
    pub status: String,
    /// Where clients reach the backend through the proxy.
    pub url: String,
    pub token: String,
    /// `GET` this for the backend's record; append `/events` for a live stream.
    pub status_url: String,
}

/// A backend as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub id: BackendId,
    pub key: Option<KeyRef>,
    pub epoch: u64,
    /// Flattened: `status` plus `reason` when terminating or terminated.
    #[serde(flatten)]
    pub state: BackendState,
    pub drone: Option<String>,
    pub address: Option<SocketAddr>,
    pub public: bool,
    pub user: Option<String>,
    pub idle_timeout_s: Option<u64>,
    pub lifetime_s: Option<u64>,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    pub ready_at: Option<UnixMillis>,
    pub terminated_at: Option<UnixMillis>,
    /// A human-readable note on the last transition (e.g. why it failed).
    pub message: Option<String>,
    /// The pool it was started from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// `GET /v1/backends`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendList {
    pub backends: Vec<BackendView>,
}

/// `POST /v1/backends/{id}/terminate`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminateRequest {
    /// Kill at once instead of a graceful stop.
    #[serde(default)]
    pub hard: bool,
}

/// Every API error: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_request_denies_unknown_fields() {
        let e = serde_json::from_str::<ConnectRequest>(r#"{"kee": {"name": "a"}}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `kee`"));
        let r: ConnectRequest =
            serde_json::from_str(r#"{"key": {"name": "a"}, "spawn": {"idle_timeout_s": 5}}"#)
                .unwrap();
        assert_eq!(r.key.unwrap().namespace, "default");
        assert_eq!(r.spawn.unwrap().idle_timeout_s, Some(5));
    }
}

/// `POST /v1/drones/{name}/drain`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// After this many seconds the remaining backends are terminated (reason `drained`);
    /// without it, backends end on their own (idle, lifetime) and no new ones are placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u64>,
}

/// Reservations or usage in the units of [`Resources`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amounts {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub backends: u64,
}

/// A drone as `GET /v1/drones` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DroneView {
    pub name: String,
    /// `ready`, `draining`, `drained`, `unhealthy` or `disconnected`.
    pub state: String,
    pub run_id: Option<String>,
    pub runtime: Option<String>,
    pub pool: Option<String>,
    pub capacity: Option<crate::drone::Capacity>,
    pub reserved: Amounts,
    /// Backends on this drone by status name.
    pub backends: BTreeMap<String, u64>,
    /// Milliseconds since the last heartbeat (in-process drones: 0).
    pub heartbeat_age_ms: Option<u64>,
    pub drain_deadline_at: Option<UnixMillis>,
    /// Why the drone is unhealthy, if it is.
    pub message: Option<String>,
    /// The control-plane instance holding its session.
    #[serde(default)]
    pub instance: Option<String>,
}

/// `GET /v1/drones`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DroneList {
    pub drones: Vec<DroneView>,
}

/// Why a backend or a drone is hot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HotReason {
    /// A backend's request rate is above the configured multiple of its pool's median.
    RequestRate,
    /// A backend uses more than the configured fraction of its CPU cap, or a drone's backends
    /// more than the configured fraction of its CPU capacity.
    Cpu,
    /// More than the configured fraction of a drone's CPU or memory is reserved.
    Reservations,
}

impl HotReason {
    pub fn as_str(self) -> &'static str {
        match self {
            HotReason::RequestRate => "request_rate",
            HotReason::Cpu => "cpu",
            HotReason::Reservations => "reservations",
        }
    }
}

/// A hot backend in `GET /v1/hot`, with the figures it was judged on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HotBackend {
    pub backend: BackendId,
    pub drone: Option<String>,
    pub pool: String,
    /// What made it hot (the last conditions seen to hold).
    pub reasons: Vec<HotReason>,
    /// Requests per second over the window, summed over every proxy; `None` until known.
    pub requests_per_second: Option<f64>,
    /// The median request rate of the other backends with traffic in its pool.
    pub pool_median_requests_per_second: Option<f64>,
    /// CPU cores in use over the window; `None` until its drone reported usage twice.
    pub cpu_cores: Option<f64>,
    /// Its CPU cap in cores (`spawn.resources.cpu_millis`); without one, CPU never makes it hot.
    pub cpu_cap_cores: Option<f64>,
    pub hot_since: UnixMillis,
}

/// A hot drone in `GET /v1/hot`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HotDrone {
    pub drone: String,
    pub reasons: Vec<HotReason>,
    /// CPU cores its backends use over the window.
    pub cpu_cores: f64,
    pub cpu_capacity_cores: f64,
    /// Reserved fractions of its CPU and memory capacity (0 to 1).
    pub reserved_cpu_fraction: f64,
    pub reserved_memory_fraction: f64,
    pub hot_since: UnixMillis,
}

/// The detector's thresholds, as `GET /v1/hot` reports them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HotSettings {
    pub window_s: f64,
    pub sustain_s: f64,
    pub rate_multiple: f64,
    pub min_rate: f64,
    pub cpu_fraction: f64,
    pub drone_cpu_fraction: f64,
    pub drone_reserved_fraction: f64,
    /// Whether idle neighbours of hot backends are relocated (`--relieve-hot`).
    pub relieve: bool,
}

/// `GET /v1/hot`: what is hot now and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HotList {
    /// When the detector last ran; 0 before its first pass.
    pub evaluated_at: UnixMillis,
    pub settings: HotSettings,
    pub backends: Vec<HotBackend>,
    pub drones: Vec<HotDrone>,
    /// Backends relocated off hot drones since the scheduler started.
    pub relocated_total: u64,
}
