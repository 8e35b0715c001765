#!/usr/bin/env python3
"""Memory per idle HTTP/2 (h2c) client connection in the proxy.

`hangar dev` starts a demo backend; then, twice, N client connections each open with the h2c
preface, make one request with a bearer token, read the whole response and stay open, idle.
The figure is the growth of `hangar dev`'s RSS per connection over each batch (the first batch
is closed before the second opens, so the second shows what is reused). nginx and haproxy,
configured as in load.py (h2c listeners, one worker or thread), get the same two batches in the
same run, measured on the nginx worker and the haproxy process. load.py measures the same for
HTTP/1.1 keep-alive connections.

    python3 benches/h2_idle.py [--hangar PATH] [--connections 1000] [--indexed]

Needs a release build (`cargo build --release`), nginx, haproxy and openssl (Debian's
packages); the process may need `ulimit -n` above 2 x N + 100.
"""

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time

import load


def literal(name, value, indexed=False):
    """An HPACK literal field with a literal name (short strings only), without indexing or,
    with `indexed`, with incremental indexing (the field enters the dynamic table)."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return bytes([0x40 if indexed else 0, len(n)]) + n + bytes([len(v)]) + v


def frame(kind, flags, stream, payload):
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
            + payload)


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_idle(port, hello):
    """A connection that made one request and read its response to the end of stream 1."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(hello)
    got = b""
    # DATA with END_STREAM, or HEADERS with END_STREAM | END_HEADERS, on stream 1.
    while b"\x00\x01\x00\x00\x00\x01" not in got and b"\x01\x05\x00\x00\x00\x01" not in got:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("the proxy closed a connection before answering")
        got += chunk
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hangar", default=load.HANGAR)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--indexed", action="store_true",
                    help="the request's literal fields (authority, token, user-agent) enter the "
                         "dynamic table, as most clients' do; by default they do not")
    args = ap.parse_args()
    n = args.connections
    work = tempfile.mkdtemp(prefix="hangar-h2-idle-")
    api, proxy = load.free_port(), load.free_port()
    procs = []
    dev = subprocess.Popen(
        [args.hangar, "dev", "--api", f"127.0.0.1:{api}", "--proxy", f"127.0.0.1:{proxy}",
         "--dns", "off", "--metrics", "off", "--data-dir", os.path.join(work, "dev"),
         "--idle-timeout", "3600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(dev)
    try:
        load.wait_port(api)
        resp, view = load.connect_ready("h2_idle.py", api, name="idle")
        host = f"{resp['backend_id']}.hangar.localhost"
        backend_port = int(view["address"].rsplit(":", 1)[1])
        ports, pids = load.start_references(work, backend_port, load.make_cert(work), procs)
        targets = {"hangar": (proxy, dev.pid),
                   "nginx": (ports["nginx"]["h2"], pids["nginx"][0]),
                   "haproxy": (ports["haproxy"]["h2"], pids["haproxy"][0])}
        # :method GET and :scheme http from the static table, then literals.
        ix = args.indexed
        block = (bytes([0x82, 0x86]) + literal(":path", "/count")
                 + literal(":authority", host, ix)
                 + literal("authorization", "Bearer " + resp["token"], ix)
                 + literal("user-agent", "h2_idle/1.0", ix))
        hello = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
                 + frame(1, 5, 1, block))
        print(f"{args.hangar}: RSS growth per idle h2c connection, first {n} / next {n}"
              + (" (fields indexed):" if ix else ":"))
        for name, (port, pid) in targets.items():
            per_conn = []
            for batch in range(2):
                time.sleep(0.5)
                before = rss_kb(pid)
                socks = [open_idle(port, hello) for _ in range(n)]
                time.sleep(1.0)
                per_conn.append((rss_kb(pid) - before) / n)
                for s in socks:
                    s.close()
                time.sleep(1.0)
            print(f"  {name}: {per_conn[0]:.1f} KB / {per_conn[1]:.1f} KB")
    finally:
        # SIGTERM: nginx's master stops its worker then (a SIGKILLed master leaves it running).
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
