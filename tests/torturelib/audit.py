"""Audits of the replica image files, from outside the engine.

At rest (between steps) and after a crash (before the next assembly):
  - members that can vote (not joined and unfinished) hold the same bytes
    wherever every replica's bitmap is clean, except for known flips: that
    is what lets an assembly resync only the dirty regions;
  - at rest, an in-service copy that differs from the others holds, sector
    by sector, a version the model allows, except for known flips: data
    nobody wrote (a late write with another request's bytes, an older
    version put back) is a finding even while the vote still outvotes it.
After the final scrub: every in-service replica's data area is
byte-identical, and every sector holds a version the model allows.
"""
import collections
import os

from .model import BLOCK, SECTORS_PER_BLOCK
from .payload import GARBAGE, SECTOR, version_of


class Audit:
    def __init__(self, campaign):
        self.c = campaign
        self.reported = set()       # (category, block): each finding once

    def voters(self):
        """Members whose own header says they vote (not removed, not a
        joiner that never finished its full resync)."""
        out = []
        for p in self.c.members:
            flags = self.c.files.member_flags(p)
            if flags is not None and flags[0] != "removed" and not flags[1]:
                out.append(p)
        return out

    def files(self, after_crash=False):
        """Audit the image files. Members that can vote (not joined and
        unfinished) must hold the same bytes wherever every bitmap is clean,
        except for known flips; in-service copies that differ anywhere must
        hold versions the model allows, except for known flips. One
        violation per kind and audit, naming the blocks."""
        c = self.c
        members = self.voters()
        if not members:
            return
        data = {p: c.files.data(p) for p in members}
        dirty = c.files.dirty_regions(members)
        in_service = [] if after_crash else [p for p in members
                                             if c.view.get(p) == "in-service"]
        found = collections.defaultdict(list)     # category -> [(block, text)]
        for region in range(c.files.nregions):
            lo = region << c.setup.region_shift
            hi = min(lo + (1 << c.setup.region_shift), c.setup.size)
            if len({data[p][lo:hi] for p in members}) == 1:
                continue
            for block in c.files.region_blocks(region, BLOCK):
                for category, text in self.block(block, data, members, in_service,
                                                 region not in dirty):
                    found[category].append((block, text))
        when = "after the crash, before the next assembly" if after_crash else "at rest"
        for category, items in found.items():
            items = [(b, t) for b, t in items if (category, b) not in self.reported]
            if not items:
                continue
            blocks = sorted({b for b, _ in items})
            self.reported |= {(category, b) for b in blocks}
            c.violation(category, f"{len(blocks)} blocks ({block_ranges(blocks)}) "
                        f"{when}: e.g. {items[0][1]}")

    def block(self, block, data, members, in_service, clean):
        lo, hi = block * BLOCK, (block + 1) * BLOCK
        copies = {p: data[p][lo:hi] for p in members}
        if len(set(copies.values())) == 1:
            return
        if clean:
            common = collections.Counter(copies.values()).most_common(1)[0][0]
            odd = [p for p, c in copies.items() if c != common
                   and not self.c.damage.has_flip(p, block)]
            if odd:
                yield "divergence", (f"block {block} differs on {self.c.names(odd)} where "
                                     "every bitmap is clean (an assembly would not "
                                     "resync it)")
        versions = self.c.versions
        for p in in_service:
            if self.c.damage.has_flip(p, block):
                continue
            for i in range(SECTORS_PER_BLOCK):
                s = block * SECTORS_PER_BLOCK + i
                v = version_of(copies[p][i * SECTOR:(i + 1) * SECTOR], s)
                if v not in versions.allowed(s):
                    yield ("stray-data" if v == GARBAGE else "stale-replica",
                           f"{os.path.basename(p)} (in service) holds {describe(v)} at "
                           f"sector {s}, allowed {sorted(versions.allowed(s))}")
                    break

    def stale_sectors(self, path, block):
        """[(sector, version)] of path's copy of block the model does not allow."""
        data = self.c.files.read(path, block * BLOCK, BLOCK)
        out = []
        for i in range(SECTORS_PER_BLOCK):
            s = block * SECTORS_PER_BLOCK + i
            v = version_of(data[i * SECTOR:(i + 1) * SECTOR], s)
            if v not in self.c.versions.allowed(s):
                out.append((s, v))
        return out

    def final(self, in_service):
        c = self.c
        data = {p: c.files.data(p) for p in in_service}
        same = len(set(data.values())) == 1
        c.stats.final.update(in_service=len(in_service), identical=same)
        if not same:
            c.violation("final-divergence", "in-service replicas differ after the final "
                        "scrub: " + first_difference(data, c.setup.size))
            return
        ref = data[in_service[0]]
        for s in range(c.setup.size // SECTOR):
            v = version_of(ref[s * SECTOR:(s + 1) * SECTOR], s)
            if v not in c.versions.allowed(s):
                c.violation("wrong-read" if v == GARBAGE else "lost-write",
                            f"after the final scrub sector {s} holds {describe(v)}, "
                            f"allowed {sorted(c.versions.allowed(s))}")
                return


def describe(version):
    return "garbage" if version == GARBAGE else f"version {version}"


def block_ranges(blocks):
    """'3, 7-9, 12' for [3, 7, 8, 9, 12] (the first eight runs)."""
    runs = []
    for b in blocks:
        if runs and runs[-1][1] == b - 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:8])
    return text + (", ..." if len(runs) > 8 else "")


def first_difference(data, size):
    paths = list(data)
    ref = data[paths[0]]
    for p in paths[1:]:
        for b in range(size // BLOCK):
            if data[p][b * BLOCK:(b + 1) * BLOCK] != ref[b * BLOCK:(b + 1) * BLOCK]:
                return f"{os.path.basename(p)} vs {os.path.basename(paths[0])} at block {b}"
    return "?"
