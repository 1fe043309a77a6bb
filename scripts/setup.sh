#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian 12 machine; quick when all is there.
#   scripts/setup.sh           # everything the test suite needs (as root)
#   scripts/setup.sh cross     # only what the device builds need (cross/build.sh)
#   scripts/setup.sh --check   # install nothing: list what this machine lacks, and what it has
#                              # only by chance (a Recommends or a hand install a fresh machine
#                              # would not get); exit 1 if either list is not empty
#
# Every requirement is one line of NEEDS below: a Debian package, a probe that proves it does its
# job here (a command, a file, or a C program its cross compiler must build), and what uses it.
# Packages are installed with --no-install-recommends, as on CI, so a package that is only a
# Recommends of another one must be listed by name (issue 9: libc6-dev-arm64-cross).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=install
scope=all
for arg in "$@"; do
  case "$arg" in
    --check) mode=check ;;
    cross) scope=cross ;;
    all) scope=all ;;
    *) echo "usage: scripts/setup.sh [cross] [--check]" >&2; exit 2 ;;
  esac
done

# scope | package | probe | used by
#   probe: cmd:NAME (on PATH), file:PATH (exists), cc:COMPILER (builds a C file that includes
#   <stdint.h> and <stdlib.h>, what ring's build script does for that target)
NEEDS=$(cat <<'EOF'
cross | gcc-aarch64-linux-gnu  | cmd:aarch64-linux-gnu-gcc  | ring's C code for aarch64-unknown-linux-musl
cross | libc6-dev-arm64-cross  | cc:aarch64-linux-gnu-gcc   | C headers for that compiler (only a Recommends of it)
cross | gcc-arm-linux-gnueabihf | cmd:arm-linux-gnueabihf-gcc | linker and C compiler for armv7-unknown-linux-gnueabihf
cross | libc6-dev-armhf-cross  | cc:arm-linux-gnueabihf-gcc | C headers and static libc for armv7 (only a Recommends)
cross | file                   | cmd:file                   | cross/build.sh checks the binaries are static
cross | gcc                    | cmd:cc                     | the host linker and build scripts' C code
cross | libc6-dev              | cc:cc                      | host C headers
all   | qemu-user-static       | cmd:qemu-aarch64-static    | ARM builds run under qemu in tests/tests/lab.rs
all   | iproute2               | cmd:ip                     | network namespaces of the lab tests
all   | nftables               | cmd:nft                    | packet loss in the lab tests
all   | mount                  | cmd:mount                  | tests/tests/soak.rs fills a small tmpfs under a node's state folder
all   | procps                 | cmd:kill                   | tests send SIGTERM/SIGKILL to processes in namespaces
all   | systemd                | cmd:systemd-analyze        | tests/tests/bundle.rs verifies the device unit
all   | prometheus             | cmd:promtool               | promtool checks /metrics; a real Prometheus scrapes the gateway
all   | tar                    | cmd:tar                    | device bundles
all   | faketime               | cmd:faketime               | tests/tests/lifecycle.rs starts nodes with their clock in 1970
all   | socat                  | cmd:socat                  | tests/tests/serial.rs wires a node to a microcontroller through a pty pair
all   | qemu-system-arm        | cmd:qemu-system-arm        | tests/tests/firmware.rs runs the example firmware on an emulated Cortex-M4
all   | mosquitto              | file:/usr/sbin/mosquitto   | tests/tests/cloud.rs bridges to a real MQTT broker (TLS, client certificates, an ACL)
all   | mosquitto-clients      | cmd:mosquitto_pub          | tests/tests/tcp.rs: mosquitto_pub and mosquitto_sub talk to a broker through a TCP forward
all   | chromium               | cmd:chromium               | tests/tests/dashboard.rs loads the gateway's dashboard in headless Chromium
all   | wrk                    | cmd:wrk                    | scripts/bench.sh loads the HTTP ingress with a real HTTP load generator
EOF
)

# Recommends of listed packages that the build and tests do not need (reason after the name).
NOT_NEEDED=$(cat <<'EOF'
binfmt-support           qemu binaries are started by name; binfmt is not registered
prometheus-node-exporter the tests scrape only the gateway
netbase                  nftables reads no service names in the tests
EOF
)

# Python packages the tests use (PyPI): name==version | module | what uses it
PIP_NEEDS=$(cat <<'EOF'
spiffe==0.3.2 | spiffe | tests/tests/svid.rs checks issued certificates with the SPIFFE project's library
EOF
)

TARGETS_cross=(aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf)
# x86_64 musl: scripts/bench.sh measures the node's heap with the devices' C library.
TARGETS_all=("${TARGETS_cross[@]}" thumbv7em-none-eabihf thumbv6m-none-eabi riscv32imc-unknown-none-elf x86_64-unknown-linux-musl)
COMPONENTS=(rustfmt clippy llvm-tools)

trim() { local v="$1"; v="${v#"${v%%[![:space:]]*}"}"; printf '%s' "${v%"${v##*[![:space:]]}"}"; }

rows() {
  while IFS='|' read -r s pkg probe why; do
    s=$(trim "$s"); pkg=$(trim "$pkg")
    [ -n "$pkg" ] || continue
    if [ "$scope" = all ] || [ "$s" = cross ]; then
      printf '%s\t%s\t%s\n' "$pkg" "$(trim "$probe")" "$(trim "$why")"
    fi
  done <<<"$NEEDS"
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

probe() {
  local kind="${1%%:*}" what="${1#*:}"
  case "$kind" in
    cmd) command -v "$what" >/dev/null 2>&1 ;;
    file) [ -e "$what" ] ;;
    cc)
      command -v "$what" >/dev/null 2>&1 || return 1
      local tmp; tmp=$(mktemp -d)
      printf '#include <stdint.h>\n#include <stdlib.h>\nint f(void){return (int)sizeof(uint64_t);}\n' >"$tmp/p.c"
      "$what" -c "$tmp/p.c" -o "$tmp/p.o" >/dev/null 2>&1
      local rc=$?
      rm -rf "$tmp"
      return $rc ;;
    *) echo "setup.sh: unknown probe $1" >&2; return 1 ;;
  esac
}

