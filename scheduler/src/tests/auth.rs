//! Scoped API tokens through the real router: every credential gets what its scope allows
//! and nothing else.

use std::sync::Arc;

use bytes::Bytes;
use hangar_core::token::TokenKey;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::hello;
use crate::api::forward_client;
use crate::api_tokens::{CreateTokenRequest, Scope};
use crate::{ManualClock, Scheduler, SchedulerConfig};

const SECRET: &str = "cluster-secret";

struct Api {
    addr: std::net::SocketAddr,
}

impl Api {
    /// `method path` with `token` (if any) and a JSON `body` (if any): status and JSON body.
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let resp = forward_client()
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_credential_gets_what_its_scope_allows_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let store = hangar_store::embedded::EmbeddedStore::open_default(dir.path().join("s.redb"))
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = SchedulerConfig::new("hangar.test", format!("http://{addr}"));
    cfg.defaults.command = Some(vec!["true".into()]);
    cfg.drone_secret = Some(SECRET.into());
    cfg.api_tokens = true;
    let sched = Scheduler::new(
        cfg,
        store,
        TokenKey::generate(),
        Arc::new(ManualClock::new(1_000_000)),
    );
    let cancel = CancellationToken::new();
    sched.start(cancel.clone()).await.unwrap();
    let _drone = sched
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), false)
        .await
        .unwrap();
    let server = {
        let (s, c) = (sched.clone(), cancel.clone());
        tokio::spawn(async move { s.serve_api(listener, c).await })
    };
    let api = Api { addr };
    let tokens = &sched.handles().tokens;
    let token = |scope: Scope, namespace: Option<&str>| {
        let req = CreateTokenRequest {
            scope: Some(scope),
            namespace: namespace.map(Into::into),
            ..Default::default()
        };
        async move { tokens.create(req).await.unwrap().token }
    };
    let admin = token(Scope::Admin, None).await;
    let read = token(Scope::Read, None).await;
    let app = token(Scope::Connect, None).await;
    let team = token(Scope::Connect, Some("team-a")).await;
    let drone = token(Scope::Drone, None).await;
    let proxy = token(Scope::Proxy, None).await;

    // Liveness is public; everything else needs a credential, and says how to get one.
    assert_eq!(api.call("GET", "/healthz", None, None).await.0, 200);
    let (status, body) = api.call("GET", "/v1/backends", None, None).await;
    assert_eq!(status, 401);
    assert!(message(&body).contains("HANGAR_TOKEN"), "{body}");
    let (status, _) = api
        .call("GET", "/v1/backends", Some("hgr_forged_secret"), None)
        .await;
    assert_eq!(status, 401);

    // read: lists, not connects.
    assert_eq!(
        api.call("GET", "/v1/backends", Some(&read), None).await.0,
        200
    );
    let (status, body) = api
        .call("POST", "/v1/connect", Some(&read), Some(json!({})))
        .await;
    assert_eq!(status, 403);
    assert!(message(&body).contains("connect scope"), "{body}");

    // connect: its own backends, not raw commands, not other namespaces, not drains.
    let (status, mine) = api
        .call(
            "POST",
            "/v1/connect",
            Some(&app),
            Some(json!({"key": {"name": "doc"}})),
        )
        .await;
    assert_eq!(status, 201, "{mine}");
    let mine = mine["backend_id"].as_str().unwrap().to_string();
    let path = format!("/v1/backends/{mine}");
    assert_eq!(api.call("GET", &path, Some(&app), None).await.0, 200);
    assert_eq!(api.call("GET", &path, Some(&read), None).await.0, 200);
    let (status, body) = api.call("GET", "/v1/backends", Some(&app), None).await;
    assert_eq!(status, 403, "a connect token lists nothing: {body}");
    let (status, body) = api
        .call(
            "POST",
            "/v1/connect",
            Some(&app),
            Some(json!({"spawn": {"command": ["/bin/sh", "-c", "id"]}})),
        )
        .await;
    assert_eq!(status, 403);
    assert!(message(&body).contains("admin"), "{body}");
    let (status, _) = api
        .call("POST", "/v1/drones/d1/drain", Some(&app), Some(json!({})))
        .await;
    assert_eq!(status, 403);
    let (status, body) = api
        .call(
            "POST",
            "/v1/connect",
            Some(&team),
            Some(json!({"key": {"name": "doc"}})),
        )
        .await;
    assert_eq!(status, 403, "another namespace: {body}");
    assert!(message(&body).contains("team-a"), "{body}");
    let (status, theirs) = api
        .call(
            "POST",
            "/v1/connect",
            Some(&team),
            Some(json!({"key": {"name": "doc", "namespace": "team-a"}})),
        )
        .await;
    assert_eq!(status, 201, "{theirs}");
    let theirs = theirs["backend_id"].as_str().unwrap().to_string();
    // Neither connect token reaches the other's backend, to look at or to stop.
    let (status, body) = api
        .call("GET", &format!("/v1/backends/{theirs}"), Some(&app), None)
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = api
        .call(
            "POST",
            &format!("{path}/terminate"),
            Some(&team),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = api
        .call(
            "POST",
            &format!("{path}/terminate"),
            Some(&app),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 202, "its own");

    // Drone and proxy credentials: their endpoints only.
    for t in [&drone, &proxy] {
        let (status, body) = api.call("GET", "/v1/backends", Some(t), None).await;
        assert_eq!(status, 403, "{body}");
    }
    let (status, _) = api
        .call("GET", "/v1/drones/connect", Some(&proxy), None)
        .await;
    assert_eq!(status, 403, "a proxy credential cannot join as a drone");
    let (status, _) = api.call("GET", "/v1/routes/feed", Some(&drone), None).await;
    assert_eq!(status, 403, "a drone credential cannot follow routes");
    let (status, _) = api
        .call(
            "POST",
            "/v1/activity",
            Some(&proxy),
            Some(json!({"proxy": "p1", "reports": []})),
        )
        .await;
    assert_eq!(status, 204);
    let (status, _) = api
        .call(
            "POST",
            "/v1/activity",
            Some(SECRET),
            Some(json!({"proxy": "p1", "reports": []})),
        )
        .await;
    assert_eq!(
        status, 204,
        "the cluster secret still serves instances and proxies"
    );
    let (status, _) = api.call("GET", "/v1/backends", Some(SECRET), None).await;
    assert_eq!(status, 403, "but not the API");

    // admin: tokens. A revoked token stops working at once.
    let (status, created) = api
        .call(
            "POST",
            "/v1/tokens",
            Some(&admin),
            Some(json!({"scope": "read"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let fresh = created["token"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(
        api.call("GET", "/v1/backends", Some(&fresh), None).await.0,
        200
    );
    let (status, listed) = api.call("GET", "/v1/tokens", Some(&admin), None).await;
    assert_eq!(status, 200);
    assert!(listed.to_string().contains(&id) && !listed.to_string().contains(&fresh));
    assert_eq!(
        api.call("GET", "/v1/tokens", Some(&read), None).await.0,
        403
    );
    let (status, _) = api
        .call("DELETE", &format!("/v1/tokens/{id}"), Some(&admin), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        api.call("GET", "/v1/backends", Some(&fresh), None).await.0,
        401
    );

    cancel.cancel();
    sched.wait().await;
    let _ = server.await;
}
