/*
 * ublk.c: a quorum as /dev/ublkbN. Bring-up, the queue loops, tear-down.
 *
 * Each hardware queue is one thread that owns one engine context: its
 * io_uring carries both the replica I/O and the queue's ublk commands
 * (FETCH_REQ, COMMIT_AND_FETCH_REQ, marked QB_UD_FOREIGN). A tag is a slot:
 *
 *   fetch CQE (res 0) -> desc[tag] -> qb_ctx_submit(slot = tag)
 *   done callback     -> COMMIT_AND_FETCH(result, addr)
 *
 * Copy mode: the address handed over with a fetch is where the kernel copies
 * a write's data before handing the request over, and where it copies a
 * read's data from at commit. A read is committed with the voted buffer
 * itself (no copy here), which then stays the tag's buffer for its next
 * request. Commands whose fetch completes with ABORT (-ENODEV: the device is
 * going away) are not fetched again; the loop ends when no command and no
 * request is left.
 *
 * Bring-up order (the kernel's): ADD_DEV, SET_PARAMS, open /dev/ublkcN,
 * queue threads fetch every tag, START_DEV (waits for the fetches). Any
 * failure unwinds all of it. Stop: STOP_DEV while the queues serve, the
 * fetches end with ABORT, join, close every reference, DEL_DEV.
 *
 * Recovery (devices made with UBLK_F_USER_RECOVERY, whose server died: the
 * kernel holds them QUIESCED, new I/O waits and, with _REISSUE, what the
 * dead server had taken is requeued): START_USER_RECOVERY, then the same
 * server half as a start (open /dev/ublkcN, queue threads fetch every tag)
 * ending in END_USER_RECOVERY instead of START_DEV. No ADD_DEV, no
 * SET_PARAMS: the kernel keeps the device and its parameters.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"
#include "qb.h"
#include "ublk_int.h"

#define QB_DEV_MAX_QUEUES 4
#define QB_DEV_DEPTH 128
#define QB_CDEV_OPEN_MS 3000		/* wait for /dev/ublkcN to appear */
#define QB_START_POLL_MS 50		/* START_DEV: look for queue errors */
#define QB_ABORT_WAIT_MS 3000		/* after STOP_DEV: wait for ABORTs */
#define QB_RECOVER_WAIT_MS 20000	/* for the kernel to quiesce a dead server's device */
#define QB_RECOVER_POLL_MS 50

/* user_data of the queue's own SQEs: QB_UD_FOREIGN | kind << 32 | tag */
enum ud_kind { UD_CMD = 0, UD_WAKE = 1 };

static inline uint64_t ud_foreign(uint32_t kind, uint32_t tag)
{
	return QB_UD_FOREIGN | (uint64_t)kind << 32 | tag;
}

struct qb_queue {
	struct qb_dev *dev;
	uint32_t id;
	pthread_t thread;
	bool thread_ok;			/* created: must be joined */
	struct qb_ctx *ctx;
	const struct ublksrv_io_desc *desc;
	size_t desc_len;
	void **buf;			/* per tag: the address last handed over */
	int32_t *unsent;		/* per tag: a commit that found no SQE */
	uint32_t nunsent;		/* how many wait in unsent */
	uint32_t cmds;			/* ublk commands the kernel holds */
	bool quit;			/* leave now, whatever is out */
	int err;			/* the loop's failure, -errno */
	char msg[256];
};

struct qb_dev {
	struct qb_quorum *q;
	struct qb_dev_params p;
	struct ublksrv_ctrl_dev_info info;	/* as the kernel returned it */
	int32_t id;
	bool added, started;
	int cdev;
	int wake_fd;			/* eventfd: makes every queue look at quit */
	uint32_t nr_queues;

	pthread_mutex_t lock;
	pthread_cond_t cond;
	uint32_t ready;			/* queues that finished their setup */
	uint32_t ended;			/* queues whose loop has ended */
	int setup_failed;		/* a queue failed before START_DEV: abort */

	struct qb_queue queue[];
};

/* ---- errors from queue threads ---- */

static int queue_fail(struct qb_queue *qu, int err, const char *what)
{
	if (!qu->err) {
		qu->err = err;
		snprintf(qu->msg, sizeof(qu->msg), "ublk device %d queue %u: %s: %s",
			 qu->dev->id, qu->id, what, strerror(-err));
	}
	return err;
}

/* ---- ublk commands on the queue's ring ---- */

