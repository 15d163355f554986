"""Device tests: a real /dev/ublkbN over replica images, in a kernel with ublk.

scripts/test-device runs this suite inside a VM booting Debian's 6.12
kernel (tests/device/run-in-vm.sh sets QB_DEVICE_SUITE=1), or on a host
whose kernel has ublk. Where neither is possible every test is skipped with
the reason printed; inside the VM nothing is ever skipped: a missing piece
is a failure.

Each device is served by a child process (tests/device/qbserver.py) driving
quorumblk.device and quorumblk.core, as the daemon would. Replica images are
sparse files in /dev/shm (tmpfs: O_DIRECT works, unlike the 9p share).
"""
import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.append(os.path.dirname(HERE))          # tests/, for torturelib
from torturelib import dm  # noqa: E402
SERVER = os.path.join(HERE, "qbserver.py")
SCRATCH = os.environ.get("QB_DEVICE_SCRATCH", "/dev/shm/qb-device-tests")
IN_SUITE = os.environ.get("QB_DEVICE_SUITE") == "1"
MAX_IO = 512 << 10


def _unavailable():
    """Why device tests cannot run here, or None."""
    if os.environ.get("QB_DEVICE_NO_VM"):
        return "no ublk here and no VM: " + os.environ["QB_DEVICE_NO_VM"]
    try:
        from quorumblk.device import ublk_available
    except ImportError as e:
        return f"quorumblk.device does not import: {e}"
    ok, why = ublk_available(load=os.geteuid() == 0)
    if ok:
        return None
    return (why + "; run scripts/test-device, which boots a VM with Debian's "
            "6.12 kernel for these tests")


def pytest_collection_modifyitems(config, items):
    # long campaigns (test_torture.py) run only when named: deselected, not
    # skipped, so that a suite run never reports a test it did not mean to run
    if "torture_long" not in (config.getoption("keyword") or ""):
        long = [i for i in items if "torture_long" in i.name]
        if long:
            config.hook.pytest_deselected(items=long)
            items[:] = [i for i in items if i not in long]
    why = _unavailable()
    if why is None:
        return
    device_items = [i for i in items if str(i.fspath).startswith(HERE)]
    if IN_SUITE:
        # inside the VM a missing ublk is a failure, never a skip
        for item in device_items:
            item.add_marker(pytest.mark.usefixtures("_ublk_required"))
        config._qb_why = why
        return
    print(f"\ndevice tests skipped: {why}", file=sys.stderr)
    for item in device_items:
        item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def _ublk_required(request):
    pytest.fail("ublk is required inside the device VM: "
                + getattr(request.config, "_qb_why", "unavailable"))


# ---- helpers ----

def run(cmd, check=True, timeout=300, **kw):
    """Run a command (list or shell string); on failure the assertion shows
    its output."""
    shell = isinstance(cmd, str)
    p = subprocess.run(cmd, shell=shell, capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {p.returncode}\n"
                             f"stdout:\n{p.stdout[-4000:]}\n"
                             f"stderr:\n{p.stderr[-4000:]}")
    return p


def make_sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def drop_caches():
    run("sync")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def file_chunks(path, chunk=1 << 20):
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return
            yield b


def differing_blocks(a, b, bs=4096):
    """Offsets of the bs blocks where files a and b differ."""
    out = []
    pos = 0
    for ca, cb in zip(file_chunks(a), file_chunks(b)):
        if ca != cb:
            for i in range(0, len(ca), bs):
                if ca[i:i + bs] != cb[i:i + bs]:
                    out.append(pos + i)
        pos += len(ca)
    assert os.path.getsize(a) == os.path.getsize(b)
    return out


def is_blockdev(path):
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def wait_gone(path, timeout=10.0):
    end = time.monotonic() + timeout
    while os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.05)
    return not os.path.exists(path)


