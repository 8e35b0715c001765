//! The scheduler's configuration: plain data; the binary builds and validates it.

use std::time::Duration;

use crate::records::ResolvedSpawn;

/// What a backend reserves on its drone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

/// What a connect without `spawn` runs, and limits applied when a spawn leaves them out.
#[derive(Clone, Debug, Default)]
pub struct SpawnDefaults {
    /// The command the process runtime runs (in dev: `hangar demo-backend`).
    pub command: Option<Vec<String>>,
    /// The image the Docker runtime runs.
    pub image: Option<String>,
    pub idle_timeout_s: Option<u64>,
    pub lifetime_s: Option<u64>,
}

/// Scheduler configuration.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// The cluster domain (`<backend>.<domain>`).
    pub domain: String,
    /// The proxy's public URL scheme and port, for the URLs handed to clients
    /// (`http://<backend>.<domain>:<port>/`). `None` port means the scheme's default.
    pub proxy_scheme: String,
    pub proxy_port: Option<u16>,
    /// The API's own base URL (`http://127.0.0.1:7070`), for `status_url`.
    pub api_base_url: String,
    pub defaults: SpawnDefaults,
    /// How long issued tokens are valid.
    pub token_ttl: Duration,
    /// How long a backend may take from spawn to ready before it is stopped.
    pub startup_timeout: Duration,
    /// How often the reconciler compares desired and observed state.
    pub reconcile_interval: Duration,
    /// Records of terminated backends are removed after this (their route answers 410 until
    /// then, and 404 after).
    pub terminated_retention: Duration,
    /// How long a backend may stay terminating before the stop is repeated as a kill.
    pub terminate_timeout: Duration,
    /// How long a connect waits for the key's previous backend to be confirmed gone (it is
    /// terminating and its process may still run) before answering 409 with `Retry-After`.
    pub predecessor_wait: Duration,
    /// What a backend reserves on its drone when its spawn gives no resources.
    pub default_reservation: Need,
    /// A drone whose session lease is not renewed for this long is lost.
    pub lease_ttl: Duration,
    /// The leader's lease: a leader that cannot renew it for this long steps down, and
    /// another instance may lead.
    pub leader_ttl: Duration,
    /// This instance's id in leader election (stable across restarts on one data directory,
    /// so that a restarted instance takes its own leader key back at once).
    pub instance_id: String,
    /// The shared secret drones present; `None` refuses every network drone.
    pub drone_secret: Option<String>,
    /// Whether the API needs tokens (`serve`, and `dev` off loopback); without, it is open
    /// to anyone who reaches it (`dev` on loopback), except the drone and proxy endpoints.
    pub api_tokens: bool,
    /// The TLS client settings (trusted roots) for reaching other instances' `https://` APIs.
    pub tls_client: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The hot-shard detector's thresholds.
    pub hot: crate::hot::HotConfig,
    /// Relocate idle neighbours of hot backends (`--relieve-hot`); `None`: never.
    pub relieve: Option<crate::hot::ReliefConfig>,
    /// How often the monitor evaluates the detector and publishes drone and backend gauges.
    pub monitor_interval: Duration,
    /// How often the pool converger runs when no event wakes it sooner.
    pub pool_interval: Duration,
    /// Whether the leader runs the pool converger (tests turn it off to run passes by hand).
    pub run_pool_converger: bool,
}

impl SchedulerConfig {
    pub fn new(domain: impl Into<String>, api_base_url: impl Into<String>) -> Self {
        SchedulerConfig {
            domain: domain.into(),
            proxy_scheme: "http".into(),
            proxy_port: None,
            api_base_url: api_base_url.into(),
            defaults: SpawnDefaults {
                idle_timeout_s: Some(300),
                ..SpawnDefaults::default()
            },
            token_ttl: Duration::from_secs(24 * 3600),
            startup_timeout: Duration::from_secs(60),
            reconcile_interval: Duration::from_millis(500),
            terminated_retention: Duration::from_secs(24 * 3600),
            terminate_timeout: Duration::from_secs(30),
            predecessor_wait: Duration::from_secs(10),
            default_reservation: Need {
                cpu_millis: 100,
                memory_mb: 128,
            },
            lease_ttl: Duration::from_secs(10),
            leader_ttl: Duration::from_secs(10),
            instance_id: format!("i-{}", hangar_core::BackendId::generate()),
            drone_secret: None,
            api_tokens: false,
            tls_client: None,
            hot: crate::hot::HotConfig::default(),
            relieve: None,
            monitor_interval: Duration::from_secs(1),
            pool_interval: Duration::from_secs(1),
            run_pool_converger: true,
        }
    }

    /// What a backend runs: `spec` with the cluster's defaults filling its gaps (the default
    /// command or image when it names neither).
    pub fn resolve_spawn(&self, spec: hangar_core::api::SpawnSpec) -> ResolvedSpawn {
        let d = &self.defaults;
        let (command, image) = match (spec.command, spec.image) {
            (None, None) => (d.command.clone(), d.image.clone()),
            (c, i) => (c, i),
        };
        ResolvedSpawn {
            command,
            image,
            env: spec.env,
            idle_timeout_s: spec.idle_timeout_s.or(d.idle_timeout_s),
            lifetime_s: spec.lifetime_s.or(d.lifetime_s),
            resources: spec.resources.unwrap_or_default(),
            pool: spec.pool.unwrap_or_else(crate::records::default_pool),
        }
    }

    /// What a spawn reserves on its drone: its resources, or the configured default.
    pub fn need(&self, spawn: &ResolvedSpawn) -> Need {
        Need {
            cpu_millis: spawn
                .resources
                .cpu_millis
                .unwrap_or(self.default_reservation.cpu_millis),
            memory_mb: spawn
                .resources
                .memory_mb
                .unwrap_or(self.default_reservation.memory_mb),
        }
    }

    /// The URL clients use to reach `backend` through the proxy.
    pub fn backend_url(&self, backend: &str) -> String {
        match self.proxy_port {
            Some(p) => format!("{}://{backend}.{}:{p}/", self.proxy_scheme, self.domain),
            None => format!("{}://{backend}.{}/", self.proxy_scheme, self.domain),
        }
    }
}
