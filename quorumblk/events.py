"""Where a device's events go: its events file and the system log.

The daemon hands every event here (the engine's, and its own: the device
started, recovered or stopped, a job ended). Each one is
  - appended to N.events in the run directory, one JSON object a line. The
    file is kept across stops and the next add of the same id; past
    MAX_EVENTS_FILE bytes it is renamed N.events.1 (replacing the older
    one) and a new N.events begins: at most about twice that on /run;
  - sent to the journal (native protocol, structured QUORUMBLK_* fields)
    when /run/systemd/journal/socket exists, else to syslog on /dev/log
    (RFC 3164, facility daemon, the fields as key=value after the message).
Nothing here blocks or raises into the daemon: a log socket that is gone,
refuses or is full loses that line, and the failures are counted.
"""
import errno
import json
import os
import socket
import struct
import time

from . import runtime

FORMAT = 1                  # the "format" key of every JSON output (README)
MAX_EVENTS_FILE = 1 << 20   # N.events rotates to N.events.1 past this
JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_SOCKET = "/dev/log"
IDENT = "quorumblk"
LOG_DAEMON = 3              # syslog facility
# syslog severities: 2 crit, 3 err, 4 warning, 5 notice, 6 info
PRIORITY = {"quorum-failure": 2, "replica-failed": 3, "replica-error": 3,
            "job-failed": 3, "bad-block": 4, "late-completion": 4,
            "device-stopped": 5, "repaired": 5, "job-cancelled": 5}
INFO = 6


def events_path(dev_id):
    return runtime.events_path(dev_id)


def rotated_path(dev_id):
    return runtime.events_path(dev_id) + ".1"


def message(dev_id, e):
    """One line for people: what happened, where."""
    text = f"device {dev_id}: {e['type']}"
    if e.get("replica") is not None:
        where = e.get("path")
        if e.get("server") and e["server"] not in str(where):
            where = f"{where} on {e['server']}"
        text += f" on replica {e['replica']} ({where})"
    elif e.get("path"):
        text += f" {e['path']}"
    if e.get("length"):
        text += f" offset {e.get('offset')} length {e['length']}"
    if e.get("errno"):
        text += f" errno {e['errno']}"
    if e.get("what"):
        text += f": {e['what']}"
    if e.get("error"):
        text += f": {e['error']}"
    if e.get("suppressed"):
        text += f" (+{e['suppressed']} suppressed)"
    return text


def journal_datagram(fields):
    """The journal's native protocol: KEY=VALUE lines; a value holding a
    newline goes as KEY, newline, its length (64-bit little endian), the
    value, newline."""
    out = b""
    for k, v in fields.items():
        value = str(v).encode(errors="replace")
        if b"\n" in value:
            out += k.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
        else:
            out += k.encode() + b"=" + value + b"\n"
    return out


def syslog_datagram(priority, text, fields, now=None):
    """RFC 3164: <PRI>Mmm dd hh:mm:ss quorumblk[pid]: text key=value..."""
    t = time.localtime(now)
    stamp = time.strftime("%b ", t) + f"{t.tm_mday:2d}" + time.strftime(" %H:%M:%S", t)
    pairs = " ".join(f"{k}={_kv_value(v)}" for k, v in fields.items())
    line = (f"<{LOG_DAEMON * 8 + priority}>{stamp} {IDENT}[{os.getpid()}]: "
            f"{text} {pairs}")
    return line.encode(errors="replace")


def _kv_value(v):
    s = str(v)
    if not s or any(c in s for c in ' "=\n'):
        return json.dumps(s)
    return s


