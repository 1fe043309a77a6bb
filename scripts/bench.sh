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
# The footprint's heap figure built as the aarch64 devices' node is (musl, with mimalloc): an
# x86_64 musl build of the node (its target comes with scripts/setup.sh; without it, the figure is left out).
if rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
  cargo build --profile device -q --target x86_64-unknown-linux-musl -p mesh-node --bins
else
  echo "bench: no x86_64-unknown-linux-musl target (scripts/setup.sh adds it); the footprint leaves out the musl build's heap figure" >&2
fi
cargo build --release -q -p mesh-bench "${features[@]}"
target/release/mesh-bench "$@"
# Flash and RAM of the microcontroller side (the example firmware, with and without the shim).
scripts/firmware-size.sh
