"""The engine's resync and scrub (Quorum.sync, qb_ctx_sync): every block is
voted over the in-service replicas, losing copies and targets get the
winner, blocks without quorum are left as they were, and user writes that
race with a sync are never overwritten by it."""
import threading

import pytest

from conftest import BS, IMAGE_SIZE, flip, image, images, of_type, pattern, pwrite
from quorumblk import DegradedError, InvalidArgumentError


def test_scrub_counts_repairs_and_leaves_no_quorum_blocks(imgs, open_quorum):
    good = image(imgs[0])
    flip(imgs[1], 3 * BS)
    flip(imgs[2], 5 * BS + 7)
    flip(imgs[2], 200 * BS + 1)
    for r in range(3):                  # block 9: three different versions
        flip(imgs[r], 9 * BS, bit=r)
    q = open_quorum(imgs, 2, events_per_sec=0)
    seen = q.sync(0, IMAGE_SIZE, write=False)
    assert seen == {"blocks": 256, "differing": 3, "unrecoverable": 1,
                    "written": 0, "bad": [0, 1, 2]}
    assert images(imgs)[1][3 * BS] != good[3 * BS]      # nothing written
    done = q.sync(0, IMAGE_SIZE)
    assert done == dict(seen, written=3)
    ev = q.events()
    assert sorted((e["replica"], e["offset"]) for e in of_type(ev, "repaired")) == \
        [(1, 3 * BS), (2, 5 * BS), (2, 200 * BS)]
    assert [(e["offset"], e["length"]) for e in of_type(ev, "quorum-failure")] == \
        [(9 * BS, BS)] * 2
    after = images(imgs)
    for r in range(3):
        assert after[r][:9 * BS] == good[:9 * BS]
        assert after[r][10 * BS:] == good[10 * BS:]
        assert after[r][9 * BS:10 * BS] != good[9 * BS:10 * BS]   # left as it was
    assert q.sync(0, IMAGE_SIZE) == {"blocks": 256, "differing": 0,
                                     "unrecoverable": 1, "written": 0,
                                     "bad": [0, 0, 0]}


def test_scrub_reads_every_replica_whatever_the_read_policy(imgs, open_quorum):
    flip(imgs[2], 17 * BS)
    q = open_quorum(imgs, 2, read_policy="threshold")
    assert q.sync(0, IMAGE_SIZE)["bad"] == [0, 0, 1]
    assert image(imgs[2]) == image(imgs[0])


def test_plurality_picks_the_largest_class_below_threshold(imgs, open_quorum):
    """What resync after a crash does: with the threshold at 3 no block
    ever reaches quorum, yet every replica must end up identical; a tie goes
    to the earliest replica."""
    pwrite(imgs[2], 4 * BS, pattern(7, BS))             # 2 old, 1 new: old wins
    pwrite(imgs[1], 8 * BS, pattern(8, BS))             # three versions: replica 0
    pwrite(imgs[2], 8 * BS, pattern(9, BS))
    want = image(imgs[0])
    q = open_quorum(imgs, 3)
    res = q.sync(0, IMAGE_SIZE, plurality=True)
    assert res["unrecoverable"] == 0 and res["differing"] == 2
    assert res["bad"] == [0, 1, 2]
    assert images(imgs) == [want] * 3


def test_two_replicas_tie_goes_to_the_first(tmp_path, open_quorum):
    from conftest import make_images
    paths = make_images(tmp_path, n=2)
    pwrite(paths[1], 0, pattern(5, 2 * BS))
    q = open_quorum(paths, 1)
    q.sync(0, IMAGE_SIZE, plurality=True)
    assert image(paths[1]) == image(paths[0])


def test_a_target_gets_only_the_blocks_it_lacks(imgs, open_quorum):
    good = image(imgs[0])
    pwrite(imgs[2], 10 * BS, bytes(3 * BS))
    flip(imgs[2], 100 * BS)
    q = open_quorum(imgs, 2)
    q.set_state(2, "resyncing")
    flip(imgs[1], 50 * BS)      # two voters disagree: no quorum, nothing written
    res = q.sync(0, IMAGE_SIZE, targets=[2])
    assert res["bad"] == [0, 0, 4] and res["written"] == 4
    assert res["unrecoverable"] == 1
    after = images(imgs)
    assert after[0] == after[2] == good
    flip(imgs[1], 50 * BS)
    assert q.sync(0, IMAGE_SIZE, targets=[2])["written"] == 0


def test_blind_targets_are_written_whole_without_being_read(imgs, open_quorum):
    good = image(imgs[0])
    q = open_quorum(imgs, 2)
    q.set_state(2, "resyncing")
    reads = q.status()["replicas"][2]["reads"]
    res = q.sync(0, IMAGE_SIZE, targets=[2], blind=True)
    assert res["bad"][2] == 256 and res["written"] == 256
    assert q.status()["replicas"][2]["reads"] == reads
    assert image(imgs[2]) == good


