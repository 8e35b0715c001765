//! Connected drones: their command channels and the run id of the agent process behind each.
//!
//! In `hangar dev` the one embedded drone is attached in-process; network drones attach the
//! same way once their session is established. A drone's `run_id` changes with every agent
//! process, which is how the scheduler tells a restarted agent from a reconnecting one.

use std::collections::HashMap;
use std::sync::RwLock;

use hangar_core::drone::SchedulerMessage;
use tokio::sync::mpsc;

/// One connected drone.
#[derive(Clone, Debug)]
pub struct DroneConn {
    pub name: String,
    pub run_id: String,
    pub runtime: String,
    pub tx: mpsc::Sender<SchedulerMessage>,
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
