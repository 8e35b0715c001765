#!/usr/bin/env python3
"""User-space instructions per proxied request, counted by callgrind.

Instruction counts do not depend on what else the machine is doing, so they show changes of a
few percent that the load figures (`load.py`) cannot. `hangar dev` runs under
`valgrind --tool=callgrind`; once its backend is ready and 2,000 warm-up requests went
through, the counters are zeroed (`callgrind_control -z`), oha sends `--requests` requests
(HTTP/1.1 over 50 connections with Host routing, or h2c over 8 connections x 8 streams; a
bearer token on every request, as in `load.py`), and the counts are dumped
(`callgrind_control -d`). The figure is every thread's instructions over that window divided
by the requests: the proxy's work and the runtime's, not the kernel's.

    python3 benches/callgrind.py [--scenario h1|h2] [--requests 20000] [--hangar PATH]
                                 [--top N] [--out FILE]

Needs: a release build, valgrind (Debian's package) and oha (`cargo install oha --locked`).
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


def self_costs(path):
    """Instructions per function (exclusive) from a callgrind output file."""
    names = {}
    cost = collections.Counter()
    fn = None
    after_call = False

    def name(s):
        m = re.match(r"\((\d+)\)(?: (.*))?", s)
        if not m:
            return s
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), m.group(1))

    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("fn="):
                fn = name(line[3:])
            elif line.startswith("cfn="):
                name(line[4:])
            elif line.startswith("calls="):
                # The next cost line is the call's inclusive cost, not this function's own.
                after_call = True
            elif line and (line[0].isdigit() or line[0] in "+-*"):
                if after_call:
                    after_call = False
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    cost[fn] += int(parts[1])
    return cost


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", choices=("h1", "h2"), default="h1")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--hangar", default=load.HANGAR)
    ap.add_argument("--top", type=int, default=20, help="functions to list by own instructions")
    ap.add_argument("--out", help="keep callgrind's output here")
    args = ap.parse_args()
    load.require("callgrind.py", ("valgrind", "callgrind_control", "oha", "taskset"),
                 "install valgrind (apt-get install valgrind), oha (cargo install oha --locked) "
                 "and util-linux", args.hangar)

    work = tempfile.mkdtemp(prefix="hangar-callgrind-")
    out = os.path.join(work, "callgrind.out")
    api, proxy = load.free_port(), load.free_port()
    dev = subprocess.Popen(
        ["taskset", "-c", load.PROXY_CORE, "valgrind", "--tool=callgrind",
         f"--callgrind-out-file={out}", *load.dev_command(args.hangar, work, api, proxy)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        load.wait_port(api, timeout=120)
        resp, _ = load.connect_ready("callgrind.py", api, timeout=120, poll=0.1,
                                     request_timeout=60)
        host = f"{resp['backend_id']}.hangar.localhost"
        cmd = ["taskset", "-c", load.LOAD_CORE, "oha", "--no-tui",
               "--connect-to", f"{host}:{proxy}:127.0.0.1:{proxy}",
               "-H", f"Authorization: Bearer {resp['token']}"]
        if args.scenario == "h2":
            cmd += ["--http2", "-p", "8", "-c", "8"]
        else:
            cmd += ["-c", "50", "-H", f"Host: {host}"]
        url = f"http://{host}:{proxy}/count"
        subprocess.run(cmd + ["-n", "2000", url], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-z", str(dev.pid)], check=True, capture_output=True)
        run = subprocess.run(cmd + ["-n", str(args.requests), "--output-format", "json", url],
                             check=True, capture_output=True, text=True)
        subprocess.run(["callgrind_control", "-d", str(dev.pid)], check=True, capture_output=True)
        codes = json.loads(run.stdout).get("statusCodeDistribution", {})
        if codes.get("200", 0) != args.requests:
            sys.exit(f"callgrind.py: not every request was answered 200: {codes}")
    finally:
        dev.terminate()
        dev.wait()
    # The dump asked for is the first part; the one valgrind writes at exit is the whole run.
    dumps = sorted(p for p in os.listdir(work) if p.startswith("callgrind.out."))
    if not dumps:
        sys.exit("callgrind.py: callgrind wrote no dump")
    dump = os.path.join(work, dumps[0])
    cost = self_costs(dump)
    total = sum(cost.values())
    print(f"{args.scenario}: {total / args.requests:,.0f} instructions per request "
          f"({args.requests} requests, {args.hangar})")
    for fn, c in cost.most_common(args.top):
        print(f"{c / args.requests:8,.0f}  {fn[:120]}")
    if args.out:
        shutil.copy(dump, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
