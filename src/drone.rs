//! `hangar drone`: the agent on a compute host. Validates its configuration, sets up the
//! runtime (Docker or processes), connects to the scheduler and runs until a signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hangar_core::drone::Capacity;
use hangar_drone::agent::AgentConfig;
use hangar_drone::runtime::Runtime;
use hangar_drone::runtime::docker::{DockerNetwork, DockerRuntime, DockerRuntimeConfig};
use hangar_drone::runtime::process::{ProcessRuntime, ProcessRuntimeConfig};
use hangar_drone::session::{DroneSession, DroneSessionConfig, new_run_id};
use tokio_util::sync::CancellationToken;

use crate::ConfigError;
use crate::cli::{DroneArgs, RuntimeKind};

pub async fn run(args: DroneArgs) -> anyhow::Result<()> {
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
    if !args.scheduler.starts_with("http://") && !args.scheduler.starts_with("https://") {
        return Err(ConfigError(format!(
            "--scheduler {:?} must be the scheduler's API URL, e.g. http://127.0.0.1:7070",
            args.scheduler
        ))
        .into());
    }
    if args.max_backends == 0 {
        return Err(ConfigError("--max-backends must be at least 1".into()).into());
    }
    let metrics_setup =
        crate::metrics::validate(&args.metrics_args(), crate::metrics::DEFAULT_DRONE_ADDR)?;
    let metrics_listener = match &metrics_setup {
        Some(m) => crate::metrics::bind(m, "drone").await?,
        None => None,
    };
    // Installed before the runtime and the session start recording, and only with a
    // listener: an exporter nobody serves would only accumulate samples.
    let exporter = match (&metrics_listener, &metrics_setup) {
        (Some(_), Some(m)) => Some(crate::metrics::install(m.grace)?),
        _ => None,
    };
    std::fs::create_dir_all(args.data_dir.join("logs")).map_err(|e| {
        ConfigError(format!(
            "cannot create data directory {}: {e}",
            args.data_dir.display()
        ))
    })?;
    let run_id = new_run_id();
    let runtime: Arc<dyn Runtime> = match args.runtime {
        RuntimeKind::Process => {
            let exe = std::env::current_exe().context("cannot find the hangar executable")?;
            Arc::new(ProcessRuntime::new(ProcessRuntimeConfig {
                default_command: Some(vec![
                    exe.to_string_lossy().into_owned(),
                    "demo-backend".into(),
                ]),
                log_dir: Some(args.data_dir.join("logs")),
                ..ProcessRuntimeConfig::default()
            }))
        }
        RuntimeKind::Docker => {
            let mut cfg = DockerRuntimeConfig::new(&args.name, &run_id);
            cfg.docker_host = args.docker_host.clone();
            if args.host_network {
                cfg.network = DockerNetwork::Host;
            }
            // An unreachable daemon is not fatal: the drone reports itself unhealthy (saying
            // why) and takes no work until the daemon is back.
            Arc::new(
                DockerRuntime::connect(cfg)
                    .map_err(|e| ConfigError(format!("cannot set up the docker runtime: {e}")))?,
            )
        }
    };
    let capacity = Capacity {
        cpu_millis: args.cpu_millis.unwrap_or_else(crate::host::cpu_millis),
        memory_mb: args.memory_mb.unwrap_or_else(crate::host::memory_mb),
        max_backends: args.max_backends,
    };
    let agent = AgentConfig {
        stop_grace: Duration::from_secs(args.stop_grace),
        // Backends outlive the agent: a restarted agent re-adopts them (Docker). Process
        // backends die with the agent regardless.
        stop_backends_on_shutdown: false,
        ..AgentConfig::default()
    };
    let session = DroneSession::new(
        DroneSessionConfig {
            scheduler_url: args.scheduler.clone(),
            name: args.name.clone(),
            secret,
            pool: args.pool.clone(),
            capacity,
            agent,
            usage_interval: args.usage_interval,
        },
        runtime,
        run_id.clone(),
    );
    println!(
        "hangar drone: {} (run {run_id}) serving scheduler {}",
        args.name, args.scheduler
    );
    let cancel = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    if let (Some(listener), Some(exporter), Some(setup)) =
        (metrics_listener, exporter, &metrics_setup)
    {
        crate::metrics::announce("drone", listener.local_addr()?);
        let server = crate::metrics::MetricsServer::new(exporter, setup.grace);
        tasks.spawn(server.run(listener, cancel.clone()));
    }
    tasks.close();
    let c = cancel.clone();
    let signal = tokio::spawn(async move {
        crate::dev::shutdown_signal().await;
        c.cancel();
    });
    let result = session.run(cancel.clone()).await;
    signal.abort();
    cancel.cancel();
    tasks.wait().await;
    result.map_err(|e| anyhow::anyhow!("{e}"))
}
