#!/usr/bin/env python3
"""Control-plane scale benchmark: one `hangar serve` (embedded store) and many hollow drones
(`hangar hollow-drones`: real drone sessions whose backends run nothing), backends connected
up to each level of live backends.

    cargo build --release && python3 benches/scale.py [--drones 1000] [--levels 1000,10000]

At each level it reports: connect throughput and p50/p99 of the connects that reached the
level (`--inflight` at a time); placement decision time and reconciler pass time (mean and
p99 from serve's histograms over that phase); serve's RSS per live backend (above its RSS
with no backend). At the end: the time to lose every backend when the hollow drones' process
dies (lease TTL plus handling), and `serve`'s restart time to ready with every record.

Everything runs as child processes on free loopback ports in a temporary directory and is
stopped at the end (also when a run fails).
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ha  # noqa: E402  (free_port, http, wait, Serve, the token and the child reaper)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


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


def live(api):
    status, body = ha.http("GET", f"http://{api}/v1/backends?status=live", timeout=120)
    return len(body.get("backends", [])) if status == 200 else -1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--drones", type=int, default=1000)
    ap.add_argument("--levels", default="1000,10000")
    ap.add_argument("--inflight", type=int, default=32)
    ap.add_argument("--lease-ttl", type=int, default=10)
    a = ap.parse_args()
    if not os.path.exists(ha.HANGAR):
        sys.exit("scale.py: build the release binary first: cargo build --release")
    levels = [int(x) for x in a.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        metrics = f"127.0.0.1:{ha.free_port()}"
        s = ha.Serve(tmp, "serve", "embedded",
                     ("--lease-ttl", str(a.lease_ttl), "--idle-timeout", "86400",
                      "--metrics", metrics))
        base_rss = rss_kib(s.proc.pid)
        log = open(os.path.join(tmp, "hollow.log"), "w")
        hollow = subprocess.Popen(
            [ha.HANGAR, "hollow-drones", "--scheduler", f"http://{s.api}", "--secret", ha.SECRET,
             "--count", str(a.drones), "--max-backends", str(max(levels) // a.drones * 4 + 100)],
            stdout=log, stderr=log, env={**os.environ, "HANGAR_LOG": "warn"})
        ha.CHILDREN.append(hollow)
        t0 = time.perf_counter()
        ha.wait(lambda: sum(1 for d in ha.http("GET", f"http://{s.api}/v1/drones", timeout=60)[1]
                            .get("drones", []) if d["state"] == "ready") >= a.drones,
                f"{a.drones} hollow drones ready", limit=300)
        print(f"scale: {a.drones} hollow drones ready in {time.perf_counter() - t0:.1f} s; "
              f"serve RSS {base_rss / 1024:.1f} MiB with no backend", flush=True)
        have = 0
        rows = []
        for level in levels:
            before = scrape(metrics)
            # New keys per level (ha.connects names them `<tag>-<n>`).
            r = ha.connects(s.api, level - have, a.inflight, f"l{level}")
            after = scrape(metrics)
            have = level
            place_mean, place_p99 = phase(before, after, "hangar_scheduler_placement_seconds")
            pass_mean, pass_p99 = phase(before, after, "hangar_scheduler_reconcile_pass_seconds")
            rss = rss_kib(s.proc.pid)
            row = {"live": level, **r, "placement_mean_ms": place_mean, "placement_p99_ms": place_p99,
                   "pass_mean_ms": pass_mean, "pass_p99_ms": pass_p99,
                   "rss_mib": rss / 1024, "rss_per_backend_kib": (rss - base_rss) / level}
            rows.append(row)
            print(f"scale: {row}", flush=True)

        # Losing every drone at once: the hollow process dies.
        n = live(s.api)
        t0 = time.perf_counter()
        hollow.send_signal(signal.SIGKILL)
        hollow.wait()
        ha.wait(lambda: live(s.api) == 0, "every backend lost", limit=a.lease_ttl * 10 + 120)
        lost_after = time.perf_counter() - t0
        print(f"scale: {n} backends on {a.drones} drones lost {lost_after:.2f} s after the "
              f"drones' process died (lease TTL {a.lease_ttl} s)", flush=True)

        # Restart with every record.
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait()
        t0 = time.perf_counter()
        s.start()
        restart = time.perf_counter() - t0
        print(f"scale: serve restarted (healthz) in {restart:.2f} s with {max(levels)} backend "
              f"records", flush=True)
        s.stop()

    print("\n| Live backends | Connects/s | p50 | p99 | Placement mean / p99 | Reconciler pass mean / p99 | serve RSS | RSS per backend |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda v: "-" if v is None else f"{v:.3f} ms"
    for r in rows:
        print(f"| {r['live']} | {r['per_s']:.0f} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms "
              f"| {fmt(r['placement_mean_ms'])} / {fmt(r['placement_p99_ms'])} "
              f"| {fmt(r['pass_mean_ms'])} / {fmt(r['pass_p99_ms'])} "
              f"| {r['rss_mib']:.0f} MiB | {r['rss_per_backend_kib']:.1f} KiB |")


if __name__ == "__main__":
    main()
