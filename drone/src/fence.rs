//! Self-fencing: a drone that cannot renew its lease in time stops every backend it runs, so a
//! key never runs twice.
//!
//! The rule, and its guard band: the scheduler may free a drone's keys once its lease has not
//! been renewed for the lease TTL, counted from the last renewal the store confirmed. A
//! renewal is acknowledged only after the store confirmed it, and it happened after the drone
//! sent the heartbeat. So the drone's deadline is **three quarters of the TTL after the send
//! time of the last acknowledged heartbeat** (or of the hello that opened the session, whose
//! admission granted a fresh lease): it fences at least a quarter of the TTL before the
//! scheduler may free anything, whatever the network delay.
//!
//! The fence runs as its own task, apart from the session loop: a reconnect attempt or a
//! health check in progress can never delay it. Once it has fired it stays armed for the next
//! deadline, so a later lapse in the same session fences again, and while the deadline is past
//! it also stops backends that start meanwhile. Backends it stopped report their exit as
//! `Fenced`, not as a failure.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hangar_core::BackendId;
use hangar_core::drone::SchedulerMessage;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::watchdog::{Target, Watchdog};

/// How often, while the deadline is past, the fence looks for backends that started since.
const RECHECK: Duration = Duration::from_millis(50);

/// The share of the lease TTL after which the drone fences (numerator, denominator).
pub const FENCE_AT: (u32, u32) = (3, 4);

/// When the drone must fence, given the send time of its last acknowledged renewal.
pub fn deadline(renewal_sent: Instant, ttl: Duration) -> Instant {
    renewal_sent + ttl * FENCE_AT.0 / FENCE_AT.1
}

#[derive(Clone, Copy, Debug)]
struct Deadline {
    at: Instant,
    ttl: Duration,
    /// The send time of the latest acknowledged renewal.
    renewal_sent: Instant,
    /// A maintenance window's end, before which the control plane promised not to declare
    /// this drone lost.
    held_until: Option<Instant>,
}

impl Deadline {
    fn compute(renewal_sent: Instant, ttl: Duration, held_until: Option<Instant>) -> Instant {
        let by_renewal = deadline(renewal_sent, ttl);
        held_until.map_or(by_renewal, |h| h.max(by_renewal))
    }
}

#[derive(Default)]
struct Backends {
    /// Every backend the agent runs or is starting.
    running: BTreeSet<BackendId>,
    /// Those the fence stopped (until their exit is reported).
    fenced: HashSet<BackendId>,
}

/// The session's handle on the fence.
#[derive(Clone)]
pub struct Fence {
    deadline: Arc<watch::Sender<Deadline>>,
    backends: Arc<Mutex<Backends>>,
    /// The process that enforces the deadline when this one cannot.
    watchdog: Option<Arc<Watchdog>>,
}

impl Fence {
    /// A fence whose first deadline is `deadline(now, ttl)` (before any session: a drone
    /// restarted with running backends keeps them only if it reaches a scheduler in time).
    pub fn new(ttl: Duration) -> Fence {
        let now = Instant::now();
        let first = Deadline {
            at: deadline(now, ttl),
            ttl,
            renewal_sent: now,
            held_until: None,
        };
        Fence {
            deadline: Arc::new(watch::channel(first).0),
            backends: Arc::default(),
            watchdog: None,
        }
    }

    /// Also tells `watchdog` every deadline (it acts a twentieth of the TTL after one, well
    /// inside the guard band, if this process has not).
    pub fn with_watchdog(mut self, watchdog: Arc<Watchdog>) -> Fence {
        self.watchdog = Some(watchdog);
        self.tell_watchdog(&self.deadline.borrow());
        self
    }

    fn tell_watchdog(&self, d: &Deadline) {
        if let Some(w) = &self.watchdog {
            w.deadline(d.at.saturating_duration_since(Instant::now()), d.ttl / 20);
        }
    }

