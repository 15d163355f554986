/*
 * dio.c: what a replica's file or device asks of direct I/O, and whether
 * its "I/O" is only a memory copy. Kept apart from quorum.c because the
 * kernel's struct statx (with the direct-I/O fields) and glibc's clash.
 */
#define _GNU_SOURCE
#include <linux/fs.h>
#include <linux/magic.h>
#include <linux/stat.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include "qb.h"

/* The offset and length alignment direct I/O on fd needs (512 at least:
 * the engine's unit). Buffered replicas take any 512-byte multiple. */
uint32_t qb_dio_align(int fd, bool blockdev, bool buffered)
{
	struct statx stx;
	int lbs = 0;

	if (buffered)
		return 512;
	if (blockdev)
		return ioctl(fd, BLKSSZGET, &lbs) == 0 && lbs > 512 ?
		       (uint32_t)lbs : 512;
	if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) ==
	    0 && (stx.stx_mask & STATX_DIOALIGN) &&
	    stx.stx_dio_offset_align > 512)
		return stx.stx_dio_offset_align;
	return 512;
}

/* A file on tmpfs or ramfs: reads and writes are copies that never wait,
 * and the kernel offers io_uring no non-blocking attempt for them. Only a
 * regular file: a device node lives on devtmpfs too, and its I/O can wait
 * for ever (a hung disk, a suspended dm device). */
bool qb_is_memory_fs(int fd)
{
	struct statfs fs;
	struct stat st;

	return fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
	       fstatfs(fd, &fs) == 0 &&
	       ((unsigned long)fs.f_type == TMPFS_MAGIC ||
		(unsigned long)fs.f_type == RAMFS_MAGIC);
}

static long sysfs_number(const char *dir, const char *name)
{
	char path[256], text[32];
	long v = -1;
	int fd;
	ssize_t n;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = read(fd, text, sizeof(text) - 1);
	close(fd);
	if (n > 0) {
		text[n] = 0;
		v = strtol(text, NULL, 10);
	}
	return v;
}

/*
 * The largest direct I/O that the replica's block device takes without
 * splitting it: a split request cannot be issued without blocking, so
 * io_uring would hand it to a worker, and its workers write to one file one
 * request at a time. Counted as if every page were its own segment (the
 * buffer may start inside a page: one segment spare). 0: no limit known
 * (no block device behind it, or buffered I/O).
 */
uint32_t qb_dio_chunk(int fd, bool blockdev, bool buffered)
{
	char dir[128];
	struct stat st;
	long segs, kb;
	uint64_t chunk;
	dev_t dev;

	if (buffered || fstat(fd, &st) < 0)
		return 0;
	dev = blockdev ? st.st_rdev : st.st_dev;
	if (!major(dev))
		return 0;
	snprintf(dir, sizeof(dir), "/sys/dev/block/%u:%u/queue", major(dev),
		 minor(dev));
	segs = sysfs_number(dir, "max_segments");
	if (segs < 0) {		/* a partition: its disk's queue */
		snprintf(dir, sizeof(dir), "/sys/dev/block/%u:%u/../queue",
			 major(dev), minor(dev));
		segs = sysfs_number(dir, "max_segments");
	}
	kb = sysfs_number(dir, "max_sectors_kb");
	if (segs < 2 || kb < 64)
		return 0;
	chunk = (uint64_t)(segs - 1) * 4096;
	if (chunk > (uint64_t)kb * 1024)
		chunk = (uint64_t)kb * 1024;
	chunk &= ~4095ULL;
	return chunk > UINT32_MAX ? 0 : (uint32_t)chunk;
}
