#!/usr/bin/env bash
# Captures three independent boots of the same Linux guest (Debian's cloud kernel, a busybox
# initramfs, deltavm's deterministic profile: nokaslr, norandmaps, init_on_free=1) as raw RAM
# images DIR/guest-0.ram, guest-1.ram, guest-2.ram, 256 MiB each unless MEMORY_MIB is given.
# Each boot is a `deltavm template build` into a store of its own, read back with `store get`.
# Images already present are kept. REQUIRES: deltavm built (scripts/build.sh).
# Usage: make-guest-images.sh DIR [MEMORY_MIB]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
directory=${1:?usage: make-guest-images.sh DIR [MEMORY_MIB]}
memory_mib=${2:-256}
deltavm=${DELTAVM_BINARY:-$repo/build/deltavm}
"$repo/scripts/guest-kit.sh" >/dev/null
mkdir -p "$directory"
work=$(mktemp -d "${TMPDIR:-/tmp}/deltavm-guest-images.XXXXXX")
trap 'rm -rf "$work"' EXIT
for i in 0 1 2; do
  image=$directory/guest-$i.ram
  if [[ -f $image && $(stat -c %s "$image") -eq $((memory_mib << 20)) ]]; then continue; fi
  echo "make-guest-images: booting guest $i under QEMU to capture $image" >&2
  printf '{"name": "guest-%s", "memory_mib": %s}\n' "$i" "$memory_mib" > "$work/guest-$i.json"
  "$deltavm" --store "$work/store-$i" --runtime "$work/runtime" template build "$work/guest-$i.json" >/dev/null
  "$deltavm" --store "$work/store-$i" store get "guest-$i" -o "$image.tmp" >/dev/null
  mv "$image.tmp" "$image"
done
