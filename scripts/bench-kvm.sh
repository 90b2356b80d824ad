#!/usr/bin/env bash
# The kvm backend's restore benchmark (bench/kvm_restore.cc): loads of a depth-3 micro-guest
# chain under each memory strategy next to the KVM floor, and the memory of concurrent clones.
# Runs bench-kvm-restore directly where /dev/kvm works; otherwise inside the nested harness (a
# deltavm template under QEMU TCG whose Linux loads the kit's KVM modules), where every number
# is TCG-emulated and only the ratios to the floor measured there carry over.
# Arguments go to bench-kvm-restore (--loads, --clones, --memory-mib, --json).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup.sh" >/dev/null
"$repo/scripts/build.sh" >/dev/null
if [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then
  exec "$repo/build/bench-kvm-restore" "$@"
fi
"$repo/scripts/guest-kit.sh" >/dev/null
scratch=$(mktemp -d "${TMPDIR:-/tmp}/deltavm-bench-kvm.XXXXXX")
deltavm=("$repo/build/deltavm" --store "$scratch/store" --runtime "$scratch/run")
trap '"${deltavm[@]}" stop --all >/dev/null 2>&1 || true; rm -rf "$scratch"' EXIT
mkdir -p "$scratch/files"
strip -o "$scratch/files/bench-kvm-restore" "$repo/build/bench-kvm-restore"
strip -o "$scratch/files/deltavm-vmm" "$repo/build/deltavm-vmm"
modules=${DELTAVM_KIT:-$repo/.cache/kit}/modules
cat > "$scratch/harness.json" <<JSON
{ "name": "bench-harness", "memory_mib": 3072,
  "files": [
    {"source": "$modules/irqbypass.ko", "destination": "/lib/modules/irqbypass.ko"},
    {"source": "$modules/kvm.ko", "destination": "/lib/modules/kvm.ko"},
    {"source": "$modules/kvm-amd.ko", "destination": "/lib/modules/kvm-amd.ko"},
    {"source": "$scratch/files/bench-kvm-restore", "destination": "/bin/bench-kvm-restore", "mode": "0755"},
    {"source": "$scratch/files/deltavm-vmm", "destination": "/bin/deltavm-vmm", "mode": "0755"},
    {"source": "$repo/build/micro-guest.bin", "destination": "/bin/micro-guest.bin"}],
  "setup": ["insmod /lib/modules/irqbypass.ko", "insmod /lib/modules/kvm.ko",
            "insmod /lib/modules/kvm-amd.ko", "test -c /dev/kvm"] }
JSON
echo "no usable /dev/kvm here: running inside the nested harness (QEMU TCG, emulated AMD-V)" >&2
"${deltavm[@]}" template build "$scratch/harness.json" >&2
id=$("${deltavm[@]}" --json run bench-harness | sed -n 's/.*"id": *"\([0-9a-f]*\)".*/\1/p')
"${deltavm[@]}" exec --timeout 7200 "$id" -- /bin/bench-kvm-restore --dir /tmp/bench "$@"
