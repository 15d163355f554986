/*
 * bitmap.c: the write-intent bitmap of a live replica set, and the one
 * thread that writes all of its metadata (bitmap pages and headers).
 *
 * Write intent: before a write is issued, its regions' bits must be on
 * stable storage on every replica that gets the write. Per region the engine
 * counts writes in flight and keeps a `durable` flag: the fast path is an
 * atomic increment and a load. A write to a region whose bit is not durable
 * sets it in the image and waits, parked in its engine (which goes on with
 * other requests), for the writer's round that puts it on every writable
 * replica.
 *
 * The writer works in rounds. A round takes all the work asked for so far:
 * a clean (below), the image pages changed since the last round, and the
 * headers when a replica's state changed. It writes each to every writable
 * replica at once on its own io_uring, within the replica timeout. A replica
 * that fails or does not answer in time is taken out, and the round then
 * writes the headers (without it) so that they record it. An I/O that did
 * not answer is abandoned, never cancelled (it may still run): it is owed
 * until its completion comes back, and what it reads stays as it was: the
 * image only gains bits while any member is out of service, and a replica's
 * own header buffer is not encoded again until it rejoins, which waits for
 * everything it owes. When a round ends, every context parked on it is
 * woken. One writer means pages are never written out of order, and the
 * marks of all queues go out together.
 *
 * Clean: a region goes clean lazily, when idle, without writes in flight,
 * only while every member is in service (so the bitmap also records
 * everything a failed or resyncing member missed), and only once an
 * fdatasync of every replica has succeeded (a disk's cache could still lose
 * the writes the bit covered). If any of that fails, no bit is cleared.
 * Writer and engine meet Dekker-style on (inflight, durable), both
 * sequentially consistent: the engine bumps inflight then reads durable; the
 * clean drops durable then reads inflight, and backs off if a write came in.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <libnbd.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "bitmap.h"
#include "nbd.h"

#define PAGE 4096ULL
#define RING_ENTRIES 128	/* two SQEs per replica and call, and cancels */

/* Writer user_data: call (32) | kind (3) | replica (5). */
enum wkind { W_IO = 1, W_IGNORE = 2, W_WORK = 3, W_NBD = 4 };

static inline uint64_t wud(uint32_t call, uint32_t kind, uint32_t r)
{
	return (uint64_t)call << 32 | kind << 5 | r;
}

static inline uint32_t wud_call(uint64_t ud) { return (uint32_t)(ud >> 32); }
static inline uint32_t wud_kind(uint64_t ud) { return (ud >> 5) & 7; }
static inline uint32_t wud_rep(uint64_t ud) { return ud & 31; }

/* One replica's part of a writer call: buf NULL means fdatasync. */
struct wio {
	const void *buf;
	uint64_t off;
};

static void lock(struct qb_bitmap *b)
{
	pthread_mutex_lock(&b->lock);
}

static void unlock(struct qb_bitmap *b)
{
	pthread_mutex_unlock(&b->lock);
}

static uint32_t now_ms(const struct qb_bitmap *b)
{
	return (uint32_t)((qb_now_ns() - b->t0) / 1000000);
}

static bool image_bit(const uint8_t *image, uint32_t i)
{
	return image[i / 8] & (1u << (i % 8));
}

static void dirty(struct qb_bitmap *b, uint32_t region)
{
	uint64_t p = region / 8 / PAGE;

	if (p < b->dirty_lo)
		b->dirty_lo = p;
	if (p > b->dirty_hi || b->dirty_hi == UINT64_MAX)
		b->dirty_hi = p;
}

/* Ask for round r to run; under the lock. */
static void ask(struct qb_bitmap *b, uint64_t r)
{
	if (r > b->want)
		b->want = r;
}

void qb_bitmap_kick(struct qb_quorum *q)
{
	uint64_t one = 1;

	/* fails only when the count is saturated: it is readable anyway */
	(void)!write(q->bitmap->work_fd, &one, sizeof(one));
}

uint64_t qb_bitmap_done(const struct qb_quorum *q)
{
	return __atomic_load_n(&q->bitmap->round_done, __ATOMIC_SEQ_CST);
}

uint64_t qb_bitmap_states_round(const struct qb_quorum *q)
{
	return __atomic_load_n(&q->bitmap->states_round, __ATOMIC_ACQUIRE);
}

/* The round is named before the state change is made visible (the caller
 * changes masks after this, under the same lock), so whoever sees the
 * change also sees that it must wait for this round. */
