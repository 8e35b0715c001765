//! The request path: name → route → token → wait for ready → forward (or upgrade).
//!
//! Reads the route snapshot once per request and never holds it across an `.await`; verifies
//! tokens locally; waits for starting backends on the route handle's change signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hangar_core::BackendId;
use hangar_core::route::{
    self, RequestNames, Route, RouteState, RouteTable, TOKEN_COOKIE, TOKEN_QUERY, cookie_value,
    strip_cookie, strip_query_param,
};
use hangar_core::token::TokenError;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use crate::activity::ActivityTracker;
use crate::config::ProxyConfig;
use crate::error::ProxyError;
use crate::forward::{
    CountingBody, CountingIo, GuardedBody, ProxyBody, is_upgrade, strip_hangar_headers,
    strip_hop_by_hop,
};
use crate::pool::SendError;
use crate::route_table::RouteHandle;

/// State shared by every connection of one proxy.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) routes: Arc<RouteHandle>,
    pub(crate) activity: Arc<ActivityTracker>,
    pub(crate) pool: Arc<crate::pool::UpstreamPool>,
    /// Owns the copy tasks of upgraded connections so shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    /// Revoked tokens, replaced whole by the feed (checked only when non-empty).
    pub(crate) revocations: arc_swap::ArcSwap<hangar_core::feed::Revocations>,
}

/// Where the request's token came from: decides what is stripped and whether a cookie is set.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TokenSource {
    Bearer,
    Query,
    Cookie,
}

const X_HANGAR_BACKEND_ID: header::HeaderName =
    header::HeaderName::from_static("x-hangar-backend-id");
const X_HANGAR_USER: header::HeaderName = header::HeaderName::from_static("x-hangar-user");
const X_HANGAR_ERROR: header::HeaderName = header::HeaderName::from_static("x-hangar-error");
const X_FORWARDED_FOR: header::HeaderName = header::HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: header::HeaderName = header::HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: header::HeaderName = header::HeaderName::from_static("x-forwarded-host");

/// Serves one request; never fails (errors become responses).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    match proxy(&shared, req, peer, tls).await {
        Ok(resp) => Ok(resp),
        Err(e) => {
            tracing::debug!(error = %e, code = e.code(), blame = ?e.blame(), "proxy error");
            shared.activity.count_error(e.code());
            Ok(error_response(&e))
        }
    }
}

pub(crate) fn error_response(e: &ProxyError) -> Response<ProxyBody> {
    let body = format!("hangar: {e}\n");
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_HANGAR_ERROR, HeaderValue::from_static(e.code()));
    resp
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Finds the route the request names.
fn find_route(shared: &Shared, req: &Request<Incoming>) -> Result<Route, ProxyError> {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().host());
    let header_name = headers
        .get(route::BACKEND_HEADER)
        .and_then(|v| v.to_str().ok());
    // Requests rarely carry more than one Cookie header; more than eight are ignored.
    let mut cookie_buf = [""; 8];
    let mut n = 0;
    for v in headers
        .get_all(header::COOKIE)
        .iter()
        .take(cookie_buf.len())
    {
        if let Ok(s) = v.to_str() {
            cookie_buf[n] = s;
            n += 1;
        }
    }
    let names = RequestNames {
        host,
        header: header_name,
        cookies: &cookie_buf[..n],
    };
    let Some((name, mode)) = route::resolve(&names, &shared.config.domain) else {
        shared.activity.count_request(None);
        return Err(ProxyError::NoBackendNamed {
            domain: shared.config.domain.clone(),
        });
    };
    shared.activity.count_request(Some(mode));
    let table = shared.routes.load();
    match table.get(&name) {
        Some(r) => Ok(r.clone()),
        None => Err(ProxyError::UnknownBackend(name.into_owned())),
    }
}

