"""Several threads (each with its own engine context, as ublk queue threads)
on one quorum: writes, reads and repairs interleave, corruption keeps coming,
and every read returns the right bytes."""
import errno
import random
import threading
import time

from conftest import BS, image, images, pread, pwrite

RO_FIRST = 192          # blocks 192..255 are only read (and corrupted)
REGION = 32             # each writer thread owns 32 blocks below that


def test_threads_write_read_and_repair(media_imgs, open_quorum):
    imgs = media_imgs
    good = image(imgs[0])
    q = open_quorum(imgs, 2, events_per_sec=0)
    stop = threading.Event()
    errors = []

    def worker(i):
        rng = random.Random(i)
        base = i * REGION * BS
        mine = bytearray(good[base:base + REGION * BS])
        try:
            while not stop.is_set():
                b = rng.randrange(REGION)
                n = rng.randint(1, min(4, REGION - b))
                if rng.random() < 0.4:
                    data = rng.randbytes(n * BS)
                    q.write(base + b * BS, data)
                    mine[b * BS:(b + n) * BS] = data
                else:
                    got = q.read(base + b * BS, n * BS)
                    assert got == bytes(mine[b * BS:(b + n) * BS]), \
                        f"thread {i} read its own blocks wrong"
                rb = rng.randrange(RO_FIRST, 256 - 3)
                got = q.read(rb * BS, 3 * BS)
                assert got == good[rb * BS:(rb + 3) * BS], \
                    f"thread {i} read shared blocks {rb}.. wrong"
        except BaseException as e:
            errors.append(e)
            stop.set()
        return mine

    results = {}

    def run(i):
        results[i] = worker(i)

    def corrupter():
        rng = random.Random(99)
        while not stop.is_set():
            b = rng.randrange(RO_FIRST, 256)
            # one replica per block only: every block keeps a quorum
            try:
                pwrite(imgs[b % 3], b * BS + rng.randrange(BS - 8),
                       rng.randbytes(8))
            except OSError as e:
                # buffered writes racing the engine's O_DIRECT ones: the
                # kernel reports the page-cache collision at fsync (EIO)
                if e.errno != errno.EIO:
                    raise
            time.sleep(0.002)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    ts.append(threading.Thread(target=corrupter))
    for t in ts:
        t.start()
    time.sleep(3.0)
    stop.set()
    for t in ts:
        t.join(30)
        assert not t.is_alive()
    if errors:
        raise errors[0]

    # one more pass over the shared blocks repairs whatever is left
    assert q.read(RO_FIRST * BS, (256 - RO_FIRST) * BS) == good[RO_FIRST * BS:]
    after = images(imgs)
    for r in range(3):
        assert after[r][RO_FIRST * BS:] == good[RO_FIRST * BS:], \
            f"replica {r} not repaired"
        for i in range(4):
            base = i * REGION * BS
            assert after[r][base:base + REGION * BS] == bytes(results[i]), \
                f"replica {r}, thread {i}'s region"
    st = q.status()
    assert [s["state"] for s in st["replicas"]] == ["in-service"] * 3
    assert st["counters"]["bad_blocks"] > 0
    assert st["counters"]["quorum_failures"] == 0


def test_threads_see_one_replica_fail_together(media_imgs, open_quorum):
    """A replica fails under load from several threads: each thread's I/O
    goes on with the others, none touches the failed one afterwards."""
    imgs = media_imgs
    good = image(imgs[0])
    q = open_quorum(imgs, 2)
    stop = threading.Event()
    errors = []

    def reader(i):
        rng = random.Random(i)
        try:
            while not stop.is_set():
                b = rng.randrange(0, 250)
                assert q.read(b * BS, 4 * BS) == good[b * BS:(b + 4) * BS]
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    time.sleep(0.3)
    q.inject(1, "eio", ops=("read",))
    time.sleep(0.5)
    before = q.status()["replicas"][1]["reads"]
    time.sleep(0.5)
    stop.set()
    for t in ts:
        t.join(30)
    if errors:
        raise errors[0]
    assert q.status()["replicas"][1]["state"] == "failed"
    assert q.status()["replicas"][1]["reads"] == before
    failed = [e for e in q.events() if e["type"] == "replica-failed"]
    assert [e["replica"] for e in failed] == [1]     # reported once
    assert pread(imgs[1], 0, BS) == good[:BS]


def test_finished_threads_give_back_their_engine_context(media_imgs,
                                                         open_quorum):
    """Every thread gets its own context (an io_uring and its buffers);
    when the thread ends, that must be released, or a program that uses
    short-lived threads runs out of file descriptors."""
    import os
    q = open_quorum(media_imgs, 2)
    q.read(0, BS)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(300):
        t = threading.Thread(target=lambda: q.read(0, BS))
        t.start()
        t.join()
    grown = len(os.listdir("/proc/self/fd")) - fds
    assert grown < 30, f"{grown} file descriptors more after 300 threads"
    assert q.status()["counters"]["reads"] == 301


def test_concurrent_write_and_read_load_leaves_identical_replicas(
        media_imgs, open_quorum):
    """Two threads keep writing their own 16 blocks (one write at a time
    each, so no two writes overlap) while the C load generator reads the
    same 32 blocks at depth 16 in a third: reads meet writes in flight all
    the time and vote on half-written blocks. No repair may put older data
    back, so once all are done every replica holds the same bytes, without
    any read afterwards to fix them. Replicas 0 and 1 are slow to take
    writes: a read in that window sees old, old, new and votes old, and a
    repair of replica 2 would put the old data back over the new."""
    imgs = media_imgs
    q = open_quorum(imgs, 2, events_per_sec=0)
    q.inject(0, "delay", ops=("write",), delay=0.002)
    q.inject(1, "delay", ops=("write",), delay=0.002)
    stop = threading.Event()
    out = {}

    done = [0, 0]

    def writer(i):
        rng = random.Random(i)
        while not stop.is_set():
            b = i * 16 + rng.randrange(16)
            q.write(b * BS, rng.randbytes(BS))
            done[i] += 1

    def reader():
        # reads go on until both writers have written a fair amount: on
        # tmpfs a fixed count of reads can be over before they start
        out["reads"] = 0
        deadline = time.monotonic() + 60
        while min(done) < 50 and time.monotonic() < deadline:
            res = q.bench(op="read", bs=BS, depth=16, count=2000,
                          step=5 * BS, span=32 * BS)
            assert res["errors"] == 0
            out["reads"] += res["ops"]

    ws = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    r = threading.Thread(target=reader)
    for t in ws + [r]:
        t.start()
    r.join(120)
    stop.set()
    for t in ws:
        t.join(30)
    assert min(done) >= 50, f"writers did only {done} writes in 60 s"
    assert out["reads"] >= 2000
    after = images(imgs)
    for b in range(32):
        copies = {a[b * BS:(b + 1) * BS] for a in after}
        assert len(copies) == 1, f"replicas differ at block {b}"
    st = q.status()
    assert [s["state"] for s in st["replicas"]] == ["in-service"] * 3
