//! Scrape cost with 10,000 live backends: the time to publish the proxy's per-backend counts
//! (the collector that runs before each scrape) and to render the exposition, its size and
//! series count, and what churn does to it (ended backends stay for the grace period, then
//! leave). Uses the binary's exporter (`src/metrics/exporter.rs`, included below) with every
//! per-backend series the proxy and the scheduler register, through the same code paths:
//! the proxy's `ActivityTracker` for traffic series, and the facade with the scheduler's names
//! and labels for usage and hotness.
//!
//! `cargo bench --bench metrics_scrape` runs the full measurement; without `--bench` (as
//! `cargo test --benches` runs it) it does a short smoke run with fewer backends.

#[allow(dead_code)]
#[path = "../src/metrics/exporter.rs"]
mod exporter;

use std::time::{Duration, Instant};

use hangar_core::BackendId;
use hangar_core::route::{Route, RouteState, RouteTable};
use hangar_proxy::ActivityTracker;
use hangar_scheduler::metrics as sm;
use metrics::Label;

const DRONES: usize = 20;

fn route(i: usize) -> Route {
    Route {
        backend: BackendId::parse(&format!("b{i:012}")).unwrap(),
        state: RouteState::Ready,
        address: None,
        public: false,
        drone: Some(format!("drone-{}", i % DRONES).into()),
        pool: Some("default".into()),
        key: None,
        epoch: 0,
    }
}

/// Registers and sets the scheduler's per-backend gauges, as its usage reports and monitor
/// passes do.
fn scheduler_series(r: &Route, i: usize) -> [metrics::Gauge; 3] {
    let labels = || {
        vec![
            Label::new("backend", r.backend.to_string()),
            Label::new("drone", r.drone.as_deref().unwrap_or("").to_string()),
            Label::new("pool", "default"),
        ]
    };
    let cpu = metrics::gauge!(sm::BACKEND_CPU_SECONDS, labels());
    let mem = metrics::gauge!(sm::BACKEND_MEMORY_BYTES, labels());
    let hot = metrics::gauge!(sm::BACKEND_HOT, labels());
    cpu.set(i as f64 * 0.013);
    mem.set(20_000_000.0 + i as f64);
    hot.set(0.0);
    [cpu, mem, hot]
}

fn drone_series() {
    for d in 0..DRONES {
        let labels = || {
            vec![
                Label::new("drone", format!("drone-{d}")),
                Label::new("pool", "default"),
            ]
        };
        for name in [
            sm::DRONE_CAPACITY_CPU_CORES,
            sm::DRONE_CAPACITY_MEMORY_BYTES,
            sm::DRONE_CAPACITY_BACKENDS,
            sm::DRONE_RESERVED_CPU_CORES,
            sm::DRONE_RESERVED_MEMORY_BYTES,
            sm::DRONE_HEARTBEAT_AGE_SECONDS,
            sm::DRONE_CPU_USAGE_CORES,
            sm::DRONE_HOT,
        ] {
            metrics::gauge!(name, labels()).set(1.0);
        }
        for s in sm::DRONE_STATES {
            let mut l = labels();
            l.push(Label::new("state", s));
            metrics::gauge!(sm::DRONE_BACKENDS, l).set(1.0);
        }
    }
}

/// Traffic for backends `range`: three 2xx per backend, a 404 for every tenth.
fn traffic(tracker: &ActivityTracker, range: std::ops::Range<usize>) {
    for i in range {
        let r = route(i);
        for _ in 0..3 {
            let mut g = tracker.begin_route(&r);
            g.set_status(200);
        }
        if i % 10 == 0 {
            let mut g = tracker.begin_route(&r);
            g.set_status(404);
        }
    }
}

fn sample_lines(text: &[u8]) -> usize {
    text.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty() && l[0] != b'#')
        .count()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Scrapes `n` times: the collector, then the render. Returns sorted (publish, render, total)
/// times and the last output.
fn scrape(
    tracker: &ActivityTracker,
    exporter: &exporter::Exporter,
    n: usize,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>, Vec<u8>) {
    let (mut publish, mut render, mut total) = (Vec::new(), Vec::new(), Vec::new());
    let mut out = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        tracker.publish_metrics();
        let t1 = Instant::now();
        out = exporter.render();
        let t2 = Instant::now();
        publish.push(t1 - t0);
        render.push(t2 - t1);
        total.push(t2 - t0);
    }
    publish.sort();
    render.sort();
    total.sort();
    (publish, render, total, out)
}

