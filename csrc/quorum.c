/*
 * quorum.c: the replica set shared by every context: opening and checking
 * the replicas, events, counters, the contexts it knows of (struct
 * qb_ctx_link) and the test fault hook. States and membership: members.c;
 * the live metadata: bitmap.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bitmap.h"
#include "engine_int.h"

uint64_t qb_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t realtime_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

void qb_options_default(struct qb_options *o)
{
	memset(o, 0, sizeof(*o));
	o->threshold = 1;
	o->read_policy = QB_READ_ALL;
	o->hash = QB_HASH_XXH3;
	o->vote_block = 4096;
	o->repair = 1;
	o->timeout_ms = 30000;
	o->events_per_sec = 10;
	o->max_io = 1 << 20;
}

static bool pow2(uint32_t v)
{
	return v && !(v & (v - 1));
}

static int check_options(const struct qb_options *o, uint32_t n)
{
	if (n < 1 || n > QB_MAX_REPLICAS)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "%u replicas given: between 1 and %d are supported",
			      n, QB_MAX_REPLICAS);
	if (o->threshold < 1 || o->threshold > n)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "threshold %u out of range: it must be 1 to %u (the number of replicas)",
			      o->threshold, n);
	if (o->read_policy > QB_READ_FIFO)
		return qb_err(EINVAL, QB_ERR_INVALID, "unknown read policy %u",
			      o->read_policy);
	if (o->hash > QB_HASH_SHA256)
		return qb_err(EINVAL, QB_ERR_INVALID, "unknown hash %u", o->hash);
	if (!pow2(o->max_io) || o->max_io < 4096 || o->max_io > (64u << 20))
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "max_io %u: must be a power of two from 4 KiB to 64 MiB",
			      o->max_io);
	if (!pow2(o->vote_block) || o->vote_block < 512 ||
	    o->vote_block > o->max_io)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "vote block %u: must be a power of two from 512 to max_io (%u)",
			      o->vote_block, o->max_io);
	if (!o->timeout_ms)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "replica timeout must be above 0");
	return 0;
}

/* Open one replica and find its size; errors name the path. */
int qb_open_replica(struct qb_replica *r, const char *path, bool buffered,
		    struct stat *st, uint64_t *size)
{
	int flags = O_RDWR | O_CLOEXEC | (buffered ? 0 : O_DIRECT);

	r->fd = open(path, flags);
	if (r->fd < 0) {
		int err = errno;

		if (err == EINVAL && !buffered)
			return qb_err(err, QB_ERR_INVALID,
				      "%s: the file system refuses O_DIRECT (%s); use the buffered option",
				      path, strerror(err));
		return qb_err(err, QB_ERR_OTHER, "cannot open replica %s: %s (%s)",
			      path, strerror(err), strerrorname_np(err));
	}
	if (fstat(r->fd, st) < 0)
		return qb_err(errno, QB_ERR_OTHER, "%s: fstat: %s", path,
			      strerror(errno));
	if (S_ISBLK(st->st_mode)) {
		r->is_blockdev = 1;
		if (ioctl(r->fd, BLKGETSIZE64, size) < 0)
			return qb_err(errno, QB_ERR_OTHER,
				      "%s: cannot read the device size: %s",
				      path, strerror(errno));
	} else if (S_ISREG(st->st_mode)) {
		*size = (uint64_t)st->st_size;
	} else {
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "%s: not a regular file or a block device", path);
	}
	r->align = qb_dio_align(r->fd, r->is_blockdev, buffered);
	r->memory_fs = qb_is_memory_fs(r->fd);
	r->chunk = qb_dio_chunk(r->fd, r->is_blockdev, buffered);
	if (*size < 4096 || *size % 512)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "%s: size %llu bytes: a replica must be a multiple of 512 bytes and at least 4096",
			      path, (unsigned long long)*size);
	return 0;
}

int qb_open_any(struct qb_replica *r, const char *path,
		const struct qb_options *o, struct stat *st, uint64_t *size)
{
	int ret;

	memset(st, 0, sizeof(*st));
	r->zero_mode = ZM_FALLOC;
	if (!qb_nbd_is_uri(path))
		return qb_open_replica(r, path, o->buffered, st, size);
	ret = qb_nbd_open_replica(r, path, o->timeout_ms, size);
	/* an export without write-zeroes gets zeros written */
	if (!(r->nbd_caps & QB_NBD_ZERO))
		r->zero_mode = ZM_WRITE;
	return ret;
}

