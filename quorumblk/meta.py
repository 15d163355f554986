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
    current. A replica that is behind (lower event count, or marked failed
    or resyncing by the current ones) is stale: it resyncs before it votes.
  - some have, some have not: refused; a new replica joins a live device.
Then every dirty region is resynced by vote before the device starts: after
an unclean stop, the regions with writes in flight; for a stale replica,
also everything written while it was out (bits are never cleared while a
member is out of service).
"""
import errno
import os
import stat
import time
import uuid

from ._core import ffi, lib
from .runtime import CommandError

IN_SERVICE = lib.QB_REPLICA_IN_SERVICE
FAILED = lib.QB_REPLICA_FAILED
RESYNCING = lib.QB_REPLICA_RESYNCING
STATE_NAMES = {IN_SERVICE: "in-service", FAILED: "failed",
               RESYNCING: "resyncing"}

REGION_SHIFT_MIN = 22          # 4 MiB regions ...
MAX_REGIONS = 1 << 18          # ... or larger, for a bitmap of at most 32 KiB


class SetError(CommandError):
    """the replicas do not make a valid replica set."""
    exit_code = 10


def region_shift_for(data_size):
    shift = REGION_SHIFT_MIN
    while (data_size + (1 << shift) - 1) >> shift > MAX_REGIONS:
        shift += 1
    return shift


def _size(path):
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.lseek(fd, 0, os.SEEK_END), True
        finally:
            os.close(fd)
    return st.st_size, False


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

    @property
    def set_uuid(self):
        return uuid_text(self.metas[0].set_uuid)

    def dirty_regions(self):
        shift = self.metas[0].region_shift
        n = self.metas[0].nregions
        out = []
        for i in range(n):
            if self.bitmap[i // 8] & (1 << (i % 8)):
                out.append((i << shift, 1 << shift))
        return out


# -- a new set --

def _new_layout(paths, threshold, region_shift=None):
    """Grow image files (or check block devices' tails) and return the
    data size. Nothing is written before every replica is checked."""
    sizes = [_size(p) for p in paths]
    plans = []
    for p, (size, is_blk) in zip(paths, sizes):
        if not is_blk:
            shift = region_shift or region_shift_for(size)
            plans.append((p, size, size + lib.qb_meta_overhead(size, shift), False))
            continue
        data = size
        shift = region_shift or region_shift_for(size)
        while data and data + lib.qb_meta_overhead(data, shift) > size:
            data -= 4096
        data -= data % 4096
        plans.append((p, data, size, True))
    datas = {d for _, d, _, _ in plans}
    if len(datas) != 1:
        raise SetError("replica sizes differ: " + ", ".join(
            f"{p}: {s} bytes" for p, (s, _) in zip(paths, sizes)))
    for p, data, total, is_blk in plans:
        if is_blk:
            _check_zero_tail(p, data, total)
    for p, data, total, is_blk in plans:
        if not is_blk and os.stat(p).st_size < total:
            try:
                os.truncate(p, total)
            except OSError as e:
                raise SetError(f"{p}: cannot grow it by {total - data} bytes "
                               f"for quorumblk's metadata: {e.strerror}")
    return datas.pop()


def _check_zero_tail(path, data, total):
    with open(path, "rb", buffering=0) as f:
        f.seek(data)
        left = total - data
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            if chunk.count(0) != len(chunk):
                raise SetError(
                    f"{path}: its last {total - data} bytes (from offset {data}) "
                    "hold data, and quorumblk keeps its metadata there; clear "
                    "them (e.g. blkdiscard -z -o {data}) if that data is not needed")
            left -= len(chunk)


def create(paths, threshold, region_shift=None):
    data_size = _new_layout(paths, threshold, region_shift)
    shift = region_shift or region_shift_for(data_size)
    set_id = uuid.uuid4().bytes
    ids = [uuid.uuid4().bytes for _ in paths]
    metas = []
    for i, p in enumerate(paths):
        size, _ = _size(p)
        m = ffi.new("struct qb_meta *")
        m.set_uuid = list(set_id)
        m.replica_uuid = list(ids[i])
        m.data_size = data_size
        m.replica_size = size
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
    for p, m in zip(paths, metas):
        write(p, m, bitmap)
    return Plan(metas, bitmap, True, [], [])


# -- an existing set --

def assemble(paths, threshold, region_shift=None):
    """Read every replica's metadata and decide; see the module's text.
    Writes nothing unless a new set is created."""
    found = [read(p) for p in paths]
    have = [p for p, (m, _) in zip(paths, found) if m is not None]
    if not have:
        return create(paths, threshold, region_shift)
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
    members = {bytes(ref.members[s].uuid): s for s in range(ref.nmembers)}
    seen = {}
    for p, m in zip(paths, metas):
        rid = bytes(m.replica_uuid)
        if rid not in members:
            raise SetError(
                f"{p} (replica {uuid_text(rid)}) is no longer a member of set "
                f"{uuid_text(ref.set_uuid)}: it was removed or replaced; "
                "add it to the running device with `quorumblk add-replica`")
        if rid in seen:
            raise SetError(f"{seen[rid]} and {p} are copies of the same replica "
                           f"({uuid_text(rid)}): give each replica once")
        seen[rid] = p
    stale, fresh = [], []
    for i, m in enumerate(metas):
        slot = members[bytes(m.replica_uuid)]
        if m.events < ref.events or ref.members[slot].state != IN_SERVICE:
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
    now on the set is as the plan says, whatever happens next."""
    if plan.created:
        return
    for p, m in zip(paths, plan.metas):
        write(p, m, plan.bitmap)


def resync(q, plan, progress=None):
    """Resync the plan's dirty regions by vote before the device serves:
    current replicas vote (plurality: no version in a dirty region was
    acknowledged unless all of them have it), stale ones get the result.
    Returns the report that `status` shows as "resync"."""
    regions = plan.dirty_regions()
    stale = plan.stale
    reason = ("stale-replica" if stale else
              "unclean-stop" if regions else "none")
    total = 0
    counts = {"bad": [0] * len(q.paths), "copied": 0, "unrecoverable": 0}
    step = q.max_io
    for off, length in regions:
        end = min(off + length, q.size)
        while off < end:
            n = min(step, end - off)
            res = q.sync(off, n, plurality=True, targets=stale)
            for i, b in enumerate(res["bad"]):
                counts["bad"][i] += b
            counts["copied"] += res["copied"]
            counts["unrecoverable"] += res["unrecoverable"]
            off += n
            total += n
            if progress:
                progress(total)
    q.resynced()
    for i in stale:
        q.set_state(i, "in-service")
    return {"reason": reason, "regions": len(regions), "bytes": total,
            "size": q.size, "done": True,
            "stale": [q.paths[i] for i in stale],
            "missing": [str(uuid.UUID(bytes=u)) for u in plan.missing],
            "differing_blocks": counts["bad"],
            "copied_blocks": counts["copied"],
            "unrecoverable_blocks": counts["unrecoverable"]}
