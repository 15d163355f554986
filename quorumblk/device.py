"""A Quorum served as a Linux block device, /dev/ublkbN, through ublk.

The whole data path is C (csrc/ublk.c): one thread per hardware queue, each
owning an engine context whose io_uring carries both the ublk commands and
the replica I/O. Python only starts, watches and stops the device.

    from quorumblk import Quorum
    from quorumblk.device import Device

    q = Quorum(["a.img", "b.img", "c.img"], 2, max_io=512 << 10)
    dev = Device.start(q, user_recovery=True)   # returns once /dev/ublkbN is LIVE
    print(dev.path)
    # if this process dies, another one (same replicas) takes over:
    #   dev = Device.recover(q, dev_id)
    ...
    dev.stop()                       # STOP_DEV, join the queues, DEL_DEV
    q.close()                        # (close() also stops a device still serving)

Needs root and the ublk_drv module (Linux 6.4 or later for the encoded
commands used here; `modprobe ublk_drv`). A failed start leaves no device
behind.
"""
import errno
import os
import subprocess

from ._core import ffi, lib
from .errors import InvalidArgumentError, QuorumError, raise_for

CONTROL = "/dev/ublk-control"

#: UBLK_F_* feature bits by name (kernel UAPI include/uapi/linux/ublk_cmd.h).
FEATURES = {
    "zero-copy": 0, "uring-cmd-comp-in-task": 1, "need-get-data": 2,
    "user-recovery": 3, "user-recovery-reissue": 4, "unprivileged-dev": 5,
    "cmd-ioctl-encode": 6, "user-copy": 7, "zoned": 8,
    "user-recovery-fail-io": 9, "update-size": 10, "auto-buf-reg": 11,
    "quiesce": 12, "per-io-daemon": 13,
}

#: Device states as the kernel reports them.
STATES = {lib.QB_UBLK_DEAD: "dead", lib.QB_UBLK_LIVE: "live",
          lib.QB_UBLK_QUIESCED: "quiesced", lib.QB_UBLK_FAIL_IO: "fail-io"}

# A ublk request can carry at most this much unless the kernel allows more;
# pass it as Quorum(max_io=...) for devices.
DEFAULT_MAX_IO = 512 << 10


def _check(ret):
    return raise_for(ret, lib, ffi)


def _made(make, *args):
    """The struct qb_dev * that make(*args, out) returns in out."""
    out = ffi.new("struct qb_dev **")
    _check(make(*args, out))
    return out[0]


def feature_names(mask):
    """The names of the UBLK_F_* bits set in mask (unknown bits as 'bit N')."""
    names = [n for n, b in FEATURES.items() if mask & (1 << b)]
    known = sum(1 << b for b in FEATURES.values())
    names += [f"bit {b}" for b in range(64) if mask & ~known & (1 << b)]
    return names


def features():
    """The kernel's ublk feature mask (GET_FEATURES; Linux 6.5 or later).
    Raises QuorumError when ublk is missing."""
    out = ffi.new("uint64_t *")
    _check(lib.qb_ublk_features(out))
    return int(out[0])


def _info_dict(info):
    return {
        "id": info.dev_id,
        "path": f"/dev/ublkb{info.dev_id}",
        "char_path": f"/dev/ublkc{info.dev_id}",
        "state": STATES.get(info.state, str(info.state)),
        "pid": info.pid,
        "queues": info.queues,
        "depth": info.depth,
        "max_io": info.max_io,
        "flags": int(info.flags),
        "features": feature_names(int(info.flags)),
        "size": int(info.sectors) * 512,
        "logical_block_size": info.logical_bs,
        "physical_block_size": info.physical_bs,
    }


def dev_info(dev_id):
    """What the kernel says of ublk device dev_id (any server's), as a dict:
    id, path, char_path, state ("dead", "live", "quiesced", "fail-io"),
    pid (the server's, -1 when none), queues, depth, max_io, flags,
    features, size (bytes; 0 before its parameters are set),
    logical_block_size, physical_block_size. Raises InvalidArgumentError
    (ENODEV) when there is no such device."""
    info = ffi.new("struct qb_dev_info *")
    _check(lib.qb_ublk_dev_info(int(dev_id), info))
    return _info_dict(info)


def list_ids():
    """Ids of every ublk device present (from /sys/class/ublk-char)."""
    ids = []
    try:
        names = os.listdir("/sys/class/ublk-char")
    except FileNotFoundError:
        return ids
    for name in names:
        if name.startswith("ublkc") and name[5:].isdigit():
            ids.append(int(name[5:]))
    return sorted(ids)


def delete(dev_id):
    """Stop and delete ublk device dev_id whoever serves it (for a device
    whose server died). Blocks until the kernel has released it."""
    _check(lib.qb_ublk_del(int(dev_id)))


