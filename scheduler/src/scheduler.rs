//! The `Scheduler`: shared state of the control plane and its background tasks (route feed,
//! reconciler, drone event pumps).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;
use hangar_core::activity::ActivityBatch;
use hangar_core::drone::{DroneMessage, Hello, SchedulerMessage};
use hangar_core::route::RouteTable;
use hangar_core::token::TokenKey;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::activity::ActivityBook;
use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::drones::DroneRegistry;
use crate::error::ApiError;
use hangar_store::Store;

/// Commands buffered per drone before a send waits.
const DRONE_CHANNEL: usize = 1024;

pub(crate) struct Inner {
    pub(crate) config: SchedulerConfig,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) token_key: TokenKey,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) drones: DroneRegistry,
    pub(crate) activity: ActivityBook,
    /// Reservations of live backends per drone, refreshed by the route feed; read by
    /// placement and `GET /v1/drones`.
    pub(crate) route_load: DashMap<String, hangar_core::api::Amounts>,
    /// Drains in progress by drone name; mirrors the store's drain records (refreshed by the
    /// reconciler, updated by the drain API).
    pub(crate) drains: DashMap<String, crate::records::DrainRecord>,
    /// The latest route table; the route feed is its only writer.
    pub(crate) routes: watch::Sender<Arc<RouteTable>>,
    /// Set once the route feed has published its first table (readiness).
    pub(crate) routes_ready: AtomicBool,
    pub(crate) tasks: TaskTracker,
    pub(crate) cancel: CancellationToken,
    /// Recent route deltas for remote proxies.
    pub(crate) deltas: crate::feed::DeltaLog,
    /// The current set of revoked tokens; `feed::follow_revocations` is its only writer.
    pub(crate) revocations: watch::Sender<Arc<hangar_core::feed::Revocations>>,
    /// Serialises drone admission, drone loss and reconciler passes (see `admit_drone`).
    pub(crate) admission: tokio::sync::Mutex<()>,
    /// Live backends with their drone, pool and CPU cap; the route feed is its only writer.
    /// A std lock held only to clone the `Arc`.
    pub(crate) directory: std::sync::RwLock<Arc<crate::monitor::Directory>>,
    /// The hot-shard detector's state. A std mutex: observations and passes are short and
    /// never await while holding it.
    pub(crate) hot: std::sync::Mutex<crate::hot::HotDetector>,
    /// What the detector last found (`GET /v1/hot`, placement); the monitor is its only
    /// writer.
    pub(crate) hot_list: std::sync::RwLock<Arc<hangar_core::api::HotList>>,
    /// Cached handles of per-backend gauges (usage and hotness).
    pub(crate) backend_series: crate::metrics::BackendSeries,
    /// Backends relocated off hot drones since start.
    pub(crate) relocated_total: std::sync::atomic::AtomicU64,
}

/// The control plane. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    pub(crate) inner: Arc<Inner>,
}

impl Scheduler {
    pub fn new(
        config: SchedulerConfig,
        store: Arc<dyn Store>,
        token_key: TokenKey,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let hot = crate::hot::HotDetector::new(config.hot.clone());
        let hot_list = Arc::new(crate::monitor::empty_list(&config));
        Scheduler {
            inner: Arc::new(Inner {
                config,
                store,
                token_key,
                clock,
                drones: DroneRegistry::default(),
                activity: ActivityBook::default(),
                route_load: DashMap::new(),
                drains: DashMap::new(),
                routes: watch::channel(Arc::new(RouteTable::default())).0,
                routes_ready: AtomicBool::new(false),
                tasks: TaskTracker::new(),
                cancel: CancellationToken::new(),
                admission: tokio::sync::Mutex::new(()),
                directory: Default::default(),
                hot: std::sync::Mutex::new(hot),
                hot_list: std::sync::RwLock::new(hot_list),
                backend_series: Default::default(),
                relocated_total: Default::default(),
                deltas: crate::feed::DeltaLog::default(),
                revocations: watch::channel(Arc::new(Default::default())).0,
            }),
        }
    }

