/*
 * qb.h: the engine's private structures, shared by its C files only.
 */
#ifndef QB_H
#define QB_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "engine.h"
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
};

struct qb_replica {
	char *path;
	int fd;
	int state;			/* enum qb_replica_state, atomic */
	int is_blockdev;
	int memory_fs;			/* tmpfs/ramfs: I/O done in-thread */
	uint32_t align;			/* direct-I/O offset and length unit */
	uint32_t chunk;			/* largest I/O not split below; 0: any */
	int zero_mode;			/* how write-zeroes works here, atomic */
	struct qb_fault fault;		/* under fault_lock */
};

/* The write-intent bitmap and the headers it goes with (meta.c). */
struct qb_wil {
	uint32_t shift, nregions;
	uint64_t off;			/* the bitmap's replica offset */
	uint64_t bytes;			/* its size, whole pages */
	uint64_t t0;
	uint32_t *inflight;		/* writes in flight per region, atomic */
	uint32_t *last_ms;		/* when its last write ended */
	uint8_t *durable;		/* its bit is on stable storage, atomic */
	bool pinned;			/* bits from before open not resynced yet */

	pthread_mutex_t lock;		/* the rest, and metadata writes */
	struct io_uring ring;		/* metadata writes to all replicas at once */
	bool ring_ok;
	uint32_t ring_gen;		/* tells a late CQE from a current one */
	uint8_t *hbuf;			/* one encoded header per replica index */
	uint8_t *image;			/* the bitmap as written, page aligned */
	uint64_t events, seq;
	uint32_t nmembers;
	struct qb_meta_member members[QB_MAX_REPLICAS];
	struct qb_meta hdr[QB_MAX_REPLICAS];	/* each replica's own */
};

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
	struct qb_replica rep[QB_MAX_REPLICAS];
	uint32_t in_service;		/* mask, atomic */
	uint32_t writable;		/* in service or resyncing, atomic */
	uint32_t files_gen;		/* bumped when a replica's fd changes */
	int graveyard[QB_MAX_REPLICAS];	/* replaced fds, closed at the end */
	uint32_t ngraves;
	struct qb_wil *wil;		/* NULL: no metadata */

	uint64_t *gens;			/* QB_GEN_BUCKETS bucket words */
	void *zeros;			/* max_io zero bytes, for write-zeroes */
	int hang_fd;			/* eventfd that never fires */

	pthread_mutex_t lock;		/* contexts, retired counters, events */
	struct qb_ctx *ctxs;
	struct qb_counters retired_dev, retired_rep[QB_MAX_REPLICAS];
	struct qb_event events[QB_EVENT_RING];
	uint32_t ev_head, ev_count;
	struct qb_ratelimit rl[QB_MAX_REPLICAS + 1][QB_EV_NR];
	int event_fd;

	pthread_mutex_t fault_lock;
	int faults_on;			/* any fault set: checked per I/O, atomic */
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
/* Replica r is FAILED from now on (no I/O, no vote), without events or a
 * header update; true if this call did it. */
bool qb_replica_take_out(struct qb_quorum *q, uint32_t r);
/* Take replica r out of service after err; true if this call did it. */
bool qb_replica_fail(struct qb_quorum *q, uint32_t r, int err,
		     uint64_t offset, uint64_t length);
/* The fault planned for replica r's next I/O, if any (consumes a count). */
bool qb_fault_match(struct qb_quorum *q, uint32_t r, uint32_t op,
		    uint64_t offset, uint64_t length, struct qb_fault *out);
void qb_counters_add(struct qb_counters *to, const struct qb_counters *from);
/* engine.c: add the counters of a list of contexts (under q->lock). */
void qb_ctx_counters_add(const struct qb_ctx *c, struct qb_counters *dev,
			 struct qb_counters *rep, uint32_t n);

/* meta.c */
void qb_wil_begin(struct qb_quorum *q, uint64_t off, uint64_t len);
void qb_wil_end(struct qb_quorum *q, uint64_t off, uint64_t len);
void qb_wil_free(struct qb_wil *w);
void qb_meta_replica_failed(struct qb_quorum *q, uint32_t r);

/* quorum.c: open one replica, check its size; errors name the path. */
int qb_open_replica(struct qb_replica *r, const char *path, bool buffered,
		    struct stat *st, uint64_t *size);
bool qb_same_object(const struct stat *a, const struct stat *b);

/* dio.c */
uint32_t qb_dio_align(int fd, bool blockdev, bool buffered);
bool qb_is_memory_fs(int fd);
uint32_t qb_dio_chunk(int fd, bool blockdev, bool buffered);

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
