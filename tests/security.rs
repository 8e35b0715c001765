//! The API's credentials end to end: `serve` writes the first admin token (0600) and needs a
//! token on every call; `hangar token` creates, lists and revokes scoped tokens.

use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use crate::support::cluster::{Drone, SECRET};
use crate::support::{Dev, cli};

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
