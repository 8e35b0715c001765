//! `hangar proxy`: a remote data plane following the scheduler's route feed. It keeps serving
//! through a scheduler restart, picks up new routes, and applies token revocations within 1 s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hangar_core::api::ConnectResponse;
use serde_json::json;

use crate::support::cluster::{Drone, RemoteProxy, SECRET};
use crate::support::{DEADLINE, Dev};

fn serve(dir: &std::path::Path, extra: &[&str]) -> Dev {
    let mut args = vec!["--drone-secret", SECRET, "--lease-ttl", "5", "--dns", "off"];
    args.extend_from_slice(extra);
    Dev::start_serve(&dir.join("serve"), &args)
}

fn via(
    http: &reqwest::Client,
    proxy: std::net::SocketAddr,
    r: &ConnectResponse,
    path: &str,
) -> reqwest::RequestBuilder {
    http.get(format!("http://{proxy}{path}"))
        .header("host", format!("{}.hangar.localhost", r.backend_id))
        .bearer_auth(&r.token)
}

/// Polls the remote proxy until the backend answers 200.
async fn wait_served(http: &reqwest::Client, proxy: std::net::SocketAddr, r: &ConnectResponse) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(resp) = via(http, proxy, r, "/").send().await
            && resp.status() == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the remote proxy never served {}",
            r.backend_id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_proxy_serves_through_a_scheduler_restart_and_picks_up_new_routes() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = serve(dir.path(), &[]);
    let _d1 = Drone::start(&first, "d1", "process", dir.path(), &[]).await;
    let edge = RemoteProxy::start(&first);
    let a = first.connect_key("through-restart").await;
    first.wait_ready(a.backend_id.as_str()).await;
    let http = first.http.clone();
    wait_served(&http, edge.addr, &a).await;

    // Keep requests flowing through the remote proxy while the scheduler restarts.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed, http, a) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            http.clone(),
            a.clone(),
        );
        let addr = edge.addr;
        tokio::spawn(async move {
            let mut last = 0u64;
            // Bounded: at most 20,000 requests.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match via(&http, addr, &a, "/count").send().await {
                    Ok(r) if r.status() == 200 => {
                        let n: u64 = r.text().await.unwrap().parse().unwrap();
                        assert!(n > last, "the counter went backwards: {n} after {last}");
                        last = n;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let api = first.api.to_string();
    let before = ok.load(Ordering::Relaxed);
    first.terminate();
    drop(first);
    let second = serve(dir.path(), &["--api", &api]);
    second.wait_drone("d1", "ready").await;
    // The feed reconnects; a new backend becomes reachable through the remote proxy.
    let b = second.connect_key("after-restart").await;
    second.wait_ready(b.backend_id.as_str()).await;
    wait_served(&http, edge.addr, &b).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed, 0,
        "{failed} requests failed during the restart ({ok} succeeded)"
    );
    assert!(
        ok > before + 10,
        "requests kept flowing: {ok} in total, {before} before the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_a_remote_proxy_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve(dir.path(), &[]);
    let _d1 = Drone::start(&serve, "d1", "process", dir.path(), &[]).await;
    let edge = RemoteProxy::start(&serve);
    let alice = serve
        .connect(json!({"key": {"name": "shared"}, "user": "alice"}))
        .await;
    let bob = serve
        .connect(json!({"key": {"name": "shared"}, "user": "bob"}))
        .await;
    let bob2 = serve
        .connect(json!({"key": {"name": "shared"}, "user": "bob"}))
        .await;
    serve.wait_ready(alice.backend_id.as_str()).await;
    let http = serve.http.clone();
    wait_served(&http, edge.addr, &alice).await;

    let revoke = |body: serde_json::Value| {
        let http = http.clone();
        let url = serve.api_url("/v1/tokens/revoke");
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 201);
        }
    };
    let until_revoked = |r: ConnectResponse| {
        let http = http.clone();
        async move {
            let started = Instant::now();
            loop {
                let resp = via(&http, edge.addr, &r, "/").send().await.unwrap();
                if resp.status() == 401 {
                    assert_eq!(resp.headers()["x-hangar-error"], "token_revoked");
                    return started.elapsed();
                }
                assert_eq!(resp.status(), 200);
                assert!(started.elapsed() < Duration::from_secs(5), "never revoked");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    // One token.
    revoke(json!({"token": alice.token})).await;
    let took = until_revoked(alice.clone()).await;
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
    assert_eq!(
        via(&http, edge.addr, &bob, "/")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Every token of a user for the backend.
    revoke(json!({"backend": bob.backend_id.as_str(), "user": "bob"})).await;
    let took = until_revoked(bob.clone()).await;
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
    assert_eq!(
        via(&http, edge.addr, &bob2, "/")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // The in-process proxy of serve applies revocations too.
    let r = serve
        .get_by_host(alice.backend_id.as_str(), &alice.token, "/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Bad input names the field.
    let r = http
        .post(serve.api_url("/v1/tokens/revoke"))
        .json(&json!({"token": "v1.forged.abc"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("token"),
        "{v}"
    );
}
