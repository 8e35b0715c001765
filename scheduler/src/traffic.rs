//! Per-backend traffic over the last minutes, for the dashboard's chart
//! (`GET /v1/backends/{id}/traffic`): request rate and mean latency in fixed steps.
//!
//! Built from the proxies' activity reports (`hangar_core::activity`), which carry cumulative
//! counters per proxy: requests forwarded, requests answered and the sum of their durations.
//! [`TrafficWindow`] turns them into per-step deltas (the first report of a proxy and backend is
//! a baseline; a counter that goes down means the proxy restarted) and keeps, per backend, only
//! the steps that had traffic within the last [`WINDOW_MS`]: an idle backend costs one baseline
//! entry per proxy, a busy one at most [`STEPS`] buckets. Reports are taken only for live
//! backends (the route publisher's directory), so a report cannot create state for a backend
//! that does not exist; a backend's buckets outlive it until they age out of the window.
//!
//! Like the hot-shard windows, this is process-local: each instance sees its own proxies'
//! reports.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use hangar_core::activity::ActivityBatch;
use hangar_core::{BackendId, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::routes::Routes;

/// The width of one sample.
pub const STEP_MS: u64 = 5_000;
/// How many samples are kept: five minutes.
pub const STEPS: u64 = 60;
/// How far back samples go.
pub const WINDOW_MS: u64 = STEP_MS * STEPS;

/// What a proxy last reported for a backend (cumulative counters).
#[derive(Clone, Copy, Debug, Default)]
struct Last {
    requests: u64,
    answered: u64,
    duration_us: u64,
}

/// The traffic of one step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bucket {
    /// The step's start (a multiple of [`STEP_MS`]).
    start: UnixMillis,
    requests: u64,
    answered: u64,
    duration_us: u64,
}

/// One sample of `GET /v1/backends/{id}/traffic`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrafficSample {
    /// The step's start (Unix milliseconds).
    pub at: UnixMillis,
    /// Requests forwarded during the step, summed over every proxy reporting here.
    pub requests: u64,
    pub requests_per_second: f64,
    /// Mean duration of the requests answered during the step; `None` when none was.
    pub mean_latency_ms: Option<f64>,
}

/// `GET /v1/backends/{id}/traffic`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrafficView {
    pub backend: BackendId,
    pub step_s: u64,
    pub window_s: u64,
    /// When the view was taken; the last sample is the last complete step before it.
    pub now: UnixMillis,
    /// Every complete step of the window, oldest first (steps without traffic are zeros).
    pub samples: Vec<TrafficSample>,
}

/// The windows of every backend: pure over timestamped reports.
#[derive(Debug, Default)]
pub struct TrafficWindow {
    /// Per proxy, per backend: the last cumulative counters (the baseline of the next delta).
    last: HashMap<String, HashMap<BackendId, Last>>,
    /// Per backend, the steps with traffic within the window, oldest first.
    buckets: HashMap<BackendId, VecDeque<Bucket>>,
    /// When state of gone backends was last dropped.
    pruned_at: UnixMillis,
}

impl TrafficWindow {
    /// Takes a proxy's reports at `now`, for the backends `live` accepts.
    pub fn observe(
        &mut self,
        now: UnixMillis,
        batch: &ActivityBatch,
        live: impl Fn(&BackendId) -> bool,
    ) {
        let start = now - now % STEP_MS;
        let by_backend = match self.last.get_mut(&batch.proxy) {
            Some(m) => m,
            None => self.last.entry(batch.proxy.clone()).or_default(),
        };
        for r in &batch.reports {
            if !live(&r.backend) {
                continue;
            }
            let now_counts = Last {
                requests: r.requests,
                answered: r.answered,
                duration_us: r.duration_us_total,
            };
            let Some(last) = by_backend.get_mut(&r.backend) else {
                by_backend.insert(r.backend.clone(), now_counts);
                continue;
            };
            // A proxy that restarted counts from zero again: its whole count is new.
            let delta = |cur: u64, before: u64| if cur >= before { cur - before } else { cur };
            let d = Bucket {
                start,
                requests: delta(now_counts.requests, last.requests),
                answered: delta(now_counts.answered, last.answered),
                duration_us: delta(now_counts.duration_us, last.duration_us),
            };
            *last = now_counts;
            if d.requests == 0 && d.answered == 0 {
                continue;
            }
            let ring = self.buckets.entry(r.backend.clone()).or_default();
            match ring.back_mut() {
                Some(b) if b.start == start => {
                    b.requests += d.requests;
                    b.answered += d.answered;
                    b.duration_us += d.duration_us;
                }
                _ => ring.push_back(d),
            }
            while ring.front().is_some_and(|b| b.start + WINDOW_MS < start) {
                ring.pop_front();
            }
        }
        if now.saturating_sub(self.pruned_at) >= STEP_MS {
            self.pruned_at = now;
            self.prune(now, live);
        }
    }

