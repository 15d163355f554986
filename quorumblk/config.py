"""Devices that come back: the configuration, examine and assemble.

One TOML file per device, DIR/NAME.toml, where DIR is /etc/quorumblk, or
--config-dir, or QUORUMBLK_CONFIG_DIR (tests) when that is the caller's own
directory that no one else may write to (as runtime.py treats
QUORUMBLK_RUN_DIR). An entry names the device's replica set by the set UUID
its metadata holds; the replica paths are hints: assemble opens them (and
whatever the optional `devices` globs match) and keeps what the metadata
says is a member of that set. `add --save NAME` writes the entry once the
device is LIVE. The file must not be writable by anyone but its owner (root
runs what it says).

A running device with a name has a stable path, /dev/quorumblk/NAME ->
../ublkbN (QUORUMBLK_DEV_DIR for tests), made by its daemon once the device
is LIVE and removed with the device's runtime files.
"""
import glob
import os
import re
import stat
import tempfile
import time
import uuid

from . import meta, replica, runtime
from .errors import (CommandError, ConfigError, NoSuchDeviceError, RefusedError,
                     UsageError)

DEFAULT_DIR = "/etc/quorumblk"
DEFAULT_DEV_DIR = "/dev/quorumblk"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")

# key: (type, required); engine and device options are as `add` takes them
KEYS = {
    "name": (str, True), "set_uuid": (str, True), "threshold": (int, True),
    "replicas": (list, True), "members": (list, False), "devices": (list, False),
    "allow_degraded": (bool, False),
    "read_policy": (str, False), "hash": (str, False), "vote_block": (int, False),
    "repair": (bool, False), "buffered": (bool, False), "timeout": (float, False),
    "queues": (int, False), "depth": (int, False), "block_size": (int, False),
    "id": (int, False),
}
ENGINE = ("read_policy", "hash", "vote_block", "repair", "buffered", "timeout")
DEFAULTS = {"read_policy": "all", "hash": "xxh3", "vote_block": 4096,
            "repair": True, "buffered": False, "timeout": 30.0, "depth": 128,
            "block_size": 512, "queues": None, "id": None, "devices": [],
            "members": [], "allow_degraded": False}


# the values `add` accepts (cli.py checks the same on the command line)
CHECKS = [
    ("read_policy", lambda v: v in ("all", "threshold", "fifo"), "all, threshold or fifo"),
    ("hash", lambda v: v in ("xxh3", "sha256"), "xxh3 or sha256"),
    ("vote_block", lambda v: 512 <= v <= 512 << 10 and not v & (v - 1),
     "a power of two from 512 to 524288"),
    ("timeout", lambda v: 0 < v < float("inf"), "a positive number of seconds"),
    ("queues", lambda v: 1 <= v <= 64, "1 to 64"),
    ("depth", lambda v: 1 <= v <= 4096, "1 to 4096"),
    ("block_size", lambda v: v in (512, 4096), "512 or 4096"),
    ("id", lambda v: 0 <= v < 1 << 20, f"0 to {(1 << 20) - 1}"),
]


def check_name(name):
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"bad device name {name!r}: use 1 to 64 of A-Z a-z 0-9 "
                         ". _ - (not starting with '.')")
    return name


def _private_env_dir(var):
    path = os.environ.get(var)
    if not path:
        return None
    why = runtime._unsafe_dir(path)
    if why:
        raise CommandError(f"{var}={path}: {why}: refused (it must be a directory "
                           f"of uid {os.geteuid()} that no other user may write to)")
    return path


def config_dir(explicit=None):
    return explicit or _private_env_dir("QUORUMBLK_CONFIG_DIR") or DEFAULT_DIR


def entry_path(name, directory=None):
    return os.path.join(config_dir(directory), check_name(name) + ".toml")


# -- reading --

def _toml_loads(text):
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading the configuration needs Python 3.11 or "
                              "later (tomllib), or the tomli package")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"bad TOML: {e}")


def _check_file(path, fd):
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: not a regular file: refused")
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{path}: owned by uid {st.st_uid}: refused (root acts "
                          "on what it says)")
    if st.st_mode & 0o022:
        raise ConfigError(f"{path}: writable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): refused (root acts on "
                          "what it says; chmod go-w it)")


