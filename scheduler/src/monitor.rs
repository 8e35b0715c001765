//! The monitor: on a period, runs the hot-shard detector ([`crate::hot`]) over the live
//! backends with traffic or usage reported and every connected drone, publishes per-backend
//! and per-drone gauges, keeps the list `GET /v1/hot` answers (and placement reads), and,
//! when `--relieve-hot` is on, stops a bounded number of idle neighbours of hot backends so
//! that their next connect lands on another drone.
//!
//! Its inputs arrive between passes through [`HotShards`]; it is the only one that evaluates
//! the detector and publishes what it found.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use hangar_core::api::{Amounts, HotDrone};
use hangar_core::{BackendId, TerminationReason, UnixMillis};
use metrics::{Gauge, Label};
use tokio_util::sync::CancellationToken;

use crate::activity::ActivityBook;
use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::drains::Drains;
use crate::drones::{DroneDirectory, DroneInfo, DroneRegistry};
pub use crate::hot::ReliefConfig;
use crate::hot::{BackendInput, DroneInput, Evaluation, Neighbour, Verdict, plan_relief};
use crate::hot_state::HotShards;
use crate::leader::Leadership;
use crate::lifecycle::Backends;
use crate::metrics as m;
use crate::routes::{Directory, Routes};

/// One drone's gauges, registered once per drone (per monitor).
struct DroneGauges {
    capacity_cpu: Gauge,
    capacity_memory: Gauge,
    capacity_backends: Gauge,
    reserved_cpu: Gauge,
    reserved_memory: Gauge,
    by_state: [Gauge; 5],
    heartbeat_age: Gauge,
    cpu_usage: Gauge,
    hot: Gauge,
}

impl DroneGauges {
    fn new(drone: &str, pool: &str) -> Self {
        let labels = || {
            vec![
                Label::new("drone", drone.to_string()),
                Label::new("pool", pool.to_string()),
            ]
        };
        DroneGauges {
            capacity_cpu: metrics::gauge!(m::DRONE_CAPACITY_CPU_CORES, labels()),
            capacity_memory: metrics::gauge!(m::DRONE_CAPACITY_MEMORY_BYTES, labels()),
            capacity_backends: metrics::gauge!(m::DRONE_CAPACITY_BACKENDS, labels()),
            reserved_cpu: metrics::gauge!(m::DRONE_RESERVED_CPU_CORES, labels()),
            reserved_memory: metrics::gauge!(m::DRONE_RESERVED_MEMORY_BYTES, labels()),
            by_state: m::DRONE_STATES.map(|s| {
                let mut l = labels();
                l.push(Label::new("state", s));
                metrics::gauge!(m::DRONE_BACKENDS, l)
            }),
            heartbeat_age: metrics::gauge!(m::DRONE_HEARTBEAT_AGE_SECONDS, labels()),
            cpu_usage: metrics::gauge!(m::DRONE_CPU_USAGE_CORES, labels()),
            hot: metrics::gauge!(m::DRONE_HOT, labels()),
        }
    }

    fn zero(&self) {
        for g in [
            &self.reserved_cpu,
            &self.reserved_memory,
            &self.cpu_usage,
            &self.hot,
        ] {
            g.set(0.0);
        }
        for g in &self.by_state {
            g.set(0.0);
        }
    }
}

/// What the monitor reads and acts through.
pub(crate) struct MonitorParts {
    pub(crate) config: Arc<SchedulerConfig>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) hot: Arc<HotShards>,
    pub(crate) routes: Arc<Routes>,
    /// Every drone of the cluster: evaluated, and candidates for relief.
    pub(crate) drones: Arc<DroneDirectory>,
    /// The sessions this instance holds: their drones' gauges are published here.
    pub(crate) sessions: Arc<DroneRegistry>,
    pub(crate) drains: Arc<Drains>,
    pub(crate) backends: Arc<Backends>,
    pub(crate) activity: Arc<ActivityBook>,
    /// Relief is the leader's: it writes with the term's token.
    pub(crate) leadership: Arc<Leadership>,
}

pub(crate) struct Monitor {
    parts: MonitorParts,
    /// Gauges of connected drones by name (with the pool they were registered under).
    drones: HashMap<String, (String, DroneGauges)>,
    hot_backends: Gauge,
    hot_drones: Gauge,
    /// Backends this monitor asked to stop, until they leave the directory (which lags the
    /// store by a moment): never picked twice.
    relocating: HashSet<BackendId>,
}

