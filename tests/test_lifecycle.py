"""Replica lifecycle on a live set (quorumblk.lifecycle), without the
device: readd after a failure resyncs only what was missed, replace and
add-replica fill a new member while writes go on, remove never goes below
the threshold, scrub reports and repairs; crash resync by the plurality
rule; and every refusal says why."""
import contextlib
import os
import threading
import time

import pytest

from conftest import flip, pattern, pwrite
from quorumblk import errors, lifecycle, meta
from quorumblk.core import Quorum

SIZE = 64 << 20
REGION = 4 << 20
BS = 4096


@pytest.fixture
def imgs(tmp_path):
    paths = []
    data = pattern(1, SIZE)
    for c in "abc":
        p = tmp_path / f"{c}.img"
        with open(p, "wb") as f:
            f.write(data)
        paths.append(str(p))
    return paths


def start(paths, threshold=2, **kw):
    """What `add` does without the device (assembly.prepare)."""
    plan = meta.assemble(paths, threshold)
    q = Quorum(paths, threshold, events_per_sec=0, **kw)
    meta.commit(paths, plan)
    q.set_meta(plan.metas, plan.bitmap)
    return q, meta.resync(q, plan)


def wait(job, timeout=60):
    deadline = time.monotonic() + timeout
    while job.state == "running":
        assert time.monotonic() < deadline, job.to_dict()
        time.sleep(0.01)
    return job.to_dict()


@contextlib.contextmanager
def writing(q, seed):
    """A thread rewriting blocks all over the device until the block ends."""
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            q.write((i * 7919 * BS) % SIZE, pattern(seed + i, BS))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def data(path, length=SIZE):
    with open(path, "rb") as f:
        return f.read(length)


def bare(tmp_path, name, size=SIZE):
    p = str(tmp_path / name)
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def test_readd_copies_only_what_the_replica_missed(imgs):
    q, _ = start(imgs)
    life = lifecycle.Lifecycle(q)
    q.inject(2, "eio", ops=("write",))
    q.write(5 * REGION, b"x" * BS)              # replica 2 fails here
    q.inject(2, None)
    q.write(9 * REGION + 8 * BS, b"y" * 2 * BS)
    assert q.replica_states()[2] == "failed"
    job = wait(life.readd(imgs[2]))
    assert job["state"] == "done", job
    r = job["result"]
    assert r["copied_blocks"] == 3              # the three blocks it missed
    assert r["checked_bytes"] == 2 * REGION     # two dirty regions, not the device
    assert q.replica_states() == ["in-service"] * 3
    assert data(imgs[2]) == data(imgs[0])
    assert q.clean(idle=0) == 2                 # all in service: bits may go
    q.close()
    assert meta.assemble(imgs, 2).stale == []


