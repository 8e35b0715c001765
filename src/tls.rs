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

/// `--api-tls-cert` and `--api-tls-key`: the API served over HTTPS (HTTP/1.1), certificates
/// reloaded like the proxy's.
pub struct ApiTls {
    certs: Arc<CertStore>,
}

/// Validates the API's TLS flags and loads the certificate; `None` without them.
pub fn load_api(
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> anyhow::Result<Option<ApiTls>> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => {
            let certs = CertStore::load(vec![TlsFiles {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            }])
            .map_err(|e| ConfigError(format!("--api-tls-cert/--api-tls-key: {e}")))?;
            certs
                .server_config()
                .map_err(|e| ConfigError(format!("--api-tls-cert/--api-tls-key: {e}")))?;
            Ok(Some(ApiTls { certs }))
        }
        _ => Err(ConfigError(
            "--api-tls-cert and --api-tls-key go together: give both to serve the API over HTTPS"
                .into(),
        )
        .into()),
    }
}

impl ApiTls {
    /// The acceptor (HTTP/1.1 only: the API speaks nothing else), with certificate reloads
    /// running as tasks of `tasks` until `cancel` fires.
    pub fn acceptor(
        self,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
    ) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
        let mut cfg = (*self
            .certs
            .server_config()
            .map_err(|e| ConfigError(e.to_string()))?)
        .clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        spawn_reloader(self.certs, tasks, cancel.clone());
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
    }
}

/// How long a client may take to finish its TLS handshake with the API.
const API_HANDSHAKE: Duration = Duration::from_secs(10);

/// A TLS listener for axum: handshakes run as tasks of their own (a slow client never holds
/// up the others) and finished connections are handed to the server.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        SocketAddr,
    )>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(
        tcp: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let handshakes = tasks.clone();
        tasks.spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    accepted = tcp.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "api accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                handshakes.spawn(async move {
                    match tokio::time::timeout(API_HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "api tls handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "api tls handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop ended (shutdown): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The TLS client settings every component uses to reach `https://` URLs: the system's
/// trusted roots plus, with `--ca FILE`, the certificates in that PEM file (a private CA).
pub fn client_config(ca: Option<&std::path::Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system certificate rustls cannot use is skipped, as every TLS client does.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| ConfigError(format!("--ca {}: {e}", path.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| ConfigError(format!("--ca {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(
                ConfigError(format!("--ca {} holds no PEM certificate", path.display())).into(),
            );
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                ConfigError(format!(
                    "--ca {}: not a usable CA certificate: {e}",
                    path.display()
                ))
            })?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| anyhow::anyhow!("tls: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}
