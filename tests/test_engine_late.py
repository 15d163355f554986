"""Replica I/O that the engine abandons at the replica timeout and that then
completes late, as a hard NFS mount, a suspended dm device or a stalled disk
do (DESIGN.md: replica timeout). Until it has come back its buffer is neither
reused nor freed, its replica is not attached again, and the completion is
counted (`late`, and `owed` until it is back). What a late write writes is
the data of its own request, never another's."""
import errno
import os
import subprocess
import sys
import threading
import textwrap
import time

import pytest

from conftest import BS, flip, pread
from quorumblk import QuorumError

TIMEOUT = 0.5
LATE = 2.0       # the delay fault: the I/O starts this long after it was issued
SLACK = 3.0


def states(q):
    return q.replica_states()


def zero_images(directory, n=3, size=8 << 20):
    paths = []
    for i in range(n):
        p = os.path.join(str(directory), f"z{i}.img")
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(p)
    return paths


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    pytest.fail(f"{what}: not within {timeout} s")


def past_late(t0):
    """Sleep until the delay fault's I/O, issued at t0, has surely run."""
    time.sleep(max(0.0, t0 + LATE + 0.5 - time.monotonic()))


def settle(q, replica):
    """Let replica's late I/O come back: the engine learns of it in the
    calling thread's next call, so keep calling."""
    def back():
        q.read(0, BS)
        return q.status()["replicas"][replica]["owed"] == 0
    wait_for(back, LATE + SLACK, f"replica {replica}'s late I/O came back")


@pytest.fixture
def zimgs(request, tmp_path):
    """Three zeroed 8 MiB replicas, on the local disk and in RAM."""
    if request.param == "tmpfs" and os.path.isdir("/dev/shm"):
        import tempfile
        import shutil
        d = tempfile.mkdtemp(prefix="qbtest-", dir="/dev/shm")
        yield zero_images(d)
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield zero_images(tmp_path)


media = pytest.mark.parametrize("zimgs", ["disk", "tmpfs"], indirect=True)


@media
def test_a_late_write_lands_its_own_data_never_the_next_requests(zimgs, open_quorum):
    """The issue's reproduction: the write to replica 2 is abandoned at the
    timeout and runs 2 s later; meanwhile the same slot carries twenty other
    writes. Replica 2 must hold A (or its old zeros) at offset 0."""
    q = open_quorum(zimgs, 2, timeout=TIMEOUT, events_per_sec=0)
    q.inject(2, "delay", ops=("write",), delay=LATE)
    t0 = time.monotonic()
    q.write(0, b"A" * BS)
    assert time.monotonic() - t0 < TIMEOUT + SLACK
    assert states(q) == ["in-service", "in-service", "failed"]
    q.inject(2, None)
    for i in range(20):
        q.write((100 + i) * BS, b"B" * BS)
    past_late(t0)
    assert pread(zimgs[2], 0, BS) in (b"A" * BS, bytes(BS))
    settle(q, 2)
    # it did run: a late write is a real write
    assert pread(zimgs[2], 0, BS) == b"A" * BS
    st = q.status()["replicas"][2]
    assert st["late"] == 1 and st["owed"] == 0
    assert pread(zimgs[2], 100 * BS, 20 * BS) == bytes(20 * BS)


@media
def test_a_late_repair_writes_the_voted_data_never_the_next_requests(zimgs, open_quorum):
    """A read's repair of replica 2 is abandoned; the slot's buffers then
    carry other writes; the repair lands late with the voted block."""
    good = os.urandom(BS)
    for p in zimgs:
        with open(p, "r+b") as f:
            f.seek(5 * BS)
            f.write(good)
    flip(zimgs[2], 5 * BS + 7)
    bad = pread(zimgs[2], 5 * BS, BS)
    q = open_quorum(zimgs, 2, timeout=TIMEOUT, events_per_sec=0)
    q.inject(2, "delay", ops=("write",), delay=LATE)
    t0 = time.monotonic()
    assert q.read(5 * BS, BS) == good
    assert states(q)[2] == "failed"
    q.inject(2, None)
    for i in range(20):
        q.write((100 + i) * BS, b"C" * BS)
    past_late(t0)
    assert pread(zimgs[2], 5 * BS, BS) in (good, bad)
    settle(q, 2)
    assert pread(zimgs[2], 5 * BS, BS) == good
    assert q.status()["replicas"][2]["late"] == 1


