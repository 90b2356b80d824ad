#!/bin/busybox sh
# /init of every deltavm guest: mounts the basics, starts the command agent on ttyS1, runs the
# template's setup commands, announces readiness on the console (ttyS0) and keeps a shell there.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname deltavm
ip link set lo up
/bin/deltavm-agent /dev/ttyS1 &
while [ ! -e /run/deltavm-agent.ready ]; do usleep 10000; done
if [ -f /etc/deltavm/setup.sh ]; then
  if ! sh -e /etc/deltavm/setup.sh; then
    echo "DELTAVM-SETUP-FAILED"
    exec sh
  fi
fi
echo "DELTAVM-READY"
while true; do setsid cttyhack sh -l; done
