"""The commands for devices that come back (quorumblk.config): examine,
assemble, config list|show|remove|install-unit, and add --save."""
import os
import shutil
import sys

from . import config, daemon, events, runtime
from .errors import CommandError, UsageError


def _dir_option(parser):
    parser.add_argument("--config-dir", metavar="DIR", default=None,
                        help="where the device entries are (default "
                        f"{config.DEFAULT_DIR})")


def add_options(a):
    """add's options for saving the device's entry."""
    s = a.add_argument_group("configuration")
    s.add_argument("--save", metavar="NAME", default=None,
                   help="once the device is LIVE, write its entry NAME.toml (for "
                   "`quorumblk assemble NAME`) and give it the stable name "
                   "/dev/quorumblk/NAME")
    s.add_argument("--allow-degraded", action="store_true",
                   help="with --save: the entry lets assemble start the device "
                   "with members missing")
    _dir_option(s)


def register(sub, ready, warn):
    """Add the subcommands; ready and warn are cli's."""
    ex = sub.add_parser("examine", help="print a replica's quorumblk metadata",
                        description="What REPLICA's metadata says (set, replica, slot, "
                        "members and their states, event count, sizes, dirty regions); "
                        "reads it only. Exit 1 if it has none.")
    ex.add_argument("replica", metavar="REPLICA", help="an image file or block device")
    ex.add_argument("--json", action="store_true", help="print JSON")
    ex.set_defaults(func=cmd_examine)

    asm = sub.add_parser(
        "assemble", help="start a configured device by its set's identity",
        description="Start device NAME from its entry (NAME.toml): the listed "
        "replicas (and what its `devices` globs match) are checked by their "
        "metadata: a configured path of another set, or without metadata, is "
        "refused; members that are missing refuse the start (exit 10) unless "
        "--degraded or the entry's allow_degraded, and then it starts degraded "
        "with a member-missing event for each. Then as `add`: prints the "
        "device's path once it is LIVE, and /dev/quorumblk/NAME names it.")
    g = asm.add_mutually_exclusive_group(required=True)
    g.add_argument("name", metavar="NAME", nargs="?", help="the device's name")
    g.add_argument("--scan", action="store_true",
                   help="every configured device that does not run")
    asm.add_argument("--degraded", action="store_true",
                     help="start even with members missing")
    asm.add_argument("--foreground", "-f", action="store_true",
                     help="serve in this process (for systemd) instead of detaching")
    asm.add_argument("--json", action="store_true", help="print JSON")
    _dir_option(asm)
    asm.set_defaults(func=lambda args: cmd_assemble(args, ready, warn))

    cf = sub.add_parser("config", help="list, show or remove device entries; "
                        "install their systemd units",
                        description="The device entries, DIR/NAME.toml (see "
                        "`add --save`).")
    csub = cf.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    ls = csub.add_parser("list", help="the configured devices")
    ls.add_argument("--json", action="store_true", help="print JSON")
    _dir_option(ls)
    ls.set_defaults(func=cmd_config_list)
    for name, func, text in (("show", cmd_config_show, "print an entry"),
                             ("remove", cmd_config_remove, "remove an entry")):
        cp = csub.add_parser(name, help=text)
        cp.add_argument("name", metavar="NAME")
        cp.add_argument("--json", action="store_true", help="print JSON")
        _dir_option(cp)
        cp.set_defaults(func=func)
    iu = csub.add_parser(
        "install-unit", help="write and enable quorumblk@NAME.service",
        description="Write UNIT_DIR/quorumblk@NAME.service, which runs "
        "`quorumblk assemble --foreground NAME` at boot (before local-fs.target, "
        "after the replicas' mounts and disks) and stops the device at shutdown, "
        "and enable it (a link in local-fs.target.wants). An fstab entry on "
        "/dev/quorumblk/NAME needs x-systemd.requires=quorumblk@NAME.service.")
    iu.add_argument("name", metavar="NAME")
    iu.add_argument("--unit-dir", default=None, metavar="DIR",
                    help=f"default {config.DEFAULT_UNIT_DIR}")
    iu.add_argument("--no-enable", dest="enable", action="store_false",
                    help="only write the unit")
    iu.add_argument("--exec", dest="exe", default=None, metavar="PATH",
                    help="the quorumblk command the unit runs (default: the one "
                    "on PATH, else /usr/local/bin/quorumblk)")
    _dir_option(iu)
    iu.set_defaults(func=cmd_install_unit)


