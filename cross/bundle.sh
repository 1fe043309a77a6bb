#!/usr/bin/env bash
# Makes a device bundle: the static binary, the node's config, its certificate and key, a systemd
# unit and an install script, in one tarball.
#   cross/bundle.sh --target aarch64-unknown-linux-musl --config node-a/node.toml --certs node-a/certs
#                   [--out dist]
# The config is installed as /etc/starling/node.toml and must name its credentials
# certs/node.crt, certs/node.key, certs/ca.crt (relative), as `mesh-gateway ca issue` writes them.
# Builds the binary with cross/build.sh when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
target="" config="" certs="" out="dist"
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --certs) certs="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "bundle.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$target" ] && [ -n "$config" ] && [ -n "$certs" ] || {
  echo "usage: cross/bundle.sh --target TRIPLE --config FILE --certs DIR [--out DIR]" >&2; exit 2; }
for f in node.crt node.key ca.crt; do
  [ -f "$certs/$f" ] || { echo "bundle.sh: $certs/$f is missing" >&2; exit 2; }
done
bin="target/$target/device/mesh-node"
[ -x "$bin" ] || cross/build.sh "$target"

name=$(sed -n 's/^name *= *"\(.*\)".*/\1/p' "$config" | head -n1)
[ -n "$name" ] || { echo "bundle.sh: $config has no name" >&2; exit 2; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
top="$stage/starling-$name"
install -d "$top/bin" "$top/etc/starling/certs" "$top/systemd"
install -m 0755 "$bin" "$top/bin/mesh-node"
install -m 0640 "$config" "$top/etc/starling/node.toml"
install -m 0644 "$certs/node.crt" "$certs/ca.crt" "$top/etc/starling/certs/"
install -m 0600 "$certs/node.key" "$top/etc/starling/certs/node.key"
install -m 0644 cross/files/starling-node.service "$top/systemd/starling-node.service"
install -m 0755 cross/files/install.sh "$top/install.sh"

# The bundle must hold a config its own credentials satisfy: check it as the device will.
cargo build -q -p mesh-node --bins
target/debug/mesh-node check-config "$top/etc/starling/node.toml"

mkdir -p "$out"
tarball="$out/starling-$name-$target.tar.gz"
tar -C "$stage" -czf "$tarball" "starling-$name"
chmod 0600 "$tarball"   # it holds a private key
echo "$tarball"
