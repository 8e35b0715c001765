//! Placement: which connected drone runs a new backend.
//!
//! Filter (connected, healthy, not draining, runtime kind and pool match, enough free CPU and
//! memory for the reservation, under max backends), then score (least reserved after
//! placement, then fewest backends) with the power of two choices: two random candidates, the
//! better wins, so concurrent deciders spread instead of herding onto one drone. Drones the
//! hot-shard detector flags are passed over while a cooler drone can take the backend. Nowhere
//! to place is a 503 that says why for each drone, never a 500.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hangar_core::api::Amounts;
use hangar_core::drone::Capacity;
use hangar_store::Revision;
use rand::Rng;

pub use crate::config::Need;
use crate::config::SchedulerConfig;
use crate::drains::Drains;
use crate::drones::{DroneDirectory, DroneInfo};
use crate::error::ApiError;
use crate::hot_state::HotShards;
use crate::records::ResolvedSpawn;
use crate::routes::Routes;

/// Why a drone cannot take a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    Runtime { has: String, wanted: &'static str },
    Pool { has: String, wanted: String },
    Draining,
    Unhealthy(String),
    Cpu { need: u64, free: u64 },
    Memory { need: u64, free: u64 },
    Full { max: u64 },
}

impl Refusal {
    /// The `reason` label of a placement failure.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Runtime { .. } => "runtime",
            Refusal::Pool { .. } => "pool",
            Refusal::Draining => "draining",
            Refusal::Unhealthy(_) => "unhealthy",
            Refusal::Cpu { .. } => "cpu",
            Refusal::Memory { .. } => "memory",
            Refusal::Full { .. } => "full",
        }
    }
}

/// The reason a placement failed, for metrics: the most common refusal among the drones
/// (the first in declaration order on a tie), or `no_drone` when none is connected.
pub fn failure_reason(refusals: &[Refusal]) -> &'static str {
    const ORDER: [&str; 7] = [
        "runtime",
        "pool",
        "draining",
        "unhealthy",
        "cpu",
        "memory",
        "full",
    ];
    let mut counts = [0usize; 7];
    for r in refusals {
        if let Some(i) = ORDER.iter().position(|l| *l == r.label()) {
            counts[i] += 1;
        }
    }
    let mut best = None;
    for (i, n) in counts.iter().enumerate() {
        if *n > 0 && best.is_none_or(|b: usize| *n > counts[b]) {
            best = Some(i);
        }
    }
    best.map_or("no_drone", |i| ORDER[i])
}

/// Keeps only the drones that are not hot, if there are any; returns whether hot drones were
/// passed over. With nothing but hot drones, placement still uses them (a hot drone is better
/// than a 503).
pub fn prefer_cool(admitted: Vec<DroneFacts<'_>>) -> (Vec<DroneFacts<'_>>, bool) {
    if admitted.iter().all(|d| d.hot) || admitted.iter().all(|d| !d.hot) {
        return (admitted, false);
    }
    (admitted.into_iter().filter(|d| !d.hot).collect(), true)
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Runtime { has, wanted } => write!(f, "runs {has}, not {wanted}"),
            Refusal::Pool { has, wanted } => write!(f, "is in pool {has:?}, not {wanted:?}"),
            Refusal::Draining => f.write_str("is draining"),
            Refusal::Unhealthy(why) => write!(f, "is unhealthy ({why})"),
            Refusal::Cpu { need, free } => {
                write!(f, "has {free} free CPU millicores, needs {need}")
            }
            Refusal::Memory { need, free } => write!(f, "has {free} MB free memory, needs {need}"),
            Refusal::Full { max } => write!(f, "already runs its maximum of {max} backends"),
        }
    }
}

/// The placement-relevant facts of one drone.
#[derive(Clone, Debug)]
pub struct DroneFacts<'a> {
    pub name: &'a str,
    pub runtime: &'a str,
    pub pool: &'a str,
    pub capacity: Capacity,
    pub load: Amounts,
    pub draining: bool,
    pub unhealthy: Option<&'a str>,
    /// Flagged hot by the detector (on CPU or reservations).
    pub hot: bool,
}

