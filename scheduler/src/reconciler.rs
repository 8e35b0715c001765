//! The reconciler: on a period, compares backend records with what should be (idle and
//! lifetime limits, startup deadline, the agent run that owns it, stops that never completed,
//! retention of terminated records) and corrects it. Level-triggered: whatever edge was
//! missed, even across restarts, the next pass recovers it.
//!
//! A pass looks at what may be due, not at every live record: the records changed since the
//! last pass (from the route feed's change log), those whose own deadline ([`next_check`])
//! has come, every record of a drone run that is gone or of a drain past its deadline, and
//! each record at least every [`RECHECK_EVERY`] whatever it says. The first pass of a term,
//! and any pass after the change log could not be followed, looks at every live record.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hangar_core::{BackendId, BackendState, TerminationReason, UnixMillis};
use tokio_util::sync::CancellationToken;

use crate::lifecycle::stop_overdue;

use hangar_store::Store;

use crate::activity::ActivityBook;
use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::drains::Drains;
use crate::drone_session::DroneSessions;
use crate::lifecycle::Backends;
use crate::maintenance::Maintenance;
use crate::records::{BackendRecord, Stored, list_drones};

/// Every live record is looked at again at least this often, whatever its deadlines say (a
/// safety net under [`next_check`]: a pass over 100,000 backends then looks at about 1,000).
pub const RECHECK_EVERY: Duration = Duration::from_secs(60);
use crate::routes::Routes;

/// What the reconciler decides for one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Terminate(TerminationReason),
    /// The stop was requested long ago and has not completed: repeat it as a kill.
    Kill,
    /// The record names an agent run that no longer exists.
    Lost,
    /// Terminated long enough ago to forget.
    Remove,
}

/// Inputs that are not in the record.
#[derive(Debug, Clone, Copy)]
pub struct Observed {
    /// `(last_active, open)` from the proxies, if any reported this backend.
    pub activity: Option<(UnixMillis, u64)>,
    /// Whether the drone's store record (present while its lease lives) names the same agent
    /// run as the backend record; `None` when the drone has no record (its lease expired).
    pub drone_run_matches: Option<bool>,
    /// The drone is draining and its deadline has passed.
    pub drain_deadline_passed: bool,
    pub now: UnixMillis,
}

/// Limits the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub startup_timeout: Duration,
    pub terminate_timeout: Duration,
    pub retention: Duration,
}

/// The reconciler times out a start this long after the drone should have (the drone enforces
/// the startup timeout; this catches a drone that never answered, and lets its verdict win).
const STARTUP_SLACK: Duration = Duration::from_secs(10);

/// Decides what to do with one record. A pure function: tested without IO or time.
pub fn decide(rec: &BackendRecord, obs: Observed, limits: Limits) -> Action {
    let now = obs.now;
    let elapsed = |since: UnixMillis| Duration::from_millis(now.saturating_sub(since));
    match &rec.state {
        BackendState::Terminated { .. } => {
            let at = rec.terminated_at.unwrap_or(rec.updated_at);
            if elapsed(at) >= limits.retention {
                Action::Remove
            } else {
                Action::Nothing
            }
        }
        _ if obs.drone_run_matches != Some(true) => Action::Lost,
        BackendState::Terminating { .. } => {
            let at = rec.terminating_at.unwrap_or(rec.updated_at);
            if stop_overdue(at, now, limits.terminate_timeout) {
                Action::Kill
            } else {
                Action::Nothing
            }
        }
        _ if obs.drain_deadline_passed => Action::Terminate(TerminationReason::Drained),
        // A warm backend waits for its claim: it has no session to be idle in or to outlive
        // (the pool's converger replaces or removes it).
        _ if rec.is_unclaimed() => {
            if rec.state.is_starting()
                && elapsed(rec.created_at) >= limits.startup_timeout + STARTUP_SLACK
            {
                return Action::Terminate(TerminationReason::StartupTimeout);
            }
            Action::Nothing
        }
        state => {
            if let Some(l) = rec.spawn.lifetime_s
                && elapsed(rec.session_start()) >= Duration::from_secs(l)
            {
                return Action::Terminate(TerminationReason::Lifetime);
            }
            if state.is_starting() {
                // The drone enforces the startup timeout; this catches a drone that never
                // answered at all (with slack so the drone's own verdict normally wins).
                if elapsed(rec.created_at) >= limits.startup_timeout + STARTUP_SLACK {
                    return Action::Terminate(TerminationReason::StartupTimeout);
                }
                return Action::Nothing;
            }
            if let Some(idle) = rec.spawn.idle_timeout_s {
                let (last, open) = obs.activity.unwrap_or((0, 0));
                let last = last
                    .max(rec.ready_at.unwrap_or(rec.created_at))
                    .max(rec.session_start());
                if open == 0 && elapsed(last) >= Duration::from_secs(idle) {
                    return Action::Terminate(TerminationReason::Idle);
                }
            }
            Action::Nothing
        }
    }
}

