//! Leader election with fencing, through the `Store` trait (so the embedded store runs the
//! same code: its one instance is always the leader).
//!
//! An instance campaigns by creating [`LEADER_KEY`] on a lease of its own (create-if-absent in
//! one transaction). The key's create revision is the **fencing token**: every leader write
//! compares it in the same transaction (`Compare::create_revision`), so a deposed leader's
//! writes fail with [`crate::ApiError::Fenced`] however late they arrive. The leader renews
//! its lease every third of the TTL and steps down locally at its renew deadline, the TTL after
//! the *send time* of the last acknowledged renewal (the lease cannot have outlived that);
//! stepping down cancels every leader task and waits for them before campaigning again. A
//! graceful shutdown revokes the lease, so the next instance is elected at once.
//!
//! Leader only: the reconciler, placement (connect), drone-loss handling and hot relief.

use std::sync::Arc;
use std::time::Duration;

use hangar_core::UnixMillis;
use hangar_store::{Compare, LeaseId, Revision, Store, StoreError, TxnOp, TxnOutcome, WatchEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;

/// The leader key: present while an instance leads, attached to its lease.
pub const LEADER_KEY: &str = "/hangar/leader";

/// Prefix of instance records: every instance keeps one on a lease while it runs.
pub const INSTANCES_PREFIX: &str = "/hangar/instances/";

/// How long to wait before campaigning again after the store failed.
const RETRY: Duration = Duration::from_millis(500);

/// What the leader key holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The instance that leads.
    pub instance: String,
    /// Its API, where writes are forwarded.
    pub api_url: String,
    pub elected_at: UnixMillis,
}

/// This instance's part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not leading; the leader, if one is known.
    Follower { leader: Option<LeaderRecord> },
    /// Leading, with this fencing token (the leader key's create revision).
    Leader { token: Revision },
}

/// A term of leadership: the token its writes carry, and the token that ends its tasks.
#[derive(Clone, Debug)]
pub struct Term {
    pub token: Revision,
    pub cancel: CancellationToken,
}

/// Starts the leader-only tasks of a term on `tasks`.
pub type LeaderTasks = Box<dyn Fn(&Term, &TaskTracker) + Send + Sync>;

pub struct Leadership {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    instance: String,
    api_url: String,
    ttl: Duration,
    role: watch::Sender<Role>,
}

