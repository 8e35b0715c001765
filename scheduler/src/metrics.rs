//! The control plane's metrics, through the `metrics` facade (the binary installs the
//! recorder): connects, spawns and spawn latency by phase, placement failures by reason,
//! lease expiries, terminations and relocations; per drone its capacity, reservations,
//! backends by state, heartbeat age, CPU use and hotness; per backend its CPU, memory (from
//! the drones' usage reports) and hotness.
//!
//! Every label comes from a small fixed set or names a drone, pool or backend: never a key or
//! a user. Per-backend and per-drone gauges are set on every report or monitor pass, which
//! keeps them fresh for the exporter; when the backend ends (or the drone leaves) they are set
//! to zero once and their handles dropped, and the exporter removes them after its grace
//! period.

use std::sync::Arc;

use dashmap::DashMap;
use hangar_core::{BackendId, BackendState, TerminationReason};
use metrics::{Gauge, Label, SharedString};

/// `POST /v1/connect` calls, by outcome.
pub const CONNECTS_TOTAL: &str = "hangar_scheduler_connects_total";
/// Backends scheduled (placed and recorded).
pub const SPAWNS_TOTAL: &str = "hangar_scheduler_spawns_total";
/// Time spent in each starting phase, by the phase left.
pub const SPAWN_PHASE_SECONDS: &str = "hangar_scheduler_spawn_phase_seconds";
/// Time from scheduled to ready.
pub const SPAWN_DURATION_SECONDS: &str = "hangar_scheduler_spawn_duration_seconds";
/// Connects that found no drone to run the backend, by the main refusal.
pub const PLACEMENT_FAILURES_TOTAL: &str = "hangar_scheduler_placement_failures_total";
/// Placements that skipped hot drones because a cooler one could take the backend.
pub const PLACEMENT_HOT_AVOIDED_TOTAL: &str = "hangar_scheduler_placement_hot_avoided_total";
/// Drone leases that expired (the drone was declared lost).
pub const LEASE_EXPIRIES_TOTAL: &str = "hangar_scheduler_lease_expiries_total";
/// Writes this instance committed as the leader (each carries its term's fencing token).
pub const LEADER_WRITES_TOTAL: &str = "hangar_leader_writes_total";
/// Leader writes the store refused because the term had ended (fenced).
pub const FENCED_WRITES_TOTAL: &str = "hangar_leader_fenced_writes_total";
/// Commands (spawn, stop, kill) this instance wrote into backend records as the leader.
pub const LEADER_COMMANDS_TOTAL: &str = "hangar_leader_commands_total";
/// How long one placement decision takes (choosing a drone and reserving on it).
pub const PLACEMENT_SECONDS: &str = "hangar_scheduler_placement_seconds";
/// How long one reconciler pass takes.
pub const RECONCILE_PASS_SECONDS: &str = "hangar_scheduler_reconcile_pass_seconds";
/// Backend records the reconciler looked at.
pub const RECONCILE_RECORDS_TOTAL: &str = "hangar_scheduler_reconcile_records_total";
/// Buckets of [`PLACEMENT_SECONDS`]: 10 µs to 10 ms.
pub const PLACEMENT_BUCKETS: [f64; 10] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
];
/// Connects refused by a namespace quota, by quota.
pub const QUOTA_REFUSALS_TOTAL: &str = "hangar_quota_refusals_total";
/// Commands this instance relayed from backend records to the drone sessions it holds.
pub const RELAYED_COMMANDS_TOTAL: &str = "hangar_relayed_commands_total";
/// Backends that ended, by reason.
pub const TERMINATIONS_TOTAL: &str = "hangar_scheduler_terminations_total";
/// Idle backends stopped to relieve a hot drone (`--relieve-hot`).
pub const RELOCATIONS_TOTAL: &str = "hangar_scheduler_relocations_total";
/// Hot backends and hot drones right now.
/// Connects of a pool by how they were served (`served`: `warm` or `cold`).
pub const POOL_CLAIMS_TOTAL: &str = "hangar_pool_claims_total";
/// A pool's backends by `state`: `warm_ready`, `warm_starting`, `claimed`.
pub const POOL_BACKENDS: &str = "hangar_pool_backends";
/// Starts of a pool's backends that failed (before ready, or within the settle time).
pub const POOL_FAILED_STARTS_TOTAL: &str = "hangar_pool_failed_starts_total";
/// Warm backends the converger started and removed.
pub const POOL_CONVERGER_ACTIONS_TOTAL: &str = "hangar_pool_converger_actions_total";
pub const HOT_BACKENDS: &str = "hangar_scheduler_hot_backends";
pub const HOT_DRONES: &str = "hangar_scheduler_hot_drones";

