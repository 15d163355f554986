/*
 * ublk_ctrl.c: control commands on /dev/ublk-control, and the ones Python
 * calls on any device (features, info, delete).
 *
 * A command is an IORING_OP_URING_CMD on a ring set up with SQE128; its
 * struct ublksrv_ctrl_cmd sits in sqe->cmd. The kernel runs control commands
 * from io-wq (they may sleep), so a command that waits (START_DEV waits for
 * every queue's fetches) can be cancelled from here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <string.h>
#include <unistd.h>

#include "qb.h"
#include "ublk_int.h"

#define CTRL_UD 1
#define CANCEL_UD 2
#define CANCEL_WAIT_MS 5000

const char *qb_ctrl_name(uint32_t op)
{
	switch (_IOC_NR(op)) {
	case UBLK_CMD_GET_DEV_INFO: return "GET_DEV_INFO";
	case UBLK_CMD_ADD_DEV: return "ADD_DEV";
	case UBLK_CMD_DEL_DEV: return "DEL_DEV";
	case UBLK_CMD_START_DEV: return "START_DEV";
	case UBLK_CMD_STOP_DEV: return "STOP_DEV";
	case UBLK_CMD_SET_PARAMS: return "SET_PARAMS";
	case UBLK_CMD_GET_PARAMS: return "GET_PARAMS";
	case UBLK_CMD_GET_FEATURES: return "GET_FEATURES";
	case UBLK_CMD_START_USER_RECOVERY: return "START_USER_RECOVERY";
	case UBLK_CMD_END_USER_RECOVERY: return "END_USER_RECOVERY";
	default: return "command";
	}
}

static int control_open(void)
{
	int fd = open(QB_UBLK_CONTROL, O_RDWR | O_CLOEXEC);

	if (fd >= 0)
		return fd;
	if (errno == ENOENT || errno == ENODEV || errno == ENXIO)
		return qb_err(errno, QB_ERR_OTHER,
			      "%s: %s: the ublk driver is not loaded; run `modprobe ublk_drv` (Linux 6.0 or later built with CONFIG_BLK_DEV_UBLK, e.g. Debian's 6.12 kernel; Debian 12's 6.1 kernel lacks it)",
			      QB_UBLK_CONTROL, strerror(errno));
	if (errno == EACCES || errno == EPERM)
		return qb_err(errno, QB_ERR_OTHER,
			      "%s: %s: ublk devices need root (CAP_SYS_ADMIN)",
			      QB_UBLK_CONTROL, strerror(errno));
	return qb_err(errno, QB_ERR_OTHER, "%s: %s", QB_UBLK_CONTROL,
		      strerror(errno));
}

static void ctrl_prep(struct io_uring_sqe *sqe, int fd,
		      const struct qb_ctrl_req *r)
{
	struct ublksrv_ctrl_cmd *cmd = (struct ublksrv_ctrl_cmd *)sqe->cmd;

	qb_sqe128_zero(sqe);
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = fd;
	sqe->cmd_op = r->op;
	sqe->user_data = CTRL_UD;
	cmd->dev_id = (uint32_t)r->dev_id;
	cmd->queue_id = (uint16_t)-1;
	cmd->len = r->len;
	cmd->addr = (uint64_t)(uintptr_t)r->buf;
	cmd->data[0] = r->data0;
}

/* Wait for the command's CQE; -ETIME when poll_ms passed first. */
static int ctrl_wait(struct io_uring *ring, int poll_ms, int *res)
{
	struct __kernel_timespec ts = {
		.tv_sec = poll_ms / 1000,
		.tv_nsec = (long long)(poll_ms % 1000) * 1000000,
	};
	struct io_uring_cqe *cqe;
	int ret;

	for (;;) {
		ret = poll_ms < 0 ? io_uring_wait_cqe(ring, &cqe) :
		      io_uring_wait_cqe_timeout(ring, &cqe, &ts);
		if (ret == -EINTR)
			continue;
		if (ret < 0)
			return ret;
		if (cqe->user_data == CTRL_UD) {
			*res = cqe->res;
			io_uring_cqe_seen(ring, cqe);
			return 0;
		}
		io_uring_cqe_seen(ring, cqe);	/* the cancel's own answer */
	}
}

/* Ask the kernel to interrupt the command, and wait (bounded) for it. */
static int ctrl_cancel(struct io_uring *ring, int *res)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(ring);

	if (sqe) {
		io_uring_prep_cancel64(sqe, CTRL_UD, 0);
		sqe->user_data = CANCEL_UD;
		io_uring_submit(ring);
	}
	return ctrl_wait(ring, CANCEL_WAIT_MS, res);
}

