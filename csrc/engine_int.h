/*
 * engine_int.h: one thread's request engine, shared by its files:
 *   engine.c  slots and phases, completion routing, the replica timeout,
 *             abandoned I/O, the loop, contexts' life
 *   issue.c   a replica I/O as SQEs (faults, chunks), in-thread I/O for
 *             memory file systems, the ways of zeroing
 *   sync.c    resync and scrub
 *   hold.c    the write generations every thread shares (q->gens)
 * Not part of the cdef.
 */
#ifndef QB_ENGINE_INT_H
#define QB_ENGINE_INT_H

#include "engine.h"
#include "nbd.h"
#include "qb.h"

#define QB_MAX_RUNS 64		/* repair writes per request */
#define OP_SYNC 8		/* internal: qb_ctx_sync's chunks */
#define QB_MAX_CHUNKS 16	/* a replica I/O is split in at most this */
#define QB_ZERO_STEP (32u << 20)	/* discard, write-zeroes: bytes per step */

/* Where a request is. Phases with I/O out: READ, READ_MORE, REPAIR,
 * MODIFY, FLUSH, SYNC, SYNC_WRITE; waiting without I/O: HOLD (its blocks
 * are held by another request: deferred), MARK (its bitmap bits are being
 * written) and STATES (done, but a replica state change it saw is not on
 * disk yet): those two are parked until a metadata round. */
enum phase {
	PH_FREE, PH_HOLD, PH_READ, PH_READ_MORE, PH_REPAIR, PH_MARK,
	PH_MODIFY, PH_FLUSH, PH_STATES, PH_SYNC, PH_SYNC_WRITE,
};

/* What a CQE is for. K_REPAIR rewrites a losing voter (a "repaired" event),
 * K_COPY a sync target; K_TICK, K_IGNORE and K_WAKE are the engine's own;
 * K_NBD is an NBD connection's poll (replica, and its generation in the
 * generation field). */
enum kind { K_IO, K_REPAIR, K_ZERO, K_COPY, K_TICK, K_IGNORE, K_WAKE, K_NBD };
enum zero_mode { ZM_FALLOC, ZM_PUNCH, ZM_WRITE };

#define WIN_NO_QUORUM (1u << 31)	/* sync: the block had no quorum */
#define WIN_DIFFER (1u << 30)	/* sync: some copy of the block differed */

/*
 * CQE user_data: slot (12) | kind (3) | replica (4) | index (14) |
 * generation (30), bit 63 for a front end's own (QB_UD_FOREIGN). The
 * generation changes with every request on the slot, and never takes a
 * value that an abandoned I/O of the slot still carries: a late CQE is
 * always told from a current one.
 */
#define UD_GEN_MASK ((1u << 30) - 1)

static inline uint64_t ud_make(uint32_t slot, uint32_t gen, uint32_t kind,
			       uint32_t r, uint32_t idx)
{
	return (uint64_t)slot | (uint64_t)kind << 12 | (uint64_t)r << 15 |
	       (uint64_t)idx << 19 | (uint64_t)(gen & UD_GEN_MASK) << 33;
}

static inline uint32_t ud_slot(uint64_t ud) { return ud & 0xfff; }
static inline uint32_t ud_kind(uint64_t ud) { return (ud >> 12) & 7; }
static inline uint32_t ud_rep(uint64_t ud) { return (ud >> 15) & 0xf; }
static inline uint32_t ud_idx(uint64_t ud) { return (ud >> 19) & 0x3fff; }
static inline uint32_t ud_gen(uint64_t ud) { return (ud >> 33) & UD_GEN_MASK; }

struct run {
	uint64_t off;		/* device offset */
	uint32_t len;
	uint32_t rel;		/* offset in the request buffer */
};

struct qb_slot {
	uint32_t gen;
	uint8_t op, flags, phase, retries, err_kind;
	uint8_t sync_flags;	/* enum qb_sync_flags */
	uint8_t base;		/* the buffer holding the voted data */
	int8_t src_buf;		/* a write: which buffer holds its data */
	bool incomplete;	/* sync: more runs than fit; do it again */
	bool again;		/* sync: that second pass (counted already) */
	uint32_t targets;	/* sync: replicas that get the winner */
	uint32_t len;
	uint64_t off;
	uint64_t poff;		/* discard, write-zeroes: the step under way */
	uint32_t plen;
	void *src;		/* a write's data */
	int result;
	void *out;		/* a read's voted data */
	uint64_t crash;		/* a read: its regions (bit k: the k-th from
				 * off's) voted by the crash rule, see
				 * qb_quorum_region_synced; 0: none */
	uint64_t ticket;	/* PH_MARK, PH_STATES: the round awaited */

