//! `hangar logs`: a backend's output from the drone that runs or ran it, on `hangar dev` (the
//! embedded drone's process runtime) and on `hangar serve` with a Docker drone; the tail, a
//! follow that sees new requests, the logs of ended backends, and unknown backends.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hangar_core::api::ConnectResponse;
use serde_json::json;

use crate::support::cluster::{Drone, SECRET, containers_of, ensure_demo_image, remove_containers};
use crate::support::{BIN, DEADLINE, Dev, cli, dev_cli};

/// The API flags of the CLI for `dev` (with its token, if it has one).
fn api_flags(dev: &Dev) -> Vec<String> {
    let mut flags = vec!["--api".to_string(), format!("http://{}", dev.api)];
    if let Some(token) = &dev.token {
        flags.extend(["--api-token".to_string(), token.clone()]);
    }
    flags
}

/// Runs `hangar logs <id> <extra>` once; returns (exit code, stdout, stderr).
fn logs(dev: &Dev, id: &str, extra: &[&str]) -> (i32, String, String) {
    let flags = api_flags(dev);
    let mut args = vec!["logs", id];
    args.extend(extra);
    args.extend(flags.iter().map(String::as_str));
    cli(&args)
}

/// Runs `hangar logs` until its output satisfies `done` (output reaches the log a moment
/// after the response that caused it), failing the test at the deadline.
async fn logs_until(dev: &Dev, id: &str, extra: &[&str], done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (code, out, err) = logs(dev, id, extra);
        assert_eq!(code, 0, "hangar logs {id} failed: {err}");
        if done(&out) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "the logs of {id} never had what was expected; last: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the demo backend's `listening on <address>` line is there.
fn listened(text: &str) -> bool {
    text.lines().any(|l| l.starts_with("listening on "))
}

fn count_lines(text: &str, line: &str) -> usize {
    text.lines().filter(|l| *l == line).count()
}

/// `hangar logs <id> -f` as a child process, its stdout read line by line.
struct Follow {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Follow {
    fn start(dev: &Dev, id: &str, extra: &[&str]) -> Follow {
        let mut child = Command::new(BIN)
            .args(["logs", id, "-f"])
            .args(extra)
            .args(api_flags(dev))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hangar logs -f");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follow { child, lines }
    }

    /// Waits (bounded) for a line equal to `want`; returns the lines before it.
    fn until_line(&self, want: &str) -> Vec<String> {
        let deadline = Instant::now() + DEADLINE;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == want => return before,
                Ok(line) => before.push(line),
                Err(e) => panic!("no line {want:?} from hangar logs -f ({e}); got {before:?}"),
            }
        }
    }

    /// Waits (bounded) for the process to exit on its own; returns its exit code.
    fn exit_code(&mut self) -> i32 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "hangar logs -f did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request through the proxy to `path` of `r`'s backend; returns the status.
async fn get(dev: &Dev, r: &ConnectResponse, path: &str) -> u16 {
    dev.get_by_host(r.backend_id.as_str(), &r.token, path)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The whole log, the tail, a follow that sees a new request's line, the logs of an ended
/// backend (and a follow of them that ends by itself), and an unknown backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangar_logs_shows_a_process_backends_output_and_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path(), &[]);
    let r = dev.connect_key("logs").await;
    let id = r.backend_id.as_str();
    dev.wait_ready(id).await;
    assert_eq!(dev.count(&r).await, 1);
    assert_eq!(dev.count(&r).await, 2);

    let all = logs_until(&dev, id, &[], |out| count_lines(out, "GET /count 200") == 2).await;
    // (The demo backend's own tracing goes to stderr, into the same log, when HANGAR_LOG
    // asks for it, as the test harness does.)
    assert!(listened(&all), "{all:?}");

    let (code, last, err) = logs(&dev, id, &["--tail", "1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(last, "GET /count 200\n", "exactly the last line");

    // A follow prints what is there, then each new request's line as it happens.
    let follow = Follow::start(&dev, id, &[]);
    let before = follow.until_line("GET /count 200");
    assert!(
        before.iter().any(|l| l.starts_with("listening on ")),
        "{before:?}"
    );
    assert_eq!(get(&dev, &r, "/followed").await, 404);
    follow.until_line("GET /followed 404");
    drop(follow);

    // An ended backend's logs stay; a follow of them ends by itself.
    let mut follow = Follow::start(&dev, id, &["--tail", "0"]);
    let (code, _, err) = cli(&[
        &["terminate", id][..],
        &api_flags(&dev)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ]
    .concat());
    assert_eq!(code, 0, "{err}");
    dev.wait_for(id, "terminated", |v| v.state.name() == "terminated")
        .await;
    assert_eq!(follow.exit_code(), 0, "the follow ended with the backend");
    let (code, after, err) = logs(&dev, id, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(after.starts_with(&all), "{after:?}");
    assert_eq!(count_lines(&after, "GET /followed 404"), 1);

    // An unknown backend: a clear error and a non-zero exit.
    let (code, out, err) = logs(&dev, "nosuchbackend", &[]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out:?}");
    assert!(err.contains("no backend nosuchbackend"), "{err}");
}

/// Removes the containers of the named docker drones when dropped.
struct Containers(&'static [&'static str]);

impl Drop for Containers {
    fn drop(&mut self) {
        remove_containers(self.0);
    }
}

/// A Docker backend's output comes from its container while it runs, and from the drone's
/// archive once it has ended and its container is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangar_logs_shows_a_docker_backends_output_after_its_container_is_gone() {
    ensure_demo_image();
    remove_containers(&["dk-l1"]);
    let _cleanup = Containers(&["dk-l1"]);
    let dir = tempfile::tempdir().unwrap();
    let serve = Dev::start_serve(
        &dir.path().join("serve"),
        &["--drone-secret", SECRET, "--lease-ttl", "2", "--dns", "off"],
    );
    let _drone = Drone::start(
        &serve,
        "dk-l1",
        "docker",
        dir.path(),
        &["--stop-grace", "2"],
    )
    .await;
    let r = serve
        .connect(json!({"key": {"name": "docker-logs"}, "spawn": {"image": "hangar-demo:dev"}}))
        .await;
    let id = r.backend_id.as_str();
    let v = serve.wait_ready(id).await;
    assert_eq!(v.drone.as_deref(), Some("dk-l1"));
    assert_eq!(serve.count(&r).await, 1);

    let all = logs_until(&serve, id, &[], |out| {
        out.contains("listening on ") && count_lines(out, "GET /count 200") == 1
    })
    .await;
    assert!(listened(&all), "{all:?}");

    let follow = Follow::start(&serve, id, &["--tail", "1"]);
    follow.until_line("GET /count 200");
    assert_eq!(get(&serve, &r, "/in-docker").await, 404);
    follow.until_line("GET /in-docker 404");
    drop(follow);

    let (code, _, err) = cli(&[
        &["terminate", id][..],
        &api_flags(&serve)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ]
    .concat());
    assert_eq!(code, 0, "{err}");
    serve
        .wait_for(id, "terminated", |v| v.state.name() == "terminated")
        .await;
    let deadline = Instant::now() + DEADLINE;
    while !containers_of("dk-l1", true).is_empty() {
        assert!(Instant::now() < deadline, "the container was not removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, after, err) = logs(&serve, id, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(listened(&after), "{after:?}");
    assert_eq!(count_lines(&after, "GET /count 200"), 1, "{after:?}");
    assert_eq!(count_lines(&after, "GET /in-docker 404"), 1, "{after:?}");
}

#[test]
fn log_flags_out_of_range_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (code, _, err) = dev_cli(data, &["--log-max-bytes", "100"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--log-max-bytes 100 is too small"), "{err}");
    let (code, _, err) = dev_cli(data, &["--log-retention", "0s"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--log-retention"), "{err}");
}
