//! hangar-scheduler: Hangar's control plane.
//!
//! The HTTP API, drone sessions, backend lifecycle, placement, the reconciler that enforces
//! idle and lifetime limits and closes lost backends, the route publisher that the proxy
//! follows, and the hot-shard detector. State lives in a `hangar_store::Store`. It never
//! forwards client traffic (the proxy's job), never runs backends (the drone's), and never
//! depends on the proxy or drone crates: they meet through `hangar-core` types wired by the
//! binary.
//!
//! Modules form layers, lowest first, and import only from lower layers:
//! 1. plain data and pure logic: `clock`, `config`, `error`, `metrics`, `records`, `hot`
//!    (the detector), the pure parts of `placement` and `reconciler`;
//! 2. components, each the only writer of its state: `activity`, `drones`, `routes`,
//!    `drains`, `hot_state`, `traffic`, `revocations`, `dns_records`, `leader`, `lifecycle`, `maintenance`, `placement`,
//!    `connect`, `drone_logs`, `drone_session`;
//! 3. background loops over components: `reconciler`, `monitor`;
//! 4. HTTP handlers over components: `api`;
//! 5. the composition root: `scheduler` ([`Scheduler`]).

/// Hashes the scheduler's own ids and authenticated drones' names (not input an anonymous
/// client chooses) fast: foldhash instead of SipHash.
pub(crate) type Fast = foldhash::fast::RandomState;

pub mod activity;
pub mod api;
pub mod api_tokens;
pub mod clock;
pub mod config;
pub mod connect;
pub mod dns_records;
pub mod drains;
pub mod drone_logs;
pub mod drone_session;
pub mod drones;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod hot;
pub mod hot_state;
pub mod leader;
pub mod lifecycle;
pub mod maintenance;
pub mod metrics;
pub mod monitor;
pub mod placement;
pub mod pools;
pub mod quotas;
pub mod reconciler;
pub mod records;
pub mod relay;
pub mod revocations;
pub mod routes;
mod scheduler;
pub mod traffic;
pub mod validate;

#[cfg(test)]
mod tests;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{SchedulerConfig, SpawnDefaults};
pub use error::ApiError;
pub use scheduler::Scheduler;