	uint32_t pending;	/* I/Os out in this phase, plus a guard */
	uint32_t nout[QB_MAX_REPLICAS];	/* per replica */
	uint64_t since[QB_MAX_REPLICAS];	/* its oldest I/O out went then */
	uint32_t tried;		/* replicas asked in this request */
	uint32_t ok;		/* replicas that succeeded (this step) */
	uint32_t bad;		/* replicas with a failed I/O in this request */
	uint64_t zoff[QB_MAX_REPLICAS];	/* write-zeroes by writing, progress */
	int hang_fd[QB_MAX_REPLICAS];	/* a hang fault's: cancelled if abandoned */
	struct __kernel_timespec delay[QB_MAX_REPLICAS];

	uint32_t nblocks;	/* vote blocks in the request */
	uint64_t *snap;		/* bucket words at read start */
	uint32_t *win;		/* winning class per block */
	uint8_t *held;		/* block held for repair */
	struct run runs[QB_MAX_RUNS];
	uint32_t nruns;
	uint8_t run_rep[QB_MAX_RUNS];

	void *buf[QB_MAX_REPLICAS];
	struct qb_slot *next;	/* in a list: deferred, parked or ready */
};

/* I/Os of one slot and replica that the timeout abandoned; their buffers
 * are set aside until the last of their CQEs is back. */
struct orphan {
	uint32_t slot, gen, replica;
	uint32_t left;		/* CQEs still to come */
	uint64_t off;		/* the request's range, for the event */
	uint32_t len;
	void *buf;		/* set aside for them (NULL: none) */
	struct orphan *next;
};

/* A CQE kept aside while the ring had no room to submit. */
struct cqe_copy {
	uint64_t user_data;
	int32_t res;
	uint32_t flags;
};

struct qb_ctx {
	struct qb_quorum *q;
	struct qb_ctx_link link;	/* what the quorum sees of it */
	struct io_uring ring;
	bool ring_ok;
	uint32_t depth;
	uint32_t inflight;	/* requests started, not completed */
	uint64_t finished;	/* requests completed, ever */
	uint32_t rr;		/* rotation for policy threshold */
	/* policy threshold: each replica's read time seen here, a running
	 * average in ns (0: none yet); this context's own, no shared line */
	uint64_t read_ns[QB_MAX_REPLICAS];
	struct qb_slot *slots;
	char *bufmem;		/* every slot's first buffers, one mapping */
	uint32_t max_blocks;
	struct qb_slot *deferred, *parked, *ready;

	bool tick_armed, wake_armed;
	struct __kernel_timespec tick;
	uint32_t files_gen;	/* q->files_gen of the registered files */
	struct qb_sync_result *sync_res;	/* qb_ctx_sync's, while it runs */

	struct orphan *orphans;
	void **spare;		/* set-aside buffers whose I/O came back */
	uint32_t nspare, spare_cap;
	void **mapped;		/* buffers mapped one by one */
	uint32_t nmapped, mapped_cap;
	struct cqe_copy *backlog;
	uint32_t nbacklog, backlog_cap;
	/* its connections to NBD replicas (NULL: a file, or none yet); their
	 * commands' results come back through the backlog */
	struct qb_nbd *nbd[QB_MAX_REPLICAS];
	bool has_nbd;
	uint64_t drive_at;	/* a reaper's next qb_nbd_drive (ns) */

	qb_done_fn done;
	void *done_arg;
	qb_foreign_fn foreign;
	void *foreign_arg;
	/* held by the synchronous entry points (qb_ctx_io, qb_ctx_sync,
	 * qb_ctx_bench, qb_ctx_poll): while it is free and nothing is in
	 * flight, another thread may reap the context's late completions */
	pthread_mutex_t entry;
};

static inline uint32_t slot_no(const struct qb_ctx *c, const struct qb_slot *s)
{
	return (uint32_t)(s - c->slots);
}

