/*
 * hold.c: the write generations that every thread of a quorum shares, and
 * the holds that keep a repair or a sync from overwriting newer data.
 *
 * q->gens has one word per bucket of vote blocks (block % QB_GEN_BUCKETS):
 * a generation that every write bumps, the writes in flight, and the
 * repairs (or syncs) in flight. A read notes the words of its blocks when
 * it starts; a losing block is rewritten only if no write started on it
 * since and none is in flight, and a write waits (is deferred) while a
 * repair of its blocks is in flight, so the two never race on a replica.
 * A sync holds its blocks the same way, but only once no write is in flight
 * on them, so that it reads and writes them alone.
 */
#include "engine_int.h"

static inline uint64_t *bucket(struct qb_quorum *q, uint64_t block)
{
	return &q->gens[block & (QB_GEN_BUCKETS - 1)];
}

void qb_hold_snapshot(struct qb_quorum *q, uint64_t b0, uint32_t n,
		      uint64_t *snap)
{
	for (uint32_t i = 0; i < n; i++) {
		uint64_t w = __atomic_load_n(bucket(q, b0 + i), __ATOMIC_ACQUIRE);

		snap[i] = (QB_WRITERS(w) || QB_REPAIRING(w)) ?
			  QB_SNAP_INVALID : (w & QB_GEN_MASK);
	}
}

/* True when no write touched the block since its snapshot. */
bool qb_hold_unchanged(struct qb_quorum *q, uint64_t block, uint64_t snap)
{
	uint64_t w = __atomic_load_n(bucket(q, block), __ATOMIC_ACQUIRE);

	return snap != QB_SNAP_INVALID && !QB_WRITERS(w) &&
	       (w & QB_GEN_MASK) == snap;
}

/* Hold a block for a repair: only if unchanged since the snapshot. */
bool qb_hold_repair(struct qb_quorum *q, uint64_t block, uint64_t snap)
{
	uint64_t *b = bucket(q, block);
	uint64_t w = __atomic_load_n(b, __ATOMIC_ACQUIRE);

	do {
		if (snap == QB_SNAP_INVALID || QB_WRITERS(w) ||
		    (w & QB_GEN_MASK) != snap)
			return false;
	} while (!__atomic_compare_exchange_n(b, &w, w + QB_REPAIR_ONE, true,
					      __ATOMIC_ACQ_REL,
					      __ATOMIC_ACQUIRE));
	return true;
}

void qb_hold_release(struct qb_quorum *q, uint64_t b0, uint32_t n,
		     uint8_t *held)
{
	for (uint32_t i = 0; i < n; i++) {
		if (!held[i])
			continue;
		__atomic_fetch_sub(bucket(q, b0 + i), QB_REPAIR_ONE,
				   __ATOMIC_ACQ_REL);
		held[i] = 0;
	}
}

/* Hold every block of a sync, only while no write is in flight on them
 * (new ones wait until the sync lets go). Fails with nothing held. */
bool qb_hold_sync(struct qb_quorum *q, uint64_t b0, uint32_t n, uint8_t *held)
{
	for (uint32_t i = 0; i < n; i++) {
		uint64_t *b = bucket(q, b0 + i);
		uint64_t w = __atomic_load_n(b, __ATOMIC_ACQUIRE);

		do {
			if (QB_WRITERS(w)) {
				qb_hold_release(q, b0, i, held);
				return false;
			}
		} while (!__atomic_compare_exchange_n(b, &w, w + QB_REPAIR_ONE,
						      true, __ATOMIC_ACQ_REL,
						      __ATOMIC_ACQUIRE));
		held[i] = 1;
	}
	return true;
}

void qb_release_writers(struct qb_quorum *q, uint64_t b0, uint32_t n)
{
	if (n > QB_GEN_BUCKETS)
		n = QB_GEN_BUCKETS;
	for (uint32_t i = 0; i < n; i++)
		__atomic_fetch_sub(bucket(q, b0 + i), QB_WRITER_ONE,
				   __ATOMIC_ACQ_REL);
}

/* Mark blocks as being written (a new generation). Fails, with nothing
 * held, while a repair or sync of one of them is in flight. */
bool qb_hold_writers(struct qb_quorum *q, uint64_t b0, uint32_t n)
{
	if (n > QB_GEN_BUCKETS)
		n = QB_GEN_BUCKETS;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t *b = bucket(q, b0 + i);
		uint64_t w = __atomic_load_n(b, __ATOMIC_ACQUIRE), nw;

		do {
			if (QB_REPAIRING(w)) {
				qb_release_writers(q, b0, i);
				return false;
			}
			nw = ((w & ~QB_GEN_MASK) | ((w + 1) & QB_GEN_MASK)) +
			     QB_WRITER_ONE;
		} while (!__atomic_compare_exchange_n(b, &w, nw, true,
						      __ATOMIC_ACQ_REL,
						      __ATOMIC_ACQUIRE));
	}
	return true;
}
