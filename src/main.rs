//! `hangar`: one binary for every role. Parses the command line, validates configuration
//! before binding anything, wires the libraries together and handles signals.

mod cli;
mod client;
mod demo_backend;
mod dev;
mod drone;
mod host;
mod metrics;
mod proxy_cmd;
mod tls;

use std::process::ExitCode;

use clap::Parser;

// The proxy allocates and frees buffers and header maps of several sizes on every request;
// mimalloc's size-class free lists serve them without glibc's chunk consolidation (about 2% of
// the proxy's CPU per request; see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for bad configuration or usage (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// An error that should exit with [`EXIT_CONFIG`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_tracing(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
        cli::Command::DemoBackend => "warn",
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
        cli::Command::Dev(args) => dev::run(args).await.map(|()| ExitCode::SUCCESS),
        cli::Command::DemoBackend => demo_backend::run().await.map(|()| ExitCode::SUCCESS),
        cli::Command::Connect(args) => client::connect(args).await,
        cli::Command::Ls(args) => client::ls(args).await,
        cli::Command::Status(args) => client::status(args).await,
        cli::Command::Terminate(args) => client::terminate(args).await,
        cli::Command::Serve(args) => dev::run_serve(args).await.map(|()| ExitCode::SUCCESS),
        cli::Command::Drone(args) => drone::run(args).await.map(|()| ExitCode::SUCCESS),
        cli::Command::Drones(args) => client::drones(args).await,
        cli::Command::Drain(args) => client::drain(args).await,
        cli::Command::Undrain(args) => client::undrain(args).await,
        cli::Command::Hot(args) => client::hot(args).await,
        cli::Command::Proxy(args) => proxy_cmd::run(args).await.map(|()| ExitCode::SUCCESS),
        cli::Command::Revoke(args) => client::revoke(args).await,
    }
}