uint64_t qb_bitmap_want_headers_locked(struct qb_quorum *q, uint32_t extra)
{
	struct qb_bitmap *b = q->bitmap;
	uint64_t r = b->round_next;

	b->headers = true;
	b->extra |= extra;
	__atomic_store_n(&b->states_round, r, __ATOMIC_RELEASE);
	ask(b, r);
	return r;
}

void qb_bitmap_wait(struct qb_quorum *q, uint64_t round)
{
	struct qb_bitmap *b = q->bitmap;

	lock(b);
	while (__atomic_load_n(&b->round_done, __ATOMIC_ACQUIRE) < round)
		pthread_cond_wait(&b->cond, &b->lock);
	unlock(b);
}

/* ---- the engine's side ---- */

static void regions(const struct qb_bitmap *b, uint64_t off, uint64_t len,
		    uint32_t *i0, uint32_t *i1)
{
	*i0 = (uint32_t)(off >> b->shift);
	*i1 = (uint32_t)((off + len - 1) >> b->shift);
}

uint64_t qb_bitmap_begin(struct qb_quorum *q, uint64_t off, uint64_t len)
{
	struct qb_bitmap *b = q->bitmap;
	uint32_t i0, i1;
	uint64_t round;
	bool need = false;

	regions(b, off, len, &i0, &i1);
	for (uint32_t i = i0; i <= i1; i++) {
		__atomic_fetch_add(&b->inflight[i], 1, __ATOMIC_SEQ_CST);
		if (!__atomic_load_n(&b->durable[i], __ATOMIC_SEQ_CST))
			need = true;
	}
	if (!need)
		return 0;
	lock(b);
	for (uint32_t i = i0; i <= i1; i++)
		if (!image_bit(b->image, i)) {
			b->image[i / 8] |= (uint8_t)(1u << (i % 8));
			dirty(b, i);
		}
	/* the next round writes it; or, if it is being written or cleaned
	 * now, says whether it is on disk */
	round = b->round_next;
	ask(b, round);
	unlock(b);
	qb_bitmap_kick(q);
	return round;
}

void qb_bitmap_end(struct qb_quorum *q, uint64_t off, uint64_t len)
{
	struct qb_bitmap *b = q->bitmap;
	uint32_t i0, i1, t = now_ms(b);

	regions(b, off, len, &i0, &i1);
	for (uint32_t i = i0; i <= i1; i++) {
		__atomic_store_n(&b->last_ms[i], t, __ATOMIC_RELAXED);
		__atomic_fetch_sub(&b->inflight[i], 1, __ATOMIC_SEQ_CST);
	}
}

/* ---- the writer ---- */

static void arm_work(struct qb_bitmap *b)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&b->ring);

	if (!sqe)
		return;		/* the ring is full: armed at the next call */
	io_uring_prep_poll_add(sqe, b->work_fd, POLLIN);
	sqe->user_data = wud(0, W_WORK, 0);
}

/* A CQE outside the current call's: work asked for, or the late answer of
 * an abandoned I/O. */
static void other_cqe(struct qb_quorum *q, uint64_t ud, int res)
{
	struct qb_bitmap *b = q->bitmap;
	uint64_t count;

	switch (wud_kind(ud)) {
	case W_WORK:
		if (read(b->work_fd, &count, sizeof(count)) < 0) {
			/* nothing pending: a wake-up already consumed */
		}
		arm_work(b);
		return;
	case W_IO:
		qb_owed(q, wud_rep(ud), -1);
		qb_event(q, QB_EV_LATE, (int)wud_rep(ud), b->off, 0,
			 res < 0 ? -res : 0);
		return;
	case W_NBD:	/* its answers come back through wio_result */
		qb_nbd_event(b->nbd[wud_rep(ud)], wud_call(ud), res);
		return;
	}
}

struct call {
	uint32_t id;
	uint32_t pending;	/* replicas not answered yet */
	uint32_t bad;		/* failed */
	uint32_t len;
};

/* One result: the current call's, or another (c: b->cur). */
static void wio_result(struct qb_quorum *q, uint64_t ud, int res)
{
	struct call *c = q->bitmap->cur;
	uint32_t r = wud_rep(ud), bit = 1u << r;

	if (c && wud_kind(ud) == W_IO && wud_call(ud) == c->id &&
	    (c->pending & bit)) {
		c->pending &= ~bit;
		if (res != (int)c->len)
			c->bad |= bit;
		return;
	}
	if (wud_kind(ud) != W_IGNORE)
		other_cqe(q, ud, res);
}

