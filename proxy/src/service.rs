//! The request path: name → route → token → wait for ready → forward (or upgrade).
//!
//! Reads the route snapshot once per request and never holds it across an `.await`; verifies
//! tokens locally; waits for starting backends on the route handle's change signal.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use hangar_core::BackendId;
use hangar_core::route::{
    self, RequestNames, Route, RouteMode, RouteState, RouteTable, TOKEN_COOKIE, TOKEN_QUERY,
    cookie_value, has_query_param, strip_cookie, strip_query_param,
};
use hangar_core::token::TokenError;
use http::StatusCode;
use http_body_util::{Either, Full};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::task::TaskTracker;

use crate::activity::ActivityTracker;
use crate::config::ProxyConfig;
use crate::error::ProxyError;
use crate::forward::{self, CountingBody, CountingIo, GuardedBody, is_upgrade};
use crate::h1::{self, RequestFraming};
use crate::head::{Known, ProxyResponse, RequestHead};
use crate::pool::{SendError, request_framing};
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
    /// Whether `revocations` holds any, set after each publish: a request reads the set only
    /// when it does (most of the time none are revoked, and loading the set is dearer).
    pub(crate) revoked_any: std::sync::atomic::AtomicBool,
    /// Tokens verified recently.
    pub(crate) verified: crate::token_cache::VerifiedTokens,
}

/// Where the request's token came from: decides what is stripped and whether a cookie is set.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TokenSource {
    Bearer,
    Query,
    Cookie,
}

/// The client side of a connection that switched protocols.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for T {}

/// Resolves to the client's connection once the `101` has been written to it.
pub(crate) type ClientUpgrade =
    Pin<Box<dyn Future<Output = Result<Box<dyn ClientIo>, String>> + Send>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where a client connection comes from, as its backend is told (`x-forwarded-for`,
/// `x-forwarded-proto`): formatted once per connection, not per request.
pub(crate) struct ClientInfo {
    ip: String,
    tls: bool,
}

impl ClientInfo {
    pub(crate) fn new(peer: SocketAddr, tls: bool) -> Self {
        ClientInfo {
            ip: peer.ip().to_string(),
            tls,
        }
    }
}

/// Serves one request, from whichever server read it: `on_upgrade` is called for a request
/// that asks to switch protocols and yields the client connection once the `101` is written.
/// Never fails: errors become responses.
pub(crate) async fn respond<H, B, U>(
    shared: &Arc<Shared>,
    head: &H,
    body: B,
    client: &ClientInfo,
    on_upgrade: U,
) -> ProxyResponse
where
    H: RequestHead,
    B: Body<Data = Bytes> + Unpin + Send,
    B::Error: Into<BoxError>,
    U: FnOnce() -> ClientUpgrade,
{
    match proxy(shared, head, body, client, on_upgrade).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(error = %e, code = e.code(), blame = ?e.blame(), "proxy error");
            shared.activity.count_error(e.code());
            error_response(&e)
        }
    }
}

pub(crate) fn error_response(e: &ProxyError) -> ProxyResponse {
    let mut fields = Vec::with_capacity(96);
    h1::write_header(&mut fields, b"content-type", b"text/plain; charset=utf-8");
    h1::write_header(&mut fields, b"cache-control", b"no-store");
    h1::write_header(&mut fields, b"x-hangar-error", e.code().as_bytes());
    ProxyResponse {
        status: e.status(),
        fields,
        has_date: false,
        body: Either::Right(Full::new(Bytes::from(format!("hangar: {e}\n")))),
    }
}

/// A field value as text (`None` if it is not UTF-8).
fn text(v: &[u8]) -> Option<&str> {
    if v.is_ascii() {
        // SAFETY: ASCII is UTF-8. The usual value (a host name, a cookie) is ASCII, and this
        // check is a few word-wide compares where `from_utf8`'s is a hundred instructions.
        #[allow(unsafe_code)]
        unsafe {
            Some(std::str::from_utf8_unchecked(v))
        }
    } else {
        std::str::from_utf8(v).ok()
    }
}

/// Finds the route the request names. The authority of an absolute-form target (or an HTTP/2
/// request's) names the host, ahead of any `Host` field (RFC 9112 §3.2.2, RFC 9113 §8.3.1).
fn find_route(shared: &Shared, head: &impl RequestHead) -> Result<Arc<Route>, ProxyError> {
    let domain = &shared.config.domain;
    let host = head
        .authority()
        .or_else(|| head.known(Known::Host).and_then(text));
    // A host that names a backend wins (see `route::resolve`): the header and cookies are
    // looked for only when it does not.
    // Requests rarely carry more than one Cookie header; more than eight are ignored.
    let mut cookie_buf = [""; 8];
    let resolved = match host.and_then(|h| route::host_name(h, domain)) {
        Some(name) => Some((name, RouteMode::Host)),
        None => {
            let mut n = 0;
            for v in head
                .known_all(Known::Cookie)
                .filter_map(text)
                .take(cookie_buf.len())
            {
                cookie_buf[n] = v;
                n += 1;
            }
            let names = RequestNames {
                // It named no backend: not looked at again.
                host: None,
                header: head.known(Known::HangarBackend).and_then(text),
                cookies: &cookie_buf[..n],
            };
            route::resolve(&names, domain)
        }
    };
    let Some((name, mode)) = resolved else {
        shared.activity.count_request(None);
        return Err(ProxyError::NoBackendNamed {
            domain: shared.config.domain.clone(),
        });
    };
    shared.activity.count_request(Some(mode));
    let table = shared.routes.load();
    match table.get_shared(&name) {
        Some(r) => Ok(r.clone()),
        None => Err(ProxyError::UnknownBackend(name.into_owned())),
    }
}

