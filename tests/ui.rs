//! The operator dashboard (`/ui`) in a real headless Chromium, driven through chromedriver's
//! W3C WebDriver API: it loads without console errors, follows the cluster live (a connect
//! shows up without a reload, a terminate changes the state shown), its drone list matches
//! `/v1/drones`, and it asks for a token where the API needs one. A screenshot of the overview
//! is written to the test artifacts (`$HANGAR_TEST_ARTIFACTS`, else `target/test-artifacts/`).
//! Needs Debian's `chromium` and `chromium-driver` (`scripts/test.sh` installs them).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::{DEADLINE, Dev};

/// The W3C name of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver, in a process group of its own so that the browsers it starts go with it.
struct Driver {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Driver {
    fn start() -> Driver {
        let missing = |what: &str| {
            panic!(
                "{what} is not installed: the dashboard test drives a real headless Chromium; install Debian's `chromium chromium-driver` (apt-get install -y chromium chromium-driver; scripts/test.sh does)"
            )
        };
        if Command::new("chromedriver")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            missing("chromedriver");
        }
        if chromium().is_none() {
            missing("chromium");
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("start chromedriver")
        };
        Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    /// A new headless browser session, once chromedriver answers.
    async fn session(&self) -> Session {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let ready = self
                .http
                .get(format!("{}/status", self.base))
                .send()
                .await
                .ok()
                .and_then(|r| r.status().is_success().then_some(()));
            if ready.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut options = json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
            ],
        });
        if let Some(bin) = chromium() {
            options["binary"] = json!(bin);
        }
        let r: Value = self
            .http
            .post(format!("{}/session", self.base))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": options,
                "goog:loggingPrefs": {"browser": "ALL"},
            }}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver refused a session: {r}"))
            .to_string();
        Session {
            url: format!("{}/session/{id}", self.base),
            http: self.http.clone(),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the browsers it started.
        let pgid = self.child.id() as i32;
        // SAFETY: kill(2) with a negative pid signals the process group we created.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Debian's browser binary.
fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

/// One browser session.
struct Session {
    url: String,
    http: reqwest::Client,
}

impl Session {
    /// A WebDriver command; its `value`, or the test fails with the driver's error.
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(
            status.is_success(),
            "WebDriver {method} {path}: {status} {v}"
        );
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Waits until `script` returns something truthy (at most `within`), and returns it.
    async fn wait(&self, what: &str, within: Duration, script: &str, args: Value) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.js(script, args.clone()).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Array(a) => !a.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() >= deadline {
                let page = self
                    .js(
                        "return document.querySelector('#view').innerText",
                        json!([]),
                    )
                    .await;
                panic!("the page never showed {what} within {within:?}; it shows:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The WebDriver id of the element `css` selects.
    async fn find(&self, css: &str) -> String {
        let found = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT].as_str().expect("element id").to_string()
    }

    /// Clicks the element `css` selects, as a user would (WebDriver element click). A live
    /// page may replace the element between finding and clicking it: then it is found again.
    async fn click(&self, css: &str) {
        for _ in 0..5 {
            let id = self.find(css).await;
            let r = self
                .http
                .post(format!("{}/element/{id}/click", self.url))
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            if status.is_success() {
                return;
            }
            assert_eq!(
                v["value"]["error"], "stale element reference",
                "WebDriver click on {css}: {status} {v}"
            );
        }
        panic!("{css} kept being replaced before it could be clicked");
    }

    /// Types `text` into the element `css` selects.
    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// The browser's console since the last call: `(level, source, message)`.
    async fn console(&self) -> Vec<(String, String, String)> {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/se/log",
                Some(json!({"type": "browser"})),
            )
            .await;
        v.as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
                (s("level"), s("source"), s("message"))
            })
            .collect()
    }

    async fn screenshot(&self) -> Vec<u8> {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 screenshot"))
            .unwrap()
    }

    async fn quit(self) {
        let _ = self.http.delete(&self.url).send().await;
    }
}

