/*
 * meta.c: the metadata at the end of every replica, and the write-intent
 * bitmap the engine keeps there.
 *
 * Layout of a replica of `replica_size` bytes (see quorumblk.h):
 *   [0, data_size)            the device's data: a plain raw image
 *   [bitmap_off, +bytes)      one bit per region of 1 << region_shift bytes
 *   [replica_size - 8192, )   two header copies; a write goes to copy
 *                             seq & 1, so a torn header write leaves the
 *                             other one whole
 * A header copy is 4096 bytes: "QBLKMETA", version, then struct qb_meta as
 * laid out in memory (little-endian, no padding), and an xxh3-64 of the
 * first 4088 bytes in the last 8.
 *
 * Write intent: before a write is issued, its regions' bits must be on
 * stable storage on every replica that gets the write. Per region the
 * engine counts writes in flight and keeps a `durable` flag: the fast path
 * is an atomic increment and a load. A region goes clean lazily
 * (qb_quorum_clean): when idle, without writes in flight, and only while
 * every replica is in service, so the bitmap also records everything a
 * failed or resyncing replica missed. Writer and cleaner meet Dekker-style
 * on (inflight, durable), both sequentially consistent: the writer bumps
 * inflight then reads durable; the cleaner drops durable then reads
 * inflight, and backs off if a writer came in.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <xxhash.h>

#include "qb.h"

#define META_MAGIC "QBLKMETA"
#define META_VERSION 1
#define HDR_BYTES 4096
#define HDRS_BYTES (2 * HDR_BYTES)
#define PAGE 4096ULL

_Static_assert(sizeof(struct qb_meta) == 480, "qb_meta is the on-disk layout");
_Static_assert(QB_MAX_REPLICAS == 16, "qb_meta.members holds QB_MAX_REPLICAS");

static uint64_t round_up(uint64_t v, uint64_t to)
{
	return (v + to - 1) / to * to;
}

uint64_t qb_meta_bitmap_bytes(uint32_t nregions)
{
	return round_up(((uint64_t)nregions + 7) / 8, PAGE);
}

static uint32_t regions_of(uint64_t data_size, uint32_t shift)
{
	return (uint32_t)((data_size + (1ULL << shift) - 1) >> shift);
}

uint64_t qb_meta_overhead(uint64_t data_size, uint32_t region_shift)
{
	uint64_t end = round_up(data_size, PAGE) +
		       qb_meta_bitmap_bytes(regions_of(data_size, region_shift)) +
		       HDRS_BYTES;

	return end - data_size;
}

static uint64_t bitmap_off(const struct qb_meta *m)
{
	return round_up(m->data_size, PAGE);
}

/* ---- header copies ---- */

static void encode(const struct qb_meta *m, uint8_t *out)
{
	uint32_t v = META_VERSION, len = HDR_BYTES;
	uint64_t sum;

	memset(out, 0, HDR_BYTES);
	memcpy(out, META_MAGIC, 8);
	memcpy(out + 8, &v, 4);
	memcpy(out + 12, &len, 4);
	memcpy(out + 16, m, sizeof(*m));
	sum = XXH3_64bits(out, HDR_BYTES - 8);
	memcpy(out + HDR_BYTES - 8, &sum, 8);
}

/* 1: a valid copy, 0: no metadata, -1: damaged */
static int decode(const uint8_t *in, uint64_t size, struct qb_meta *m)
{
	uint32_t v, len;
	uint64_t sum;

	if (memcmp(in, META_MAGIC, 8))
		return 0;
	memcpy(&v, in + 8, 4);
	memcpy(&len, in + 12, 4);
	memcpy(&sum, in + HDR_BYTES - 8, 8);
	if (v != META_VERSION || len != HDR_BYTES ||
	    sum != XXH3_64bits(in, HDR_BYTES - 8))
		return -1;
	memcpy(m, in + 16, sizeof(*m));
	if (m->replica_size != size || m->nmembers < 1 ||
	    m->nmembers > QB_MAX_REPLICAS || m->slot >= m->nmembers ||
	    m->region_shift < 12 || m->region_shift > 40 ||
	    m->nregions != regions_of(m->data_size, m->region_shift) ||
	    bitmap_off(m) + qb_meta_bitmap_bytes(m->nregions) + HDRS_BYTES >
	    size)
		return -1;
	return 1;
}

