/*
 * qb.h: the quorum's shared state, private to the core's C files.
 *
 * Layers, each using only those below it:
 *   front ends     ublk.c (queue threads), loadgen.c, Python (cffi)
 *   engine         engine.c, issue.c, sync.c: one thread's requests
 *                  (engine_int.h); hold.c: the holds all threads share
 *   quorum state   quorum.c (replicas, events, counters, faults),
 *                  members.c (replica states, joining), bitmap.c (the
 *                  write-intent bitmap and the metadata writer thread)
 *   leaves         vote.c, meta.c (the on-disk format), dio.c, error.c
 */
#ifndef QB_H
#define QB_H

#include <liburing.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "quorumblk.h"

#define QB_EVENT_RING 4096	/* events kept until drained */
#define QB_GEN_BUCKETS 65536	/* write-generation table, by vote block */

/* Write-generation bucket word: gen (32) | writers (16) | repairing (16). */
#define QB_GEN_MASK 0xffffffffULL
#define QB_WRITER_ONE (1ULL << 32)
#define QB_REPAIR_ONE (1ULL << 48)
#define QB_WRITERS(w) (((w) >> 32) & 0xffff)
#define QB_REPAIRING(w) ((w) >> 48)
#define QB_SNAP_INVALID (1ULL << 63)	/* a write was in flight at read start */

struct qb_fault {
	uint32_t kind;
	uint32_t ops_mask;
	uint64_t offset, length;
	uint32_t count;		/* left; 0: until cleared */
	uint32_t delay_ms;
	int gate_fd;		/* LATE: held until it fires; HANG: never does */
	int err;		/* EIO: the errno it fails with */
};

struct qb_replica {
	char *path;
	int fd;
	int old_fd;			/* the fd before its last attach */
	int state;			/* enum qb_replica_state, atomic */
	int is_blockdev;
	int is_nbd;			/* an NBD export (nbd.c): fd is -1 */
	uint32_t nbd_caps;		/* what it offers, QB_NBD_* */
	int memory_fs;			/* tmpfs/ramfs: I/O done in-thread */
	uint32_t align;			/* direct-I/O offset and length unit */
	uint32_t chunk;			/* largest I/O not split below; 0: any */
	int zero_mode;			/* how write-zeroes works here, atomic */
	uint32_t owed;			/* abandoned I/Os not back yet, atomic */
	uint64_t late;			/* abandoned I/Os that came back, atomic */
	uint64_t meta_timeouts;		/* metadata writes past the timeout, atomic */
	struct qb_fault fault;		/* under fault_lock */
};

/*
 * What the quorum knows of one engine context: its counters (written by
 * its thread only) and how to wake it when a metadata round it waits for
 * is done. Registered in q->ctxs while the context lives; a context that
 * still has I/O owed when it is destroyed moves to q->zombies until that
 * comes back, and `release` frees it if the quorum closes first.
 */
struct qb_ctx_link {
	struct qb_counters dev, rep[QB_MAX_REPLICAS];
	uint32_t out[QB_MAX_REPLICAS];	/* its replica I/Os in flight */
	int wake_fd;			/* eventfd polled on its ring */
	/* NBD connections that a rejoin made for it, taken by its thread
	 * when it sees files_gen change (atomic exchange) */
	struct nbd_handle *nbd_next[QB_MAX_REPLICAS];
	int waiting;			/* parked on a metadata round, atomic */
	void (*release)(struct qb_ctx_link *l);
	struct qb_ctx_link *next;
};

struct qb_bitmap;		/* bitmap.h: bitmap.c and members.c */
struct nbd_handle;		/* libnbd's, nbd.c */

/* Event rate limit per replica (plus one for the device) and type. */
struct qb_ratelimit {
	uint64_t window_ns;	/* start of the current one-second window */
	uint32_t sent;		/* events sent in it */
	uint32_t suppressed;	/* left out since the last one sent */
};

