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
        metrics_top_k: None,
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
    assert_eq!(s.top_k, None);
    let top = MetricsArgs {
        metrics_top_k: Some(100),
        ..args(Some("127.0.0.1:0"), 5)
    };
    assert_eq!(
        validate(&top, DEFAULT_ADDR).unwrap().unwrap().top_k,
        Some(100)
    );
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

/// Checks what Prometheus's text parser requires of an exposition: every family one
/// contiguous group with at most one HELP and one TYPE before its samples; histogram buckets
/// cumulative per series, ending in `+Inf` equal to `_count`, with a `_sum`.
fn assert_valid_exposition(text: &str) {
    let mut done: std::collections::BTreeSet<String> = Default::default();
    let mut current: Option<(String, String)> = None;
    // Per histogram series (labels without `le`): last bucket value, +Inf, count, has sum.
    let mut hist: BTreeMap<String, (u64, Option<u64>, Option<u64>, bool)> = BTreeMap::new();
    let family_of = |name: &str, kind: &str| -> String {
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    return base.to_string();
                }
            }
        }
        name.to_string()
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line
            .strip_prefix("# HELP ")
            .or_else(|| line.strip_prefix("# TYPE "))
        {
            let name = rest.split(' ').next().unwrap().to_string();
            if current.as_ref().is_some_and(|(n, _)| *n == name) {
                assert!(line.starts_with("# TYPE "), "HELP after TYPE: {line}");
                let kind = rest.split(' ').nth(1).unwrap().to_string();
                current = Some((name, kind));
                continue;
            }
            if let Some((prev, _)) = current.take() {
                done.insert(prev);
            }
            assert!(!done.contains(&name), "family {name} appears twice");
            let kind = if line.starts_with("# TYPE ") {
                rest.split(' ').nth(1).unwrap().to_string()
            } else {
                String::new()
            };
            current = Some((name, kind));
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        let (family, kind) = current.clone().expect("a sample before any TYPE");
        assert_eq!(family_of(name, &kind), family, "{line} outside its family");
        if kind == "histogram" {
            let labels = series[name.len()..].to_string();
            let (base_labels, le) = match labels.rsplit_once(",le=\"") {
                Some((l, le)) => (l.to_string(), Some(le.trim_end_matches("\"}").to_string())),
                None => (labels.trim_end_matches('}').to_string(), None),
            };
            let key = format!("{family}{base_labels}");
            let e = hist.entry(key.clone()).or_default();
            let v: f64 = value.parse().unwrap();
            if name.ends_with("_bucket") {
                let v = v as u64;
                assert!(e.1.is_none(), "bucket after +Inf: {line}");
                assert!(v >= e.0, "buckets not cumulative: {line}");
                e.0 = v;
                if le.as_deref() == Some("+Inf") {
                    e.1 = Some(v);
                }
            } else if name.ends_with("_count") {
                e.2 = Some(v as u64);
            } else {
                e.3 = true;
            }
        }
    }
    for (series, (_, inf, count, sum)) in hist {
        assert!(
            inf.is_some() && inf == count && sum,
            "{series}: {inf:?} {count:?} {sum}"
        );
    }
}

/// Five backends: requests 10, 5, 1, 1 (hot), 2 (no pool).
fn top_k_fleet(recorder: &exporter::RoutingRecorder, tracker: &ActivityTracker) -> Vec<Route> {
    let mut routes: Vec<Route> = ["ba", "bb", "bc", "bd", "be"]
        .iter()
        .map(|id| route(id, RouteState::Ready))
        .collect();
    routes[4].pool = None;
    metrics::with_local_recorder(recorder, || {
        hangar_proxy::metrics::describe();
        hangar_scheduler::metrics::describe();
        for (r, n) in routes.iter().zip([10, 5, 1, 1, 2]) {
            for _ in 0..n {
                tracker.begin_route(r).set_status(200);
            }
        }
        for (i, r) in routes.iter().enumerate() {
            metrics::gauge!(hangar_scheduler::metrics::BACKEND_HOT, "backend" => r.backend.to_string(), "drone" => "d1", "pool" => "default")
                .set(if i == 3 { 1.0 } else { 0.0 });
            metrics::gauge!(hangar_scheduler::metrics::BACKEND_MEMORY_BYTES, "backend" => r.backend.to_string(), "drone" => "d1", "pool" => "default")
                .set(1000.0 * (i + 1) as f64);
        }
        tracker.publish_metrics();
    });
    routes
}

fn backends_in(s: &BTreeMap<String, f64>) -> std::collections::BTreeSet<String> {
    s.keys()
        .filter_map(|k| k.split_once("backend=\"")?.1.split_once('"'))
        .map(|(b, _)| b.to_string())
        .collect()
}

