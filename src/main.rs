//! `hangar`: one binary for every role. Parses the command line, hands each role's flags to
//! its builder (`role`: validate, bind, run) with the shutdown signal, and turns the outcome
//! into an exit code.

mod alloc;
mod cli;
mod client;
mod config_file;
mod demo_backend;
mod host;
mod metrics;
mod role;
mod state;
mod tls;

use std::process::ExitCode;

use clap::Parser;

/// Exit code for bad configuration or usage (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// An error that should exit with [`EXIT_CONFIG`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn main() -> ExitCode {
    alloc::tune();
    let args = match config_file::expand(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let cli = cli::Cli::parse_from(args);
    init_tracing(&cli);
    // On one core (a CPU set or quota of one) the runtime is a current-thread one: with no
    // other worker to hand tasks to, the multi-thread scheduler's bookkeeping buys nothing,
    // and it costs the proxy about 2% of its instructions per request (`benches/callgrind.py`).
    // tokio's own `TOKIO_WORKER_THREADS`, when set, asks for the multi-thread one.
    let one_core = std::env::var_os("TOKIO_WORKER_THREADS").is_none()
        && std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut runtime = if one_core {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn init_tracing(cli: &cli::Cli) {
    use tracing_subscriber::EnvFilter;
    let default = match &cli.command {
        // hickory logs every query at info; its warnings still show.
        cli::Command::Dev(_)
        | cli::Command::Serve(_)
        | cli::Command::Drone(_)
        | cli::Command::Proxy(_) => "info,hickory_server=warn",
        cli::Command::DemoBackend | cli::Command::FenceWatchdog(_) => "warn",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_env("HANGAR_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

async fn run(cli: cli::Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        cli::Command::Dev(args) => {
            let shutdown = shutdown_signal();
            let dev = role::dev::Config::from_args(args)?.build().await?;
            dev.run(shutdown).await?;
        }
        cli::Command::Serve(args) => {
            let shutdown = shutdown_signal();
            let serve = role::serve::Config::from_args(args)?.build().await?;
            serve.run(shutdown).await?;
        }
        cli::Command::Drone(args) => {
            let shutdown = shutdown_signal();
            let drone = role::drone::Config::from_args(args)?.build().await?;
            drone.run(shutdown).await?;
        }
        cli::Command::HollowDrones(args) => {
            role::hollow::run(args, shutdown_signal()).await?;
        }
        cli::Command::Proxy(args) => {
            let shutdown = shutdown_signal();
            let proxy = role::proxy::Config::from_args(args)?.build().await?;
            proxy.run(shutdown).await?;
        }
        cli::Command::DemoBackend => demo_backend::run().await?,
        cli::Command::FenceWatchdog(args) => {
            // Blocking by design: it must not depend on the async runtime it was started from.
            let mut killer = hangar_drone::watchdog::SystemKiller::new(args.docker_host);
            tokio::task::spawn_blocking(move || {
                hangar_drone::watchdog::run(std::io::BufReader::new(std::io::stdin()), &mut killer)
            })
            .await?;
        }
        cli::Command::Connect(args) => return client::connect(args).await,
        cli::Command::Ls(args) => return client::ls(args).await,
        cli::Command::Status(args) => return client::status(args).await,
        cli::Command::Logs(args) => return client::logs(args).await,
        cli::Command::Terminate(args) => return client::terminate(args).await,
        cli::Command::Drones(args) => return client::drones(args).await,
        cli::Command::Drain(args) => return client::drain(args).await,
        cli::Command::Undrain(args) => return client::undrain(args).await,
        cli::Command::Hot(args) => return client::hot(args).await,
        cli::Command::Cluster(args) => return client::cluster(args).await,
        cli::Command::Events(args) => return client::events(args).await,
        cli::Command::State(cli::StateCommand::Export(args)) => return state::export(args).await,
        cli::Command::State(cli::StateCommand::Import(args)) => return state::import(args).await,
        cli::Command::Revoke(args) => return client::revoke(args).await,
        cli::Command::Token(cmd) => return client::token(cmd).await,
        cli::Command::Completions { shell } => {
            let mut cmd = <cli::Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "hangar", &mut script);
            // A closed pipe (`| head`) is not an error worth a message.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            return Ok(ExitCode::SUCCESS);
        }
        cli::Command::Quota(cmd) => return client::quota(cmd).await,
        cli::Command::Pool(cmd) => return client::pool(cmd).await,
        cli::Command::Maintenance(cli::MaintenanceCommand::Start(args)) => {
            return client::maintenance_start(args).await;
        }
        cli::Command::Maintenance(cli::MaintenanceCommand::Status(args)) => {
            return client::maintenance_status(args).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT: the roles then shut down gracefully. The handlers are
/// registered when this is called (before the role binds anything), so a signal that arrives
/// while the role starts is not lost to the default action.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