static int queue_cmd(struct qb_queue *qu, uint32_t op, uint32_t tag,
		     int32_t result)
{
	struct io_uring_sqe *sqe = qb_ctx_sqe(qu->ctx);
	struct ublksrv_io_cmd *cmd;

	if (!sqe)
		return -EBUSY;
	qb_sqe128_zero(sqe);
	cmd = (struct ublksrv_io_cmd *)sqe->cmd;
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = qu->dev->cdev;
	sqe->cmd_op = op;
	sqe->user_data = ud_foreign(UD_CMD, tag);
	cmd->q_id = (uint16_t)qu->id;
	cmd->tag = (uint16_t)tag;
	cmd->result = result;
	cmd->addr = (uint64_t)(uintptr_t)qu->buf[tag];
	qu->cmds++;
	return 0;
}

#define NOT_UNSENT INT32_MIN

/* Commit a request's result and fetch the tag's next. Without an SQE (only
 * a broken ring has none) it is kept and sent again by the loop: a tag is
 * never lost. */
static void queue_commit(struct qb_queue *qu, uint32_t tag, int32_t result)
{
	if (queue_cmd(qu, UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result) < 0) {
		qu->unsent[tag] = result;
		qu->nunsent++;
	}
}

static void queue_send_unsent(struct qb_queue *qu)
{
	uint32_t depth = qu->dev->info.queue_depth;

	for (uint32_t tag = 0; tag < depth && qu->nunsent; tag++) {
		int32_t result = qu->unsent[tag];

		if (result == NOT_UNSENT)
			continue;
		if (queue_cmd(qu, UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag,
			      result) < 0)
			return;
		qu->unsent[tag] = NOT_UNSENT;
		qu->nunsent--;
	}
}

static int queue_arm_wake(struct qb_queue *qu)
{
	struct io_uring_sqe *sqe = qb_ctx_sqe(qu->ctx);

	if (!sqe)
		return queue_fail(qu, -EBUSY, "no free SQE");
	io_uring_prep_poll_add(sqe, qu->dev->wake_fd, POLLIN);
	sqe->user_data = ud_foreign(UD_WAKE, 0);
	return 0;
}

/* ---- requests ---- */

/* The engine finished the request on slot tag. */
static void queue_done(struct qb_ctx *c, uint32_t tag, int res, void *data,
		       void *arg)
{
	struct qb_queue *qu = arg;

	/*
	 * A good read commits the voted buffer itself. Otherwise the tag gets
	 * the slot's current first buffer. Either is one the engine has not set
	 * aside for an abandoned (timed-out) I/O, so it is safe for the kernel
	 * to copy the next write into.
	 */
	if (data && res >= 0)
		qu->buf[tag] = data;
	else
		qu->buf[tag] = qb_ctx_buf(c, tag, 0);
	queue_commit(qu, tag, res);
}

static int32_t queue_submit(struct qb_queue *qu, uint32_t tag)
{
	const struct ublksrv_io_desc *d = &qu->desc[tag];
	uint32_t op = d->op_flags & 0xff;
	uint32_t flags = (d->op_flags & UBLK_IO_F_FUA) ? QB_REQ_FUA : 0;
	uint64_t off = d->start_sector << 9;
	uint64_t len = (uint64_t)d->nr_sectors << 9;

	switch (op) {
	case UBLK_IO_OP_READ:
	case UBLK_IO_OP_WRITE:
	case UBLK_IO_OP_FLUSH:
	case UBLK_IO_OP_DISCARD:
	case UBLK_IO_OP_WRITE_ZEROES:
		break;
	default:
		return -EOPNOTSUPP;
	}
	if (len > UINT32_MAX)
		return -EINVAL;
	return qb_ctx_submit(qu->ctx, tag, op, flags, off, (uint32_t)len,
			     qu->buf[tag]);
}

/* A CQE of one of the queue's own SQEs. */
static void queue_foreign(struct qb_ctx *c, const struct io_uring_cqe *cqe,
			  void *arg)
{
	struct qb_queue *qu = arg;
	uint32_t kind = (uint32_t)(cqe->user_data >> 32) & 0xff;
	uint32_t tag = (uint32_t)cqe->user_data & 0xffff;
	int32_t ret;

	if (kind == UD_WAKE) {
		if (__atomic_load_n(&qu->quit, __ATOMIC_ACQUIRE))
			return;
		queue_arm_wake(qu);
		return;
	}
	qu->cmds--;
	if (cqe->res == UBLK_IO_RES_ABORT)
		return;			/* device going away: no more fetches */
	if (cqe->res != UBLK_IO_RES_OK) {
		queue_fail(qu, cqe->res < 0 ? cqe->res : -EPROTO,
			   "fetch/commit refused");
		return;
	}
	ret = queue_submit(qu, tag);
	if (ret < 0)
		queue_commit(qu, tag, ret);
}

