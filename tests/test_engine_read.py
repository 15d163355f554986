"""Voted reads through the engine on host files: corruption is caught,
outvoted, reported and repaired block by block; no quorum is EIO with
nothing written (DESIGN.md, Vote semantics)."""
import errno

import pytest

from conftest import (BS, IMAGE_SIZE, changed_blocks, flip, image, images,
                      make_images, of_type, pattern, pwrite)
from quorumblk import NoQuorumError, QuorumError


def test_clean_read_returns_the_data(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    data = image(imgs[0])
    assert q.size == IMAGE_SIZE
    assert q.read(0, IMAGE_SIZE) == data
    assert q.read(12288, 512) == data[12288:12800]
    assert q.events() == []


@pytest.mark.parametrize("replica", [0, 1, 2])
@pytest.mark.parametrize("hash", ["xxh3", "sha256"])
def test_bitflip_in_one_replica_is_outvoted_reported_and_repaired(
        imgs, open_quorum, replica, hash):
    good = image(imgs[0])
    off = 5 * BS + 1234
    flip(imgs[replica], off, bit=3)
    before = images(imgs)
    assert changed_blocks(good, before[replica]) == [5]

    q = open_quorum(imgs, 2, hash=hash)
    # the request spans blocks 2..9; only block 5 is bad
    assert q.read(2 * BS, 8 * BS) == good[2 * BS:10 * BS]

    ev = q.events()
    bad = of_type(ev, "bad-block")
    assert [(e["replica"], e["offset"], e["length"]) for e in bad] == \
        [(replica, 5 * BS, BS)]
    assert bad[0]["path"] == imgs[replica]
    rep = of_type(ev, "repaired")
    assert [(e["replica"], e["offset"], e["length"]) for e in rep] == \
        [(replica, 5 * BS, BS)]
    assert of_type(ev, "quorum-failure") == []

    after = images(imgs)
    # only that block of that replica changed, and it now holds the good data
    assert changed_blocks(before[replica], after[replica]) == [5]
    assert after[replica] == good
    for r in range(3):
        if r != replica:
            assert after[r] == before[r]
    st = q.status()
    assert st["replicas"][replica]["bad_blocks"] == 1
    assert st["replicas"][replica]["repairs"] == 1
    assert st["counters"]["bad_blocks"] == 1
    assert st["counters"]["repairs"] == 1
    assert [r["state"] for r in st["replicas"]] == ["in-service"] * 3
    # a second read finds nothing more to say
    assert q.read(2 * BS, 8 * BS) == good[2 * BS:10 * BS]
    assert q.events() == []


def test_a_different_bad_block_in_each_replica_inside_one_request(
        imgs, open_quorum):
    good = image(imgs[0])
    bad_block = {0: 1, 1: 4, 2: 6}
    for r, b in bad_block.items():
        pwrite(imgs[r], b * BS + 100, b"garbage of replica %d" % r)
    before = images(imgs)
    q = open_quorum(imgs, 2)
    assert q.read(0, 8 * BS) == good[:8 * BS]
    ev = q.events()
    assert sorted((e["replica"], e["offset"]) for e in of_type(ev, "bad-block")) \
        == sorted((r, b * BS) for r, b in bad_block.items())
    assert sorted((e["replica"], e["offset"]) for e in of_type(ev, "repaired")) \
        == sorted((r, b * BS) for r, b in bad_block.items())
    after = images(imgs)
    for r, b in bad_block.items():
        assert changed_blocks(before[r], after[r]) == [b]
        assert after[r] == good


def test_request_not_aligned_to_vote_blocks(imgs, open_quorum):
    """Vote blocks are clipped to the request: a 512-byte read inside a bad
    block votes on those 512 bytes only and repairs only them."""
    good = image(imgs[0])
    flip(imgs[2], 3 * BS + 1000)
    q = open_quorum(imgs, 2)
    assert q.read(3 * BS + 512, 1024) == good[3 * BS + 512:3 * BS + 1536]
    ev = q.events()
    assert [(e["replica"], e["offset"], e["length"])
            for e in of_type(ev, "bad-block")] == [(2, 3 * BS + 512, 1024)]
    assert image(imgs[2]) == good


def test_bad_blocks_in_one_replica_across_a_long_request(imgs, open_quorum):
    good = image(imgs[0])
    blocks = [0, 1, 2, 17, 40, 41, 255]
    for b in blocks:
        flip(imgs[1], b * BS + 7)
    q = open_quorum(imgs, 2, events_per_sec=0)
    assert q.read(0, IMAGE_SIZE) == good
    assert image(imgs[1]) == good
    bad = of_type(q.events(), "bad-block")
    covered = set()
    for e in bad:
        assert e["replica"] == 1
        assert e["offset"] % BS == 0 and e["length"] % BS == 0
        covered |= set(range(e["offset"] // BS,
                             (e["offset"] + e["length"]) // BS))
    assert covered == set(blocks)
    assert q.status()["replicas"][1]["bad_blocks"] == len(blocks)


def test_two_replicas_disagreeing_is_eio_and_nothing_is_written(
        imgs, open_quorum):
    good = image(imgs[0])
    pwrite(imgs[1], 7 * BS + 10, b"version one")
    pwrite(imgs[2], 7 * BS + 10, b"version two")
    # another block in the same request has a plain minority copy: it must
    # not be repaired either, since the request fails
    flip(imgs[2], 3 * BS)
    before = images(imgs)
    q = open_quorum(imgs, 2)
    with pytest.raises(NoQuorumError) as ei:
        q.read(0, 16 * BS)
    assert ei.value.errno == errno.EIO
    assert isinstance(ei.value, QuorumError)
    assert isinstance(ei.value, OSError)
    assert "quorum" in str(ei.value)
    ev = q.events()
    qf = of_type(ev, "quorum-failure")
    assert [(e["offset"], e["length"]) for e in qf] == [(7 * BS, BS)]
    assert qf[0]["replica"] is None
    assert qf[0]["errno"] == "EIO"
    assert of_type(ev, "repaired") == []
    assert images(imgs) == before
    st = q.status()
    assert st["counters"]["quorum_failures"] == 1
    assert st["counters"]["repairs"] == 0
    # the rest of the device reads fine, and the failure repeats
    assert q.read(8 * BS, 8 * BS) == good[8 * BS:16 * BS]
    with pytest.raises(NoQuorumError):
        q.read(7 * BS, BS)
    assert [r["state"] for r in q.status()["replicas"]] == ["in-service"] * 3


def test_threshold_three_of_three_fails_on_any_difference(imgs, open_quorum):
    flip(imgs[0], 0)
    before = images(imgs)
    q = open_quorum(imgs, 3)
    with pytest.raises(NoQuorumError):
        q.read(0, BS)
    assert images(imgs) == before


def test_threshold_one_tie_goes_to_the_earliest_replica(tmp_path, open_quorum):
    paths = make_images(tmp_path, n=2)
    pwrite(paths[0], 0, b"first" * 10)
    pwrite(paths[1], 0, b"second" * 10)
    first = image(paths[0])
    with pytest.warns(UserWarning):
        q = open_quorum(paths, 1)
    assert q.read(0, BS) == first[:BS]
    bad = of_type(q.events(), "bad-block")
    assert [(e["replica"], e["offset"]) for e in bad] == [(1, 0)]
    assert image(paths[1]) == first


def test_tie_between_two_pairs_of_four(tmp_path, open_quorum):
    paths = make_images(tmp_path, n=4)
    x = pattern(10, BS)
    y = pattern(11, BS)
    # replicas 1 and 2 hold y, replicas 0 and 3 hold x: {0,3} holds replica 0
    for r, d in ((0, x), (1, y), (2, y), (3, x)):
        pwrite(paths[r], 2 * BS, d)
    with pytest.warns(UserWarning):
        q = open_quorum(paths, 2)
    assert q.read(2 * BS, BS) == x
    for p in paths:
        assert image(p)[2 * BS:3 * BS] == x


def test_repair_off_reports_but_does_not_rewrite(imgs, open_quorum):
    good = image(imgs[0])
    flip(imgs[0], 9 * BS + 4000)
    before = images(imgs)
    q = open_quorum(imgs, 2, repair=False)
    assert q.read(8 * BS, 4 * BS) == good[8 * BS:12 * BS]
    ev = q.events()
    assert [(e["replica"], e["offset"]) for e in of_type(ev, "bad-block")] == \
        [(0, 9 * BS)]
    assert of_type(ev, "repaired") == []
    assert images(imgs) == before
    assert q.status()["counters"]["repairs"] == 0
    # reported again on the next read, still not rewritten
    assert q.read(8 * BS, 4 * BS) == good[8 * BS:12 * BS]
    assert len(of_type(q.events(), "bad-block")) == 1
    assert images(imgs) == before


@pytest.mark.parametrize("vote_block", [512, 4096, 65536])
def test_vote_block_size(tmp_path, open_quorum, vote_block):
    paths = make_images(tmp_path)
    good = image(paths[0])
    off = 3 * 65536 + 5 * 512 + 3
    flip(paths[1], off)
    before = image(paths[1])
    q = open_quorum(paths, 2, vote_block=vote_block)
    assert q.read(0, 8 * 65536) == good[:8 * 65536]
    bad = of_type(q.events(), "bad-block")
    start = off - off % vote_block
    assert [(e["replica"], e["offset"], e["length"]) for e in bad] == \
        [(1, start, vote_block)]
    assert image(paths[1]) == good
    assert changed_blocks(before, good, bs=vote_block) == [start // vote_block]


def test_five_replicas_two_bad_copies(tmp_path, open_quorum):
    paths = make_images(tmp_path, n=5)
    good = image(paths[0])
    pwrite(paths[1], BS, b"x" * 100)
    pwrite(paths[4], BS, b"y" * 100)
    q = open_quorum(paths, 3)
    assert q.read(0, 4 * BS) == good[:4 * BS]
    assert sorted(e["replica"] for e in of_type(q.events(), "bad-block")) \
        == [1, 4]
    assert images(paths) == [good] * 5
    # two bad copies that agree with each other are still a minority
    pwrite(paths[1], BS, b"z" * 100)
    pwrite(paths[4], BS, b"z" * 100)
    assert q.read(0, 4 * BS) == good[:4 * BS]
    assert images(paths) == [good] * 5


def test_buffered_mode_votes_the_same(imgs, open_quorum):
    good = image(imgs[0])
    flip(imgs[2], 100 * BS)
    q = open_quorum(imgs, 2, buffered=True)
    assert q.read(96 * BS, 8 * BS) == good[96 * BS:104 * BS]
    assert [(e["replica"], e["offset"])
            for e in of_type(q.events(), "bad-block")] == [(2, 100 * BS)]
    assert image(imgs[2]) == good


def test_replicas_on_dev_shm(open_quorum):
    """tmpfs (the CPU-bound benchmark medium) takes O_DIRECT on this kernel;
    if it does not, buffered mode must be used and still vote."""
    import os
    import tempfile
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        paths = make_images(d)
        good = image(paths[0])
        flip(paths[0], 0)
        try:
            q = open_quorum(paths, 2)
        except QuorumError as e:
            assert "O_DIRECT" in str(e)
            q = open_quorum(paths, 2, buffered=True)
        assert q.read(0, 2 * BS) == good[:2 * BS]
        assert image(paths[0]) == good
        q.close()
