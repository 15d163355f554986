"""Device benchmark: fio on /dev/ublkbN against the kernel's md raid1 and loop
device over the same images, in one run. Needs root and a kernel with ublk,
md raid1 and loop: run it in the device VM with bench/run-device-vm (or
directly where the kernel has them).

    bench/run-device-vm                     # boots the VM, prints the table
    .venv/bin/python -m bench.device        # here, if this kernel has ublk

Contenders, each on images in --dir (tmpfs by default):
  - quorumblk, 3 replicas, threshold 2, each read policy (writes: policy
    all only; the policy does not change a write);
  - quorumblk over one replica, threshold 1: the pass-through baseline (the
    ublk round trip without a vote);
  - md raid1 over three loop devices on the same three images (the kernel's
    mirror: it reads one copy and does not vote), built without a
    superblock so the images stay byte-identical;
  - the loop device over one image.
Loop devices use direct I/O where the kernel allows it (so no page cache
sits between them and the images, as with quorumblk's O_DIRECT). The
single-image contenders use a fourth copy, so their writes never make the
three replicas differ.

Workloads (fio, io_uring, O_DIRECT on the block device): 4 KiB random read
and write at depth 32 (lfsr generator, fixed seed: the same blocks for
everyone), 1 MiB sequential read and write at depth 8. CPU is the whole
guest's (from /proc/stat: the kernel's work for md and loop counts too)
per request. In an emulated VM only ratios within one run mean anything.
"""
import argparse
import json
import os
import platform
import stat
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

from bench.engine import MIB, direct_ok, images_agree, system_info  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")
SINGLE = "loop"		# the one-image kernel baseline's name ("ram disk" on ram)
WORKLOADS = [
    # name, fio rw, bs, depth
    ("4k-randread", "randread", 4096, 32),
    ("4k-randwrite", "randwrite", 4096, 32),
    ("1m-seqread", "read", MIB, 8),
    ("1m-seqwrite", "write", MIB, 8),
]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, timeout=120, check=True):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: "
                           f"{(p.stderr or p.stdout).strip()[-300:]}")
    return p.stdout.strip()


def cpu_busy():
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def ram_disks(size, n):
    """n brd RAM disks of size bytes: /dev/ram0 .. (the module must not be
    in use already)."""
    subprocess.run(["rmmod", "brd"], capture_output=True)
    run(["modprobe", "brd", f"rd_nr={n}", f"rd_size={size // 1024}",
         "max_part=0"])
    paths = [f"/dev/ram{i}" for i in range(n)]
    for _ in range(50):
        if all(os.path.exists(p) for p in paths):
            return paths
        time.sleep(0.1)
    raise RuntimeError("brd did not create /dev/ram*")


def is_blockdev(path):
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def make_images(directory, size, n, paths=None):
    """Fill n images (files in directory, or the given block devices) with
    the same random bytes: never holes, which read without any I/O."""
    if paths is None:
        os.makedirs(directory, exist_ok=True)
        paths = [os.path.join(directory, f"img{i}.img") for i in range(n)]
    chunk = os.urandom(4 * MIB)
    data = bytearray(chunk)
    with open(paths[0], "r+b" if is_blockdev(paths[0]) else "wb") as f:
        for off in range(0, size, len(chunk)):
            data[:8] = off.to_bytes(8, "little")
            f.write(data)
        if not is_blockdev(paths[0]):
            f.truncate(size)
    for p in paths[1:]:
        with open(paths[0], "rb") as src, \
                open(p, "r+b" if is_blockdev(p) else "wb") as dst:
            while True:
                b = src.read(8 * MIB)
                if not b:
                    break
                dst.write(b)
    # written through the page cache: flush it now, or the first O_DIRECT
    # reader of each image pays for the writeback (seen: a 5x slower first
    # run on RAM disks)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return paths


