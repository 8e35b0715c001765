//! The allocator: mimalloc, set up for a long-running server.
//!
//! The proxy allocates and frees buffers and header maps of several sizes on every request;
//! mimalloc's size-class free lists serve them without glibc's chunk consolidation (about 2%
//! of the proxy's CPU per request; see docs/benchmarks.md).
//!
//! Two of mimalloc's defaults cost the control plane under churn (a hundred thousand records
//! written, decoded and dropped): it hands freed pages back to the kernel after 10 ms, and
//! asks for transparent huge pages, so that pages handed back and used again a moment later
//! fault in as fresh 2 MiB pages the kernel zeroes whole. With 100,000 backends, zeroing those
//! pages was 13% of `serve`'s CPU while it closed a thousand lost drones' backends and 5% under
//! connect load (perf; docs/benchmarks.md). Freed pages are kept for a second instead, and
//! huge pages are not asked for. `MIMALLOC_PURGE_DELAY` and `MIMALLOC_ALLOW_THP` still set
//! them when given.

use std::ffi::c_long;

use libmimalloc_sys::mi_option_t;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` and `mi_option_allow_thp` in mimalloc v2's `mimalloc.h` (the sys
/// crate exports neither as a constant); the test below checks both against their defaults.
const PURGE_DELAY: mi_option_t = 15;
const ALLOW_THP: mi_option_t = libmimalloc_sys::_mi_option_last - 1;

/// How long freed pages stay with the process before they go back to the kernel.
const PURGE_DELAY_MS: c_long = 1000;

/// Sets mimalloc's options; call first in `main`, before any other thread exists.
pub fn tune() {
    for (option, env, value) in [
        (PURGE_DELAY, "MIMALLOC_PURGE_DELAY", PURGE_DELAY_MS),
        (ALLOW_THP, "MIMALLOC_ALLOW_THP", 0),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: `mi_option_set` only stores the value; it is not synchronised, which is
            // why it runs before any other thread is started.
            #[allow(unsafe_code)]
            unsafe {
                libmimalloc_sys::mi_option_set(option, value)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(option: mi_option_t) -> c_long {
        // SAFETY: reads an option's value.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_get(option)
        }
    }

    /// The option numbers name the options meant: before `tune` (nothing else sets them in
    /// a test process) they read mimalloc's documented defaults (10 ms; THP allowed), which
    /// their neighbours do not have (eager commit delay 1, NUMA nodes 0; generic collect
    /// 10,000); after it, the server's values. The only test that sets them.
    #[test]
    fn tune_sets_the_purge_delay_and_turns_off_huge_pages() {
        let given = |env| std::env::var_os(env).is_some();
        if !given("MIMALLOC_PURGE_DELAY") {
            assert_eq!(get(PURGE_DELAY), 10);
            assert_ne!(get(PURGE_DELAY - 1), 10);
            assert_ne!(get(PURGE_DELAY + 1), 10);
        }
        if !given("MIMALLOC_ALLOW_THP") {
            assert_eq!(get(ALLOW_THP), 1);
            assert_eq!(get(ALLOW_THP - 1), 10_000);
        }
        tune();
        if !given("MIMALLOC_PURGE_DELAY") {
            assert_eq!(get(PURGE_DELAY), PURGE_DELAY_MS);
        }
        if !given("MIMALLOC_ALLOW_THP") {
            assert_eq!(get(ALLOW_THP), 0);
        }
    }
}
