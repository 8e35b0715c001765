//! The detector with an injected clock: every observation and evaluation carries its time.

use super::*;

const S: u64 = 1000;

fn id(s: &str) -> BackendId {
    BackendId::parse(s).unwrap()
}

fn config() -> HotConfig {
    HotConfig {
        window: Duration::from_secs(10),
        sustain: Duration::from_secs(5),
        ..HotConfig::default()
    }
}

fn input<'a>(id: &'a BackendId, pool: &'a str) -> BackendInput<'a> {
    BackendInput {
        id,
        drone: Some("d1"),
        pool,
        cpu_cap_cores: Some(1.0),
    }
}

/// A drone with plenty of room.
fn drone(name: &str) -> DroneInput<'_> {
    DroneInput {
        name,
        cpu_capacity_cores: 8.0,
        reserved_cpu_fraction: 0.1,
        reserved_memory_fraction: 0.1,
    }
}

fn verdict<'a>(e: &'a Evaluation, b: &BackendId) -> &'a Verdict<HotBackend> {
    e.backends.iter().find(|v| &v.view.backend == b).unwrap()
}

fn hot_ids(e: &Evaluation) -> Vec<String> {
    let mut v: Vec<String> = e
        .backends
        .iter()
        .filter(|v| v.hot)
        .map(|v| v.view.backend.to_string())
        .collect();
    v.sort();
    v
}

/// Drives `rates` (requests per second per backend) as one proxy reporting every 250 ms from
/// `from` to `to`, evaluating once a second; returns the evaluations.
fn drive(
    d: &mut HotDetector,
    counts: &mut [u64],
    ids: &[BackendId],
    rates: &[u64],
    from: u64,
    to: u64,
) -> Vec<(u64, Evaluation)> {
    let inputs: Vec<BackendInput<'_>> = ids.iter().map(|i| input(i, "default")).collect();
    let mut out = Vec::new();
    let mut t = from;
    while t <= to {
        for (i, b) in ids.iter().enumerate() {
            d.observe_requests(t, "p1", b, counts[i]);
            counts[i] += rates[i] / 4;
        }
        if t.is_multiple_of(S) {
            out.push((t, d.evaluate(t, &inputs, &[drone("d1")])));
        }
        t += 250;
    }
    out
}

#[test]
fn rates_come_from_cumulative_counts_over_the_window() {
    let mut d = HotDetector::new(config());
    let b = id("b1");
    let inputs = [input(&b, "default")];
    // Nothing yet: nothing to judge. Then less than a second of samples: unknown.
    assert!(d.evaluate(0, &inputs, &[]).backends.is_empty());
    d.observe_requests(0, "p1", &b, 500);
    d.observe_requests(500, "p1", &b, 550);
    assert_eq!(
        d.evaluate(500, &inputs, &[]).backends[0]
            .view
            .requests_per_second,
        None
    );
    // 100 requests per second for 20 s.
    for i in 1..=80 {
        d.observe_requests(500 + i * 250, "p1", &b, 550 + i * 25);
    }
    let now = 500 + 80 * 250;
    let rps = d.evaluate(now, &inputs, &[]).backends[0]
        .view
        .requests_per_second
        .unwrap();
    assert!((rps - 100.0).abs() < 1.0, "{rps}");
    // The counts stop growing: the window slides past the traffic.
    for i in 1..=48 {
        d.observe_requests(now + i * 250, "p1", &b, 550 + 80 * 25);
    }
    let rps = d.evaluate(now + 12 * S, &inputs, &[]).backends[0]
        .view
        .requests_per_second
        .unwrap();
    assert_eq!(rps, 0.0);
    // Samples stay bounded by the window, however long the reports go on.
    assert!(d.backends[&b].requests.samples.len() <= 25);
    // A backend nobody reports any more would read as idle once a window has passed: it is
    // no longer judged, and its state is forgotten.
    assert!(d.evaluate(now + 40 * S, &inputs, &[]).backends.is_empty());
    assert!(!d.backends.contains_key(&b));
}

#[test]
fn counts_from_several_proxies_add_up_and_a_restarted_proxy_starts_again() {
    let mut d = HotDetector::new(config());
    let b = id("b1");
    let inputs = [input(&b, "default")];
    // p1 reports 40/s, p2 60/s; p2 restarts halfway (its count falls back to 0).
    let (mut c1, mut c2) = (1000, 7000);
    for i in 0..=40u64 {
        let t = i * 250;
        d.observe_requests(t, "p1", &b, c1);
        d.observe_requests(t, "p2", &b, c2);
        c1 += 10;
        c2 += 15;
        if i == 20 {
            c2 = 15;
        }
    }
    let rps = d.evaluate(10 * S, &inputs, &[]).backends[0]
        .view
        .requests_per_second
        .unwrap();
    assert!((rps - 100.0).abs() < 2.0, "{rps}");
}

