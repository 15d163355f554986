/*
 * bitmap.h: the live metadata of a replica set, shared by bitmap.c (the
 * write-intent bitmap and the thread that writes all metadata) and
 * members.c (replica states, joining and leaving). Not part of the cdef.
 */
#ifndef QB_BITMAP_H
#define QB_BITMAP_H

#include "qb.h"

/* The set as the headers say it. */
struct qb_set {
	uint64_t events, seq;
	uint32_t nmembers;
	struct qb_meta_member members[QB_MAX_REPLICAS];
	struct qb_meta hdr[QB_MAX_REPLICAS];	/* each replica's own */
};

struct qb_bitmap {
	uint32_t shift, nregions;
	uint64_t off;			/* the bitmap's replica offset */
	uint64_t bytes;			/* its size, whole pages */
	uint64_t t0;
	uint32_t *inflight;		/* writes in flight per region, atomic */
	uint32_t *last_ms;		/* when its last write ended, atomic */
	uint8_t *durable;		/* its bit is on stable storage, atomic */

	pthread_mutex_t lock;		/* what follows; never held over I/O */
	pthread_cond_t cond;		/* round_done moved */
	struct qb_set set;
	uint8_t *image;			/* the bitmap as it must be on disk */
	uint8_t *hbuf;			/* one encoded header per replica index */
	uint8_t *snap;			/* the pages a round writes (writer only) */
	uint8_t *cand;			/* a clean's candidates (writer only) */
	bool pinned;			/* bits from before open not resynced yet */
	uint64_t dirty_lo, dirty_hi;	/* pages not written yet; none: MAX */
	bool headers;			/* the headers must be written */
	uint32_t extra;			/* also to these, not writable */
	bool clean;			/* a clean is asked for */
	uint32_t clean_idle_ms;
	int cleared;			/* the last clean's result */
	uint64_t round_next;		/* the round that takes new work */
	uint64_t round_done;		/* atomic */
	uint64_t states_round;		/* atomic: records the last state change */
	uint64_t want;			/* the highest round asked for */
	bool quit;

	pthread_t thread;
	bool thread_ok;
	struct io_uring ring;
	bool ring_ok;
	int work_fd;			/* eventfd: work was asked for */
	uint32_t calls;			/* writer calls, to match CQEs to */
	struct call *cur;		/* the call under way (writer only) */
	/* the writer's own connections to NBD replicas, on its ring, and
	 * those a rejoin made for it (taken by the writer, atomic) */
	struct qb_nbd *nbd[QB_MAX_REPLICAS];
	struct nbd_handle *nbd_next[QB_MAX_REPLICAS];
};

/* Ask for a header round; under b->lock. Returns the round. */
uint64_t qb_bitmap_want_headers_locked(struct qb_quorum *q, uint32_t extra);
/* Tell the writer there is work (any lock may be held or not). */
void qb_bitmap_kick(struct qb_quorum *q);
int qb_bitmap_create(struct qb_quorum *q, const struct qb_meta *meta,
		     const uint8_t *bitmap);

#endif
