/*
 * nbd.c: NBD exports as replicas, with libnbd's asynchronous API.
 *
 * Connecting (at open, for a new context, for a replica that rejoins) is
 * the one place that waits, and never longer than the replica timeout: the
 * asynchronous connect is driven by poll(2) against that deadline. After
 * that nothing blocks: commands go out as they are issued (libnbd sends
 * what the socket takes and keeps the rest), and the owner's ring tells
 * when the socket can be read or written again.
 *
 * Buffers: a command's buffer is libnbd's until its completion callback
 * ran, or until the handle is closed (nbd_close drops what is in flight and
 * touches no buffer after). The engine's orphans (engine.c) keep the
 * buffers of commands that the timeout abandoned until one of the two.
 *
 * Command records ("tickets") come from a free list that grows in blocks
 * and never shrinks while the connection lives: no allocation per I/O.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <libnbd.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>

#include "nbd.h"

#define TICKETS_PER_BLOCK 128

struct ticket {
	struct qb_nbd *n;
	uint64_t ud;
	uint32_t len;
	struct ticket *next;
};

struct ticket_block {
	struct ticket_block *next;
	struct ticket t[TICKETS_PER_BLOCK];
};

struct qb_nbd {
	struct nbd_handle *h;
	int fd;
	uint32_t r;
	const struct qb_nbd_ops *ops;
	void *arg;
	uint32_t gen;		/* of the poll armed; older ones are stale */
	uint32_t armed;		/* its events, 0: none armed */
	uint32_t inflight;
	bool closing;		/* nbd_close runs: results go nowhere */
	struct ticket *free;
	struct ticket_block *blocks;
};

bool qb_nbd_is_uri(const char *path)
{
	return !strncmp(path, "nbd:", 4) || !strncmp(path, "nbd+", 4) ||
	       !strncmp(path, "nbds:", 5) || !strncmp(path, "nbds+", 5);
}

static bool supported_uri(const char *uri)
{
	return !strncmp(uri, "nbd://", 6) || !strncmp(uri, "nbd+unix://", 11);
}

static int nbd_fail(const char *uri, const char *what)
{
	int err = nbd_get_errno();
	const char *msg = nbd_get_error();

	return qb_err(err ? err : EIO, QB_ERR_OTHER, "replica %s: %s: %s", uri,
		      what, msg ? msg : "unknown libnbd error");
}

/* Drive h's state machine until it is ready, or the deadline. */
static int connect_wait(struct nbd_handle *h, const char *uri,
			uint64_t deadline, uint32_t timeout_ms)
{
	while (!nbd_aio_is_ready(h)) {
		struct pollfd p = { .fd = nbd_aio_get_fd(h) };
		unsigned dir = nbd_aio_get_direction(h);
		uint64_t now = qb_now_ns();
		int ret;

		if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h) || p.fd < 0)
			return nbd_fail(uri, "cannot connect");
		if (now >= deadline)
			return qb_err(ETIMEDOUT, QB_ERR_OTHER,
				      "replica %s: the server did not answer within %u ms (the replica timeout)",
				      uri, timeout_ms);
		if (dir & LIBNBD_AIO_DIRECTION_READ)
			p.events |= POLLIN;
		if (dir & LIBNBD_AIO_DIRECTION_WRITE)
			p.events |= POLLOUT;
		ret = poll(&p, 1, (int)((deadline - now + 999999) / 1000000));
		if (ret < 0 && errno != EINTR)
			return qb_err(errno, QB_ERR_OTHER, "replica %s: poll: %s",
				      uri, strerror(errno));
		if (ret <= 0)
			continue;
		if (p.revents & (POLLIN | POLLHUP | POLLERR))
			ret = nbd_aio_notify_read(h);
		else
			ret = nbd_aio_notify_write(h);
		if (ret < 0)
			return nbd_fail(uri, "cannot connect");
	}
	return 0;
}

int qb_nbd_connect(const char *uri, uint32_t timeout_ms,
		   struct nbd_handle **out)
{
	uint64_t deadline = qb_now_ns() + (uint64_t)timeout_ms * 1000000ULL;
	struct nbd_handle *h;
	int ret;

