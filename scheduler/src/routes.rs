//! The route publisher: follows backend records in the store (list, then watch) and, after each
//! batch of changes, publishes a new immutable [`RouteTable`], the reservations of live
//! backends per drone, the directory of live backends the monitor reads, and the route delta
//! that remote proxies follow.
//!
//! It also keeps the index of backend records the reconciler works from (the live ones, and
//! the ended ones by when they ended), updated change by change.
//!
//! [`RouteFeed`] is the only writer of all of it: [`Routes`] is the read side handed to
//! everything else (placement, the drone list, the monitor, connect waiting for its backend to
//! be routable, the route feed endpoint), and its fields are private to this module.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use hangar_core::api::Amounts;
use hangar_core::feed::FeedMessage;
use hangar_core::route::{Route, RouteTable};
use hangar_core::{BackendId, TerminationReason, UnixMillis};
use hangar_store::{Revision, Store, StoreResult, WatchEvent, WatchStream};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::Fast;
use crate::config::{Need, SchedulerConfig};
use crate::records::{BACKENDS_PREFIX, BackendRecord, Stored, backend_key};

/// How long to wait before re-listing after the store failed.
const RETRY: Duration = Duration::from_millis(500);

/// Longest a connect waits for the route table to include its new backend.
const ROUTE_WAIT: Duration = Duration::from_secs(2);

/// Route deltas kept for remote proxies that resume from a revision.
const DELTAS_KEPT: usize = 4096;

/// A live backend as the monitor and usage reports need it.
#[derive(Clone, Debug)]
pub struct Placed {
    pub drone: Option<Arc<str>>,
    pub pool: Arc<str>,
    /// The state name (`scheduled` … `terminating`).
    pub state: &'static str,
    /// Its CPU cap in millicores, if its spawn set one (without one, CPU use has nothing to be
    /// a fraction of: the process runtime applies no cap, Docker none either).
    pub cpu_cap_millis: Option<u64>,
    /// When it became ready (or was created, before that): idleness counts from here when no
    /// proxy has reported traffic.
    pub since: UnixMillis,
}

/// Every live backend, updated change by change after each batch (lagging the table by up to
/// a second while a reader holds it).
pub type Directory = HashMap<BackendId, Placed>;

/// The change between two published tables, for remote proxies.
#[derive(Clone, Debug)]
pub struct Delta {
    pub from: Revision,
    pub revision: Revision,
    upserts: Vec<Route>,
    removals: Vec<BackendId>,
}

impl Delta {
    pub fn message(&self) -> FeedMessage {
        FeedMessage::Delta {
            from: self.from,
            revision: self.revision,
            upserts: self.upserts.clone(),
            removals: self.removals.clone(),
        }
    }
}

/// Changed record ids kept for the reconciler to follow ([`Routes::changed_since`]): far more
/// than a pass sees at thousands of connects a second; a reader further behind re-reads all.
const CHANGES_KEPT: usize = 65_536;

/// Recent deltas (bounded) and a live broadcast of new ones.
#[derive(Debug)]
struct DeltaLog {
    kept: Mutex<VecDeque<Arc<Delta>>>,
    live: broadcast::Sender<Arc<Delta>>,
}

impl Default for DeltaLog {
    fn default() -> Self {
        DeltaLog {
            kept: Mutex::new(VecDeque::new()),
            live: broadcast::channel(1024).0,
        }
    }
}

impl DeltaLog {
    fn push(&self, d: Delta) {
        let d = Arc::new(d);
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() == DELTAS_KEPT {
            kept.pop_front();
        }
        kept.push_back(d.clone());
        drop(kept);
        let _ = self.live.send(d);
    }

    /// The kept deltas leading from `from` to `to` without a gap, if there are.
    fn chain(&self, from: Revision, to: Revision) -> Option<Vec<Arc<Delta>>> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let start = kept.iter().position(|d| d.from == from)?;
        let chain: Vec<Arc<Delta>> = kept.iter().skip(start).cloned().collect();
        let mut at = from;
        for d in &chain {
            if d.from != at {
                return None;
            }
            at = d.revision;
        }
        (at == to).then_some(chain)
    }
}

