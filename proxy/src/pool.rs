//! The upstream connection pool: HTTP/1.1 keep-alive connections to each backend address,
//! built on hyper's connection-level client (`client::conn::http1`). A connection is checked
//! out for one request and returns to its backend's idle list when the response body ends;
//! connections whose backend went away close on their own and are dropped on checkout.
//!
//! Why not hyper-util's pooled client: this path runs for every proxied request, and a pool
//! keyed directly by socket address, with no URI-derived key, no executor indirection for
//! checkouts and no background idle reaper, costs less per request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use crate::forward::CountingBody;

/// Idle entries are swept of closed connections when the map grows past this many addresses.
const SWEEP_AT: usize = 1024;

type Sender = SendRequest<CountingBody>;

/// Why a request could not be sent.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection to the backend (refused, unreachable, timed out).
    Connect(String),
    /// The connection failed while sending or before response headers arrived.
    Request(hyper::Error),
}

/// Keep-alive connections per backend address.
pub(crate) struct UpstreamPool {
    /// A std mutex: held only to push or pop a sender, never across an `.await`.
    idle: Mutex<HashMap<SocketAddr, Vec<Sender>>>,
    max_idle: usize,
    connect_timeout: Duration,
    /// Owns the connection tasks.
    tasks: TaskTracker,
}

/// A connection in use; give it back with [`Checkout::release`] once its response has ended.
pub(crate) struct Checkout {
    pool: Arc<UpstreamPool>,
    addr: SocketAddr,
    sender: Sender,
}

impl Checkout {
    /// Returns the connection to the idle list (if there is room and it is still open).
    pub(crate) fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() > SWEEP_AT {
            idle.retain(|_, v| {
                v.retain(|s| !s.is_closed());
                !v.is_empty()
            });
        }
        let list = idle.entry(self.addr).or_default();
        if list.len() < self.pool.max_idle {
            list.push(self.sender);
        }
    }
}

impl UpstreamPool {
    pub(crate) fn new(max_idle: usize, connect_timeout: Duration, tasks: TaskTracker) -> Self {
        UpstreamPool {
            idle: Mutex::new(HashMap::new()),
            max_idle,
            connect_timeout,
            tasks,
        }
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&addr)?;
        while let Some(s) = list.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Sender, SendError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                SendError::Connect(format!("no connection within {:?}", self.connect_timeout))
            })?
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        self.tasks.spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::trace!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `req` to `addr` on an idle connection (or a new one) and returns the response
    /// with the connection, to be released when the response body ends.
    pub(crate) async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<CountingBody>,
    ) -> Result<(Response<Incoming>, Checkout), SendError> {
        // A reused connection may have been closed by the backend a moment ago; the request
        // comes back unsent in that case and goes out on a fresh connection.
        while let Some(mut sender) = self.take_idle(addr) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.checkout(addr, sender))),
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
        let mut sender = self.connect(addr).await?;
        sender
            .ready()
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(SendError::Request)?;
        Ok((resp, self.checkout(addr, sender)))
    }

    fn checkout(self: &Arc<Self>, addr: SocketAddr, sender: Sender) -> Checkout {
        Checkout {
            pool: self.clone(),
            addr,
            sender,
        }
    }
}
