//! Activity reports: what the proxy tells the scheduler about traffic, for idle timeouts and
//! hot-shard detection.

use serde::{Deserialize, Serialize};

use crate::UnixMillis;
use crate::ids::BackendId;

/// One backend's traffic as one proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityReport {
    pub backend: BackendId,
    /// When the last request started or the last upgraded connection closed.
    pub last_active: UnixMillis,
    /// Requests in flight plus open upgraded connections (WebSockets) right now.
    pub open: u64,
    /// Requests this proxy has forwarded to the backend since it started: a cumulative
    /// counter (like a Prometheus counter, it restarts at zero with the proxy), from which the
    /// scheduler derives request rates for hot-shard detection.
    #[serde(default)]
    pub requests: u64,
    /// Requests this proxy has answered for the backend (their durations are in
    /// `duration_us_total`): cumulative, like `requests`.
    #[serde(default)]
    pub answered: u64,
    /// The summed durations of the answered requests, in microseconds: cumulative, from which
    /// the scheduler derives mean latencies (`GET /v1/backends/{id}/traffic`).
    #[serde(default)]
    pub duration_us_total: u64,
}

/// A batch of reports from one proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityBatch {
    pub proxy: String,
    pub reports: Vec<ActivityReport>,
}