/// The earliest time at which [`decide`] could answer anything but [`Action::Nothing`] for
/// this record if only the clock moves, capped at [`RECHECK_EVERY`] from `obs.now`. Activity
/// only moves an idle deadline later, so a record looked at again then and found not idle is
/// simply put off again. What depends on the drone (a lost run, a drain past its deadline) is
/// not covered: the reconciler checks it per drone on every pass.
pub fn next_check(rec: &BackendRecord, obs: Observed, limits: Limits) -> UnixMillis {
    let after = |since: UnixMillis, d: Duration| since.saturating_add(d.as_millis() as u64);
    let mut next = after(obs.now, RECHECK_EVERY);
    let mut at = |t: UnixMillis| next = next.min(t);
    let startup = limits.startup_timeout + STARTUP_SLACK;
    match &rec.state {
        BackendState::Terminated { .. } => {
            at(after(
                rec.terminated_at.unwrap_or(rec.updated_at),
                limits.retention,
            ));
        }
        BackendState::Terminating { .. } => {
            at(after(
                rec.terminating_at.unwrap_or(rec.updated_at),
                limits.terminate_timeout,
            ));
        }
        _ if rec.is_unclaimed() => {
            if rec.state.is_starting() {
                at(after(rec.created_at, startup));
            }
        }
        state => {
            if let Some(l) = rec.spawn.lifetime_s {
                at(after(rec.session_start(), Duration::from_secs(l)));
            }
            if state.is_starting() {
                at(after(rec.created_at, startup));
            } else if let Some(idle) = rec.spawn.idle_timeout_s {
                let idle = Duration::from_secs(idle);
                match obs.activity.unwrap_or((0, 0)) {
                    // Busy now: it cannot be idle before a full timeout from now.
                    (_, open) if open > 0 => at(after(obs.now, idle)),
                    (last, _) => {
                        let last = last
                            .max(rec.ready_at.unwrap_or(rec.created_at))
                            .max(rec.session_start());
                        at(after(last, idle));
                    }
                }
            }
        }
    }
    next
}

/// When each live record is next looked at, and where the reconciler is in the route feed's
/// change log (`None`: the next pass looks at everything).
#[derive(Debug, Default)]
pub(crate) struct Agenda {
    cursor: Option<u64>,
    due: BTreeSet<(UnixMillis, BackendId)>,
    at: HashMap<BackendId, UnixMillis, crate::Fast>,
}

impl Agenda {
    fn schedule(&mut self, id: &BackendId, when: UnixMillis) {
        if let Some(old) = self.at.insert(id.clone(), when) {
            if old == when {
                return;
            }
            self.due.remove(&(old, id.clone()));
        }
        self.due.insert((when, id.clone()));
    }

    /// Takes the backends due at `now`.
    fn take_due(&mut self, now: UnixMillis) -> Vec<BackendId> {
        let mut ids = Vec::new();
        while let Some(first) = self.due.first()
            && first.0 <= now
        {
            let (_, id) = self.due.pop_first().expect("just seen");
            self.at.remove(&id);
            ids.push(id);
        }
        ids
    }

    fn restart(&mut self, cursor: u64) {
        *self = Agenda {
            cursor: Some(cursor),
            ..Agenda::default()
        };
    }
}

