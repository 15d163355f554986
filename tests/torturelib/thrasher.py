"""The thrasher: turns a step's Action into flips of replica files, control
commands to the worker, single probe operations and kills.

Each action is a script (a generator): it yields what it waits for
(ForControl, ForOp, Sleep) and gets the worker's message back, or yields
Kill to have the campaign crash the worker there. Before it damages
anything it asks Damage whether the vote can take it (at most
N - threshold damaged replicas per block); when not, it brings the
replicas that are down back first, and skips only if that is not enough.
"""
from .audit import describe
from .model import BLOCK, SECTOR, SECTORS_PER_BLOCK
from .replicas import HEADER


class ForControl:
    def __init__(self, cid):
        self.cid = cid


class ForOp:
    def __init__(self, op_id):
        self.op_id = op_id


class Sleep:
    def __init__(self, seconds):
        self.seconds = seconds
        self.until = None


class Kill:
    def __init__(self, reason):
        self.reason = reason


def pick(options, raw):
    options = list(options)
    return options[raw % len(options)] if options else None


class Thrasher:
    def __init__(self, campaign):
        self.c = campaign
        self.faulted = {}           # path -> the fault armed on it
        self.torn = None            # (offset, length) of the write torn_crash held

    def script(self, action):
        return getattr(self, "do_" + action.kind.replace("-", "_"))(action.params)

    # -- who may take damage --
    @property
    def d(self):
        return self.c.damage

    def healthy(self):
        return [m for m in self.c.members
                if m not in self.d.down and self.c.view.get(m) == "in-service"]

    def victim(self, raw):
        return pick([m for m in self.healthy() if self.d.allows_down(m)], raw)

    def victim_or_heal(self, raw):
        path = self.victim(raw)
        if path is None and self.d.down:
            yield from self.heal_all()
            path = self.victim(raw)
        return path

    def arm(self, path, kind):
        self.d.down.add(path)
        self.faulted[path] = kind
        self.c.damage_changed()

    def came_back(self, path, msg):
        """After a heal or readd: path is down no more if it is in service."""
        if msg.get("ok") and self.c.view.get(path) == "in-service":
            self.faulted.pop(path, None)
            self.d.up(path, self.c.now())

    def heal_all(self):
        for path in sorted(self.d.down & set(self.c.members)):
            msg = yield self.c.control("heal", replica=path)
            self.came_back(path, msg)

    def block(self, raw, near_load=False):
        if near_load:
            offset, length = self.c.window
            return (offset + raw % length) // BLOCK
        return raw % (self.c.setup.size // BLOCK)

    def skip(self, kind, why):
        self.c.stats.skipped[f"{kind}: {why}"] += 1

    # -- actions --
    def do_quiet(self, p):
        yield from ()

    def do_flip_data(self, p):
        for k, (block_raw, byte_raw, bit) in enumerate(p["flips"]):
            block = self.block(block_raw, p["near_load"])
            path = pick([m for m in self.c.members if self.d.allows_flip(m, block)],
                        p["pick"] + k)
            if path is None:
                self.skip("flip-data", "no replica may take it")
                continue
            offset = block * BLOCK + byte_raw % BLOCK
            self.c.files.flip(path, offset, bit)
            self.d.flip_block(path, block, self.c.now())
            self.c.damage_changed()
            self.c.note(f"flip {path} offset {offset} bit {bit} (block {block})")
            self.c.stats.faults["flip-data"] += 1
        yield from ()

    def do_flip_meta(self, p):
        """A bit of one replica's metadata: a header copy (the newer one
        makes the replica look stale at the next assembly) or its bitmap (a
        cleared bit must still be on another member). Only one replica's
        metadata is damaged at a time, and it counts as at risk until the
        damage is gone (Campaign.checkpoint looks)."""
        d = self.d
        if d.meta_victim not in self.c.members:
            d.meta_victim = pick(self.c.members, p["pick"])
        victim = d.meta_victim
        if victim not in d.shaky and not d.allows_down(victim):
            self.skip("flip-meta", "its replica may not be at risk")
            return
        d.shaky.add(victim)
        if p["area"] == "header":
            offset = (self.c.files.header_offsets(victim)[p["where"] % 2] +
                      (p["where"] >> 1) % HEADER)
        else:
            offset = self.c.files.bitmap_offset + p["where"] % self.c.files.bitmap_used
        self.c.files.flip(victim, offset, p["bit"])
        self.c.note(f"flip {p['area']} of {victim} at {offset}")
        self.c.stats.faults["flip-" + p["area"]] += 1
        yield from ()

    def fault(self, kind, p):
        if p["range"] == "meta" and not self.c.late_faults:
            self.skip(kind, "this engine's fault hook does not reach metadata writes")
            return
        path = yield from self.victim_or_heal(p["pick"])
        if path is None:
            self.skip(kind, "no replica may go down")
            return
        size = self.c.setup.size
        if p["range"] == "window":
            length = 1 << 20
            offset, length = (p["where"] % max(1, size - length)) // 512 * 512, length
        elif p["range"] == "meta":
            offset, length = size, 1 << 40
        else:
            offset, length = 0, None
        self.arm(path, kind)
        msg = yield self.c.control("inject", replica=path, kind=kind, ops=list(p["ops"]),
                                   offset=offset, length=length, count=p["count"])
        if msg["ok"]:
            self.c.stats.faults[kind + ("-meta" if p["range"] == "meta" else "")] += 1

    def do_eio(self, p):
        yield from self.fault("eio", p)

    def do_hang(self, p):
        yield from self.fault("hang", p)

    def do_late(self, p):
        path = yield from self.victim_or_heal(p["pick"])
        if path is None:
            self.skip("late", "no replica may go down")
            return
        self.arm(path, "late")
        msg = yield self.c.control("late", replica=path, ops=list(p["ops"]),
                                   delay=p["delay"], clean_after=p["clean_after"])
        self.came_back(path, msg)
        if msg["ok"]:
            self.c.stats.faults["late"] += 1
            self.c.stats.late.append(msg["result"])
            if msg["result"].get("readd_while_owed") == "accepted":
                self.c.violation("owed-readd", f"{self.c.names([path])[0]} was readded "
                                 "while I/O it was given before it failed was still "
                                 "held (it could land after the resync)")

    def cycles(self, p):
        path = yield from self.victim_or_heal(p["pick"])
        if path is None:
            self.skip("fail-readd", "no replica may go down")
            return
        self.arm(path, "fail")
        msg = yield self.c.control("cycles", replica=path, count=p["cycles"])
        self.came_back(path, msg)
        if msg["ok"]:
            self.c.stats.faults["fail-readd"] += msg["result"]["done"]
            self.c.note_cycles(msg["result"])

    def do_fail_readd(self, p):
        yield from self.cycles(p)

    def do_burst(self, p):
        yield from self.cycles(p)

    def do_heal(self, p):
        before = len(self.d.down)
        yield from self.heal_all()
        if before:
            self.c.stats.faults["heal"] += 1

    def do_scrub(self, p):
        since = self.c.now()
        short = self.short_blocks()
        msg = yield self.c.control("scrub")
        self.c.stats.faults["scrub"] += 1
        if not msg["ok"]:
            if not self.d.degraded():
                self.c.violation("scrub-failed", msg.get("error"))
            return
        self.d.scrubbed(since, self.c.now())
        short |= self.short_blocks()
        lost = msg["result"]["unrecoverable"]
        if lost > len(short) and not self.d.degraded():
            self.c.violation("scrub-unrecoverable",
                             f"{lost} blocks without quorum, the damage allows {len(short)}")

    def short_blocks(self):
        return {b for b in self.d.flips if self.d.short(b)}

    def do_clean(self, p):
        msg = yield self.c.control("clean", idle=p["idle"])
        if msg["ok"]:
            self.c.stats.faults["clean"] += 1

    def join(self):
        new = self.c.files.new()
        self.d.join(new)
        self.c.joining.add(new)
        return new

    def joined(self, new, msg):
        """The command that was to attach new ended: it is a member or not."""
        self.c.joining.discard(new)
        self.c.apply_view(msg)

    def do_replace(self, p):
        if self.c.engine_slots_left() < 1:
            self.skip("replace", "the engine's 16 replica indexes are used")
            return
        down = sorted(self.d.down & set(self.c.members))
        old = pick(down, p["pick"]) if down and p["pick"] % 2 else pick(self.c.members, p["pick"])
        new = self.join()
        self.c.leaving.add(old)
        msg = yield self.c.control("replace", old=old, new=new)
        self.c.leaving.discard(old)
        self.joined(new, msg)
        self.count_change("replace", msg)

    def do_add_replica(self, p):
        if len(self.c.members) >= self.c.setup.replicas + 1:
            self.skip("add-replica", "enough members")
            return
        if self.c.engine_slots_left() < 1:
            self.skip("add-replica", "the engine's 16 replica indexes are used")
            return
        new = self.join()
        msg = yield self.c.control("add-replica", path=new)
        self.joined(new, msg)
        self.count_change("add-replica", msg)

    def do_remove_replica(self, p):
        if len(self.c.members) - 1 < self.c.setup.threshold + 1:
            self.skip("remove-replica", "too few members")
            return
        cands = [m for m in self.c.members if self.d.allows_leave(m)]
        down = [m for m in cands if m in self.d.down]
        path = pick(down or cands, p["pick"])
        if path is None:
            self.skip("remove-replica", "the damage does not allow it")
            return
        self.c.leaving.add(path)
        msg = yield self.c.control("remove-replica", replica=path)
        self.c.leaving.discard(path)
        self.count_change("remove-replica", msg)

    def count_change(self, kind, msg):
        if msg["ok"]:
            self.c.stats.faults[kind] += 1
        else:
            self.c.stats.refused[f"{kind}: {msg.get('type')}: {msg.get('error')}"[:160]] += 1

    def do_crash(self, p):
        if (p["pick"] >> 16) & 1 and not self.c.setup.device:
            yield from self.torn_crash(p)
            return
        yield Kill("crash")

    def do_crash_during(self, p):
        if (p["pick"] >> 16) & 1 and not self.c.setup.device:
            yield from self.torn_crash(p)
            return
        during = p["during"]
        if during == "readd":
            path = yield from self.victim_or_heal(p["pick"])
            if path is None:
                during = "scrub"
            else:
                self.arm(path, "fail")
                yield self.c.control("fail", replica=path)
                self.c.control("readd", replica=path)
        if during == "scrub":
            self.c.control("scrub")
        elif during == "replace":
            old = pick(self.c.members, p["pick"])
            self.c.leaving.add(old)
            self.c.control("replace", old=old, new=self.join())
        elif during == "add-replica":
            self.c.control("add-replica", path=self.join())
        yield Sleep(p["after"])
        yield Kill("crash during " + during)

    def torn_crash(self, p):
        """A power cut's torn writes, which kill -9 alone does not give (the
        kernel still completes what the engine submitted): writes hang on k
        of the in-service members (1 <= k < n; a fault the worker's kill
        ends), a write is sent, and the worker is killed well before the
        replica timeout would fail them. The copies then split between
        the old and the new version, two against two with four replicas:
        no class of threshold, the crash rule's plurality decides. Half of
        the host's crash and crash-during steps (by their pick: the
        schedule's draws stay as they were); the device mode lifts its dm
        faults before its crash, so it has none."""
        members = self.healthy()
        if len(members) < 2:
            yield Kill("crash")
            return
        k = 1 + (p["pick"] >> 8) % (len(members) - 1)
        held = [members[(p["pick"] + j) % len(members)] for j in range(k)]
        for path in held:
            self.arm(path, "hang")
            yield self.c.control("inject", replica=path, kind="hang", ops=["write"],
                                 offset=0, length=None, count=0)
        offset, length = self.c.window
        length = min(length, 16 * BLOCK)
        start = offset + (p["pick"] % max(1, self.c.window[1] - length)) // BLOCK * BLOCK
        self.c.probe("write", start, length)
        self.torn = (start, length)
        self.c.stats.faults["torn-write"] += 1
        self.c.note(f"torn write at {start}+{length}: held on {k} of {len(members)}")
        yield Sleep(self.c.setup.timeout * 0.3)
        yield Kill("crash during torn writes")

    def do_no_quorum(self, p):
        """Deliberately beyond the budget: one block flipped on so many
        replicas that fewer than threshold good copies are left. Its reads
        must fail with EIO (never return a copy); then a write heals it.
        Variant "readd": a replica misses a write to that block while it is
        out, and is readded while the block has no quorum: its resync
        cannot settle the block, so it must not come back in service with
        the old copy (it would vote for the old data from then on)."""
        block = self.block(p["block"])
        missed = None
        if p.get("readd"):
            missed = self.victim(p["pick"] >> 7)
            if missed is None:
                self.skip("no-quorum readd", "no replica may go down")
                return
            self.arm(missed, "fail")
            yield self.c.control("fail", replica=missed)
            yield self.c.probe("write", block * BLOCK, BLOCK)     # missed misses it
        healthy = self.healthy()
        k = len(healthy) - self.c.setup.threshold + 1
        if not 0 < k <= len(healthy):
            self.skip("no-quorum", "too few replicas in service")
            return
        start = p["pick"] % len(healthy)
        victims = (healthy[start:] + healthy[:start])[:k]
        for j, path in enumerate(victims):
            sector = block * SECTORS_PER_BLOCK + (p["where"] + j) % SECTORS_PER_BLOCK
            self.c.files.flip(path, sector * SECTOR + 16 + j, j % 8)
            self.d.flip_block(path, block, self.c.now())
        self.c.damage_changed()
        self.c.stats.faults["no-quorum"] += 1
        msg = yield self.c.probe("read", block * BLOCK, BLOCK)
        self.c.stats.notes["no-quorum read " + ("failed (EIO)" if not msg["ok"] else "answered")] += 1
        if missed is not None:
            msg = yield self.c.control("readd", replica=missed)
            self.c.stats.faults["no-quorum readd"] += 1
            self.check_resynced(missed, block, msg)
            self.came_back(missed, msg)
        yield self.c.probe("write", block * BLOCK, BLOCK)

    def check_resynced(self, path, block, msg):
        """A replica back in service holds what the model allows at block
        (or is known to be damaged there)."""
        if self.c.view.get(path) != "in-service" or self.d.has_flip(path, block):
            self.c.stats.notes["no-quorum readd: kept out" if not msg["ok"] else
                               "no-quorum readd: not in service"] += 1
            return
        bad = self.c.audit.stale_sectors(path, block)
        if bad:
            s, v = bad[0]
            self.c.violation("stale-replica", f"readd put {self.c.names([path])[0]} back in "
                             f"service while block {block} had no quorum: it holds "
                             f"{describe(v)} at sector {s}, allowed "
                             f"{sorted(self.c.versions.allowed(s))} (the resync could not "
                             "settle the block; the replica now votes for old data)")

    # -- the campaign's self-test: damage the model is not told of --
    def do_sabotage(self, p):
        what = p["what"]
        files, members = self.c.files, self.c.members
        block = self.block(p["pick"])
        offset = block * BLOCK
        self.c.stats.faults["sabotage-" + what] += 1
        if what == "hang":
            stall = self.c.setup.timeout + self.c.margin + 0.5
            yield self.c.probe("stall", 0, 0, version=int(stall * 1000))
            return
        if what == "wrong-read":            # the same bit in every copy
            for m in members:
                files.flip(m, offset + 100, 3)
        elif what == "lost-write":          # a written block rolled back
            yield self.c.probe("write", offset, BLOCK)
            for m in members:
                files.write(m, offset, bytes(BLOCK))
        elif what == "eio":                 # no quorum, and the model not told
            healthy = self.healthy()
            for j, m in enumerate(healthy[:len(healthy) - self.c.setup.threshold + 1]):
                files.flip(m, offset + 16 + j, j % 8)
        elif what == "stray":               # one copy changed: the audit's job
            files.flip(pick(self.healthy(), p["pick"]), offset + 200, 1)
            return
        yield self.c.probe("read", offset, BLOCK)
