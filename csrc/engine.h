/*
 * engine.h: what a front end inside the C core (the ublk queue loop) uses of
 * a context beyond the public API. Not part of the cdef.
 *
 * A front end owns the context's thread. It submits requests on slots it
 * chooses (the ublk tag), gets completions through a callback, and may put
 * its own SQEs on the same ring: their user_data must have QB_UD_FOREIGN set,
 * and their CQEs go to the foreign callback.
 */
#ifndef QB_ENGINE_H
#define QB_ENGINE_H

#include <liburing.h>
#include "quorumblk.h"

#define QB_UD_FOREIGN (1ULL << 63)

/* res is bytes done or -errno. For a read, data is the voted copy: one of the
 * slot's buffers, valid until the slot is submitted again. A slot's buffers
 * may change at any completion (one an abandoned I/O may still use is set
 * aside): ask qb_ctx_buf again rather than keep an old pointer. */
typedef void (*qb_done_fn)(struct qb_ctx *c, uint32_t slot, int res,
			   void *data, void *arg);
typedef void (*qb_foreign_fn)(struct qb_ctx *c, const struct io_uring_cqe *cqe,
			      void *arg);

void qb_ctx_set_done(struct qb_ctx *c, qb_done_fn fn, void *arg);
void qb_ctx_set_foreign(struct qb_ctx *c, qb_foreign_fn fn, void *arg);

/* A free SQE on the context's ring; submits queued ones to make room, so it
 * returns NULL only if the ring is broken. */
struct io_uring_sqe *qb_ctx_sqe(struct qb_ctx *c);

/* Start a request on a free slot. src is a write's data: one of the slot's
 * own buffers (qb_ctx_buf), so that the engine can keep it aside if a
 * replica's write from it is abandoned; reads ignore it. Completion comes
 * through the done callback from qb_ctx_run. Returns 0 or -errno (bad
 * arguments only). */
int qb_ctx_submit(struct qb_ctx *c, uint32_t slot, uint32_t op,
		  uint32_t flags, uint64_t offset, uint32_t length,
		  void *src);

/* Submit what is queued, wait for at least wait_nr CQEs (0: do not block),
 * and process every CQE that is ready. Returns 0 or -errno. */
int qb_ctx_run(struct qb_ctx *c, uint32_t wait_nr);

/* Requests started and not yet completed. */
uint32_t qb_ctx_inflight(const struct qb_ctx *c);

struct qb_quorum *qb_ctx_quorum(const struct qb_ctx *c);

/* A front end that runs its context only now and then (not a loop of its
 * own) brackets each use: between uses, another thread may process the
 * context's late completions (qb_ctx_poll), so that an idle thread holds
 * no replica's owed count. */
void qb_ctx_enter(struct qb_ctx *c);
void qb_ctx_leave(struct qb_ctx *c);

#endif