static void reap(struct qb_quorum *q, struct call *c)
{
	struct qb_bitmap *b = q->bitmap;
	struct io_uring_cqe *cqe;
	unsigned head, seen = 0;

	b->cur = c;
	io_uring_for_each_cqe(&b->ring, head, cqe) {
		seen++;
		wio_result(q, cqe->user_data, cqe->res);
	}
	io_uring_cq_advance(&b->ring, seen);
	b->cur = NULL;
}

/* ---- the writer's NBD connections (nbd.c) ---- */

static void nbd_sink(void *arg, uint64_t ud, int res)
{
	wio_result(arg, ud, res);	/* it only counts: no I/O from here */
}

static uint64_t nbd_poll_ud(uint32_t r, uint32_t gen)
{
	return wud(gen, W_NBD, r);
}

static struct io_uring_sqe *nbd_sqe(void *arg)
{
	return io_uring_get_sqe(&((struct qb_quorum *)arg)->bitmap->ring);
}

static const struct qb_nbd_ops nbd_ops = {
	.sink = nbd_sink, .poll_ud = nbd_poll_ud, .sqe = nbd_sqe,
};

/* Replica r's writer connection is h now (NULL: none). What the old one
 * had out will never come back: no longer owed. */
static void nbd_use(struct qb_quorum *q, uint32_t r, struct nbd_handle *h)
{
	struct qb_bitmap *b = q->bitmap;
	uint32_t dropped = qb_nbd_free(b->nbd[r]);

	if (dropped)
		qb_owed_forget(q, r, dropped);
	b->nbd[r] = h ? qb_nbd_new(h, r, &nbd_ops, q) : NULL;
	if (h && !b->nbd[r])
		nbd_close(h);
}

/* Connections that rejoins made for the writer. */
static void nbd_take_new(struct qb_quorum *q)
{
	struct qb_bitmap *b = q->bitmap;

	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++) {
		struct nbd_handle *h;

		if (!__atomic_load_n(&b->nbd_next[r], __ATOMIC_ACQUIRE))
			continue;
		h = __atomic_exchange_n(&b->nbd_next[r], NULL, __ATOMIC_ACQ_REL);
		if (h)
			nbd_use(q, r, h);
	}
}

/* Replica r's metadata write (buf NULL: flush) on its connection: the
 * result comes to wio_result. */
static void nbd_wio(struct qb_quorum *q, uint32_t r, const struct wio *io,
		    uint32_t len, uint64_t ud)
{
	struct qb_nbd *n = q->bitmap->nbd[r];

	if (!n) {
		wio_result(q, ud, -ENOTCONN);
		return;
	}
	qb_nbd_issue(n, q->rep[r].nbd_caps, io->buf ? QB_OP_WRITE : QB_OP_FLUSH,
		     true, (void *)io->buf, io->off, len, ud);
}

/*
 * Write len bytes from io[r].buf at io[r].off (or fdatasync, buf NULL) on
 * every replica in mask at once, each on stable storage before it counts,
 * within the replica timeout. Returns the replicas that failed; *slow gets
 * those of them that did not answer in time (abandoned: owed from now on).
 * The time of one replica's write, not the sum.
 */
