"""NBD exports as replicas, on the host (no VM, no kernel nbd module): the
engine talks to nbdkit and qemu-nbd servers that each test starts over
files in its tmp directory and kills at teardown. The vote, repair, flush
and FUA, write-zeroes (offered or not), the metadata over NBD, readd after
a server was killed and restarted, a server frozen past the timeout that
answers late, destroying contexts with a frozen server, and every refusal
at open. Servers here are on Unix sockets and 127.0.0.1; servers in network
namespaces with traffic dropped are tests/test_nbd_net.py's."""
import gc
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import flip, pattern
from quorumblk import assembly, errors, lifecycle, meta, replica
from quorumblk.core import Quorum

BS = 4096
SIZE = 16 << 20
SERVER_START_S = 20.0       # a server's socket appears within this
WAIT_S = 30.0               # generous bound for anything awaited

pytestmark = pytest.mark.skipif(
    not shutil.which("nbdkit") or not shutil.which("qemu-nbd"),
    reason="nbdkit and qemu-nbd are needed (scripts/setup installs them)")


class Server:
    """One NBD server over a backing file: nbdkit's file plugin (or
    qemu-nbd), on a Unix socket or on 127.0.0.1."""

    def __init__(self, tmp, name, size=SIZE, *, filters=(), readonly=False,
                 tcp=False, program="nbdkit", export=None, sockdir=None):
        self.file = str(tmp / f"{name}.img")
        # a socket's path has 108 bytes at most: not under a deep tmp_path
        self.sock = os.path.join(sockdir or str(tmp), f"{name}.sock")
        self.log = str(tmp / f"{name}.log")
        self.filters = list(filters)
        self.readonly = readonly
        self.program = program
        self.export = export
        self.port = free_port() if tcp else None
        self.proc = None
        with open(self.file, "wb") as f:
            f.truncate(size)

    @property
    def uri(self):
        name = self.export or ""
        if self.port:
            return f"nbd://127.0.0.1:{self.port}/{name}"
        return f"nbd+unix:///{name}?socket={self.sock}"

    def command(self):
        if self.program == "qemu-nbd":
            cmd = ["qemu-nbd", "-f", "raw", "--cache=none", "--aio=threads",
                   "-x", self.export or "", "-e", "8", "-t"]
            cmd += ["-p", str(self.port), "-b", "127.0.0.1"] if self.port \
                else ["-k", self.sock]
            return cmd + (["-r"] if self.readonly else []) + [self.file]
        cmd = ["nbdkit", "-f", "--exit-with-parent"]
        cmd += ["-i", "127.0.0.1", "-p", str(self.port)] if self.port \
            else ["-U", self.sock]
        cmd += ["-r"] if self.readonly else []
        for f in self.filters + ["log"]:
            cmd.append(f"--filter={f.split()[0]}")
        cmd += ["file", f"file={self.file}", "cache=none", f"logfile={self.log}",
                "logappend=true"]
        for f in self.filters:
            cmd += f.split()[1:]
        return cmd

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + SERVER_START_S
        while not self.answers():
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            assert time.monotonic() < deadline, f"{self.command()} did not start"
            time.sleep(0.02)
        return self

    def answers(self):
        s = socket.socket(socket.AF_INET if self.port else socket.AF_UNIX)
        try:
            s.connect(("127.0.0.1", self.port) if self.port else self.sock)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def signal(self, sig):
        self.proc.send_signal(sig)

    def freeze(self):
        """SIGSTOP, and wait until every thread of the server is stopped (a
        signal is delivered asynchronously: a command sent right after
        could still be served)."""
        self.proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: all(self._state(t) in "Tt" for t in
                             os.listdir(f"/proc/{self.proc.pid}/task")),
                 "the server did not stop")

    def _state(self, tid):
        try:
            with open(f"/proc/{self.proc.pid}/task/{tid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return "T"      # a thread that ended serves nothing

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()        # also a stopped one, which serves nothing
            self.proc.wait(WAIT_S)

    def logged(self, what):
        """Lines of the server's log for command what (Write, Flush, ...)."""
        try:
            with open(self.log) as f:
                return [ln for ln in f if f" {what} " in ln]
        except FileNotFoundError:
            return []

    def data(self, offset, length):
        with open(self.file, "rb") as f:
            f.seek(offset)
            return f.read(length)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def sockdir(request):
    """A short directory for Unix sockets, removed at teardown."""
    d = tempfile.mkdtemp(prefix="qbnbd-")
    request.addfinalizer(lambda: shutil.rmtree(d, ignore_errors=True))
    return d


@pytest.fixture
def server(tmp_path, sockdir, request):
    """A factory of started servers, all killed at teardown."""
    made = []
    request.addfinalizer(lambda: [s.kill() for s in made])

    def make(name, **kw):
        s = Server(tmp_path, name, sockdir=sockdir, **kw)
        made.append(s)
        return s.start()
    return make


@pytest.fixture
def three(server):
    return [server(n) for n in "abc"]


def wait_for(cond, what, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def with_meta(uris, threshold=2, **kw):
    """What `add` does without the device (assembly.prepare)."""
    plan = meta.assemble(uris, threshold)
    q = Quorum(uris, threshold, events_per_sec=0, **kw)
    meta.commit(uris, plan)
    q.set_meta(plan.metas, plan.bitmap)
    meta.resync(q, plan)
    return q


# -- data --

def test_three_nbd_replicas_read_write(three):
    uris = [s.uri for s in three]
    with Quorum(uris, 2, timeout=5) as q:
        assert q.size == SIZE
        data = pattern(1, 64 * BS)
        q.write(BS, data)
        assert q.read(BS, len(data)) == data
        st = q.status()
    for s in three:         # every export got every write
        assert s.data(BS, len(data)) == data
    for s, r in zip(three, st["replicas"]):
        assert (r["kind"], r["server"], r["state"]) == ("nbd", s.sock, "in-service")
        assert r["writes"] == 1 and r["errors"] == 0


def test_tcp_export_and_qemu_nbd(server):
    """nbd://host:port/export, served by qemu-nbd (O_DIRECT) and nbdkit."""
    a = server("a", program="qemu-nbd", tcp=True, export="disk")
    b = server("b", tcp=True)
    c = server("c", program="qemu-nbd", export="disk")
    with Quorum([a.uri, b.uri, c.uri], 2, timeout=5) as q:
        q.write(0, pattern(2, 8 * BS), fua=True)
        q.flush()
        assert q.read(0, 8 * BS) == pattern(2, 8 * BS)
        st = q.status()["replicas"]
    assert st[0]["server"] == f"127.0.0.1:{a.port}"
    assert a.data(0, 8 * BS) == c.data(0, 8 * BS) == pattern(2, 8 * BS)


def test_writes_larger_than_the_socket_takes(three):
    """A 1 MiB write does not fit a socket's buffer: libnbd sends the rest
    when the ring says the socket is writable again (POLLOUT)."""
    big = pattern(20, 1 << 20)
    with Quorum([s.uri for s in three], 2, timeout=5) as q:
        q.write(0, big)
        assert q.read(0, len(big)) == big
        res = q.bench(op="write", bs=1 << 20, depth=8, count=64)
        assert res["errors"] == 0
        assert q.replica_states() == ["in-service"] * 3
    assert three[0].data(0, 8 << 20) == three[1].data(0, 8 << 20) == \
        three[2].data(0, 8 << 20)


def test_mixed_set_two_files_one_export(tmp_path, server):
    files = []
    for n in "xy":
        p = tmp_path / f"{n}.img"
        with open(p, "wb") as f:
            f.truncate(SIZE)
        files.append(str(p))
    s = server("n")
    with Quorum(files + [s.uri], 2, timeout=5) as q:
        q.write(0, pattern(3, 16 * BS))
        assert q.read(0, 16 * BS) == pattern(3, 16 * BS)
        kinds = [r["kind"] for r in q.status()["replicas"]]
    assert kinds == ["file", "file", "nbd"]
    assert s.data(0, 16 * BS) == pattern(3, 16 * BS)


def test_bit_flip_on_a_server_outvoted_reported_repaired(three):
    uris = [s.uri for s in three]
    with Quorum(uris, 2, timeout=5) as q:
        q.write(0, pattern(4, 32 * BS))
        q.flush()
        flip(three[1].file, 5 * BS + 17, bit=3)     # below the server
        assert three[1].data(5 * BS, BS) != pattern(4, 32 * BS)[5 * BS:6 * BS]
        assert q.read(0, 32 * BS) == pattern(4, 32 * BS)
        events = q.events()
        r1 = q.status()["replicas"][1]
    bad = [e for e in events if e["type"] == "bad-block"]
    assert [(e["path"], e["offset"]) for e in bad] == [(uris[1], 5 * BS)]
    assert [e["path"] for e in events if e["type"] == "repaired"] == [uris[1]]
    assert (r1["bad_blocks"], r1["repairs"]) == (1, 1)
    # the repair landed on the server's file
    assert three[1].data(0, 32 * BS) == pattern(4, 32 * BS)


def test_flush_and_fua_reach_the_export(three):
    with Quorum([s.uri for s in three], 2, timeout=5) as q:
        q.write(0, pattern(5, BS), fua=True)
        q.flush()
        reps = q.status()["replicas"]
    for s, r in zip(three, reps):
        assert r["flushes"] == 1
        assert len(s.logged("Flush")) == 1
        assert any("fua=1" in ln for ln in s.logged("Write"))
        assert r["offers"]["flush"] and r["offers"]["fua"]


def test_without_multi_conn_every_write_is_fua(server):
    """A flush on one connection does not cover another's writes unless the
    export says multi-conn: then each write is made durable by itself."""
    s = [server(n, filters=["multi-conn multi-conn-mode=disable"]) for n in "abc"]
    with Quorum([x.uri for x in s], 2, timeout=5) as q:
        assert not q.status()["replicas"][0]["offers"]["multi_conn"]
        q.write(0, pattern(6, BS))
        q.write_zeroes(BS, BS)
    writes = s[0].logged("Write")
    assert writes and all("fua=1" in ln for ln in writes)
    zeroes = s[0].logged("Zero")
    assert zeroes and all("fua=1" in ln for ln in zeroes)


def test_write_zeroes_and_discard_where_offered(three):
    with Quorum([s.uri for s in three], 2, timeout=5) as q:
        q.write(0, pattern(7, 8 * BS))
        q.write_zeroes(0, 2 * BS)
        q.discard(4 * BS, 2 * BS)
        got = q.read(0, 8 * BS)
    want = bytearray(pattern(7, 8 * BS))
    want[0:2 * BS] = bytes(2 * BS)
    want[4 * BS:6 * BS] = bytes(2 * BS)
    assert got == want
    for s in three:
        assert len(s.logged("Zero")) == 2
        assert s.data(0, 8 * BS) == want


def test_zeros_written_where_the_export_cannot(server):
    s = [server(n, filters=["nozero zeromode=none"]) for n in "abc"]
    with Quorum([x.uri for x in s], 2, timeout=5) as q:
        assert not q.status()["replicas"][0]["offers"]["write_zeroes"]
        q.write(0, pattern(8, 4 * BS))
        q.write_zeroes(0, 2 * BS)
        q.discard(2 * BS, BS)
        assert q.read(0, 4 * BS) == bytes(3 * BS) + pattern(8, 4 * BS)[3 * BS:]
    for x in s:
        assert not x.logged("Zero") and not x.logged("Trim")
        assert x.data(0, 3 * BS) == bytes(3 * BS)


def test_eio_faults_apply_and_io_uring_faults_are_refused(three):
    with Quorum([s.uri for s in three], 2, timeout=5) as q:
        q.inject(0, "eio", ops=("read",))
        q.write(0, pattern(9, BS))
        assert q.read(0, BS) == pattern(9, BS)
        assert q.replica_states()[0] == "failed"
        with pytest.raises(errors.InvalidArgumentError) as e:
            q.inject(1, "hang")
        assert str(e.value).startswith(
            f"fault: replica 1 ({three[1].uri}) is an NBD export: only EIO "
            "faults can be injected there")


# -- metadata --

def test_metadata_on_exports(three):
    uris = [s.uri for s in three]
    q = with_meta(uris)
    try:
        assert q.size < SIZE        # an export cannot grow: the data shrinks
        q.write(0, pattern(10, BS))
        q.flush()
        for u in uris:
            m, _ = meta.read(u)
            assert m is not None and m.data_size == q.size
        bits = bytes(q.bitmap())
        assert bits[0] & 1          # the write's region is marked
    finally:
        q.close()
    # what the engine wrote is what meta.read finds on each server
    assert meta.assemble(uris, 2, write=False).stale == []


def test_scrub_repairs_a_flip_no_read_touched(three):
    uris = [s.uri for s in three]
    q = with_meta(uris)
    try:
        q.write(0, pattern(19, 64 * BS))
        q.flush()
        flip(three[0].file, 40 * BS + 1)
        job = lifecycle.Lifecycle(q).scrub()
        wait_for(lambda: job.state != "running", "scrub")
        res = job.to_dict()["result"]
        assert res["bad_blocks"] == {uris[0]: 1} and res["repaired"] == 1
    finally:
        q.close()
    assert three[0].data(0, 64 * BS) == pattern(19, 64 * BS)


def test_export_with_data_in_its_tail_is_refused(three):
    """An export cannot grow: the metadata goes in its tail, which must be
    zeros (read from the server)."""
    with open(three[2].file, "r+b") as f:
        f.seek(SIZE - 3 * BS)
        f.write(b"data")
    with pytest.raises(meta.SetError) as e:
        meta.assemble([s.uri for s in three], 2, write=False)
    assert str(e.value).startswith(f"{three[2].uri}: its last ")
    assert "hold data, and quorumblk keeps its metadata there" in str(e.value)


def test_replica_kinds_and_servers():
    assert replica.server("nbd://srv/disk") == "srv:10809"
    assert replica.server("nbd://10.0.0.2:10810/disk") == "10.0.0.2:10810"
    assert replica.server("nbd://[::1]:7000/x") == "[::1]:7000"
    assert replica.server("nbd+unix:///disk?socket=/run/s.sock") == "/run/s.sock"
    assert replica.server("/var/img") is None
    assert replica.kind("nbd+unix:///?socket=/x") == "nbd"
    assert replica.absolute("nbd://srv/disk") == "nbd://srv/disk"
    assert replica.identity("nbd://srv/disk") == "nbd://srv/disk"


def test_export_too_small_for_a_new_member_is_refused(three, server):
    uris = [s.uri for s in three]
    small = server("small", size=SIZE // 2)
    q = with_meta(uris)
    try:
        life = lifecycle.Lifecycle(q)
        with pytest.raises(meta.SetError) as e:
            life.add_replica(small.uri)
        assert str(e.value).startswith(f"{small.uri}: {SIZE // 2} bytes, too small")
    finally:
        q.close()


def test_readd_after_server_killed_and_restarted(three):
    uris = [s.uri for s in three]
    q = with_meta(uris, timeout=3)
    try:
        q.write(0, pattern(11, 4 * BS))
        three[2].kill()
        q.write(BS, pattern(12, BS))            # the replica fails now
        assert q.replica_states()[2] == "failed"
        assert q.status()["replicas"][2]["owed"] == 0   # nothing held
        q.write(8 << 20, pattern(13, BS))       # missed: another region
        three[2].start()
        life = lifecycle.Lifecycle(q)
        job = life.readd(2)
        wait_for(lambda: job.state != "running", "readd")
        d = job.to_dict()
        assert d["state"] == "done", d
        assert d["total_bytes"] < q.size        # only what was missed
        assert q.replica_states()[2] == "in-service"
        q.write(2 * BS, pattern(14, BS))        # the new connection works
        size = q.size
    finally:
        q.close()
    a = three[0].data(0, size)
    assert three[1].data(0, size) == a and three[2].data(0, size) == a


def test_frozen_server_times_out_answers_late_then_readd(three):
    uris = [s.uri for s in three]
    q = with_meta(uris, timeout=1)
    try:
        q.write(0, pattern(15, BS))
        three[2].freeze()
        t0 = time.monotonic()
        q.write(BS, pattern(16, BS))
        took = time.monotonic() - t0
        assert took < 1 + 3.0, took         # the timeout, not the server
        r2 = q.status()["replicas"][2]
        assert (r2["state"], r2["owed"] > 0, r2["timeouts"] > 0) == \
            ("failed", True, True)
        # a rejoin while it does not answer: refused within the timeout
        with pytest.raises(OSError) as e:
            q.attach(uris[2], q.header(2))
        assert str(e.value).startswith(
            f"replica {uris[2]}: the server did not answer within 1000 ms")
        three[2].signal(signal.SIGCONT)
        wait_for(lambda: q.status()["replicas"][2]["owed"] == 0, "late answer")
        assert q.status()["replicas"][2]["late"] > 0
        late = [e for e in q.events() if e["type"] == "late-completion"]
        assert late and all(e["path"] == uris[2] for e in late)
        life = lifecycle.Lifecycle(q)
        job = life.readd(2)
        wait_for(lambda: job.state != "running", "readd")
        assert job.to_dict()["state"] == "done"
        assert job.to_dict()["total_bytes"] < q.size
        size = q.size
    finally:
        three[2].signal(signal.SIGCONT)
        q.close()
    assert three[2].data(0, size) == three[0].data(0, size)


def test_frozen_server_metadata_write_times_out_and_answers_late(three):
    """The metadata writer's own connection: a bitmap write to a frozen
    server is abandoned at the timeout (the replica fails, the write goes on
    with the others), and its late answer is counted."""
    uris = [s.uri for s in three]
    q = with_meta(uris, timeout=1)
    try:
        three[1].freeze()
        t0 = time.monotonic()
        q.write(8 << 20, pattern(21, BS))   # a new region: its bit first
        assert time.monotonic() - t0 < 1 + 3.0
        r1 = q.status()["replicas"][1]
        assert (r1["state"], r1["owed"], r1["timeouts"]) == ("failed", 1, 1)
        assert r1["writes"] == 0            # its data write was never sent
        three[1].signal(signal.SIGCONT)
        wait_for(lambda: q.status()["replicas"][1]["owed"] == 0, "late answer")
        assert q.status()["replicas"][1]["late"] == 1
    finally:
        three[1].signal(signal.SIGCONT)
        q.close()


def test_add_checks_a_set_of_exports(three):
    """What `quorumblk add` checks before anything is written, with URIs:
    nothing stats them, and a new set is planned over them."""
    uris = [s.uri for s in three]
    plan, msgs = assembly.check_set(uris, 2, {"timeout": 5})
    assert plan.created and msgs == []
    assert [meta.read(u)[0] for u in uris] == [None] * 3    # nothing written


def test_frozen_then_killed_server_owes_nothing(three):
    """A command abandoned on a frozen server, then the server dies: libnbd
    fails what the dead connection had out, and the replica owes nothing
    (it can rejoin once the server is back)."""
    q = Quorum([s.uri for s in three], 2, timeout=1)
    try:
        q.write(0, pattern(22, BS))
        three[2].freeze()
        q.write(0, pattern(23, BS))
        assert q.status()["replicas"][2]["owed"] == 1
        three[2].kill()
        wait_for(lambda: q.status()["replicas"][2]["owed"] == 0,
                 "a dead connection's command still owed")
        late = [e for e in q.events() if e["type"] == "late-completion"]
        assert len(late) == 1 and late[0]["errno"] is not None  # failed
    finally:
        q.close()


def _ended_thread_writes(q, server, first, second):
    """A thread writes first (its context connects), then, with server
    frozen, second: that server's command is abandoned at the timeout. The
    thread then ends and its context is destroyed."""
    connected, frozen = threading.Event(), threading.Event()
    before = len(q._ctxs)

    def run():
        q.write(0, first)
        connected.set()
        frozen.wait(WAIT_S)
        q.write(0, second)
    t = threading.Thread(target=run)
    t.start()
    assert connected.wait(WAIT_S)
    server.freeze()
    frozen.set()
    t.join(WAIT_S)
    assert not t.is_alive()
    gc.collect()
    wait_for(lambda: len(q._ctxs) == before, "the thread's context lives on")


def test_context_destroyed_with_a_frozen_server_does_not_hang(three):
    """A thread's context ends with a command out on a frozen server: the
    end does not wait for it, the command stays owed (the server may still
    perform it), and closing the quorum does not wait either."""
    q = Quorum([s.uri for s in three], 2, timeout=1)
    try:
        t0 = time.monotonic()
        _ended_thread_writes(q, three[0], pattern(17, BS), pattern(18, BS))
        assert time.monotonic() - t0 < 1 + 3.0     # the timeout, no more
        r0 = q.status()["replicas"][0]
        assert (r0["owed"], r0["late"]) == (1, 0)
        done = threading.Event()

        def close():
            q.close()
            done.set()
        t0 = time.monotonic()
        threading.Thread(target=close).start()
        assert done.wait(WAIT_S), "close hung on the frozen server"
        assert time.monotonic() - t0 < 2.0
    finally:
        three[0].signal(signal.SIGCONT)


@pytest.mark.parametrize("length", [BS, 1 << 20])
def test_a_write_owed_by_a_thread_that_ended_lands_late_then_readd(three,
                                                                   length):
    """The ended context's abandoned write is still on its way to the
    frozen server (1 MiB: more than the socket takes, the rest is sent once
    the server reads again): it is owed until the server performs it, which
    counts as late; only then can the replica rejoin, and the resync puts
    the newest data over that stale write."""
    uris = [s.uri for s in three]
    q = with_meta(uris, timeout=1)
    try:
        _ended_thread_writes(q, three[2], pattern(41, length),
                             pattern(42, length))
        assert q.replica_states()[2] == "failed"
        q.write(0, pattern(43, length))     # newer than the stale write
        r2 = q.status()["replicas"][2]
        assert (r2["owed"], r2["late"]) == (1, 0)
        assert three[2].data(0, length) == pattern(41, length)  # not yet
        three[2].signal(signal.SIGCONT)
        wait_for(lambda: q.status()["replicas"][2]["owed"] == 0,
                 "the ended context's write still owed")
        assert q.status()["replicas"][2]["late"] == 1
        assert three[2].data(0, length) == pattern(42, length)  # it landed
        late = [e for e in q.events() if e["type"] == "late-completion"]
        assert len(late) == 1 and late[0]["errno"] is None
        job = lifecycle.Lifecycle(q).readd(2)
        wait_for(lambda: job.state != "running", "readd")
        assert job.to_dict()["state"] == "done", job.to_dict()
    finally:
        three[2].signal(signal.SIGCONT)
        q.close()
    assert [s.data(0, length) for s in three] == [pattern(43, length)] * 3


def test_a_write_owed_by_an_idle_thread_lands_while_it_stays_idle(three):
    """A thread's 1 MiB write to a frozen server is abandoned (more than the
    socket takes: the rest of the payload waits), then the thread stays out
    of the engine. Once the server runs again, the other threads send the
    rest and take the answer: owed returns to 0 while that thread is still
    idle."""
    q = Quorum([s.uri for s in three], 2, timeout=1)
    length = 1 << 20
    connected, frozen, written, finish = (threading.Event() for _ in range(4))

    def run():
        q.write(0, pattern(61, length))
        connected.set()
        frozen.wait(WAIT_S)
        q.write(0, pattern(62, length))     # replica 2's is abandoned
        written.set()
        finish.wait(WAIT_S)
    t = threading.Thread(target=run)
    try:
        t.start()
        assert connected.wait(WAIT_S)
        three[2].freeze()
        frozen.set()
        assert written.wait(WAIT_S)
        r2 = q.status()["replicas"][2]
        assert (r2["owed"], r2["late"]) == (1, 0)
        three[2].signal(signal.SIGCONT)
        wait_for(lambda: q.status()["replicas"][2]["owed"] == 0,
                 "an idle thread's write still owed")
        assert t.is_alive() and not finish.is_set()     # idle all along
        assert q.status()["replicas"][2]["late"] == 1
        assert three[2].data(0, length) == pattern(62, length)
    finally:
        finish.set()
        if t.is_alive():
            t.join(WAIT_S)
        three[2].signal(signal.SIGCONT)
        q.close()


def test_policy_threshold_reads_around_a_slow_server(server):
    """One server of three 30 ms slower to read (nbdkit's delay filter, as
    a network delay would be): with read policy threshold the reads go to
    the two that answer first, the slow one is only read now and then (to
    measure it again)."""
    slow = server("c", filters=["delay rdelay=30ms"])
    servers = [server("a"), server("b"), slow]
    q = Quorum([s.uri for s in servers], 2, read_policy="threshold",
               timeout=5)
    try:
        data = pattern(51, 64 * BS)
        q.write(0, data)
        took = []
        for i in range(150):
            off = (i % 64) * BS
            t0 = time.monotonic()
            assert q.read(off, BS) == data[off:off + BS]
            took.append(time.monotonic() - t0)
        assert max(took) >= 0.03        # the premise: it is that slow
        assert statistics.median(took) < 0.01, statistics.median(took)
        n = [r["reads"] for r in q.counters()[1]]
        assert 2 <= n[2] < min(n[0], n[1]) / 4, n
    finally:
        q.close()


# -- refusals at open --

def refused(uris, **kw):
    with pytest.raises(OSError) as e:
        Quorum(uris, 2, **kw)
    return str(e.value)


def test_refused_server_that_does_not_answer(sockdir, three):
    mute = socket.socket(socket.AF_UNIX)    # accepts, never speaks
    path = os.path.join(sockdir, "mute.sock")
    mute.bind(path)
    mute.listen(8)
    uri = f"nbd+unix:///?socket={path}"
    try:
        t0 = time.monotonic()
        msg = refused([three[0].uri, three[1].uri, uri], timeout=1)
        assert time.monotonic() - t0 < 1 + 3.0
    finally:
        mute.close()
    assert msg.startswith(f"replica {uri}: the server did not answer within 1000 ms")


def test_refused_no_server(sockdir, three):
    uri = f"nbd+unix:///?socket={sockdir}/none.sock"
    msg = refused([three[0].uri, three[1].uri, uri], timeout=5)
    assert msg.startswith(f"replica {uri}: cannot connect: ")
    assert "ENOENT" in msg or "No such file" in msg


def test_refused_export_that_does_not_exist(server, three):
    s = server("named", program="qemu-nbd", export="disk")
    uri = f"nbd+unix:///other?socket={s.sock}"
    msg = refused([three[0].uri, three[1].uri, uri], timeout=5)
    assert msg.startswith(f"replica {uri}: cannot connect: ")
    assert "other" in msg


def test_refused_size_that_differs(server, three):
    s = server("big", size=2 * SIZE)
    msg = refused([three[0].uri, three[1].uri, s.uri], timeout=5)
    assert msg.startswith(f"replica sizes differ: {three[0].uri}: {SIZE} bytes, "
                          f"{three[1].uri}: {SIZE} bytes, {s.uri}: {2 * SIZE} bytes")


def test_refused_read_only_export(server, three):
    s = server("ro", readonly=True)
    msg = refused([three[0].uri, three[1].uri, s.uri], timeout=5)
    assert msg.startswith(f"replica {s.uri}: the export is read-only")


@pytest.mark.parametrize("uri,why", [
    ("nbd://[::1/x", "cannot connect: "),
    ("nbds://127.0.0.1/x", "not a supported NBD URI"),
    ("nbd+vsock:///x", "not a supported NBD URI"),
])
def test_refused_uri(three, uri, why):
    msg = refused([three[0].uri, three[1].uri, uri], timeout=5)
    assert msg.startswith(f"replica {uri}: {why}")


def test_same_export_twice_refused(three):
    msg = refused([three[0].uri, three[1].uri, three[1].uri], timeout=5)
    assert msg.startswith(f"{three[1].uri} and {three[1].uri} are the same replica")
