//! Spawn latency with Docker: the raw floor, i.e. what the engine itself costs to go from
//! nothing to a backend that answers. One sample is bollard's create + start + inspect (for the
//! published port) + polling `GET /` through that port until the demo backend answers 200,
//! exactly what the Docker runtime does plus the agent's readiness probe, with no Hangar in
//! between. Measured sequentially and with several spawns in flight at once.
//!
//! `scripts/demo-image.sh && cargo bench --bench spawn_latency` runs the full measurement;
//! `-- --runs N` sets the sequential samples (default 30), `-- --concurrency 20,100` the
//! concurrent scenarios (default 20) and `-- --rounds R` how often each is repeated (default
//! 3). Without `--bench` (as `cargo test --benches` runs it) it does a short smoke run.
//!
//! The "through Hangar" half runs in the same process, interleaved with the floor: it starts
//! `hangar serve` and one `hangar drone --runtime docker` (the release binary) on loopback, and
//! one sample is `POST /v1/connect` for a new backend with `spawn.image = hangar-demo:dev`,
//! then `GET /` through the proxy (which waits for the backend to be ready) until it answers
//! 200: connect → Ready → first answer, the same end point as the floor.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const IMAGE: &str = "hangar-demo:dev";
const CONTAINER_PORT: u16 = 8080;
/// Every container this benchmark creates carries it, so leftovers of an interrupted run are
/// found and removed by the next.
const BENCH_LABEL: &str = "hangar.bench";
/// Bound on one sample: a backend that never answers fails the benchmark instead of hanging.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Delay between two attempts of the first request: short, so that it adds little to the
/// measured latency.
const POLL_INTERVAL: Duration = Duration::from_millis(1);

type Probe = Client<HttpConnector, Empty<Bytes>>;

/// How long each step of one spawn took.
#[derive(Clone, Copy, Debug)]
pub struct FloorSample {
    pub create: Duration,
    pub start: Duration,
    pub inspect: Duration,
    /// From the start having returned to the first 200.
    pub first_answer: Duration,
    /// Create to the first 200.
    pub total: Duration,
}

