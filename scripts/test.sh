#!/usr/bin/env bash
# Runs Hangar's whole test suite (unit, conformance and process-level tests, then doc tests).
# Installs what the tests need on a fresh machine first. This is the command the README gives
# and the one .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build-deps.sh

if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "scripts/test.sh: installing cargo-nextest" >&2
    cargo install cargo-nextest --locked
fi
if ! command -v python3 >/dev/null 2>&1; then
    # The drone agent's unit tests use python3's http.server as a generic backend.
    echo "scripts/test.sh: installing python3" >&2
    apt-get update -qq && apt-get install -y -qq python3
fi
if ! command -v prometheus >/dev/null 2>&1; then
    # The metrics process-level test scrapes `hangar dev` with a real Prometheus.
    echo "scripts/test.sh: installing prometheus" >&2
    apt-get update -qq && apt-get install -y -qq prometheus
fi
if ! command -v ip >/dev/null 2>&1 || ! command -v iptables >/dev/null 2>&1; then
    # The multi-host tests put serve and each drone in a network namespace of its own and cut
    # the links between them with iptables.
    echo "scripts/test.sh: installing iproute2 and iptables" >&2
    apt-get update -qq && apt-get install -y -qq iproute2 iptables
fi
if ! command -v taskset >/dev/null 2>&1; then
    # dev::on_one_core_the_whole_path_runs_and_shuts_down_cleanly pins hangar dev to one core.
    echo "scripts/test.sh: installing util-linux (taskset)" >&2
    apt-get update -qq && apt-get install -y -qq util-linux
fi
if ! command -v etcd >/dev/null 2>&1 || ! command -v protoc >/dev/null 2>&1; then
    # The etcd store's tests run real etcd processes (on ports of their own: the Debian package
    # may start a daemon on 2379/2380, which the tests neither use nor need), and etcd-client
    # compiles etcd's protos with protoc when it is built.
    echo "scripts/test.sh: installing etcd and protoc" >&2
    apt-get update -qq && apt-get install -y -qq etcd-server etcd-client protobuf-compiler libprotobuf-dev
fi
if ! command -v dig >/dev/null 2>&1; then
    # The DNS process-level tests query `hangar dev` with dig.
    echo "scripts/test.sh: installing dnsutils (dig)" >&2
    apt-get update -qq && apt-get install -y -qq dnsutils
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    # The dashboard's process-level test (tests/ui.rs) drives a real headless Chromium
    # through chromedriver.
    echo "scripts/test.sh: installing chromium and chromium-driver" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi

# The Docker runtime's tests run the demo backend as the image hangar-demo:dev, which no
# registry serves: build it (or find it up to date) first. Without a reachable engine those
# tests fail when CI is set and report themselves skipped otherwise.
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    echo "scripts/test.sh: building the demo image for the docker tests" >&2
    ./scripts/demo-image.sh >/dev/null
elif [[ -n "${CI:-}" ]]; then
    echo "scripts/test.sh: the docker engine is unreachable: the docker runtime tests will fail; start dockerd" >&2
else
    echo "scripts/test.sh: the docker engine is unreachable: skipping the docker runtime tests; start dockerd to run them" >&2
fi

cargo nextest run --workspace --locked --no-fail-fast "$@"
cargo test --doc --workspace --locked
