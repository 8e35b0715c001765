//! Metrics and hot shards end to end: a real Prometheus scrapes `hangar dev`'s metrics
//! listener while three backends take traffic, one ten times more than the others; the
//! per-backend request rates and the hot flag are read back with PromQL, and `/v1/hot` and
//! `hangar hot` agree. Also: the exposition's label hygiene, usage reports from a network
//! drone, and the `--metrics` flags.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hangar_core::api::{ConnectResponse, HotList};
use serde_json::json;

use crate::support::cluster::{Drone, RemoteProxy, SECRET};
use crate::support::prometheus::{self, Prometheus};
use crate::support::{DEADLINE, Dev, cli, dev_cli, text};

/// How long after the traffic starts the hot backend must be flagged, in Prometheus.
const HOT_WITHIN: Duration = Duration::from_secs(10);

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Drives `rounds` of traffic until `stop` is set (bounded by `DEADLINE`): each round sends
/// ten requests to the first backend and one to each other, one after the other, so the
/// rates stay ten to one however fast the machine is.
async fn drive(dev: Arc<Dev>, backends: Vec<ConnectResponse>, stop: Arc<AtomicBool>) -> u64 {
    let deadline = Instant::now() + DEADLINE * 2;
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        for (i, b) in backends.iter().enumerate() {
            let n = if i == 0 { 10 } else { 1 };
            for _ in 0..n {
                let r = dev
                    .get_by_host(b.backend_id.as_str(), &b.token, "/count")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                sent += 1;
            }
        }
    }
    sent
}