def read(name, directory=None):
    """The entry of device NAME as a dict (defaults filled in)."""
    path = entry_path(name, directory)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NoSuchDeviceError(f"no configured device {name} (no {path})")
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}")
    with os.fdopen(fd, "rb") as f:
        _check_file(path, fd)
        raw = f.read()
    try:
        data = _toml_loads(raw.decode("utf-8"))
        return _validate(data, name)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {e}")


def _validate(data, name):
    for k in data:
        if k not in KEYS:
            raise ValueError(f"unknown key {k!r}")
    out = dict(DEFAULTS)
    for k, (kind, required) in KEYS.items():
        if k not in data:
            if required:
                raise ValueError(f"{k} is missing")
            continue
        v = data[k]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ValueError(f"{k} must be a {kind.__name__}, not {v!r}")
        if kind is list and not all(isinstance(x, str) for x in v):
            raise ValueError(f"{k} must be a list of strings")
        out[k] = v
    if out["name"] != name:
        raise ValueError(f"name is {out['name']!r}, not {name!r} as the file's name says")
    if not out["replicas"] or not all(os.path.isabs(p) or replica.is_nbd(p)
                                      for p in out["replicas"]):
        raise ValueError("replicas must be a list of absolute paths or NBD URIs")
    if not 1 <= out["threshold"] <= len(out["replicas"]):
        raise ValueError(f"threshold {out['threshold']} out of range 1..{len(out['replicas'])}")
    for k, ok, what in CHECKS:
        if out[k] is not None and not ok(out[k]):
            raise ValueError(f"{k} = {out[k]!r}: {what}")
    try:
        out["set_uuid"] = str(uuid.UUID(out["set_uuid"]))
    except ValueError:
        raise ValueError(f"set_uuid {out['set_uuid']!r} is not a UUID")
    return out


def names(directory=None):
    d = config_dir(directory)
    try:
        files = os.listdir(d)
    except FileNotFoundError:
        return []
    return sorted(f[:-5] for f in files
                  if f.endswith(".toml") and NAME_RE.fullmatch(f[:-5]))


# -- writing --

def _quote(text):
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7f:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _quote(v)
    return "[" + ", ".join(_quote(x) for x in v) + "]"


