//! `hangar dev`: store, scheduler, proxy and a local drone with the process runtime, in one
//! process on loopback. Validates configuration, binds the listeners, wires the route feed and
//! activity reports between scheduler and proxy, and shuts everything down on a signal.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hangar_core::activity::ActivityBatch;
use hangar_core::token::TokenKey;
use hangar_drone::agent::{Agent, AgentConfig};
use hangar_drone::runtime::process::{ProcessRuntime, ProcessRuntimeConfig};
use hangar_proxy::{Proxy, ProxyConfig};
use hangar_scheduler::{Scheduler, SchedulerConfig, SystemClock};
use hangar_store::embedded::EmbeddedStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ConfigError;
use crate::cli::DevArgs;

/// How often the proxy's activity is handed to the scheduler (bounds idle-timeout precision).
const ACTIVITY_INTERVAL: Duration = Duration::from_millis(250);

/// Validated dev configuration.
struct DevConfig {
    args: DevArgs,
    token_key: TokenKey,
    /// `None` with `--dns off`.
    dns: Option<DnsSetup>,
    /// `None` with `--metrics off`.
    metrics: Option<crate::metrics::MetricsSetup>,
    hot: hangar_scheduler::hot::HotConfig,
    /// The proxy's configuration: domain, key, `--start-wait` and the tuning flags.
    proxy: ProxyConfig,
}

/// Where DNS listens when `--dns` is not given.
const DEFAULT_DNS: &str = "127.0.0.1:5353";

/// The validated DNS server, not bound yet.
struct DnsSetup {
    addr: std::net::SocketAddr,
    server: hangar_dns::DnsServer,
    /// Whether `--dns` was given. The default port (5353, shared with mDNS responders on many
    /// desktops) may be taken; then dev runs without DNS and says so, instead of failing.
    explicit: bool,
}

/// Validates the DNS flags into a server (nothing bound yet); `None` with `--dns off`.
fn validate_dns(args: &DevArgs, domain: &str) -> anyhow::Result<Option<DnsSetup>> {
    let (spec, explicit) = match &args.dns {
        Some(s) => (s.as_str(), true),
        None => (DEFAULT_DNS, false),
    };
    if spec.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = spec.parse().map_err(|_| {
        ConfigError(format!(
            "--dns {spec:?} is neither an address like {DEFAULT_DNS} nor off"
        ))
    })?;
    let proxy_addresses = if args.dns_proxy_address.is_empty() {
        vec![args.proxy.ip()]
    } else {
        args.dns_proxy_address.clone()
    };
    let mut dns = hangar_dns::DnsConfig::new(domain, proxy_addresses);
    dns.ttl = args.dns_ttl;
    if !addr.ip().is_unspecified() {
        dns.nameserver_addresses = vec![addr.ip()];
    }
    let server = hangar_dns::DnsServer::new(&dns).map_err(|e| ConfigError(e.to_string()))?;
    Ok(Some(DnsSetup {
        addr,
        server,
        explicit,
    }))
}

fn validate(args: DevArgs) -> anyhow::Result<DevConfig> {
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
            "--idle-timeout, --start-wait and --startup-timeout must be at least 1 second".into(),
        )
        .into());
    }
    std::fs::create_dir_all(&args.data_dir).map_err(|e| {
        ConfigError(format!(
            "cannot create data directory {}: {e}",
            args.data_dir.display()
        ))
    })?;
    let token_key = match &args.token_key {
        Some(hex) => TokenKey::from_hex(hex)
            .map_err(|e| ConfigError(format!("--token-key / HANGAR_TOKEN_KEY: {e}")))?,
        None => load_or_create_key(&args.data_dir.join("token.key"))?,
    };
    let dns = validate_dns(&args, &domain)?;
    let metrics = crate::metrics::validate(&args.metrics, crate::metrics::DEFAULT_ADDR)?;
    let hot = hot_config(&args.hot)?;
    let mut proxy = ProxyConfig::new(&domain, token_key.clone());
    proxy.start_wait = Duration::from_secs(args.start_wait);
    args.tuning.apply(&mut proxy)?;
    Ok(DevConfig {
        args: DevArgs { domain, ..args },
        token_key,
        dns,
        metrics,
        hot,
        proxy,
    })
}

