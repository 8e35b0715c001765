//! Client verbs (`connect`, `ls`, `status`, `logs`, `terminate`, `pool`, ...) against the HTTP
//! API.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use hangar_core::api::{
    BackendList, BackendView, ConnectRequest, ConnectResponse, DrainRequest, DroneList, DroneView,
    ErrorBody, SpawnSpec, TerminateRequest,
};
use hangar_core::pool::{
    CreatePool, Pool, PoolList, PoolSettings, RollbackRequest, RolloutRequest, Template,
    validate_name,
};
use hangar_core::{BackendState, KeyRef, UnixMillis};
use hangar_scheduler::api::events::ClusterEvent;
use hangar_scheduler::api::{MaintenanceRequest, MaintenanceView};
use hangar_scheduler::api_tokens::{CreateTokenRequest, CreatedToken, Scope, TokenView};
use hangar_scheduler::quotas::{Quota, QuotaList};
use serde::de::DeserializeOwned;

use crate::cli::{
    ClientArgs, ClientOnlyArgs, ConnectArgs, DrainArgs, IdArgs, LogsArgs, LsArgs, NameArgs,
    PoolCommand, PoolTuningArgs, TerminateArgs,
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
        let bytes = self.send_raw(req).await?;
        serde_json::from_slice(&bytes).context("the API's answer is not what this client expects")
    }

    /// Sends a request and returns the body of a successful answer (empty for a 204).
    async fn send_raw(&self, req: reqwest::RequestBuilder) -> anyhow::Result<bytes::Bytes> {
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
        Ok(bytes)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    /// A `DELETE` answered with no body (204).
    async fn delete_empty(&self, path: &str) -> anyhow::Result<()> {
        self.send_raw(self.http.delete(format!("{}{path}", self.base)))
            .await
            .map(drop)
    }

    async fn patch<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.http.patch(format!("{}{path}", self.base)).json(body))
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

/// A `--command`: its words, or one string split on spaces.
fn command_words(c: Vec<String>) -> Vec<String> {
    if c.len() == 1 {
        c[0].split_whitespace().map(str::to_string).collect()
    } else {
        c
    }
}

pub async fn connect(args: ConnectArgs) -> anyhow::Result<ExitCode> {
    if let Some(pool) = &args.pool {
        validate_name(pool).map_err(crate::ConfigError)?;
    }
    let api = Api::new(&args.client)?;
    let command = args.command.map(command_words);
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
        pool: args.pool,
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
    out: Box<dyn Write + Send>,
}

impl Progress {
    fn new(show: bool) -> Progress {
        Progress::to(
            Box::new(std::io::stderr()),
            show,
            show && std::io::stderr().is_terminal(),
        )
    }

    /// Progress written to `out`, as a spinner when `tty`.
    fn to(out: Box<dyn Write + Send>, show: bool, tty: bool) -> Progress {
        Progress {
            show,
            tty,
            frame: 0,
            last: String::new(),
            out,
        }
    }

    fn update(&mut self, state: String) {
        const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
        if self.tty {
            let _ = write!(
                self.out,
                "\r{} {state:<60}",
                FRAMES[self.frame % FRAMES.len()]
            );
            let _ = self.out.flush();
            self.frame += 1;
        } else if self.show && state != self.last {
            let _ = writeln!(self.out, "{state}");
        }
        self.last = state;
    }

