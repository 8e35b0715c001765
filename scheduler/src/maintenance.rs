//! Maintenance windows: a promise, stored before a planned stop of the control plane, that no
//! drone is declared lost before the window ends, sent to every connected drone so that it
//! holds its fence deadline until then. Sessions survive a restart or upgrade of the only
//! `serve` within the window.
//!
//! The guard band holds across the window: a drone fences at the window's end at the latest
//! if nothing renews its lease, and the control plane declares no drone lost before the end
//! plus one lease TTL. Outside a window, a cut-off drone fences as usual. A window can be
//! lengthened but never shortened: drones already hold their fence until its end.
//!
//! A window begins on the instance that stores it (`POST /v1/maintenance`, which a follower
//! forwards to the leader, or `hangar serve --maintenance-window` on SIGTERM); every instance
//! follows the record and tells the drones whose sessions it holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hangar_core::UnixMillis;
use hangar_store::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::error::ApiError;

/// Where the promise is stored.
pub const MAINTENANCE_KEY: &str = "/hangar/maintenance";

/// How long a stop waits for connected drones to have been told to hold.
const DELIVERY_WAIT: Duration = Duration::from_secs(2);

/// The longest window: a promise that no drone fences for longer would let a partitioned
/// drone run on for that long.
pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// The stored promise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceRecord {
    /// No drone is declared lost before this (wall clock, ms).
    pub until: UnixMillis,
    pub started_at: UnixMillis,
}

pub struct Maintenance {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: Arc<SchedulerConfig>,
    /// Windows to tell connected drones about (how long from now).
    holds: broadcast::Sender<Duration>,
    /// Holds the session loops have sent, and a wake-up for who waits on them.
    delivered: AtomicU64,
    delivered_changed: Notify,
    /// The end of the latest window told to this instance's drones (ms).
    announced_until: AtomicU64,
}

impl Maintenance {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, config: Arc<SchedulerConfig>) -> Self {
        Maintenance {
            store,
            clock,
            config,
            holds: broadcast::channel(16).0,
            delivered: AtomicU64::new(0),
            delivered_changed: Notify::new(),
            announced_until: AtomicU64::new(0),
        }
    }

    /// The window in force, if one has not ended yet.
    pub async fn current(&self) -> Result<Option<MaintenanceRecord>, ApiError> {
        let Some(kv) = self.store.get(MAINTENANCE_KEY).await? else {
            return Ok(None);
        };
        let record = serde_json::from_slice::<MaintenanceRecord>(&kv.value).map_err(|e| {
            ApiError::Internal(format!("the maintenance record is unreadable: {e}"))
        })?;
        Ok((record.until > self.clock.now_ms()).then_some(record))
    }

    /// Tells this instance's drones about a window ending at `until`, unless (without `again`)
    /// they were told about one ending as late already.
    fn announce(&self, until: UnixMillis, again: bool) {
        let now = self.clock.now_ms();
        let told = self.announced_until.fetch_max(until, Ordering::SeqCst) >= until;
        if until > now && (again || !told) {
            let _ = self.holds.send(Duration::from_millis(until - now));
        }
    }

    /// Follows the stored window until `cancel` fires: one begun on another instance is told
    /// to the drones whose sessions this instance holds.
    pub async fn follow(&self, cancel: CancellationToken) {
        hangar_store::mirror::mirror_prefix::<MaintenanceRecord>(
            self.store.as_ref(),
            MAINTENANCE_KEY,
            cancel,
            |records: &BTreeMap<String, MaintenanceRecord>, _| {
                if let Some(r) = records.get(MAINTENANCE_KEY) {
                    self.announce(r.until, false);
                }
            },
        )
        .await
    }

    /// Stores a window of `length` from now (or keeps the one in force, if it ends later) and
    /// tells the `sessions` drones connected here to hold their fence until its end, waiting
    /// (bounded) until their sessions have sent it; the other instances tell theirs. Returns
    /// the window.
    pub async fn begin(
        &self,
        length: Duration,
        sessions: usize,
    ) -> Result<MaintenanceRecord, ApiError> {
        if length.is_zero() || length > MAX_WINDOW {
            return Err(ApiError::BadRequest(format!(
                "a maintenance window lasts from 1 second to {} days",
                MAX_WINDOW.as_secs() / 86_400
            )));
        }
        let now = self.clock.now_ms();
        let mut record = MaintenanceRecord {
            until: now + length.as_millis() as u64,
            started_at: now,
        };
        // Never shortened: drones told about a later end hold their fence until then.
        if let Some(current) = self.current().await?
            && current.until >= record.until
        {
            record = current;
        }
        let value = serde_json::to_vec(&record).unwrap_or_default();
        self.store.put(MAINTENANCE_KEY, value, None).await?;
        let before = self.delivered.load(Ordering::SeqCst);
        // Told here and now (the watch may be later), so that the wait below covers it.
        self.announce(record.until, true);
        let all = async {
            loop {
                let notified = self.delivered_changed.notified();
                if self.delivered.load(Ordering::SeqCst) >= before + sessions as u64 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(DELIVERY_WAIT, all).await.is_err() {
            tracing::warn!(
                "not every connected drone was told about the maintenance window in time"
            );
        }
        tracing::warn!(
            until = record.until,
            drones = sessions,
            "maintenance window begins: no drone is declared lost before it ends"
        );
        Ok(record)
    }

    /// Windows to send, for a session loop.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Duration> {
        self.holds.subscribe()
    }

    /// A session loop sent a hold.
    pub(crate) fn delivered(&self) {
        self.delivered.fetch_add(1, Ordering::SeqCst);
        self.delivered_changed.notify_waiters();
    }

    /// Whether a window (plus one lease TTL, the guard band) forbids declaring drones lost now.
    pub async fn protects_drones(&self) -> Result<bool, ApiError> {
        let Some(kv) = self.store.get(MAINTENANCE_KEY).await? else {
            return Ok(false);
        };
        let Ok(record) = serde_json::from_slice::<MaintenanceRecord>(&kv.value) else {
            return Ok(false);
        };
        let ends = record.until + self.config.lease_ttl.as_millis() as u64;
        Ok(self.clock.now_ms() < ends)
    }
}
