//! Mirroring a key prefix into memory: list it, then follow its watch, keeping a map of the
//! decoded records and handing it to a publisher after each batch of changes. A watch that
//! ends (a slow consumer, a store restart) is resumed from the last revision seen; it re-lists
//! when that cannot resume (compaction) or the store fails, so the mirror converges whatever
//! events were missed. The ACME challenges, the token revocations and
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
/// queued when one arrives). A watch that ends is resumed from the last revision handed over;
/// it lists again when that fails or the store fails, so a handler that treats a listing as
/// the whole truth converges whatever events were missed.
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
        let mut resume = Resume::default();
        loop {
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
                        _ = tokio::time::sleep(RETRY) => break,
                    }
                }
            };
            let mut delivered = false;
            loop {
                let first = tokio::select! {
                    _ = cancel.cancelled() => return,
                    ev = events.recv() => ev,
                };
                let Some(first) = first else { break };
                delivered = true;
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
            if !resume.after_end(delivered) {
                tracing::warn!(prefix, "watch ended again at once; listing again");
                break;
            }
        }
    }
}

/// Whether a follower resumes a watch that ended or lists again. A watch ends when its reader
/// fell behind (the embedded store will not hold its writers) or the store restarted:
/// resuming from the last revision applied replays what the store still has, so a burst costs
/// its events rather than a listing of the whole prefix. A resume that fails (the revision was
/// compacted) or a resumed watch that ends before delivering anything means listing again.
/// One per listing: a fresh listing starts with a fresh `Resume`.
#[derive(Debug, Default)]
pub struct Resume {
    resumed: bool,
}

impl Resume {
    /// After a watch ended having `delivered` events or not: `true` to resume it from the
    /// last revision applied, `false` to list again.
    pub fn after_end(&mut self, delivered: bool) -> bool {
        let again = delivered || !self.resumed;
        self.resumed = again;
        again
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::embedded::{EmbeddedOptions, EmbeddedStore, TokioClock};
    use crate::{TxnOp, TxnOutcome};

    /// A burst larger than a watcher's buffer ends the watch (the store does not hold its
    /// writers for a slow reader); the follower resumes from the last revision it handed over
    /// and lists only once, and every event arrives exactly once, in order.
    #[tokio::test]
    async fn a_follower_that_falls_behind_resumes_its_watch_instead_of_listing_again() {
        let dir = tempfile::tempdir().unwrap();
        let options = EmbeddedOptions {
            watch_buffer: 4,
            ..Default::default()
        };
        let store =
            EmbeddedStore::open_with(dir.path().join("s.redb"), Arc::new(TokioClock), options)
                .await
                .unwrap();
        let seen = Arc::new(Mutex::new((0usize, Vec::<Revision>::new())));
        let cancel = CancellationToken::new();
        let follower = {
            let (store, seen, cancel) = (store.clone(), seen.clone(), cancel.clone());
            tokio::spawn(async move {
                follow_prefix(store.as_ref(), "p/", cancel, |f| {
                    let mut seen = seen.lock().unwrap();
                    match f {
                        Followed::Listing { .. } => seen.0 += 1,
                        Followed::Events { events, .. } => {
                            seen.1.extend(events.iter().map(WatchEvent::revision))
                        }
                    }
                })
                .await
            })
        };
        // Wait for the first listing before writing.
        while seen.lock().unwrap().0 == 0 {
            tokio::task::yield_now().await;
        }
        let mut last = 0;
        for t in 0..20 {
            let ops = (0..10)
                .map(|k| TxnOp::put(format!("p/{t}-{k}"), b"x".to_vec(), None))
                .collect();
            let TxnOutcome::Committed(rev) = store.txn(Vec::new(), ops).await.unwrap() else {
                panic!("an unconditional transaction commits")
            };
            last = rev;
        }
        loop {
            let (lists, revs) = seen.lock().unwrap().clone();
            if revs.last() == Some(&last) {
                assert_eq!(lists, 1, "listed only once");
                assert_eq!(revs.len(), 200, "every event once");
                assert!(revs.windows(2).all(|w| w[0] <= w[1]), "in order");
                break;
            }
            tokio::task::yield_now().await;
        }
        cancel.cancel();
        follower.await.unwrap();
    }
}