struct qb_quorum {
	uint32_t n;
	struct qb_options opt;
	uint64_t size;
	uint32_t align;			/* the largest of the replicas' */
	uint32_t vote_shift;		/* log2 of opt.vote_block */
	struct qb_replica rep[QB_MAX_REPLICAS];
	uint32_t in_service;		/* mask, atomic */
	uint32_t writable;		/* in service or resyncing, atomic */
	uint32_t files_gen;		/* bumped when a replica's fd changes */
	struct qb_bitmap *bitmap;	/* NULL: no metadata */
	/* Crash-dirty regions (the bitmap's bits at open) not resynced yet:
	 * a read there reads every voter and votes by the crash rule.
	 * unsynced_left is the hot path's one test (0: none, the norm). */
	uint32_t unsynced_left;		/* atomic */
	uint32_t unsynced_shift, unsynced_n;
	uint8_t *unsynced;		/* a byte per region, atomic */

	uint64_t *gens;			/* QB_GEN_BUCKETS bucket words */
	void *zeros;			/* max_io zero bytes, for write-zeroes */
	struct {
		int fd;
		uint32_t replica, kind;
	} gates[64];			/* fault eventfds, closed at the end */
	uint32_t ngates;

	pthread_mutex_t lock;		/* contexts, retired counters, events */
	struct qb_ctx_link *ctxs;
	struct qb_ctx_link *zombies;	/* atomic head, changed under lock */
	struct qb_counters retired_dev, retired_rep[QB_MAX_REPLICAS];
	struct qb_event events[QB_EVENT_RING];
	uint32_t ev_head, ev_count;
	struct qb_ratelimit rl[QB_MAX_REPLICAS + 1][QB_EV_NR];
	int event_fd;

	pthread_mutex_t fault_lock;
	int faults_on;			/* any fault set: checked per I/O, atomic */
	uint32_t pause_where, pause_ms;	/* qb_quorum_test_pause, atomic */
};

