//! `hangar demo-backend`: the built-in session backend used by `hangar dev`, the examples and
//! the end-to-end tests.
//!
//! It is what a real backend looks like to Hangar: it listens on `127.0.0.1:$PORT` (or
//! `$HANGAR_BIND:$PORT`), knows its backend id, key and epoch from the environment (or, when
//! started warm without a key, from the claim that hands it one), keeps in-memory state (a
//! counter) that only makes sense if every request of a session reaches the same process, and
//! speaks WebSocket. Like a real server it writes to stdout one `listening on <addr>` line
//! once it listens and one `<method> <path> <status>` line per request.
//! A few extra endpoints let tests observe what the proxy forwards and make the process exit.
//!
//! | request              | answer                                                     |
//! |----------------------|------------------------------------------------------------|
//! | `GET /`              | `hangar demo backend <id> key <key> epoch <epoch>\n`       |
//! | `GET /count`         | the counter after incrementing it (digits only)            |
//! | `GET /healthz`       | `ok`                                                       |
//! | `GET /ws`            | WebSocket echo (text, binary; pings answered)              |
//! | `POST /exit/<code>`  | `200`, then the process exits with `<code>`                |
//! | `GET /headers`       | the request headers, one `name: value` per line            |
//! | `GET /echo-query`    | the request's query string                                 |
//! | `POST /.hangar/claim`| claims a warm backend for a key (see below)                |
//!
//! `POST /.hangar/claim` is how the scheduler hands a warm backend its key: headers
//! `authorization: Bearer $HANGAR_CLAIM_TOKEN`, `x-hangar-key: <namespace/name>` and
//! `x-hangar-epoch: <n>`. It answers `200` `claimed <key> epoch <epoch>\n` (also for a
//! retry of the same claim), `404` if the backend was not started warm (no
//! `HANGAR_CLAIM_TOKEN`), `403` for a wrong secret, `400` for a missing or invalid key or
//! epoch and `409` if it already serves another key or epoch (a backend serves one key for
//! its life). `GET /` answers with the claimed key and epoch from then on.
//!
//! Environment: `PORT` (required), `HANGAR_BIND` (the address to listen on, default
//! `127.0.0.1`; the Docker runtime sets `0.0.0.0` so that a bridge-networked container is
//! reachable through its published port), `HANGAR_BACKEND_ID`, `HANGAR_KEY`, `HANGAR_EPOCH`,
//! `HANGAR_CLAIM_TOKEN` (the claim secret; set only for a backend started warm), and
//! `DEMO_STARTUP_DELAY_MS` (sleep before listening, so that tests can observe a
//! backend that is still starting). `SIGTERM` or `SIGINT` shut it down gracefully with exit
//! code 0.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hangar_core::KeyRef;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long in-flight requests get to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

type Body = Full<Bytes>;

/// The claim endpoint.
const CLAIM_PATH: &str = "/.hangar/claim";

/// State shared by all connections.
struct State {
    /// `HANGAR_BACKEND_ID`, for the `GET /` answer.
    id: String,
    /// `HANGAR_CLAIM_TOKEN`: the secret a claim must carry; `None` if not started warm.
    claim_token: Option<String>,
    /// What the backend serves; written once by a claim, read by every `GET /`.
    serving: RwLock<Serving>,
    counter: AtomicU64,
    /// `POST /exit/<code>` asks the accept loop to shut down and exit with this code.
    exit: mpsc::UnboundedSender<i32>,
}

/// The key and epoch a backend serves.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Claimed {
    key: String,
    epoch: u64,
}

struct Serving {
    /// `None` while keyless (a warm backend not claimed yet).
    claimed: Option<Claimed>,
    /// The `GET /` answer, built at start and rebuilt by a claim.
    banner: Bytes,
}

