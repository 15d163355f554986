"""The quorumblk command on a real ublk device (in the VM): add, list,
status and del round trip, every CLI error (not root, no ublk_drv, a replica
in use, an id in use, refused replicas, a failed start leaves nothing), del
during fio, SIGTERM to the daemon, events and repair seen through status."""
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import ROOT, Served, run, wait_gone

pytestmark = pytest.mark.timeout(400)

QB = os.path.join(ROOT, ".venv", "bin", "quorumblk")
RUN_DIR = "/run/quorumblk"


def qb(*args, timeout=120, user=None):
    """The quorumblk command, as root or as another user. That user keeps
    one capability, to read files it has no permission for: the checkout
    may sit where only root reaches (a 0700 folder under /root), and it is
    not root for anything else (its effective uid is what the command
    checks; it writes and connects as that user)."""
    cmd = [QB] + [str(a) for a in args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
               "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def ublk_ids():
    try:
        return sorted(os.listdir("/sys/class/ublk-char"))
    except FileNotFoundError:
        return []


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid, timeout=60):
    end = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    return not alive(pid)


@pytest.fixture
def cli():
    """add(...) -> {"id", "path", "pid"}; every device still there at
    teardown is deleted with `quorumblk del`."""
    added = []

    def _add(*args):
        p = qb("add", "--json", *args)
        assert p.returncode == 0, p.stderr
        info = json.loads(p.stdout)
        added.append(info)
        return info

    yield _add
    for info in added:
        if alive(info["pid"]):
            run(f"umount -l {info['path']} 2>/dev/null; true", check=False)
            p = qb("del", info["id"])
            assert p.returncode == 0, p.stderr


def test_add_list_status_del_round_trip(images, cli):
    from quorumblk.device import dev_info

    paths = images(3, 64 << 20)
    before = ublk_ids()
    info = cli("-t", "2", "--queues", "2", "--depth", "64", *paths)
    assert os.path.exists(info["path"])
    k = dev_info(info["id"])
    assert k["state"] == "live" and k["pid"] == info["pid"]
    assert k["queues"] == 2 and k["depth"] == 64 and k["size"] == 64 << 20

    lst = json.loads(qb("list", "--json").stdout)
    (mine,) = [d for d in lst if d["id"] == info["id"]]
    assert mine["state"] == "live" and mine["threshold"] == 2
    assert mine["replicas"] == [{"path": p, "state": "in-service"} for p in paths]

    run(["dd", "if=/dev/urandom", f"of={info['path']}", "bs=1M", "count=8",
         "oflag=direct", "status=none"])
    run(["dd", f"if={info['path']}", "of=/dev/null", "bs=1M", "count=8",
         "iflag=direct", "status=none"])
    s = json.loads(qb("status", "--json", os.path.basename(info["path"])).stdout)
    assert s["pid"] == info["pid"] and s["state"] == "live"
    assert s["counters"]["write_bytes"] >= 8 << 20
    assert s["counters"]["read_bytes"] >= 8 << 20
    assert all(r["state"] == "in-service" for r in s["replicas"])
    assert all(r["write_bytes"] >= 8 << 20 for r in s["replicas"])
    human = qb("status", info["path"])
    assert human.returncode == 0 and "replica 0 in-service" in human.stdout

    p = qb("del", info["path"])
    assert p.returncode == 0, p.stderr
    assert not alive(info["pid"])
    assert wait_gone(info["path"], 5) and wait_gone(f"/dev/ublkc{info['id']}", 5)
    assert ublk_ids() == [i for i in before if i != f"ublkc{info['id']}"]
    assert not os.path.exists(f"{RUN_DIR}/{info['id']}.json")
    assert not os.path.exists(f"{RUN_DIR}/{info['id']}.sock")
    # the replicas hold what was written
    for p in paths[1:]:
        run(["cmp", "-n", str(8 << 20), paths[0], p])