/// Finds and verifies the token; returns the user, where the token came from and, when it came
/// in the query string, the token itself (it becomes a cookie on the response).
fn check_token(
    shared: &Shared,
    req: &Request<Incoming>,
    backend: &BackendId,
) -> Result<(String, TokenSource, Option<String>), ProxyError> {
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        // A bearer token that is not a Hangar token belongs to the backend.
        .filter(|t| t.starts_with("v1."));
    let (token, source) = if let Some(t) = bearer {
        (t, TokenSource::Bearer)
    } else if let Some(t) = req
        .uri()
        .query()
        .and_then(|q| route::query_value(q, TOKEN_QUERY))
    {
        (t, TokenSource::Query)
    } else if let Some(t) = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|c| cookie_value(c, TOKEN_COOKIE))
    {
        (t, TokenSource::Cookie)
    } else {
        return Err(ProxyError::Token(TokenError::Missing));
    };
    let claims = shared
        .config
        .token_key
        .verify(token, backend.as_str(), unix_now())
        .map_err(ProxyError::Token)?;
    {
        let revoked = shared.revocations.load();
        if !revoked.is_empty()
            && revoked.is_revoked(
                backend.as_str(),
                &claims.user,
                hangar_core::token::token_id(token).unwrap_or_default(),
            )
        {
            return Err(ProxyError::Token(TokenError::Revoked));
        }
    }
    let query_token = (source == TokenSource::Query).then(|| token.to_string());
    Ok((claims.user, source, query_token))
}