/* ---- the queue thread ---- */

static int queue_map(struct qb_queue *qu)
{
	struct qb_dev *dev = qu->dev;
	off_t off = (off_t)qu->id * QB_UBLK_DESC_AREA(UBLK_MAX_QUEUE_DEPTH);
	void *p;

	qu->desc_len = QB_UBLK_DESC_AREA(dev->info.queue_depth);
	p = mmap(NULL, qu->desc_len, PROT_READ, MAP_SHARED | MAP_POPULATE,
		 dev->cdev, off);
	if (p == MAP_FAILED)
		return queue_fail(qu, -errno, "mmap of the descriptors");
	qu->desc = p;
	return 0;
}

static int queue_init(struct qb_queue *qu)
{
	struct qb_dev *dev = qu->dev;
	uint32_t depth = dev->info.queue_depth;
	int ret;

	qu->buf = calloc(depth, sizeof(*qu->buf));
	qu->unsent = calloc(depth, sizeof(*qu->unsent));
	if (!qu->buf || !qu->unsent)
		return queue_fail(qu, -ENOMEM, "tag table");
	for (uint32_t tag = 0; tag < depth; tag++)
		qu->unsent[tag] = NOT_UNSENT;
	ret = qb_ctx_create(dev->q, depth, QB_CTX_SQE128, &qu->ctx);
	if (ret < 0) {
		snprintf(qu->msg, sizeof(qu->msg), "ublk device %d queue %u: %s",
			 dev->id, qu->id, qb_last_error());
		qu->err = ret;
		return ret;
	}
	qb_ctx_set_done(qu->ctx, queue_done, qu);
	qb_ctx_set_foreign(qu->ctx, queue_foreign, qu);
	ret = queue_map(qu);
	if (ret < 0)
		return ret;
	ret = queue_arm_wake(qu);
	for (uint32_t tag = 0; tag < depth && !ret; tag++) {
		qu->buf[tag] = qb_ctx_buf(qu->ctx, tag, 0);
		ret = queue_cmd(qu, UBLK_U_IO_FETCH_REQ, tag, -1);
		if (ret < 0)
			return queue_fail(qu, ret, "no free SQE for a fetch");
	}
	if (!ret)
		ret = qb_ctx_run(qu->ctx, 0);	/* submits the fetches */
	if (ret < 0)
		return queue_fail(qu, ret, "fetching the tags");
	return 0;
}

static void queue_deinit(struct qb_queue *qu)
{
	if (qu->desc)
		munmap((void *)qu->desc, qu->desc_len);
	qu->desc = NULL;
	/* closing the ring also cancels any ublk command still out */
	if (qu->ctx)
		qb_ctx_destroy(qu->ctx);
	qu->ctx = NULL;
	free(qu->buf);
	qu->buf = NULL;
	free(qu->unsent);
	qu->unsent = NULL;
}

static void queue_loop(struct qb_queue *qu)
{
	while (qu->cmds || qu->nunsent || qb_ctx_inflight(qu->ctx)) {
		if (__atomic_load_n(&qu->quit, __ATOMIC_ACQUIRE))
			break;
		if (qu->err && !qb_ctx_inflight(qu->ctx))
			break;
		if (qu->nunsent)
			queue_send_unsent(qu);
		int ret = qb_ctx_run(qu->ctx, 1);

		if (ret < 0) {
			queue_fail(qu, ret, qb_last_error());
			break;
		}
	}
}

static void dev_note(struct qb_dev *dev, uint32_t *counter, int failed)
{
	pthread_mutex_lock(&dev->lock);
	(*counter)++;
	if (failed)
		dev->setup_failed = 1;
	pthread_cond_broadcast(&dev->cond);
	pthread_mutex_unlock(&dev->lock);
}

static void *queue_thread(void *arg)
{
	struct qb_queue *qu = arg;
	struct qb_dev *dev = qu->dev;
	char name[16];
	int ret;

	snprintf(name, sizeof(name), "qb%d-q%u", dev->id, qu->id);
	pthread_setname_np(pthread_self(), name);
	ret = queue_init(qu);
	if (ret < 0)
		__atomic_store_n(&dev->setup_failed, 1, __ATOMIC_RELEASE);
	dev_note(dev, &dev->ready, ret < 0);
	if (!ret)
		queue_loop(qu);
	/* an error during serving: the first error a fetch saw before START */
	if (qu->err && !dev->started)
		__atomic_store_n(&dev->setup_failed, 1, __ATOMIC_RELEASE);
	queue_deinit(qu);
	dev_note(dev, &dev->ended, 0);
	return NULL;
}

