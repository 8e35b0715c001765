#!/usr/bin/env python3
"""Where each proxy's CPU goes per proxied HTTP/1.1 request, kernel functions included.

`load.py` shows that most of every proxy's CPU per request is the kernel's, and
`syscalls.py` that Hangar makes the same socket calls as the floor (haproxy relaying bytes);
this script shows whether the kernel work behind those calls is the same. `hangar dev` and the
references are started as `load.py` starts them (the proxy and the backend on core 0, oha on
core 1, 50 connections, Host routing, Hangar checking a bearer token on every request). For
each target, after an unmeasured pass, `perf record` samples core 0 on the CPU clock (a
software event: it works where the hardware counters are not exposed, as on this machine's
virtual CPUs) while oha runs, and the samples of the proxy's own process (never the
backend's) are turned into microseconds per request, per function. The table lists the
kernel functions with the largest difference from `--against` (the floor by default), then
the user-space total; with `--user-top N`, each target's N largest user-space functions by
sampled time (which, unlike `callgrind.py`'s instruction counts, includes what cache misses and
slow clock reads cost on this machine).

Sampling is statistical: two runs differ by a few hundredths of a microsecond per function.
Compare targets within one run.

    python3 benches/kernel_profile.py [--seconds 8] [--targets hangar,floor,nginx,haproxy]
                                      [--against floor] [--top 25] [--user-top N]
                                      [--hangar PATH]

Needs: a release build, oha (`cargo install oha --locked`), perf (Debian's `linux-perf`),
nginx, haproxy, openssl and util-linux (taskset); run as root, with kernel symbols readable
(`/proc/sys/kernel/kptr_restrict` 0).
"""

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import load

FREQUENCY = 4000  # samples per second


def profile(data, pids):
    """{symbol: samples} of the processes `pids` in the perf file `data` (symbols as perf
    prints them: `[k] name` for the kernel, `[.] name` for user space)."""
    report = subprocess.run(
        ["perf", "report", "-i", data, "--stdio", "-g", "none", "-F", "sample,pid,sym",
         "--sort", "pid,sym"],
        capture_output=True, text=True, check=True).stdout
    wanted = {str(p) for p in pids}
    samples = collections.Counter()
    for line in report.splitlines():
        # `  <samples>  <pid>:<comm>  [k] <symbol>` (a comm may hold spaces: NSD's "server 1")
        m = re.match(r"\s*(\d+)\s+(\d+):.*?\s(\[[k.]\] .*)$", line)
        if m and m.group(2) in wanted:
            samples[m.group(3).strip()] += int(m.group(1))
    return samples


def split(per_request):
    """(kernel, user space): the µs per request of one target's profile, summed."""
    kernel = sum(v for s, v in per_request.items() if s.startswith("[k]"))
    return kernel, sum(per_request.values()) - kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=8, help="sampled seconds per target")
    ap.add_argument("--targets", default="hangar,floor,nginx,haproxy")
    ap.add_argument("--against", default="floor", help="the target the differences are from")
    ap.add_argument("--top", type=int, default=25, help="kernel functions to list")
    ap.add_argument("--user-top", type=int, default=0,
                    help="user-space functions to list per target, by sampled time")
    ap.add_argument("--hangar", default=load.HANGAR)
    args = ap.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    for t in targets + [args.against]:
        if t not in ("hangar", "nginx", "haproxy", "floor"):
            sys.exit(f"kernel_profile.py: unknown target {t!r}: use hangar, nginx, haproxy, floor")
    if args.against not in targets:
        targets.append(args.against)
    load.require("kernel_profile.py", ("oha", "perf", "nginx", "haproxy", "openssl", "taskset"),
                 "install oha (cargo install oha --locked), perf (apt-get install linux-perf) and "
                 "the others as load.py says", args.hangar)
    with open("/proc/sys/kernel/kptr_restrict") as f:
        if f.read().strip() != "0" or os.geteuid() != 0:
            sys.exit("kernel_profile.py: run as root with /proc/sys/kernel/kptr_restrict at 0 "
                     "(sysctl kernel.kptr_restrict=0), or kernel functions show as addresses")

    work = tempfile.mkdtemp(prefix="hangar-kprof-")
    procs = []
    per_request = {}
    try:
        host, endpoints = load.start_h1_targets("kernel_profile.py", args.hangar, work, procs)
        for name in targets:
            port, pids, headers = endpoints[name]
            cmd, url = load.oha_h1(host, port, headers)
            subprocess.run(cmd + ["-n", "20000", url], check=True, capture_output=True)
            data = os.path.join(work, f"{name}.data")
            rec = subprocess.Popen(
                ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQUENCY),
                 "-C", load.PROXY_CORE, "-o", data, "--", "sleep", str(args.seconds)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            run = subprocess.run(cmd + ["-z", f"{args.seconds}s", "--output-format", "json", url],
                                 check=True, capture_output=True, text=True)
            rec.wait()
            if rec.returncode != 0:
                sys.exit(f"kernel_profile.py: perf record failed ({rec.returncode}) for {name}")
            answered = json.loads(run.stdout).get("statusCodeDistribution", {}).get("200", 0)
            if answered == 0:
                sys.exit(f"kernel_profile.py: {name} answered no request with 200")
            scale = 1e6 / FREQUENCY / answered
            per_request[name] = {s: n * scale for s, n in profile(data, pids).items()}
            kernel, user = split(per_request[name])
            print(f"{name}: {answered:,} requests in {args.seconds} s; sampled µs per request: "
                  f"{kernel:.2f} kernel + {user:.2f} user", flush=True)
    finally:
        load.stop(procs)
        shutil.rmtree(work, ignore_errors=True)

    base = per_request[args.against]
    shown = [t for t in targets if t != args.against]
    kernel = {s for p in per_request.values() for s in p if s.startswith("[k]")}
    diff = {s: max((abs(per_request[t].get(s, 0) - base.get(s, 0)) for t in shown), default=0)
            for s in kernel}
    print(f"\nKernel functions, µs per request (largest differences from {args.against} first)")
    print(f"| function | {args.against} | " + " | ".join(f"{t} (diff)" for t in shown) + " |")
    print("| --- " * (len(shown) + 2) + "|")
    def cell(value, against):
        return f"{value:.2f} ({value - against:+.2f})"

    for s in sorted(kernel, key=lambda s: -diff[s])[:args.top]:
        cells = " | ".join(cell(per_request[t].get(s, 0), base.get(s, 0)) for t in shown)
        print(f"| {s[4:]} | {base.get(s, 0):.2f} | {cells} |")
    totals = {t: split(p) for t, p in per_request.items()}
    for label, i in (("all kernel", 0), ("all user space", 1)):
        b = totals[args.against][i]
        cells = " | ".join(cell(totals[t][i], b) for t in shown)
        print(f"| **{label}** | {b:.2f} | {cells} |")
    for t in targets if args.user_top else ():
        user = sorted(((v, s) for s, v in per_request[t].items() if not s.startswith("[k]")),
                      reverse=True)[:args.user_top]
        print(f"\n{t}: the largest user-space functions, µs per request")
        print("| function | µs |\n| --- | --- |")
        for v, s in user:
            print(f"| {s[4:]} | {v:.3f} |")


if __name__ == "__main__":
    main()