#[test]
fn a_backend_ten_times_hotter_than_its_pool_is_flagged_once_sustained() {
    let mut d = HotDetector::new(config());
    let ids = [id("bhot"), id("bcold1"), id("bcold2")];
    let mut counts = [0, 0, 0];
    let evals = drive(&mut d, &mut counts, &ids, &[400, 40, 40], 0, 20 * S);
    // Rates need a second of samples; the condition must then hold for the 5 s sustain.
    let first_hot = evals
        .iter()
        .find(|(_, e)| !hot_ids(e).is_empty())
        .map(|(t, _)| *t)
        .unwrap();
    assert!(
        (5 * S..=7 * S).contains(&first_hot),
        "flagged at {first_hot}"
    );
    for (t, e) in &evals {
        let hot = hot_ids(e);
        assert!(hot.is_empty() || hot == ["bhot"], "at {t}: {hot:?}");
    }
    let (_, last) = evals.last().unwrap();
    let v = verdict(last, &ids[0]);
    assert!(v.hot);
    assert_eq!(v.view.reasons, vec![HotReason::RequestRate]);
    assert!((v.view.requests_per_second.unwrap() - 400.0).abs() < 5.0);
    assert!((v.view.pool_median_requests_per_second.unwrap() - 40.0).abs() < 1.0);
    assert_eq!(v.view.hot_since, first_hot);
    assert!(!verdict(last, &ids[1]).hot && !verdict(last, &ids[2]).hot);

    // Traffic evens out: the flag stays while the old window drains and the sustain period
    // runs, then clears.
    let evals = drive(
        &mut d,
        &mut counts,
        &ids,
        &[40, 40, 40],
        20 * S + 250,
        50 * S,
    );
    let cleared = evals
        .iter()
        .find(|(_, e)| hot_ids(e).is_empty())
        .map(|(t, _)| *t)
        .unwrap();
    assert!(cleared >= 25 * S, "cleared at {cleared}: too early");
    assert!(hot_ids(&evals.last().unwrap().1).is_empty());
}

#[test]
fn a_short_burst_is_not_a_hot_shard() {
    let mut d = HotDetector::new(config());
    let ids = [id("bhot"), id("bcold1"), id("bcold2")];
    let mut counts = [0, 0, 0];
    drive(&mut d, &mut counts, &ids, &[40, 40, 40], 0, 10 * S);
    // One second at ten times the rate: over the 10 s window it averages under 5×.
    let mut evals = drive(
        &mut d,
        &mut counts,
        &ids,
        &[400, 40, 40],
        10 * S + 250,
        11 * S,
    );
    evals.extend(drive(
        &mut d,
        &mut counts,
        &ids,
        &[40, 40, 40],
        11 * S + 250,
        25 * S,
    ));
    assert!(evals.iter().all(|(_, e)| hot_ids(e).is_empty()));
    // The same rate kept up is flagged once the windowed rate has held for 5 s.
    let evals = drive(
        &mut d,
        &mut counts,
        &ids,
        &[400, 40, 40],
        25 * S + 250,
        40 * S,
    );
    assert!(
        hot_ids(&evals[3].1).is_empty(),
        "flagged before the sustain period"
    );
    assert_eq!(hot_ids(&evals.last().unwrap().1), ["bhot"]);
}

