"""quorumblk monitor: follow every device's events (as `mdadm --monitor`).

It reads the events files of the run directory (N.events, every device, new
ones as they appear, across rotation to N.events.1), from now on unless
--backlog, and for each event prints a line, runs --program (one at a time,
killed past --program-timeout) and mails --mail through the local MTA.
--oneshot prints each device's health and its events by type, for cron.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

from . import client, events, runtime
from .errors import CommandError, NotCleanError, UsageError

SENDMAIL = "/usr/sbin/sendmail"
EVENTS_NAME = re.compile(r"(\d+)\.events")


def _seconds(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return v


def add_parser(sub):
    m = sub.add_parser(
        "monitor", help="follow every device's events; run a program, mail",
        description="Follow the events of every quorumblk device (the N.events "
        "files of the run directory, devices added later too) and, for each "
        "event from now on, print a line, run PROG and mail ADDR. PROG runs as "
        "`PROG EVENT DEVICE [REPLICA]` with QUORUMBLK_EVENT_JSON (the event), "
        "QUORUMBLK_EVENT, QUORUMBLK_DEVICE and QUORUMBLK_DEVICE_ID in its "
        "environment, one at a time. Runs in the foreground until SIGTERM or "
        "SIGINT. --oneshot prints each device's health and its events by type "
        "and exits: 0 when every device is clean, 15 when one is not.")
    m.add_argument("--program", metavar="PROG",
                   help="run PROG for each event")
    m.add_argument("--program-timeout", type=_seconds, default=60.0,
                   metavar="SECONDS", help="kill PROG if it runs longer (default 60)")
    m.add_argument("--mail", metavar="ADDR",
                   help=f"mail each event to ADDR ({SENDMAIL} -t; refused where "
                   "there is none)")
    m.add_argument("--oneshot", action="store_true",
                   help="print a summary (health, events by type) and exit")
    m.add_argument("--backlog", action="store_true",
                   help="also handle the events already in the files")
    m.add_argument("--scan-interval", type=_seconds, default=1.0, metavar="S",
                   help="look for new events every S seconds (default 1)")
    m.add_argument("--json", action="store_true", help="print JSON lines")
    m.set_defaults(func=cmd_monitor)


class _Stop(Exception):
    pass


def _stop(_signum, _frame):
    raise _Stop()


class _Followed:
    """One events file being read: its inode and what is not a line yet."""

    def __init__(self, path, at_end):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.f = os.fdopen(fd, "rb")
        self.ino = os.fstat(fd).st_ino
        self.partial = b""
        if at_end:
            self.f.seek(0, os.SEEK_END)

    def lines(self):
        if os.fstat(self.f.fileno()).st_size < self.f.tell():
            self.f.seek(0)          # truncated: read it again from the start
        data = self.partial + self.f.read()
        *done, self.partial = data.split(b"\n")
        out = []
        for line in done:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict) and "type" in e:
                out.append(e)
        return out


class Follower:
    """New events of every device: poll() returns [(dev_id, event)]."""

    def __init__(self, backlog=False):
        self.files = {}
        self.started = backlog      # files found at the first poll: from their end

    def poll(self):
        out = []
        try:
            names = os.listdir(runtime.run_dir())
        except FileNotFoundError:
            names = []
        ids = sorted(int(m.group(1)) for m in map(EVENTS_NAME.fullmatch, names) if m)
        for dev_id in set(self.files) - set(ids):
            out += [(dev_id, e) for e in self.files.pop(dev_id).lines()]
        for dev_id in ids:
            path = runtime.events_path(dev_id)
            fol = self.files.get(dev_id)
            try:
                ino = os.lstat(path).st_ino
                if fol is not None and fol.ino != ino:
                    # rotated: the rest of the old file, then the new one
                    out += [(dev_id, e) for e in fol.lines()]
                    fol.f.close()
                    fol = None
                if fol is None:
                    fol = self.files[dev_id] = _Followed(path, not self.started)
            except OSError:
                continue
            out += [(dev_id, e) for e in fol.lines()]
        self.started = True
        return out


def device_path(dev_id):
    """/dev/ublkbN, or the path its state file names."""
    try:
        st = runtime.read_state(dev_id)
    except CommandError:
        st = None
    return (st or {}).get("path") or f"/dev/ublkb{dev_id}"


def _run_program(prog, dev_id, e, timeout):
    dev = device_path(dev_id)
    argv = [prog, e["type"], dev] + ([e["path"]] if e.get("path") and
                                     e.get("replica") is not None else [])
    env = dict(os.environ, QUORUMBLK_EVENT_JSON=json.dumps(e, sort_keys=True),
               QUORUMBLK_EVENT=e["type"], QUORUMBLK_DEVICE=dev,
               QUORUMBLK_DEVICE_ID=str(dev_id))
    try:
        # its own process group: on a time out (or SIGTERM to the monitor)
        # whatever it started goes with it
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    except OSError as err:
        _warn(f"{prog}: {err.strerror or err}")
        return
    try:
        status = p.wait(timeout)
    except subprocess.TimeoutExpired:
        _warn(f"{prog} ran longer than {timeout:g} s for {e['type']} on {dev}: killed")
        return
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if status != 0:
        _warn(f"{prog} exited {status} for {e['type']} on {dev}")


def _mail(addr, dev_id, e, timeout):
    text = events.message(dev_id, e)
    body = (f"To: {addr}\nSubject: quorumblk: {text[:150]}\n\n{text}\n\n"
            f"{json.dumps(e, sort_keys=True)}\n")
    try:
        p = subprocess.run([SENDMAIL, "-t"], input=body.encode(), timeout=timeout)
    except (subprocess.TimeoutExpired, OSError) as err:
        _warn(f"mailing {addr}: {SENDMAIL}: {err}")
        return
    if p.returncode != 0:
        _warn(f"mailing {addr}: {SENDMAIL} exited {p.returncode}")


def _warn(text):
    print(f"quorumblk: monitor: {text}", file=sys.stderr, flush=True)


def _show(dev_id, e, as_json):
    if as_json:
        line = json.dumps(events.with_format({"type": "event", "device": dev_id,
                                              "event": e}), sort_keys=True)
    else:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("time")))
        line = f"{when} {events.message(dev_id, e)}"
    print(line, flush=True)


def follow(args):
    """Handle events until SIGTERM or SIGINT; returns 0."""
    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    fol = Follower(backlog=args.backlog)
    try:
        first = True
        while True:
            if not first:
                time.sleep(args.scan_interval)
            for dev_id, e in fol.poll():
                _show(dev_id, e, args.json)
                if args.program:
                    _run_program(args.program, dev_id, e, args.program_timeout)
                if args.mail:
                    _mail(args.mail, dev_id, e, args.program_timeout)
            if first:
                _warn(f"following the events of every device in {runtime.run_dir()}"
                      + (" (the backlog first)" if args.backlog else " from now on"))
                first = False
    except _Stop:
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def counts(dev_id):
    """Events by type over the device's events files (N.events.1, N.events)."""
    out = {}
    for path in (events.rotated_path(dev_id), runtime.events_path(dev_id)):
        try:
            fol = _Followed(path, at_end=False)
        except FileNotFoundError:
            continue
        with fol.f:
            for e in fol.lines():
                out[e["type"]] = out.get(e["type"], 0) + 1
    return out


