/*
 * engine.c: one thread's request engine on its own io_uring.
 *
 * A request lives in a slot. It goes out as one I/O per replica, all queued
 * on the ring and submitted together, and moves through phases as the last
 * I/O of a phase completes (slot->pending counts them down):
 *
 *   read:   READ -> (READ_MORE: policy threshold or fifo needs more copies)
 *                -> vote -> (REPAIR: rewrite losing blocks) -> done
 *   write, discard, write-zeroes, one step at a time (discard and
 *           write-zeroes in steps of QB_ZERO_STEP, each with its own holds,
 *           bitmap marks and deadlines):
 *           (HOLD: a repair holds its blocks) -> (MARK: its bitmap bits go
 *           to disk) -> MODIFY -> next step, or (STATES) -> done
 *   flush:  FLUSH -> (STATES) -> done
 *   sync:   sync.c
 * MARK and STATES park the request until a metadata round (bitmap.c) is
 * done; STATES holds back the acknowledgement of a write while a replica
 * state change it depends on is not on disk. The ring goes on with other
 * requests meanwhile.
 *
 * The replica timeout: every replica I/O has a deadline, and the tick
 * abandons those past it and takes their replica out. An abandoned I/O is
 * never cancelled (a block device's cannot be; it may still run, late): the
 * buffer it uses is set aside and the slot takes a fresh one, and a record
 * (an orphan) waits for its CQEs, counts them as late completions, then
 * lets the buffer be used again. Until then the replica owes I/O and
 * cannot rejoin (members.c).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <libnbd.h>
#include <unistd.h>

#include "engine_int.h"

#define QB_RETRIES 2		/* re-reads when a vote met a racing write */

static void phase_done(struct qb_ctx *c, struct qb_slot *s);
static void handle_cqe(struct qb_ctx *c, const struct io_uring_cqe *cqe);

/* ---- the ring ---- */

static bool keep(struct qb_ctx *c, uint64_t ud, int32_t res, uint32_t flags)
{
	if (c->nbacklog == c->backlog_cap) {
		uint32_t cap = c->backlog_cap ? 2 * c->backlog_cap : 64;
		struct cqe_copy *b = realloc(c->backlog, cap * sizeof(*b));

		if (!b)
			return false;
		c->backlog = b;
		c->backlog_cap = cap;
	}
	c->backlog[c->nbacklog++] = (struct cqe_copy){ ud, res, flags };
	return true;
}

/* Ready CQEs kept aside (the ring had no room to submit): handled by the
 * next qb_ctx_run, never from inside an issue. */
static void stash(struct qb_ctx *c)
{
	struct io_uring_cqe *cqe;
	unsigned head, seen = 0;

	io_uring_for_each_cqe(&c->ring, head, cqe) {
		if (!keep(c, cqe->user_data, cqe->res, cqe->flags))
			break;
		seen++;
	}
	io_uring_cq_advance(&c->ring, seen);
}

/* An NBD command's result (nbd.c calls it from inside libnbd): kept, and
 * handled by the loop like a CQE. The backlog grows in steps and is
 * reused, so this allocates only while it grows. */
void qb_ctx_keep(struct qb_ctx *c, uint64_t ud, int32_t res)
{
	while (!keep(c, ud, res, 0))
		usleep(1000);	/* out of memory: nothing can be dropped */
}

struct io_uring_sqe *qb_ctx_sqe(struct qb_ctx *c)
{
	for (int tries = 0; tries < 64; tries++) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);
		int ret;

		if (sqe)
			return sqe;
		ret = io_uring_submit(&c->ring);
		if (ret == -EBUSY || ret == -EAGAIN)
			stash(c);	/* the CQ is full: make room */
		else if (ret < 0 && ret != -EINTR)
			return NULL;
	}
	return NULL;
}

uint32_t qb_ctx_inflight(const struct qb_ctx *c)
{
	return c->inflight;
}

struct qb_quorum *qb_ctx_quorum(const struct qb_ctx *c)
{
	return c->q;
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
	if (slot >= c->depth || replica >= QB_MAX_REPLICAS)
		return NULL;
	return c->slots[slot].buf[replica];
}

/* ---- abandoned I/O ---- */

