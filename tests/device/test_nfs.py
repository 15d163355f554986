"""Replicas on NFS (in the VM): three servers, each an nfsd in a network
namespace of its own (tests/device/nfslib.py), each holding one replica
image that the client, where quorumblk runs, reaches through a hard NFSv4.2
mount. Rot in a server's copy, a server cut off during writes and back, a
server restarted under load, a slow server, `del` and `recover` with a
server unreachable, what a soft mount does, and the warning `add` gives
for replicas on NFS opened buffered. Every
test checks that its fault really happened (packets dropped, nfsd's
threads gone, the delay seen by reads)."""
import json
import mmap
import os
import signal
import subprocess
import time

import pytest

import nfslib
from conftest import make_sparse, run
from test_cli import cli, qb, wait_dead  # noqa: F401 (cli is a fixture)
from test_faults import MARGIN, dd_write, direct_read, failed_events, readd, states
from test_lifecycle import fill, flip, status

pytestmark = pytest.mark.timeout(900)

MIB = 1 << 20
BS = 4096
SIZE = 64 * MIB
TIMEOUT = 3             # the replica timeout of these tests, seconds


@pytest.fixture
def nfs():
    """Three NFS servers, mounted hard; everything gone at teardown (after
    the devices: request it before cli)."""
    why = nfslib.missing()
    assert why is None, why         # scripts/setup installs all of it
    n = nfslib.Nfs()
    try:
        n.start()
        yield n
    finally:
        n.stop()


def replicas(nfs, size=SIZE):
    """One sparse image per server, made through the client's mount; their
    client paths."""
    return [make_sparse(nfs.replica(i)[0], size) for i in range(len(nfs.servers))]


def server_copies_identical(nfs, size):
    """The servers' own files (no client cache between) hold the same data."""
    files = [nfs.replica(i)[1] for i in range(len(nfs.servers))]
    for f in files[1:]:
        r = run(["cmp", "-n", str(size), files[0], f], check=False, timeout=300)
        assert r.returncode == 0, f"{f} differs from {files[0]}: {r.stdout}"


def counters(dev_id):
    return status(dev_id)["counters"]


def wait_until(cond, timeout, what, step=0.3):
    return nfslib.wait_for(cond, timeout, what, step)


