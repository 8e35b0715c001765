//! Hot-shard detection: sliding-window rates per backend (requests per second from the
//! proxies' activity reports, CPU cores from the drones' usage reports) and per drone, and the
//! rules that call them hot.
//!
//! A backend is hot when, for the sustain period, its request rate exceeds a multiple of the
//! median rate of the other active backends of its pool (and a floor), or its CPU use exceeds
//! a fraction of its CPU cap. A drone is hot when, for the sustain period, its backends use
//! more than a fraction of its CPU capacity or more than a fraction of its CPU or memory is
//! reserved. A flag clears once its conditions have been false for the sustain period too, so
//! a rate hovering at the threshold does not flap.
//!
//! Pure logic: observations and evaluations carry their time (`UnixMillis` from the
//! scheduler's injected clock); nothing here does IO or reads a clock. `monitor` feeds it and
//! acts on its verdicts; [`plan_relief`] picks the idle neighbours to move off a hot drone.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use hangar_core::api::{HotBackend, HotDrone, HotReason, HotSettings};
use hangar_core::{BackendId, UnixMillis};

use crate::Fast;

/// The detector's thresholds.
#[derive(Clone, Debug, PartialEq)]
pub struct HotConfig {
    /// Rates are measured over this sliding window.
    pub window: Duration,
    /// How long a condition must hold before the flag is raised (and stop holding before it
    /// clears).
    pub sustain: Duration,
    /// A backend is hot when its request rate is above this multiple of the median rate of
    /// the other backends with traffic in its pool...
    pub rate_multiple: f64,
    /// ...and above this many requests per second (a pool of near-idle backends has no hot
    /// shard).
    pub min_rate: f64,
    /// Backends with traffic a pool needs (the judged one included) before rates are compared.
    pub min_active_in_pool: usize,
    /// A backend with a CPU cap is hot when it uses more than this fraction of it.
    pub cpu_fraction: f64,
    /// A drone is hot when its backends use more than this fraction of its CPU capacity...
    pub drone_cpu_fraction: f64,
    /// ...or more than this fraction of its CPU or memory capacity is reserved.
    pub drone_reserved_fraction: f64,
}

impl Default for HotConfig {
    fn default() -> Self {
        HotConfig {
            window: Duration::from_secs(30),
            sustain: Duration::from_secs(10),
            rate_multiple: 5.0,
            min_rate: 1.0,
            min_active_in_pool: 3,
            cpu_fraction: 0.9,
            drone_cpu_fraction: 0.9,
            drone_reserved_fraction: 0.95,
        }
    }
}

impl HotConfig {
    /// Checks the thresholds; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.window < Duration::from_secs(2) {
            return Err("--hot-window must be at least 2 seconds".into());
        }
        if !(self.rate_multiple > 1.0 && self.rate_multiple.is_finite()) {
            return Err("--hot-rate-multiple must be a number above 1".into());
        }
        if !(self.min_rate >= 0.0 && self.min_rate.is_finite()) {
            return Err("--hot-min-rate must be a number of requests per second, 0 or more".into());
        }
        for (flag, v) in [
            ("--hot-cpu-fraction", self.cpu_fraction),
            ("--hot-drone-cpu-fraction", self.drone_cpu_fraction),
            (
                "--hot-drone-reserved-fraction",
                self.drone_reserved_fraction,
            ),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(format!("{flag} must be a fraction above 0 and at most 1"));
            }
        }
        Ok(())
    }

    /// The thresholds as the API reports them.
    pub fn settings(&self, relieve: bool) -> HotSettings {
        HotSettings {
            window_s: self.window.as_secs_f64(),
            sustain_s: self.sustain.as_secs_f64(),
            rate_multiple: self.rate_multiple,
            min_rate: self.min_rate,
            cpu_fraction: self.cpu_fraction,
            drone_cpu_fraction: self.drone_cpu_fraction,
            drone_reserved_fraction: self.drone_reserved_fraction,
            relieve,
        }
    }

    fn window_ms(&self) -> u64 {
        self.window.as_millis() as u64
    }

    /// Samples are kept at least this far apart: about twenty per window.
    fn step_ms(&self) -> u64 {
        (self.window_ms() / 20).max(1)
    }
}