/// Checks whether a drone can take a backend needing `need`.
pub fn admit(
    d: &DroneFacts<'_>,
    need: Need,
    runtime: &'static str,
    pool: &str,
) -> Result<(), Refusal> {
    if d.runtime != runtime {
        return Err(Refusal::Runtime {
            has: d.runtime.to_string(),
            wanted: runtime,
        });
    }
    if d.pool != pool {
        return Err(Refusal::Pool {
            has: d.pool.to_string(),
            wanted: pool.to_string(),
        });
    }
    if d.draining {
        return Err(Refusal::Draining);
    }
    if let Some(why) = d.unhealthy {
        return Err(Refusal::Unhealthy(why.to_string()));
    }
    if d.load.backends >= d.capacity.max_backends {
        return Err(Refusal::Full {
            max: d.capacity.max_backends,
        });
    }
    let free_cpu = d.capacity.cpu_millis.saturating_sub(d.load.cpu_millis);
    if need.cpu_millis > free_cpu {
        return Err(Refusal::Cpu {
            need: need.cpu_millis,
            free: free_cpu,
        });
    }
    let free_mem = d.capacity.memory_mb.saturating_sub(d.load.memory_mb);
    if need.memory_mb > free_mem {
        return Err(Refusal::Memory {
            need: need.memory_mb,
            free: free_mem,
        });
    }
    Ok(())
}

/// Lower is better: the larger of the CPU and memory fractions reserved after placing, then
/// the fraction of backend slots used.
pub fn score(d: &DroneFacts<'_>, need: Need) -> (u64, u64) {
    let frac = |used: u64, cap: u64| (used * 10_000).checked_div(cap).unwrap_or(10_000);
    let reserved = frac(d.load.cpu_millis + need.cpu_millis, d.capacity.cpu_millis).max(frac(
        d.load.memory_mb + need.memory_mb,
        d.capacity.memory_mb,
    ));
    let slots = frac(d.load.backends + 1, d.capacity.max_backends);
    (reserved, slots)
}

/// Power of two choices among admitted drones: `pick(n)` returns a random index below `n`.
pub fn choose<'a>(
    admitted: &'a [DroneFacts<'a>],
    need: Need,
    mut pick: impl FnMut(usize) -> usize,
) -> Option<&'a DroneFacts<'a>> {
    let better = |a: &'a DroneFacts<'a>, b: &'a DroneFacts<'a>| {
        if (score(a, need), a.name) <= (score(b, need), b.name) {
            a
        } else {
            b
        }
    };
    match admitted.len() {
        0 => None,
        1 => Some(&admitted[0]),
        n => {
            let i = pick(n);
            let mut j = pick(n - 1);
            if j >= i {
                j += 1;
            }
            Some(better(&admitted[i], &admitted[j]))
        }
    }
}

/// Chooses drones for new backends from what the other components publish: every drone of the
/// cluster (its session on any instance), their reservations (the route publisher's load),
/// drains and hot drones.
///
/// The route publisher's load lags a placement by a store write and a publish, so placement
/// also counts what it placed itself and the table does not show yet (its *pending*
/// reservations): concurrent connects see each other's choices and never overcommit a drone.
pub struct Placement {
    config: Arc<SchedulerConfig>,
    drones: Arc<DroneDirectory>,
    routes: Arc<Routes>,
    drains: Arc<Drains>,
    hot: Arc<HotShards>,
    /// Reservations made here that the route table may not count yet. A std mutex: held
    /// for the (synchronous) decision only, which makes choosing and reserving one step.
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    next: u64,
    entries: Vec<PendingEntry>,
}

struct PendingEntry {
    id: u64,
    drone: String,
    need: Need,
    /// The store revision that recorded the backend, once written: the reservation is
    /// dropped once the route table has reached it (the table's load then counts it).
    written_at: Option<Revision>,
}

