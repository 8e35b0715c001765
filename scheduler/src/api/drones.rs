//! Drone endpoints of the API: the session WebSocket (`GET /v1/drones/connect`), the drone
//! list, drain and undrain.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use hangar_core::api::{DrainRequest, DroneList, DroneView};

use super::extract::ApiJson;
use super::handles::Handles;
use crate::error::ApiError;
use crate::records::{drain_key, drone_key, list_drains, list_drones};

/// The read buffer of a drone session's WebSocket.
const DRONE_READ_BUFFER: usize = 8 * 1024;

/// `GET /v1/drones/connect`: a drone's session (authenticated by `api::auth`: the cluster
/// secret or a drone token).
pub(crate) async fn connect(
    State(h): State<Handles>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let sessions = h.sessions.clone();
    let tasks = h.tasks.clone();
    // Drone messages are small (heartbeats, events, usage), and the read buffer is zeroed
    // to its full size on every read: tungstenite's default of 128 KiB made that a tenth of
    // serve's CPU with 1,000 drones. It still grows for a larger message.
    Ok(ws
        .read_buffer_size(DRONE_READ_BUFFER)
        .on_upgrade(move |socket| async move { tasks.track_future(sessions.serve(socket)).await }))
}

/// `GET /v1/drones`.
pub(crate) async fn list(State(h): State<Handles>) -> Result<Json<DroneList>, ApiError> {
    let now = h.clock.now_ms();
    let records = list_drones(h.store.as_ref()).await?;
    let drains = list_drains(h.store.as_ref()).await?;
    let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut live: BTreeMap<String, u64> = BTreeMap::new();
    for b in h.backends.list().await? {
        let b = b.record;
        let Some(d) = b.drone.clone() else { continue };
        *counts
            .entry(d.clone())
            .or_default()
            .entry(b.state.name().to_string())
            .or_default() += 1;
        if b.state.is_live() {
            *live.entry(d).or_default() += 1;
        }
    }
    let mut names: Vec<String> = records.keys().chain(drains.keys()).cloned().collect();
    names.extend(h.drones.all().into_iter().map(|d| d.name));
    names.sort();
    names.dedup();
    let drones = names
        .into_iter()
        .map(|name| {
            let rec = records.get(&name);
            // Connected to any instance; the heartbeat's age is known where the session is.
            let info = h.directory.get(&name);
            let conn = h.drones.get(&name);
            let drain = drains.get(&name);
            let live_here = live.get(&name).copied().unwrap_or(0);
            let unhealthy = info.as_ref().and_then(|i| i.unhealthy.clone());
            let state = match (&info, drain) {
                (_, Some(_)) if live_here == 0 => "drained",
                (_, Some(_)) => "draining",
                (None, None) => "disconnected",
                (Some(_), None) if unhealthy.is_some() => "unhealthy",
                (Some(_), None) => "ready",
            };
            DroneView {
                state: state.to_string(),
                run_id: rec.map(|r| r.run_id.clone()),
                runtime: rec.map(|r| r.runtime.clone()),
                pool: rec.map(|r| r.pool.clone()),
                capacity: rec.map(|r| r.capacity),
                reserved: h.routes.load_of(&name),
                backends: counts.remove(&name).unwrap_or_default(),
                heartbeat_age_ms: conn.as_ref().map(|c| match rec.and_then(|r| r.lease) {
                    Some(_) => now.saturating_sub(c.status.last_heartbeat()),
                    None => 0,
                }),
                drain_deadline_at: drain.and_then(|d| d.deadline_at),
                message: unhealthy,
                instance: rec
                    .filter(|_| info.is_some())
                    .and_then(|r| r.instance.clone()),
                name,
            }
        })
        .collect();
    Ok(Json(DroneList { drones }))
}

/// `POST /v1/drones/{name}/drain`: cordon at once; terminate what remains at the deadline.
pub(crate) async fn drain(
    State(h): State<Handles>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<DrainRequest>,
) -> Result<Response, ApiError> {
    known_drone(&h, &name).await?;
    let now = h.clock.now_ms();
    h.drains
        .start(&name, now, req.deadline_s.map(|s| now + s * 1000))
        .await?;
    tracing::info!(drone = %name, deadline_s = ?req.deadline_s, "drain started");
    let view = view_of(&h, &name).await?;
    Ok((http::StatusCode::ACCEPTED, Json(view)).into_response())
}

/// `POST /v1/drones/{name}/undrain`.
pub(crate) async fn undrain(
    State(h): State<Handles>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    known_drone(&h, &name).await?;
    h.drains.cancel(&name).await?;
    tracing::info!(drone = %name, "drain cancelled");
    Ok(Json(view_of(&h, &name).await?).into_response())
}

async fn known_drone(h: &Handles, name: &str) -> Result<(), ApiError> {
    let known = h.directory.get(name).is_some()
        || h.store.get(&drone_key(name)).await?.is_some()
        || h.store.get(&drain_key(name)).await?.is_some();
    if known {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "no drone {name}: see `hangar drones` for the connected ones"
        )))
    }
}

async fn view_of(h: &Handles, name: &str) -> Result<DroneView, ApiError> {
    let Json(list) = list(State(h.clone())).await?;
    list.drones
        .into_iter()
        .find(|d| d.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("no drone {name}")))
}