bool qb_same_replica(const struct qb_replica *ra, const struct stat *a,
		     const struct qb_replica *rb, const struct stat *b)
{
	if (ra->is_nbd || rb->is_nbd)	/* an export's identity: its URI */
		return ra->is_nbd && rb->is_nbd && !strcmp(ra->path, rb->path);
	return qb_same_object(a, b);
}

bool qb_same_object(const struct stat *a, const struct stat *b)
{
	if (S_ISBLK(a->st_mode) && S_ISBLK(b->st_mode))
		return a->st_rdev == b->st_rdev;
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

static int open_replicas(struct qb_quorum *q, const char *const *paths)
{
	struct stat st[QB_MAX_REPLICAS];
	uint64_t size[QB_MAX_REPLICAS] = { 0 };
	int ret;

	for (uint32_t i = 0; i < q->n; i++) {
		q->rep[i].path = strdup(paths[i]);
		if (!q->rep[i].path)
			return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
		ret = qb_open_any(&q->rep[i], paths[i], &q->opt, &st[i],
				  &size[i]);
		if (ret)
			return ret;
		for (uint32_t j = 0; j < i; j++)
			if (qb_same_replica(&q->rep[i], &st[i], &q->rep[j], &st[j]))
				return qb_err(EINVAL, QB_ERR_INVALID,
					      "%s and %s are the same replica (one file or device given twice)",
					      paths[j], paths[i]);
	}
	for (uint32_t i = 1; i < q->n; i++) {
		if (size[i] == size[0])
			continue;
		char msg[400] = "";
		size_t len = 0;

		for (uint32_t j = 0; j < q->n && len < sizeof(msg); j++)
			len += snprintf(msg + len, sizeof(msg) - len,
					"%s%s: %llu bytes", j ? ", " : "",
					paths[j], (unsigned long long)size[j]);
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "replica sizes differ: %s", msg);
	}
	q->size = size[0];
	q->align = 512;
	for (uint32_t i = 0; i < q->n; i++)
		if (q->rep[i].align > q->align)
			q->align = q->rep[i].align;
	if (q->size % q->align)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "replica size %llu is not a multiple of %u bytes, the replicas' direct-I/O unit",
			      (unsigned long long)q->size, q->align);
	return 0;
}

