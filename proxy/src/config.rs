//! The proxy's configuration: plain data, validated by the binary before any port is bound.

use std::time::Duration;

use hangar_core::token::TokenKey;

/// Everything the proxy needs to know; built by the binary from flags and files.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The cluster domain: `<backend>.<domain>` names a backend.
    pub domain: String,
    /// Verifies tokens (shared with the scheduler that signs them).
    pub token_key: TokenKey,
    /// How long a request for a starting backend waits for it to become ready before 503.
    pub start_wait: Duration,
    /// Connecting to a backend longer than this is a 502.
    pub upstream_connect_timeout: Duration,
    /// A backend that has not sent response headers within this is a 504.
    pub upstream_response_timeout: Duration,
    /// A client that has not sent its request headers within this is cut off.
    pub header_read_timeout: Duration,
    /// Idle upstream keep-alive connections kept per backend.
    pub upstream_idle_per_backend: usize,
}

impl ProxyConfig {
    /// Defaults suitable for production, for the given domain and key.
    pub fn new(domain: impl Into<String>, token_key: TokenKey) -> Self {
        ProxyConfig {
            domain: domain.into(),
            token_key,
            start_wait: Duration::from_secs(30),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_response_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(30),
            upstream_idle_per_backend: 32,
        }
    }
}
