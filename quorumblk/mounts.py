"""The mount a replica's file lives on, read from /proc/self/mountinfo, and
the warnings it deserves: what makes a network file system hide a
replica's rot from the vote."""
import os
import re

NETWORK_FS = ("nfs", "nfs4")


class Mount:
    """One line of mountinfo (proc(5)): the device number, the mount point,
    the file system type and source, and its options (the mount's own and
    the super block's together)."""

    def __init__(self, dev, mount_point, fstype, source, options):
        self.dev = dev
        self.mount_point = mount_point
        self.fstype = fstype
        self.source = source
        self.options = options

    def has(self, name):
        return any(o == name or o.startswith(name + "=") for o in self.options)


def _unescape(field):
    # mountinfo writes space, tab, newline and backslash as \040 and the like
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse(text):
    """The Mounts of mountinfo's text, in its order (a later mount on the
    same point hides an earlier one)."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue                    # not a mountinfo line
        sep = fields.index("-", 6)
        major, minor = fields[2].split(":")
        tail = fields[sep + 1:] + ["", ""]
        out.append(Mount((int(major), int(minor)), _unescape(fields[4]),
                         tail[0], _unescape(tail[1]),
                         fields[5].split(",") + tail[2].split(",")))
    return out


def mount_of(path, mounts):
    """The mount that holds path (an existing file): the one with its device
    number whose mount point is the longest prefix of its real path; None
    when no line matches."""
    st = os.stat(path)
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    real = os.path.realpath(path)
    best, rank = None, None
    for m in mounts:
        if m.dev != dev:
            continue
        inside = real == m.mount_point or \
            real.startswith(m.mount_point.rstrip("/") + "/")
        if rank is None or (inside, len(m.mount_point)) >= rank:
            best, rank = m, (inside, len(m.mount_point))
    return best


def unsafe(path, m, buffered=False):
    """What is unsafe about mount m for the replica at path: warning texts.
    A replica opened buffered on NFS: the client's page cache answers its
    reads, so rot in the server's copy goes unseen by the vote. (Soft mounts
    were measured and are not here: with O_DIRECT the client's give-up is
    an EIO that fails the replica, and the given-up write did not land
    later; README, "Files on NFS".)"""
    if m is None or m.fstype not in NETWORK_FS or not buffered:
        return []
    return [f"{path} is on {m.source} ({m.fstype} on {m.mount_point}) and "
            "opened buffered: the NFS client's page cache answers its reads, "
            "so rot in the server's copy goes unseen; leave the replicas "
            "O_DIRECT (no --buffered)"]


def warnings(paths, buffered=False, mountinfo="/proc/self/mountinfo"):
    """The warnings for the replicas at paths (those that exist)."""
    with open(mountinfo) as f:
        mounts = parse(f.read())
    out = []
    for p in paths:
        if os.path.exists(p) and not os.path.isdir(p):
            out += unsafe(p, mount_of(p, mounts), buffered)
    return out
