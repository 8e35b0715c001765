#!/usr/bin/env python3
"""Control-plane scale benchmark: one `hangar serve` (embedded store, or with `--store etcd` a
3-member etcd from Debian's etcd-server) and many hollow drones
(`hangar hollow-drones`: real drone sessions whose backends run nothing), backends connected
up to each level of live backends.

    cargo build --release --bin hangar --example connect_load
    python3 benches/scale.py [--drones 1000] [--levels 1000,10000,100000]

Connects come from `examples/connect_load.rs` (keep-alive HTTP/1.1, new keys, `--inflight` at
a time). At each level it reports: connect throughput and p50/p99 of the connects that reached
the level; placement decision time and reconciler pass time (mean and p99 from serve's
histograms over that phase); serve's RSS per live backend (above its RSS with no backend);
serve's CPU time per connect while they ran; serve's own CPU (share of one core) over
`--quiet-s` seconds without load, and the records each reconciler pass looked at then;
then, with 100 connects a second running for `--propagation-s` seconds, route propagation to
a remote `hangar proxy` (p50/p99 from the start of the connect, whose record is written
during it, until the remote proxy routes the backend's hostname). At the end: the time to
handle the loss of one drone holding `--lone` backends (its own process killed), then of
every drone at once, and `serve`'s restart time to ready with every record.

Everything runs as child processes on free loopback ports in a temporary directory and is
stopped at the end (also when a run fails).
"""

import argparse
import os
import signal
import subprocess
import sys
import json
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ha  # noqa: E402  (free_port, http, wait, Serve, the token and the child reaper)

