/*
 * engine.c: one thread's request engine on its own io_uring.
 *
 * A request lives in a slot. It goes out as one I/O per in-service replica,
 * all queued on the ring and submitted together, and moves through phases as
 * the last I/O of a phase completes (slot->pending counts them down):
 *
 *   read:  READ -> (READ_MORE: policy threshold or fifo needs more copies)
 *                -> vote -> (REPAIR: rewrite losing blocks) -> done
 *   write, discard, write-zeroes, flush: one phase -> done
 *   sync:  (hold the blocks) -> SYNC: read voters and targets -> vote
 *                -> (SYNC_WRITE: losers and targets get the winner) -> done
 *
 * CQE user_data: slot (16) | slot generation (16) | kind (4) | replica (5) |
 * index (12), or QB_UD_FOREIGN for a front end's own commands. The generation
 * lets a late CQE of an abandoned (timed out) I/O be recognised and dropped.
 *
 * Repair never overwrites newer data: the quorum keeps a write generation per
 * vote block (bucket). A read notes the generations when it starts; a losing
 * block is rewritten only if no write started on it since and none is in
 * flight, and user writes wait (are deferred) while a repair of their blocks
 * is in flight, so the two never race on a replica.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <unistd.h>

#include "qb.h"

#define QB_MAX_RUNS 64		/* repair writes per request */
#define QB_RETRIES 2		/* re-reads when a vote met a racing write */

#define OP_SYNC 8		/* internal: qb_ctx_sync's chunks */
#define WIN_NO_QUORUM (1u << 31)	/* sync: the block had no quorum */
#define WIN_DIFFER (1u << 30)	/* sync: some copy of the block differed */

enum phase {
	PH_FREE, PH_READ, PH_READ_MORE, PH_REPAIR, PH_MODIFY, PH_FLUSH,
	PH_SYNC, PH_SYNC_WRITE,
};
/* K_REPAIR rewrites a losing voter (a "repaired" event), K_COPY a target */
enum kind { K_IO, K_REPAIR, K_ZERO, K_TICK, K_IGNORE, K_COPY };
enum zero_mode { ZM_FALLOC, ZM_PUNCH, ZM_WRITE };

struct run {
	uint64_t off;		/* device offset */
	uint32_t len;
	uint32_t rel;		/* offset in the request buffer */
};

struct qb_slot {
	uint16_t gen;
	uint8_t op, flags, phase, retries, err_kind;
	bool deferred;
	bool incomplete;	/* sync: more runs than fit; do it again */
	bool again;		/* sync: that second pass (counted already) */
	uint8_t sync_flags;	/* enum qb_sync_flags */
	uint32_t targets;	/* sync: replicas that get the winner */
	uint32_t len;
	uint64_t off;
	void *src;
	int result;
	void *out;

	uint32_t pending;	/* I/Os out in this phase, plus a guard */
	uint32_t nout[QB_MAX_REPLICAS];	/* per replica */
	uint32_t dropped;	/* replicas abandoned: CQEs to ignore */
	uint32_t tried;		/* replicas asked in this request */
	uint32_t ok;		/* replicas that succeeded */
	uint32_t bad;		/* replicas with a failed I/O in this request */
	uint64_t phase_start;
	uint64_t zoff[QB_MAX_REPLICAS];	/* write-zeroes by writing, progress */
	struct __kernel_timespec delay[QB_MAX_REPLICAS];

	uint32_t nblocks;	/* vote blocks in the request */
	uint64_t *snap;		/* bucket words at read start */
	uint32_t *win;		/* winning class per block */
	uint8_t *held;		/* block held for repair */
	struct run runs[QB_MAX_RUNS];
	uint32_t nruns;
	uint8_t run_rep[QB_MAX_RUNS];

	void *buf[QB_MAX_REPLICAS];
	struct qb_slot *next_deferred;
	struct qb_slot *next_ready;
};

struct qb_ctx {
	struct qb_quorum *q;
	struct qb_ctx *next;	/* in q->ctxs */
	struct io_uring ring;
	bool ring_ok;
	uint32_t depth;
	uint32_t inflight;
	uint32_t rr;		/* rotation for policy threshold */
	struct qb_slot *slots;
	char *bufmem;		/* every slot's buffers, one mapping */
	bool abandoned;		/* a read was abandoned into a buffer */
	struct qb_slot *deferred;
	struct qb_slot *ready;	/* phases that ended while being issued */
	uint32_t max_blocks;

	bool tick_armed;
	struct __kernel_timespec tick;
	uint32_t files_gen;	/* q->files_gen of the registered files */
	struct qb_sync_result *sync_res;	/* qb_ctx_sync's, while it runs */

	qb_done_fn done;
	void *done_arg;
	qb_foreign_fn foreign;
	void *foreign_arg;

	struct qb_counters dev, rep[QB_MAX_REPLICAS];
};

static void phase_done(struct qb_ctx *c, struct qb_slot *s);
static void start_request(struct qb_ctx *c, struct qb_slot *s);

static inline uint64_t ud_make(uint32_t slot, uint16_t gen, uint32_t kind,
			       uint32_t r, uint32_t idx)
{
	return (uint64_t)slot | (uint64_t)gen << 16 | (uint64_t)kind << 32 |
	       (uint64_t)r << 36 | (uint64_t)idx << 41;
}

static inline uint32_t ud_slot(uint64_t ud) { return ud & 0xffff; }
static inline uint16_t ud_gen(uint64_t ud) { return (ud >> 16) & 0xffff; }
static inline uint32_t ud_kind(uint64_t ud) { return (ud >> 32) & 0xf; }
static inline uint32_t ud_rep(uint64_t ud) { return (ud >> 36) & 0x1f; }
static inline uint32_t ud_idx(uint64_t ud) { return (ud >> 41) & 0xfff; }

static inline uint32_t slot_no(struct qb_ctx *c, struct qb_slot *s)
{
	return (uint32_t)(s - c->slots);
}

struct io_uring_sqe *qb_ctx_sqe(struct qb_ctx *c)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);

	if (!sqe) {
		io_uring_submit(&c->ring);
		sqe = io_uring_get_sqe(&c->ring);
	}
	return sqe;
}

uint32_t qb_ctx_inflight(const struct qb_ctx *c)
{
	return c->inflight;
}

void qb_ctx_set_done(struct qb_ctx *c, qb_done_fn fn, void *arg)
{
	c->done = fn;
	c->done_arg = arg;
}

void qb_ctx_set_foreign(struct qb_ctx *c, qb_foreign_fn fn, void *arg)
{
	c->foreign = fn;
	c->foreign_arg = arg;
}

void *qb_ctx_buf(struct qb_ctx *c, uint32_t slot, uint32_t replica)
{
	if (slot >= c->depth || replica >= qb_replicas(c->q))
		return NULL;
	return c->slots[slot].buf[replica];
}

/* ---- vote-block buckets ---- */

static inline uint64_t *bucket(struct qb_quorum *q, uint64_t block)
{
	return &q->gens[block & (QB_GEN_BUCKETS - 1)];
}

static inline uint64_t first_block(struct qb_quorum *q, uint64_t off)
{
	return off / q->opt.vote_block;
}

static uint32_t blocks_of(struct qb_quorum *q, uint64_t off, uint64_t len)
{
	uint64_t vb = q->opt.vote_block;

	return (uint32_t)((off + len + vb - 1) / vb - off / vb);
}

static void snapshot(struct qb_ctx *c, struct qb_slot *s)
{
	uint64_t b0 = first_block(c->q, s->off);

	for (uint32_t i = 0; i < s->nblocks; i++) {
		uint64_t w = __atomic_load_n(bucket(c->q, b0 + i),
					     __ATOMIC_ACQUIRE);

		s->snap[i] = (QB_WRITERS(w) || QB_REPAIRING(w)) ?
			     QB_SNAP_INVALID : (w & QB_GEN_MASK);
	}
}