/// The published routing state: read side.
pub struct Routes {
    table: watch::Sender<Arc<RouteTable>>,
    /// Set once the first table is published (readiness).
    ready: AtomicBool,
    /// Reservations of live backends per drone: read by placement and `GET /v1/drones`.
    load: DashMap<String, Amounts>,
    /// A std lock held only to clone the `Arc`.
    directory: RwLock<Arc<Directory>>,
    deltas: DeltaLog,
    /// In-process consumers (a colocated proxy) that get every table before anyone waiting
    /// on the watch channel sees it, so that a connect that waited for its route never
    /// answers before that proxy can route it.
    sinks: RwLock<Vec<RouteSink>>,
    /// Backend records by lifecycle, for the reconciler: kept up to date change by change, so
    /// that a pass costs what is live and due, never a read of the whole history.
    index: Mutex<RecordIndex>,
    /// Tests hold the feed here (`false`) to see what readers do while it lags the store.
    #[cfg(test)]
    feed_open: watch::Sender<bool>,
}

/// Receives every published table.
pub type RouteSink = Box<dyn Fn(&Arc<RouteTable>) + Send + Sync>;

/// The index's and the feed's maps are hashed with [`Fast`] (SipHash was most of the index's
/// own work under connect load, and the feed's maps hash every changed id several times).
/// Their keys are ids the scheduler made and names of authenticated drones.
type FastMap<K, V> = HashMap<K, V, Fast>;
type FastSet<K> = HashSet<K, Fast>;

/// The live records, and the ended ones by when they ended.
#[derive(Debug, Default)]
struct RecordIndex {
    /// Shared, so that a reconciler pass takes every live record without copying one.
    live: FastMap<BackendId, Arc<Stored<BackendRecord>>>,
    ended: BTreeMap<(UnixMillis, BackendId), Revision>,
    ended_at: FastMap<BackendId, UnixMillis>,
    /// Live backends per key namespace (keyless ones count under `default`), for quotas.
    live_per_namespace: HashMap<String, u64>,
    /// Members of each pool not stopping, for the converger and claims.
    pools: HashMap<String, FastMap<BackendId, PoolFacts>>,
    /// Starts per pool generation since this index was built.
    tallies: HashMap<(String, u64), StartTally>,
    /// Live backends by the drone, then the agent run, their records name (`""` for none):
    /// drone loss and the reconciler's per-drone checks look up what a run holds instead of
    /// walking every live record. Nested so that a change looks its run up without copying
    /// the names.
    by_run: FastMap<String, FastMap<String, FastSet<BackendId>>>,
    /// The ids of records put since the index was built, in order, for the reconciler.
    changes: ChangeLog,
}

/// The ids of changed records, in order and bounded, with sequence numbers: a reader keeps a
/// cursor and takes what came after it; one that fell behind (or whose index was rebuilt from
/// a listing) is told to start over.
#[derive(Debug, Default)]
struct ChangeLog {
    ids: VecDeque<BackendId>,
    /// The sequence number of `ids[0]`.
    base: u64,
}

impl ChangeLog {
    /// The cursor of a reader that has seen everything so far.
    fn end(&self) -> u64 {
        self.base + self.ids.len() as u64
    }

    fn push(&mut self, id: BackendId) {
        if self.ids.len() == CHANGES_KEPT {
            self.ids.pop_front();
            self.base += 1;
        }
        self.ids.push_back(id);
    }

    /// Forgets everything: every reader's cursor is now behind.
    fn reset(&mut self) {
        self.base = self.end() + 1;
        self.ids.clear();
    }

    /// What came after `cursor`, or `None` if the reader fell behind.
    fn since(&self, cursor: u64) -> Option<impl Iterator<Item = &BackendId>> {
        let skip = cursor.checked_sub(self.base)?;
        Some(self.ids.iter().skip(skip as usize))
    }
}

/// The (drone, run) a live record counts under in [`RecordIndex::by_run`].
fn run_of(rec: &BackendRecord) -> (&str, &str) {
    (
        rec.drone.as_deref().unwrap_or_default(),
        rec.drone_run_id.as_deref().unwrap_or_default(),
    )
}

/// A live pool member as the converger and claims need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolFacts {
    pub generation: u64,
    pub unclaimed: bool,
    pub ready: bool,
    pub created_at: UnixMillis,
}

