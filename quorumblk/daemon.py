"""The commands that start a device's daemon, add and recover, and the
daemon's process: add checks everything before it touches the kernel
(quorumblk.assembly), then forks a detached daemon and waits on a pipe until
the daemon says the device is LIVE (or sends the error); the daemon serves
(quorumblk.server) until `del`, SIGTERM or SIGINT, then stops the device in
order and exits 0. recover does the same for a device whose daemon died.
"""
import json
import os
import select
import signal
import socket
import sys
import time

from . import assembly, errors, replica, runtime, server
from .errors import CommandError, StartError
from .server import log

START_TIMEOUT = 180.0       # the VM under emulation is slow to start queues


def _start(q, idents, engine, devopts, report=None, recover=False):
    """Start the device (made with user recovery: a daemon crash leaves it
    quiesced for `recover`), or with recover serve the existing device
    devopts["dev_id"] again, and publish its runtime files. On any failure
    the device is stopped again: nothing half-made stays behind (a device
    that failed to recover stays quiesced)."""
    device = runtime.device_module()
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
    d = server.Daemon(q, dev, idents, engine, devopts)
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
    replicas = [replica.absolute(p) for p in replicas]
    lock = runtime.AddLock().acquire()
    q = None
    try:
        if assembly.recovers(replicas, devopts.get("dev_id")):
            if warn:
                warn(f"device {devopts['dev_id']} waits for its daemon, which died: "
                     "recovering it instead")
            return recover(devopts["dev_id"], foreground=foreground, warn=warn,
                           threshold=threshold, engine=engine, lock=lock, ready=ready)
        plan, warns = assembly.check_set(replicas, threshold, engine)
        for w in warns:
            if warn:
                warn(w)
        idents = assembly.check_add(replicas, devopts.get("dev_id"))
        q = assembly.open_set(replicas, threshold, engine, plan)
        report = assembly.prepare(q, plan)
        if foreground:
            if warn and report.needed:
                warn(assembly.describe_resync(report.report, devopts.get("dev_id")))
            return _run_foreground(q, idents, engine, devopts, lock, report,
                                   ready=ready)
        info = _detach(q, idents, engine, devopts, lock, report)
        if warn and report.needed:
            warn(assembly.describe_resync(report.report, info["id"]))
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
        st = assembly.recoverable(dev_id)
        opts = st.get("options", {})
        if engine is None:
            engine = {k: opts[k] for k in assembly.ENGINE_KEYS if k in opts}
        devopts = {k: opts.get(k) for k in assembly.DEVICE_KEYS}
        devopts["dev_id"] = dev_id
        theirs = st.get("replicas", [])
        paths = [r["path"] for r in theirs]
        threshold = threshold or st["threshold"]
        plan, warns = assembly.check_set(paths, threshold, engine, reuse=dev_id)
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
        ok, reason = runtime.device_module().ublk_available()
        if not ok:
            raise errors.UblkMissingError(f"ublk cannot be used: {reason}")
        q = assembly.open_set(paths, threshold, engine, plan)
        report = assembly.prepare(q, plan)
        if warn and report.needed:
            warn(assembly.describe_resync(report.report, dev_id))
        if foreground:
            return _run_foreground(q, idents, engine, devopts, lock, report,
                                   recover=True, ready=ready)
        return _detach(q, idents, engine, devopts, lock, report, recover=True)
    finally:
        lock.release()
        if q is not None and not q.closed and not foreground:
            q.close()