static void *buf_new(struct qb_ctx *c)
{
	void *p;

	if (c->nspare)
		return c->spare[--c->nspare];
	if (c->nmapped == c->mapped_cap) {
		uint32_t cap = c->mapped_cap ? 2 * c->mapped_cap : 16;
		void **m = realloc(c->mapped, cap * sizeof(*m));

		if (!m)
			return NULL;
		c->mapped = m;
		c->mapped_cap = cap;
	}
	p = mmap(NULL, c->q->opt.max_io, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	c->mapped[c->nmapped++] = p;
	return p;
}

static void buf_spare(struct qb_ctx *c, void *p)
{
	if (c->nspare == c->spare_cap) {
		uint32_t cap = c->spare_cap ? 2 * c->spare_cap : 16;
		void **s = realloc(c->spare, cap * sizeof(*s));

		if (!s)
			return;		/* it stays mapped, unused */
		c->spare = s;
		c->spare_cap = cap;
	}
	c->spare[c->nspare++] = p;
}

/* The slot's buffer k may still be read or written by an abandoned I/O:
 * the slot takes a fresh one (with the voted data, if it was there).
 * Returns the old one, or NULL when no fresh one could be had (no address
 * space left: the slot then keeps it, the one case this cannot hold). */
static void *set_aside(struct qb_ctx *c, struct qb_slot *s, uint32_t k)
{
	char *old = s->buf[k], *fresh = buf_new(c);

	if (!fresh)
		return NULL;
	s->buf[k] = fresh;
	if (s->out && (char *)s->out >= old &&
	    (char *)s->out < old + c->q->opt.max_io) {
		size_t at = (size_t)((char *)s->out - old);

		memcpy(fresh + at, s->out, s->len);
		s->out = fresh + at;
	}
	return old;
}

/* The buffer that slot s's I/Os on replica r use in its phase, or -1. */
static int phase_buf(struct qb_slot *s, uint32_t r)
{
	switch (s->phase) {
	case PH_READ:
	case PH_READ_MORE:
	case PH_SYNC:
		return (int)r;
	case PH_MODIFY:		/* zeroing uses q->zeros, never freed */
		return s->op == QB_OP_WRITE ? s->src_buf : -1;
	case PH_REPAIR:
	case PH_SYNC_WRITE:
		return s->base;
	}
	return -1;
}

/* Replica r's I/Os of slot s will not be waited for: an orphan takes them
 * (and the buffer they use); the replica owes them until they are back. */
static void abandon(struct qb_ctx *c, struct qb_slot *s, uint32_t r)
{
	struct orphan *o = calloc(1, sizeof(*o));
	uint32_t n = s->nout[r];
	int k = phase_buf(s, r);

	if (s->hang_fd[r] >= 0) {	/* a hang fault: nothing behind it */
		struct io_uring_sqe *sqe = qb_ctx_sqe(c);

		if (sqe) {
			io_uring_prep_cancel_fd(sqe, s->hang_fd[r],
						IORING_ASYNC_CANCEL_ALL);
			sqe->user_data = ud_make(0, 0, K_IGNORE, 0, 0);
		}
		s->hang_fd[r] = -1;
	}
	if (o) {
		o->slot = slot_no(c, s);
		o->gen = s->gen;
		o->replica = r;
		o->left = n;
		o->off = s->off;
		o->len = s->len;
		if (k >= 0)
			o->buf = set_aside(c, s, (uint32_t)k);
		o->next = c->orphans;
		c->orphans = o;
	}
	/* without a record its CQEs are dropped, and it stays owed */
	qb_owed(c->q, r, (int)n);
	__atomic_store_n(&c->link.out[r], c->link.out[r] - n, __ATOMIC_RELAXED);
	s->pending -= n;
	s->nout[r] = 0;
}

/* A CQE of an abandoned I/O: true if it was one. It is counted, and
 * reported: the replica answered after all (res: how). */
static bool orphan_cqe(struct qb_ctx *c, uint64_t ud, int res)
{
	struct orphan **p, *o;

	for (p = &c->orphans; (o = *p); p = &o->next)
		if (o->slot == ud_slot(ud) && o->gen == ud_gen(ud) &&
		    o->replica == ud_rep(ud))
			break;
	if (!o)
		return false;
	qb_owed(c->q, o->replica, -1);
	qb_event(c->q, QB_EV_LATE, (int)o->replica, o->off, o->len,
		 res < 0 ? -res : 0);
	if (--o->left)
		return true;
	*p = o->next;
	if (o->buf)
		buf_spare(c, o->buf);
	free(o);
	return true;
}

/* A slot's next generation: never one that an orphan of it still has. */
static uint32_t next_gen(struct qb_ctx *c, struct qb_slot *s)
{
	uint32_t gen = (s->gen + 1) & UD_GEN_MASK;
	struct orphan *o = c->orphans;

	while (o) {
		if (o->slot == slot_no(c, s) && o->gen == gen) {
			gen = (gen + 1) & UD_GEN_MASK;
			o = c->orphans;		/* again, for the new one */
		} else {
			o = o->next;
		}
	}
	return gen;
}

/* ---- issuing and completing replica I/O ---- */

void qb_io_result(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		  uint32_t kind, int res, uint32_t want, uint64_t off)
{
	bool rw = s->op == QB_OP_READ || s->op == QB_OP_WRITE ||
		  s->op == OP_SYNC || kind != K_IO;

	if (kind == K_IO && res < 0 && (res == -EOPNOTSUPP || res == -EINVAL) &&
	    (s->op == QB_OP_DISCARD || s->op == QB_OP_WRITE_ZEROES) &&
	    qb_zero_fallback(c, s, r))
		return;
	if (res >= 0 && rw && (uint32_t)res != want)
		res = -EIO;	/* a short read or write is an error */
	if (res < 0) {
		if (res == -ECANCELED)
			res = -ETIMEDOUT;
		QB_ADD(c->link.rep[r].errors, 1);
		qb_replica_fail(c->q, r, -res, off, want);
		s->bad |= 1u << r;
		s->ok &= ~(1u << r);
		return;
	}
	switch (kind) {
	case K_ZERO:
		if (qb_zero_next(c, s, r))
			return;
		break;
	case K_REPAIR:
		QB_ADD(c->link.rep[r].repairs, want / c->q->opt.vote_block);
		QB_ADD(c->link.dev.repairs, want / c->q->opt.vote_block);
		qb_event(c->q, QB_EV_REPAIRED, (int)r, off, want, 0);
		return;
	case K_COPY:
		return;
	}
	if (!(s->bad & (1u << r)))
		s->ok |= 1u << r;
}

/* Replica r answered a read in ns: its running average moves three
 * quarters of the way down to a faster answer (a replica that is fast again
 * is used again after a few probes) and a quarter of the way up to a
 * slower one (one slow answer of a fast replica does not set it aside). */
static void note_read_time(struct qb_ctx *c, uint32_t r, uint64_t ns)
{
	uint64_t *avg = &c->read_ns[r];

	ns = ns ? ns : 1;
	if (!*avg)
		*avg = ns;
	else if (ns < *avg)
		*avg -= 3 * ((*avg - ns) / 4);
	else
		*avg += (ns - *avg) / 4;
}

static void io_cqe(struct qb_ctx *c, uint64_t ud, int res)
{
	struct qb_slot *s = &c->slots[ud_slot(ud)];
	uint32_t r = ud_rep(ud), kind = ud_kind(ud), want;
	uint64_t off;

	if (c->orphans && orphan_cqe(c, ud, res))
		return;		/* a late completion */
	if (ud_slot(ud) >= c->depth || s->phase == PH_FREE ||
	    s->gen != ud_gen(ud) || !s->nout[r])
		return;		/* none of ours: cannot happen */
	s->nout[r]--;
	__atomic_store_n(&c->link.out[r], c->link.out[r] - 1, __ATOMIC_RELAXED);
	if (kind == K_REPAIR || kind == K_COPY) {
		want = s->runs[ud_idx(ud)].len;
		off = s->runs[ud_idx(ud)].off;
	} else if (kind == K_ZERO) {
		want = qb_zero_want(c, s, r);
		off = s->zoff[r];
	} else {
		qb_chunk_span(c, s, r, ud_idx(ud), &off, &want);
	}
	if (res == -ECANCELED && s->hang_fd[r] >= 0)
		s->hang_fd[r] = -1;
	if (kind == K_IO && s->op == QB_OP_READ && !s->nout[r] && res >= 0 &&
	    c->q->opt.read_policy == QB_READ_THRESHOLD)
		note_read_time(c, r, qb_now_ns() - s->since[r]);
	qb_io_result(c, s, r, kind, res, want, off);
	if (--s->pending == 0)
		phase_done(c, s);
}

/* The replica timeout: replica I/Os out longer than it are abandoned and
 * their replicas taken out of service. */
static void tick(struct qb_ctx *c)
{
	uint64_t now = qb_now_ns();
	uint64_t limit = (uint64_t)c->q->opt.timeout_ms * 1000000ULL;

	c->tick_armed = false;
	for (uint32_t i = 0; i < c->depth; i++) {
		struct qb_slot *s = &c->slots[i];
		bool any = false;

		if (!s->pending)
			continue;
		for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++) {
			if (!s->nout[r] || now - s->since[r] < limit)
				continue;
			abandon(c, s, r);
			QB_ADD(c->link.rep[r].timeouts, 1);
			QB_ADD(c->link.dev.timeouts, 1);
			QB_ADD(c->link.rep[r].errors, 1);
			qb_replica_fail(c->q, r, ETIMEDOUT, s->off, s->len);
			s->bad |= 1u << r;
			s->ok &= ~(1u << r);
			any = true;
		}
		if (any && s->pending == 0)
			phase_done(c, s);
	}
	if (c->inflight)
		qb_arm_tick(c);
}

/* ---- parking: waiting for a metadata round ---- */

static void arm_wake(struct qb_ctx *c)
{
	struct io_uring_sqe *sqe;

	if (c->wake_armed || !(sqe = qb_ctx_sqe(c)))
		return;
	io_uring_prep_poll_add(sqe, c->link.wake_fd, POLLIN);
	sqe->user_data = ud_make(0, 0, K_WAKE, 0, 0);
	c->wake_armed = true;
}

static void park(struct qb_ctx *c, struct qb_slot *s, int phase,
		 uint64_t round)
{
	if (__atomic_load_n(&c->q->pause_ms, __ATOMIC_RELAXED))
		qb_test_pause(c->q, QB_PAUSE_BEFORE_PARK);
	s->phase = (uint8_t)phase;
	s->ticket = round;
	s->next = c->parked;
	c->parked = s;
	/* then the round's end is seen here, or the writer sees this */
	__atomic_store_n(&c->link.waiting, 1, __ATOMIC_SEQ_CST);
	arm_wake(c);
}

