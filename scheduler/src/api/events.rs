//! `GET /v1/events`: the cluster's events as Server-Sent Events (`event: cluster`, data one
//! [`ClusterEvent`]), as an operator tails them: backend state changes, drones joining, leaving
//! and changing health, drains starting and ending. It follows the store from the current
//! revision (or `?from=<revision>`, to resume), so every instance tells the same events.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use hangar_store::{KeyValue, WatchEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::handles::Handles;
use crate::error::ApiError;
use crate::pools::POOLS_PREFIX;
use crate::records::{
    BACKENDS_PREFIX, BackendRecord, DRAINS_PREFIX, DRONES_PREFIX, DrainRecord, DroneRecord,
};
use hangar_core::pool::Pool;

/// One event of the cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterEvent {
    /// The store revision it happened at (resume with `?from=<revision + 1>`).
    pub revision: u64,
    /// `backend`, `drone`, `drain` or `pool`.
    pub kind: String,
    /// The backend id or the drone name.
    pub id: String,
    /// What happened: a backend's state (`scheduled` … `terminated`), `joined`, `left`,
    /// `unhealthy`, `healthy`, `started`, `ended`.
    pub what: String,
    /// More: a backend's key, drone and end reason; a drone's run and why it is unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    from: Option<u64>,
}

/// What the stream remembers to tell changes from repeats (a backend record is rewritten
/// without a state change, a drone record when only its health changes).
#[derive(Default)]
struct Seen {
    backends: HashMap<String, String>,
    drones: HashMap<String, Option<String>>,
    /// Each pool's generation and rollout generation.
    pools: HashMap<String, (u64, Option<u64>)>,
}

impl Seen {
    /// The event a store change is, if it is one.
    fn event(&mut self, ev: &WatchEvent) -> Option<ClusterEvent> {
        let at = ev.revision();
        let mk = |kind: &str, id: &str, what: &str, detail: Option<String>| ClusterEvent {
            revision: at,
            kind: kind.into(),
            id: id.into(),
            what: what.into(),
            detail,
        };
        match ev {
            WatchEvent::Put(KeyValue { key, value, .. }) => {
                if key.starts_with(BACKENDS_PREFIX) {
                    let rec: BackendRecord = serde_json::from_slice(value).ok()?;
                    let state = rec.state.name().to_string();
                    let id = rec.id.to_string();
                    if self.backends.get(&id) == Some(&state) {
                        return None;
                    }
                    if rec.state.is_live() {
                        self.backends.insert(id.clone(), state.clone());
                    } else {
                        self.backends.remove(&id);
                    }
                    let mut detail = Vec::new();
                    if let Some(k) = &rec.key {
                        detail.push(format!("key {k}"));
                    }
                    if let Some(d) = &rec.drone {
                        detail.push(format!("drone {d}"));
                    }
                    if let Some(r) = rec.state.termination_reason() {
                        detail.push(format!("reason {r}"));
                    }
                    if let Some(m) = &rec.message {
                        detail.push(m.clone());
                    }
                    Some(mk("backend", &id, &state, Some(detail.join(", "))))
                } else if let Some(name) = key.strip_prefix(DRONES_PREFIX) {
                    let rec: DroneRecord = serde_json::from_slice(value).ok()?;
                    let before = self.drones.insert(name.to_string(), rec.unhealthy.clone());
                    let what = match (&before, &rec.unhealthy) {
                        (None, _) => "joined",
                        (Some(a), b) if a == b => return None,
                        (_, Some(_)) => "unhealthy",
                        (_, None) => "healthy",
                    };
                    let mut detail = format!("run {}", rec.run_id);
                    if let Some(i) = &rec.instance {
                        detail.push_str(&format!(", session on {i}"));
                    }
                    if let Some(why) = &rec.unhealthy {
                        detail.push_str(&format!(": {why}"));
                    }
                    Some(mk("drone", name, what, Some(detail)))
                } else if let Some(name) = key.strip_prefix(POOLS_PREFIX) {
                    let pool: Pool = serde_json::from_slice(value).ok()?;
                    let rollout = pool.rollout.as_ref().map(|r| r.generation);
                    let now = (pool.generation, rollout);
                    let before = self.pools.insert(name.to_string(), now);
                    let generation = |n: u64| pool.generations.iter().find(|g| g.number == n);
                    let (what, detail) = match before {
                        None => ("created", format!("generation {}", pool.generation)),
                        Some(b) if b == now => return None,
                        Some((_, None)) if rollout.is_some() => {
                            let r = pool.rollout.as_ref()?;
                            (
                                "rollout",
                                format!(
                                    "generation {} to {}% of new sessions",
                                    r.generation, r.canary_percent
                                ),
                            )
                        }
                        Some((from, Some(g))) if rollout.is_none() => {
                            let ended = generation(g);
                            let status = ended.map_or("ended", |e| e.status.as_str());
                            let what = match status {
                                "stable" => "promoted",
                                "rolled_back" => "rolled_back",
                                _ => "reverted",
                            };
                            let why = ended.and_then(|e| e.message.clone()).unwrap_or_default();
                            (
                                what,
                                format!(
                                    "generation {g}; new sessions get {} (was {from}): {why}",
                                    pool.generation
                                ),
                            )
                        }
                        Some((from, _)) => (
                            "rolled_back",
                            format!(
                                "new sessions get generation {} (was {from})",
                                pool.generation
                            ),
                        ),
                    };
                    Some(mk("pool", name, what, Some(detail)))
                } else if let Some(name) = key.strip_prefix(DRAINS_PREFIX) {
                    let rec: DrainRecord = serde_json::from_slice(value).ok()?;
                    let detail = rec.deadline_at.map(|at| format!("deadline {at}"));
                    Some(mk("drain", name, "started", detail))
                } else {
                    None
                }
            }
            WatchEvent::Delete { key, .. } => {
                if let Some(name) = key.strip_prefix(POOLS_PREFIX) {
                    self.pools.remove(name);
                    Some(mk("pool", name, "deleted", None))
                } else if let Some(name) = key.strip_prefix(DRONES_PREFIX) {
                    self.drones.remove(name);
                    Some(mk("drone", name, "left", None))
                } else {
                    key.strip_prefix(DRAINS_PREFIX)
                        .map(|name| mk("drain", name, "ended", None))
                }
            }
        }
    }
}