#[test]
fn small_pools_slow_pools_and_other_pools_have_no_hot_shard() {
    let cases: &[(&str, &[u64], &[&str])] = &[
        // Two active backends are too few to compare (three needed by default).
        ("two active", &[400, 40, 0], &[]),
        // Ten times hotter, but under the floor of 1 request per second.
        ("below the floor", &[8, 0, 0], &[]),
        ("all even", &[100, 100, 100], &[]),
        ("one hot", &[100, 10, 10], &["b0"]),
        // Median of the others (10, 12) is 11: 50 is not above 5 × 11.
        ("not enough hotter", &[50, 10, 12], &[]),
    ];
    for (what, rates, want) in cases {
        let mut d = HotDetector::new(config());
        let ids = [id("b0"), id("b1"), id("b2")];
        let rates: Vec<u64> = rates.iter().map(|r| r * 4).collect();
        // Rates of exactly 0 stay 0 (no traffic); the others are per 250 ms ×4.
        let mut counts = [0, 0, 0];
        let evals = drive(&mut d, &mut counts, &ids, &rates, 0, 15 * S);
        let got = hot_ids(&evals.last().unwrap().1);
        assert_eq!(got, *want, "{what}");
    }

    // Pools are judged apart: b0 is hot in pool a, b3 (as busy) is ordinary in pool b.
    let mut d = HotDetector::new(config());
    let ids = [id("b0"), id("b1"), id("b2"), id("b3"), id("b4"), id("b5")];
    let pools = ["a", "a", "a", "b", "b", "b"];
    let inputs: Vec<BackendInput<'_>> = ids.iter().zip(pools).map(|(i, p)| input(i, p)).collect();
    let rates = [400u64, 40, 40, 400, 400, 400];
    let mut last = Evaluation::default();
    for step in 0..=60u64 {
        let t = step * 250;
        for (i, b) in ids.iter().enumerate() {
            d.observe_requests(t, "p1", b, rates[i] * step / 4);
        }
        if t.is_multiple_of(S) {
            last = d.evaluate(t, &inputs, &[]);
        }
    }
    assert_eq!(hot_ids(&last), ["b0"]);
}

#[test]
fn cpu_against_the_cap_and_drones_on_cpu_or_reservations() {
    let mut d = HotDetector::new(HotConfig {
        sustain: Duration::ZERO,
        ..config()
    });
    let (busy, calm) = (id("bbusy"), id("bcalm"));
    let inputs = [
        BackendInput {
            id: &busy,
            drone: Some("d1"),
            pool: "default",
            cpu_cap_cores: Some(0.5),
        },
        BackendInput {
            id: &calm,
            drone: Some("d2"),
            pool: "default",
            cpu_cap_cores: Some(0.5),
        },
    ];
    let drones = [
        DroneInput {
            cpu_capacity_cores: 0.5,
            ..drone("d1")
        },
        DroneInput {
            reserved_memory_fraction: 0.97,
            ..drone("d2")
        },
        drone("d3"),
    ];
    // Cumulative CPU seconds every second: busy uses 0.48 cores, calm 0.1.
    let mut last = Evaluation::default();
    for s in 0..=5u64 {
        d.observe_cpu(s * S, &busy, 10.0 + 0.48 * s as f64);
        d.observe_cpu(s * S, &calm, 3.0 + 0.1 * s as f64);
        last = d.evaluate(s * S, &inputs, &drones);
    }
    let b = verdict(&last, &busy);
    assert!(b.hot);
    assert_eq!(b.view.reasons, vec![HotReason::Cpu]);
    assert!((b.view.cpu_cores.unwrap() - 0.48).abs() < 1e-9);
    assert!(!verdict(&last, &calm).hot);
    let drone_of = |n: &str| last.drones.iter().find(|v| v.view.drone == n).unwrap();
    assert!(drone_of("d1").hot);
    assert_eq!(drone_of("d1").view.reasons, vec![HotReason::Cpu]);
    assert!((drone_of("d1").view.cpu_cores - 0.48).abs() < 1e-9);
    assert!(drone_of("d2").hot);
    assert_eq!(drone_of("d2").view.reasons, vec![HotReason::Reservations]);
    assert!(!drone_of("d3").hot);

    // A container that restarts reports from zero again: no negative rate, no spike.
    d.observe_cpu(6 * S, &busy, 0.2);
    d.observe_cpu(7 * S, &busy, 0.3);
    let v = d.evaluate(7 * S, &inputs, &drones);
    let cpu = verdict(&v, &busy).view.cpu_cores.unwrap();
    assert!((0.0..0.5).contains(&cpu), "{cpu}");
}

#[test]
fn state_of_what_is_no_longer_live_is_forgotten() {
    let mut d = HotDetector::new(config());
    let (a, b) = (id("ba"), id("bb"));
    d.observe_requests(0, "p1", &a, 1);
    d.observe_requests(0, "p1", &b, 1);
    d.observe_cpu(0, &b, 1.0);
    d.evaluate(S, &[input(&a, "default")], &[drone("d1"), drone("d2")]);
    assert!(d.backends.contains_key(&a) && !d.backends.contains_key(&b));
    assert!(!d.last_by_proxy["p1"].contains_key(&b));
    assert_eq!(d.drones.len(), 2);
    d.evaluate(2 * S, &[], &[]);
    assert!(d.backends.is_empty() && d.last_by_proxy.is_empty() && d.drones.is_empty());
}

