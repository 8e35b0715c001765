//! `/v1/pools`: pools (spawn templates, warm backends, rollouts; see [`crate::pools`]).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use hangar_core::pool::{
    CreatePool, Pool, PoolList, PoolSettings, RollbackRequest, RolloutRequest,
};

use super::extract::ApiJson;
use super::handles::Handles;
use crate::error::ApiError;

pub(crate) async fn list(State(h): State<Handles>) -> Json<PoolList> {
    Json(PoolList {
        pools: h.pools.list().iter().map(|p| (**p).clone()).collect(),
    })
}

pub(crate) async fn get(
    State(h): State<Handles>,
    Path(name): Path<String>,
) -> Result<Json<Pool>, ApiError> {
    h.pools
        .get(&name)
        .map(|p| Json((*p).clone()))
        .ok_or_else(|| ApiError::NotFound(format!("no pool {name:?}: see `hangar pool ls`")))
}

pub(crate) async fn create(
    State(h): State<Handles>,
    ApiJson(req): ApiJson<CreatePool>,
) -> Result<(StatusCode, Json<Pool>), ApiError> {
    Ok((StatusCode::CREATED, Json(h.pools.create(req).await?)))
}

pub(crate) async fn set(
    State(h): State<Handles>,
    Path(name): Path<String>,
    ApiJson(settings): ApiJson<PoolSettings>,
) -> Result<Json<Pool>, ApiError> {
    let pool = h.pools.set(&name, settings).await?;
    tracing::info!(pool = %name, warm = pool.warm, "pool changed");
    Ok(Json(pool))
}

pub(crate) async fn delete(
    State(h): State<Handles>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    h.pools.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn rollout(
    State(h): State<Handles>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<RolloutRequest>,
) -> Result<Json<Pool>, ApiError> {
    let pool = h.pools.rollout(&name, req).await?;
    if let Some(r) = &pool.rollout {
        tracing::info!(pool = %name, generation = r.generation, canary = r.canary_percent, "rollout started");
    }
    Ok(Json(pool))
}

pub(crate) async fn promote(
    State(h): State<Handles>,
    Path(name): Path<String>,
) -> Result<Json<Pool>, ApiError> {
    let pool = h.pools.promote(&name).await?;
    tracing::info!(pool = %name, generation = pool.generation, "rollout promoted");
    Ok(Json(pool))
}

pub(crate) async fn rollback(
    State(h): State<Handles>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Pool>, ApiError> {
    // No body: back to the generation before the current one.
    let req: RollbackRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RollbackRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("invalid rollback request: {e}")))?
    };
    let pool = h.pools.rollback(&name, req).await?;
    tracing::info!(pool = %name, generation = pool.generation, "rolled back");
    Ok(Json(pool))
}
