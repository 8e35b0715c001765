//! The backend lifecycle: `Scheduled → Starting → Waiting → Ready → Terminating →
//! Terminated{reason}`. Transitions only move forward; `Terminated` is final.
//!
//! This is a pure state machine: the scheduler asks [`check_transition`] before every
//! conditional write, so a stale writer can never move a record backwards.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a backend is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum BackendState {
    /// Recorded and assigned to a drone; the drone has not yet acknowledged the spawn.
    Scheduled,
    /// The drone is starting the process or container.
    Starting,
    /// The process runs; the drone is probing it for readiness.
    Waiting,
    /// The backend answers; the proxy routes to it.
    Ready,
    /// A stop was requested; the process is being stopped.
    Terminating { reason: TerminationReason },
    /// The backend is gone, for the given reason. Final.
    Terminated { reason: TerminationReason },
}

/// Why a backend ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum TerminationReason {
    /// No traffic for the backend's idle timeout.
    Idle,
    /// The backend reached its lifetime limit.
    Lifetime,
    /// Someone asked for it (API or CLI).
    Requested,
    /// Its drone was drained past the drain deadline.
    Drained,
    /// It was idle on a drone that also runs a hot backend, and was stopped to relieve that
    /// drone (`--relieve-hot`): its key's next connect places a new backend elsewhere.
    Relocated,
    /// A warm backend its pool no longer needed (the warm target was lowered, its
    /// generation was replaced, or the pool was deleted). Never a claimed one.
    Surplus,
    /// Its drone (or the agent process that ran it) disappeared.
    Lost,
    /// Its drone lost contact with the control plane and stopped it itself (self-fencing), so
    /// that its key could never run twice.
    Fenced,
    /// It did not become ready within the startup timeout.
    StartupTimeout,
    /// The process exited on its own (or could not be started).
    Failed { exit_code: Option<i32> },
}

impl BackendState {
    /// The lowercase status name used in the API and for filtering.
    pub fn name(&self) -> &'static str {
        match self {
            BackendState::Scheduled => "scheduled",
            BackendState::Starting => "starting",
            BackendState::Waiting => "waiting",
            BackendState::Ready => "ready",
            BackendState::Terminating { .. } => "terminating",
            BackendState::Terminated { .. } => "terminated",
        }
    }

    /// Position in the forward order; a transition must strictly increase it.
    fn rank(&self) -> u8 {
        match self {
            BackendState::Scheduled => 0,
            BackendState::Starting => 1,
            BackendState::Waiting => 2,
            BackendState::Ready => 3,
            BackendState::Terminating { .. } => 4,
            BackendState::Terminated { .. } => 5,
        }
    }

    /// True until the backend is terminated (terminating backends still hold their key).
    pub fn is_live(&self) -> bool {
        !matches!(self, BackendState::Terminated { .. })
    }

    /// True while the backend is on its way to ready (the proxy makes requests wait).
    pub fn is_starting(&self) -> bool {
        matches!(
            self,
            BackendState::Scheduled | BackendState::Starting | BackendState::Waiting
        )
    }

    pub fn termination_reason(&self) -> Option<&TerminationReason> {
        match self {
            BackendState::Terminating { reason } | BackendState::Terminated { reason } => {
                Some(reason)
            }
            _ => None,
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.termination_reason() {
            Some(r) => write!(f, "{}({})", self.name(), r),
            None => f.write_str(self.name()),
        }
    }
}

impl fmt::Display for TerminationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TerminationReason::Idle => f.write_str("idle"),
            TerminationReason::Lifetime => f.write_str("lifetime"),
            TerminationReason::Requested => f.write_str("requested"),
            TerminationReason::Drained => f.write_str("drained"),
            TerminationReason::Relocated => f.write_str("relocated"),
            TerminationReason::Surplus => f.write_str("surplus"),
            TerminationReason::Lost => f.write_str("lost"),
            TerminationReason::Fenced => f.write_str("fenced"),
            TerminationReason::StartupTimeout => f.write_str("startup_timeout"),
            TerminationReason::Failed { exit_code: Some(c) } => write!(f, "failed(exit code {c})"),
            TerminationReason::Failed { exit_code: None } => f.write_str("failed"),
        }
    }
}

/// A refused transition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backend state cannot move from {from} to {to}: transitions only move forward")]
pub struct TransitionError {
    pub from: String,
    pub to: String,
}

/// Checks that `from → to` moves forward. `Terminating → Terminated` keeps the reason chosen
/// when terminating began unless the process failed first, which the caller decides.
pub fn check_transition(from: &BackendState, to: &BackendState) -> Result<(), TransitionError> {
    if to.rank() > from.rank() {
        Ok(())
    } else {
        Err(TransitionError {
            from: from.to_string(),
            to: to.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BackendState::*;

    fn term(r: TerminationReason) -> BackendState {
        Terminated { reason: r }
    }

    #[test]
    fn forward_transitions_are_allowed() {
        let chain = [
            Scheduled,
            Starting,
            Waiting,
            Ready,
            Terminating {
                reason: TerminationReason::Idle,
            },
            term(TerminationReason::Idle),
        ];
        for w in chain.windows(2) {
            assert!(
                check_transition(&w[0], &w[1]).is_ok(),
                "{} -> {}",
                w[0],
                w[1]
            );
        }
        // Skipping states forward is allowed (a spawn that fails goes straight to Terminated).
        assert!(check_transition(&Scheduled, &term(TerminationReason::Lost)).is_ok());
        assert!(check_transition(&Starting, &Ready).is_ok());
    }

    #[test]
    fn backward_and_repeated_transitions_are_refused() {
        let cases = [
            (Ready, Starting),
            (Ready, Ready),
            (Waiting, Scheduled),
            (term(TerminationReason::Requested), Ready),
            (term(TerminationReason::Idle), term(TerminationReason::Lost)),
            (
                Terminating {
                    reason: TerminationReason::Idle,
                },
                Ready,
            ),
        ];
        for (from, to) in cases {
            let err = check_transition(&from, &to).unwrap_err();
            assert!(err.to_string().contains("only move forward"));
        }
    }

    #[test]
    fn serde_shape() {
        let s =
            serde_json::to_value(term(TerminationReason::Failed { exit_code: Some(3) })).unwrap();
        assert_eq!(
            s,
            serde_json::json!({"status": "terminated", "reason": {"kind": "failed", "exit_code": 3}})
        );
        let r: BackendState =
            serde_json::from_value(serde_json::json!({"status": "ready"})).unwrap();
        assert_eq!(r, Ready);
        assert!(Ready.is_live() && !term(TerminationReason::Idle).is_live());
        let relocated = term(TerminationReason::Relocated);
        assert_eq!(
            serde_json::to_value(&relocated).unwrap(),
            serde_json::json!({"status": "terminated", "reason": {"kind": "relocated"}})
        );
        assert_eq!(relocated.to_string(), "terminated(relocated)");
        // Relocation ends a live backend like any other reason, and is final.
        assert!(
            check_transition(
                &Ready,
                &Terminating {
                    reason: TerminationReason::Relocated
                }
            )
            .is_ok()
        );
        assert!(check_transition(&relocated, &Ready).is_err());
        assert!(Waiting.is_starting() && !Ready.is_starting());
    }
}