def test_not_root_is_refused(images):
    paths = images(3, 16 << 20)
    before = ublk_ids()
    for args in (["add", "-t", "2", *paths], ["list"], ["status", "0"], ["del", "--all"]):
        p = qb(*args, user=65534)
        assert p.returncode == 3, (args, p.stdout, p.stderr)
        assert "must be run as root" in p.stderr and "uid 65534" in p.stderr
    assert ublk_ids() == before


def test_control_socket_is_root_only(images, cli):
    info = cli("-t", "2", *images(3, 16 << 20))
    sock = f"{RUN_DIR}/{info['id']}.sock"
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1]); print('connected')\n"
             "except OSError as e:\n print('refused', e.errno)\n")
    p = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "/usr/bin/python3", "-c", probe, sock])
    assert p.stdout.startswith("refused"), p.stdout


def test_missing_ublk_drv_says_modprobe(images):
    paths = images(3, 16 << 20)
    assert ublk_ids() == [], f"ublk devices left by earlier tests: {ublk_ids()}"
    r = run(["rmmod", "ublk_drv"], check=False)
    assert r.returncode == 0, f"cannot unload ublk_drv to test this: {r.stderr}"
    try:
        p = qb("add", "-t", "2", *paths)
        assert p.returncode == 4, p.stderr
        assert "modprobe ublk_drv" in p.stderr
        assert "CONFIG_BLK_DEV_UBLK" in p.stderr
    finally:
        run(["modprobe", "ublk_drv"])
    end = time.monotonic() + 10
    while not os.path.exists("/dev/ublk-control") and time.monotonic() < end:
        time.sleep(0.1)
    assert os.path.exists("/dev/ublk-control")


def test_replica_in_use_is_refused(images, scratch, cli):
    paths = images(3, 16 << 20)
    info = cli("-t", "2", *paths)
    others = images(2, 16 << 20, prefix="o")
    link = os.path.join(scratch, "hardlink.img")
    os.link(paths[1], link)
    sym = os.path.join(scratch, "symlink.img")
    os.symlink(paths[2], sym)
    before = ublk_ids()
    for reused in (paths[0], link, sym):
        p = qb("add", "-t", "2", others[0], others[1], reused)
        assert p.returncode == 5, p.stderr
        assert f"already used by quorumblk device {info['id']}" in p.stderr
    assert ublk_ids() == before


def test_id_in_use_is_refused(images, cli):
    a = images(3, 16 << 20, prefix="a")
    b = images(3, 16 << 20, prefix="b")
    info = cli("-t", "2", *a)
    p = qb("add", "-t", "2", "--id", info["id"], *b)
    assert p.returncode == 6, p.stderr
    assert f"device id {info['id']} is in use" in p.stderr


def test_id_of_another_ublk_server_is_refused(images):
    """An id taken by a device that is not quorumblk's (no state file)."""
    other = Served(images(1, 16 << 20, prefix="x"), 1)
    assert other.error is None, other.error
    try:
        p = qb("add", "-t", "2", "--id", other.id, *images(3, 16 << 20))
        assert p.returncode == 6, p.stderr
        assert f"/dev/ublkb{other.id} exists" in p.stderr
    finally:
        other.stop()


def test_refused_replicas_touch_no_kernel_state(images, scratch):
    paths = images(3, 16 << 20)
    small = images(1, 8 << 20, prefix="small")[0]
    before = ublk_ids()
    cases = [(["-t", "4", *paths], "1 to 3"),
             (["-t", "2", paths[0], paths[1], small], "8388608 bytes"),
             (["-t", "2", paths[0], paths[1], os.path.join(scratch, "nope")], "ENOENT"),
             (["-t", "2", paths[0], paths[1], paths[0]], "same replica")]
    for args, expect in cases:
        p = qb("add", *args)
        assert p.returncode == 10, p.stderr
        assert expect in p.stderr
        assert ublk_ids() == before


