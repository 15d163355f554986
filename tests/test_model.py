"""A randomized test of the engine against a small reference model of the
vote semantics (DESIGN.md): reads, writes, discards, write-zeroes and
flushes, interleaved with silent corruption of replica images (os.pwrite)
and injected I/O errors. After every step the results, the error kinds, the
events, the replica states and every replica image must match the model.

The model, per 512-byte sector of replica images:
- a request is cut into vote segments (vote blocks, 512 B to 8 KiB, clipped
  to it);
- a read asks every in-service replica; one whose read fails leaves service
  and casts no vote; fewer than threshold answers: DegradedError;
- per segment, classes of identical copies; the largest wins, a tie goes to
  the class with the earliest replica; below threshold: the request fails
  with NoQuorumError and nothing is written;
- losers get a bad-block event and, with repair on, the winning data (a
  repair write that fails takes that replica out of service);
- writes (and discard / write-zeroes as zeros) go to every in-service
  replica; one that fails leaves service; fewer than threshold in service
  (before or after): DegradedError.
"""
import os
import shutil
import tempfile
import warnings

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (RuleBasedStateMachine, initialize,
                                 invariant, precondition, rule)

from quorumblk import DegradedError, NoQuorumError, Quorum

SECTOR = 512
VB = 4096
BLOCKS = 4
SIZE = BLOCKS * VB
SECTORS = SIZE // SECTOR