/// A request's verified token: who it names, and where it came from.
struct Verified<'h> {
    user: Arc<str>,
    /// The token itself when it came in the query string (it becomes a cookie on the
    /// response).
    query_token: Option<String>,
    /// The `Authorization` value that carried it as a bearer token (see
    /// [`Forwarding::verified_authorization`]).
    authorization: Option<&'h [u8]>,
}

/// Finds and verifies the token (see [`crate::token_cache`] for tokens verified before) at
/// `now` (seconds since the Unix epoch).
fn check_token<'h>(
    shared: &Shared,
    head: &'h impl RequestHead,
    backend: &BackendId,
    now: u64,
) -> Result<Verified<'h>, ProxyError> {
    let authorization = head.known(Known::Authorization);
    // The usual request carries a bearer token verified before: it is looked up by its bytes,
    // with no UTF-8 check (a cached token is ASCII, so bytes equal to one are that token, and
    // the whole value is ASCII). Anything else takes the path below, which reads the value as
    // text (and so trims any whitespace, not only ASCII's).
    let looked_up = authorization
        .and_then(|v| v.strip_prefix(b"Bearer "))
        .map(<[u8]>::trim_ascii)
        .filter(|t| t.starts_with(b"v1."));
    if let Some(t) = looked_up
        && let Some(user) = shared.verified.get(t, backend, now)
    {
        check_revocation(shared, backend, &user, t)?;
        return Ok(Verified {
            user,
            query_token: None,
            authorization,
        });
    }
    let bearer = authorization
        .and_then(text)
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        // A bearer token that is not a Hangar token belongs to the backend.
        .filter(|t| t.starts_with("v1."));
    let (token, source) = if let Some(t) = bearer {
        (t, TokenSource::Bearer)
    } else if let Some(t) = head
        .query()
        .and_then(|q| route::query_value(q, TOKEN_QUERY))
    {
        (t, TokenSource::Query)
    } else if let Some(t) = head
        .known_all(Known::Cookie)
        .filter_map(text)
        .find_map(|c| cookie_value(c, TOKEN_COOKIE))
    {
        (t, TokenSource::Cookie)
    } else {
        return Err(ProxyError::Token(TokenError::Missing));
    };
    // A token the lookup above missed is not looked up again.
    let cached = if looked_up == Some(token.as_bytes()) {
        None
    } else {
        shared.verified.get(token.as_bytes(), backend, now)
    };
    let user = match cached {
        Some(user) => user,
        None => {
            let claims = shared
                .config
                .token_key
                .verify(token, backend.as_str(), now)
                .map_err(ProxyError::Token)?;
            let user: Arc<str> = claims.user.into();
            shared
                .verified
                .insert(token, backend, user.clone(), claims.expires_at);
            user
        }
    };
    check_revocation(shared, backend, &user, token.as_bytes())?;
    Ok(Verified {
        user,
        query_token: (source == TokenSource::Query).then(|| token.to_string()),
        authorization: authorization.filter(|_| source == TokenSource::Bearer),
    })
}

