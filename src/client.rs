//! Client verbs (`connect`, `ls`, `status`, `terminate`) against the HTTP API.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use hangar_core::api::{
    BackendList, BackendView, ConnectRequest, ConnectResponse, DrainRequest, DroneList, DroneView,
    ErrorBody, SpawnSpec, TerminateRequest,
};
use hangar_core::{BackendState, KeyRef};
use hangar_scheduler::api::events::ClusterEvent;
use hangar_scheduler::api::{MaintenanceRequest, MaintenanceView};
use hangar_scheduler::api_tokens::{CreateTokenRequest, CreatedToken, Scope, TokenView};
use hangar_scheduler::quotas::{Quota, QuotaList};
use serde::de::DeserializeOwned;

use crate::cli::{
    ClientArgs, ClientOnlyArgs, ConnectArgs, DrainArgs, IdArgs, LsArgs, NameArgs, TerminateArgs,
};

/// How often `connect --wait` polls the backend's status.
const WAIT_POLL: Duration = Duration::from_millis(100);

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let base = args.api_url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(crate::ConfigError(format!(
                "--api {base:?} must be an http:// or https:// URL"
            ))
            .into());
        }
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = args.api_token.as_deref() {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| {
                    crate::ConfigError(
                        "--api-token (HANGAR_TOKEN) has characters a header cannot carry".into(),
                    )
                })?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let tls = crate::tls::client_config(args.ca.as_deref())?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .default_headers(headers)
            .use_preconfigured_tls((*tls).clone())
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Api { http, base })
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req.send().await.map_err(|e| {
            // The whole cause chain: a refused connection and an untrusted certificate need
            // different fixes.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why.push_str(": ");
                why.push_str(&s.to_string());
                source = s.source();
            }
            let hint = if why.contains("certificate") || why.contains("UnknownIssuer") {
                "the API's TLS certificate is not trusted: pass its CA with --ca or HANGAR_CA"
            } else {
                "is Hangar running there? set --api or HANGAR_API"
            };
            anyhow::anyhow!(
                "cannot reach the Hangar API at {}: {why} ({hint})",
                self.base
            )
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("cannot read the API's answer")?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| format!("{} ({})", b.error.message, b.error.code))
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            anyhow::bail!("the API answered {status}: {msg}");
        }
        serde_json::from_slice(&bytes).context("the API's answer is not what this client expects")
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
}

/// A text table: each column as wide as its widest cell, `>` columns aligned right; the last
/// column is not padded.
struct Table {
    headers: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns by header; a header starting with `>` is right-aligned (the `>` is not shown).
    fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.trim_start_matches('>')).collect(),
            right: headers.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut out = String::new();
            for (i, cell) in cells.enumerate().take(n) {
                if i > 0 {
                    out.push_str("  ");
                }
                let pad = widths[i].saturating_sub(cell.chars().count());
                if self.right[i] {
                    out.extend(std::iter::repeat_n(' ', pad));
                    out.push_str(cell);
                } else {
                    out.push_str(cell);
                    if i + 1 < n {
                        out.extend(std::iter::repeat_n(' ', pad));
                    }
                }
            }
            out.trim_end().to_string() + "\n"
        };
        let mut out = line(&mut self.headers.iter().copied());
        for row in &self.rows {
            out.push_str(&line(&mut row.iter().map(String::as_str)));
        }
        out
    }

    fn print(&self) {
        print!("{}", self.render());
    }
}

