"""The ublk control plane through quorumblk.device: bring-up, parameters the
kernel sees, orderly and external stops, failures that leave nothing."""
import os
import threading
import time

import pytest

from conftest import MAX_IO, Served, is_blockdev, run, wait_gone

pytestmark = pytest.mark.timeout(300)


def sysfs_queue(dev_path, name):
    with open(f"/sys/block/{os.path.basename(dev_path)}/queue/{name}") as f:
        return f.read().strip()


def test_features_name_ioctl_encode():
    from quorumblk.device import feature_names, features

    mask = features()
    assert "cmd-ioctl-encode" in feature_names(mask)


def test_start_reports_live_and_stop_removes_nodes(images, serve):
    paths = images(3, 64 << 20)
    s = serve(paths, 2)
    from quorumblk.device import dev_info

    info = dev_info(s.id)
    assert info["state"] == "live"
    assert info["pid"] == s.pid
    assert info["size"] == 64 << 20
    assert info["queues"] >= 1 and info["depth"] == 128
    assert os.path.exists(s.path)
    assert run(["blockdev", "--getsize64", s.path]).stdout.strip() == str(64 << 20)
    assert run(["blockdev", "--getss", s.path]).stdout.strip() == "512"
    assert run(["blockdev", "--getpbsz", s.path]).stdout.strip() == "4096"
    assert sysfs_queue(s.path, "write_cache") == "write back"
    assert sysfs_queue(s.path, "fua") == "1"
    assert int(sysfs_queue(s.path, "max_sectors_kb")) * 1024 <= MAX_IO
    assert int(sysfs_queue(s.path, "discard_max_bytes")) > 0
    assert int(sysfs_queue(s.path, "write_zeroes_max_bytes")) > 0
    r = s.stop()
    assert r["ok"], r
    assert wait_gone(s.path) and wait_gone(f"/dev/ublkc{s.id}")
    with pytest.raises(OSError):
        dev_info(s.id)


def test_block_size_4096_queues_and_id(images, serve):
    paths = images(3, 32 << 20)
    s = serve(paths, 2, device={"block_size": 4096, "queues": 1, "depth": 16,
                                "dev_id": 7})
    assert s.id == 7 and s.path == "/dev/ublkb7"
    assert run(["blockdev", "--getss", s.path]).stdout.strip() == "4096"
    from quorumblk.device import dev_info
    info = dev_info(7)
    assert info["queues"] == 1 and info["depth"] == 16
    assert info["logical_block_size"] == 4096


def test_id_in_use_fails_and_leaves_the_first_device(images, serve):
    first = serve(images(3, 16 << 20, prefix="a"), 2, device={"dev_id": 5})
    second = Served(images(3, 16 << 20, prefix="b"), 2, device={"dev_id": 5})
    assert second.error is not None
    assert second.error["errno"] == 17, second.error      # EEXIST
    assert "in use" in second.error["error"]
    from quorumblk.device import dev_info
    assert dev_info(5)["pid"] == first.pid
    data = os.urandom(8192)
    fd = os.open(first.path, os.O_RDWR | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 8192)
        buf.write(data)
        assert os.pwritev(fd, [buf], 0) == 8192
        back = mmap.mmap(-1, 8192)
        assert os.preadv(fd, [back], 0) == 8192
        assert bytes(back) == data
    finally:
        os.close(fd)


def test_bad_block_size_is_refused_before_the_kernel(images):
    from quorumblk.device import list_ids
    before = list_ids()
    s = Served(images(3, 16 << 20), 2, device={"block_size": 1024})
    assert s.error is not None and s.error["errno"] == 22, s.error
    assert list_ids() == before


def test_external_delete_ends_the_server_wait(images, serve):
    s = serve(images(3, 16 << 20), 2)
    from quorumblk.device import delete
    done = threading.Event()
    err = []

    def deleter():
        try:
            delete(s.id)            # blocks until the server lets go
        except Exception as e:     # reported below
            err.append(e)
        done.set()

    t = threading.Thread(target=deleter, daemon=True)
    t.start()
    # the queues end (ABORT); DEL_DEV waits until the server lets go
    assert s.call("ended", timeout=60) is True
    assert not done.is_set() or err
    r = s.stop()
    assert r["ok"], r
    assert done.wait(60), "DEL_DEV from outside did not return"
    assert not err, err
    assert wait_gone(s.path)


def test_stop_during_fio_does_not_hang(images, serve):
    import subprocess
    s = serve(images(3, 64 << 20), 2)
    p = subprocess.Popen(
        ["fio", "--name=qb", f"--filename={s.path}", "--direct=1",
         "--ioengine=io_uring", "--rw=randrw", "--bs=4k", "--iodepth=32",
         "--time_based", "--runtime=300", "--size=64m",
         "--allow_file_create=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd="/tmp")     # fio cut off saves its verify state in its cwd
    try:
        # stop only once fio's I/O reaches the device (TCG starts slowly)
        end = time.monotonic() + 120
        while time.monotonic() < end and p.poll() is None:
            c = s.status()["counters"]
            if c["reads"] > 50 and c["writes"] > 50:
                break
            time.sleep(0.5)
        assert p.poll() is None, p.communicate()[0]
        t0 = time.monotonic()
        r = s.stop(timeout=120)
        assert r["ok"], r
        assert time.monotonic() - t0 < 120
        out, _ = p.communicate(timeout=120)   # fio ends: its device is gone
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0 or "err=" in out
    assert wait_gone(s.path) and wait_gone(f"/dev/ublkc{s.id}")


def test_closing_the_quorum_stops_its_device(images):
    """The queues use the quorum: closing it while a device serves stops
    the device first instead of freeing what its threads use."""
    from quorumblk import Quorum
    from quorumblk.device import DEFAULT_MAX_IO, Device

    q = Quorum(images(3, 32 << 20), 2, max_io=DEFAULT_MAX_IO)
    dev = Device.start(q, queues=1, depth=16)
    assert os.path.exists(dev.path)
    q.close()
    assert not dev.running
    assert wait_gone(dev.path) and wait_gone(dev.char_path)
