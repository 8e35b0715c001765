//! Token revocations. Each lives in the store under [`REVOCATIONS_PREFIX`], on a lease as long
//! as the token lifetime (after that every token it could match has expired anyway), and the
//! current set is published as one immutable snapshot that proxies check on every request.
//!
//! [`Revocations::follow`] (list, then watch the prefix) is the only writer of the snapshot;
//! [`Revocations::revoke`] only writes the store, so a revocation made through any instance
//! reaches every instance's proxies the same way.

use std::sync::Arc;

use hangar_core::BackendId;
use hangar_core::feed::Revocation;
use hangar_core::token::{TokenError, TokenKey, token_id};
use hangar_store::Store;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::SchedulerConfig;
use crate::error::ApiError;

/// Prefix of revocation records.
pub const REVOCATIONS_PREFIX: &str = "/hangar/revocations/";

/// Follows the set of revoked tokens.
pub type RevocationsRx = watch::Receiver<Arc<hangar_core::feed::Revocations>>;

/// `POST /v1/tokens/revoke`: one token, every token of a backend, or of a user on a backend.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

pub struct Revocations {
    store: Arc<dyn Store>,
    config: Arc<SchedulerConfig>,
    clock: Arc<dyn Clock>,
    token_key: TokenKey,
    current: watch::Sender<Arc<hangar_core::feed::Revocations>>,
}

impl Revocations {
    pub fn new(
        store: Arc<dyn Store>,
        config: Arc<SchedulerConfig>,
        clock: Arc<dyn Clock>,
        token_key: TokenKey,
    ) -> Self {
        Revocations {
            store,
            config,
            clock,
            token_key,
            current: watch::channel(Arc::default()).0,
        }
    }

    /// Follows the published set.
    pub fn subscribe(&self) -> RevocationsRx {
        self.current.subscribe()
    }

    /// Mirrors the store's revocations into the published set until `cancel` fires.
    pub(crate) async fn follow(&self, cancel: CancellationToken) {
        hangar_store::mirror::mirror_prefix::<Revocation>(
            self.store.as_ref(),
            REVOCATIONS_PREFIX,
            cancel,
            |items, _| {
                self.current
                    .send_replace(Arc::new(hangar_core::feed::Revocations::new(
                        items.values().cloned(),
                    )));
            },
        )
        .await
    }

    /// Stores a revocation; it reaches proxies through [`Revocations::follow`].
    pub async fn revoke(&self, req: RevokeRequest) -> Result<Revocation, ApiError> {
        let now_s = self.clock.now_ms() / 1000;
        let revocation = match (&req.token, &req.backend) {
            (Some(token), None) => {
                if req.user.is_some() {
                    return Err(ApiError::BadRequest(
                        "give either token, or backend with an optional user".into(),
                    ));
                }
                let backend = self.token_backend(token, now_s)?;
                let id = token_id(token).ok_or_else(|| {
                    ApiError::BadRequest("invalid field `token`: malformed".into())
                })?;
                Revocation::Token {
                    backend,
                    token_id: id.to_string(),
                }
            }
            (None, Some(b)) => {
                let backend = BackendId::parse(b)
                    .map_err(|e| ApiError::BadRequest(format!("invalid field `backend`: {e}")))?;
                match &req.user {
                    Some(u) => Revocation::User {
                        backend,
                        user: u.clone(),
                    },
                    None => Revocation::Backend { backend },
                }
            }
            _ => {
                return Err(ApiError::BadRequest(
                    "give either token, or backend with an optional user".into(),
                ));
            }
        };
        let value = serde_json::to_vec(&revocation).unwrap_or_default();
        let key = format!("{REVOCATIONS_PREFIX}{:x}", Sha256::digest(&value));
        let lease = self.store.lease_grant(self.config.token_ttl).await?;
        self.store.put(&key, value, Some(lease)).await?;
        tracing::info!(?revocation, "token revoked");
        Ok(revocation)
    }

    /// The backend a token names, if it is one of ours (expired tokens included).
    fn token_backend(&self, token: &str, now_s: u64) -> Result<BackendId, ApiError> {
        let claimed = hangar_core::token::peek_backend(token)
            .ok_or_else(|| ApiError::BadRequest("invalid field `token`: malformed".into()))?;
        match self.token_key.verify(token, &claimed, now_s) {
            Ok(_) | Err(TokenError::Expired) => BackendId::parse(&claimed)
                .map_err(|e| ApiError::BadRequest(format!("invalid field `token`: {e}"))),
            Err(e) => Err(ApiError::BadRequest(format!("invalid field `token`: {e}"))),
        }
    }
}
