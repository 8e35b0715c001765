//! What remote proxies follow and report: `GET /v1/routes/feed?from=<revision>` streams
//! newline-delimited [`FeedMessage`]s (the route deltas since the proxy's revision when they
//! are still kept, or a snapshot when not, then live deltas, revocations and pings),
//! `POST /v1/activity` takes a proxy's activity report, and `POST /v1/tokens/revoke` stores a
//! revocation. All but the revocation need the cluster secret.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hangar_core::activity::ActivityBatch;
use hangar_core::feed::FeedMessage;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::extract::ApiJson;
use super::handles::Handles;
use crate::error::ApiError;
use crate::revocations::RevokeRequest;

/// A ping every so often lets both ends notice a dead connection.
const PING_EVERY: Duration = Duration::from_secs(5);

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
    State(h): State<Handles>,
    query: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    // Subscribe before reading the current table so no delta falls in between.
    let mut live = h.routes.follow_deltas();
    let mut revocations = h.revocations.subscribe();
    let current = h.routes.current();
    let cancel = h.cancel.clone();
    let routes = h.routes.clone();
    h.tasks.spawn(async move {
        let mut at = current.revision;
        let first: Vec<FeedMessage> = if q.from != 0 && q.from == current.revision {
            Vec::new()
        } else if let Some(chain) = (q.from != 0)
            .then(|| routes.deltas_between(q.from, current.revision))
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
                        let t = routes.current();
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
/// `POST /v1/tokens/revoke`.
pub(crate) async fn revoke(
    State(h): State<Handles>,
    ApiJson(req): ApiJson<RevokeRequest>,
) -> Result<Response, ApiError> {
    let revocation = h.revocations.revoke(req).await?;
    Ok((
        http::StatusCode::CREATED,
        Json(serde_json::json!({"revoked": revocation})),
    )
        .into_response())
}

/// `POST /v1/activity`: a remote proxy's activity report.
pub(crate) async fn activity(
    State(h): State<Handles>,
    ApiJson(batch): ApiJson<ActivityBatch>,
) -> Result<http::StatusCode, ApiError> {
    // Remote proxies report with the cluster secret or a proxy token (`api::auth`): a forged
    // report could keep backends alive forever.
    h.activity.record(&batch);
    h.hot.observe_activity(&batch);
    h.traffic.observe_activity(&batch);
    Ok(http::StatusCode::NO_CONTENT)
}
