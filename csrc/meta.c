/*
 * meta.c: the on-disk format of the metadata at the end of every replica.
 * The live bitmap and the writes that keep it are bitmap.c's; replica states
 * and joining are members.c's.
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
#include <libnbd.h>
#include <xxhash.h>

#include "nbd.h"
#include "qb.h"

#define META_MAGIC "QBLKMETA"
#define META_VERSION 1
#define HDR_BYTES QB_META_HDR_BYTES
#define HDRS_BYTES (2 * HDR_BYTES)
#define PAGE 4096ULL

_Static_assert(sizeof(struct qb_meta) == 480, "qb_meta is the on-disk layout");
_Static_assert(QB_MAX_REPLICAS == 16, "qb_meta.members holds QB_MAX_REPLICAS");

static uint64_t round_up(uint64_t v, uint64_t to)
{
	return (v + to - 1) / to * to;
}

uint64_t qb_meta_bitmap_bytes(uint64_t nregions)
{
	return round_up(((uint64_t)nregions + 7) / 8, PAGE);
}

#define MAX_REGIONS (1ULL << 24)	/* a 2 MiB bitmap at most */

static uint64_t regions_of(uint64_t data_size, uint32_t shift)
{
	return (data_size + (1ULL << shift) - 1) >> shift;
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

uint64_t qb_meta_bitmap_off(const struct qb_meta *m)
{
	return bitmap_off(m);
}

/*
 * Whether a header (read from disk: untrusted) is one quorumblk could have
 * written for a replica of `size` bytes: NULL, or what is wrong. Every
 * field that sizes or indexes anything is range-checked here.
 */
const char *qb_meta_check(const struct qb_meta *m, uint64_t size)
{
	if (m->replica_size != size)
		return "it was written for a replica of another size";
	if (m->nmembers < 1 || m->nmembers > QB_MAX_REPLICAS ||
	    m->slot >= m->nmembers)
		return "member count or slot out of range";
	if (m->threshold < 1 || m->threshold > m->nmembers)
		return "threshold out of range";
	if (m->region_shift < 12 || m->region_shift > 40)
		return "region size out of range";
	if (!m->data_size || m->data_size % 512 || m->data_size > size)
		return "data size out of range";
	if (regions_of(m->data_size, m->region_shift) > MAX_REGIONS ||
	    m->nregions != regions_of(m->data_size, m->region_shift))
		return "region count does not fit the data size";
	if (bitmap_off(m) + qb_meta_bitmap_bytes(m->nregions) + HDRS_BYTES >
	    size)
		return "the bitmap and headers do not fit the replica";
	if (m->flags || !m->events || !m->seq)
		return "flags or counts out of range";
	for (uint32_t i = 0; i < m->nmembers; i++)
		if (m->members[i].state > QB_REPLICA_REMOVED ||
		    m->members[i].flags & ~(uint32_t)QB_MEMBER_FULL_SYNC)
			return "a member's state or flags out of range";
	return NULL;
}

/* ---- header copies ---- */

void qb_meta_encode(const struct qb_meta *m, uint8_t *out)
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

/* 1: a valid copy, 0: no metadata, -1: damaged, -2: implausible (*why) */
static int decode(const uint8_t *in, uint64_t size, struct qb_meta *m,
		  const char **why)
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
	*why = qb_meta_check(m, size);
	return *why ? -2 : 1;
}

/* A replica's metadata is read and written through a file descriptor, or
 * over its own NBD connection (each call waits at most
 * QB_NBD_META_TIMEOUT_MS). */
struct target {
	int fd;
	struct nbd_handle *h;
};

static int open_meta_fd(const char *path, int flags, uint64_t *size);

static int target_open(struct target *t, const char *path, int flags,
		       uint64_t *size)
{
	int64_t sz;
	int ret;

	t->h = NULL;
	t->fd = -1;
	if (!qb_nbd_is_uri(path)) {
		t->fd = open_meta_fd(path, flags, size);
		return t->fd < 0 ? t->fd : 0;
	}
	ret = qb_nbd_connect(path, QB_NBD_META_TIMEOUT_MS, &t->h);
	if (ret)
		return ret;
	sz = nbd_get_size(t->h);
	if (sz < 0) {
		nbd_close(t->h);
		return qb_err(EIO, QB_ERR_OTHER, "%s: cannot read its size: %s",
			      path, nbd_get_error());
	}
	*size = (uint64_t)sz;
	return 0;
}

static void target_close(struct target *t)
{
	if (t->h)
		nbd_close(t->h);
	if (t->fd >= 0)
		close(t->fd);
}

static int open_meta_fd(const char *path, int flags, uint64_t *size)
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