static int open_meta(const char *path, int flags, uint64_t *size)
{
	struct stat st;
	int fd = open(path, flags | O_CLOEXEC | O_DIRECT);

	if (fd < 0 && errno == EINVAL)
		fd = open(path, flags | O_CLOEXEC);
	if (fd < 0)
		return qb_err(errno, QB_ERR_OTHER, "%s: cannot open: %s", path,
			      strerror(errno));
	if (fstat(fd, &st) < 0 ||
	    (S_ISBLK(st.st_mode) && ioctl(fd, BLKGETSIZE64, size) < 0)) {
		int err = errno;

		close(fd);
		return qb_err(err, QB_ERR_OTHER, "%s: cannot read its size: %s",
			      path, strerror(err));
	}
	if (!S_ISBLK(st.st_mode))
		*size = (uint64_t)st.st_size;
	return fd;
}

static int read_full(int fd, void *buf, uint64_t len, uint64_t off,
		     const char *path)
{
	ssize_t got = pread(fd, buf, len, (off_t)off);

	if (got == (ssize_t)len)
		return 0;
	return qb_err(got < 0 ? errno : EIO, QB_ERR_OTHER,
		      "%s: cannot read its metadata at offset %llu: %s", path,
		      (unsigned long long)off,
		      got < 0 ? strerror(errno) : "short read");
}

int qb_meta_read(const char *path, struct qb_meta *m, uint8_t *bitmap,
		 uint64_t bitmap_bytes)
{
	uint64_t size;
	uint8_t *buf = NULL;
	struct qb_meta copy[2];
	int ok[2] = { 0, 0 }, best, ret, fd;

	qb_err_clear();
	fd = open_meta(path, O_RDONLY, &size);
	if (fd < 0)
		return fd;
	ret = -ENODATA;
	if (size < HDRS_BYTES + PAGE)
		goto none;
	if (posix_memalign((void **)&buf, PAGE, HDRS_BYTES)) {
		ret = qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
		goto out;
	}
	ret = read_full(fd, buf, HDRS_BYTES, size - HDRS_BYTES, path);
	if (ret)
		goto out;
	ret = -ENODATA;
	ok[0] = decode(buf, size, &copy[0]);
	ok[1] = decode(buf + HDR_BYTES, size, &copy[1]);
	if (ok[0] <= 0 && ok[1] <= 0) {
		if (ok[0] < 0 || ok[1] < 0)
			ret = qb_err(EBADMSG, QB_ERR_INVALID,
				     "%s: its quorumblk header is damaged (both copies fail their checksum)",
				     path);
		goto none;
	}
	best = ok[0] <= 0 ? 1 : ok[1] <= 0 ? 0 : copy[1].seq > copy[0].seq;
	*m = copy[best];
	ret = 0;
	if (bitmap) {
		uint64_t want = qb_meta_bitmap_bytes(m->nregions);

		if (bitmap_bytes < want) {
			ret = qb_err(EINVAL, QB_ERR_INVALID,
				     "bitmap buffer of %llu bytes, %llu needed",
				     (unsigned long long)bitmap_bytes,
				     (unsigned long long)want);
			goto out;
		}
		free(buf);
		buf = NULL;
		if (posix_memalign((void **)&buf, PAGE, want)) {
			ret = qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
			goto out;
		}
		ret = read_full(fd, buf, want, bitmap_off(m), path);
		if (!ret)
			memcpy(bitmap, buf, want);
	}
	goto out;
none:
	if (ret == -ENODATA)
		qb_err(ENODATA, QB_ERR_INVALID, "%s: no quorumblk metadata",
		       path);
out:
	free(buf);
	close(fd);
	return ret;
}

