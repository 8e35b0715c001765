//! `GET /v1/backends/{id}/logs?follow=true|false&tail=N`: a backend's output (stdout and
//! stderr), streamed as `text/plain` from the drone that runs or ran it.
//!
//! The drone's session may be held by this instance (the request goes over it:
//! [`crate::drone_logs`]) or by another one, which the drone's record names: the request is
//! then forwarded, one hop, to that instance's API with the caller's credential, and its
//! answer streamed back. The status comes from the drone's first answer (404 when it keeps no
//! logs of the backend); once the body has begun, a failure ends it with a last line that
//! says why. Without `tail` everything the drone kept is sent; with `follow=true` the body
//! goes on with new output until the backend has ended or the client goes away (which
//! cancels the request on the drone).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hangar_core::drone::LogsFailure;
use http::HeaderMap;
use http_body_util::Full;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::auth::may_touch;
use super::forward::FORWARDED_BY;
use super::handles::Handles;
use crate::api_tokens::Caller;
use crate::drone_logs::{LogPiece, LogStream};
use crate::error::ApiError;
use crate::leader::{INSTANCES_PREFIX, LeaderRecord};
use crate::records::{DroneRecord, drone_key};

/// How long the drone may take to answer at all: a drone older than this scheduler never
/// answers (it cannot read the request).
const FIRST_ANSWER: Duration = Duration::from_secs(10);
/// How long the instance holding the drone's session may take to answer a forwarded request
/// (its own wait for the drone included).
const FORWARD_HEAD: Duration = Duration::from_secs(15);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogsQuery {
    #[serde(default)]
    follow: bool,
    /// The last N lines only.
    tail: Option<u64>,
}

/// `GET /v1/backends/{id}/logs`.
pub(crate) async fn logs(
    State(h): State<Handles>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    uri: http::Uri,
    headers: HeaderMap,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    let Some((rec, _)) = h.backends.get(&id).await? else {
        return Err(ApiError::NotFound(format!("no backend {id}")));
    };
    if !may_touch(&caller, &rec, false) {
        return Err(ApiError::Forbidden(format!(
            "backend {id} is not this token's: a connect token reaches only the backends of its namespace or the ones it created"
        )));
    }
    let Some(drone) = rec.drone.clone() else {
        return Err(ApiError::NotFound(format!(
            "backend {id} was never placed on a drone, so it has no logs"
        )));
    };
    if let Some(conn) = h.drones.get(&drone)
        && let Some(stream) = h
            .sessions
            .logs()
            .open(&conn, rec.id.clone(), q.tail, q.follow)
    {
        return respond(&h, &drone, stream).await;
    }
    // Held by another instance: one hop there (a forwarded request is never forwarded again).
    if !headers.contains_key(FORWARDED_BY)
        && let Some((instance, api_url)) = holder(&h, &drone).await?
    {
        return forward(&h, &drone, &instance, &api_url, &uri, &headers).await;
    }
    Err(ApiError::Unavailable(format!(
        "drone {drone}, where backend {id} runs or ran, is not connected to the control plane: its logs can be read once it reconnects"
    )))
}

/// The instance holding `drone`'s session and its API URL, if another instance does.
async fn holder(h: &Handles, drone: &str) -> Result<Option<(String, String)>, ApiError> {
    let Some(kv) = h.store.get(&drone_key(drone)).await? else {
        return Ok(None);
    };
    let Ok(record) = serde_json::from_slice::<DroneRecord>(&kv.value) else {
        return Ok(None);
    };
    let Some(instance) = record
        .instance
        .filter(|i| record.lease.is_some() && i != h.leadership.instance())
    else {
        return Ok(None);
    };
    let Some(kv) = h
        .store
        .get(&format!("{INSTANCES_PREFIX}{instance}"))
        .await?
    else {
        return Ok(None);
    };
    Ok(serde_json::from_slice::<LeaderRecord>(&kv.value)
        .ok()
        .map(|r| (instance, r.api_url)))
}

