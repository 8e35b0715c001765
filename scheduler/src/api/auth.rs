//! Who may call what: every request's credential is resolved to a [`Caller`] (an open API, the
//! cluster secret, or an API token) before anything else runs (before a write is forwarded to
//! the leader, which checks again), and the route's required scope is checked: 401 for a
//! missing or bad credential, 403 naming the scope that is missing. The caller is left in the
//! request's extensions for handlers that check ownership (a `connect` token sees only its own
//! backends).

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::Method;
use subtle::ConstantTimeEq;

use super::handles::Handles;
use crate::api_tokens::{Caller, Scope};
use crate::error::ApiError;
use crate::records::BackendRecord;

/// What a route requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    Nothing,
    Scope(Scope),
    /// One backend: `connect` for its own (checked by the handler), `read` to look at any,
    /// `admin` for anything.
    Backend {
        write: bool,
    },
}

/// The policy: one place that says what each endpoint needs; anything not named is admin's.
fn need(method: &Method, path: &str) -> Need {
    let read = *method == Method::GET || *method == Method::HEAD;
    let post = *method == Method::POST;
    match path {
        "/healthz" | "/readyz" => Need::Nothing,
        // The dashboard's static assets: the page asks for a token and sends it on its calls.
        p if read && (p == "/ui" || p.starts_with("/ui/")) => Need::Nothing,
        "/v1/drones/connect" if read => Need::Scope(Scope::Drone),
        "/v1/routes/feed" if read => Need::Scope(Scope::Proxy),
        "/v1/activity" if post => Need::Scope(Scope::Proxy),
        "/v1/connect" if post => Need::Scope(Scope::Connect),
        p if p == "/v1/tokens" || p.starts_with("/v1/tokens/") => Need::Scope(Scope::Admin),
        p if p.starts_with("/v1/backends/") && read => Need::Backend { write: false },
        p if p.starts_with("/v1/backends/") && post && p.ends_with("/terminate") => {
            Need::Backend { write: true }
        }
        _ if read => Need::Scope(Scope::Read),
        _ => Need::Scope(Scope::Admin),
    }
}

