#!/usr/bin/env python3
"""DNS against NSD: queries per second, latency and queries per CPU-second of Hangar's DNS
server and of NSD serving the same zone, side by side in one run.

    apt-get install dnsperf nsd   # Debian's packages; the script installs nothing
    cargo build --release && python3 benches/dns_nsd.py [--rounds 3] [--duration 8]

Starts `hangar dev` (`target/release/hangar`, or --hangar; DNS on a free loopback port) with
8 live backends (process runtime), and NSD (`nsd -d`, one server process, no response rate
limiting, no remote control) with a zone file holding the same names: SOA, NS and the apex
like Hangar's, an A record per backend with the proxy's address, TTL 5. Both servers are
pinned to CPU 0 and dnsperf to CPU 1 (`taskset`). Each round runs dnsperf against Hangar, then
NSD, then (with --compare) an earlier hangar build with 8 backends of its own: interleaved,
`--rounds` times, `--duration` seconds each, 16 clients, 100 queries in flight, on a query
file of the 8 live names (A) and 2 unknown ones (NXDOMAIN with the SOA).

Reported per server and round: answered queries per second, dnsperf's average and maximum
latency, and queries per CPU-second of the server's processes (utime + stime from
/proc/<pid>/stat over the round, every process of NSD's). After each round's load, a
fixed-rate pass per server (--latency-qps, 4 s, dnsperf -v) gives latency percentiles at a load
both servers carry without queueing; the summary gives their medians over the rounds.
Everything listens on free loopback ports and every child is stopped at the end, whatever
happens.
"""

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ha  # noqa: E402  (HANGAR, CHILDREN and their reaper, wait, http)

DOMAIN = "hangar.localhost"
TTL = 5
SERVER_CPU = "0"
CLIENT_CPU = "1"
BACKENDS = 8

def free_port():
    """A port free for both UDP and TCP on 127.0.0.1."""
    while True:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        port = u.getsockname()[1]
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()


def tcp_open(port):
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def dns_answers(port, name):
    """True once a UDP A query for `name` gets any answer."""
    q = bytearray(b"\x12\x34\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00")
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(bytes(q), ("127.0.0.1", port))
        try:
            data = s.recv(4096)
        except socket.timeout:
            return False
        return data[:2] == b"\x12\x34" and data[3] & 0x0F == 0


def http_json(url, body=None):
    return ha.http("POST" if body is not None else "GET", url, body)[1]


def cpu_seconds(pids):
    """utime + stime of the processes (all their threads), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        # After the command: state is field 3, utime 14 and stime 15 (1-based).
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def process_tree(pid):
    """`pid` and its descendants (NSD forks its server and xfrd processes)."""
    out = [pid]
    try:
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                  text=True).stdout.split()
    except OSError:
        children = []
    for c in children:
        out += process_tree(int(c))
    return out


def start_hangar(binary, work):
    os.makedirs(work, exist_ok=True)
    api, proxy, dns = free_port(), free_port(), free_port()
    log = open(os.path.join(work, "hangar.log"), "w")
    proc = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, binary, "dev", "--api", f"127.0.0.1:{api}",
         "--proxy", f"127.0.0.1:{proxy}", "--dns", f"127.0.0.1:{dns}", "--metrics", "off",
         "--data-dir", os.path.join(work, "dev"), "--idle-timeout", "3600"],
        stdout=log, stderr=log)
    ha.CHILDREN.append(proc)
    ha.wait(lambda: tcp_open(api), "hangar dev's API listening")
    backends = []
    for i in range(BACKENDS):
        resp = http_json(f"http://127.0.0.1:{api}/v1/connect", {"key": {"name": f"dns-{i}"}})
        backends.append((resp["backend_id"], resp["status_url"]))
    for bid, status_url in backends:
        ha.wait(lambda: http_json(status_url)["status"] == "ready", f"backend {bid} ready", 60)
    ids = [b for b, _ in backends]
    ha.wait(lambda: all(dns_answers(dns, f"{b}.{DOMAIN}") for b in ids), "hangar answering dns")
    return proc, dns, ids


def start_nsd(work, ids, serial):
    port = free_port()
    zone = os.path.join(work, "hangar.zone")
    with open(zone, "w") as f:
        f.write(f"$ORIGIN {DOMAIN}.\n$TTL {TTL}\n")
        f.write(f"@ IN SOA ns.{DOMAIN}. hostmaster.{DOMAIN}. {serial} 3600 600 86400 {TTL}\n")
        f.write(f"@ IN NS ns.{DOMAIN}.\n@ IN A 127.0.0.1\nns IN A 127.0.0.1\n")
        for b in ids:
            f.write(f"{b} IN A 127.0.0.1\n")
    conf = os.path.join(work, "nsd.conf")
    with open(conf, "w") as f:
        f.write(f"""server:
    ip-address: 127.0.0.1@{port}
    port: {port}
    server-count: 1
    username: ""
    chroot: ""
    zonesdir: "{work}"
    database: ""
    zonelistfile: "{work}/zone.list"
    xfrdfile: "{work}/xfrd.state"
    xfrdir: "{work}"
    pidfile: "{work}/nsd.pid"
    logfile: "{work}/nsd.log"
    verbosity: 0
    hide-version: yes
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: {DOMAIN}
    zonefile: "{zone}"
