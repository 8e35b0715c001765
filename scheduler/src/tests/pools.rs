//! Pools through a whole scheduler: warm backends kept by the converger (passes run by hand
//! where the bound per pass is the point), claims by connects, rollouts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_core::drone::{BackendEvent, SchedulerMessage};
use hangar_core::pool::{CreatePool, PoolSettings, RollbackRequest, RolloutRequest, Template};
use hangar_core::{BackendId, BackendState, TerminationReason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{Fixture, hello, key};
use crate::Scheduler;
use crate::pools::converger::Converger;

/// Claims a backend received: (authorization, key, epoch).
type Claims = Arc<Mutex<Vec<(String, String, String)>>>;

/// A backend address that answers claims with 200 and records them.
async fn claim_server() -> (SocketAddr, Claims) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let claims: Claims = Arc::default();
    let seen = claims.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let field = |name: &str| {
                    head.lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                        .unwrap_or_default()
                        .to_string()
                };
                seen.lock().unwrap().push((
                    field("authorization"),
                    field("x-hangar-key"),
                    field("x-hangar-epoch"),
                ));
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    (addr, claims)
}

/// Spawns seen by the fake drone: (backend, env).
type Spawns = Arc<Mutex<Vec<(BackendId, BTreeMap<String, String>)>>>;

/// Plays drone `d1` run `r1`: every spawn becomes ready at `addr` unless its command is
/// `fail` (then it fails to start), every stop exits. `hold` keeps spawns starting while set.
async fn fake_drone(
    s: &Scheduler,
    addr: SocketAddr,
) -> (Spawns, Arc<std::sync::atomic::AtomicBool>) {
    fake_drone_named(s, "d1", "r1", addr).await
}

async fn fake_drone_named(
    s: &Scheduler,
    drone: &'static str,
    run: &'static str,
    addr: SocketAddr,
) -> (Spawns, Arc<std::sync::atomic::AtomicBool>) {
    let mut held = s
        .handles()
        .sessions
        .admit(&hello(drone, run), true)
        .await
        .unwrap();
    let spawns: Spawns = Arc::default();
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (seen, h, sched) = (spawns.clone(), hold.clone(), s.clone());
    tokio::spawn(async move {
        let backends = sched.handles().backends.clone();
        let mut parked = Vec::new();
        while let Some(cmd) = held.commands.recv().await {
            match cmd {
                SchedulerMessage::Spawn(c) => {
                    seen.lock()
                        .unwrap()
                        .push((c.backend.clone(), c.env.clone()));
                    let fail = c.command.as_ref().is_some_and(|c| c[0] == "fail");
                    let events = if fail {
                        vec![BackendEvent::SpawnFailed {
                            message: "no such image".into(),
                        }]
                    } else {
                        vec![BackendEvent::Starting]
                    };
                    for ev in events {
                        let _ = backends.apply_event(drone, run, &c.backend, ev).await;
                    }
                    if fail {
                        continue;
                    }
                    if h.load(std::sync::atomic::Ordering::SeqCst) {
                        parked.push(c.backend);
                        continue;
                    }
                    for id in std::mem::take(&mut parked).into_iter().chain([c.backend]) {
                        let _ = backends
                            .apply_event(drone, run, &id, BackendEvent::Ready { address: addr })
                            .await;
                    }
                }
                SchedulerMessage::Terminate { backend, .. } => {
                    let _ = backends
                        .apply_event(
                            drone,
                            run,
                            &backend,
                            BackendEvent::Exited { exit_code: Some(0) },
                        )
                        .await;
                }
                SchedulerMessage::Logs(_) | SchedulerMessage::CancelLogs { .. } => {}
            }
        }
    });
    (spawns, hold)
}

/// The converger of the current leader, for passes run by hand.
fn converger(s: &Scheduler) -> Converger {
    s.converger(s.handles().leadership.token().expect("it leads"))
}

