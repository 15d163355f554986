/*
 * sync.c: resync and scrub (qb_ctx_sync), as phases of the engine's
 * requests on OP_SYNC slots:
 *
 *   (HOLD: writes are in flight on the blocks) -> SYNC: read the voters and
 *   the targets -> vote -> (SYNC_WRITE: losers and targets get the winner)
 *   -> done
 *
 * The blocks are held against user writes from before the read until after
 * the write (writes wait), so a sync never puts older data over a newer
 * write and a joining replica misses none.
 */
#include <errno.h>
#include <string.h>

#include "engine_int.h"

#define SYNC_DEPTH 4		/* chunks in flight */

void qb_start_sync(struct qb_ctx *c, struct qb_slot *s, uint32_t live)
{
	struct qb_quorum *q = c->q;
	uint32_t need = (s->sync_flags & QB_SYNC_PLURALITY) ? 1 :
			q->opt.threshold;
	uint32_t mask = live;

	if (qb_popcount(live) < need) {
		qb_finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	}
	s->nblocks = qb_blocks_of(q, s->off, s->len);
	s->incomplete = false;
	if (!qb_hold_sync(q, qb_first_block(q, s->off), s->nblocks, s->held)) {
		qb_defer(c, s);
		return;
	}
	s->targets &= qb_writable(q) & ~live;
	if (!(s->sync_flags & QB_SYNC_BLIND))
		mask |= s->targets;
	qb_read_from(c, s, mask, PH_SYNC);
}

/* What replica r's copy of block i needs: 0 nothing (it holds the winner),
 * 1 the winner, 2 leave it (no quorum). */
static int sync_need(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		     uint32_t i, uint32_t base)
{
	uint32_t rel, len;

	if (s->win[i] & WIN_NO_QUORUM)
		return 2;
	if (!(s->targets & (1u << r)))
		return !(s->win[i] & (1u << r));
	if (s->sync_flags & QB_SYNC_BLIND)
		return 1;
	qb_block_span(c, s, i, &rel, &len);
	return memcmp((char *)s->buf[r] + rel, (char *)s->buf[base] + rel,
		      len) != 0;
}

/* Plan replica r's rewrite: one run per stretch of blocks it must get. A
 * target's runs bridge blocks it already holds right (rewriting those
 * changes nothing, and fewer, longer writes fill it faster), never a block
 * without quorum; a voter's runs are its losing blocks exactly, as its
 * "repaired" events and counters say. Counts and reports losing copies. */
static void sync_plan(struct qb_ctx *c, struct qb_slot *s, uint32_t r,
		      uint32_t base, struct qb_sync_result *res)
{
	bool voter = !(s->targets & (1u << r));
	int from = -1, bad_from = -1;
	uint32_t last = 0;

	for (uint32_t i = 0; i <= s->nblocks; i++) {
		int need = i < s->nblocks ? sync_need(c, s, r, i, base) : 2;

		if (need == 1) {
			if (from < 0)
				from = (int)i;
			if (bad_from < 0)
				bad_from = (int)i;
			last = i;
			s->win[i] |= WIN_DIFFER;
			res->bad[r]++;
			if (!(s->sync_flags & QB_SYNC_NO_WRITE))
				res->written++;
			continue;
		}
		if (bad_from >= 0 && voter && !s->again) {
			qb_report(c, s, QB_EV_BAD_BLOCK, (int)r,
				  (uint32_t)bad_from, i);
			QB_ADD(c->link.rep[r].bad_blocks, i - (uint32_t)bad_from);
			QB_ADD(c->link.dev.bad_blocks, i - (uint32_t)bad_from);
		}
		bad_from = -1;
		if ((need == 2 || voter) && from >= 0) {
			if (s->nruns == QB_MAX_RUNS)
				s->incomplete = true;
			qb_add_run(c, s, r, (uint32_t)from, last + 1);
			from = -1;
		}
	}
}

static void sync_release(struct qb_ctx *c, struct qb_slot *s)
{
	qb_hold_release(c->q, qb_first_block(c->q, s->off), s->nblocks,
			s->held);
}

