#!/usr/bin/env bash
# Runs `hangar dev` (everything in one process on loopback, embedded store) from a fresh
# checkout: installs the build dependencies if missing, then builds and runs the release
# binary. Extra arguments go to `hangar dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build-deps.sh
exec cargo run --release -- dev "$@"