/// How the starts of one pool generation went, counted as records change (from the feed's
/// last re-list on: the converger compares successive readings).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartTally {
    /// Members that became ready.
    pub ready: u64,
    /// Members that ended before becoming ready (failed, startup timeout).
    pub failed: u64,
    /// Members that failed within [`SETTLE`] of becoming ready.
    pub failed_after_ready: u64,
    pub last_ready_at: Option<UnixMillis>,
    pub last_failure: Option<(UnixMillis, String)>,
}

/// A backend that fails this soon after becoming ready counts as a failed start.
pub const SETTLE: Duration = Duration::from_secs(10);

/// The namespace a backend counts under for quotas.
pub fn quota_namespace(rec: &BackendRecord) -> &str {
    rec.key.as_ref().map_or("default", |k| k.namespace.as_str())
}

impl RecordIndex {
    fn remove(&mut self, id: &BackendId) {
        if let Some(old) = self.live.remove(id) {
            let (drone, run) = run_of(&old.record);
            if let Some(runs) = self.by_run.get_mut(drone) {
                if let Some(ids) = runs.get_mut(run) {
                    ids.remove(id);
                    if ids.is_empty() {
                        runs.remove(run);
                    }
                }
                if runs.is_empty() {
                    self.by_run.remove(drone);
                }
            }
            if let Some(member) = &old.record.pool
                && let Some(members) = self.pools.get_mut(&member.name)
            {
                members.remove(id);
                if members.is_empty() {
                    self.pools.remove(&member.name);
                }
            }
            let ns = quota_namespace(&old.record);
            if let Some(n) = self.live_per_namespace.get_mut(ns) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.live_per_namespace.remove(ns);
                }
            }
        }
        if let Some(at) = self.ended_at.remove(id) {
            self.ended.remove(&(at, id.clone()));
        }
    }

    /// Counts what a change of pool member `rec` says about its start (`was`: the record
    /// before, if it was live).
    fn tally(&mut self, was: Option<&BackendRecord>, rec: &BackendRecord) {
        let Some(member) = &rec.pool else { return };
        let became_ready = rec.state == hangar_core::BackendState::Ready
            && was.is_none_or(|w| w.state != hangar_core::BackendState::Ready);
        let failed = was.is_some()
            && matches!(
                rec.state.termination_reason(),
                Some(TerminationReason::Failed { .. } | TerminationReason::StartupTimeout)
            )
            && !rec.state.is_live();
        if !became_ready && !failed {
            return;
        }
        let t = self
            .tallies
            .entry((member.name.clone(), member.generation))
            .or_default();
        if became_ready {
            t.ready += 1;
            t.last_ready_at = rec.ready_at;
        }
        if failed {
            let at = rec.terminated_at.unwrap_or(rec.updated_at);
            match rec.ready_at {
                None => t.failed += 1,
                Some(r) if at.saturating_sub(r) < SETTLE.as_millis() as u64 => {
                    t.failed_after_ready += 1
                }
                Some(_) => return,
            }
            let why = rec.message.clone().unwrap_or_else(|| rec.state.to_string());
            t.last_failure = Some((at, why));
        }
    }

    fn put(&mut self, rec: BackendRecord, key: String, mod_revision: Revision) {
        let id = rec.id.clone();
        let was = self.live.get(&id).cloned();
        self.tally(was.as_ref().map(|s| &s.record), &rec);
        self.remove(&id);
        // A stopping member no longer counts: it is neither warm nor a session.
        if let Some(member) = &rec.pool
            && rec.holds_key()
        {
            self.pools.entry(member.name.clone()).or_default().insert(
                id.clone(),
                PoolFacts {
                    generation: member.generation,
                    unclaimed: member.claimed_at.is_none(),
                    ready: rec.state == hangar_core::BackendState::Ready,
                    created_at: rec.created_at,
                },
            );
        }
        self.changes.push(id.clone());
        if rec.state.is_live() {
            *self
                .live_per_namespace
                .entry(quota_namespace(&rec).to_string())
                .or_default() += 1;
            let (drone, run) = run_of(&rec);
            if !self.by_run.contains_key(drone) {
                self.by_run.insert(drone.to_owned(), FastMap::default());
            }
            let runs = self.by_run.get_mut(drone).expect("just ensured");
            if !runs.contains_key(run) {
                runs.insert(run.to_owned(), FastSet::default());
            }
            runs.get_mut(run).expect("just ensured").insert(id.clone());
            self.live.insert(
                id,
                Arc::new(Stored {
                    key,
                    mod_revision,
                    record: rec,
                }),
            );
        } else {
            let at = rec.terminated_at.unwrap_or(rec.updated_at);
            self.ended.insert((at, id.clone()), mod_revision);
            self.ended_at.insert(id, at);
        }
    }
}