/* Write len bytes and make them durable. */
static int write_sync(int fd, const void *buf, uint64_t len, uint64_t off)
{
	struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
	ssize_t ret = pwritev2(fd, &iov, 1, (off_t)off, RWF_DSYNC);

	if (ret < 0 && errno == EOPNOTSUPP) {
		ret = pwrite(fd, buf, len, (off_t)off);
		if (ret == (ssize_t)len && fdatasync(fd) < 0)
			ret = -1;
	}
	if (ret < 0)
		return -errno;
	return ret == (ssize_t)len ? 0 : -EIO;
}

static int header_write(int fd, const struct qb_meta *m)
{
	uint8_t *buf;
	int ret;

	if (posix_memalign((void **)&buf, PAGE, HDR_BYTES))
		return -ENOMEM;
	encode(m, buf);
	ret = write_sync(fd, buf, HDR_BYTES,
			 m->replica_size - HDRS_BYTES + (m->seq & 1) * HDR_BYTES);
	free(buf);
	return ret;
}

int qb_meta_write(const char *path, const struct qb_meta *m,
		  const uint8_t *bitmap)
{
	uint64_t size, bytes = qb_meta_bitmap_bytes(m->nregions);
	uint8_t *buf = NULL;
	int fd, ret = 0;

	qb_err_clear();
	fd = open_meta(path, O_RDWR, &size);
	if (fd < 0)
		return fd;
	if (m->replica_size != size ||
	    bitmap_off(m) + bytes + HDRS_BYTES > size) {
		ret = qb_err(EINVAL, QB_ERR_INVALID,
			     "%s: %llu bytes, but the metadata is laid out for %llu",
			     path, (unsigned long long)size,
			     (unsigned long long)m->replica_size);
		goto out;
	}
	if (bitmap) {
		if (posix_memalign((void **)&buf, PAGE, bytes)) {
			ret = qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
			goto out;
		}
		memcpy(buf, bitmap, bytes);
		ret = write_sync(fd, buf, bytes, bitmap_off(m));
	}
	if (!ret)
		ret = header_write(fd, m);
	if (ret < 0)
		qb_err(-ret, QB_ERR_OTHER, "%s: cannot write its metadata: %s",
		       path, strerror(-ret));
out:
	free(buf);
	close(fd);
	return ret;
}

/* ---- the engine's write-intent bitmap ---- */

static uint32_t now_ms(const struct qb_wil *w)
{
	return (uint32_t)((qb_now_ns() - w->t0) / 1000000);
}

static bool image_bit(const struct qb_wil *w, uint32_t i)
{
	return w->image[i / 8] & (1u << (i % 8));
}

/* Replicas that get writes: in service or resyncing. */
static uint32_t writable(struct qb_quorum *q)
{
	return __atomic_load_n(&q->writable, __ATOMIC_ACQUIRE);
}

/* Out of service without touching the metadata (the caller updates it). */
static bool take_out(struct qb_quorum *q, uint32_t r, int err)
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

/* Record the replicas' states in every writable replica's header: one more
 * event. A replica whose header write fails is taken out too, and the
 * others learn that as well. Under w->lock. */
static void headers_update(struct qb_quorum *q)
{
	struct qb_wil *w = q->wil;
	uint32_t failed;

	do {
		failed = 0;
		w->events++;
		w->seq++;
		for (uint32_t r = 0; r < q->n; r++) {
			struct qb_meta *m = &w->hdr[r];

			/* a removed replica's slot may have a new owner */
			if (memcmp(w->members[m->slot].uuid, m->replica_uuid, 16))
				continue;
			w->members[m->slot].state = (uint32_t)
				__atomic_load_n(&q->rep[r].state, __ATOMIC_ACQUIRE);
		}
		for (uint32_t r = 0; r < q->n; r++) {
			struct qb_meta *m = &w->hdr[r];
			int ret;

			if (!(writable(q) & (1u << r)))
				continue;
			m->events = w->events;
			m->seq = w->seq;
			m->nmembers = w->nmembers;
			memcpy(m->members, w->members, sizeof(m->members));
			ret = header_write(q->rep[r].fd, m);
			if (ret < 0 && take_out(q, r, ret)) {
				qb_event(q, QB_EV_REPLICA_FAILED, (int)r,
					 m->replica_size - HDRS_BYTES,
					 HDR_BYTES, ret);
				failed++;
			}
		}
	} while (failed && writable(q));
}

