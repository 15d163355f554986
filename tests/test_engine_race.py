"""A repair never overwrites data newer than what was voted (DESIGN.md): user
writes racing read-repairs of the same blocks, across threads (each Python
thread has its own engine context, as ublk queue threads do)."""
import threading
import time

from conftest import BS, flip, image, images, pattern

WAIT = 10.0


def wait_for(cond, what, limit=WAIT):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit, f"timed out waiting for {what}"
        time.sleep(0.001)


class Runner(threading.Thread):
    """A thread that runs fn and keeps its result or exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:      # reported by the test
            self.error = e

    def outcome(self):
        self.join(WAIT)
        assert not self.is_alive(), "thread did not finish"
        if self.error:
            raise self.error
        return self.result


def test_user_write_during_a_slow_repair_wins(media_imgs, open_quorum):
    """Read starts, finds replica 2 bad, its repair write is slow; a user
    write of new data to the same block arrives from another thread while
    the repair is in flight. Afterwards every replica holds the new data."""
    imgs = media_imgs
    old = image(imgs[0])[5 * BS:6 * BS]
    flip(imgs[2], 5 * BS + 17)
    new = pattern(42, BS)
    q = open_quorum(imgs, 2)
    q.inject(2, "delay", ops=("write",), delay=0.3, count=1)

    reader = Runner(lambda: q.read(5 * BS, BS))
    reader.start()
    # the vote is done and the repair is out once the bad block is counted
    wait_for(lambda: q.status()["counters"]["bad_blocks"] >= 1, "the vote")
    assert q.status()["counters"]["repairs"] == 0, \
        "the repair finished before the write could race it"
    writer = Runner(lambda: q.write(5 * BS, new))
    writer.start()
    writer.outcome()
    assert reader.outcome() == old
    reader.join()

    for r, img in enumerate(images(imgs)):
        assert img[5 * BS:6 * BS] == new, f"replica {r} lost the newer write"
    assert q.read(5 * BS, BS) == new
    assert [s["state"] for s in q.status()["replicas"]] == ["in-service"] * 3


def test_read_during_an_inflight_write_makes_no_stale_repair(media_imgs,
                                                           open_quorum):
    """A user write is in flight: replicas 0 and 1 are slow to take it,
    replica 2 already has it. A read now sees old, old, new and votes old;
    replica 2 'loses', but repairing it would put the old data back over the
    newer write. Afterwards every replica must hold the new data."""
    imgs = media_imgs
    old = image(imgs[0])[9 * BS:10 * BS]
    new = pattern(43, BS)
    q = open_quorum(imgs, 2)
    q.inject(0, "delay", ops=("write",), delay=0.4, count=1)
    q.inject(1, "delay", ops=("write",), delay=0.4, count=1)

    writer = Runner(lambda: q.write(9 * BS, new))
    writer.start()
    # replica 2 has the new data on disk while the write is still in flight
    wait_for(lambda: image(imgs[2])[9 * BS:10 * BS] == new, "replica 2")
    assert writer.is_alive()
    got = Runner(lambda: q.read(9 * BS, BS))
    got.start()
    data = got.outcome()
    assert data in (old, new)
    writer.outcome()

    for r, img in enumerate(images(imgs)):
        assert img[9 * BS:10 * BS] == new, f"replica {r} got a stale repair"
    assert q.read(9 * BS, BS) == new


def test_read_started_before_a_write_in_the_same_range(media_imgs, open_quorum):
    """The read's own replica reads are slow (delay on reads of replica 0),
    a write from another thread completes meanwhile; whatever the read
    returns, no replica may end up with anything but the new data."""
    imgs = media_imgs
    old = image(imgs[0])[:4 * BS]
    flip(imgs[1], 2 * BS)           # replica 1 is a loser for the read
    new = pattern(44, 4 * BS)
    q = open_quorum(imgs, 2)
    q.inject(0, "delay", ops=("read",), delay=0.3, count=1)
    reader = Runner(lambda: q.read(0, 4 * BS))
    reader.start()
    time.sleep(0.05)                # replicas 1 and 2 have answered
    q.write(0, new)                 # this thread: acknowledged now
    data = reader.outcome()
    # the read started before the write: old or new is right, a mix of the
    # two per block is possible only block-wise
    for b in range(4):
        assert data[b * BS:(b + 1) * BS] in (old[b * BS:(b + 1) * BS],
                                             new[b * BS:(b + 1) * BS])
    for r, img in enumerate(images(imgs)):
        assert img[:4 * BS] == new, f"replica {r} holds stale data"


def test_many_writes_racing_many_readers(media_imgs, open_quorum):
    """Writes to one block whose first two replicas are slow to take them,
    while three reader threads read it: every read returns a version that
    was written, and once the writer is done all replicas hold the last."""
    imgs = media_imgs
    X = 12 * BS
    versions = [image(imgs[0])[X:X + BS]] + \
        [pattern(1000 + i, BS) for i in range(15)]
    q = open_quorum(imgs, 2)
    q.inject(0, "delay", ops=("write",), offset=X, length=BS, delay=0.03)
    q.inject(1, "delay", ops=("write",), offset=X, length=BS, delay=0.02)
    stop = threading.Event()
    seen = []

    def read_loop():
        out = []
        while not stop.is_set():
            out.append(q.read(X, BS))
        return out

    def write_all():
        for v in versions[1:]:
            q.write(X, v)

    readers = [Runner(read_loop) for _ in range(3)]
    for t in readers:
        t.start()
    writer = Runner(write_all)
    writer.start()
    writer.outcome()
    stop.set()
    for t in readers:
        seen += t.outcome()
    assert seen
    assert all(s in versions for s in seen)
    for r, img in enumerate(images(imgs)):
        assert img[X:X + BS] == versions[-1], \
            f"replica {r} does not hold the last write"
    assert [s["state"] for s in q.status()["replicas"]] == ["in-service"] * 3
