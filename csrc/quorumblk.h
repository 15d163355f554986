/*
 * quorumblk.h: the vote engine's public interface.
 *
 * This header is the cffi cdef's input (with qb_ublk.h after it), so it holds
 * only what Python or a front end needs: plain structs, enums and functions.
 * Every function that can fail returns 0 (or a count) or -errno, and leaves a
 * message for qb_last_error() in the calling thread.
 *
 * Objects:
 *   struct qb_quorum  the replica set: open files, states, counters, events.
 *                     Shared by every thread that serves it.
 *   struct qb_ctx     one thread's engine: its io_uring and request slots.
 *                     Only the thread that created it may use it.
 */
#ifndef QUORUMBLK_H
#define QUORUMBLK_H

#include <stdint.h>

#define QB_MAX_REPLICAS 16

struct qb_quorum;
struct qb_ctx;

/* Request operations; the numbers are ublk's (UBLK_IO_OP_*). */
enum qb_op {
	QB_OP_READ = 0,
	QB_OP_WRITE = 1,
	QB_OP_FLUSH = 2,
	QB_OP_DISCARD = 3,
	QB_OP_WRITE_ZEROES = 5,
};

/* Request flags. */
enum qb_req_flags {
	QB_REQ_FUA = 1,
};

enum qb_read_policy {
	QB_READ_ALL = 0,	/* read every in-service replica, vote */
	QB_READ_THRESHOLD = 1,	/* read `threshold` of them, the rest on doubt */
	QB_READ_FIFO = 2,	/* first replica that answers, no vote */
};

enum qb_hash {
	QB_HASH_XXH3 = 0,	/* xxh3-128 */
	QB_HASH_SHA256 = 1,
};

enum qb_replica_state {
	QB_REPLICA_IN_SERVICE = 0,
	QB_REPLICA_FAILED = 1,	/* out of service: stale until resynced */
	QB_REPLICA_RESYNCING = 2,	/* gets writes, no reads, no vote */
	QB_REPLICA_REMOVED = 3,	/* no longer a member */
};

enum qb_event_type {
	QB_EV_BAD_BLOCK = 0,
	QB_EV_REPLICA_ERROR = 1,
	QB_EV_REPLICA_FAILED = 2,
	QB_EV_QUORUM_FAILURE = 3,
	QB_EV_REPAIRED = 4,
	QB_EV_LATE = 5,		/* an abandoned I/O came back after all */
	QB_EV_NR = 6,
};

enum qb_fault_kind {
	QB_FAULT_NONE = 0,
	QB_FAULT_EIO = 1,	/* the I/O fails (with EIO, or err) */
	QB_FAULT_HANG = 2,	/* the I/O never answers (until cancelled) */
	QB_FAULT_DELAY = 3,	/* the I/O starts delay_ms late */
	QB_FAULT_LATE = 4,	/* the I/O is held until qb_quorum_release */
};

/* Why the calling thread's last request or call failed, beyond errno. */
enum qb_err_kind {
	QB_ERR_OTHER = 0,
	QB_ERR_NO_QUORUM = 1,	/* a block had no quorum (EIO) */
	QB_ERR_DEGRADED = 2,	/* fewer than threshold replicas answered (EIO) */
	QB_ERR_INVALID = 3,	/* bad argument (EINVAL) */
};

struct qb_options {
	uint32_t threshold;
	uint32_t read_policy;	/* enum qb_read_policy */
	uint32_t hash;		/* enum qb_hash */
	uint32_t vote_block;	/* bytes; power of two, 512 .. max_io */
	uint32_t repair;	/* rewrite losing blocks (default 1) */
	uint32_t buffered;	/* open without O_DIRECT (default 0) */
	uint32_t timeout_ms;	/* replica I/O timeout (default 30000) */
	uint32_t events_per_sec;	/* per replica and type; 0: no limit */
	uint32_t max_io;	/* largest request in bytes (default 1 MiB) */
};

