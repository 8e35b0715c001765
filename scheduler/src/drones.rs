//! Drones: the sessions this instance holds ([`DroneRegistry`]: the command channel of each and
//! the run id of the agent process behind it) and every drone of the cluster
//! ([`DroneDirectory`]: the store's drone records, whichever instance holds their sessions,
//! merged with this instance's own), which is what placement and the monitor choose from.
//!
//! In `hangar dev` the one embedded drone is attached in-process; network drones attach when
//! their session's `Hello` is admitted, on any instance. A drone's `run_id` changes with every
//! agent process, which is how the scheduler tells a restarted agent from a reconnecting one.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hangar_core::UnixMillis;
use hangar_core::drone::{Capacity, SchedulerMessage};
use hangar_store::Store;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::records::{DRONES_PREFIX, DroneRecord};

/// A session's changing state, shared between the session task and readers.
#[derive(Debug, Default)]
pub struct DroneStatus {
    /// Why the drone's runtime cannot take work (e.g. Docker is down), if it cannot.
    unhealthy: Mutex<Option<String>>,
    last_heartbeat: AtomicU64,
}

/// Bumped whenever a session's health changes, so cached views of the drones are rebuilt.
static HEALTH_CHANGES: AtomicU64 = AtomicU64::new(0);

impl DroneStatus {
    pub fn set_unhealthy(&self, why: Option<String>) {
        let mut current = self.unhealthy.lock().unwrap_or_else(|e| e.into_inner());
        if *current != why {
            *current = why;
            HEALTH_CHANGES.fetch_add(1, Ordering::Release);
        }
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
    /// Unbounded: what is queued is bounded by the drone's records in transition, and the
    /// relay and admission must never wait on a slow session (it ends with its lease).
    pub tx: mpsc::UnboundedSender<SchedulerMessage>,
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
    /// Bumped on every insert and removal.
    version: AtomicU64,
    /// The sessions as placement reads them, with the registry version and health changes
    /// they were built at (rebuilt only when either moved).
    infos: RwLock<(u64, u64, Arc<Vec<DroneInfo>>)>,
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
        self.version.fetch_add(1, Ordering::Release);
        session
    }

    /// Removes session `session` of the drone, if it is still the registered one (a newer
    /// session, of the same run or another, may have replaced it).
    pub fn remove_session(&self, name: &str, session: u64) {
        let mut d = self.drones.write().unwrap_or_else(|e| e.into_inner());
        if d.get(name).is_some_and(|c| c.session == session) {
            d.remove(name);
            self.version.fetch_add(1, Ordering::Release);
        }
    }

    /// Removes the drone if its registered session belongs to agent run `run_id` (the run's
    /// lease expired).
    pub fn remove_run(&self, name: &str, run_id: &str) {
        let mut d = self.drones.write().unwrap_or_else(|e| e.into_inner());
        if d.get(name).is_some_and(|c| c.run_id == run_id) {
            d.remove(name);
            self.version.fetch_add(1, Ordering::Release);
        }
    }