def test_readd_under_writes_converges(imgs):
    q, _ = start(imgs)
    life = lifecycle.Lifecycle(q)
    q.set_state(1, "failed")
    for i in range(64):
        q.write(i * REGION // 4, pattern(i, BS))
    with writing(q, 500):
        job = wait(life.readd(imgs[1]))
    assert job["state"] == "done", job
    q.close()
    assert data(imgs[0]) == data(imgs[1]) == data(imgs[2])


def test_replace_fills_the_new_replica_then_removes_the_old(imgs, tmp_path):
    q, _ = start(imgs)
    life = lifecycle.Lifecycle(q)
    new = bare(tmp_path, "new.img")
    with writing(q, 900):
        job = wait(life.replace(imgs[1], new))
    assert job["state"] == "done", job
    assert job["result"]["removed"] == imgs[1]
    assert job["result"]["copied_blocks"] == SIZE // BS
    assert q.replica_states() == ["in-service", "removed", "in-service", "in-service"]
    assert os.path.getsize(new) == os.path.getsize(imgs[0])
    q.close()
    assert data(new) == data(imgs[0]) == data(imgs[2])
    # the set is now a, c, new: assembled in any order; the old one is refused
    plan = meta.assemble([new, imgs[0], imgs[2]], 2)
    assert plan.stale == [] and plan.missing == []
    with pytest.raises(meta.SetError, match="was removed"):
        meta.assemble([imgs[0], imgs[1], imgs[2]], 2)


def interrupted_add_replica(paths, tmp_path, threshold=2):
    """A new member joins a set of paths and gets half of the device; then
    the daemon dies. Returns the new member's path."""
    q, _ = start(paths, threshold=threshold)
    new = bare(tmp_path, "new.img")
    ref = q.header(0)
    members = [(bytes(ref.members[s].uuid), ref.members[s].state)
               for s in range(ref.nmembers)]
    r = q.attach(new, meta.new_member(ref, members, new))
    q.sync(0, SIZE // 2, targets=[r], blind=True)
    q.close()
    return new


def test_a_new_replica_that_did_not_finish_is_resynced_whole_at_add(imgs, tmp_path):
    new = interrupted_add_replica(imgs, tmp_path)
    q, report = start(imgs + [new])
    assert report["whole"] and report["bytes"] == SIZE
    assert q.replica_states() == ["in-service"] * 4
    q.close()
    assert data(new) == data(imgs[0])


def test_remove_never_goes_below_threshold(imgs):
    q, _ = start(imgs)
    life = lifecycle.Lifecycle(q)
    q.set_state(2, "failed")
    with pytest.raises(lifecycle.LifecycleError, match="below the threshold 2"):
        life.remove_replica("0")
    assert life.remove_replica(imgs[2]) == {"removed": imgs[2], "index": 2}
    with pytest.raises(lifecycle.LifecycleError, match="not a replica"):
        life.remove_replica(imgs[2])
    q.write(0, b"z" * BS)
    assert q.clean(idle=0) == 1                 # the removed one is no member
    q.close()
    m = meta.read(imgs[2])[0]
    assert m.members[m.slot].state == meta.REMOVED
    with pytest.raises(meta.SetError, match="was removed"):
        meta.assemble(imgs, 2)
    assert meta.assemble(imgs[:2], 2).missing == []


def test_refusals_name_the_reason(imgs, tmp_path):
    q, _ = start(imgs)
    life = lifecycle.Lifecycle(q)
    other = [bare(tmp_path, f"o{i}.img") for i in range(2)]
    start(other, 1)[0].close()
    with pytest.raises(lifecycle.LifecycleError, match="not a member of this device"):
        life.readd(other[0])
    with pytest.raises(meta.SetError, match="belongs to replica set"):
        life.add_replica(other[1])
    with pytest.raises(meta.SetError, match="member of this set already"):
        life.add_replica(_copy(imgs[1], tmp_path))
    with pytest.raises(lifecycle.LifecycleError, match="already a replica"):
        life.add_replica(imgs[0])
    small = bare(tmp_path, "small.img", SIZE - BS)
    with pytest.raises(meta.SetError, match="too small"):
        life.add_replica(small)
    with pytest.raises(lifecycle.LifecycleError, match="no such file"):
        life.readd(str(tmp_path / "missing.img"))
    with pytest.raises(Exception, match="already in service"):
        life.readd(imgs[0])
    assert q.replica_states() == ["in-service"] * 3
    q.close()


def _copy(path, tmp_path):
    import shutil
    p = str(tmp_path / "copy.img")
    shutil.copyfile(path, p)
    return p


def test_one_job_at_a_time(imgs):
    q, _ = start(imgs)
    life = lifecycle.Lifecycle(q)
    job = life.scrub(rate=16 << 20)            # about 4 s for 64 MiB
    with pytest.raises(errors.JobRunningError, match="a scrub runs"):
        life.scrub()
    with pytest.raises(errors.JobRunningError):
        life.remove_replica("2")
    assert wait(job)["state"] == "done"
    assert job.to_dict()["seconds"] >= 3.0     # the rate limit held
    q.close()


def test_scrub_reports_and_repairs_planted_bitflips(imgs):
    offsets = [(1, 3 * BS + 5), (2, 700 * BS), (2, 9000 * BS + 4095), (0, 15000 * BS)]
    for r, off in offsets:
        flip(imgs[r], off)
    q, _ = start(imgs)
    life = lifecycle.Lifecycle(q)
    report = wait(life.scrub(repair=False))["result"]
    assert report["bad_blocks_per_replica"] == [1, 1, 2]
    assert report["repaired"] == 0 and report["unrecoverable"] == 0
    report = wait(life.scrub())["result"]
    assert report["bad_blocks_per_replica"] == [1, 1, 2] and report["repaired"] == 4
    assert report["blocks_checked"] == SIZE // BS
    assert wait(life.scrub())["result"]["repaired"] == 0
    q.close()
    assert data(imgs[0]) == data(imgs[1]) == data(imgs[2]) == pattern(1, SIZE)


def test_crash_resync_makes_replicas_identical_by_plurality(imgs):
    """An unclean stop left a write on one replica of three (never
    acknowledged): the next start resyncs only the dirty region and the
    old version, held by two, wins everywhere."""
    q, _ = start(imgs)
    q.write(6 * REGION, b"n" * BS)              # region 6 dirty, clean never ran
    q.close()
    pwrite(imgs[0], 6 * REGION + BS, b"torn" * 1024)   # in flight on one only
    q, report = start(imgs)
    assert report["reason"] == "unclean-stop"
    assert report["regions"] == 1 and report["bytes"] == REGION
    assert report["differing_blocks"] == [1, 0, 0] and report["copied_blocks"] == 1
    q.close()
    assert data(imgs[0]) == data(imgs[1]) == data(imgs[2])
    with open(imgs[0], "rb") as f:
        f.seek(6 * REGION)
        assert f.read(2 * BS) == b"n" * BS + pattern(1, SIZE)[6 * REGION + BS:6 * REGION + 2 * BS]


def test_after_an_interrupted_replace_a_clean_tie_stays_no_quorum(imgs, tmp_path):
    """The whole-device resync after an interrupted replace or add-replica
    uses the crash rule (plurality) only where the bitmap holds regions
    dirty. Elsewhere a block on which the in-service copies tie is no
    quorum: reported and left as it is, never "resolved" to the first
    replica's copy (which here is the rotten one)."""
    two = imgs[:2]
    new = interrupted_add_replica(two, tmp_path)
    flip(imgs[0], 9 * REGION + 5)                       # clean region, a rots
    b_before = data(imgs[1])
    q, report = start(two + [new], threshold=2)
    assert report["whole"]
    assert report["unrecoverable_blocks"] == 1
    q.close()
    assert data(imgs[1]) == b_before                    # b's copy was kept


def test_readd_over_a_block_without_quorum_keeps_the_replica_out(imgs):
    """Found by the torture campaign (seed 2033): c misses a write to a
    block; then a and b disagree on it (no quorum). The readd cannot give
    c that block, so c must not vote again with its old copy there: the
    readd fails saying why and c stays out; once a write heals the block,
    the readd goes through."""
    q, _ = start(imgs)
    try:
        life = lifecycle.Lifecycle(q)
        q.set_state(2, "failed")
        new = pattern(77, BS)
        q.write(9 * REGION, new)                    # c misses it
        flip(imgs[0], 9 * REGION + 100)             # a and b disagree
        job = life.readd(imgs[2])
        res = wait(job)
        assert res["state"] == "failed" and "no quorum" in res["error"], res
        assert q.replica_states() == ["in-service", "in-service", "failed"]
        q.write(9 * REGION, new)                    # the block is whole again
        assert wait(life.readd(imgs[2]))["state"] == "done"
        assert q.replica_states() == ["in-service"] * 3
    finally:
        q.close()
    assert data(imgs[0]) == data(imgs[1]) == data(imgs[2])
