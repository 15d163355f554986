"""The quorumblk command on the host: everything that does not need ublk.

Usage errors, the engine's refusals and the not-root and no-ublk errors run
the real command. The device lifecycle (add, list, status, del, signals,
stale files) runs the real command and daemon with only the kernel faked
(tests/fake_ublk_cli.py): the fake /dev/ublkbN is a file in the test's
folder. The real device is tested in the VM (tests/device/test_cli.py).
"""
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import flip, make_images, pread

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "fake_ublk_cli.py")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def rundir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("QUORUMBLK_RUN_DIR", str(d))
    # stable names (/dev/quorumblk/NAME) and device entries stay here too
    monkeypatch.setenv("QUORUMBLK_DEV_DIR", str(tmp_path / "dev-names"))
    monkeypatch.setenv("QUORUMBLK_CONFIG_DIR", str(tmp_path / "conf"))
    return d


@pytest.fixture
def nodes(tmp_path, monkeypatch):
    d = tmp_path / "nodes"
    d.mkdir()
    monkeypatch.setenv("FAKE_UBLK_DIR", str(d))
    for k in ("FAKE_UBLK_READ_ALL", "FAKE_UBLK_FAIL", "FAKE_UBLK_STOP_SLEEP",
              "FAKE_UBLK_START_SLEEP", "FAKE_UBLK_START_TIMEOUT",
              "FAKE_UBLK_DELAY"):
        monkeypatch.delenv(k, raising=False)
    return d


@pytest.fixture
def reps(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    return make_images(d, 3, size=1 << 20)


def qb(*args, fake=False, env=None, timeout=60):
    """Run the command; returns the CompletedProcess."""
    cmd = [sys.executable, FAKE] if fake else [sys.executable, "-m", "quorumblk"]
    e = dict(os.environ, **(env or {}))
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout, env=e)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid, timeout=20):
    end = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    return not alive(pid)


def sha(paths, size=1 << 20):
    """The replicas' data areas (their metadata after it differs)."""
    return [hashlib.sha256(open(p, "rb").read(size)).hexdigest() for p in paths]


@pytest.fixture
def devices(rundir, nodes):
    """add(...) through the faked kernel; every daemon still running at
    teardown is stopped (SIGTERM) and must exit."""
    started = []

    def _add(*args, env=None):
        p = qb("add", "--json", *args, fake=True, env=env)
        assert p.returncode == 0, p.stderr
        info = json.loads(p.stdout)
        started.append(info["pid"])
        return info

    yield _add
    for pid in started:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
            assert wait_dead(pid), f"daemon {pid} ignored SIGTERM"


# -- help and usage --

def test_help_names_every_command():
    p = qb("--help")
    assert p.returncode == 0
    for word in ("add", "list", "status", "del", "exit status"):
        assert word in p.stdout


def test_add_help_names_engine_and_device_options():
    p = qb("add", "--help")
    assert p.returncode == 0
    for opt in ("--threshold", "--read-policy", "--hash", "--no-repair",
                "--buffered", "--timeout", "--vote-block", "--queues", "--depth",
                "--block-size", "--id", "--foreground", "--json"):
        assert opt in p.stdout, opt


