//! The control plane that `hangar dev` and `hangar serve` share: the store, the scheduler
//! and its API, the proxy (plain and HTTPS), the DNS server and the metrics listener, wired
//! together in one process (route tables and revocations to the proxy and DNS, the proxy's
//! activity back to the scheduler). The roles decide where drones come from ([`Drones`]) and
//! the order of shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hangar_core::token::TokenKey;
use hangar_dns::{DnsError, DnsServer};
use hangar_proxy::{Proxy, ProxyConfig, ProxyRunError};
use hangar_scheduler::hot::HotConfig;
use hangar_scheduler::monitor::ReliefConfig;
use hangar_scheduler::{Scheduler, SchedulerConfig, SystemClock};
use hangar_store::etcd::EtcdError;
use hangar_store::{Store, StoreError, StoreLocation};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dns::{self, DnsSetup};
use super::{token_key, wires};
use crate::ConfigError;
use crate::cli::{DevArgs, HotArgs};
use crate::metrics::{MetricsListener, MetricsSetup};
use crate::tls::HttpsSetup;

/// Where the plane's drones come from: what sets `dev` and `serve` apart in the scheduler.
pub enum Drones {
    /// `hangar dev`: one drone in this process, whose backends run `default_command` unless a
    /// connect says otherwise.
    Embedded { default_command: Vec<String> },
    /// `hangar serve`: drones on the network, admitted with `secret` and lost after
    /// `lease_ttl` without a heartbeat. They fill in their own default (the process runtime's
    /// demo backend, or a docker image per spawn).
    Network {
        secret: String,
        lease_ttl: Duration,
        leader_ttl: Duration,
    },
}

/// The validated configuration of the control plane; nothing is bound yet.
pub struct Config {
    /// `dev` or `serve`: the prefix of every line reported.
    role: &'static str,
    api: SocketAddr,
    /// `--api-url`: how other hosts reach the API.
    api_url: Option<String>,
    proxy_addr: SocketAddr,
    https: Option<HttpsSetup>,
    /// `--api-tls-cert/--api-tls-key`: the API over HTTPS.
    api_tls: Option<crate::tls::ApiTls>,
    /// Trusted roots for other instances' `https://` APIs (the system's and `--ca`).
    tls_client: Arc<rustls::ClientConfig>,
    data_dir: PathBuf,
    /// `--store` (serve); the embedded store in `data_dir` otherwise.
    store: StoreLocation,
    /// Lowercase, without the trailing dot.
    domain: String,
    token_key: TokenKey,
    /// `None` with `--dns off`.
    dns: Option<DnsSetup>,
    /// `None` with `--metrics off`.
    metrics: Option<MetricsSetup>,
    /// The proxy's configuration: domain, key, `--start-wait` and the tuning flags.
    proxy: ProxyConfig,
    idle_timeout_s: u64,
    startup_timeout: Duration,
    hot: HotConfig,
    /// `Some` with `--relieve-hot`.
    relieve: Option<ReliefConfig>,
    drones: Drones,
}

