//! Writes on any instance: a write (any method but GET and HEAD) that reaches an instance
//! which does not lead is forwarded, one hop, to the leader's API, and the leader's answer is
//! returned as it is. While no leader is known the request waits (bounded) for one, then
//! gets 503 with `Retry-After`. A forwarded request that reaches another follower (the
//! leader changed meanwhile) is not forwarded again.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::Method;
use http_body_util::{BodyExt, Full};

use super::extract::MAX_BODY;
use super::handles::Handles;
use crate::error::ApiError;
use crate::leader::{LeaderRecord, Role};

/// Marks a request an instance forwarded (its value: that instance's id).
pub const FORWARDED_BY: &str = "x-hangar-forwarded-by";

/// Longest a write waits for a leader to be known.
const LEADER_WAIT: Duration = Duration::from_secs(5);
/// Longest the leader may take to answer a forwarded write (a connect may wait for a key's
/// previous backend to stop).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a write goes: here (this instance leads) or to the leader.
enum Target {
    Here,
    Leader(LeaderRecord),
    Nobody,
}

async fn target(h: &Handles) -> Target {
    let mut roles = h.leadership.subscribe();
    let wait = async {
        loop {
            match &*roles.borrow_and_update() {
                Role::Leader { .. } => return Target::Here,
                Role::Follower {
                    leader: Some(leader),
                } if leader.instance != h.leadership.instance() => {
                    return Target::Leader(leader.clone());
                }
                Role::Follower { .. } => {}
            }
            if roles.changed().await.is_err() {
                return Target::Nobody;
            }
        }
    };
    tokio::time::timeout(LEADER_WAIT, wait)
        .await
        .unwrap_or(Target::Nobody)
}

/// The middleware: serves reads and a leader's writes here, forwards other writes.
pub async fn writes_to_leader(State(h): State<Handles>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD) || h.leadership.token().is_some() {
        return next.run(req).await;
    }
    if req.headers().contains_key(FORWARDED_BY) {
        return ApiError::Fenced(
            "this instance does not lead either (the leader changed while the request was forwarded): retry"
                .into(),
        )
        .into_response();
    }
    let leader = match target(&h).await {
        Target::Here => return next.run(req).await,
        Target::Leader(l) => l,
        Target::Nobody => {
            return ApiError::Fenced(format!(
                "no leader is elected right now (waited {LEADER_WAIT:?}): retry shortly"
            ))
            .into_response();
        }
    };
    match forward(&h, &leader, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn forward(h: &Handles, leader: &LeaderRecord, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| ApiError::BadRequest(format!("cannot read request body: {e}")))?;
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let uri: http::Uri = format!("{}{path}", leader.api_url.trim_end_matches('/'))
        .parse()
        .map_err(|e| ApiError::Internal(format!("the leader's API url is invalid: {e}")))?;
    let mut out = http::Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        if name != http::header::HOST && name != http::header::CONNECTION {
            out = out.header(name, value);
        }
    }
    let out = out
        .header(FORWARDED_BY, h.leadership.instance())
        .body(Full::new(body))
        .map_err(|e| ApiError::Internal(format!("cannot build the forwarded request: {e}")))?;
    let unreachable = |e: String| {
        ApiError::Fenced(format!(
            "the leader {} at {} did not answer ({e}): retry",
            leader.instance, leader.api_url
        ))
    };
    let response = tokio::time::timeout(FORWARD_TIMEOUT, h.forwarder.request(out))
        .await
        .map_err(|_| unreachable(format!("no answer within {FORWARD_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    let mut r = Response::from_parts(parts, Body::from(body));
    // The body is whole now: the leader's framing does not apply.
    r.headers_mut().remove(http::header::TRANSFER_ENCODING);
    Ok(r)
}
