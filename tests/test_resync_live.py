"""Reads while the resync after an unclean stop has not run yet (the device
is LIVE at once and the resync is a job): in a region the bitmap held dirty
a read gives the answer the resync will give (the crash rule: plurality,
ties to the earliest replica) with every read policy, repairs the losing
copies before it completes, and gives the same bytes after the resync;
outside such a region, and once it is resynced, the normal vote holds. A
user write during the resync is never overwritten by it or by a repair."""
import threading

import pytest

from conftest import make_images, pattern, pread, pwrite
from quorumblk import meta
from quorumblk.core import Quorum
from quorumblk.errors import NoQuorumError

SIZE = 16 << 20
REGION = 4 << 20                # the smallest region: 4 of them
BS = 4096


def crashed_set(tmp_path, n, threshold, dirty):
    """n replicas of one set whose daemon died with writes in flight in the
    regions `dirty`: their bits stay set (no clean ran)."""
    paths = make_images(tmp_path, n, SIZE)
    q, plan = reopen(paths, threshold)
    meta.resync(q, plan)
    for r in dirty:
        q.write(r * REGION, pattern(100 + r, BS))
    q.close()
    return paths


def reopen(paths, threshold, **kw):
    """What `add` does before the device goes LIVE: the metadata is
    attached, the resync not run (it is returned as the plan)."""
    plan = meta.assemble(paths, threshold)
    q = Quorum(paths, threshold, events_per_sec=0, **kw)
    meta.commit(paths, plan)
    q.set_meta(plan.metas, plan.bitmap)
    return q, plan


def copies(paths, off, length=BS):
    return [pread(p, off, length) for p in paths]


@pytest.mark.filterwarnings("ignore:threshold 2 of 5")
@pytest.mark.parametrize("policy", ["all", "threshold", "fifo"])
def test_a_crash_write_on_two_of_five_reads_as_the_plurality(tmp_path, policy):
    """Threshold 2 of 5; the crash left a write on replicas 0 and 1 only. A
    threshold or fifo read of them alone would return the new data, which
    the resync's plurality (3 old copies) then overturns."""
    paths = crashed_set(tmp_path, 5, 2, [2])
    off = 2 * REGION + 3 * BS
    old, new = pread(paths[0], off, BS), pattern(9, BS)
    for p in paths[:2]:
        pwrite(p, off, new)
    q, plan = reopen(paths, 2, read_policy=policy)
    try:
        assert q.read(off, BS) == old
        assert copies(paths, off) == [old] * 5      # repaired before it returned
        for _ in range(4):                          # threshold reads rotate
            assert q.read(off, BS) == old
        report = meta.resync(q, plan)
        assert report["done"] and report["copied_blocks"] == 0
        assert q.read(off, BS) == old
    finally:
        q.close()


def test_no_quorum_in_a_dirty_region_reads_as_the_earliest_replica(tmp_path):
    """3 replicas, threshold 2, three different copies of a block: inside a
    region not resynced the earliest replica's copy is the answer (and every
    copy becomes it); outside one, and in that region once it is resynced,
    the normal vote gives EIO. A read across two regions votes each block
    by its own region's rule."""
    paths = crashed_set(tmp_path, 3, 2, [1])
    dirty, clean = REGION + 5 * BS, 3 * REGION + 5 * BS
    edge = 2 * REGION - BS                  # the last block of region 1
    for i, p in enumerate(paths):
        pwrite(p, dirty, pattern(20 + i, BS))
        pwrite(p, clean, pattern(30 + i, BS))
        pwrite(p, edge, pattern(40 + i, BS))
    after_edge = pread(paths[0], edge + BS, BS)     # region 2: all agree
    q, plan = reopen(paths, 2)
    try:
        assert q.read(dirty, BS) == pattern(20, BS)
        assert copies(paths, dirty) == [pattern(20, BS)] * 3
        with pytest.raises(NoQuorumError):
            q.read(clean, BS)
        assert q.read(edge, 2 * BS) == pattern(40, BS) + after_edge
        for i, p in enumerate(paths):                   # no quorum in region 2
            pwrite(p, edge + BS, pattern(50 + i, BS))
        with pytest.raises(NoQuorumError):
            q.read(edge, 2 * BS)
        meta.resync(q, plan)
        assert q.read(dirty, BS) == pattern(20, BS)
        for i, p in enumerate(paths):   # the region is resynced: normal vote
            pwrite(p, dirty, pattern(60 + i, BS))
        with pytest.raises(NoQuorumError):
            q.read(dirty, BS)
    finally:
        q.close()


