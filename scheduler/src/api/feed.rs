//! What remote proxies follow: route deltas and token revocations.
//!
//! [`DeltaLog`] turns the route table's successive snapshots into deltas, keeps the recent
//! ones, and fans them out; `GET /v1/routes/feed?from=<revision>` streams newline-delimited
//! [`FeedMessage`]s: the deltas since the proxy's revision when they are still kept (or a
//! snapshot when not), then live deltas, revocations and pings. Revocations live in the store
//! under [`REVOCATIONS_PREFIX`], each on a lease as long as the token lifetime (after that
//! every token it could match has expired anyway), and are published as one immutable set.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hangar_core::BackendId;
use hangar_core::feed::{FeedMessage, Revocation, Revocations};
use hangar_core::route::RouteTable;
use hangar_core::token::{TokenError, token_id};
use http::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::api::ApiJson;
use crate::error::ApiError;
use crate::scheduler::Inner;

/// Prefix of revocation records.
pub const REVOCATIONS_PREFIX: &str = "/hangar/revocations/";
/// Deltas kept for proxies that reconnect.
const DELTAS_KEPT: usize = 4096;
/// A ping every so often lets both ends notice a dead connection.
const PING_EVERY: Duration = Duration::from_secs(5);

/// One route delta.
#[derive(Clone, Debug)]
pub struct Delta {
    from: u64,
    revision: u64,
    upserts: Vec<hangar_core::route::Route>,
    removals: Vec<BackendId>,
}

impl Delta {
    fn message(&self) -> FeedMessage {
        FeedMessage::Delta {
            from: self.from,
            revision: self.revision,
            upserts: self.upserts.clone(),
            removals: self.removals.clone(),
        }
    }
}

/// Recent route deltas and their live fan-out.
#[derive(Debug)]
pub struct DeltaLog {
    kept: Mutex<VecDeque<Arc<Delta>>>,
    live: broadcast::Sender<Arc<Delta>>,
}

impl Default for DeltaLog {
    fn default() -> Self {
        DeltaLog {
            kept: Mutex::new(VecDeque::new()),
            live: broadcast::channel(1024).0,
        }
    }
}

impl DeltaLog {
    fn push(&self, d: Delta) {
        let d = Arc::new(d);
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() == DELTAS_KEPT {
            kept.pop_front();
        }
        kept.push_back(d.clone());
        drop(kept);
        let _ = self.live.send(d);
    }

    /// The chain of kept deltas from `from` up to `to`, if it is complete.
    fn chain(&self, from: u64, to: u64) -> Option<Vec<Arc<Delta>>> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let start = kept.iter().position(|d| d.from == from)?;
        let chain: Vec<Arc<Delta>> = kept.iter().skip(start).cloned().collect();
        let mut at = from;
        for d in &chain {
            if d.from != at {
                return None;
            }
            at = d.revision;
        }
        (at == to).then_some(chain)
    }
}

/// Follows the route table and records a delta per published snapshot.
pub(crate) async fn record_deltas(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut rx = inner.routes.subscribe();
    let mut last: Arc<RouteTable> = rx.borrow_and_update().clone();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
        let next = rx.borrow_and_update().clone();
        let (upserts, removals) = last.diff(&next);
        if next.revision != last.revision || !upserts.is_empty() || !removals.is_empty() {
            inner.deltas.push(Delta {
                from: last.revision,
                revision: next.revision,
                upserts,
                removals,
            });
        }
        last = next;
    }
}

/// Follows revocation records and publishes the set.
pub(crate) async fn follow_revocations(inner: Arc<Inner>, cancel: CancellationToken) {
    hangar_store::mirror::mirror_prefix::<Revocation>(
        inner.store.as_ref(),
        REVOCATIONS_PREFIX,
        cancel,
        |items, _| {
            inner
                .revocations
                .send_replace(Arc::new(Revocations::new(items.values().cloned())));
        },
    )
    .await
}

