"""The vote engine from Python: a Quorum over replica paths.

Each Python thread that does I/O on a Quorum gets its own engine context
(its own io_uring), as a ublk queue thread does; replica states, counters
and events are shared by all of them in C.
"""
import errno
import functools
import threading
import warnings
import weakref

from . import replica
from ._core import ffi, lib
from .errors import InvalidArgumentError, QuorumError, raise_for

READ_POLICIES = {"all": lib.QB_READ_ALL, "threshold": lib.QB_READ_THRESHOLD,
                 "fifo": lib.QB_READ_FIFO}
HASHES = {"xxh3": lib.QB_HASH_XXH3, "sha256": lib.QB_HASH_SHA256}
OPS = {"read": lib.QB_OP_READ, "write": lib.QB_OP_WRITE,
       "flush": lib.QB_OP_FLUSH, "discard": lib.QB_OP_DISCARD,
       "write_zeroes": lib.QB_OP_WRITE_ZEROES}
FAULTS = {None: lib.QB_FAULT_NONE, "eio": lib.QB_FAULT_EIO,
          "hang": lib.QB_FAULT_HANG, "delay": lib.QB_FAULT_DELAY,
          "late": lib.QB_FAULT_LATE}
EVENT_TYPES = {lib.QB_EV_BAD_BLOCK: "bad-block",
               lib.QB_EV_REPLICA_ERROR: "replica-error",
               lib.QB_EV_REPLICA_FAILED: "replica-failed",
               lib.QB_EV_QUORUM_FAILURE: "quorum-failure",
               lib.QB_EV_REPAIRED: "repaired",
               lib.QB_EV_LATE: "late-completion"}
REPLICA_STATES = {lib.QB_REPLICA_IN_SERVICE: "in-service",
                  lib.QB_REPLICA_FAILED: "failed",
                  lib.QB_REPLICA_RESYNCING: "resyncing",
                  lib.QB_REPLICA_REMOVED: "removed"}
STATE_VALUES = {v: k for k, v in REPLICA_STATES.items()}
COUNTERS = ("reads", "writes", "flushes", "discards", "write_zeroes",
            "read_bytes", "write_bytes", "bad_blocks", "repairs",
            "quorum_failures", "errors", "timeouts")
# late: abandoned I/Os that came back after all; owed: those not back yet
REPLICA_COUNTERS = tuple(c for c in COUNTERS if c != "quorum_failures") + \
    ("late", "owed")

CTX_DEPTH = 32


def _choice(name, value, table):
    if value not in table:
        raise InvalidArgumentError(
            errno.EINVAL, f"{name} {value!r}: choose one of "
            + ", ".join(str(k) for k in table if k is not None))
    return table[value]


def make_options(threshold, read_policy="all", hash="xxh3", vote_block=4096,
                 repair=True, buffered=False, timeout=30.0, events_per_sec=10,
                 max_io=1 << 20):
    """A filled struct qb_options (engine defaults for what is not given)."""
    o = ffi.new("struct qb_options *")
    lib.qb_options_default(o)
    if not isinstance(threshold, int) or isinstance(threshold, bool):
        raise InvalidArgumentError(errno.EINVAL,
                                   f"threshold {threshold!r} is not an integer")
    if timeout <= 0:
        raise InvalidArgumentError(errno.EINVAL,
                                   f"replica timeout {timeout} s must be above 0")
    for name, value in (("vote block", vote_block), ("max_io", max_io),
                        ("events_per_sec", events_per_sec)):
        if not isinstance(value, int) or not 0 <= value < 1 << 32:
            raise InvalidArgumentError(errno.EINVAL, f"{name} {value!r} is out of range")
    o.threshold = max(0, min(threshold, 1 << 31))
    o.read_policy = _choice("read policy", read_policy, READ_POLICIES)
    o.hash = _choice("hash", hash, HASHES)
    o.vote_block = vote_block
    o.repair = bool(repair)
    o.buffered = bool(buffered)
    o.timeout_ms = max(1, int(round(timeout * 1000)))
    o.events_per_sec = events_per_sec
    o.max_io = max_io
    return o


class _ThreadCtx:
    """One thread's engine context; destroyed when the thread ends (its
    threading.local entry goes away)."""

    def __init__(self, quorum, ptr):
        self.owner = weakref.ref(quorum)
        self.ptr = ptr

    def __del__(self):
        quorum = self.owner()
        if quorum is not None:
            quorum._release(self.ptr)


