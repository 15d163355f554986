"""Engine benchmark: quorumblk's C engine against QEMU's quorum driver and a
raw file, on the same images, with the same access pattern, in one run.

    .venv/bin/python -m bench.engine            # a few minutes
    .venv/bin/python -m bench.engine --long     # longer runs, best of 3

Every contender runs in its own process, one after the other:
  - quorumblk: `Quorum(...).bench()` (the C load generator inside the engine),
    in a worker process of this module, once per read policy;
  - QEMU quorum: `qemu-img bench` on driver=quorum, vote-threshold=2;
  - raw ceiling: `qemu-img bench` on one raw file of the same medium, and fio
    (io_uring) on that file as a second ceiling.

The pattern is qemu-img bench's: request i goes to (i * step) % size. qemu-img
bench has no random mode, so "random" is a prime stride of 4096 * 7919 bytes;
it visits every 4 KiB block once per pass, like fio's lfsr generator, which is
what fio gets (fio cannot follow a stride that wraps).

The NBD medium (--media nbd): the same images on tmpfs, each served by its
own NBD server on loopback (qemu-nbd --cache=none, or nbdkit's file plugin
with cache=none), started and stopped by this run. quorumblk opens the three
nbd:// URIs; QEMU's quorum has three nbd children over the same exports; the
ceiling is qemu-img bench over one export alone (a fourth copy, served the
same way). No fio there. The servers' CPU is counted for no contender.

CPU is the whole process's (user + system, all its threads, io_uring workers
included), taken from rusage and with start-up cost removed: the difference
between a short calibration run and the measured run, divided by the
difference in requests. GiB moved counts the bytes the caller asked for, not
the replica I/O behind them. Nothing here passes or fails: targets are printed
beside the figures.
"""
import argparse
import datetime
import json
import os
import platform
import re
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
REPLICAS = 3
THRESHOLD = 2
STRIDE = 4096 * 7919
MIB = 1 << 20
GIB = 1 << 30

WORKLOADS = [
    # name, op, bs, depth, step
    ("4k-randread", "read", 4096, 32, STRIDE),
    ("4k-randwrite", "write", 4096, 32, STRIDE),
    ("1m-seqread", "read", MIB, 8, MIB),
    ("1m-seqwrite", "write", MIB, 8, MIB),
]
POLICIES = ("all", "threshold", "fifo")
# the NBD medium's workloads: a 1 MiB sequential write over loopback NBD
# says nothing the 4 KiB writes do not
NBD_WORKLOADS = ("4k-randread", "4k-randwrite", "1m-seqread")


# ---------------------------------------------------------------- helpers

def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sh(args):
    try:
        return subprocess.run(args, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def system_info():
    commit = sh(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"])
    dirty = sh(["git", "-C", ROOT, "status", "--porcelain", "--", "csrc",
                "quorumblk"])
    qemu = sh(["qemu-img", "--version"]).splitlines()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc)
        .strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "commit": (commit or "none") + ("+dirty" if dirty else ""),
        "python": platform.python_version(),
        "qemu_img": qemu[0] if qemu else "missing",
        "fio": sh(["fio", "--version"]) or "missing",
    }


def direct_ok(directory):
    """Whether files in directory open with O_DIRECT (tmpfs: since 6.6)."""
    path = os.path.join(directory, ".odirect-probe")
    try:
        with open(path, "wb") as f:
            f.truncate(4096)
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        os.close(fd)
        return True
    except OSError:
        return False
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def make_images(directory, size):
    """Three identical replicas and a fourth copy for the raw contenders,
    filled with random bytes (allocated, never holes: a hole or an unwritten
    extent reads without touching the disk)."""
    os.makedirs(directory, exist_ok=True)
    names = [os.path.join(directory, f"replica{i}.img") for i in range(REPLICAS)]
    raw = os.path.join(directory, "raw.img")
    first = names[0]
    with open(first, "wb") as f:
        chunk = os.urandom(4 * MIB)
        for off in range(0, size, len(chunk)):
            # vary each chunk a little so no two MiB are the same
            f.write(off.to_bytes(8, "little") + chunk[8:])
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())
    for other in names[1:] + [raw]:
        shutil.copyfile(first, other)
        with open(other, "rb+") as f:
            os.fsync(f.fileno())
    for p in names + [raw]:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return names, raw


