//! The `Scheduler`: the composition root of the control plane. It builds every component once,
//! hands each only the components it needs, starts the background tasks (route publisher, drone
//! directory, command relay, reconciler, drone-loss watch, monitor, revocations) and serves
//! the API.
//!
//! Components, lowest first (each is the only writer of its state):
//! - [`ActivityBook`]: proxies' activity reports (idle timeouts);
//! - [`DroneRegistry`]: the drone sessions held here and their command channels (written by
//!   [`DroneSessions`]); [`DroneDirectory`]: every drone of the cluster (store records);
//! - [`Routes`]: the route table, per-drone load, live-backend directory and route deltas
//!   (written by the route publisher, `routes::RouteFeed`);
//! - [`Drains`], [`HotShards`], [`Revocations`];
//! - [`Backends`]: backend records and their lifecycle; [`Placement`]; [`Connector`];
//! - [`DroneSessions`]: admission, sessions, drone loss;
//! - the command relay (records to the sessions held here), the reconciler and the monitor,
//!   background loops over the above.
//!
//! Which of these is process-local (and so must move or be rebuilt when several instances run)
//! is recorded in ARCHITECTURE.md.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hangar_core::activity::ActivityBatch;
use hangar_core::drone::{DroneMessage, Hello, SchedulerMessage};
use hangar_core::route::RouteTable;
use hangar_core::token::TokenKey;
use hangar_store::{Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::ActivityBook;
use crate::api::Handles;
use crate::api_tokens::ApiTokens;
use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::connect::Connector;
use crate::dns_records::AcmeFeed;
use crate::drains::Drains;
use crate::drone_session::DroneSessions;
use crate::drones::{DroneDirectory, DroneRegistry};
use crate::error::ApiError;
use crate::hot_state::HotShards;
use crate::leader::{LeaderTasks, Leadership};
use crate::lifecycle::Backends;
use crate::maintenance::Maintenance;
use crate::monitor::{Monitor, MonitorParts};
use crate::placement::Placement;
use crate::reconciler::Reconciler;
use crate::relay::CommandRelay;
use crate::revocations::{Revocations, RevocationsRx};
use crate::routes::{RouteFeed, Routes};

/// The control plane. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    handles: Handles,
}

impl Scheduler {
    pub fn new(
        config: SchedulerConfig,
        store: Arc<dyn Store>,
        token_key: TokenKey,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let config = Arc::new(config);
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();

        let activity = Arc::new(ActivityBook::default());
        let drones = Arc::new(DroneRegistry::default());
        let directory = Arc::new(DroneDirectory::new(
            drones.clone(),
            config.instance_id.clone(),
        ));
        let routes = Arc::new(Routes::default());
        let drains = Arc::new(Drains::new(store.clone()));
        let hot = Arc::new(HotShards::new(
            config.clone(),
            clock.clone(),
            routes.clone(),
        ));
        let traffic = Arc::new(crate::traffic::Traffic::new(clock.clone(), routes.clone()));
        let revocations = Arc::new(Revocations::new(
            store.clone(),
            config.clone(),
            clock.clone(),
            token_key.clone(),
        ));
        let backends = Arc::new(Backends::new(
            store.clone(),
            clock.clone(),
            config.clone(),
            activity.clone(),
        ));
        let placement = Arc::new(Placement::new(
            config.clone(),
            directory.clone(),
            routes.clone(),
            drains.clone(),
            hot.clone(),
        ));
        let leadership = Arc::new(Leadership::new(
            store.clone(),
            clock.clone(),
            config.instance_id.clone(),
            config.api_base_url.clone(),
            config.leader_ttl,
        ));
        let quotas = Arc::new(crate::quotas::Quotas::new(store.clone()));
        let pools = Arc::new(crate::pools::Pools::new(
            store.clone(),
            clock.clone(),
            config.clone(),
        ));
        let connector = Arc::new(Connector {
            store: store.clone(),
            clock: clock.clone(),
            config: config.clone(),
            token_key: token_key.clone(),
            placement: placement.clone(),
            routes: routes.clone(),
            leadership: leadership.clone(),
            quotas: quotas.clone(),
            pools: pools.clone(),
            backends: backends.clone(),
        });
        let maintenance = Arc::new(Maintenance::new(
            store.clone(),
            clock.clone(),
            config.clone(),
        ));
        let tokens = Arc::new(ApiTokens::new(store.clone(), clock.clone()));
        let sessions = Arc::new(DroneSessions::new(
            store.clone(),
            clock.clone(),
            config.clone(),
            drones.clone(),
            backends.clone(),
            hot.clone(),
            maintenance.clone(),
            routes.clone(),
            cancel.clone(),
            tasks.clone(),
        ));
        let forwarder = crate::api::forward_client_with(config.tls_client.clone());
        Scheduler {
            handles: Handles::new(crate::api::Components {
                config,
                clock,
                store,
                token_key,
                connector,
                backends,
                sessions,
                drones,
                directory,
                drains,
                routes,
                hot,
                traffic,
                activity,
                revocations,
                leadership,
                maintenance,
                tokens,
                quotas,
                pools,
                placement,
                forwarder,
                tasks,
                cancel,
            }),
        }
    }

