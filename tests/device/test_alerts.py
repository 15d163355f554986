"""Alerts on a real /dev/ublkbN (in the VM): a bit flipped in one replica
is read back through the device; `quorumblk monitor --program` gets the
bad-block and repaired events with their fields, and the same events reach
the logger that runs in the guest: the journal when one runs, else busybox
syslogd started by the test on /dev/log (the guest boots without one)."""
import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import run
from test_cli import QB, cli, qb  # noqa: F401

pytestmark = pytest.mark.timeout(400)

JOURNAL = "/run/systemd/journal/socket"


def wait_for(what, timeout=180.0):
    end = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < end, f"not within {timeout} s: {what.__doc__}"
        time.sleep(0.2)


@pytest.fixture
def logger(scratch):
    """The guest's logger: lines() returns what it got from quorumblk so far."""
    if os.path.exists(JOURNAL):
        yield lambda: run(["journalctl", "-o", "cat", "SYSLOG_IDENTIFIER=quorumblk"],
                          check=False).stdout
        return
    assert not os.path.exists("/dev/log"), \
        "/dev/log exists but no journal runs: which logger is this guest's?"
    busybox = shutil.which("busybox")
    assert busybox, "the guest has neither a journal nor busybox syslogd"
    out = os.path.join(scratch, "messages")
    p = subprocess.Popen([busybox, "syslogd", "-n", "-O", out])
    try:
        wait_for(lambda: os.path.exists("/dev/log"), 30)

        def lines():
            """syslogd's file"""
            try:
                return open(out).read()
            except FileNotFoundError:
                return ""
        yield lines
    finally:
        p.terminate()
        p.wait(timeout=30)
        if os.path.exists("/dev/log"):
            os.unlink("/dev/log")


def test_a_bit_flip_reaches_monitor_program_and_the_logger(images, cli, logger, scratch):
    rec = os.path.join(scratch, "prog.out")
    prog = os.path.join(scratch, "prog.sh")
    with open(prog, "w") as f:
        f.write(f'#!/bin/sh\nprintf \'%s|%s\\n\' "$*" "$QUORUMBLK_EVENT_JSON" >> {rec}\n')
    os.chmod(prog, 0o755)
    mon = subprocess.Popen([QB, "monitor", "--program", prog, "--scan-interval", "0.2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = mon.stderr.readline()
        assert "following the events of every device" in line, line + mon.stderr.read()
        paths = images(3, 32 << 20)
        info = cli("-t", "2", *paths)
        run(["dd", "if=/dev/urandom", f"of={info['path']}", "bs=1M", "count=1",
             "oflag=direct", "status=none"])
        off = 4096 * 50 + 123
        fd = os.open(paths[1], os.O_RDWR)
        try:
            b = os.pread(fd, 1, off)
            os.pwrite(fd, bytes([b[0] ^ 0x04]), off)
            os.fsync(fd)
        finally:
            os.close(fd)
        good = run(f"head -c {1 << 20} {paths[0]} | sha256sum").stdout.split()[0]
        got = run(f"dd if={info['path']} bs=1M count=1 iflag=direct status=none | "
                  "sha256sum").stdout.split()[0]
        assert got == good

        def runs():
            """the program ran for bad-block and repaired"""
            if not os.path.exists(rec):
                return []
            out = []
            for line in open(rec).read().splitlines():
                argv, ev = line.split("|", 1)
                out.append((argv.split(), json.loads(ev)))
            return [r for r in out if r[0][1] == info["path"]]
        wait_for(lambda: {"bad-block", "repaired"} <= {r[1]["type"] for r in runs()})
        (bad,) = [r for r in runs() if r[1]["type"] == "bad-block"]
        assert bad[0] == ["bad-block", info["path"], paths[1]]
        assert bad[1]["replica"] == 1 and bad[1]["offset"] == 4096 * 50
        assert bad[1]["length"] == 4096
        assert ["device-started", info["path"]] in [r[0] for r in runs()]

        def logged():
            """the logger got the bad-block line"""
            return f"device {info['id']}: bad-block on replica 1 ({paths[1]})" in logger()
        wait_for(logged, 60)
        text = logger()
        line = [x for x in text.splitlines() if f"device {info['id']}: bad-block" in x][0]
        if not os.path.exists(JOURNAL):
            # busybox syslogd writes facility.priority; the fields follow
            assert "daemon.warn quorumblk[" in line and f"offset={4096 * 50}" in line, line
            assert "event=bad-block" in line and "replica=1" in line, line

        s = json.loads(qb("status", "--json", info["id"]).stdout)
        assert s["health"] == "clean" and s["format"] == 1
        assert s["replicas"][1]["repairs"] >= 1
    finally:
        mon.terminate()
        out, err = mon.communicate(timeout=30)
    assert mon.returncode == 0, err
    assert f"device {info['id']}: bad-block on replica 1" in out
