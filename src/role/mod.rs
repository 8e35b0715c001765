//! One builder per role, each readable top to bottom (like linkerd2-proxy's `app`):
//!
//! 1. `Config::from_args` turns the command line into a validated configuration. Nothing is
//!    bound yet, so bad configuration exits 64 before any port is taken.
//! 2. `Config::build` opens the store and binds every listener.
//! 3. `run(shutdown)` starts the servers and background loops, every one a task of one
//!    `TaskTracker`, reports the bound addresses, waits for `shutdown` (or a server that stops
//!    on its own), and stops everything in order.
//!
//! [`dev`] and [`serve`] share the control plane ([`plane`]: store, scheduler, API, proxy,
//! DNS, metrics; [`dns`] and [`token_key`] validate their flags); [`dev`] adds an embedded
//! drone. [`drone`] is the agent on a compute host, [`proxy`] a data-plane proxy following a
//! scheduler's route feed. [`wires`] holds the servers' tasks and the small loops that connect
//! the libraries inside one process.

pub mod dev;
mod dns;
pub mod drone;
pub mod hollow;
mod instance;
mod plane;
pub mod proxy;
pub mod serve;
mod token_key;
mod wires;

use tokio::task::JoinHandle;

/// Waits for the task of a server that should run until shutdown, and says how it ended: an
/// error, since it ended before shutdown.
async fn stopped<E>(what: &str, task: JoinHandle<Result<(), E>>) -> anyhow::Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    match task.await {
        Ok(Ok(())) => anyhow::anyhow!("the {what} stopped unexpectedly"),
        Ok(Err(e)) => anyhow::Error::new(e).context(format!("the {what} failed")),
        Err(e) => anyhow::anyhow!("the {what} panicked: {e}"),
    }
}
