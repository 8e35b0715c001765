//! The command line: roles (`dev`, `serve`, `drone`, `proxy`, `demo-backend`) and client verbs
//! against the API.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hangar_proxy::ProxyConfig;

use crate::ConfigError;
// Durations on the command line: `500ms`, `90`, `60s`, `5m`, `1h`.
use crate::client::{parse_duration, parse_duration_s, parse_env, parse_percent};

#[derive(Parser, Debug)]
#[command(
    name = "hangar",
    version,
    about = "Session backends on demand: one backend per document, room or user, behind a fast proxy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The Hangar API to talk to.
    #[arg(
        long = "api",
        env = "HANGAR_API",
        default_value = "http://127.0.0.1:7070"
    )]
    pub api_url: String,
    /// An API token (`hangar serve` writes the first admin token to <data-dir>/admin.token).
    #[arg(long = "api-token", env = "HANGAR_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// A PEM file of CA certificates to trust for an `https://` API, besides the system's
    /// (also HANGAR_CA).
    #[arg(long, env = "HANGAR_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run everything in one process on loopback: store, scheduler, proxy and a local drone
    /// running the built-in demo backend.
    Dev(DevArgs),
    /// The built-in demo backend (listens on $PORT); started by drones, not by hand.
    DemoBackend,
    /// The drone's fence watchdog (reads deadlines and targets on stdin); started by
    /// `hangar drone`, not by hand.
    #[command(hide = true)]
    FenceWatchdog(FenceWatchdogArgs),
    /// Get the backend for a key (started if needed) and print its URL and token.
    Connect(ConnectArgs),
    /// List backends.
    Ls(LsArgs),
    /// Show one backend.
    Status(IdArgs),
    /// Print a backend's output (stdout and stderr) from the drone that runs or ran it; with
    /// -f, go on printing new output until the backend ends (or Ctrl-C).
    Logs(LogsArgs),
    /// Stop a backend.
    Terminate(TerminateArgs),
    /// Run the control plane (scheduler, API, proxy) for network drones.
    Serve(ServeArgs),
    /// Run a drone: the agent that runs backends on this host for a scheduler.
    Drone(DroneArgs),
    /// For benchmarks and tests only: many drones in one process whose backends run nothing
    /// (they all answer 200 at one shared address), through real drone sessions.
    HollowDrones(HollowDronesArgs),
    /// List drones with their state, capacity, reservations and backends.
    Drones(ClientOnlyArgs),
    /// Stop placing on a drone; with --deadline, terminate what remains then.
    Drain(DrainArgs),
    /// Place on a drained drone again.
    Undrain(NameArgs),
    /// List hot backends and drones, with the figures and the reason.
    Hot(ClientOnlyArgs),
    /// The control-plane instances, the leader and its term, and the store's health.
    Cluster(ClientOnlyArgs),
    /// Follow the cluster's events: backend state changes, drones joining and leaving,
    /// drains.
    Events(ClientOnlyArgs),
    /// Export the store as JSON lines, or import such an export into an empty store.
    #[command(subcommand)]
    State(StateCommand),
    /// API tokens: create (shown once), list and revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Per-namespace quotas: live backends and connects a second (429 past them).
    #[command(subcommand)]
    Quota(QuotaCommand),
    /// Pools: a spawn template, warm backends kept ready for it, and rollouts of new
    /// generations of the template (canary, promote, rollback).
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Print a shell completion script (e.g. `hangar completions bash >
    /// /etc/bash_completion.d/hangar`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Maintenance windows: a promise that no drone is declared lost before the window ends,
    /// so that every session survives a stop of the whole control plane within it.
    #[command(subcommand)]
    Maintenance(MaintenanceCommand),
    /// Run a data-plane proxy that follows a scheduler's route feed.
    Proxy(ProxyArgs),
    /// Revoke a token, or every token of a user (or of anyone) for a backend.
    Revoke(RevokeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Read flags from this TOML file (keys are the flag names; flags given here win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The scheduler's API URL.
    #[arg(long)]
    pub scheduler: String,
    /// The scheduler's cluster secret (its --drone-secret; also HANGAR_DRONE_SECRET).
    #[arg(long, env = "HANGAR_DRONE_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Where the proxy listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub proxy: SocketAddr,
    /// The cluster domain (as given to the scheduler).
    #[arg(long, default_value = "hangar.localhost")]
    pub domain: String,
    /// The scheduler's token key, 64 hex characters (also HANGAR_TOKEN_KEY).
    #[arg(long, env = "HANGAR_TOKEN_KEY", hide_env_values = true)]
    pub token_key: Option<String>,
    /// This proxy's name in activity reports.
    #[arg(long, default_value = "proxy")]
    pub name: String,
    /// How long a request for a starting backend waits, in seconds.
    #[arg(long, default_value_t = 30)]
    pub start_wait: u64,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub tuning: ProxyTuningArgs,
    /// Where Prometheus scrapes this proxy's metrics (`GET /metrics`), or `off`.
    /// [default: 127.0.0.1:7073, skipped with a warning if that port is taken]
    #[arg(long, value_name = "ADDR|off")]
    pub metrics: Option<String>,
    /// Seconds a per-backend series is kept after its last update.
    #[arg(long, default_value_t = 300)]
    pub metrics_grace: u64,
    /// A bearer token scrapes must present (also HANGAR_METRICS_TOKEN).
    #[arg(long, env = "HANGAR_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Per-backend series only for the N backends with the most requests; the others are
    /// summed per pool (series labelled `pool` instead of `backend`). [default: every backend]
    #[arg(long, value_name = "N")]
    pub metrics_top_k: Option<usize>,
    /// A PEM file of CA certificates to trust for `https://` scheduler URLs, besides the
    /// system's.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

impl ProxyArgs {
    /// The metrics flags, shaped like the other roles'.
    pub fn metrics_args(&self) -> MetricsArgs {
        MetricsArgs {
            metrics: self.metrics.clone(),
            metrics_grace: self.metrics_grace,
            metrics_token: self.metrics_token.clone(),
            metrics_top_k: self.metrics_top_k,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct RevokeArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Revoke this one token.
    #[arg(long, conflicts_with = "backend")]
    pub token: Option<String>,
    /// Revoke tokens for this backend (all, or --user's).
    #[arg(long)]
    pub backend: Option<String>,
    /// With --backend: only this user's tokens.
    #[arg(long, requires = "backend")]
    pub user: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub plane: DevArgs,
    /// Where state lives: `embedded` (a file in --data-dir, one serve instance) or an etcd
    /// cluster shared by several instances, `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (keys
    /// are stored under PREFIX).
    #[arg(long, value_name = "embedded|etcd://...", default_value = "embedded")]
    pub store: String,
    /// The secret drones must present (also HANGAR_DRONE_SECRET).
    #[arg(long, env = "HANGAR_DRONE_SECRET", hide_env_values = true)]
    pub drone_secret: Option<String>,
    /// Seconds a drone's lease lasts without a heartbeat before the drone is lost.
    #[arg(long, default_value_t = 10)]
    pub lease_ttl: u64,
    /// Seconds the leader's lease lasts: a leader that cannot renew it for this long steps
    /// down and another instance may lead (failover takes about this long).
    #[arg(long, default_value_t = 10)]
    pub leader_ttl: u64,
    /// On SIGTERM or SIGINT, promise a maintenance window this long before stopping (e.g.
    /// `10m`): no drone is declared lost before it ends, and connected drones hold their
    /// fence until then, so every session survives a restart or upgrade within it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub maintenance_window: Option<std::time::Duration>,
}

#[derive(Args, Debug, Clone)]
pub struct HollowDronesArgs {
    /// The scheduler's API URL(s), comma-separated.
    #[arg(long)]
    pub scheduler: String,
    /// The scheduler's drone secret (also HANGAR_DRONE_SECRET).
    #[arg(long, env = "HANGAR_DRONE_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// How many drones.
    #[arg(long, default_value_t = 10)]
    pub count: usize,
    /// Drone names are <prefix>-0, <prefix>-1, ...
    #[arg(long, default_value = "hollow")]
    pub name_prefix: String,
    /// The pool the drones serve.
    #[arg(long, default_value = "default")]
    pub pool: String,
    /// Backends each drone takes at most.
    #[arg(long, default_value_t = 1000)]
    pub max_backends: u64,
    /// A PEM file of CA certificates to trust for `https://` scheduler URLs.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct DroneArgs {
    /// Read flags from this TOML file (keys are the flag names; flags given here win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The scheduler's API URL; for several control-plane instances, all of them,
    /// comma-separated (the drone moves to another when one goes).
    #[arg(long)]
    pub scheduler: String,
    /// This drone's name (lowercase letters, digits, '-').
    #[arg(long)]
    pub name: String,
    /// The scheduler's drone secret (also HANGAR_DRONE_SECRET).
    #[arg(long, env = "HANGAR_DRONE_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// How backends run: docker containers or local processes.
    #[arg(long, value_enum, default_value = "docker")]
    pub runtime: RuntimeKind,
    /// Where the drone keeps backend logs (in `logs/`, for either runtime) and its fence
    /// watchdog's pid file.
    #[arg(long, default_value = "./.hangar-drone")]
    pub data_dir: PathBuf,
    /// CPU millicores offered (default: 1000 per core).
    #[arg(long)]
    pub cpu_millis: Option<u64>,
    /// Memory offered in MB (default: the host's memory).
    #[arg(long)]
    pub memory_mb: Option<u64>,
    /// Backends run at most.
    #[arg(long, default_value_t = 1000)]
    pub max_backends: u64,
    /// The pool this drone serves.
    #[arg(long, default_value = "default")]
    pub pool: String,
    /// Docker endpoint (default: DOCKER_HOST or the local socket).
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Run containers with host networking instead of a published 127.0.0.1 port.
    #[arg(long)]
    pub host_network: bool,
    /// Seconds between SIGTERM and SIGKILL when stopping a backend.
    #[arg(long, default_value_t = 10)]
    pub stop_grace: u64,
    /// How often the backends' CPU and memory use is read and reported (e.g. 5s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub usage_interval: std::time::Duration,
    #[command(flatten)]
    pub logs: LogArgs,
    /// Where Prometheus scrapes this drone's own metrics (`GET /metrics`), or `off`.
    /// [default: 127.0.0.1:7072, skipped with a warning if that port is taken]
    #[arg(long, value_name = "ADDR|off")]
    pub metrics: Option<String>,
    /// Seconds a series is kept after its last update.
    #[arg(long, default_value_t = 300)]
    pub metrics_grace: u64,
    /// A bearer token scrapes must present (also HANGAR_METRICS_TOKEN).
    #[arg(long, env = "HANGAR_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// This host's identity: a drone name is held by one host at a time, and a new agent on
    /// the same host takes over its backends. [default: /etc/machine-id, else the hostname]
    #[arg(long)]
    pub host_id: Option<String>,
    /// The address proxies reach this drone's backends at: process backends listen on it,
    /// Docker publishes container ports on it. [default: the address this host uses to reach
    /// the scheduler]
    #[arg(long, value_name = "IP")]
    pub advertise_address: Option<IpAddr>,
    /// An executable a spawn may name as `spawn.command[0]` (process runtime; repeatable).
    /// Without any, the drone runs only its default backend.
    #[arg(long = "allow-command", value_name = "PATH")]
    pub allow_commands: Vec<String>,
    /// An image pattern a spawn's `spawn.image` may match, `*` for any run of characters
    /// (Docker runtime; repeatable, e.g. `registry.example/team/*`). Without any, the drone
    /// runs only its default image.
    #[arg(long = "allow-image", value_name = "PATTERN")]
    pub allow_images: Vec<String>,
    /// A PEM file of CA certificates to trust for `https://` scheduler URLs, besides the
    /// system's.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

impl DroneArgs {
    /// The metrics flags, shaped like the other roles'.
    pub fn metrics_args(&self) -> MetricsArgs {
        MetricsArgs {
            metrics: self.metrics.clone(),
            metrics_grace: self.metrics_grace,
            metrics_token: self.metrics_token.clone(),
            // A drone has no per-backend series.
            metrics_top_k: None,
        }
    }
}

/// The Prometheus admin listener.
#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Where Prometheus scrapes metrics (`GET /metrics`), or `off`.
    /// [default: 127.0.0.1:7071, skipped with a warning if that port is taken]
    #[arg(long, value_name = "ADDR|off")]
    pub metrics: Option<String>,
    /// Seconds a per-backend or per-drone series is kept after its last update: series of
    /// ended backends and departed drones leave the scrape after this.
    #[arg(long, default_value_t = 300)]
    pub metrics_grace: u64,
    /// A bearer token scrapes must present (`Authorization: Bearer <token>`; Prometheus's
    /// `authorization` setting); without it the listener answers anyone who reaches it.
    #[arg(long, env = "HANGAR_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Per-backend series only for the N backends with the most requests and every hot one;
    /// the others are summed per pool (series labelled `pool` instead of `backend`, `drone`
    /// and `pool`), which bounds the scrape for large fleets. [default: every backend]
    #[arg(long, value_name = "N")]
    pub metrics_top_k: Option<usize>,
}

/// What a drone keeps of its backends' output (in `<data-dir>/logs`), for `hangar logs`.
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// How long the logs of an ended backend are kept (e.g. 24h, 30m).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub log_retention: Duration,
    /// The most output kept per backend, in bytes (at least 4096): its log is rotated at half
    /// of this, so the newest half to all of it is kept.
    #[arg(long, value_name = "BYTES", default_value = "10485760")]
    pub log_max_bytes: u64,
}

impl LogArgs {
    /// The drone's log configuration, the flags checked.
    pub fn config(
        &self,
        dir: std::path::PathBuf,
        drone: &str,
    ) -> Result<hangar_drone::logs::LogConfig, ConfigError> {
        if self.log_max_bytes < hangar_drone::logs::MIN_MAX_BYTES {
            return Err(ConfigError(format!(
                "--log-max-bytes {} is too small: give at least {}",
                self.log_max_bytes,
                hangar_drone::logs::MIN_MAX_BYTES
            )));
        }
        if self.log_retention.is_zero() {
            return Err(ConfigError(
                "--log-retention must be longer than zero (e.g. 1h)".into(),
            ));
        }
        Ok(hangar_drone::logs::LogConfig {
            dir,
            drone: drone.to_string(),
            max_bytes: self.log_max_bytes,
            retention: self.log_retention,
        })
    }
}

/// The hot-shard detector and its remedy.
#[derive(Args, Debug, Clone)]
pub struct HotArgs {
    /// Window over which request and CPU rates are measured (e.g. 30s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub hot_window: std::time::Duration,
    /// How long a condition must hold before a backend or drone is flagged hot (and stop
    /// holding before the flag clears).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hot_sustain: std::time::Duration,
    /// A backend is hot when its request rate exceeds this multiple of the median rate of
    /// the other busy backends of its pool...
    #[arg(long, default_value_t = 5.0)]
    pub hot_rate_multiple: f64,
    /// ...and this many requests per second.
    #[arg(long, default_value_t = 1.0)]
    pub hot_min_rate: f64,
    /// A backend with a CPU cap (spawn.resources.cpu_millis) is hot when it uses more than
    /// this fraction of it.
    #[arg(long, default_value_t = 0.9)]
    pub hot_cpu_fraction: f64,
    /// A drone is hot when its backends use more than this fraction of its CPU...
    #[arg(long, default_value_t = 0.9)]
    pub hot_drone_cpu_fraction: f64,
    /// ...or more than this fraction of its CPU or memory is reserved.
    #[arg(long, default_value_t = 0.95)]
    pub hot_drone_reserved_fraction: f64,
    /// Stop idle backends that share a drone with a hot backend, so that their next connect
    /// lands on another drone (reason `relocated`).
    #[arg(long)]
    pub relieve_hot: bool,
    /// With --relieve-hot: only backends idle at least this long are moved.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub relieve_min_idle: std::time::Duration,
    /// With --relieve-hot: at most this many backends are moved per second.
    #[arg(long, default_value_t = 2)]
    pub relieve_max: usize,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    Docker,
    Process,
}

#[derive(Args, Debug, Clone)]
pub struct ClientOnlyArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args, Debug, Clone)]
pub struct NameArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub name: String,
}

#[derive(Args, Debug, Clone)]
pub struct DrainArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub name: String,
    /// Terminate backends still running after this long (e.g. 60s, 5m).
    #[arg(long)]
    pub deadline: Option<String>,
    /// Wait until the drone is drained, showing progress.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// Read flags from this TOML file (keys are the flag names; flags given here win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the API listens.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub api: SocketAddr,
    /// The API's URL as other hosts reach it (status URLs; where other instances forward
    /// writes when this instance leads). [default: http(s)://<the bound --api address>; give
    /// it when --api is a wildcard such as 0.0.0.0:7070]
    #[arg(long, value_name = "URL")]
    pub api_url: Option<String>,
    /// Serve the API over HTTPS with this PEM certificate chain (with --api-tls-key);
    /// reloaded on SIGHUP or when the file changes.
    #[arg(long, value_name = "FILE")]
    pub api_tls_cert: Option<PathBuf>,
    /// The PEM private key of --api-tls-cert.
    #[arg(long, value_name = "FILE")]
    pub api_tls_key: Option<PathBuf>,
    /// A PEM file of CA certificates to trust for other instances' `https://` APIs, besides
    /// the system's.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Where the proxy listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub proxy: SocketAddr,
    /// Where state (store, token key, backend logs) lives.
    #[arg(long, default_value = "./.hangar")]
    pub data_dir: PathBuf,
    /// The cluster domain: backends are reached at <id>.<domain>.
    #[arg(long, default_value = "hangar.localhost")]
    pub domain: String,
    /// Token signing key, 64 hex characters; generated once into the data directory if absent.
    #[arg(long, env = "HANGAR_TOKEN_KEY", hide_env_values = true)]
    pub token_key: Option<String>,
    /// Default idle timeout for backends, in seconds.
    #[arg(long, default_value_t = 300)]
    pub idle_timeout: u64,
    /// How long a request for a starting backend waits for it, in seconds.
    #[arg(long, default_value_t = 30)]
    pub start_wait: u64,
    /// How long a backend may take to become ready, in seconds.
    #[arg(long, default_value_t = 60)]
    pub startup_timeout: u64,
    /// Where the authoritative DNS server for the domain listens (UDP and TCP), or `off`.
    /// [default: 127.0.0.1:5353, skipped with a warning if that port is taken]
    #[arg(long, value_name = "ADDR|off")]
    pub dns: Option<String>,
    /// An address <id>.<domain> resolves to: where clients reach the proxy (repeat for
    /// several; IPv4 answers A queries, IPv6 AAAA). Default: the proxy's listen address.
    #[arg(long = "dns-proxy-address", value_name = "IP")]
    pub dns_proxy_address: Vec<IpAddr>,
    /// TTL of DNS answers (and of negative answers), in seconds.
    #[arg(long, default_value_t = 5)]
    pub dns_ttl: u32,
    /// Read and answer DNS queries over UDP in batches (recvmmsg/sendmmsg, Linux) rather than
    /// one system call each way per query: fewer calls, more kernel copying per query; off by
    /// default, as it cost more CPU per query where it was measured.
    #[arg(long)]
    pub dns_udp_batching: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub tuning: ProxyTuningArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub hot: HotArgs,
    /// How often the embedded drone reads its backends' CPU and memory use (dev).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub usage_interval: std::time::Duration,
    /// The embedded drone's backend logs (dev).
    #[command(flatten)]
    pub logs: LogArgs,
}