static void modify_issue(struct qb_ctx *c, struct qb_slot *s);

static void unpark(struct qb_ctx *c)
{
	struct qb_slot *list = c->parked;
	uint64_t done;

	if (!list)
		return;
	done = qb_bitmap_done(c->q);
	c->parked = NULL;
	while (list) {
		struct qb_slot *s = list;

		list = s->next;
		if (s->ticket > done) {
			s->next = c->parked;
			c->parked = s;
		} else if (s->phase == PH_MARK) {
			modify_issue(c, s);
		} else {
			qb_finish(c, s, s->result, 0, NULL);
		}
	}
	if (!c->parked)
		__atomic_store_n(&c->link.waiting, 0, __ATOMIC_SEQ_CST);
}

/* ---- requests ---- */

void qb_finish(struct qb_ctx *c, struct qb_slot *s, int res, int kind,
	       void *out)
{
	s->phase = PH_FREE;
	s->result = res;
	s->err_kind = (uint8_t)kind;
	s->out = out;
	c->inflight--;
	c->finished++;
	if (res < 0)
		QB_ADD(c->link.dev.errors, 1);
	if (c->done)
		c->done(c, slot_no(c, s), res, out, c->done_arg);
}

/* A write or flush that succeeded: acknowledged once every replica state
 * change it may depend on is recorded (a crash then cannot bring back a
 * replica that missed it as if current). */
static void complete_modify(struct qb_ctx *c, struct qb_slot *s, int res)
{
	struct qb_quorum *q = c->q;
	uint64_t round;

	if (q->bitmap) {
		round = qb_bitmap_states_round(q);
		if (round > qb_bitmap_done(q)) {
			s->result = res;
			park(c, s, PH_STATES, round);
			return;
		}
	}
	qb_finish(c, s, res, 0, NULL);
}

void qb_begin_phase(struct qb_slot *s, int phase)
{
	s->phase = (uint8_t)phase;
	s->pending = 1;		/* guard: the phase cannot end while issuing */
}

/* A phase whose I/Os all ended while it was issued (in-thread I/O, faults)
 * moves on from the loop, not from here: submitting never completes a
 * request inside the caller's own call. */
void qb_end_issue(struct qb_ctx *c, struct qb_slot *s)
{
	if (--s->pending == 0) {
		s->next = c->ready;
		c->ready = s;
	}
}

static bool run_ready(struct qb_ctx *c)
{
	bool any = c->ready != NULL;

	while (c->ready) {
		struct qb_slot *s = c->ready;

		c->ready = s->next;
		phase_done(c, s);
	}
	return any;
}

/* Its blocks are held by another request: try again later. */
void qb_defer(struct qb_ctx *c, struct qb_slot *s)
{
	s->phase = PH_HOLD;
	s->next = c->deferred;
	c->deferred = s;
}

uint32_t qb_blocks_of(struct qb_quorum *q, uint64_t off, uint64_t len)
{
	uint64_t vb = q->opt.vote_block;

	return (uint32_t)(((off + len + vb - 1) >> q->vote_shift) -
			  (off >> q->vote_shift));
}

/* ---- NBD replicas: a connection per context (nbd.c) ---- */

static void nbd_sink(void *arg, uint64_t ud, int res)
{
	qb_ctx_keep(arg, ud, res);
}

static uint64_t nbd_poll_ud(uint32_t r, uint32_t gen)
{
	return ud_make(0, gen, K_NBD, r, 0);
}

static struct io_uring_sqe *nbd_sqe(void *arg)
{
	return qb_ctx_sqe(arg);
}

static const struct qb_nbd_ops nbd_ops = {
	.sink = nbd_sink, .poll_ud = nbd_poll_ud, .sqe = nbd_sqe,
};

/* Orphans of replica r whose connection was closed: nothing of theirs can
 * come back, and their buffers are free again. */
static void forget_orphans(struct qb_ctx *c, uint32_t r)
{
	struct orphan **p = &c->orphans, *o;

	while ((o = *p)) {
		if (o->replica != r) {
			p = &o->next;
			continue;
		}
		*p = o->next;
		qb_owed_forget(c->q, r, o->left);
		if (o->buf)
			buf_spare(c, o->buf);
		free(o);
	}
}

/* Close replica r's connection; what it had out is forgotten. */
static void nbd_drop(struct qb_ctx *c, uint32_t r)
{
	qb_nbd_free(c->nbd[r]);
	c->nbd[r] = NULL;
	forget_orphans(c, r);
}

/* h becomes replica r's connection here (NULL: none). */
static void nbd_use(struct qb_ctx *c, uint32_t r, struct nbd_handle *h)
{
	nbd_drop(c, r);
	if (h && !(c->nbd[r] = qb_nbd_new(h, r, &nbd_ops, c)))
		nbd_close(h);	/* out of memory: its I/O here fails */
	c->has_nbd = true;
}

/* A new context connects to every NBD replica that takes I/O (one that
 * is out gets its connection when it rejoins). A server that cannot be
 * reached leaves the replica without one: its I/O here fails. */
static void nbd_connect_all(struct qb_ctx *c)
{
	struct qb_quorum *q = c->q;
	uint32_t wr = qb_writable(q);

	for (uint32_t r = 0; r < qb_replicas(q); r++) {
		struct nbd_handle *h = NULL;

		if (!q->rep[r].is_nbd)
			continue;
		c->has_nbd = true;
		if ((wr & (1u << r)) &&
		    !qb_nbd_connect(q->rep[r].path, q->opt.timeout_ms, &h))
			nbd_use(c, r, h);
	}
	qb_err_clear();
}

/* Connections a rejoin made for this context: taken in its own thread. */
static void nbd_take_new(struct qb_ctx *c)
{
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++) {
		struct nbd_handle *h;

		if (!__atomic_load_n(&c->link.nbd_next[r], __ATOMIC_ACQUIRE))
			continue;
		h = __atomic_exchange_n(&c->link.nbd_next[r], NULL,
					__ATOMIC_ACQ_REL);
		if (h)
			nbd_use(c, r, h);
	}
}

/*
 * A replica attached since this ring registered its files: register it
 * here, in the ring's own thread. Called before loading a replica mask: the
 * attach bumps files_gen before it sets the replica's bit in any mask.
 */
static void sync_files(struct qb_ctx *c)
{
	struct qb_quorum *q = c->q;
	uint32_t gen = __atomic_load_n(&q->files_gen, __ATOMIC_ACQUIRE);
	int fds[QB_MAX_REPLICAS];

	if (gen == c->files_gen)
		return;
	nbd_take_new(c);
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		fds[r] = r < qb_replicas(q) ? q->rep[r].fd : -1;
	if (io_uring_register_files_update(&c->ring, 0, fds,
					   QB_MAX_REPLICAS) >= 0)
		c->files_gen = gen;
}

