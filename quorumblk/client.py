"""The commands that talk to running devices and their daemons, or clean up
after them: list, status, del (of a live device, or of one whose daemon
died)."""
import os
import signal
import threading

from . import errors, runtime
from .errors import CommandError, DaemonError, NoSuchDeviceError


def list_devices():
    """Every device: its state file and, when the daemon answers, its
    replica states; a device whose daemon died is "orphaned"."""
    out = []
    live, orphaned = runtime.scan()
    for st in orphaned:
        out.append(_orphan_entry(st))
    for st in live:
        entry = {"id": st["id"], "path": st["path"], "pid": st["pid"],
                 "threshold": st["threshold"], "size": st.get("size")}
        try:
            s = runtime.request(st["id"], "status")["status"]
            entry["state"] = s["state"]
            entry["health"] = s["health"]
            entry["replicas"] = [{"path": r["path"], "state": r["state"]}
                                 for r in s["replicas"]]
        except CommandError as e:
            entry["state"] = "unresponsive"
            entry["health"] = "unknown"
            entry["error"] = str(e)
            entry["replicas"] = [{"path": r["path"], "state": "unknown"}
                                 for r in st.get("replicas", [])]
        out.append(entry)
    return sorted(out, key=lambda e: e["id"])


def _orphan_entry(st):
    """What list and status say of a device whose daemon died while the
    kernel holds it: quiesced (recover serves it again) or orphaned, with
    the error that says what to do."""
    entry = {"id": st["id"], "path": st["path"], "pid": st["pid"],
             "threshold": st["threshold"], "size": st.get("size"),
             **orphan_state(st),
             "replicas": [{"path": r["path"], "state": "unknown"}
                          for r in st.get("replicas", [])]}
    entry["health"] = "quiesced" if entry["state"] == "quiesced" else "failed"
    return entry


def device_status(dev):
    """The daemon's status of device dev; of a device whose daemon died,
    what list says of it (health quiesced or failed, and the error)."""
    st = runtime.find(dev, orphans=True)
    if not runtime.is_live(st):
        return _orphan_entry(st)
    return runtime.request(st["id"], "status")["status"]


def delete(dev, timeout=30.0, force=False):
    """Stop device dev in order and wait until its daemon and node are gone.
    A device whose daemon died is removed from the kernel. Refused while the
    device is in use (mounted, stacked on, open), unless force."""
    st = runtime.find(dev, orphans=True)
    live = runtime.is_live(st)
    if not force:
        # a quiesced device is not probed: an open of it could wait for I/O
        who = runtime.holders(st["path"], skip={os.getpid(), st["pid"]}, probe=live)
        if who:
            raise errors.DeviceInUseError(
                f"device {st['id']} ({st['path']}) is in use: {'; '.join(who)}: "
                "refused (unmount or close it first, or `quorumblk del --force` "
                "stops it anyway: I/O then fails)")
    if not live:
        return _delete_orphan(st, timeout)
    try:
        runtime.request(st["id"], "stop")
        how = "stop request"
    except DaemonError as e:
        if not _is_daemon_of(st):
            raise DaemonError(
                f"{e}; and pid {st['pid']} ({' '.join(runtime.cmdline(st['pid']) or [])}) "
                f"is not the daemon of quorumblk device {st['id']}: not signalled "
                f"(is {runtime.state_path(st['id'])} stale?)")
        try:
            os.kill(st["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        how = "SIGTERM"
    left = runtime.wait_gone(st, timeout)
    if left:
        raise DaemonError(f"device {st['id']}: not gone {timeout:.0f} s after the "
                          f"{how}: {', '.join(left)}")
    runtime.remove_files(st["id"])
    return {"id": st["id"], "path": st["path"], "pid": st["pid"], "deleted": True}


def _is_daemon_of(st):
    """Whether the pid st names is device st["id"]'s daemon: still the
    process that wrote st (runtime.is_daemon), and, where the kernel still
    has the device, the process it says serves it."""
    if not runtime.is_daemon(st):
        return False
    if not runtime.kernel_has(st["id"]):
        return True
    try:
        info = runtime.device_module().dev_info(st["id"])
    except (OSError, CommandError):
        return True
    return info["pid"] in (st["pid"], -1, 0)


def _delete_orphan(st, timeout):
    """DEL_DEV for a device whose daemon died, if the kernel says that
    daemon served it (never another server's device that took the id)."""
    device = runtime.device_module()
    dev_id = st["id"]
    try:
        info = device.dev_info(dev_id)
    except OSError:
        info = None
    if info is not None and info["pid"] not in (st["pid"], -1, 0):
        runtime.remove_files(dev_id)
        raise NoSuchDeviceError(f"quorumblk device {dev_id}: its daemon (pid {st['pid']}) "
                                f"is gone and ublk device {dev_id} is now served by pid "
                                f"{info['pid']}: left alone; removed the stale state")
    result = []

    def _del():
        try:
            device.delete(dev_id)
            result.append(None)
        except OSError as e:
            result.append(e)

    t = threading.Thread(target=_del, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise DaemonError(f"device {dev_id}: deleting it from the kernel did not finish "
                          f"within {timeout:.0f} s (is /dev/ublkc{dev_id} still open?)")
    if result[0] is not None and runtime.kernel_has(dev_id):
        raise DaemonError(f"device {dev_id}: deleting it from the kernel failed: {result[0]}")
    runtime.remove_files(dev_id)
    return {"id": dev_id, "path": st["path"], "pid": st["pid"], "deleted": True,
            "orphaned": True}


def orphan_state(st):
    """{"state", "error"} of a device whose daemon died while the kernel
    still holds it: "quiesced" when `recover` can serve it again, else
    "orphaned" (only `del` helps)."""
    dev_id, pid = st["id"], st["pid"]
    try:
        info = runtime.device_module().dev_info(dev_id)
    except (OSError, CommandError) as e:
        return {"state": "orphaned",
                "error": f"daemon pid {pid} died and the kernel's ublk device {dev_id} "
                         f"cannot be read ({e}); `quorumblk del {dev_id}` removes it"}
    if info["pid"] not in (pid, -1, 0) and runtime.pid_alive(info["pid"]):
        return {"state": "orphaned",
                "error": f"daemon pid {pid} died and ublk device {dev_id} is now "
                         f"served by pid {info['pid']}"}
    if "user-recovery" not in info["features"]:
        return {"state": "orphaned",
                "error": f"daemon pid {pid} died and the device was made without "
                         f"user recovery; `quorumblk del {dev_id}` removes it"}
    # LIVE with the dead daemon as its server: the kernel has not noticed
    # yet; it quiesces the device within moments (recover waits for it)
    if info["state"] == "quiesced" or (info["state"] == "live" and info["pid"] == pid):
        return {"state": "quiesced",
                "error": f"daemon pid {pid} died; I/O waits: `quorumblk recover "
                         f"{dev_id}` serves the device again, `quorumblk del {dev_id}` "
                         "removes it"}
    return {"state": "orphaned",
            "error": f"daemon pid {pid} died and ublk device {dev_id} is "
                     f"{info['state']}; `quorumblk del {dev_id}` removes it"}
