"""What the campaign expects of the device.

Versions: per 512-byte sector, the set of versions a read may return. The
version of the last acknowledged write (`acked`), plus the versions of
writes whose outcome is unknown (`maybe`: they failed, or were in flight at
a crash) until an acknowledged write covers the sector again.

After a crash every sector of unknown outcome is `unsettled`: the engine
reads it by the crash rule (every replica, plurality) until the resync has
passed it, and repairs the losers, so the first read settles it (`settle`)
and every later read, the resync's result and the final audit must hold
that same version. Reads that overlap the first one in time must agree
with it too: a read is checked against what was possible at its start and
against the model at its end.

Tracker: the operations in flight, in the order the worker reported them.
Writes never overlap each other (the worker takes range locks); a read may
overlap writes, and then it may return what was possible when it started or
the version of any write in flight at some time during the read.

Damage: what the thrasher did that the vote must survive, kept
conservatively. A replica is down from the moment a fault is armed on it or
it is taken out until it is back in service with no fault; a flipped sector
is forgotten only when an acknowledged write that started after the flip
covers it (on replicas not down since the write started), or a scrub that
started after it completes. "After" is by CLOCK_MONOTONIC, which the worker
and the controller share: the worker stamps each operation's start, since a
start may still sit in the pipe when the controller flips a bit. The thrasher keeps
damage to at most N - threshold replicas per vote block, so a quorum always
exists there, except where a step deliberately does otherwise.
"""
from array import array

from .payload import GARBAGE, SECTOR

BLOCK = 4096                    # the vote block
SECTORS_PER_BLOCK = BLOCK // SECTOR
WRITES = ("write", "write-fua", "discard", "write-zeroes")


class Snapshot:
    """What sectors [first, first + count) could hold at one moment."""

    def __init__(self, first, acked, maybe, gen):
        self.first = first
        self.acked = acked
        self.maybe = maybe
        self.gen = gen

    def allows(self, sector, version):
        return (self.acked[sector - self.first] == version or
                version in self.maybe.get(sector, ()))


class Versions:
    def __init__(self, sectors):
        self.sectors = sectors
        self.acked = array("q", bytes(8 * sectors))
        self.maybe = {}         # sector -> {versions of unknown outcome}
        self.unsettled = set()  # sectors a crash left open, not read since
        self.gen = array("q", bytes(8 * sectors))   # the last write's number, per sector
        self.writes = 0

    def allowed(self, sector):
        return {self.acked[sector]} | self.maybe.get(sector, set())

    def _maybe_in(self, first, count):
        if len(self.maybe) < count:
            return [s for s in self.maybe if first <= s < first + count]
        return [s for s in range(first, first + count) if s in self.maybe]

    def snapshot(self, first, count):
        return Snapshot(first, self.acked[first:first + count],
                        {s: set(self.maybe[s]) for s in self._maybe_in(first, count)},
                        self.gen[first:first + count])

    def _wrote(self, first, count):
        self.writes += 1
        self.gen[first:first + count] = array("q", [self.writes]) * count

    def unwritten_since(self, snapshot, sector):
        """No write ended at sector since snapshot was taken."""
        return self.gen[sector] == snapshot.gen[sector - snapshot.first]

    def allows_now(self, sector, version):
        return self.acked[sector] == version or version in self.maybe.get(sector, ())

    def acknowledge(self, first, count, version):
        self.acked[first:first + count] = array("q", [version]) * count
        self._wrote(first, count)
        for s in self._maybe_in(first, count):
            del self.maybe[s]
            self.unsettled.discard(s)

    def unknown(self, first, count, version):
        self._wrote(first, count)
        for s in range(first, first + count):
            if self.acked[s] != version:
                self.maybe.setdefault(s, set()).add(version)

    def crashed(self):
        """A crash: every sector of unknown outcome is open until read."""
        self.unsettled = set(self.maybe)

    def settle(self, sector, version):
        """Sector holds version from now on (the first read after a crash)."""
        self.acked[sector] = version
        self.maybe.pop(sector, None)
        self.unsettled.discard(sector)


