"""Shared helpers for the engine's host tests.

Replicas are plain files in pytest's tmp_path (the local disk, where O_DIRECT
works). Every image starts with the same pseudo-random bytes, so a read of any
block has a unanimous vote until a test corrupts one copy with os.pwrite.
"""
import os
import random

import pytest

BS = 4096                       # the default vote block
IMAGE_SIZE = 1 << 20            # 256 vote blocks: small and quick


def pattern(seed, length):
    """Deterministic bytes, different for every seed."""
    return random.Random(seed).randbytes(length)


def make_images(directory, n=3, size=IMAGE_SIZE, seed=1, names=None):
    """n identical replica images; returns their paths."""
    data = pattern(seed, size)
    paths = []
    for i in range(n):
        p = os.path.join(str(directory), names[i] if names else f"r{i}.img")
        with open(p, "wb") as f:
            f.write(data)
        paths.append(p)
    return paths


def image(path):
    with open(path, "rb") as f:
        return f.read()


def images(paths):
    return [image(p) for p in paths]


def pread(path, offset, length):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def pwrite(path, offset, data):
    """Change a replica behind the engine's back (a silent corruption)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def flip(path, offset, bit=0):
    """Flip one bit of the byte at offset in a replica image."""
    old = pread(path, offset, 1)[0]
    pwrite(path, offset, bytes([old ^ (1 << bit)]))


def changed_blocks(before, after, bs=BS):
    """Indices of the bs-sized blocks that differ between two images."""
    assert len(before) == len(after)
    return [i for i in range(0, len(before) // bs)
            if before[i * bs:(i + 1) * bs] != after[i * bs:(i + 1) * bs]]


def of_type(events, kind):
    return [e for e in events if e["type"] == kind]


@pytest.fixture
def imgs(tmp_path):
    """Three identical 1 MiB replicas."""
    return make_images(tmp_path)


def _tmpfs_images(tmp_path):
    import shutil
    import tempfile
    if not os.path.isdir("/dev/shm"):
        yield make_images(tmp_path)
        return
    d = tempfile.mkdtemp(prefix="qbtest-", dir="/dev/shm")
    try:
        yield make_images(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def tmpfs_imgs(tmp_path):
    """Three identical 1 MiB replicas in RAM (/dev/shm) when there is one."""
    yield from _tmpfs_images(tmp_path)


@pytest.fixture(params=["tmpfs", "disk"])
def media_imgs(request, tmp_path):
    """Three identical 1 MiB replicas, once in RAM (/dev/shm: the engine
    copies in its own thread there) and once on the local disk (O_DIRECT
    through io_uring): timing, fault and race tests run on both paths. RAM
    also keeps a disk busy with someone's benchmark from failing healthy
    replicas against a short replica timeout."""
    if request.param == "disk":
        yield make_images(tmp_path)
    else:
        yield from _tmpfs_images(tmp_path)


@pytest.fixture
def open_quorum():
    """Open a Quorum; everything opened is closed at teardown."""
    from quorumblk import Quorum

    opened = []

    def _open(paths, threshold, **kw):
        q = Quorum(paths, threshold, **kw)
        opened.append(q)
        return q

    yield _open
    for q in opened:
        q.close()