def _guarded(method):
    """Run method inside the engine: close() waits for it, and after
    close() it raises EBADF."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        self._enter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._leave()
    return call


class Quorum:
    """N replica images voted as one device.

    Opening checks everything before any I/O: the threshold, that each path
    opens (O_DIRECT unless buffered), that no replica is given twice (also
    through a link), and that the sizes agree.
    """

    def __init__(self, paths, threshold, **options):
        self.paths = [str(p) for p in paths]
        self.threshold = threshold
        opts = make_options(threshold, **options)
        self.options = dict(options)
        if 1 <= threshold <= len(self.paths) // 2:
            warnings.warn(
                f"threshold {threshold} of {len(self.paths)} replicas is not a "
                "majority: two disjoint groups of replicas could each reach it",
                stacklevel=2)
        cpaths = [ffi.new("char[]", p.encode()) for p in self.paths]
        arr = ffi.new("const char *[]", cpaths)
        out = ffi.new("struct qb_quorum **")
        raise_for(lib.qb_quorum_open(arr, len(cpaths), opts, out), lib, ffi)
        self._q = out[0]
        self._opts = opts
        # what each replica is, looked at once while it is open: status must
        # never stat a file whose NFS server does not answer (a hard mount
        # would hold it)
        self.kinds = [replica.kind(p) for p in self.paths]
        self.servers = [replica.server(p) for p in self.paths]
        self.size = lib.qb_quorum_size(self._q)
        self.max_io = opts.max_io
        self.vote_block = opts.vote_block
        self._local = threading.local()
        self._ctxs = []
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0          # calls inside the engine right now
        self._devices = set()   # devices serving this quorum (device.py)

    # -- contexts --
    def _ctx(self):
        holder = getattr(self._local, "ctx", None)
        if holder is None:
            out = ffi.new("struct qb_ctx **")
            raise_for(lib.qb_ctx_create(self._q, CTX_DEPTH, 0, out), lib, ffi)
            holder = self._local.ctx = _ThreadCtx(self, out[0])
            with self._lock:
                self._ctxs.append(out[0])
        return holder.ptr

    def _release(self, ptr):
        """A thread ended: destroy its context (unless close() did)."""
        with self._lock:
            if self._q is not None and ptr in self._ctxs:
                self._ctxs.remove(ptr)
                lib.qb_ctx_destroy(ptr)

    def close(self):
        """Release the engine contexts and close the replicas. Calls in
        other threads finish first; later ones raise EBADF. A device still
        serving this quorum is stopped first (its queues use the quorum)."""
        for dev in list(getattr(self, "_devices", ())):
            dev.stop()
        with self._lock:
            q, self._q = self._q, None
            if q is None:
                return
            while self._busy:
                self._idle.wait()
            for ptr in self._ctxs:
                lib.qb_ctx_destroy(ptr)
            self._ctxs = []
            lib.qb_quorum_close(q)
        self._local = threading.local()

    @property
    def closed(self):
        return self._q is None

    def serve(self, start):
        """For a front end that serves this quorum (quorumblk.device):
        start(the C quorum) makes the device; it is stopped before the quorum
        closes. Returns what start returned."""
        if self._q is None:
            raise QuorumError(errno.EBADF, "the quorum is closed")
        dev = start(self._q)
        self._devices.add(dev)
        return dev

    def served_no_more(self, dev):
        """dev stopped serving this quorum."""
        self._devices.discard(dev)

    def after_fork(self):
        """In a forked child (the daemon): the engine's threads and this
        thread's context stay with the parent; the child gets its own."""
        raise_for(lib.qb_quorum_after_fork(self._q), lib, ffi)
        self._local = threading.local()

    def _enter(self):
        with self._lock:
            if self._q is None:
                raise QuorumError(errno.EBADF, "the quorum is closed")
            self._busy += 1

    def _leave(self):
        with self._lock:
            self._busy -= 1
            if not self._busy:
                self._idle.notify_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- I/O --
    def _check_range(self, what, offset, length, limit=None):
        if not (isinstance(offset, int) and isinstance(length, int)):
            raise InvalidArgumentError(errno.EINVAL,
                                       f"{what}: offset and length must be integers")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgumentError(
                errno.EINVAL, f"{what} at offset {offset} length {length} is "
                f"outside the device ({self.size} bytes)")
        if limit is not None and length > limit:
            raise InvalidArgumentError(
                errno.EINVAL, f"{what} length {length} is above max_io ({limit})")

    @_guarded
    def _io(self, op, offset, length, buf, flags=0):
        ret = lib.qb_ctx_io(self._ctx(), op, flags, offset, length, buf)
        return raise_for(ret, lib, ffi)

    def read(self, offset, length):
        """Voted data of [offset, offset + length) as bytes."""
        self._check_range("read", offset, length, self.max_io)
        buf = bytearray(length)
        self._io(lib.QB_OP_READ, offset, length, ffi.from_buffer(buf))
        return bytes(buf)

    def write(self, offset, data, fua=False):
        """Write data to every in-service replica; succeeds when at least
        threshold replicas took it."""
        view = ffi.from_buffer(data)
        self._check_range("write", offset, len(view), self.max_io)
        self._io(lib.QB_OP_WRITE, offset, len(view), view,
                 lib.QB_REQ_FUA if fua else 0)

    def flush(self):
        self._io(lib.QB_OP_FLUSH, 0, 0, ffi.NULL)

    def _zero_range(self, what, op, offset, length):
        self._check_range(what, offset, length)
        chunk = 1 << 30         # the engine takes 32-bit lengths
        while True:
            n = min(length, chunk)
            self._io(op, offset, n, ffi.NULL)
            offset, length = offset + n, length - n
            if not length:
                return

    def discard(self, offset, length):
        self._zero_range("discard", lib.QB_OP_DISCARD, offset, length)

    def write_zeroes(self, offset, length):
        self._zero_range("write-zeroes", lib.QB_OP_WRITE_ZEROES, offset, length)

    @_guarded
    def bench(self, op="read", bs=4096, depth=32, count=10000, step=0, start=0,
              span=None):
        """Run the C load generator: request i goes to
        (start + i * step) % span, aligned down to bs (step 0: sequential)."""
        spec = ffi.new("struct qb_bench_spec *")
        spec.op = _choice("op", op, {"read": lib.QB_OP_READ,
                                     "write": lib.QB_OP_WRITE})
        spec.bs, spec.depth, spec.count = bs, depth, count
        spec.start, spec.step = start, step
        spec.span = self.size if span is None else span
        res = ffi.new("struct qb_bench_result *")
        out = ffi.new("struct qb_ctx **")
        raise_for(lib.qb_ctx_create(self._q, max(depth, 1), 0, out), lib, ffi)
        try:
            raise_for(lib.qb_ctx_bench(out[0], spec, res), lib, ffi)
        finally:
            lib.qb_ctx_destroy(out[0])
        return {"ops": res.ops, "bytes": res.bytes, "errors": res.errors,
                "wall_s": res.wall_ns / 1e9, "cpu_s": res.cpu_ns / 1e9}

    # -- state --
    @_guarded
    def replica_states(self):
        return [REPLICA_STATES[lib.qb_quorum_replica_state(self._q, i)]
                for i in range(len(self.paths))]

    @_guarded
    def counters(self):
        """(device counters, [per-replica counters]) as dicts."""
        dev = ffi.new("struct qb_counters *")
        reps = ffi.new("struct qb_counters[]", len(self.paths))
        lib.qb_quorum_counters(self._q, dev, reps)
        device = {k: getattr(dev, k) for k in COUNTERS}
        replicas = []
        for i in range(len(self.paths)):
            d = {k: getattr(reps[i], k) for k in REPLICA_COUNTERS}
            d["state"] = REPLICA_STATES[reps[i].state]
            d["io"] = "in-thread" if reps[i].in_thread else "io_uring"
            replicas.append(d)
        return device, replicas

    def status(self):
        self.poll()         # late completions idle threads' engines hold
        device, replicas = self.counters()
        for i, r in enumerate(replicas):
            r["path"] = self.paths[i]
            r["index"] = i
            r["kind"] = self.kinds[i]
            if self.servers[i]:
                r["server"] = self.servers[i]
            if r["kind"] == "nbd":
                r["offers"] = self.nbd_offers(i)
        return {"size": self.size, "threshold": self.threshold,
                "in_service": sum(r["state"] == "in-service" for r in replicas),
                "replicas": replicas, "counters": device}

    def nbd_offers(self, i):
        """What replica i's NBD export offers ({"flush": bool, ...}), or None
        for a file or block device. Without "flush" the export says it has
        no write cache: its writes are durable when answered."""
        caps = lib.qb_quorum_replica_nbd_caps(self._q, i)
        if caps < 0:
            return None
        return {name: bool(caps & bit) for name, bit in
                (("flush", 1), ("fua", 2), ("write_zeroes", 4), ("trim", 8),
                 ("multi_conn", 16))}

    # -- metadata (quorumblk.meta builds it; the engine keeps it up to date) --
    @_guarded
    def sync(self, offset, length, targets=(), plurality=False, write=True,
             blind=False):
        """Resync or scrub [offset, offset + length): vote every block over
        the in-service replicas and rewrite the losing copies and the
        `targets` (resyncing replicas) with the winner; user writes to a
        block wait while it is synced. plurality: a block without quorum
        takes its largest class; write=False only counts; blind: targets
        are not read first (every block is copied). Returns counts: blocks,
        differing, unrecoverable (no quorum, left as is), written, and bad
        (differing copies per replica)."""
        self._check_range("sync", offset, length)
        mask = 0
        for t in targets:
            mask |= 1 << t
        flags = ((lib.QB_SYNC_PLURALITY if plurality else 0) |
                 (0 if write else lib.QB_SYNC_NO_WRITE) |
                 (lib.QB_SYNC_BLIND if blind else 0))
        res = ffi.new("struct qb_sync_result *")
        raise_for(lib.qb_ctx_sync(self._ctx(), offset, length, mask, flags, res),
                  lib, ffi)
        return {"blocks": res.blocks, "differing": res.differing,
                "unrecoverable": res.unrecoverable, "written": res.written,
                "bad": list(res.bad)[:len(self.paths)]}

    @_guarded
    def set_meta(self, metas, bitmap):
        """Attach each replica's header and the dirty bitmap: from now on
        the device is the data area only and every write marks its region
        dirty on stable storage first."""
        arr = ffi.new("struct qb_meta[]", len(metas))
        for i, m in enumerate(metas):
            ffi.memmove(ffi.addressof(arr, i), m, ffi.sizeof("struct qb_meta"))
        raise_for(lib.qb_quorum_set_meta(self._q, arr, ffi.from_buffer(bitmap)),
                  lib, ffi)
        self.size = lib.qb_quorum_size(self._q)

    @_guarded
    def set_state(self, replica, state):
        """Move a replica to "in-service", "resyncing" or "failed"; with
        metadata the headers record it."""
        raise_for(lib.qb_quorum_set_state(self._q, replica,
                                          _choice("state", state, STATE_VALUES)),
                  lib, ffi)

    @_guarded
    def attach(self, path, header):
        """Bring a replica into the live set (quorumblk.meta prepares its
        header): it gets every write from now on, no reads until it is
        resynced and set in service. Returns its index. Refused (EBUSY)
        while I/O issued to it before it failed has not come back."""
        lib.qb_ctx_poll(self._ctx())    # late completions this thread holds
        r = raise_for(lib.qb_quorum_attach(self._q, str(path).encode(), header),
                      lib, ffi)
        k, srv = replica.kind(path), replica.server(path)
        with self._lock:
            if r == len(self.paths):
                self.paths.append(str(path))
                self.kinds.append(k)
                self.servers.append(srv)
            else:
                self.paths[r] = str(path)
                self.kinds[r] = k
                self.servers[r] = srv
        return r

    @_guarded
    def header(self, replica):
        """Replica's header as the engine last wrote it (a struct qb_meta)."""
        m = ffi.new("struct qb_meta *")
        raise_for(lib.qb_quorum_meta(self._q, replica, m), lib, ffi)
        return m

    @_guarded
    def clean(self, idle=5.0):
        """Clear the bits of regions idle for `idle` seconds (only while every
        member is in service). Returns how many were cleared."""
        return raise_for(lib.qb_quorum_clean(self._q, int(idle * 1000)), lib, ffi)

    @_guarded
    def resynced(self):
        """The dirty regions the set was opened with are resynced: the bitmap
        may clean them, and reads there take the normal vote."""
        lib.qb_quorum_resynced(self._q)

    @_guarded
    def region_synced(self, offset, length):
        """The crash-rule resync of [offset, offset + length) is done: the
        regions it covers whole take the normal vote again (until then a
        read there reads every replica in service and votes by plurality)."""
        raise_for(lib.qb_quorum_region_synced(self._q, offset, length), lib, ffi)

    @_guarded
    def bitmap(self):
        """The write-intent bitmap as on stable storage (b"" without
        metadata)."""
        n = lib.qb_quorum_bitmap(self._q, ffi.NULL, 0)
        buf = ffi.new("uint8_t[]", max(n, 1))
        lib.qb_quorum_bitmap(self._q, buf, n)
        return bytes(ffi.buffer(buf, n))

    @_guarded
    def events(self, max_events=4096):
        """Drain pending events as dicts."""
        buf = ffi.new("struct qb_event[]", max_events)
        n = lib.qb_quorum_events(self._q, buf, max_events)
        out = []
        for i in range(n):
            e = buf[i]
            replica = e.replica if e.replica >= 0 else None
            ev = {
                "type": EVENT_TYPES[e.type],
                "replica": replica,
                "path": self.paths[replica] if replica is not None else None,
                "offset": e.offset, "length": e.length,
                "errno": errno.errorcode.get(e.err) if e.err else None,
                "suppressed": e.suppressed,
                "time": e.time_ns / 1e9,
            }
            if replica is not None and self.servers[replica]:
                ev["server"] = self.servers[replica]
            out.append(ev)
        return out

    @_guarded
    def release(self, replica):
        """Let the I/Os that a "late" fault holds on replica run now."""
        raise_for(lib.qb_quorum_release(self._q, replica), lib, ffi)

    @_guarded
    def test_pause(self, where, seconds):
        """Test hook: widen a race window. The engine sleeps `seconds` each
        time it passes `where` ("before-park": a request about to wait for
        a metadata round), until set to 0."""
        points = {"before-park": lib.QB_PAUSE_BEFORE_PARK}
        raise_for(lib.qb_quorum_test_pause(self._q, _choice("pause point", where, points),
                                           int(seconds * 1000)), lib, ffi)

    def describe(self):
        """What every engine context and the metadata writer are doing, as
        text: a diagnosis of a hang, so it waits for no lock (not even
        close()'s; the numbers are read while they change)."""
        q = self._q
        if q is None:
            return "closed"
        buf = ffi.new("char[]", 1 << 16)
        raise_for(lib.qb_quorum_describe(q, buf, len(buf)), lib, ffi)
        return ffi.string(buf).decode(errors="replace")

    @_guarded
    def poll(self):
        """Process completed I/O without waiting: this thread's, and the
        late completions that idle threads' engines hold."""
        raise_for(lib.qb_ctx_poll(self._ctx()), lib, ffi)

    @_guarded
    def event_fd(self):
        return lib.qb_quorum_event_fd(self._q)

    @_guarded
    def inject(self, replica, kind="eio", ops=("read", "write", "flush",
                                                "discard", "write_zeroes"),
               offset=0, length=None, count=0, delay=0.0, error=errno.EIO):
        """Test hook: make replica's I/Os fail ("eio", with errno `error`),
        never answer ("hang"), start `delay` seconds late ("delay") or wait until
        release() ("late"); kind None clears it. Delayed and held I/Os
        really run in the end, also after the engine gave up on them.
        Offsets from self.size on are the metadata's (length None: the
        data area)."""
        mask = 0
        for op in ops:
            mask |= 1 << _choice("op", op, OPS)
        if length is None:
            length = self.size
        raise_for(lib.qb_quorum_inject(self._q, replica,
                                       _choice("fault", kind, FAULTS), mask,
                                       offset, length, count,
                                       int(delay * 1000), error), lib, ffi)


def vote(bufs, threshold, hash="xxh3"):
    """The C vote on one block: bufs is a list of bytes or None (no vote).
    Returns (winner index or None, winning class as a set of indexes)."""
    n = len(bufs)
    length = max((len(b) for b in bufs if b is not None), default=0)
    keep = [ffi.from_buffer(b) if b is not None else ffi.NULL for b in bufs]
    arr = ffi.new("const void *[]", keep)
    win = ffi.new("uint32_t *")
    w = lib.qb_vote(arr, n, length, threshold, HASHES[hash], win)
    return (None if w < 0 else w), {i for i in range(n) if win[0] >> i & 1}
