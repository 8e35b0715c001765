//! The proxy's listener: accepts connections on an already-bound socket, serves HTTP/1.1
//! (with upgrades) and h2c on each, and shuts down gracefully on a cancellation token.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::ActivityTracker;
use crate::config::ProxyConfig;
use crate::forward::upstream_client;
use crate::route_table::RouteHandle;
use crate::service::{Shared, handle};

/// How long shutdown waits for in-flight requests before dropping connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Failures of the accept loop.
#[derive(Debug, thiserror::Error)]
pub enum ProxyRunError {
    #[error("proxy listener failed: {0}")]
    Accept(#[source] std::io::Error),
}

/// One proxy instance: its configuration, routes and activity.
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn new(config: ProxyConfig) -> Self {
        let client = upstream_client(&config);
        Proxy {
            shared: Arc::new(Shared {
                config,
                routes: Arc::new(RouteHandle::new()),
                activity: Arc::new(ActivityTracker::new()),
                client,
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// The route handle the route feed publishes into.
    pub fn routes(&self) -> Arc<RouteHandle> {
        self.shared.routes.clone()
    }

    /// Per-backend activity, reported to the scheduler for idle timeouts.
    pub fn activity(&self) -> Arc<ActivityTracker> {
        self.shared.activity.clone()
    }

    /// Serves connections from `listener` until `shutdown` is cancelled, then stops accepting,
    /// lets in-flight requests finish (bounded) and returns.
    pub async fn run(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ProxyRunError> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.shared.config.header_read_timeout)
            .keep_alive(true);
        builder.http2().timer(TokioTimer::new());
        let graceful = GracefulShutdown::new();
        let connections = TaskTracker::new();
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) if is_transient(&e) => {
                        // Out of file descriptors or a connection reset before accept: back
                        // off briefly instead of spinning, then keep serving.
                        tracing::warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(e) => return Err(ProxyRunError::Accept(e)),
                },
            };
            let _ = stream.set_nodelay(true);
            let shared = self.shared.clone();
            let svc = service_fn(move |req| handle(shared.clone(), req, peer));
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .into_owned();
            let conn = graceful.watch(conn);
            connections.spawn(async move {
                if let Err(e) = conn.await {
                    tracing::trace!(error = %e, "client connection ended with an error");
                }
            });
        }
        drop(listener);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("proxy shutdown grace ran out; dropping remaining connections");
        }
        connections.close();
        self.shared.tasks.close();
        Ok(())
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e.raw_os_error().is_some_and(|c| c == 24 || c == 23) // EMFILE, ENFILE
}
