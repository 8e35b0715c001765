//! Drone sessions: admitting a drone run (its record and lease, re-adoption of what it already
//! runs, closing what it lost), the WebSocket session a network drone keeps open, and losing a
//! drone whose lease expired.
//!
//! The session protocol (`hangar_core::drone::{FromDrone, ToDrone}`): the drone sends `Hello`,
//! the scheduler answers `Welcome` with the lease TTL and heartbeat interval; heartbeats renew
//! the lease; commands carry ids and are acknowledged; events carry sequence numbers and are
//! acknowledged after they are applied. Delivery is at-least-once and handling idempotent;
//! whatever a broken session lost is re-sent level-triggered when the drone is admitted again
//! (spawns of still-scheduled backends, stops of still-terminating ones).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use hangar_core::drone::{BackendEvent, FromDrone, Hello, SchedulerMessage, ToDrone};
use hangar_core::{BackendId, BackendState};
use tokio::sync::mpsc;

use crate::drones::{DroneConn, DroneStatus};
use crate::error::ApiError;
use crate::records::list_backends;
use crate::records::{DroneRecord, drone_key};
use crate::scheduler::Inner;
use hangar_store::LeaseId;

/// Commands buffered per drone before a send waits.
const DRONE_CHANNEL: usize = 1024;
/// How long a new session may take to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Validates a `Hello`; the message says what is wrong.
pub fn validate_hello(h: &Hello) -> Result<(), String> {
    if hangar_core::ids::validate_label(&h.drone).is_err() {
        return Err(format!(
            "drone name {:?} must be lowercase letters, digits and '-' (at most 63)",
            h.drone
        ));
    }
    if h.run_id.is_empty() || h.run_id.len() > 128 {
        return Err("run_id must be 1 to 128 characters".into());
    }
    if h.runtime != "docker" && h.runtime != "process" {
        return Err(format!("runtime {:?} is not docker or process", h.runtime));
    }
    if h.pool.is_empty() {
        return Err("pool is empty".into());
    }
    Ok(())
}

impl Inner {
    /// Admits a drone run. Writes its record (leased for network drones), re-adopts the
    /// backends it reports that records still assign to this drone, closes records of this
    /// drone that it no longer runs as lost, registers its command channel and re-sends what
    /// a broken session may have lost. Returns the command receiver and the backends in its
    /// inventory that nobody wants (to be stopped).
    pub(crate) async fn admit_drone(
        &self,
        hello: &Hello,
        lease: Option<LeaseId>,
    ) -> Result<(mpsc::Receiver<SchedulerMessage>, Arc<DroneStatus>), ApiError> {
        validate_hello(hello).map_err(ApiError::BadRequest)?;
        // Serialised with reconciler passes: between writing the new run's record and
        // re-adopting, records name the old run and must not be judged lost.
        let _admission = self.admission.lock().await;
        let rec = DroneRecord {
            name: hello.drone.clone(),
            run_id: hello.run_id.clone(),
            runtime: hello.runtime.clone(),
            pool: hello.pool.clone(),
            capacity: hello.capacity,
            connected_at: self.clock.now_ms(),
            lease,
        };
        let value = serde_json::to_vec(&rec).unwrap_or_default();
        self.store
            .put(&drone_key(&hello.drone), value, lease)
            .await?;

        let inventory: BTreeMap<&str, &hangar_core::drone::InventoryItem> = hello
            .inventory
            .iter()
            .map(|i| (i.backend.as_str(), i))
            .collect();
        let mut wanted: HashSet<String> = HashSet::new();
        let mut resend: Vec<SchedulerMessage> = Vec::new();
        for b in list_backends(self.store.as_ref()).await? {
            let b = b.record;
            if b.drone.as_deref() != Some(hello.drone.as_str()) || !b.state.is_live() {
                continue;
            }
            let same_run = b.drone_run_id.as_deref() == Some(hello.run_id.as_str());
            if let Some(item) = inventory.get(b.id.as_str()) {
                wanted.insert(b.id.to_string());
                if !same_run {
                    let old_run = b.drone_run_id.clone();
                    let new_run = hello.run_id.clone();
                    let address = item.address;
                    let adopted = self
                        .update_backend(b.id.as_str(), |r| {
                            if r.drone_run_id != old_run || !r.state.is_live() {
                                return false;
                            }
                            r.drone_run_id = Some(new_run.clone());
                            r.address = Some(address);
                            true
                        })
                        .await?;
                    if adopted.is_some() {
                        tracing::info!(backend = %b.id, drone = %hello.drone, "re-adopted backend after agent restart");
                    }
                }
            } else if same_run {
                // A reconnect of the same run: re-send what may have been lost. Anything else
                // it runs is settled by the events it re-sends (they are buffered until acked).
                match &b.state {
                    BackendState::Scheduled => {
                        resend.push(SchedulerMessage::Spawn(self.spawn_command(&b)))
                    }
                    BackendState::Terminating { .. } => resend.push(SchedulerMessage::Terminate {
                        backend: b.id.clone(),
                        hard: false,
                    }),
                    _ => {}
                }
            } else if let Some(old) = b.drone_run_id.as_deref() {
                self.mark_lost(
                    b.id.as_str(),
                    old,
                    "its drone's agent restarted and no longer runs it",
                )
                .await?;
            }
        }
        // Backends the drone runs that no live record wants: stop them.
        for item in &hello.inventory {
            if !wanted.contains(item.backend.as_str()) {
                tracing::info!(backend = %item.backend, drone = %hello.drone, "stopping a backend nobody wants");
                resend.push(SchedulerMessage::Terminate {
                    backend: item.backend.clone(),
                    hard: false,
                });
            }
        }

        let (tx, rx) = mpsc::channel(DRONE_CHANNEL.max(resend.len() + 16));
        let status = Arc::new(DroneStatus::default());
        status.set_unhealthy(hello.unhealthy.clone());
        status.heartbeat(self.clock.now_ms());
        for m in resend {
            let _ = tx.try_send(m);
        }
        self.drones.insert(DroneConn {
            name: hello.drone.clone(),
            run_id: hello.run_id.clone(),
            runtime: hello.runtime.clone(),
            pool: hello.pool.clone(),
            capacity: hello.capacity,
            tx,
            status: status.clone(),
            leased: lease.is_some(),
        });
        tracing::info!(drone = %hello.drone, run_id = %hello.run_id, runtime = %hello.runtime, adopted = wanted.len(), "drone admitted");
        Ok((rx, status))
    }