/// Refuses a verified `token` of `user` for `backend` that has been revoked since.
fn check_revocation(
    shared: &Shared,
    backend: &BackendId,
    user: &str,
    token: &[u8],
) -> Result<(), ProxyError> {
    if !shared.revoked_any.load(Ordering::Acquire) {
        // None revoked, or a publish this request came just before.
        return Ok(());
    }
    let revoked = shared.revocations.load();
    if !revoked.is_empty()
        && revoked.is_revoked(
            backend.as_str(),
            user,
            std::str::from_utf8(token)
                .ok()
                .and_then(hangar_core::token::token_id)
                .unwrap_or_default(),
        )
    {
        return Err(ProxyError::Token(TokenError::Revoked));
    }
    Ok(())
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
async fn wait_known(shared: &Shared, name: String) -> Result<Arc<Route>, ProxyError> {
    let deadline = tokio::time::Instant::now() + shared.config.unknown_grace;
    wait_on_routes(shared, deadline, |t| t.get_shared(&name).cloned())
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

async fn proxy<H, B, U>(
    shared: &Arc<Shared>,
    req: &H,
    body: B,
    client: &ClientInfo,
    on_upgrade: U,
) -> Result<ProxyResponse, ProxyError>
where
    H: RequestHead,
    B: Body<Data = Bytes> + Unpin + Send,
    B::Error: Into<BoxError>,
    U: FnOnce() -> ClientUpgrade,
{
    let route = match find_route(shared, req) {
        Err(ProxyError::UnknownBackend(name))
            if !shared.config.unknown_grace.is_zero()
                && hangar_core::ids::validate_label(&name).is_ok() =>
        {
            // Boxed, like the wait below: rare paths that would otherwise make every
            // request's future larger (and costlier to move).
            Box::pin(wait_known(shared, name)).await?
        }
        other => other?,
    };
    // How the body goes to the backend, known from the head alone; a body announced larger
    // than the limit is refused before anything else is done for it (a chunked body is cut
    // off by `CountingBody` when it grows past the limit).
    let framing = request_framing(&body, req.known(Known::ContentLength).is_some());
    if let RequestFraming::Length(n) = framing
        && n > shared.config.max_body_bytes
    {
        return Err(ProxyError::BodyTooLarge(shared.config.max_body_bytes));
    }
    // One read of the wall clock for the token's expiry and the backend's activity (unless
    // the request waits for its backend to start).
    let now_ms = crate::activity::now_ms();
    let verified = if route.public {
        None
    } else {
        Some(check_token(shared, req, &route.backend, now_ms / 1000)?)
    };
    let (address, now_ms) = match (route.state, route.address) {
        (RouteState::Ready, Some(addr)) => (addr, now_ms),
        (RouteState::Gone, _) => return Err(ProxyError::Gone(route.backend.to_string())),
        _ => (
            Box::pin(wait_ready(shared, &route.backend)).await?,
            crate::activity::now_ms(),
        ),
    };
    let mut guard = shared.activity.begin_route_at(&route, now_ms);

    let upgrade = is_upgrade(req);
    let client_upgrade = upgrade.then(on_upgrade);
    let forwarding = Forwarding {
        backend: &route.backend,
        user: verified.as_ref().map_or("", |v| &v.user),
        verified_authorization: verified.as_ref().and_then(|v| v.authorization),
        key: route.key.as_deref(),
        epoch: route.epoch,
        client,
        upgrade,
    };
    let sent = shared
        .pool
        .send(
            address,
            req.method(),
            |out| write_upstream_head(out, req, &forwarding),
            framing,
            CountingBody::new(
                body,
                guard.received_bytes(),
                shared.config.client_body_timeout,
                shared.config.max_body_bytes,
            ),
        )
        .await;
    let backend = &route.backend;
    let upstream = match sent {
        Ok(x) => x,
        Err(e) => {
            // The answer the client gets: 502, 504 (or 400 for a broken request body).
            let err = match e {
                SendError::Connect(detail) => ProxyError::UpstreamConnect {
                    backend: backend.to_string(),
                    detail,
                },
                SendError::Request(detail) => ProxyError::Upstream {
                    backend: backend.to_string(),
                    detail,
                },
                SendError::ClientBody(detail) => {
                    tracing::debug!(backend = %backend, %detail, "request body failed");
                    ProxyError::BadRequest("the request body could not be read from the client")
                }
                SendError::ClientBodyStalled(waited) => ProxyError::BodyTimeout(waited),
                SendError::ClientBodyTooLarge(max) => ProxyError::BodyTooLarge(max),
                SendError::Timeout => ProxyError::UpstreamTimeout {
                    backend: backend.to_string(),
                    waited: shared.config.upstream_response_timeout,
                },
            };
            guard.set_status(err.status().as_u16());
            return Err(err);
        }
    };
    let mut resp = upstream.head;
    guard.set_status(resp.status.as_u16());
    if let Some(upstream_io) = upstream.upgraded {
        let Some(client_upgrade) = client_upgrade else {
            // The connection is dropped with `upstream_io`.
            guard.set_status(StatusCode::BAD_GATEWAY.as_u16());
            return Err(ProxyError::Upstream {
                backend: backend.to_string(),
                detail: "the backend switched protocols on a request that asked for no upgrade"
                    .into(),
            });
        };
        // The request is answered; from here the guard counts an open WebSocket.
        guard.upgraded();
        // The guard moves into the copy task: an open WebSocket keeps the backend busy.
        let idle = shared.config.upgrade_idle_timeout;
        let backend = backend.clone();
        shared.tasks.spawn(async move {
            let mut guard = guard;
            match client_upgrade.await {
                Ok(client) => {
                    let (read, written) = (AtomicU64::new(0), AtomicU64::new(0));
                    let mut client = CountingIo::new(client, &read, &written);
                    let mut upstream = *upstream_io;
                    let copy = tokio::io::copy_bidirectional_with_sizes(
                        &mut client,
                        &mut upstream,
                        16 * 1024,
                        16 * 1024,
                    );
                    let moved = || read.load(Ordering::Relaxed) + written.load(Ordering::Relaxed);
                    match forward::until_idle(copy, idle, moved).await {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::debug!(backend = %backend, error = %e, "upgraded connection ended");
                        }
                        None => {
                            tracing::debug!(backend = %backend, ?idle, "upgraded connection idle; closed");
                        }
                    }
                    // Both sides close here (the client's and the backend's sockets drop).
                    drop((client, upstream));
                    guard.add_upgraded_bytes(
                        read.load(Ordering::Relaxed),
                        written.load(Ordering::Relaxed),
                    );
                }
                Err(e) => tracing::debug!(backend = %backend, error = %e, "upgrade failed"),
            }
        });
        // The upgraded connection is the copy task's now; the response body is empty.
        return Ok(forwarded(resp, GuardedBody::new(upstream.body, None)));
    }

    if let Some(token) = verified.and_then(|v| v.query_token)
        && h1::is_header_value(token.as_bytes())
    {
        resp.fields.extend_from_slice(b"set-cookie: ");
        resp.fields.extend_from_slice(TOKEN_COOKIE.as_bytes());
        resp.fields.push(b'=');
        resp.fields.extend_from_slice(token.as_bytes());
        resp.fields
            .extend_from_slice(b"; Path=/; HttpOnly; SameSite=Lax\r\n");
    }
    Ok(forwarded(
        resp,
        GuardedBody::new(upstream.body, Some(guard)),
    ))
}

/// The response the client gets for a backend's head and body.
fn forwarded(head: h1::ResponseHead, body: GuardedBody) -> ProxyResponse {
    ProxyResponse {
        status: head.status,
        fields: head.fields,
        has_date: head.has_date,
        body: Either::Left(body),
    }
}

/// What the proxy adds to or removes from a request on its way to the backend.
pub(crate) struct Forwarding<'a> {
    pub(crate) backend: &'a BackendId,
    /// The token's user (empty for public backends).
    pub(crate) user: &'a str,
    /// The `Authorization` value (the very slice of the request head) whose bearer token the
    /// proxy verified: it is dropped without being read again. Every other `Authorization`
    /// value is still read for a token.
    pub(crate) verified_authorization: Option<&'a [u8]>,
    /// The route's key (`namespace/name`) and fencing epoch; `None` for a keyless backend,
    /// which gets neither header.
    pub(crate) key: Option<&'a str>,
    pub(crate) epoch: u64,
    pub(crate) client: &'a ClientInfo,
    pub(crate) upgrade: bool,
}

