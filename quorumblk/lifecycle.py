"""Changes to a running device's replica set, and scrub: what the daemon does
for `readd`, `replace`, `add-replica`, `remove-replica` and `scrub` while the
device keeps serving.

Each long operation is a Job that runs in a thread of its own (with its own
engine context) and syncs the device through the vote (Quorum.sync): user
writes go on meanwhile, reach a joining replica too, and wait only while
the few blocks being synced are held. One job runs at a time; the checks that
can refuse an operation happen before it starts, so the command gets its
error at once.

  readd DEV REPLICA       a member that failed comes back: it is attached,
                          gets every write from then on, and gets what the
                          bitmap says it missed (all of it, if it had joined
                          empty and never finished), then votes again.
  add-replica DEV NEW     an empty image joins as a new member: all of the
                          device is copied to it (its old contents are not
                          read).
  replace DEV OLD NEW     add-replica NEW, then remove OLD: the set never
                          has fewer copies than before while NEW fills.
  remove-replica DEV R    R leaves the set (never below threshold).
  scrub DEV               every block is read from every in-service replica
                          and voted; losing copies are rewritten (or, with
                          repair off, only counted).
  (resync)                what `add` or `recover` found to resync (regions
                          dirty after an unclean stop, stale replicas) runs
                          as a job once the device is LIVE (meta.Resync). It
                          cannot be cancelled: until it ends, reads of its
                          regions read every replica (the crash rule) and
                          the bitmap keeps its bits; a stop resyncs again at
                          the next add.
"""
import errno
import os
import threading
import time

from . import errors, meta, replica, runtime
from .errors import (CommandError, JobRunningError, NotCancellableError, QuorumError,
                     RefusedError)
OWED_WAIT_S = 2.0               # readd waits this long for I/O still owed
ANSWER_S = 2.0                  # and this long for the replica's header


class LifecycleError(RefusedError):
    """the replica set cannot be changed that way."""


class OwedError(LifecycleError):
    """the replica still owes I/O it was given before it failed."""


class UnsettledError(LifecycleError):
    """blocks the replica must get have no quorum: it stays out of service."""


class CancelledError(CommandError):
    """the job was cancelled."""


class NoJobError(CommandError):
    """no job runs on this device."""


