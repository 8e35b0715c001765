//! `GET`/`POST /v1/maintenance`: the maintenance window in force, and beginning one
//! (`hangar maintenance start --for 10m`) before a planned stop of the whole control plane.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use hangar_core::UnixMillis;
use serde::{Deserialize, Serialize};

use super::extract::ApiJson;
use super::handles::Handles;
use crate::error::ApiError;
use crate::maintenance::MaintenanceRecord;

/// `POST /v1/maintenance`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MaintenanceRequest {
    /// How long from now no drone may be declared lost (seconds, 1 to 7 days).
    pub for_s: u64,
}

/// The window in force, if any.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaintenanceView {
    pub window: Option<MaintenanceRecord>,
    /// The answering instance's clock (ms), to tell how long is left.
    pub now: UnixMillis,
}

/// Begins (or lengthens) a window of `length` and tells the drones whose sessions this
/// instance holds; the other instances tell theirs as they see the record.
pub async fn begin_maintenance(
    h: &Handles,
    length: Duration,
) -> Result<MaintenanceRecord, ApiError> {
    let sessions = h.drones.all().iter().filter(|d| d.leased).count();
    h.maintenance.begin(length, sessions).await
}

pub(crate) async fn get(State(h): State<Handles>) -> Result<Json<MaintenanceView>, ApiError> {
    Ok(Json(MaintenanceView {
        window: h.maintenance.current().await?,
        now: h.clock.now_ms(),
    }))
}

pub(crate) async fn post(
    State(h): State<Handles>,
    ApiJson(req): ApiJson<MaintenanceRequest>,
) -> Result<Json<MaintenanceView>, ApiError> {
    let window = begin_maintenance(&h, Duration::from_secs(req.for_s)).await?;
    Ok(Json(MaintenanceView {
        window: Some(window),
        now: h.clock.now_ms(),
    }))
}
