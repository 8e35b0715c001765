//! The HTTP API (JSON): the router and the state its handlers share.
//!
//! Handlers depend on components ([`Handles`]: one `Arc` per component), never the reverse;
//! nothing below this module knows about HTTP except the error type. Submodules import
//! [`Handles`] and [`ApiJson`] from their own modules, never from this one. Each submodule serves one
//! area: [`backends`] (connect, list, status, events, terminate), [`logs`] (a backend's
//! output, from its drone), [`drones`] (the session
//! endpoint, list, drain), [`feed`] (what remote proxies follow and report), [`acme`] (DNS-01
//! challenge records), [`maintenance`] (maintenance windows), [`ui`] (the operator dashboard's
//! embedded assets at `/ui`) and [`traffic`] (a backend's recent request rate and latency).

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use hangar_core::api::HotList;

use crate::error::ApiError;

mod acme;
pub mod auth;
mod backends;
mod drones;
pub mod events;
mod extract;
mod feed;
pub mod forward;
mod handles;
mod logs;
mod maintenance;
mod pools;
mod quotas;
mod tokens;
mod traffic;
mod ui;

pub use extract::ApiJson;
use extract::MAX_BODY;
pub use handles::{Components, Handles, forward_client, forward_client_with};
pub use maintenance::{MaintenanceRequest, MaintenanceView, begin_maintenance};

/// Longest `GET /v1/cluster` waits for each store read.
const STORE_READ: std::time::Duration = std::time::Duration::from_millis(500);

/// The API's routes.
pub fn router(handles: Handles) -> Router {
    Router::new()
        .route("/v1/connect", post(backends::connect))
        .route("/v1/backends", get(backends::list))
        .route("/v1/backends/{id}", get(backends::get))
        .route("/v1/backends/{id}/events", get(backends::events))
        .route("/v1/backends/{id}/logs", get(logs::logs))
        .route("/v1/backends/{id}/terminate", post(backends::terminate))
        .route("/v1/backends/{id}/traffic", get(traffic::get))
        .route("/v1/activity", post(feed::activity))
        .route("/v1/routes/feed", get(feed::route_feed))
        .route("/v1/tokens/revoke", post(feed::revoke))
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/tokens/{id}", axum::routing::delete(tokens::revoke))
        .route("/v1/quotas", get(quotas::list))
        .route(
            "/v1/quotas/{namespace}",
            axum::routing::put(quotas::set).delete(quotas::remove),
        )
        .route("/v1/pools", get(pools::list).post(pools::create))
        .route(
            "/v1/pools/{name}",
            get(pools::get).patch(pools::set).delete(pools::delete),
        )
        .route("/v1/pools/{name}/rollout", post(pools::rollout))
        .route("/v1/pools/{name}/promote", post(pools::promote))
        .route("/v1/pools/{name}/rollback", post(pools::rollback))
        .route("/v1/pools/{name}/events", get(events::pool_events))
        .route("/v1/hot", get(hot))
        .route("/v1/cluster", get(cluster))
        .route("/v1/events", get(events::events))
        .route(
            "/v1/maintenance",
            get(maintenance::get).post(maintenance::post),
        )
        .route("/v1/drones", get(drones::list))
        .route("/v1/drones/connect", get(drones::connect))
        .route("/v1/drones/{name}/drain", post(drones::drain))
        .route("/v1/drones/{name}/undrain", post(drones::undrain))
        .route(
            "/v1/dns/acme-challenge",
            get(acme::list).post(acme::post).delete(acme::delete),
        )
        .route("/healthz", get(|| async { "ok" }))
        .merge(ui::routes())
        .route("/readyz", get(readyz))
        .fallback(|| async {
            ApiError::NotFound("no such API endpoint: see the README for the API".into())
        })
        .layer(axum::middleware::from_fn_with_state(
            handles.clone(),
            forward::writes_to_leader,
        ))
        // Outermost: a request is authorized before it is forwarded to the leader.
        .layer(axum::middleware::from_fn_with_state(
            handles.clone(),
            auth::authorize,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(handles)
}

/// `GET /readyz`: routes loaded and at least one drone attached.
async fn readyz(State(h): State<Handles>) -> Result<&'static str, ApiError> {
    if !h.routes.is_ready() {
        return Err(ApiError::Unavailable("routes are not loaded yet".into()));
    }
    if h.directory.is_empty() {
        return Err(ApiError::Unavailable("no drone is connected".into()));
    }
    Ok("ready")
}

/// `GET /v1/hot`.
async fn hot(State(h): State<Handles>) -> Json<HotList> {
    Json((*h.hot.list()).clone())
}

/// `GET /v1/cluster`: the control-plane instances, the leader and its term, and whether the
/// store answers.
async fn cluster(State(h): State<Handles>) -> Json<ClusterView> {
    // An operator's view must answer even when the store does not: each read is bounded.
    let store = match tokio::time::timeout(STORE_READ, h.store.revision()).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {STORE_READ:?}")),
    };
    // Past a failed first read, the store is not asked again.
    let up = store.is_ok();
    let leader = bounded_read(up, h.store.get(crate::leader::LEADER_KEY))
        .await
        .flatten()
        .and_then(|kv| {
            let r = serde_json::from_slice::<crate::leader::LeaderRecord>(&kv.value).ok()?;
            Some(LeaderView {
                instance: r.instance,
                api_url: r.api_url,
                elected_at: r.elected_at,
                term: kv.create_revision,
            })
        });
    let listing = bounded_read(up, h.store.list(crate::leader::INSTANCES_PREFIX)).await;
    let instances = match listing {
        Some(listing) => listing
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<crate::leader::LeaderRecord>(&kv.value).ok())
            .map(|r| InstanceView {
                leader: leader.as_ref().is_some_and(|l| l.instance == r.instance),
                instance: r.instance,
                api_url: r.api_url,
                started_at: r.elected_at,
            })
            .collect(),
        None => Vec::new(),
    };
    Json(ClusterView {
        this_instance: h.leadership.instance().to_string(),
        this_leads: h.leadership.token().is_some(),
        leader,
        instances,
        store: StoreView {
            healthy: store.is_ok(),
            revision: store.as_ref().ok().copied(),
            error: store.err(),
        },
    })
}

/// A store read for `GET /v1/cluster`: skipped when the store already failed, bounded by
/// [`STORE_READ`].
async fn bounded_read<T>(
    up: bool,
    read: impl std::future::Future<Output = hangar_store::StoreResult<T>>,
) -> Option<T> {
    if !up {
        return None;
    }
    tokio::time::timeout(STORE_READ, read)
        .await
        .ok()
        .and_then(Result::ok)
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
pub struct ClusterView {
    pub this_instance: String,
    /// Whether the instance that answered believes it leads (its own view; the store's is
    /// `leader`).
    pub this_leads: bool,
    pub leader: Option<LeaderView>,
    pub instances: Vec<InstanceView>,
    pub store: StoreView,
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
pub struct LeaderView {
    pub instance: String,
    pub api_url: String,
    pub elected_at: u64,
    /// The leader key's create revision: the term's fencing token.
    pub term: u64,
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
pub struct InstanceView {
    pub instance: String,
    pub api_url: String,
    pub started_at: u64,
    pub leader: bool,
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
pub struct StoreView {
    pub healthy: bool,
    pub revision: Option<u64>,
    pub error: Option<String>,
}
