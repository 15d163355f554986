"""The quorumblk command: add, list, status and del quorumblk devices;
change a running device's replicas (readd, replace, add-replica,
remove-replica) and scrub it; show or cancel the job that runs; recover a
device whose daemon died. Replica paths are made absolute here, where they
are given (the daemon works from /).

Each handler is a call or two into quorumblk.daemon (add, recover) or
quorumblk.client (list, status, del); main() turns every
error into `quorumblk: <message>` on stderr and the error's exit status
(a traceback only with --debug; with --json also a JSON object on stdout).
"""
import argparse
import os
import sys
import time

from . import __version__, assembly, client, configcli, daemon, errors, events, monitor, runtime
from . import replica
from .errors import (CommandError, NoQuorumFoundError, QuorumError, RefusedError,
                     UsageError, exit_status_text)

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
TABLE_COUNTERS = ("reads", "writes", "bad_blocks", "repairs", "errors", "timeouts",
                  "late", "owed")


_json = events.dumps


def _positive_int(text):
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v


def _id(text):
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if not 0 <= v < 1 << 20:
        raise argparse.ArgumentTypeError(f"id {text} is out of range (0 .. {(1 << 20) - 1})")
    return v


def _seconds(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return v


def _vote_block(text):
    v = _positive_int(text)
    if v & (v - 1) or not 512 <= v <= assembly.DEVICE_MAX_IO:
        raise argparse.ArgumentTypeError(
            f"vote block {text} must be a power of two from 512 to {assembly.DEVICE_MAX_IO}")
    return v


def _depth(text):
    v = _positive_int(text)
    if v > 4096:
        raise argparse.ArgumentTypeError(f"depth {text} is above 4096")
    return v


def _queues(text):
    v = _positive_int(text)
    if v > 64:
        raise argparse.ArgumentTypeError(f"{text} queues is above 64")
    return v


def _rate(text):
    t = text.strip().lower().removesuffix("/s").removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in UNITS and not t[-1:].isdigit() else ""
    try:
        v = float(t[:len(t) - len(unit)]) * UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate (bytes per second, e.g. 50M or 1G)")
    if not v >= 1 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"rate {text} must be at least 1 byte/s")
    return int(v)


def _dev_arg(parser):
    parser.add_argument("dev", metavar="DEV", help="N, ublkbN or /dev/ublkbN")


def _job_options(parser, what):
    parser.add_argument("--rate", type=_rate, default=None, metavar="BYTES/S",
                        help=f"{what} at most this fast (K, M, G suffixes; default: "
                        "as fast as the replicas go)")
    parser.add_argument("--json", action="store_true",
                        help="print progress and the result as JSON lines")
    parser.add_argument("--background", action="store_true",
                        help="return once the job has started (`quorumblk status "
                        "DEV` shows its progress)")


