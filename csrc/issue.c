/*
 * issue.c: a replica I/O as SQEs on the context's ring: the fault the test
 * hook plans for it, its split into chunks that the replica's device takes
 * whole, in-thread copies for memory file systems, and the ways a replica
 * zeroes (fallocate, punching holes, writing zeros).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <poll.h>
#include <sys/uio.h>
#include <unistd.h>

#include "engine_int.h"

bool qb_fault_head(struct io_uring_sqe *sqe, const struct qb_fault *f,
		   struct __kernel_timespec *ts)
{
	switch (f->kind) {
	case QB_FAULT_HANG:	/* a poll on an eventfd that never fires */
		io_uring_prep_poll_add(sqe, f->gate_fd, POLLIN);
		return true;
	case QB_FAULT_DELAY:
		ts->tv_sec = f->delay_ms / 1000;
		ts->tv_nsec = (long long)(f->delay_ms % 1000) * 1000000;
		io_uring_prep_timeout(sqe, ts, 0, IORING_TIMEOUT_ETIME_SUCCESS);
		sqe->flags |= IOSQE_IO_LINK;
		return true;
	case QB_FAULT_LATE:
		io_uring_prep_poll_add(sqe, f->gate_fd, POLLIN);
		sqe->flags |= IOSQE_IO_LINK;
		return true;
	}
	return false;
}

void qb_arm_tick(struct qb_ctx *c)
{
	struct io_uring_sqe *sqe;

	if (c->tick_armed || !(sqe = qb_ctx_sqe(c)))
		return;
	io_uring_prep_timeout(sqe, &c->tick, 0, 0);
	sqe->user_data = ud_make(0, 0, K_TICK, 0, 0);
	c->tick_armed = true;
}

