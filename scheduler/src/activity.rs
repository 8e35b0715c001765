//! The scheduler's book of backend activity, merged from every proxy's reports, read by the
//! reconciler for idle timeouts.

use std::collections::HashMap;

use dashmap::DashMap;
use hangar_core::activity::ActivityBatch;
use hangar_core::{BackendId, UnixMillis};

#[derive(Debug, Default, Clone)]
struct Entry {
    last_active: UnixMillis,
    /// Open requests and connections, per reporting proxy.
    open_by_proxy: HashMap<String, u64>,
}

/// Activity per backend, as last reported. A `DashMap`: many independent entries updated by
/// report batches while the reconciler reads.
#[derive(Debug, Default)]
pub struct ActivityBook {
    entries: DashMap<BackendId, Entry>,
}

impl ActivityBook {
    /// Merges a batch from one proxy: `last_active` only moves forward; the proxy's open count
    /// replaces its previous one.
    pub fn record(&self, batch: &ActivityBatch) {
        for r in &batch.reports {
            let mut e = self.entries.entry(r.backend.clone()).or_default();
            e.last_active = e.last_active.max(r.last_active);
            e.open_by_proxy.insert(batch.proxy.clone(), r.open);
        }
    }

    /// `(last_active, open)` for a backend, if any proxy has reported it.
    pub fn get(&self, backend: &str) -> Option<(UnixMillis, u64)> {
        self.entries
            .get(backend)
            .map(|e| (e.last_active, e.open_by_proxy.values().sum()))
    }

    pub fn forget(&self, backend: &str) {
        self.entries.remove(backend);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_core::activity::ActivityReport;

    #[test]
    fn merges_proxies() {
        let book = ActivityBook::default();
        let id = BackendId::parse("b1").unwrap();
        let rep = |proxy: &str, last, open| ActivityBatch {
            proxy: proxy.into(),
            reports: vec![ActivityReport {
                backend: id.clone(),
                last_active: last,
                open,
                requests: 0,
                answered: 0,
                duration_us_total: 0,
            }],
        };
        book.record(&rep("p1", 100, 2));
        book.record(&rep("p2", 50, 1));
        assert_eq!(book.get("b1"), Some((100, 3)));
        book.record(&rep("p1", 90, 0));
        assert_eq!(
            book.get("b1"),
            Some((100, 1)),
            "last_active never moves back"
        );
        book.forget("b1");
        assert_eq!(book.get("b1"), None);
    }
}
