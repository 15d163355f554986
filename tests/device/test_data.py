"""Data through /dev/ublkbN: file systems, fio verify, silent corruption
outvoted and repaired, no-quorum reads, a replica failing under load, QEMU
using the device as a raw disk. Replicas are sparse images in /dev/shm."""
import hashlib
import mmap
import os
import tempfile
import random
import re
import subprocess
import time

import pytest

from conftest import differing_blocks, drop_caches, make_sparse, run

pytestmark = pytest.mark.timeout(900)

BS = 4096


# ---- helpers ----

def write_tree(top, seed, files=48, max_size=384 << 10):
    """A tree of files with random contents; returns {relative path: sha256}."""
    rnd = random.Random(seed)
    sums = {}
    for i in range(files):
        rel = os.path.join(f"d{i % 5}", f"s{i % 3}", f"f{i}.bin")
        path = os.path.join(top, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        size = rnd.choice([0, 1, 511, 4096, 4097, 65536]) if i < 8 else \
            rnd.randrange(1, max_size)
        data = rnd.randbytes(size)
        with open(path, "wb") as f:
            f.write(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def tree_sums(top, names):
    out = {}
    for rel in names:
        h = hashlib.sha256()
        with open(os.path.join(top, rel), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[rel] = h.hexdigest()
    return out


def mkfs(fs, dev):
    if fs == "ext4":
        # no lazy init: nothing writes behind the test's back later
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E",
             "lazy_itable_init=0,lazy_journal_init=0", dev])
    else:
        run(["mkfs.xfs", "-q", "-f", dev])


def fsck(fs, dev):
    if fs == "ext4":
        return run(["e2fsck", "-fn", dev], check=False)
    return run(["xfs_repair", "-n", dev], check=False)


def replicas_identical(paths):
    for p in paths[1:]:
        r = run(["cmp", paths[0], p], check=False, timeout=600)
        assert r.returncode == 0, f"{p} differs from {paths[0]}: {r.stdout}"


def aligned(n):
    return mmap.mmap(-1, max(n, mmap.PAGESIZE))


def direct_read(dev, offset, length):
    """One O_DIRECT read; raises OSError (EIO) as the device answers."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = aligned(length)
        n = os.preadv(fd, [memoryview(buf)[:length]], offset)
        assert n == length
        return bytes(buf[:length])
    finally:
        os.close(fd)


def direct_write(dev, offset, data):
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        for pos in range(0, len(data), 1 << 20):
            chunk = data[pos:pos + (1 << 20)]
            buf = aligned(len(chunk))
            buf.write(chunk)
            assert os.pwritev(fd, [memoryview(buf)[:len(chunk)]],
                              offset + pos) == len(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


def flip_bit(path, offset, bit):
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, offset)[0]
        os.pwrite(fd, bytes([old ^ (1 << bit)]), offset)
    finally:
        os.close(fd)


def file_blocks(path):
    """Device byte offsets of a file's data blocks (filefrag's extents, in
    the file system's block size: 4096 as made here)."""
    out = run(["filefrag", "-v", path]).stdout
    unit = int(re.search(r"blocks? of (\d+) bytes", out).group(1))
    assert unit == BS, out
    offsets = []
    for m in re.finditer(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):",
                         out, re.M):
        first, last = int(m.group(1)), int(m.group(2))
        for blk in range(first, last + 1):
            offsets.append(blk * unit)
    return offsets


def covered(events, offset):
    return any(e["offset"] <= offset < e["offset"] + e["length"]
               for e in events)


def fio(dev, *args, timeout=900, check=True):
    cmd = ["fio", "--name=qb", f"--filename={dev}", "--direct=1",
           "--ioengine=io_uring", "--group_reporting",
           "--allow_file_create=0", *args]
    # fio leaves a verify state file in its working directory: not the checkout
    return run(cmd, check=check, timeout=timeout, cwd=tempfile.gettempdir())


# ---- file systems ----

@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_filesystem_tree_survives_remount(fs, images, serve, scratch):
    paths = images(3, 384 << 20)          # xfs wants 300 MB at least
    s = serve(paths, 2)
    mnt = os.path.join(scratch, "mnt")
    os.makedirs(mnt)
    mkfs(fs, s.path)
    run(["mount", s.path, mnt])
    try:
        sums = write_tree(mnt, seed={"ext4": 1, "xfs": 2}[fs])
        run(["sync"])
    finally:
        run(["umount", mnt])
    drop_caches()
    run(["mount", s.path, mnt])
    try:
        assert tree_sums(mnt, sums) == sums
    finally:
        run(["umount", mnt])
    r = fsck(fs, s.path)
    assert r.returncode == 0, f"{fs} check found problems:\n{r.stdout}\n{r.stderr}"
    st = s.status()
    assert all(rep["state"] == "in-service" for rep in st["replicas"])
    assert st["counters"]["quorum_failures"] == 0
    assert s.stop()["ok"]
    assert not s.all_events, s.all_events
    replicas_identical(paths)