    /// The sessions as placement sees them, rebuilt only after a session came, went or
    /// changed health.
    pub fn infos(&self) -> Arc<Vec<DroneInfo>> {
        // The counters are read before the map: a change after this reading rebuilds next
        // time.
        let version = self.version.load(Ordering::Acquire);
        let health = HEALTH_CHANGES.load(Ordering::Acquire);
        {
            let cached = self.infos.read().unwrap_or_else(|e| e.into_inner());
            if cached.0 == version && cached.1 == health {
                return cached.2.clone();
            }
        }
        let infos: Arc<Vec<DroneInfo>> = Arc::new(
            self.drones
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(DroneInfo::of_session)
                .collect(),
        );
        *self.infos.write().unwrap_or_else(|e| e.into_inner()) = (version, health, infos.clone());
        infos
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

/// A drone placement may choose: where it runs, what it can hold and whether it can take work.
#[derive(Clone, Debug, PartialEq)]
pub struct DroneInfo {
    pub name: String,
    pub run_id: String,
    pub runtime: String,
    pub pool: String,
    pub capacity: Capacity,
    /// Why its runtime cannot take work, if it cannot.
    pub unhealthy: Option<String>,
}

impl DroneInfo {
    fn of_record(r: &DroneRecord) -> Self {
        DroneInfo {
            name: r.name.clone(),
            run_id: r.run_id.clone(),
            runtime: r.runtime.clone(),
            pool: r.pool.clone(),
            capacity: r.capacity,
            unhealthy: r.unhealthy.clone(),
        }
    }

    fn of_session(c: &DroneConn) -> Self {
        DroneInfo {
            name: c.name.clone(),
            run_id: c.run_id.clone(),
            runtime: c.runtime.clone(),
            pool: c.pool.clone(),
            capacity: c.capacity,
            unhealthy: c.status.unhealthy(),
        }
    }
}

/// Every drone at one moment, each once (this instance's sessions, then the drones other
/// instances hold that are not also held here: a session here is newer than a record saying
/// otherwise), with the drones of each pool listed apart so placement can sample a pool's
/// drones without walking the others. Built once per change of the drones.
#[derive(Debug, Default)]
pub struct DroneIndex {
    drones: Vec<DroneInfo>,
    /// Positions in `drones`, by pool.
    by_pool: HashMap<String, Vec<usize>>,
}

impl DroneIndex {
    fn build(local: &[DroneInfo], elsewhere: &[DroneInfo]) -> DroneIndex {
        let here: std::collections::HashSet<&str> = if elsewhere.is_empty() {
            Default::default()
        } else {
            local.iter().map(|l| l.name.as_str()).collect()
        };
        let drones: Vec<DroneInfo> = local
            .iter()
            .chain(elsewhere.iter().filter(|d| !here.contains(d.name.as_str())))
            .cloned()
            .collect();
        let mut by_pool: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, d) in drones.iter().enumerate() {
            by_pool.entry(d.pool.clone()).or_default().push(i);
        }
        DroneIndex { drones, by_pool }
    }

    pub fn iter(&self) -> impl Iterator<Item = &DroneInfo> {
        self.drones.iter()
    }

    pub fn get(&self, i: usize) -> &DroneInfo {
        &self.drones[i]
    }

    /// Positions of `pool`'s drones (for [`DroneIndex::get`]).
    pub fn in_pool(&self, pool: &str) -> &[usize] {
        self.by_pool.get(pool).map_or(&[], Vec::as_slice)
    }

    pub fn is_empty(&self) -> bool {
        self.drones.is_empty()
    }
}

/// The index with the two lists it was built from, so it is rebuilt only when either changes.
type IndexCache = (Arc<Vec<DroneInfo>>, Arc<Vec<DroneInfo>>, Arc<DroneIndex>);

/// Every drone of the cluster: the leased drone records in the store (a record lives as long
/// as its session's lease, on whichever instance holds the session), with this instance's own
/// sessions taking precedence (they are current before their record's watch event arrives,
/// and an in-process drone's record has no lease, so only the process that runs it counts it).
/// A record naming this instance as the holder of a session it does not hold (the session
/// ended, or this instance restarted, and the lease has not run out yet) is a drone known to
/// be disconnected, and left out.
pub struct DroneDirectory {
    local: Arc<DroneRegistry>,
    /// This instance's id, as drone records name their holder.
    instance: String,
    /// A std lock held only to swap or clone the `Arc`.
    records: RwLock<Arc<BTreeMap<String, DroneRecord>>>,
    /// The drones whose sessions other instances hold, built once per change of the records
    /// (placement reads every drone for every new backend: it must not rebuild them each
    /// time).
    elsewhere: RwLock<Arc<Vec<DroneInfo>>>,
    /// The last index built, with what it was built from.
    index: RwLock<Option<IndexCache>>,
    /// Set once the records were listed.
    loaded: AtomicBool,
}

impl DroneDirectory {
    pub fn new(local: Arc<DroneRegistry>, instance: String) -> Self {
        DroneDirectory {
            local,
            instance,
            records: RwLock::default(),
            elsewhere: RwLock::default(),
            index: RwLock::default(),
            loaded: AtomicBool::new(false),
        }
    }

