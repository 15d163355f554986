"""What add and recover check, and do, before a device serves: every check
of the replica set (threshold, paths, sizes, duplicates, metadata), of
replicas another device uses, of the id and of the ublk driver, writing
nothing; then the first writes (a new set's metadata), the engine opened
over the replicas, and the resync the assembly needs. Also whether a device
whose daemon died can be taken over (recover)."""
import os
import warnings

from . import client, errors, meta, replica, runtime
from .core import Quorum
from .errors import NoSuchDeviceError, RefusedError

DEVICE_MAX_IO = 512 * 1024
ENGINE_KEYS = ("read_policy", "hash", "vote_block", "repair", "buffered",
               "timeout")
DEVICE_KEYS = ("queues", "depth", "block_size", "dev_id", "name")


def check_set(replicas, threshold, engine, reuse=None):
    """Every check of the replicas themselves, writing nothing: the
    threshold, replicas another device uses (other than device reuse:
    recover), what the engine refuses (paths, sizes, duplicates, direct
    I/O), and their metadata (quorumblk.meta: a new set is only planned).
    Returns (plan, warnings as text)."""
    if not 1 <= threshold <= len(replicas):
        raise RefusedError(f"threshold {threshold} out of range: it must be 1 to "
                           f"{len(replicas)} (the number of replicas)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_free([runtime.replica_identity(p) for p in replicas
                    if replica.exists(p)], skip=reuse)
        Quorum(replicas, threshold, max_io=DEVICE_MAX_IO, **engine).close()
        plan = meta.assemble([str(p) for p in replicas], threshold, write=False)
    msgs = [str(w.message) for w in caught]
    if plan.missing:
        msgs.append(f"{len(plan.missing)} member(s) of the set not given: the "
                    "device runs degraded until they are back (quorumblk readd)")
    return plan, msgs


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
    """Whether `add --id dev_id REPLICA...` means: recover device dev_id (its
    daemon died, the kernel holds it quiesced, and it has these replicas in
    this order). How the systemd unit comes back after a crash."""
    if dev_id is None or dev_id < 0:
        return False
    st = runtime.read_state(dev_id)
    if st is None or runtime.is_live(st) or not runtime.kernel_has(dev_id):
        return False
    theirs = st.get("replicas", [])
    try:
        mine = [runtime.replica_identity(p) for p in replicas]
    except OSError:
        return False
    if len(mine) != len(theirs) or not all(
            runtime.same_replica(a, b) for a, b in zip(mine, theirs)):
        return False
    return client.orphan_state(st)["state"] == "quiesced"