/* Write bitmap pages [p0, p1] to every writable replica. Under w->lock.
 * Returns the replicas that failed it (not yet taken out). */
static uint32_t pages_write(struct qb_quorum *q, uint64_t p0, uint64_t p1)
{
	struct qb_wil *w = q->wil;
	uint32_t bad = 0, mask = writable(q);

	for (uint32_t r = 0; r < q->n; r++) {
		if (!(mask & (1u << r)))
			continue;
		if (write_sync(q->rep[r].fd, w->image + p0 * PAGE,
			       (p1 - p0 + 1) * PAGE, w->off + p0 * PAGE) < 0)
			bad |= 1u << r;
	}
	return bad;
}

static void fail_writers(struct qb_quorum *q, uint32_t bad, uint64_t p0)
{
	bool any = false;

	for (uint32_t r = 0; bad; r++, bad >>= 1)
		if ((bad & 1) && take_out(q, r, -EIO)) {
			qb_event(q, QB_EV_REPLICA_FAILED, (int)r,
				 q->wil->off + p0 * PAGE, PAGE, EIO);
			any = true;
		}
	if (any)
		headers_update(q);
}

void qb_wil_begin(struct qb_quorum *q, uint64_t off, uint64_t len)
{
	struct qb_wil *w = q->wil;
	uint32_t i0 = (uint32_t)(off >> w->shift);
	uint32_t i1 = (uint32_t)((off + len - 1) >> w->shift);
	bool need = false;

	for (uint32_t i = i0; i <= i1; i++) {
		__atomic_fetch_add(&w->inflight[i], 1, __ATOMIC_SEQ_CST);
		if (!__atomic_load_n(&w->durable[i], __ATOMIC_SEQ_CST))
			need = true;
	}
	if (!need)
		return;
	pthread_mutex_lock(&w->lock);
	need = false;
	for (uint32_t i = i0; i <= i1; i++)
		if (!image_bit(w, i)) {
			w->image[i / 8] |= (uint8_t)(1u << (i % 8));
			need = true;
		}
	if (need) {
		uint64_t p0 = i0 / 8 / PAGE, p1 = i1 / 8 / PAGE;

		fail_writers(q, pages_write(q, p0, p1), p0);
	}
	for (uint32_t i = i0; i <= i1; i++)
		__atomic_store_n(&w->durable[i], 1, __ATOMIC_SEQ_CST);
	pthread_mutex_unlock(&w->lock);
}

void qb_wil_end(struct qb_quorum *q, uint64_t off, uint64_t len)
{
	struct qb_wil *w = q->wil;
	uint32_t i0 = (uint32_t)(off >> w->shift);
	uint32_t i1 = (uint32_t)((off + len - 1) >> w->shift);
	uint32_t t = now_ms(w);

	for (uint32_t i = i0; i <= i1; i++) {
		__atomic_store_n(&w->last_ms[i], t, __ATOMIC_RELAXED);
		__atomic_fetch_sub(&w->inflight[i], 1, __ATOMIC_SEQ_CST);
	}
}

static bool all_in_service(struct qb_quorum *q)
{
	struct qb_wil *w = q->wil;
	uint32_t members = 0;

	for (uint32_t s = 0; s < w->nmembers; s++) {
		if (w->members[s].state == QB_REPLICA_REMOVED)
			continue;
		if (w->members[s].state != QB_REPLICA_IN_SERVICE)
			return false;
		members++;
	}
	return qb_popcount(qb_in_service(q)) == members;
}

