#!/usr/bin/env bash
# Builds stripped, static mesh-node and mesh-gateway for the devices and prints their sizes.
#   cross/build.sh                      # aarch64-unknown-linux-musl and armv7-unknown-linux-gnueabihf
#   cross/build.sh aarch64-unknown-linux-musl
# Output: target/<triple>/device/{mesh-node,mesh-gateway}. Installs what it needs (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf)
scripts/setup.sh cross
for t in "${targets[@]}"; do
  cargo build --profile device --target "$t" -p mesh-node -p mesh-gateway --bins
done
printf '%-34s %-14s %12s\n' target binary bytes
for t in "${targets[@]}"; do
  for b in mesh-node mesh-gateway; do
    f="target/$t/device/$b"
    printf '%-34s %-14s %12s\n' "$t" "$b" "$(stat -c %s "$f")"
    file "$f" 2>/dev/null | grep -q 'statically linked\|static-pie' || { echo "error: $f is not statically linked" >&2; exit 1; }
  done
done
