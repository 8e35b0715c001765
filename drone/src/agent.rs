//! The drone agent: turns scheduler commands into runtime calls and runtime happenings into
//! backend events.
//!
//! Each backend has one task that owns its whole life on this drone: it starts the backend,
//! probes it until ready, watches its exit and reports every event. Because only that task
//! reports for its backend, events for one backend are always in order. Terminate commands are
//! forwarded to the backend's task rather than acted on directly, so that a terminate that
//! arrives while the backend is still starting is not lost.
//!
//! Log requests run on tasks of their own: each reads the backend's output through the
//! runtime and sends it back as `Logs` chunks and one `LogsEnd`, until it is done, cancelled
//! (`CancelLogs`) or the agent shuts down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hangar_core::BackendId;
use hangar_core::drone::{BackendEvent, DroneMessage, LogsRequest, SchedulerMessage, SpawnCommand};
use http_body_util::Empty;
use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::runtime::{ExitWatch, Runtime, RuntimeError, Started};

/// How long a re-adopted backend may take to answer its readiness probe (its own startup
/// timeout is not known to a new agent run).
const ADOPTED_STARTUP: Duration = Duration::from_secs(60);

/// Upper bound on the grace given to backends when the agent shuts down, so that shutting
/// down never takes long however generous `stop_grace` is.
const SHUTDOWN_GRACE_CAP: Duration = Duration::from_secs(5);

/// Upper bound on one readiness probe request, so that a backend that accepts connections but
/// never answers does not stall probing past a retry.
const PROBE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Configuration of an [`Agent`].
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The path probed for readiness (`GET`); any status below 500 means ready.
    pub probe_path: String,
    /// Delay between the first readiness probes; doubles after each failure... A backend
    /// usually answers a few milliseconds after its process or container starts, so a coarse
    /// first interval would add most of its length to every spawn.
    pub probe_interval: Duration,
    /// ...up to this.
    pub probe_interval_max: Duration,
    /// Time between `SIGTERM` and `SIGKILL` for a non-hard terminate.
    pub stop_grace: Duration,
    /// Whether the agent stops its backends when it shuts down (with `stop_grace`, capped at
    /// 5 s). Otherwise they are left to the runtime (process children die with the agent
    /// process anyway; containers would be re-adopted).
    pub stop_backends_on_shutdown: bool,
    /// What this drone agrees to run beyond its default backend.
    pub spawn_policy: crate::policy::SpawnPolicy,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            probe_path: "/".to_string(),
            probe_interval: Duration::from_millis(2),
            probe_interval_max: Duration::from_millis(50),
            stop_grace: Duration::from_secs(10),
            stop_backends_on_shutdown: true,
            spawn_policy: crate::policy::SpawnPolicy::default(),
        }
    }
}

type ProbeClient = Client<HttpConnector, Empty<Bytes>>;

/// What the agent's command loop knows of a backend: how to reach its task.
struct Entry {
    /// Stop requests (the grace to use) for the backend's task.
    stops: mpsc::UnboundedSender<Duration>,
}

type Registry = Arc<Mutex<HashMap<BackendId, Entry>>>;

/// The drone agent. See the module docs.
pub struct Agent {
    runtime: Arc<dyn Runtime>,
    config: Arc<AgentConfig>,
    probe: ProbeClient,
    /// Backends already adopted by the caller (who needed them for its `Hello`); when set, the
    /// agent watches these instead of asking the runtime again.
    adopted: Option<Vec<Started>>,
}

impl Agent {
    pub fn new(runtime: Arc<dyn Runtime>, mut config: AgentConfig) -> Self {
        if !config.probe_path.starts_with('/') {
            config.probe_path.insert(0, '/');
        }
        if format!("http://127.0.0.1:1{}", config.probe_path)
            .parse::<Uri>()
            .is_err()
        {
            tracing::warn!(probe_path = %config.probe_path, "invalid readiness probe path; probing / instead");
            config.probe_path = "/".to_string();
        }
        config.probe_interval = config.probe_interval.max(Duration::from_millis(1));
        config.probe_interval_max = config.probe_interval_max.max(config.probe_interval);
        // No pooling: a probe connection is used once, and an idle pooled connection would
        // only keep a backend's socket open for nothing.
        let probe = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
        Agent {
            runtime,
            config: Arc::new(config),
            probe,
            adopted: None,
        }
    }

    /// Watches these already-adopted backends instead of calling [`Runtime::adopt`] at start.
    pub fn with_adopted(mut self, adopted: Vec<Started>) -> Self {
        self.adopted = Some(adopted);
        self
    }

