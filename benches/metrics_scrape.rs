//! Scrape cost with 10,000 live backends: the time to publish the proxy's per-backend counts
//! (the collector that runs before each scrape) and to render the exposition, its size and
//! series count, gzip, the top-K mode, and what churn does to it (ended backends stay for the
//! grace period, then leave). Uses the binary's exporter (`src/metrics/exporter.rs` and
//! `src/metrics/backends.rs`, included below) with every per-backend series the proxy and the
//! scheduler register, through the same code paths: the proxy's `ActivityTracker` for traffic
//! series, and the facade with the scheduler's names and labels for usage and hotness.
//!
//! The reference, measured in the same run on the same samples, is the exporter as it was
//! before the per-backend store: `metrics-exporter-prometheus`'s generic recorder, the
//! expiring series split by name over four recorders rendered in parallel.
//!
//! `cargo bench --bench metrics_scrape` runs the full measurement; without `--bench` (as
//! `cargo test --benches` runs it) it does a short smoke run with fewer backends.

#[allow(dead_code)]
#[path = "../src/metrics/backends.rs"]
mod backends;
#[allow(dead_code)]
#[path = "../src/metrics/exporter.rs"]
mod exporter;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hangar_core::BackendId;
use hangar_core::route::{Route, RouteState, RouteTable};
use hangar_proxy::ActivityTracker;
use hangar_scheduler::metrics as sm;
use metrics::{Label, Recorder};

/// The binary's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DRONES: usize = 20;
/// Every this many backends one is flagged hot (the top-K mode always shows hot backends).
const HOT_EVERY: usize = 1_000;

/// The exporter before the per-backend store, for the reference column.
mod reference {
    use std::time::Duration;

    use metrics::{
        Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
    };
    use metrics_exporter_prometheus::{
        Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
    };
    use metrics_util::MetricKindMask;

    const SHARDS: usize = 4;

    pub struct Generic {
        shards: Vec<PrometheusRecorder>,
        handles: Vec<PrometheusHandle>,
    }

    impl Generic {
        pub fn new(grace: Duration) -> Generic {
            let shards: Vec<PrometheusRecorder> = (0..SHARDS)
                .map(|_| {
                    PrometheusBuilder::new()
                        .set_buckets_for_metric(
                            Matcher::Full(
                                hangar_proxy::metrics::BACKEND_REQUEST_DURATION_SECONDS.into(),
                            ),
                            &hangar_proxy::metrics::DURATION_BUCKETS,
                        )
                        .unwrap()
                        .idle_timeout(MetricKindMask::ALL, Some(grace))
                        .build_recorder()
                })
                .collect();
            let handles = shards.iter().map(PrometheusRecorder::handle).collect();
            Generic { shards, handles }
        }

        fn shard(&self, name: &str) -> &PrometheusRecorder {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in name.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            &self.shards[(h % SHARDS as u64) as usize]
        }

        /// The shards rendered on threads of their own, as the exporter did.
        pub fn render(&self) -> Vec<u8> {
            let parts: Vec<Vec<u8>> = std::thread::scope(|scope| {
                let running: Vec<_> = self
                    .handles
                    .iter()
                    .map(|h| {
                        scope.spawn(move || {
                            let mut out = Vec::new();
                            let _ = h.render_to_write(&mut out);
                            out
                        })
                    })
                    .collect();
                running.into_iter().map(|t| t.join().unwrap()).collect()
            });
            parts.concat()
        }

        pub fn upkeep(&self) {
            for h in &self.handles {
                h.run_upkeep();
            }
        }
    }

    impl Recorder for Generic {
        fn describe_counter(&self, key: KeyName, unit: Option<Unit>, d: SharedString) {
            for r in &self.shards {
                r.describe_counter(key.clone(), unit, d.clone());
            }
        }
        fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, d: SharedString) {
            for r in &self.shards {
                r.describe_gauge(key.clone(), unit, d.clone());
            }
        }
        fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, d: SharedString) {
            for r in &self.shards {
                r.describe_histogram(key.clone(), unit, d.clone());
            }
        }
        fn register_counter(&self, key: &Key, m: &Metadata<'_>) -> Counter {
            self.shard(key.name()).register_counter(key, m)
        }
        fn register_gauge(&self, key: &Key, m: &Metadata<'_>) -> Gauge {
            self.shard(key.name()).register_gauge(key, m)
        }
        fn register_histogram(&self, key: &Key, m: &Metadata<'_>) -> Histogram {
            self.shard(key.name()).register_histogram(key, m)
        }
    }
}

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
    set_scheduler_series(&[cpu.clone(), mem.clone(), hot.clone()], i);
    [cpu, mem, hot]
}