def build_parser():
    p = argparse.ArgumentParser(
        prog="quorumblk",
        description="A block device (/dev/ublkbN) over N replica images: writes go "
                    "to every replica, reads are voted per block.",
        epilog=exit_status_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help="show a traceback on errors")
    p.add_argument("--version", action="version", version=f"quorumblk {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    a = sub.add_parser("add", help="create a device over replica images",
                       description="Create /dev/ublkbN over the replicas and serve it "
                       "from a daemon; prints the device's path once it is LIVE. A "
                       "resync (after an unclean stop, of a stale replica) runs "
                       "after that, as a job (`quorumblk job show DEV`).")
    a.add_argument("--threshold", "-t", type=int, required=True, metavar="K",
                   help="replicas that must agree on a block (1..N)")
    a.add_argument("replicas", nargs="+", metavar="REPLICA",
                   help="replica image files, block devices or NBD exports "
                        "(nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH), "
                        "all the same size")
    e = a.add_argument_group("engine")
    e.add_argument("--read-policy", choices=("all", "threshold", "fifo"),
                   default="all", help="read every replica and vote (all, default), "
                   "read threshold of them (threshold), or the first to answer (fifo)")
    e.add_argument("--hash", choices=("xxh3", "sha256"), default="xxh3",
                   help="hash that groups differing copies (default xxh3)")
    e.add_argument("--no-repair", dest="repair", action="store_false",
                   help="report losing blocks but do not rewrite them")
    e.add_argument("--buffered", action="store_true",
                   help="open the replicas without O_DIRECT")
    e.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="replica I/O timeout (default 30)")
    e.add_argument("--vote-block", type=_vote_block, default=4096, metavar="BYTES",
                   help="vote granularity (default 4096)")
    d = a.add_argument_group("device")
    d.add_argument("--queues", type=_queues, default=None,
                   help="hardware queues (default min(CPUs, 4))")
    d.add_argument("--depth", type=_depth, default=128, help="queue depth (default 128)")
    d.add_argument("--block-size", type=int, choices=(512, 4096), default=512,
                   help="logical block size (default 512)")
    d.add_argument("--id", dest="dev_id", type=_id, default=None, metavar="N",
                   help="ask for /dev/ublkbN (default: the kernel picks)")
    a.add_argument("--foreground", "-f", action="store_true",
                   help="serve in this process (for systemd) instead of detaching")
    a.add_argument("--json", action="store_true", help="print JSON")
    configcli.add_options(a)
    a.set_defaults(func=cmd_add)

    ls = sub.add_parser("list", help="list the devices")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)

    st = sub.add_parser("status", help="counters, replica states, recent events")
    _dev_arg(st)
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)

    de = sub.add_parser("del", help="stop and delete devices")
    g = de.add_mutually_exclusive_group(required=True)
    g.add_argument("dev", metavar="DEV", nargs="?", help="N, ublkbN or /dev/ublkbN")
    g.add_argument("--all", action="store_true", help="every quorumblk device")
    de.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS",
                    help="give up waiting for the daemon after this (default 60)")
    de.add_argument("--force", action="store_true",
                    help="stop a device even while it is mounted or open (its "
                    "users' I/O then fails)")
    de.add_argument("--json", action="store_true", help="print JSON")
    de.set_defaults(func=cmd_del)

    sc = sub.add_parser("scrub", help="read, vote and repair the whole device",
                        description="Read every block from every in-service replica "
                        "while the device serves, vote, and rewrite losing copies; "
                        "prints what it found. Exit 12 if blocks had no quorum.")
    _dev_arg(sc)
    sc.add_argument("--no-repair", dest="repair", action="store_false",
                    help="only report, rewrite nothing")
    _job_options(sc, "read")
    sc.set_defaults(func=cmd_scrub)

    ra = sub.add_parser("readd", help="bring a replica back after a failure",
                        description="A member of the set that left service (an I/O "
                        "error, a timeout, or it was missing at add) comes back: it "
                        "gets what it missed (the regions written since, by the "
                        "write-intent bitmap), then votes again.")
    _dev_arg(ra)
    ra.add_argument("replica", metavar="REPLICA",
                    help="its path (or its index, to reopen the path it had)")
    _job_options(ra, "copy")
    ra.set_defaults(func=cmd_readd)

    rp = sub.add_parser("replace", help="replace a replica by a new image",
                        description="NEW (an image or device without quorumblk "
                        "metadata, at least the device's size) gets a copy of the "
                        "whole device while it serves, then OLD leaves the set.")
    _dev_arg(rp)
    rp.add_argument("old", metavar="OLD", help="the replica to replace: path or index")
    rp.add_argument("new", metavar="NEW", help="the new replica's path")
    _job_options(rp, "copy")
    rp.set_defaults(func=cmd_replace)

    ad = sub.add_parser("add-replica", help="add a new replica to a running device",
                        description="NEW (an image or device without quorumblk "
                        "metadata) becomes one more replica: it gets a copy of the "
                        "whole device, then votes.")
    _dev_arg(ad)
    ad.add_argument("new", metavar="NEW", help="the new replica's path")
    _job_options(ad, "copy")
    ad.set_defaults(func=cmd_add_replica)

    rm = sub.add_parser("remove-replica", help="take a replica out of the set",
                        description="The replica leaves the set for good (its header "
                        "says so: it is refused as a member later). Refused when "
                        "fewer than threshold replicas would stay in service.")
    _dev_arg(rm)
    rm.add_argument("replica", metavar="REPLICA", help="its path or index")
    rm.add_argument("--json", action="store_true", help="print JSON")
    rm.set_defaults(func=cmd_remove_replica)

    jb = sub.add_parser("job", help="show or cancel the job running on a device",
                        description="The job (the resync after add or recover, "
                        "scrub, readd, replace, add-replica) "
                        "that runs on DEV: `show` prints it, `cancel` stops it at "
                        "its next step and waits until it has stopped. A cancelled "
                        "readd leaves its replica out of service (readd it again "
                        "later); a cancelled add-replica or replace removes the new "
                        "replica from the set (the old one stays). The resync "
                        "cannot be cancelled (exit 11).")
    jsub = jb.add_subparsers(dest="job_command", metavar="ACTION")
    jsub.required = True
    for name, func, text in (("show", cmd_job_show, "print the job"),
                             ("cancel", cmd_job_cancel, "cancel the job")):
        jp = jsub.add_parser(name, help=text)
        _dev_arg(jp)
        jp.add_argument("--json", action="store_true", help="print JSON")
        jp.set_defaults(func=func)

    monitor.add_parser(sub)

    rc = sub.add_parser(
        "recover", help="serve a device again after its daemon died",
        description="Serve DEV again after its daemon died (kill -9, a crash): the "
        "kernel keeps the device quiesced, and I/O issued meanwhile waits. The "
        "replicas, threshold and options come from /run/quorumblk/N.json. Prints the "
        "device's path once it is LIVE again; regions with writes in flight at the "
        "crash are then resynced by vote, as a job (`quorumblk job show DEV`). Refused (exit 13) when the daemon "
        "still runs or the kernel does not hold the device quiesced.")
    _dev_arg(rc)
    rc.add_argument("--foreground", "-f", action="store_true",
                    help="serve in this process (for systemd) instead of detaching")
    rc.add_argument("--json", action="store_true", help="print JSON")
    rc.set_defaults(func=cmd_recover)
    configcli.register(sub, _ready, warn)
    return p


