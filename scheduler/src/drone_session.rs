//! Drone sessions: admitting a drone run (its record and lease, re-adoption of what it already
//! runs, closing what it lost), the WebSocket session a network drone keeps open, and losing a
//! drone whose lease expired.
//!
//! The session protocol (`hangar_core::drone::{FromDrone, ToDrone}`): the drone sends `Hello`,
//! the scheduler answers `Welcome` with the lease TTL and heartbeat interval; heartbeats renew
//! the lease; commands carry ids and are acknowledged; events carry sequence numbers and are
//! acknowledged after they are applied. Delivery is at-least-once and handling idempotent;
//! whatever a broken session lost is re-sent level-triggered when the drone is admitted again
//! (spawns of still-scheduled backends, stops of still-terminating ones). A session may be held
//! by any instance: the leader places on the drones of the store's records and writes commands
//! into backend records, and the instance holding the session relays them ([`crate::relay`]).
//! Answers to log requests are handed to [`crate::drone_logs`], and end with their session.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{FutureExt as _, SinkExt as _, StreamExt};
use hangar_core::drone::{BackendEvent, FromDrone, Hello, SchedulerMessage, ToDrone};
use hangar_core::{BackendId, BackendState};
use tokio::sync::mpsc;

use hangar_core::drone::{CLOSE_REFUSED, CLOSE_TRY_AGAIN, DroneMessage};
use hangar_store::{LeaseId, Store};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::drone_logs::LogStreams;
use crate::drones::{DroneConn, DroneRegistry, DroneStatus};
use crate::error::ApiError;
use crate::hot_state::HotShards;
use crate::lifecycle::Backends;
use crate::maintenance::Maintenance;
use crate::records::{DroneRecord, drone_key};

/// Commands buffered per drone before a send waits.
const DRONE_CHANNEL: usize = 1024;
/// How long a new session may take to say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The most events applied together: those already received behind the one read.
const EVENT_BATCH: usize = 64;

/// An admitted session.
#[derive(Debug)]
pub(crate) struct Admitted {
    /// Commands for the drone.
    pub(crate) commands: mpsc::UnboundedReceiver<SchedulerMessage>,
    pub(crate) status: Arc<DroneStatus>,
    /// The registry's number for this session.
    pub(crate) session: u64,
    /// The session's lease (network drones).
    pub(crate) lease: Option<LeaseId>,
}

/// Why a drone run was not admitted, with the step that failed and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The hello is wrong as configured: retrying it unchanged cannot succeed.
    #[error("{0}")]
    Invalid(String),
    /// Another host's agent holds the name with a live lease.
    #[error(
        "drone name {name:?} is in use by an agent on host {host:?} whose lease is live: give this drone another --name, or stop that agent"
    )]
    NameTaken { name: String, host: String },
    /// A step of admission failed (the store, a record).
    #[error("cannot admit the drone: {step} failed: {source}")]
    Step {
        step: &'static str,
        #[source]
        source: ApiError,
    },
}

impl AdmitError {
    fn step(step: &'static str, source: ApiError) -> Self {
        AdmitError::Step { step, source }
    }

    /// Whether the same hello may be admitted later: a store hiccup, or a name whose holder's
    /// lease may run out (the drone retries with backoff and says why); a bad hello is not.
    pub fn is_transient(&self) -> bool {
        match self {
            AdmitError::Invalid(_) => false,
            AdmitError::NameTaken { .. } => true,
            AdmitError::Step { source, .. } => source.is_transient(),
        }
    }
}