targets() { if [ "$scope" = all ]; then echo "${TARGETS_all[@]}"; else echo "${TARGETS_cross[@]}"; fi; }

missing_pkgs=() failing=()
while IFS=$'\t' read -r pkg pr why; do
  installed "$pkg" || missing_pkgs+=("$pkg")
done < <(rows)

if [ "$mode" = install ] && [ ${#missing_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing Debian packages: ${missing_pkgs[*]} (run as root, or: sudo apt-get install --no-install-recommends ${missing_pkgs[*]})" >&2
    exit 1
  fi
  echo "setup: installing ${missing_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >/dev/null
  missing_pkgs=()
fi

while IFS=$'\t' read -r pkg pr why; do
  probe "$pr" || failing+=("$pkg ($pr: $why)")
done < <(rows)

missing_pip=()
if [ "$scope" = all ]; then
  while IFS='|' read -r spec module why; do
    spec=$(trim "$spec"); module=$(trim "$module")
    [ -n "$spec" ] || continue
    python3 -c "import $module" >/dev/null 2>&1 || missing_pip+=("$spec")
  done <<<"$PIP_NEEDS"
fi
if [ "$mode" = install ] && [ ${#missing_pip[@]} -gt 0 ]; then
  echo "setup: installing Python packages ${missing_pip[*]}"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${missing_pip[@]}"
  missing_pip=()
fi

have_targets=$(rustup target list --installed)
missing_targets=()
for t in $(targets); do grep -qx "$t" <<<"$have_targets" || missing_targets+=("$t"); done
have_components=$(rustup component list --installed)
missing_components=()
for c in "${COMPONENTS[@]}"; do grep -q "^$c" <<<"$have_components" || missing_components+=("$c"); done

# The fuzz targets (scripts/fuzz.sh, run by scripts/test.sh) need a nightly toolchain and
# cargo-fuzz; the device builds do not.
missing_fuzz=()
if [ "$scope" = all ]; then
  grep -q '^nightly' <<<"$(rustup toolchain list)" || missing_fuzz+=("rustup toolchain nightly")
  command -v cargo-fuzz >/dev/null || missing_fuzz+=("cargo-fuzz ${CARGO_FUZZ_VERSION:=0.13.2}")
fi

if [ "$mode" = install ]; then
  for f in "${missing_fuzz[@]}"; do
    case "$f" in
      rustup*) rustup toolchain install nightly --profile minimal ;;
      cargo-fuzz*) cargo install cargo-fuzz --locked --version "${f#cargo-fuzz }" ;;
    esac
  done
  for t in "${missing_targets[@]}"; do rustup target add "$t"; done
  for c in "${missing_components[@]}"; do rustup component add "$c"; done
  if [ ${#failing[@]} -gt 0 ]; then
    printf 'error: installed, yet not working here: %s\n' "${failing[@]}" >&2
    exit 1
  fi
  exit 0
fi

# --check: what a fresh machine would lack, and what this one has only by chance: a Recommends
# of something setup.sh installs (it installs with --no-install-recommends) that is installed here
# but neither listed, nor pulled in by a Depends, nor on a fresh machine (scripts/debian-base.txt).
# That is exactly how issue 9 happened: libc6-dev-arm64-cross, a Recommends of the aarch64 cross
# compiler, was on the developer's machine from earlier work and CI passed there.
listed=$(rows | cut -f1)
closure=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances $listed 2>/dev/null | grep -v '^ ' | sort -u)
base=$(grep -v '^#' scripts/debian-base.txt)
chance=()
for pkg in $(apt-cache depends $closure 2>/dev/null | awk '/Recommends:/ {print $2}' | tr -d '<>' | sort -u); do
  grep -qx "$pkg" <<<"$listed" && continue
  grep -qx "$pkg" <<<"$closure" && continue
  grep -qx "$pkg" <<<"$base" && continue
  grep -q "^$pkg " <<<"$NOT_NEEDED" && continue
  installed "$pkg" && chance+=("$pkg")
done

problems=0
report() {
  local title="$1"; shift
  [ $# -gt 0 ] || return 0
  problems=1
  echo "$title"
  printf '  %s\n' "$@"
}
report "Debian packages missing:" "${missing_pkgs[@]}"
report "probes failing (installed, yet not usable):" "${failing[@]}"
report "Python packages missing (pip):" "${missing_pip[@]}"
report "rustup targets missing:" "${missing_targets[@]}"
report "rustup components missing:" "${missing_components[@]}"
report "fuzzing tools missing:" "${missing_fuzz[@]}"
report "installed here, but a fresh machine would lack it (a Recommends of what setup.sh installs with --no-install-recommends): list it in NEEDS, or in NOT_NEEDED with the reason" "${chance[@]}"
if [ $problems -eq 0 ]; then
  echo "setup --check: every package, probe, target and component is in place ($(rows | wc -l) packages)"
fi
exit $problems
