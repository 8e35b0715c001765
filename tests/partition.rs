//! Multi-host tests on network namespaces (`support::netns`): `hangar serve` in one namespace,
//! each process drone in its own with its own address, backends reached through the proxy
//! across the (virtual) network, and partitions cut with iptables. Every backend is a witness
//! that logs a heartbeat every 50 ms, so two live processes of one key would show as
//! overlapping lifetimes: there must be none, in any scenario.
//!
//! The lease TTL is 3 s: a drone fences at 2.25 s after the send time of its last acknowledged
//! heartbeat, the scheduler may free its keys at 3 s after the last renewal it received.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hangar_core::BackendId;
use hangar_core::api::ConnectResponse;
use tempfile::TempDir;

use crate::support::cluster::{Drone, SECRET};
use crate::support::netns::{Bed, Host, lifetimes, overlaps, witness_connect};
use crate::support::{DEADLINE, Dev, send_signal};

const TTL: Duration = Duration::from_secs(3);

struct Cluster {
    serve: Dev,
    _drones: Vec<Drone>,
    witness: TempDir,
    bed: Bed,
    _dir: TempDir,
}

impl Cluster {
    /// `serve` on host 0 and a process drone on each further host.
    async fn start(drones: usize) -> Cluster {
        let bed = Bed::new(1 + drones);
        let dir = tempfile::tempdir().unwrap();
        let witness = tempfile::tempdir().unwrap();
        let at = |port: &str| format!("{}:{port}", bed.hosts[0].ip);
        let (api, proxy) = (at("0"), at("0"));
        let ttl = TTL.as_secs().to_string();
        let serve = Dev::start_role_in(
            Some(&bed.hosts[0].ns),
            "serve",
            &dir.path().join("serve"),
            &[
                "--api",
                &api,
                "--proxy",
                &proxy,
                "--dns",
                "off",
                "--metrics",
                "off",
                "--drone-secret",
                SECRET,
                "--lease-ttl",
                &ttl,
            ],
        );
        let mut list = Vec::new();
        for (i, host) in bed.hosts[1..].iter().enumerate() {
            let name = format!("d{i}");
            let host_id = format!("host-{i}");
            list.push(Drone::spawn_in(
                Some(&host.ns),
                &serve,
                &name,
                "process",
                dir.path(),
                // The witness backends are python3 programs.
                &[
                    "--metrics",
                    "off",
                    "--host-id",
                    &host_id,
                    "--allow-command",
                    "python3",
                ],
            ));
            let d = serve.wait_drone(&name, "ready").await;
            assert_eq!(d.name, name);
        }
        Cluster {
            serve,
            _drones: list,
            witness,
            bed,
            _dir: dir,
        }
    }

    fn serve_host(&self) -> &Host {
        &self.bed.hosts[0]
    }

    fn drone_host(&self, name: &str) -> &Host {
        let i: usize = name.trim_start_matches('d').parse().unwrap();
        &self.bed.hosts[1 + i]
    }

    /// Connects `key` (a witness backend) and waits until it is ready.
    async fn connect(&self, key: &str) -> ConnectResponse {
        let r = self
            .serve
            .connect(witness_connect(key, self.witness.path()))
            .await;
        self.serve.wait_ready(r.backend_id.as_str()).await;
        r
    }

    /// What the backend answers through the proxy: `epoch pid`.
    async fn ask(&self, r: &ConnectResponse) -> String {
        let resp = self
            .serve
            .http
            .get(self.serve.proxy_url("/"))
            .header("x-hangar-backend", r.backend_id.as_str())
            .bearer_auth(&r.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "through the proxy");
        resp.text().await.unwrap()
    }

