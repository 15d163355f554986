"""Power-loss test, boot 1 ("cut"): a quorumblk device over the three
replica disks, ext4 on it, writes going on, then a reset of the VM without
any sync (sysrq b; vng runs QEMU with -no-reboot, so QEMU exits).

The premise of the test is that the third replica loses writes at the
reset which the other two have, so that boot 2 has blocks to repair. QEMU
completes every write the guest has handed to a disk before it exits, so a
reset alone would almost never lose anything. The cut therefore makes the
premise certain, and checks it before it resets:

- The third replica is reached through two dm-linear devices, HELD over
  HOLD over its disk. Near the end of the writes HOLD is suspended
  (--noflush --nolockfs): from then on its I/O waits in the guest, as a hung
  server's does. Nothing fails, so quorumblk keeps the replica in service
  (the cut gives it a replica timeout of REPLICA_TIMEOUT_S) and every write
  waits for it, done on replicas 0 and 1 but not on the third. HELD counts
  the held writes as in flight (a suspended dm device queues I/O before it
  counts it, so HOLD itself shows none).
- Once replicas 0 and 1 are quiet (no write in flight, no new one), the cut
  compares the three disks where the write-intent bitmap of replicas 0 and
  1 is dirty: blocks where those two agree and the third differs are writes
  the third replica lacks and, held, will lose at the reset.
- The premise is met when writes are held for the third replica, its disk
  got none since the hold, replicas 0 and 1 are quiet, the third replica
  lacks blocks they hold, and the replica timeout is far away. A hold that
  does not meet it (say, it met the device between writes) is let go, the
  writes go on, and the cut holds again, HOLDS times at most; then it
  resumes HOLD and stops without a reset.

It writes tests/device/logs/powerloss-cut.json before the reset: "ok", the
evidence ("premise"), or the error that stopped it. The check (boot 2,
test_powerloss.py) asserts on it first, so a failure here shows in
powerloss.xml, named. Boot 2 uses the disks directly (quorumblk knows its
replicas by their metadata). Run by tests/device/two-boots.sh inside the
VM; it must never run on a real machine.
"""
import json
import mmap
import os
import subprocess
import sys
import time
import traceback

from plcommon import THRESHOLD, dirty_regions, qb, replica_paths, run, save_report

MNT = "/tmp/qb-powerloss"        # the guest's tmpfs: only the mount point
HOLD = "qb-powerloss-hold"       # dm-linear over the third disk: suspended
HELD = "qb-powerloss-r2"         # dm-linear over HOLD: the third replica
WRITE_S = 7                      # writes run this long before the hold
                                 # (> the 5 s after which idle regions go
                                 # clean, so mkfs's regions are clean again)
REPLICA_TIMEOUT_S = 120          # quorumblk's replica timeout in the cut:
RESET_BY_S = 40                  # the reset must come this soon after the
                                 # hold, long before the third replica
                                 # would be timed out (and marked failed)
SETTLE_BY_S = 20                 # replicas 0 and 1 must be quiet by then
HOLDS = 3                        # holds tried before the cut gives up
BLOCK = 4096                     # quorumblk's vote block

FIO = ["fio", f"--directory={MNT}", "--time_based", "--runtime=600",
       # random O_DIRECT writes: always some in flight at the device
       "--name=direct", "--rw=randwrite", "--bs=4k", "--size=16M",
       "--direct=1", "--ioengine=libaio", "--iodepth=8",
       # buffered rewrites with fsync: page cache, journal commits, flushes
       "--name=fsync", "--rw=write", "--bs=64k", "--size=8M", "--fsync=8",
       "--ioengine=psync"]


class PremiseError(Exception):
    """The cut cannot make the third replica lose writes: no reset."""


def linear(name, under):
    sectors = run(["blockdev", "--getsz", under]).strip()
    run(["dmsetup", "create", name, "--table", f"0 {sectors} linear {under} 0"])
    return f"/dev/mapper/{name}"


def stat(dev):
    """dev's writes completed and writes in flight, from /sys/block."""
    sys_dir = f"/sys/block/{os.path.basename(os.path.realpath(dev))}"
    with open(f"{sys_dir}/stat") as f:
        writes = int(f.read().split()[4])
    with open(f"{sys_dir}/inflight") as f:
        writes_out = int(f.read().split()[1])
    return {"writes": writes, "writes_out": writes_out}


