"""The NBD harness itself (tests/nbdlib.py), without the engine: each fault
does to a connection what it should, seen through a small NBD client."""
import os
import subprocess
import time

import pytest

import nbdlib
from nbdlib import Client, nbd_net  # noqa: F401 (the fixture)

SIZE = 4 << 20
KINDS = ["nbdkit", "qemu-nbd"]


def backing(tmp_path, name="b.img"):
    p = os.path.join(str(tmp_path), name)
    with open(p, "wb") as f:
        f.write(os.urandom(SIZE))
    return p


def content(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.parametrize("kind", KINDS)
def test_a_flipped_bit_in_the_backing_file_is_what_the_server_reads(nbd_net, tmp_path, kind):
    path = backing(tmp_path)
    s = nbd_net.server(path, kind)
    c = Client(s)
    assert c.size == SIZE
    before = c.read(8192, 4096)
    assert before == content(path, 8192, 4096)
    s.flip(8192 + 100, bit=3)
    after = c.read(8192, 4096)
    assert after != before and after == content(path, 8192, 4096)


@pytest.mark.parametrize("kind", KINDS)
def test_killed_server_resets_its_connection_and_starts_again_on_the_same_file(
        nbd_net, tmp_path, kind):
    path = backing(tmp_path)
    s = nbd_net.server(path, kind)
    c = Client(s)
    c.write(0, b"K" * 4096)
    pid, uri = s.pid, s.uri
    s.kill()
    assert not nbdlib._pid_alive(pid)
    with pytest.raises((ConnectionError, OSError)):
        c.read(0, 4096, timeout=10)
    assert nbdlib.tcp_answers(s.addr, nbdlib.PORT, 5) == "refused"
    s.start()
    assert s.uri == uri
    assert Client(s).read(0, 4096) == b"K" * 4096


@pytest.mark.parametrize("kind", KINDS)
def test_a_frozen_server_answers_after_it_is_thawed(nbd_net, tmp_path, kind):
    path = backing(tmp_path)
    s = nbd_net.server(path, kind)
    c = Client(s)
    s.freeze()
    c.send(nbdlib.NBD_CMD_READ, 0, 4096)
    with pytest.raises(TimeoutError):
        c.reply(4096, timeout=1.5)          # premise: nothing answers
    s.thaw()
    assert c.reply(4096, timeout=30) == content(path, 0, 4096)


@pytest.mark.parametrize("kind", KINDS)
def test_dropped_traffic_is_lost_silently_and_the_connection_resumes(nbd_net, tmp_path, kind):
    path = backing(tmp_path)
    s = nbd_net.server(path, kind)
    c = Client(s)
    assert c.read(0, 4096) == content(path, 0, 4096)
    s.drop()                                # checks: a connect times out
    c.send(nbdlib.NBD_CMD_READ, 4096, 4096)
    with pytest.raises(TimeoutError):
        c.reply(4096, timeout=3)            # premise: the request is lost
    s.restore()
    # the same connection: TCP retransmits, the answer arrives
    assert c.reply(4096, timeout=60) == content(path, 4096, 4096)
    assert c.read(0, 4096) == content(path, 0, 4096)


def test_cutting_the_existing_connections_lets_new_ones_through(nbd_net, tmp_path):
    path = backing(tmp_path)
    s = nbd_net.server(path)
    old = Client(s)
    assert old.read(0, 4096) == content(path, 0, 4096)
    s.drop()
    s.drop(existing_only=True)      # checks: a new connect gets in
    old.send(nbdlib.NBD_CMD_READ, 4096, 4096)
    with pytest.raises(TimeoutError):
        old.reply(4096, timeout=3)
    assert Client(s).read(8192, 4096) == content(path, 8192, 4096)
    s.restore()
    assert old.reply(4096, timeout=60) == content(path, 4096, 4096)


def test_a_slow_server_answers_each_read_after_its_delay(nbd_net, tmp_path):
    s = nbd_net.server(backing(tmp_path), delay_ms=30)
    c = Client(s)
    times = []
    for i in range(5):
        t0 = time.monotonic()
        c.read(i * 4096, 4096)
        times.append(time.monotonic() - t0)
    assert min(times) >= 0.030, times


def test_close_removes_servers_namespaces_and_links_whatever_their_state(tmp_path):
    why = nbdlib.missing_tools("nbdkit") or nbdlib.missing_tools("qemu-nbd")
    if why:
        pytest.skip(why)
    net = nbdlib.Net(tmp_path)
    try:
        a = net.server(backing(tmp_path, "a.img"))
        b = net.server(backing(tmp_path, "b.img"), "qemu-nbd")
        c = net.server(backing(tmp_path, "c.img"))
        a.freeze()
        b.drop()
        c.kill()
        pids = [a.pid, b.pid]
    finally:
        net.close()
    assert not any(nbdlib._pid_alive(p) for p in pids)
    names = subprocess.run(["ip", "netns", "list"], capture_output=True,
                           text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True,
                           text=True).stdout
    for s in (a, b, c):
        assert s.ns not in names
        assert s.veth_host not in links
