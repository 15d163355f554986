"""What the tests that boot the VM twice share (tests/device/powerloss,
tests/device/twoboot): their disks, found by serial, the command, and boot
1's report, which must outlive the VM.

scripts/test-device (two_boot_test) attaches each test's disks as raw virtio
disks whose serials name them, boots the VM once for the first phase and
once for the check, and runs tests/device/two-boots.sh in each.
"""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOGS = os.path.join(ROOT, "tests", "device", "logs")
QB = os.path.join(ROOT, ".venv", "bin", "quorumblk")


def disks_by_serial(wanted):
    """{serial: /dev/vdX} of the attached disks; every serial in wanted must
    be there, whatever /dev/vdX each one became."""
    out = {}
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/serial") as f:
                out[f.read().strip()] = "/dev/" + name
        except OSError:
            continue
    missing = [d for d in wanted if d not in out]
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


def save_report(path, report):
    """Write boot 1's report so that it survives the VM, a reset included:
    fsync the file and its folder (the 9p share writes through to the
    host)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_report(path):
    with open(path) as f:
        return json.load(f)