def _print(args, obj, text):
    print(events.dumps(obj, indent=1, sort_keys=True) if args.json else text)


def cmd_examine(args):
    info = config.examine(args.replica)
    if info is None:
        if args.json:
            print(events.dumps({"path": args.replica, "metadata": False}))
        raise CommandError(f"{args.replica}: no quorumblk metadata")
    if args.json:
        print(events.dumps(dict(info, metadata=True), indent=1, sort_keys=True))
        return 0
    print(f"{info['path']}: quorumblk replica, slot {info['slot']}")
    for k in ("set_uuid", "replica_uuid", "threshold", "events", "data_size",
              "replica_size", "region_size", "regions", "dirty_regions"):
        print(f"  {k.replace('_', ' ')}: {info[k]}")
    print(f"  state: {'clean' if info['clean'] else 'dirty (resync at the next start)'}")
    print(f"  members ({len(info['members'])}):")
    for m in info["members"]:
        print(f"    {m['slot']} {m['uuid']} {m['state']}"
              f"{' (full sync)' if m['full_sync'] else ''}{'  <- this one' if m['this'] else ''}")
    return 0


def save_check(args):
    """Before add --save starts anything: a good name, no entry yet, the
    folder can be made, the name is not running."""
    if args.save is None:
        if args.allow_degraded:
            raise UsageError("--allow-degraded is for --save")
        return
    config.check_new(args.save, args.config_dir)
    config.check_unused(args.save)


def save(args, replicas, engine, devopts, res):
    """Write the entry of the device add made LIVE."""
    entry = config.entry_for(args.save, replicas, args.threshold, engine, devopts,
                             args.allow_degraded)
    try:
        path = config.write(entry, args.config_dir)
    except OSError as e:
        raise CommandError(f"{res['path']} is LIVE, but its entry was not saved: "
                           f"{e.filename or ''}: {e.strerror}")
    print(f"quorumblk: saved {path}", file=sys.stderr)


def cmd_assemble(args, ready, warn):
    runtime.require_root("quorumblk assemble")
    if args.scan:
        return _scan(args, ready, warn)
    entry = config.read(args.name, args.config_dir)
    return _assemble_one(args, entry, ready, warn)


def _assemble_one(args, entry, ready, warn):
    paths, missing = config.plan_assemble(entry, args.degraded, warn)
    if missing:
        warn(f"{entry['name']}: starting degraded: {config.describe_missing(missing)} "
             "missing")
    engine, devopts = config.options(entry, args.config_dir)
    res = daemon.add(paths, entry["threshold"], engine, devopts,
                     foreground=args.foreground, warn=warn, ready=ready(args))
    if args.foreground:
        return res
    print(events.dumps(dict(res, name=entry["name"]), sort_keys=True) if args.json
          else res["path"])
    return 0


def _scan(args, ready, warn):
    if args.foreground:
        raise UsageError("--scan starts detached devices: no --foreground")
    running = config.running_names()
    worst = 0
    for name in config.names(args.config_dir):
        if name in running:
            continue
        try:
            _assemble_one(args, config.read(name, args.config_dir), ready, warn)
        except CommandError as e:
            print(f"quorumblk: {name}: {e}", file=sys.stderr)
            worst = max(worst, e.exit_code)
    return worst


def cmd_config_list(args):
    out = []
    running = config.running_names() if os.geteuid() == 0 else {}
    for name in config.names(args.config_dir):
        st = running.get(name)
        out.append({"name": name, "running": st["path"] if st else None})
    _print(args, out, "\n".join(f"{e['name']}  {e['running'] or 'not running'}"
                                for e in out) or "no configured devices")
    return 0


def cmd_config_show(args):
    entry = config.read(args.name, args.config_dir)
    _print(args, entry, config.dumps(entry).split("\n", 1)[1].rstrip("\n"))
    return 0


def cmd_config_remove(args):
    path = config.remove(args.name, args.config_dir)
    _print(args, {"removed": path}, f"removed {path}")
    return 0


def cmd_install_unit(args):
    entry = config.read(args.name, args.config_dir)
    exe = args.exe or shutil.which("quorumblk") or "/usr/local/bin/quorumblk"
    if not os.path.isabs(exe):
        raise UsageError(f"--exec {exe}: give an absolute path")
    where = config.config_dir(args.config_dir)     # the unit names a moved one
    paths = config.install_unit(entry, exe, args.unit_dir, args.enable,
                                None if where == config.DEFAULT_DIR else where)
    print("\n".join(f"wrote {p}" for p in paths))
    return 0
