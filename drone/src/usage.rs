//! Usage collection: on a period, reads the CPU time and memory of every backend from the
//! runtime ([`Runtime::usage`]: Docker's one-shot stats, or `/proc` for processes) and hands
//! the report on: over the session to the scheduler for a network drone, or straight to the
//! scheduler in `hangar dev`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::drone::BackendUsage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::runtime::Runtime;

/// Seconds one collection took (all backends of the drone).
pub const USAGE_COLLECT_SECONDS: &str = "hangar_agent_usage_collect_seconds";
/// Backends measured by the last collection.
pub const USAGE_BACKENDS: &str = "hangar_agent_usage_backends";

/// Describes the collector's metrics to the installed recorder.
pub fn describe() {
    metrics::describe_histogram!(
        USAGE_COLLECT_SECONDS,
        "Seconds the drone took to read the CPU and memory use of all its backends once."
    );
    metrics::describe_gauge!(
        USAGE_BACKENDS,
        "Backends whose usage the drone's last collection read."
    );
}

/// Reads every backend's usage on a period.
pub struct UsageCollector {
    runtime: Arc<dyn Runtime>,
    interval: Duration,
}

impl UsageCollector {
    pub fn new(runtime: Arc<dyn Runtime>, interval: Duration) -> Self {
        UsageCollector {
            runtime,
            interval: interval.max(Duration::from_millis(100)),
        }
    }

    /// Collects until `cancel` fires. A report the receiver is not ready for is dropped: the
    /// next one supersedes it (CPU time is cumulative, memory current). A collection slower
    /// than the period is abandoned.
    pub async fn run(self, tx: mpsc::Sender<Vec<BackendUsage>>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let took = metrics::histogram!(USAGE_COLLECT_SECONDS);
        let measured = metrics::gauge!(USAGE_BACKENDS);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let start = Instant::now();
            let usage = tokio::select! {
                _ = cancel.cancelled() => return,
                u = tokio::time::timeout(self.interval, self.runtime.usage()) => match u {
                    Ok(u) => u,
                    Err(_) => {
                        tracing::warn!(interval = ?self.interval, "reading backend usage took longer than its period; skipped");
                        continue;
                    }
                },
            };
            took.record(start.elapsed().as_secs_f64());
            measured.set(usage.len() as f64);
            if tx.is_closed() {
                return;
            }
            let _ = tx.try_send(usage);
        }
    }
}
