"""`quorumblk recover` on the host, with only the kernel faked
(tests/fake_ublk_cli.py: a killed daemon's node stays, as a device the
kernel holds quiesced): the refusals (not root, unknown device, a live
daemon, a device made without user recovery, a replica swapped under its
name), recover after kill -9, del of a quiesced device, and `add --id` that
turns into a recover (the systemd unit's restart). The real device is
tested in the VM (tests/device/test_recovery.py).
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from test_cli import FAKE, alive, devices, nodes, qb, reps, rundir, sha, wait_dead  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def crash(info):
    """kill -9 the daemon: its fake device stays, quiesced."""
    os.kill(info["pid"], signal.SIGKILL)
    assert wait_dead(info["pid"])
    assert os.path.exists(info["path"])


def test_recover_help_and_usage():
    p = qb("recover", "--help")
    assert p.returncode == 0
    for word in ("DEV", "--foreground", "--json", "quiesced"):
        assert word in p.stdout
    p = qb("recover")
    assert p.returncode == 2 and "DEV" in p.stderr
    assert "13 not recoverable" in qb("--help").stdout


def test_recover_not_root_is_a_clear_error(rundir, monkeypatch, capsys):
    from quorumblk import cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["recover", "0"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("quorumblk: quorumblk recover must be run as root")


@pytest.mark.parametrize("name,expect", [("9", "no quorumblk device 9"),
                                         ("sda", "is not a quorumblk device")])
def test_recover_of_an_unknown_device(name, expect, rundir, nodes):
    p = qb("recover", name, fake=True)
    assert p.returncode == 7, p.stderr
    assert expect in p.stderr and "Traceback" not in p.stderr


def test_recover_refuses_while_the_daemon_lives(reps, devices, rundir):
    info = devices("-t", "2", *reps)
    p = qb("recover", info["id"], fake=True)
    assert p.returncode == 13, p.stderr
    assert p.stderr.strip() == (f"quorumblk: quorumblk device {info['id']}: its daemon "
                                f"(pid {info['pid']}) is alive: nothing to recover")
    s = json.loads(qb("status", "--json", info["id"], fake=True).stdout)
    assert s["pid"] == info["pid"] and s["state"] == "live"


def test_recover_after_kill_9(reps, devices, rundir):
    info = devices("-t", "2", "--read-policy", "threshold", *reps)
    data = sha(reps)
    crash(info)
    (entry,) = json.loads(qb("list", "--json", fake=True).stdout)
    assert entry["state"] == "quiesced" and entry["pid"] == info["pid"]
    assert f"quorumblk recover {info['id']}" in entry["error"]
    p = qb("status", info["id"], fake=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("quiesced\n"), p.stdout
    assert f"quorumblk recover {info['id']}" in p.stdout

    p = qb("recover", "--json", info["path"].rsplit("/", 1)[1], fake=True)
    assert p.returncode == 0, p.stderr
    new = json.loads(p.stdout)
    assert new["id"] == info["id"] and new["path"] == info["path"]
    assert new["pid"] != info["pid"] and alive(new["pid"])
    st = json.loads((rundir / f"{info['id']}.json").read_text())
    assert st["pid"] == new["pid"] and st["options"]["read_policy"] == "threshold"
    assert [r["path"] for r in st["replicas"]] == reps
    s = json.loads(qb("status", "--json", info["id"], fake=True).stdout)
    assert s["state"] == "live" and s["pid"] == new["pid"]
    assert s["options"]["read_policy"] == "threshold"
    assert "recovered" in (rundir / f"{info['id']}.log").read_text()
    assert sha(reps) == data
    p = qb("recover", info["id"], fake=True)
    assert p.returncode == 13 and "is alive" in p.stderr
    p = qb("del", info["id"], fake=True)
    assert p.returncode == 0, p.stderr
    assert not alive(new["pid"]) and not os.path.exists(info["path"])


def test_del_removes_a_quiesced_device(reps, devices, rundir):
    info = devices("-t", "2", *reps)
    crash(info)
    p = qb("del", "--json", info["id"], fake=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["orphaned"] is True
    assert not os.path.exists(info["path"])
    assert not (rundir / f"{info['id']}.json").exists()
    assert json.loads(qb("list", "--json", fake=True).stdout) == []
    p = qb("recover", info["id"], fake=True)
    assert p.returncode == 7, p.stderr


def test_a_device_made_without_user_recovery_is_not_recoverable(reps, devices, rundir):
    info = devices("-t", "2", *reps)
    crash(info)
    with open(info["path"]) as f:
        node = f.read().replace("recovery=1", "recovery=0")
    with open(info["path"], "w") as f:
        f.write(node)
    (entry,) = json.loads(qb("list", "--json", fake=True).stdout)
    assert entry["state"] == "orphaned" and "without user recovery" in entry["error"]
    p = qb("recover", info["id"], fake=True)
    assert p.returncode == 13, p.stderr
    assert f"device {info['id']} cannot be recovered" in p.stderr
    assert qb("del", info["id"], fake=True).returncode == 0


def test_a_replica_swapped_under_its_name_is_refused(reps, devices, rundir, tmp_path):
    info = devices("-t", "2", *reps)
    crash(info)
    copy = tmp_path / "copy.img"
    shutil.copyfile(reps[2], copy)
    os.replace(copy, reps[2])
    p = qb("recover", info["id"], fake=True)
    assert p.returncode == 13, p.stderr
    assert f"{reps[2]} is not the replica the device had" in p.stderr
    (entry,) = json.loads(qb("list", "--json", fake=True).stdout)
    assert entry["state"] == "quiesced" and entry["pid"] == info["pid"]


def test_add_with_the_id_of_a_crashed_device_recovers_it(reps, devices, rundir, nodes):
    """What the systemd unit does on a restart after a crash: the same
    `add --foreground --id N REPLICA...` serves the quiesced device again."""
    info = devices("-t", "2", "--id", "3", *reps)
    crash(info)
    proc = subprocess.Popen([sys.executable, FAKE, "add", "--foreground", "--id", "3",
                             "-t", "2", *reps], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == info["path"]
        st = json.loads((rundir / "3.json").read_text())
        assert st["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "recovering it instead" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(info["path"]) and not (rundir / "3.json").exists()
