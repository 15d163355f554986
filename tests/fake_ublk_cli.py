"""Run the quorumblk command with only the kernel faked (host tests).

Everything else is real: argument parsing, the Quorum over real replica
files, the fork and the pipe of `add`, the detached daemon with its state
file, events log and control socket, list/status/del, signals. The fake
device is a file FAKE_UBLK_DIR/ublkbN that exists while the "device" does;
deleting it by hand is what an outside stop of a real device looks like.
A node left behind by a daemon that was killed (SIGKILL) is a device the
kernel holds quiesced for user recovery: `recover` serves it again (the
node then names the new pid) and `del` removes it.

Environment:
  FAKE_UBLK_DIR        where the fake device nodes go (required)
  FAKE_UBLK_READ_ALL   1: the device reads itself once through the vote at
                       start (to raise events from corrupted replicas)
  FAKE_UBLK_FAIL       a message: the device start fails with it (EIO)
  FAKE_UBLK_STOP_SLEEP seconds the device's stop takes
  FAKE_UBLK_START_SLEEP seconds the device's start takes
  FAKE_UBLK_START_TIMEOUT how long add waits for the daemon (seconds)
  FAKE_UBLK_DELAY      R:SECONDS: every read of replica R starts that late
                       (the engine's fault hook), from the device's start:
                       slows a resync down
  FAKE_JOURNAL_SOCKET  the journal's socket (default: none, so that host
  FAKE_SYSLOG_SOCKET   tests never log to the host's logger); syslog's
  FAKE_SENDMAIL        what monitor --mail runs instead of /usr/sbin/sendmail
"""
import errno
import os
import sys
import time

from quorumblk import cli, daemon, events, monitor, runtime
from quorumblk.errors import QuorumError

NODES = os.environ["FAKE_UBLK_DIR"]


class FakeDevice:
    def __init__(self, q, dev_id):
        self.quorum = q
        self.id = dev_id
        self.path = os.path.join(NODES, f"ublkb{dev_id}")

    @classmethod
    def start(cls, q, *, queues=None, depth=128, block_size=512, dev_id=-1,
              user_recovery=False):
        if os.environ.get("FAKE_UBLK_FAIL"):
            raise QuorumError(errno.EIO, os.environ["FAKE_UBLK_FAIL"])
        time.sleep(float(os.environ.get("FAKE_UBLK_START_SLEEP", "0")))
        if dev_id < 0:
            dev_id = 0
            while os.path.exists(os.path.join(NODES, f"ublkb{dev_id}")):
                dev_id += 1
        d = cls(q, dev_id)
        with open(d.path, "x") as f:
            f.write(f"{os.getpid()} queues={queues} depth={depth} bs={block_size} "
                    f"recovery={int(user_recovery)}\n")
        d._read_all()
        return d

    @classmethod
    def recover(cls, q, dev_id, *, block_size=0):
        if os.environ.get("FAKE_UBLK_FAIL"):
            raise QuorumError(errno.EIO, os.environ["FAKE_UBLK_FAIL"])
        info = _node_info(dev_id)
        if info["state"] != "quiesced":
            raise QuorumError(errno.EBUSY, f"fake ublk device {dev_id} is {info['state']}")
        d = cls(q, dev_id)
        with open(d.path) as f:
            words = f.read().split()
        with open(d.path, "w") as f:
            f.write(" ".join([str(os.getpid())] + words[1:]) + "\n")
        d._read_all()
        return d

    def _read_all(self):
        q = self.quorum
        if os.environ.get("FAKE_UBLK_DELAY"):
            r, secs = os.environ["FAKE_UBLK_DELAY"].split(":")
            q.inject(int(r), "delay", ops=("read",), delay=float(secs))
        if os.environ.get("FAKE_UBLK_READ_ALL") == "1":
            step = 64 << 10
            for off in range(0, q.size, step):
                q.read(off, min(step, q.size - off))

    def wait(self, timeout=None):
        return not os.path.exists(self.path)

    def stop(self):
        time.sleep(float(os.environ.get("FAKE_UBLK_STOP_SLEEP", "0")))
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _node_path(dev_id):
    return os.path.join(NODES, f"ublkb{dev_id}")


def _node_info(dev_id):
    """dev_info() of a fake device: live while the pid that serves it runs."""
    try:
        with open(_node_path(dev_id)) as f:
            words = f.read().split()
    except FileNotFoundError:
        raise QuorumError(errno.ENODEV, f"ublk device {dev_id}: no such device")
    pid = int(words[0])
    features = ["user-recovery", "user-recovery-reissue"] if "recovery=1" in words else []
    return {"id": dev_id, "pid": pid, "features": features,
            "state": "live" if runtime.pid_alive(pid) else "quiesced"}


class FakeModule:
    Device = FakeDevice
    dev_info = staticmethod(_node_info)

    @staticmethod
    def ublk_available(load=False):
        return True, ""

    @staticmethod
    def delete(dev_id):
        _node_info(dev_id)
        os.unlink(_node_path(dev_id))


def install():
    runtime.device_module = lambda: FakeModule
    runtime.ublk_check = lambda: None
    runtime.kernel_has = lambda dev_id: os.path.exists(_node_path(dev_id))
    nowhere = os.path.join(NODES, "no-such-socket")
    events.JOURNAL_SOCKET = os.environ.get("FAKE_JOURNAL_SOCKET", nowhere)
    events.SYSLOG_SOCKET = os.environ.get("FAKE_SYSLOG_SOCKET", nowhere)
    monitor.SENDMAIL = os.environ.get("FAKE_SENDMAIL", monitor.SENDMAIL)
    if os.environ.get("FAKE_UBLK_START_TIMEOUT"):
        daemon.START_TIMEOUT = float(os.environ["FAKE_UBLK_START_TIMEOUT"])


if __name__ == "__main__":
    install()
    sys.exit(cli.main(sys.argv[1:]))