impl Monitor {
    pub(crate) fn new(parts: MonitorParts) -> Self {
        Monitor {
            parts,
            drones: HashMap::new(),
            hot_backends: metrics::gauge!(m::HOT_BACKENDS),
            hot_drones: metrics::gauge!(m::HOT_DRONES),
            relocating: HashSet::new(),
        }
    }

    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.parts.config.monitor_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.pass().await;
        }
    }

    /// One pass: evaluate, publish, relieve.
    pub(crate) async fn pass(&mut self) {
        let p = &self.parts;
        let hot = p.hot.clone();
        let now = p.clock.now_ms();
        let dir = p.routes.directory();
        let drones = p.drones.all();
        let loads: Vec<Amounts> = drones.iter().map(|d| p.routes.load_of(&d.name)).collect();
        let frac = |used: u64, cap: u64| {
            if cap == 0 {
                0.0
            } else {
                used as f64 / cap as f64
            }
        };
        // Looked up for the backends the detector has figures for, not built for every one.
        let live = |id: &BackendId| {
            let (id, p) = dir.get_key_value(id)?;
            Some(BackendInput {
                id,
                drone: p.drone.as_deref(),
                pool: &p.pool,
                cpu_cap_cores: p.cpu_cap_millis.map(|m| m as f64 / 1000.0),
            })
        };
        let drone_inputs: Vec<DroneInput<'_>> = drones
            .iter()
            .zip(&loads)
            .map(|(d, load)| DroneInput {
                name: &d.name,
                cpu_capacity_cores: d.capacity.cpu_millis as f64 / 1000.0,
                reserved_cpu_fraction: frac(load.cpu_millis, d.capacity.cpu_millis),
                reserved_memory_fraction: frac(load.memory_mb, d.capacity.memory_mb),
            })
            .collect();
        let eval = hot.detector().evaluate_live(now, live, &drone_inputs);

        for v in &eval.backends {
            if let Some(placed) = dir.get(&v.view.backend) {
                hot.series()
                    .hot(&v.view.backend, placed.drone.as_ref(), &placed.pool, v.hot);
            }
        }
        hot.series().retain(|id| dir.contains_key(id));
        self.publish_drones(now, &drones, &loads, &eval, &dir);

        let hot_backends: Vec<_> = eval
            .backends
            .iter()
            .filter(|v| v.hot)
            .map(|v| v.view.clone())
            .collect();
        let hot_drones: Vec<_> = eval
            .drones
            .iter()
            .filter(|v| v.hot)
            .map(|v| v.view.clone())
            .collect();
        self.hot_backends.set(hot_backends.len() as f64);
        self.hot_drones.set(hot_drones.len() as f64);
        let mut list = hot.fresh_list(now);
        list.backends = hot_backends;
        list.backends.sort_by(|a, b| {
            b.requests_per_second
                .unwrap_or(0.0)
                .total_cmp(&a.requests_per_second.unwrap_or(0.0))
                .then_with(|| a.backend.cmp(&b.backend))
        });
        list.drones = hot_drones;
        list.drones.sort_by(|a, b| a.drone.cmp(&b.drone));
        hot.publish(list);

        if let Some(relief) = self.parts.config.relieve.clone() {
            self.relieve(now, &eval, &dir, &drones, &relief).await;
        }
    }

    fn publish_drones(
        &mut self,
        now: UnixMillis,
        drones: &[DroneInfo],
        loads: &[Amounts],
        eval: &Evaluation,
        dir: &Directory,
    ) {
        let mut states: HashMap<&str, [u64; 5]> = HashMap::new();
        for p in dir.values() {
            if let Some(d) = p.drone.as_deref()
                && let Some(i) = m::DRONE_STATES.iter().position(|s| *s == p.state)
            {
                states.entry(d).or_default()[i] += 1;
            }
        }
        // Each drone's gauges come from the instance holding its session (which has its
        // heartbeats and usage), so that a scrape of every instance counts each drone once.
        let held: HashMap<String, crate::drones::DroneConn> = self
            .parts
            .sessions
            .all()
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        let connected: HashSet<&str> = drones
            .iter()
            .map(|d| d.name.as_str())
            .filter(|n| held.contains_key(*n))
            .collect();
        self.drones.retain(|name, (_, g)| {
            let keep = connected.contains(name.as_str());
            if !keep {
                g.zero();
            }
            keep
        });
        let verdicts: HashMap<&str, &Verdict<HotDrone>> = eval
            .drones
            .iter()
            .map(|v| (v.view.drone.as_str(), v))
            .collect();
        for (d, load) in drones.iter().zip(loads) {
            let Some(conn) = held.get(&d.name) else {
                continue;
            };
            let stale = self
                .drones
                .get(&d.name)
                .is_some_and(|(pool, _)| *pool != d.pool);
            if stale || !self.drones.contains_key(&d.name) {
                self.drones.insert(
                    d.name.clone(),
                    (d.pool.clone(), DroneGauges::new(&d.name, &d.pool)),
                );
            }
            let (_, g) = &self.drones[&d.name];
            g.capacity_cpu.set(d.capacity.cpu_millis as f64 / 1000.0);
            g.capacity_memory
                .set(d.capacity.memory_mb as f64 * 1024.0 * 1024.0);
            g.capacity_backends.set(d.capacity.max_backends as f64);
            g.reserved_cpu.set(load.cpu_millis as f64 / 1000.0);
            g.reserved_memory
                .set(load.memory_mb as f64 * 1024.0 * 1024.0);
            let counts = states.get(d.name.as_str()).copied().unwrap_or_default();
            for (gauge, n) in g.by_state.iter().zip(counts) {
                gauge.set(n as f64);
            }
            let age = if conn.leased {
                now.saturating_sub(conn.status.last_heartbeat()) as f64 / 1000.0
            } else {
                0.0
            };
            g.heartbeat_age.set(age);
            let verdict = verdicts.get(d.name.as_str());
            g.cpu_usage.set(verdict.map_or(0.0, |v| v.view.cpu_cores));
            g.hot.set(if verdict.is_some_and(|v| v.hot) {
                1.0
            } else {
                0.0
            });
        }
    }

    async fn relieve(
        &mut self,
        now: UnixMillis,
        eval: &Evaluation,
        dir: &Directory,
        drones: &[DroneInfo],
        relief: &ReliefConfig,
    ) {
        let Some(token) = self.parts.leadership.token() else {
            return;
        };
        let backends = self.parts.backends.fenced(token);
        let hot = self.parts.hot.clone();
        self.relocating.retain(|id| dir.contains_key(id));
        let hot_ids: HashSet<&BackendId> = eval
            .backends
            .iter()
            .filter(|v| v.hot)
            .map(|v| &v.view.backend)
            .collect();
        if hot_ids.is_empty() {
            return;
        }
        let hot_drones: HashSet<&str> = eval
            .drones
            .iter()
            .filter(|v| v.hot)
            .map(|v| v.view.drone.as_str())
            .collect();
        // A drone is only relieved if placement has somewhere else to put its neighbours: a
        // connected, healthy, undrained, cool drone of the same pool and runtime.
        let crowded: HashSet<&str> = eval
            .backends
            .iter()
            .filter(|v| v.hot)
            .filter_map(|v| v.view.drone.as_deref())
            .filter(|name| {
                let Some(d) = drones.iter().find(|d| d.name == *name) else {
                    return false;
                };
                drones.iter().any(|o| {
                    o.name != d.name
                        && o.pool == d.pool
                        && o.runtime == d.runtime
                        && !hot_drones.contains(o.name.as_str())
                        && !self.parts.drains.is_draining(&o.name)
                        && o.unhealthy.is_none()
                })
            })
            .collect();
        if crowded.is_empty() {
            return;
        }
        let neighbours: Vec<Neighbour<'_>> = dir
            .iter()
            .filter_map(|(id, p)| {
                let drone = p.drone.as_deref()?;
                if !crowded.contains(drone) || self.relocating.contains(id) {
                    return None;
                }
                let (last, open) = self.parts.activity.get(id.as_str()).unwrap_or((0, 0));
                Some(Neighbour {
                    id,
                    drone,
                    ready: p.state == "ready",
                    open,
                    idle_for: Duration::from_millis(now.saturating_sub(last.max(p.since))),
                    hot: hot_ids.contains(id),
                })
            })
            .collect();
        for id in plan_relief(&crowded, &neighbours, relief.min_idle, relief.max_per_pass) {
            // The directory may lag the store: only a backend still ready is moved.
            match backends.get(id.as_str()).await {
                Ok(Some((rec, _))) if rec.state == hangar_core::BackendState::Ready => {}
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(backend = %id, error = %e, "cannot read a backend to relocate");
                    continue;
                }
            }
            match backends
                .terminate(id.as_str(), TerminationReason::Relocated, false)
                .await
            {
                Ok(rec) => {
                    hot.relocated();
                    metrics::counter!(m::RELOCATIONS_TOTAL).increment(1);
                    tracing::info!(backend = %id, drone = ?rec.drone, "relocating an idle backend off a drone with a hot backend");
                    self.relocating.insert(id);
                }
                Err(e) => tracing::warn!(backend = %id, error = %e, "cannot relocate backend"),
            }
        }
    }
}
