#!/usr/bin/env bash
# The demo: a throw-away CA, a gateway and three nodes on loopback, calls between them.
#   scripts/demo.sh                  # run it and print what happened
#   scripts/demo.sh --keep-running   # leave the mesh up for curl until Ctrl-C
#   scripts/demo.sh --cloud          # also bridge the site to a local mosquitto (apt install
#                                    # mosquitto) and show the cloud's side
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p mesh-gateway -p mesh-node --bins
exec target/release/mesh-gateway demo "$@"
