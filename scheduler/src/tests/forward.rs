//! Writes on any instance: two control-plane instances share a store; a write sent to the
//! follower is forwarded to the leader, and after a planned handoff the other one leads.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hangar_core::token::TokenKey;
use hangar_store::Store;
use hangar_store::embedded::EmbeddedStore;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::hello;
use crate::api::forward_client;
use crate::leader::Role;
use crate::{ManualClock, Scheduler, SchedulerConfig};

/// A started scheduler serving its API on a loopback port, on a shared store.
pub(super) struct Instance {
    pub(super) sched: Scheduler,
    pub(super) api: std::net::SocketAddr,
    pub(super) cancel: CancellationToken,
    pub(super) server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Instance `id` on `store` (cluster secret `cluster-secret`, default spawn `true`).
pub(super) async fn instance(store: Arc<dyn Store>, id: &str) -> Instance {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let mut cfg = SchedulerConfig::new("hangar.test", format!("http://{api}"));
    cfg.defaults.command = Some(vec!["true".into()]);
    cfg.instance_id = id.into();
    cfg.drone_secret = Some("cluster-secret".into());
    let sched = Scheduler::new(
        cfg,
        store,
        TokenKey::generate(),
        Arc::new(ManualClock::new(1_000)),
    );
    let cancel = CancellationToken::new();
    sched.start(cancel.clone()).await.unwrap();
    let server = {
        let (s, c) = (sched.clone(), cancel.clone());
        tokio::spawn(async move { s.serve_api(listener, c).await })
    };
    Instance {
        sched,
        api,
        cancel,
        server,
    }
}

async fn post(api: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    let req = http::Request::post(format!("http://{api}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = forward_client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_to_a_follower_is_served_by_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = EmbeddedStore::open_default(dir.path().join("s.redb"))
        .await
        .unwrap();
    let a = instance(store.clone(), "a").await;
    let b = instance(store.clone(), "b").await;
    assert!(matches!(
        a.sched.handles().leadership.role(),
        Role::Leader { .. }
    ));
    assert!(matches!(
        b.sched.handles().leadership.role(),
        Role::Follower { .. }
    ));
    // The drone is attached to the leader (placement is the leader's).
    let _d = a
        .sched
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), false)
        .await
        .unwrap();

    let (status, body) = post(b.api, "/v1/connect", r#"{"key": {"name": "doc"}}"#).await;
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = v["backend_id"].as_str().unwrap();
    assert!(
        a.sched.handles().backends.get(id).await.unwrap().is_some(),
        "the leader recorded it"
    );
    // Malformed input is the leader's answer too.
    let (status, body) = post(b.api, "/v1/connect", "{").await;
    assert_eq!(status, 400, "{body}");

    // A planned handoff: a stops (revoking its lease); b leads and serves writes itself.
    a.cancel.cancel();
    a.sched.wait().await;
    let _ = a.server.await;
    let mut roles = b.sched.handles().leadership.subscribe();
    tokio::time::timeout(
        Duration::from_secs(5),
        roles.wait_for(|r| matches!(r, Role::Leader { .. })),
    )
    .await
    .expect("b was not elected after a's handoff")
    .unwrap();
    let (status, body) = post(b.api, "/v1/connect", r#"{"key": {"name": "doc2"}}"#).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("no drone is connected"),
        "b answers itself: {body}"
    );
    b.cancel.cancel();
    b.sched.wait().await;
    let _ = b.server.await;
}

/// A follower's colocated proxy reports activity to its own instance; it reaches the leader
/// too, which decides idle timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_proxy_activity_reaches_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = EmbeddedStore::open_default(dir.path().join("s.redb"))
        .await
        .unwrap();
    let a = instance(store.clone(), "a").await;
    let b = instance(store.clone(), "b").await;
    let id = hangar_core::BackendId::parse("bactive").unwrap();
    b.sched
        .report_activity(&hangar_core::activity::ActivityBatch {
            proxy: "b-proxy".into(),
            reports: vec![hangar_core::activity::ActivityReport {
                backend: id.clone(),
                last_active: 12_345,
                open: 1,
                requests: 3,
                answered: 0,
                duration_us_total: 0,
            }],
        });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a.sched.handles().activity.get(id.as_str()).is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached the leader"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        a.sched.handles().activity.get(id.as_str()),
        Some((12_345, 1))
    );
    for i in [a, b] {
        i.cancel.cancel();
        i.sched.wait().await;
        let _ = i.server.await;
    }
}
