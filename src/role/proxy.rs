//! `hangar proxy`: a data-plane proxy on another host, following a scheduler's route feed and
//! reporting activity back. Keeps serving known routes while the scheduler is away.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hangar_core::token::TokenKey;
use hangar_proxy::{Proxy, ProxyConfig, RemoteConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::wires;
use crate::ConfigError;
use crate::cli::ProxyArgs;
use crate::metrics::{MetricsListener, MetricsSetup};
use crate::tls::HttpsSetup;

/// How often activity is reported to the scheduler (bounds idle-timeout precision).
const ACTIVITY_INTERVAL: Duration = Duration::from_millis(500);

/// Validated `hangar proxy` configuration; nothing bound yet.
pub struct Config {
    listen: SocketAddr,
    https: Option<HttpsSetup>,
    /// `None` with `--metrics off`.
    metrics: Option<MetricsSetup>,
    proxy: ProxyConfig,
    /// The scheduler to follow.
    remote: RemoteConfig,
}

impl Config {
    /// Validates the flags and loads the certificates; binds nothing.
    pub fn from_args(args: ProxyArgs) -> anyhow::Result<Config> {
        let secret = args
            .secret
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ConfigError(
                    "give the scheduler's cluster secret with --secret or HANGAR_DRONE_SECRET"
                        .into(),
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
        for url in args.scheduler.split(',').map(str::trim) {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(ConfigError(format!(
                    "--scheduler {url:?} must be the scheduler's API URL, e.g. http://127.0.0.1:7070 (several instances: comma-separated)"
                ))
                .into());
            }
        }
        let mut proxy = ProxyConfig::new(args.domain.to_ascii_lowercase(), token_key);
        proxy.start_wait = Duration::from_secs(args.start_wait);
        args.tuning.apply(&mut proxy)?;
        // The feed trails the scheduler by a moment: a backend connected a millisecond ago is
        // waited for instead of answered 404.
        proxy.unknown_grace = Duration::from_millis(500);
        let metrics =
            crate::metrics::validate(&args.metrics_args(), crate::metrics::DEFAULT_PROXY_ADDR)?;
        let https = crate::tls::load(&args.tls)?;
        Ok(Config {
            listen: args.proxy,
            https,
            metrics,
            proxy,
            remote: RemoteConfig {
                tls: crate::tls::client_config(args.ca.as_deref())?,
                scheduler_url: args.scheduler,
                secret,
                name: args.name,
                activity_interval: ACTIVITY_INTERVAL,
            },
        })
    }

    /// Binds the listeners and installs the metrics recorder before the proxy records
    /// anything.
    pub async fn build(self) -> anyhow::Result<ProxyRole> {
        let listener = TcpListener::bind(self.listen).await.map_err(|e| {
            ConfigError(format!(
                "cannot listen for the proxy on {}: {e}",
                self.listen
            ))
        })?;
        let https = match self.https {
            Some(setup) => {
                let l = TcpListener::bind(setup.addr).await.map_err(|e| {
                    ConfigError(format!("cannot listen for HTTPS on {}: {e}", setup.addr))
                })?;
                Some((setup, l))
            }
            None => None,
        };
        let metrics = crate::metrics::listen(self.metrics.as_ref(), "proxy").await?;
        Ok(ProxyRole {
            proxy: Arc::new(Proxy::new(self.proxy)),
            addr: listener.local_addr()?,
            listener,
            https_addr: match &https {
                Some((_, l)) => Some(l.local_addr()?),
                None => None,
            },
            https,
            metrics,
            remote: self.remote,
        })
    }
}

/// `hangar proxy`, bound and ready to run.
pub struct ProxyRole {
    proxy: Arc<Proxy>,
    listener: TcpListener,
    addr: SocketAddr,
    https: Option<(HttpsSetup, TcpListener)>,
    https_addr: Option<SocketAddr>,
    metrics: Option<MetricsListener>,
    remote: RemoteConfig,
}

impl ProxyRole {
    /// Serves until `shutdown` resolves, the proxy fails, or the scheduler refuses this proxy
    /// for good.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let ProxyRole {
            proxy,
            listener,
            addr,
            https,
            https_addr,
            metrics,
            remote,
        } = self;
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        if let Some(metrics) = metrics {
            crate::metrics::announce("proxy", metrics.addr());
            wires::serve_metrics(metrics, Some(&proxy), &tasks, &cancel);
        }
        println!("hangar proxy: proxy listening on {addr}");
        if let Some(addr) = https_addr {
            println!("hangar proxy: https listening on {addr}");
        }
        println!("hangar proxy: following {}", remote.scheduler_url);
        let follow = tasks.spawn(wires::follow_scheduler(
            proxy.clone(),
            remote,
            cancel.clone(),
        ));
        let plain = tasks.spawn(wires::serve_proxy(proxy.clone(), listener, cancel.clone()));
        if let Some((setup, listener)) = https {
            crate::tls::serve(setup, listener, proxy, &tasks, &cancel)?;
        }
        tasks.close();

        let outcome = tokio::select! {
            () = shutdown => Ok(()),
            r = follow => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::anyhow!("{e}")),
                Err(e) => Err(anyhow::anyhow!("the route follower panicked: {e}")),
            },
            e = super::stopped("proxy", plain) => Err(e),
        };
        eprintln!("hangar proxy: shutting down");
        cancel.cancel();
        tasks.wait().await;
        outcome
    }
}