    fn backends(&self) -> MutexGuard<'_, Backends> {
        self.backends.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A renewal sent at `sent` was acknowledged (or a session opened by a hello sent then was
    /// welcomed) under a lease of `ttl`: the deadline is `deadline(latest send, ttl)`. An older
    /// renewal acknowledged late never moves it back; a shorter TTL (the scheduler's, replacing
    /// the default assumed before the first welcome) does.
    pub fn renewed(&self, sent: Instant, ttl: Duration) {
        let changed = self.deadline.send_if_modified(|d| {
            let renewal_sent = d.renewal_sent.max(sent);
            let at = Deadline::compute(renewal_sent, ttl, d.held_until);
            let changed = at != d.at || ttl != d.ttl;
            *d = Deadline {
                at,
                ttl,
                renewal_sent,
                held_until: d.held_until,
            };
            changed
        });
        if changed {
            self.tell_watchdog(&self.deadline.borrow());
        }
    }

    /// A maintenance window: the control plane promised not to declare this drone lost
    /// before `until`, so the fence holds until then at least.
    pub fn hold(&self, until: Instant) {
        let changed = self.deadline.send_if_modified(|d| {
            let held_until = Some(d.held_until.map_or(until, |h| h.max(until)));
            let at = Deadline::compute(d.renewal_sent, d.ttl, held_until);
            let changed = at != d.at;
            d.held_until = held_until;
            d.at = at;
            changed
        });
        if changed {
            tracing::warn!(until = ?until, "maintenance window: holding the fence deadline");
            self.tell_watchdog(&self.deadline.borrow());
        }
    }

    /// Whether the deadline has passed: the scheduler may soon free this drone's keys, so no
    /// new backend may start here.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline.borrow().at
    }

    /// A backend runs (or is starting) here; `target` is what the watchdog kills for it,
    /// once known.
    pub fn running(&self, backend: &BackendId, target: Option<Target>) {
        self.backends().running.insert(backend.clone());
        if let (Some(w), Some(t)) = (&self.watchdog, target) {
            w.add(backend, &t);
        }
    }

    /// A backend is gone. Returns whether the fence had stopped it.
    pub fn gone(&self, backend: &BackendId) -> bool {
        let mut b = self.backends();
        let was = b.running.remove(backend);
        let fenced = b.fenced.remove(backend);
        drop(b);
        if let Some(w) = &self.watchdog
            && was
        {
            w.remove(backend);
        }
        fenced
    }

