//! A multi-host test bed on one machine: each "host" is a network namespace with its own
//! address on a private bridge, so the control plane and each drone reach each other over a
//! real (virtual) network that a test can cut with iptables. Needs root and iproute2 and
//! iptables (`scripts/test.sh` installs them); everything it creates is removed on drop.
//!
//! Also the witness backend: a small HTTP server that appends `epoch pid unix_ms` to a file
//! per key every 50 ms while it runs, so that two live processes of one key show up as
//! overlapping lifetimes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Beds made by this process so far (for unique names and subnets).
static BEDS: AtomicU32 = AtomicU32::new(0);

/// Runs `ip`/`iptables`-style commands, failing the test with what they printed.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (scripts/test.sh installs it)"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Like [`run`], ignoring failure (cleanup of what may already be gone).
fn try_run(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

/// One host of the bed.
#[derive(Clone, Debug)]
pub struct Host {
    /// The network namespace's name.
    pub ns: String,
    pub ip: Ipv4Addr,
}

/// A bridge in the root namespace and one namespace per host, each with a veth to the bridge.
pub struct Bed {
    bridge: String,
    pub gateway: Ipv4Addr,
    pub hosts: Vec<Host>,
}

impl Bed {
    /// A bed with `hosts` hosts (names `<tag>0`, `<tag>1`, ...), all on one /24.
    pub fn new(hosts: usize) -> Bed {
        let n = BEDS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // A subnet of 10.0.0.0/8 unique to this bed among concurrent test processes.
        let id = (pid.wrapping_mul(31).wrapping_add(n)) % 60_000;
        let (a, b) = (100 + (id / 250) as u8 % 150, (id % 250) as u8);
        let tag = format!("hg{:x}", (pid % 0xffff) * 16 + n % 16);
        let bridge = format!("{tag}br");
        let gateway = Ipv4Addr::new(10, a, b, 1);
        run("ip", &["link", "add", &bridge, "type", "bridge"]);
        let mut bed = Bed {
            bridge: bridge.clone(),
            gateway,
            hosts: Vec::new(),
        };
        run(
            "ip",
            &["addr", "add", &format!("{gateway}/24"), "dev", &bridge],
        );
        run("ip", &["link", "set", &bridge, "up"]);
        // Hosts talk across the bridge even where the root namespace's FORWARD policy drops
        // (Docker sets it to DROP, and br_netfilter sends bridged frames through it).
        run(
            "iptables",
            &[
                "-w", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
            ],
        );
        for i in 0..hosts {
            let ns = format!("{tag}h{i}");
            let ip = Ipv4Addr::new(10, a, b, 10 + i as u8);
            let (outer, inner) = (format!("{tag}v{i}"), format!("{tag}p{i}"));
            run("ip", &["netns", "add", &ns]);
            bed.hosts.push(Host { ns: ns.clone(), ip });
            run(
                "ip",
                &[
                    "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ],
            );
            run("ip", &["link", "set", &outer, "master", &bridge]);
            run("ip", &["link", "set", &outer, "up"]);
            run("ip", &["link", "set", &inner, "netns", &ns]);
            let exec = |args: &[&str]| {
                let mut all = vec!["netns", "exec", &ns];
                all.extend_from_slice(args);
                run("ip", &all);
            };
            exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &inner]);
            exec(&["ip", "link", "set", &inner, "up"]);
            exec(&["ip", "link", "set", "lo", "up"]);
            exec(&["ip", "route", "add", "default", "via", &gateway.to_string()]);
        }
        bed
    }

    /// Cuts all traffic between hosts `a` and `b` (both directions, seen from `a`).
    pub fn partition(&self, a: &Host, b: &Host) {
        let peer = b.ip.to_string();
        self.iptables(a, &["-I", "INPUT", "-s", &peer, "-j", "DROP"]);
        self.iptables(a, &["-I", "OUTPUT", "-d", &peer, "-j", "DROP"]);
    }

    /// Breaks `a`'s connections to `b` (a write gets a reset) and makes new ones hang (their
    /// SYN is dropped): every reconnect attempt waits for its timeout.
    pub fn hang_connects(&self, a: &Host, b: &Host) {
        let peer = b.ip.to_string();
        self.iptables(a, &["-I", "INPUT", "-s", &peer, "-j", "DROP"]);
        self.iptables(
            a,
            &[
                "-I",
                "OUTPUT",
                "-d",
                &peer,
                "-p",
                "tcp",
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ],
        );
        self.iptables(
            a,
            &[
                "-I", "OUTPUT", "-d", &peer, "-p", "tcp", "--syn", "-j", "DROP",
            ],
        );
    }

    /// Removes every rule on `a`.
    pub fn heal(&self, a: &Host) {
        self.iptables(a, &["-F", "INPUT"]);
        self.iptables(a, &["-F", "OUTPUT"]);
    }

    fn iptables(&self, host: &Host, args: &[&str]) {
        let mut all = vec!["netns", "exec", &host.ns, "iptables", "-w"];
        all.extend_from_slice(args);
        run("ip", &all);
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for h in &self.hosts {
            // Deleting the namespace removes its end of the veth, and with it the other end.
            try_run("ip", &["netns", "del", &h.ns]);
        }
        try_run(
            "iptables",
            &[
                "-w",
                "-D",
                "FORWARD",
                "-i",
                &self.bridge,
                "-o",
                &self.bridge,
                "-j",
                "ACCEPT",
            ],
        );
        try_run("ip", &["link", "del", &self.bridge]);
    }
}

