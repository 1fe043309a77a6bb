#!/usr/bin/env bash
# Puts a device bundle on a device over SSH and installs it there (needs sudo on the device).
#   cross/deploy.sh dist/starling-node-a-aarch64-unknown-linux-musl.tar.gz pi@198.51.100.7
# For an SD card instead, mount its root file system and run the bundle's install.sh --root:
#   tar -xzf BUNDLE -C /tmp && sudo /tmp/starling-NAME/install.sh --root /mnt/sdcard-root
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: cross/deploy.sh BUNDLE.tar.gz USER@HOST" >&2; exit 2; }
bundle="$1" dest="$2"
base=$(basename "$bundle" .tar.gz)
dir=$(tar -tzf "$bundle" | head -n1 | cut -d/ -f1)
scp -q "$bundle" "$dest:/tmp/$base.tar.gz"
ssh "$dest" "set -e; cd /tmp && tar -xzf $base.tar.gz && sudo ./$dir/install.sh && rm -rf $base.tar.gz $dir"
echo "installed $dir on $dest"