int qb_quorum_clean(struct qb_quorum *q, uint32_t idle_ms)
{
	struct qb_wil *w = q->wil;
	uint64_t p0 = UINT64_MAX, p1 = 0;
	uint32_t t, cleared = 0;

	qb_err_clear();
	if (!w)
		return 0;
	pthread_mutex_lock(&w->lock);
	if (w->pinned || !all_in_service(q))
		goto out;
	t = now_ms(w);
	for (uint32_t i = 0; i < w->nregions; i++) {
		if (!image_bit(w, i) ||
		    __atomic_load_n(&w->inflight[i], __ATOMIC_SEQ_CST) ||
		    t - __atomic_load_n(&w->last_ms[i], __ATOMIC_RELAXED) <
		    idle_ms)
			continue;
		__atomic_store_n(&w->durable[i], 0, __ATOMIC_SEQ_CST);
		if (__atomic_load_n(&w->inflight[i], __ATOMIC_SEQ_CST)) {
			__atomic_store_n(&w->durable[i], 1, __ATOMIC_SEQ_CST);
			continue;
		}
		w->image[i / 8] &= (uint8_t)~(1u << (i % 8));
		if (i / 8 / PAGE < p0)
			p0 = i / 8 / PAGE;
		p1 = i / 8 / PAGE;
		cleared++;
	}
	if (cleared) {
		/* the writes those bits covered must be durable before the
		 * bits go: a disk's write cache could still lose them */
		uint32_t bad = 0, mask = writable(q);

		for (uint32_t r = 0; r < q->n; r++)
			if ((mask & (1u << r)) && fdatasync(q->rep[r].fd) < 0)
				bad |= 1u << r;
		fail_writers(q, bad, p0);
		fail_writers(q, pages_write(q, p0, p1), p0);
	}
out:
	pthread_mutex_unlock(&w->lock);
	return (int)cleared;
}

int qb_quorum_set_meta(struct qb_quorum *q, const struct qb_meta *meta,
		       const uint8_t *bitmap)
{
	const struct qb_meta *m0 = &meta[0];
	struct qb_wil *w;
	uint64_t bytes = qb_meta_bitmap_bytes(m0->nregions);
	uint32_t in = 0, wr = 0;

	qb_err_clear();
	if (q->wil)
		return qb_err(EBUSY, QB_ERR_INVALID, "metadata already set");
	for (uint32_t r = 0; r < q->n; r++) {
		const struct qb_meta *m = &meta[r];

		if (m->replica_size != q->size || m->data_size != m0->data_size ||
		    m->region_shift != m0->region_shift ||
		    m->nregions != regions_of(m->data_size, m->region_shift) ||
		    m->nmembers != m0->nmembers || m->slot >= m->nmembers ||
		    bitmap_off(m) + bytes + HDRS_BYTES > q->size ||
		    m->data_size % q->align || !m->data_size)
			return qb_err(EINVAL, QB_ERR_INVALID,
				      "%s: its metadata does not fit the set (size %llu, data %llu)",
				      q->rep[r].path,
				      (unsigned long long)q->size,
				      (unsigned long long)m->data_size);
	}
	w = calloc(1, sizeof(*w));
	if (!w)
		return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	w->shift = m0->region_shift;
	w->nregions = m0->nregions;
	w->off = bitmap_off(m0);
	w->bytes = bytes;
	w->t0 = qb_now_ns();
	w->events = m0->events;
	w->seq = m0->seq;
	w->nmembers = m0->nmembers;
	memcpy(w->members, m0->members, sizeof(w->members));
	w->inflight = calloc(w->nregions, sizeof(*w->inflight));
	w->last_ms = calloc(w->nregions, sizeof(*w->last_ms));
	w->durable = calloc(w->nregions, 1);
	if (!w->inflight || !w->last_ms || !w->durable ||
	    posix_memalign((void **)&w->image, PAGE, bytes)) {
		qb_wil_free(w);
		return qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
	}
	memcpy(w->image, bitmap, bytes);
	for (uint32_t i = 0; i < w->nregions; i++) {
		w->durable[i] = image_bit(w, i);
		w->pinned |= w->durable[i];
	}
	pthread_mutex_init(&w->lock, NULL);
	for (uint32_t r = 0; r < q->n; r++) {
		uint32_t st = meta[r].members[meta[r].slot].state;

		w->hdr[r] = meta[r];
		if (meta[r].seq > w->seq)
			w->seq = meta[r].seq;
		q->rep[r].state = (int)st;
		if (st == QB_REPLICA_IN_SERVICE)
			in |= 1u << r;
		if (st != QB_REPLICA_FAILED)
			wr |= 1u << r;
	}
	q->size = m0->data_size;
	q->in_service = in;
	q->writable = wr;
	q->wil = w;
	return 0;
}