/// A capacity figure: `used/total`, or `used/unlimited` for a drone that sets no limit.
fn of_capacity(used: u64, total: u64) -> String {
    if total >= u64::from(u32::MAX) {
        format!("{used}/unlimited")
    } else {
        format!("{used}/{total}")
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub async fn connect(args: ConnectArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let command = args.command.map(|c| {
        if c.len() == 1 {
            c[0].split_whitespace().map(str::to_string).collect()
        } else {
            c
        }
    });
    let spawn = SpawnSpec {
        command,
        image: args.image,
        idle_timeout_s: args.idle_timeout,
        lifetime_s: args.lifetime,
        ..SpawnSpec::default()
    };
    let req = ConnectRequest {
        key: Some(KeyRef::new(args.namespace, args.key)),
        spawn: (spawn != SpawnSpec::default()).then_some(spawn),
        user: args.user,
        public: args.public,
    };
    let mut resp: ConnectResponse = api.post("/v1/connect", &req).await?;
    if args.wait {
        let view = wait_ready(&api, &resp, !args.client.json).await?;
        resp.status = view.state.name().to_string();
        if !view.state.is_live() || view.state != BackendState::Ready {
            let why = view.message.unwrap_or_default();
            eprintln!("error: backend {} ended as {}: {why}", view.id, view.state);
            return Ok(ExitCode::FAILURE);
        }
    }
    if args.client.json {
        print_json(&resp)?;
    } else {
        println!(
            "backend  {} ({})",
            resp.backend_id,
            if resp.spawned { "new" } else { "existing" }
        );
        println!("status   {}", resp.status);
        println!("url      {}", resp.url);
        println!("token    {}", resp.token);
        println!(
            "try      curl -H 'Authorization: Bearer {}' {}",
            resp.token, resp.url
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls the backend until it is ready or ended, showing a spinner with the state on a TTY.
/// Progress of a long wait on stderr: a spinner with the current state when stderr is a
/// terminal, a plain line per change otherwise, nothing when hidden (`--json`).
struct Progress {
    show: bool,
    tty: bool,
    frame: usize,
    last: String,
}

impl Progress {
    fn new(show: bool) -> Progress {
        Progress {
            show,
            tty: show && std::io::stderr().is_terminal(),
            frame: 0,
            last: String::new(),
        }
    }

    fn update(&mut self, state: String) {
        const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        if self.tty {
            eprint!("\r{} {state:<60}", FRAMES[self.frame % FRAMES.len()]);
            let _ = std::io::stderr().flush();
            self.frame += 1;
        } else if self.show && state != self.last {
            eprintln!("{state}");
        }
        self.last = state;
    }

    fn done(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

async fn wait_ready(api: &Api, resp: &ConnectResponse, show: bool) -> anyhow::Result<BackendView> {
    let mut progress = Progress::new(show);
    let path = format!("/v1/backends/{}", resp.backend_id);
    loop {
        let view: BackendView = api.get(&path).await?;
        progress.update(format!("{} {}", view.id, view.state));
        if view.state == BackendState::Ready || !view.state.is_live() {
            progress.done();
            return Ok(view);
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

pub async fn ls(args: LsArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let path = match &args.status {
        Some(s) => format!("/v1/backends?status={s}"),
        None => "/v1/backends".to_string(),
    };
    let list: BackendList = api.get(&path).await?;
    if args.client.json {
        print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&["ID", "STATUS", "KEY", "DRONE"]);
    for b in &list.backends {
        table.row(vec![
            b.id.to_string(),
            b.state.to_string(),
            b.key
                .as_ref()
                .map(|k| k.to_string())
                .unwrap_or_else(|| "-".into()),
            b.drone.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    table.print();
    Ok(ExitCode::SUCCESS)
}

fn print_view(v: &BackendView) {
    println!("id          {}", v.id);
    println!("status      {}", v.state);
    if let Some(k) = &v.key {
        println!("key         {k} (epoch {})", v.epoch);
    }
    println!("drone       {}", v.drone.as_deref().unwrap_or("-"));
    println!(
        "address     {}",
        v.address
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into())
    );
    if let Some(m) = &v.message {
        println!("message     {m}");
    }
}

pub async fn status(args: IdArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let view: BackendView = api.get(&format!("/v1/backends/{}", args.id)).await?;
    if args.client.json {
        print_json(&view)?;
    } else {
        print_view(&view);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn terminate(args: TerminateArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let view: BackendView = api
        .post(
            &format!("/v1/backends/{}/terminate", args.id),
            &TerminateRequest { hard: args.hard },
        )
        .await?;
    if args.client.json {
        print_json(&view)?;
    } else {
        print_view(&view);
    }
    Ok(ExitCode::SUCCESS)
}

/// Parses `60s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration_s(s: &str) -> Result<u64, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "{s:?} is not a whole number of seconds: use e.g. 90, 60s or 5m"
        ));
    }
    Ok(d.as_secs())
}

/// Parses a duration: a whole number with an optional unit, `ms`, `s`, `m` or `h` (seconds
/// without one), e.g. `500ms`, `90`, `60s`, `5m` or `1h`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let (num, unit_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1_000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3_600_000)
    } else if let Some(n) = t.strip_suffix('d') {
        (n, 86_400_000)
    } else {
        (t, 1_000)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use e.g. 500ms, 90, 60s, 5m, 1h or 90d"))?;
    n.checked_mul(unit_ms)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long a duration"))
}

fn print_drones(list: &DroneList) {
    let mut table = Table::new(&[
        "NAME",
        "STATE",
        "RUNTIME",
        "POOL",
        ">CPU(m)",
        ">MEMORY(MB)",
        ">BACKENDS",
        ">LIVE",
        ">HEARTBEAT",
        "INSTANCE",
    ]);
    let mut messages = Vec::new();
    for d in &list.drones {
        let cap = d.capacity.unwrap_or_default();
        let live: u64 = d
            .backends
            .iter()
            .filter(|(s, _)| s.as_str() != "terminated")
            .map(|(_, n)| n)
            .sum();
        table.row(vec![
            d.name.clone(),
            d.state.clone(),
            d.runtime.clone().unwrap_or_else(|| "-".into()),
            d.pool.clone().unwrap_or_else(|| "-".into()),
            of_capacity(d.reserved.cpu_millis, cap.cpu_millis),
            of_capacity(d.reserved.memory_mb, cap.memory_mb),
            of_capacity(d.reserved.backends, cap.max_backends),
            live.to_string(),
            d.heartbeat_age_ms
                .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            d.instance.clone().unwrap_or_else(|| "-".into()),
        ]);
        if let Some(m) = &d.message {
            messages.push(format!("{}: {m}", d.name));
        }
    }
    table.print();
    for m in messages {
        println!("  {m}");
    }
}

/// The time of day (UTC) as `HH:MM:SS`.
fn time_of_day() -> String {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// `hangar events`: follows the cluster's events until interrupted.
pub async fn events(args: ClientOnlyArgs) -> anyhow::Result<ExitCode> {
    use futures_util::StreamExt;
    let api = Api::new(&args.client)?;
    // A follow has no end: no total timeout (the server sends a keep-alive every 15 s).
    let resp = api
        .http
        .get(format!("{}/v1/events", api.base))
        .timeout(Duration::from_secs(10 * 365 * 86_400))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Hangar API at {}: {e}", api.base))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<ErrorBody>(&body)
            .map(|b| b.error.message)
            .unwrap_or(body);
        anyhow::bail!("the API answered {status}: {msg}");
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the event stream broke")?;
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let Ok(e) = serde_json::from_str::<ClusterEvent>(data.trim()) else {
                continue;
            };
            let text = if args.client.json {
                serde_json::to_string(&e)?
            } else {
                let detail = e.detail.as_deref().filter(|d| !d.is_empty());
                format!(
                    "{}  {:<7} {:<14} {}{}",
                    time_of_day(),
                    e.kind,
                    e.id,
                    e.what,
                    detail.map(|d| format!("  ({d})")).unwrap_or_default()
                )
            };
            // Stdout closed (`| head`): done.
            if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    anyhow::bail!(
        "the API closed the event stream (the instance stopped?): run hangar events again"
    )
}

pub async fn drones(args: ClientOnlyArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let list: DroneList = api.get("/v1/drones").await?;
    if args.client.json {
        print_json(&list)?;
    } else {
        print_drones(&list);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn drain(args: DrainArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let deadline_s = match &args.deadline {
        Some(d) => Some(parse_duration_s(d).map_err(crate::ConfigError)?),
        None => None,
    };
    let mut view: DroneView = api
        .post(
            &format!("/v1/drones/{}/drain", args.name),
            &DrainRequest { deadline_s },
        )
        .await?;
    if args.wait {
        let mut progress = Progress::new(!args.client.json);
        while view.state != "drained" {
            let live: u64 = view
                .backends
                .iter()
                .filter(|(s, _)| s.as_str() != "terminated")
                .map(|(_, n)| n)
                .sum();
            progress.update(format!(
                "{} {}: {live} live backends",
                view.name, view.state
            ));
            tokio::time::sleep(WAIT_POLL * 5).await;
            let list: DroneList = api.get("/v1/drones").await?;
            view = list
                .drones
                .into_iter()
                .find(|d| d.name == args.name)
                .ok_or_else(|| anyhow::anyhow!("drone {} disappeared while draining", args.name))?;
        }
        progress.done();
    }
    if args.client.json {
        print_json(&view)?;
    } else {
        println!("{} {}", view.name, view.state);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn undrain(args: NameArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let view: DroneView = api
        .post(
            &format!("/v1/drones/{}/undrain", args.name),
            &serde_json::json!({}),
        )
        .await?;
    if args.client.json {
        print_json(&view)?;
    } else {
        println!("{} {}", view.name, view.state);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn revoke(args: crate::cli::RevokeArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let body = serde_json::json!({
        "token": args.token,
        "backend": args.backend,
        "user": args.user,
    });
    let body: serde_json::Map<String, serde_json::Value> = body
        .as_object()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .collect();
    let v: serde_json::Value = api.post("/v1/tokens/revoke", &body).await?;
    if args.client.json {
        print_json(&v)?;
    } else {
        println!("revoked {}", v["revoked"]);
    }
    Ok(ExitCode::SUCCESS)
}

/// `hangar hot`: what the hot-shard detector flags now, and why.
fn print_tokens(tokens: &[TokenView]) {
    let mut table = Table::new(&[
        "ID",
        "SCOPE",
        "NAMESPACE",
        ">CREATED",
        ">EXPIRES",
        "DESCRIPTION",
    ]);
    for t in tokens {
        table.row(vec![
            t.id.clone(),
            t.scope.as_str().to_string(),
            t.namespace.clone().unwrap_or_else(|| "-".into()),
            t.created_at.to_string(),
            t.expires_at
                .map_or_else(|| "never".into(), |e| e.to_string()),
            t.description.clone().unwrap_or_default(),
        ]);
    }
    table.print();
}

pub async fn token(cmd: crate::cli::TokenCommand) -> anyhow::Result<ExitCode> {
    use crate::cli::TokenCommand;
    match cmd {
        TokenCommand::Create(args) => {
            let scope: Scope = args.scope.parse().map_err(crate::ConfigError)?;
            let ttl_s = match &args.ttl {
                Some(t) => Some(parse_duration_s(t).map_err(crate::ConfigError)?),
                None => None,
            };
            let api = Api::new(&args.client)?;
            let created: CreatedToken = api
                .post(
                    "/v1/tokens",
                    &CreateTokenRequest {
                        scope: Some(scope),
                        namespace: args.namespace,
                        ttl_s,
                        description: args.description,
                    },
                )
                .await?;
            if args.client.json {
                print_json(&created)?;
            } else {
                println!("{}", created.token);
                eprintln!(
                    "token {} ({} scope{}) created: it is shown this once, keep it secret",
                    created.record.id,
                    created.record.scope,
                    created
                        .record
                        .namespace
                        .as_deref()
                        .map(|n| format!(", namespace {n}"))
                        .unwrap_or_default()
                );
            }
        }
        TokenCommand::Ls(args) => {
            let api = Api::new(&args.client)?;
            let tokens: Vec<TokenView> = api.get("/v1/tokens").await?;
            if args.client.json {
                print_json(&tokens)?;
            } else {
                print_tokens(&tokens);
            }
        }
        TokenCommand::Revoke(args) => {
            let api = Api::new(&args.client)?;
            let view: TokenView = api.delete(&format!("/v1/tokens/{}", args.name)).await?;
            if args.client.json {
                print_json(&view)?;
            } else {
                println!("token {} ({} scope) revoked", view.id, view.scope);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn quota(cmd: crate::cli::QuotaCommand) -> anyhow::Result<ExitCode> {
    use crate::cli::QuotaCommand;
    let (client, list): (&ClientArgs, QuotaList) = match &cmd {
        QuotaCommand::Set(args) => {
            let api = Api::new(&args.client)?;
            let quota = Quota {
                max_live: args.max_live,
                connects_per_second: args.connects_per_second,
            };
            let list = api
                .send(
                    api.http
                        .put(format!("{}/v1/quotas/{}", api.base, args.namespace))
                        .json(&quota),
                )
                .await?;
            (&args.client, list)
        }
        QuotaCommand::Ls(args) => (
            &args.client,
            Api::new(&args.client)?.get("/v1/quotas").await?,
        ),
        QuotaCommand::Rm(args) => {
            let api = Api::new(&args.client)?;
            (
                &args.client,
                api.delete(&format!("/v1/quotas/{}", args.name)).await?,
            )
        }
    };
    if client.json {
        print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&["NAMESPACE", ">MAX LIVE", ">CONNECTS/SECOND"]);
    for (ns, q) in &list {
        table.row(vec![
            ns.clone(),
            q.max_live.map_or_else(|| "-".into(), |n| n.to_string()),
            q.connects_per_second
                .map_or_else(|| "-".into(), |r| r.to_string()),
        ]);
    }
    table.print();
    Ok(ExitCode::SUCCESS)
}

fn print_maintenance(view: &MaintenanceView) {
    match &view.window {
        Some(w) => println!(
            "maintenance window in force: no drone is declared lost for {:.0}s more (until {} ms since the epoch)",
            w.until.saturating_sub(view.now) as f64 / 1000.0,
            w.until
        ),
        None => println!("no maintenance window in force"),
    }
}

pub async fn maintenance_start(args: crate::cli::MaintenanceStartArgs) -> anyhow::Result<ExitCode> {
    let for_s = parse_duration_s(&args.length).map_err(crate::ConfigError)?;
    let api = Api::new(&args.client)?;
    let view: MaintenanceView = api
        .post("/v1/maintenance", &MaintenanceRequest { for_s })
        .await?;
    if args.client.json {
        print_json(&view)?;
    } else {
        print_maintenance(&view);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn maintenance_status(args: ClientOnlyArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let view: MaintenanceView = api.get("/v1/maintenance").await?;
    if args.client.json {
        print_json(&view)?;
    } else {
        print_maintenance(&view);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn cluster(args: ClientOnlyArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let view: hangar_scheduler::api::ClusterView = api.get("/v1/cluster").await?;
    if args.client.json {
        print_json(&view)?;
        return Ok(ExitCode::SUCCESS);
    }
    match &view.leader {
        Some(l) => println!("leader: {} at {} (term {})", l.instance, l.api_url, l.term),
        None => println!("leader: none elected"),
    }
    match (&view.store.healthy, &view.store.error) {
        (true, _) => println!(
            "store: healthy (revision {})",
            view.store.revision.unwrap_or_default()
        ),
        (false, e) => println!("store: unhealthy: {}", e.as_deref().unwrap_or("?")),
    }
    let width = view
        .instances
        .iter()
        .map(|i| i.instance.len())
        .max()
        .unwrap_or(8)
        .max("INSTANCE".len());
    println!("{:<width$}  {:<6}  API", "INSTANCE", "ROLE");
    for i in &view.instances {
        let role = if i.leader { "leader" } else { "follower" };
        let here = if i.instance == view.this_instance {
            " (answered this request)"
        } else {
            ""
        };
        println!("{:<width$}  {:<6}  {}{here}", i.instance, role, i.api_url);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn hot(args: ClientOnlyArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let list: hangar_core::api::HotList = api.get("/v1/hot").await?;
    if args.client.json {
        print_json(&list)?;
    } else {
        print_hot(&list);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_hot(list: &hangar_core::api::HotList) {
    let s = &list.settings;
    let reasons = |r: &[hangar_core::api::HotReason]| {
        r.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(",")
    };
    let num = |v: Option<f64>, digits: usize| match v {
        Some(v) => format!("{v:.digits$}"),
        None => "-".into(),
    };
    if list.evaluated_at == 0 {
        println!("the detector has not run yet");
        return;
    }
    if list.backends.is_empty() && list.drones.is_empty() {
        println!(
            "nothing is hot (window {}s, sustained {}s; a backend is hot above {}× its pool's median and {} req/s, or {}% of its CPU cap)",
            s.window_s,
            s.sustain_s,
            s.rate_multiple,
            s.min_rate,
            s.cpu_fraction * 100.0
        );
    }
    if !list.backends.is_empty() {
        println!(
            "{:<28} {:<12} {:<10} {:>10} {:>12} {:>8} {:>8}  REASONS",
            "BACKEND", "DRONE", "POOL", "REQ/S", "POOL MEDIAN", "CPU", "CAP"
        );
        for b in &list.backends {
            println!(
                "{:<28} {:<12} {:<10} {:>10} {:>12} {:>8} {:>8}  {}",
                b.backend.as_str(),
                b.drone.as_deref().unwrap_or("-"),
                b.pool,
                num(b.requests_per_second, 1),
                num(b.pool_median_requests_per_second, 1),
                num(b.cpu_cores, 2),
                num(b.cpu_cap_cores, 2),
                reasons(&b.reasons),
            );
        }
    }
    if !list.drones.is_empty() {
        if !list.backends.is_empty() {
            println!();
        }
        println!(
            "{:<14} {:>10} {:>10} {:>13} {:>13}  REASONS",
            "DRONE", "CPU", "CAPACITY", "RESERVED CPU", "RESERVED MEM"
        );
        for d in &list.drones {
            println!(
                "{:<14} {:>10.2} {:>10.2} {:>12.0}% {:>12.0}%  {}",
                d.drone,
                d.cpu_cores,
                d.cpu_capacity_cores,
                d.reserved_cpu_fraction * 100.0,
                d.reserved_memory_fraction * 100.0,
                reasons(&d.reasons),
            );
        }
    }
    if s.relieve {
        println!("relocated so far: {}", list.relocated_total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn tables_line_up_and_unlimited_capacity_says_so() {
        let mut t = Table::new(&["NAME", ">CPU(m)", "NOTE"]);
        t.row(vec![
            "local".into(),
            of_capacity(100, u64::from(u32::MAX)),
            String::new(),
        ]);
        t.row(vec![
            "a-much-longer-name".into(),
            of_capacity(5, 1000),
            "x".into(),
        ]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        // Every row's right-aligned column ends where its header does.
        let end = lines[0].find("CPU(m)").unwrap() + "CPU(m)".len();
        assert_eq!(lines[1].find("100/unlimited").unwrap() + 13, end, "{text}");
        assert_eq!(lines[2].find("5/1000").unwrap() + 6, end, "{text}");
        assert!(!text.contains("4294967295"), "{text}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{text}");
    }

    #[test]
    fn durations_take_units_and_refuse_what_they_cannot_hold() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 90 "), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        for bad in ["", "soon", "1.5s", "-1s", "5w"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("not a duration"), "{bad:?}: {err}");
        }
        let huge = format!("{}h", u64::MAX);
        assert!(parse_duration(&huge).unwrap_err().contains("too long"));
        // The drain deadline is whole seconds on the wire.
        assert_eq!(parse_duration_s("1000ms"), Ok(1));
        assert!(
            parse_duration_s("1500ms")
                .unwrap_err()
                .contains("whole number")
        );
    }
}