    /// Runs the fence until `cancel` fires: at each passed deadline, asks the agent (through
    /// `commands`) to kill every backend it runs.
    pub async fn run(self, commands: mpsc::Sender<SchedulerMessage>, cancel: CancellationToken) {
        let mut rx = self.deadline.subscribe();
        let mut episode_logged = false;
        loop {
            let d = *rx.borrow_and_update();
            if Instant::now() < d.at {
                episode_logged = false;
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(d.at) => {}
                    changed = rx.changed() => if changed.is_err() { return },
                }
                continue;
            }
            let victims: Vec<BackendId> = {
                let mut b = self.backends();
                let v: Vec<BackendId> = b
                    .running
                    .iter()
                    .filter(|id| !b.fenced.contains(*id))
                    .cloned()
                    .collect();
                b.fenced.extend(v.iter().cloned());
                v
            };
            if !victims.is_empty() {
                if !episode_logged {
                    let since = Instant::now() - d.renewal_sent;
                    tracing::error!(
                        backends = victims.len(),
                        last_renewal_sent_ago = ?since,
                        lease_ttl = ?d.ttl,
                        "no lease renewal acknowledged in time: the control plane may declare this drone lost at the lease TTL and start its keys elsewhere; stopping every backend here (self-fencing)"
                    );
                    episode_logged = true;
                }
                for backend in victims {
                    let kill = SchedulerMessage::Terminate {
                        backend,
                        hard: true,
                    };
                    if commands.send(kill).await.is_err() {
                        return;
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> BackendId {
        BackendId::parse(s).unwrap()
    }

    async fn kills(rx: &mut mpsc::Receiver<SchedulerMessage>) -> Vec<BackendId> {
        // Let the fence task run to its next wait.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            match m {
                SchedulerMessage::Terminate { backend, hard } => {
                    assert!(hard, "fencing kills");
                    out.push(backend);
                }
                other => panic!("{other:?}"),
            }
        }
        out
    }

    /// With a paused clock: the fence fires at three quarters of the TTL after the send time
    /// of the last acknowledged renewal, not later; fires again after a later lapse in the
    /// same session (it used to fire once per session); and stops a backend that starts while
    /// the deadline is past.
    #[tokio::test(start_paused = true)]
    async fn fences_at_three_quarters_of_the_ttl_every_time_the_deadline_passes() {
        let ttl = Duration::from_secs(10);
        let fence = Fence::new(ttl);
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(fence.clone().run(tx, cancel.clone()));
        fence.running(&id("b1"), None);

        // Renewed at t=0 (sent then, acknowledged later): the deadline is t=7.5 s.
        let sent = Instant::now();
        tokio::time::advance(Duration::from_secs(2)).await;
        fence.renewed(sent, ttl);
        tokio::time::advance(Duration::from_millis(5_400)).await; // t = 7.4 s
        assert!(kills(&mut rx).await.is_empty());
        assert!(!fence.expired());
        tokio::time::advance(Duration::from_millis(200)).await; // t = 7.6 s
        assert_eq!(kills(&mut rx).await, vec![id("b1")]);
        assert!(fence.expired());

        // Its exit is reported as fenced; a backend that starts now is stopped too.
        assert!(fence.gone(&id("b1")));
        fence.running(&id("b2"), None);
        tokio::time::advance(RECHECK).await;
        assert_eq!(kills(&mut rx).await, vec![id("b2")]);
        assert!(fence.gone(&id("b2")));

        // Renewed again (same session), then another lapse: it fences again.
        let sent = Instant::now();
        fence.renewed(sent, ttl);
        assert!(!fence.expired());
        fence.running(&id("b3"), None);
        tokio::time::advance(Duration::from_millis(7_400)).await;
        assert!(kills(&mut rx).await.is_empty());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(kills(&mut rx).await, vec![id("b3")]);
        // A backend that exits on its own is not reported as fenced.
        fence.running(&id("b4"), None);
        fence.renewed(Instant::now(), ttl);
        assert!(!fence.gone(&id("b4")));
        cancel.cancel();
        task.await.unwrap();
    }

    /// The scheduler's TTL, learnt from the first welcome, replaces the default assumed before
    /// it even when it is shorter (it used to keep the later default deadline: a drone with a
    /// 2 s lease fenced after 7.5 s).
    #[tokio::test(start_paused = true)]
    async fn a_shorter_ttl_from_the_scheduler_brings_the_deadline_forward() {
        let fence = Fence::new(Duration::from_secs(10));
        fence.renewed(Instant::now(), Duration::from_secs(2));
        tokio::time::advance(Duration::from_millis(1_400)).await;
        assert!(!fence.expired());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(fence.expired());
    }

    /// A maintenance window holds the deadline until its end; after it the usual rule applies
    /// again (renewals since count).
    #[tokio::test(start_paused = true)]
    async fn a_maintenance_window_holds_the_deadline_until_its_end() {
        let ttl = Duration::from_secs(10);
        let fence = Fence::new(ttl);
        fence.renewed(Instant::now(), ttl);
        fence.hold(Instant::now() + Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!fence.expired(), "held");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(fence.expired(), "the window ended without a renewal");
        fence.renewed(Instant::now(), ttl);
        assert!(!fence.expired());
    }

    /// An old renewal acknowledged late never moves the deadline back.
    #[tokio::test(start_paused = true)]
    async fn a_late_acknowledgement_of_an_older_renewal_does_not_move_the_deadline_back() {
        let ttl = Duration::from_secs(10);
        let fence = Fence::new(ttl);
        let old = Instant::now();
        tokio::time::advance(Duration::from_secs(3)).await;
        let new = Instant::now();
        fence.renewed(new, ttl);
        fence.renewed(old, ttl);
        tokio::time::advance(Duration::from_millis(7_400)).await; // 7.4 s after `new`
        assert!(!fence.expired());
    }
}