/// The shortest span a rate is computed over: less is noise.
const MIN_SPAN_MS: u64 = 1000;

/// A cumulative count sampled over time; its rate over the window.
#[derive(Debug, Default)]
struct Rate {
    /// `(time, cumulative)` oldest first: checkpoints about a step apart, and the newest
    /// sample last (replaced in place until it is a step past the previous checkpoint). The
    /// first sample is at or before the window's start once the window is full.
    samples: VecDeque<(UnixMillis, f64)>,
}

impl Rate {
    fn push(&mut self, now: UnixMillis, total: f64, window_ms: u64, step_ms: u64) {
        let n = self.samples.len();
        // The newest sample becomes a checkpoint once it is a step past the previous one;
        // until then it is replaced.
        if n >= 2 && self.samples[n - 1].0 < self.samples[n - 2].0 + step_ms {
            self.samples[n - 1] = (now, total);
        } else {
            self.samples.push_back((now, total));
        }
        let start = now.saturating_sub(window_ms);
        while self.samples.len() > 2 && self.samples[1].0 <= start {
            self.samples.pop_front();
        }
    }

    /// Per second over the window; `None` until the samples span a second. A series not
    /// observed for a whole window reads as zero (its source stopped reporting it).
    fn per_second(&self, now: UnixMillis, window_ms: u64) -> Option<f64> {
        let &(t1, v1) = self.samples.back()?;
        if now.saturating_sub(t1) > window_ms {
            return Some(0.0);
        }
        let &(t0, v0) = self.samples.front()?;
        let span = t1.saturating_sub(t0);
        if span < MIN_SPAN_MS {
            return None;
        }
        Some((v1 - v0).max(0.0) * 1000.0 / span as f64)
    }
}

/// A condition held (or not) over time, with the sustain rule applied.
#[derive(Debug, Default)]
struct Sustained {
    hot: bool,
    /// While the condition disagrees with `hot`: since when.
    pending_since: Option<UnixMillis>,
    hot_since: UnixMillis,
    /// The reasons last seen to hold.
    reasons: Vec<HotReason>,
}

impl Sustained {
    fn update(&mut self, now: UnixMillis, reasons: Vec<HotReason>, sustain_ms: u64) -> bool {
        let holds = !reasons.is_empty();
        if holds {
            self.reasons = reasons;
        }
        if holds == self.hot {
            self.pending_since = None;
        } else {
            let since = *self.pending_since.get_or_insert(now);
            if now.saturating_sub(since) >= sustain_ms {
                self.hot = holds;
                self.pending_since = None;
                if holds {
                    self.hot_since = now;
                }
            }
        }
        self.hot
    }
}

impl BackendTrack {
    /// Reported on within the window, or flagged (or about to be, or to clear).
    fn active(&self, now: UnixMillis, window_ms: u64) -> bool {
        let fresh = |r: &Rate| {
            r.samples
                .back()
                .is_some_and(|(at, _)| now.saturating_sub(*at) <= window_ms)
        };
        fresh(&self.requests)
            || fresh(&self.cpu)
            || self.state.hot
            || self.state.pending_since.is_some()
    }
}

#[derive(Debug, Default)]
struct BackendTrack {
    /// Requests summed over every proxy's deltas.
    requests_total: f64,
    requests: Rate,
    /// The drone's last cumulative CPU reading, and the sum of the deltas.
    cpu_last: Option<f64>,
    cpu_total: f64,
    cpu: Rate,
    state: Sustained,
}

/// A live backend as the detector judges it.
#[derive(Clone, Debug)]
pub struct BackendInput<'a> {
    pub id: &'a BackendId,
    pub drone: Option<&'a str>,
    pub pool: &'a str,
    /// Its CPU cap in cores, if its spawn set one.
    pub cpu_cap_cores: Option<f64>,
}