/* ---- bring-up ---- */

static uint32_t default_queues(void)
{
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);

	if (cpus < 1)
		cpus = 1;
	return cpus < QB_DEV_MAX_QUEUES ? (uint32_t)cpus : QB_DEV_MAX_QUEUES;
}

void qb_dev_params_default(struct qb_dev_params *p)
{
	memset(p, 0, sizeof(*p));
	p->dev_id = -1;
	p->queues = default_queues();
	p->depth = QB_DEV_DEPTH;
	p->logical_bs = 512;
}

static int params_check(struct qb_quorum *q, struct qb_dev_params *p)
{
	uint64_t size = qb_quorum_size(q);

	if (!p->queues)
		p->queues = default_queues();
	if (!p->depth)
		p->depth = QB_DEV_DEPTH;
	if (!p->logical_bs)
		p->logical_bs = 512;
	if (p->queues > 64)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "queues %u: must be 1 to 64", p->queues);
	if (p->depth > UBLK_MAX_QUEUE_DEPTH)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "depth %u: must be 1 to %u", p->depth,
			      UBLK_MAX_QUEUE_DEPTH);
	if (p->logical_bs != 512 && p->logical_bs != 4096)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "block size %u: must be 512 or 4096", p->logical_bs);
	if (p->logical_bs < qb_quorum_align(q))
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "block size %u is below the replicas' direct-I/O unit (%u bytes): use a block size of %u",
			      p->logical_bs, qb_quorum_align(q),
			      qb_quorum_align(q));
	if (size % p->logical_bs)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "device size %llu is not a multiple of the block size %u",
			      (unsigned long long)size, p->logical_bs);
	if (p->dev_id < -1)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "device id %d: must be -1 (any) or >= 0", p->dev_id);
	if (p->flags & ~(uint32_t)QB_DEV_USER_RECOVERY)
		return qb_err(EINVAL, QB_ERR_INVALID, "unknown device flags 0x%x",
			      p->flags);
	return 0;
}

static int dev_add(struct qb_dev *dev)
{
	struct qb_options o;
	struct qb_ctrl_req r = {
		.op = UBLK_U_CMD_ADD_DEV, .dev_id = dev->p.dev_id,
		.buf = &dev->info, .len = sizeof(dev->info),
	};
	int ret;

	qb_quorum_get_options(dev->q, &o);
	memset(&dev->info, 0, sizeof(dev->info));
	dev->info.nr_hw_queues = (uint16_t)dev->p.queues;
	dev->info.queue_depth = (uint16_t)dev->p.depth;
	dev->info.max_io_buf_bytes = o.max_io;
	dev->info.dev_id = (uint32_t)dev->p.dev_id;
	dev->info.flags = UBLK_F_CMD_IOCTL_ENCODE;
	if (dev->p.flags & QB_DEV_USER_RECOVERY)
		dev->info.flags |= UBLK_F_USER_RECOVERY |
				   UBLK_F_USER_RECOVERY_REISSUE;
	ret = qb_ctrl_cmd(&r);
	if (ret == -EEXIST)
		return qb_err(EEXIST, QB_ERR_INVALID,
			      "ublk device id %d is already in use", dev->p.dev_id);
	if (ret < 0)
		return *qb_last_error() ? ret :
		       qb_err(-ret, QB_ERR_OTHER, "ublk ADD_DEV: %s",
			      strerror(-ret));
	dev->added = true;
	dev->id = (int32_t)dev->info.dev_id;
	if (!(dev->info.flags & UBLK_F_CMD_IOCTL_ENCODE))
		return qb_err(EOPNOTSUPP, QB_ERR_OTHER,
			      "ublk device %d: the kernel does not take ioctl-encoded commands (needs Linux 6.4 or later)",
			      dev->id);
	if (!dev->info.nr_hw_queues || !dev->info.queue_depth ||
	    dev->info.max_io_buf_bytes < 4096)
		return qb_err(EPROTO, QB_ERR_OTHER,
			      "ublk device %d: the kernel returned %u queues, depth %u, max I/O %u",
			      dev->id, dev->info.nr_hw_queues,
			      dev->info.queue_depth, dev->info.max_io_buf_bytes);
	return 0;
}

