//! DNS records kept in the store: the TXT values of ACME DNS-01 challenges
//! (`_acme-challenge.<domain>`), set and cleared through the API
//! (`POST`/`DELETE`/`GET /v1/dns/acme-challenge`) and stored under
//! `/hangar/dns/acme/<name>/<value>`, so every `serve` instance sharing the store answers them.
//!
//! [`AcmeFeed`] follows that prefix (list, then watch, re-listing when the watch breaks) and
//! publishes every change as one immutable snapshot on a `watch` channel; DNS servers read the
//! snapshot, never the store, so a query costs no store call.

use std::collections::BTreeMap;
use std::sync::Arc;

use hangar_core::UnixMillis;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use hangar_store::{Expect, Revision, Store};

/// Prefix of every ACME challenge record.
pub const ACME_PREFIX: &str = "/hangar/dns/acme/";

/// The first label of every challenge name (RFC 8555, section 8.4).
pub const ACME_LABEL: &str = "_acme-challenge";

/// The longest value accepted: one TXT character-string.
const MAX_VALUE_LEN: usize = 255;

/// The store key of one challenge value.
pub fn acme_key(name: &str, value: &str) -> String {
    format!("{ACME_PREFIX}{name}/{value}")
}

/// One TXT value of a challenge name (the stored record and the API's view of it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeChallenge {
    /// The full owner name, lowercase, without the trailing dot (`_acme-challenge.<domain>`).
    pub name: String,
    pub value: String,
    pub created_at: UnixMillis,
}

/// `POST /v1/dns/acme-challenge`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetAcmeChallenge {
    /// The TXT value (for ACME: the base64url key authorization digest).
    pub value: String,
    /// `_acme-challenge.<domain>` (the default) or `_acme-challenge.<sub>.<domain>`.
    #[serde(default)]
    pub name: Option<String>,
}

/// `DELETE /v1/dns/acme-challenge`: the value (under every name, or under `name`), every value
/// of `name`, or with neither, everything.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClearAcmeChallenges {
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// `GET /v1/dns/acme-challenge`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeChallengeList {
    pub challenges: Vec<AcmeChallenge>,
}

/// The answer to a `DELETE`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeCleared {
    pub deleted: usize,
}

/// The normalised challenge name for `name` (default `_acme-challenge.<domain>`), or a 400
/// naming the field.
pub fn challenge_name(name: Option<&str>, domain: &str) -> Result<String, ApiError> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let Some(name) = name else {
        return Ok(format!("{ACME_LABEL}.{domain}"));
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let bad = |why: &str| {
        ApiError::BadRequest(format!(
            "invalid field `name`: {name:?} {why} (use {ACME_LABEL}.{domain} or {ACME_LABEL}.<sub>.{domain})"
        ))
    };
    let Some(inner) = name.strip_suffix(&domain).and_then(|n| n.strip_suffix('.')) else {
        return Err(bad("is not in the cluster domain"));
    };
    let mut labels = inner.split('.');
    if labels.next() != Some(ACME_LABEL) {
        return Err(bad(&format!("does not start with {ACME_LABEL}")));
    }
    for label in labels {
        if hangar_core::ids::validate_label(label).is_err() {
            return Err(bad(
                "has a label that is not lowercase letters, digits and '-'",
            ));
        }
    }
    if name.len() > 253 {
        return Err(bad("is longer than 253 characters"));
    }
    Ok(name)
}

/// Checks a TXT value: 1 to 255 characters of base64 or base64url (what ACME puts there).
pub fn check_value(value: &str) -> Result<(), ApiError> {
    let ok_char = |c: u8| c.is_ascii_alphanumeric() || b"-_=+/.".contains(&c);
    if value.is_empty() || value.len() > MAX_VALUE_LEN || !value.bytes().all(ok_char) {
        return Err(ApiError::BadRequest(format!(
            "invalid field `value`: {value:?} must be 1 to {MAX_VALUE_LEN} characters of letters, digits and -_=+/."
        )));
    }
    Ok(())
}

