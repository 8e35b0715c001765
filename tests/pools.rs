//! Pools end to end: warm backends of `hangar dev`'s process drone answering with their key
//! once claimed, the converger lowering a pool, a killed drone's warm backends refilled on
//! another, and the Docker claim path with the demo image.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hangar_core::pool::Pool;
use serde_json::json;

use crate::support::cluster::{Drone, SECRET, ensure_demo_image, remove_containers};
use crate::support::{DEADLINE, Dev, cli, text};

/// Polls pool `name` until `pred` holds (or fails the test at the deadline).
async fn wait_pool(dev: &Dev, name: &str, what: &str, pred: impl Fn(&Pool) -> bool) -> Pool {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let p: Pool = dev.get_json(&format!("/v1/pools/{name}")).await;
        if pred(&p) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "pool {name} never got {what}; last: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pool's unclaimed backends (from the backend list: keyless and live).
async fn warm_backends(dev: &Dev) -> Vec<hangar_core::api::BackendView> {
    let list: hangar_core::api::BackendList = dev.get_json("/v1/backends").await;
    list.backends
        .into_iter()
        .filter(|b| b.key.is_none() && b.state.is_live())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_keeps_warm_process_backends_that_learn_their_key_when_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path(), &[]);
    let api = format!("http://{}", dev.api);
    let (code, out, err) = cli(&["pool", "create", "default", "--warm", "5", "--api", &api]);
    assert_eq!(code, 0, "{out}{err}");
    let p = wait_pool(&dev, "default", "5 warm", |p| p.status.warm_ready == 5).await;
    assert_eq!(p.status.claimed, 0);
    let warm: HashSet<_> = warm_backends(&dev)
        .await
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(warm.len(), 5);
    // A warm backend is not routable: nobody has a token for it, and it is not ready to the
    // proxy.
    let some = warm.iter().next().unwrap();
    let resp = dev
        .get_by_host(some.as_str(), "x", "/")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_client_error(), "{}", resp.status());

    // A connect for a new key claims one: ready at once, and it knows its key and epoch.
    let r = dev.connect_key("doc-1").await;
    assert!(r.warm && r.spawned, "{r:?}");
    assert_eq!(r.status, "ready");
    assert!(warm.contains(&r.backend_id));
    let hello = text(dev.get_by_host(r.backend_id.as_str(), &r.token, "/")).await;
    assert!(
        hello.ends_with("key default/doc-1 epoch 1\n"),
        "the claimed backend answers with its key and epoch: {hello}"
    );
    let headers = text(dev.get_by_host(r.backend_id.as_str(), &r.token, "/headers")).await;
    assert!(headers.contains("x-hangar-key: default/doc-1"), "{headers}");
    assert!(headers.contains("x-hangar-epoch: 1"), "{headers}");
    assert_eq!(dev.count(&r).await, 1);
    // The same key finds the same backend.
    let again = dev.connect_key("doc-1").await;
    assert_eq!(again.backend_id, r.backend_id);
    assert!(!again.spawned);

    // The pool refills to 5 warm, with one claimed.
    wait_pool(&dev, "default", "refilled", |p| {
        p.status.warm_ready == 5 && p.status.claimed == 1
    })
    .await;

    // A burst of 20 connects for new keys: the five warm backends go first, the rest start
    // cold (or take warm ones refilled meanwhile); every one answers with its own key.
    let warm: HashSet<_> = warm_backends(&dev)
        .await
        .into_iter()
        .filter(|b| b.state.name() == "ready")
        .map(|b| b.id)
        .collect();
    assert_eq!(warm.len(), 5);
    let burst = (0..20).map(|i| {
        let dev = &dev;
        async move { dev.connect_key(&format!("burst-{i}")).await }
    });
    let answers = futures_util::future::join_all(burst).await;
    let served_warm = answers.iter().filter(|a| a.warm).count();
    assert!(
        (5..20).contains(&served_warm),
        "{served_warm} of 20 served warm"
    );
    for id in &warm {
        assert!(
            answers.iter().any(|a| a.warm && a.backend_id == *id),
            "every warm backend was claimed by the burst"
        );
    }
    for (i, a) in answers.iter().enumerate() {
        let hello = text(dev.get_by_host(a.backend_id.as_str(), &a.token, "/")).await;
        assert!(
            hello.ends_with(&format!("key default/burst-{i} epoch 1\n")),
            "{hello}"
        );
    }
    wait_pool(&dev, "default", "refilled after the burst", |p| {
        p.status.warm_ready == 5 && p.status.claimed == 21
    })
    .await;

    // Lowered to 1: the converger removes the surplus (never the claimed one).
    let (code, out, err) = cli(&["pool", "set", "default", "--warm", "1", "--api", &api]);
    assert_eq!(code, 0, "{out}{err}");
    wait_pool(&dev, "default", "1 warm", |p| {
        p.status.warm_ready == 1 && p.status.warm_starting == 0
    })
    .await;
    assert_eq!(warm_backends(&dev).await.len(), 1);
    assert_eq!(dev.count(&r).await, 2, "the claimed session lives on");
    let (code, out, err) = cli(&["pool", "show", "default", "--api", &api]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("default"), "{out}");

    // A connect naming a pool that does not exist is a 404 that says so.
    let (status, v) = dev
        .connect_raw(json!({"key": {"name": "x"}, "pool": "nope"}))
        .await;
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no pool \"nope\"")
    );
}

