//! Per-backend activity: when each backend last saw traffic and how many requests and
//! upgraded connections are open, for the scheduler's idle timeouts.
//!
//! A `DashMap` of atomics: independent per-backend counters with high churn, updated on every
//! request without a global lock. Guards are never held across an `.await` on the map itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use hangar_core::BackendId;
use hangar_core::activity::ActivityReport;
use hangar_core::route::RouteTable;

#[derive(Debug, Default)]
struct Counters {
    last_active: AtomicU64,
    open: AtomicU64,
}

/// Activity of every backend this proxy has served.
#[derive(Debug, Default)]
pub struct ActivityTracker {
    backends: DashMap<BackendId, Arc<Counters>>,
}

/// Counts one open request or upgraded connection; marks the backend active on creation and
/// on drop.
#[derive(Debug)]
pub struct ActivityGuard {
    counters: Arc<Counters>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ActivityTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `backend` active and counts one open request until the guard drops.
    pub fn begin(&self, backend: &BackendId) -> ActivityGuard {
        let counters = match self.backends.get(backend.as_str()) {
            Some(c) => c.clone(),
            None => self.backends.entry(backend.clone()).or_default().clone(),
        };
        counters.last_active.store(now_ms(), Ordering::Relaxed);
        counters.open.fetch_add(1, Ordering::Relaxed);
        ActivityGuard { counters }
    }

    /// A report per backend seen, for the scheduler.
    pub fn snapshot(&self) -> Vec<ActivityReport> {
        self.backends
            .iter()
            .map(|e| ActivityReport {
                backend: e.key().clone(),
                last_active: e.value().last_active.load(Ordering::Relaxed),
                open: e.value().open.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Forgets backends that are no longer live in `table` and have nothing open, so the map
    /// stays bounded by the live backends.
    pub fn prune(&self, table: &RouteTable) {
        self.backends
            .retain(|id, c| table.is_live(id.as_str()) || c.open.load(Ordering::Relaxed) > 0);
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.counters.last_active.store(now_ms(), Ordering::Relaxed);
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_open_and_prune_keeps_busy() {
        let t = ActivityTracker::new();
        let id = BackendId::parse("b1").unwrap();
        let g1 = t.begin(&id);
        let g2 = t.begin(&id);
        let snap = t.snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].open, 2);
        assert!(snap[0].last_active > 0);
        drop(g1);
        t.prune(&RouteTable::default());
        assert_eq!(t.snapshot()[0].open, 1, "busy backends survive pruning");
        drop(g2);
        t.prune(&RouteTable::default());
        assert!(t.snapshot().is_empty());
    }
}
