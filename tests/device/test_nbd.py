"""NBD exports as replicas under a real /dev/ublkbN: three nbdkit servers
that the test starts over images in its scratch folder (on Unix sockets),
the engine their client in the device's queue threads. Data written
through the device lands on every export, a bit flipped on one server is
outvoted and repaired there, and the device stops cleanly."""
import os
import signal
import subprocess
import time

import pytest

from conftest import make_sparse
from test_data import direct_read, direct_write

pytestmark = pytest.mark.timeout(600)

SIZE = 64 << 20
BS = 4096


@pytest.fixture
def exports(scratch, request):
    """Three nbdkit servers over sparse images: [(uri, image path)]."""
    procs, out = [], []
    request.addfinalizer(lambda: [(p.send_signal(signal.SIGKILL), p.wait(60))
                                  for p in procs if p.poll() is None])
    for i in range(3):
        img = make_sparse(os.path.join(scratch, f"n{i}.img"), SIZE)
        sock = os.path.join(scratch, f"n{i}.sock")
        procs.append(subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-U", sock, "file",
             f"file={img}", "cache=none"], stderr=subprocess.PIPE))
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert procs[-1].poll() is None, procs[-1].stderr.read()
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.05)
        out.append((f"nbd+unix:///?socket={sock}", img))
    return out


def read_image(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_device_over_three_exports(exports, serve):
    uris = [u for u, _ in exports]
    s = serve(uris, 2)
    data = os.urandom(4 << 20)
    direct_write(s.path, 0, data)
    assert direct_read(s.path, 0, len(data)) == data
    for _, img in exports:
        assert read_image(img, 0, len(data)) == data
    # a flipped bit on one server's image: outvoted, repaired there
    img = exports[1][1]
    fd = os.open(img, os.O_RDWR)
    try:
        old = os.pread(fd, 1, 5 * BS + 9)[0]
        os.pwrite(fd, bytes([old ^ 0x10]), 5 * BS + 9)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert direct_read(s.path, 0, 8 * BS) == data[:8 * BS]
    ev = s.events()
    assert [e["path"] for e in ev if e["type"] == "bad-block"] == [uris[1]]
    assert read_image(img, 0, 8 * BS) == data[:8 * BS]
    reps = s.status()["replicas"]
    assert [r["kind"] for r in reps] == ["nbd"] * 3
    assert [r["state"] for r in reps] == ["in-service"] * 3
    s.stop()