impl Leadership {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        instance: String,
        api_url: String,
        ttl: Duration,
    ) -> Self {
        Leadership {
            store,
            clock,
            instance,
            api_url,
            ttl,
            role: watch::channel(Role::Follower { leader: None }).0,
        }
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// The fencing token, while this instance leads.
    pub fn token(&self) -> Option<Revision> {
        match *self.role.borrow() {
            Role::Leader { token } => Some(token),
            Role::Follower { .. } => None,
        }
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Keeps this instance's record (`/hangar/instances/<id>`, on a lease of the leader TTL)
    /// until `cancel` fires, writing it again whenever its lease is lost.
    pub(crate) async fn announce(&self, cancel: CancellationToken) {
        let key = format!("{INSTANCES_PREFIX}{}", self.instance);
        let record = LeaderRecord {
            instance: self.instance.clone(),
            api_url: self.api_url.clone(),
            elected_at: self.clock.now_ms(),
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let mut lease: Option<LeaseId> = None;
        loop {
            let ok = match lease {
                Some(l) => self.store.lease_keep_alive(l).await.is_ok(),
                None => match self.store.lease_grant(self.ttl).await {
                    Ok(l) => {
                        let put = self.store.put(&key, value.clone(), Some(l)).await.is_ok();
                        if put {
                            lease = Some(l);
                        }
                        put
                    }
                    Err(_) => false,
                },
            };
            if !ok {
                lease = None;
            }
            let wait = if ok { self.ttl / 3 } else { RETRY };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(l) = lease {
            let _ = self.store.lease_revoke(l).await;
        }
    }

    /// One attempt at leadership. `Ok(Some)` with the lease and token when elected; `Ok(None)`
    /// when another instance leads (the role names it). A leader key this instance left
    /// behind (a restart on the same data directory, its old lease still alive) is removed
    /// first: that process is gone.
    pub(crate) async fn campaign(&self) -> Result<Option<(LeaseId, Revision)>, StoreError> {
        if let Some(kv) = self.store.get(LEADER_KEY).await? {
            let held: Option<LeaderRecord> = serde_json::from_slice(&kv.value).ok();
            match held {
                Some(r) if r.instance == self.instance => {
                    self.store
                        .delete_if_revision(LEADER_KEY, kv.mod_revision)
                        .await?;
                }
                leader => {
                    self.role.send_replace(Role::Follower { leader });
                    return Ok(None);
                }
            }
        }
        let lease = self.store.lease_grant(self.ttl).await?;
        let record = LeaderRecord {
            instance: self.instance.clone(),
            api_url: self.api_url.clone(),
            elected_at: self.clock.now_ms(),
        };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        match self
            .store
            .txn(
                vec![Compare::absent(LEADER_KEY)],
                vec![TxnOp::put(LEADER_KEY, value, Some(lease))],
            )
            .await?
        {
            TxnOutcome::Committed(revision) => {
                self.role.send_replace(Role::Leader { token: revision });
                tracing::info!(instance = %self.instance, token = revision, "elected leader");
                Ok(Some((lease, revision)))
            }
            TxnOutcome::Failed { current, .. } => {
                let _ = self.store.lease_revoke(lease).await;
                let leader = current.and_then(|kv| serde_json::from_slice(&kv.value).ok());
                self.role.send_replace(Role::Follower { leader });
                Ok(None)
            }
        }
    }

    /// Campaigns, leads and follows until `cancel` fires. `elected` is the outcome of a first
    /// campaign the caller already ran (so a single instance leads before it serves).
    pub(crate) async fn run(
        self: Arc<Self>,
        mut elected: Option<(LeaseId, Revision)>,
        leader_tasks: LeaderTasks,
        cancel: CancellationToken,
    ) {
        loop {
            if let Some((lease, token)) = elected.take() {
                self.lead(lease, token, &leader_tasks, &cancel).await;
            } else if !self.follow_until_vacant(&cancel).await {
                return;
            }
            if cancel.is_cancelled() {
                return;
            }
            elected = match self.campaign().await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot campaign for leadership; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => None,
                    }
                }
            };
        }
    }

    /// Leads one term: starts the leader tasks, renews the lease, and steps down at the renew
    /// deadline, on a lost lease, or at shutdown (revoking the lease then).
    async fn lead(
        &self,
        lease: LeaseId,
        token: Revision,
        leader_tasks: &LeaderTasks,
        cancel: &CancellationToken,
    ) {
        let term = Term {
            token,
            cancel: cancel.child_token(),
        };
        let tasks = TaskTracker::new();
        leader_tasks(&term, &tasks);
        tasks.close();
        let mut acked_sent = Instant::now();
        let why = loop {
            let deadline = acked_sent + self.ttl;
            let next = (Instant::now() + self.ttl / 3).min(deadline);
            tokio::select! {
                _ = cancel.cancelled() => break "shutting down",
                _ = tokio::time::sleep_until(next) => {}
            }
            if Instant::now() >= deadline {
                break "no lease renewal acknowledged in time";
            }
            let sent = Instant::now();
            let renewal = tokio::select! {
                _ = cancel.cancelled() => break "shutting down",
                r = tokio::time::timeout_at(deadline, self.store.lease_keep_alive(lease)) => r,
            };
            match renewal {
                Ok(Ok(())) => acked_sent = sent,
                Ok(Err(StoreError::LeaseNotFound(_))) => break "its lease expired",
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew the leader lease"),
                Err(_) => break "no lease renewal acknowledged in time",
            }
        };
        // Step down: no leader task may run (or write: its token is fenced anyway) past here.
        self.role.send_replace(Role::Follower { leader: None });
        term.cancel.cancel();
        tasks.wait().await;
        if cancel.is_cancelled() {
            // A planned handoff: the next instance is elected at once.
            let _ = self.store.lease_revoke(lease).await;
        }
        tracing::warn!(instance = %self.instance, token, why, "stepped down as leader");
    }

    /// Watches the leader key until it is gone (then campaign) or `cancel` fires (`false`).
    async fn follow_until_vacant(&self, cancel: &CancellationToken) -> bool {
        loop {
            let from = match self.store.get(LEADER_KEY).await {
                Ok(None) => return true,
                Ok(Some(kv)) => {
                    let leader = serde_json::from_slice(&kv.value).ok();
                    self.role.send_replace(Role::Follower { leader });
                    kv.mod_revision + 1
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the leader key; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return false,
                        _ = tokio::time::sleep(RETRY) => continue,
                    }
                }
            };
            let mut events = match self.store.watch(LEADER_KEY, from).await {
                Ok(w) => w,
                Err(_) => continue,
            };
            loop {
                let ev = tokio::select! {
                    _ = cancel.cancelled() => return false,
                    ev = events.recv() => ev,
                };
                match ev {
                    Some(WatchEvent::Delete { key, .. }) if key == LEADER_KEY => return true,
                    Some(WatchEvent::Put(kv)) if kv.key == LEADER_KEY => {
                        let leader = serde_json::from_slice(&kv.value).ok();
                        self.role.send_replace(Role::Follower { leader });
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }
    }
}
