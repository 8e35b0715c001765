//! The Docker runtime: each backend is one container on this drone's Docker engine, driven
//! through the Engine API with bollard.
//!
//! **Containers.** A backend's container is named `hangar-<backend id>` and labelled with the
//! backend id, the drone, the agent run that started it, the key and the epoch, and with how it
//! is networked (`hangar.network`, `hangar.port`), so that a later agent run can find it and
//! recover its address from the engine alone. Caps come from the spawn's `resources` (CPU as
//! `NanoCpus`, memory as `Memory` with no extra swap) plus the configured pids limit. With
//! bridge networking (the default) the backend listens on `container_port` in its own network
//! namespace and the engine publishes that port on a random port of the drone's advertised
//! address (127.0.0.1 unless `--advertise-address` says otherwise); with host
//! networking the runtime picks a free port and the backend listens on it directly. Either way
//! the backend learns where to listen from `PORT` and `HANGAR_BIND`.
//!
//! **Exits.** One subscription per runtime to the engine's event stream (`die` events of the
//! containers labelled with this drone) resolves each backend's [`ExitWatch`] with the engine's
//! exit code. When the stream breaks it is opened again asking for the events since shortly
//! before, and every (re)subscription plus a periodic pass reconciles the containers being
//! watched with a listing of the drone's containers, so that an exit is never missed, at worst
//! seen late. Every path that learns of an exit delivers it through one idempotent step (the
//! first one wins); the container is removed once its exit has been delivered. `stop` asks the
//! engine for the exit code itself, so it never waits on the event stream.
//!
//! **Logs.** With a [`LogFiles`] configured, containers log through the engine's `local`
//! driver bounded like the drone's files (two files of half the bound each), a running
//! container's logs are read from the engine, and an ended container's output is archived
//! into its backend's log file before the container is removed, so the logs of ended
//! backends stay readable for the retention period.
//!
//! **Restarts.** Containers outlive the agent: dropping a [`DockerRuntime`] stops watching but
//! stops no container. [`Runtime::adopt`] finds the running containers of any earlier run of
//! this drone (and removes the exited ones); the scheduler then decides which to keep. A start
//! whose container name is already taken by the same backend's container adopts it if it runs
//! (an agent that restarted between starting a container and reporting it) and removes and
//! recreates it otherwise, so a resent spawn never fails on a leftover.
//!
//! **Engine versions.** The API version is negotiated on first use (not at connect time, so an
//! agent starts, and reports itself unhealthy, while the daemon is down): the client asks for
//! bollard's newest version and steps down to the engine's when the engine is older.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum,
    ContainerSummaryStateEnum, EventMessage, HostConfig, HostConfigLogConfig, PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptions, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StatsOptionsBuilder, StopContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use bollard::{API_DEFAULT_VERSION, ClientVersion, Docker};
use futures_util::StreamExt;
use hangar_core::BackendId;
use hangar_core::drone::{LogsRequest, SpawnCommand};
use tokio::sync::{OnceCell, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ExitStatus, ExitWatch, LogSink, LogsError, Runtime, RuntimeError, Started};
use crate::logs::{Chunker, LogFiles};

/// The engine used when the configuration names none.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// The port a bridge-networked backend listens on inside its container.
pub const DEFAULT_CONTAINER_PORT: u16 = 8080;
/// The default cap on processes (and threads) per container.
pub const DEFAULT_PIDS_LIMIT: i64 = 512;

/// Label: the backend's id.
pub const LABEL_BACKEND_ID: &str = "hangar.backend_id";
/// Label: the drone that runs the container.
pub const LABEL_DRONE: &str = "hangar.drone";
/// Label: the agent run that started the container.
pub const LABEL_RUN_ID: &str = "hangar.run_id";
/// Label: the backend's key (`namespace/name`, empty when it has none).
pub const LABEL_KEY: &str = "hangar.key";
/// Label: the key's fencing epoch.
pub const LABEL_EPOCH: &str = "hangar.epoch";
/// Label: `bridge` or `host`.
pub const LABEL_NETWORK: &str = "hangar.network";
/// Label: the port the backend listens on (in its container for bridge networking, on the
/// host for host networking).
pub const LABEL_PORT: &str = "hangar.port";

/// bollard's timeout for one request to get its response headers, in seconds. A stop request
/// only answers once the container has stopped, hence [`MAX_STOP_GRACE`] below it.
const REQUEST_TIMEOUT_SECS: u64 = 120;
/// The longest grace `stop` gives a container, so that the stop request answers within
/// [`REQUEST_TIMEOUT_SECS`].
const MAX_STOP_GRACE: Duration = Duration::from_secs(100);
/// How long `health` waits for the engine: a drone must learn quickly that it cannot work.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the containers being watched are compared with the engine's listing, in case an
/// exit event was lost (an engine restart, a stream that broke for longer than the engine's
/// event backlog, clock skew with a remote engine).
const RECONCILE_PERIOD: Duration = Duration::from_secs(10);
/// A resubscribed event stream starts this far in the past, so that events from around the
/// moment the previous stream broke are replayed rather than lost.
const EVENTS_REPLAY: Duration = Duration::from_secs(2);
/// Delays between attempts to resubscribe to the event stream.
const RESUBSCRIBE_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RESUBSCRIBE_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Create attempts when the name is taken by a leftover that is removed in between.
const CREATE_ATTEMPTS: usize = 3;
/// How much of a container's output goes into the error of a container that exited at once.
const OUTPUT_TAIL_LINES: &str = "20";
const OUTPUT_TAIL_BYTES: usize = 2000;
/// Upper bound on collecting that output.
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound on reading an ended container's output into its archive.
const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Variables the runtime sets itself; the spawn's values for them are ignored.
const RESERVED_ENV: [&str; 5] = [
    "PORT",
    "HANGAR_BIND",
    "HANGAR_BACKEND_ID",
    "HANGAR_KEY",
    "HANGAR_EPOCH",
];

