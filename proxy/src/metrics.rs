//! The proxy's metrics, through the `metrics` facade (the binary installs the recorder).
//!
//! Per backend, labelled `backend`, `drone` and `pool` from its route (never its key or
//! user): requests by status class, request duration, bytes received and sent, open
//! connections and open WebSockets. Per proxy: requests by how they named their backend, and
//! errors by cause.
//!
//! The request path never registers a metric: it bumps plain atomics in the backend's
//! [`ActivityTracker`](crate::ActivityTracker) entry and records durations into a histogram
//! handle cached there. [`BackendSeries::publish`] copies the atomics into the recorder
//! (`absolute` for counters, `set` for gauges) before every scrape and on a period; doing so
//! also marks the series as recently updated, which is what keeps a live backend's series from
//! being dropped by the exporter's idle timeout. A backend that ends is published one last
//! time (gauges at zero) and forgotten; its series then age out after the grace period.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use arc_swap::ArcSwap;
use hangar_core::route::{Route, RouteMode};
use metrics::{Counter, Gauge, Histogram, Label, SharedString};

/// Requests forwarded to a backend, by status class of the answer.
pub const BACKEND_REQUESTS_TOTAL: &str = "hangar_backend_requests_total";
/// Time from a request reaching the proxy (once its backend is ready) to the end of the
/// response body, or to the `101` of an upgrade.
pub const BACKEND_REQUEST_DURATION_SECONDS: &str = "hangar_backend_request_duration_seconds";
/// Bytes from clients to the backend: request bodies and upgraded-connection data.
pub const BACKEND_RECEIVED_BYTES_TOTAL: &str = "hangar_backend_received_bytes_total";
/// Bytes from the backend to clients: response bodies and upgraded-connection data.
pub const BACKEND_SENT_BYTES_TOTAL: &str = "hangar_backend_sent_bytes_total";
/// Requests in flight plus open upgraded connections.
pub const BACKEND_OPEN_CONNECTIONS: &str = "hangar_backend_open_connections";
/// Open upgraded connections (WebSockets).
pub const BACKEND_OPEN_WEBSOCKETS: &str = "hangar_backend_open_websockets";
/// Requests by how they named their backend.
pub const PROXY_REQUESTS_TOTAL: &str = "hangar_proxy_requests_total";
/// Requests the proxy answered itself, by cause (`x-hangar-error`).
pub const PROXY_ERRORS_TOTAL: &str = "hangar_proxy_errors_total";

/// The histogram buckets (seconds) the binary configures for request durations: few, because
/// every backend has its own histogram.
pub const DURATION_BUCKETS: [f64; 8] = [0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// The `status_class` label values, indexed by [`status_class`].
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The index into [`STATUS_CLASSES`] of a status code; anything outside 100..=599 counts as a
/// server error.
pub fn status_class(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Describes the proxy's metrics to the installed recorder (call once after installing it).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        BACKEND_REQUESTS_TOTAL,
        "Requests forwarded to the backend, by status class of the answer (requests cancelled by the client before an answer count as 4xx)."
    );
    describe_histogram!(
        BACKEND_REQUEST_DURATION_SECONDS,
        "Seconds from the proxy forwarding a request to the end of its response body (or the 101 of an upgrade)."
    );
    describe_counter!(
        BACKEND_RECEIVED_BYTES_TOTAL,
        "Bytes from clients to the backend: request bodies and upgraded-connection data."
    );
    describe_counter!(
        BACKEND_SENT_BYTES_TOTAL,
        "Bytes from the backend to clients: response bodies and upgraded-connection data."
    );
    describe_gauge!(
        BACKEND_OPEN_CONNECTIONS,
        "Requests in flight to the backend plus its open upgraded connections."
    );
    describe_gauge!(
        BACKEND_OPEN_WEBSOCKETS,
        "Open upgraded connections (WebSockets) to the backend."
    );
    describe_counter!(
        PROXY_REQUESTS_TOTAL,
        "Requests received, by how they named their backend: host, header, cookie, or none."
    );
    describe_counter!(
        PROXY_ERRORS_TOTAL,
        "Requests the proxy answered itself, by cause (the x-hangar-error code)."
    );
}

/// Plain counters of one backend's traffic, bumped on the request path.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub(crate) by_class: [AtomicU64; 5],
    pub(crate) received_bytes: AtomicU64,
    pub(crate) sent_bytes: AtomicU64,
    pub(crate) websockets: AtomicU64,
    /// Summed durations of the answered requests (those counted in `by_class`), in
    /// microseconds: reported to the scheduler for mean latencies.
    pub(crate) duration_us: AtomicU64,
}