void qb_wil_free(struct qb_wil *w)
{
	if (!w)
		return;
	if (w->image)
		pthread_mutex_destroy(&w->lock);
	free(w->inflight);
	free(w->last_ms);
	free(w->durable);
	free(w->image);
	free(w);
}

/* Called by qb_replica_fail once replica r is out: the headers say so
 * before any request that saw the failure completes. */
void qb_meta_replica_failed(struct qb_quorum *q, uint32_t r)
{
	if (!q->wil)
		return;
	pthread_mutex_lock(&q->wil->lock);
	headers_update(q);
	pthread_mutex_unlock(&q->wil->lock);
}

int qb_quorum_set_state(struct qb_quorum *q, uint32_t r, uint32_t state)
{
	qb_err_clear();
	if (r >= qb_replicas(q) || state > QB_REPLICA_REMOVED)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "replica %u or state %u out of range", r, state);
	if (q->wil)
		pthread_mutex_lock(&q->wil->lock);
	__atomic_store_n(&q->rep[r].state, (int)state, __ATOMIC_RELEASE);
	if (state == QB_REPLICA_IN_SERVICE)
		__atomic_fetch_or(&q->in_service, 1u << r, __ATOMIC_ACQ_REL);
	else
		__atomic_fetch_and(&q->in_service, ~(1u << r), __ATOMIC_ACQ_REL);
	if (state == QB_REPLICA_FAILED || state == QB_REPLICA_REMOVED)
		__atomic_fetch_and(&q->writable, ~(1u << r), __ATOMIC_ACQ_REL);
	else
		__atomic_fetch_or(&q->writable, 1u << r, __ATOMIC_ACQ_REL);
	if (q->wil) {
		struct qb_meta *m = &q->wil->hdr[r];

		if (state == QB_REPLICA_IN_SERVICE)	/* resynced whole */
			q->wil->members[m->slot].flags = 0;
		headers_update(q);
		if (state == QB_REPLICA_REMOVED) {
			/* it says so itself too, so that it never votes again
			 * (best effort: the others' headers say it as well) */
			m->events = q->wil->events;
			m->seq = q->wil->seq;
			m->nmembers = q->wil->nmembers;
			memcpy(m->members, q->wil->members, sizeof(m->members));
			header_write(q->rep[r].fd, m);
		}
		pthread_mutex_unlock(&q->wil->lock);
	}
	return 0;
}

int qb_quorum_resynced(struct qb_quorum *q)
{
	if (q->wil) {
		pthread_mutex_lock(&q->wil->lock);
		q->wil->pinned = false;
		pthread_mutex_unlock(&q->wil->lock);
	}
	return 0;
}

int64_t qb_quorum_bitmap(struct qb_quorum *q, uint8_t *out, uint64_t len)
{
	struct qb_wil *w = q->wil;

	if (!w)
		return 0;
	pthread_mutex_lock(&w->lock);
	if (out)
		memcpy(out, w->image, len < w->bytes ? len : w->bytes);
	pthread_mutex_unlock(&w->lock);
	return (int64_t)w->bytes;
}

int qb_quorum_meta(struct qb_quorum *q, uint32_t r, struct qb_meta *m)
{
	qb_err_clear();
	if (!q->wil)
		return qb_err(ENODATA, QB_ERR_INVALID, "the quorum has no metadata");
	if (r >= q->n)
		return qb_err(EINVAL, QB_ERR_INVALID, "replica %u out of range", r);
	pthread_mutex_lock(&q->wil->lock);
	*m = q->wil->hdr[r];
	pthread_mutex_unlock(&q->wil->lock);
	return 0;
}