static int ctrl_run(const struct qb_ctrl_req *r, const int *abort,
		    int poll_ms)
{
	struct io_uring ring;
	struct io_uring_sqe *sqe;
	int fd, ret, res = 0;

	fd = control_open();
	if (fd < 0)
		return fd;
	ret = io_uring_queue_init(4, &ring, IORING_SETUP_SQE128);
	if (ret < 0) {
		close(fd);
		return qb_err(-ret, QB_ERR_OTHER,
			      "io_uring setup for ublk control: %s",
			      strerror(-ret));
	}
	sqe = io_uring_get_sqe(&ring);
	if (!sqe) {
		ret = -EBUSY;
		goto out;
	}
	ctrl_prep(sqe, fd, r);
	ret = io_uring_submit(&ring);
	if (ret < 0)
		goto out;
	for (;;) {
		ret = ctrl_wait(&ring, abort ? poll_ms : -1, &res);
		if (ret != -ETIME)
			break;
		if (__atomic_load_n(abort, __ATOMIC_ACQUIRE)) {
			ret = ctrl_cancel(&ring, &res);
			if (!ret)
				ret = -ECANCELED;
			break;
		}
	}
	if (!ret)
		ret = res;
out:
	io_uring_queue_exit(&ring);
	close(fd);
	return ret;
}

int qb_ctrl_cmd(const struct qb_ctrl_req *r)
{
	return ctrl_run(r, NULL, -1);
}

int qb_ctrl_cmd_abortable(const struct qb_ctrl_req *r, const int *abort,
			  int poll_ms)
{
	return ctrl_run(r, abort, poll_ms);
}

/* ---- commands Python calls directly ---- */

int qb_ublk_features(uint64_t *out)
{
	struct qb_ctrl_req r = {
		.op = UBLK_U_CMD_GET_FEATURES, .dev_id = -1,
		.buf = out, .len = QB_UBLK_FEATURES_LEN,
	};
	int ret;

	qb_err_clear();
	*out = 0;
	ret = qb_ctrl_cmd(&r);
	if (ret < 0 && !*qb_last_error())
		return qb_err(-ret, QB_ERR_OTHER,
			      "ublk GET_FEATURES: %s (the kernel needs 6.5 or later)",
			      strerror(-ret));
	return ret < 0 ? ret : 0;
}

int qb_ctrl_get_params(int32_t dev_id, struct ublk_params *p)
{
	struct qb_ctrl_req r = {
		.op = UBLK_U_CMD_GET_PARAMS, .dev_id = dev_id,
		.buf = p, .len = sizeof(*p),
	};

	memset(p, 0, sizeof(*p));
	p->len = sizeof(*p);
	return qb_ctrl_cmd(&r);
}

int qb_ctrl_dev_info(int32_t dev_id, struct ublksrv_ctrl_dev_info *info)
{
	struct qb_ctrl_req r = {
		.op = UBLK_U_CMD_GET_DEV_INFO, .dev_id = dev_id,
		.buf = info, .len = sizeof(*info),
	};
	int ret;

	memset(info, 0, sizeof(*info));
	ret = qb_ctrl_cmd(&r);
	if (ret < 0 && !*qb_last_error())
		return qb_err(-ret, ret == -ENODEV ? QB_ERR_INVALID : QB_ERR_OTHER,
			      "ublk device %d: GET_DEV_INFO: %s", dev_id,
			      ret == -ENODEV ? "no such device" : strerror(-ret));
	return ret < 0 ? ret : 0;
}

int qb_ublk_dev_info(int32_t dev_id, struct qb_dev_info *out)
{
	struct ublksrv_ctrl_dev_info info;
	struct ublk_params p;
	int ret;

	qb_err_clear();
	memset(out, 0, sizeof(*out));
	ret = qb_ctrl_dev_info(dev_id, &info);
	if (ret < 0)
		return ret;
	out->dev_id = (int32_t)info.dev_id;
	out->pid = info.ublksrv_pid;
	out->state = info.state;
	out->queues = info.nr_hw_queues;
	out->depth = info.queue_depth;
	out->max_io = info.max_io_buf_bytes;
	out->flags = info.flags;
	/* 6.12 keeps owner uid and gid where 6.1's header has reserved0 */
	memcpy(&out->owner_uid, &info.reserved0, sizeof(uint32_t));
	memcpy(&out->owner_gid, (char *)&info.reserved0 + 4, sizeof(uint32_t));
	if (qb_ctrl_get_params(dev_id, &p) >= 0 && (p.types & UBLK_PARAM_TYPE_BASIC)) {
		out->sectors = p.basic.dev_sectors;
		out->logical_bs = 1u << p.basic.logical_bs_shift;
		out->physical_bs = 1u << p.basic.physical_bs_shift;
	}
	return 0;
}

int qb_ublk_del(int32_t dev_id)
{
	struct qb_ctrl_req r = { .op = UBLK_U_CMD_STOP_DEV, .dev_id = dev_id };
	int ret;

	qb_err_clear();
	ret = qb_ctrl_cmd(&r);
	if (ret < 0 && ret != -ENODEV && *qb_last_error())
		return ret;
	if (ret == -ENODEV)
		return qb_err(ENODEV, QB_ERR_INVALID,
			      "ublk device %d: no such device", dev_id);
	r.op = UBLK_U_CMD_DEL_DEV;
	ret = qb_ctrl_cmd(&r);
	if (ret < 0 && ret != -ENODEV)
		return qb_err(-ret, QB_ERR_OTHER, "ublk device %d: DEL_DEV: %s",
			      dev_id, strerror(-ret));
	return 0;
}