# -- handlers --

def cmd_add(args):
    if len(args.replicas) > 16:
        raise UsageError(f"{len(args.replicas)} replicas: at most 16")
    engine = {"read_policy": args.read_policy, "hash": args.hash,
              "vote_block": args.vote_block, "repair": args.repair,
              "buffered": args.buffered, "timeout": args.timeout}
    devopts = {"queues": args.queues, "depth": args.depth,
               "block_size": args.block_size, "dev_id": args.dev_id}
    ready = _ready(args)
    configcli.save_check(args)
    if args.save is not None:
        devopts["name"] = args.save
        ready = _saving(args, engine, devopts, ready)
    res = daemon.add(args.replicas, args.threshold, engine, devopts,
                     foreground=args.foreground, warn=warn, ready=ready)
    if args.foreground:
        return res
    if args.save is not None:
        configcli.save(args, args.replicas, engine, devopts, res)
    if args.json:
        print(_json(res, sort_keys=True))
    else:
        print(res["path"])
    return 0


def _ready(args):
    """What a foreground add or recover prints once the device is LIVE
    (what the detached one prints when it returns)."""
    def ready(res):
        print(_json(res, sort_keys=True) if args.json else res["path"],
              flush=True)
    return ready


def _saving(args, engine, devopts, ready):
    """A foreground add --save saves the entry once the device is LIVE."""
    def saving(res):
        try:
            configcli.save(args, args.replicas, engine, devopts, res)
        except CommandError as e:
            warn(str(e))    # the device serves on: this process is its daemon
        ready(res)
    return saving


def cmd_list(args):
    runtime.require_root("quorumblk list")
    devs = client.list_devices()
    if args.json:
        print(_json(devs, indent=1, sort_keys=True))
        return 0
    if not devs:
        print("no quorumblk devices")
        return 0
    for d in devs:
        good = sum(r["state"] == "in-service" for r in d["replicas"])
        print(f"{d['path']}  id {d['id']}  {d['health']}  {d['state']}  "
              f"threshold {d['threshold']}  {good}/{len(d['replicas'])} replicas in service  pid {d['pid']}")
        for r in d["replicas"]:
            print(f"  {r['state']:<11} {r['path']}")
    return 0


