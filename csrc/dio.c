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

/* tmpfs and ramfs: reads and writes are copies that never wait, and the
 * kernel offers io_uring no non-blocking attempt for them. */
bool qb_is_memory_fs(int fd)
{
	struct statfs fs;

	return fstatfs(fd, &fs) == 0 &&
	       ((unsigned long)fs.f_type == TMPFS_MAGIC ||
		(unsigned long)fs.f_type == RAMFS_MAGIC);
}