static int read_full(struct target *t, void *buf, uint64_t len, uint64_t off,
		     const char *path)
{
	ssize_t got;

	if (t->h) {
		int ret = qb_nbd_sync(t->h, false, buf, len, off,
				      QB_NBD_META_TIMEOUT_MS);

		if (!ret)
			return 0;
		return qb_err(-ret, QB_ERR_OTHER,
			      "%s: cannot read its metadata at offset %llu: %s",
			      path, (unsigned long long)off, strerror(-ret));
	}
	got = pread(t->fd, buf, len, (off_t)off);

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
	const char *why[2] = { NULL, NULL };
	int ok[2] = { 0, 0 }, best, ret;
	struct target t;

	qb_err_clear();
	ret = target_open(&t, path, O_RDONLY, &size);
	if (ret < 0)
		return ret;
	ret = -ENODATA;
	if (size < HDRS_BYTES + PAGE)
		goto none;
	if (posix_memalign((void **)&buf, PAGE, HDRS_BYTES)) {
		ret = qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
		goto out;
	}
	ret = read_full(&t, buf, HDRS_BYTES, size - HDRS_BYTES, path);
	if (ret)
		goto out;
	ret = -ENODATA;
	ok[0] = decode(buf, size, &copy[0], &why[0]);
	ok[1] = decode(buf + HDR_BYTES, size, &copy[1], &why[1]);
	if (ok[0] <= 0 && ok[1] <= 0) {
		if (ok[0] == -2 || ok[1] == -2)
			ret = qb_err(EBADMSG, QB_ERR_INVALID,
				     "%s: its quorumblk header is implausible: %s",
				     path, why[ok[0] == -2 ? 0 : 1]);
		else if (ok[0] < 0 || ok[1] < 0)
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
		ret = read_full(&t, buf, want, bitmap_off(m), path);
		if (!ret)
			memcpy(bitmap, buf, want);
	}
	goto out;
none:
	if (ret == -ENODATA)
		qb_err(ENODATA, QB_ERR_INVALID, "%s: no quorumblk metadata",
		       path);
out:
	target_close(&t);	/* first: libnbd may hold buf until then */
	free(buf);
	return ret;
}

/* Write len bytes and make them durable. */
static int write_sync(struct target *t, const void *buf, uint64_t len,
		      uint64_t off)
{
	struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
	int fd = t->fd;
	ssize_t ret;

	if (t->h)
		return qb_nbd_sync(t->h, true, (void *)buf, len, off,
				   QB_NBD_META_TIMEOUT_MS);
	ret = pwritev2(fd, &iov, 1, (off_t)off, RWF_DSYNC);

	if (ret < 0 && errno == EOPNOTSUPP) {
		ret = pwrite(fd, buf, len, (off_t)off);
		if (ret == (ssize_t)len && fdatasync(fd) < 0)
			ret = -1;
	}
	if (ret < 0)
		return -errno;
	return ret == (ssize_t)len ? 0 : -EIO;
}

/* Where the header copy that m's seq picks goes. */
uint64_t qb_meta_header_off(const struct qb_meta *m)
{
	return m->replica_size - HDRS_BYTES + (m->seq & 1) * HDR_BYTES;
}

static int header_write(struct target *fd, const struct qb_meta *m)
{
	uint8_t *buf;
	int ret;

	if (posix_memalign((void **)&buf, PAGE, HDR_BYTES))
		return -ENOMEM;
	qb_meta_encode(m, buf);
	ret = write_sync(fd, buf, HDR_BYTES, qb_meta_header_off(m));
	free(buf);
	return ret;
}

int qb_meta_write(const char *path, const struct qb_meta *m,
		  const uint8_t *bitmap)
{
	uint64_t size, bytes = qb_meta_bitmap_bytes(m->nregions);
	uint8_t *buf = NULL;
	const char *why;
	struct target t;
	int ret;

	qb_err_clear();
	ret = target_open(&t, path, O_RDWR, &size);
	if (ret < 0)
		return ret;
	why = qb_meta_check(m, size);
	if (why) {	/* never write what a read would refuse */
		ret = qb_err(EINVAL, QB_ERR_INVALID,
			     "%s (%llu bytes): refusing to write an implausible header: %s",
			     path, (unsigned long long)size, why);
		goto out;
	}
	if (bitmap) {
		if (posix_memalign((void **)&buf, PAGE, bytes)) {
			ret = qb_err(ENOMEM, QB_ERR_OTHER, "out of memory");
			goto out;
		}
		memcpy(buf, bitmap, bytes);
		ret = write_sync(&t, buf, bytes, bitmap_off(m));
	}
	if (!ret)
		ret = header_write(&t, m);
	if (ret < 0)
		qb_err(-ret, QB_ERR_OTHER, "%s: cannot write its metadata: %s",
		       path, strerror(-ret));
out:
	target_close(&t);	/* first: libnbd may hold buf until then */
	free(buf);
	return ret;
}
