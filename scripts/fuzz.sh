#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for SECONDS each (default 600), one after
# another on one core, each from and into its corpus (fuzz/corpus/<target>, which the normal
# test suite replays), cut down afterwards to at most 200 inputs picked for the coverage edges
# they reach. Prints per target the executions, exec/s and coverage (cov and ft from
# libFuzzer's last status line) and whether it crashed; exits non-zero after a crash (the
# input is in fuzz/artifacts/<target>/; reproduce with
# `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>`).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs the nightly toolchain and python3; installs cargo-fuzz when it is missing. Full logs
# go to fuzz/target/logs/<target>.log.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-600}"
shift || true
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=(request_head body_decoders response_head h2_header_block token route dns_query)
fi
case "$seconds" in
'' | *[!0-9]*)
    echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2
    exit 64
    ;;
esac

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "scripts/fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
cargo +nightly fuzz build
mkdir -p target/logs
bin_dir="target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
# The most inputs kept per target (the normal test suite replays them all).
max_corpus="${FUZZ_MAX_CORPUS:-200}"

# Replaces corpus/$1 with at most $max_corpus of its inputs, picked for the coverage edges they
# reach (scripts/fuzz_select.py over libFuzzer's set-cover merge). The edges the cap leaves
# out, the next run finds again quickly.
minimize() {
    local target="$1" work
    work=$(mktemp -d)
    mkdir "$work/out" "$work/kept"
    "$bin_dir/$target" -merge=1 -set_cover_merge=1 -use_counters=0 \
        -merge_control_file="$work/control" "$work/out" "corpus/$target" >>"$log" 2>&1
    python3 ../scripts/fuzz_select.py "$work/control" "$max_corpus" >"$work/keep"
    if [ -s "$work/keep" ]; then
        while IFS= read -r f; do cp "$f" "$work/kept/"; done <"$work/keep"
        rm -rf "corpus/$target"
        mv "$work/kept" "corpus/$target"
    fi
    rm -rf "$work"
}

failed=0
summary=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    log="target/logs/$target.log"
    echo "scripts/fuzz.sh: fuzzing $target for ${seconds}s" >&2
    set +e
    # One process (no -jobs/-fork): one core. A unit slower than 10 s is a hang.
    cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1
    status=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    last=$(grep -E '^#[0-9]+.*cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1 || true)
    cov=$(sed -nE 's/.*cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.*ft: ([0-9]+).*/\1/p' <<<"$last")
    if [ -z "$execs" ]; then
        execs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$last")
    fi
    if [ "$status" -eq 0 ]; then
        result="ok"
        minimize "$target" || echo "scripts/fuzz.sh: minimizing $target failed (see $log)" >&2
    else
        failed=1
        artifact=$(sed -nE 's/.*(Test unit written to|saved as) ([^ ]*).*/\2/p' "$log" | tail -n 1)
        result="CRASH (exit $status) ${artifact:-see $log}"
    fi
    files=$(find "corpus/$target" -type f | wc -l)
    line=$(printf '%-14s %6ss  execs %-11s exec/s %-7s cov %-6s ft %-7s corpus %-5s %s' \
        "$target" "$seconds" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$files" "$result")
    echo "$line"
    summary+=("$line")
done

echo
echo "scripts/fuzz.sh: $(date -u +%Y-%m-%d), ${seconds}s per target"
printf '%s\n' "${summary[@]}"
exit "$failed"