def cmd_status(args):
    runtime.require_root("quorumblk status")
    s = client.device_status(args.dev)
    if args.json:
        print(_json(s, indent=1, sort_keys=True))
        return 0
    print(s["health"])
    if s.get("error"):          # its daemon died (client._orphan_entry)
        print(f"{s['path']}  id {s['id']}  {s['state']}: {s['error']}")
        for i, r in enumerate(s["replicas"]):
            print(f"replica {i} {r['state']}  {r['path']}")
        return 0
    print(f"{s['path']}  id {s['id']}  {s['state']}  pid {s['pid']}  "
          f"size {s['size']} bytes  threshold {s['threshold']}  "
          f"{s['in_service']}/{len(s['replicas'])} replicas in service")
    c = s["counters"]
    print("device: " + "  ".join(f"{k} {c[k]}" for k in sorted(c)))
    print(f"{'replica state':<22}{'io':<10}" +
          "".join(f"{k:>11}" for k in TABLE_COUNTERS) + "  path")
    for r in s["replicas"]:
        print(f"{'replica %d %s' % (r['index'], r['state']):<22}{r['io']:<10}" +
              "".join(f"{r[k]:>11}" for k in TABLE_COUNTERS) + f"  {r['path']}" +
              (f"  (server {r['server']})" if r.get("server") else ""))
    if s.get("resync") and s["resync"]["reason"] != "none":
        print("at start: " + assembly.describe_resync(s["resync"]))
    j = s.get("job")
    if j:
        print(f"job: {j['what']} {j['state']} {j['percent']}% of "
              f"{_mib(j['total_bytes'])}" + (f": {j['error']}" if j["error"] else ""))
    evs = s["events"]
    print(f"events: {s['events_total']} in all" + (", recent:" if evs else ""))
    for e in evs:
        when = time.strftime("%H:%M:%S", time.localtime(e["time"]))
        who = f"replica {e['replica']}" if e["replica"] is not None else "device"
        extra = f" {e['errno']}" if e["errno"] else ""
        sup = f" (+{e['suppressed']} suppressed)" if e["suppressed"] else ""
        print(f"  {when} {e['type']:<14} {who} offset {e['offset']} "
              f"length {e['length']}{extra}{sup}")
    return 0


def cmd_del(args):
    runtime.require_root("quorumblk del")
    if args.all:
        live, orphaned = runtime.scan()
        targets = sorted(st["id"] for st in live + orphaned)
    else:
        targets = [args.dev]
    done, failed = [], []
    for t in targets:
        try:
            done.append(client.delete(t, timeout=args.timeout, force=args.force))
        except CommandError as e:
            if not args.all:
                raise
            failed.append((t, e))
            print(f"quorumblk: {e}", file=sys.stderr)
    if args.json:
        print(_json(done if args.all else done[0], sort_keys=True))
    else:
        for d in done:
            print(f"deleted {d['path']}")
    if failed:
        return max(e.exit_code for _t, e in failed)
    return 0


def cmd_recover(args):
    res = daemon.recover(args.dev, foreground=args.foreground, warn=warn,
                         ready=_ready(args))
    if args.foreground:
        return res
    if args.json:
        print(_json(res, sort_keys=True))
    else:
        print(res["path"])
    return 0


def _replica(text):
    """A replica given on the command line, as the daemon (which works from
    /) needs it: an index (digits that name no file here) or an absolute
    path, made absolute here, where a relative one means something."""
    if text.isdigit() and not os.path.exists(text):
        return int(text)
    return replica.absolute(text)


def _start_job(args, command, **params):
    runtime.require_root(f"quorumblk {command}")
    st = runtime.find(args.dev)
    if getattr(args, "rate", None):
        params["rate"] = args.rate
    job = runtime.request(st["id"], command, args=params)["job"]
    if args.background:
        print(_json(job, sort_keys=True) if args.json else
              f"{job['what']} started on {st['path']}")
        return None
    return _follow(st, job, args.json)


def _follow(st, job, as_json, every=0.5):
    """Show a job's progress until it ends (a bar on a terminal, JSON lines
    with --json); returns its last state."""
    tty = sys.stderr.isatty() and not as_json
    last_json = 0.0
    try:
        while True:
            if as_json and time.monotonic() - last_json >= 1.0:
                print(_json({"type": "progress", **_brief(job)}), flush=True)
                last_json = time.monotonic()
            if tty:
                sys.stderr.write("\r" + _bar(job))
                sys.stderr.flush()
            if job["state"] != "running":
                break
            time.sleep(every)
            job = runtime.request(st["id"], "job")["job"]
    except KeyboardInterrupt:
        if tty:
            sys.stderr.write("\n")
        print(f"quorumblk: {job['what']} goes on in the daemon; `quorumblk status "
              f"{st['id']}` shows it, `quorumblk job cancel {st['id']}` stops it",
              file=sys.stderr)
        raise
    if tty:
        sys.stderr.write("\n")
    return job


def _brief(job):
    return {k: job[k] for k in ("kind", "state", "done_bytes", "total_bytes",
                                "percent", "bytes_per_s")}


def _bar(job, width=30):
    fill = int(width * job["percent"] / 100)
    return (f"{job['what']}: [{'#' * fill}{'.' * (width - fill)}] "
            f"{job['percent']:5.1f}% {_mib(job['done_bytes'])}/{_mib(job['total_bytes'])} "
            f"{_mib(job['bytes_per_s'])}/s")


