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
    /// Which session this is: set by [`DroneRegistry::insert`], new for every session, so that
    /// an old session of the same agent run (a half-open connection the drone has already
    /// replaced) can only remove itself, never its successor.
    pub session: u64,
}

/// Every connected drone. A std `RwLock`: held only for map lookups, never across `.await`.
#[derive(Debug, Default)]
pub struct DroneRegistry {
    drones: RwLock<HashMap<String, DroneConn>>,
    sessions: AtomicU64,
}

impl DroneRegistry {
    /// Registers a session, replacing any earlier one of the drone; returns its session number.
    pub fn insert(&self, mut conn: DroneConn) -> u64 {
        let session = self.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        conn.session = session;
        self.drones
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn.name.clone(), conn);
        session
    }

    /// Removes session `session` of the drone, if it is still the registered one (a newer
    /// session, of the same run or another, may have replaced it).
    pub fn remove_session(&self, name: &str, session: u64) {
        let mut d = self.drones.write().unwrap_or_else(|e| e.into_inner());
        if d.get(name).is_some_and(|c| c.session == session) {
            d.remove(name);
        }
    }

    /// Removes the drone if its registered session belongs to agent run `run_id` (the run's
    /// lease expired).
    pub fn remove_run(&self, name: &str, run_id: &str) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(run: &str) -> (DroneConn, mpsc::Receiver<SchedulerMessage>) {
        let (tx, rx) = mpsc::channel(1);
        let conn = DroneConn {
            name: "d1".into(),
            run_id: run.into(),
            runtime: "process".into(),
            pool: "default".into(),
            capacity: Capacity::default(),
            tx,
            status: Arc::default(),
            leased: true,
            session: 0,
        };
        (conn, rx)
    }

    /// A drone that reconnects with the same run id while its old session is half-open: the
    /// old session's cleanup must not evict the new one (it used to compare only the run id).
    #[test]
    fn an_old_session_of_the_same_run_cannot_remove_its_successor() {
        let registry = DroneRegistry::default();
        let (old, _old_rx) = conn("r1");
        let (new, _new_rx) = conn("r1");
        let old_session = registry.insert(old);
        let new_session = registry.insert(new);
        assert_ne!(old_session, new_session);
        registry.remove_session("d1", old_session);
        assert_eq!(
            registry.get("d1").map(|c| c.session),
            Some(new_session),
            "the old session's cleanup evicted the new session"
        );
        registry.remove_session("d1", new_session);
        assert!(registry.get("d1").is_none());
        // A lost run is removed by run id, whichever of its sessions is registered.
        let (again, _rx) = conn("r1");
        registry.insert(again);
        registry.remove_run("d1", "r2");
        assert!(registry.get("d1").is_some());
        registry.remove_run("d1", "r1");
        assert!(registry.is_empty());
    }
}