	*out = NULL;
	if (!supported_uri(uri))
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "replica %s: not a supported NBD URI: use nbd://host[:port]/export or nbd+unix:///export?socket=PATH (TLS, nbds://, is not supported)",
			      uri);
	h = nbd_create();
	if (!h)
		return nbd_fail(uri, "cannot create a libnbd handle");
	/* the engine reads into its own buffers and checks every result */
	nbd_set_pread_initialize(h, false);
	nbd_set_uri_allow_tls(h, LIBNBD_TLS_DISABLE);
	if (nbd_aio_connect_uri(h, uri) < 0)
		ret = nbd_fail(uri, "cannot connect");
	else
		ret = connect_wait(h, uri, deadline, timeout_ms);
	if (ret) {
		nbd_close(h);
		return ret;
	}
	*out = h;
	return 0;
}

static uint32_t caps_of(struct nbd_handle *h)
{
	return (nbd_can_flush(h) > 0 ? QB_NBD_FLUSH : 0) |
	       (nbd_can_fua(h) > 0 ? QB_NBD_FUA : 0) |
	       (nbd_can_zero(h) > 0 ? QB_NBD_ZERO : 0) |
	       (nbd_can_trim(h) > 0 ? QB_NBD_TRIM : 0) |
	       (nbd_can_multi_conn(h) > 0 ? QB_NBD_MULTI_CONN : 0);
}

int qb_nbd_open_replica(struct qb_replica *rep, const char *uri,
			uint32_t timeout_ms, uint64_t *size)
{
	struct nbd_handle *h;
	int64_t sz, min, max;
	int ret;

	ret = qb_nbd_connect(uri, timeout_ms, &h);
	if (ret)
		return ret;
	sz = nbd_get_size(h);
	min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
	max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
	rep->is_nbd = 1;
	rep->fd = -1;
	rep->nbd_caps = caps_of(h);
	if (sz < 0)
		ret = nbd_fail(uri, "cannot read the export's size");
	else if (nbd_is_read_only(h) > 0)
		ret = qb_err(EROFS, QB_ERR_INVALID,
			     "replica %s: the export is read-only", uri);
	else if ((rep->nbd_caps & QB_NBD_FLUSH) && !(rep->nbd_caps & QB_NBD_FUA))
		/* a write-back export whose writes cannot be made durable one
		 * by one: the metadata's ordering needs that */
		ret = qb_err(EINVAL, QB_ERR_INVALID,
			     "replica %s: the export can flush but offers no FUA writes",
			     uri);
	nbd_close(h);
	if (ret)
		return ret;
	*size = (uint64_t)sz;
	rep->align = min > 512 ? (uint32_t)min : 512;
	/* libnbd sends at most 64 MiB at once; QEMU takes 32 MiB */
	rep->chunk = max > 0 && max < (32 << 20) ? (uint32_t)max : 32u << 20;
	if (*size < 4096 || *size % 512)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "%s: size %llu bytes: a replica must be a multiple of 512 bytes and at least 4096",
			      uri, (unsigned long long)*size);
	return 0;
}

/* ---- a connection on a ring ---- */

struct qb_nbd *qb_nbd_new(struct nbd_handle *h, uint32_t r,
			  const struct qb_nbd_ops *ops, void *arg)
{
	struct qb_nbd *n = calloc(1, sizeof(*n));

	if (!n)
		return NULL;
	n->h = h;
	n->fd = nbd_aio_get_fd(h);
	n->r = r;
	n->ops = ops;
	n->arg = arg;
	return n;
}

uint32_t qb_nbd_free(struct qb_nbd *n)
{
	uint32_t dropped;

	if (!n)
		return 0;
	dropped = n->inflight;
	n->closing = true;
	nbd_close(n->h);
	while (n->blocks) {
		struct ticket_block *b = n->blocks;

		n->blocks = b->next;
		free(b);
	}
	free(n);
	return dropped;
}

uint32_t qb_nbd_inflight(const struct qb_nbd *n)
{
	return n ? n->inflight : 0;
}

static struct ticket *ticket_get(struct qb_nbd *n)
{
	struct ticket *t = n->free;

	if (!t) {
		struct ticket_block *b = malloc(sizeof(*b));

		if (!b)
			return NULL;
		b->next = n->blocks;
		n->blocks = b;
		for (uint32_t i = 0; i < TICKETS_PER_BLOCK; i++) {
			b->t[i].n = n;
			b->t[i].next = i + 1 < TICKETS_PER_BLOCK ? &b->t[i + 1] :
				       NULL;
		}
		t = &b->t[0];
	}
	n->free = t->next;
	return t;
}