    /// Serves scheduler commands until `cancel` fires or `commands` closes, then shuts down:
    /// stops backends if configured to, and returns once every task it started has ended.
    ///
    /// Backends the runtime re-adopts (see [`Runtime::adopt`]) are watched like the others;
    /// nothing is reported for them until they exit.
    pub async fn run(
        self,
        mut commands: mpsc::Receiver<SchedulerMessage>,
        events: mpsc::Sender<DroneMessage>,
        cancel: CancellationToken,
    ) {
        let shutdown = cancel.child_token();
        let ctx = Context {
            runtime: self.runtime,
            config: self.config,
            probe: self.probe,
            events,
            registry: Arc::new(Mutex::new(HashMap::new())),
            ended: Arc::default(),
            log_requests: Arc::default(),
            log_serial: Arc::default(),
            tracker: TaskTracker::new(),
            shutdown: shutdown.clone(),
        };
        tracing::info!(runtime = ctx.runtime.name(), "drone agent running");
        ctx.adopt_existing(self.adopted).await;

        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => break,
                message = commands.recv() => message,
            };
            match message {
                Some(SchedulerMessage::Spawn(cmd)) => ctx.spawn(cmd),
                Some(SchedulerMessage::Terminate { backend, hard }) => {
                    ctx.terminate(backend, hard).await;
                }
                Some(SchedulerMessage::Logs(request)) => ctx.logs(request),
                Some(SchedulerMessage::CancelLogs { request }) => ctx.cancel_logs(request),
                None => break,
            }
        }

        // Also reached when the scheduler hung up: backend tasks learn of the shutdown here.
        shutdown.cancel();
        ctx.tracker.close();
        ctx.tracker.wait().await;
        tracing::info!("drone agent stopped");
    }
}