impl Config {
    /// Validates the flags. Creates the data directory and, on first use, the token key in it;
    /// binds nothing.
    pub fn from_args(role: &'static str, args: DevArgs, drones: Drones) -> anyhow::Result<Config> {
        let domain = args.domain.trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty()
            || !domain
                .split('.')
                .all(|l| hangar_core::ids::validate_label(l).is_ok())
        {
            return Err(ConfigError(format!(
                "--domain {:?} is not a valid DNS name (labels of lowercase letters, digits and '-')",
                args.domain
            ))
            .into());
        }
        if args.idle_timeout == 0 || args.start_wait == 0 || args.startup_timeout == 0 {
            return Err(ConfigError(
                "--idle-timeout, --start-wait and --startup-timeout must be at least 1 second"
                    .into(),
            )
            .into());
        }
        std::fs::create_dir_all(&args.data_dir).map_err(|e| {
            ConfigError(format!(
                "cannot create data directory {}: {e}",
                args.data_dir.display()
            ))
        })?;
        let token_key = token_key::resolve(args.token_key.as_deref(), &args.data_dir)?;
        let dns = dns::validate(&args, &domain)?;
        let metrics = crate::metrics::validate(&args.metrics, crate::metrics::DEFAULT_ADDR)?;
        let (hot, relieve) = validate_hot(&args.hot)?;
        let mut proxy = ProxyConfig::new(&domain, token_key.clone());
        proxy.start_wait = Duration::from_secs(args.start_wait);
        args.tuning.apply(&mut proxy)?;
        let https = crate::tls::load(&args.tls)?;
        let api_tls =
            crate::tls::load_api(args.api_tls_cert.as_deref(), args.api_tls_key.as_deref())?;
        let tls_client = crate::tls::client_config(args.ca.as_deref())?;
        Ok(Config {
            role,
            api_tls,
            tls_client,
            api_url: match args.api_url {
                Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                    Some(u.trim_end_matches('/').to_string())
                }
                Some(u) => {
                    return Err(ConfigError(format!(
                        "--api-url {u:?} must be an http:// or https:// URL, e.g. http://10.0.0.1:7070"
                    ))
                    .into());
                }
                None if args.api.ip().is_unspecified() && role == "serve" => {
                    return Err(ConfigError(format!(
                        "--api {} listens on every address: give --api-url, the URL other hosts reach this instance at",
                        args.api
                    ))
                    .into());
                }
                None => None,
            },
            api: args.api,
            proxy_addr: args.proxy,
            https,
            data_dir: args.data_dir,
            store: StoreLocation::Embedded,
            domain,
            token_key,
            dns,
            metrics,
            proxy,
            idle_timeout_s: args.idle_timeout,
            startup_timeout: Duration::from_secs(args.startup_timeout),
            hot,
            relieve,
            drones,
        })
    }

    /// Keeps state in `store` instead of the embedded store (`hangar serve --store`).
    pub fn with_store(mut self, store: StoreLocation) -> Config {
        self.store = store;
        self
    }

    /// The scheduler's configuration, once the API and the proxy are bound (clients are
    /// handed URLs with their addresses).
    fn scheduler_config(&self, addrs: &Addresses) -> SchedulerConfig {
        let scheme = if self.api_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let api_url = self
            .api_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{}", addrs.api));
        let mut cfg = SchedulerConfig::new(&self.domain, api_url);
        cfg.proxy_port = Some(addrs.proxy.port());
        match &self.drones {
            Drones::Embedded { default_command } => {
                cfg.defaults.command = Some(default_command.clone());
            }
            Drones::Network {
                secret,
                lease_ttl,
                leader_ttl,
            } => {
                cfg.drone_secret = Some(secret.clone());
                cfg.lease_ttl = *lease_ttl;
                cfg.leader_ttl = *leader_ttl;
            }
        }
        cfg.defaults.idle_timeout_s = Some(self.idle_timeout_s);
        cfg.startup_timeout = self.startup_timeout;
        cfg.hot = self.hot.clone();
        cfg.relieve = self.relieve.clone();
        cfg.instance_id = super::instance::id(&self.data_dir);
        cfg.api_tokens = self.api_tokens();
        cfg.tls_client = Some(self.tls_client.clone());
        cfg
    }

    /// Whether the API needs tokens: always for `serve` (drones and remote proxies reach it
    /// from other hosts), and for `dev` unless it listens on loopback only.
    fn api_tokens(&self) -> bool {
        self.role == "serve" || !self.api.ip().is_loopback()
    }

    /// Opens the store, binds every listener, installs the metrics recorder and builds the
    /// scheduler and the proxy. Nothing runs yet.
    pub async fn build(mut self) -> anyhow::Result<Plane> {
        let store = open_store(&self.store, &self.data_dir).await?;
        let api = bind(self.api, "api").await?;
        let proxy = bind(self.proxy_addr, "proxy").await?;
        let https = match self.https.take() {
            Some(setup) => {
                let listener = bind(setup.addr, "https").await?;
                Some((setup, listener))
            }
            None => None,
        };
        let dns = match self.dns.take() {
            Some(setup) => setup.bind().await?,
            None => None,
        };
        // Installs the recorder before the scheduler registers its gauges.
        let metrics = crate::metrics::listen(self.metrics.as_ref(), self.role).await?;
        let addrs = Addresses {
            api: api.local_addr()?,
            proxy: proxy.local_addr()?,
            https: match &https {
                Some((_, listener)) => Some(listener.local_addr()?),
                None => None,
            },
            dns: match &dns {
                Some((_, (udp, _))) => Some(udp.local_addr()?),
                None => None,
            },
            metrics: metrics.as_ref().map(MetricsListener::addr),
        };
        let scheduler = Scheduler::new(
            self.scheduler_config(&addrs),
            store,
            self.token_key,
            Arc::new(SystemClock),
        );
        Ok(Plane {
            scheduler,
            proxy: Arc::new(Proxy::new(self.proxy)),
            listeners: Listeners {
                api,
                api_tls: self.api_tls,
                proxy,
                https,
                dns,
                metrics,
            },
            report: Report {
                role: self.role,
                addrs,
                data_dir: self.data_dir,
                domain: self.domain,
            },
        })
    }
}

