//! The command relay: drones get their commands from the records, through whichever instance
//! holds their session.
//!
//! The leader never sends a command itself: it writes the intent into the backend record with
//! its fenced write (a `scheduled` record names the drone run that must start it; a
//! `terminating` one asks for a stop, and `kill_requested_at` escalates it to a kill). Every
//! instance follows the backend records and, for each one assigned to a drone run whose session
//! it holds, sends what the record asks for. So a command survives a leader change (it is in
//! the store, not in a dead leader's memory), a deposed leader cannot command anything (its
//! write is refused, so there is nothing to relay), and a drone may keep its session on any
//! instance. Delivery is at least once (a listing after a broken watch, a readmission, two
//! instances briefly holding sessions of one drone) and the agent's handling is idempotent.

use std::borrow::Cow;
use std::sync::Arc;

use hangar_core::drone::SchedulerMessage;
use hangar_store::mirror::{Followed, follow_prefix};
use hangar_store::{KeyValue, Store, WatchEvent};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::SchedulerConfig;
use crate::drones::DroneRegistry;
use crate::records::{BACKENDS_PREFIX, BackendRecord};

/// Relays the commands in backend records to the drone sessions this instance holds.
pub struct CommandRelay {
    pub(crate) config: Arc<SchedulerConfig>,
    pub(crate) drones: Arc<DroneRegistry>,
}

impl CommandRelay {
    /// Follows backend records until `cancel` fires.
    pub async fn run(&self, store: Arc<dyn Store>, cancel: CancellationToken) {
        follow_prefix(
            store.as_ref(),
            BACKENDS_PREFIX,
            cancel,
            |followed| match followed {
                Followed::Listing { kvs, .. } => kvs.iter().for_each(|kv| self.relay(kv)),
                Followed::Events { events, .. } => {
                    for ev in &events {
                        if let WatchEvent::Put(kv) = ev {
                            self.relay(kv);
                        }
                    }
                }
            },
        )
        .await
    }

    /// Sends what the record asks of its drone run, if this instance holds that run's session.
    /// Which run that is is read first, without decoding the rest: most changes are to
    /// backends whose drone's session is elsewhere (or gone, as in the loss of many drones).
    fn relay(&self, kv: &KeyValue) {
        let Ok(Assignment {
            drone: Some(drone),
            drone_run_id: Some(run),
        }) = serde_json::from_slice::<Assignment<'_>>(&kv.value)
        else {
            return;
        };
        let Some(conn) = self.drones.get(&drone).filter(|c| c.run_id == run) else {
            return;
        };
        let Ok(rec) = serde_json::from_slice::<BackendRecord>(&kv.value) else {
            return;
        };
        let Some(cmd) = rec.command(self.config.startup_timeout) else {
            return;
        };
        let kind = match &cmd {
            SchedulerMessage::Spawn(_) => "spawn",
            SchedulerMessage::Terminate { hard: true, .. } => "kill",
            SchedulerMessage::Terminate { .. } => "stop",
            // Never asked of a record: log requests go straight to a session.
            SchedulerMessage::Logs(_) | SchedulerMessage::CancelLogs { .. } => return,
        };
        if conn.tx.send(cmd).is_ok() {
            metrics::counter!(crate::metrics::RELAYED_COMMANDS_TOTAL, "command" => kind)
                .increment(1);
            tracing::debug!(backend = %rec.id, %drone, command = kind, "relayed a command");
        }
    }
}

/// The drone run a backend record is assigned to: the two fields of a [`BackendRecord`] the
/// relay needs before deciding whether the record concerns it (the others are skipped).
#[derive(Deserialize)]
struct Assignment<'a> {
    #[serde(borrow, default)]
    drone: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    drone_run_id: Option<Cow<'a, str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_assignment_is_read_from_a_whole_record_and_its_absence_is_none() {
        let cfg = SchedulerConfig::new("hangar.test", "http://a:7070".to_string());
        let spawn = cfg.resolve_spawn(Default::default());
        let rec = BackendRecord::scheduled(spawn, "drone \"a\"\\1", "run-7", 5);
        let json = serde_json::to_vec(&rec).unwrap();
        let a: Assignment<'_> = serde_json::from_slice(&json).unwrap();
        assert_eq!(a.drone.as_deref(), Some("drone \"a\"\\1"));
        assert_eq!(a.drone_run_id.as_deref(), Some("run-7"));

        let unassigned = BackendRecord {
            drone: None,
            drone_run_id: None,
            ..rec
        };
        let json = serde_json::to_vec(&unassigned).unwrap();
        let a: Assignment<'_> = serde_json::from_slice(&json).unwrap();
        assert!(a.drone.is_none() && a.drone_run_id.is_none());
    }
}
