//! The tasks the role builders spawn: the servers, and the small loops that connect the
//! libraries inside one process. Route tables, revocations and ACME challenges flow from the
//! scheduler to the proxy and DNS; the proxy's activity flows back to the scheduler. Each
//! runs until its `cancel` fires.

use std::sync::Arc;
use std::time::Duration;

use hangar_core::activity::ActivityBatch;
use hangar_dns::{DnsError, DnsServer};
use hangar_proxy::{Proxy, ProxyRunError, RemoteConfig, RemoteError};
use hangar_scheduler::Scheduler;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::MetricsListener;

/// How often the proxy's activity is handed to the scheduler (bounds idle-timeout precision).
const ACTIVITY_INTERVAL: Duration = Duration::from_millis(250);

/// The proxy's name in its activity reports when it shares the scheduler's process, followed
/// by `@<instance>`: every instance has one, and the leader (to which followers forward their
/// reports) keeps cumulative counters per proxy name.
const LOCAL_PROXY: &str = "local";

/// Serves the API until `cancel` fires.
pub async fn serve_api(
    scheduler: Scheduler,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tasks: TaskTracker,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let Some(acceptor) = tls else {
        return scheduler.serve_api(listener, cancel).await;
    };
    let listener = crate::tls::TlsListener::new(listener, acceptor, &tasks, cancel.clone())?;
    axum::serve(listener, scheduler.router())
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

/// Serves plain-text proxy connections until `cancel` fires.
pub async fn serve_proxy(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    cancel: CancellationToken,
) -> Result<(), ProxyRunError> {
    proxy.run(listener, cancel).await
}

/// Follows the scheduler's route feed into the proxy and reports the proxy's activity back,
/// until `cancel` fires or the scheduler refuses this proxy for good (`hangar proxy`).
pub async fn follow_scheduler(
    proxy: Arc<Proxy>,
    remote: RemoteConfig,
    cancel: CancellationToken,
) -> Result<(), RemoteError> {
    proxy.follow(remote, cancel).await
}

/// Serves `GET /metrics` as a task of `tasks`. With a proxy, its per-backend counts are copied
/// into the recorder before every scrape and expire after the same grace period.
pub fn serve_metrics(
    metrics: MetricsListener,
    proxy: Option<&Proxy>,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) {
    let grace = metrics.grace();
    let (mut server, listener) = metrics.into_server();
    if let Some(proxy) = proxy {
        let activity = proxy.activity();
        activity.set_metrics_grace(grace);
        server = server.collect(move || activity.publish_metrics());
    }
    tasks.spawn(server.run(listener, cancel.clone()));
}

/// Serves DNS on the bound sockets, answering from the same route tables as the proxy and
/// with the ACME challenge values stored through the API. The returned task is the server's:
/// its end before shutdown is an error.
pub fn serve_dns(
    dns: DnsServer,
    (udp, tcp): (UdpSocket, TcpListener),
    scheduler: &Scheduler,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) -> JoinHandle<Result<(), DnsError>> {
    tasks.spawn(pump_dns_routes(
        scheduler.clone(),
        dns.clone(),
        cancel.clone(),
    ));
    tasks.spawn(pump_acme(scheduler.clone(), dns.clone(), cancel.clone()));
    let cancel = cancel.clone();
    tasks.spawn(async move { dns.run(udp, tcp, cancel).await })
}

/// Scheduler → proxy: publishes every set of revoked tokens.
pub async fn pump_revocations(scheduler: Scheduler, proxy: Arc<Proxy>, cancel: CancellationToken) {
    let mut revocations = scheduler.revocations();
    loop {
        let set = revocations.borrow_and_update().clone();
        proxy.publish_revocations(set);
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = revocations.changed() => if changed.is_err() { return },
        }
    }
}

/// Proxy → scheduler: hands over the proxy's per-backend activity every
/// [`ACTIVITY_INTERVAL`], for idle timeouts and the hot-shard detector.
pub async fn pump_activity(scheduler: Scheduler, proxy: Arc<Proxy>, cancel: CancellationToken) {
    let activity = proxy.activity();
    let name = format!("{LOCAL_PROXY}@{}", scheduler.config().instance_id);
    let mut tick = tokio::time::interval(ACTIVITY_INTERVAL);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        scheduler.report_activity(&ActivityBatch {
            proxy: name.clone(),
            reports: activity.snapshot(),
        });
    }
}

/// Scheduler → DNS: publishes every route table (names answer while their backend is live).
async fn pump_dns_routes(scheduler: Scheduler, dns: DnsServer, cancel: CancellationToken) {
    dns.follow_routes(scheduler.routes(), cancel).await
}

/// Store → DNS: follows the ACME challenge records and publishes every snapshot of them as
/// TXT records.
async fn pump_acme(scheduler: Scheduler, dns: DnsServer, cancel: CancellationToken) {
    let feed = scheduler.acme_feed();
    let mut acme = feed.subscribe();
    let publish = async {
        loop {
            let snapshot = acme.borrow_and_update().clone();
            dns.publish_acme_challenges(
                snapshot
                    .challenges
                    .iter()
                    .map(|ch| (ch.name.as_str(), ch.value.as_str())),
            );
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = acme.changed() => if changed.is_err() { return },
            }
        }
    };
    tokio::join!(feed.run(cancel.clone()), publish);
}