/// How a backend's container is networked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DockerNetwork {
    /// Its own network namespace; `container_port` is published on 127.0.0.1 on a random
    /// host port, which is the address handed to the proxy.
    #[default]
    Bridge,
    /// The host's network namespace; the backend listens on 127.0.0.1 on a port the runtime
    /// picks. Faster (no NAT, no userland proxy) but no isolation of the network.
    Host,
}

impl DockerNetwork {
    fn label(self) -> &'static str {
        match self {
            DockerNetwork::Bridge => "bridge",
            DockerNetwork::Host => "host",
        }
    }
}

/// Configuration of a [`DockerRuntime`].
#[derive(Clone, Debug)]
pub struct DockerRuntimeConfig {
    /// This drone's name: the `hangar.drone` label, and what `adopt` and the event
    /// subscription are scoped to.
    pub drone: String,
    /// The agent process's run id (`hangar.run_id`), new for every agent process.
    pub run_id: String,
    /// `unix:///path/to/docker.sock` or `tcp://host:port`; `None` is [`DEFAULT_DOCKER_HOST`].
    /// (The binary maps `--docker-host`, and `DOCKER_HOST`, here: libraries read no
    /// environment.) Backends are published on [`DockerRuntimeConfig::advertise`], so the
    /// engine must run on this host.
    pub docker_host: Option<String>,
    /// The address proxies reach this drone's backends at: bridge-networked containers are
    /// published on it, host-networked backends listen on it (`--advertise-address`; by
    /// default 127.0.0.1, which only a proxy on this host can reach).
    pub advertise: IpAddr,
    pub network: DockerNetwork,
    /// The port bridge-networked backends listen on inside their container (`PORT`).
    pub container_port: u16,
    /// `PidsLimit` of every container.
    pub pids_limit: i64,
    /// The image run when a spawn gives none.
    pub default_image: Option<String>,
    /// Where ended containers' output is archived (and what bounds the engine's log files);
    /// `None` keeps no logs past a container's removal.
    pub logs: Option<Arc<LogFiles>>,
}

impl DockerRuntimeConfig {
    /// A configuration with the defaults: the local engine, bridge networking, port 8080, a
    /// pids limit of 512 and no default image.
    pub fn new(drone: impl Into<String>, run_id: impl Into<String>) -> Self {
        DockerRuntimeConfig {
            drone: drone.into(),
            run_id: run_id.into(),
            docker_host: None,
            advertise: IpAddr::V4(Ipv4Addr::LOCALHOST),
            network: DockerNetwork::Bridge,
            container_port: DEFAULT_CONTAINER_PORT,
            pids_limit: DEFAULT_PIDS_LIMIT,
            default_image: None,
            logs: None,
        }
    }
}

/// A backend's resource use, read once from the engine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ContainerStats {
    /// CPU time used since the container started.
    pub cpu_seconds_total: f64,
    /// Memory in use, page cache that could be reclaimed excluded (as `docker stats` shows).
    pub memory_bytes: u64,
}

/// What the runtime keeps per container it watches.
struct Tracked {
    /// The container id: tells this container from a later one of the same backend.
    container: String,
    /// The agent's end; taken when the exit is delivered.
    exit: Option<oneshot::Sender<ExitStatus>>,
    /// For `stop`, which returns once the exit has been delivered.
    exited: watch::Sender<Option<ExitStatus>>,
}

struct Inner {
    config: DockerRuntimeConfig,
    /// The engine's address, for connecting and for messages.
    host: String,
    /// The engine client, created and version-negotiated on first successful use.
    client: OnceCell<Docker>,
    /// Containers whose exit is still to be delivered. One entry per backend; a std mutex,
    /// never held across `.await`.
    tracked: Mutex<HashMap<BackendId, Tracked>>,
    /// The event watcher and container removals.
    tasks: TaskTracker,
    /// Cancelled when the [`DockerRuntime`] is dropped: the event watcher then ends.
    dropped: CancellationToken,
}

/// Runs each backend as a Docker container. See the module docs.
pub struct DockerRuntime {
    inner: Arc<Inner>,
}