/* True when no write touched block i since the read started. */
static bool block_unchanged(struct qb_ctx *c, struct qb_slot *s, uint32_t i)
{
	uint64_t w = __atomic_load_n(bucket(c->q, first_block(c->q, s->off) + i),
				     __ATOMIC_ACQUIRE);

	return s->snap[i] != QB_SNAP_INVALID && !QB_WRITERS(w) &&
	       (w & QB_GEN_MASK) == s->snap[i];
}

/* Hold block i for a repair: only if unchanged since the read started. */
static bool repair_hold(struct qb_ctx *c, struct qb_slot *s, uint32_t i)
{
	uint64_t *b = bucket(c->q, first_block(c->q, s->off) + i);
	uint64_t w = __atomic_load_n(b, __ATOMIC_ACQUIRE);

	do {
		if (s->snap[i] == QB_SNAP_INVALID || QB_WRITERS(w) ||
		    (w & QB_GEN_MASK) != s->snap[i])
			return false;
	} while (!__atomic_compare_exchange_n(b, &w, w + QB_REPAIR_ONE, true,
					      __ATOMIC_ACQ_REL,
					      __ATOMIC_ACQUIRE));
	s->held[i] = 1;
	return true;
}

static void repair_release(struct qb_ctx *c, struct qb_slot *s)
{
	uint64_t b0 = first_block(c->q, s->off);

	for (uint32_t i = 0; i < s->nblocks; i++) {
		if (!s->held[i])
			continue;
		__atomic_fetch_sub(bucket(c->q, b0 + i), QB_REPAIR_ONE,
				   __ATOMIC_ACQ_REL);
		s->held[i] = 0;
	}
}

/* Hold every block of a sync against writers, only while none is in flight
 * on them (new ones wait until the sync releases them). Fails with nothing
 * held. */
static bool sync_hold(struct qb_ctx *c, struct qb_slot *s)
{
	uint64_t b0 = first_block(c->q, s->off);

	for (uint32_t i = 0; i < s->nblocks; i++) {
		uint64_t *b = bucket(c->q, b0 + i);
		uint64_t w = __atomic_load_n(b, __ATOMIC_ACQUIRE);

		do {
			if (QB_WRITERS(w)) {
				repair_release(c, s);
				return false;
			}
		} while (!__atomic_compare_exchange_n(b, &w, w + QB_REPAIR_ONE,
						      true, __ATOMIC_ACQ_REL,
						      __ATOMIC_ACQUIRE));
		s->held[i] = 1;
	}
	return true;
}

static void writers_release(struct qb_ctx *c, uint64_t b0, uint32_t nb)
{
	for (uint32_t i = 0; i < nb; i++)
		__atomic_fetch_sub(bucket(c->q, b0 + i), QB_WRITER_ONE,
				   __ATOMIC_ACQ_REL);
}

/* Mark the request's blocks as being written (new generation). Fails, with
 * nothing held, while a repair of one of them is in flight. */
