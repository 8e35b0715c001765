//! `--metrics`: the Prometheus exporter, installed as this process's `metrics` recorder (the
//! libraries only use the facade), and the admin listener that serves it as `GET /metrics`
//! in the text exposition format.
//!
//! Before every scrape the registered collectors run (the proxy copies its per-backend
//! counters into the recorder); a maintenance loop drains histograms every few seconds, runs
//! the collectors every quarter of the grace period so live series stay fresh, and renders
//! once (discarding the output) whenever nobody has scraped for a grace period, so that the
//! series of ended backends are dropped even without a scraper. A scrape that accepts gzip
//! gets the exposition gzipped. See `docs/metrics.md`.

pub mod backends;
pub mod exporter;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use exporter::Exporter;

use crate::ConfigError;
use crate::cli::MetricsArgs;

/// Where dev and serve listen for scrapes when `--metrics` is not given.
pub const DEFAULT_ADDR: &str = "127.0.0.1:7071";
/// Where a drone listens when `--metrics` is not given (a drone may share a host with serve).
pub const DEFAULT_DRONE_ADDR: &str = "127.0.0.1:7072";
/// Where `hangar proxy` listens when `--metrics` is not given.
pub const DEFAULT_PROXY_ADDR: &str = "127.0.0.1:7073";

/// How often histogram samples are drained into buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// The content type of the text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Validated `--metrics` flags; nothing bound yet.
#[derive(Clone, Debug)]
pub struct MetricsSetup {
    pub addr: SocketAddr,
    /// Whether `--metrics` was given: a taken default port only turns metrics off (with a
    /// warning), a taken explicit one is an error.
    explicit: bool,
    /// Per-backend and per-drone series are dropped this long after their last update.
    pub grace: Duration,
    /// The bearer token scrapes must present (`--metrics-token`), if any.
    pub token: Option<String>,
    /// `--metrics-top-k`: per-backend series only for this many backends (and the hot ones),
    /// the rest summed per pool.
    pub top_k: Option<usize>,
}

/// Validates the flags; `None` with `--metrics off`.
pub fn validate(args: &MetricsArgs, default: &str) -> Result<Option<MetricsSetup>, ConfigError> {
    let (spec, explicit) = match &args.metrics {
        Some(s) => (s.as_str(), true),
        None => (default, false),
    };
    if args.metrics_grace == 0 {
        return Err(ConfigError(
            "--metrics-grace must be at least 1 second".into(),
        ));
    }
    if spec.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    if args.metrics_token.as_ref().is_some_and(|t| t.len() < 8) {
        return Err(ConfigError(
            "--metrics-token must be at least 8 characters".into(),
        ));
    }
    let addr = spec.parse().map_err(|_| {
        ConfigError(format!(
            "--metrics {spec:?} is neither an address like {default} nor off"
        ))
    })?;
    Ok(Some(MetricsSetup {
        addr,
        explicit,
        grace: Duration::from_secs(args.metrics_grace),
        token: args.metrics_token.clone(),
        top_k: args.metrics_top_k,
    }))
}

/// The admin listener, bound, with the exporter installed as the process's recorder.
pub struct MetricsListener {
    listener: TcpListener,
    addr: SocketAddr,
    exporter: Exporter,
    grace: Duration,
    token: Option<String>,
}

/// Binds the listener of `setup`, then installs the exporter: before anything records (the
/// scheduler registers gauges when it starts), and only with a listener, since an exporter
/// nobody serves would only accumulate samples. `None` with `--metrics off`, or when a taken
/// default port turns metrics off (with a warning).
pub async fn listen(
    setup: Option<&MetricsSetup>,
    role: &str,
) -> anyhow::Result<Option<MetricsListener>> {
    let Some(setup) = setup else {
        return Ok(None);
    };
    let Some(listener) = bind(setup, role).await? else {
        return Ok(None);
    };
    let addr = listener.local_addr()?;
    let exporter = install(setup.grace, setup.top_k)?;
    Ok(Some(MetricsListener {
        listener,
        addr,
        exporter,
        grace: setup.grace,
        token: setup.token.clone(),
    }))
}

impl MetricsListener {
    /// The bound address, for [`announce`].
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How long per-backend and per-drone series outlive their last update.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// The server for this listener (add collectors to it), and the listener to run it on.
    pub fn into_server(self) -> (MetricsServer, TcpListener) {
        let mut server = MetricsServer::new(self.exporter, self.grace);
        server.token = self.token;
        (server, self.listener)
    }
}

/// Binds the metrics listener. A taken default port turns metrics off with a warning.
async fn bind(setup: &MetricsSetup, role: &str) -> anyhow::Result<Option<TcpListener>> {
    match TcpListener::bind(setup.addr).await {
        Ok(l) => Ok(Some(l)),
        Err(e) if !setup.explicit => {
            eprintln!(
                "hangar {role}: metrics are off: cannot listen on {}: {e} (choose an address with --metrics, e.g. --metrics 127.0.0.1:0)",
                setup.addr
            );
            Ok(None)
        }
        Err(e) => Err(ConfigError(format!(
            "cannot listen for metrics on {}: {e} (choose another address with --metrics, or turn metrics off with --metrics off)",
            setup.addr
        ))
        .into()),
    }
}

