//! hangar-drone: the part of Hangar that runs backends on a host.
//!
//! The [`agent::Agent`] receives [`SchedulerMessage`](hangar_core::drone::SchedulerMessage)s,
//! drives a [`runtime::Runtime`] (one local process per backend, or later a container) and
//! reports [`BackendEvent`](hangar_core::drone::BackendEvent)s back. In `hangar dev` the agent
//! runs in the scheduler's process and talks over channels; a remote drone runs the same agent
//! behind a connection ([`session`]). Backend output is kept per backend and read back for
//! the scheduler's log requests ([`logs`]). It depends on `hangar-core` only: the scheduler never
//! links this crate (nor bollard).

pub mod agent;
pub mod fence;
pub mod logs;
pub mod policy;
pub mod runtime;
pub mod session;
pub mod usage;
pub mod watchdog;

pub use agent::{Agent, AgentConfig};
pub use runtime::process::{ProcessRuntime, ProcessRuntimeConfig};
pub use runtime::{ExitStatus, ExitWatch, Runtime, RuntimeError, Started};
