/*
 * loadgen.c: the benchmark's load generator, a front end of the engine like
 * the ublk queue loop (engine.h): it keeps `depth` requests in flight on
 * one context and counts what completes. qemu-img bench's pattern: request
 * i goes to (start + i * step) % span, aligned down to bs.
 */
#include <errno.h>
#include <string.h>
#include <sys/resource.h>

#include "qb.h"
#include "engine.h"

struct bench_state {
	const struct qb_bench_spec *spec;
	struct qb_bench_result *res;
	uint64_t issued;
	int err;
};

static uint64_t bench_offset(const struct qb_bench_spec *sp, uint64_t i)
{
	uint64_t step = sp->step ? sp->step : sp->bs;
	uint64_t off = (sp->start + i * step) % sp->span;

	return off - off % sp->bs;
}

/* Request number b->issued on slot; its data is whatever the slot's first
 * buffer holds (the pattern written at the start, or a voted read's). */
static int bench_next(struct qb_ctx *c, uint32_t slot, struct bench_state *b)
{
	const struct qb_bench_spec *sp = b->spec;
	int ret = qb_ctx_submit(c, slot, sp->op, 0, bench_offset(sp, b->issued),
				sp->bs, qb_ctx_buf(c, slot, 0));

	if (!ret)
		b->issued++;
	return ret;
}

static void bench_done(struct qb_ctx *c, uint32_t slot, int res, void *data,
		       void *arg)
{
	struct bench_state *b = arg;

	b->res->ops++;
	if (res < 0)
		b->res->errors++;
	else
		b->res->bytes += (uint64_t)res;
	if (b->issued < b->spec->count && !b->err)
		b->err = bench_next(c, slot, b);
}

static uint64_t cpu_ns(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ((uint64_t)ru.ru_utime.tv_sec + (uint64_t)ru.ru_stime.tv_sec) *
	       1000000000ULL +
	       ((uint64_t)ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_usec) *
	       1000ULL;
}

int qb_ctx_bench(struct qb_ctx *c, const struct qb_bench_spec *spec,
		 struct qb_bench_result *res)
{
	struct bench_state b = { .spec = spec, .res = res };
	struct qb_quorum *q;
	struct qb_options o;
	uint64_t t0, cpu0;
	int ret = 0;

	qb_err_clear();
	memset(res, 0, sizeof(*res));
	q = qb_ctx_quorum(c);
	qb_quorum_get_options(q, &o);
	if ((spec->op != QB_OP_READ && spec->op != QB_OP_WRITE) ||
	    !spec->bs || spec->bs > o.max_io || !spec->depth ||
	    !qb_ctx_buf(c, spec->depth - 1, 0) || !spec->span ||
	    spec->span < spec->bs || spec->span > qb_quorum_size(q))
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "bench: op %u bs %u depth %u span %llu do not fit this context (max_io %u, size %llu)",
			      spec->op, spec->bs, spec->depth,
			      (unsigned long long)spec->span, o.max_io,
			      (unsigned long long)qb_quorum_size(q));
	for (uint32_t i = 0; i < spec->depth; i++)
		memset(qb_ctx_buf(c, i, 0), 0x5a ^ (int)i, spec->bs);
	qb_ctx_enter(c);
	qb_ctx_set_done(c, bench_done, &b);
	t0 = qb_now_ns();
	cpu0 = cpu_ns();
	for (uint32_t i = 0; i < spec->depth && b.issued < spec->count && !ret;
	     i++)
		ret = bench_next(c, i, &b);
	while (!ret && qb_ctx_inflight(c)) {
		ret = qb_ctx_run(c, 1);
		if (!ret)
			ret = b.err;
	}
	while (qb_ctx_inflight(c) && qb_ctx_run(c, 1) == 0)
		;
	res->wall_ns = qb_now_ns() - t0;
	res->cpu_ns = cpu_ns() - cpu0;
	qb_ctx_set_done(c, NULL, NULL);
	qb_ctx_leave(c);
	return ret;
}