def images_agree(paths, length=None):
    """True when the replicas hold the same bytes (nothing diverged): all of
    each file, or only its first `length` bytes (the data area of replicas
    that carry quorumblk's metadata after it)."""
    files = [open(p, "rb") for p in paths]
    left = length
    try:
        while True:
            n = 8 * MIB if left is None else min(8 * MIB, left)
            blocks = [f.read(n) for f in files]
            if any(b != blocks[0] for b in blocks[1:]):
                return False
            if not blocks[0]:
                return True
            if left is not None:
                left -= len(blocks[0])
    finally:
        for f in files:
            f.close()


def run_timed(args, timeout):
    """Run a command; return (stdout, stderr, exit code, CPU seconds of the
    child and all it waited for). Reaped with wait4 for the child's rusage."""
    with open(os.devnull, "rb") as devnull:
        p = subprocess.Popen(args, stdin=devnull, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    out_parts, err_parts = [], []
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ, out_parts)
    sel.register(p.stderr, selectors.EVENT_READ, err_parts)
    open_pipes = 2
    while open_pipes:
        left = deadline - time.monotonic()
        if left <= 0:
            p.kill()
            break
        for key, _ in sel.select(timeout=min(left, 1.0)):
            data = os.read(key.fileobj.fileno(), 65536)
            if not data:
                sel.unregister(key.fileobj)
                open_pipes -= 1
            else:
                key.data.append(data.decode(errors="replace"))
    sel.close()
    p.stdout.close()
    p.stderr.close()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    cpu = ru.ru_utime + ru.ru_stime
    return "".join(out_parts), "".join(err_parts), p.returncode, cpu


# ---------------------------------------------------------------- contenders

class Failed(Exception):
    pass


def qemu_quorum_opts(paths, read_pattern="quorum"):
    opts = [f"driver=quorum,vote-threshold={THRESHOLD}"]
    if read_pattern != "quorum":
        opts.append(f"read-pattern={read_pattern}")
    for i, p in enumerate(paths):
        opts.append(f"children.{i}.driver=raw,children.{i}.file.driver=file,"
                    f"children.{i}.file.filename={p}")
    return ",".join(opts)


def qemu_quorum_nbd(exports, read_pattern="quorum"):
    """QEMU 7.2's quorum over NBD exports, as a json: filename: each child
    a raw format over an nbd protocol node (server as an InetSocketAddress:
    host and port as strings)."""
    q = {"driver": "quorum", "vote-threshold": THRESHOLD, "children": [
        {"driver": "raw", "file": {
            "driver": "nbd", "export": name,
            "server": {"type": "inet", "host": host, "port": str(port)}}}
        for host, port, name in exports]}
    if read_pattern != "quorum":
        q["read-pattern"] = read_pattern
    return "json:" + json.dumps(q, separators=(",", ":"))