impl Traffic {
    /// Requests answered so far (every status class).
    pub(crate) fn answered(&self) -> u64 {
        self.by_class
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// Handles registered with the recorder, used only by the publisher.
#[derive(Default)]
struct Published {
    by_class: [Option<Counter>; 5],
    received: Option<Counter>,
    sent: Option<Counter>,
    open: Option<Gauge>,
    websockets: Option<Gauge>,
    /// `requests` at the last publish: whether the backend was active since.
    requests_seen: u64,
}

/// One backend's metric labels and handles.
pub(crate) struct BackendSeries {
    backend: SharedString,
    drone: SharedString,
    pool: SharedString,
    /// The duration histogram, recorded into on the request path. Swappable because the
    /// exporter drops a histogram that stays idle past the grace period; the handle is then
    /// registered again (see [`BackendSeries::refresh_histogram`]).
    histogram: ArcSwap<Histogram>,
    /// A mutex, but taken only by the publisher (never on the request path).
    published: Mutex<Published>,
}

impl std::fmt::Debug for BackendSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendSeries")
            .field("backend", &self.backend)
            .field("drone", &self.drone)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl BackendSeries {
    /// The series of the backend `route` names, labelled from the route.
    pub(crate) fn new(backend: &str, route: Option<&Route>) -> Self {
        let label = |v: Option<&std::sync::Arc<str>>| match v {
            Some(s) => SharedString::from(s.clone()),
            None => SharedString::const_str(""),
        };
        let backend = SharedString::from(backend.to_string());
        let drone = label(route.and_then(|r| r.drone.as_ref()));
        let pool = label(route.and_then(|r| r.pool.as_ref()));
        let histogram = ArcSwap::from_pointee(register_histogram(&backend, &drone, &pool));
        BackendSeries {
            backend,
            drone,
            pool,
            histogram,
            published: Mutex::new(Published::default()),
        }
    }

    fn labels(&self) -> Vec<Label> {
        vec![
            Label::new("backend", self.backend.clone()),
            Label::new("drone", self.drone.clone()),
            Label::new("pool", self.pool.clone()),
        ]
    }

    /// Records one request's duration.
    pub(crate) fn record_duration(&self, seconds: f64) {
        self.histogram.load().record(seconds);
    }

    /// Registers the histogram again: returns the exporter's current one, or a new one if it
    /// was dropped for idleness. Off the request path except after a long idle period.
    pub(crate) fn refresh_histogram(&self) {
        self.histogram.store(std::sync::Arc::new(register_histogram(
            &self.backend,
            &self.drone,
            &self.pool,
        )));
    }

    /// Copies the backend's counts into the recorder. `open` is requests in flight plus
    /// upgraded connections; `requests` the cumulative count of forwarded requests.
    pub(crate) fn publish(&self, traffic: &Traffic, open: u64, requests: u64) {
        let mut p = self
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, slot) in p.by_class.iter_mut().enumerate() {
            let n = traffic.by_class[i].load(Ordering::Relaxed);
            // A class gets a series once it has a request: most backends only ever answer 2xx.
            if n == 0 && slot.is_none() {
                continue;
            }
            slot.get_or_insert_with(|| {
                let mut labels = self.labels();
                labels.push(Label::new("status_class", STATUS_CLASSES[i]));
                metrics::counter!(BACKEND_REQUESTS_TOTAL, labels)
            })
            .absolute(n);
        }
        p.received
            .get_or_insert_with(|| metrics::counter!(BACKEND_RECEIVED_BYTES_TOTAL, self.labels()))
            .absolute(traffic.received_bytes.load(Ordering::Relaxed));
        p.sent
            .get_or_insert_with(|| metrics::counter!(BACKEND_SENT_BYTES_TOTAL, self.labels()))
            .absolute(traffic.sent_bytes.load(Ordering::Relaxed));
        p.open
            .get_or_insert_with(|| metrics::gauge!(BACKEND_OPEN_CONNECTIONS, self.labels()))
            .set(open as f64);
        p.websockets
            .get_or_insert_with(|| metrics::gauge!(BACKEND_OPEN_WEBSOCKETS, self.labels()))
            .set(traffic.websockets.load(Ordering::Relaxed) as f64);
        // A backend that served requests since the last publish has a live histogram: take
        // the exporter's current handle, which heals the rare case of a request recorded into
        // a handle the exporter dropped at the same moment.
        if requests != p.requests_seen {
            p.requests_seen = requests;
            drop(p);
            self.refresh_histogram();
        }
    }
}

fn register_histogram(
    backend: &SharedString,
    drone: &SharedString,
    pool: &SharedString,
) -> Histogram {
    metrics::histogram!(
        BACKEND_REQUEST_DURATION_SECONDS,
        vec![
            Label::new("backend", backend.clone()),
            Label::new("drone", drone.clone()),
            Label::new("pool", pool.clone()),
        ]
    )
}

/// Proxy-wide counters, registered on first use. They carry no backend label, so the
/// exporter never drops them and caching the handles is safe.
#[derive(Default)]
pub(crate) struct ProxyMetrics {
    modes: OnceLock<[Counter; 4]>,
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyMetrics").finish_non_exhaustive()
    }
}

impl ProxyMetrics {
    /// Counts a request by how it named its backend (`None`: it named none).
    pub(crate) fn request(&self, mode: Option<RouteMode>) {
        let modes = self.modes.get_or_init(|| {
            ["host", "header", "cookie", "none"]
                .map(|m| metrics::counter!(PROXY_REQUESTS_TOTAL, "mode" => m))
        });
        let i = match mode {
            Some(RouteMode::Host) => 0,
            Some(RouteMode::Header) => 1,
            Some(RouteMode::Cookie) => 2,
            None => 3,
        };
        modes[i].increment(1);
    }

    /// Counts a request the proxy answered itself.
    pub(crate) fn error(&self, code: &'static str) {
        metrics::counter!(PROXY_ERRORS_TOTAL, "cause" => code).increment(1);
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