impl Default for Routes {
    fn default() -> Self {
        Routes {
            table: watch::channel(Arc::new(RouteTable::default())).0,
            ready: AtomicBool::new(false),
            load: DashMap::new(),
            directory: RwLock::default(),
            deltas: DeltaLog::default(),
            sinks: RwLock::default(),
            index: Mutex::default(),
            #[cfg(test)]
            feed_open: watch::channel(true).0,
        }
    }
}

impl Routes {
    /// Follows the route table (the proxy, DNS and the route feed endpoint subscribe).
    pub fn subscribe(&self) -> watch::Receiver<Arc<RouteTable>> {
        self.table.subscribe()
    }

    /// Hands every table, from the current one on, to `sink`, synchronously as it is
    /// published.
    pub fn add_sink(&self, sink: RouteSink) {
        sink(&self.current());
        self.sinks
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(sink);
    }

    /// The latest table.
    pub fn current(&self) -> Arc<RouteTable> {
        self.table.borrow().clone()
    }

    /// True once the first table is published.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// What the live backends on `drone` reserve.
    pub fn load_of(&self, drone: &str) -> Amounts {
        self.load.get(drone).map(|v| *v).unwrap_or_default()
    }

    /// The latest directory of live backends.
    pub fn directory(&self) -> Arc<Directory> {
        self.directory
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The kept deltas from `from` to `to`, if they form an unbroken chain.
    pub fn deltas_between(&self, from: Revision, to: Revision) -> Option<Vec<Arc<Delta>>> {
        self.deltas.chain(from, to)
    }

    /// New deltas as they are published.
    pub fn follow_deltas(&self) -> broadcast::Receiver<Arc<Delta>> {
        self.deltas.live.subscribe()
    }

    fn index(&self) -> std::sync::MutexGuard<'_, RecordIndex> {
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds (`false`) or releases (`true`) the feed before it applies its next change: a
    /// held feed leaves the table and the index behind the store.
    #[cfg(test)]
    pub(crate) fn hold_feed(&self, held: bool) {
        self.feed_open.send_replace(!held);
    }

    /// Every live backend record, as of the last change the feed applied.
    #[cfg(test)]
    pub fn live_records(&self) -> Vec<Arc<Stored<BackendRecord>>> {
        self.index().live.values().cloned().collect()
    }

    /// Every live backend record, and the cursor from which [`Routes::changed_since`] tells
    /// what changed after them.
    pub fn live_records_and_cursor(&self) -> (Vec<Arc<Stored<BackendRecord>>>, u64) {
        let index = self.index();
        (index.live.values().cloned().collect(), index.changes.end())
    }

    /// The live records among those put after `cursor` (each once), moving the cursor to the
    /// end; `None` if the reader fell too far behind or the index was rebuilt from a fresh
    /// listing (it must start over from [`Routes::live_records_and_cursor`]).
    pub fn changed_since(&self, cursor: &mut u64) -> Option<Vec<Arc<Stored<BackendRecord>>>> {
        let index = self.index();
        let ids = index.changes.since(*cursor)?;
        let mut seen = HashSet::new();
        let records = ids
            .filter(|id| seen.insert(*id))
            .filter_map(|id| index.live.get(id).cloned())
            .collect();
        *cursor = index.changes.end();
        Some(records)
    }

    /// The live records of these backends (those that are no longer live are left out).
    pub fn live_of<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a BackendId>,
    ) -> Vec<Arc<Stored<BackendRecord>>> {
        let index = self.index();
        ids.into_iter()
            .filter_map(|id| index.live.get(id).cloned())
            .collect()
    }

    /// The live records whose (drone, agent run) satisfies `pick` (`""` for a record that
    /// names none): one test per run, then only the records of the runs picked.
    pub fn live_on_runs_where(
        &self,
        mut pick: impl FnMut(&str, &str) -> bool,
    ) -> Vec<Arc<Stored<BackendRecord>>> {
        let index = self.index();
        let mut records = Vec::new();
        for (drone, runs) in &index.by_run {
            for (run, ids) in runs {
                if pick(drone, run) {
                    records.extend(ids.iter().filter_map(|id| index.live.get(id).cloned()));
                }
            }
        }
        records
    }

