//! Runtimes: how a drone runs one backend. The process runtime (one local child process per
//! backend) serves dev mode, tests and hosts without Docker; the Docker runtime comes with the
//! drones issue. The agent (`drone::agent`) drives a runtime; the runtime never talks to the
//! scheduler.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use hangar_core::BackendId;
use hangar_core::drone::SpawnCommand;
use tokio::sync::oneshot;

pub mod process;

/// How a backend process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code; for a process killed by a signal, 128 + the signal number.
    pub code: Option<i32>,
}

/// Resolves once when the backend exits.
pub type ExitWatch = oneshot::Receiver<ExitStatus>;

/// A backend the runtime has started (or re-adopted).
#[derive(Debug)]
pub struct Started {
    pub backend: BackendId,
    /// Where the backend listens (the proxy's upstream).
    pub address: SocketAddr,
    pub exit: ExitWatch,
}

/// Runtime failures, one variant per step.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no command to run for backend {backend}: give spawn.command or configure a default")]
    NoCommand { backend: BackendId },
    #[error(
        "the process runtime cannot run image {image:?}: use a docker drone, or give spawn.command"
    )]
    ImageUnsupported { image: String },
    #[error("cannot find a free port for backend {backend}: {source}")]
    AllocatePort {
        backend: BackendId,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {program:?} for backend {backend}: {source}")]
    Spawn {
        backend: BackendId,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("backend {backend} is not running on this drone")]
    NotRunning { backend: BackendId },
    #[error("cannot stop backend {backend}: {source}")]
    Stop {
        backend: BackendId,
        #[source]
        source: std::io::Error,
    },
}

/// A way to run backends on this host.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// `"process"` or `"docker"`.
    fn name(&self) -> &'static str;

    /// Starts the backend and returns once it has an address (not once it is ready).
    async fn start(&self, cmd: &SpawnCommand) -> Result<Started, RuntimeError>;

    /// Stops the backend: a polite signal, then a kill after `grace` (zero: kill at once).
    /// Returns once it has exited; the exit is also delivered on its [`ExitWatch`].
    async fn stop(&self, backend: &BackendId, grace: Duration) -> Result<(), RuntimeError>;

    /// Backends this runtime finds running that a previous agent process started (re-adoption
    /// after an agent restart). The process runtime has none: its children die with the agent.
    async fn adopt(&self) -> Result<Vec<Started>, RuntimeError>;

    /// Whether the runtime can take work now; `Err` says why not (e.g. the Docker daemon is
    /// unreachable). A drone whose runtime is unhealthy takes no new backends.
    async fn health(&self) -> Result<(), String> {
        Ok(())
    }
}
