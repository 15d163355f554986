"""Read policies, FLUSH, FUA, DISCARD, WRITE_ZEROES, events and counters
through the engine on host files (DESIGN.md, Vote semantics)."""
import os
import time

import pytest

from conftest import (BS, IMAGE_SIZE, flip, image, images, make_images,
                      of_type, pattern)

ZERO = bytes(BS)


def rep(q, r, key):
    return q.status()["replicas"][r][key]


def per_replica(q, key):
    return [r[key] for r in q.status()["replicas"]]


# ---- read policies ----

def test_policy_all_reads_every_replica(imgs, open_quorum):
    good = image(imgs[0])
    q = open_quorum(imgs, 2, read_policy="all")
    for i in range(6):
        assert q.read(i * BS, BS) == good[i * BS:(i + 1) * BS]
    assert per_replica(q, "reads") == [6, 6, 6]
    assert per_replica(q, "read_bytes") == [6 * BS] * 3


def test_policy_threshold_reads_only_threshold_replicas_when_they_agree(
        imgs, open_quorum):
    good = image(imgs[0])
    q = open_quorum(imgs, 2, read_policy="threshold")
    for i in range(30):
        assert q.read(i * BS, 2 * BS) == good[i * BS:(i + 2) * BS]
    reads = per_replica(q, "reads")
    assert sum(reads) == 2 * 30
    # the engine rotates which replicas it asks
    assert all(r > 0 for r in reads), reads
    assert q.status()["counters"]["reads"] == 30


def test_policy_threshold_reads_the_others_on_disagreement(imgs, open_quorum):
    good = image(imgs[0])
    # every replica is bad somewhere, at different blocks: whichever two are
    # asked first, some request sees a disagreement and must ask the third
    for r in range(3):
        flip(imgs[r], (10 + r) * BS)
    q = open_quorum(imgs, 2, read_policy="threshold")
    before = sum(per_replica(q, "reads"))
    for i in range(3):          # three requests, rotating over all pairs
        assert q.read(8 * BS, 8 * BS) == good[8 * BS:16 * BS]
    assert sum(per_replica(q, "reads")) - before > 2 * 3
    # and what was read was repaired
    assert images(imgs) == [good] * 3
    assert sorted(e["replica"] for e in of_type(q.events(), "bad-block")) \
        == [0, 1, 2]


def test_policy_threshold_no_quorum_is_still_eio(imgs, open_quorum):
    from quorumblk import NoQuorumError
    os_pw = __import__("conftest").pwrite
    os_pw(imgs[0], 0, b"one")
    os_pw(imgs[1], 0, b"two")
    before = images(imgs)
    q = open_quorum(imgs, 2, read_policy="threshold")
    for _ in range(3):          # whichever pair is asked first
        with pytest.raises(NoQuorumError):
            q.read(0, BS)
    assert images(imgs) == before


def test_policy_threshold_read_failure_asks_another(imgs, open_quorum):
    good = image(imgs[0])
    q = open_quorum(imgs, 2, read_policy="threshold")
    q.inject(1, "eio", ops=("read",))
    for i in range(3):
        assert q.read(i * BS, BS) == good[i * BS:(i + 1) * BS]
    assert per_replica(q, "state") == ["in-service", "failed", "in-service"]


def test_policy_fifo_returns_the_first_replica_without_a_vote(imgs,
                                                             open_quorum):
    flip(imgs[0], 3 * BS)
    first = image(imgs[0])
    before = images(imgs)
    q = open_quorum(imgs, 2, read_policy="fifo")
    for i in range(8):
        assert q.read(i * BS, BS) == first[i * BS:(i + 1) * BS]
    assert per_replica(q, "reads") == [8, 0, 0]
    assert q.events() == []
    assert images(imgs) == before


def test_policy_fifo_skips_a_failed_first_replica(imgs, open_quorum):
    flip(imgs[1], 0)
    second = image(imgs[1])
    q = open_quorum(imgs, 2, read_policy="fifo")
    q.inject(0, "eio", ops=("read",))
    assert q.read(0, BS) == second[:BS]
    assert q.read(BS, BS) == second[BS:2 * BS]
    assert per_replica(q, "reads")[2] == 0