    /// The live records on any of `runs` (drone, run id), from the feed's index (drone loss
    /// looks up what to close here instead of listing every record).
    pub fn live_on_runs(&self, runs: &[(String, String)]) -> Vec<Arc<Stored<BackendRecord>>> {
        let wanted: HashSet<(&str, &str)> = runs
            .iter()
            .map(|(drone, run)| (drone.as_str(), run.as_str()))
            .collect();
        self.live_on_runs_where(|drone, run| !drone.is_empty() && wanted.contains(&(drone, run)))
    }

    /// The live members of pool `pool`, as of the last change the feed applied.
    pub fn pool_members(&self, pool: &str) -> Vec<(BackendId, PoolFacts)> {
        self.index()
            .pools
            .get(pool)
            .map(|m| m.iter().map(|(id, f)| (id.clone(), f.clone())).collect())
            .unwrap_or_default()
    }

    /// How many members pool `pool` has (warm and claimed), without copying them: a connect
    /// checks it against the pool's `max_live`.
    pub fn pool_size(&self, pool: &str) -> usize {
        self.index().pools.get(pool).map_or(0, HashMap::len)
    }

    /// The pool's ready warm members of generation `generation` (id and creation time),
    /// chosen under the lock so that a connect copies only what it can claim.
    pub fn ready_warm(&self, pool: &str, generation: u64) -> Vec<(BackendId, UnixMillis)> {
        self.index()
            .pools
            .get(pool)
            .map(|m| {
                m.iter()
                    .filter(|(_, f)| f.unclaimed && f.ready && f.generation == generation)
                    .map(|(id, f)| (id.clone(), f.created_at))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The pools that have live members.
    pub fn pools_with_members(&self) -> Vec<String> {
        self.index().pools.keys().cloned().collect()
    }

    /// The live record of a backend, as of the last change the feed applied.
    pub fn live_record(&self, id: &BackendId) -> Option<Stored<BackendRecord>> {
        self.index().live.get(id).map(|s| Stored::clone(s))
    }

    /// How the starts of `pool`'s generation `generation` went since the feed's last re-list.
    pub fn start_tally(&self, pool: &str, generation: u64) -> StartTally {
        self.index()
            .tallies
            .get(&(pool.to_string(), generation))
            .cloned()
            .unwrap_or_default()
    }

    /// How many backends of namespace `ns` are live, as of the last change the feed applied.
    pub fn live_in_namespace(&self, ns: &str) -> u64 {
        self.index()
            .live_per_namespace
            .get(ns)
            .copied()
            .unwrap_or(0)
    }

    /// Ended backend records that ended at or before `cutoff`: key and revision, oldest first.
    pub fn ended_before(&self, cutoff: UnixMillis) -> Vec<(String, Revision)> {
        self.index()
            .ended
            .iter()
            .take_while(|((at, _), _)| *at <= cutoff)
            .map(|((_, id), rev)| (backend_key(id.as_str()), *rev))
            .collect()
    }

    /// Waits (bounded) until the published table reflects store revision `revision`.
    pub async fn wait_for(&self, revision: Revision) {
        let mut rx = self.table.subscribe();
        let wait = rx.wait_for(|t| t.revision >= revision);
        if tokio::time::timeout(ROUTE_WAIT, wait).await.is_err() {
            tracing::warn!(revision, "route table lags the store; answering anyway");
        }
    }
}

#[derive(Clone)]
struct Entry {
    route: Route,
    drone: Option<String>,
    live: bool,
    need: Need,
    /// The state name, and when it became ready (or was created): for the monitor.
    state: &'static str,
    since: UnixMillis,
    /// The CPU cap the spawn set, if any.
    cpu_cap_millis: Option<u64>,
}

/// Routes as of a store revision, and what changed since the last publish.
pub(crate) struct FeedState {
    entries: FastMap<BackendId, Entry>,
    revision: Revision,
    /// Backends changed since the last publish; `None` after a listing (publish all).
    changed: Option<FastSet<BackendId>>,
    /// Reservations of live backends per drone, kept change by change.
    load: FastMap<String, Amounts>,
    /// Drones whose reservations changed since the last publish.
    load_changed: FastSet<String>,
    /// Changes the directory has not taken yet: a reader held it at the last publish, and
    /// since when.
    directory_behind: FastSet<BackendId>,
    directory_behind_since: Option<std::time::Instant>,
}

/// How long the directory may lag the table while readers keep holding it (the monitor holds
/// it for a pass) before a publish copies it to catch up.
const DIRECTORY_LAG: Duration = Duration::from_secs(1);
/// How soon the feed retries, without new changes, to bring a lagging directory up to date.
const DIRECTORY_RETRY: Duration = Duration::from_millis(50);

/// A batch changing more backends than this is a burst (a thousand drones lost at once, a
/// re-adoption): it copies most shards of the table, so the feed takes what else arrives
/// within [`BURST_HOLD`] into the same publish instead of copying them again for each batch.
/// Connects at thousands a second come in batches far below it and publish at once.
const BURST: usize = 512;
const BURST_HOLD: Duration = Duration::from_millis(5);

impl FeedState {
    fn listed(entries: FastMap<BackendId, Entry>, revision: Revision) -> FeedState {
        let mut state = FeedState {
            entries: FastMap::with_capacity_and_hasher(entries.len(), Fast::default()),
            revision,
            changed: None,
            load: FastMap::default(),
            load_changed: FastSet::default(),
            directory_behind: FastSet::default(),
            directory_behind_since: None,
        };
        for (id, e) in entries {
            state.insert(id, e);
        }
        state
    }

    /// Adds or replaces a backend's entry, keeping the drones' reservations.
    fn insert(&mut self, id: BackendId, e: Entry) {
        self.count(&e, true);
        if let Some(old) = self.entries.insert(id.clone(), e) {
            self.count(&old, false);
        }
        self.touch(id);
    }

    fn remove(&mut self, id: &str) {
        if let Some((id, old)) = self.entries.remove_entry(id) {
            self.count(&old, false);
            self.touch(id);
        }
    }

    fn touch(&mut self, id: BackendId) {
        if let Some(changed) = &mut self.changed {
            changed.insert(id);
        }
    }

    /// Adds (or takes away) a live entry's reservation on its drone.
    fn count(&mut self, e: &Entry, add: bool) {
        let (true, Some(drone)) = (e.live, &e.drone) else {
            return;
        };
        let load = self.load.entry(drone.clone()).or_default();
        if add {
            load.backends += 1;
            load.cpu_millis += e.need.cpu_millis;
            load.memory_mb += e.need.memory_mb;
        } else {
            load.backends = load.backends.saturating_sub(1);
            load.cpu_millis = load.cpu_millis.saturating_sub(e.need.cpu_millis);
            load.memory_mb = load.memory_mb.saturating_sub(e.need.memory_mb);
        }
        if !self.load_changed.contains(drone.as_str()) {
            self.load_changed.insert(drone.clone());
        }
    }

    fn placed(e: &Entry) -> Placed {
        Placed {
            drone: e.route.drone.clone(),
            pool: e.route.pool.clone().unwrap_or_else(|| "default".into()),
            state: e.state,
            cpu_cap_millis: e.cpu_cap_millis,
            since: e.since,
        }
    }
}

/// The writer: follows the store and publishes into [`Routes`].
pub(crate) struct RouteFeed {
    store: Arc<dyn Store>,
    config: Arc<SchedulerConfig>,
    routes: Arc<Routes>,
}

impl RouteFeed {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        config: Arc<SchedulerConfig>,
        routes: Arc<Routes>,
    ) -> Self {
        RouteFeed {
            store,
            config,
            routes,
        }
    }

    fn entry(&self, rec: &BackendRecord) -> Entry {
        Entry {
            route: rec.route(),
            drone: rec.drone.clone(),
            live: rec.state.is_live(),
            need: self.config.need(&rec.spawn),
            state: rec.state.name(),
            since: rec.ready_at.unwrap_or(rec.created_at),
            cpu_cap_millis: rec.spawn.resources.cpu_millis,
        }
    }

    /// Lists every backend record and publishes the table.
    pub(crate) async fn load(&self) -> StoreResult<FeedState> {
        let listing = self.store.list(BACKENDS_PREFIX).await?;
        let mut entries = FastMap::with_capacity_and_hasher(listing.kvs.len(), Fast::default());
        let mut index = RecordIndex::default();
        for kv in &listing.kvs {
            match serde_json::from_slice::<BackendRecord>(&kv.value) {
                Ok(rec) => {
                    entries.insert(rec.id.clone(), self.entry(&rec));
                    index.put(rec, kv.key.clone(), kv.mod_revision);
                }
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "skipping unreadable backend record")
                }
            }
        }
        let mut state = FeedState::listed(entries, listing.revision);
        {
            // Readers of the change log start over from the new listing.
            let mut current = self.routes.index();
            index.changes = std::mem::take(&mut current.changes);
            index.changes.reset();
            *current = index;
        }
        self.publish(&mut state);
        Ok(state)
    }