/// A connected drone as the detector judges it.
#[derive(Clone, Debug)]
pub struct DroneInput<'a> {
    pub name: &'a str,
    pub cpu_capacity_cores: f64,
    pub reserved_cpu_fraction: f64,
    pub reserved_memory_fraction: f64,
}

/// One evaluated backend or drone: its figures, and whether it is hot.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict<T> {
    pub hot: bool,
    pub view: T,
}

/// The outcome of one evaluation: every live backend and connected drone.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evaluation {
    pub backends: Vec<Verdict<HotBackend>>,
    pub drones: Vec<Verdict<HotDrone>>,
}

/// The detector's state: rates per backend, sustain state per backend and drone.
#[derive(Debug, Default)]
pub struct HotDetector {
    config: HotConfig,
    /// Hashed with foldhash: every live backend is looked up every pass, and the ids are the
    /// scheduler's own.
    backends: HashMap<BackendId, BackendTrack, Fast>,
    /// The last cumulative request count each proxy reported per backend.
    last_by_proxy: HashMap<String, HashMap<BackendId, u64, Fast>>,
    drones: HashMap<String, Sustained>,
}

impl HotDetector {
    pub fn new(config: HotConfig) -> Self {
        HotDetector {
            config,
            ..Default::default()
        }
    }

    pub fn config(&self) -> &HotConfig {
        &self.config
    }

    /// A proxy's cumulative request count for a backend. The first report of a (proxy,
    /// backend) pair is a baseline; a count that goes down means the proxy restarted.
    pub fn observe_requests(
        &mut self,
        now: UnixMillis,
        proxy: &str,
        backend: &BackendId,
        cumulative: u64,
    ) {
        let by_backend = match self.last_by_proxy.get_mut(proxy) {
            Some(m) => m,
            None => self.last_by_proxy.entry(proxy.to_string()).or_default(),
        };
        let delta = match by_backend.get_mut(backend) {
            Some(last) => {
                let d = if cumulative >= *last {
                    cumulative - *last
                } else {
                    cumulative
                };
                *last = cumulative;
                d
            }
            None => {
                by_backend.insert(backend.clone(), cumulative);
                0
            }
        };
        let (window, step) = (self.config.window_ms(), self.config.step_ms());
        let track = self.track(backend);
        track.requests_total += delta as f64;
        let total = track.requests_total;
        track.requests.push(now, total, window, step);
    }

    /// A drone's reading of a backend's cumulative CPU seconds.
    pub fn observe_cpu(&mut self, now: UnixMillis, backend: &BackendId, cpu_seconds_total: f64) {
        let (window, step) = (self.config.window_ms(), self.config.step_ms());
        let track = self.track(backend);
        let delta = match track.cpu_last {
            Some(last) if cpu_seconds_total >= last => cpu_seconds_total - last,
            // A restarted container starts again from zero.
            Some(_) => cpu_seconds_total,
            None => 0.0,
        };
        track.cpu_last = Some(cpu_seconds_total);
        track.cpu_total += delta;
        let total = track.cpu_total;
        track.cpu.push(now, total, window, step);
    }

    fn track(&mut self, backend: &BackendId) -> &mut BackendTrack {
        if !self.backends.contains_key(backend) {
            self.backends
                .insert(backend.clone(), BackendTrack::default());
        }
        self.backends.get_mut(backend).expect("just inserted")
    }