/// Everything the agent's tasks share.
#[derive(Clone)]
struct Context {
    runtime: Arc<dyn Runtime>,
    config: Arc<AgentConfig>,
    probe: ProbeClient,
    events: mpsc::Sender<DroneMessage>,
    registry: Registry,
    /// Backends that ended in this agent run: a spawn of one of them (the scheduler re-sends
    /// spawns it is unsure of after a reconnect) is ignored instead of starting it again.
    ended: Arc<Mutex<Ended>>,
    /// The log requests being answered, by id: cancelling the token ends one. The serial
    /// tells a request from a later one under the same id.
    log_requests: Arc<Mutex<HashMap<u64, (u64, CancellationToken)>>>,
    log_serial: Arc<std::sync::atomic::AtomicU64>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// The most recently ended backends, bounded.
#[derive(Default)]
struct Ended {
    order: std::collections::VecDeque<BackendId>,
    set: std::collections::HashSet<BackendId>,
}

/// Ended backends remembered per agent run (a re-sent spawn follows a reconnect by seconds).
const ENDED_KEPT: usize = 65_536;

impl Ended {
    fn insert(&mut self, backend: BackendId) {
        if self.set.insert(backend.clone()) {
            self.order.push_back(backend);
            if self.order.len() > ENDED_KEPT
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
}

impl Context {
    /// Registers a backend and starts its task, unless it is already known.
    fn register(&self, backend: &BackendId) -> Option<BackendTask> {
        let (stops_tx, stops_rx) = mpsc::unbounded_channel();
        let mut registry = lock(&self.registry);
        if registry.contains_key(backend) {
            return None;
        }
        registry.insert(backend.clone(), Entry { stops: stops_tx });
        Some(BackendTask {
            ctx: self.clone(),
            backend: backend.clone(),
            stops: stops_rx,
            shutdown_seen: false,
        })
    }

    async fn adopt_existing(&self, given: Option<Vec<Started>>) {
        let adopted = match given {
            Some(adopted) => adopted,
            None => match self.runtime.adopt().await {
                Ok(adopted) => adopted,
                Err(error) => {
                    tracing::warn!(%error, "cannot re-adopt running backends");
                    return;
                }
            },
        };
        if !adopted.is_empty() {
            tracing::info!(count = adopted.len(), "re-adopted running backends");
        }
        for started in adopted {
            if let Some(task) = self.register(&started.backend) {
                self.tracker.spawn(task.adopted(started));
            }
        }
    }

    /// Handles `Spawn`: idempotent, since the scheduler may resend a spawn it is unsure of,
    /// also after the backend has ended (its exit is reported, never a second start).
    fn spawn(&self, cmd: SpawnCommand) {
        if lock(&self.ended).set.contains(&cmd.backend) {
            tracing::debug!(backend = %cmd.backend, "ignoring spawn of a backend that already ended");
            return;
        }
        match self.register(&cmd.backend) {
            Some(task) => {
                self.tracker.spawn(task.run(cmd));
            }
            None => tracing::debug!(backend = %cmd.backend, "ignoring spawn of a known backend"),
        }
    }

    /// Handles `Logs`: a task reads the backend's output through the runtime and sends it
    /// back, then ends the request (with the failure, if any). A cancelled request ends
    /// without a word: its reader is gone.
    fn logs(&self, request: LogsRequest) {
        let cancel = self.shutdown.child_token();
        let serial = self
            .log_serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = (serial, cancel.clone());
        if let Some((_, old)) = lock(&self.log_requests).insert(request.request, entry) {
            // The scheduler reused an id (a new session of its own): the old reader is gone.
            old.cancel();
        }
        let ctx = self.clone();
        self.tracker.spawn(async move {
            let id = request.request;
            let (tx, mut rx) = mpsc::channel::<String>(16);
            let read = ctx.runtime.logs(&request, tx, cancel.clone());
            let forward = async {
                while let Some(data) = rx.recv().await {
                    let message = DroneMessage::Logs { request: id, data };
                    if ctx.events.send(message).await.is_err() {
                        break;
                    }
                }
            };
            let (result, ()) = tokio::join!(read, forward);
            {
                let mut requests = lock(&ctx.log_requests);
                // Only this request's own entry (an id reused meanwhile has a new one).
                if requests.get(&id).is_some_and(|(s, _)| *s == serial) {
                    requests.remove(&id);
                }
            }
            if cancel.is_cancelled() {
                return;
            }
            let error = result.err().map(|e| {
                tracing::debug!(backend = %request.backend, error = %e, "log request failed");
                e.to_wire()
            });
            let _ = ctx
                .events
                .send(DroneMessage::LogsEnd { request: id, error })
                .await;
        });
    }

    /// Handles `CancelLogs`.
    fn cancel_logs(&self, request: u64) {
        if let Some((_, cancel)) = lock(&self.log_requests).remove(&request) {
            cancel.cancel();
        }
    }

    /// Handles `Terminate`: the backend's task does the stopping and reports the exit.
    async fn terminate(&self, backend: BackendId, hard: bool) {
        let grace = if hard {
            Duration::ZERO
        } else {
            self.config.stop_grace
        };
        let sent = lock(&self.registry)
            .get(&backend)
            .is_some_and(|entry| entry.stops.send(grace).is_ok());
        if !sent {
            // Nothing runs here under that id (any more): let the scheduler close its record.
            tracing::debug!(%backend, "terminate of an unknown backend");
            send_event(
                &self.events,
                &backend,
                BackendEvent::Exited { exit_code: None },
            )
            .await;
        }
    }
}

/// Locks a mutex, recovering from poisoning: no code path panics while holding these locks.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn send_event(events: &mpsc::Sender<DroneMessage>, backend: &BackendId, event: BackendEvent) {
    tracing::debug!(%backend, ?event, "backend event");
    let message = DroneMessage::Event {
        backend: backend.clone(),
        event,
    };
    if events.send(message).await.is_err() {
        tracing::debug!(%backend, "event receiver is gone; dropping event");
    }
}

/// How probing ended.
enum ProbeOutcome {
    Ready,
    TimedOut,
    /// A stop was requested (terminate or shutdown): readiness no longer matters.
    Stopping,
    /// The agent shuts down without stopping backends: stop watching.
    Abandon,
}

/// The task that owns one backend's life on this drone.
struct BackendTask {
    ctx: Context,
    backend: BackendId,
    stops: mpsc::UnboundedReceiver<Duration>,
    /// Whether the agent's shutdown has been handled already (it fires only once per task).
    shutdown_seen: bool,
}

impl BackendTask {
    async fn run(mut self, cmd: SpawnCommand) {
        self.report(BackendEvent::Starting).await;
        if let Err(message) = self.ctx.config.spawn_policy.check(&cmd) {
            tracing::warn!(backend = %self.backend, %message, "refusing a spawn");
            self.report(BackendEvent::SpawnFailed { message }).await;
            lock(&self.ctx.registry).remove(&self.backend);
            return;
        }
        // Not raced against shutdown: dropping a half-done start could leak the backend, and
        // starting returns quickly (it does not wait for readiness).
        let started = match self.ctx.runtime.start(&cmd).await {
            Ok(started) => started,
            Err(error) => {
                tracing::warn!(backend = %self.backend, %error, "cannot start backend");
                self.report(BackendEvent::SpawnFailed {
                    message: error.to_string(),
                })
                .await;
                // Nothing ran: a later spawn under this id may try again.
                lock(&self.ctx.registry).remove(&self.backend);
                return;
            }
        };
        let Started {
            address, mut exit, ..
        } = started;
        self.report(BackendEvent::Waiting { address }).await;

        let deadline = Instant::now() + Duration::from_millis(cmd.startup_timeout_ms);
        let Some(outcome) = self.until_ready(address, &mut exit, deadline).await else {
            return;
        };
        match outcome {
            ProbeOutcome::Ready => self.report(BackendEvent::Ready { address }).await,
            ProbeOutcome::TimedOut => {
                tracing::warn!(backend = %self.backend, timeout_ms = cmd.startup_timeout_ms, "backend did not become ready in time");
                self.report(BackendEvent::StartupTimeout).await;
                self.stop(Duration::ZERO);
            }
            ProbeOutcome::Stopping => {}
            ProbeOutcome::Abandon => {
                self.unregister();
                return;
            }
        }
        self.watch(exit).await;
    }