class Op:
    """One operation sent to the worker."""

    def __init__(self, op_id, kind, offset, length, version=0, lane="load"):
        self.id = op_id
        self.kind = kind
        self.offset = offset
        self.length = length
        self.first = offset // SECTOR
        self.count = length // SECTOR
        self.version = version      # what a write puts there (0: zeros)
        self.lane = lane
        self.snapshot = None        # reads: what was possible at the start
        self.overlaps = []          # reads: writes in flight during it
        self.eio_ok = False         # a quorum could not exist at some time
        self.raced = False          # a write overlapped it (reads)
        self.started_at = 0.0       # the worker's clock, at the engine call
        self.started = None         # controller's monotonic time
        self.verify = False         # a read-back after a crash
        self.on_end = None          # a thrasher script waits for it

    @property
    def writes(self):
        return self.kind in WRITES

    def covers(self, sector):
        return self.first <= sector < self.first + self.count

    def overlaps_op(self, other):
        return (self.first < other.first + other.count and
                other.first < self.first + self.count)

    def blocks(self):
        return range(self.offset // BLOCK, (self.offset + self.length - 1) // BLOCK + 1)


class Tracker:
    """Operations in flight, in the worker's reported order."""

    def __init__(self, versions):
        self.versions = versions
        self.running = {}

    def start(self, op):
        if op.kind == "read":
            op.snapshot = self.versions.snapshot(op.first, op.count)
            op.overlaps = [w for w in self.running.values()
                           if w.writes and w.overlaps_op(op)]
            op.raced = bool(op.overlaps)
        elif op.writes:
            for r in self.running.values():
                if r.kind == "read" and r.overlaps_op(op):
                    r.overlaps.append(op)
                    r.raced = True
        self.running[op.id] = op

    def end(self, op_id):
        return self.running.pop(op_id, None)

    def allowed(self, op, sector):
        """What read op may return at sector."""
        out = {op.snapshot.acked[sector - op.first]} | op.snapshot.maybe.get(sector, set())
        return out | {w.version for w in op.overlaps if w.covers(sector)}

    def mismatches(self, op, runs):
        """[(sector, version read)] a read returned that it may not have:
        not possible at its start, or no longer possible now although no
        write touched the sector since its start (another read settled it
        on another version meanwhile: the crash rule's answer changed)."""
        bad = []
        sector = op.first
        versions = self.versions
        for count, version in runs:
            for s in range(sector, sector + count):
                if op.snapshot.allows(s, version):
                    if versions.allows_now(s, version) or \
                            not versions.unwritten_since(op.snapshot, s) or \
                            any(w.covers(s) for w in op.overlaps):
                        continue
                elif any(w.version == version and w.covers(s) for w in op.overlaps):
                    continue
                bad.append((s, version))
            sector += count
        if sector != op.first + op.count:
            bad.append((sector, GARBAGE))       # a short or long result
        return bad


class Damage:
    def __init__(self, members, threshold):
        self.members = list(members)    # paths, not removed
        self.threshold = threshold
        self.down = set()               # paths out of service or faulted
        self.shaky = set()              # paths whose metadata may be damaged
        self.flips = {}                 # block -> {path: {sector: time}}
        self.back_at = {}               # path -> when it last stopped being down
        self.forgotten = []             # (when, block, path): flips forgotten
        self.meta_victim = None         # the one replica with metadata flips

    def up(self, path, now):
        """path is back in service with no fault."""
        if path in self.down:
            self.down.discard(path)
            self.back_at[path] = now

    def down_since(self, when):
        """Replicas down now or at some time since `when`."""
        return self.down | {p for p, t in self.back_at.items() if t >= when}

    # -- membership --
    def join(self, path):
        if path not in self.members:
            self.members.append(path)
        self.down.add(path)

    def set_members(self, paths):
        """The members are exactly paths from now on."""
        for p in [m for m in self.members if m not in paths]:
            self.leave(p)
        for p in paths:
            if p not in self.members:
                self.members.append(p)

    def leave(self, path):
        if path in self.members:
            self.members.remove(path)
        self.down.discard(path)
        self.shaky.discard(path)
        if self.meta_victim == path:
            self.meta_victim = None
        for block in list(self.flips):
            self.flips[block].pop(path, None)
            if not self.flips[block]:
                del self.flips[block]

    @property
    def budget(self):
        return len(self.members) - self.threshold

    # -- questions --
    def flipped(self, block):
        return set(self.flips.get(block, ()))

    def _risky(self, block=None):
        out = (self.down | self.shaky) & set(self.members)
        return out | self.flipped(block) if block is not None else out

    def allows_flip(self, path, block):
        return len(self._risky(block) | {path}) <= self.budget

    def allows_down(self, path, extra_budget=0):
        budget = self.budget + extra_budget
        if len(self._risky() | {path}) > budget:
            return False
        return all(len(self._risky(b) | {path}) <= budget for b in self.flips)

    def allows_leave(self, path):
        """path may leave the set: the damage left fits the smaller budget."""
        budget = self.budget - 1
        if len(self._risky() - {path}) > budget:
            return False
        return all(len(self._risky(b) - {path}) <= budget for b in self.flips)

    def degraded(self, since=None):
        """Fewer than threshold members in service (now, or at some time
        since `since`)."""
        down = self.down if since is None else self.down_since(since)
        return len(self.members) - len(down & set(self.members)) < self.threshold

    def no_quorum_possible(self, blocks, since):
        """Some block in `blocks` (a range) may have had no quorum at some
        time since `since`."""
        if self.degraded(since):
            return True
        lo, hi = blocks.start, blocks.stop
        recent = {}
        for when, block, path in self.forgotten:
            if when >= since and lo <= block < hi:
                recent.setdefault(block, set()).add(path)
        for block in set(self.flips) | set(recent):
            if lo <= block < hi and self.short(block, since, recent.get(block, set())):
                return True
        return False

    def short(self, block, since=None, extra=frozenset()):
        down = self.down if since is None else self.down_since(since)
        bad = (down | self.flipped(block) | extra) & set(self.members)
        return len(self.members) - len(bad) < self.threshold

    def _forget(self, now, block, path):
        self.forgotten.append((now, block, path))
        if len(self.forgotten) > 4096:
            del self.forgotten[:1024]

    def flipped_blocks(self, path):
        return [b for b, per in self.flips.items() if path in per]

    def has_flip(self, path, block):
        return path in self.flips.get(block, {})

    # -- changes --
    def flip_block(self, path, block, when):
        """path's copy of block may be damaged anywhere (a flip is a
        read-modify-write of the page: a racing write may lose its part)."""
        sectors = self.flips.setdefault(block, {}).setdefault(path, {})
        for s in range(block * SECTORS_PER_BLOCK, (block + 1) * SECTORS_PER_BLOCK):
            sectors[s] = when

    def written(self, first, count, since, now):
        """An acknowledged write that started at `since` covered sectors
        [first, first + count): flips before it are gone, except on
        replicas down at some time since (they may have missed it)."""
        skip = self.down_since(since)
        lo, hi = first // SECTORS_PER_BLOCK, (first + count - 1) // SECTORS_PER_BLOCK
        for block in [b for b in self.flips if lo <= b <= hi]:
            per = self.flips[block]
            for path in list(per):
                if path in skip:
                    continue
                sectors = per[path]
                for s in [s for s, t in sectors.items()
                          if first <= s < first + count and t < since]:
                    del sectors[s]
                if not sectors:
                    del per[path]
                    self._forget(now, block, path)
            if not per:
                del self.flips[block]

    def scrubbed(self, since, now):
        """A scrub asked for at `since` ended: flips before it on replicas
        in service all along are repaired, where the block had a quorum."""
        skip = self.down_since(since)
        for block in list(self.flips):
            if self.short(block):
                continue
            per = self.flips[block]
            for path in list(per):
                if path in skip:
                    continue
                per[path] = {s: t for s, t in per[path].items() if t >= since}
                if not per[path]:
                    del per[path]
                    self._forget(now, block, path)
            if not per:
                del self.flips[block]
