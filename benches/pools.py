#!/usr/bin/env python3
"""Pool benchmark: connect -> first answer from a warm pool against a cold start, sequential
and 20 at once, with process and Docker drones.

    cargo build --release && scripts/demo-image.sh && python3 benches/pools.py [--runs 30] [--rounds 3]

Starts `hangar serve` (embedded store) and one drone per runtime as child processes on free
loopback ports in a temporary directory (`target/release/hangar`; Docker needs the
`hangar-demo:dev` image) and stops all of it at the end. One sample is `POST /v1/connect` for
a new key of the pool, then `GET /` through the proxy with the connect's token until the
backend answers 200 (the proxy waits for a starting backend). Reported per case: the connect
call alone (for a warm claim it answers with the backend ready) and connect -> first answer.

- warm: the pool keeps more warm backends than a round uses; before each round the
  benchmark waits until all of them are ready, so every sample claims one.
- cold: the same template with `warm: 0`: every sample starts a backend.
- sequential: `--runs` samples one after the other; concurrent: 20 at once, `--rounds` times.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ha  # noqa: E402  (the shared child-process and HTTP helpers)


def proxy_get(serve, backend, token):
    req = urllib.request.Request(f"http://{serve.proxy}/")
    req.add_header("x-hangar-backend", backend)
    req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()
        return r.status


def sample(serve, pool, key):
    t0 = time.perf_counter()
    status, body = ha.http("POST", f"http://{serve.api}/v1/connect",
                           {"key": {"name": key}, "pool": pool})
    t1 = time.perf_counter()
    if status not in (200, 201):
        raise RuntimeError(f"connect answered {status}: {body}")
    answered = proxy_get(serve, body["backend_id"], body["token"])
    t2 = time.perf_counter()
    if answered != 200:
        raise RuntimeError(f"first request answered {answered}")
    return (t1 - t0) * 1000, (t2 - t0) * 1000, body.get("warm", False)


def warm_ready(serve):
    """Ready backends with no key: the warm ones (the pool's status is written at most once a
    second, so it may lag)."""
    backends = ha.http("GET", f"http://{serve.api}/v1/backends?status=ready")[1]["backends"]
    return sum(1 for b in backends if not b.get("key"))


def wait_full(serve, pool, warm):
    ha.wait(lambda: warm_ready(serve) >= warm, f"pool {pool} with {warm} ready", limit=300)


def terminate_all(serve):
    """Stops every keyed backend (keeps the drones from filling up between cases)."""
    backends = ha.http("GET", f"http://{serve.api}/v1/backends?status=live")[1]["backends"]
    for b in backends:
        if b.get("key"):
            ha.http("POST", f"http://{serve.api}/v1/backends/{b['id']}/terminate", {"hard": True})
    ha.wait(lambda: not any(b.get("key") for b in
                            ha.http("GET", f"http://{serve.api}/v1/backends?status=live")[1]["backends"]),
            "keyed backends stopped", limit=120)


def case(serve, pool, warm, runs, rounds, tag):
    """Sequential and 20-at-once samples of `pool`; waits for the pool to be full first."""
    out = {}
    seq = []
    for i in range(runs):
        if warm:
            wait_full(serve, pool, warm)
        seq.append(sample(serve, pool, f"{tag}-s{i}"))
    out["sequential"] = seq
    conc = []
    for r in range(rounds):
        if warm:
            wait_full(serve, pool, warm)
        results, lock = [], threading.Lock()

        def one(k):
            s = sample(serve, pool, f"{tag}-c{r}-{k}")
            with lock:
                results.append(s)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conc.extend(results)
    out["20_at_once"] = conc
    terminate_all(serve)
    return out


def summary(samples):
    connect = sorted(s[0] for s in samples)
    first = sorted(s[1] for s in samples)
    pct = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]
    return {"n": len(samples), "warm_served": sum(1 for s in samples if s[2]),
            "connect_p50_ms": round(statistics.median(connect), 2),
            "connect_p99_ms": round(pct(connect, 0.99), 2),
            "first_answer_p50_ms": round(statistics.median(first), 2),
            "first_answer_p99_ms": round(pct(first, 0.99), 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtimes", default="process,docker")
    a = ap.parse_args()
    if not os.path.exists(ha.HANGAR):
        sys.exit("pools.py: build the release binary first: cargo build --release")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        serve = ha.Serve(tmp, "serve", "embedded", ("--idle-timeout", "3600"))
        for runtime in a.runtimes.split(","):
            extra = ["--allow-image", "hangar-*"] if runtime == "docker" else []
            log = open(os.path.join(tmp, f"drone-{runtime}.log"), "w")
            proc = subprocess.Popen(
                [ha.HANGAR, "drone", "--scheduler", f"http://{serve.api}", "--name",
                 f"bench-{runtime}", "--secret", ha.SECRET, "--runtime", runtime, "--pool",
                 runtime, "--data-dir", os.path.join(tmp, f"drone-{runtime}"), "--metrics", "off",
                 "--max-backends", "1000", "--cpu-millis", "100000000", "--memory-mb",
                 "100000000", *extra],
                stdout=log, stderr=log)
            ha.CHILDREN.append(proc)
            ha.wait(lambda: any(d["name"] == f"bench-{runtime}" and d["state"] == "ready"
                                for d in ha.http("GET", f"http://{serve.api}/v1/drones")[1]
                                .get("drones", [])), f"{runtime} drone ready")
            template = ({"image": "hangar-demo:dev"} if runtime == "docker" else {})
            warm = max(a.runs, 20) + 5
            for name, n in ((f"{runtime}-warm", warm), (f"{runtime}-cold", 0)):
                status, body = ha.http("POST", f"http://{serve.api}/v1/pools",
                                       {"name": name, "warm": n, "drone_pool": runtime,
                                        "template": template})
                if status != 201:
                    sys.exit(f"pools.py: creating pool {name} answered {status}: {body}")
            for kind, n in (("warm", warm), ("cold", 0)):
                r = case(serve, f"{runtime}-{kind}", n, a.runs, a.rounds, f"{runtime}-{kind}")
                for mode, samples in r.items():
                    row = {"runtime": runtime, "pool": kind, "mode": mode, **summary(samples)}
                    results.setdefault("rows", []).append(row)
                    print(f"pools: {json.dumps(row)}", flush=True)
            for name in (f"{runtime}-warm", f"{runtime}-cold"):
                ha.http("DELETE", f"http://{serve.api}/v1/pools/{name}")
            ha.wait(lambda: not [b for b in ha.http("GET", f"http://{serve.api}/v1/backends?status=live")[1]["backends"]
                                 if b.get("drone") == f"bench-{runtime}"],
                    f"{runtime} backends stopped", limit=120)
            proc.terminate()
            proc.wait()
        serve.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