def nbd_uri(export):
    host, port, name = export
    return f"nbd://{host}:{port}/{name}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NbdServers:
    """One NBD server per image on 127.0.0.1, each on a port of its own,
    without a page cache of its own (O_DIRECT on tmpfs, Linux 6.6+)."""

    def __init__(self, paths, kind):
        self.procs, self.exports = [], []
        try:
            for i, p in enumerate(paths):
                self._start(p, f"e{i}", kind)
        except BaseException:
            self.stop()
            raise

    def _start(self, path, name, kind):
        port = free_port()
        if kind == "nbdkit":
            cmd = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-e",
                   name, "file", f"file={path}", "cache=none"]
        else:
            cmd = ["qemu-nbd", "-f", "raw", "--cache=none", "--persistent",
                   "--shared=0", "-b", "127.0.0.1", "-p", str(port), "-x",
                   name, path]
        self.procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE))
        export = ("127.0.0.1", port, name)
        deadline = time.monotonic() + 20
        while sh(["nbdinfo", "--size", nbd_uri(export)]) != str(os.path.getsize(path)):
            proc = self.procs[-1]
            if proc.poll() is not None:
                raise Failed(f"{kind} for {path} on port {port} exited "
                             f"{proc.returncode}: {proc.stderr.read(500)!r}")
            if time.monotonic() > deadline:
                raise Failed(f"{kind} for {path}: no answer on port {port} in 20 s")
            time.sleep(0.1)
        self.exports.append(export)

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def qemu_img_bench(target, image_opts, op, bs, depth, step, count, direct,
                   aio):
    args = ["qemu-img", "bench", "-c", str(count), "-d", str(depth),
            "-s", str(bs), "-S", str(step)]
    if direct:
        args += ["-t", "none", "-i", aio]
    elif direct is not None:
        args += ["-t", "writeback"]
    if op == "write":
        args.append("-w")
    if image_opts:
        args += ["--image-opts", target]
    elif target.startswith("json:"):
        args.append(target)
    else:
        args += ["-f", "raw", target]
    out, err, rc, cpu = run_timed(args, timeout=600)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if rc != 0 or not m:
        raise Failed(f"qemu-img bench exited {rc}: {(err or out).strip()[-300:]}")
    return {"ops": count, "bytes": count * bs, "errors": 0,
            "wall_s": float(m.group(1)), "cpu_s": cpu}


def measured(run, rate_guess, seconds, minimum, startup=None):
    """Calibrate with a short run, then run for about `seconds`. startup(),
    when given, runs one request to learn the CPU a process spends starting
    and stopping, which is taken off the measured run's."""
    cal_n = max(minimum, int(rate_guess * min(seconds, 1.0) / 4))
    cal = run(cal_n)
    rate = cal["ops"] / max(cal["wall_s"], 1e-6)
    res = run(max(cal_n * 2, int(rate * seconds)))
    if startup is not None:
        base = startup()["cpu_s"]
        res["startup_cpu_s"] = base
        res["cpu_s"] = max(res["cpu_s"] - base, 0.0)
    return res


def bench_qemu(kind, env, wl, seconds):
    name, op, bs, depth, step = wl
    if env.get("nbd"):
        # the nbd driver has no cache mode or aio of its own to choose
        if kind == "raw":
            target = nbd_uri(env["nbd"]["raw"])
        else:
            target = qemu_quorum_nbd(env["nbd"]["replicas"],
                                     "fifo" if kind == "quorum-fifo" else "quorum")
        def run(n):
            return qemu_img_bench(target, False, op, bs, depth, step, n,
                                  None, None)
        return measured(run, 20000 if bs == 4096 else 500, seconds,
                        1000 if bs == 4096 else 32, startup=lambda: run(1))
    if kind == "raw":
        target, image_opts = env["raw"], False
    else:
        pattern = "fifo" if kind == "quorum-fifo" else "quorum"
        target, image_opts = qemu_quorum_opts(env["replicas"], pattern), True

    def run(n):
        return qemu_img_bench(target, image_opts, op, bs, depth, step, n,
                              env["direct"], env["qemu_aio"])
    return measured(run, 50000 if bs == 4096 else 1000, seconds,
                    2000 if bs == 4096 else 64, startup=lambda: run(1))


def fio_run(env, wl, extra_args, timeout):
    name, op, bs, depth, step = wl
    if step == bs:
        rw = op
        pattern = []
    else:
        rw = "rand" + op
        pattern = ["--random_generator=lfsr", "--randseed=7919"]
    args = ["fio", "--name=raw", f"--filename={env['raw']}",
            "--ioengine=io_uring", f"--direct={1 if env['direct'] else 0}",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
            f"--size={env['size']}", "--output-format=json"] + pattern
    out, err, rc, cpu = run_timed(args + extra_args, timeout=timeout)
    if rc != 0:
        raise Failed(f"fio exited {rc}: {err.strip()[-300:]}")
    job = json.loads(out[out.index("{"):])["jobs"][0]
    d = job[op]
    return {"ops": d["total_ios"], "bytes": d["io_bytes"],
            "errors": job.get("error", 0), "wall_s": d["runtime"] / 1000.0,
            "cpu_s": cpu}


