#!/usr/bin/env bash
# Boots the benchmark guest (Debian's cloud kernel + a busybox initramfs) under QEMU TCG with its
# RAM in a file, waits until /init reports ready, pauses the VM and keeps the RAM file.
# Usage: capture-guest-ram.sh OUTPUT [MEMORY_MIB]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
output=${1:?usage: capture-guest-ram.sh OUTPUT [MEMORY_MIB]}
memory_mib=${2:-256}
kit=$("$repo/scripts/guest-kit.sh")
work=$(mktemp -d "${TMPDIR:-/tmp}/deltavm-capture.XXXXXX")
qemu_pid=
cleanup() {
  [[ -n $qemu_pid ]] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# The initramfs: busybox and the project's /init.
mkdir -p "$work/initramfs"/{bin,dev,proc,sys}
cp "$kit/busybox" "$work/initramfs/bin/busybox"
cp "$repo/guest/init.sh" "$work/initramfs/init"
chmod +x "$work/initramfs/init"
(cd "$work/initramfs" && find . | sort | cpio -o -H newc --quiet --reproducible) > "$work/initramfs.cpio"

mkfifo "$work/monitor.in" "$work/monitor.out"
qemu-system-x86_64 -accel tcg -cpu max -m "${memory_mib}M" -smp 1 -nodefaults -nographic \
  -object "memory-backend-file,id=mem,size=${memory_mib}M,mem-path=$work/ram,share=on" \
  -machine pc,memory-backend=mem \
  -rtc base=2024-01-01T00:00:00,clock=vm \
  -kernel "$kit/vmlinuz" -initrd "$work/initramfs.cpio" \
  -append "console=ttyS0 nokaslr panic=-1 quiet" \
  -serial "file:$work/console.log" \
  -chardev "pipe,id=monitor,path=$work/monitor" -mon chardev=monitor,mode=readline \
  -no-reboot &
qemu_pid=$!
exec 3>"$work/monitor.in" 4<"$work/monitor.out"
cat <&4 >"$work/monitor.log" &

deadline=$((SECONDS + 120))
until grep -q DELTAVM-READY "$work/console.log" 2>/dev/null; do
  if ! kill -0 "$qemu_pid" 2>/dev/null; then
    echo "capture-guest-ram: QEMU exited before the guest was ready; console:" >&2
    cat "$work/console.log" >&2 || true
    exit 1
  fi
  if ((SECONDS > deadline)); then
    echo "capture-guest-ram: guest not ready after 120 s; console:" >&2
    tail -n 20 "$work/console.log" >&2 || true
    exit 1
  fi
  sleep 0.1
done
# Let the guest settle into its idle loop, then pause it: from here on the RAM file is frozen.
sleep 1
echo "stop" >&3
echo "info status" >&3
until grep -q "VM status: paused" "$work/monitor.log"; do sleep 0.05; done
cp "$work/ram" "$output.tmp"
mv "$output.tmp" "$output"
echo "quit" >&3
wait "$qemu_pid" 2>/dev/null || true
qemu_pid=
echo "$output"
