//! High availability: three `hangar serve` instances on one three-member etcd cluster
//! (`hangar_store::testing::EtcdCluster`, real etcd child processes), one process drone and a
//! remote proxy that both follow every instance (`--scheduler a,b,c`).
//!
//! The instances share one token key (`--token-key`), so a token issued through any of them
//! verifies on every proxy; each has a data directory of its own (its `instance.id`). Leases
//! are short (`--lease-ttl 3 --leader-ttl 3`): a drone fences 2.25 s after its last
//! acknowledged heartbeat, and a leader that is gone is replaced once its lease runs out.
//!
//! What is asserted: killing the leader moves leadership within the leader TTL plus 1.5 s and
//! loses no backend (same processes, counters continue); a rolling restart of every instance
//! loses no session and fails no proxied request; a follower holding a drone's session relays
//! the leader's commands to it, also one the leader wrote just before it was killed; killing
//! etcd's leader member changes nothing in Hangar's leadership. Every wait polls a condition with a deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar_core::api::ConnectResponse;
use hangar_core::token::TokenKey;
use hangar_store::testing::EtcdCluster;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::cluster::{Drone, RemoteProxy, SECRET};
use crate::support::{DEADLINE, Dev, send_signal};

/// `--leader-ttl` and `--lease-ttl` of the instances (unless a test says otherwise).
const TTL: Duration = Duration::from_secs(3);

/// The drone's capacity (plenty for the few backends here).
const SMALL: &[&str] = &["--cpu-millis", "1000", "--memory-mb", "1024"];

/// Three `serve` instances on a three-member etcd.
struct Plane {
    /// By index (`a`, `b`, `c`); `None` while stopped. Declared first: dropped (killed)
    /// before etcd.
    instances: Vec<Option<Dev>>,
    /// Each instance's `--api` and `--proxy`, kept across restarts.
    addrs: Vec<(SocketAddr, SocketAddr)>,
    /// Each instance's id (`instance.id` in its data directory).
    ids: Vec<String>,
    /// The token key every instance signs and verifies with (hex).
    key: String,
    /// `--lease-ttl` and `--leader-ttl` of every instance.
    ttls: (Duration, Duration),
    etcd: EtcdCluster,
    dir: TempDir,
}

impl Plane {
    /// Starts etcd, then instance 0 (and waits until it leads, so that the first URL the
    /// drone tries is the leader's), then the others.
    async fn start(instances: usize) -> Plane {
        Self::start_with(instances, TTL, TTL).await
    }

    /// [`Plane::start`] with these `--lease-ttl` (drones) and `--leader-ttl`.
    async fn start_with(instances: usize, lease_ttl: Duration, leader_ttl: Duration) -> Plane {
        let etcd = EtcdCluster::start(3).await;
        let mut plane = Plane {
            instances: Vec::new(),
            addrs: Vec::new(),
            ids: Vec::new(),
            key: TokenKey::generate().to_hex(),
            ttls: (lease_ttl, leader_ttl),
            etcd,
            dir: tempfile::tempdir().unwrap(),
        };
        for i in 0..instances {
            let dev = plane.spawn(i, None);
            plane.addrs.push((dev.api, dev.proxy));
            let view: Value = dev.get_json("/v1/cluster").await;
            plane
                .ids
                .push(view["this_instance"].as_str().unwrap().to_string());
            plane.instances.push(Some(dev));
            if i == 0 {
                let (leader, _) = plane.wait_leader(0, |_| true).await;
                assert_eq!(leader, plane.ids[0], "the first instance leads");
            }
        }
        // Everyone sees everyone.
        for i in 0..instances {
            plane
                .poll(i, "every instance listed", |v| {
                    v["instances"].as_array().map(Vec::len) == Some(instances)
                })
                .await;
        }
        plane
    }

