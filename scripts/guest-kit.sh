#!/usr/bin/env bash
# Fetches the guest kit into $DELTAVM_CACHE (default: <repo>/.cache): Debian's cloud kernel, its
# KVM modules (for guests that run KVM themselves: the nested harness) and busybox-static, with
# `apt-get download` and `dpkg -x` (nothing is installed). Idempotent.
# Prints the path of the kit directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${DELTAVM_CACHE:-$repo/.cache}
kit=$cache/kit
mkdir -p "$kit"

modules=(virt/lib/irqbypass.ko arch/x86/kvm/kvm.ko arch/x86/kvm/kvm-amd.ko arch/x86/kvm/kvm-intel.ko)
complete=true
[[ -f $kit/vmlinuz && -x $kit/busybox ]] || complete=false
for module in "${modules[@]}"; do [[ -f $kit/modules/$(basename "$module") ]] || complete=false; done
if [[ $complete != true ]]; then
  work=$(mktemp -d "$cache/kit-download.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  if ! apt-cache show busybox-static >/dev/null 2>&1; then apt-get update -qq; fi
  # The newest 6.1 cloud kernel the archive offers.
  kernel_package=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' |
    awk '{print $1}' | sort -V | tail -n 1)
  [[ -n $kernel_package ]] || { echo "guest-kit: no linux-image-6.1.0-*-cloud-amd64-unsigned in the archive" >&2; exit 1; }
  (cd "$work" && apt-get download -q "$kernel_package" busybox-static >/dev/null 2>&1) ||
    { echo "guest-kit: apt-get download $kernel_package busybox-static failed" >&2; exit 1; }
  for deb in "$work"/*.deb; do dpkg -x "$deb" "$work/root"; done
  cp "$(ls "$work"/root/boot/vmlinuz-* | head -n 1)" "$kit/vmlinuz.tmp"
  cp "$work/root/bin/busybox" "$kit/busybox.tmp"
  echo "$kernel_package" > "$kit/kernel-package"
  mkdir -p "$kit/modules"
  for module in "${modules[@]}"; do
    cp "$(ls -d "$work"/root/lib/modules/*/kernel | head -n 1)/$module" "$kit/modules/"
  done
  mv "$kit/vmlinuz.tmp" "$kit/vmlinuz"
  mv "$kit/busybox.tmp" "$kit/busybox"
fi
echo "$kit"