/// Whether an `Authorization` value is a bearer credential in Hangar's token format. A value
/// that is not UTF-8 is read lossily, as a backend might read it (it used to be forwarded
/// whole, token and all: found by fuzzing).
///
/// An ASCII value (every real one) is read in place: lossy decoding walks the value a
/// character at a time, which was 4% of the proxy's instructions per request. It reads the same
/// as [`carries_token_lossy`] (a property test holds the two together): in ASCII, each byte
/// is the character `str::trim_start` tests.
fn carries_token(value: &[u8]) -> bool {
    if !value.is_ascii() {
        return carries_token_lossy(value);
    }
    let start = value
        .iter()
        .position(|&c| !char::from(c).is_whitespace())
        .unwrap_or(value.len());
    let v = &value[start..];
    let Some(at) = v.iter().position(u8::is_ascii_whitespace) else {
        return false;
    };
    v[..at].eq_ignore_ascii_case(b"bearer")
        && hangar_core::token::looks_like_ascii_token(&v[at + 1..])
}

/// [`carries_token`] for any value: read lossily, as a backend might.
fn carries_token_lossy(value: &[u8]) -> bool {
    let v = String::from_utf8_lossy(value);
    let v = v.trim_start();
    let Some((scheme, credential)) = v.split_once(|c: char| c.is_ascii_whitespace()) else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && hangar_core::token::looks_like_token(credential)
}

/// The request head the backend gets, encoded directly (the client's head is read, never
/// rebuilt): the client's method and origin-form target (without a `hangar_token` query
/// parameter) and its end-to-end headers, minus hop-by-hop fields (RFC 9110 §7.6.1), inbound
/// `x-hangar-*` headers and the Hangar token; plus `x-hangar-backend-id`, `x-hangar-user`,
/// `x-hangar-key` and `x-hangar-epoch` (when the route has a key) and the `x-forwarded-*`
/// headers. The body framing header is added by the pool.
pub(crate) fn upstream_head(req: &impl RequestHead, f: &Forwarding<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    write_upstream_head(&mut out, req, f);
    out
}