def segments(off, length, vb=VB):
    """The request's vote segments: (start, end) byte ranges."""
    out = []
    pos = off
    while pos < off + length:
        end = min((pos // vb + 1) * vb, off + length)
        out.append((pos, end))
        pos = end
    return out


def sectors(start, end):
    return set(range(start // SECTOR, end // SECTOR))


def vote(copies, threshold):
    """copies: {replica: bytes}; returns (winner class as a sorted list of
    replicas, or None when no class reaches threshold)."""
    classes = []
    for r in sorted(copies):
        for cl in classes:
            if copies[cl[0]] == copies[r]:
                cl.append(r)
                break
        else:
            classes.append([r])
    best = classes[0]
    for cl in classes[1:]:
        if len(cl) > len(best):
            best = cl
    return best if len(best) >= threshold else None


class Model:
    def __init__(self, data, n, threshold, repair, vb=VB):
        self.vb = vb
        self.img = [bytearray(data) for _ in range(n)]
        self.n = n
        self.t = threshold
        self.repair = repair
        self.live = [True] * n
        self.fault = [None] * n     # None, "read" or "write"

    def in_service(self):
        return [r for r in range(self.n) if self.live[r]]

    def fail(self, r, ev):
        if self.live[r]:
            self.live[r] = False
            ev["failed"].add(r)

    def new_events(self):
        return {"failed": set(), "bad": set(), "repaired": set(),
                "noquorum": set()}

    def read(self, off, length):
        """Returns (data or an exception class, events)."""
        ev = self.new_events()
        if len(self.in_service()) < self.t:
            return DegradedError, ev
        ok = []
        for r in self.in_service():
            if self.fault[r] == "read":
                self.fail(r, ev)
            else:
                ok.append(r)
        if len(ok) < self.t:
            return DegradedError, ev
        out = bytearray()
        plan = []                   # (replica, start, end, data)
        for start, end in segments(off, length, self.vb):
            copies = {r: bytes(self.img[r][start:end]) for r in ok}
            win = vote(copies, self.t)
            if win is None:
                ev["noquorum"] |= sectors(start, end)
                continue
            data = copies[win[0]]
            out += data
            for r in ok:
                if r not in win:
                    ev["bad"] |= {(r, s) for s in sectors(start, end)}
                    plan.append((r, start, end, data))
        if ev["noquorum"]:
            ev["bad"] = set()       # nothing is reported as repairable
            return NoQuorumError, ev
        if self.repair:
            for r, start, end, data in plan:
                if not self.live[r]:
                    continue
                if self.fault[r] == "write":
                    self.fail(r, ev)
                    continue
                self.img[r][start:end] = data
                ev["repaired"] |= {(r, s) for s in sectors(start, end)}
        return bytes(out), ev

    def write(self, off, data, op="write"):
        ev = self.new_events()
        if len(self.in_service()) < self.t:
            return DegradedError, ev
        done = 0
        for r in self.in_service():
            if op == "write" and self.fault[r] == "write":
                self.fail(r, ev)
                continue
            self.img[r][off:off + len(data)] = data
            done += 1
        if done < self.t:
            return DegradedError, ev
        return None, ev

    def flush(self):
        ev = self.new_events()
        if len(self.in_service()) < self.t:
            return DegradedError, ev
        return None, ev


def covered(events, kind, with_replica=True):
    out = set()
    for e in events:
        if e["type"] != kind:
            continue
        s = sectors(e["offset"], e["offset"] + e["length"])
        out |= {(e["replica"], x) for x in s} if with_replica else s
    return out


sector_range = st.tuples(st.integers(0, SECTORS - 1),
                         st.integers(1, 3 * VB // SECTOR)).map(
    lambda t: (t[0] * SECTOR,
               min(t[1], SECTORS - t[0]) * SECTOR))


class QuorumMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="qbmodel-", dir=base)
        self.q = None

    @initialize(n=st.sampled_from([2, 3, 3, 4, 5, 1]), tpick=st.integers(0, 4),
                repair=st.booleans(), seed=st.integers(0, 3),
                hash=st.sampled_from(["xxh3", "sha256"]),
                vb=st.sampled_from([VB, VB, 512, 2048, 8192]))
    def open(self, n, tpick, repair, seed, hash, vb):
        import random
        data = random.Random(seed).randbytes(SIZE)
        self.paths = []
        for i in range(n):
            p = os.path.join(self.dir, f"r{i}.img")
            with open(p, "wb") as f:
                f.write(data)
            self.paths.append(p)
        threshold = 1 + tpick % n
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.q = Quorum(self.paths, threshold, repair=repair,
                            events_per_sec=0, timeout=30.0, hash=hash,
                            vote_block=vb)
        self.m = Model(data, n, threshold, repair, vb)

    def teardown(self):
        if self.q is not None:
            self.q.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- comparing a step ----
    def outcome(self, call):
        try:
            return call()
        except (DegradedError, NoQuorumError) as e:
            return type(e)

    def check_events(self, want):
        ev = self.q.events()
        failed = {e["replica"] for e in ev if e["type"] == "replica-failed"}
        assert failed == want["failed"], (ev, want)
        assert covered(ev, "bad-block") == want["bad"], (ev, want)
        assert covered(ev, "repaired") == want["repaired"], (ev, want)
        assert covered(ev, "quorum-failure", False) == want["noquorum"], \
            (ev, want)

    # ---- rules ----
    @rule(span=sector_range)
    def read(self, span):
        off, length = span
        want, ev = self.m.read(off, length)
        got = self.outcome(lambda: self.q.read(off, length))
        assert got == want, (off, length)
        self.check_events(ev)

    @rule(span=sector_range, seed=st.integers(0, 255))
    def write(self, span, seed):
        off, length = span
        data = bytes([seed]) * length
        want, ev = self.m.write(off, data)
        got = self.outcome(lambda: self.q.write(off, data))
        assert got == want
        self.check_events(ev)

    @rule(span=sector_range, op=st.sampled_from(["discard", "write_zeroes"]))
    def zero(self, span, op):
        off, length = span
        want, ev = self.m.write(off, bytes(length), op=op)
        got = self.outcome(lambda: getattr(self.q, op)(off, length))
        assert got == want
        self.check_events(ev)

    @rule()
    def flush(self):
        want, ev = self.m.flush()
        got = self.outcome(self.q.flush)
        assert got == want
        self.check_events(ev)

    @precondition(lambda self: self.q is not None)
    @rule(r=st.integers(0, 4), sector=st.integers(0, SECTORS - 1),
          at=st.integers(0, SECTOR - 16), val=st.integers(0, 2))
    def corrupt(self, r, sector, at, val):
        """Silent corruption; a small pool of values so that bad copies can
        agree with each other and form classes of their own."""
        r %= self.m.n
        off = sector * SECTOR + at
        data = bytes([val]) * 16
        fd = os.open(self.paths[r], os.O_WRONLY)
        try:
            os.pwrite(fd, data, off)
        finally:
            os.close(fd)
        self.m.img[r][off:off + 16] = data

    @precondition(lambda self: self.q is not None)
    @rule(src=st.integers(0, 4), dst=st.integers(0, 4),
          block=st.integers(0, BLOCKS - 1))
    def copy_block(self, src, dst, block):
        """Replica dst silently takes replica src's copy of one block."""
        src %= self.m.n
        dst %= self.m.n
        data = bytes(self.m.img[src][block * VB:(block + 1) * VB])
        fd = os.open(self.paths[dst], os.O_WRONLY)
        try:
            os.pwrite(fd, data, block * VB)
        finally:
            os.close(fd)
        self.m.img[dst][block * VB:(block + 1) * VB] = data

    @precondition(lambda self: self.q is not None)
    @rule(r=st.integers(0, 4), op=st.sampled_from(["read", "write"]))
    def inject(self, r, op):
        r %= self.m.n
        self.q.inject(r, "eio", ops=(op,))
        self.m.fault[r] = op

    # ---- after every step ----
    @invariant()
    def images_match(self):
        if self.q is None:
            return
        for r, p in enumerate(self.paths):
            with open(p, "rb") as f:
                assert f.read() == bytes(self.m.img[r]), f"replica {r}"

    @invariant()
    def states_match(self):
        if self.q is None:
            return
        got = [s["state"] == "in-service" for s in self.q.status()["replicas"]]
        assert got == self.m.live


QuorumMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("QB_MODEL_EXAMPLES", "100")),
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestModel = QuorumMachine.TestCase


def test_model_segments():
    """The model's own cutting of requests into vote segments."""
    assert segments(0, VB) == [(0, VB)]
    assert segments(512, 1024) == [(512, 1536)]
    assert segments(VB - 512, 1024) == [(VB - 512, VB), (VB, VB + 512)]
    assert segments(0, 2048, 512) == [(0, 512), (512, 1024), (1024, 1536),
                                      (1536, 2048)]
    assert vote({0: b"a", 1: b"b"}, 1) == [0]
    assert vote({0: b"a", 1: b"b", 2: b"b"}, 2) == [1, 2]
    assert vote({1: b"a", 2: b"b", 3: b"b", 0: b"a"}, 2) == [0, 1]
    assert vote({0: b"a", 1: b"b", 2: b"c"}, 2) is None


# ---- policy "threshold" returns what policy "all" returns ----
#
# With a majority threshold, a class of `threshold` agreeing copies is the
# largest class among all copies, so reading only `threshold` replicas first
# (and the rest on doubt) must return the same data, or fail the same way,
# as reading all of them. repair=False keeps the images fixed between reads.

from hypothesis import given  # noqa: E402


@given(n=st.sampled_from([3, 4, 5]),
       corruptions=st.lists(st.tuples(st.integers(0, 4),
                                      st.integers(0, SECTORS - 1),
                                      st.integers(0, 2)), max_size=12),
       reads=st.lists(sector_range, min_size=1, max_size=12))
@settings(max_examples=int(os.environ.get("QB_MODEL_EXAMPLES", "100")),
          deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
def test_policy_threshold_returns_what_all_returns(n, corruptions, reads):
    import random
    t = n // 2 + 1
    data = random.Random(n).randbytes(SIZE)
    d = tempfile.mkdtemp(prefix="qbpolicy-",
                         dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        paths = []
        for i in range(n):
            p = os.path.join(d, f"r{i}.img")
            with open(p, "wb") as f:
                f.write(data)
            paths.append(p)
        m = Model(data, n, t, repair=False)
        for r, sector, val in corruptions:
            r %= n
            off = sector * SECTOR + 100
            fd = os.open(paths[r], os.O_WRONLY)
            os.pwrite(fd, bytes([val]) * 8, off)
            os.close(fd)
            m.img[r][off:off + 8] = bytes([val]) * 8
        q_all = Quorum(paths, t, read_policy="all", repair=False)
        q_thr = Quorum(paths, t, read_policy="threshold", repair=False)
        try:
            for _ in range(2):          # rotate over different first sets
                for off, length in reads:
                    want, _ = m.read(off, length)
                    outs = []
                    for q in (q_all, q_thr):
                        try:
                            outs.append(q.read(off, length))
                        except (DegradedError, NoQuorumError) as e:
                            outs.append(type(e))
                    assert outs == [want, want], (off, length)
        finally:
            q_all.close()
            q_thr.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