    /// Probes the backend at `address` until it is ready, `deadline` passes, a stop is asked
    /// for or the agent shuts down. `None` when the backend exited meanwhile (reported).
    async fn until_ready(
        &mut self,
        address: SocketAddr,
        exit: &mut ExitWatch,
        deadline: Instant,
    ) -> Option<ProbeOutcome> {
        let probe = probe_until_ready(
            self.ctx.probe.clone(),
            probe_uri(address, &self.ctx.config.probe_path),
            deadline,
            self.ctx.config.clone(),
        );
        tokio::pin!(probe);
        Some(tokio::select! {
            // Pending stops and exits win over a probe answer that arrives at once.
            biased;
            status = &mut *exit => {
                // Exited while starting (crashed, or failed to bind its port).
                self.report_exit(status.ok().and_then(|s| s.code)).await;
                return None;
            }
            Some(grace) = self.stops.recv() => {
                self.stop(grace);
                ProbeOutcome::Stopping
            }
            () = self.ctx.shutdown.cancelled() => {
                if self.on_shutdown() {
                    ProbeOutcome::Stopping
                } else {
                    ProbeOutcome::Abandon
                }
            }
            ready = &mut probe => {
                if ready { ProbeOutcome::Ready } else { ProbeOutcome::TimedOut }
            }
        })
    }

    /// A backend a previous agent run started: its record may still say it is starting
    /// (the old run never reported it ready), so it is probed like a new one and reported
    /// ready, then watched.
    async fn adopted(mut self, started: Started) {
        let Started {
            address, mut exit, ..
        } = started;
        let deadline = Instant::now() + ADOPTED_STARTUP;
        match self.until_ready(address, &mut exit, deadline).await {
            None => return,
            Some(ProbeOutcome::Ready) => self.report(BackendEvent::Ready { address }).await,
            Some(ProbeOutcome::TimedOut) => {
                tracing::warn!(backend = %self.backend, "re-adopted backend did not become ready in time");
                self.report(BackendEvent::StartupTimeout).await;
                self.stop(Duration::ZERO);
            }
            Some(ProbeOutcome::Stopping) => {}
            Some(ProbeOutcome::Abandon) => {
                self.unregister();
                return;
            }
        }
        self.watch(exit).await;
    }

    /// Waits for the backend to exit, handling stop requests and shutdown meanwhile, and
    /// reports the exit.
    async fn watch(mut self, mut exit: ExitWatch) {
        loop {
            tokio::select! {
                status = &mut exit => {
                    // A dropped sender means the runtime lost track of it: exit code unknown.
                    self.report_exit(status.ok().and_then(|s| s.code)).await;
                    return;
                }
                Some(grace) = self.stops.recv() => self.stop(grace),
                () = self.ctx.shutdown.cancelled(), if !self.shutdown_seen => {
                    if !self.on_shutdown() {
                        self.unregister();
                        return;
                    }
                }
            }
        }
    }

    /// Reacts to the agent shutting down; returns whether to keep watching the backend (it is
    /// being stopped) rather than leave it running.
    fn on_shutdown(&mut self) -> bool {
        self.shutdown_seen = true;
        if self.ctx.config.stop_backends_on_shutdown {
            self.stop(self.ctx.config.stop_grace.min(SHUTDOWN_GRACE_CAP));
            true
        } else {
            false
        }
    }

    /// Asks the runtime to stop the backend, in a task of its own: `stop` takes up to the
    /// grace period and this task must keep watching the exit meanwhile.
    fn stop(&self, grace: Duration) {
        let runtime = self.ctx.runtime.clone();
        let backend = self.backend.clone();
        self.ctx.tracker.spawn(async move {
            match runtime.stop(&backend, grace).await {
                // NotRunning: it exited in the meantime; the exit watch reports it.
                Ok(()) | Err(RuntimeError::NotRunning { .. }) => {}
                Err(error) => tracing::warn!(%backend, %error, "cannot stop backend"),
            }
        });
    }

