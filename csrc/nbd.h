/*
 * nbd.h: replicas that are NBD exports (nbd.c), talked to with libnbd's
 * asynchronous API on the ring of the thread that uses them.
 *
 * One connection (struct qb_nbd) belongs to one ring and one thread: an
 * engine context's or the metadata writer's. Its socket is polled through
 * that ring (one poll armed at a time, IORING_OP_POLL_ADD); the owner hands
 * the poll's CQE to qb_nbd_event, which lets libnbd read or write. A
 * command's completion is never handled inside libnbd: the completion
 * callback only passes (user_data, result) to the owner's sink, which keeps
 * it for later, as a CQE would be (result: the length on success, -errno).
 */
#ifndef QB_NBD_H
#define QB_NBD_H

#include "qb.h"

/* What an export offers (struct qb_replica's nbd_caps). */
enum {
	QB_NBD_FLUSH = 1, QB_NBD_FUA = 2, QB_NBD_ZERO = 4, QB_NBD_TRIM = 8,
	QB_NBD_MULTI_CONN = 16,
};

struct qb_nbd;
struct nbd_handle;

struct qb_nbd_ops {
	/* a command's result, kept by the owner for its loop */
	void (*sink)(void *arg, uint64_t ud, int res);
	/* the user_data of the connection's poll, generation gen */
	uint64_t (*poll_ud)(uint32_t replica, uint32_t gen);
	/* a free SQE on the owner's ring (NULL: none) */
	struct io_uring_sqe *(*sqe)(void *arg);
};

/* An NBD URI (nbd:, nbd+unix:, also the TLS forms, refused by the open). */
bool qb_nbd_is_uri(const char *path);

/* Connect to uri, blocking at most timeout_ms; errors name the URI. */
int qb_nbd_connect(const char *uri, uint32_t timeout_ms,
		   struct nbd_handle **out);

/* Open-time checks of replica rep at uri (its size, that it is writable,
 * what it offers); the connection is closed again. */
int qb_nbd_open_replica(struct qb_replica *rep, const char *uri,
			uint32_t timeout_ms, uint64_t *size);

/* A connected handle becomes replica r's connection on a ring. */
struct qb_nbd *qb_nbd_new(struct nbd_handle *h, uint32_t r,
			  const struct qb_nbd_ops *ops, void *arg);

/* Close it without waiting for anything: commands in flight are dropped
 * (libnbd touches none of their buffers after this). Returns how many. */
uint32_t qb_nbd_free(struct qb_nbd *n);

#define QB_NBD_GEN_MASK ((1u << 30) - 1)	/* a poll's generation */

/* Send one command: op QB_OP_*, the replica's caps decide FUA and flush.
 * Its result comes to the sink, also when it cannot be sent. n is not
 * NULL. */
void qb_nbd_issue(struct qb_nbd *n, uint32_t caps, uint32_t op, bool fua,
		  void *buf, uint64_t off, uint32_t len, uint64_t ud);

/* The connection's poll CQE (res: the poll's revents or -errno), generation
 * gen: ignored when it is an old one. */
void qb_nbd_event(struct qb_nbd *n, uint32_t gen, int res);

/* Take what the server sent, or send what it can take, without the ring
 * and without waiting (a poll(2) with no timeout): for a connection whose
 * thread is not running it (engine.c's zombies and idle contexts). Only
 * that thread can submit a new poll on its ring, and its polls are
 * cancelled when it exits. The sink gets the commands' results, as ever. */
void qb_nbd_drive(struct qb_nbd *n);

/* Commands sent and not answered. */
uint32_t qb_nbd_inflight(const struct qb_nbd *n);

/* One read or write on h waiting at most timeout_ms (a write is durable
 * when it returns): 0 or -errno, -ETIMEDOUT past the deadline. For one-shot
 * metadata I/O, never the engine's. After -ETIMEDOUT, h must be closed
 * before buf is used again. */
#define QB_NBD_META_TIMEOUT_MS 10000
int qb_nbd_sync(struct nbd_handle *h, bool write, void *buf, uint64_t len,
		uint64_t off, uint32_t timeout_ms);

#endif
