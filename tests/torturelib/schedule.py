"""The schedule: everything a campaign does, derived from its seed.

Setup (the replica set's shape, sizes, timeout, threads, medium) comes from
the seed alone; step i (a Batch of load and one Action) from the seed and i
alone, so the first M steps of a seed are the same whatever follows them:
`--seed S --steps M` replays a prefix. What an action does is settled when
it fires (which replica is allowed to take damage depends on what happened
before), and the worker's threads interleave as they will, so a replay runs
the same steps, not necessarily the same interleavings.

Actions are dealt from a shuffled deck, one deck after another, so that
every kind comes up within every len(DECK) steps.
"""
import random
from dataclasses import dataclass, field

from .payload import SECTOR

KiB, MiB = 1 << 10, 1 << 20

SHAPES = ((3, 2), (3, 2), (3, 2), (4, 3), (5, 3))    # (replicas, threshold)
SIZES = (8 * MiB, 16 * MiB, 16 * MiB, 32 * MiB)
REGION_SHIFTS = (16, 18, 22)       # 64 KiB, 256 KiB, 4 MiB bitmap regions
MEDIA = ("tmpfs", "tmpfs", "disk")

DECK = ("flip-data", "flip-data", "flip-data", "flip-meta", "eio", "eio",
        "hang", "late", "late", "fail-readd", "fail-readd", "burst", "heal",
        "heal", "scrub", "clean", "clean", "replace", "add-replica",
        "remove-replica", "crash", "crash", "crash-during", "no-quorum",
        "quiet")

# op kind weights of a batch
PROFILES = {
    "mixed": {"read": 40, "write": 30, "write-fua": 5, "flush": 5,
              "discard": 5, "write-zeroes": 5},
    "reads": {"read": 80, "write": 15, "flush": 5},
    "writes": {"read": 15, "write": 50, "write-fua": 15, "flush": 10,
               "discard": 5, "write-zeroes": 5},
    "zeroes": {"read": 30, "write": 20, "discard": 25, "write-zeroes": 25},
}
HOT_WINDOWS = (16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB)
FAULT_OPS = (("read",), ("write",), ("read", "write"), ("flush",),
             ("discard", "write_zeroes"),
             ("read", "write", "flush", "discard", "write_zeroes"))
LATE_OPS = (("write",), ("write",), ("read",), ("write", "flush"),
            ("discard", "write_zeroes"))
SABOTAGE = ("wrong-read", "lost-write", "eio", "hang", "stray")
DEVICE_TIMEOUT = 2.0        # seconds: the replica timeout in the device mode
DEVICE_REGION_SHIFT = 22    # what `quorumblk add` picks below 1 TiB (meta.py)


@dataclass(frozen=True)
class Setup:
    seed: int
    replicas: int
    threshold: int
    size: int               # bytes of data (the device)
    region_shift: int
    timeout: float          # the replica timeout
    max_io: int
    threads: int            # load threads in the worker
    read_policy: str
    medium: str             # "tmpfs" or "disk"
    device: bool = False    # ops on /dev/ublkbN, replicas on dm devices (dm.py)

    @classmethod
    def from_seed(cls, seed, medium=None, device=False):
        """device: what `quorumblk add` gives (4 MiB bitmap regions), the
        image files in /dev/shm behind dm and loop devices, and a timeout
        an emulated VM keeps without spurious failures."""
        rng = random.Random(f"{seed}/setup")
        n, t = rng.choice(SHAPES)
        medium = medium or rng.choice(MEDIA)
        timeout = rng.choice((0.5, 1.0)) if medium == "tmpfs" else 1.0
        size, shift = rng.choice(SIZES), rng.choice(REGION_SHIFTS)
        if device:
            medium, timeout, shift = "tmpfs", DEVICE_TIMEOUT, DEVICE_REGION_SHIFT
        return cls(seed=seed, replicas=n, threshold=t, size=size, region_shift=shift, timeout=timeout,
                   max_io=rng.choice((256 * KiB, 1 * MiB)),
                   threads=rng.choice((2, 3, 4)),
                   read_policy=rng.choice(("all", "all", "all", "threshold")),
                   medium=medium, device=device)

    def describe(self):
        where = "/dev/ublkbN over dm devices over images in /dev/shm" if self.device \
            else self.medium
        return (f"{self.replicas} replicas, threshold {self.threshold}; "
                f"{self.size >> 20} MiB on {where}; bitmap regions of "
                f"{(1 << self.region_shift) >> 10} KiB; timeout {self.timeout} s; "
                f"max_io {self.max_io >> 10} KiB; policy {self.read_policy}; "
                f"{self.threads} load threads")


@dataclass
class OpSpec:
    kind: str
    offset: int = 0
    length: int = 0