void qb_read_from(struct qb_ctx *c, struct qb_slot *s, uint32_t mask,
		  int phase)
{
	qb_begin_phase(s, phase);
	s->tried |= mask;
	for (uint32_t r = 0; mask; r++, mask >>= 1)
		if (mask & 1)
			qb_issue(c, s, r, K_IO, 0, QB_OP_READ, s->buf[r], s->off,
				 s->len);
	qb_end_issue(c, s);
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

#define QB_PROBE_EVERY 32	/* policy threshold: reads by plain rotation */
#define QB_ALIKE_NS 200000	/* read times this close count as alike */

/* Policy threshold: the threshold replicas of live expected to answer
 * first. Those whose read time is comparable to the fastest's (at most
 * twice it, plus QB_ALIKE_NS; one never measured counts as fast) take
 * turns, as plain rotation does when all are alike; slower ones fill up
 * what is missing, fastest first. One read in QB_PROBE_EVERY goes by plain
 * rotation, so that a slow replica's time is measured again. */
static uint32_t pick_threshold(struct qb_ctx *c, uint32_t live, uint32_t n,
			       uint32_t thr)
{
	uint32_t from = c->rr++ % n, fast = 0, out;
	uint64_t best = UINT64_MAX, bar;

	if (c->rr % QB_PROBE_EVERY == 0)
		return pick(live, n, from, thr);
	for (uint32_t r = 0; r < n; r++)
		if ((live & (1u << r)) && c->read_ns[r] < best)
			best = c->read_ns[r];
	bar = 2 * best + QB_ALIKE_NS;
	for (uint32_t r = 0; r < n; r++)
		if ((live & (1u << r)) && c->read_ns[r] <= bar)
			fast |= 1u << r;
	out = pick(fast, n, from, thr);
	while (qb_popcount(out) < thr) {
		uint32_t next = 0;

		best = UINT64_MAX;
		for (uint32_t r = 0; r < n; r++)
			if ((live & ~out & (1u << r)) && c->read_ns[r] < best) {
				best = c->read_ns[r];
				next = 1u << r;
			}
		out |= next;
	}
	return out;
}

static void start_read(struct qb_ctx *c, struct qb_slot *s, uint32_t live)
{
	struct qb_quorum *q = c->q;
	uint32_t mask = live, n = qb_replicas(q);

	s->nblocks = qb_blocks_of(q, s->off, s->len);
	qb_hold_snapshot(q, qb_first_block(q, s->off), s->nblocks, s->snap);
	/* a region not resynced since a crash: every voter is read, whatever
	 * the policy, for the answer the resync will give (taken now: a
	 * region the resync finishes meanwhile still votes that way) */
	s->crash = __atomic_load_n(&q->unsynced_left, __ATOMIC_ACQUIRE) ?
		   qb_unsynced_regions(q, s->off, s->len) : 0;
	if (!s->crash && q->opt.read_policy == QB_READ_THRESHOLD)
		mask = pick_threshold(c, live, n, q->opt.threshold);
	else if (!s->crash && q->opt.read_policy == QB_READ_FIFO)
		mask = pick(live, n, 0, 1);
	qb_read_from(c, s, mask, PH_READ);
}

/* The step of a write, discard or write-zeroes under way: hold its blocks
 * against repairs, mark its regions, then issue it. */
static void modify_step(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;
	uint64_t round;

	if (!qb_hold_writers(q, qb_first_block(q, s->poff),
			     qb_blocks_of(q, s->poff, s->plen))) {
		qb_defer(c, s);		/* a repair is rewriting these blocks */
		return;
	}
	if (q->bitmap && (round = qb_bitmap_begin(q, s->poff, s->plen))) {
		park(c, s, PH_MARK, round);
		return;
	}
	modify_issue(c, s);
}

static void modify_issue(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;
	uint32_t live;

	sync_files(c);
	live = qb_writable(q);	/* resyncing replicas get writes too */
	qb_begin_phase(s, PH_MODIFY);
	s->ok = 0;
	for (uint32_t r = 0; r < qb_replicas(q); r++) {
		if (!(live & (1u << r)))
			continue;
		if (s->op == QB_OP_WRITE)
			qb_issue(c, s, r, K_IO, 0, QB_OP_WRITE, s->src, s->poff,
				 s->plen);
		else
			qb_zero_start(c, s, r);
	}
	qb_end_issue(c, s);
}

static uint32_t step_len(struct qb_slot *s)
{
	uint64_t left = s->off + s->len - s->poff;

	if (s->op == QB_OP_WRITE)
		return (uint32_t)left;
	return left > QB_ZERO_STEP ? QB_ZERO_STEP : (uint32_t)left;
}

static void modify_done(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;

	qb_release_writers(q, qb_first_block(q, s->poff),
			   qb_blocks_of(q, s->poff, s->plen));
	if (q->bitmap)
		qb_bitmap_end(q, s->poff, s->plen);
	/* only voters count: a resyncing replica's copy is no vote */
	if (qb_popcount(s->ok & qb_in_service(q)) < q->opt.threshold) {
		qb_finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	}
	if (s->poff + s->plen < s->off + s->len) {
		s->poff += s->plen;
		s->plen = step_len(s);
		modify_step(c, s);
		return;
	}
	complete_modify(c, s, s->op == QB_OP_WRITE ? (int)s->len : 0);
}

static void start_request(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;
	uint32_t live;

	sync_files(c);
	live = qb_in_service(q);
	s->ok = s->tried = s->bad = 0;
	memset(s->nout, 0, sizeof(s->nout));
	if (s->op == OP_SYNC) {
		qb_start_sync(c, s, live);
		return;
	}
	if (qb_popcount(live) < q->opt.threshold) {
		qb_finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	}
	if (s->op == QB_OP_READ) {
		start_read(c, s, live);
		return;
	}
	if (s->op == QB_OP_FLUSH) {
		uint32_t wr = qb_writable(q);

		qb_begin_phase(s, PH_FLUSH);
		for (uint32_t r = 0; r < qb_replicas(q); r++)
			if (wr & (1u << r))
				qb_issue(c, s, r, K_IO, 0, QB_OP_FLUSH, NULL, 0, 0);
		qb_end_issue(c, s);
		return;
	}
	s->poff = s->off;
	s->plen = step_len(s);
	modify_step(c, s);
}

static void retry_deferred(struct qb_ctx *c)
{
	struct qb_slot *list = c->deferred;

	c->deferred = NULL;
	while (list) {
		struct qb_slot *s = list;

		list = s->next;
		if (s->op == OP_SYNC)
			qb_start_sync(c, s, qb_in_service(c->q));
		else
			modify_step(c, s);
	}
}

/* Report a run of blocks [from, to) of a request. */
void qb_report(struct qb_ctx *c, struct qb_slot *s, uint32_t type, int r,
	       uint32_t from, uint32_t to)
{
	uint64_t vb = c->q->opt.vote_block;
	uint64_t start = (qb_first_block(c->q, s->off) + from) * vb;
	uint64_t end = (qb_first_block(c->q, s->off) + to) * vb;

	if (start < s->off)
		start = s->off;
	if (end > s->off + s->len)
		end = s->off + s->len;
	qb_event(c->q, type, r, start, end - start, type ==
		 QB_EV_QUORUM_FAILURE ? EIO : 0);
}

/* Block i of the request as [*rel, *rel + *len) of its buffer. */
void qb_block_span(struct qb_ctx *c, struct qb_slot *s, uint32_t i,
		   uint32_t *rel, uint32_t *len)
{
	uint64_t vb = c->q->opt.vote_block;
	uint64_t start = (qb_first_block(c->q, s->off) + i) * vb;
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
			qb_report(c, s, QB_EV_QUORUM_FAILURE, -1, (uint32_t)from, i);
			from = -1;
		}
	}
}

/* Vote each block over the voters in mask, at least thr of them agreeing;
 * blocks without quorum are marked and reported. Returns how many. */
