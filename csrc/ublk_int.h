/*
 * ublk_int.h: what ublk.c and ublk_ctrl.c share. Not part of the cdef.
 *
 * The installed <linux/ublk_cmd.h> may be old (Debian 12 ships 6.1's: legacy
 * command numbers only, no GET_FEATURES); what it lacks is defined here from
 * the kernel's UAPI. Only the ioctl-encoded command numbers are used.
 */
#ifndef QB_UBLK_INT_H
#define QB_UBLK_INT_H

#include <linux/ioctl.h>
#include <linux/ublk_cmd.h>
#include <stdint.h>

#include "qb_ublk.h"

#ifndef UBLK_CMD_GET_DEV_INFO2
#define UBLK_CMD_GET_DEV_INFO2		0x12
#endif
#ifndef UBLK_CMD_GET_FEATURES
#define UBLK_CMD_GET_FEATURES		0x13
#endif

#ifndef UBLK_U_CMD_GET_DEV_INFO
#define UBLK_U_CMD_GET_DEV_INFO \
	_IOR('u', UBLK_CMD_GET_DEV_INFO, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_ADD_DEV \
	_IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV \
	_IOWR('u', UBLK_CMD_DEL_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_DEV \
	_IOWR('u', UBLK_CMD_START_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_STOP_DEV \
	_IOWR('u', UBLK_CMD_STOP_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_SET_PARAMS \
	_IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_PARAMS \
	_IOR('u', UBLK_CMD_GET_PARAMS, struct ublksrv_ctrl_cmd)
#endif
/* 6.1 has the legacy numbers of the recovery commands, not their encoding */
#ifndef UBLK_CMD_START_USER_RECOVERY
#define UBLK_CMD_START_USER_RECOVERY	0x10
#define UBLK_CMD_END_USER_RECOVERY	0x11
#endif
#ifndef UBLK_U_CMD_START_USER_RECOVERY
#define UBLK_U_CMD_START_USER_RECOVERY \
	_IOWR('u', UBLK_CMD_START_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_END_USER_RECOVERY \
	_IOWR('u', UBLK_CMD_END_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_CMD_GET_FEATURES
#define UBLK_U_CMD_GET_FEATURES \
	_IOR('u', UBLK_CMD_GET_FEATURES, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_IO_FETCH_REQ
#define UBLK_U_IO_FETCH_REQ \
	_IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ \
	_IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd)
#endif

#ifndef UBLK_F_USER_RECOVERY
#define UBLK_F_USER_RECOVERY		(1ULL << 3)
#endif
#ifndef UBLK_F_USER_RECOVERY_REISSUE
#define UBLK_F_USER_RECOVERY_REISSUE	(1ULL << 4)
#endif
#ifndef UBLK_F_UNPRIVILEGED_DEV
#define UBLK_F_UNPRIVILEGED_DEV		(1ULL << 5)
#endif
#ifndef UBLK_F_CMD_IOCTL_ENCODE
#define UBLK_F_CMD_IOCTL_ENCODE		(1ULL << 6)
#endif
#ifndef UBLK_S_DEV_QUIESCED
#define UBLK_S_DEV_QUIESCED		2
#endif
#ifndef UBLK_S_DEV_FAIL_IO
#define UBLK_S_DEV_FAIL_IO		3
#endif

#define QB_UBLK_CONTROL "/dev/ublk-control"
#define QB_UBLK_CDEV "/dev/ublkc"
#define QB_UBLK_FEATURES_LEN 8
#define QB_UBLK_DESC_AREA(depth_max) \
	(((depth_max) * sizeof(struct ublksrv_io_desc) + 4095) & ~4095UL)

/*
 * One control command on /dev/ublk-control: dev_id, buffer (addr, len),
 * data0 (START_DEV's pid). Blocks until the kernel answers; returns the
 * command's result (>= 0) or -errno.
 */
struct qb_ctrl_req {
	uint32_t op;		/* UBLK_U_CMD_* */
	int32_t dev_id;		/* -1 for ADD_DEV's "pick one" */
	void *buf;
	uint16_t len;
	uint64_t data0;
};

/* Zero one 128-byte SQE (the ring is set up with SQE128). */
static inline void qb_sqe128_zero(void *sqe)
{
	uint64_t *w = sqe;

	for (int i = 0; i < 16; i++)
		w[i] = 0;
}

int qb_ctrl_cmd(const struct qb_ctrl_req *r);
/* The same, but returns early with -ECANCELED once *abort becomes nonzero
 * (checked every poll_ms); for START_DEV, which waits on the queues. */
int qb_ctrl_cmd_abortable(const struct qb_ctrl_req *r, const int *abort,
			  int poll_ms);
const char *qb_ctrl_name(uint32_t op);
/* GET_DEV_INFO into the kernel's own struct (for qb_dev_recover). */
int qb_ctrl_dev_info(int32_t dev_id, struct ublksrv_ctrl_dev_info *info);
/* GET_PARAMS (len set here). */
int qb_ctrl_get_params(int32_t dev_id, struct ublk_params *p);

#endif
