"""What the two boots of the two-boot test share (tests/device/twoboot).

scripts/test-device attaches four disks, found here by their serials:
twoboot-r0..2 (the replicas) and twoboot-etc (a small disk whose ext4 holds
the configuration, as a machine's /etc would: the VM's root is the host's,
whose /etc the test must not touch). Boot 2 attaches them in the reverse
order, so that the replicas come back under other /dev/vdX names: assemble
must find them by their metadata. The boots' disks live in host files, so
they survive; boot 1's report goes to tests/device/logs/twoboot-save.json.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bootlib  # noqa: E402  (tests/device: what both two-boot tests share)
from bootlib import LOGS, qb, run  # noqa: E402,F401

REPORT = os.path.join(LOGS, "twoboot-save.json")
DISKS = ["twoboot-r0", "twoboot-r1", "twoboot-r2"]      # serials
ETC_DISK = "twoboot-etc"
ETC = "/tmp/qb-twoboot-etc"         # where the etc disk is mounted
CONF = os.path.join(ETC, "quorumblk")
MNT = "/tmp/qb-twoboot-fs"          # the device's file system
NAME = "tb0"
THRESHOLD = 2


def by_serial():
    return bootlib.disks_by_serial(DISKS + [ETC_DISK])


def sha256_files(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name == "lost+found":
            continue
        out[name] = run(["sha256sum", os.path.join(directory, name)]).split()[0]
    return out


def save_report(report):
    bootlib.save_report(REPORT, report)
