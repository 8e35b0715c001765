//! The Prometheus exporter behind one `metrics` recorder: two `metrics-exporter-prometheus`
//! recorders and a router between them.
//!
//! Series labelled with a `backend` or a `drone` go to the *expiring* recorder, which drops a
//! series not updated for the grace period: that is how the series of ended backends and
//! departed drones leave the scrape. Their owners update live ones at least every quarter of
//! the grace period (the proxy on every scrape, the scheduler's monitor every second, usage
//! reports every few seconds), so a live series is never dropped. Everything else (per
//! proxy, per reason, per phase: small fixed label sets) goes to the *stable* recorder and is
//! never dropped, so that a rare event's counter does not vanish between occurrences.
//!
//! Self-contained so that the scrape benchmark can build the same exporter.

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use metrics_util::MetricKindMask;

/// Labels that make a series per backend or per drone: routed to the expiring recorder.
pub const EXPIRING_LABELS: [&str; 2] = ["backend", "drone"];

/// Histogram buckets (seconds) for histograms without their own.
const DEFAULT_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Routes each series to the stable or the expiring recorder (see the module docs).
pub struct RoutingRecorder {
    stable: PrometheusRecorder,
    expiring: PrometheusRecorder,
}

/// Renders what the recorders hold.
#[derive(Clone)]
pub struct Exporter {
    stable: PrometheusHandle,
    expiring: PrometheusHandle,
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
        )
}

/// Builds the recorder (to install) and the exporter (to render), dropping per-backend and
/// per-drone series `grace` after their last update.
pub fn build(grace: Duration) -> Result<(RoutingRecorder, Exporter), BuildError> {
    let stable = builder()?.build_recorder();
    let expiring = builder()?
        .idle_timeout(MetricKindMask::ALL, Some(grace))
        .build_recorder();
    let exporter = Exporter {
        stable: stable.handle(),
        expiring: expiring.handle(),
    };
    Ok((RoutingRecorder { stable, expiring }, exporter))
}

impl RoutingRecorder {
    fn for_key(&self, key: &Key) -> &PrometheusRecorder {
        if key.labels().any(|l| EXPIRING_LABELS.contains(&l.key())) {
            &self.expiring
        } else {
            &self.stable
        }
    }
}

impl Recorder for RoutingRecorder {
    // Descriptions go to both: each renders HELP only for the names it holds.
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.stable
            .describe_counter(key.clone(), unit, description.clone());
        self.expiring.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.stable
            .describe_gauge(key.clone(), unit, description.clone());
        self.expiring.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.stable
            .describe_histogram(key.clone(), unit, description.clone());
        self.expiring.describe_histogram(key, unit, description);
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
    /// The Prometheus text exposition of every series. Also where the expiring recorder
    /// drops series idle past the grace period.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 * 1024);
        // Writing to a Vec cannot fail.
        let _ = self.stable.render_to_write(&mut out);
        let _ = self.expiring.render_to_write(&mut out);
        out
    }

    /// Drains recorded histogram samples into their buckets, so that memory stays bounded
    /// between scrapes. Call every few seconds.
    pub fn run_upkeep(&self) {
        self.stable.run_upkeep();
        self.expiring.run_upkeep();
    }
}
