//! Signed access tokens: HMAC-SHA256 over backend id, user and expiry.
//!
//! Format: `v1.<base64url(payload)>.<base64url(mac)>` where the payload is
//! `<backend id>\n<user>\n<expiry, unix seconds>`. The proxy verifies a token with the shared
//! key and no call to the scheduler. The key is 32 random bytes, stored hex-encoded.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "v1.";
/// Longest token accepted before any decoding (defends against oversized inputs).
const MAX_TOKEN_LEN: usize = 1024;

/// The claims a token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The backend is not repeated here: `verify` has checked it is the one asked for.
    pub user: String,
    /// Expiry, in seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Whether `value` looks like a Hangar token (whoever's, valid or not): what a proxy must never
/// let reach a backend.
pub fn looks_like_token(value: &str) -> bool {
    starts_like_token(value.trim().trim_matches('"').as_bytes())
}

/// [`looks_like_token`] for an ASCII value, read in place without a UTF-8 check; the two agree
/// on ASCII values (each byte is the character `str::trim` tests).
pub fn looks_like_ascii_token(value: &[u8]) -> bool {
    let space = |c: &u8| char::from(*c).is_whitespace();
    starts_like_token(trim_by(trim_by(value, space), |c| *c == b'"'))
}

/// `v` without the leading and trailing bytes that match `f`.
fn trim_by(v: &[u8], f: impl Fn(&u8) -> bool) -> &[u8] {
    let start = v.iter().position(|c| !f(c)).unwrap_or(v.len());
    let end = v.iter().rposition(|c| !f(c)).map_or(start, |i| i + 1);
    &v[start..end]
}

fn starts_like_token(v: &[u8]) -> bool {
    // Bytes, not a `str` slice: a multi-byte character across the prefix's end used to
    // panic (found by fuzzing).
    v.len() > PREFIX.len() && v[..PREFIX.len()].eq_ignore_ascii_case(PREFIX.as_bytes())
}

/// The backend a token's payload names, without verifying anything: only for choosing which
/// backend to verify it against.
pub fn peek_backend(token: &str) -> Option<String> {
    let (payload, _) = token.strip_prefix(PREFIX)?.split_once('.')?;
    let bytes = B64.decode(payload).ok()?;
    let s = String::from_utf8(bytes).ok()?;
    s.split('\n').next().map(str::to_string)
}

/// The part of a token that names it uniquely (its signature, base64url), used to revoke one
/// token. `None` if it is not shaped like a token.
pub fn token_id(token: &str) -> Option<&str> {
    token
        .strip_prefix(PREFIX)?
        .split_once('.')
        .map(|(_, tag)| tag)
}

/// Why a token was refused. Each variant becomes a distinct 401 message in the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "no token: send it as 'Authorization: Bearer <token>', a hangar_token query parameter or a hangar-token cookie"
    )]
    Missing,
    #[error("malformed token: it is not a Hangar token; use the token returned by /v1/connect")]
    Malformed,
    #[error("forged token: its signature does not verify")]
    BadSignature,
    #[error("expired token: ask /v1/connect for a new one")]
    Expired,
    #[error("token is for another backend")]
    WrongBackend,
    #[error("revoked token: access was revoked; ask /v1/connect for a new one if allowed")]
    Revoked,
}

/// Why a token key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenKeyError {
    #[error("token key must be 64 hexadecimal characters (32 bytes), got {0} characters")]
    BadLength(usize),
    #[error("token key must be hexadecimal")]
    NotHex,
}

/// A token signing and verification key. Clone is cheap enough (a keyed HMAC state).
#[derive(Clone)]
pub struct TokenKey {
    mac: HmacSha256,
    raw: [u8; 32],
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    pub fn from_bytes(raw: [u8; 32]) -> Self {
        let mac = HmacSha256::new_from_slice(&raw).expect("HMAC takes keys of any length");
        TokenKey { mac, raw }
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        Self::from_bytes(raw)
    }

