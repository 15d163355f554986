#!/usr/bin/env bash
# The power-loss test's entry point inside the VM, one phase per boot
# (scripts/test-device boots twice, with the three replica disks attached):
#   in-vm.sh cut     boot 1: device, ext4, writes, then reset (cut.py)
#   in-vm.sh check   boot 2: add again, check the resync, e2fsck, cmp
#                    (pytest on test_powerloss.py -> logs/powerloss.xml)
# Only for a throwaway VM: the cut resets the machine it runs on.
set -u
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
here=tests/device/powerloss
logs=tests/device/logs
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

echo "powerloss-$1: kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime) s"
for mod in ublk_drv dm_mod; do
	modprobe "$mod" || echo "powerloss-$1: modprobe $mod failed"
done
case "$1" in
cut)
	cd "$here" && timeout 300 "$root/.venv/bin/python" cut.py
	rc=$?
	;;
check)
	# inside the VM a missing ublk fails the test (conftest.py)
	export QB_DEVICE_SUITE=1
	timeout 400 .venv/bin/python -m pytest "$here" -v -s -p no:cacheprovider \
		-p no:hypothesispytest \
		--timeout=300 -o junit_family=xunit2 --junitxml="$logs/powerloss.xml"
	rc=$?
	;;
*)
	echo "usage: in-vm.sh cut|check" >&2
	exit 2
	;;
esac
echo "powerloss-$1: exit $rc"
exit $rc
