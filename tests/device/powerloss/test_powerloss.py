"""Power-loss test, boot 2 ("check"): the VM was reset during writes (boot 1,
cut.py), with the third replica's last writes held back and lost. First the
premise, as the cut saw and reported it: writes were held for the third
replica and it lacked blocks that the other two held. Then `quorumblk add`
of the same replicas must resync exactly the regions the write-intent
bitmap holds dirty (far less than the device) and repair every block the
third replica lacked, e2fsck must find the file system clean, and the
replicas' data areas must be byte-identical.

Runs only in the second boot of scripts/test-device (two-boots.sh TEST check).
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
WARNING = re.compile(r"quorumblk: warning: a resync of (\d+) bytes \((\d+) regions, "
                     r"([\d.]+)% of (\d+)\) after an unclean stop runs while the "
                     r"device serves")


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


def premise_failure(r):
    """Why the cut's report does not let the check run, or None."""
    p = r.get("premise") or {}
    if p and not p.get("met"):
        return ("the test's premise was not met, so the cut did not reset "
                f"and this run proves nothing:\n{r.get('error')}\n"
                f"evidence: {json.dumps(p)}")
    if not r.get("ok"):
        return f"the cut phase (boot 1) failed:\n{r.get('error')}"
    return None


def test_cut_reset_while_the_third_replica_held_writes(record_testsuite_property):
    r = cut_report()
    why = premise_failure(r)
    assert why is None, why
    p = r["premise"]
    print(f"\ncut: {r['writes_at_hold']} writes done on {r['device']} when the "
          f"third replica's I/O was held; premise: {json.dumps(p)}; "
          f"{r['dirty_regions_at_reset']} regions dirty at the reset; "
          f"seconds into the cut: {r['seconds']}")
    for key in ("held_writes", "blocks_lacking_on_third", "seconds_hold_to_reset"):
        record_testsuite_property(f"cut_{key}", p[key])
    record_testsuite_property("cut_writes_since_hold_began", p["writes_since_hold_began"])
    record_testsuite_property("cut_dirty_regions_at_reset", r["dirty_regions_at_reset"])
    # the premise, restated: the cut resets only when all of it holds
    assert r["writes_at_hold"] > r["writes_at_fio_start"] > r["writes_before_fio"]
    assert p["met"] and p["settled"]
    assert p["held_writes"] > 0, "no write was held for the third replica"
    assert p["third_disk_writes_after_hold"] == 0, "the hold let writes through"
    assert p["blocks_lacking_on_third"] > 0, \
        "the third replica lacked no block that replicas 0 and 1 held"
    assert p["seconds_hold_to_reset"] < p["replica_timeout_s"]


def test_add_resyncs_only_the_dirty_regions(record_testsuite_property):
    t0 = time.monotonic()
    cut = cut_report()
    assert premise_failure(cut) is None, \
        "no valid cut: see test_cut_reset_while_the_third_replica_held_writes"
    paths = replica_paths()
    dirty, region, set_uuid = dirty_regions(paths)
    assert set_uuid == cut["set_uuid"], "these are not the replicas of the cut"
    assert dirty, "no region is dirty after a reset during writes"

    p = qb("add", "--json", "-t", THRESHOLD, *paths, timeout=300)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    dev = info["path"]
    try:
        # the device is LIVE before its resync ends: it runs as a job
        end = time.monotonic() + 240
        while True:
            st = json.loads(qb("status", "--json", info["id"]).stdout)
            if st["job"]["state"] != "running":
                break
            assert time.monotonic() < end, f"the resync did not end: {st['job']}"
            time.sleep(0.5)
        assert st["job"]["kind"] == "resync" and st["job"]["state"] == "done", st["job"]
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
        # the third replica lost the writes held for it at the reset: every
        # block it lacked then (by the cut's own reading) loses the vote now
        # (or before it, if a read of the new device met them first: reads
        # of regions not resynced yet repair by the same rule; the replica's
        # bad_blocks counter holds both)
        lacked = cut["premise"]["blocks_lacking_on_third"]
        lost = st["replicas"][2]["bad_blocks"]
        assert lost >= rs["differing_blocks"][2] and lost >= lacked > 0, (
            f"the third replica lacked {lacked} blocks at the cut; the resync "
            f"repaired {rs['differing_blocks'][2]} of its blocks, {lost} in all")
        assert rs["copied_blocks"] >= rs["differing_blocks"][2]
        m = WARNING.search(p.stderr)
        assert m, f"no resync warning from add: {p.stderr!r}"
        assert (int(m[1]), int(m[2]), int(m[4])) == (rs["bytes"], rs["regions"], size)
        print(f"resynced {rs['bytes']} of {size} bytes ({100 * rs['bytes'] / size:.2f}%), "
              f"{rs['regions']} regions; differing blocks per replica "
              f"{rs['differing_blocks']} (the third lacked {lacked} at the "
              f"cut), copied {rs['copied_blocks']} "
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
