"""Replica sets: identity, freshness and the write-intent bitmap.

Every replica ends with quorumblk's metadata (csrc/meta.c has the layout):
the data stays at offset 0, so a replica is a plain raw image of the device
followed by a short tail. The header names the set (a UUID), the replica
(a UUID), the members of the set and their states, and an event count that
grows with every change of the members; the bitmap has one bit per region
where writes may be in flight, or that a member out of service missed.

`add` assembles a set from the replicas it is given:
  - none has metadata: a new set. Image files are grown by the metadata's
    size, so the device keeps each file's size; a block device gives up its
    tail, which must be zeros (nothing is overwritten).
  - all have metadata: they must be of one set (else: a foreign replica,
    refused), distinct members of it, and at least `threshold` of them
    current. A replica that the newest header (the highest event count)
    records as failed or resyncing is stale: it resyncs before it votes.
  - some have, some have not: refused; a new replica joins a live device.
  - a replica that was removed from the set (its own header or the current
    ones say so) is refused: it missed every write since.
Then every dirty region is resynced by vote, as a job of the daemon once
the device is LIVE (Resync): after an unclean stop, the regions with
writes in flight; for a stale replica, also everything written while it
was out (bits are never cleared while a member is out of service). A
replica that joined empty (replace, add-replica) and had not finished its
resync gets the whole device. Until a dirty region is resynced, a read
there reads every replica in service and votes by the crash rule (below),
as the resync will, repairing the losing copies first (the engine:
qb_quorum_region_synced); the bitmap keeps every bit until the end, so a
crash meanwhile resyncs again at the next add.

In the dirty regions, the vote of a resync takes the largest class even
below the threshold (ties: the earliest replica given): a region is dirty
only where a write may have been in flight, and a write in flight was never
acknowledged, so either version is a correct result; what matters is that
every replica ends up with the same one. Everywhere else no quorum stays no
quorum: reported, never "resolved".
"""
import errno
import os
import time
import uuid

from . import replica
from ._core import ffi, lib
from .errors import RefusedError

IN_SERVICE = lib.QB_REPLICA_IN_SERVICE
FAILED = lib.QB_REPLICA_FAILED
RESYNCING = lib.QB_REPLICA_RESYNCING
REMOVED = lib.QB_REPLICA_REMOVED
FULL_SYNC = lib.QB_MEMBER_FULL_SYNC
STATE_NAMES = {IN_SERVICE: "in-service", FAILED: "failed",
               RESYNCING: "resyncing", REMOVED: "removed"}
SYNC_STEP = 16 << 20           # bytes per sync call: progress and rate limit

REGION_SHIFT_MIN = 22          # 4 MiB regions ...
MAX_REGIONS = 1 << 18          # ... or larger, for a bitmap of at most 32 KiB


class SetError(RefusedError):
    """the replicas do not make a valid replica set."""


def region_shift_for(data_size):
    shift = REGION_SHIFT_MIN
    while (data_size + (1 << shift) - 1) >> shift > MAX_REGIONS:
        shift += 1
    return shift


def _size(path):
    """(bytes, fixed): a block device or an NBD export cannot grow."""
    return replica.size(path)


def read(path):
    """(struct qb_meta, bitmap bytes) of a replica, or (None, None) when it
    has no metadata. Damage or an I/O error raises SetError."""
    m = ffi.new("struct qb_meta *")
    ret = lib.qb_meta_read(path.encode(), m, ffi.NULL, 0)
    if ret == -errno.ENODATA:
        return None, None
    if ret < 0:
        raise SetError(ffi.string(lib.qb_last_error()).decode())
    nbytes = lib.qb_meta_bitmap_bytes(m.nregions)
    bitmap = ffi.new("uint8_t[]", nbytes)
    ret = lib.qb_meta_read(path.encode(), m, bitmap, nbytes)
    if ret < 0:
        raise SetError(ffi.string(lib.qb_last_error()).decode())
    return m, bytes(ffi.buffer(bitmap))


def write(path, m, bitmap=None):
    buf = ffi.NULL if bitmap is None else ffi.from_buffer(bitmap)
    if lib.qb_meta_write(path.encode(), m, buf) < 0:
        raise SetError(ffi.string(lib.qb_last_error()).decode())


