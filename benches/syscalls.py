#!/usr/bin/env python3
"""System calls per proxied HTTP/1.1 request: Hangar, nginx, haproxy and the floor.

Kernel time is most of every proxy's CPU per request in `load.py`'s set-up, so the first
question about it is whether a proxy makes more system calls than another. `hangar dev` and
the references are started exactly as `load.py` starts them (the proxy and the backend on
core 0, oha on core 1, 50 connections, Host routing, Hangar checking a bearer token on every
request); for each target, after an unmeasured pass, `perf stat` counts the system calls of
the proxy's own process (never the backend's) over `--requests` requests, read from the
kernel's syscall tracepoints, which cost far less than tracing each call. Counts are per
request; `other` is every call not listed.

    python3 benches/syscalls.py [--requests 100000] [--hangar PATH]

Needs: a release build, oha (`cargo install oha --locked`), perf (Debian's `linux-perf`),
nginx, haproxy, openssl and util-linux (taskset); run as root (tracepoints).
"""

import argparse
import shutil
import subprocess
import tempfile
import time

import load

CALLS = ("recvfrom", "read", "recvmsg", "sendto", "write", "writev", "sendmsg", "epoll_wait",
         "epoll_pwait", "epoll_ctl", "setsockopt", "getsockopt", "ioctl", "gettimeofday",
         "clock_gettime", "futex")


def count(pids, run):
    """Runs `run` while perf counts the system calls of `pids`: {call: count, "all": n}."""
    events = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{c}" for c in CALLS]
    perf = subprocess.Popen(["perf", "stat", "-x,", "-e", ",".join(events),
                             "-p", ",".join(map(str, pids))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # perf attaches before the load starts
    run()
    perf.send_signal(2)
    _, err = perf.communicate()
    counts = {}
    for line in err.splitlines():
        parts = line.split(",")
        if len(parts) < 3 or not parts[0].strip().isdigit():
            continue
        name = parts[2].rsplit("sys_enter_", 1)[-1]
        counts["all" if name == "raw_syscalls:sys_enter" else name] = int(parts[0])
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--hangar", default=load.HANGAR)
    args = ap.parse_args()
    load.require("syscalls.py", ("oha", "perf", "nginx", "haproxy", "openssl", "taskset"),
                 "install oha (cargo install oha --locked), perf (apt-get install linux-perf) and "
                 "the others as load.py says", args.hangar)

    work = tempfile.mkdtemp(prefix="hangar-syscalls-")
    procs = []
    try:
        host, targets = load.start_h1_targets("syscalls.py", args.hangar, work, procs)
        print(f"system calls per request ({args.requests:,} requests over 50 connections)")
        print("| target | all | " + " | ".join(CALLS) + " | other |")
        print("| --- " * (len(CALLS) + 3) + "|")
        for name, (port, target_pids, headers) in targets.items():
            cmd, url = load.oha_h1(host, port, headers)
            subprocess.run(cmd + ["-n", "5000", url], check=True, capture_output=True)
            run = lambda: subprocess.run(  # noqa: E731
                cmd + ["-n", str(args.requests), url], check=True, capture_output=True)
            c = count(target_pids, run)
            per = {k: v / args.requests for k, v in c.items()}
            other = per.get("all", 0) - sum(per.get(k, 0) for k in CALLS)
            cells = " | ".join(f"{per.get(k, 0):.3f}" for k in CALLS)
            print(f"| {name} | {per.get('all', 0):.3f} | {cells} | {other:.3f} |", flush=True)
    finally:
        load.stop(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
