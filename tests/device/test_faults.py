"""Replicas that fail the way storage fails, under a live device, through the
quorumblk command (in the VM): a replica whose I/O is held (a suspended dm
device, as a hung server holds it) and answers after the replica timeout, a
replica slower than the timeout, bad sectors, and a replica that starts
failing every I/O under load. Each time the device goes on with the others
within the replica timeout plus a margin, the late answers are counted and
must all have come back before the replica rejoins, and after the readd (or
replace) the replicas' data areas are identical."""
import json
import mmap
import os
import subprocess
import threading
import time

import pytest

from conftest import drop_caches
from test_cli import cli, qb  # noqa: F401 (cli is a fixture)
from test_lifecycle import (_fio_done, _fio_verify, _wait_writes,
                            data_identical, fill, job_lines, status)

pytestmark = pytest.mark.timeout(600)

MIB = 1 << 20
BS = 4096
MARGIN = 10.0        # seconds on top of the replica timeout (an emulated VM)


def states(dev_id):
    return [r["state"] for r in status(dev_id)["replicas"]]


def dd_write(dev, offset, count, seed, bs=64 * 1024):
    """count blocks of a seeded pattern at offset, O_DIRECT, one at a time;
    returns the data and how long it took."""
    data = bytes((seed * 131 + i) % 251 for i in range(bs)) * count
    t0 = time.monotonic()
    p = subprocess.run(["dd", "of=" + dev, f"bs={bs}", f"count={count}",
                        f"seek={offset}", "iflag=fullblock",
                        "oflag=direct,seek_bytes", "status=none"],
                       input=data, capture_output=True, timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    return data, took


def direct_read(dev, offset, length):
    drop_caches()
    p = subprocess.run(["dd", "if=" + dev, f"bs={length}", "count=1",
                        f"skip={offset}", "iflag=direct,skip_bytes",
                        "status=none"], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def wait_settled(dev_id, replica, timeout=60):
    """Until the replica owes no I/O (its late answers came back)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = status(dev_id)["replicas"][replica]
        if r["owed"] == 0:
            return r
        time.sleep(0.3)
    raise AssertionError(f"replica {replica} still owes I/O after {timeout} s")


def readd(dev_id, path):
    p = qb("readd", "--json", dev_id, path, timeout=300)
    assert p.returncode == 0, p.stderr
    return job_lines(p)[-1]["result"]


def failed_events(dev_id):
    return [e for e in status(dev_id)["events"] if e["type"] == "replica-failed"]


def test_a_hung_replica_holds_no_write_past_the_timeout(dm_replica, cli):
    """The issue's measurement: the third replica is suspended with its I/O
    held; a write to a region never written (its bitmap bit must go to
    every replica first) and writes to a written one both finish within the
    timeout plus a margin, never when the replica comes back. Then it does
    come back: what it held lands late, is counted, and the readd after it
    makes the replicas identical."""
    timeout = 2
    devs = [dm_replica(64 * MIB) for _ in range(3)]
    hung = devs[2]
    paths = [d.path for d in devs]
    info = cli("-t", "2", "--timeout", str(timeout), *paths)
    dev, dev_id = info["path"], info["id"]
    size = status(dev_id)["size"]
    dd_write(dev, 0, 4, seed=1)                  # region 0 is marked
    hung.suspend()
    try:
        fresh, took_fresh = dd_write(dev, 32 * MIB, 16, seed=2)
        marked, took_marked = dd_write(dev, 1 * MIB, 16, seed=3)
        s = status(dev_id)
        held = s["replicas"][2]["owed"]
        print(f"\nhung replica: {took_fresh:.1f} s for the write that marks a "
              f"region, {took_marked:.1f} s for writes to a marked one; "
              f"{held} I/Os held")
        assert took_fresh < timeout + MARGIN
        assert took_marked < timeout + MARGIN
        assert [r["state"] for r in s["replicas"]] == \
            ["in-service", "in-service", "failed"]
        assert held >= 1
        ev = failed_events(dev_id)
        assert [(e["replica"], e["errno"]) for e in ev] == [(2, "ETIMEDOUT")], ev
        assert direct_read(dev, 32 * MIB, len(fresh)) == fresh
        assert direct_read(dev, 1 * MIB, len(marked)) == marked
    finally:
        hung.resume()
    r = wait_settled(dev_id, 2)
    assert r["late"] >= held
    res = readd(dev_id, hung.path)
    assert res["copied_bytes"] >= len(fresh)
    assert states(dev_id) == ["in-service"] * 3
    assert qb("del", dev_id).returncode == 0
    data_identical(paths, size)


def test_a_replica_slower_than_the_timeout_answers_late_and_rejoins(dm_replica, cli):
    """dm-delay holds every I/O of the third replica 3 s, the replica timeout
    is 1 s: it is timed out at its first write under fio, fio verifies
    every byte through the other two, its writes land 3 s late and are
    counted, and after a readd the three are identical."""
    devs = [dm_replica(64 * MIB) for _ in range(3)]
    slow = devs[2]
    paths = [d.path for d in devs]
    info = cli("-t", "2", "--timeout", "1", *paths)
    size = status(info["id"])["size"]
    fill(info["path"], 8)
    slow.delay(3000)

    def while_fio_runs():
        _wait_writes(info["id"], minimum=200)

    _fio_done(_fio_verify(info["path"], size="16m", offset="16m", seed=21),
              while_fio_runs)
    assert states(info["id"]) == ["in-service", "in-service", "failed"]
    ev = failed_events(info["id"])
    assert [(e["replica"], e["errno"]) for e in ev] == [(2, "ETIMEDOUT")], ev
    r = wait_settled(info["id"], 2)
    assert r["late"] >= 1 and r["timeouts"] >= 1, r
    slow.heal()
    res = readd(info["id"], slow.path)
    assert res["copied_bytes"] > 0
    assert qb("del", info["id"]).returncode == 0
    data_identical(paths, size)


def test_bad_sectors_fail_their_replica_and_every_read_is_right(dm_replica, cli):
    """Three blocks of the second replica fail every I/O. Reading
    them takes that replica out (a failed read casts no vote), every byte
    read is the written one, and replacing the replica brings the set back
    to three identical copies."""
    devs = [dm_replica(64 * MIB) for _ in range(3)]
    bad = devs[1]
    paths = [d.path for d in devs]
    info = cli("-t", "2", *paths)
    size = status(info["id"])["size"]
    data, _ = dd_write(info["path"], 0, 64, seed=7)      # 4 MiB
    blocks = [100, 101, 700]
    bad.bad_blocks(blocks)
    assert direct_read(info["path"], 0, len(data)) == data
    assert states(info["id"]) == ["in-service", "failed", "in-service"]
    errors = [e for e in status(info["id"])["events"]
              if e["type"] == "replica-error" and e["replica"] == 1]
    assert errors and errors[0]["errno"] == "EIO"
    e = errors[0]
    assert any(e["offset"] <= b * BS < e["offset"] + e["length"] for b in blocks), e
    new = dm_replica(64 * MIB)
    p = qb("replace", "--json", info["id"], bad.path, new.path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert states(info["id"]) == ["in-service", "removed", "in-service",
                                  "in-service"]
    assert direct_read(info["path"], 0, len(data)) == data
    assert qb("del", info["id"]).returncode == 0
    data_identical([paths[0], paths[2], new.path], size)


def test_a_replica_that_turns_to_errors_under_load_rejoins_after_it_heals(
        dm_replica, cli):
    """The third replica's table becomes dm-error while fio writes and
    verifies: it is failed with EIO, fio sees no error, and once its table
    is healed a readd copies what it missed."""
    devs = [dm_replica(64 * MIB) for _ in range(3)]
    flaky = devs[2]
    paths = [d.path for d in devs]
    info = cli("-t", "2", *paths)
    size = status(info["id"])["size"]

    def swap_under_load():
        _wait_writes(info["id"], minimum=300)
        flaky.error()
        # the premise, whenever fio's writes end: a write after the swap
        dd_write(info["path"], 40 * MIB, 1, seed=9)

    _fio_done(_fio_verify(info["path"], size="24m", seed=31), swap_under_load)
    assert states(info["id"]) == ["in-service", "in-service", "failed"]
    ev = failed_events(info["id"])
    assert [(e["replica"], e["errno"]) for e in ev] == [(2, "EIO")], ev
    flaky.heal()
    res = readd(info["id"], flaky.path)
    assert res["copied_bytes"] > 0
    assert states(info["id"]) == ["in-service"] * 3
    assert qb("del", info["id"]).returncode == 0
    data_identical(paths, size)


def _in_thread(fn):
    """Run fn in a thread; the thread (and the time it took) once it ends.
    An I/O stuck in the kernel cannot be killed: the caller waits a bounded
    time, then lets the replica go, which frees it."""
    out = {}

    def run():
        t0 = time.monotonic()
        try:
            fn()
        except OSError as e:
            out["error"] = e
        out["took"] = time.monotonic() - t0
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _stacks(*pids):
    """Where these processes' threads are in the kernel."""
    lines = []
    for pid in pids:
        for task in sorted(os.listdir(f"/proc/{pid}/task")):
            base = f"/proc/{pid}/task/{task}"
            try:
                with open(f"{base}/comm") as f:
                    comm = f.read().strip()
                with open(f"{base}/stack") as f:
                    stack = f.read().strip().replace("\n", " | ")
            except OSError as e:
                comm, stack = "?", str(e)
            lines.append(f"{pid}/{task} {comm}: {stack}")
    return "\n".join(lines)


def _diagnosis(dev_id, pid):
    """For a request that does not end: the device's state, and where the
    daemon's threads and this process's are."""
    st = status(dev_id)
    return json.dumps({k: st.get(k) for k in ("replicas", "events")},
                      default=str)[:6000] + "\n" + _stacks(pid, os.getpid())


@pytest.mark.parametrize("op", ["flush", "fua-write", "read", "status"])
def test_a_hung_replica_holds_no_request_of_any_kind_past_the_timeout(
        dm_replica, cli, op):
    """Found by the device campaign (seed 24): with a replica suspended, a
    flush and a FUA write stayed blocked until it came back. Each kind of
    request is the first to meet the hung replica here (writes have their
    own test above), and each ends within the timeout plus a margin; the
    daemon answers `status` meanwhile."""
    timeout = 2
    devs = [dm_replica(64 * MIB) for _ in range(3)]
    hung = devs[2]
    info = cli("-t", "2", "--timeout", str(timeout), "--read-policy", "all",
               *[d.path for d in devs])
    dev, dev_id = info["path"], info["id"]
    written, _ = dd_write(dev, 0, 4, seed=5)     # the region is marked
    buf = mmap.mmap(-1, BS)
    buf.write(written[:BS])
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    actions = {
        "flush": lambda: os.fsync(fd),
        "fua-write": lambda: os.pwritev(fd, [buf], 0, os.RWF_DSYNC),
        "read": lambda: os.preadv(fd, [buf], BS),
        "status": lambda: status(dev_id),
    }
    drop_caches()
    hung.suspend()
    try:
        t, out = _in_thread(actions[op])
        t.join(timeout + MARGIN)
        still = t.is_alive()
        if still:
            print(_diagnosis(dev_id, info["pid"]))
        answered = None if op == "status" else _in_thread(lambda: status(dev_id))
        if answered:
            answered[0].join(2 * MARGIN)    # a new command's start, in TCG
            if answered[0].is_alive():
                print(_stacks(info["pid"]))
    finally:
        hung.resume()
    t.join(120)
    os.close(fd)
    print(f"\n{op} with a hung replica: {out.get('took', 0):.1f} s")
    assert not still, f"{op} still blocked {timeout + MARGIN:.0f} s after it began " \
                      f"(it ended {out.get('took', 0):.1f} s in, when the replica came back)"
    assert "error" not in out, out["error"]
    if answered:
        assert not answered[0].is_alive(), "the daemon did not answer status meanwhile"
    if op != "status":
        assert [(e["replica"], e["errno"]) for e in failed_events(dev_id)] == \
            [(2, "ETIMEDOUT")]
    assert qb("del", dev_id).returncode == 0
