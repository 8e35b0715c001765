//! `hangar dev`: the control plane ([`super::plane`]) and an embedded drone in one process on
//! loopback. The drone's process runtime runs the built-in demo backend unless a connect says
//! otherwise, and talks to the scheduler over in-process channels.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hangar_core::drone::{Capacity, DroneMessage, Hello, SchedulerMessage};
use hangar_drone::agent::{Agent, AgentConfig};
use hangar_drone::logs::{LogConfig, LogFiles};
use hangar_drone::policy::SpawnPolicy;
use hangar_drone::runtime::process::{ProcessRuntime, ProcessRuntimeConfig};
use hangar_drone::usage::UsageCollector;
use hangar_scheduler::Scheduler;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::plane::{self, Drones, Plane};
use crate::cli::DevArgs;

/// The embedded drone's name.
const LOCAL_DRONE: &str = "local";

/// Validated `hangar dev` configuration; nothing bound yet.
pub struct Config {
    plane: plane::Config,
    /// `hangar demo-backend`, the embedded drone's default command.
    demo_command: Vec<String>,
    /// How often the embedded drone reads its backends' CPU and memory use.
    usage_interval: Duration,
    /// What the embedded drone keeps of its backends' output (its directory is set once the
    /// data directory is known).
    logs: LogConfig,
}

impl Config {
    /// Validates the flags (creating the data directory and, on first use, the token key in
    /// it); binds nothing.
    pub fn from_args(args: DevArgs) -> anyhow::Result<Config> {
        let demo_command = demo_command()?;
        let usage_interval = args.usage_interval;
        let logs = args.logs.config(std::path::PathBuf::new(), LOCAL_DRONE)?;
        let plane = plane::Config::from_args(
            "dev",
            args,
            Drones::Embedded {
                default_command: demo_command.clone(),
            },
        )?;
        Ok(Config {
            plane,
            demo_command,
            usage_interval,
            logs,
        })
    }

    /// Opens the store, binds every listener and attaches the embedded drone.
    pub async fn build(self) -> anyhow::Result<Dev> {
        let plane = self.plane.build().await?;
        let drone = EmbeddedDrone::attach(
            plane.scheduler(),
            self.demo_command,
            plane.data_dir(),
            self.usage_interval,
            self.logs,
        )
        .await?;
        Ok(Dev { plane, drone })
    }
}

/// `hangar dev`, bound and ready to run.
pub struct Dev {
    plane: Plane,
    drone: EmbeddedDrone,
}

impl Dev {
    /// Runs until `shutdown` resolves (or a server fails), then stops the control plane before
    /// the drone.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        // The agent has a token of its own: it stops only once the scheduler has stopped.
        let agent_cancel = CancellationToken::new();
        let scheduler = self.plane.scheduler().clone();
        let servers = self.plane.spawn(&tasks, &cancel).await?;
        let agent = self.drone.spawn(&scheduler, &tasks, &cancel, &agent_cancel);
        tasks.close();
        servers.announce();

        let outcome = servers.until_stopped(shutdown).await;
        eprintln!("hangar dev: shutting down");
        // Stop serving and stop applying drone events first, so the backends the agent stops
        // below stay recorded as running: the next start closes them as lost, never as failed.
        cancel.cancel();
        scheduler.wait().await;
        agent_cancel.cancel();
        let _ = agent.await;
        tasks.wait().await;
        outcome
    }
}

/// The drone inside `hangar dev`: an agent on the process runtime, attached to the scheduler
/// over in-process channels.
struct EmbeddedDrone {
    agent: Agent,
    runtime: Arc<ProcessRuntime>,
    commands: mpsc::UnboundedReceiver<SchedulerMessage>,
    events: mpsc::Sender<DroneMessage>,
    usage_interval: Duration,
    /// Backend logs: their janitor runs with the drone.
    logs: Arc<LogFiles>,
}

impl EmbeddedDrone {
    /// Registers the drone with the scheduler (before it starts) under a new run id, so that
    /// records of a previous run are recognised as lost.
    async fn attach(
        scheduler: &Scheduler,
        demo_command: Vec<String>,
        data_dir: &Path,
        usage_interval: Duration,
        logs: LogConfig,
    ) -> anyhow::Result<EmbeddedDrone> {
        let (commands, events) = scheduler
            .attach_drone(Hello {
                drone: LOCAL_DRONE.into(),
                run_id: format!("run-{}", hangar_core::BackendId::generate()),
                // The dev drone does not limit reservations (the process runtime applies no
                // caps); only the number of backends is bounded.
                capacity: Capacity {
                    cpu_millis: u64::from(u32::MAX),
                    memory_mb: u64::from(u32::MAX),
                    max_backends: crate::host::DEFAULT_MAX_BACKENDS,
                },
                pool: "default".into(),
                runtime: "process".into(),
                inventory: Vec::new(),
                unhealthy: None,
                host: None,
            })
            .await
            .context("cannot register the embedded drone")?;
        let dir = data_dir.join("logs");
        std::fs::create_dir_all(&dir).context("cannot create the logs directory")?;
        let logs = Arc::new(LogFiles::new(LogConfig { dir, ..logs }));
        let allowed: Vec<String> = demo_command.first().cloned().into_iter().collect();
        let runtime = Arc::new(ProcessRuntime::new(ProcessRuntimeConfig {
            default_command: Some(demo_command),
            logs: Some(logs.clone()),
            ..ProcessRuntimeConfig::default()
        }));
        Ok(EmbeddedDrone {
            // The demo backend is what dev runs: the hangar executable, with any arguments.
            agent: Agent::new(
                runtime.clone(),
                AgentConfig {
                    spawn_policy: SpawnPolicy {
                        commands: allowed,
                        images: Vec::new(),
                    },
                    ..AgentConfig::default()
                },
            ),
            runtime,
            commands,
            events,
            usage_interval,
            logs,
        })
    }

    /// Starts reporting the backends' usage (until `cancel`) and the agent (until
    /// `agent_cancel`); returns the agent's task.
    fn spawn(
        self,
        scheduler: &Scheduler,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
        agent_cancel: &CancellationToken,
    ) -> JoinHandle<()> {
        tasks.spawn(self.logs.run_janitor(cancel.clone()));
        tasks.spawn(pump_usage(
            scheduler.clone(),
            self.runtime,
            self.usage_interval,
            cancel.clone(),
        ));
        // The scheduler queues commands without waiting; the agent reads a bounded channel,
        // as it does behind a network session.
        let (tx, rx) = mpsc::channel(1024);
        let mut commands = self.commands;
        tasks.spawn(async move {
            while let Some(m) = commands.recv().await {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
        });
        let agent_cancel = agent_cancel.clone();
        tasks.spawn(self.agent.run(rx, self.events, agent_cancel))
    }
}

/// Embedded drone → scheduler: the CPU and memory use of its backends, for metrics and the
/// hot-shard detector (network drones report theirs over their session).
async fn pump_usage(
    scheduler: Scheduler,
    runtime: Arc<ProcessRuntime>,
    interval: Duration,
    cancel: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel(1);
    let collect = UsageCollector::new(runtime, interval).run(tx, cancel);
    let report = async {
        while let Some(usage) = rx.recv().await {
            scheduler.report_usage(LOCAL_DRONE, &usage);
        }
    };
    tokio::join!(collect, report);
}

/// `hangar demo-backend`, run by this very executable.
fn demo_command() -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("cannot find the hangar executable")?;
    Ok(vec![
        exe.to_string_lossy().into_owned(),
        "demo-backend".to_string(),
    ])
}
