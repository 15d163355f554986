#!/usr/bin/env python3
"""quorumblk's seeded torture campaign (issue 8, section 3).

From one seed, a schedule of steps: each a batch of load from several
threads (reads, writes with and without FUA, flushes, discards and
write-zeroes of 512 B to max_io at random alignments) and one thrasher
action (bit flips in a minority of replicas' data and metadata, EIO,
hangs, late completions, fail + readd cycles, replace, add-replica,
remove-replica, scrub, bitmap clean, kill -9 of the worker, half of the
time with a write torn (held on some replicas), and a reassembly like a
power cut, whose resync runs while the next worker serves). The engine
runs in a worker process opened like `quorumblk add` does without the
device; this process keeps the model and checks, as it goes, that every
read returns a version the model allows, no acknowledged write is lost,
every read after a crash agrees with the first read of its sectors since
it (and the resync with it), EIO comes only where no quorum can exist, no
operation outlives the replica timeout plus a margin, fds and RSS do not
grow with fail/readd cycles, and after the final scrub every in-service
replica is byte-identical.

With --device (as root, where the kernel has ublk: the device VM) the same
campaign runs over /dev/ublkbN: the set is made with `quorumblk add`, the
load is system calls on the block device opened O_DIRECT (preadv, pwritev
with RWF_DSYNC for FUA, fsync/fdatasync, BLKDISCARD/BLKZEROOUT and
fallocate PUNCH_HOLE/ZERO_RANGE), replica changes and scrubs go through the
quorumblk command, the replicas are dm devices over loop devices over
images in /dev/shm, and their faults are device-mapper's: dm-error
(eio, and a replica failed for a readd cycle), dm-flakey (writes fail),
error ranges (bad sectors, the metadata tail), a suspended table (hang; late:
held past the timeout, then released). A crash is kill -9 of the daemon
and of the load process, then `quorumblk recover`. "clean" waits for the
daemon's own bitmap cleaner.

It prints the seed; on a violation it re-runs shorter prefixes of the same
schedule (on fresh images, twice each: failures can depend on timing) and
prints the shortest `--seed S --steps M` that reproduces it. A replay runs
the same steps; the worker's threads may interleave differently.

Exit status: 0 no violation, 1 violations, 2 usage.
"""
import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torturelib import report                           # noqa: E402
from torturelib.campaign import Campaign                # noqa: E402
from torturelib.schedule import DECK, SABOTAGE, Schedule, Setup  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(
        prog="torture.py", description=__doc__,
        epilog="A replay (--seed S --steps M) runs the same steps and actions; "
               "the worker's threads interleave as they will, so a timing-dependent "
               "failure may need a couple of tries.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, help="first seed (default: a random one, printed)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--minutes", type=float,
                     help="run seeds S, S+1, ... for this long (default 1)")
    how.add_argument("--steps", type=int, help="run exactly the first M steps of seed S")
    p.add_argument("--seed-steps", type=int, default=250, metavar="M",
                   help="with --minutes: at most M steps per seed, then the next seed "
                        "(default 250), so that a long run covers many setups")
    p.add_argument("--json", action="store_true", help="print a JSON summary last")
    p.add_argument("--medium", choices=("tmpfs", "disk"),
                   help="where the replica images live (default: per seed)")
    p.add_argument("--dir", help="directory for the images (default: /dev/shm or /var/tmp)")
    p.add_argument("--device", action="store_true",
                   help="run over a real /dev/ublkbN (root, a kernel with ublk; in "
                        "the device VM), replicas on dm devices in /dev/shm")
    p.add_argument("--margin", type=float,
                   help="seconds an op may take beyond the replica timeout "
                        "(default 2, with --device 8: an emulated VM)")
    p.add_argument("--go-on", action="store_true",
                   help="keep going after a violation (later ones may be its echoes)")
    p.add_argument("--no-bisect", action="store_true",
                   help="do not look for the shortest reproducing prefix")
    p.add_argument("--bisect-minutes", type=float, default=10.0,
                   help="time allowed to look for it (default 10)")
    p.add_argument("--sabotage", metavar="KIND@STEP",
                   help="self-test: plant damage the model is not told of "
                        f"({', '.join(SABOTAGE)}) at that step")
    p.add_argument("--skip", metavar="KINDS", default="",
                   help="deal these action kinds (comma-separated) as quiet steps, "
                        "to look past a known defect")
    p.add_argument("--readd-limit", type=int, default=0, metavar="N",
                   help="restart the worker cleanly before it has done N readds "
                        "(to look past a defect that grows with readds)")
    p.add_argument("--ignore", metavar="CATEGORIES", default="",
                   help="count violations of these categories (comma-separated, e.g. "
                        "fd-leak) without stopping or failing: known defects")
    p.add_argument("--keep", action="store_true", help="keep the images of every run")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.sabotage:
        kind, _, step = args.sabotage.partition("@")
        if kind not in SABOTAGE or not step.isdigit():
            p.error(f"--sabotage KIND@STEP with KIND one of {', '.join(SABOTAGE)}")
        args.sabotage = (kind, int(step))
    args.skip = tuple(k for k in args.skip.split(",") if k)
    unknown = [k for k in args.skip if k not in DECK]
    if unknown:
        p.error(f"--skip {','.join(unknown)}: not an action kind ({', '.join(sorted(set(DECK)))})")
    args.ignore = tuple(k for k in args.ignore.split(",") if k)
    if args.device:
        if os.geteuid() != 0 or not os.path.exists("/dev/ublk-control"):
            p.error("--device needs root and the ublk driver (modprobe ublk_drv); "
                    "scripts/test-device boots a VM that has both")
        if args.medium == "disk":
            p.error("--device keeps its images in /dev/shm: no --medium disk")
    if args.margin is None:
        args.margin = 8.0 if args.device else 2.0
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1 << 31)
    if args.minutes is None and args.steps is None:
        args.minutes = 1.0
    return args


