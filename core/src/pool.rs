//! Pools: a spawn template, the number of warm (started, ready, unclaimed) backends to keep,
//! and the generations of the template that new sessions get (rollouts with canary and
//! rollback). The API types of `/v1/pools`, and the pure rules both the scheduler and the CLI
//! use (names, canary assignment by key).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::UnixMillis;
use crate::api::Resources;

pub mod plan;

/// The pool a connect uses when it names none.
pub const DEFAULT_POOL: &str = "default";

/// Generations kept in a pool's history.
pub const HISTORY: usize = 10;

/// What a pool's backends run: one generation's template.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// An executable and its arguments (process runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// A container image (Docker runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Idle timeout of a claimed backend (counted from its claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    /// Lifetime of a claimed backend (counted from its claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_s: Option<u64>,
}

impl Template {
    /// The template as a connect's spawn (for validation and resolution alike).
    pub fn spec(&self) -> crate::api::SpawnSpec {
        crate::api::SpawnSpec {
            command: self.command.clone(),
            image: self.image.clone(),
            env: self.env.clone(),
            idle_timeout_s: self.idle_timeout_s,
            lifetime_s: self.lifetime_s,
            resources: self.resources,
            pool: None,
        }
    }
}

/// How far one converger pass may move a pool: additions are cheap to undo, removals are not
/// (a missing warm backend makes a user wait), so the defaults are asymmetric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bounds {
    pub max_add: u32,
    pub max_remove: u32,
}

impl Bounds {
    /// The defaults for a pool of `warm`: 7 additions and 1 removal per pass, growing with
    /// the pool (a quarter and a twentieth of it) so a large pool converges in a few passes.
    pub fn for_warm(warm: u32) -> Bounds {
        Bounds {
            max_add: 7.max(warm.div_ceil(4)),
            max_remove: 1.max(warm / 20),
        }
    }
}

/// `POST /v1/pools`: create a pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePool {
    pub name: String,
    #[serde(flatten)]
    pub settings: PoolSettings,
    #[serde(default)]
    pub template: Template,
}

/// The settings `hangar pool set` changes (`PATCH /v1/pools/{name}`); absent fields keep
/// their value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<u32>,
    /// At most this many live backends (warm and claimed); 0 clears the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_live: Option<u32>,
    /// The drone pool its backends run on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drone_pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_add: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_remove: Option<u32>,
    /// Healthy starts of a new generation after which a canary is promoted by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_after: Option<u32>,
}

/// `POST /v1/pools/{name}/rollout`: a new generation for new sessions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Environment of the new generation (replaces the old one's when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// The share of new keys (and warm backends) that get the new generation until it is
    /// promoted; absent or 100 rolls out to every new session at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_percent: Option<u8>,
    /// Reverts by itself if not promoted within this many seconds (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u64>,
    /// Reverts by itself once this share of its starts failed (default 50), after at least 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failure_percent: Option<u8>,
}

/// `POST /v1/pools/{name}/rollback`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The generation new sessions go back to (default: the one before the current).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
}

/// One generation of a pool's template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub number: u64,
    pub template: Template,
    pub created_at: UnixMillis,
    /// `rolling`, `stable`, `promoted`, `reverted`, `rolled_back`, `superseded`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A rollout in progress: new sessions hashed under `canary_percent` get `generation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub generation: u64,
    pub canary_percent: u8,
    pub started_at: UnixMillis,
    pub deadline_at: UnixMillis,
    pub max_failure_percent: u8,
    pub healthy: u32,
    pub failed: u32,
}

/// What the converger last saw and did (written when it changes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub warm_ready: u32,
    pub warm_starting: u32,
    pub claimed: u32,
    /// Starts that failed since the pool was created.
    pub failed_starts: u64,
    /// Failed starts in a row (slow start: after a failure a pass adds 1, then 2, then 4,
    /// then up to the bound).
    pub consecutive_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_at: Option<UnixMillis>,
    /// The current slow-start step (absent: the full bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<u32>,
}

