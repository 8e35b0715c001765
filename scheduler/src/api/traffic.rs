//! `GET /v1/backends/{id}/traffic`: a backend's request rate and mean latency over the last
//! minutes, from this instance's proxies' activity reports ([`crate::traffic`]).

use axum::Json;
use axum::extract::{Extension, Path, State};
use hangar_core::BackendId;

use super::auth::may_touch;
use super::handles::Handles;
use crate::api_tokens::Caller;
use crate::error::ApiError;
use crate::traffic::TrafficView;

/// `GET /v1/backends/{id}/traffic`.
pub(crate) async fn get(
    State(h): State<Handles>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<TrafficView>, ApiError> {
    let Some((rec, _)) = h.backends.get(&id).await? else {
        return Err(ApiError::NotFound(format!("no backend {id}")));
    };
    if !may_touch(&caller, &rec, false) {
        return Err(ApiError::Forbidden(format!(
            "backend {id} is not this token's: a connect token reaches only the backends of its namespace or the ones it created"
        )));
    }
    let id: BackendId = rec.id;
    Ok(Json(h.traffic.view(&id)))
}
