"""One run of a schedule: the controller's loop and every invariant.

For each step the controller sends the batch to the worker, fires the
action when its share of the batch has ended, and handles the worker's
reports in pipe order:
  - an op's start takes a snapshot of what its sectors may hold and notes
    whether the damage so far allows it an EIO;
  - an op's end checks its time (at most the replica timeout plus a
    margin), and its error (EIO only where no quorum could exist, or a
    write raced the read); an acknowledged write becomes the sectors'
    version, a failed one a possible version;
  - a read's data must be, sector by sector, a version the model allows.
After each step (checkpoint): the replica states, the worker's fds and RSS,
and an audit of the image files: in-service copies that differ must hold
versions the model allows (or a known flip), and where the bitmap on the
replicas is clean every member must hold the same bytes.
A crash (kill -9 of the worker, deliberate or not): what was in flight
becomes possible, the files are audited as the next assembly will see
them, a new worker assembles and reports ready while its resync runs (as
the daemon goes LIVE), and every sector is read back meanwhile, by the
crash rule where the resync has not been yet: each must hold its
acknowledged version or a newer one that was in flight; the model then
settles on what was read (model.py: the first read after a crash settles
a sector, every later read must agree). The resync's pace is drawn per
worker start from the seed (resync_pace); its end is reported
("resynced"): a failure with a quorum in service is a violation. The
worker makes the commands that need no job running wait for it.
At the end: every fault cleared, every member back, a scrub, and every
in-service replica's data area byte-identical and as the model says.

The device mode (Setup.device) runs the same loop and checks over
/dev/ublkbN (device.py's worker, dm.py's replicas). Its crash is the
daemon's: every dm fault is lifted (a daemon with I/O held in a suspended
device cannot die), kill -9 of the daemon, then of the worker (whose I/O
waits on the quiesced device: it dies once that I/O is done), the audit,
and `quorumblk recover` in the next worker; the old worker must then be
gone before the read-back.
"""
import signal
import subprocess
import sys
import collections
import errno
import os
import random
import time

from .model import BLOCK, SECTORS_PER_BLOCK, Damage, Op, Tracker, Versions
from .payload import GARBAGE, SECTOR
from .protocol import Channel
from .audit import Audit, describe
from .replicas import ReplicaFiles
from .thrasher import ForControl, ForOp, Kill, Sleep, Thrasher

HARD_LIMIT = 20.0           # seconds past timeout + margin: the worker is killed
REAP_LIMIT = 120.0          # seconds a worker killed at a device crash may take to die
CONTROL_LIMIT = 330.0       # a control command (jobs included) at most
START_LIMIT = 120.0         # a worker's assembly and resync at most
CATEGORIES = ("wrong-read", "lost-write", "unexpected-eio", "hang")
RESYNC_STEPS = (64 << 10, 256 << 10, 1 << 20)   # sync pieces of a paced resync
RESYNC_SECONDS = (0.5, 1.5, 4.0)                # its length, about


class Abort(Exception):
    """The run cannot go on (the set no longer assembles)."""


class Violation:
    def __init__(self, category, step, detail):
        self.category = category
        self.step = step
        self.detail = detail

    def to_dict(self):
        return {"category": self.category, "step": self.step, "detail": self.detail}

    def __str__(self):
        return f"step {self.step}: {self.category}: {self.detail}"


class Stats:
    def __init__(self):
        self.ops = collections.Counter()        # checked, by kind
        self.sectors_read = 0
        self.faults = collections.Counter()     # injected, by kind
        self.skipped = collections.Counter()
        self.refused = collections.Counter()
        self.notes = collections.Counter()
        self.events = collections.Counter()     # the engine's, by type
        self.eio_expected = 0
        self.eio_raced = 0
        self.excused = 0
        self.steps = 0
        self.workers = 0
        self.restarts = 0                       # clean ones (--readd-limit)
        self.crashes = collections.Counter()
        self.resync = collections.Counter()     # live resyncs: starts, paced, reads, kills
        self.late = []
        self.bursts = []                        # fds and RSS around bursts
        self.lives = []                         # fds and RSS per worker life
        self.final = {}


