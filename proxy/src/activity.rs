//! Per-backend activity: when each backend last saw traffic, how many requests and upgraded
//! connections are open and how many requests it has had, for the scheduler's idle timeouts
//! and hot-shard detection; and its traffic metrics (see [`crate::metrics`]).
//!
//! A `DashMap` of atomics: independent per-backend counters with high churn, updated on every
//! request without a global lock. Guards are never held across an `.await` on the map itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use hangar_core::BackendId;
use hangar_core::activity::ActivityReport;
use hangar_core::route::{Route, RouteMode, RouteTable};

use crate::metrics::{BackendSeries, ProxyMetrics, Traffic, status_class};

#[derive(Debug)]
struct Counters {
    last_active: AtomicU64,
    open: AtomicU64,
    /// Requests forwarded since this proxy started (cumulative, for request rates).
    requests: AtomicU64,
    traffic: Traffic,
    series: BackendSeries,
}

impl Counters {
    fn new(backend: &BackendId, route: Option<&Route>) -> Self {
        Counters {
            last_active: AtomicU64::new(0),
            open: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            traffic: Traffic::default(),
            series: BackendSeries::new(backend.as_str(), route),
        }
    }

    fn publish(&self, open: u64) {
        self.series
            .publish(&self.traffic, open, self.requests.load(Ordering::Relaxed));
    }
}

/// How long a backend may go without requests before its duration histogram is registered
/// again on its next request, by default: half the binary's default metrics grace period (the
/// exporter drops a histogram idle for the whole grace period).
const DEFAULT_SERIES_STALE: Duration = Duration::from_secs(150);

/// Activity of every backend this proxy has served.
#[derive(Debug)]
pub struct ActivityTracker {
    backends: DashMap<BackendId, Arc<Counters>, foldhash::fast::RandomState>,
    metrics: ProxyMetrics,
    /// See [`ActivityTracker::set_metrics_grace`]; milliseconds.
    series_stale_ms: AtomicU64,
    /// When [`ActivityTracker::prune_lazily`] last pruned.
    pruned_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How often [`ActivityTracker::prune_lazily`] walks the tracked backends at most.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Default for ActivityTracker {
    fn default() -> Self {
        ActivityTracker {
            backends: DashMap::default(),
            metrics: ProxyMetrics::default(),
            series_stale_ms: AtomicU64::new(DEFAULT_SERIES_STALE.as_millis() as u64),
            pruned_at: std::sync::Mutex::new(None),
        }
    }
}

/// Counts one open request or upgraded connection; marks the backend active on creation and
/// on drop. On drop it also records the request's status class, duration and bytes.
#[derive(Debug)]
pub struct ActivityGuard {
    counters: Arc<Counters>,
    start: Instant,
    /// The wall clock at `start` (ms since the Unix epoch): the request's end, on the wall
    /// clock, is this plus the time it took, without a second read of the wall clock.
    start_ms: u64,
    /// The response status once known; 0 if the request ends without one (the client went
    /// away first), which counts as a 4xx like nginx's 499.
    status: u16,
    /// Upgraded: the request was recorded at the `101`; the guard now counts a WebSocket.
    upgraded: bool,
    sent_bytes: u64,
}

/// Where a request body's bytes are counted (see `forward::CountingBody`).
#[derive(Debug, Clone)]
pub(crate) struct ReceivedBytes(Arc<Counters>);

impl ReceivedBytes {
    pub(crate) fn add(&self, n: u64) {
        self.0
            .traffic
            .received_bytes
            .fetch_add(n, Ordering::Relaxed);
    }
}

/// The wall clock in milliseconds since the Unix epoch (what `last_active` holds).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ActivityTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `backend` active and counts one open request until the guard drops. Its
    /// metrics carry empty `drone` and `pool` labels; the proxy uses [`Self::begin_route`].
    pub fn begin(&self, backend: &BackendId) -> ActivityGuard {
        self.begin_labelled(backend, None, now_ms())
    }

    /// Like [`Self::begin`], labelling the backend's metrics with the route's drone and pool
    /// (taken from the first request; a backend never changes drone).
    pub fn begin_route(&self, route: &Route) -> ActivityGuard {
        self.begin_route_at(route, now_ms())
    }

    /// [`Self::begin_route`] with the wall clock ([`now_ms`]) the caller read already.
    pub(crate) fn begin_route_at(&self, route: &Route, now_ms: u64) -> ActivityGuard {
        self.begin_labelled(&route.backend, Some(route), now_ms)
    }

    fn begin_labelled(
        &self,
        backend: &BackendId,
        route: Option<&Route>,
        now: u64,
    ) -> ActivityGuard {
        let counters = match self.backends.get(backend.as_str()) {
            Some(c) => c.clone(),
            None => self
                .backends
                .entry(backend.clone())
                .or_insert_with(|| Arc::new(Counters::new(backend, route)))
                .clone(),
        };
        let previous = counters.last_active.swap(now, Ordering::Relaxed);
        if previous != 0
            && now.saturating_sub(previous) >= self.series_stale_ms.load(Ordering::Relaxed)
        {
            // Idle long enough that the exporter may have dropped the duration histogram.
            counters.series.refresh_histogram();
        }
        counters.open.fetch_add(1, Ordering::Relaxed);
        counters.requests.fetch_add(1, Ordering::Relaxed);
        ActivityGuard {
            counters,
            start: Instant::now(),
            start_ms: now,
            status: 0,
            upgraded: false,
            sent_bytes: 0,
        }
    }

