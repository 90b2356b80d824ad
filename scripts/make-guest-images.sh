#!/usr/bin/env bash
# Captures three independent nokaslr boots of the benchmark guest as raw RAM images
# DIR/guest-0.ram, guest-1.ram, guest-2.ram (256 MiB each unless MEMORY_MIB is given).
# Images already present are kept. Usage: make-guest-images.sh DIR [MEMORY_MIB]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
directory=${1:?usage: make-guest-images.sh DIR [MEMORY_MIB]}
memory_mib=${2:-256}
mkdir -p "$directory"
for i in 0 1 2; do
  image=$directory/guest-$i.ram
  if [[ -f $image && $(stat -c %s "$image") -eq $((memory_mib << 20)) ]]; then continue; fi
  echo "make-guest-images: booting guest $i under QEMU TCG to capture $image" >&2
  "$repo/scripts/capture-guest-ram.sh" "$image" "$memory_mib" >/dev/null
done