static int dev_set_params(struct qb_dev *dev)
{
	struct qb_options o;
	struct ublk_params p;
	struct qb_ctrl_req r = {
		.op = UBLK_U_CMD_SET_PARAMS, .dev_id = dev->id,
		.buf = &p, .len = sizeof(p),
	};
	uint32_t max_io, cap = UINT32_MAX >> 9;
	uint8_t lshift = dev->p.logical_bs == 4096 ? 12 : 9;
	int ret;

	qb_quorum_get_options(dev->q, &o);
	max_io = o.max_io < dev->info.max_io_buf_bytes ? o.max_io :
		 dev->info.max_io_buf_bytes;
	memset(&p, 0, sizeof(p));
	p.len = sizeof(p);
	p.types = UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD;
	p.basic.attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
	p.basic.logical_bs_shift = lshift;
	p.basic.physical_bs_shift = 12;
	p.basic.io_min_shift = 12;
	p.basic.io_opt_shift = 12;
	p.basic.max_sectors = max_io >> 9;
	p.basic.dev_sectors = qb_quorum_size(dev->q) >> 9;
	p.discard.discard_granularity = 4096;
	p.discard.max_discard_sectors = cap;
	p.discard.max_write_zeroes_sectors = cap;
	p.discard.max_discard_segments = 1;
	ret = qb_ctrl_cmd(&r);
	if (ret < 0)
		return *qb_last_error() ? ret :
		       qb_err(-ret, QB_ERR_OTHER, "ublk device %d: SET_PARAMS: %s",
			      dev->id, strerror(-ret));
	return 0;
}

static int dev_open_cdev(struct qb_dev *dev)
{
	char path[64];
	int waited = 0;

	snprintf(path, sizeof(path), QB_UBLK_CDEV "%d", dev->id);
	for (;;) {
		dev->cdev = open(path, O_RDWR | O_CLOEXEC);
		if (dev->cdev >= 0)
			return 0;
		if (errno != ENOENT || waited >= QB_CDEV_OPEN_MS)
			return qb_err(errno, QB_ERR_OTHER, "%s: %s", path,
				      strerror(errno));
		usleep(10000);
		waited += 10;
	}
}

/* Start every queue thread with all signals blocked (they stay with the
 * caller's threads, e.g. Python's), and wait until each has fetched. */
static int dev_start_queues(struct qb_dev *dev)
{
	sigset_t all, old;
	int ret = 0;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	for (uint32_t i = 0; i < dev->nr_queues && !ret; i++) {
		struct qb_queue *qu = &dev->queue[i];

		ret = -pthread_create(&qu->thread, NULL, queue_thread, qu);
		if (!ret)
			qu->thread_ok = true;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (ret)
		return qb_err(-ret, QB_ERR_OTHER, "cannot start a queue thread: %s",
			      strerror(-ret));
	return 0;
}

static int dev_queue_error(struct qb_dev *dev, uint32_t op, int fallback)
{
	for (uint32_t i = 0; i < dev->nr_queues; i++)
		if (dev->queue[i].err)
			return qb_err(-dev->queue[i].err, QB_ERR_OTHER, "%s",
				      dev->queue[i].msg);
	return qb_err(-fallback, QB_ERR_OTHER, "ublk device %d: %s: %s",
		      dev->id, qb_ctrl_name(op), strerror(-fallback));
}

/*
 * START_DEV (a new device) or END_USER_RECOVERY (a recovered one), with
 * data[0] = this pid: both wait until every queue has fetched every tag,
 * then the device is LIVE with this process as its server. A queue that
 * fails meanwhile aborts the wait.
 */
static int dev_go_live(struct qb_dev *dev, uint32_t op)
{
	struct qb_ctrl_req r = {
		.op = op, .dev_id = dev->id, .data0 = (uint64_t)getpid(),
	};
	int ret;

	do {
		ret = qb_ctrl_cmd_abortable(&r, &dev->setup_failed,
					    QB_START_POLL_MS);
	} while (ret == -EINTR &&
		 !__atomic_load_n(&dev->setup_failed, __ATOMIC_ACQUIRE));
	if (ret < 0)
		return dev_queue_error(dev, op, ret);
	dev->started = true;
	return 0;
}

/* The server's half of a bring-up, shared by start and recovery: open
 * /dev/ublkcN, start the queue threads (each fetches every tag), go live. */
static int dev_serve(struct qb_dev *dev, uint32_t op)
{
	int ret;

	ret = dev_open_cdev(dev);
	if (ret < 0)
		return ret;
	ret = dev_start_queues(dev);
	if (ret < 0)
		return ret;
	return dev_go_live(dev, op);
}

/* ---- tear-down ---- */

static void dev_wake_all(struct qb_dev *dev)
{
	uint64_t one = 1;

	for (uint32_t i = 0; i < dev->nr_queues; i++)
		__atomic_store_n(&dev->queue[i].quit, true, __ATOMIC_RELEASE);
	/* an eventfd write fails only on overflow: it is readable anyway */
	if (dev->wake_fd >= 0)
		(void)!write(dev->wake_fd, &one, sizeof(one));
}

static bool dev_wait_ended(struct qb_dev *dev, uint32_t count, int timeout_ms)
{
	struct timespec until;
	int ret = 0;

	clock_gettime(CLOCK_MONOTONIC, &until);
	until.tv_sec += timeout_ms / 1000;
	until.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
	if (until.tv_nsec >= 1000000000) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&dev->lock);
	while (dev->ended < count && ret != ETIMEDOUT) {
		if (timeout_ms < 0)
			pthread_cond_wait(&dev->cond, &dev->lock);
		else
			ret = pthread_cond_timedwait(&dev->cond, &dev->lock,
						     &until);
	}
	ret = dev->ended >= count;
	pthread_mutex_unlock(&dev->lock);
	return ret;
}