/* Counters; per replica only the replica fields are used. */
struct qb_counters {
	uint64_t reads, writes, flushes, discards, write_zeroes;
	uint64_t read_bytes, write_bytes;
	uint64_t bad_blocks;		/* losing copies found */
	uint64_t repairs;		/* blocks rewritten */
	uint64_t quorum_failures;	/* device only */
	uint64_t errors;		/* failed I/Os */
	uint64_t timeouts;		/* I/Os past the replica timeout (a replica's:
				   its metadata writes too) */
	uint64_t late;			/* replica only: abandoned I/Os that came back */
	uint64_t owed;			/* replica only: abandoned I/Os not back yet */
	uint64_t state;			/* replica only: enum qb_replica_state */
	uint64_t in_thread;		/* replica only: 1 when its reads and
				   writes are copies done in the calling
				   thread (a file in RAM), not on io_uring */
};

struct qb_event {
	uint32_t type;		/* enum qb_event_type */
	int32_t replica;	/* -1 when the event is the device's */
	uint64_t offset;	/* bytes */
	uint64_t length;	/* bytes */
	int32_t err;		/* errno, 0 if none */
	uint32_t suppressed;	/* same replica and type, left out before this */
	uint64_t time_ns;	/* CLOCK_REALTIME */
};

/* One run of the built-in load generator (the benchmark's and qemu-img bench's
 * pattern): request i goes to offset (start + i * step) % span, aligned down
 * to bs; step 0 means bs (sequential). */
struct qb_bench_spec {
	uint32_t op;		/* QB_OP_READ or QB_OP_WRITE */
	uint32_t bs;
	uint32_t depth;
	uint32_t pad;
	uint64_t start, step, span;
	uint64_t count;		/* requests to complete */
};

struct qb_bench_result {
	uint64_t ops, bytes, errors;
	uint64_t wall_ns;
	uint64_t cpu_ns;	/* this thread's user + system time */
};

/*
 * On-replica metadata (meta.c): the end of every replica holds the write-intent
 * bitmap and two copies of a header; the data stays at offset 0.
 *
 *   [0, data_size)                  the device's data
 *   [bitmap_offset, + bitmap bytes) one bit per region: writes may be in
 *                                   flight there (roundup(data_size, 4096))
 *   [size - 8192, size)             header copies 0 and 1 (by seq parity)
 */
struct qb_meta_member {
	uint8_t uuid[16];
	uint32_t state;		/* enum qb_replica_state */
	uint32_t flags;		/* enum qb_member_flags */
};

enum qb_member_flags {
	/* joined empty (replace, add-replica): until its resync ends, all of
	 * it is stale, not only what the bitmap marks */
	QB_MEMBER_FULL_SYNC = 1,
};

struct qb_meta {
	uint8_t set_uuid[16];	/* the replica set */
	uint8_t replica_uuid[16];	/* this replica */
	uint64_t data_size;	/* the device's bytes, from offset 0 */
	uint64_t replica_size;	/* where the headers end */
	uint32_t region_shift;	/* bitmap region: 1 << region_shift bytes */
	uint32_t nregions;
	uint64_t events;	/* bumped on every change of the members */
	uint64_t seq;		/* header writes; the higher copy is current */
	uint32_t threshold;
	uint32_t nmembers;
	uint32_t slot;		/* this replica's index in members */
	uint32_t flags;
	uint64_t ctime;		/* set created, seconds since the epoch */
	struct qb_meta_member members[16];	/* QB_MAX_REPLICAS */
};

/* Bytes a replica needs after data_size for its metadata. */
uint64_t qb_meta_overhead(uint64_t data_size, uint32_t region_shift);
uint64_t qb_meta_bitmap_bytes(uint64_t nregions);
/* Read a replica's metadata: 0, -ENODATA (none there), -EBADMSG (damaged) or
 * -errno. bitmap (bitmap_bytes long) may be NULL. */
int qb_meta_read(const char *path, struct qb_meta *m, uint8_t *bitmap,
		 uint64_t bitmap_bytes);
/* Write the header (the copy seq picks) and, when not NULL, the bitmap, and
 * wait until they are on stable storage. */
int qb_meta_write(const char *path, const struct qb_meta *m,
		  const uint8_t *bitmap);

/* Attach metadata to an open quorum before any I/O: meta[i] is replica i's
 * header (members' states give the replicas' states), bitmap the regions to
 * keep dirty (already on stable storage). The device becomes data_size long
 * and every write marks its regions dirty first. */
int qb_quorum_set_meta(struct qb_quorum *q, const struct qb_meta *meta,
		       const uint8_t *bitmap);