fn set_scheduler_series(g: &[metrics::Gauge; 3], i: usize) {
    g[0].set(i as f64 * 0.013);
    g[1].set(20_000_000.0 + i as f64);
    g[2].set(if i % HOT_EVERY == HOT_EVERY - 1 {
        1.0
    } else {
        0.0
    });
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

/// Series (name and labels) → value, for comparing two expositions.
fn samples(text: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(text)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.to_string()))
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
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
            set_scheduler_series(g, i);
        }
        drone_series();
    }
}

/// Sorted publish, render and total times of `n` scrapes, and the last output.
struct Scrapes {
    publish: Vec<Duration>,
    render: Vec<Duration>,
    total: Vec<Duration>,
    out: Vec<u8>,
}

/// Scrapes `n` times: the collector, then the render.
fn scrape(tracker: &ActivityTracker, render: &dyn Fn() -> Vec<u8>, n: usize) -> Scrapes {
    let (mut publish, mut rendered, mut total) = (Vec::new(), Vec::new(), Vec::new());
    let mut out = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        tracker.publish_metrics();
        let t1 = Instant::now();
        out = render();
        let t2 = Instant::now();
        publish.push(t1 - t0);
        rendered.push(t2 - t1);
        total.push(t2 - t0);
    }
    publish.sort();
    rendered.sort();
    total.sort();
    Scrapes {
        publish,
        render: rendered,
        total,
        out,
    }
}

/// A steady fleet of `backends` live, busy backends recorded into `recorder`, scraped once to
/// settle and then `n` times.
fn steady(
    recorder: &dyn Recorder,
    render: &dyn Fn() -> Vec<u8>,
    upkeep: &dyn Fn(),
    backends: usize,
    n: usize,
) -> (Scrapes, Fleet) {
    metrics::with_local_recorder(recorder, || {
        hangar_proxy::metrics::describe();
        sm::describe();
        let fleet = Fleet::new(Duration::from_secs(300), 0..backends);
        // Once so that histograms are drained and every series exists.
        upkeep();
        scrape(&fleet.tracker, render, 1);
        fleet.tick(0..backends);
        upkeep();
        (scrape(&fleet.tracker, render, n), fleet)
    })
}

fn row(name: &str, v: &[Duration]) {
    println!(
        "| {name} | {} | {} |",
        ms(percentile(v, 0.5)),
        ms(*v.last().unwrap())
    );
}

