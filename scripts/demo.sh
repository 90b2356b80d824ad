#!/usr/bin/env bash
# The main job, from a fresh machine: installs the Debian packages, builds, captures three real
# guest RAM images (nokaslr boots of Debian's cloud kernel under QEMU TCG), stores them as a
# delta chain, and runs the delta benchmark against xdelta3 and zstd --patch-from.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup.sh"
"$repo/scripts/build.sh"
images=${DELTAVM_CACHE:-$repo/.cache}/images
"$repo/scripts/make-guest-images.sh" "$images"

store=$(mktemp -d "${TMPDIR:-/tmp}/deltavm-demo-store.XXXXXX")
trap 'rm -rf "$store"' EXIT
deltavm=("$repo/build/deltavm" --store "$store")
echo "== storing three guest RAM images as a chain (guest-0 <- guest-1 <- guest-2)"
"${deltavm[@]}" store put guest-0 "$images/guest-0.ram"
"${deltavm[@]}" store put guest-1 "$images/guest-1.ram" --parent guest-0
"${deltavm[@]}" store put guest-2 "$images/guest-2.ram" --parent guest-1
"${deltavm[@]}" store ls
"${deltavm[@]}" store verify guest-2
"${deltavm[@]}" store fsck
echo
echo "== delta benchmark (median of ${DELTAVM_BENCH_RUNS:-5} runs)"
"$repo/build/bench-delta" --base "$images/guest-0.ram" --target "$images/guest-1.ram" \
  --third "$images/guest-2.ram" --runs "${DELTAVM_BENCH_RUNS:-5}"