def wait_writes(dev, more_than, timeout=60):
    """dev's completed writes once they are above more_than."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        writes = stat(dev)["writes"]
        if writes > more_than:
            return writes
        time.sleep(0.2)
    raise RuntimeError(f"no writes completed on {dev} in {timeout} s")


def settle(devs, by):
    """Sample the stats of devs every half second until two samples in a
    row are equal and no write is in flight on devs[0] and devs[1] (the
    replicas that are not held), or until the monotonic time `by`. Returns
    (the last samples, settled)."""
    last = None
    while True:
        now = [stat(d) for d in devs]
        quiet = now[0]["writes_out"] == 0 and now[1]["writes_out"] == 0
        if quiet and now == last:
            return now, True
        if time.monotonic() > by:
            return now, False
        last = now
        time.sleep(0.5)


def read_full(fd, buf, n, off):
    view = memoryview(buf)
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:n]], off + done)
        if got <= 0:
            raise RuntimeError(f"short read at {off + done}")
        done += got


def compare(disks, regions, region, size):
    """Read the given regions of the three disks (O_DIRECT: what the disks
    hold, not the page cache) and count the 4 KiB blocks where replicas 0
    and 1 agree and the third differs (writes it lacks), and those where 0
    and 1 differ."""
    fds = [os.open(d, os.O_RDONLY | os.O_DIRECT) for d in disks]
    bufs = [mmap.mmap(-1, region) for _ in disks]      # page aligned
    lacking = differ01 = 0
    try:
        for i in sorted(regions):
            off = i * region
            n = min(region, size - off)
            for fd, buf in zip(fds, bufs):
                read_full(fd, buf, n, off)
            a, b, c = bufs
            if a[:n] == b[:n] == c[:n]:
                continue
            for o in range(0, n, BLOCK):
                x, y, z = a[o:o + BLOCK], b[o:o + BLOCK], c[o:o + BLOCK]
                if x != y:
                    differ01 += 1
                elif x != z:
                    lacking += 1
    finally:
        for fd in fds:
            os.close(fd)
    return lacking, differ01


def hold(report, disks, dev):
    """Suspend HOLD while writes go on, and gather the evidence that the
    third replica will lose writes at the reset. Returns (the evidence,
    the list of what does not hold: empty when the premise is met). HOLD
    stays suspended."""
    p = {"replica_timeout_s": REPLICA_TIMEOUT_S}
    watched = [disks[0], disks[1], f"/dev/mapper/{HELD}", disks[2], dev]
    before = [stat(d) for d in watched]
    run(["dmsetup", "suspend", "--noflush", "--nolockfs", HOLD])
    t_hold = time.monotonic()
    # what the third disk had in flight completed during the suspend
    third = stat(disks[2])["writes"]
    now, settled = settle(watched, t_hold + SETTLE_BY_S)
    p["seconds_to_settle"] = round(time.monotonic() - t_hold, 1)
    p["settled"] = settled
    p["writes_since_hold_began"] = [now[i]["writes"] - before[i]["writes"] for i in (0, 1)]
    p["held_writes"] = now[2]["writes_out"]
    p["third_disk_writes_after_hold"] = now[3]["writes"] - third
    p["device_writes_waiting"] = now[4]["writes_out"]

    why = []
    if not settled:
        why.append(f"replicas 0 and 1 did not go quiet within {SETTLE_BY_S} s "
                   "of the hold (writes did not wait for the third replica)")
    if p["held_writes"] <= 0:
        why.append("no write is held for the third replica")
    if p["third_disk_writes_after_hold"]:
        why.append("the third disk received writes after the hold")
    if why:
        return p, why

    # the data areas, where the bitmaps of replicas 0 and 1 say they may
    # differ (the third one's bitmap may be behind)
    for d in disks:
        run(["blockdev", "--flushbufs", d])
    dirty, region, _ = dirty_regions(disks[:2])
    report.update({"dirty_regions_at_reset": len(dirty), "region_bytes": region})
    p["blocks_lacking_on_third"], p["blocks_differing_0_1"] = compare(
        disks, dirty, region, report["size"])
    p["seconds_hold_to_reset"] = round(time.monotonic() - t_hold, 1)
    if p["blocks_lacking_on_third"] <= 0:
        why.append("the third replica lacks no block that replicas 0 and 1 hold")
    if p["seconds_hold_to_reset"] > RESET_BY_S:
        why.append(f"{p['seconds_hold_to_reset']} s from the hold to the reset "
                   f"(more than {RESET_BY_S} s of the {REPLICA_TIMEOUT_S} s "
                   "replica timeout)")
    return p, why


def cut(report):
    t0 = time.monotonic()
    times = report["seconds"] = {}

    def step(name):
        times[name] = round(time.monotonic() - t0, 1)

    disks = replica_paths()
    report["disks"] = disks
    linear(HOLD, disks[2])
    paths = disks[:2] + [linear(HELD, f"/dev/mapper/{HOLD}")]
    report["replicas"] = paths
    p = qb("add", "--json", "-t", THRESHOLD, "--timeout", REPLICA_TIMEOUT_S, *paths)
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

    before = stat(dev)["writes"]
    fio = subprocess.Popen(FIO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, cwd="/tmp")
    first = wait_writes(dev, before)
    step("fio_started")
    time.sleep(WRITE_S)
    # writes must still be going on when the hold begins
    last = wait_writes(dev, stat(dev)["writes"], timeout=10)
    if fio.poll() is not None:
        raise RuntimeError(f"fio exited {fio.returncode} before the hold: "
                           f"{fio.stderr.read()[-2000:]}")
    report.update({"writes_before_fio": before, "writes_at_fio_start": first,
                   "writes_at_hold": last})
    # a hold can meet the device between writes: let it go, write on and
    # hold again, a few times at most
    tries = report["holds"] = []
    for n in range(HOLDS):
        step(f"hold_{n + 1}")
        p, why = hold(report, disks, dev)
        report["premise"] = dict(p, met=not why)
        if not why:
            break
        tries.append("; ".join(why))
        run(["dmsetup", "resume", HOLD])
        time.sleep(2)
        if fio.poll() is not None:
            raise RuntimeError(f"fio exited {fio.returncode} after a hold: "
                               f"{fio.stderr.read()[-2000:]}")
    step("checked")
    if why:
        raise PremiseError(f"{HOLDS} holds, none met it: " + " | ".join(tries))
    report.update(ok=True, reset=time.time())


def main():
    report = {"phase": "cut", "ok": False, "started": time.time()}
    try:
        cut(report)
    except Exception as e:
        if isinstance(e, PremiseError):
            report["error"] = f"premise not met, no reset: {e}"
        else:
            report["error"] = traceback.format_exc()
        save_report(report)
        print(f"powerloss-cut: failed: {report['error']}\n"
              f"evidence: {json.dumps(report.get('premise'))}", flush=True)
        # let the held I/O go, so that the VM can stop by itself
        subprocess.run(["dmsetup", "resume", HOLD], capture_output=True, timeout=60)
        return 1
    save_report(report)
    print(f"powerloss-cut: premise met: {json.dumps(report['premise'])}; "
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
