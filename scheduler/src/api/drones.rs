//! Drone endpoints of the API: the session WebSocket (`GET /v1/drones/connect`), the drone
//! list, drain and undrain.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use hangar_core::api::{Amounts, DrainRequest, DroneList, DroneView};
use http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::api::ApiJson;
use crate::drone_session::serve_session;
use crate::error::ApiError;
use crate::records::{DrainRecord, drain_key};
use crate::records::{list_backends, list_drains, list_drones};
use crate::scheduler::Inner;

type Shared = Arc<Inner>;

/// `GET /v1/drones/connect`: a drone's session, authenticated by the shared drone secret.
pub(crate) async fn connect(
    State(inner): State<Shared>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let Some(secret) = inner.config.drone_secret.as_deref() else {
        return Err(ApiError::Forbidden(
            "this scheduler accepts no network drones: start it with --drone-secret".into(),
        ));
    };
    let given = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(given.as_bytes().ct_eq(secret.as_bytes())) {
        return Err(ApiError::Unauthorized(
            "drone secret is missing or wrong: start the drone with the scheduler's --drone-secret"
                .into(),
        ));
    }
    let tracked = inner.clone();
    Ok(ws.on_upgrade(move |socket| async move {
        let tasks = tracked.tasks.clone();
        tasks.track_future(serve_session(tracked, socket)).await
    }))
}

/// `GET /v1/drones`.
pub(crate) async fn list(State(inner): State<Shared>) -> Result<Json<DroneList>, ApiError> {
    let now = inner.clock.now_ms();
    let records = list_drones(inner.store.as_ref()).await?;
    let drains = list_drains(inner.store.as_ref()).await?;
    let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut live: BTreeMap<String, u64> = BTreeMap::new();
    for b in list_backends(inner.store.as_ref()).await? {
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
    names.extend(inner.drones.all().into_iter().map(|d| d.name));
    names.sort();
    names.dedup();
    let drones = names
        .into_iter()
        .map(|name| {
            let rec = records.get(&name);
            let conn = inner.drones.get(&name);
            let drain = drains.get(&name);
            let live_here = live.get(&name).copied().unwrap_or(0);
            let unhealthy = conn.as_ref().and_then(|c| c.status.unhealthy());
            let state = match (&conn, drain) {
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
                reserved: inner
                    .route_load
                    .get(&name)
                    .map(|v| *v)
                    .unwrap_or(Amounts::default()),
                backends: counts.remove(&name).unwrap_or_default(),
                heartbeat_age_ms: conn.as_ref().map(|c| match rec.and_then(|r| r.lease) {
                    Some(_) => now.saturating_sub(c.status.last_heartbeat()),
                    None => 0,
                }),
                drain_deadline_at: drain.and_then(|d| d.deadline_at),
                message: unhealthy,
                name,
            }
        })
        .collect();
    Ok(Json(DroneList { drones }))
}

/// `POST /v1/drones/{name}/drain`: cordon at once; terminate what remains at the deadline.
pub(crate) async fn drain(
    State(inner): State<Shared>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<DrainRequest>,
) -> Result<Response, ApiError> {
    known_drone(&inner, &name).await?;
    let now = inner.clock.now_ms();
    let rec = DrainRecord {
        started_at: now,
        deadline_at: req.deadline_s.map(|s| now + s * 1000),
    };
    inner
        .store
        .put(
            &drain_key(&name),
            serde_json::to_vec(&rec).unwrap_or_default(),
            None,
        )
        .await?;
    inner.drains.insert(name.clone(), rec);
    tracing::info!(drone = %name, deadline_s = ?req.deadline_s, "drain started");
    let view = view_of(&inner, &name).await?;
    Ok((http::StatusCode::ACCEPTED, Json(view)).into_response())
}

/// `POST /v1/drones/{name}/undrain`.
pub(crate) async fn undrain(
    State(inner): State<Shared>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    known_drone(&inner, &name).await?;
    inner.store.delete(&drain_key(&name)).await?;
    inner.drains.remove(&name);
    tracing::info!(drone = %name, "drain cancelled");
    Ok(Json(view_of(&inner, &name).await?).into_response())
}

async fn known_drone(inner: &Inner, name: &str) -> Result<(), ApiError> {
    let known = inner.drones.get(name).is_some()
        || inner
            .store
            .get(&crate::records::drone_key(name))
            .await?
            .is_some()
        || inner.store.get(&drain_key(name)).await?.is_some();
    if known {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "no drone {name}: see `hangar drones` for the connected ones"
        )))
    }
}

async fn view_of(inner: &Shared, name: &str) -> Result<DroneView, ApiError> {
    let Json(list) = list(State(inner.clone())).await?;
    list.drones
        .into_iter()
        .find(|d| d.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("no drone {name}")))
}
