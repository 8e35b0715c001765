//! Tokens this proxy has verified recently. A client sends the same token on every request of
//! a session, so the HMAC check (about 300 ns) is done once per token and later requests only
//! compare strings.
//!
//! An entry is the whole token string with the backend it was verified for, its user and its
//! expiry: a hit needs the identical token (signature included), for the same backend, before
//! it expires, so a forged or altered token never matches one; it takes the full check and
//! fails there. Revocation is checked on every request after this lookup, hit or miss. The
//! cache is direct-mapped (a slot per hash of the signature, a collision replaces the entry),
//! so its size is fixed and a lookup takes one uncontended lock.

use std::sync::{Arc, Mutex};

use hangar_core::BackendId;

/// Slots in the cache (a power of two). About 150 bytes each when filled.
const SLOTS: usize = 1024;

struct Entry {
    token: Box<str>,
    backend: BackendId,
    user: Arc<str>,
    expires_at: u64,
}

pub(crate) struct VerifiedTokens {
    slots: Box<[Mutex<Option<Entry>>]>,
}

impl Default for VerifiedTokens {
    fn default() -> Self {
        VerifiedTokens {
            slots: (0..SLOTS).map(|_| Mutex::new(None)).collect(),
        }
    }
}

/// The slot of a token: FNV-1a over its last 16 bytes (the end of its HMAC signature, which is
/// uniformly distributed for real tokens).
fn slot_of(token: &[u8]) -> usize {
    let tail = &token[token.len().saturating_sub(16)..];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in tail {
        h ^= u64::from(x);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h as usize) & (SLOTS - 1)
}

impl VerifiedTokens {
    /// The user of `token` (its bytes: a request's value need not be read as text first) if
    /// it was verified for `backend` and has not expired at `now`.
    pub(crate) fn get(&self, token: &[u8], backend: &BackendId, now: u64) -> Option<Arc<str>> {
        let slot = self.slots[slot_of(token)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some(e)
                if now < e.expires_at && e.token.as_bytes() == token && e.backend == *backend =>
            {
                Some(e.user.clone())
            }
            _ => None,
        }
    }

    /// Remembers a token that has just been verified.
    pub(crate) fn insert(&self, token: &str, backend: &BackendId, user: Arc<str>, expires_at: u64) {
        let entry = Entry {
            token: token.into(),
            backend: backend.clone(),
            user,
            expires_at,
        };
        *self.slots[slot_of(token.as_bytes())]
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_core::token::TokenKey;

    #[test]
    fn only_the_same_token_for_the_same_backend_before_expiry_hits() {
        let key = TokenKey::generate();
        let cache = VerifiedTokens::default();
        let b1 = BackendId::parse("b1").unwrap();
        let b2 = BackendId::parse("b2").unwrap();
        let token = key.sign("b1", "alice", 1000);
        assert!(
            cache.get(token.as_bytes(), &b1, 10).is_none(),
            "nothing verified yet"
        );
        cache.insert(&token, &b1, "alice".into(), 1000);
        assert_eq!(
            cache.get(token.as_bytes(), &b1, 999).as_deref(),
            Some("alice")
        );
        assert!(cache.get(token.as_bytes(), &b1, 1000).is_none(), "expired");
        assert!(
            cache.get(token.as_bytes(), &b2, 10).is_none(),
            "other backend"
        );
        // The same payload with one signature character changed lands in another slot or
        // fails the comparison: it never hits.
        let mut forged = token.clone().into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(cache.get(forged.as_bytes(), &b1, 10).is_none());
        // Another token for the same slot replaces the entry.
        let other = key.sign("b1", "bob", 1000);
        cache.insert(&other, &b1, "bob".into(), 1000);
        assert_eq!(cache.get(other.as_bytes(), &b1, 10).as_deref(), Some("bob"));
    }
}
