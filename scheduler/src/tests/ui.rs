//! What the dashboard relies on, through the real router: backends listed in pages with
//! filters and counts (10,000 backends must not mean one 10,000-row answer), and `/ui` open
//! while the API needs a token.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use hangar_core::token::TokenKey;
use hangar_core::{BackendState, KeyRef, TerminationReason};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::forward_client;
use crate::records::{BackendRecord, PoolMember, ResolvedSpawn, backend_key};
use crate::{ManualClock, Scheduler, SchedulerConfig};

/// `GET path` with `token` (if any): status and body.
async fn get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = forward_client()
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn get_json(addr: std::net::SocketAddr, path: &str) -> Value {
    let (status, body) = get(addr, path, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// A scheduler's API on a loopback port; without `start`, only the router over the store (no
/// loop changes the records a test writes).
async fn api(
    start: bool,
    configure: impl FnOnce(&mut SchedulerConfig),
) -> (
    std::net::SocketAddr,
    Scheduler,
    Arc<hangar_store::embedded::EmbeddedStore>,
    CancellationToken,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let store = hangar_store::embedded::EmbeddedStore::open_default(dir.path().join("s.redb"))
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = SchedulerConfig::new("hangar.test", format!("http://{addr}"));
    configure(&mut cfg);
    let sched = Scheduler::new(
        cfg,
        store.clone(),
        TokenKey::generate(),
        Arc::new(ManualClock::new(1_000_000)),
    );
    let cancel = CancellationToken::new();
    if start {
        sched.start(cancel.clone()).await.unwrap();
    }
    {
        let (s, c) = (sched.clone(), cancel.clone());
        tokio::spawn(async move { s.serve_api(listener, c).await });
    }
    (addr, sched, store, cancel, dir)
}

fn spawn() -> ResolvedSpawn {
    ResolvedSpawn {
        command: Some(vec!["true".into()]),
        image: None,
        env: BTreeMap::new(),
        idle_timeout_s: None,
        lifetime_s: None,
        resources: Default::default(),
        pool: "default".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_come_in_pages_with_filters_and_counts() {
    let (addr, _sched, store, cancel, _dir) = api(false, |_| {}).await;
    use hangar_store::Store;
    // 250 backends: on two drones, a third of them in pool "p", every fifth ended, some
    // sharing a creation time (the cursor orders by time, then id).
    let mut all = Vec::new();
    for i in 0..250u64 {
        let drone = if i % 2 == 0 { "d1" } else { "d2" };
        let mut rec = BackendRecord::scheduled(spawn(), drone, "r1", 1_000 + i / 3);
        rec.key = Some(KeyRef::new("default", format!("doc-{i}")));
        if i % 3 == 0 {
            rec.pool = Some(PoolMember {
                name: "p".into(),
                generation: 1,
                claimed_at: Some(1),
                claim_secret: None,
            });
        }
        if i % 5 == 0 {
            rec.state = BackendState::Terminated {
                reason: TerminationReason::Requested,
            };
        } else if i % 5 == 1 {
            rec.state = BackendState::Ready;
        }
        store
            .put(
                &backend_key(rec.id.as_str()),
                serde_json::to_vec(&rec).unwrap(),
                None,
            )
            .await
            .unwrap();
        all.push(rec);
    }

    // Without paging: the old answer, every backend at once.
    let v = get_json(addr, "/v1/backends").await;
    assert_eq!(v["backends"].as_array().unwrap().len(), 250);
    assert!(v.get("total").is_none() && v.get("next").is_none());

    // Newest first, 100 at a time, following `next` to the end: each backend once, in order.
    let mut seen = Vec::new();
    let mut path = "/v1/backends?limit=100&order=desc".to_string();
    let mut pages = 0;
    loop {
        let v = get_json(addr, &path).await;
        pages += 1;
        assert_eq!(v["total"], 250);
        assert_eq!(v["counts"]["terminated"], 50);
        assert_eq!(v["counts"]["ready"], 50);
        assert_eq!(v["counts"]["scheduled"], 150);
        for b in v["backends"].as_array().unwrap() {
            seen.push((
                b["created_at"].as_u64().unwrap(),
                b["id"].as_str().unwrap().to_string(),
            ));
        }
        match v["next"].as_str() {
            Some(next) => path = format!("/v1/backends?limit=100&order=desc&after={next}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 250);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 250, "no repeats");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first, then by id");

    // Oldest first is the default order.
    let v = get_json(addr, "/v1/backends?limit=1").await;
    assert_eq!(v["backends"][0]["created_at"], 1_000);

    // Filters: drone, pool, key, status, together; counts ignore only the status filter.
    let v = get_json(addr, "/v1/backends?limit=1000&drone=d1&pool=p&status=live").await;
    let want = all
        .iter()
        .filter(|r| r.drone.as_deref() == Some("d1") && r.pool.is_some() && r.state.is_live())
        .count();
    assert_eq!(v["total"], want);
    assert_eq!(v["backends"].as_array().unwrap().len(), want);
    for b in v["backends"].as_array().unwrap() {
        assert_eq!(b["drone"], "d1");
        assert_eq!(b["pool"], "p");
        assert_ne!(b["status"], "terminated");
    }
    let in_pool_on_d1 = all
        .iter()
        .filter(|r| r.drone.as_deref() == Some("d1") && r.pool.is_some())
        .count();
    let counted: u64 = v["counts"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(counted as usize, in_pool_on_d1);
    let v = get_json(addr, "/v1/backends?limit=10&key=default/doc-199").await;
    let keys: Vec<&str> = v["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["key"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["doc-199"]);
    let v = get_json(addr, "/v1/backends?limit=100&key=doc-7").await;
    assert_eq!(v["total"], 11, "doc-7 and doc-70 to doc-79: {v}");
    // A filter works without paging too.
    let v = get_json(addr, "/v1/backends?drone=d2").await;
    assert_eq!(v["backends"].as_array().unwrap().len(), 125);
    // Counts only.
    let v = get_json(addr, "/v1/backends?limit=0").await;
    assert_eq!(v["backends"].as_array().unwrap().len(), 0);
    assert_eq!(v["total"], 250);
    assert!(v.get("next").is_none());

    // Nonsense is refused and says why.
    for (path, field) in [
        ("/v1/backends?limit=10&order=sideways", "order"),
        ("/v1/backends?after=nonsense", "after"),
        ("/v1/backends?limit=ten", "limit"),
    ] {
        let (status, body) = get(addr, path, None).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains(field), "{path}: {body}");
    }
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_open_while_the_api_needs_a_token() {
    let (addr, sched, _store, cancel, _dir) = api(true, |cfg| cfg.api_tokens = true).await;
    for path in ["/ui", "/ui/", "/ui/app.js", "/ui/app.css"] {
        let (status, body) = get(addr, path, None).await;
        assert_eq!(status, 200, "{path} needs no token: {body}");
    }
    let (status, _) = get(addr, "/v1/backends", None).await;
    assert_eq!(status, 401, "the API still needs one");
    let (status, body) = get(addr, "/ui/../v1/backends", None).await;
    assert_ne!(status, 200, "not through a dot segment either: {body}");
    let admin = sched
        .handles()
        .tokens
        .create(crate::api_tokens::CreateTokenRequest {
            scope: Some(crate::api_tokens::Scope::Admin),
            ..Default::default()
        })
        .await
        .unwrap()
        .token;
    assert_eq!(get(addr, "/v1/backends", Some(&admin)).await.0, 200);
    let (status, _) = get(addr, "/v1/backends/nosuch/traffic", Some(&admin)).await;
    assert_eq!(status, 404);
    cancel.cancel();
    sched.wait().await;
}
