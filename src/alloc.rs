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
//!
//! mimalloc is asked the way `malloc` is (as Rust's own `System` allocator does): the
//! `mimalloc` crate's allocator passes every allocation to `mi_malloc_aligned`, whose fast path
//! only covers blocks up to 1 KiB; larger ones (the proxy's two per-request futures, 1.2 and
//! 1.5 KB) took the generic aligned path, a few layers of checks, before reaching the same
//! `_mi_malloc_generic`. An alignment that mimalloc gives every block of the size anyway (at
//! most 16 bytes, and at most the size: mimalloc's own `mi_malloc_is_naturally_aligned`) now
//! goes to `mi_malloc`; any other to the aligned functions, as before.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::{c_long, c_void};

use libmimalloc_sys::{mi_malloc, mi_malloc_aligned, mi_option_t, mi_zalloc, mi_zalloc_aligned};

#[global_allocator]
static GLOBAL: Mimalloc = Mimalloc;

/// mimalloc, asked for blocks as the module says.
struct Mimalloc;

/// `MI_MAX_ALIGN_SIZE` in mimalloc v2's `types.h`: every block of at least this many bytes is
/// aligned to it, and a smaller block to its size's power of two.
const MI_MAX_ALIGN_SIZE: usize = 16;

/// Whether a plain (unaligned) mimalloc block of `size` bytes is aligned to `align`.
fn naturally_aligned(size: usize, align: usize) -> bool {
    align <= MI_MAX_ALIGN_SIZE && align <= size
}

/// A block for `layout` from mimalloc's `plain` function, or from its `aligned` one when a plain
/// block of that size need not have the alignment.
///
/// # Safety
/// `plain` and `aligned` are one of mimalloc's pairs of allocation functions.
#[allow(unsafe_code)]
#[inline]
unsafe fn allocate(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    // SAFETY: mimalloc's allocation functions take any size and power-of-two alignment.
    let block = unsafe {
        if naturally_aligned(size, align) {
            plain(size)
        } else {
            aligned(size, align)
        }
    };
    block.cast()
}

// SAFETY: every block comes from mimalloc and goes back to it: `mi_free` and the `realloc`
// functions take a block from any of mimalloc's allocation functions. A block is asked for
// with its alignment unless a plain block of its size has that alignment anyway (see
// `naturally_aligned`), and `realloc` does the same for the new size.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `allocate`.
        unsafe { allocate(layout, mi_malloc, mi_malloc_aligned) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `allocate`.
        unsafe { allocate(layout, mi_zalloc, mi_zalloc_aligned) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from one of mimalloc's allocation functions (the caller's
        // contract: it was allocated by this allocator).
        unsafe { libmimalloc_sys::mi_free(ptr.cast::<c_void>()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `ptr` came from this allocator (the caller's contract), and the new block
        // keeps the layout's alignment as in `alloc`.
        let block = unsafe {
            if naturally_aligned(new_size, align) {
                libmimalloc_sys::mi_realloc(ptr.cast::<c_void>(), new_size)
            } else {
                libmimalloc_sys::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, align)
            }
        };
        block.cast()
    }
}

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

    /// Blocks of every size around mimalloc's thresholds (16 bytes, 1 KiB, 128 KiB) and every
    /// alignment up to a page are aligned as asked, zeroed when asked, and keep their bytes
    /// through a `realloc` that grows or shrinks them across the thresholds. The global
    /// allocator of this test binary is `Mimalloc`, so `std::alloc` calls reach it.
    #[test]
    fn blocks_are_aligned_as_asked_through_alloc_zeroed_and_realloc() {
        let sizes = [
            1, 7, 8, 15, 16, 17, 24, 100, 1023, 1024, 1025, 1456, 4096, 131_073,
        ];
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for &size in &sizes {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block is freed once, with its layout.
                #[allow(unsafe_code)]
                unsafe {
                    let p = std::alloc::alloc_zeroed(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc_zeroed {size}/{align}");
                    assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0));
                    std::alloc::dealloc(p, layout);

                    let p = std::alloc::alloc(layout);
                    assert_eq!(p as usize % align, 0, "alloc {size}/{align}");
                    for i in 0..size {
                        *p.add(i) = (i % 251) as u8;
                    }
                    let mut p = p;
                    let mut now = size;
                    // The bytes written first that every block so far has had room for.
                    let mut kept = size;
                    for &next in sizes.iter().rev().chain(&sizes) {
                        p = std::alloc::realloc(
                            p,
                            Layout::from_size_align(now, align).unwrap(),
                            next,
                        );
                        assert_eq!(p as usize % align, 0, "realloc {now}->{next}/{align}");
                        kept = kept.min(next);
                        let bytes = std::slice::from_raw_parts(p, kept);
                        assert!(bytes.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
                        now = next;
                    }
                    std::alloc::dealloc(p, Layout::from_size_align(now, align).unwrap());
                }
            }
        }
    }

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