static uint32_t write_all(struct qb_quorum *q, uint32_t mask,
			  const struct wio *io, uint32_t len, uint32_t *slow)
{
	struct qb_bitmap *b = q->bitmap;
	struct __kernel_timespec ts[QB_MAX_REPLICAS];
	uint64_t deadline = qb_now_ns() +
			    (uint64_t)q->opt.timeout_ms * 1000000ULL;
	struct call c = { .id = ++b->calls, .len = len };
	uint32_t hung = 0;
	int ret;

	nbd_take_new(q);
	b->cur = &c;	/* an NBD command may answer while being sent */
	for (uint32_t r = 0; r < qb_replicas(q); r++) {
		uint32_t op = io[r].buf ? QB_OP_WRITE : QB_OP_FLUSH;
		struct io_uring_sqe *sqe;
		struct qb_fault f;

		if (!(mask & (1u << r)))
			continue;
		if (!qb_fault_match(q, r, op, io[r].off, len ? len : 1, &f))
			f.kind = QB_FAULT_NONE;
		if (f.kind == QB_FAULT_EIO) {
			c.bad |= 1u << r;
			continue;
		}
		if (q->rep[r].is_nbd) {
			c.pending |= 1u << r;
			nbd_wio(q, r, &io[r], len, wud(c.id, W_IO, r));
			continue;
		}
		/* room for two SQEs per replica is there (RING_ENTRIES) */
		if (io_uring_sq_space_left(&b->ring) < 2) {
			c.bad |= 1u << r;
			continue;
		}
		sqe = io_uring_get_sqe(&b->ring);
		if (qb_fault_head(sqe, &f, &ts[r])) {
			if (f.kind == QB_FAULT_HANG) {	/* no I/O behind it */
				sqe->user_data = wud(c.id, W_IO, r);
				hung |= 1u << r;
				c.pending |= 1u << r;
				continue;
			}
			sqe->user_data = wud(0, W_IGNORE, 0);
			sqe = io_uring_get_sqe(&b->ring);
		}
		if (io[r].buf) {
			io_uring_prep_write(sqe, q->rep[r].fd, io[r].buf, len,
					    io[r].off);
			sqe->rw_flags = RWF_DSYNC;
		} else {
			io_uring_prep_fsync(sqe, q->rep[r].fd,
					    IORING_FSYNC_DATASYNC);
		}
		sqe->user_data = wud(c.id, W_IO, r);
		c.pending |= 1u << r;
	}
	b->cur = NULL;
	while ((ret = io_uring_submit(&b->ring)) < 0 && qb_now_ns() < deadline) {
		if (ret != -EBUSY && ret != -EAGAIN && ret != -EINTR)
			break;
		reap(q, &c);	/* room in the CQ, then again */
	}
	while (c.pending) {
		struct io_uring_cqe *cqe;
		uint64_t now = qb_now_ns();
		struct __kernel_timespec left;

		if (now >= deadline)
			break;
		left.tv_sec = (long long)((deadline - now) / 1000000000ULL);
		left.tv_nsec = (long long)((deadline - now) % 1000000000ULL);
		/* submits too: an NBD connection re-arms its poll in reap */
		ret = io_uring_submit_and_wait_timeout(&b->ring, &cqe, 1, &left,
						       NULL);
		if (ret < 0 && ret != -EINTR && ret != -ETIME)
			break;
		reap(q, &c);
	}
	/* what did not answer is abandoned, never reused; a hang (a fault
	 * with no I/O behind it) is cancelled so that it comes back */
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++) {
		struct io_uring_sqe *sqe;

		if (!(c.pending & (1u << r)))
			continue;
		qb_owed(q, r, 1);
		if ((hung & (1u << r)) && (sqe = io_uring_get_sqe(&b->ring))) {
			io_uring_prep_cancel64(sqe, wud(c.id, W_IO, r), 0);
			sqe->user_data = wud(0, W_IGNORE, 0);
		}
	}
	if (hung & c.pending)
		io_uring_submit(&b->ring);
	*slow = c.pending;
	return c.bad | c.pending;
}

/* Take out the replicas in bad (their metadata write failed or did not
 * answer): this round's headers record it. */
static void fail_bad(struct qb_quorum *q, uint64_t round, uint32_t bad,
		     uint32_t slow, const struct wio *io, uint32_t len)
{
	struct qb_bitmap *b = q->bitmap;
	uint32_t out = 0;

	if (!bad)
		return;
	lock(b);
	if (round > __atomic_load_n(&b->states_round, __ATOMIC_ACQUIRE))
		__atomic_store_n(&b->states_round, round, __ATOMIC_RELEASE);
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		if ((bad & (1u << r)) && qb_replica_take_out(q, r))
			out |= 1u << r;
	if (out && qb_writable(q))
		b->headers = true;
	unlock(b);
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		if (slow & (1u << r))
			__atomic_add_fetch(&q->rep[r].meta_timeouts, 1,
					   __ATOMIC_RELAXED);
	for (uint32_t r = 0; out; r++, out >>= 1)
		if (out & 1)
			qb_event(q, QB_EV_REPLICA_FAILED, (int)r, io[r].off,
				 len ? len : PAGE,
				 (slow & (1u << r)) ? ETIMEDOUT : EIO);
}