impl State {
    /// The state of a backend started with these environment values (`HANGAR_BACKEND_ID`,
    /// `HANGAR_KEY`, `HANGAR_EPOCH`, `HANGAR_CLAIM_TOKEN`; unset ones empty).
    fn new(
        id: String,
        key: &str,
        epoch: &str,
        claim_token: &str,
        exit: mpsc::UnboundedSender<i32>,
    ) -> Self {
        let claimed = (!key.is_empty()).then(|| Claimed {
            key: key.to_string(),
            epoch: epoch.trim().parse().unwrap_or(0),
        });
        let banner = banner(&id, key, epoch);
        State {
            id,
            claim_token: (!claim_token.is_empty()).then(|| claim_token.to_string()),
            serving: RwLock::new(Serving { claimed, banner }),
            counter: AtomicU64::new(0),
            exit,
        }
    }
}

fn banner(id: &str, key: &str, epoch: impl std::fmt::Display) -> Bytes {
    Bytes::from(format!(
        "hangar demo backend {id} key {key} epoch {epoch}\n"
    ))
}

/// Runs the demo backend until `SIGTERM`/`SIGINT` (returns `Ok`) or `POST /exit/<code>` (exits
/// the process with that code once in-flight responses are written).
pub async fn run() -> anyhow::Result<()> {
    let port = port_from_env()?;
    let bind = bind_from_env()?;
    let var = |name: &str| std::env::var(name).unwrap_or_default();

    // Install signal handlers before the startup delay so that a stop during it is graceful.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    if let Some(delay) = startup_delay()? {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        }
    }

    let address = SocketAddr::new(bind, port);
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let bound = listener.local_addr().unwrap_or(address);
    tracing::info!(address = %bound, "demo backend listening");
    log_line(format_args!("listening on {bound}"));

    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
    let state = Arc::new(State::new(
        var("HANGAR_BACKEND_ID"),
        &var("HANGAR_KEY"),
        &var("HANGAR_EPOCH"),
        &var("HANGAR_CLAIM_TOKEN"),
        exit_tx,
    ));
    let shutdown = CancellationToken::new();
    let connections = TaskTracker::new();

    let exit_code = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Typically EMFILE: keep serving the connections we have.
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                connections.spawn(serve_connection(stream, state.clone(), shutdown.clone()));
            }
            _ = sigterm.recv() => break 0,
            _ = sigint.recv() => break 0,
            Some(code) = exit_rx.recv() => break code,
        }
    };

    // Stop accepting, let in-flight requests finish (idle keep-alive connections close at
    // once), then leave. WebSocket connections are not waited for: they end with the process.
    drop(listener);
    shutdown.cancel();
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace; exiting anyway");
    }
    if exit_code != 0 {
        tracing::info!(exit_code, "demo backend exiting on request");
        std::process::exit(exit_code);
    }
    Ok(())
}

fn port_from_env() -> anyhow::Result<u16> {
    let Ok(raw) = std::env::var("PORT") else {
        bail!("PORT is not set: the demo backend listens on $HANGAR_BIND:$PORT");
    };
    match raw.trim().parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => bail!("PORT must be a port number between 1 and 65535, got {raw:?}"),
    }
}

/// The address to listen on: `HANGAR_BIND`, or loopback when it is not set.
fn bind_from_env() -> anyhow::Result<IpAddr> {
    match std::env::var("HANGAR_BIND") {
        Err(_) => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Ok(raw) => raw.trim().parse().with_context(|| {
            format!("HANGAR_BIND must be an IP address such as 0.0.0.0, got {raw:?}")
        }),
    }
}