/// The proxy's timeouts and limits, shared by every role that runs a proxy (`dev`, `serve`,
/// `proxy`). The defaults are `ProxyConfig::new`'s (a test keeps them equal); `--start-wait`
/// stays with each role, in whole seconds, as it always was.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ProxyTuningArgs {
    /// A client that has started a request head and not finished it within this is cut off.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// A keep-alive client connection with no request in flight is closed after this long.
    #[arg(long, value_name = "DURATION", default_value = "75s", value_parser = parse_duration)]
    pub keep_alive_timeout: Duration,
    /// A client that sends no request body bytes for this long, mid-body, gets a 408.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub client_body_timeout: Duration,
    /// Connecting to a backend longer than this is a 502.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,
    /// A backend that has not sent response headers within this is a 504.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub upstream_response_timeout: Duration,
    /// A backend that sends no response body bytes for this long, mid-body, has its
    /// connection and the client's closed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub upstream_body_timeout: Duration,
    /// --upstream-body-timeout for server-sent events (content-type: text/event-stream).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub upstream_sse_timeout: Duration,
    /// An HTTP/1.1 client that accepts no response bytes for this long is disconnected (and
    /// its backend connection closed).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub client_write_timeout: Duration,
    /// An upgraded connection (WebSocket) with no bytes either way for this long is closed.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub upgrade_idle_timeout: Duration,
    /// A TLS handshake that takes longer than this is dropped.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// On shutdown, how long in-flight requests may finish before connections are dropped.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Largest request head (request line and headers) accepted, 1024 to 1048576 bytes;
    /// larger gets 431.
    #[arg(long, value_name = "BYTES", default_value = "65536")]
    pub max_header_bytes: usize,
    /// Largest request body accepted, in bytes (at least 1); a larger one gets 413.
    #[arg(long, value_name = "BYTES", default_value = "104857600")]
    pub max_body_bytes: u64,
    /// Client connections served at once; past this, new ones wait in the kernel's accept
    /// queue until one closes.
    #[arg(long, value_name = "N", default_value = "10000")]
    pub max_connections: usize,
    /// Idle keep-alive connections kept open to each backend (0 keeps none).
    #[arg(long, value_name = "N", default_value = "256")]
    pub upstream_idle_per_backend: usize,
}