/// `GET /v1/events[?from=<revision>]`.
pub(crate) async fn events(
    State(h): State<Handles>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    stream(h, query, |_| true).await
}

/// `GET /v1/pools/{name}/events[?from=<revision>]`: one pool's events (created, rollout,
/// promoted, reverted, rolled_back, deleted).
pub(crate) async fn pool_events(
    State(h): State<Handles>,
    axum::extract::Path(name): axum::extract::Path<String>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    if h.pools.get(&name).is_none() {
        return Err(ApiError::NotFound(format!(
            "no pool {name:?}: see `hangar pool ls`"
        )));
    }
    stream(h, query, move |e| e.kind == "pool" && e.id == name).await
}

async fn stream(
    h: Handles,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
    wanted: impl Fn(&ClusterEvent) -> bool + Send + 'static,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?;
    let from = match q.from {
        Some(r) => r,
        None => h.store.revision().await? + 1,
    };
    let mut watch = h.store.watch("/hangar/", from).await?;
    let (tx, rx) = mpsc::channel(64);
    let cancel = h.cancel.clone();
    h.tasks.spawn(async move {
        let mut seen = Seen::default();
        loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tx.closed() => return,
                ev = watch.recv() => ev,
            };
            let Some(ev) = ev else { return };
            let Some(event) = seen.event(&ev).filter(|e| wanted(e)) else {
                continue;
            };
            let sse = Event::default()
                .event("cluster")
                .json_data(&event)
                .unwrap_or_else(|_| Event::default().event("error"));
            if tx.send(Ok::<_, Infallible>(sse)).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &impl Serialize, revision: u64) -> WatchEvent {
        WatchEvent::Put(KeyValue {
            key: key.into(),
            value: serde_json::to_vec(value).unwrap(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease: None,
        })
    }

    #[test]
    fn drones_and_drains_are_told_once_per_change() {
        let mut seen = Seen::default();
        let mut drone = DroneRecord {
            name: "d1".into(),
            run_id: "r1".into(),
            runtime: "process".into(),
            pool: "default".into(),
            capacity: Default::default(),
            connected_at: 0,
            lease: Some(1),
            host: None,
            unhealthy: None,
            instance: Some("a".into()),
        };
        let key = format!("{DRONES_PREFIX}d1");
        let what = |e: Option<ClusterEvent>| e.map(|e| e.what);
        assert_eq!(
            what(seen.event(&put(&key, &drone, 2))).as_deref(),
            Some("joined")
        );
        assert_eq!(what(seen.event(&put(&key, &drone, 3))), None, "a repeat");
        drone.unhealthy = Some("docker is down".into());
        let e = seen.event(&put(&key, &drone, 4)).unwrap();
        assert_eq!((e.what.as_str(), e.revision), ("unhealthy", 4));
        assert!(e.detail.unwrap().contains("docker is down"));
        drone.unhealthy = None;
        assert_eq!(
            what(seen.event(&put(&key, &drone, 5))).as_deref(),
            Some("healthy")
        );
        let gone = WatchEvent::Delete {
            key: key.clone(),
            revision: 6,
            prev: None,
        };
        assert_eq!(what(seen.event(&gone)).as_deref(), Some("left"));
        let drain = DrainRecord {
            started_at: 0,
            deadline_at: Some(60_000),
        };
        let dkey = format!("{DRAINS_PREFIX}d1");
        assert_eq!(
            what(seen.event(&put(&dkey, &drain, 7))).as_deref(),
            Some("started")
        );
        let ended = WatchEvent::Delete {
            key: dkey,
            revision: 8,
            prev: None,
        };
        assert_eq!(what(seen.event(&ended)).as_deref(), Some("ended"));
        // Other records are not events.
        assert!(
            seen.event(&put("/hangar/keys/default/doc", &1, 9))
                .is_none()
        );
    }

    /// Every generation change of a pool is one event: created, a rollout starting, its
    /// promotion or revert, a rollback, the pool deleted; status updates are not events.
    #[test]
    fn generation_changes_of_a_pool_are_events() {
        use hangar_core::pool::{Bounds, Generation, Rollout, Template};
        let mut seen = Seen::default();
        let generation = |number: u64, status: &str, message: Option<&str>| Generation {
            number,
            template: Template::default(),
            created_at: 0,
            status: status.into(),
            message: message.map(Into::into),
        };
        let mut pool = Pool {
            name: "rooms".into(),
            warm: 2,
            max_live: None,
            drone_pool: "default".into(),
            bounds: Bounds::for_warm(2),
            promote_after: 3,
            generation: 1,
            rollout: None,
            generations: vec![generation(1, "stable", None)],
            status: Default::default(),
            created_at: 0,
            updated_at: 0,
        };
        let key = format!("{POOLS_PREFIX}rooms");
        let tell = |seen: &mut Seen, pool: &Pool, rev: u64| {
            seen.event(&put(&key, pool, rev))
                .map(|e| (e.what, e.detail.unwrap_or_default()))
        };
        assert_eq!(tell(&mut seen, &pool, 1).unwrap().0, "created");
        pool.status.warm_ready = 2;
        assert!(tell(&mut seen, &pool, 2).is_none(), "a status update");
        pool.generations.push(generation(2, "rolling", None));
        pool.rollout = Some(Rollout {
            generation: 2,
            canary_percent: 20,
            started_at: 0,
            deadline_at: 1,
            max_failure_percent: 50,
            healthy: 0,
            failed: 0,
        });
        let (what, detail) = tell(&mut seen, &pool, 3).unwrap();
        assert_eq!(what, "rollout");
        assert!(detail.contains("generation 2 to 20%"), "{detail}");
        pool.rollout = None;
        pool.generations[1] = generation(2, "reverted", Some("2 of 2 starts failed"));
        let (what, detail) = tell(&mut seen, &pool, 4).unwrap();
        assert_eq!(what, "reverted");
        assert!(detail.contains("2 of 2 starts failed"), "{detail}");
        pool.generation = 2;
        assert_eq!(tell(&mut seen, &pool, 5).unwrap().0, "rolled_back");
        let gone = WatchEvent::Delete {
            key: key.clone(),
            revision: 6,
            prev: None,
        };
        assert_eq!(seen.event(&gone).unwrap().what, "deleted");
    }
}