class Served:
    """A device served by a qbserver child. events() accumulates: it returns
    every event seen since the start."""

    def __init__(self, paths, threshold, quorum=None, device=None, recover=None):
        self.paths = list(paths)
        self.all_events = []
        self.stopped = False
        self.proc = subprocess.Popen(
            [os.path.join(ROOT, ".venv", "bin", "python"), SERVER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            bufsize=1)
        cfg = {"paths": self.paths, "threshold": threshold,
               "quorum": dict({"max_io": MAX_IO}, **(quorum or {})),
               "device": device or {}, "recover": recover}
        self.proc.stdin.write(json.dumps(cfg) + "\n")
        self.proc.stdin.flush()
        hello = self._read()
        if not hello.get("ok"):
            self.proc.wait(timeout=30)
            self.stopped = True
            self.error = hello
            return
        self.error = None
        self.id = hello["id"]
        self.path = hello["path"]
        self.pid = hello["pid"]
        self.info = hello

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(
                f"device server exited (status {self.proc.poll()})")
        return json.loads(line)

    def call(self, cmd, **args):
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        if not r.get("ok"):
            raise AssertionError(f"server {cmd}: {r}")
        return r["result"]

    def events(self):
        self.all_events += self.call("events")
        return list(self.all_events)

    def status(self):
        return self.call("status")

    def stop(self, timeout=120):
        """Orderly stop; returns the server's final answer."""
        if self.stopped:
            return None
        self.stopped = True
        self.proc.stdin.write(json.dumps({"cmd": "stop"}) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        self.all_events += r.pop("events", [])
        assert self.proc.wait(timeout=timeout) == 0
        return r

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)
        self.stopped = True


@pytest.fixture(autouse=True)
def _no_stale_nodes():
    """A program that opened /dev/ublkbN after the device went away may have
    created a regular file there, which would hide the next device's node."""
    for name in os.listdir("/dev"):
        path = os.path.join("/dev", name)
        if name.startswith(("ublkb", "ublkc")) and os.path.isfile(path):
            os.unlink(path)
    yield


@pytest.fixture
def scratch(request):
    """A fresh folder in /dev/shm for this test's replica images."""
    d = os.path.join(SCRATCH, request.node.name[:80])
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serve():
    """serve(paths, threshold, quorum={...}, device={...}, recover=N) ->
    Served, LIVE (recover: a new server for the quiesced device N). Every
    device still up at teardown is stopped (and its mounts undone)."""
    started = []

    def _serve(paths, threshold, quorum=None, device=None, recover=None):
        s = Served(paths, threshold, quorum, device, recover)
        if s.error:
            raise AssertionError(f"device did not start: {s.error}")
        started.append(s)
        assert is_blockdev(s.path), f"{s.path} is not a block device once LIVE"
        return s

    yield _serve
    for s in started:
        if not s.stopped:
            run(f"umount -l {s.path} 2>/dev/null; true", check=False)
            try:
                s.stop()
            except Exception:
                s.kill()


@pytest.fixture
def images(scratch):
    """images(n, size) -> n sparse replica images of size bytes."""
    def _images(n=3, size=256 << 20, prefix="r"):
        return [make_sparse(os.path.join(scratch, f"{prefix}{i}.img"), size)
                for i in range(n)]
    return _images


class DmReplica(dm.DmReplica):
    """A replica block device for fault injection (tests/torturelib/dm.py
    switches its tables: linear, error, flakey, bad ranges, suspended with
    its I/O held as a hung server holds it): device-mapper over a loop
    device over a sparse file in the test's scratch folder."""

    def __init__(self, scratch, name, size):
        file = make_sparse(os.path.join(scratch, f"{name}.img"), size)
        loop = run(["losetup", "-f", "--show", file]).stdout.strip()
        super().__init__(name, file, loop, size // 512)
        run(["dmsetup", "create", name, "--table", self.linear()])

    def delay(self, ms):
        """dm-delay: every read and write held ms milliseconds."""
        self.swap(f"0 {self.sectors} delay {self.loop} 0 {ms}")

    def bad_blocks(self, blocks, block_size=4096):
        """These blocks fail every I/O (EIO), the rest works: a table of
        dm-linear pieces with dm-error ones between them (Debian's kernel
        has no dm-dust)."""
        per = block_size // 512
        lines, at = [], 0
        for b in sorted(blocks):
            if b * per > at:
                lines.append(self.linear(at, b * per - at))
            lines.append(f"{b * per} {per} error")
            at = (b + 1) * per
        if at < self.sectors:
            lines.append(self.linear(at))
        self.swap("\n".join(lines))

    def resume(self):
        """The end of suspend(): the held I/O goes on, into the same table."""
        run(["dmsetup", "resume", self.name])


_dm_names = itertools.count()


@pytest.fixture
def dm_replica(scratch):
    """dm_replica(size) -> a DmReplica, removed at teardown. Names are never
    reused in a run: one a failed test could not remove stays its own."""
    made = []

    def _make(size):
        d = DmReplica(scratch, f"qbdm{os.getpid()}_{next(_dm_names)}", size)
        made.append(d)
        return d

    yield _make
    for d in made:
        d.remove()