def write_both(path, m, bitmap=None):
    """A header for a new member: both copies (m's seq and the next), so
    that one bad sector cannot leave it without a header."""
    write(path, m, bitmap)
    m.seq += 1
    write(path, m)


def uuid_text(raw):
    return str(uuid.UUID(bytes=bytes(raw)))


def _copy(m):
    out = ffi.new("struct qb_meta *")
    ffi.memmove(out, m, ffi.sizeof("struct qb_meta"))
    return out


class Plan:
    """What `add` found and will do: each replica's header as it will be
    written, the union of the bitmaps, who is stale and who is missing."""

    def __init__(self, metas, bitmap, created, stale, missing):
        self.metas = metas          # one struct qb_meta * per replica
        self.bitmap = bitmap        # bytes
        self.created = created      # a new set was made
        self.stale = stale          # replica indexes that must resync
        self.missing = missing      # member UUIDs not given (now failed)
        self.pending = None         # a new set not written yet: its sizes

    @property
    def set_uuid(self):
        return uuid_text(self.metas[0].set_uuid)

    def dirty_regions(self):
        return dirty_ranges(self.bitmap, self.metas[0].region_shift,
                            self.metas[0].nregions, merge=False)

    def full_sync(self):
        """Stale replicas that joined empty and never finished their
        resync: they need all of the device."""
        return [i for i in self.stale
                if self.metas[i].members[self.metas[i].slot].flags & FULL_SYNC]


