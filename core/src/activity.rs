//! Activity reports: what the proxy tells the scheduler about traffic, for idle timeouts.

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
}

/// A batch of reports from one proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityBatch {
    pub proxy: String,
    pub reports: Vec<ActivityReport>,
}