    /// Drops the baselines of backends that are gone and the samples older than the window, so
    /// the state stays bounded by the live backends and the recently busy ones.
    fn prune(&mut self, now: UnixMillis, live: impl Fn(&BackendId) -> bool) {
        for by_backend in self.last.values_mut() {
            by_backend.retain(|id, _| live(id));
        }
        self.last.retain(|_, m| !m.is_empty());
        let oldest = (now - now % STEP_MS).saturating_sub(WINDOW_MS);
        self.buckets.retain(|_, ring| {
            while ring.front().is_some_and(|b| b.start < oldest) {
                ring.pop_front();
            }
            !ring.is_empty()
        });
    }

    /// The complete steps of the window before `now` for `backend`, oldest first.
    pub fn view(&self, backend: &BackendId, now: UnixMillis) -> TrafficView {
        let current = now - now % STEP_MS;
        let first = current.saturating_sub(WINDOW_MS);
        let ring = self.buckets.get(backend);
        let samples = (0..STEPS)
            .map(|i| first + i * STEP_MS)
            .map(|at| {
                let b = ring
                    .and_then(|r| r.iter().find(|b| b.start == at))
                    .copied()
                    .unwrap_or_default();
                TrafficSample {
                    at,
                    requests: b.requests,
                    requests_per_second: b.requests as f64 * 1000.0 / STEP_MS as f64,
                    mean_latency_ms: (b.answered > 0)
                        .then(|| b.duration_us as f64 / b.answered as f64 / 1000.0),
                }
            })
            .collect();
        TrafficView {
            backend: backend.clone(),
            step_s: STEP_MS / 1000,
            window_s: WINDOW_MS / 1000,
            now,
            samples,
        }
    }

    /// How many backends have samples (for tests and bounds).
    pub fn busy_backends(&self) -> usize {
        self.buckets.len()
    }
}

/// The component: the window behind a lock, fed by activity reports for live backends.
pub struct Traffic {
    clock: Arc<dyn Clock>,
    routes: Arc<Routes>,
    /// A std mutex: observations and views are short and never await while holding it.
    window: Mutex<TrafficWindow>,
}

impl Traffic {
    pub fn new(clock: Arc<dyn Clock>, routes: Arc<Routes>) -> Self {
        Traffic {
            clock,
            routes,
            window: Mutex::new(TrafficWindow::default()),
        }
    }

    /// A proxy's activity report.
    pub fn observe_activity(&self, batch: &ActivityBatch) {
        let now = self.clock.now_ms();
        let dir = self.routes.directory();
        self.window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(now, batch, |id| dir.contains_key(id));
    }