int qb_quorum_open(const char *const *paths, uint32_t n,
		   const struct qb_options *o, struct qb_quorum **out)
{
	struct qb_quorum *q;
	int ret;

	qb_err_clear();
	*out = NULL;
	ret = check_options(o, n);
	if (ret)
		return ret;
	q = calloc(1, sizeof(*q));
	if (!q)
		return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	q->n = n;
	q->opt = *o;
	q->vote_shift = (uint32_t)__builtin_ctz(o->vote_block);
	q->event_fd = -1;
	for (uint32_t i = 0; i < QB_MAX_REPLICAS; i++)
		q->rep[i].fd = q->rep[i].old_fd = -1;
	pthread_mutex_init(&q->lock, NULL);
	pthread_mutex_init(&q->fault_lock, NULL);

	ret = open_replicas(q, paths);
	if (ret)
		goto fail;
	q->gens = calloc(QB_GEN_BUCKETS, sizeof(*q->gens));
	q->zeros = mmap(NULL, o->max_io, PROT_READ,
			MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	q->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (!q->gens || q->zeros == MAP_FAILED || q->event_fd < 0) {
		if (q->zeros == MAP_FAILED)
			q->zeros = NULL;
		ret = qb_err(ENOMEM, QB_ERR_OTHER,
			     "cannot allocate the quorum's tables");
		goto fail;
	}
	q->in_service = q->writable = n == 32 ? ~0u : (1u << n) - 1;
	*out = q;
	return 0;
fail:
	qb_quorum_close(q);
	return ret;
}

void qb_quorum_close(struct qb_quorum *q)
{
	bool owed = false;

	if (!q)
		return;
	qb_bitmap_free(q);
	/* contexts whose abandoned I/O never came back: what they hold is
	 * released as it safely can be (buffers stay mapped) */
	while (q->zombies) {
		struct qb_ctx_link *z = q->zombies;

		q->zombies = z->next;
		z->release(z);
	}
	for (uint32_t i = 0; i < q->n; i++) {
		if (q->rep[i].fd >= 0)
			close(q->rep[i].fd);
		if (q->rep[i].old_fd >= 0)
			close(q->rep[i].old_fd);
		free(q->rep[i].path);
	}
	for (uint32_t i = 0; i < q->ngates; i++)
		close(q->gates[i].fd);
	if (q->event_fd >= 0)
		close(q->event_fd);
	for (uint32_t i = 0; i < q->n; i++)
		owed |= __atomic_load_n(&q->rep[i].owed, __ATOMIC_ACQUIRE) != 0;
	/* an abandoned zero-writing write may still read it */
	if (q->zeros && !owed)
		munmap(q->zeros, q->opt.max_io);
	free(q->gens);
	pthread_mutex_destroy(&q->lock);
	pthread_mutex_destroy(&q->fault_lock);
	free(q);
}

uint64_t qb_quorum_size(const struct qb_quorum *q)
{
	return q->size;
}

uint32_t qb_quorum_replicas(const struct qb_quorum *q)
{
	return qb_replicas(q);
}

uint32_t qb_quorum_align(const struct qb_quorum *q)
{
	return q->align;
}

void qb_quorum_get_options(const struct qb_quorum *q, struct qb_options *o)
{
	*o = q->opt;
}

int qb_quorum_replica_state(const struct qb_quorum *q, uint32_t replica)
{
	if (replica >= qb_replicas(q))
		return qb_err(EINVAL, QB_ERR_INVALID, "no replica %u", replica);
	return __atomic_load_n(&q->rep[replica].state, __ATOMIC_ACQUIRE);
}

int qb_quorum_replica_nbd_caps(const struct qb_quorum *q, uint32_t replica)
{
	if (replica >= qb_replicas(q))
		return qb_err(EINVAL, QB_ERR_INVALID, "no replica %u", replica);
	return q->rep[replica].is_nbd ? (int)q->rep[replica].nbd_caps : -1;
}

int qb_quorum_event_fd(const struct qb_quorum *q)
{
	return q->event_fd;
}

/* Events: a ring under q->lock; rate-limited per replica and type. */
static bool rate_allows(struct qb_quorum *q, struct qb_ratelimit *rl,
			uint64_t now)
{
	if (!q->opt.events_per_sec)
		return true;
	if (now - rl->window_ns >= 1000000000ULL) {
		rl->window_ns = now;
		rl->sent = 0;
	}
	if (rl->sent >= q->opt.events_per_sec)
		return false;
	rl->sent++;
	return true;
}

void qb_event(struct qb_quorum *q, uint32_t type, int replica,
	      uint64_t offset, uint64_t length, int err)
{
	struct qb_ratelimit *rl;
	struct qb_event *ev;
	uint64_t one = 1;

	pthread_mutex_lock(&q->lock);
	rl = &q->rl[replica < 0 ? q->n : (uint32_t)replica][type];
	if (!rate_allows(q, rl, qb_now_ns())) {
		rl->suppressed++;
		pthread_mutex_unlock(&q->lock);
		return;
	}
	if (q->ev_count == QB_EVENT_RING) {	/* drop the oldest */
		q->ev_head = (q->ev_head + 1) % QB_EVENT_RING;
		q->ev_count--;
	}
	ev = &q->events[(q->ev_head + q->ev_count++) % QB_EVENT_RING];
	*ev = (struct qb_event){
		.type = type, .replica = replica, .offset = offset,
		.length = length, .err = err, .suppressed = rl->suppressed,
		.time_ns = realtime_ns(),
	};
	rl->suppressed = 0;
	pthread_mutex_unlock(&q->lock);
	if (write(q->event_fd, &one, sizeof(one)) < 0) {
		/* the counter is saturated: readers will find events anyway */
	}
}

uint32_t qb_quorum_events(struct qb_quorum *q, struct qb_event *out,
			  uint32_t max)
{
	uint32_t i;
	uint64_t cnt;

	pthread_mutex_lock(&q->lock);
	for (i = 0; i < max && q->ev_count; i++, q->ev_count--) {
		out[i] = q->events[q->ev_head];
		q->ev_head = (q->ev_head + 1) % QB_EVENT_RING;
	}
	if (!q->ev_count && read(q->event_fd, &cnt, sizeof(cnt)) < 0) {
		/* nothing was pending */
	}
	pthread_mutex_unlock(&q->lock);
	return i;
}

/* Fault hook. A late fault's I/Os wait on a gate (an eventfd polled
 * before each of them): the release fires it. A hang is a poll on an
 * eventfd that never fires. Their eventfds are closed only at the end, so
 * that one named by an SQE not submitted yet is still open. */
int qb_quorum_inject(struct qb_quorum *q, uint32_t replica, uint32_t kind,
		     uint32_t ops_mask, uint64_t offset, uint64_t length,
		     uint32_t count, uint32_t delay_ms, int32_t err)
{
	int on = 0, gate = -1;

	qb_err_clear();
	if (replica >= qb_replicas(q) || kind > QB_FAULT_LATE)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "fault: no replica %u or kind %u", replica, kind);
	if (q->rep[replica].is_nbd && kind != QB_FAULT_EIO &&
	    kind != QB_FAULT_NONE)
		/* those are io_uring chains; an NBD server's own faults are
		 * real ones (stop it, cut its network) */
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "fault: replica %u (%s) is an NBD export: only EIO faults can be injected there",
			      replica, q->rep[replica].path);
	pthread_mutex_lock(&q->fault_lock);
	if (kind == QB_FAULT_LATE || kind == QB_FAULT_HANG) {
		if (q->ngates == sizeof(q->gates) / sizeof(q->gates[0])) {
			pthread_mutex_unlock(&q->fault_lock);
			return qb_err(ENOSPC, QB_ERR_INVALID,
				      "fault: %u late faults on one quorum, its most",
				      q->ngates);
		}
		gate = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (gate < 0) {
			pthread_mutex_unlock(&q->fault_lock);
			return qb_err(errno, QB_ERR_OTHER, "eventfd: %s",
				      strerror(errno));
		}
		q->gates[q->ngates].fd = gate;
		q->gates[q->ngates].kind = kind;
		q->gates[q->ngates++].replica = replica;
	}
	q->rep[replica].fault = (struct qb_fault){
		.kind = kind, .ops_mask = ops_mask, .offset = offset,
		.length = length, .count = count, .delay_ms = delay_ms,
		.gate_fd = gate, .err = err > 0 ? err : EIO,
	};
	for (uint32_t i = 0; i < qb_replicas(q); i++)
		on |= q->rep[i].fault.kind != QB_FAULT_NONE;
	__atomic_store_n(&q->faults_on, on, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&q->fault_lock);
	return 0;
}

