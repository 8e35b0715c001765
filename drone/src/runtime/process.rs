//! The process runtime: each backend is one local child process.
//!
//! Used by `hangar dev`, by tests and on hosts without Docker. Every child gets its own process
//! group (so that a terminal's Ctrl-C reaches only the agent, which then stops backends in an
//! orderly way, and so that a kill reaches the backend's own children too) and the
//! parent-death signal `SIGKILL` (so that children never outlive an agent that is killed -9).
//!
//! Each child is owned by one waiter task, which is the only place that reaps it. `stop` never
//! signals the pid itself: it asks the waiter to, and the waiter only signals a child it has
//! not reaped yet. That closes the classic race where a pid is reaped, reused by an unrelated
//! process, and then signalled.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hangar_core::BackendId;
use hangar_core::drone::{BackendUsage, LogsRequest, SpawnCommand};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ExitStatus, LogSink, LogsError, Runtime, RuntimeError, Started};
use crate::logs::{LineBuffer, LogFiles, LogWriter};

/// How long a backend's output is still read after its main process exited: what it wrote
/// last is in the pipe; a descendant that escaped its process group and keeps the pipe open
/// does not hold the log open for ever.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);

/// Configuration of a [`ProcessRuntime`].
#[derive(Clone, Debug)]
pub struct ProcessRuntimeConfig {
    /// The command run when a spawn gives none (in dev: `[current_exe, "demo-backend"]`).
    pub default_command: Option<Vec<String>>,
    /// The address backends listen on (`HANGAR_BIND`, with `PORT`); also the host of the
    /// address handed to proxies, so it must be one they can reach (`--advertise-address`).
    pub bind_host: IpAddr,
    /// If set, each child's stdout and stderr are kept there (read through a pipe, a line at
    /// a time, by a capture task: see [`crate::logs`]); otherwise they go to `/dev/null`.
    pub logs: Option<Arc<LogFiles>>,
}

impl Default for ProcessRuntimeConfig {
    fn default() -> Self {
        ProcessRuntimeConfig {
            default_command: None,
            bind_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            logs: None,
        }
    }
}

/// A signal request from `stop` to a child's waiter task.
#[derive(Clone, Copy, Debug)]
enum Signal {
    /// `SIGTERM` to the backend's main process (it decides how to shut down its children).
    Term,
    /// `SIGKILL` to the backend's whole process group.
    Kill,
}

/// What the runtime keeps per running child.
struct ChildEntry {
    /// Distinguishes this child from a later one started under the same backend id.
    generation: u64,
    /// The main process, for reading its usage from `/proc`.
    pid: libc::pid_t,
    /// The port it was told to listen on.
    port: u16,
    signals: mpsc::UnboundedSender<Signal>,
    /// `Some` once the child has exited and been reaped.
    exited: watch::Receiver<Option<ExitStatus>>,
}

struct Inner {
    config: ProcessRuntimeConfig,
    children: Mutex<HashMap<BackendId, ChildEntry>>,
    next_generation: AtomicU64,
    tasks: TaskTracker,
    /// Cancelled when the [`ProcessRuntime`] is dropped: waiters then kill their children.
    dropped: CancellationToken,
}

/// Runs each backend as a child process of this process. See the module docs.
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

impl ProcessRuntime {
    pub fn new(config: ProcessRuntimeConfig) -> Self {
        ProcessRuntime {
            inner: Arc::new(Inner {
                config,
                children: Mutex::new(HashMap::new()),
                next_generation: AtomicU64::new(1),
                tasks: TaskTracker::new(),
                dropped: CancellationToken::new(),
            }),
        }
    }

    /// The backends currently running (started and not yet exited).
    pub fn running(&self) -> Vec<BackendId> {
        lock(&self.inner.children).keys().cloned().collect()
    }

    /// Stops every child (`SIGTERM`, then `SIGKILL` after `grace`) and returns once all have
    /// exited. Used by `hangar dev` on Ctrl-C.
    pub async fn shutdown(&self, grace: Duration) {
        let backends = self.running();
        let stops = backends.iter().map(|backend| async move {
            match self.stop(backend, grace).await {
                Ok(()) | Err(RuntimeError::NotRunning { .. }) => {}
                Err(error) => tracing::warn!(%backend, %error, "cannot stop backend"),
            }
        });
        futures_util::future::join_all(stops).await;
    }

