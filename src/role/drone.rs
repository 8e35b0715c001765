//! `hangar drone`: the agent on a compute host. Runs backends through a runtime (Docker or
//! local processes) for the scheduler it connects to, and serves its own metrics.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hangar_core::drone::Capacity;
use hangar_drone::agent::AgentConfig;
use hangar_drone::logs::{LogConfig, LogFiles};
use hangar_drone::policy::SpawnPolicy;
use hangar_drone::runtime::Runtime;
use hangar_drone::runtime::docker::{DockerNetwork, DockerRuntime, DockerRuntimeConfig};
use hangar_drone::runtime::process::{ProcessRuntime, ProcessRuntimeConfig};
use hangar_drone::session::{DroneSession, DroneSessionConfig, new_run_id};
use hangar_drone::watchdog::WatchdogConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::wires;
use crate::ConfigError;
use crate::cli::{DroneArgs, RuntimeKind};
use crate::metrics::{MetricsListener, MetricsSetup};

/// Validated `hangar drone` configuration; nothing bound yet.
pub struct Config {
    name: String,
    /// `--host-id`, or this host's machine id.
    host: Option<String>,
    /// Where proxies reach this drone's backends.
    advertise: IpAddr,
    secret: String,
    scheduler_url: String,
    pool: String,
    runtime: RuntimeKind,
    docker_host: Option<String>,
    host_network: bool,
    /// The fence watchdog's pid file lives here, and backend logs in its `logs` directory.
    data_dir: PathBuf,
    /// What is kept of backends' output, and for how long.
    logs: LogConfig,
    capacity: Capacity,
    agent: AgentConfig,
    usage_interval: Duration,
    /// `None` with `--metrics off`.
    metrics: Option<MetricsSetup>,
    /// Trusted roots for `https://` scheduler URLs (the system's and `--ca`).
    tls: std::sync::Arc<rustls::ClientConfig>,
}