#[test]
fn top_k_shows_the_busiest_and_the_hot_backends_and_sums_the_rest_per_pool() {
    let (recorder, exporter) = exporter::build_with(Duration::from_secs(60), Some(2)).unwrap();
    let tracker = ActivityTracker::new();
    let routes = top_k_fleet(&recorder, &tracker);
    let text = String::from_utf8(exporter.render()).unwrap();
    assert_valid_exposition(&text);
    let s = samples(text.as_bytes());
    // The two busiest and the hot one, with every series of theirs.
    assert_eq!(
        backends_in(&s),
        ["ba", "bb", "bd"].map(String::from).into(),
        "{text}"
    );
    assert_eq!(
        s["hangar_backend_requests_total{backend=\"ba\",drone=\"d1\",pool=\"default\",status_class=\"2xx\"}"],
        10.0
    );
    assert!(s.contains_key(
        "hangar_backend_request_duration_seconds_count{backend=\"bd\",drone=\"d1\",pool=\"default\"}"
    ));
    // The others summed per pool: bc in `default`, be (no pool) in `none`.
    assert_eq!(
        s["hangar_backend_requests_total{pool=\"default\",status_class=\"2xx\"}"],
        1.0
    );
    assert_eq!(
        s["hangar_backend_requests_total{pool=\"none\",status_class=\"2xx\"}"],
        2.0
    );
    assert_eq!(
        s["hangar_backend_request_duration_seconds_count{pool=\"none\"}"],
        2.0
    );
    assert_eq!(
        s["hangar_backend_request_duration_seconds_bucket{pool=\"none\",le=\"+Inf\"}"],
        2.0
    );
    // Gauges: the sum over the pool's backends outside the top K now (bc and be).
    assert_eq!(
        s["hangar_backend_memory_bytes{pool=\"default\"}"],
        3000.0 + 5000.0
    );
    assert_eq!(s["hangar_backend_hot{pool=\"default\"}"], 0.0);

    // bc gets busy and takes bb's place (scores: traffic since the last render plus half the
    // previous score: bc 50.5, ba 15, bb 5.5). The pool's counter only grows: bc's requests
    // before this render stay in it, and bb's new ones are added to it.
    let pool_2xx = "hangar_backend_requests_total{pool=\"default\",status_class=\"2xx\"}";
    metrics::with_local_recorder(&recorder, || {
        for _ in 0..10 {
            tracker.begin_route(&routes[0]).set_status(200);
        }
        for _ in 0..50 {
            tracker.begin_route(&routes[2]).set_status(200);
        }
        for _ in 0..3 {
            tracker.begin_route(&routes[1]).set_status(200);
        }
        tracker.publish_metrics();
    });
    let text = String::from_utf8(exporter.render()).unwrap();
    assert_valid_exposition(&text);
    let s = samples(text.as_bytes());
    assert_eq!(
        backends_in(&s),
        ["ba", "bc", "bd"].map(String::from).into(),
        "{text}"
    );
    // 1 (bc before) + 50 (bc since: its own series appears now, with all 51, and rate()
    // ignores a new series' first value) + 3 (bb since).
    assert_eq!(s[pool_2xx], 54.0, "{text}");
    assert_eq!(
        s["hangar_backend_requests_total{backend=\"bc\",drone=\"d1\",pool=\"default\",status_class=\"2xx\"}"],
        51.0
    );

    // Steady: the shown backends' increments stay in their own series.
    metrics::with_local_recorder(&recorder, || {
        for _ in 0..7 {
            tracker.begin_route(&routes[2]).set_status(200);
        }
        tracker.publish_metrics();
    });
    let s = samples(&exporter.render());
    assert_eq!(s[pool_2xx], 54.0);
    assert_eq!(
        s["hangar_backend_requests_total{backend=\"bc\",drone=\"d1\",pool=\"default\",status_class=\"2xx\"}"],
        58.0
    );
}

#[test]
fn top_k_zero_shows_only_hot_backends_and_every_backend_without_it() {
    let (recorder, exporter) = exporter::build_with(Duration::from_secs(60), Some(0)).unwrap();
    let tracker = ActivityTracker::new();
    top_k_fleet(&recorder, &tracker);
    let s = samples(&exporter.render());
    assert_eq!(backends_in(&s), ["bd"].map(String::from).into());
    assert_eq!(
        s["hangar_backend_requests_total{pool=\"default\",status_class=\"2xx\"}"],
        10.0 + 5.0 + 1.0
    );

    let (recorder, exporter) = exporter::build_with(Duration::from_secs(60), None).unwrap();
    let tracker = ActivityTracker::new();
    top_k_fleet(&recorder, &tracker);
    let text = String::from_utf8(exporter.render()).unwrap();
    assert_valid_exposition(&text);
    let s = samples(text.as_bytes());
    assert_eq!(backends_in(&s).len(), 5);
    assert!(!s.keys().any(|k| k.contains("{pool=")), "{text}");
}

