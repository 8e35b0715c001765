//! TLS set-up shared by every role that runs a proxy: validate the flags, load the
//! certificates, serve HTTPS, and reload the certificates on SIGHUP or when the files change.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hangar_proxy::{CertStore, Proxy, TlsFiles};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ConfigError;
use crate::cli::TlsArgs;

/// How often certificate files are checked for changes.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// A validated HTTPS listener, not bound yet: where it listens and the loaded certificates.
pub struct HttpsSetup {
    pub addr: SocketAddr,
    certs: Arc<CertStore>,
}

/// Validates the TLS flags and loads the certificates (before anything is bound); `None`
/// without `--https`.
pub fn load(args: &TlsArgs) -> anyhow::Result<Option<HttpsSetup>> {
    match (&args.https, &args.tls_cert, &args.tls_key) {
        (None, None, None) => Ok(None),
        (Some(addr), Some(cert), Some(key)) => {
            let certs = CertStore::load(vec![TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }])
            .map_err(|e| ConfigError(e.to_string()))?;
            // Built here only to check it before anything is bound; `serve` builds the one it
            // uses (a rustls type, which this crate does not name).
            certs
                .server_config()
                .map_err(|e| ConfigError(e.to_string()))?;
            Ok(Some(HttpsSetup { addr: *addr, certs }))
        }
        _ => Err(ConfigError(
            "--https, --tls-cert and --tls-key go together: give all three for an HTTPS listener"
                .into(),
        )
        .into()),
    }
}

/// Serves HTTPS with `proxy` on the bound `listener`, and reloads the certificates on SIGHUP
/// and on file changes, all as tasks of `tasks` until `cancel` fires.
pub fn serve(
    https: HttpsSetup,
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let tls = https
        .certs
        .server_config()
        .map_err(|e| ConfigError(e.to_string()))?;
    spawn_reloader(https.certs, tasks, cancel.clone());
    let cancel = cancel.clone();
    tasks.spawn(async move {
        if let Err(e) = proxy.run_tls(listener, tls, cancel).await {
            tracing::error!(error = %e, "https listener failed");
        }
    });
    Ok(())
}

/// Reloads certificates on SIGHUP and on file changes until `cancel` fires.
fn spawn_reloader(store: Arc<CertStore>, tasks: &TaskTracker, cancel: CancellationToken) {
    tasks.spawn(store.clone().watch(WATCH_EVERY, cancel.clone()));
    tasks.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = hup.recv() => match store.reload() {
                    Ok(()) => tracing::info!("certificates reloaded on SIGHUP"),
                    Err(e) => tracing::error!(error = %e, "certificate reload failed; keeping the previous certificates"),
                },
            }
        }
    });
}
