//! Admission errors say which step failed and whether the drone should retry: a store hiccup
//! is transient (the session closes with "try again", the drone backs off and reconnects), a
//! bad hello is a refusal.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hangar_core::drone::{Capacity, Hello};
use hangar_core::token::TokenKey;

use super::TestStore;
use crate::drone_session::AdmitError;
use crate::{ApiError, ManualClock, Scheduler, SchedulerConfig};

fn hello(name: &str) -> Hello {
    Hello {
        drone: name.into(),
        run_id: "r1".into(),
        capacity: Capacity::default(),
        pool: "default".into(),
        runtime: "process".into(),
        inventory: vec![],
        unhealthy: None,
        host: None,
    }
}

#[tokio::test]
async fn a_store_hiccup_during_admission_is_transient_and_a_bad_hello_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = TestStore::open(dir.path()).await;
    store.failing.store(true, Ordering::SeqCst);
    let sched = Scheduler::new(
        SchedulerConfig::new("hangar.test", "http://127.0.0.1:1"),
        store.clone(),
        TokenKey::generate(),
        Arc::new(ManualClock::new(1_000_000)),
    );
    let sessions = &sched.handles().sessions;

    let e = sessions.admit(&hello("d1"), false).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("write the drone record") && text.contains("connection refused"),
        "the message names the step and the cause: {text}"
    );
    assert!(matches!(ApiError::from(e), ApiError::Unavailable(_)));
    assert!(sched.handles().drones.get("d1").is_none());

    let e = sessions.admit(&hello("Bad Name"), false).await.unwrap_err();
    assert!(
        matches!(e, AdmitError::Invalid(_)) && !e.is_transient(),
        "{e}"
    );
    assert!(matches!(ApiError::from(e), ApiError::BadRequest(_)));

    // The store is back: the same hello is admitted.
    store.failing.store(false, Ordering::SeqCst);
    sessions.admit(&hello("d1"), false).await.unwrap();
    assert!(sched.handles().drones.get("d1").is_some());
}
