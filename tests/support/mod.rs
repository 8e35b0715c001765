//! Test support: start `hangar dev` in a scratch directory, read the addresses it reports,
//! talk to its API and proxy, and kill it on drop.

#![allow(dead_code)]

pub mod cluster;
pub mod netns;
pub mod prometheus;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hangar_core::api::{BackendView, ConnectResponse};
use hangar_core::token::TokenKey;
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_hangar");

/// A command running the hangar binary, in network namespace `ns` when given.
pub fn command_in(ns: Option<&str>) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    }
}

/// How long a test waits for a condition before failing.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// An HTTP client that sends `token` as the bearer credential, if given.
fn client(token: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
    }
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .default_headers(headers)
        .build()
        .unwrap()
}

/// A running `hangar dev`.
pub struct Dev {
    child: Child,
    pub api: SocketAddr,
    pub proxy: SocketAddr,
    /// The DNS listener (UDP and TCP), unless started with `--dns off`.
    pub dns: Option<SocketAddr>,
    /// The metrics listener (`GET /metrics`), unless started with `--metrics off`.
    pub metrics: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// Sends the API token (if any) with every request.
    pub http: reqwest::Client,
    /// The API token `http` sends: the admin token `serve` wrote to its data directory.
    pub token: Option<String>,
}

