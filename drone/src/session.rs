//! The drone's side of the session with the scheduler: connects over a WebSocket, says
//! `Hello` with what it runs, renews its lease with heartbeats, forwards commands to the
//! [`Agent`] and its events back, and reconnects with backoff, resending unacknowledged events.
//!
//! With several scheduler instances (`--scheduler a,b,c`) the drone tries them in turn and stays
//! with the first that admits it: any instance keeps its lease and relays the commands the
//! leader writes into the records, so the drone moves only when its instance goes.
//!
//! Log requests ride the session too: the answers to a request are sent only on the connection
//! that carried it, and a lost connection cancels its requests (the scheduler has ended them).
//!
//! Self-fencing ([`crate::fence`]): if the drone cannot renew its lease within three quarters
//! of the lease TTL (measured on its own monotonic clock from the send time of the last
//! heartbeat the scheduler acknowledged), it kills its own backends before the scheduler may
//! declare it lost and start the same keys elsewhere: a key never has two live backends.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hangar_core::BackendId;
use hangar_core::drone::{
    BackendEvent, Capacity, DroneMessage, FromDrone, Hello, InventoryItem, SchedulerMessage,
    ToDrone,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::agent::{Agent, AgentConfig};
use super::fence::Fence;
use super::runtime::Runtime;
use super::watchdog::{Watchdog, WatchdogConfig};

/// 1 while the drone has a session with the scheduler.
pub const SESSION_CONNECTED: &str = "hangar_agent_session_connected";
/// Sessions established with the scheduler (the first, then every reconnect).
pub const SESSION_CONNECTS_TOTAL: &str = "hangar_agent_session_connects_total";

/// Describes the session's metrics to the installed recorder.
pub fn describe() {
    metrics::describe_gauge!(
        SESSION_CONNECTED,
        "1 while the drone has a session with its scheduler, else 0."
    );
    metrics::describe_counter!(
        SESSION_CONNECTS_TOTAL,
        "Sessions the drone established with its scheduler (the first and every reconnect)."
    );
    super::usage::describe();
}

/// Longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A connection attempt (TCP, upgrade, hello, welcome) longer than this is abandoned.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The lease TTL assumed before the scheduler has said (for fencing before the first welcome).
const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// How long a runtime health check may take before the runtime counts as unhealthy.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the runtime's health is checked (heartbeats carry the latest result).
const HEALTH_EVERY: Duration = Duration::from_secs(2);

/// A drone's identity and what it offers.
#[derive(Clone, Debug)]
pub struct DroneSessionConfig {
    /// `http://host:port` of the scheduler's API; several, comma-separated, for a control
    /// plane of several instances (the drone tries the next one when one fails).
    pub scheduler_url: String,
    pub name: String,
    pub secret: String,
    pub pool: String,
    pub capacity: Capacity,
    pub agent: AgentConfig,
    /// How often the backends' CPU and memory use is read and reported.
    pub usage_interval: Duration,
    /// This host's identity, sent in the hello (see `Hello::host`).
    pub host: Option<String>,
    /// The fence watchdog process to start (`None`: the agent fences alone).
    pub watchdog: Option<WatchdogConfig>,
    /// The TLS client settings (trusted roots) for `https://` scheduler URLs; `None` uses the
    /// system's roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Why the drone stopped.
#[derive(Debug, thiserror::Error)]
pub enum DroneSessionError {
    #[error("the scheduler refused this drone: {0}")]
    Refused(String),
    #[error("invalid scheduler url {url:?}: {detail}")]
    BadUrl { url: String, detail: String },
}

/// Why one connection attempt failed.
enum Attempt {
    /// Retry with backoff.
    Retry(String),
    /// Give up: the scheduler will never accept this drone as configured.
    Fatal(String),
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A fresh agent run id.
pub fn new_run_id() -> String {
    format!("run-{}", BackendId::generate())
}

/// The drone: its agent and its session with the scheduler.
pub struct DroneSession {
    config: DroneSessionConfig,
    runtime: Arc<dyn Runtime>,
    run_id: String,
}

async fn health(runtime: &dyn Runtime) -> Option<String> {
    match tokio::time::timeout(HEALTH_TIMEOUT, runtime.health()).await {
        Ok(Ok(())) => None,
        Ok(Err(why)) => Some(why),
        Err(_) => Some(format!(
            "the {} runtime did not answer a health check within {HEALTH_TIMEOUT:?}",
            runtime.name()
        )),
    }
}

impl DroneSession {
    /// A drone run; `run_id` must be new for every agent process (see [`new_run_id`]).
    pub fn new(config: DroneSessionConfig, runtime: Arc<dyn Runtime>, run_id: String) -> Self {
        DroneSession {
            config,
            runtime,
            run_id,
        }
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The session endpoint of every scheduler instance given.
    fn ws_urls(&self) -> Result<Vec<String>, DroneSessionError> {
        self.config
            .scheduler_url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                session_url(u).ok_or_else(|| DroneSessionError::BadUrl {
                    url: u.trim_end_matches('/').to_string(),
                    detail: "it must start with http:// or https://".into(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|v| {
                if v.is_empty() {
                    Err(DroneSessionError::BadUrl {
                        url: self.config.scheduler_url.clone(),
                        detail: "no scheduler URL given".into(),
                    })
                } else {
                    Ok(v)
                }
            })
    }

    /// Runs until `cancel` fires (then stops the agent; backends keep running for the next
    /// agent run to re-adopt, unless the agent is configured to stop them) or the scheduler
    /// refuses the drone.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), DroneSessionError> {
        let urls = self.ws_urls()?;
        // Which instance to try next: the one that worked last, else the next in turn.
        let mut at = 0usize;
        let adopted = match self.runtime.adopt().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list backends to re-adopt");
                Vec::new()
            }
        };
        let mut inventory: BTreeMap<BackendId, SocketAddr> = adopted
            .iter()
            .map(|s| (s.backend.clone(), s.address))
            .collect();
        if !inventory.is_empty() {
            tracing::info!(
                count = inventory.len(),
                "found running backends to re-adopt"
            );
        }
        // The fence covers adopted backends from the start: if no scheduler welcomes this run
        // within the fence deadline, they are stopped.
        let mut fence = Fence::new(DEFAULT_TTL);
        if let Some(config) = &self.config.watchdog {
            match Watchdog::start(config) {
                Ok(w) => fence = fence.with_watchdog(Arc::new(w)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the fence watchdog: a stalled agent could not fence its backends")
                }
            }
        }
        for a in &adopted {
            fence.running(&a.backend, self.runtime.fence_target(&a.backend));
        }
        let agent =
            Agent::new(self.runtime.clone(), self.config.agent.clone()).with_adopted(adopted);
        let (cmd_tx, cmd_rx) = mpsc::channel::<SchedulerMessage>(1024);
        let (ev_tx, mut ev_rx) = mpsc::channel::<DroneMessage>(1024);
        let tasks = TaskTracker::new();
        let agent_cancel = CancellationToken::new();
        {
            let c = agent_cancel.clone();
            tasks.spawn(agent.run(cmd_rx, ev_tx, c));
        }
        tasks.spawn(fence.clone().run(cmd_tx.clone(), agent_cancel.clone()));
        // The runtime's health, checked in the background so that a slow check never holds
        // up a heartbeat.
        let (health_tx, health_rx) = tokio::sync::watch::channel(None);
        {
            let runtime = self.runtime.clone();
            let c = agent_cancel.clone();
            tasks.spawn(async move {
                loop {
                    let _ = health_tx.send(health(runtime.as_ref()).await);
                    tokio::select! {
                        _ = c.cancelled() => return,
                        _ = tokio::time::sleep(HEALTH_EVERY) => {}
                    }
                }
            });
        }
        // Usage reports: one pending at most; a newer one replaces what the session could not
        // send (they are cumulative or current figures, never deltas).
        let (usage_tx, mut usage_rx) = mpsc::channel::<Vec<hangar_core::drone::BackendUsage>>(1);
        {
            let collector =
                super::usage::UsageCollector::new(self.runtime.clone(), self.config.usage_interval);
            tasks.spawn(collector.run(usage_tx, agent_cancel.clone()));
        }
        tasks.close();
        let connected_gauge = metrics::gauge!(SESSION_CONNECTED);

        let mut ws: Option<Ws> = None;
        let mut seq: u64 = 0;
        let mut unacked: BTreeMap<u64, (BackendId, BackendEvent)> = BTreeMap::new();
        let mut backoff = BACKOFF_MIN;
        let mut next_attempt = Instant::now();
        let mut ttl = DEFAULT_TTL;
        let mut heartbeat_every = ttl / 5;
        let mut heartbeat_due = Instant::now();
        // Send times of heartbeats not yet acknowledged; the lease was renewed no earlier than
        // the send time of the one acknowledged last.
        let mut in_flight: VecDeque<Instant> = VecDeque::new();
        // The log requests the current connection carried and the agent still answers.
        let mut log_requests: HashSet<u64> = HashSet::new();
        let result = loop {
            if ws.is_none() && !log_requests.is_empty() {
                // Their readers are gone with the connection.
                for request in log_requests.drain() {
                    if cmd_tx
                        .send(SchedulerMessage::CancelLogs { request })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            if ws.is_none() && Instant::now() >= next_attempt {
                // The hello is sent after this: its admission granted a lease no earlier.
                let attempt_at = Instant::now();
                let url = &urls[at % urls.len()];
                match self.connect(url, &inventory, CONNECT_TIMEOUT).await {
                    Ok((mut socket, lease_ttl, hb)) => {
                        metrics::counter!(SESSION_CONNECTS_TOTAL).increment(1);
                        ttl = lease_ttl;
                        heartbeat_every = hb;
                        backoff = BACKOFF_MIN;
                        fence.renewed(attempt_at, ttl);
                        in_flight.clear();
                        heartbeat_due = Instant::now() + heartbeat_every;
                        tracing::info!(scheduler = %url, run_id = %self.run_id, resend = unacked.len(), "connected to the scheduler");
                        if resend(&mut socket, &unacked).await {
                            ws = Some(socket);
                        }
                    }
                    Err(Attempt::Fatal(why)) => break Err(DroneSessionError::Refused(why)),
                    Err(Attempt::Retry(why)) => {
                        tracing::warn!(scheduler = %url, error = %why, retry_in = ?backoff, "cannot reach the scheduler");
                        at += 1;
                        next_attempt = Instant::now() + backoff;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            let connected = ws.is_some();
            connected_gauge.set(if connected { 1.0 } else { 0.0 });
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                ev = ev_rx.recv() => {
                    let (backend, mut event) = match ev {
                        None => break Ok(()),
                        Some(DroneMessage::Event { backend, event }) => (backend, event),
                        Some(DroneMessage::Logs { request, data }) => {
                            if log_requests.contains(&request)
                                && let Some(socket) = ws.as_mut()
                                && send(socket, &FromDrone::Logs { request, data }).await.is_err()
                            {
                                ws = None;
                                next_attempt = Instant::now();
                            }
                            continue;
                        }
                        Some(DroneMessage::LogsEnd { request, error }) => {
                            if log_requests.remove(&request)
                                && let Some(socket) = ws.as_mut()
                                && send(socket, &FromDrone::LogsEnd { request, error }).await.is_err()
                            {
                                ws = None;
                                next_attempt = Instant::now();
                            }
                            continue;
                        }
                    };
                    match &event {
                        BackendEvent::Starting => fence.running(&backend, None),
                        BackendEvent::Waiting { address } | BackendEvent::Ready { address } => {
                            fence.running(&backend, self.runtime.fence_target(&backend));
                            inventory.insert(backend.clone(), *address);
                        }
                        BackendEvent::Exited { exit_code } => {
                            inventory.remove(&backend);
                            if fence.gone(&backend) {
                                event = BackendEvent::Fenced { exit_code: *exit_code };
                            }
                        }
                        BackendEvent::SpawnFailed { .. } | BackendEvent::Fenced { .. } => {
                            inventory.remove(&backend);
                            fence.gone(&backend);
                        }
                        BackendEvent::StartupTimeout => {}
                    }
                    seq += 1;
                    unacked.insert(seq, (backend.clone(), event.clone()));
                    if let Some(socket) = ws.as_mut()
                        && send(socket, &FromDrone::Event { seq, backend, event }).await.is_err()
                    {
                        ws = None;
                        next_attempt = Instant::now();
                    }
                }
                _ = tokio::time::sleep_until(heartbeat_due), if connected => {
                    heartbeat_due = Instant::now() + heartbeat_every;
                    let unhealthy = health_rx.borrow().clone();
                    in_flight.push_back(Instant::now());
                    if let Some(socket) = ws.as_mut()
                        && send(socket, &FromDrone::Heartbeat { unhealthy }).await.is_err()
                    {
                        ws = None;
                        next_attempt = Instant::now();
                    }
                }
                msg = next_message(&mut ws), if connected => {
                    match msg {
                        Some(ToDrone::HeartbeatAck) => {
                            if let Some(sent) = in_flight.pop_front() {
                                fence.renewed(sent, ttl);
                            }
                        }
                        Some(ToDrone::Command { id, message }) => {
                            // Past the fence deadline the scheduler may free this drone's keys
                            // at any moment: nothing new starts here. (A spawn the scheduler
                            // still wants is sent again when the run is admitted again.)
                            match &message {
                                SchedulerMessage::Logs(r) => {
                                    log_requests.insert(r.request);
                                }
                                SchedulerMessage::CancelLogs { request } => {
                                    log_requests.remove(request);
                                }
                                _ => {}
                            }
                            if matches!(message, SchedulerMessage::Spawn(_)) && fence.expired() {
                                tracing::warn!("refusing a spawn: the lease was not renewed in time (self-fenced)");
                            } else if cmd_tx.send(message).await.is_err() {
                                break Ok(());
                            }
                            if let Some(socket) = ws.as_mut()
                                && send(socket, &FromDrone::Ack { id }).await.is_err()
                            {
                                ws = None;
                                next_attempt = Instant::now();
                            }
                        }
                        Some(ToDrone::EventAck { seq }) => {
                            unacked = unacked.split_off(&(seq + 1));
                        }
                        Some(ToDrone::Welcome { .. }) => {}
                        Some(ToDrone::Hold { for_ms }) => {
                            fence.hold(Instant::now() + Duration::from_millis(for_ms));
                        }
                        None => {
                            tracing::warn!("lost the scheduler session; reconnecting");
                            ws = None;
                            next_attempt = Instant::now();
                        }
                    }
                }
                Some(usage) = usage_rx.recv(), if connected => {
                    if let Some(socket) = ws.as_mut()
                        && send(socket, &FromDrone::Stats { usage }).await.is_err()
                    {
                        ws = None;
                        next_attempt = Instant::now();
                    }
                }
                _ = tokio::time::sleep_until(next_attempt), if !connected => {}
            }
        };
        if let Some(mut socket) = ws.take() {
            let _ = socket.close(None).await;
        }
        agent_cancel.cancel();
        drop(cmd_tx);
        tasks.wait().await;
        result
    }

    /// One connection attempt (upgrade, hello, welcome), abandoned after `limit`.
    async fn connect(
        &self,
        url: &str,
        inventory: &BTreeMap<BackendId, SocketAddr>,
        limit: Duration,
    ) -> Result<(Ws, Duration, Duration), Attempt> {
        let mut req = url
            .into_client_request()
            .map_err(|e| Attempt::Fatal(format!("invalid scheduler url {url}: {e}")))?;
        let auth = format!("Bearer {}", self.config.secret)
            .parse()
            .map_err(|_| {
                Attempt::Fatal("the drone secret has characters a header cannot carry".into())
            })?;
        req.headers_mut().insert("authorization", auth);
        let attempt = async {
            let connector = self
                .config
                .tls
                .clone()
                .map(tokio_tungstenite::Connector::Rustls);
            // Scheduler messages are small, and the read buffer is zeroed to its full size on
            // every read (tungstenite's default is 128 KiB); it grows for a larger message.
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .read_buffer_size(8 * 1024);
            let (mut socket, _) = match tokio_tungstenite::connect_async_tls_with_config(
                req,
                Some(config),
                false,
                connector,
            )
            .await
            {
                Ok(x) => x,
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                    let status = resp.status();
                    let body = resp
                        .body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    let msg = serde_json::from_str::<hangar_core::api::ErrorBody>(&body)
                        .map(|e| e.error.message)
                        .unwrap_or(body);
                    return Err(if status == 401 || status == 403 {
                        Attempt::Fatal(msg)
                    } else {
                        Attempt::Retry(format!("{status}: {msg}"))
                    });
                }
                Err(e) => return Err(Attempt::Retry(e.to_string())),
            };
            let hello = Hello {
                drone: self.config.name.clone(),
                run_id: self.run_id.clone(),
                capacity: self.config.capacity,
                pool: self.config.pool.clone(),
                runtime: self.runtime.name().to_string(),
                inventory: inventory
                    .iter()
                    .map(|(b, a)| InventoryItem {
                        backend: b.clone(),
                        address: *a,
                        run_id: None,
                    })
                    .collect(),
                unhealthy: health(self.runtime.as_ref()).await,
                host: self.config.host.clone(),
            };
            send(&mut socket, &FromDrone::Hello(hello))
                .await
                .map_err(|e| Attempt::Retry(e.to_string()))?;
            loop {
                match socket.next().await {
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<ToDrone>(&t) {
                        Ok(ToDrone::Welcome {
                            lease_ttl_ms,
                            heartbeat_interval_ms,
                        }) => {
                            return Ok((
                                socket,
                                Duration::from_millis(lease_ttl_ms),
                                Duration::from_millis(heartbeat_interval_ms.max(10)),
                            ));
                        }
                        _ => return Err(Attempt::Retry("expected a welcome".into())),
                    },
                    Some(Ok(Message::Close(frame))) => {
                        let (code, why) = frame
                            .map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new()));
                        return Err(closed_before_welcome(code, why));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(Attempt::Retry(e.to_string())),
                    None => {
                        return Err(Attempt::Retry("the scheduler closed the connection".into()));
                    }
                }
            }
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Attempt::Retry(format!("no answer within {limit:?}"))),
        }
    }
}

/// The session endpoint (`ws[s]://host:port/v1/drones/connect`) of a scheduler's API URL
/// (`http[s]://host:port`, a trailing `/` ignored); `None` for another scheme.
fn session_url(api_url: &str) -> Option<String> {
    let base = api_url.trim().trim_end_matches('/');
    let rest = base
        .strip_prefix("http://")
        .map(|r| format!("ws://{r}"))
        .or_else(|| base.strip_prefix("https://").map(|r| format!("wss://{r}")))?;
    Some(format!("{rest}/v1/drones/connect"))
}

/// Sends the events not acknowledged yet on a new session; false if the socket failed.
async fn resend(socket: &mut Ws, unacked: &BTreeMap<u64, (BackendId, BackendEvent)>) -> bool {
    for (seq, (backend, event)) in unacked {
        let m = FromDrone::Event {
            seq: *seq,
            backend: backend.clone(),
            event: event.clone(),
        };
        if send(socket, &m).await.is_err() {
            return false;
        }
    }
    true
}

/// What a close before `Welcome` means: only a refusal is final; anything else (the
/// scheduler could not admit the drone right now, or closed for a reason it did not say) is
/// retried with backoff.
fn closed_before_welcome(code: u16, why: String) -> Attempt {
    if code == hangar_core::drone::CLOSE_REFUSED {
        Attempt::Fatal(format!("the scheduler refused the session: {why}"))
    } else {
        Attempt::Retry(format!(
            "the scheduler closed the session (code {code}): {why}"
        ))
    }
}

async fn send(socket: &mut Ws, m: &FromDrone) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let text = serde_json::to_string(m).unwrap_or_default();
    socket.send(Message::text(text)).await
}

/// The next scheduler message; `None` when the connection is gone.
async fn next_message(ws: &mut Option<Ws>) -> Option<ToDrone> {
    let socket = ws.as_mut()?;
    loop {
        match socket.next().await? {
            Ok(Message::Text(t)) => match serde_json::from_str::<ToDrone>(&t) {
                Ok(m) => return Some(m),
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed scheduler message"),
            },
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_scheduler_urls_are_tried_in_turn() {
        let config = |url: &str| DroneSessionConfig {
            scheduler_url: url.into(),
            name: "d1".into(),
            secret: "s".into(),
            pool: "default".into(),
            capacity: Capacity::default(),
            agent: AgentConfig::default(),
            usage_interval: Duration::from_secs(5),
            host: None,
            watchdog: None,
            tls: None,
        };
        let runtime: Arc<dyn Runtime> = Arc::new(crate::runtime::process::ProcessRuntime::new(
            crate::runtime::process::ProcessRuntimeConfig::default(),
        ));
        let s = DroneSession::new(
            config("http://a:1, https://b:2/ ,http://c:3"),
            runtime.clone(),
            "r".into(),
        );
        assert_eq!(
            s.ws_urls().unwrap(),
            vec![
                "ws://a:1/v1/drones/connect",
                "wss://b:2/v1/drones/connect",
                "ws://c:3/v1/drones/connect"
            ]
        );
        let bad = DroneSession::new(config("http://a:1,ftp://b"), runtime, "r".into());
        assert!(bad.ws_urls().is_err());
    }

    #[test]
    fn a_leader_url_maps_to_its_session_endpoint() {
        assert_eq!(
            session_url("http://127.0.0.1:7070/").as_deref(),
            Some("ws://127.0.0.1:7070/v1/drones/connect")
        );
        assert_eq!(
            session_url(" https://a:1").as_deref(),
            Some("wss://a:1/v1/drones/connect")
        );
        assert_eq!(session_url("ftp://a"), None);
    }

    #[test]
    fn only_a_refusal_before_welcome_is_final() {
        let refused = closed_before_welcome(hangar_core::drone::CLOSE_REFUSED, "bad name".into());
        assert!(matches!(refused, Attempt::Fatal(ref m) if m.contains("bad name")));
        for code in [hangar_core::drone::CLOSE_TRY_AGAIN, 1000, 1005, 1011] {
            let again = closed_before_welcome(code, "store unavailable".into());
            assert!(
                matches!(again, Attempt::Retry(ref m) if m.contains("store unavailable")),
                "code {code}"
            );
        }
    }
}
