//! Test support: a real Prometheus server (Debian's `prometheus` package) scraping Hangar's
//! metrics listener every second, with its storage in a scratch directory, queried through
//! its HTTP API, and killed on drop.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long Prometheus may take to start answering.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// The `prometheus` executable, if installed. Without it the test fails when `CI` is set (the
/// test script installs it) and says it is skipped otherwise.
pub fn binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("prometheus"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "prometheus is not installed: apt-get install prometheus (scripts/test.sh does)"
        );
        eprintln!("skipped: prometheus is not installed (apt-get install prometheus)");
    }
    found
}

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    pub url: String,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

/// A free loopback port: bound to port 0, then released for Prometheus to take.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Prometheus {
    /// Starts Prometheus scraping `target`'s `/metrics` every second, and waits until it is
    /// ready. Retries on another port if the chosen one was taken in the meantime.
    pub async fn start(bin: &PathBuf, target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: hangar\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let log_path = dir.path().join("prometheus.log");
        for attempt in 1..=3 {
            let port = free_port();
            let url = format!("http://127.0.0.1:{port}");
            let mut child = Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log_path).unwrap())
                .spawn()
                .expect("start prometheus");
            match wait_ready(&mut child, &http, &url).await {
                Ok(()) => {
                    return Prometheus {
                        child,
                        url,
                        dir,
                        http,
                    };
                }
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    assert!(attempt < 3, "prometheus did not start: {why}\n{log}");
                    eprintln!("prometheus did not start ({why}); retrying on another port");
                }
            }
        }
        unreachable!("the last attempt panics")
    }

    /// Its log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Runs an instant PromQL query; returns the result vector as (labels, value) pairs.
    pub async fn query(&self, promql: &str) -> Vec<(serde_json::Map<String, Value>, f64)> {
        let r = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .await
            .expect("query prometheus");
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert!(status.is_success(), "query {promql:?} failed: {body}");
        assert_eq!(body["status"], "success", "{body}");
        body["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let labels = s["metric"].as_object().cloned().unwrap_or_default();
                let value = s["value"][1].as_str().unwrap().parse::<f64>().unwrap();
                (labels, value)
            })
            .collect()
    }
}

/// Waits until Prometheus answers `/-/ready`; fails if it exits or takes too long.
async fn wait_ready(child: &mut Child, http: &reqwest::Client, url: &str) -> Result<(), String> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("it exited with {status}"));
        }
        if let Ok(r) = http.get(format!("{url}/-/ready")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("not ready within {START_DEADLINE:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
