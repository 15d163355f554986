"""Replica faults through the engine's injection hook: failed reads and
writes, replicas that never answer, and the quorum that is left
(DESIGN.md: writes, replica timeout, out of service)."""
import errno
import os
import threading
import time

import pytest

from conftest import BS, flip, image, images, of_type, pattern
from quorumblk import DegradedError, NoQuorumError, QuorumError

SLACK = 3.0     # seconds on top of the replica timeout, for a slow machine


def states(q):
    return [r["state"] for r in q.status()["replicas"]]


def rep_counts(q, r):
    c = q.status()["replicas"][r]
    return c["reads"], c["writes"], c["flushes"], c["discards"], \
        c["write_zeroes"]


def test_read_error_on_one_replica(imgs, open_quorum):
    good = image(imgs[0])
    q = open_quorum(imgs, 2)
    q.inject(1, "eio", ops=("read",))
    assert q.read(0, 4 * BS) == good[:4 * BS]
    assert states(q) == ["in-service", "failed", "in-service"]
    st = q.status()
    assert st["in_service"] == 2
    assert st["replicas"][1]["errors"] >= 1
    ev = q.events()
    failed = of_type(ev, "replica-failed")
    assert [(e["replica"], e["path"], e["errno"]) for e in failed] == \
        [(1, imgs[1], "EIO")]
    assert [e["replica"] for e in of_type(ev, "replica-error")] == [1]
    # a failed replica casts no vote: no bad-block event for it
    assert of_type(ev, "bad-block") == []

    # later I/O does not touch it, not even writes: it is stale from now on
    q.inject(1, None)
    seen = rep_counts(q, 1)
    new = pattern(99, 2 * BS)
    q.write(8 * BS, new)
    q.flush()
    q.discard(16 * BS, BS)
    q.write_zeroes(20 * BS, BS)
    assert q.read(8 * BS, 2 * BS) == new
    assert rep_counts(q, 1) == seen
    after = images(imgs)
    assert after[1] == good
    assert after[0][8 * BS:10 * BS] == new
    assert after[2][8 * BS:10 * BS] == new


def test_vote_goes_on_with_the_remaining_replicas(imgs, open_quorum):
    """With one replica failed, two are left; a bitflip in one of them leaves
    no block with 2 agreeing copies at that place: EIO, not wrong data."""
    good = image(imgs[0])
    q = open_quorum(imgs, 2)
    q.inject(0, "eio", ops=("read",), count=1)
    assert q.read(0, BS) == good[:BS]
    assert states(q)[0] == "failed"
    flip(imgs[2], 2 * BS)
    before = images(imgs)
    with pytest.raises(NoQuorumError):
        q.read(2 * BS, BS)
    assert images(imgs) == before
    assert q.read(3 * BS, BS) == good[3 * BS:4 * BS]


def test_writes_below_threshold_fail_and_write_nothing(imgs, open_quorum):
    good = image(imgs[0])
    q = open_quorum(imgs, 2)
    q.inject(0, "eio", ops=("read",), count=1)
    q.inject(2, "eio", ops=("read",), count=1)
    with pytest.raises(DegradedError) as ei:
        q.read(0, BS)
    assert ei.value.errno == errno.EIO
    assert states(q) == ["failed", "in-service", "failed"]
    before = images(imgs)
    assert before == [good] * 3
    for call in (lambda: q.write(0, pattern(5, BS)),
                 lambda: q.write(BS, pattern(6, BS), fua=True),
                 lambda: q.discard(0, BS),
                 lambda: q.write_zeroes(0, BS),
                 lambda: q.read(0, BS),
                 lambda: q.flush()):
        with pytest.raises(DegradedError) as ei:
            call()
        assert ei.value.errno == errno.EIO
        assert isinstance(ei.value, QuorumError)
    assert images(imgs) == before
    assert rep_counts(q, 1)[1:] == (0, 0, 0, 0)


def test_write_error_on_one_replica_still_succeeds(imgs, open_quorum):
    good = image(imgs[0])
    q = open_quorum(imgs, 2)
    q.inject(2, "eio", ops=("write",))
    new = pattern(7, 4 * BS)
    q.write(4 * BS, new)
    assert states(q) == ["in-service", "in-service", "failed"]
    ev = q.events()
    assert [(e["replica"], e["errno"]) for e in of_type(ev, "replica-failed")] \
        == [(2, "EIO")]
    after = images(imgs)
    assert after[0][4 * BS:8 * BS] == new
    assert after[1][4 * BS:8 * BS] == new
    assert after[2] == good
    assert q.read(4 * BS, 4 * BS) == new
    assert q.status()["replicas"][2]["errors"] >= 1


