//! The embedded store's writes with group commit against the same store committing each write
//! in a transaction (and an fsync) of its own, side by side in one run.
//!
//! `cargo bench --bench store_writes` runs the full measurement: for each concurrency (1, 4,
//! 32 writes in flight), three interleaved rounds per mode of puts of new keys with a 400-byte
//! value, one fresh store file per round in the system's temporary directory (on this
//! machine, the same disk as the data directory). It prints writes per second, latency p50 and
//! p99, and writes per fsync. Without `--bench` (as `cargo test --benches` runs it) it does a
//! short smoke run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_store::Store;
use hangar_store::embedded::{EmbeddedOptions, EmbeddedStore, TokioClock};

struct Round {
    per_s: f64,
    p50: Duration,
    p99: Duration,
    per_commit: f64,
}

async fn round(group_commit: bool, inflight: usize, writes: usize) -> Round {
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = EmbeddedStore::open_with(
        dir.path().join("store.redb"),
        Arc::new(TokioClock),
        EmbeddedOptions {
            group_commit,
            ..EmbeddedOptions::default()
        },
    )
    .await
    .expect("open the store");
    let value = vec![b'v'; 400];
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..inflight {
        let store = store.clone();
        let value = value.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for n in (w..writes).step_by(inflight) {
                let t = Instant::now();
                store
                    .put(&format!("backends/b-{n:07}"), value.clone(), None)
                    .await
                    .expect("put");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.expect("writer task"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    assert_eq!(
        store.list("backends/").await.expect("list").kvs.len(),
        writes
    );
    Round {
        per_s: writes as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        per_commit: writes as f64 / store.commits().max(1) as f64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, scale) = if full { (3, 1) } else { (1, 10) };
    println!("# Embedded store: puts of new keys, median of {rounds} interleaved rounds");
    println!();
    println!("| In flight | Commit | Writes/s | p50 | p99 | Writes per fsync |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: |");
    for (inflight, writes) in [(1, 300), (4, 1_000), (32, 4_000)] {
        let writes = writes / scale;
        let mut results: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            for (i, group) in [false, true].into_iter().enumerate() {
                results[i].push(round(group, inflight, writes).await);
            }
        }
        for (i, name) in ["one per write", "group"].into_iter().enumerate() {
            let r = &results[i];
            println!(
                "| {inflight} | {name} | {:.0} | {:.2} ms | {:.2} ms | {:.1} |",
                median(r.iter().map(|r| r.per_s).collect()),
                median(r.iter().map(|r| ms(r.p50)).collect()),
                median(r.iter().map(|r| ms(r.p99)).collect()),
                median(r.iter().map(|r| r.per_commit).collect()),
            );
        }
    }
}
