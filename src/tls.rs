//! TLS set-up shared by every role that runs a proxy: validate the flags, load the
//! certificates, and reload them on SIGHUP or when the files change.

use std::sync::Arc;
use std::time::Duration;

use hangar_proxy::{CertStore, TlsFiles};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ConfigError;
use crate::cli::TlsArgs;

/// How often certificate files are checked for changes.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// Validates the TLS flags and loads the certificates (before anything is bound).
pub fn load(args: &TlsArgs) -> anyhow::Result<Option<Arc<CertStore>>> {
    match (&args.https, &args.tls_cert, &args.tls_key) {
        (None, None, None) => Ok(None),
        (Some(_), Some(cert), Some(key)) => {
            let store = CertStore::load(vec![TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }])
            .map_err(|e| ConfigError(e.to_string()))?;
            Ok(Some(store))
        }
        _ => Err(ConfigError(
            "--https, --tls-cert and --tls-key go together: give all three for an HTTPS listener"
                .into(),
        )
        .into()),
    }
}

/// Reloads certificates on SIGHUP and on file changes until `cancel` fires.
pub fn spawn_reloader(store: Arc<CertStore>, tasks: &TaskTracker, cancel: CancellationToken) {
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
