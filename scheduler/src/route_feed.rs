//! The route feed: follows backend records in the store (list, then watch) and publishes a new
//! immutable [`RouteTable`] after each batch of changes. It is the only writer of the table;
//! the proxy and DNS only read snapshots.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hangar_core::BackendId;
use hangar_core::api::Amounts;
use hangar_core::route::{Route, RouteTable};
use tokio_util::sync::CancellationToken;

use crate::records::{BACKENDS_PREFIX, BackendRecord};
use crate::scheduler::Inner;
use hangar_store::{Revision, StoreResult, WatchEvent};

/// How long to wait before re-listing after the store failed.
const RETRY: Duration = Duration::from_millis(500);

#[derive(Clone)]
struct Entry {
    route: Route,
    drone: Option<String>,
    live: bool,
    need: crate::placement::Need,
    /// The state name, and when it became ready (or was created): for the monitor.
    state: &'static str,
    since: hangar_core::UnixMillis,
    /// The CPU cap the spawn set, if any.
    cpu_cap_millis: Option<u64>,
}

/// Routes as of a store revision.
pub(crate) struct FeedState {
    entries: HashMap<BackendId, Entry>,
    revision: Revision,
}

pub(crate) struct RouteFeed {
    inner: Arc<Inner>,
}

fn entry(inner: &Inner, rec: &BackendRecord) -> Entry {
    Entry {
        route: rec.route(),
        drone: rec.drone.clone(),
        live: rec.state.is_live(),
        need: inner.need(&rec.spawn),
        state: rec.state.name(),
        since: rec.ready_at.unwrap_or(rec.created_at),
        cpu_cap_millis: rec.spawn.resources.cpu_millis,
    }
}

impl RouteFeed {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        RouteFeed { inner }
    }

    /// Lists every backend record and publishes the table.
    pub(crate) async fn load(&self) -> StoreResult<FeedState> {
        let listing = self.inner.store.list(BACKENDS_PREFIX).await?;
        let mut entries = HashMap::with_capacity(listing.kvs.len());
        for kv in &listing.kvs {
            match serde_json::from_slice::<BackendRecord>(&kv.value) {
                Ok(rec) => {
                    entries.insert(rec.id.clone(), entry(&self.inner, &rec));
                }
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "skipping unreadable backend record")
                }
            }
        }
        let state = FeedState {
            entries,
            revision: listing.revision,
        };
        self.publish(&state);
        Ok(state)
    }

    fn publish(&self, state: &FeedState) {
        let table = RouteTable::new(
            state.revision,
            state.entries.values().map(|e| e.route.clone()),
        );
        let mut load: HashMap<&str, Amounts> = HashMap::new();
        for e in state.entries.values().filter(|e| e.live) {
            if let Some(d) = &e.drone {
                let l = load.entry(d.as_str()).or_default();
                l.backends += 1;
                l.cpu_millis += e.need.cpu_millis;
                l.memory_mb += e.need.memory_mb;
            }
        }
        self.inner
            .route_load
            .retain(|k, _| load.contains_key(k.as_str()));
        for (d, n) in load {
            self.inner.route_load.insert(d.to_string(), n);
        }
        // The live backends for the monitor, labelled like their routes.
        let directory: crate::monitor::Directory = state
            .entries
            .iter()
            .filter(|(_, e)| e.live)
            .map(|(id, e)| {
                let placed = crate::monitor::Placed {
                    drone: e.route.drone.clone(),
                    pool: e.route.pool.clone().unwrap_or_else(|| "default".into()),
                    state: e.state,
                    cpu_cap_millis: e.cpu_cap_millis,
                    since: e.since,
                };
                (id.clone(), placed)
            })
            .collect();
        *self
            .inner
            .directory
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(directory);
        self.inner.routes.send_replace(Arc::new(table));
        self.inner.routes_ready.store(true, Ordering::Release);
    }

    fn apply(&self, state: &mut FeedState, ev: WatchEvent) {
        state.revision = state.revision.max(ev.revision());
        match ev {
            WatchEvent::Put(kv) => match serde_json::from_slice::<BackendRecord>(&kv.value) {
                Ok(rec) => {
                    state
                        .entries
                        .insert(rec.id.clone(), entry(&self.inner, &rec));
                }
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "skipping unreadable backend record")
                }
            },
            WatchEvent::Delete { key, .. } => {
                if let Some(id) = key.strip_prefix(BACKENDS_PREFIX) {
                    state.entries.remove(id);
                }
            }
        }
    }

    /// Watches from the loaded revision, publishing after each batch; re-lists whenever the
    /// watch breaks (compaction, slow consumer, store restart).
    pub(crate) async fn run(self, mut state: FeedState, cancel: CancellationToken) {
        loop {
            let watch = tokio::select! {
                _ = cancel.cancelled() => return,
                w = self.inner.store.watch(BACKENDS_PREFIX, state.revision + 1) => w,
            };
            match watch {
                Ok(mut events) => loop {
                    let first = tokio::select! {
                        _ = cancel.cancelled() => return,
                        ev = events.recv() => ev,
                    };
                    let Some(first) = first else { break };
                    self.apply(&mut state, first);
                    // Batch whatever else is already queued into one swap.
                    while let Ok(ev) = events.try_recv() {
                        self.apply(&mut state, ev);
                    }
                    self.publish(&state);
                },
                Err(e) => tracing::warn!(error = %e, "route feed watch failed; listing again"),
            }
            // Re-list to recover whatever the broken watch missed.
            loop {
                match self.load().await {
                    Ok(s) => {
                        state = s;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "route feed cannot list backends; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(RETRY) => {}
                        }
                    }
                }
            }
        }
    }
}