/* Every I/O a late fault of the replica holds runs now, also one whose
 * fault was cleared or replaced since (a gate, once fired, stays open). */
int qb_quorum_release(struct qb_quorum *q, uint32_t replica)
{
	struct qb_fault *f;
	uint64_t one = 1;
	int ret = 0;

	qb_err_clear();
	if (replica >= qb_replicas(q))
		return qb_err(EINVAL, QB_ERR_INVALID, "no replica %u", replica);
	pthread_mutex_lock(&q->fault_lock);
	f = &q->rep[replica].fault;
	if (f->kind == QB_FAULT_LATE)
		f->kind = QB_FAULT_NONE;
	for (uint32_t i = 0; i < q->ngates; i++)
		if (q->gates[i].replica == replica &&
		    q->gates[i].kind == QB_FAULT_LATE &&
		    write(q->gates[i].fd, &one, sizeof(one)) < 0 && !ret)
			ret = qb_err(errno, QB_ERR_OTHER, "releasing replica %u: %s",
				     replica, strerror(errno));
	pthread_mutex_unlock(&q->fault_lock);
	return ret;
}

int qb_quorum_test_pause(struct qb_quorum *q, uint32_t where, uint32_t ms)
{
	qb_err_clear();
	if (where > QB_PAUSE_BEFORE_PARK)
		return qb_err(EINVAL, QB_ERR_INVALID, "no pause point %u", where);
	__atomic_store_n(&q->pause_ms, 0, __ATOMIC_RELEASE);
	__atomic_store_n(&q->pause_where, where, __ATOMIC_RELEASE);
	__atomic_store_n(&q->pause_ms, where ? ms : 0, __ATOMIC_RELEASE);
	return 0;
}

void qb_test_pause(struct qb_quorum *q, uint32_t where)
{
	uint32_t ms = __atomic_load_n(&q->pause_ms, __ATOMIC_ACQUIRE);

	if (ms && __atomic_load_n(&q->pause_where, __ATOMIC_ACQUIRE) == where)
		usleep(ms * 1000u);
}

bool qb_fault_match(struct qb_quorum *q, uint32_t r, uint32_t op,
		    uint64_t offset, uint64_t length, struct qb_fault *out)
{
	struct qb_fault *f = &q->rep[r].fault;
	bool hit;

	if (!__atomic_load_n(&q->faults_on, __ATOMIC_ACQUIRE))
		return false;
	pthread_mutex_lock(&q->fault_lock);
	hit = f->kind != QB_FAULT_NONE && (f->ops_mask & (1u << op)) &&
	      offset < f->offset + f->length && f->offset < offset + length;
	if (hit) {
		*out = *f;
		if (f->count && !--f->count)
			f->kind = QB_FAULT_NONE;
	}
	pthread_mutex_unlock(&q->fault_lock);
	return hit;
}