/// Stores a challenge value; returns it and whether it is new (setting it again is a no-op).
pub async fn set_challenge(
    store: &dyn Store,
    domain: &str,
    now: UnixMillis,
    req: SetAcmeChallenge,
) -> Result<(AcmeChallenge, bool), ApiError> {
    let name = challenge_name(req.name.as_deref(), domain)?;
    check_value(&req.value)?;
    let rec = AcmeChallenge {
        name,
        value: req.value,
        created_at: now,
    };
    let bytes = serde_json::to_vec(&rec)
        .map_err(|e| ApiError::Internal(format!("cannot encode a challenge record: {e}")))?;
    let key = acme_key(&rec.name, &rec.value);
    match store
        .compare_and_swap(&key, Expect::Absent, bytes, None)
        .await?
    {
        hangar_store::CasOutcome::Written(_) => Ok((rec, true)),
        hangar_store::CasOutcome::Conflict(existing) => {
            let existing = existing
                .and_then(|kv| serde_json::from_slice(&kv.value).ok())
                .unwrap_or(rec);
            Ok((existing, false))
        }
    }
}

/// Deletes the values `req` names; returns how many.
pub async fn clear_challenges(
    store: &dyn Store,
    domain: &str,
    req: ClearAcmeChallenges,
) -> Result<usize, ApiError> {
    let prefix = match req.name.as_deref() {
        Some(n) => format!("{ACME_PREFIX}{}/", challenge_name(Some(n), domain)?),
        None => ACME_PREFIX.to_string(),
    };
    if let Some(v) = &req.value {
        check_value(v)?;
    }
    let listing = store.list(&prefix).await?;
    let mut deleted = 0;
    for kv in listing.kvs {
        let Ok(rec) = serde_json::from_slice::<AcmeChallenge>(&kv.value) else {
            // An unreadable record cannot be answered anyway; clearing everything removes it.
            if req.value.is_none() && store.delete_if_revision(&kv.key, kv.mod_revision).await? {
                deleted += 1;
            }
            continue;
        };
        if req.value.as_ref().is_some_and(|v| *v != rec.value) {
            continue;
        }
        // Only the version we listed: a value set again meanwhile is a new challenge.
        if store.delete_if_revision(&kv.key, kv.mod_revision).await? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Every stored challenge, by name then value.
pub async fn list_challenges(store: &dyn Store) -> Result<Vec<AcmeChallenge>, ApiError> {
    let listing = store.list(ACME_PREFIX).await?;
    Ok(listing
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

/// Every challenge as of a store revision, by name then value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcmeSnapshot {
    pub revision: Revision,
    pub challenges: Vec<AcmeChallenge>,
}

/// Follows the challenge records and publishes a new [`AcmeSnapshot`] after each batch of
/// changes (the only writer of its channel).
pub struct AcmeFeed {
    store: Arc<dyn Store>,
    tx: watch::Sender<Arc<AcmeSnapshot>>,
}

impl AcmeFeed {
    pub fn new(store: Arc<dyn Store>) -> Self {
        AcmeFeed {
            store,
            tx: watch::channel(Arc::new(AcmeSnapshot::default())).0,
        }
    }

    /// Follows the snapshots (empty until the first listing).
    pub fn subscribe(&self) -> watch::Receiver<Arc<AcmeSnapshot>> {
        self.tx.subscribe()
    }

    fn publish(&self, records: &BTreeMap<String, AcmeChallenge>, revision: Revision) {
        // Keys sort by name then value, so the snapshot does too.
        self.tx.send_replace(Arc::new(AcmeSnapshot {
            revision,
            challenges: records.values().cloned().collect(),
        }));
    }

    /// Lists, publishes, then watches and publishes after each batch until `cancel` fires;
    /// lists again whenever the watch breaks or the store fails.
    pub async fn run(self, cancel: CancellationToken) {
        hangar_store::mirror::mirror_prefix(
            self.store.as_ref(),
            ACME_PREFIX,
            cancel,
            |records, revision| self.publish(records, revision),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_store::embedded::EmbeddedStore;
    use std::time::Duration;

    const D: &str = "hangar.localhost";

    /// Waits for the feed to publish a snapshot with `n` challenges (failing after 10 s).
    async fn wait_len(rx: &mut watch::Receiver<Arc<AcmeSnapshot>>, n: usize) -> AcmeSnapshot {
        let wait = rx.wait_for(|s| s.challenges.len() == n);
        let snap = tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| panic!("the feed never published {n} challenges"))
            .unwrap();
        AcmeSnapshot::clone(&snap)
    }

    #[test]
    fn challenge_names() {
        let ok: &[(Option<&str>, &str)] = &[
            (None, "_acme-challenge.hangar.localhost"),
            (
                Some("_ACME-Challenge.Hangar.Localhost."),
                "_acme-challenge.hangar.localhost",
            ),
            (
                Some("_acme-challenge.api.hangar.localhost"),
                "_acme-challenge.api.hangar.localhost",
            ),
        ];
        for (input, want) in ok {
            assert_eq!(challenge_name(*input, D).unwrap(), *want, "{input:?}");
        }
        for bad in [
            "hangar.localhost",
            "_acme-challenge.example.com",
            "_acme-challengehangar.localhost",
            "www.hangar.localhost",
            "_acme-challenge.a_b.hangar.localhost",
            "_acme-challenge..hangar.localhost",
        ] {
            let err = challenge_name(Some(bad), D).unwrap_err();
            assert!(
                matches!(&err, ApiError::BadRequest(m) if m.contains("`name`")),
                "{bad}: {err}"
            );
        }
        assert!(check_value("gfj9Xq-Rp_Y3mCA+/=.").is_ok());
        for bad in ["", "has space", "quote\"", &"x".repeat(256)] {
            assert!(check_value(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn set_clear_and_feed() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = EmbeddedStore::open_default(dir.path().join("s.redb"))
            .await
            .unwrap();
        let feed = AcmeFeed::new(store.clone());
        let mut rx = feed.subscribe();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(feed.run(cancel.clone()));

        let set = |value: &str, name: Option<&str>| SetAcmeChallenge {
            value: value.into(),
            name: name.map(Into::into),
        };
        let (rec, created) = set_challenge(store.as_ref(), D, 1, set("one", None))
            .await
            .unwrap();
        assert!(created);
        assert_eq!(rec.name, "_acme-challenge.hangar.localhost");
        let (again, created) = set_challenge(store.as_ref(), D, 2, set("one", None))
            .await
            .unwrap();
        assert!(!created, "setting a value twice is a no-op");
        assert_eq!(again.created_at, 1);
        set_challenge(store.as_ref(), D, 3, set("two", None))
            .await
            .unwrap();
        set_challenge(
            store.as_ref(),
            D,
            4,
            set("one", Some("_acme-challenge.api.hangar.localhost")),
        )
        .await
        .unwrap();
        assert!(
            set_challenge(store.as_ref(), D, 5, set("x y", None))
                .await
                .is_err()
        );

        let pairs = |s: &AcmeSnapshot| -> Vec<(String, String)> {
            s.challenges
                .iter()
                .map(|c| (c.name.clone(), c.value.clone()))
                .collect()
        };
        let want = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let snap = wait_len(&mut rx, 3).await;
        assert_eq!(
            pairs(&snap),
            want(&[
                ("_acme-challenge.api.hangar.localhost", "one"),
                ("_acme-challenge.hangar.localhost", "one"),
                ("_acme-challenge.hangar.localhost", "two"),
            ])
        );
        assert_eq!(list_challenges(store.as_ref()).await.unwrap().len(), 3);

        // By value (every name), then everything.
        let n = clear_challenges(
            store.as_ref(),
            D,
            ClearAcmeChallenges {
                value: Some("one".into()),
                name: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(n, 2);
        let snap = wait_len(&mut rx, 1).await;
        assert_eq!(
            pairs(&snap),
            want(&[("_acme-challenge.hangar.localhost", "two")])
        );
        let n = clear_challenges(store.as_ref(), D, ClearAcmeChallenges::default())
            .await
            .unwrap();
        assert_eq!(n, 1);
        wait_len(&mut rx, 0).await;

        cancel.cancel();
        task.await.unwrap();
    }
}
