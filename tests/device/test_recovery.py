"""Daemon crash recovery on a real ublk device (in the VM): Device.recover
in a new server after kill -9 of the old one under fio --verify; through
the command: kill -9 of the daemon leaves the device quiesced, I/O issued meanwhile waits, `quorumblk
recover` serves it again with nothing written before the crash lost (fio
verifies across the crash); recover refuses a live daemon; del removes a
quiesced device and fails the I/O that waited; `add --foreground --id N`
(the systemd unit's restart) recovers."""
import errno
import json
import os
import signal
import subprocess
import tempfile
import time

import pytest

from quorumblk import runtime

from conftest import Served, run, wait_gone

from test_cli import QB, alive, cli, qb, wait_dead  # noqa: F401

pytestmark = pytest.mark.timeout(500)


def kernel_state(dev_id):
    from quorumblk.device import dev_info

    return dev_info(dev_id)


def crash(info):
    """kill -9 the daemon; the kernel keeps the device, quiesced."""
    os.kill(info["pid"], signal.SIGKILL)
    assert wait_dead(info["pid"])
    end = time.monotonic() + 30
    while kernel_state(info["id"])["state"] != "quiesced" and time.monotonic() < end:
        time.sleep(0.1)
    k = kernel_state(info["id"])
    assert k["state"] == "quiesced", k
    assert "user-recovery" in k["features"] and "user-recovery-reissue" in k["features"]


def recover(dev_id):
    p = qb("recover", "--json", dev_id, timeout=300)
    assert p.returncode == 0, p.stderr
    new = json.loads(p.stdout)
    assert new["id"] == dev_id and alive(new["pid"])
    k = kernel_state(dev_id)
    assert k["state"] == "live" and k["pid"] == new["pid"], k
    return new


def still_waiting(procs, seconds=3.0):
    """True when every process is still running after seconds (its I/O
    waits on the quiesced device instead of failing)."""
    time.sleep(seconds)
    return all(p.poll() is None for p in procs)


def data_identical(paths, size):
    for p in paths[1:]:
        run(["cmp", "-n", str(size), paths[0], p])


