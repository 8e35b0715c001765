//! Connect load for the control-plane benchmarks (`benches/scale.py`): `POST /v1/connect` for
//! new keys over keep-alive connections, a fixed number in flight or at a fixed rate, and one
//! JSON line of results on stdout. A load generator of its own because a Python client spends
//! more CPU per request than the connect it measures on a two-core machine.
//!
//! ```sh
//! cargo build --release --example connect_load
//! target/release/examples/connect_load --api 127.0.0.1:7000 --token-file data/admin.token \
//!     --count 10000 --inflight 64 --tag l10k
//! ```
//!
//! With `--rate R` it starts R connects a second (open loop, still at most `--inflight` at
//! once) instead of keeping `--inflight` busy. With `--proxy ADDR` it also measures propagation:
//! from the start of each connect (the record is written during it) until the proxy at ADDR (a
//! remote `hangar proxy`) routes the backend's hostname from the connect's URL, i.e. answers
//! anything but 404/502/503, probing every millisecond from the connect's answer on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[derive(Parser, Debug)]
struct Args {
    /// The scheduler's API address (host:port).
    #[arg(long)]
    api: SocketAddr,
    /// A file holding an API token (the admin token `serve` writes).
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// How many connects, each for a new key `<tag>-<n>`.
    #[arg(long)]
    count: u64,
    /// At most this many in flight.
    #[arg(long, default_value_t = 64)]
    inflight: u64,
    /// Start this many connects a second instead of keeping `--inflight` busy.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value = "k")]
    tag: String,
    /// Place every backend on drones of this pool (`spawn.pool`).
    #[arg(long)]
    spawn_pool: Option<String>,
    /// Write the ids of the backends connected to this file, one per line.
    #[arg(long)]
    ids: Option<std::path::PathBuf>,
    /// A remote proxy to measure route propagation on.
    #[arg(long)]
    proxy: Option<SocketAddr>,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Sample {
    backend: String,
    connect: Duration,
    propagation: Option<Duration>,
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1000.0
}

async fn connect(
    client: &HttpClient,
    args: &Args,
    token: &Option<String>,
    n: u64,
) -> Result<(Duration, String, String), String> {
    let pool = args
        .spawn_pool
        .as_ref()
        .map(|p| format!(r#","pool":"{p}""#))
        .unwrap_or_default();
    let body = format!(
        r#"{{"key":{{"name":"{}-{n}"}},"spawn":{{"idle_timeout_s":86400{pool}}}}}"#,
        args.tag
    );
    let mut req = hyper::Request::post(format!("http://{}/v1/connect", args.api))
        .header("content-type", "application/json");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let took = started.elapsed();
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let backend = v["backend_id"]
        .as_str()
        .ok_or("connect answer without backend_id")?
        .to_owned();
    let url = v["url"].as_str().ok_or("connect answer without url")?;
    // http://host[:port]/...
    let authority = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    Ok((took, host.to_owned(), backend))
}

/// Probes the proxy for `host` until it routes it; the time from `since`.
async fn propagation(
    client: &HttpClient,
    proxy: SocketAddr,
    host: &str,
    since: Instant,
) -> Option<Duration> {
    let deadline = since + Duration::from_secs(30);
    while Instant::now() < deadline {
        let req = hyper::Request::get(format!("http://{proxy}/"))
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .ok()?;
        if let Ok(resp) = client.request(req).await {
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            if !matches!(status, 404 | 502 | 503) {
                return Some(since.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    let token = match &args.token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => Some(t.trim().to_owned()),
            Err(e) => {
                eprintln!("connect_load: cannot read {}: {e}", path.display());
                std::process::exit(64);
            }
        },
        None => None,
    };
    let token = Arc::new(token);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.inflight as usize * 2)
        .build(connector);
    let limit = Arc::new(tokio::sync::Semaphore::new(args.inflight as usize));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut results = Results::default();
    for n in 0..args.count {
        if let Some(rate) = args.rate {
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = limit.clone().acquire_owned().await.expect("semaphore");
        let (client, args, token) = (client.clone(), args.clone(), token.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let (took, host, backend) = connect(&client, &args, &token, n).await?;
            let propagation = match args.proxy {
                Some(proxy) => {
                    let since = Instant::now() - took;
                    propagation(&client, proxy, &host, since).await
                }
                None => None,
            };
            Ok::<_, String>(Sample {
                backend,
                connect: took,
                propagation,
            })
        });
        // Keep the set from growing without bound on long runs.
        while let Some(done) = tasks.try_join_next() {
            results.add(done);
        }
    }
    while let Some(done) = tasks.join_next().await {
        results.add(done);
    }
    if let Some(path) = &args.ids {
        let ids: String = results.ids.iter().map(|id| format!("{id}\n")).collect();
        if let Err(e) = std::fs::write(path, ids) {
            eprintln!("connect_load: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
    results.report(started.elapsed());
}

#[derive(Default)]
struct Results {
    ids: Vec<String>,
    connects: Vec<Duration>,
    propagations: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

impl Results {
    fn add(&mut self, done: Result<Result<Sample, String>, tokio::task::JoinError>) {
        match done.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(sample) => {
                self.ids.push(sample.backend);
                self.connects.push(sample.connect);
                self.propagations.extend(sample.propagation);
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn report(mut self, elapsed: Duration) {
        self.connects.sort();
        self.propagations.sort();
        let out = serde_json::json!({
            "connects": self.connects.len(),
            "errors": self.errors,
            "first_error": self.first_error,
            "per_s": self.connects.len() as f64 / elapsed.as_secs_f64(),
            "p50_ms": percentile(&self.connects, 0.50),
            "p99_ms": percentile(&self.connects, 0.99),
            "propagated": self.propagations.len(),
            "propagation_p50_ms": percentile(&self.propagations, 0.50),
            "propagation_p99_ms": percentile(&self.propagations, 0.99),
        });
        println!("{out}");
    }
}