/// Checks the cluster secret that drones and remote proxies present.
pub(crate) fn check_cluster_secret(inner: &Inner, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(secret) = inner.config.drone_secret.as_deref() else {
        return Err(ApiError::Forbidden(
            "this scheduler accepts no remote proxies or drones: start it with --drone-secret"
                .into(),
        ));
    };
    let given = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(secret.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(
            "cluster secret is missing or wrong: pass the scheduler's --drone-secret".into(),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FeedQuery {
    #[serde(default)]
    from: u64,
}

fn line(m: &FeedMessage) -> Result<Bytes, Infallible> {
    let mut v = serde_json::to_vec(m).unwrap_or_default();
    v.push(b'\n');
    Ok(Bytes::from(v))
}

/// `GET /v1/routes/feed?from=<revision>`.
pub(crate) async fn route_feed(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    query: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    check_cluster_secret(&inner, &headers)?;
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    // Subscribe before reading the current table so no delta falls in between.
    let mut live = inner.deltas.live.subscribe();
    let mut revocations = inner.revocations.subscribe();
    let current = inner.routes.borrow().clone();
    let cancel = inner.cancel.clone();
    let log = inner.clone();
    inner.tasks.spawn(async move {
        let mut at = current.revision;
        let first: Vec<FeedMessage> = if q.from != 0 && q.from == current.revision {
            Vec::new()
        } else if let Some(chain) = (q.from != 0)
            .then(|| log.deltas.chain(q.from, current.revision))
            .flatten()
        {
            chain.iter().map(|d| d.message()).collect()
        } else {
            vec![FeedMessage::Snapshot {
                revision: current.revision,
                routes: current.routes().cloned().collect(),
            }]
        };
        let revoked = FeedMessage::Revocations((**revocations.borrow_and_update()).clone());
        for m in first.iter().chain(std::iter::once(&revoked)) {
            if tx.send(line(m)).await.is_err() {
                return;
            }
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                _ = ping.tick() => FeedMessage::Ping { revision: at },
                d = live.recv() => match d {
                    Ok(d) if d.revision <= at => continue,
                    Ok(d) if d.from == at => { at = d.revision; d.message() }
                    // Lagged, or a gap: start over with a snapshot.
                    _ => {
                        let t = log.routes.borrow().clone();
                        at = t.revision;
                        FeedMessage::Snapshot { revision: t.revision, routes: t.routes().cloned().collect() }
                    }
                },
                r = revocations.changed() => match r {
                    Ok(()) => {
                        let set = (**revocations.borrow_and_update()).clone();
                        FeedMessage::Revocations(set)
                    }
                    Err(_) => return,
                },
            };
            if tx.send(line(&msg)).await.is_err() {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(http::header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// `POST /v1/tokens/revoke`: `{token}` revokes one token; `{backend, user?}` every token of a
/// user for a backend, or every token for it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevokeRequest {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

pub(crate) async fn revoke(
    State(inner): State<Arc<Inner>>,
    ApiJson(req): ApiJson<RevokeRequest>,
) -> Result<Response, ApiError> {
    let now_s = inner.clock.now_ms() / 1000;
    let revocation = match (&req.token, &req.backend) {
        (Some(token), None) => {
            if req.user.is_some() {
                return Err(ApiError::BadRequest(
                    "give either token, or backend with an optional user".into(),
                ));
            }
            // Which backend it is for is read from the (verified) token itself.
            let backend = token_backend(&inner, token, now_s)?;
            let id = token_id(token)
                .ok_or_else(|| ApiError::BadRequest("invalid field `token`: malformed".into()))?;
            Revocation::Token {
                backend,
                token_id: id.to_string(),
            }
        }
        (None, Some(b)) => {
            let backend = BackendId::parse(b)
                .map_err(|e| ApiError::BadRequest(format!("invalid field `backend`: {e}")))?;
            match &req.user {
                Some(u) => Revocation::User {
                    backend,
                    user: u.clone(),
                },
                None => Revocation::Backend { backend },
            }
        }
        _ => {
            return Err(ApiError::BadRequest(
                "give either token, or backend with an optional user".into(),
            ));
        }
    };
    let value = serde_json::to_vec(&revocation).unwrap_or_default();
    let key = format!("{REVOCATIONS_PREFIX}{:x}", Sha256::digest(&value));
    let lease = inner.store.lease_grant(inner.config.token_ttl).await?;
    inner.store.put(&key, value, Some(lease)).await?;
    tracing::info!(?revocation, "token revoked");
    Ok((
        http::StatusCode::CREATED,
        Json(serde_json::json!({"revoked": revocation})),
    )
        .into_response())
}

fn token_backend(inner: &Inner, token: &str, now_s: u64) -> Result<BackendId, ApiError> {
    // Verify against the backend the payload names (a forged token fails the signature).
    let claimed = hangar_core::token::peek_backend(token)
        .ok_or_else(|| ApiError::BadRequest("invalid field `token`: malformed".into()))?;
    match inner.token_key.verify(token, &claimed, now_s) {
        Ok(_) | Err(TokenError::Expired) => BackendId::parse(&claimed)
            .map_err(|e| ApiError::BadRequest(format!("invalid field `token`: {e}"))),
        Err(e) => Err(ApiError::BadRequest(format!("invalid field `token`: {e}"))),
    }
}

/// A receiver of the revocation set (for the in-process proxy).
pub type RevocationsRx = watch::Receiver<Arc<Revocations>>;
