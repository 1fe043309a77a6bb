#!/usr/bin/env bash
# The whole test suite, exactly what CI runs: set-up, formatting, clippy, the binaries and the
# static device builds (the end-to-end, lab, qemu and bundle tests run them), the tests, and the
# no_std builds of mesh-proto and firmware-shim. Lab tests make network namespaces: run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }
# A fresh machine gains nothing from the incremental cache, and it is half of a debug target's size.
export CARGO_INCREMENTAL=0

# The build needs about 3 GB under target/ (2.1 GB measured on a clean clone: the crates, the test
# binaries, the device builds): say so before a linker dies of a full disk halfway through.
avail_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "${avail_kb:-0}" -lt $((4 * 1024 * 1024)) ]; then
  echo "warning: only $((avail_kb / 1024)) MB free on $(df -P . | awk 'NR==2 {print $6}'); the suite needs about 3 GB" >&2
fi

step "set-up (packages and targets the tests need)"
scripts/setup.sh
# Fails when something is missing, or is here only by chance (see scripts/setup.sh --check).
scripts/setup.sh --check

step "format"
cargo fmt --all -- --check

step "clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "build the binaries the end-to-end tests run"
cargo build --workspace --bins

step "device builds (static, stripped; the qemu and bundle tests use them)"
cross/build.sh

step "the example firmware for the emulated Cortex-M4 (tests/tests/firmware.rs runs it under QEMU)"
(cd firmware/qemu-mps2 && cargo build --release --locked)

step "the example firmware for a real board (Raspberry Pi Pico, embassy): it builds"
(cd firmware/rp2040 && cargo build --release --locked)

step "tests"
cargo test --workspace

step "the fuzz targets still compile (running them needs cargo-fuzz and nightly)"
cargo check -q --manifest-path mesh-proto/fuzz/Cargo.toml

step "mesh-proto without std, for microcontrollers"
cargo build -p mesh-proto --target thumbv7em-none-eabihf
cargo build -p mesh-proto --target riscv32imc-unknown-none-elf
# The microcontroller side: Cortex-M0+ (no atomics), Cortex-M4F, RISC-V.
for target in thumbv6m-none-eabi thumbv7em-none-eabihf riscv32imc-unknown-none-elf; do
  cargo build -p firmware-shim --target "$target"
  cargo build -p firmware-shim --target "$target" --features psk
done
echo
echo "all checks passed"
