//! Mirroring a key prefix into memory: list it, then follow its watch, keeping a map of the
//! decoded records and handing it to a publisher after each batch of changes. Re-lists whenever
//! the watch breaks (compaction, a slow consumer, a store restart) or the store fails, so the
//! mirror converges whatever events were missed. The ACME challenges, the token revocations and
//! the drone records are followed this way; [`follow_prefix`] is the same loop for a consumer
//! that wants the events themselves (the scheduler's command relay).

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

/// What [`follow_prefix`] hands its handler: the whole prefix after each listing (the first,
/// and again whenever the watch broke and events may have been missed), then each batch of
/// watch events, all at or below `revision`.
#[derive(Debug)]
pub enum Followed {
    Listing {
        kvs: Vec<crate::KeyValue>,
        revision: Revision,
    },
    Events {
        events: Vec<WatchEvent>,
        revision: Revision,
    },
}

/// Follows `prefix` until `cancel` fires: lists it, then watches it from the listing's
/// revision, handing `handle` the listing and every batch of events (whatever is already
/// queued when one arrives). Lists again whenever the watch breaks or the store fails, so a
/// handler that treats a listing as the whole truth converges whatever events were missed.
pub async fn follow_prefix(
    store: &dyn Store,
    prefix: &str,
    cancel: CancellationToken,
    mut handle: impl FnMut(Followed),
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
        handle(Followed::Listing {
            kvs: listing.kvs,
            revision,
        });
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
            let mut batch = vec![first];
            while let Ok(ev) = events.try_recv() {
                revision = revision.max(ev.revision());
                batch.push(ev);
            }
            handle(Followed::Events {
                events: batch,
                revision,
            });
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
    let mut records = BTreeMap::new();
    follow_prefix(store, prefix, cancel, |followed| match followed {
        Followed::Listing { kvs, revision } => {
            records.clear();
            for kv in kvs {
                apply(&mut records, WatchEvent::Put(kv));
            }
            publish(&records, revision);
        }
        Followed::Events { events, revision } => {
            for ev in events {
                apply(&mut records, ev);
            }
            publish(&records, revision);
        }
    })
    .await
}
