"""The replica image files, as the controller sees them from outside the
engine: making them, flipping their bits, and reading back their data
area, write-intent bitmap and header copies (csrc/meta.c has the layout:
data at [0, size), the bitmap at roundup(size, 4096), two 4 KiB header
copies in the last 8 KiB, each ending in an xxh3-64 of the rest).

Every access is O_DIRECT, whole pages, as the engine's own: buffered
writes racing the engine's direct I/O on the same pages make the kernel
fail its page-cache invalidation and the direct write come back short,
which the engine rightly takes for an I/O error. A flip is therefore a
read-modify-write of one 4 KiB page: a write racing it may lose its part
of that page on this replica, so the whole page counts as damaged.

In the device mode a replica is a dm device over a loop device over an
image file (dm.py) of the data size plus the metadata tail: its path is
the dm device's, and every access here goes to the image file behind it
(a dm device may be suspended or failing on purpose)."""
import errno
import mmap
import os
import struct

import xxhash

from quorumblk import meta
from quorumblk.meta import lib

from .dm import DmSet

PAGE = 4096
HEADER = 4096
MAGIC = b"QBLKMETA"


class ReplicaFiles:
    def __init__(self, directory, setup):
        self.dir = directory
        self.size = setup.size
        self.shift = setup.region_shift
        self.nregions = (self.size + (1 << self.shift) - 1) >> self.shift
        self.bitmap_offset = -(-self.size // PAGE) * PAGE
        self.bitmap_used = (self.nregions + 7) // 8
        self.count = 0
        self.dm = DmSet(directory) if setup.device else None
        self.backing = {}           # replica path -> its image file

    def new(self):
        """A bare, zeroed image of the data size (it gets its metadata when
        the set is assembled or it joins); in the device mode a dm device
        over it, with room for the metadata."""
        path = os.path.join(self.dir, f"r{self.count}.img")
        self.count += 1
        with open(path, "wb") as f:
            f.truncate(self.size if self.dm is None else
                       self.size + lib.qb_meta_overhead(self.size, self.shift))
        if self.dm is not None:
            dev = self.dm.make(path).path
            self.backing[dev] = path
            return dev
        return path

    def file(self, path):
        return self.backing.get(path, path)

    def release(self):
        """Tear down the dm and loop devices (device mode)."""
        if self.dm is not None:
            self.dm.remove_all()

    # -- changing them behind the engine's back --
    def flip(self, path, offset, bit):
        """Flip one bit: read, change and write back its page."""
        page = offset - offset % PAGE
        fd = open_direct(self.file(path), os.O_RDWR)
        try:
            buf = mmap.mmap(-1, PAGE)
            os.preadv(fd, [buf], page)
            buf[offset - page] ^= 1 << bit
            os.pwritev(fd, [buf], page)
        finally:
            os.close(fd)

    def write(self, path, offset, data):
        """Whole pages at a page offset."""
        fd = open_direct(self.file(path), os.O_RDWR)
        try:
            buf = mmap.mmap(-1, len(data))
            buf[:] = data
            os.pwritev(fd, [buf], offset)
        finally:
            os.close(fd)

    # -- reading them --
    def _pread(self, path, offset, length):
        start = offset - offset % PAGE
        end = -(-(offset + length) // PAGE) * PAGE
        fd = open_direct(self.file(path), os.O_RDONLY)
        try:
            buf = mmap.mmap(-1, end - start)
            got = os.preadv(fd, [buf], start)
            return bytes(buf[offset - start:min(got, offset - start + length)])
        finally:
            os.close(fd)

    def data(self, path):
        return self._pread(path, 0, self.size)

    def read(self, path, offset, length):
        return self._pread(path, offset, length)

    def bitmap(self, path):
        return self._pread(path, self.bitmap_offset, self.bitmap_used)

    def dirty_regions(self, paths):
        """Regions whose bit is set on any of paths: the union is what an
        assembly after a crash resyncs."""
        union = bytearray(self.bitmap_used)
        for p in paths:
            for i, b in enumerate(self.bitmap(p)):
                union[i] |= b
        return {i for i in range(self.nregions) if union[i // 8] >> (i % 8) & 1}

    def region_blocks(self, region, block):
        first = (region << self.shift) // block
        last = min(((region + 1) << self.shift), self.size) // block
        return range(first, last)

    def header_offsets(self, path):
        end = os.path.getsize(self.file(path))
        return (end - 2 * HEADER, end - HEADER)

    def header_copies_valid(self, path):
        """(copy 0 valid, copy 1 valid): magic and checksum."""
        out = []
        for off in self.header_offsets(path):
            h = self._pread(path, off, HEADER)
            ok = (len(h) == HEADER and h[:8] == MAGIC and
                  struct.unpack_from("<Q", h, HEADER - 8)[0] ==
                  xxhash.xxh3_64_intdigest(h[:HEADER - 8]))
            out.append(ok)
        return tuple(out)

    def member_flags(self, path):
        """(state name, full-sync flag) from the replica's own header, or
        None when it has none that reads."""
        try:
            m, _ = meta.read(self.file(path))
        except meta.SetError:
            return None
        if m is None:
            return None
        own = m.members[m.slot]
        return meta.STATE_NAMES.get(own.state, "?"), bool(own.flags & meta.FULL_SYNC)


def open_direct(path, flags):
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return os.open(path, flags)         # a file system without O_DIRECT