/* Change a replica's state (resync done: RESYNCING -> IN_SERVICE, or a
 * replica taken out), recorded in the headers. */
int qb_quorum_set_state(struct qb_quorum *q, uint32_t replica, uint32_t state);
/* Clear the bits of regions without writes for idle_ms, when every replica is
 * in service. Returns regions cleared or -errno. */
int qb_quorum_clean(struct qb_quorum *q, uint32_t idle_ms);
/* Bring a replica (back) into the set on a live quorum: a member that
 * failed (same replica UUID: it takes its old index) or a new one. m is its
 * header, already written to it. It starts RESYNCING: it gets every write
 * from now on; resync it (qb_ctx_sync with it as target), then set it in
 * service. Returns its index or -errno. */
int qb_quorum_attach(struct qb_quorum *q, const char *path,
		     const struct qb_meta *m);

/* In the child of a fork: the metadata writer is a thread, and threads do
 * not cross a fork; the child gets its own. Call it before any other. */
int qb_quorum_after_fork(struct qb_quorum *q);
/* The dirty regions the quorum was opened with are resynced: from now on
 * qb_quorum_clean may clear them. */
int qb_quorum_resynced(struct qb_quorum *q);
/* The resync of [offset, offset + length) by the crash rule is done: the
 * regions it covers whole (a region that ends past the device counts as
 * whole when the range reaches the end) read by the normal vote again.
 * Until then a read that touches a region dirty at open reads every
 * replica in service, votes its blocks there by plurality (ties: the
 * earliest replica), as the resync will, and repairs the losing copies
 * before it completes. */
int qb_quorum_region_synced(struct qb_quorum *q, uint64_t offset,
			    uint64_t length);
/* Copy the bitmap as it is on stable storage; returns its byte count. */
int64_t qb_quorum_bitmap(struct qb_quorum *q, uint8_t *out, uint64_t len);
/* A replica's current header, as last written. */
int qb_quorum_meta(struct qb_quorum *q, uint32_t replica, struct qb_meta *m);

const char *qb_last_error(void);
int qb_last_error_kind(void);	/* enum qb_err_kind */
void qb_options_default(struct qb_options *o);

/* The replica set. Close it after destroying every context on it. */
int qb_quorum_open(const char *const *paths, uint32_t n,
		   const struct qb_options *o, struct qb_quorum **out);
void qb_quorum_close(struct qb_quorum *q);
uint64_t qb_quorum_size(const struct qb_quorum *q);
uint32_t qb_quorum_replicas(const struct qb_quorum *q);
/* The unit every request's offset and length must be a multiple of: 512, or
 * more where a replica's direct I/O needs it (4 KiB sectors). */
uint32_t qb_quorum_align(const struct qb_quorum *q);
void qb_quorum_get_options(const struct qb_quorum *q, struct qb_options *o);
int qb_quorum_replica_state(const struct qb_quorum *q, uint32_t replica);
/* Device totals and, when per_replica is not NULL, one entry per replica. */
void qb_quorum_counters(struct qb_quorum *q, struct qb_counters *dev,
			struct qb_counters *per_replica);
/* Move up to max pending events into out; returns how many. */
uint32_t qb_quorum_events(struct qb_quorum *q, struct qb_event *out,
			  uint32_t max);
/* An eventfd that becomes readable when events are pending. */
int qb_quorum_event_fd(const struct qb_quorum *q);
/* An NBD replica's export offers (bits: 1 flush, 2 FUA, 4 write-zeroes,
 * 8 trim, 16 multi-conn); -1 for a file or block device. */
int qb_quorum_replica_nbd_caps(const struct qb_quorum *q, uint32_t replica);
/* An NBD export's size (for planning its metadata); 0 or -errno. */
int qb_nbd_export_size(const char *uri, uint64_t *size);
/* 1 if [off, off + len) of an NBD export reads as zeros, 0 if not, or
 * -errno. */
int qb_nbd_export_zero(const char *uri, uint64_t off, uint64_t len);
/* Test hook: make replica's I/Os of the ops in ops_mask (1 << QB_OP_*) that
 * touch [offset, offset + length) fail, hang, start late or be held; count 0
 * means until cleared. Offsets at or beyond the data size are the
 * metadata's; err is the errno a failing I/O gets (0: EIO). Kind
 * QB_FAULT_NONE clears the replica's fault. Delayed and
 * held I/Os really run when their time comes (or they are released), even
 * after the engine abandoned them: late completions. */