/// Waits (bounded) until `check` holds for the pool's (ready warm, starting warm, claimed).
async fn wait_members(s: &Scheduler, pool: &str, check: impl Fn(u32, u32, u32) -> bool) {
    let mut tables = s.handles().routes.subscribe();
    let counts = || {
        let m = s.handles().routes.pool_members(pool);
        let ready = m.iter().filter(|(_, f)| f.unclaimed && f.ready).count() as u32;
        let starting = m.iter().filter(|(_, f)| f.unclaimed && !f.ready).count() as u32;
        let claimed = m.iter().filter(|(_, f)| !f.unclaimed).count() as u32;
        (ready, starting, claimed)
    };
    let wait = async {
        loop {
            let (r, st, c) = counts();
            if check(r, st, c) {
                return;
            }
            tables.changed().await.unwrap();
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .is_err()
    {
        panic!(
            "pool {pool} never got there: (ready, starting, claimed) = {:?}",
            counts()
        );
    }
}

fn template(command: &str) -> Template {
    Template {
        command: Some(vec![command.into()]),
        ..Default::default()
    }
}

async fn create(s: &Scheduler, name: &str, warm: u32, command: &str) {
    s.handles()
        .pools
        .create(CreatePool {
            name: name.into(),
            settings: PoolSettings {
                warm: Some(warm),
                ..Default::default()
            },
            template: template(command),
        })
        .await
        .unwrap();
}

/// Sets pool `name`'s warm target.
async fn set_warm(s: &Scheduler, name: &str, warm: u32) {
    s.handles()
        .pools
        .set(
            name,
            PoolSettings {
                warm: Some(warm),
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

/// Counts the pool's unclaimed members per state.
fn warm_counts(s: &Scheduler, pool: &str) -> (usize, usize) {
    let m = s.handles().routes.pool_members(pool);
    (
        m.iter().filter(|(_, f)| f.unclaimed && f.ready).count(),
        m.iter().filter(|(_, f)| f.unclaimed && !f.ready).count(),
    )
}

/// Backend `id`'s record (it must exist).
async fn record(s: &Scheduler, id: &str) -> (crate::records::BackendRecord, u64) {
    s.handles().backends.get(id).await.unwrap().unwrap()
}

/// A scheduler whose converger runs only by hand (the one returned), a fake drone, and pool
/// `default` holding one ready warm backend.
async fn one_ready_warm() -> (Fixture, Converger) {
    let f = Fixture::start(|c| c.run_pool_converger = false).await;
    let (addr, _) = claim_server().await;
    fake_drone(&f.sched, addr).await;
    create(&f.sched, "default", 1, "true").await;
    let c = converger(&f.sched);
    c.pass().await.unwrap();
    wait_members(&f.sched, "default", |r, s, _| r == 1 && s == 0).await;
    (f, c)
}

/// Waits until the route table reflects the store's latest revision.
async fn settle(s: &Scheduler) {
    let rev = s.handles().store.revision().await.unwrap();
    s.handles().routes.wait_for(rev).await;
}

/// The bound holds in both directions with passes run by hand: 20 warm fill 7 per pass; lowered
/// to 1, one goes per pass, those not ready first.
#[tokio::test]
async fn warm_backends_are_added_and_removed_within_the_bounds_per_pass() {
    let f = Fixture::start(|c| c.run_pool_converger = false).await;
    let (addr, _) = claim_server().await;
    let (spawns, hold) = fake_drone(&f.sched, addr).await;
    create(&f.sched, "rooms", 20, "true").await;
    let c = converger(&f.sched);

    hold.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut total = 0;
    for expected in [7, 7, 6, 0] {
        c.pass().await.unwrap();
        settle(&f.sched).await;
        let (ready, starting) = warm_counts(&f.sched, "rooms");
        assert_eq!(
            ready + starting,
            total + expected,
            "one pass adds at most 7"
        );
        total += expected;
    }
    // The relay hands the spawns to the drone as it follows the records.
    let relayed = async {
        while spawns.lock().unwrap().len() < 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), relayed)
        .await
        .expect("20 spawns relayed to the drone");
    assert_eq!(spawns.lock().unwrap().len(), 20);
    // Every warm backend got its own claim secret.
    let secrets: std::collections::HashSet<_> = spawns
        .lock()
        .unwrap()
        .iter()
        .map(|(_, env)| env.get("HANGAR_CLAIM_TOKEN").cloned().unwrap())
        .collect();
    assert_eq!(secrets.len(), 20);

    // Let all but 3 become ready... by releasing the drone: the next spawn releases the
    // parked ones. Instead: lower the target first, while all 20 are still starting but 17.
    hold.store(false, std::sync::atomic::Ordering::SeqCst);
    // One more backend through the drone releases the parked ones (the drone readies them).
    f.sched
        .handles()
        .connector
        .connect(hangar_core::api::ConnectRequest {
            spawn: Some(hangar_core::api::SpawnSpec {
                command: Some(vec!["true".into()]),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_members(&f.sched, "rooms", |r, _, _| r == 20).await;

    // Three that are not ready yet (held) and 20 ready: lower to 1.
    hold.store(true, std::sync::atomic::Ordering::SeqCst);
    set_warm(&f.sched, "rooms", 23).await;
    c.pass().await.unwrap();
    settle(&f.sched).await;
    assert_eq!(warm_counts(&f.sched, "rooms"), (20, 3));
    f.sched
        .handles()
        .pools
        .set(
            "rooms",
            PoolSettings {
                warm: Some(1),
                max_remove: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for (ready, starting) in [(20, 2), (20, 1), (20, 0), (19, 0), (18, 0)] {
        c.pass().await.unwrap();
        settle(&f.sched).await;
        assert_eq!(
            warm_counts(&f.sched, "rooms"),
            (ready, starting),
            "one removal per pass, not-ready ones first"
        );
    }
    // Those removed were stopped as surplus, never a claimed one.
    let surplus = f
        .sched
        .handles()
        .backends
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.record.state.termination_reason() == Some(&TerminationReason::Surplus))
        .count();
    assert_eq!(surplus, 5);
    f.stop().await;
}

/// A burst of connects for new keys takes the warm backends first, then starts cold; the
/// converger refills; a claimed backend is told its key and epoch with its secret, routes
/// with them, and is no longer warm.
#[tokio::test]
async fn connects_claim_warm_backends_first_then_start_cold_and_the_pool_refills() {
    let f = Fixture::start(|c| c.pool_interval = Duration::from_millis(20)).await;
    let (addr, claims) = claim_server().await;
    let (spawns, _) = fake_drone(&f.sched, addr).await;
    create(&f.sched, "default", 5, "true").await;
    wait_members(&f.sched, "default", |r, _, _| r == 5).await;
    let warm: Vec<BackendId> = f
        .sched
        .handles()
        .routes
        .pool_members("default")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // Warm backends are not routable.
    let table = f.sched.handles().routes.current();
    for id in &warm {
        assert_eq!(
            table.get(id.as_str()).map(|r| r.state),
            Some(hangar_core::route::RouteState::Gone)
        );
    }

    let connector = f.sched.handles().connector.clone();
    let burst = (0..20).map(|i| {
        let c = connector.clone();
        async move { c.connect(key(&format!("room-{i}"))).await.unwrap() }
    });
    let answers = futures_util::future::join_all(burst).await;
    let served_warm: Vec<_> = answers.iter().filter(|a| a.warm).collect();
    assert!(
        (5..20).contains(&served_warm.len()),
        "{} warm of 20: the five warm ones go first, then cold starts (the converger may refill meanwhile)",
        served_warm.len()
    );
    assert!(served_warm.iter().all(|a| a.spawned && a.status == "ready"));
    assert!(answers.iter().filter(|a| !a.warm).all(|a| a.spawned));
    for id in &warm {
        assert!(
            served_warm.iter().any(|a| a.backend_id == *id),
            "every warm backend present before the burst was claimed"
        );
    }
    // Every claimed backend was told its key and epoch, with its secret.
    let told = claims.lock().unwrap().clone();
    assert_eq!(told.len(), served_warm.len());
    for (auth, key, epoch) in &told {
        assert!(auth.starts_with("Bearer ") && auth.len() > 20, "{auth}");
        assert!(key.starts_with("default/room-"), "{key}");
        assert_eq!(epoch, "1");
    }
    // A claimed backend routes with its key and epoch, and reconnecting finds the same one.
    let first = served_warm[0];
    let table = f.sched.handles().routes.current();
    let route = table.get(first.backend_id.as_str()).unwrap();
    assert_eq!(route.state, hangar_core::route::RouteState::Ready);
    assert_eq!(
        route.key.as_deref(),
        first.key.as_ref().map(|k| k.to_string()).as_deref()
    );
    assert_eq!(route.epoch, 1);
    let again = connector
        .connect(key(&first.key.as_ref().unwrap().name))
        .await
        .unwrap();
    assert_eq!(again.backend_id, first.backend_id);
    assert!(!again.spawned);

    // The pool refills to 5 warm, with the claimed ones counted apart.
    wait_members(&f.sched, "default", |r, _, c| r == 5 && c == 20).await;
    // Never more started than needed: the first five, one refill per claim, the cold starts
    // (5 + W + (20 - W)).
    let relayed = async {
        while spawns.lock().unwrap().len() < 25 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), relayed)
        .await
        .expect("25 spawns relayed to the drone");
    assert_eq!(spawns.lock().unwrap().len(), 25);
    f.stop().await;
}

/// A warm backend is claimed once: two connects racing for the same one never both get it,
/// and the converger never removes a claimed one.
#[tokio::test]
async fn a_warm_backend_is_claimed_once_and_never_removed_once_claimed() {
    let (f, c) = one_ready_warm().await;
    let connector = f.sched.handles().connector.clone();
    let (a, b) = tokio::join!(connector.connect(key("x")), connector.connect(key("y")));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.backend_id, b.backend_id);
    assert_eq!(
        u8::from(a.warm) + u8::from(b.warm),
        1,
        "one warm backend, one claim"
    );
    // Lower the target to 0: the claimed one stays.
    set_warm(&f.sched, "default", 0).await;
    c.pass().await.unwrap();
    settle(&f.sched).await;
    let warm_id = if a.warm { &a.backend_id } else { &b.backend_id };
    let (rec, _) = record(&f.sched, warm_id.as_str()).await;
    assert_eq!(rec.state, BackendState::Ready);
    f.stop().await;
}

/// A rollout with a canary gives its share of new keys the new generation, each key keeping
/// it on reconnect; a rollout whose starts fail reverts by itself, touching no live session;
/// a rollback switches new spawns at once.
#[tokio::test]
async fn rollouts_canary_revert_and_rollback() {
    let f = Fixture::start(|c| c.pool_interval = Duration::from_millis(20)).await;
    let (addr, _) = claim_server().await;
    fake_drone(&f.sched, addr).await;
    create(&f.sched, "default", 0, "v1").await;
    let pools = f.sched.handles().pools.clone();
    let connector = f.sched.handles().connector.clone();
    let p = pools
        .rollout(
            "default",
            RolloutRequest {
                command: Some(vec!["v2".into()]),
                canary_percent: Some(20),
                deadline_s: Some(3600),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(p.rollout.as_ref().unwrap().generation, 2);
    let mut generations = BTreeMap::new();
    for i in 0..50 {
        let r = connector.connect(key(&format!("k{i}"))).await.unwrap();
        let (rec, _) = record(&f.sched, r.backend_id.as_str()).await;
        let g = rec.pool.as_ref().unwrap().generation;
        assert_eq!(
            rec.spawn.command.as_deref(),
            Some(&[format!("v{g}")][..]),
            "generation {g} runs its template"
        );
        generations.insert(i, (r.backend_id, g));
    }
    let canary = generations.values().filter(|(_, g)| *g == 2).count();
    assert!(
        (4..=18).contains(&canary),
        "{canary} of 50 keys on the canary (20%)"
    );
    // A key keeps its generation: stop some backends and reconnect.
    for i in 0..10 {
        let (id, g) = generations[&i].clone();
        f.sched
            .handles()
            .backends
            .terminate(id.as_str(), TerminationReason::Requested, false)
            .await
            .unwrap();
        let wait = async {
            loop {
                let (rec, _) = record(&f.sched, id.as_str()).await;
                if !rec.state.is_live() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .unwrap();
        let r = connector.connect(key(&format!("k{i}"))).await.unwrap();
        assert_ne!(r.backend_id, id);
        let (rec, _) = record(&f.sched, r.backend_id.as_str()).await;
        assert_eq!(
            rec.pool.as_ref().unwrap().generation,
            g,
            "key k{i} keeps its generation"
        );
    }

    // Rollback: new spawns go back to generation 1 at once.
    let p = pools
        .rollback("default", RollbackRequest::default())
        .await
        .unwrap();
    assert!(p.rollout.is_none());
    assert_eq!(p.generation, 1);
    for i in 100..110 {
        let r = connector.connect(key(&format!("k{i}"))).await.unwrap();
        let (rec, _) = record(&f.sched, r.backend_id.as_str()).await;
        assert_eq!(rec.pool.as_ref().unwrap().generation, 1);
    }

    // A rollout to something that cannot start reverts by itself; live sessions stay.
    let live_before: Vec<BackendId> = f
        .sched
        .handles()
        .routes
        .pool_members("default")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    set_warm(&f.sched, "default", 2).await;
    pools
        .rollout(
            "default",
            RolloutRequest {
                command: Some(vec!["fail".into()]),
                deadline_s: Some(3600),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let wait = async {
        loop {
            let p = pools.get("default").unwrap();
            if p.rollout.is_none() {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let p = tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the broken rollout reverts within 10 s");
    assert_eq!(p.generation, 1);
    let g3 = p.generations.iter().find(|g| g.number == 3).unwrap();
    assert_eq!(g3.status, "reverted");
    assert!(
        g3.message.as_deref().unwrap().contains("failed"),
        "{:?}",
        g3.message
    );
    assert!(p.status.failed_starts >= 2);
    for id in &live_before {
        let (rec, _) = record(&f.sched, id.as_str()).await;
        assert!(rec.state.is_live(), "live session {id} untouched");
    }
    // And the pool fills with generation 1 again.
    wait_members(&f.sched, "default", |r, _, _| r == 2).await;
    f.stop().await;
}

/// A claim and the converger's removal of the same warm backend race: exactly one wins. The
/// connect either got the warm backend (and it stays ready) or a cold one (and the warm one
/// was stopped as surplus); never a claimed backend that is being stopped.
#[tokio::test]
async fn a_claim_racing_a_removal_never_hands_out_a_stopping_backend() {
    let f = Fixture::start(|c| c.run_pool_converger = false).await;
    let (addr, _) = claim_server().await;
    fake_drone(&f.sched, addr).await;
    create(&f.sched, "default", 1, "true").await;
    let c = converger(&f.sched);
    for round in 0..20 {
        // One ready warm backend, then the target drops to 0 while a connect comes in.
        set_warm(&f.sched, "default", 1).await;
        c.pass().await.unwrap();
        wait_members(&f.sched, "default", |r, s, _| r == 1 && s == 0).await;
        set_warm(&f.sched, "default", 0).await;
        let connector = f.sched.handles().connector.clone();
        let (removed, connected) =
            tokio::join!(c.pass(), connector.connect(key(&format!("race-{round}"))));
        removed.unwrap();
        let r = connected.unwrap();
        let (rec, _) = record(&f.sched, r.backend_id.as_str()).await;
        assert!(
            rec.holds_key(),
            "round {round}: the connect's backend is {} (warm: {})",
            rec.state,
            r.warm
        );
        settle(&f.sched).await;
        assert_eq!(warm_counts(&f.sched, "default"), (0, 0), "round {round}");
    }
    f.stop().await;
}

/// The same race with the feed held, so that the table still shows the removed warm backend
/// as ready while the connect runs (as under load, when the feed falls behind): the connect
/// tries it once, and then starts a cold one instead of retrying it until it gives up.
#[tokio::test]
async fn a_connect_does_not_retry_a_warm_backend_it_failed_to_claim_while_the_feed_lags() {
    use hangar_store::{Store, WatchEvent};

    let (f, c) = one_ready_warm().await;
    let ready = |s: &Scheduler| -> Vec<BackendId> {
        let m = s.handles().routes.pool_members("default");
        m.into_iter()
            .filter(|(_, f)| f.unclaimed && f.ready)
            .map(|(id, _)| id)
            .collect()
    };
    let warm_id = ready(&f.sched)[0].clone();
    set_warm(&f.sched, "default", 0).await;

    let routes = f.sched.handles().routes.clone();
    routes.hold_feed(true);
    let from = f.store.revision().await.unwrap() + 1;
    c.pass().await.unwrap();
    let (stopping, _) = record(&f.sched, warm_id.as_str()).await;
    assert!(!stopping.holds_key() && stopping.state != BackendState::Ready);
    assert_eq!(
        ready(&f.sched),
        std::slice::from_ref(&warm_id),
        "the held feed still shows the removed backend as ready"
    );

    // The connect's key written means it placed a backend while the feed is still held.
    let mut keys = f
        .store
        .watch(crate::records::KEYS_PREFIX, from)
        .await
        .unwrap();
    let connector = f.sched.handles().connector.clone();
    let mut connect = tokio::spawn(async move { connector.connect(key("lagging")).await });
    tokio::select! {
        ev = keys.recv() => assert!(matches!(ev, Some(WatchEvent::Put(_))), "{ev:?}"),
        done = &mut connect => panic!("the connect ended while the feed was held: {done:?}"),
    }
    routes.hold_feed(false);
    let r = connect
        .await
        .unwrap()
        .expect("the connect starts a cold backend");
    assert!(!r.warm);
    assert_ne!(r.backend_id, warm_id);
    let (rec, _) = record(&f.sched, r.backend_id.as_str()).await;
    assert!(rec.holds_key(), "the connect's backend is {}", rec.state);
    f.stop().await;
}