int qb_quorum_attach(struct qb_quorum *q, const char *path,
		     const struct qb_meta *m)
{
	struct qb_wil *w = q->wil;
	struct qb_replica rep = { .fd = -1 };
	struct stat st, other;
	uint64_t size;
	uint32_t r, n;
	int ret;

	qb_err_clear();
	if (!w)
		return qb_err(EINVAL, QB_ERR_INVALID,
			      "replicas join only a set with metadata");
	pthread_mutex_lock(&w->lock);
	n = q->n;
	for (r = 0; r < n; r++)
		if (!memcmp(w->hdr[r].replica_uuid, m->replica_uuid, 16))
			break;
	if (r < n && (q->rep[r].state == QB_REPLICA_IN_SERVICE ||
		      q->rep[r].state == QB_REPLICA_RESYNCING)) {
		ret = qb_err(EBUSY, QB_ERR_INVALID,
			     "%s: this replica is already %s (as %s)", path,
			     q->rep[r].state ? "resyncing" : "in service",
			     q->rep[r].path);
		goto out;
	}
	if (r == n && n == QB_MAX_REPLICAS) {
		ret = qb_err(ENOSPC, QB_ERR_INVALID,
			     "%s: this device has had %d replicas, its most",
			     path, QB_MAX_REPLICAS);
		goto out;
	}
	if (m->slot >= QB_MAX_REPLICAS || m->data_size != q->size ||
	    memcmp(m->set_uuid, w->hdr[0].set_uuid, 16) ||
	    (m->slot < w->nmembers &&
	     w->members[m->slot].state != QB_REPLICA_REMOVED &&
	     memcmp(w->members[m->slot].uuid, m->replica_uuid, 16))) {
		ret = qb_err(EINVAL, QB_ERR_INVALID,
			     "%s: its header does not fit this set (slot %u)",
			     path, m->slot);
		goto out;
	}
	ret = qb_open_replica(&rep, path, q->opt.buffered, &st, &size);
	if (!ret && size != m->replica_size)
		ret = qb_err(EINVAL, QB_ERR_INVALID,
			     "%s: %llu bytes, its header says %llu", path,
			     (unsigned long long)size,
			     (unsigned long long)m->replica_size);
	if (!ret && rep.align > q->align)
		ret = qb_err(EINVAL, QB_ERR_INVALID,
			     "%s: needs %u-byte aligned direct I/O, the device does %u",
			     path, rep.align, q->align);
	for (uint32_t i = 0; !ret && i < n; i++) {
		int s = q->rep[i].state;

		if (i == r || s == QB_REPLICA_REMOVED || fstat(q->rep[i].fd, &other))
			continue;
		if (qb_same_object(&st, &other))
			ret = qb_err(EINVAL, QB_ERR_INVALID,
				     "%s is the same replica as %s", path,
				     q->rep[i].path);
	}
	if (ret) {
		if (rep.fd >= 0)
			close(rep.fd);
		goto out;
	}
	if (r < n) {	/* its old fd may still be in an abandoned I/O */
		q->graveyard[q->ngraves++] = q->rep[r].fd;
		free(q->rep[r].path);
	}
	rep.path = strdup(path);
	rep.state = QB_REPLICA_RESYNCING;
	q->rep[r] = rep;
	w->hdr[r] = *m;
	memcpy(w->members[m->slot].uuid, m->replica_uuid, 16);
	w->members[m->slot].state = QB_REPLICA_RESYNCING;
	w->members[m->slot].flags = m->members[m->slot].flags;
	if (m->slot >= w->nmembers)
		w->nmembers = m->slot + 1;
	__atomic_add_fetch(&q->files_gen, 1, __ATOMIC_ACQ_REL);
	if (r == n)
		__atomic_store_n(&q->n, n + 1, __ATOMIC_RELEASE);
	__atomic_fetch_or(&q->writable, 1u << r, __ATOMIC_ACQ_REL);
	headers_update(q);
	ret = (int)r;
out:
	pthread_mutex_unlock(&w->lock);
	return ret;
}
