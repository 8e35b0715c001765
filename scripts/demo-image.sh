#!/usr/bin/env bash
# Builds the demo backend as the Docker image `hangar-demo:dev`, with no registry involved:
# a statically linked `hangar` binary (glibc, `+crt-static`) copied into an image `FROM scratch`
# whose entrypoint is `hangar demo-backend`. The Docker runtime's tests and the spawn latency
# benchmark use it; drones need it loaded before they can run `spawn.image = "hangar-demo:dev"`.
#
# Idempotent: an unchanged binary gives the same image id; a rebuilt one replaces the tag and
# the previous image is removed if nothing uses it any more. Prints the image id on stdout.
#
# Environment: HANGAR_DEMO_IMAGE (default hangar-demo:dev), CARGO_TARGET_DIR (default
# target/static, kept apart from the normal target dir so the static flags do not invalidate
# its release build).
set -euo pipefail
cd "$(dirname "$0")/.."

image="${HANGAR_DEMO_IMAGE:-hangar-demo:dev}"
target_dir="${CARGO_TARGET_DIR:-target/static}"
triple="x86_64-unknown-linux-gnu"

say() { echo "scripts/demo-image.sh: $*" >&2; }

if ! command -v docker >/dev/null 2>&1; then
    say "the docker CLI is not installed: install docker to build $image"
    exit 1
fi
if ! docker_error="$(docker info 2>&1 >/dev/null)"; then
    say "the docker daemon is unreachable${DOCKER_HOST:+ at $DOCKER_HOST}: start dockerd (or fix DOCKER_HOST) and run this again"
    say "docker said: $docker_error"
    exit 1
fi

# Several test processes may ask for the image at once: build it once, one at a time.
mkdir -p "$target_dir"
exec 9>"$target_dir/demo-image.lock"
flock 9

say "building a static hangar binary in $target_dir"
# Stripped: the image only needs to run, and is 5x smaller without debug info. Built without
# the release profile's whole-program optimisation: the image is a test fixture, and LTO would
# double its build time.
RUSTFLAGS='-C target-feature=+crt-static' CARGO_TARGET_DIR="$target_dir" CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    cargo build --release --locked --target "$triple" --bin hangar >&2
binary="$target_dir/$triple/release/hangar"
if ldd "$binary" 2>/dev/null | grep -q '=>'; then
    say "$binary is dynamically linked; it would not run FROM scratch"
    exit 1
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/hangar"
cat >"$context/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY hangar /hangar
# The demo backend listens on $HANGAR_BIND:$PORT; the Docker runtime sets both, these defaults
# make a plain `docker run -p 8080:8080 hangar-demo:dev` work too.
ENV PORT=8080 HANGAR_BIND=0.0.0.0
EXPOSE 8080
ENTRYPOINT ["/hangar", "demo-backend"]
DOCKERFILE

previous="$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
say "building image $image"
# The classic builder: it needs no buildx plugin, and FROM scratch pulls nothing.
DOCKER_BUILDKIT=0 docker build --quiet --tag "$image" \
    --label org.opencontainers.image.title=hangar-demo "$context" >/dev/null
id="$(docker image inspect --format '{{.Id}}' "$image")"
if [[ -n "$previous" && "$previous" != "$id" ]]; then
    # Fails harmlessly while a container still uses the old image.
    docker image rm "$previous" >/dev/null 2>&1 || true
fi
echo "$id"