def _answer_within(call, seconds, what):
    """call() in a thread of its own, waited for `seconds`: storage that
    hangs (a suspended device, a hard NFS mount) holds that thread, not the
    caller. LifecycleError when it has not answered by then."""
    out = {}

    def run():
        try:
            out["value"] = call()
        except BaseException as e:  # handed to the caller
            out["error"] = e

    t = threading.Thread(target=run, name="quorumblk-probe", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise LifecycleError(f"{what}: no answer within {seconds:.0f} s (the "
                             "storage hangs?): refused; try again once it answers")
    if "error" in out:
        raise out["error"]
    return out["value"]


def _name(name, index=True):
    """A replica as a request names it: an index (an int, or digits) or an
    absolute path. A relative path is refused: the daemon works from /, so
    the command makes paths absolute where they are given."""
    if index and isinstance(name, int) and not isinstance(name, bool) and name >= 0:
        return name
    if not isinstance(name, str) or not name:
        raise LifecycleError(f"{name!r} names no replica: give " +
                             ("its index or " if index else "") + "its path")
    if index and name.isdigit():
        return int(name)
    if replica.is_nbd(name):
        return name
    if not os.path.isabs(name):
        raise LifecycleError(f"{name} is a relative path, and the daemon works from "
                             "/: give an absolute path")
    return name


class Job:
    """One long operation and its progress, as `status` and the commands
    that follow it see it."""

    def __init__(self, kind, total, what, rate=None):
        self.kind = kind
        self.what = what            # a line for people
        self.total = total          # bytes to go through
        self.done = 0
        self.rate = rate            # bytes per second at most, or None
        self.state = "running"
        self.error = None
        self.error_type = None      # the exception's class, for scripts
        self.result = None
        self.started = time.time()
        self.ended = None
        self.cancellable = True
        self._t0 = time.monotonic()
        self._cancel = threading.Event()

    def cancel(self):
        """Ask the job to stop at its next step (CancelledError in it)."""
        self._cancel.set()

    def progress(self, done):
        self.done = done
        if self.rate:
            ahead = done / self.rate - (time.monotonic() - self._t0)
            if ahead > 0:
                self._cancel.wait(ahead)
        if self._cancel.is_set():
            raise CancelledError(f"{self.what}: cancelled at {self.done} of "
                                 f"{self.total} bytes")

    def to_dict(self):
        end = self.ended or time.time()
        secs = max(end - self.started, 1e-6)
        return {"kind": self.kind, "what": self.what, "state": self.state,
                "done_bytes": self.done, "total_bytes": self.total,
                "percent": round(100.0 * self.done / self.total, 1) if self.total else 100.0,
                "bytes_per_s": int(self.done / secs), "rate_limit": self.rate,
                "started": self.started, "ended": self.ended,
                "seconds": round(secs, 3), "error": self.error,
                "cancellable": self.cancellable,
                "error_type": self.error_type, "result": self.result}


class Lifecycle:
    """The replica set of one served Quorum (with metadata). changed() is
    called whenever the set changed (the daemon rewrites its state file)."""

    def __init__(self, q, changed=lambda: None):
        self.q = q
        self.changed = changed
        self.job = None
        self._lock = threading.Lock()

    # -- looking things up --
    def replica(self, name):
        """A replica given as its index or an absolute path naming it."""
        paths = self.q.paths
        states = self.q.replica_states()
        name = _name(name)
        if isinstance(name, int):
            i = name if name < len(paths) else None
        else:
            i = self._by_path(name)
        if i is None or states[i] == "removed":
            raise LifecycleError(
                f"{name} is not a replica of this device (replicas: " +
                ", ".join(f"{i} {p}" for i, (p, st) in enumerate(zip(paths, states))
                          if st != "removed") + ")")
        return i

    def _by_path(self, path):
        try:
            mine = runtime.replica_identity(path)
        except OSError:
            mine = None
        for i, p in enumerate(self.q.paths):
            if p == path or (not replica.is_nbd(path) and
                             p == os.path.abspath(path)):
                return i
            try:
                if mine and runtime.same_replica(mine, runtime.replica_identity(p)):
                    return i
            except OSError:
                continue
        return None

    def _ref(self):
        """The header of an in-service replica: the set as it is now."""
        states = self.q.replica_states()
        for i, st in enumerate(states):
            if st == "in-service":
                return self.q.header(i)
        raise LifecycleError("no replica is in service")

    def _members(self, ref):
        return [(bytes(ref.members[s].uuid), ref.members[s].state)
                for s in range(ref.nmembers)]

    def _in_service(self):
        return sum(st == "in-service" for st in self.q.replica_states())

    # -- jobs --
    def _run(self, job, work, undo=None):
        """Start job in a thread: work() returns its result; undo() puts
        things back when the job is cancelled."""
        with self._lock:
            if self.job is not None and self.job.state == "running":
                raise JobRunningError(f"a {self.job.kind} runs on this device "
                                f"({self.job.to_dict()['percent']}%): wait for it")
            self.job = job

        def body():
            try:
                job.progress(0)
                job.result = work()
                job.state = "done"
            except CancelledError as e:
                job.error = str(e)
                job.error_type = type(e).__name__
                try:
                    job.result = undo() if undo else None
                except Exception as e2:  # reported, never lost
                    job.error += f"; putting things back failed: {e2}"
                job.state = "cancelled"
            except Exception as e:  # reported through the job, never lost
                job.error = str(e)
                job.error_type = type(e).__name__
                job.state = "failed"
            finally:
                job.ended = time.time()
                self.changed()

        threading.Thread(target=body, name=f"quorumblk-{job.kind}",
                         daemon=True).start()
        return job

    def cancel(self):
        """Cancel the running job: it stops at its next step (a sync step
        or the rate limit's wait) and undoes its change of the set (see
        _run's callers). Returns the job; it is "cancelled" once done."""
        with self._lock:
            job = self.job
            if job is None or job.state != "running":
                raise NoJobError("no job runs on this device" + (
                    f" (the last, {job.what}, is {job.state})" if job else ""))
            if not job.cancellable:
                raise NotCancellableError(
                    f"the {job.what} cannot be cancelled ({job.to_dict()['percent']}% "
                    "done): until it ends, reads of its regions read every replica "
                    "and the write-intent bitmap keeps them, so that stopping the "
                    "device and adding it again starts the resync over; it ends by itself")
            job.cancel()
            return job

    def _check_idle(self):
        if self.job is not None and self.job.state == "running":
            raise JobRunningError(f"a {self.job.kind} runs on this device: wait for it")

    def scrub(self, repair=True, rate=None):
        q = self.q
        job = Job("scrub", q.size, "scrub" + ("" if repair else " (report only)"),
                  rate)

        def work():
            res = meta.sync_ranges(q, [(0, q.size)], progress=job.progress,
                                   write=repair)
            return {"blocks_checked": res["blocks"],
                    "bad_blocks": {q.paths[i]: n for i, n in enumerate(res["bad"]) if n},
                    "bad_blocks_per_replica": res["bad"],
                    "repaired": res["written"],
                    "unrecoverable": res["unrecoverable"],
                    "repair": repair}
        return self._run(job, work)

    def resync(self, rs, rate=None):
        """Run the resync that add or recover found (a meta.Resync) as a job,
        while the device serves (at most rate bytes per second). Not
        cancellable (see the module's text)."""
        r = rs.report
        why = {"unclean-stop": "after an unclean stop",
               "stale-replica": "of " + ", ".join(r["stale"])}
        job = Job("resync", rs.total, f"resync {why.get(r['reason'], '')}".strip(), rate)
        job.cancellable = False
        return self._run(job, lambda: rs.run(job.progress))

    def _fill(self, job, r, ranges, blind):
        """Sync ranges onto the resyncing replica r, then put it in service."""
        q = self.q
        res = meta.sync_ranges(q, ranges, targets=[r], progress=job.progress,
                               blind=blind)
        if q.replica_states()[r] != "resyncing":
            raise LifecycleError(f"{q.paths[r]} failed during its resync "
                                 f"(state {q.replica_states()[r]}); nothing changed "
                                 "for the others")
        if res["unrecoverable"]:
            # no winner to copy: its own (maybe stale) copy would vote there
            q.set_state(r, "failed")
            self.changed()
            raise UnsettledError(
                f"{q.paths[r]}: {res['unrecoverable']} of the blocks it is resynced "
                "over have no quorum among the replicas in service, so it cannot "
                "get them and stays out of service (its copies there may be stale); "
                "`quorumblk scrub` reports them, a write to them heals them, then "
                "readd it again")
        q.set_state(r, "in-service")
        self.changed()
        return {"replica": q.paths[r], "index": r, "checked_bytes": res["bytes"],
                "copied_blocks": res["bad"][r],
                "copied_bytes": res["bad"][r] * q.vote_block,
                "size": q.size}

    def readd(self, name, rate=None):
        """A member that left service comes back (the same replica, maybe
        under another path)."""
        self._check_idle()
        q = self.q
        ident = self._path_of(name)
        # the replica that failed may still hang: the daemon must not
        m, _ = _answer_within(lambda: meta.read(ident), ANSWER_S,
                              f"{ident}: reading its header")
        if m is None:
            raise LifecycleError(f"{ident} has no quorumblk metadata: it is not a "
                                 "member of this set (add it with `quorumblk add-replica`)")
        ref = self._ref()
        members = self._members(ref)
        rid = bytes(m.replica_uuid)
        slots = [s for s, (u, st) in enumerate(members) if u == rid and st != meta.REMOVED]
        if bytes(m.set_uuid) != bytes(ref.set_uuid) or not slots:
            raise LifecycleError(
                f"{ident} (replica {meta.uuid_text(rid)} of set "
                f"{meta.uuid_text(m.set_uuid)}) is not a member of this device's "
                f"set {meta.uuid_text(ref.set_uuid)}: refused")
        full = bool(ref.members[slots[0]].flags & meta.FULL_SYNC)
        self._check_free(ident)
        r = self._attach_when_settled(ident, m)
        self.changed()
        shift, n = ref.region_shift, ref.nregions
        ranges = ([(0, q.size)] if full else
                  meta.dirty_ranges(q.bitmap(), shift, n))
        total = sum(min(o + l, q.size) - o for o, l in ranges)
        job = Job("readd", total, f"readd {ident}", rate)
        return self._run(job, lambda: self._fill(job, r, ranges, blind=full),
                         undo=lambda: self._leave(r, "failed"))

    def add_replica(self, path, rate=None, then=None):
        """An empty image joins: all of the device is copied to it."""
        self._check_idle()
        q = self.q
        path = _name(path, index=False)
        if self._by_path(path) is not None and \
                q.replica_states()[self._by_path(path)] != "removed":
            raise LifecycleError(f"{path} is already a replica of this device")
        self._check_free(path)
        ref = self._ref()
        m = meta.new_member(ref, self._members(ref), path)
        r = q.attach(path, m)
        self.changed()
        job = Job("replace" if then else "add-replica", q.size,
                  f"{'replace' if then else 'add-replica'} {path}", rate)

        def work():
            res = self._fill(job, r, [(0, q.size)], blind=True)
            if then:
                res.update(then())
            return res
        return self._run(job, work, undo=lambda: self._leave(r, "removed"))

    def replace(self, old, new, rate=None):
        i = self.replica(old)
        old_path = self.q.paths[i]
        return self.add_replica(
            new, rate, then=lambda: {"removed": self._remove(i, old_path)["removed"]})

    def remove_replica(self, name):
        self._check_idle()
        i = self.replica(name)
        return self._remove(i, self.q.paths[i])

    def _remove(self, i, path):
        q = self.q
        left = self._in_service() - (q.replica_states()[i] == "in-service")
        if left < q.threshold:
            raise LifecycleError(
                f"removing {path} would leave {left} replicas in service, below "
                f"the threshold {q.threshold}: refused")
        q.set_state(i, "removed")
        self.changed()
        return {"removed": path, "index": i}

    # -- helpers --
    def _leave(self, r, state):
        """A cancelled job's replica leaves service: failed (readd resumes
        it) or removed (a new member: add-replica may use it again)."""
        if self.q.replica_states()[r] == "resyncing":
            self.q.set_state(r, state)
            self.changed()
        return {"replica": self.q.paths[r], "index": r,
                "state": self.q.replica_states()[r]}

    def _attach_when_settled(self, path, header):
        """Attach a member that failed, once the I/O it was given before it
        failed has all come back (a late write must not land after its
        resync): wait a while for it, then refuse, saying so."""
        deadline = time.monotonic() + OWED_WAIT_S
        while True:
            try:
                return self.q.attach(path, header)
            except QuorumError as e:
                if e.errno != errno.EAGAIN:
                    raise
                if time.monotonic() >= deadline:
                    raise OwedError(
                        f"{e.strerror}; waited {OWED_WAIT_S:.0f} s: the storage "
                        "still holds them (a hung server or a suspended device); "
                        "try again once it answers") from None
            time.sleep(0.1)

    def _path_of(self, name):
        """The path to open for a readd: an absolute path as given, or the
        path the replica had (by index)."""
        name = _name(name)
        if isinstance(name, int):
            if name >= len(self.q.paths):
                raise LifecycleError(f"this device has no replica {name}")
            return self.q.paths[name]
        if not replica.exists(name):
            raise LifecycleError(f"{name}: no such file or device")
        return name

    def _check_free(self, path):
        try:
            ident = runtime.replica_identity(path)
        except OSError as e:
            raise LifecycleError(f"{path}: {e.strerror}")
        clashes = [c for c in runtime.replicas_in_use([ident])
                   if not self._mine(c[2])]
        if clashes:
            _p, other, theirs = clashes[0]
            raise errors.ReplicaInUseError(
                f"replica {path} is already used by quorumblk device {other} "
                f"as {theirs}")

    def _mine(self, path):
        return self._by_path(path) is not None

