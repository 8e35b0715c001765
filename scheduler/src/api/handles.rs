//! The state every handler receives.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use hangar_core::token::TokenKey;
use hangar_store::Store;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::ActivityBook;
use crate::api_tokens::ApiTokens;
use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::connect::Connector;
use crate::drains::Drains;
use crate::drone_session::DroneSessions;
use crate::drones::{DroneDirectory, DroneRegistry};
use crate::hot_state::HotShards;
use crate::leader::Leadership;
use crate::lifecycle::Backends;
use crate::maintenance::Maintenance;
use crate::revocations::Revocations;
use crate::routes::Routes;

/// What the handlers reach ([`Components`]) behind one `Arc`: axum clones the state for each
/// extractor of every request, and a clone is then one reference count instead of one for
/// each of some thirty parts (measured at about 1.6% of serve's CPU under connect load).
#[derive(Clone)]
pub struct Handles(Arc<Components>);

impl Handles {
    pub fn new(components: Components) -> Self {
        Handles(Arc::new(components))
    }
}

impl std::ops::Deref for Handles {
    type Target = Components;

    fn deref(&self) -> &Components {
        &self.0
    }
}

/// The components, and the tracker and token that streaming responses (SSE, the route feed)
/// run their tasks under.
pub struct Components {
    pub config: Arc<SchedulerConfig>,
    pub clock: Arc<dyn Clock>,
    /// Read only: ACME records and the drone list read the store directly.
    pub store: Arc<dyn Store>,
    pub token_key: TokenKey,
    pub connector: Arc<Connector>,
    pub backends: Arc<Backends>,
    pub sessions: Arc<DroneSessions>,
    /// The drone sessions this instance holds.
    pub drones: Arc<DroneRegistry>,
    /// Every drone of the cluster.
    pub directory: Arc<DroneDirectory>,
    pub drains: Arc<Drains>,
    pub routes: Arc<Routes>,
    pub hot: Arc<HotShards>,
    /// Per-backend request rate and latency over the last minutes (the dashboard's chart).
    pub traffic: Arc<crate::traffic::Traffic>,
    pub activity: Arc<ActivityBook>,
    pub revocations: Arc<Revocations>,
    pub leadership: Arc<Leadership>,
    pub maintenance: Arc<Maintenance>,
    /// API tokens (who may call what).
    pub tokens: Arc<ApiTokens>,
    /// Per-namespace quotas.
    pub quotas: Arc<crate::quotas::Quotas>,
    /// Pools (templates, warm backends, rollouts).
    pub pools: Arc<crate::pools::Pools>,
    pub placement: Arc<crate::placement::Placement>,
    /// Forwards writes to the leader (see `api::forward`).
    pub forwarder: ForwardClient,
    pub tasks: TaskTracker,
    pub cancel: CancellationToken,
}

/// The HTTP client that forwards writes (and a follower's activity) to the leader: plain
/// `http://`, or `https://` when the instances' APIs serve TLS.
pub type ForwardClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A new forwarding client, trusting `tls`'s roots for `https://` (without it, only `http://`
/// URLs can be reached).
pub fn forward_client_with(tls: Option<std::sync::Arc<rustls::ClientConfig>>) -> ForwardClient {
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let connector = match tls {
        Some(cfg) => builder
            .with_tls_config((*cfg).clone())
            .https_or_http()
            .enable_http1()
            .build(),
        None => {
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            builder
                .with_tls_config(
                    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                        rustls::crypto::ring::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default protocol versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
                )
                .https_or_http()
                .enable_http1()
                .wrap_connector(http)
        }
    };
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A forwarding client for plain `http://` (tests, and instances without TLS).
pub fn forward_client() -> ForwardClient {
    forward_client_with(None)
}