def fio(dev, wl, seconds):
    name, rw, bs, depth = wl
    args = ["fio", "--name=bench", f"--filename={dev}", "--ioengine=io_uring",
            "--direct=1", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
            f"--runtime={int(seconds * 1000)}ms", "--time_based",
            "--output-format=json"]
    if rw.startswith("rand"):
        args += ["--random_generator=lfsr", "--randseed=7919"]
    b0, t0 = cpu_busy()
    out = run(args, timeout=seconds + 120)
    b1, t1 = cpu_busy()
    job = json.loads(out[out.index("{"):])["jobs"][0]
    d = job["read" if "read" in rw else "write"]
    ops = d["total_ios"]
    hz = os.sysconf("SC_CLK_TCK")
    return {"ops": ops, "bytes": d["io_bytes"], "wall_s": d["runtime"] / 1000.0,
            "errors": job.get("error", 0),
            "cpu_s": (b1 - b0) / hz,
            "cpu_share": (b1 - b0) / max(t1 - t0, 1)}


# ---------------------------------------------------------------- contenders
# Each is a context manager factory that yields the block device's path.

class QuorumDevice:
    def __init__(self, paths, threshold, policy, direct, queues, depth):
        self.args = (paths, threshold, policy, direct, queues, depth)
        self.q = self.dev = None

    def __enter__(self):
        from quorumblk import Quorum
        from quorumblk.device import DEFAULT_MAX_IO, Device
        paths, threshold, policy, direct, queues, depth = self.args
        self.q = Quorum(paths, threshold, read_policy=policy,
                        buffered=not direct, max_io=DEFAULT_MAX_IO)
        try:
            self.dev = Device.start(self.q, queues=queues, depth=depth)
        except Exception:
            self.q.close()
            raise
        return self.dev.path

    def counters(self):
        st = self.q.status()
        c = st.get("counters", {})
        return {k: c.get(k, 0) for k in ("bad_blocks", "errors", "timeouts",
                                         "quorum_failures")}

    def __exit__(self, *exc):
        self.stop_counters = self.counters()
        self.dev.stop()
        self.q.close()


def losetup(path, direct):
    args = ["losetup", "-f", "--show"]
    if direct:
        args.append("--direct-io=on")
    try:
        return run(args + [path]), direct
    except RuntimeError:
        if not direct:
            raise
        return run(["losetup", "-f", "--show", path]), False


class Loop:
    def __init__(self, path, direct):
        self.path, self.direct = path, direct

    def __enter__(self):
        if is_blockdev(self.path):	# a RAM disk: itself
            self.dev = None
            return self.path
        self.dev, self.direct = losetup(self.path, self.direct)
        return self.dev

    def __exit__(self, *exc):
        if self.dev:
            run(["losetup", "-d", self.dev], check=False)


class Raid1:
    def __init__(self, paths, direct):
        self.paths, self.direct = paths, direct
        self.loops = []

    def __enter__(self):
        try:
            members = []
            for p in self.paths:
                if is_blockdev(p):	# RAM disks: directly
                    members.append(p)
                    continue
                dev, self.direct = losetup(p, self.direct)
                self.loops.append(dev)
                members.append(dev)
            # --build: no superblock, the images stay as they are
            run(["mdadm", "--build", "/dev/md/qbbench", "--level=1",
                 f"--raid-devices={len(members)}", "--assume-clean",
                 "--run"] + members)
        except Exception:
            self.__exit__()
            raise
        return os.path.realpath("/dev/md/qbbench")

    def __exit__(self, *exc):
        if os.path.exists("/dev/md/qbbench"):
            run(["mdadm", "--stop", "/dev/md/qbbench"], check=False)
        for dev in self.loops:
            run(["losetup", "-d", dev], check=False)


# ---------------------------------------------------------------- the run

def contenders(imgs, single, direct, args):
    out = []
    for policy in ("all", "threshold", "fifo"):
        out.append((f"quorumblk {policy}", "qb",
                    lambda p=policy: QuorumDevice(imgs, 2, p, direct,
                                                  args.queues, args.depth),
                    policy == "all"))
    out.append(("quorumblk 1 replica", "qb",
                lambda: QuorumDevice([single], 1, "all", direct, args.queues,
                                     args.depth), True))
    out.append(("md raid1", "md", lambda: Raid1(imgs, direct), True))
    out.append((SINGLE, "loop", lambda: Loop(single, direct), True))
    return out


