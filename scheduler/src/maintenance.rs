//! Maintenance windows: a promise, stored before a planned stop of the control plane, that no
//! drone is declared lost before the window ends, sent to every connected drone so that it
//! holds its fence deadline until then. Sessions survive a restart or upgrade of the only
//! `serve` within the window.
//!
//! The guard band holds across the window: a drone fences at the window's end at the latest
//! if nothing renews its lease, and the control plane declares no drone lost before the end
//! plus one lease TTL. Outside a window, a cut-off drone fences as usual.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hangar_core::UnixMillis;
use hangar_store::Store;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast};

use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::error::ApiError;

/// Where the promise is stored.
pub const MAINTENANCE_KEY: &str = "/hangar/maintenance";

/// How long a stop waits for connected drones to have been told to hold.
const DELIVERY_WAIT: Duration = Duration::from_secs(2);

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
        }
    }

    /// Stores a window of `length` from now and tells the `sessions` connected drones to hold
    /// their fence until its end, waiting (bounded) until their sessions have sent it. Returns
    /// the window's end.
    pub async fn begin(&self, length: Duration, sessions: usize) -> Result<UnixMillis, ApiError> {
        let now = self.clock.now_ms();
        let record = MaintenanceRecord {
            until: now + length.as_millis() as u64,
            started_at: now,
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        self.store.put(MAINTENANCE_KEY, value, None).await?;
        let before = self.delivered.load(Ordering::SeqCst);
        let _ = self.holds.send(length);
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
        Ok(record.until)
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