@pytest.mark.parametrize("policy", ["all", "threshold", "fifo"])
def test_writes_go_to_every_replica_whatever_the_read_policy(imgs,
                                                             open_quorum,
                                                             policy):
    q = open_quorum(imgs, 2, read_policy=policy)
    new = pattern(5, 3 * BS)
    q.write(BS, new)
    for img in images(imgs):
        assert img[BS:4 * BS] == new
    assert q.read(BS, 3 * BS) == new


def test_bad_policy_and_hash_names(imgs, open_quorum):
    from quorumblk import InvalidArgumentError
    with pytest.raises(InvalidArgumentError):
        open_quorum(imgs, 2, read_policy="random")
    with pytest.raises(InvalidArgumentError):
        open_quorum(imgs, 2, hash="md5")


# ---- writes, flush, FUA ----

def test_write_then_read_back(imgs, open_quorum):
    good = image(imgs[0])
    q = open_quorum(imgs, 2)
    new = pattern(6, 64 * 1024)
    q.write(128 * 1024, new)
    want = good[:128 * 1024] + new + good[192 * 1024:]
    assert images(imgs) == [want] * 3
    assert q.read(0, IMAGE_SIZE) == want
    # 512-byte granularity
    q.write(512, b"\x11" * 512)
    assert q.read(0, 1536) == want[:512] + b"\x11" * 512 + want[1024:1536]
    assert all(img[512:1024] == b"\x11" * 512 for img in images(imgs))