#[test]
fn top_k_selection() {
    use backends::{Candidate, select};
    let c = |score: f64, hot: bool| Candidate { score, hot };
    let cases: Vec<(Vec<Candidate>, usize, Vec<bool>)> = vec![
        (vec![], 3, vec![]),
        // The K highest scores.
        (
            vec![c(1.0, false), c(9.0, false), c(5.0, false), c(7.0, false)],
            2,
            vec![false, true, false, true],
        ),
        // Ties go to the earlier backend.
        (
            vec![c(3.0, false), c(3.0, false), c(3.0, false)],
            2,
            vec![true, true, false],
        ),
        // Hot backends are shown whatever their traffic, on top of the K.
        (
            vec![c(0.0, true), c(9.0, false), c(5.0, false)],
            1,
            vec![true, true, false],
        ),
        // No traffic, no series of its own.
        (vec![c(0.0, false), c(2.0, false)], 5, vec![false, true]),
        (vec![c(4.0, false), c(2.0, true)], 0, vec![false, true]),
    ];
    for (candidates, k, want) in cases {
        assert_eq!(select(&candidates, k), want, "{candidates:?} k={k}");
    }
}

#[test]
fn the_exposition_is_valid_and_ended_backends_leave_the_store() {
    let grace = Duration::from_millis(300);
    let (recorder, exporter) = exporter::build(grace).unwrap();
    let tracker = ActivityTracker::new();
    tracker.set_metrics_grace(grace);
    let r = route("bvalid", RouteState::Ready);
    metrics::with_local_recorder(&recorder, || {
        hangar_proxy::metrics::describe();
        for status in [200, 200, 404, 502] {
            tracker.begin_route(&r).set_status(status);
        }
        // A label value that needs escaping.
        metrics::gauge!("hangar_backend_hot", "backend" => "b\"q\\\n", "drone" => "", "pool" => "")
            .set(1.0);
        tracker.publish_metrics();
    });
    let text = String::from_utf8(exporter.render()).unwrap();
    assert_valid_exposition(&text);
    assert!(
        text.contains("hangar_backend_hot{backend=\"b\\\"q\\\\\\n\",drone=\"\",pool=\"\"} 1\n"),
        "{text}"
    );
    assert_eq!(
        text.matches("# HELP hangar_backend_requests_total ")
            .count(),
        1
    );
    assert_eq!(exporter.backends(), 2);
    metrics::with_local_recorder(&recorder, || {
        tracker.prune(&RouteTable::new(2, []));
    });
    let start = Instant::now();
    while exporter.backends() > 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "never dropped");
        std::thread::sleep(Duration::from_millis(20));
        let s = samples(&exporter.render());
        assert!(
            start.elapsed() >= grace || !s.is_empty(),
            "dropped before the grace period"
        );
    }
    assert!(samples(&exporter.render()).is_empty());
}

#[test]
fn gzip_is_offered_to_clients_that_accept_it() {
    let cases = [
        (vec![], false),
        (vec!["gzip"], true),
        (vec!["deflate, gzip;q=1.0, *;q=0.5"], true),
        (vec!["x-gzip"], true),
        (vec!["identity"], false),
        (vec!["gzip;q=0"], false),
        (vec!["gzip; Q=0"], false),
        (vec!["*"], true),
        (vec!["*;q=0.1, gzip;q=0"], false),
        (vec!["br", "GZIP"], true),
    ];
    for (values, want) in cases {
        let mut h = http::HeaderMap::new();
        for v in &values {
            h.append(header::ACCEPT_ENCODING, v.parse().unwrap());
        }
        assert_eq!(accepts_gzip(&h), want, "{values:?}");
    }
}

#[tokio::test]
async fn a_scrape_that_accepts_gzip_gets_the_exposition_gzipped() {
    use std::io::Read;
    let (recorder, exporter) = exporter::build(Duration::from_secs(60)).unwrap();
    let tracker = ActivityTracker::new();
    let r = route("bgzip", RouteState::Ready);
    metrics::with_local_recorder(&recorder, || {
        for _ in 0..3 {
            tracker.begin_route(&r).set_status(200);
        }
        tracker.publish_metrics();
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(
        MetricsServer::new(exporter, Duration::from_secs(60)).run(listener, cancel.clone()),
    );
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/metrics");
    let plain = http.get(&url).send().await.unwrap();
    assert!(plain.headers().get("content-encoding").is_none());
    let plain = plain.bytes().await.unwrap();
    let r = http
        .get(&url)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_eq!(r.headers()["content-type"], TEXT_FORMAT);
    assert_eq!(r.headers()["vary"], "accept-encoding");
    let body = r.bytes().await.unwrap();
    assert_eq!(&body[..2], &[0x1f, 0x8b], "a gzip stream");
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_end(&mut text)
        .unwrap();
    assert_eq!(samples(&text), samples(&plain));
    assert_eq!(
        samples(&text)["hangar_backend_requests_total{backend=\"bgzip\",drone=\"d1\",pool=\"default\",status_class=\"2xx\"}"],
        3.0
    );
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
}