/// A drone chosen for a backend, with its capacity held until the backend's record is written
/// and published, or the reservation is dropped (the connect failed).
pub struct Reservation {
    placement: Arc<Placement>,
    id: u64,
    pub drone: DroneInfo,
}

impl Reservation {
    /// The backend's record was written at `revision`: keep counting it until the route table
    /// reflects that revision.
    pub fn written(self, revision: Revision) {
        let mut pending = self.placement.pending();
        if let Some(e) = pending.entries.iter_mut().find(|e| e.id == self.id) {
            e.written_at = Some(revision);
        }
        drop(pending);
        std::mem::forget(self);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.placement.pending().entries.retain(|e| e.id != self.id);
    }
}

impl Placement {
    pub fn new(
        config: Arc<SchedulerConfig>,
        drones: Arc<DroneDirectory>,
        routes: Arc<Routes>,
        drains: Arc<Drains>,
        hot: Arc<HotShards>,
    ) -> Self {
        Placement {
            config,
            drones,
            routes,
            drains,
            hot,
            pending: Mutex::default(),
        }
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Chooses a drone for `spawn` and reserves what it needs there.
    pub fn place(self: &Arc<Self>, spawn: &ResolvedSpawn) -> Result<Reservation, ApiError> {
        let started = std::time::Instant::now();
        let placed = self.place_now(spawn);
        metrics::histogram!(crate::metrics::PLACEMENT_SECONDS).record(started.elapsed());
        placed
    }

    fn place_now(self: &Arc<Self>, spawn: &ResolvedSpawn) -> Result<Reservation, ApiError> {
        let mut pending = self.pending();
        // The table's revision first: a load read after it is at least as new, so a backend
        // is counted twice (safe) rather than not at all.
        let published = self.routes.current().revision;
        pending
            .entries
            .retain(|e| e.written_at.is_none_or(|r| r > published));
        let drone = self.choose_drone(spawn, &pending.entries)?;
        pending.next += 1;
        let id = pending.next;
        pending.entries.push(PendingEntry {
            id,
            drone: drone.name.clone(),
            need: self.config.need(spawn),
            written_at: None,
        });
        Ok(Reservation {
            placement: self.clone(),
            id,
            drone,
        })
    }

    fn choose_drone(
        &self,
        spawn: &ResolvedSpawn,
        pending: &[PendingEntry],
    ) -> Result<DroneInfo, ApiError> {
        let drones = self.drones.index();
        if drones.is_empty() {
            metrics::counter!(crate::metrics::PLACEMENT_FAILURES_TOTAL, "reason" => "no_drone")
                .increment(1);
            return Err(ApiError::Unavailable(
                "no drone is connected: start one with `hangar drone`".into(),
            ));
        }
        let runtime = if spawn.image.is_some() {
            "docker"
        } else {
            "process"
        };
        let need = self.config.need(spawn);
        let hot = self.hot.hot_drones();
        let facts = |d| self.drone_facts(d, pending, &hot);
        let mut rng = rand::rng();
        if let Some(i) = sample_two(drones.in_pool(&spawn.pool), need, &mut rng, |i| {
            let f = facts(drones.get(i));
            (admit(&f, need, runtime, &spawn.pool).is_ok() && !f.hot).then_some(f)
        }) {
            return Ok(drones.get(i).clone());
        }
        // Too few drones to sample, or sampling kept hitting drones that cannot take it: look
        // at every drone (which also names why each refused).
        let facts: Vec<DroneFacts<'_>> = drones.iter().map(facts).collect();
        let mut reasons = Vec::new();
        let mut refusals = Vec::new();
        let admitted: Vec<DroneFacts<'_>> = facts
            .into_iter()
            .filter(|f| match admit(f, need, runtime, &spawn.pool) {
                Ok(()) => true,
                Err(r) => {
                    reasons.push(format!("{} {r}", f.name));
                    refusals.push(r);
                    false
                }
            })
            .collect();
        let (admitted, avoided_hot) = prefer_cool(admitted);
        if avoided_hot {
            metrics::counter!(crate::metrics::PLACEMENT_HOT_AVOIDED_TOTAL).increment(1);
        }
        if admitted.is_empty() {
            metrics::counter!(
                crate::metrics::PLACEMENT_FAILURES_TOTAL,
                "reason" => failure_reason(&refusals)
            )
            .increment(1);
        }
        match choose(&admitted, need, |n| rng.random_range(0..n)) {
            Some(f) => drones
                .iter()
                .find(|d| d.name == f.name)
                .cloned()
                .ok_or_else(|| ApiError::Internal("placed on a drone that vanished".into())),
            None => Err(ApiError::Unavailable(format!(
                "no drone can run this backend ({runtime} runtime, pool {:?}, {} CPU millicores, {} MB): {}",
                spawn.pool,
                need.cpu_millis,
                need.memory_mb,
                reasons.join("; ")
            ))),
        }
    }
}

impl Placement {
    /// What placement knows of drone `d`: its load counts the reservations made here that the
    /// route table does not show yet.
    fn drone_facts<'d>(
        &self,
        d: &'d DroneInfo,
        pending: &[PendingEntry],
        hot: &std::collections::HashSet<String>,
    ) -> DroneFacts<'d> {
        DroneFacts {
            name: &d.name,
            runtime: &d.runtime,
            pool: &d.pool,
            capacity: d.capacity,
            load: pending.iter().filter(|p| p.drone == d.name).fold(
                self.routes.load_of(&d.name),
                |mut load, p| {
                    load.backends += 1;
                    load.cpu_millis += p.need.cpu_millis;
                    load.memory_mb += p.need.memory_mb;
                    load
                },
            ),
            draining: self.drains.is_draining(&d.name),
            unhealthy: d.unhealthy.as_deref(),
            hot: hot.contains(&d.name),
        }
    }
}