/// The witness backend's program (python3): serves `GET` with 200 on `$HANGAR_BIND:$PORT` and
/// appends `epoch pid unix_ms` to `$WITNESS_DIR/<key>` every 50 ms.
pub const WITNESS: &str = r#"
import http.server, os, socketserver, threading, time
class S(http.server.ThreadingHTTPServer):
    def server_bind(self):
        # HTTPServer.server_bind looks up the host's name: no DNS in a test namespace.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("%s %s" % (os.environ["HANGAR_EPOCH"], os.getpid())).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = S((os.environ["HANGAR_BIND"], int(os.environ["PORT"])), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
key = os.environ["HANGAR_KEY"].replace("/", "_")
f = open(os.path.join(os.environ["WITNESS_DIR"], key), "a", buffering=1)
while True:
    f.write("%s %d %d\n" % (os.environ["HANGAR_EPOCH"], os.getpid(), time.time_ns() // 1000000))
    time.sleep(0.05)
"#;

/// The connect body for key `name` run by the witness, logging into `dir`.
pub fn witness_connect(name: &str, dir: &Path) -> serde_json::Value {
    serde_json::json!({
        "key": {"name": name},
        "spawn": {
            "command": ["python3", "-c", WITNESS],
            "env": {"WITNESS_DIR": dir.to_string_lossy()},
            "idle_timeout_s": 3600,
        }
    })
}

/// One process's lifetime as its witness lines show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub epoch: u64,
    pub pid: u32,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// Every process's lifetime per key, from the witness files in `dir`.
pub fn lifetimes(dir: &Path) -> BTreeMap<String, Vec<Lifetime>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path: PathBuf = entry.unwrap().path();
        let key = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut by_process: BTreeMap<(u64, u32), Lifetime> = BTreeMap::new();
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [epoch, pid, ms] = f[..] else { continue };
            let (Ok(epoch), Ok(pid), Ok(ms)) = (epoch.parse(), pid.parse(), ms.parse()) else {
                continue;
            };
            let l = by_process.entry((epoch, pid)).or_insert(Lifetime {
                epoch,
                pid,
                first_ms: ms,
                last_ms: ms,
            });
            l.first_ms = l.first_ms.min(ms);
            l.last_ms = l.last_ms.max(ms);
        }
        let mut v: Vec<Lifetime> = by_process.into_values().collect();
        v.sort_by_key(|l| l.first_ms);
        out.insert(key, v);
    }
    out
}

/// Pairs of processes of one key that were alive at the same time.
pub fn overlaps(all: &BTreeMap<String, Vec<Lifetime>>) -> Vec<(String, Lifetime, Lifetime)> {
    let mut found = Vec::new();
    for (key, lives) in all {
        for (i, a) in lives.iter().enumerate() {
            for b in &lives[i + 1..] {
                if b.first_ms <= a.last_ms {
                    found.push((key.clone(), a.clone(), b.clone()));
                }
            }
        }
    }
    found
}