    fn done(&mut self) {
        if self.tty {
            let _ = writeln!(self.out);
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

/// Parses an environment variable, `KEY=VALUE` (the value may hold `=` and be empty).
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE: use e.g. --env MODE=fast")),
    }
}

/// Parses a share in percent, 1 to 100, with or without `%` (`10%`, `10`).
pub fn parse_percent(s: &str) -> Result<u8, String> {
    let t = s.trim();
    let n = t.strip_suffix('%').unwrap_or(t).trim();
    match n.parse::<u8>() {
        Ok(p) if (1..=100).contains(&p) => Ok(p),
        _ => Err(format!(
            "{s:?} is not a percentage from 1 to 100: use e.g. 10% or 10"
        )),
    }
}

/// A span of time for people: `45s`, `4m 12s`, `2h 3m`, `3d 4h`.
fn span(ms: u64) -> String {
    let s = ms / 1000;
    let (big, big_unit, small, small_unit) = match s {
        0..60 => return format!("{s}s"),
        60..3600 => (s / 60, "m", s % 60, "s"),
        3600..86_400 => (s / 3600, "h", s / 60 % 60, "m"),
        _ => (s / 86_400, "d", s / 3600 % 24, "h"),
    };
    if small == 0 {
        format!("{big}{big_unit}")
    } else {
        format!("{big}{big_unit} {small}{small_unit}")
    }
}

/// `at` relative to `now`: `12s ago` or `in 4m`.
fn relative(at: UnixMillis, now: UnixMillis) -> String {
    if at <= now {
        format!("{} ago", span(now - at))
    } else {
        format!("in {}", span(at - now))
    }
}

/// A moment in UTC, `2023-11-14 22:13:20Z`.
fn utc(at: UnixMillis) -> String {
    let secs = at / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since the epoch to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A moment with how long ago (or until) it is: `2023-11-14 22:13:20Z (5m ago)`.
fn when(at: UnixMillis, now: UnixMillis) -> String {
    format!("{} ({})", utc(at), relative(at, now))
}

fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as UnixMillis)
        .unwrap_or_default()
}

/// At most `max` characters, the cut marked with `…`.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// Widest template shown in a table column.
const TEMPLATE_WIDTH: usize = 40;

/// What a template runs: its image, or its command's words.
fn template_runs(t: &Template) -> String {
    match (&t.image, &t.command) {
        (Some(image), _) => image.clone(),
        (None, Some(command)) => command.join(" "),
        (None, None) => "(cluster default)".into(),
    }
}

/// A template in full, for `pool show`: what it runs, then its environment's names (not
/// their values, which may be secrets: `--json` shows them), resources and timeouts.
fn template_detail(t: &Template) -> String {
    let mut out = match (&t.image, &t.command) {
        (Some(image), _) => format!("image {image}"),
        (None, Some(command)) => format!("command {}", command.join(" ")),
        (None, None) => "the cluster's default backend".into(),
    };
    if !t.env.is_empty() {
        let names: Vec<&str> = t.env.keys().map(String::as_str).collect();
        out.push_str(&format!("; env {}", names.join(", ")));
    }
    if let Some(r) = &t.resources {
        if let Some(cpu) = r.cpu_millis {
            out.push_str(&format!("; cpu {cpu}m"));
        }
        if let Some(mem) = r.memory_mb {
            out.push_str(&format!("; memory {mem}MB"));
        }
    }
    if let Some(s) = t.idle_timeout_s {
        out.push_str(&format!("; idle timeout {}", span(s * 1000)));
    }
    if let Some(s) = t.lifetime_s {
        out.push_str(&format!("; lifetime {}", span(s * 1000)));
    }
    out
}

/// Warm backends: `ready/target`, and those starting: `3/5 (+2 starting)`.
fn warm_cell(p: &Pool) -> String {
    let mut out = format!("{}/{}", p.status.warm_ready, p.warm);
    if p.status.warm_starting > 0 {
        out.push_str(&format!(" (+{} starting)", p.status.warm_starting));
    }
    out
}

/// The generation new sessions get, and the one rolling out: `1 → 2 (20%)`.
fn generation_cell(p: &Pool) -> String {
    match &p.rollout {
        Some(r) => format!(
            "{} → {} ({}%)",
            p.generation, r.generation, r.canary_percent
        ),
        None => p.generation.to_string(),
    }
}

fn max_live_text(p: &Pool) -> String {
    match p.max_live {
        Some(n) if n > 0 => n.to_string(),
        _ => "unlimited".into(),
    }
}

/// `hangar pool ls`.
fn render_pools(list: &PoolList) -> String {
    let mut table = Table::new(&[
        "NAME",
        ">WARM",
        ">CLAIMED",
        "GENERATION",
        "TEMPLATE",
        ">FAILED",
    ]);
    for p in &list.pools {
        let template = p
            .template(p.generation)
            .map_or_else(|| "-".into(), template_runs);
        table.row(vec![
            p.name.clone(),
            warm_cell(p),
            p.status.claimed.to_string(),
            generation_cell(p),
            truncate(&template, TEMPLATE_WIDTH),
            p.status.failed_starts.to_string(),
        ]);
    }
    table.render()
}