/// Longest proxy timeout: a week is already no timeout in practice, and deadlines stay far
/// from the clock's range.
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Smallest `--max-header-bytes`: below this not even a modest request head fits.
const MIN_HEADER_BYTES: usize = 1024;
/// Largest `--max-header-bytes` (1 MiB): a request head beyond this is abuse, and each
/// connection may buffer this much.
const MAX_HEADER_BYTES: usize = 1024 * 1024;

impl ProxyTuningArgs {
    /// Checks the flags and writes them into `cfg`; an out-of-range value is a
    /// [`ConfigError`] naming the flag and the range allowed.
    pub fn apply(&self, cfg: &mut ProxyConfig) -> Result<(), ConfigError> {
        for (flag, value) in [
            ("--header-read-timeout", self.header_read_timeout),
            ("--keep-alive-timeout", self.keep_alive_timeout),
            ("--client-body-timeout", self.client_body_timeout),
            ("--upstream-connect-timeout", self.upstream_connect_timeout),
            (
                "--upstream-response-timeout",
                self.upstream_response_timeout,
            ),
            ("--upstream-body-timeout", self.upstream_body_timeout),
            ("--upstream-sse-timeout", self.upstream_sse_timeout),
            ("--client-write-timeout", self.client_write_timeout),
            ("--upgrade-idle-timeout", self.upgrade_idle_timeout),
            ("--tls-handshake-timeout", self.tls_handshake_timeout),
            ("--shutdown-grace", self.shutdown_grace),
        ] {
            if value.is_zero() || value > MAX_TIMEOUT {
                return Err(ConfigError(format!(
                    "{flag} {value:?} is out of range: allowed 1ms to 7 days (e.g. 500ms, 30s, 5m)"
                )));
            }
        }
        if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&self.max_header_bytes) {
            return Err(ConfigError(format!(
                "--max-header-bytes {} is out of range: allowed {MIN_HEADER_BYTES} to {MAX_HEADER_BYTES} (1 MiB)",
                self.max_header_bytes
            )));
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError(
                "--max-body-bytes must be at least 1 (the largest request body accepted, in bytes)"
                    .into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError(
                "--max-connections must be at least 1 (client connections served at once)".into(),
            ));
        }
        // The proxy counts connections with a semaphore, which cannot hold more permits.
        let most = tokio::sync::Semaphore::MAX_PERMITS;
        if self.max_connections > most {
            return Err(ConfigError(format!(
                "--max-connections {} is too large: allowed 1 to {most}",
                self.max_connections
            )));
        }
        cfg.header_read_timeout = self.header_read_timeout;
        cfg.keep_alive_timeout = self.keep_alive_timeout;
        cfg.client_body_timeout = self.client_body_timeout;
        cfg.upstream_connect_timeout = self.upstream_connect_timeout;
        cfg.upstream_response_timeout = self.upstream_response_timeout;
        cfg.upstream_body_timeout = self.upstream_body_timeout;
        cfg.upstream_sse_timeout = self.upstream_sse_timeout;
        cfg.client_write_timeout = self.client_write_timeout;
        cfg.upgrade_idle_timeout = self.upgrade_idle_timeout;
        cfg.tls_handshake_timeout = self.tls_handshake_timeout;
        cfg.shutdown_grace = self.shutdown_grace;
        cfg.max_header_bytes = self.max_header_bytes;
        cfg.max_body_bytes = self.max_body_bytes;
        cfg.max_connections = self.max_connections;
        cfg.upstream_idle_per_backend = self.upstream_idle_per_backend;
        Ok(())
    }
}

