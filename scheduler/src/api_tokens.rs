//! API tokens: who may call the API, and what for.
//!
//! A token is `hgr_<id>_<secret>`. The store keeps, under `/hangar/tokens/<id>`, its scope,
//! optional namespace and expiry and the SHA-256 of the secret (never the secret itself);
//! every instance mirrors the records and checks a presented token against them in constant
//! time, so a token works on every instance and a revoked one (its record deleted) stops
//! working on this instance at once and on the others as soon as they see the deletion.
//!
//! Scopes: `admin` (everything), `connect` (connect, and the status, events and termination
//! of its own backends: those of its namespace, or those it created when it has none; what an
//! application server holds), `read` (lists, status, events, hot, cluster), `drone` (join the
//! cluster as a drone, nothing else) and `proxy` (a remote proxy's route feed and activity
//! reports, nothing else).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use hangar_core::UnixMillis;
use hangar_store::Store;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::error::ApiError;

/// Prefix of token records.
pub const TOKENS_PREFIX: &str = "/hangar/tokens/";
/// What every token starts with (so that a leaked one is recognisable, e.g. by secret scanners).
const TOKEN_PREFIX: &str = "hgr_";

/// What a token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Admin,
    Connect,
    Read,
    Drone,
    Proxy,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Connect => "connect",
            Scope::Read => "read",
            Scope::Drone => "drone",
            Scope::Proxy => "proxy",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Scope::Admin),
            "connect" => Ok(Scope::Connect),
            "read" => Ok(Scope::Read),
            "drone" => Ok(Scope::Drone),
            "proxy" => Ok(Scope::Proxy),
            other => Err(format!(
                "unknown scope {other:?}: use admin, connect, read, drone or proxy"
            )),
        }
    }
}

/// A stored token (without its secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub scope: Scope,
    /// Only keys of this namespace (connect tokens).
    #[serde(default)]
    pub namespace: Option<String>,
    pub created_at: UnixMillis,
    #[serde(default)]
    pub expires_at: Option<UnixMillis>,
    #[serde(default)]
    pub description: Option<String>,
    /// SHA-256 of the secret part, hex.
    pub secret_sha256: String,
}

/// Who is calling: what the presented credential allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The API is open (`hangar dev` on loopback): everything is allowed.
    Open,
    /// The cluster secret (`--drone-secret`): instances, drones and remote proxies.
    Cluster,
    /// An API token.
    Token {
        id: String,
        scope: Scope,
        namespace: Option<String>,
    },
}