static void ticket_put(struct qb_nbd *n, struct ticket *t)
{
	t->next = n->free;
	n->free = t;
}

/* Called by libnbd inside a notify (or a send that found the connection
 * dead): the result is only passed on. */
static int done_cb(void *user_data, int *error)
{
	struct ticket *t = user_data;
	struct qb_nbd *n = t->n;

	n->inflight--;
	if (!n->closing)
		n->ops->sink(n->arg, t->ud, *error ? -*error : (int)t->len);
	ticket_put(n, t);
	return 1;	/* retired: no nbd_aio_command_completed */
}

/* Keep one poll armed for what libnbd waits for: reading always (answers,
 * and a server that goes away), writing while it has bytes to send. */
static void arm(struct qb_nbd *n)
{
	uint32_t want = POLLIN;
	struct io_uring_sqe *sqe;

	if (nbd_aio_is_dead(n->h) || nbd_aio_is_closed(n->h))
		return;
	if (nbd_aio_get_direction(n->h) & LIBNBD_AIO_DIRECTION_WRITE)
		want |= POLLOUT;
	if ((n->armed & want) == want)
		return;
	if (n->armed && (sqe = n->ops->sqe(n->arg))) {
		/* the old poll goes; its CQE and this one's are stale */
		io_uring_prep_poll_remove(sqe, n->ops->poll_ud(n->r, n->gen));
		sqe->user_data = n->ops->poll_ud(n->r, n->gen);
	}
	sqe = n->ops->sqe(n->arg);
	if (!sqe)
		return;		/* the ring is broken: so is its owner */
	n->gen = (n->gen + 1) & QB_NBD_GEN_MASK;
	io_uring_prep_poll_add(sqe, n->fd, want);
	sqe->user_data = n->ops->poll_ud(n->r, n->gen);
	n->armed = want;
}

void qb_nbd_event(struct qb_nbd *n, uint32_t gen, int res)
{
	bool readable;

	if (!n || gen != n->gen || !n->armed)
		return;
	n->armed = 0;
	/* -ECANCELED: the ring's thread exited (see qb_nbd_drive), nothing
	 * happened. Not a read notification: in the middle of a write's
	 * payload that pauses the write until a reply comes, and none may
	 * come before the payload is sent */
	readable = res < 0 ? res != -ECANCELED :
		   (res & (POLLIN | POLLHUP | POLLERR)) != 0;
	if (readable)
		nbd_aio_notify_read(n->h);
	else if (res > 0 && (res & POLLOUT))
		nbd_aio_notify_write(n->h);
	arm(n);
}

void qb_nbd_drive(struct qb_nbd *n)
{
	struct pollfd p = { .fd = n->fd, .events = POLLIN };

	if (!n->inflight || nbd_aio_is_dead(n->h) || nbd_aio_is_closed(n->h))
		return;
	if (nbd_aio_get_direction(n->h) & LIBNBD_AIO_DIRECTION_WRITE)
		p.events |= POLLOUT;
	if (poll(&p, 1, 0) <= 0)
		return;
	if (p.revents & (POLLIN | POLLHUP | POLLERR))
		nbd_aio_notify_read(n->h);
	else if (p.revents & POLLOUT)
		nbd_aio_notify_write(n->h);
}

void qb_nbd_issue(struct qb_nbd *n, uint32_t caps, uint32_t op, bool fua,
		  void *buf, uint64_t off, uint32_t len, uint64_t ud)
{
	struct ticket *t;
	nbd_completion_callback cb = { .callback = done_cb };
	/* without multi-conn a flush on one connection does not cover
	 * another's writes: every write is made durable by itself */
	uint32_t durable = (caps & QB_NBD_FUA) &&
			   (fua || !(caps & QB_NBD_MULTI_CONN)) ?
			   LIBNBD_CMD_FLAG_FUA : 0;
	int64_t cookie;
	int err = 0;

	if (op == QB_OP_FLUSH && !(caps & QB_NBD_FLUSH)) {
		/* no write cache to flush (the export says so) */
		n->ops->sink(n->arg, ud, 0);
		return;
	}
	t = ticket_get(n);
	if (!t) {
		n->ops->sink(n->arg, ud, -ENOMEM);
		return;
	}
	t->ud = ud;
	t->len = op == QB_OP_FLUSH ? 0 : len;
	cb.user_data = t;
	n->inflight++;
	switch (op) {
	case QB_OP_READ:
		cookie = nbd_aio_pread(n->h, buf, len, off, cb, 0);
		break;
	case QB_OP_WRITE:
		cookie = nbd_aio_pwrite(n->h, buf, len, off, cb, durable);
		break;
	case QB_OP_FLUSH:
		cookie = nbd_aio_flush(n->h, cb, 0);
		break;
	default:	/* discard and write-zeroes: reads give zeros after */
		if (!(caps & QB_NBD_ZERO)) {	/* the engine writes zeros */
			err = EOPNOTSUPP;
			cookie = -1;
			break;
		}
		cookie = nbd_aio_zero(n->h, len, off, cb, durable);
		break;
	}
	if (cookie < 0) {	/* not sent: the callback will not run */
		if (!err)
			err = nbd_get_errno();
		n->inflight--;
		ticket_put(n, t);
		n->ops->sink(n->arg, ud, -(err ? err : EIO));
		return;
	}
	arm(n);
}

