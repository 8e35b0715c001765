//! The fence watchdog: a small process apart from the agent that kills the drone's backends
//! when the fence deadline passes, even if the agent cannot (stopped with SIGSTOP, stalled,
//! crashed while its Docker containers run on).
//!
//! The agent starts it (`hangar fence-watchdog`, in a process group of its own so that a stop
//! of the agent's group leaves it running) and feeds it lines on its stdin:
//! - `deadline <remaining_ms> <grace_ms>`: the fence deadline is `remaining_ms` from now; the
//!   watchdog fires `grace_ms` after it, so that the agent's own fence (which reports its kills
//!   as `fenced`) acts first when it can. The grace stays well inside the guard band;
//! - `add <backend> pgid <n>` / `add <backend> container <name>`: what to kill for a backend;
//! - `del <backend>`: the backend is gone.
//!
//! At the deadline it kills every target (SIGKILL to process groups, a kill through the Docker
//! engine for containers), then waits for a new deadline. When the agent goes away (end of
//! input) it still enforces its last deadline for what is left, then exits. A new agent run
//! takes over: it stops the watchdog named in the pid file before starting its own.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hangar_core::BackendId;

use crate::runtime::process::send_signal;

/// What the watchdog kills for one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A process backend's process group.
    ProcessGroup(i32),
    /// A Docker backend's container, by name.
    Container(String),
}

impl Target {
    fn encode(&self) -> String {
        match self {
            Target::ProcessGroup(pgid) => format!("pgid {pgid}"),
            Target::Container(name) => format!("container {name}"),
        }
    }
}

/// How the agent starts the watchdog.
#[derive(Clone, Debug)]
pub struct WatchdogConfig {
    /// The program and arguments (`[hangar, fence-watchdog, ...]`).
    pub command: Vec<String>,
    /// Where the running watchdog's pid is kept, for the next agent run to take over.
    pub pid_file: PathBuf,
}

/// The agent's handle on its watchdog.
pub struct Watchdog {
    child: Mutex<Child>,
    stdin: Mutex<ChildStdin>,
}

impl Watchdog {
    /// Stops a watchdog left by a previous agent run (this run takes over its backends) and
    /// starts a new one.
    pub fn start(config: &WatchdogConfig) -> io::Result<Watchdog> {
        take_over(&config.pid_file);
        let (program, args) = config
            .command
            .split_first()
            .ok_or_else(|| io::Error::other("empty watchdog command"))?;
        let mut child = {
            use std::os::unix::process::CommandExt;
            Command::new(program)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .process_group(0)
                .spawn()?
        };
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("the watchdog has no stdin"))?;
        std::fs::write(&config.pid_file, child.id().to_string())?;
        tracing::info!(pid = child.id(), "fence watchdog started");
        Ok(Watchdog {
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
        })
    }

    fn send(&self, line: &str) {
        let mut stdin = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = writeln!(stdin, "{line}") {
            tracing::error!(error = %e, "cannot reach the fence watchdog");
        }
    }

    /// The fence deadline is `remaining` from now; the watchdog acts `grace` after it.
    pub fn deadline(&self, remaining: Duration, grace: Duration) {
        self.send(&format!(
            "deadline {} {}",
            remaining.as_millis(),
            grace.as_millis()
        ));
    }

    pub fn add(&self, backend: &BackendId, target: &Target) {
        self.send(&format!("add {backend} {}", target.encode()));
    }

    pub fn remove(&self, backend: &BackendId) {
        self.send(&format!("del {backend}"));
    }

    /// The watchdog's pid.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }
}

impl Drop for Watchdog {
    /// A clean agent shutdown ends the watchdog with it (backends left running are re-adopted
    /// by the next run, whose own fence covers them).
    fn drop(&mut self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Stops the watchdog a previous agent run left, if the pid file names a live one.
fn take_over(pid_file: &Path) {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if pid > 0 && String::from_utf8_lossy(&cmdline).contains("fence-watchdog") {
        tracing::info!(
            pid,
            "taking over from the previous agent run's fence watchdog"
        );
        let _ = send_signal(pid, libc::SIGTERM);
    }
}

/// One line of the watchdog's input.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Deadline {
        remaining: Duration,
        grace: Duration,
    },
    Add(String, Target),
    Del(String),
}

fn parse(line: &str) -> Option<Line> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f[..] {
        ["deadline", remaining, grace] => Some(Line::Deadline {
            remaining: Duration::from_millis(remaining.parse().ok()?),
            grace: Duration::from_millis(grace.parse().ok()?),
        }),
        ["add", backend, "pgid", n] => Some(Line::Add(
            backend.to_string(),
            Target::ProcessGroup(n.parse().ok()?),
        )),
        ["add", backend, "container", name] => Some(Line::Add(
            backend.to_string(),
            Target::Container(name.to_string()),
        )),
        ["del", backend] => Some(Line::Del(backend.to_string())),
        _ => None,
    }
}

/// Kills targets; the watchdog's side effects, behind a trait so its loop can be tested.
pub trait Killer {
    fn kill(&mut self, target: &Target);
}

/// Kills process groups with SIGKILL and containers through the Docker engine.
pub struct SystemKiller {
    docker_host: Option<String>,
}

