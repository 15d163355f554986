"""The worker process: the replica set opened the way `quorumblk add` does
without the device (meta.assemble, Quorum, meta.commit, Quorum.set_meta,
then the resync as a lifecycle job), serving what the controller sends
(protocol.py).

It reports ready as soon as the set is attached, as the daemon goes LIVE:
the resync runs meanwhile, so that the controller's load and its read-back
after a crash meet regions not yet resynced (read by the crash rule). The
controller paces it (config "resync": sync pieces of `step` bytes, over
about `seconds`), and the worker reports its end ("resynced"). Commands
that change the set or scrub wait for it first (a job runs: they would be
refused); faults, fail, status and the load do not.

The device mode's worker (device.py) is a subclass: the same lanes and
commands over /dev/ublkbN and the quorumblk command instead of the engine;
the few things it does differently are the methods it overrides.

Operations run on lanes of threads: "load" (the batch, several threads)
and "probe" (one thread, for the thrasher's single reads and writes, so
they do not wait behind the batch). Writes take a range lock, so writes in
flight never overlap; reads take none. Control commands (faults, replica
changes, jobs, status) run one at a time on a control thread.
"""
import errno
import faulthandler
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback

from quorumblk import DegradedError, NoQuorumError, QuorumError, core, lifecycle, meta
from quorumblk.core import Quorum

from .payload import decode, payload
from .protocol import DIAGNOSIS_DONE, encode

LATE_FAULTS = "late" in core.FAULTS        # the new engine: held until release
JOB_LIMIT = 60.0                           # seconds a lifecycle job may take
LOCKED = ("write", "write-fua", "discard", "write-zeroes")
# control commands that start a lifecycle job or change the set: they wait
# for the resync (Lifecycle refuses them while a job runs); and a clean stop
AFTER_RESYNC = ("readd", "heal", "cycles", "late", "scrub", "replace",
                "add_replica", "remove_replica", "stop")


class ReaddLimit(Exception):
    """The worker did as many readds as it was allowed."""


class JobFailed(RuntimeError):
    """A lifecycle job ended in an error (of class error_type)."""

    def __init__(self, message, error_type):
        super().__init__(message)
        self.error_type = error_type


class Out:
    """The report pipe: the process's original stdout, one writer at a time.
    Anything else printed goes to stderr (the worker's log)."""

    def __init__(self):
        self.fd = os.dup(1)
        os.dup2(2, 1)
        self.lock = threading.Lock()

    def send(self, **msg):
        data = encode(msg)
        with self.lock:
            while data:
                data = data[os.write(self.fd, data):]


class RangeLocks:
    def __init__(self):
        self.cond = threading.Condition()
        self.held = []

    def acquire(self, offset, length):
        with self.cond:
            while any(o < offset + length and offset < o + n for o, n in self.held):
                self.cond.wait()
            self.held.append((offset, length))

    def release(self, offset, length):
        with self.cond:
            self.held.remove((offset, length))
            self.cond.notify_all()


class Lane:
    """Threads running ops from one queue. poke() makes each of them call
    the engine once more even when idle: the new engine reaps a late
    completion in the thread that issued the I/O, at its next call."""

    def __init__(self, name, threads, run, nudge):
        self.queue = queue.Queue()
        self.pokes = [threading.Event() for _ in range(threads)]
        for k in range(threads):
            threading.Thread(target=self._loop, args=(run, nudge, self.pokes[k]),
                             daemon=True, name=f"{name}-{k}").start()

    def _loop(self, run, nudge, poked):
        while True:
            try:
                op = self.queue.get(timeout=0.05)
            except queue.Empty:
                if poked.is_set():
                    poked.clear()
                    nudge()
                continue
            run(op)

    def poke(self):
        for p in self.pokes:
            p.set()


def error_kind(e):
    if isinstance(e, NoQuorumError):
        return "noquorum"
    if isinstance(e, DegradedError):
        return "degraded"
    return errno.errorcode.get(e.errno, str(e.errno))


def dump_stacks(q=None):
    """Every thread's C and Python stack into the log (stderr), and what the
    engine's contexts are doing: the diagnosis of a hang."""
    faulthandler.dump_traceback(all_threads=True)
    if q is not None:
        print(q.describe(), file=sys.stderr, flush=True)
    if shutil.which("gdb"):
        subprocess.run(["gdb", "-p", str(os.getpid()), "-batch", "-ex",
                        "thread apply all bt"], stdout=2, stderr=2, timeout=120)