    /// Parses a 64-character hex key (surrounding whitespace is ignored).
    pub fn from_hex(s: &str) -> Result<Self, TokenKeyError> {
        let s = s.trim();
        if s.len() != 64 {
            return Err(TokenKeyError::BadLength(s.len()));
        }
        let mut raw = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            // Digits only: `u8::from_str_radix` also takes a sign (`+f`), which let a key
            // that is not hexadecimal load as another key (found by fuzzing).
            if !chunk.iter().all(u8::is_ascii_hexdigit) {
                return Err(TokenKeyError::NotHex);
            }
            let hex = std::str::from_utf8(chunk).map_err(|_| TokenKeyError::NotHex)?;
            raw[i] = u8::from_str_radix(hex, 16).map_err(|_| TokenKeyError::NotHex)?;
        }
        Ok(Self::from_bytes(raw))
    }

    pub fn to_hex(&self) -> String {
        self.raw.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Signs a token for `backend` and `user` that expires at `expires_at` (unix seconds).
    pub fn sign(&self, backend: &str, user: &str, expires_at: u64) -> String {
        let payload = format!("{backend}\n{user}\n{expires_at}");
        let mut mac = self.mac.clone();
        mac.update(payload.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!("{PREFIX}{}.{}", B64.encode(payload), B64.encode(tag))
    }

    /// Verifies `token` for `backend` at time `now` (unix seconds) and returns its claims.
    /// The signature is checked before anything in the payload is trusted, in constant time.
    pub fn verify(&self, token: &str, backend: &str, now: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let (payload_b64, tag_b64) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        let mut payload = [0u8; MAX_TOKEN_LEN];
        let n = B64
            .decode_slice(payload_b64, &mut payload)
            .map_err(|_| TokenError::Malformed)?;
        let payload = &payload[..n];
        let mut tag = [0u8; 64];
        let tn = B64
            .decode_slice(tag_b64, &mut tag)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac.clone();
        mac.update(payload);
        mac.verify_slice(&tag[..tn])
            .map_err(|_| TokenError::BadSignature)?;
        let payload = std::str::from_utf8(payload).map_err(|_| TokenError::Malformed)?;
        let mut parts = payload.splitn(3, '\n');
        let (Some(b), Some(u), Some(e)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed);
        };
        let expires_at: u64 = e.parse().map_err(|_| TokenError::Malformed)?;
        if b != backend {
            return Err(TokenError::WrongBackend);
        }
        if now >= expires_at {
            return Err(TokenError::Expired);
        }
        Ok(Claims {
            user: u.to_string(),
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify() {
        let k = TokenKey::generate();
        let t = k.sign("b1", "alice", 1000);
        let c = k.verify(&t, "b1", 999).unwrap();
        assert_eq!(c.user, "alice");
        assert_eq!(c.expires_at, 1000);
    }

    #[test]
    fn refusals_name_their_cause() {
        let k = TokenKey::generate();
        let other = TokenKey::generate();
        let t = k.sign("b1", "alice", 1000);
        assert_eq!(k.verify(&t, "b1", 1000), Err(TokenError::Expired));
        assert_eq!(k.verify(&t, "b2", 10), Err(TokenError::WrongBackend));
        assert_eq!(other.verify(&t, "b1", 10), Err(TokenError::BadSignature));
        assert_eq!(k.verify("garbage", "b1", 10), Err(TokenError::Malformed));
        assert_eq!(k.verify("v1.!!!.abc", "b1", 10), Err(TokenError::Malformed));
        assert_eq!(
            k.verify(&"v1.".repeat(500), "b1", 10),
            Err(TokenError::Malformed)
        );
        // Tampering with the payload (another backend, longer expiry) breaks the signature.
        let forged_payload = B64.encode("b1\nalice\n999999");
        let tag = t.rsplit('.').next().unwrap();
        let forged = format!("v1.{forged_payload}.{tag}");
        assert_eq!(k.verify(&forged, "b1", 10), Err(TokenError::BadSignature));
    }

    /// Found by fuzzing (`fuzz/artifacts/token/`): a multi-byte character across the end of
    /// the `v1.` prefix panicked, and the proxy asks this of every `Authorization` value.
    #[test]
    fn a_multibyte_character_across_the_prefix_is_not_a_token() {
        for value in ["v\u{fffd}.YWJj.x", "ab\u{e9}cd", "\u{10348}", "\"v\u{e9}"] {
            assert!(!looks_like_token(value), "{value:?}");
        }
        assert!(looks_like_token(" \"V1.\u{e9}\" "));
        assert!(!looks_like_token("v1."));
    }

    #[test]
    fn ids_and_peeking() {
        let k = TokenKey::generate();
        let t = k.sign("b7", "u", 5);
        assert_eq!(peek_backend(&t).as_deref(), Some("b7"));
        assert_eq!(token_id(&t), t.rsplit('.').next());
        assert_eq!(peek_backend("nope"), None);
        assert_eq!(token_id("nope"), None);
    }

    #[test]
    fn key_hex_round_trip() {
        let k = TokenKey::generate();
        let k2 = TokenKey::from_hex(&k.to_hex()).unwrap();
        let t = k.sign("b", "u", 5);
        assert!(k2.verify(&t, "b", 1).is_ok());
        assert_eq!(
            TokenKey::from_hex("abc").unwrap_err(),
            TokenKeyError::BadLength(3)
        );
        assert_eq!(
            TokenKey::from_hex(&"zz".repeat(32)).unwrap_err(),
            TokenKeyError::NotHex
        );
        // Found by fuzzing (`fuzz/artifacts/token/`): a sign is not a hex digit.
        for signed in [
            "+f".repeat(32),
            format!("0f{}", "+f".repeat(31)),
            "-1".repeat(32),
        ] {
            assert_eq!(
                TokenKey::from_hex(&signed).unwrap_err(),
                TokenKeyError::NotHex,
                "{signed}"
            );
        }
    }
}