def test_failed_start_leaves_no_device(scratch):
    """A device that cannot start (its size is no multiple of the 4096-byte
    logical block asked for) fails cleanly: exit 9, a message, no device,
    no daemon, no state."""
    paths = []
    for name in "abc":
        paths.append(os.path.join(scratch, f"{name}.img"))
        with open(paths[-1], "wb") as f:
            f.truncate((16 << 20) + 512)
    before = ublk_ids()
    p = qb("add", "-t", "2", "--block-size", "4096", *paths)
    assert p.returncode == 9, p.stderr
    assert "not a multiple of the block size" in p.stderr
    assert p.stderr.startswith("quorumblk: ") and "Traceback" not in p.stderr
    assert ublk_ids() == before
    assert not [f for f in os.listdir(RUN_DIR) if f.endswith(".json")]
    assert not run(["pgrep", "-f", "quorumblk add"], check=False).stdout.strip()


def _fio(path, runtime=120):
    return subprocess.Popen(
        ["fio", "--name=load", f"--filename={path}", "--rw=randrw", "--bs=4k",
         "--ioengine=libaio", "--iodepth=16", "--direct=1", "--time_based",
         f"--runtime={runtime}", "--size=16M", "--output-format=terse"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd="/tmp")     # fio cut off saves its verify state in its cwd


def _wait_for_io(dev_id, minimum=200, timeout=60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = json.loads(qb("status", "--json", dev_id).stdout)
        if s["counters"]["reads"] + s["counters"]["writes"] >= minimum:
            return s
        time.sleep(0.5)
    raise AssertionError("fio did not get going")


def test_del_during_fio_does_not_hang(images, cli):
    info = cli("-t", "2", *images(3, 32 << 20))
    fio = _fio(info["path"])
    try:
        _wait_for_io(info["id"])
        p = qb("del", info["id"])
        assert p.returncode == 14 and "(fio)" in p.stderr, p.stderr
        t0 = time.monotonic()
        p = qb("del", "--force", "--timeout", "90", info["id"], timeout=120)
        took = time.monotonic() - t0
        assert p.returncode == 0, p.stderr
        fio.wait(timeout=90)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    print(f"del during fio took {took:.1f} s; fio exit {fio.returncode}")
    assert not alive(info["pid"])
    assert wait_gone(info["path"], 5) and wait_gone(f"/dev/ublkc{info['id']}", 5)
    assert not os.path.exists(f"{RUN_DIR}/{info['id']}.json")


def test_del_refuses_a_mounted_device_and_names_the_mount(images, cli, tmp_path):
    info = cli("-t", "2", *images(3, 64 << 20))
    run(["mkfs.ext4", "-q", info["path"]])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run(["mount", info["path"], str(mnt)])
    try:
        (mnt / "file").write_text("before del")
        for args in ([info["id"]], ["--all"], [info["path"]]):
            p = qb("del", *args)
            assert p.returncode == 14, (args, p.stderr)
            assert f"mounted on {mnt}" in p.stderr and "--force" in p.stderr
        assert alive(info["pid"]) and os.path.exists(info["path"])
        (mnt / "file").write_text("after del")      # the file system goes on
        run(["sync"])
        assert (mnt / "file").read_text() == "after del"
    finally:
        run(["umount", str(mnt)])
    p = qb("del", info["id"])
    assert p.returncode == 0, p.stderr
    assert wait_dead(info["pid"])


def test_sigterm_to_the_daemon_stops_in_order_under_fio(images, cli):
    info = cli("-t", "2", *images(3, 32 << 20))
    fio = _fio(info["path"])
    try:
        _wait_for_io(info["id"])
        os.kill(info["pid"], signal.SIGTERM)
        assert wait_dead(info["pid"], 90)
        fio.wait(timeout=90)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert wait_gone(info["path"], 5) and wait_gone(f"/dev/ublkc{info['id']}", 5)
    assert not os.path.exists(f"{RUN_DIR}/{info['id']}.json")
    with open(f"{RUN_DIR}/{info['id']}.log") as f:
        log = f.read()
    assert f"stopping device {info['id']}: SIGTERM" in log
    assert f"device {info['id']} stopped" in log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_daemon_exits_0_on_signal(images, sig):
    proc = subprocess.Popen([QB, "add", "--foreground", "-t", "2",
                             *images(3, 16 << 20)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        path = proc.stdout.readline().strip()
        assert path.startswith("/dev/ublkb") and os.path.exists(path), proc.stderr
        run(["dd", "if=/dev/zero", f"of={path}", "bs=64k", "count=16",
             "oflag=direct", "status=none"])
        proc.send_signal(sig)
        assert proc.wait(timeout=90) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_gone(path, 5)


def test_daemon_killed_leaves_nothing_that_del_cannot_remove(images, cli):
    """kill -9 of the daemon: the kernel keeps the device, quiesced (it was
    made with user recovery); list and status show it quiesced, status says the
    daemon died and names recover, its replicas stay taken, and del removes it from
    the kernel."""
    paths = images(3, 16 << 20)
    info = cli("-t", "2", *paths)
    os.kill(info["pid"], signal.SIGKILL)
    assert wait_dead(info["pid"])
    assert os.path.isdir(f"/sys/class/ublk-char/ublkc{info['id']}")
    lst = json.loads(qb("list", "--json").stdout)
    (mine,) = [d for d in lst if d["id"] == info["id"]]
    assert mine["state"] == "quiesced", mine
    assert f"quorumblk recover {info['id']}" in mine["error"]
    p = qb("status", info["id"])
    assert p.returncode == 0 and p.stdout.startswith("quiesced\n"), (p.stdout, p.stderr)
    assert "died" in p.stdout and f"quorumblk recover {info['id']}" in p.stdout
    others = images(2, 16 << 20, prefix="o")
    p = qb("add", "-t", "2", others[0], others[1], paths[0])
    assert p.returncode == 5, p.stderr
    p = qb("del", info["id"], timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(qb("list", "--json").stdout) == [
        d for d in lst if d["id"] != info["id"]]
    assert wait_gone(info["path"], 10) and wait_gone(f"/dev/ublkc{info['id']}", 10)
    assert not os.path.exists(f"{RUN_DIR}/{info['id']}.json")
    # the replicas are free again
    again = cli("-t", "2", *paths)
    assert qb("del", again["id"]).returncode == 0


def test_bitflips_show_in_status_and_are_repaired(images, cli):
    paths = images(3, 32 << 20)
    info = cli("-t", "2", *paths)
    run(["dd", "if=/dev/urandom", f"of={info['path']}", "bs=1M", "count=4",
         "oflag=direct", "status=none"])
    offsets = [4096 * 7 + 100, 4096 * 300 + 5, 4096 * 1000]
    fd = os.open(paths[2], os.O_RDWR)
    try:
        for off in offsets:
            b = os.pread(fd, 1, off)
            os.pwrite(fd, bytes([b[0] ^ 0x10]), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    good = run(f"head -c {4 << 20} {paths[0]} | sha256sum").stdout.split()[0]
    got = run(f"dd if={info['path']} bs=1M count=4 iflag=direct status=none | sha256sum"
              ).stdout.split()[0]
    assert got == good
    s = json.loads(qb("status", "--json", info["id"]).stdout)
    bad = [e for e in s["events"] if e["type"] == "bad-block"]
    assert sorted(e["offset"] for e in bad) == [o // 4096 * 4096 for o in offsets]
    assert {e["replica"] for e in bad} == {2} and {e["path"] for e in bad} == {paths[2]}
    assert s["replicas"][2]["bad_blocks"] == 3 and s["replicas"][2]["repairs"] >= 3
    with open(f"{RUN_DIR}/{info['id']}.events") as f:
        logged = [json.loads(line) for line in f]
    # the file keeps the events of earlier devices of that id: this one's
    # begin at its last device-started
    logged = logged[max(i for i, e in enumerate(logged) if e["type"] == "device-started"):]
    assert sorted(e["offset"] for e in logged if e["type"] == "bad-block") == \
        sorted(e["offset"] for e in bad)
    # the data (the tails hold each replica's own header) is the same again
    run(["cmp", "-n", str(32 << 20), paths[0], paths[2]])