    /// Starts the route feed and the reconciler. They stop when `cancel` fires; await
    /// [`Scheduler::wait`] afterwards.
    pub async fn start(&self, cancel: CancellationToken) -> Result<(), hangar_store::StoreError> {
        let inner = self.inner.clone();
        // Publish the first table before returning, so a proxy wired afterwards starts with
        // every known route (and restarts never serve an empty table).
        let feed = crate::route_feed::RouteFeed::new(inner.clone());
        let initial = feed.load().await?;
        let c = cancel.clone();
        self.inner
            .tasks
            .spawn(async move { feed.run(initial, c).await });
        let reconciler = crate::reconciler::Reconciler::new(inner.clone());
        // One pass before serving: records left by a previous run (backends that died with
        // it) are closed before any request can be routed to them.
        if let Err(e) = reconciler.pass().await {
            tracing::warn!(error = %e, "first reconciler pass failed; it will be retried");
        }
        let c = cancel.clone();
        self.inner
            .tasks
            .spawn(async move { reconciler.run(c).await });
        let c = cancel.clone();
        self.inner
            .tasks
            .spawn(crate::drone_session::watch_drones(inner.clone(), c));
        let monitor = crate::monitor::Monitor::new(inner.clone());
        let c = cancel.clone();
        self.inner.tasks.spawn(monitor.run(c));
        self.inner
            .tasks
            .spawn(crate::feed::record_deltas(inner.clone(), cancel.clone()));
        self.inner.tasks.spawn(crate::feed::follow_revocations(
            inner.clone(),
            cancel.clone(),
        ));
        let own = self.inner.cancel.clone();
        self.inner.tasks.spawn(async move {
            cancel.cancelled().await;
            own.cancel();
        });
        Ok(())
    }

    /// Waits for every background task to finish (after cancellation).
    pub async fn wait(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// Follows the route table: the proxy and DNS subscribe here.
    pub fn routes(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.inner.routes.subscribe()
    }

    /// Follows the set of revoked tokens: proxies subscribe here.
    pub fn revocations(&self) -> crate::feed::RevocationsRx {
        self.inner.revocations.subscribe()
    }

    /// Merges activity reported by a proxy.
    pub fn report_activity(&self, batch: &ActivityBatch) {
        self.inner.record_activity(batch);
    }

    /// Records resource use reported by an in-process drone (network drones report over
    /// their session).
    pub fn report_usage(&self, drone: &str, usage: &[hangar_core::drone::BackendUsage]) {
        self.inner.record_usage(drone, usage);
    }

    /// True once routes are loaded and at least one drone is attached.
    pub fn is_ready(&self) -> bool {
        self.inner.routes_ready.load(Ordering::Acquire) && !self.inner.drones.is_empty()
    }

    /// Attaches a drone whose agent runs in this process (dev mode). Returns the channel the
    /// agent reads commands from and the one it sends events on; events are applied in order
    /// by a tracked task until shutdown begins.
    pub async fn attach_drone(
        &self,
        hello: Hello,
    ) -> Result<(mpsc::Receiver<SchedulerMessage>, mpsc::Sender<DroneMessage>), ApiError> {
        let (cmd_rx, _status) = self.inner.admit_drone(&hello, None).await?;
        let (ev_tx, mut ev_rx) = mpsc::channel::<DroneMessage>(DRONE_CHANNEL);
        let inner = self.inner.clone();
        let (name, run_id) = (hello.drone, hello.run_id);
        self.inner.tasks.spawn(async move {
            loop {
                // After shutdown begins no event is applied: backends stopped by a shutting
                // down agent stay recorded under its run and are closed as lost on restart.
                let msg = tokio::select! {
                    _ = inner.cancel.cancelled() => break,
                    m = ev_rx.recv() => m,
                };
                let Some(DroneMessage::Event { backend, event }) = msg else {
                    break;
                };
                inner
                    .apply_drone_event(&name, &run_id, &backend, event)
                    .await;
            }
            inner.drones.remove(&name, &run_id);
            tracing::info!(drone = %name, run_id = %run_id, "drone detached");
        });
        Ok((cmd_rx, ev_tx))
    }

    /// The scheduler's configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.inner.config
    }
}
