"""Replica changes and scrub on a live device, through the quorumblk
command (in the VM): scrub finds exactly the planted bit flips and repairs
them, replace under fio keeps every byte, readd after a transient dm-flakey
failure copies only what was missed, a stale replica is resynced before it
votes, and every refusal is an error that says why."""
import json
import os
import subprocess
import time

import pytest

from conftest import make_sparse, run
from test_cli import cli, qb  # noqa: F401 (cli is a fixture)

pytestmark = pytest.mark.timeout(600)

MIB = 1 << 20
BS = 4096


def data_identical(paths, size):
    for p in paths[1:]:
        r = run(["cmp", "-n", str(size), paths[0], p], check=False, timeout=300)
        assert r.returncode == 0, f"{p} differs from {paths[0]}: {r.stdout}"


def flip(path, offset, bit=0):
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)[0]
        os.pwrite(fd, bytes([b ^ (1 << bit)]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def job_lines(p):
    """The JSON lines of a job command run with --json."""
    lines = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
    assert lines and lines[-1]["type"] == "result", p.stdout + p.stderr
    return lines


def fill(dev, mib, seed_file="/dev/urandom"):
    run(["dd", f"if={seed_file}", f"of={dev}", "bs=1M", f"count={mib}",
         "oflag=direct", "status=none"])


def status(dev_id):
    p = qb("status", "--json", dev_id)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_scrub_reports_exactly_the_planted_bitflips_and_repairs_them(images, cli):
    size = 64 * MIB
    paths = images(3, size)
    info = cli("-t", "2", *paths)
    fill(info["path"], 16)
    planted = [(0, 5 * BS + 17), (1, 100 * BS), (1, 2000 * BS + 4095),
               (2, 3000 * BS + 1), (2, 3500 * BS), (0, 3900 * BS + 9),
               (2, 1234 * BS + 100)]
    for r, off in planted:
        flip(paths[r], off)
    want = [sum(1 for r, _ in planted if r == i) for i in range(3)]

    p = qb("scrub", "--no-repair", "--json", info["id"])
    assert p.returncode == 0, p.stderr
    lines = job_lines(p)
    assert [line["type"] for line in lines[:-1]] == ["progress"] * (len(lines) - 1)
    res = lines[-1]["result"]
    assert res["bad_blocks_per_replica"] == want and res["repaired"] == 0
    r = run(["cmp", "-n", str(size), paths[0], paths[2]], check=False)
    assert r.returncode == 1                     # report only: still there

    p = qb("scrub", info["id"])
    assert p.returncode == 0, p.stderr
    assert f"{len(planted)} repaired; 0 without quorum" in p.stdout, p.stdout
    s = status(info["id"])
    assert s["job"]["state"] == "done"
    assert s["job"]["result"]["bad_blocks_per_replica"] == want
    assert [r["bad_blocks"] for r in s["replicas"]] == [2 * w for w in want]
    bad = sorted((e["replica"], e["offset"]) for e in s["events"]
                 if e["type"] == "bad-block")
    # each planted block reported once by each scrub
    assert bad == sorted([(r, off // BS * BS) for r, off in planted] * 2), s["events"]
    data_identical(paths, size)

    # two replicas wrong in different ways: that block has no quorum
    flip(paths[0], 7 * BS, bit=1)
    flip(paths[1], 7 * BS, bit=2)
    p = qb("scrub", "--json", info["id"])
    assert p.returncode == 12, p.stderr
    assert job_lines(p)[-1]["result"]["unrecoverable"] == 1


def _fio_verify(dev, size="32m", seed=5, offset="0"):
    return subprocess.Popen(
        ["fio", "--name=verify", f"--filename={dev}", "--direct=1",
         "--ioengine=io_uring", "--rw=randwrite", "--bs=4k", f"--size={size}",
         f"--offset={offset}",
         "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
         f"--randseed={seed}", "--allow_file_create=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/tmp")


def _fio_done(fio, while_running):
    """Run while_running() while fio goes on, then fio's verified output
    (fio is killed if anything fails)."""
    try:
        result = while_running()
        out, _ = fio.communicate(timeout=500)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0 and "err= 0" in out, out
    return result


def _wait_writes(dev_id, minimum=300, timeout=120):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if status(dev_id)["counters"]["writes"] >= minimum:
            return
        time.sleep(0.3)
    raise AssertionError("fio's writes did not get going")


def test_replace_under_fio_keeps_every_byte(images, scratch, cli):
    size = 32 * MIB
    paths = images(3, size)
    info = cli("-t", "2", *paths)
    new = make_sparse(os.path.join(scratch, "new.img"), size)

    def replace():
        _wait_writes(info["id"])
        p = qb("replace", "--rate", "8M", "--json", info["id"], paths[1], new,
               timeout=300)
        assert p.returncode == 0, p.stderr
        return job_lines(p)[-1]["result"]

    res = _fio_done(_fio_verify(info["path"]), replace)
    assert res["removed"] == paths[1] and res["replica"] == new
    s = status(info["id"])
    assert [(r["path"], r["state"]) for r in s["replicas"]] == [
        (paths[0], "in-service"), (paths[1], "removed"),
        (paths[2], "in-service"), (new, "in-service")]
    assert qb("del", info["id"]).returncode == 0
    data_identical([paths[0], paths[2], new], size)
    # the old replica is out of the set for good; the new set assembles
    p = qb("add", "-t", "2", paths[0], paths[1], paths[2])
    assert p.returncode == 10 and "was removed" in p.stderr, p.stderr
    again = cli("-t", "2", paths[0], paths[2], new)
    assert status(again["id"])["resync"]["reason"] == "none"


def test_readd_after_a_transient_failure_copies_only_what_was_missed(dm_replica, cli):
    # block devices all three (a device gives its tail to the metadata, an
    # image file grows by it: their data sizes would differ)
    devs = [dm_replica(128 * MIB) for _ in range(3)]
    dm = devs[2]
    paths = [d.path for d in devs]
    info = cli("-t", "2", "--timeout", "10", *paths)
    size = status(info["id"])["size"]
    fill(info["path"], 8)
    dm.fail_writes()
    missed = [(40 * MIB, 64 * 1024), (41 * MIB, 4096), (90 * MIB + 8192, 128 * 1024)]
    for off, n in missed:
        run(["dd", "if=/dev/urandom", f"of={info['path']}", f"bs={n}", "count=1",
             f"seek={off}", "oflag=direct,seek_bytes", "status=none"])
    s = status(info["id"])
    assert [r["state"] for r in s["replicas"]] == ["in-service", "in-service", "failed"]
    dm.heal()
    # the readd starts (the replica is attached: it gets every write from
    # now on), then fio writes and verifies while it resyncs
    p = qb("readd", "--background", "--rate", "2M", "--json", info["id"], dm.path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["state"] == "running"

    def readd_ends():
        end = time.monotonic() + 300
        while status(info["id"])["job"]["state"] == "running":
            assert time.monotonic() < end, "the readd did not end"
            time.sleep(0.5)

    _fio_done(_fio_verify(info["path"], size="24m", offset="96m", seed=9), readd_ends)
    job = status(info["id"])["job"]
    assert job["state"] == "done", job
    res = job["result"]
    missed_bytes = sum(n for _, n in missed)
    print(f"readd: missed {missed_bytes} bytes; checked {res['checked_bytes']} "
          f"of {size}, copied {res['copied_bytes']}")
    # the first write that failed may have landed on part of its block range
    assert missed_bytes - 64 * 1024 <= res["copied_bytes"] <= missed_bytes
    # dirty regions only: the three written while it was out, and the
    # first two if the fill's bits had not gone clean yet
    assert res["checked_bytes"] <= 5 * 4 * MIB < size // 4
    s = status(info["id"])
    assert [r["state"] for r in s["replicas"]] == ["in-service"] * 3
    assert qb("del", info["id"]).returncode == 0
    data_identical(paths, size)


def test_a_stale_replica_is_resynced_before_it_votes(images, cli):
    size = 32 * MIB
    paths = images(3, size)
    first = cli("-t", "2", *paths)
    assert qb("del", first["id"]).returncode == 0
    p = qb("add", "--json", "-t", "2", paths[0], paths[1])   # c is missing
    assert p.returncode == 0 and "not given" in p.stderr, p.stderr
    two = json.loads(p.stdout)
    fill(two["path"], 4)
    assert qb("del", two["id"]).returncode == 0
    # c alone cannot outvote the one current replica
    p = qb("add", "-t", "2", paths[0], paths[2])
    assert p.returncode == 10 and "only 1 of the replicas are current" in p.stderr
    info = cli("-t", "2", *paths)
    end = time.monotonic() + 240            # the resync is a job after LIVE
    while status(info["id"])["job"]["state"] == "running":
        assert time.monotonic() < end, "the resync did not end"
        time.sleep(0.5)
    assert status(info["id"])["job"]["kind"] == "resync"
    r = status(info["id"])["resync"]
    assert r["reason"] == "stale-replica" and r["stale"] == [paths[2]], r
    assert r["done"], r
    assert r["copied_blocks"] == 4 * MIB // BS
    data_identical(paths, size)


def test_refusals_say_why(images, scratch, cli):
    size = 32 * MIB
    paths = images(3, size)
    info = cli("-t", "2", *paths)
    others = images(2, size, prefix="o")
    other = cli("-t", "1", *others)
    assert qb("del", other["id"]).returncode == 0

    def refused(code, text, *args):
        p = qb(*args)
        assert p.returncode == code and text in p.stderr, (args, p.returncode, p.stderr)
        assert p.stderr.startswith("quorumblk: ") and p.stderr.count("\n") == 1

    refused(10, "not a member of this device", "readd", info["id"], others[0])
    refused(10, "belongs to replica set", "add-replica", info["id"], others[1])
    small = make_sparse(os.path.join(scratch, "small.img"), size // 2)
    refused(10, "too small", "replace", info["id"], paths[0], small)
    refused(10, "already in service", "readd", info["id"], paths[1])
    refused(10, "not a replica of this device", "remove-replica", info["id"], "7")
    refused(7, "no quorumblk device", "scrub", "99")
    p = qb("remove-replica", info["id"], paths[2])
    assert p.returncode == 0, p.stderr
    refused(10, "below the threshold 2", "remove-replica", info["id"], paths[1])
    p = qb("scrub", "--background", "--rate", "1M", info["id"])
    assert p.returncode == 0, p.stderr
    refused(11, "a scrub runs", "scrub", info["id"])
    p = qb("scrub", "--rate", "fast", info["id"])
    assert p.returncode == 2 and "'fast' is not a rate" in p.stderr, p.stderr