pub const DRONE_CAPACITY_CPU_CORES: &str = "hangar_drone_capacity_cpu_cores";
pub const DRONE_CAPACITY_MEMORY_BYTES: &str = "hangar_drone_capacity_memory_bytes";
pub const DRONE_CAPACITY_BACKENDS: &str = "hangar_drone_capacity_backends";
pub const DRONE_RESERVED_CPU_CORES: &str = "hangar_drone_reserved_cpu_cores";
pub const DRONE_RESERVED_MEMORY_BYTES: &str = "hangar_drone_reserved_memory_bytes";
pub const DRONE_BACKENDS: &str = "hangar_drone_backends";
pub const DRONE_HEARTBEAT_AGE_SECONDS: &str = "hangar_drone_heartbeat_age_seconds";
pub const DRONE_CPU_USAGE_CORES: &str = "hangar_drone_cpu_usage_cores";
pub const DRONE_HOT: &str = "hangar_drone_hot";

pub const BACKEND_CPU_SECONDS: &str = "hangar_backend_cpu_seconds";
pub const BACKEND_MEMORY_BYTES: &str = "hangar_backend_memory_bytes";
pub const BACKEND_HOT: &str = "hangar_backend_hot";

/// The histogram buckets (seconds) the binary configures for spawn latencies.
pub const SPAWN_BUCKETS: [f64; 11] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The states `hangar_drone_backends` counts (terminated backends no longer occupy a drone).
pub const DRONE_STATES: [&str; 5] = ["scheduled", "starting", "waiting", "ready", "terminating"];