    /// Judges `backends` (those of them it has figures for) and every connected drone at
    /// `now`: [`HotDetector::evaluate_live`] over a list, for tests.
    #[cfg(test)]
    pub fn evaluate(
        &mut self,
        now: UnixMillis,
        backends: &[BackendInput<'_>],
        drones: &[DroneInput<'_>],
    ) -> Evaluation {
        let by_id: HashMap<&BackendId, &BackendInput<'_>, Fast> =
            backends.iter().map(|b| (b.id, b)).collect();
        self.evaluate_live(now, |id| by_id.get(id).map(|b| (*b).clone()), drones)
    }

    /// Judges every backend with figures (requests or CPU reported within the window, or a
    /// flag still to clear) and every connected drone at `now`; `live` says where a backend
    /// is, `None` once it is no longer live. A backend nobody reports on is never hot and costs
    /// nothing here: a pass follows the backends with traffic or usage, not every live one.
    /// State of backends that are no longer live, or quiet for a whole window with no flag,
    /// and of drones not given, is forgotten, so the detector stays bounded by what is active.
    pub fn evaluate_live<'d>(
        &mut self,
        now: UnixMillis,
        live: impl Fn(&BackendId) -> Option<BackendInput<'d>>,
        drones: &[DroneInput<'_>],
    ) -> Evaluation {
        let cfg = self.config.clone();
        let (window, sustain) = (cfg.window_ms(), cfg.sustain.as_millis() as u64);
        let mut backends: Vec<BackendInput<'d>> = Vec::new();
        self.backends.retain(|id, track| {
            let Some(b) = live(id) else { return false };
            if !track.active(now, window) {
                return false;
            }
            backends.push(b);
            true
        });
        for m in self.last_by_proxy.values_mut() {
            m.retain(|id, _| live(id).is_some());
        }
        self.last_by_proxy.retain(|_, m| !m.is_empty());

        // Rates first, then each pool's active rates sorted for the medians.
        let figures: Vec<(Option<f64>, Option<f64>)> = backends
            .iter()
            .map(|b| match self.backends.get(b.id) {
                Some(t) => (
                    t.requests.per_second(now, window),
                    t.cpu.per_second(now, window),
                ),
                None => (None, None),
            })
            .collect();
        let mut pools: HashMap<&str, Vec<f64>, Fast> = HashMap::default();
        for (b, (rps, _)) in backends.iter().zip(&figures) {
            if let Some(r) = rps
                && *r > 0.0
            {
                pools.entry(b.pool).or_default().push(*r);
            }
        }
        for rates in pools.values_mut() {
            rates.sort_by(f64::total_cmp);
        }

        let mut out = Evaluation::default();
        let mut drone_cpu: HashMap<&str, f64, Fast> = HashMap::default();
        for (b, (rps, cpu)) in backends.iter().zip(figures) {
            let median = match (rps, pools.get(b.pool)) {
                (Some(r), Some(rates)) if r > 0.0 && rates.len() >= cfg.min_active_in_pool => {
                    median_without(rates, r)
                }
                _ => None,
            };
            let mut reasons = Vec::new();
            if let (Some(r), Some(m)) = (rps, median)
                && r >= cfg.min_rate
                && r > cfg.rate_multiple * m
            {
                reasons.push(HotReason::RequestRate);
            }
            if let (Some(c), Some(cap)) = (cpu, b.cpu_cap_cores)
                && cap > 0.0
                && c > cfg.cpu_fraction * cap
            {
                reasons.push(HotReason::Cpu);
            }
            if let (Some(d), Some(c)) = (b.drone, cpu) {
                *drone_cpu.entry(d).or_default() += c;
            }
            let track = self.track(b.id);
            let hot = track.state.update(now, reasons, sustain);
            out.backends.push(Verdict {
                hot,
                view: HotBackend {
                    backend: b.id.clone(),
                    drone: b.drone.map(str::to_string),
                    pool: b.pool.to_string(),
                    reasons: track.state.reasons.clone(),
                    requests_per_second: rps,
                    pool_median_requests_per_second: median,
                    cpu_cores: cpu,
                    cpu_cap_cores: b.cpu_cap_cores,
                    hot_since: track.state.hot_since,
                },
            });
        }

        let connected: HashSet<&str> = drones.iter().map(|d| d.name).collect();
        self.drones
            .retain(|name, _| connected.contains(name.as_str()));
        for d in drones {
            let cpu = drone_cpu.get(d.name).copied().unwrap_or(0.0);
            let mut reasons = Vec::new();
            if d.cpu_capacity_cores > 0.0 && cpu > cfg.drone_cpu_fraction * d.cpu_capacity_cores {
                reasons.push(HotReason::Cpu);
            }
            if d.reserved_cpu_fraction > cfg.drone_reserved_fraction
                || d.reserved_memory_fraction > cfg.drone_reserved_fraction
            {
                reasons.push(HotReason::Reservations);
            }
            let state = match self.drones.get_mut(d.name) {
                Some(s) => s,
                None => self.drones.entry(d.name.to_string()).or_default(),
            };
            let hot = state.update(now, reasons, sustain);
            out.drones.push(Verdict {
                hot,
                view: HotDrone {
                    drone: d.name.to_string(),
                    reasons: state.reasons.clone(),
                    cpu_cores: cpu,
                    cpu_capacity_cores: d.cpu_capacity_cores,
                    reserved_cpu_fraction: d.reserved_cpu_fraction,
                    reserved_memory_fraction: d.reserved_memory_fraction,
                    hot_since: state.hot_since,
                },
            });
        }
        out
    }
}

/// The median of `sorted` with one occurrence of `value` taken out (the backend being
/// judged is not part of the yardstick); `None` if nothing remains.
fn median_without(sorted: &[f64], value: f64) -> Option<f64> {
    let skip = sorted.iter().position(|v| *v == value)?;
    let m = sorted.len() - 1;
    if m == 0 {
        return None;
    }
    // The k-th element of `sorted` without index `skip`.
    let at = |k: usize| sorted[if k < skip { k } else { k + 1 }];
    Some(if m % 2 == 1 {
        at(m / 2)
    } else {
        (at(m / 2 - 1) + at(m / 2)) / 2.0
    })
}

/// A live backend that might be moved off a hot drone.
#[derive(Clone, Debug)]
pub struct Neighbour<'a> {
    pub id: &'a BackendId,
    pub drone: &'a str,
    /// Ready (not starting, not ending).
    pub ready: bool,
    /// Requests in flight and open WebSockets, over every proxy.
    pub open: u64,
    /// Since its last request ended (or it became ready).
    pub idle_for: Duration,
    pub hot: bool,
}

/// Picks at most `max` idle neighbours to relocate: backends on a drone in `crowded` (drones
/// running a hot backend that placement has an alternative to), ready, not hot, with nothing
/// open and idle for at least `min_idle`, the longest idle first (then by id, so that several
/// schedulers would choose alike).
pub fn plan_relief(
    crowded: &HashSet<&str>,
    neighbours: &[Neighbour<'_>],
    min_idle: Duration,
    max: usize,
) -> Vec<BackendId> {
    let mut candidates: Vec<&Neighbour<'_>> = neighbours
        .iter()
        .filter(|n| {
            crowded.contains(n.drone) && n.ready && !n.hot && n.open == 0 && n.idle_for >= min_idle
        })
        .collect();
    candidates.sort_by(|a, b| b.idle_for.cmp(&a.idle_for).then(a.id.cmp(b.id)));
    candidates
        .into_iter()
        .take(max)
        .map(|n| n.id.clone())
        .collect()
}

/// What the relief of hot drones may do (`--relieve-hot`).
#[derive(Clone, Debug, PartialEq)]
pub struct ReliefConfig {
    /// Only backends idle (nothing open, no request ended) for this long are moved.
    pub min_idle: Duration,
    /// At most this many backends are stopped per monitor pass.
    pub max_per_pass: usize,
}

impl Default for ReliefConfig {
    fn default() -> Self {
        ReliefConfig {
            min_idle: Duration::from_secs(60),
            max_per_pass: 2,
        }
    }
}

#[cfg(test)]
#[path = "hot_tests.rs"]
mod tests;