    async fn report(&self, event: BackendEvent) {
        send_event(&self.ctx.events, &self.backend, event).await;
    }

    async fn report_exit(&self, exit_code: Option<i32>) {
        self.report(BackendEvent::Exited { exit_code }).await;
        self.unregister();
    }

    /// Forgets the backend. Done after the last event, so that a terminate racing with the exit
    /// either reaches this (finished) task or finds the backend unknown, never both.
    fn unregister(&self) {
        lock(&self.ctx.ended).insert(self.backend.clone());
        lock(&self.ctx.registry).remove(&self.backend);
    }
}

fn probe_uri(address: SocketAddr, path: &str) -> Option<Uri> {
    format!("http://{address}{path}").parse().ok()
}

/// Probes `uri` until it answers with a status below 500 (`true`) or `deadline` passes
/// (`false`). Always makes at least one attempt.
async fn probe_until_ready(
    client: ProbeClient,
    uri: Option<Uri>,
    deadline: Instant,
    config: Arc<AgentConfig>,
) -> bool {
    let Some(uri) = uri else {
        // Cannot happen with a path validated in `Agent::new`; without a URI, never ready.
        tokio::time::sleep_until(deadline).await;
        return false;
    };
    let mut interval = config.probe_interval;
    loop {
        let attempt_deadline = deadline.min(Instant::now() + PROBE_ATTEMPT_TIMEOUT);
        let attempt = tokio::time::timeout_at(attempt_deadline, client.get(uri.clone())).await;
        match attempt {
            Ok(Ok(response)) if response.status().as_u16() < 500 => return true,
            Ok(Ok(response)) => {
                tracing::trace!(%uri, status = %response.status(), "backend not ready");
            }
            Ok(Err(error)) => tracing::trace!(%uri, %error, "backend not ready"),
            Err(_) => tracing::trace!(%uri, "readiness probe timed out"),
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep_until(deadline.min(now + interval)).await;
        interval = (interval * 2).min(config.probe_interval_max);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hangar_core::api::Resources;
    use http_body_util::BodyExt;

    use super::*;
    use crate::runtime::process::{ProcessRuntime, ProcessRuntimeConfig};

    /// Generous bound on any single wait, so that a broken test fails rather than hangs.
    const WAIT: Duration = Duration::from_secs(15);

    struct Harness {
        commands: mpsc::Sender<SchedulerMessage>,
        events: mpsc::Receiver<DroneMessage>,
        cancel: CancellationToken,
        agent: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        fn new(config: AgentConfig) -> Self {
            Self::with_runtime(config, ProcessRuntimeConfig::default())
        }

        fn with_runtime(mut config: AgentConfig, runtime: ProcessRuntimeConfig) -> Self {
            // What these tests run, allowed as an operator would allow it.
            config
                .spawn_policy
                .commands
                .extend(["sh", "sleep", "/nonexistent/hangar-test-binary"].map(String::from));
            config.spawn_policy.images.push("*".into());
            let runtime = Arc::new(ProcessRuntime::new(runtime));
            let (commands, commands_rx) = mpsc::channel(16);
            let (events_tx, events) = mpsc::channel(64);
            let cancel = CancellationToken::new();
            let agent = tokio::spawn(Agent::new(runtime, config).run(
                commands_rx,
                events_tx,
                cancel.clone(),
            ));
            Harness {
                commands,
                events,
                cancel,
                agent,
            }
        }

        async fn send(&self, message: SchedulerMessage) {
            self.commands.send(message).await.unwrap();
        }

        async fn spawn(&self, cmd: &SpawnCommand) {
            self.send(SchedulerMessage::Spawn(cmd.clone())).await;
        }

        async fn terminate(&self, backend: &BackendId, hard: bool) {
            self.send(SchedulerMessage::Terminate {
                backend: backend.clone(),
                hard,
            })
            .await;
        }

        /// The next event, which must be for `backend`.
        async fn next(&mut self, backend: &BackendId) -> BackendEvent {
            let message = tokio::time::timeout(WAIT, self.events.recv())
                .await
                .expect("timed out waiting for a backend event")
                .expect("agent hung up");
            let DroneMessage::Event { backend: b, event } = message else {
                panic!("expected a backend event, got {message:?}");
            };
            assert_eq!(&b, backend, "event {event:?} for another backend");
            event
        }

        /// The text of log request `request` until `done` holds for it (events and other
        /// requests' messages are skipped), and how the request ended if it did.
        async fn logs_until(
            &mut self,
            request: u64,
            done: impl Fn(&str, bool) -> bool,
        ) -> (String, Option<Option<hangar_core::drone::LogsFailure>>) {
            let mut text = String::new();
            let mut end = None;
            while !done(&text, end.is_some()) {
                let message = tokio::time::timeout(WAIT, self.events.recv())
                    .await
                    .unwrap_or_else(|_| panic!("timed out waiting for logs; got {text:?}"))
                    .expect("agent hung up");
                match message {
                    DroneMessage::Logs { request: r, data } if r == request => text.push_str(&data),
                    DroneMessage::LogsEnd { request: r, error } if r == request => {
                        end = Some(error)
                    }
                    _ => {}
                }
            }
            (text, end)
        }

        /// Expects `Starting` then `Waiting`, returning the address.
        async fn started(&mut self, backend: &BackendId) -> SocketAddr {
            assert_eq!(self.next(backend).await, BackendEvent::Starting);
            match self.next(backend).await {
                BackendEvent::Waiting { address } => address,
                other => panic!("expected waiting, got {other:?}"),
            }
        }

        async fn ready(&mut self, backend: &BackendId) -> SocketAddr {
            let address = self.started(backend).await;
            assert_eq!(
                self.next(backend).await,
                BackendEvent::Ready { address },
                "backend did not become ready"
            );
            address
        }

        /// Shuts the agent down and returns the events it sent meanwhile.
        async fn shutdown(mut self) -> Vec<BackendEvent> {
            self.cancel.cancel();
            tokio::time::timeout(WAIT, self.agent)
                .await
                .expect("agent did not shut down")
                .unwrap();
            let mut rest = Vec::new();
            while let Ok(DroneMessage::Event { event, .. }) = self.events.try_recv() {
                rest.push(event);
            }
            rest
        }
    }

    fn spawn_command(id: &str, argv: &[&str]) -> SpawnCommand {
        SpawnCommand {
            backend: BackendId::parse(id).unwrap(),
            key: Some("default/room".to_string()),
            epoch: 3,
            command: Some(argv.iter().map(|s| s.to_string()).collect()),
            image: None,
            env: BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
            resources: Resources::default(),
            startup_timeout_ms: 10_000,
        }
    }

    /// A real HTTP server serving `dir`, listening on `$PORT` as a backend must. `prelude`
    /// runs in the shell first.
    fn http_server(id: &str, dir: &std::path::Path, prelude: &str) -> SpawnCommand {
        let script = format!(
            r#"{prelude} exec python3 -m http.server "$PORT" --bind 127.0.0.1 --directory "{}""#,
            dir.display()
        );
        spawn_command(id, &["sh", "-c", &script])
    }

    async fn get(address: SocketAddr, path: &str) -> String {
        let client: ProbeClient = Client::builder(TokioExecutor::new()).build_http();
        let uri: Uri = format!("http://{address}{path}").parse().unwrap();
        let response = client.get(uri).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    fn fast_stop() -> AgentConfig {
        AgentConfig {
            stop_grace: Duration::from_millis(300),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn spawn_becomes_ready_with_env_and_terminates_with_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(AgentConfig::default());
        // The server runs in `dir`, where the shell first records its environment.
        let cmd = http_server(
            "aready",
            dir.path(),
            &format!(
                r#"printf '%s %s %s %s %s' "$PORT" "$HANGAR_BACKEND_ID" "$HANGAR_KEY" "$HANGAR_EPOCH" "$GREETING" > "{}/env.txt";"#,
                dir.path().display()
            ),
        );
        h.spawn(&cmd).await;
        // A repeated spawn is ignored.
        h.spawn(&cmd).await;
        let address = h.ready(&cmd.backend).await;
        assert_eq!(address.ip().to_string(), "127.0.0.1");
        assert_eq!(
            get(address, "/env.txt").await,
            format!("{} aready default/room 3 hello", address.port())
        );

        h.terminate(&cmd.backend, false).await;
        assert_eq!(
            h.next(&cmd.backend).await,
            BackendEvent::Exited {
                exit_code: Some(128 + libc::SIGTERM)
            }
        );
        assert_eq!(h.shutdown().await, vec![]);
    }

    #[tokio::test]
    async fn process_exiting_before_ready_reports_its_exit_code() {
        let mut h = Harness::new(AgentConfig::default());
        let cmd = spawn_command("aexit", &["sh", "-c", "exit 3"]);
        h.spawn(&cmd).await;
        h.started(&cmd.backend).await;
        assert_eq!(
            h.next(&cmd.backend).await,
            BackendEvent::Exited { exit_code: Some(3) }
        );
        assert_eq!(h.shutdown().await, vec![]);
    }

    /// A re-adopted backend that a previous run was still starting used to be only watched,
    /// never probed, so its record stayed starting until the startup timeout. Now it is probed
    /// and reported ready, then its exit is reported as for any backend.
    #[tokio::test]
    async fn a_readopted_backend_is_probed_and_reported_ready() {
        // A server that answers every request with 200, as the backend would.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    let _ = conn.read(&mut buf).await;
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        let backend = BackendId::parse("aadopted").unwrap();
        let (exit_tx, exit) = tokio::sync::oneshot::channel();
        let runtime = Arc::new(ProcessRuntime::new(ProcessRuntimeConfig::default()));
        let (commands, commands_rx) = mpsc::channel(16);
        let (events_tx, events) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let agent = Agent::new(runtime, AgentConfig::default()).with_adopted(vec![Started {
            backend: backend.clone(),
            address,
            exit,
        }]);
        let mut h = Harness {
            commands,
            events,
            cancel: cancel.clone(),
            agent: tokio::spawn(agent.run(commands_rx, events_tx, cancel)),
        };
        assert_eq!(h.next(&backend).await, BackendEvent::Ready { address });
        exit_tx
            .send(crate::runtime::ExitStatus { code: Some(0) })
            .unwrap();
        assert_eq!(
            h.next(&backend).await,
            BackendEvent::Exited { exit_code: Some(0) }
        );
        assert_eq!(h.shutdown().await, vec![]);
        server.abort();
    }

    /// A spawn re-sent after a reconnect used to start a backend again after it had exited.
    #[tokio::test]
    async fn a_spawn_of_a_backend_that_already_ended_is_ignored() {
        let mut h = Harness::new(AgentConfig::default());
        let cmd = spawn_command("aonce", &["sh", "-c", "exit 3"]);
        h.spawn(&cmd).await;
        h.started(&cmd.backend).await;
        assert_eq!(
            h.next(&cmd.backend).await,
            BackendEvent::Exited { exit_code: Some(3) }
        );
        h.spawn(&cmd).await;
        // The next event is the answer to a later command, not a second start.
        let other = BackendId::parse("aother").unwrap();
        h.terminate(&other, false).await;
        assert_eq!(
            h.next(&other).await,
            BackendEvent::Exited { exit_code: None }
        );
        assert_eq!(h.shutdown().await, vec![]);
    }

    #[tokio::test]
    async fn sigterm_ignored_is_killed_after_grace() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(fast_stop());
        // SIGTERM stays ignored across exec; readiness proves the trap is in place.
        let cmd = http_server("astubborn", dir.path(), r#"trap "" TERM;"#);
        h.spawn(&cmd).await;
        h.ready(&cmd.backend).await;

        let begin = Instant::now();
        h.terminate(&cmd.backend, false).await;
        assert_eq!(
            h.next(&cmd.backend).await,
            BackendEvent::Exited {
                exit_code: Some(137)
            }
        );
        let took = begin.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert_eq!(h.shutdown().await, vec![]);
    }

    #[tokio::test]
    async fn hard_terminate_kills_at_once() {
        let mut h = Harness::new(AgentConfig::default());
        // Probing keeps failing (sleep listens on nothing); terminate interrupts it.
        let cmd = spawn_command("ahard", &["sleep", "30"]);
        h.spawn(&cmd).await;
        h.started(&cmd.backend).await;
        let begin = Instant::now();
        h.terminate(&cmd.backend, true).await;
        assert_eq!(
            h.next(&cmd.backend).await,
            BackendEvent::Exited {
                exit_code: Some(137)
            }
        );
        assert!(begin.elapsed() < Duration::from_secs(5));
        assert_eq!(h.shutdown().await, vec![]);
    }

    #[tokio::test]
    async fn startup_timeout_stops_the_backend() {
        let mut h = Harness::new(AgentConfig::default());
        let mut cmd = spawn_command("aslow", &["sleep", "30"]);
        cmd.startup_timeout_ms = 300;
        h.spawn(&cmd).await;
        h.started(&cmd.backend).await;
        assert_eq!(h.next(&cmd.backend).await, BackendEvent::StartupTimeout);
        assert_eq!(
            h.next(&cmd.backend).await,
            BackendEvent::Exited {
                exit_code: Some(137)
            }
        );
        assert_eq!(h.shutdown().await, vec![]);
    }

    #[tokio::test]
    async fn terminate_of_unknown_backend_reports_exited() {
        let mut h = Harness::new(AgentConfig::default());
        let backend = BackendId::parse("aunknown").unwrap();
        h.terminate(&backend, false).await;
        assert_eq!(
            h.next(&backend).await,
            BackendEvent::Exited { exit_code: None }
        );
        assert_eq!(h.shutdown().await, vec![]);
    }

    #[tokio::test]
    async fn spawn_failures() {
        let mut h = Harness::new(AgentConfig::default());

        let mut image = spawn_command("aimage", &[]);
        image.command = None;
        image.image = Some("nginx:latest".to_string());
        h.spawn(&image).await;
        assert_eq!(h.next(&image.backend).await, BackendEvent::Starting);
        match h.next(&image.backend).await {
            BackendEvent::SpawnFailed { message } => {
                assert!(message.contains("docker"), "{message}")
            }
            other => panic!("expected spawn failure, got {other:?}"),
        }

        let missing = spawn_command("amissing", &["/nonexistent/hangar-test-binary"]);
        h.spawn(&missing).await;
        assert_eq!(h.next(&missing.backend).await, BackendEvent::Starting);
        match h.next(&missing.backend).await {
            BackendEvent::SpawnFailed { message } => {
                assert!(message.contains("hangar-test-binary"), "{message}")
            }
            other => panic!("expected spawn failure, got {other:?}"),
        }

        // A failed backend is forgotten: a spawn under its id is attempted again.
        h.spawn(&missing).await;
        assert_eq!(h.next(&missing.backend).await, BackendEvent::Starting);
        assert!(matches!(
            h.next(&missing.backend).await,
            BackendEvent::SpawnFailed { .. }
        ));
        assert_eq!(h.shutdown().await, vec![]);
    }

    #[tokio::test]
    async fn shutdown_stops_backends() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = Harness::new(AgentConfig::default());
        let cmd = http_server("ashutdown", dir.path(), "");
        h.spawn(&cmd).await;
        h.ready(&cmd.backend).await;
        assert_eq!(
            h.shutdown().await,
            vec![BackendEvent::Exited {
                exit_code: Some(128 + libc::SIGTERM)
            }]
        );
    }

    #[tokio::test]
    async fn probe_path_and_status_below_500_mean_ready() {
        let dir = tempfile::tempdir().unwrap();
        // A missing file answers 404, which still proves the server is up.
        let mut h = Harness::new(AgentConfig {
            probe_path: "healthz".to_string(),
            ..fast_stop()
        });
        let cmd = http_server("aprobe", dir.path(), "");
        h.spawn(&cmd).await;
        h.ready(&cmd.backend).await;
        h.terminate(&cmd.backend, true).await;
        assert!(matches!(
            h.next(&cmd.backend).await,
            BackendEvent::Exited { .. }
        ));
        assert_eq!(h.shutdown().await, vec![]);
    }

    /// Log requests through the agent: a tail ends with `LogsEnd` and no error, a follow
    /// sends new output until cancelled, an unknown backend's request ends as not found.
    #[tokio::test]
    async fn log_requests_are_answered_followed_and_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(crate::logs::LogFiles::new(crate::logs::LogConfig::new(
            dir.path().join("logs"),
            "d1",
        )));
        let mut h = Harness::with_runtime(
            fast_stop(),
            ProcessRuntimeConfig {
                logs: Some(files),
                ..ProcessRuntimeConfig::default()
            },
        );
        let fifo = dir.path().join("more");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let script = format!(
            r#"echo first; echo second; cat "{}"; sleep 30"#,
            fifo.display()
        );
        let cmd = spawn_command("alogs", &["sh", "-c", &script]);
        h.spawn(&cmd).await;
        h.started(&cmd.backend).await;

        let ask = |request, tail, follow| {
            SchedulerMessage::Logs(LogsRequest {
                request,
                backend: cmd.backend.clone(),
                tail,
                follow,
            })
        };
        h.send(ask(2, None, true)).await;
        let (text, _) = h.logs_until(2, |t, _| t.contains("second\n")).await;
        assert_eq!(text, "first\nsecond\n");
        h.send(ask(1, Some(1), false)).await;
        let (text, end) = h.logs_until(1, |_, ended| ended).await;
        assert_eq!(text, "second\n");
        assert_eq!(end, Some(None), "a tail ends without an error");

        let writer = std::thread::spawn(move || std::fs::write(fifo, "third\n"));
        let (text, end) = h.logs_until(2, |t, _| t.contains("third")).await;
        assert_eq!(text, "third\n");
        assert_eq!(end, None, "a follow goes on while the backend runs");
        writer.join().unwrap().unwrap();
        h.send(SchedulerMessage::CancelLogs { request: 2 }).await;

        let mut unknown = ask(3, None, false);
        if let SchedulerMessage::Logs(r) = &mut unknown {
            r.backend = BackendId::parse("nothere").unwrap();
        }
        h.send(unknown).await;
        let (_, end) = h.logs_until(3, |_, ended| ended).await;
        assert!(
            matches!(
                end,
                Some(Some(hangar_core::drone::LogsFailure::NotFound { .. }))
            ),
            "{end:?}"
        );
        h.terminate(&cmd.backend, true).await;
        h.shutdown().await;
    }
}