impl Config {
    /// Validates the flags and creates the data directory; binds nothing.
    pub fn from_args(args: DroneArgs) -> anyhow::Result<Config> {
        if hangar_core::ids::validate_label(&args.name).is_err() {
            return Err(ConfigError(format!(
                "--name {:?} must be lowercase letters, digits and '-' (at most 63 characters)",
                args.name
            ))
            .into());
        }
        let secret = match args.secret.as_deref() {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => {
                return Err(ConfigError(
                    "give the scheduler's drone secret with --secret or HANGAR_DRONE_SECRET".into(),
                )
                .into());
            }
        };
        for url in args.scheduler.split(',').map(str::trim) {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(ConfigError(format!(
                    "--scheduler {url:?} must be the scheduler's API URL, e.g. http://127.0.0.1:7070 (several instances: comma-separated)"
                ))
                .into());
            }
        }
        if args.max_backends == 0 {
            return Err(ConfigError("--max-backends must be at least 1".into()).into());
        }
        let metrics =
            crate::metrics::validate(&args.metrics_args(), crate::metrics::DEFAULT_DRONE_ADDR)?;
        let logs = args.logs.config(args.data_dir.join("logs"), &args.name)?;
        std::fs::create_dir_all(args.data_dir.join("logs")).map_err(|e| {
            ConfigError(format!(
                "cannot create data directory {}: {e}",
                args.data_dir.display()
            ))
        })?;
        Ok(Config {
            capacity: Capacity {
                cpu_millis: args.cpu_millis.unwrap_or_else(crate::host::cpu_millis),
                memory_mb: args.memory_mb.unwrap_or_else(crate::host::memory_mb),
                max_backends: args.max_backends,
            },
            agent: AgentConfig {
                stop_grace: Duration::from_secs(args.stop_grace),
                // Backends outlive the agent: a restarted agent re-adopts them (Docker).
                // Process backends die with the agent regardless.
                stop_backends_on_shutdown: false,
                spawn_policy: SpawnPolicy {
                    commands: args.allow_commands.clone(),
                    images: args.allow_images.clone(),
                },
                ..AgentConfig::default()
            },
            host: args.host_id.clone().or_else(crate::host::host_id),
            advertise: match args.advertise_address {
                Some(ip) => ip,
                None => crate::host::route_to(args.scheduler.split(',').next().unwrap_or_default().trim()).unwrap_or_else(|why| {
                    tracing::warn!(%why, "cannot tell which address reaches the scheduler; advertising 127.0.0.1 (give --advertise-address for proxies on other hosts)");
                    IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
                }),
            },
            name: args.name,
            secret,
            scheduler_url: args.scheduler,
            pool: args.pool,
            runtime: args.runtime,
            docker_host: args.docker_host,
            host_network: args.host_network,
            data_dir: args.data_dir,
            logs,
            usage_interval: args.usage_interval,
            metrics,
            tls: crate::tls::client_config(args.ca.as_deref())?,
        })
    }

    /// Binds the metrics listener (installing the recorder before the runtime and the
    /// session record anything), sets up the runtime and the session.
    pub async fn build(self) -> anyhow::Result<Drone> {
        let metrics = crate::metrics::listen(self.metrics.as_ref(), "drone").await?;
        let run_id = new_run_id();
        let logs = Arc::new(LogFiles::new(self.logs.clone()));
        let runtime = self.runtime(&run_id, &logs)?;
        let watchdog = self.watchdog()?;
        let session = DroneSession::new(
            DroneSessionConfig {
                scheduler_url: self.scheduler_url.clone(),
                name: self.name.clone(),
                secret: self.secret,
                pool: self.pool,
                capacity: self.capacity,
                agent: self.agent,
                usage_interval: self.usage_interval,
                watchdog: Some(watchdog),
                host: self.host,
                tls: Some(self.tls.clone()),
            },
            runtime,
            run_id.clone(),
        );
        Ok(Drone {
            name: self.name,
            run_id,
            scheduler_url: self.scheduler_url,
            session,
            metrics,
            logs,
        })
    }

    /// The fence watchdog: this binary's `fence-watchdog`, its pid kept in the data directory
    /// so that the next agent run on this host takes over from it.
    fn watchdog(&self) -> anyhow::Result<WatchdogConfig> {
        let exe = std::env::current_exe().context("cannot find the hangar executable")?;
        let mut command = vec![exe.to_string_lossy().into_owned(), "fence-watchdog".into()];
        if let Some(host) = &self.docker_host {
            command.extend(["--docker-host".into(), host.clone()]);
        }
        Ok(WatchdogConfig {
            command,
            pid_file: self.data_dir.join("fence-watchdog.pid"),
        })
    }

    fn runtime(&self, run_id: &str, logs: &Arc<LogFiles>) -> anyhow::Result<Arc<dyn Runtime>> {
        Ok(match self.runtime {
            RuntimeKind::Process => {
                let exe = std::env::current_exe().context("cannot find the hangar executable")?;
                Arc::new(ProcessRuntime::new(ProcessRuntimeConfig {
                    default_command: Some(vec![
                        exe.to_string_lossy().into_owned(),
                        "demo-backend".into(),
                    ]),
                    logs: Some(logs.clone()),
                    bind_host: self.advertise,
                }))
            }
            RuntimeKind::Docker => {
                let mut cfg = DockerRuntimeConfig::new(&self.name, run_id);
                cfg.docker_host = self.docker_host.clone();
                cfg.advertise = self.advertise;
                cfg.logs = Some(logs.clone());
                if self.host_network {
                    cfg.network = DockerNetwork::Host;
                }
                // An unreachable daemon is not fatal: the drone reports itself unhealthy
                // (saying why) and takes no work until the daemon is back.
                Arc::new(
                    DockerRuntime::connect(cfg).map_err(|e| {
                        ConfigError(format!("cannot set up the docker runtime: {e}"))
                    })?,
                )
            }
        })
    }
}

/// `hangar drone`, set up and ready to run.
pub struct Drone {
    name: String,
    run_id: String,
    scheduler_url: String,
    session: DroneSession,
    metrics: Option<MetricsListener>,
    /// Backend logs: their janitor runs with the drone.
    logs: Arc<LogFiles>,
}

impl Drone {
    /// Serves the scheduler (reconnecting as needed) until `shutdown` resolves or the session
    /// fails for good.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        println!(
            "hangar drone: {} (run {}) serving scheduler {}",
            self.name, self.run_id, self.scheduler_url
        );
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        if let Some(metrics) = self.metrics {
            crate::metrics::announce("drone", metrics.addr());
            wires::serve_metrics(metrics, None, &tasks, &cancel);
        }
        tasks.spawn(self.logs.run_janitor(cancel.clone()));
        tasks.close();

        let session = self.session.run(cancel.clone());
        tokio::pin!(session);
        let result = tokio::select! {
            result = &mut session => result,
            () = shutdown => {
                cancel.cancel();
                session.await
            }
        };
        cancel.cancel();
        tasks.wait().await;
        result.map_err(|e| anyhow::anyhow!("{e}"))
    }
}
