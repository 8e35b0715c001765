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
    /// A backend that has not sent its response head within this of receiving the whole
    /// request is a 504.
    pub upstream_response_timeout: Duration,
    /// A client that has started a request head and not finished it within this is cut off
    /// (slow clients).
    pub header_read_timeout: Duration,
    /// A keep-alive client connection with no request in flight is closed after this long.
    pub keep_alive_timeout: Duration,
    /// A client that sends no request body bytes for this long, while the body is not
    /// complete, gets a 408 (slow uploads are fine; stalled ones are cut off).
    pub client_body_timeout: Duration,
    /// A backend that sends no response body bytes for this long, mid-body, has its
    /// connection closed (and the client's, since the response cannot be completed); like
    /// nginx's `proxy_read_timeout`.
    pub upstream_body_timeout: Duration,
    /// [`Self::upstream_body_timeout`] for server-sent events (`content-type:
    /// text/event-stream`), which may rightly stay quiet between events for long.
    pub upstream_sse_timeout: Duration,
    /// An HTTP/1.1 client that accepts no response bytes for this long, while a write to it
    /// waits, has its connection and the backend's closed (clients that never read would
    /// otherwise hold a task and a backend connection forever); like nginx's `send_timeout`.
    /// Over HTTP/2, a stream whose client takes none of the next piece of the response body
    /// for this long (it grants no flow-control window, or stops reading its socket) is reset
    /// and its backend connection closed; the connection itself stays for its other streams.
    pub client_write_timeout: Duration,
    /// An upgraded connection (a WebSocket after its `101`) on which neither side sends a byte
    /// for this long is closed on both sides.
    pub upgrade_idle_timeout: Duration,
    /// Largest request body accepted, in bytes: a larger `content-length` gets 413 before the
    /// backend is contacted, and a chunked body that grows past it is cut off with a 413.
    pub max_body_bytes: u64,
    /// Idle upstream keep-alive connections kept per backend.
    pub upstream_idle_per_backend: usize,
    /// Largest request head (request line and headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Client connections served at once; past this the listener stops accepting until one
    /// closes (back-pressure in the kernel's accept queue, not errors).
    pub max_connections: usize,
    /// A TLS handshake that takes longer than this is dropped.
    pub tls_handshake_timeout: Duration,
    /// How long shutdown lets in-flight requests finish before dropping connections.
    pub shutdown_grace: Duration,
    /// How long a request for a backend the table does not know waits for it to appear
    /// (remote proxies, whose feed may trail a connect by a moment); zero answers 404 at once.
    pub unknown_grace: Duration,
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
            keep_alive_timeout: Duration::from_secs(75),
            client_body_timeout: Duration::from_secs(60),
            upstream_body_timeout: Duration::from_secs(60),
            upstream_sse_timeout: Duration::from_secs(3600),
            client_write_timeout: Duration::from_secs(60),
            upgrade_idle_timeout: Duration::from_secs(600),
            max_body_bytes: 100 * 1024 * 1024,
            upstream_idle_per_backend: 256,
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            tls_handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            unknown_grace: Duration::ZERO,
        }
    }
}