impl Dev {
    /// Starts `hangar dev` on fresh ports with `data_dir`, plus `extra` arguments, and waits
    /// until it reports its listeners. DNS listens on a fresh port too unless `extra` sets
    /// `--dns`.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Dev {
        Self::start_role("dev", data_dir, extra)
    }

    /// Starts `hangar serve` (no embedded drone) like [`Dev::start`].
    pub fn start_serve(data_dir: &Path, extra: &[&str]) -> Dev {
        Self::start_role("serve", data_dir, extra)
    }

    fn start_role(role: &str, data_dir: &Path, extra: &[&str]) -> Dev {
        Self::start_role_in(None, role, data_dir, extra)
    }

    /// Starts `role` like [`Dev::start`], inside network namespace `ns` when given (`ip netns
    /// exec`, which execs: the child is hangar itself).
    pub fn start_role_in(ns: Option<&str>, role: &str, data_dir: &Path, extra: &[&str]) -> Dev {
        Self::start_command(command_in(ns), role, data_dir, extra)
    }

    /// Starts `hangar dev` like [`Dev::start`] on CPU 0 alone (`taskset -c 0`, which execs:
    /// the child is hangar itself), as on a one-core machine.
    pub fn start_on_one_core(data_dir: &Path, extra: &[&str]) -> Dev {
        let mut taskset = Command::new("taskset");
        taskset.args(["-c", "0", BIN]);
        Self::start_command(taskset, "dev", data_dir, extra)
    }

    /// Starts `role` like [`Dev::start`] by `command` (the hangar binary, or a command that
    /// execs it).
    fn start_command(mut command: Command, role: &str, data_dir: &Path, extra: &[&str]) -> Dev {
        let dns_arg = extra.iter().position(|a| *a == "--dns");
        let default_dns: &[&str] = if dns_arg.is_some() {
            &[]
        } else {
            &["--dns", "127.0.0.1:0"]
        };
        let expect_dns = dns_arg.is_none_or(|i| extra.get(i + 1) != Some(&"off"));
        let metrics_arg = extra.iter().position(|a| *a == "--metrics");
        let default_metrics: &[&str] = if metrics_arg.is_some() {
            &[]
        } else {
            &["--metrics", "127.0.0.1:0"]
        };
        let expect_metrics = metrics_arg.is_none_or(|i| extra.get(i + 1) != Some(&"off"));
        // Fresh ports unless `extra` names one (a restart on the same API address).
        let mut defaults: Vec<&str> = vec![role];
        for flag in ["--api", "--proxy"] {
            if !extra.contains(&flag) {
                defaults.extend([flag, "127.0.0.1:0"]);
            }
        }
        defaults.push("--data-dir");
        let mut child = command
            .args(&defaults)
            .arg(data_dir)
            .args(default_dns)
            .args(default_metrics)
            .args(extra)
            // HANGAR_TEST_LOG overrides the filter (e.g. `info,hangar_store=debug`).
            .env(
                "HANGAR_LOG",
                std::env::var("HANGAR_TEST_LOG").unwrap_or("info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hangar dev");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Keep draining so the child never blocks on a full pipe.
                    continue;
                }
            }
        });
        let (mut api, mut proxy, mut dns, mut metrics) = (None, None, None, None);
        let deadline = Instant::now() + DEADLINE;
        while api.is_none()
            || proxy.is_none()
            || (expect_dns && dns.is_none())
            || (expect_metrics && metrics.is_none())
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .expect("hangar did not report its addresses in time");
            let Some(rest) = line.strip_prefix(&format!("hangar {role}: ")) else {
                continue;
            };
            if let Some(a) = rest.strip_prefix("api listening on ") {
                api = Some(a.trim().parse().expect("api address"));
            }
            if let Some(a) = rest.strip_prefix("proxy listening on ") {
                proxy = Some(a.trim().parse().expect("proxy address"));
            }
            if let Some(a) = rest.strip_prefix("dns listening on ") {
                dns = Some(a.trim().parse().expect("dns address"));
            }
            if let Some(a) = rest.strip_prefix("metrics listening on ") {
                metrics = Some(a.trim().parse().expect("metrics address"));
            }
        }
        // `serve` wrote its first admin token before reporting its addresses.
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_string());
        Dev {
            child,
            api: api.unwrap(),
            proxy: proxy.unwrap(),
            dns,
            metrics,
            data_dir: data_dir.to_path_buf(),
            http: client(token.as_deref()),
            token,
        }
    }

    /// Sends `token` with every API request from now on (an instance that did not create the
    /// cluster's first admin token has none in its data directory).
    pub fn use_token(&mut self, token: &str) {
        self.token = Some(token.to_string());
        self.http = client(Some(token));
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// The token key `hangar dev` generated into its data directory.
    pub fn token_key(&self) -> TokenKey {
        let hex = std::fs::read_to_string(self.data_dir.join("token.key")).unwrap();
        TokenKey::from_hex(&hex).unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        send_signal(self.child.id(), libc::SIGTERM);
        wait_child(&mut self.child, DEADLINE).expect("hangar dev did not exit after SIGTERM")
    }

    /// `POST /v1/connect` with `body`; returns the status and JSON.
    pub async fn connect_raw(&self, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.api_url("/v1/connect"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap())
    }

    pub async fn connect(&self, body: Value) -> ConnectResponse {
        let (status, v) = self.connect_raw(body).await;
        assert!(
            status == 200 || status == 201,
            "connect failed: {status} {v}"
        );
        serde_json::from_value(v).unwrap()
    }

    pub async fn connect_key(&self, key: &str) -> ConnectResponse {
        self.connect(json!({"key": {"name": key}})).await
    }

    /// `GET` an API path and decode its JSON answer.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        self.http
            .get(self.api_url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `GET /metrics` from a metrics listener, checking the Prometheus text format.
    pub async fn scrape(&self, addr: SocketAddr) -> String {
        let r = self
            .http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        r.text().await.unwrap()
    }

    pub async fn backend(&self, id: &str) -> BackendView {
        let r = self
            .http
            .get(self.api_url(&format!("/v1/backends/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "status of {id}");
        r.json().await.unwrap()
    }

    /// Polls the backend until `pred` holds (or fails the test at the deadline).
    pub async fn wait_for(
        &self,
        id: &str,
        what: &str,
        pred: impl Fn(&BackendView) -> bool,
    ) -> BackendView {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let v = self.backend(id).await;
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "backend {id} never became {what}; last: {v:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_ready(&self, id: &str) -> BackendView {
        self.wait_for(id, "ready", |v| v.state.name() == "ready")
            .await
    }

    /// A request through the proxy naming the backend by Host, with a bearer token.
    pub fn get_by_host(&self, id: &str, token: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(self.proxy_url(path))
            .header(
                "host",
                format!("{id}.hangar.localhost:{}", self.proxy.port()),
            )
            .bearer_auth(token)
    }

    pub async fn count(&self, resp: &ConnectResponse) -> u64 {
        count_of(self.get_by_host(resp.backend_id.as_str(), &resp.token, "/count")).await
    }
}

/// Sends `req` and returns the response body, whatever the status.
pub async fn text(req: reqwest::RequestBuilder) -> String {
    req.send().await.unwrap().text().await.unwrap()
}

/// Sends a `/count` request to the demo backend and returns the count (asserting a 200).
pub async fn count_of(req: reqwest::RequestBuilder) -> u64 {
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap().parse().unwrap()
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we own (our child) and a valid signal number.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True while a process with this pid exists (and is not a zombie we could reap).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Runs `hangar dev` on free loopback ports with `data_dir` and `extra` flags until it exits
/// (for configuration errors, which exit before binding anything).
pub fn dev_cli(data_dir: &str, extra: &[&str]) -> (i32, String, String) {
    let base = [
        "dev",
        "--api",
        "127.0.0.1:0",
        "--proxy",
        "127.0.0.1:0",
        "--data-dir",
        data_dir,
    ];
    let args: Vec<&str> = base.iter().chain(extra).copied().collect();
    cli(&args)
}

/// Runs the `hangar` CLI and returns (exit code, stdout, stderr).
pub fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run hangar");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A test CA and a certificate for 127.0.0.1 and localhost signed by it, as PEM files in
/// `dir`: (ca.pem, cert.pem, key.pem).
pub fn test_pki(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}
