//! Tests that drive a whole [`crate::Scheduler`] (real embedded store, hand-moved or paused
//! clock) through its components. They sit above the composition root, so no component
//! module imports the scheduler.

mod admission;
mod connect;
mod layers;
mod lease_expiry;
mod monitor;
mod races;

use std::sync::Arc;

use hangar_core::drone::{Capacity, Hello};
use hangar_core::token::TokenKey;
use hangar_store::embedded::EmbeddedStore;
use tokio_util::sync::CancellationToken;

use crate::{ManualClock, Scheduler, SchedulerConfig};

/// A started scheduler on a fresh embedded store and a hand-moved clock; stop it with
/// [`Fixture::stop`].
struct Fixture {
    sched: Scheduler,
    store: Arc<EmbeddedStore>,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// `configure` adjusts a test configuration whose default spawn runs `true`.
    async fn start(configure: impl FnOnce(&mut SchedulerConfig)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_default(dir.path().join("s.redb"))
            .await
            .unwrap();
        let mut cfg = SchedulerConfig::new("hangar.test", "http://127.0.0.1:1");
        cfg.defaults.command = Some(vec!["true".into()]);
        configure(&mut cfg);
        let sched = Scheduler::new(
            cfg,
            store.clone(),
            TokenKey::generate(),
            Arc::new(ManualClock::new(1_000_000)),
        );
        let cancel = CancellationToken::new();
        sched.start(cancel.clone()).await.unwrap();
        Fixture {
            sched,
            store,
            cancel,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.sched.wait().await;
    }
}

/// A process drone's hello with room for many backends.
fn hello(drone: &str, run: &str) -> Hello {
    Hello {
        drone: drone.into(),
        run_id: run.into(),
        capacity: Capacity {
            cpu_millis: 100_000,
            memory_mb: 100_000,
            max_backends: 1000,
        },
        pool: "default".into(),
        runtime: "process".into(),
        inventory: vec![],
        unhealthy: None,
        host: None,
    }
}