def oneshot(args):
    devs = [{"id": d["id"], "path": d["path"], "health": d["health"],
             "state": d["state"], "events": counts(d["id"])}
            for d in client.list_devices()]
    clean = all(d["health"] == "clean" for d in devs)
    if args.json:
        print(json.dumps(events.with_format({"type": "summary", "clean": clean,
                                             "devices": devs}), sort_keys=True))
    elif not devs:
        print("no quorumblk devices")
    for d in devs if not args.json else ():
        by_type = ", ".join(f"{k} {v}" for k, v in sorted(d["events"].items()))
        print(f"{d['path']}  {d['health']}  events: {by_type or 'none'}")
    return 0 if clean else NotCleanError.exit_code


def cmd_monitor(args):
    runtime.require_root("quorumblk monitor")
    if args.mail and not os.access(SENDMAIL, os.X_OK):
        raise UsageError(f"--mail needs a local MTA: there is no {SENDMAIL} here "
                         "(use --program to send alerts another way)")
    if args.program and not args.oneshot:
        prog = args.program
        if os.sep not in prog and not any(
                os.access(os.path.join(d, prog), os.X_OK)
                for d in os.environ.get("PATH", "").split(os.pathsep)):
            raise UsageError(f"--program {prog}: not found in PATH")
        if os.sep in prog and not os.access(prog, os.X_OK):
            raise UsageError(f"--program {prog}: not an executable file")
    if args.oneshot:
        return oneshot(args)
    return follow(args)
