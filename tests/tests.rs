//! Hangar's process-level tests: one test binary that starts the real `hangar` executable on
//! `127.0.0.1:0` ports in scratch directories and drives it over loopback.

mod support;

mod dev;
mod drones;
mod ha;
mod logs;
mod partition;
mod pools;
mod remote;
mod security;
mod ui;

mod dns;
mod metrics;