impl DockerRuntime {
    /// Sets up the runtime and starts watching the engine's events. Does not need the engine
    /// to be up (see [`Runtime::health`]); fails only on a malformed `docker_host`. Must be
    /// called within a tokio runtime.
    pub fn connect(config: DockerRuntimeConfig) -> Result<Self, RuntimeError> {
        let host = config
            .docker_host
            .clone()
            .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string());
        if !is_supported_host(&host) {
            return Err(RuntimeError::InvalidDockerHost { host });
        }
        let inner = Arc::new(Inner {
            config,
            host,
            client: OnceCell::new(),
            tracked: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            dropped: CancellationToken::new(),
        });
        inner.tasks.spawn(watch_events(inner.clone()));
        Ok(DockerRuntime { inner })
    }

    pub fn config(&self) -> &DockerRuntimeConfig {
        &self.inner.config
    }

    /// The backends being watched (started or adopted, exit not yet delivered).
    pub fn running(&self) -> Vec<BackendId> {
        lock(&self.inner.tracked).keys().cloned().collect()
    }

    /// The backend's CPU time and memory use, from one engine snapshot (`one-shot` stats, a
    /// few milliseconds).
    pub async fn stats(&self, backend: &BackendId) -> Result<ContainerStats, RuntimeError> {
        let container = self.container_of(backend)?;
        let docker = self.inner.docker().await?;
        let options = StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(true)
            .build();
        let stats = docker
            .stats(&container, Some(options))
            .next()
            .await
            .ok_or_else(|| RuntimeError::NotRunning {
                backend: backend.clone(),
            })?
            .map_err(|source| match status_code(&source) {
                Some(404) => RuntimeError::NotRunning {
                    backend: backend.clone(),
                },
                _ => RuntimeError::Stats {
                    backend: backend.clone(),
                    source,
                },
            })?;
        let cpu_ns = stats
            .cpu_stats
            .and_then(|cpu| cpu.cpu_usage)
            .and_then(|usage| usage.total_usage)
            .unwrap_or(0);
        let memory = stats.memory_stats.unwrap_or_default();
        // cgroup v1 reports reclaimable page cache as total_inactive_file, v2 as inactive_file.
        let inactive = memory
            .stats
            .as_ref()
            .and_then(|s| {
                s.get("total_inactive_file")
                    .or_else(|| s.get("inactive_file"))
            })
            .copied()
            .unwrap_or(0);
        Ok(ContainerStats {
            cpu_seconds_total: cpu_ns as f64 / 1e9,
            memory_bytes: memory.usage.unwrap_or(0).saturating_sub(inactive),
        })
    }

    fn container_of(&self, backend: &BackendId) -> Result<String, RuntimeError> {
        lock(&self.inner.tracked)
            .get(backend)
            .map(|tracked| tracked.container.clone())
            .ok_or_else(|| RuntimeError::NotRunning {
                backend: backend.clone(),
            })
    }

    /// The container to create for `cmd`, listening on `port`.
    fn container_spec(&self, cmd: &SpawnCommand, image: &str, port: u16) -> ContainerCreateBody {
        let config = &self.inner.config;
        let bind = match config.network {
            // Reached through the published port, i.e. from outside the container's namespace.
            DockerNetwork::Bridge => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            DockerNetwork::Host => config.advertise,
        };
        let key = cmd.key.as_deref().unwrap_or("");
        let mut env: Vec<String> = cmd
            .env
            .iter()
            .filter(|(name, _)| !RESERVED_ENV.contains(&name.as_str()))
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        env.extend([
            format!("PORT={port}"),
            format!("HANGAR_BIND={bind}"),
            format!("HANGAR_BACKEND_ID={}", cmd.backend),
            format!("HANGAR_KEY={key}"),
            format!("HANGAR_EPOCH={}", cmd.epoch),
        ]);
        let labels = HashMap::from([
            (LABEL_BACKEND_ID.to_string(), cmd.backend.to_string()),
            (LABEL_DRONE.to_string(), config.drone.clone()),
            (LABEL_RUN_ID.to_string(), config.run_id.clone()),
            (LABEL_KEY.to_string(), key.to_string()),
            (LABEL_EPOCH.to_string(), cmd.epoch.to_string()),
            (
                LABEL_NETWORK.to_string(),
                config.network.label().to_string(),
            ),
            (LABEL_PORT.to_string(), port.to_string()),
        ]);
        let memory = cmd
            .resources
            .memory_mb
            .map(|mb| i64::try_from(mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX));
        let mut host_config = HostConfig {
            nano_cpus: cmd
                .resources
                .cpu_millis
                .map(|millis| i64::try_from(millis.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
            memory,
            // Equal to the memory limit: the cap is on memory, not memory plus as much swap.
            memory_swap: memory,
            pids_limit: Some(config.pids_limit),
            log_config: config
                .logs
                .as_ref()
                .map(|files| engine_log_config(files.config().max_bytes)),
            ..Default::default()
        };
        let mut exposed_ports = None;
        match config.network {
            DockerNetwork::Bridge => {
                let port_key = format!("{port}/tcp");
                // No host port: the engine picks a free one.
                let binding = PortBinding {
                    host_ip: Some(config.advertise.to_string()),
                    host_port: None,
                };
                host_config.port_bindings =
                    Some(HashMap::from([(port_key.clone(), Some(vec![binding]))]));
                exposed_ports = Some(vec![port_key]);
            }
            DockerNetwork::Host => host_config.network_mode = Some("host".to_string()),
        }
        ContainerCreateBody {
            image: Some(image.to_string()),
            // Like `docker run IMAGE ARGS...`: the arguments of the image's entrypoint.
            cmd: cmd.command.clone(),
            env: Some(env),
            labels: Some(labels),
            exposed_ports,
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// Creates the backend's container, or finds the running one a previous attempt created.
    async fn create(
        &self,
        docker: &Docker,
        cmd: &SpawnCommand,
        image: &str,
        spec: ContainerCreateBody,
    ) -> Result<Created, RuntimeError> {
        let backend = &cmd.backend;
        let name = container_name(backend);
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match docker
                .create_container(Some(options.clone()), spec.clone())
                .await
            {
                Ok(response) => {
                    for warning in response.warnings {
                        tracing::debug!(%backend, %warning, "docker warning on create");
                    }
                    return Ok(Created {
                        id: response.id,
                        running: false,
                    });
                }
                Err(error) => error,
            };
            match status_code(&error) {
                Some(404) => {
                    return Err(RuntimeError::ImageMissing {
                        image: image.to_string(),
                        drone: self.inner.config.drone.clone(),
                    });
                }
                // The name is taken: by this backend's container from an earlier attempt, or by
                // something else.
                Some(409) if attempt < CREATE_ATTEMPTS => {}
                _ => {
                    return Err(RuntimeError::CreateContainer {
                        backend: backend.clone(),
                        image: image.to_string(),
                        source: error,
                    });
                }
            }
            let info = match docker.inspect_container(&name, None).await {
                Ok(info) => info,
                // Removed in the meantime: try again.
                Err(error) if status_code(&error) == Some(404) => continue,
                Err(source) => {
                    return Err(RuntimeError::InspectContainer {
                        backend: backend.clone(),
                        source,
                    });
                }
            };
            let labels = info.config.as_ref().and_then(|c| c.labels.as_ref());
            let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
            let Some(id) = info.id.clone() else { continue };
            if label(LABEL_BACKEND_ID) != Some(backend.as_str())
                || label(LABEL_DRONE) != Some(self.inner.config.drone.as_str())
            {
                return Err(RuntimeError::ContainerNameTaken {
                    backend: backend.clone(),
                    name,
                });
            }
            if is_running(&info) {
                tracing::info!(%backend, container = short(&id), "adopting the backend's running container");
                return Ok(Created { id, running: true });
            }
            tracing::info!(%backend, container = short(&id), "removing the backend's stopped container to create it again");
            if let Err(error) = remove_container(docker, &id).await {
                return Err(RuntimeError::CreateContainer {
                    backend: backend.clone(),
                    image: image.to_string(),
                    source: error,
                });
            }
        }
    }

    /// Undoes a start that failed after the container was created.
    fn abandon(&self, backend: &BackendId, container: &str) {
        self.inner.untrack(backend, container);
        self.inner
            .remove_later(backend.clone(), container.to_string());
    }

    /// Builds the error for a container that exited before its address could be read.
    async fn exited_at_start(
        &self,
        docker: &Docker,
        backend: &BackendId,
        container: &str,
        code: Option<i32>,
    ) -> RuntimeError {
        let output = output_tail(docker, container).await;
        self.abandon(backend, container);
        RuntimeError::ExitedAtStart {
            backend: backend.clone(),
            code: code.map_or_else(|| "unknown".to_string(), |code| code.to_string()),
            output,
        }
    }
}

impl Drop for DockerRuntime {
    fn drop(&mut self) {
        // Containers keep running (a later agent run re-adopts them); only watching stops.
        self.inner.dropped.cancel();
    }
}

/// The result of [`DockerRuntime::create`].
struct Created {
    id: String,
    /// Whether it is an existing container that already runs.
    running: bool,
}

impl Inner {
    /// The engine client; creates and negotiates it if no call has succeeded yet.
    async fn docker(&self) -> Result<&Docker, RuntimeError> {
        self.client
            .get_or_try_init(|| engine_client(&self.host))
            .await
            .map_err(|source| RuntimeError::DockerUnreachable {
                host: self.host.clone(),
                source,
            })
    }

    /// Starts watching a container's exit; `None` if the backend is watched already.
    fn track(&self, backend: &BackendId, container: &str) -> Option<ExitWatch> {
        let mut tracked = lock(&self.tracked);
        if tracked.contains_key(backend) {
            return None;
        }
        let (exit_tx, exit_rx) = oneshot::channel();
        tracked.insert(
            backend.clone(),
            Tracked {
                container: container.to_string(),
                exit: Some(exit_tx),
                exited: watch::Sender::new(None),
            },
        );
        Some(exit_rx)
    }

    /// Stops watching a container without delivering an exit.
    fn untrack(&self, backend: &BackendId, container: &str) {
        let mut tracked = lock(&self.tracked);
        if tracked
            .get(backend)
            .is_some_and(|entry| entry.container == container)
        {
            tracked.remove(backend);
        }
    }

    /// Delivers a container's exit, unless it has been delivered already (every path that
    /// learns of an exit calls this; the first wins), then removes the container.
    fn resolve(self: &Arc<Self>, backend: &BackendId, container: &str, status: ExitStatus) {
        let entry = {
            let mut tracked = lock(&self.tracked);
            if tracked
                .get(backend)
                .is_some_and(|entry| entry.container == container)
            {
                tracked.remove(backend)
            } else {
                None
            }
        };
        let Some(mut entry) = entry else { return };
        tracing::info!(%backend, container = short(container), code = ?status.code, "backend container exited");
        entry.exited.send_replace(Some(status));
        if let Some(exit) = entry.exit.take() {
            // The agent may have stopped watching; nothing to do then.
            let _ = exit.send(status);
        }
        self.remove_later(backend.clone(), container.to_string());
    }

    /// Archives a container's output and removes the container, in the background (it has
    /// exited, or is being abandoned).
    fn remove_later(self: &Arc<Self>, backend: BackendId, container: String) {
        let inner = self.clone();
        self.tasks.spawn(async move {
            let Ok(docker) = inner.docker().await else {
                return;
            };
            inner.archive(docker, &backend, &container).await;
            if let Err(error) = remove_container(docker, &container).await {
                tracing::warn!(container = short(&container), %error, "cannot remove an exited container; the next agent run's adopt removes it");
            }
        });
    }

    /// Keeps an ended container's output as its backend's log (if logs are kept), before the
    /// container is removed: a reader then finds the container or the archive, never neither.
    async fn archive(&self, docker: &Docker, backend: &BackendId, container: &str) {
        let Some(files) = &self.config.logs else {
            return;
        };
        let max = usize::try_from(files.config().max_bytes).unwrap_or(usize::MAX);
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail("all")
            .build();
        let collect = async {
            let mut output: Vec<u8> = Vec::new();
            let mut logs = docker.logs(container, Some(options));
            while let Some(item) = logs.next().await {
                output.extend_from_slice(&item?.into_bytes());
                // Only the newest `max` bytes are kept: drop the rest now and then.
                if output.len() > max.saturating_mul(2) {
                    let excess = output.len() - max;
                    output.drain(..excess);
                }
            }
            Ok::<_, DockerError>(output)
        };
        let output = match tokio::time::timeout(ARCHIVE_TIMEOUT, collect).await {
            Ok(Ok(output)) => output,
            Ok(Err(error)) => {
                tracing::warn!(%backend, container = short(container), %error, "cannot read an ended container's output; its logs are lost");
                return;
            }
            Err(_) => {
                tracing::warn!(%backend, container = short(container), "reading an ended container's output took longer than {ARCHIVE_TIMEOUT:?}; its logs are lost");
                return;
            }
        };
        if let Err(error) = files.archive(backend, &output) {
            tracing::warn!(%backend, %error, "cannot archive an ended container's output; its logs are lost");
        }
    }

    /// The containers labelled with this drone, in any state.
    fn drone_containers(&self) -> ListContainersOptions {
        let filters = HashMap::from([(
            "label",
            vec![format!("{LABEL_DRONE}={}", self.config.drone)],
        )]);
        ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build()
    }

    /// Delivers the exits of watched containers that have exited (or vanished) according to a
    /// listing: the safety net under the event stream.
    async fn reconcile(self: &Arc<Self>, docker: &Docker) -> Result<(), DockerError> {
        let watched: Vec<(BackendId, String)> = lock(&self.tracked)
            .iter()
            .map(|(backend, entry)| (backend.clone(), entry.container.clone()))
            .collect();
        if watched.is_empty() {
            return Ok(());
        }
        let listed = docker
            .list_containers(Some(self.drone_containers()))
            .await?;
        let states: HashMap<String, Option<ContainerSummaryStateEnum>> = listed
            .into_iter()
            .filter_map(|summary| Some((summary.id?, summary.state)))
            .collect();
        for (backend, container) in watched {
            let code = match states.get(&container) {
                Some(Some(ContainerSummaryStateEnum::EXITED | ContainerSummaryStateEnum::DEAD)) => {
                    match docker.inspect_container(&container, None).await {
                        Ok(info) => exit_code(&info),
                        Err(_) => None,
                    }
                }
                // Removed behind our back: the exit code is lost with it.
                None => None,
                // Created (being started), running, or on its way out (the next pass sees it).
                Some(_) => continue,
            };
            tracing::info!(%backend, container = short(&container), "exit found by reconciliation");
            self.resolve(&backend, &container, ExitStatus { code });
        }
        Ok(())
    }

    /// Handles one `die` event.
    fn on_event(self: &Arc<Self>, event: EventMessage) {
        let Some(actor) = event.actor else { return };
        let (Some(container), Some(attributes)) = (actor.id, actor.attributes) else {
            return;
        };
        let Some(backend) = attributes
            .get(LABEL_BACKEND_ID)
            .and_then(|id| BackendId::parse(id).ok())
        else {
            return;
        };
        let code = attributes
            .get("exitCode")
            .and_then(|code| code.parse::<i32>().ok());
        self.resolve(&backend, &container, ExitStatus { code });
    }
}

/// The event watcher: one subscription to the engine's `die` events for this drone, opened
/// again whenever it breaks, with a reconciliation after each (re)subscription and on a
/// period. Ends when the runtime is dropped.
async fn watch_events(inner: Arc<Inner>) {
    let filters = HashMap::from([
        ("type", vec!["container".to_string()]),
        ("event", vec!["die".to_string()]),
        (
            "label",
            vec![format!("{LABEL_DRONE}={}", inner.config.drone)],
        ),
    ]);
    let mut backoff = RESUBSCRIBE_BACKOFF_MIN;
    // Logged as a warning once, then quietly while the same problem lasts (a daemon that is
    // down is reported by `health` anyway).
    let mut last_problem = String::new();
    loop {
        let docker = tokio::select! {
            () = inner.dropped.cancelled() => return,
            docker = inner.docker() => docker.cloned(),
        };
        let problem = match docker {
            Ok(docker) => {
                // Replaying from a little before now covers exits around the moment the
                // previous stream broke; older ones are found by the reconciliation below.
                let since = unix_time(SystemTime::now() - EVENTS_REPLAY);
                let options = EventsOptionsBuilder::new()
                    .since(&since)
                    .filters(&filters)
                    .build();
                let mut events = docker.events(Some(options));
                // The first tick is immediate: reconcile right after subscribing.
                let mut reconcile = tokio::time::interval(RECONCILE_PERIOD);
                reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = inner.dropped.cancelled() => return,
                        event = events.next() => match event {
                            Some(Ok(event)) => {
                                backoff = RESUBSCRIBE_BACKOFF_MIN;
                                last_problem.clear();
                                inner.on_event(event);
                            }
                            Some(Err(error)) => break error.to_string(),
                            None => break "the engine ended the stream".to_string(),
                        },
                        _ = reconcile.tick() => {
                            if let Err(error) = inner.reconcile(&docker).await {
                                tracing::warn!(drone = %inner.config.drone, %error, "cannot reconcile containers with the docker engine");
                            }
                        }
                    }
                }
            }
            Err(error) => error.to_string(),
        };
        if problem == last_problem {
            tracing::debug!(drone = %inner.config.drone, %problem, retry_in = ?backoff, "docker event stream still unavailable");
        } else {
            tracing::warn!(drone = %inner.config.drone, %problem, retry_in = ?backoff, "docker event stream unavailable; subscribing again");
            last_problem = problem;
        }
        tokio::select! {
            () = inner.dropped.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RESUBSCRIBE_BACKOFF_MAX);
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn fence_target(&self, backend: &BackendId) -> Option<crate::watchdog::Target> {
        Some(crate::watchdog::Target::Container(container_name(backend)))
    }

    fn name(&self) -> &'static str {
        "docker"
    }

    async fn start(&self, cmd: &SpawnCommand) -> Result<Started, RuntimeError> {
        let backend = &cmd.backend;
        let image = cmd
            .image
            .as_deref()
            .or(self.inner.config.default_image.as_deref())
            .filter(|image| !image.is_empty())
            .ok_or_else(|| RuntimeError::NoImage {
                backend: backend.clone(),
            })?;
        if lock(&self.inner.tracked).contains_key(backend) {
            return Err(RuntimeError::AlreadyRunning {
                backend: backend.clone(),
            });
        }
        let docker = self.inner.docker().await?;
        let port = match self.inner.config.network {
            DockerNetwork::Bridge => self.inner.config.container_port,
            DockerNetwork::Host => {
                allocate_port(self.inner.config.advertise).map_err(|source| {
                    RuntimeError::AllocatePort {
                        backend: backend.clone(),
                        source,
                    }
                })?
            }
        };
        let spec = self.container_spec(cmd, image, port);
        let created = self.create(docker, cmd, image, spec).await?;
        let container = created.id;
        // Watched before it starts, so that even an immediate exit finds its watcher.
        let Some(mut exit) = self.inner.track(backend, &container) else {
            // A concurrent start of the same backend won the race.
            return Err(RuntimeError::AlreadyRunning {
                backend: backend.clone(),
            });
        };
        if !created.running
            && let Err(source) = docker.start_container(&container, None).await
        {
            self.abandon(backend, &container);
            return Err(RuntimeError::StartContainer {
                backend: backend.clone(),
                source,
            });
        }

        // The address comes from the engine (the published port), the same way for a new
        // container as for one adopted above.
        let info = match docker.inspect_container(&container, None).await {
            Ok(info) => info,
            Err(error) if status_code(&error) == Some(404) => {
                // Exited, delivered and removed already.
                let code = exit.try_recv().ok().and_then(|status| status.code);
                return Err(self
                    .exited_at_start(docker, backend, &container, code)
                    .await);
            }
            Err(source) => {
                self.abandon(backend, &container);
                return Err(RuntimeError::InspectContainer {
                    backend: backend.clone(),
                    source,
                });
            }
        };
        if !is_running(&info) {
            let code = exit_code(&info);
            return Err(self
                .exited_at_start(docker, backend, &container, code)
                .await);
        }
        let Some(address) = address_of(&info, self.inner.config.advertise) else {
            self.abandon(backend, &container);
            return Err(RuntimeError::NoPublishedPort {
                backend: backend.clone(),
                port,
            });
        };
        tracing::info!(%backend, container = short(&container), %address, %image, "started backend container");
        Ok(Started {
            backend: backend.clone(),
            address,
            exit,
        })
    }

    /// Stops the container with the engine's stop (its stop signal, then `SIGKILL` after
    /// `grace` rounded up to whole seconds and capped at 100 s), or kills it at once for a zero
    /// grace, and returns once its exit has been delivered.
    async fn stop(&self, backend: &BackendId, grace: Duration) -> Result<(), RuntimeError> {
        let (container, mut exited) = {
            let tracked = lock(&self.inner.tracked);
            let entry = tracked
                .get(backend)
                .ok_or_else(|| RuntimeError::NotRunning {
                    backend: backend.clone(),
                })?;
            (entry.container.clone(), entry.exited.subscribe())
        };
        let docker = self.inner.docker().await?;
        let result = if grace.is_zero() {
            let options = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
            docker.kill_container(&container, Some(options)).await
        } else {
            let seconds = grace.min(MAX_STOP_GRACE).as_secs_f64().ceil() as i32;
            let options = StopContainerOptionsBuilder::new().t(seconds).build();
            docker.stop_container(&container, Some(options)).await
        };
        match result {
            Ok(()) => {}
            // 404: gone already; 409: not running any more. Either way its exit is known or
            // about to be.
            Err(error) if matches!(status_code(&error), Some(404 | 409)) => {}
            Err(source) => {
                return Err(RuntimeError::StopContainer {
                    backend: backend.clone(),
                    source,
                });
            }
        }
        // Ask the engine for the exit code rather than wait for the event stream.
        if exited.borrow().is_none() {
            let options = WaitContainerOptionsBuilder::new()
                .condition("not-running")
                .build();
            let code = match docker
                .wait_container(&container, Some(options))
                .next()
                .await
            {
                Some(Ok(response)) => Some(response.status_code),
                // bollard reports a non-zero exit code as an error.
                Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Some(code),
                // Gone: the exit has been delivered (and the container removed).
                _ => None,
            };
            if let Some(code) = code {
                let status = ExitStatus {
                    code: i32::try_from(code).ok(),
                };
                self.inner.resolve(backend, &container, status);
            }
        }
        // An error means the entry was dropped without delivering, which only dropping the
        // runtime does; either way there is nothing left to wait for.
        let _ = exited.wait_for(Option::is_some).await;
        Ok(())
    }

    /// The running containers of this drone from any agent run, now watched by this runtime;
    /// exited ones are removed.
    async fn adopt(&self) -> Result<Vec<Started>, RuntimeError> {
        let docker = self.inner.docker().await?;
        let listed = docker
            .list_containers(Some(self.inner.drone_containers()))
            .await
            .map_err(|source| RuntimeError::ListContainers {
                drone: self.inner.config.drone.clone(),
                source,
            })?;
        let mut adopted = Vec::new();
        for summary in listed {
            let Some(container) = summary.id else {
                continue;
            };
            let backend = summary
                .labels
                .as_ref()
                .and_then(|labels| labels.get(LABEL_BACKEND_ID))
                .and_then(|id| BackendId::parse(id).ok());
            let running = matches!(
                summary.state,
                Some(
                    ContainerSummaryStateEnum::RUNNING
                        | ContainerSummaryStateEnum::PAUSED
                        | ContainerSummaryStateEnum::RESTARTING
                )
            );
            let Some(backend) = backend.clone().filter(|_| running) else {
                tracing::info!(container = short(&container), state = ?summary.state, "removing a container left by an earlier agent run");
                if let Some(backend) = &backend {
                    self.inner.archive(docker, backend, &container).await;
                }
                if let Err(error) = remove_container(docker, &container).await {
                    tracing::warn!(container = short(&container), %error, "cannot remove a leftover container");
                }
                continue;
            };
            if lock(&self.inner.tracked).contains_key(&backend) {
                // Started by this runtime: already watched and known to the agent.
                continue;
            }
            let info = match docker.inspect_container(&container, None).await {
                Ok(info) => info,
                // Exited and removed in the meantime: nothing to adopt.
                Err(error) if status_code(&error) == Some(404) => continue,
                Err(source) => return Err(RuntimeError::InspectContainer { backend, source }),
            };
            let Some(address) = address_of(&info, self.inner.config.advertise) else {
                tracing::warn!(%backend, container = short(&container), "cannot find the address of a running container; leaving it to the scheduler");
                continue;
            };
            let Some(exit) = self.inner.track(&backend, &container) else {
                continue;
            };
            tracing::info!(%backend, container = short(&container), %address, "re-adopted backend container");
            adopted.push(Started {
                backend,
                address,
                exit,
            });
        }
        // An adopted container that exited between the listing and being watched sent its
        // `die` event to nobody: look once more.
        if !adopted.is_empty()
            && let Err(error) = self.inner.reconcile(docker).await
        {
            tracing::warn!(%error, "cannot reconcile adopted containers; the periodic pass will");
        }
        Ok(adopted)
    }

    async fn health(&self) -> Result<(), String> {
        let ping = async {
            let docker = self.inner.docker().await?;
            docker
                .ping()
                .await
                .map_err(|source| RuntimeError::DockerUnreachable {
                    host: self.inner.host.clone(),
                    source,
                })
        };
        match tokio::time::timeout(HEALTH_TIMEOUT, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!(
                "docker daemon unreachable at {}: no answer within {HEALTH_TIMEOUT:?}: start dockerd or fix --docker-host",
                self.inner.host
            )),
        }
    }

    /// A running (or stopped, not yet removed) container's logs from the engine; an ended
    /// one's from its archive.
    async fn logs(
        &self,
        request: &LogsRequest,
        out: LogSink,
        cancel: CancellationToken,
    ) -> Result<(), LogsError> {
        let Some(files) = self.inner.config.logs.clone() else {
            return Err(LogsError::NotKept { runtime: "docker" });
        };
        let backend = &request.backend;
        let archived = || files.read(backend, request.tail, request.follow, &out, &cancel);
        let docker = match self.inner.docker().await {
            Ok(docker) => docker,
            // Ended backends' logs do not need the engine.
            Err(_) if files.has(backend) => return archived().await,
            Err(error) => {
                return Err(LogsError::Unavailable {
                    backend: backend.clone(),
                    reason: error.to_string(),
                });
            }
        };
        let name = container_name(backend);
        match docker.inspect_container(&name, None).await {
            Ok(_) => {}
            Err(error) if status_code(&error) == Some(404) => return archived().await,
            Err(source) => {
                return Err(LogsError::Docker {
                    backend: backend.clone(),
                    source,
                });
            }
        }
        let tail = request
            .tail
            .map_or_else(|| "all".to_string(), |n| n.to_string());
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .follow(request.follow)
            .tail(&tail)
            .build();
        let mut logs = docker.logs(&name, Some(options));
        // The container exists: the request is accepted.
        if out.send(String::new()).await.is_err() {
            return Ok(());
        }
        let mut chunker = Chunker::default();
        let mut sent = false;
        loop {
            let item = tokio::select! {
                () = cancel.cancelled() => break,
                item = logs.next() => item,
            };
            match item {
                None => break,
                Some(Ok(output)) => {
                    for chunk in chunker.push(&output.into_bytes()) {
                        sent = true;
                        if out.send(chunk).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                // Removed since the inspect, archived before that.
                Some(Err(error)) if status_code(&error) == Some(404) && !sent => {
                    return archived().await;
                }
                Some(Err(source)) => {
                    return Err(LogsError::Docker {
                        backend: backend.clone(),
                        source,
                    });
                }
            }
        }
        if let Some(rest) = chunker.finish() {
            let _ = out.send(rest).await;
        }
        Ok(())
    }

    async fn usage(&self) -> Vec<hangar_core::drone::BackendUsage> {
        /// One-shot stats calls in flight at once: each is a short engine round trip.
        const CONCURRENT_STATS: usize = 8;
        futures_util::stream::iter(self.running())
            .map(|backend| async move {
                match self.stats(&backend).await {
                    Ok(s) => Some(hangar_core::drone::BackendUsage {
                        backend,
                        cpu_seconds_total: s.cpu_seconds_total,
                        memory_bytes: s.memory_bytes,
                    }),
                    Err(error) => {
                        tracing::debug!(%backend, %error, "cannot read backend usage");
                        None
                    }
                }
            })
            .buffer_unordered(CONCURRENT_STATS)
            .filter_map(std::future::ready)
            .collect()
            .await
    }
}

/// Connects to the engine at `host` (`unix://` or `tcp://`) and settles on an API version
/// both sides speak: bollard's newest, or the engine's if that is older. (bollard's own
/// `negotiate_version` cannot step down: an older engine refuses the request it negotiates
/// with, naming its newest version in the refusal, which is what this reads.)
pub async fn engine_client(host: &str) -> Result<Docker, DockerError> {
    let docker = client_for(host, API_DEFAULT_VERSION)?;
    let engine = match docker.version().await {
        Ok(version) => version.api_version.as_deref().and_then(parse_api_version),
        Err(DockerError::DockerResponseServerError {
            status_code: 400,
            message,
        }) => match message
            .rsplit_once("API version is ")
            .and_then(|(_, version)| parse_api_version(version))
        {
            Some(version) => return client_for(host, &version),
            None => {
                return Err(DockerError::DockerResponseServerError {
                    status_code: 400,
                    message,
                });
            }
        },
        Err(error) => return Err(error),
    };
    match engine {
        Some(version) if version < *API_DEFAULT_VERSION => client_for(host, &version),
        _ => Ok(docker),
    }
}

fn client_for(host: &str, version: &ClientVersion) -> Result<Docker, DockerError> {
    if host.starts_with("unix://") {
        Docker::connect_with_unix(host, REQUEST_TIMEOUT_SECS, version)
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(host, REQUEST_TIMEOUT_SECS, version)
    } else {
        Err(DockerError::UnsupportedURISchemeError {
            uri: host.to_string(),
        })
    }
}

fn is_supported_host(host: &str) -> bool {
    ["unix://", "tcp://", "http://"]
        .iter()
        .any(|scheme| host.len() > scheme.len() && host.starts_with(scheme))
}

/// `"1.41"` (possibly followed by other text) → 1.41.
fn parse_api_version(text: &str) -> Option<ClientVersion> {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (major, minor) = text[..end].trim_end_matches('.').split_once('.')?;
    Some(ClientVersion {
        major_version: major.parse().ok()?,
        minor_version: minor.parse().ok()?,
    })
}

/// The HTTP status of an engine error, if it is one.
fn status_code(error: &DockerError) -> Option<u16> {
    match error {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Removes a container (killing it if it still runs) with its anonymous volumes; a container
/// that is gone or already being removed counts as removed.
async fn remove_container(docker: &Docker, container: &str) -> Result<(), DockerError> {
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(container, Some(options)).await {
        Err(error) if !matches!(status_code(&error), Some(404 | 409)) => Err(error),
        _ => Ok(()),
    }
}

/// The last lines of a container's output, for an error message. The engine's log driver
/// writes asynchronously, so a container that just died may not have its output on record
/// yet: an empty read is retried a few times.
async fn output_tail(docker: &Docker, container: &str) -> String {
    for _ in 0..OUTPUT_RETRIES {
        let out = output_tail_once(docker, container).await;
        if !out.is_empty() {
            return out;
        }
        tokio::time::sleep(OUTPUT_RETRY_DELAY).await;
    }
    output_tail_once(docker, container).await
}

/// How often, and how far apart, an empty log read is retried.
const OUTPUT_RETRIES: usize = 10;
const OUTPUT_RETRY_DELAY: Duration = Duration::from_millis(20);

async fn output_tail_once(docker: &Docker, container: &str) -> String {
    let options = LogsOptionsBuilder::new()
        .stdout(true)
        .stderr(true)
        .tail(OUTPUT_TAIL_LINES)
        .build();
    let mut output = Vec::new();
    let collect = async {
        let mut logs = docker.logs(container, Some(options));
        while let Some(Ok(chunk)) = logs.next().await {
            output.extend_from_slice(chunk.as_ref());
        }
    };
    let _ = tokio::time::timeout(OUTPUT_TIMEOUT, collect).await;
    let start = output.len().saturating_sub(OUTPUT_TAIL_BYTES);
    String::from_utf8_lossy(&output[start..]).trim().to_string()
}

/// The engine's log driver for backend containers: `local`, in two files of half of
/// `max_bytes` each (the same bound as the drone's own files).
fn engine_log_config(max_bytes: u64) -> HostConfigLogConfig {
    HostConfigLogConfig {
        typ: Some("local".to_string()),
        config: Some(HashMap::from([
            ("max-size".to_string(), (max_bytes / 2).max(1).to_string()),
            ("max-file".to_string(), "2".to_string()),
        ])),
    }
}

fn container_name(backend: &BackendId) -> String {
    format!("hangar-{backend}")
}

fn is_running(info: &ContainerInspectResponse) -> bool {
    info.state.as_ref().is_some_and(|state| {
        state.running == Some(true)
            || matches!(
                state.status,
                Some(ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::PAUSED)
            )
    })
}

fn exit_code(info: &ContainerInspectResponse) -> Option<i32> {
    info.state
        .as_ref()
        .and_then(|state| state.exit_code)
        .and_then(|code| i32::try_from(code).ok())
}

/// Where a running container's backend listens, from its labels (port, networking) and, for
/// bridge networking, the host port the engine published.
fn address_of(info: &ContainerInspectResponse, advertise: IpAddr) -> Option<SocketAddr> {
    let labels = info.config.as_ref()?.labels.as_ref()?;
    let port: u16 = labels.get(LABEL_PORT)?.parse().ok()?;
    if labels.get(LABEL_NETWORK).map(String::as_str) == Some("host") {
        return Some(SocketAddr::new(advertise, port));
    }
    let ports = info.network_settings.as_ref()?.ports.as_ref()?;
    let bindings = ports.get(&format!("{port}/tcp"))?.as_ref()?;
    let host_port = bindings
        .iter()
        .find_map(|binding| binding.host_port.as_deref()?.parse::<u16>().ok())?;
    Some(SocketAddr::new(advertise, host_port))
}

/// Finds a free port on `host` for a host-networked backend by binding port 0 and releasing
/// it. Another process could take it in between; the backend then fails to bind and exits,
/// which is reported like any other early exit.
fn allocate_port(host: IpAddr) -> io::Result<u16> {
    let listener = TcpListener::bind((host, 0))?;
    Ok(listener.local_addr()?.port())
}

/// A time as the engine's `since` parameter wants it: `seconds.nanoseconds` since the epoch.
fn unix_time(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    format!(
        "{}.{:09}",
        since_epoch.as_secs(),
        since_epoch.subsec_nanos()
    )
}

/// A container id as `docker ps` shows it.
fn short(container: &str) -> &str {
    &container[..container.len().min(12)]
}

/// Locks a mutex, recovering from poisoning: the map stays consistent because no code path
/// panics while holding the lock.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
#[path = "docker_tests.rs"]
mod tests;