    /// Closes every live backend of drone run `run_id` as lost (its lease expired).
    pub(crate) async fn lose_drone(&self, name: &str, run_id: &str) -> Result<usize, ApiError> {
        let _admission = self.admission.lock().await;
        self.drones.remove(name, run_id);
        let mut lost = 0;
        for b in list_backends(self.store.as_ref()).await? {
            let b = b.record;
            if b.drone.as_deref() == Some(name)
                && b.drone_run_id.as_deref() == Some(run_id)
                && b.state.is_live()
                && self
                    .mark_lost(
                        b.id.as_str(),
                        run_id,
                        "its drone stopped renewing its lease (lost)",
                    )
                    .await?
            {
                lost += 1;
            }
        }
        tracing::warn!(drone = %name, run_id, lost, "drone lost");
        Ok(lost)
    }

    /// Applies one event from run `run_id` of `drone`; a failure is logged (the reconciler
    /// recovers whatever it leaves undone).
    pub(crate) async fn apply_drone_event(
        &self,
        drone: &str,
        run_id: &str,
        backend: &BackendId,
        event: BackendEvent,
    ) {
        if let Err(e) = self.apply_event(drone, run_id, backend, event).await {
            tracing::error!(backend = %backend, error = %e, "cannot apply drone event");
        }
    }
}

fn encode(m: &ToDrone) -> Message {
    Message::Text(serde_json::to_string(m).unwrap_or_default().into())
}

