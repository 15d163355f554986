/*
 * vote.c: the vote on buffers. No I/O here.
 *
 * Versions of a block are grouped into classes of byte-identical copies.
 * When all copies agree one memcmp pass says so. Otherwise each copy is
 * hashed, copies with different hashes are different, and copies with the
 * same hash join a class only after a memcmp confirms it: a hash never forms
 * a class alone. The largest class wins; a tie goes to the class that holds
 * the earliest replica (classes are made in replica order, so the first
 * largest one).
 */
#include <string.h>

#include <openssl/evp.h>
#include <xxhash.h>

#include "qb.h"

struct digest {
	uint8_t b[32];
};

static void digest(const void *buf, uint64_t len, uint32_t hash,
		   struct digest *d)
{
	memset(d, 0, sizeof(*d));
	if (hash == QB_HASH_SHA256) {
		unsigned int dlen = sizeof(d->b);

		EVP_Digest(buf, len, d->b, &dlen, EVP_sha256(), NULL);
	} else {
		XXH128_hash_t h = XXH3_128bits(buf, len);

		memcpy(d->b, &h.low64, 8);
		memcpy(d->b + 8, &h.high64, 8);
	}
}

/* True when every replica in mask holds the same bytes. */
bool qb_all_equal(void *const *bufs, uint32_t mask, uint64_t len)
{
	const void *first = NULL;

	for (uint32_t i = 0; mask; i++, mask >>= 1) {
		if (!(mask & 1))
			continue;
		if (!first)
			first = bufs[i];
		else if (memcmp(first, bufs[i], len))
			return false;
	}
	return true;
}

int qb_vote(const void *const *bufs, uint32_t n, uint64_t len,
	    uint32_t threshold, uint32_t hash, uint32_t *win)
{
	struct digest dig[QB_MAX_REPLICAS];
	uint32_t cls_rep[QB_MAX_REPLICAS], cls_mask[QB_MAX_REPLICAS];
	uint32_t ncls = 0, voters = 0, best = 0;

	if (n > QB_MAX_REPLICAS)
		n = QB_MAX_REPLICAS;
	for (uint32_t i = 0; i < n; i++)
		if (bufs[i])
			voters |= 1u << i;
	*win = 0;
	if (!voters)
		return -1;

	if (qb_all_equal((void *const *)bufs, voters, len)) {
		*win = voters;
		best = (uint32_t)__builtin_ctz(voters);
		return qb_popcount(voters) >= threshold ? (int)best : -1;
	}

	for (uint32_t i = 0; i < n; i++) {
		uint32_t c;

		if (!bufs[i])
			continue;
		digest(bufs[i], len, hash, &dig[i]);
		for (c = 0; c < ncls; c++) {
			uint32_t r = cls_rep[c];

			if (!memcmp(&dig[r], &dig[i], sizeof(dig[i])) &&
			    !memcmp(bufs[r], bufs[i], len))
				break;
		}
		if (c == ncls) {
			cls_rep[ncls] = i;
			cls_mask[ncls++] = 0;
		}
		cls_mask[c] |= 1u << i;
	}
	for (uint32_t c = 1; c < ncls; c++)
		if (qb_popcount(cls_mask[c]) > qb_popcount(cls_mask[best]))
			best = c;
	*win = cls_mask[best];
	return qb_popcount(cls_mask[best]) >= threshold ? (int)cls_rep[best] : -1;
}
