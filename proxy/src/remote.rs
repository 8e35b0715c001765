//! A remote data plane: follows a scheduler's route feed (`GET /v1/routes/feed`) and reports
//! activity back (`POST /v1/activity`), so proxies can run on other hosts than the scheduler.
//!
//! The follower applies a snapshot or deltas to the proxy's [`RouteHandle`] and revocations
//! to its revocation set. When the scheduler is unreachable it keeps serving the routes it has
//! and reconnects with backoff, resuming from its last revision (the scheduler sends only the
//! deltas since, or a snapshot if it no longer has them).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hangar_core::activity::ActivityBatch;
use hangar_core::feed::FeedMessage;
use hangar_core::route::RouteTable;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use crate::listener::Proxy;

/// The scheduler pings every 5 s; silence for this long means the connection is dead.
const SILENCE: Duration = Duration::from_secs(15);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// Longest feed line accepted (a snapshot of many routes is one line).
const MAX_LINE: usize = 256 * 1024 * 1024;

/// Where the scheduler is and how to authenticate.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// `http://host:port` of the scheduler's API.
    pub scheduler_url: String,
    /// The cluster secret (the scheduler's `--drone-secret`).
    pub secret: String,
    /// This proxy's name in activity reports.
    pub name: String,
    /// How often activity is reported.
    pub activity_interval: Duration,
    /// The TLS client settings (trusted roots: the system's and `hangar proxy --ca`) for
    /// `https://` scheduler URLs.
    pub tls: std::sync::Arc<rustls::ClientConfig>,
}

/// Why following failed for good.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the scheduler refused this proxy: {0}")]
    Refused(String),
    #[error("invalid scheduler url {0:?}: it must start with http:// or https://")]
    BadUrl(String),
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

enum Failure {
    Retry(String),
    Fatal(String),
}

impl Proxy {
    /// Follows the scheduler's route feed and reports activity until `cancel` fires or the
    /// scheduler refuses this proxy's secret.
    pub async fn follow(
        &self,
        cfg: RemoteConfig,
        cancel: CancellationToken,
    ) -> Result<(), RemoteError> {
        // Several control-plane instances, comma-separated: any of them serves the feed (it
        // resumes from the last revision on whichever it reaches next).
        let bases: Vec<String> = cfg
            .scheduler_url
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if bases.is_empty() {
            return Err(RemoteError::BadUrl(cfg.scheduler_url.clone()));
        }
        if let Some(bad) = bases
            .iter()
            .find(|b| !b.starts_with("http://") && !b.starts_with("https://"))
        {
            return Err(RemoteError::BadUrl(bad.clone()));
        }
        // The instance followed now; activity goes there too.
        let current = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*cfg.tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
        let reporter = {
            let client = client.clone();
            let cfg = cfg.clone();
            let bases = bases.clone();
            let current = current.clone();
            let activity = self.activity();
            let cancel = cancel.clone();
            async move {
                let mut tick = tokio::time::interval(cfg.activity_interval);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let batch = ActivityBatch {
                        proxy: cfg.name.clone(),
                        reports: activity.snapshot(),
                    };
                    if batch.reports.is_empty() {
                        continue;
                    }
                    let body = serde_json::to_vec(&batch).unwrap_or_default();
                    let base =
                        &bases[current.load(std::sync::atomic::Ordering::Relaxed) % bases.len()];
                    let req = Request::post(format!("{base}/v1/activity"))
                        .header("authorization", format!("Bearer {}", cfg.secret))
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)));
                    if let Ok(req) = req {
                        match tokio::time::timeout(Duration::from_secs(5), client.request(req))
                            .await
                        {
                            Ok(Ok(resp)) if resp.status().is_success() => {}
                            Ok(Ok(resp)) => {
                                tracing::warn!(status = %resp.status(), "activity report refused")
                            }
                            _ => tracing::debug!(
                                "activity report failed; the scheduler is unreachable"
                            ),
                        }
                    }
                }
            }
        };
        let follower = async {
            let mut backoff = BACKOFF_MIN;
            loop {
                let from = self.routes().load().revision;
                let at = current.load(std::sync::atomic::Ordering::Relaxed);
                let base = &bases[at % bases.len()];
                match self
                    .follow_once(&client, base, &cfg.secret, from, &cancel)
                    .await
                {
                    Ok(()) => return Ok(()),
                    Err(Failure::Fatal(why)) => return Err(RemoteError::Refused(why)),
                    Err(Failure::Retry(why)) => {
                        tracing::warn!(scheduler = %base, error = %why, retry_in = ?backoff, "route feed interrupted; serving known routes meanwhile");
                        current.store(at + 1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        };
        let (r, ()) = tokio::join!(follower, reporter);
        r
    }

    /// One feed connection; returns `Ok` only on cancellation.
    async fn follow_once(
        &self,
        client: &HttpClient,
        base: &str,
        secret: &str,
        from: u64,
        cancel: &CancellationToken,
    ) -> Result<(), Failure> {
        let req = Request::get(format!("{base}/v1/routes/feed?from={from}"))
            .header("authorization", format!("Bearer {secret}"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| Failure::Fatal(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
            .await
            .map_err(|_| Failure::Retry("no answer within 5s".into()))?
            .map_err(|e| Failure::Retry(e.to_string()))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(Failure::Fatal(String::from_utf8_lossy(&body).into_owned()));
        }
        if !status.is_success() {
            return Err(Failure::Retry(format!("feed answered {status}")));
        }
        tracing::info!(scheduler = %base, from, "following the route feed");
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        loop {
            let frame = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                f = tokio::time::timeout(SILENCE, body.frame()) => f,
            };
            let frame = match frame {
                Err(_) => return Err(Failure::Retry("the feed went silent".into())),
                Ok(None) => return Err(Failure::Retry("the scheduler closed the feed".into())),
                Ok(Some(Err(e))) => return Err(Failure::Retry(e.to_string())),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            if buf.len() > MAX_LINE {
                return Err(Failure::Retry("a feed line is too long".into()));
            }
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line = buf.split_to(pos + 1);
                let msg: FeedMessage = match serde_json::from_slice(&line[..pos]) {
                    Ok(m) => m,
                    Err(e) => return Err(Failure::Retry(format!("unreadable feed line: {e}"))),
                };
                self.apply_feed(msg)?;
            }
        }
    }

    fn apply_feed(&self, msg: FeedMessage) -> Result<(), Failure> {
        let routes = self.routes();
        match msg {
            FeedMessage::Snapshot {
                revision,
                routes: list,
            } => {
                let table = RouteTable::new(revision, list);
                self.activity().prune(&table);
                routes.publish(Arc::new(table));
            }
            FeedMessage::Delta {
                from,
                revision,
                upserts,
                removals,
            } => {
                let current = routes.load_full();
                if current.revision != from {
                    return Err(Failure::Retry(format!(
                        "delta from revision {from} does not apply on {}",
                        current.revision
                    )));
                }
                let table = current.apply(revision, &upserts, &removals);
                if !removals.is_empty() {
                    self.activity().prune_lazily(&table);
                }
                routes.publish(Arc::new(table));
            }
            FeedMessage::Revocations(set) => self.publish_revocations(Arc::new(set)),
            FeedMessage::Ping { .. } => {}
        }
        Ok(())
    }
}