static void count_replica_io(struct qb_ctx *c, uint32_t r, uint32_t op,
			     uint32_t len)
{
	struct qb_counters *k = &c->link.rep[r];

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

/* A replica's K_IO read or write goes out in chunks its device takes whole
 * (at most QB_MAX_CHUNKS of them); the step's span when it is not split. */
static uint32_t chunk_size(struct qb_ctx *c, struct qb_slot *s, uint32_t r)
{
	uint32_t chunk = c->q->rep[r].chunk;

	if (!chunk || s->plen <= chunk ||
	    (s->op != QB_OP_READ && s->op != QB_OP_WRITE && s->op != OP_SYNC))
		return 0;
	while ((uint64_t)chunk * QB_MAX_CHUNKS < s->plen)
		chunk *= 2;
	return chunk;
}

void qb_chunk_span(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		   uint32_t idx, uint64_t *off, uint32_t *len)
{
	uint32_t chunk = chunk_size(c, s, r), pos = idx * chunk;

	if (!chunk) {
		*off = s->poff;
		*len = s->plen;
		return;
	}
	*off = s->poff + pos;
	*len = s->plen - pos < chunk ? s->plen - pos : chunk;
}

/* One SQE (two with a fault's head) for one replica I/O. */
static void prep_one(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		     uint32_t kind, uint32_t idx, uint32_t op, void *buf,
		     uint64_t off, uint32_t len, const struct qb_fault *f)
{
	struct qb_quorum *q = c->q;
	uint64_t ud = ud_make(slot_no(c, s), s->gen, kind, r, idx);
	struct io_uring_sqe *sqe;

	if (q->rep[r].is_nbd) {	/* libnbd sends it now, if it can */
		if (c->nbd[r])
			qb_nbd_issue(c->nbd[r], q->rep[r].nbd_caps, op,
				     s->flags & QB_REQ_FUA, buf, off, len, ud);
		else
			qb_ctx_keep(c, ud, -ENOTCONN);
		goto queued;
	}
	/* a head and its I/O must go out in one submission */
	if (f->kind && io_uring_sq_space_left(&c->ring) < 2)
		io_uring_submit(&c->ring);
	sqe = qb_ctx_sqe(c);
	if (!sqe)
		goto broken;
	if (qb_fault_head(sqe, f, &s->delay[r])) {
		if (f->kind == QB_FAULT_HANG) {	/* the hang is the I/O */
			sqe->user_data = ud;
			s->hang_fd[r] = f->gate_fd;
			goto queued;
		}
		sqe->user_data = ud_make(0, 0, K_IGNORE, 0, 0);
		sqe = qb_ctx_sqe(c);
		if (!sqe)
			goto broken;
	}
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
	if (!s->nout[r]++)
		s->since[r] = qb_now_ns();
	__atomic_store_n(&c->link.out[r], c->link.out[r] + 1, __ATOMIC_RELAXED);
	s->pending++;
	return;
broken:
	/* the ring itself is broken (not the replica's doing): the request
	 * fails without blaming it */
	s->bad |= 1u << r;
	s->ok &= ~(1u << r);
}

void qb_issue(struct qb_ctx *c, struct qb_slot *s, uint32_t r, uint32_t kind,
	      uint32_t idx, uint32_t op, void *buf, uint64_t off, uint32_t len)
{
	struct qb_quorum *q = c->q;
	struct qb_fault f = { .kind = QB_FAULT_NONE };
	uint32_t n = 1;

	if (qb_fault_match(q, r, op, off, len ? len : 1, &f) &&
	    f.kind == QB_FAULT_EIO) {
		qb_io_result(c, s, r, kind, -f.err, len, off);
		return;
	}
	count_replica_io(c, r, op, len);
	if (q->rep[r].memory_fs && f.kind == QB_FAULT_NONE) {
		qb_io_result(c, s, r, kind, sync_io(c, s, r, op, buf, off, len),
			     len, off);
		return;
	}
	if (kind == K_IO && chunk_size(c, s, r) && f.kind != QB_FAULT_HANG)
		n = (s->plen + chunk_size(c, s, r) - 1) / chunk_size(c, s, r);
	for (uint32_t i = 0; i < n; i++) {
		uint64_t coff = off;
		uint32_t clen = len;

		if (n > 1)
			qb_chunk_span(c, s, r, i, &coff, &clen);
		/* the index names the chunk of a split I/O, else the run */
		prep_one(c, s, r, kind, n > 1 ? i : idx, op,
			 buf ? (char *)buf + (coff - off) : NULL, coff, clen, &f);
	}
	qb_arm_tick(c);
}

/* ---- zeroing ---- */

uint32_t qb_zero_want(struct qb_ctx *c, struct qb_slot *s, uint32_t r)
{
	uint64_t left = s->poff + s->plen - s->zoff[r];

	return left > c->q->opt.max_io ? c->q->opt.max_io : (uint32_t)left;
}

/* Write-zeroes the slow way: zeros from q->zeros, max_io at a time, each
 * write with its own deadline (a step of many writes is not one I/O). */
static void zero_write(struct qb_ctx *c, struct qb_slot *s, uint32_t r)
{
	qb_issue(c, s, r, K_ZERO, 0, QB_OP_WRITE, c->q->zeros, s->zoff[r],
		 qb_zero_want(c, s, r));
}

void qb_zero_start(struct qb_ctx *c, struct qb_slot *s, uint32_t r)
{
	if (__atomic_load_n(&c->q->rep[r].zero_mode, __ATOMIC_RELAXED) ==
	    ZM_WRITE) {
		s->zoff[r] = s->poff;
		zero_write(c, s, r);
		return;
	}
	qb_issue(c, s, r, K_IO, 0, s->op, NULL, s->poff, s->plen);
}

bool qb_zero_next(struct qb_ctx *c, struct qb_slot *s, uint32_t r)
{
	s->zoff[r] += qb_zero_want(c, s, r);
	if (s->zoff[r] >= s->poff + s->plen)
		return false;
	zero_write(c, s, r);
	return true;
}

bool qb_zero_fallback(struct qb_ctx *c, struct qb_slot *s, uint32_t r)
{
	struct qb_replica *rep = &c->q->rep[r];
	int mode = __atomic_load_n(&rep->zero_mode, __ATOMIC_RELAXED);

	if (s->op == QB_OP_DISCARD || mode == ZM_PUNCH) {
		/* punching holes is what failed: write zeros */
		__atomic_store_n(&rep->zero_mode, ZM_WRITE, __ATOMIC_RELAXED);
	} else if (mode == ZM_FALLOC) {
		__atomic_store_n(&rep->zero_mode, ZM_PUNCH, __ATOMIC_RELAXED);
		qb_issue(c, s, r, K_IO, 0, s->op, NULL, s->poff, s->plen);
		return true;
	}
	s->zoff[r] = s->poff;
	zero_write(c, s, r);
	return true;
}