/// The control plane with its store open and every listener bound; nothing runs yet.
pub struct Plane {
    scheduler: Scheduler,
    proxy: Arc<Proxy>,
    listeners: Listeners,
    report: Report,
}

struct Listeners {
    api: TcpListener,
    api_tls: Option<crate::tls::ApiTls>,
    proxy: TcpListener,
    https: Option<(HttpsSetup, TcpListener)>,
    dns: Option<(DnsServer, (UdpSocket, TcpListener))>,
    metrics: Option<MetricsListener>,
}

impl Plane {
    /// The scheduler, to attach an embedded drone before [`Plane::spawn`] and to wait for
    /// after cancelling it.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Where state lives: the store, the token key, the embedded drone's logs.
    pub fn data_dir(&self) -> &Path {
        &self.report.data_dir
    }

    /// Loads the scheduler's state and starts it, then starts every server and wire as a task
    /// of `tasks`; all of them stop when `cancel` fires (the scheduler's own tasks end before
    /// [`Scheduler::wait`] returns).
    pub async fn spawn(
        self,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Servers> {
        let Plane {
            scheduler,
            proxy,
            listeners,
            report,
        } = self;
        // Scheduler → proxy, synchronously: a connect answers only once the proxy can route
        // its backend.
        {
            let handle = proxy.routes();
            let activity = proxy.activity();
            scheduler.publish_routes_to(move |table| {
                activity.prune_lazily(table);
                handle.publish(table.clone());
            });
        }
        scheduler
            .start(cancel.clone())
            .await
            .context("cannot load state from the store")?;
        bootstrap_admin_token(&scheduler, &report).await?;
        if let Some((setup, listener)) = listeners.https {
            crate::tls::serve(setup, listener, proxy.clone(), tasks, cancel)?;
        }
        if let Some(metrics) = listeners.metrics {
            wires::serve_metrics(metrics, Some(&proxy), tasks, cancel);
        }
        tasks.spawn(wires::pump_revocations(
            scheduler.clone(),
            proxy.clone(),
            cancel.clone(),
        ));
        tasks.spawn(wires::pump_activity(
            scheduler.clone(),
            proxy.clone(),
            cancel.clone(),
        ));
        let api_tls = match listeners.api_tls {
            Some(tls) => Some(tls.acceptor(tasks, cancel)?),
            None => None,
        };
        let api_task = tasks.spawn(wires::serve_api(
            scheduler.clone(),
            listeners.api,
            api_tls,
            tasks.clone(),
            cancel.clone(),
        ));
        let proxy_task = tasks.spawn(wires::serve_proxy(proxy, listeners.proxy, cancel.clone()));
        let dns_task = listeners
            .dns
            .map(|(server, sockets)| wires::serve_dns(server, sockets, &scheduler, tasks, cancel));
        Ok(Servers {
            api: api_task,
            proxy: proxy_task,
            dns: dns_task,
            report,
        })
    }
}

/// Where `serve` leaves the first admin token, readable by its user only.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// With tokens required and no admin token in the store, creates one and writes it to the
/// data directory (mode 0600), saying where; on an open API, says that it is open.
async fn bootstrap_admin_token(scheduler: &Scheduler, report: &Report) -> anyhow::Result<()> {
    let role = report.role;
    if !scheduler.config().api_tokens {
        eprintln!(
            "hangar {role}: the API listens on loopback and is open to anyone on this host (no tokens); on any other address it needs tokens"
        );
        return Ok(());
    }
    let path = report.data_dir.join(ADMIN_TOKEN_FILE);
    let Some(token) = scheduler
        .bootstrap_admin_token()
        .await
        .context("cannot create the first admin token")?
    else {
        eprintln!(
            "hangar {role}: the API needs tokens; an admin token exists (the instance that created it wrote it to its data directory as {ADMIN_TOKEN_FILE})"
        );
        return Ok(());
    };
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write the admin token to {}", path.display()))?;
    // An existing file keeps its mode: make sure it is the user's alone.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    writeln!(file, "{token}")?;
    eprintln!(
        "hangar {role}: the API needs tokens; an admin token was written to {} (readable by this user only): export HANGAR_TOKEN=$(cat {}) and create narrower ones with `hangar token create`",
        path.display(),
        path.display()
    );
    Ok(())
}

/// The plane's servers, running.
pub struct Servers {
    api: JoinHandle<std::io::Result<()>>,
    proxy: JoinHandle<Result<(), ProxyRunError>>,
    dns: Option<JoinHandle<Result<(), DnsError>>>,
    report: Report,
}

impl Servers {
    /// Reports the bound addresses (tests and operators read these lines) and how to try it.
    pub fn announce(&self) {
        self.report.print();
    }