def test_a_resyncing_replica_casts_no_vote(imgs, open_quorum):
    """Two copies agree on a wrong block but one of them is a target: the
    voters' version wins, and the target is corrected."""
    pwrite(imgs[1], 0, pattern(3, BS))
    pwrite(imgs[2], 0, pattern(3, BS))
    want = image(imgs[0])[:BS]
    q = open_quorum(imgs, 1)
    q.set_state(2, "resyncing")
    q.set_state(1, "resyncing")
    q.sync(0, IMAGE_SIZE, targets=[1, 2])
    assert [image(p)[:BS] for p in imgs] == [want] * 3


def test_below_threshold_a_sync_fails(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    q.set_state(1, "failed")
    q.set_state(2, "resyncing")
    with pytest.raises(DegradedError):
        q.sync(0, IMAGE_SIZE, targets=[2])
    q.sync(0, IMAGE_SIZE, targets=[2], plurality=True)      # one voter is enough


def test_a_target_whose_write_fails_leaves_service(imgs, open_quorum):
    pwrite(imgs[2], 0, bytes(BS))
    q = open_quorum(imgs, 2)
    q.set_state(2, "resyncing")
    q.inject(2, "eio", ops=("write",))
    q.sync(0, IMAGE_SIZE, targets=[2])
    assert q.replica_states()[2] == "failed"


@pytest.mark.parametrize("args", [(1, BS), (0, IMAGE_SIZE + BS), (IMAGE_SIZE, BS)])
def test_bad_ranges_are_refused(imgs, open_quorum, args):
    q = open_quorum(imgs, 2)
    with pytest.raises(InvalidArgumentError):
        q.sync(*args)


def test_sync_never_overwrites_a_racing_write(media_imgs, open_quorum):
    """A writer thread rewrites blocks while another thread syncs a
    resyncing replica: afterwards every replica holds what the writer wrote
    last, the target included (it got every write, and the sync never put
    older data over newer)."""
    imgs = media_imgs
    pwrite(imgs[2], 0, bytes(IMAGE_SIZE))               # the target starts empty
    q = open_quorum(imgs, 2, max_io=64 << 10)
    q.set_state(2, "resyncing")
    # the target's reads start late: the sync's window between reading and
    # writing is wide open to the writer (unless the blocks are held)
    q.inject(2, "delay", ops=("read",), delay=0.02)
    last = {}
    stop = threading.Event()
    started = threading.Event()

    def writer():
        i = 0
        while not stop.is_set() or i < 300:
            blk = (i * 37) % (IMAGE_SIZE // BS)
            data = pattern(1000 + i, BS)
            q.write(blk * BS, data)
            last[blk] = data
            i += 1
            started.set()

    t = threading.Thread(target=writer)
    t.start()
    try:
        started.wait(10)
        for _ in range(3):
            q.sync(0, IMAGE_SIZE, targets=[2])
    finally:
        stop.set()
        t.join()
    q.set_state(2, "in-service")
    after = images(imgs)
    assert after[0] == after[1] == after[2]
    for blk, data in last.items():
        assert after[2][blk * BS:(blk + 1) * BS] == data


def test_more_runs_than_fit_are_done_in_a_second_pass_counted_once(imgs,
                                                                   open_quorum):
    """Blocks without quorum split a replica's rewrite into runs: 128 runs
    in one chunk are more than a request holds, so the chunk goes again for
    the rest; every count is the first pass's."""
    good = image(imgs[0])
    for i in range(128):
        flip(imgs[1], 2 * i * BS, bit=1)            # no quorum: 3 versions
        flip(imgs[2], 2 * i * BS, bit=2)
        flip(imgs[0], (2 * i + 1) * BS)             # outvoted: repaired
    q = open_quorum(imgs, 2, events_per_sec=0)
    res = q.sync(0, IMAGE_SIZE)
    assert res == {"blocks": 256, "differing": 128, "unrecoverable": 128,
                   "written": 128, "bad": [128, 0, 0]}
    after = image(imgs[0])
    for i in range(128):
        odd = slice((2 * i + 1) * BS, (2 * i + 2) * BS)
        assert after[odd] == good[odd]
    assert len(of_type(q.events(), "repaired")) == 128


def test_a_voters_repairs_are_its_losing_blocks_exactly(imgs, open_quorum):
    flip(imgs[0], 3 * BS)
    flip(imgs[0], 7 * BS + 9)
    q = open_quorum(imgs, 2, events_per_sec=0)
    assert q.sync(0, IMAGE_SIZE)["written"] == 2
    assert sorted((e["replica"], e["offset"], e["length"])
                  for e in of_type(q.events(), "repaired")) == \
        [(0, 3 * BS, BS), (0, 7 * BS, BS)]
    assert q.status()["replicas"][0]["repairs"] == 2
