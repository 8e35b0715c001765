//! The monitor with a real scheduler (embedded store, hand-moved clock): activity reports in,
//! a hot backend flagged, its gauges, `GET /v1/hot`'s list, and the relief of its drone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::activity::{ActivityBatch, ActivityReport};
use hangar_core::api::{ConnectRequest, HotReason};
use hangar_core::drone::{BackendEvent, Capacity, Hello};
use hangar_core::token::TokenKey;
use hangar_core::{BackendState, KeyRef, TerminationReason};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tokio_util::sync::CancellationToken;

use super::key;
use crate::hot::HotConfig;
use crate::hot::ReliefConfig;
use crate::metrics as m;
use crate::{Clock, ManualClock, Scheduler, SchedulerConfig};
use hangar_store::embedded::EmbeddedStore;

/// A recorded metric: name, labels, value.
type Sample = (String, Vec<(String, String)>, DebugValue);

fn hello(drone: &str, run: &str) -> Hello {
    Hello {
        drone: drone.into(),
        run_id: run.into(),
        capacity: Capacity {
            cpu_millis: 8000,
            memory_mb: 16384,
            max_backends: 100,
        },
        pool: "default".into(),
        runtime: "process".into(),
        inventory: vec![],
        unhealthy: None,
        host: None,
    }
}

fn gauge(snapshot: &[Sample], name: &str, label: (&str, &str)) -> f64 {
    snapshot
        .iter()
        .find(|(n, labels, _)| {
            n == name
                && if label.0.is_empty() {
                    labels.is_empty()
                } else {
                    labels.iter().any(|(k, v)| k == label.0 && v == label.1)
                }
        })
        .map(|(_, _, v)| match v {
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Counter(c) => *c as f64,
            DebugValue::Histogram(_) => f64::NAN,
        })
        .unwrap_or_else(|| panic!("no {name} {label:?}"))
}

