"""Safe commands (issue 9), on the host with only the kernel faked
(tests/fake_ublk_cli.py), through the real command and daemon: a refused
add changes no replica, and adds of the same images are serialised by the
add lock."""
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_images
from test_cli import FAKE, alive, devices, nodes, qb, reps, rundir, wait_dead  # noqa: F401
from quorumblk import meta

pytestmark = pytest.mark.timeout(120)


def files(paths):
    """Each file's size and the hash of all its bytes (metadata included)."""
    out = []
    for p in paths:
        with open(p, "rb") as f:
            out.append((os.path.getsize(p), hashlib.sha256(f.read()).hexdigest()))
    return out


def set_uuid(path):
    m, _ = meta.read(str(path))
    return None if m is None else meta.uuid_text(m.set_uuid)


# -- a refused add changes nothing --

@pytest.mark.skipif(os.path.exists("/dev/ublk-control"),
                    reason="this host has ublk: no refusal for a missing driver here")
def test_add_refused_for_no_ublk_leaves_the_images_byte_identical(reps, rundir):
    before = files(reps)
    assert all(set_uuid(p) is None for p in reps), "premise: bare images"
    p = qb("add", "-t", "2", *reps)
    assert p.returncode == 4, p.stderr
    assert files(reps) == before


def test_add_refused_for_an_id_in_use_leaves_the_images_byte_identical(tmp_path, reps,
                                                                       devices):
    devices("-t", "2", "--id", "0", *reps)
    extra = make_images(tmp_path, 3, size=1 << 20, names=["x.img", "y.img", "z.img"])
    before = files(extra)
    p = qb("add", "-t", "2", "--id", "0", *extra, fake=True)
    assert p.returncode == 6, p.stderr
    assert files(extra) == before


def test_add_refused_for_a_replica_in_use_leaves_the_others_byte_identical(tmp_path, reps,
                                                                           devices):
    devices("-t", "2", *reps)
    extra = make_images(tmp_path, 2, size=1 << 20, names=["x.img", "y.img"])
    before = files(extra)
    p = qb("add", "-t", "2", extra[0], extra[1], reps[0], fake=True)
    assert p.returncode == 5, p.stderr
    assert files(extra) == before


