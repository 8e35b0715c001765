//! `hangar dev` end to end: connect by key, routing by host/cookie/header, tokens, waiting for
//! a starting backend, idle/lifetime/terminate/exit, restart recovery, WebSockets, API errors
//! and the CLI.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hangar_core::token::TokenKey;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{DEADLINE, Dev, cli, count_of, dev_cli, text, unix_now};

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_routes_by_host_cookie_and_header_to_one_backend() {
    let dir = scratch();
    let dev = Dev::start(dir.path(), &[]);
    let a = dev.connect_key("doc-a").await;
    assert!(a.spawned);
    assert_eq!(
        a.url,
        format!(
            "http://{}.hangar.localhost:{}/",
            a.backend_id,
            dev.proxy.port()
        )
    );
    dev.wait_ready(a.backend_id.as_str()).await;
    let id = a.backend_id.as_str();

    // Host, then header, then cookie: the same process answers, so the counter keeps growing.
    let by_host = dev.count(&a).await;
    let by_header = count_of(
        dev.http
            .get(dev.proxy_url("/count"))
            .header("x-hangar-backend", id)
            .bearer_auth(&a.token),
    )
    .await;
    let by_cookie = count_of(dev.http.get(dev.proxy_url("/count")).header(
        "cookie",
        format!("hangar-backend={id}; hangar-token={}", a.token),
    ))
    .await;
    assert_eq!((by_host, by_header, by_cookie), (1, 2, 3));

    // The same key gets the same backend; another key another one.
    let again = dev.connect_key("doc-a").await;
    assert!(!again.spawned);
    assert_eq!(again.backend_id, a.backend_id);
    assert_eq!(dev.count(&again).await, 4);
    let b = dev.connect_key("doc-b").await;
    assert!(b.spawned);
    assert_ne!(b.backend_id, a.backend_id);
    dev.wait_ready(b.backend_id.as_str()).await;
    assert_eq!(dev.count(&b).await, 1);

    // `GET /` names the backend and its key.
    let text = text(dev.get_by_host(id, &a.token, "/")).await;
    assert!(
        text.contains(id) && text.contains("default/doc-a"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_connects_for_one_key_make_one_backend() {
    let dir = scratch();
    let dev = Dev::start(dir.path(), &[]);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let http = dev.http.clone();
        let url = dev.api_url("/v1/connect");
        set.spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"key": {"name": "contended"}}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
            let v: serde_json::Value = r.json().await.unwrap();
            (
                v["backend_id"].as_str().unwrap().to_string(),
                v["spawned"].as_bool().unwrap(),
            )
        });
    }
    let mut ids = HashSet::new();
    let mut spawned = 0;
    while let Some(r) = set.join_next().await {
        let (id, s) = r.unwrap();
        ids.insert(id);
        spawned += s as usize;
    }
    assert_eq!(ids.len(), 1, "one backend for the key: {ids:?}");
    assert_eq!(spawned, 1, "exactly one connect spawned it");
    let list: serde_json::Value = dev.get_json("/v1/backends").await;
    assert_eq!(list["backends"].as_array().unwrap().len(), 1, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_and_errors_name_the_cause() {
    let dir = scratch();
    let dev = Dev::start(dir.path(), &[]);
    let a = dev
        .connect(json!({"key": {"name": "t-a"}, "user": "alice"}))
        .await;
    let b = dev.connect_key("t-b").await;
    dev.wait_ready(a.backend_id.as_str()).await;
    let id = a.backend_id.as_str();
    let key = dev.token_key();

    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing", None, "token_missing"),
        ("malformed", Some("v1.garbage".into()), "token_malformed"),
        (
            "forged",
            Some(TokenKey::generate().sign(id, "alice", unix_now() + 600)),
            "token_forged",
        ),
        (
            "expired",
            Some(key.sign(id, "alice", unix_now() - 1)),
            "token_expired",
        ),
        (
            "other backend's",
            Some(b.token.clone()),
            "token_wrong_backend",
        ),
    ];
    for (what, token, code) in cases {
        let mut req = dev
            .http
            .get(dev.proxy_url("/count"))
            .header("host", format!("{id}.hangar.localhost"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{what} token");
        assert_eq!(r.headers()["x-hangar-error"], code, "{what} token");
        let body = r.text().await.unwrap();
        assert!(
            body.contains("token"),
            "{what}: body names the cause: {body}"
        );
    }

    // A valid token in the query string works, is stripped, and becomes a host-only cookie.
    let r = dev
        .http
        .get(dev.proxy_url(&format!("/echo-query?a=1&hangar_token={}&b=2", a.token)))
        .header("host", format!("{id}.hangar.localhost"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with(&format!("hangar-token={}", a.token)) && cookie.contains("HttpOnly")
    );
    assert_eq!(r.text().await.unwrap(), "a=1&b=2");

    // Inbound x-hangar-* headers are replaced by the proxy's own.
    let headers = text(
        dev.get_by_host(id, &a.token, "/headers")
            .header("x-hangar-user", "mallory")
            .header("x-hangar-backend-id", "bforged"),
    )
    .await;
    assert!(headers.contains("x-hangar-user: alice"), "{headers}");
    assert!(
        headers.contains(&format!("x-hangar-backend-id: {id}")),
        "{headers}"
    );
    assert!(
        !headers.contains("mallory") && !headers.contains("bforged"),
        "{headers}"
    );
    assert!(
        !headers.to_lowercase().contains("authorization"),
        "token not forwarded: {headers}"
    );

    // The token is verified now: the proxy finds it by its bytes. Around it, whitespace that is
    // not ASCII's is trimmed as the value read as text always was; for another backend it is
    // still that backend's refusal; and it never reaches the backend either way.
    dev.wait_ready(b.backend_id.as_str()).await;
    let nbsp = [b"Bearer ", a.token.as_bytes(), "\u{a0}".as_bytes()].concat();
    for (what, host, value, status) in [
        (
            "cached",
            id,
            format!("Bearer {}", a.token).into_bytes(),
            200,
        ),
        ("with a no-break space", id, nbsp, 200),
        (
            "for another backend",
            b.backend_id.as_str(),
            format!("Bearer {}", a.token).into_bytes(),
            401,
        ),
    ] {
        let r = dev
            .http
            .get(dev.proxy_url("/headers"))
            .header("host", format!("{host}.hangar.localhost"))
            .header(
                "authorization",
                reqwest::header::HeaderValue::from_bytes(&value).unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{what}");
        if status == 401 {
            assert_eq!(r.headers()["x-hangar-error"], "token_wrong_backend");
        } else {
            let seen = r.text().await.unwrap();
            assert!(!seen.contains("v1."), "{what}: token forwarded: {seen}");
            assert!(seen.contains("x-hangar-user: alice"), "{what}: {seen}");
        }
    }

    // Unknown backend → 404; no backend named → 404.
    let r = dev
        .get_by_host("bnosuchbackend", &a.token, "/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-hangar-error"], "unknown_backend");
    let r = dev.http.get(dev.proxy_url("/")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-hangar-error"], "no_backend_named");

    // A public backend needs no token.
    let p = dev
        .connect(json!({"key": {"name": "t-pub"}, "public": true}))
        .await;
    let r = dev
        .http
        .get(dev.proxy_url("/count"))
        .header("x-hangar-backend", p.backend_id.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_while_the_backend_starts_waits_and_succeeds() {
    let dir = scratch();
    let dev = Dev::start(dir.path(), &[]);
    let a = dev
        .connect(json!({
            "key": {"name": "slow"},
            "spawn": {"env": {"DEMO_STARTUP_DELAY_MS": "1500"}}
        }))
        .await;
    let started = Instant::now();
    let before = dev.backend(a.backend_id.as_str()).await;
    assert_ne!(
        before.state.name(),
        "ready",
        "the backend must still be starting"
    );
    let n = dev.count(&a).await;
    assert_eq!(n, 1);
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "the request waited for startup"
    );
    let after = dev.backend(a.backend_id.as_str()).await;
    assert_eq!(after.state.name(), "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_lifetime_terminate_and_exit_end_backends_and_free_their_keys() {
    let dir = scratch();
    let dev = Dev::start(dir.path(), &[]);
    let idle = dev
        .connect(json!({"key": {"name": "idle"}, "spawn": {"idle_timeout_s": 1}}))
        .await;
    let life = dev
        .connect(json!({"key": {"name": "life"}, "spawn": {"lifetime_s": 2}}))
        .await;
    let term = dev.connect_key("term").await;
    let exit = dev.connect_key("exit").await;
    for r in [&idle, &life, &term, &exit] {
        dev.wait_ready(r.backend_id.as_str()).await;
    }

    // Terminate by API.
    let r = dev
        .http
        .post(dev.api_url(&format!("/v1/backends/{}/terminate", term.backend_id)))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // The process exits on its own with code 3.
    let r = dev
        .http
        .post(dev.proxy_url("/exit/3"))
        .header("host", format!("{}.hangar.localhost", exit.backend_id))
        .bearer_auth(&exit.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let expect = [
        (&idle, "idle", json!({"kind": "idle"})),
        (&life, "life", json!({"kind": "lifetime"})),
        (&term, "term", json!({"kind": "requested"})),
        (&exit, "exit", json!({"kind": "failed", "exit_code": 3})),
    ];
    for (resp, key, reason) in expect {
        let id = resp.backend_id.as_str();
        let v = dev
            .wait_for(id, "terminated", |v| v.state.name() == "terminated")
            .await;
        let got = serde_json::to_value(&v).unwrap();
        assert_eq!(got["reason"], reason, "{key}: {got}");
        assert!(v.terminated_at.is_some());
        // The proxy answers 410 for it...
        let r = dev
            .get_by_host(id, &resp.token, "/count")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 410, "{key}");
        assert_eq!(r.headers()["x-hangar-error"], "backend_terminated");
        // ...and the key gets a new backend with a higher epoch.
        let next = dev.connect_key(key).await;
        assert!(next.spawned, "{key}");
        assert_ne!(next.backend_id, resp.backend_id);
        let nv = dev.wait_ready(next.backend_id.as_str()).await;
        assert_eq!(nv.epoch, v.epoch + 1, "{key}");
        assert_eq!(dev.count(&next).await, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_keeps_a_backend_from_idling_and_echoes() {
    let dir = scratch();
    let dev = Dev::start(dir.path(), &[]);
    let a = dev
        .connect(json!({"key": {"name": "ws"}, "spawn": {"idle_timeout_s": 1}}))
        .await;
    dev.wait_ready(a.backend_id.as_str()).await;
    let mut req = format!("ws://{}/ws", dev.proxy)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "host",
        format!("{}.hangar.localhost", a.backend_id)
            .parse()
            .unwrap(),
    );
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", a.token).parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    for msg in ["hello", "through the proxy"] {
        ws.send(Message::text(msg)).await.unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo, Message::text(msg));
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![1u8, 2, 3])
    );

    // With the socket open for three idle timeouts, the backend stays ready.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            dev.backend(a.backend_id.as_str()).await.state.name(),
            "ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("still here")
    );
    ws.close(None).await.unwrap();
    drop(ws);
    // Once it closes, the idle timeout applies.
    let v = dev
        .wait_for(a.backend_id.as_str(), "terminated", |v| {
            v.state.name() == "terminated"
        })
        .await;
    assert_eq!(
        serde_json::to_value(&v).unwrap()["reason"],
        json!({"kind": "idle"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_the_same_data_dir_keeps_records_and_closes_dead_backends_as_lost() {
    let dir = scratch();
    let mut dev = Dev::start(dir.path(), &[]);
    let a = dev.connect_key("persist").await;
    let v = dev.wait_ready(a.backend_id.as_str()).await;
    let done = dev.connect_key("done").await;
    dev.wait_ready(done.backend_id.as_str()).await;
    dev.http
        .post(dev.api_url(&format!("/v1/backends/{}/terminate", done.backend_id)))
        .send()
        .await
        .unwrap();
    dev.wait_for(done.backend_id.as_str(), "terminated", |v| {
        v.state.name() == "terminated"
    })
    .await;
    let backend_port = v.address.unwrap().port();

    // kill -9: the backend process dies with it (it must not linger).
    dev.kill9();
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", backend_port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "backend process outlived hangar dev"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let dev = Dev::start(dir.path(), &[]);
    let lost = dev.backend(a.backend_id.as_str()).await;
    assert_eq!(
        lost.state.name(),
        "terminated",
        "never left ready: {lost:?}"
    );
    assert_eq!(
        serde_json::to_value(&lost).unwrap()["reason"],
        json!({"kind": "lost"})
    );
    let kept = dev.backend(done.backend_id.as_str()).await;
    assert_eq!(
        serde_json::to_value(&kept).unwrap()["reason"],
        json!({"kind": "requested"})
    );
    // Tokens survive (the key is in the data directory); the proxy answers 410 for the old one.
    let r = dev
        .get_by_host(a.backend_id.as_str(), &a.token, "/")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410);
    // A new connect works and gets a fresh backend with the next epoch.
    let b = dev.connect_key("persist").await;
    assert!(b.spawned);
    let bv = dev.wait_ready(b.backend_id.as_str()).await;
    assert_eq!(bv.epoch, lost.epoch + 1);
    assert_eq!(dev.count(&b).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_stops_backends_and_exits_zero() {
    let dir = scratch();
    let mut dev = Dev::start(dir.path(), &[]);
    let a = dev.connect_key("g").await;
    let v = dev.wait_ready(a.backend_id.as_str()).await;
    let list: serde_json::Value = dev.get_json("/v1/backends?status=ready").await;
    assert_eq!(list["backends"].as_array().unwrap().len(), 1);
    let status = dev.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        std::net::TcpStream::connect(v.address.unwrap()).is_err(),
        "backend stopped with hangar dev"
    );
}

/// On one core `hangar dev` runs on a current-thread runtime (see `main`): the whole path
/// still works on that one thread (a backend started and waited for, requests proxied, one
/// refused) and it shuts down cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_core_the_whole_path_runs_and_shuts_down_cleanly() {
    let dir = scratch();
    let mut dev = Dev::start_on_one_core(dir.path(), &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", dev.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["Cpus_allowed_list:", "0"])),
        "hangar dev is not pinned to one core:\n{status}"
    );
    let a = dev.connect_key("one-core").await;
    let v = dev.wait_ready(a.backend_id.as_str()).await;
    for n in 1..=3 {
        assert_eq!(dev.count(&a).await, n);
    }
    let r = dev
        .http
        .get(dev.proxy_url("/count"))
        .header("host", format!("{}.hangar.localhost", a.backend_id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-hangar-error"], "token_missing");
    let status = dev.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        std::net::TcpStream::connect(v.address.unwrap()).is_err(),
        "backend stopped with hangar dev"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_api_input_is_a_400_naming_the_field() {
    let dir = scratch();
    let dev = Dev::start(dir.path(), &[]);
    let cases = [
        (r#"{"kee": {"name": "a"}}"#, "kee"),
        (r#"{"key": {"name": ""}}"#, "key.name"),
        (r#"{"key": {"name": "a b"}}"#, "key.name"),
        (
            r#"{"spawn": {"idle_timeout_s": "soon"}}"#,
            "spawn.idle_timeout_s",
        ),
        (
            r#"{"spawn": {"idle_timeout_s": 0}}"#,
            "spawn.idle_timeout_s",
        ),
        (r#"{"spawn": {"command": []}}"#, "spawn.command"),
        (r#"{"spawn": {"env": {"PORT": "1"}}}"#, "PORT"),
        (r#"{"spawn": {"resources": {"cpu": 1}}}"#, "cpu"),
        (r#"{"key": "#, "malformed JSON"),
    ];
    for (body, field) in cases {
        let r = dev
            .http
            .post(dev.api_url("/v1/connect"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "bad_request", "{body}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{body}: {msg:?} should name {field}");
    }
    // Unknown backend and bad filters.
    let r = dev
        .http
        .get(dev.api_url("/v1/backends/bnope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    let r = dev
        .http
        .get(dev.api_url("/v1/backends?status=sleepy"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = dev
        .http
        .post(dev.api_url("/v1/backends/bnope/terminate"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // An image cannot run on the process drone: 503 with the reason, not 500.
    let (status, v) = dev
        .connect_raw(json!({"spawn": {"image": "hangar-demo:dev"}}))
        .await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("docker"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_every_state_change_until_terminated() {
    let dir = scratch();
    let dev = Dev::start(dir.path(), &[]);
    let a = dev
        .connect(
            json!({"key": {"name": "sse"}, "spawn": {"env": {"DEMO_STARTUP_DELAY_MS": "300"}}}),
        )
        .await;
    let resp = dev
        .http
        .get(format!("{}/events", a.status_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut states: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut terminated_sent = false;
    while states.last().is_none_or(|s| s != "terminated") {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("events before the deadline")
            .expect("stream open")
            .unwrap();
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                let v: serde_json::Value = serde_json::from_str(data).unwrap();
                states.push(v["status"].as_str().unwrap().to_string());
            }
        }
        if states.last().is_some_and(|s| s == "ready") && !terminated_sent {
            terminated_sent = true;
            dev.http
                .post(dev.api_url(&format!("/v1/backends/{}/terminate", a.backend_id)))
                .send()
                .await
                .unwrap();
        }
    }
    // Every state appears once, in lifecycle order (the first may be any pre-ready state).
    let order = [
        "scheduled",
        "starting",
        "waiting",
        "ready",
        "terminating",
        "terminated",
    ];
    let pos: Vec<usize> = states
        .iter()
        .map(|s| order.iter().position(|o| o == s).unwrap())
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{states:?}");
    assert!(
        states.ends_with(&["ready".into(), "terminating".into(), "terminated".into()]),
        "{states:?}"
    );
    // The stream ends after terminated.
    assert!(
        tokio::time::timeout(DEADLINE, stream.next())
            .await
            .unwrap()
            .is_none(),
        "stream closed after terminated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_connect_ls_status_terminate() {
    let dir = scratch();
    let dev = Dev::start(dir.path(), &[]);
    let api = format!("http://{}", dev.api);
    let (code, out, err) = cli(&["connect", "cli-doc", "--wait", "--json", "--api", &api]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "ready");
    let id = v["backend_id"].as_str().unwrap().to_string();
    let (code, out, _) = cli(&["connect", "cli-doc", "--api", &api]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&id) && out.contains("existing") && out.contains("token"),
        "{out}"
    );

    let (code, out, _) = cli(&["ls", "--json", "--api", &api]);
    assert_eq!(code, 0);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["backends"][0]["id"], id.as_str());
    let (code, out, _) = cli(&["ls", "--api", &api]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&id) && out.contains("default/cli-doc"),
        "{out}"
    );

    let (code, out, _) = cli(&["status", &id, "--api", &api]);
    assert_eq!(code, 0);
    assert!(out.contains("ready"), "{out}");
    let (code, _, _) = cli(&["terminate", &id, "--api", &api]);
    assert_eq!(code, 0);
    dev.wait_for(&id, "terminated", |v| v.state.name() == "terminated")
        .await;

    // Errors: unknown backend, API down.
    let (code, _, err) = cli(&["status", "bnope", "--api", &api]);
    assert_eq!(code, 1);
    assert!(err.contains("no backend bnope"), "{err}");
    let (code, _, err) = cli(&["ls", "--api", "http://127.0.0.1:9"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the Hangar API"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_64_before_binding() {
    let dir = scratch();
    let data_dir = dir.path().to_str().unwrap();
    let (code, _, err) = dev_cli(data_dir, &["--domain", "not a domain"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--domain"), "{err}");
    let (code, _, err) = dev_cli(data_dir, &["--token-key", "abc"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("token key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_proxy_tuning_exits_64_naming_the_flag() {
    let dir = scratch();
    let data_dir = dir.path().to_str().unwrap();
    let (code, _, err) = dev_cli(data_dir, &["--dns", "off", "--max-connections", "0"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--max-connections"), "{err}");
    // `hangar proxy` shares the flags and the check.
    let key = TokenKey::generate().to_hex();
    let (code, _, err) = cli(&[
        "proxy",
        "--scheduler",
        "http://127.0.0.1:9",
        "--secret",
        "tuning-test-secret",
        "--token-key",
        &key,
        "--proxy",
        "127.0.0.1:0",
        "--metrics",
        "off",
        "--max-header-bytes",
        "512",
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--max-header-bytes"), "{err}");
    assert!(err.contains("1024 to 1048576"), "{err}");
}

/// `hangar cluster` shows the one instance of `dev` leading, its term and a healthy store;
/// `GET /v1/cluster` says the same as JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_view_shows_the_leader_its_term_and_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path(), &[]);
    let api = format!("http://{}", dev.api);
    let v: serde_json::Value = dev.get_json("/v1/cluster").await;
    assert_eq!(v["leader"]["instance"], v["this_instance"], "{v}");
    assert!(v["leader"]["term"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["store"]["healthy"], true, "{v}");
    let (code, out, err) = cli(&["cluster", "--api", &api]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("leader: i-") && out.contains("(term "),
        "{out}"
    );
    assert!(out.contains("store: healthy"), "{out}");
    assert!(
        out.contains("leader") && out.contains("answered this request"),
        "{out}"
    );
}

/// `hangar state export` writes every record at one revision; `import` restores it into an
/// empty data directory, where `dev` finds every record and a connect for an existing key
/// gets an epoch above any the old store handed out. Importing over data needs `--force`;
/// exporting a store another hangar holds says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_export_and_import_move_every_record_and_raise_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let (from, to) = (dir.path().join("from"), dir.path().join("to"));
    let (from_s, to_s) = (from.to_string_lossy(), to.to_string_lossy());
    let mut dev = Dev::start(&from, &[]);
    let doc = dev.connect_key("doc").await;
    dev.wait_ready(doc.backend_id.as_str()).await;
    let other = dev.connect_key("other").await;
    let (code, _, err) = cli(&["state", "export", "--data-dir", &from_s]);
    assert_eq!(code, 64, "the store is in use: {err}");
    assert!(err.contains("stop the hangar using it"), "{err}");
    dev.terminate();
    drop(dev);

    let file = dir.path().join("state.jsonl");
    let file_s = file.to_string_lossy();
    let (code, _, err) = cli(&["state", "export", "--data-dir", &from_s, "--out", &file_s]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    let header: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(header["format"], 1);
    assert!(header["revision"].as_u64().unwrap() > 0);
    assert!(text.contains(doc.backend_id.as_str()) && text.contains("/hangar/keys/default/doc"));

    std::fs::create_dir_all(&to).unwrap();
    let (code, _, err) = cli(&["state", "import", &file_s, "--data-dir", &to_s]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&["state", "import", &file_s, "--data-dir", &to_s]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--force"), "{err}");

    let dev = Dev::start(&to, &[]);
    for id in [&doc.backend_id, &other.backend_id] {
        let v = dev.backend(id.as_str()).await;
        assert_eq!(&v.id, id, "the record is there");
    }
    let again = dev.connect_key("doc").await;
    assert!(again.spawned, "the old backend died with the old dev");
    let v = dev.backend(again.backend_id.as_str()).await;
    assert!(v.epoch > 2, "epoch {} above every exported one", v.epoch);
}

/// A `serve` listening on every address must say how other hosts reach it (the leader's
/// address is where writes are forwarded and drones sent): a clear configuration error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_a_wildcard_address_needs_its_api_url() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_string_lossy().into_owned();
    let secret = "a-long-enough-secret";
    let (code, _, err) = cli(&[
        "serve",
        "--api",
        "0.0.0.0:0",
        "--drone-secret",
        secret,
        "--data-dir",
        &data,
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--api-url"), "{err}");
    let (code, _, err) = cli(&[
        "serve",
        "--api-url",
        "10.0.0.1:7070",
        "--drone-secret",
        secret,
        "--data-dir",
        &data,
    ]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("http://"), "{err}");
}

/// Shell completions cover the commands; an unknown shell is a usage error.
#[test]
fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = cli(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        for word in ["connect", "drones", "token", "maintenance"] {
            assert!(out.contains(word), "{shell} completions lack {word}");
        }
    }
    let (code, _, err) = cli(&["completions", "tcsh"]);
    assert_eq!(code, 2);
    assert!(err.contains("tcsh"), "{err}");
}

/// `--config hangar.toml`: the file's keys set flags (the command line's win), and an unknown
/// key stops the start with exit 64, naming the key and the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_sets_flags_and_unknown_keys_are_refused() {
    let dir = scratch();
    let file = dir.path().join("hangar.toml");
    std::fs::write(&file, "domain = \"cfg.localhost\"\nidle_timeout = 77\n").unwrap();
    let path = file.to_str().unwrap();
    let dev = Dev::start(&dir.path().join("data"), &["--config", path]);
    let r = dev.connect_key("from-config").await;
    assert!(r.url.contains(".cfg.localhost:"), "{}", r.url);
    let v = dev.backend(r.backend_id.as_str()).await;
    assert_eq!(v.idle_timeout_s, Some(77));

    std::fs::write(&file, "domain = \"cfg.localhost\"\ntypo_flag = 1\n").unwrap();
    let data = dir.path().join("other");
    let (code, _, err) = dev_cli(data.to_str().unwrap(), &["--config", path]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("typo_flag") && err.contains(path), "{err}");

    // A bad value is a configuration error too, naming the key and the file.
    std::fs::write(&file, "idle_timeout = \"soon\"\n").unwrap();
    let (code, _, err) = dev_cli(data.to_str().unwrap(), &["--config", path]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("idle_timeout") && err.contains(path), "{err}");
}

/// `hangar events` tails the cluster: a backend's states in order, from scheduled to
/// terminated, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangar_events_tails_backend_state_changes() {
    use std::io::BufRead;
    let dir = scratch();
    let dev = Dev::start(dir.path(), &[]);
    let mut child = std::process::Command::new(crate::support::BIN)
        .args(["events", "--json", "--api", &format!("http://{}", dev.api)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    // The follower is subscribed once a connect made now shows up in it: retry a fresh key
    // until one does (the stream starts at the revision current when it connected).
    let deadline = Instant::now() + DEADLINE;
    let mut states = Vec::new();
    let mut id = None;
    let mut n = 0;
    while id.is_none() {
        n += 1;
        let r = dev.connect_key(&format!("tail-{n}")).await;
        let until = Instant::now() + Duration::from_secs(2);
        while let Ok(v) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            if v["kind"] == "backend" && v["id"] == r.backend_id.as_str() {
                states.push(v["what"].as_str().unwrap().to_string());
                id = Some(r.backend_id.clone());
                break;
            }
        }
        assert!(Instant::now() < deadline, "hangar events showed nothing");
    }
    let id = id.unwrap();
    dev.wait_ready(id.as_str()).await;
    let r = dev
        .http
        .post(dev.api_url(&format!("/v1/backends/{id}/terminate")))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    while states.last().map(String::as_str) != Some("terminated") {
        let v = rx
            .recv_timeout(DEADLINE)
            .expect("an event before the deadline");
        if v["kind"] == "backend" && v["id"] == id.as_str() {
            states.push(v["what"].as_str().unwrap().to_string());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    // In order, each once (a record rewritten without a state change is not an event).
    let order = [
        "scheduled",
        "starting",
        "waiting",
        "ready",
        "terminating",
        "terminated",
    ];
    let mut sorted = states.clone();
    sorted.sort_by_key(|s| order.iter().position(|o| o == s));
    sorted.dedup();
    assert_eq!(states, sorted, "{states:?}");
    assert!(states.contains(&"ready".to_string()), "{states:?}");
}
