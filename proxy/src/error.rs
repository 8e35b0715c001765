//! Every way a proxied request can fail, classified as the client's fault (downstream), the
//! backend's (upstream) or ours (internal), and mapped to a status in one place.

use std::time::Duration;

use hangar_core::token::TokenError;
use http::StatusCode;

/// A request the proxy answers itself. Hot-path variants carry no allocation where the cause
/// is fixed; backend ids are included so the body names what failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "no backend named in the request: use host <backend>.{domain}, header x-hangar-backend or cookie hangar-backend"
    )]
    NoBackendNamed { domain: String },
    #[error(
        "unknown backend {0}: it does not exist or its record has been removed; ask /v1/connect for a backend"
    )]
    UnknownBackend(String),
    #[error("{0}")]
    Token(TokenError),
    #[error("backend {0} has terminated; ask /v1/connect for a new one")]
    Gone(String),
    #[error("backend {backend} did not become ready within {waited:?}")]
    StartTimeout { backend: String, waited: Duration },
    #[error("backend {backend} refused the connection or could not be reached: {detail}")]
    UpstreamConnect { backend: String, detail: String },
    #[error("backend {backend} did not answer within {waited:?}")]
    UpstreamTimeout { backend: String, waited: Duration },
    #[error("backend {backend} failed the request: {detail}")]
    Upstream { backend: String, detail: String },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// A request the proxy understands but will not forward (a transfer coding other than
    /// chunked).
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error(
        "request head larger than {0} bytes or with too many header fields: send fewer or smaller headers"
    )]
    HeadTooLarge(usize),
    #[error("the request head was not complete within {0:?}")]
    HeadTimeout(Duration),
    #[error("the request body stalled: no bytes for {0:?}")]
    BodyTimeout(Duration),
    #[error("request body larger than {0} bytes: send a smaller body")]
    BodyTooLarge(u64),
}

/// Whose fault a failure is (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    Downstream,
    Upstream,
    Internal,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoBackendNamed { .. } | ProxyError::UnknownBackend(_) => {
                StatusCode::NOT_FOUND
            }
            ProxyError::Token(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Gone(_) => StatusCode::GONE,
            ProxyError::StartTimeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamConnect { .. } | ProxyError::Upstream { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::HeadTimeout(_) | ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// A short machine-readable cause, sent as `x-hangar-error`.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoBackendNamed { .. } => "no_backend_named",
            ProxyError::UnknownBackend(_) => "unknown_backend",
            ProxyError::Token(TokenError::Missing) => "token_missing",
            ProxyError::Token(TokenError::Malformed) => "token_malformed",
            ProxyError::Token(TokenError::BadSignature) => "token_forged",
            ProxyError::Token(TokenError::Expired) => "token_expired",
            ProxyError::Token(TokenError::WrongBackend) => "token_wrong_backend",
            ProxyError::Token(TokenError::Revoked) => "token_revoked",
            ProxyError::Gone(_) => "backend_terminated",
            ProxyError::StartTimeout { .. } => "backend_start_timeout",
            ProxyError::UpstreamConnect { .. } => "upstream_connect",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::Upstream { .. } => "upstream_error",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::NotImplemented(_) => "not_implemented",
            ProxyError::HeadTooLarge(_) => "request_head_too_large",
            ProxyError::HeadTimeout(_) => "request_head_timeout",
            ProxyError::BodyTimeout(_) => "request_body_timeout",
            ProxyError::BodyTooLarge(_) => "request_body_too_large",
        }
    }

    pub fn blame(&self) -> Blame {
        match self {
            ProxyError::NoBackendNamed { .. }
            | ProxyError::UnknownBackend(_)
            | ProxyError::Token(_)
            | ProxyError::Gone(_)
            | ProxyError::BadRequest(_)
            | ProxyError::NotImplemented(_)
            | ProxyError::HeadTooLarge(_)
            | ProxyError::HeadTimeout(_)
            | ProxyError::BodyTimeout(_)
            | ProxyError::BodyTooLarge(_) => Blame::Downstream,
            ProxyError::StartTimeout { .. }
            | ProxyError::UpstreamConnect { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::Upstream { .. } => Blame::Upstream,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let cases = [
            (ProxyError::UnknownBackend("b".into()), 404),
            (ProxyError::Token(TokenError::Expired), 401),
            (ProxyError::Gone("b".into()), 410),
            (
                ProxyError::StartTimeout {
                    backend: "b".into(),
                    waited: Duration::from_secs(1),
                },
                503,
            ),
            (
                ProxyError::UpstreamConnect {
                    backend: "b".into(),
                    detail: "refused".into(),
                },
                502,
            ),
            (
                ProxyError::UpstreamTimeout {
                    backend: "b".into(),
                    waited: Duration::from_secs(1),
                },
                504,
            ),
            (ProxyError::BodyTooLarge(10), 413),
        ];
        for (e, s) in cases {
            assert_eq!(e.status().as_u16(), s, "{e}");
        }
        assert_eq!(
            ProxyError::Token(TokenError::Missing).blame(),
            Blame::Downstream
        );
    }
}