/// Installs the exporter as the process's recorder and describes every metric. Call once,
/// before the libraries start recording.
fn install(grace: Duration, top_k: Option<usize>) -> anyhow::Result<Exporter> {
    let (recorder, exporter) = exporter::build_with(grace, top_k)
        .map_err(|e| anyhow::anyhow!("cannot set up the metrics exporter: {e}"))?;
    metrics::set_global_recorder(recorder)
        .map_err(|_| anyhow::anyhow!("a metrics recorder is already installed"))?;
    hangar_proxy::metrics::describe();
    hangar_scheduler::metrics::describe();
    hangar_drone::session::describe();
    hangar_dns::metrics::describe();
    Ok(exporter)
}

type Collector = Box<dyn Fn() + Send + Sync>;

struct Shared {
    exporter: Exporter,
    token: Option<String>,
    collectors: Vec<Collector>,
    /// When the last scrape (or housekeeping render) happened.
    rendered_at: Mutex<Instant>,
}

impl Shared {
    /// Runs the collectors and renders; blocking work (milliseconds with many backends).
    fn scrape(&self) -> Vec<u8> {
        for c in &self.collectors {
            c();
        }
        let out = self.exporter.render();
        *self
            .rendered_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
        out
    }
}

/// Serves `GET /metrics` from an already-bound listener.
pub struct MetricsServer {
    exporter: Exporter,
    grace: Duration,
    collectors: Vec<Collector>,
    /// The bearer token a scrape must present, if any.
    token: Option<String>,
}

impl MetricsServer {
    pub fn new(exporter: Exporter, grace: Duration) -> Self {
        MetricsServer {
            exporter,
            grace,
            collectors: Vec::new(),
            token: None,
        }
    }

    /// Adds a collector: run before every scrape and every quarter of the grace period.
    pub fn collect(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.collectors.push(Box::new(f));
        self
    }

    /// Serves until `shutdown` fires.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) {
        let shared = Arc::new(Shared {
            exporter: self.exporter,
            token: self.token,
            collectors: self.collectors,
            rendered_at: Mutex::new(Instant::now()),
        });
        let tasks = TaskTracker::new();
        tasks.spawn(maintain(shared.clone(), self.grace, shutdown.clone()));
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "metrics listener cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let shared = shared.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let svc = service_fn(move |req| serve(shared.clone(), req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                    }
                }
            });
        }
        tasks.close();
        tasks.wait().await;
    }
}

async fn serve(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let text = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "not found: metrics are at GET /metrics\n",
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "use GET /metrics\n"));
    }
    if let Some(token) = &shared.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, t)| t.trim());
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            given.as_bytes(),
            token.as_bytes(),
        )) {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "metrics need the bearer token given to --metrics-token\n",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return Ok(r);
        }
    }
    let gzip = accepts_gzip(req.headers());
    let body = match tokio::task::spawn_blocking(move || {
        let text = shared.scrape();
        if gzip { exporter::gzip(&text) } else { text }
    })
    .await
    {
        Ok(b) => b,
        Err(_) => {
            return Ok(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering the metrics failed\n",
            ));
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(TEXT_FORMAT),
    );
    r.headers_mut().insert(
        header::VARY,
        header::HeaderValue::from_static("accept-encoding"),
    );
    if gzip {
        r.headers_mut().insert(
            header::CONTENT_ENCODING,
            header::HeaderValue::from_static("gzip"),
        );
    }
    Ok(r)
}

/// Whether `Accept-Encoding` admits gzip (`gzip`, `x-gzip` or `*`, with a q-value above 0;
/// Prometheus sends `gzip`).
fn accepts_gzip(headers: &http::HeaderMap) -> bool {
    let mut gzip = None;
    let mut any = None;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| {
                    let p = p.trim();
                    p.strip_prefix("q=").or_else(|| p.strip_prefix("Q="))
                })
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                gzip = Some(q > 0.0);
            } else if coding == "*" {
                any = Some(q > 0.0);
            }
        }
    }
    gzip.or(any).unwrap_or(false)
}

/// Drains histograms, keeps live series fresh and drops expired ones without a scraper.
async fn maintain(shared: Arc<Shared>, grace: Duration, shutdown: CancellationToken) {
    let refresh = (grace / 4).max(Duration::from_millis(250));
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL.min(refresh));
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut collect = tokio::time::interval(refresh);
    collect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let shared = shared.clone();
        let work: Box<dyn FnOnce() + Send> = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = upkeep.tick() => Box::new(move || shared.exporter.run_upkeep()),
            _ = collect.tick() => Box::new(move || {
                for c in &shared.collectors {
                    c();
                }
                let idle = shared
                    .rendered_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .elapsed();
                if idle >= grace {
                    // Nobody scrapes: render anyway so that expired series are dropped.
                    drop(shared.scrape());
                }
            }),
        };
        let _ = tokio::task::spawn_blocking(work).await;
    }
}

/// The `metrics listening on` line tests and operators read.
pub fn announce(role: &str, addr: SocketAddr) {
    println!("hangar {role}: metrics listening on {addr}");
}

#[cfg(test)]
mod tests;
