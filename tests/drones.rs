//! `hangar serve` with network drones: placement over two drones, capacity refusals, wrong
//! secrets, lost drones, drain, scheduler restart, and the Docker runtime (caps, re-adoption,
//! missing images, a dead daemon).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::cluster::{
    Drone, SECRET, containers_of, ensure_demo_image, inspect, remove_containers,
};
use crate::support::{BIN, DEADLINE, Dev, cli, unix_now};

fn serve(dir: &std::path::Path, extra: &[&str]) -> Dev {
    let mut args = vec!["--drone-secret", SECRET, "--lease-ttl", "2", "--dns", "off"];
    args.extend_from_slice(extra);
    Dev::start_serve(&dir.join("serve"), &args)
}

const SMALL: &[&str] = &["--cpu-millis", "1000", "--memory-mb", "1024"];

/// `serve` with `extra` flags, drone `d1`, and one ready session for `key` that has answered
/// once.
async fn serve_with_session(
    dir: &std::path::Path,
    extra: &[&str],
    key: &str,
) -> (Dev, Drone, hangar_core::api::ConnectResponse) {
    let serve = serve(dir, extra);
    let d1 = Drone::start(&serve, "d1", "process", dir, SMALL).await;
    let r = serve.connect_key(key).await;
    serve.wait_ready(r.backend_id.as_str()).await;
    assert_eq!(serve.count(&r).await, 1);
    (serve, d1, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_spread_over_two_drones_and_what_fits_nowhere_is_a_503() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve(dir.path(), &[]);
    let _d1 = Drone::start(&serve, "d1", "process", dir.path(), SMALL).await;
    let _d2 = Drone::start(&serve, "d2", "process", dir.path(), SMALL).await;
    let mut drones = HashSet::new();
    for k in ["a", "b", "c", "d"] {
        let r = serve.connect_key(k).await;
        let v = serve.wait_ready(r.backend_id.as_str()).await;
        assert_eq!(serve.count(&r).await, 1, "answers through the proxy");
        drones.insert(v.drone.unwrap());
    }
    assert_eq!(drones.len(), 2, "both drones used: {drones:?}");
    let d1 = serve.drone("d1").await.unwrap();
    assert_eq!(d1.reserved.backends, 2);
    assert_eq!(
        d1.reserved.cpu_millis, 200,
        "default reservation is 100m per backend"
    );

    // Larger than any drone's free memory: 503 naming the reason per drone.
    let (status, v) = serve
        .connect_raw(json!({"spawn": {"resources": {"memory_mb": 2048}}}))
        .await;
    assert_eq!(status, 503, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("d1 has") && msg.contains("MB free memory, needs 2048"),
        "{msg}"
    );
    // A pool nobody serves.
    let (status, v) = serve.connect_raw(json!({"spawn": {"pool": "gpu"}})).await;
    assert_eq!(status, 503);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("pool"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drone_with_a_wrong_secret_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve(dir.path(), &[]);
    let out = std::process::Command::new(BIN)
        .args(["drone", "--scheduler"])
        .arg(format!("http://{}", serve.api))
        .args([
            "--name",
            "bad",
            "--secret",
            "not-the-secret",
            "--runtime",
            "process",
            "--data-dir",
        ])
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("drone secret is missing or wrong"), "{err}");
    assert!(serve.drone("bad").await.is_none());
    // And serve itself refuses to start without a secret (exit 64).
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--api",
            "127.0.0.1:0",
            "--proxy",
            "127.0.0.1:0",
            "--dns",
            "off",
            "--data-dir",
        ])
        .arg(dir.path().join("nosecret"))
        .env_remove("HANGAR_DRONE_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--drone-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_drone_loses_its_backends_within_ttl_and_keys_move_to_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve(dir.path(), &[]);
    let mut d1 = Drone::start(&serve, "d1", "process", dir.path(), SMALL).await;
    // Only d1 exists while the backend is placed.
    let r = serve.connect_key("moving").await;
    let v = serve.wait_ready(r.backend_id.as_str()).await;
    assert_eq!(v.drone.as_deref(), Some("d1"));
    let _d2 = Drone::start(&serve, "d2", "process", dir.path(), SMALL).await;

    // kill -9 the agent (its process backends die with it).
    d1.kill9();
    let killed = Instant::now();
    let lost = serve
        .wait_for(r.backend_id.as_str(), "lost", |v| {
            v.state.name() == "terminated"
        })
        .await;
    let took = killed.elapsed();
    assert_eq!(
        serde_json::to_value(&lost).unwrap()["reason"],
        json!({"kind": "lost"})
    );
    assert!(
        took <= Duration::from_secs(4),
        "lost after {took:?}, limit TTL 2 s + 2 s"
    );
    let resp = serve
        .get_by_host(r.backend_id.as_str(), &r.token, "/count")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 410);
    let next = serve.connect_key("moving").await;
    assert!(next.spawned);
    let nv = serve.wait_ready(next.backend_id.as_str()).await;
    assert_eq!(nv.drone.as_deref(), Some("d2"));
    assert_eq!(nv.epoch, lost.epoch + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_cordons_terminates_at_the_deadline_and_reports_drained_only_when_empty() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve(dir.path(), &[]);
    let _d1 = Drone::start(&serve, "d1", "process", dir.path(), SMALL).await;
    let a = serve.connect_key("on-d1").await;
    let av = serve.wait_ready(a.backend_id.as_str()).await;
    assert_eq!(av.drone.as_deref(), Some("d1"));
    let _d2 = Drone::start(&serve, "d2", "process", dir.path(), SMALL).await;

    let r = serve
        .http
        .post(serve.api_url("/v1/drones/d1/drain"))
        .json(&json!({"deadline_s": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(serve.drone("d1").await.unwrap().state, "draining");
    // Nothing new lands on d1 (it is also the less loaded one without the drain).
    for k in ["n1", "n2", "n3"] {
        let r = serve.connect_key(k).await;
        let v = serve.wait_ready(r.backend_id.as_str()).await;
        assert_eq!(
            v.drone.as_deref(),
            Some("d2"),
            "{k} placed on a draining drone"
        );
    }
    // `drained` is reported only once the backend really stopped.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let d = serve.drone("d1").await.unwrap();
        let b = serve.backend(a.backend_id.as_str()).await;
        if d.state == "drained" {
            assert_eq!(
                b.state.name(),
                "terminated",
                "drained before its backend ended"
            );
            assert_eq!(
                serde_json::to_value(&b).unwrap()["reason"],
                json!({"kind": "drained"})
            );
            assert!(
                std::net::TcpStream::connect(av.address.unwrap()).is_err(),
                "the backend process still listens"
            );
            break;
        }
        assert_eq!(d.state, "draining");
        assert!(Instant::now() < deadline, "never drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Undrain: d1 takes work again (it is the emptier drone, so the next backend goes there).
    let r = serve
        .http
        .post(serve.api_url("/v1/drones/d1/undrain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(serve.drone("d1").await.unwrap().state, "ready");
    let r = serve.connect_key("after-undrain").await;
    let v = serve.wait_ready(r.backend_id.as_str()).await;
    assert_eq!(v.drone.as_deref(), Some("d1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_serve_reloads_everything_and_sessions_keep_answering() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, _d1, r) = serve_with_session(dir.path(), &[], "survivor").await;
    let api = first.api.to_string();
    first.terminate();
    drop(first);

    // Same data directory and API address (the drone reconnects to it).
    let second = serve(dir.path(), &["--api", &api]);
    let v = second.backend(r.backend_id.as_str()).await;
    assert_eq!(v.state.name(), "ready", "record back after restart: {v:?}");
    second.wait_drone("d1", "ready").await;
    assert_eq!(second.count(&r).await, 2, "same process, same counter");
    let again = second.connect_key("survivor").await;
    assert!(!again.spawned);
    assert_eq!(again.backend_id, r.backend_id);
}

/// A planned stop with a maintenance window: `serve` is down for twice the lease TTL (well
/// past the fence deadline), and every session survives with its state, because the drones
/// held their fence for the window and the restarted `serve` declares nobody lost. The same
/// outage without a window fences the backend (the control) .
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maintenance_window_keeps_every_session_through_a_restart_of_serve() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, _d1, kept) =
        serve_with_session(dir.path(), &["--maintenance-window", "10s"], "kept").await;
    let api = first.api.to_string();
    first.terminate();
    drop(first);
    // Down for 4 s: the lease TTL is 2 s, the fence deadline 1.5 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut second = serve(dir.path(), &["--api", &api]);
    session_survived(&second, &kept).await;

    // The control: the same outage without a window.
    second.terminate();
    drop(second);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let third = serve(dir.path(), &["--api", &api]);
    third.wait_drone("d1", "ready").await;
    let v = third
        .wait_for(kept.backend_id.as_str(), "ended", |v| !v.state.is_live())
        .await;
    assert!(
        matches!(
            v.state
                .termination_reason()
                .map(ToString::to_string)
                .as_deref(),
            Some("fenced" | "lost")
        ),
        "{v:?}"
    );
}

/// Planned maintenance at full scale: a window of a minute begun with `hangar maintenance
/// start --for 60s`, then `serve` killed (no graceful path is needed: the promise is stored
/// and the drones were told before the command answered) and started again 30 s later, 15
/// lease TTLs on: the session is alive with its state, and nothing was declared lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_maintenance_keeps_every_session_through_thirty_seconds_without_serve() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, _d1, kept) = serve_with_session(dir.path(), &[], "kept").await;
    let api = format!("http://{}", first.api);
    let token = first.token.clone().expect("serve wrote an admin token");
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--api", &api, "--api-token", &token]);
        cli(&all)
    };
    // Bad lengths are refused and say what is allowed.
    for bad in ["0s", "200d", "soon"] {
        let (code, out, err) = cli(&["maintenance", "start", "--for", bad]);
        assert_ne!(code, 0, "--for {bad}: {out}");
        assert!(
            err.contains("7 days") || err.contains("duration") || err.contains("second"),
            "--for {bad}: {err}"
        );
    }
    let (code, out, err) = cli(&["maintenance", "start", "--for", "60s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("maintenance window in force"), "{out}");
    let (code, out, err) = cli(&["maintenance", "status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    let until_s = view["window"]["until"].as_u64().expect("a window") / 1000;
    assert!(until_s + 2 >= unix_now() + 60, "{view}");
    // A shorter window does not shorten it.
    let (code, out, _) = cli(&["maintenance", "start", "--for", "5s", "--json"]);
    assert_eq!(code, 0);
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["window"], view["window"], "never shortened");

    let api_addr = first.api.to_string();
    first.kill9();
    drop(first);
    // The outage under test: 30 s without any control plane (the lease TTL is 2 s).
    tokio::time::sleep(Duration::from_secs(30)).await;
    let second = serve(dir.path(), &["--api", &api_addr]);
    session_survived(&second, &kept).await;
}

/// After a restart of `serve`: `d1` is back, and the session `kept` (which answered once
/// before) still runs with its state, and is what a connect for its key gets.
async fn session_survived(serve: &Dev, kept: &hangar_core::api::ConnectResponse) {
    serve.wait_drone("d1", "ready").await;
    let v = serve.backend(kept.backend_id.as_str()).await;
    assert_eq!(v.state.name(), "ready", "{v:?}");
    assert_eq!(serve.count(kept).await, 2, "same process, state intact");
    let again = serve.connect_key("kept").await;
    assert!(!again.spawned && again.backend_id == kept.backend_id);
}

/// Removes the containers of the named docker drones when dropped.
struct Cleanup(&'static [&'static str]);

impl Cleanup {
    /// Starts a docker test: the demo image is there and no container of `drones` is left
    /// from an earlier run; they are removed again when the test ends.
    fn docker_test(drones: &'static [&'static str]) -> Cleanup {
        ensure_demo_image();
        remove_containers(drones);
        Cleanup(drones)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_containers(self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_drones_apply_caps_and_a_restarted_agent_readopts_its_containers() {
    let _cleanup = Cleanup::docker_test(&["dk-a1", "dk-a2"]);
    let dir = tempfile::tempdir().unwrap();
    let serve = serve(dir.path(), &[]);
    let mut a1 = Drone::start(
        &serve,
        "dk-a1",
        "docker",
        dir.path(),
        &["--stop-grace", "2"],
    )
    .await;
    let r = serve
        .connect(json!({
            "key": {"name": "container"},
            "spawn": {"image": "hangar-demo:dev", "resources": {"cpu_millis": 500, "memory_mb": 64}}
        }))
        .await;
    let v = serve.wait_ready(r.backend_id.as_str()).await;
    assert_eq!(v.drone.as_deref(), Some("dk-a1"));
    assert_eq!(serve.count(&r).await, 1);
    assert_eq!(serve.count(&r).await, 2);
    let ids = containers_of("dk-a1", false);
    assert_eq!(ids.len(), 1);
    assert_eq!(inspect(&ids[0], "{{.HostConfig.NanoCpus}}"), "500000000");
    assert_eq!(
        inspect(&ids[0], "{{.HostConfig.Memory}}"),
        (64u64 << 20).to_string()
    );
    assert_ne!(inspect(&ids[0], "{{.HostConfig.PidsLimit}}"), "<nil>");
    assert_eq!(
        inspect(&ids[0], "{{index .Config.Labels \"hangar.backend_id\"}}"),
        r.backend_id.as_str()
    );
    // The container's memory (Docker one-shot stats, reported by the drone) reaches the
    // scheduler's metrics.
    let metrics = serve.metrics.expect("serve exposes metrics");
    let series = format!("hangar_backend_memory_bytes{{backend=\"{}\"", r.backend_id);
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let text = serve.scrape(metrics).await;
        let value = text
            .lines()
            .find(|l| l.starts_with(&series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if value.is_some_and(|v| v > 0.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no memory figure for the container's backend: {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // kill -9 of the agent alone: the container keeps running; a new agent run adopts it.
    a1.kill9();
    let a1 = Drone::start(
        &serve,
        "dk-a1",
        "docker",
        dir.path(),
        &["--stop-grace", "2"],
    )
    .await;
    let v2 = serve.wait_ready(r.backend_id.as_str()).await;
    assert_eq!(v2.id, v.id);
    assert_eq!(
        serve.count(&r).await,
        3,
        "the session survived the agent restart"
    );
    assert_eq!(containers_of("dk-a1", false), ids, "no duplicate container");
    let rec = serve.drone("dk-a1").await.unwrap();
    assert_eq!(rec.backends.get("ready"), Some(&1));
    drop(a1);

    // A missing image: failed, with what to do.
    let _a2 = Drone::start(&serve, "dk-a2", "docker", dir.path(), &[]).await;
    let m = serve
        .connect(json!({"spawn": {"image": "hangar-missing:nope"}}))
        .await;
    let mv = serve
        .wait_for(m.backend_id.as_str(), "failed", |v| {
            v.state.name() == "terminated"
        })
        .await;
    let message = mv.message.unwrap_or_default();
    assert!(
        message.contains("image hangar-missing:nope is not present on drone"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drone_whose_docker_daemon_is_unreachable_is_unhealthy_and_takes_no_work() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve(dir.path(), &[]);
    let _d = Drone::start_unready(
        &serve,
        "dead-docker",
        dir.path(),
        &["--docker-host", "unix:///nonexistent/docker.sock"],
    );
    let d = serve.wait_drone("dead-docker", "unhealthy").await;
    let why = d.message.unwrap_or_default();
    assert!(why.contains("unreachable"), "{why}");
    let (status, v) = serve
        .connect_raw(json!({"spawn": {"image": "hangar-demo:dev"}}))
        .await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unhealthy"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drone_cut_off_from_the_scheduler_past_its_ttl_stops_its_own_backends() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = serve(dir.path(), &[]);
    let _d1 = Drone::start(&serve, "fence", "process", dir.path(), SMALL).await;
    let r = serve.connect_key("fenced").await;
    let v = serve.wait_ready(r.backend_id.as_str()).await;
    let addr = v.address.unwrap();
    assert!(std::net::TcpStream::connect(addr).is_ok());
    // The scheduler vanishes: the drone cannot renew its 2 s lease and must stop its backend
    // on its own, since the scheduler (when back) will have declared it lost.
    serve.kill9();
    let cut = Instant::now();
    let deadline = cut + DEADLINE;
    while std::net::TcpStream::connect(addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the backend outlived its drone's lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The guard band: the drone fences at three quarters of the TTL after the send time of its
    // last acknowledged heartbeat, so before the scheduler may free its keys (at the TTL).
    let took = cut.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "self-fenced after {took:?}; the lease TTL is 2 s and the fence must come before it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_docker_drones_share_backends_and_a_lost_one_hands_its_keys_to_the_other() {
    let _cleanup = Cleanup::docker_test(&["dk-b1", "dk-b2"]);
    let dir = tempfile::tempdir().unwrap();
    let serve = serve(dir.path(), &[]);
    let caps = &[
        "--memory-mb",
        "512",
        "--cpu-millis",
        "2000",
        "--stop-grace",
        "1",
    ];
    let mut b1 = Drone::start(&serve, "dk-b1", "docker", dir.path(), caps).await;
    let _b2 = Drone::start(&serve, "dk-b2", "docker", dir.path(), caps).await;
    let spawn = json!({"image": "hangar-demo:dev", "resources": {"memory_mb": 64}});
    let mut placed = Vec::new();
    for k in ["k1", "k2"] {
        let r = serve
            .connect(json!({"key": {"name": k}, "spawn": spawn}))
            .await;
        let v = serve.wait_ready(r.backend_id.as_str()).await;
        assert_eq!(serve.count(&r).await, 1, "{k} answers through the proxy");
        placed.push((r, v.drone.unwrap()));
    }
    let drones: HashSet<&str> = placed.iter().map(|(_, d)| d.as_str()).collect();
    assert_eq!(
        drones.len(),
        2,
        "spread over both docker drones: {drones:?}"
    );
    // Larger than either drone's free memory: 503 with the reason per drone.
    let (status, v) = serve
        .connect_raw(
            json!({"spawn": {"image": "hangar-demo:dev", "resources": {"memory_mb": 1024}}}),
        )
        .await;
    assert_eq!(status, 503, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("dk-b1 has") && msg.contains("dk-b2 has"),
        "{msg}"
    );

    // kill -9 of dk-b1's agent and its containers: lost within TTL + 2 s, 410, and the key
    // moves to dk-b2.
    let (on_b1, _) = placed.iter().find(|(_, d)| d == "dk-b1").unwrap();
    b1.kill9();
    remove_containers(&["dk-b1"]);
    let killed = Instant::now();
    let lost = serve
        .wait_for(on_b1.backend_id.as_str(), "lost", |v| {
            v.state.name() == "terminated"
        })
        .await;
    assert!(
        killed.elapsed() <= Duration::from_secs(4),
        "lost after {:?}",
        killed.elapsed()
    );
    assert_eq!(
        serde_json::to_value(&lost).unwrap()["reason"],
        json!({"kind": "lost"})
    );
    let resp = serve
        .get_by_host(on_b1.backend_id.as_str(), &on_b1.token, "/count")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 410);
    let key = on_b1.key.as_ref().unwrap().name.clone();
    let next = serve
        .connect(json!({"key": {"name": key}, "spawn": spawn}))
        .await;
    assert!(next.spawned);
    let nv = serve.wait_ready(next.backend_id.as_str()).await;
    assert_eq!(nv.drone.as_deref(), Some("dk-b2"));
    assert_eq!(serve.count(&next).await, 1);
}

/// Hollow drones (benchmarks and tests only): twenty drone sessions in one process take
/// backends through the real protocol, their shared address answers through the proxy, a stop
/// ends a backend, and when the process dies every drone is lost and its backends with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hollow_drones_take_backends_through_real_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve(dir.path(), &[]);
    let mut hollow = std::process::Command::new(BIN)
        .args([
            "hollow-drones",
            "--scheduler",
            &format!("http://{}", serve.api),
            "--secret",
            SECRET,
            "--count",
            "20",
        ])
        .env("HANGAR_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let ready = serve
            .drones()
            .await
            .iter()
            .filter(|d| d.state == "ready" && d.name.starts_with("hollow-"))
            .count();
        if ready == 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ready} of 20 hollow drones ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sessions = Vec::new();
    for i in 0..60 {
        sessions.push(serve.connect_key(&format!("hollow-{i}")).await);
    }
    let mut drones = HashSet::new();
    for r in &sessions {
        let v = serve.wait_ready(r.backend_id.as_str()).await;
        drones.insert(v.drone.unwrap());
    }
    assert!(drones.len() > 5, "spread over the drones: {drones:?}");
    let answer = serve
        .get_by_host(
            sessions[0].backend_id.as_str(),
            &sessions[0].token,
            "/anything",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), "hollow\n");
    let stopped = serve
        .http
        .post(serve.api_url(&format!(
            "/v1/backends/{}/terminate",
            sessions[1].backend_id
        )))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(stopped.status(), 202);
    serve
        .wait_for(sessions[1].backend_id.as_str(), "terminated", |v| {
            v.state.name() == "terminated"
        })
        .await;
    // The process dies: every drone's lease runs out and its backends are lost.
    let _ = hollow.kill();
    let _ = hollow.wait();
    for r in &sessions[2..] {
        let v = serve
            .wait_for(r.backend_id.as_str(), "lost", |v| !v.state.is_live())
            .await;
        assert_eq!(
            v.state
                .termination_reason()
                .map(ToString::to_string)
                .as_deref(),
            Some("lost"),
            "{v:?}"
        );
    }
}