fn serve(dir: &std::path::Path) -> Dev {
    Dev::start_serve(
        &dir.join("serve"),
        &["--drone-secret", SECRET, "--lease-ttl", "2", "--dns", "off"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_drones_warm_backends_are_refilled_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve(dir.path());
    let mut d1 = Drone::start(&serve, "d1", "process", dir.path(), &[]).await;
    let _d2 = Drone::start(&serve, "d2", "process", dir.path(), &[]).await;
    let created = serve
        .http
        .post(serve.api_url("/v1/pools"))
        .json(&json!({"name": "default", "warm": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    wait_pool(&serve, "default", "4 warm", |p| p.status.warm_ready == 4).await;
    let on = |drone: &str, list: &[hangar_core::api::BackendView]| {
        list.iter()
            .filter(|b| b.drone.as_deref() == Some(drone))
            .count()
    };
    let before = warm_backends(&serve).await;
    assert!(on("d1", &before) > 0, "spread over both drones: {before:?}");

    d1.kill9();
    // Lost within the lease TTL, then refilled on d2.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let now = warm_backends(&serve).await;
        let ready_on_d2 = now
            .iter()
            .filter(|b| b.drone.as_deref() == Some("d2") && b.state.name() == "ready")
            .count();
        if on("d1", &now) == 0 && ready_on_d2 == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "never refilled on d2: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_pool_claims_a_warm_container_that_answers_with_its_key() {
    ensure_demo_image();
    remove_containers(&["dk-p1"]);
    let dir = tempfile::tempdir().unwrap();
    let serve = serve(dir.path());
    let _d = Drone::start(
        &serve,
        "dk-p1",
        "docker",
        dir.path(),
        &["--stop-grace", "1"],
    )
    .await;
    let created = serve
        .http
        .post(serve.api_url("/v1/pools"))
        .json(&json!({"name": "web", "warm": 2, "template": {"image": "hangar-demo:dev"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    wait_pool(&serve, "web", "2 warm", |p| p.status.warm_ready == 2).await;
    let r = serve
        .connect(json!({"key": {"name": "room"}, "pool": "web"}))
        .await;
    assert!(r.warm, "{r:?}");
    let hello = text(serve.get_by_host(r.backend_id.as_str(), &r.token, "/")).await;
    assert!(hello.ends_with("key default/room epoch 1\n"), "{hello}");
    // A rollout to an image no drone has reverts by itself, and touches no live session.
    let started = Instant::now();
    let rolled = serve
        .http
        .post(serve.api_url("/v1/pools/web/rollout"))
        .json(&json!({"image": "hangar-missing:none", "deadline_s": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(rolled.status(), 200);
    let p = wait_pool(&serve, "web", "reverted", |p| p.rollout.is_none()).await;
    let g2 = p.generations.iter().find(|g| g.number == 2).unwrap();
    assert_eq!(g2.status, "reverted", "{g2:?}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "within its deadline"
    );
    assert_eq!(p.generation, 1);
    assert!(p.status.failed_starts >= 2, "{:?}", p.status);
    let why = p.status.last_failure.clone().unwrap_or_default();
    assert!(
        why.contains("hangar-missing:none"),
        "the failure names the image: {why}"
    );
    assert_eq!(serve.count(&r).await, 1, "the live session was not touched");
    wait_pool(&serve, "web", "2 warm of generation 1", |p| {
        p.status.warm_ready == 2
    })
    .await;

    // Deleting the pool stops its warm containers; the claimed one lives on.
    let deleted = serve
        .http
        .delete(serve.api_url("/v1/pools/web"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let deadline = Instant::now() + DEADLINE;
    while !warm_backends(&serve).await.is_empty() {
        assert!(Instant::now() < deadline, "warm containers never stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(serve.count(&r).await, 2);
    remove_containers(&["dk-p1"]);
}
