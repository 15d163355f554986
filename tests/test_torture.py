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

import pytest

from torturelib.campaign import Campaign
from torturelib.model import Damage, Op, Tracker, Versions
from torturelib.payload import GARBAGE, decode, payload
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