/// Re-evaluates `settle` on the current route table, and again on every publish, until it
/// returns `Some` or `deadline` passes (`None`). Subscribes before the first read, so a publish
/// between the read and the wait is not missed.
async fn wait_on_routes<T>(
    shared: &Shared,
    deadline: tokio::time::Instant,
    mut settle: impl FnMut(&RouteTable) -> Option<T>,
) -> Option<T> {
    let mut changes = shared.routes.subscribe();
    loop {
        if let Some(t) = settle(&shared.routes.load()) {
            return Some(t);
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            // The wait ran out or the route handle went away (shutdown).
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}

/// Waits (up to `unknown_grace`) for a route the table does not have yet: a remote proxy's
/// feed may trail the scheduler by a moment after a connect.
async fn wait_known(shared: &Shared, name: String) -> Result<Route, ProxyError> {
    let deadline = tokio::time::Instant::now() + shared.config.unknown_grace;
    wait_on_routes(shared, deadline, |t| t.get(&name).cloned())
        .await
        .ok_or(ProxyError::UnknownBackend(name))
}

/// Waits until `backend` is ready, gone or the start wait runs out.
async fn wait_ready(shared: &Shared, backend: &BackendId) -> Result<SocketAddr, ProxyError> {
    let deadline = tokio::time::Instant::now() + shared.config.start_wait;
    wait_on_routes(shared, deadline, |t| match t.get(backend.as_str()) {
        None => Some(Err(ProxyError::UnknownBackend(backend.to_string()))),
        Some(r) if r.state == RouteState::Gone => Some(Err(ProxyError::Gone(backend.to_string()))),
        Some(Route {
            state: RouteState::Ready,
            address: Some(addr),
            ..
        }) => Some(Ok(*addr)),
        Some(_) => None,
    })
    .await
    .unwrap_or_else(|| {
        Err(ProxyError::StartTimeout {
            backend: backend.to_string(),
            waited: shared.config.start_wait,
        })
    })
}

async fn proxy(
    shared: &Arc<Shared>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    let route = match find_route(shared, &req) {
        Err(ProxyError::UnknownBackend(name))
            if !shared.config.unknown_grace.is_zero()
                && hangar_core::ids::validate_label(&name).is_ok() =>
        {
            wait_known(shared, name).await?
        }
        other => other?,
    };
    let (user, token_source, query_token) = if route.public {
        (String::new(), None, None)
    } else {
        let (user, source, query_token) = check_token(shared, &req, &route.backend)?;
        (user, Some(source), query_token)
    };
    let address = match (route.state, route.address) {
        (RouteState::Ready, Some(addr)) => addr,
        (RouteState::Gone, _) => return Err(ProxyError::Gone(route.backend.to_string())),
        _ => wait_ready(shared, &route.backend).await?,
    };
    let mut guard = shared.activity.begin_route(&route);

    // Rewrite the request for the backend.
    let upgrade = is_upgrade(req.headers());
    let original_host = req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    // Origin-form request target for the backend. Only a query carrying the token is
    // rebuilt; otherwise the client's path and query are reused as they are (no allocation).
    let stripped = match (req.uri().query(), token_source) {
        (Some(q), Some(TokenSource::Query)) => {
            let path = req.uri().path();
            Some(match strip_query_param(q, TOKEN_QUERY) {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            })
        }
        _ => None,
    };
    let uri = match stripped {
        Some(pq) => Uri::try_from(pq),
        None => match req.uri().path_and_query() {
            Some(pq) => Ok(Uri::from(pq.clone())),
            None => Uri::try_from("/"),
        },
    }
    .map_err(|_| ProxyError::BadRequest("request target cannot be forwarded"))?;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    {
        let h = req.headers_mut();
        strip_hop_by_hop(h, upgrade);
        strip_hangar_headers(h);
        match token_source {
            Some(TokenSource::Bearer) => {
                h.remove(header::AUTHORIZATION);
            }
            Some(TokenSource::Cookie) => strip_token_cookie(h),
            _ => {}
        }
        if let Ok(v) = HeaderValue::from_str(route.backend.as_str()) {
            h.insert(X_HANGAR_BACKEND_ID, v);
        }
        if !user.is_empty()
            && let Ok(v) = HeaderValue::from_str(&user)
        {
            h.insert(X_HANGAR_USER, v);
        }
        if let Some(host) = original_host {
            if !h.contains_key(header::HOST) {
                h.insert(header::HOST, host.clone());
            }
            h.insert(X_FORWARDED_HOST, host);
        }
        append_forwarded_for(h, peer);
        h.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        );
    }

    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let backend = route.backend.clone();
    let sent = tokio::time::timeout(
        shared.config.upstream_response_timeout,
        shared.pool.send(
            address,
            req.map(|body| CountingBody::new(body, guard.received_bytes())),
        ),
    )
    .await;
    if !matches!(sent, Ok(Ok(_))) {
        // The answer the client gets: 502 or 504 (see the arms below).
        guard.set_status(match sent {
            Err(_) => StatusCode::GATEWAY_TIMEOUT.as_u16(),
            _ => StatusCode::BAD_GATEWAY.as_u16(),
        });
    }
    let (mut resp, checkout) = match sent {
        Ok(Ok(x)) => x,
        Ok(Err(SendError::Connect(detail))) => {
            return Err(ProxyError::UpstreamConnect {
                backend: backend.to_string(),
                detail,
            });
        }
        Ok(Err(SendError::Request(e))) => {
            return Err(ProxyError::Upstream {
                backend: backend.to_string(),
                detail: error_chain(&e),
            });
        }
        Err(_) => {
            return Err(ProxyError::UpstreamTimeout {
                backend: backend.to_string(),
                waited: shared.config.upstream_response_timeout,
            });
        }
    };

    guard.set_status(resp.status().as_u16());
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        // The request is answered; from here the guard counts an open WebSocket.
        guard.upgraded();
        // The guard moves into the copy task: an open WebSocket keeps the backend busy.
        shared.tasks.spawn(async move {
            let mut guard = guard;
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let mut client = CountingIo::new(TokioIo::new(client));
                    let mut upstream = TokioIo::new(upstream);
                    if let Err(e) = tokio::io::copy_bidirectional_with_sizes(
                        &mut client,
                        &mut upstream,
                        16 * 1024,
                        16 * 1024,
                    )
                    .await
                    {
                        tracing::debug!(backend = %backend, error = %e, "upgraded connection ended");
                    }
                    guard.add_upgraded_bytes(client.read, client.written);
                }
                Err(e) => tracing::debug!(backend = %backend, error = %e, "upgrade failed"),
            }
        });
        let (parts, body) = resp.into_parts();
        return Ok(Response::from_parts(
            parts,
            // The upgraded connection is the copy task's now; it never returns to the pool.
            Either::Left(GuardedBody::new(body, None, None)),
        ));
    }

    strip_hop_by_hop(resp.headers_mut(), false);
    if let Some(token) = query_token
        && let Ok(v) = HeaderValue::from_str(&format!(
            "{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax"
        ))
    {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    let (parts, body) = resp.into_parts();
    Ok(Response::from_parts(
        parts,
        Either::Left(GuardedBody::new(body, Some(guard), Some(checkout))),
    ))
}

/// Removes the token cookie from every Cookie header (the backend never sees the token).
fn strip_token_cookie(h: &mut http::HeaderMap) {
    let values: Vec<String> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| strip_cookie(v, TOKEN_COOKIE))
        .collect();
    h.remove(header::COOKIE);
    for v in values {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.append(header::COOKIE, v);
        }
    }
}

fn append_forwarded_for(h: &mut http::HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_string();
    let value = match h.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(X_FORWARDED_FOR, v);
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
