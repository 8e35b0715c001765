//! The scheduler ⇄ drone protocol. In `hangar dev` these messages travel over in-process
//! channels; between hosts they travel over a persistent connection with the same shapes.
//!
//! Besides commands and backend events the session carries backend logs: the scheduler asks
//! with [`SchedulerMessage::Logs`] (a request id of its choosing), the drone answers with
//! [`DroneMessage::Logs`] chunks tagged with that id and one [`DroneMessage::LogsEnd`], and
//! [`SchedulerMessage::CancelLogs`] stops a follow early. Log messages are not acknowledged
//! nor re-sent: a request lives as long as the session that carried it. A drone older than
//! the scheduler ignores the request (it cannot parse it), so the scheduler bounds how long it
//! waits for the first answer.

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
    /// Send a backend's output (see [`LogsRequest`]).
    Logs(LogsRequest),
    /// Stop answering log request `request` (its reader went away). Unknown ids are ignored.
    CancelLogs {
        request: u64,
    },
}

/// The largest `data` of one [`DroneMessage::Logs`] chunk, in bytes: chunks end at a line's
/// end, except for a line longer than this, which is cut (at a character boundary).
pub const LOG_CHUNK_MAX: usize = 64 * 1024;

/// A request for a backend's output: its stdout and stderr as the drone kept them, oldest
/// first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    /// Chosen by the scheduler, unique among its open requests: tags every answer.
    pub request: u64,
    pub backend: BackendId,
    /// Only the last `tail` lines of what is kept; `None`: all of it.
    #[serde(default)]
    pub tail: Option<u64>,
    /// After the tail, keep sending new output until the backend has ended (and its output
    /// is drained) or the request is cancelled.
    #[serde(default)]
    pub follow: bool,
}

/// Why a log request ended early.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogsFailure {
    /// The drone keeps no logs of that backend: it never ran there, or it ended longer ago
    /// than the drone's retention period.
    NotFound { message: String },
    /// The logs exist but could not be read (a disk or Docker error).
    Failed { message: String },
}

impl LogsFailure {
    pub fn message(&self) -> &str {
        match self {
            LogsFailure::NotFound { message } | LogsFailure::Failed { message } => message,
        }
    }
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
    /// Output of the backend of log request `request`: whole lines of at most
    /// [`LOG_CHUNK_MAX`] bytes (invalid UTF-8 replaced). The first chunk of a request is sent
    /// as soon as the backend's logs are found (empty if need be), so the scheduler learns at
    /// once that the request was accepted.
    Logs { request: u64, data: String },
    /// The last message of log request `request`: `error` says why it ended early, `None`
    /// that everything asked for was sent.
    LogsEnd {
        request: u64,
        error: Option<LogsFailure>,
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
    /// [`DroneMessage::Logs`] over the session (not acknowledged).
    Logs {
        request: u64,
        data: String,
    },
    /// [`DroneMessage::LogsEnd`] over the session (not acknowledged).
    LogsEnd {
        request: u64,
        error: Option<LogsFailure>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The log messages' wire shapes, and a request from a scheduler that leaves out the
    /// optional fields.
    #[test]
    fn log_messages_round_trip() {
        let backend = BackendId::parse("b1").unwrap();
        let ask = ToDrone::Command {
            id: 3,
            message: SchedulerMessage::Logs(LogsRequest {
                request: 9,
                backend: backend.clone(),
                tail: Some(10),
                follow: true,
            }),
        };
        let text = serde_json::to_string(&ask).unwrap();
        assert_eq!(serde_json::from_str::<ToDrone>(&text).unwrap(), ask);
        let minimal: SchedulerMessage =
            serde_json::from_str(r#"{"type":"logs","request":1,"backend":"b1"}"#).unwrap();
        assert_eq!(
            minimal,
            SchedulerMessage::Logs(LogsRequest {
                request: 1,
                backend,
                tail: None,
                follow: false,
            })
        );
        for m in [
            FromDrone::Logs {
                request: 9,
                data: "listening on 127.0.0.1:1\n".into(),
            },
            FromDrone::LogsEnd {
                request: 9,
                error: Some(LogsFailure::NotFound {
                    message: "no logs".into(),
                }),
            },
            FromDrone::LogsEnd {
                request: 9,
                error: None,
            },
        ] {
            let text = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<FromDrone>(&text).unwrap(), m);
        }
    }
}
