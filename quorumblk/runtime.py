"""Runtime state of quorumblk devices: the files under /run/quorumblk/.

Per device N (the ublk id) the daemon keeps:
  N.json    its state: pid, id, path, threshold, options, replicas (path,
            device and inode), written atomically once the device is LIVE;
  N.events  the events it drained from the engine, one JSON object a line;
  N.sock    its control socket (mode 0600; only root may talk to it);
  N.log     what the daemon printed after it detached.
N.json also records the daemon's command line: del signals the pid it
names only if that process is still the same daemon (is_daemon).
The folder is /run/quorumblk (mode 0700), or QUORUMBLK_RUN_DIR (tests) when
that is set and is the caller's own directory that no one else may write
to. Every file in it is root's alone (0600), written without following a
symbolic link; N.json is replaced atomically from a temporary file of an
unpredictable name.

This module also holds the command's error family: every error a user can
cause is a CommandError subclass with its own message and exit code.
"""
import errno
import fcntl
import json
import os
import re
import socket
import stat
import tempfile
import time

from . import replica
from .errors import (CommandError, DaemonError, NoSuchDeviceError, NotRootError,
                     StartError, UblkMissingError)

DEFAULT_RUN_DIR = "/run/quorumblk"
CONTROL_TIMEOUT = 5.0


def device_module():
    """quorumblk.device, the ublk binding (tests put a fake in its place)."""
    try:
        from . import device
    except ImportError as e:
        raise StartError(f"this build has no ublk binding (quorumblk.device: {e})")
    return device


def run_dir():
    """/run/quorumblk, or QUORUMBLK_RUN_DIR (tests) when that is set: then
    only a directory of the caller's own that no one else may write to (a
    folder someone else controls must not receive root's files, nor name
    the pids that del signals)."""
    path = os.environ.get("QUORUMBLK_RUN_DIR")
    if not path:
        return DEFAULT_RUN_DIR
    why = _unsafe_dir(path)
    if why:
        raise CommandError(f"QUORUMBLK_RUN_DIR={path}: {why}: refused (it must be a "
                           f"directory of uid {os.geteuid()} that no other user may "
                           "write to; unset it to use /run/quorumblk)")
    return path


def _unsafe_dir(path):
    """Why path may not hold runtime files, or None (also when it does not
    exist yet: ensure_run_dir makes it, mode 0700)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def ensure_run_dir():
    """The run directory, made root-only (0700) if it is not there."""
    path = run_dir()
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    why = _unsafe_dir(path)
    if why:
        raise CommandError(f"{path}: {why}: refused (quorumblk keeps root's "
                           "runtime files there)")
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def open_private(path, append=False):
    """Open a runtime file for writing: created 0600 (made so if it was
    not), never through a symbolic link. Returns a text file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if append else os.O_TRUNC
    fd = _open_nofollow(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a" if append else "w")
    except BaseException:
        os.close(fd)
        raise


def _open_nofollow(path, flags, mode=0o600):
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CommandError(f"{path} is a symbolic link: refused (quorumblk "
                               "never follows one in its run directory)")
        raise


def state_path(dev_id):
    return os.path.join(run_dir(), f"{dev_id}.json")


def events_path(dev_id):
    return os.path.join(run_dir(), f"{dev_id}.events")


def sock_path(dev_id):
    return os.path.join(run_dir(), f"{dev_id}.sock")


def log_path(dev_id):
    return os.path.join(run_dir(), f"{dev_id}.log")


def require_root(what):
    if os.geteuid() != 0:
        raise NotRootError(f"{what} must be run as root (uid {os.geteuid()} is not): "
                           "ublk devices and their control sockets are root's")


# -- replicas and identity --

def replica_identity(path):
    """What makes a replica the same one whatever path names it: the
    device number for a block device, (device, inode) for a file, the URI
    for an NBD export (quorumblk.replica)."""
    if replica.is_nbd(path):
        return {"path": replica.identity(path), "kind": "nbd",
                "rdev": 0, "dev": 0, "ino": 0}
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        return {"path": os.path.abspath(path), "kind": "block",
                "rdev": st.st_rdev, "dev": st.st_dev, "ino": st.st_ino}
    return {"path": os.path.abspath(path), "kind": "file",
            "rdev": 0, "dev": st.st_dev, "ino": st.st_ino}


def same_replica(a, b):
    if a["kind"] == "nbd" or b["kind"] == "nbd":
        return a["kind"] == b["kind"] and a["path"] == b["path"]
    if a["kind"] == "block" and b["kind"] == "block":
        return a["rdev"] == b["rdev"]
    return a["kind"] == b["kind"] and (a["dev"], a["ino"]) == (b["dev"], b["ino"])


# -- process identity (a pid plus its start time, so that a reused pid
# is not mistaken for the daemon) --

def proc_start_time(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces: split after it
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19])


def pid_alive(pid, start_time=None):
    if not pid or pid <= 0:
        return False
    st = proc_start_time(pid)
    if st is None:
        return False
    if start_time is not None and st != start_time:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        if data[data.rindex(b")") + 2:][:1] == b"Z":
            return False
    except OSError:
        return False
    return True


