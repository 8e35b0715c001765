//! The API's credentials end to end: `serve` writes the first admin token (0600) and needs a
//! token on every call; `hangar token` creates, lists and revokes scoped tokens.

use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use crate::support::cluster::{Drone, RemoteProxy, SECRET};
use crate::support::{DEADLINE, Dev, cli, test_pki};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_needs_tokens_and_the_cli_manages_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("serve");
    let mut serve = Dev::start_serve(&data, &["--drone-secret", SECRET, "--dns", "off"]);
    let file = data.join("admin.token");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the admin token is readable by its user only");
    let admin = serve.token.clone().expect("an admin token");
    let api = format!("http://{}", serve.api);
    let run = |args: &[&str], token: Option<&str>| {
        let mut all = args.to_vec();
        all.extend(["--api", &api]);
        if let Some(t) = token {
            all.extend(["--api-token", t]);
        }
        cli(&all)
    };

    // No token: refused, and told how to get one.
    let (code, _, err) = run(&["ls"], None);
    assert_ne!(code, 0);
    assert!(err.contains("401") && err.contains("HANGAR_TOKEN"), "{err}");

    // A read token: lists, but cannot connect.
    let (code, read, err) = run(
        &[
            "token",
            "create",
            "--scope",
            "read",
            "--ttl",
            "90d",
            "--description",
            "ci",
        ],
        Some(&admin),
    );
    assert_eq!(code, 0, "{err}");
    let read = read.trim().to_string();
    assert!(read.starts_with("hgr_"), "{read}");
    assert_eq!(run(&["ls"], Some(&read)).0, 0);
    let (code, _, err) = run(&["connect", "doc"], Some(&read));
    assert_ne!(code, 0);
    assert!(
        err.contains("403") && err.contains("connect scope"),
        "{err}"
    );
    let (code, _, err) = run(&["token", "create", "--scope", "admin"], Some(&read));
    assert_ne!(code, 0, "a read token cannot mint tokens: {err}");
    let (code, _, err) = run(&["token", "create", "--scope", "root"], Some(&admin));
    assert_ne!(code, 0);
    assert!(err.contains("unknown scope"), "{err}");

    // Listed without secrets; revoked, it stops working at once.
    let (code, listed, _) = run(&["token", "ls", "--json"], Some(&admin));
    assert_eq!(code, 0);
    let tokens: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["description"] == "ci")
        .expect("the read token is listed")["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!listed.contains(&read) && !listed.contains(&admin));
    assert_eq!(run(&["token", "revoke", &id], Some(&admin)).0, 0);
    let (code, _, err) = run(&["ls"], Some(&read));
    assert_ne!(code, 0);
    assert!(err.contains("401"), "{err}");

    // A restart keeps the admin token: nothing new is written, the old one still works.
    let api_addr = serve.api.to_string();
    serve.terminate();
    drop(serve);
    let again = Dev::start_serve(
        &data,
        &["--drone-secret", SECRET, "--dns", "off", "--api", &api_addr],
    );
    assert_eq!(again.token.as_deref(), Some(admin.as_str()));
    assert_eq!(run(&["ls"], Some(&admin)).0, 0);
}