/// Below this many drones in a pool, placement looks at all of them.
const SAMPLE_FROM: usize = 16;
/// Random drones a sampled decision looks at before it falls back to looking at all.
const SAMPLE_TRIES: usize = 12;

/// The power of two choices without looking at every drone: draws drones of `pool` (positions)
/// at random until two distinct ones are eligible (`eligible` gives their facts: admitted and
/// not hot), and returns the better of the two as [`choose`] would. Drawing at random and
/// skipping the ineligible picks each eligible pair with the same chance as choosing among all
/// eligible drones, so the outcome has the same distribution as the full evaluation, at the
/// cost of a few drones instead of all. `None` when the pool is small or too few draws were
/// eligible: the caller then evaluates every drone.
fn sample_two<'a, R: rand::Rng>(
    pool: &[usize],
    need: Need,
    rng: &mut R,
    mut eligible: impl FnMut(usize) -> Option<DroneFacts<'a>>,
) -> Option<usize> {
    if pool.len() < SAMPLE_FROM {
        return None;
    }
    let mut found: Vec<(usize, DroneFacts<'a>)> = Vec::with_capacity(2);
    for _ in 0..SAMPLE_TRIES {
        let pick = pool[rng.random_range(0..pool.len())];
        if found.iter().any(|(i, _)| *i == pick) {
            continue;
        }
        if let Some(f) = eligible(pick) {
            found.push((pick, f));
            if found.len() == 2 {
                break;
            }
        }
    }
    let [(a, fa), (b, fb)] = <[_; 2]>::try_from(found).ok()?;
    let pair = [fa, fb];
    // With two, `choose` compares exactly these two.
    let better = choose(&pair, need, |_| 0)?;
    Some(if std::ptr::eq(better, &pair[0]) { a } else { b })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(
        name: &str,
        cpu: u64,
        mem: u64,
        used_cpu: u64,
        used_mem: u64,
        n: u64,
    ) -> DroneFacts<'_> {
        DroneFacts {
            name,
            runtime: "docker",
            pool: "default",
            capacity: Capacity {
                cpu_millis: cpu,
                memory_mb: mem,
                max_backends: 10,
            },
            load: Amounts {
                cpu_millis: used_cpu,
                memory_mb: used_mem,
                backends: n,
            },
            draining: false,
            unhealthy: None,
            hot: false,
        }
    }

    const NEED: Need = Need {
        cpu_millis: 500,
        memory_mb: 256,
    };

    #[test]
    fn admission_table() {
        let ok = facts("a", 2000, 1024, 0, 0, 0);
        assert_eq!(admit(&ok, NEED, "docker", "default"), Ok(()));
        assert!(matches!(
            admit(&ok, NEED, "process", "default"),
            Err(Refusal::Runtime { .. })
        ));
        assert!(matches!(
            admit(&ok, NEED, "docker", "gpu"),
            Err(Refusal::Pool { .. })
        ));
        let mut d = ok.clone();
        d.draining = true;
        assert_eq!(admit(&d, NEED, "docker", "default"), Err(Refusal::Draining));
        let mut d = ok.clone();
        d.unhealthy = Some("docker down");
        assert!(matches!(
            admit(&d, NEED, "docker", "default"),
            Err(Refusal::Unhealthy(_))
        ));
        let d = facts("a", 2000, 1024, 1600, 0, 1);
        assert_eq!(
            admit(&d, NEED, "docker", "default"),
            Err(Refusal::Cpu {
                need: 500,
                free: 400
            })
        );
        let d = facts("a", 2000, 1024, 0, 900, 1);
        assert_eq!(
            admit(&d, NEED, "docker", "default"),
            Err(Refusal::Memory {
                need: 256,
                free: 124
            })
        );
        let d = facts("a", 2000, 1024, 0, 0, 10);
        assert_eq!(
            admit(&d, NEED, "docker", "default"),
            Err(Refusal::Full { max: 10 })
        );
        assert!(
            Refusal::Memory {
                need: 256,
                free: 124
            }
            .to_string()
            .contains("124 MB free")
        );
    }

    #[test]
    fn two_choices_take_the_less_loaded() {
        let ds = [
            facts("a", 2000, 2048, 1500, 0, 3),
            facts("b", 2000, 2048, 100, 0, 1),
            facts("c", 2000, 2048, 1000, 0, 2),
        ];
        // Sampling a and b → b; a and c → c; the loaded one never wins a pair.
        let mut seq = [0usize, 0].into_iter();
        assert_eq!(
            choose(&ds, NEED, |_| seq.next().unwrap()).unwrap().name,
            "b"
        );
        let mut seq = [0usize, 1].into_iter();
        assert_eq!(
            choose(&ds, NEED, |_| seq.next().unwrap()).unwrap().name,
            "c"
        );
        assert_eq!(choose(&ds[..1], NEED, |_| 0).unwrap().name, "a");
        assert!(choose(&[], NEED, |_| 0).is_none());
    }

    #[test]
    fn hot_drones_are_passed_over_while_a_cool_one_can_take_the_backend() {
        let mut hot = facts("a", 2000, 2048, 0, 0, 0);
        hot.hot = true;
        let cool = facts("b", 2000, 2048, 1500, 0, 5);
        // The hot drone is the less loaded one, yet the cool one wins.
        let (kept, avoided) = prefer_cool(vec![hot.clone(), cool.clone()]);
        assert!(avoided);
        assert_eq!(kept.iter().map(|d| d.name).collect::<Vec<_>>(), ["b"]);
        assert_eq!(choose(&kept, NEED, |_| 0).unwrap().name, "b");
        // Only hot drones: still placed (a hot drone beats a 503).
        let mut hot2 = facts("c", 2000, 2048, 0, 0, 0);
        hot2.hot = true;
        let (kept, avoided) = prefer_cool(vec![hot.clone(), hot2]);
        assert!(!avoided);
        assert_eq!(kept.len(), 2);
        let (kept, avoided) = prefer_cool(vec![cool]);
        assert!(!avoided && kept.len() == 1);
    }

    #[test]
    fn failure_reasons_are_a_bounded_label_set() {
        assert_eq!(failure_reason(&[]), "no_drone");
        let cpu = Refusal::Cpu { need: 1, free: 0 };
        assert_eq!(
            failure_reason(&[Refusal::Draining, cpu.clone(), cpu.clone()]),
            "cpu"
        );
        // A tie goes to the first in declaration order.
        assert_eq!(
            failure_reason(&[Refusal::Full { max: 1 }, Refusal::Draining]),
            "draining"
        );
        let all = [
            Refusal::Runtime {
                has: "docker".into(),
                wanted: "process",
            },
            Refusal::Pool {
                has: "a".into(),
                wanted: "b".into(),
            },
            Refusal::Draining,
            Refusal::Unhealthy("x".into()),
            cpu,
            Refusal::Memory { need: 1, free: 0 },
            Refusal::Full { max: 1 },
        ];
        for r in &all {
            assert_eq!(failure_reason(std::slice::from_ref(r)), r.label());
        }
    }

    /// Sampling looks at a handful of drones, never an ineligible one, and picks the better of
    /// two eligible ones as the full evaluation would.
    #[test]
    fn sampling_takes_the_better_of_two_eligible_drones_and_looks_at_few() {
        use rand::SeedableRng;
        let names: Vec<String> = (0..1000).map(|i| format!("d{i:04}")).collect();
        // Drone i has i backends reserved; odd drones are not eligible.
        let fact = |i: usize| {
            let mut f = facts(&names[i], 100_000, 100_000, 0, 0, i as u64);
            f.capacity.max_backends = 10_000;
            f
        };
        let positions: Vec<usize> = (0..1000).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (mut total, mut looked, mut misses, runs) = (0usize, 0usize, 0usize, 2_000);
        for _ in 0..runs {
            let mut seen = Vec::new();
            let Some(picked) = sample_two(&positions, NEED, &mut rng, |i| {
                seen.push(i);
                (i % 2 == 0).then(|| fact(i))
            }) else {
                // Fewer than two eligible in all the draws (about 1 in 300 here): the caller
                // evaluates every drone.
                assert_eq!(seen.len(), SAMPLE_TRIES);
                misses += 1;
                continue;
            };
            assert_eq!(picked % 2, 0, "an ineligible drone was picked");
            let eligible: Vec<usize> = seen.iter().copied().filter(|i| i % 2 == 0).collect();
            assert_eq!(eligible.len(), 2, "stops at two eligible: {seen:?}");
            assert_eq!(
                picked,
                eligible[0].min(eligible[1]),
                "the less loaded of the two"
            );
            looked += seen.len();
            total += picked;
        }
        assert!(
            misses <= runs / 50,
            "{misses} of {runs} decisions fell back"
        );
        // Uniform picks would average 499 backends; the better of two, about a third of that.
        let mean = total as f64 / (runs - misses) as f64;
        assert!((250.0..420.0).contains(&mean), "mean load picked {mean}");
        assert!(
            looked <= runs * 6,
            "looked at {looked} drones for {runs} decisions"
        );
    }

    /// A small pool, or one where sampling cannot find two eligible drones, is left to the
    /// full evaluation.
    #[test]
    fn sampling_gives_up_on_small_pools_and_scarce_eligible_drones() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let small: Vec<usize> = (0..SAMPLE_FROM - 1).collect();
        let mut looked = 0;
        assert!(
            sample_two(&small, NEED, &mut rng, |_| {
                looked += 1;
                Some(facts("x", 1, 1, 0, 0, 0))
            })
            .is_none()
        );
        assert_eq!(looked, 0, "a small pool is not sampled");
        let big: Vec<usize> = (0..1000).collect();
        for _ in 0..100 {
            let mut looked = 0;
            let only_one = sample_two(&big, NEED, &mut rng, |i| {
                looked += 1;
                (i == 500).then(|| facts("only", 100_000, 100_000, 0, 0, 0))
            });
            assert!(only_one.is_none(), "one eligible drone is not a pair");
            assert!(looked <= SAMPLE_TRIES);
        }
    }
}