impl From<AdmitError> for ApiError {
    fn from(e: AdmitError) -> Self {
        match e {
            AdmitError::Invalid(m) => ApiError::BadRequest(m),
            e @ AdmitError::NameTaken { .. } => ApiError::Conflict(e.to_string()),
            e if e.is_transient() => ApiError::Unavailable(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

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

/// Drone sessions: the registry's only writer, admission, and the loss of drones.
pub struct DroneSessions {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: Arc<SchedulerConfig>,
    drones: Arc<DroneRegistry>,
    backends: Arc<Backends>,
    /// Usage reports from drones go to the detector.
    hot: Arc<HotShards>,
    /// Maintenance windows: told to connected drones; no drone is lost during one.
    maintenance: Arc<Maintenance>,
    /// The live records by drone run, for losing a drone.
    routes: Arc<crate::routes::Routes>,
    /// Serialises drone admission, drone loss and reconciler passes: between writing a new
    /// run's record and re-adopting its backends, records name the old run and must not be
    /// judged lost.
    admission: Mutex<()>,
    /// Log requests carried by the sessions this instance holds.
    logs: Arc<LogStreams>,
    /// Session tasks end when this fires (scheduler shutdown).
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl DroneSessions {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: Arc<SchedulerConfig>,
        drones: Arc<DroneRegistry>,
        backends: Arc<Backends>,
        hot: Arc<HotShards>,
        maintenance: Arc<Maintenance>,
        routes: Arc<crate::routes::Routes>,
        cancel: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        DroneSessions {
            store,
            clock,
            config,
            drones,
            backends,
            hot,
            maintenance,
            routes,
            admission: Mutex::new(()),
            logs: Arc::default(),
            cancel,
            tasks,
        }
    }

    /// Forgets the sessions of network drones whose run no longer has a live record (its
    /// lease expired while nobody watched, for example between two leaders' terms): placement
    /// must not pick them. `records` are the drone records by name, read under the admission
    /// lock.
    pub(crate) fn forget_lost_runs(&self, records: &BTreeMap<String, DroneRecord>) {
        for conn in self.drones.all() {
            let alive = records
                .get(&conn.name)
                .is_some_and(|r| r.run_id == conn.run_id);
            if conn.leased && !alive {
                tracing::warn!(drone = %conn.name, run_id = %conn.run_id, "forgetting the session of a drone whose lease is gone");
                self.drones.remove_run(&conn.name, &conn.run_id);
            }
        }
    }

    /// The log requests of this instance's sessions.
    pub fn logs(&self) -> &Arc<LogStreams> {
        &self.logs
    }

    /// Holds off admissions and losses while the caller (a reconciler pass) judges records
    /// by the drone runs they name.
    pub(crate) async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.admission.lock().await
    }

    /// Attaches a drone whose agent runs in this process (dev mode). Returns the channel the
    /// agent reads commands from and the one it sends events on; events are applied in order
    /// by a tracked task until shutdown begins.
    pub async fn attach(
        self: &Arc<Self>,
        hello: Hello,
    ) -> Result<
        (
            mpsc::UnboundedReceiver<SchedulerMessage>,
            mpsc::Sender<DroneMessage>,
        ),
        AdmitError,
    > {
        let admitted = self.admit(&hello, false).await?;
        let cmd_rx = admitted.commands;
        let session = admitted.session;
        let (ev_tx, mut ev_rx) = mpsc::channel::<DroneMessage>(DRONE_CHANNEL);
        let this = self.clone();
        let (name, run_id) = (hello.drone, hello.run_id);
        self.tasks.spawn(async move {
            loop {
                // After shutdown begins no event is applied: backends stopped by a shutting
                // down agent stay recorded under its run and are closed as lost on restart.
                let msg = tokio::select! {
                    _ = this.cancel.cancelled() => break,
                    m = ev_rx.recv() => m,
                };
                match msg {
                    None => break,
                    Some(DroneMessage::Event { backend, event }) => {
                        if let Err(e) = this.apply_event(&name, &run_id, &backend, event).await {
                            tracing::error!(backend = %backend, error = %e, "cannot apply drone event");
                        }
                    }
                    Some(DroneMessage::Logs { request, data }) => {
                        this.logs.deliver(&name, session, request, data);
                    }
                    Some(DroneMessage::LogsEnd { request, error }) => {
                        this.logs.end(&name, session, request, error);
                    }
                }
            }
            this.drones.remove_session(&name, session);
            this.logs.session_ended(&name, session);
            tracing::info!(drone = %name, run_id = %run_id, "drone detached");
        });
        Ok((cmd_rx, ev_tx))
    }

    /// Admits a drone run. Refuses a name another host holds with a live lease; grants the
    /// session's lease (network drones; granted only once the admission lock is held, so it
    /// cannot run out while waiting for it); writes the drone record; re-adopts the backends
    /// it reports that records still assign to this drone; closes records of this drone that
    /// it no longer runs; registers its command channel and re-sends what a broken session
    /// may have lost (spawns of still-scheduled backends, stops of terminating ones) and stops
    /// of backends nobody wants.
    pub(crate) async fn admit(&self, hello: &Hello, leased: bool) -> Result<Admitted, AdmitError> {
        validate_hello(hello).map_err(AdmitError::Invalid)?;
        // Serialised with reconciler passes: between writing the new run's record and
        // re-adopting, records name the old run and must not be judged lost.
        let _admission = self.admission.lock().await;
        self.check_name(hello).await?;
        let lease = if leased {
            let lease = self
                .store
                .lease_grant(self.config.lease_ttl)
                .await
                .map_err(|e| AdmitError::step("grant the session lease", e.into()))?;
            Some(lease)
        } else {
            None
        };
        match self.admit_locked(hello, lease).await {
            Ok(a) => Ok(a),
            Err(e) => {
                if let Some(lease) = lease {
                    let _ = self.store.lease_revoke(lease).await;
                }
                Err(e)
            }
        }
    }

    /// Refuses `hello` if its drone name is held by an agent on another host whose lease is
    /// live (its record exists: leased records vanish with their lease).
    async fn check_name(&self, hello: &Hello) -> Result<(), AdmitError> {
        let Some(kv) = self
            .store
            .get(&drone_key(&hello.drone))
            .await
            .map_err(|e| AdmitError::step("read the drone record", e.into()))?
        else {
            return Ok(());
        };
        let Ok(held) = serde_json::from_slice::<DroneRecord>(&kv.value) else {
            return Ok(());
        };
        let other_host = matches!((&held.host, &hello.host), (Some(a), Some(b)) if a != b);
        if held.run_id != hello.run_id && held.lease.is_some() && other_host {
            return Err(AdmitError::NameTaken {
                name: hello.drone.clone(),
                host: held.host.unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// The drone record of `hello`'s run, held by this instance.
    fn drone_record(
        &self,
        hello: &Hello,
        lease: Option<LeaseId>,
        unhealthy: Option<String>,
    ) -> DroneRecord {
        DroneRecord {
            name: hello.drone.clone(),
            run_id: hello.run_id.clone(),
            runtime: hello.runtime.clone(),
            pool: hello.pool.clone(),
            capacity: hello.capacity,
            connected_at: self.clock.now_ms(),
            lease,
            host: hello.host.clone(),
            unhealthy,
            instance: Some(self.config.instance_id.clone()),
        }
    }

    async fn admit_locked(
        &self,
        hello: &Hello,
        lease: Option<LeaseId>,
    ) -> Result<Admitted, AdmitError> {
        let rec = self.drone_record(hello, lease, hello.unhealthy.clone());
        let value = serde_json::to_vec(&rec).unwrap_or_default();
        self.store
            .put(&drone_key(&hello.drone), value, lease)
            .await
            .map_err(|e| AdmitError::step("write the drone record", e.into()))?;
        // The session is registered before the records are read: a command the relay sees
        // from now on reaches it, and one written before is in the listing below, so none
        // falls between the two (one in both is sent twice, which the agent ignores).
        let (tx, rx) = mpsc::unbounded_channel();
        let status = Arc::new(DroneStatus::default());
        status.set_unhealthy(hello.unhealthy.clone());
        status.heartbeat(self.clock.now_ms());
        let session = self.drones.insert(DroneConn {
            name: hello.drone.clone(),
            run_id: hello.run_id.clone(),
            runtime: hello.runtime.clone(),
            pool: hello.pool.clone(),
            capacity: hello.capacity,
            tx: tx.clone(),
            status: status.clone(),
            leased: lease.is_some(),
            session: 0,
        });
        match self.settle_inventory(hello, &tx).await {
            Ok(adopted) => {
                tracing::info!(drone = %hello.drone, run_id = %hello.run_id, runtime = %hello.runtime, adopted, "drone admitted");
                Ok(Admitted {
                    commands: rx,
                    status,
                    session,
                    lease,
                })
            }
            Err(e) => {
                self.drones.remove_session(&hello.drone, session);
                Err(e)
            }
        }
    }

    /// Re-adopts the backends the drone reports that records still assign to it, closes the
    /// records of this drone that it no longer runs, and queues on `tx` what a broken session
    /// may have lost (what the records of this run ask for) and stops of backends nobody
    /// wants. Returns how many backends it runs that records want.
    async fn settle_inventory(
        &self,
        hello: &Hello,
        tx: &mpsc::UnboundedSender<SchedulerMessage>,
    ) -> Result<usize, AdmitError> {
        let inventory: BTreeMap<&str, &hangar_core::drone::InventoryItem> = hello
            .inventory
            .iter()
            .map(|i| (i.backend.as_str(), i))
            .collect();
        let mut wanted: HashSet<String> = HashSet::new();
        let mut resend: Vec<SchedulerMessage> = Vec::new();
        let records = self
            .backends
            .list()
            .await
            .map_err(|e| AdmitError::step("list backend records", e))?;
        for b in records {
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
                        .backends
                        .update(b.id.as_str(), |r| {
                            if r.drone_run_id != old_run || !r.state.is_live() {
                                return false;
                            }
                            r.drone_run_id = Some(new_run.clone());
                            r.address = Some(address);
                            true
                        })
                        .await
                        .map_err(|e| AdmitError::step("re-adopt a backend", e))?;
                    if adopted.is_some() {
                        tracing::info!(backend = %b.id, drone = %hello.drone, "re-adopted backend after agent restart");
                    }
                }
                // A stop that the old run may never have carried out is sent again.
                if matches!(b.state, BackendState::Terminating { .. })
                    && let Some(stop) = b.command(self.config.startup_timeout)
                {
                    resend.push(stop);
                }
            } else if same_run {
                // A reconnect of the same run: re-send what may have been lost. Anything else
                // it runs is settled by the events it re-sends (they are buffered until acked).
                match &b.state {
                    BackendState::Scheduled | BackendState::Terminating { .. } => {
                        resend.extend(b.command(self.config.startup_timeout))
                    }
                    // It had an address, so the drone listed it while it ran: gone now, and
                    // its exit was never applied.
                    BackendState::Waiting | BackendState::Ready => {
                        self.backends
                            .close_gone(
                                b.id.as_str(),
                                &hello.run_id,
                                "its drone no longer runs it (its exit was not reported)",
                            )
                            .await
                            .map_err(|e| {
                                AdmitError::step("close a backend the drone no longer runs", e)
                            })?;
                    }
                    _ => {}
                }
            } else if let Some(old) = b.drone_run_id.as_deref() {
                self.backends
                    .mark_lost(
                        b.id.as_str(),
                        old,
                        "its drone's agent restarted and no longer runs it",
                    )
                    .await
                    .map_err(|e| AdmitError::step("close a backend the agent no longer runs", e))?;
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

        for m in resend {
            let _ = tx.send(m);
        }
        Ok(wanted.len())
    }

    /// Closes every live backend of these drone runs as lost (their leases expired), in
    /// batched writes across runs: a thousand drones lost at once cost a few dozen writes,
    /// not one (and an fsync) per drone.
    pub(crate) async fn lose_runs(
        &self,
        runs: &[(String, String)],
        backends: &Backends,
    ) -> Result<usize, ApiError> {
        let _admission = self.admission.lock().await;
        if self.maintenance.protects_drones().await? {
            tracing::warn!(
                drones = runs.len(),
                "maintenance window: leases expired, but no drone is declared lost before the window ends"
            );
            return Ok(0);
        }
        // From the route feed's index of live records, not a listing of the store: losing a
        // drone costs what it ran; each record is closed only at the revision the index holds
        // (re-read if it changed since) and only while it still names its run.
        for (name, run_id) in runs {
            self.drones.remove_run(name, run_id);
        }
        let on_runs = self.routes.live_on_runs(runs);
        let lost = backends
            .mark_lost_many(&on_runs, "its drone stopped renewing its lease (lost)")
            .await?;
        for (name, run_id) in runs {
            tracing::warn!(drone = %name, run_id, "drone lost");
        }
        tracing::warn!(drones = runs.len(), backends = lost, "drones lost");
        Ok(lost)
    }

    /// Applies one event from run `run_id` of `drone`.
    pub(crate) async fn apply_event(
        &self,
        drone: &str,
        run_id: &str,
        backend: &BackendId,
        event: BackendEvent,
    ) -> Result<(), ApiError> {
        self.backends
            .apply_event(drone, run_id, backend, event)
            .await
    }

    /// Applies a batch of a session's events, those of one backend in one write and different
    /// backends concurrently, and acknowledges (with one flush) those applied. If one could
    /// not be written the session is closed with "try again" (the drone keeps what was not
    /// acknowledged and sends it again); `Err` is why the session ends.
    async fn apply_batch(
        &self,
        hello: &Hello,
        socket: &mut WebSocket,
        batch: Vec<(u64, BackendId, BackendEvent)>,
    ) -> Result<(), &'static str> {
        let groups = by_backend(batch);
        let applied = futures_util::future::join_all(groups.iter().map(|(backend, events, _)| {
            self.backends
                .apply_events(&hello.drone, &hello.run_id, backend, events)
        }))
        .await;
        let mut failed = None;
        let mut acked = true;
        for ((backend, _, seqs), result) in groups.iter().zip(applied) {
            match result {
                Ok(()) => {
                    for &seq in seqs {
                        acked &= socket
                            .feed(encode(&ToDrone::EventAck { seq }))
                            .await
                            .is_ok();
                    }
                }
                Err(e) => {
                    tracing::warn!(drone = %hello.drone, backend = %backend, error = %e, "cannot apply a drone event; closing the session so the drone sends it again");
                    failed.get_or_insert((seqs[0], e));
                }
            }
        }
        acked &= socket.flush().await.is_ok();
        if let Some((seq, e)) = failed {
            close(
                socket,
                CLOSE_TRY_AGAIN,
                &format!("cannot apply event {seq}: {e}"),
            )
            .await;
            return Err("an event could not be applied");
        }
        if acked { Ok(()) } else { Err("send failed") }
    }
}

/// `first` and the events already received behind it (a drone reports `starting`, `waiting`
/// and `ready` of a quick start in one burst), up to [`EVENT_BATCH`]; a message of another
/// kind read meanwhile is kept in `held`, to be handled next.
fn gather_events(
    socket: &mut WebSocket,
    first: (u64, BackendId, BackendEvent),
    held: &mut Option<Option<Result<Message, axum::Error>>>,
) -> Vec<(u64, BackendId, BackendEvent)> {
    let mut batch = vec![first];
    while batch.len() < EVENT_BATCH {
        match socket.recv().now_or_never() {
            None => break,
            Some(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<FromDrone>(&t) {
                Ok(FromDrone::Event {
                    seq,
                    backend,
                    event,
                }) => batch.push((seq, backend, event)),
                _ => {
                    *held = Some(Some(Ok(Message::Text(t))));
                    break;
                }
            },
            Some(other) => {
                *held = Some(other);
                break;
            }
        }
    }
    batch
}

/// The next message from the drone: the one held back while gathering events, else the
/// socket's next.
async fn next_message(
    held: &mut Option<Option<Result<Message, axum::Error>>>,
    socket: &mut WebSocket,
) -> Option<Result<Message, axum::Error>> {
    match held.take() {
        Some(m) => m,
        None => socket.recv().await,
    }
}

/// A batch of events grouped by backend, in the order each backend first appears: its events
/// in order, and their sequence numbers.
fn by_backend(
    batch: Vec<(u64, BackendId, BackendEvent)>,
) -> Vec<(BackendId, Vec<BackendEvent>, Vec<u64>)> {
    let mut groups: Vec<(BackendId, Vec<BackendEvent>, Vec<u64>)> = Vec::new();
    for (seq, backend, event) in batch {
        match groups.iter_mut().find(|(b, _, _)| *b == backend) {
            Some((_, events, seqs)) => {
                events.push(event);
                seqs.push(seq);
            }
            None => groups.push((backend, vec![event], vec![seq])),
        }
    }
    groups
}

/// Closes a session before `Welcome` with `code` ([`CLOSE_REFUSED`] or [`CLOSE_TRY_AGAIN`]) and
/// a reason cut to what a close frame carries.
async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let reason: String = reason.chars().take(120).collect();
    let frame = axum::extract::ws::CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

fn encode(m: &ToDrone) -> Message {
    Message::Text(serde_json::to_string(m).unwrap_or_default().into())
}

impl DroneSessions {
    /// Serves one network drone session until the socket closes, the lease is lost or the
    /// scheduler shuts down. Any instance may hold it: commands come from the records
    /// ([`crate::relay`]), whoever leads.
    pub async fn serve(&self, mut socket: WebSocket) {
        let inner = self;
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, socket.recv()).await {
            Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<FromDrone>(&t) {
                Ok(FromDrone::Hello(h)) => h,
                _ => {
                    close(&mut socket, 1002, "the first message must be a hello").await;
                    return;
                }
            },
            _ => return,
        };
        let admitted = match inner.admit(&hello, true).await {
            Ok(x) => x,
            Err(e) => {
                let code = if e.is_transient() {
                    tracing::warn!(drone = %hello.drone, error = %e, "cannot admit the drone now; it will retry");
                    CLOSE_TRY_AGAIN
                } else {
                    tracing::warn!(drone = %hello.drone, error = %e, "drone refused");
                    CLOSE_REFUSED
                };
                close(&mut socket, code, &e.to_string()).await;
                return;
            }
        };
        let Admitted {
            mut commands,
            status,
            session,
            lease,
        } = admitted;
        let Some(lease) = lease else { return };
        let ttl = inner.config.lease_ttl;
        let welcome = ToDrone::Welcome {
            lease_ttl_ms: ttl.as_millis() as u64,
            heartbeat_interval_ms: (ttl / 5).as_millis().max(50) as u64,
        };
        if socket.send(encode(&welcome)).await.is_err() {
            inner.drones.remove_session(&hello.drone, session);
            return;
        }
        let mut holds = inner.maintenance.subscribe();
        // Its record as placement on every instance sees it; rewritten when its health changes.
        let mut record = inner.drone_record(&hello, Some(lease), hello.unhealthy.clone());
        let mut next_id: u64 = 0;
        let mut unacked: BTreeMap<u64, SchedulerMessage> = BTreeMap::new();
        // A message read while gathering events, handled next.
        let mut held: Option<Option<Result<Message, axum::Error>>> = None;
        let reason = loop {
            tokio::select! {
                _ = inner.cancel.cancelled() => break "scheduler shutting down",
                hold = holds.recv() => {
                    if let Ok(window) = hold {
                        let m = ToDrone::Hold { for_ms: window.as_millis() as u64 };
                        let sent = socket.send(encode(&m)).await.is_ok();
                        inner.maintenance.delivered();
                        if !sent {
                            break "send failed";
                        }
                    }
                }
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { break "replaced by a newer session" };
                    next_id += 1;
                    unacked.insert(next_id, cmd.clone());
                    if socket.send(encode(&ToDrone::Command { id: next_id, message: cmd })).await.is_err() {
                        break "send failed";
                    }
                }
                msg = next_message(&mut held, &mut socket) => {
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
                            if unhealthy != record.unhealthy {
                                let mut next = record.clone();
                                next.unhealthy = unhealthy.clone();
                                let value = serde_json::to_vec(&next).unwrap_or_default();
                                match inner.store.put(&drone_key(&hello.drone), value, Some(lease)).await {
                                    Ok(_) => record = next,
                                    Err(e) => tracing::warn!(drone = %hello.drone, error = %e, "cannot record the drone's health; retrying at its next heartbeat"),
                                }
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
                            // Acknowledged only once applied: an event that could not be written
                            // stays with the drone, which sends it again on its next session.
                            let batch = gather_events(&mut socket, (seq, backend, event), &mut held);
                            if let Err(reason) = inner.apply_batch(&hello, &mut socket, batch).await {
                                break reason;
                            }
                        }
                        FromDrone::Stats { usage } => {
                            inner.hot.observe_usage(&hello.drone, &usage);
                        }
                        FromDrone::Logs { request, data } => {
                            inner.logs.deliver(&hello.drone, session, request, data);
                        }
                        FromDrone::LogsEnd { request, error } => {
                            inner.logs.end(&hello.drone, session, request, error);
                        }
                    }
                }
            }
        };
        // The lease is left to expire (unless the scheduler is the one stopping): a drone that
        // reconnects within the TTL loses nothing.
        inner.drones.remove_session(&hello.drone, session);
        inner.logs.session_ended(&hello.drone, session);
        if !unacked.is_empty() {
            tracing::debug!(drone = %hello.drone, unacked = unacked.len(), "session ended with unacknowledged commands; they are re-sent on readmission");
        }
        tracing::info!(drone = %hello.drone, run_id = %hello.run_id, reason, "drone session ended");
    }

    /// Follows drone records: when one vanishes (its lease expired) and no newer run replaced it,
    /// the drone is lost and its backends are closed. The reconciler recovers anything missed
    /// (for example while the scheduler was down).
    /// Leader only: `backends` is the term's fenced view.
    pub(crate) async fn watch_drones(&self, backends: Backends, cancel: CancellationToken) {
        let inner = self;
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
                // Leases that expire together are handled together.
                let mut batch = vec![ev];
                while let Ok(more) = events.try_recv() {
                    batch.push(more);
                }
                // A newer run may already have re-registered under the same name: asked for
                // every drone at once (each a round trip on etcd).
                let mut checks = futures_util::stream::FuturesUnordered::new();
                for ev in batch {
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
                    let store = inner.store.clone();
                    checks.push(async move {
                        match store.get(&key).await {
                            Ok(Some(_)) => None,
                            _ => Some((rec.name, rec.run_id)),
                        }
                    });
                }
                let mut runs = Vec::new();
                while let Some(checked) = checks.next().await {
                    runs.extend(checked);
                }
                metrics::counter!(crate::metrics::LEASE_EXPIRIES_TOTAL)
                    .increment(runs.len() as u64);
                if runs.is_empty() {
                    continue;
                }
                if let Err(e) = inner.lose_runs(&runs, &backends).await {
                    tracing::error!(drones = runs.len(), error = %e, "cannot close lost drones' backends");
                }
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
            host: None,
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
}
