//! Per-namespace quotas: at most `max_live` live backends and `connects_per_second` connects
//! (a token bucket with a burst of one second's worth), answered 429 with `Retry-After` past
//! them. Stored under `/hangar/quotas/<namespace>` and mirrored by every instance; enforced
//! by the leader, which answers every connect. Keyless backends count under `default`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hangar_store::Store;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;

/// Prefix of quota records.
pub const QUOTAS_PREFIX: &str = "/hangar/quotas/";

/// A namespace's limits; a missing one is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    #[serde(default)]
    pub max_live: Option<u64>,
    #[serde(default)]
    pub connects_per_second: Option<f64>,
}

/// `GET /v1/quotas`: every namespace's quota.
pub type QuotaList = BTreeMap<String, Quota>;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The quotas, their token buckets, and the live backends being placed (not yet counted by
/// the route table).
pub struct Quotas {
    store: Arc<dyn Store>,
    limits: RwLock<HashMap<String, Quota>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    placing: Mutex<HashMap<String, u64>>,
}

/// A live backend being placed under a `max_live` quota: counted until dropped (once the
/// route table counts it, or the connect failed).
pub struct Placing {
    quotas: Arc<Quotas>,
    namespace: String,
}

impl Drop for Placing {
    fn drop(&mut self) {
        let mut placing = self
            .quotas
            .placing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = placing.get_mut(&self.namespace) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                placing.remove(&self.namespace);
            }
        }
    }
}

impl Quotas {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Quotas {
            store,
            limits: RwLock::default(),
            buckets: Mutex::default(),
            placing: Mutex::default(),
        }
    }

    fn limit(&self, ns: &str) -> Option<Quota> {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(ns)
            .cloned()
    }

    /// Takes one connect of namespace `ns` from its bucket, or says when to retry.
    pub fn admit_connect(&self, ns: &str) -> Result<(), ApiError> {
        let Some(rate) = self.limit(ns).and_then(|q| q.connects_per_second) else {
            return Ok(());
        };
        let burst = rate.max(1.0);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets.entry(ns.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - b.tokens) / rate);
        metrics::counter!(crate::metrics::QUOTA_REFUSALS_TOTAL, "quota" => "connects_per_second")
            .increment(1);
        Err(ApiError::TooMany {
            message: format!(
                "namespace {ns:?} is limited to {rate} connects a second: retry in {:.1}s",
                wait.as_secs_f64()
            ),
            retry_after: wait,
        })
    }

    /// Holds a place for one more live backend of `ns`, which has `live` now, or refuses.
    pub fn place(self: &Arc<Self>, ns: &str, live: u64) -> Result<Option<Placing>, ApiError> {
        let Some(max) = self.limit(ns).and_then(|q| q.max_live) else {
            return Ok(None);
        };
        let mut placing = self.placing.lock().unwrap_or_else(|e| e.into_inner());
        let n = placing.entry(ns.to_string()).or_default();
        if live + *n >= max {
            metrics::counter!(crate::metrics::QUOTA_REFUSALS_TOTAL, "quota" => "max_live")
                .increment(1);
            return Err(ApiError::TooMany {
                message: format!(
                    "namespace {ns:?} may have at most {max} live backends and has {live}: terminate one, or raise its quota with `hangar quota set`"
                ),
                retry_after: Duration::from_secs(5),
            });
        }
        *n += 1;
        Ok(Some(Placing {
            quotas: self.clone(),
            namespace: ns.to_string(),
        }))
    }

    /// Every quota.
    pub fn list(&self) -> QuotaList {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Sets `ns`'s quota.
    pub async fn set(&self, ns: &str, quota: Quota) -> Result<(), ApiError> {
        hangar_core::ids::validate_label(ns).map_err(|_| {
            ApiError::BadRequest(format!(
                "namespace {ns:?} must be lowercase letters, digits and '-' (at most 63)"
            ))
        })?;
        if quota.max_live == Some(0) {
            return Err(ApiError::BadRequest(
                "max_live must be at least 1 (omit it for no limit)".into(),
            ));
        }
        if quota
            .connects_per_second
            .is_some_and(|r| !r.is_finite() || r <= 0.0 || r > 1_000_000.0)
        {
            return Err(ApiError::BadRequest(
                "connects_per_second must be above 0 and at most 1000000 (omit it for no limit)"
                    .into(),
            ));
        }
        let value = serde_json::to_vec(&quota).unwrap_or_default();
        self.store
            .put(&format!("{QUOTAS_PREFIX}{ns}"), value, None)
            .await?;
        self.limits
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ns.to_string(), quota);
        Ok(())
    }

    /// Removes `ns`'s quota; whether there was one.
    pub async fn remove(&self, ns: &str) -> Result<bool, ApiError> {
        let existed = self.store.delete(&format!("{QUOTAS_PREFIX}{ns}")).await?;
        self.limits
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(ns);
        Ok(existed)
    }

    /// Mirrors the quota records until `cancel` fires.
    pub async fn follow(&self, cancel: CancellationToken) {
        hangar_store::mirror::mirror_prefix::<Quota>(
            self.store.as_ref(),
            QUOTAS_PREFIX,
            cancel,
            |records: &BTreeMap<String, Quota>, _| {
                let by_ns = records
                    .iter()
                    .filter_map(|(k, q)| {
                        Some((k.strip_prefix(QUOTAS_PREFIX)?.to_string(), q.clone()))
                    })
                    .collect();
                *self.limits.write().unwrap_or_else(|e| e.into_inner()) = by_ns;
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_store::embedded::EmbeddedStore;

    #[tokio::test(start_paused = true)]
    async fn connects_per_second_and_live_backends_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_default(dir.path().join("s.redb"))
            .await
            .unwrap();
        let q = Arc::new(Quotas::new(store));
        q.set(
            "team-a",
            Quota {
                max_live: Some(2),
                connects_per_second: Some(2.0),
            },
        )
        .await
        .unwrap();
        // A burst of one second's worth, then refused with how long to wait.
        q.admit_connect("team-a").unwrap();
        q.admit_connect("team-a").unwrap();
        let err = q.admit_connect("team-a").unwrap_err();
        assert_eq!(err.status(), http::StatusCode::TOO_MANY_REQUESTS);
        let ApiError::TooMany { retry_after, .. } = err else {
            unreachable!()
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        q.admit_connect("team-a").unwrap();
        // Other namespaces are not limited.
        for _ in 0..10 {
            q.admit_connect("team-b").unwrap();
        }
        // Two live at most, counting those being placed.
        let one = q.place("team-a", 0).unwrap();
        let _two = q.place("team-a", 0).unwrap();
        let err = q.place("team-a", 0).err().unwrap();
        assert!(err.to_string().contains("at most 2 live"), "{err}");
        drop(one);
        assert!(
            q.place("team-a", 1).is_err(),
            "one live and one being placed"
        );
        assert!(q.place("team-a", 0).is_ok());
        assert!(q.place("team-b", 100).unwrap().is_none());
        // Bad quotas are refused; a removed one no longer limits.
        for bad in [
            Quota {
                max_live: Some(0),
                ..Default::default()
            },
            Quota {
                connects_per_second: Some(0.0),
                ..Default::default()
            },
        ] {
            assert!(q.set("team-a", bad).await.is_err());
        }
        assert!(q.remove("team-a").await.unwrap());
        assert!(q.place("team-a", 100).unwrap().is_none());
    }
}