    /// Publishes what changed since the last publish: the route table (sharing every shard
    /// the changes did not touch with the last one), the drones' reservations, the directory
    /// of live backends and the delta for remote proxies, each at the cost of the changes.
    /// After a listing, all of it is rebuilt.
    fn publish(&self, state: &mut FeedState) {
        let routes = &self.routes;
        let last = routes.table.borrow().clone();
        let changed = state.changed.replace(FastSet::default());
        let (table, upserts, removals) = match &changed {
            None => {
                let table = RouteTable::new(
                    state.revision,
                    state.entries.values().map(|e| e.route.clone()),
                );
                let (upserts, removals) = last.diff(&table);
                (table, upserts, removals)
            }
            Some(changed) => {
                let mut upserts = Vec::new();
                let mut removals = Vec::new();
                for id in changed {
                    match state.entries.get(id) {
                        Some(e) if last.get(id.as_str()) != Some(&e.route) => {
                            upserts.push(e.route.clone())
                        }
                        Some(_) => {}
                        None if last.get(id.as_str()).is_some() => removals.push(id.clone()),
                        None => {}
                    }
                }
                let table = last.apply(state.revision, &upserts, &removals);
                (table, upserts, removals)
            }
        };
        let table = Arc::new(table);

        // Reservations per drone: the drones whose reservations changed.
        if changed.is_none() {
            routes
                .load
                .retain(|k, _| state.load.contains_key(k.as_str()));
        }
        let drones: Vec<String> = match changed {
            None => state.load.keys().cloned().collect(),
            Some(_) => state.load_changed.drain().collect(),
        };
        state.load_changed.clear();
        for d in drones {
            match state.load.get(&d) {
                Some(n) if n.backends > 0 => {
                    routes.load.insert(d, *n);
                }
                _ => {
                    state.load.remove(&d);
                    routes.load.remove(&d);
                }
            }
        }

        self.update_directory(state, changed.as_ref());
        for sink in routes
            .sinks
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            sink(&table);
        }
        // The delta for remote proxies, against the table published before this one (none for
        // the first table: a proxy starts from a snapshot).
        routes.table.send_replace(table.clone());
        let first = !routes.ready.load(Ordering::Acquire);
        if !first
            && (table.revision != last.revision || !upserts.is_empty() || !removals.is_empty())
        {
            routes.deltas.push(Delta {
                from: last.revision,
                revision: table.revision,
                upserts,
                removals,
            });
        }
        routes.ready.store(true, Ordering::Release);
    }

    /// The live backends for the monitor, labelled like their routes: `changed` (all after a
    /// listing) applied, with any changes left behind while a reader held the directory.
    fn update_directory(&self, state: &mut FeedState, changed: Option<&FastSet<BackendId>>) {
        let routes = &self.routes;
        let mut directory = routes
            .directory
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match changed {
            None => {
                state.directory_behind.clear();
                state.directory_behind_since = None;
                *directory = Arc::new(
                    state
                        .entries
                        .iter()
                        .filter(|(_, e)| e.live)
                        .map(|(id, e)| (id.clone(), FeedState::placed(e)))
                        .collect(),
                );
            }
            Some(ids) => {
                state.directory_behind.extend(ids.iter().cloned());
                let overdue = state
                    .directory_behind_since
                    .is_some_and(|at| at.elapsed() >= DIRECTORY_LAG);
                // Changed in place while nobody holds it; while a reader does (a monitor
                // pass), the changes wait, copying the whole map only once they are
                // overdue.
                let dir = match Arc::get_mut(&mut directory) {
                    Some(dir) => Some(dir),
                    None if overdue => Some(Arc::make_mut(&mut directory)),
                    None => None,
                };
                match dir {
                    Some(dir) => {
                        for id in state.directory_behind.drain() {
                            match state.entries.get(&id) {
                                Some(e) if e.live => {
                                    dir.insert(id, FeedState::placed(e));
                                }
                                _ => {
                                    dir.remove(&id);
                                }
                            }
                        }
                        state.directory_behind_since = None;
                    }
                    None if !state.directory_behind.is_empty() => {
                        state
                            .directory_behind_since
                            .get_or_insert_with(std::time::Instant::now);
                    }
                    None => {}
                }
            }
        }
    }

    fn apply(&self, state: &mut FeedState, ev: WatchEvent) {
        state.revision = state.revision.max(ev.revision());
        match ev {
            WatchEvent::Put(kv) => match serde_json::from_slice::<BackendRecord>(&kv.value) {
                Ok(rec) => {
                    state.insert(rec.id.clone(), self.entry(&rec));
                    self.routes.index().put(rec, kv.key, kv.mod_revision);
                }
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "skipping unreadable backend record")
                }
            },
            WatchEvent::Delete { key, .. } => {
                if let Some(id) = key.strip_prefix(BACKENDS_PREFIX) {
                    state.remove(id);
                    if let Ok(id) = BackendId::parse(id) {
                        self.routes.index().remove(&id);
                    }
                }
            }
        }
    }

    /// Applies and publishes the events of one watch until it ends: `Some(whether it delivered
    /// any)`, or `None` once `cancel` fires.
    async fn follow(
        &self,
        state: &mut FeedState,
        events: &mut WatchStream,
        cancel: &CancellationToken,
    ) -> Option<bool> {
        let mut delivered = false;
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return None,
                ev = events.recv() => ev,
                // Changes the directory could not take while a reader held it.
                _ = tokio::time::sleep(DIRECTORY_RETRY), if !state.directory_behind.is_empty() => {
                    self.update_directory(state, Some(&FastSet::default()));
                    continue;
                }
            };
            let Some(first) = first else {
                return Some(delivered);
            };
            delivered = true;
            #[cfg(test)]
            {
                let mut open = self.routes.feed_open.subscribe();
                let _ = open.wait_for(|open| *open).await;
            }
            self.apply(state, first);
            // Batch whatever else is already queued into one swap.
            let mut applied = 1;
            while let Ok(ev) = events.try_recv() {
                self.apply(state, ev);
                applied += 1;
            }
            if applied > BURST {
                self.take_burst(state, events).await;
            }
            self.publish(state);
        }
    }

    /// Applies what else arrives within [`BURST_HOLD`], so that a burst shares one publish.
    async fn take_burst(&self, state: &mut FeedState, events: &mut WatchStream) {
        let hold = tokio::time::sleep(BURST_HOLD);
        tokio::pin!(hold);
        loop {
            tokio::select! {
                _ = &mut hold => return,
                ev = events.recv() => match ev {
                    Some(ev) => self.apply(state, ev),
                    None => return,
                },
            }
        }
    }

    /// Watches from the loaded revision, publishing after each batch. A watch that ends is
    /// resumed from the last revision applied or the records listed again, as
    /// [`Resume`](hangar_store::mirror::Resume) decides.
    pub(crate) async fn run(self, mut state: FeedState, cancel: CancellationToken) {
        let mut resume = hangar_store::mirror::Resume::default();
        loop {
            let watch = tokio::select! {
                _ = cancel.cancelled() => return,
                w = self.store.watch(BACKENDS_PREFIX, state.revision + 1) => w,
            };
            match watch {
                Ok(mut events) => {
                    let Some(delivered) = self.follow(&mut state, &mut events, &cancel).await
                    else {
                        return;
                    };
                    if resume.after_end(delivered) {
                        tracing::info!(
                            revision = state.revision,
                            "route feed watch ended; resuming from the last revision applied"
                        );
                        continue;
                    }
                    tracing::warn!("route feed watch ended again at once; listing again");
                }
                Err(e) => tracing::warn!(error = %e, "route feed watch failed; listing again"),
            }
            resume = Default::default();
            // Re-list to recover whatever the broken watch missed.
            loop {
                match self.load().await {
                    Ok(s) => {
                        state = s;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "route feed cannot list backends; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(RETRY) => {}
                        }
                    }
                }
            }
        }
    }
}
