#!/usr/bin/env bash
# bench/device.py's entry point inside the VM (bench/run-device-vm boots it
# with `vng --exec`) or on a host whose kernel has ublk: loads the modules,
# gives /dev/shm room for four images, runs the benchmark.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
echo "device-in-vm: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
for mod in ublk_drv loop raid1; do
	modprobe "$mod" 2>/dev/null || echo "device-in-vm: modprobe $mod failed"
done
mount -o remount,size=1400M /dev/shm 2>/dev/null || true
timeout "${QB_BENCH_TIMEOUT:-1500}" .venv/bin/python -m bench.device "$@"
rc=$?
echo "device-in-vm: exit $rc"
exit $rc
