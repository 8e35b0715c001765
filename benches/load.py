#!/usr/bin/env python3
"""Load benchmark: the demo backend directly, and through Hangar's proxy, nginx and haproxy.

Each target is pinned the same way: the proxy and the backend share core 0, the load generator
runs on core 1. Targets are interleaved round by round, after an unmeasured warm-up pass of
each HTTP target (`--warmup` seconds). Scenarios (`--scenarios`):

- h1, HTTP/1.1: req/s and p50/p99 latency at saturation (oha with -c connections, no rate
  limit); p50/p99 at a fixed 5,000 req/s and what each proxy adds over the direct backend;
  time per request on one connection, one request at a time (closed loop, no queueing); memory
  per idle keep-alive client connection (RSS growth with 1,000 idle connections, and again
  with 1,000 more once the first ones have closed). `--quick` keeps only the saturation run.
  A fourth h1 target, the floor, is haproxy relaying bytes (`mode tcp`: no HTTP work, one
  backend connection per client connection): the same four socket calls per request as any
  proxy on epoll, so its requests per CPU-second bound what an HTTP proxy can reach here.
- h2, HTTP/2 with prior knowledge (h2c): oha with 8 connections x 8 streams at saturation;
  every proxy speaks HTTP/1.1 to the backend.
- tls: TLS handshakes, one request per new connection (oha --disable-keepalive) over HTTPS
  with a fresh self-signed ECDSA P-256 certificate; oha resumes the sessions the servers offer
  (all three do by default), so most handshakes are TLS 1.3 resumptions.
- ws: WebSocket messages, echoed by the demo backend's `/ws`, from `examples/ws_load.rs`
  (50 connections, 4 messages in flight on each).

Every scenario reports its unit (requests, handshakes, messages) per CPU-second of the proxy
process (utime+stime over the run), side by side; for HTTP/1.1 also the CPU per request split
into user and system time, which shows how much of it is the kernel's (the same for every
target) and how much a proxy's own work. Hangar runs as `hangar dev` (scheduler,
drone and proxy: the whole process is charged) with tokens checked (Authorization: Bearer)
and Host routing; nginx 1.22 and haproxy 2.6 are configured the same way (Host routing by
regex, upstream keep-alive, no access log, one worker or thread, and the forwarding fields
Hangar adds: host, x-forwarded-host/-for/-proto and the backend id); neither checks a token.

Needs: a release build (`cargo build --release`, and `cargo build --release --example ws_load`
for the ws scenario), oha (`cargo install oha --locked`) and the Debian packages nginx,
haproxy, openssl and util-linux (taskset). Everything stays on 127.0.0.1 on free ports.

    python3 benches/load.py [--duration 10] [--runs 3] [--warmup 3] [--fixed-runs N] [--connections 50]
                            [--scenarios h1,h2,tls,ws] [--quick] [--hangar PATH]
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
WS_LOAD = os.path.join(ROOT, "target", "release", "examples", "ws_load")
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


def cpu_split(pids):
    """User and system CPU-seconds the processes `pids` have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / tick, system / tick


def kernel_events(pids):
    """Minor page faults and (voluntary, involuntary) context switches of every thread of
    `pids` so far: kernel work that a proxy's own habits cause (allocator pages given back and
    faulted in again, a thread that sleeps or is preempted) beside its socket calls."""
    faults = voluntary = involuntary = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            faults += int(f.read().rsplit(")", 1)[1].split()[7])
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            voluntary += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches:"):
                            involuntary += int(line.split()[1])
            except FileNotFoundError:
                pass  # a thread that ended meanwhile
    return faults, voluntary, involuntary