/// A pool as the API shows it (and as it is stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub name: String,
    pub warm: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_live: Option<u32>,
    pub drone_pool: String,
    pub bounds: Bounds,
    /// Healthy starts after which a canary promotes itself.
    pub promote_after: u32,
    /// The generation new sessions get (outside a canary's share).
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// The last [`HISTORY`] generations, oldest first.
    pub generations: Vec<Generation>,
    #[serde(default)]
    pub status: PoolStatus,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

impl Pool {
    pub fn template(&self, generation: u64) -> Option<&Template> {
        self.generations
            .iter()
            .find(|g| g.number == generation)
            .map(|g| &g.template)
    }

    /// The generation a new session of `key` gets: the canary's for keys hashed under its
    /// share, the stable one otherwise. Keyless sessions pass a random value.
    pub fn generation_for(&self, key_hash: u64) -> u64 {
        match &self.rollout {
            Some(r) if canary_bucket(key_hash) < u64::from(r.canary_percent) => r.generation,
            _ => self.generation,
        }
    }

    /// How many warm backends each generation should have: a canary takes its share
    /// (rounded up, so a small pool still tries it), the stable generation the rest.
    pub fn warm_targets(&self) -> BTreeMap<u64, u32> {
        let mut targets = BTreeMap::new();
        match &self.rollout {
            Some(r) if r.canary_percent > 0 => {
                let canary = (u64::from(self.warm) * u64::from(r.canary_percent)).div_ceil(100);
                let canary = canary.min(u64::from(self.warm)) as u32;
                targets.insert(r.generation, canary);
                if self.warm > canary {
                    targets.insert(self.generation, self.warm - canary);
                }
            }
            _ => {
                targets.insert(self.generation, self.warm);
            }
        }
        targets
    }
}

/// `GET /v1/pools`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolList {
    pub pools: Vec<Pool>,
}

/// A key's canary bucket in 0..100 from a stable hash of the key.
pub fn canary_bucket(key_hash: u64) -> u64 {
    key_hash % 100
}

/// A stable hash of a key's `namespace/name` (FNV-1a: the same on every instance and
/// release, unlike the standard library's randomised hasher).
pub fn key_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Checks a pool name: 1 to 63 lowercase letters, digits and dashes, starting with a letter.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "pool name {name:?} is invalid: use 1 to 63 lowercase letters, digits and dashes, starting with a letter"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(warm: u32, rollout: Option<u8>) -> Pool {
        Pool {
            name: "p".into(),
            warm,
            max_live: None,
            drone_pool: "default".into(),
            bounds: Bounds::for_warm(warm),
            promote_after: 3,
            generation: 1,
            rollout: rollout.map(|p| Rollout {
                generation: 2,
                canary_percent: p,
                started_at: 0,
                deadline_at: 1,
                max_failure_percent: 50,
                healthy: 0,
                failed: 0,
            }),
            generations: vec![],
            status: PoolStatus::default(),
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn bounds_are_asymmetric_and_grow() {
        assert_eq!(
            Bounds::for_warm(5),
            Bounds {
                max_add: 7,
                max_remove: 1
            }
        );
        assert_eq!(
            Bounds::for_warm(400),
            Bounds {
                max_add: 100,
                max_remove: 20
            }
        );
    }

    #[test]
    fn a_canary_takes_its_share_of_keys_and_of_the_warm_backends() {
        let p = pool(10, Some(20));
        let canary = (0..1000)
            .filter(|i| p.generation_for(key_hash(&format!("default/k{i}"))) == 2)
            .count();
        assert!((150..=250).contains(&canary), "{canary} of 1000 keys");
        // A key keeps its generation.
        let g = p.generation_for(key_hash("default/k7"));
        assert_eq!(p.generation_for(key_hash("default/k7")), g);
        assert_eq!(p.warm_targets(), BTreeMap::from([(1, 8), (2, 2)]));
        assert_eq!(pool(1, Some(10)).warm_targets(), BTreeMap::from([(2, 1)]));
        assert_eq!(pool(3, None).warm_targets(), BTreeMap::from([(1, 3)]));
        assert_eq!(pool(3, Some(100)).warm_targets(), BTreeMap::from([(2, 3)]));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("default").is_ok());
        assert!(validate_name("game-rooms2").is_ok());
        for bad in ["", "Default", "1abc", "a_b", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
