//! Placement: which connected drone runs a new backend.
//!
//! Filter (connected, healthy, not draining, runtime kind and pool match, enough free CPU and
//! memory for the reservation, under max backends), then score (least reserved after
//! placement, then fewest backends) with the power of two choices: two random candidates, the
//! better wins, so concurrent deciders spread instead of herding onto one drone. Nowhere to
//! place is a 503 that says why for each drone, never a 500.

use std::fmt;

use hangar_core::api::Amounts;
use hangar_core::drone::Capacity;
use rand::Rng;

use crate::drones::DroneConn;
use crate::error::ApiError;
use crate::records::ResolvedSpawn;
use crate::scheduler::Inner;

/// What a backend reserves on its drone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    pub cpu_millis: u64,
    pub memory_mb: u64,
}

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
    pub unhealthy: Option<String>,
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
    if let Some(why) = &d.unhealthy {
        return Err(Refusal::Unhealthy(why.clone()));
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

impl Inner {
    /// What a spawn reserves: its resources, or the configured default.
    pub(crate) fn need(&self, spawn: &ResolvedSpawn) -> Need {
        Need {
            cpu_millis: spawn
                .resources
                .cpu_millis
                .unwrap_or(self.config.default_reservation.cpu_millis),
            memory_mb: spawn
                .resources
                .memory_mb
                .unwrap_or(self.config.default_reservation.memory_mb),
        }
    }

    pub(crate) fn place(&self, spawn: &ResolvedSpawn) -> Result<DroneConn, ApiError> {
        let drones = self.drones.all();
        if drones.is_empty() {
            return Err(ApiError::Unavailable(
                "no drone is connected: start one with `hangar drone`".into(),
            ));
        }
        let runtime = if spawn.image.is_some() {
            "docker"
        } else {
            "process"
        };
        let need = self.need(spawn);
        let facts: Vec<DroneFacts<'_>> = drones
            .iter()
            .map(|d| DroneFacts {
                name: &d.name,
                runtime: &d.runtime,
                pool: &d.pool,
                capacity: d.capacity,
                load: self.route_load.get(&d.name).map(|v| *v).unwrap_or_default(),
                draining: self.drains.contains_key(&d.name),
                unhealthy: d.status.unhealthy(),
            })
            .collect();
        let mut reasons = Vec::new();
        let admitted: Vec<DroneFacts<'_>> = facts
            .into_iter()
            .filter(|f| match admit(f, need, runtime, &spawn.pool) {
                Ok(()) => true,
                Err(r) => {
                    reasons.push(format!("{} {r}", f.name));
                    false
                }
            })
            .collect();
        let mut rng = rand::rng();
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
        d.unhealthy = Some("docker down".into());
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
}
