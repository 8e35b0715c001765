//! The route table as the proxy holds it: an immutable [`RouteTable`] snapshot behind an
//! `ArcSwap`, replaced whole by the one writer (the route feed), plus a change signal that
//! requests waiting for a starting backend park on.

use std::sync::Arc;

use arc_swap::ArcSwap;
use hangar_core::route::RouteTable;
use tokio::sync::watch;

/// Shared handle to the current routes. Readers call [`RouteHandle::load`] per request and
/// never hold the guard across an `.await`.
#[derive(Debug)]
pub struct RouteHandle {
    table: ArcSwap<RouteTable>,
    /// Carries the revision of the last published table; waiters wake on every publish.
    changed: watch::Sender<u64>,
}

impl Default for RouteHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl RouteHandle {
    pub fn new() -> Self {
        RouteHandle {
            table: ArcSwap::from_pointee(RouteTable::default()),
            changed: watch::channel(0).0,
        }
    }

    /// The current snapshot.
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    /// The current snapshot as an owned `Arc` (for holding across awaits).
    pub fn load_full(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Replaces the table and wakes every waiter.
    pub fn publish(&self, table: Arc<RouteTable>) {
        let revision = table.revision;
        self.table.store(table);
        self.changed.send_replace(revision);
    }

    /// A receiver that is notified on every publish. Subscribe before reading the table so no
    /// change between the read and the wait is missed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
