//! The HTTP API (JSON): connect, list, status, events (SSE), terminate, activity reports,
//! health. Served from an already-bound listener until the shutdown token fires.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use hangar_core::activity::ActivityBatch;
use hangar_core::api::{BackendList, ConnectRequest, TerminateRequest};
use hangar_core::{BackendState, TerminationReason};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::records::{BackendRecord, backend_key};
use crate::scheduler::{Inner, Scheduler};
use hangar_store::WatchEvent;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// A JSON body whose errors are API errors naming the offending field. An empty body is `{}`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("cannot read request body: {e}")))?;
        let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
            Bytes::from_static(b"{}")
        } else {
            bytes
        };
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de)
            .map(ApiJson)
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if inner.is_syntax() || inner.is_eof() {
                    ApiError::BadRequest(format!("malformed JSON: {inner}"))
                } else if path == "." {
                    ApiError::BadRequest(format!("invalid request: {inner}"))
                } else {
                    ApiError::BadRequest(format!("invalid field `{path}`: {inner}"))
                }
            })
    }
}

type Shared = Arc<Inner>;

impl Scheduler {
    /// The API's router (exposed for embedding and tests).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/connect", post(connect))
            .route("/v1/backends", get(list_backends))
            .route("/v1/backends/{id}", get(get_backend))
            .route("/v1/backends/{id}/events", get(backend_events))
            .route("/v1/backends/{id}/terminate", post(terminate))
            .route("/v1/activity", post(activity))
            .route("/v1/routes/feed", get(crate::feed::route_feed))
            .route("/v1/tokens/revoke", post(crate::feed::revoke))
            .route("/v1/hot", get(crate::monitor::hot))
            .route("/v1/drones", get(crate::drone_api::list))
            .route("/v1/drones/connect", get(crate::drone_api::connect))
            .route("/v1/drones/{name}/drain", post(crate::drone_api::drain))
            .route("/v1/drones/{name}/undrain", post(crate::drone_api::undrain))
            .route(
                "/v1/dns/acme-challenge",
                get(crate::dns_records::list)
                    .post(crate::dns_records::post)
                    .delete(crate::dns_records::delete),
            )
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .fallback(|| async {
                ApiError::NotFound("no such API endpoint: see the README for the API".into())
            })
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
            .with_state(self.inner.clone())
    }

    /// Serves the API on `listener` until `shutdown` fires, finishing in-flight requests.
    pub async fn serve_api(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    }
}

async fn connect(
    State(inner): State<Shared>,
    ApiJson(req): ApiJson<ConnectRequest>,
) -> Result<Response, ApiError> {
    let resp = inner
        .connect(req)
        .await
        .inspect_err(|e| crate::metrics::connect(e.code()))?;
    crate::metrics::connect(if resp.spawned { "spawned" } else { "reused" });
    let status = if resp.spawned {
        http::StatusCode::CREATED
    } else {
        http::StatusCode::OK
    };
    Ok((status, Json(resp)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
}

const STATUSES: [&str; 7] = [
    "scheduled",
    "starting",
    "waiting",
    "ready",
    "terminating",
    "terminated",
    "live",
];

async fn list_backends(
    State(inner): State<Shared>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<BackendList>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    if let Some(s) = &q.status
        && !STATUSES.contains(&s.as_str())
    {
        return Err(ApiError::BadRequest(format!(
            "invalid field `status`: {s:?} is not one of {}",
            STATUSES.join(", ")
        )));
    }
    let mut backends: Vec<BackendRecord> = crate::records::list_backends(inner.store.as_ref())
        .await?
        .into_iter()
        .map(|s| s.record)
        .filter(|r| match q.status.as_deref() {
            None => true,
            Some("live") => r.state.is_live(),
            Some(s) => r.state.name() == s,
        })
        .collect();
    backends.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Ok(Json(BackendList {
        backends: backends.iter().map(BackendRecord::view).collect(),
    }))
}

async fn get_backend(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match inner.get_backend(&id).await? {
        Some((rec, _)) => Ok(Json(rec.view()).into_response()),
        None => Err(ApiError::NotFound(format!("no backend {id}"))),
    }
}

async fn terminate(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<TerminateRequest>,
) -> Result<Response, ApiError> {
    let rec = inner
        .terminate(&id, TerminationReason::Requested, req.hard)
        .await?;
    Ok((http::StatusCode::ACCEPTED, Json(rec.view())).into_response())
}

async fn activity(
    State(inner): State<Shared>,
    headers: http::HeaderMap,
    ApiJson(batch): ApiJson<ActivityBatch>,
) -> Result<http::StatusCode, ApiError> {
    // Remote proxies report with the cluster secret; without one nobody may report (a forged
    // report could keep backends alive forever).
    crate::feed::check_cluster_secret(&inner, &headers)?;
    inner.record_activity(&batch);
    Ok(http::StatusCode::NO_CONTENT)
}

async fn readyz(State(inner): State<Shared>) -> Result<&'static str, ApiError> {
    let ready = inner
        .routes_ready
        .load(std::sync::atomic::Ordering::Acquire);
    if !ready {
        return Err(ApiError::Unavailable("routes are not loaded yet".into()));
    }
    if inner.drones.is_empty() {
        return Err(ApiError::Unavailable("no drone is connected".into()));
    }
    Ok("ready")
}

/// Streams the backend's state as Server-Sent Events (`event: state`, data = the backend's
/// JSON): the current state first, then one event per state change, ending after
/// `terminated`.
async fn backend_events(
    State(inner): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let key = backend_key(&id);
    let Some(kv) = inner.store.get(&key).await? else {
        return Err(ApiError::NotFound(format!("no backend {id}")));
    };
    let first: BackendRecord = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Internal(format!("backend record {id} is unreadable: {e}")))?;
    let mut watch = inner.store.watch(&key, kv.mod_revision + 1).await?;
    let (tx, rx) = mpsc::channel(16);
    let cancel = inner.cancel.clone();
    inner.tasks.spawn(async move {
        let send = |rec: &BackendRecord| {
            Event::default()
                .event("state")
                .json_data(rec.view())
                .unwrap_or_else(|_| Event::default().event("error"))
        };
        if tx.send(Ok(send(&first))).await.is_err() {
            return;
        }
        let mut last: BackendState = first.state.clone();
        if !last.is_live() {
            return;
        }
        loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                ev = watch.recv() => ev,
            };
            match ev {
                Some(WatchEvent::Put(kv)) if kv.key == key => {
                    let Ok(rec) = serde_json::from_slice::<BackendRecord>(&kv.value) else {
                        continue;
                    };
                    if rec.state != last {
                        last = rec.state.clone();
                        if tx.send(Ok(send(&rec))).await.is_err() || !last.is_live() {
                            return;
                        }
                    }
                }
                Some(WatchEvent::Delete { key: k, .. }) if k == key => return,
                Some(_) => {}
                None => return,
            }
        }
    });
    Ok(
        Sse::new(ReceiverStream::<Result<Event, Infallible>>::new(rx))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
    )
}
