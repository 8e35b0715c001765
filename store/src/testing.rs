//! A real etcd cluster for tests: members started as child processes on free loopback ports
//! with temporary data directories, behind the `conformance` feature so that the store's own
//! tests and other crates' process-level tests (several `hangar serve` instances on one etcd)
//! share it.
//!
//! [`EtcdCluster::start`] waits until every member serves a linearizable read; members are
//! SIGKILLed on drop (a lone leader takes about 8 s to stop on SIGTERM), and
//! [`EtcdCluster::kill`] / [`EtcdCluster::restart`] kill one and start it again on its data
//! directory and ports. Without etcd installed the harness panics saying how to install it
//! (`apt-get install etcd-server`; scripts/test.sh does).
//!
//! ```text
//! let etcd = EtcdCluster::start(3).await;
//! let url = etcd.url();            // etcd://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3
//! let leader = etcd.leader().await;
//! etcd.kill(leader);
//! ```

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use crate::etcd::EtcdOptions;

/// How long a member (or a cluster) may take to answer after it is started. A single member is
/// healthy in about 0.3 s; this only bounds a hang.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// How many times to pick new ports when etcd finds one taken between our probe and its bind.
const PORT_RACE_RETRIES: usize = 5;

/// One etcd process, SIGKILLed on drop.
pub struct EtcdMember {
    name: String,
    /// The client port it was created with (and listens on unless a test moved it).
    pub client_port: u16,
    /// The client ports it listens on now: `client_port` unless a test moved it.
    listening: Vec<u16>,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl EtcdMember {
    /// Its name in the cluster (`m0`, `m1`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `127.0.0.1:<client port>`.
    pub fn client_endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Whether its process runs (it was not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process on its client port (again, with the same data directory, after a
    /// kill).
    pub fn start(&mut self, initial_cluster: &str) {
        self.start_listening(initial_cluster, &[self.client_port]);
    }

    /// Starts the process serving clients on `ports` only.
    pub fn start_listening(&mut self, initial_cluster: &str, ports: &[u16]) {
        self.listening = ports.to_vec();
        let client_url = ports
            .iter()
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let spawned = Command::new("etcd")
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg("hangar-store-tests")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn();
        match spawned {
            Ok(child) => self.child = Some(child),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "etcd is not installed (no `etcd` on PATH): install it with `apt-get install etcd-server` (scripts/test.sh does)"
            ),
            Err(e) => panic!("cannot start etcd: {e}"),
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process has exited (it failed to start, typically a port taken).
    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| child.try_wait().ok().flatten().is_some())
    }

    /// The end of its log (for failure messages).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(3000);
        let start = (start..log.len())
            .find(|i| log.is_char_boundary(*i))
            .unwrap_or(log.len());
        log[start..].to_owned()
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a cluster came up: [`EtcdCluster::wait_ready`].
#[derive(Debug, PartialEq, Eq)]
pub enum Ready {
    Yes,
    /// A member exited because a port was taken (between [`free_ports`] and its bind).
    PortTaken,
}

/// An etcd cluster of child processes in a temporary directory; every member is SIGKILLed
/// when it is dropped.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    /// The `--initial-cluster` every member was started with.
    pub initial_cluster: String,
    _dir: TempDir,
}

impl EtcdCluster {
    /// Starts `size` members and waits until each serves a linearizable read.
    pub async fn start(size: usize) -> EtcdCluster {
        for _ in 0..PORT_RACE_RETRIES {
            if let Some(etcd) = EtcdCluster::try_start(size).await {
                return etcd;
            }
        }
        panic!("etcd could not bind its ports {PORT_RACE_RETRIES} times in a row");
    }

    /// `None` if a member exited because a port was taken (then try other ports).
    async fn try_start(size: usize) -> Option<EtcdCluster> {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(2 * size);
        let mut members: Vec<EtcdMember> = (0..size)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                listening: vec![ports[2 * i]],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for member in &mut members {
            member.start(&initial_cluster);
        }
        let mut etcd = EtcdCluster {
            members,
            initial_cluster,
            _dir: dir,
        };
        match etcd.wait_ready().await {
            Ready::Yes => Some(etcd),
            Ready::PortTaken => None,
        }
    }

    /// Polls every running member with a read until each answers, or fails the test.
    pub async fn wait_ready(&mut self) -> Ready {
        let deadline = Instant::now() + START_DEADLINE;
        for index in 0..self.members.len() {
            if self.members[index].child.is_none() {
                continue;
            }
            let endpoint = format!("127.0.0.1:{}", self.members[index].listening[0]);
            loop {
                if self.members[index].exited() {
                    let log = self.members[index].log_tail();
                    if log.contains("address already in use") {
                        return Ready::PortTaken;
                    }
                    panic!("etcd member {index} exited while starting:\n{log}");
                }
                if answers(&endpoint).await {
                    break;
                }
                if Instant::now() > deadline {
                    panic!(
                        "etcd member {index} did not answer within {START_DEADLINE:?}:\n{}",
                        self.members[index].log_tail()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ready::Yes
    }

    /// Every member's client endpoint (`host:port`), killed ones included.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(EtcdMember::client_endpoint)
            .collect()
    }

    /// The store location of the whole cluster: `etcd://h1:p1,h2:p2,h3:p3`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// Options for an [`crate::etcd::EtcdStore`] on every member.
    pub fn options(&self) -> EtcdOptions {
        EtcdOptions::new(self.endpoints())
    }

    /// SIGKILLs member `index` (and reaps it).
    pub fn kill(&mut self, index: usize) {
        self.members[index].kill();
    }

    /// Starts member `index` again on its data directory and client port (SIGKILLing it first
    /// if it runs) and waits until the cluster answers through it.
    pub async fn restart(&mut self, index: usize) {
        self.members[index].kill();
        let initial_cluster = self.initial_cluster.clone();
        self.members[index].start(&initial_cluster);
        let ready = self.wait_ready().await;
        assert_eq!(
            ready,
            Ready::Yes,
            "etcd member {index} could not take its port back"
        );
    }

    /// An etcd-client of its own on the running members, for what the store does not do
    /// (compaction, status).
    pub async fn client(&self) -> etcd_client::Client {
        let urls: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .flat_map(|m| m.listening.iter().map(|p| format!("http://127.0.0.1:{p}")))
            .collect();
        etcd_client::Client::connect(urls, None).await.unwrap()
    }

    /// Compacts history before `revision`, waiting for it to be done.
    pub async fn compact(&self, revision: crate::Revision) {
        let options = etcd_client::CompactionOptions::new().with_physical();
        self.client()
            .await
            .compact(revision as i64, Some(options))
            .await
            .unwrap();
    }

    /// The index of the current leader among the running members (polled until one says it
    /// leads, or fails the test after [`START_DEADLINE`]).
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + START_DEADLINE;
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(1));
        loop {
            for (index, member) in self.members.iter().enumerate() {
                if member.child.is_none() {
                    continue;
                }
                let url = format!("http://{}", member.client_endpoint());
                let Ok(mut client) =
                    etcd_client::Client::connect([url], Some(options.clone())).await
                else {
                    continue;
                };
                let Ok(status) = client.status().await else {
                    continue;
                };
                let is_leader = status
                    .header()
                    .is_some_and(|h| h.member_id() == status.leader());
                if is_leader {
                    return index;
                }
            }
            assert!(Instant::now() < deadline, "no etcd leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether the member at `endpoint` (`host:port`) serves a linearizable read (so it has a
/// leader).
pub async fn answers(endpoint: &str) -> bool {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(200))
        .with_timeout(Duration::from_secs(1));
    let Ok(mut client) =
        etcd_client::Client::connect([format!("http://{endpoint}")], Some(options)).await
    else {
        return false;
    };
    client.get("health", None).await.is_ok()
}

/// `n` distinct free loopback ports: all bound at once (so distinct), then released for etcd
/// (or a test's server) to bind. Another process may take one in between; [`EtcdCluster::start`]
/// then tries again.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}
