#!/bin/busybox sh
# /init of the benchmark guest: mounts the basics, announces readiness on the console, idles.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "DELTAVM-READY"
while true; do sleep 3600; done