int qb_quorum_inject(struct qb_quorum *q, uint32_t replica, uint32_t kind,
		     uint32_t ops_mask, uint64_t offset, uint64_t length,
		     uint32_t count, uint32_t delay_ms, int32_t err);
/* Let every I/O held by replica's QB_FAULT_LATE run now, and clear it. */
int qb_quorum_release(struct qb_quorum *q, uint32_t replica);
/* Test hook: widen a race window. The engine sleeps ms milliseconds each
 * time it passes point where, until the pause is set to 0. */
enum qb_pause {
	QB_PAUSE_NONE = 0,
	QB_PAUSE_BEFORE_PARK = 1,	/* a request that will wait for a
					 * metadata round, before it says so */
};
int qb_quorum_test_pause(struct qb_quorum *q, uint32_t where, uint32_t ms);
/* What every context and the metadata writer are doing, as text in buf
 * (a diagnosis of a hang: read without waiting for any lock). */
int qb_quorum_describe(struct qb_quorum *q, char *buf, size_t len);

/* Pure vote over one block: bufs[i] is replica i's copy (or NULL: no vote).
 * Returns the winning replica, or -1 when no class reaches threshold; *win
 * gets the winning (or largest) class as a replica mask. */
int qb_vote(const void *const *bufs, uint32_t n, uint64_t len,
	    uint32_t threshold, uint32_t hash, uint32_t *win);

/* One thread's engine. flags: QB_CTX_SQE128 for a ring that also carries
 * ublk commands. depth is the number of request slots. */
enum qb_ctx_flags {
	QB_CTX_SQE128 = 1,
};
int qb_ctx_create(struct qb_quorum *q, uint32_t depth, uint32_t flags,
		  struct qb_ctx **out);
/* A context whose abandoned I/O has not all come back stays with the
 * quorum (its buffers untouched) until it has, or until the quorum closes. */
void qb_ctx_destroy(struct qb_ctx *c);
/* Process what has completed without waiting: late completions of this
 * context's abandoned I/O, and of destroyed contexts'. */
int qb_ctx_poll(struct qb_ctx *c);
/* Replica r's buffer of a slot: max_io bytes, page aligned. */
void *qb_ctx_buf(struct qb_ctx *c, uint32_t slot, uint32_t replica);
/* Synchronous request on slot 0: a read copies the voted data into buf, a
 * write takes it from buf (the engine copies it into the slot's buffer).
 * Returns bytes done or -errno. */
int64_t qb_ctx_io(struct qb_ctx *c, uint32_t op, uint32_t flags,
		  uint64_t offset, uint32_t length, void *buf);
/*
 * Resync and scrub: vote every block of [offset, offset + length) over the
 * in-service replicas and make the losing copies, and every target
 * (resyncing replicas: read, not voting), agree with the winner. Blocks
 * are held against user writes while they are synced (writes wait), so a
 * sync never overwrites newer data and a target misses no write. Blocks
 * without quorum are left as they are and counted, unless PLURALITY: then
 * their largest class wins (ties: the earliest replica).
 */
enum qb_sync_flags {
	QB_SYNC_PLURALITY = 1,
	QB_SYNC_NO_WRITE = 2,	/* count only */
	QB_SYNC_BLIND = 4,	/* targets are not read: every block is copied */
};

struct qb_sync_result {
	uint64_t blocks;	/* vote blocks checked */
	uint64_t differing;	/* blocks where some copy differed */
	uint64_t unrecoverable;	/* blocks without quorum, left as they were */
	uint64_t written;	/* block copies rewritten */
	uint64_t bad[16];	/* differing copies per replica (QB_MAX_REPLICAS) */
};

int qb_ctx_sync(struct qb_ctx *c, uint64_t offset, uint64_t length,
		uint32_t targets, uint32_t flags, struct qb_sync_result *res);

/* Run the load generator (loadgen.c) to completion on this context. */
int qb_ctx_bench(struct qb_ctx *c, const struct qb_bench_spec *spec,
		 struct qb_bench_result *res);

#endif