def test_write_accepts_bytes_like(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    q.write(0, bytearray(b"\x22" * BS))
    q.write(BS, memoryview(b"\x33" * BS))
    assert q.read(0, 2 * BS) == b"\x22" * BS + b"\x33" * BS


def test_flush_reaches_every_replica(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    q.write(0, pattern(7, BS))
    q.flush()
    q.flush()
    assert per_replica(q, "flushes") == [2, 2, 2]
    assert q.status()["counters"]["flushes"] == 2


def test_fua_write(imgs, open_quorum):
    q = open_quorum(imgs, 3)
    new = pattern(8, 2 * BS)
    q.write(6 * BS, new, fua=True)
    assert all(img[6 * BS:8 * BS] == new for img in images(imgs))
    assert q.read(6 * BS, 2 * BS) == new
    assert per_replica(q, "writes") == [1, 1, 1]


# ---- discard and write-zeroes ----

@pytest.mark.parametrize("op", ["discard", "write_zeroes"])
@pytest.mark.parametrize("where", ["disk", "shm"])
@pytest.mark.parametrize("span", [(0, BS), (3 * BS, 16 * BS), (512, 1024),
                                  (0, IMAGE_SIZE)])
def test_discard_and_write_zeroes_read_back_zeros(imgs, tmpfs_imgs, open_quorum,
                                                  op, where, span):
    paths = imgs if where == "disk" else tmpfs_imgs
    good = image(paths[0])
    off, length = span
    q = open_quorum(paths, 2)
    getattr(q, op)(off, length)
    want = good[:off] + bytes(length) + good[off + length:]
    for r, img in enumerate(images(paths)):
        assert len(img) == IMAGE_SIZE, "the replica changed size"
        assert img == want, f"replica {r} after {op}"
    assert q.read(0, IMAGE_SIZE) == want
    key = "discards" if op == "discard" else "write_zeroes"
    # per replica: at least one (a refused fallocate mode is retried)
    assert all(n >= 1 for n in per_replica(q, key))
    assert q.status()["counters"][key] == 1
    assert q.events() == []


def test_write_zeroes_longer_than_max_io(tmp_path, open_quorum):
    paths = make_images(tmp_path)
    good = image(paths[0])
    q = open_quorum(paths, 2, max_io=64 * 1024)
    q.write_zeroes(4096, 512 * 1024)
    q.discard(600 * 1024, 256 * 1024)
    want = bytearray(good)
    want[4096:4096 + 512 * 1024] = bytes(512 * 1024)
    want[600 * 1024:856 * 1024] = bytes(256 * 1024)
    assert images(paths) == [bytes(want)] * 3


def test_zeroed_range_then_written_again(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    q.discard(0, 8 * BS)
    new = pattern(9, BS)
    q.write(2 * BS, new)
    assert q.read(0, 4 * BS) == ZERO * 2 + new + ZERO
    assert all(img[:4 * BS] == ZERO * 2 + new + ZERO for img in images(imgs))


# ---- events ----

def test_event_fields(imgs, open_quorum):
    flip(imgs[1], 0)
    q = open_quorum(imgs, 2)
    t0 = time.time()
    q.read(0, BS)
    ev = q.events()
    assert {e["type"] for e in ev} == {"bad-block", "repaired"}
    for e in ev:
        assert set(e) >= {"type", "replica", "path", "offset", "length",
                          "errno", "suppressed", "time"}
        assert e["replica"] == 1 and e["path"] == imgs[1]
        assert (e["offset"], e["length"]) == (0, BS)
        assert e["errno"] is None and e["suppressed"] == 0
        assert t0 - 1 <= e["time"] <= time.time() + 1
    assert q.events() == []         # drained


def test_event_fd_is_readable_when_events_are_pending(imgs, open_quorum):
    import select
    flip(imgs[1], 0)
    q = open_quorum(imgs, 2)
    fd = q.event_fd()
    assert select.select([fd], [], [], 0)[0] == []
    q.read(0, BS)
    assert select.select([fd], [], [], 1)[0] == [fd]
    q.events()
    assert select.select([fd], [], [], 0)[0] == []


BAD = [2 * i * BS for i in range(20)]   # 20 separate bad blocks


def test_events_are_rate_limited_per_replica_and_type(imgs, open_quorum):
    for off in BAD:
        flip(imgs[1], off + 9)
    q = open_quorum(imgs, 2, events_per_sec=1)
    q.read(0, 40 * BS)
    ev = q.events()
    bad = of_type(ev, "bad-block")
    assert len(bad) == 1
    assert len(of_type(ev, "repaired")) == 1
    assert q.status()["replicas"][1]["bad_blocks"] == 20
    # another replica's events have their own budget
    flip(imgs[2], 100 * BS)
    q.read(100 * BS, BS)
    assert [e["replica"] for e in of_type(q.events(), "bad-block")] == [2]
    # a second later the next event of replica 1 says what was left out
    time.sleep(1.1)
    flip(imgs[1], 200 * BS)
    q.read(200 * BS, BS)
    later = of_type(q.events(), "bad-block")
    assert len(later) == 1
    assert later[0]["suppressed"] == 19
    assert len(bad) + sum(e["suppressed"] for e in bad + later) + 1 == 21


def test_no_rate_limit_gives_every_event(imgs, open_quorum):
    for off in BAD:
        flip(imgs[1], off + 9)
    q = open_quorum(imgs, 2, events_per_sec=0)
    q.read(0, 40 * BS)
    ev = q.events()
    assert sorted(e["offset"] for e in of_type(ev, "bad-block")) == BAD
    assert sorted(e["offset"] for e in of_type(ev, "repaired")) == BAD
    assert all(e["suppressed"] == 0 for e in ev)


def test_quorum_failure_events_are_rate_limited_too(imgs, open_quorum):
    from quorumblk import NoQuorumError
    pw = __import__("conftest").pwrite
    for i in range(5):
        pw(imgs[0], 10 * i * BS, b"x")
        pw(imgs[1], 10 * i * BS, b"y")
    q = open_quorum(imgs, 2, events_per_sec=2)
    for i in range(5):
        with pytest.raises(NoQuorumError):
            q.read(10 * i * BS, BS)
    assert len(of_type(q.events(), "quorum-failure")) == 2
    assert q.status()["counters"]["quorum_failures"] == 5


# ---- counters ----

def test_counters_add_up(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    q.read(0, 8 * BS)
    q.read(512, 1024)
    q.write(16 * BS, pattern(1, 4 * BS))
    q.write(0, pattern(2, BS), fua=True)
    q.flush()
    q.discard(32 * BS, 2 * BS)
    q.write_zeroes(40 * BS, 3 * BS)
    flip(imgs[2], 50 * BS)
    q.read(48 * BS, 4 * BS)         # one repair write on replica 2

    st = q.status()
    dev = st["counters"]
    assert dev["reads"] == 3
    assert dev["read_bytes"] == 8 * BS + 1024 + 4 * BS
    assert dev["writes"] == 2
    assert dev["write_bytes"] == 5 * BS
    assert dev["flushes"] == 1
    assert dev["discards"] == 1
    assert dev["write_zeroes"] == 1
    assert dev["bad_blocks"] == 1 and dev["repairs"] == 1
    assert dev["errors"] == dev["timeouts"] == dev["quorum_failures"] == 0
    for r, c in enumerate(st["replicas"]):
        assert c["reads"] == dev["reads"]
        assert c["read_bytes"] == dev["read_bytes"]
        extra = 1 if r == 2 else 0      # the repair
        assert c["writes"] == dev["writes"] + extra
        assert c["write_bytes"] == dev["write_bytes"] + extra * BS
        assert c["flushes"] == 1
        assert c["discards"] == 1 and c["write_zeroes"] == 1
        assert c["bad_blocks"] == extra and c["repairs"] == extra
        assert c["errors"] == 0
    # sums over replicas equal the device's bad blocks and repairs
    assert sum(c["bad_blocks"] for c in st["replicas"]) == dev["bad_blocks"]
    assert sum(c["repairs"] for c in st["replicas"]) == dev["repairs"]


def test_counters_survive_other_threads_contexts(imgs, open_quorum):
    import threading
    q = open_quorum(imgs, 2)

    def work():
        for i in range(10):
            q.read(i * BS, BS)
    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert q.status()["counters"]["reads"] == 40
    assert per_replica(q, "reads") == [40, 40, 40]


def test_errors_are_counted(imgs, open_quorum):
    from quorumblk import NoQuorumError
    pw = __import__("conftest").pwrite
    pw(imgs[0], 0, b"a")
    pw(imgs[1], 0, b"b")
    q = open_quorum(imgs, 2)
    with pytest.raises(NoQuorumError):
        q.read(0, BS)
    dev = q.status()["counters"]
    assert dev["quorum_failures"] == 1
    assert dev["errors"] >= 1


def test_status_shape(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    st = q.status()
    assert st["size"] == IMAGE_SIZE and st["threshold"] == 2
    assert [r["path"] for r in st["replicas"]] == imgs
    assert all(r["state"] == "in-service" for r in st["replicas"])
    assert q.paths == imgs and q.size == IMAGE_SIZE and q.threshold == 2


# ---- the load generator ----

def test_bench_runs_in_c_and_counts(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    res = q.bench(op="read", bs=BS, depth=8, count=500, step=7 * BS)
    assert res["ops"] == 500 and res["errors"] == 0
    assert res["bytes"] == 500 * BS
    assert res["wall_s"] > 0 and res["cpu_s"] >= 0
    assert q.status()["counters"]["reads"] == 500
    w = q.bench(op="write", bs=64 * 1024, depth=4, count=40)
    assert w["ops"] == 40 and w["errors"] == 0
    assert images(imgs)[0] == images(imgs)[1] == images(imgs)[2]


def test_bench_counts_errors(imgs, open_quorum):
    pw = __import__("conftest").pwrite
    pw(imgs[0], 0, b"a")
    pw(imgs[1], 0, b"b")
    q = open_quorum(imgs, 2, events_per_sec=0)
    res = q.bench(op="read", bs=BS, depth=4, count=64, span=16 * BS)
    assert res["ops"] == 64
    assert res["errors"] == 4       # block 0 is read 64 / 16 times