uint32_t qb_vote_blocks(struct qb_ctx *c, struct qb_slot *s, uint32_t mask,
			uint32_t thr)
{
	struct qb_quorum *q = c->q;
	const void *bufs[QB_MAX_REPLICAS];
	uint32_t nq = 0, n = qb_replicas(q);

	for (uint32_t i = 0; i < s->nblocks; i++) {
		uint32_t rel, len, t = thr;

		qb_block_span(c, s, i, &rel, &len);
		if (s->crash && (s->crash >> (((s->off + rel) >> q->unsynced_shift) -
					      (s->off >> q->unsynced_shift)) & 1))
			t = 1;		/* the crash rule: plurality */
		for (uint32_t r = 0; r < n; r++)
			bufs[r] = (mask & (1u << r)) ?
				  (char *)s->buf[r] + rel : NULL;
		if (qb_vote(bufs, n, len, t, q->opt.hash, &s->win[i]) < 0) {
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
	uint64_t b0 = qb_first_block(c->q, s->off);

	for (uint32_t i = 0; i < s->nblocks; i++)
		if (!qb_hold_unchanged(c->q, b0 + i, s->snap[i]))
			return true;
	return false;
}

/* Put the winning copy of every block into the base buffer (a copy only
 * where the base replica lost that block). */
uint32_t qb_assemble(struct qb_ctx *c, struct qb_slot *s)
{
	uint32_t base = (uint32_t)__builtin_ctz(s->win[0] & ~(WIN_NO_QUORUM |
							      WIN_DIFFER));

	for (uint32_t i = 1; i < s->nblocks; i++) {
		uint32_t rel, len, from;

		if (s->win[i] & (1u << base))
			continue;
		qb_block_span(c, s, i, &rel, &len);
		from = (uint32_t)__builtin_ctz(s->win[i]);
		memcpy((char *)s->buf[base] + rel, (char *)s->buf[from] + rel,
		       len);
	}
	s->base = (uint8_t)base;
	return base;
}

void qb_add_run(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		uint32_t from, uint32_t to)
{
	uint32_t rel, len, last_rel, last_len;
	struct run *run;

	if (s->nruns == QB_MAX_RUNS)
		return;		/* the rest waits for another read */
	qb_block_span(c, s, from, &rel, &len);
	qb_block_span(c, s, to - 1, &last_rel, &last_len);
	run = &s->runs[s->nruns];
	run->rel = rel;
	run->off = s->off + rel;
	run->len = last_rel + last_len - rel;
	s->run_rep[s->nruns++] = (uint8_t)r;
}

/* Hold blocks [from, to) for their repair: all of them or none. */
static bool hold_run(struct qb_ctx *c, struct qb_slot *s, uint32_t from,
		     uint32_t to)
{
	uint64_t b0 = qb_first_block(c->q, s->off);

	for (uint32_t j = from; j < to; j++) {
		if (s->held[j])
			continue;
		if (!qb_hold_repair(c->q, b0 + j, s->snap[j]))
			return false;
		s->held[j] = 1;
	}
	return true;
}

/* Report losing blocks per replica and plan their repair. */
static void losers(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;
	uint64_t b0 = qb_first_block(q, s->off);

	s->nruns = 0;
	for (uint32_t r = 0; r < qb_replicas(q); r++) {
		uint32_t bit = 1u << r, from = 0;
		bool in_run = false;

		if (!(s->ok & bit))
			continue;
		for (uint32_t i = 0; i <= s->nblocks; i++) {
			bool lose = i < s->nblocks && !(s->win[i] & bit) &&
				    (s->held[i] ||
				     qb_hold_unchanged(q, b0 + i, s->snap[i]));

			if (lose && !in_run) {
				from = i;
				in_run = true;
			} else if (!lose && in_run) {
				in_run = false;
				qb_report(c, s, QB_EV_BAD_BLOCK, (int)r, from, i);
				QB_ADD(c->link.rep[r].bad_blocks, i - from);
				QB_ADD(c->link.dev.bad_blocks, i - from);
				/* the crash rule repairs even with repair
				 * off: the resync would write them anyway */
				if ((q->opt.repair || s->crash) &&
				    hold_run(c, s, from, i))
					qb_add_run(c, s, r, from, i);
			}
		}
	}
}

static void release_repairs(struct qb_ctx *c, struct qb_slot *s)
{
	qb_hold_release(c->q, qb_first_block(c->q, s->off), s->nblocks,
			s->held);
}

static void vote_and_finish(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;
	uint32_t base;

	if (qb_popcount(s->ok) < q->opt.threshold) {
		qb_finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	}
	if (qb_all_equal(s->buf, s->ok, s->len)) {
		qb_finish(c, s, (int)s->len, 0, s->buf[__builtin_ctz(s->ok)]);
		return;
	}
	if (qb_vote_blocks(c, s, s->ok, q->opt.threshold)) {
		if (raced(c, s) && s->retries++ < QB_RETRIES) {
			s->gen = next_gen(c, s);	/* a new attempt */
			start_request(c, s);
			return;
		}
		QB_ADD(c->link.dev.quorum_failures, 1);
		qb_finish(c, s, -EIO, QB_ERR_NO_QUORUM, NULL);
		return;
	}
	base = qb_assemble(c, s);
	s->out = s->buf[base];
	losers(c, s);
	if (!s->nruns) {
		release_repairs(c, s);
		qb_finish(c, s, (int)s->len, 0, s->out);
		return;
	}
	qb_begin_phase(s, PH_REPAIR);
	s->ok = 0;
	for (uint32_t i = 0; i < s->nruns; i++) {
		struct run *run = &s->runs[i];

		qb_issue(c, s, s->run_rep[i], K_REPAIR, i, QB_OP_WRITE,
			 (char *)s->buf[base] + run->rel, run->off, run->len);
	}
	qb_end_issue(c, s);
}

static void read_done(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;
	uint32_t more = qb_in_service(q) & ~s->tried, n = qb_replicas(q);

	if (s->crash) {		/* every voter was read: no shortcut */
		vote_and_finish(c, s);
		return;
	}
	switch (q->opt.read_policy) {
	case QB_READ_FIFO:
		if (s->ok) {
			qb_finish(c, s, (int)s->len, 0,
				  s->buf[__builtin_ctz(s->ok)]);
			return;
		}
		if (more) {
			qb_read_from(c, s, pick(more, n, 0, 1), PH_READ_MORE);
			return;
		}
		qb_finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	case QB_READ_THRESHOLD:
		if (s->phase != PH_READ)
			break;
		if (s->ok == s->tried && qb_all_equal(s->buf, s->ok, s->len)) {
			qb_finish(c, s, (int)s->len, 0,
				  s->buf[__builtin_ctz(s->ok)]);
			return;
		}
		if (more) {
			qb_read_from(c, s, more, PH_READ_MORE);
			return;
		}
		break;
	}
	vote_and_finish(c, s);
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
		qb_sync_voted(c, s);
		return;
	case PH_SYNC_WRITE:
		release_repairs(c, s);
		qb_finish(c, s, (int)s->len, 0, NULL);
		return;
	case PH_REPAIR:
		release_repairs(c, s);
		qb_finish(c, s, (int)s->len, 0, s->out);
		return;
	case PH_MODIFY:
		modify_done(c, s);
		return;
	case PH_FLUSH:
		if (qb_popcount(s->ok & qb_in_service(q)) >= q->opt.threshold)
			complete_modify(c, s, 0);
		else
			qb_finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	}
}

static void count_request(struct qb_ctx *c, uint32_t op, uint32_t len)
{
	struct qb_counters *d = &c->link.dev;

	switch (op) {
	case QB_OP_READ:
		QB_ADD(d->reads, 1);
		QB_ADD(d->read_bytes, len);
		break;
	case QB_OP_WRITE:
		QB_ADD(d->writes, 1);
		QB_ADD(d->write_bytes, len);
		break;
	case QB_OP_FLUSH:
		QB_ADD(d->flushes, 1);
		break;
	case QB_OP_DISCARD:
		QB_ADD(d->discards, 1);
		break;
	case QB_OP_WRITE_ZEROES:
		QB_ADD(d->write_zeroes, 1);
		break;
	}
}

void qb_launch(struct qb_ctx *c, struct qb_slot *s, uint32_t op,
	       uint32_t flags, uint64_t offset, uint32_t length, void *src)
{
	s->gen = next_gen(c, s);
	s->op = (uint8_t)op;
	s->flags = (uint8_t)flags;
	s->off = s->poff = op == QB_OP_FLUSH ? 0 : offset;
	s->len = s->plen = op == QB_OP_FLUSH ? 0 : length;
	s->src = src;
	s->retries = 0;
	s->out = NULL;
	s->crash = 0;
	c->inflight++;
	start_request(c, s);
}

/* Which of the slot's buffers p is, or -1. */
static int8_t buf_index(const struct qb_slot *s, const void *p)
{
	for (int8_t k = 0; k < QB_MAX_REPLICAS; k++)
		if (s->buf[k] == p)
			return k;
	return -1;
}

int qb_ctx_submit(struct qb_ctx *c, uint32_t slot, uint32_t op,
		  uint32_t flags, uint64_t offset, uint32_t length, void *src)
{
	struct qb_quorum *q = c->q;

	if (slot >= c->depth || c->slots[slot].phase != PH_FREE)
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
	if (op == QB_OP_WRITE) {
		int8_t k = buf_index(&c->slots[slot], src);

		if (k < 0)
			return qb_err(EINVAL, QB_ERR_INVALID,
				      "a write's data must be in one of its slot's buffers (qb_ctx_buf)");
		c->slots[slot].src_buf = k;
	}
	count_request(c, op, length);
	qb_launch(c, &c->slots[slot], op, flags, offset, length, src);
	return 0;
}

/* ---- the loop ---- */

static void wake_cqe(struct qb_ctx *c)
{
	uint64_t count;

	c->wake_armed = false;
	if (read(c->link.wake_fd, &count, sizeof(count)) < 0) {
		/* nothing pending: woken already */
	}
	unpark(c);
	if (c->parked)
		arm_wake(c);
}

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
	case K_WAKE:
		wake_cqe(c);
		return;
	case K_NBD:
		qb_nbd_event(c->nbd[ud_rep(ud)], ud_gen(ud), cqe->res);
		return;
	default:
		io_cqe(c, ud, cqe->res);
	}
}

