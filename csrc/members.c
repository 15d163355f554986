/*
 * members.c: the replicas' states and the set's membership: a replica taken
 * out after a failure, one moved between states by the replica commands,
 * one that joins (again) a live quorum, and the metadata a quorum is given
 * when it starts. With metadata, every change is recorded in the headers by
 * the bitmap's writer (bitmap.c) before anything that depends on it is
 * acknowledged: a state change names its header round under the writer's
 * lock before the change is visible.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bitmap.h"
#include "nbd.h"

#include <libnbd.h>

bool qb_replica_take_out(struct qb_quorum *q, uint32_t r)
{
	int st = __atomic_load_n(&q->rep[r].state, __ATOMIC_ACQUIRE);

	do {
		if (st == QB_REPLICA_FAILED || st == QB_REPLICA_REMOVED)
			return false;
	} while (!__atomic_compare_exchange_n(&q->rep[r].state, &st,
					      QB_REPLICA_FAILED, false,
					      __ATOMIC_ACQ_REL,
					      __ATOMIC_ACQUIRE));
	__atomic_fetch_and(&q->in_service, ~(1u << r), __ATOMIC_ACQ_REL);
	__atomic_fetch_and(&q->writable, ~(1u << r), __ATOMIC_ACQ_REL);
	return true;
}

bool qb_replica_fail(struct qb_quorum *q, uint32_t r, int err,
		     uint64_t offset, uint64_t length)
{
	struct qb_bitmap *b = q->bitmap;
	int st = __atomic_load_n(&q->rep[r].state, __ATOMIC_ACQUIRE);
	bool took;

	qb_event(q, QB_EV_REPLICA_ERROR, (int)r, offset, length, err);
	if (st == QB_REPLICA_FAILED || st == QB_REPLICA_REMOVED)
		return false;
	if (b) {
		pthread_mutex_lock(&b->lock);
		qb_bitmap_want_headers_locked(q, 0);
		took = qb_replica_take_out(q, r);
		pthread_mutex_unlock(&b->lock);
		qb_bitmap_kick(q);
	} else {
		took = qb_replica_take_out(q, r);
	}
	if (took)
		qb_event(q, QB_EV_REPLICA_FAILED, (int)r, offset, length, err);
	return took;
}

/* Set replica r's state and the masks that follow from it. */
static void set_masks(struct qb_quorum *q, uint32_t r, uint32_t state)
{
	__atomic_store_n(&q->rep[r].state, (int)state, __ATOMIC_RELEASE);
	if (state == QB_REPLICA_IN_SERVICE)
		__atomic_fetch_or(&q->in_service, 1u << r, __ATOMIC_ACQ_REL);
	else
		__atomic_fetch_and(&q->in_service, ~(1u << r), __ATOMIC_ACQ_REL);
	if (state == QB_REPLICA_FAILED || state == QB_REPLICA_REMOVED)
		__atomic_fetch_and(&q->writable, ~(1u << r), __ATOMIC_ACQ_REL);
	else
		__atomic_fetch_or(&q->writable, 1u << r, __ATOMIC_ACQ_REL);
}

int qb_quorum_set_meta(struct qb_quorum *q, const struct qb_meta *meta,
		       const uint8_t *bitmap)
{
	const struct qb_meta *m0 = &meta[0];
	uint64_t bytes = qb_meta_bitmap_bytes(m0->nregions);
	int ret;

	qb_err_clear();
	if (q->bitmap)
		return qb_err(EBUSY, QB_ERR_INVALID, "metadata already set");
	for (uint32_t r = 0; r < q->n; r++) {
		const struct qb_meta *m = &meta[r];
		const char *why = qb_meta_check(m, q->size);

		if (why || m->data_size != m0->data_size ||
		    m->region_shift != m0->region_shift ||
		    m->nmembers != m0->nmembers ||
		    qb_meta_bitmap_off(m) + bytes + 2 * QB_META_HDR_BYTES >
		    q->size || m->data_size % q->align)
			return qb_err(EINVAL, QB_ERR_INVALID,
				      "%s: its metadata does not fit the set (size %llu, data %llu)%s%s",
				      q->rep[r].path,
				      (unsigned long long)q->size,
				      (unsigned long long)m->data_size,
				      why ? ": " : "", why ? why : "");
	}
	ret = qb_bitmap_create(q, meta, bitmap);
	if (ret) {
		qb_bitmap_free(q);
		return ret;
	}
	for (uint32_t r = 0; r < q->n; r++)
		set_masks(q, r, meta[r].members[meta[r].slot].state);
	q->size = m0->data_size;
	return 0;
}

