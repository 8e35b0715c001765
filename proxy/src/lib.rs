//! hangar-proxy: Hangar's data plane.
//!
//! Accepts client connections, finds the backend a request names (Host `<id>.<domain>`,
//! `x-hangar-backend` header or `hangar-backend` cookie), checks the signed token without a
//! round trip, waits (bounded) for a starting backend, and forwards the request or upgraded
//! connection to the backend's address. It reads routes from an immutable snapshot published by
//! the scheduler ([`RouteHandle`]) and records per-backend activity ([`ActivityTracker`]) that
//! the scheduler uses for idle timeouts. It never calls the scheduler or a container runtime
//! on the request path, so live sessions keep working while the control plane is away.

mod activity;
mod config;
mod error;
mod forward;
#[doc(hidden)]
pub mod fuzzing;
mod h1;
mod h1_scan;
mod head;
mod http2;
mod listener;
pub mod metrics;
mod pool;
mod remote;
mod route_table;
mod server;
mod service;
mod tls;
mod token_cache;

#[cfg(test)]
mod pool_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod test_alloc;
#[cfg(test)]
mod tests;

#[cfg(test)]
#[global_allocator]
static ALLOC: test_alloc::Counting = test_alloc::Counting;

pub use activity::{ActivityGuard, ActivityTracker};
pub use config::ProxyConfig;
pub use error::ProxyError;
pub use listener::{Proxy, ProxyRunError};
pub use remote::{RemoteConfig, RemoteError};
pub use route_table::RouteHandle;
pub use tls::{CertStore, TlsError, TlsFiles};