/// What a pass knows about the drones, read once at its start.
struct DroneFacts<'a> {
    now: UnixMillis,
    /// A maintenance window: no drone is declared lost.
    window: bool,
    /// The term's first lease TTL: a drone whose record is gone may still reconnect.
    grace: bool,
    /// Each drone's current agent run (drones whose lease lives).
    runs: HashMap<&'a str, &'a str, crate::Fast>,
    /// Drones draining past their deadline.
    drained: HashSet<&'a str, crate::Fast>,
}

/// What the reconciler reads and acts through.
pub(crate) struct Reconciler {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: Arc<SchedulerConfig>,
    pub(crate) backends: Arc<Backends>,
    pub(crate) drains: Arc<Drains>,
    pub(crate) activity: Arc<ActivityBook>,
    /// For the admission lock (see [`DroneSessions::exclusive`]).
    pub(crate) sessions: Arc<DroneSessions>,
    /// The live and ended records, kept by the route publisher.
    pub(crate) routes: Arc<Routes>,
    /// No drone is declared lost during a maintenance window.
    pub(crate) maintenance: Arc<Maintenance>,
    /// Nor before this (wall clock, ms): a new leader gives every drone one lease TTL from its
    /// election to reconnect, whatever happened while nobody led.
    pub(crate) lost_not_before: UnixMillis,
    /// What is due when; a std lock held only between awaits.
    pub(crate) agenda: Mutex<Agenda>,
}