static bool writers_hold(struct qb_ctx *c, struct qb_slot *s)
{
	uint64_t b0 = first_block(c->q, s->off);
	uint32_t nb = blocks_of(c->q, s->off, s->len);

	if (nb > QB_GEN_BUCKETS)
		nb = QB_GEN_BUCKETS;
	for (uint32_t i = 0; i < nb; i++) {
		uint64_t *b = bucket(c->q, b0 + i);
		uint64_t w = __atomic_load_n(b, __ATOMIC_ACQUIRE), nw;

		do {
			if (QB_REPAIRING(w)) {
				writers_release(c, b0, i);
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

static void writers_done(struct qb_ctx *c, struct qb_slot *s)
{
	uint32_t nb = blocks_of(c->q, s->off, s->len);

	writers_release(c, first_block(c->q, s->off),
			nb > QB_GEN_BUCKETS ? QB_GEN_BUCKETS : nb);
}

/* ---- issuing replica I/O ---- */

static void arm_tick(struct qb_ctx *c)
{
	struct io_uring_sqe *sqe;

	if (c->tick_armed)
		return;
	sqe = qb_ctx_sqe(c);
	io_uring_prep_timeout(sqe, &c->tick, 0, 0);
	sqe->user_data = ud_make(0, 0, K_TICK, 0, 0);
	c->tick_armed = true;
}

static void io_result(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		      uint32_t kind, int res, uint32_t want, uint64_t off);
static bool chunked(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		    uint32_t kind);
static void issue_chunks(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
			 uint32_t op, char *buf);

static void count_replica_io(struct qb_ctx *c, uint32_t r, uint32_t op,
			     uint32_t len)
{
	struct qb_counters *k = &c->rep[r];

	switch (op) {
	case QB_OP_READ:
		QB_ADD(k->reads, 1);
		QB_ADD(k->read_bytes, len);
		break;
	case QB_OP_WRITE:
		QB_ADD(k->writes, 1);
		QB_ADD(k->write_bytes, len);
		break;
	case QB_OP_FLUSH:
		QB_ADD(k->flushes, 1);
		break;
	case QB_OP_DISCARD:
		QB_ADD(k->discards, 1);
		break;
	default:
		QB_ADD(k->write_zeroes, 1);
	}
}

/* Discard and write-zeroes are fallocate calls; this mode. */
static int zero_mode(struct qb_quorum *q, uint32_t r, uint32_t op)
{
	if (op == QB_OP_WRITE_ZEROES &&
	    __atomic_load_n(&q->rep[r].zero_mode, __ATOMIC_RELAXED) == ZM_FALLOC)
		return FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE;
	return FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;
}

/*
 * A replica on tmpfs or ramfs: its reads and writes are memory copies that
 * never wait, and the kernel gives io_uring no non-blocking try for them, so
 * the ring would hand every one to a worker thread (a wake-up and a context
 * switch each, measured at twice the CPU of the copy). Done here instead.
 */
static int sync_io(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		   uint32_t op, void *buf, uint64_t off, uint32_t len)
{
	int fd = c->q->rep[r].fd;
	struct iovec iov = { .iov_base = buf, .iov_len = len };
	ssize_t ret;

	switch (op) {
	case QB_OP_READ:
		ret = pread(fd, buf, len, (off_t)off);
		break;
	case QB_OP_WRITE:
		ret = pwritev2(fd, &iov, 1, (off_t)off,
			       (s->flags & QB_REQ_FUA) ? RWF_DSYNC : 0);
		break;
	case QB_OP_FLUSH:
		ret = fdatasync(fd);
		break;
	default:
		ret = fallocate(fd, zero_mode(c->q, r, op), (off_t)off,
				(off_t)len);
	}
	return ret < 0 ? -errno : (int)ret;
}

/* Queue one replica I/O; an injected fault may replace it. */
static void issue(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		  uint32_t kind, uint32_t idx, uint32_t op, void *buf,
		  uint64_t off, uint32_t len)
{
	struct qb_quorum *q = c->q;
	struct io_uring_sqe *sqe;
	struct qb_fault f = { .kind = QB_FAULT_NONE };
	uint64_t ud = ud_make(slot_no(c, s), s->gen, kind, r, idx);

	if (qb_fault_match(q, r, op, off, len ? len : 1, &f)) {
		if (f.kind == QB_FAULT_EIO) {
			io_result(c, s, r, kind, -EIO, len, off);
			return;
		}
		sqe = qb_ctx_sqe(c);
		if (f.kind == QB_FAULT_HANG) {
			io_uring_prep_poll_add(sqe, q->hang_fd, POLLIN);
			sqe->user_data = ud;
			goto queued;
		}
		s->delay[r].tv_sec = f.delay_ms / 1000;
		s->delay[r].tv_nsec = (long long)(f.delay_ms % 1000) * 1000000;
		io_uring_prep_timeout(sqe, &s->delay[r], 0,
				      IORING_TIMEOUT_ETIME_SUCCESS);
		sqe->flags |= IOSQE_IO_LINK;
		sqe->user_data = ud_make(0, 0, K_IGNORE, 0, 0);
	}

	count_replica_io(c, r, op, len);
	if (q->rep[r].memory_fs && !f.kind) {
		io_result(c, s, r, kind, sync_io(c, s, r, op, buf, off, len),
			  len, off);
		return;
	}
	if (!f.kind && chunked(c, s, r, kind)) {
		issue_chunks(c, s, r, op, buf);
		return;
	}
	sqe = qb_ctx_sqe(c);
	switch (op) {
	case QB_OP_READ:
		io_uring_prep_read(sqe, (int)r, buf, len, off);
		break;
	case QB_OP_WRITE:
		io_uring_prep_write(sqe, (int)r, buf, len, off);
		if (s->flags & QB_REQ_FUA)
			sqe->rw_flags = RWF_DSYNC;
		break;
	case QB_OP_FLUSH:
		io_uring_prep_fsync(sqe, (int)r, IORING_FSYNC_DATASYNC);
		break;
	default:
		io_uring_prep_fallocate(sqe, (int)r, zero_mode(q, r, op), off,
					len);
		break;
	}
	sqe->flags |= IOSQE_FIXED_FILE;
	sqe->user_data = ud;
queued:
	s->nout[r]++;
	s->pending++;
	arm_tick(c);
}

/* A slot's buffer for replica r that the kernel may still write into after
 * a timeout: give it up (never reused, never unmapped) and take a fresh one.
 * This happens at most once per replica and slot (the replica is out). */
static void replace_buf(struct qb_ctx *c, struct qb_slot *s, uint32_t r)
{
	void *p = mmap(NULL, c->q->opt.max_io, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	c->abandoned = true;
	if (p != MAP_FAILED)
		s->buf[r] = p;
}

static void fail_replica(struct qb_ctx *c, uint32_t r, int err, uint64_t off,
			 uint64_t len)
{
	QB_ADD(c->rep[r].errors, 1);
	qb_replica_fail(c->q, r, -err, off, len);
}

/* Write-zeroes the slow way: zeros from q->zeros, one chunk at a time. */
static void zero_next(struct qb_ctx *c, struct qb_slot *s, uint32_t r)
{
	uint64_t left = s->off + s->len - s->zoff[r];
	uint32_t len = left > c->q->opt.max_io ? c->q->opt.max_io :
			(uint32_t)left;

	issue(c, s, r, K_ZERO, 0, QB_OP_WRITE, c->q->zeros, s->zoff[r], len);
}

/* Fallocate was refused: step down to the next way of zeroing. */
static bool zero_fallback(struct qb_ctx *c, struct qb_slot *s, uint32_t r)
{
	struct qb_replica *rep = &c->q->rep[r];
	int mode = __atomic_load_n(&rep->zero_mode, __ATOMIC_RELAXED);

	if (s->op == QB_OP_DISCARD || mode == ZM_PUNCH) {
		/* punching holes is what failed: write zeros */
		__atomic_store_n(&rep->zero_mode, ZM_WRITE, __ATOMIC_RELAXED);
	} else if (mode == ZM_FALLOC) {
		__atomic_store_n(&rep->zero_mode, ZM_PUNCH, __ATOMIC_RELAXED);
		issue(c, s, r, K_IO, 0, s->op, NULL, s->off, s->len);
		return true;
	}
	s->zoff[r] = s->off;
	zero_next(c, s, r);
	return true;
}

static void io_result(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		      uint32_t kind, int res, uint32_t want, uint64_t off)
{
	bool rw = s->op == QB_OP_READ || s->op == QB_OP_WRITE ||
		  s->op == OP_SYNC || kind != K_IO;

	if (kind == K_IO && res < 0 && (res == -EOPNOTSUPP || res == -EINVAL) &&
	    (s->op == QB_OP_DISCARD || s->op == QB_OP_WRITE_ZEROES) &&
	    zero_fallback(c, s, r))
		return;
	if (res >= 0 && rw && (uint32_t)res != want)
		res = -EIO;	/* a short read or write is an error */
	if (res < 0) {
		if (res == -ECANCELED)
			res = -ETIMEDOUT;
		fail_replica(c, r, res, off, want);
		s->bad |= 1u << r;
		s->ok &= ~(1u << r);
		return;
	}
	switch (kind) {
	case K_ZERO:
		s->zoff[r] += want;
		if (s->zoff[r] < s->off + s->len) {
			zero_next(c, s, r);
			return;
		}
		break;
	case K_REPAIR:
		QB_ADD(c->rep[r].repairs, want / c->q->opt.vote_block);
		QB_ADD(c->dev.repairs, want / c->q->opt.vote_block);
		qb_event(c->q, QB_EV_REPAIRED, (int)r, off, want, 0);
		return;
	case K_COPY:
		return;
	}
	if (!(s->bad & (1u << r)))
		s->ok |= 1u << r;
}

/* A request's read or write as chunks its replica takes whole: chunk i
 * covers [i * chunk, (i + 1) * chunk) of it. */
static bool chunked(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		    uint32_t kind)
{
	uint32_t chunk = c->q->rep[r].chunk;

	return kind == K_IO && chunk && s->len > chunk &&
	       (s->op == QB_OP_READ || s->op == QB_OP_WRITE ||
		s->op == OP_SYNC);
}

static void issue_chunks(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
			 uint32_t op, char *buf)
{
	uint32_t chunk = c->q->rep[r].chunk;

	for (uint32_t i = 0, pos = 0; pos < s->len; i++, pos += chunk) {
		struct io_uring_sqe *sqe = qb_ctx_sqe(c);
		uint32_t len = s->len - pos < chunk ? s->len - pos : chunk;

		if (op == QB_OP_READ) {
			io_uring_prep_read(sqe, (int)r, buf + pos, len,
					   s->off + pos);
		} else {
			io_uring_prep_write(sqe, (int)r, buf + pos, len,
					    s->off + pos);
			if (s->flags & QB_REQ_FUA)
				sqe->rw_flags = RWF_DSYNC;
		}
		sqe->flags |= IOSQE_FIXED_FILE;
		sqe->user_data = ud_make(slot_no(c, s), s->gen, K_IO, r, i);
		s->nout[r]++;
		s->pending++;
	}
	arm_tick(c);
}

static void io_cqe(struct qb_ctx *c, uint64_t ud, int res)
{
	struct qb_slot *s = &c->slots[ud_slot(ud)];
	uint32_t r = ud_rep(ud), kind = ud_kind(ud), want = s->len;
	uint64_t off = s->off;

	if (s->phase == PH_FREE || s->gen != ud_gen(ud) ||
	    (s->dropped & (1u << r)))
		return;		/* an abandoned I/O */
	s->nout[r]--;
	if (kind == K_REPAIR || kind == K_COPY) {
		want = s->runs[ud_idx(ud)].len;
		off = s->runs[ud_idx(ud)].off;
	} else if (kind == K_ZERO) {
		uint64_t left = s->off + s->len - s->zoff[r];

		want = left > c->q->opt.max_io ? c->q->opt.max_io :
		       (uint32_t)left;
		off = s->zoff[r];
	} else if (s->op == QB_OP_FLUSH) {
		want = 0;
	} else if (chunked(c, s, r, kind)) {
		uint32_t chunk = c->q->rep[r].chunk, pos = ud_idx(ud) * chunk;

		want = s->len - pos < chunk ? s->len - pos : chunk;
		off = s->off + pos;
	}
	io_result(c, s, r, kind, res, want, off);
	if (--s->pending == 0)
		phase_done(c, s);
}

/* The replica timeout: I/Os out longer than it are abandoned, their
 * replicas taken out of service. */
static void tick(struct qb_ctx *c)
{
	uint64_t now = qb_now_ns();
	uint64_t limit = (uint64_t)c->q->opt.timeout_ms * 1000000ULL;

	c->tick_armed = false;
	for (uint32_t i = 0; i < c->depth; i++) {
		struct qb_slot *s = &c->slots[i];

		if (s->phase == PH_FREE || s->deferred ||
		    now - s->phase_start < limit)
			continue;
		for (uint32_t r = 0; r < c->q->n; r++) {
			struct io_uring_sqe *sqe;

			if (!s->nout[r])
				continue;
			sqe = qb_ctx_sqe(c);
			io_uring_prep_cancel64(sqe, ud_make(i, s->gen, K_IO,
							    r, 0), 0);
			sqe->user_data = ud_make(0, 0, K_IGNORE, 0, 0);
			if (s->phase == PH_READ || s->phase == PH_READ_MORE ||
			    s->phase == PH_SYNC)
				replace_buf(c, s, r);
			s->dropped |= 1u << r;
			s->pending -= s->nout[r];
			s->nout[r] = 0;
			QB_ADD(c->rep[r].timeouts, 1);
			QB_ADD(c->dev.timeouts, 1);
			fail_replica(c, r, -ETIMEDOUT, s->off, s->len);
		}
		if (s->pending == 0)
			phase_done(c, s);
	}
	if (c->inflight)
		arm_tick(c);
}

/* ---- requests ---- */

static void finish(struct qb_ctx *c, struct qb_slot *s, int res, int kind,
		   void *out)
{
	s->phase = PH_FREE;
	s->result = res;
	s->err_kind = (uint8_t)kind;
	s->out = out;
	c->inflight--;
	if (res < 0)
		QB_ADD(c->dev.errors, 1);
	if (c->done)
		c->done(c, slot_no(c, s), res, out, c->done_arg);
}

static void begin_phase(struct qb_slot *s, int phase)
{
	s->phase = (uint8_t)phase;
	s->pending = 1;		/* guard: the phase cannot end while issuing */
	s->phase_start = qb_now_ns();
}

/* A phase whose I/Os all ended while it was issued (in-thread I/O, faults)
 * moves on from the loop, not from here: submitting never completes a
 * request inside the caller's own call. */
static void end_issue(struct qb_ctx *c, struct qb_slot *s)
{
	if (--s->pending == 0) {
		s->next_ready = c->ready;
		c->ready = s;
	}
}

static bool run_ready(struct qb_ctx *c)
{
	bool any = c->ready != NULL;

	while (c->ready) {
		struct qb_slot *s = c->ready;

		c->ready = s->next_ready;
		phase_done(c, s);
	}
	return any;
}

static void read_from(struct qb_ctx *c, struct qb_slot *s, uint32_t mask,
		      int phase)
{
	begin_phase(s, phase);
	s->tried |= mask;
	for (uint32_t r = 0; mask; r++, mask >>= 1)
		if (mask & 1)
			issue(c, s, r, K_IO, 0, QB_OP_READ, s->buf[r], s->off,
			      s->len);
	end_issue(c, s);
}

/* The first k replicas of mask, counting from replica `from`, wrapping. */
static uint32_t pick(uint32_t mask, uint32_t n, uint32_t from, uint32_t k)
{
	uint32_t out = 0;

	for (uint32_t i = 0; i < n && k; i++) {
		uint32_t r = (from + i) % n;

		if (mask & (1u << r)) {
			out |= 1u << r;
			k--;
		}
	}
	return out;
}

static void start_read(struct qb_ctx *c, struct qb_slot *s, uint32_t live)
{
	struct qb_quorum *q = c->q;
	uint32_t mask = live;

	s->nblocks = blocks_of(q, s->off, s->len);
	snapshot(c, s);
	if (q->opt.read_policy == QB_READ_THRESHOLD)
		mask = pick(live, q->n, c->rr++ % q->n, q->opt.threshold);
	else if (q->opt.read_policy == QB_READ_FIFO)
		mask = pick(live, q->n, 0, 1);
	read_from(c, s, mask, PH_READ);
}

/*
 * A replica attached since this ring registered its files: register it
 * here, in the ring's own thread. Called after loading a replica mask: the
 * attach bumps files_gen before it sets the replica's bit in any mask.
 */
static void sync_files(struct qb_ctx *c)
{
	struct qb_quorum *q = c->q;
	uint32_t gen = __atomic_load_n(&q->files_gen, __ATOMIC_ACQUIRE);
	int fds[QB_MAX_REPLICAS];

	if (gen == c->files_gen)
		return;
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		fds[r] = r < qb_replicas(q) ? q->rep[r].fd : -1;
	if (io_uring_register_files_update(&c->ring, 0, fds,
					   QB_MAX_REPLICAS) >= 0)
		c->files_gen = gen;
}

/* Its blocks are held by another request: start it again later. */
static void defer(struct qb_ctx *c, struct qb_slot *s)
{
	s->deferred = true;
	s->next_deferred = c->deferred;
	c->deferred = s;
}

static void start_sync(struct qb_ctx *c, struct qb_slot *s, uint32_t live)
{
	struct qb_quorum *q = c->q;
	uint32_t need = (s->sync_flags & QB_SYNC_PLURALITY) ? 1 :
			q->opt.threshold;
	uint32_t mask = live;

	if (qb_popcount(live) < need) {
		finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	}
	s->nblocks = blocks_of(q, s->off, s->len);
	s->incomplete = false;
	if (!sync_hold(c, s)) {
		defer(c, s);
		return;
	}
	s->targets &= qb_writable(q) & ~live;
	if (!(s->sync_flags & QB_SYNC_BLIND))
		mask |= s->targets;
	read_from(c, s, mask, PH_SYNC);
}

static void start_request(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;
	uint32_t live = qb_in_service(q);

	sync_files(c);

	s->ok = s->tried = s->dropped = s->bad = 0;
	memset(s->nout, 0, sizeof(s->nout));
	if (s->op == OP_SYNC) {
		start_sync(c, s, live);
		return;
	}
	if (qb_popcount(live) < q->opt.threshold) {
		finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	}
	if (s->op == QB_OP_READ) {
		start_read(c, s, live);
		return;
	}
	if (s->op == QB_OP_FLUSH) {
		uint32_t wr = qb_writable(q);

		sync_files(c);
		begin_phase(s, PH_FLUSH);
		for (uint32_t r = 0; r < q->n; r++)
			if (wr & (1u << r))
				issue(c, s, r, K_IO, 0, QB_OP_FLUSH, NULL, 0, 0);
		end_issue(c, s);
		return;
	}
	if (!writers_hold(c, s)) {	/* a repair is rewriting these blocks */
		defer(c, s);
		return;
	}
	if (q->wil)	/* the regions are marked dirty on stable storage */
		qb_wil_begin(q, s->off, s->len);
	live = qb_writable(q);	/* resyncing replicas get writes too */
	sync_files(c);
	begin_phase(s, PH_MODIFY);
	for (uint32_t r = 0; r < q->n; r++) {
		if (!(live & (1u << r)))
			continue;
		if (s->op != QB_OP_WRITE &&
		    __atomic_load_n(&q->rep[r].zero_mode, __ATOMIC_RELAXED) ==
		    ZM_WRITE) {
			s->zoff[r] = s->off;
			zero_next(c, s, r);
		} else {
			issue(c, s, r, K_IO, 0, s->op, s->src, s->off, s->len);
		}
	}
	end_issue(c, s);
}

static void retry_deferred(struct qb_ctx *c)
{
	struct qb_slot *list = c->deferred;

	c->deferred = NULL;
	while (list) {
		struct qb_slot *s = list;

		list = s->next_deferred;
		s->deferred = false;
		start_request(c, s);
	}
}

/* Report a run of blocks [from, to) of a request. */
static void report(struct qb_ctx *c, struct qb_slot *s, uint32_t type, int r,
		   uint32_t from, uint32_t to)
{
	uint64_t vb = c->q->opt.vote_block;
	uint64_t start = (first_block(c->q, s->off) + from) * vb;
	uint64_t end = (first_block(c->q, s->off) + to) * vb;

	if (start < s->off)
		start = s->off;
	if (end > s->off + s->len)
		end = s->off + s->len;
	qb_event(c->q, type, r, start, end - start, type ==
		 QB_EV_QUORUM_FAILURE ? EIO : 0);
}

/* Block i of the request as [*rel, *rel + *len) of its buffer. */
static void block_span(struct qb_ctx *c, struct qb_slot *s, uint32_t i,
		       uint32_t *rel, uint32_t *len)
{
	uint64_t vb = c->q->opt.vote_block;
	uint64_t start = (first_block(c->q, s->off) + i) * vb;
	uint64_t end = start + vb;

	if (start < s->off)
		start = s->off;
	if (end > s->off + s->len)
		end = s->off + s->len;
	*rel = (uint32_t)(start - s->off);
	*len = (uint32_t)(end - start);
}

/* A quorum-failure event for every run of blocks marked WIN_NO_QUORUM. */
static void report_no_quorum(struct qb_ctx *c, struct qb_slot *s)
{
	int from = -1;

	for (uint32_t i = 0; i <= s->nblocks; i++) {
		bool nq = i < s->nblocks && (s->win[i] & WIN_NO_QUORUM);

		if (nq && from < 0)
			from = (int)i;
		if (!nq && from >= 0) {
			report(c, s, QB_EV_QUORUM_FAILURE, -1, (uint32_t)from, i);
			from = -1;
		}
	}
}

/* Vote each block over the voters in mask, at least thr of them agreeing;
 * blocks without quorum are marked and reported. Returns how many. */
static uint32_t vote_blocks(struct qb_ctx *c, struct qb_slot *s,
			    uint32_t mask, uint32_t thr)
{
	struct qb_quorum *q = c->q;
	const void *bufs[QB_MAX_REPLICAS];
	uint32_t nq = 0;

	for (uint32_t i = 0; i < s->nblocks; i++) {
		uint32_t rel, len;

		block_span(c, s, i, &rel, &len);
		for (uint32_t r = 0; r < q->n; r++)
			bufs[r] = (mask & (1u << r)) ?
				  (char *)s->buf[r] + rel : NULL;
		if (qb_vote(bufs, q->n, len, thr, q->opt.hash, &s->win[i]) < 0) {
			s->win[i] |= WIN_NO_QUORUM;
			nq++;
		}
	}
	if (nq)
		report_no_quorum(c, s);
	return nq;
}

static bool raced(struct qb_ctx *c, struct qb_slot *s)
{
	for (uint32_t i = 0; i < s->nblocks; i++)
		if (!block_unchanged(c, s, i))
			return true;
	return false;
}

/* Put the winning copy of every block into the base buffer (a copy only
 * where the base replica lost that block). */
static uint32_t assemble(struct qb_ctx *c, struct qb_slot *s)
{
	uint32_t base = (uint32_t)__builtin_ctz(s->win[0]);

	for (uint32_t i = 1; i < s->nblocks; i++) {
		uint32_t rel, len, from;

		if (s->win[i] & (1u << base))
			continue;
		block_span(c, s, i, &rel, &len);
		from = (uint32_t)__builtin_ctz(s->win[i]);
		memcpy((char *)s->buf[base] + rel, (char *)s->buf[from] + rel,
		       len);
	}
	return base;
}

static void add_run(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		    uint32_t from, uint32_t to)
{
	uint32_t rel, len, last_rel, last_len;
	struct run *run;

	if (s->nruns == QB_MAX_RUNS)
		return;		/* the rest waits for another read */
	block_span(c, s, from, &rel, &len);
	block_span(c, s, to - 1, &last_rel, &last_len);
	run = &s->runs[s->nruns];
	run->rel = rel;
	run->off = s->off + rel;
	run->len = last_rel + last_len - rel;
	s->run_rep[s->nruns++] = (uint8_t)r;
}

/* Report losing blocks per replica and plan their repair. */
static void losers(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;

	s->nruns = 0;
	for (uint32_t r = 0; r < q->n; r++) {
		uint32_t bit = 1u << r, from = 0;
		bool in_run = false;

		if (!(s->ok & bit))
			continue;
		for (uint32_t i = 0; i <= s->nblocks; i++) {
			bool lose = i < s->nblocks && !(s->win[i] & bit) &&
				    (s->held[i] || block_unchanged(c, s, i));

			if (lose && !in_run) {
				from = i;
				in_run = true;
			} else if (!lose && in_run) {
				in_run = false;
				report(c, s, QB_EV_BAD_BLOCK, (int)r, from, i);
				QB_ADD(c->rep[r].bad_blocks, i - from);
				QB_ADD(c->dev.bad_blocks, i - from);
				if (q->opt.repair)
					for (uint32_t j = from; j < i; j++)
						if (!s->held[j] && !repair_hold(c, s, j))
							goto skip;
				if (q->opt.repair)
					add_run(c, s, r, from, i);
skip:;
			}
		}
	}
}

static void vote_and_finish(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;
	uint32_t base;

	if (qb_popcount(s->ok) < q->opt.threshold) {
		finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	}
	if (qb_all_equal(s->buf, s->ok, s->len)) {
		finish(c, s, (int)s->len, 0,
		       s->buf[__builtin_ctz(s->ok)]);
		return;
	}
	if (vote_blocks(c, s, s->ok, q->opt.threshold)) {
		if (raced(c, s) && s->retries++ < QB_RETRIES) {
			s->gen++;	/* late CQEs of this attempt are stale */
			start_request(c, s);
			return;
		}
		QB_ADD(c->dev.quorum_failures, 1);
		finish(c, s, -EIO, QB_ERR_NO_QUORUM, NULL);
		return;
	}
	base = assemble(c, s);
	s->out = s->buf[base];
	losers(c, s);
	if (!s->nruns) {
		repair_release(c, s);
		finish(c, s, (int)s->len, 0, s->out);
		return;
	}
	begin_phase(s, PH_REPAIR);
	s->ok = 0;
	for (uint32_t i = 0; i < s->nruns; i++) {
		struct run *run = &s->runs[i];

		issue(c, s, s->run_rep[i], K_REPAIR, i, QB_OP_WRITE,
		      (char *)s->buf[base] + run->rel, run->off, run->len);
	}
	end_issue(c, s);
}

static void read_done(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;
	uint32_t more = qb_in_service(q) & ~s->tried;

	switch (q->opt.read_policy) {
	case QB_READ_FIFO:
		if (s->ok) {
			finish(c, s, (int)s->len, 0,
			       s->buf[__builtin_ctz(s->ok)]);
			return;
		}
		if (more) {
			read_from(c, s, pick(more, q->n, 0, 1), PH_READ_MORE);
			return;
		}
		finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	case QB_READ_THRESHOLD:
		if (s->phase != PH_READ)
			break;
		if (s->ok == s->tried && qb_all_equal(s->buf, s->ok, s->len)) {
			finish(c, s, (int)s->len, 0,
			       s->buf[__builtin_ctz(s->ok)]);
			return;
		}
		if (more) {
			read_from(c, s, more, PH_READ_MORE);
			return;
		}
		break;
	}
	vote_and_finish(c, s);
}

/* ---- resync and scrub ---- */

/* What replica r's copy of block i needs: 0 nothing (it holds the winner),
 * 1 the winner, 2 leave it (no quorum). */
static int sync_need(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		     uint32_t i, uint32_t base)
{
	uint32_t rel, len;

	if (s->win[i] & WIN_NO_QUORUM)
		return 2;
	if (!(s->targets & (1u << r)))
		return !(s->win[i] & (1u << r));
	if (s->sync_flags & QB_SYNC_BLIND)
		return 1;
	block_span(c, s, i, &rel, &len);
	return memcmp((char *)s->buf[r] + rel, (char *)s->buf[base] + rel,
		      len) != 0;
}

/* Plan replica r's rewrite: one run per stretch of blocks it must get. A
 * target's runs bridge blocks it already holds right (rewriting those
 * changes nothing, and fewer, longer writes fill it faster), never a block
 * without quorum; a voter's runs are its losing blocks exactly, as its
 * "repaired" events and counters say. Counts and reports losing copies. */
static void sync_plan(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		      uint32_t base, struct qb_sync_result *res)
{
	bool voter = !(s->targets & (1u << r));
	int from = -1, bad_from = -1;
	uint32_t last = 0;

	for (uint32_t i = 0; i <= s->nblocks; i++) {
		int need = i < s->nblocks ? sync_need(c, s, r, i, base) : 2;

		if (need == 1) {
			if (from < 0)
				from = (int)i;
			if (bad_from < 0)
				bad_from = (int)i;
			last = i;
			s->win[i] |= WIN_DIFFER;
			res->bad[r]++;
			if (!(s->sync_flags & QB_SYNC_NO_WRITE))
				res->written++;
			continue;
		}
		if (bad_from >= 0 && voter && !s->again) {
			report(c, s, QB_EV_BAD_BLOCK, (int)r, (uint32_t)bad_from,
			       i);
			QB_ADD(c->rep[r].bad_blocks, i - (uint32_t)bad_from);
			QB_ADD(c->dev.bad_blocks, i - (uint32_t)bad_from);
		}
		bad_from = -1;
		if ((need == 2 || voter) && from >= 0) {
			if (s->nruns == QB_MAX_RUNS)
				s->incomplete = true;
			add_run(c, s, r, (uint32_t)from, last + 1);
			from = -1;
		}
	}
}

static void sync_voted(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;
	/* a second pass only writes what did not fit: counted the first time */
	struct qb_sync_result scratch = { 0 };
	struct qb_sync_result *res = s->again ? &scratch : c->sync_res;
	uint32_t voters = s->ok & qb_in_service(q);
	uint32_t thr = (s->sync_flags & QB_SYNC_PLURALITY) ? 1 :
		       q->opt.threshold;
	uint32_t base;

	s->targets &= qb_writable(q) & ~s->bad;	/* failed ones are out */
	if (qb_popcount(voters) < thr) {
		repair_release(c, s);
		finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	}
	res->unrecoverable += vote_blocks(c, s, voters, thr);
	base = assemble(c, s);
	s->nruns = 0;
	for (uint32_t r = 0; r < q->n; r++)
		if ((voters | s->targets) & (1u << r))
			sync_plan(c, s, r, base, res);
	res->blocks += s->nblocks;
	for (uint32_t i = 0; i < s->nblocks; i++)
		res->differing += !!(s->win[i] & WIN_DIFFER);
	if ((s->sync_flags & QB_SYNC_NO_WRITE) || !s->nruns) {
		repair_release(c, s);
		finish(c, s, (int)s->len, 0, NULL);
		return;
	}
	begin_phase(s, PH_SYNC_WRITE);
	for (uint32_t i = 0; i < s->nruns; i++) {
		struct run *run = &s->runs[i];
		uint32_t r = s->run_rep[i];

		issue(c, s, r, (s->targets & (1u << r)) ? K_COPY : K_REPAIR, i,
		      QB_OP_WRITE, (char *)s->buf[base] + run->rel, run->off,
		      run->len);
	}
	end_issue(c, s);
}

static void phase_done(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;

	switch (s->phase) {
	case PH_READ:
	case PH_READ_MORE:
		read_done(c, s);
		return;
	case PH_SYNC:
		sync_voted(c, s);
		return;
	case PH_SYNC_WRITE:
		repair_release(c, s);
		finish(c, s, (int)s->len, 0, NULL);
		return;
	case PH_REPAIR:
		repair_release(c, s);
		finish(c, s, (int)s->len, 0, s->out);
		return;
	case PH_MODIFY:
		writers_done(c, s);
		if (q->wil)
			qb_wil_end(q, s->off, s->len);
		/* fall through */
	case PH_FLUSH:
		/* only voters count: a resyncing replica's copy is no vote */
		if (qb_popcount(s->ok & qb_in_service(q)) >= q->opt.threshold)
			finish(c, s, s->op == QB_OP_WRITE ? (int)s->len : 0, 0,
			       NULL);
		else
			finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	}
}

static void count_request(struct qb_ctx *c, uint32_t op, uint32_t len)
{
	switch (op) {
	case QB_OP_READ:
		QB_ADD(c->dev.reads, 1);
		QB_ADD(c->dev.read_bytes, len);
		break;
	case QB_OP_WRITE:
		QB_ADD(c->dev.writes, 1);
		QB_ADD(c->dev.write_bytes, len);
		break;
	case QB_OP_FLUSH:
		QB_ADD(c->dev.flushes, 1);
		break;
	case QB_OP_DISCARD:
		QB_ADD(c->dev.discards, 1);
		break;
	case QB_OP_WRITE_ZEROES:
		QB_ADD(c->dev.write_zeroes, 1);
		break;
	}
}

static void launch(struct qb_ctx *c, struct qb_slot *s, uint32_t op,
		   uint32_t flags, uint64_t offset, uint32_t length, void *src)
{
	s->gen++;
	s->op = (uint8_t)op;
	s->flags = (uint8_t)flags;
	s->off = op == QB_OP_FLUSH ? 0 : offset;
	s->len = op == QB_OP_FLUSH ? 0 : length;
	s->src = src;
	s->retries = 0;
	s->out = NULL;
	c->inflight++;
	start_request(c, s);
}

int qb_ctx_submit(struct qb_ctx *c, uint32_t slot, uint32_t op,
		  uint32_t flags, uint64_t offset, uint32_t length, void *src)
{
	struct qb_quorum *q = c->q;

	if (slot >= c->depth || c->slots[slot].phase != PH_FREE ||
	    c->slots[slot].deferred)
		return qb_err(EBUSY, QB_ERR_INVALID, "slot %u is busy or out of range",
			      slot);
	if (op != QB_OP_READ && op != QB_OP_WRITE && op != QB_OP_FLUSH &&
	    op != QB_OP_DISCARD && op != QB_OP_WRITE_ZEROES)
		return qb_err(EOPNOTSUPP, QB_ERR_INVALID,
			      "operation %u is not supported", op);
	if (op != QB_OP_FLUSH) {
		if (offset > q->size || length > q->size - offset || !length)
			return qb_err(EINVAL, QB_ERR_INVALID,
				      "I/O at offset %llu length %u is outside the device (%llu bytes)",
				      (unsigned long long)offset, length,
				      (unsigned long long)q->size);
		if ((offset | length) % q->align)
			return qb_err(EINVAL, QB_ERR_INVALID,
				      "I/O at offset %llu length %u is not aligned to %u bytes (the replicas' direct-I/O unit)",
				      (unsigned long long)offset, length,
				      q->align);
		if ((op == QB_OP_READ || op == QB_OP_WRITE) &&
		    length > q->opt.max_io)
			return qb_err(EINVAL, QB_ERR_INVALID,
				      "I/O length %u is above max_io (%u)",
				      length, q->opt.max_io);
	}
	count_request(c, op, length);
	launch(c, &c->slots[slot], op, flags, offset, length, src);
	return 0;
}

/* ---- the loop ---- */

static void handle_cqe(struct qb_ctx *c, const struct io_uring_cqe *cqe)
{
	uint64_t ud = cqe->user_data;

	if (ud & QB_UD_FOREIGN) {
		if (c->foreign)
			c->foreign(c, cqe, c->foreign_arg);
		return;
	}
	switch (ud_kind(ud)) {
	case K_TICK:
		tick(c);
		return;
	case K_IGNORE:
		return;
	default:
		io_cqe(c, ud, cqe->res);
	}
}

/*
 * How many CQEs can arrive before any request can move on: the fewest I/Os
 * that any active phase still waits for. Waiting for that many instead of
 * one saves wake-ups and loses nothing. (A ublk fetch or the tick also
 * counts as a CQE, so the wait never outlasts what can happen.)
 */
static uint32_t progress_bound(struct qb_ctx *c)
{
	uint32_t m = UINT32_MAX;

	if (!c->inflight)
		return 1;
	for (uint32_t i = 0; i < c->depth && m > 1; i++) {
		struct qb_slot *s = &c->slots[i];

		if (s->phase != PH_FREE && s->pending < m)
			m = s->pending;
	}
	return m == UINT32_MAX || !m ? 1 : m;
}

int qb_ctx_run(struct qb_ctx *c, uint32_t wait_nr)
{
	struct io_uring_cqe *cqe;
	unsigned head, seen = 0;
	int ret;

	retry_deferred(c);
	if (run_ready(c))
		wait_nr = 0;	/* progress made: do not block */
	else if (wait_nr == 1)
		wait_nr = progress_bound(c);
	if (c->deferred && wait_nr) {
		/* a repair holds a deferred write's blocks: look again soon */
		struct __kernel_timespec ts = { .tv_nsec = 200000 };

		ret = io_uring_submit_and_wait_timeout(&c->ring, &cqe, wait_nr,
						       &ts, NULL);
		if (ret == -ETIME)
			ret = 0;
	} else {
		ret = io_uring_submit_and_wait(&c->ring, wait_nr);
	}
	if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY)
		return qb_err(-ret, QB_ERR_OTHER, "io_uring: %s",
			      strerror(-ret));
	io_uring_for_each_cqe(&c->ring, head, cqe) {
		handle_cqe(c, cqe);
		seen++;
	}
	io_uring_cq_advance(&c->ring, seen);
	run_ready(c);
	return 0;
}

/* ---- life cycle ---- */

static int ring_init(struct qb_ctx *c, uint32_t flags)
{
	struct qb_quorum *q = c->q;
	struct io_uring_params p;
	uint32_t entries = 64;
	int fds[QB_MAX_REPLICAS];
	int ret;

	while (entries < c->depth * (q->n + 2) && entries < 4096)
		entries <<= 1;
	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER |
		  IORING_SETUP_CQSIZE;
	p.cq_entries = entries * 2;
	if (flags & QB_CTX_SQE128)
		p.flags |= IORING_SETUP_SQE128;
	ret = io_uring_queue_init_params(entries, &c->ring, &p);
	if (ret == -EINVAL) {	/* an older kernel: plain ring */
		p.flags &= IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
		ret = io_uring_queue_init_params(entries, &c->ring, &p);
	}
	if (ret < 0)
		return qb_err(-ret, QB_ERR_OTHER, "io_uring setup: %s",
			      strerror(-ret));
	c->ring_ok = true;
	/* every index a replica can take: one attached later fills its own */
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		fds[r] = r < q->n ? q->rep[r].fd : -1;
	c->files_gen = __atomic_load_n(&q->files_gen, __ATOMIC_ACQUIRE);
	ret = io_uring_register_files(&c->ring, fds, QB_MAX_REPLICAS);
	if (ret < 0)
		return qb_err(-ret, QB_ERR_OTHER,
			      "io_uring: cannot register the replicas: %s",
			      strerror(-ret));
	return 0;
}

static int slots_init(struct qb_ctx *c)
{
	struct qb_quorum *q = c->q;
	/* room for every replica index (untouched room costs nothing) */
	size_t per = (size_t)q->opt.max_io * QB_MAX_REPLICAS;
	char *mem;

	c->max_blocks = q->opt.max_io / q->opt.vote_block + 1;
	c->slots = calloc(c->depth, sizeof(*c->slots));
	if (!c->slots)
		return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	/* buffers are touched only as I/O needs them */
	mem = mmap(NULL, per * c->depth, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		return qb_err(ENOMEM, QB_ERR_OTHER,
			      "cannot map %zu bytes of request buffers",
			      per * c->depth);
	c->bufmem = mem;
	for (uint32_t i = 0; i < c->depth; i++) {
		struct qb_slot *s = &c->slots[i];

		for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
			s->buf[r] = mem + per * i + (size_t)q->opt.max_io * r;
		s->snap = calloc(c->max_blocks, sizeof(*s->snap));
		s->win = calloc(c->max_blocks, sizeof(*s->win));
		s->held = calloc(c->max_blocks, 1);
		if (!s->snap || !s->win || !s->held)
			return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	}
	return 0;
}

int qb_ctx_create(struct qb_quorum *q, uint32_t depth, uint32_t flags,
		  struct qb_ctx **out)
{
	struct qb_ctx *c;
	uint32_t tick_ms;
	int ret;

	qb_err_clear();
	*out = NULL;
	if (depth < 1 || depth > 4096)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "depth %u: must be 1 to 4096", depth);
	c = calloc(1, sizeof(*c));
	if (!c)
		return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	c->q = q;
	c->depth = depth;
	tick_ms = q->opt.timeout_ms / 4;
	tick_ms = tick_ms < 5 ? 5 : tick_ms > 1000 ? 1000 : tick_ms;
	c->tick.tv_sec = tick_ms / 1000;
	c->tick.tv_nsec = (long long)(tick_ms % 1000) * 1000000;
	ret = ring_init(c, flags);
	if (!ret)
		ret = slots_init(c);
	pthread_mutex_lock(&q->lock);
	c->next = q->ctxs;
	q->ctxs = c;
	pthread_mutex_unlock(&q->lock);
	if (ret) {
		qb_ctx_destroy(c);
		return ret;
	}
	*out = c;
	return 0;
}

void qb_ctx_destroy(struct qb_ctx *c)
{
	struct qb_quorum *q = c->q;
	struct qb_ctx **p;

	pthread_mutex_lock(&q->lock);
	for (p = &q->ctxs; *p && *p != c; p = &(*p)->next)
		;
	if (*p)
		*p = c->next;
	qb_counters_add(&q->retired_dev, &c->dev);
	for (uint32_t r = 0; r < q->n; r++)
		qb_counters_add(&q->retired_rep[r], &c->rep[r]);
	pthread_mutex_unlock(&q->lock);

	if (c->ring_ok)
		io_uring_queue_exit(&c->ring);
	/*
	 * A read abandoned at its timeout may still land in its buffer (the
	 * ring's teardown is asynchronous): then the buffers stay mapped, so
	 * that a late copy never hits memory reused for something else.
	 */
	if (c->bufmem && !c->abandoned)
		munmap(c->bufmem, (size_t)q->opt.max_io * QB_MAX_REPLICAS *
		       c->depth);
	if (c->slots) {
		for (uint32_t i = 0; i < c->depth; i++) {
			free(c->slots[i].snap);
			free(c->slots[i].win);
			free(c->slots[i].held);
		}
		free(c->slots);
	}
	free(c);
}

void qb_ctx_counters_add(const struct qb_ctx *c, struct qb_counters *dev,
			 struct qb_counters *rep, uint32_t n)
{
	for (; c; c = c->next) {
		qb_counters_add(dev, &c->dev);
		for (uint32_t r = 0; r < n; r++)
			qb_counters_add(&rep[r], &c->rep[r]);
	}
}

/* ---- synchronous use and the load generator ---- */

int64_t qb_ctx_io(struct qb_ctx *c, uint32_t op, uint32_t flags,
		  uint64_t offset, uint32_t length, void *buf)
{
	struct qb_slot *s = &c->slots[0];
	void *src = c->slots[0].buf[0];
	int ret;

	qb_err_clear();
	if (op == QB_OP_WRITE && length <= c->q->opt.max_io)
		memcpy(src, buf, length);
	ret = qb_ctx_submit(c, 0, op, flags, offset, length, src);
	if (ret)
		return ret;
	while (s->phase != PH_FREE || s->deferred) {
		ret = qb_ctx_run(c, 1);
		if (ret)
			return ret;
	}
	if (s->result < 0) {
		const char *what = op == QB_OP_READ ? "read" :
				   op == QB_OP_WRITE ? "write" :
				   op == QB_OP_FLUSH ? "flush" :
				   op == QB_OP_DISCARD ? "discard" :
				   "write-zeroes";

		if (s->err_kind == QB_ERR_NO_QUORUM)
			return qb_err(-s->result, QB_ERR_NO_QUORUM,
				      "%s at offset %llu length %u: no quorum (fewer than %u replicas agree on a block)",
				      what, (unsigned long long)offset, length,
				      c->q->opt.threshold);
		return qb_err(-s->result, s->err_kind,
			      "%s at offset %llu length %u: fewer than %u replicas in service answered",
			      what, (unsigned long long)offset, length,
			      c->q->opt.threshold);
	}
	if (op == QB_OP_READ)
		memcpy(buf, s->out, length);
	return s->result;
}

struct bench_state {
	const struct qb_bench_spec *spec;
	struct qb_bench_result *res;
	uint64_t issued;
	int err;
};

static uint64_t bench_offset(const struct qb_bench_spec *sp, uint64_t i)
{
	uint64_t step = sp->step ? sp->step : sp->bs;
	uint64_t off = (sp->start + i * step) % sp->span;

	return off - off % sp->bs;
}

static void bench_done(struct qb_ctx *c, uint32_t slot, int res, void *data,
		       void *arg)
{
	struct bench_state *b = arg;
	const struct qb_bench_spec *sp = b->spec;
	int ret;

	b->res->ops++;
	if (res < 0)
		b->res->errors++;
	else
		b->res->bytes += (uint64_t)res;
	if (b->issued >= sp->count || b->err)
		return;
	ret = qb_ctx_submit(c, slot, sp->op, 0, bench_offset(sp, b->issued),
			    sp->bs, c->slots[slot].buf[0]);
	if (ret)
		b->err = ret;
	else
		b->issued++;
}

static uint64_t cpu_ns(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ((uint64_t)ru.ru_utime.tv_sec + (uint64_t)ru.ru_stime.tv_sec) *
	       1000000000ULL +
	       ((uint64_t)ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_usec) *
	       1000ULL;
}

int qb_ctx_bench(struct qb_ctx *c, const struct qb_bench_spec *spec,
		 struct qb_bench_result *res)
{
	struct bench_state b = { .spec = spec, .res = res };
	qb_done_fn old_done = c->done;
	void *old_arg = c->done_arg;
	uint64_t t0, cpu0;
	int ret = 0;

	qb_err_clear();
	memset(res, 0, sizeof(*res));
	if ((spec->op != QB_OP_READ && spec->op != QB_OP_WRITE) ||
	    !spec->bs || spec->bs > c->q->opt.max_io || !spec->depth ||
	    spec->depth > c->depth || !spec->span || spec->span < spec->bs ||
	    spec->span > c->q->size)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "bench: op %u bs %u depth %u span %llu do not fit this context (depth %u, max_io %u, size %llu)",
			      spec->op, spec->bs, spec->depth,
			      (unsigned long long)spec->span, c->depth,
			      c->q->opt.max_io,
			      (unsigned long long)c->q->size);
	for (uint32_t i = 0; i < spec->depth; i++)
		memset(c->slots[i].buf[0], 0x5a ^ (int)i, spec->bs);
	qb_ctx_set_done(c, bench_done, &b);
	t0 = qb_now_ns();
	cpu0 = cpu_ns();
	for (uint32_t i = 0; i < spec->depth && b.issued < spec->count; i++) {
		ret = qb_ctx_submit(c, i, spec->op, 0,
				    bench_offset(spec, b.issued), spec->bs,
				    c->slots[i].buf[0]);
		if (ret)
			break;
		b.issued++;
	}
	while (!ret && c->inflight) {
		ret = qb_ctx_run(c, 1);
		if (!ret)
			ret = b.err;
	}
	while (c->inflight && qb_ctx_run(c, 1) == 0)
		;
	res->wall_ns = qb_now_ns() - t0;
	res->cpu_ns = cpu_ns() - cpu0;
	qb_ctx_set_done(c, old_done, old_arg);
	return ret;
}

/* ---- resync and scrub, driven to completion ---- */

#define SYNC_DEPTH 4		/* chunks in flight */

struct sync_state {
	uint64_t next, end;
	uint32_t targets, flags;
	int err, err_kind;
	uint64_t err_off;
};

static void sync_launch(struct qb_ctx *c, uint32_t slot, struct sync_state *st,
			uint64_t off)
{
	struct qb_slot *s = &c->slots[slot];
	uint64_t left = st->end - off;
	uint32_t len = left < c->q->opt.max_io ? (uint32_t)left :
		       c->q->opt.max_io;

	s->targets = st->targets;
	s->sync_flags = (uint8_t)st->flags;
	s->again = off != st->next;
	if (!s->again)
		st->next += len;
	launch(c, s, OP_SYNC, 0, off, len, NULL);
}

static void sync_done(struct qb_ctx *c, uint32_t slot, int res, void *data,
		      void *arg)
{
	struct sync_state *st = arg;
	struct qb_slot *s = &c->slots[slot];

	if (res < 0 && !st->err) {
		st->err = res;
		st->err_kind = s->err_kind;
		st->err_off = s->off;
	}
	if (st->err)
		return;
	if (s->incomplete)	/* the rest of its runs: the same chunk again */
		sync_launch(c, slot, st, s->off);
	else if (st->next < st->end)
		sync_launch(c, slot, st, st->next);
}

int qb_ctx_sync(struct qb_ctx *c, uint64_t offset, uint64_t length,
		uint32_t targets, uint32_t flags, struct qb_sync_result *res)
{
	struct qb_quorum *q = c->q;
	struct sync_state st = {
		.next = offset, .end = offset + length, .flags = flags,
		.targets = targets,
	};
	qb_done_fn old_done = c->done;
	void *old_arg = c->done_arg;
	int ret = 0;

	qb_err_clear();
	memset(res, 0, sizeof(*res));
	if (offset > q->size || length > q->size - offset ||
	    (offset | length) % q->align)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "sync of offset %llu length %llu: outside the device (%llu bytes) or not aligned to %u",
			      (unsigned long long)offset,
			      (unsigned long long)length,
			      (unsigned long long)q->size, q->align);
	if (flags & ~(uint32_t)(QB_SYNC_PLURALITY | QB_SYNC_NO_WRITE |
				QB_SYNC_BLIND))
		return qb_err(EINVAL, QB_ERR_INVALID, "sync flags %#x", flags);
	if (c->inflight)
		return qb_err(EBUSY, QB_ERR_INVALID,
			      "sync on a context with requests in flight");
	c->sync_res = res;
	qb_ctx_set_done(c, sync_done, &st);
	for (uint32_t i = 0; i < SYNC_DEPTH && i < c->depth &&
	     st.next < st.end; i++)
		sync_launch(c, i, &st, st.next);
	while (c->inflight && !ret)
		ret = qb_ctx_run(c, 1);
	while (c->inflight && qb_ctx_run(c, 1) == 0)
		;
	qb_ctx_set_done(c, old_done, old_arg);
	c->sync_res = NULL;
	if (ret)
		return ret;
	if (st.err)
		return qb_err(-st.err, st.err_kind,
			      "sync at offset %llu: fewer than %u replicas in service answered",
			      (unsigned long long)st.err_off,
			      (flags & QB_SYNC_PLURALITY) ? 1 : q->opt.threshold);
	return 0;
}
