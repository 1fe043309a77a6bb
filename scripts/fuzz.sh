#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for a bounded time (cargo-fuzz, nightly through rustup).
#
#   scripts/fuzz.sh                    # 30 s per target (what CI runs)
#   scripts/fuzz.sh --seconds 3600     # a long run
#   scripts/fuzz.sh --seconds 60 policy serial_frames   # some targets only
#   scripts/fuzz.sh --keep             # also keep what the run found, in fuzz/corpus/
#
# Each run starts from the seeds (fuzz/seeds/<target>, in git, never changed) and the kept corpus
# (fuzz/corpus/<target>, if any) and writes what it finds new to a scratch folder, so a run never
# changes the repository unless --keep says so (then the new inputs join fuzz/corpus/<target>,
# minimised with cargo fuzz cmin). A crash stops that target with the input saved in
# fuzz/artifacts/<target>/ and printed here; once fixed, copy it to fuzz/regressions/<target>/
# and the stable test fuzz/tests/replay.rs replays it in every test run from then on.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=30
keep=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds)
            [ $# -ge 2 ] || { echo "fuzz.sh: --seconds needs a number" >&2; exit 2; }
            seconds="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done

if ! grep -q '^nightly' <<<"$(rustup toolchain list)" || ! command -v cargo-fuzz >/dev/null; then
    scripts/setup.sh   # installs the nightly toolchain and cargo-fuzz
fi

cd fuzz
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
[ ${#targets[@]} -gt 0 ] || { echo "fuzz.sh: no fuzz targets found" >&2; exit 1; }
cargo +nightly fuzz build -O
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    dirs=("$scratch/$t")
    for d in "seeds/$t" "corpus/$t"; do
        [ -d "$d" ] && dirs+=("$d")
    done
    echo "== fuzzing $t for ${seconds}s"
    # New inputs go to the scratch folder (the first one); the others are only read.
    if ! cargo +nightly fuzz run -O "$t" "${dirs[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb=256 \
        -timeout=10 -print_final_stats=1 2>"$scratch/$t.log"; then
        tail -40 "$scratch/$t.log"
        failed+=("$t")
        continue
    fi
    grep -E "stat::number_of_executed_units|stat::new_units_added" "$scratch/$t.log" \
        | sed "s/^/   $t: /" || true
    if [ "$keep" = 1 ] && [ -n "$(ls -A "$scratch/$t")" ]; then
        mkdir -p "corpus/$t"
        cp -n "$scratch/$t"/* "corpus/$t/"
        if ! cargo +nightly fuzz cmin -O "$t" "corpus/$t" >"$scratch/$t.cmin" 2>&1; then
            tail -20 "$scratch/$t.cmin" >&2
            echo "fuzz.sh: minimising corpus/$t failed" >&2
            exit 1
        fi
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]} (inputs in fuzz/artifacts/; add them to fuzz/regressions/)" >&2
    exit 1
fi
echo "every target ran ${seconds}s without a crash"