LOAD = os.path.join(ha.ROOT, "target", "release", "examples", "connect_load")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid):
    """CPU seconds (user and system) the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def counter(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def scrape(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        return r.read().decode()


def histogram(text, name):
    """(count, sum, {le: cumulative}) of a histogram in a scrape."""
    count, total, buckets = 0.0, 0.0, {}
    for line in text.splitlines():
        if line.startswith(name + "_count"):
            count = float(line.split()[-1])
        elif line.startswith(name + "_sum"):
            total = float(line.split()[-1])
        elif line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets[le] = float(line.split()[-1])
    return count, total, buckets


def phase(before, after, name):
    """Mean and p99 (upper bucket bound) of a histogram between two scrapes, in ms."""
    c0, s0, b0 = histogram(before, name)
    c1, s1, b1 = histogram(after, name)
    n = c1 - c0
    if n <= 0:
        return None, None
    p99 = None
    for le in sorted((k for k in b1 if k != "+Inf"), key=float):
        if b1[le] - b0.get(le, 0.0) >= 0.99 * n:
            p99 = float(le) * 1000
            break
    return (s1 - s0) / n * 1000, p99


def live(api, **filters):
    query = "".join(f"&{k}={v}" for k, v in filters.items())
    status, body = ha.http("GET", f"http://{api}/v1/backends?status=live&limit=1{query}",
                           timeout=300)
    return body.get("total", -1) if status == 200 else -1


def load(serve, count, inflight, tag, *extra):
    """Runs the Rust load generator; its JSON summary."""
    out = subprocess.run(
        [LOAD, "--api", serve.api, "--token-file", os.path.join(serve.data, "admin.token"),
         "--count", str(count), "--inflight", str(inflight), "--tag", tag, *extra],
        check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    if r["errors"]:
        print(f"scale: {r['errors']} connects failed, first: {r['first_error']}", flush=True)
    return r


def all_ended(api, ids):
    """Waits until every backend in `ids` has ended (terminating or terminated), checking
    each in turn with a single-record read (a listing reads every record of the store)."""
    for i in ids:
        while True:
            status, body = ha.http("GET", f"http://{api}/v1/backends/{i}", timeout=60)
            if status == 200 and body.get("status") in ("terminating", "terminated"):
                break
            if status == 404:
                break
            time.sleep(0.01)


def hollow(serve, tmp, name, count, max_backends, *extra):
    log = open(os.path.join(tmp, f"{name}.log"), "w")
    proc = subprocess.Popen(
        [ha.HANGAR, "hollow-drones", "--scheduler", f"http://{serve.api}", "--secret", ha.SECRET,
         "--count", str(count), "--max-backends", str(max_backends), "--name-prefix", name,
         *extra],
        stdout=log, stderr=log, env={**os.environ, "HANGAR_LOG": "warn"})
    ha.CHILDREN.append(proc)
    return proc


def ready_drones(api):
    return sum(1 for d in ha.http("GET", f"http://{api}/v1/drones", timeout=60)[1]
               .get("drones", []) if d["state"] == "ready")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--drones", type=int, default=1000)
    ap.add_argument("--levels", default="1000,10000")
    ap.add_argument("--inflight", type=int, default=32)
    ap.add_argument("--lease-ttl", type=int, default=10)
    ap.add_argument("--propagation-s", type=int, default=5,
                    help="seconds of 100 connects a second for the propagation figures")
    ap.add_argument("--store", choices=("embedded", "etcd"), default="embedded",
                    help="serve's store: the embedded one, or a 3-member etcd (Debian's etcd-server)")
    ap.add_argument("--quiet-s", type=int, default=5,
                    help="seconds without load at each level to measure serve's own CPU")
    ap.add_argument("--logs", metavar="DIR",
                    help="copy the logs of serve, the drones and the proxy into DIR at the end")
    ap.add_argument("--lone", type=int, default=100,
                    help="backends on the one drone whose loss is timed")
    a = ap.parse_args()
    for path, build in ((ha.HANGAR, "--bin hangar"), (LOAD, "--example connect_load")):
        if not os.path.exists(path):
            sys.exit(f"scale.py: build it first: cargo build --release {build}")
    levels = [int(x) for x in a.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        metrics = f"127.0.0.1:{ha.free_port()}"
        store = "embedded"
        if a.store == "etcd":
            store = ha.Etcd(tmp).url
        s = ha.Serve(tmp, "serve", store,
                     ("--lease-ttl", str(a.lease_ttl), "--idle-timeout", "86400",
                      "--metrics", metrics))
        base_rss = rss_kib(s.proc.pid)
        per_drone = max(levels) // a.drones * 2 + 100 + a.propagation_s * 100 * len(levels) // a.drones
        drones = hollow(s, tmp, "hollow", a.drones, per_drone)
        t0 = time.perf_counter()
        ha.wait(lambda: ready_drones(s.api) >= a.drones, f"{a.drones} hollow drones ready", limit=300)
        print(f"scale: {a.drones} hollow drones ready in {time.perf_counter() - t0:.1f} s; "
              f"serve RSS {base_rss / 1024:.1f} MiB with no backend", flush=True)

        # A remote data-plane proxy following serve's route feed.
        remote = f"127.0.0.1:{ha.free_port()}"
        with open(os.path.join(s.data, "token.key")) as f:
            token_key = f.read().strip()
        plog = open(os.path.join(tmp, "proxy.log"), "w")
        proxy = subprocess.Popen(
            [ha.HANGAR, "proxy", "--scheduler", f"http://{s.api}", "--secret", ha.SECRET,
             "--token-key", token_key, "--proxy", remote, "--metrics", "off",
             "--name", "remote"], stdout=plog, stderr=plog)
        ha.CHILDREN.append(proxy)

        have = 0
        rows = []
        for level in levels:
            before, busy0 = scrape(metrics), cpu_s(s.proc.pid)
            r = load(s, level - have, a.inflight, f"l{level}", "--ids",
                     os.path.join(tmp, f"ids-{level}"))
            after, busy1 = scrape(metrics), cpu_s(s.proc.pid)
            place_mean, place_p99 = phase(before, after, "hangar_scheduler_placement_seconds")
            pass_mean, pass_p99 = phase(before, after, "hangar_scheduler_reconcile_pass_seconds")
            rss = rss_kib(s.proc.pid)
            at_level = live(s.api)
            # Serve with nothing to do but its periodic passes (reconciler, monitor, leases):
            # its CPU over a quiet window, and how many records each reconciler pass looked at.
            quiet0, cpu0 = scrape(metrics), cpu_s(s.proc.pid)
            time.sleep(a.quiet_s)
            quiet1, cpu1 = scrape(metrics), cpu_s(s.proc.pid)
            passes = (histogram(quiet1, "hangar_scheduler_reconcile_pass_seconds")[0]
                      - histogram(quiet0, "hangar_scheduler_reconcile_pass_seconds")[0])
            looked = (counter(quiet1, "hangar_scheduler_reconcile_records_total")
                      - counter(quiet0, "hangar_scheduler_reconcile_records_total"))
            # Propagation to the remote proxy while 100 connects a second run.
            p = load(s, 100 * a.propagation_s, 64, f"p{level}", "--rate", "100",
                     "--proxy", remote)
            have = level + p["connects"]
            row = {"live": at_level, **r, "placement_mean_ms": place_mean,
                   "placement_p99_ms": place_p99, "pass_mean_ms": pass_mean,
                   "pass_p99_ms": pass_p99, "rss_mib": rss / 1024,
                   "rss_per_backend_kib": (rss - base_rss) / max(at_level, 1),
                   "prop_p50_ms": p["propagation_p50_ms"], "prop_p99_ms": p["propagation_p99_ms"],
                   "prop_n": p["propagated"], "at100_p50_ms": p["p50_ms"],
                   "at100_p99_ms": p["p99_ms"],
                   "serve_cpu_ms_per_connect": (busy1 - busy0) * 1000 / max(r["connects"], 1),
                   "quiet_cpu": (cpu1 - cpu0) / a.quiet_s,
                   "records_per_pass": looked / passes if passes else None}
            rows.append(row)
            print(f"scale: {row}", flush=True)

        # Losing one drone holding --lone backends: a process of its own, in a pool of its own.
        # Room for twice --lone: placement counts a backend twice while the table catches up.
        lone = hollow(s, tmp, "lone", 1, a.lone * 2 + 16, "--pool", "lone")
        ha.wait(lambda: ready_drones(s.api) >= a.drones + 1, "the lone drone ready", limit=60)
        lone_ids = os.path.join(tmp, "ids-lone")
        load(s, a.lone, 8, "lone", "--spawn-pool", "lone", "--ids", lone_ids)
        with open(lone_ids) as f:
            ids = f.read().split()
        n = live(s.api, drone="lone-0")
        t0 = time.perf_counter()
        lone.send_signal(signal.SIGKILL)
        lone.wait()
        all_ended(s.api, ids)
        lone_after = time.perf_counter() - t0
        if live(s.api, drone="lone-0") != 0:
            sys.exit("scale.py: the lone drone's backends ended but some are still listed live")
        print(f"scale: {n} backends on one drone lost {lone_after:.2f} s after its process "
              f"died (lease TTL {a.lease_ttl} s)", flush=True)

        # Losing every drone at once: the hollow process dies.
        # Timed on a sample of 200 backends from every level (reading each record); that all
        # are gone is checked after, untimed (a listing reads every record).
        import random
        sample = []
        for level in levels:
            with open(os.path.join(tmp, f"ids-{level}")) as f:
                sample += f.read().split()
        sample = random.Random(7).sample(sample, min(200, len(sample)))
        n = live(s.api)
        t0 = time.perf_counter()
        drones.send_signal(signal.SIGKILL)
        drones.wait()
        all_ended(s.api, sample)
        lost_after = time.perf_counter() - t0
        ha.wait(lambda: live(s.api) == 0, "every backend lost", limit=a.lease_ttl * 10 + 300)
        print(f"scale: {n} backends on {a.drones} drones lost {lost_after:.2f} s after the "
              f"drones' process died (a sample of {len(sample)}; lease TTL {a.lease_ttl} s)",
              flush=True)

        # Restart with every record.
        proxy.kill()
        proxy.wait()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait()
        t0 = time.perf_counter()
        s.start()
        restart = time.perf_counter() - t0
        print(f"scale: serve restarted (healthz) in {restart:.2f} s with {have} backend "
              f"records", flush=True)
        s.stop()
        if a.logs:
            import glob
            import shutil
            os.makedirs(a.logs, exist_ok=True)
            for path in glob.glob(os.path.join(tmp, "*.log")):
                shutil.copy(path, a.logs)

    print("\n| Live backends | Connects/s | p50 | p99 | Placement mean / p99 | Reconciler pass mean / p99 | serve RSS | RSS per backend | Propagation p50 / p99 (at 100/s) | serve CPU per connect | Quiet serve CPU | Records per pass |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda v: "-" if v is None else f"{v:.3f} ms"
    for r in rows:
        print(f"| {r['live']} | {r['per_s']:.0f} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms "
              f"| {fmt(r['placement_mean_ms'])} / {fmt(r['placement_p99_ms'])} "
              f"| {fmt(r['pass_mean_ms'])} / {fmt(r['pass_p99_ms'])} "
              f"| {r['rss_mib']:.0f} MiB | {r['rss_per_backend_kib']:.1f} KiB "
              f"| {r['prop_p50_ms']:.1f} / {r['prop_p99_ms']:.1f} ms ({r['prop_n']}) "
              f"| {r['serve_cpu_ms_per_connect']:.2f} ms "
              f"| {r['quiet_cpu'] * 100:.1f}% "
              f"| {'-' if r['records_per_pass'] is None else round(r['records_per_pass'])} |")


if __name__ == "__main__":
    main()