/// An HTTPS listener for the proxy (in addition to the plain one).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Where the proxy listens for HTTPS (HTTP/1.1 and HTTP/2 via ALPN); needs --tls-cert
    /// and --tls-key. Certificates reload on SIGHUP or when the files change.
    #[arg(long, value_name = "ADDR")]
    pub https: Option<SocketAddr>,
    /// PEM certificate chain (e.g. a wildcard certificate for *.<domain>).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The key (document, room, user) the backend belongs to.
    pub key: String,
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Run this command instead of the default backend (repeat for arguments, or give one
    /// string split on spaces).
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    pub command: Option<Vec<String>>,
    /// Run this container image (docker drones).
    #[arg(long)]
    pub image: Option<String>,
    /// Idle timeout in seconds.
    #[arg(long)]
    pub idle_timeout: Option<u64>,
    /// Lifetime limit in seconds.
    #[arg(long)]
    pub lifetime: Option<u64>,
    /// The user the token is issued to.
    #[arg(long)]
    pub user: Option<String>,
    /// No token needed to reach the backend.
    #[arg(long)]
    pub public: bool,
    /// Wait until the backend is ready, showing its progress.
    #[arg(long)]
    pub wait: bool,
    /// Take the backend from this pool: its template, and a warm backend when one is ready
    /// [default: the pool `default` when it exists]. --command and --image start a cold
    /// backend outside any pool instead.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["command", "image"])]
    pub pool: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct LsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only backends in this status (scheduled, starting, waiting, ready, terminating,
    /// terminated, live).
    #[arg(long)]
    pub status: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct IdArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub id: String,
}

#[derive(Args, Debug, Clone)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub id: String,
    /// Go on printing new output until the backend ends.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines (default: everything the drone kept).
    #[arg(long, value_name = "N")]
    pub tail: Option<u64>,
}

