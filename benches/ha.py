#!/usr/bin/env python3
"""Control-plane benchmark: connect throughput and latency on the embedded store and on a
3-member etcd, and leader failover time over repeated kills.

    cargo build --release && python3 benches/ha.py [--connects 200] [--inflight 20] [--kills 10]

Starts everything it needs as child processes on free loopback ports in a temporary directory
(etcd from Debian's etcd-server; `target/release/hangar`), and stops all of it at the end.

- connects: `--connects` connects for new keys, `--inflight` at a time, through one `serve`
  with one process drone (real spawns of the demo backend); throughput and p50/p99 of the
  connect call, for the embedded store and for etcd (3 instances, connects sent to the
  leader).
- failover: with 3 instances on etcd (`--leader-ttl 3`), kill -9 the leader, time until a
  survivor reports a new leader, restart the killed instance, repeat `--kills` times.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import atexit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every child started, killed at exit whatever happened (a failed run leaves nothing behind).
CHILDREN = []


@atexit.register
def _kill_children():
    for proc in CHILDREN:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
HANGAR = os.path.join(ROOT, "target", "release", "hangar")
SECRET = "bench-drone-secret"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# The admin token the first `serve` wrote to its data directory (serve's API needs one).
TOKEN = None


def http(method, url, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if TOKEN:
        req.add_header("authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            try:
                return r.status, json.loads(raw or b"{}")
            except ValueError:
                return r.status, {}
    except urllib.error.HTTPError as e:
        return e.code, {}


def wait(pred, what, limit=30.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.02)
    sys.exit(f"ha.py: {what} did not happen within {limit}s")


class Etcd:
    def __init__(self, tmp, size=3):
        self.members = []
        ports = [(free_port(), free_port()) for _ in range(size)]
        cluster = ",".join(f"m{i}=http://127.0.0.1:{p[1]}" for i, p in enumerate(ports))
        for i, (client, peer) in enumerate(ports):
            log = open(os.path.join(tmp, f"etcd{i}.log"), "w")
            proc = subprocess.Popen(
                ["etcd", "--name", f"m{i}", "--data-dir", os.path.join(tmp, f"m{i}.etcd"),
                 "--listen-client-urls", f"http://127.0.0.1:{client}",
                 "--advertise-client-urls", f"http://127.0.0.1:{client}",
                 "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-cluster", cluster, "--initial-cluster-state", "new",
                 "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1m"],
                stdout=log, stderr=log)
            CHILDREN.append(proc)
            self.members.append((proc, client))
        self.url = "etcd://" + ",".join(f"127.0.0.1:{c}" for _, c in self.members)
        wait(lambda: all(self._healthy(c) for _, c in self.members), "etcd health")

    @staticmethod
    def _healthy(port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return json.loads(r.read()).get("health") == "true"

    def stop(self):
        for proc, _ in self.members:
            proc.kill()
            proc.wait()


class Serve:
    def __init__(self, tmp, name, store, extra=()):
        self.data = os.path.join(tmp, name)
        os.makedirs(self.data, exist_ok=True)
        self.api = f"127.0.0.1:{free_port()}"
        self.proxy = f"127.0.0.1:{free_port()}"
        self.args = [HANGAR, "serve", "--api", self.api, "--proxy", self.proxy,
                     "--data-dir", self.data, "--store", store, "--drone-secret", SECRET,
                     "--dns", "off",
                     *(() if "--metrics" in extra else ("--metrics", "off")), *extra]
        self.start()

    def start(self):
        log = open(self.data + ".log", "a")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=log)
        CHILDREN.append(self.proc)
        wait(lambda: http("GET", f"http://{self.api}/healthz")[0] == 200, "serve up")
        global TOKEN
        path = os.path.join(self.data, "admin.token")
        if os.path.exists(path):
            with open(path) as f:
                TOKEN = f.read().strip()

    def cluster(self):
        return http("GET", f"http://{self.api}/v1/cluster", timeout=2)[1]

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def drone(tmp, urls):
    log = open(os.path.join(tmp, "drone.log"), "w")
    proc = subprocess.Popen(
        [HANGAR, "drone", "--scheduler", urls, "--name", "d1", "--secret", SECRET,
         "--runtime", "process", "--data-dir", os.path.join(tmp, "drone"),
         "--metrics", "off", "--max-backends", "100000",
         "--cpu-millis", "100000000", "--memory-mb", "100000000"],
        stdout=log, stderr=log)
    CHILDREN.append(proc)
    return proc


def connects(api, n, inflight, tag):
    latencies, lock, errors = [], threading.Lock(), []
    keys = iter(range(n))

    def worker():
        while True:
            with lock:
                k = next(keys, None)
            if k is None:
                return
            t = time.perf_counter()
            status, _ = http("POST", f"http://{api}/v1/connect",
                             {"key": {"name": f"{tag}-{k}"}, "spawn": {"idle_timeout_s": 3600}})
            dt = time.perf_counter() - t
            with lock:
                (latencies if status in (200, 201) else errors).append(dt if status < 300 else status)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(inflight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.perf_counter() - start
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000
    return {"connects": len(latencies), "errors": len(errors), "per_s": len(latencies) / total,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def leader_of(serves):
    for s in serves:
        try:
            v = s.cluster()
            if v.get("leader"):
                return v["leader"]["instance"], v["leader"]["term"]
        except OSError:
            continue
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connects", type=int, default=200)
    ap.add_argument("--inflight", type=int, default=20)
    ap.add_argument("--kills", type=int, default=10)
    a = ap.parse_args()
    if not os.path.exists(HANGAR):
        sys.exit("ha.py: build the release binary first: cargo build --release")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Embedded store, one instance.
        s = Serve(tmp, "embedded", "embedded")
        d = drone(tmp, f"http://{s.api}")
        wait(lambda: any(x["state"] == "ready" for x in http("GET", f"http://{s.api}/v1/drones")[1].get("drones", [])), "drone ready")
        results["embedded"] = connects(s.api, a.connects, a.inflight, "e")
        d.kill(); d.wait(); s.stop()

        # etcd, three instances.
        etcd = Etcd(tmp)
        try:
            serves = [Serve(tmp, f"s{i}", etcd.url, ("--leader-ttl", "3", "--lease-ttl", "10"))
                      for i in range(3)]
            urls = ",".join(f"http://{x.api}" for x in serves)
            d = drone(tmp, urls)
            wait(lambda: leader_of(serves) is not None, "a leader")
            leader_id, _ = leader_of(serves)
            leader = next(x for x in serves if x.cluster()["this_instance"] == leader_id)
            wait(lambda: any(x["state"] == "ready" for x in http("GET", f"http://{leader.api}/v1/drones")[1].get("drones", [])), "drone on the leader")
            results["etcd"] = connects(leader.api, a.connects, a.inflight, "x")

            failovers = []
            for _ in range(a.kills):
                leader_id, term = leader_of(serves)
                victim = next(x for x in serves if x.cluster()["this_instance"] == leader_id)
                others = [x for x in serves if x is not victim]
                t = time.perf_counter()
                victim.kill()
                wait(lambda: (leader_of(others) or ("", 0))[0] not in ("", leader_id), "a new leader")
                failovers.append(time.perf_counter() - t)
                victim.start()
                wait(lambda: len(victim.cluster().get("instances", [])) == 3, "the instance back")
            results["failover_s"] = {"runs": len(failovers), "median": statistics.median(failovers),
                                     "max": max(failovers), "min": min(failovers)}
            d.kill(); d.wait()
            for x in serves:
                x.stop()
        finally:
            etcd.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