def diagnose_on_signal(worker):
    """SIGUSR2 (from the controller, before it kills a hung worker) dumps
    the diagnosis, then DIAGNOSIS_DONE. A thread of its own takes the
    signal: the others may be stuck in the engine. Called before any other
    thread starts, so that every thread inherits the blocked signal."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})

    def wait():
        while True:
            signal.sigwait({signal.SIGUSR2})
            try:
                dump_stacks(worker.q)
            finally:
                print(DIAGNOSIS_DONE, file=sys.stderr, flush=True)
    threading.Thread(target=wait, daemon=True, name="diagnosis").start()


def open_fds(pid="self"):
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid="self"):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Worker:
    def __init__(self, config, out):
        self.cfg = config
        self.out = out
        self.timeout = config["timeout"]
        self.locks = RangeLocks()
        self.q = None
        self.life = None
        self.lanes = []
        self.cycles = 0                 # fail + readd cycles done
        self.readds = 0                 # readds asked of the engine
        self.readd_limit = config.get("readd_limit") or 0
        self.events = {}
        self.resync_job = None

    # -- the replica set --
    def open(self):
        """Assemble and attach the set; the resync it needs starts as a job
        and runs on after this returns (as assembly.prepare and the
        daemon's start do). Returns its report (updated as it runs)."""
        c = self.cfg
        plan = meta.assemble(c["paths"], c["threshold"], c["region_shift"])
        self.q = Quorum(c["paths"], c["threshold"], timeout=c["timeout"],
                        events_per_sec=0, read_policy=c["read_policy"],
                        max_io=c["max_io"])
        meta.commit(c["paths"], plan)
        self.q.set_meta(plan.metas, plan.bitmap)
        self.life = lifecycle.Lifecycle(self.q)
        rs = meta.Resync(self.q, plan)
        if not rs.needed:
            rs.run()
            return rs.report
        pace = c.get("resync") or {}
        if pace.get("step"):            # smaller pieces: synced regions show up one by one
            meta.SYNC_STEP = pace["step"]
        rate = rs.total / pace["seconds"] if pace.get("seconds") and rs.total else None
        self.resync_job = self.life.resync(rs, rate)
        return rs.report

    def wait_resync(self):
        """Wait until the resync started at open (if any) has ended; its
        end as {"state", "error", "error_type"}, or None if none ran.
        TimeoutError (the stacks in the log) if it outlives JOB_LIMIT."""
        job = self.resync_job
        if job is None:
            return None
        try:
            self.wait_job(job)
        except JobFailed:
            pass                        # the end says so
        return {"state": job.state, "error": job.error, "error_type": job.error_type}

    def watch_resync(self):
        """Report the resync's end to the controller ("resynced"), from a
        thread of its own; started once ready is sent."""
        def watch():
            try:
                end = self.wait_resync()
            except TimeoutError as e:
                end = {"state": "timeout", "error": str(e), "error_type": "TimeoutError"}
            except Exception as e:      # the device's daemon went away (a crash)
                end = {"state": "unknown", "error": str(e), "error_type": type(e).__name__}
            if end is not None:
                self.out.send(ev="resynced", **end)
        threading.Thread(target=watch, daemon=True, name="resync-watch").start()

    def ready(self):
        """What the ready message says besides the replicas."""
        return {}

    def index(self, path):
        """The engine index of a replica path (the live one, not removed)."""
        states = self.q.replica_states()
        for i, p in enumerate(self.q.paths):
            if p == path and states[i] != "removed":
                return i
        raise LookupError(f"{path} is not a replica of the running set")

    def state(self, path):
        return self.q.replica_states()[self.index(path)]

    def view(self):
        return {"paths": list(self.q.paths), "states": self.q.replica_states()}

    # -- what the engine and the device do differently (device.py) --
    def run_job(self, kind, *args):
        """A lifecycle job (readd, scrub, replace, add-replica) to its end."""
        return self.wait_job(getattr(self.life, kind.replace("-", "_"))(*args))

    def remove(self, path):
        return self.life.remove_replica(path)

    def fail(self, path):
        """Take path out of service, as a failure would."""
        self.q.set_state(self.index(path), "failed")

    def clear_fault(self, path):
        """path's fault ends; what it still held is released."""
        i = self.index(path)
        self.q.inject(i, None)
        if LATE_FAULTS:
            self.q.release(i)

    def served(self):
        """(status with per-replica counters, new events, pid serving I/O)"""
        return self.q.status(), self.q.events(), "self"

    def close(self):
        self.q.close()

    # -- operations --
    def run_op(self, op):
        op_id, kind, offset, length, version = op
        data = payload(version, offset, length) if kind in ("write", "write-fua") else None
        locked = kind in LOCKED
        if locked:
            self.locks.acquire(offset, length)
        try:
            got = self._timed(op_id, kind, offset, length, data, version)
        finally:
            if locked:
                self.locks.release(offset, length)
        if got is not None:
            self.out.send(ev="r", id=op_id, runs=decode(got, offset))

    def _timed(self, op_id, kind, offset, length, data, version):
        got = None
        t0 = time.monotonic()
        self.out.send(ev="s", id=op_id, t=t0)
        try:
            got = self._call(kind, offset, length, data, version)
        except QuorumError as e:
            self.out.send(ev="e", id=op_id, ok=0, dur=time.monotonic() - t0,
                          err=error_kind(e), errno=e.errno, text=str(e))
            return None
        except Exception:
            self.out.send(ev="e", id=op_id, ok=0, dur=time.monotonic() - t0,
                          err="exception", errno=0, text=traceback.format_exc())
            return None
        self.out.send(ev="e", id=op_id, ok=1, dur=time.monotonic() - t0)
        return got

    def _call(self, kind, offset, length, data, version):
        q = self.q
        if kind == "read":
            return q.read(offset, length)
        if kind in ("write", "write-fua"):
            q.write(offset, data, fua=kind == "write-fua")
        elif kind == "flush":
            q.flush()
        elif kind == "discard":
            q.discard(offset, length)
        elif kind == "write-zeroes":
            q.write_zeroes(offset, length)
        elif kind == "stall":           # the campaign's self-test of its clock
            time.sleep(version / 1000.0)
        else:
            raise ValueError(f"unknown op kind {kind}")
        return None

    # -- control commands --
    def run_control(self, msg):
        cid = msg.pop("cid")
        name = msg.pop("cmd")
        try:
            if name.replace("-", "_") in AFTER_RESYNC:
                self.wait_resync()
            result = getattr(self, "cmd_" + name.replace("-", "_"))(**msg)
            self.out.send(ev="c", cid=cid, ok=1, result=result, **self.view())
        except Exception as e:
            self.out.send(ev="c", cid=cid, ok=0, error=str(e), type=type(e).__name__,
                          errno=getattr(e, "errno", None), **self.view())

    def wait_job(self, job):
        deadline = time.monotonic() + JOB_LIMIT
        while job.state == "running":
            if time.monotonic() > deadline:
                dump_stacks(self.q)
                raise TimeoutError(f"{job.kind} did not end in {JOB_LIMIT} s "
                                   f"({job.to_dict()['percent']}% done); the worker's "
                                   "stacks are in worker.log")
            time.sleep(0.005)
        if job.state != "done":
            raise JobFailed(f"{job.kind} failed: {job.error}", job.error_type)
        return job.result

    def wait_state(self, path, cond, seconds):
        deadline = time.monotonic() + seconds
        while not cond(self.state(path)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def readd(self, path):
        if self.readd_limit and self.readds >= self.readd_limit:
            raise ReaddLimit(f"this worker did its {self.readd_limit} readds "
                             "(--readd-limit): the campaign restarts it")
        self.readds += 1
        return self.run_job("readd", path)

    def bring_back(self, path):
        """Readd path until it is in service; the new engine refuses while
        the replica still owes abandoned I/O (lifecycle.OwedError): then
        wait."""
        refused = 0
        for _ in range(40):
            if self.state(path) == "in-service":
                return {"back": True, "refused_busy": refused}
            try:
                self.readd(path)
            except lifecycle.OwedError:
                refused += 1
                for lane in self.lanes:
                    lane.poke()
                time.sleep(0.25)
        return {"back": self.state(path) == "in-service", "refused_busy": refused}

    def cmd_status(self):
        st, events, pid = self.served()
        counts, failures = {}, []
        for e in events:
            counts[e["type"]] = counts.get(e["type"], 0) + 1
            if e["type"] in ("replica-failed", "replica-error"):
                failures.append({k: e[k] for k in ("type", "path", "offset", "length",
                                                   "errno", "time")})
        keys = ("timeouts", "errors", "late", "owed", "bad_blocks", "repairs")
        return {"replicas": [{k: r.get(k) for k in keys} for r in st["replicas"]],
                "events": counts, "failures": failures[-20:], "fds": open_fds(pid),
                "rss": rss_bytes(pid), "cycles": self.cycles, "readds": self.readds}

    def cmd_inject(self, replica, kind, ops, offset, length, count, delay=0.0):
        self.q.inject(self.index(replica), kind, ops=tuple(ops), offset=offset,
                      length=length, count=count, delay=delay)
        return {}

    def cmd_fail(self, replica):
        self.fail(replica)
        return {}

    def cmd_readd(self, replica):
        if self.state(replica) == "in-service":
            return {"skipped": "in service"}
        try:
            return self.readd(replica)
        except JobFailed as e:
            if e.error_type != "UnsettledError":
                raise
            # blocks without quorum in what it missed: kept out, as it must be
            return {"kept_out": str(e)}

    def cmd_heal(self, replica):
        """Clear the replica's fault, let what it still had out be
        abandoned, and bring it back."""
        self.clear_fault(replica)
        time.sleep(self.timeout * 1.5)
        return self.bring_back(replica)

    def cmd_cycles(self, replica, count):
        pid = self.served()[2]
        before = {"fds": open_fds(pid), "rss": rss_bytes(pid)}
        done = 0
        for _ in range(count):
            if self.readd_limit and self.readds >= self.readd_limit - 1:
                break
            self.fail(replica)
            self.readd(replica)
            done += 1
            self.cycles += 1
        time.sleep(0.05)                # the last job thread's context goes
        return {"done": done, "before": before,
                "after": {"fds": open_fds(pid), "rss": rss_bytes(pid)}}

    def cmd_late(self, replica, ops, delay, clean_after):
        """A replica I/O completes late: the old engine's "delay" (it starts
        `delay` s after it was issued, past the timeout), or the new engine's
        "late" (held until released). The replica fails at the timeout and
        is readded (and its bits cleaned, with clean_after); the late I/O
        lands when it will, and the command returns once it has, so that
        the audit after the step sees where it landed."""
        i = self.index(replica)
        if LATE_FAULTS:
            self.q.inject(i, "late", ops=tuple(ops))
        else:
            self.q.inject(i, "delay", ops=tuple(ops), delay=delay, count=1)
        t0 = time.monotonic()
        failed = self.wait_state(replica, lambda s: s != "in-service",
                                 self.timeout * 4 + 1.0)
        failed_at = time.monotonic()
        self.q.inject(i, None)
        time.sleep(self.timeout * 1.5)
        out = {"failed": failed or self.state(replica) != "in-service"}
        if LATE_FAULTS and out["failed"]:
            try:
                self.readd(replica)
                out["readd_while_owed"] = "accepted"
            except lifecycle.OwedError:
                out["readd_while_owed"] = "refused"
            finally:
                self.q.release(i)
        out.update(self.bring_back(replica))
        if clean_after:
            out["cleaned"] = self.q.clean(idle=0)
        if not LATE_FAULTS and failed:
            # the abandoned I/O was issued about a timeout before the failure
            landed = max(t0, failed_at - self.timeout) + delay + 0.3
            out["readd_before_landing"] = time.monotonic() < landed - 0.3
            time.sleep(max(0.0, landed - time.monotonic()))
        return out

    def cmd_scrub(self):
        return self.run_job("scrub")

    def cmd_clean(self, idle):
        return {"cleared": self.q.clean(idle=idle)}

    def cmd_replace(self, old, new):
        return self.run_job("replace", old, new)

    def cmd_add_replica(self, path):
        return self.run_job("add-replica", path)

    def cmd_remove_replica(self, replica):
        return self.remove(replica)

    def cmd_stop(self):
        self.close()
        self.out.send(ev="stopped")
        os._exit(0)

    # -- the loop --
    def nudge(self):
        """A read nobody asked for (its data is not reported): the calling
        thread's engine context looks at its ring again."""
        try:
            self.q.read(0, 512)
        except QuorumError:
            pass

    def serve(self):
        lanes = {"load": Lane("load", self.cfg["threads"], self.guarded(self.run_op),
                              self.nudge),
                 "probe": Lane("probe", 1, self.guarded(self.run_op), self.nudge)}
        self.lanes = list(lanes.values())
        control = Lane("control", 1, self.guarded(self.run_control), lambda: None)
        for line in sys.stdin:
            msg = json.loads(line)
            if msg["cmd"] == "ops":
                for op in msg["ops"]:
                    lanes[msg.get("lane", "load")].queue.put(op)
            else:
                control.queue.put(msg)
        os._exit(0)                      # the controller went away

    def guarded(self, fn):
        def call(arg):
            try:
                fn(arg)
            except Exception:
                self.out.send(ev="error", text=traceback.format_exc())
        return call


def main():
    config = json.loads(sys.stdin.readline())
    out = Out()
    faulthandler.enable()           # a crash in the engine leaves its trace in the log
    if config.get("device"):
        from .device import DeviceWorker
        worker = DeviceWorker(config, out)
    else:
        worker = Worker(config, out)
    diagnose_on_signal(worker)
    try:
        report = worker.open()
    except (meta.SetError, QuorumError) as e:
        out.send(ev="assemble-failed", error=str(e))
        os._exit(3)
    out.send(ev="ready", resync=report, pid=os.getpid(), late_faults=LATE_FAULTS,
             **worker.ready(), **worker.view())
    worker.watch_resync()
    worker.serve()


if __name__ == "__main__":
    main()