/// Per-backend values of a PromQL query by the `backend` label.
async fn by_backend(prom: &Prometheus, promql: &str) -> BTreeMap<String, f64> {
    prom.query(promql)
        .await
        .into_iter()
        .filter_map(|(labels, v)| Some((labels.get("backend")?.as_str()?.to_string(), v)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_ten_times_hotter_backend_and_the_detector_flags_it() {
    let Some(bin) = prometheus::binary() else {
        return;
    };
    let dir = scratch();
    let dev = Arc::new(Dev::start(
        dir.path(),
        &[
            "--hot-window",
            "4s",
            "--hot-sustain",
            "2s",
            "--usage-interval",
            "1s",
        ],
    ));
    let metrics = dev.metrics.expect("dev reports its metrics listener");
    let prom = Prometheus::start(&bin, metrics).await;

    let mut backends = Vec::new();
    for key in ["metrics-hot", "metrics-cold-1", "metrics-cold-2"] {
        let r = dev.connect_key(key).await;
        dev.wait_ready(r.backend_id.as_str()).await;
        backends.push(r);
    }
    let ids: Vec<String> = backends.iter().map(|b| b.backend_id.to_string()).collect();
    let hot = ids[0].clone();

    // Prometheus scrapes Hangar.
    let deadline = Instant::now() + DEADLINE;
    while prom.query("up{job=\"hangar\"} == 1").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped hangar:\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let traffic = tokio::spawn(drive(dev.clone(), backends.clone(), stop.clone()));

    // Within 10 s: the rates show the ten-to-one split and the hot flag is on the hot one only.
    let rate_query =
        "sum by (backend) (rate(hangar_backend_requests_total{status_class=\"2xx\"}[5s]))";
    let (rates, flags) = loop {
        let rates = by_backend(&prom, rate_query).await;
        let flags = by_backend(&prom, "hangar_backend_hot").await;
        let rate = |id: &str| rates.get(id).copied().unwrap_or(0.0);
        let split = ids[1..]
            .iter()
            .all(|cold| rate(cold) > 0.0 && rate(&hot) >= 5.0 * rate(cold));
        let flagged = flags.get(&hot) == Some(&1.0)
            && ids[1..].iter().all(|cold| flags.get(cold) == Some(&0.0));
        if split && flagged {
            break (rates, flags);
        }
        assert!(
            started.elapsed() < HOT_WITHIN,
            "not seen within {HOT_WITHIN:?}: rates {rates:?}, hot flags {flags:?}, /v1/hot {}",
            text(dev.http.get(dev.api_url("/v1/hot"))).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "flagged after {:?}: rates {rates:?}, flags {flags:?}",
        started.elapsed()
    );
    // Exactly one backend is hot, by PromQL too.
    let hot_now = prom.query("hangar_backend_hot == 1").await;
    assert_eq!(hot_now.len(), 1, "{hot_now:?}");
    assert_eq!(hot_now[0].0["backend"], hot.as_str());
    assert_eq!(hot_now[0].0["drone"], "local");
    assert_eq!(hot_now[0].0["pool"], "default");

    // /v1/hot agrees, with the figures and the reason.
    let list: HotList = dev.get_json("/v1/hot").await;
    assert_eq!(list.backends.len(), 1, "{list:?}");
    let b = &list.backends[0];
    assert_eq!(b.backend.as_str(), hot);
    assert_eq!(b.reasons, vec![hangar_core::api::HotReason::RequestRate]);
    let rps = b.requests_per_second.unwrap();
    let median = b.pool_median_requests_per_second.unwrap();
    assert!(rps > 5.0 * median, "{b:?}");
    assert_eq!(list.settings.window_s, 4.0);
    // And so does the CLI, in text and JSON.
    let api = format!("http://{}", dev.api);
    let (code, out, err) = cli(&["hot", "--api", &api]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&hot) && out.contains("request_rate"), "{out}");
    assert!(!out.contains(&ids[1]) && !out.contains(&ids[2]), "{out}");
    let (code, out, _) = cli(&["hot", "--api", &api, "--json"]);
    assert_eq!(code, 0);
    let parsed: HotList = serde_json::from_str(&out).unwrap();
    assert_eq!(parsed.backends[0].backend.as_str(), hot);

    stop.store(true, Ordering::Relaxed);
    let sent = traffic.await.unwrap();
    assert!(sent > 0);

    // The exposition itself: per-backend series carry backend, drone and pool and never a key
    // or a user; usage reports of the embedded drone arrived; proxy and scheduler counters.
    let text = dev.scrape(metrics).await;
    for id in &ids {
        for name in [
            "hangar_backend_requests_total{",
            "hangar_backend_request_duration_seconds_bucket{",
            "hangar_backend_sent_bytes_total{",
            "hangar_backend_open_connections{",
            "hangar_backend_hot{",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(name) && l.contains(&format!("backend=\"{id}\""))),
                "no {name} for {id}"
            );
        }
    }
    assert!(text.contains("hangar_proxy_requests_total{mode=\"host\"}"));
    assert!(text.contains("hangar_scheduler_connects_total{outcome=\"spawned\"} 3"));
    assert!(text.contains("hangar_scheduler_spawn_phase_seconds_bucket{phase=\"waiting\""));
    assert!(
        text.contains("hangar_drone_backends{drone=\"local\",pool=\"default\",state=\"ready\"} 3")
    );
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = dev.scrape(metrics).await;
        if ids.iter().all(|id| {
            text.lines().any(|l| {
                l.starts_with("hangar_backend_memory_bytes{")
                    && l.contains(&format!("backend=\"{id}\""))
                    && !l.ends_with(" 0")
            })
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "no usage reported:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(line.starts_with("hangar_"), "{line}");
        for forbidden in ["key=", "user=", "namespace=", "metrics-hot", "metrics-cold"] {
            assert!(!line.contains(forbidden), "{line}");
        }
    }
    // Prometheus's own linter agrees with the naming (units, _total, HELP and TYPE).
    let promtool = bin.with_file_name("promtool");
    if promtool.is_file() {
        let (ok, complaints) = promtool_check(&promtool, text.as_bytes());
        assert!(ok, "promtool check metrics: {complaints}");
    }
    // Every query of the shipped Grafana dashboard is valid PromQL against this Prometheus,
    // and the main panels have data.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana/hangar.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$drone", ".*")
                .replace("$pool", ".*");
            // `query` fails the test on a PromQL error.
            let result = prom.query(&expr).await;
            queries += 1;
            let title = panel["title"].as_str().unwrap();
            if ["Requests/s, top 10 backends", "Backends by state"].contains(&title) {
                assert!(!result.is_empty(), "{title}: no data for {expr}");
            }
        }
    }
    assert!(queries >= 20, "{queries}");
}

