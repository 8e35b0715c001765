//! Micro-benchmarks of the proxy's per-request work that does not touch the network: finding
//! the backend a request names (Host, header, cookie) and verifying its token.
//!
//! Run: `cargo bench --bench proxy_path`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use hangar_core::BackendId;
use hangar_core::route::{self, RequestNames, Route, RouteState, RouteTable};
use hangar_core::token::TokenKey;

const DOMAIN: &str = "hangar.localhost";

fn table(n: usize) -> (RouteTable, Vec<BackendId>) {
    let ids: Vec<BackendId> = (0..n).map(|_| BackendId::generate()).collect();
    let routes = ids.iter().map(|id| Route {
        address: Some("127.0.0.1:9000".parse().unwrap()),
        ..Route::new(id.clone(), RouteState::Ready)
    });
    (RouteTable::new(1, routes), ids)
}

fn resolution(c: &mut Criterion) {
    let (table, ids) = table(10_000);
    let id = ids[4321].as_str();
    let host = format!("{id}.{DOMAIN}:8080");
    let cookie = format!("session=abc; hangar-backend={id}; theme=dark");
    let mut g = c.benchmark_group("resolve_and_lookup");
    g.bench_function("host", |b| {
        let names = RequestNames {
            host: Some(&host),
            header: None,
            cookies: &[],
        };
        b.iter(|| {
            let (name, _) = route::resolve(black_box(&names), DOMAIN).unwrap();
            black_box(table.get(&name).is_some())
        })
    });
    g.bench_function("header", |b| {
        let names = RequestNames {
            host: Some("127.0.0.1:8080"),
            header: Some(id),
            cookies: &[],
        };
        b.iter(|| {
            let (name, _) = route::resolve(black_box(&names), DOMAIN).unwrap();
            black_box(table.get(&name).is_some())
        })
    });
    g.bench_function("cookie", |b| {
        let cookies = [cookie.as_str()];
        let names = RequestNames {
            host: Some("127.0.0.1:8080"),
            header: None,
            cookies: &cookies,
        };
        b.iter(|| {
            let (name, _) = route::resolve(black_box(&names), DOMAIN).unwrap();
            black_box(table.get(&name).is_some())
        })
    });
    g.finish();
}

fn tokens(c: &mut Criterion) {
    let key = TokenKey::generate();
    let token = key.sign("b0123456789ab", "alice@example.com", 4_000_000_000);
    c.bench_function("token_verify", |b| {
        b.iter(|| black_box(key.verify(black_box(&token), "b0123456789ab", 1_700_000_000)))
    });
}

criterion_group!(benches, resolution, tokens);
criterion_main!(benches);