    /// Connects `key` until it is served by a backend other than `old` that is ready (the old
    /// one's drone is cut off: the key moves once the scheduler has lost that drone).
    async fn moved(&self, key: &str, old: &BackendId) -> ConnectResponse {
        let deadline = Instant::now() + DEADLINE + TTL * 2;
        loop {
            let (status, v) = self
                .serve
                .connect_raw(witness_connect(key, self.witness.path()))
                .await;
            if status == 200 || status == 201 {
                let r: ConnectResponse = serde_json::from_value(v).unwrap();
                if r.backend_id != *old {
                    self.serve.wait_ready(r.backend_id.as_str()).await;
                    return r;
                }
            } else {
                // 409 while the old backend stops, 503 while no drone can take it.
                assert!(status == 409 || status == 503, "{status}: {v}");
            }
            assert!(Instant::now() < deadline, "key {key} never moved off {old}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Moves every key that `victim` serves off it (see [`Cluster::moved`]), then lets the
    /// cut that began at `cut_at` last twice the TTL, past the fence deadline, however long
    /// the moves took.
    async fn move_off_and_outlast<K: AsRef<str>>(
        &self,
        keys: &mut [(K, ConnectResponse)],
        victim: &str,
        cut_at: Instant,
    ) {
        for (k, r) in keys.iter_mut() {
            if self.drone_of(r).await == victim {
                *r = self.moved(k.as_ref(), &r.backend_id).await;
            }
        }
        tokio::time::sleep((TTL * 2).saturating_sub(cut_at.elapsed())).await;
    }

    /// Which drone runs the backend.
    async fn drone_of(&self, r: &ConnectResponse) -> String {
        self.serve
            .backend(r.backend_id.as_str())
            .await
            .drone
            .unwrap()
    }

    /// The pid of drone `name`'s agent (`ip netns exec` execs it).
    fn drone_pid(&self, name: &str) -> u32 {
        let i: usize = name.trim_start_matches('d').parse().unwrap();
        self._drones[i].pid()
    }

    /// Asserts that no key ever had two live processes.
    fn assert_no_overlap(&self) {
        let all = lifetimes(self.witness.path());
        let bad = overlaps(&all);
        assert!(
            bad.is_empty(),
            "a key ran twice: {bad:#?}\nall lifetimes: {all:#?}"
        );
    }
}

/// Keys spread over both drones, each answering through the proxy from its drone's own
/// address; a partition of one drone for less than the fence deadline loses nothing: the same
/// processes keep serving, nobody is fenced, nothing moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multihost_backends_answer_through_the_proxy_and_a_short_partition_loses_nothing() {
    let c = Cluster::start(2).await;
    let mut keys = BTreeMap::new();
    let mut used = std::collections::BTreeSet::new();
    for k in ["k0", "k1", "k2", "k3", "k4", "k5"] {
        let r = c.connect(k).await;
        let v = c.serve.backend(r.backend_id.as_str()).await;
        let drone = v.drone.clone().unwrap();
        let address = v.address.unwrap();
        assert_eq!(
            address.ip(),
            std::net::IpAddr::V4(c.drone_host(&drone).ip),
            "the backend listens on its drone's own address"
        );
        used.insert(drone);
        let answer = c.ask(&r).await;
        keys.insert(k, (r, answer));
    }
    assert_eq!(used.len(), 2, "both drones run backends");

    // 0.8 s without contact: less than the fence deadline (2.25 s) minus a heartbeat period.
    let cut = c.drone_host("d0").clone();
    c.bed.partition(&cut, c.serve_host());
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.bed.heal(&cut);
    // Past the TTL: had anything been lost or fenced, it would show now.
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    for (k, (r, answer)) in &keys {
        let v = c.serve.backend(r.backend_id.as_str()).await;
        assert_eq!(v.state.name(), "ready", "{k}: {v:?}");
        assert_eq!(&c.ask(r).await, answer, "{k} is still the same process");
    }
    let all = lifetimes(c.witness.path());
    for (k, lives) in &all {
        assert_eq!(lives.len(), 1, "{k} restarted: {lives:?}");
    }
    c.assert_no_overlap();
}

/// A partition of a drone for twice the TTL, twice (each drone in turn): its backends are
/// fenced before the scheduler frees their keys, the keys move to the other drone, and the
/// cut-off drone rejoins once healed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multihost_a_long_partition_fences_before_the_keys_move() {
    let c = Cluster::start(2).await;
    let mut keys = Vec::new();
    for k in ["a0", "a1", "a2", "a3"] {
        keys.push((k, c.connect(k).await));
    }
    for round in 0..2 {
        let victim = c.drone_of(&keys[0].1).await;
        let cut = c.drone_host(&victim).clone();
        c.bed.partition(&cut, c.serve_host());
        let started = Instant::now();
        c.move_off_and_outlast(&mut keys, &victim, started).await;
        c.bed.heal(&cut);
        c.serve.wait_drone(&victim, "ready").await;
        for (k, r) in &keys {
            assert_ne!(c.drone_of(r).await, victim, "round {round}: {k}");
            c.ask(r).await;
        }
        c.assert_no_overlap();
    }
}

/// The same drone fences twice in one agent run: a partition for twice the TTL fences it
/// and moves its keys; once healed it rejoins and takes new keys; a second partition must
/// fence it again. (The old drone fenced once per session and, where the session survived,
/// never again; the fence is now re-armed at every renewal, see `drone::fence`'s tests for
/// the same-session case on a paused clock.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multihost_a_drone_fences_again_after_an_earlier_fence() {
    let c = Cluster::start(2).await;
    let mut keys = Vec::new();
    for k in ["f0", "f1", "f2", "f3"] {
        keys.push((k.to_string(), c.connect(k).await));
    }
    let victim = c.drone_of(&keys[0].1).await;
    let cut = c.drone_host(&victim).clone();
    for round in 0..2 {
        c.bed.partition(&cut, c.serve_host());
        let started = Instant::now();
        c.move_off_and_outlast(&mut keys, &victim, started).await;
        c.bed.heal(&cut);
        c.serve.wait_drone(&victim, "ready").await;
        c.assert_no_overlap();
        // New keys until some land on the rejoined drone (placement prefers the emptier one).
        let mut n = 0;
        while !keys.is_empty() && round == 0 {
            let k = format!("g{n}");
            n += 1;
            let r = c.connect(&k).await;
            let on_victim = c.drone_of(&r).await == victim;
            keys.push((k, r));
            if on_victim {
                break;
            }
            assert!(n < 20, "no new key landed on {victim}");
        }
    }
}