def test_write_error_on_two_of_three_with_threshold_two(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    q.inject(1, "eio", ops=("write",))
    q.inject(2, "eio", ops=("write",))
    with pytest.raises(DegradedError) as ei:
        q.write(0, pattern(8, BS))
    assert ei.value.errno == errno.EIO
    assert states(q) == ["in-service", "failed", "failed"]


def test_flush_error_takes_the_replica_out(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    q.inject(0, "eio", ops=("flush",))
    q.flush()
    assert states(q) == ["failed", "in-service", "in-service"]
    assert [e["replica"] for e in of_type(q.events(), "replica-failed")] == [0]


def test_fault_limited_to_a_range(imgs, open_quorum):
    good = image(imgs[0])
    q = open_quorum(imgs, 2)
    q.inject(1, "eio", ops=("read",), offset=64 * BS, length=BS)
    assert q.read(0, 16 * BS) == good[:16 * BS]
    assert states(q) == ["in-service"] * 3
    assert q.read(60 * BS, 8 * BS) == good[60 * BS:68 * BS]
    assert states(q)[1] == "failed"


def test_fifo_read_error_goes_to_the_next_replica(imgs, open_quorum):
    good = image(imgs[0])
    q = open_quorum(imgs, 2, read_policy="fifo")
    q.inject(0, "eio", ops=("read",))
    assert q.read(0, 2 * BS) == good[:2 * BS]
    assert states(q)[0] == "failed"


@pytest.mark.parametrize("op", ["read", "write", "flush"])
def test_a_replica_that_never_answers_is_timed_out(media_imgs, open_quorum, op):
    good = image(media_imgs[0])
    timeout = 0.5
    q = open_quorum(media_imgs, 2, timeout=timeout)
    q.inject(1, "hang", ops=(op,))
    new = pattern(9, 2 * BS)
    t0 = time.monotonic()
    if op == "read":
        assert q.read(0, 2 * BS) == good[:2 * BS]
    elif op == "write":
        q.write(0, new)
    else:
        q.flush()
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + SLACK, elapsed
    assert elapsed >= timeout * 0.9, elapsed     # it did wait for the bound
    assert states(q) == ["in-service", "failed", "in-service"]
    st = q.status()
    assert st["replicas"][1]["timeouts"] == 1
    assert st["counters"]["timeouts"] == 1
    failed = of_type(q.events(), "replica-failed")
    assert [(e["replica"], e["errno"]) for e in failed] == [(1, "ETIMEDOUT")]
    # the device serves on with the other two, promptly
    t0 = time.monotonic()
    q.write(0, new)
    assert q.read(0, 2 * BS) == new
    assert time.monotonic() - t0 < 1.0
    after = images(media_imgs)
    assert after[0][:2 * BS] == new and after[2][:2 * BS] == new


def test_two_hung_replicas_fail_the_read_within_the_bound(media_imgs, open_quorum):
    q = open_quorum(media_imgs, 2, timeout=0.5)
    q.inject(0, "hang", ops=("read",))
    q.inject(2, "hang", ops=("read",))
    t0 = time.monotonic()
    with pytest.raises(DegradedError):
        q.read(0, BS)
    assert time.monotonic() - t0 < 0.5 + SLACK
    assert states(q) == ["failed", "in-service", "failed"]
    assert q.status()["counters"]["timeouts"] == 2


def test_delay_beyond_the_timeout_is_a_timeout(media_imgs, open_quorum):
    good = image(media_imgs[0])
    q = open_quorum(media_imgs, 2, timeout=0.3)
    q.inject(2, "delay", ops=("read",), delay=2.0)
    t0 = time.monotonic()
    assert q.read(0, BS) == good[:BS]
    assert time.monotonic() - t0 < 0.3 + SLACK
    assert states(q)[2] == "failed"
    assert q.status()["replicas"][2]["timeouts"] == 1


def test_delay_within_the_timeout_is_only_slow(media_imgs, open_quorum):
    good = image(media_imgs[0])
    q = open_quorum(media_imgs, 2, timeout=5.0)
    q.inject(2, "delay", ops=("read",), delay=0.3, count=1)
    t0 = time.monotonic()
    assert q.read(0, BS) == good[:BS]
    assert time.monotonic() - t0 >= 0.25
    assert states(q) == ["in-service"] * 3
    assert q.status()["counters"]["timeouts"] == 0


def test_failure_is_seen_by_every_thread(imgs, open_quorum):
    good = image(imgs[0])
    q = open_quorum(imgs, 2)
    q.read(0, BS)           # this thread's context exists before the fault
    q.inject(2, "eio", ops=("read",), count=1)
    out = {}

    def other():
        out["data"] = q.read(BS, BS)

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert out["data"] == good[BS:2 * BS]
    assert states(q)[2] == "failed"
    seen = rep_counts(q, 2)
    q.write(0, pattern(3, BS))        # main thread: replica 2 is out here too
    assert rep_counts(q, 2) == seen
    assert image(imgs[2]) == good


def test_inject_rejects_bad_arguments(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    with pytest.raises(QuorumError) as ei:
        q.inject(3, "eio")
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(QuorumError):
        q.inject(0, "melt")
    with pytest.raises(QuorumError):
        q.inject(0, "eio", ops=("scribble",))


CLOSE_AFTER_TIMEOUT = r"""
import sys, tempfile
sys.path.insert(0, {tests!r})
from conftest import make_images
from quorumblk import Quorum, DegradedError
for it in range(10):
    d = tempfile.mkdtemp(dir={tmp!r})
    p = make_images(d)
    q = Quorum(p, 2, timeout=0.2)
    q.inject(0, "hang", ops=("read",))
    q.inject(2, "hang", ops=("read",))
    try:
        q.read(0, 4096)
        raise SystemExit("read with two hung replicas of threshold 2 succeeded")
    except DegradedError:
        pass
    q.close()
print("ok")
"""


def test_close_after_timed_out_reads_does_not_crash(tmp_path):
    """Timed-out reads leave buffers the kernel may still own; closing the
    quorum afterwards must free only what the engine mapped (run in a child
    process: a crash here must not take the test run down)."""
    import subprocess
    import sys
    code = CLOSE_AFTER_TIMEOUT.format(
        tests=os.path.dirname(os.path.abspath(__file__)), tmp=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=120, cwd=str(tmp_path),
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             p for p in sys.path if p)))
    assert run.returncode == 0 and run.stdout.strip() == "ok", \
        (run.returncode, run.stdout[-2000:], run.stderr[-2000:])


def test_a_hung_repair_write_is_timed_out(media_imgs, open_quorum):
    """The repair of a bad block never completes: the read still returns
    the voted data within the bound and the replica leaves service."""
    imgs = media_imgs
    good = image(imgs[0])
    flip(imgs[1], 4 * BS)
    q = open_quorum(imgs, 2, timeout=0.5)
    q.inject(1, "hang", ops=("write",))
    t0 = time.monotonic()
    assert q.read(4 * BS, BS) == good[4 * BS:5 * BS]
    assert time.monotonic() - t0 < 0.5 + SLACK
    assert states(q) == ["in-service", "failed", "in-service"]
    assert q.status()["replicas"][1]["timeouts"] == 1
    ev = q.events()
    assert of_type(ev, "repaired") == []
    assert [e["replica"] for e in of_type(ev, "replica-failed")] == [1]


def test_a_write_behind_a_hung_repair_finishes_within_the_bound(
        media_imgs, open_quorum):
    """A user write to a block whose repair hangs waits for the repair, but
    not longer than the replica timeout; then it goes to the others."""
    imgs = media_imgs
    flip(imgs[2], 6 * BS)
    q = open_quorum(imgs, 2, timeout=0.5)
    q.inject(2, "hang", ops=("write",))
    new = pattern(77, BS)
    out = {}

    def reader():
        out["read"] = q.read(6 * BS, BS)

    t = threading.Thread(target=reader)
    t.start()
    t0 = time.monotonic()
    while q.status()["counters"]["bad_blocks"] < 1:
        assert time.monotonic() - t0 < 5
        time.sleep(0.001)
    q.write(6 * BS, new)
    assert time.monotonic() - t0 < 0.5 + SLACK
    t.join(10)
    after = images(imgs)
    assert after[0][6 * BS:7 * BS] == new and after[1][6 * BS:7 * BS] == new
    assert states(q)[2] == "failed"
    assert q.read(6 * BS, BS) == new


@pytest.mark.parametrize("op", ["discard", "write_zeroes"])
def test_a_hung_discard_is_timed_out(media_imgs, open_quorum, op):
    imgs = media_imgs
    q = open_quorum(imgs, 2, timeout=0.5)
    q.inject(0, "hang", ops=(op,))
    t0 = time.monotonic()
    getattr(q, op)(0, 4 * BS)
    assert time.monotonic() - t0 < 0.5 + SLACK
    assert states(q) == ["failed", "in-service", "in-service"]
    assert q.read(0, 4 * BS) == bytes(4 * BS)
    after = images(imgs)
    assert after[1][:4 * BS] == bytes(4 * BS) == after[2][:4 * BS]


def test_policy_threshold_with_a_hung_replica(media_imgs, open_quorum):
    imgs = media_imgs
    good = image(imgs[0])
    q = open_quorum(imgs, 2, read_policy="threshold", timeout=0.5)
    q.inject(0, "hang", ops=("read",))
    t0 = time.monotonic()
    for i in range(3):          # whichever pair the rotation picks
        assert q.read(i * BS, BS) == good[i * BS:(i + 1) * BS]
    assert time.monotonic() - t0 < 0.5 + SLACK
    assert states(q)[0] == "failed"


def test_reads_after_a_timed_out_read_return_their_own_data(media_imgs,
                                                             open_quorum):
    """A timed-out read may still land later in the buffer it was given;
    later requests on the same slot must not see those bytes."""
    imgs = media_imgs
    good = image(imgs[0])
    q = open_quorum(imgs, 2, timeout=0.3)
    # replica 0's read starts 1 s late: after the timeout has abandoned it
    q.inject(0, "delay", ops=("read",), delay=1.0, count=1)
    assert q.read(0, BS) == good[:BS]
    deadline = time.monotonic() + 1.5
    i = 1
    while time.monotonic() < deadline:
        off = (i % 200) * BS
        assert q.read(off, BS) == good[off:off + BS]
        i += 1
    assert states(q)[0] == "failed"


def test_many_bad_runs_in_one_request(tmp_path, open_quorum):
    """More separate bad runs in one request than one repair pass takes:
    the data is right, every bad block is reported, and reading again
    repairs what is left."""
    from conftest import make_images
    paths = make_images(tmp_path)
    good = image(paths[0])
    bad = list(range(0, 256, 2))        # 128 runs of one block
    for b in bad:
        flip(paths[1], b * BS + 5)
    q = open_quorum(paths, 2, events_per_sec=0)
    assert q.read(0, 256 * BS) == good
    assert q.status()["replicas"][1]["bad_blocks"] == len(bad)
    for _ in range(3):
        if image(paths[1]) == good:
            break
        assert q.read(0, 256 * BS) == good
    assert image(paths[1]) == good
    assert q.status()["replicas"][1]["repairs"] == len(bad)


@pytest.mark.parametrize("op", ["read", "write", "flush", "discard"])
def test_replica_ios_go_out_in_parallel(media_imgs, open_quorum, op):
    """Each replica's I/O starts 0.3 s late: one request costs about 0.3 s,
    not 0.9 s as it would one replica after another (QEMU flushes one by
    one)."""
    imgs = media_imgs
    q = open_quorum(imgs, 2, timeout=10.0)
    for r in range(3):
        q.inject(r, "delay", ops=(op,), delay=0.3, count=1)
    t0 = time.monotonic()
    if op == "read":
        q.read(0, BS)
    elif op == "write":
        q.write(0, bytes(BS))
    elif op == "flush":
        q.flush()
    else:
        q.discard(0, BS)
    elapsed = time.monotonic() - t0
    assert 0.28 <= elapsed < 0.75, elapsed
    assert states(q) == ["in-service"] * 3


def test_flush_failing_on_two_of_three_is_degraded(imgs, open_quorum):
    q = open_quorum(imgs, 2)
    q.inject(0, "eio", ops=("flush",))
    q.inject(2, "eio", ops=("flush",))
    with pytest.raises(DegradedError) as ei:
        q.flush()
    assert ei.value.errno == errno.EIO
    assert states(q) == ["failed", "in-service", "failed"]


def test_threshold_one_serves_down_to_the_last_replica(imgs, open_quorum):
    good = image(imgs[0])
    with pytest.warns(UserWarning):
        q = open_quorum(imgs, 1)
    q.inject(0, "eio", ops=("read",), count=1)
    q.inject(1, "eio", ops=("read",), count=1)
    assert q.read(0, BS) == good[:BS]
    assert states(q) == ["failed", "failed", "in-service"]
    new = pattern(12, BS)
    q.write(0, new)
    assert q.read(0, BS) == new
    q.inject(2, "eio", ops=("read",))
    with pytest.raises(DegradedError):
        q.read(0, BS)
    with pytest.raises(DegradedError):
        q.write(0, new)


def test_a_really_failing_replica_truncated_under_the_engine(imgs,
                                                            open_quorum):
    """No injection: replica 1's file loses its second half while open. A
    read there comes back short, which is an error: the vote goes on with
    the other two, and replica 1 leaves service."""
    good = image(imgs[0])
    q = open_quorum(imgs, 2)
    os.truncate(imgs[1], 128 * BS)
    assert q.read(200 * BS, 4 * BS) == good[200 * BS:204 * BS]
    assert states(q) == ["in-service", "failed", "in-service"]
    failed = of_type(q.events(), "replica-failed")
    assert [(e["replica"], e["offset"]) for e in failed] == [(1, 200 * BS)]
    assert q.read(0, 4 * BS) == good[:4 * BS]