class Life:
    """One worker's fds and RSS, first and last seen, and its cycles."""

    def __init__(self):
        self.first = None
        self.last = None
        self.cycles = 0

    def sample(self, status):
        point = {"fds": status["fds"], "rss": status["rss"], "cycles": status["cycles"]}
        self.first = self.first or point
        self.last = point


class Campaign:
    def __init__(self, setup, schedule, workdir, steps=None, deadline=None,
                 margin=2.0, log=None, stop_on_violation=True, readd_limit=0,
                 ignore=()):
        self.setup = setup
        self.schedule = schedule
        self.dir = workdir
        self.steps = steps
        self.deadline = deadline
        self.margin = margin
        self.log = log or (lambda text: None)
        self.stop_on_violation = stop_on_violation
        self.readd_limit = readd_limit      # a fresh worker before that many readds
        self.ignore = frozenset(ignore)     # categories only counted (known defects)
        self.files = ReplicaFiles(workdir, setup)
        self.versions = Versions(setup.size // SECTOR)
        self.tracker = Tracker(self.versions)
        self.damage = Damage([], setup.threshold)
        self.thrasher = Thrasher(self)
        self.audit = Audit(self)
        self.stats = Stats()
        self.violations = []
        self.channel = None
        self.members = []           # paths of the set, in assembly order
        self.view = {}              # path -> engine state, as last reported
        self.engine_paths = []
        self.joining = set()        # paths attached (or about to be)
        self.leaving = set()        # paths a replace or remove in flight takes out
        self.ops = {}               # op id -> Op sent, not ended
        self.reads = {}             # op id -> read ended ok, data to come
        self.controls = {}          # cid -> (name, started)
        self.batch = set()
        self.batch_ended = 0
        self.script = None
        self.waiting = None
        self.step_index = 0
        self.window = (0, setup.size)
        self.next_id = 1
        self.next_cid = 1
        self.fresh_version = 0
        self.life = None
        self.in_flight_at_crash = []
        self.excused_blocks = set()
        self.results = {}           # cid -> end message, for call()
        self.late_faults = False
        self.device = {}            # device mode: dev_id, dev_path, daemon_pid
        self.resyncing = False      # the worker's resync has not reported its end
        self.resync_since = 0.0
        self.pace = {}
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------ run
    def run(self):
        os.makedirs(os.path.join(self.dir, "run"), exist_ok=True)
        self.members = [self.files.new() for _ in range(self.setup.replicas)]
        self.damage = Damage(self.members, self.setup.threshold)
        try:
            self.start_worker()
            for step in self.schedule.steps():
                if self.steps is not None and step.index >= self.steps:
                    break
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    break
                self.step_index = step.index
                self.run_step(step)
                if not self.stopped():
                    self.checkpoint()
                self.stats.steps += 1
                if self.stopped():
                    break
            if not self.stopped():
                self.step_index = "final"
                self.final_check()
        except Abort as e:
            self.violation("set-lost", str(e))
        finally:
            self.shutdown()
        return self

    def stopped(self):
        return self.stop_on_violation and bool(self.violations)

    def violation(self, category, detail):
        if category in self.ignore:
            self.stats.notes[f"ignored {category}"] += 1
            self.note(f"ignored {category}: {detail}")
            return
        v = Violation(category, self.step_index, detail)
        self.violations.append(v)
        self.log(f"VIOLATION {v}")
        self.note(f"VIOLATION {category}: {detail}")

    @staticmethod
    def now():
        """CLOCK_MONOTONIC, as the worker's stamps."""
        return time.monotonic()

    def note(self, text):
        """A line in the run's own log (campaign.log beside the images)."""
        with open(os.path.join(self.dir, "campaign.log"), "a") as f:
            f.write(f"{time.monotonic() - self.t0:9.3f} step {self.step_index}: {text}\n")

    # --------------------------------------------------------------- worker
    def worker_config(self, paths):
        s = self.setup
        self.pace = self.resync_pace()
        return {"paths": paths, "threshold": s.threshold, "timeout": s.timeout,
                "region_shift": s.region_shift, "read_policy": s.read_policy,
                "max_io": s.max_io, "threads": s.threads, "readd_limit": self.readd_limit,
                "device": s.device, "workdir": self.dir, "size": s.size,
                "dev_id": self.device.get("dev_id"), "resync": self.pace}

    def resync_pace(self):
        """How the next worker's resync runs, from the seed and the start's
        number: a quarter at full speed in 16 MiB pieces (as the daemon),
        the rest paced in small pieces over a second or more, so that the
        read-back and the load surely meet regions both before and after
        the resync passed them. (The device mode's daemon keeps its own.)"""
        rng = random.Random(f"{self.setup.seed}/resync/{self.stats.workers}")
        if rng.random() < 0.25:
            return {}
        return {"step": rng.choice(RESYNC_STEPS), "seconds": rng.choice(RESYNC_SECONDS)}

    def start_worker(self):
        """Assemble the set in a new worker: the members, and replicas that
        were joining. A crash may cut a replace or a remove short: then a
        joining replica may never have got its metadata, and a leaving one
        may be out of the set already; the assembly refuses them, and they
        are dropped. Any other refusal ends the run."""
        candidates = self.members + sorted(self.joining - set(self.members))
        for _ in range(len(candidates) + 1):
            self.channel = Channel(self.worker_config(candidates),
                                   os.path.join(self.dir, "worker.log"),
                                   {"QUORUMBLK_RUN_DIR": self.run_dir()})
            msg = self.wait_for(("ready", "assemble-failed", "eof"), START_LIMIT)
            if msg and msg["ev"] == "ready":
                break
            error = (msg or {}).get("error", "the worker died while assembling")
            self.channel.kill()
            self.channel.close()
            dropped = [p for p in candidates if p in error and
                       (p in self.joining or p in self.leaving)]
            if not dropped:
                raise Abort(f"the replicas no longer assemble: {error}")
            self.note(f"the assembly refused {dropped}: {error}")
            candidates = [p for p in candidates if p not in dropped]
            self.joining -= set(dropped)
        else:
            raise Abort("the replicas no longer assemble")
        self.stats.workers += 1
        self.late_faults = msg.get("late_faults", False)
        if self.setup.device:
            self.device = {k: msg[k] for k in ("dev_id", "dev_path", "daemon_pid")}
        self.joining.clear()
        self.leaving.clear()
        resync = msg.get("resync") or {}
        self.resyncing = resync.get("reason", "none") != "none"
        self.resync_since = self.now()
        if self.resyncing:
            self.stats.resync["starts"] += 1
            self.stats.resync["paced"] += bool(self.pace)
        self.apply_view(msg, judge=False)
        self.damage.down = {p for p in self.members if self.view[p] != "in-service"}
        self.damage.meta_victim = None
        self.thrasher.faulted.clear()
        self.life = Life()
        self.stats.lives.append(self.life)

    def restart(self, reason):
        """A clean stop of the worker and a new one on the same replicas."""
        self.note(f"a fresh worker ({reason})")
        self.stats.restarts += 1
        self.channel.stop()
        self.start_worker()

    def wait_for(self, kinds, limit):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            msg = self.channel.get(0.2)
            if msg is None:
                continue
            if msg["ev"] in kinds:
                return msg
            self.handle(msg)
        return None

    def apply_view(self, msg, judge=True):
        """The worker's replica list and states: membership follows it. A
        member out of service that the thrasher did not take down failed
        on its own: that is a finding (judge)."""
        paths, states = msg["paths"], msg["states"]
        self.engine_paths = paths
        self.view = {p: st for p, st in zip(paths, states) if st != "removed"}
        self.members = [p for p in paths if p in self.view]
        joined = [p for p in self.members if p not in self.damage.members]
        self.damage.set_members(self.members + sorted(self.joining - set(self.view)))
        self.damage.down |= set(joined)
        for p in self.members:
            if self.view[p] != "in-service":
                if judge and p not in self.damage.down:
                    self.violation("unexplained-failure", f"{os.path.basename(p)} is "
                                   f"{self.view[p]} and no fault of the thrasher's "
                                   f"touched it; the engine said: "
                                   f"{self.failure_events(msg, p)}")
                self.damage.down.add(p)
            elif p not in self.thrasher.faulted and p not in self.joining:
                self.damage.up(p, self.now())

    def failure_events(self, msg, path):
        """The engine's failure events for path, when msg is a status."""
        result = msg.get("result") or {}
        return [f"{e['type']} {e['errno']} at {e['offset']}+{e['length']}"
                for e in result.get("failures", []) if e["path"] == path] or "(no events here)"

    def engine_slots_left(self):
        return 16 - len(self.engine_paths)

    def shutdown(self):
        if self.channel is not None:
            self.channel.stop()
            self.channel = None
        if self.setup.device:
            if self.device:         # the worker could not delete it
                subprocess.run([sys.executable, "-m", "quorumblk", "del",
                                str(self.device["dev_id"])], capture_output=True,
                               env=dict(os.environ, QUORUMBLK_RUN_DIR=self.run_dir()),
                               timeout=120)
            self.files.release()

    def run_dir(self):
        return os.path.join(self.dir, "run")

    # ------------------------------------------------------------- commands
    def control(self, name, **args):
        cid = self.next_cid
        self.next_cid += 1
        self.controls[cid] = (name, time.monotonic())
        self.note(f"control {cid} {name} {args}")
        self.channel.send(dict(args, cmd=name, cid=cid))
        return ForControl(cid)

    def new_version(self):
        """A write id outside the batches' (step * 100000 + op)."""
        self.fresh_version += 1
        return self.step_index_number() * 100000 + 90000 + self.fresh_version % 10000

    def step_index_number(self):
        return self.step_index if isinstance(self.step_index, int) else 10 ** 7

    def send_ops(self, ops, lane):
        for op in ops:
            self.ops[op.id] = op
        self.channel.send({"cmd": "ops", "lane": lane, "ops": [
            [op.id, op.kind, op.offset, op.length, op.version] for op in ops]})

    def new_op(self, kind, offset, length, version=None, lane="load"):
        if version is None:
            version = self.new_version() if kind in ("write", "write-fua") else 0
        op = Op(self.next_id, kind, offset, length, version, lane)
        self.next_id += 1
        return op

    def probe(self, kind, offset, length, version=None):
        op = self.new_op(kind, offset, length, version, lane="probe")
        self.send_ops([op], "probe")
        return ForOp(op.id)

    def damage_changed(self):
        """Damage grew: ops in flight may now fail with EIO."""
        for op in self.tracker.running.values():
            op.eio_ok = op.eio_ok or self.eio_possible(op)

    def eio_possible(self, op):
        """No quorum could exist for op at some time since it really
        started (the worker's stamp): an EIO is allowed."""
        if op.kind == "read":
            return self.damage.no_quorum_possible(op.blocks(), op.started_at)
        return self.damage.degraded(op.started_at)

    def note_cycles(self, result):
        self.stats.bursts.append(result)
        k = result["done"]
        before, after = result["before"], result["after"]
        if k >= 8 and after["fds"] - before["fds"] >= k // 2:
            self.violation("fd-leak", f"{after['fds'] - before['fds']} more open fds "
                           f"after {k} fail/readd cycles")
        if k >= 8 and after["rss"] - before["rss"] > 64 << 20:
            self.violation("rss-growth", f"RSS grew {(after['rss'] - before['rss']) >> 20} "
                           f"MiB over {k} fail/readd cycles")

    # ---------------------------------------------------------------- steps
    def run_step(self, step):
        self.window = step.batch.window
        base = step.index * 100000
        ops = [self.new_op(s.kind, s.offset, s.length, base + k + 1 if
                           s.kind in ("write", "write-fua") else 0)
               for k, s in enumerate(step.batch.ops)]
        self.batch = {op.id for op in ops}
        self.batch_ended = 0
        self.send_ops(ops, "load")
        fire_after = int(step.action.fire * len(ops))
        self.note(f"batch {step.batch.profile} of {len(ops)} ops in {step.batch.window}; "
                  f"action {step.action.kind} {step.action.params} at {fire_after}")
        fired = False
        while True:
            if not fired and (self.batch_ended >= fire_after or not self.batch):
                fired = True
                self.start_script(self.thrasher.script(step.action))
            if fired and not self.batch and self.script is None and not self.controls \
                    and not self.reads:
                return
            if self.stopped():
                return
            self.pump(0.05)

    def pump(self, timeout):
        msg = self.channel.get(timeout)
        if msg is not None:
            self.handle(msg)
        if isinstance(self.waiting, Sleep) and time.monotonic() >= self.waiting.until:
            self.advance(None)
        self.watchdog()

    def start_script(self, script):
        self.script = script
        self.advance(None)

    def run_script(self, script):
        """Run a script to its end, pumping meanwhile."""
        self.start_script(script)
        while self.script is not None and not self.stopped():
            self.pump(0.05)

    def call(self, name, **args):
        """Run a control command to its end; its end message (or None)."""
        wait = self.control(name, **args)
        while wait.cid in self.controls and not self.stopped():
            self.pump(0.05)
        return self.results.pop(wait.cid, None)

    def advance(self, value):
        try:
            wait = self.script.send(value)
        except StopIteration:
            self.script = self.waiting = None
            return
        self.waiting = wait
        if isinstance(wait, Sleep):
            wait.until = time.monotonic() + wait.seconds
        elif isinstance(wait, Kill):
            self.script.close()
            self.script = self.waiting = None
            self.stats.crashes[wait.reason] += 1
            self.crash(wait.reason)

    def watchdog(self):
        now = time.monotonic()
        limit = self.setup.timeout + self.margin + HARD_LIMIT
        for op in list(self.tracker.running.values()):
            if now - op.started > limit:
                self.hung(f"{op.kind} at {op.offset} length {op.length}", now - op.started)
                return
        for cid, (name, started) in list(self.controls.items()):
            if now - started > CONTROL_LIMIT:
                self.hung(f"control command {name}", now - started)
                return

    def hung(self, what, seconds):
        self.violation("hang", f"{what} still running after {seconds:.1f} s: worker "
                       "killed (its stacks and engine state: worker.log)")
        self.channel.diagnose()
        self.crash("hang")

    # ------------------------------------------------------------- messages
    def handle(self, msg):
        ev = msg["ev"]
        if ev == "s":
            self.op_started(self.ops[msg["id"]], msg["t"])
        elif ev == "e":
            self.op_ended(msg)
        elif ev == "r":
            self.read_data(msg)
        elif ev == "c":
            self.control_ended(msg)
        elif ev == "resynced":
            self.resync_ended(msg)
        elif ev == "error":
            self.violation("worker-error", msg["text"][-2000:])
        elif ev == "eof":
            self.worker_died()

    def resync_ended(self, msg):
        """The resync the worker started at its assembly ended: done, or
        failed only where the damage left fewer than threshold in service."""
        self.resyncing = False
        self.note(f"the resync ended: {msg['state']} {msg.get('error') or ''}")
        if msg["state"] == "timeout":
            self.violation("hang", f"the resync after the assembly: {msg['error']}")
        elif msg["state"] == "failed":
            if self.damage.degraded(self.resync_since):
                self.stats.resync["failed, degraded"] += 1
            else:
                self.violation("resync-failed", f"the resync after the assembly: "
                               f"{msg['error_type']}: {msg['error']}")

    def op_started(self, op, when):
        if self.resyncing and op.kind == "read":
            self.stats.resync["reads"] += 1
        op.started = time.monotonic()
        op.started_at = when
        op.eio_ok = self.eio_possible(op)
        self.tracker.start(op)

    def op_ended(self, msg):
        op = self.tracker.end(msg["id"])
        self.ops.pop(msg["id"], None)
        if msg["id"] in self.batch:
            self.batch.discard(msg["id"])
            self.batch_ended += 1
        self.stats.ops[op.kind] += 1
        if msg["dur"] > self.setup.timeout + self.margin:
            self.violation("hang", f"{op.kind} at {op.offset} length {op.length} took "
                           f"{msg['dur']:.2f} s (timeout {self.setup.timeout} s + "
                           f"margin {self.margin} s)")
        if msg["ok"]:
            self.op_done(op)
        else:
            self.op_failed(op, msg)
        if isinstance(self.waiting, ForOp) and self.waiting.op_id == op.id:
            self.advance(msg)

    def op_done(self, op):
        if op.kind == "read":
            self.reads[op.id] = op
        elif op.writes:
            self.versions.acknowledge(op.first, op.count, op.version)
            self.damage.written(op.first, op.count, op.started_at, self.now())

    def op_failed(self, op, msg):
        if op.writes:
            self.versions.unknown(op.first, op.count, op.version)
        is_eio = msg["err"] in ("noquorum", "degraded") or msg["errno"] == errno.EIO
        where = f"{op.kind} at {op.offset} length {op.length}"
        if not is_eio:
            self.violation("unexpected-error", f"{where}: {msg['text']}")
        elif op.eio_ok:
            self.stats.eio_expected += 1
        elif op.raced:
            self.stats.eio_raced += 1
        else:
            self.violation("unexpected-eio", f"{where}: {msg['text']} (members "
                           f"{self.names(self.damage.members)}, down "
                           f"{sorted(self.names(self.damage.down))}, flips there "
                           f"{self.flips_in(op)})")

    def read_data(self, msg):
        op = self.reads.pop(msg["id"])
        self.stats.sectors_read += op.count
        bad = self.tracker.mismatches(op, msg["runs"])
        if op.verify:
            self.settle(op, msg["runs"], bad)
        elif bad:
            self.report_mismatch(op, bad)
        elif self.versions.unsettled:
            self.settle_open(op, msg["runs"])

    def settle_open(self, op, runs):
        """A read of sectors a crash left open (the read-back failed there)
        settles them, where no write raced it."""
        open_ = self.versions.unsettled
        sector = op.first
        for count, version in runs:
            for s in range(sector, sector + count):
                if s in open_ and not any(w.covers(s) for w in op.overlaps):
                    self.versions.settle(s, version)
            sector += count

    def report_mismatch(self, op, bad, what="read"):
        garbage = [b for b in bad if b[1] == GARBAGE]
        unstable = [b for b in bad if b[1] != GARBAGE and op.snapshot.allows(*b)]
        category = ("wrong-read" if garbage else "lost-write" if len(unstable) < len(bad)
                    else "unstable-read")
        s, v = (garbage or [b for b in bad if b not in unstable] or bad)[0]
        allowed = (self.tracker.allowed(op, s) if op.first <= s < op.first + op.count
                   else "nothing: the result has the wrong length")
        if category == "unstable-read":
            what += " (allowed at its start; another read after the crash settled it)"
            allowed = self.versions.allowed(s)
        self.violation(category, f"{what} at {op.offset} length {op.length}: {len(bad)} "
                       f"sectors not allowed, e.g. sector {s} holds {describe(v)}, "
                       f"allowed {sorted(allowed) if isinstance(allowed, set) else allowed}")

    def control_ended(self, msg):
        name, _ = self.controls.pop(msg["cid"], ("?", 0))
        if not msg["ok"] and msg.get("type") in ("TimeoutError", "RuntimeError"):
            self.violation("hang" if msg["type"] == "TimeoutError" else "job-failed",
                           f"{name}: {msg.get('error')}")
        self.note(f"control {msg['cid']} ended: " + (f"{msg.get('result')}" if msg["ok"] else
                  f"{msg.get('type')}: {msg.get('error')}") + f" states {msg['states']}")
        self.results[msg["cid"]] = msg
        self.apply_view(msg)
        if isinstance(self.waiting, ForControl) and self.waiting.cid == msg["cid"]:
            self.results.pop(msg["cid"])
            self.advance(msg)

    def names(self, paths):
        return [os.path.basename(p) for p in paths]

    def flips_in(self, op):
        return {b: self.names(self.damage.flipped(b)) for b in op.blocks()
                if b in self.damage.flips}

    # --------------------------------------------------------------- crashes
    def worker_died(self):
        """The worker's pipe ended without a kill of ours: it crashed."""
        try:
            code = self.channel.proc.wait(5)
        except Exception:
            code = "still running"
        self.channel.kill()
        self.violation("worker-crash", f"the worker died by itself (exit status {code}); "
                       "see worker.log")
        self.after_death("worker crash")

    def crash(self, reason):
        """kill -9 of the worker, then what a restart after a power cut does."""
        self.log(f"step {self.step_index}: kill -9 ({reason})")
        self.note(f"kill -9 ({reason})" + (" during the resync" if self.resyncing else ""))
        self.stats.resync["kills"] += self.resyncing
        if self.script is not None:
            self.script.close()
        self.script = self.waiting = None
        if self.setup.device:
            self.kill_daemon()
        self.channel.kill(wait=not self.setup.device)
        while True:                 # what it reported before it died
            msg = self.channel.get(2 if self.setup.device else 10)
            if msg is None or msg["ev"] == "eof":
                break
            if msg["ev"] != "c":    # commands cut short are not judged
                self.handle(msg)
        self.after_death(reason)

    def kill_daemon(self):
        """Device mode: lift every dm fault, kill -9 the daemon and wait
        until it is gone (the kernel then holds the device quiesced)."""
        self.files.dm.heal_all()
        pid = self.device["daemon_pid"]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        end = time.monotonic() + 60
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}"):
            self.violation("hang", f"the daemon (pid {pid}) still exists 60 s after kill -9")

    def after_death(self, reason):
        old = self.channel
        self.channel.close()
        in_flight = [op for op in self.tracker.running.values() if op.writes]
        for op in in_flight:
            self.versions.unknown(op.first, op.count, op.version)
        self.versions.crashed()
        self.in_flight_at_crash = in_flight
        self.tracker.running.clear()
        self.ops.clear()
        self.reads.clear()
        self.batch.clear()
        self.controls.clear()
        self.results.clear()
        if self.script is not None:
            self.script.close()
        self.script = self.waiting = None
        self.audit.files(after_crash=True)
        self.count_torn()
        self.start_worker()
        if self.setup.device:
            self.reap(old)
        self.verify_all()

    def count_torn(self):
        """The blocks a torn crash left split among the voters (the figures
        say whether the crash rule had anything to decide)."""
        torn, self.thrasher.torn = self.thrasher.torn, None
        if torn is None:
            return
        voters = self.audit.voters()
        copies = [self.files.read(p, *torn) for p in voters]
        split = sum(len({c[b:b + BLOCK] for c in copies}) > 1
                    for b in range(0, torn[1], BLOCK))
        self.stats.resync["torn blocks"] += split
        self.note(f"torn write at {torn[0]}+{torn[1]}: {split} blocks split among "
                  f"{len(voters)} voters")

    def reap(self, old):
        """The worker killed at a device crash dies once its I/O, waiting
        on the quiesced device, completed after the recover: before the
        read-back, so that its writes have landed."""
        try:
            old.proc.wait(REAP_LIMIT)
        except subprocess.TimeoutExpired:
            self.violation("hang", f"the worker killed at the crash is still there "
                           f"{REAP_LIMIT:.0f} s after `quorumblk recover`: its I/O "
                           "never completed")

    def verify_all(self):
        """Read every sector back after a restart: each must hold its
        acknowledged version or one that was in flight; then the model
        settles on what was read."""
        step = self.setup.max_io
        ops = [self.new_op("read", off, min(step, self.setup.size - off))
               for off in range(0, self.setup.size, step)]
        for op in ops:
            op.verify = True
        self.send_ops(ops, "load")
        ids = {op.id for op in ops}
        end = time.monotonic() + START_LIMIT
        while (ids & (set(self.ops) | set(self.reads))) and time.monotonic() < end:
            self.pump(0.05)
        self.stats.ops["verify-read"] += len(ops)
        self.heal_excused()

    def settle(self, op, runs, bad):
        """A verify read: mismatches are lost writes, unless the block had a
        known flip and a write in flight at the crash (the resync's
        plurality vote may then pick the flipped copy: damage beyond the
        budget). Every sector read settles the model."""
        excused = []
        real = []
        for s, v in bad:
            block = s // SECTORS_PER_BLOCK
            crash_write = any(block in w.blocks() for w in self.in_flight_at_crash)
            if v == GARBAGE and crash_write and self.damage.flipped(block):
                excused.append(block)
            else:
                real.append((s, v))
        if real:
            self.report_mismatch(op, real, "read after the crash")
        self.excused_blocks |= set(excused)
        sector = op.first
        for count, version in runs:
            if version != GARBAGE:
                for s in range(sector, sector + count):
                    self.versions.settle(s, version)
            sector += count

    def heal_excused(self):
        blocks = sorted(self.excused_blocks)
        self.excused_blocks = set()
        if not blocks:
            return
        self.stats.excused += len(blocks)
        ops = [self.new_op("write", b * BLOCK, BLOCK, lane="probe") for b in blocks]
        self.send_ops(ops, "probe")
        while any(op.id in self.ops for op in ops):
            self.pump(0.05)

    # ------------------------------------------------------------ checkpoint
    def checkpoint(self):
        """Between steps, nothing in flight: the worker's state, fds and
        RSS, and the image files."""
        msg = self.call("status")
        if msg is None or self.stopped():
            return
        if not msg["ok"]:
            self.violation("worker-error", f"status: {msg.get('error')}")
            return
        self.life.sample(msg["result"])
        self.stats.events.update(msg["result"]["events"])
        if self.readd_limit and msg["result"]["readds"] >= self.readd_limit - 4:
            self.restart("--readd-limit")
            return
        for p in list(self.damage.shaky):
            if p not in self.members or self.metadata_whole(p):
                self.damage.shaky.discard(p)
        self.audit.files()

    def metadata_whole(self, path):
        """path's header copies both check out and its bitmap holds every
        bit another voting member holds: its metadata damage is gone."""
        if not all(self.files.header_copies_valid(path)):
            return False
        mine = self.files.bitmap(path)
        for p in self.audit.voters():
            if p != path and any(o & ~m for o, m in zip(self.files.bitmap(p), mine)):
                return False
        return True

    # ----------------------------------------------------------------- final
    def final_check(self):
        """Every fault cleared, every member back in service, no block left
        without quorum, then a scrub: every in-service replica's data area
        is byte-identical and holds what the model allows."""
        self.run_script(self.thrasher.heal_all())
        for block in [b for b in self.damage.flips if self.damage.short(b)]:
            self.run_script(self.one(self.probe("write", block * BLOCK, BLOCK)))
        self.run_script(self.final_scrub(self.now()))
        if self.stopped():
            return
        self.checkpoint()
        in_service = [p for p in self.members if self.view.get(p) == "in-service"]
        if len(in_service) != len(self.members):
            self.violation("final-state", "members not in service after healing: " +
                           ", ".join(f"{os.path.basename(p)} {self.view.get(p)}"
                                     for p in self.members))
        self.audit.final(in_service)

    @staticmethod
    def one(wait):
        yield wait

    def final_scrub(self, since):
        msg = yield self.control("scrub")
        self.stats.final["scrub"] = msg.get("result") or msg.get("error")
        if not msg["ok"]:
            self.violation("scrub-failed", f"the final scrub: {msg.get('error')}")
        else:
            self.damage.scrubbed(since, self.now())