    /// Starts `serve` number `i` on its data directory; on the given addresses (a restart)
    /// or fresh ports.
    fn spawn(&self, i: usize, at: Option<(SocketAddr, SocketAddr)>) -> Dev {
        let store = self.etcd.url();
        let lease_ttl = self.ttls.0.as_secs().to_string();
        let leader_ttl = self.ttls.1.as_secs().to_string();
        let (api, proxy) = match at {
            Some((api, proxy)) => (api.to_string(), proxy.to_string()),
            None => ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string()),
        };
        let mut dev = Dev::start_role_in(
            None,
            "serve",
            &self.dir.path().join(format!("serve-{i}")),
            &[
                "--store",
                &store,
                "--drone-secret",
                SECRET,
                "--lease-ttl",
                &lease_ttl,
                "--leader-ttl",
                &leader_ttl,
                "--dns",
                "off",
                "--metrics",
                "127.0.0.1:0",
                "--token-key",
                &self.key,
                "--api",
                &api,
                "--proxy",
                &proxy,
            ],
        );
        // The first instance wrote the cluster's admin token; the others use it too.
        if dev.token.is_none()
            && let Ok(token) =
                std::fs::read_to_string(self.dir.path().join("serve-0").join("admin.token"))
        {
            dev.use_token(token.trim());
        }
        dev
    }

    fn dev(&self, i: usize) -> &Dev {
        self.instances[i].as_ref().expect("the instance runs")
    }

    /// A process drone `d1` given every instance's URL, once instance 0 lists it ready.
    async fn drone(&self) -> Drone {
        let d = Drone::spawn_for(None, &self.urls(), "d1", "process", self.dir.path(), SMALL);
        self.dev(0).wait_drone("d1", "ready").await;
        d
    }

    /// Every instance's API URL, comma-separated (`--scheduler` of the drone and proxy).
    fn urls(&self) -> String {
        self.addrs
            .iter()
            .map(|(api, _)| format!("http://{api}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Running instances.
    fn live(&self) -> impl Iterator<Item = (usize, &Dev)> {
        self.instances
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.as_ref().map(|d| (i, d)))
    }

    fn index_of(&self, id: &str) -> usize {
        self.ids.iter().position(|i| i == id).expect("a known id")
    }

    /// Polls instance `i`'s `GET /v1/cluster` until `pred` holds; returns the view.
    async fn poll(&self, i: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let view = get_json(self.dev(i), "/v1/cluster").await;
            if let Some(v) = &view
                && pred(v)
            {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "instance {i}: never {what}; last /v1/cluster: {view:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Polls instance `i` until it names a leader for which `pred` holds.
    async fn wait_leader(&self, i: usize, pred: impl Fn(&str) -> bool) -> (String, u64) {
        let v = self
            .poll(i, "saw the expected leader", |v| {
                leader_of(v).is_some_and(|(l, _)| pred(&l))
            })
            .await;
        leader_of(&v).unwrap()
    }

    /// The instance whose `/v1/drones` shows `drone` ready, if any.
    async fn drone_ready_on(&self, drone: &str) -> Option<usize> {
        for (i, dev) in self.live() {
            if let Some(list) = get_json(dev, "/v1/drones").await
                && list["drones"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|d| d["name"] == drone && d["state"] == "ready")
            {
                return Some(i);
            }
        }
        None
    }

    /// Polls until some instance has `drone` ready; returns that instance.
    async fn wait_drone_somewhere(&self, drone: &str) -> usize {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(i) = self.drone_ready_on(drone).await {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "drone {drone} is ready on no instance"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// `GET` a JSON path, `None` on any failure (an instance going away, a 5xx).
async fn get_json(dev: &Dev, path: &str) -> Option<Value> {
    let r = dev
        .http
        .get(dev.api_url(path))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// The leader a `/v1/cluster` view names: (instance, term).
fn leader_of(view: &Value) -> Option<(String, u64)> {
    let l = view.get("leader")?;
    Some((l["instance"].as_str()?.to_string(), l["term"].as_u64()?))
}

/// `POST /v1/connect` on `dev`, tolerating failures: the response or why not.
async fn try_connect(dev: &Dev, body: &Value) -> Result<ConnectResponse, String> {
    let r = dev
        .http
        .post(dev.api_url("/v1/connect"))
        .json(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let text = r.text().await.map_err(|e| e.to_string())?;
    if status == 200 || status == 201 {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        Err(format!("{status} {text}"))
    }
}

/// Connects `body` on `dev` until it succeeds (or fails the test at `limit` from `since`);
/// returns the response and how long after `since` it succeeded.
async fn connect_until(
    dev: &Dev,
    body: &Value,
    since: Instant,
    limit: Duration,
) -> (ConnectResponse, Duration) {
    loop {
        let last = match try_connect(dev, body).await {
            Ok(r) => return (r, since.elapsed()),
            Err(e) => e,
        };
        assert!(
            since.elapsed() < limit,
            "no connect of {body} succeeded within {limit:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A request to backend `r` through the proxy at `proxy`, named by Host.
fn via(
    http: &reqwest::Client,
    proxy: SocketAddr,
    r: &ConnectResponse,
    path: &str,
) -> reqwest::RequestBuilder {
    http.get(format!("http://{proxy}{path}"))
        .header(
            "host",
            format!("{}.hangar.localhost:{}", r.backend_id, proxy.port()),
        )
        .bearer_auth(&r.token)
        .timeout(Duration::from_secs(5))
}

/// `/count` of backend `r` through `proxy`: the count, or why not.
async fn count_via(
    http: &reqwest::Client,
    proxy: SocketAddr,
    r: &ConnectResponse,
) -> Result<u64, String> {
    let resp = via(http, proxy, r, "/count")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status} {text}"));
    }
    text.trim().parse().map_err(|e| format!("{text:?}: {e}"))
}

/// `/count` through `proxy` until it answers (a proxy whose route feed is a moment behind
/// answers 404 or waits; such requests never reach the backend, so they do not count).
async fn wait_count(http: &reqwest::Client, proxy: SocketAddr, r: &ConnectResponse) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match count_via(http, proxy, r).await {
            Ok(n) => return n,
            Err(e) => assert!(
                Instant::now() < deadline,
                "{} never answered through {proxy}: {e}",
                r.backend_id
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Connects `keys` through the instances in turn (writes on followers are forwarded to the
/// leader), waits until each backend is ready and answers through every instance's proxy;
/// returns the sessions and their counters (one count per proxy so far).
async fn connect_keys(plane: &Plane, keys: &[&str]) -> (Vec<ConnectResponse>, Vec<u64>) {
    let mut sessions = Vec::new();
    let mut counts = Vec::new();
    let live: Vec<(usize, &Dev)> = plane.live().collect();
    for (n, key) in keys.iter().enumerate() {
        let (_, dev) = live[n % live.len()];
        let r = dev.connect_key(key).await;
        assert!(r.spawned, "{key} is new");
        dev.wait_ready(r.backend_id.as_str()).await;
        let mut count = 0;
        for (_, d) in &live {
            let n = wait_count(&d.http, d.proxy, &r).await;
            assert_eq!(n, count + 1, "{key}: one counter, whichever proxy");
            count = n;
        }
        sessions.push(r);
        counts.push(count);
    }
    (sessions, counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_killing_the_leader_moves_leadership_and_loses_no_backend() {
    let started = Instant::now();
    let mut plane = Plane::start(3).await;
    let _drone = plane.drone().await;
    let (sessions, mut counts) = connect_keys(&plane, &["ha-1", "ha-2", "ha-3"]).await;
    let (loaded, _) = connect_keys(&plane, &["ha-load"]).await;

    let (old_leader, old_term) = leader_of(&plane.poll(1, "a view", |_| true).await).unwrap();
    let old = plane.index_of(&old_leader);
    assert_eq!(old, 0);
    // Under load: a client keeps using a live session through instance 1's proxy throughout
    // the kill and the failover; not one of its requests may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, http, proxy, r) = (
            stop.clone(),
            plane.dev(1).http.clone(),
            plane.dev(1).proxy,
            loaded[0].clone(),
        );
        tokio::spawn(async move {
            let (mut ok, mut failed, mut last) = (0u64, Vec::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                match count_via(&http, proxy, &r).await {
                    Ok(n) if n > last => {
                        ok += 1;
                        last = n;
                    }
                    Ok(n) => failed.push(format!("the counter went from {last} to {n}")),
                    Err(e) => failed.push(e),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, failed)
        })
    };
    let mut gone = plane.instances[old].take().unwrap();
    gone.kill9();
    let killed = Instant::now();

    // Another instance leads within the leader TTL + 1.5 s of the kill.
    let survivor = 1;
    let (new_leader, new_term) = plane.wait_leader(survivor, |l| l != old_leader).await;
    let failover = killed.elapsed();
    eprintln!("ha: {new_leader} leads (term {new_term}) {failover:?} after the leader was killed");
    assert!(
        failover <= TTL + Duration::from_millis(1500),
        "failover took {failover:?}"
    );
    assert!(
        new_term > old_term,
        "a new term: {new_term} after {old_term}"
    );
    let leader = plane.index_of(&new_leader);
    let other = 3 - old - leader;
    let (_, seen) = plane.wait_leader(other, |l| l == new_leader).await;
    assert_eq!(seen, new_term, "both survivors agree");

    // Connects succeed again on a survivor: an existing key gets its backend back, a new key
    // is placed (on the leader, wherever the request lands).
    let (again, existing_after) = connect_until(
        plane.dev(other),
        &json!({"key": {"name": "ha-1"}}),
        killed,
        DEADLINE,
    )
    .await;
    assert!(!again.spawned);
    assert_eq!(again.backend_id, sessions[0].backend_id);
    let (fresh, new_after) = connect_until(
        plane.dev(other),
        &json!({"key": {"name": "ha-new"}}),
        killed,
        DEADLINE,
    )
    .await;
    assert!(fresh.spawned);
    eprintln!(
        "ha: connects answer again {existing_after:?} (existing key) and {new_after:?} (new key) after the kill"
    );
    plane.dev(other).wait_ready(fresh.backend_id.as_str()).await;
    assert_eq!(
        wait_count(&plane.dev(other).http, plane.dev(other).proxy, &fresh).await,
        1
    );

    // Every backend is still ready and its process keeps its counter, through both
    // surviving proxies.
    for (r, count) in sessions.iter().zip(counts.iter_mut()) {
        let v = plane.dev(survivor).backend(r.backend_id.as_str()).await;
        assert_eq!(v.state.name(), "ready", "{v:?}");
        for i in [leader, other] {
            let d = plane.dev(i);
            let n = count_via(&d.http, d.proxy, r).await.unwrap();
            assert_eq!(
                n,
                *count + 1,
                "{}: same process, same counter",
                r.backend_id
            );
            *count = n;
        }
    }
    // The drone's session moved to a survivor; the leader sees it ready.
    plane.dev(leader).wait_drone("d1", "ready").await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    eprintln!(
        "ha: under load: {ok} proxied requests answered, {} failed",
        failed.len()
    );
    assert!(ok > 10, "the load ran: {ok}");
    assert!(
        failed.is_empty(),
        "requests failed during the failover: {failed:?}"
    );
    eprintln!(
        "ha: drone ready on the leader {:?} after the kill; test took {:?}",
        killed.elapsed(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_a_rolling_restart_keeps_every_session() {
    let started = Instant::now();
    let mut plane = Plane::start(3).await;
    let _drone = plane.drone().await;
    let edge = RemoteProxy::start_for(&plane.urls(), &plane.key);
    let (sessions, counts) = connect_keys(&plane, &["roll-1", "roll-2", "roll-3"]).await;
    let http = plane.dev(0).http.clone();
    for r in &sessions {
        wait_count(&http, edge.addr, r).await;
    }

    // A client sends requests to every session through the remote proxy for the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let load = {
        let (stop, ok, failed, errors, http, sessions) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            errors.clone(),
            http.clone(),
            sessions.clone(),
        );
        let addr = edge.addr;
        tokio::spawn(async move {
            let mut last = vec![0u64; sessions.len()];
            // Bounded: at most 100,000 requests.
            for n in 0..100_000usize {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = n % sessions.len();
                match count_via(&http, addr, &sessions[i]).await {
                    Ok(c) => {
                        assert!(
                            c > last[i],
                            "{}: the counter went from {} to {c}: another process",
                            sessions[i].backend_id,
                            last[i]
                        );
                        last[i] = c;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.lock().unwrap().push(e);
                    }
                }
                // A steady client, not a flood: the two cores also run etcd and four
                // hangar processes.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            last
        })
    };

    let wait_flowing = |since: u64| {
        let ok = ok.clone();
        async move {
            let deadline = Instant::now() + DEADLINE;
            while ok.load(Ordering::Relaxed) < since + 20 {
                assert!(Instant::now() < deadline, "requests stopped flowing");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_flowing(0).await;
    let mut leaders = Vec::new();
    for i in 0..plane.instances.len() {
        let leader = leader_of(
            &plane
                .poll((i + 1) % 3, "a leader", |v| leader_of(v).is_some())
                .await,
        );
        let mut dev = plane.instances[i].take().unwrap();
        let status = dev.terminate();
        assert!(status.success(), "instance {i} exited with {status}");
        drop(dev);
        let down = Instant::now();
        let dev = plane.spawn(i, Some(plane.addrs[i]));
        assert_eq!(
            (dev.api, dev.proxy),
            plane.addrs[i],
            "back on the same addresses"
        );
        plane.instances[i] = Some(dev);
        let view = plane
            .poll(i, "back with a leader and every instance", |v| {
                leader_of(v).is_some() && v["instances"].as_array().map(Vec::len) == Some(3)
            })
            .await;
        assert_eq!(
            view["this_instance"],
            plane.ids[i].as_str(),
            "same instance id"
        );
        // Its own proxy serves the sessions again (its route feed is loaded).
        let back = plane.dev(i);
        wait_count(&back.http, back.proxy, &sessions[i % sessions.len()]).await;
        let on = plane.wait_drone_somewhere("d1").await;
        eprintln!(
            "ha: instance {i} restarted in {:?} (leader before: {leader:?}, after: {:?}; drone on {on})",
            down.elapsed(),
            leader_of(&view)
        );
        leaders.push(leader_of(&view));
        wait_flowing(ok.load(Ordering::Relaxed)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let last = load.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "ha: rolling restart: {ok} proxied requests answered, {failed} failed; took {:?}",
        started.elapsed()
    );
    let errors = errors.lock().unwrap().clone();
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed: {:?}",
        ok + failed,
        &errors[..errors.len().min(10)]
    );

    // Zero sessions lost: same backends, still ready, counters continue.
    for ((r, before), during) in sessions.iter().zip(&counts).zip(&last) {
        assert!(during > before);
        let v = plane.dev(0).backend(r.backend_id.as_str()).await;
        assert_eq!(v.state.name(), "ready", "{v:?}");
        let again = plane
            .dev(1)
            .connect_key(&r.key.as_ref().unwrap().name)
            .await;
        assert!(!again.spawned);
        assert_eq!(again.backend_id, r.backend_id);
        assert_eq!(wait_count(&http, edge.addr, r).await, during + 1);
    }
    // And the restarted plane still places: the drone is with the leader.
    let (leader, _) = plane.wait_leader(2, |_| true).await;
    plane
        .dev(plane.index_of(&leader))
        .wait_drone("d1", "ready")
        .await;
    let (fresh, _) = connect_until(
        plane.dev(2),
        &json!({"key": {"name": "roll-new"}}),
        Instant::now(),
        DEADLINE,
    )
    .await;
    assert!(fresh.spawned);
    assert_eq!(wait_count(&http, edge.addr, &fresh).await, 1);
    eprintln!("ha: leaders after each restart: {leaders:?}");
}

/// A drone whose session a follower holds runs what the leader decides: the leader places on
/// it (it is in the store's drone records), writes spawns and stops into the backend records,
/// and the follower relays them. A stop the leader wrote just before it was killed is carried
/// out all the same (it is in the store, not in the dead leader's memory), and the failover
/// kills nothing else on that drone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_a_follower_relays_the_leaders_commands_to_its_drone() {
    let mut plane = Plane::start(3).await;
    // The drone knows only b (a follower): its session stays there whoever leads.
    let b = plane.addrs[1].0;
    let _drone = Drone::spawn_for(
        None,
        &format!("http://{b}"),
        "d1",
        "process",
        plane.dir.path(),
        SMALL,
    );
    let seen = plane.dev(0).wait_drone("d1", "ready").await;
    assert_eq!(
        seen.instance.as_deref(),
        Some(plane.ids[1].as_str()),
        "the leader lists the drone as held by b: {seen:?}"
    );
    // Connects through c are forwarded to the leader (a), placed on d1 and started through b.
    let (sessions, counts) = connect_keys(&plane, &["relayed-1", "relayed-2"]).await;
    // A stop accepted by the leader, which is killed right after answering.
    let doomed = &sessions[0];
    let url = plane
        .dev(0)
        .api_url(&format!("/v1/backends/{}/terminate", doomed.backend_id));
    let accepted = plane
        .dev(0)
        .http
        .post(url)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    plane.instances[0].as_mut().unwrap().kill9();
    let ended = plane
        .dev(2)
        .wait_for(doomed.backend_id.as_str(), "terminated", |v| {
            v.state.name() == "terminated"
        })
        .await;
    // Its exit was reported by the drone (a backend closed any other way carries a message
    // saying why); without the relay the stop would wait for the kill escalation, 30 s on.
    assert_eq!(ended.message, None, "{ended:?}");
    // The other backend lived through the failover, and the new leader places on d1 too.
    let (leader, _) = plane.wait_leader(2, |l| l != plane.ids[0]).await;
    let c = plane.dev(2);
    let kept = &sessions[1];
    assert_eq!(
        count_via(&c.http, c.proxy, kept).await.unwrap(),
        counts[1] + 1,
        "same process, same counter"
    );
    let body = json!({"key": {"name": "relayed-3"}});
    let (fresh, _) = connect_until(c, &body, Instant::now(), DEADLINE).await;
    c.wait_ready(fresh.backend_id.as_str()).await;
    assert_eq!(wait_count(&c.http, c.proxy, &fresh).await, 1);
    eprintln!("ha: stop relayed after the leader's kill; new leader {leader}");
}

/// kill -9 of etcd's leader member: the same Hangar leader and term throughout, a connect
/// within 3 s, and the backend keeps its process.
///
/// The drones' and the leader's lease TTLs here are 10 s (the defaults), not 3 s: no lease can
/// be renewed while etcd elects a leader, and a renewal sent just before the kill was measured
/// to take 2.0 to 3.0 s (etcd's election, 0.9 to 2.5 s with its default 1 s election timeout,
/// then up to about 1 s more before the pending renewal attempt answers). A drone fences 0.75
/// × TTL after the send time of its last acknowledged heartbeat, so at a 3 s TTL (1.65 to
/// 2.25 s after the kill) it stopped its backends; a leader steps down at its TTL after the
/// last acknowledged renewal, so at 3 s it stepped down and was elected again (a new term)
/// in about half the runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_killing_the_etcd_leader_keeps_the_hangar_leader() {
    let started = Instant::now();
    let mut plane = Plane::start_with(3, Duration::from_secs(10), Duration::from_secs(10)).await;
    let _drone = plane.drone().await;
    let (sessions, counts) = connect_keys(&plane, &["etcd-1"]).await;
    let (leader, term) = leader_of(&plane.poll(1, "a view", |_| true).await).unwrap();

    let member = plane.etcd.leader().await;
    plane.etcd.kill(member);
    let killed = Instant::now();
    // A connect (a new key, placed by the leader, through a follower) succeeds within 3 s.
    let (fresh, after) = connect_until(
        plane.dev(1),
        &json!({"key": {"name": "etcd-new"}}),
        killed,
        Duration::from_secs(3),
    )
    .await;
    assert!(fresh.spawned);
    eprintln!("ha: etcd leader member {member} killed; a connect answered after {after:?}");
    plane.dev(1).wait_ready(fresh.backend_id.as_str()).await;

    // The same leader and term, as every instance sees it, for longer than a leader TTL
    // after the kill (an observation window: each poll is a check, none may differ).
    let window = killed + TTL + Duration::from_millis(1500);
    let mut polls = 0;
    while Instant::now() < window {
        for (i, dev) in plane.live() {
            let view = get_json(dev, "/v1/cluster").await;
            let seen = view.as_ref().and_then(leader_of);
            assert_eq!(
                seen,
                Some((leader.clone(), term)),
                "instance {i} after the etcd leader died: {view:?}"
            );
            polls += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = plane.dev(1);
    let n = count_via(&d.http, d.proxy, &sessions[0]).await.unwrap();
    assert_eq!(n, counts[0] + 1, "the backend kept its process");
    plane.dev(0).wait_drone("d1", "ready").await;
    eprintln!(
        "ha: leader {leader} (term {term}) unchanged over {polls} views; test took {:?}",
        started.elapsed()
    );
}

/// The value of counter `name` in a Prometheus scrape (0 when absent).
fn counter(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// SIGSTOP of the leader for twice its TTL: another instance leads meanwhile; once resumed,
/// the old leader steps down and, after it lost leadership, makes zero successful writes and
/// sends zero drone commands (its counters do not move), then follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_a_stopped_leader_writes_nothing_once_deposed() {
    // The drones' lease outlasts the stop (a drone whose instance is stopped cannot renew).
    let plane = Plane::start_with(3, Duration::from_secs(10), TTL).await;
    let _drone = plane.drone().await;
    let (sessions, _) = connect_keys(&plane, &["stop-1"]).await;
    let old = plane.dev(0);
    let metrics = old
        .metrics
        .expect("instance 0 reports its metrics listener");
    let before = old.scrape(metrics).await;
    let writes = counter(&before, "hangar_leader_writes_total");
    let commands = counter(&before, "hangar_leader_commands_total");
    assert!(
        writes > 0.0 && commands > 0.0,
        "it led and wrote: {writes} {commands}"
    );

    send_signal(old.pid(), libc::SIGSTOP);
    let stopped = Instant::now();
    let (new_leader, _) = plane.wait_leader(1, |l| l != plane.ids[0]).await;
    eprintln!(
        "ha: {new_leader} leads {:?} after the stop",
        stopped.elapsed()
    );
    tokio::time::sleep((TTL * 2).saturating_sub(stopped.elapsed())).await;
    send_signal(old.pid(), libc::SIGCONT);

    // It notices its term is over and follows.
    let view = plane
        .poll(0, "the resumed instance follows", |v| {
            v["this_leads"] == false && leader_of(v).is_some_and(|(l, _)| l == new_leader)
        })
        .await;
    assert_eq!(view["this_leads"], false);
    let after = old.scrape(metrics).await;
    assert_eq!(
        counter(&after, "hangar_leader_writes_total"),
        writes,
        "a deposed leader wrote"
    );
    assert_eq!(
        counter(&after, "hangar_leader_commands_total"),
        commands,
        "a deposed leader sent drone commands"
    );
    // Sessions still answer, through the new leader's proxy.
    let leader_index = plane.ids.iter().position(|i| *i == new_leader).unwrap();
    let d = plane.dev(leader_index);
    assert!(wait_count(&d.http, d.proxy, &sessions[0]).await >= 1);
}

/// Two of three etcd members down: no quorum, so the leader cannot renew and steps down and
/// nobody leads, while every proxy keeps serving the live sessions it knows; once quorum is
/// back, a leader is elected within the leader TTL + 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_losing_etcd_quorum_stops_leading_but_keeps_proxying() {
    // The drones' lease outlasts the outage (no renewal is possible without quorum).
    let mut plane = Plane::start_with(3, Duration::from_secs(20), TTL).await;
    let _drone = plane.drone().await;
    let (sessions, _) = connect_keys(&plane, &["quorum-1"]).await;
    let before = {
        let d = plane.dev(1);
        wait_count(&d.http, d.proxy, &sessions[0]).await
    };

    plane.etcd.kill(0);
    plane.etcd.kill(1);
    let lost = Instant::now();
    let nobody = |v: &Value| v["this_leads"] == false;
    tokio::join!(
        plane.poll(0, "nobody leads without quorum", nobody),
        plane.poll(1, "nobody leads without quorum", nobody),
        plane.poll(2, "nobody leads without quorum", nobody),
    );
    let stepped_down = lost.elapsed();
    eprintln!("ha: every instance stopped leading {stepped_down:?} after quorum was lost");
    assert!(
        stepped_down <= TTL + Duration::from_secs(2),
        "{stepped_down:?}"
    );
    // Proxying goes on from the routes every proxy holds.
    for i in 0..3 {
        let d = plane.dev(i);
        let n = wait_count(&d.http, d.proxy, &sessions[0]).await;
        assert!(n > before, "instance {i}'s proxy still serves the session");
    }

    // Member 0 back: two of three, a quorum (restart returns once it answers reads).
    plane.etcd.restart(0).await;
    let back = Instant::now();
    let (leader, _) = plane.wait_leader(0, |_| true).await;
    let took = back.elapsed();
    plane.etcd.restart(1).await;
    eprintln!("ha: {leader} leads {took:?} after quorum came back");
    assert!(took <= TTL + Duration::from_secs(2), "{took:?}");
    let d = plane.dev(2);
    assert!(wait_count(&d.http, d.proxy, &sessions[0]).await > before);
}

/// Export from etcd, import into a fresh embedded store, run on it: every record and key is
/// there, and a connect for an existing key gets a higher epoch than the old store handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_state_moves_from_etcd_to_an_embedded_store() {
    let plane = Plane::start_with(1, TTL, TTL).await;
    let _drone = plane.drone().await;
    let (sessions, _) = connect_keys(&plane, &["moved-1", "moved-2"]).await;
    // One key's backend ends before the move: its next connect starts a new one.
    let ended = &sessions[1];
    let old_epoch = plane.dev(0).backend(ended.backend_id.as_str()).await.epoch;
    let r = plane
        .dev(0)
        .http
        .post(
            plane
                .dev(0)
                .api_url(&format!("/v1/backends/{}/terminate", ended.backend_id)),
        )
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    plane
        .dev(0)
        .wait_for(ended.backend_id.as_str(), "terminated", |v| {
            !v.state.is_live()
        })
        .await;

    let file = plane.dir.path().join("state.jsonl");
    let file_s = file.to_string_lossy().into_owned();
    let url = plane.etcd.url();
    let (code, _, err) =
        crate::support::cli(&["state", "export", "--store", &url, "--out", &file_s]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("/hangar/leader"),
        "leased records are exported, marked"
    );

    let to = plane.dir.path().join("embedded");
    std::fs::create_dir_all(&to).unwrap();
    let to_s = to.to_string_lossy().into_owned();
    let (code, _, err) = crate::support::cli(&["state", "import", &file_s, "--data-dir", &to_s]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("leased records left out"), "{err}");

    let dev = Dev::start(&to, &[]);
    for s in &sessions {
        let v = dev.backend(s.backend_id.as_str()).await;
        assert_eq!(v.id, s.backend_id, "the record moved");
    }
    let again = dev.connect(json!({"key": {"name": "moved-2"}})).await;
    assert!(again.spawned);
    let v = dev.backend(again.backend_id.as_str()).await;
    assert!(
        v.epoch > old_epoch + 1,
        "epoch {} above every exported one ({old_epoch})",
        v.epoch
    );
}

/// Instances whose APIs serve TLS forward writes to the leader over TLS (trusting `--ca`): a
/// token created through the follower is created by the leader and works on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_writes_reach_the_leader_over_tls() {
    let etcd = EtcdCluster::start(1).await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::support::test_pki(dir.path());
    let (ca, cert, key) = (
        ca.to_str().unwrap().to_string(),
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
    );
    let token_key = TokenKey::generate().to_hex();
    let store = etcd.url();
    let start = |i: usize| {
        Dev::start_role_in(
            None,
            "serve",
            &dir.path().join(format!("serve-{i}")),
            &[
                "--store",
                &store,
                "--drone-secret",
                SECRET,
                "--dns",
                "off",
                "--metrics",
                "off",
                "--token-key",
                &token_key,
                "--api-tls-cert",
                &cert,
                "--api-tls-key",
                &key,
                "--ca",
                &ca,
            ],
        )
    };
    let leader = start(0);
    let follower = start(1);
    let admin = leader
        .token
        .clone()
        .expect("the first instance wrote the admin token");
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let url = |dev: &Dev, path: &str| format!("https://{}{path}", dev.api);
    // The follower knows the leader (its https:// URL).
    let deadline = Instant::now() + DEADLINE;
    loop {
        let view: Value = http
            .get(url(&follower, "/v1/cluster"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view["leader"]["api_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://"))
            && view["this_instance"] != view["leader"]["instance"]
        {
            break;
        }
        assert!(Instant::now() < deadline, "no leader seen: {view}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let created = http
        .post(url(&follower, "/v1/tokens"))
        .bearer_auth(&admin)
        .json(&json!({"scope": "read"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "forwarded to the leader over TLS");
    let read: Value = created.json().await.unwrap();
    let read = read["token"].as_str().unwrap().to_string();
    for dev in [&leader, &follower] {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let status = http
                .get(url(dev, "/v1/backends"))
                .bearer_auth(&read)
                .send()
                .await
                .unwrap()
                .status();
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the new token never worked: {status}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}