def cmdline(pid):
    """The command line of process pid, as a list of str, or None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [w.decode(errors="surrogateescape") for w in raw.split(b"\0")[:-1]]


def is_daemon(state):
    """Whether the pid that state names is still that device's daemon: the
    same process (its start time) running the same command line as it did
    when it wrote the state (old state files: a quorumblk command)."""
    pid = state.get("pid")
    if not is_live(state):
        return False
    now = cmdline(pid)
    if now is None:
        return False
    if "cmdline" in state:
        return now == state["cmdline"]
    return any("quorumblk" in w for w in now)


# -- state files --

def write_state(state):
    """Write N.json atomically: a temporary file of an unpredictable name
    in the same directory (mode 0600), synced, then renamed over it."""
    path = state_path(state["id"])
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                               prefix=f".{state['id']}.json.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_state(dev_id):
    path = state_path(dev_id)
    try:
        fd = _open_nofollow(path, os.O_RDONLY | os.O_CLOEXEC)
        with os.fdopen(fd) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CommandError(f"{path}: unreadable state file: {e}")


def remove_files(dev_id, keep_events=True):
    names = [state_path(dev_id), sock_path(dev_id)]
    if not keep_events:
        names += [events_path(dev_id), log_path(dev_id)]
    for name in names:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
    from . import config        # its stable name, /dev/quorumblk/NAME
    config.unlink_for(dev_id)


def state_ids():
    try:
        names = os.listdir(run_dir())
    except FileNotFoundError:
        return []
    ids = []
    for name in names:
        m = re.fullmatch(r"(\d+)\.json", name)
        if m:
            ids.append(int(m.group(1)))
    return sorted(ids)


def is_live(state):
    return pid_alive(state.get("pid"), state.get("start_time"))


def kernel_has(dev_id):
    """Whether the kernel still has ublk device dev_id (whoever serves it)."""
    return os.path.isdir(f"/sys/class/ublk-char/ublkc{dev_id}")


def scan():
    """(live, orphaned): the states of devices whose daemon runs, and of
    those whose daemon died while the kernel still holds the device (`del`
    removes it). The files of other dead daemons are stale: removed."""
    live, orphaned = [], []
    for dev_id in state_ids():
        st = read_state(dev_id)
        if st is None:
            continue
        if is_live(st):
            live.append(st)
        elif kernel_has(dev_id):
            orphaned.append(st)
        else:
            remove_files(dev_id)
    return live, orphaned


def live_states():
    return scan()[0]


def replicas_in_use(identities, skip=None):
    """[(replica path given, device id, its path there)] for each replica
    that a running device (other than device skip) already uses."""
    clashes = []
    live, orphaned = scan()
    for st in live + orphaned:
        if st["id"] == skip:
            continue
        for theirs in st.get("replicas", []):
            for mine in identities:
                if same_replica(mine, theirs):
                    clashes.append((mine["path"], st["id"], theirs["path"]))
    return clashes


def parse_dev(dev):
    """A device given as N, ublkbN or /dev/ublkbN -> N."""
    m = re.fullmatch(r"(?:/dev/)?(?:ublkb)?(\d+)", str(dev).strip())
    if not m:
        raise NoSuchDeviceError(f"{dev!r} is not a quorumblk device "
                                "(give N, ublkbN or /dev/ublkbN)")
    return int(m.group(1))


def find(dev, orphans=False):
    """The device named dev, as its state dict. With orphans, also a device
    whose daemon died while the kernel still holds it."""
    dev_id = parse_dev(dev)
    st = read_state(dev_id)
    if st is None:
        raise NoSuchDeviceError(f"no quorumblk device {dev_id} "
                                f"(no {state_path(dev_id)})")
    if is_live(st):
        return st
    if kernel_has(dev_id):
        if orphans:
            return st
        raise DaemonError(f"quorumblk device {dev_id}: its daemon (pid {st.get('pid')}) "
                          f"died; the kernel still has the device: `quorumblk recover "
                          f"{dev_id}` serves it again, `quorumblk del {dev_id}` removes it")
    remove_files(dev_id)
    raise NoSuchDeviceError(f"quorumblk device {dev_id}: its daemon "
                            f"(pid {st.get('pid')}) is gone; removed its stale state")


# -- the lock that serialises adds (checks, start, state) --

class AddLock:
    def __init__(self):
        self.fd = None

    def acquire(self, timeout=60.0):
        path = os.path.join(ensure_run_dir(), "add.lock")
        self.fd = _open_nofollow(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.release()
                    raise DaemonError(f"{path}: another quorumblk add holds "
                                      f"the lock for over {timeout:.0f} s")
                time.sleep(0.05)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- the control socket protocol: one JSON request line, one JSON answer --

def request(dev_id, command, timeout=CONTROL_TIMEOUT, args=None):
    path = sock_path(dev_id)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
            s.sendall(json.dumps({"command": command, "args": args or {}}).encode()
                      + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            raise DaemonError(f"device {dev_id}: no answer on {path} "
                              f"within {timeout:.0f} s")
        except OSError as e:
            raise DaemonError(f"device {dev_id}: cannot talk to {path}: "
                              f"{e.strerror or e}")
    finally:
        s.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise DaemonError(f"device {dev_id}: bad answer on {path}: {data[:200]!r}")
    if not answer.get("ok"):
        message = f"device {dev_id}: {answer.get('error', 'request failed')}"
        if answer.get("exit_code"):     # the daemon refused: its reason
            raise CommandError(message, exit_code=answer["exit_code"])
        raise DaemonError(message)
    return answer


def read_events(dev_id, last=None):
    """Events from N.events (the last `last` of them when given)."""
    try:
        fd = _open_nofollow(events_path(dev_id), os.O_RDONLY | os.O_CLOEXEC)
        with os.fdopen(fd) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    if last is not None:
        lines = lines[-last:] if last else []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# -- the kernel side --

def ublk_check():
    """Raise UblkMissingError with what to do when ublk cannot be used."""
    if os.path.exists("/dev/ublk-control"):
        return
    release = os.uname().release
    has_module = os.path.isdir("/sys/module/ublk_drv")
    mod_dir = f"/lib/modules/{release}"
    found = False
    for root, _dirs, files in os.walk(os.path.join(mod_dir, "kernel", "drivers", "block")):
        if any(f.startswith("ublk_drv.ko") for f in files):
            found = True
            break
    builtin = False
    try:
        with open(os.path.join(mod_dir, "modules.builtin")) as f:
            builtin = "ublk_drv.ko" in f.read()
    except OSError:
        pass
    hint = ("ublk needs a kernel built with CONFIG_BLK_DEV_UBLK (Debian 12's 6.1 "
            "kernel has none; Debian's 6.12 backports kernel, linux-image-6.12-amd64, "
            "has it)")
    if has_module or builtin:
        raise UblkMissingError("/dev/ublk-control is missing although ublk_drv is "
                               "loaded: is /dev mounted (devtmpfs)?")
    if found:
        raise UblkMissingError("ublk_drv is not loaded: run `modprobe ublk_drv` "
                               f"(/dev/ublk-control is missing); {hint}")
    raise UblkMissingError(f"ublk_drv is not loaded and kernel {release} has no "
                           f"ublk_drv module: `modprobe ublk_drv` cannot work here; {hint}")


def id_in_use(dev_id):
    """Why dev_id is taken, or None."""
    for node in (f"/dev/ublkb{dev_id}", f"/dev/ublkc{dev_id}"):
        if os.path.exists(node):
            return f"{node} exists"
    if os.path.isdir(f"/sys/class/ublk-char/ublkc{dev_id}"):
        return f"the kernel has ublk device {dev_id}"
    st = read_state(dev_id)
    if st is not None and is_live(st):
        return f"quorumblk daemon pid {st['pid']} serves it"
    return None


def wait_gone(st, timeout):
    """Wait until the daemon of st has exited and its node is gone.
    Returns what is still there (empty when all is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        if is_live(st):
            left.append(f"daemon pid {st['pid']} still runs")
        if os.path.exists(st["path"]):
            left.append(f"{st['path']} still exists")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# -- who uses a device (del refuses a device in use) --

def _unescape(text):
    """A mountinfo or swaps field: spaces and the like come as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def holders(node, skip=(), probe=True):
    """What uses the device node (a block device, or the file the host tests
    fake one with): mounts (/proc/self/mountinfo), swap, devices stacked on
    it (sysfs holders), processes that have it open (/proc/PID/fd), and with
    probe, an exclusive claim none of these names (a mount in another mount
    namespace). Processes in skip are left out. Returns lines for people."""
    try:
        st = os.stat(node)
    except OSError:
        return []
    blk = stat.S_ISBLK(st.st_mode)
    out = []
    if blk:
        devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 4 and fields[2] == devno:
                        out.append(f"mounted on {_unescape(fields[4])}")
        except OSError:
            pass
        try:
            with open("/proc/swaps") as f:
                for line in list(f)[1:]:
                    name = _unescape(line.split()[0])
                    try:
                        if os.stat(name).st_rdev == st.st_rdev:
                            out.append(f"used as swap ({name})")
                    except OSError:
                        continue
        except OSError:
            pass
        try:
            for h in sorted(os.listdir(f"/sys/dev/block/{devno}/holders")):
                out.append(f"held by /dev/{h} (stacked on it)")
        except OSError:
            pass
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        pids = []
    for pid in sorted(pids):
        if pid in skip:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                fst = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (blk and stat.S_ISBLK(fst.st_mode) and fst.st_rdev == st.st_rdev) or \
                    (not blk and (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino)):
                out.append(f"open by pid {pid} ({_comm(pid)})")
                break
    if blk and probe and not out:
        try:
            os.close(os.open(node, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC |
                             os.O_NONBLOCK))
        except OSError as e:
            if e.errno == errno.EBUSY:
                out.append("claimed exclusively by the kernel (mounted in another "
                           "mount namespace, or part of a RAID or LVM set)")
    return out


def errno_name(err):
    return errno.errorcode.get(err, str(err))
