//! hangar-scheduler: Hangar's control plane.
//!
//! The HTTP API, the state store, backend lifecycle, placement, the reconciler that enforces
//! idle and lifetime limits and closes lost backends, the route feed that the proxy follows,
//! and the drone agent with its runtimes. It never forwards client traffic: that is the
//! proxy's job, and it never depends on the proxy crate (they meet through `hangar-core`
//! types wired by the binary).

pub mod activity;
pub mod api;
pub mod clock;
pub mod config;
pub mod dns_records;
mod drone_api;
pub mod drone_session;
pub mod drones;
pub mod error;
pub mod feed;
pub mod hot;
pub mod lifecycle;
pub mod metrics;
pub mod monitor;
pub mod placement;
pub mod reconciler;
pub mod records;
mod route_feed;
mod scheduler;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{SchedulerConfig, SpawnDefaults};
pub use error::ApiError;
pub use scheduler::Scheduler;
