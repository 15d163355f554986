"""The seeded torture campaign (tests/torture.py, issue 8) in CI.

A few seeds run on the host, about two minutes in all: each must hold every
invariant (no wrong read, no lost acknowledged write, EIO only where no
quorum could exist, no operation past the timeout plus a margin, fds and
RSS flat over fail/readd cycles, replicas byte-identical after the final
scrub), and together they must really have injected every kind of fault
and checked every kind of operation: a campaign that injected nothing would
pass without proving anything. The campaign's own checks are tested too:
damage planted behind the model's back is reported as the violation it
is, and bisection finds the shortest prefix that shows it."""
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from torturelib.campaign import Campaign
from torturelib.model import Damage, Op, Tracker, Versions
from torturelib.payload import GARBAGE, decode, payload
from torturelib.protocol import Channel
from torturelib.schedule import DECK, Schedule, Setup

TORTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torture.py")
SEEDS = (11, 12, 13)
STEPS = 30                  # a whole deck of actions, and some

pytestmark = pytest.mark.timeout(600)


def run(seed, steps, sabotage=None, medium=None):
    setup = Setup.from_seed(seed, medium)
    base = "/dev/shm" if setup.medium == "tmpfs" and os.path.isdir("/dev/shm") else None
    workdir = tempfile.mkdtemp(prefix=f"qbtorture-ci-{seed}-", dir=base)
    campaign = Campaign(setup, Schedule(setup, sabotage), workdir, steps=steps,
                        stop_on_violation=sabotage is not None).run()
    if not campaign.violations:
        shutil.rmtree(workdir, ignore_errors=True)
    return campaign


@pytest.fixture(scope="module")
def campaigns():
    """The CI seeds' campaigns, each run once for the tests below."""
    done = {}

    def get(seed):
        if seed not in done:
            done[seed] = run(seed, STEPS)
        return done[seed]
    return get


@pytest.mark.parametrize("seed", SEEDS)
def test_a_short_campaign_holds_every_invariant(seed, campaigns):
    c = campaigns(seed)
    first = {}
    for v in c.violations:
        first.setdefault(v.category, (v, sum(w.category == v.category for w in c.violations)))
    assert not c.violations, f"images and logs: {c.dir}\n" + "\n".join(
        f"{v} ({n} in all)\n    replay: python tests/torture.py --seed {seed} --steps "
        f"{STEPS if v.step == 'final' else v.step + 1}" for v, n in first.values())
    assert c.stats.steps == STEPS
    assert c.stats.final["identical"] and c.stats.final["in_service"] >= c.setup.threshold


def test_the_campaigns_really_injected_faults_and_checked_ops(campaigns):
    runs = [campaigns(seed) for seed in SEEDS]
    faults, ops, crashes = collections.Counter(), collections.Counter(), collections.Counter()
    for c in runs:
        faults.update(c.stats.faults)
        ops.update(c.stats.ops)
        crashes.update(c.stats.crashes)
    for kind in ("flip-data", "eio", "hang", "late", "fail-readd", "scrub", "clean",
                 "replace", "add-replica", "remove-replica", "no-quorum"):
        assert faults[kind] > 0, (kind, faults)
    assert faults["flip-bitmap"] + faults["flip-header"] > 0, faults
    assert crashes["crash"] > 0 and sum(v for k, v in crashes.items()
                                        if k.startswith("crash during")) > 0, crashes
    for kind in ("read", "write", "write-fua", "flush", "discard", "write-zeroes",
                 "verify-read"):
        assert ops[kind] > 0, (kind, ops)
    assert sum(c.stats.sectors_read for c in runs) > 100000
    assert sum(c.stats.eio_expected for c in runs) > 0   # no-quorum reads failed
    # workers served while their resync ran, and crashes tore writes
    live = collections.Counter()
    for c in runs:
        live.update(c.stats.resync)
    assert live["starts"] > live["paced"] > 0 and live["reads"] > 0, live
    assert faults["torn-write"] > 0 and live["torn blocks"] > 0, (faults, live)


@pytest.mark.parametrize("sabotage,category", [
    ("wrong-read", "wrong-read"),       # a bit flipped alike in every replica
    ("lost-write", "lost-write"),       # an acknowledged block rolled back
    ("eio", "unexpected-eio"),          # no quorum the model was not told of
    ("hang", "hang"),                   # an op that takes too long
    ("stray", "stray-data"),            # one copy changed: only the audit sees it
])
def test_damage_behind_the_models_back_is_reported(sabotage, category):
    c = run(21, 2, sabotage=(sabotage, 1), medium="tmpfs")
    assert [(v.category, v.step) for v in c.violations][:1] == [(category, 1)], \
        [str(v) for v in c.violations]
    shutil.rmtree(c.dir, ignore_errors=True)


