"""The daemon that serves one quorumblk device, and the library calls the
command is made of: add (validate, start, detach), list, status, delete.

add checks everything before it touches the kernel: root, the quorum itself
(threshold, replica paths, sizes, duplicates: the engine refuses them),
replicas already used by another device, the id, the ublk driver. Then it
forks a detached daemon and waits on a pipe until the daemon says the device
is LIVE (or sends the error); the daemon serves until `del`, SIGTERM or
SIGINT, then stops the device in order and exits 0.
"""
import collections
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import warnings

from . import config, errors, events, lifecycle, meta, runtime
from .core import Quorum
from .errors import (CommandError, DaemonError, NoSuchDeviceError, QuorumError,
                     RefusedError, StartError, UsageError)

EVENT_DRAIN_S = 0.2
CLEAN_EVERY_S = 1.0         # look for idle dirty regions this often
CLEAN_IDLE_S = 5.0          # a region idle this long goes clean
RECENT_EVENTS = 100
LIFECYCLE = ("job", "cancel", "scrub", "readd", "replace", "add-replica", "remove-replica")
START_TIMEOUT = 180.0       # the VM under emulation is slow to start queues
DEVICE_MAX_IO = 512 * 1024

ENGINE_KEYS = ("read_policy", "hash", "vote_block", "repair", "buffered",
               "timeout")
DEVICE_KEYS = ("queues", "depth", "block_size", "dev_id", "name")


def _device_module():
    try:
        from . import device
    except ImportError as e:
        raise StartError(f"this build has no ublk binding (quorumblk.device: {e})")
    return device


def check_set(replicas, threshold, engine, reuse=None):
    """Every check of the replicas themselves, writing nothing: the
    threshold, replicas another device uses (other than device reuse:
    recover), what the engine refuses (paths, sizes, duplicates, direct
    I/O), and their metadata (quorumblk.meta: a new set is only planned).
    Returns (plan, warnings as text)."""
    if not 1 <= threshold <= len(replicas):
        raise RefusedError(f"threshold {threshold} out of range: it must be 1 to "
                           f"{len(replicas)} (the number of replicas)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_free([runtime.replica_identity(p) for p in replicas
                    if os.path.exists(p)], skip=reuse)
        Quorum(replicas, threshold, max_io=DEVICE_MAX_IO, **engine).close()
        plan = meta.assemble([str(p) for p in replicas], threshold, write=False)
    msgs = [str(w.message) for w in caught]
    if plan.missing:
        msgs.append(f"{len(plan.missing)} member(s) of the set not given: the "
                    "device runs degraded until they are back (quorumblk readd)")
    return plan, msgs


