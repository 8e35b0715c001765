//! `hangar demo-backend`: the built-in session backend used by `hangar dev`, the examples and
//! the end-to-end tests.
//!
//! It is what a real backend looks like to Hangar: it listens on `127.0.0.1:$PORT` (or
//! `$HANGAR_BIND:$PORT`), knows its backend id, key and epoch from the environment, keeps
//! in-memory state (a counter) that only makes sense if every request of a session reaches the
//! same process, and speaks WebSocket.
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
//!
//! Environment: `PORT` (required), `HANGAR_BIND` (the address to listen on, default
//! `127.0.0.1`; the Docker runtime sets `0.0.0.0` so that a bridge-networked container is
//! reachable through its published port), `HANGAR_BACKEND_ID`, `HANGAR_KEY`, `HANGAR_EPOCH`,
//! and `DEMO_STARTUP_DELAY_MS` (sleep before listening, so that tests can observe a
//! backend that is still starting). `SIGTERM` or `SIGINT` shut it down gracefully with exit
//! code 0.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
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

/// State shared by all connections.
struct State {
    /// The `GET /` answer, built once.
    banner: Bytes,
    counter: AtomicU64,
    /// `POST /exit/<code>` asks the accept loop to shut down and exit with this code.
    exit: mpsc::UnboundedSender<i32>,
}

/// Runs the demo backend until `SIGTERM`/`SIGINT` (returns `Ok`) or `POST /exit/<code>` (exits
/// the process with that code once in-flight responses are written).
pub async fn run() -> anyhow::Result<()> {
    let port = port_from_env()?;
    let bind = bind_from_env()?;
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let banner = format!(
        "hangar demo backend {} key {} epoch {}\n",
        var("HANGAR_BACKEND_ID"),
        var("HANGAR_KEY"),
        var("HANGAR_EPOCH"),
    );

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
    tracing::info!(%address, "demo backend listening");

    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
    let state = Arc::new(State {
        banner: Bytes::from(banner),
        counter: AtomicU64::new(0),
        exit: exit_tx,
    });
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
    let service = service_fn(move |request| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(request, &state)) }
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

fn handle(request: Request<Incoming>, state: &State) -> Response<Body> {
    let path = request.uri().path();
    match (request.method(), path) {
        (&Method::GET, "/") => text(StatusCode::OK, state.banner.clone()),
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
fn header_has_token(request: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    request.headers().get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value
                .split(',')
                .any(|item| item.trim().eq_ignore_ascii_case(token))
        })
    })
}

/// Answers a WebSocket handshake and echoes on the upgraded connection.
fn websocket(mut request: Request<Incoming>) -> Response<Body> {
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
