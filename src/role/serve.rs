//! `hangar serve`: the control plane ([`super::plane`]) for drones on the network: no
//! embedded drone; `hangar drone` processes join with the drone secret.

use std::time::Duration;

use hangar_store::StoreLocation;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::plane::{self, Drones, Plane};
use crate::ConfigError;
use crate::cli::ServeArgs;

/// Validated `hangar serve` configuration; nothing bound yet.
pub struct Config {
    plane: plane::Config,
    /// Promised before a planned stop (`--maintenance-window`).
    maintenance_window: Option<Duration>,
}

impl Config {
    /// Validates the flags (creating the data directory and, on first use, the token key in
    /// it); binds nothing.
    pub fn from_args(args: ServeArgs) -> anyhow::Result<Config> {
        let store: StoreLocation = args
            .store
            .parse()
            .map_err(|e| ConfigError(format!("--store {:?}: {e}", args.store)))?;
        let secret = match args.drone_secret {
            Some(s) if s.len() >= 8 => s,
            Some(_) => {
                return Err(
                    ConfigError("--drone-secret must be at least 8 characters".into()).into(),
                );
            }
            None => {
                return Err(ConfigError(
                    "give a drone secret with --drone-secret or HANGAR_DRONE_SECRET: drones present it to join".into(),
                )
                .into());
            }
        };
        if args.lease_ttl == 0 {
            return Err(ConfigError("--lease-ttl must be at least 1 second".into()).into());
        }
        if args.leader_ttl == 0 {
            return Err(ConfigError("--leader-ttl must be at least 1 second".into()).into());
        }
        let drones = Drones::Network {
            secret,
            lease_ttl: Duration::from_secs(args.lease_ttl),
            leader_ttl: Duration::from_secs(args.leader_ttl),
        };
        if let Some(w) = args.maintenance_window
            && (w < Duration::from_secs(1) || w > Duration::from_secs(7 * 24 * 3600))
        {
            return Err(
                ConfigError("--maintenance-window must lie between 1s and 7 days".into()).into(),
            );
        }
        Ok(Config {
            plane: plane::Config::from_args("serve", args.plane, drones)?.with_store(store),
            maintenance_window: args.maintenance_window,
        })
    }

    /// Opens the store and binds every listener.
    pub async fn build(self) -> anyhow::Result<Serve> {
        Ok(Serve {
            plane: self.plane.build().await?,
            maintenance_window: self.maintenance_window,
        })
    }
}

/// `hangar serve`, bound and ready to run.
pub struct Serve {
    plane: Plane,
    maintenance_window: Option<Duration>,
}

impl Serve {
    /// Runs until `shutdown` resolves (or a server fails), then stops everything.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let scheduler = self.plane.scheduler().clone();
        let servers = self.plane.spawn(&tasks, &cancel).await?;
        tasks.close();
        servers.announce();

        let outcome = servers.until_stopped(shutdown).await;
        if let Some(window) = self.maintenance_window {
            match scheduler.begin_maintenance(window).await {
                Ok(_) => eprintln!(
                    "hangar serve: maintenance window of {window:?} begins: start serve again within it and every session survives"
                ),
                Err(e) => eprintln!("hangar serve: cannot begin the maintenance window: {e}"),
            }
        }
        eprintln!("hangar serve: shutting down");
        cancel.cancel();
        scheduler.wait().await;
        tasks.wait().await;
        outcome
    }
}