def open_set(replicas, threshold, engine, plan):
    """The first write to the replicas, once every check has passed: a new
    set is made (image files grow, headers are written); then the engine
    opens them. The plan is not acted on further yet (see prepare)."""
    if plan.created:
        meta.commit([str(p) for p in replicas], plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # check_set said them already
        return Quorum(replicas, threshold, max_io=DEVICE_MAX_IO, **engine)


def prepare(q, plan):
    """Record the assembly in every replica's header and attach the metadata
    to the engine. Returns the resync (a meta.Resync): what the bitmap says
    may differ is resynced by a job once the device is LIVE (_start); the
    engine reads those regions by the crash rule meanwhile."""
    meta.commit(q.paths, plan)
    q.set_meta(plan.metas, plan.bitmap)
    rs = meta.Resync(q, plan)
    if not rs.needed:
        rs.run()
    return rs


def describe_resync(r, dev=None):
    why = {"unclean-stop": "after an unclean stop",
           "stale-replica": "to bring " + ", ".join(r["stale"] or ["?"]) + " up to date"}
    if not r["done"]:
        total = r.get("total_bytes", r["bytes"])
        return (f"a resync of {total} bytes ({r['regions']} regions, "
                f"{100.0 * total / max(r['size'], 1):.2f}% of {r['size']}) "
                f"{why.get(r['reason'], '')} runs while the device serves "
                f"({r['bytes']} bytes done); follow it with `quorumblk job show "
                f"{'DEV' if dev is None or dev < 0 else dev}`")
    text = (f"resynced {r['bytes']} bytes ({r['regions']} regions, "
            f"{100.0 * r['bytes'] / max(r['size'], 1):.2f}% of {r['size']}) "
            f"{why.get(r['reason'], '')}")
    if r["unrecoverable_blocks"]:
        text += f"; {r['unrecoverable_blocks']} blocks had no quorum"
    if r.get("kept_out"):
        text += (f"; {', '.join(r['kept_out'])} kept out of service (they cannot "
                 "get those blocks): readd them once the blocks are written")
    return text


def check_free(idents, skip=None):
    """Refuse replicas that a running device (other than skip) already uses."""
    clashes = runtime.replicas_in_use(idents, skip)
    if clashes:
        path, other, theirs = clashes[0]
        same = "" if path == theirs else f" as {theirs}"
        raise errors.ReplicaInUseError(
            f"replica {path} is already used by quorumblk device {other}{same} "
            f"(/dev/ublkb{other})")


def check_add(replicas, dev_id):
    """Everything about an add that is not the engine's: replicas already
    serving another device, the id, the driver. Returns the replicas'
    identities."""
    idents = [runtime.replica_identity(p) for p in replicas]
    check_free(idents)
    if dev_id is not None and dev_id >= 0:
        why = runtime.id_in_use(dev_id)
        if why:
            raise errors.IdInUseError(f"device id {dev_id} is in use: {why}")
    runtime.ublk_check()
    device = _device_module()
    ok, reason = device.ublk_available()
    if not ok:
        raise errors.UblkMissingError(f"ublk cannot be used: {reason}")
    return idents


class Daemon:
    """Serves one started device: control socket, events, signals."""

    def __init__(self, q, dev, idents, engine, devopts):
        self.q = q
        self.dev = dev
        self.idents = idents
        self.engine = engine
        self.devopts = devopts
        self.recent = collections.deque(maxlen=RECENT_EVENTS)
        self.events_total = 0
        self.stopping = False
        self.stop_reason = None
        self.sock = None
        self.sink = events.Sink(dev.id, log)     # N.events and the system log
        self.job_seen = None        # the job whose end was last reported
        self.started = time.time()
        self.resync = None          # the resync's report (its job updates it)
        self.recovered = False      # serves a device whose daemon died
        self.last_clean = 0.0
        self.life = lifecycle.Lifecycle(q, self.replicas_changed)

    # -- setup --
    def publish(self):
        """Write the runtime files: events log, socket, then the state."""
        dev_id = self.dev.id
        self.sink.open()
        self.sock = self._listen(runtime.sock_path(dev_id))
        runtime.write_state(self.state())
        for u in (self.resync or {}).get("missing", []):
            self.note({"type": "member-missing", "replica": None, "path": None,
                       "member": u, "offset": 0, "length": 0, "errno": None,
                       "suppressed": 0, "time": time.time()})
        if self.devopts.get("name"):
            config.link(self.devopts["name"], self.dev.path)

    def _listen(self, path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        s.listen(8)
        s.setblocking(False)
        return s

    def state(self):
        states = self.q.replica_states()
        return {"id": self.dev.id, "path": self.dev.path, "pid": os.getpid(),
                "start_time": runtime.proc_start_time(os.getpid()),
                "cmdline": runtime.cmdline(os.getpid()),
                "threshold": self.q.threshold, "size": self.q.size,
                "options": dict(self.engine, **self.devopts),
                "replicas": [ident for ident, st in zip(self.idents, states)
                             if st != "removed"],
                "created": self.started}

    def replicas_changed(self):
        """A replica joined or left (lifecycle): the state file follows, so
        that other devices see which replicas this one uses. Never raises:
        the change is made, and a replica that cannot be looked at keeps its
        old identity (or a placeholder that matches no other file)."""
        for i, p in enumerate(self.q.paths):
            if i < len(self.idents) and p == self.idents[i]["path"]:
                continue
            try:
                ident = runtime.replica_identity(p)
            except OSError as e:
                log(f"replica {i}: {p}: {e.strerror or e}")
                ident = {"path": p, "kind": "file", "rdev": 0, "dev": -1, "ino": -1}
            if i < len(self.idents):
                self.idents[i] = ident
            else:
                self.idents.append(ident)
        try:
            runtime.write_state(self.state())
        except OSError as e:
            log(f"writing the state file: {e}")

    # -- serving --
    def _on_signal(self, signum, _frame):
        self.stopping = True
        self.stop_reason = signal.Signals(signum).name

    def install_signals(self):
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def run(self):
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old = signal.set_wakeup_fd(wake_w)
        self.sink.emit([events.lifecycle_event(
            "device-recovered" if self.recovered else "device-started", path=self.dev.path)])
        try:
            while not self.stopping:
                try:
                    ready, _, _ = select.select([self.sock, wake_r], [], [],
                                                EVENT_DRAIN_S)
                except InterruptedError:
                    ready = []
                if wake_r in ready:
                    _drain_fd(wake_r)
                if self.sock in ready:
                    self._serve_one()
                self.drain_events()
                self.clean_bitmap()
                if not self.stopping and self._device_gone():
                    self.stop_reason = "the device stopped"
                    self.stopping = True
        finally:
            signal.set_wakeup_fd(old)
            os.close(wake_r)
            os.close(wake_w)
        return self.shutdown()

    def clean_bitmap(self):
        """Let regions without writes for a while go clean (lazily: a region
        that is written again soon would pay for setting its bit again)."""
        now = time.monotonic()
        if now - self.last_clean < CLEAN_EVERY_S:
            return
        self.last_clean = now
        try:
            self.q.clean(CLEAN_IDLE_S)
        except OSError as e:
            log(f"clearing the write-intent bitmap: {e}")

    def _device_gone(self):
        wait = getattr(self.dev, "wait", None)
        if wait is None:
            return False
        try:
            return bool(wait(0))
        except Exception:
            return False

    def _serve_one(self):
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.setblocking(True)
            conn.settimeout(2.0)
            try:
                try:
                    answer = self._answer(conn)
                except Exception as e:  # a handler's bug never stops the device
                    log(f"control: answering a request failed: {e!r}\n" +
                        traceback.format_exc())
                    answer = {"ok": False, "error": f"internal error: {e!r} (the "
                              "device goes on; the daemon's log has the details)",
                              "exit_code": 1}
                conn.sendall(json.dumps(answer).encode() + b"\n")
            except OSError as e:
                log(f"control: {e}")

    def _answer(self, conn):
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                               struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", cred)
        if uid != 0:
            return {"ok": False, "error": f"permission denied: uid {uid} is not root"}
        data = b""
        while not data.endswith(b"\n") and len(data) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        try:
            req = json.loads(data)
        except ValueError:
            return _bad("not a JSON line")
        if not isinstance(req, dict) or not isinstance(req.get("command"), str):
            return _bad('not an object with a "command" string')
        command, args = req["command"], req.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return _bad(f'"args" of {command!r} must be an object, not {args!r}')
        if command == "status":
            return {"ok": True, "status": self.status()}
        if command == "stop":
            self.stopping = True
            self.stop_reason = "del"
            return {"ok": True, "stopping": True, "pid": os.getpid()}
        if command in LIFECYCLE:
            return self._lifecycle(command, args)
        return {"ok": False, "error": f"unknown command {command!r}",
                "exit_code": UsageError.exit_code}

    def _lifecycle(self, command, args):
        """readd, replace, add-replica, remove-replica, scrub, job, cancel:
        the refusals come back with their exit codes."""
        life = self.life
        rate = args.get("rate")
        if rate is not None and (isinstance(rate, bool) or
                                 not isinstance(rate, (int, float)) or
                                 not 1 <= rate < float("inf")):
            return _bad(f"rate {rate!r} is not a number of bytes per second (>= 1)")
        repair = args.get("repair", True)
        if not isinstance(repair, bool):
            return _bad(f"repair {repair!r} is not true or false")
        need = {"readd": ("replica",), "add-replica": ("replica",),
                "remove-replica": ("replica",), "replace": ("old", "new")}
        missing = [k for k in need.get(command, ()) if k not in args]
        if missing:
            return _bad(f"{command} needs {' and '.join(missing)}")
        try:
            if command == "job":
                job = life.job
            elif command == "cancel":
                job = life.cancel()
            elif command == "remove-replica":
                return {"ok": True, "result": life.remove_replica(args["replica"])}
            elif command == "scrub":
                job = life.scrub(repair=repair, rate=rate)
            elif command == "readd":
                job = life.readd(args["replica"], rate=rate)
            elif command == "add-replica":
                job = life.add_replica(args["replica"], rate=rate)
            else:
                job = life.replace(args["old"], args["new"], rate=rate)
        except CommandError as e:
            return {"ok": False, "error": str(e), "exit_code": e.exit_code}
        except QuorumError as e:
            return {"ok": False, "error": str(e), "exit_code": RefusedError.exit_code}
        except OSError as e:
            return {"ok": False, "error": f"{e.filename or ''} {e.strerror or e}".strip(),
                    "exit_code": 1}
        return {"ok": True, "job": job.to_dict() if job else None}

    def status(self):
        self.drain_events()
        st = self.q.status()
        st.update({"id": self.dev.id, "path": self.dev.path, "pid": os.getpid(),
                   "state": "stopping" if self.stopping else "live",
                   "options": dict(self.engine, **self.devopts),
                   "uptime_s": round(time.time() - self.started, 3),
                   "events_total": self.events_total,
                   "log_errors": self.sink.syslog.errors,
                   "resync": self.resync,
                   "job": self.life.job.to_dict() if self.life.job else None,
                   "events": list(self.recent)})
        st["health"] = events.health(st)
        return st

    def note(self, event):
        """An event of the daemon's own (not the engine's), logged alike."""
        self._log_events([event])

    def drain_events(self):
        if self.q.closed:
            return
        evs = self.q.events()
        job = self.life.job
        if job is not None and job.state != "running" and job is not self.job_seen:
            self.job_seen = job
            evs.append(events.job_event(job.to_dict()))
        if not evs:
            return
        self._log_events(evs)

    def _log_events(self, evs):
        self.recent.extend(evs)
        self.events_total += len(evs)
        self.sink.emit(evs)

    # -- tear-down --
    def shutdown(self):
        """Stop the device (in-flight I/O completes or fails), then record the
        last events and remove the runtime files. Returns the exit status."""
        log(f"stopping device {self.dev.id}: {self.stop_reason}")
        status = 0
        try:
            self.dev.stop()
        except Exception as e:
            log(f"stopping device {self.dev.id} failed: {e}")
            status = 1
        try:
            self.drain_events()
        except Exception as e:
            log(f"last events: {e}")
        try:
            # a clean stop leaves no dirty region (unless a member is out)
            self.q.clean(0)
        except Exception as e:
            log(f"clearing the write-intent bitmap: {e}")
        if self.sock is not None:
            self.sock.close()
        runtime.remove_files(self.dev.id)
        self.sink.emit([events.lifecycle_event("device-stopped", path=self.dev.path,
                                               what=self.stop_reason)])
        self.sink.close()
        try:
            self.q.close()
        except Exception as e:
            log(f"closing replicas: {e}")
            status = 1
        log(f"device {self.dev.id} stopped")
        return status


def _bad(why):
    return {"ok": False, "error": f"bad request: {why}", "exit_code": UsageError.exit_code}


def log(msg):
    try:
        sys.stderr.write(time.strftime("%Y-%m-%dT%H:%M:%S ") + msg + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _drain_fd(fd):
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _start(q, idents, engine, devopts, report=None, recover=False):
    """Start the device (made with user recovery: a daemon crash leaves it
    quiesced for `recover`), or with recover serve the existing device
    devopts["dev_id"] again, and publish its runtime files. On any failure
    the device is stopped again: nothing half-made stays behind (a device
    that failed to recover stays quiesced)."""
    device = _device_module()
    kw = {"depth": devopts["depth"], "block_size": devopts["block_size"],
          "dev_id": devopts["dev_id"] if devopts["dev_id"] is not None else -1,
          "user_recovery": True}
    if devopts["queues"] is not None:
        kw["queues"] = devopts["queues"]
    try:
        if recover:
            dev = device.Device.recover(q, devopts["dev_id"],
                                        block_size=devopts["block_size"])
        else:
            dev = device.Device.start(q, **kw)
    except CommandError:
        raise
    except OSError as e:
        what = f"recovering ublk device {devopts['dev_id']}" if recover else \
            "starting the ublk device"
        raise StartError(f"{what} failed: {e}")
    d = Daemon(q, dev, idents, engine, devopts)
    d.resync = report.report if report else None
    d.recovered = recover
    try:
        d.publish()
    except BaseException:
        try:
            dev.stop()
        finally:
            runtime.remove_files(dev.id)
        raise
    if report and not report.report["done"]:
        d.life.resync(report)       # LIVE first: the resync is a job
    return d


def _notify_systemd(text):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(text.encode(), addr)
    except OSError as e:
        log(f"sd_notify: {e}")


def add(replicas, threshold, engine, devopts, *, foreground=False, warn=None,
        ready=None):
    """Validate, start the device, and either serve it here (foreground,
    returns the daemon's exit status when it stops) or detach a daemon
    (returns the device's {"id", "path", "pid"} once it is LIVE).

    Every check runs under the add lock, and nothing is written to a
    replica before all of them have passed: a refused add leaves the images
    as they were, and two adds of the same bare images cannot both make a
    set of them."""
    runtime.require_root("quorumblk add")
    replicas = [os.path.abspath(p) for p in replicas]
    lock = runtime.AddLock().acquire()
    q = None
    try:
        if _recovers(replicas, devopts.get("dev_id")):
            if warn:
                warn(f"device {devopts['dev_id']} waits for its daemon, which died: "
                     "recovering it instead")
            return recover(devopts["dev_id"], foreground=foreground, warn=warn,
                           threshold=threshold, engine=engine, lock=lock, ready=ready)
        plan, warns = check_set(replicas, threshold, engine)
        for w in warns:
            if warn:
                warn(w)
        idents = check_add(replicas, devopts.get("dev_id"))
        q = open_set(replicas, threshold, engine, plan)
        report = prepare(q, plan)
        if foreground:
            if warn and report.needed:
                warn(describe_resync(report.report, devopts.get("dev_id")))
            return _run_foreground(q, idents, engine, devopts, lock, report,
                                   ready=ready)
        info = _detach(q, idents, engine, devopts, lock, report)
        if warn and report.needed:
            warn(describe_resync(report.report, info["id"]))
        return info
    finally:
        lock.release()
        if q is not None and not q.closed and not foreground:
            q.close()


def _run_foreground(q, idents, engine, devopts, lock, report=None, recover=False,
                    ready=None):
    signal.signal(signal.SIGTERM, _early_signal)
    signal.signal(signal.SIGINT, _early_signal)
    d = _start(q, idents, engine, devopts, report, recover)
    d.install_signals()
    if _early_stop:
        d.stopping, d.stop_reason = True, "signal before LIVE"
    lock.release()
    info = {"id": d.dev.id, "path": d.dev.path, "pid": os.getpid()}
    if ready:
        ready(info)
    else:
        print(d.dev.path, flush=True)
    _notify_systemd(f"READY=1\nMAINPID={os.getpid()}\n"
                    f"STATUS=serving {d.dev.path}")
    return d.run()


def _detach(q, idents, engine, devopts, lock, report=None, recover=False):
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        # first child: new session, then fork the daemon so that it is
        # nobody's child and has no controlling terminal; the daemon's pid
        # is the first line on the pipe
        try:
            os.close(rfd)
            os.setsid()
            child = os.fork()
            if child != 0:
                _send(wfd, {"daemon": child})
                os._exit(0)
            _daemon_main(q, idents, engine, devopts, wfd, lock, report, recover)
        finally:
            os._exit(1)
    os.close(wfd)
    os.waitpid(pid, 0)
    lock.release()
    lines = _Lines(rfd)
    deadline = time.monotonic() + START_TIMEOUT
    daemon_pid = None
    try:
        msg = lines.next(deadline)
        if msg is not None and "daemon" in msg:
            daemon_pid = msg["daemon"]
            msg = lines.next(deadline)
    finally:
        os.close(rfd)       # a daemon that speaks up later finds no one
    if msg is None:
        raise StartError(f"the device did not go LIVE within {START_TIMEOUT:.0f} s: " +
                         _give_up(daemon_pid))
    if not msg.get("ok"):
        raise StartError(msg.get("error", "the daemon failed"),
                         exit_code=msg.get("exit_code"))
    return {k: msg[k] for k in ("id", "path", "pid")}


def _give_up(pid, wait=10.0):
    """Stop the daemon of a start the command gave up on, so that it never
    serves a device the user was told had failed (SIGTERM: it stops the
    device in order once it has one). Says what became of it."""
    if not pid or not runtime.pid_alive(pid):
        return "its daemon has exited"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "its daemon has exited"
    deadline = time.monotonic() + wait
    while runtime.pid_alive(pid):
        if time.monotonic() > deadline:
            return (f"asked its daemon (pid {pid}) to stop; it has not exited "
                    f"within {wait:.0f} s and stops the device as soon as it can")
        time.sleep(0.05)
    return f"stopped its daemon (pid {pid})"


class _Lines:
    """JSON messages from the daemon's pipe, a line each."""

    def __init__(self, fd):
        self.fd = fd
        self.buf = b""
        self.eof = False

    def next(self, deadline):
        """The next message; None when none came by the deadline."""
        while b"\n" not in self.buf and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        if not line:
            return {"ok": False, "error": "the daemon exited before the device was LIVE"}
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            return {"ok": False, "error": f"bad message from the daemon: {line[:200]!r}"}
        return msg


def _daemon_main(q, idents, engine, devopts, wfd, lock, report=None, recover=False):
    """The detached daemon: never returns."""
    status = 1
    d = None
    try:
        q.after_fork()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        signal.signal(signal.SIGTERM, _early_signal)
        signal.signal(signal.SIGINT, _early_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            d = _start(q, idents, engine, devopts, report, recover)
        except CommandError as e:
            _send(wfd, {"ok": False, "error": str(e), "exit_code": e.exit_code})
            os._exit(e.exit_code)
        except OSError as e:
            _send(wfd, {"ok": False, "error": f"starting the device failed: {e}"})
            os._exit(1)
        d.install_signals()
        if _early_stop:
            d.stopping, d.stop_reason = True, "signal before LIVE"
        logf = runtime.open_private(runtime.log_path(d.dev.id), append=True)
        os.dup2(logf.fileno(), 2)
        logf.close()
        log(f"device {d.dev.id} ({d.dev.path}) {'recovered' if recover else 'live'}, "
            f"pid {os.getpid()}, "
            f"replicas {' '.join(q.paths)}, threshold {q.threshold}")
        lock.release()
        try:
            _send(wfd, {"ok": True, "id": d.dev.id, "path": d.dev.path,
                        "pid": os.getpid()})
        except OSError:
            # the command gave up waiting and told the user the start failed
            d.stopping, d.stop_reason = True, "the add that started it gave up"
        os.close(wfd)
        status = d.run()
    except BaseException as e:  # the daemon must leave through os._exit
        log(f"daemon failed: {e!r}")
        try:
            _send(wfd, {"ok": False, "error": f"daemon failed: {e}"})
        except OSError:
            pass
        if d is not None and d.dev is not None:
            d.stop_reason = f"daemon error {e!r}"
            try:
                d.shutdown()
            except BaseException as e2:
                log(f"stopping after the error failed: {e2!r}")
    finally:
        os._exit(status)


_early_stop = []


def _early_signal(signum, _frame):
    _early_stop.append(signum)


def _send(fd, msg):
    os.write(fd, json.dumps(msg).encode() + b"\n")


# -- the other commands' library calls --

def list_devices():
    """Every device: its state file and, when the daemon answers, its
    replica states; a device whose daemon died is "orphaned"."""
    out = []
    live, orphaned = runtime.scan()
    for st in orphaned:
        out.append({"id": st["id"], "path": st["path"], "pid": st["pid"],
                    "threshold": st["threshold"], "size": st.get("size"),
                    **_orphan_state(st),
                    "replicas": [{"path": r["path"], "state": "unknown"}
                                 for r in st.get("replicas", [])]})
        out[-1]["health"] = "quiesced" if out[-1]["state"] == "quiesced" else "failed"
    for st in live:
        entry = {"id": st["id"], "path": st["path"], "pid": st["pid"],
                 "threshold": st["threshold"], "size": st.get("size")}
        try:
            s = runtime.request(st["id"], "status")["status"]
            entry["state"] = s["state"]
            entry["health"] = s["health"]
            entry["replicas"] = [{"path": r["path"], "state": r["state"]}
                                 for r in s["replicas"]]
        except CommandError as e:
            entry["state"] = "unresponsive"
            entry["health"] = "unknown"
            entry["error"] = str(e)
            entry["replicas"] = [{"path": r["path"], "state": "unknown"}
                                 for r in st.get("replicas", [])]
        out.append(entry)
    return sorted(out, key=lambda e: e["id"])


def device_status(dev):
    st = runtime.find(dev)
    return runtime.request(st["id"], "status")["status"]


def delete(dev, timeout=30.0, force=False):
    """Stop device dev in order and wait until its daemon and node are gone.
    A device whose daemon died is removed from the kernel. Refused while the
    device is in use (mounted, stacked on, open), unless force."""
    st = runtime.find(dev, orphans=True)
    live = runtime.is_live(st)
    if not force:
        # a quiesced device is not probed: an open of it could wait for I/O
        who = runtime.holders(st["path"], skip={os.getpid(), st["pid"]}, probe=live)
        if who:
            raise errors.DeviceInUseError(
                f"device {st['id']} ({st['path']}) is in use: {'; '.join(who)}: "
                "refused (unmount or close it first, or `quorumblk del --force` "
                "stops it anyway: I/O then fails)")
    if not live:
        return _delete_orphan(st, timeout)
    try:
        runtime.request(st["id"], "stop")
        how = "stop request"
    except DaemonError as e:
        if not _is_daemon_of(st):
            raise DaemonError(
                f"{e}; and pid {st['pid']} ({' '.join(runtime.cmdline(st['pid']) or [])}) "
                f"is not the daemon of quorumblk device {st['id']}: not signalled "
                f"(is {runtime.state_path(st['id'])} stale?)")
        try:
            os.kill(st["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        how = "SIGTERM"
    left = runtime.wait_gone(st, timeout)
    if left:
        raise DaemonError(f"device {st['id']}: not gone {timeout:.0f} s after the "
                          f"{how}: {', '.join(left)}")
    runtime.remove_files(st["id"])
    return {"id": st["id"], "path": st["path"], "pid": st["pid"], "deleted": True}


def _is_daemon_of(st):
    """Whether the pid st names is device st["id"]'s daemon: still the
    process that wrote st (runtime.is_daemon), and, where the kernel still
    has the device, the process it says serves it."""
    if not runtime.is_daemon(st):
        return False
    if not runtime.kernel_has(st["id"]):
        return True
    try:
        info = _device_module().dev_info(st["id"])
    except (OSError, CommandError):
        return True
    return info["pid"] in (st["pid"], -1, 0)


def _delete_orphan(st, timeout):
    """DEL_DEV for a device whose daemon died, if the kernel says that
    daemon served it (never another server's device that took the id)."""
    device = _device_module()
    dev_id = st["id"]
    try:
        info = device.dev_info(dev_id)
    except OSError:
        info = None
    if info is not None and info["pid"] not in (st["pid"], -1, 0):
        runtime.remove_files(dev_id)
        raise NoSuchDeviceError(f"quorumblk device {dev_id}: its daemon (pid {st['pid']}) "
                                f"is gone and ublk device {dev_id} is now served by pid "
                                f"{info['pid']}: left alone; removed the stale state")
    result = []

    def _del():
        try:
            device.delete(dev_id)
            result.append(None)
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=_del, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise DaemonError(f"device {dev_id}: deleting it from the kernel did not finish "
                          f"within {timeout:.0f} s (is /dev/ublkc{dev_id} still open?)")
    if result[0] is not None and runtime.kernel_has(dev_id):
        raise DaemonError(f"device {dev_id}: deleting it from the kernel failed: {result[0]}")
    runtime.remove_files(dev_id)
    return {"id": dev_id, "path": st["path"], "pid": st["pid"], "deleted": True,
            "orphaned": True}


# -- recovery after a daemon crash --
#
# Devices are made with ublk user recovery: when the daemon dies (kill -9, a
# crash) the kernel keeps /dev/ublkbN, holds it quiesced (new I/O waits, and
# what the dead daemon had taken is reissued later) and waits for a new
# server. Its state file stays in /run/quorumblk and names everything a new
# daemon needs.

def _orphan_state(st):
    """{"state", "error"} of a device whose daemon died while the kernel
    still holds it: "quiesced" when `recover` can serve it again, else
    "orphaned" (only `del` helps)."""
    dev_id, pid = st["id"], st["pid"]
    try:
        info = _device_module().dev_info(dev_id)
    except (OSError, CommandError) as e:
        return {"state": "orphaned",
                "error": f"daemon pid {pid} died and the kernel's ublk device {dev_id} "
                         f"cannot be read ({e}); `quorumblk del {dev_id}` removes it"}
    if info["pid"] not in (pid, -1, 0) and runtime.pid_alive(info["pid"]):
        return {"state": "orphaned",
                "error": f"daemon pid {pid} died and ublk device {dev_id} is now "
                         f"served by pid {info['pid']}"}
    if "user-recovery" not in info["features"]:
        return {"state": "orphaned",
                "error": f"daemon pid {pid} died and the device was made without "
                         f"user recovery; `quorumblk del {dev_id}` removes it"}
    # LIVE with the dead daemon as its server: the kernel has not noticed
    # yet; it quiesces the device within moments (recover waits for it)
    if info["state"] == "quiesced" or (info["state"] == "live" and info["pid"] == pid):
        return {"state": "quiesced",
                "error": f"daemon pid {pid} died; I/O waits: `quorumblk recover "
                         f"{dev_id}` serves the device again, `quorumblk del {dev_id}` "
                         "removes it"}
    return {"state": "orphaned",
            "error": f"daemon pid {pid} died and ublk device {dev_id} is "
                     f"{info['state']}; `quorumblk del {dev_id}` removes it"}


def _recoverable(dev_id):
    """The state of device dev_id when a new daemon can take it over, else
    the error that says why not."""
    st = runtime.read_state(dev_id)
    if st is None:
        raise NoSuchDeviceError(f"no quorumblk device {dev_id} "
                                f"(no {runtime.state_path(dev_id)})")
    if runtime.is_live(st):
        raise errors.NotRecoverableError(
            f"quorumblk device {dev_id}: its daemon (pid {st['pid']}) is alive: "
            "nothing to recover")
    if not runtime.kernel_has(dev_id):
        runtime.remove_files(dev_id)
        raise NoSuchDeviceError(f"quorumblk device {dev_id}: its daemon (pid {st['pid']}) "
                                "is gone and so is the kernel's device; removed its "
                                "stale state")
    why = _orphan_state(st)
    if why["state"] != "quiesced":
        raise errors.NotRecoverableError(f"quorumblk device {dev_id} cannot be "
                                          f"recovered: {why['error']}")
    return st


def _recovers(replicas, dev_id):
    """Whether `add --id dev_id REPLICA...` means: recover device dev_id (its
    daemon died, the kernel holds it quiesced, and it has these replicas in
    this order). How the systemd unit comes back after a crash."""
    if dev_id is None or dev_id < 0:
        return False
    st = runtime.read_state(dev_id)
    if st is None or runtime.is_live(st) or not runtime.kernel_has(dev_id):
        return False
    theirs = st.get("replicas", [])
    try:
        mine = [runtime.replica_identity(p) for p in replicas]
    except OSError:
        return False
    if len(mine) != len(theirs) or not all(
            runtime.same_replica(a, b) for a, b in zip(mine, theirs)):
        return False
    return _orphan_state(st)["state"] == "quiesced"


def recover(dev, *, foreground=False, warn=None, threshold=None, engine=None,
            lock=None, ready=None):
    """Serve again device dev whose daemon died (the kernel holds it
    quiesced; I/O issued meanwhile waits). The replicas, threshold and
    options come from its state file (threshold and engine override them);
    the replicas are opened as add opens them (metadata; every region the
    write-intent bitmap says may differ is resynced by vote in a job once
    the device serves again). Then, as add: serve here (foreground: returns the
    daemon's exit status) or detach a daemon (returns {"id", "path", "pid"}
    once the device is LIVE). lock: the add lock when the caller holds it."""
    runtime.require_root("quorumblk recover")
    dev_id = runtime.parse_dev(dev)
    lock = lock or runtime.AddLock().acquire()
    q = None
    try:
        st = _recoverable(dev_id)
        opts = st.get("options", {})
        if engine is None:
            engine = {k: opts[k] for k in ENGINE_KEYS if k in opts}
        devopts = {k: opts.get(k) for k in DEVICE_KEYS}
        devopts["dev_id"] = dev_id
        theirs = st.get("replicas", [])
        paths = [r["path"] for r in theirs]
        threshold = threshold or st["threshold"]
        plan, warns = check_set(paths, threshold, engine, reuse=dev_id)
        for w in warns:
            if warn:
                warn(w)
        idents = [runtime.replica_identity(p) for p in paths]
        for mine, old in zip(idents, theirs):
            if not runtime.same_replica(mine, old):
                raise errors.NotRecoverableError(
                    f"quorumblk device {dev_id}: {mine['path']} is not the replica "
                    "the device had under that name (another file or device now): refused")
        runtime.ublk_check()
        ok, reason = _device_module().ublk_available()
        if not ok:
            raise errors.UblkMissingError(f"ublk cannot be used: {reason}")
        q = open_set(paths, threshold, engine, plan)
        report = prepare(q, plan)
        if warn and report.needed:
            warn(describe_resync(report.report, dev_id))
        if foreground:
            return _run_foreground(q, idents, engine, devopts, lock, report,
                                   recover=True, ready=ready)
        return _detach(q, idents, engine, devopts, lock, report, recover=True)
    finally:
        lock.release()
        if q is not None and not q.closed and not foreground:
            q.close()