@dataclass
class Batch:
    profile: str
    window: tuple           # (offset, length) the ops stay in
    ops: list


@dataclass
class Action:
    kind: str
    fire: float             # fires once this fraction of the batch ended
    params: dict = field(default_factory=dict)


@dataclass
class Step:
    index: int
    batch: Batch
    action: Action


class Schedule:
    def __init__(self, setup, sabotage=None, skip=()):
        """sabotage: (kind, step) replaces that step's action by a planted
        fault the model is not told of (the campaign's self-test). skip:
        action kinds dealt as "quiet" (to look past a known defect)."""
        self.setup = setup
        self.sabotage = sabotage
        self.skip = frozenset(skip)

    def steps(self, start=0):
        i = start
        while True:
            yield self.step(i)
            i += 1

    def step(self, i):
        rng = random.Random(f"{self.setup.seed}/step/{i}")
        batch = make_batch(rng, self.setup)
        kind = self.action_kind(i)
        action = make_action(rng, kind, self.setup)
        if kind in self.skip:
            action = Action("quiet", action.fire)
        if self.sabotage and self.sabotage[1] == i:
            action = Action("sabotage", 0.5, {"what": self.sabotage[0],
                                              "pick": rng.getrandbits(32)})
        return Step(i, batch, action)

    def action_kind(self, i):
        deck = list(DECK)
        random.Random(f"{self.setup.seed}/deck/{i // len(DECK)}").shuffle(deck)
        return deck[i % len(DECK)]


def make_batch(rng, setup):
    profile = rng.choice(sorted(PROFILES))
    if rng.random() < 0.35:
        length = min(rng.choice(HOT_WINDOWS), setup.size)
        offset = rng.randrange(0, setup.size - length + 1, 4096)
    else:
        offset, length = 0, setup.size
    weights = PROFILES[profile]
    kinds = sorted(weights)
    n = rng.randint(20, 160)
    ops = [make_op(rng, rng.choices(kinds, [weights[k] for k in kinds])[0],
                   offset, length, setup) for _ in range(n)]
    return Batch(profile, (offset, length), ops)


def make_op(rng, kind, win_offset, win_length, setup):
    if kind == "flush":
        return OpSpec("flush")
    limit = setup.max_io * (4 if kind in ("discard", "write-zeroes") else 1)
    limit = min(limit, win_length) // SECTOR
    r = rng.random()
    if r < 0.55:
        sectors = rng.randint(1, 32)
    elif r < 0.9:
        sectors = rng.randint(33, 512)
    else:
        sectors = rng.randint(513, max(513, limit))
    align = rng.choice((1, 1, 8, 8))            # in sectors: 512 B or 4 KiB
    sectors = min(max(align, sectors - sectors % align), limit - limit % align)
    slots = (win_length // SECTOR - sectors) // align
    offset = win_offset + rng.randint(0, slots) * align * SECTOR
    return OpSpec(kind, offset, sectors * SECTOR)


def make_action(rng, kind, setup):
    p = {"pick": rng.getrandbits(32)}
    if kind == "flip-data":
        p["flips"] = [(rng.getrandbits(32), rng.getrandbits(32), rng.randrange(8))
                      for _ in range(rng.randint(1, 4))]
        p["near_load"] = rng.random() < 0.6
    elif kind == "flip-meta":
        p["area"] = rng.choice(("bitmap", "bitmap", "header"))
        p["where"] = rng.getrandbits(32)
        p["bit"] = rng.randrange(8)
    elif kind in ("eio", "hang"):
        p["ops"] = rng.choice(FAULT_OPS)
        p["count"] = rng.choice((0, 0, 1, 3))
        p["range"] = rng.choice(("all", "all", "window", "meta"))
        p["where"] = rng.getrandbits(32)
    elif kind == "late":
        p["ops"] = rng.choice(LATE_OPS)
        p["delay"] = round(rng.uniform(2.0, 6.0) * setup.timeout, 3)
        p["clean_after"] = rng.random() < 0.5
    elif kind == "fail-readd":
        p["cycles"] = rng.randint(1, 3)
    elif kind == "burst":
        # a device cycle is a dm table swap and a `quorumblk readd`: slower
        p["cycles"] = rng.randint(8, 12) if setup.device else rng.randint(10, 40)
    elif kind == "clean":
        p["idle"] = rng.choice((0.0, 0.0, 0.05, 0.5))
    elif kind == "crash-during":
        p["during"] = rng.choice(("readd", "scrub", "replace", "add-replica"))
        p["after"] = round(rng.uniform(0.0, 0.3), 3)
    elif kind == "no-quorum":
        p["block"] = rng.getrandbits(32)
        p["where"] = rng.getrandbits(32)
        p["readd"] = rng.random() < 0.5
    return Action(kind, round(rng.uniform(0.0, 0.8), 3), p)
