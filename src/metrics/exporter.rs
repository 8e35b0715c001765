//! The Prometheus exporter behind one `metrics` recorder: `metrics-exporter-prometheus`
//! recorders and a router between them.
//!
//! Series labelled with a `backend` or a `drone` go to the *expiring* recorders, which drop a
//! series not updated for the grace period: that is how the series of ended backends and
//! departed drones leave the scrape. Their owners update live ones at least every quarter of
//! the grace period (the proxy on every scrape, the scheduler's monitor every second, usage
//! reports every few seconds), so a live series is never dropped. Everything else (per
//! proxy, per reason, per phase: small fixed label sets) goes to the *stable* recorder and is
//! never dropped, so that a rare event's counter does not vanish between occurrences.
//!
//! The expiring side is split by metric name over a few recorders rendered in parallel: with
//! thousands of backends nearly all of a scrape is per-backend series, and the exporter renders
//! one recorder on one thread. A metric name always lands in the same shard, so every family
//! stays one contiguous group in the exposition, as the text format requires.
//!
//! Self-contained so that the scrape benchmark can build the same exporter.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use metrics_util::MetricKindMask;

/// Labels that make a series per backend or per drone: routed to the expiring recorders.
pub const EXPIRING_LABELS: [&str; 2] = ["backend", "drone"];

/// Expiring recorders, rendered in parallel.
const SHARDS: usize = 4;

/// Histogram buckets (seconds) for histograms without their own.
const DEFAULT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Routes each series to the stable or an expiring recorder (see the module docs).
pub struct RoutingRecorder {
    stable: PrometheusRecorder,
    expiring: Vec<PrometheusRecorder>,
}

/// Renders what the recorders hold.
#[derive(Clone)]
pub struct Exporter {
    stable: PrometheusHandle,
    expiring: Vec<PrometheusHandle>,
}

fn builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets(&DEFAULT_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(hangar_proxy::metrics::BACKEND_REQUEST_DURATION_SECONDS.to_string()),
            &hangar_proxy::metrics::DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Prefix("hangar_scheduler_spawn_".to_string()),
            &hangar_scheduler::metrics::SPAWN_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(hangar_scheduler::metrics::PLACEMENT_SECONDS.to_string()),
            &hangar_scheduler::metrics::PLACEMENT_BUCKETS,
        )
}

/// Builds the recorder (to install) and the exporter (to render), dropping per-backend and
/// per-drone series `grace` after their last update.
pub fn build(grace: Duration) -> Result<(RoutingRecorder, Exporter), BuildError> {
    let stable = builder()?.build_recorder();
    let expiring = (0..SHARDS)
        .map(|_| {
            builder().map(|b| {
                b.idle_timeout(MetricKindMask::ALL, Some(grace))
                    .build_recorder()
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let exporter = Exporter {
        stable: stable.handle(),
        expiring: expiring.iter().map(PrometheusRecorder::handle).collect(),
    };
    Ok((RoutingRecorder { stable, expiring }, exporter))
}

/// The expiring shard of a metric name (FNV-1a: the same in every run and build).
fn shard_of(name: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % SHARDS as u64) as usize
}

impl RoutingRecorder {
    fn for_key(&self, key: &Key) -> &PrometheusRecorder {
        if key.labels().any(|l| EXPIRING_LABELS.contains(&l.key())) {
            &self.expiring[shard_of(key.name())]
        } else {
            &self.stable
        }
    }

    /// Every recorder: descriptions go to all (each renders HELP only for names it holds).
    fn all(&self) -> impl Iterator<Item = &PrometheusRecorder> {
        std::iter::once(&self.stable).chain(&self.expiring)
    }
}

impl Recorder for RoutingRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        for r in self.all() {
            r.describe_counter(key.clone(), unit, description.clone());
        }
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        for r in self.all() {
            r.describe_gauge(key.clone(), unit, description.clone());
        }
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        for r in self.all() {
            r.describe_histogram(key.clone(), unit, description.clone());
        }
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.for_key(key).register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.for_key(key).register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.for_key(key).register_histogram(key, metadata)
    }
}

impl Exporter {
    /// The Prometheus text exposition of every series, the expiring shards rendered on
    /// threads of their own. Rendering is also where the expiring recorders drop series idle
    /// past the grace period.
    pub fn render(&self) -> Vec<u8> {
        // Writing to a Vec cannot fail.
        let shards: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let running: Vec<_> = self
                .expiring
                .iter()
                .map(|h| {
                    scope.spawn(move || {
                        let mut out = Vec::new();
                        let _ = h.render_to_write(&mut out);
                        out
                    })
                })
                .collect();
            running
                .into_iter()
                .map(|t| t.join().unwrap_or_default())
                .collect()
        });
        let mut out = Vec::with_capacity(16 * 1024 + shards.iter().map(Vec::len).sum::<usize>());
        let _ = self.stable.render_to_write(&mut out);
        for s in shards {
            out.extend_from_slice(&s);
        }
        out
    }

    /// Drains recorded histogram samples into their buckets, so that memory stays bounded
    /// between scrapes. Call every few seconds.
    pub fn run_upkeep(&self) {
        self.stable.run_upkeep();
        for h in &self.expiring {
            h.run_upkeep();
        }
    }
}
