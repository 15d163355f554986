"""Power-loss test, boot 1 ("cut"): a quorumblk device over the three
replica disks, ext4 on it, writes going on, then a reset of the VM without
any sync (sysrq b; vng runs QEMU with -no-reboot, so QEMU exits).

QEMU completes every write the guest has handed to a disk before it exits,
so a reset alone would leave the three replicas identical almost always and
the resync with nothing to repair. The third replica is therefore reached
through dm-delay (writes and flushes held DELAY_MS in the guest) while fio
runs: the writes it holds at the reset are lost, as on a slow replica that
loses power, and boot 2 must find and repair exactly those blocks. Boot 2
uses the disks directly (quorumblk knows its replicas by their metadata).

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
SLOW = "qb-powerloss-slow"       # dm-delay over the third replica
DELAY_MS = 300
WRITE_S = 7                      # writes run this long before the reset
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


def delay_table(disk, ms):
    sectors = run(["blockdev", "--getsz", disk]).strip()
    return f"0 {sectors} delay {disk} 0 0 {disk} 0 {ms}"


def writes_done(dev):
    """Writes the kernel has completed on dev (its /sys/block stat)."""
    with open(f"/sys/block/{os.path.basename(dev)}/stat") as f:
        return int(f.read().split()[4])


def wait_writes(dev, more_than, timeout=60):
    """dev's completed writes once they are above more_than."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        writes = writes_done(dev)
        if writes > more_than:
            return writes
        time.sleep(0.2)
    raise RuntimeError(f"no writes completed on {dev} in {timeout} s")


def cut(report):
    t0 = time.monotonic()
    times = report["seconds"] = {}

    def step(name):
        times[name] = round(time.monotonic() - t0, 1)

    disks = replica_paths()
    run(["dmsetup", "create", SLOW, "--table", delay_table(disks[2], 0)])
    paths = disks[:2] + [f"/dev/mapper/{SLOW}"]
    report["replicas"] = paths
    p = qb("add", "--json", "-t", THRESHOLD, *paths)
    if p.returncode != 0:
        raise RuntimeError(f"quorumblk add exited {p.returncode}: {p.stderr}")
    dev = report["device"] = json.loads(p.stdout)["path"]
    with open(f"/sys/block/{os.path.basename(dev)}/size") as f:
        report["size"] = int(f.read()) * 512
    report["set_uuid"] = dirty_regions(paths)[2]
    step("add")

    run(["mkfs.ext4", "-q", "-F", "-E",
         "nodiscard,lazy_itable_init=0,lazy_journal_init=1", dev], timeout=300)
    os.makedirs(MNT, exist_ok=True)
    run(["mount", dev, MNT])
    step("mkfs_mount")
    run(["dmsetup", "load", SLOW, "--table", delay_table(disks[2], DELAY_MS)])
    run(["dmsetup", "suspend", SLOW])
    run(["dmsetup", "resume", SLOW])

    before = writes_done(dev)
    fio = subprocess.Popen(FIO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, cwd="/tmp")
    first = wait_writes(dev, before)
    step("fio_started")
    time.sleep(WRITE_S)
    # writes must still be going on at the moment of the reset
    last = wait_writes(dev, writes_done(dev), timeout=10)
    if fio.poll() is not None:
        raise RuntimeError(f"fio exited {fio.returncode} before the reset: "
                           f"{fio.stderr.read()[-2000:]}")
    with open(f"/sys/block/{os.path.basename(dev)}/inflight") as f:
        inflight = int(f.read().split()[1])
    dirty, region, _ = dirty_regions(paths)
    step("reset")
    report.update({
        "writes_before_fio": before, "writes_at_fio_start": first,
        "writes_at_reset": last, "writes_in_flight_at_reset": inflight,
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
    print(f"powerloss-cut: {report['writes_at_reset']} writes done, "
          f"{report['writes_in_flight_at_reset']} in flight, "
          f"{report['dirty_regions_at_reset']} dirty regions of "
          f"{report['region_bytes']} bytes; seconds: {report['seconds']}; "
          "resetting without sync", flush=True)
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