def _holds(pid, path):
    """Whether process pid has path open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            continue
    return False


def test_adds_of_the_same_bare_images_wait_for_the_lock_and_only_one_makes_a_set(
        reps, rundir, nodes):
    rundir.mkdir(mode=0o700)
    lock = rundir / "add.lock"
    before = files(reps)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    procs = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for _ in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, FAKE, "add", "--json", "-t", "2", *reps],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        # the premise: both adds wait for the lock (they have it open)
        deadline = time.monotonic() + 30
        while not all(_holds(p.pid, lock) for p in procs):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the adds never reached the lock"
            time.sleep(0.05)
        time.sleep(0.5)
        assert all(p.poll() is None for p in procs)
        assert files(reps) == before, "an add waiting for the lock changed the images"
    finally:
        os.close(fd)
    outs = [p.communicate(timeout=60) for p in procs]
    codes = sorted(p.returncode for p in procs)
    try:
        assert codes == [0, 5], outs
        assert "already used by quorumblk device 0" in "".join(e for _o, e in outs)
        uuids = {set_uuid(p) for p in reps}
        assert len(uuids) == 1 and None not in uuids
    finally:
        for p, (out, _err) in zip(procs, outs):
            if p.returncode == 0:
                pid = json.loads(out)["pid"]
                assert qb("del", "0").returncode == 0
                assert wait_dead(pid)


# -- paths are made absolute where they are given --

def qb_in(cwd, *args, env=None):
    """The command (kernel faked) run from cwd."""
    return subprocess.run([sys.executable, FAKE] + [str(a) for a in args], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})))


def state_paths(rundir):
    return [r["path"] for r in json.loads((rundir / "0.json").read_text())["replicas"]]


def test_replica_commands_with_relative_paths_on_a_running_device(tmp_path, rundir, nodes):
    d = tmp_path / "here"
    d.mkdir()
    a, b, c, new1, new2 = make_images(d, 5, size=1 << 20,
                                      names=["a.img", "b.img", "c.img", "d.img", "e.img"])
    for p in (new1, new2):
        os.truncate(p, 0)
        os.truncate(p, 1 << 20)
    cwd = str(d)
    p = qb_in(cwd, "add", "--json", "-t", "2", "a.img", "b.img", "c.img")
    assert p.returncode == 0, p.stderr
    pid = json.loads(p.stdout)["pid"]
    try:
        assert state_paths(rundir) == [a, b, c]
        p = qb_in(cwd, "remove-replica", "0", "c.img")
        assert p.returncode == 0, p.stderr
        assert f"removed {c}" in p.stdout
        assert state_paths(rundir) == [a, b]
        p = qb_in(cwd, "add-replica", "0", "d.img")
        assert p.returncode == 0, p.stderr
        assert state_paths(rundir) == [a, b, new1]
        p = qb_in(cwd, "replace", "0", "b.img", "e.img")
        assert p.returncode == 0, p.stderr
        assert state_paths(rundir) == [a, new1, new2]
        s = json.loads(qb_in(cwd, "status", "--json", "0").stdout)
        assert [(r["path"], r["state"]) for r in s["replicas"]] == [
            (a, "in-service"), (b, "removed"), (c, "removed"), (new1, "in-service"),
            (new2, "in-service")]
    finally:
        assert qb_in(cwd, "del", "0").returncode == 0
        assert wait_dead(pid)
    # readd, relative: a member not given at add comes back
    p = qb_in(cwd, "add", "--json", "-t", "2", "a.img", "d.img")
    assert p.returncode == 0, p.stderr
    pid = json.loads(p.stdout)["pid"]
    try:
        assert "not given" in p.stderr
        p = qb_in(cwd, "readd", "0", "e.img")
        assert p.returncode == 0, p.stderr
        assert state_paths(rundir) == [a, new1, new2]
        s = json.loads(qb_in(cwd, "status", "--json", "0").stdout)
        assert [r["state"] for r in s["replicas"]] == ["in-service"] * 3
    finally:
        assert qb_in(cwd, "del", "0").returncode == 0
        assert wait_dead(pid)


def test_the_daemon_refuses_a_relative_path_it_cannot_resolve(reps, devices, rundir):
    import socket

    devices("-t", "2", *reps)
    for command, args in (("add-replica", {"replica": "d.img"}),
                          ("remove-replica", {"replica": "c.img"}),
                          ("readd", {"replica": "c.img"})):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(rundir / "0.sock"))
            s.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
            answer = json.loads(s.makefile().readline())
        assert answer["ok"] is False and "relative path" in answer["error"], answer
    s = json.loads(qb("status", "--json", "0").stdout)
    assert [r["state"] for r in s["replicas"]] == ["in-service"] * 3


# -- a malformed or unexpected request gets an error, the device goes on --

def ask(rundir, raw):
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(rundir / "0.sock"))
        s.sendall(raw)
        return json.loads(s.makefile().readline())


BAD_REQUESTS = [
    b"not json\n", b"\xff\xfe\x00\n", b"\n", b"[]\n", b'"scrub"\n', b"42\n",
    b'{"command": 5}\n', b'{"args": {}}\n', b'{"command": "explode"}\n',
    b'{"command": "scrub", "args": [1]}\n',
    b'{"command": "scrub", "args": "all"}\n',
    b'{"command": "scrub", "args": {"rate": "fast"}}\n',
    b'{"command": "scrub", "args": {"rate": -1}}\n',
    b'{"command": "scrub", "args": {"rate": true}}\n',
    b'{"command": "scrub", "args": {"repair": "no"}}\n',
    b'{"command": "readd", "args": {}}\n',
    b'{"command": "readd", "args": {"replica": [1]}}\n',
    b'{"command": "readd", "args": {"replica": null}}\n',
    b'{"command": "replace", "args": {"old": 0}}\n',
    b'{"command": "replace", "args": {"old": {}, "new": 3}}\n',
    b'{"command": "add-replica", "args": {"replica": 1}}\n',
    b'{"command": "remove-replica", "args": {"replica": 99}}\n',
    b'{"command": "remove-replica", "args": {"replica": -1}}\n',
    b'{"command": "remove-replica", "args": {"replica": true}}\n',
    b'{"command": "remove-replica", "args": {"replica": 1.5}}\n',
]


def test_malformed_requests_get_an_error_and_the_device_goes_on(reps, devices, rundir):
    info = devices("-t", "2", *reps)
    for raw in BAD_REQUESTS:
        answer = ask(rundir, raw)
        assert answer["ok"] is False and answer["error"], (raw, answer)
        assert "Traceback" not in answer["error"]
        assert alive(info["pid"]), f"{raw!r} stopped the daemon"
    s = json.loads(qb("status", "--json", "0").stdout)
    assert s["state"] == "live" and s["pid"] == info["pid"]
    assert [r["state"] for r in s["replicas"]] == ["in-service"] * 3
    assert s["job"] is None
    assert (rundir / "0.json").exists() and (rundir / "0.sock").exists()


# -- job cancel --

def wait_job(state, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        job = json.loads(qb("job", "show", "--json", "0").stdout)
        if job["state"] == state or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_job_cancel_stops_a_scrub(reps, devices, rundir):
    info = devices("-t", "2", *reps)
    # 1 byte/s: the scrub waits after its first step, for weeks
    p = qb("scrub", "--background", "--json", "--rate", "1", "0")
    assert p.returncode == 0, p.stderr
    assert wait_job("running")["state"] == "running"
    p = qb("job", "cancel", "--json", "0")
    assert p.returncode == 0, p.stderr
    job = json.loads(p.stdout)
    assert job["state"] == "cancelled" and "cancelled" in job["error"]
    assert job["seconds"] < 20
    p = qb("job", "cancel", "0")
    assert p.returncode != 0 and "no job runs on this device" in p.stderr
    s = json.loads(qb("status", "--json", "0").stdout)
    assert s["state"] == "live" and s["pid"] == info["pid"]
    assert s["job"]["state"] == "cancelled"
    p = qb("scrub", "0")            # another job may start now
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("how", ["add-replica", "replace", "readd"])
def test_job_cancel_puts_the_replica_set_back(how, tmp_path, reps, devices, rundir):
    new = str(tmp_path / "new.img")
    with open(new, "wb") as f:
        f.truncate(1 << 20)
    if how == "readd":
        # a member that joined empty and never finished (its add-replica
        # was cut short by the daemon's death) needs all of the device
        info = devices("-t", "2", *reps)
        assert qb("add-replica", "--background", "--rate", "1", "0", new).returncode == 0
        assert wait_job("running")["state"] == "running"
        os.kill(info["pid"], signal.SIGKILL)
        assert wait_dead(info["pid"])
        assert qb("del", "0", fake=True).returncode == 0
        devices("-t", "2", *reps)                   # new is missing: failed
        args = ["readd", "0", new]
    elif how == "add-replica":
        devices("-t", "2", *reps)
        args = ["add-replica", "0", new]
    else:
        devices("-t", "2", *reps)
        args = ["replace", "0", reps[1], new]
    before = json.loads((rundir / "0.json").read_text())["replicas"]
    p = qb(*args[:1], "--background", "--rate", "1", *args[1:])
    assert p.returncode == 0, p.stderr
    running = wait_job("running")
    assert running["state"] == "running" and running["kind"] == how
    p = qb("job", "cancel", "0")
    assert p.returncode == 0, p.stderr
    assert "cancelled" in p.stdout
    s = json.loads(qb("status", "--json", "0").stdout)
    states = {r["path"]: r["state"] for r in s["replicas"]}
    after = json.loads((rundir / "0.json").read_text())["replicas"]
    if how == "readd":
        assert states[new] == "failed"      # a member still, out of service
        assert [r["path"] for r in after] == [r["path"] for r in before] + [new]
    else:
        assert states[new] == "removed"
        assert [states[r] for r in reps] == ["in-service"] * 3
        assert after == before
    p = qb(*args)                   # and it can be done again, to the end
    assert p.returncode == 0, p.stderr
    s = json.loads(qb("status", "--json", "0").stdout)
    done = {r["path"]: r["state"] for r in s["replicas"]}
    assert done[new] == "in-service"


# -- del refuses a device in use --

def test_del_refuses_a_device_held_open_and_names_the_holder(tmp_path, reps, devices,
                                                             rundir):
    a = devices("-t", "2", *reps)
    extra = make_images(tmp_path, 3, size=1 << 20, names=["x.img", "y.img", "z.img"])
    b = devices("-t", "2", *extra)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; f = open(sys.argv[1], 'rb'); "
                               "print('open', flush=True); time.sleep(600)", a["path"]],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"     # the premise
        p = qb("del", "0")
        assert p.returncode == 14, p.stderr
        assert f"open by pid {holder.pid} (python" in p.stderr and "--force" in p.stderr
        assert alive(a["pid"]) and os.path.exists(a["path"])
        # --all deletes what is free, refuses what is held, says so
        p = qb("del", "--all", "--json")
        assert p.returncode == 14, p.stderr
        assert [d["id"] for d in json.loads(p.stdout)] == [b["id"]]
        assert f"open by pid {holder.pid}" in p.stderr
        assert wait_dead(b["pid"])
        assert alive(a["pid"])
        s = json.loads(qb("status", "--json", "0").stdout)
        assert s["state"] == "live"
        p = qb("del", "--force", "0")
        assert p.returncode == 0, p.stderr
        assert wait_dead(a["pid"])
    finally:
        holder.kill()
        holder.wait()


# -- runtime files are root's alone --

def test_runtime_files_are_private_and_leave_no_temporary_files(reps, devices, rundir):
    import stat

    info = devices("-t", "2", *reps)
    assert stat.S_IMODE(os.stat(rundir).st_mode) == 0o700
    for name in ("0.json", "0.events", "0.log", "0.sock", "add.lock"):
        mode = stat.S_IMODE(os.lstat(rundir / name).st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert qb("remove-replica", "0", reps[2]).returncode == 0    # rewrites 0.json
    assert stat.S_IMODE(os.stat(rundir / "0.json").st_mode) == 0o600
    assert sorted(os.listdir(rundir)) == ["0.events", "0.json", "0.log", "0.sock",
                                          "add.lock"]
    st = json.loads((rundir / "0.json").read_text())
    assert st["pid"] == info["pid"] and st["cmdline"][1:3] == [FAKE, "add"]


def test_runtime_files_are_never_opened_through_a_symlink(tmp_path, reps, rundir, nodes):
    rundir.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (rundir / "0.events").symlink_to(victim)
    p = qb("add", "-t", "2", *reps, fake=True)
    assert p.returncode != 0
    assert "0.events is a symbolic link: refused" in p.stderr
    assert victim.read_text() == "precious\n"
    assert not list(nodes.iterdir()) and not (rundir / "0.json").exists()


@pytest.mark.parametrize("how", ["world-writable", "other-owner", "symlink"])
def test_a_run_dir_someone_else_controls_is_refused(how, tmp_path, reps, monkeypatch):
    d = tmp_path / "elsewhere"
    if how == "symlink":
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        d.symlink_to(real)
    else:
        d.mkdir()
        if how == "world-writable":
            os.chmod(d, 0o777)
        else:
            os.chown(d, 65534, 65534)
    monkeypatch.setenv("QUORUMBLK_RUN_DIR", str(d))
    for args in (["list"], ["add", "-t", "2", *reps], ["del", "--all"]):
        p = qb(*args)
        assert p.returncode == 1, (args, p.stderr)
        assert p.stderr.startswith(f"quorumblk: QUORUMBLK_RUN_DIR={d}: ")
        assert "refused" in p.stderr and "Traceback" not in p.stderr
    assert os.listdir(d) == []


def test_del_signals_only_the_devices_own_daemon(rundir, nodes):
    from quorumblk import runtime

    rundir.mkdir(mode=0o700)
    other = subprocess.Popen(["sleep", "600"])
    try:
        # a state file (stale, or forged) naming a live process that is not
        # a quorumblk daemon, with no control socket
        (rundir / "5.json").write_text(json.dumps({
            "id": 5, "path": str(nodes / "ublkb5"), "pid": other.pid,
            "start_time": runtime.proc_start_time(other.pid), "threshold": 2,
            "replicas": [], "cmdline": ["/usr/bin/quorumblk", "add", "-t", "2"]}))
        p = qb("del", "5")
        assert p.returncode == 8, p.stderr
        assert f"pid {other.pid} (sleep 600) is not the daemon of quorumblk device 5: " \
               "not signalled" in p.stderr
        time.sleep(0.3)
        assert other.poll() is None, "del signalled a process that is not its daemon"
    finally:
        other.kill()
        other.wait()


def test_del_signals_the_daemon_whose_socket_is_gone(reps, devices, rundir):
    info = devices("-t", "2", *reps)
    os.unlink(rundir / "0.sock")
    p = qb("del", "0")
    assert p.returncode == 0, p.stderr
    assert wait_dead(info["pid"])
    assert "stopping device 0: SIGTERM" in (rundir / "0.log").read_text()


# -- the smaller ones --

def test_a_negative_threshold_is_reported_as_given(reps):
    p = qb("add", "-t", "-1", *reps)
    assert p.returncode == 10, p.stderr
    assert "threshold -1 out of range" in p.stderr and "1 to 3" in p.stderr
    assert "threshold 0" not in p.stderr


def test_errors_name_the_errno_once(tmp_path, reps):
    d = tmp_path / "a-directory"
    d.mkdir()
    p = qb("add", "-t", "2", reps[0], reps[1], d)
    assert p.returncode == 10, p.stderr
    assert str(d) in p.stderr and p.stderr.count("EISDIR") == 1, p.stderr


def test_version():
    from quorumblk import __version__

    p = qb("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"quorumblk {__version__}"


def test_json_foreground_prints_json(reps, rundir, nodes):
    proc = subprocess.Popen([sys.executable, FAKE, "add", "--foreground", "--json",
                             "-t", "2", *reps], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info == {"id": 0, "path": str(nodes / "ublkb0"), "pid": proc.pid,
                        "format": 1}
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _pids_running(word):
    """Processes whose command line holds word."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if word.encode() in f.read():
                    out.append(int(pid))
        except (OSError, ValueError):
            continue
    return out


