"""What the two boots of the two-boot test share (tests/device/twoboot).

scripts/test-device attaches four disks, found here by their serials:
twoboot-r0..2 (the replicas) and twoboot-etc (a small disk whose ext4 holds
the configuration, as a machine's /etc would: the VM's root is the host's,
whose /etc the test must not touch). Boot 2 attaches them in the reverse
order, so that the replicas come back under other /dev/vdX names: assemble
must find them by their metadata. The boots' disks live in host files, so
they survive; boot 1's report goes to tests/device/logs/twoboot-save.json.
"""
import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
LOGS = os.path.join(ROOT, "tests", "device", "logs")
REPORT = os.path.join(LOGS, "twoboot-save.json")
QB = os.path.join(ROOT, ".venv", "bin", "quorumblk")
DISKS = ["twoboot-r0", "twoboot-r1", "twoboot-r2"]      # serials
ETC_DISK = "twoboot-etc"
ETC = "/tmp/qb-twoboot-etc"         # where the etc disk is mounted
CONF = os.path.join(ETC, "quorumblk")
MNT = "/tmp/qb-twoboot-fs"          # the device's file system
NAME = "tb0"
THRESHOLD = 2


def by_serial():
    out = {}
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/serial") as f:
                out[f.read().strip()] = "/dev/" + name
        except OSError:
            continue
    missing = [d for d in DISKS + [ETC_DISK] if d not in out]
    if missing:
        raise AssertionError(f"no disk with serial {', '.join(missing)} (scripts/"
                             f"test-device attaches them); disks seen: {out}")
    return out


def qb(*args, timeout=300):
    return subprocess.run([QB] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout)


def run(cmd, timeout=300):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def sha256_files(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name == "lost+found":
            continue
        out[name] = run(["sha256sum", os.path.join(directory, name)]).split()[0]
    return out


def save_report(report):
    """Write boot 1's report so that it survives the VM (fsync, then the
    folder: the 9p share writes through to the host)."""
    tmp = REPORT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, REPORT)
    fd = os.open(LOGS, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