impl SystemKiller {
    pub fn new(docker_host: Option<String>) -> Self {
        SystemKiller { docker_host }
    }
}

impl Killer for SystemKiller {
    fn kill(&mut self, target: &Target) {
        match target {
            Target::ProcessGroup(pgid) => {
                let _ = send_signal(-pgid, libc::SIGKILL);
            }
            Target::Container(name) => {
                let host = self
                    .docker_host
                    .as_deref()
                    .unwrap_or(crate::runtime::docker::DEFAULT_DOCKER_HOST);
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())
                    .and_then(|rt| {
                        rt.block_on(async {
                            let docker = crate::runtime::docker::engine_client(host)
                                .await
                                .map_err(|e| e.to_string())?;
                            docker
                                .kill_container(
                                    name,
                                    None::<bollard::query_parameters::KillContainerOptions>,
                                )
                                .await
                                .map_err(|e| e.to_string())
                        })
                    });
                if let Err(e) = result {
                    eprintln!("hangar fence-watchdog: cannot kill container {name}: {e}");
                }
            }
        }
    }
}

/// Runs the watchdog over `input` until the input ends and its last deadline is enforced (or
/// nothing is left to guard). Returns how many times it fired.
pub fn run(input: impl BufRead + Send + 'static, killer: &mut impl Killer) -> usize {
    let (tx, rx) = std::sync::mpsc::channel::<Option<Line>>();
    std::thread::spawn(move || {
        for line in input.lines() {
            let Ok(line) = line else { break };
            if let Some(parsed) = parse(&line)
                && tx.send(Some(parsed)).is_err()
            {
                return;
            }
        }
        let _ = tx.send(None);
    });
    let mut targets: BTreeMap<String, Target> = BTreeMap::new();
    let mut fire_at: Option<Instant> = None;
    let mut open = true;
    let mut fired = 0;
    loop {
        let message = match (fire_at, open) {
            (Some(at), true) => match rx.recv_timeout(at.saturating_duration_since(Instant::now()))
            {
                Ok(m) => Some(m),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Some(None),
            },
            // Nothing more can arrive: wait for the deadline itself.
            (Some(at), false) => {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                None
            }
            (None, true) => Some(rx.recv().unwrap_or(None)),
            (None, false) => return fired,
        };
        match message {
            // The deadline passed without a renewal: kill everything it guards.
            None => {
                if !targets.is_empty() {
                    eprintln!(
                        "hangar fence-watchdog: the fence deadline passed and the agent did not act: killing {} backends",
                        targets.len()
                    );
                    for t in targets.values() {
                        killer.kill(t);
                    }
                    fired += 1;
                }
                fire_at = None;
            }
            Some(Some(Line::Deadline { remaining, grace })) => {
                fire_at = Some(Instant::now() + remaining + grace);
            }
            Some(Some(Line::Add(backend, target))) => {
                targets.insert(backend, target);
            }
            Some(Some(Line::Del(backend))) => {
                targets.remove(&backend);
            }
            // The agent is gone: enforce the last deadline for what is left, then stop.
            Some(None) => {
                open = false;
                if targets.is_empty() {
                    return fired;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<Target>);

    impl Killer for Recorder {
        fn kill(&mut self, target: &Target) {
            self.0.push(target.clone());
        }
    }

    #[test]
    fn lines_parse() {
        assert_eq!(
            parse("deadline 1500 100"),
            Some(Line::Deadline {
                remaining: Duration::from_millis(1500),
                grace: Duration::from_millis(100)
            })
        );
        assert_eq!(
            parse("add b1 pgid 42"),
            Some(Line::Add("b1".into(), Target::ProcessGroup(42)))
        );
        assert_eq!(
            parse("add b2 container hangar-b2"),
            Some(Line::Add(
                "b2".into(),
                Target::Container("hangar-b2".into())
            ))
        );
        assert_eq!(parse("del b1"), Some(Line::Del("b1".into())));
        assert_eq!(parse("nonsense"), None);
    }

    /// Renewed deadlines keep it quiet; once the agent stops renewing (and even once it is
    /// gone) it kills what is still registered, and only that.
    #[test]
    fn fires_at_the_last_deadline_even_after_the_agent_is_gone() {
        let (r, mut w) = std::io::pipe().unwrap();
        let input = std::io::BufReader::new(r);
        let writer = std::thread::spawn(move || {
            writeln!(w, "add b1 pgid 11").unwrap();
            writeln!(w, "add b2 container hangar-b2").unwrap();
            writeln!(w, "add b3 pgid 33").unwrap();
            writeln!(w, "del b3").unwrap();
            for _ in 0..3 {
                writeln!(w, "deadline 200 0").unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
            // The agent goes away with a deadline 100 ms ahead.
            writeln!(w, "deadline 100 0").unwrap();
        });
        let mut killer = Recorder::default();
        let started = Instant::now();
        let fired = run(input, &mut killer);
        writer.join().unwrap();
        assert_eq!(fired, 1);
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert_eq!(
            killer.0,
            vec![
                Target::ProcessGroup(11),
                Target::Container("hangar-b2".into())
            ]
        );
    }
}