def core_steal(core):
    """(steal, total) jiffies of CPU `core` so far, from /proc/stat: time the hypervisor gave
    this virtual core to someone else. A round with much of it measured a shared machine."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                ticks = [int(x) for x in line.split()[1:]]
                return ticks[7], sum(ticks)
    return 0, 0


def cpu_seconds(pids):
    return sum(cpu_split(pids))


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


def oha(url, headers, duration, connections, rate=None, extra=()):
    cmd = ["taskset", "-c", LOAD_CORE, "oha", "--no-tui", "--output-format", "json",
           "-z", f"{duration}s", "-c", str(connections), *extra]
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


def nginx_conf(work, backend_port, ports, cert, key):
    return f"""
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
    # Keep-alive to the backend for requests, `Connection: upgrade` for WebSockets.
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    # Session resumption as each server does by default (see TLS_NOTE).
    ssl_protocols TLSv1.2 TLSv1.3;
    server {{
        listen 127.0.0.1:{ports['h1']};
        listen 127.0.0.1:{ports['h2']} http2;
        listen 127.0.0.1:{ports['tls']} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        server_name ~^(?<bid>[a-z0-9]+)\\.hangar\\.localhost$;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Upgrade $http_upgrade;
            proxy_read_timeout 1h;
            # The fields Hangar adds, so the backend parses the same request from all.
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Hangar-Backend-Id $bid;
        }}
    }}
}}
"""


def haproxy_conf(work, backend_port, ports, pem):
    return f"""
global
    nbthread 1
    maxconn 8000
    pidfile {work}/haproxy.pid
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    timeout http-keep-alive 60s

frontend fe
    bind 127.0.0.1:{ports['h1']}
    bind 127.0.0.1:{ports['h2']} proto h2
    bind 127.0.0.1:{ports['tls']} ssl crt {pem} alpn http/1.1
    # Host routing like nginx's regex server_name, and the fields Hangar adds.
    acl hangar_host req.hdr(host),field(1,:) -m reg -i '^[a-z0-9]+\\.hangar\\.localhost$'
    http-request deny deny_status 404 unless hangar_host
    http-request set-header X-Forwarded-Host %[req.hdr(host),field(1,:)]
    http-request set-header X-Forwarded-Proto %[ssl_fc,iif(https,http)]
    http-request set-header X-Hangar-Backend-Id %[req.hdr(host),field(1,.)]
    option forwardfor
    default_backend be

backend be
    http-reuse always
    server backend 127.0.0.1:{backend_port}

# The floor: haproxy relaying bytes (mode tcp, one backend connection per client connection,
# no HTTP work at all). It makes the same four socket calls per request as an HTTP proxy, so its
# requests per CPU-second bound what any proxy on epoll can reach in this set-up.
listen floor
    mode tcp
    bind 127.0.0.1:{ports['floor']}
    server backend 127.0.0.1:{backend_port}
"""


def make_cert(work):
    """A fresh self-signed ECDSA P-256 certificate for *.hangar.localhost in `work`: the paths
    of the certificate, its key, and both in one file (haproxy's form)."""
    cert, key, pem = (os.path.join(work, n) for n in ("cert.pem", "key.pem", "both.pem"))
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj",
         "/CN=hangar.localhost", "-addext",
         "subjectAltName=DNS:*.hangar.localhost,DNS:hangar.localhost"],
        check=True, capture_output=True)
    with open(pem, "w") as f:
        f.write(open(cert).read() + open(key).read())
    return cert, key, pem