static void run_backlog(struct qb_ctx *c)
{
	for (uint32_t i = 0; i < c->nbacklog; i++) {
		struct io_uring_cqe cqe = {
			.user_data = c->backlog[i].user_data,
			.res = c->backlog[i].res,
			.flags = c->backlog[i].flags,
		};

		handle_cqe(c, &cqe);
	}
	c->nbacklog = 0;
}

static void reap_zombies(struct qb_quorum *q);
static void reap_idle_contexts(struct qb_ctx *self);

void qb_ctx_enter(struct qb_ctx *c)
{
	pthread_mutex_lock(&c->entry);
}

void qb_ctx_leave(struct qb_ctx *c)
{
	pthread_mutex_unlock(&c->entry);
}

/*
 * How many CQEs can arrive before any request can move on: the fewest I/Os
 * that any phase with I/O out still waits for. Waiting for that many
 * instead of one saves wake-ups and loses nothing. (A ublk fetch, the tick
 * or a wake-up also counts as a CQE, so the wait never outlasts what can
 * happen.)
 */
static uint32_t progress_bound(struct qb_ctx *c)
{
	uint32_t m = UINT32_MAX;

	/* one poll CQE of an NBD connection may bring many answers */
	if (!c->inflight || c->parked || c->has_nbd)
		return 1;
	for (uint32_t i = 0; i < c->depth && m > 1; i++) {
		struct qb_slot *s = &c->slots[i];

		if (s->pending && s->pending < m)
			m = s->pending;
	}
	return m == UINT32_MAX ? 1 : m;
}

int qb_ctx_run(struct qb_ctx *c, uint32_t wait_nr)
{
	struct io_uring_cqe *cqe;
	unsigned head, seen = 0;
	uint64_t finished = c->finished;
	int ret;

	if (c->nbacklog) {
		run_backlog(c);
		wait_nr = 0;
	}
	if (__atomic_load_n(&c->q->zombies, __ATOMIC_ACQUIRE))
		reap_zombies(c->q);
	retry_deferred(c);
	unpark(c);
	/* progress made (a request may have completed on the way: a round it
	 * waited for ended before it was seen waiting): do not block */
	if (run_ready(c) || c->finished != finished)
		wait_nr = 0;
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
	if (ret == -EBUSY || ret == -EAGAIN)
		ret = 0;	/* CQEs to reap first: done below */
	if (ret < 0 && ret != -EINTR)
		return qb_err(-ret, QB_ERR_OTHER, "io_uring: %s",
			      strerror(-ret));
	io_uring_for_each_cqe(&c->ring, head, cqe) {
		handle_cqe(c, cqe);
		seen++;
	}
	io_uring_cq_advance(&c->ring, seen);
	run_backlog(c);
	run_ready(c);
	return 0;
}

int qb_ctx_poll(struct qb_ctx *c)
{
	int ret;

	qb_err_clear();
	qb_ctx_enter(c);
	ret = qb_ctx_run(c, 0);
	qb_ctx_leave(c);
	reap_idle_contexts(c);
	return ret;
}

/* ---- life cycle ---- */

static uint32_t pow2_at_least(uint64_t v, uint32_t lo, uint32_t hi)
{
	uint32_t e = lo;

	while (e < v && e < hi)
		e <<= 1;
	return e;
}

static int ring_init(struct qb_ctx *c, uint32_t flags)
{
	struct qb_quorum *q = c->q;
	struct io_uring_params p;
	int fds[QB_MAX_REPLICAS];
	int ret;

	memset(&p, 0, sizeof(p));
	/* CQEs: a replica I/O of every slot on as many replicas as a set can
	 * have, with fault heads; beyond that the kernel keeps them
	 * (IORING_FEAT_NODROP) and qb_ctx_sqe makes room */
	p.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER |
		  IORING_SETUP_CQSIZE;
	p.cq_entries = pow2_at_least((uint64_t)c->depth *
				     (2 * QB_MAX_REPLICAS + 4), 128, 65536);
	if (flags & QB_CTX_SQE128)
		p.flags |= IORING_SETUP_SQE128;
	ret = io_uring_queue_init_params(pow2_at_least(c->depth * 4ULL, 64,
						       4096),
					 &c->ring, &p);
	if (ret == -EINVAL) {	/* an older kernel: plain ring */
		p.flags &= IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
		ret = io_uring_queue_init_params(pow2_at_least(c->depth * 4ULL,
							       64, 4096),
						 &c->ring, &p);
	}
	if (ret < 0)
		return qb_err(-ret, QB_ERR_OTHER, "io_uring setup: %s",
			      strerror(-ret));
	c->ring_ok = true;
	/* every index a replica can take: one attached later fills its own */
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		fds[r] = r < qb_replicas(q) ? q->rep[r].fd : -1;
	c->files_gen = __atomic_load_n(&q->files_gen, __ATOMIC_ACQUIRE);
	ret = io_uring_register_files(&c->ring, fds, QB_MAX_REPLICAS);
	if (ret < 0)
		return qb_err(-ret, QB_ERR_OTHER,
			      "io_uring: cannot register the replicas: %s",
			      strerror(-ret));
	return 0;
}

