#!/usr/bin/env bash
# The whole test suite, exactly what CI runs: set-up, formatting, clippy, the tests (end-to-end
# ones use the real binaries, built first), the no_std builds of mesh-proto, and the cross builds.
#   scripts/test.sh            # everything
#   SKIP_CROSS=1 scripts/test.sh   # without the (slow) device builds
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }

step "set-up (packages and targets the tests need)"
scripts/setup.sh

step "format"
cargo fmt --all -- --check

step "clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "build the binaries the end-to-end tests run"
cargo build --workspace --bins

step "tests"
cargo test --workspace

step "mesh-proto without std, for microcontrollers"
cargo build -p mesh-proto --target thumbv7em-none-eabihf
cargo build -p mesh-proto --target riscv32imc-unknown-none-elf

if [ -z "${SKIP_CROSS:-}" ]; then
  step "device builds (static, stripped)"
  cross/build.sh
fi
echo
echo "all checks passed"
