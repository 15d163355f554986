"""The seeded torture campaign (tests/torture.py --device, issue 8) over a
real /dev/ublkbN, in the VM: one deck of actions (every kind dealt once,
about 13 minutes under TCG: a daemon kill + recover
costs ~40 s, a burst of readds ~90 s) on a set made by `quorumblk add`, with load
from several threads as system calls on the block device, replica changes
and scrubs through the command, faults from device-mapper under the
replicas, and kill -9 of the daemon + `quorumblk recover`.

It must hold every invariant (no wrong read, no lost acknowledged write,
EIO only where no quorum could exist, no operation past the timeout plus
a margin, the daemon's fds and RSS flat over fail/readd cycles, replicas
byte-identical after the final scrub), and it must really have injected
every kind of fault the device mode deals and checked every kind of
operation: a campaign that injected nothing fails here."""
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from torturelib.campaign import Campaign            # noqa: E402
from torturelib.schedule import DECK, Schedule, Setup  # noqa: E402

SEED = 24                   # 3 replicas, threshold 2, 8 MiB, policy all
STEPS = len(DECK)           # one deck: every action kind once
MARGIN = 8.0                # seconds past the replica timeout (an emulated VM)
SKIP = ()                   # action kinds dealt as quiet steps: none

pytestmark = pytest.mark.timeout(1200)


def first_deck(setup):
    schedule = Schedule(setup)
    return [schedule.action_kind(i) for i in range(STEPS)]


def test_a_device_campaign_holds_every_invariant_and_injects_every_fault(scratch):
    setup = Setup.from_seed(SEED, device=True)
    deck = first_deck(setup)
    # the premise: remove-replica can only act on a set of 3 with threshold 2
    # once add-replica has made it 4, and every kind is dealt in these steps
    assert (setup.replicas, setup.threshold) == (3, 2), setup
    assert deck.index("add-replica") < deck.index("remove-replica"), deck
    assert sorted(deck) == sorted(DECK)
    c = Campaign(setup, Schedule(setup, skip=SKIP), scratch, steps=STEPS, margin=MARGIN,
                 log=lambda text: print(text, flush=True)).run()
    kept = os.path.join(HERE, "logs", f"torture-{SEED}")     # campaign.log, worker.log
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(scratch, kept, ignore=shutil.ignore_patterns("*.img", "*.sock"))
    if c.violations:
        pytest.fail(f"{len(c.violations)} violations (campaign.log and worker.log in "
                    f"{kept}; replay in the VM: tests/torture.py --device --seed {SEED} "
                    f"--skip {','.join(SKIP)} --steps {STEPS}):\n" + "\n".join(str(v) for v in c.violations[:10]))
    s = c.stats
    print(f"\n{s.steps} steps; ops {dict(s.ops)}; faults {dict(s.faults)}; "
          f"crashes {dict(s.crashes)}; skipped {dict(s.skipped)}; refused "
          f"{dict(s.refused)}; events {dict(s.events)}; live resyncs {dict(s.resync)}; "
          f"final {s.final}")
    assert s.steps == STEPS
    assert s.final["identical"] and s.final["in_service"] >= setup.threshold, s.final
    for kind in ("flip-data", "fail-readd", "scrub", "clean", "replace",
                 "add-replica", "remove-replica", "no-quorum", "late"):
        assert s.faults[kind] > 0, (kind, dict(s.faults), dict(s.skipped))
    for kind in ("eio", "hang"):        # on the data or on the metadata tail
        assert s.faults[kind] + s.faults[kind + "-meta"] > 0, (kind, dict(s.faults))
    assert s.faults["flip-bitmap"] + s.faults["flip-header"] > 0, dict(s.faults)
    assert s.crashes["crash"] > 0, dict(s.crashes)
    assert any(k.startswith("crash during") for k in s.crashes), dict(s.crashes)
    assert s.events["replica-failed"] > 0, dict(s.events)
    for kind in ("read", "write", "write-fua", "flush", "discard", "write-zeroes",
                 "verify-read"):
        assert s.ops[kind] > 0, (kind, dict(s.ops))
    assert s.sectors_read > 20000, s.sectors_read
    assert s.eio_expected > 0          # the no-quorum block's read failed


@pytest.mark.timeout(60 * 60 + 1800)
@pytest.mark.parametrize("minutes", (20, 60))
def test_torture_long(minutes):
    """A long device campaign, collected only when asked for by name (`-k
    "torture_long and 20"`; conftest.py deselects it otherwise):
    tests/torture.py --device for that many minutes, seeds from 1000 on,
    two decks each; the figures table goes to the output and to
    tests/device/logs/torture-long.txt."""
    p = subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "torture.py"),
                        "--device", "--seed", "1000", "--minutes", str(minutes),
                        "--seed-steps", str(2 * STEPS), "--skip", ",".join(SKIP),
                        "--no-bisect", "--json"], capture_output=True, text=True)
    with open(os.path.join(HERE, "logs", "torture-long.txt"), "w") as f:
        f.write(p.stdout + "\n--- stderr ---\n" + p.stderr)
    print(p.stdout.rsplit("\n", 2)[0])
    assert p.returncode == 0, p.stdout[-6000:]