static size_t bufmem_len(struct qb_ctx *c)
{
	return (size_t)c->q->opt.max_io * QB_MAX_REPLICAS * c->depth;
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
	mem = mmap(NULL, bufmem_len(c), PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		return qb_err(ENOMEM, QB_ERR_OTHER,
			      "cannot map %zu bytes of request buffers",
			      bufmem_len(c));
	c->bufmem = mem;
	for (uint32_t i = 0; i < c->depth; i++) {
		struct qb_slot *s = &c->slots[i];

		for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++) {
			s->buf[r] = mem + per * i + (size_t)q->opt.max_io * r;
			s->hang_fd[r] = -1;
		}
		s->snap = calloc(c->max_blocks, sizeof(*s->snap));
		s->win = calloc(c->max_blocks, sizeof(*s->win));
		s->held = calloc(c->max_blocks, 1);
		if (!s->snap || !s->win || !s->held)
			return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	}
	return 0;
}

static void slots_free(struct qb_ctx *c)
{
	if (!c->slots)
		return;
	for (uint32_t i = 0; i < c->depth; i++) {
		free(c->slots[i].snap);
		free(c->slots[i].win);
		free(c->slots[i].held);
	}
	free(c->slots);
	c->slots = NULL;
}

/* The context's memory once its ring is gone; buffers only when no I/O
 * can still use them. */
static void ctx_free(struct qb_ctx *c, bool unmap)
{
	if (unmap) {
		if (c->bufmem)
			munmap(c->bufmem, bufmem_len(c));
		for (uint32_t i = 0; i < c->nmapped; i++)
			munmap(c->mapped[i], c->q->opt.max_io);
	}
	while (c->orphans) {
		struct orphan *o = c->orphans;

		c->orphans = o->next;
		free(o);
	}
	if (c->link.wake_fd >= 0)
		close(c->link.wake_fd);
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++) {
		qb_nbd_free(c->nbd[r]);		/* a zombie's, all answered */
		if (c->link.nbd_next[r])	/* made for it, never taken */
			nbd_close(c->link.nbd_next[r]);
	}
	pthread_mutex_destroy(&c->entry);
	slots_free(c);
	free(c->spare);
	free(c->mapped);
	free(c->backlog);
	free(c);
}

/* The quorum closes with this zombie's I/O still owed: its ring goes (the
 * kernel waits for that I/O itself), its buffers stay mapped. Its NBD
 * connections are closed without waiting: the device is gone, what they
 * had out is forgotten. */
static void zombie_release(struct qb_ctx_link *l)
{
	struct qb_ctx *c = (struct qb_ctx *)((char *)l -
					     offsetof(struct qb_ctx, link));

	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		if (c->nbd[r])
			nbd_drop(c, r);
	io_uring_queue_exit(&c->ring);
	ctx_free(c, false);
}

static struct qb_ctx *ctx_of(struct qb_ctx_link *l)
{
	return (struct qb_ctx *)((char *)l - offsetof(struct qb_ctx, link));
}

/* The kept results of a context with nothing in flight: late answers. */
static void reap_backlog(struct qb_ctx *c)
{
	for (uint32_t i = 0; i < c->nbacklog; i++) {
		uint64_t ud = c->backlog[i].user_data;

		if (ud & QB_UD_FOREIGN)
			continue;
		if (ud_kind(ud) == K_TICK)
			c->tick_armed = false;
		else if (ud_kind(ud) == K_WAKE)
			c->wake_armed = false;
		else if (ud_kind(ud) == K_NBD)	/* may add to the backlog */
			qb_nbd_event(c->nbd[ud_rep(ud)], ud_gen(ud),
				     c->backlog[i].res);
		else if (ud_kind(ud) != K_IGNORE)
			orphan_cqe(c, ud, c->backlog[i].res);
	}
	c->nbacklog = 0;
}

/* The NBD connections of a context no thread is in, with commands out:
 * a poll CQE handled here re-arms the poll on the context's ring, but only
 * its own thread can submit there (IORING_SETUP_SINGLE_ISSUER), and a
 * zombie's never will. So they are driven without the ring, at most every
 * QB_DRIVE_NS (reapers come by on every loop while there are zombies). */
#define QB_DRIVE_NS 10000000ULL

static void drive_nbd(struct qb_ctx *c)
{
	uint64_t now;

	if (!c->has_nbd || (now = qb_now_ns()) < c->drive_at)
		return;
	c->drive_at = now + QB_DRIVE_NS;
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		if (c->nbd[r])
			qb_nbd_drive(c->nbd[r]);
}

/* The CQEs of a context no thread is in: only abandoned I/O's, and the
 * engine's own timers and wake-ups, can be there. */
static void reap_idle(struct qb_ctx *c)
{
	struct io_uring_cqe *cqe;
	unsigned head, seen = 0;

	io_uring_for_each_cqe(&c->ring, head, cqe) {
		uint64_t ud = cqe->user_data;

		seen++;
		if (ud & QB_UD_FOREIGN)
			continue;
		switch (ud_kind(ud)) {
		case K_TICK:
			c->tick_armed = false;
			break;
		case K_WAKE:
			c->wake_armed = false;
			break;
		case K_IGNORE:
			break;
		case K_NBD:	/* answers come to the backlog */
			qb_nbd_event(c->nbd[ud_rep(ud)], ud_gen(ud), cqe->res);
			break;
		default:
			orphan_cqe(c, ud, cqe->res);
		}
	}
	io_uring_cq_advance(&c->ring, seen);
	drive_nbd(c);
	reap_backlog(c);
}

/* Late completions of destroyed contexts; those whose I/O is all back are
 * freed. The list is taken whole (events take the quorum's lock). */
