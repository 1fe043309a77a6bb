#!/bin/sh
# Installs a Starling node from this bundle.
#   ./install.sh                  # onto this device (as root): user, files, service enabled and started
#   ./install.sh --root /mnt/sd   # into a mounted root file system (an SD card): files only; the
#                                 # user and file owners are made at first boot (sysusers, tmpfiles)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=/
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="$2"; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -d "$root" ] || { echo "install.sh: $root is not a folder" >&2; exit 2; }
r=${root%/}

install -d -m 0755 "$r/usr/local/bin" "$r/etc/systemd/system" "$r/usr/lib/sysusers.d" "$r/usr/lib/tmpfiles.d"
install -d -m 0750 "$r/etc/starling" "$r/etc/starling/certs"
install -m 0755 "$here/bin/mesh-node" "$r/usr/local/bin/mesh-node"
install -m 0640 "$here/etc/starling/node.toml" "$r/etc/starling/node.toml"
install -m 0644 "$here/etc/starling/certs/node.crt" "$r/etc/starling/certs/node.crt"
install -m 0644 "$here/etc/starling/certs/ca.crt" "$r/etc/starling/certs/ca.crt"
install -m 0600 "$here/etc/starling/certs/node.key" "$r/etc/starling/certs/node.key"
install -m 0644 "$here/systemd/starling-node.service" "$r/etc/systemd/system/starling-node.service"
printf 'u starling - "Starling mesh node" /var/lib/starling\n' > "$r/usr/lib/sysusers.d/starling.conf"
cat > "$r/usr/lib/tmpfiles.d/starling.conf" <<'TMP'
d /var/lib/starling 0750 starling starling -
z /etc/starling 0750 root starling -
z /etc/starling/node.toml 0640 root starling -
z /etc/starling/certs 0750 starling starling -
z /etc/starling/certs/node.crt 0644 starling starling -
z /etc/starling/certs/ca.crt 0644 starling starling -
z /etc/starling/certs/node.key 0600 starling starling -
TMP
chmod 0644 "$r/usr/lib/sysusers.d/starling.conf" "$r/usr/lib/tmpfiles.d/starling.conf"
# The serial lines the node's config names are the only devices the service may open.
dropin="$r/etc/systemd/system/starling-node.service.d"
install -d -m 0755 "$dropin"
devices=$(sed 's/^[[:space:]]*#.*//' "$here/etc/starling/node.toml" | grep -o "serial://[^?\"' ]*" | sed 's|^serial://||' | sort -u)
dialout_known() {
  if [ "$root" = / ]; then getent group dialout >/dev/null 2>&1; else grep -q '^dialout:' "$r/etc/group" 2>/dev/null; fi
}
{
  echo "# Written by install.sh: the kinds of serial line /etc/starling/node.toml names."
  echo "[Service]"
  for d in $devices; do
    name=${d##*/}
    case "$d" in
      # /dev/ttyUSB0 -> char-ttyUSB: the class, so that a device plugged in later is allowed.
      /dev/tty*) echo "DeviceAllow=char-$(printf '%s' "$name" | sed 's/[0-9]*$//') rw" ;;
      *) echo "DeviceAllow=$d rw" ;;
    esac
  done | sort -u
  if [ -n "$devices" ] && dialout_known; then echo "SupplementaryGroups=dialout"; fi
} > "$dropin/devices.conf"
chmod 0644 "$dropin/devices.conf"
install -d -m 0755 "$r/etc/systemd/system/multi-user.target.wants"
ln -sf ../starling-node.service "$r/etc/systemd/system/multi-user.target.wants/starling-node.service"

if [ "$root" = / ]; then
  id starling >/dev/null 2>&1 || useradd --system --home-dir /var/lib/starling --no-create-home \
    --shell /usr/sbin/nologin starling
  chgrp starling /etc/starling /etc/starling/node.toml
  # The node renews its certificate in place: the folder and its files are its own.
  chown starling:starling /etc/starling/certs /etc/starling/certs/node.key \
    /etc/starling/certs/node.crt /etc/starling/certs/ca.crt
  /usr/local/bin/mesh-node check-config /etc/starling/node.toml
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable starling-node.service
    # A re-install or an upgrade restarts a running node on the new binary and unit.
    systemctl restart starling-node.service
    echo "starling-node.service enabled and (re)started"
  fi
else
  echo "installed into $root; the starling user and file owners are set at first boot"
fi