    fn command_for<'a>(&'a self, cmd: &'a SpawnCommand) -> Result<&'a [String], RuntimeError> {
        if let Some(image) = &cmd.image {
            return Err(RuntimeError::ImageUnsupported {
                image: image.clone(),
            });
        }
        cmd.command
            .as_deref()
            .or(self.inner.config.default_command.as_deref())
            .filter(|argv| !argv.is_empty())
            .ok_or_else(|| RuntimeError::NoCommand {
                backend: cmd.backend.clone(),
            })
    }

    /// Where the child's stdout and stderr go: pipes read into its log, or nowhere.
    fn output(&self, backend: &BackendId) -> io::Result<(Stdio, Stdio, Option<LogWriter>)> {
        let Some(files) = &self.inner.config.logs else {
            return Ok((Stdio::null(), Stdio::null(), None));
        };
        let writer = files.writer(backend)?;
        Ok((Stdio::piped(), Stdio::piped(), Some(writer)))
    }
}

impl Drop for ProcessRuntime {
    fn drop(&mut self) {
        // Waiter tasks kill their children when they see this. If the tokio runtime is gone
        // too, `kill_on_drop` still kills each main process when its `Child` is dropped.
        self.inner.dropped.cancel();
    }
}

/// Locks a mutex, recovering from poisoning: the maps stay consistent because no code path
/// panics while holding the lock.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Finds a free port by binding port 0 and releasing it, skipping ports `taken` says a
/// running child was given: a child that has not bound its port yet leaves it free, and the
/// kernel used to hand the same port to the next child started meanwhile, whose requests then
/// reached the first child (seen in CI: a backend answered with another backend's key). The
/// ports tried are held until one is chosen, so each try gets another. There is still a window
/// in which another process could take the port; the backend then fails to bind and exits,
/// which the agent reports like any other early exit.
fn allocate_port(host: IpAddr, taken: impl Fn(u16) -> bool) -> io::Result<u16> {
    let mut held = Vec::new();
    for _ in 0..64 {
        let listener = TcpListener::bind(SocketAddr::new(host, 0))?;
        let port = listener.local_addr()?.port();
        if !taken(port) {
            return Ok(port);
        }
        held.push(listener);
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "every port the kernel offered was given to a running backend",
    ))
}

/// Makes the child the leader of its own process group and arranges for it to be killed when
/// the thread that spawned it dies.
fn configure_child(command: &mut Command) {
    command.process_group(0);
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        #[allow(unsafe_code)]
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (prctl, getppid) and builds io::Errors from raw os
        // error codes, which does not allocate.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // If the parent died between fork and prctl, the death signal will never come:
                // give up rather than run an orphan.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
}