/// The session breaks and every reconnect attempt hangs until its timeout (SYN dropped): the
/// fence must not wait for an attempt to end (it used to fire up to 5 s late).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multihost_a_hanging_reconnect_does_not_delay_the_fence() {
    let c = Cluster::start(2).await;
    let mut keys = Vec::new();
    for k in ["h0", "h1", "h2", "h3"] {
        keys.push((k, c.connect(k).await));
    }
    let victim = c.drone_of(&keys[0].1).await;
    let cut = c.drone_host(&victim).clone();
    c.bed.hang_connects(&cut, c.serve_host());
    let started = Instant::now();
    c.move_off_and_outlast(&mut keys, &victim, started).await;
    c.bed.heal(&cut);
    c.serve.wait_drone(&victim, "ready").await;
    c.assert_no_overlap();
}

/// A paused agent (SIGSTOP, as a long stall would) cannot fence, while its backends, separate
/// processes, keep running: its watchdog, a process of its own, kills them at the deadline, so
/// they are gone before the scheduler frees their keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multihost_a_paused_agent_is_fenced_by_its_watchdog() {
    let c = Cluster::start(2).await;
    let mut keys = Vec::new();
    for k in ["p0", "p1", "p2", "p3"] {
        keys.push((k, c.connect(k).await));
    }
    let victim = c.drone_of(&keys[0].1).await;
    let pid = c.drone_pid(&victim);
    send_signal(pid, libc::SIGSTOP);
    let started = Instant::now();
    c.move_off_and_outlast(&mut keys, &victim, started).await;
    send_signal(pid, libc::SIGCONT);
    c.serve.wait_drone(&victim, "ready").await;
    for (_, r) in &keys {
        c.ask(r).await;
    }
    c.assert_no_overlap();
}
