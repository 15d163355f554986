#!/usr/bin/env bash
# The device suite's entry point inside the VM (scripts/test-device boots it
# with `vng --exec`), or on a host whose kernel has ublk. Loads the modules
# the tests use, gives /dev/shm room for replica images, and runs pytest on
# tests/device with a timeout per test; exits with pytest's status.
# Extra arguments go to pytest (e.g. -k fio); `--args-file F` reads them
# NUL-separated from F instead (how scripts/test-device passes them).
set -u
if [ "${1:-}" = "--args-file" ]; then
	mapfile -d '' args < "$2"
	set -- "${args[@]}"
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
logs=tests/device/logs
mkdir -p "$logs"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

echo "run-in-vm: kernel $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
for mod in ublk_drv loop dm_mod dm_flakey raid1; do
	modprobe "$mod" 2>/dev/null || echo "run-in-vm: modprobe $mod failed"
done
# replica images live here (sparse); tmpfs defaults to half the RAM
mount -o remount,size=1400M /dev/shm 2>/dev/null || true
export QB_DEVICE_SUITE=1

# the power-loss test has boots of its own (tests/device/powerloss/in-vm.sh)
timeout "${QB_DEVICE_SUITE_TIMEOUT:-2700}" .venv/bin/python -m pytest tests/device \
	--ignore=tests/device/powerloss --ignore=tests/device/twoboot -v -p no:cacheprovider --timeout=600 -o junit_family=xunit2 \
	--junitxml="$logs/device.xml" "$@"
rc=$?
echo "run-in-vm: pytest exit $rc"
exit $rc
