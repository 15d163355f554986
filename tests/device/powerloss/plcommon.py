"""What the two boots of the power-loss test share: where the replicas are,
where the cut phase leaves its report, and how to read the write-intent
bitmap from the replicas themselves.

The replicas are three whole virtio disks: scripts/test-device attaches
tests/device/logs/powerloss-r{0,1,2}.img with the serials powerloss-r0..2,
and the guest finds them by serial, whatever /dev/vdX each one became. They
live in host files, so they survive the reset (the guest's /dev/shm and
/tmp do not).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bootlib  # noqa: E402  (tests/device: what both two-boot tests share)
from bootlib import LOGS, qb, run  # noqa: E402,F401

CUT_REPORT = os.path.join(LOGS, "powerloss-cut.json")
DISKS = ["powerloss-r0", "powerloss-r1", "powerloss-r2"]     # serials
THRESHOLD = 2


def replica_paths():
    """/dev/vdX of each replica disk, in DISKS order."""
    disks = bootlib.disks_by_serial(DISKS)
    return [disks[d] for d in DISKS]


def dirty_regions(paths):
    """(region indexes dirty on any replica, region size, set uuid), read
    from the replicas' own metadata."""
    from quorumblk import meta

    dirty, shift, set_uuid = set(), None, None
    for p in paths:
        m, bitmap = meta.read(p)
        assert m is not None, f"{p} has no quorumblk metadata"
        shift, set_uuid = m.region_shift, meta.uuid_text(m.set_uuid)
        dirty |= {i for i in range(m.nregions) if bitmap[i // 8] & (1 << (i % 8))}
    return dirty, 1 << shift, set_uuid


def save_report(report):
    bootlib.save_report(CUT_REPORT, report)


def load_report():
    return bootlib.load_report(CUT_REPORT)
