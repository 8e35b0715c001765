//! The route feed a remote proxy follows (`GET /v1/routes/feed?from=<revision>`): a snapshot
//! or the deltas since the proxy's last revision, then deltas as routes change, plus the set
//! of revoked tokens. Sent as newline-delimited JSON.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::ids::BackendId;
use crate::route::Route;

/// One line of the feed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FeedMessage {
    /// Every route as of `revision` (replaces what the proxy had).
    Snapshot { revision: u64, routes: Vec<Route> },
    /// Changes from revision `from` to `revision`; apply only on top of `from`.
    Delta {
        from: u64,
        revision: u64,
        upserts: Vec<Route>,
        removals: Vec<BackendId>,
    },
    /// The current revocations (replaces the previous set).
    Revocations(Revocations),
    /// Sent when idle so both ends notice a dead connection.
    Ping { revision: u64 },
}

/// One revocation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Revocation {
    /// One token, by its id (see `token::token_id`).
    Token {
        backend: BackendId,
        token_id: String,
    },
    /// Every token of this user for this backend.
    User { backend: BackendId, user: String },
    /// Every token for this backend.
    Backend { backend: BackendId },
}

/// Revoked tokens, indexed by backend for a cheap check per request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    by_backend: HashMap<BackendId, HashSet<Revocation>>,
}

impl Revocations {
    pub fn new(items: impl IntoIterator<Item = Revocation>) -> Self {
        let mut by_backend: HashMap<BackendId, HashSet<Revocation>> = HashMap::new();
        for r in items {
            let b = match &r {
                Revocation::Token { backend, .. }
                | Revocation::User { backend, .. }
                | Revocation::Backend { backend } => backend.clone(),
            };
            by_backend.entry(b).or_default().insert(r);
        }
        Revocations { by_backend }
    }

    pub fn is_empty(&self) -> bool {
        self.by_backend.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_backend.values().map(HashSet::len).sum()
    }

    /// Whether a token (by id) of `user` for `backend` is revoked.
    pub fn is_revoked(&self, backend: &str, user: &str, token_id: &str) -> bool {
        let Some(set) = self.by_backend.get(backend) else {
            return false;
        };
        set.iter().any(|r| match r {
            Revocation::Token { token_id: t, .. } => t == token_id,
            Revocation::User { user: u, .. } => u == user,
            Revocation::Backend { .. } => true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_kinds() {
        let b = BackendId::parse("b1").unwrap();
        let set = Revocations::new([
            Revocation::Token {
                backend: b.clone(),
                token_id: "t1".into(),
            },
            Revocation::User {
                backend: b.clone(),
                user: "mallory".into(),
            },
        ]);
        assert!(set.is_revoked("b1", "alice", "t1"));
        assert!(!set.is_revoked("b1", "alice", "t2"));
        assert!(set.is_revoked("b1", "mallory", "t9"));
        assert!(!set.is_revoked("b2", "mallory", "t1"));
        let all = Revocations::new([Revocation::Backend { backend: b }]);
        assert!(all.is_revoked("b1", "anyone", "any"));
        assert_eq!(all.len(), 1);
    }
}