def _mib(n):
    return f"{n / (1 << 20):.1f} MiB"


def _finish(job, as_json, describe):
    if job is None:
        return 0
    if as_json:
        print(_json({"type": "result", **job}, sort_keys=True))
    if job["state"] == "cancelled":
        raise CommandError(f"{job['what']} was cancelled: {job['error']}")
    if job["state"] != "done":
        raise CommandError(f"{job['what']} failed: {job['error']}")
    if not as_json:
        print(describe(job["result"], job))
    return 0


def cmd_scrub(args):
    job = _start_job(args, "scrub", repair=args.repair)

    def describe(r, job):
        bad = ", ".join(f"{p}: {n}" for p, n in r["bad_blocks"].items()) or "none"
        return (f"scrubbed {_mib(job['total_bytes'])} ({r['blocks_checked']} blocks) in "
                f"{job['seconds']:.1f} s: bad blocks {bad}; "
                f"{r['repaired']} repaired; {r['unrecoverable']} without quorum")
    rc = _finish(job, args.json, describe)
    if job is not None and job["result"]["unrecoverable"]:
        return NoQuorumFoundError.exit_code
    return rc


def _describe_fill(r, job):
    return (f"{job['what']}: checked {_mib(r['checked_bytes'])} of "
            f"{_mib(r['size'])}, copied {r['copied_blocks']} blocks "
            f"({_mib(r['copied_bytes'])}) in {job['seconds']:.1f} s; "
            f"{r['replica']} in service" +
            (f", {r['removed']} removed" if r.get("removed") else ""))


def cmd_readd(args):
    return _finish(_start_job(args, "readd", replica=_replica(args.replica)),
                   args.json, _describe_fill)


def cmd_replace(args):
    return _finish(_start_job(args, "replace", old=_replica(args.old),
                              new=replica.absolute(args.new)),
                   args.json, _describe_fill)


def cmd_add_replica(args):
    return _finish(_start_job(args, "add-replica", replica=replica.absolute(args.new)),
                   args.json, _describe_fill)


def _job_line(job):
    line = (f"{job['what']}: {job['state']}, {job['percent']}% of "
            f"{_mib(job['total_bytes'])} in {job['seconds']:.1f} s")
    if job["error"]:
        line += f": {job['error']}"
    r = job.get("result") or {}
    if job["state"] == "cancelled" and r.get("state"):
        line += f"; {r['replica']} is {r['state']}"
    return line


def cmd_job_show(args):
    runtime.require_root("quorumblk job")
    st = runtime.find(args.dev)
    job = runtime.request(st["id"], "job")["job"]
    if args.json:
        print(_json(job, sort_keys=True))
    else:
        print(_job_line(job) if job else f"no job has run on {st['path']}")
    return 0


def cmd_job_cancel(args, timeout=60.0):
    runtime.require_root("quorumblk job cancel")
    st = runtime.find(args.dev)
    job = runtime.request(st["id"], "cancel")["job"]
    deadline = time.monotonic() + timeout
    while job["state"] == "running":
        if time.monotonic() > deadline:
            raise errors.DaemonError(f"{job['what']} was asked to stop and still "
                                      f"runs {timeout:.0f} s later")
        time.sleep(0.1)
        job = runtime.request(st["id"], "job")["job"]
    print(_json(job, sort_keys=True) if args.json else _job_line(job))
    return 0


def cmd_remove_replica(args):
    runtime.require_root("quorumblk remove-replica")
    st = runtime.find(args.dev)
    res = runtime.request(st["id"], "remove-replica",
                          args={"replica": _replica(args.replica)})["result"]
    print(_json(res, sort_keys=True) if args.json else
          f"removed {res['removed']} from {st['path']}")
    return 0


def warn(text):
    print(f"quorumblk: warning: {text}", file=sys.stderr)


def _fail(args, message, code):
    """An error: one line on stderr, and with --json also a JSON object on
    stdout, for the script that reads it."""
    print(f"quorumblk: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(_json({"type": "error", "ok": False, "error": message,
                     "exit_code": code}, sort_keys=True), flush=True)
    return code


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CommandError as e:
        if args.debug:
            raise
        return _fail(args, str(e), e.exit_code)
    except QuorumError as e:
        if args.debug:
            raise
        return _fail(args, str(e), RefusedError.exit_code)
    except OSError as e:
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        return _fail(args, f"{where}{e.strerror or e}", 1)
    except KeyboardInterrupt:
        print("quorumblk: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