    /// Starts the route publisher, the reconciler, the drone-loss watch, the monitor and the
    /// revocation mirror. They stop when `cancel` fires; await [`Scheduler::wait`] afterwards.
    pub async fn start(&self, cancel: CancellationToken) -> Result<(), StoreError> {
        let h = &self.handles;
        // Publish the first table before returning, so a proxy wired afterwards starts with
        // every known route (and restarts never serve an empty table).
        let feed = RouteFeed::new(h.store.clone(), h.config.clone(), h.routes.clone());
        let initial = feed.load().await?;
        h.tasks.spawn(feed.run(initial, cancel.clone()));

        // Tokens work from the first request, and follow the store from then on.
        h.tokens
            .load()
            .await
            .map_err(|e| StoreError::Backend(e.to_string().into()))?;
        let (tokens, c) = (h.tokens.clone(), cancel.clone());
        h.tasks.spawn(async move { tokens.follow(c).await });
        let (quotas, c) = (h.quotas.clone(), cancel.clone());
        h.tasks.spawn(async move { quotas.follow(c).await });
        let (pools, c) = (h.pools.clone(), cancel.clone());
        h.tasks.spawn(async move { pools.follow(c).await });

        // Every drone of the cluster, for placement; and the commands in backend records,
        // relayed to the drone sessions held here, whoever leads.
        let (directory, store, c) = (h.directory.clone(), h.store.clone(), cancel.clone());
        h.tasks
            .spawn(async move { directory.follow(store, c).await });
        let relay = CommandRelay {
            config: h.config.clone(),
            drones: h.drones.clone(),
        };
        let (store, c) = (h.store.clone(), cancel.clone());
        h.tasks.spawn(async move { relay.run(store, c).await });

        // Leadership: a first campaign before serving, so a single instance leads (and has
        // closed what a previous run left) before any request arrives.
        let elected = h.leadership.campaign().await?;
        if let Some((_, token)) = elected
            && let Err(e) = self.reconciler(token, h.clock.now_ms()).pass().await
        {
            tracing::warn!(error = %e, "first reconciler pass failed; it will be retried");
        }
        let this = self.clone();
        let leader_tasks: LeaderTasks = Box::new(move |term, tasks| {
            let elected_at = this.handles.clock.now_ms();
            tasks.spawn(
                this.reconciler(term.token, elected_at)
                    .run(term.cancel.clone()),
            );
            if this.handles.config.run_pool_converger {
                tasks.spawn(this.converger(term.token).run(term.cancel.clone()));
            }
            let sessions = this.handles.sessions.clone();
            let fenced = this.handles.backends.fenced(term.token);
            let c = term.cancel.clone();
            tasks.spawn(async move { sessions.watch_drones(fenced, c).await });
        });
        h.tasks.spawn(
            h.leadership
                .clone()
                .run(elected, leader_tasks, cancel.clone()),
        );
        let leadership = h.leadership.clone();
        let c = cancel.clone();
        h.tasks.spawn(async move { leadership.announce(c).await });

        h.tasks.spawn(self.monitor().run(cancel.clone()));

        let revocations = h.revocations.clone();
        let c = cancel.clone();
        h.tasks.spawn(async move { revocations.follow(c).await });

        let maintenance = h.maintenance.clone();
        let c = cancel.clone();
        h.tasks.spawn(async move { maintenance.follow(c).await });

        // Sessions, SSE streams and feeds stop with the caller's token.
        let own = h.cancel.clone();
        h.tasks.spawn(async move {
            cancel.cancelled().await;
            own.cancel();
        });
        Ok(())
    }

    /// The reconciler of the leader's term with fencing token `token`, which began at
    /// `elected_at` (wall clock, ms): it declares no drone lost for one lease TTL from then.
    pub(crate) fn reconciler(&self, token: hangar_store::Revision, elected_at: u64) -> Reconciler {
        let h = &self.handles;
        Reconciler {
            lost_not_before: elected_at + h.config.lease_ttl.as_millis() as u64,
            store: h.store.clone(),
            clock: h.clock.clone(),
            config: h.config.clone(),
            backends: Arc::new(h.backends.fenced(token)),
            drains: h.drains.clone(),
            activity: h.activity.clone(),
            sessions: h.sessions.clone(),
            routes: h.routes.clone(),
            maintenance: h.maintenance.clone(),
            agenda: Default::default(),
        }
    }

    /// The pool converger of the leader's term with fencing token `token`.
    pub(crate) fn converger(
        &self,
        token: hangar_store::Revision,
    ) -> crate::pools::converger::Converger {
        let h = &self.handles;
        crate::pools::converger::Converger::new(
            h.store.clone(),
            h.clock.clone(),
            h.config.clone(),
            h.pools.clone(),
            h.routes.clone(),
            h.placement.clone(),
            Arc::new(h.backends.fenced(token)),
            token,
        )
    }

