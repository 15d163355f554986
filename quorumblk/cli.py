"""The quorumblk command: add, list, status, del and recover quorumblk devices.

Each handler is a call or two into quorumblk.daemon; main() turns every
error into `quorumblk: <message>` on stderr and the error's exit status
(a traceback only with --debug).
"""
import argparse
import json
import sys
import time

from . import daemon, runtime
from .errors import QuorumError
from .runtime import CommandError

EXIT_CODES = """exit status:
  0 success             5 replica used by another device
  1 other failure       6 device id in use
  2 bad usage           7 no such device
  3 not root            8 daemon did not answer or stop in time
  4 no ublk driver      9 the device did not start (or recover)
                       10 the replicas were refused (threshold, size, open)
                       11 not recoverable (daemon alive, device not quiesced)
"""
ENGINE_REFUSED = 10


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
    if v & (v - 1) or not 512 <= v <= daemon.DEVICE_MAX_IO:
        raise argparse.ArgumentTypeError(
            f"vote block {text} must be a power of two from 512 to {daemon.DEVICE_MAX_IO}")
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


def build_parser():
    p = argparse.ArgumentParser(
        prog="quorumblk",
        description="A block device (/dev/ublkbN) over N replica images: writes go "
                    "to every replica, reads are voted per block.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true",
                   help="show a traceback on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    a = sub.add_parser("add", help="create a device over replica images",
                       description="Create /dev/ublkbN over the replicas and serve it "
                       "from a daemon; prints the device's path once it is LIVE.")
    a.add_argument("--threshold", "-t", type=int, required=True, metavar="K",
                   help="replicas that must agree on a block (1..N)")
    a.add_argument("replicas", nargs="+", metavar="REPLICA",
                   help="replica image files or block devices, all the same size")
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
    a.set_defaults(func=cmd_add)

    ls = sub.add_parser("list", help="list the devices")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)

    st = sub.add_parser("status", help="counters, replica states, recent events")
    st.add_argument("dev", metavar="DEV", help="N, ublkbN or /dev/ublkbN")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)

    de = sub.add_parser("del", help="stop and delete devices")
    g = de.add_mutually_exclusive_group(required=True)
    g.add_argument("dev", metavar="DEV", nargs="?", help="N, ublkbN or /dev/ublkbN")
    g.add_argument("--all", action="store_true", help="every quorumblk device")
    de.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS",
                    help="give up waiting for the daemon after this (default 60)")
    de.add_argument("--json", action="store_true", help="print JSON")
    de.set_defaults(func=cmd_del)

    rc = sub.add_parser(
        "recover", help="serve a device again after its daemon died",
        description="Serve DEV again after its daemon died (kill -9, a crash): the "
        "kernel keeps the device quiesced, and I/O issued meanwhile waits. The "
        "replicas, threshold and options come from /run/quorumblk/N.json; regions "
        "with writes in flight at the crash are resynced by vote first. Prints the "
        "device's path once it is LIVE again. Refused (exit 11) when the daemon "
        "still runs or the kernel does not hold the device quiesced.")
    rc.add_argument("dev", metavar="DEV", help="N, ublkbN or /dev/ublkbN")
    rc.add_argument("--foreground", "-f", action="store_true",
                    help="serve in this process (for systemd) instead of detaching")
    rc.add_argument("--json", action="store_true", help="print JSON")
    rc.set_defaults(func=cmd_recover)
    return p


# -- handlers --

def cmd_add(args):
    if len(args.replicas) > 16:
        raise CommandError(f"{len(args.replicas)} replicas: at most 16", exit_code=2)
    engine = {"read_policy": args.read_policy, "hash": args.hash,
              "vote_block": args.vote_block, "repair": args.repair,
              "buffered": args.buffered, "timeout": args.timeout}
    devopts = {"queues": args.queues, "depth": args.depth,
               "block_size": args.block_size, "dev_id": args.dev_id}
    res = daemon.add(args.replicas, args.threshold, engine, devopts,
                     foreground=args.foreground, warn=warn)
    if args.foreground:
        return res
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        print(res["path"])
    return 0


def cmd_list(args):
    runtime.require_root("quorumblk list")
    devs = daemon.list_devices()
    if args.json:
        print(json.dumps(devs, indent=1, sort_keys=True))
        return 0
    if not devs:
        print("no quorumblk devices")
        return 0
    for d in devs:
        good = sum(r["state"] == "in-service" for r in d["replicas"])
        print(f"{d['path']}  id {d['id']}  {d['state']}  threshold {d['threshold']}"
              f"  {good}/{len(d['replicas'])} replicas in service  pid {d['pid']}")
        for r in d["replicas"]:
            print(f"  {r['state']:<11} {r['path']}")
    return 0


def cmd_status(args):
    runtime.require_root("quorumblk status")
    s = daemon.device_status(args.dev)
    if args.json:
        print(json.dumps(s, indent=1, sort_keys=True))
        return 0
    print(f"{s['path']}  id {s['id']}  {s['state']}  pid {s['pid']}  "
          f"size {s['size']} bytes  threshold {s['threshold']}  "
          f"{s['in_service']}/{len(s['replicas'])} replicas in service")
    c = s["counters"]
    print("device: " + "  ".join(f"{k} {c[k]}" for k in sorted(c)))
    for r in s["replicas"]:
        print(f"replica {r['index']} {r['state']} {r['path']}")
        print("  " + "  ".join(f"{k} {r[k]}" for k in sorted(r)
                               if k not in ("path", "state", "index")))
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
            done.append(daemon.delete(t, timeout=args.timeout))
        except CommandError as e:
            if not args.all:
                raise
            failed.append((t, e))
            print(f"quorumblk: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(done if args.all else done[0], sort_keys=True))
    else:
        for d in done:
            print(f"deleted {d['path']}")
    if failed:
        return max(e.exit_code for _t, e in failed)
    return 0


def cmd_recover(args):
    res = daemon.recover(args.dev, foreground=args.foreground, warn=warn)
    if args.foreground:
        return res
    if args.json:
        print(json.dumps(res, sort_keys=True))
    else:
        print(res["path"])
    return 0


def warn(text):
    print(f"quorumblk: warning: {text}", file=sys.stderr)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CommandError as e:
        if args.debug:
            raise
        print(f"quorumblk: {e}", file=sys.stderr)
        return e.exit_code
    except QuorumError as e:
        if args.debug:
            raise
        print(f"quorumblk: {e}", file=sys.stderr)
        return ENGINE_REFUSED
    except OSError as e:
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"quorumblk: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("quorumblk: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