@media
def test_a_late_read_lands_in_a_buffer_no_request_uses(zimgs, open_quorum):
    q = open_quorum(zimgs, 2, timeout=TIMEOUT, events_per_sec=0)
    q.inject(2, "delay", ops=("read",), delay=LATE)
    assert q.read(0, BS) == bytes(BS)
    assert states(q)[2] == "failed"
    q.inject(2, None)
    data = os.urandom(BS)
    for i in range(20):
        q.write(i * BS, data)
        assert q.read(i * BS, BS) == data
    settle(q, 2)
    for i in range(20):
        assert q.read(i * BS, BS) == data


def test_late_held_io_runs_when_released(tmp_path, open_quorum):
    """The `late` fault holds a replica's I/O until the test releases it:
    then the write really runs, at the moment the test chose."""
    paths = zero_images(tmp_path)
    q = open_quorum(paths, 2, timeout=TIMEOUT, events_per_sec=0)
    q.inject(2, "late", ops=("write",))
    q.write(0, b"L" * BS)
    assert states(q)[2] == "failed"
    time.sleep(TIMEOUT)
    assert pread(paths[2], 0, BS) == bytes(BS)      # still held
    assert q.status()["replicas"][2]["owed"] == 1
    q.inject(2, None)           # new I/O is not held; what is held stays
    q.release(2)
    settle(q, 2)
    assert pread(paths[2], 0, BS) == b"L" * BS
    assert q.status()["replicas"][2]["late"] == 1


def test_a_replica_with_io_owed_is_not_attached_again(tmp_path):
    """readd waits for (or refuses) a replica whose abandoned I/O has not
    come back: its late write could otherwise land after the resync."""
    from test_lifecycle import start
    from quorumblk import meta

    paths = zero_images(tmp_path)
    q, _ = start(paths, timeout=TIMEOUT)
    try:
        q.inject(2, "late", ops=("write",))
        q.write(0, b"L" * BS)
        assert states(q)[2] == "failed"
        m, _ = meta.read(paths[2])
        with pytest.raises(QuorumError) as e:
            q.attach(paths[2], m)
        assert e.value.errno == errno.EAGAIN and "owed" in str(e.value), str(e.value)
        q.release(2)
        settle(q, 2)
        r = q.attach(paths[2], m)
        q.sync(0, q.size, targets=[r])
        q.set_state(r, "in-service")
        for p in paths:
            assert pread(p, 0, BS) == b"L" * BS
    finally:
        q.close()


FAIL_READD = textwrap.dedent("""
    import os, sys, threading
    from quorumblk import meta
    from quorumblk.core import Quorum
    paths = sys.argv[1:]
    plan = meta.assemble(paths, 2)
    q = Quorum(paths, 2, events_per_sec=0)
    meta.commit(paths, plan)
    q.set_meta(plan.metas, plan.bitmap)
    meta.resync(q, plan)
    q.read(0, 4096)                  # this thread's engine exists
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(60):
        q.set_state(2, "failed")
        m, _ = meta.read(paths[2])
        r = q.attach(paths[2], m)
        q.write(i * 4096, bytes([i]) * 4096)
        q.sync(0, q.size, targets=[r])
        q.set_state(r, "in-service")
    grown = len(os.listdir("/proc/self/fd")) - fds
    out = []
    t = threading.Thread(target=lambda: out.append(q.read(0, 4096)))
    t.start()
    t.join(20)
    assert out and out[0] == bytes(4096), "a new thread's engine did not work"
    q.close()
    print("fds grown", grown)
""")


