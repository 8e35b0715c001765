//! `hangar proxy`: a data-plane proxy on another host, following a scheduler's route feed and
//! reporting activity back. Keeps serving known routes while the scheduler is away.

use std::sync::Arc;
use std::time::Duration;

use hangar_core::token::TokenKey;
use hangar_proxy::{Proxy, ProxyConfig, RemoteConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ConfigError;
use crate::cli::ProxyArgs;

/// How often activity is reported to the scheduler (bounds idle-timeout precision).
const ACTIVITY_INTERVAL: Duration = Duration::from_millis(500);

pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let secret = args
        .secret
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ConfigError(
                "give the scheduler's cluster secret with --secret or HANGAR_DRONE_SECRET".into(),
            )
        })?;
    let key = args.token_key.as_deref().ok_or_else(|| {
        ConfigError(
            "give the scheduler's token key with --token-key or HANGAR_TOKEN_KEY (its data directory's token.key)"
                .into(),
        )
    })?;
    let token_key =
        TokenKey::from_hex(key).map_err(|e| ConfigError(format!("--token-key: {e}")))?;
    if !args.scheduler.starts_with("http://") {
        return Err(ConfigError(format!(
            "--scheduler {:?} must be the scheduler's API URL, e.g. http://127.0.0.1:7070",
            args.scheduler
        ))
        .into());
    }
    let mut cfg = ProxyConfig::new(args.domain.to_ascii_lowercase(), token_key);
    cfg.start_wait = Duration::from_secs(args.start_wait);
    args.tuning.apply(&mut cfg)?;
    // The feed trails the scheduler by a moment: a backend connected a millisecond ago is
    // waited for instead of answered 404.
    cfg.unknown_grace = Duration::from_millis(500);
    let metrics_setup =
        crate::metrics::validate(&args.metrics_args(), crate::metrics::DEFAULT_PROXY_ADDR)?;
    let certs = crate::tls::load(&args.tls)?;
    let listener = TcpListener::bind(args.proxy).await.map_err(|e| {
        ConfigError(format!(
            "cannot listen for the proxy on {}: {e}",
            args.proxy
        ))
    })?;
    let https = match (&args.tls.https, &certs) {
        (Some(addr), Some(_)) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| ConfigError(format!("cannot listen for HTTPS on {addr}: {e}")))?,
        ),
        _ => None,
    };
    let metrics_listener = match &metrics_setup {
        Some(m) => crate::metrics::bind(m, "proxy").await?,
        None => None,
    };
    // Installed before the proxy records anything, and only with a listener to serve it.
    let exporter = match (&metrics_listener, &metrics_setup) {
        (Some(_), Some(m)) => Some(crate::metrics::install(m.grace)?),
        _ => None,
    };
    let proxy = Arc::new(Proxy::new(cfg));
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    if let (Some(l), Some(exporter), Some(setup)) = (metrics_listener, exporter, &metrics_setup) {
        crate::metrics::announce("proxy", l.local_addr()?);
        let activity = proxy.activity();
        activity.set_metrics_grace(setup.grace);
        let server = crate::metrics::MetricsServer::new(exporter, setup.grace)
            .collect(move || activity.publish_metrics());
        tasks.spawn(server.run(l, cancel.clone()));
    }
    println!(
        "hangar proxy: proxy listening on {}",
        listener.local_addr()?
    );
    if let Some(l) = &https {
        println!("hangar proxy: https listening on {}", l.local_addr()?);
    }
    println!("hangar proxy: following {}", args.scheduler);
    let follow = {
        let proxy = proxy.clone();
        let c = cancel.clone();
        let rc = RemoteConfig {
            scheduler_url: args.scheduler.clone(),
            secret,
            name: args.name.clone(),
            activity_interval: ACTIVITY_INTERVAL,
        };
        tasks.spawn(async move { proxy.follow(rc, c).await })
    };
    let plain = {
        let proxy = proxy.clone();
        let c = cancel.clone();
        tasks.spawn(async move { proxy.run(listener, c).await })
    };
    if let (Some(l), Some(store)) = (https, certs) {
        let tls = store
            .server_config()
            .map_err(|e| ConfigError(e.to_string()))?;
        crate::tls::spawn_reloader(store, &tasks, cancel.clone());
        let proxy = proxy.clone();
        let c = cancel.clone();
        tasks.spawn(async move {
            if let Err(e) = proxy.run_tls(l, tls, c).await {
                tracing::error!(error = %e, "https listener failed");
            }
        });
    }
    tasks.close();
    let outcome = tokio::select! {
        _ = crate::dev::shutdown_signal() => Ok(()),
        r = follow => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("{e}")),
            Err(e) => Err(anyhow::anyhow!("the route follower panicked: {e}")),
        },
        r = plain => match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("the proxy stopped unexpectedly")),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("the proxy failed")),
            Err(e) => Err(anyhow::anyhow!("the proxy panicked: {e}")),
        },
    };
    eprintln!("hangar proxy: shutting down");
    cancel.cancel();
    tasks.wait().await;
    outcome
}