static bool all_in_service(struct qb_quorum *q)
{
	struct qb_set *set = &q->bitmap->set;
	uint32_t members = 0;

	for (uint32_t s = 0; s < set->nmembers; s++) {
		if (set->members[s].state == QB_REPLICA_REMOVED)
			continue;
		if (set->members[s].state != QB_REPLICA_IN_SERVICE)
			return false;
		members++;
	}
	return qb_popcount(qb_in_service(q)) == members;
}

/* A clean: choose idle regions, fdatasync everything, then clear their bits
 * in the image (this round writes the pages). Returns how many. */
static int clean_run(struct qb_quorum *q, uint64_t round)
{
	struct qb_bitmap *b = q->bitmap;
	struct wio io[QB_MAX_REPLICAS];
	uint32_t n = 0, bad, slow, t;
	int32_t idle = (int32_t)b->clean_idle_ms;

	lock(b);
	if (b->pinned || !all_in_service(q)) {
		unlock(b);
		return 0;
	}
	t = now_ms(b);
	for (uint32_t i = 0; i < b->nregions; i++) {
		uint32_t last = __atomic_load_n(&b->last_ms[i], __ATOMIC_RELAXED);

		b->cand[i] = 0;
		/* signed: a write that ended after t was read is not idle */
		if (!image_bit(b->image, i) ||
		    __atomic_load_n(&b->inflight[i], __ATOMIC_SEQ_CST) ||
		    (int32_t)(t - last) < idle)
			continue;
		__atomic_store_n(&b->durable[i], 0, __ATOMIC_SEQ_CST);
		if (__atomic_load_n(&b->inflight[i], __ATOMIC_SEQ_CST)) {
			__atomic_store_n(&b->durable[i], 1, __ATOMIC_SEQ_CST);
			continue;
		}
		b->cand[i] = 1;
		n++;
	}
	unlock(b);
	if (!n)
		return 0;
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		io[r] = (struct wio){ NULL, b->off };
	bad = write_all(q, qb_writable(q), io, 0, &slow);
	fail_bad(q, round, bad, slow, io, 0);
	lock(b);
	/* a failed sync, or a member gone meanwhile: every bit stays (they
	 * never left the disk, so they are durable again) */
	bad = bad || !all_in_service(q);
	for (uint32_t i = 0; i < b->nregions; i++) {
		if (!b->cand[i])
			continue;
		if (bad || __atomic_load_n(&b->inflight[i], __ATOMIC_SEQ_CST)) {
			__atomic_store_n(&b->durable[i], 1, __ATOMIC_SEQ_CST);
			n--;
			continue;
		}
		b->image[i / 8] &= (uint8_t)~(1u << (i % 8));
		dirty(b, i);
	}
	unlock(b);
	return (int)n;
}

/* The image pages changed since the last round, to every writable replica;
 * then the regions whose bits they held are durable. */
static void pages_run(struct qb_quorum *q, uint64_t round)
{
	struct qb_bitmap *b = q->bitmap;
	struct wio io[QB_MAX_REPLICAS];
	uint64_t p0, p1, len;
	uint32_t bad, slow;

	lock(b);
	p0 = b->dirty_lo;
	p1 = b->dirty_hi;
	b->dirty_lo = UINT64_MAX;
	b->dirty_hi = UINT64_MAX;
	if (p0 == UINT64_MAX) {
		unlock(b);
		return;
	}
	len = (p1 - p0 + 1) * PAGE;
	/* which bits go out now: marks made later wait for the next round */
	memcpy(b->snap + p0 * PAGE, b->image + p0 * PAGE, len);
	unlock(b);
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		io[r] = (struct wio){ b->image + p0 * PAGE, b->off + p0 * PAGE };
	bad = write_all(q, qb_writable(q), io, (uint32_t)len, &slow);
	fail_bad(q, round, bad, slow, io, (uint32_t)len);
	for (uint64_t i = p0 * PAGE * 8; i < (p1 + 1) * PAGE * 8 &&
	     i < b->nregions; i++)
		if (image_bit(b->snap, (uint32_t)i))
			__atomic_store_n(&b->durable[i], 1, __ATOMIC_SEQ_CST);
}

/* Record every replica's state in every writable replica's header (and in
 * the `extra` ones': a removed replica learns it too), one more event;
 * again while a header write takes a replica out. */