def image_dir(medium, given):
    if given:
        return given
    return "/dev/shm" if medium == "tmpfs" and os.path.isdir("/dev/shm") else "/var/tmp"


def run_once(seed, args, steps=None, deadline=None, log=None, stop=True):
    setup = Setup.from_seed(seed, args.medium, args.device)
    workdir = tempfile.mkdtemp(prefix=f"qbtorture-{seed}-",
                               dir=image_dir(setup.medium, args.dir))
    t0 = time.monotonic()
    campaign = Campaign(setup, Schedule(setup, args.sabotage, args.skip), workdir,
                        steps=steps, deadline=deadline, margin=args.margin, log=log,
                        stop_on_violation=stop, readd_limit=args.readd_limit,
                        ignore=args.ignore).run()
    rec = report.record(campaign, time.monotonic() - t0)
    if not campaign.violations and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return rec


def prefix_of(violation, rec):
    """Steps a replay needs to reach the violation."""
    return rec["steps"] if violation["step"] == "final" else violation["step"] + 1


def reproduces(seed, steps, category, args, tries=2):
    for _ in range(tries):
        rec = run_once(seed, args, steps=steps)
        if not args.keep:
            shutil.rmtree(rec["workdir"], ignore_errors=True)
        if any(v["category"] == category for v in rec["violations"]):
            return True
    return False


def shortest_prefix(seed, violation, rec, args, say):
    """Bisect on the step count for the shortest prefix of seed's schedule
    that shows a violation of the same category (fresh images each time)."""
    hi = prefix_of(violation, rec)
    end = time.monotonic() + args.bisect_minutes * 60
    say(f"seed {seed}: looking for the shortest prefix showing {violation['category']} "
        f"(up to {hi} steps)")
    if not reproduces(seed, hi, violation["category"], args):
        return None, hi
    lo = 1
    while lo < hi and time.monotonic() < end:
        mid = (lo + hi) // 2
        if reproduces(seed, mid, violation["category"], args):
            hi = mid
        else:
            lo = mid + 1
        say(f"seed {seed}: {violation['category']} reproduces within {hi} steps "
            f"(not within {lo - 1})")
    return hi, hi


def findings_of(rec, args, say):
    out = []
    seen = set()
    for v in rec["violations"]:
        if v["category"] in seen:
            continue
        seen.add(v["category"])
        base = f"python tests/torture.py --seed {rec['seed']}"
        if args.device:
            base += " --device"
        if args.medium:
            base += f" --medium {args.medium}"
        if args.skip:
            base += f" --skip {','.join(args.skip)}"
        if args.readd_limit:
            base += f" --readd-limit {args.readd_limit}"
        if args.ignore:
            base += f" --ignore {','.join(args.ignore)}"
        if args.sabotage:
            base += f" --sabotage {args.sabotage[0]}@{args.sabotage[1]}"
        if args.no_bisect:
            cmd = f"{base} --steps {prefix_of(v, rec)}"
        else:
            m, tried = shortest_prefix(rec["seed"], v, rec, args, say)
            cmd = (f"{base} --steps {m}" if m else
                   f"{base} --steps {tried}   (did not reproduce in 2 tries)")
        out.append(dict(v, seed=rec["seed"], reproduce=cmd))
    return out


def main(argv=None):
    args = parse(argv)
    say = (lambda text: None) if args.quiet else (
        lambda text: print(text, file=sys.stderr, flush=True))
    say(f"torture: seed {args.seed}" + (f", {args.minutes} minutes" if args.minutes
                                        else f", {args.steps} steps"))
    records = []
    if args.steps is not None:
        records.append(run_once(args.seed, args, steps=args.steps, log=say,
                                stop=not args.go_on))
    else:
        deadline = time.monotonic() + args.minutes * 60
        seed = args.seed
        while time.monotonic() < deadline:
            say(f"seed {seed}: {Setup.from_seed(seed, args.medium, args.device).describe()}")
            records.append(run_once(seed, args, steps=args.seed_steps, deadline=deadline,
                                    log=say, stop=not args.go_on))
            say(f"seed {seed}: {records[-1]['steps']} steps, "
                f"{len(records[-1]['violations'])} violations")
            seed += 1
    findings = []
    for rec in records:
        findings += findings_of(rec, args, say)
    print(report.figures(records, findings))
    if args.json:
        print(json.dumps({"total": report.total(records), "runs": records,
                          "findings": findings}, default=str))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