/// `kill(2)` that reports failure as an `io::Error`.
pub(crate) fn send_signal(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: kill has no memory-safety preconditions; callers only pass pids (or negated
    // process-group ids) of children that have not been reaped yet.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Converts a std exit status to ours: a signal-killed process gets 128 + the signal number,
/// as a shell reports it.
fn exit_status(status: std::process::ExitStatus) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    ExitStatus {
        code: status
            .code()
            .or_else(|| status.signal().map(|signal| 128 + signal)),
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn fence_target(&self, backend: &BackendId) -> Option<crate::watchdog::Target> {
        // Each child leads its own process group: the group id is its pid.
        lock(&self.inner.children)
            .get(backend)
            .map(|c| crate::watchdog::Target::ProcessGroup(c.pid))
    }

    fn name(&self) -> &'static str {
        "process"
    }

    async fn start(&self, cmd: &SpawnCommand) -> Result<Started, RuntimeError> {
        let argv = self.command_for(cmd)?;
        let backend = &cmd.backend;
        let program = argv[0].clone();
        let spawn_error = |source: io::Error| RuntimeError::Spawn {
            backend: backend.clone(),
            program: program.clone(),
            source,
        };
        if lock(&self.inner.children).contains_key(backend) {
            return Err(spawn_error(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the backend is already running",
            )));
        }

        let host = self.inner.config.bind_host;
        let port = allocate_port(host, |p| {
            lock(&self.inner.children).values().any(|c| c.port == p)
        })
        .map_err(|source| RuntimeError::AllocatePort {
            backend: backend.clone(),
            source,
        })?;
        let (stdout, stderr, log) = self.output(backend).map_err(spawn_error)?;

        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .envs(&cmd.env)
            .env("PORT", port.to_string())
            .env("HANGAR_BIND", host.to_string())
            .env("HANGAR_BACKEND_ID", backend.as_str())
            .env("HANGAR_KEY", cmd.key.as_deref().unwrap_or(""))
            .env("HANGAR_EPOCH", cmd.epoch.to_string())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        configure_child(&mut command);
        // Spawning here, on the calling (tokio worker) thread, matters: the parent-death signal
        // fires when the *thread* that forked the child exits, and worker threads live as long
        // as the tokio runtime, unlike `spawn_blocking` threads.
        let mut child = command.spawn().map_err(spawn_error)?;
        let Some(pid) = child.id() else {
            // Only possible if the child was already reaped, which nothing has done yet.
            return Err(spawn_error(io::Error::other("the child has no pid")));
        };
        let pid = pid as libc::pid_t;

        let generation = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
        let (signals_tx, signals_rx) = mpsc::unbounded_channel();
        let (exited_tx, exited_rx) = watch::channel(None);
        let (exit_tx, exit_rx) = oneshot::channel();
        if let (Some(log), Some(out), Some(err)) = (log, child.stdout.take(), child.stderr.take()) {
            self.inner
                .tasks
                .spawn(capture(log, out, err, exited_rx.clone()));
        }
        lock(&self.inner.children).insert(
            backend.clone(),
            ChildEntry {
                generation,
                pid,
                port,
                signals: signals_tx,
                exited: exited_rx,
            },
        );
        let waiter = Waiter {
            inner: self.inner.clone(),
            backend: backend.clone(),
            generation,
            pid,
        };
        self.inner
            .tasks
            .spawn(waiter.run(child, signals_rx, exited_tx, exit_tx));
        tracing::info!(%backend, pid, port, program = %argv[0], "started backend process");

        Ok(Started {
            backend: backend.clone(),
            address: SocketAddr::new(host, port),
            exit: exit_rx,
        })
    }

    async fn stop(&self, backend: &BackendId, grace: Duration) -> Result<(), RuntimeError> {
        let (signals, mut exited) = {
            let children = lock(&self.inner.children);
            let entry = children
                .get(backend)
                .ok_or_else(|| RuntimeError::NotRunning {
                    backend: backend.clone(),
                })?;
            (entry.signals.clone(), entry.exited.clone())
        };
        // A send error means the waiter is finishing: the child has exited, and `exited` says
        // so (or is about to).
        if !grace.is_zero() {
            let _ = signals.send(Signal::Term);
            let polite = tokio::time::timeout(grace, exited.wait_for(Option::is_some)).await;
            if polite.is_ok() {
                return Ok(());
            }
            tracing::info!(%backend, ?grace, "backend ignored SIGTERM; killing it");
        }
        let _ = signals.send(Signal::Kill);
        // An error means the waiter ended without publishing, which it never does; either way
        // the child is gone.
        let _ = exited.wait_for(Option::is_some).await;
        Ok(())
    }

    async fn adopt(&self) -> Result<Vec<Started>, RuntimeError> {
        // Children die with the agent (parent-death signal), so there is never anything left.
        Ok(Vec::new())
    }

    async fn logs(
        &self,
        request: &LogsRequest,
        out: LogSink,
        cancel: CancellationToken,
    ) -> Result<(), LogsError> {
        let Some(files) = &self.inner.config.logs else {
            return Err(LogsError::NotKept { runtime: "process" });
        };
        files
            .read(
                &request.backend,
                request.tail,
                request.follow,
                &out,
                &cancel,
            )
            .await
    }

    async fn usage(&self) -> Vec<BackendUsage> {
        let pids: Vec<(BackendId, libc::pid_t)> = lock(&self.inner.children)
            .iter()
            .map(|(b, e)| (b.clone(), e.pid))
            .collect();
        let (ticks, page) = proc_units();
        pids.into_iter()
            .filter_map(|(backend, pid)| {
                // A child that exits meanwhile has no /proc entry: it is left out.
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
                let (utime, stime) = parse_stat_times(&stat)?;
                let resident = parse_statm_resident(&statm)?;
                Some(BackendUsage {
                    backend,
                    cpu_seconds_total: (utime + stime) as f64 / ticks as f64,
                    memory_bytes: resident * page,
                })
            })
            .collect()
    }
}