/// The bearer credential of a request, if it has one (`Authorization: Bearer ...`, the
/// scheme in any case).
fn bearer(req: &Request) -> Option<&str> {
    let v = req
        .headers()
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Resolves the caller of `req`: on an open API anyone, except on the endpoints of drones and
/// remote proxies (`member`), which always need the cluster secret or a token.
fn caller(h: &Handles, req: &Request, member: bool) -> Result<Caller, ApiError> {
    if !h.config.api_tokens && !member {
        return Ok(Caller::Open);
    }
    let refused = || {
        ApiError::Unauthorized(
            "drone secret is missing or wrong: start the drone (or remote proxy) with the scheduler's --drone-secret, or a token with the drone (proxy) scope".into(),
        )
    };
    let Some(given) = bearer(req) else {
        if member {
            return Err(refused());
        }
        return Err(ApiError::Unauthorized(
            "this API needs a token: pass --api-token or HANGAR_TOKEN to the CLI (the header `Authorization: Bearer <token>`); `hangar serve` wrote an admin token into its data directory (admin.token)".into(),
        ));
    };
    if let Some(secret) = h.config.drone_secret.as_deref()
        && bool::from(given.as_bytes().ct_eq(secret.as_bytes()))
    {
        return Ok(Caller::Cluster);
    }
    h.tokens.verify(given).ok_or_else(|| {
        if member {
            return refused();
        }
        ApiError::Unauthorized(
            "the token is unknown, expired or revoked: create one with `hangar token create`"
                .into(),
        )
    })
}

/// The middleware.
pub async fn authorize(State(h): State<Handles>, mut req: Request, next: Next) -> Response {
    let need = need(req.method(), req.uri().path());
    if need == Need::Nothing {
        return next.run(req).await;
    }
    let member = matches!(need, Need::Scope(Scope::Drone | Scope::Proxy));
    if member && h.config.drone_secret.is_none() {
        return ApiError::Forbidden(
            "this scheduler accepts no network drones or remote proxies: run `hangar serve` with --drone-secret".into(),
        )
        .into_response();
    }
    let caller = match caller(&h, &req, member) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let allowed = match need {
        Need::Nothing => Ok(()),
        Need::Scope(scope) => caller.require(scope, &what(req.method(), req.uri().path())),
        Need::Backend { write } => {
            if caller.has(Scope::Connect) || (!write && caller.has(Scope::Read)) {
                Ok(())
            } else {
                caller.require(
                    if write { Scope::Connect } else { Scope::Read },
                    &what(req.method(), req.uri().path()),
                )
            }
        }
    };
    if let Err(e) = allowed {
        return e.into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

fn what(method: &Method, path: &str) -> String {
    format!("{method} {path}")
}

/// Whether `caller` may look at or stop backend `rec`: anyone with `read` (looking) or
/// `admin`; a `connect` token only its own: the backends of its namespace, or the ones it
/// created.
pub(crate) fn may_touch(caller: &Caller, rec: &BackendRecord, write: bool) -> bool {
    if caller.is_admin() || (!write && caller.has(Scope::Read)) {
        return true;
    }
    match caller {
        Caller::Token {
            id,
            scope: Scope::Connect,
            namespace,
        } => {
            let in_namespace = namespace
                .as_deref()
                .is_some_and(|ns| rec.key.as_ref().is_some_and(|k| k.namespace == ns));
            in_namespace || rec.created_by.as_deref() == Some(id.as_str())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_has_the_scope_it_should() {
        let get = Method::GET;
        let post = Method::POST;
        let delete = Method::DELETE;
        for (m, p, n) in [
            (&get, "/healthz", Need::Nothing),
            (&get, "/ui", Need::Nothing),
            (&get, "/ui/", Need::Nothing),
            (&get, "/ui/app.js", Need::Nothing),
            (&post, "/ui", Need::Scope(Scope::Admin)),
            (&get, "/uix", Need::Scope(Scope::Read)),
            (
                &get,
                "/v1/backends/b1/traffic",
                Need::Backend { write: false },
            ),
            (&get, "/v1/drones/connect", Need::Scope(Scope::Drone)),
            (&get, "/v1/routes/feed", Need::Scope(Scope::Proxy)),
            (&post, "/v1/activity", Need::Scope(Scope::Proxy)),
            (&post, "/v1/connect", Need::Scope(Scope::Connect)),
            (&get, "/v1/backends", Need::Scope(Scope::Read)),
            (&get, "/v1/backends/b1", Need::Backend { write: false }),
            (
                &get,
                "/v1/backends/b1/events",
                Need::Backend { write: false },
            ),
            (&get, "/v1/backends/b1/logs", Need::Backend { write: false }),
            (
                &post,
                "/v1/backends/b1/terminate",
                Need::Backend { write: true },
            ),
            (&get, "/v1/drones", Need::Scope(Scope::Read)),
            (&get, "/v1/hot", Need::Scope(Scope::Read)),
            (&get, "/v1/cluster", Need::Scope(Scope::Read)),
            (&post, "/v1/drones/d1/drain", Need::Scope(Scope::Admin)),
            (&post, "/v1/tokens/revoke", Need::Scope(Scope::Admin)),
            (&get, "/v1/tokens", Need::Scope(Scope::Admin)),
            (&post, "/v1/maintenance", Need::Scope(Scope::Admin)),
            (&delete, "/v1/dns/acme-challenge", Need::Scope(Scope::Admin)),
            (&post, "/v1/anything-new", Need::Scope(Scope::Admin)),
            (&post, "/v1/drones/connect", Need::Scope(Scope::Admin)),
        ] {
            assert_eq!(need(m, p), n, "{m} {p}");
        }
    }
}