# ---- fio on the raw device ----

FIO_CASES = {
    "512": ["--bs=512", "--io_size=2m"],
    "4k": ["--bs=4k", "--io_size=16m"],
    "64k": ["--bs=64k", "--io_size=48m"],
    "512k": ["--bs=512k", "--io_size=64m"],
    "1m-split": ["--bs=1m", "--io_size=64m"],
    "mixed": ["--bssplit=4k/40:16k/20:128k/30:512k/10", "--io_size=48m"],
}


@pytest.mark.parametrize("case", list(FIO_CASES))
def test_fio_verify_random_writes(case, images, serve):
    paths = images(3, 64 << 20)
    s = serve(paths, 2)
    job = ["--rw=randwrite", "--size=64m", "--iodepth=16",
           "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
           "--randseed=4242", *FIO_CASES[case]]
    r = fio(s.path, *job)
    assert "err= 0" in r.stdout, r.stdout
    assert s.stop()["ok"]
    replicas_identical(paths)
    # a fresh server over the same images reads back what was verified
    s2 = serve(paths, 2)
    r = fio(s2.path, *job, "--verify_only")
    assert "err= 0" in r.stdout, r.stdout
    assert s2.stop()["ok"]
    assert not s.all_events + s2.all_events


def test_fio_verify_mixed_read_write_threshold_policy(images, serve):
    paths = images(3, 64 << 20)
    s = serve(paths, 2, quorum={"read_policy": "threshold"})
    r = fio(s.path, "--rw=randrw", "--rwmixread=50", "--size=32m",
            "--io_size=32m", "--bs=4k", "--iodepth=32", "--verify=crc32c",
            "--verify_fatal=1", "--verify_backlog=256", "--randseed=7")
    assert "err= 0" in r.stdout, r.stdout
    assert s.stop()["ok"]
    replicas_identical(paths)


# ---- silent corruption ----

def test_bitflips_in_one_replica_are_outvoted_reported_and_repaired(
        images, serve, scratch):
    paths = images(3, 128 << 20)
    s = serve(paths, 2, quorum={"events_per_sec": 0})
    mnt = os.path.join(scratch, "mnt")
    os.makedirs(mnt)
    mkfs("ext4", s.path)
    run(["mount", "-o", "noatime", s.path, mnt])
    try:
        sums = write_tree(mnt, seed=99, files=40, max_size=256 << 10)
        run(["sync"])
        blocks = []
        owner = {}
        for rel in sums:
            for off in file_blocks(os.path.join(mnt, rel)):
                blocks.append(off)
                owner[off] = rel
        assert len(blocks) > 200
        rnd = random.Random(5)
        flips = []
        for off in rnd.sample(blocks, 64):
            flips.append(off + rnd.randrange(BS))
        flips += [flips[0] + 1, flips[1] + 7]      # a block with two flips
        for off in flips:
            flip_bit(paths[1], off, rnd.randrange(8))
        bad = sorted({off - off % BS for off in flips})
        assert differing_blocks(paths[0], paths[1]) == bad
        drop_caches()
        assert tree_sums(mnt, sums) == sums
        # every corrupted block was read through the vote
        events = s.events()
        bad_events = [e for e in events if e["type"] == "bad-block"]
        assert bad_events, events
        assert {e["replica"] for e in bad_events} == {1}, bad_events
        assert {e["path"] for e in bad_events} == {paths[1]}
        # each flipped byte lies in a reported range (requests, and so
        # votes, need not be 4 KiB aligned)
        missing = [off for off in flips if not covered(bad_events, off)]
        if missing:
            still = differing_blocks(paths[0], paths[1])
            near = [e for e in events
                    if any(abs(e["offset"] - m) < (1 << 20) for m in missing)]
            raise AssertionError(
                f"no bad-block event for flipped bytes {missing} (files "
                f"{[owner.get(m) for m in missing]}, sizes "
                f"{[os.path.getsize(os.path.join(mnt, owner[m])) for m in missing if m in owner]}); "
                f"blocks still differing: {still}; events near: {near}")
        stray = [e for e in bad_events
                 if not any(e["offset"] <= off < e["offset"] + e["length"]
                            for off in flips)]
        assert not stray, f"events for blocks that were not corrupted: {stray}"
        repaired = [e for e in events if e["type"] == "repaired"]
        assert repaired and {e["replica"] for e in repaired} == {1}
        assert not [e for e in events if e["type"] in
                    ("quorum-failure", "replica-failed", "replica-error")]
    finally:
        run(["umount", mnt])
    st = s.status()
    assert st["replicas"][1]["state"] == "in-service"
    assert st["counters"]["bad_blocks"] >= len(bad)
    # repaired: the replica's bytes match the others again
    replicas_identical(paths)
    r = fsck("ext4", s.path)
    assert r.returncode == 0, r.stdout


