"""What kind of replica a path names: a file, a block device, or an NBD
export given as a URI (nbd://host[:port]/export,
nbd+unix:///export?socket=PATH). An NBD URI is no file: nothing here or in
its callers stats, resolves, creates or truncates it, and its identity (the
"same replica twice" and "replica in use" checks) is the URI itself."""
import os
import stat
from urllib.parse import parse_qs, urlsplit

from . import mounts
from ._core import ffi, lib
from .errors import raise_for

NBD_DEFAULT_PORT = 10809
_NBD_PREFIXES = ("nbd:", "nbd+", "nbds:", "nbds+")


def is_nbd(path):
    return str(path).startswith(_NBD_PREFIXES)


def kind(path):
    """"nbd", "block-device" or "file"."""
    if is_nbd(path):
        return "nbd"
    try:
        return "block-device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    except OSError:
        return "file"


def server(path, mountinfo="/proc/self/mountinfo"):
    """The server that holds a replica, as users name it: an NBD export's
    host:port or socket path; an image file on NFS, its mount's source
    (host:/export); None for a local file or block device. A file is looked
    at (stat): call it while the replica is open, not when its server may
    not answer."""
    if not is_nbd(path):
        try:
            with open(mountinfo) as f:
                m = mounts.mount_of(path, mounts.parse(f.read()))
        except OSError:
            return None
        return m.source if m is not None and m.fstype in mounts.NETWORK_FS else None
    u = urlsplit(str(path))
    if u.scheme.endswith("+unix"):
        return parse_qs(u.query).get("socket", [None])[0]
    host = u.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{u.port or NBD_DEFAULT_PORT}"


def identity(path):
    """What tells two replicas apart: the URI of an export, the resolved
    path of a file or device."""
    return str(path) if is_nbd(path) else os.path.realpath(path)


def absolute(path):
    """A path made absolute (the daemon works from /); a URI as it is."""
    return str(path) if is_nbd(path) else os.path.abspath(path)


def exists(path):
    """A file that is there; an NBD URI is taken as there (its server is
    asked when the replica is opened)."""
    return is_nbd(path) or os.path.exists(path)


def size(path):
    """(bytes, fixed): fixed when it cannot be grown (a block device, an
    export). An export's size comes from its server."""
    if is_nbd(path):
        out = ffi.new("uint64_t *")
        raise_for(lib.qb_nbd_export_size(str(path).encode(), out), lib, ffi)
        return out[0], True
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.lseek(fd, 0, os.SEEK_END), True
        finally:
            os.close(fd)
    return st.st_size, False


def tail_is_zero(path, offset, length):
    """Whether [offset, offset + length) of an NBD export reads as zeros."""
    ret = lib.qb_nbd_export_zero(str(path).encode(), offset, length)
    raise_for(min(ret, 0), lib, ffi)
    return ret == 1
