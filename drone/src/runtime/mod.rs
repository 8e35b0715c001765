//! Runtimes: how a drone runs one backend. The process runtime (one local child process per
//! backend) serves dev mode, tests and hosts without Docker; the Docker runtime (one container
//! per backend, through the Docker Engine API) is the production one. The agent
//! (`drone::agent`) drives a runtime; the runtime never talks to the scheduler.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use hangar_core::BackendId;
use hangar_core::drone::{BackendUsage, LogsRequest, SpawnCommand};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

pub use crate::logs::{LogSink, LogsError};

pub mod docker;
pub mod hollow;
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
    #[error("backend {backend} is already running on this drone")]
    AlreadyRunning { backend: BackendId },
    #[error(
        "no image to run for backend {backend}: give spawn.image or configure the drone's default image"
    )]
    NoImage { backend: BackendId },
    #[error(
        "image {image} is not present on drone {drone}: build or load it with docker (there is no registry)"
    )]
    ImageMissing { image: String, drone: String },
    #[error("invalid docker host {host:?}: use unix:///path/to/docker.sock or tcp://host:port")]
    InvalidDockerHost { host: String },
    #[error("docker daemon unreachable at {host}: {source}: start dockerd or fix --docker-host")]
    DockerUnreachable {
        host: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("docker cannot create a container of image {image} for backend {backend}: {source}")]
    CreateContainer {
        backend: BackendId,
        image: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error(
        "a container named {name} exists that is not backend {backend}'s on this drone: remove it with `docker rm -f {name}`"
    )]
    ContainerNameTaken { backend: BackendId, name: String },
    #[error("docker cannot start the container of backend {backend}: {source}")]
    StartContainer {
        backend: BackendId,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("docker cannot inspect the container of backend {backend}: {source}")]
    InspectContainer {
        backend: BackendId,
        #[source]
        source: bollard::errors::Error,
    },
    #[error(
        "docker published no host port for port {port} of backend {backend}'s container: check the drone's docker networking"
    )]
    NoPublishedPort { backend: BackendId, port: u16 },
    #[error(
        "the container of backend {backend} exited at once (exit code {code}): check its image and command; its last output: {output:?}"
    )]
    ExitedAtStart {
        backend: BackendId,
        /// The engine's exit code, or `"unknown"`.
        code: String,
        /// The tail of the container's stdout and stderr.
        output: String,
    },
    #[error("docker cannot stop the container of backend {backend}: {source}")]
    StopContainer {
        backend: BackendId,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot list the containers of drone {drone}: {source}")]
    ListContainers {
        drone: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("cannot read the resource usage of backend {backend}: {source}")]
    Stats {
        backend: BackendId,
        #[source]
        source: bollard::errors::Error,
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

    /// What the fence watchdog kills for `backend` if the agent cannot (see
    /// [`crate::watchdog`]); `None` when it is not running here.
    fn fence_target(&self, backend: &BackendId) -> Option<crate::watchdog::Target> {
        let _ = backend;
        None
    }

    /// CPU time and memory of every backend it runs, read once (Docker: `one-shot` stats;
    /// processes: `/proc`). Backends it cannot read right now are left out. The default, for
    /// runtimes that cannot measure, reports nothing.
    async fn usage(&self) -> Vec<BackendUsage> {
        Vec::new()
    }

    /// Sends the backend's output to `out` as [`crate::logs`] describes (the last
    /// `request.tail` lines, an empty opening chunk when there are none, then with
    /// `request.follow` new output until the backend has ended or `cancel` fires). Processes:
    /// their kept files; Docker: the engine's logs of a running container, the archived file
    /// of an ended one. The default, for runtimes that keep no output, has none.
    async fn logs(
        &self,
        request: &LogsRequest,
        out: LogSink,
        cancel: CancellationToken,
    ) -> Result<(), LogsError> {
        let _ = (request, out, cancel);
        Err(LogsError::NotKept {
            runtime: self.name(),
        })
    }
}
