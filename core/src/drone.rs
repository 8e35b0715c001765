//! The scheduler ⇄ drone protocol. In `hangar dev` these messages travel over in-process
//! channels; between hosts they travel over a persistent connection with the same shapes.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::api::Resources;
use crate::ids::BackendId;

/// Everything a drone needs to start one backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpawnCommand {
    pub backend: BackendId,
    /// `namespace/name` of the key, if any (a label and `HANGAR_KEY`).
    pub key: Option<String>,
    /// The fencing epoch of the key (`HANGAR_EPOCH`).
    pub epoch: u64,
    pub command: Option<Vec<String>>,
    pub image: Option<String>,
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    /// How long the backend may take to answer its readiness probe.
    pub startup_timeout_ms: u64,
}

/// Scheduler → drone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SchedulerMessage {
    Spawn(SpawnCommand),
    /// Stop a backend; `hard` kills at once, otherwise a grace period precedes the kill.
    Terminate {
        backend: BackendId,
        hard: bool,
    },
}

/// What happened to a backend on a drone. Reported in order per backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum BackendEvent {
    /// The drone accepted the spawn and is starting it.
    Starting,
    /// The process runs at `address`; readiness is being probed.
    Waiting { address: SocketAddr },
    /// The readiness probe succeeded.
    Ready { address: SocketAddr },
    /// The backend did not become ready in time (it is being stopped).
    StartupTimeout,
    /// The backend could not be started at all.
    SpawnFailed { message: String },
    /// The process exited; `exit_code` is `None` when it was killed by a signal we did not send.
    Exited { exit_code: Option<i32> },
    /// The process was stopped by its drone's self-fencing: the drone could not renew its
    /// lease in time, so the control plane may already have freed its key.
    Fenced { exit_code: Option<i32> },
}

/// Drone → scheduler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DroneMessage {
    Event {
        backend: BackendId,
        event: BackendEvent,
    },
}

/// What a drone offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub max_backends: u64,
}

/// A backend a drone runs, reported in `Hello` so a restarted agent's backends are re-adopted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryItem {
    pub backend: BackendId,
    pub address: SocketAddr,
    /// The agent run that started it (a previous run, after an agent restart).
    pub run_id: Option<String>,
}

/// The first message of a drone session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub drone: String,
    /// New for every agent process: distinguishes a restarted agent from a reconnecting one.
    pub run_id: String,
    pub capacity: Capacity,
    pub pool: String,
    /// `"process"` or `"docker"`.
    pub runtime: String,
    pub inventory: Vec<InventoryItem>,
    /// `None` when the runtime can take work; otherwise why not.
    pub unhealthy: Option<String>,
    /// The host the agent runs on (`--host-id`, by default the machine id): a drone name is
    /// held by one host at a time, and a new agent run on the same host takes over.
    #[serde(default)]
    pub host: Option<String>,
}

/// Drone → scheduler over the session connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromDrone {
    Hello(Hello),
    /// Renews the drone's lease; carries the runtime's health.
    Heartbeat {
        unhealthy: Option<String>,
    },
    /// A command was received (and will be handled idempotently).
    Ack {
        id: u64,
    },
    /// A backend event; `seq` increases per agent run and is acknowledged by the scheduler.
    Event {
        seq: u64,
        backend: BackendId,
        event: BackendEvent,
    },
    /// Resource use of the drone's running backends, sent on a period. Not acknowledged: a
    /// lost report is superseded by the next one (the figures are cumulative or current).
    Stats {
        usage: Vec<BackendUsage>,
    },
}

/// One backend's resource use, as its drone measured it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendUsage {
    pub backend: BackendId,
    /// CPU time used since the backend started, in seconds (user plus system).
    pub cpu_seconds_total: f64,
    /// Memory in use, in bytes: a container's usage without reclaimable page cache, or a
    /// process's resident set.
    pub memory_bytes: u64,
}

/// Scheduler → drone over the session connection.
/// WebSocket close code of a session the scheduler refuses for good (a hello that is wrong
/// as configured): the drone stops instead of retrying unchanged.
pub const CLOSE_REFUSED: u16 = 1008;

/// WebSocket close code of a session the scheduler cannot admit right now (a store hiccup, an
/// expired lease while waiting): the drone retries with backoff.
pub const CLOSE_TRY_AGAIN: u16 = 1013;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToDrone {
    /// The session is accepted; heartbeat at this interval, the lease lasts `lease_ttl_ms`.
    Welcome {
        lease_ttl_ms: u64,
        heartbeat_interval_ms: u64,
    },
    HeartbeatAck,
    /// A command to acknowledge with its id.
    Command {
        id: u64,
        message: SchedulerMessage,
    },
    /// Events up to and including `seq` are applied; the drone may forget them.
    EventAck {
        seq: u64,
    },
    /// A maintenance window: the control plane promises not to declare this drone lost for
    /// `for_ms` from now, so the drone holds its fence deadline until then (its backends
    /// survive a planned restart or upgrade of the control plane).
    Hold {
        for_ms: u64,
    },
}