#[test]
fn medians_leave_out_the_judged_backend() {
    let cases: &[(&[f64], f64, Option<f64>)] = &[
        (&[1.0, 2.0, 10.0], 10.0, Some(1.5)),
        (&[1.0, 2.0, 10.0], 1.0, Some(6.0)),
        (&[1.0, 2.0, 3.0, 10.0], 10.0, Some(2.0)),
        (&[1.0, 1.0, 10.0], 1.0, Some(5.5)),
        (&[5.0], 5.0, None),
        (&[1.0, 2.0], 3.0, None),
    ];
    for (sorted, v, want) in cases {
        assert_eq!(median_without(sorted, *v), *want, "{sorted:?} without {v}");
    }
}

#[test]
fn relief_takes_the_longest_idle_neighbours_of_crowded_drones_up_to_the_bound() {
    let ids: Vec<BackendId> = (0..7).map(|i| id(&format!("n{i}"))).collect();
    let n = |i: usize, drone: &'static str, ready, open, idle_s, hot| Neighbour {
        id: &ids[i],
        drone,
        ready,
        open,
        idle_for: Duration::from_secs(idle_s),
        hot,
    };
    let neighbours = [
        n(0, "d1", true, 0, 100, false),
        n(1, "d1", true, 0, 300, false),
        n(2, "d1", true, 0, 10, false),   // not idle long enough
        n(3, "d1", true, 1, 900, false),  // has an open WebSocket
        n(4, "d1", false, 0, 900, false), // still starting
        n(5, "d1", true, 0, 900, true),   // the hot one itself
        n(6, "d2", true, 0, 900, false),  // another drone
    ];
    let crowded: HashSet<&str> = ["d1"].into();
    let min_idle = Duration::from_secs(60);
    assert_eq!(
        plan_relief(&crowded, &neighbours, min_idle, 5),
        vec![ids[1].clone(), ids[0].clone()]
    );
    assert_eq!(
        plan_relief(&crowded, &neighbours, min_idle, 1),
        vec![ids[1].clone()]
    );
    assert!(plan_relief(&HashSet::new(), &neighbours, min_idle, 5).is_empty());
    assert!(plan_relief(&crowded, &neighbours, min_idle, 0).is_empty());
}

#[test]
fn thresholds_are_validated() {
    assert!(HotConfig::default().validate().is_ok());
    let bad = [
        (
            HotConfig {
                rate_multiple: 1.0,
                ..HotConfig::default()
            },
            "--hot-rate-multiple",
        ),
        (
            HotConfig {
                cpu_fraction: 1.5,
                ..HotConfig::default()
            },
            "--hot-cpu-fraction",
        ),
        (
            HotConfig {
                window: Duration::from_secs(1),
                ..HotConfig::default()
            },
            "--hot-window",
        ),
        (
            HotConfig {
                min_rate: f64::NAN,
                ..HotConfig::default()
            },
            "--hot-min-rate",
        ),
    ];
    for (c, flag) in bad {
        assert!(c.validate().unwrap_err().contains(flag), "{flag}");
    }
}

/// A pass costs the backends reported on, not every live one: with 10,000 live backends and
/// traffic reported for 3, only those 3 are looked up and judged.
#[test]
fn a_pass_judges_the_backends_reported_on_not_every_live_one() {
    let mut d = HotDetector::new(config());
    let ids: Vec<BackendId> = (0..10_000).map(|i| id(&format!("b{i}"))).collect();
    let live: HashMap<&BackendId, BackendInput<'_>> =
        ids.iter().map(|b| (b, input(b, "default"))).collect();
    for b in &ids[..3] {
        d.observe_requests(0, "p1", b, 1);
        d.observe_requests(2 * S, "p1", b, 100);
    }
    let lookups = std::cell::Cell::new(0);
    let eval = d.evaluate_live(
        2 * S,
        |b| {
            lookups.set(lookups.get() + 1);
            live.get(b).cloned()
        },
        &[drone("d1")],
    );
    let mut judged: Vec<_> = eval
        .backends
        .iter()
        .map(|v| v.view.backend.clone())
        .collect();
    judged.sort();
    assert_eq!(judged, ids[..3].to_vec());
    // Each tracked backend is looked up for its track and for each proxy's last count.
    assert_eq!(lookups.get(), 6);
}