impl Reconciler {
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "reconciler pass failed; retrying next period");
            }
        }
    }

    /// One pass over what may be due; returns how many live records it looked at.
    pub(crate) async fn pass(&self) -> Result<usize, crate::error::ApiError> {
        let started = std::time::Instant::now();
        let result = self.pass_once().await;
        metrics::histogram!(crate::metrics::RECONCILE_PASS_SECONDS).record(started.elapsed());
        if let Ok(n) = result {
            metrics::counter!(crate::metrics::RECONCILE_RECORDS_TOTAL).increment(n as u64);
        }
        result
    }

    fn agenda(&self) -> std::sync::MutexGuard<'_, Agenda> {
        self.agenda.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn pass_once(&self) -> Result<usize, crate::error::ApiError> {
        // Serialised with drone admission (see `DroneSessions::exclusive`).
        let _admission = self.sessions.exclusive().await;
        let now = self.clock.now_ms();
        let drones = list_drones(self.store.as_ref()).await?;
        let window = self.maintenance.protects_drones().await?;
        let grace = now < self.lost_not_before;
        if !window && !grace {
            self.sessions.forget_lost_runs(&drones);
        }
        let drains = self.drains.refresh().await?;
        let cutoff = now.saturating_sub(self.config.terminated_retention.as_millis() as u64);
        for (key, revision) in self.routes.ended_before(cutoff) {
            self.backends.remove_if_unchanged(&key, revision).await?;
        }
        let facts = DroneFacts {
            now,
            window,
            grace,
            runs: drones
                .iter()
                .map(|(name, d)| (name.as_str(), d.run_id.as_str()))
                .collect(),
            drained: drains
                .iter()
                .filter(|(_, d)| d.deadline_at.is_some_and(|at| now >= at))
                .map(|(name, _)| name.as_str())
                .collect(),
        };
        let backends = self.due_records(&facts);
        let looked_at = backends.len();
        let settled = self.settle(backends, &facts).await;
        if settled.is_err() {
            // Records taken off the agenda may not have been put back: look at all next time.
            self.agenda().cursor = None;
        }
        settled.map(|()| looked_at)
    }

    /// The live records this pass looks at (from the route publisher's index, not the store):
    /// those changed since the last pass, those due by their own deadlines, and every record
    /// of a drone run that is gone or of a drain past its deadline. All of them on a first
    /// pass, or when the change log moved on without this reconciler.
    fn due_records(&self, facts: &DroneFacts<'_>) -> Vec<Arc<Stored<BackendRecord>>> {
        let mut agenda = self.agenda();
        let changed = agenda.cursor.and_then(|mut cursor| {
            let records = self.routes.changed_since(&mut cursor)?;
            Some((records, cursor))
        });
        let Some((mut records, cursor)) = changed else {
            let (all, cursor) = self.routes.live_records_and_cursor();
            agenda.restart(cursor);
            return all;
        };
        agenda.cursor = Some(cursor);
        let due = agenda.take_due(facts.now);
        drop(agenda);
        records.extend(self.routes.live_of(&due));
        records.extend(self.routes.live_on_runs_where(|drone, run| {
            facts.runs.get(drone) != Some(&run) || facts.drained.contains(drone)
        }));
        records.sort_unstable_by(|a, b| a.record.id.cmp(&b.record.id));
        records.dedup_by(|a, b| a.record.id == b.record.id);
        records
    }

    /// Decides and acts on each of `backends`, and puts each back on the agenda: when its
    /// deadlines fall if nothing was done, at once (the next pass) if something was.
    async fn settle(
        &self,
        backends: Vec<Arc<Stored<BackendRecord>>>,
        facts: &DroneFacts<'_>,
    ) -> Result<(), crate::error::ApiError> {
        let DroneFacts {
            now, window, grace, ..
        } = *facts;
        let limits = Limits {
            startup_timeout: self.config.startup_timeout,
            terminate_timeout: self.config.terminate_timeout,
            retention: self.config.terminated_retention,
        };
        let mut lost = Vec::new();
        for (n, stored) in backends.into_iter().enumerate() {
            // A pass over a hundred thousand backends must not hold a runtime thread from
            // the connects and sessions for its whole length.
            if n % 1024 == 1023 {
                tokio::task::yield_now().await;
            }
            let rec = &stored.record;
            let drone = rec.drone.as_deref();
            let drone_run_matches = drone
                .and_then(|d| facts.runs.get(d))
                .map(|run| Some(*run) == rec.drone_run_id.as_deref());
            let obs = Observed {
                activity: self.activity.get(rec.id.as_str()),
                drone_run_matches,
                drain_deadline_passed: drone.is_some_and(|d| facts.drained.contains(d)),
                now,
            };
            let action = decide(rec, obs, limits);
            let again = match action {
                Action::Nothing => next_check(rec, obs, limits),
                _ => now,
            };
            self.agenda().schedule(&rec.id, again);
            match action {
                Action::Nothing => {}
                Action::Terminate(reason) => {
                    self.backends
                        .terminate(rec.id.as_str(), reason, false)
                        .await?;
                }
                Action::Kill => {
                    if self.backends.request_kill(rec.id.as_str()).await? {
                        tracing::warn!(backend = %rec.id, "stop did not complete in time; killing");
                    }
                }
                // A maintenance window: nothing is lost before it ends. A new term: a drone
                // whose record is gone (its lease ran out while nobody led) gets one TTL to
                // reconnect; a drone that came back as a new run is settled at once.
                Action::Lost if window || (grace && drone_run_matches.is_none()) => {}
                // Closed together below: many drones may have gone at once.
                Action::Lost => lost.push(stored.clone()),
                Action::Remove => {
                    self.backends
                        .remove_if_unchanged(&stored.key, stored.mod_revision)
                        .await?;
                }
            }
        }
        if !lost.is_empty() {
            self.backends
                .mark_lost_many(
                    &lost,
                    "its drone's agent is gone (lease expired or restarted without it)",
                )
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::ResolvedSpawn;
    use hangar_core::BackendId;

    const S: u64 = 1000;

    fn rec(state: BackendState, idle: Option<u64>, lifetime: Option<u64>) -> BackendRecord {
        BackendRecord {
            id: BackendId::parse("b1").unwrap(),
            key: None,
            epoch: 1,
            spawn: ResolvedSpawn {
                command: None,
                image: None,
                env: Default::default(),
                idle_timeout_s: idle,
                lifetime_s: lifetime,
                resources: Default::default(),
                pool: "default".into(),
            },
            user: None,
            public: false,
            state,
            drone: Some("local".into()),
            drone_run_id: Some("r1".into()),
            address: None,
            created_at: 0,
            updated_at: 0,
            ready_at: Some(S),
            terminated_at: None,
            terminating_at: None,
            kill_requested_at: None,
            created_by: None,
            message: None,
            pool: None,
        }
    }

    /// `next_check` is exact: until it, `decide` answers `Nothing` (so a record put off until
    /// then misses nothing), and at it something is due unless it is only the periodic
    /// recheck or the backend is busy. Over every state, with and without limits and activity.
    #[test]
    fn next_check_is_the_first_moment_anything_is_due() {
        let states = [
            BackendState::Scheduled,
            BackendState::Starting,
            BackendState::Waiting,
            BackendState::Ready,
            BackendState::Terminating {
                reason: TerminationReason::Requested,
            },
            BackendState::Terminated {
                reason: TerminationReason::Idle,
            },
        ];
        let activities = [
            None,
            Some((20 * S, 0)),
            Some((40 * S, 2)),
            Some((500 * S, 0)),
        ];
        let mut checked = 0;
        for state in &states {
            for idle in [None, Some(10), Some(90)] {
                for lifetime in [None, Some(30), Some(200)] {
                    for warm in [false, true] {
                        let mut r = rec(state.clone(), idle, lifetime);
                        r.created_at = 2 * S;
                        r.terminating_at = Some(25 * S);
                        r.terminated_at = Some(25 * S);
                        if warm {
                            r.pool = Some(crate::records::PoolMember {
                                name: "p".into(),
                                generation: 1,
                                claimed_at: None,
                                claim_secret: Some("s".into()),
                            });
                        }
                        for activity in activities {
                            for start in [0, 35 * S, 100 * S] {
                                let next = next_check(&r, obs(start, activity), L);
                                assert!(next <= start + RECHECK_EVERY.as_millis() as u64);
                                let mut t = start;
                                while t < next {
                                    assert_eq!(
                                        decide(&r, obs(t, activity), L),
                                        Action::Nothing,
                                        "{r:?} at {t} before its next check {next}"
                                    );
                                    t += 100;
                                }
                                // A busy backend is looked at again after a full idle
                                // timeout, when it may have gone quiet: not necessarily due.
                                let busy = activity.is_some_and(|(_, open)| open > 0);
                                if next < start + RECHECK_EVERY.as_millis() as u64 && !busy {
                                    assert_ne!(
                                        decide(&r, obs(next, activity), L),
                                        Action::Nothing,
                                        "{r:?} at its next check {next}"
                                    );
                                }
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 6 * 3 * 3 * 2 * 4 * 3);
    }

    #[test]
    fn the_agenda_hands_out_what_is_due_once_and_in_order() {
        let mut a = Agenda::default();
        let id = |s: &str| BackendId::parse(s).unwrap();
        a.schedule(&id("b1"), 30);
        a.schedule(&id("b2"), 10);
        a.schedule(&id("b3"), 20);
        // Rescheduling moves an entry; it is never due twice.
        a.schedule(&id("b1"), 5);
        a.schedule(&id("b3"), 50);
        assert_eq!(a.take_due(4), Vec::<BackendId>::new());
        assert_eq!(a.take_due(10), vec![id("b1"), id("b2")]);
        assert_eq!(a.take_due(49), Vec::<BackendId>::new());
        assert_eq!(a.take_due(1000), vec![id("b3")]);
        assert!(a.due.is_empty() && a.at.is_empty());
    }

    #[test]
    fn a_warm_backend_is_never_idle_and_a_claimed_one_counts_from_its_claim() {
        let mut r = rec(BackendState::Ready, Some(10), Some(100));
        r.pool = Some(crate::records::PoolMember {
            name: "p".into(),
            generation: 1,
            claimed_at: None,
            claim_secret: Some("s".into()),
        });
        // Unclaimed for far longer than its idle timeout and lifetime: kept.
        assert_eq!(decide(&r, obs(1000 * S, None), L), Action::Nothing);
        // Claimed at 1000 s: idle 10 s and lifetime 100 s count from then.
        r.pool.as_mut().unwrap().claimed_at = Some(1000 * S);
        assert_eq!(decide(&r, obs(1009 * S, None), L), Action::Nothing);
        assert_eq!(
            decide(&r, obs(1010 * S, None), L),
            Action::Terminate(TerminationReason::Idle)
        );
        assert_eq!(
            decide(&r, obs(1100 * S, Some((1099 * S, 1))), L),
            Action::Terminate(TerminationReason::Lifetime)
        );
        // A warm backend that never starts is still timed out.
        let mut w = rec(BackendState::Starting, None, None);
        w.pool = r.pool.clone();
        w.pool.as_mut().unwrap().claimed_at = None;
        assert_eq!(
            decide(&w, obs(71 * S, None), L),
            Action::Terminate(TerminationReason::StartupTimeout)
        );
    }

    fn obs(now: u64, activity: Option<(u64, u64)>) -> Observed {
        Observed {
            activity,
            drone_run_matches: Some(true),
            drain_deadline_passed: false,
            now,
        }
    }

    const L: Limits = Limits {
        startup_timeout: Duration::from_secs(60),
        terminate_timeout: Duration::from_secs(30),
        retention: Duration::from_secs(3600),
    };

    #[test]
    fn idle_counts_from_last_activity_and_respects_open_connections() {
        let r = rec(BackendState::Ready, Some(10), None);
        let idle = Action::Terminate(TerminationReason::Idle);
        // No traffic: idle counts from ready_at (1 s).
        assert_eq!(decide(&r, obs(10 * S, None), L), Action::Nothing);
        assert_eq!(decide(&r, obs(11 * S, None), L), idle);
        // Traffic at 20 s moves the deadline to 30 s.
        assert_eq!(
            decide(&r, obs(29 * S, Some((20 * S, 0))), L),
            Action::Nothing
        );
        assert_eq!(decide(&r, obs(30 * S, Some((20 * S, 0))), L), idle);
        // An open WebSocket keeps it alive however long ago it started.
        assert_eq!(
            decide(&r, obs(999 * S, Some((20 * S, 1))), L),
            Action::Nothing
        );
        // No idle timeout: never idle.
        let r = rec(BackendState::Ready, None, None);
        assert_eq!(decide(&r, obs(999 * S, None), L), Action::Nothing);
    }

    #[test]
    fn lifetime_applies_even_when_busy() {
        let r = rec(BackendState::Ready, Some(10), Some(5));
        assert_eq!(decide(&r, obs(4 * S, Some((4 * S, 3))), L), Action::Nothing);
        assert_eq!(
            decide(&r, obs(5 * S, Some((5 * S, 3))), L),
            Action::Terminate(TerminationReason::Lifetime)
        );
    }

    #[test]
    fn lost_runs_stuck_starts_overdue_stops_and_retention() {
        let r = rec(BackendState::Ready, None, None);
        let mut o = obs(5 * S, None);
        o.drone_run_matches = Some(false);
        assert_eq!(decide(&r, o, L), Action::Lost);
        // No drone record at all: its lease expired.
        o.drone_run_matches = None;
        assert_eq!(decide(&r, o, L), Action::Lost);
        // A drain past its deadline terminates with reason drained.
        let mut o = obs(5 * S, None);
        o.drain_deadline_passed = true;
        assert_eq!(
            decide(&r, o, L),
            Action::Terminate(TerminationReason::Drained)
        );

        let r = rec(BackendState::Scheduled, None, None);
        assert_eq!(decide(&r, obs(69 * S, None), L), Action::Nothing);
        assert_eq!(
            decide(&r, obs(70 * S, None), L),
            Action::Terminate(TerminationReason::StartupTimeout)
        );

        let mut r = rec(
            BackendState::Terminating {
                reason: TerminationReason::Requested,
            },
            None,
            None,
        );
        r.terminating_at = Some(10 * S);
        assert_eq!(decide(&r, obs(39 * S, None), L), Action::Nothing);
        assert_eq!(decide(&r, obs(40 * S, None), L), Action::Kill);

        let mut r = rec(
            BackendState::Terminated {
                reason: TerminationReason::Idle,
            },
            None,
            None,
        );
        r.terminated_at = Some(10 * S);
        assert_eq!(decide(&r, obs(3609 * S, None), L), Action::Nothing);
        assert_eq!(decide(&r, obs(3610 * S, None), L), Action::Remove);
        // A terminated record is never "lost" again.
        let mut o = obs(20 * S, None);
        o.drone_run_matches = Some(false);
        assert_eq!(decide(&r, o, L), Action::Nothing);
    }
}
