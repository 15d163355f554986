"""The daemon's server: one device, served from this process. It answers
the control socket (status, the lifecycle commands and their jobs, stop),
writes the events, cleans the write-intent bitmap, and at the end stops the
device in order and removes its runtime files. A handler's error is
answered, never fatal to the device."""
import collections
import json
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback

from . import config, events, lifecycle, meta, runtime
from .errors import CommandError, QuorumError, RefusedError, UsageError

EVENT_DRAIN_S = 0.2
CLEAN_EVERY_S = 1.0         # look for idle dirty regions this often
CLEAN_IDLE_S = 5.0          # a region idle this long goes clean
RECENT_EVENTS = 100
LIFECYCLE = ("job", "cancel", "scrub", "readd", "replace", "add-replica", "remove-replica")


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
        self._follow_entry()

    def _follow_entry(self):
        """A configured device's entry names its members as they are now
        (from the headers the engine holds: no replica I/O). Never raises."""
        name = self.devopts.get("name")
        if not name:
            return
        try:
            members, set_uuid = [], None
            for r, st in enumerate(self.q.replica_states()):
                if st == "removed":
                    continue
                m = self.q.header(r)
                set_uuid = meta.uuid_text(m.set_uuid)
                members.append((self.q.paths[r], meta.uuid_text(m.replica_uuid)))
            if config.follow(name, self.devopts.get("config_dir"), set_uuid, members):
                log(f"configuration entry {name}: members now "
                    + ", ".join(p for p, _ in members))
        except (CommandError, QuorumError, OSError) as e:
            log(f"configuration entry {name} not updated: {e}")

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