/* engine.c */
/* A result kept for the loop, handled as a CQE with this user_data. */
void qb_ctx_keep(struct qb_ctx *c, uint64_t ud, int32_t res);
void qb_begin_phase(struct qb_slot *s, int phase);
void qb_end_issue(struct qb_ctx *c, struct qb_slot *s);
void qb_finish(struct qb_ctx *c, struct qb_slot *s, int res, int kind,
	       void *out);
void qb_defer(struct qb_ctx *c, struct qb_slot *s);
void qb_read_from(struct qb_ctx *c, struct qb_slot *s, uint32_t mask,
		  int phase);
uint32_t qb_vote_blocks(struct qb_ctx *c, struct qb_slot *s, uint32_t mask,
			uint32_t thr);
uint32_t qb_assemble(struct qb_ctx *c, struct qb_slot *s);
void qb_add_run(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		uint32_t from, uint32_t to);
void qb_report(struct qb_ctx *c, struct qb_slot *s, uint32_t type, int r,
	       uint32_t from, uint32_t to);
void qb_block_span(struct qb_ctx *c, struct qb_slot *s, uint32_t i,
		   uint32_t *rel, uint32_t *len);
uint32_t qb_blocks_of(struct qb_quorum *q, uint64_t off, uint64_t len);
void qb_launch(struct qb_ctx *c, struct qb_slot *s, uint32_t op,
	       uint32_t flags, uint64_t offset, uint32_t length, void *src);
/* One replica I/O's result: counts, fails the replica on an error. */
void qb_io_result(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		  uint32_t kind, int res, uint32_t want, uint64_t off);

/* issue.c */
/* Queue one replica I/O (kind K_*, run index idx); a fault may replace or
 * delay it, a memory file system's is done here and now. */
void qb_issue(struct qb_ctx *c, struct qb_slot *s, uint32_t r, uint32_t kind,
	      uint32_t idx, uint32_t op, void *buf, uint64_t off,
	      uint32_t len);
/* The part [*off, *off + *len) of the slot's K_IO on replica r that chunk
 * idx covers (the whole step when it is not split). */
void qb_chunk_span(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		   uint32_t idx, uint64_t *off, uint32_t *len);
/* Discard and write-zeroes of the step on replica r, the way r zeroes. */
void qb_zero_start(struct qb_ctx *c, struct qb_slot *s, uint32_t r);
/* After a K_ZERO write: the next, or false when the step is done. */
bool qb_zero_next(struct qb_ctx *c, struct qb_slot *s, uint32_t r);
/* A refused fallocate: true if another way of zeroing was started. */
bool qb_zero_fallback(struct qb_ctx *c, struct qb_slot *s, uint32_t r);
uint32_t qb_zero_want(struct qb_ctx *c, struct qb_slot *s, uint32_t r);
void qb_arm_tick(struct qb_ctx *c);

/* sync.c */
void qb_start_sync(struct qb_ctx *c, struct qb_slot *s, uint32_t live);
void qb_sync_voted(struct qb_ctx *c, struct qb_slot *s);

/* hold.c: the generation table. A read notes its blocks' words (snapshot);
 * a repair holds a block only if unchanged since; a write holds its blocks
 * (a new generation) unless a repair or sync holds one; a sync holds its
 * blocks only while no write is in flight on them. */
void qb_hold_snapshot(struct qb_quorum *q, uint64_t b0, uint32_t n,
		      uint64_t *snap);
bool qb_hold_unchanged(struct qb_quorum *q, uint64_t block, uint64_t snap);
bool qb_hold_repair(struct qb_quorum *q, uint64_t block, uint64_t snap);
void qb_hold_release(struct qb_quorum *q, uint64_t b0, uint32_t n,
		     uint8_t *held);
bool qb_hold_sync(struct qb_quorum *q, uint64_t b0, uint32_t n,
		  uint8_t *held);
bool qb_hold_writers(struct qb_quorum *q, uint64_t b0, uint32_t n);
void qb_release_writers(struct qb_quorum *q, uint64_t b0, uint32_t n);

static inline uint64_t qb_first_block(const struct qb_quorum *q, uint64_t off)
{
	return off >> q->vote_shift;
}

#endif
