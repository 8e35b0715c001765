//! The exporter: routing between the stable and the expiring recorder, removal of ended
//! backends' series after the grace period (while live ones stay), naming and label hygiene
//! of the exposition, the flags, and the admin listener.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::BackendId;
use hangar_core::route::{Route, RouteState, RouteTable};
use hangar_proxy::ActivityTracker;

use super::*;

/// Sample lines of an exposition: `name{labels}` → value.
fn samples(text: &[u8]) -> BTreeMap<String, f64> {
    String::from_utf8_lossy(text)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn has(samples: &BTreeMap<String, f64>, name: &str, backend: &str) -> bool {
    samples
        .keys()
        .any(|k| k.starts_with(name) && k.contains(&format!("backend=\"{backend}\"")))
}

fn route(id: &str, state: RouteState) -> Route {
    Route {
        backend: BackendId::parse(id).unwrap(),
        state,
        address: None,
        public: false,
        drone: Some("d1".into()),
        pool: Some("default".into()),
        key: None,
        epoch: 0,
    }
}

#[test]
fn series_of_ended_backends_leave_after_the_grace_period_and_live_ones_stay() {
    let grace = Duration::from_millis(400);
    let (recorder, exporter) = exporter::build(grace).unwrap();
    let tracker = ActivityTracker::new();
    tracker.set_metrics_grace(grace);
    let (live, ended) = (
        route("blive", RouteState::Ready),
        route("bended", RouteState::Ready),
    );
    metrics::with_local_recorder(&recorder, || {
        drop(tracker.begin_route(&live));
        drop(tracker.begin_route(&ended));
        tracker.publish_metrics();
        // A rare event's counter, with no backend label: it must never expire.
        metrics::counter!(hangar_scheduler::metrics::LEASE_EXPIRIES_TOTAL).increment(1);
    });
    let first = samples(&exporter.render());
    for b in ["blive", "bended"] {
        for name in [
            "hangar_backend_requests_total",
            "hangar_backend_request_duration_seconds_count",
            "hangar_backend_open_connections",
        ] {
            assert!(has(&first, name, b), "{name} of {b}: {first:#?}");
        }
    }

    // The backend ends: published a last time and forgotten by the proxy.
    metrics::with_local_recorder(&recorder, || {
        tracker.prune(&RouteTable::new(
            2,
            [live.clone(), route("bended", RouteState::Gone)],
        ));
    });
    assert_eq!(tracker.len(), 1);

    // Scrape on (the collector refreshing the live backend each time) until its series are gone.
    let start = Instant::now();
    let last = loop {
        metrics::with_local_recorder(&recorder, || tracker.publish_metrics());
        let s = samples(&exporter.render());
        assert!(has(&s, "hangar_backend_requests_total", "blive"), "{s:#?}");
        assert!(has(&s, "hangar_backend_open_connections", "blive"));
        assert!(s.contains_key(hangar_scheduler::metrics::LEASE_EXPIRIES_TOTAL));
        if !s.keys().any(|k| k.contains("bended")) {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the ended backend's series never left: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(start.elapsed() >= grace, "removed before the grace period");
    // The live backend's duration histogram had no request for the grace period: dropped
    // too, and registered again by its next request.
    assert!(!has(
        &last,
        "hangar_backend_request_duration_seconds",
        "blive"
    ));
    metrics::with_local_recorder(&recorder, || {
        drop(tracker.begin_route(&live));
        tracker.publish_metrics();
    });
    let s = samples(&exporter.render());
    assert_eq!(
        s.get(
            "hangar_backend_request_duration_seconds_count{backend=\"blive\",drone=\"d1\",pool=\"default\"}"
        ),
        Some(&1.0)
    );
    assert_eq!(
        s.get(
            "hangar_backend_requests_total{backend=\"blive\",drone=\"d1\",pool=\"default\",status_class=\"4xx\"}"
        ),
        Some(&2.0),
        "the counter kept counting through the histogram's absence"
    );
}

#[test]
fn per_backend_and_per_drone_series_are_routed_to_the_expiring_recorder() {
    let (recorder, exporter) = exporter::build(Duration::from_millis(200)).unwrap();
    metrics::with_local_recorder(&recorder, || {
        metrics::gauge!("hangar_backend_hot", "backend" => "b1", "drone" => "d1", "pool" => "p")
            .set(1.0);
        metrics::gauge!("hangar_drone_hot", "drone" => "d1", "pool" => "p").set(1.0);
        metrics::counter!("hangar_proxy_requests_total", "mode" => "host").increment(1);
    });
    let start = Instant::now();
    loop {
        let s = samples(&exporter.render());
        assert!(s.contains_key("hangar_proxy_requests_total{mode=\"host\"}"));
        if s.len() == 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{s:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Naming (Prometheus conventions) and label hygiene of everything the libraries register,
/// rendered through the real exporter.
#[test]
fn exposition_names_and_labels_follow_the_conventions() {
    let (recorder, exporter) = exporter::build(Duration::from_secs(60)).unwrap();
    let tracker = ActivityTracker::new();
    let r = route("bhyg", RouteState::Ready);
    metrics::with_local_recorder(&recorder, || {
        hangar_proxy::metrics::describe();
        hangar_scheduler::metrics::describe();
        hangar_drone::session::describe();
        hangar_dns::metrics::describe();
        let mut g = tracker.begin_route(&r);
        g.set_status(200);
        drop(g);
        tracker.publish_metrics();
        metrics::counter!(hangar_scheduler::metrics::TERMINATIONS_TOTAL, "reason" => "idle")
            .increment(1);
        metrics::histogram!(hangar_scheduler::metrics::SPAWN_PHASE_SECONDS, "phase" => "waiting")
            .record(0.2);
    });
    let text = String::from_utf8(exporter.render()).unwrap();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_string(), kind.to_string());
        }
    }
    assert!(types.len() >= 8, "{text}");
    for (name, kind) in &types {
        assert!(name.starts_with("hangar_"), "{name}");
        match kind.as_str() {
            "counter" => assert!(name.ends_with("_total"), "counter {name}"),
            "histogram" => assert!(
                name.ends_with("_seconds"),
                "histogram {name} is not in seconds"
            ),
            "gauge" => assert!(!name.ends_with("_total"), "gauge {name}"),
            other => panic!("{name} is a {other}: every histogram needs buckets"),
        }
        assert!(
            !name.contains("milli") && !name.contains("_mb"),
            "{name}: use base units"
        );
    }
    for series in samples(text.as_bytes()).keys() {
        for forbidden in ["key=", "user=", "namespace="] {
            assert!(!series.contains(forbidden), "{series}");
        }
    }
}

#[test]
fn flags_are_validated() {
    let args = |metrics: Option<&str>, grace| MetricsArgs {
        metrics: metrics.map(str::to_string),
        metrics_grace: grace,
        metrics_token: None,
    };
    let d = validate(&args(None, 300), DEFAULT_ADDR).unwrap().unwrap();
    assert_eq!(d.addr.to_string(), DEFAULT_ADDR);
    let short = MetricsArgs {
        metrics_token: Some("short".into()),
        ..args(None, 300)
    };
    assert!(
        validate(&short, DEFAULT_ADDR)
            .unwrap_err()
            .to_string()
            .contains("--metrics-token")
    );
    assert!(!d.explicit);
    assert!(
        validate(&args(Some("off"), 300), DEFAULT_ADDR)
            .unwrap()
            .is_none()
    );
    let e = validate(&args(Some("nonsense"), 300), DEFAULT_ADDR).unwrap_err();
    assert!(e.0.contains("--metrics"), "{e}");
    let e = validate(&args(Some("127.0.0.1:0"), 0), DEFAULT_ADDR).unwrap_err();
    assert!(e.0.contains("--metrics-grace"), "{e}");
    let s = validate(&args(Some("127.0.0.1:0"), 5), DEFAULT_ADDR)
        .unwrap()
        .unwrap();
    assert!(s.explicit);
    assert_eq!(s.grace, Duration::from_secs(5));
}

#[tokio::test]
async fn the_admin_listener_serves_the_text_format_and_runs_collectors_first() {
    let (recorder, exporter) = exporter::build(Duration::from_secs(60)).unwrap();
    let recorder = Arc::new(recorder);
    let collected = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let server = {
        let (recorder, collected) = (recorder.clone(), collected.clone());
        MetricsServer::new(exporter, Duration::from_secs(60)).collect(move || {
            let n = collected.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            metrics::with_local_recorder(recorder.as_ref(), || {
                metrics::gauge!("hangar_test_collections").set(n as f64);
            });
        })
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(server.run(listener, cancel.clone()));
    let http = reqwest::Client::new();
    let r = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], TEXT_FORMAT);
    let body = r.text().await.unwrap();
    let s = samples(body.as_bytes());
    assert!(s["hangar_test_collections"] >= 1.0, "{body}");
    let r = http
        .get(format!("http://{addr}/other"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .post(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
}