/// Forwards the request to the instance holding the drone's session and streams its answer.
async fn forward(
    h: &Handles,
    drone: &str,
    instance: &str,
    api_url: &str,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let target: http::Uri = format!("{}{path}", api_url.trim_end_matches('/'))
        .parse()
        .map_err(|e| {
            ApiError::Internal(format!("instance {instance}'s API url is invalid: {e}"))
        })?;
    let mut out = http::Request::get(target).header(FORWARDED_BY, h.leadership.instance());
    if let Some(auth) = headers.get(http::header::AUTHORIZATION) {
        out = out.header(http::header::AUTHORIZATION, auth);
    }
    let out = out
        .body(Full::new(Bytes::new()))
        .map_err(|e| ApiError::Internal(format!("cannot build the forwarded request: {e}")))?;
    let unreachable = |why: String| {
        ApiError::Unavailable(format!(
            "instance {instance} at {api_url}, which holds drone {drone}'s session, did not answer ({why}): retry"
        ))
    };
    let response = tokio::time::timeout(FORWARD_HEAD, h.forwarder.request(out))
        .await
        .map_err(|_| unreachable(format!("no answer within {FORWARD_HEAD:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut parts, body) = response.into_parts();
    // Framed anew on this connection.
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    parts.headers.remove(http::header::CONNECTION);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Waits for the drone's first answer, which decides the status, then streams the rest.
async fn respond(h: &Handles, drone: &str, mut stream: LogStream) -> Result<Response, ApiError> {
    let first = match tokio::time::timeout(FIRST_ANSWER, stream.next()).await {
        Err(_) => {
            return Err(ApiError::Unavailable(format!(
                "drone {drone} did not answer the log request within {FIRST_ANSWER:?} (a drone older than the control plane cannot): upgrade it, or retry"
            )));
        }
        Ok(None) => {
            return Err(ApiError::Unavailable(format!(
                "the session of drone {drone} ended: retry once it has reconnected"
            )));
        }
        Ok(Some(LogPiece::End(Some(LogsFailure::NotFound { message })))) => {
            return Err(ApiError::NotFound(message));
        }
        Ok(Some(LogPiece::End(Some(LogsFailure::Failed { message })))) => {
            return Err(ApiError::Unavailable(message));
        }
        Ok(Some(first)) => first,
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    let cancel = h.cancel.clone();
    h.tasks.spawn(async move {
        // Whether the body so far ends at a line's end (a closing note starts a line).
        let mut at_line_start = true;
        let mut next = Some(first);
        loop {
            let piece = match next.take() {
                Some(piece) => piece,
                None => tokio::select! {
                    () = cancel.cancelled() => LogPiece::End(Some(LogsFailure::Failed {
                        message: "this control-plane instance is shutting down".into(),
                    })),
                    () = tx.closed() => return,
                    piece = stream.next() => match piece {
                        Some(piece) => piece,
                        None => return,
                    },
                },
            };
            let text = match piece {
                LogPiece::Data(data) if data.is_empty() => continue,
                LogPiece::Data(data) => {
                    at_line_start = data.ends_with('\n');
                    data
                }
                LogPiece::End(None) => return,
                LogPiece::End(Some(failure)) => {
                    let sep = if at_line_start { "" } else { "\n" };
                    let note = format!(
                        "{sep}hangar: the log stream ended early: {}\n",
                        failure.message()
                    );
                    let _ = tx.send(Ok(Bytes::from(note))).await;
                    return;
                }
            };
            // A client that stops reading holds the request until it goes or we shut down.
            tokio::select! {
                sent = tx.send(Ok(Bytes::from(text))) => if sent.is_err() { return },
                () = cancel.cancelled() => return,
            }
        }
    });
    Ok((
        [
            (http::header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (http::header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(ReceiverStream::new(rx)),
    )
        .into_response())
}