def bench_fio(env, wl, seconds):
    """fio on the raw file. CPU: fio's whole process tree from wait4, less
    a one-request run's (start-up); fio's own usr/sys figures are its job
    thread's and miss io_uring's worker threads."""
    res = fio_run(env, wl, [f"--runtime={int(seconds * 1000)}ms",
                            "--time_based"], seconds + 120)
    base = fio_run(env, wl, ["--number_ios=1"], 120)["cpu_s"]
    res["startup_cpu_s"] = base
    res["cpu_s"] = max(res["cpu_s"] - base, 0.0)
    return res


def bench_quorumblk(policy, env, wl, seconds):
    name, op, bs, depth, step = wl
    paths = ([nbd_uri(e) for e in env["nbd"]["replicas"]] if env.get("nbd")
             else env["replicas"])
    spec = {"paths": paths, "policy": policy, "op": op, "bs": bs,
            "depth": depth, "step": step, "span": env["size"],
            "buffered": not env["direct"], "seconds": seconds,
            "pkg_root": env.get("pkg_root")}
    out, err, rc, _ = run_timed([sys.executable, os.path.abspath(__file__),
                                 "--worker", json.dumps(spec)],
                                timeout=seconds * 4 + 300)
    if rc != 0 or not out.strip():
        raise Failed(f"worker exited {rc}: {err.strip()[-400:]}")
    res = json.loads(out.strip().splitlines()[-1])
    if "error" in res:
        raise Failed(res["error"])
    return res


def worker(spec):
    """Runs in a child process: one quorumblk contender."""
    sys.path[:0] = [spec.get("pkg_root") or ROOT]
    try:
        from quorumblk import Quorum
    except Exception as e:  # the engine is not built yet
        print(json.dumps({"error": f"import quorumblk: {e!r}"}))
        return 0
    try:
        with Quorum(spec["paths"], THRESHOLD, read_policy=spec["policy"],
                    buffered=spec["buffered"], max_io=MIB) as q:
            def run(n):
                before = resource.getrusage(resource.RUSAGE_SELF)
                r = q.bench(spec["op"], spec["bs"], spec["depth"], n,
                            step=spec["step"], start=0, span=spec["span"])
                after = resource.getrusage(resource.RUSAGE_SELF)
                r = dict(r)
                r["engine_cpu_s"] = r.get("cpu_s")
                r["cpu_s"] = (after.ru_utime - before.ru_utime
                              + after.ru_stime - before.ru_stime)
                return r
            guess = 100000 if spec["bs"] == 4096 else 2000
            # CPU is taken inside this process around bench(): no start-up
            res = measured(run, guess, spec["seconds"],
                           4000 if spec["bs"] == 4096 else 64)
            st = q.status()
            res["counters"] = st.get("counters", {})
            res["replica_states"] = [r.get("state") for r in st["replicas"]]
            res["events"] = len(q.events())
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 0
    print(json.dumps(res))
    return 0


# ---------------------------------------------------------------- the run

def contenders(op):
    out = []
    if op == "read":
        out += [(f"quorumblk {p}", "qb", p) for p in POLICIES]
        out += [("qemu quorum", "qemu", "quorum"),
                ("qemu quorum fifo", "qemu", "quorum-fifo")]
    else:
        out += [("quorumblk", "qb", "all"), ("qemu quorum", "qemu", "quorum")]
    out += [("raw (qemu-img)", "qemu", "raw"), ("raw (fio)", "fio", None)]
    return out