/// Describes the scheduler's metrics to the installed recorder (call once after installing
/// it).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        LEADER_WRITES_TOTAL,
        "Writes this instance committed as the leader, each fenced by its term's token."
    );
    describe_counter!(
        FENCED_WRITES_TOTAL,
        "Leader writes the store refused because this instance's term had ended."
    );
    describe_counter!(
        LEADER_COMMANDS_TOTAL,
        "Commands (spawn, stop, kill) this instance wrote into backend records as the leader, each fenced by its term's token."
    );
    metrics::describe_histogram!(
        PLACEMENT_SECONDS,
        metrics::Unit::Seconds,
        "How long one placement decision takes (choosing a drone and reserving on it)."
    );
    metrics::describe_histogram!(
        RECONCILE_PASS_SECONDS,
        metrics::Unit::Seconds,
        "How long one reconciler pass takes (the leader's; its cost follows live and due records)."
    );
    describe_counter!(
        RECONCILE_RECORDS_TOTAL,
        "Live backend records the reconciler looked at: changed or due ones, every record of a lost drone run or an expired drain, each at least once a minute, and all of them on a term's first pass."
    );
    describe_counter!(
        QUOTA_REFUSALS_TOTAL,
        "Connects refused with 429 by a namespace quota; `quota` is max_live or connects_per_second."
    );
    describe_counter!(
        RELAYED_COMMANDS_TOTAL,
        "Commands relayed from backend records to the drone sessions this instance holds, by command."
    );
    describe_counter!(
        CONNECTS_TOTAL,
        "POST /v1/connect calls, by outcome: spawned, reused, or the API error code (bad_request, unavailable, conflict, store_unavailable, internal)."
    );
    describe_counter!(SPAWNS_TOTAL, "Backends scheduled on a drone.");
    describe_histogram!(
        SPAWN_PHASE_SECONDS,
        "Seconds a starting backend spent in a phase, by the phase it left: scheduled (until the drone starts it), starting (until it runs), waiting (until its readiness probe answers)."
    );
    describe_histogram!(
        SPAWN_DURATION_SECONDS,
        "Seconds from a backend being scheduled to it being ready."
    );
    describe_counter!(
        PLACEMENT_FAILURES_TOTAL,
        "Connects no drone could take, by the most common refusal: no_drone, runtime, pool, draining, unhealthy, cpu, memory or full."
    );
    describe_counter!(
        PLACEMENT_HOT_AVOIDED_TOTAL,
        "Placements that passed over hot drones because a cooler drone could take the backend."
    );
    describe_counter!(
        LEASE_EXPIRIES_TOTAL,
        "Drone leases that expired: the drone was declared lost and its backends closed."
    );
    describe_counter!(
        TERMINATIONS_TOTAL,
        "Backends that ended, by reason: idle, lifetime, requested, drained, relocated, lost, startup_timeout or failed."
    );
    describe_counter!(
        RELOCATIONS_TOTAL,
        "Idle backends stopped to relieve a drone running a hot backend (--relieve-hot)."
    );
    describe_gauge!(HOT_BACKENDS, "Backends the detector flags hot.");
    describe_counter!(
        POOL_CLAIMS_TOTAL,
        "Connects of a pool by how they were served: a warm backend claimed, or a cold start."
    );
    describe_gauge!(
        POOL_BACKENDS,
        "A pool's live backends by state: warm_ready, warm_starting, claimed."
    );
    describe_counter!(
        POOL_FAILED_STARTS_TOTAL,
        "Starts of a pool's backends that failed before becoming ready or soon after."
    );
    describe_counter!(
        POOL_CONVERGER_ACTIONS_TOTAL,
        "Warm backends the pool converger started (action=add) and removed (action=remove)."
    );
    describe_gauge!(HOT_DRONES, "Drones the detector flags hot.");
    describe_gauge!(DRONE_CAPACITY_CPU_CORES, "CPU the drone offers, in cores.");
    describe_gauge!(
        DRONE_CAPACITY_MEMORY_BYTES,
        "Memory the drone offers, in bytes."
    );
    describe_gauge!(DRONE_CAPACITY_BACKENDS, "Backends the drone runs at most.");
    describe_gauge!(
        DRONE_RESERVED_CPU_CORES,
        "CPU reserved by the drone's live backends, in cores."
    );
    describe_gauge!(
        DRONE_RESERVED_MEMORY_BYTES,
        "Memory reserved by the drone's live backends, in bytes."
    );
    describe_gauge!(DRONE_BACKENDS, "Backends on the drone, by state.");
    describe_gauge!(
        DRONE_HEARTBEAT_AGE_SECONDS,
        "Seconds since the drone's last heartbeat (0 for the in-process drone of hangar dev)."
    );
    describe_gauge!(
        DRONE_CPU_USAGE_CORES,
        "CPU the drone's backends use over the detector's window, in cores."
    );
    describe_gauge!(
        DRONE_HOT,
        "1 while the detector flags the drone hot, else 0."
    );
    describe_gauge!(
        BACKEND_CPU_SECONDS,
        "CPU time the backend has used, in seconds (cumulative: use rate(); a gauge because the metrics facade's counters are integers)."
    );
    describe_gauge!(
        BACKEND_MEMORY_BYTES,
        "Memory the backend uses, in bytes (a container's usage without reclaimable cache, or a process's resident set)."
    );
    describe_gauge!(
        BACKEND_HOT,
        "1 while the detector flags the backend hot, else 0."
    );
}

/// Counts a pool connect by how it was served (`warm` or `cold`).
pub(crate) fn pool_claim(pool: &str, served: &'static str) {
    metrics::counter!(POOL_CLAIMS_TOTAL, "pool" => pool.to_string(), "served" => served)
        .increment(1);
}

/// Counts a connect by outcome.
pub(crate) fn connect(outcome: &'static str) {
    metrics::counter!(CONNECTS_TOTAL, "outcome" => outcome).increment(1);
}

/// The `reason` label of a termination.
pub fn termination_label(r: &TerminationReason) -> &'static str {
    match r {
        TerminationReason::Idle => "idle",
        TerminationReason::Lifetime => "lifetime",
        TerminationReason::Requested => "requested",
        TerminationReason::Drained => "drained",
        TerminationReason::Relocated => "relocated",
        TerminationReason::Surplus => "surplus",
        TerminationReason::Lost => "lost",
        TerminationReason::Fenced => "fenced",
        TerminationReason::StartupTimeout => "startup_timeout",
        TerminationReason::Failed { .. } => "failed",
    }
}

