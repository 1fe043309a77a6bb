#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for a bounded time (cargo-fuzz, nightly through rustup).
#
#   scripts/fuzz.sh                    # 30 s per target (what CI runs)
#   scripts/fuzz.sh --seconds 3600     # a long run
#   scripts/fuzz.sh --seconds 60 policy serial_frames   # some targets only
#
# Each run starts from the kept corpus (fuzz/corpus/<target>, in git) and writes what it finds
# new to a scratch corpus, so a run never changes the repository; `--keep` merges the new
# inputs into fuzz/corpus afterwards (minimised). A crash stops the run with the input saved in
# fuzz/artifacts/<target>/; copy it to fuzz/regressions/<target>/ and the stable test
# fuzz/tests/replay.rs replays it in every test run from then on.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=30
keep=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done

if ! rustup toolchain list | grep -q '^nightly' || ! command -v cargo-fuzz >/dev/null; then
    scripts/setup.sh   # installs the nightly toolchain and cargo-fuzz
fi

cd fuzz
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build -O
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "$scratch/$t"
    echo "== fuzzing $t for ${seconds}s"
    # New inputs go to the scratch corpus (the first directory); the kept one is read only.
    if ! cargo +nightly fuzz run -O "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb=256 \
        -timeout=10 -print_final_stats=1 2>"$scratch/$t.log"; then
        tail -40 "$scratch/$t.log"
        failed+=("$t")
        continue
    fi
    grep -E "stat::number_of_executed_units|stat::new_units_added" "$scratch/$t.log" \
        | sed "s/^/   $t: /"
    if [ "$keep" = 1 ]; then
        cp -n "$scratch/$t"/* "corpus/$t/" 2>/dev/null || true
        cargo +nightly fuzz cmin -O "$t" "corpus/$t" >/dev/null 2>&1
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]} (inputs in fuzz/artifacts/; add them to fuzz/regressions/)" >&2
    exit 1
fi
echo "every target ran ${seconds}s without a crash"