static void headers_run(struct qb_quorum *q, uint64_t round)
{
	struct qb_bitmap *b = q->bitmap;
	struct qb_set *set = &b->set;
	struct wio io[QB_MAX_REPLICAS];
	uint32_t mask, extra, bad, slow;

	for (;;) {
		lock(b);
		if (!b->headers) {
			unlock(b);
			return;
		}
		b->headers = false;
		extra = b->extra;
		b->extra = 0;
		set->events++;
		set->seq++;
		for (uint32_t r = 0; r < qb_replicas(q); r++) {
			struct qb_meta *m = &set->hdr[r];

			/* a removed replica's slot may have a new owner */
			if (memcmp(set->members[m->slot].uuid, m->replica_uuid,
				   16))
				continue;
			set->members[m->slot].state = (uint32_t)
				__atomic_load_n(&q->rep[r].state, __ATOMIC_ACQUIRE);
		}
		mask = qb_writable(q);
		for (uint32_t r = 0; r < qb_replicas(q); r++) {
			struct qb_meta *m = &set->hdr[r];

			if (!((mask | extra) & (1u << r)))
				continue;
			m->events = set->events;
			m->seq = set->seq;
			m->nmembers = set->nmembers;
			memcpy(m->members, set->members, sizeof(m->members));
			qb_meta_encode(m, b->hbuf + (size_t)r * QB_META_HDR_BYTES);
			io[r].buf = b->hbuf + (size_t)r * QB_META_HDR_BYTES;
			io[r].off = qb_meta_header_off(m);
		}
		unlock(b);
		bad = write_all(q, mask | extra, io, QB_META_HDR_BYTES, &slow);
		/* a removed replica's own header is best effort */
		fail_bad(q, round, bad & mask, slow, io, QB_META_HDR_BYTES);
	}
}

static void round_run(struct qb_quorum *q)
{
	struct qb_bitmap *b = q->bitmap;
	uint64_t round;
	bool clean;
	int cleared = 0;

	lock(b);
	round = b->round_next++;
	clean = b->clean;
	b->clean = false;
	unlock(b);
	if (clean)
		cleared = clean_run(q, round);
	pages_run(q, round);
	headers_run(q, round);
	lock(b);
	if (clean)
		b->cleared = cleared;
	/* seq_cst, like the parked side's store of `waiting` and its load of
	 * this: one of the two sees the other (qb_links_wake) */
	__atomic_store_n(&b->round_done, round, __ATOMIC_SEQ_CST);
	pthread_cond_broadcast(&b->cond);
	unlock(b);
	qb_links_wake(q);
}

static void *writer_main(void *arg)
{
	struct qb_quorum *q = arg;
	struct qb_bitmap *b = q->bitmap;

	arm_work(b);
	for (;;) {
		bool work, quit;

		lock(b);
		work = b->want > __atomic_load_n(&b->round_done, __ATOMIC_RELAXED);
		quit = b->quit;
		unlock(b);
		if (work) {
			round_run(q);
			continue;
		}
		if (quit)
			break;
		io_uring_submit_and_wait(&b->ring, 1);
		reap(q, NULL);
	}
	return NULL;
}

/* ---- the quorum's metadata, from outside ---- */

void qb_bitmap_describe(struct qb_quorum *q, FILE *f)
{
	struct qb_bitmap *b = q->bitmap;

	/* read without the lock: a hang being diagnosed may hold it */
	fprintf(f, "bitmap: round next %llu done %llu want %llu states %llu, "
		"clean asked %d, headers %d, dirty pages %llu-%llu, quit %d\n",
		(unsigned long long)b->round_next,
		(unsigned long long)__atomic_load_n(&b->round_done,
						    __ATOMIC_RELAXED),
		(unsigned long long)b->want,
		(unsigned long long)__atomic_load_n(&b->states_round,
						    __ATOMIC_RELAXED),
		b->clean, b->headers, (unsigned long long)b->dirty_lo,
		(unsigned long long)b->dirty_hi, b->quit);
}

int qb_quorum_clean(struct qb_quorum *q, uint32_t idle_ms)
{
	struct qb_bitmap *b = q->bitmap;
	uint64_t round;
	int cleared;

	qb_err_clear();
	if (!b)
		return 0;
	lock(b);
	b->clean = true;
	b->clean_idle_ms = idle_ms > INT32_MAX ? INT32_MAX : idle_ms;
	round = b->round_next;
	ask(b, round);
	unlock(b);
	qb_bitmap_kick(q);
	qb_bitmap_wait(q, round);
	lock(b);
	cleared = b->cleared;
	unlock(b);
	return cleared;
}