static int dev_stop_queues(struct qb_dev *dev)
{
	struct qb_ctrl_req r = { .op = UBLK_U_CMD_STOP_DEV, .dev_id = dev->id };
	uint32_t threads = 0;
	int ret = 0;

	for (uint32_t i = 0; i < dev->nr_queues; i++)
		threads += dev->queue[i].thread_ok;
	if (dev->started) {
		ret = qb_ctrl_cmd(&r);
		if (ret < 0 && ret != -ENODEV && !*qb_last_error())
			qb_err(-ret, QB_ERR_OTHER, "ublk device %d: STOP_DEV: %s",
			       dev->id, strerror(-ret));
		if (ret == -ENODEV)
			ret = 0;
		/* the pending fetches now end with ABORT */
		dev_wait_ended(dev, threads, QB_ABORT_WAIT_MS);
	}
	dev_wake_all(dev);
	for (uint32_t i = 0; i < dev->nr_queues; i++) {
		if (dev->queue[i].thread_ok)
			pthread_join(dev->queue[i].thread, NULL);
		dev->queue[i].thread_ok = false;
	}
	return ret;
}

static int dev_delete(struct qb_dev *dev)
{
	struct qb_ctrl_req r = { .op = UBLK_U_CMD_DEL_DEV, .dev_id = dev->id };
	int ret;

	if (!dev->added)
		return 0;
	ret = qb_ctrl_cmd(&r);
	dev->added = false;
	if (ret == -ENODEV)
		return 0;
	if (ret < 0 && !*qb_last_error())
		qb_err(-ret, QB_ERR_OTHER, "ublk device %d: DEL_DEV: %s",
		       dev->id, strerror(-ret));
	return ret;
}

static void dev_free(struct qb_dev *dev)
{
	if (dev->wake_fd >= 0)
		close(dev->wake_fd);
	pthread_cond_destroy(&dev->cond);
	pthread_mutex_destroy(&dev->lock);
	free(dev);
}

/* Stop, join, close every reference to /dev/ublkcN, delete. Keeps the first
 * error's message. */
static int dev_teardown(struct qb_dev *dev)
{
	int ret, ret2;

	ret = dev_stop_queues(dev);
	if (dev->cdev >= 0)
		close(dev->cdev);
	dev->cdev = -1;
	ret2 = dev_delete(dev);
	dev_free(dev);
	return ret < 0 ? ret : ret2;
}

static struct qb_dev *dev_alloc(struct qb_quorum *q,
				const struct qb_dev_params *p)
{
	struct qb_dev *dev;

	dev = calloc(1, sizeof(*dev) + p->queues * sizeof(dev->queue[0]));
	if (!dev)
		return NULL;
	dev->q = q;
	dev->p = *p;
	dev->id = p->dev_id;
	dev->cdev = -1;
	dev->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	pthread_mutex_init(&dev->lock, NULL);
	pthread_cond_init(&dev->cond, NULL);
	if (dev->wake_fd < 0) {
		dev_free(dev);
		return NULL;
	}
	return dev;
}

static void dev_queues_init(struct qb_dev *dev)
{
	dev->nr_queues = dev->info.nr_hw_queues;
	if (dev->nr_queues > dev->p.queues)	/* never more than allocated */
		dev->nr_queues = dev->p.queues;
	for (uint32_t i = 0; i < dev->nr_queues; i++) {
		dev->queue[i].dev = dev;
		dev->queue[i].id = i;
	}
}