#[derive(Args, Debug, Clone)]
pub struct TerminateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub id: String,
    /// Kill at once instead of stopping gracefully.
    #[arg(long)]
    pub hard: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;
    use hangar_core::token::TokenKey;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("hangar").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// The tuning flags of every role that runs a proxy.
    fn tuning(args: &[&str]) -> ProxyTuningArgs {
        match parse(args).command {
            Command::Dev(a) => a.tuning,
            Command::Serve(a) => a.plane.tuning,
            Command::Proxy(a) => a.tuning,
            other => panic!("{other:?} has no proxy"),
        }
    }

    /// The fields the tuning flags set, for comparison (`ProxyConfig` has no `PartialEq`).
    fn tuned(c: &ProxyConfig) -> [Duration; 11] {
        [
            c.header_read_timeout,
            c.keep_alive_timeout,
            c.client_body_timeout,
            c.upstream_connect_timeout,
            c.upstream_response_timeout,
            c.tls_handshake_timeout,
            c.shutdown_grace,
            c.upstream_body_timeout,
            c.upstream_sse_timeout,
            c.client_write_timeout,
            c.upgrade_idle_timeout,
        ]
    }

    fn limits(c: &ProxyConfig) -> (usize, usize, usize, u64) {
        (
            c.max_header_bytes,
            c.max_connections,
            c.upstream_idle_per_backend,
            c.max_body_bytes,
        )
    }

    fn config() -> ProxyConfig {
        ProxyConfig::new("hangar.localhost", TokenKey::generate())
    }

    const ROLES: [&[&str]; 3] = [
        &["dev"],
        &["serve"],
        &["proxy", "--scheduler", "http://127.0.0.1:7070"],
    ];

    #[test]
    fn without_tuning_flags_every_role_gets_proxy_config_defaults() {
        let defaults = config();
        for role in ROLES {
            // Start from values no default has, so a field `apply` forgets shows up too.
            let mut cfg = config();
            cfg.header_read_timeout = Duration::from_millis(1);
            cfg.keep_alive_timeout = Duration::from_millis(1);
            cfg.client_body_timeout = Duration::from_millis(1);
            cfg.upstream_connect_timeout = Duration::from_millis(1);
            cfg.upstream_response_timeout = Duration::from_millis(1);
            cfg.tls_handshake_timeout = Duration::from_millis(1);
            cfg.shutdown_grace = Duration::from_millis(1);
            cfg.upstream_body_timeout = Duration::from_millis(1);
            cfg.upstream_sse_timeout = Duration::from_millis(1);
            cfg.client_write_timeout = Duration::from_millis(1);
            cfg.upgrade_idle_timeout = Duration::from_millis(1);
            cfg.max_header_bytes = 1;
            cfg.max_connections = 1;
            cfg.upstream_idle_per_backend = 1;
            cfg.max_body_bytes = 1;
            tuning(role).apply(&mut cfg).unwrap();
            assert_eq!(tuned(&cfg), tuned(&defaults), "{role:?}");
            assert_eq!(limits(&cfg), limits(&defaults), "{role:?}");
        }
        // --start-wait keeps its own flag (whole seconds) with the same default.
        let start_wait = defaults.start_wait.as_secs();
        match parse(ROLES[0]).command {
            Command::Dev(a) => assert_eq!(a.start_wait, start_wait),
            _ => unreachable!(),
        }
        match parse(ROLES[2]).command {
            Command::Proxy(a) => assert_eq!(a.start_wait, start_wait),
            _ => unreachable!(),
        }
    }

    #[test]
    fn tuning_flags_reach_the_proxy_config() {
        let flags = [
            "--header-read-timeout",
            "1500ms",
            "--keep-alive-timeout",
            "2m",
            "--client-body-timeout",
            "11s",
            "--upstream-connect-timeout",
            "3s",
            "--upstream-response-timeout",
            "1h",
            "--tls-handshake-timeout",
            "4s",
            "--shutdown-grace",
            "9s",
            "--upstream-body-timeout",
            "12s",
            "--upstream-sse-timeout",
            "2h",
            "--client-write-timeout",
            "13s",
            "--upgrade-idle-timeout",
            "5m",
            "--max-header-bytes",
            "1024",
            "--max-connections",
            "1",
            "--upstream-idle-per-backend",
            "0",
            "--max-body-bytes",
            "1",
        ];
        for role in ROLES {
            let args: Vec<&str> = role.iter().chain(&flags).copied().collect();
            let mut cfg = config();
            tuning(&args).apply(&mut cfg).unwrap();
            let s = Duration::from_secs;
            assert_eq!(
                tuned(&cfg),
                [
                    Duration::from_millis(1500),
                    s(120),
                    s(11),
                    s(3),
                    s(3600),
                    s(4),
                    s(9),
                    s(12),
                    s(7200),
                    s(13),
                    s(300)
                ],
                "{role:?}"
            );
            assert_eq!(limits(&cfg), (1024, 1, 0, 1), "{role:?}");
        }
        let mut cfg = config();
        tuning(&["dev", "--max-header-bytes", "1048576"])
            .apply(&mut cfg)
            .unwrap();
        assert_eq!(cfg.max_header_bytes, 1024 * 1024);
    }

    #[test]
    fn out_of_range_tuning_is_a_config_error_naming_the_flag_and_range() {
        let too_many = usize::MAX.to_string();
        let cases: &[(&str, &str, &str)] = &[
            ("--header-read-timeout", "0", "allowed 1ms to 7 days"),
            ("--keep-alive-timeout", "0s", "allowed 1ms to 7 days"),
            ("--upstream-connect-timeout", "0m", "allowed 1ms to 7 days"),
            (
                "--upstream-response-timeout",
                "0ms",
                "allowed 1ms to 7 days",
            ),
            ("--tls-handshake-timeout", "0", "allowed 1ms to 7 days"),
            ("--shutdown-grace", "169h", "allowed 1ms to 7 days"),
            (
                "--client-body-timeout",
                "99999999999s",
                "allowed 1ms to 7 days",
            ),
            ("--max-header-bytes", "1023", "allowed 1024 to 1048576"),
            ("--max-header-bytes", "1048577", "allowed 1024 to 1048576"),
            ("--max-connections", "0", "at least 1"),
            ("--max-connections", &too_many, "allowed 1 to"),
            ("--upstream-body-timeout", "0", "allowed 1ms to 7 days"),
            ("--upstream-sse-timeout", "8d", "allowed 1ms to 7 days"),
            ("--client-write-timeout", "0s", "allowed 1ms to 7 days"),
            ("--upgrade-idle-timeout", "0ms", "allowed 1ms to 7 days"),
            ("--max-body-bytes", "0", "at least 1"),
        ];
        for &(flag, value, range) in cases {
            for role in ROLES {
                let args: Vec<&str> = role.iter().chain(&[flag, value]).copied().collect();
                let mut cfg = config();
                let err = tuning(&args).apply(&mut cfg).unwrap_err().to_string();
                assert!(err.starts_with(flag), "{args:?}: {err}");
                assert!(err.contains(range), "{args:?}: {err}");
            }
        }
    }

    #[test]
    fn tuning_values_that_are_not_numbers_or_durations_are_usage_errors() {
        for args in [
            ["dev", "--max-connections", "many"],
            ["dev", "--max-header-bytes", "64k"],
            ["dev", "--shutdown-grace", "soon"],
            ["dev", "--keep-alive-timeout", "1.5s"],
            ["dev", "--keep-alive-timeout", "18446744073709551615h"],
        ] {
            let err = Cli::try_parse_from(std::iter::once("hangar").chain(args)).unwrap_err();
            assert!(err.to_string().contains(args[1]), "{args:?}: {err}");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    fn pool_create(args: &[&str]) -> PoolCreateArgs {
        let args: Vec<&str> = ["pool", "create"].iter().chain(args).copied().collect();
        match parse(&args).command {
            Command::Pool(PoolCommand::Create(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    fn pool_rollout(args: &[&str]) -> PoolRolloutArgs {
        let args: Vec<&str> = ["pool", "rollout"].iter().chain(args).copied().collect();
        match parse(&args).command {
            Command::Pool(PoolCommand::Rollout(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pool_create_takes_an_image_or_a_command_and_the_settings() {
        let a = pool_create(&[
            "rooms",
            "--warm",
            "5",
            "--max-live",
            "50",
            "--image",
            "ghcr.io/acme/room:1",
            "--env",
            "MODE=fast",
            "--env",
            "URL=http://x/?a=b",
            "--idle-timeout",
            "5m",
            "--lifetime",
            "12h",
            "--cpu-millis",
            "500",
            "--memory-mb",
            "256",
            "--max-add",
            "3",
            "--max-remove",
            "2",
            "--promote-after",
            "4",
            "--drone-pool",
            "gpu",
        ]);
        assert_eq!(a.name, "rooms");
        assert_eq!((a.warm, a.max_live), (Some(5), Some(50)));
        assert_eq!(a.image.as_deref(), Some("ghcr.io/acme/room:1"));
        assert_eq!(a.command, None);
        assert_eq!(
            a.env,
            [
                ("MODE".to_string(), "fast".to_string()),
                ("URL".to_string(), "http://x/?a=b".to_string())
            ]
        );
        assert_eq!((a.idle_timeout, a.lifetime), (Some(300), Some(43_200)));
        assert_eq!((a.cpu_millis, a.memory_mb), (Some(500), Some(256)));
        assert_eq!(
            (
                a.tuning.max_add,
                a.tuning.max_remove,
                a.tuning.promote_after
            ),
            (Some(3), Some(2), Some(4))
        );
        assert_eq!(a.drone_pool.as_deref(), Some("gpu"));

        // A command takes the rest of the line, flags of its own included.
        let a = pool_create(&[
            "workers",
            "--warm",
            "2",
            "--command",
            "/usr/bin/worker",
            "--port",
            "8080",
            "-v",
        ]);
        assert_eq!(a.warm, Some(2));
        assert_eq!(a.image, None);
        assert_eq!(
            a.command.unwrap(),
            ["/usr/bin/worker", "--port", "8080", "-v"]
        );

        for bad in [
            &["p", "--image", "x", "--command", "y"][..],
            &["p", "--env", "NOVALUE"],
            &["p", "--env", "=v"],
            &["p", "--idle-timeout", "soon"],
            &["p", "--warm", "-1"],
        ] {
            let args: Vec<&str> = ["hangar", "pool", "create"]
                .iter()
                .chain(bad)
                .copied()
                .collect();
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pool_rollout_takes_a_canary_in_percent() {
        for canary in ["20%", "20"] {
            let a = pool_rollout(&[
                "rooms",
                "--image",
                "room:2",
                "--canary",
                canary,
                "--deadline",
                "10m",
                "--max-failure-percent",
                "30%",
            ]);
            assert_eq!(a.canary, Some(20), "{canary}");
            assert_eq!(a.deadline, Some(600));
            assert_eq!(a.max_failure_percent, Some(30));
            assert_eq!(a.image.as_deref(), Some("room:2"));
        }
        let a = pool_rollout(&["rooms", "--command", "./srv", "--fast"]);
        assert_eq!(a.command.unwrap(), ["./srv", "--fast"]);
        assert_eq!(a.canary, None);
        for bad in [
            &["rooms", "--image", "x", "--canary", "0"][..],
            &["rooms", "--image", "x", "--canary", "101%"],
            &["rooms", "--image", "x", "--canary", "ten"],
            &["rooms", "--image", "x", "--canary", "-5"],
            // A rollout needs something to roll out.
            &["rooms", "--canary", "10"],
            &["rooms", "--image", "x", "--command", "y"],
        ] {
            let args: Vec<&str> = ["hangar", "pool", "rollout"]
                .iter()
                .chain(bad)
                .copied()
                .collect();
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn connect_takes_a_pool_but_not_with_its_own_template() {
        match parse(&["connect", "doc-1", "--pool", "rooms"]).command {
            Command::Connect(a) => assert_eq!(a.pool.as_deref(), Some("rooms")),
            other => panic!("{other:?}"),
        }
        let args = [
            "hangar", "connect", "doc-1", "--pool", "rooms", "--image", "x",
        ];
        assert!(Cli::try_parse_from(args).is_err());
    }

    #[test]
    fn completions_cover_the_pool_commands() {
        let mut script = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "hangar",
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        for word in [
            "pool", "rollout", "promote", "rollback", "--canary", "--warm",
        ] {
            assert!(script.contains(word), "completions lack {word}");
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct FenceWatchdogArgs {
    /// The Docker engine whose containers it may have to kill.
    #[arg(long)]
    pub docker_host: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum QuotaCommand {
    /// Set a namespace's quota (what is not given is unlimited).
    Set(QuotaSetArgs),
    /// List every namespace's quota.
    Ls(ClientOnlyArgs),
    /// Remove a namespace's quota.
    Rm(NameArgs),
}

#[derive(Debug, clap::Args)]
pub struct QuotaSetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The namespace (keyless backends count under `default`).
    pub namespace: String,
    /// Live backends at most.
    #[arg(long)]
    pub max_live: Option<u64>,
    /// Connects a second at most (a burst of one second's worth).
    #[arg(long)]
    pub connects_per_second: Option<f64>,
}

#[derive(Debug, clap::Subcommand)]
pub enum PoolCommand {
    /// Create a pool: its first generation's template and how many warm backends to keep.
    Create(PoolCreateArgs),
    /// List pools: warm backends ready of the target, claimed, generation and template.
    Ls(ClientOnlyArgs),
    /// Show a pool: settings, status, the rollout in progress and the generation history.
    Show(NameArgs),
    /// Change a pool's settings (what is not given keeps its value).
    Set(PoolSetArgs),
    /// Delete a pool and stop its warm backends.
    Delete(NameArgs),
    /// Roll out a new generation of the template to new sessions (a canary share first with
    /// --canary); sessions already running keep theirs.
    Rollout(PoolRolloutArgs),
    /// Promote the generation being rolled out: every new session gets it.
    Promote(NameArgs),
    /// Send new sessions back to an earlier generation (default: the one before the current).
    Rollback(PoolRollbackArgs),
}

#[derive(Debug, clap::Args)]
pub struct PoolCreateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The pool's name (lowercase letters, digits and dashes, starting with a letter).
    pub name: String,
    /// Warm backends to keep: started, ready and unclaimed.
    #[arg(long, value_name = "N")]
    pub warm: Option<u32>,
    /// Live backends at most, warm and claimed (0: no limit).
    #[arg(long, value_name = "N")]
    pub max_live: Option<u32>,
    /// The drone pool the backends run on [default: default].
    #[arg(long, value_name = "POOL")]
    pub drone_pool: Option<String>,
    /// Run this container image (docker drones).
    #[arg(long, conflicts_with = "command")]
    pub image: Option<String>,
    /// Run this command (process drones); it takes the rest of the line, so give it last
    /// (or as one string split on spaces).
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    pub command: Option<Vec<String>>,
    /// An environment variable of the backends (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Idle timeout of a claimed backend (e.g. 90, 5m, 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_s)]
    pub idle_timeout: Option<u64>,
    /// Lifetime of a claimed backend, counted from its claim (e.g. 12h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_s)]
    pub lifetime: Option<u64>,
    /// CPU millicores reserved (and capped) per backend.
    #[arg(long, value_name = "N")]
    pub cpu_millis: Option<u64>,
    /// Memory in MB reserved (and capped) per backend.
    #[arg(long, value_name = "N")]
    pub memory_mb: Option<u64>,
    #[command(flatten)]
    pub tuning: PoolTuningArgs,
}

/// How fast a pool converges and when a canary promotes itself (`pool create` and `pool
/// set`).
#[derive(Debug, Clone, clap::Args)]
pub struct PoolTuningArgs {
    /// Warm backends started per converger pass at most [default: 7, or a quarter of
    /// --warm].
    #[arg(long, value_name = "N")]
    pub max_add: Option<u32>,
    /// Warm backends stopped per converger pass at most [default: 1, or a twentieth of
    /// --warm].
    #[arg(long, value_name = "N")]
    pub max_remove: Option<u32>,
    /// Healthy starts of a canary generation after which it is promoted by itself.
    #[arg(long, value_name = "N")]
    pub promote_after: Option<u32>,
}

#[derive(Debug, clap::Args)]
pub struct PoolSetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub name: String,
    /// Warm backends to keep.
    #[arg(long, value_name = "N")]
    pub warm: Option<u32>,
    /// Live backends at most, warm and claimed (0 clears the limit).
    #[arg(long, value_name = "N")]
    pub max_live: Option<u32>,
    /// The drone pool the backends run on.
    #[arg(long, value_name = "POOL")]
    pub drone_pool: Option<String>,
    #[command(flatten)]
    pub tuning: PoolTuningArgs,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("template").required(true).args(["image", "command"])))]
pub struct PoolRolloutArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub name: String,
    /// The new generation runs this container image.
    #[arg(long)]
    pub image: Option<String>,
    /// The new generation runs this command; it takes the rest of the line, so give it last
    /// (or as one string split on spaces).
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    pub command: Option<Vec<String>>,
    /// The new generation's environment (repeatable; replaces the current generation's
    /// when given, else the current one is kept).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The share of new sessions (and warm backends) that get the new generation until it
    /// is promoted, 1 to 100 (e.g. 10% or 10) [default: 100, every new session].
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pub canary: Option<u8>,
    /// Revert by itself if not promoted within this long (e.g. 10m) [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_s)]
    pub deadline: Option<u64>,
    /// Revert by itself once this share of its starts failed (after at least 2), 1 to 100
    /// [default: 50].
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pub max_failure_percent: Option<u8>,
}

#[derive(Debug, clap::Args)]
pub struct PoolRollbackArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub name: String,
    /// The generation new sessions go back to [default: the one before the current].
    #[arg(long, value_name = "GENERATION")]
    pub to: Option<u64>,
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (the only time its secret is shown).
    Create(TokenCreateArgs),
    /// List tokens (never their secrets).
    Ls(ClientOnlyArgs),
    /// Revoke a token by id: it stops working at once.
    Revoke(NameArgs),
}

#[derive(Debug, clap::Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// admin (everything), connect (connect, and status, events and termination of its own
    /// backends), read (lists, status, events, hot, cluster), drone (join as a drone) or
    /// proxy (a remote proxy's route feed and activity).
    #[arg(long)]
    pub scope: String,
    /// Bind a connect token to this namespace: it reaches only keys of it.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Expire after this long (e.g. 12h, 90d); without it, the token does not expire.
    #[arg(long)]
    pub ttl: Option<String>,
    /// What the token is for (shown by `token ls`).
    #[arg(long)]
    pub description: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum MaintenanceCommand {
    /// Begin a window (or lengthen the one in force; a window is never shortened): drones
    /// hold their fence until it ends, and no drone is declared lost before then. Stop and
    /// start the control plane within it.
    Start(MaintenanceStartArgs),
    /// Show the window in force, if any.
    Status(ClientOnlyArgs),
}

#[derive(Debug, clap::Args)]
pub struct MaintenanceStartArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// How long (e.g. 90s, 10m, 1h; at most 7 days).
    #[arg(long = "for", value_name = "DURATION")]
    pub length: String,
}

#[derive(Debug, clap::Subcommand)]
pub enum StateCommand {
    /// Write every record, at one revision, as JSON lines (stop the hangar using an embedded
    /// store first).
    Export(StateExportArgs),
    /// Restore an export into an empty store (or over one with --force); leased records are
    /// left out and every key's epoch starts above the highest exported.
    Import(StateImportArgs),
}

#[derive(Debug, clap::Args)]
pub struct StateExportArgs {
    /// `embedded` (the file in --data-dir) or `etcd://HOST:PORT[,...][/PREFIX]`.
    #[arg(long, default_value = "embedded")]
    pub store: String,
    /// The data directory of the embedded store.
    #[arg(long, default_value = "./.hangar")]
    pub data_dir: PathBuf,
    /// Where to write (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct StateImportArgs {
    /// The export to read.
    pub file: PathBuf,
    /// `embedded` (the file in --data-dir) or `etcd://HOST:PORT[,...][/PREFIX]`.
    #[arg(long, default_value = "embedded")]
    pub store: String,
    /// The data directory of the embedded store.
    #[arg(long, default_value = "./.hangar")]
    pub data_dir: PathBuf,
    /// Write even if the target store is not empty.
    #[arg(long)]
    pub force: bool,
}