def fio_verify(dev, size, offset, seed, rate_iops=300):
    """Random 4 KiB writes over [offset, offset + size), then a verify pass,
    in the background; JSON output. The rate cap makes the writes last
    size / 4 KiB / rate_iops seconds at least, however fast the machine."""
    return subprocess.Popen(
        ["fio", "--name=nfs", f"--filename={dev}", "--direct=1",
         "--ioengine=io_uring", "--rw=randwrite", "--bs=4k", f"--size={size}",
         f"--offset={offset}", "--iodepth=8", f"--rate_iops={rate_iops}",
         "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
         f"--randseed={seed}", "--allow_file_create=0", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/tmp")


def fio_result(fio, timeout=600):
    """fio's job, once it ended without an error (verify included)."""
    try:
        out, err = fio.communicate(timeout=timeout)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err + out[-4000:]
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0, job
    return job


def test_rot_in_a_servers_copy_is_outvoted_reported_and_repaired_there(nfs, cli):
    """Bits flipped in the second server's file, on the server's side:
    an O_DIRECT read through the client's mount sees them (no client cache
    hides them), a read of the device returns the written data, the
    bad-block event names the replica by its path on that mount, and the
    repair rewrites the server's file."""
    paths = replicas(nfs)
    info = cli("-t", "2", *paths)
    data, _ = dd_write(info["path"], 0, 16, seed=3)            # 1 MiB
    server_file = nfs.replica(1)[1]
    at = 5 * BS + 17
    flip(server_file, at)
    fd = os.open(paths[1], os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, BS)
        assert os.preadv(fd, [buf], 5 * BS) == BS
    finally:
        os.close(fd)
    assert buf[17] == data[at] ^ 1, "the client's O_DIRECT read does not see the rot"
    assert direct_read(info["path"], 0, len(data)) == data
    s = status(info["id"])
    bad = [(e["replica"], e["offset"], e["path"]) for e in s["events"]
           if e["type"] == "bad-block"]
    assert bad == [(1, 5 * BS, paths[1])], s["events"]

    def repaired():
        with open(server_file, "rb") as f:
            f.seek(at)
            return f.read(1)[0] == data[at]
    wait_until(repaired, 60, "the repair of the server's file")
    assert any(e["type"] == "repaired" for e in status(info["id"])["events"])
    assert states(info["id"]) == ["in-service"] * 3
    size = s["size"]
    assert qb("del", info["id"]).returncode == 0
    server_copies_identical(nfs, size)


def test_a_server_cut_off_during_writes_is_timed_out_and_rejoins_after_it_heals(
        nfs, cli):
    """The third server's traffic is dropped while fio writes and verifies:
    its replica is timed out within the replica timeout, no write waits
    longer than the timeout plus a margin (fio's largest completion
    latency), the event names it. The held writes stay owed; a block written
    while it was cut, then rewritten after it failed, shows which data wins.
    The network heals: the held writes complete late (`late`, `owed` back to
    0), `readd` copies what was missed, and the servers' three files are the
    same, holding the newest data."""
    paths = replicas(nfs)
    info = cli("-t", "2", "--timeout", str(TIMEOUT), *paths)
    dev, dev_id = info["path"], info["id"]
    fill(dev, 4)
    server = nfs.servers[2]
    fio = fio_verify(dev, "32m", "0", seed=41, rate_iops=200)    # 40 s of writes
    try:
        wait_until(lambda: counters(dev_id)["writes"] >= 100, 120,
                   "fio's writes getting going")
        server.cut()
        first, took_first = dd_write(dev, 40 * MIB, 4, seed=4)
        wait_until(lambda: states(dev_id)[2] == "failed", TIMEOUT + 60,
                   "the cut-off replica's failure")
        newer, took_newer = dd_write(dev, 40 * MIB, 4, seed=5)
        s = status(dev_id)
        owed = s["replicas"][2]["owed"]
        dropped = server.dropped()
        job = fio_result(fio)
    finally:
        server.heal()
    wrote = job["write"]["io_bytes"]
    clat_max = job["write"]["clat_ns"]["max"] / 1e9
    print(f"\ncut-off server: {dropped} packets dropped, {owed} I/Os held; "
          f"writes: {took_first:.1f} s (first after the cut), {took_newer:.1f} s "
          f"(after the failure), fio's largest write latency {clat_max:.1f} s "
          f"(timeout {TIMEOUT} s)")
    assert dropped > 0 and owed >= 1, (dropped, s["replicas"][2])
    assert took_first < TIMEOUT + MARGIN and took_newer < TIMEOUT + MARGIN
    assert clat_max < TIMEOUT + MARGIN
    ev = failed_events(dev_id)
    assert [(e["replica"], e["errno"], e["path"]) for e in ev] == \
        [(2, "ETIMEDOUT", paths[2])], ev
    # the event and status name the server too (the mount's source)
    assert ev[0]["server"] == f"{server.addr}:/", ev
    assert status(dev_id)["replicas"][2]["server"] == f"{server.addr}:/"
    # TCP backs off while the server is cut: its retransmissions, and so
    # the late answers, may take a minute or two to come
    t0 = time.monotonic()
    r = wait_until(lambda: (x := status(dev_id)["replicas"][2])["owed"] == 0 and x,
                   300, "the held writes' late completions")
    print(f"healed: owed 0 after {time.monotonic() - t0:.1f} s, {r['late']} late")
    assert r["late"] >= owed, r
    res = readd(dev_id, paths[2])
    print(f"readd copied {res['copied_bytes']} bytes (checked "
          f"{res['checked_bytes']}); fio wrote {wrote} bytes in all")
    # more than the block written twice: fio's writes were missed too
    assert len(newer) < res["copied_bytes"] <= wrote + len(first) + len(newer)
    assert states(dev_id) == ["in-service"] * 3
    assert direct_read(dev, 40 * MIB, len(newer)) == newer
    size = status(dev_id)["size"]
    assert qb("del", dev_id).returncode == 0
    server_copies_identical(nfs, size)
    with open(nfs.replica(2)[1], "rb") as f:
        f.seek(40 * MIB)
        assert f.read(len(newer)) == newer, "a late write landed over newer data"


def test_a_server_restarted_under_load(nfs, cli):
    """The second server's nfsd is stopped while fio writes and verifies,
    long enough for its replica to time out, and a write meanwhile ends
    within the timeout plus a margin; then nfsd starts again (a grace
    period follows): fio verifies every byte, the writes the replica held
    complete once the client has reclaimed its state, and a readd copies
    what it missed and makes the three files the same."""
    paths = replicas(nfs)
    info = cli("-t", "2", "--timeout", str(TIMEOUT), *paths)
    dev, dev_id = info["path"], info["id"]
    server = nfs.servers[1]
    fio = fio_verify(dev, "32m", "0", seed=43, rate_iops=200)
    try:
        wait_until(lambda: counters(dev_id)["writes"] >= 100, 120,
                   "fio's writes getting going")
        assert fio.poll() is None, "fio ended before the server stopped"
        t0 = time.monotonic()
        server.stop_nfsd()
        stopping = time.monotonic() - t0
        wait_until(lambda: states(dev_id)[1] == "failed", TIMEOUT + 60,
                   "the stopped server's replica failing")
        missed, took = dd_write(dev, 40 * MIB, 16, seed=12)
        down = time.monotonic() - t0
        server.start_nfsd()
        print(f"\nnfsd stopped in {stopping:.1f} s, down {down:.1f} s; a write "
              f"meanwhile took {took:.1f} s")
        fio_result(fio)
    finally:
        if server.threads() == 0:
            server.start_nfsd()
    assert took < TIMEOUT + MARGIN
    ev = failed_events(dev_id)
    assert [(e["replica"], e["errno"]) for e in ev] == [(1, "ETIMEDOUT")], ev
    t0 = time.monotonic()
    wait_until(lambda: status(dev_id)["replicas"][1]["owed"] == 0, 300,
               "the held writes completing after the restart")
    print(f"restarted: owed 0 after {time.monotonic() - t0:.1f} s, "
          f"{status(dev_id)['replicas'][1]['late']} late")
    res = readd(dev_id, paths[1])
    print(f"readd copied {res['copied_bytes']} bytes")
    assert res["copied_bytes"] >= len(missed)
    assert states(dev_id) == ["in-service"] * 3
    assert direct_read(dev, 40 * MIB, len(missed)) == missed
    size = status(dev_id)["size"]
    assert qb("del", dev_id).returncode == 0
    server_copies_identical(nfs, size)


def fio_read_clat(dev, seconds=8):
    """4 KiB random reads, one at a time, for seconds: fio's completion
    latency percentiles, in milliseconds."""
    p = run(["fio", "--name=read", f"--filename={dev}", "--direct=1",
             "--ioengine=io_uring", "--rw=randread", "--bs=4k", "--size=16m",
             "--iodepth=1", "--time_based", f"--runtime={seconds}",
             "--percentile_list=10:25:50:75:90:99", "--output-format=json"],
            timeout=300, cwd="/tmp")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["total_ios"] > 0, job
    pct = job["read"]["clat_ns"]["percentile"]
    return {k.split(".")[0]: v / 1e6 for k, v in pct.items()}


def test_a_slow_server_and_the_read_policies(nfs, cli):
    """tc netem holds every packet from the third server 40 ms. Policy
    `all` reads every replica, so each read waits for it; `threshold`
    reads the two replicas that answer first (one read in 32 rotates, to
    notice a replica that got fast again), so its reads do not wait for
    it; `fifo` reads the first replica alone.
    Latency percentiles per policy are printed; the asserts are generous."""
    delay = 40
    paths = replicas(nfs, 32 * MIB)
    nfs.servers[2].delay(delay)
    out = {}
    for policy in ("all", "threshold", "fifo"):
        info = cli("-t", "2", "--read-policy", policy, *paths)
        if policy == "all":
            fill(info["path"], 16)
        out[policy] = fio_read_clat(info["path"])
        assert qb("del", info["id"]).returncode == 0
    for policy, pct in out.items():
        print(f"\nread clat ms, {policy:9}: " +
              " ".join(f"p{k}={v:.1f}" for k, v in pct.items()), end="")
    print()
    # the premise: every read of policy all waited for the slow server
    assert out["all"]["10"] >= delay * 0.9, out
    # threshold leaves the slow server out, but for its probes
    assert out["threshold"]["75"] < delay / 2, out
    assert out["fifo"]["75"] < delay / 2, out


def test_del_with_a_server_unreachable_does_not_hang(nfs, cli):
    """The third server cut off, a write held by it: `del` ends within a
    bound (its held I/O is abandoned to the kernel), the server comes back
    afterwards and the set assembles again."""
    paths = replicas(nfs)
    info = cli("-t", "2", "--timeout", str(TIMEOUT), *paths)
    fill(info["path"], 2)
    server = nfs.servers[2]
    server.cut()
    try:
        dd_write(info["path"], 8 * MIB, 4, seed=6)
        assert states(info["id"])[2] == "failed"
        owed = status(info["id"])["replicas"][2]["owed"]
        t0 = time.monotonic()
        p = qb("del", info["id"], timeout=300)
        took = time.monotonic() - t0
        dropped = server.dropped()
    finally:
        server.heal()
    print(f"\ndel with a server cut off ({owed} I/Os held, {dropped} packets "
          f"dropped): {took:.1f} s")
    assert owed >= 1 and dropped > 0
    assert p.returncode == 0, p.stderr
    assert took < TIMEOUT + 6 * MARGIN
    again = cli("-t", "2", *paths)
    assert states(again["id"])[:2] == ["in-service"] * 2


def test_recover_with_a_server_unreachable_does_not_hang(nfs, cli):
    """The daemon killed (-9) while the third server is cut off: `recover`
    ends within a bound, refusing with the replica that does not answer
    named; once the server is back it recovers the device."""
    paths = replicas(nfs)
    info = cli("-t", "2", "--timeout", str(TIMEOUT), *paths)
    fill(info["path"], 2)
    server = nfs.servers[2]
    server.cut()
    try:
        dd_write(info["path"], 8 * MIB, 4, seed=7)
        os.kill(info["pid"], signal.SIGKILL)
        assert wait_dead(info["pid"])
        t0 = time.monotonic()
        p = qb("recover", info["id"], timeout=120)
        took = time.monotonic() - t0
        dropped = server.dropped()
    finally:
        server.heal()
    print(f"\nrecover with a server cut off: {took:.1f} s, exit {p.returncode}: "
          f"{p.stderr.strip()}")
    assert dropped > 0
    assert took < TIMEOUT + 6 * MARGIN
    assert p.returncode == 10, p.stderr
    assert paths[2] in p.stderr and "does not answer" in p.stderr, p.stderr
    p = qb("recover", "--json", info["id"], timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["id"] == info["id"]
    assert qb("del", info["id"]).returncode == 0


def test_add_warns_when_nfs_replicas_are_opened_buffered(nfs):
    """`add --buffered` over NFS: the client's page cache would answer the
    reads and hide a server's rot; add warns, naming each mount."""
    paths = replicas(nfs, 16 * MIB)
    p = qb("add", "--json", "--buffered", "-t", "2", *paths)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    gone = qb("del", info["id"])
    for i, path in enumerate(paths):
        want = (f"quorumblk: warning: {path} is on {nfs.servers[i].addr}:/ "
                f"(nfs4 on {nfs.mounts[i]}) and opened buffered")
        assert want in p.stderr, p.stderr
    assert gone.returncode == 0, gone.stderr
    p = qb("add", "--json", "-t", "2", *paths)      # O_DIRECT: no warning
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr
    assert qb("del", json.loads(p.stdout)["id"]).returncode == 0


@pytest.fixture
def soft_nfs():
    """The three servers, mounted soft: the client gives up on an RPC after
    its own retries (timeo 1 s, one retransmission)."""
    n = nfslib.Nfs()
    try:
        n.start(options="soft,timeo=10,retrans=1")
        yield n
    finally:
        n.stop()


def test_a_soft_mount_gives_up_with_eio_before_the_replica_timeout(soft_nfs):
    """What a soft mount does (the README's mount options): with the third
    server cut off and the replica timeout at 30 s, the client gives up on
    a write first: EIO, the replica leaves service owing nothing (add warns
    of nothing: O_DIRECT). A block rewritten after that, and the readd once
    the network has healed, leave the three servers' files the same with
    the newest data: the write the client gave up on did not land over it."""
    nfs = soft_nfs
    paths = replicas(nfs)
    p = qb("add", "--json", "-t", "2", "--timeout", "30", *paths)
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr
    info = json.loads(p.stdout)
    dev_id = info["id"]
    try:
        # the region is marked first: the write that meets the cut is the
        # data itself, not the bitmap's
        dd_write(info["path"], 8 * MIB, 4, seed=9)
        server = nfs.servers[2]
        server.cut()
        try:
            _, took = dd_write(info["path"], 8 * MIB, 4, seed=8)
            r = status(dev_id)["replicas"][2]
            ev = failed_events(dev_id)
            newer, _ = dd_write(info["path"], 8 * MIB, 4, seed=10)
            dropped = server.dropped()
        finally:
            server.heal()
        print(f"\nsoft mount, server cut off: the write took {took:.1f} s; "
              f"replica {r['state']}, owed {r['owed']}; events "
              f"{[(e['replica'], e['errno']) for e in ev]}")
        assert dropped > 0
        assert took < 30 and r["state"] == "failed" and r["owed"] == 0, r
        assert [(e["replica"], e["errno"]) for e in ev] == [(2, "EIO")], ev
        res = readd(dev_id, paths[2])
        assert res["copied_bytes"] > 0
        size = status(dev_id)["size"]
    finally:
        gone = qb("del", dev_id)
    assert gone.returncode == 0, gone.stderr
    server_copies_identical(nfs, size)
    with open(nfs.replica(2)[1], "rb") as f:
        f.seek(8 * MIB)
        assert f.read(len(newer)) == newer