/* ---- one-shot commands (meta.c's header reads and writes) ---- */

int qb_nbd_sync(struct nbd_handle *h, bool write, void *buf, uint64_t len,
		uint64_t off, uint32_t timeout_ms)
{
	uint64_t deadline = qb_now_ns() + (uint64_t)timeout_ms * 1000000ULL;
	int64_t cookie;

	if (write)	/* durable when it answers (FUA, or write-through) */
		cookie = nbd_aio_pwrite(h, buf, len, off, NBD_NULL_COMPLETION,
					nbd_can_fua(h) > 0 ?
					LIBNBD_CMD_FLAG_FUA : 0);
	else
		cookie = nbd_aio_pread(h, buf, len, off, NBD_NULL_COMPLETION, 0);
	if (cookie < 0)
		return -(nbd_get_errno() ? nbd_get_errno() : EIO);
	for (;;) {
		struct pollfd p = { .fd = nbd_aio_get_fd(h), .events = POLLIN };
		int done = nbd_aio_command_completed(h, cookie);
		uint64_t now = qb_now_ns();

		if (done == 1)
			return 0;
		if (done < 0)
			return -(nbd_get_errno() ? nbd_get_errno() : EIO);
		if (now >= deadline)
			return -ETIMEDOUT;
		if (nbd_aio_get_direction(h) & LIBNBD_AIO_DIRECTION_WRITE)
			p.events |= POLLOUT;
		if (poll(&p, 1, (int)((deadline - now + 999999) / 1000000)) <= 0)
			continue;
		if (p.revents & (POLLIN | POLLHUP | POLLERR))
			nbd_aio_notify_read(h);
		else
			nbd_aio_notify_write(h);
	}
}

/* ---- for the metadata's planning (quorumblk/meta.py) ---- */

int qb_nbd_export_size(const char *uri, uint64_t *size)
{
	struct nbd_handle *h;
	int64_t sz;
	int ret;

	qb_err_clear();
	ret = qb_nbd_connect(uri, QB_NBD_META_TIMEOUT_MS, &h);
	if (ret)
		return ret;
	sz = nbd_get_size(h);
	if (sz < 0)
		ret = nbd_fail(uri, "cannot read the export's size");
	else
		*size = (uint64_t)sz;
	nbd_close(h);
	return ret;
}

int qb_nbd_export_zero(const char *uri, uint64_t off, uint64_t len)
{
	struct nbd_handle *h;
	char *buf = malloc(1 << 20);
	int ret;

	qb_err_clear();
	if (!buf)
		return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	ret = qb_nbd_connect(uri, QB_NBD_META_TIMEOUT_MS, &h);
	if (ret) {
		free(buf);
		return ret;
	}
	while (len && !ret) {
		uint32_t n = len < (1 << 20) ? (uint32_t)len : 1 << 20;

		ret = qb_nbd_sync(h, false, buf, n, off, QB_NBD_META_TIMEOUT_MS);
		if (ret)
			ret = qb_err(-ret, QB_ERR_OTHER,
				     "%s: cannot read at offset %llu: %s", uri,
				     (unsigned long long)off, strerror(-ret));
		for (uint32_t i = 0; !ret && i < n; i++)
			if (buf[i])
				ret = 1;
		off += n;
		len -= n;
	}
	nbd_close(h);
	free(buf);
	return ret < 0 ? ret : !ret;
}