#[tokio::test]
async fn a_hot_backend_is_flagged_gauged_listed_and_its_idle_neighbours_relocated() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Thread-local, and this test's runtime is single-threaded.
    let _recorder = metrics::set_default_local_recorder(&recorder);

    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_default(dir.path().join("s.redb"))
        .await
        .unwrap();
    let clock = ManualClock::new(1_000_000);
    let mut cfg = SchedulerConfig::new("hangar.test", "http://127.0.0.1:1");
    cfg.defaults.command = Some(vec!["true".into()]);
    cfg.hot = HotConfig {
        window: Duration::from_secs(10),
        sustain: Duration::from_secs(2),
        ..HotConfig::default()
    };
    cfg.relieve = Some(ReliefConfig {
        min_idle: Duration::from_secs(30),
        max_per_pass: 1,
    });
    // Passes are driven by hand below.
    cfg.monitor_interval = Duration::from_secs(3600);
    let sched = Scheduler::new(cfg, store, TokenKey::generate(), Arc::new(clock.clone()));
    let cancel = CancellationToken::new();
    sched.start(cancel.clone()).await.unwrap();

    // Five backends on d1, then d2 joins: somewhere else to put relocated backends.
    let _commands1 = sched
        .handles()
        .sessions
        .admit(&hello("d1", "r1"), false)
        .await
        .unwrap();
    let names = ["hot", "busy1", "busy2", "idle1", "idle2"];
    let mut ids = Vec::new();
    for name in names {
        let r = sched
            .handles()
            .connector
            .connect(ConnectRequest {
                key: Some(KeyRef::new("default", name)),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(r.backend_id);
    }
    let _commands2 = sched
        .handles()
        .sessions
        .admit(&hello("d2", "r2"), false)
        .await
        .unwrap();
    let address = "127.0.0.1:9".parse().unwrap();
    for id in &ids {
        for ev in [
            BackendEvent::Starting,
            BackendEvent::Waiting { address },
            BackendEvent::Ready { address },
        ] {
            sched
                .handles()
                .backends
                .apply_event("d1", "r1", id, ev)
                .await
                .unwrap();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while sched
        .handles()
        .routes
        .directory()
        .values()
        .filter(|p| p.state == "ready")
        .count()
        < 5
    {
        assert!(Instant::now() < deadline, "the route feed never published");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A minute later the traffic starts: 500 req/s to one, 50 to two others, none to two.
    clock.advance_ms(60_000);
    let start = clock.now_ms();
    let rates = [500u64, 50, 50, 0, 0];
    let mut monitor = sched.monitor();
    let mut relocated_per_pass = Vec::new();
    for step in 0..=60u64 {
        let now = clock.now_ms();
        let reports = ids
            .iter()
            .zip(rates)
            .map(|(id, rate)| ActivityReport {
                backend: id.clone(),
                last_active: if rate > 0 { now } else { start - 60_000 },
                open: 0,
                requests: rate * step / 4,
                answered: 0,
                duration_us_total: 0,
            })
            .collect();
        sched.report_activity(&ActivityBatch {
            proxy: "p1".into(),
            reports,
        });
        if step.is_multiple_of(4) {
            let before = sched.handles().hot.relocated_total();
            monitor.pass().await;
            relocated_per_pass.push(sched.handles().hot.relocated_total() - before);
        }
        clock.advance_ms(250);
    }

    let list = sched.handles().hot.list();
    assert_eq!(list.backends.len(), 1, "{list:?}");
    let hot = &list.backends[0];
    assert_eq!(hot.backend, ids[0]);
    assert_eq!(hot.reasons, vec![HotReason::RequestRate]);
    assert_eq!(hot.drone.as_deref(), Some("d1"));
    assert!(
        (hot.requests_per_second.unwrap() - 500.0).abs() < 10.0,
        "{hot:?}"
    );
    assert!((hot.pool_median_requests_per_second.unwrap() - 50.0).abs() < 5.0);
    assert!(
        list.drones.is_empty(),
        "no drone is hot on CPU or reservations"
    );

    // Relief: the two idle neighbours, one per pass; the busy ones stay.
    assert_eq!(list.relocated_total, 2);
    assert!(
        relocated_per_pass.iter().all(|n| *n <= 1),
        "{relocated_per_pass:?}"
    );
    for (i, id) in ids.iter().enumerate() {
        let state = sched
            .handles()
            .backends
            .get(id.as_str())
            .await
            .unwrap()
            .unwrap()
            .0
            .state;
        if i >= 3 {
            assert_eq!(
                state,
                BackendState::Terminating {
                    reason: TerminationReason::Relocated
                },
                "{}",
                names[i]
            );
        } else {
            assert_eq!(state, BackendState::Ready, "{}", names[i]);
        }
    }
    // Once the relocated backend has stopped (a key never has two running processes), its
    // key's next connect lands on the other drone.
    sched
        .handles()
        .backends
        .apply_event(
            "d1",
            "r1",
            &ids[3],
            BackendEvent::Exited { exit_code: Some(0) },
        )
        .await
        .unwrap();
    let again = sched
        .handles()
        .connector
        .connect(key("idle1"))
        .await
        .unwrap();
    assert!(again.spawned);
    let placed = sched
        .handles()
        .backends
        .get(again.backend_id.as_str())
        .await
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(placed.drone.as_deref(), Some("d2"));

    // Gauges: 1 for the hot backend, 0 for the others; drone and scheduler figures.
    let snapshot: Vec<Sample> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _, _, v)| {
            let key = ck.key();
            let labels = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            (key.name().to_string(), labels, v)
        })
        .collect();
    assert_eq!(
        gauge(&snapshot, m::BACKEND_HOT, ("backend", ids[0].as_str())),
        1.0
    );
    assert_eq!(
        gauge(&snapshot, m::BACKEND_HOT, ("backend", ids[1].as_str())),
        0.0
    );
    assert_eq!(gauge(&snapshot, m::HOT_BACKENDS, ("", "")), 1.0);
    assert_eq!(gauge(&snapshot, m::RELOCATIONS_TOTAL, ("", "")), 2.0);
    assert_eq!(
        gauge(&snapshot, m::DRONE_CAPACITY_CPU_CORES, ("drone", "d1")),
        8.0
    );
    assert_eq!(gauge(&snapshot, m::DRONE_HOT, ("drone", "d1")), 0.0);
    // One set of gauges per live backend (the relocated ones are still terminating).
    assert_eq!(sched.handles().hot.series().len(), 5);
    // Every hot gauge is labelled with the backend's drone and pool only.
    for (name, labels, _) in &snapshot {
        if name == m::BACKEND_HOT {
            let keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, ["backend", "drone", "pool"]);
        }
    }
    cancel.cancel();
    sched.wait().await;
}