/// Serves one network drone session until the socket closes, the lease is lost or the
/// scheduler shuts down.
pub(crate) async fn serve_session(inner: Arc<Inner>, mut socket: WebSocket) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<FromDrone>(&t) {
            Ok(FromDrone::Hello(h)) => h,
            _ => {
                let _ = socket
                    .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                        code: 1002,
                        reason: "the first message must be a hello".into(),
                    })))
                    .await;
                return;
            }
        },
        _ => return,
    };
    let lease = match inner.store.lease_grant(inner.config.lease_ttl).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot grant a drone lease");
            return;
        }
    };
    let (mut commands, status) = match inner.admit_drone(&hello, Some(lease)).await {
        Ok(x) => x,
        Err(e) => {
            let _ = socket
                .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                    code: 1008,
                    reason: e.to_string().chars().take(120).collect::<String>().into(),
                })))
                .await;
            let _ = inner.store.lease_revoke(lease).await;
            return;
        }
    };
    let ttl = inner.config.lease_ttl;
    let welcome = ToDrone::Welcome {
        lease_ttl_ms: ttl.as_millis() as u64,
        heartbeat_interval_ms: (ttl / 5).as_millis().max(50) as u64,
    };
    if socket.send(encode(&welcome)).await.is_err() {
        inner.drones.remove(&hello.drone, &hello.run_id);
        return;
    }
    let mut next_id: u64 = 0;
    let mut unacked: BTreeMap<u64, SchedulerMessage> = BTreeMap::new();
    let reason = loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => break "scheduler shutting down",
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break "replaced by a newer session" };
                next_id += 1;
                unacked.insert(next_id, cmd.clone());
                if socket.send(encode(&ToDrone::Command { id: next_id, message: cmd })).await.is_err() {
                    break "send failed";
                }
            }
            msg = socket.recv() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Binary(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => break "drone closed the session",
                    Some(Err(_)) => break "connection failed",
                };
                let parsed = match serde_json::from_str::<FromDrone>(&text) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(drone = %hello.drone, error = %e, "ignoring malformed drone message");
                        continue;
                    }
                };
                match parsed {
                    FromDrone::Hello(_) => {
                        tracing::warn!(drone = %hello.drone, "ignoring a second hello");
                    }
                    FromDrone::Heartbeat { unhealthy } => {
                        if let Err(e) = inner.store.lease_keep_alive(lease).await {
                            tracing::warn!(drone = %hello.drone, error = %e, "drone lease expired; closing its session");
                            break "lease expired";
                        }
                        status.set_unhealthy(unhealthy);
                        status.heartbeat(inner.clock.now_ms());
                        if socket.send(encode(&ToDrone::HeartbeatAck)).await.is_err() {
                            break "send failed";
                        }
                    }
                    FromDrone::Ack { id } => {
                        unacked.remove(&id);
                    }
                    FromDrone::Event { seq, backend, event } => {
                        inner.apply_drone_event(&hello.drone, &hello.run_id, &backend, event).await;
                        if socket.send(encode(&ToDrone::EventAck { seq })).await.is_err() {
                            break "send failed";
                        }
                    }
                    FromDrone::Stats { usage } => {
                        inner.record_usage(&hello.drone, &usage);
                    }
                }
            }
        }
    };
    // The lease is left to expire (unless the scheduler is the one stopping): a drone that
    // reconnects within the TTL loses nothing.
    inner.drones.remove(&hello.drone, &hello.run_id);
    if !unacked.is_empty() {
        tracing::debug!(drone = %hello.drone, unacked = unacked.len(), "session ended with unacknowledged commands; they are re-sent on readmission");
    }
    tracing::info!(drone = %hello.drone, run_id = %hello.run_id, reason, "drone session ended");
}