int qb_quorum_set_state(struct qb_quorum *q, uint32_t r, uint32_t state)
{
	struct qb_bitmap *b = q->bitmap;
	uint64_t round = 0;

	qb_err_clear();
	if (r >= qb_replicas(q) || state > QB_REPLICA_REMOVED)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "replica %u or state %u out of range", r, state);
	if (b) {
		pthread_mutex_lock(&b->lock);
		/* a removed replica's own header says so too, so that it never
		 * votes in this set again */
		round = qb_bitmap_want_headers_locked(
			q, state == QB_REPLICA_REMOVED ? 1u << r : 0);
	}
	set_masks(q, r, state);
	if (b) {
		if (state == QB_REPLICA_IN_SERVICE)	/* resynced whole */
			b->set.members[b->set.hdr[r].slot].flags = 0;
		pthread_mutex_unlock(&b->lock);
		qb_bitmap_kick(q);
		qb_bitmap_wait(q, round);
	}
	return 0;
}

/* Whether the replica joining as index r (path, opened as rep with stat st)
 * fits the set; under the writer's lock. */
static int attach_check(struct qb_quorum *q, uint32_t r, const char *path,
			const struct qb_replica *rep, const struct qb_meta *m,
			const struct stat *st)
{
	struct qb_set *set = &q->bitmap->set;
	uint32_t n = q->n, owed;
	struct stat other;

	if (r < n && (q->rep[r].state == QB_REPLICA_IN_SERVICE ||
		      q->rep[r].state == QB_REPLICA_RESYNCING))
		return qb_err(EBUSY, QB_ERR_INVALID,
			      "%s: this replica is already %s (as %s)", path,
			      q->rep[r].state ? "resyncing" : "in service",
			      q->rep[r].path);
	if (r == n && n == QB_MAX_REPLICAS)
		return qb_err(ENOSPC, QB_ERR_INVALID,
			      "%s: this device has had %d replicas, its most",
			      path, QB_MAX_REPLICAS);
	if (m->slot >= QB_MAX_REPLICAS || m->data_size != q->size ||
	    memcmp(m->set_uuid, set->hdr[0].set_uuid, 16) ||
	    (m->slot < set->nmembers &&
	     set->members[m->slot].state != QB_REPLICA_REMOVED &&
	     memcmp(set->members[m->slot].uuid, m->replica_uuid, 16)))
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "%s: its header does not fit this set (slot %u)",
			      path, m->slot);
	for (uint32_t i = 0; i < n; i++) {
		if (i == r || q->rep[i].state == QB_REPLICA_REMOVED)
			continue;
		memset(&other, 0, sizeof(other));
		if (!q->rep[i].is_nbd && fstat(q->rep[i].fd, &other))
			continue;
		if (qb_same_replica(rep, st, &q->rep[i], &other))
			return qb_err(EINVAL, QB_ERR_INVALID,
				      "%s is the same replica as %s", path,
				      q->rep[i].path);
	}
	/* an I/O it has not answered may still land: not before a resync */
	owed = r < n ? qb_replica_outstanding(q, r) : 0;
	if (owed)
		return qb_err(EAGAIN, QB_ERR_INVALID,
			      "%s: %u I/Os issued to it before it failed have not come back (I/O owed); it can rejoin once they have",
			      path, owed);
	return 0;
}

/* A joining NBD replica needs a fresh connection in every context and in
 * the metadata writer: made here, where waiting (up to the replica
 * timeout) is allowed, and taken by each in its own thread (engine.c
 * sync_files, bitmap.c write_all). A context created meanwhile gets none:
 * its I/O there fails, and the replica fails again. */
struct handover {
	struct nbd_handle *h[64];
	uint32_t n;
};

static int nbd_connect_many(struct qb_quorum *q, const char *uri,
			    struct handover *hv)
{
	uint32_t want = 1;	/* the writer's */
	int ret;

	pthread_mutex_lock(&q->lock);
	for (struct qb_ctx_link *l = q->ctxs; l; l = l->next)
		want++;
	pthread_mutex_unlock(&q->lock);
	if (want > 64)
		want = 64;
	for (hv->n = 0; hv->n < want; hv->n++) {
		ret = qb_nbd_connect(uri, q->opt.timeout_ms, &hv->h[hv->n]);
		if (ret)
			return ret;
	}
	return 0;
}