def test_a_region_done_by_the_resync_takes_the_normal_vote_again(tmp_path):
    """region_synced ends the crash rule region by region, as the job goes."""
    paths = crashed_set(tmp_path, 3, 2, [0, 2])
    q, _ = reopen(paths, 2)
    try:
        q.sync(0, REGION, plurality=True)
        q.region_synced(0, REGION)
        for i, p in enumerate(paths):
            pwrite(p, BS, pattern(70 + i, BS))
            pwrite(p, 2 * REGION + BS, pattern(80 + i, BS))
        with pytest.raises(NoQuorumError):
            q.read(BS, BS)                              # region 0: resynced
        assert q.read(2 * REGION + BS, BS) == pattern(80, BS)   # region 2: not
    finally:
        q.close()


def test_user_writes_during_the_resync_are_never_overwritten(tmp_path, monkeypatch):
    """The resync stops after its first step while a user writes and reads
    (fifo: one replica would do) blocks it has not reached; then it runs on,
    with a writer and a reader going all the while. Every block written
    holds its last write on every replica at the end, every crash copy the
    plurality."""
    monkeypatch.setattr(meta, "SYNC_STEP", 1 << 20)
    paths = crashed_set(tmp_path, 3, 2, [0, 1, 2, 3])
    torn = [r * REGION + k * 64 * BS for r in range(1, 4) for k in range(8)]
    old = {off: pread(paths[0], off, BS) for off in torn}
    for off in torn:                            # in flight on replica 0 only
        pwrite(paths[0], off, pattern(off, BS))
    q, plan = reopen(paths, 2, read_policy="fifo")
    paused, go = threading.Event(), threading.Event()
    last, stop = {}, threading.Event()

    def progress(done):
        if done == 1 << 20:
            paused.set()
            assert go.wait(60)

    job = {}
    t = threading.Thread(target=lambda: job.update(
        report=meta.resync(q, plan, progress)))
    t.start()
    try:
        assert paused.wait(60)
        assert q.read(torn[0], BS) == old[torn[0]]      # plurality, repaired
        mine = pattern(5, BS)
        q.write(torn[0], mine)                  # after the repair
        q.write(torn[1], mine)                  # before any read or sync
        last[torn[0]] = last[torn[1]] = mine
        assert q.read(torn[1], BS) == mine
        assert q.read(torn[2], BS) == old[torn[2]]

        def writer():
            i = 0
            while not stop.is_set():
                off = REGION + (i * 7919 % (3 * REGION // BS)) * BS
                data = pattern(1000 + i, BS)
                q.write(off, data)
                last[off] = data
                i += 1
        def reader():      # its repairs race the writer's writes
            i = 0
            while not stop.is_set():
                q.read(REGION + (i * 4099 % (3 * REGION // BS - 8)) * BS, 8 * BS)
                i += 1
        others = [threading.Thread(target=f) for f in (writer, reader)]
        for o in others:
            o.start()
        go.set()
        t.join(120)
        stop.set()
        for o in others:
            o.join()
        assert job["report"]["done"], job
        for off in torn:
            if off not in last:
                assert copies(paths, off) == [old[off]] * 3, off
        for off, data in last.items():
            assert copies(paths, off) == [data] * 3, off
    finally:
        go.set()
        stop.set()
        t.join(120)
        q.close()
