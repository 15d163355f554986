"""Power-loss test, boot 1 ("cut"): a quorumblk device over the three
replica disks, ext4 on it, writes going on, then a reset of the VM without
any sync (sysrq b; vng runs QEMU with -no-reboot, so QEMU exits).

Before the reset it writes tests/device/logs/powerloss-cut.json: "ok" and
what it did, or the error that stopped it. The check (boot 2,
test_powerloss.py) reads it first, so a failure here shows in powerloss.xml.
Run by in-vm.sh inside the VM; it must never run on a real machine.
"""
import json
import os
import subprocess
import sys
import time
import traceback

from plcommon import THRESHOLD, dirty_regions, qb, replica_paths, save_report

MNT = "/tmp/qb-powerloss"        # the guest's tmpfs: only the mount point
WRITE_S = 8                      # writes run this long before the reset
                                 # (> the 5 s after which idle regions go
                                 # clean, so mkfs's regions are clean again)

FIO = ["fio", f"--directory={MNT}", "--time_based", "--runtime=600",
       # random O_DIRECT writes: always some in flight at the device
       "--name=direct", "--rw=randwrite", "--bs=4k", "--size=16M",
       "--direct=1", "--ioengine=libaio", "--iodepth=8",
       # buffered rewrites with fsync: page cache, journal commits, flushes
       "--name=fsync", "--rw=write", "--bs=64k", "--size=8M", "--fsync=8",
       "--ioengine=psync"]


def run(cmd, timeout=120):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: "
                           f"{p.stderr.strip()[-2000:]}")
    return p.stdout


def status(dev_id):
    p = qb("status", "--json", dev_id)
    if p.returncode != 0:
        raise RuntimeError(f"quorumblk status exited {p.returncode}: {p.stderr}")
    return json.loads(p.stdout)


def wait_writes(dev_id, more_than, timeout=60):
    """The device's write count once it is above more_than."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        writes = status(dev_id)["counters"]["writes"]
        if writes > more_than:
            return writes
        time.sleep(0.5)
    raise RuntimeError(f"no writes reached the device in {timeout} s "
                       f"(still {more_than})")


def cut(report):
    paths = replica_paths()
    report["replicas"] = paths
    p = qb("add", "--json", "-t", THRESHOLD, *paths)
    if p.returncode != 0:
        raise RuntimeError(f"quorumblk add exited {p.returncode}: {p.stderr}")
    info = json.loads(p.stdout)
    dev = info["path"]
    report["device"] = dev
    report["size"] = status(info["id"])["size"]
    report["set_uuid"] = dirty_regions(paths)[2]

    run(["mkfs.ext4", "-q", "-F", "-E",
         "nodiscard,lazy_itable_init=0,lazy_journal_init=1", dev], timeout=300)
    os.makedirs(MNT, exist_ok=True)
    run(["mount", dev, MNT])
    before = status(info["id"])["counters"]["writes"]
    fio = subprocess.Popen(FIO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, cwd="/tmp")
    first = wait_writes(info["id"], before)
    time.sleep(WRITE_S)
    # writes must still be going on at the moment of the reset
    last = wait_writes(info["id"], status(info["id"])["counters"]["writes"],
                       timeout=10)
    if fio.poll() is not None:
        raise RuntimeError(f"fio exited {fio.returncode} before the reset: "
                           f"{fio.stderr.read()[-2000:]}")
    st = status(info["id"])
    dirty, region, _ = dirty_regions(paths)
    report.update({
        "writes_before_fio": before, "writes_at_fio_start": first,
        "writes_at_reset": last, "write_bytes_at_reset": st["counters"]["write_bytes"],
        "dirty_regions_at_reset": len(dirty), "region_bytes": region,
        "ok": True, "reset": time.time()})


def main():
    report = {"phase": "cut", "ok": False, "started": time.time()}
    try:
        cut(report)
    except Exception:
        report["error"] = traceback.format_exc()
        save_report(report)
        print(f"powerloss-cut: failed:\n{report['error']}", flush=True)
        return 1
    save_report(report)
    print(f"powerloss-cut: {report['writes_at_reset']} writes "
          f"({report['write_bytes_at_reset']} bytes), "
          f"{report['dirty_regions_at_reset']} dirty regions of "
          f"{report['region_bytes']} bytes; resetting without sync", flush=True)
    with open("/proc/sys/kernel/sysrq", "w") as f:
        f.write("1\n")
    with open("/proc/sysrq-trigger", "w") as f:
        f.write("b")
    time.sleep(60)
    report.update(ok=False, error="echo b > /proc/sysrq-trigger did not reset the VM")
    save_report(report)
    print(f"powerloss-cut: {report['error']}", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
