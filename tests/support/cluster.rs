//! Test support for clusters: `hangar drone` processes attached to a `hangar serve`, and the
//! Docker engine (the demo image, container listings, inspect).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hangar_core::api::{DroneList, DroneView};

use super::{BIN, DEADLINE, Dev};

/// The secret the test clusters share.
pub const SECRET: &str = "test-drone-secret";

/// A running `hangar drone`.
pub struct Drone {
    child: Child,
    pub name: String,
    /// The drone's own metrics listener, once it has reported it.
    metrics: std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
}

impl Drone {
    /// Starts a drone for `serve` and waits until the scheduler lists it as ready.
    pub async fn start(
        serve: &Dev,
        name: &str,
        runtime: &str,
        dir: &Path,
        extra: &[&str],
    ) -> Drone {
        let d = Self::spawn(serve, name, runtime, dir, extra);
        serve.wait_drone(name, "ready").await;
        d
    }

    /// Starts a docker drone without waiting for it to be ready.
    pub fn start_unready(serve: &Dev, name: &str, dir: &Path, extra: &[&str]) -> Drone {
        Self::spawn(serve, name, "docker", dir, extra)
    }

    /// Starts a drone without waiting for it.
    pub fn spawn(serve: &Dev, name: &str, runtime: &str, dir: &Path, extra: &[&str]) -> Drone {
        Self::spawn_in(None, serve, name, runtime, dir, extra)
    }

    /// Starts a drone without waiting for it, inside network namespace `ns` when given.
    pub fn spawn_in(
        ns: Option<&str>,
        serve: &Dev,
        name: &str,
        runtime: &str,
        dir: &Path,
        extra: &[&str],
    ) -> Drone {
        let url = format!("http://{}", serve.api);
        Self::spawn_for(ns, &url, name, runtime, dir, extra)
    }

    /// Starts a drone for the scheduler(s) at `scheduler` (its `--scheduler`: one API URL, or
    /// several comma-separated) without waiting for it.
    pub fn spawn_for(
        ns: Option<&str>,
        scheduler: &str,
        name: &str,
        runtime: &str,
        dir: &Path,
        extra: &[&str],
    ) -> Drone {
        let mut child = super::command_in(ns)
            .args(["drone", "--scheduler", scheduler])
            .args([
                "--name",
                name,
                "--secret",
                SECRET,
                "--runtime",
                runtime,
                "--data-dir",
            ])
            .arg(dir.join(name))
            // Docker drones run only allowed images: the test images are all hangar-*.
            .args(
                if runtime == "docker" && !extra.contains(&"--allow-image") {
                    &["--allow-image", "hangar-*"][..]
                } else {
                    &[][..]
                },
            )
            .args(if extra.contains(&"--metrics") {
                &[][..]
            } else {
                &["--metrics", "127.0.0.1:0"][..]
            })
            .args(extra)
            .env("HANGAR_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hangar drone");
        let stdout = child.stdout.take().expect("stdout");
        let metrics = std::sync::Arc::new(std::sync::Mutex::new(None));
        let reported = metrics.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("hangar drone: metrics listening on ")
                    && let Ok(addr) = a.trim().parse()
                {
                    *reported.lock().unwrap() = Some(addr);
                }
            }
        });
        Drone {
            child,
            name: name.to_string(),
            metrics,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The drone's metrics listener (it reports it before joining the scheduler).
    pub fn metrics(&self) -> Option<std::net::SocketAddr> {
        *self.metrics.lock().unwrap()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Drone {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl Dev {
    pub async fn drones(&self) -> Vec<DroneView> {
        let list: DroneList = self.get_json("/v1/drones").await;
        list.drones
    }

    pub async fn drone(&self, name: &str) -> Option<DroneView> {
        self.drones().await.into_iter().find(|d| d.name == name)
    }

    /// Polls `GET /v1/drones` until `name` is in `state`.
    pub async fn wait_drone(&self, name: &str, state: &str) -> DroneView {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(d) = self.drone(name).await
                && d.state == state
            {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "drone {name} never became {state}: {:?}",
                self.drone(name).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Builds `hangar-demo:dev` with `scripts/demo-image.sh` unless it exists.
pub fn ensure_demo_image() {
    let exists = Command::new("docker")
        .args(["image", "inspect", "hangar-demo:dev"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("docker CLI")
        .success();
    if !exists {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let status = Command::new("bash")
            .arg(root.join("scripts/demo-image.sh"))
            .status()
            .expect("run scripts/demo-image.sh");
        assert!(status.success(), "scripts/demo-image.sh failed");
    }
}

/// Container ids carrying `hangar.drone=<drone>`.
pub fn containers_of(drone: &str, all: bool) -> Vec<String> {
    let mut cmd = Command::new("docker");
    cmd.args(["ps", "-q", "--filter"])
        .arg(format!("label=hangar.drone={drone}"));
    if all {
        cmd.arg("-a");
    }
    let out = cmd.output().expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

/// `docker inspect -f <format> <container>`.
pub fn inspect(container: &str, format: &str) -> String {
    let out = Command::new("docker")
        .args(["inspect", "-f", format, container])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes every container of these drones (test cleanup).
pub fn remove_containers(drones: &[&str]) {
    for d in drones {
        let ids = containers_of(d, true);
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// A running `hangar proxy` following a `hangar serve`.
pub struct RemoteProxy {
    child: Child,
    pub addr: std::net::SocketAddr,
    /// Its metrics listener.
    pub metrics: Option<std::net::SocketAddr>,
}

impl RemoteProxy {
    pub fn start(serve: &Dev) -> RemoteProxy {
        let key = std::fs::read_to_string(serve.data_dir.join("token.key")).unwrap();
        Self::start_for(&format!("http://{}", serve.api), key.trim())
    }

    /// Starts a remote proxy following the scheduler(s) at `scheduler` (one API URL, or
    /// several comma-separated) with the token key `key_hex`.
    pub fn start_for(scheduler: &str, key_hex: &str) -> RemoteProxy {
        Self::start_with(scheduler, key_hex, &[])
    }

    /// [`RemoteProxy::start_for`] with `extra` flags.
    pub fn start_with(scheduler: &str, key_hex: &str, extra: &[&str]) -> RemoteProxy {
        let mut child = Command::new(BIN)
            .args(["proxy", "--scheduler", scheduler])
            .args(extra)
            .args([
                "--secret",
                SECRET,
                "--proxy",
                "127.0.0.1:0",
                "--name",
                "edge",
                "--metrics",
                "127.0.0.1:0",
            ])
            .env("HANGAR_TOKEN_KEY", key_hex)
            .env("HANGAR_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hangar proxy");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + DEADLINE;
        let mut metrics = None;
        let addr = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("hangar proxy did not report its address");
            // Reported before the proxy's own address.
            if let Some(a) = line.strip_prefix("hangar proxy: metrics listening on ") {
                metrics = a.trim().parse().ok();
            }
            if let Some(a) = line.strip_prefix("hangar proxy: proxy listening on ") {
                break a.trim().parse().unwrap();
            }
        };
        RemoteProxy {
            child,
            addr,
            metrics,
        }
    }
}

impl Drop for RemoteProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