def targets(row, ref):
    c, w = row["contender"], row["workload"]
    if not c.startswith("quorumblk") or c == "quorumblk 1 replica":
        return "", ""
    md, one = ref.get("md raid1"), ref.get("quorumblk 1 replica")
    policy = c.split()[1]
    if w.startswith("1m"):
        if not one:
            return ">=0.8x 1-replica", "n/a"
        x = rate(row) / rate(one)
        return ">=0.8x 1-replica", "met" if x >= 0.8 else "MISSED"
    if not md:
        return "", "n/a"
    x = rate(row) / rate(md)
    if w == "4k-randwrite":
        return ">=0.7x md", "met" if x >= 0.7 else "MISSED"
    if policy == "all":
        return ">=0.5x md", "met" if x >= 0.5 else "MISSED"
    if policy == "threshold":
        return ">=0.8x md", "met" if x >= 0.8 else "MISSED"
    return "", ""


def rate(r):
    return r["ops"] / r["wall_s"] if r.get("wall_s") else 0.0


def table(rows):
    head = ("workload", "contender", "IOPS", "MiB/s", "x md raid1", f"x {SINGLE}",
            "x 1-replica", "cpu us/io", "cpu busy", "spread", "target", "")
    lines = [head]
    refs = {}
    for r in rows:
        if "error" not in r:
            refs.setdefault(r["workload"], {})[r["contender"]] = r
    for r in rows:
        if "error" in r:
            lines.append((r["workload"], r["contender"], "error", "", "", "",
                          "", "", "", "", "", r["error"][:70]))
            continue
        ref = refs[r["workload"]]

        def x(name):
            o = ref.get(name)
            return f"{rate(r) / rate(o):.2f}" if o and rate(o) else ""
        text, met = targets(r, ref)
        lines.append((r["workload"], r["contender"], f"{rate(r):,.0f}",
                      f"{r['bytes'] / r['wall_s'] / MIB:,.0f}", x("md raid1"),
                      x(SINGLE), x("quorumblk 1 replica"),
                      f"{r['cpu_s'] / r['ops'] * 1e6:.1f}",
                      f"{r['cpu_share'] * 100:.0f}%",
                      f"{r['spread'] * 100:.0f}%", text, met))
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    right = set(range(2, 10))
    out = []
    for n, l in enumerate(lines):
        out.append("  ".join(str(c).rjust(widths[i]) if i in right and n else
                             str(c).ljust(widths[i])
                             for i, c in enumerate(l)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def preflight():
    if os.geteuid() != 0:
        return "needs root"
    for mod in ("ublk_drv", "loop", "raid1"):
        subprocess.run(["modprobe", mod], capture_output=True)
    from quorumblk.device import ublk_available
    ok, why = ublk_available(load=True)
    if not ok:
        return why
    for tool in ("fio", "losetup", "mdadm"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"],
                          capture_output=True).returncode:
            return f"{tool} not found"
    return ""


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.device",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0,
                    help="fio runtime of each run (default 4)")
    ap.add_argument("--reps", type=int, default=2,
                    help="runs per figure, in turns across contenders; the "
                    "fastest is kept (default 2)")
    ap.add_argument("--size-mib", type=int, default=256,
                    help="size of each image (default 256; four are made)")
    ap.add_argument("--dir", default="/dev/shm/quorumblk-devbench")
    ap.add_argument("--media", choices=("shm", "ram"), default="shm",
                    help="shm: image files in --dir (default); ram: four brd "
                    "RAM disks, md raid1 directly on three, the fourth alone "
                    "as the kernel baseline")
    ap.add_argument("--queues", type=int, default=None,
                    help="ublk queues (default: the device's, min(CPUs, 4))")
    ap.add_argument("--depth", type=int, default=128)
    ap.add_argument("--only", action="append", help="only this workload")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    why = preflight()
    if why:
        log(f"bench.device: cannot run here: {why}. Use bench/run-device-vm.")
        return 2
    info = system_info()
    global SINGLE
    size = args.size_mib * MIB
    if args.media == "ram":
        SINGLE = "ram disk"
        direct = True
        paths = make_images(None, size, 4, ram_disks(size, 4))
        where = "brd RAM disks"
    else:
        os.makedirs(args.dir, exist_ok=True)
        direct = direct_ok(args.dir)
        log(f"bench.device: writing 4 x {args.size_mib} MiB in {args.dir} "
            f"(O_DIRECT {'ok' if direct else 'refused: buffered'})")
        paths = make_images(args.dir, size, 4)
        where = f"images in {args.dir}"
    log(f"bench.device: kernel {platform.release()}, {os.cpu_count()} CPUs")
    imgs, single = paths[:3], paths[3]
    rows, notes = [], []
    started = time.monotonic()
    for wl in WORKLOADS:
        if args.only and wl[0] not in args.only:
            continue
        write = "write" in wl[1]
        entries = [e for e in contenders(imgs, single, direct, args)
                   if e[3] or not write]
        got = {e[0]: [] for e in entries}
        errors = {}
        for rep in range(args.reps):
            for label, kind, make, _ in entries:
                if label in errors:
                    continue
                log(f"  {wl[0]:<13} {label} (run {rep + 1}/{args.reps})")
                try:
                    ctx = make()
                    with ctx as dev:
                        r = fio(dev, wl, args.seconds)
                    if isinstance(ctx, QuorumDevice):
                        bad = {k: v for k, v in ctx.stop_counters.items() if v}
                        if bad:
                            notes.append(f"{wl[0]} {label}: {bad}")
                    if isinstance(ctx, (Loop, Raid1)) and not ctx.direct:
                        notes.append(f"{label}: loop without direct I/O")
                    got[label].append(r)
                except Exception as e:
                    errors[label] = f"{type(e).__name__}: {e}"
                    log(f"    failed: {errors[label]}")
        for label, _, _, _ in entries:
            row = {"workload": wl[0], "contender": label}
            runs = got[label]
            if runs:
                rates = [rate(r) for r in runs]
                row.update(max(runs, key=rate))
                row["rates"] = rates
                row["spread"] = (max(rates) - min(rates)) / max(rates)
            else:
                row["error"] = errors.get(label, "no run")
            rows.append(row)
    agree = images_agree(imgs)
    elapsed = time.monotonic() - started
    if args.media == "ram":
        subprocess.run(["rmmod", "brd"], capture_output=True)
    else:
        for p in paths:
            os.unlink(p)

    text = table(rows)
    md_over = "3 RAM disks" if args.media == "ram" else "3 loop devices"
    print(f"quorumblk device benchmark: fio on /dev/ublkbN vs md raid1 ("
          f"{md_over}) vs {SINGLE}, {args.size_mib} MiB {where}, "
          f"{args.seconds:g} s per run, best of {args.reps} taken in turns")
    print(f"date {info['date']}  commit {info['commit']}  kernel "
          f"{platform.release()}  cpu {info['cpu']} x{info['cpus']}  "
          f"{info['fio']}")
    print("cpu = whole machine's busy time per request (the kernel's md and "
          "loop work included); cpu busy = share of all CPUs busy; spread = "
          "(fastest - slowest run) / fastest")
    print(text)
    print(f"replicas identical after the run: {'yes' if agree else 'NO'}")
    for n in sorted(set(notes)):
        print(f"note: {n}")
    print(f"total {elapsed:.0f} s")
    os.makedirs(RESULTS, exist_ok=True)
    path = args.json or os.path.join(
        RESULTS, "device-" + info["date"].replace(":", "") + ".json")
    with open(path, "w") as f:
        json.dump({"system": dict(info, kernel=platform.release()),
                   "args": vars(args), "rows": rows, "replicas_agree": agree,
                   "notes": notes, "table": text}, f, indent=1)
    print(f"results: {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
