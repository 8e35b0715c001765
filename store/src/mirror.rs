//! Mirroring a key prefix into memory: list it, then follow its watch, keeping a map of the
//! decoded records and handing it to a publisher after each batch of changes. Re-lists whenever
//! the watch breaks (compaction, a slow consumer, a store restart) or the store fails, so the
//! mirror converges whatever events were missed. The ACME challenges and the token revocations
//! are followed this way.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::{Revision, Store, WatchEvent};

/// How long to wait before listing again after the store failed.
const RETRY: Duration = Duration::from_millis(500);

fn apply<T: DeserializeOwned>(records: &mut BTreeMap<String, T>, ev: WatchEvent) {
    match ev {
        WatchEvent::Put(kv) => match serde_json::from_slice::<T>(&kv.value) {
            Ok(rec) => {
                records.insert(kv.key, rec);
            }
            Err(e) => {
                tracing::error!(key = %kv.key, error = %e, "skipping an unreadable record");
                records.remove(&kv.key);
            }
        },
        WatchEvent::Delete { key, .. } => {
            records.remove(&key);
        }
    }
}

/// Mirrors `prefix` until `cancel` fires, calling `publish` with every record (by key) and the
/// revision they reflect: once after each listing and once per batch of watch events.
pub async fn mirror_prefix<T: DeserializeOwned>(
    store: &dyn Store,
    prefix: &str,
    cancel: CancellationToken,
    mut publish: impl FnMut(&BTreeMap<String, T>, Revision),
) {
    loop {
        let listing = tokio::select! {
            _ = cancel.cancelled() => return,
            l = store.list(prefix) => l,
        };
        let listing = match listing {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(prefix, error = %e, "cannot list; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        let mut revision = listing.revision;
        let mut records = BTreeMap::new();
        for kv in listing.kvs {
            apply(&mut records, WatchEvent::Put(kv));
        }
        publish(&records, revision);
        let watch = tokio::select! {
            _ = cancel.cancelled() => return,
            w = store.watch(prefix, revision + 1) => w,
        };
        let mut events = match watch {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(prefix, error = %e, "cannot watch; listing again");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                ev = events.recv() => ev,
            };
            let Some(first) = first else { break };
            revision = revision.max(first.revision());
            apply(&mut records, first);
            // Batch whatever else is already queued into one publication.
            while let Ok(ev) = events.try_recv() {
                revision = revision.max(ev.revision());
                apply(&mut records, ev);
            }
            publish(&records, revision);
        }
    }
}
