//! `GET /v1/quotas`, `PUT`/`DELETE /v1/quotas/{namespace}`: per-namespace quotas (see
//! [`crate::quotas`]).

use axum::Json;
use axum::extract::{Path, State};

use super::extract::ApiJson;
use super::handles::Handles;
use crate::error::ApiError;
use crate::quotas::{Quota, QuotaList};

pub(crate) async fn list(State(h): State<Handles>) -> Json<QuotaList> {
    Json(h.quotas.list())
}

pub(crate) async fn set(
    State(h): State<Handles>,
    Path(namespace): Path<String>,
    ApiJson(quota): ApiJson<Quota>,
) -> Result<Json<QuotaList>, ApiError> {
    h.quotas.set(&namespace, quota).await?;
    tracing::info!(%namespace, "quota set");
    Ok(Json(h.quotas.list()))
}

pub(crate) async fn remove(
    State(h): State<Handles>,
    Path(namespace): Path<String>,
) -> Result<Json<QuotaList>, ApiError> {
    if !h.quotas.remove(&namespace).await? {
        return Err(ApiError::NotFound(format!(
            "namespace {namespace:?} has no quota: see `hangar quota ls`"
        )));
    }
    Ok(Json(h.quotas.list()))
}