int qb_quorum_resynced(struct qb_quorum *q)
{
	if (q->bitmap) {
		qb_quorum_region_synced(q, 0, q->size);
		lock(q->bitmap);
		q->bitmap->pinned = false;
		unlock(q->bitmap);
	}
	return 0;
}

/* ---- the crash-dirty regions not resynced yet ---- */

int qb_quorum_region_synced(struct qb_quorum *q, uint64_t offset,
			    uint64_t length)
{
	uint64_t end = offset + length, first, last;

	qb_err_clear();
	if (!q->unsynced || !length)
		return 0;
	if (end >= q->size)
		end = (uint64_t)q->unsynced_n << q->unsynced_shift;
	first = (offset + (1ULL << q->unsynced_shift) - 1) >> q->unsynced_shift;
	last = end >> q->unsynced_shift;	/* the first not covered */
	for (uint64_t i = first; i < last && i < q->unsynced_n; i++)
		if (__atomic_exchange_n(&q->unsynced[i], 0, __ATOMIC_ACQ_REL))
			__atomic_fetch_sub(&q->unsynced_left, 1,
					   __ATOMIC_ACQ_REL);
	return 0;
}

uint64_t qb_unsynced_regions(struct qb_quorum *q, uint64_t off, uint64_t len)
{
	uint64_t first, last, mask = 0;

	if (!__atomic_load_n(&q->unsynced_left, __ATOMIC_ACQUIRE) || !len)
		return 0;
	first = off >> q->unsynced_shift;
	last = (off + len - 1) >> q->unsynced_shift;
	for (uint64_t i = first; i <= last && i < q->unsynced_n &&
	     i - first < 64; i++)
		if (__atomic_load_n(&q->unsynced[i], __ATOMIC_ACQUIRE))
			mask |= 1ULL << (i - first);
	return mask;
}

static int unsynced_init(struct qb_quorum *q, const struct qb_bitmap *b)
{
	uint32_t left = 0;

	q->unsynced = calloc(b->nregions, 1);
	if (!q->unsynced)
		return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	q->unsynced_shift = b->shift;
	q->unsynced_n = b->nregions;
	for (uint32_t i = 0; i < b->nregions; i++) {
		q->unsynced[i] = b->durable[i];
		left += b->durable[i];
	}
	__atomic_store_n(&q->unsynced_left, left, __ATOMIC_RELEASE);
	return 0;
}

int64_t qb_quorum_bitmap(struct qb_quorum *q, uint8_t *out, uint64_t len)
{
	struct qb_bitmap *b = q->bitmap;

	if (!b)
		return 0;
	lock(b);
	if (out)
		memcpy(out, b->image, len < b->bytes ? len : b->bytes);
	unlock(b);
	return (int64_t)b->bytes;
}

int qb_quorum_meta(struct qb_quorum *q, uint32_t r, struct qb_meta *m)
{
	qb_err_clear();
	if (!q->bitmap)
		return qb_err(ENODATA, QB_ERR_INVALID, "the quorum has no metadata");
	if (r >= qb_replicas(q))
		return qb_err(EINVAL, QB_ERR_INVALID, "replica %u out of range", r);
	lock(q->bitmap);
	*m = q->bitmap->set.hdr[r];
	unlock(q->bitmap);
	return 0;
}

/* ---- life cycle ---- */

/* The writer's ring, eventfd and thread, for this process. */
static int writer_start(struct qb_quorum *q)
{
	struct qb_bitmap *b = q->bitmap;

	b->work_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (b->work_fd < 0)
		return qb_err(errno, QB_ERR_OTHER, "eventfd: %s", strerror(errno));
	if (io_uring_queue_init(RING_ENTRIES, &b->ring, 0) < 0)
		return qb_err(ENOMEM, QB_ERR_OTHER,
			      "io_uring for the metadata writes: cannot set up");
	b->ring_ok = true;
	/* its own connection to each NBD replica that takes writes; one it
	 * cannot reach fails at the first round */
	for (uint32_t r = 0; r < qb_replicas(q); r++) {
		struct nbd_handle *h = NULL;

		if (q->rep[r].is_nbd && (qb_writable(q) & (1u << r)) &&
		    !qb_nbd_connect(q->rep[r].path, q->opt.timeout_ms, &h))
			nbd_use(q, r, h);
	}
	qb_err_clear();
	if (pthread_create(&b->thread, NULL, writer_main, q))
		return qb_err(EAGAIN, QB_ERR_OTHER,
			      "cannot start the metadata writer thread");
	b->thread_ok = true;
	return 0;
}

