"""Lifecycle benchmark: what the write-intent record costs a write, and how
fast resync and scrub run against copying one image with dd, on the same
medium, in one run.

    .venv/bin/python -m bench.lifecycle                  # about 10 minutes
    .venv/bin/python -m bench.lifecycle --media tmpfs --only scrub-clean

Write intent (--only write-intent): 4 KiB writes at queue depth 32 in
bench/engine.py's stride pattern, 3 replicas, threshold 2, the same images,
with the record off (a Quorum without metadata) and on (meta.assemble,
commit and set_meta, as `quorumblk add` does, and a thread calling
q.clean(5.0) every second, as the daemon's loop does). An "on" run starts
from a clean bitmap (the run before cleared every bit with clean(0)), so its
first pass marks each region once: a synchronous bitmap write to every
replica before the region's first write goes out. Three figures per run:
  - wi-marking: the first writes, up to the one by which every region has
    been written (all of the marking, in a few hundred writes);
  - wi-first-pass: one write to every block from a clean bitmap (it
    includes wi-marking);
  - wi-steady: the pass right after it, with every bit already set. The
    passes follow each other without a pause, so no region is idle for 5 s
    and the cleaner clears nothing while they run.

Resync and scrub: Quorum.sync over the whole data area in 16 MiB calls, as
the daemon does, with the daemon's max_io (512 KiB: the engine keeps four
such chunks in flight), against `dd bs=1M` copying one replica's data area
onto an allocated file of the same medium (O_DIRECT both ways where the
medium takes it, conv=fsync):
  - resync-full: replica 3 set resyncing, then sync(targets=[2],
    blind=True): two replicas read and voted, every block written to the
    third, as for a new replica;
  - resync-5pct: 5% of replica 3's blocks replaced by other bytes first,
    then sync(targets=[2]): all three read, only what differs written;
  - scrub-clean: sync() over three identical replicas: three reads, no write;
  - scrub-flips: one bit flipped in 1% of the blocks first (each in one
    replica, the three in turn), then sync(), which rewrites those copies.
MiB/s is the data area covered per second (the device's size over the
time); `x dd` that over dd's rate; `by run` the range of the ratios of runs
made in the same turn. `replica MiB/s` counts every byte read
and written on the replicas; dd moves two per byte (one read, one write).

Every figure is the fastest of --reps runs taken in turns across the
contenders of its part. After every run that touches the replicas they are
compared over their data area (the first q.size bytes: each replica's
metadata tail differs). Nothing passes or fails; the one target given (the
record on at >= 0.90x off) is printed beside its figures.
"""
import argparse
import json
import os
import random
import resource
import shutil
import sys
import threading
import time

from bench.engine import (GIB, MIB, REPLICAS, RESULTS, ROOT, STRIDE,
                          THRESHOLD, Failed, direct_ok, format_table,
                          images_agree, log, make_images, run_timed, sh,
                          system_info)

try:
    from quorumblk import Quorum, meta
    from quorumblk.assembly import DEVICE_MAX_IO
    from quorumblk.server import CLEAN_EVERY_S, CLEAN_IDLE_S
except ImportError as e:        # the engine is not built yet
    sys.exit(f"import quorumblk: {e}; build it first: "
             ".venv/bin/pip install -e '.[test]'")

BS = 4096
DEPTH = 32
SYNC_STEP = 16 * MIB        # bytes per sync call, as the daemon's jobs
TARGET = 2                  # the replica that resyncs (the third)
DIFFER = 0.05               # resync-5pct: share of the target's blocks changed
FLIPS = 0.01                # scrub-flips: share of blocks with a bit flipped
WI_TARGET = 0.90            # the issue's: the record on >= 0.90x off

WI_TESTS = ("wi-marking", "wi-first-pass", "wi-steady")
SYNC_TESTS = ("resync-full", "resync-5pct", "scrub-clean", "scrub-flips")
ONLY = ("write-intent",) + SYNC_TESTS
LABELS = {"dd": "dd bs=1M (ceiling)",
          "resync-full": "full resync (blind)",
          "resync-5pct": f"resync, {DIFFER:.0%} differ",
          "scrub-clean": "scrub, identical",
          "scrub-flips": f"scrub, {FLIPS:.0%} bit flips"}


def cpu_now():
    """CPU seconds of this process, every thread (the engine's included)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def rate(r):
    return r["ops"] / r["wall_s"] if r.get("wall_s") else 0.0


def count_bits(bitmap):
    return sum(bin(b).count("1") for b in bitmap)


def drop_cache(paths):
    """Evict the files' pages (the comparisons read them buffered), so the
    next run finds what O_DIRECT would."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- the set

