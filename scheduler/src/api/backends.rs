//! Backend endpoints: connect, list, status, events (SSE), terminate.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use hangar_core::api::{BackendList, ConnectRequest, TerminateRequest};
use hangar_core::{BackendState, TerminationReason};
use hangar_store::WatchEvent;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::auth::may_touch;
use super::extract::ApiJson;
use super::handles::Handles;
use crate::api_tokens::Caller;
use crate::error::ApiError;
use crate::records::{BackendRecord, backend_key};

/// `POST /v1/connect`.
pub(crate) async fn connect(
    State(h): State<Handles>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<ConnectRequest>,
) -> Result<Response, ApiError> {
    let resp = h
        .connector
        .connect_as(req, &caller)
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
pub(crate) struct ListQuery {
    status: Option<String>,
    /// Only keys containing this (`namespace/name`).
    key: Option<String>,
    /// Only backends of this pool.
    pool: Option<String>,
    /// Only backends on this drone.
    drone: Option<String>,
    /// Paging (any of the three asks for a [`BackendPage`]): at most `limit` backends
    /// (default [`PAGE`], at most [`MAX_PAGE`]), after the cursor `after` (a page's `next`),
    /// `order` `asc` (oldest first, the default) or `desc`.
    limit: Option<usize>,
    after: Option<String>,
    order: Option<String>,
}

/// A page's default size.
const PAGE: usize = 100;
/// The largest page.
const MAX_PAGE: usize = 1000;

/// `GET /v1/backends?limit=…`: one page of the backends that match, in creation order.
#[derive(serde::Serialize)]
pub(crate) struct BackendPage {
    backends: Vec<hangar_core::api::BackendView>,
    /// How many backends match every filter.
    total: usize,
    /// Backends matching the filters but `status`, by state name.
    counts: std::collections::BTreeMap<&'static str, usize>,
    /// The cursor of the next page (`after=`), if there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// A page cursor: the last backend's creation time and id.
fn cursor(r: &BackendRecord) -> String {
    format!("{}-{}", r.created_at, r.id)
}

fn parse_cursor(c: &str) -> Option<(u64, &str)> {
    let (at, id) = c.split_once('-')?;
    Some((at.parse().ok()?, id))
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

/// `GET /v1/backends[?status=…&key=…&pool=…&drone=…][&limit=…&after=…&order=…]`.
pub(crate) async fn list(
    State(h): State<Handles>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    if let Some(s) = &q.status
        && !STATUSES.contains(&s.as_str())
    {
        return Err(ApiError::BadRequest(format!(
            "invalid field `status`: {s:?} is not one of {}",
            STATUSES.join(", ")
        )));
    }
    let paged = q.limit.is_some() || q.after.is_some() || q.order.is_some();
    let desc = match q.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => {
            return Err(ApiError::BadRequest(format!(
                "invalid field `order`: {o:?} is not one of asc, desc"
            )));
        }
    };
    let after = match q.after.as_deref() {
        None => None,
        Some(c) => Some(parse_cursor(c).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "invalid field `after`: {c:?} is not a cursor: pass a page's `next`"
            ))
        })?),
    };
    let mut counts = std::collections::BTreeMap::new();
    let mut backends: Vec<BackendRecord> = h
        .backends
        .list()
        .await?
        .into_iter()
        .map(|s| s.record)
        .filter(|r| {
            q.key.as_deref().is_none_or(|k| {
                r.key
                    .as_ref()
                    .is_some_and(|key| key.to_string().contains(k))
            }) && q
                .pool
                .as_deref()
                .is_none_or(|p| r.pool.as_ref().is_some_and(|m| m.name == p))
                && q.drone
                    .as_deref()
                    .is_none_or(|d| r.drone.as_deref() == Some(d))
        })
        .inspect(|r| *counts.entry(r.state.name()).or_insert(0) += 1)
        .filter(|r| match q.status.as_deref() {
            None => true,
            Some("live") => r.state.is_live(),
            Some(s) => r.state.name() == s,
        })
        .collect();
    backends.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    if !paged {
        return Ok(Json(BackendList {
            backends: backends.iter().map(BackendRecord::view).collect(),
        })
        .into_response());
    }
    if desc {
        backends.reverse();
    }
    let total = backends.len();
    let start = after.map_or(0, |(at, id)| {
        backends.partition_point(|r| {
            let here = (r.created_at, r.id.as_str());
            if desc {
                here >= (at, id)
            } else {
                here <= (at, id)
            }
        })
    });
    let limit = q.limit.unwrap_or(PAGE).min(MAX_PAGE);
    let end = (start + limit).min(total);
    let page = &backends[start..end];
    let next = (end < total && !page.is_empty())
        .then(|| page.last().map(cursor))
        .flatten();
    Ok(Json(BackendPage {
        backends: page.iter().map(BackendRecord::view).collect(),
        total,
        counts,
        next,
    })
    .into_response())
}

/// `GET /v1/backends/{id}`.
pub(crate) async fn get(
    State(h): State<Handles>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match h.backends.get(&id).await? {
        Some((rec, _)) => {
            own(&caller, &rec, false)?;
            Ok(Json(rec.view()).into_response())
        }
        None => Err(ApiError::NotFound(format!("no backend {id}"))),
    }
}

/// Refuses a `connect` token a backend that is not its own.
fn own(caller: &Caller, rec: &BackendRecord, write: bool) -> Result<(), ApiError> {
    if may_touch(caller, rec, write) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "backend {} is not this token's: a connect token reaches only the backends of its namespace or the ones it created",
            rec.id
        )))
    }
}

/// `POST /v1/backends/{id}/terminate`.
pub(crate) async fn terminate(
    State(h): State<Handles>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<TerminateRequest>,
) -> Result<Response, ApiError> {
    if !caller.is_admin() {
        let Some((rec, _)) = h.backends.get(&id).await? else {
            return Err(ApiError::NotFound(format!("no backend {id}")));
        };
        own(&caller, &rec, true)?;
    }
    let rec = h
        .backends
        .terminate(&id, TerminationReason::Requested, req.hard)
        .await?;
    Ok((http::StatusCode::ACCEPTED, Json(rec.view())).into_response())
}

/// Streams the backend's state as Server-Sent Events (`event: state`, data = the backend's
/// JSON): the current state first, then one event per state change, ending after
/// `terminated`.
pub(crate) async fn events(
    State(h): State<Handles>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let key = backend_key(&id);
    let Some(kv) = h.store.get(&key).await? else {
        return Err(ApiError::NotFound(format!("no backend {id}")));
    };
    let first: BackendRecord = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Internal(format!("backend record {id} is unreadable: {e}")))?;
    own(&caller, &first, false)?;
    let mut watch = h.store.watch(&key, kv.mod_revision + 1).await?;
    let (tx, rx) = mpsc::channel(16);
    let cancel = h.cancel.clone();
    h.tasks.spawn(async move {
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