/// Clock ticks per second (the unit of `/proc/<pid>/stat` times) and the page size (the unit
/// of `/proc/<pid>/statm`).
fn proc_units() -> (u64, u64) {
    #[allow(unsafe_code)]
    // SAFETY: sysconf only reads system configuration; it has no memory-safety preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (
        u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100),
        u64::try_from(page).ok().filter(|p| *p > 0).unwrap_or(4096),
    )
}

/// `utime` and `stime` (fields 14 and 15, in clock ticks) of a `/proc/<pid>/stat` line. The
/// command name (field 2) is parenthesised and may contain spaces and parentheses, so fields
/// are counted from the last `)`.
fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // `rest` starts at field 3 (state): utime is the 12th field from there.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// The resident set (second field, in pages) of `/proc/<pid>/statm`.
fn parse_statm_resident(statm: &str) -> Option<u64> {
    statm.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// The task that keeps one child's output: reads its stdout and stderr into its log a line at
/// a time, until both pipes close or [`OUTPUT_DRAIN`] after the child exited. Dropping the
/// writer at the end tells followers that the output has ended.
async fn capture(
    log: LogWriter,
    stdout: ChildStdout,
    stderr: ChildStderr,
    mut exited: watch::Receiver<Option<ExitStatus>>,
) {
    capture_with(log, stdout, stderr, &mut exited, CAPTURE_PAUSE).await;
}

/// After a pipe delivered output it is read again only after this pause, and is out of the
/// event loop meanwhile: a backend that writes a line per request costs the drone one read
/// (and one log write) per pause rather than one per line, and its writes do not wake the
/// drone's thread (which, on a shared core, preempted the backend once per line). An idle
/// pipe waits in the event loop and costs nothing. Followers see a line at most this late.
pub(crate) const CAPTURE_PAUSE: Duration = Duration::from_millis(20);
/// A pipe holds 64 KiB by default: a pause whose reads brought at least half of that is
/// skipped, so that a very chatty backend is not left blocked on a full pipe.
const CAPTURE_BUSY: usize = 32 * 1024;

/// [`capture`] with the given pause; returns how many writes the log took.
async fn capture_with(
    log: LogWriter,
    stdout: ChildStdout,
    stderr: ChildStderr,
    exited: &mut watch::Receiver<Option<ExitStatus>>,
    pause: Duration,
) -> usize {
    let sink = Mutex::new(Sink {
        log,
        failed: false,
        writes: 0,
    });
    let out_lines = Mutex::new(LineBuffer::default());
    let err_lines = Mutex::new(LineBuffer::default());
    let pipes = async {
        tokio::join!(
            follow_pipe(stdout.into_owned_fd(), &out_lines, &sink, pause),
            follow_pipe(stderr.into_owned_fd(), &err_lines, &sink, pause),
        )
    };
    let drained = async {
        let _ = exited.wait_for(Option::is_some).await;
        tokio::time::sleep(OUTPUT_DRAIN).await;
    };
    tokio::select! {
        _ = pipes => {}
        () = drained => {}
    }
    let mut sink = lock(&sink);
    sink.keep(lock(&out_lines).finish());
    sink.keep(lock(&err_lines).finish());
    sink.writes
}

/// Where captured output goes: a write error is reported once; the pipes are still read, so
/// the child never blocks.
struct Sink {
    log: LogWriter,
    failed: bool,
    writes: usize,
}

impl Sink {
    fn keep(&mut self, data: Option<Vec<u8>>) {
        let Some(data) = data else { return };
        self.writes += 1;
        if let Err(error) = self.log.write(&data)
            && !std::mem::replace(&mut self.failed, true)
        {
            tracing::warn!(%error, "cannot write a backend's output to its log; dropping it");
        }
    }
}

/// Reads one of a child's pipes into the log until it closes: waits in the event loop while
/// the pipe is quiet; once output comes, reads what is there every `pause` (out of the event
/// loop) until a read finds nothing (see [`CAPTURE_PAUSE`]).
async fn follow_pipe(
    fd: io::Result<std::os::fd::OwnedFd>,
    lines: &Mutex<LineBuffer>,
    sink: &Mutex<Sink>,
    pause: Duration,
) {
    use std::io::Read as _;
    use tokio::net::unix::pipe;

    let mut buf = vec![0u8; 64 * 1024];
    // Checks that it is a pipe and makes it non-blocking.
    let Ok(mut rx) = fd.and_then(pipe::Receiver::from_owned_fd) else {
        return;
    };
    loop {
        // Quiet: wait for output in the event loop.
        if rx.readable().await.is_err() {
            return;
        }
        let Ok(owned) = rx.into_nonblocking_fd() else {
            return;
        };
        let mut file = std::fs::File::from(owned);
        // Busy: read what is there, pause, again, until a read finds nothing.
        loop {
            let mut got = 0;
            loop {
                match file.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        got += n;
                        let data = lock(lines).push(&buf[..n]);
                        lock(sink).keep(data);
                        if got >= CAPTURE_BUSY {
                            // More may keep coming: let the rest of the drone run first.
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                }
            }
            if got == 0 {
                break;
            }
            if got < CAPTURE_BUSY {
                tokio::time::sleep(pause).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        rx = match pipe::Receiver::from_owned_fd_unchecked(file.into()) {
            Ok(rx) => rx,
            Err(_) => return,
        };
    }
}

/// The task that owns one child: delivers signals to it and reaps it.
struct Waiter {
    inner: Arc<Inner>,
    backend: BackendId,
    generation: u64,
    pid: libc::pid_t,
}

impl Waiter {
    async fn run(
        self,
        mut child: Child,
        mut signals: mpsc::UnboundedReceiver<Signal>,
        exited: watch::Sender<Option<ExitStatus>>,
        exit: oneshot::Sender<ExitStatus>,
    ) {
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                Some(signal) = signals.recv() => self.signal(signal),
                () = self.inner.dropped.cancelled() => {
                    self.signal(Signal::Kill);
                    break child.wait().await;
                }
            }
        };
        let status = match status {
            Ok(status) => exit_status(status),
            Err(error) => {
                tracing::warn!(backend = %self.backend, %error, "cannot wait for backend process");
                ExitStatus { code: None }
            }
        };
        // Whatever the main process left behind in its group (workers, a shell's children)
        // goes with it. The group id cannot have been reused while members remain; if none
        // remain this fails harmlessly with ESRCH.
        let _ = send_signal(-self.pid, libc::SIGKILL);
        tracing::info!(backend = %self.backend, pid = self.pid, code = ?status.code, "backend process exited");

        // Forget the child before announcing the exit, so that whoever reacts to the exit can
        // start the backend again.
        {
            let mut children = lock(&self.inner.children);
            if children
                .get(&self.backend)
                .is_some_and(|entry| entry.generation == self.generation)
            {
                children.remove(&self.backend);
            }
        }
        exited.send_replace(Some(status));
        // The agent may have stopped watching; nothing to do then.
        let _ = exit.send(status);
    }

    /// Signals the child. Only called before the child is reaped, so the pid (and the process
    /// group id, which equals it) still belong to our child.
    fn signal(&self, signal: Signal) {
        let result = match signal {
            Signal::Term => send_signal(self.pid, libc::SIGTERM),
            Signal::Kill => send_signal(-self.pid, libc::SIGKILL)
                // The group may be gone if the main process left it; the process itself is not.
                .or_else(|_| send_signal(self.pid, libc::SIGKILL)),
        };
        if let Err(error) = result {
            // ESRCH: it is a zombie about to be reaped; nothing else is expected.
            tracing::debug!(backend = %self.backend, ?signal, %error, "cannot signal backend process");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use hangar_core::api::Resources;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// A port a running child was given is never handed out again, whatever the kernel offers
    /// (it offered one twice in CI); a port nobody holds is taken as it comes.
    #[test]
    fn a_port_given_to_a_running_child_is_not_given_again() {
        let host = IpAddr::from([127, 0, 0, 1]);
        let offered = std::cell::RefCell::new(Vec::new());
        let port = allocate_port(host, |p| {
            offered.borrow_mut().push(p);
            // The first three ports offered are held by running children.
            offered.borrow().len() <= 3
        })
        .unwrap();
        let offered = offered.into_inner();
        assert_eq!(offered.len(), 4, "{offered:?}");
        assert_eq!(offered[3], port);
        assert!(!offered[..3].contains(&port), "{offered:?}");

        let error = allocate_port(host, |_| true).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
    }

    fn spawn_command(id: &str, argv: &[&str]) -> SpawnCommand {
        SpawnCommand {
            backend: BackendId::parse(id).unwrap(),
            key: Some("default/doc".to_string()),
            epoch: 7,
            command: Some(argv.iter().map(|s| s.to_string()).collect()),
            image: None,
            env: BTreeMap::from([("GREETING".to_string(), "hi".to_string())]),
            resources: Resources::default(),
            startup_timeout_ms: 10_000,
        }
    }

    /// Reads a backend's whole log, following it until its output has ended.
    async fn log_of(runtime: &ProcessRuntime, backend: &BackendId) -> String {
        let (tx, mut rx) = mpsc::channel(64);
        let request = LogsRequest {
            request: 1,
            backend: backend.clone(),
            tail: None,
            follow: true,
        };
        let read = runtime.logs(&request, tx, CancellationToken::new());
        let collect = async {
            let mut text = String::new();
            while let Some(chunk) = rx.recv().await {
                text.push_str(&chunk);
            }
            text
        };
        let (result, text) = tokio::time::timeout(WAIT, async { tokio::join!(read, collect) })
            .await
            .expect("the follow ended with the backend's output");
        result.unwrap();
        text
    }

    fn logged(dir: &std::path::Path) -> ProcessRuntimeConfig {
        ProcessRuntimeConfig {
            logs: Some(Arc::new(LogFiles::new(crate::logs::LogConfig::new(
                dir, "d1",
            )))),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn passes_env_and_reports_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = ProcessRuntime::new(logged(dir.path()));
        let cmd = spawn_command(
            "penv",
            &[
                "sh",
                "-c",
                r#"echo "$PORT $HANGAR_BACKEND_ID $HANGAR_KEY $HANGAR_EPOCH $GREETING"; exit 5"#,
            ],
        );
        let started = runtime.start(&cmd).await.unwrap();
        assert_eq!(started.address.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        let status = tokio::time::timeout(WAIT, started.exit)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.code, Some(5));
        assert!(runtime.running().is_empty());
        assert_eq!(
            log_of(&runtime, &cmd.backend).await,
            format!("{} penv default/doc 7 hi\n", started.address.port())
        );
    }

    /// A backend that writes a line at a time, quickly, has its output read a pause at a time
    /// (one read and one log write per pause, not per line), all of it and in order.
    #[tokio::test]
    async fn a_chatty_backends_output_is_read_a_pause_at_a_time() {
        const LINES: usize = 200;
        const PAUSE: Duration = Duration::from_millis(200);
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(LogFiles::new(crate::logs::LogConfig::new(dir.path(), "d1")));
        let backend = BackendId::parse("pchatty").unwrap();
        let log = files.writer(&backend).unwrap();
        // One line every few milliseconds (a `sleep` process each): the whole run spans
        // several pauses however loaded the machine is.
        let mut child = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "i=0; while [ $i -lt {LINES} ]; do echo line $i; i=$((i+1)); sleep 0.002; done"
                ),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let (_exited_tx, mut exited) = watch::channel(None);
        let writes =
            tokio::time::timeout(WAIT * 6, capture_with(log, out, err, &mut exited, PAUSE))
                .await
                .expect("the capture ended with the pipes");
        child.wait().await.unwrap();
        let text = std::fs::read_to_string(dir.path().join("pchatty.log")).unwrap();
        let want: String = (0..LINES).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, want);
        assert!(
            writes <= LINES / 4,
            "{writes} log writes for {LINES} lines: read a line at a time"
        );
    }

    /// stdout and stderr go to one log, a whole line at a time, and the log outlives the
    /// process; a runtime without a log directory keeps nothing.
    #[tokio::test]
    async fn keeps_stdout_and_stderr_by_line_after_the_exit() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = ProcessRuntime::new(logged(dir.path()));
        let cmd = spawn_command(
            "pboth",
            &[
                "sh",
                "-c",
                "printf 'out one\\n'; printf 'err one\\n' >&2; printf 'out two\\n'; printf 'no end'",
            ],
        );
        let started = runtime.start(&cmd).await.unwrap();
        tokio::time::timeout(WAIT, started.exit)
            .await
            .unwrap()
            .unwrap();
        let log = log_of(&runtime, &cmd.backend).await;
        let mut lines: Vec<&str> = log.split_inclusive('\n').collect();
        lines.sort_unstable();
        assert_eq!(
            lines,
            ["err one\n", "no end", "out one\n", "out two\n"],
            "{log:?}"
        );
        assert!(dir.path().join("pboth.log").exists());

        let bare = ProcessRuntime::new(ProcessRuntimeConfig::default());
        let (tx, _rx) = mpsc::channel(1);
        let request = LogsRequest {
            request: 1,
            backend: cmd.backend.clone(),
            tail: None,
            follow: false,
        };
        assert!(matches!(
            bare.logs(&request, tx, CancellationToken::new()).await,
            Err(LogsError::NotKept { .. })
        ));
    }

    #[tokio::test]
    async fn stop_kills_after_grace_when_sigterm_is_ignored() {
        let runtime = ProcessRuntime::new(ProcessRuntimeConfig::default());
        // The fifo read only returns once the trap is installed, so SIGTERM cannot come early.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("ready");
        let fifo_arg = fifo.to_str().unwrap().to_string();
        let script = format!(r#"trap "" TERM; echo ready > "{fifo_arg}"; sleep 30"#);
        let mkfifo = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(mkfifo.success());
        let started = runtime
            .start(&spawn_command("pstubborn", &["sh", "-c", &script]))
            .await
            .unwrap();
        let ready = tokio::task::spawn_blocking(move || std::fs::read_to_string(fifo));
        assert_eq!(
            tokio::time::timeout(WAIT, ready)
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
            "ready\n"
        );

        let grace = Duration::from_millis(300);
        let begin = Instant::now();
        runtime.stop(&started.backend, grace).await.unwrap();
        let took = begin.elapsed();
        assert!(took >= grace, "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert_eq!(started.exit.await.unwrap().code, Some(137));
        assert!(matches!(
            runtime.stop(&started.backend, grace).await,
            Err(RuntimeError::NotRunning { .. })
        ));
    }

    #[tokio::test]
    async fn stop_with_grace_sends_sigterm() {
        let runtime = ProcessRuntime::new(ProcessRuntimeConfig::default());
        let started = runtime
            .start(&spawn_command("pterm", &["sleep", "30"]))
            .await
            .unwrap();
        runtime
            .stop(&started.backend, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(started.exit.await.unwrap().code, Some(128 + libc::SIGTERM));
    }

    #[tokio::test]
    async fn refusals() {
        let runtime = ProcessRuntime::new(ProcessRuntimeConfig::default());
        let mut cmd = spawn_command("prefuse", &[]);
        cmd.command = None;
        assert!(matches!(
            runtime.start(&cmd).await,
            Err(RuntimeError::NoCommand { .. })
        ));
        cmd.image = Some("nginx".to_string());
        let error = runtime.start(&cmd).await.unwrap_err();
        assert!(matches!(error, RuntimeError::ImageUnsupported { .. }));
        assert!(error.to_string().contains("docker"));
        let cmd = spawn_command("prefuse", &["/nonexistent/hangar-test-binary"]);
        assert!(matches!(
            runtime.start(&cmd).await,
            Err(RuntimeError::Spawn { .. })
        ));
        assert!(runtime.adopt().await.unwrap().is_empty());
        assert!(matches!(
            runtime.stop(&cmd.backend, Duration::ZERO).await,
            Err(RuntimeError::NotRunning { .. })
        ));
    }

    #[tokio::test]
    async fn default_command_and_shutdown() {
        let runtime = ProcessRuntime::new(ProcessRuntimeConfig {
            default_command: Some(vec!["sleep".to_string(), "30".to_string()]),
            ..Default::default()
        });
        let mut exits = Vec::new();
        for id in ["pdef1", "pdef2"] {
            let mut cmd = spawn_command(id, &[]);
            cmd.command = None;
            exits.push(runtime.start(&cmd).await.unwrap().exit);
        }
        // Starting a running backend again is refused.
        let mut again = spawn_command("pdef1", &[]);
        again.command = None;
        assert!(matches!(
            runtime.start(&again).await,
            Err(RuntimeError::Spawn { .. })
        ));
        assert_eq!(runtime.running().len(), 2);
        tokio::time::timeout(WAIT, runtime.shutdown(Duration::from_secs(5)))
            .await
            .unwrap();
        for exit in exits {
            assert_eq!(exit.await.unwrap().code, Some(128 + libc::SIGTERM));
        }
        assert!(runtime.running().is_empty());
    }

    #[tokio::test]
    async fn dropping_the_runtime_kills_children() {
        let runtime = ProcessRuntime::new(ProcessRuntimeConfig::default());
        let started = runtime
            .start(&spawn_command("pdrop", &["sleep", "30"]))
            .await
            .unwrap();
        drop(runtime);
        let status = tokio::time::timeout(WAIT, started.exit)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.code, Some(128 + libc::SIGKILL));
    }

    #[test]
    fn proc_files_parse() {
        // A command name with spaces and parentheses does not shift the fields.
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 731 205 0 0 20 0 1 0 99 1000 50";
        assert_eq!(parse_stat_times(stat), Some((731, 205)));
        assert_eq!(parse_stat_times("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat_times("garbage"), None);
        assert_eq!(parse_statm_resident("1000 250 30 1 0 100 0\n"), Some(250));
        assert_eq!(parse_statm_resident("1000"), None);
    }

    #[tokio::test]
    async fn usage_reads_cpu_time_and_resident_memory_from_proc() {
        let runtime = ProcessRuntime::new(ProcessRuntimeConfig::default());
        let busy = spawn_command("pbusy", &["sh", "-c", "while :; do :; done"]);
        let idle = spawn_command("pidle", &["sleep", "30"]);
        runtime.start(&busy).await.unwrap();
        runtime.start(&idle).await.unwrap();
        // Poll until the busy loop has used a measurable amount of CPU.
        let deadline = Instant::now() + WAIT;
        let usage = loop {
            let usage = runtime.usage().await;
            let cpu = |id: &BackendId| {
                usage
                    .iter()
                    .find(|u| &u.backend == id)
                    .map(|u| u.cpu_seconds_total)
            };
            if cpu(&busy.backend).is_some_and(|c| c >= 0.1) {
                break usage;
            }
            assert!(Instant::now() < deadline, "no CPU time measured: {usage:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(usage.len(), 2);
        for u in &usage {
            assert!(u.memory_bytes > 0, "{u:?}");
        }
        let idle_cpu = usage
            .iter()
            .find(|u| u.backend == idle.backend)
            .unwrap()
            .cpu_seconds_total;
        assert!(idle_cpu < 0.1, "{idle_cpu}");
        tokio::time::timeout(WAIT, runtime.shutdown(Duration::ZERO))
            .await
            .unwrap();
        assert!(runtime.usage().await.is_empty());
    }
}
