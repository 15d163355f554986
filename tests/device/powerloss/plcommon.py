"""What the two boots of the power-loss test share: where the replicas are,
where the cut phase leaves its report, and how to read the write-intent
bitmap from the replicas themselves.

The replicas are three whole virtio disks: scripts/test-device attaches
tests/device/logs/powerloss-r{0,1,2}.img with the serials powerloss-r0..2,
and the guest finds them by serial, whatever /dev/vdX each one became. They
live in host files, so they survive the reset (the guest's /dev/shm and
/tmp do not).
"""
import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
LOGS = os.path.join(ROOT, "tests", "device", "logs")
CUT_REPORT = os.path.join(LOGS, "powerloss-cut.json")
QB = os.path.join(ROOT, ".venv", "bin", "quorumblk")
DISKS = ["powerloss-r0", "powerloss-r1", "powerloss-r2"]     # serials
THRESHOLD = 2


def replica_paths():
    """/dev/vdX of each replica disk, in DISKS order."""
    by_serial = {}
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/serial") as f:
                by_serial[f.read().strip()] = "/dev/" + name
        except OSError:
            continue
    missing = [d for d in DISKS if d not in by_serial]
    if missing:
        raise AssertionError(
            f"no disk with serial {', '.join(missing)} (scripts/test-device "
            f"attaches them); disks seen: {by_serial}")
    return [by_serial[d] for d in DISKS]


def qb(*args, timeout=120):
    return subprocess.run([QB] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout)


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
    """Write the cut report so that it survives the reset: fsync the file
    and its folder (the 9p share writes through to the host)."""
    tmp = CUT_REPORT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, CUT_REPORT)
    fd = os.open(LOGS, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_report():
    with open(CUT_REPORT) as f:
        return json.load(f)