def run_one(kind, arg, env, wl, seconds):
    if kind == "qb":
        return bench_quorumblk(arg, env, wl, seconds)
    if kind == "qemu":
        return bench_qemu(arg, env, wl, seconds)
    return bench_fio(env, wl, seconds)


def run_medium(medium, directory, size, args, rows):
    os.makedirs(directory, exist_ok=True)
    direct = direct_ok(directory)
    log(f"[{medium}] {directory}: O_DIRECT {'ok' if direct else 'refused, buffered'};"
        f" writing {REPLICAS + 1} x {size >> 20} MiB")
    replicas, raw = make_images(directory, size)
    env = {"replicas": replicas, "raw": raw, "size": size, "direct": direct,
           "qemu_aio": args.qemu_aio, "pkg_root": args.pkg_root}
    servers = None
    if medium == "nbd":
        servers = NbdServers(replicas + [raw], args.nbd_server)
        env["nbd"] = {"replicas": servers.exports[:REPLICAS],
                      "raw": servers.exports[REPLICAS]}
        log(f"[nbd] {args.nbd_server} on 127.0.0.1 ports "
            f"{', '.join(str(e[1]) for e in servers.exports)}")
    try:
        run_workloads(medium, env, args, rows)
    finally:
        if servers:
            servers.stop()
    check = {"medium": medium, "replicas_agree": images_agree(replicas)}
    if not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
    return check


def run_workloads(medium, env, args, rows):
    direct = env["direct"]
    for wl in WORKLOADS:
        if args.only and wl[0] not in args.only:
            continue
        if medium == "nbd" and wl[0] not in NBD_WORKLOADS:
            continue
        entries = [(label, kind, arg) for label, kind, arg in contenders(wl[1])
                   if not (kind == "fio" and (args.no_fio or medium == "nbd"))]
        got = {label: [] for label, _, _ in entries}
        errors = {}
        # repetitions go round the contenders, so that a burst of load from
        # elsewhere on the machine does not fall on one contender's runs only
        for rep in range(args.reps):
            for label, kind, arg in entries:
                if label in errors:
                    continue
                log(f"[{medium}] {wl[0]:<13} {label} (run {rep + 1}/{args.reps})")
                try:
                    got[label].append(run_one(kind, arg, env, wl, args.seconds))
                except Failed as e:
                    errors[label] = str(e)
                    log(f"    failed: {e}")
        for label, _, _ in entries:
            row = {"medium": medium, "workload": wl[0], "contender": label,
                   "direct": direct}
            runs = got[label]
            if runs:
                rates = [rate(r) for r in runs]
                row.update(max(runs, key=rate))
                row["rates"] = rates
                row["spread"] = (max(rates) - min(rates)) / max(rates)
                if label in errors:	# a later run failed: keep the note
                    row["failed_run"] = errors[label]
            elif label in errors:
                row["error"] = errors[label]
            rows.append(row)


def target_for(row, ref):
    """The issue's target for this row, and whether the figure meets it.
    ref: {"qemu": row of qemu quorum, "raw": row of raw (qemu-img)}."""
    c, m, w = row["contender"], row["medium"], row["workload"]
    q = ref.get("qemu")
    if not c.startswith("quorumblk") or "error" in row or not q or "error" in q:
        return "", ""
    x = rate(row) / rate(q)
    cpu_x = cpu_per_op(row) / cpu_per_op(q) if cpu_per_op(q) else None
    read = w.endswith("read")
    policy = c.split()[-1] if len(c.split()) > 1 else "all"
    if m == "nbd":              # issue 10 sets no figure for NBD
        return "", ""
    if m == "disk":
        if policy == "all":
            ok = x >= 0.95 and cpu_x is not None and cpu_x <= 0.5
            return ">=0.95x qemu, <=0.5x cpu", "met" if ok else "MISSED"
        if policy == "threshold" and read:
            return ">=1.4x qemu", "met" if x >= 1.4 else "MISSED"
        return "", ""
    if w == "1m-seqwrite":
        raw = ref.get("raw")
        if not raw or "error" in raw:
            return ">=0.9x raw/3", "n/a"
        f = rate(row) / (rate(raw) / REPLICAS)
        return ">=0.9x raw/3", "met" if f >= 0.9 else "MISSED"
    return ">=3x qemu", "met" if x >= 3 else "MISSED"


