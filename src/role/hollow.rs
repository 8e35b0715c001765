//! `hangar hollow-drones`: many hollow drones in one process, for benchmarks and tests of the
//! control plane at scale. Each is a real drone session (hello, heartbeats, lease, events,
//! commands) with its own name and host id, on the hollow runtime
//! (`hangar_drone::runtime::hollow`): its backends run nothing and all answer at one shared
//! address. Never use them for real work: nothing they "run" exists.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hangar_core::drone::Capacity;
use hangar_drone::agent::AgentConfig;
use hangar_drone::runtime::hollow::{HollowRuntime, serve_hollow_backend};
use hangar_drone::session::{DroneSession, DroneSessionConfig, new_run_id};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ConfigError;
use crate::cli::HollowDronesArgs;

/// Runs the drones until `shutdown` resolves or every session failed for good.
pub async fn run(args: HollowDronesArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let Some(secret) = args.secret.filter(|s| !s.is_empty()) else {
        return Err(ConfigError(
            "give the scheduler's drone secret with --secret or HANGAR_DRONE_SECRET".into(),
        )
        .into());
    };
    if args.count == 0 || args.count > 10_000 {
        return Err(ConfigError("--count must lie between 1 and 10000".into()).into());
    }
    if hangar_core::ids::validate_label(&format!("{}-{}", args.name_prefix, args.count)).is_err() {
        return Err(ConfigError(format!(
            "--name-prefix {:?} must be lowercase letters, digits and '-'",
            args.name_prefix
        ))
        .into());
    }
    let tls = crate::tls::client_config(args.ca.as_deref())?;
    let backend = TcpListener::bind("127.0.0.1:0").await?;
    let address = backend.local_addr()?;
    let tasks = TaskTracker::new();
    let cancel = CancellationToken::new();
    tasks.spawn(serve_hollow_backend(backend, cancel.clone()));
    let mut sessions = tokio::task::JoinSet::new();
    for i in 0..args.count {
        let name = format!("{}-{i}", args.name_prefix);
        let session = DroneSession::new(
            DroneSessionConfig {
                scheduler_url: args.scheduler.clone(),
                name: name.clone(),
                secret: secret.clone(),
                pool: args.pool.clone(),
                capacity: Capacity {
                    cpu_millis: u64::from(u32::MAX),
                    memory_mb: u64::from(u32::MAX),
                    max_backends: args.max_backends,
                },
                agent: AgentConfig {
                    stop_backends_on_shutdown: false,
                    ..AgentConfig::default()
                },
                // Nothing to measure.
                usage_interval: Duration::from_secs(3600),
                host: Some(format!("{name}-host")),
                watchdog: None,
                tls: Some(tls.clone()),
            },
            Arc::new(HollowRuntime::new(address)),
            new_run_id(),
        );
        let cancel = cancel.clone();
        sessions.spawn(async move { (name, session.run(cancel).await) });
    }
    println!(
        "hangar hollow-drones: {} hollow drones ({}-0 …) serving scheduler {}; their backends answer at {address}",
        args.count, args.name_prefix, args.scheduler
    );
    let all_ended = async {
        let mut failures = Vec::new();
        while let Some(ended) = sessions.join_next().await {
            if let Ok((name, Err(e))) = ended {
                failures.push(format!("{name}: {e}"));
            }
        }
        failures
    };
    tokio::pin!(all_ended);
    let failures = tokio::select! {
        f = &mut all_ended => f,
        () = shutdown => {
            cancel.cancel();
            all_ended.await
        }
    };
    cancel.cancel();
    tasks.close();
    tasks.wait().await;
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("hollow drones stopped: {}", failures.join("; "))
    }
}
