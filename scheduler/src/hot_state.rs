//! Hot-shard state: the detector's sliding windows ([`crate::hot::HotDetector`]), what it last
//! found (`GET /v1/hot`, and placement, which avoids hot drones), the per-backend gauges of
//! usage and hotness, and the count of relocations.
//!
//! Observations arrive between monitor passes: proxies' activity reports (cumulative request
//! counts) and drones' usage reports (CPU seconds, memory), both filtered against the directory
//! of live backends the route publisher keeps, so that a report can never create state for a
//! backend that does not exist. The monitor is the only one that evaluates the detector and
//! publishes the list.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use hangar_core::UnixMillis;
use hangar_core::activity::ActivityBatch;
use hangar_core::api::HotList;
use hangar_core::drone::BackendUsage;

use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::hot::HotDetector;
use crate::metrics::BackendSeries;
use crate::routes::Routes;

pub struct HotShards {
    config: Arc<SchedulerConfig>,
    clock: Arc<dyn Clock>,
    routes: Arc<Routes>,
    /// A std mutex: observations and passes are short and never await while holding it.
    detector: Mutex<HotDetector>,
    /// What the detector last found; replaced whole by the monitor.
    list: RwLock<Arc<HotList>>,
    /// Cached handles of per-backend gauges (usage and hotness).
    series: BackendSeries,
    /// Backends relocated off hot drones since start.
    relocated_total: AtomicU64,
}

impl HotShards {
    pub fn new(config: Arc<SchedulerConfig>, clock: Arc<dyn Clock>, routes: Arc<Routes>) -> Self {
        let detector = HotDetector::new(config.hot.clone());
        let list = Arc::new(empty_list(&config));
        HotShards {
            config,
            clock,
            routes,
            detector: Mutex::new(detector),
            list: RwLock::new(list),
            series: BackendSeries::default(),
            relocated_total: AtomicU64::new(0),
        }
    }

    /// Request counts from a proxy's activity report.
    pub fn observe_activity(&self, batch: &ActivityBatch) {
        let now = self.clock.now_ms();
        let dir = self.routes.directory();
        let mut hot = self.detector();
        for r in &batch.reports {
            if dir.contains_key(&r.backend) {
                hot.observe_requests(now, &batch.proxy, &r.backend, r.requests);
            }
        }
    }

    /// A drone's usage report: gauges, and CPU for the detector. Reports for backends the
    /// drone does not run (per the records) are ignored.
    pub fn observe_usage(&self, drone: &str, usage: &[BackendUsage]) {
        let now = self.clock.now_ms();
        let dir = self.routes.directory();
        let mut hot = self.detector();
        for u in usage {
            let Some(p) = dir.get(&u.backend) else {
                continue;
            };
            if p.drone.as_deref() != Some(drone) || !u.cpu_seconds_total.is_finite() {
                continue;
            }
            hot.observe_cpu(now, &u.backend, u.cpu_seconds_total);
            self.series.usage(
                &u.backend,
                p.drone.as_ref(),
                &p.pool,
                u.cpu_seconds_total,
                u.memory_bytes,
            );
        }
    }

    /// What the detector last found.
    pub fn list(&self) -> Arc<HotList> {
        self.list
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Names of the drones the detector last flagged hot (placement avoids them).
    pub fn hot_drones(&self) -> HashSet<String> {
        self.list().drones.iter().map(|d| d.drone.clone()).collect()
    }

    /// Backends relocated off hot drones since start.
    pub fn relocated_total(&self) -> u64 {
        self.relocated_total.load(Ordering::Relaxed)
    }

    /// The detector, for the monitor's evaluation.
    pub(crate) fn detector(&self) -> MutexGuard<'_, HotDetector> {
        self.detector.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The per-backend gauges, for the monitor.
    pub(crate) fn series(&self) -> &BackendSeries {
        &self.series
    }

    /// An empty list with the current settings, stamped `evaluated_at`.
    pub(crate) fn fresh_list(&self, evaluated_at: UnixMillis) -> HotList {
        HotList {
            evaluated_at,
            relocated_total: self.relocated_total(),
            ..empty_list(&self.config)
        }
    }

    /// Replaces what `GET /v1/hot` answers (the monitor, after each pass).
    pub(crate) fn publish(&self, list: HotList) {
        *self.list.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(list);
    }

    /// Counts one relocation.
    pub(crate) fn relocated(&self) {
        self.relocated_total.fetch_add(1, Ordering::Relaxed);
    }
}

/// The list before the first pass.
fn empty_list(config: &SchedulerConfig) -> HotList {
    HotList {
        evaluated_at: 0,
        settings: config.hot.settings(config.relieve.is_some()),
        backends: Vec::new(),
        drones: Vec::new(),
        relocated_total: 0,
    }
}