def test_hundreds_of_fail_readd_cycles_keep_the_quorum_whole(tmp_path):
    """Every readd used to leave the replaced fd in a 16-entry table without
    a bound: the 17th overwrote the quorum's lock. Now old fds are closed,
    and the open fds do not grow with the cycles."""
    paths = zero_images(tmp_path)
    p = subprocess.run([sys.executable, "-c", FAIL_READD, *paths],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    grown = int(p.stdout.split()[-1])
    assert grown <= 1, p.stdout     # the one replaced fd kept a cycle


def test_readd_waits_for_owed_io_then_refuses_saying_why(tmp_path, monkeypatch):
    from test_lifecycle import start
    from quorumblk import lifecycle

    monkeypatch.setattr(lifecycle, "OWED_WAIT_S", 0.5)
    paths = zero_images(tmp_path)
    q, _ = start(paths, timeout=TIMEOUT)
    try:
        life = lifecycle.Lifecycle(q)
        q.inject(2, "late", ops=("write",))
        q.write(0, b"L" * BS)
        with pytest.raises(lifecycle.LifecycleError, match="owed.*storage still holds"):
            life.readd(paths[2])
        assert states(q)[2] == "failed"
        # released while readd waits: it goes on
        monkeypatch.setattr(lifecycle, "OWED_WAIT_S", 5.0)
        threading.Timer(0.5, q.release, args=(2,)).start()
        job = life.readd(paths[2])
        end = time.monotonic() + 20
        while job.state == "running" and time.monotonic() < end:
            time.sleep(0.05)
        assert job.state == "done", job.to_dict()
        assert states(q) == ["in-service"] * 3
        assert pread(paths[2], 0, BS) == b"L" * BS
    finally:
        q.close()


def test_readd_of_a_replica_that_does_not_answer_refuses_within_seconds(
        tmp_path, monkeypatch):
    """readd reads the failed replica's header first; storage that hangs
    must not hang the daemon that asks (its control loop): a bounded wait,
    then a refusal that says so."""
    from test_lifecycle import start
    from quorumblk import lifecycle, meta

    paths = zero_images(tmp_path)
    q, _ = start(paths, timeout=TIMEOUT)
    try:
        q.set_state(2, "failed")
        gate = threading.Event()
        real = meta.read
        monkeypatch.setattr(meta, "read", lambda p: (gate.wait(30), real(p))[1])
        monkeypatch.setattr(lifecycle, "ANSWER_S", 0.5)
        t0 = time.monotonic()
        with pytest.raises(lifecycle.LifecycleError, match="no answer within"):
            lifecycle.Lifecycle(q).readd(paths[2])
        assert time.monotonic() - t0 < 5
        gate.set()
    finally:
        q.close()


def test_an_idle_threads_late_completion_is_counted_by_another(tmp_path, open_quorum):
    """The thread whose write was abandoned goes idle (it lives on, doing
    nothing): its engine holds the late completion, and the replica's owed
    count with it, until some thread looks. status() (any thread) does."""
    paths = zero_images(tmp_path)
    q = open_quorum(paths, 2, timeout=TIMEOUT, events_per_sec=0)
    q.inject(2, "late", ops=("write",))
    idle = threading.Event()
    wrote = threading.Event()

    def writer():
        q.write(0, b"W" * BS)
        wrote.set()
        idle.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert wrote.wait(10)
        assert q.status()["replicas"][2]["owed"] == 1
        q.release(2)
        end = time.monotonic() + 10
        while q.status()["replicas"][2]["owed"] and time.monotonic() < end:
            time.sleep(0.05)
        st = q.status()["replicas"][2]
        assert st["owed"] == 0 and st["late"] == 1, st
        late = [e for e in q.events() if e["type"] == "late-completion"]
        assert [(e["replica"], e["offset"], e["length"]) for e in late] == [(2, 0, BS)]
    finally:
        idle.set()
        t.join()
