#!/usr/bin/env bash
# Runs Hangar's whole test suite (unit, conformance and process-level tests, then doc tests).
# Installs what the tests need on a fresh machine first. This is the command the README gives
# and the one .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "scripts/test.sh: installing cargo-nextest" >&2
    cargo install cargo-nextest --locked
fi
if ! command -v python3 >/dev/null 2>&1; then
    # The drone agent's unit tests use python3's http.server as a generic backend.
    echo "scripts/test.sh: installing python3" >&2
    apt-get update -qq && apt-get install -y -qq python3
fi

cargo nextest run --workspace --locked --no-fail-fast "$@"
cargo test --doc --workspace --locked
