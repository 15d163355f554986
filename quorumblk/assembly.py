"""What add and recover check, and do, before a device serves: every check
of the replica set (threshold, paths, sizes, duplicates, metadata), of
replicas another device uses, of the id and of the ublk driver, writing
nothing; then the first writes (a new set's metadata), the engine opened
over the replicas, and the resync the assembly needs. Also whether a device
whose daemon died can be taken over (recover)."""
import mmap
import os
import threading
import time
import warnings

from . import client, errors, meta, mounts, replica, runtime
from .core import Quorum
from .errors import NoSuchDeviceError, RefusedError

DEVICE_MAX_IO = 512 * 1024
ENGINE_KEYS = ("read_policy", "hash", "vote_block", "repair", "buffered",
               "timeout")
DEVICE_KEYS = ("queues", "depth", "block_size", "dev_id", "name", "config_dir")


def check_set(replicas, threshold, engine, reuse=None):
    """Every check of the replicas themselves, writing nothing: the
    threshold, replicas another device uses (other than device reuse:
    recover), what the engine refuses (paths, sizes, duplicates, direct
    I/O), and their metadata (quorumblk.meta: a new set is only planned).
    Returns (plan, warnings as text)."""
    if not 1 <= threshold <= len(replicas):
        raise RefusedError(f"threshold {threshold} out of range: it must be 1 to "
                           f"{len(replicas)} (the number of replicas)")
    check_answers(replicas, engine.get("timeout") or 30.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_free([runtime.replica_identity(p) for p in replicas
                    if replica.exists(p)], skip=reuse)
        Quorum(replicas, threshold, max_io=DEVICE_MAX_IO, **engine).close()
        plan = meta.assemble([str(p) for p in replicas], threshold, write=False)
    msgs = [str(w.message) for w in caught]
    msgs += mounts.warnings(replicas, buffered=engine.get("buffered", False))
    if plan.missing:
        msgs.append(f"{len(plan.missing)} member(s) of the set not given: the "
                    "device runs degraded until they are back (quorumblk readd)")
    return plan, msgs


def check_answers(replicas, timeout):
    """Every replica answers within timeout seconds (the replica timeout):
    its first block is read, O_DIRECT, in a thread of its own. A file whose
    NFS server is unreachable (a hard mount waits for it) would otherwise
    hold add or recover forever; such a probe is left to the kernel. What
    fails quickly (a missing file) is left to the checks that follow."""
    def probe(path):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
        except OSError:
            pass
        finally:
            os.close(fd)

    threads = [threading.Thread(target=probe, args=(str(p),), daemon=True)
               for p in replicas]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    silent = [str(p) for p, t in zip(replicas, threads) if t.is_alive()]
    if silent:
        raise RefusedError(f"{', '.join(silent)} does not answer: a read of its "
                           f"first block took more than {timeout:g} s (is its "
                           "server unreachable?)")


def open_set(replicas, threshold, engine, plan):
    """The first write to the replicas, once every check has passed: a new
    set is made (image files grow, headers are written); then the engine
    opens them. The plan is not acted on further yet (see prepare)."""
    if plan.created:
        meta.commit([str(p) for p in replicas], plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # check_set said them already
        return Quorum(replicas, threshold, max_io=DEVICE_MAX_IO, **engine)


def prepare(q, plan):
    """Record the assembly in every replica's header and attach the metadata
    to the engine. Returns the resync (a meta.Resync): what the bitmap says
    may differ is resynced by a job once the device is LIVE (_start); the
    engine reads those regions by the crash rule meanwhile."""
    meta.commit(q.paths, plan)
    q.set_meta(plan.metas, plan.bitmap)
    rs = meta.Resync(q, plan)
    if not rs.needed:
        rs.run()
    return rs


def describe_resync(r, dev=None):
    why = {"unclean-stop": "after an unclean stop",
           "stale-replica": "to bring " + ", ".join(r["stale"] or ["?"]) + " up to date"}
    if not r["done"]:
        total = r.get("total_bytes", r["bytes"])
        return (f"a resync of {total} bytes ({r['regions']} regions, "
                f"{100.0 * total / max(r['size'], 1):.2f}% of {r['size']}) "
                f"{why.get(r['reason'], '')} runs while the device serves "
                f"({r['bytes']} bytes done); follow it with `quorumblk job show "
                f"{'DEV' if dev is None or dev < 0 else dev}`")
    text = (f"resynced {r['bytes']} bytes ({r['regions']} regions, "
            f"{100.0 * r['bytes'] / max(r['size'], 1):.2f}% of {r['size']}) "
            f"{why.get(r['reason'], '')}")
    if r["unrecoverable_blocks"]:
        text += f"; {r['unrecoverable_blocks']} blocks had no quorum"
    if r.get("kept_out"):
        text += (f"; {', '.join(r['kept_out'])} kept out of service (they cannot "
                 "get those blocks): readd them once the blocks are written")
    return text


def check_free(idents, skip=None):
    """Refuse replicas that a running device (other than skip) already uses."""
    clashes = runtime.replicas_in_use(idents, skip)
    if clashes:
        path, other, theirs = clashes[0]
        same = "" if path == theirs else f" as {theirs}"
        raise errors.ReplicaInUseError(
            f"replica {path} is already used by quorumblk device {other}{same} "
            f"(/dev/ublkb{other})")


def check_add(replicas, dev_id):
    """Everything about an add that is not the engine's: replicas already
    serving another device, the id, the driver. Returns the replicas'
    identities."""
    idents = [runtime.replica_identity(p) for p in replicas]
    check_free(idents)
    if dev_id is not None and dev_id >= 0:
        why = runtime.id_in_use(dev_id)
        if why:
            raise errors.IdInUseError(f"device id {dev_id} is in use: {why}")
    runtime.ublk_check()
    device = runtime.device_module()
    ok, reason = device.ublk_available()
    if not ok:
        raise errors.UblkMissingError(f"ublk cannot be used: {reason}")
    return idents


# -- recovery after a daemon crash --
#
# Devices are made with ublk user recovery: when the daemon dies (kill -9, a
# crash) the kernel keeps /dev/ublkbN, holds it quiesced (new I/O waits, and
# what the dead daemon had taken is reissued later) and waits for a new
# server. Its state file stays in /run/quorumblk and names everything a new
# daemon needs.

def recoverable(dev_id):
    """The state of device dev_id when a new daemon can take it over, else
    the error that says why not."""
    st = runtime.read_state(dev_id)
    if st is None:
        raise NoSuchDeviceError(f"no quorumblk device {dev_id} "
                                f"(no {runtime.state_path(dev_id)})")
    if runtime.is_live(st):
        raise errors.NotRecoverableError(
            f"quorumblk device {dev_id}: its daemon (pid {st['pid']}) is alive: "
            "nothing to recover")
    if not runtime.kernel_has(dev_id):
        runtime.remove_files(dev_id)
        raise NoSuchDeviceError(f"quorumblk device {dev_id}: its daemon (pid {st['pid']}) "
                                "is gone and so is the kernel's device; removed its "
                                "stale state")
    why = client.orphan_state(st)
    if why["state"] != "quiesced":
        raise errors.NotRecoverableError(f"quorumblk device {dev_id} cannot be "
                                          f"recovered: {why['error']}")
    return st


def recovers(replicas, dev_id):
    """The device that `add [--id dev_id] REPLICA...` means to recover, or
    None: one whose daemon died while the kernel holds it quiesced, with
    these replicas in this order (device dev_id when given, else any).
    How the systemd unit's `assemble --foreground NAME` (an add) comes back
    after a crash, and what re-running the add after one means."""
    if dev_id is not None and dev_id >= 0:
        st = runtime.read_state(dev_id)
        if st is None or runtime.is_live(st) or not runtime.kernel_has(dev_id):
            return None
        candidates = [st]
    else:
        candidates = runtime.scan()[1]
    try:
        mine = [runtime.replica_identity(p) for p in replicas]
    except OSError:
        return None
    for st in candidates:
        theirs = st.get("replicas", [])
        if len(mine) == len(theirs) and all(
                runtime.same_replica(a, b) for a, b in zip(mine, theirs)) and \
                client.orphan_state(st)["state"] == "quiesced":
            return st["id"]
    return None