def dirty_ranges(bitmap, shift, nregions, merge=True):
    """[(offset, length)] of the set bits; merge joins neighbours."""
    out = []
    for i in range(nregions):
        if bitmap[i // 8] & (1 << (i % 8)):
            if merge and out and out[-1][0] + out[-1][1] == i << shift:
                out[-1] = (out[-1][0], out[-1][1] + (1 << shift))
            else:
                out.append((i << shift, 1 << shift))
    return out


# -- a new set --

def _fit(size, shift):
    """The data a block device of size bytes keeps besides the metadata."""
    data = size - size % 4096
    while data and data + lib.qb_meta_overhead(data, shift) > size:
        data -= 4096
    return data


def _new_layout(paths, threshold, region_shift=None):
    """The data size of a new set and the size each replica will have: image
    files grow by the metadata; a block device cannot, so its tail holds it.
    With block devices in the set every replica keeps the same data as they
    do: an image file's tail then holds the metadata too (and must be zeros,
    like theirs). Checks every replica and writes nothing (see _grow)."""
    sizes = [_size(p) for p in paths]
    if len({s for s, _ in sizes}) != 1:
        raise SetError("replica sizes differ: " + ", ".join(
            f"{p}: {s} bytes" for p, (s, _) in zip(paths, sizes)))
    size = sizes[0][0]
    shift = region_shift or region_shift_for(size)
    data = _fit(size, shift) if any(blk for _, blk in sizes) else size
    total = data + lib.qb_meta_overhead(data, shift)
    for p in paths:
        _check_zero_tail(p, data, size)
    return data, [size if blk or size >= total else total for _, blk in sizes]


def _grow(paths, new_sizes):
    """Grow the image files of a new set to the sizes _new_layout chose."""
    for p, want in zip(paths, new_sizes):
        size, _ = _size(p)
        if size < want:
            try:
                os.truncate(p, want)
            except OSError as e:
                raise SetError(f"{p}: cannot grow it from {size} to {want} bytes "
                               f"for quorumblk's metadata: {e.strerror}")


def _tail_error(path, data, total):
    return SetError(
        f"{path}: its last {total - data} bytes (from offset {data}) "
        "hold data, and quorumblk keeps its metadata there; zero "
        f"them (a device: blkdiscard -z -o {data} DEVICE) if that "
        "data is not needed")


def _check_zero_tail(path, data, total):
    if replica.is_nbd(path):
        if not replica.tail_is_zero(path, data, total - data):
            raise _tail_error(path, data, total)
        return
    with open(path, "rb", buffering=0) as f:
        f.seek(data)
        left = total - data
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            if chunk.count(0) != len(chunk):
                raise _tail_error(path, data, total)
            left -= len(chunk)


def create(paths, threshold, region_shift=None, write=True):
    """A new set over replicas without metadata. write=False only plans it:
    nothing is written until commit() (add checks everything else first)."""
    shift = region_shift or region_shift_for(_size(paths[0])[0])
    data_size, new_sizes = _new_layout(paths, threshold, shift)
    set_id = uuid.uuid4().bytes
    ids = [uuid.uuid4().bytes for _ in paths]
    metas = []
    for i, p in enumerate(paths):
        m = ffi.new("struct qb_meta *")
        m.set_uuid = list(set_id)
        m.replica_uuid = list(ids[i])
        m.data_size = data_size
        m.replica_size = new_sizes[i]
        m.region_shift = shift
        m.nregions = (data_size + (1 << shift) - 1) >> shift
        m.events = 1
        m.seq = 1
        m.threshold = threshold
        m.nmembers = len(paths)
        m.slot = i
        m.ctime = int(time.time())
        for j in range(len(paths)):
            m.members[j].uuid = list(ids[j])
            m.members[j].state = IN_SERVICE
        metas.append(m)
    bitmap = bytes(lib.qb_meta_bitmap_bytes(metas[0].nregions))
    plan = Plan(metas, bitmap, True, [], [])
    plan.pending = new_sizes
    if write:
        commit(paths, plan)
    return plan


# -- an existing set --

def assemble(paths, threshold, region_shift=None, write=True):
    """Read every replica's metadata and decide; see the module's text.
    Writes nothing unless a new set is created (and with write=False not
    even then: commit() makes it)."""
    found = [read(p) for p in paths]
    have = [p for p, (m, _) in zip(paths, found) if m is not None]
    if not have:
        return create(paths, threshold, region_shift, write=write)
    if len(have) != len(paths):
        bare = [p for p, (m, _) in zip(paths, found) if m is None]
        raise SetError(
            f"{', '.join(bare)}: no quorumblk metadata, but {have[0]} belongs to "
            f"replica set {uuid_text(found[paths.index(have[0])][0].set_uuid)}; "
            "a new replica joins a running device with `quorumblk replace` or "
            "`quorumblk add-replica`")
    metas = [m for m, _ in found]
    ref_i = max(range(len(paths)), key=lambda i: (metas[i].events, -i))
    ref = metas[ref_i]
    for p, m in zip(paths, metas):
        if bytes(m.set_uuid) != bytes(ref.set_uuid):
            raise SetError(
                f"{p} belongs to another replica set ({uuid_text(m.set_uuid)}, "
                f"not {uuid_text(ref.set_uuid)} of {paths[ref_i]}): refused")
        if m.data_size != ref.data_size or m.region_shift != ref.region_shift:
            raise SetError(f"{p}: its metadata disagrees with {paths[ref_i]} "
                           f"on the data size ({m.data_size} vs {ref.data_size})")
    members = {bytes(ref.members[s].uuid): s for s in range(ref.nmembers)
               if ref.members[s].state != REMOVED}
    seen = {}
    for p, m in zip(paths, metas):
        rid = bytes(m.replica_uuid)
        if m.members[m.slot].state == REMOVED:
            raise SetError(
                f"{p} (replica {uuid_text(rid)}) was removed from replica set "
                f"{uuid_text(m.set_uuid)} and missed every write since: refused; "
                "to use it again, add it to the running device with "
                "`quorumblk add-replica` (a full resync)")
        if rid not in members:
            raise SetError(
                f"{p} (replica {uuid_text(rid)}) is no longer a member of set "
                f"{uuid_text(ref.set_uuid)}: it was removed or replaced; "
                "add it to the running device with `quorumblk add-replica`")
        if rid in seen:
            raise SetError(f"{seen[rid]} and {p} are copies of the same replica "
                           f"({uuid_text(rid)}): give each replica once")
        seen[rid] = p
    # stale: what the newest header says of it. Its own may be older and
    # still current (its newer copy torn); a member that missed writes is
    # recorded as out of service before any write it missed is acknowledged
    stale, fresh = [], []
    for i, m in enumerate(metas):
        slot = members[bytes(m.replica_uuid)]
        if ref.members[slot].state != IN_SERVICE:
            stale.append(i)
        else:
            fresh.append(i)
    if len(fresh) < threshold:
        raise SetError(
            f"only {len(fresh)} of the replicas are current, below the threshold "
            f"{threshold}: current: {', '.join(paths[i] for i in fresh) or 'none'}; "
            f"stale (missed writes): {', '.join(paths[i] for i in stale)}")
    given = set(seen)
    missing = [u for u in members if u not in given]
    # the new headers: one more event, every member's state as it now is
    bitmap = bytearray(len(found[ref_i][1]))
    for _, bm in found:
        for k, b in enumerate(bm):
            bitmap[k] |= b
    states = {}
    for i, m in enumerate(metas):
        states[members[bytes(m.replica_uuid)]] = RESYNCING if i in stale else IN_SERVICE
    for u in missing:
        states[members[u]] = FAILED
    new = []
    for i, m in enumerate(metas):
        n = _copy(ref)
        n.replica_uuid = list(bytes(m.replica_uuid))
        n.slot = members[bytes(m.replica_uuid)]
        n.replica_size = m.replica_size
        n.events = ref.events + 1
        n.seq = max(x.seq for x in metas) + 1
        n.threshold = threshold
        for s, st in states.items():
            n.members[s].state = st
        new.append(n)
    return Plan(new, bytes(bitmap), False, stale, missing)


def commit(paths, plan):
    """Write the plan's headers (and the bitmap union) to every replica: from
    now on the set is as the plan says, whatever happens next. A new set
    planned without writing is made now: image files grow, then each gets
    both copies of its header."""
    if plan.created:
        if plan.pending:
            _grow(paths, plan.pending)
            for p, m in zip(paths, plan.metas):
                write_both(p, m, plan.bitmap)
            plan.pending = None
        return
    for p, m in zip(paths, plan.metas):
        write(p, m, plan.bitmap)


def _add_counts(total, res):
    for k in ("blocks", "differing", "unrecoverable", "written"):
        total[k] += res[k]
    total["bad"] = [a + b for a, b in zip(total["bad"], res["bad"])]


def sync_ranges(q, ranges, targets=(), progress=None, **kw):
    """q.sync over [(offset, length)] in SYNC_STEP pieces, the counts
    added up. progress(bytes done) is called after each piece. With
    plurality (the crash rule) the engine is told of every region done, so
    that reads there take the normal vote again."""
    total = {"bytes": 0, "blocks": 0, "differing": 0, "unrecoverable": 0,
             "written": 0, "bad": [0] * len(q.paths)}
    for start, length in ranges:
        off, end = start, min(start + length, q.size)
        while off < end:
            n = min(SYNC_STEP, end - off)
            _add_counts(total, q.sync(off, n, targets=targets, **kw))
            total["bytes"] += n
            off += n
            if kw.get("plurality"):
                q.region_synced(start, off - start)
            if progress:
                progress(total["bytes"])
    return total


def _gaps(ranges, size):
    """[(offset, length)] of [0, size) that ranges (sorted, merged) leave."""
    out, at = [], 0
    for off, length in ranges:
        if off > at:
            out.append((at, off - at))
        at = max(at, off + length)
    if at < size:
        out.append((at, size - at))
    return out


class Resync:
    """The resync of an assembled set, run once it is attached (q.set_meta)
    and, in the daemon, while the device serves: by vote, the dirty regions
    after an unclean stop, and what stale replicas missed (they get the
    result). The crash rule (plurality, see the module's text) holds only in
    the regions the bitmap holds dirty: a replica that joined empty and
    never finished gets the rest of the device too, by the normal vote,
    where a block without quorum stays as it is and is counted.

    report is what `status` shows as "resync": "done" false and "bytes" so
    far while it runs, the counts once done (updated in place)."""

    def __init__(self, q, plan):
        self.q, self.plan = q, plan
        self.whole = bool(plan.full_sync())
        regions = [(0, q.size)] if self.whole else plan.dirty_regions()
        dirty = dirty_ranges(plan.bitmap, plan.metas[0].region_shift,
                             plan.metas[0].nregions)
        self.passes = [(dirty, True)]
        if self.whole:
            self.passes.append((_gaps(dirty, q.size), False))
        self.total = sum(min(o + n, q.size) - o
                         for ranges, _ in self.passes for o, n in ranges)
        self.report = {
            "reason": ("stale-replica" if plan.stale else
                       "unclean-stop" if regions else "none"),
            "regions": len(regions), "bytes": 0, "total_bytes": self.total,
            "size": q.size, "done": False, "whole": self.whole,
            "stale": [q.paths[i] for i in plan.stale], "kept_out": [],
            "missing": [str(uuid.UUID(bytes=u)) for u in plan.missing],
            "differing_blocks": [0] * len(q.paths), "copied_blocks": 0,
            "unrecoverable_blocks": 0}

    @property
    def needed(self):
        return self.report["reason"] != "none"

    def run(self, progress=None):
        """Resync, then let the bitmap clean and the stale replicas vote.
        progress(bytes done) after every step (it may raise to stop: the
        bitmap then keeps every bit, and reads keep the crash rule)."""
        q, stale = self.q, self.plan.stale
        res = {"bytes": 0, "blocks": 0, "differing": 0, "unrecoverable": 0,
               "written": 0, "bad": [0] * len(q.paths)}

        def step(n, done):
            self.report["bytes"] = done + n
            if progress:
                progress(done + n)
        for ranges, plurality in self.passes:
            done = res["bytes"]
            part = sync_ranges(q, ranges, targets=stale, plurality=plurality,
                               progress=lambda n, done=done: step(n, done))
            _add_counts(res, part)
            res["bytes"] += part["bytes"]
        q.resynced()
        # a stale replica cannot get a block without quorum: it stays out
        # rather than vote with its own copy there (only the whole-device
        # pass can leave such blocks: plurality always has a winner); one
        # that failed meanwhile stays failed
        kept_out = stale if res["unrecoverable"] else []
        for i in stale:
            if q.replica_states()[i] == "resyncing":
                q.set_state(i, "failed" if i in kept_out else "in-service")
        self.report.update({
            "bytes": res["bytes"], "done": True,
            "kept_out": [q.paths[i] for i in kept_out],
            "differing_blocks": res["bad"], "copied_blocks": res["written"],
            "unrecoverable_blocks": res["unrecoverable"]})
        return self.report


def resync(q, plan, progress=None):
    """The whole resync at once (see Resync); returns its report."""
    return Resync(q, plan).run(progress)


# -- a replica that joins a running set --

def _removed_or_bare(path, set_uuid):
    """A replica may join empty if it has no metadata, or was removed from
    this very set; anything else on it is refused, never overwritten."""
    try:
        m, _ = read(path)
    except SetError as e:
        raise SetError(f"{e}; refusing to overwrite it")
    if m is None:
        return
    if bytes(m.set_uuid) != set_uuid:
        raise SetError(
            f"{path} belongs to replica set {uuid_text(m.set_uuid)}: refused (its "
            "data is not overwritten; remove its metadata first, e.g. truncate "
            "an image file to its data size)")
    if m.members[m.slot].state != REMOVED:
        raise SetError(f"{path} is a member of this set already (replica "
                       f"{uuid_text(m.replica_uuid)}): use `quorumblk readd`")


def new_member(ref, members, path):
    """Make path a new, empty member of the set whose current header is ref
    and whose members are `members` (a list of (uuid, state) per slot):
    grow an image file for the metadata, write its header (RESYNCING, the
    whole device stale) and a clear bitmap. Returns the header."""
    _removed_or_bare(path, bytes(ref.set_uuid))
    size, is_blk = _size(path)
    need = ref.data_size + lib.qb_meta_overhead(ref.data_size, ref.region_shift)
    if size < ref.data_size or (is_blk and size < need):
        raise SetError(f"{path}: {size} bytes, too small for this device "
                       f"({ref.data_size} bytes of data and "
                       f"{need - ref.data_size} of metadata)")
    if not is_blk and size < need:
        try:
            os.truncate(path, need)
        except OSError as e:
            raise SetError(f"{path}: cannot grow it to {need} bytes for quorumblk's "
                           f"metadata: {e.strerror}")
        size = need
    free = [s for s, (_, st) in enumerate(members) if st == REMOVED]
    slot = free[0] if free else len(members)
    if slot >= lib.QB_MAX_REPLICAS:
        raise SetError(f"{path}: the set has {slot} members, its most")
    m = _copy(ref)
    m.replica_uuid = list(uuid.uuid4().bytes)
    m.replica_size = size
    m.slot = slot
    m.nmembers = max(len(members), slot + 1)
    for s, (u, st) in enumerate(members):
        m.members[s].uuid = list(u)
        m.members[s].state = st
    m.members[slot].uuid = list(bytes(m.replica_uuid))
    m.members[slot].state = RESYNCING
    m.members[slot].flags = FULL_SYNC
    write_both(path, m, bytes(lib.qb_meta_bitmap_bytes(m.nregions)))
    return m