/// A raw command needs an admin token and a drone that allows it: a process drone without
/// `--allow-command` runs only its default backend, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drone_runs_only_what_its_operator_allows() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Dev::start_serve(
        &dir.path().join("serve"),
        &["--drone-secret", SECRET, "--dns", "off"],
    );
    let _d1 = Drone::start(&serve, "d1", "process", dir.path(), &[]).await;
    let raw = serve
        .connect(json!({"key": {"name": "raw"}, "spawn": {"command": ["/bin/sh", "-c", "id"]}}))
        .await;
    let v = serve
        .wait_for(raw.backend_id.as_str(), "ended", |v| !v.state.is_live())
        .await;
    let why = v.message.unwrap_or_default();
    assert!(
        why.contains("does not run") && why.contains("--allow-command"),
        "{why}"
    );
    // The default backend runs.
    let ok = serve.connect_key("default").await;
    serve.wait_ready(ok.backend_id.as_str()).await;
    assert_eq!(serve.count(&ok).await, 1);

    // A namespace quota (set with the CLI): one live backend in `default`, so a second key
    // gets 429 with Retry-After while the first one is still reused.
    let api = format!("http://{}", serve.api);
    let token = serve.token.clone().unwrap();
    let (code, out, err) = cli(&[
        "quota",
        "set",
        "default",
        "--max-live",
        "1",
        "--api",
        &api,
        "--api-token",
        &token,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = cli(&["quota", "ls", "--api", &api, "--api-token", &token]);
    assert_eq!(code, 0);
    assert!(out.contains("default") && out.contains('1'), "{out}");
    let r = serve
        .http
        .post(serve.api_url("/v1/connect"))
        .json(&json!({"key": {"name": "second"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let again = serve.connect_key("default").await;
    assert_eq!(again.backend_id, ok.backend_id);
}

/// The API over HTTPS with a private CA: a drone (wss), a remote proxy (its route feed) and the
/// CLI reach it when given `--ca`, and refuse it without; the metrics listener wants its
/// bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_drones_proxies_and_the_cli_work_over_tls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_pki(dir.path());
    let (ca, cert, key) = (
        ca.to_str().unwrap().to_string(),
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
    );
    let serve = Dev::start_serve(
        &dir.path().join("serve"),
        &[
            "--drone-secret",
            SECRET,
            "--dns",
            "off",
            "--api-tls-cert",
            &cert,
            "--api-tls-key",
            &key,
            "--metrics-token",
            "scrape-secret",
        ],
    );
    let api = format!("https://{}", serve.api);
    let token = serve.token.clone().unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();
    let get = |path: &str| http.get(format!("{api}{path}")).send();
    assert_eq!(get("/v1/backends").await.unwrap().status(), 200);
    // Plain HTTP on the TLS port gets nowhere.
    assert!(
        reqwest::get(format!("http://{}/v1/backends", serve.api))
            .await
            .map_or(true, |r| !r.status().is_success())
    );

    // The CLI: with the CA it works; without, it says the certificate is not trusted.
    let (code, _, err) = cli(&["ls", "--api", &api, "--api-token", &token, "--ca", &ca]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&["ls", "--api", &api, "--api-token", &token]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--ca"),
        "the error says the certificate is not trusted: {err}"
    );

    // A drone over wss, with the CA.
    let _d1 = Drone::spawn_for(None, &api, "d1", "process", dir.path(), &["--ca", &ca]);
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let drones: serde_json::Value = get("/v1/drones").await.unwrap().json().await.unwrap();
        if drones["drones"][0]["state"] == "ready" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the drone never joined: {drones}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r: hangar_core::api::ConnectResponse = http
        .post(format!("{api}/v1/connect"))
        .json(&json!({"key": {"name": "tls"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // A remote proxy following the feed over https routes the session.
    let key_hex = std::fs::read_to_string(serve.data_dir.join("token.key")).unwrap();
    let edge = RemoteProxy::start_with(&api, key_hex.trim(), &["--ca", &ca]);
    let via_edge = || {
        reqwest::Client::new()
            .get(format!("http://{}/count", edge.addr))
            .header("host", format!("{}.hangar.localhost", r.backend_id))
            .bearer_auth(&r.token)
            .send()
    };
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(resp) = via_edge().await
            && resp.status() == 200
        {
            assert_eq!(resp.text().await.unwrap().trim(), "1");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the remote proxy never routed it"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Metrics want the bearer token.
    let metrics = format!("http://{}/metrics", serve.metrics.unwrap());
    assert_eq!(reqwest::get(&metrics).await.unwrap().status(), 401);
    let scraped = reqwest::Client::new()
        .get(&metrics)
        .bearer_auth("scrape-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status(), 200);
}
