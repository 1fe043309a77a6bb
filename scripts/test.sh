#!/usr/bin/env bash
# The whole test suite, exactly what CI runs: set-up, formatting, clippy, the binaries and the
# static device builds (the end-to-end, lab, qemu and bundle tests run them), the tests, and the
# no_std builds of mesh-proto and firmware-shim. Lab tests make network namespaces: run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }
# A fresh machine gains nothing from the incremental cache, and it is half of a debug target's size.
export CARGO_INCREMENTAL=0

# The build needs about 5 GB: under target/ (2.7 GB measured on a clean clone: the crates, the test
# binaries, the device builds) and fuzz/target/ (2.2 GB: the replay test and the sanitized fuzz
# targets): say so before a linker dies of a full disk halfway through.
avail_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ "${avail_kb:-0}" -lt $((6 * 1024 * 1024)) ]; then
  echo "warning: only $((avail_kb / 1024)) MB free on $(df -P . | awk 'NR==2 {print $6}'); the suite needs about 5 GB" >&2
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

step "every kept fuzz input and past crash, replayed on stable (fuzz/tests/replay.rs)"
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
cargo test --manifest-path fuzz/Cargo.toml

step "fuzzing: every decoder for ${STARLING_FUZZ_SECONDS:=20} s (nightly, cargo-fuzz)"
scripts/fuzz.sh --seconds "$STARLING_FUZZ_SECONDS"

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
