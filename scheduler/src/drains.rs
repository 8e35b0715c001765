//! Drains in progress, by drone name: a drained drone gets no new backends, and at its
//! deadline its remaining backends are terminated with reason `drained`.
//!
//! The store's drain records are the truth (a drain survives restarts); [`Drains`] keeps them
//! in memory for placement, the monitor and the drone list. It is the only writer of both: the
//! drain API starts and cancels drains through it, and the reconciler refreshes it from the
//! store on every pass (so another instance's drains show up too).

use std::collections::BTreeMap;
use std::sync::Arc;

use dashmap::DashMap;
use hangar_core::UnixMillis;
use hangar_store::{Store, StoreResult};

use crate::records::{DrainRecord, drain_key, list_drains};

pub struct Drains {
    store: Arc<dyn Store>,
    /// Mirrors the store's drain records.
    current: DashMap<String, DrainRecord>,
}

impl Drains {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Drains {
            store,
            current: DashMap::new(),
        }
    }

    /// Whether `drone` is being drained.
    pub fn is_draining(&self, drone: &str) -> bool {
        self.current.contains_key(drone)
    }

    /// Records a drain of `drone` started at `now`, with an optional deadline.
    pub async fn start(
        &self,
        drone: &str,
        now: UnixMillis,
        deadline_at: Option<UnixMillis>,
    ) -> StoreResult<()> {
        let rec = DrainRecord {
            started_at: now,
            deadline_at,
        };
        let value = serde_json::to_vec(&rec).unwrap_or_default();
        self.store.put(&drain_key(drone), value, None).await?;
        self.current.insert(drone.to_string(), rec);
        Ok(())
    }

    /// Ends the drain of `drone`.
    pub async fn cancel(&self, drone: &str) -> StoreResult<()> {
        self.store.delete(&drain_key(drone)).await?;
        self.current.remove(drone);
        Ok(())
    }

    /// Reads every drain record, makes the in-memory view match, and returns them.
    pub async fn refresh(&self) -> StoreResult<BTreeMap<String, DrainRecord>> {
        let drains = list_drains(self.store.as_ref()).await?;
        self.current.retain(|k, _| drains.contains_key(k));
        for (k, v) in &drains {
            self.current.insert(k.clone(), v.clone());
        }
        Ok(drains)
    }
}
