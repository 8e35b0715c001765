//! hangar-core: the vocabulary every other Hangar crate shares.
//!
//! Ids, API and wire types, the backend lifecycle state machine, the route table snapshot that
//! the scheduler publishes and the proxy (and DNS) read, and the signed token format. This crate
//! performs no IO: it is plain data and pure functions, so that every rule here is unit-tested
//! without a runtime.

pub mod activity;
pub mod api;
pub mod drone;
pub mod feed;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod lifecycle;
pub mod pool;
pub mod route;
pub mod token;

#[cfg(test)]
mod proptests;

pub use ids::{BackendId, KeyRef};
pub use lifecycle::{BackendState, TerminationReason};

/// Milliseconds since the Unix epoch: the wall-clock timestamp used in records and tokens.
pub type UnixMillis = u64;