/// `promtool check metrics` on an exposition: whether it passed, and what it said.
fn promtool_check(promtool: &std::path::Path, text: &[u8]) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_drone_reports_usage_and_serves_its_own_metrics() {
    let dir = scratch();
    let serve = Dev::start_serve(
        &dir.path().join("serve"),
        &["--drone-secret", SECRET, "--dns", "off"],
    );
    let drone = Drone::start(
        &serve,
        "d1",
        "process",
        dir.path(),
        &["--usage-interval", "1s"],
    )
    .await;
    let r = serve.connect_key("usage").await;
    serve.wait_ready(r.backend_id.as_str()).await;
    assert_eq!(serve.count(&r).await, 1);
    let metrics = serve.metrics.unwrap();
    // The drone's usage reports travel over its session to the scheduler's exposition.
    let deadline = Instant::now() + DEADLINE;
    let text = loop {
        let text = serve.scrape(metrics).await;
        let has = |name: &str| {
            text.lines().any(|l| {
                l.starts_with(name)
                    && l.contains(&format!("backend=\"{}\"", r.backend_id))
                    && l.contains("drone=\"d1\"")
            })
        };
        if has("hangar_backend_memory_bytes{") && has("hangar_backend_cpu_seconds{") {
            break text;
        }
        assert!(Instant::now() < deadline, "no usage reported:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(text.contains("hangar_drone_capacity_cpu_cores{drone=\"d1\""));
    assert!(text.contains("hangar_drone_heartbeat_age_seconds{drone=\"d1\""));

    // The drone's own listener: its session and usage collection.
    let own = drone
        .metrics()
        .expect("the drone reports its metrics listener");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = serve.scrape(own).await;
        if text.contains("hangar_agent_session_connected 1")
            && text.contains("hangar_agent_usage_backends 1")
        {
            assert!(
                text.contains("hangar_agent_session_connects_total 1"),
                "{text}"
            );
            assert!(
                text.contains("hangar_agent_usage_collect_seconds_bucket"),
                "{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "drone metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _, err) = cli(&[
        "drone",
        "--scheduler",
        &format!("http://{}", serve.api),
        "--name",
        "bad",
        "--secret",
        SECRET,
        "--data-dir",
        dir.path().join("bad").to_str().unwrap(),
        "--metrics",
        "nonsense",
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--metrics"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_proxy_exposes_per_backend_traffic_and_its_counts_reach_the_detector() {
    let dir = scratch();
    let serve = Dev::start_serve(
        &dir.path().join("serve"),
        &[
            "--drone-secret",
            SECRET,
            "--dns",
            "off",
            "--hot-window",
            "4s",
            "--hot-sustain",
            "2s",
        ],
    );
    let _drone = Drone::start(&serve, "d1", "process", dir.path(), &[]).await;
    let edge = RemoteProxy::start(&serve);
    let mut backends = Vec::new();
    for key in ["edge-hot", "edge-cold-1", "edge-cold-2"] {
        let r = serve.connect_key(key).await;
        serve.wait_ready(r.backend_id.as_str()).await;
        backends.push(r);
    }
    let via = |r: &ConnectResponse| {
        serve
            .http
            .get(format!("http://{}/count", edge.addr))
            .header("host", format!("{}.hangar.localhost", r.backend_id))
            .bearer_auth(&r.token)
    };
    // The edge learns the routes from the feed.
    let deadline = Instant::now() + DEADLINE;
    for r in &backends {
        while !via(r).send().await.is_ok_and(|resp| resp.status() == 200) {
            assert!(
                Instant::now() < deadline,
                "the edge never served {}",
                r.backend_id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Ten to one through the edge, until the scheduler (which sees only the edge's activity
    // reports) flags the hot one.
    let hot = backends[0].backend_id.clone();
    let deadline = Instant::now() + DEADLINE;
    loop {
        for (i, r) in backends.iter().enumerate() {
            for _ in 0..if i == 0 { 10 } else { 1 } {
                assert_eq!(via(r).send().await.unwrap().status(), 200);
            }
        }
        let list: HotList = serve.get_json("/v1/hot").await;
        if !list.backends.is_empty() {
            assert_eq!(list.backends.len(), 1, "{list:?}");
            assert_eq!(list.backends[0].backend, hot);
            break;
        }
        assert!(Instant::now() < deadline, "never flagged: {list:?}");
    }
    // The edge's own exposition: per-backend series labelled with the drone and pool the
    // feed carries.
    let own = edge.metrics.expect("the edge reports its metrics listener");
    let text = serve.scrape(own).await;
    for r in &backends {
        let prefix = format!(
            "hangar_backend_requests_total{{backend=\"{}\",drone=\"d1\",pool=\"default\",status_class=\"2xx\"}} ",
            r.backend_id
        );
        assert!(
            text.lines().any(|l| l.starts_with(&prefix)),
            "no {prefix} in:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_off_and_bad_flags_exit_64() {
    let dir = scratch();
    let dev = Dev::start(dir.path(), &["--metrics", "off"]);
    assert_eq!(dev.metrics, None);
    let r = dev.connect(json!({"key": {"name": "quiet"}})).await;
    dev.wait_ready(r.backend_id.as_str()).await;
    assert_eq!(dev.count(&r).await, 1);
    // The detector runs without metrics.
    let list: HotList = dev.get_json("/v1/hot").await;
    assert!(list.backends.is_empty());

    let other = scratch();
    let data_dir = other.path().to_str().unwrap();
    let run = |extra: &[&str]| dev_cli(data_dir, &[&["--dns", "off"], extra].concat());
    for (extra, flag) in [
        (&["--metrics", "nonsense"][..], "--metrics"),
        (&["--metrics-grace", "0"][..], "--metrics-grace"),
        (&["--hot-rate-multiple", "0.5"][..], "--hot-rate-multiple"),
        (&["--hot-cpu-fraction", "2"][..], "--hot-cpu-fraction"),
    ] {
        let (code, _, err) = run(extra);
        assert_eq!(code, 64, "{extra:?}: {err}");
        assert!(err.contains(flag), "{extra:?}: {err}");
    }
    // A taken explicit address is an error that says what to do.
    let running_dir = scratch();
    let running = Dev::start(running_dir.path(), &[]);
    let taken = running.metrics.unwrap().to_string();
    let (code, _, err) = run(&["--metrics", &taken]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--metrics off"), "{err}");
}