    /// Every drone, by name.
    pub fn all(&self) -> Vec<DroneInfo> {
        let mut all: Vec<DroneInfo> = self.index().iter().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Every drone, indexed by pool; the same `Arc` until a drone comes, goes or changes
    /// health, so placement pays for building it once per change, not per decision.
    pub fn index(&self) -> Arc<DroneIndex> {
        let local = self.local.infos();
        let elsewhere = self
            .elsewhere
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some((l, e, index)) = &*self.index.read().unwrap_or_else(|e| e.into_inner())
            && Arc::ptr_eq(l, &local)
            && Arc::ptr_eq(e, &elsewhere)
        {
            return index.clone();
        }
        let index = Arc::new(DroneIndex::build(&local, &elsewhere));
        *self.index.write().unwrap_or_else(|e| e.into_inner()) =
            Some((local, elsewhere, index.clone()));
        index
    }

    /// The drone `name`, if it is connected to any instance.
    pub fn get(&self, name: &str) -> Option<DroneInfo> {
        if let Some(conn) = self.local.get(name) {
            return Some(DroneInfo::of_session(&conn));
        }
        self.records()
            .get(&crate::records::drone_key(name))
            .filter(|r| self.held_elsewhere(r))
            .map(DroneInfo::of_record)
    }

    /// Whether `r` is a live session of another instance (as far as the store knows).
    fn held_elsewhere(&self, r: &DroneRecord) -> bool {
        r.lease.is_some() && r.instance.as_deref() != Some(self.instance.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.index().is_empty()
    }

    /// Whether the store's drone records were read at least once.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    fn records(&self) -> Arc<BTreeMap<String, DroneRecord>> {
        self.records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the mirrored records (keyed by store key).
    pub(crate) fn publish(&self, records: &BTreeMap<String, DroneRecord>) {
        let elsewhere: Vec<DroneInfo> = records
            .values()
            .filter(|r| self.held_elsewhere(r))
            .map(DroneInfo::of_record)
            .collect();
        *self.records.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(records.clone());
        *self.elsewhere.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(elsewhere);
        self.loaded.store(true, Ordering::Release);
    }

    /// Mirrors the store's drone records until `cancel` fires.
    pub async fn follow(&self, store: Arc<dyn Store>, cancel: CancellationToken) {
        hangar_store::mirror::mirror_prefix::<DroneRecord>(
            store.as_ref(),
            DRONES_PREFIX,
            cancel,
            |records, _| self.publish(records),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(run: &str) -> (DroneConn, mpsc::UnboundedReceiver<SchedulerMessage>) {
        let (tx, rx) = mpsc::unbounded_channel();
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

    fn record(name: &str, run: &str, lease: Option<u64>) -> DroneRecord {
        DroneRecord {
            name: name.into(),
            run_id: run.into(),
            runtime: "process".into(),
            pool: "default".into(),
            capacity: Capacity::default(),
            connected_at: 0,
            lease,
            host: None,
            unhealthy: Some("docker is down".into()),
            instance: Some("b".into()),
        }
    }

    /// The directory is the store's leased records plus this instance's own sessions, which
    /// win over a record of the same name; an unleased record (an in-process drone) counts
    /// only in the process that runs it, and a record of a session this instance held but
    /// holds no more (a restart within the lease) not at all.
    #[test]
    fn the_directory_merges_records_and_own_sessions() {
        let registry = Arc::new(DroneRegistry::default());
        let dir = DroneDirectory::new(registry.clone(), "a".into());
        assert!(dir.is_empty() && !dir.is_loaded());
        let records: BTreeMap<String, DroneRecord> = [
            record("d1", "r1", Some(7)),
            record("d2", "r2", Some(8)),
            record("local", "old", None),
            DroneRecord {
                instance: Some("a".into()),
                ..record("gone", "r3", Some(9))
            },
        ]
        .into_iter()
        .map(|r| (crate::records::drone_key(&r.name), r))
        .collect();
        dir.publish(&records);
        assert!(dir.is_loaded());
        let names: Vec<String> = dir.all().into_iter().map(|d| d.name).collect();
        assert_eq!(
            names,
            ["d1", "d2"],
            "the unleased record of another process and a session this instance no longer \
             holds are left out"
        );
        assert_eq!(
            dir.get("d2").and_then(|d| d.unhealthy).as_deref(),
            Some("docker is down")
        );
        // A session held here wins: its run and its current health.
        let (mut here, _rx) = conn("r9");
        here.name = "d2".into();
        registry.insert(here);
        let d2 = dir.get("d2").unwrap();
        assert_eq!((d2.run_id.as_str(), d2.unhealthy), ("r9", None));
        assert!(dir.get("local").is_none());
        assert_eq!(dir.all().len(), 2);
    }
}