fn size(out: &[u8], backends: usize) -> String {
    let lines = sample_lines(out);
    format!(
        "{:.1} MB, {lines} samples ({:.0} bytes and {:.1} samples per backend)",
        out.len() as f64 / 1e6,
        out.len() as f64 / backends as f64,
        lines as f64 / backends as f64
    )
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (backends, scrapes) = if full { (10_000, 20) } else { (1_000, 3) };
    let top_k = backends / 10;
    let grace = Duration::from_secs(300);

    // The reference: the generic recorder, as before.
    let generic = reference::Generic::new(grace);
    let (reference, fleet) = steady(
        &generic,
        &|| generic.render(),
        &|| generic.upkeep(),
        backends,
        scrapes,
    );
    drop(fleet);
    drop(generic);

    // The exporter, every backend's series.
    let (recorder, exporter) = exporter::build_with(grace, None).unwrap();
    let (all, fleet) = steady(
        &recorder,
        &|| exporter.render(),
        &|| exporter.run_upkeep(),
        backends,
        scrapes,
    );
    // The request path: one request's activity and metrics bookkeeping on a known backend.
    let r = route(0);
    let n = if full { 2_000_000 } else { 100_000 };
    let t = Instant::now();
    metrics::with_local_recorder(&recorder, || {
        for _ in 0..n {
            let mut g = fleet.tracker.begin_route(&r);
            g.set_status(200);
        }
    });
    let per_request = t.elapsed() / n;
    drop(fleet);
    drop(recorder);

    // Gzip of the full exposition, as a scrape with `Accept-Encoding: gzip` gets it.
    let mut gzip_times = Vec::new();
    let mut gzipped = Vec::new();
    for _ in 0..if full { 5 } else { 2 } {
        let t = Instant::now();
        gzipped = exporter::gzip(&all.out);
        gzip_times.push(t.elapsed());
    }
    gzip_times.sort();

    // The top-K mode.
    let (recorder, exporter) = exporter::build_with(grace, Some(top_k)).unwrap();
    let (top, fleet) = steady(
        &recorder,
        &|| exporter.render(),
        &|| exporter.run_upkeep(),
        backends,
        scrapes,
    );
    drop(fleet);
    drop(recorder);

    println!("# Scrape with {backends} live backends ({DRONES} drones), {scrapes} scrapes");
    println!();
    println!("| | p50 | max |");
    println!("| --- | --- | --- |");
    row("reference: publish (proxy collector)", &reference.publish);
    row("reference: render (generic recorder)", &reference.render);
    row("reference: scrape (publish + render)", &reference.total);
    row("publish (proxy collector)", &all.publish);
    row("render (per-backend store)", &all.render);
    row("scrape (publish + render)", &all.total);
    row("gzip of the exposition (level 1)", &gzip_times);
    row(&format!("top-K ({top_k}): publish"), &top.publish);
    row(&format!("top-K ({top_k}): render"), &top.render);
    row(&format!("top-K ({top_k}): scrape"), &top.total);
    println!();
    println!("reference exposition: {}", size(&reference.out, backends));
    println!("exposition: {}", size(&all.out, backends));
    println!(
        "gzipped: {:.2} MB ({:.1}x smaller)",
        gzipped.len() as f64 / 1e6,
        all.out.len() as f64 / gzipped.len() as f64
    );
    println!("top-K exposition: {}", size(&top.out, backends));
    println!("request path (begin_route + status + drop on a known backend): {per_request:?}");

    // The same series with the same values (durations aside: they are measured), and no
    // sample left out.
    let (a, b) = (samples(&reference.out), samples(&all.out));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the per-backend store renders the series the generic recorder renders"
    );
    for (k, v) in &a {
        if !k.contains("duration_seconds_sum") {
            assert_eq!(
                v.parse::<f64>().unwrap(),
                b[k].parse::<f64>().unwrap(),
                "{k}"
            );
        }
    }

    // Churn with a short grace period: every backend ends and as many new ones start. The
    // ended ones stay for the grace period (published once more, then untouched), then leave.
    let grace = Duration::from_secs(if full { 5 } else { 2 });
    let (recorder, exporter) = exporter::build_with(grace, None).unwrap();
    let live_lines = sample_lines(&all.out);
    let _guard = metrics::set_default_local_recorder(&recorder);
    let render = || exporter.render();
    let old = Fleet::new(grace, 0..backends);
    scrape(&old.tracker, &render, 1);
    old.tracker.prune(&RouteTable::new(2, std::iter::empty()));
    drop(old);
    let new = Fleet::new(grace, backends..2 * backends);
    let churn = scrape(&new.tracker, &render, 1);
    let churn_lines = sample_lines(&churn.out);
    println!(
        "after {backends} ended and {backends} started, within the grace period: {:.1} MB, {churn_lines} samples, scrape {} (publish {}, render {})",
        churn.out.len() as f64 / 1e6,
        ms(churn.total[0]),
        ms(churn.publish[0]),
        ms(churn.render[0])
    );
    let start = Instant::now();
    let mut upkeep = Duration::ZERO;
    let settled = loop {
        std::thread::sleep(grace / 4);
        new.tick(backends..2 * backends);
        let s = scrape(&new.tracker, &render, 1);
        // The maintenance loop's upkeep, off the scrape: frees what the render dropped.
        let t = Instant::now();
        exporter.run_upkeep();
        upkeep = upkeep.max(t.elapsed());
        if sample_lines(&s.out) <= live_lines || start.elapsed() > grace * 10 {
            break s;
        }
    };
    println!(
        "{:?} later (grace {grace:?}): {:.1} MB, {} samples, scrape {} (publish {}, render {})",
        start.elapsed(),
        settled.out.len() as f64 / 1e6,
        sample_lines(&settled.out),
        ms(settled.total[0]),
        ms(settled.publish[0]),
        ms(settled.render[0])
    );
    println!(
        "freeing the ended backends' series in the upkeep after that scrape: {}",
        ms(upkeep)
    );
    let settled = settled.out;
    assert_eq!(
        sample_lines(&settled),
        live_lines,
        "ended backends' series must leave after the grace period, live ones stay"
    );
}
