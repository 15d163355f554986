"""The device mode's worker: the same lanes, protocol and commands as
worker.Worker, over a real /dev/ublkbN served by the quorumblk daemon.

- The set is made with `quorumblk add` (or, after the campaign killed the
  daemon, brought back with `quorumblk recover`); every replica change and
  job goes through the command too (readd, replace, add-replica,
  remove-replica, scrub), and status through the daemon's control socket.
- Operations are system calls on the block device, opened O_DIRECT, from
  page-aligned buffers: preadv, pwritev (RWF_DSYNC for FUA), fsync and
  fdatasync (flush), and for discard and write-zeroes the ioctls
  BLKDISCARD and BLKZEROOUT or fallocate (PUNCH_HOLE, ZERO_RANGE), in turn.
- Faults are the storage's own: the replicas are dm devices (dm.py) whose
  table turns to dm-error (eio; writes only: dm-flakey; a range: bad
  sectors or the metadata tail), which are suspended with their I/O held
  (hang, and late: held past the replica timeout, then released), and a
  replica is failed by turning it to dm-error and reading until the daemon
  takes it out.
- What the daemon does on its own is left to it: it cleans the
  write-intent bitmap of regions idle for a while, so "clean" waits for that.
"""
import ctypes
import errno
import fcntl
import itertools
import json
import mmap
import os
import struct
import subprocess
import sys
import threading
import time

from quorumblk import QuorumError, lifecycle, runtime, server

from .dm import DmSet
from .worker import JobFailed, Worker

BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
CLI_LIMIT = 300.0           # seconds a quorumblk command may take

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)


class DeviceError(QuorumError):
    """The device could not be made or brought back."""