def dumps(entry):
    lines = [f"# quorumblk device {entry['name']}: written by `quorumblk add --save` "
             f"on {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    for k in KEYS:
        if entry.get(k) is not None:
            lines.append(f"{k} = {_value(entry[k])}")
    return "\n".join(lines) + "\n"


def check_new(name, directory=None):
    """Refuse an entry that exists; make the folder (0755). Before add."""
    path = entry_path(name, directory)
    if os.path.lexists(path):
        raise UsageError(f"{path} exists: device {name} is configured already "
                         f"(`quorumblk config remove {name}` first)")
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    return path


def write(entry, directory=None, replace=False):
    """Write the entry atomically (mode 0644), refusing to replace one
    unless told to (a running device's entry following its members)."""
    path = entry_path(entry["name"], directory) if replace else \
        check_new(entry["name"], directory)
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(dumps(entry))
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            tmp = None
        else:
            os.link(tmp, path)      # never replaces an entry made meanwhile
    finally:
        if tmp:
            os.unlink(tmp)
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def entry_for(name, replicas, threshold, engine, devopts, allow_degraded=False):
    """The entry for a device that `add` made LIVE: the set UUID and the
    members as the replicas' metadata now holds them."""
    members, set_uuid = [], None
    for p in replicas:
        m, _ = meta.read(p)
        if m is None:
            raise ConfigError(f"{p}: no quorumblk metadata after the add")
        set_uuid = meta.uuid_text(m.set_uuid)
        members.append(meta.uuid_text(m.replica_uuid))
    e = {"name": name, "set_uuid": set_uuid, "threshold": threshold,
         "replicas": [replica.absolute(p) for p in replicas], "members": members,
         "allow_degraded": allow_degraded}
    e.update({k: engine[k] for k in ENGINE})
    e.update({"queues": devopts["queues"], "depth": devopts["depth"],
              "block_size": devopts["block_size"], "id": devopts["dev_id"]})
    return e


def follow(name, directory, set_uuid, members):
    """A running device's members changed (replace, add-replica,
    remove-replica): its entry names them from now on, so that the next
    assemble finds a replacement kept outside the old folders and does not
    wait for a removed member. members: [(path, replica UUID)] in slot
    order. True if the entry was rewritten; an entry of another set is left
    alone (False)."""
    entry = read(name, directory)
    if entry["set_uuid"] != set_uuid:
        return False
    paths = [p for p, _ in members]
    uuids = [u for _, u in members]
    if entry["replicas"] == paths and entry["members"] == uuids:
        return False
    entry["replicas"], entry["members"] = paths, uuids
    write(entry, directory, replace=True)
    return True


def remove(name, directory=None):
    path = entry_path(name, directory)
    try:
        os.unlink(path)
    except FileNotFoundError:
        raise NoSuchDeviceError(f"no configured device {name} (no {path})")
    return path


# -- examine --

def examine(path):
    """What a replica's metadata says (read-only), or None without any."""
    m, bitmap = meta.read(path)
    if m is None:
        return None
    dirty = meta.dirty_ranges(bitmap, m.region_shift, m.nregions, merge=False)
    members = []
    for s in range(m.nmembers):
        members.append({"slot": s, "uuid": meta.uuid_text(m.members[s].uuid),
                        "state": meta.STATE_NAMES.get(m.members[s].state, "unknown"),
                        "full_sync": bool(m.members[s].flags & meta.FULL_SYNC),
                        "this": s == m.slot})
    return {"path": path, "set_uuid": meta.uuid_text(m.set_uuid),
            "replica_uuid": meta.uuid_text(m.replica_uuid), "slot": m.slot,
            "threshold": m.threshold, "events": m.events, "seq": m.seq,
            "created": m.ctime, "data_size": m.data_size,
            "replica_size": m.replica_size, "region_size": 1 << m.region_shift,
            "regions": m.nregions, "dirty_regions": len(dirty),
            "clean": not dirty, "members": members}


# -- assemble --

def _scan_candidates(configured):
    """Where members that moved may be: every block device (when a replica
    is one: disks come back under other names) and the regular files in the
    configured image files' folders."""
    out = []
    if any(p.startswith("/dev/") for p in configured):
        try:
            names = sorted(os.listdir("/sys/class/block"))
        except OSError:
            names = []
        for n in names:
            if n.startswith(("ublkb", "sr", "fd")):
                continue
            try:
                with open(f"/sys/class/block/{n}/size") as f:
                    if int(f.read()) == 0:
                        continue
            except (OSError, ValueError):
                continue
            out.append("/dev/" + n)
    for d in sorted({os.path.dirname(p) for p in configured
                     if not p.startswith("/dev/") and not replica.is_nbd(p)}):
        try:
            out += [os.path.join(d, n) for n in sorted(os.listdir(d))]
        except OSError:
            pass
    return out


def find_members(entry):
    """The replicas of the entry's set: [(path, header)] in slot order, the
    missing members [(uuid, configured path or None)], and what was left
    out [text]: a configured path that now holds another set or nothing of
    quorumblk's (named, never used), a former member. Candidates: the
    configured paths, the `devices` globs, then a scan (_scan_candidates)."""
    want = entry["set_uuid"]
    configured = list(entry["replicas"])
    candidates = (configured +
                  [p for g in entry["devices"] for p in sorted(glob.glob(g))] +
                  _scan_candidates(configured))
    found, seen, left_out = {}, set(), []
    for p in candidates:
        try:
            st = None if replica.is_nbd(p) else os.stat(p)
        except OSError:
            continue
        if st and not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            continue
        key = ("nbd", p) if st is None else \
            (st.st_rdev, st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) \
            else (st.st_rdev,)
        if key in seen:
            continue
        seen.add(key)
        try:
            m, _ = meta.read(p)
        except meta.SetError as e:
            if p in configured:
                left_out.append(f"{p}: {e}")
            continue
        if m is None or meta.uuid_text(m.set_uuid) != want:
            if p in configured:
                left_out.append(f"{p} " + (
                    "has no quorumblk metadata" if m is None else
                    f"belongs to another replica set ({meta.uuid_text(m.set_uuid)})")
                    + f", not set {want}: refused")
            continue
        rid = meta.uuid_text(m.replica_uuid)
        if rid in found:
            raise RefusedError(f"{entry['name']}: {found[rid][0]} and {p} are copies "
                               f"of the same replica ({rid}): refused")
        found[rid] = (p, m)
    if not found:
        raise RefusedError(f"{entry['name']}: no member of set {want} found"
                           + "".join(f"; {w}" for w in left_out))
    ref = max((m for _, m in found.values()), key=lambda m: m.events)
    slots = {meta.uuid_text(ref.members[s].uuid): s for s in range(ref.nmembers)
             if ref.members[s].state != meta.REMOVED}
    members = []
    for rid, (p, m) in found.items():
        if rid in slots:
            members.append((slots[rid], p, m))
        else:
            left_out.append(f"{p} (replica {rid}) is no longer a member of set "
                            f"{want}: left out")
    members.sort()
    hints = dict(zip(entry["members"], entry["replicas"]))
    missing = [(u, hints.get(u)) for u in slots if u not in found]
    return [(p, m) for _, p, m in members], missing, left_out


def describe_missing(missing):
    return ", ".join(f"member {u}" + (f" ({p})" if p else "") for u, p in missing)


def running_names():
    """{name: device state} of the running devices that have one."""
    out = {}
    for st in runtime.live_states():
        name = (st.get("options") or {}).get("name")
        if name:
            out[name] = st
    return out


def check_unused(name):
    st = running_names().get(name)
    if st:
        raise RefusedError(f"device {name} runs already: {st['path']} (pid "
                           f"{st['pid']})")


def plan_assemble(entry, degraded=False, warn=None):
    """The replica paths to add for the entry, after every check."""
    check_unused(entry["name"])
    members, missing, left_out = find_members(entry)
    if missing and not (degraded or entry["allow_degraded"]):
        raise RefusedError(
            f"{entry['name']}: {len(missing)} of {len(members) + len(missing)} "
            f"members missing: {describe_missing(missing)}"
            + "".join(f"; {w}" for w in left_out)
            + "; refused (--degraded starts it without them)")
    for w in left_out:
        if warn:
            warn(f"{entry['name']}: {w}")
    return [p for p, _ in members], missing


def options(entry, directory=None):
    engine = {k: entry[k] for k in ENGINE}
    devopts = {"queues": entry["queues"], "depth": entry["depth"],
               "block_size": entry["block_size"], "dev_id": entry["id"],
               "name": entry["name"], "config_dir": config_dir(directory)}
    return engine, devopts


# -- the stable name --

def dev_dir():
    return _private_env_dir("QUORUMBLK_DEV_DIR") or DEFAULT_DEV_DIR


def link(name, dev_path):
    """dev_dir()/NAME -> the device node, replacing (never following) what
    was there."""
    d = dev_dir()
    os.makedirs(d, mode=0o755, exist_ok=True)
    path = os.path.join(d, check_name(name))
    tmp = os.path.join(d, f".{name}.{os.getpid()}")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(os.path.relpath(dev_path, d), tmp)
    os.replace(tmp, path)
    return path


def unlink_for(dev_id):
    """Remove the names that point at device dev_id's node."""
    try:
        d = dev_dir()
        entries = os.listdir(d)
    except (OSError, CommandError):
        return
    for n in entries:
        p = os.path.join(d, n)
        try:
            if os.path.basename(os.readlink(p)) == f"ublkb{dev_id}":
                os.unlink(p)
        except OSError:
            pass


# -- systemd --

def _unit_escape(path):
    """systemd-escape --path PATH."""
    out = []
    for i, ch in enumerate(path.strip("/")):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_") or (ch == "." and i):
            out.append(ch)
        else:
            out.append("".join(f"\\x{b:02x}" for b in ch.encode()))
    return "".join(out) or "-"


def _unit_needs(entry):
    """(image files, block devices, remote) of the entry's replicas: remote
    when one is an NBD export or a file on NFS."""
    files, devs, remote = [], [], False
    for p in entry["replicas"]:
        if replica.is_nbd(p):       # the unit waits for no file for it
            remote = True
            continue
        try:
            blk = stat.S_ISBLK(os.stat(p).st_mode)
        except OSError:
            blk = p.startswith("/dev/")
        (devs if blk else files).append(p)
        remote = remote or (not blk and replica.server(p) is not None)
    return files, devs, remote


def unit_target(entry):
    """The target the unit comes up before and is wanted by. A replica on
    NFS or an NBD server needs the network: the device then comes up with
    the remote file systems, not before the local ones (that order would be
    a cycle with the NFS mount it requires)."""
    return "remote-fs.target" if _unit_needs(entry)[2] else "local-fs.target"


def unit_text(entry, exe, directory=None):
    name = entry["name"]
    files, devs, remote = _unit_needs(entry)
    fs_target = unit_target(entry)
    dir_opt = f" --config-dir {os.path.abspath(directory)}" if directory else ""
    lines = [
        f"# quorumblk device {name}: written by `quorumblk config install-unit {name}`.",
        f"# Serves /dev/quorumblk/{name}, assembled from {config_dir(directory)}/{name}.toml.",
        f"# An fstab entry on /dev/quorumblk/{name} needs the option",
        f"# x-systemd.requires=quorumblk@{name}.service (then it mounts after the",
        "# device is LIVE and is unmounted before the device stops).",
        "[Unit]",
        f"Description=quorumblk voting block device {name}",
        "DefaultDependencies=no",
        "Wants=systemd-modules-load.service",
        "After=systemd-modules-load.service systemd-udevd.service",
    ]
    if remote:
        lines += ["Wants=network-online.target",
                  "After=network-online.target remote-fs-pre.target"]
    if files:
        lines.append("RequiresMountsFor=" + " ".join(sorted({os.path.dirname(p) for p in files})))
    for p in devs:
        unit = _unit_escape(p) + ".device"
        lines += [f"Wants={unit}", f"After={unit}"]
    lines += [
        f"Before={fs_target} umount.target shutdown.target",
        "Conflicts=umount.target shutdown.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        "ExecStartPre=-/sbin/modprobe ublk_drv",
        f"ExecStart={exe} assemble --foreground{dir_opt} {name}",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        "TimeoutStartSec=300",
        "TimeoutStopSec=120",
        # a crash (a signal, the OOM killer) leaves the device quiesced, and
        # the same assemble takes it over; a refusal (an exit status) is
        # for the operator, not for a loop
        "Restart=on-abnormal",
        "RestartSec=2",
        "",
        "[Install]",
        f"WantedBy={fs_target}",
    ]
    return "\n".join(lines) + "\n"


def install_unit(entry, exe, unit_dir=None, enable=True, directory=None):
    """Write unit_dir/quorumblk@NAME.service and enable it (a link in
    local-fs.target.wants, or remote-fs.target.wants for remote replicas).
    Returns the paths written."""
    unit_dir = unit_dir or DEFAULT_UNIT_DIR
    unit = f"quorumblk@{entry['name']}.service"
    path = os.path.join(unit_dir, unit)
    os.makedirs(unit_dir, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=unit_dir)
    with os.fdopen(fd, "w") as f:
        f.write(unit_text(entry, exe, directory))
        os.fchmod(f.fileno(), 0o644)
    os.replace(tmp, path)
    out = [path]
    if enable:
        target = unit_target(entry)
        for t in ("local-fs.target", "remote-fs.target"):
            lnk = os.path.join(unit_dir, t + ".wants", unit)
            if os.path.lexists(lnk):        # this one's, or an earlier install's
                os.unlink(lnk)
        wants = os.path.join(unit_dir, target + ".wants")
        os.makedirs(wants, mode=0o755, exist_ok=True)
        lnk = os.path.join(wants, unit)
        os.symlink(os.path.join("..", unit), lnk)
        out.append(lnk)
    return out