def ublk_available(load=False):
    """(True, "") when ublk devices can be made here, else (False, why).
    With load=True, try `modprobe ublk_drv` first when the control node is
    missing."""
    if not os.path.exists(CONTROL) and load:
        try:
            subprocess.run(["modprobe", "ublk_drv"], capture_output=True,
                           timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            pass
    if not os.path.exists(CONTROL):
        return False, (f"{CONTROL} is missing: the ublk driver is not loaded "
                       f"(run `modprobe ublk_drv`; kernel {os.uname().release}"
                       " may not have it: Debian's 6.12 kernel does, 6.1 does not)")
    if os.geteuid() != 0:
        return False, "ublk devices need root (CAP_SYS_ADMIN)"
    try:
        mask = features()
    except QuorumError as e:
        return False, f"ublk GET_FEATURES failed: {e}"
    if not mask & (1 << FEATURES["cmd-ioctl-encode"]):
        return False, "the kernel's ublk lacks ioctl-encoded commands (6.4+)"
    return True, ""


class Device:
    """A running /dev/ublkbN served by this process.

    Attributes: id (int), path ("/dev/ublkbN"), char_path ("/dev/ublkcN"),
    quorum (the Quorum served), queues, depth, block_size, max_io.
    Stop it before closing its Quorum.
    """

    def __init__(self, quorum, handle):
        self.quorum = quorum
        self._d = handle
        info = ffi.new("struct qb_dev_info *")
        lib.qb_dev_get_info(handle, info)
        self.id = int(info.dev_id)
        self.path = f"/dev/ublkb{self.id}"
        self.char_path = f"/dev/ublkc{self.id}"
        self.queues = info.queues
        self.depth = info.depth
        self.block_size = info.logical_bs
        self.max_io = info.max_io
        self.flags = int(info.flags)

    @classmethod
    def start(cls, quorum, *, queues=None, depth=128, block_size=512,
              dev_id=-1, user_recovery=False):
        """Add and start a ublk device over quorum; returns once it is LIVE.

        queues: hardware queues, one serving thread each (default
        min(CPUs, 4); the kernel caps it at the CPU count). depth: requests
        in flight per queue (1..4096). block_size: logical block, 512 or
        4096 (the physical block is 4096). dev_id: -1 lets the kernel pick.
        user_recovery: if this process dies, the device waits (quiesced) for
        a new server instead of going away.

        Raises InvalidArgumentError for bad parameters or an id in use
        (EEXIST), QuorumError otherwise; on any failure no device is left.
        """
        if quorum.closed:
            raise QuorumError(errno.EBADF, "the quorum is closed")
        for name, value in (("depth", depth), ("block size", block_size),
                            ("device id", dev_id),
                            ("queues", 0 if queues is None else queues)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidArgumentError(
                    errno.EINVAL, f"{name} {value!r} is not an integer")
        if queues is not None and queues < 1:
            raise InvalidArgumentError(errno.EINVAL,
                                       f"queues {queues}: must be at least 1")
        if depth < 1:
            raise InvalidArgumentError(errno.EINVAL,
                                       f"depth {depth}: must be at least 1")
        p = ffi.new("struct qb_dev_params *")
        lib.qb_dev_params_default(p)
        if queues is not None:
            p.queues = queues
        p.depth = depth
        p.logical_bs = block_size
        p.dev_id = dev_id
        p.flags = lib.QB_DEV_USER_RECOVERY if user_recovery else 0
        return quorum.serve(lambda cq: cls(quorum, _made(lib.qb_dev_start, cq, p)))

    @classmethod
    def recover(cls, quorum, dev_id, *, block_size=0):
        """Serve ublk device dev_id again from this process after its server
        died: the device was started with user_recovery=True and the kernel
        holds it quiesced (I/O waits meanwhile; what the dead server had
        taken is reissued). Returns once it is LIVE again.

        quorum must be the device's own replica set (its size is checked
        against the device's); block_size, when not 0, must be the device's.
        Queues and depth are the device's. Waits up to 20 s for the kernel
        to quiesce a device whose server just died.

        Raises InvalidArgumentError when the device cannot be recovered (no
        such device, not quiesced, made without user recovery, another
        size or block size), QuorumError otherwise; on a failure the device
        is left as it was (quiesced), never deleted.
        """
        if getattr(quorum, "_q", None) is None:
            raise QuorumError(errno.EBADF, "the quorum is closed")
        for name, value in (("device id", dev_id), ("block size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidArgumentError(
                    errno.EINVAL, f"{name} {value!r} is not an integer")
        p = ffi.new("struct qb_dev_params *")
        lib.qb_dev_params_default(p)
        p.logical_bs = block_size
        p.flags = lib.QB_DEV_USER_RECOVERY
        return quorum.serve(
            lambda cq: cls(quorum, _made(lib.qb_dev_recover, cq, dev_id, p)))

    def info(self):
        """dev_info() of this device (asks the kernel)."""
        return dev_info(self.id)

    def wait(self, timeout=None):
        """Sleep until a queue loop ends (the device was stopped or deleted
        from outside, or a queue failed) or timeout seconds pass. True when
        it ended; then call stop() to release everything. The wait happens
        in C without the GIL; a thread that must run Python signal handlers
        (the daemon's main thread) should wait with a timeout in a loop."""
        if self._d is None:
            return True
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        return lib.qb_dev_wait(self._d, ms) == 0

    def stop(self):
        """Orderly stop: STOP_DEV while the queues still serve (I/O in
        flight completes), join the queue threads, DEL_DEV. Idempotent."""
        if self._d is None:
            return
        d, self._d = self._d, None
        self.quorum.served_no_more(self)
        _check(lib.qb_dev_stop(d))

    @property
    def running(self):
        return self._d is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        state = "running" if self._d is not None else "stopped"
        return f"<Device {self.path} {state}>"