def test_a_start_that_times_out_leaves_no_daemon_behind(reps, rundir, nodes):
    # the device's start takes 4 s, the command waits 1 s
    env = {"FAKE_UBLK_START_SLEEP": "4", "FAKE_UBLK_START_TIMEOUT": "1"}
    t0 = time.monotonic()
    p = qb("add", "-t", "2", *reps, fake=True, env=env)
    assert p.returncode == 9, p.stderr
    # when the command says the start failed, its daemon is gone already
    left = [pid for pid in _pids_running(reps[0]) if alive(pid)]
    assert not left, f"the daemon of the failed start still runs: {left}"
    time.sleep(max(0.0, t0 + 6 - time.monotonic()))   # past the start it gave up on
    assert not list(nodes.iterdir()), "the device went LIVE after all"
    assert not list(rundir.glob("*.json")) and not list(rundir.glob("*.sock"))
    assert json.loads(qb("list", "--json").stdout) == []
    assert "did not go LIVE within 1 s" in p.stderr
    assert "stopped its daemon (pid" in p.stderr, p.stderr
    pid = int(p.stderr.split("stopped its daemon (pid ")[1].split(")")[0])
    assert not alive(pid)


def test_errors_come_as_json_too_with_json(reps, devices, rundir):
    devices("-t", "2", *reps)
    for args, code in ((["status", "--json", "7"], 7),
                       (["add", "--json", "-t", "2", *reps], 5),
                       (["remove-replica", "--json", "0", "/nope.img"], 10)):
        p = qb(*args, fake=True)
        assert p.returncode == code, (args, p.stderr)
        err = json.loads(p.stdout)
        assert err["ok"] is False and err["exit_code"] == code
        assert p.stderr == f"quorumblk: {err['error']}\n"
