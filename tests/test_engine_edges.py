"""Edges: offsets beyond 4 GiB, a device size that is not a multiple of the
vote block, and closing a quorum while another thread is doing I/O."""
import os
import subprocess
import sys

from conftest import BS, flip, image, images, of_type, pattern, pread, pwrite

GiB = 1 << 30


def test_offsets_beyond_4_gib(tmp_path, open_quorum):
    size = 5 * GiB
    paths = []
    for i in range(3):
        p = str(tmp_path / f"big{i}.img")
        with open(p, "wb") as f:
            f.truncate(size)            # sparse
        paths.append(p)
    off = 4 * GiB + 123 * BS
    q = open_quorum(paths, 2)
    assert q.size == size
    new = pattern(4, 4 * BS)
    q.write(off, new)
    for p in paths:
        assert pread(p, off, 4 * BS) == new
    flip(paths[2], off + BS + 1)
    assert q.read(off, 4 * BS) == new
    bad = of_type(q.events(), "bad-block")
    assert [(e["replica"], e["offset"]) for e in bad] == [(2, off + BS)]
    assert pread(paths[2], off, 4 * BS) == new
    q.discard(off, BS)
    assert q.read(off, BS) == bytes(BS)
    assert q.read(size - BS, BS) == bytes(BS)


def test_discard_and_write_zeroes_longer_than_4_gib(tmp_path, open_quorum):
    """The engine's lengths are 32-bit; a longer range must still be done
    whole (split), not refused or cut short."""
    size = 5 * GiB
    paths = []
    for i in range(3):
        p = str(tmp_path / f"big{i}.img")
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(p)
    q = open_quorum(paths, 2)
    marks = [0, GiB, 4 * GiB + 8 * BS, size - BS]
    for op in ("discard", "write_zeroes"):
        for m in marks:
            q.write(m, b"\x5a" * BS)
        getattr(q, op)(0, size)
        for m in marks:
            assert q.read(m, BS) == bytes(BS), (op, m)
            for p in paths:
                assert pread(p, m, BS) == bytes(BS), (op, p, m)
        for p in paths:
            assert os.path.getsize(p) == size


def test_size_not_a_multiple_of_the_vote_block(tmp_path, open_quorum):
    from conftest import make_images
    size = 10 * BS + 3 * 512
    paths = make_images(tmp_path, size=size)
    good = image(paths[0])
    flip(paths[1], size - 100)           # in the last, short vote block
    q = open_quorum(paths, 2)
    assert q.size == size
    assert q.read(10 * BS, 3 * 512) == good[10 * BS:]
    bad = of_type(q.events(), "bad-block")
    assert [(e["replica"], e["offset"], e["length"]) for e in bad] == \
        [(1, 10 * BS, 3 * 512)]
    assert images(paths) == [good] * 3
    flip(paths[0], size - 1)
    assert q.read(0, size) == good
    assert images(paths) == [good] * 3
    q.write_zeroes(10 * BS, 3 * 512)
    assert all(img[10 * BS:] == bytes(3 * 512) for img in images(paths))


CLOSE_UNDER_IO = r"""
import sys, threading, time, tempfile
sys.path.insert(0, {tests!r})
from conftest import make_images
from quorumblk import Quorum, QuorumError
d = tempfile.mkdtemp(dir={tmp!r})
p = make_images(d)
q = Quorum(p, 2)
started = threading.Event()
outcome = []

def worker():
    n = 0
    try:
        while True:
            q.read((n % 200) * 4096, 4 * 4096)
            q.write((n % 200) * 4096, bytes(4096))
            n += 1
            started.set()
    except QuorumError as e:
        outcome.append(e.errno)

t = threading.Thread(target=worker)
t.start()
started.wait(10)
time.sleep(0.05)
q.close()
t.join(10)
assert not t.is_alive(), "the worker hangs after close"
print("ok", outcome)
"""


def test_close_while_another_thread_does_io(tmp_path):
    """close() while another thread is inside a request: the other thread
    gets an error (or finishes) and nothing crashes (a child process, so a
    crash is a failure and not the end of the test run)."""
    code = CLOSE_UNDER_IO.format(
        tests=os.path.dirname(os.path.abspath(__file__)), tmp=str(tmp_path))
    for _ in range(3):
        run = subprocess.run([sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=120,
                             cwd=str(tmp_path),
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                 p for p in sys.path if p)))
        assert run.returncode == 0 and run.stdout.startswith("ok"), \
            (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
