#!/usr/bin/env bash
# Installs what the build and tests need on a fresh Debian 12 machine; quick when all is there.
#   scripts/setup.sh         # everything the test suite needs
#   scripts/setup.sh cross   # only the cross toolchains
set -euo pipefail
what="${1:-all}"

need_apt=()
want_pkg() { dpkg -s "$1" >/dev/null 2>&1 || need_apt+=("$1"); }
want_pkg gcc-aarch64-linux-gnu
want_pkg gcc-arm-linux-gnueabihf
want_pkg libc6-dev-armhf-cross
want_pkg file
if [ "$what" = all ]; then
  want_pkg qemu-user-static
  want_pkg iproute2
  want_pkg nftables
  want_pkg systemd      # systemd-analyze verifies the device bundle's unit
  want_pkg prometheus   # promtool checks /metrics; a real server scrapes the gateway
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing Debian packages: ${need_apt[*]} (run as root, or: sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
  echo "setup: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

targets=(aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf)
[ "$what" = all ] && targets+=(thumbv7em-none-eabihf riscv32imc-unknown-none-elf)
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done
components=$(rustup component list --installed)
for c in rustfmt clippy; do
  grep -q "^$c" <<<"$components" || rustup component add "$c"
done