    /// The last minutes of `backend`'s traffic.
    pub fn view(&self, backend: &BackendId) -> TrafficView {
        let now = self.clock.now_ms();
        self.window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .view(backend, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_core::activity::ActivityReport;

    fn id(s: &str) -> BackendId {
        BackendId::parse(s).unwrap()
    }

    fn batch(proxy: &str, reports: &[(&str, u64, u64, u64)]) -> ActivityBatch {
        ActivityBatch {
            proxy: proxy.into(),
            reports: reports
                .iter()
                .map(
                    |&(b, requests, answered, duration_us_total)| ActivityReport {
                        backend: id(b),
                        last_active: 0,
                        open: 0,
                        requests,
                        answered,
                        duration_us_total,
                    },
                )
                .collect(),
        }
    }

    const T0: UnixMillis = 1_000_000;

    #[test]
    fn rates_and_mean_latency_per_step_summed_over_proxies() {
        let mut w = TrafficWindow::default();
        let all = |_: &BackendId| true;
        // Baselines: the counts before the window are not traffic seen here.
        w.observe(T0, &batch("p1", &[("b1", 100, 100, 1_000_000)]), all);
        w.observe(T0, &batch("p2", &[("b1", 7, 7, 70_000)]), all);
        // During the step [T0, T0+5s): p1 forwards 50 answered in 20 ms each, p2 another 10
        // answered in 5 ms each.
        w.observe(
            T0 + 1_000,
            &batch("p1", &[("b1", 150, 150, 2_000_000)]),
            all,
        );
        w.observe(T0 + 2_000, &batch("p2", &[("b1", 17, 17, 120_000)]), all);
        // Next step: p1 restarted (its counter went down): its 4 requests are new.
        w.observe(T0 + 6_000, &batch("p1", &[("b1", 4, 0, 0)]), all);

        let v = w.view(&id("b1"), T0 + 10_000);
        assert_eq!(v.samples.len(), STEPS as usize);
        assert_eq!(v.step_s, 5);
        assert_eq!(v.window_s, 300);
        let last = &v.samples[v.samples.len() - 1];
        let before = &v.samples[v.samples.len() - 2];
        assert_eq!(before.at, T0);
        assert_eq!(before.requests, 60);
        assert_eq!(before.requests_per_second, 12.0);
        let mean = before.mean_latency_ms.unwrap();
        assert!(
            (mean - (1_050_000.0 / 60.0 / 1000.0)).abs() < 1e-9,
            "{mean}"
        );
        assert_eq!(last.at, T0 + 5_000);
        assert_eq!(last.requests, 4);
        assert_eq!(last.mean_latency_ms, None, "nothing answered in that step");
        assert!(
            v.samples[..v.samples.len() - 2]
                .iter()
                .all(|s| s.requests == 0)
        );

        // The partial current step is not shown.
        let v = w.view(&id("b1"), T0 + 7_000);
        assert_eq!(v.samples.last().unwrap().at, T0);
    }

    #[test]
    fn only_live_backends_and_only_the_window_are_kept() {
        let mut w = TrafficWindow::default();
        let live = |b: &BackendId| b.as_str() != "gone";
        w.observe(T0, &batch("p", &[("b1", 0, 0, 0), ("gone", 0, 0, 0)]), live);
        w.observe(
            T0 + 1,
            &batch("p", &[("b1", 5, 5, 5), ("gone", 9, 9, 9)]),
            live,
        );
        assert_eq!(w.busy_backends(), 1, "a report cannot create a backend");
        assert_eq!(
            w.view(&id("gone"), T0 + 5_000).samples.len(),
            STEPS as usize
        );
        assert!(
            w.view(&id("gone"), T0 + 5_000)
                .samples
                .iter()
                .all(|s| s.requests == 0)
        );
        // Past the window with no traffic, the backend's samples are dropped, and so is its
        // baseline once it is no longer live.
        let later = T0 + WINDOW_MS + 2 * STEP_MS;
        w.observe(later, &batch("p", &[]), |_| false);
        assert_eq!(w.busy_backends(), 0);
        assert!(w.last.is_empty());
    }

    #[test]
    fn state_is_bounded_by_the_steps_of_the_window() {
        let mut w = TrafficWindow::default();
        let all = |_: &BackendId| true;
        for i in 0..(3 * STEPS) {
            w.observe(T0 + i * STEP_MS, &batch("p", &[("b1", i, i, i)]), all);
        }
        // The window's steps and the current one.
        assert!(w.buckets[&id("b1")].len() <= STEPS as usize + 1);
        let v = w.view(&id("b1"), T0 + 3 * STEPS * STEP_MS);
        assert!(v.samples.iter().all(|s| s.requests == 1), "{v:?}");
    }
}
