"""Power-loss test, boot 2 ("check"): the VM was reset during writes (boot 1,
cut.py), with the third replica's last writes held back and lost;
`quorumblk add` of the same replicas must resync exactly the regions the
write-intent bitmap holds dirty (far less than the device) and repair the
third replica's blocks there, e2fsck must find the file system clean, and
the replicas' data areas must be byte-identical.

Runs only in the second boot of scripts/test-device (in-vm.sh check).
Elsewhere it is skipped with the reason (conftest.py; QB_POWERLOSS_SKIP
where the host's own kernel has ublk and a reset would take the host down).
"""
import json
import os
import re
import subprocess
import time

import pytest

from plcommon import (CUT_REPORT, THRESHOLD, dirty_regions, load_report, qb,
                      replica_paths)

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(bool(os.environ.get("QB_POWERLOSS_SKIP")),
                       reason=os.environ.get("QB_POWERLOSS_SKIP", "")),
]

MNT = "/tmp/qb-powerloss"
WARNING = re.compile(r"quorumblk: warning: resynced (\d+) bytes \((\d+) regions, "
                     r"([\d.]+)% of (\d+)\) after an unclean stop")


def run(cmd, timeout=300):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (f"{' '.join(cmd)} exited {p.returncode}\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def cut_report():
    if not os.path.exists(CUT_REPORT):
        pytest.fail(f"the cut phase (boot 1) left no {CUT_REPORT}: "
                    "see tests/device/logs/vm-powerloss-cut.log")
    return load_report()


def test_cut_reset_the_vm_during_writes(record_testsuite_property):
    r = cut_report()
    assert r["ok"], f"the cut phase failed:\n{r.get('error')}"
    assert r["writes_at_reset"] > r["writes_at_fio_start"] > r["writes_before_fio"]
    record_testsuite_property("cut_writes_at_reset", r["writes_at_reset"])
    record_testsuite_property("cut_dirty_regions_at_reset", r["dirty_regions_at_reset"])
    print(f"\ncut: {r['writes_at_reset']} writes done on {r['device']}, "
          f"{r['writes_in_flight_at_reset']} in flight, "
          f"{r['dirty_regions_at_reset']} regions dirty at the reset; "
          f"seconds into the cut: {r['seconds']}")


def test_add_resyncs_only_the_dirty_regions(record_testsuite_property):
    t0 = time.monotonic()
    cut = cut_report()
    assert cut["ok"], "the cut phase failed: see test_cut_reset_the_vm_during_writes"
    paths = replica_paths()
    dirty, region, set_uuid = dirty_regions(paths)
    assert set_uuid == cut["set_uuid"], "these are not the replicas of the cut"
    assert dirty, "no region is dirty after a reset during writes"

    p = qb("add", "--json", "-t", THRESHOLD, *paths, timeout=300)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    dev = info["path"]
    try:
        st = json.loads(qb("status", "--json", info["id"]).stdout)
        rs = st["resync"]
        size = st["size"]
        print(f"\nadd: {p.stderr.strip()}\nresync: {json.dumps(rs)}")
        for key in ("bytes", "size", "regions", "differing_blocks", "copied_blocks"):
            record_testsuite_property(f"resync_{key}", rs[key])

        # exactly the dirty regions, each clipped to the device's end
        expect = sum(min((i + 1) * region, size) - i * region for i in dirty)
        assert rs["reason"] == "unclean-stop"
        assert rs["size"] == size == cut["size"]
        assert rs["regions"] == len(dirty)
        assert rs["bytes"] == expect
        assert 0 < rs["bytes"] <= size // 4, "the resync is not bounded to dirty regions"
        assert rs["unrecoverable_blocks"] == 0
        # the third replica lost the writes dm-delay held at the reset
        assert rs["differing_blocks"][2] > 0, "the resync found nothing to repair"
        assert rs["copied_blocks"] >= rs["differing_blocks"][2]
        m = WARNING.search(p.stderr)
        assert m, f"no resync warning from add: {p.stderr!r}"
        assert (int(m[1]), int(m[2]), int(m[4])) == (rs["bytes"], rs["regions"], size)
        print(f"resynced {rs['bytes']} of {size} bytes ({100 * rs['bytes'] / size:.2f}%), "
              f"{rs['regions']} regions; differing blocks per replica "
              f"{rs['differing_blocks']}, copied {rs['copied_blocks']} "
              f"({time.monotonic() - t0:.0f} s)")

        # the journal replays on mount, as after any power loss; then the
        # file system must be clean
        os.makedirs(MNT, exist_ok=True)
        run(["mount", dev, MNT])
        run(["umount", MNT])
        fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True,
                              text=True, timeout=300)
        assert fsck.returncode == 0, f"e2fsck -fn: {fsck.stdout}{fsck.stderr}"
        print(f"e2fsck -fn clean ({time.monotonic() - t0:.0f} s)")
    finally:
        subprocess.run(["umount", MNT], capture_output=True, timeout=60)
        d = qb("del", info["id"], timeout=180)
    assert d.returncode == 0, d.stderr

    # the data areas (each replica's tail holds its own header)
    for path in paths:
        run(["blockdev", "--flushbufs", path])
    for other in paths[1:]:
        run(["cmp", "-n", str(size), paths[0], other])
    print(f"data areas identical ({time.monotonic() - t0:.0f} s)")