/// Where this run keeps its artifacts.
fn artifacts() -> PathBuf {
    let dir = std::env::var_os("HANGAR_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Console entries that are errors.
fn severe(log: &[(String, String, String)]) -> Vec<&(String, String, String)> {
    log.iter()
        .filter(|(level, _, _)| level == "SEVERE")
        .collect()
}

/// The drones the overview shows: `[name, state]` per row.
const DRONE_ROWS: &str = "return Array.from(document.querySelectorAll('#drone-table tbody tr')).map(tr => [tr.dataset.drone, tr.querySelector('.badge').textContent])";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_follows_the_cluster_live_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path(), &[]);
    let driver = Driver::start();
    let web = driver.session().await;

    // The overview loads, goes live, counts the backend there is and lists the drones
    // `/v1/drones` lists.
    let first = dev.connect_key("ui-first").await;
    dev.wait_ready(first.backend_id.as_str()).await;
    web.goto(&dev.api_url("/ui")).await;
    web.wait(
        "the live indicator",
        DEADLINE,
        "return document.querySelector('#live').dataset.live === 'live'",
        json!([]),
    )
    .await;
    let api: Value = dev.get_json("/v1/drones").await;
    let mut expected: Vec<(String, String)> = api["drones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    expected.sort();
    assert!(!expected.is_empty(), "dev has its embedded drone: {api}");
    let shown = web
        .wait("the drones", DEADLINE, DRONE_ROWS, json!([]))
        .await;
    let mut shown: Vec<(String, String)> = serde_json::from_value(shown).unwrap();
    shown.sort();
    assert_eq!(shown, expected, "the overview's drones are /v1/drones'");
    web.wait(
        "the control plane and the backends by state",
        DEADLINE,
        "const n = document.querySelector('#live-count'); return n !== null && n.textContent === '1' && document.querySelector('#cluster .body').innerText.includes('leader')",
        json!([]),
    )
    .await;
    let png = web.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let shot = artifacts().join("ui-overview.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("screenshot of the overview: {}", shot.display());
    let log = web.console().await;
    assert!(
        severe(&log).is_empty(),
        "console errors on load: {:?}",
        severe(&log)
    );

    // Backends: a connect shows up within 2 s, without a reload.
    web.click("#nav a[data-nav=backends]").await;
    web.wait(
        "the backend list",
        DEADLINE,
        "return !document.querySelector('#backend-summary').textContent.includes('Loading')",
        json!([]),
    )
    .await;
    web.js("window.__not_reloaded = true", json!([])).await;
    let conn = dev.connect_key("ui-doc").await;
    let id = conn.backend_id.to_string();
    let connected = Instant::now();
    web.wait(
        "the new backend",
        Duration::from_secs(2),
        "return document.querySelector(`#backend-rows tr[data-backend-id=\"${arguments[0]}\"]`) !== null",
        json!([id]),
    )
    .await;
    eprintln!("the connect showed up after {:?}", connected.elapsed());
    assert_eq!(
        web.js("return window.__not_reloaded === true", json!([]))
            .await,
        json!(true),
        "the page was not reloaded"
    );

    // Its page: terminate it with the button; the state shown changes.
    web.click(&format!("#backend-rows tr[data-backend-id=\"{id}\"] a"))
        .await;
    web.wait(
        "the backend page, ready",
        DEADLINE,
        "const s = document.querySelector('#backend-state'); return s !== null && s.dataset.status === 'ready'",
        json!([]),
    )
    .await;
    // Its logs: the backend's output, or a message saying why there is none.
    let logs = web
        .wait(
            "the logs pane filled",
            DEADLINE,
            "const l = document.querySelector('#logs'), n = document.querySelector('#logs-note'); return l.textContent || (!n.hidden && n.textContent)",
            json!([]),
        )
        .await;
    eprintln!("the logs pane shows: {logs}");
    web.click("#terminate").await;
    web.click("#terminate-confirm").await;
    let state = web
        .wait(
            "the backend terminating",
            DEADLINE,
            "const s = document.querySelector('#backend-state').dataset.status; return (s === 'terminating' || s === 'terminated') && s",
            json!([]),
        )
        .await;
    eprintln!("after the click the page shows {state}");
    web.wait(
        "the backend terminated, on its timeline too",
        DEADLINE,
        "return document.querySelector('#backend-state').dataset.status === 'terminated' && document.querySelector('#timeline li[data-state=terminated]') !== null",
        json!([]),
    )
    .await;
    let view = dev.backend(&id).await;
    assert_eq!(view.state.name(), "terminated");

    // Back on the list, another backend terminated through the API changes state in place.
    web.click("#nav a[data-nav=backends]").await;
    let other = dev.connect_key("ui-doc-2").await;
    let other = other.backend_id.to_string();
    let row_state = "const r = document.querySelector(`#backend-rows tr[data-backend-id=\"${arguments[0]}\"] .badge`); return r && r.dataset.status";
    web.wait(
        "the second backend",
        Duration::from_secs(2),
        row_state,
        json!([other]),
    )
    .await;
    let r = dev
        .http
        .post(dev.api_url(&format!("/v1/backends/{other}/terminate")))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    web.wait(
        "the second backend terminated",
        DEADLINE,
        &format!("{row_state} === 'terminated'"),
        json!([other]),
    )
    .await;
    assert_eq!(
        web.js(row_state, json!([id])).await,
        json!("terminated"),
        "the first one is listed as terminated"
    );

    // Hot and pools render (nothing hot, no pool).
    web.click("#nav a[data-nav=hot]").await;
    web.wait(
        "the hot page",
        DEADLINE,
        "const b = document.querySelector('#hot-backends .body'); return b && b.innerText.includes('Nothing is hot')",
        json!([]),
    )
    .await;
    web.click("#nav a[data-nav=pools]").await;
    web.wait(
        "the pools page",
        DEADLINE,
        "const b = document.querySelector('#pools .body'); return b && !b.innerText.includes('Loading')",
        json!([]),
    )
    .await;

    // No script error anywhere. The backend page asks for logs, which a hangar without the
    // logs endpoint answers with a 404 the browser reports as a failed load: that one only.
    let log = web.console().await;
    eprintln!("the browser's console: {log:?}");
    let errors: Vec<_> = severe(&log)
        .into_iter()
        .filter(|(_, source, message)| !(source == "network" && message.contains("/logs?")))
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    web.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_serve_the_dashboard_is_open_and_asks_for_the_api_token() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Dev::start_serve(
        dir.path(),
        &["--drone-secret", "ui-test-secret", "--dns", "off"],
    );
    let token = serve.token.clone().expect("serve wrote an admin token");
    let bare = reqwest::Client::new();
    let r = bare.get(serve.api_url("/ui")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the page needs no token");
    assert!(r.text().await.unwrap().contains("/ui/app.js"));
    for asset in ["/ui/app.js", "/ui/app.css"] {
        let r = bare.get(serve.api_url(asset)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{asset}");
    }
    let r = bare
        .get(serve.api_url("/v1/backends"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the API still does");

    // In the browser: the first 401 asks for the token; once given, the page loads.
    let driver = Driver::start();
    let web = driver.session().await;
    web.goto(&serve.api_url("/ui")).await;
    web.wait(
        "the token prompt",
        DEADLINE,
        "return !document.querySelector('#token-dialog').hidden",
        json!([]),
    )
    .await;
    web.type_into("#token-input", &token).await;
    web.click("#token-form button[type=submit]").await;
    web.wait(
        "the overview with the token",
        DEADLINE,
        "return document.querySelector('#live').dataset.live === 'live' && document.querySelector('#drones .body').innerText.includes('No drone')",
        json!([]),
    )
    .await;
    assert_eq!(
        web.js("return sessionStorage.getItem('hangar.token')", json!([]))
            .await,
        json!(token),
        "kept in the session"
    );
    // The refused calls before the token are network errors; no script failed.
    let log = web.console().await;
    let errors: Vec<_> = severe(&log)
        .into_iter()
        .filter(|(_, source, _)| source != "network")
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    web.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_traffic_shows_its_request_rate_and_latency() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path(), &[]);
    let conn = dev.connect_key("busy").await;
    let id = conn.backend_id.to_string();
    dev.wait_ready(&id).await;
    // A first request makes the proxy report the backend (the scheduler's baseline).
    dev.count(&conn).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..40 {
        dev.count(&conn).await;
    }
    // Counted in the step they fell in, shown once that step is over (steps are 5 s).
    let deadline = Instant::now() + DEADLINE;
    loop {
        let t: Value = dev.get_json(&format!("/v1/backends/{id}/traffic")).await;
        assert_eq!(t["step_s"], 5);
        let samples = t["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 60, "five minutes of 5 s steps");
        let requests: u64 = samples
            .iter()
            .map(|s| s["requests"].as_u64().unwrap())
            .sum();
        if requests >= 40 {
            let busy: Vec<&Value> = samples.iter().filter(|s| s["requests"] != 0).collect();
            for s in &busy {
                assert!(s["requests_per_second"].as_f64().unwrap() > 0.0, "{s}");
                let ms = s["mean_latency_ms"].as_f64().expect("a mean latency");
                assert!(ms > 0.0 && ms < 5_000.0, "{s}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the traffic never showed the 40 requests: {t}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = dev
        .http
        .get(dev.api_url("/v1/backends/nosuchbackend/traffic"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