def open_set(paths, direct):
    """The replica set as `quorumblk add` opens it: assemble, open, commit,
    attach the metadata. Dirty regions left by an interrupted run are
    resynced first (not timed)."""
    plan = meta.assemble(paths, THRESHOLD)
    q = Quorum(paths, THRESHOLD, max_io=DEVICE_MAX_IO, buffered=not direct)
    try:
        meta.commit(paths, plan)
        q.set_meta(plan.metas, plan.bitmap)
        if plan.dirty_regions() or plan.stale:
            log(f"    resyncing {len(plan.dirty_regions())} dirty regions "
                "left by an earlier run")
            meta.resync(q, plan)
        q.sync(0, 0)        # this thread's engine context, made before timing
    except BaseException:
        q.close()
        raise
    return q


def close_set(q):
    """Clear every bit (as the daemon does at a clean stop) and close: the
    next run starts from a clean bitmap."""
    try:
        q.clean(0)
    finally:
        q.close()


def writes_to_touch_all(size, shift):
    """How many writes of the stride pattern reach every region once (the
    C load generator's offsets: (i * step) % span, aligned down)."""
    regions = (size + (1 << shift) - 1) >> shift
    seen = set()
    for i in range(size // BS):
        off = (i * STRIDE) % size
        seen.add((off - off % BS) >> shift)
        if len(seen) == regions:
            return i + 1
    return size // BS


# ---------------------------------------------------------------- write intent

class Cleaner(threading.Thread):
    """q.clean(5.0) once a second, as the daemon's loop does."""

    def __init__(self, q):
        super().__init__(name="clean", daemon=True)
        self.q = q
        self.calls = self.cleared = 0
        self.error = None
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(CLEAN_EVERY_S):
            try:
                self.cleared += self.q.clean(CLEAN_IDLE_S)
                self.calls += 1
            except OSError as e:
                self.error = str(e)
                return

    def stop(self):
        self.stopping.set()
        self.join()


def wi_run(env, record):
    """One run of the write-intent part: the marking writes, the rest of the
    first pass, the steady pass. Returns {test: result}."""
    paths, size, direct = env["replicas"], env["size"], env["direct"]
    nblocks, burst = size // BS, env["burst"]
    if record:
        q = open_set(paths, direct)
    else:
        q = Quorum(paths, THRESHOLD, max_io=DEVICE_MAX_IO, buffered=not direct)
    cleaner = None

    def run(count, start):
        c0 = cpu_now()
        r = dict(q.bench("write", BS, DEPTH, count, step=STRIDE, start=start,
                         span=size))
        r["cpu_s"] = cpu_now() - c0
        if r["errors"]:
            raise Failed(f"{r['errors']} of {r['ops']} writes failed")
        return r
    try:
        if record:
            if count_bits(q.bitmap()):
                raise Failed("the bitmap is not clean at the start of the run")
            cleaner = Cleaner(q)
            cleaner.start()
        mark = run(burst, 0)
        rest = run(nblocks - burst, burst * STRIDE % size)
        marked = count_bits(q.bitmap()) if record else None
        steady = run(nblocks, nblocks * STRIDE % size)
    finally:
        if cleaner:
            cleaner.stop()
        if record:
            close_set(q)
        else:
            q.close()
    first = {k: mark[k] + rest[k] for k in ("ops", "bytes", "errors",
                                             "wall_s", "cpu_s")}
    extra = {}
    if record:
        extra = {"regions_marked": marked, "clean_calls": cleaner.calls,
                 "cleared_while_writing": cleaner.cleared}
        if cleaner.error:
            extra["clean_error"] = cleaner.error
    return {"wi-marking": dict(mark, **extra), "wi-first-pass": first,
            "wi-steady": steady}


# ---------------------------------------------------------------- sync

def plant(env, test, seed):
    """Make replicas differ before a resync-5pct or scrub-flips run (not
    timed). Returns how many block copies now differ."""
    nblocks = env["size"] // BS
    rng = random.Random(seed)
    share = DIFFER if test == "resync-5pct" else FLIPS
    blocks = sorted(rng.sample(range(nblocks), max(1, int(nblocks * share))))
    if test == "resync-5pct":
        per = {TARGET: blocks}
    else:
        per = {r: blocks[r::REPLICAS] for r in range(REPLICAS)}
    for r, mine in per.items():
        fd = os.open(env["replicas"][r], os.O_RDWR)
        try:
            for b in mine:
                if test == "resync-5pct":
                    data = rng.randbytes(BS)
                else:
                    data = bytearray(os.pread(fd, BS, b * BS))
                    bit = rng.randrange(BS * 8)
                    data[bit // 8] ^= 1 << (bit % 8)
                os.pwrite(fd, data, b * BS)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return len(blocks)


def sync_all(q, **kw):
    """q.sync over the data area in SYNC_STEP calls; the summed counts."""
    total = {"blocks": 0, "differing": 0, "unrecoverable": 0, "written": 0}
    off = 0
    while off < q.size:
        n = min(SYNC_STEP, q.size - off)
        res = q.sync(off, n, **kw)
        for k in total:
            total[k] += res[k]
        off += n
    return total


def sync_run(env, test, seed):
    size, direct = env["size"], env["direct"]
    planted = plant(env, test, seed) if test in ("resync-5pct",
                                                 "scrub-flips") else 0
    resync = test.startswith("resync")
    q = open_set(env["replicas"], direct)
    try:
        c0, t0 = cpu_now(), time.monotonic()
        if resync:
            q.set_state(TARGET, "resyncing")
            counts = sync_all(q, targets=[TARGET],
                              blind=test == "resync-full")
            q.set_state(TARGET, "in-service")
        else:
            counts = sync_all(q)
        wall, cpu = time.monotonic() - t0, cpu_now() - c0
        events = len(q.events())
        if q.size != size:
            raise Failed(f"the device is {q.size} bytes, not {size}")
    finally:
        close_set(q)
    nblocks = size // BS
    want = {"resync-full": {"written": nblocks},
            "resync-5pct": {"differing": planted, "written": planted},
            "scrub-clean": {"differing": 0, "written": 0},
            "scrub-flips": {"differing": planted, "written": planted}}[test]
    want["unrecoverable"] = 0
    readers = REPLICAS - 1 if test == "resync-full" else REPLICAS
    return {"ops": nblocks, "bytes": size, "errors": 0, "wall_s": wall,
            "cpu_s": cpu, "replica_bytes": readers * size + counts["written"] * BS,
            "counts": counts, "planted": planted, "events": events,
            "counts_as_expected": all(counts[k] == v for k, v in want.items())}


def dd_run(env):
    """dd copying replica 1's data area onto the allocated raw file."""
    size = env["size"]
    args = ["dd", f"if={env['replicas'][0]}", f"of={env['raw']}", "bs=1M",
            f"count={size // MIB}", "conv=notrunc,fsync", "status=none"]
    if env["direct"]:
        args += ["iflag=direct", "oflag=direct"]
    t0 = time.monotonic()
    out, err, rc, cpu = run_timed(args, timeout=600)
    wall = time.monotonic() - t0
    if rc != 0:
        raise Failed(f"dd exited {rc}: {err.strip()[-300:]}")
    return {"ops": size // BS, "bytes": size, "errors": 0, "wall_s": wall,
            "cpu_s": cpu, "replica_bytes": 2 * size, "command": " ".join(args)}


# ---------------------------------------------------------------- the run

def check(env, after):
    ok = images_agree(env["replicas"], env["size"])
    drop_cache(env["replicas"])
    env["checks"].append({"after": after, "agree": ok})
    if not ok:
        log(f"    replicas DIFFER over the data area after {after}")


def best(medium, test, contender, direct, runs, error=None):
    row = {"medium": medium, "test": test, "contender": contender,
           "direct": direct}
    if runs:
        rates = [rate(r) for r in runs]
        row.update(max(runs, key=rate))
        row["rates"] = rates
        row["spread"] = (max(rates) - min(rates)) / max(rates)
        if error:
            row["failed_run"] = error
    elif error:
        row["error"] = error
    return row


def run_medium(medium, directory, size, args, rows):
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    direct = direct_ok(directory)
    log(f"[{medium}] {directory}: O_DIRECT {'ok' if direct else 'refused, buffered'};"
        f" writing {REPLICAS + 1} x {size >> 20} MiB")
    replicas, raw = make_images(directory, size)
    plan = meta.assemble(replicas, THRESHOLD)      # a new set: files grow
    shift = plan.metas[0].region_shift
    env = {"replicas": replicas, "raw": raw, "size": size, "direct": direct,
           "regions": plan.metas[0].nregions, "region_shift": shift,
           "burst": writes_to_touch_all(size, shift), "checks": []}
    only = set(args.only or ONLY)

    if "write-intent" in only:
        got = {(t, c): [] for t in WI_TESTS for c in ("record off", "record on")}
        errors = {}
        for rep in range(args.reps):
            order = [False, True] if rep % 2 == 0 else [True, False]
            for record in order:
                label = "record on" if record else "record off"
                if label in errors:
                    continue
                log(f"[{medium}] write-intent {label} (run {rep + 1}/{args.reps})")
                try:
                    res = wi_run(env, record)
                except Failed as e:
                    errors[label] = str(e)
                    log(f"    failed: {e}")
                    continue
                for t in WI_TESTS:
                    got[(t, label)].append(res[t])
                check(env, f"write-intent {label} run {rep + 1}")
        for t in WI_TESTS:
            for c in ("record off", "record on"):
                rows.append(best(medium, t, c, direct, got[(t, c)],
                                 errors.get(c)))

    tests = [t for t in SYNC_TESTS if t in only]
    if tests:
        names = ["dd"] + tests
        got = {n: [] for n in names}
        errors = {}
        for rep in range(args.reps):
            for n in names:
                if n in errors:
                    continue
                log(f"[{medium}] {LABELS[n]} (run {rep + 1}/{args.reps})")
                try:
                    got[n].append(dd_run(env) if n == "dd" else
                                  sync_run(env, n, seed=7919 * (rep + 1)))
                except Failed as e:
                    errors[n] = str(e)
                    log(f"    failed: {e}")
                    continue
                if n != "dd":
                    check(env, f"{n} run {rep + 1}")
        for n in names:
            rows.append(best(medium, "sync", LABELS[n], direct, got[n],
                             errors.get(n)))
            rows[-1]["name"] = n
    result = {"medium": medium, "direct": direct, "regions": env["regions"],
              "region_mib": (1 << shift) >> 20, "marking_writes": env["burst"],
              "checks": env["checks"],
              "replicas_agree": all(c["agree"] for c in env["checks"])}
    if not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    return result


def table(rows):
    head = ("medium", "test", "contender", "IOPS", "MiB/s", "ratio", "of",
            "by run", "replica MiB/s", "cpu s/GiB", "spread", "target", "")
    lines = [head]
    refs = {}
    for r in rows:
        if r["contender"] == "record off" or r.get("name") == "dd":
            refs[(r["medium"], r["test"])] = r
    for r in rows:
        medium = r["medium"] + ("" if r.get("direct", True) else " (buffered)")
        if "error" in r:
            lines.append((medium, r["test"], r["contender"], "error", "", "",
                          "", "", "", "", "", "", r["error"][:60]))
            continue
        wi = r["test"].startswith("wi-")
        ref = refs.get((r["medium"], r["test"]))
        x = rate(r) / rate(ref) if ref and "error" not in ref and rate(ref) else None
        target = met = ""
        if wi and r["contender"] == "record on" and r["test"] != "wi-marking":
            target = f">={WI_TARGET:.2f}x off"
            met = "" if x is None else "met" if x >= WI_TARGET else "MISSED"
        elif not wi and r.get("name") != "dd":
            target = "none given"
        rb = r.get("replica_bytes")
        lines.append((
            medium, r["test"], r["contender"],
            f"{rate(r):,.0f}" if wi else "",
            f"{r['bytes'] / r['wall_s'] / MIB:,.0f}",
            f"{x:.2f}" if x is not None else "",
            ("x off" if wi else "x dd") if x is not None else "",
            by_run(r, ref) if x is not None and r is not ref else "",
            f"{rb / r['wall_s'] / MIB:,.0f}" if rb else "",
            f"{r['cpu_s'] / (r['bytes'] / GIB):.2f}",
            f"{r['spread'] * 100:.0f}%" if "spread" in r else "",
            target, met))
    return format_table(lines, right={3, 4, 5, 7, 8, 9, 10})


def by_run(r, ref):
    """The range of the ratios of runs made in the same turn (run i of the
    row over run i of its reference): how far one turn's ratio can be off."""
    a, b = r.get("rates", []), ref.get("rates", [])
    if len(a) != len(b) or not a or "failed_run" in r or "failed_run" in ref:
        return ""
    x = [p / q for p, q in zip(a, b) if q]
    return f"{min(x):.2f}-{max(x):.2f}" if x else ""


def notes(rows, results):
    out = []
    for m in results:
        n = len(m["checks"])
        bad = [c["after"] for c in m["checks"] if not c["agree"]]
        out.append(f"[{m['medium']}] replicas identical over the data area "
                   f"after each of the {n} runs that touched them: "
                   + ("yes" if not bad else "NO, after " + ", ".join(bad)))
        out.append(f"[{m['medium']}] {m['regions']} regions of "
                   f"{m['region_mib']} MiB; wi-marking = the first "
                   f"{m['marking_writes']} writes")
    for r in rows:
        if "error" in r or "failed_run" in r:
            continue
        if r["contender"] == "record on" and r["test"] == "wi-marking":
            off = next((o for o in rows if o["medium"] == r["medium"] and
                        o["test"] == "wi-marking" and
                        o["contender"] == "record off" and "error" not in o),
                       None)
            if off and r["regions_marked"]:
                extra = (r["wall_s"] - off["wall_s"]) / r["regions_marked"]
                out.append(f"[{r['medium']}] marking a region: "
                           f"{extra * 1e6:,.0f} us more than writing without "
                           "the record (wi-marking, fastest runs, over the "
                           "regions marked)")
            out.append(f"[{r['medium']}] record on, fastest run: "
                       f"{r['regions_marked']} regions marked in its first "
                       f"pass; q.clean(5.0) called {r['clean_calls']} times, "
                       f"cleared {r['cleared_while_writing']} while writing"
                       + (f"; clean failed: {r['clean_error']}"
                          if r.get("clean_error") else ""))
        if "counts" in r:
            c = r["counts"]
            out.append(f"[{r['medium']}] {r['contender']}, fastest run: "
                       f"{c['blocks']} blocks, {c['differing']} differing, "
                       f"{c['written']} written, {c['unrecoverable']} without "
                       f"quorum (planted {r['planted']}): "
                       + ("as expected" if r["counts_as_expected"]
                          else "NOT as expected"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.lifecycle",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3,
                    help="runs per figure, taken in turns across the "
                    "contenders; the fastest is kept (default 3)")
    ap.add_argument("--size-mib", type=int, default=1024,
                    help="size of each image's data area (default 1024)")
    ap.add_argument("--media", default="disk,tmpfs",
                    help="comma list of disk,tmpfs (default both)")
    ap.add_argument("--disk-dir", default="/var/tmp/quorumblk-lifecycle")
    ap.add_argument("--tmpfs-dir", default="/dev/shm/quorumblk-lifecycle")
    ap.add_argument("--only", action="append", choices=ONLY,
                    help="run only this part (repeatable; the dd ceiling "
                    "runs with any resync or scrub)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the images afterwards")
    ap.add_argument("--json", help="write results here (default "
                    "bench/results/lifecycle-DATE.json)")
    args = ap.parse_args(argv)
    if args.size_mib < 64 or args.reps < 1:
        ap.error("--size-mib must be at least 64 and --reps at least 1")
    if not shutil.which("dd"):
        log("dd not found (coreutils)")
        return 2

    info = system_info()
    info["dd"] = (sh(["dd", "--version"]).splitlines() or ["missing"])[0]
    load0 = os.getloadavg()[0]
    size = args.size_mib * MIB
    dirs = {"disk": args.disk_dir, "tmpfs": args.tmpfs_dir}
    rows, results = [], []
    started = time.monotonic()
    for medium in args.media.split(","):
        results.append(run_medium(medium, dirs[medium], size, args, rows))
    elapsed = time.monotonic() - started

    text = table(rows)
    header = (f"quorumblk lifecycle benchmark, {REPLICAS} replicas, threshold "
              f"{THRESHOLD}, data area {args.size_mib} MiB, best of "
              f"{args.reps} taken in turns\n"
              f"date {info['date']}  commit {info['commit']}  kernel "
              f"{info['kernel']}\ncpu {info['cpu']} x{info['cpus']}  "
              f"{info['dd']}\n"
              f"wi-*: 4 KiB writes QD{DEPTH}, stride 4096*7919, record on = "
              "set_meta + q.clean(5.0) every 1 s; wi-marking = first writes "
              "until every region is marked, wi-first-pass = one write per "
              "block from a clean bitmap, wi-steady = the pass after it;\n"
              f"sync: Quorum.sync in {SYNC_STEP >> 20} MiB calls, max_io "
              f"{DEVICE_MAX_IO >> 10} KiB; MiB/s = data area / time; "
              "replica MiB/s = bytes read + written on all replicas (dd: "
              "2 per byte); cpu = user+sys of the process per GiB of data;\n"
              "by run = range of (run i / its reference's run i), "
              "the runs of one turn; "
              "spread = (fastest - slowest run) / fastest; load average "
              f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
              f"({info['cpus']} CPUs: above that, other work shared them)")
    print(header)
    print(text)
    for line in notes(rows, results):
        print(line)
    print(f"total {elapsed:.0f} s")

    os.makedirs(RESULTS, exist_ok=True)
    path = args.json or os.path.join(
        RESULTS, "lifecycle-" + info["date"].replace(":", "") + ".json")
    with open(path, "w") as f:
        json.dump({"system": info, "args": vars(args), "rows": rows,
                   "media": results, "table": text}, f, indent=1)
    print(f"results: {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