void qb_sync_voted(struct qb_ctx *c, struct qb_slot *s)
{
	struct qb_quorum *q = c->q;
	/* a second pass only writes what did not fit: counted the first time */
	struct qb_sync_result scratch = { 0 };
	struct qb_sync_result *res = s->again ? &scratch : c->sync_res;
	uint32_t voters = s->ok & qb_in_service(q);
	uint32_t thr = (s->sync_flags & QB_SYNC_PLURALITY) ? 1 :
		       q->opt.threshold;
	uint32_t base;

	s->targets &= qb_writable(q) & ~s->bad;	/* failed ones are out */
	if (qb_popcount(voters) < thr) {
		sync_release(c, s);
		qb_finish(c, s, -EIO, QB_ERR_DEGRADED, NULL);
		return;
	}
	res->unrecoverable += qb_vote_blocks(c, s, voters, thr);
	base = qb_assemble(c, s);
	s->nruns = 0;
	for (uint32_t r = 0; r < qb_replicas(q); r++)
		if ((voters | s->targets) & (1u << r))
			sync_plan(c, s, r, base, res);
	res->blocks += s->nblocks;
	for (uint32_t i = 0; i < s->nblocks; i++)
		res->differing += !!(s->win[i] & WIN_DIFFER);
	if ((s->sync_flags & QB_SYNC_NO_WRITE) || !s->nruns) {
		sync_release(c, s);
		qb_finish(c, s, (int)s->len, 0, NULL);
		return;
	}
	qb_begin_phase(s, PH_SYNC_WRITE);
	for (uint32_t i = 0; i < s->nruns; i++) {
		struct run *run = &s->runs[i];
		uint32_t r = s->run_rep[i];

		qb_issue(c, s, r, (s->targets & (1u << r)) ? K_COPY : K_REPAIR, i,
			 QB_OP_WRITE, (char *)s->buf[base] + run->rel, run->off,
			 run->len);
	}
	qb_end_issue(c, s);
}

/* ---- driven to completion ---- */

struct sync_state {
	uint64_t next, end;
	uint32_t targets, flags;
	int err, err_kind;
	uint64_t err_off;
};

static void sync_launch(struct qb_ctx *c, uint32_t slot, struct sync_state *st,
			uint64_t off)
{
	struct qb_slot *s = &c->slots[slot];
	uint64_t left = st->end - off;
	uint32_t len = left < c->q->opt.max_io ? (uint32_t)left :
		       c->q->opt.max_io;

	s->targets = st->targets;
	s->sync_flags = (uint8_t)st->flags;
	s->again = off != st->next;
	if (!s->again)
		st->next += len;
	qb_launch(c, s, OP_SYNC, 0, off, len, NULL);
}

static void sync_done(struct qb_ctx *c, uint32_t slot, int res, void *data,
		      void *arg)
{
	struct sync_state *st = arg;
	struct qb_slot *s = &c->slots[slot];

	if (res < 0 && !st->err) {
		st->err = res;
		st->err_kind = s->err_kind;
		st->err_off = s->off;
	}
	if (st->err)
		return;
	if (s->incomplete)	/* the rest of its runs: the same chunk again */
		sync_launch(c, slot, st, s->off);
	else if (st->next < st->end)
		sync_launch(c, slot, st, st->next);
}

int qb_ctx_sync(struct qb_ctx *c, uint64_t offset, uint64_t length,
		uint32_t targets, uint32_t flags, struct qb_sync_result *res)
{
	struct qb_quorum *q = c->q;
	struct sync_state st = {
		.next = offset, .end = offset + length, .flags = flags,
		.targets = targets,
	};
	qb_done_fn old_done = c->done;
	void *old_arg = c->done_arg;
	int ret = 0;

	qb_err_clear();
	memset(res, 0, sizeof(*res));
	if (offset > q->size || length > q->size - offset ||
	    (offset | length) % q->align)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "sync of offset %llu length %llu: outside the device (%llu bytes) or not aligned to %u",
			      (unsigned long long)offset,
			      (unsigned long long)length,
			      (unsigned long long)q->size, q->align);
	if (flags & ~(uint32_t)(QB_SYNC_PLURALITY | QB_SYNC_NO_WRITE |
				QB_SYNC_BLIND))
		return qb_err(EINVAL, QB_ERR_INVALID, "sync flags %#x", flags);
	if (c->inflight)
		return qb_err(EBUSY, QB_ERR_INVALID,
			      "sync on a context with requests in flight");
	qb_ctx_enter(c);
	c->sync_res = res;
	qb_ctx_set_done(c, sync_done, &st);
	for (uint32_t i = 0; i < SYNC_DEPTH && i < c->depth &&
	     st.next < st.end; i++)
		sync_launch(c, i, &st, st.next);
	while (c->inflight && !ret)
		ret = qb_ctx_run(c, 1);
	while (c->inflight && qb_ctx_run(c, 1) == 0)
		;
	qb_ctx_set_done(c, old_done, old_arg);
	c->sync_res = NULL;
	qb_ctx_leave(c);
	if (ret)
		return ret;
	if (st.err)
		return qb_err(-st.err, st.err_kind,
			      "sync at offset %llu: fewer than %u replicas in service answered",
			      (unsigned long long)st.err_off,
			      (flags & QB_SYNC_PLURALITY) ? 1 : q->opt.threshold);
	return 0;
}
