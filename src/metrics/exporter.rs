//! The Prometheus exporter behind one `metrics` recorder: a router between three stores.
//!
//! - Series labelled with a `backend` go to [`BackendRecorder`]: plain atomics rendered
//!   straight into the text format, dropped when untouched for the grace period (see
//!   `backends`), optionally only for the top K backends by traffic with the rest summed per
//!   pool. With thousands of backends they are nearly all of a scrape.
//! - Series labelled with a `drone` (and no backend) go to an *expiring*
//!   `metrics-exporter-prometheus` recorder, which drops a series not updated for the grace
//!   period: that is how departed drones leave the scrape.
//! - Everything else (per proxy, per reason, per phase: small fixed label sets) goes to the
//!   *stable* recorder and is never dropped, so that a rare event's counter does not vanish
//!   between occurrences.
//!
//! Owners update live series at least every quarter of the grace period (the proxy on every
//! scrape, the scheduler's monitor every second, usage reports every few seconds), so a live
//! series is never dropped. A metric name always lands in one store, so every family stays
//! one contiguous group in the exposition, as the text format requires.
//!
//! Self-contained (with `backends`) so that the scrape benchmark can build the same exporter.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use metrics_util::MetricKindMask;

use super::backends::{self, BackendRecorder};

/// The label that makes a series per drone: routed to the expiring recorder (a series with a
/// `backend` label goes to the [`BackendRecorder`]).
pub const DRONE_LABEL: &str = "drone";

/// Histogram buckets (seconds) for histograms without their own.
const DEFAULT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Routes each series to the store it belongs in (see the module docs).
pub struct RoutingRecorder {
    stable: PrometheusRecorder,
    expiring: PrometheusRecorder,
    backends: BackendRecorder,
}

/// Renders what the recorders hold.
#[derive(Clone)]
pub struct Exporter {
    stable: PrometheusHandle,
    expiring: PrometheusHandle,
    backends: BackendRecorder,
}

/// The buckets of a histogram of the [`BackendRecorder`], as [`builder`] sets them.
fn buckets_for(name: &str) -> Vec<f64> {
    if name == hangar_proxy::metrics::BACKEND_REQUEST_DURATION_SECONDS {
        hangar_proxy::metrics::DURATION_BUCKETS.to_vec()
    } else if name.starts_with("hangar_scheduler_spawn_") {
        hangar_scheduler::metrics::SPAWN_BUCKETS.to_vec()
    } else if name == hangar_scheduler::metrics::PLACEMENT_SECONDS {
        hangar_scheduler::metrics::PLACEMENT_BUCKETS.to_vec()
    } else {
        DEFAULT_BUCKETS.to_vec()
    }
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
#[cfg(test)]
pub fn build(grace: Duration) -> Result<(RoutingRecorder, Exporter), BuildError> {
    build_with(grace, None)
}

/// Like [`build`]; with `top_k`, per-backend series only for the `top_k` backends with the
/// most requests and the hot ones, the others summed per pool (`--metrics-top-k`).
pub fn build_with(
    grace: Duration,
    top_k: Option<usize>,
) -> Result<(RoutingRecorder, Exporter), BuildError> {
    let stable = builder()?.build_recorder();
    let expiring = builder()?
        .idle_timeout(MetricKindMask::ALL, Some(grace))
        .build_recorder();
    let backends = BackendRecorder::new(backends::Config {
        grace,
        buckets: buckets_for,
        top_k: top_k.map(|k| backends::TopK {
            k,
            traffic: hangar_proxy::metrics::BACKEND_REQUESTS_TOTAL,
            hot: hangar_scheduler::metrics::BACKEND_HOT,
            cumulative_gauges: &[hangar_scheduler::metrics::BACKEND_CPU_SECONDS],
        }),
    });
    let exporter = Exporter {
        stable: stable.handle(),
        expiring: expiring.handle(),
        backends: backends.clone(),
    };
    Ok((
        RoutingRecorder {
            stable,
            expiring,
            backends,
        },
        exporter,
    ))
}

enum Route<'a> {
    Generic(&'a PrometheusRecorder),
    Backends,
}

impl RoutingRecorder {
    fn for_key(&self, key: &Key) -> Route<'_> {
        if BackendRecorder::wants(key) {
            Route::Backends
        } else if key.labels().any(|l| l.key() == DRONE_LABEL) {
            Route::Generic(&self.expiring)
        } else {
            Route::Generic(&self.stable)
        }
    }

    /// The generic recorders: descriptions go to both (each renders HELP only for names it
    /// holds), and to the backends' store.
    fn generic(&self) -> [&PrometheusRecorder; 2] {
        [&self.stable, &self.expiring]
    }
}

impl Recorder for RoutingRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.backends.describe(&key, &description);
        for r in self.generic() {
            r.describe_counter(key.clone(), unit, description.clone());
        }
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.backends.describe(&key, &description);
        for r in self.generic() {
            r.describe_gauge(key.clone(), unit, description.clone());
        }
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.backends.describe(&key, &description);
        for r in self.generic() {
            r.describe_histogram(key.clone(), unit, description.clone());
        }
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        match self.for_key(key) {
            Route::Generic(r) => r.register_counter(key, metadata),
            Route::Backends => self.backends.counter(key),
        }
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        match self.for_key(key) {
            Route::Generic(r) => r.register_gauge(key, metadata),
            Route::Backends => self.backends.gauge(key),
        }
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        match self.for_key(key) {
            Route::Generic(r) => r.register_histogram(key, metadata),
            Route::Backends => self.backends.histogram(key),
        }
    }
}

impl Exporter {
    /// The Prometheus text exposition of every series: the per-backend store rendered
    /// (itself over several threads) while this thread renders the generic recorders.
    /// Rendering is also where series idle past the grace period are dropped.
    pub fn render(&self) -> Vec<u8> {
        std::thread::scope(|scope| {
            let backends = scope.spawn(|| {
                let mut out = Vec::new();
                self.backends.render(&mut out);
                out
            });
            let mut out = Vec::with_capacity(64 * 1024);
            // Writing to a Vec cannot fail.
            let _ = self.stable.render_to_write(&mut out);
            let _ = self.expiring.render_to_write(&mut out);
            match backends.join() {
                Ok(b) if out.is_empty() => b,
                Ok(b) => {
                    out.extend_from_slice(&b);
                    out
                }
                Err(_) => out,
            }
        })
    }

    /// Drains recorded histogram samples of the generic recorders into their buckets, so
    /// that memory stays bounded between scrapes (the per-backend store keeps buckets, not
    /// samples), and frees the series renders dropped. Call every few seconds.
    pub fn run_upkeep(&self) {
        self.stable.run_upkeep();
        self.expiring.run_upkeep();
        self.backends.collect_garbage();
    }

    /// How many backends have series in the per-backend store.
    #[cfg(test)]
    pub fn backends(&self) -> usize {
        self.backends.backends()
    }
}

/// The exposition gzipped at the fastest level (a scrape is compressed once and thrown away;
/// the text shrinks about tenfold even so).
pub fn gzip(text: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut z = flate2::write::GzEncoder::new(
        Vec::with_capacity(text.len() / 8),
        flate2::Compression::fast(),
    );
    // Writing to a Vec cannot fail.
    let _ = z.write_all(text);
    z.finish().unwrap_or_default()
}