    /// Counts a request by how it named its backend (`None`: it named none).
    pub(crate) fn count_request(&self, mode: Option<RouteMode>) {
        self.metrics.request(mode);
    }

    /// Counts a request the proxy answered itself, by its `x-hangar-error` code.
    pub(crate) fn count_error(&self, code: &'static str) {
        self.metrics.error(code);
    }

    /// The exporter's grace period: series not updated for this long are dropped. A backend
    /// idle for half of it gets its duration histogram registered again on its next request.
    pub fn set_metrics_grace(&self, grace: Duration) {
        self.series_stale_ms
            .store((grace / 2).as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// Copies every backend's traffic counts into the `metrics` recorder. Call before each
    /// scrape and at least every quarter of the grace period, which also keeps live
    /// backends' series from aging out.
    pub fn publish_metrics(&self) {
        // Collected first so that publishing never holds a map shard's lock.
        let all: Vec<Arc<Counters>> = self.backends.iter().map(|e| e.value().clone()).collect();
        for c in all {
            c.publish(c.open.load(Ordering::Relaxed));
        }
    }

    /// How many backends this proxy tracks.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// A report per backend seen, for the scheduler.
    pub fn snapshot(&self) -> Vec<ActivityReport> {
        self.backends
            .iter()
            .map(|e| ActivityReport {
                backend: e.key().clone(),
                last_active: e.value().last_active.load(Ordering::Relaxed),
                open: e.value().open.load(Ordering::Relaxed),
                requests: e.value().requests.load(Ordering::Relaxed),
                answered: e.value().traffic.answered(),
                duration_us_total: e.value().traffic.duration_us.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Forgets backends that are no longer live in `table` and have nothing open, so the map
    /// stays bounded by the live backends. A forgotten backend's metrics are published one
    /// last time (its gauges at zero); the exporter drops them after the grace period.
    /// [`ActivityTracker::prune`], at most once a second: for every published table, whose
    /// changes are few while the tracked backends may be many (a backend that ended stays
    /// tracked until the first prune after its table, a second at most while tables come).
    pub fn prune_lazily(&self, table: &RouteTable) {
        let now = std::time::Instant::now();
        {
            let mut at = self
                .pruned_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if at.is_some_and(|at| now.duration_since(at) < PRUNE_EVERY) {
                return;
            }
            *at = Some(now);
        }
        self.prune(table);
    }

    pub fn prune(&self, table: &RouteTable) {
        self.backends.retain(|id, c| {
            let keep = table.is_live(id.as_str()) || c.open.load(Ordering::Relaxed) > 0;
            if !keep {
                c.publish(0);
            }
            keep
        });
    }
}

impl ActivityGuard {
    /// The response's status, for the `status_class` label.
    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    /// Counts response body bytes sent to the client.
    pub(crate) fn add_sent(&mut self, n: u64) {
        self.sent_bytes += n;
    }

    /// Where to count the request body's bytes.
    pub(crate) fn received_bytes(&self) -> ReceivedBytes {
        ReceivedBytes(self.counters.clone())
    }

    /// The request was upgraded (`101`): records it as answered now; from here on the guard
    /// counts an open WebSocket until it drops.
    pub fn upgraded(&mut self) {
        if self.upgraded {
            return;
        }
        self.upgraded = true;
        self.status = 101;
        self.record(self.start.elapsed());
        self.counters
            .traffic
            .websockets
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Counts bytes of an upgraded connection: `received` from the client, `sent` to it.
    pub(crate) fn add_upgraded_bytes(&mut self, received: u64, sent: u64) {
        self.counters
            .traffic
            .received_bytes
            .fetch_add(received, Ordering::Relaxed);
        self.sent_bytes += sent;
    }

    fn record(&self, elapsed: Duration) {
        let class = if self.status == 0 {
            status_class(499)
        } else {
            status_class(self.status)
        };
        self.counters.traffic.by_class[class].fetch_add(1, Ordering::Relaxed);
        self.counters
            .traffic
            .duration_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.counters.series.record_duration(elapsed.as_secs_f64());
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        if self.upgraded {
            self.counters
                .traffic
                .websockets
                .fetch_sub(1, Ordering::Relaxed);
        } else {
            self.record(elapsed);
        }
        if self.sent_bytes > 0 {
            self.counters
                .traffic
                .sent_bytes
                .fetch_add(self.sent_bytes, Ordering::Relaxed);
        }
        let end_ms = self.start_ms + elapsed.as_millis() as u64;
        self.counters.last_active.store(end_ms, Ordering::Relaxed);
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

    #[test]
    fn answered_requests_and_their_durations_are_reported() {
        let t = ActivityTracker::new();
        let id = BackendId::parse("b1").unwrap();
        let mut g = t.begin(&id);
        g.set_status(200);
        std::thread::sleep(Duration::from_millis(2));
        let open = t.snapshot();
        assert_eq!((open[0].requests, open[0].answered), (1, 0));
        assert_eq!(open[0].duration_us_total, 0, "counted once answered");
        drop(g);
        let done = t.snapshot();
        assert_eq!((done[0].requests, done[0].answered), (1, 1));
        assert!(done[0].duration_us_total >= 2_000, "{:?}", done[0]);
    }
}