def rate(r):
    return r["ops"] / r["wall_s"] if r.get("wall_s") else 0.0


def cpu_per_op(r):
    return r["cpu_s"] / r["ops"] if r.get("ops") and r.get("cpu_s") is not None else None


def table(rows):
    head = ("medium", "workload", "contender", "IOPS", "MiB/s", "x qemu-q",
            "x raw/3", "x fio/3", "cpu s/GiB", "cpu us/io", "cpu x qemu",
            "spread", "target", "")
    lines = [head]
    refs = {}
    for r in rows:
        key = (r["medium"], r["workload"])
        if r["contender"] == "qemu quorum":
            refs.setdefault(key, {})["qemu"] = r
        elif r["contender"] == "raw (qemu-img)":
            refs.setdefault(key, {})["raw"] = r
        elif r["contender"] == "raw (fio)":
            refs.setdefault(key, {})["fio"] = r
    for r in rows:
        key = (r["medium"], r["workload"])
        ref = refs.get(key, {})
        medium = r["medium"] + ("" if r.get("direct", True) else " (buffered)")
        if "error" in r:
            lines.append((medium, r["workload"], r["contender"], "error", "",
                          "", "", "", "", "", "", "", "", r["error"][:60]))
            continue
        iops = rate(r)
        mibs = r["bytes"] / r["wall_s"] / MIB

        def ratio(name, div=1):
            o = ref.get(name)
            if not o or "error" in o or not rate(o):
                return ""
            return f"{iops / (rate(o) / div):.2f}"
        cpo = cpu_per_op(r)
        qcpo = cpu_per_op(ref["qemu"]) if ref.get("qemu") and "error" not in ref["qemu"] else None
        cpu_gib = r["cpu_s"] / (r["bytes"] / GIB) if cpo is not None else None
        text, met = target_for(r, ref)
        lines.append((
            medium, r["workload"], r["contender"], f"{iops:,.0f}",
            f"{mibs:,.0f}", ratio("qemu"), ratio("raw", REPLICAS),
            ratio("fio", REPLICAS),
            f"{cpu_gib:.2f}" if cpu_gib is not None else "",
            f"{cpo * 1e6:.1f}" if cpo is not None else "",
            f"{cpo / qcpo:.2f}" if cpo is not None and qcpo else "",
            f"{r['spread'] * 100:.0f}%" if "spread" in r else "",
            text, met))
    return format_table(lines, right={3, 4, 5, 6, 7, 8, 9, 10, 11})


