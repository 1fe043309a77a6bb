#!/usr/bin/env bash
# The benchmark: Starling's call path next to raw UDP and raw quinn (and zenoh with ZENOH=1),
# in one run; footprint from the device builds if cross/build.sh made them; the discovery time of
# ten lab nodes (network namespaces: run as root, or pass --lab-nodes 0).
#   scripts/bench.sh                 # table on stdout, JSON in bench-results/latest.json
#   ZENOH=1 scripts/bench.sh         # also zenoh get/queryable (builds zenoh: minutes)
#   scripts/bench.sh --rounds 3 --calls 1000
set -euo pipefail
cd "$(dirname "$0")/.."
features=()
[ -n "${ZENOH:-}" ] && features=(--features zenoh)
# The footprint and discovery figures run the size-tuned native build, stripped as on a device.
cargo build --profile device -q -p mesh-node -p mesh-gateway --bins
cargo build --release -q -p mesh-bench "${features[@]}"
target/release/mesh-bench "$@"
# Flash and RAM of the microcontroller side (the example firmware, with and without the shim).
scripts/firmware-size.sh
