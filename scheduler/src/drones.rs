//! Connected drones: the command channel of each session and the run id of the agent process
//! behind it, plus what placement needs (capacity, pool, health).
//!
//! In `hangar dev` the one embedded drone is attached in-process; network drones attach when
//! their session's `Hello` is admitted. A drone's `run_id` changes with every agent process,
//! which is how the scheduler tells a restarted agent from a reconnecting one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hangar_core::UnixMillis;
use hangar_core::drone::{Capacity, SchedulerMessage};
use tokio::sync::mpsc;

/// A session's changing state, shared between the session task and readers.
#[derive(Debug, Default)]
pub struct DroneStatus {
    /// Why the drone's runtime cannot take work (e.g. Docker is down), if it cannot.
    unhealthy: Mutex<Option<String>>,
    last_heartbeat: AtomicU64,
}

impl DroneStatus {
    pub fn set_unhealthy(&self, why: Option<String>) {
        *self.unhealthy.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    pub fn unhealthy(&self) -> Option<String> {
        self.unhealthy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn heartbeat(&self, now: UnixMillis) {
        self.last_heartbeat.store(now, Ordering::Relaxed);
    }

    pub fn last_heartbeat(&self) -> UnixMillis {
        self.last_heartbeat.load(Ordering::Relaxed)
    }
}

/// One connected drone.
#[derive(Clone, Debug)]
pub struct DroneConn {
    pub name: String,
    pub run_id: String,
    pub runtime: String,
    pub pool: String,
    pub capacity: Capacity,
    pub tx: mpsc::Sender<SchedulerMessage>,
    pub status: Arc<DroneStatus>,
    /// A network drone with a session lease and heartbeats; `false` for the in-process drone
    /// of `hangar dev`.
    pub leased: bool,
}

/// Every connected drone. A std `RwLock`: held only for map lookups, never across `.await`.
#[derive(Debug, Default)]
pub struct DroneRegistry {
    drones: RwLock<HashMap<String, DroneConn>>,
}

impl DroneRegistry {
    pub fn insert(&self, conn: DroneConn) {
        self.drones
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn.name.clone(), conn);
    }

    /// Removes the drone if it is still the given run (a newer run may have replaced it).
    pub fn remove(&self, name: &str, run_id: &str) {
        let mut d = self.drones.write().unwrap_or_else(|e| e.into_inner());
        if d.get(name).is_some_and(|c| c.run_id == run_id) {
            d.remove(name);
        }
    }

    pub fn get(&self, name: &str) -> Option<DroneConn> {
        self.drones
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub fn all(&self) -> Vec<DroneConn> {
        let mut v: Vec<DroneConn> = self
            .drones
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn is_empty(&self) -> bool {
        self.drones
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}