def stop(procs):
    """Stops `procs` as their own shutdown does (SIGTERM: nginx's master then stops its
    worker, which SIGKILL would leave running), killing any that take over 10 s."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def require(script, tools, hint, binary):
    """Exits with what to do when one of `tools` or the release build `binary` is missing."""
    for tool in tools:
        if shutil.which(tool) is None:
            sys.exit(f"{script}: {tool} not found: {hint}")
    if not os.path.exists(binary):
        sys.exit(f"{script}: no binary at {binary}: run cargo build --release first")


def dev_command(binary, work, api, proxy, *extra):
    """`hangar dev` as every proxy benchmark runs it: API and proxy on the given ports, no DNS
    or metrics listener, its data in `work`, backends never idled out; `extra` arguments
    added."""
    return [binary, "dev", "--api", f"127.0.0.1:{api}", "--proxy", f"127.0.0.1:{proxy}",
            *extra, "--dns", "off", "--metrics", "off", "--data-dir", os.path.join(work, "dev"),
            "--idle-timeout", "3600"]


def connect_ready(script, api, name="bench", timeout=20, poll=0.05, request_timeout=None):
    """Connects key `name` through `hangar dev`'s API at port `api` and waits (up to `timeout`
    seconds) until its backend is ready: the connect answer and the ready backend's view.
    `request_timeout` bounds each HTTP call (a process under valgrind answers slowly)."""
    kw = {} if request_timeout is None else {"timeout": request_timeout}
    resp = json.load(urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{api}/v1/connect", json.dumps({"key": {"name": name}}).encode()), **kw))
    deadline = time.time() + timeout
    while (view := json.load(urllib.request.urlopen(resp["status_url"], **kw)))["status"] != "ready":
        if time.time() > deadline:
            sys.exit(f"{script}: the backend never became ready: {view}")
        time.sleep(poll)
    return resp, view


def start_h1_targets(script, binary, work, procs):
    """`hangar dev` (pinned to the proxy core) with one ready backend, and nginx and haproxy
    in front of that backend, as the per-request scripts (`syscalls.py`,
    `kernel_profile.py`) start them. Returns the backend's host name and, for each HTTP/1.1
    target (hangar, nginx, haproxy, floor), its port, the proxy's pids and the extra request
    headers it needs (Hangar's bearer token)."""
    certs = make_cert(work)
    api, proxy = free_port(), free_port()
    dev = subprocess.Popen(["taskset", "-c", PROXY_CORE, *dev_command(binary, work, api, proxy)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(dev)
    wait_port(api)
    resp, view = connect_ready(script, api)
    backend_port = int(view["address"].rsplit(":", 1)[1])
    host = f"{resp['backend_id']}.hangar.localhost"
    ports, pids = start_references(work, backend_port, certs, procs, pin=("taskset", "-c", PROXY_CORE))
    return host, {
        "hangar": (proxy, [dev.pid], [f"Authorization: Bearer {resp['token']}"]),
        "nginx": (ports["nginx"]["h1"], pids["nginx"], []),
        "haproxy": (ports["haproxy"]["h1"], pids["haproxy"], []),
        "floor": (ports["haproxy"]["floor"], pids["haproxy"], []),
    }


def oha_h1(host, port, headers):
    """oha on the load core against `port` as the per-request scripts run it: 50 connections,
    Host routing, `headers` added; the URL is the second element."""
    cmd = ["taskset", "-c", LOAD_CORE, "oha", "--no-tui", "-c", "50",
           "-H", f"Host: {host}", "--connect-to", f"{host}:{port}:127.0.0.1:{port}"]
    for h in headers:
        cmd += ["-H", h]
    return cmd, f"http://{host}:{port}/count"


def start_references(work, backend_port, certs, procs, pin=()):
    """Starts nginx and haproxy (configured by `nginx_conf` and `haproxy_conf`) in front of the
    backend at `backend_port`, each behind the command prefix `pin` (taskset, say), adding them
    to `procs`. Returns their ports ({"nginx": {scenario: port}, "haproxy": ...}) and the pids
    that do the work (the nginx worker, the haproxy process), once every port listens."""
    cert, key, pem = certs
    ports = {"nginx": {s: free_port() for s in ("h1", "h2", "tls")},
             "haproxy": {s: free_port() for s in ("h1", "h2", "tls", "floor")}}
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(nginx_conf(work, backend_port, ports["nginx"], cert, key))
    ngx = subprocess.Popen([*pin, "nginx", "-c", conf, "-p", work],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(ngx)
    hconf = os.path.join(work, "haproxy.cfg")
    with open(hconf, "w") as f:
        f.write(haproxy_conf(work, backend_port, ports["haproxy"], pem))
    hap = subprocess.Popen([*pin, "haproxy", "-db", "-f", hconf],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs.append(hap)
    for p in (*ports["nginx"].values(), *ports["haproxy"].values()):
        try:
            wait_port(p)
        except RuntimeError:
            if hap.poll() is not None:
                sys.exit(f"haproxy did not start: {hap.stderr.read()}")
            raise
    deadline = time.time() + 5
    while not (workers := children(ngx.pid)) and time.time() < deadline:
        time.sleep(0.05)
    if len(workers) != 1:
        sys.exit(f"expected one nginx worker, found {workers}")
    return ports, {"nginx": workers, "haproxy": [hap.pid]}


# oha's rustls client keeps the sessions servers offer and resumes them (TLS 1.3 PSK with an
# X25519 exchange, no certificate signature); all three servers offer resumption by default
# (Hangar's rustls listener a stateful session cache, nginx and haproxy tickets), and they are
# left that way.
TLS_NOTE = "TLS 1.3 with resumption as each server does by default, ECDSA P-256, one request per connection"

NEEDS = {
    # tool: what to install
    "oha": "cargo install oha --locked",
    "nginx": "apt-get install nginx",
    "haproxy": "apt-get install haproxy",
    "taskset": "apt-get install util-linux",
    "openssl": "apt-get install openssl",
    "pgrep": "apt-get install procps",
}


def ws_load(binary, port, host, headers, duration, connections, inflight):
    cmd = ["taskset", "-c", LOAD_CORE, binary, "--addr", f"127.0.0.1:{port}", "--host", host,
           "--duration", str(duration), "--connections", str(connections),
           "--inflight", str(inflight)]
    for h in headers:
        cmd += ["--header", h]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ws_load failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3,
                    help="seconds of unmeasured load on each HTTP target before the rounds")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--fixed-runs", type=int, default=0,
                    help="rounds of the fixed-rate test in all (default: --runs); the rounds "
                         "beyond --runs measure only the fixed rate, to settle its p99")
    ap.add_argument("--scenarios", default="h1,h2,tls,ws",
                    help="comma-separated: h1 (HTTP/1.1), h2 (h2c), tls (handshakes), ws")
    ap.add_argument("--quick", action="store_true",
                    help="HTTP/1.1 at saturation only: no fixed rate, one connection or idle "
                         "memory")
    ap.add_argument("--h2-connections", type=int, default=8)
    ap.add_argument("--h2-streams", type=int, default=8, help="streams per h2 connection")
    ap.add_argument("--ws-connections", type=int, default=50)
    ap.add_argument("--ws-inflight", type=int, default=4,
                    help="messages outstanding per WebSocket connection")
    ap.add_argument("--hangar", default=HANGAR, help="the hangar binary (default: release build)")
    ap.add_argument("--ws-load", default=WS_LOAD,
                    help="the ws_load binary (default: cargo build --release --example ws_load)")
    args = ap.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    for s in scenarios:
        if s not in ("h1", "h2", "tls", "ws"):
            sys.exit(f"unknown scenario {s!r}: use h1, h2, tls, ws")
    for tool, how in NEEDS.items():
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: {how}")
    if not os.path.exists(args.hangar):
        sys.exit("build first: cargo build --release")
    if "ws" in scenarios and not os.path.exists(args.ws_load):
        sys.exit("build the WebSocket client first: cargo build --release --example ws_load")

    work = tempfile.mkdtemp(prefix="hangar-load-")
    procs = []
    try:
        cert, key, pem = make_cert(work)

        api, proxy, https = free_port(), free_port(), free_port()
        dev = subprocess.Popen(
            ["taskset", "-c", PROXY_CORE,
             *dev_command(args.hangar, work, api, proxy, "--https", f"127.0.0.1:{https}",
                          "--tls-cert", cert, "--tls-key", key)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(dev)
        wait_port(api)
        resp, view = connect_ready("load.py", api)
        bid, token = resp["backend_id"], resp["token"]
        backend_port = int(view["address"].rsplit(":", 1)[1])
        host = f"{bid}.hangar.localhost"
        auth = f"Authorization: Bearer {token}"

        ports, pids = start_references(work, backend_port, (cert, key, pem), procs,
                                       pin=("taskset", "-c", PROXY_CORE))
        ports["hangar"] = {"h1": proxy, "h2": proxy, "tls": https}
        ports["floor"] = {"h1": ports["haproxy"]["floor"]}
        pids.update({"hangar": [dev.pid], "direct": None, "floor": pids["haproxy"]})
        hdrs = {"hangar": [f"Host: {host}", auth], "nginx": [f"Host: {host}"],
                "haproxy": [f"Host: {host}"], "direct": [], "floor": [f"Host: {host}"]}
        proxies = ("hangar", "nginx", "haproxy")

        def url(name, scenario):
            if name == "direct":
                return f"http://127.0.0.1:{backend_port}/count"
            scheme = "https" if scenario == "tls" else "http"
            return f"{scheme}://{host}:{ports[name][scenario]}/count"

        def connect_to(name, scenario):
            # The URL names the backend's host (HTTP/2 and TLS clients send it as the authority
            # and SNI); oha connects to 127.0.0.1 all the same.
            if name == "direct":
                return []
            p = ports[name][scenario]
            return ["--connect-to", f"{host}:{p}:127.0.0.1:{p}"]

        def oha_args(name, scenario):
            """The headers, connection count and extra oha arguments of `scenario` on `name`."""
            extra = connect_to(name, scenario)
            conns = args.connections
            if scenario == "h2":
                extra += ["--http2", "-p", str(args.h2_streams)]
                conns = args.h2_connections
            elif scenario == "tls":
                extra += ["--insecure", "--disable-keepalive"]
            headers = hdrs[name] if scenario == "h1" else hdrs[name][1:]
            return headers, conns, extra

        split = {}

        def measured(name, fn):
            """Runs `fn` and returns its result with the CPU-seconds the server used; the
            user and system parts are left in `split`."""
            c0 = cpu_split(pids[name]) if pids[name] else None
            k0 = kernel_events(pids[name]) if pids[name] else None
            s0 = core_steal(PROXY_CORE)
            r = fn()
            s1 = core_steal(PROXY_CORE)
            split["steal"] = (s1[0] - s0[0]) / max(1, s1[1] - s0[1])
            if not pids[name]:
                return r, None
            c1 = cpu_split(pids[name])
            k1 = kernel_events(pids[name])
            split["user"], split["system"] = c1[0] - c0[0], c1[1] - c0[1]
            split["events"] = [b - a for a, b in zip(k0, k1)]
            return r, split["user"] + split["system"]

        targets = {"h1": ("direct", *proxies, "floor"), "h2": proxies, "tls": proxies,
                   "ws": ("direct", *proxies)}
        res = {s: {t: {"sat": [], "fixed": [], "per_cpu": [], "seq": [], "user_us": [],
                       "sys_us": [], "events": []} for t in targets[s]}
               for s in scenarios}
        seq_bad = 0
        bad = 0
        # One unmeasured pass of each HTTP target first: a process's first seconds under load
        # (pools filling, allocator arenas growing, `hangar dev`'s control plane settling just
        # after its backend started) are not what the rounds compare.
        for scenario in (s for s in scenarios if s in ("h1", "h2") and args.warmup > 0):
            for name in targets[scenario]:
                headers, conns, extra = oha_args(name, scenario)
                oha(url(name, scenario), headers, args.warmup, conns, extra=extra)
        for run in range(args.runs):
            for scenario in scenarios:
                for name in targets[scenario]:
                    r = res[scenario][name]
                    if scenario == "ws":
                        ws_host = "localhost" if name == "direct" else host
                        ws_port = backend_port if name == "direct" else ports[name]["h1"]
                        ws, used = measured(name, lambda: ws_load(
                            args.ws_load, ws_port, ws_host, hdrs[name][1:], args.duration,
                            args.ws_connections, args.ws_inflight))
                        r["sat"].append({"rps": ws["per_sec"], "p50": 0, "p99": 0,
                                         "non200": ws["failed"], "ok": ws["messages"]})
                        if used:
                            r["per_cpu"].append(ws["messages"] / used)
                        bad += ws["failed"]
                        print(f"run {run + 1} ws {name}: {ws['per_sec']:.0f} messages/s"
                              + (f", {ws['messages'] / used:,.0f} per CPU-second" if used else ""),
                              file=sys.stderr)
                        continue
                    headers, conns, extra = oha_args(name, scenario)
                    sat, used = measured(name, lambda: oha(
                        url(name, scenario), headers, args.duration, conns, extra=extra))
                    if used:
                        r["per_cpu"].append(sat["ok"] / used)
                        r["user_us"].append(split["user"] / sat["ok"] * 1e6)
                        r["sys_us"].append(split["system"] / sat["ok"] * 1e6)
                        r["events"].append([e / sat["ok"] for e in split["events"]])
                    r["sat"].append(sat)
                    bad += sat["non200"]
                    line = (f"run {run + 1} {scenario} {name}: {sat['rps']:.0f} req/s p50 "
                            f"{sat['p50']:.3f} ms p99 {sat['p99']:.3f} ms"
                            + (f", {sat['ok'] / used:,.0f} per CPU-second" if used else ""))
                    if scenario == "h1" and not args.quick:
                        fixed = oha(url(name, scenario), headers, args.duration, conns,
                                    rate=args.rate)
                        r["fixed"].append(fixed)
                        seq = oha(url(name, scenario), headers, args.duration, 1)
                        r["seq"].append(1e6 / seq["rps"])
                        seq_bad += seq["non200"]
                        bad += fixed["non200"]
                        line += (f" | @{args.rate}/s p50 {fixed['p50']:.3f} p99 "
                                 f"{fixed['p99']:.3f} | one connection "
                                 f"{1e6 / seq['rps']:.1f} us/req")
                    print(line + f" | non-200 {sat['non200']} | steal on the proxy's core "
                          f"{split.get('steal', 0):.1%}", file=sys.stderr)
        if "h1" in scenarios and not args.quick:
            for run in range(args.runs, args.fixed_runs):
                for name in targets["h1"]:
                    fixed = oha(url(name, "h1"), hdrs[name], args.duration, args.connections,
                                rate=args.rate)
                    res["h1"][name]["fixed"].append(fixed)
                    bad += fixed["non200"]
                    print(f"fixed-rate round {run + 1} {name}: @{args.rate}/s p50 "
                          f"{fixed['p50']:.3f} p99 {fixed['p99']:.3f} | non-200 "
                          f"{fixed['non200']}", file=sys.stderr)

        med = statistics.median
        load = os.getloadavg()
        print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        units = {"h1": "requests", "h2": "requests", "tls": "handshakes", "ws": "messages"}
        names = {"h1": "HTTP/1.1", "h2": f"HTTP/2 h2c ({args.h2_connections} connections x "
                 f"{args.h2_streams} streams)", "tls": f"TLS ({TLS_NOTE})",
                 "ws": f"WebSocket ({args.ws_connections} connections x {args.ws_inflight} "
                       "messages in flight, 32-byte echoes)"}
        print("\n| Scenario | unit per proxy CPU-second | Hangar | nginx | haproxy | "
              "Hangar / better of the others |")
        print("| --- | --- | --- | --- | --- | --- |")
        for s in scenarios:
            m = {n: med(res[s][n]["per_cpu"]) for n in proxies}
            best = max(m["nginx"], m["haproxy"])
            print(f"| {names[s]} | {units[s]} | {m['hangar']:,.0f} | {m['nginx']:,.0f} | "
                  f"{m['haproxy']:,.0f} | {m['hangar'] / best:.2f}x |")
        # Each round's ratio against the better of the others in that round: the machine's
        # speed drifts between rounds, and a ratio within one round cancels most of the drift.
        for s in scenarios:
            per = [r / max(n, h) for r, n, h in zip(*(res[s][t]["per_cpu"] for t in proxies))]
            print(f"{s}: Hangar / better of the others, round by round: "
                  + ", ".join(f"{x:.2f}x" for x in per) + f" (median {med(per):.2f}x)")
        if "h1" in scenarios:
            floor = med(res["h1"]["floor"]["per_cpu"])
            best = max(med(res["h1"][n]["per_cpu"]) for n in ("nginx", "haproxy"))
            print(f"\nHTTP/1.1 floor (haproxy relaying bytes, mode tcp): {floor:,.0f} requests per "
                  f"CPU-second, {floor / best:.2f}x the better of nginx and haproxy; Hangar at "
                  f"{med(res['h1']['hangar']['per_cpu']) / floor:.0%} of the floor")
            # Where the time goes: the kernel's part (socket calls, TCP over loopback, waking
            # the peers) is about the same for every target, so the user-space part is all a
            # proxy can win back; 1.25x the better of nginx and haproxy needs the total below
            # what this line shows.
            print("HTTP/1.1 CPU per request (µs, medians), user + system: " + "; ".join(
                f"{n} {med(res['h1'][n]['user_us']):.1f} + {med(res['h1'][n]['sys_us']):.1f}"
                for n in (*proxies, "floor")))
            print("HTTP/1.1 per request (medians): minor page faults, voluntary and involuntary "
                  "context switches: " + "; ".join(
                      f"{n} " + " / ".join(
                          f"{med(e[i] for e in res['h1'][n]['events']):.3f}" for i in range(3))
                      for n in (*proxies, "floor")))
            need = 1e6 / (1.25 * best)
            print(f"1.25x the better of nginx and haproxy would need {need:.1f} µs per request "
                  f"in all; the floor uses {1e6 / floor:.1f}")
        print("\n| Scenario | throughput (per second, medians) | " + " | ".join(
            ("direct", *proxies)) + " |")
        print("| --- | --- | --- | --- | --- | --- |")
        for s in scenarios:
            cells = [f"{med(x['rps'] for x in res[s][n]['sat']):,.0f}" if n in res[s] else "-"
                     for n in ("direct", *proxies)]
            print(f"| {names[s]} | {units[s]} | " + " | ".join(cells) + " |")
        print()
        for s in scenarios:
            for n in (*proxies, "floor") if s == "h1" else proxies:
                print(f"{s} {n} per run: {units[s]} per CPU-second "
                      + ", ".join(f"{x:,.0f}" for x in res[s][n]["per_cpu"])
                      + " | per second " + ", ".join(f"{x['rps']:,.0f}" for x in res[s][n]["sat"]))

        if "h1" in scenarios and not args.quick:
            mem = {
                "hangar": [idle_memory(proxy, host, [auth], pids["hangar"]) for _ in range(2)],
                "nginx": [idle_memory(ports["nginx"]["h1"], host, [], pids["nginx"])
                          for _ in range(2)],
                "haproxy": [idle_memory(ports["haproxy"]["h1"], host, [], pids["haproxy"])
                            for _ in range(2)],
            }
            h1 = res["h1"]
            d50 = med(r["p50"] for r in h1["direct"]["fixed"])
            d99 = med(r["p99"] for r in h1["direct"]["fixed"])
            dseq = med(h1["direct"]["seq"])
            print(f"\nHTTP/1.1:\n\n| Target | req/s at saturation | p50 / p99 at saturation (ms) | p50 / p99 at {args.rate} req/s (ms) | added p50 / p99 (ms) | one connection: µs per request (added) | req/s per proxy CPU-second | memory per idle connection (first / next 1,000) |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for name in targets["h1"]:
                r = h1[name]
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
            for name in targets["h1"]:
                r = h1[name]
                print(f"{name} per run: p99 at {args.rate} req/s "
                      + ", ".join(f"{x['p99']:.3f}" for x in r["fixed"])
                      + " | µs per request on one connection "
                      + ", ".join(f"{x:.1f}" for x in r["seq"]))
            # Each round's added p99 against the direct backend's in the same round, and how
            # often Hangar had the lowest p99 of the proxies in a round.
            rounds = len(h1["direct"]["fixed"])
            added = {n: [h1[n]["fixed"][i]["p99"] - h1["direct"]["fixed"][i]["p99"]
                         for i in range(rounds)] for n in proxies}
            lowest = sum(1 for i in range(rounds)
                         if h1["hangar"]["fixed"][i]["p99"]
                         <= min(h1[n]["fixed"][i]["p99"] for n in proxies))
            print(f"added p99 at {args.rate} req/s over {rounds} rounds, median of per-round "
                  "differences: " + ", ".join(f"{n} {med(added[n]):.3f} ms" for n in proxies)
                  + f"; hangar's p99 was the lowest in {lowest} of {rounds} rounds")
        print(f"\nnon-200 responses (or failed WebSockets) in all runs: {bad + seq_bad}")
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
