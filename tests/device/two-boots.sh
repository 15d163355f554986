#!/usr/bin/env bash
# The entry point inside the VM of the tests that boot twice, one phase per
# boot (scripts/test-device's two_boot_test attaches their disks):
#   two-boots.sh powerloss cut     boot 1: device, ext4, writes, then a reset
#                                  (powerloss/cut.py)
#   two-boots.sh twoboot save      boot 1: add --save, ext4 and data, a clean
#                                  stop (twoboot/save.py)
#   two-boots.sh TEST check        boot 2: pytest on TEST/ -> logs/TEST.xml
# Only for a throwaway VM: it makes file systems on the disks it finds, and
# the power-loss cut resets the machine it runs on.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
test=${1:-} phase=${2:-}
here=tests/device/$test
logs=tests/device/logs
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

case "$test/$phase" in
powerloss/cut) first=cut.py ;;
twoboot/save) first=save.py ;;
powerloss/check | twoboot/check) first= ;;
*)
	echo "usage: two-boots.sh powerloss cut|check, or twoboot save|check" >&2
	exit 2
	;;
esac
echo "$test-$phase: kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime) s"
for mod in ublk_drv dm_mod; do
	modprobe "$mod" || echo "$test-$phase: modprobe $mod failed"
done
if [ -n "$first" ]; then
	cd "$here" && timeout 400 "$root/.venv/bin/python" "$first"
	rc=$?
else
	# inside the VM a missing ublk fails the test (conftest.py)
	export QB_DEVICE_SUITE=1
	timeout 500 .venv/bin/python -m pytest "$here" -v -s -p no:cacheprovider \
		-p no:hypothesispytest \
		--timeout=400 -o junit_family=xunit2 --junitxml="$logs/$test.xml"
	rc=$?
fi
echo "$test-$phase: exit $rc"
exit $rc