/// A pool's settings on one line (`pool set`, `pool create`).
fn render_pool_settings(p: &Pool) -> String {
    format!(
        "pool {}: warm {}, max live {}, drone pool {}, max add {}, max remove {}, promote after {}",
        p.name,
        p.warm,
        max_live_text(p),
        p.drone_pool,
        p.bounds.max_add,
        p.bounds.max_remove,
        p.promote_after
    )
}

/// `hangar pool show`, with times relative to `now`.
fn render_pool(p: &Pool, now: UnixMillis) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        out.push_str(&format!("{label:<16}{value}\n"));
    };
    line("pool", p.name.clone());
    line(
        "generation",
        match &p.rollout {
            Some(r) => format!(
                "{} ({} rolling out to {}% of new sessions)",
                p.generation, r.generation, r.canary_percent
            ),
            None => p.generation.to_string(),
        },
    );
    line(
        "template",
        p.template(p.generation)
            .map_or_else(|| "-".into(), template_detail),
    );
    let s = &p.status;
    line(
        "warm",
        format!(
            "{} ready of {}{}",
            s.warm_ready,
            p.warm,
            if s.warm_starting > 0 {
                format!(", {} starting", s.warm_starting)
            } else {
                String::new()
            }
        ),
    );
    line("claimed", s.claimed.to_string());
    line("max live", max_live_text(p));
    line("drone pool", p.drone_pool.clone());
    line(
        "bounds",
        format!(
            "start up to {}, stop up to {} a pass",
            p.bounds.max_add, p.bounds.max_remove
        ),
    );
    line(
        "promote after",
        format!("{} healthy starts of a canary", p.promote_after),
    );
    line(
        "failed starts",
        if s.consecutive_failures > 0 {
            format!("{} ({} in a row)", s.failed_starts, s.consecutive_failures)
        } else {
            s.failed_starts.to_string()
        },
    );
    if let Some(msg) = &s.last_failure {
        let at = s
            .last_failure_at
            .map(|at| format!(" ({}, {})", utc(at), relative(at, now)))
            .unwrap_or_default();
        line("last failure", format!("{msg}{at}"));
    }
    if let Some(step) = s.slow_start {
        line(
            "slow start",
            format!("starting up to {step} a pass after failures"),
        );
    }
    line("created", when(p.created_at, now));
    line("updated", when(p.updated_at, now));
    if let Some(r) = &p.rollout {
        out.push('\n');
        let mut line = |label: &str, value: String| {
            out.push_str(&format!("{label:<16}{value}\n"));
        };
        line(
            "rollout",
            format!(
                "generation {} to {}% of new sessions",
                r.generation, r.canary_percent
            ),
        );
        line(
            "  template",
            p.template(r.generation)
                .map_or_else(|| "-".into(), template_detail),
        );
        line("  started", when(r.started_at, now));
        line(
            "  health",
            format!(
                "{} healthy, {} failed (promoted at {} healthy, reverted at {}% failed)",
                r.healthy, r.failed, p.promote_after, r.max_failure_percent
            ),
        );
        line(
            "  deadline",
            format!("{}: reverted unless promoted", when(r.deadline_at, now)),
        );
    }
    if !p.generations.is_empty() {
        out.push_str("\ngenerations\n");
        let mut table = Table::new(&[">NUMBER", "STATUS", "CREATED", "TEMPLATE", "MESSAGE"]);
        for g in &p.generations {
            table.row(vec![
                g.number.to_string(),
                g.status.clone(),
                utc(g.created_at),
                truncate(&template_runs(&g.template), TEMPLATE_WIDTH),
                g.message.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&table.render());
    }
    out
}

/// What `pool rollout` started.
fn render_rollout_started(p: &Pool, now: UnixMillis) -> String {
    match &p.rollout {
        Some(r) if r.canary_percent < 100 => format!(
            "pool {}: generation {} rolling out to {}% of new sessions (generation {} for the rest): promote it with `hangar pool promote {}`, or it reverts {}",
            p.name,
            r.generation,
            r.canary_percent,
            p.generation,
            p.name,
            relative(r.deadline_at, now)
        ),
        Some(r) => format!(
            "pool {}: generation {} rolling out to every new session: promote it with `hangar pool promote {}`, or it reverts {}",
            p.name,
            r.generation,
            p.name,
            relative(r.deadline_at, now)
        ),
        None => format!(
            "pool {}: new sessions get generation {}",
            p.name, p.generation
        ),
    }
}

fn pool_settings(
    warm: Option<u32>,
    max_live: Option<u32>,
    drone_pool: Option<String>,
    tuning: PoolTuningArgs,
) -> PoolSettings {
    PoolSettings {
        warm,
        max_live,
        drone_pool,
        max_add: tuning.max_add,
        max_remove: tuning.max_remove,
        promote_after: tuning.promote_after,
    }
}

/// `hangar pool ...`.
pub async fn pool(cmd: PoolCommand) -> anyhow::Result<ExitCode> {
    // Names go into URL paths: checked here, so that no name reaches another endpoint.
    let (client, name) = match &cmd {
        PoolCommand::Ls(a) => (a.client.clone(), None),
        PoolCommand::Create(a) => (a.client.clone(), Some(&a.name)),
        PoolCommand::Show(a) | PoolCommand::Delete(a) | PoolCommand::Promote(a) => {
            (a.client.clone(), Some(&a.name))
        }
        PoolCommand::Set(a) => (a.client.clone(), Some(&a.name)),
        PoolCommand::Rollout(a) => (a.client.clone(), Some(&a.name)),
        PoolCommand::Rollback(a) => (a.client.clone(), Some(&a.name)),
    };
    if let Some(name) = name {
        validate_name(name).map_err(crate::ConfigError)?;
    }
    let api = Api::new(&client)?;
    let print = |pool: &Pool, text: String| -> anyhow::Result<ExitCode> {
        if client.json {
            print_json(pool)?;
        } else {
            println!("{text}");
        }
        Ok(ExitCode::SUCCESS)
    };
    match cmd {
        PoolCommand::Ls(_) => {
            let list: PoolList = api.get("/v1/pools").await?;
            if client.json {
                print_json(&list)?;
            } else {
                print!("{}", render_pools(&list));
            }
            Ok(ExitCode::SUCCESS)
        }
        PoolCommand::Create(a) => {
            let resources = (a.cpu_millis.is_some() || a.memory_mb.is_some()).then_some(
                hangar_core::api::Resources {
                    cpu_millis: a.cpu_millis,
                    memory_mb: a.memory_mb,
                },
            );
            let body = CreatePool {
                name: a.name,
                settings: pool_settings(a.warm, a.max_live, a.drone_pool, a.tuning),
                template: Template {
                    command: a.command.map(command_words),
                    image: a.image,
                    env: a.env.into_iter().collect(),
                    resources,
                    idle_timeout_s: a.idle_timeout,
                    lifetime_s: a.lifetime,
                },
            };
            let pool: Pool = api.post("/v1/pools", &body).await?;
            let text = format!("created {}", render_pool_settings(&pool));
            print(&pool, text)
        }
        PoolCommand::Show(a) => {
            let pool: Pool = api.get(&format!("/v1/pools/{}", a.name)).await?;
            let text = render_pool(&pool, now_millis());
            print(&pool, text.trim_end().to_string())
        }
        PoolCommand::Set(a) => {
            let body = pool_settings(a.warm, a.max_live, a.drone_pool, a.tuning);
            if body == PoolSettings::default() {
                return Err(crate::ConfigError(
                    "nothing to change: give --warm, --max-live, --drone-pool, --max-add, --max-remove or --promote-after".into(),
                )
                .into());
            }
            let pool: Pool = api.patch(&format!("/v1/pools/{}", a.name), &body).await?;
            let text = render_pool_settings(&pool);
            print(&pool, text)
        }
        PoolCommand::Delete(a) => {
            api.delete_empty(&format!("/v1/pools/{}", a.name)).await?;
            if !client.json {
                println!("pool {} deleted", a.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        PoolCommand::Rollout(a) => {
            let body = RolloutRequest {
                image: a.image,
                command: a.command.map(command_words),
                env: (!a.env.is_empty()).then(|| a.env.into_iter().collect()),
                canary_percent: a.canary,
                deadline_s: a.deadline,
                max_failure_percent: a.max_failure_percent,
            };
            let pool: Pool = api
                .post(&format!("/v1/pools/{}/rollout", a.name), &body)
                .await?;
            let text = render_rollout_started(&pool, now_millis());
            print(&pool, text)
        }
        PoolCommand::Promote(a) => {
            let pool: Pool = api
                .post(
                    &format!("/v1/pools/{}/promote", a.name),
                    &serde_json::json!({}),
                )
                .await?;
            let text = format!(
                "pool {}: generation {} promoted: every new session gets it",
                pool.name, pool.generation
            );
            print(&pool, text)
        }
        PoolCommand::Rollback(a) => {
            let pool: Pool = api
                .post(
                    &format!("/v1/pools/{}/rollback", a.name),
                    &RollbackRequest { to: a.to },
                )
                .await?;
            let text = format!(
                "pool {}: new sessions get generation {} again",
                pool.name, pool.generation
            );
            print(&pool, text)
        }
    }
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

/// `hangar logs`: prints a backend's output as it arrives; with `--follow` until the backend
/// ends (or Ctrl-C, whose default action ends the process).
pub async fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    use futures_util::StreamExt;
    let api = Api::new(&args.client)?;
    let mut url = format!(
        "{}/v1/backends/{}/logs?follow={}",
        api.base, args.id, args.follow
    );
    if let Some(n) = args.tail {
        url.push_str(&format!("&tail={n}"));
    }
    // A follow has no end, and a long log takes its time: no total timeout.
    let resp = api
        .http
        .get(url)
        .timeout(Duration::from_secs(10 * 365 * 86_400))
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the Hangar API at {}: {e} (is Hangar running there? set --api or HANGAR_API)",
                api.base
            )
        })?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<ErrorBody>(&body)
            .map(|b| format!("{} ({})", b.error.message, b.error.code))
            .unwrap_or(body);
        anyhow::bail!("the API answered {status}: {msg}");
    }
    let mut stream = resp.bytes_stream();
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the log stream broke (the API instance stopped?)")?;
        // Stdout closed (`| head`): done.
        if out.write_all(&chunk).and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
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

    /// A wait shows a spinner redrawn in place on a terminal, one plain line per change
    /// elsewhere, and nothing when hidden.
    #[test]
    fn progress_spins_on_a_terminal_and_prints_lines_otherwise() {
        #[derive(Clone, Default)]
        struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let states = ["b1 scheduled", "b1 starting", "b1 starting", "b1 ready"];
        let run = |show: bool, tty: bool| {
            let sink = Sink::default();
            let mut p = Progress::to(Box::new(sink.clone()), show, tty);
            for s in states {
                p.update(s.to_string());
            }
            p.done();
            String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
        };
        assert_eq!(run(true, false), "b1 scheduled\nb1 starting\nb1 ready\n");
        let spun = run(true, true);
        assert_eq!(
            spun.matches('\r').count(),
            4,
            "redrawn once per poll: {spun:?}"
        );
        assert!(
            spun.contains("⠋ b1 scheduled") && spun.ends_with('\n'),
            "{spun:?}"
        );
        assert_eq!(run(false, false), "");
    }

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

    use hangar_core::pool::{Bounds, Generation, PoolStatus, Rollout};

    /// 2023-11-14 22:13:20Z.
    const NOW: UnixMillis = 1_700_000_000_000;

    fn generation(number: u64, status: &str, template: Template) -> Generation {
        Generation {
            number,
            template,
            created_at: NOW - 3_600_000 * number,
            status: status.into(),
            message: None,
        }
    }

    fn image(i: &str) -> Template {
        Template {
            image: Some(i.into()),
            ..Template::default()
        }
    }

    fn pool(name: &str, warm: u32) -> Pool {
        Pool {
            name: name.into(),
            warm,
            max_live: None,
            drone_pool: "default".into(),
            bounds: Bounds::for_warm(warm),
            promote_after: 3,
            generation: 1,
            rollout: None,
            generations: vec![generation(1, "stable", image("room:1"))],
            status: PoolStatus {
                warm_ready: warm,
                ..PoolStatus::default()
            },
            created_at: NOW - 86_400_000,
            updated_at: NOW - 5_000,
        }
    }

    fn with_rollout(mut p: Pool, canary: u8) -> Pool {
        p.generations
            .push(generation(2, "rolling", image("room:2")));
        p.rollout = Some(Rollout {
            generation: 2,
            canary_percent: canary,
            started_at: NOW - 60_000,
            deadline_at: NOW + 240_000,
            max_failure_percent: 50,
            healthy: 1,
            failed: 1,
        });
        p
    }

    #[test]
    fn pool_ls_lines_up_warm_generation_and_template() {
        let mut starting = pool("game-rooms", 5);
        starting.status.warm_ready = 3;
        starting.status.warm_starting = 2;
        starting.status.claimed = 12;
        starting.status.failed_starts = 4;
        let mut long = pool("w", 20);
        long.generations[0].template = Template {
            command: Some(vec![
                "/usr/local/bin/worker".into(),
                "--listen".into(),
                "0.0.0.0:8080".into(),
                "--verbose".into(),
            ]),
            ..Template::default()
        };
        let list = PoolList {
            pools: vec![starting, with_rollout(pool("p", 10), 20), long],
        };
        let text = render_pools(&list);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].contains("3/5 (+2 starting)"), "{text}");
        assert!(lines[2].contains("10/10 "), "{text}");
        assert!(!lines[2].contains("starting"), "{text}");
        assert!(lines[2].contains("1 → 2 (20%)"), "{text}");
        assert!(lines[1].contains("room:1"), "{text}");
        // A long command is cut to the column's width, and marked.
        assert!(
            lines[3].contains("/usr/local/bin/worker --listen 0.0.0.0:…"),
            "{text}"
        );
        // Right-aligned columns end under their header; left-aligned ones start there.
        let ends = |header: &str| lines[0].find(header).unwrap() + header.chars().count();
        for (header, cells) in [
            ("WARM", ["3/5 (+2 starting)", "10/10", "20/20"]),
            ("CLAIMED", ["12", "0", "0"]),
        ] {
            for (line, cell) in lines[1..].iter().zip(cells) {
                let at = line.find(&format!(" {cell} ")).unwrap() + 1;
                let end = line[..at].chars().count() + cell.chars().count();
                assert_eq!(end, ends(header), "{header}: {text}");
            }
        }
        let col = |line: &str, header: &str| {
            line.chars()
                .skip(lines[0][..lines[0].find(header).unwrap()].chars().count())
                .collect::<String>()
        };
        assert!(col(lines[1], "GENERATION").starts_with("1 "), "{text}");
        assert!(
            col(lines[2], "GENERATION").starts_with("1 → 2 (20%)"),
            "{text}"
        );
        assert!(col(lines[2], "TEMPLATE").starts_with("room:1"), "{text}");
        assert!(lines[1].ends_with(" 4"), "{text}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{text}");
    }

    #[test]
    fn pool_show_says_unlimited_and_shows_settings_and_history() {
        let mut p = pool("rooms", 5);
        p.generations[0].template.env = [("API_KEY".to_string(), "secret".to_string())].into();
        p.generations[0].template.idle_timeout_s = Some(300);
        let text = render_pool(&p, NOW);
        assert!(text.contains("max live        unlimited\n"), "{text}");
        assert!(text.contains("warm            5 ready of 5\n"), "{text}");
        assert!(text.contains("generation      1\n"), "{text}");
        assert!(
            text.contains("template        image room:1; env API_KEY; idle timeout 5m\n"),
            "{text}"
        );
        // Environment values may be secrets: only --json shows them.
        assert!(!text.contains("secret"), "{text}");
        assert!(
            text.contains("bounds          start up to 7, stop up to 1 a pass"),
            "{text}"
        );
        assert!(text.contains("failed starts   0\n"), "{text}");
        assert!(!text.contains("last failure"), "{text}");
        assert!(!text.contains("rollout"), "{text}");
        assert!(
            text.contains("updated         2023-11-14 22:13:15Z (5s ago)\n"),
            "{text}"
        );
        assert!(
            text.contains("created         2023-11-13 22:13:20Z (1d ago)\n"),
            "{text}"
        );
        assert!(
            text.contains("\ngenerations\nNUMBER  STATUS  CREATED"),
            "{text}"
        );
        assert!(
            text.contains("     1  stable  2023-11-14 21:13:20Z  room:1    -\n"),
            "{text}"
        );
        // An explicit 0 is no limit either; a limit is shown as is.
        p.max_live = Some(0);
        assert!(render_pool(&p, NOW).contains("max live        unlimited\n"));
        p.max_live = Some(40);
        assert!(render_pool(&p, NOW).contains("max live        40\n"));
        assert_eq!(
            render_pool_settings(&p),
            "pool rooms: warm 5, max live 40, drone pool default, max add 7, max remove 1, promote after 3"
        );
    }

    #[test]
    fn pool_show_explains_failures() {
        let mut p = pool("rooms", 5);
        p.status.warm_ready = 1;
        p.status.warm_starting = 1;
        p.status.failed_starts = 9;
        p.status.consecutive_failures = 3;
        p.status.last_failure = Some("image \"room:1\" not found on drone d1".into());
        p.status.last_failure_at = Some(NOW - 12_000);
        p.status.slow_start = Some(2);
        let text = render_pool(&p, NOW);
        assert!(
            text.contains("warm            1 ready of 5, 1 starting\n"),
            "{text}"
        );
        assert!(text.contains("failed starts   9 (3 in a row)\n"), "{text}");
        assert!(
            text.contains(
                "last failure    image \"room:1\" not found on drone d1 (2023-11-14 22:13:08Z, 12s ago)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("slow start      starting up to 2 a pass after failures\n"),
            "{text}"
        );
    }

    #[test]
    fn pool_show_describes_a_rollout() {
        let p = with_rollout(pool("rooms", 10), 20);
        let text = render_pool(&p, NOW);
        assert!(
            text.contains("generation      1 (2 rolling out to 20% of new sessions)\n"),
            "{text}"
        );
        assert!(
            text.contains("\nrollout         generation 2 to 20% of new sessions\n"),
            "{text}"
        );
        assert!(text.contains("  template      image room:2\n"), "{text}");
        assert!(
            text.contains("  started       2023-11-14 22:12:20Z (1m ago)\n"),
            "{text}"
        );
        assert!(
            text.contains("  health        1 healthy, 1 failed (promoted at 3 healthy, reverted at 50% failed)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "  deadline      2023-11-14 22:17:20Z (in 4m): reverted unless promoted\n"
            ),
            "{text}"
        );
        assert!(text.contains("     2  rolling  "), "{text}");
        assert_eq!(
            render_rollout_started(&p, NOW),
            "pool rooms: generation 2 rolling out to 20% of new sessions (generation 1 for the rest): promote it with `hangar pool promote rooms`, or it reverts in 4m"
        );
        let mut done = p.clone();
        done.rollout = None;
        done.generation = 2;
        assert_eq!(
            render_rollout_started(&done, NOW),
            "pool rooms: new sessions get generation 2"
        );
    }

    #[test]
    fn times_and_spans_read_well() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(NOW), "2023-11-14 22:13:20Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(span(45_999), "45s");
        assert_eq!(span(252_000), "4m 12s");
        assert_eq!(span(300_000), "5m");
        assert_eq!(span(7_380_000), "2h 3m");
        assert_eq!(span(3 * 86_400_000 + 4 * 3_600_000 + 59_000), "3d 4h");
        assert_eq!(relative(NOW - 12_000, NOW), "12s ago");
        assert_eq!(relative(NOW + 60_000, NOW), "in 1m");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abcd", 4), "abcd");
    }

    #[test]
    fn percentages_and_env_parse() {
        assert_eq!(parse_percent("10%"), Ok(10));
        assert_eq!(parse_percent("10"), Ok(10));
        assert_eq!(parse_percent("100%"), Ok(100));
        for bad in ["0", "101", "0%", "ten", "%", "-5", "1.5"] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), String::new())));
        assert!(parse_env("A").is_err());
        assert!(parse_env("=b").is_err());
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
