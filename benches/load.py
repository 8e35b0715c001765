#!/usr/bin/env python3
"""Load benchmark: the demo backend directly, through Hangar's proxy, and through nginx.

Each target is pinned the same way: the proxy and the backend share core 0, the load generator
(oha) runs on core 1. Targets are interleaved, three runs each. Reports, per target:

- req/s and p50/p99 latency at saturation (oha with -c connections, no rate limit);
- p50/p99 at a fixed 5,000 req/s, and what the proxy adds over the direct backend;
- time per request on one connection, one request at a time (closed loop, no queueing), and
  what the proxy adds over the direct backend: the proxy's own latency with the least noise;
- req/s per CPU-second of the proxy process (its utime+stime over the saturation run);
- memory per idle keep-alive client connection: RSS growth with 1,000 idle connections, and
  again with 1,000 more once the first ones have closed (steady state: the allocator reuses
  what the first burst reserved; nginx preallocates its connection structures).

Hangar runs as `hangar dev` with tokens checked (Authorization: Bearer) and Host routing;
nginx 1.22 is configured the same way (Host routing, upstream keep-alive, access log off,
one worker, and the forwarding fields Hangar adds: host, x-forwarded-host/-for/-proto and the
backend id). Needs: a release build (`cargo build --release`), oha (`cargo install oha
--locked`), nginx and taskset. Everything stays on 127.0.0.1.

    python3 benches/load.py [--duration 10] [--runs 3] [--fixed-runs N] [--connections 50]
                            [--hangar PATH]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANGAR = os.path.join(ROOT, "target", "release", "hangar")
PROXY_CORE = "0"
LOAD_CORE = "1"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def rss_kb(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def oha(url, headers, duration, connections, rate=None):
    cmd = ["taskset", "-c", LOAD_CORE, "oha", "--no-tui", "--output-format", "json",
           "-z", f"{duration}s", "-c", str(connections)]
    if rate:
        cmd += ["-q", str(rate)]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    j = json.loads(out)
    codes = j.get("statusCodeDistribution", {})
    bad = sum(v for k, v in codes.items() if k != "200")
    return {
        "rps": j["summary"]["requestsPerSec"],
        "p50": j["latencyPercentiles"]["p50"] * 1000,
        "p99": j["latencyPercentiles"]["p99"] * 1000,
        "non200": bad,
        "ok": codes.get("200", 0),
    }


def idle_memory(port, host, headers, pids, n=1000):
    before = rss_kb(pids)
    socks = []
    req = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(req.encode())
        s.recv(4096)
        socks.append(s)
    time.sleep(1)
    after = rss_kb(pids)
    for s in socks:
        s.close()
    return (after - before) * 1024 / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--fixed-runs", type=int, default=0,
                    help="rounds of the fixed-rate test in all (default: --runs); the rounds "
                         "beyond --runs measure only the fixed rate, to settle its p99")
    ap.add_argument("--hangar", default=HANGAR, help="the hangar binary (default: release build)")
    args = ap.parse_args()
    for tool in ("oha", "nginx", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: see the docstring for how to install it")
    if not os.path.exists(args.hangar):
        sys.exit("build first: cargo build --release")

    work = tempfile.mkdtemp(prefix="hangar-load-")
    procs = []
    try:
        api, proxy = free_port(), free_port()
        dev = subprocess.Popen(
            ["taskset", "-c", PROXY_CORE, args.hangar, "dev", "--api", f"127.0.0.1:{api}",
             "--proxy", f"127.0.0.1:{proxy}", "--dns", "off", "--metrics", "off",
             "--data-dir", os.path.join(work, "dev"), "--idle-timeout", "3600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(dev)
        wait_port(api)
        body = json.dumps({"key": {"name": "bench"}}).encode()
        resp = json.load(urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{api}/v1/connect", body)))
        bid, token = resp["backend_id"], resp["token"]
        deadline = time.time() + 20
        while True:
            view = json.load(urllib.request.urlopen(resp["status_url"]))
            if view["status"] == "ready":
                break
            if time.time() > deadline:
                sys.exit(f"backend never became ready: {view}")
            time.sleep(0.05)
        backend_port = int(view["address"].rsplit(":", 1)[1])
        host = f"{bid}.hangar.localhost"
        auth = f"Authorization: Bearer {token}"

        nginx_port = free_port()
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
worker_processes 1;
worker_cpu_affinity 01;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{nginx_port};
        server_name ~^(?<bid>[a-z0-9]+)\\.hangar\\.localhost$;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # The fields Hangar adds, so the backend parses the same request from both.
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Hangar-Backend-Id $bid;
        }}
    }}
}}
""")
        ngx = subprocess.Popen(["taskset", "-c", PROXY_CORE, "nginx", "-c", conf, "-p", work],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(ngx)
        wait_port(nginx_port)

        hangar_pids = [dev.pid]
        nginx_pids = children(ngx.pid) or [ngx.pid]
        targets = {
            "direct": (f"http://127.0.0.1:{backend_port}/count", [], None),
            "hangar": (f"http://127.0.0.1:{proxy}/count", [f"Host: {host}", auth], hangar_pids),
            "nginx": (f"http://127.0.0.1:{nginx_port}/count", [f"Host: {host}"], nginx_pids),
        }
        results = {t: {"sat": [], "fixed": [], "per_cpu": [], "seq": []} for t in targets}
        seq_bad = 0
        for run in range(args.runs):
            for name, (url, headers, pids) in targets.items():
                c0 = cpu_seconds(pids) if pids else None
                sat = oha(url, headers, args.duration, args.connections)
                if pids:
                    used = cpu_seconds(pids) - c0
                    results[name]["per_cpu"].append(sat["ok"] / used if used else 0)
                results[name]["sat"].append(sat)
                fixed = oha(url, headers, args.duration, args.connections, rate=args.rate)
                results[name]["fixed"].append(fixed)
                seq = oha(url, headers, args.duration, 1)
                results[name]["seq"].append(1e6 / seq["rps"])
                seq_bad += seq["non200"]
                print(f"run {run + 1} {name}: {sat['rps']:.0f} req/s p50 {sat['p50']:.3f} ms "
                      f"p99 {sat['p99']:.3f} ms | @{args.rate}/s p50 {fixed['p50']:.3f} "
                      f"p99 {fixed['p99']:.3f} | one connection {1e6 / seq['rps']:.1f} us/req "
                      f"| non-200 {sat['non200'] + fixed['non200'] + seq['non200']}",
                      file=sys.stderr)
        for run in range(args.runs, args.fixed_runs):
            for name, (url, headers, pids) in targets.items():
                fixed = oha(url, headers, args.duration, args.connections, rate=args.rate)
                results[name]["fixed"].append(fixed)
                print(f"fixed-rate round {run + 1} {name}: @{args.rate}/s p50 {fixed['p50']:.3f} "
                      f"p99 {fixed['p99']:.3f} | non-200 {fixed['non200']}", file=sys.stderr)
        mem = {
            "hangar": [idle_memory(proxy, host, [auth], hangar_pids) for _ in range(2)],
            "nginx": [idle_memory(nginx_port, host, [], nginx_pids) for _ in range(2)],
        }

        med = statistics.median
        d50 = med(r["p50"] for r in results["direct"]["fixed"])
        d99 = med(r["p99"] for r in results["direct"]["fixed"])
        dseq = med(results["direct"]["seq"])
        print(f"| Target | req/s at saturation | p50 / p99 at saturation (ms) | p50 / p99 at {args.rate} req/s (ms) | added p50 / p99 (ms) | one connection: µs per request (added) | req/s per proxy CPU-second | memory per idle connection (first / next 1,000) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name in targets:
            r = results[name]
            rps = med(x["rps"] for x in r["sat"])
            s50 = med(x["p50"] for x in r["sat"])
            s99 = med(x["p99"] for x in r["sat"])
            f50 = med(x["p50"] for x in r["fixed"])
            f99 = med(x["p99"] for x in r["fixed"])
            added = "-" if name == "direct" else f"{f50 - d50:.3f} / {f99 - d99:.3f}"
            sq = med(r["seq"])
            seq = f"{sq:.1f}" if name == "direct" else f"{sq:.1f} ({sq - dseq:+.1f})"
            per_cpu = f"{med(r['per_cpu']):,.0f}" if r["per_cpu"] else "-"
            m = " / ".join(f"{x / 1024:.1f} KB" for x in mem[name]) if name in mem else "-"
            print(f"| {name} | {rps:,.0f} | {s50:.3f} / {s99:.3f} | {f50:.3f} / {f99:.3f} | {added} | {seq} | {per_cpu} | {m} |")
        for name in targets:
            r = results[name]
            print(f"{name} per run: p99 at {args.rate} req/s "
                  + ", ".join(f"{x['p99']:.3f}" for x in r["fixed"])
                  + (" | req/s per CPU-second " + ", ".join(f"{x:,.0f}" for x in r["per_cpu"])
                     if r["per_cpu"] else "")
                  + " | µs per request on one connection " + ", ".join(f"{x:.1f}" for x in r["seq"]))
        # Each round's added p99 against the direct backend's in the same round, and how
        # often each proxy had the lower p99 of the two in a round.
        rounds = len(results["direct"]["fixed"])
        added = {n: [results[n]["fixed"][i]["p99"] - results["direct"]["fixed"][i]["p99"]
                     for i in range(rounds)] for n in ("hangar", "nginx")}
        lower = sum(1 for i in range(rounds)
                    if results["hangar"]["fixed"][i]["p99"] < results["nginx"]["fixed"][i]["p99"])
        print(f"added p99 at {args.rate} req/s over {rounds} rounds, median of per-round "
              f"differences: hangar {med(added['hangar']):.3f} ms, nginx "
              f"{med(added['nginx']):.3f} ms; hangar's p99 was the lower in {lower} of "
              f"{rounds} rounds")
        bad = seq_bad + sum(
            x["non200"] for r in results.values() for k in ("sat", "fixed") for x in r[k])
        print(f"\nnon-200 responses in all runs: {bad}")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
