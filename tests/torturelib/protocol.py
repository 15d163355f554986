"""The pipe between the controller and one worker process.

Both ways it carries one JSON object a line. The controller writes the
worker's configuration first, then commands:

    {"cmd": "ops", "lane": "load"|"probe", "ops": [[id, kind, offset, length, version], ...]}
    {"cmd": NAME, "cid": N, ...}      a control command (worker.py: Control)

The worker reports, in the order things happened (one writer, under a lock):

    {"ev": "ready", "paths": [...], "states": [...], "resync": {...}, "pid": P}
    {"ev": "assemble-failed", "error": TEXT}
    {"ev": "s", "id": N}                         an operation starts
    {"ev": "e", "id": N, "ok": 1, "dur": SECONDS}   ... and ends
    {"ev": "e", "id": N, "ok": 0, "err": "noquorum"|"degraded"|ERRNO, "errno": E, "text": ..., "dur": ...}
    {"ev": "r", "id": N, "runs": [[count, version], ...]}   a read's data
    {"ev": "c", "cid": N, "ok": 1|0, "result": {...}, "error": TEXT, "paths": [...], "states": [...]}
    {"ev": "error", "text": TRACEBACK}           the worker's own bug

A start is sent just before the engine call and an end just after it, so if
one operation's end comes before another's start in the pipe, the first
really ended before the second began. A kill -9 may cut the last line: it
is dropped, and the reader reports {"ev": "eof"} once the pipe is empty.
"""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DIAGNOSIS_DONE = "-- end of the diagnosis --"


def encode(msg):
    return (json.dumps(msg, separators=(",", ":")) + "\n").encode()


class Channel:
    """The controller's end of one worker process."""

    def __init__(self, config, log_path, env=None):
        self.log = open(log_path, "ab")
        environ = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [TESTS] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        environ.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torturelib.worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, cwd=TESTS, env=environ)
        self.inbox = queue.Queue()
        self.send(config)
        self.reader = threading.Thread(target=self._read, daemon=True,
                                       name="torture-reader")
        self.reader.start()

    @property
    def pid(self):
        return self.proc.pid

    def _read(self):
        for line in self.proc.stdout:
            if not line.endswith(b"\n"):
                break               # cut by a kill
            try:
                self.inbox.put(json.loads(line))
            except ValueError:
                self.inbox.put({"ev": "error", "text": f"garbled line {line[:200]!r}"})
        self.inbox.put({"ev": "eof"})

    def send(self, msg):
        try:
            self.proc.stdin.write(encode(msg))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass                    # the worker is gone: its eof tells

    def get(self, timeout):
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def diagnose(self, limit=60):
        """Ask a hung worker for its stacks and engine state (SIGUSR2) and
        wait until they are in its log, or limit seconds."""
        if self.proc.poll() is not None:
            return
        start = os.fstat(self.log.fileno()).st_size
        os.kill(self.proc.pid, signal.SIGUSR2)
        end = time.monotonic() + limit
        while time.monotonic() < end and self.proc.poll() is None:
            with open(self.log.name, "rb") as f:
                f.seek(start)
                if DIAGNOSIS_DONE.encode() in f.read():
                    return
            time.sleep(0.2)

    def kill(self, wait=True):
        """kill -9 and reap it; the reader goes on draining the pipe.
        wait=False: a worker blocked in I/O on a quiesced device dies only
        once that I/O completes (reap it later with proc.wait)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if wait:
            self.proc.wait()

    def stop(self, timeout=30):
        """Ask it to close the quorum and exit; kill it if it does not."""
        self.send({"cmd": "stop", "cid": -1})
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.close()

    def close(self):
        for f in (self.proc.stdin, self.log):
            try:
                f.close()
            except OSError:
                pass

    @property
    def returncode(self):
        return self.proc.poll()
