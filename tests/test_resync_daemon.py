"""`add` after an unclean stop goes LIVE at once; the resync runs as the
daemon's job (the real command and daemon, only the kernel faked:
tests/fake_ublk_cli.py, whose FAKE_UBLK_DELAY slows a replica's reads down
so that the resync is seen running). `status` and `job show` follow it, it
cannot be cancelled, the bitmap keeps its bits until it is done (a stop
meanwhile resyncs again at the next add), and at the end the replicas are
identical and the bitmap clean."""
import json
import os
import signal
import time

import pytest

from conftest import make_images, pattern, pwrite
from test_cli import alive, nodes, qb, rundir, wait_dead  # noqa: F401
from quorumblk import meta
from quorumblk.core import Quorum

pytestmark = pytest.mark.timeout(240)

SIZE = 64 << 20
REGION = 4 << 20
BS = 4096
SLOW = {"FAKE_UBLK_DELAY": "1:0.3"}     # about 10 s for the 64 MiB resync


@pytest.fixture
def crashed(tmp_path):
    """Three replicas of a set whose daemon died with writes in flight in
    every region (all 16 dirty), one of them torn on replica 0 only."""
    d = tmp_path / "img"
    d.mkdir()
    paths = make_images(d, 3, size=SIZE)
    plan = meta.assemble(paths, 2)
    q = Quorum(paths, 2)
    meta.commit(paths, plan)
    q.set_meta(plan.metas, plan.bitmap)
    meta.resync(q, plan)
    for r in range(SIZE // REGION):
        q.write(r * REGION, pattern(r, BS))
    q.close()
    pwrite(paths[0], 5 * REGION + BS, b"torn" * 1024)
    return paths


def dirty_bits(path):
    _, bitmap = meta.read(path)
    return sum(bin(b).count("1") for b in bitmap)


def data(path):
    with open(path, "rb") as f:
        return f.read(SIZE)


def add(paths, env=None):
    p = qb("add", "--json", "-t", "2", *paths, fake=True, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), p.stderr


def job_of(dev):
    p = qb("job", "show", "--json", dev, fake=True)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def wait_job(dev, timeout=180):
    deadline = time.monotonic() + timeout
    while True:
        job = job_of(dev)
        if job["state"] != "running":
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def stop(info):
    if alive(info["pid"]):
        os.kill(info["pid"], signal.SIGTERM)
        assert wait_dead(info["pid"], timeout=60), f"daemon {info['pid']} ignored SIGTERM"


def test_add_is_live_before_its_resync_ends(crashed, rundir, nodes):
    assert [dirty_bits(p) for p in crashed] == [16] * 3
    info, err = add(crashed, env=SLOW)
    try:
        assert "runs while the device serves" in err, err
        assert f"quorumblk job show {info['id']}" in err, err
        s = json.loads(qb("status", "--json", info["id"], fake=True).stdout)
        assert s["state"] == "live" and s["health"] == "resyncing", s["health"]
        job = s["job"]
        assert job["kind"] == "resync" and job["state"] == "running", job
        assert job["total_bytes"] == SIZE and job["done_bytes"] < SIZE
        assert s["resync"]["reason"] == "unclean-stop" and not s["resync"]["done"]
        assert [dirty_bits(p) for p in crashed] == [16] * 3   # kept meanwhile
        p = qb("job", "show", info["id"], fake=True)
        assert p.stdout.startswith("resync after an unclean stop: running"), p.stdout
        p = qb("job", "cancel", info["id"], fake=True)
        assert p.returncode == 11 and "cannot be cancelled" in p.stderr, p.stderr
        assert "at start: a resync of" in qb("status", info["id"], fake=True).stdout

        job = wait_job(info["id"])
        assert job["state"] == "done" and job["done_bytes"] == SIZE, job
        s = json.loads(qb("status", "--json", info["id"], fake=True).stdout)
        r = s["resync"]
        assert r["done"] and r["bytes"] == SIZE and r["copied_blocks"] == 1, r
        assert s["health"] == "clean", s["health"]
        assert "at start: resynced" in qb("status", info["id"], fake=True).stdout
        p = qb("del", info["id"], fake=True)
        assert p.returncode == 0, p.stderr
    finally:
        stop(info)
    assert data(crashed[0]) == data(crashed[1]) == data(crashed[2])
    assert [dirty_bits(p) for p in crashed] == [0] * 3


def test_a_stop_during_the_resync_resyncs_again_at_the_next_add(crashed, rundir, nodes):
    info, _ = add(crashed, env={"FAKE_UBLK_DELAY": "1:2"})
    try:
        assert job_of(info["id"])["state"] == "running"
        p = qb("del", info["id"], fake=True)
        assert p.returncode == 0, p.stderr
    finally:
        stop(info)
    assert [dirty_bits(p) for p in crashed] == [16] * 3
    info, err = add(crashed)
    try:
        assert "runs while the device serves" in err, err
        job = wait_job(info["id"])
        assert job["state"] == "done" and job["done_bytes"] == SIZE, job
        assert job["result"]["copied_blocks"] == 1
        assert qb("del", info["id"], fake=True).returncode == 0
    finally:
        stop(info)
    assert data(crashed[0]) == data(crashed[1]) == data(crashed[2])
    assert [dirty_bits(p) for p in crashed] == [0] * 3


def test_the_help_says_the_resync_runs_after_live():
    for cmd in ("add", "recover"):
        p = qb(cmd, "--help")
        assert p.returncode == 0 and "job show DEV" in p.stdout, p.stdout
    assert "resync cannot be cancelled" in " ".join(qb("job", "--help").stdout.split())
