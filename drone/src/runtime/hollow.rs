//! The hollow runtime: starts nothing. Every backend it is asked to start is "running" at once
//! at one shared address, where a tiny HTTP server answers every request with 200, and it
//! exits when stopped. Used only by benchmarks and tests (`hangar hollow-drones`, as
//! Kubernetes uses kubemark and Nomad its node simulator) to put thousands of backends on
//! many drones through the real sessions, heartbeats and events without running them. It
//! calls itself a process runtime in its hello so that placement treats it as one.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use hangar_core::BackendId;
use hangar_core::drone::SpawnCommand;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ExitStatus, Runtime, RuntimeError, Started};

/// What every hollow backend answers.
pub const HOLLOW_BODY: &str = "hollow\n";

/// The hollow runtime of one drone; many share one [`serve_hollow_backend`] address.
pub struct HollowRuntime {
    address: SocketAddr,
    running: Mutex<HashMap<BackendId, oneshot::Sender<ExitStatus>>>,
}

impl HollowRuntime {
    /// A runtime whose backends all "listen" at `address`.
    pub fn new(address: SocketAddr) -> Self {
        HollowRuntime {
            address,
            running: Mutex::default(),
        }
    }

    /// How many backends it "runs".
    pub fn running(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[async_trait]
impl Runtime for HollowRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn start(&self, cmd: &SpawnCommand) -> Result<Started, RuntimeError> {
        let (tx, exit) = oneshot::channel();
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.contains_key(&cmd.backend) {
            return Err(RuntimeError::AlreadyRunning {
                backend: cmd.backend.clone(),
            });
        }
        running.insert(cmd.backend.clone(), tx);
        Ok(Started {
            backend: cmd.backend.clone(),
            address: self.address,
            exit,
        })
    }

    async fn stop(&self, backend: &BackendId, _grace: Duration) -> Result<(), RuntimeError> {
        let stopped = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(backend);
        match stopped {
            Some(tx) => {
                let _ = tx.send(ExitStatus { code: Some(0) });
                Ok(())
            }
            None => Err(RuntimeError::NotRunning {
                backend: backend.clone(),
            }),
        }
    }

    async fn adopt(&self) -> Result<Vec<Started>, RuntimeError> {
        Ok(Vec::new())
    }
}

/// Serves the hollow backend on `listener` until `cancel` fires: 200 and [`HOLLOW_BODY`] for
/// every request, keep-alive.
pub async fn serve_hollow_backend(listener: TcpListener, cancel: CancellationToken) {
    let tasks = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "hollow backend cannot accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let svc = service_fn(|_req| async {
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                    HOLLOW_BODY.as_bytes(),
                ))))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn(id: &BackendId) -> SpawnCommand {
        SpawnCommand {
            backend: id.clone(),
            key: None,
            epoch: 1,
            command: None,
            image: None,
            env: Default::default(),
            resources: Default::default(),
            startup_timeout_ms: 1000,
        }
    }

    #[tokio::test]
    async fn backends_start_at_once_share_an_address_and_exit_when_stopped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve_hollow_backend(listener, cancel.clone()));
        let rt = HollowRuntime::new(address);
        let (a, b) = (BackendId::generate(), BackendId::generate());
        let started_a = rt.start(&spawn(&a)).await.unwrap();
        let started_b = rt.start(&spawn(&b)).await.unwrap();
        assert_eq!((started_a.address, started_b.address), (address, address));
        assert!(matches!(
            rt.start(&spawn(&a)).await,
            Err(RuntimeError::AlreadyRunning { .. })
        ));
        assert_eq!(rt.running(), 2);
        // The shared address answers.
        let mut s = tokio::net::TcpStream::connect(address).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /count HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with(HOLLOW_BODY),
            "{answer}"
        );
        // Stopping one ends it with exit code 0; the other keeps running.
        rt.stop(&a, Duration::ZERO).await.unwrap();
        assert_eq!(started_a.exit.await.unwrap(), ExitStatus { code: Some(0) });
        assert!(rt.stop(&a, Duration::ZERO).await.is_err());
        assert_eq!(rt.running(), 1);
        cancel.cancel();
        server.await.unwrap();
    }
}
