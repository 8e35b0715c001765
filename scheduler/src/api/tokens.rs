//! `GET`/`POST /v1/tokens`, `DELETE /v1/tokens/{id}`: API tokens (admin only; see
//! `api::auth`).

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};

use super::extract::ApiJson;
use super::handles::Handles;
use crate::api_tokens::{CreateTokenRequest, TokenView};
use crate::error::ApiError;

/// `GET /v1/tokens`: every token, without secrets.
pub(crate) async fn list(State(h): State<Handles>) -> Json<Vec<TokenView>> {
    Json(h.tokens.list())
}

/// `POST /v1/tokens` → 201 with the token, shown this once.
pub(crate) async fn create(
    State(h): State<Handles>,
    ApiJson(req): ApiJson<CreateTokenRequest>,
) -> Result<Response, ApiError> {
    let created = h.tokens.create(req).await?;
    tracing::info!(id = %created.record.id, scope = %created.record.scope, "api token created");
    Ok((http::StatusCode::CREATED, Json(created)).into_response())
}

/// `DELETE /v1/tokens/{id}`: the token stops working at once.
pub(crate) async fn revoke(
    State(h): State<Handles>,
    Path(id): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let view = h.tokens.revoke(&id).await?;
    tracing::info!(id = %view.id, scope = %view.scope, "api token revoked");
    Ok(Json(view))
}