/* ---- the contexts ---- */

void qb_link_add(struct qb_quorum *q, struct qb_ctx_link *l)
{
	pthread_mutex_lock(&q->lock);
	l->next = q->ctxs;
	q->ctxs = l;
	pthread_mutex_unlock(&q->lock);
}

/* Off the list of live contexts, its counters kept; a zombie (I/O still
 * owed) goes to q->zombies. */
void qb_link_remove(struct qb_quorum *q, struct qb_ctx_link *l, bool zombie)
{
	struct qb_ctx_link **p;

	pthread_mutex_lock(&q->lock);
	for (p = &q->ctxs; *p && *p != l; p = &(*p)->next)
		;
	if (*p)
		*p = l->next;
	qb_counters_add(&q->retired_dev, &l->dev);
	for (uint32_t r = 0; r < QB_MAX_REPLICAS; r++)
		qb_counters_add(&q->retired_rep[r], &l->rep[r]);
	if (zombie) {
		l->next = q->zombies;
		__atomic_store_n(&q->zombies, l, __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&q->lock);
}

void qb_links_wake(struct qb_quorum *q)
{
	uint64_t one = 1;

	pthread_mutex_lock(&q->lock);
	for (struct qb_ctx_link *l = q->ctxs; l; l = l->next)
		if (__atomic_load_n(&l->waiting, __ATOMIC_SEQ_CST))
			(void)!write(l->wake_fd, &one, sizeof(one));
	pthread_mutex_unlock(&q->lock);
}

void qb_owed(struct qb_quorum *q, uint32_t r, int delta)
{
	__atomic_add_fetch(&q->rep[r].owed, (uint32_t)delta, __ATOMIC_ACQ_REL);
	if (delta < 0)
		__atomic_add_fetch(&q->rep[r].late, (uint64_t)-delta,
				   __ATOMIC_RELAXED);
}

void qb_owed_forget(struct qb_quorum *q, uint32_t r, uint32_t n)
{
	__atomic_sub_fetch(&q->rep[r].owed, n, __ATOMIC_ACQ_REL);
}

uint32_t qb_replica_outstanding(struct qb_quorum *q, uint32_t r)
{
	uint32_t n = __atomic_load_n(&q->rep[r].owed, __ATOMIC_ACQUIRE);

	pthread_mutex_lock(&q->lock);
	for (struct qb_ctx_link *l = q->ctxs; l; l = l->next)
		n += __atomic_load_n(&l->out[r], __ATOMIC_RELAXED);
	pthread_mutex_unlock(&q->lock);
	return n;
}

void qb_quorum_counters(struct qb_quorum *q, struct qb_counters *dev,
			struct qb_counters *per_replica)
{
	struct qb_counters rep[QB_MAX_REPLICAS];
	uint32_t n = qb_replicas(q);

	pthread_mutex_lock(&q->lock);
	*dev = q->retired_dev;
	memcpy(rep, q->retired_rep, sizeof(rep));
	for (struct qb_ctx_link *l = q->ctxs; l; l = l->next) {
		qb_counters_add(dev, &l->dev);
		for (uint32_t r = 0; r < n; r++)
			qb_counters_add(&rep[r], &l->rep[r]);
	}
	pthread_mutex_unlock(&q->lock);
	for (uint32_t i = 0; i < n; i++) {
		rep[i].late = __atomic_load_n(&q->rep[i].late, __ATOMIC_RELAXED);
		rep[i].timeouts += __atomic_load_n(&q->rep[i].meta_timeouts,
						   __ATOMIC_RELAXED);
		rep[i].owed = __atomic_load_n(&q->rep[i].owed, __ATOMIC_RELAXED);
		rep[i].in_thread = (uint64_t)q->rep[i].memory_fs;
		rep[i].state = (uint64_t)__atomic_load_n(&q->rep[i].state,
							 __ATOMIC_ACQUIRE);
	}
	if (per_replica)
		memcpy(per_replica, rep, n * sizeof(rep[0]));
}

void qb_counters_add(struct qb_counters *to, const struct qb_counters *from)
{
	const uint64_t *f = (const uint64_t *)from;
	uint64_t *t = (uint64_t *)to;

	for (size_t i = 0; i < sizeof(*to) / sizeof(uint64_t); i++)
		t[i] += __atomic_load_n(&f[i], __ATOMIC_RELAXED);
}