static void reap_zombies(struct qb_quorum *q)
{
	struct qb_ctx_link *list, *keep = NULL;

	pthread_mutex_lock(&q->lock);
	list = q->zombies;
	__atomic_store_n(&q->zombies, NULL, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&q->lock);
	while (list) {
		struct qb_ctx_link *l = list;
		struct qb_ctx *z = ctx_of(l);

		list = l->next;
		/* a reaper that found it while it still lived may hold it */
		if (pthread_mutex_trylock(&z->entry)) {
			l->next = keep;
			keep = l;
			continue;
		}
		reap_idle(z);
		pthread_mutex_unlock(&z->entry);
		if (z->orphans) {
			l->next = keep;
			keep = l;
			continue;
		}
		io_uring_queue_exit(&z->ring);
		ctx_free(z, true);
	}
	if (!keep)
		return;
	pthread_mutex_lock(&q->lock);
	while (keep) {
		struct qb_ctx_link *l = keep;

		keep = l->next;
		l->next = q->zombies;
		__atomic_store_n(&q->zombies, l, __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&q->lock);
}

/* Late completions of the live contexts no thread is in: an idle thread's
 * context would keep them (and its replicas' owed counts) until that
 * thread calls in again. Front ends' contexts (ublk queues) run all the
 * time and are theirs alone. */
static void reap_idle_contexts(struct qb_ctx *self)
{
	struct qb_quorum *q = self->q;
	struct qb_ctx *held[64];
	uint32_t n = 0;

	pthread_mutex_lock(&q->lock);
	for (struct qb_ctx_link *l = q->ctxs; l && n < 64; l = l->next) {
		struct qb_ctx *c = ctx_of(l);

		if (c == self || c->foreign || pthread_mutex_trylock(&c->entry))
			continue;
		if (c->inflight || !c->orphans)
			pthread_mutex_unlock(&c->entry);
		else
			held[n++] = c;	/* its entry held: it cannot go away */
	}
	pthread_mutex_unlock(&q->lock);
	for (uint32_t i = 0; i < n; i++) {
		reap_idle(held[i]);
		pthread_mutex_unlock(&held[i]->entry);
	}
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
	pthread_mutex_init(&c->entry, NULL);
	c->link.wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	tick_ms = q->opt.timeout_ms / 4;
	tick_ms = tick_ms < 5 ? 5 : tick_ms > 1000 ? 1000 : tick_ms;
	c->tick.tv_sec = tick_ms / 1000;
	c->tick.tv_nsec = (long long)(tick_ms % 1000) * 1000000;
	ret = c->link.wake_fd < 0 ?
	      qb_err(errno, QB_ERR_OTHER, "eventfd: %s", strerror(errno)) : 0;
	if (!ret)
		ret = ring_init(c, flags);
	if (!ret)
		ret = slots_init(c);
	if (!ret)
		nbd_connect_all(c);
	if (ret) {
		if (c->ring_ok)
			io_uring_queue_exit(&c->ring);
		ctx_free(c, true);
		return ret;
	}
	qb_link_add(q, &c->link);
	*out = c;
	return 0;
}

void qb_ctx_destroy(struct qb_ctx *c)
{
	struct qb_quorum *q = c->q;

	/* a reaper in another thread holds entry while it works on c */
	pthread_mutex_lock(&c->entry);
	/* whatever is still out is not waited for: it becomes orphans */
	for (uint32_t i = 0; i < c->depth; i++)
		for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
			if (c->slots[i].nout[r])
				abandon(c, &c->slots[i], r);
	/* answers already in count as late; an NBD connection with nothing
	 * out is closed. One with commands out stays with the zombie: the
	 * server may still perform them (a frozen one, when it runs again),
	 * so they are owed until they are answered, or the connection dies */
	reap_backlog(c);
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		if (c->nbd[r] && !qb_nbd_inflight(c->nbd[r]))
			nbd_drop(c, r);
	if (c->orphans) {
		c->link.release = zombie_release;
		slots_free(c);
		pthread_mutex_unlock(&c->entry);
		qb_link_remove(q, &c->link, true);
		return;
	}
	qb_link_remove(q, &c->link, false);	/* no reaper finds it now */
	pthread_mutex_unlock(&c->entry);
	if (c->ring_ok)
		io_uring_queue_exit(&c->ring);
	ctx_free(c, true);
}

/* ---- synchronous use ---- */

int64_t qb_ctx_io(struct qb_ctx *c, uint32_t op, uint32_t flags,
		  uint64_t offset, uint32_t length, void *buf)
{
	struct qb_slot *s = &c->slots[0];
	void *src = s->buf[0];
	int ret;

	qb_err_clear();
	if (op == QB_OP_WRITE && length <= c->q->opt.max_io)
		memcpy(src, buf, length);
	qb_ctx_enter(c);
	ret = qb_ctx_submit(c, 0, op, flags, offset, length, src);
	while (!ret && s->phase != PH_FREE)
		ret = qb_ctx_run(c, 1);
	qb_ctx_leave(c);
	if (ret)
		return ret;
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

/* ---- diagnosis ---- */

static const char *const phase_names[] = {
	"free", "hold", "read", "read-more", "repair", "mark", "modify",
	"flush", "states", "sync", "sync-write",
};

static uint32_t list_len(const struct qb_slot *s)
{
	uint32_t n = 0;

	for (; s; s = s->next)
		n++;
	return n;
}

/* One context, as far as reading it from another thread can tell. */
static void describe_ctx(struct qb_ctx *c, FILE *f, uint64_t now)
{
	uint32_t norphans = 0;

	for (struct orphan *o = c->orphans; o; o = o->next)
		norphans++;
	fprintf(f, "ctx %p: inflight %u, deferred %u, parked %u (waiting %d), "
		"ready %u, tick %s, wake %s, orphans %u, backlog %u, "
		"front end %s\n", (void *)c, c->inflight, list_len(c->deferred),
		list_len(c->parked), __atomic_load_n(&c->link.waiting,
						     __ATOMIC_RELAXED),
		list_len(c->ready), c->tick_armed ? "armed" : "off",
		c->wake_armed ? "armed" : "off", norphans, c->nbacklog,
		c->foreign ? "yes" : "no");
	for (uint32_t i = 0; c->slots && i < c->depth; i++) {
		struct qb_slot *s = &c->slots[i];

		if (s->phase == PH_FREE && !s->pending)
			continue;
		fprintf(f, "  slot %u gen %u: %s op %u flags %#x off %llu len %u "
			"step %llu+%u pending %u ticket %llu ok %#x bad %#x "
			"tried %#x", i, s->gen,
			s->phase < sizeof(phase_names) / sizeof(phase_names[0]) ?
			phase_names[s->phase] : "?", s->op, s->flags,
			(unsigned long long)s->off, s->len,
			(unsigned long long)s->poff, s->plen, s->pending,
			(unsigned long long)s->ticket, s->ok, s->bad, s->tried);
		for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
			if (s->nout[r])
				fprintf(f, " [r%u out %u for %llu ms]", r,
					s->nout[r], (unsigned long long)
					((now - s->since[r]) / 1000000));
		fputc('\n', f);
	}
	for (struct orphan *o = c->orphans; o; o = o->next)
		fprintf(f, "  orphan slot %u gen %u replica %u left %u off %llu "
			"len %u\n", o->slot, o->gen, o->replica, o->left,
			(unsigned long long)o->off, o->len);
}

int qb_quorum_describe(struct qb_quorum *q, char *buf, size_t len)
{
	FILE *f = fmemopen(buf, len, "w");
	uint64_t now = qb_now_ns();
	bool locked;

	if (!f)
		return -errno;
	/* a diagnosis of a hang: the lock may be what hangs */
	locked = pthread_mutex_trylock(&q->lock) == 0;
	fprintf(f, "quorum: %u replicas, in service %#x, writable %#x%s\n",
		qb_replicas(q), qb_in_service(q), qb_writable(q),
		locked ? "" : " (its lock is held: read without it)");
	for (uint32_t r = 0; r < qb_replicas(q); r++)
		fprintf(f, "replica %u: state %d owed %u late %llu\n", r,
			__atomic_load_n(&q->rep[r].state, __ATOMIC_RELAXED),
			__atomic_load_n(&q->rep[r].owed, __ATOMIC_RELAXED),
			(unsigned long long)__atomic_load_n(&q->rep[r].late,
							    __ATOMIC_RELAXED));
	if (q->bitmap)
		qb_bitmap_describe(q, f);
	for (struct qb_ctx_link *l = q->ctxs; l; l = l->next)
		describe_ctx(ctx_of(l), f, now);
	for (struct qb_ctx_link *l = q->zombies; l; l = l->next)
		fprintf(f, "zombie %p\n", (void *)ctx_of(l));
	if (locked)
		pthread_mutex_unlock(&q->lock);
	fclose(f);
	buf[len - 1] = 0;
	return 0;
}
