//! Test builds only: the global allocator counts, for a future wrapped in [`Held`], the bytes
//! it allocates less those it frees while it is polled, so that a test can tell what a
//! connection keeps between two moments without counting what the test itself allocates.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::task::{Context, Poll};

pub(crate) struct Counting;

thread_local! {
    /// The counter of the [`Held`] future this thread is polling, if any.
    static COUNTER: Cell<Option<&'static AtomicIsize>> = const { Cell::new(None) };
}

fn count(delta: isize) {
    if let Ok(Some(c)) = COUNTER.try_with(Cell::get) {
        c.fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: every call goes to `System` unchanged; the counting beside it allocates nothing.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// A future whose net allocations while polled add to `counter`.
pub(crate) struct Held<F> {
    counter: &'static AtomicIsize,
    inner: Pin<Box<F>>,
}

impl<F: Future> Held<F> {
    pub(crate) fn new(counter: &'static AtomicIsize, inner: F) -> Self {
        Held {
            counter,
            inner: Box::pin(inner),
        }
    }
}

impl<F: Future> Future for Held<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let outer = COUNTER.replace(Some(self.counter));
        let r = self.inner.as_mut().poll(cx);
        COUNTER.set(outer);
        r
    }
}
