"""qb_vote on buffers: the pure vote, no I/O (DESIGN.md, Vote semantics).

Each copy is a bytes object or None (no vote). The reference below states the
rule in a few lines; the C vote must agree with it on every case.
"""
import os
import random
import shutil
import subprocess

import pytest

from quorumblk._core import ffi, lib

HASHES = [lib.QB_HASH_XXH3, lib.QB_HASH_SHA256]
HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")


def vote(copies, threshold, hash=lib.QB_HASH_XXH3, length=None):
    """Call qb_vote; returns (winner or -1, winning class as a mask)."""
    if length is None:
        length = max(len(c) for c in copies if c is not None)
    keep = [ffi.from_buffer(c) if c is not None else ffi.NULL for c in copies]
    bufs = ffi.new("const void *[]", keep)
    win = ffi.new("uint32_t *")
    w = lib.qb_vote(bufs, len(copies), length, threshold, hash, win)
    return w, win[0]


def reference(copies, threshold):
    """The contract: classes of equal copies in replica order, the largest
    wins (ties to the class with the earliest replica), threshold needed."""
    classes = []                # [first replica, mask]
    for i, c in enumerate(copies):
        if c is None:
            continue
        for cl in classes:
            if copies[cl[0]] == c:
                cl[1] |= 1 << i
                break
        else:
            classes.append([i, 1 << i])
    if not classes:
        return -1, 0
    best = classes[0]
    for cl in classes[1:]:
        if bin(cl[1]).count("1") > bin(best[1]).count("1"):
            best = cl
    ok = bin(best[1]).count("1") >= threshold
    return (best[0] if ok else -1), best[1]


A = b"A" * 4096
B = b"B" * 4096
C = b"C" * 4096


@pytest.mark.parametrize("hash", HASHES)
class TestRules:
    def test_unanimous(self, hash):
        assert vote([A, A, A], 3, hash) == (0, 0b111)
        assert vote([A, A, A], 1, hash) == (0, 0b111)

    def test_single_replica(self, hash):
        assert vote([A], 1, hash) == (0, 0b1)

    def test_majority_wins_wherever_it_sits(self, hash):
        assert vote([A, B, A], 2, hash) == (0, 0b101)
        assert vote([B, A, A], 2, hash) == (1, 0b110)
        assert vote([A, A, B], 2, hash) == (0, 0b011)

    def test_majority_below_threshold_is_no_quorum(self, hash):
        # 2 of 3 agree but threshold 3: no quorum; the largest class is told
        w, win = vote([A, B, A], 3, hash)
        assert w == -1
        assert win == 0b101

    def test_tie_goes_to_earliest_replica(self, hash):
        assert vote([A, B], 1, hash) == (0, 0b01)
        assert vote([B, A], 1, hash) == (0, 0b01)
        assert vote([B, A, A, B], 2, hash) == (0, 0b1001)
        assert vote([A, B, B, A], 2, hash) == (0, 0b1001)
        # the earliest replica of the tie is not the first voter overall
        assert vote([C, A, B, A, B], 2, hash) == (1, 0b01010)
        assert vote([C, B, A, A, B], 2, hash) == (1, 0b10010)

    def test_no_quorum(self, hash):
        w, win = vote([A, B, C], 2, hash)
        assert w == -1
        assert win == 0b001     # largest (first) class, for reporting

    def test_null_voters_are_skipped(self, hash):
        assert vote([None, A, A], 2, hash) == (1, 0b110)
        assert vote([A, None, A], 2, hash) == (0, 0b101)
        assert vote([None, B, A, A], 2, hash) == (2, 0b1100)
        # a missing copy does not count toward a quorum
        assert vote([None, None, A], 2, hash)[0] == -1
        assert vote([None, A, B], 1, hash) == (1, 0b010)

    def test_no_voters(self, hash):
        assert vote([None, None, None], 1, hash, length=4096) == (-1, 0)

    def test_one_bit_anywhere_splits_a_class(self, hash):
        for pos in (0, 1, 15, 16, 2047, 4095):
            for bit in (0, 7):
                b = bytearray(A)
                b[pos] ^= 1 << bit
                assert vote([A, bytes(b), A], 2, hash) == (0, 0b101), pos
                assert vote([bytes(b), A, bytes(b)], 2, hash) == (0, 0b101)
                assert vote([A, bytes(b)], 2, hash)[0] == -1

    def test_only_the_first_len_bytes_vote(self, hash):
        # copies that differ after len are equal for this vote
        x = A + b"x" * 512
        y = A + b"y" * 512
        assert vote([x, y, x], 3, hash, length=4096) == (0, 0b111)
        assert vote([x, y, x], 3, hash, length=4096 + 1)[0] == -1

    def test_small_and_odd_lengths(self, hash):
        for length in (1, 7, 512, 513, 4095):
            a = os.urandom(length)
            b = bytearray(a)
            b[-1] ^= 0x80
            assert vote([bytes(b), a, a], 2, hash) == (1, 0b110)