""")
    check = subprocess.run(["nsd-checkconf", conf], capture_output=True, text=True)
    if check.returncode != 0:
        sys.exit(f"dns_nsd.py: nsd rejects its configuration: {check.stderr or check.stdout}")
    log = open(os.path.join(work, "nsd.out"), "w")
    proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, "nsd", "-d", "-c", conf],
                            stdout=log, stderr=log)
    ha.CHILDREN.append(proc)
    ha.wait(lambda: dns_answers(port, f"{ids[0]}.{DOMAIN}"), "nsd answering")
    return proc, port


def dnsperf(port, queries, duration, extra=()):
    out = subprocess.run(
        ["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p", str(port),
         "-d", queries, "-c", "16", "-l", str(duration), *extra],
        capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"dns_nsd.py: dnsperf failed: {out.stderr}")
    return out.stdout


def parse_dnsperf(text):
    def num(pattern):
        m = re.search(pattern, text)
        return float(m.group(1)) if m else float("nan")
    return {
        "qps": num(r"Queries per second:\s+([\d.]+)"),
        "avg_ms": num(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
        "max_ms": num(r"Average Latency \(s\):.*max ([\d.]+)") * 1000,
        "lost": num(r"Queries lost:\s+(\d+)"),
        "completed": num(r"Queries completed:\s+(\d+)"),
    }


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--latency-qps", type=int, default=20000)
    ap.add_argument("--hangar", default=ha.HANGAR, help="the hangar binary (default: release build)")
    ap.add_argument("--compare", metavar="BINARY",
                    help="another hangar binary (an earlier build) measured in the same rounds")
    args = ap.parse_args()
    missing = [pkg for tool, pkg in (("dnsperf", "dnsperf"), ("nsd", "nsd"),
                                     ("nsd-checkconf", "nsd"), ("taskset", "util-linux"))
               if not shutil.which(tool)]
    if missing:
        sys.exit("dns_nsd.py needs Debian's packages " + " ".join(sorted(set(missing))) +
                 ": apt-get install " + " ".join(sorted(set(missing))))
    for binary in (args.hangar, args.compare):
        if binary and not os.path.exists(binary):
            sys.exit(f"dns_nsd.py: {binary} is missing: build first: cargo build --release")
    if (os.cpu_count() or 1) < 2:
        sys.exit("dns_nsd.py needs 2 CPUs: the servers on one, dnsperf on the other")

    work = tempfile.mkdtemp(prefix="hangar-dns-nsd-")
    hangar, hangar_port, ids = start_hangar(args.hangar, os.path.join(work, "hangar"))
    nsd, nsd_port = start_nsd(work, ids, 1)
    queries = os.path.join(work, "queries.txt")
    with open(queries, "w") as f:
        for b in ids:
            f.write(f"{b}.{DOMAIN} A\n")
        f.write(f"bunknown1.{DOMAIN} A\nbunknown2.{DOMAIN} A\n")

    servers = {"hangar": (hangar_port, lambda: [hangar.pid]),
               "nsd": (nsd_port, lambda: process_tree(nsd.pid))}
    if args.compare:
        # Its own backends; the query file names the first instance's, so the names it knows
        # are NXDOMAIN here: give it the same names instead, through its own zone.
        other, other_port, other_ids = start_hangar(args.compare, os.path.join(work, "compare"))
        other_queries = os.path.join(work, "compare-queries.txt")
        with open(other_queries, "w") as f:
            for b in other_ids:
                f.write(f"{b}.{DOMAIN} A\n")
            f.write(f"bunknown1.{DOMAIN} A\nbunknown2.{DOMAIN} A\n")
        servers["compare"] = (other_port, lambda: [other.pid])
    results = {name: [] for name in servers}
    latency = {name: [] for name in servers}
    print(f"# dns_nsd.py: {args.rounds} rounds of {args.duration} s, 16 clients, "
          f"servers on CPU {SERVER_CPU}, dnsperf on CPU {CLIENT_CPU}")
    for rnd in range(args.rounds):
        for name, (port, pids) in servers.items():
            p = pids()
            c0 = cpu_seconds(p)
            qfile = other_queries if name == "compare" else queries
            r = parse_dnsperf(dnsperf(port, qfile, args.duration))
            used = cpu_seconds(p) - c0
            r["cpu_s"] = used
            r["per_cpu"] = r["completed"] / used if used else float("nan")
            results[name].append(r)
            print(f"round {rnd + 1} {name:7}: {r['qps']:9.0f} q/s  avg {r['avg_ms']:.3f} ms  "
                  f"max {r['max_ms']:.2f} ms  lost {r['lost']:.0f}  cpu {used:.2f} s  "
                  f"{r['per_cpu']:9.0f} q/cpu-s", flush=True)
        # Latency percentiles at a rate both servers carry without queueing, every round, so
        # that one noisy pass does not decide the comparison.
        for name, (port, _) in servers.items():
            qfile = other_queries if name == "compare" else queries
            text = dnsperf(port, qfile, 4, ("-Q", str(args.latency_qps), "-v"))
            lat = sorted(float(m.group(1)) * 1000 for m in
                         re.finditer(r"^> \S+ .* ([\d.]+)$", text, re.M))
            latency[name].append((percentile(lat, 50), percentile(lat, 99), len(lat)))
            print(f"round {rnd + 1} {name:7}: at {args.latency_qps} q/s p50 "
                  f"{latency[name][-1][0]:.3f} ms  p99 {latency[name][-1][1]:.3f} ms "
                  f"({len(lat)} answers)", flush=True)

    print("\nserver   q/s (median, range)           avg latency       q/cpu-s (median, range)"
          f"   at {args.latency_qps} q/s: p50 / p99 (medians of the rounds; p99 range)")
    for name, rs in results.items():
        qps = [r["qps"] for r in rs]
        avg = [r["avg_ms"] for r in rs]
        per = [r["per_cpu"] for r in rs]
        p50 = statistics.median(x[0] for x in latency[name])
        p99s = [x[1] for x in latency[name]]
        print(f"{name:7} {statistics.median(qps):8.0f} ({min(qps):.0f}-{max(qps):.0f})   "
              f"{statistics.median(avg):.3f} ms ({min(avg):.3f}-{max(avg):.3f})   "
              f"{statistics.median(per):8.0f} ({min(per):.0f}-{max(per):.0f})   "
              f"{p50:.3f} / {statistics.median(p99s):.3f} ms ({min(p99s):.3f}-{max(p99s):.3f})")
    if args.compare:
        print(f"(compare = {args.compare})")
    ratio = statistics.median([r["per_cpu"] for r in results["hangar"]]) / \
        statistics.median([r["per_cpu"] for r in results["nsd"]])
    print(f"\nhangar/nsd queries per CPU-second: {ratio:.2f}")


if __name__ == "__main__":
    main()