/// [`upstream_head`], appended to `out` (the backend connection's write buffer).
pub(crate) fn write_upstream_head(out: &mut Vec<u8>, req: &impl RequestHead, f: &Forwarding<'_>) {
    // No backend ever sees a Hangar token, whoever's and wherever it is: the query parameter
    // (under any spelling of its name), every token cookie, any bearer credential in the
    // token format (whatever case, in any `Authorization` field).
    match req.query() {
        Some(q) if has_query_param(q, TOKEN_QUERY) => match strip_query_param(q, TOKEN_QUERY) {
            Some(q) => h1::write_request_line(out, req.method(), &format!("{}?{q}", req.path())),
            None => h1::write_request_line(out, req.method(), req.path()),
        },
        _ => h1::write_request_line(out, req.method(), req.target()),
    }

    // Read only when the request has a `Connection` field (most have none).
    let connection = req
        .known(Known::Connection)
        .is_some()
        .then(|| h1::ConnectionOptions::parse(req.known_all(Known::Connection)));
    let mut host = None;
    let mut forwarded_for = false;
    for (name, value, line) in req.field_lines() {
        match name {
            b"host" => {
                host.get_or_insert(value);
                continue;
            }
            b"x-forwarded-for" => {
                forwarded_for = true;
                continue;
            }
            // Ours replace whatever the client claimed (a backend reading the first value
            // would otherwise believe the client).
            b"content-length" | b"expect" | b"x-forwarded-proto" | b"x-forwarded-host"
            | b"forwarded" => continue,
            b"authorization"
                if f.verified_authorization
                    .is_some_and(|v| std::ptr::eq(v, value))
                    || carries_token(value) =>
            {
                continue;
            }
            // CGI, WSGI, Rack and PHP file `x-hangar_user` as `x-hangar-user`: names with
            // underscores are dropped, as nginx does by default.
            n if crate::h1_scan::contains_byte(n, b'_') => continue,
            b"upgrade" => {
                if f.upgrade {
                    h1::write_header(out, name, value);
                }
                continue;
            }
            _ => {}
        }
        if forward::is_hop_by_hop(name)
            || name.starts_with(b"x-hangar-")
            || connection.as_ref().is_some_and(|c| c.lists(name))
        {
            continue;
        }
        // A `Cookie` value that is not UTF-8 is searched too, lossily, as a backend might read
        // it: it used to be forwarded whole, token cookie and all (found by fuzzing). The
        // cookies kept from such a value go out with U+FFFD for the bytes that were not UTF-8.
        if name == b"cookie"
            && let v = String::from_utf8_lossy(value)
            && cookie_value(&v, TOKEN_COOKIE).is_some()
        {
            if let Some(rest) = strip_cookie(&v, TOKEN_COOKIE) {
                h1::write_header(out, b"cookie", rest.as_bytes());
            }
            continue;
        }
        // A line that came as it goes out is copied whole.
        match line {
            Some(line) => out.extend_from_slice(line),
            None => h1::write_header(out, name, value),
        }
    }
    if f.upgrade {
        h1::write_header(out, b"connection", b"upgrade");
    }

    // The authority of an absolute-form target replaces the Host field (RFC 9112 §3.2.2; the
    // target itself goes out in origin form); HTTP/2 clients name the host there too.
    // The fields added below go out in as few pieces as they can: each run of constant text
    // between two values (a line's end, the next name) is one copy.
    if let Some(host) = req.authority().map(str::as_bytes).or(host) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host);
        out.extend_from_slice(b"\r\nx-forwarded-host: ");
        out.extend_from_slice(host);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if forwarded_for {
        for prev in req.known_all(Known::XForwardedFor) {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(f.client.ip.as_bytes());
    let proto: &[u8] = if f.client.tls {
        b"\r\nx-forwarded-proto: https\r\nx-hangar-backend-id: "
    } else {
        b"\r\nx-forwarded-proto: http\r\nx-hangar-backend-id: "
    };
    out.extend_from_slice(proto);
    out.extend_from_slice(f.backend.as_str().as_bytes());
    out.extend_from_slice(b"\r\n");
    if !f.user.is_empty() && h1::is_header_value(f.user.as_bytes()) {
        h1::write_header(out, b"x-hangar-user", f.user.as_bytes());
    }
    // A backend started warm learns its key from the first request too; both or neither.
    if let Some(key) = f.key
        && !key.is_empty()
        && h1::is_header_value(key.as_bytes())
    {
        out.extend_from_slice(b"x-hangar-key: ");
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\r\nx-hangar-epoch: ");
        out.extend_from_slice(itoa::Buffer::new().format(f.epoch).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    /// What a request from `client` for `backend` forwards with no user, key or upgrade.
    fn plain<'a>(backend: &'a BackendId, client: &'a ClientInfo) -> Forwarding<'a> {
        Forwarding {
            backend,
            user: "",
            verified_authorization: None,
            key: None,
            epoch: 0,
            client,
            upgrade: false,
        }
    }

    fn head_for(req: Request<()>, user: &str, upgrade: bool) -> String {
        let (parts, ()) = req.into_parts();
        let backend = BackendId::parse("b1").unwrap();
        let client = ClientInfo::new("10.1.2.3:4567".parse().unwrap(), true);
        let f = Forwarding {
            user,
            upgrade,
            ..plain(&backend, &client)
        };
        let out = String::from_utf8(upstream_head(&parts, &f)).unwrap();
        // The same request read off the wire (a `RawRequest`, whose lines that came as they
        // go out are copied whole) gives the backend the same head.
        if let Some(raw) = wire_head(&parts) {
            let via_wire = String::from_utf8(upstream_head(&raw, &f)).unwrap();
            assert_eq!(via_wire, out, "read off the wire");
        }
        out
    }

    /// `parts` as an HTTP/1.1 client would send it, parsed back; `None` if the parser refuses
    /// it (no `Host`, say).
    fn wire_head(parts: &http::request::Parts) -> Option<crate::head::RawRequest> {
        let target = match parts.uri.authority() {
            Some(_) => parts.uri.to_string(),
            None => parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string(),
        };
        let mut raw = format!("{} {target} HTTP/1.1\r\n", parts.method).into_bytes();
        for (n, v) in &parts.headers {
            raw.extend_from_slice(n.as_str().as_bytes());
            raw.extend_from_slice(b": ");
            raw.extend_from_slice(v.as_bytes());
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"\r\n");
        let mut buf = bytes::BytesMut::from(&raw[..]);
        let parsed = crate::server::parse_request(&mut buf, 64 * 1024, &mut Vec::new()).ok()??;
        Some(parsed.head)
    }

    /// Lines that came as they go out are copied whole; any other spacing goes out as
    /// `name: value`, lower case, in the order the client sent them.
    #[test]
    fn fields_reach_the_backend_as_name_colon_space_value_however_they_came() {
        let raw = "GET / HTTP/1.1\r\nX-A:1\r\nx-b:   2  \r\nHost: b1.hangar.test\r\nX-C: 3\r\nx-d:\t4\r\nx-e: 5\r\nx-f: 6  \r\nx-g: 7\t\r\n\r\n";
        let mut buf = bytes::BytesMut::from(raw.as_bytes());
        let parsed = crate::server::parse_request(&mut buf, 64 * 1024, &mut Vec::new())
            .unwrap()
            .unwrap();
        let backend = BackendId::parse("b1").unwrap();
        let client = ClientInfo::new("10.1.2.3:4567".parse().unwrap(), false);
        let f = plain(&backend, &client);
        let out = String::from_utf8(upstream_head(&parsed.head, &f)).unwrap();
        assert!(
            out.starts_with("GET / HTTP/1.1\r\nx-a: 1\r\nx-b: 2\r\nx-c: 3\r\nx-d: 4\r\nx-e: 5\r\nx-f: 6\r\nx-g: 7\r\nhost: b1.hangar.test\r\n"),
            "{out}"
        );
    }

    #[test]
    fn the_backend_gets_end_to_end_headers_and_hangars_own_but_never_the_token() {
        let req = Request::get("/p?a=1&hangar_token=v1.secret&b=2")
            .header("host", "b1.hangar.test")
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "hop")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("upgrade", "h2c")
            .header("x-hangar-user", "mallory")
            .header("x-hangar-backend-id", "b9")
            .header("x-forwarded-for", "192.0.2.1")
            .header("content-length", "0")
            .header("authorization", "Basic kept")
            .header("cookie", "a=1")
            .header("x-other", "kept")
            .body(())
            .unwrap();
        let head = head_for(req, "alice", false);
        assert!(head.starts_with("GET /p?a=1&b=2 HTTP/1.1\r\n"), "{head}");
        for gone in [
            "x-secret",
            "keep-alive",
            "te:",
            "upgrade",
            "mallory",
            "b9",
            "v1.secret",
            "connection",
            "content-length",
        ] {
            assert!(!head.contains(gone), "{gone} was forwarded: {head}");
        }
        for kept in [
            "host: b1.hangar.test\r\n",
            "x-forwarded-host: b1.hangar.test\r\n",
            "x-forwarded-for: 192.0.2.1, 10.1.2.3\r\n",
            "x-forwarded-proto: https\r\n",
            "x-hangar-backend-id: b1\r\n",
            "x-hangar-user: alice\r\n",
            "authorization: Basic kept\r\n",
            "cookie: a=1\r\n",
            "x-other: kept\r\n",
        ] {
            assert!(head.contains(kept), "{kept:?} missing: {head}");
        }
        // The pool adds the framing and the blank line.
        assert!(head.ends_with("\r\n") && !head.ends_with("\r\n\r\n"));
    }

    /// Client-sent `X-Forwarded-Proto`, `X-Forwarded-Host` and `Forwarded` used to reach the
    /// backend ahead of Hangar's own values, and header names with underscores (which CGI-style
    /// servers read as dashes: `x-hangar_user` as `x-hangar-user`) were forwarded.
    #[test]
    fn forged_forwarding_fields_and_underscored_names_never_reach_the_backend() {
        let req = Request::get("/")
            .header("host", "b1.hangar.test")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "evil.example")
            .header("forwarded", "for=1.2.3.4;proto=https")
            .header("x-hangar_user", "mallory")
            .header("x_other", "x")
            .header("x-kept", "y")
            .body(())
            .unwrap();
        let client = ClientInfo::new("10.1.2.3:4567".parse().unwrap(), false);
        let backend = BackendId::parse("b1").unwrap();
        let (parts, ()) = req.into_parts();
        let f = plain(&backend, &client);
        let head = String::from_utf8(upstream_head(&parts, &f)).unwrap();
        for gone in ["evil.example", "forwarded: for", "mallory", "x_other"] {
            assert!(!head.contains(gone), "{gone} was forwarded: {head}");
        }
        assert_eq!(head.matches("x-forwarded-proto").count(), 1, "{head}");
        assert!(head.contains("x-forwarded-proto: http\r\n"), "{head}");
        assert!(
            head.contains("x-forwarded-host: b1.hangar.test\r\n"),
            "{head}"
        );
        assert!(head.contains("x-kept: y\r\n"), "{head}");
    }

    /// A token present in a second place, in a form the proxy did not read it from (lower-case
    /// `bearer`, a percent-encoded parameter name, a second `Authorization`), or sent to a
    /// public backend used to be forwarded: with header or cookie routing on a shared host,
    /// backend A received backend B's token. No backend sees any Hangar token now.
    #[test]
    fn no_hangar_token_reaches_a_backend_wherever_it_is() {
        let req = Request::get("/p?hangar%5Ftoken=v1.q1&HANGAR_TOKEN=v1.q2&keep=1")
            .header("host", "b1.hangar.test")
            .header("authorization", "bearer v1.lower")
            .header("authorization", "Bearer   v1.second")
            .header("authorization", "Basic dXNlcjpwdw==")
            .header("cookie", "hangar-token=v1.cookie; theme=dark")
            .body(())
            .unwrap();
        // Whatever the proxy read the token from, or for a public backend.
        {
            let head = head_for(req_clone(&req), "", false);
            assert!(!head.contains("v1."), "a token reached the backend: {head}");
            assert!(head.starts_with("GET /p?keep=1 HTTP/1.1\r\n"), "{head}");
            assert!(
                head.contains("authorization: Basic dXNlcjpwdw==\r\n"),
                "{head}"
            );
            assert!(head.contains("cookie: theme=dark\r\n"), "{head}");
        }
        let only = Request::get("/?hangar_token=v1.x")
            .header("host", "h")
            .body(())
            .unwrap();
        assert!(head_for(only, "", false).starts_with("GET / HTTP/1.1\r\n"));
    }

    /// Found by fuzzing (`fuzz/artifacts/request_head/`): a `Cookie` or `Authorization` value
    /// that was not UTF-8 was forwarded whole, Hangar token included.
    #[test]
    fn a_token_in_a_value_that_is_not_utf8_is_removed_too() {
        let value = |b: &[u8]| http::HeaderValue::from_bytes(b).unwrap();
        let req = Request::get("/")
            .header("host", "b1.hangar.test")
            .header(
                "cookie",
                value(b"\xe4\x9e=1; hangar-token=v1.abc; theme=dark"),
            )
            .header("cookie", value(b"lang=\xff"))
            .header("authorization", value(b"Bearer v1.secret\xff"))
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let backend = BackendId::parse("b1").unwrap();
        let client = ClientInfo::new("10.1.2.3:4567".parse().unwrap(), false);
        let f = plain(&backend, &client);
        let head = upstream_head(&parts, &f);
        let text = String::from_utf8_lossy(&head);
        assert!(!text.contains("v1."), "a token reached the backend: {text}");
        assert!(
            text.contains("cookie: \u{fffd}=1; theme=dark\r\n"),
            "the other cookies are kept: {text}"
        );
        assert!(
            head.windows(14).any(|w| w == b"cookie: lang=\xff"),
            "a value without a token goes out as it came: {text}"
        );
    }

    /// The `Authorization` value whose token the proxy verified is dropped by identity, not
    /// read again; every other value is still read for a token, and a value that only equals
    /// the verified one (another field) is not dropped on its account.
    #[test]
    fn the_verified_authorization_is_dropped_and_every_other_is_still_read() {
        let (parts, ()) = Request::get("/")
            .header("host", "b1.hangar.test")
            .header("authorization", "Bearer v1.verified")
            .header("authorization", "bEaReR v1.second")
            .header("authorization", "Basic kept")
            .body(())
            .unwrap()
            .into_parts();
        let backend = BackendId::parse("b1").unwrap();
        let client = ClientInfo::new("10.1.2.3:4567".parse().unwrap(), false);
        let values: Vec<&[u8]> = parts.get_all("authorization").collect();
        let head = |verified: Option<&[u8]>| {
            let f = Forwarding {
                user: "alice",
                verified_authorization: verified,
                ..plain(&backend, &client)
            };
            String::from_utf8(upstream_head(&parts, &f)).unwrap()
        };
        for verified in [None, Some(values[0])] {
            let head = head(verified);
            assert!(!head.contains("v1."), "a token reached the backend: {head}");
            assert!(head.contains("authorization: Basic kept\r\n"), "{head}");
        }
        // The very field is dropped whatever it holds; an equal copy of it is not that field.
        let head_dropped = head(Some(values[2]));
        assert!(!head_dropped.contains("Basic kept"), "{head_dropped}");
        let copy = values[2].to_vec();
        let head_kept = head(Some(&copy));
        assert!(
            head_kept.contains("authorization: Basic kept\r\n"),
            "{head_kept}"
        );
    }

    /// The route's key and epoch replace any a client sent (a backend started warm trusts
    /// them to learn what it serves); a keyless route sends neither, whatever the client sent.
    #[test]
    fn the_key_and_epoch_come_from_the_route_never_from_the_client() {
        let forged = || {
            Request::get("/")
                .header("host", "b1.hangar.test")
                .header("x-hangar-key", "evil/mallory")
                .header("x-hangar-epoch", "999")
                .header("X-Hangar-Epoch", "998")
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let backend = BackendId::parse("b1").unwrap();
        let client = ClientInfo::new("10.1.2.3:4567".parse().unwrap(), false);
        let head = |key: Option<&str>, epoch: u64| {
            let f = Forwarding {
                user: "alice",
                key,
                epoch,
                ..plain(&backend, &client)
            };
            String::from_utf8(upstream_head(&forged(), &f)).unwrap()
        };

        let keyed = head(Some("team/alice"), 42);
        for gone in ["evil/mallory", "999", "998"] {
            assert!(!keyed.contains(gone), "{gone} was forwarded: {keyed}");
        }
        assert_eq!(keyed.matches("x-hangar-key: ").count(), 1, "{keyed}");
        assert_eq!(keyed.matches("x-hangar-epoch: ").count(), 1, "{keyed}");
        assert!(keyed.contains("x-hangar-key: team/alice\r\n"), "{keyed}");
        assert!(keyed.contains("x-hangar-epoch: 42\r\n"), "{keyed}");

        let keyless = head(None, 0);
        for gone in ["x-hangar-key", "x-hangar-epoch", "evil/mallory", "999"] {
            assert!(!keyless.contains(gone), "{gone} was forwarded: {keyless}");
        }

        // A key that is no header value is left out, and its epoch with it.
        let bad = head(Some("team/a\r\nx-evil: 1"), 5);
        assert!(!bad.contains("x-evil"), "{bad}");
        assert!(
            !bad.contains("x-hangar-key") && !bad.contains("x-hangar-epoch"),
            "{bad}"
        );
    }

    fn req_clone(req: &Request<()>) -> Request<()> {
        let mut r = Request::builder()
            .method(req.method())
            .uri(req.uri().clone());
        for (k, v) in req.headers() {
            r = r.header(k, v);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn bearer_and_cookie_tokens_are_removed_and_upgrades_kept() {
        let req = Request::get("/ws")
            .header("host", "b1.hangar.test")
            .header("authorization", "Bearer v1.secret")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        let head = head_for(req, "bob", true);
        assert!(!head.contains("v1.secret"), "{head}");
        assert!(head.contains("upgrade: websocket\r\n"), "{head}");
        assert!(head.contains("connection: upgrade\r\n"), "{head}");

        let req = Request::get("/")
            .header("host", "b1.hangar.test")
            .header("cookie", "theme=dark; hangar-token=v1.secret; lang=en")
            .header("cookie", "hangar-token=v1.other")
            .body(())
            .unwrap();
        let head = head_for(req, "bad\r\nx-evil: 1", false);
        assert!(!head.contains("v1.secret"), "{head}");
        assert!(!head.contains("v1.other"), "{head}");
        assert_eq!(head.matches("cookie: ").count(), 1, "{head}");
        assert!(head.contains("cookie: theme=dark; lang=en\r\n"), "{head}");
        assert!(
            !head.contains("x-evil"),
            "a user that is no header value is left out"
        );
        assert!(head.contains("x-forwarded-for: 10.1.2.3\r\n"), "{head}");

        // HTTP/2 clients name the host in the target.
        let req = Request::get("http://b1.hangar.test/h2").body(()).unwrap();
        let head = head_for(req, "", false);
        assert!(head.starts_with("GET /h2 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("host: b1.hangar.test\r\n"), "{head}");
        assert!(!head.contains("x-hangar-user"), "{head}");
    }

    /// `Authorization` values shaped like `[space] scheme [space] credential`: the scheme in
    /// several cases, every kind of space (ASCII; the vertical tab, which `str::trim_start`
    /// trims but `split_once` on ASCII whitespace does not split at; Unicode's), token
    /// prefixes, quotes and any byte; or any bytes at all.
    fn authorization_value() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let piece = |of: Vec<&'static str>| {
            prop_oneof![
                4 => prop::sample::select(of).prop_map(|p| p.as_bytes().to_vec()),
                1 => any::<u8>().prop_map(|b| vec![b]),
            ]
        };
        let space = vec![" ", "\t", "\n", "\r", "\x0b", "\x0c", "\u{a0}", "\u{3000}"];
        let scheme = vec!["Bearer", "bearer", "BEARER", "Basic", "Bearerx"];
        let credential = vec!["v1.", "V1.", "v1", "\"", "abc", ".", " ", "\x0b", "\u{a0}"];
        prop_oneof![
            (
                proptest::collection::vec(piece(space.clone()), 0..3),
                piece(scheme),
                proptest::collection::vec(piece(space), 0..2),
                proptest::collection::vec(piece(credential), 0..5),
            )
                .prop_map(|(a, b, c, d)| [a.concat(), b, c.concat(), d.concat()].concat()),
            proptest::collection::vec(any::<u8>(), 0..24),
        ]
    }

    proptest::proptest! {
        #[test]
        fn an_authorization_value_is_read_in_place_as_the_lossy_reading_reads_it(
            value in authorization_value(),
        ) {
            proptest::prop_assert_eq!(
                carries_token(&value),
                carries_token_lossy(&value),
                "{:?}",
                String::from_utf8_lossy(&value)
            );
        }
    }

    #[test]
    fn bearer_tokens_are_found_in_ascii_values_whatever_the_spacing_and_case() {
        for v in [
            "Bearer v1.x.y",
            "  bearer\tV1.x",
            "\x0bBEARER \"v1.x\"",
            "Bearer  v1.x",
        ] {
            assert!(carries_token(v.as_bytes()), "{v:?}");
        }
        for v in [
            "Bearer v1.",
            "Basic v1.x",
            "Bearer",
            "Bearerv1.x",
            "Bearer x.v1.y",
            "",
        ] {
            assert!(!carries_token(v.as_bytes()), "{v:?}");
        }
    }
}