/// Everything one scenario registers: the proxy's tracker with traffic, the scheduler's
/// gauges for the same backends, and the drones'.
struct Fleet {
    tracker: ActivityTracker,
    held: Vec<[metrics::Gauge; 3]>,
}

impl Fleet {
    fn new(grace: Duration, backends: std::ops::Range<usize>) -> Fleet {
        let tracker = ActivityTracker::new();
        tracker.set_metrics_grace(grace);
        traffic(&tracker, backends.clone());
        let held = backends.map(|i| scheduler_series(&route(i), i)).collect();
        drone_series();
        Fleet { tracker, held }
    }

    /// What a live fleet does between scrapes: more traffic, usage reports, the monitor's
    /// passes.
    fn tick(&self, backends: std::ops::Range<usize>) {
        traffic(&self.tracker, backends);
        for (i, g) in self.held.iter().enumerate() {
            g[0].set(i as f64 * 0.013);
            g[1].set(20_000_000.0 + i as f64);
            g[2].set(0.0);
        }
        drone_series();
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (backends, scrapes) = if full { (10_000, 20) } else { (1_000, 3) };

    // Steady state: every backend live and busy (the default grace, so nothing expires).
    let (recorder, exporter) = exporter::build(Duration::from_secs(300)).unwrap();
    let guard = metrics::set_default_local_recorder(&recorder);
    hangar_proxy::metrics::describe();
    sm::describe();
    let fleet = Fleet::new(Duration::from_secs(300), 0..backends);
    // Once so that histograms are drained and every series exists.
    scrape(&fleet.tracker, &exporter, 1);
    let (publish, render, total, out) = scrape(&fleet.tracker, &exporter, scrapes);
    let live_bytes = out.len();
    let live_lines = sample_lines(&out);
    println!("# Scrape with {backends} live backends ({DRONES} drones), {scrapes} scrapes");
    println!();
    println!("| | p50 | max |");
    println!("| --- | --- | --- |");
    for (name, v) in [
        ("publish (proxy collector)", &publish),
        ("render", &render),
        ("scrape (publish + render)", &total),
    ] {
        println!(
            "| {name} | {} | {} |",
            ms(percentile(v, 0.5)),
            ms(*v.last().unwrap())
        );
    }
    println!();
    println!(
        "exposition: {:.1} MB, {live_lines} samples ({:.0} bytes and {:.1} samples per backend)",
        live_bytes as f64 / 1e6,
        live_bytes as f64 / backends as f64,
        live_lines as f64 / backends as f64
    );

    // The request path: one request's activity and metrics bookkeeping on a known backend.
    let r = route(0);
    let n = if full { 2_000_000 } else { 100_000 };
    let t = Instant::now();
    for _ in 0..n {
        let mut g = fleet.tracker.begin_route(&r);
        g.set_status(200);
    }
    let per_request = t.elapsed() / n;
    println!("request path (begin_route + status + drop on a known backend): {per_request:?}");
    drop(fleet);
    drop(guard);

    // Churn with a short grace period: every backend ends and as many new ones start. The
    // ended ones stay for the grace period (published once more, then untouched), then leave.
    let grace = Duration::from_secs(if full { 5 } else { 2 });
    let (recorder, exporter) = exporter::build(grace).unwrap();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let old = Fleet::new(grace, 0..backends);
    scrape(&old.tracker, &exporter, 1);
    old.tracker.prune(&RouteTable::new(2, std::iter::empty()));
    drop(old);
    let new = Fleet::new(grace, backends..2 * backends);
    let (_, _, churn_total, out) = scrape(&new.tracker, &exporter, 1);
    let churn_lines = sample_lines(&out);
    println!(
        "after {backends} ended and {backends} started, within the grace period: {:.1} MB, {churn_lines} samples, scrape {}",
        out.len() as f64 / 1e6,
        ms(churn_total[0])
    );
    let start = Instant::now();
    let (settled_time, settled) = loop {
        std::thread::sleep(grace / 4);
        new.tick(backends..2 * backends);
        let (_, _, t, out) = scrape(&new.tracker, &exporter, 1);
        if sample_lines(&out) <= live_lines || start.elapsed() > grace * 10 {
            break (t[0], out);
        }
    };
    println!(
        "{:?} later (grace {grace:?}): {:.1} MB, {} samples, scrape {}",
        start.elapsed(),
        settled.len() as f64 / 1e6,
        sample_lines(&settled),
        ms(settled_time)
    );
    assert_eq!(
        sample_lines(&settled),
        live_lines,
        "ended backends' series must leave after the grace period, live ones stay"
    );
}
