"""Discard and write-zeroes of long ranges go in steps (32 MiB), each with
its own holds, bitmap marks and deadlines: a replica that zeroes by writing
zeros (its file system refuses fallocate) is not timed out for the length of
the whole range, and a long discard never holds the whole device."""
import errno
import os
import shutil
import tempfile
import threading
import time

import pytest

from conftest import pread
from quorumblk import Quorum

MiB = 1 << 20


@pytest.fixture
def sparse(request):
    """Three sparse zeroed replicas of 1 GiB in RAM (/dev/shm)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = tempfile.mkdtemp(prefix="qbtest-", dir="/dev/shm")
    paths = []
    for i in range(3):
        p = os.path.join(d, f"s{i}.img")
        with open(p, "wb") as f:
            f.truncate(1 << 30)
        paths.append(p)
    yield paths
    shutil.rmtree(d, ignore_errors=True)


def test_zeroing_by_writing_gives_every_write_its_own_deadline(sparse):
    q = Quorum(sparse, 2, timeout=1.0, events_per_sec=0)
    try:
        data = os.urandom(MiB)
        for i in range(8):
            q.write(i * MiB, data)
        for r in range(3):          # fallocate refused: zeros are written
            q.inject(r, "eio", ops=("discard",), count=1, error=errno.EOPNOTSUPP)
        q.discard(0, 4096)
        # every zero write of replica 2 now starts 0.3 s late: 8 of them in
        # a row is more than the timeout, each one is well within it
        q.inject(2, "delay", ops=("write",), delay=0.3)
        t0 = time.monotonic()
        q.discard(0, 8 * MiB)
        took = time.monotonic() - t0
        assert took >= 8 * 0.3, "the premise: replica 2's writes were delayed"
        assert q.replica_states() == ["in-service"] * 3
        q.inject(2, None)
        for p in sparse:
            assert pread(p, 0, 8 * MiB) == bytes(8 * MiB)
        assert q.status()["replicas"][2]["writes"] >= 8
    finally:
        q.close()


def test_a_long_discard_does_not_hold_the_whole_device(sparse):
    """A scrub of one block finishes while a slow 512 MiB discard is still
    going: the discard holds only the blocks of its current step."""
    q = Quorum(sparse, 2, timeout=5.0, events_per_sec=0)
    try:
        q.inject(2, "delay", ops=("discard",), delay=0.4)
        done = {}

        def discard():
            q.discard(0, 512 * MiB)
            done["discard"] = time.monotonic()

        t = threading.Thread(target=discard)
        t.start()
        time.sleep(0.2)
        res = q.sync(900 * MiB, 4096)            # waits for nothing held
        done["sync"] = time.monotonic()
        t.join(60)
        assert not t.is_alive()
        assert res["blocks"] == 1
        assert done["sync"] < done["discard"], done
        assert q.status()["replicas"][2]["discards"] == 16   # the steps
        assert q.replica_states() == ["in-service"] * 3
    finally:
        q.close()