/* Error reporting (error.c). */
int qb_err(int err, int kind, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
void qb_err_clear(void);

/* Counter update by the one thread that owns them, readable by others. */
#define QB_ADD(field, v) \
	__atomic_store_n(&(field), (field) + (v), __ATOMIC_RELAXED)

/* quorum.c */
uint64_t qb_now_ns(void);
void qb_event(struct qb_quorum *q, uint32_t type, int replica,
	      uint64_t offset, uint64_t length, int err);
/* The test hook's pause at point where (enum qb_pause), if one is set. */
void qb_test_pause(struct qb_quorum *q, uint32_t where);
/* The fault planned for replica r's next I/O, if any (consumes a count). */
bool qb_fault_match(struct qb_quorum *q, uint32_t r, uint32_t op,
		    uint64_t offset, uint64_t length, struct qb_fault *out);
void qb_counters_add(struct qb_counters *to, const struct qb_counters *from);
/* A context joins or leaves the quorum's list (its counters are kept). */
void qb_link_add(struct qb_quorum *q, struct qb_ctx_link *l);
void qb_link_remove(struct qb_quorum *q, struct qb_ctx_link *l, bool zombie);
/* Wake every context parked on a metadata round. */
void qb_links_wake(struct qb_quorum *q);
/* An abandoned I/O of replica r is owed (+1) or came back (-1). */
void qb_owed(struct qb_quorum *q, uint32_t r, int delta);
/* n abandoned I/Os of replica r will never come back (their connection
 * was closed): no longer owed, not late either. */
void qb_owed_forget(struct qb_quorum *q, uint32_t r, uint32_t n);
/* Replica r's I/Os not completed: in flight in any context, or owed. */
uint32_t qb_replica_outstanding(struct qb_quorum *q, uint32_t r);
/* Open one replica, check its size; errors name the path. */
int qb_open_replica(struct qb_replica *r, const char *path, bool buffered,
		    struct stat *st, uint64_t *size);
bool qb_same_object(const struct stat *a, const struct stat *b);
/* A file, a block device or an NBD URI (nbd.c; st is zeroed for those). */
int qb_open_any(struct qb_replica *r, const char *path,
		const struct qb_options *o, struct stat *st, uint64_t *size);
/* The same replica twice: one file, or one export URI. */
bool qb_same_replica(const struct qb_replica *ra, const struct stat *a,
		     const struct qb_replica *rb, const struct stat *b);

/* members.c */
/* Replica r leaves service after err: events, and (with metadata) a header
 * round that records it; true if this call did it. */
bool qb_replica_fail(struct qb_quorum *q, uint32_t r, int err,
		     uint64_t offset, uint64_t length);
/* The same without events or header round (the bitmap's writer records
 * it itself); true if this call did it. Under the bitmap's lock if any. */
bool qb_replica_take_out(struct qb_quorum *q, uint32_t r);

/* bitmap.c */
/* Before a write to [off, off + len): its regions are counted busy. Returns
 * 0 when their bits are on stable storage already, else the metadata
 * round to wait for (qb_bitmap_done) before the write is issued. */
uint64_t qb_bitmap_begin(struct qb_quorum *q, uint64_t off, uint64_t len);
void qb_bitmap_end(struct qb_quorum *q, uint64_t off, uint64_t len);
/* The last round done, and the round that will record the latest replica
 * state change: a write acknowledged while done < that could be lost with
 * the change unrecorded, so it waits. */
uint64_t qb_bitmap_done(const struct qb_quorum *q);
uint64_t qb_bitmap_states_round(const struct qb_quorum *q);
/* The regions of [off, off + len) that were crash-dirty and not resynced
 * when called: bit k for the k-th region from off's (0: none, the norm). */
uint64_t qb_unsynced_regions(struct qb_quorum *q, uint64_t off, uint64_t len);
/* Wait for round (from a thread that is not the writer). */
void qb_bitmap_wait(struct qb_quorum *q, uint64_t round);
void qb_bitmap_free(struct qb_quorum *q);
/* Where the writer is, for a diagnosis (engine.c: qb_quorum_describe). */
void qb_bitmap_describe(struct qb_quorum *q, FILE *f);

/* issue.c: prepare SQEs that an injected fault delays, holds or hangs:
 * the head that goes before the I/O (linked), or the hang itself. Returns
 * false when f needs no head. */
bool qb_fault_head(struct io_uring_sqe *sqe, const struct qb_fault *f,
		   struct __kernel_timespec *ts);

/* dio.c */
uint32_t qb_dio_align(int fd, bool blockdev, bool buffered);
bool qb_is_memory_fs(int fd);
uint32_t qb_dio_chunk(int fd, bool blockdev, bool buffered);

/* meta.c: check a header (the caller's copy of one read from disk). */
const char *qb_meta_check(const struct qb_meta *m, uint64_t size);
uint64_t qb_meta_bitmap_off(const struct qb_meta *m);
uint64_t qb_meta_header_off(const struct qb_meta *m);
void qb_meta_encode(const struct qb_meta *m, uint8_t *out);
#define QB_META_HDR_BYTES 4096

/* vote.c: vote over [0, len) of the voters' buffers; see qb_vote. */
bool qb_all_equal(void *const *bufs, uint32_t mask, uint64_t len);

static inline uint32_t qb_popcount(uint32_t m)
{
	return (uint32_t)__builtin_popcount(m);
}

static inline uint32_t qb_in_service(const struct qb_quorum *q)
{
	return __atomic_load_n(&q->in_service, __ATOMIC_ACQUIRE);
}

static inline uint32_t qb_replicas(const struct qb_quorum *q)
{
	return __atomic_load_n(&q->n, __ATOMIC_ACQUIRE);
}

static inline uint32_t qb_writable(const struct qb_quorum *q)
{
	return __atomic_load_n(&q->writable, __ATOMIC_ACQUIRE);
}

#endif
