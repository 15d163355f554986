/*
 * qb_ublk.h: a quorum served as a Linux block device through ublk.
 *
 * Part of the cffi cdef (read after quorumblk.h): plain C types only.
 * Every function that can fail returns 0 or -errno and leaves a message for
 * qb_last_error() in the calling thread.
 *
 *   qb_dev_start()   ADD_DEV, SET_PARAMS, one thread per hardware queue
 *                    (each with its own engine context), START_DEV; returns
 *                    once /dev/ublkbN is LIVE, or tears everything down.
 *   qb_dev_recover() for a device made with QB_DEV_USER_RECOVERY whose
 *                    server died (the kernel holds it QUIESCED): a new
 *                    server for it in this process, queue threads as in
 *                    qb_dev_start(); returns once it is LIVE again. On a
 *                    failure the device stays QUIESCED (not deleted).
 *   qb_dev_wait()    sleeps until a queue loop ends (the device was stopped
 *                    or deleted from outside, or a queue failed).
 *   qb_dev_stop()    STOP_DEV while the queues serve, join, DEL_DEV, free.
 */
#ifndef QB_UBLK_H
#define QB_UBLK_H

#include <stdint.h>

struct qb_quorum;
struct qb_dev;

/* Device states, as the kernel reports them (UBLK_S_DEV_*). */
enum qb_ublk_state {
	QB_UBLK_DEAD = 0,
	QB_UBLK_LIVE = 1,
	QB_UBLK_QUIESCED = 2,
	QB_UBLK_FAIL_IO = 3,
};

/* qb_dev_params.flags */
enum qb_dev_flags {
	QB_DEV_USER_RECOVERY = 1,	/* daemon death quiesces, not removes */
};

struct qb_dev_params {
	int32_t dev_id;		/* -1: the kernel picks */
	uint32_t queues;	/* hardware queues; 0: min(CPUs, 4) */
	uint32_t depth;		/* requests per queue; 0: 128 */
	uint32_t logical_bs;	/* 512 or 4096; 0: 512 */
	uint32_t flags;		/* enum qb_dev_flags */
};

/* What GET_DEV_INFO (and GET_PARAMS, when set) say about a device. */
struct qb_dev_info {
	int32_t dev_id;
	int32_t pid;		/* the server's, -1 when none */
	uint32_t state;		/* enum qb_ublk_state */
	uint32_t queues;
	uint32_t depth;
	uint32_t max_io;	/* bytes per request the kernel allows */
	uint64_t flags;		/* UBLK_F_* the kernel granted */
	uint64_t sectors;	/* size in 512-byte sectors; 0: no params */
	uint32_t logical_bs;	/* 0: no params */
	uint32_t physical_bs;
	uint32_t owner_uid, owner_gid;
};

void qb_dev_params_default(struct qb_dev_params *p);

/* The kernel's UBLK_F_* feature mask (GET_FEATURES, 6.5+). */
int qb_ublk_features(uint64_t *out);
int qb_ublk_dev_info(int32_t dev_id, struct qb_dev_info *out);
/* STOP_DEV then DEL_DEV of any ublk device, e.g. one whose server died. */
int qb_ublk_del(int32_t dev_id);

int qb_dev_start(struct qb_quorum *q, const struct qb_dev_params *p,
		 struct qb_dev **out);
/* params: logical_bs must match the device's (0: take it); queues and depth
 * are the kernel's. Waits (bounded) for the kernel to quiesce the device. */
int qb_dev_recover(struct qb_quorum *q, int32_t dev_id,
		   const struct qb_dev_params *params, struct qb_dev **out);
int32_t qb_dev_id(const struct qb_dev *d);
/* The parameters in effect (the kernel may lower queues and max_io). */
void qb_dev_get_info(const struct qb_dev *d, struct qb_dev_info *out);
/* timeout_ms < 0: no limit. 0 once a queue has ended, or -ETIMEDOUT. */
int qb_dev_wait(struct qb_dev *d, int timeout_ms);
/* Orderly stop and delete; frees d whatever happens. */
int qb_dev_stop(struct qb_dev *d);

#endif
