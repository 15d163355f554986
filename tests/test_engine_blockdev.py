"""Replicas that are block devices (loop devices over files), as on a real
deployment: size from the device, the same device twice refused, discard and
write-zeroes through fallocate on a device, corruption outvoted and repaired.
Needs root and losetup; skipped otherwise, saying why."""
import errno
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import BS, IMAGE_SIZE, make_images, of_type, pattern, pread
from quorumblk import InvalidArgumentError, Quorum


def _why_not():
    if os.geteuid() != 0:
        return "loop devices need root"
    if not shutil.which("losetup"):
        return "losetup (util-linux) is not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (loop module not loaded)"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None,
                                reason=_why_not() or "")


def attach(files, *extra):
    devs = []
    try:
        for f in files:
            out = subprocess.run(["losetup", "-f", "--show", *extra, f],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode != 0:
                pytest.skip(f"losetup failed: {out.stderr.strip()}")
            devs.append(out.stdout.strip())
        yield devs
    finally:
        for d in devs:
            subprocess.run(["losetup", "-d", d], timeout=30)


@pytest.fixture
def loops(tmp_path):
    """Three loop devices over three identical images; detached after."""
    yield from attach(make_images(tmp_path))


@pytest.fixture
def loops_4k(tmp_path):
    """The same with 4096-byte logical sectors (a 4Kn disk)."""
    yield from attach(make_images(tmp_path), "--sector-size", "4096")


def dev_read(dev, off=0, length=IMAGE_SIZE):
    return pread(dev, off, length)


def dev_write(dev, off, data):
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_vote_over_block_devices(loops, open_quorum):
    good = dev_read(loops[0])
    dev_write(loops[1], 7 * BS + 3, b"\xff\x00\xff")
    q = open_quorum(loops, 2)
    assert q.size == IMAGE_SIZE
    assert q.read(4 * BS, 8 * BS) == good[4 * BS:12 * BS]
    bad = of_type(q.events(), "bad-block")
    assert [(e["replica"], e["offset"]) for e in bad] == [(1, 7 * BS)]
    assert dev_read(loops[1]) == good
    new = pattern(3, 2 * BS)
    q.write(0, new, fua=True)
    q.flush()
    assert all(dev_read(d, 0, 2 * BS) == new for d in loops)


def test_same_block_device_twice(loops, tmp_path):
    link = str(tmp_path / "dev-link")
    os.symlink(loops[0], link)
    with pytest.raises(InvalidArgumentError) as ei:
        Quorum([loops[0], loops[1], link], 2)
    assert loops[0] in str(ei.value) and link in str(ei.value)


@pytest.mark.parametrize("op", ["discard", "write_zeroes"])
def test_zeros_on_block_devices(loops, open_quorum, op):
    good = dev_read(loops[0])
    q = open_quorum(loops, 2)
    getattr(q, op)(BS, 6 * BS)
    want = good[:BS] + bytes(6 * BS) + good[7 * BS:]
    for d in loops:
        assert dev_read(d) == want, d
    assert q.read(0, 8 * BS) == want[:8 * BS]


def test_file_and_device_sizes_must_agree(loops, tmp_path, open_quorum):
    (tmp_path / "other").mkdir()
    f = make_images(tmp_path / "other", n=1, size=IMAGE_SIZE // 2)[0]
    with pytest.raises(InvalidArgumentError) as ei:
        open_quorum([loops[0], loops[1], f], 2)
    assert str(IMAGE_SIZE) in str(ei.value)
    assert str(IMAGE_SIZE // 2) in str(ei.value)


def test_io_below_the_replicas_sector_size_is_refused(loops_4k, open_quorum):
    """On replicas with 4 KiB logical sectors, O_DIRECT I/O must be 4 KiB
    aligned. A 512-byte request is the caller's error: InvalidArgumentError
    naming the alignment, every replica stays in service, nothing written;
    it must not fail the replicas one by one until the device is gone."""
    good = dev_read(loops_4k[0])
    q = open_quorum(loops_4k, 2)
    for call in (lambda: q.read(512, 512), lambda: q.write(512, b"x" * 512),
                 lambda: q.read(BS, 512), lambda: q.discard(512, 512)):
        with pytest.raises(InvalidArgumentError) as ei:
            call()
        assert ei.value.errno == errno.EINVAL
        assert "4096" in str(ei.value)
    st = q.status()
    assert [r["state"] for r in st["replicas"]] == ["in-service"] * 3
    assert all(dev_read(d) == good for d in loops_4k)
    # aligned I/O works
    assert q.read(BS, 2 * BS) == good[BS:3 * BS]
    q.write(BS, b"y" * BS)
    assert all(dev_read(d, BS, BS) == b"y" * BS for d in loops_4k)


def test_a_new_set_on_block_devices_takes_only_a_zeroed_tail(loops_4k):
    """A block device cannot grow: quorumblk's metadata takes its tail,
    which must hold nothing (never overwritten), and the device is that
    much smaller. 4 KiB sectors: the bitmap and header writes are aligned."""
    from quorumblk import meta
    with pytest.raises(meta.SetError, match="hold data"):
        meta.assemble(loops_4k, 2)
    assert meta.read(loops_4k[0]) == (None, None)     # nothing was written
    good = dev_read(loops_4k[0])
    tail = 64 << 10
    for d in loops_4k:
        with open(d, "r+b") as f:
            f.seek(IMAGE_SIZE - tail)
            f.write(bytes(tail))
    plan = meta.assemble(loops_4k, 2)
    q = Quorum(loops_4k, 2)
    q.set_meta(plan.metas, plan.bitmap)
    assert IMAGE_SIZE - tail <= q.size < IMAGE_SIZE and q.size % 4096 == 0
    q.write(BS, b"y" * BS)
    assert len(bits_of(q.bitmap())) == 1
    assert q.read(0, BS) == good[:BS]
    q.close()
    assert all(dev_read(d, BS, BS) == b"y" * BS for d in loops_4k)


def bits_of(bitmap):
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] & (1 << (i % 8))]


def test_files_beside_block_devices_keep_the_same_data_size(loops, tmp_path):
    """Image files of the devices' size do not grow when devices share the
    set: every replica gives the same tail to the metadata."""
    from quorumblk import meta
    (tmp_path / "f").mkdir()
    f = make_images(tmp_path / "f", n=1)[0]
    for p in (loops[0], loops[1], f):
        with open(p, "r+b") as out:
            out.seek(IMAGE_SIZE - (64 << 10))
            out.write(bytes(64 << 10))
    plan = meta.assemble([loops[0], loops[1], f], 2)
    assert os.path.getsize(f) == IMAGE_SIZE
    q = Quorum([loops[0], loops[1], f], 2)
    q.set_meta(plan.metas, plan.bitmap)
    assert IMAGE_SIZE - (64 << 10) <= q.size < IMAGE_SIZE
    q.write(0, b"m" * BS)
    q.close()
    assert pread(f, 0, BS) == dev_read(loops[0], 0, BS) == b"m" * BS


def test_many_chunks_in_flight_overflow_nothing(tmp_path, open_quorum):
    """Devices that take 64 KiB at most unsplit (loop devices here): a 1 MiB
    request is 16 chunks per replica, 128 requests in flight are 6144
    replica I/Os, more than the completion queue holds. None is lost, none
    fails, and every byte is where it belongs. The device is larger than
    what is in flight, so no two requests in flight overlap (overlapping
    writes in flight may land in either order on each replica, as on any
    disk)."""
    size = 256 << 20
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"big{i}.img"))
        with open(files[-1], "wb") as f:
            f.truncate(size)
    gen = attach(files)
    devs = next(gen)
    try:
        for d in devs:
            name = os.path.basename(os.path.realpath(d))
            with open(f"/sys/block/{name}/queue/max_sectors_kb", "w") as f:
                f.write("64")
        q = open_quorum(devs, 2)
        res = q.bench("write", bs=1 << 20, depth=128, count=256)
        assert res["errors"] == 0 and res["ops"] == 256
        res = q.bench("read", bs=1 << 20, depth=128, count=256)
        assert res["errors"] == 0 and res["ops"] == 256
        assert q.status()["counters"]["bad_blocks"] == 0
        assert q.replica_states() == ["in-service"] * 3
        data = pattern(5, 1 << 20)
        q.write(3 << 20, data)
        assert q.read(3 << 20, 1 << 20) == data
        assert dev_read(devs[2], 3 << 20, 1 << 20) == data
        q.close()
    finally:
        gen.close()


def test_a_block_device_replica_is_never_read_in_thread(loops, tmp_path):
    """/dev is a devtmpfs, so a device node's file system is tmpfs: the
    engine took loop and dm devices for files in RAM and did their I/O as
    blocking copies in the queue thread, where a hung device stopped every
    request (found in the VM by the device campaign, seed 24: a suspended
    replica held flushes, FUA writes and reads until it came back). Only a
    regular file in RAM is copied in-thread; a device goes on io_uring,
    under the replica timeout."""
    q = Quorum(loops, 2)
    try:
        assert [r["io"] for r in q.status()["replicas"]] == ["io_uring"] * 3
    finally:
        q.close()
    shm = tempfile.mkdtemp(prefix="qbtest-", dir="/dev/shm")
    try:
        q = Quorum(make_images(shm), 2)
        assert [r["io"] for r in q.status()["replicas"]] == ["in-thread"] * 3
        q.close()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