/// Records what a state change says: how long the phase it leaves lasted, the whole spawn
/// when it reaches ready, and the reason when it ends. `entered_at` is when `from` began
/// (the record's `updated_at`), `created_at` when the backend was scheduled.
pub(crate) fn state_changed(
    from: &BackendState,
    to: &BackendState,
    entered_at: u64,
    created_at: u64,
    now: u64,
) {
    let secs = |since: u64| now.saturating_sub(since) as f64 / 1000.0;
    if from.is_starting() && !matches!(to, BackendState::Terminated { .. }) {
        metrics::histogram!(SPAWN_PHASE_SECONDS, "phase" => from.name()).record(secs(entered_at));
    }
    if *to == BackendState::Ready {
        metrics::histogram!(SPAWN_DURATION_SECONDS).record(secs(created_at));
    }
    if let BackendState::Terminated { reason } = to {
        metrics::counter!(TERMINATIONS_TOTAL, "reason" => termination_label(reason)).increment(1);
    }
}

/// A backend's gauges, with the labels they were registered under.
struct BackendGauges {
    cpu: Option<Gauge>,
    memory: Option<Gauge>,
    hot: Gauge,
}

fn backend_labels(backend: &BackendId, drone: Option<&Arc<str>>, pool: &Arc<str>) -> Vec<Label> {
    vec![
        Label::new("backend", SharedString::from(backend.to_string())),
        Label::new(
            "drone",
            drone.map_or(SharedString::const_str(""), |d| {
                SharedString::from(d.clone())
            }),
        ),
        Label::new("pool", SharedString::from(pool.clone())),
    ]
}

/// Cached handles of the per-backend gauges, so that a report or a pass registers nothing
/// for a backend it has seen. Dropped (after zeroing) when the backend is no longer live.
#[derive(Default)]
pub(crate) struct BackendSeries {
    backends: DashMap<BackendId, BackendGauges>,
}

impl std::fmt::Debug for BackendSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendSeries")
            .field("backends", &self.backends.len())
            .finish()
    }
}

impl BackendSeries {
    fn with<R>(
        &self,
        backend: &BackendId,
        drone: Option<&Arc<str>>,
        pool: &Arc<str>,
        f: impl FnOnce(&mut BackendGauges, &dyn Fn() -> Vec<Label>) -> R,
    ) -> R {
        let labels = || backend_labels(backend, drone, pool);
        // The common case, a backend seen before, neither allocates nor registers.
        if let Some(mut entry) = self.backends.get_mut(backend.as_str()) {
            return f(&mut entry, &labels);
        }
        let mut entry = self
            .backends
            .entry(backend.clone())
            .or_insert_with(|| BackendGauges {
                cpu: None,
                memory: None,
                hot: metrics::gauge!(BACKEND_HOT, labels()),
            });
        f(&mut entry, &labels)
    }

    /// Sets a backend's CPU seconds and memory from a usage report.
    pub(crate) fn usage(
        &self,
        backend: &BackendId,
        drone: Option<&Arc<str>>,
        pool: &Arc<str>,
        cpu_seconds_total: f64,
        memory_bytes: u64,
    ) {
        self.with(backend, drone, pool, |g, labels| {
            g.cpu
                .get_or_insert_with(|| metrics::gauge!(BACKEND_CPU_SECONDS, labels()))
                .set(cpu_seconds_total);
            g.memory
                .get_or_insert_with(|| metrics::gauge!(BACKEND_MEMORY_BYTES, labels()))
                .set(memory_bytes as f64);
        });
    }

    /// Sets a backend's hot flag (every monitor pass, for every backend with traffic or usage).
    pub(crate) fn hot(
        &self,
        backend: &BackendId,
        drone: Option<&Arc<str>>,
        pool: &Arc<str>,
        hot: bool,
    ) {
        self.with(backend, drone, pool, |g, _| {
            g.hot.set(if hot { 1.0 } else { 0.0 });
        });
    }

    /// Zeroes and forgets the gauges of backends `live` rejects.
    pub(crate) fn retain(&self, live: impl Fn(&BackendId) -> bool) {
        self.backends.retain(|id, g| {
            let keep = live(id);
            if !keep {
                g.hot.set(0.0);
                if let Some(m) = &g.memory {
                    m.set(0.0);
                }
            }
            keep
        });
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.backends.len()
    }
}