def test_the_program_prints_the_shortest_prefix_that_reproduces():
    p = subprocess.run([sys.executable, TORTURE, "--seed", "21", "--steps", "4",
                        "--sabotage", "wrong-read@1", "--medium", "tmpfs", "--json"],
                       capture_output=True, text=True, timeout=500)
    assert p.returncode == 1, p.stderr[-3000:]
    assert ("python tests/torture.py --seed 21 --medium tmpfs --sabotage wrong-read@1 "
            "--steps 2\n") in p.stdout
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert [f["category"] for f in summary["findings"]] == ["wrong-read"]
    assert summary["total"]["faults"]["sabotage-wrong-read"] >= 1


def test_help_names_the_options_and_says_what_a_replay_repeats():
    p = subprocess.run([sys.executable, TORTURE, "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0
    for word in ("--seed", "--minutes", "--steps", "--json", "interleave"):
        assert word in p.stdout


# -- the campaign's parts --

def test_sectors_say_which_write_put_them_there():
    data = payload(7, 4096, 3 * 512) + bytes(512)
    assert decode(data, 4096) == [[3, 7], [1, 0]]
    flipped = bytearray(data)
    flipped[512 + 300] ^= 4
    assert decode(bytes(flipped), 4096) == [[1, 7], [1, GARBAGE], [1, 7], [1, 0]]
    assert decode(data, 8192) == [[3, GARBAGE], [1, 0]]     # not where it belongs


def test_a_read_may_return_what_a_racing_write_writes_and_nothing_else():
    versions = Versions(64)
    tracker = Tracker(versions)
    write = Op(1, "write", 0, 4096, version=5)
    read = Op(2, "read", 0, 4096)
    tracker.start(read)
    tracker.start(write)
    tracker.end(1)
    versions.acknowledge(0, 8, 5)
    tracker.end(2)
    assert tracker.mismatches(read, [[4, 0], [4, 5]]) == []
    assert tracker.mismatches(read, [[8, 6]])[:1] == [(0, 6)]
    later = Op(3, "read", 0, 4096)
    tracker.start(later)
    assert tracker.mismatches(later, [[8, 0]])[:1] == [(0, 0)]      # lost
    versions.unknown(0, 8, 9)                                        # a failed write
    maybe = Op(4, "read", 0, 4096)
    tracker.start(maybe)
    assert tracker.mismatches(maybe, [[4, 9], [4, 5]]) == []


def test_damage_never_goes_beyond_n_minus_threshold_per_block():
    d = Damage(["a", "b", "c"], 2)
    d.flip_block("a", 5, when=1.0)
    assert not d.allows_flip("b", 5) and d.allows_flip("a", 5) and d.allows_flip("b", 6)
    assert not d.allows_down("b") and d.allows_down("a")
    assert not d.no_quorum_possible(range(5, 6), since=0.0)
    d.flip_block("b", 5, when=2.0)                      # deliberately beyond
    d.written(5 * 8, 4, since=2.5, now=2.6)             # half the block: still damaged
    assert d.flipped(5) == {"a", "b"}
    assert d.no_quorum_possible(range(4, 7), since=0.0)
    d.written(5 * 8, 8, since=1.5, now=3.0)             # started before b's flip
    assert d.flipped(5) == {"b"}
    assert d.no_quorum_possible(range(5, 6), since=2.5)     # a's flip was there then
    d.written(5 * 8, 8, since=2.5, now=4.0)
    assert d.flipped(5) == set() and not d.no_quorum_possible(range(5, 6), since=4.5)


def test_a_schedule_is_a_function_of_its_seed_and_deals_every_action():
    setup = Setup.from_seed(5)
    a, b = Schedule(setup), Schedule(Setup.from_seed(5))
    assert [a.step(i) for i in range(40)] == [b.step(i) for i in range(40)]
    assert Schedule(setup).step(33) == a.step(33)       # a prefix needs no suffix
    assert sorted(a.action_kind(i) for i in range(len(DECK))) == sorted(DECK)
    assert Setup.from_seed(6) != setup


# -- the resync runs while the worker serves (issue 9 item 4) --

def test_reads_after_a_crash_must_agree_with_the_first_one_even_when_they_overlap():
    versions = Versions(64)
    tracker = Tracker(versions)
    versions.acknowledge(0, 8, 5)
    versions.unknown(0, 8, 6)               # in flight at the crash
    versions.crashed()
    first, second = Op(1, "read", 0, 4096), Op(2, "read", 0, 4096)
    tracker.start(first)
    tracker.start(second)                   # both before the first answers
    tracker.end(1)
    tracker.end(2)
    assert tracker.mismatches(first, [[8, 6]]) == []
    for s in range(8):                      # the campaign settles on what it read
        versions.settle(s, 6)
    assert versions.unsettled == set()
    # allowed when the second read started, but the crash rule's answer changed
    assert tracker.mismatches(second, [[8, 5]])[:1] == [(0, 5)]
    assert tracker.mismatches(second, [[8, 6]]) == []
    later = Op(3, "read", 0, 4096)
    tracker.start(later)
    assert tracker.mismatches(later, [[8, 5]])[:1] == [(0, 5)]
    # a write since the read started: the model cannot say what it saw
    racing = Op(4, "read", 0, 4096)
    tracker.start(racing)
    versions.acknowledge(0, 8, 7)
    assert tracker.mismatches(racing, [[8, 6]]) == []


def test_any_read_settles_what_the_read_back_after_a_crash_could_not(tmp_path):
    setup = Setup.from_seed(21, "tmpfs")
    c = Campaign(setup, Schedule(setup), str(tmp_path))
    c.versions.acknowledge(0, 16, 5)
    c.versions.unknown(0, 16, 6)
    c.versions.crashed()                    # (its read-back failed: EIO)
    op = c.new_op("read", 0, 4096)
    c.ops[op.id] = op
    c.op_started(op, c.now())
    c.op_ended({"id": op.id, "ok": 1, "dur": 0.01})
    c.read_data({"id": op.id, "runs": [[4, 6], [4, 5]]})
    assert not c.violations
    assert [c.versions.allowed(s) for s in (0, 4, 8)] == [{6}, {5}, {5, 6}]
    assert c.versions.unsettled == set(range(8, 16))


def worker_config(tmp_path, paths, pace):
    return {"paths": paths, "threshold": 2, "timeout": 1.0, "region_shift": 16,
            "read_policy": "all", "max_io": 256 << 10, "threads": 2, "readd_limit": 0,
            "device": False, "workdir": str(tmp_path), "size": 4 << 20, "dev_id": None,
            "resync": pace}


def until(channel, kinds, seconds=60):
    """The worker's messages up to the first of kinds (that one last)."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        msg = channel.get(0.2)
        if msg is not None:
            out.append(msg)
            if msg["ev"] in kinds:
                return out
    raise AssertionError(f"no {kinds} in {seconds} s: {out[-5:]}")


def test_the_worker_serves_while_its_resync_runs_and_jobs_wait_for_it(tmp_path):
    """After a kill -9 the next worker is ready before its resync ends:
    reads are answered meanwhile, and a scrub (refused while a job runs)
    waits for the resync instead of failing."""
    paths = []
    for k in range(3):
        paths.append(str(tmp_path / f"r{k}.img"))
        with open(paths[-1], "wb") as f:
            f.truncate(4 << 20)
    log = str(tmp_path / "worker.log")
    first = Channel(worker_config(tmp_path, paths, {}), log)
    until(first, ("ready",))
    first.send({"cmd": "ops", "ops": [[k, "write", k * (64 << 10), 4096, k + 1]
                                      for k in range(1, 64)]})
    msgs = []
    while sum(m["ev"] == "e" for m in msgs) < 63:
        msgs += until(first, ("e",))
    assert all(m["ok"] for m in msgs if m["ev"] == "e"), msgs[-3:]
    first.kill()                            # every region written stays dirty
    first.close()
    second = Channel(worker_config(tmp_path, paths, {"step": 64 << 10, "seconds": 3.0}),
                     log)
    try:
        ready = until(second, ("ready",))[-1]
        assert ready["resync"]["reason"] == "unclean-stop" and not ready["resync"]["done"]
        second.send({"cmd": "scrub", "cid": 1})
        second.send({"cmd": "ops", "ops": [[100 + k, "read", k * (64 << 10), 4096, 0]
                                           for k in range(64)]})
        msgs = until(second, ("c",), 120)
        order = [m["ev"] for m in msgs]
        assert msgs[-1]["ok"], msgs[-1]     # the scrub waited: no JobRunningError
        assert "resynced" in order, order
        resynced = msgs[order.index("resynced")]
        assert resynced["state"] == "done", resynced
        reads = [m for m in msgs[:order.index("resynced")] if m["ev"] == "r"]
        assert reads, "no read was answered while the resync ran"
        for m in reads:                     # what was acknowledged before the kill
            k = m["id"] - 100
            assert m["runs"] == [[8, k + 1 if k else 0]], m
    finally:
        second.kill()
        second.close()