fn startup_delay() -> anyhow::Result<Option<Duration>> {
    match std::env::var("DEMO_STARTUP_DELAY_MS") {
        Err(_) => Ok(None),
        Ok(raw) => {
            let ms: u64 = raw.trim().parse().with_context(|| {
                format!("DEMO_STARTUP_DELAY_MS must be milliseconds, got {raw:?}")
            })?;
            Ok(Some(Duration::from_millis(ms)))
        }
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let service = service_fn(move |request: Request<Incoming>| {
        // A `Uri` clone shares its bytes: the log line costs no copy of the path.
        let (method, uri) = (request.method().clone(), request.uri().clone());
        let response = handle(request, &state);
        log_line(format_args!(
            "{method} {} {}",
            uri.path(),
            response.status().as_u16()
        ));
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// Writes one line to stdout, as a server's access log would. `println!` would panic if stdout
/// were closed; a log line is not worth failing a request for.
fn log_line(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn handle<B>(request: Request<B>, state: &State) -> Response<Body> {
    let path = request.uri().path();
    match (request.method(), path) {
        (&Method::GET, "/") => {
            let serving = state.serving.read().unwrap_or_else(PoisonError::into_inner);
            text(StatusCode::OK, serving.banner.clone())
        }
        (&Method::POST, CLAIM_PATH) => claim(&request, state),
        (&Method::GET, "/count") => {
            let count = state.counter.fetch_add(1, Ordering::Relaxed) + 1;
            text(StatusCode::OK, Bytes::from(count.to_string()))
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, Bytes::from_static(b"ok")),
        (&Method::GET, "/headers") => {
            let mut body = Vec::with_capacity(512);
            for (name, value) in request.headers() {
                body.extend_from_slice(name.as_str().as_bytes());
                body.extend_from_slice(b": ");
                body.extend_from_slice(value.as_bytes());
                body.push(b'\n');
            }
            text(StatusCode::OK, Bytes::from(body))
        }
        (&Method::GET, "/echo-query") => {
            let query = request.uri().query().unwrap_or("");
            text(StatusCode::OK, Bytes::copy_from_slice(query.as_bytes()))
        }
        (_, "/ws") => websocket(request),
        (&Method::POST, _) if path.starts_with("/exit/") => {
            match path["/exit/".len()..].parse::<i32>() {
                Ok(code) => {
                    // The accept loop exits after this response has been written.
                    let _ = state.exit.send(code);
                    text(
                        StatusCode::OK,
                        Bytes::from(format!("exiting with {code}\n")),
                    )
                }
                Err(_) => text(
                    StatusCode::BAD_REQUEST,
                    Bytes::from_static(b"exit code must be an integer\n"),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    }
}

/// What a claim asks, read from its headers (`None` for a missing field or one that is not
/// UTF-8).
struct ClaimRequest<'a> {
    authorization: Option<&'a str>,
    key: Option<&'a str>,
    epoch: Option<&'a str>,
}

/// What to do with a claim.
#[derive(Debug, PartialEq, Eq)]
enum ClaimDecision {
    /// `404`: the backend was not started warm.
    NotWarm,
    /// `403`: the secret is missing or wrong.
    Forbidden,
    /// `400`, with what is wrong.
    Invalid(&'static str),
    /// `409`: the backend already serves another key (or the same key at another epoch).
    Conflict,
    /// `200`: serve this key and epoch (a new claim, or a retry of the one held).
    Claim(Claimed),
}

impl ClaimDecision {
    fn status(&self) -> StatusCode {
        match self {
            ClaimDecision::NotWarm => StatusCode::NOT_FOUND,
            ClaimDecision::Forbidden => StatusCode::FORBIDDEN,
            ClaimDecision::Invalid(_) => StatusCode::BAD_REQUEST,
            ClaimDecision::Conflict => StatusCode::CONFLICT,
            ClaimDecision::Claim(_) => StatusCode::OK,
        }
    }
}

/// Decides a claim: `secret` is `HANGAR_CLAIM_TOKEN`, `serving` what the backend serves now.
/// The secret is checked before anything about the key is revealed.
fn decide_claim(
    secret: Option<&str>,
    request: &ClaimRequest<'_>,
    serving: Option<&Claimed>,
) -> ClaimDecision {
    let Some(secret) = secret else {
        return ClaimDecision::NotWarm;
    };
    let bearer = request.authorization.and_then(|v| {
        let (scheme, credential) = v.trim().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(credential.trim())
    });
    if !bearer.is_some_and(|b| secret_matches(b.as_bytes(), secret.as_bytes())) {
        return ClaimDecision::Forbidden;
    }
    let Some(key) = request.key.map(str::trim).filter(|k| is_key(k)) else {
        return ClaimDecision::Invalid("x-hangar-key must be <namespace>/<name>");
    };
    // Keyed epochs start at 1; 0 means keyless.
    let Some(epoch) = request
        .epoch
        .map(str::trim)
        .filter(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|e| e.parse::<u64>().ok())
        .filter(|&e| e > 0)
    else {
        return ClaimDecision::Invalid("x-hangar-epoch must be a positive integer");
    };
    let claim = Claimed {
        key: key.to_string(),
        epoch,
    };
    match serving {
        Some(held) if *held != claim => ClaimDecision::Conflict,
        _ => ClaimDecision::Claim(claim),
    }
}

/// Whether `key` is `<namespace>/<name>`, both valid key parts.
fn is_key(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(namespace, name)| KeyRef::new(namespace, name).validate().is_ok())
}

/// Compares a secret in time independent of where it differs (its length may show).
fn secret_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// `POST /.hangar/claim`: see the module documentation.
fn claim<B>(request: &Request<B>, state: &State) -> Response<Body> {
    let field = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
    let asked = ClaimRequest {
        authorization: field("authorization"),
        key: field("x-hangar-key"),
        epoch: field("x-hangar-epoch"),
    };
    // Decided and applied under the write lock: two racing claims cannot both win.
    let mut serving = state
        .serving
        .write()
        .unwrap_or_else(PoisonError::into_inner);
    let decision = decide_claim(
        state.claim_token.as_deref(),
        &asked,
        serving.claimed.as_ref(),
    );
    let status = decision.status();
    let body = match decision {
        ClaimDecision::NotWarm => {
            Bytes::from_static(b"not found: this backend was not started warm\n")
        }
        ClaimDecision::Forbidden => Bytes::from_static(b"wrong or missing claim secret\n"),
        ClaimDecision::Invalid(why) => Bytes::from(format!("{why}\n")),
        ClaimDecision::Conflict => {
            let held = serving.claimed.as_ref();
            Bytes::from(format!(
                "already claimed: serving key {} epoch {}\n",
                held.map_or("", |c| c.key.as_str()),
                held.map_or(0, |c| c.epoch),
            ))
        }
        ClaimDecision::Claim(claimed) => {
            let body = format!("claimed {} epoch {}\n", claimed.key, claimed.epoch);
            if serving.claimed.as_ref() != Some(&claimed) {
                serving.banner = banner(&state.id, &claimed.key, claimed.epoch);
                serving.claimed = Some(claimed);
            }
            Bytes::from(body)
        }
    };
    text(status, body)
}

fn text(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether a comma-separated header (`Connection: keep-alive, Upgrade`) contains `token`.
fn header_has_token<B>(request: &Request<B>, name: header::HeaderName, token: &str) -> bool {
    request.headers().get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value
                .split(',')
                .any(|item| item.trim().eq_ignore_ascii_case(token))
        })
    })
}

/// Answers a WebSocket handshake and echoes on the upgraded connection.
fn websocket<B>(mut request: Request<B>) -> Response<Body> {
    let is_upgrade = request.method() == Method::GET
        && header_has_token(&request, header::CONNECTION, "upgrade")
        && header_has_token(&request, header::UPGRADE, "websocket")
        && request
            .headers()
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
    let key = request.headers().get(header::SEC_WEBSOCKET_KEY);
    let (true, Some(key)) = (is_upgrade, key) else {
        return text(
            StatusCode::BAD_REQUEST,
            Bytes::from_static(b"expected a websocket upgrade\n"),
        );
    };
    let accept = derive_accept_key(key.as_bytes());

    // The upgraded connection is only available once the 101 response below has been sent.
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let socket =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                echo(socket).await;
            }
            Err(error) => tracing::debug!(%error, "websocket upgrade failed"),
        }
    });

    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    match HeaderValue::from_str(&accept) {
        Ok(accept) => {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        // Base64 is always a valid header value; answer sanely regardless.
        Err(_) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                Bytes::from_static(b"bad accept key\n"),
            );
        }
    }
    response
}

