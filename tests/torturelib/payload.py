"""Self-describing sector contents.

Every 512-byte sector the campaign writes says which write put it there and
where it belongs, so a read maps to one version per sector without the
controller keeping any data:

    [0, 8)      version: the id of the write (1 and up), little-endian
    [8, 16)     the sector's number on the device
    [16, 504)   filler, a deterministic function of the version
    [504, 512)  xxh64 of bytes [0, 504)

An all-zero sector is version 0 (discard, write-zeroes, a fresh image).
Anything else (a flipped bit, another sector's data, a torn copy) is
GARBAGE. A read result travels as runs: [[count, version], ...].
"""
import functools
import random
import struct

import xxhash

SECTOR = 512
ZERO_VERSION = 0
GARBAGE = -1

_HEAD = struct.Struct("<QQ")
_SUM = struct.Struct("<Q")
_BODY = SECTOR - _SUM.size
_ZERO = bytes(SECTOR)


@functools.lru_cache(maxsize=1024)
def _filler(version):
    return random.Random(version).randbytes(_BODY - _HEAD.size)


def sector_bytes(version, number):
    """The 512 bytes that version writes to sector `number`."""
    if version == ZERO_VERSION:
        return _ZERO
    body = _HEAD.pack(version, number) + _filler(version)
    return body + _SUM.pack(xxhash.xxh64_intdigest(body))


def payload(version, offset, length):
    """What a write of `version` puts at [offset, offset + length)."""
    first = offset // SECTOR
    return b"".join(sector_bytes(version, first + i)
                    for i in range(length // SECTOR))


def version_of(data, number):
    """The version a 512-byte sector holds at sector `number`, or GARBAGE."""
    if data == _ZERO:
        return ZERO_VERSION
    version, where = _HEAD.unpack_from(data)
    if where != number or version == ZERO_VERSION:
        return GARBAGE
    if _SUM.unpack_from(data, _BODY)[0] != xxhash.xxh64_intdigest(data[:_BODY]):
        return GARBAGE
    return version


def decode(data, offset):
    """Runs [[count, version], ...] of data read at offset."""
    view = memoryview(data)
    first = offset // SECTOR
    runs = []
    for i in range(len(data) // SECTOR):
        v = version_of(view[i * SECTOR:(i + 1) * SECTOR], first + i)
        if runs and runs[-1][1] == v:
            runs[-1][0] += 1
        else:
            runs.append([1, v])
    return runs


def sectors_of(runs):
    """Expand runs into one version per sector."""
    out = []
    for count, version in runs:
        out.extend([version] * count)
    return out
