//! Request extractors whose failures are API errors naming what is wrong.

use axum::extract::{FromRequest, Request};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest request body accepted (and forwarded to the leader).
pub(crate) const MAX_BODY: usize = 64 * 1024;

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