/// Echoes text and binary messages until the peer closes. Pings are answered and close
/// handshakes completed by tungstenite itself while reading.
async fn echo<S>(mut socket: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(message) = socket.next().await {
        let reply = match message {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => message,
            // The automatic pong is queued; flushing sends it now rather than with the next
            // message.
            Ok(Message::Ping(_)) => {
                if socket.flush().await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Message::Pong(_) | Message::Frame(_)) => continue,
            Ok(Message::Close(_)) | Err(_) => break,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
    // Completes the closing handshake if tungstenite queued a close reply.
    let _ = socket.flush().await;
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    const SECRET: &str = "s3cret";

    fn claimed(key: &str, epoch: u64) -> Claimed {
        Claimed {
            key: key.to_string(),
            epoch,
        }
    }

    #[test]
    fn claim_decisions() {
        const S: Option<&str> = Some(SECRET);
        const AUTH: Option<&str> = Some("Bearer s3cret");
        const KEY: Option<&str> = Some("team/alice");
        const EPOCH: Option<&str> = Some("3");
        let alice = claimed("team/alice", 3);
        let held = Some(&alice);
        // (secret, authorization, key, epoch, serving, status)
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a Claimed>,
            u16,
        );
        let cases: &[Case<'_>] = &[
            // Not started warm: nothing else matters.
            (None, AUTH, KEY, EPOCH, None, 404),
            (None, None, None, None, None, 404),
            // The secret comes first, and a wrong one reveals nothing about the key held.
            (S, None, KEY, EPOCH, None, 403),
            (S, Some("Bearer s3creT"), None, None, None, 403),
            (S, Some("Bearer s3cret2"), KEY, EPOCH, None, 403),
            (S, Some("Bearer s3cre"), KEY, EPOCH, None, 403),
            (S, Some("Basic s3cret"), KEY, EPOCH, None, 403),
            (S, Some("s3cret"), KEY, EPOCH, None, 403),
            (S, Some("Bearer nope"), Some("team/bob"), EPOCH, held, 403),
            // Then the key and the epoch.
            (S, AUTH, None, EPOCH, None, 400),
            (S, AUTH, Some("alice"), EPOCH, None, 400),
            (S, AUTH, Some("team/a/b"), EPOCH, None, 400),
            (S, AUTH, Some("/alice"), EPOCH, None, 400),
            (S, AUTH, Some("team/al ice"), EPOCH, None, 400),
            (S, AUTH, KEY, None, None, 400),
            (S, AUTH, KEY, Some("0"), None, 400),
            (S, AUTH, KEY, Some("+3"), None, 400),
            (S, AUTH, KEY, Some("x"), None, 400),
            (S, AUTH, KEY, Some("18446744073709551616"), None, 400),
            // A claim, its retry, and claims of another key or epoch.
            (S, AUTH, KEY, EPOCH, None, 200),
            (S, Some("bearer  s3cret "), KEY, Some(" 3"), None, 200),
            (S, AUTH, KEY, EPOCH, held, 200),
            (S, AUTH, Some("team/bob"), EPOCH, held, 409),
            (S, AUTH, KEY, Some("4"), held, 409),
        ];
        for (i, &(secret, authorization, key, epoch, serving, want)) in cases.iter().enumerate() {
            let request = ClaimRequest {
                authorization,
                key,
                epoch,
            };
            let got = decide_claim(secret, &request, serving);
            assert_eq!(got.status().as_u16(), want, "case {i}: {got:?}");
            if want == 200 {
                assert_eq!(got, ClaimDecision::Claim(alice.clone()), "case {i}");
            }
        }
    }

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(secret_matches(b"abc", b"abc"));
        assert!(secret_matches(b"", b""));
        for other in [&b"abd"[..], b"ab", b"abcd", b"", b"ABC"] {
            assert!(!secret_matches(other, b"abc"), "{other:?}");
        }
    }

    fn state(claim_token: &str) -> State {
        let (exit, _) = mpsc::unbounded_channel();
        State::new("b1".into(), "", "0", claim_token, exit)
    }

    /// Sends a request through the real handler; returns the status and the body.
    async fn send(state: &State, request: Request<()>) -> (StatusCode, String) {
        let response = handle(request, state);
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    fn claim_request(secret: &str, key: &str, epoch: &str) -> Request<()> {
        Request::post(CLAIM_PATH)
            .header("authorization", format!("Bearer {secret}"))
            .header("x-hangar-key", key)
            .header("x-hangar-epoch", epoch)
            .body(())
            .unwrap()
    }

    fn root() -> Request<()> {
        Request::get("/").body(()).unwrap()
    }

    #[tokio::test]
    async fn a_claim_without_a_claim_token_is_not_found() {
        let s = state("");
        let (status, _) = send(&s, claim_request(SECRET, "team/alice", "3")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            send(&s, root()).await.1,
            "hangar demo backend b1 key  epoch 0\n"
        );
    }

    #[tokio::test]
    async fn a_claim_with_the_wrong_secret_is_forbidden_and_changes_nothing() {
        let s = state(SECRET);
        let (status, _) = send(&s, claim_request("guess", "team/alice", "3")).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let no_auth = Request::post(CLAIM_PATH)
            .header("x-hangar-key", "team/alice")
            .header("x-hangar-epoch", "3")
            .body(())
            .unwrap();
        assert_eq!(send(&s, no_auth).await.0, StatusCode::FORBIDDEN);
        let (status, _) = send(&s, claim_request(SECRET, "alice", "3")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            send(&s, root()).await.1,
            "hangar demo backend b1 key  epoch 0\n"
        );
    }

    #[tokio::test]
    async fn a_claimed_backend_serves_its_key_and_refuses_another() {
        let s = state(SECRET);
        assert_eq!(
            send(&s, claim_request(SECRET, "team/alice", "3")).await,
            (StatusCode::OK, "claimed team/alice epoch 3\n".to_string())
        );
        assert_eq!(
            send(&s, root()).await,
            (
                StatusCode::OK,
                "hangar demo backend b1 key team/alice epoch 3\n".to_string()
            )
        );
        // A retry of the same claim succeeds; another key or epoch does not.
        assert_eq!(
            send(&s, claim_request(SECRET, "team/alice", "3")).await.0,
            StatusCode::OK
        );
        let (status, body) = send(&s, claim_request(SECRET, "team/bob", "4")).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(
            send(&s, claim_request(SECRET, "team/alice", "4")).await.0,
            StatusCode::CONFLICT
        );
        assert_eq!(
            send(&s, root()).await.1,
            "hangar demo backend b1 key team/alice epoch 3\n"
        );
        // Only POST claims.
        let get = Request::get(CLAIM_PATH).body(()).unwrap();
        assert_eq!(send(&s, get).await.0, StatusCode::NOT_FOUND);
    }

    /// A backend started with a key (not warm) keeps it: a claim for it is a retry, a claim
    /// for another key a conflict.
    #[tokio::test]
    async fn a_backend_started_with_a_key_keeps_it() {
        let (exit, _) = mpsc::unbounded_channel();
        let s = State::new("b2".into(), "team/carol", "5", SECRET, exit);
        assert_eq!(
            send(&s, claim_request(SECRET, "team/dave", "6")).await.0,
            StatusCode::CONFLICT
        );
        assert_eq!(
            send(&s, claim_request(SECRET, "team/carol", "5")).await.0,
            StatusCode::OK
        );
        assert_eq!(
            send(&s, root()).await.1,
            "hangar demo backend b2 key team/carol epoch 5\n"
        );
    }
}