    /// Waits for `shutdown`, or for a server that stops on its own (an error).
    pub async fn until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let dns = async move {
            match self.dns {
                Some(task) => super::stopped("dns server", task).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown => Ok(()),
            e = super::stopped("api server", self.api) => Err(e),
            e = super::stopped("proxy", self.proxy) => Err(e),
            e = dns => Err(e),
        }
    }
}

/// Where the plane listens, as bound.
struct Addresses {
    api: SocketAddr,
    proxy: SocketAddr,
    https: Option<SocketAddr>,
    dns: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
}

/// What the plane reports once it runs.
struct Report {
    role: &'static str,
    addrs: Addresses,
    data_dir: PathBuf,
    domain: String,
}

impl Report {
    fn print(&self) {
        let Report {
            role,
            addrs,
            data_dir,
            domain,
        } = self;
        let api = addrs.api;
        if let Some(addr) = addrs.https {
            println!("hangar {role}: https listening on {addr}");
        }
        println!("hangar {role}: api listening on {api}");
        println!("hangar {role}: proxy listening on {}", addrs.proxy);
        if let Some(addr) = addrs.dns {
            println!("hangar {role}: dns listening on {addr}");
        }
        if let Some(addr) = addrs.metrics {
            crate::metrics::announce(role, addr);
        }
        println!("hangar {role}: data directory {}", data_dir.display());
        println!();
        println!("Try it:");
        println!(
            "  curl -s -X POST http://{api}/v1/connect -d '{{\"key\": {{\"name\": \"doc-1\"}}}}'"
        );
        println!(
            "  curl -H \"Authorization: Bearer $TOKEN\" http://<backend_id>.{domain}:{}/count",
            addrs.proxy.port()
        );
        println!("  or: hangar connect doc-1 --wait --api http://{api}");
        if let Some(addr) = addrs.dns {
            println!(
                "  dig @{} -p {} <backend_id>.{domain}",
                addr.ip(),
                addr.port(),
            );
        }
    }
}

/// The detector's thresholds from the `--hot-*` flags, and the relief of hot drones with
/// `--relieve-hot`.
fn validate_hot(args: &HotArgs) -> anyhow::Result<(HotConfig, Option<ReliefConfig>)> {
    let hot = HotConfig {
        window: args.hot_window,
        sustain: args.hot_sustain,
        rate_multiple: args.hot_rate_multiple,
        min_rate: args.hot_min_rate,
        cpu_fraction: args.hot_cpu_fraction,
        drone_cpu_fraction: args.hot_drone_cpu_fraction,
        drone_reserved_fraction: args.hot_drone_reserved_fraction,
        ..Default::default()
    };
    hot.validate().map_err(ConfigError)?;
    if args.relieve_hot && args.relieve_max == 0 {
        return Err(
            ConfigError("--relieve-max must be at least 1 with --relieve-hot".into()).into(),
        );
    }
    let relieve = args.relieve_hot.then_some(ReliefConfig {
        min_idle: args.relieve_min_idle,
        max_per_pass: args.relieve_max,
    });
    Ok((hot, relieve))
}

/// Opens the store: the embedded one in the data directory, or etcd. Another process holding
/// the embedded store, or no etcd member answering, is a configuration error.
async fn open_store(location: &StoreLocation, data_dir: &Path) -> anyhow::Result<Arc<dyn Store>> {
    hangar_store::open(location, data_dir).await.map_err(|e| {
        let message = match location {
            StoreLocation::Embedded => format!(
                "{e} (is another hangar using data directory {}?)",
                data_dir.display()
            ),
            StoreLocation::Etcd(options) => {
                let detail = match &e {
                    StoreError::Open { source, .. } => match source.downcast_ref::<EtcdError>() {
                        Some(EtcdError::Unavailable { deadline, last, .. }) => {
                            format!("no answer within {deadline:?} (last error: {last})")
                        }
                        _ => source.to_string(),
                    },
                    other => other.to_string(),
                };
                format!(
                    "cannot reach etcd at {}: {detail}: start etcd or fix --store",
                    options.endpoints_display()
                )
            }
        };
        ConfigError(message).into()
    })
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        ConfigError(format!(
            "cannot listen for the {what} on {addr}: {e} (choose another address with --{what})"
        ))
        .into()
    })
}
