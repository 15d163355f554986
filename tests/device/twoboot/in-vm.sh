#!/usr/bin/env bash
# The two-boot test's entry point inside the VM, one phase per boot
# (scripts/test-device boots twice with the four disks attached, the second
# time in the reverse order):
#   in-vm.sh save    boot 1: add --save, ext4 and data, a clean stop (save.py)
#   in-vm.sh check   boot 2: assemble from the configuration alone, the data,
#                    a missing member (pytest on test_twoboot.py ->
#                    logs/twoboot.xml)
# Only for a throwaway VM: it makes file systems on the disks it finds.
set -u
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
here=tests/device/twoboot
logs=tests/device/logs
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

echo "twoboot-$1: kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime) s"
modprobe ublk_drv || echo "twoboot-$1: modprobe ublk_drv failed"
case "$1" in
save)
	cd "$here" && timeout 400 "$root/.venv/bin/python" save.py
	rc=$?
	;;
check)
	# inside the VM a missing ublk fails the test (conftest.py)
	export QB_DEVICE_SUITE=1
	timeout 500 .venv/bin/python -m pytest "$here" -v -s -p no:cacheprovider \
		-p no:hypothesispytest \
		--timeout=400 -o junit_family=xunit2 --junitxml="$logs/twoboot.xml"
	rc=$?
	;;
*)
	echo "usage: in-vm.sh save|check" >&2
	exit 2
	;;
esac
echo "twoboot-$1: exit $rc"
exit $rc