/// Follows drone records: when one vanishes (its lease expired) and no newer run replaced it,
/// the drone is lost and its backends are closed. The reconciler recovers anything missed
/// (for example while the scheduler was down).
pub(crate) async fn watch_drones(inner: Arc<Inner>, cancel: tokio_util::sync::CancellationToken) {
    use crate::records::DRONES_PREFIX;
    use hangar_store::WatchEvent;
    loop {
        let from = match inner.store.revision().await {
            Ok(r) => r + 1,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the store revision; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        let mut events = match inner.store.watch(DRONES_PREFIX, from).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch drones; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => return,
                ev = events.recv() => ev,
            };
            let Some(ev) = ev else { break };
            let WatchEvent::Delete {
                key,
                prev: Some(prev),
                ..
            } = ev
            else {
                continue;
            };
            let Ok(rec) = serde_json::from_slice::<DroneRecord>(&prev.value) else {
                continue;
            };
            // A newer run may already have re-registered under the same name.
            if let Ok(Some(_)) = inner.store.get(&key).await {
                continue;
            }
            metrics::counter!(crate::metrics::LEASE_EXPIRIES_TOTAL).increment(1);
            if let Err(e) = inner.lose_drone(&rec.name, &rec.run_id).await {
                tracing::error!(drone = %rec.name, error = %e, "cannot close a lost drone's backends");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_core::drone::Capacity;

    fn hello() -> Hello {
        Hello {
            drone: "d1".into(),
            run_id: "r1".into(),
            capacity: Capacity::default(),
            pool: "default".into(),
            runtime: "docker".into(),
            inventory: vec![],
            unhealthy: None,
        }
    }

    #[test]
    fn hello_validation() {
        assert!(validate_hello(&hello()).is_ok());
        let mut h = hello();
        h.drone = "Bad Name".into();
        assert!(validate_hello(&h).unwrap_err().contains("drone name"));
        let mut h = hello();
        h.runtime = "vm".into();
        assert!(validate_hello(&h).unwrap_err().contains("runtime"));
        let mut h = hello();
        h.run_id.clear();
        assert!(validate_hello(&h).is_err());
    }

    mod lease_expiry {
        use std::sync::Arc;
        use std::time::Duration;

        use hangar_core::api::ConnectRequest;
        use hangar_core::drone::{Capacity, Hello, SchedulerMessage};
        use hangar_core::token::TokenKey;
        use hangar_core::{BackendState, KeyRef, TerminationReason};
        use tokio_util::sync::CancellationToken;

        use crate::{ManualClock, Scheduler, SchedulerConfig};
        use hangar_store::Store;
        use hangar_store::embedded::EmbeddedStore;

        fn hello(run: &str) -> Hello {
            Hello {
                drone: "d1".into(),
                run_id: run.into(),
                capacity: Capacity {
                    cpu_millis: 4000,
                    memory_mb: 4096,
                    max_backends: 10,
                },
                pool: "default".into(),
                runtime: "process".into(),
                inventory: vec![],
                unhealthy: None,
            }
        }

        async fn state_of(s: &Scheduler, id: &str) -> BackendState {
            s.inner.get_backend(id).await.unwrap().unwrap().0.state
        }

        /// With a paused clock: a drone whose lease is renewed keeps its backends; once the
        /// renewals stop, the lease expires, the drone record vanishes and every live backend
        /// of that run is closed as lost, while a record already moved to a newer run is left
        /// alone.
        #[tokio::test(start_paused = true)]
        async fn an_expired_lease_closes_the_runs_backends_as_lost() {
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedStore::open_default(dir.path().join("s.redb"))
                .await
                .unwrap();
            let mut cfg = SchedulerConfig::new("hangar.test", "http://127.0.0.1:1");
            cfg.lease_ttl = Duration::from_secs(10);
            cfg.defaults.command = Some(vec!["true".into()]);
            let sched = Scheduler::new(
                cfg,
                store.clone(),
                TokenKey::generate(),
                Arc::new(ManualClock::new(1_000_000)),
            );
            let cancel = CancellationToken::new();
            sched.start(cancel.clone()).await.unwrap();
            let lease = store.lease_grant(Duration::from_secs(10)).await.unwrap();
            let (mut commands, _status) = sched
                .inner
                .admit_drone(&hello("r1"), Some(lease))
                .await
                .unwrap();
            let a = sched
                .inner
                .connect(ConnectRequest {
                    key: Some(KeyRef::new("default", "a")),
                    ..Default::default()
                })
                .await
                .unwrap();
            assert!(matches!(
                commands.recv().await,
                Some(SchedulerMessage::Spawn(_))
            ));

            // Renewed every 5 s for 30 s: nothing is lost.
            for _ in 0..6 {
                tokio::time::advance(Duration::from_secs(5)).await;
                store.lease_keep_alive(lease).await.unwrap();
            }
            assert_eq!(
                state_of(&sched, a.backend_id.as_str()).await,
                BackendState::Scheduled
            );

            // Renewals stop: after the TTL the backend is lost.
            tokio::time::advance(Duration::from_secs(11)).await;
            let mut state = state_of(&sched, a.backend_id.as_str()).await;
            for _ in 0..100 {
                if !state.is_live() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                state = state_of(&sched, a.backend_id.as_str()).await;
            }
            assert_eq!(
                state,
                BackendState::Terminated {
                    reason: TerminationReason::Lost
                }
            );
            assert!(store.lease_keep_alive(lease).await.is_err());
            assert!(sched.inner.drones.get("d1").is_none());

            // A record that names a newer run is never overwritten by the old run's loss.
            let lease2 = store.lease_grant(Duration::from_secs(10)).await.unwrap();
            let (_c2, _s2) = sched
                .inner
                .admit_drone(&hello("r2"), Some(lease2))
                .await
                .unwrap();
            let b = sched
                .inner
                .connect(ConnectRequest::default())
                .await
                .unwrap();
            assert!(
                !sched
                    .inner
                    .mark_lost(b.backend_id.as_str(), "r1", "stale")
                    .await
                    .unwrap()
            );
            assert_eq!(
                state_of(&sched, b.backend_id.as_str()).await,
                BackendState::Scheduled
            );
            cancel.cancel();
            sched.wait().await;
        }
    }
}
