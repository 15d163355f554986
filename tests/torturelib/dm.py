"""Replicas as block devices for the device mode: device-mapper over a loop
device over an image file, so that a replica can be made to fail the way
storage fails under a live /dev/ublkbN: its table swapped to dm-error (every
I/O fails), dm-flakey (writes fail) or dm-error pieces over a range (bad
sectors, or the metadata tail), or suspended with its I/O held (a hung
server; the held I/O completes late, at the resume).

The controller makes them (ReplicaFiles.new) and the device worker faults
them; both find a replica by its /dev/mapper path in the registry file
dm.json beside the images. The image file stays the replica's medium for
the audits and bit flips: the loop device reads and writes it through its
page cache, and the campaign's O_DIRECT access to the file flushes and
invalidates that cache, as it does against the engine's own direct I/O.
"""
import json
import os
import subprocess

REGISTRY = "dm.json"


def run(cmd, text=None):
    p = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout.strip()


class DmReplica:
    def __init__(self, name, file, loop, sectors):
        self.name = name
        self.file = file
        self.loop = loop
        self.sectors = sectors
        self.path = f"/dev/mapper/{name}"

    def to_dict(self):
        return {"name": self.name, "file": self.file, "loop": self.loop,
                "sectors": self.sectors}

    def linear(self, start=0, count=None):
        count = self.sectors - start if count is None else count
        return f"{start} {count} linear {self.loop} {start}"

    def swap(self, table):
        """Switch to table (I/O in flight completes first; a suspended
        device's held I/O is released into the new table)."""
        run(["dmsetup", "load", self.name], table + "\n")
        run(["dmsetup", "suspend", self.name])
        run(["dmsetup", "resume", self.name])

    def heal(self):
        self.swap(self.linear())

    def error(self):
        self.swap(f"0 {self.sectors} error")

    def fail_writes(self):
        self.swap(f"0 {self.sectors} flakey {self.loop} 0 0 3600 1 error_writes")

    def bad_range(self, offset, length):
        """[offset, offset + length) fails every I/O (bytes, clipped to the
        device and rounded out to sectors); the rest works."""
        first = offset // 512
        end = min(self.sectors, -(-(offset + length) // 512))
        lines = [self.linear(0, first)] if first else []
        lines.append(f"{first} {end - first} error")
        if end < self.sectors:
            lines.append(self.linear(end, self.sectors - end))
        self.swap("\n".join(lines))

    def suspend(self):
        """Hold every I/O, issued or new, until heal()."""
        run(["dmsetup", "suspend", "--noflush", self.name])

    def remove(self):
        for cmd in (["dmsetup", "resume", self.name],
                    ["dmsetup", "remove", "--retry", self.name],
                    ["losetup", "-d", self.loop]):
            try:
                run(cmd)
            except RuntimeError:
                pass


class DmSet:
    """Every dm replica of one campaign, by path; the registry file is
    rewritten at each make() for the worker processes to read."""

    def __init__(self, directory):
        self.dir = directory
        self.prefix = f"qbt{os.getpid()}x{abs(hash(directory)) % 10000}"
        self.by_path = {}

    @classmethod
    def load(cls, directory):
        s = cls(directory)
        try:
            with open(os.path.join(directory, REGISTRY)) as f:
                for d in json.load(f):
                    r = DmReplica(**d)
                    s.by_path[r.path] = r
        except FileNotFoundError:
            pass
        return s

    def make(self, file):
        """A dm-linear device over a loop device over file."""
        loop = run(["losetup", "-f", "--show", file])
        name = f"{self.prefix}-{os.path.basename(file).split('.')[0]}"
        r = DmReplica(name, file, loop, os.path.getsize(file) // 512)
        try:
            run(["dmsetup", "create", name, "--table", r.linear()])
        except RuntimeError:
            run(["losetup", "-d", loop])
            raise
        self.by_path[r.path] = r
        tmp = os.path.join(self.dir, REGISTRY + ".new")
        with open(tmp, "w") as f:
            json.dump([x.to_dict() for x in self.by_path.values()], f)
        os.replace(tmp, os.path.join(self.dir, REGISTRY))
        return r

    def get(self, path):
        if path not in self.by_path:
            self.by_path.update(DmSet.load(self.dir).by_path)
        return self.by_path[path]

    def heal_all(self):
        for r in self.by_path.values():
            r.heal()

    def remove_all(self):
        for r in self.by_path.values():
            r.remove()