    /// The monitor over this scheduler's components.
    pub(crate) fn monitor(&self) -> Monitor {
        let h = &self.handles;
        Monitor::new(MonitorParts {
            config: h.config.clone(),
            clock: h.clock.clone(),
            hot: h.hot.clone(),
            routes: h.routes.clone(),
            drones: h.directory.clone(),
            sessions: h.drones.clone(),
            drains: h.drains.clone(),
            backends: h.backends.clone(),
            activity: h.activity.clone(),
            leadership: h.leadership.clone(),
        })
    }

    /// Begins a maintenance window of `length`: stores the promise that no drone is declared
    /// lost before it ends and tells every connected drone to hold its fence until then. Call
    /// it before a planned stop; returns the window's end (wall clock, ms).
    pub async fn begin_maintenance(&self, length: Duration) -> Result<u64, ApiError> {
        Ok(crate::api::begin_maintenance(&self.handles, length)
            .await?
            .until)
    }

    /// Creates an admin token if the store has none (a new cluster, or every admin token
    /// revoked or expired); returns it, to hand to the operator once.
    pub async fn bootstrap_admin_token(&self) -> Result<Option<String>, ApiError> {
        if self.handles.tokens.has_admin().await? {
            return Ok(None);
        }
        let created = self
            .handles
            .tokens
            .create(crate::api_tokens::CreateTokenRequest {
                scope: Some(crate::api_tokens::Scope::Admin),
                description: Some("the first admin token, written by serve".into()),
                ..Default::default()
            })
            .await?;
        Ok(Some(created.token))
    }

    /// Waits for every background task to finish (after cancellation).
    pub async fn wait(&self) {
        self.handles.tasks.close();
        self.handles.tasks.wait().await;
    }

    /// Follows the route table: the proxy and DNS subscribe here.
    pub fn routes(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.handles.routes.subscribe()
    }

    /// Hands every route table to `sink` (a colocated proxy) as it is published, before a
    /// connect waiting for its backend's route answers: register it before [`Scheduler::start`]
    /// to get the first table too.
    pub fn publish_routes_to(&self, sink: impl Fn(&Arc<RouteTable>) + Send + Sync + 'static) {
        self.handles.routes.add_sink(Box::new(sink));
    }

    /// Follows the set of revoked tokens: proxies subscribe here.
    pub fn revocations(&self) -> RevocationsRx {
        self.handles.revocations.subscribe()
    }

    /// Merges activity reported by a proxy: idle timeouts, request counts for the hot-shard
    /// detector, and the traffic chart.
    pub fn report_activity(&self, batch: &ActivityBatch) {
        self.handles.activity.record(batch);
        self.handles.hot.observe_activity(batch);
        self.handles.traffic.observe_activity(batch);
        // The leader decides idle timeouts: a follower's proxy traffic must reach it too.
        if let crate::leader::Role::Follower {
            leader: Some(leader),
        } = self.handles.leadership.role()
            && let Some(secret) = self.handles.config.drone_secret.clone()
            && !batch.reports.is_empty()
        {
            let body = serde_json::to_vec(batch).unwrap_or_default();
            let client = self.handles.forwarder.clone();
            let url = format!("{}/v1/activity", leader.api_url.trim_end_matches('/'));
            self.handles.tasks.spawn(async move {
                let Ok(req) = http::Request::post(url)
                    .header(http::header::AUTHORIZATION, format!("Bearer {secret}"))
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                else {
                    return;
                };
                match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
                    Ok(Ok(r)) if r.status().is_success() => {}
                    Ok(Ok(r)) => {
                        tracing::warn!(status = %r.status(), "the leader refused forwarded activity")
                    }
                    _ => tracing::debug!("cannot forward activity to the leader"),
                }
            });
        }
    }

    /// Records resource use reported by an in-process drone (network drones report over
    /// their session).
    pub fn report_usage(&self, drone: &str, usage: &[hangar_core::drone::BackendUsage]) {
        self.handles.hot.observe_usage(drone, usage);
    }

    /// True once routes are loaded and at least one drone is attached.
    pub fn is_ready(&self) -> bool {
        self.handles.routes.is_ready() && !self.handles.directory.is_empty()
    }

    /// Attaches a drone whose agent runs in this process (dev mode). Returns the channel the
    /// agent reads commands from and the one it sends events on.
    pub async fn attach_drone(
        &self,
        hello: Hello,
    ) -> Result<
        (
            mpsc::UnboundedReceiver<SchedulerMessage>,
            mpsc::Sender<DroneMessage>,
        ),
        ApiError,
    > {
        Ok(self.handles.sessions.attach(hello).await?)
    }

    /// A feed of the ACME challenge records in this scheduler's store; run it with
    /// [`AcmeFeed::run`].
    pub fn acme_feed(&self) -> AcmeFeed {
        AcmeFeed::new(self.handles.store.clone())
    }

    /// The scheduler's configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.handles.config
    }

    /// The API's router (exposed for embedding and tests).
    pub fn router(&self) -> Router {
        crate::api::router(self.handles.clone())
    }

    /// Serves the API on `listener` until `shutdown` fires, finishing in-flight requests.
    pub async fn serve_api(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    }

    /// The components, for tests that drive them directly.
    #[cfg(test)]
    pub(crate) fn handles(&self) -> &Handles {
        &self.handles
    }
}