def format_table(lines, right):
    """Rows of cells as aligned text: the first row is the head, underlined;
    the columns whose index is in `right` are right-aligned below it."""
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(lines[0]))]
    out = []
    for n, l in enumerate(lines):
        cells = [str(c).rjust(widths[i]) if i in right and n else
                 str(c).ljust(widths[i]) for i, c in enumerate(l)]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.engine",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.5,
                    help="length of each measured run (default 1.5)")
    ap.add_argument("--reps", type=int, default=3,
                    help="runs per figure, taken in turns across the "
                    "contenders; the fastest is kept (default 3)")
    ap.add_argument("--long", action="store_true",
                    help="longer runs: --seconds 8 --reps 5 --size-mib 4096")
    ap.add_argument("--size-mib", type=int, default=1024,
                    help="size of each image (default 1024)")
    ap.add_argument("--media", default="disk,tmpfs",
                    help="comma list of disk,tmpfs,nbd (default disk,tmpfs; "
                    "nbd: the images on tmpfs behind NBD servers on loopback)")
    ap.add_argument("--nbd-dir", default="/dev/shm/quorumblk-bench-nbd")
    ap.add_argument("--nbd-server", choices=("nbdkit", "qemu-nbd"),
                    default="nbdkit", help="the NBD medium's server (default "
                    "nbdkit; QEMU 7.2's qemu-nbd leaves Nagle on over TCP: "
                    "~40 ms per small request)")
    ap.add_argument("--disk-dir", default="/var/tmp/quorumblk-bench")
    ap.add_argument("--tmpfs-dir", default="/dev/shm/quorumblk-bench")
    ap.add_argument("--qemu-aio", default="native",
                    help="qemu-img bench -i for O_DIRECT runs (default native, "
                    "QEMU 7.2's fastest here; io_uring also works)")
    ap.add_argument("--only", action="append",
                    help="run only this workload (repeatable)")
    ap.add_argument("--no-fio", action="store_true")
    ap.add_argument("--keep", action="store_true",
                    help="keep the images afterwards")
    ap.add_argument("--json", help="write results here (default "
                    "bench/results/engine-DATE.json)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.long:
        args.seconds, args.reps = max(args.seconds, 8.0), max(args.reps, 5)
        args.size_mib = max(args.size_mib, 4096)
    for tool in ("qemu-img", "fio"):
        if not shutil.which(tool):
            log(f"{tool} not found: run scripts/setup (Debian packages "
                "qemu-utils, fio)")
            return 2

    info = system_info()
    load0 = os.getloadavg()[0]
    size = args.size_mib * MIB
    # every worker imports the same build: a copy taken now, so a rebuild
    # in the checkout during the run cannot mix two engines in one table
    args.pkg_root = tempfile.mkdtemp(prefix="qb-bench-pkg-")
    shutil.copytree(os.path.join(ROOT, "quorumblk"),
                    os.path.join(args.pkg_root, "quorumblk"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    rows, checks = [], []
    started = time.monotonic()
    dirs = {"disk": args.disk_dir, "tmpfs": args.tmpfs_dir,
            "nbd": args.nbd_dir}
    for medium in args.media.split(","):
        checks.append(run_medium(medium, dirs[medium], size, args, rows))
    elapsed = time.monotonic() - started
    shutil.rmtree(args.pkg_root, ignore_errors=True)

    text = table(rows)
    header = (f"quorumblk engine benchmark, {REPLICAS} replicas, threshold "
              f"{THRESHOLD}, images {args.size_mib} MiB, {args.seconds:g} s "
              f"per run, best of {args.reps} taken in turns\n"
              f"date {info['date']}  commit {info['commit']}  kernel "
              f"{info['kernel']}\ncpu {info['cpu']} x{info['cpus']}  "
              f"{info['qemu_img']}  {info['fio']}\n"
              "random = stride 4096*7919 (qemu-img bench -S; fio: lfsr); "
              "x raw/3 = rate / (one raw file's rate / 3); cpu = user+sys of "
              "the whole process per request, start-up removed;\n"
              "spread = (fastest - slowest run) / fastest; load average "
              f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
              f"({info['cpus']} CPUs: above that, other work shared them)")
    print(header)
    print(text)
    for c in checks:
        print(f"[{c['medium']}] replicas identical after the run: "
              f"{'yes' if c['replicas_agree'] else 'NO (diverged)'}")
    for r in rows:
        cnt = r.get("counters") or {}
        bad = {k: cnt.get(k) for k in ("bad_blocks", "errors", "timeouts",
                                       "quorum_failures") if cnt.get(k)}
        if bad or r.get("errors"):
            print(f"[{r['medium']}] {r['workload']} {r['contender']}: "
                  f"errors {r.get('errors')} counters {bad}")
    print(f"total {elapsed:.0f} s")

    os.makedirs(RESULTS, exist_ok=True)
    path = args.json or os.path.join(
        RESULTS, "engine-" + info["date"].replace(":", "") + ".json")
    with open(path, "w") as f:
        json.dump({"system": info, "args": {k: v for k, v in vars(args).items()
                                            if k != "worker"},
                   "rows": rows, "checks": checks, "table": text}, f, indent=1)
    print(f"results: {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