@pytest.mark.parametrize("args,expect", [
    (["add", "x.img"], "--threshold"),
    (["add", "-t", "2"], "REPLICA"),
    (["add", "-t", "two", "x.img"], "invalid int"),
    (["add", "-t", "2", "--block-size", "1024", "x.img"], "invalid choice"),
    (["add", "-t", "2", "--read-policy", "random", "x.img"], "invalid choice"),
    (["add", "-t", "2", "--hash", "md5", "x.img"], "invalid choice"),
    (["add", "-t", "2", "--vote-block", "1000", "x.img"], "power of two"),
    (["add", "-t", "2", "--vote-block", "1048576", "x.img"], "power of two"),
    (["add", "-t", "2", "--timeout", "0", "x.img"], "positive"),
    (["add", "-t", "2", "--timeout", "nan", "x.img"], "positive"),
    (["add", "-t", "2", "--depth", "0", "x.img"], "at least 1"),
    (["add", "-t", "2", "--depth", "5000", "x.img"], "above 4096"),
    (["add", "-t", "2", "--queues", "0", "x.img"], "at least 1"),
    (["add", "-t", "2", "--id", "-1", "x.img"], "out of range"),
    (["del"], "one of the arguments"),
    (["del", "0", "--all"], "not allowed with"),
    (["status"], "DEV"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2(args, expect, rundir):
    p = qb(*args)
    assert p.returncode == 2, p.stderr
    assert expect in p.stderr
    assert not os.path.exists(rundir)


# -- refusals before the kernel is touched --

def test_threshold_out_of_range_is_refused(reps, rundir):
    before = sha(reps)
    for t in (0, 4):
        p = qb("add", "-t", t, *reps)
        assert p.returncode == 10, p.stderr
        assert p.stderr.startswith("quorumblk: threshold")
        assert "1 to 3" in p.stderr
    assert sha(reps) == before
    assert not list(rundir.glob("*.json")) if rundir.exists() else True


def test_sizes_that_differ_are_named(tmp_path, reps, rundir):
    small = tmp_path / "small.img"
    small.write_bytes(b"\0" * 65536)
    p = qb("add", "-t", "2", reps[0], reps[1], small)
    assert p.returncode == 10
    assert f"{small}: 65536 bytes" in p.stderr
    assert f"{reps[0]}: {1 << 20} bytes" in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_replica_is_named_with_errno(tmp_path, reps):
    missing = tmp_path / "nope.img"
    p = qb("add", "-t", "2", reps[0], reps[1], missing)
    assert p.returncode == 10
    assert str(missing) in p.stderr and "ENOENT" in p.stderr


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_same_replica_twice_is_refused(tmp_path, reps, how):
    other = tmp_path / "other.img"
    if how == "same":
        other = reps[0]
    elif how == "symlink":
        other.symlink_to(reps[0])
    else:
        os.link(reps[0], other)
    p = qb("add", "-t", "2", reps[0], reps[1], other)
    assert p.returncode == 10, p.stderr
    assert "same replica" in p.stderr


def test_debug_shows_a_traceback(reps):
    p = qb("--debug", "add", "-t", "9", *reps)
    assert p.returncode != 0
    assert "Traceback" in p.stderr


@pytest.mark.parametrize("argv", [["add", "-t", "2", "A", "B", "C"], ["list"],
                                  ["status", "0"], ["del", "0"], ["del", "--all"]])
def test_not_root_is_a_clear_error(argv, reps, rundir, monkeypatch, capsys):
    from quorumblk import cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    argv = [{"A": reps[0], "B": reps[1], "C": reps[2]}.get(a, a) for a in argv]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert err.startswith("quorumblk: quorumblk ")
    assert "must be run as root" in err and "uid 1000" in err


@pytest.mark.skipif(os.path.exists("/dev/ublk-control"),
                    reason="this host has ublk: the device suite covers add here")
def test_no_ublk_says_modprobe_and_which_kernels(reps, rundir):
    p = qb("add", "-t", "2", *reps)
    assert p.returncode == 4, p.stderr
    assert "modprobe ublk_drv" in p.stderr
    assert "CONFIG_BLK_DEV_UBLK" in p.stderr and "6.12" in p.stderr
    assert not list(rundir.glob("*.json"))


# -- the lifecycle with the kernel faked --

def test_add_list_status_del_round_trip(reps, devices, rundir, nodes):
    info = devices("-t", "2", "--read-policy", "threshold", "--timeout", "5", *reps)
    assert set(info) == {"id", "path", "pid", "format"} and info["format"] == 1
    assert info["id"] == 0 and info["path"] == str(nodes / "ublkb0")
    assert os.path.exists(info["path"]) and alive(info["pid"])

    st = json.loads((rundir / "0.json").read_text())
    assert st["pid"] == info["pid"] and st["threshold"] == 2
    assert [r["path"] for r in st["replicas"]] == reps
    for r, path in zip(st["replicas"], reps):
        assert (r["dev"], r["ino"]) == (os.stat(path).st_dev, os.stat(path).st_ino)
    assert st["options"]["read_policy"] == "threshold"
    assert st["options"]["timeout"] == 5.0
    sock = os.stat(rundir / "0.sock")
    assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600

    p = qb("list", "--json")
    assert p.returncode == 0, p.stderr
    (entry,) = json.loads(p.stdout)
    assert entry["id"] == 0 and entry["path"] == info["path"]
    assert entry["state"] == "live" and entry["threshold"] == 2
    assert entry["replicas"] == [{"path": r, "state": "in-service"} for r in reps]

    p = qb("list")
    assert p.returncode == 0 and info["path"] in p.stdout and "live" in p.stdout

    for name in ("0", "ublkb0", "/dev/ublkb0"):
        p = qb("status", "--json", name)
        assert p.returncode == 0, p.stderr
        s = json.loads(p.stdout)
        assert s["id"] == 0 and s["state"] == "live" and s["size"] == 1 << 20
        assert [r["state"] for r in s["replicas"]] == ["in-service"] * 3
        assert {"reads", "writes", "bad_blocks", "repairs", "errors"} <= set(s["counters"])
        assert s["events"] == [] and s["events_total"] == 0
    p = qb("status", "0")
    assert p.returncode == 0 and "replica 2 in-service" in p.stdout

    p = qb("del", "--json", "0")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["deleted"] is True
    assert not alive(info["pid"]) and not os.path.exists(info["path"])
    assert not (rundir / "0.json").exists() and not (rundir / "0.sock").exists()
    assert "device 0 stopped" in (rundir / "0.log").read_text()
    p = qb("list", "--json")
    assert p.returncode == 0 and json.loads(p.stdout) == []


def test_minority_threshold_warns_and_still_starts(reps, rundir, nodes):
    p = qb("add", "-t", "1", reps[0], reps[1], fake=True)
    try:
        assert p.returncode == 0, p.stderr
        assert "warning" in p.stderr and "not a majority" in p.stderr
        assert p.stdout.strip() == str(nodes / "ublkb0")
    finally:
        assert qb("del", "0").returncode == 0


def test_events_reach_status_and_the_log_and_the_replica_is_repaired(reps, devices, rundir):
    bad = [4096 * 3 + 17, 4096 * 100, 4096 * 255 + 4095]
    for off in bad:
        flip(reps[1], off)
    assert sha(reps)[1] != sha(reps)[0]
    devices("-t", "2", *reps, env={"FAKE_UBLK_READ_ALL": "1"})
    s = json.loads(qb("status", "--json", "0").stdout)
    badev = [e for e in s["events"] if e["type"] == "bad-block"]
    assert sorted(e["offset"] for e in badev) == [o // 4096 * 4096 for o in bad]
    assert {(e["replica"], e["path"], e["length"]) for e in badev} == {(1, reps[1], 4096)}
    assert s["counters"]["bad_blocks"] == 3 and s["replicas"][1]["bad_blocks"] == 3
    logged = [json.loads(line) for line in (rundir / "0.events").read_text().splitlines()]
    assert [e for e in logged if e["type"] == "bad-block"] == badev
    assert qb("del", "0").returncode == 0
    a, b, c = sha(reps)
    assert a == b == c


def test_replica_in_use_by_another_device_is_refused(tmp_path, reps, devices):
    devices("-t", "2", *reps)
    extra = make_images(tmp_path, 2, size=1 << 20, names=["x.img", "y.img"])
    link = tmp_path / "via-link.img"
    os.link(reps[2], link)
    sym = tmp_path / "via-sym.img"
    sym.symlink_to(reps[1])
    for other in (reps[0], link, sym):
        p = qb("add", "-t", "2", extra[0], extra[1], other, fake=True)
        assert p.returncode == 5, p.stderr
        assert "already used by quorumblk device 0" in p.stderr
    assert len(json.loads(qb("list", "--json").stdout)) == 1


def test_id_in_use_is_refused(tmp_path, reps, devices):
    devices("-t", "2", "--id", "0", *reps)
    extra = make_images(tmp_path, 3, size=1 << 20, names=["x.img", "y.img", "z.img"])
    p = qb("add", "-t", "2", "--id", "0", *extra, fake=True)
    assert p.returncode == 6, p.stderr
    assert "device id 0 is in use" in p.stderr
    info = devices("-t", "2", "--id", "5", *extra)
    assert info["id"] == 5


def test_failed_start_leaves_nothing(reps, rundir, nodes):
    p = qb("add", "-t", "2", *reps, fake=True, env={"FAKE_UBLK_FAIL": "no luck"})
    assert p.returncode == 9, p.stderr
    assert "no luck" in p.stderr
    assert not list(rundir.glob("*.json")) and not list(rundir.glob("*.sock"))
    assert not list(nodes.iterdir())
    assert json.loads(qb("list", "--json").stdout) == []


def test_sigterm_and_sigint_stop_the_daemon_in_order(reps, devices, rundir, nodes):
    for sig in (signal.SIGTERM, signal.SIGINT):
        info = devices("-t", "2", *reps)
        os.kill(info["pid"], sig)
        assert wait_dead(info["pid"])
        assert not os.path.exists(info["path"])
        assert not (rundir / f"{info['id']}.json").exists()
        log = (rundir / f"{info['id']}.log").read_text()
        assert f"stopping device {info['id']}: {sig.name}" in log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_serves_until_a_signal_and_exits_0(reps, rundir, nodes, sig):
    proc = subprocess.Popen([sys.executable, FAKE, "add", "--foreground", "-t", "2",
                             *reps], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line == str(nodes / "ublkb0")
        st = json.loads((rundir / "0.json").read_text())
        assert st["pid"] == proc.pid
        assert json.loads(qb("status", "--json", "0").stdout)["pid"] == proc.pid
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not os.path.exists(line) and not (rundir / "0.json").exists()


def test_device_stopped_from_outside_ends_the_daemon(reps, devices, rundir):
    info = devices("-t", "2", *reps)
    os.unlink(info["path"])
    assert wait_dead(info["pid"])
    assert not (rundir / "0.json").exists()
    assert "the device stopped" in (rundir / "0.log").read_text()


def test_del_all_stops_every_device(tmp_path, reps, devices):
    extra = make_images(tmp_path, 3, size=1 << 20, names=["x.img", "y.img", "z.img"])
    a = devices("-t", "2", *reps)
    b = devices("-t", "2", *extra)
    p = qb("del", "--all", "--json")
    assert p.returncode == 0, p.stderr
    assert sorted(d["id"] for d in json.loads(p.stdout)) == [0, 1]
    assert not alive(a["pid"]) and not alive(b["pid"])


def test_del_that_cannot_finish_times_out_with_a_clear_error(reps, devices):
    info = devices("-t", "2", *reps, env={"FAKE_UBLK_STOP_SLEEP": "4"})
    t0 = time.monotonic()
    p = qb("del", "--timeout", "1", "0")
    assert time.monotonic() - t0 < 3.5
    assert p.returncode == 8
    assert "not gone 1 s after the stop request" in p.stderr
    assert wait_dead(info["pid"])


def test_stale_state_of_a_dead_daemon_is_cleaned(reps, rundir):
    rundir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (rundir / "3.json").write_text(json.dumps({
        "id": 3, "path": "/dev/ublkb3", "pid": dead.pid, "start_time": 1,
        "threshold": 2, "replicas": []}))
    (rundir / "3.sock").write_text("")
    p = qb("list", "--json")
    assert p.returncode == 0 and json.loads(p.stdout) == []
    assert not (rundir / "3.json").exists() and not (rundir / "3.sock").exists()


def test_status_of_a_gone_daemon_says_so_and_cleans(rundir):
    rundir.mkdir()
    (rundir / "4.json").write_text(json.dumps({
        "id": 4, "path": "/dev/ublkb4", "pid": 2 ** 22 + 1, "threshold": 2,
        "replicas": []}))
    p = qb("status", "4")
    assert p.returncode == 7
    assert "is gone" in p.stderr and not (rundir / "4.json").exists()


@pytest.mark.parametrize("name,expect", [("9", "no quorumblk device 9"),
                                         ("sda", "is not a quorumblk device")])
def test_status_and_del_of_unknown_devices(name, expect, rundir):
    for cmd in ("status", "del"):
        p = qb(cmd, name)
        assert p.returncode == 7
        assert expect in p.stderr and "Traceback" not in p.stderr


def test_control_socket_rejects_bad_requests(reps, devices, rundir):
    import socket

    devices("-t", "2", *reps)
    for req, expect in ((b"not json\n", "bad request"),
                        (b'{"command": "explode"}\n', "unknown command")):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(rundir / "0.sock"))
            s.sendall(req)
            answer = json.loads(s.makefile().readline())
        assert answer["ok"] is False and expect in answer["error"]
    assert json.loads(qb("status", "--json", "0").stdout)["state"] == "live"


def test_replica_bytes_untouched_by_refused_adds(tmp_path, reps):
    before = [pread(p, 0, 1 << 20) for p in reps]
    qb("add", "-t", "5", *reps)
    qb("add", "-t", "2", reps[0], reps[0], reps[1])
    assert [pread(p, 0, 1 << 20) for p in reps] == before
