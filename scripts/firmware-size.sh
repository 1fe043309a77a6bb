#!/usr/bin/env bash
# Flash and static RAM of the example firmware (firmware/qemu-mps2, thumbv7em-none-eabihf,
# release): with firmware-shim and two services, and the same firmware without the shim (its UART
# echoes bytes); the difference is the shim's share. Goal: at most 16 KB of flash and 4 KB of
# static RAM for the shim. Needs the llvm-tools component (scripts/setup.sh adds it).
set -euo pipefail
cd "$(dirname "$0")/../firmware/qemu-mps2"
size_tool=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-size | head -1)
cargo build -q --release --locked
cargo build -q --release --locked --features bare --target-dir target/bare
sizes() {
  # flash = vector table + text + rodata + data (its image); RAM = data + bss
  "$size_tool" -A "$1" | awk '
    $1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" { flash += $2 }
    $1 == ".data" { flash += $2; ram += $2 }
    $1 == ".bss" || $1 == ".uninit" { ram += $2 }
    END { print flash, ram }'
}
read -r full_flash full_ram < <(sizes target/thumbv7em-none-eabihf/release/qemu-mps2)
read -r bare_flash bare_ram < <(sizes target/bare/thumbv7em-none-eabihf/release/qemu-mps2)
echo "example firmware (thumbv7em-none-eabihf, release, opt-level s, LTO):"
printf '  with firmware-shim, 2 services:  %6d B flash, %5d B static RAM\n' "$full_flash" "$full_ram"
printf '  without it (UART echo):          %6d B flash, %5d B static RAM\n' "$bare_flash" "$bare_ram"
printf '  the shim'"'"'s share:                %6d B flash, %5d B static RAM (goal: 16384 and 4096)\n' \
  $((full_flash - bare_flash)) $((full_ram - bare_ram))
