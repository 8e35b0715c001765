#!/usr/bin/env bash
# Installs what building Hangar needs beyond the Rust toolchain: protoc and the protobuf
# headers (the etcd store's client compiles etcd's protocol definitions when it is built).
# Idempotent; the README's commands, scripts/test.sh and .ci/run call it first.
set -euo pipefail
if ! command -v protoc >/dev/null 2>&1 || [[ ! -d /usr/include/google/protobuf ]]; then
    echo "scripts/build-deps.sh: installing protobuf-compiler and libprotobuf-dev" >&2
    apt-get update -qq && apt-get install -y -qq protobuf-compiler libprotobuf-dev
fi