/// One raw spawn: create + start + inspect + the first `GET /` answered 200, as the Docker
/// runtime and the agent's probe do it but with nothing else. The container is left running;
/// the caller removes it.
pub async fn floor_once(docker: &Docker, probe: &Probe, name: &str) -> FloorSample {
    let port_key = format!("{CONTAINER_PORT}/tcp");
    let body = ContainerCreateBody {
        image: Some(IMAGE.to_string()),
        env: Some(vec![
            format!("PORT={CONTAINER_PORT}"),
            "HANGAR_BIND=0.0.0.0".to_string(),
            format!("HANGAR_BACKEND_ID={name}"),
        ]),
        labels: Some(HashMap::from([(BENCH_LABEL.to_string(), "1".to_string())])),
        exposed_ports: Some(vec![port_key.clone()]),
        host_config: Some(HostConfig {
            port_bindings: Some(HashMap::from([(
                port_key.clone(),
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".to_string()),
                    host_port: None,
                }]),
            )])),
            pids_limit: Some(512),
            ..Default::default()
        }),
        ..Default::default()
    };
    let begin = Instant::now();
    let options = CreateContainerOptionsBuilder::new().name(name).build();
    let id = docker
        .create_container(Some(options), body)
        .await
        .unwrap_or_else(|e| panic!("cannot create {name}: {e}"))
        .id;
    let created = Instant::now();
    docker
        .start_container(&id, None)
        .await
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let started = Instant::now();
    let info = docker.inspect_container(&id, None).await.unwrap();
    let host_port: u16 = info
        .network_settings
        .and_then(|n| n.ports)
        .and_then(|ports| ports.get(&port_key).cloned().flatten())
        .and_then(|bindings| bindings.into_iter().find_map(|b| b.host_port?.parse().ok()))
        .unwrap_or_else(|| panic!("{name} has no published port"));
    let inspected = Instant::now();
    let uri: hyper::Uri = format!(
        "http://{}/",
        SocketAddr::from((Ipv4Addr::LOCALHOST, host_port))
    )
    .parse()
    .unwrap();
    loop {
        if let Ok(response) = probe.get(uri.clone()).await
            && response.status() == hyper::StatusCode::OK
        {
            break;
        }
        assert!(
            begin.elapsed() < SAMPLE_TIMEOUT,
            "{name} did not answer within {SAMPLE_TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    let answered = Instant::now();
    FloorSample {
        create: created - begin,
        start: started - created,
        inspect: inspected - started,
        first_answer: answered - inspected,
        total: answered - begin,
    }
}

async fn remove_benchmark_containers(docker: &Docker) {
    let filters = HashMap::from([("label", vec![BENCH_LABEL.to_string()])]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let listed = docker.list_containers(Some(options)).await.unwrap();
    let removals = listed
        .into_iter()
        .filter_map(|c| c.id)
        .map(|id| async move {
            let options = RemoveContainerOptionsBuilder::new().force(true).build();
            let _ = docker.remove_container(&id, Some(options)).await;
        });
    futures_util::future::join_all(removals).await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn report(scenario: &str, samples: &[FloorSample]) {
    let mut total: Vec<Duration> = samples.iter().map(|s| s.total).collect();
    total.sort();
    let median = |f: fn(&FloorSample) -> Duration| {
        let mut v: Vec<Duration> = samples.iter().map(f).collect();
        v.sort();
        percentile(&v, 50.0)
    };
    println!(
        "| {scenario} | {} | {} | {} | {} | {} | {} | {} |",
        samples.len(),
        ms(percentile(&total, 50.0)),
        ms(percentile(&total, 99.0)),
        ms(median(|s| s.create)),
        ms(median(|s| s.start)),
        ms(median(|s| s.inspect)),
        ms(median(|s| s.first_answer)),
    );
}

/// `--name value` from the command line.
fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// `hangar serve` plus one docker drone, killed on drop.
struct Cluster {
    children: Vec<std::process::Child>,
    api: String,
    proxy: String,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_cluster() -> Cluster {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_hangar");
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Command::new(bin)
        .args([
            "serve",
            "--api",
            "127.0.0.1:0",
            "--proxy",
            "127.0.0.1:0",
            "--dns",
            "off",
        ])
        .args([
            "--metrics",
            "off",
            "--drone-secret",
            "bench-secret-1",
            "--data-dir",
        ])
        .arg(dir.path().join("serve"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hangar serve");
    let mut lines = BufReader::new(serve.stdout.take().unwrap()).lines();
    let (mut api, mut proxy) = (None, None);
    while api.is_none() || proxy.is_none() {
        let line = lines.next().expect("serve exited").unwrap();
        if let Some(a) = line.strip_prefix("hangar serve: api listening on ") {
            api = Some(a.trim().to_string());
        }
        if let Some(a) = line.strip_prefix("hangar serve: proxy listening on ") {
            proxy = Some(a.trim().to_string());
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let api = api.unwrap();
    let drone = Command::new(bin)
        .args([
            "drone",
            "--scheduler",
            &format!("http://{api}"),
            "--name",
            "bench-d1",
        ])
        .args([
            "--secret",
            "bench-secret-1",
            "--runtime",
            "docker",
            "--stop-grace",
            "1",
        ])
        .args([
            "--max-backends",
            "1000",
            "--memory-mb",
            "100000",
            "--cpu-millis",
            "100000",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("drone"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hangar drone");
    Cluster {
        children: vec![serve, drone],
        api,
        proxy: proxy.unwrap(),
        _dir: dir,
    }
}

/// `GET` a URL and decode its JSON answer.
async fn get_json(http: &reqwest::Client, url: String) -> serde_json::Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// One connect → Ready → first 200 through the proxy.
async fn hangar_once(http: &reqwest::Client, c: &Cluster) -> Duration {
    let begin = Instant::now();
    let resp: serde_json::Value = http
        .post(format!("http://{}/v1/connect", c.api))
        .json(&serde_json::json!({"spawn": {"image": IMAGE}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = resp["backend_id"]
        .as_str()
        .expect("connect answered a backend");
    let token = resp["token"].as_str().unwrap();
    let r = http
        .get(format!("http://{}/", c.proxy))
        .header("host", format!("{id}.hangar.localhost"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "backend {id} did not answer through the proxy"
    );
    begin.elapsed()
}

/// Terminates every live backend and waits until the drone has none.
async fn clear_backends(http: &reqwest::Client, c: &Cluster) {
    let list: serde_json::Value =
        get_json(http, format!("http://{}/v1/backends?status=live", c.api)).await;
    for b in list["backends"].as_array().unwrap() {
        let id = b["id"].as_str().unwrap();
        let _ = http
            .post(format!("http://{}/v1/backends/{id}/terminate", c.api))
            .json(&serde_json::json!({"hard": true}))
            .send()
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list: serde_json::Value =
            get_json(http, format!("http://{}/v1/backends?status=live", c.api)).await;
        if list["backends"].as_array().unwrap().is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "backends never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn report_hangar(scenario: &str, samples: &mut [Duration], floor: &[FloorSample]) {
    samples.sort();
    let mut f: Vec<Duration> = floor.iter().map(|s| s.total).collect();
    f.sort();
    let (h50, h99) = (percentile(samples, 50.0), percentile(samples, 99.0));
    let (f50, f99) = (percentile(&f, 50.0), percentile(&f, 99.0));
    println!(
        "| {scenario} | {} | {} / {} | {} / {} | {:+.1} ms / {:+.1} ms |",
        samples.len(),
        ms(f50),
        ms(f99),
        ms(h50),
        ms(h99),
        (h50.as_secs_f64() - f50.as_secs_f64()) * 1000.0,
        (h99.as_secs_f64() - f99.as_secs_f64()) * 1000.0,
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let runs: usize = arg("--runs")
        .map(|v| v.parse().expect("--runs takes a number"))
        .unwrap_or(if full { 30 } else { 2 });
    let rounds: usize = arg("--rounds")
        .map(|v| v.parse().expect("--rounds takes a number"))
        .unwrap_or(if full { 3 } else { 1 });
    let concurrency: Vec<usize> = arg("--concurrency")
        .map(|v| {
            v.split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .expect("--concurrency takes numbers: 20,100")
                })
                .collect()
        })
        .unwrap_or_else(|| vec![if full { 20 } else { 2 }]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let docker = hangar_drone::runtime::docker::engine_client(
            hangar_drone::runtime::docker::DEFAULT_DOCKER_HOST,
        )
        .await
        .expect("the docker engine is unreachable: start dockerd");
        if docker.inspect_image(IMAGE).await.is_err() {
            panic!("{IMAGE} is not present: build it with scripts/demo-image.sh");
        }
        remove_benchmark_containers(&docker).await;
        let probe: Probe = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
        let pid = std::process::id();

        println!("| Scenario | Samples | p50 | p99 | create p50 | start p50 | inspect p50 | first 200 after start p50 |");
        println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
        // One warm-up spawn, so that the first sample does not pay for cold caches.
        floor_once(&docker, &probe, &format!("hangar-bench-{pid}-warmup")).await;
        remove_benchmark_containers(&docker).await;

        let cluster = start_cluster();
        let http = reqwest::Client::builder()
            .timeout(SAMPLE_TIMEOUT)
            .build()
            .unwrap();
        // Wait for the drone, then warm the path up once.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let d: serde_json::Value = get_json(&http, format!("http://{}/v1/drones", cluster.api)).await;
            if d["drones"][0]["state"] == "ready" {
                break;
            }
            assert!(Instant::now() < deadline, "the docker drone never became ready: {d}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        hangar_once(&http, &cluster).await;
        clear_backends(&http, &cluster).await;

        // Sequential: floor and Hangar interleaved, one spawn at a time.
        let mut samples = Vec::with_capacity(runs);
        let mut through = Vec::with_capacity(runs);
        for i in 0..runs {
            let name = format!("hangar-bench-{pid}-s{i}");
            samples.push(floor_once(&docker, &probe, &name).await);
            // Removal is not part of a spawn; one container at a time keeps the host quiet.
            remove_benchmark_containers(&docker).await;
            through.push(hangar_once(&http, &cluster).await);
            clear_backends(&http, &cluster).await;
        }
        report("sequential", &samples);
        let mut comparisons = vec![("sequential".to_string(), through, samples)];

        for &c in &concurrency {
            let mut samples = Vec::with_capacity(c * rounds);
            let mut through = Vec::with_capacity(c * rounds);
            for round in 0..rounds {
                let spawns = (0..c).map(|i| {
                    let name = format!("hangar-bench-{pid}-c{c}-r{round}-{i}");
                    let (docker, probe) = (&docker, &probe);
                    async move { floor_once(docker, probe, &name).await }
                });
                samples.extend(futures_util::future::join_all(spawns).await);
                remove_benchmark_containers(&docker).await;
                let spawns = (0..c).map(|_| hangar_once(&http, &cluster));
                through.extend(futures_util::future::join_all(spawns).await);
                clear_backends(&http, &cluster).await;
            }
            report(&format!("{c} concurrent"), &samples);
            comparisons.push((format!("{c} concurrent"), through, samples));
        }
        println!();
        println!("| Scenario | Samples | floor p50 / p99 | through Hangar p50 / p99 | Hangar adds p50 / p99 |");
        println!("| --- | --- | --- | --- | --- |");
        for (scenario, mut through, floor) in comparisons {
            report_hangar(&scenario, &mut through, &floor);
        }
        drop(cluster);
    });
}