def test_two_replicas_corrupted_differently_fail_that_block_only(
        images, serve, scratch):
    size = 16 << 20
    paths = images(3, size)
    s = serve(paths, 2, quorum={"events_per_sec": 0})
    data = random.Random(3).randbytes(size)
    direct_write(s.path, 0, data)
    target = (5 << 20) + 3 * BS
    flip_bit(paths[0], target + 100, 2)
    flip_bit(paths[1], target + 2000, 5)
    before = [open(p, "rb").read() for p in paths]
    drop_caches()
    with pytest.raises(OSError) as e:
        direct_read(s.path, target, BS)
    assert e.value.errno == 5                      # EIO, not wrong data
    with pytest.raises(OSError) as e:              # a request spanning it
        direct_read(s.path, target - 8 * BS, 64 << 10)
    assert e.value.errno == 5
    # everything else reads fine, in 64 KiB requests and block by block
    # around the bad one
    chunk = 64 << 10
    for off in range(0, size, chunk):
        if off <= target < off + chunk:
            for b in range(off, off + chunk, BS):
                if b != target:
                    assert direct_read(s.path, b, BS) == data[b:b + BS]
        else:
            assert direct_read(s.path, off, chunk) == data[off:off + chunk]
    # page cache reads: the same answer, never different bytes
    drop_caches()
    fd = os.open(s.path, os.O_RDONLY)
    try:
        for b in range(target - 4 * BS, target + 5 * BS, BS):
            if b == target:
                with pytest.raises(OSError):
                    os.pread(fd, BS, b)
            else:
                assert os.pread(fd, BS, b) == data[b:b + BS]
    finally:
        os.close(fd)
    # nothing was written anywhere because of it
    after = [open(p, "rb").read() for p in paths]
    assert after == before
    events = s.events()
    qf = [e for e in events if e["type"] == "quorum-failure"]
    assert qf and all(covered([e], target) for e in qf), events
    assert not [e for e in events if e["type"] == "repaired"]


# ---- a replica that starts failing under load ----

def test_replica_on_dm_error_fails_under_load_device_serves_on(
        images, dm_replica, serve):
    size = 64 << 20
    paths = images(2, size)
    dm = dm_replica(size)
    paths.append(dm.path)
    s = serve(paths, 2, quorum={"timeout": 5.0})
    cmd = ["fio", "--name=qb", f"--filename={s.path}", "--direct=1",
           "--ioengine=io_uring", "--rw=randwrite", "--bs=4k",
           "--allow_file_create=0",
           "--size=64m", "--io_size=48m", "--iodepth=16",
           "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
           "--randseed=11"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, cwd="/tmp")     # its verify state file
    try:
        end = time.monotonic() + 120        # until fio's writes flow
        while time.monotonic() < end and p.poll() is None and \
                s.status()["counters"]["writes"] < 500:
            time.sleep(0.5)
        assert p.poll() is None, "fio finished before the replica failed"
        dm.error()
        assert p.poll() is None, "fio finished before the replica failed"
        out, _ = p.communicate(timeout=850)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out
    assert "err= 0" in out, out
    st = s.status()
    assert [r["state"] for r in st["replicas"]] == \
        ["in-service", "in-service", "failed"], st
    events = s.events()
    failed = [e for e in events if e["type"] == "replica-failed"]
    assert failed and {e["replica"] for e in failed} == {2}, events
    # the device serves on with the other two
    data = os.urandom(1 << 20)
    direct_write(s.path, 8 << 20, data)
    drop_caches()
    assert direct_read(s.path, 8 << 20, 1 << 20) == data
    assert s.stop()["ok"]
    replicas_identical(paths[:2])


# ---- QEMU's view: a raw disk ----

QEMU_WRITES = [("0x5a", 0, "1M"), ("0xa5", 1 << 20, "64k"),
               ("0x11", 10 << 20, "4k"), ("0x22", 20 << 20, "512k"),
               ("0x33", (32 << 20) - 512, "512")]


def qemu_io(target, cmds, cache="none"):
    args = ["qemu-io", "-f", "raw", "-t", cache]
    for c in cmds:
        args += ["-c", c]
    r = run(args + [target], check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    return out


def test_qemu_raw_disk_writes_and_reads_patterns(images, serve, scratch):
    size = 64 << 20
    paths = images(3, size)
    s = serve(paths, 2)
    ref = make_sparse(os.path.join(scratch, "ref.raw"), size)
    writes = [f"write -P {p} {off} {n}" for p, off, n in QEMU_WRITES]
    writes += [f"aio_write -P 0x44 {48 << 20} 256k", "aio_flush", "flush"]
    reads = [f"read -P {p} {off} {n}" for p, off, n in QEMU_WRITES]
    reads += [f"read -P 0x44 {48 << 20} 256k", f"read -P 0 {40 << 20} 1M"]
    qemu_io(s.path, writes)
    qemu_io(ref, writes, cache="writeback")
    drop_caches()
    out = qemu_io(s.path, reads)
    assert out.count("read ") >= len(reads)
    r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", s.path, ref])
    assert "identical" in r.stdout, r.stdout
    assert s.stop()["ok"]
    replicas_identical(paths)