int qb_dev_start(struct qb_quorum *q, const struct qb_dev_params *params,
		 struct qb_dev **out)
{
	struct qb_dev_params p = *params;
	struct qb_dev *dev;
	int ret;

	qb_err_clear();
	*out = NULL;
	ret = params_check(q, &p);
	if (ret < 0)
		return ret;
	dev = dev_alloc(q, &p);
	if (!dev)
		return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	ret = dev_add(dev);
	if (ret < 0)
		goto fail;
	dev_queues_init(dev);
	ret = dev_set_params(dev);
	if (ret < 0)
		goto fail;
	ret = dev_serve(dev, UBLK_U_CMD_START_DEV);
	if (ret < 0)
		goto fail;
	*out = dev;
	return 0;
fail:
	dev_teardown(dev);	/* keeps the first error's message */
	return ret;
}

/* ---- recovery: a new server for a device whose server died ---- */

static const char *state_name(uint32_t state)
{
	switch (state) {
	case UBLK_S_DEV_DEAD: return "dead (not started)";
	case UBLK_S_DEV_LIVE: return "LIVE";
	case UBLK_S_DEV_QUIESCED: return "QUIESCED";
	case UBLK_S_DEV_FAIL_IO: return "FAIL_IO";
	default: return "in an unknown state";
	}
}

/* Whether pid runs (a zombie does not: it has closed its files). */
static bool pid_running(int32_t pid)
{
	char path[64], buf[512], *p;
	ssize_t n;
	int fd;

	if (pid <= 0)
		return false;
	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return false;
	buf[n] = 0;
	p = strrchr(buf, ')');
	return !p || (p[1] && p[2] != 'Z' && p[2] != 'X');
}

/*
 * Check the kernel's device against the quorum and the parameters, and take
 * its queues and depth (the kernel's are the ones the device has).
 */
static int recover_params(struct qb_quorum *q, int32_t dev_id,
			  const struct ublksrv_ctrl_dev_info *info,
			  struct qb_dev_params *p)
{
	struct qb_options o;
	struct ublk_params kp;
	uint32_t kbs;
	int ret;

	if (!(info->flags & UBLK_F_USER_RECOVERY))
		return qb_err(EOPNOTSUPP, QB_ERR_INVALID,
			      "ublk device %d was created without user recovery: it cannot be recovered",
			      dev_id);
	if (!info->nr_hw_queues || info->nr_hw_queues > 64 ||
	    !info->queue_depth || info->queue_depth > UBLK_MAX_QUEUE_DEPTH)
		return qb_err(EPROTO, QB_ERR_OTHER,
			      "ublk device %d: the kernel reports %u queues of depth %u",
			      dev_id, info->nr_hw_queues, info->queue_depth);
	ret = qb_ctrl_get_params(dev_id, &kp);
	if (ret < 0)
		return *qb_last_error() ? ret :
		       qb_err(-ret, QB_ERR_OTHER, "ublk device %d: GET_PARAMS: %s",
			      dev_id, strerror(-ret));
	if (!(kp.types & UBLK_PARAM_TYPE_BASIC))
		return qb_err(EPROTO, QB_ERR_OTHER,
			      "ublk device %d has no parameters", dev_id);
	kbs = 1u << kp.basic.logical_bs_shift;
	if (!p->logical_bs)
		p->logical_bs = kbs;
	p->dev_id = dev_id;
	p->queues = info->nr_hw_queues;
	p->depth = info->queue_depth;
	p->flags |= QB_DEV_USER_RECOVERY;
	ret = params_check(q, p);
	if (ret < 0)
		return ret;
	qb_quorum_get_options(q, &o);
	if (kp.basic.dev_sectors != qb_quorum_size(q) >> 9)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "ublk device %d has %llu bytes, the replicas %llu: not this quorum's device",
			      dev_id, (unsigned long long)kp.basic.dev_sectors << 9,
			      (unsigned long long)qb_quorum_size(q));
	if (kbs != p->logical_bs)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "ublk device %d has %u-byte blocks, not %u",
			      dev_id, kbs, p->logical_bs);
	if ((uint64_t)kp.basic.max_sectors << 9 > o.max_io)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "ublk device %d takes requests of up to %u bytes, above the quorum's max_io %u",
			      dev_id, kp.basic.max_sectors << 9, o.max_io);
	return 0;
}

/*
 * Wait (bounded) until the kernel holds the device QUIESCED and the dead
 * server's /dev/ublkcN is released (its ring goes away asynchronously:
 * START_USER_RECOVERY says EBUSY until then), then START_USER_RECOVERY.
 */