class SystemLog:
    """Sends event lines to the journal or syslog, without ever blocking."""

    def __init__(self):
        self.sock = None
        self.sent = 0
        self.errors = 0             # lines lost: no listener, refused, full
        self.last_error = None

    def send(self, dev_id, e):
        fields = {"QUORUMBLK_DEVICE": dev_id}
        for k, v in sorted(e.items()):
            if v is not None and k != "time":
                fields["QUORUMBLK_" + ("event" if k == "type" else k).upper()] = v
        priority = PRIORITY.get(e["type"], INFO)
        text = message(dev_id, e)
        if os.path.exists(JOURNAL_SOCKET):
            target = JOURNAL_SOCKET
            data = journal_datagram(dict(
                {"MESSAGE": text, "PRIORITY": priority, "SYSLOG_IDENTIFIER": IDENT,
                 "SYSLOG_FACILITY": LOG_DAEMON, "SYSLOG_PID": os.getpid()}, **fields))
        elif os.path.exists(SYSLOG_SOCKET):
            target = SYSLOG_SOCKET
            data = syslog_datagram(priority, text, {
                k[len("QUORUMBLK_"):].lower(): v for k, v in fields.items()})
        else:
            return False
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM |
                                          socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            self.sock.sendto(data, target)
            self.sent += 1
            return True
        except OSError as err:
            self.errors += 1
            self.last_error = f"{target}: {err.strerror or err}"
            if err.errno not in (errno.EAGAIN, errno.ENOENT, errno.ECONNREFUSED):
                self.close()        # a fresh socket next time
            return False

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Sink:
    """A device's events: its bounded events file and the system log.
    log(text) reports a problem to the daemon's own log, once per spell."""

    def __init__(self, dev_id, log=lambda text: None):
        self.dev_id = dev_id
        self.log = log
        self.file = None
        self.failing = False        # the events file could not be written
        self.syslog = SystemLog()
        self.syslog_failing = False

    def open(self):
        """Open N.events for appending (rotated first if it is full)."""
        self.file = runtime.open_private(events_path(self.dev_id), append=True)
        try:
            self._rotate_if_full()
        except OSError as err:      # the device starts all the same
            self.log(f"rotating {events_path(self.dev_id)}: {err}")

    def emit(self, evs):
        for e in evs:
            self._write(e)
            self.syslog.send(self.dev_id, e)
        if self.syslog.errors and not self.syslog_failing:
            self.log(f"sending events to the system log: {self.syslog.last_error} "
                     "(counted in status as log_errors; the device goes on)")
        self.syslog_failing = bool(self.syslog.errors)

    def _write(self, e):
        try:
            self.file.write(json.dumps(e, sort_keys=True) + "\n")
            self.file.flush()
            self._rotate_if_full()
            self.failing = False
        except (OSError, ValueError, AttributeError) as err:
            # /run full, say: the device goes on; status still has them
            if not self.failing:
                self.log(f"writing events to {events_path(self.dev_id)}: {err} "
                         "(the device goes on; `quorumblk status` shows recent events)")
            self.failing = True

    def _rotate_if_full(self):
        if os.fstat(self.file.fileno()).st_size < MAX_EVENTS_FILE:
            return
        os.replace(events_path(self.dev_id), rotated_path(self.dev_id))
        self.file.close()
        self.file = runtime.open_private(events_path(self.dev_id), append=True)

    def close(self):
        if self.file is not None:
            self.file.close()
        self.syslog.close()


def lifecycle_event(kind, **fields):
    """An event of the daemon's own, in the engine's shape."""
    e = {"type": kind, "replica": None, "path": None, "offset": 0, "length": 0,
         "errno": 0, "time": time.time(), "suppressed": 0}
    e.update(fields)
    return e


def job_event(job):
    """The event for a job that has ended: job-done, job-failed or
    job-cancelled, with its kind (scrub, readd...) and what it was."""
    return lifecycle_event(f"job-{job['state']}", job=job["kind"], what=job["what"],
                           error=job["error"])


def health(status):
    """One word for a served device's status: failed (fewer than threshold
    replicas in service: every request fails), resyncing (a replica is
    being filled), degraded (a replica is out of service), or clean."""
    reps = [r for r in status["replicas"] if r["state"] != "removed"]
    in_service = sum(r["state"] == "in-service" for r in reps)
    job = status.get("job") or {}
    if in_service < status["threshold"]:
        return "failed"
    if any(r["state"] == "resyncing" for r in reps) or (
            job.get("state") == "running" and job.get("kind") != "scrub"):
        return "resyncing"
    if in_service < len(reps):
        return "degraded"
    return "clean"


def dumps(obj, **kw):
    """The command's JSON output: every object carries "format" (README
    "JSON output")."""
    return json.dumps(with_format(obj), **kw)


def with_format(obj):
    """obj with "format": FORMAT (in each object of a list)."""
    if isinstance(obj, dict):
        return dict(obj, format=FORMAT)
    if isinstance(obj, list):
        return [with_format(o) for o in obj]
    return obj
