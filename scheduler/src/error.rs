//! API errors: one type, mapped to a status and the `{"error": {"code", "message"}}` body in
//! one place.

use axum::Json;
use axum::response::{IntoResponse, Response};
use hangar_core::api::ErrorBody;
use http::StatusCode;

use hangar_store::StoreError;

/// Everything the API can answer with besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, unknown fields, invalid values: the message names the field.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    /// The request conflicts with something that will end by itself (a key's previous backend
    /// still stopping): 409 with `Retry-After`.
    #[error("{message}")]
    Busy {
        message: String,
        retry_after: std::time::Duration,
    },
    /// A quota is used up: 429 with `Retry-After`.
    #[error("{message}")]
    TooMany {
        message: String,
        retry_after: std::time::Duration,
    },
    /// Nowhere to run the backend, or a dependency is down: retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error("store failed: {0}")]
    Store(#[from] StoreError),
    /// This instance's leadership ended: its write was refused by the store (fenced), or it
    /// does not lead and the request needs the leader.
    #[error("{0}")]
    Fenced(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) | ApiError::Busy { .. } => StatusCode::CONFLICT,
            ApiError::TooMany { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::Store(_) | ApiError::Fenced(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the same request may succeed later unchanged (a store hiccup, no drone yet, a
    /// contended key), as opposed to a refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Unavailable(_)
            | ApiError::Conflict(_)
            | ApiError::Busy { .. }
            | ApiError::TooMany { .. }
            | ApiError::Fenced(_) => true,
            ApiError::Store(e) => e.is_transient(),
            _ => false,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Conflict(_) => "conflict",
            ApiError::Busy { .. } => "busy",
            ApiError::TooMany { .. } => "quota",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Store(_) => "store_unavailable",
            ApiError::Fenced(_) => "not_leader",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Internal(_) | ApiError::Store(_)) {
            tracing::error!(error = %self, "api request failed");
        }
        let retry_after = match &self {
            ApiError::Busy { retry_after, .. } | ApiError::TooMany { retry_after, .. } => {
                Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
            }
            ApiError::Fenced(_) => Some(1),
            _ => None,
        };
        let mut response = (
            self.status(),
            Json(ErrorBody::new(self.code(), self.to_string())),
        )
            .into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        response
    }
}