static int dev_begin_recovery(struct qb_dev *dev)
{
	struct qb_ctrl_req r = {
		.op = UBLK_U_CMD_START_USER_RECOVERY, .dev_id = dev->id,
	};
	struct ublksrv_ctrl_dev_info info;
	int waited = 0, ret;

	for (;;) {
		ret = qb_ctrl_dev_info(dev->id, &info);
		if (ret < 0)
			return ret;
		if (info.state == UBLK_S_DEV_QUIESCED) {
			ret = qb_ctrl_cmd(&r);
			if (ret != -EBUSY)
				break;
		} else if (info.state != UBLK_S_DEV_LIVE) {
			return qb_err(EINVAL, QB_ERR_INVALID,
				      "ublk device %d is %s, not QUIESCED: it cannot be recovered",
				      dev->id, state_name(info.state));
		} else if (pid_running(info.ublksrv_pid)) {
			return qb_err(EBUSY, QB_ERR_INVALID,
				      "ublk device %d is LIVE, served by pid %d: nothing to recover",
				      dev->id, info.ublksrv_pid);
		}
		if (waited >= QB_RECOVER_WAIT_MS)
			return qb_err(EBUSY, QB_ERR_OTHER,
				      "ublk device %d: still %s %d s after its server (pid %d) died%s",
				      dev->id, state_name(info.state),
				      QB_RECOVER_WAIT_MS / 1000, info.ublksrv_pid,
				      info.state == UBLK_S_DEV_QUIESCED ?
				      ", and /dev/ublkc is still open" : "");
		usleep(QB_RECOVER_POLL_MS * 1000);
		waited += QB_RECOVER_POLL_MS;
	}
	if (ret < 0 && !*qb_last_error())
		return qb_err(-ret, QB_ERR_OTHER,
			      "ublk device %d: START_USER_RECOVERY: %s", dev->id,
			      strerror(-ret));
	return ret < 0 ? ret : 0;
}

int qb_dev_recover(struct qb_quorum *q, int32_t dev_id,
		   const struct qb_dev_params *params, struct qb_dev **out)
{
	struct ublksrv_ctrl_dev_info info;
	struct qb_dev_params p = *params;
	struct qb_dev *dev;
	int ret;

	qb_err_clear();
	*out = NULL;
	if (dev_id < 0)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "device id %d: recovery needs the id of a device",
			      dev_id);
	ret = qb_ctrl_dev_info(dev_id, &info);
	if (ret < 0)
		return ret;
	ret = recover_params(q, dev_id, &info, &p);
	if (ret < 0)
		return ret;
	dev = dev_alloc(q, &p);
	if (!dev)
		return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	dev->info = info;
	dev_queues_init(dev);
	/*
	 * Until it is LIVE the device is not ours to stop or delete: a
	 * failure below leaves it QUIESCED (I/O waits) for another try, or
	 * for `del`. Once LIVE, qb_dev_stop() stops and deletes it as usual.
	 */
	ret = dev_begin_recovery(dev);
	if (ret < 0)
		goto fail;
	ret = dev_serve(dev, UBLK_U_CMD_END_USER_RECOVERY);
	if (ret < 0)
		goto fail;
	dev->added = true;
	*out = dev;
	return 0;
fail:
	dev_teardown(dev);
	return ret;
}

int32_t qb_dev_id(const struct qb_dev *d)
{
	return d->id;
}

void qb_dev_get_info(const struct qb_dev *d, struct qb_dev_info *out)
{
	memset(out, 0, sizeof(*out));
	out->dev_id = d->id;
	out->pid = getpid();
	out->state = d->started ? QB_UBLK_LIVE : QB_UBLK_DEAD;
	out->queues = d->nr_queues;
	out->depth = d->info.queue_depth;
	out->max_io = d->info.max_io_buf_bytes;
	out->flags = d->info.flags;
	out->sectors = qb_quorum_size(d->q) >> 9;
	out->logical_bs = d->p.logical_bs;
	out->physical_bs = 4096;
}

int qb_dev_wait(struct qb_dev *d, int timeout_ms)
{
	qb_err_clear();
	pthread_mutex_lock(&d->lock);
	uint32_t ended = d->ended;
	pthread_mutex_unlock(&d->lock);

	if (ended || dev_wait_ended(d, 1, timeout_ms))
		return 0;
	return -ETIMEDOUT;
}

int qb_dev_stop(struct qb_dev *d)
{
	qb_err_clear();
	return dev_teardown(d);
}