def fallocate(fd, mode, offset, length):
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class DeviceWorker(Worker):
    def __init__(self, config, out):
        super().__init__(config, out)
        self.dm = DmSet.load(config["workdir"])
        self.dev_id = None
        self.dev_path = None
        self.daemon_pid = None
        self.fd = None
        self.buffers = threading.local()
        self.turn = itertools.count()       # which system call a flush or zeroing uses
        self.events_at = 0                  # bytes of the events file counted

    # -- the device --
    def cli(self, *args):
        """Run `quorumblk ARGS`; (exit status, stdout lines, stderr)."""
        try:
            p = subprocess.run([sys.executable, "-m", "quorumblk", *args],
                               capture_output=True, text=True, timeout=CLI_LIMIT)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"quorumblk {' '.join(args)} did not end in "
                               f"{CLI_LIMIT:.0f} s") from None
        sys.stderr.write(f"quorumblk {' '.join(args)}: exit {p.returncode}\n{p.stderr}")
        return p.returncode, p.stdout.splitlines(), p.stderr.strip()

    def open(self):
        c = self.cfg
        if c.get("dev_id") is not None:
            args = ("recover", "--json", str(c["dev_id"]))
        else:
            args = ("add", "--json", "-t", str(c["threshold"]), "--timeout",
                    str(c["timeout"]), "--read-policy", c["read_policy"], *c["paths"])
        rc, out, err = self.cli(*args)
        if rc != 0:
            raise DeviceError(errno.EIO, f"quorumblk {args[0]}: exit {rc}: {err}")
        info = json.loads(out[-1])
        self.dev_id, self.dev_path, self.daemon_pid = info["id"], info["path"], info["pid"]
        if c.get("dev_id") is not None:     # count only this daemon's events
            self.events_at = os.path.getsize(runtime.events_path(self.dev_id))
        self.fd = os.open(self.dev_path, os.O_RDWR | os.O_DIRECT)
        return self.daemon_status().get("resync")

    def ready(self):
        return {"dev_id": self.dev_id, "dev_path": self.dev_path,
                "daemon_pid": self.daemon_pid}

    def wait_resync(self):
        """After `recover` the daemon resyncs as a job while it serves: wait
        until no resync job runs (its end, as the daemon's job says, or None
        if none ran)."""
        deadline = time.monotonic() + CLI_LIMIT
        while True:
            job = self.daemon_status().get("job") or {}
            if job.get("kind") != "resync":
                return None
            if job.get("state") != "running":
                return {k: job.get(k) for k in ("state", "error", "error_type")}
            if time.monotonic() > deadline:
                raise TimeoutError(f"the daemon's resync did not end in {CLI_LIMIT:.0f} s "
                                   f"({job.get('percent')}% done)")
            time.sleep(0.1)

    def daemon_status(self):
        return runtime.request(self.dev_id, "status")["status"]

    def view(self):
        reps = self.daemon_status()["replicas"]
        return {"paths": [r["path"] for r in reps], "states": [r["state"] for r in reps]}

    def state(self, path):
        for r in self.daemon_status()["replicas"]:
            if r["path"] == path and r["state"] != "removed":
                return r["state"]
        raise LookupError(f"{path} is not a replica of the running set")

    def served(self):
        try:
            with open(runtime.events_path(self.dev_id)) as f:
                f.seek(self.events_at)
                text = f.read()
        except FileNotFoundError:
            text = ""
        text = text[:text.rfind("\n") + 1]
        self.events_at += len(text.encode())
        events = [json.loads(line) for line in text.splitlines() if line.strip()]
        return self.daemon_status(), events, self.daemon_pid

    def close(self):
        os.close(self.fd)
        self.cli("del", str(self.dev_id))

    # -- operations --
    def buffer(self):
        if not hasattr(self.buffers, "map"):
            self.buffers.map = mmap.mmap(-1, self.cfg["max_io"])
        return memoryview(self.buffers.map)

    def _call(self, kind, offset, length, data, version):
        try:
            return self._syscall(kind, offset, length, data)
        except OSError as e:
            raise QuorumError(e.errno, f"{kind} at {offset} length {length}: "
                              f"{e.strerror}") from None

    def _syscall(self, kind, offset, length, data):
        fd = self.fd
        if kind == "read":
            buf = self.buffer()[:length]
            done = os.preadv(fd, [buf], offset)
            if done != length:
                raise OSError(errno.EIO, f"short read: {done} bytes")
            return bytes(buf)
        if kind in ("write", "write-fua"):
            buf = self.buffer()[:length]
            buf[:] = data
            done = os.pwritev(fd, [buf], offset, os.RWF_DSYNC if kind == "write-fua" else 0)
            if done != length:
                raise OSError(errno.EIO, f"short write: {done} bytes")
            return None
        odd = next(self.turn) % 2
        if kind == "flush":
            (os.fdatasync if odd else os.fsync)(fd)
        elif kind == "discard":
            if odd:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            else:
                fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, length))
        elif kind == "write-zeroes":
            if odd:
                fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            else:
                fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        else:
            return super()._call(kind, offset, length, data, 0)
        return None

    def nudge(self):
        """The daemon's queues reap late completions themselves."""

    # -- replica changes through the command --
    def run_job(self, kind, *args):
        rc, out, err = self.cli(kind, "--json", str(self.dev_id), *args)
        results = [json.loads(line) for line in out if line.startswith("{")]
        job = results[-1] if results and results[-1].get("type") == "result" else {}
        if job.get("state") == "done":
            return job["result"]
        error_type = job.get("error_type") or "CommandError"
        text = f"{kind} failed (exit {rc}): {job.get('error') or err}"
        if error_type == "OwedError" or "owes" in text:
            raise lifecycle.OwedError(text)
        raise JobFailed(text, error_type)

    def remove(self, path):
        rc, out, err = self.cli("remove-replica", "--json", str(self.dev_id), path)
        if rc != 0:
            raise JobFailed(f"remove-replica failed (exit {rc}): {err}", "CommandError")
        return json.loads(out[-1])

    # -- faults: the storage's own --
    def provoke(self, path, seconds):
        """Read through the device until the daemon has taken path out of
        service (a read reaches every replica with the policy "all", a
        rotating threshold of them with "threshold"). True if it did."""
        buf = mmap.mmap(-1, 4096)
        size = self.cfg["size"]
        end = time.monotonic() + seconds
        for k in itertools.count():
            if self.state(path) != "in-service":
                return True
            if time.monotonic() > end:
                return False
            try:
                os.preadv(self.fd, [buf], (k * 7919 * 4096) % size)
            except OSError:
                pass

    def fail(self, path):
        dm = self.dm.get(path)
        dm.error()
        try:
            if not self.provoke(path, self.timeout * 4 + 5):
                raise RuntimeError(f"{path} on dm-error stayed in service")
        finally:
            dm.heal()

    def clear_fault(self, path):
        self.dm.get(path).heal()

    def cmd_inject(self, replica, kind, ops, offset, length, count, delay=0.0):
        """eio: the whole replica fails every I/O (dm-error), only writes
        (dm-flakey, when the fault names writes only), or a range (bad
        sectors in the data, or the metadata tail); hang: suspended. The
        count is not kept: the fault lasts until it is healed."""
        dm = self.dm.get(replica)
        if kind == "hang":
            dm.suspend()
            return {"dm": "suspended"}
        if length is not None:
            dm.bad_range(offset, min(length, dm.sectors * 512 - offset))
            return {"dm": f"error over {offset}+{length}"}
        if tuple(ops) == ("write",):
            dm.fail_writes()
            return {"dm": "flakey error_writes"}
        dm.error()
        return {"dm": "error"}

    def cmd_late(self, replica, ops, delay, clean_after):
        """Its I/O is held (suspended) past the timeout: the daemon fails
        it; a readd while the I/O is still held must be refused; then the
        held I/O is released, lands late, and the replica comes back."""
        dm = self.dm.get(replica)
        dm.suspend()
        try:
            out = {"failed": self.provoke(replica, self.timeout * 4 + 5)}
            time.sleep(self.timeout * 1.5)
            out["owed"] = self.owed(replica)
            if out["failed"]:
                try:
                    self.readd(replica)
                    out["readd_while_owed"] = "accepted"
                except lifecycle.OwedError:
                    out["readd_while_owed"] = "refused"
                except JobFailed as e:
                    out["readd_while_owed"] = f"refused ({e.error_type}: {e})"
        finally:
            dm.heal()
        out.update(self.bring_back(replica))
        return out

    def owed(self, path):
        for r in self.daemon_status()["replicas"]:
            if r["path"] == path and r["state"] != "removed":
                return r.get("owed")
        return None

    def cmd_clean(self, idle):
        """The daemon cleans regions idle for CLEAN_IDLE_S by itself: wait
        until it has had the chance."""
        time.sleep(server.CLEAN_IDLE_S + 2 * server.CLEAN_EVERY_S)
        return {"cleared": "by the daemon"}