impl Caller {
    /// Whether the caller may do what `scope` allows.
    pub fn has(&self, scope: Scope) -> bool {
        match self {
            Caller::Open => true,
            Caller::Cluster => matches!(scope, Scope::Drone | Scope::Proxy),
            Caller::Token { scope: s, .. } => *s == Scope::Admin || *s == scope,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.has(Scope::Admin)
    }

    /// Refuses with 403 naming the missing scope.
    pub fn require(&self, scope: Scope, what: &str) -> Result<(), ApiError> {
        if self.has(scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "{what} needs a token with the {scope} scope (or admin); this one has {}",
                self.describe()
            )))
        }
    }

    /// The caller's scope, as an error message says it.
    pub fn describe(&self) -> String {
        match self {
            Caller::Open => "an open API".into(),
            Caller::Cluster => "the cluster secret (drones and proxies only)".into(),
            Caller::Token {
                scope,
                namespace: Some(ns),
                ..
            } => format!("the {scope} scope for namespace {ns:?}"),
            Caller::Token { scope, .. } => format!("the {scope} scope"),
        }
    }

    /// The token id, for records of what a token created.
    pub fn token_id(&self) -> Option<&str> {
        match self {
            Caller::Token { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// A token as `hangar token create` shows it once: the whole secret and its record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreatedToken {
    pub token: String,
    #[serde(flatten)]
    pub record: TokenView,
}

/// A token record as the API lists it (no hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub scope: Scope,
    pub namespace: Option<String>,
    pub created_at: UnixMillis,
    pub expires_at: Option<UnixMillis>,
    pub description: Option<String>,
}

impl From<&TokenRecord> for TokenView {
    fn from(r: &TokenRecord) -> Self {
        TokenView {
            id: r.id.clone(),
            scope: r.scope,
            namespace: r.namespace.clone(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            description: r.description.clone(),
        }
    }
}

/// `POST /v1/tokens`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    pub scope: Option<Scope>,
    #[serde(default)]
    pub namespace: Option<String>,
    /// Seconds until it expires (none: it does not).
    #[serde(default)]
    pub ttl_s: Option<u64>,
    #[serde(default)]
    pub description: Option<String>,
}

fn sha256_hex(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Splits `hgr_<id>_<secret>` into id and secret (both non-empty; the id has no `_`).
/// Public for the fuzz target (`hangar_scheduler::fuzzing`); nothing is verified here.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// The token records, mirrored from the store; the only writer of them.
pub struct ApiTokens {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    /// By id. A std lock: held for a map lookup, never across `.await`.
    records: RwLock<HashMap<String, TokenRecord>>,
}

impl ApiTokens {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        ApiTokens {
            store,
            clock,
            records: RwLock::default(),
        }
    }

    /// The caller a bearer token names, if it is a live token.
    pub fn verify(&self, token: &str) -> Option<Caller> {
        let (id, secret) = parse(token)?;
        let records = self.records.read().unwrap_or_else(|e| e.into_inner());
        let rec = records.get(id)?;
        let hash = sha256_hex(secret);
        if !bool::from(hash.as_bytes().ct_eq(rec.secret_sha256.as_bytes())) {
            return None;
        }
        if rec.expires_at.is_some_and(|at| self.clock.now_ms() >= at) {
            return None;
        }
        Some(Caller::Token {
            id: rec.id.clone(),
            scope: rec.scope,
            namespace: rec.namespace.clone(),
        })
    }

    /// Creates a token; its secret is in the answer only.
    pub async fn create(&self, req: CreateTokenRequest) -> Result<CreatedToken, ApiError> {
        let scope = req.scope.ok_or_else(|| {
            ApiError::BadRequest(
                "scope is missing: give one of admin, connect, read, drone or proxy".into(),
            )
        })?;
        if let Some(ns) = &req.namespace {
            hangar_core::ids::validate_label(ns).map_err(|_| {
                ApiError::BadRequest(format!(
                    "namespace {ns:?} must be lowercase letters, digits and '-' (at most 63)"
                ))
            })?;
            if scope != Scope::Connect {
                return Err(ApiError::BadRequest(
                    "only connect tokens are bound to a namespace".into(),
                ));
            }
        }
        if req.ttl_s == Some(0) {
            return Err(ApiError::BadRequest(
                "ttl_s must be at least 1 (omit it for a token that does not expire)".into(),
            ));
        }
        if req.description.as_ref().is_some_and(|d| d.len() > 200) {
            return Err(ApiError::BadRequest(
                "description must be at most 200 characters".into(),
            ));
        }
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let id = hangar_core::BackendId::generate().to_string();
        let now = self.clock.now_ms();
        let record = TokenRecord {
            id: id.clone(),
            scope,
            namespace: req.namespace,
            created_at: now,
            expires_at: req
                .ttl_s
                .map(|s| now.saturating_add(s.saturating_mul(1000))),
            description: req.description,
            secret_sha256: sha256_hex(&secret),
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        self.store
            .put(&format!("{TOKENS_PREFIX}{id}"), value, None)
            .await?;
        self.records
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), record.clone());
        Ok(CreatedToken {
            token: format!("{TOKEN_PREFIX}{id}_{secret}"),
            record: TokenView::from(&record),
        })
    }

    /// Every token, oldest first.
    pub fn list(&self) -> Vec<TokenView> {
        let mut v: Vec<TokenView> = self
            .records
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(TokenView::from)
            .collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    /// Whether an admin token exists (live, not expired).
    pub async fn has_admin(&self) -> Result<bool, ApiError> {
        let now = self.clock.now_ms();
        let listing = self.store.list(TOKENS_PREFIX).await?;
        Ok(listing.kvs.iter().any(|kv| {
            serde_json::from_slice::<TokenRecord>(&kv.value)
                .is_ok_and(|r| r.scope == Scope::Admin && r.expires_at.is_none_or(|at| at > now))
        }))
    }

    /// Revokes token `id`: it stops working here at once.
    pub async fn revoke(&self, id: &str) -> Result<TokenView, ApiError> {
        let key = format!("{TOKENS_PREFIX}{id}");
        let Some(kv) = self.store.get(&key).await? else {
            return Err(ApiError::NotFound(format!(
                "no token {id}: see `hangar token ls`"
            )));
        };
        let record: TokenRecord = serde_json::from_slice(&kv.value)
            .map_err(|e| ApiError::Internal(format!("token record {id} is unreadable: {e}")))?;
        self.store.delete(&key).await?;
        self.records
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        Ok(TokenView::from(&record))
    }

    /// Mirrors the token records until `cancel` fires.
    pub async fn follow(&self, cancel: CancellationToken) {
        hangar_store::mirror::mirror_prefix::<TokenRecord>(
            self.store.as_ref(),
            TOKENS_PREFIX,
            cancel,
            |records: &BTreeMap<String, TokenRecord>, _| {
                let by_id = records
                    .values()
                    .map(|r| (r.id.clone(), r.clone()))
                    .collect();
                *self.records.write().unwrap_or_else(|e| e.into_inner()) = by_id;
            },
        )
        .await
    }

    /// Reads the records once (before serving, so that tokens work from the first request).
    pub async fn load(&self) -> Result<(), ApiError> {
        let listing = self.store.list(TOKENS_PREFIX).await?;
        let by_id = listing
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<TokenRecord>(&kv.value).ok())
            .map(|r| (r.id.clone(), r))
            .collect();
        *self.records.write().unwrap_or_else(|e| e.into_inner()) = by_id;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;
    use hangar_store::embedded::EmbeddedStore;

    #[tokio::test]
    async fn tokens_verify_expire_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_default(dir.path().join("s.redb"))
            .await
            .unwrap();
        let clock = Arc::new(ManualClock::new(1_000));
        let tokens = ApiTokens::new(store.clone(), clock.clone());
        let admin = tokens
            .create(CreateTokenRequest {
                scope: Some(Scope::Admin),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(admin.token.starts_with("hgr_"));
        let caller = tokens.verify(&admin.token).unwrap();
        assert!(caller.is_admin());
        // A wrong secret, a wrong id, garbage: nothing.
        // (The last hex digit changed to another: a fixed `0` failed one run in sixteen.)
        let last = if admin.token.ends_with('0') { '1' } else { '0' };
        let wrong = format!("{}{last}", &admin.token[..admin.token.len() - 1]);
        assert_ne!(wrong, admin.token);
        assert!(tokens.verify(&wrong).is_none());
        assert!(tokens.verify("hgr_nope_secret").is_none());
        assert!(tokens.verify("Bearer x").is_none());
        // The store has the hash, not the secret.
        let stored = store.list(TOKENS_PREFIX).await.unwrap();
        let secret = admin.token.rsplit('_').next().unwrap();
        assert!(
            !String::from_utf8_lossy(&stored.kvs[0].value).contains(secret),
            "the secret is not stored"
        );

        let connect = tokens
            .create(CreateTokenRequest {
                scope: Some(Scope::Connect),
                namespace: Some("team-a".into()),
                ttl_s: Some(60),
                ..Default::default()
            })
            .await
            .unwrap();
        let c = tokens.verify(&connect.token).unwrap();
        assert!(c.has(Scope::Connect) && !c.has(Scope::Read) && !c.is_admin());
        let err = c.require(Scope::Admin, "draining a drone").unwrap_err();
        assert_eq!(err.status(), http::StatusCode::FORBIDDEN);
        assert!(err.to_string().contains("admin scope"), "{err}");
        clock.advance_ms(60_000);
        assert!(tokens.verify(&connect.token).is_none(), "expired");

        // Another instance sees the token through the store; a revocation is immediate here.
        let other = ApiTokens::new(store.clone(), clock.clone());
        other.load().await.unwrap();
        assert!(other.verify(&admin.token).is_some());
        tokens.revoke(&admin.record.id).await.unwrap();
        assert!(tokens.verify(&admin.token).is_none());
        let err = tokens.revoke(&admin.record.id).await.unwrap_err();
        assert_eq!(err.status(), http::StatusCode::NOT_FOUND);
        assert!(!tokens.has_admin().await.unwrap());

        for bad in [
            CreateTokenRequest::default(),
            CreateTokenRequest {
                scope: Some(Scope::Read),
                namespace: Some("team-a".into()),
                ..Default::default()
            },
            CreateTokenRequest {
                scope: Some(Scope::Connect),
                namespace: Some("Team A".into()),
                ..Default::default()
            },
            CreateTokenRequest {
                scope: Some(Scope::Read),
                ttl_s: Some(0),
                ..Default::default()
            },
        ] {
            let err = tokens.create(bad).await.unwrap_err();
            assert_eq!(err.status(), http::StatusCode::BAD_REQUEST, "{err}");
        }
    }
}
