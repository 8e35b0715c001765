//! Placement: which connected drone runs a new backend. Filter the drones that can run the
//! spawn (runtime kind), then take the least loaded. Nowhere to place is a 503 with the
//! reason, never a 500.

use crate::drones::DroneConn;
use crate::error::ApiError;
use crate::records::ResolvedSpawn;
use crate::scheduler::Inner;

/// Picks the candidate with the fewest live backends; ties go to the first by name so that
/// several deciders agree.
pub fn choose(candidates: &[(DroneConn, usize)]) -> Option<&DroneConn> {
    candidates
        .iter()
        .min_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.name.cmp(&b.0.name)))
        .map(|(c, _)| c)
}

impl Inner {
    pub(crate) fn place(&self, spawn: &ResolvedSpawn) -> Result<DroneConn, ApiError> {
        let drones = self.drones.all();
        if drones.is_empty() {
            return Err(ApiError::Unavailable(
                "no drone is connected: start one with `hangar drone`".into(),
            ));
        }
        let wanted = if spawn.image.is_some() {
            "docker"
        } else {
            "process"
        };
        let candidates: Vec<(DroneConn, usize)> = drones
            .into_iter()
            .filter(|d| d.runtime == wanted)
            .map(|d| {
                let load = self.live_count(&d.name);
                (d, load)
            })
            .collect();
        match choose(&candidates) {
            Some(d) => Ok(d.clone()),
            None if wanted == "docker" => Err(ApiError::Unavailable(format!(
                "no docker drone is connected to run image {:?}: connected drones run processes; give spawn.command or start a drone with --runtime docker",
                spawn.image.as_deref().unwrap_or_default()
            ))),
            None => Err(ApiError::Unavailable(
                "no process drone is connected to run spawn.command; give spawn.image for a docker drone".into(),
            )),
        }
    }

    fn live_count(&self, drone: &str) -> usize {
        self.route_load.get(drone).map(|v| *v).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn conn(name: &str) -> DroneConn {
        DroneConn {
            name: name.into(),
            run_id: "r".into(),
            runtime: "process".into(),
            tx: mpsc::channel(1).0,
        }
    }

    #[test]
    fn least_loaded_then_by_name() {
        let c = vec![(conn("b"), 2), (conn("a"), 3), (conn("c"), 2)];
        assert_eq!(choose(&c).unwrap().name, "b");
        assert!(choose(&[]).is_none());
    }
}
