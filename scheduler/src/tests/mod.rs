//! Tests that drive a whole [`crate::Scheduler`] (real embedded store, hand-moved or paused
//! clock) through its components. They sit above the composition root, so no component
//! module imports the scheduler.

mod admission;
mod connect;
mod layers;
mod lease_expiry;
mod monitor;