/// The detector's thresholds from the `--hot-*` flags.
fn hot_config(args: &crate::cli::HotArgs) -> anyhow::Result<hangar_scheduler::hot::HotConfig> {
    let hot = hangar_scheduler::hot::HotConfig {
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
    Ok(hot)
}

/// Reads the token key from the data directory, generating it on first use (mode 0600).
fn load_or_create_key(path: &Path) -> anyhow::Result<TokenKey> {
    match std::fs::read_to_string(path) {
        Ok(s) => TokenKey::from_hex(&s).map_err(|e| {
            ConfigError(format!(
                "token key file {} is corrupt ({e}); delete it to generate a new one (issued tokens stop working)",
                path.display()
            ))
            .into()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = TokenKey::generate();
            write_private(path, key.to_hex().as_bytes())
                .with_context(|| format!("cannot write token key file {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(ConfigError(format!("cannot read token key file {}: {e}", path.display())).into()),
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        ConfigError(format!(
            "cannot listen for the {what} on {addr}: {e} (choose another address with --{what})"
        ))
        .into()
    })
}

/// What `hangar serve` adds to the dev configuration.
struct ServeOptions {
    drone_secret: String,
    lease_ttl: Duration,
}

/// `hangar dev`: the control plane plus an embedded drone.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    run_plane(args, None).await
}

/// `hangar serve`: the control plane for network drones (no embedded drone).
pub async fn run_serve(args: crate::cli::ServeArgs) -> anyhow::Result<()> {
    let drone_secret = match args.drone_secret {
        Some(s) if s.len() >= 8 => s,
        Some(_) => {
            return Err(ConfigError("--drone-secret must be at least 8 characters".into()).into());
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
    run_plane(
        args.plane,
        Some(ServeOptions {
            drone_secret,
            lease_ttl: Duration::from_secs(args.lease_ttl),
        }),
    )
    .await
}

async fn run_plane(args: DevArgs, serve: Option<ServeOptions>) -> anyhow::Result<()> {
    let role = if serve.is_some() { "serve" } else { "dev" };
    let cfg = validate(args)?;
    let args = &cfg.args;
    let data_dir: PathBuf = args.data_dir.clone();
    let store = EmbeddedStore::open_default(data_dir.join("state.redb"))
        .await
        .map_err(|e| {
            ConfigError(format!(
                "{e} (is another hangar using data directory {}?)",
                data_dir.display()
            ))
        })?;

    let api_listener = bind(args.api, "api").await?;
    let certs = crate::tls::load(&args.tls)?;
    let proxy_listener = bind(args.proxy, "proxy").await?;
    let https_listener = match (&args.tls.https, &certs) {
        (Some(addr), Some(_)) => Some(bind(*addr, "https").await?),
        _ => None,
    };
    let api_addr = api_listener.local_addr()?;
    let proxy_addr = proxy_listener.local_addr()?;
    let dns_sockets = match &cfg.dns {
        Some(dns) => match hangar_dns::bind(dns.addr).await {
            Ok(sockets) => Some(sockets),
            Err(e) if !dns.explicit => {
                eprintln!(
                    "hangar dev: dns is off: {e} (choose an address with --dns, e.g. --dns 127.0.0.1:5354)"
                );
                None
            }
            Err(e) => {
                return Err(ConfigError(format!(
                    "{e} (choose another address with --dns, or turn dns off with --dns off)"
                ))
                .into());
            }
        },
        None => None,
    };

    let metrics_listener = match &cfg.metrics {
        Some(m) => crate::metrics::bind(m, role).await?,
        None => None,
    };
    // Installed before anything records (the scheduler registers gauges when it starts), and
    // only with a listener: an exporter nobody serves would only accumulate samples.
    let exporter = match (&metrics_listener, &cfg.metrics) {
        (Some(_), Some(m)) => Some(crate::metrics::install(m.grace)?),
        _ => None,
    };

    let exe = std::env::current_exe().context("cannot find the hangar executable")?;
    let demo_command = vec![
        exe.to_string_lossy().into_owned(),
        "demo-backend".to_string(),
    ];

    let mut sched_cfg = SchedulerConfig::new(&args.domain, format!("http://{api_addr}"));
    sched_cfg.proxy_port = Some(proxy_addr.port());
    // In dev the embedded drone runs the demo backend by default; network drones fill in
    // their own default (the process runtime's demo backend, or a docker image per spawn).
    if serve.is_none() {
        sched_cfg.defaults.command = Some(demo_command.clone());
    }
    if let Some(s) = &serve {
        sched_cfg.drone_secret = Some(s.drone_secret.clone());
        sched_cfg.lease_ttl = s.lease_ttl;
    }
    sched_cfg.defaults.idle_timeout_s = Some(args.idle_timeout);
    sched_cfg.startup_timeout = Duration::from_secs(args.startup_timeout);
    sched_cfg.hot = cfg.hot.clone();
    if args.hot.relieve_hot {
        sched_cfg.relieve = Some(hangar_scheduler::monitor::ReliefConfig {
            min_idle: args.hot.relieve_min_idle,
            max_per_pass: args.hot.relieve_max,
        });
    }
    let scheduler = Scheduler::new(
        sched_cfg,
        store,
        cfg.token_key.clone(),
        Arc::new(SystemClock),
    );

    // The embedded drone (dev only): a new run id for every process, so records from a
    // previous run are recognised as lost.
    let mut embedded_runtime: Option<Arc<ProcessRuntime>> = None;
    let embedded = if serve.is_none() {
        let run_id = format!("run-{}", hangar_core::BackendId::generate());
        let (commands, events) = scheduler
            .attach_drone(hangar_core::drone::Hello {
                drone: "local".into(),
                run_id,
                // The dev drone does not limit reservations (the process runtime applies no
                // caps); only the number of backends is bounded.
                capacity: hangar_core::drone::Capacity {
                    cpu_millis: u64::from(u32::MAX),
                    memory_mb: u64::from(u32::MAX),
                    max_backends: crate::host::DEFAULT_MAX_BACKENDS,
                },
                pool: "default".into(),
                runtime: "process".into(),
                inventory: Vec::new(),
                unhealthy: None,
            })
            .await
            .context("cannot register the embedded drone")?;
        let runtime = Arc::new(ProcessRuntime::new(ProcessRuntimeConfig {
            default_command: Some(demo_command),
            log_dir: Some(data_dir.join("logs")),
            ..ProcessRuntimeConfig::default()
        }));
        embedded_runtime = Some(runtime.clone());
        std::fs::create_dir_all(data_dir.join("logs"))
            .context("cannot create the logs directory")?;
        Some((
            Agent::new(runtime, AgentConfig::default()),
            commands,
            events,
        ))
    } else {
        None
    };

    let cancel = CancellationToken::new();
    scheduler
        .start(cancel.clone())
        .await
        .context("cannot load state from the store")?;

    let proxy = Arc::new(Proxy::new(cfg.proxy.clone()));

    let tasks = TaskTracker::new();
    // Metrics: the admin listener; the proxy publishes its per-backend counts before every
    // scrape.
    let mut metrics_addr = None;
    if let (Some(listener), Some(exporter), Some(setup)) =
        (metrics_listener, exporter, &cfg.metrics)
    {
        metrics_addr = Some(listener.local_addr()?);
        let activity = proxy.activity();
        activity.set_metrics_grace(setup.grace);
        let server = crate::metrics::MetricsServer::new(exporter, setup.grace)
            .collect(move || activity.publish_metrics());
        tasks.spawn(server.run(listener, cancel.clone()));
    }
    // Usage of the embedded drone's backends (CPU, memory): for metrics and the detector.
    if let Some(runtime) = embedded_runtime {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let collector = hangar_drone::usage::UsageCollector::new(runtime, args.usage_interval);
        tasks.spawn(collector.run(tx, cancel.clone()));
        let scheduler = scheduler.clone();
        tasks.spawn(async move {
            while let Some(usage) = rx.recv().await {
                scheduler.report_usage("local", &usage);
            }
        });
    }
    // Revocations: scheduler → proxy.
    {
        let mut revocations = scheduler.revocations();
        let proxy = proxy.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            loop {
                let set = revocations.borrow_and_update().clone();
                proxy.publish_revocations(set);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    changed = revocations.changed() => if changed.is_err() { return },
                }
            }
        });
    }
    // HTTPS listener, with certificate reload on SIGHUP and file changes.
    if let (Some(listener), Some(store)) = (https_listener, certs) {
        let tls = store
            .server_config()
            .map_err(|e| ConfigError(e.to_string()))?;
        println!(
            "hangar {role}: https listening on {}",
            listener.local_addr()?
        );
        crate::tls::spawn_reloader(store, &tasks, cancel.clone());
        let proxy = proxy.clone();
        let c = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = proxy.run_tls(listener, tls, c).await {
                tracing::error!(error = %e, "https listener failed");
            }
        });
    }
    // Route feed: scheduler → proxy, one swap per published table.
    {
        let mut routes = scheduler.routes();
        let handle = proxy.routes();
        let activity = proxy.activity();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            loop {
                let table = routes.borrow_and_update().clone();
                activity.prune(&table);
                handle.publish(table);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    changed = routes.changed() => if changed.is_err() { return },
                }
            }
        });
    }
    // Activity: proxy → scheduler, for idle timeouts.
    {
        let scheduler = scheduler.clone();
        let activity = proxy.activity();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(ACTIVITY_INTERVAL);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                scheduler.report_activity(&ActivityBatch {
                    proxy: "local".into(),
                    reports: activity.snapshot(),
                });
            }
        });
    }
    let agent_cancel = CancellationToken::new();
    let agent_task = embedded.map(|(agent, commands, events)| {
        let c = agent_cancel.clone();
        tasks.spawn(async move { agent.run(commands, events, c).await })
    });
    let api_task = {
        let scheduler = scheduler.clone();
        let c = cancel.clone();
        tasks.spawn(async move { scheduler.serve_api(api_listener, c).await })
    };
    let proxy_task = {
        let proxy = proxy.clone();
        let c = cancel.clone();
        tasks.spawn(async move { proxy.run(proxy_listener, c).await })
    };
    // DNS: answers from the same route snapshots as the proxy, and the ACME challenges from
    // the store's feed.
    let mut dns_addr = None;
    let dns_task = match (&cfg.dns, dns_sockets) {
        (Some(DnsSetup { server: dns, .. }), Some((udp, tcp))) => {
            dns_addr = Some(udp.local_addr()?);
            {
                let dns = dns.clone();
                let routes = scheduler.routes();
                let c = cancel.clone();
                tasks.spawn(async move { dns.follow_routes(routes, c).await });
            }
            let feed = scheduler.acme_feed();
            let mut acme = feed.subscribe();
            tasks.spawn(feed.run(cancel.clone()));
            {
                let dns = dns.clone();
                let c = cancel.clone();
                tasks.spawn(async move {
                    loop {
                        let snapshot = acme.borrow_and_update().clone();
                        dns.publish_acme_challenges(
                            snapshot
                                .challenges
                                .iter()
                                .map(|ch| (ch.name.as_str(), ch.value.as_str())),
                        );
                        tokio::select! {
                            _ = c.cancelled() => return,
                            changed = acme.changed() => if changed.is_err() { return },
                        }
                    }
                });
            }
            let dns = dns.clone();
            let c = cancel.clone();
            Some(tasks.spawn(async move { dns.run(udp, tcp, c).await }))
        }
        _ => None,
    };
    let dns_outcome = async move {
        match dns_task {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    tasks.close();

    println!("hangar {role}: api listening on {api_addr}");
    println!("hangar {role}: proxy listening on {proxy_addr}");
    if let Some(addr) = dns_addr {
        println!("hangar {role}: dns listening on {addr}");
    }
    if let Some(addr) = metrics_addr {
        crate::metrics::announce(role, addr);
    }
    println!("hangar {role}: data directory {}", data_dir.display());
    println!();
    println!("Try it:");
    println!(
        "  curl -s -X POST http://{api_addr}/v1/connect -d '{{\"key\": {{\"name\": \"doc-1\"}}}}'"
    );
    println!(
        "  curl -H \"Authorization: Bearer $TOKEN\" http://<backend_id>.{}:{}/count",
        args.domain,
        proxy_addr.port()
    );
    println!("  or: hangar connect doc-1 --wait --api http://{api_addr}");
    if let Some(addr) = dns_addr {
        println!(
            "  dig @{} -p {} <backend_id>.{}",
            addr.ip(),
            addr.port(),
            args.domain
        );
    }

    let outcome = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        r = api_task => match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("the api server stopped unexpectedly")),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("the api server failed")),
            Err(e) => Err(anyhow::anyhow!("the api server panicked: {e}")),
        },
        r = proxy_task => match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("the proxy stopped unexpectedly")),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("the proxy failed")),
            Err(e) => Err(anyhow::anyhow!("the proxy panicked: {e}")),
        },
        r = dns_outcome => match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("the dns server stopped unexpectedly")),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("the dns server failed")),
            Err(e) => Err(anyhow::anyhow!("the dns server panicked: {e}")),
        },
    };
    eprintln!("hangar {role}: shutting down");
    // Stop serving and stop applying drone events first, so the backends stopped below stay
    // recorded as running: the next start closes them as lost, never as failed.
    cancel.cancel();
    scheduler.wait().await;
    agent_cancel.cancel();
    if let Some(t) = agent_task {
        let _ = t.await;
    }
    tasks.wait().await;
    outcome
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
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