/* A forked child has the parent's ring and eventfd (shared with it) and no
 * writer thread: it gets its own. Nothing may run in the quorum meanwhile. */
int qb_quorum_after_fork(struct qb_quorum *q)
{
	struct qb_bitmap *b = q->bitmap;

	qb_err_clear();
	if (!b)
		return 0;
	if (b->ring_ok)
		io_uring_queue_exit(&b->ring);	/* this process's view only */
	if (b->work_fd >= 0)
		close(b->work_fd);
	b->ring_ok = b->thread_ok = false;
	b->work_fd = -1;
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		nbd_use(q, r, NULL);	/* the parent's: reconnected below */
	pthread_mutex_init(&b->lock, NULL);
	pthread_cond_init(&b->cond, NULL);
	return writer_start(q);
}

int qb_bitmap_create(struct qb_quorum *q, const struct qb_meta *meta,
		     const uint8_t *bitmap)
{
	const struct qb_meta *m0 = &meta[0];
	struct qb_bitmap *b = calloc(1, sizeof(*b));
	uint64_t bytes = qb_meta_bitmap_bytes(m0->nregions);
	int ret;

	if (!b)
		return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	q->bitmap = b;
	b->shift = m0->region_shift;
	b->nregions = m0->nregions;
	b->off = qb_meta_bitmap_off(m0);
	b->bytes = bytes;
	b->t0 = qb_now_ns();
	b->dirty_lo = b->dirty_hi = UINT64_MAX;
	b->round_next = 1;
	b->work_fd = -1;
	b->set.events = m0->events;
	b->set.seq = m0->seq;
	b->set.nmembers = m0->nmembers;
	memcpy(b->set.members, m0->members, sizeof(b->set.members));
	for (uint32_t r = 0; r < q->n; r++) {
		b->set.hdr[r] = meta[r];
		if (meta[r].seq > b->set.seq)
			b->set.seq = meta[r].seq;
	}
	pthread_mutex_init(&b->lock, NULL);
	pthread_cond_init(&b->cond, NULL);
	b->inflight = calloc(b->nregions, sizeof(*b->inflight));
	b->last_ms = calloc(b->nregions, sizeof(*b->last_ms));
	b->durable = calloc(b->nregions, 1);
	b->cand = calloc(b->nregions, 1);
	if (!b->inflight || !b->last_ms || !b->durable || !b->cand ||
	    posix_memalign((void **)&b->hbuf, PAGE,
			   (size_t)QB_MAX_REPLICAS * QB_META_HDR_BYTES) ||
	    posix_memalign((void **)&b->image, PAGE, bytes) ||
	    posix_memalign((void **)&b->snap, PAGE, bytes))
		return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	memcpy(b->image, bitmap, bytes);
	for (uint32_t i = 0; i < b->nregions; i++) {
		b->durable[i] = image_bit(b->image, i);
		b->pinned |= b->durable[i];
	}
	ret = unsynced_init(q, b);
	if (ret)
		return ret;
	return writer_start(q);
}

void qb_bitmap_free(struct qb_quorum *q)
{
	struct qb_bitmap *b = q->bitmap;
	bool owed = false;

	if (!b)
		return;
	if (b->thread_ok) {
		lock(b);
		b->quit = true;
		unlock(b);
		qb_bitmap_kick(q);
		pthread_join(b->thread, NULL);
	}
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++) {
		nbd_use(q, r, NULL);	/* closed without waiting */
		if (b->nbd_next[r])
			nbd_close(b->nbd_next[r]);
	}
	if (b->ring_ok)
		io_uring_queue_exit(&b->ring);
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		owed |= __atomic_load_n(&q->rep[r].owed, __ATOMIC_ACQUIRE) != 0;
	/* an abandoned write may still read these: never free them then */
	if (!owed) {
		free(b->hbuf);
		free(b->image);
	}
	if (b->work_fd >= 0)
		close(b->work_fd);
	pthread_mutex_destroy(&b->lock);
	pthread_cond_destroy(&b->cond);
	free(b->inflight);
	free(b->last_ms);
	free(b->durable);
	free(b->cand);
	free(b->snap);
	free(b);
	q->bitmap = NULL;
	__atomic_store_n(&q->unsynced_left, 0, __ATOMIC_RELEASE);
	free(q->unsynced);
	q->unsynced = NULL;
}