static void handover_close(struct handover *hv)
{
	while (hv->n)
		nbd_close(hv->h[--hv->n]);
}

/* Under the writer's lock, before files_gen moves. */
static void handover_give(struct qb_quorum *q, uint32_t r,
			  struct handover *hv)
{
	struct nbd_handle *old;

	if (!hv->n)
		return;
	old = __atomic_exchange_n(&q->bitmap->nbd_next[r], hv->h[--hv->n],
				  __ATOMIC_ACQ_REL);
	if (old)
		nbd_close(old);
	pthread_mutex_lock(&q->lock);
	for (struct qb_ctx_link *l = q->ctxs; l && hv->n; l = l->next) {
		old = __atomic_exchange_n(&l->nbd_next[r], hv->h[--hv->n],
					  __ATOMIC_ACQ_REL);
		if (old)
			nbd_close(old);
	}
	pthread_mutex_unlock(&q->lock);
}

int qb_quorum_attach(struct qb_quorum *q, const char *path,
		     const struct qb_meta *m)
{
	struct handover hv = { .n = 0 };
	struct qb_bitmap *b = q->bitmap;
	struct qb_replica rep = { .fd = -1 };
	struct stat st;
	uint64_t size, round;
	uint32_t r, n;
	int ret;

	qb_err_clear();
	if (!b)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "replicas join only a set with metadata");
	ret = qb_open_any(&rep, path, &q->opt, &st, &size);
	if (!ret && size != m->replica_size)
		ret = qb_err(EINVAL, QB_ERR_INVALID,
			     "%s: %llu bytes, its header says %llu", path,
			     (unsigned long long)size,
			     (unsigned long long)m->replica_size);
	if (!ret && rep.align > q->align)
		ret = qb_err(EINVAL, QB_ERR_INVALID,
			     "%s: needs %u-byte aligned direct I/O, the device does %u",
			     path, rep.align, q->align);
	if (!ret && !(rep.path = strdup(path)))
		ret = qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	if (!ret && rep.is_nbd)
		ret = nbd_connect_many(q, path, &hv);
	if (ret)
		goto fail;

	pthread_mutex_lock(&b->lock);
	n = q->n;
	for (r = 0; r < n; r++)
		if (!memcmp(b->set.hdr[r].replica_uuid, m->replica_uuid, 16))
			break;
	ret = attach_check(q, r, path, &rep, m, &st);
	if (ret) {
		pthread_mutex_unlock(&b->lock);
		goto fail;
	}
	if (r < n) {
		/* its fd of before may be named by an SQE not yet submitted:
		 * closed at its next attach (one per index, not a growing list) */
		if (q->rep[r].old_fd >= 0)
			close(q->rep[r].old_fd);
		q->rep[r].old_fd = q->rep[r].fd;
		free(q->rep[r].path);
	} else {
		q->rep[r].old_fd = -1;
	}
	q->rep[r].path = rep.path;
	q->rep[r].fd = rep.fd;
	q->rep[r].is_blockdev = rep.is_blockdev;
	q->rep[r].memory_fs = rep.memory_fs;
	q->rep[r].align = rep.align;
	q->rep[r].chunk = rep.chunk;
	q->rep[r].is_nbd = rep.is_nbd;
	q->rep[r].nbd_caps = rep.nbd_caps;
	__atomic_store_n(&q->rep[r].zero_mode, rep.zero_mode, __ATOMIC_RELAXED);
	b->set.hdr[r] = *m;
	memcpy(b->set.members[m->slot].uuid, m->replica_uuid, 16);
	b->set.members[m->slot].state = QB_REPLICA_RESYNCING;
	b->set.members[m->slot].flags = m->members[m->slot].flags;
	if (m->slot >= b->set.nmembers)
		b->set.nmembers = m->slot + 1;
	round = qb_bitmap_want_headers_locked(q, 0);
	handover_give(q, r, &hv);
	__atomic_add_fetch(&q->files_gen, 1, __ATOMIC_ACQ_REL);
	if (r == n)
		__atomic_store_n(&q->n, n + 1, __ATOMIC_RELEASE);
	set_masks(q, r, QB_REPLICA_RESYNCING);
	pthread_mutex_unlock(&b->lock);
	qb_bitmap_kick(q);
	qb_bitmap_wait(q, round);
	handover_close(&hv);	/* more than the contexts that took one */
	return (int)r;
fail:
	handover_close(&hv);
	if (rep.fd >= 0)
		close(rep.fd);
	free(rep.path);
	return ret;
}