def test_sixteen_replicas():
    n = lib.QB_MAX_REPLICAS
    copies = [A] * n
    copies[5] = B
    copies[9] = C
    w, win = vote(copies, n - 2)
    assert w == 0
    assert win == ((1 << n) - 1) & ~(1 << 5) & ~(1 << 9)
    assert vote(copies, n - 1)[0] == -1


def test_random_cases_match_the_reference_with_both_hashes():
    rng = random.Random(7)
    for _ in range(3000):
        n = rng.randint(1, 8)
        length = rng.choice([512, 4096])
        versions = [rng.randbytes(length) for _ in range(rng.randint(1, 4))]
        # near-identical versions: a byte apart from the first
        v = bytearray(versions[0])
        v[rng.randrange(length)] ^= 1 << rng.randrange(8)
        versions.append(bytes(v))
        copies = [None if rng.random() < 0.15 else rng.choice(versions)
                  for _ in range(n)]
        threshold = rng.randint(1, n)
        want = reference(copies, threshold)
        got_x = vote(copies, threshold, lib.QB_HASH_XXH3, length)
        got_s = vote(copies, threshold, lib.QB_HASH_SHA256, length)
        assert got_x == want, (copies, threshold)
        assert got_s == want, (copies, threshold)


# ---- a hash never forms a class alone ----
#
# No one can craft xxh3-128 or SHA-256 collisions, so this builds vote.c
# against stub hash functions that give every input the same digest: every
# copy then "collides", and the vote must still keep different bytes apart.

STUBS = r"""
#include <stddef.h>
#include <string.h>
#include <xxhash.h>
#include <openssl/evp.h>
#include "quorumblk.h"

XXH128_hash_t XXH3_128bits(const void *p, size_t len)
{
	XXH128_hash_t h = { 0x1234, 0x5678 };
	(void)p; (void)len;
	return h;
}

int EVP_Digest(const void *data, size_t count, unsigned char *md,
	       unsigned int *size, const EVP_MD *type, ENGINE *impl)
{
	(void)data; (void)count; (void)type; (void)impl;
	memset(md, 0xab, 32);
	if (size)
		*size = 32;
	return 1;
}

const EVP_MD *EVP_sha256(void)
{
	return (const EVP_MD *)1;
}

static int check(const char *what, int got, int want, unsigned win,
		 unsigned want_win)
{
	if (got == want && win == want_win)
		return 0;
	printf("FAIL %s: winner %d mask %#x, want %d mask %#x\n", what, got,
	       win, want, want_win);
	return 1;
}

int main(void)
{
	static char a[4096], b[4096], c[4096];
	unsigned win;
	int bad = 0;

	memset(a, 'a', sizeof(a));
	memset(b, 'a', sizeof(b));
	b[4095] = 'b';		/* differs in the last byte only */
	memset(c, 'c', sizeof(c));
	for (unsigned h = 0; h < 2; h++) {
		const void *v1[3] = { a, b, a };
		const void *v2[3] = { a, b, c };
		const void *v3[4] = { b, a, a, c };
		const void *v4[2] = { a, b };
		int w;

		w = qb_vote(v1, 3, 4096, 2, h, &win);
		bad |= check("a b a", w, 0, win, 0x5);
		w = qb_vote(v2, 3, 4096, 2, h, &win);
		bad |= check("a b c", w, -1, win, 0x1);
		w = qb_vote(v3, 4, 4096, 2, h, &win);
		bad |= check("b a a c", w, 1, win, 0x6);
		w = qb_vote(v4, 2, 4096, 2, h, &win);
		bad |= check("a b, threshold 2", w, -1, win, 0x1);
	}
	if (!bad)
		printf("ok\n");
	return bad;
}
"""


def test_equal_hashes_never_form_a_class_alone(tmp_path):
    cc = os.environ.get("CC", "cc")
    if not shutil.which(cc):
        pytest.skip(f"no C compiler ({cc}) to build the collision check")
    src = tmp_path / "collide.c"
    src.write_text('#include <stdio.h>\n' + STUBS)
    exe = tmp_path / "collide"
    build = subprocess.run(
        [cc, "-O1", "-std=gnu11", f"-I{CSRC}", "-o", str(exe), str(src),
         os.path.join(CSRC, "vote.c")],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout
