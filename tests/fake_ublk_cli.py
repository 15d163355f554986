"""Run the quorumblk command with only the kernel faked (host tests).

Everything else is real: argument parsing, the Quorum over real replica
files, the fork and the pipe of `add`, the detached daemon with its state
file, events log and control socket, list/status/del, signals. The fake
device is a file FAKE_UBLK_DIR/ublkbN that exists while the "device" does;
deleting it by hand is what an outside stop of a real device looks like.

Environment:
  FAKE_UBLK_DIR        where the fake device nodes go (required)
  FAKE_UBLK_READ_ALL   1: the device reads itself once through the vote at
                       start (to raise events from corrupted replicas)
  FAKE_UBLK_FAIL       a message: the device start fails with it (EIO)
  FAKE_UBLK_STOP_SLEEP seconds the device's stop takes
"""
import errno
import os
import sys
import time

from quorumblk import cli, daemon, runtime
from quorumblk.errors import QuorumError

NODES = os.environ["FAKE_UBLK_DIR"]


class FakeDevice:
    def __init__(self, q, dev_id):
        self.quorum = q
        self.id = dev_id
        self.path = os.path.join(NODES, f"ublkb{dev_id}")

    @classmethod
    def start(cls, q, *, queues=None, depth=128, block_size=512, dev_id=-1):
        if os.environ.get("FAKE_UBLK_FAIL"):
            raise QuorumError(errno.EIO, os.environ["FAKE_UBLK_FAIL"])
        if dev_id < 0:
            dev_id = 0
            while os.path.exists(os.path.join(NODES, f"ublkb{dev_id}")):
                dev_id += 1
        d = cls(q, dev_id)
        with open(d.path, "x") as f:
            f.write(f"{os.getpid()} queues={queues} depth={depth} bs={block_size}\n")
        if os.environ.get("FAKE_UBLK_READ_ALL") == "1":
            step = 64 << 10
            for off in range(0, q.size, step):
                q.read(off, min(step, q.size - off))
        return d

    def wait(self, timeout=None):
        return not os.path.exists(self.path)

    def stop(self):
        time.sleep(float(os.environ.get("FAKE_UBLK_STOP_SLEEP", "0")))
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class FakeModule:
    Device = FakeDevice

    @staticmethod
    def ublk_available(load=False):
        return True, ""


def install():
    daemon._device_module = lambda: FakeModule
    runtime.ublk_check = lambda: None


if __name__ == "__main__":
    install()
    sys.exit(cli.main(sys.argv[1:]))
