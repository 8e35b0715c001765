//! TLS termination with rustls: certificates and keys from PEM files, chosen by SNI (wildcard
//! certificates match one label), TLS 1.2 and 1.3 only, ALPN `h2` and `http/1.1`.
//!
//! Certificates live behind an `ArcSwap`, so [`CertStore::reload`] (on SIGHUP, or when
//! [`CertStore::watch`] sees a file change) replaces them for new handshakes while open
//! connections keep the session they negotiated. A reload that fails keeps the old
//! certificates and reports why.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_util::sync::CancellationToken;

/// One certificate chain and its private key, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no TLS certificate configured: give at least one certificate and key")]
    Empty,
    #[error("cannot read TLS certificate {path}: {detail}")]
    Cert { path: PathBuf, detail: String },
    #[error("TLS certificate file {path} holds no certificate (expected PEM 'BEGIN CERTIFICATE')")]
    NoCert { path: PathBuf },
    #[error(
        "cannot read TLS private key {path}: {detail} (expected a PEM PKCS#8, PKCS#1 or SEC1 key)"
    )]
    Key { path: PathBuf, detail: String },
    #[error("TLS key {key} does not fit certificate {cert}: {detail}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

struct Entry {
    key: Arc<CertifiedKey>,
}

/// The loaded certificates, replaced whole on reload.
struct Loaded {
    entries: Vec<Entry>,
}

/// Certificates for the proxy's TLS listener, reloadable without dropping connections.
pub struct CertStore {
    files: Vec<TlsFiles>,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Loaded>,
    /// Modification times seen at the last load, to detect changes when polling.
    seen: Mutex<Vec<Option<SystemTime>>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("files", &self.files)
            .finish()
    }
}

fn load_one(files: &TlsFiles, provider: &CryptoProvider) -> Result<Entry, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| TlsError::Cert {
            path: files.cert.clone(),
            detail: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert {
            path: files.cert.clone(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: files.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.clone(),
        detail: e.to_string(),
    })?;
    let ck = CertifiedKey::from_der(certs, key, provider).map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        detail: e.to_string(),
    })?;
    Ok(Entry { key: Arc::new(ck) })
}

fn mtimes(files: &[TlsFiles]) -> Vec<Option<SystemTime>> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    files.iter().flat_map(|f| [m(&f.cert), m(&f.key)]).collect()
}

impl CertStore {
    /// Loads every certificate; the first is the default when no SNI name matches.
    pub fn load(files: Vec<TlsFiles>) -> Result<Arc<Self>, TlsError> {
        if files.is_empty() {
            return Err(TlsError::Empty);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let seen = mtimes(&files);
        let entries = files
            .iter()
            .map(|f| load_one(f, &provider))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(CertStore {
            files,
            provider,
            current: ArcSwap::from_pointee(Loaded { entries }),
            seen: Mutex::new(seen),
        }))
    }

    /// Re-reads every file. On error the previous certificates stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let seen = mtimes(&self.files);
        let entries = self
            .files
            .iter()
            .map(|f| load_one(f, &self.provider))
            .collect::<Result<Vec<_>, _>>()?;
        self.current.store(Arc::new(Loaded { entries }));
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        tracing::info!(certificates = self.files.len(), "TLS certificates reloaded");
        Ok(())
    }

    /// Reloads if any file's modification time changed since the last load.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = mtimes(&self.files);
        let changed = *self.seen.lock().unwrap_or_else(|e| e.into_inner()) != now;
        if changed {
            self.reload()?;
        }
        Ok(changed)
    }

    /// Polls the files every `interval` and reloads on change, until `cancel` fires.
    pub async fn watch(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.reload_if_changed() {
                tracing::error!(error = %e, "TLS reload failed; keeping the previous certificates");
            }
        }
    }

    /// A rustls server configuration using these certificates (TLS 1.2 and 1.3, ALPN h2 and
    /// http/1.1).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.0.current.load();
        let first = loaded.entries.first()?;
        if loaded.entries.len() == 1 {
            return Some(first.key.clone());
        }
        let Some(sni) = hello.server_name() else {
            return Some(first.key.clone());
        };
        let Ok(name) = ServerName::try_from(sni) else {
            return Some(first.key.clone());
        };
        loaded
            .entries
            .iter()
            .find(|e| {
                e.key.cert.first().is_some_and(|der| {
                    webpki::EndEntityCert::try_from(der)
                        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
                })
            })
            .or(Some(first))
            .map(|e| e.key.clone())
    }
}