def fio_verify(path, seed):
    """Random 4 KiB writes (each block of 32 MiB once), then a verify pass
    (crc32c), in the background. The rate cap makes the write phase last at
    least 8 s however fast the machine, so that a crash lands in it."""
    return subprocess.Popen(
        ["fio", "--name=crash", f"--filename={path}", "--direct=1",
         "--ioengine=libaio", "--rw=randwrite", "--bs=4k", "--iodepth=16",
         "--size=32m", "--rate_iops=1000", f"--randseed={seed}",
         "--allow_file_create=0", "--verify=crc32c", "--verify_fatal=1",
         "--do_verify=1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=tempfile.gettempdir())


def wait_writes(fio, writes, minimum=300, timeout=120):
    """Wait until writes() (the device's write count) reaches minimum while
    fio still runs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and fio.poll() is None and writes() < minimum:
        time.sleep(0.3)
    assert fio.poll() is None, "fio finished before the crash"


def test_device_recover_in_a_new_server_under_fio_verify(images, serve):
    """The library: a server dies (kill -9) under fio, a new process
    Device.recover()s the device, fio completes and verifies."""
    size = 64 << 20
    paths = images(3, size)
    s = serve(paths, 2, device={"user_recovery": True})
    fio = fio_verify(s.path, 17)
    try:
        wait_writes(fio, lambda: s.status()["counters"]["writes"])
        s.kill()
        end = time.monotonic() + 30
        while kernel_state(s.id)["state"] != "quiesced" and time.monotonic() < end:
            time.sleep(0.1)
        assert kernel_state(s.id)["state"] == "quiesced"
        assert still_waiting([fio]), "fio ended while the device was quiesced"
        s2 = serve(paths, 2, recover=s.id)
        assert s2.id == s.id and s2.path == s.path
        k = kernel_state(s.id)
        assert k["state"] == "live" and k["pid"] == s2.pid, k
        out, _ = fio.communicate(timeout=400)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, out
    assert "err= 0" in out, out
    assert s2.status()["counters"]["quorum_failures"] == 0
    assert s2.stop()["ok"]
    assert wait_gone(s.path, 10)
    data_identical(paths, size)


def test_device_recover_refuses_what_it_cannot_take_over(images, serve):
    """Device.recover refuses, and leaves the device as it was: one made
    without user recovery, one whose server runs, one of another size, one
    that is gone."""
    plain = serve(images(3, 16 << 20, prefix="p"), 2)
    paths = images(3, 16 << 20)
    live = serve(paths, 2, device={"user_recovery": True})
    other = Served(paths, 2, recover=plain.id)
    assert other.error and other.error["errno"] == errno.EOPNOTSUPP, other.error
    assert f"ublk device {plain.id} was created without user recovery" in other.error["error"]
    other = Served(paths, 2, recover=live.id)
    assert other.error and other.error["errno"] == errno.EBUSY, other.error
    assert f"ublk device {live.id} is LIVE, served by pid {live.pid}" in other.error["error"]
    other = Served(images(3, 32 << 20, prefix="big"), 2, recover=live.id)
    assert other.error and other.error["errno"] == errno.EINVAL, other.error
    assert f"ublk device {live.id} has {16 << 20} bytes" in other.error["error"]
    k = kernel_state(live.id)
    assert k["state"] == "live" and k["pid"] == live.pid
    run(["dd", "if=/dev/zero", f"of={live.path}", "bs=64k", "count=4",
         "oflag=direct", "status=none"])
    plain.kill()
    # without user recovery the kernel stops the device when its server dies
    assert wait_gone(plain.path, 30)
    from quorumblk.device import delete
    delete(plain.id)
    other = Served(paths, 2, recover=plain.id)
    assert other.error and other.error["errno"] == errno.ENODEV, other.error


def test_kill_9_during_fio_verify_then_recover(images, cli):
    size = 64 << 20
    paths = images(3, size)
    info = cli("-t", "2", *paths)
    fio = fio_verify(info["path"], 99)
    try:
        wait_writes(fio, lambda: runtime.request(info["id"], "status")
                    ["status"]["counters"]["writes"])
        crash(info)
        (mine,) = [d for d in json.loads(qb("list", "--json").stdout)
                   if d["id"] == info["id"]]
        assert mine["state"] == "quiesced", mine
        assert still_waiting([fio]), "fio ended while the device was quiesced"
        new = recover(info["id"])
        out, _ = fio.communicate(timeout=400)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, out
    assert "err= 0" in out, out
    s = json.loads(qb("status", "--json", info["id"]).stdout)
    assert s["state"] == "live" and s["pid"] == new["pid"]
    assert s["resync"]["reason"] == "unclean-stop" and s["resync"]["regions"] > 0
    assert s["counters"]["quorum_failures"] == 0
    assert all(r["state"] == "in-service" for r in s["replicas"])
    with open(f"/run/quorumblk/{info['id']}.log") as f:
        assert "recovered" in f.read()
    p = qb("del", info["id"])
    assert p.returncode == 0, p.stderr
    data_identical(paths, size)


def test_io_issued_while_quiesced_waits_and_completes_after_recover(images, cli):
    paths = images(3, 32 << 20)
    info = cli("-t", "2", *paths)
    before = os.urandom(1 << 20)
    during = os.urandom(1 << 20)
    src = os.path.join(tempfile.gettempdir(), f"qb-recover-{os.getpid()}")
    with open(src, "wb") as f:
        f.write(before + during)
    try:
        run(["dd", f"if={src}", f"of={info['path']}", "bs=1M", "count=1",
             "oflag=direct", "status=none"])
        crash(info)
        reader = subprocess.Popen(
            ["dd", f"if={info['path']}", "bs=1M", "count=1", "iflag=direct",
             "status=none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        writer = subprocess.Popen(
            ["dd", f"if={src}", f"of={info['path']}", "bs=1M", "skip=1", "seek=8",
             "count=1", "oflag=direct", "status=none"], stderr=subprocess.PIPE)
        try:
            assert still_waiting([reader, writer]), "I/O on the quiesced device ended"
            recover(info["id"])
            got, err = reader.communicate(timeout=120)
            assert reader.returncode == 0, err
            assert writer.wait(timeout=120) == 0, writer.stderr.read()
        finally:
            for p in (reader, writer):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert got == before
        back = run(f"dd if={info['path']} bs=1M skip=8 count=1 iflag=direct "
                   "status=none | sha256sum").stdout.split()[0]
        expect = run(f"tail -c {1 << 20} {src} | sha256sum").stdout.split()[0]
        assert back == expect
    finally:
        os.unlink(src)


@pytest.mark.timeout(900)      # every I/O of a replica takes 3 s: ~330 s under TCG
def test_recover_is_live_before_its_resync_and_reads_are_right_meanwhile(
        dm_replica, scratch, cli):
    """kill -9 of the daemon while a writer rewrites 32 MiB (the same bytes
    each pass: whatever the crash left, the data is known), then one replica
    is slowed (dm-delay, 3 s an I/O) so that the resync, 2 such rounds a
    region at least, outlasts a read (one round). Reads issued while the
    device is quiesced, one in each dirty region, come back right before the
    resync job ends; recover returns before it ends too; at the end the
    replicas are identical and the device holds the data."""
    from quorumblk import meta

    mib = 1 << 20
    devs = [dm_replica(64 * mib) for _ in range(3)]
    paths = [d.path for d in devs]
    info = cli("-t", "2", "--timeout", "60", *paths)
    known = os.urandom(32 * mib)
    src = os.path.join(scratch, "known")
    with open(src, "wb") as f:
        f.write(known)
    run(["dd", f"if={src}", f"of={info['path']}", "bs=1M", "oflag=direct",
         "status=none"])
    writer = subprocess.Popen(
        ["bash", "-c", f"while dd if={src} of={info['path']} bs=1M oflag=direct "
         "status=none; do :; done"], stderr=subprocess.DEVNULL, start_new_session=True)
    readers = []
    try:
        def writes():
            return runtime.request(info["id"], "status")["status"]["counters"]["writes"]
        wait_writes(writer, writes, minimum=writes() + 32)
        crash(info)
        os.killpg(writer.pid, signal.SIGKILL)   # its dd ends once the device is back
        m, bitmap = meta.read(paths[0])
        dirty = [off for off, _ in meta.dirty_ranges(bitmap, m.region_shift,
                                                     m.nregions, merge=False)
                 if off + mib + 65536 <= len(known)]
        assert dirty, "no region of the data is dirty after the crash"
        devs[2].delay(3000)
        for off in dirty:
            readers.append((off + mib, subprocess.Popen(
                ["dd", f"if={info['path']}", "bs=64k", "count=1",
                 "iflag=direct,skip_bytes", f"skip={off + mib}", "status=none"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
        assert still_waiting([p for _, p in readers])
        recover(info["id"])
        recovered = time.time()
        read_at = {}
        end = time.monotonic() + 300
        while len(read_at) < len(readers):
            for off, p in readers:
                if off not in read_at and p.poll() is not None:
                    read_at[off] = time.time()
            assert time.monotonic() < end, "the reads did not come back"
            time.sleep(0.05)
        for off, p in readers:
            out, err = p.communicate()
            assert p.returncode == 0, err
            assert out == known[off:off + 65536], f"wrong data at {off}"
        end = time.monotonic() + 300
        while (job := runtime.request(info["id"], "job")["job"])["state"] == "running":
            assert time.monotonic() < end, f"the resync did not end: {job}"
            time.sleep(0.5)
        assert job["kind"] == "resync" and job["state"] == "done", job
        assert recovered < job["ended"], "recover returned after the resync ended"
        assert max(read_at.values()) < job["ended"], (
            f"the reads came back after the resync ({read_at}, {job})")
        devs[2].heal()
        back = run(f"dd if={info['path']} bs=1M count=32 iflag=direct status=none "
                   "| sha256sum").stdout.split()[0]
        assert back == run(f"sha256sum {src}").stdout.split()[0]
        s = json.loads(qb("status", "--json", info["id"]).stdout)
        assert s["resync"]["done"] and s["counters"]["quorum_failures"] == 0
        assert all(r["state"] == "in-service" for r in s["replicas"])
        size = s["size"]
        assert qb("del", info["id"]).returncode == 0
    finally:
        if writer.poll() is None:
            os.killpg(writer.pid, signal.SIGKILL)
            writer.wait()
        for _, p in readers:
            if p.poll() is None:
                p.kill()
                p.wait()
    data_identical(paths, size)


def test_recover_refuses_while_the_daemon_lives(images, cli):
    info = cli("-t", "2", *images(3, 16 << 20))
    p = qb("recover", info["id"])
    assert p.returncode == 13, p.stderr
    assert f"its daemon (pid {info['pid']}) is alive" in p.stderr
    k = kernel_state(info["id"])
    assert k["state"] == "live" and k["pid"] == info["pid"]
    run(["dd", "if=/dev/zero", f"of={info['path']}", "bs=64k", "count=16",
         "oflag=direct", "status=none"])


def test_del_of_a_quiesced_device_fails_the_waiting_io(images, cli):
    paths = images(3, 16 << 20)
    info = cli("-t", "2", *paths)
    crash(info)
    reader = subprocess.Popen(["dd", f"if={info['path']}", "of=/dev/null", "bs=64k",
                               "count=1", "iflag=direct", "status=none"],
                              stderr=subprocess.PIPE)
    try:
        assert still_waiting([reader])
        p = qb("del", info["id"], timeout=120)
        assert p.returncode == 14 and f"open by pid {reader.pid} (dd)" in p.stderr, p.stderr
        p = qb("del", "--force", info["id"], timeout=120)
        assert p.returncode == 0, p.stderr
        assert reader.wait(timeout=60) != 0     # failed, not hung
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert wait_gone(info["path"], 10) and wait_gone(f"/dev/ublkc{info['id']}", 10)
    assert not os.path.exists(f"/run/quorumblk/{info['id']}.json")
    p = qb("recover", info["id"])
    assert p.returncode == 7, p.stderr


def test_add_foreground_with_the_id_of_a_crashed_device_recovers_it(images, cli):
    """The systemd unit's restart after a crash: the same
    `add --foreground --id N ...` serves the quiesced device again."""
    paths = images(3, 16 << 20)
    info = cli("-t", "2", "--id", "7", *paths)
    run(["dd", "if=/dev/urandom", f"of={info['path']}", "bs=1M", "count=4",
         "oflag=direct", "status=none"])
    written = run(f"dd if={info['path']} bs=1M count=4 iflag=direct status=none "
                  "| sha256sum").stdout.split()[0]
    crash(info)
    proc = subprocess.Popen([QB, "add", "--foreground", "--id", "7", "-t", "2", *paths],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == info["path"], proc.stderr.read()
        k = kernel_state(7)
        assert k["state"] == "live" and k["pid"] == proc.pid
        got = run(f"dd if={info['path']} bs=1M count=4 iflag=direct status=none "
                  "| sha256sum").stdout.split()[0]
        assert got == written
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        assert "recovering it instead" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_gone(info["path"], 10)
