//! `GET /v1/backends/{id}/logs` through two instances: the drone's session is held by the
//! follower, the request reaches the leader, which forwards it; the drone (a WebSocket driven
//! by the test) answers. The status comes from the drone's first answer, a failure after it
//! ends the body with a note, a client that goes away cancels the request on the drone, and a
//! drone that is not connected is a 503.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hangar_core::drone::{FromDrone, LogsFailure, LogsRequest, SchedulerMessage, ToDrone};
use hangar_store::Store;
use hangar_store::embedded::EmbeddedStore;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::forward::instance;
use super::{hello, key};

/// Bound on any single wait.
const WAIT: Duration = Duration::from_secs(10);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A drone session (driven by the test) with the instance at `api`.
async fn drone(api: std::net::SocketAddr) -> Ws {
    let mut req = format!("ws://{api}/v1/drones/connect")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer cluster-secret".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let hello = serde_json::to_string(&FromDrone::Hello(hello("d1", "r1"))).unwrap();
    ws.send(Message::text(hello)).await.unwrap();
    assert!(matches!(next(&mut ws).await, ToDrone::Welcome { .. }));
    ws
}

async fn next(ws: &mut Ws) -> ToDrone {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("nothing from the scheduler")
            .expect("the session closed")
            .unwrap();
        if let Message::Text(t) = message {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

async fn send(ws: &mut Ws, m: &FromDrone) {
    ws.send(Message::text(serde_json::to_string(m).unwrap()))
        .await
        .unwrap();
}

/// The next command (acknowledged), skipping heartbeat traffic.
async fn command(ws: &mut Ws) -> SchedulerMessage {
    loop {
        if let ToDrone::Command { id, message } = next(ws).await {
            send(ws, &FromDrone::Ack { id }).await;
            return message;
        }
    }
}

/// The next log request.
async fn logs_request(ws: &mut Ws) -> LogsRequest {
    loop {
        if let SchedulerMessage::Logs(r) = command(ws).await {
            return r;
        }
    }
}

/// Starts `GET path` on `api`; resolves to the response once its head arrives.
fn get(
    api: std::net::SocketAddr,
    path: &str,
) -> tokio::task::JoinHandle<http::Response<hyper::body::Incoming>> {
    let uri = format!("http://{api}{path}");
    tokio::spawn(async move {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let req = http::Request::get(uri).body(Empty::new()).unwrap();
        client.request(req).await.unwrap()
    })
}

async fn body(response: http::Response<hyper::body::Incoming>) -> String {
    let bytes = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("the body did not end")
        .unwrap()
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_forwarded_to_the_instance_holding_the_drone_and_streamed_back() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = EmbeddedStore::open_default(dir.path().join("s.redb"))
        .await
        .unwrap();
    let a = instance(store.clone(), "a").await;
    let b = instance(store.clone(), "b").await;
    assert!(a.sched.handles().leadership.token().is_some(), "a leads");
    let mut ws = drone(b.api).await;
    // The leader places on the drone once its record reaches it.
    let deadline = tokio::time::Instant::now() + WAIT;
    let r = loop {
        match a.sched.handles().connector.connect(key("doc")).await {
            Ok(r) => break r,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "not placed yet");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no placement on d1: {e}"),
        }
    };
    assert!(matches!(command(&mut ws).await, SchedulerMessage::Spawn(_)));
    let path = |q: &str| format!("/v1/backends/{}/logs{q}", r.backend_id);

    // A tail: the drone's answers, as text.
    let response = get(a.api, &path("?tail=2"));
    let asked = logs_request(&mut ws).await;
    assert_eq!(
        (&asked.backend, asked.tail, asked.follow),
        (&r.backend_id, Some(2), false)
    );
    let request = asked.request;
    for data in ["", "one\n", "two\n"] {
        let data = data.to_string();
        send(&mut ws, &FromDrone::Logs { request, data }).await;
    }
    send(
        &mut ws,
        &FromDrone::LogsEnd {
            request,
            error: None,
        },
    )
    .await;
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; charset=utf-8"
    );
    assert_eq!(body(response).await, "one\ntwo\n");

    // Nothing kept: the drone's message, as a 404.
    let response = get(a.api, &path(""));
    let request = logs_request(&mut ws).await.request;
    let error = Some(LogsFailure::NotFound {
        message: "no logs for backend x on drone d1".into(),
    });
    send(&mut ws, &FromDrone::LogsEnd { request, error }).await;
    let response = response.await.unwrap();
    assert_eq!(response.status(), 404);
    assert!(
        body(response)
            .await
            .contains("no logs for backend x on drone d1")
    );

    // A failure once the body has begun ends it with a note on a line of its own.
    let response = get(a.api, &path("?follow=true"));
    let asked = logs_request(&mut ws).await;
    assert!(asked.follow);
    let request = asked.request;
    let data = "half a line".to_string();
    send(&mut ws, &FromDrone::Logs { request, data }).await;
    let error = Some(LogsFailure::Failed {
        message: "the disk is gone".into(),
    });
    send(&mut ws, &FromDrone::LogsEnd { request, error }).await;
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        body(response).await,
        "half a line\nhangar: the log stream ended early: the disk is gone\n"
    );

    // A client that goes away cancels the follow on the drone.
    let response = get(a.api, &path("?follow=true&tail=0"));
    let request = logs_request(&mut ws).await.request;
    let data = String::new();
    send(&mut ws, &FromDrone::Logs { request, data }).await;
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    assert_eq!(
        command(&mut ws).await,
        SchedulerMessage::CancelLogs { request }
    );

    // Bad queries are refused before anything is asked.
    let response = get(a.api, &path("?tail=many")).await.unwrap();
    assert_eq!(response.status(), 400);

    // The drone's session ends: its record lives on until the lease expires, but nobody holds
    // the session, and a forwarded request is not forwarded again.
    drop(ws);
    let deadline = tokio::time::Instant::now() + WAIT;
    while b.sched.handles().drones.get("d1").is_some() {
        assert!(tokio::time::Instant::now() < deadline, "b kept the session");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = get(a.api, &path("")).await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(body(response).await.contains("drone d1"));

    let response = get(a.api, "/v1/backends/nosuch/logs").await.unwrap();
    assert_eq!(response.status(), 404);

    a.cancel.cancel();
    b.cancel.cancel();
    a.sched.wait().await;
    b.sched.wait().await;
}
