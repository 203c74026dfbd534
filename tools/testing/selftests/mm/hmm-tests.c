// SPDX-License-Identifier: GPL-2.0
/*
 * Tests of the HMM test device, lib/test_hmm.c.
 *
 * HMM (Heterogeneous Memory Management) lets a device driver mirror a
 * process's address space in a device page table: pages are faulted in with
 * hmm_range_fault() and dropped again when an mmu notifier reports that the
 * CPU page table changed. test_hmm emulates such a device. Every open of
 * /dev/hmm_dmirrorN is a device mirroring the mm of the opener, and the
 * ioctls of lib/test_hmm_uapi.h make it read, write or snapshot that memory
 * the way a GPU would.
 *
 * The tests of the hmm fixture run on each device: 0 and 1 are
 * device-private; 2 and 3 are device-coherent and exist only when the module
 * was given spm_addr_dev0 and spm_addr_dev1, else their variants are
 * skipped. Those of hmm_inval and hmm_config use the eight device-private
 * devices 0, 1 and 4 to 9 of the default private_devices=8, change their
 * settings and put them back after. The suite covers:
 * - device reads and writes of private and shared anonymous memory, of a
 *   shared file mapping, of THP and of hugetlbfs pages: the data on both
 *   sides and the device fault counts;
 * - access rights: PROT_NONE cannot be read, read-only memory cannot be
 *   written until mprotect() allows it;
 * - memory shared with, or copied on write for, a forked child;
 * - READ_UNLOCKED of a range served by userfaultfd;
 * - device reads racing with munmap();
 * - the per-page states SNAPSHOT reports;
 * - exclusive (atomic) device access: the data taken, device writes through
 *   it, its end at the CPU's first read or write, at mprotect(PROT_READ), at
 *   fork() and at another device's fault; the split of a THP's PMD; the
 *   memory that cannot be taken (shared, file, hugetlb, not writable); one
 *   device's threads taking and giving back their own slices concurrently;
 * - migration to device memory and back, by request, by CPU fault and by
 *   eviction: where each page is (SNAPSHOT) and its data; the memory that
 *   cannot move (shared, page cache, pinned, on another device, holes and
 *   PROT_NONE); transparent huge pages (empty, the huge zero page,
 *   collapsed, MADV_FREE, partial munmap(), mremap(), failed device
 *   allocations); fork(); get_user_pages(), long-term pins and io_uring
 *   fixed buffers; NUMA memory policies; pages left on the device by a
 *   closed file or an exited process;
 * - rejection of malformed requests;
 * - many devices mirroring one process, in each notifier model and
 *   invalidation mode: every device is told of munmap(), mprotect(),
 *   MADV_DONTNEED and copy on write, and faults again or fails; two-pass
 *   devices overlap their flushes, single-pass ones do not; a device short
 *   of finish objects falls back to a synchronous invalidation; devices of
 *   both modes side by side;
 * - notifier lifetime: one per leaf faulted in, or one per mirror, removed
 *   by munmap() and close(), and none left behind by a process that exits
 *   during invalidations, is OOM-killed or is reaped by process_mrelease();
 *   non-blockable invalidations refused while a flush would take time;
 * - device settings: bad values refused, good ones read back.
 *
 * Most tests get their memory from hmm_buffer_map(): a backing of enum
 * hmm_backing (private or shared anonymous memory, a file mapped shared or
 * private, a PMD-sized range, a THP, a hugetlbfs page), with a buffer for
 * what the device reads or writes and one for SNAPSHOT; hmm_buffer_free()
 * undoes it. They check with macros around the harness's ASSERT_*(), which
 * report the caller's line: ASSERT_CMD_ALL() (a request did every page),
 * ASSERT_DEV_READ() (and handed back the expected data), ASSERT_SNAPSHOT()
 * (every page is in the expected state). The device access tests of the
 * hmm fixture are the rows of one table, HMM_ACCESS_TEST(name, backing,
 * operation, data): a new scenario is one line there.
 *
 * Run it as root with the test_hmm module available:
 *	./test_hmm.sh [-- <hmm-tests arguments>]
 * loads the module, runs this program and unloads the module again; run_vm.sh
 * in the repository does the same in a QEMU guest. "./hmm-tests -l" lists the
 * tests and "-r <fixture>.<variant>.<test>" (e.g. "-r hmm.private0.anon_read",
 * "-r hmm_config.oom_kill") runs a single one.
 *
 * Some tests need more and skip, saying why, without it: gup_test
 * (CONFIG_GUP_TEST, debugfs mounted), two NUMA nodes with memory, THP, and
 * for io_uring fixed buffers a build with -DHMM_HAVE_LIBURING and -luring,
 * as run_vm.sh does (a kernel tree's selftests build has no liburing).
 */

#include "kselftest_harness.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <linux/mempolicy.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>
#ifdef HMM_HAVE_LIBURING
#include <liburing.h>
#endif

/* gup_test's interface, from the kernel tree: -I the tree's top. */
#include <mm/gup_test.h>

/* Private interface of the test module: it is not in include/uapi. */
#include <lib/test_hmm_uapi.h>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE		25
#endif
#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP	4
#endif
#ifndef __NR_pidfd_open
#define __NR_pidfd_open		434
#endif
#ifndef __NR_process_mrelease
#define __NR_process_mrelease	448
#endif

#define HMM_NPAGES		128	/* size of most test buffers */
#define HMM_UFFD_NPAGES		16
#define HMM_RACE_NPAGES		512
#define HMM_RACE_ROUNDS		50
#define HMM_MAX_HUGETLB_SIZE	(64UL << 20)

/*
 * Harness timeout, in seconds, of the tests that run many rounds of a race
 * (TEST_F_TIMEOUT; the default is 30). Under QEMU without KVM they take a
 * few seconds on a quiet host; exclusive_threads took up to 137 s at a host
 * load average of 10 and 176 s with KASAN on top. Their verdict comes from
 * what the rounds did, never from how long they took.
 */
#define HMM_SLOW_TIMEOUT	600

/* Output fields are preset to this: a failing request must leave them be. */
#define HMM_POISON		0x5ca1ab1edeadbeefULL

#define HMM_THP_DIR		"/sys/kernel/mm/transparent_hugepage"
#define HMM_NR_HUGEPAGES	"/proc/sys/vm/nr_hugepages"

static void hmm_dev_path(char *path, size_t len, int device)
{
	snprintf(path, len, "/dev/hmm_dmirror%d", device);
}

/* Open a new device on @device, reporting why if that fails. */
static int hmm_open(int device)
{
	char path[32];
	int fd;

	hmm_dev_path(path, sizeof(path), device);
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		fprintf(stderr, "# open %s: %s\n", path, strerror(errno));
	return fd;
}

/*
 * For the times tests print, and for a lower bound (a slow host only makes
 * things take longer): never for an upper bound.
 */
static __u64 hmm_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* Issue @request, retrying on EINTR: its result, or a negative errno. */
static int hmm_ioctl(int fd, unsigned long request, void *arg)
{
	int ret;

	do {
		ret = ioctl(fd, request, arg);
	} while (ret < 0 && errno == EINTR);
	return ret < 0 ? -errno : ret;
}

/* Have the device behind @fd run @request on @npages pages at @addr. */
static int hmm_cmd(int fd, unsigned long request, void *addr, void *ptr,
		   __u64 npages, struct hmm_dmirror_cmd *cmd)
{
	cmd->addr = (uintptr_t)addr;
	cmd->ptr = (uintptr_t)ptr;
	cmd->npages = npages;
	cmd->cpages = HMM_POISON;
	cmd->faults = HMM_POISON;
	return hmm_ioctl(fd, request, cmd);
}

static int hmm_stats(int fd, struct hmm_dmirror_stats *stats)
{
	return hmm_ioctl(fd, HMM_DMIRROR_STATS, stats);
}

static int hmm_stats_reset(int fd)
{
	return hmm_ioctl(fd, HMM_DMIRROR_STATS_RESET, NULL);
}

/* The interconnect group of the device behind @fd, 0 for none, < 0 error. */
static long hmm_group(int fd)
{
	struct hmm_dmirror_stats stats;
	int ret = hmm_stats(fd, &stats);

	return ret ? ret : (long)stats.interconnect_group;
}

/*
 * The driver's records of the invalidations of this process that overlap
 * [@addr, @addr + @size) and came after the record @since: up to @nr_max of
 * them into @recs, their number into *@nr, and the newest record's seq into
 * *@last. Returns 0 or a negative errno.
 */
static int hmm_invals(int fd, void *addr, size_t size, size_t page_size,
		      __u64 since, struct hmm_dmirror_inval_record *recs,
		      unsigned int nr_max, unsigned int *nr, __u64 *last)
{
	struct hmm_dmirror_inval_query q = {
		.addr = (uintptr_t)addr,
		.npages = size / page_size,
		.since = since,
		.ptr = (uintptr_t)recs,
		.nr_max = nr_max,
	};
	int ret;

	ret = hmm_ioctl(fd, HMM_DMIRROR_INVALIDATIONS, &q);
	if (ret)
		return ret;
	*nr = q.nr;
	*last = q.last;
	return 0;
}

/*
 * The seq of the driver's newest invalidation record: the invalidations
 * after it are those that came after this call. 0 if there is none yet or
 * the call failed, which makes later lookups see more, never less.
 */
static __u64 hmm_inval_mark(int fd)
{
	unsigned int nr;
	__u64 last = 0;

	hmm_invals(fd, NULL, 0, 1, 0, NULL, 0, &nr, &last);
	return last;
}

/*
 * The record of the one invalidation for @event, after the record @since,
 * that covers all of [@addr, @addr + @size), into @rec. Other invalidations
 * (of other ranges, or for other reasons: reclaim, compaction) are not
 * looked at. Returns 0, -ENOENT if there is no such invalidation, -E2BIG if
 * there are several, or the ioctl's error.
 */
static int hmm_inval_find(int fd, void *addr, size_t size, size_t page_size,
			  __u64 since, __u32 event,
			  struct hmm_dmirror_inval_record *rec)
{
	static struct hmm_dmirror_inval_record recs[HMM_DMIRROR_INVAL_RECORDS];
	__u64 start = (uintptr_t)addr, end = start + size, last;
	unsigned int i, nr, found = 0;
	int ret;

	ret = hmm_invals(fd, addr, size, page_size, since, recs,
			 HMM_DMIRROR_INVAL_RECORDS, &nr, &last);
	if (ret)
		return ret;
	for (i = 0; i < nr && i < HMM_DMIRROR_INVAL_RECORDS; i++) {
		if (recs[i].event != event || recs[i].start > start ||
		    recs[i].end < end)
			continue;
		*rec = recs[i];
		found++;
	}
	if (found == 1)
		return 0;
	/* Say what there was instead, anywhere in the process. */
	fprintf(stderr, "# %u invalidations of 0x%llx-0x%llx after %llu, up to %llu\n",
		nr, start, end, since, last);
	hmm_invals(fd, NULL, 1ULL << 47, page_size, since, recs,
		   HMM_DMIRROR_INVAL_RECORDS, &nr, &last);
	for (i = 0; i < nr && i < HMM_DMIRROR_INVAL_RECORDS; i++)
		fprintf(stderr,
			"# invalidation %llu: 0x%llx-0x%llx event %u: %u callbacks, %u flushes, %u overlapped, %u/%u two-pass, %u fallbacks, %u refused\n",
			recs[i].seq, recs[i].start, recs[i].end, recs[i].event,
			recs[i].callbacks, recs[i].flushes, recs[i].overlapped,
			recs[i].two_pass_starts, recs[i].two_pass_finishes,
			recs[i].sync_fallbacks, recs[i].refused);
	return found ? -E2BIG : -ENOENT;
}

/*
 * Map @size bytes of anonymous memory, NULL on failure. THP is turned off on
 * the range so that tests not about THP deal with small pages only, whatever
 * the system setting and whichever mapping the range is merged with.
 */
static char *hmm_map_anon(size_t size, int prot, int flags)
{
	char *p = mmap(NULL, size, prot, flags | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	madvise(p, size, MADV_NOHUGEPAGE);	/* fails only without THP */
	return p;
}

/* Word @i of the pattern @seed; two seeds differ at every word. */
static __u32 hmm_word(size_t i, __u32 seed)
{
	return ((__u32)i * 0x9e3779b1u) ^ seed;
}

static void hmm_fill(void *buf, size_t len, __u32 seed)
{
	__u32 *w = buf;
	size_t i;

	for (i = 0; i < len / sizeof(*w); i++)
		w[i] = hmm_word(i, seed);
}

/* Offset of the first word of @buf not in the pattern @seed, else -1. */
static long hmm_check(const void *buf, size_t len, __u32 seed)
{
	const __u32 *w = buf;
	size_t i;

	for (i = 0; i < len / sizeof(*w); i++)
		if (w[i] != hmm_word(i, seed))
			return i * sizeof(*w);
	return -1;
}

/* Offset of the first byte of @buf that is not @c, else -1. */
static long hmm_check_bytes(const void *buf, size_t len, unsigned char c)
{
	const unsigned char *b = buf;
	size_t i;

	for (i = 0; i < len; i++)
		if (b[i] != c)
			return i;
	return -1;
}

/* Read-fault @len bytes at @p from the CPU, without writing them. */
static void hmm_cpu_read(const char *p, size_t len, size_t page_size)
{
	size_t off;

	for (off = 0; off < len; off += page_size)
		(void)__atomic_load_n(p + off, __ATOMIC_RELAXED);
}

/* Read the small file @path into @buf as a string: 0 or a negative errno. */
static int hmm_read_file(const char *path, char *buf, size_t len)
{
	ssize_t n;
	int fd, ret = 0;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	n = read(fd, buf, len - 1);
	if (n < 0)
		ret = -errno;
	else
		buf[n] = '\0';
	close(fd);
	return ret;
}

/* The non-negative number in @path, -1 if it cannot be read. */
static long hmm_read_long(const char *path)
{
	char buf[64], *end;
	long val;

	if (hmm_read_file(path, buf, sizeof(buf)))
		return -1;
	errno = 0;
	val = strtol(buf, &end, 10);
	if (errno || end == buf || val < 0)
		return -1;
	return val;
}

/* Write @str to the file @path in one write(): 0 or a negative errno. */
static int hmm_write_str(const char *path, const char *str)
{
	size_t len = strlen(str);
	int fd, ret = 0;
	ssize_t n;

	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	n = write(fd, str, len);
	if (n < 0)
		ret = -errno;
	else if ((size_t)n != len)
		ret = -EIO;
	close(fd);
	return ret;
}

static int hmm_write_long(const char *path, long val)
{
	char buf[32];

	snprintf(buf, sizeof(buf), "%ld\n", val);
	return hmm_write_str(path, buf);
}

/* The "@key:" value of /proc/meminfo, in kB; -1 if there is none. */
static long hmm_meminfo_kb(const char *key)
{
	size_t klen = strlen(key);
	char line[128];
	long val = -1;
	FILE *f;

	f = fopen("/proc/meminfo", "re");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, key, klen) && line[klen] == ':') {
			val = strtol(line + klen + 1, NULL, 10);
			break;
		}
	}
	fclose(f);
	return val;
}

/* A file of @size bytes in @dir that vanishes on close, else -1. */
static int hmm_tmpfile_in(const char *dir, size_t size)
{
	char path[256];
	int fd;

	fd = open(dir, O_TMPFILE | O_RDWR | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0) {
		snprintf(path, sizeof(path), "%s/hmm-tests.XXXXXX", dir);
		fd = mkostemp(path, O_CLOEXEC);
		if (fd < 0)
			return -1;
		unlink(path);
	}
	if (!ftruncate(fd, size))
		return fd;
	close(fd);
	return -1;
}

/* A temporary file of @size bytes, in $TMPDIR or a usual place; or -1. */
static int hmm_tmpfile(size_t size)
{
	static const char * const dirs[] = { "/tmp", "/dev/shm", "." };
	const char *tmpdir = getenv("TMPDIR");
	unsigned int i;
	int fd = -1;

	if (tmpdir)
		fd = hmm_tmpfile_in(tmpdir, size);
	for (i = 0; fd < 0 && i < ARRAY_SIZE(dirs); i++)
		fd = hmm_tmpfile_in(dirs[i], size);
	return fd;
}

/* NULL if transparent huge pages can be used, else the reason why not. */
static const char *hmm_thp_unavailable(void)
{
	char buf[128];

	if (hmm_read_file(HMM_THP_DIR "/enabled", buf, sizeof(buf)))
		return "no " HMM_THP_DIR "/enabled: kernel without THP";
	if (strstr(buf, "[never]"))
		return "THP disabled: " HMM_THP_DIR "/enabled is never";
	return NULL;
}

/* Print why something is unavailable into @why: returns NULL, for callers. */
static __printf(3, 4) char *hmm_why(char *why, size_t len,
				    const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, len, fmt, ap);
	va_end(ap);
	return NULL;
}

/*
 * The rows or steps of a table-driven test that could not run, and why. A
 * test that left one out ends with SKIP and the reasons rather than a pass,
 * unless something already failed (hmm_left_out()).
 */
struct hmm_skipped {
	char	why[512];
};

static __printf(2, 3) void hmm_skip_row(struct hmm_skipped *sk,
					const char *fmt, ...)
{
	size_t len = strlen(sk->why);
	va_list ap;

	if (len && len + 2 < sizeof(sk->why)) {
		strcpy(sk->why + len, "; ");
		len += 2;
	}
	va_start(ap, fmt);
	vsnprintf(sk->why + len, sizeof(sk->why) - len, fmt, ap);
	va_end(ap);
	fprintf(stderr, "# left out: %s\n", sk->why + len);
}

/* Were rows left out of a test in which nothing failed? */
static bool hmm_left_out(const struct hmm_skipped *sk,
			 const struct __test_metadata *metadata)
{
	return sk->why[0] && metadata->exit_code == KSFT_PASS;
}

/*
 * A PMD-aligned, PMD-sized range of private anonymous memory that may use
 * transparent huge pages (MADV_HUGEPAGE), not populated. Returns it with its
 * size in @size and, in @map, the mapping to munmap() (twice that size); or
 * NULL with the reason in @why.
 */
static char *hmm_map_pmd(size_t *size, char **map, char *why, size_t len)
{
	const char *off = hmm_thp_unavailable();
	long pmd_size;
	char *buf;

	if (off)
		return hmm_why(why, len, "%s", off);
	pmd_size = hmm_read_long(HMM_THP_DIR "/hpage_pmd_size");
	if (pmd_size <= 0)
		pmd_size = 2L << 20;

	*map = mmap(NULL, 2 * pmd_size, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (*map == MAP_FAILED)
		return hmm_why(why, len, "mmap of %ld bytes: %s", 2 * pmd_size,
			       strerror(errno));
	buf = (char *)(((uintptr_t)*map + pmd_size - 1) &
		       ~((uintptr_t)pmd_size - 1));
	madvise(buf, pmd_size, MADV_HUGEPAGE);	/* THP is on: cannot fail */
	*size = pmd_size;
	return buf;
}

/*
 * A PMD-sized transparent huge page, PMD-aligned and filled with the pattern
 * @seed. Returns it with its size in @size and, in @map, the mapping to
 * munmap() (twice that size); or NULL with the reason in @why.
 */
static char *hmm_map_thp(__u32 seed, size_t *size, char **map, char *why,
			 size_t len)
{
	char *buf;
	int err;

	buf = hmm_map_pmd(size, map, why, len);
	if (!buf)
		return NULL;
	hmm_fill(buf, *size, seed);
	/* Make sure of a THP: the write fault may have fallen back. */
	if (madvise(buf, *size, MADV_COLLAPSE)) {
		err = errno;
		munmap(*map, 2 * *size);
		return hmm_why(why, len, "no THP for the range (MADV_COLLAPSE: %s)",
			       strerror(err));
	}
	return buf;
}

/*
 * Map one private hugetlbfs page of the default size, raising nr_hugepages
 * by one for it: as soon as it is raised, *@old_nr holds the value to put
 * back, which the fixture's teardown does. Returns the page with its size in
 * @size, or NULL with the reason in @why.
 */
static char *hmm_map_hugetlb(size_t *size, long *old_nr, char *why,
			     size_t len)
{
	long size_kb = hmm_meminfo_kb("Hugepagesize");
	long old;
	char *buf;
	int ret;

	if (size_kb <= 0)
		return hmm_why(why, len,
			       "no hugetlb support: no Hugepagesize in /proc/meminfo");
	if (size_kb * 1024 > (long)HMM_MAX_HUGETLB_SIZE)
		return hmm_why(why, len,
			       "default huge page size (%ld kB) too large for the test",
			       size_kb);

	old = hmm_read_long(HMM_NR_HUGEPAGES);
	if (old < 0)
		return hmm_why(why, len, "cannot read %s", HMM_NR_HUGEPAGES);
	ret = hmm_write_long(HMM_NR_HUGEPAGES, old + 1);
	if (ret)
		return hmm_why(why, len, "cannot raise %s: %s",
			       HMM_NR_HUGEPAGES, strerror(-ret));
	*old_nr = old;
	if (hmm_read_long(HMM_NR_HUGEPAGES) <= old)
		return hmm_why(why, len,
			       "the kernel could not allocate a huge page");
	buf = mmap(NULL, size_kb * 1024, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
	if (buf == MAP_FAILED)
		return hmm_why(why, len, "no free huge page to map: %s",
			       strerror(errno));
	*size = size_kb * 1024;
	return buf;
}

/*
 * End of the user address space. mmap() honours a free hint address only
 * below it, so find the highest power of two it honours: 2^47 on x86_64
 * without five-level page tables.
 */
static __u64 hmm_user_va_end(size_t page_size)
{
	__u64 end = 1ULL << 47;
	unsigned int bits;

	for (bits = 47; bits < 63; bits++) {
		void *hint = (void *)(1UL << bits);
		void *p;

		p = mmap(hint, page_size, PROT_NONE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			break;
		munmap(p, page_size);
		if (p != hint)
			break;
		end = 1ULL << (bits + 1);
	}
	return end;
}

/*
 * Body of a forked child: open a device of its own (a device mirrors the
 * process that opened it), have it write the pattern @seed over @npages
 * pages at @addr and check that the child's CPU sees that. Returns the
 * child's exit status: 0 on success.
 */
static int hmm_child_write(int device, char *addr, __u64 npages,
			   size_t page_size, __u32 seed)
{
	size_t size = npages * page_size;
	struct hmm_dmirror_cmd cmd;
	char *src;
	int fd, ret;

	fd = hmm_open(device);
	src = malloc(size);
	if (fd < 0 || !src)
		return 1;
	hmm_fill(src, size, seed);
	ret = hmm_cmd(fd, HMM_DMIRROR_WRITE, addr, src, npages, &cmd);
	if (ret) {
		fprintf(stderr, "# child: device WRITE: %s\n", strerror(-ret));
		return 2;
	}
	if (cmd.cpages != npages) {
		fprintf(stderr, "# child: device wrote %llu of %llu pages\n",
			cmd.cpages, npages);
		return 3;
	}
	if (hmm_check(addr, size, seed) >= 0) {
		fprintf(stderr, "# child: CPU does not see the device's data\n");
		return 4;
	}
	free(src);
	close(fd);
	return 0;
}

/* waitpid() for @pid, retrying on EINTR: @pid, or -1 on error. */
static pid_t hmm_waitpid(pid_t pid, int *status)
{
	pid_t ret;

	do {
		ret = waitpid(pid, status, 0);
	} while (ret < 0 && errno == EINTR);
	return ret;
}

/* fork(), the stdio buffers flushed first so that the child has none. */
static pid_t hmm_fork(void)
{
	fflush(NULL);
	return fork();
}

/*
 * Reap the child @pid: its exit status, or -1 if it could not be waited
 * for or did not exit (killed by a signal), which is printed.
 */
static int hmm_reap(pid_t pid)
{
	int status;

	if (hmm_waitpid(pid, &status) != pid) {
		fprintf(stderr, "# waitpid(%d): %s\n", pid, strerror(errno));
		return -1;
	}
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	fprintf(stderr, "# child %d: wait status 0x%x\n", pid, status);
	return -1;
}

/*
 * ASSERT_CHILD_EXIT() - assert that the child @pid exited, with status
 * @code (waits for it).
 */
#define ASSERT_CHILD_EXIT(pid, code) ASSERT_EQ(code, hmm_reap(pid))

/* Run hmm_child_write() in a child; returns its wait status, -1 on error. */
static int hmm_fork_child_write(int device, char *addr, __u64 npages,
				size_t page_size, __u32 seed)
{
	int status;
	pid_t pid;

	pid = hmm_fork();
	if (pid < 0)
		return -1;
	if (!pid)
		_exit(hmm_child_write(device, addr, npages, page_size, seed));
	if (hmm_waitpid(pid, &status) != pid)
		return -1;
	return status;
}

/* --- Test buffers, and the checks tests make on them ------------------- */

#define HMM_LEAF_SIZE		(2UL << 20)	/* the default leaf size */

/*
 * Map @size bytes of anonymous memory as a mapping of its own at an address
 * aligned to @align, a power of two: it then covers whole leaves of a
 * device page table whose leaves are @align or smaller. NULL on failure.
 */
static char *hmm_map_aligned(size_t size, size_t align)
{
	size_t len = size + align;
	char *map, *buf;

	map = hmm_map_anon(len, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	if (!map)
		return NULL;
	buf = (char *)(((uintptr_t)map + align - 1) & ~((uintptr_t)align - 1));
	if (buf != map)
		munmap(map, buf - map);
	munmap(buf + size, map + len - buf - size);
	return buf;
}

/* The kinds of memory a test buffer can be: see hmm_buffer_map(). */
enum hmm_backing {
	HMM_ANON,		/* private anonymous, small pages only */
	HMM_ANON_SHARED,	/* MAP_SHARED anonymous: shmem */
	HMM_FILE_SHARED,	/* MAP_SHARED temporary file */
	HMM_FILE_PRIVATE,	/* MAP_PRIVATE temporary file */
	HMM_PMD,		/* PMD-aligned and -sized, may use THP */
	HMM_PMD_ZERO,		/* HMM_PMD read by the CPU: huge zero page */
	HMM_THP,		/* a transparent huge page */
	HMM_HUGETLB,		/* one private hugetlbfs page */
	HMM_LEAF,		/* HMM_ANON covering whole HMM_LEAF_SIZEs */
};

/*
 * @shared: MAP_SHARED, a forked child shares the pages rather than copy
 * them on write. @filled: what SNAPSHOT reports for every page once
 * hmm_buffer_map() filled it with a seed (files: written with pwrite(), so
 * not mapped yet, HMM_DMIRROR_PROT_NONE); HMM_PMD and HMM_PMD_ZERO: as
 * mapped, untouched.
 */
static const struct {
	const char	*name;
	bool		shared;
	unsigned char	filled;
} hmm_backings[] = {
	[HMM_ANON]	  = { "private anonymous", false,
			      HMM_DMIRROR_PROT_WRITE },
	[HMM_ANON_SHARED] = { "MAP_SHARED anonymous", true,
			      HMM_DMIRROR_PROT_WRITE },
	[HMM_FILE_SHARED] = { "MAP_SHARED file", true, HMM_DMIRROR_PROT_NONE },
	[HMM_FILE_PRIVATE] = { "MAP_PRIVATE file", false,
			       HMM_DMIRROR_PROT_NONE },
	[HMM_PMD]	  = { "empty", false, HMM_DMIRROR_PROT_NONE },
	[HMM_PMD_ZERO]	  = { "huge zero page", false,
			      HMM_DMIRROR_PROT_READ | HMM_DMIRROR_PROT_PMD },
	[HMM_THP]	  = { "THP", false,
			      HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD },
	[HMM_HUGETLB]	  = { "hugetlb", false,
			      HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD },
	[HMM_LEAF]	  = { "leaf-aligned anonymous", false,
			      HMM_DMIRROR_PROT_WRITE },
};

/* hmm_buffer_map(): the system cannot give the backing asked for. */
#define HMM_BUFFER_SKIP		1

/*
 * A buffer under test: the memory, a buffer of the same size for what the
 * device reads or writes, and one of a byte per page for SNAPSHOT.
 */
struct hmm_buffer {
	char			*ptr;
	char			*mirror;
	unsigned char		*snap;
	size_t			size;
	__u64			npages;
	size_t			page_size;
	enum hmm_backing	backing;
	int			file_fd;	/* file backings, else -1 */
	char			*map;		/* the mapping to munmap() */
	size_t			map_size;
	char			why[128];	/* why the mapping failed */
};

/*
 * Where hmm_buffer_map() keeps the nr_hugepages to put back once it raised
 * it for an HMM_HUGETLB buffer: the running test's fixture data, whose
 * teardown puts it back (the hmm fixture's setup sets it). Fixtures that do
 * not leave it NULL, and cannot have hugetlb buffers.
 */
static long *hmm_old_nr_hugepages;

/* Write the pattern @seed as the first @size bytes of @fd: 0 or -errno. */
static int hmm_file_fill(int fd, size_t size, __u32 seed)
{
	char *io = malloc(size);
	ssize_t n;

	if (!io)
		return -ENOMEM;
	hmm_fill(io, size, seed);
	n = pwrite(fd, io, size, 0);
	free(io);
	if (n < 0)
		return -errno;
	return (size_t)n == size ? 0 : -EIO;
}

/* Map @b->size bytes of the file @b->file_fd, @flags MAP_SHARED or not. */
static char *hmm_map_file(struct hmm_buffer *b, int flags)
{
	char *p = mmap(NULL, b->size, PROT_READ | PROT_WRITE, flags,
		       b->file_fd, 0);

	return p == MAP_FAILED ? NULL : p;
}

/**
 * hmm_buffer_map() - map a buffer under test, with its mirror and snapshot
 * buffers
 * @b: the buffer, set up here
 * @backing: the kind of memory
 * @npages: its size in pages; HMM_PMD, HMM_PMD_ZERO, HMM_THP and
 *	HMM_HUGETLB are one huge page, whatever @npages says
 * @seed: the pattern to fill the memory with (hmm_fill(); a file gets it
 *	with pwrite() before it is mapped), 0 to leave it untouched;
 *	HMM_THP is filled with it even if 0
 *
 * Return: 0; HMM_BUFFER_SKIP if the system cannot give @backing, with the
 * reason in @b->why; else a negative errno, with what failed in @b->why,
 * also printed. Whatever it returns, hmm_buffer_free() undoes it.
 */
static int hmm_buffer_map(struct hmm_buffer *b, enum hmm_backing backing,
			  __u64 npages, __u32 seed)
{
	size_t ps = sysconf(_SC_PAGESIZE);
	bool shared = hmm_backings[backing].shared;
	int flags = shared ? MAP_SHARED : MAP_PRIVATE;
	int skip = 0, ret;
	char *p = NULL;

	memset(b, 0, sizeof(*b));
	b->backing = backing;
	b->file_fd = -1;
	b->page_size = ps;
	b->size = npages * ps;
	switch (backing) {
	case HMM_ANON:
	case HMM_ANON_SHARED:
		p = hmm_map_anon(b->size, PROT_READ | PROT_WRITE, flags);
		break;
	case HMM_FILE_SHARED:
	case HMM_FILE_PRIVATE:
		b->file_fd = hmm_tmpfile(b->size);
		if (b->file_fd < 0) {
			hmm_why(b->why, sizeof(b->why),
				"no writable directory for a temporary file");
			return HMM_BUFFER_SKIP;
		}
		ret = seed ? hmm_file_fill(b->file_fd, b->size, seed) : 0;
		if (ret) {
			hmm_why(b->why, sizeof(b->why), "pwrite(): %s",
				strerror(-ret));
			goto fail;
		}
		seed = 0;
		p = hmm_map_file(b, flags);
		break;
	case HMM_PMD:
	case HMM_PMD_ZERO:
		p = hmm_map_pmd(&b->size, &b->map, b->why, sizeof(b->why));
		skip = !p;
		if (p && backing == HMM_PMD_ZERO)
			hmm_cpu_read(p, b->size, ps);
		b->map_size = 2 * b->size;
		break;
	case HMM_THP:
		p = hmm_map_thp(seed, &b->size, &b->map, b->why,
				sizeof(b->why));
		skip = !p;
		seed = 0;
		b->map_size = 2 * b->size;
		break;
	case HMM_HUGETLB:
		if (!hmm_old_nr_hugepages) {
			hmm_why(b->why, sizeof(b->why),
				"hugetlb, but the fixture cannot restore %s",
				HMM_NR_HUGEPAGES);
			goto fail;
		}
		p = hmm_map_hugetlb(&b->size, hmm_old_nr_hugepages, b->why,
				    sizeof(b->why));
		skip = !p;
		break;
	case HMM_LEAF:
		p = hmm_map_aligned(b->size, HMM_LEAF_SIZE);
		break;
	}
	if (skip) {
		b->map = NULL;
		return HMM_BUFFER_SKIP;
	}
	if (!p) {
		hmm_why(b->why, sizeof(b->why), "mmap of %zu bytes: %s",
			b->size, strerror(errno));
		goto fail;
	}
	if (!b->map) {
		b->map = p;
		b->map_size = b->size;
	}
	b->ptr = p;
	b->npages = b->size / ps;
	b->mirror = malloc(b->size);
	b->snap = malloc(b->npages);
	if (!b->mirror || !b->snap) {
		hmm_why(b->why, sizeof(b->why), "malloc: out of memory");
		goto fail;
	}
	if (seed)
		hmm_fill(p, b->size, seed);
	return 0;
fail:
	fprintf(stderr, "# %s buffer: %s\n", hmm_backings[backing].name,
		b->why);
	return -ENOMEM;
}

/* Undo hmm_buffer_map(), whatever it returned. */
static void hmm_buffer_free(struct hmm_buffer *b)
{
	free(b->snap);
	free(b->mirror);
	if (b->map)
		munmap(b->map, b->map_size);
	if (b->file_fd >= 0)
		close(b->file_fd);
	b->snap = NULL;
	b->mirror = NULL;
	b->map = NULL;
	b->file_fd = -1;
}

/*
 * munmap() all of @b's memory now, for a test of munmap(), so that
 * hmm_buffer_free() cannot unmap what took its place: 0 or -errno.
 */
static int hmm_buffer_unmap(struct hmm_buffer *b)
{
	int ret = munmap(b->map, b->map_size) ? -errno : 0;

	b->map = NULL;
	return ret;
}

/*
 * Offset of the first word of @b's memory not in the pattern @seed, else
 * -1; for a MAP_SHARED file, of the file too (read with pread()), -2 if it
 * cannot be read.
 */
static long hmm_buffer_check(const struct hmm_buffer *b, __u32 seed)
{
	long bad = hmm_check(b->ptr, b->size, seed);
	char *io;

	if (bad >= 0 || b->backing != HMM_FILE_SHARED)
		return bad;
	io = malloc(b->size);
	if (!io || pread(b->file_fd, io, b->size, 0) != (ssize_t)b->size)
		bad = -2;
	else
		bad = hmm_check(io, b->size, seed);
	if (bad != -1)
		fprintf(stderr, "# the file does not hold the data\n");
	free(io);
	return bad;
}

/*
 * ASSERT_BUFFER_MAP() - hmm_buffer_map() that cannot fail or skip: for
 * backings every system has (HMM_ANON, HMM_ANON_SHARED, HMM_LEAF). Others
 * need a test to turn HMM_BUFFER_SKIP into SKIP().
 */
#define ASSERT_BUFFER_MAP(b, backing, npages, seed)			\
	ASSERT_EQ(0, hmm_buffer_map(b, backing, npages, seed))

/*
 * hmm_buffer_get() - hmm_buffer_map() for a test, for any backing: fails
 * the test if the buffer cannot be had, and makes it a SKIP, saying why, if
 * the system cannot give @backing.
 *
 * Return: true if @b is ready; false if the test is to return, skipped.
 */
static bool hmm_buffer_get(struct __test_metadata *_metadata,
			   struct hmm_buffer *b, enum hmm_backing backing,
			   __u64 npages, __u32 seed)
{
	int ret = hmm_buffer_map(b, backing, npages, seed);

	if (ret == HMM_BUFFER_SKIP)
		SKIP(return false, "%s", b->why);
	ASSERT_EQ(0, ret) TH_LOG("%s", b->why);
	return true;
}

/* The name of a hmm_cmd() request, for messages. */
static const char *hmm_cmd_name(unsigned long request)
{
	switch (request) {
	case HMM_DMIRROR_READ:
		return "READ";
	case HMM_DMIRROR_WRITE:
		return "WRITE";
	case HMM_DMIRROR_READ_UNLOCKED:
		return "READ_UNLOCKED";
	case HMM_DMIRROR_SNAPSHOT:
		return "SNAPSHOT";
	case HMM_DMIRROR_MIGRATE_TO_DEV:
		return "MIGRATE_TO_DEV";
	case HMM_DMIRROR_MIGRATE_TO_SYS:
		return "MIGRATE_TO_SYS";
	case HMM_DMIRROR_EXCLUSIVE:
		return "EXCLUSIVE";
	case HMM_DMIRROR_CHECK_EXCLUSIVE:
		return "CHECK_EXCLUSIVE";
	}
	return "request";
}

/*
 * hmm_cmd_all() - hmm_cmd() that must do all @npages pages
 *
 * Return: 0 if @request succeeded and reports all @npages pages done
 * (cpages); else its negative errno, or 1 if it did another number of
 * pages, which is printed.
 */
static int hmm_cmd_all(int fd, unsigned long request, void *addr, void *ptr,
		       __u64 npages, struct hmm_dmirror_cmd *cmd)
{
	int ret = hmm_cmd(fd, request, addr, ptr, npages, cmd);

	if (ret) {
		fprintf(stderr, "# %s of %llu pages: %s\n",
			hmm_cmd_name(request), npages, strerror(-ret));
		return ret;
	}
	if (cmd->cpages == npages)
		return 0;
	fprintf(stderr, "# %s did %llu of %llu pages\n", hmm_cmd_name(request),
		cmd->cpages, npages);
	return 1;
}

/*
 * ASSERT_CMD_ALL() - assert that hmm_cmd() succeeded and did every page:
 * it returned 0 and cmd->cpages is @npages. What else the command reported
 * is in *@cmd.
 */
#define ASSERT_CMD_ALL(fd, request, addr, ptr, npages, cmd)		\
	ASSERT_EQ(0, hmm_cmd_all(fd, request, addr, ptr, npages, cmd))

/*
 * hmm_dev_read() - have the device behind @fd hand back all of @b's data
 * with @request (READ, MIGRATE_TO_DEV or EXCLUSIVE) into @b->mirror, zeroed
 * first, and check that it is the pattern @seed
 *
 * Return: 0; else as hmm_cmd_all(), or 2 if the data is not @seed, which is
 * printed. What the command reported is in *@cmd.
 */
static int hmm_dev_read(int fd, unsigned long request, struct hmm_buffer *b,
			__u32 seed, struct hmm_dmirror_cmd *cmd)
{
	long bad;
	int ret;

	memset(b->mirror, 0, b->size);
	ret = hmm_cmd_all(fd, request, b->ptr, b->mirror, b->npages, cmd);
	if (ret)
		return ret;
	bad = hmm_check(b->mirror, b->size, seed);
	if (bad < 0)
		return 0;
	fprintf(stderr, "# %s handed back wrong data at offset %ld\n",
		hmm_cmd_name(request), bad);
	return 2;
}

/*
 * ASSERT_DEV_READ() - assert that @request through @fd did all of @b's
 * pages and handed back the pattern @seed (hmm_dev_read()).
 */
#define ASSERT_DEV_READ(fd, request, b, seed, cmd)			\
	ASSERT_EQ(0, hmm_dev_read(fd, request, b, seed, cmd))

/*
 * hmm_snap_bad() - the first of the @n SNAPSHOT states @snap[@first...]
 * that is not @want
 *
 * Return: its index in @snap, printed with its state; -1 if there is none.
 */
static long hmm_snap_bad(const unsigned char *snap, __u64 first, __u64 n,
			 unsigned char want)
{
	__u64 i;

	for (i = first; i < first + n; i++) {
		if (snap[i] == want)
			continue;
		fprintf(stderr, "# SNAPSHOT: page %llu is 0x%02x, expected 0x%02x\n",
			i, snap[i], want);
		return i;
	}
	return -1;
}

/*
 * hmm_snap_either() - SNAPSHOT @npages pages at @addr through @fd into @snap
 * and find the first whose state is neither @want nor @alt
 *
 * Return: its index, printed with its state; -1 if there is none; -2 if the
 * request failed or did not report every page (printed), which leaves
 * @snap filled with 0xee, no state.
 */
static long hmm_snap_either(int fd, void *addr, __u64 npages,
			    unsigned char *snap, unsigned char want,
			    unsigned char alt)
{
	struct hmm_dmirror_cmd cmd;
	__u64 i;

	memset(snap, 0xee, npages);
	if (hmm_cmd_all(fd, HMM_DMIRROR_SNAPSHOT, addr, snap, npages, &cmd))
		return -2;
	if (want == alt)
		return hmm_snap_bad(snap, 0, npages, want);
	for (i = 0; i < npages; i++) {
		if (snap[i] == want || snap[i] == alt)
			continue;
		fprintf(stderr, "# SNAPSHOT: page %llu is 0x%02x, expected 0x%02x or 0x%02x\n",
			i, snap[i], want, alt);
		return i;
	}
	return -1;
}

/* hmm_snap_either() with a single state to expect. */
static long hmm_snap_expect(int fd, void *addr, __u64 npages,
			    unsigned char *snap, unsigned char want)
{
	return hmm_snap_either(fd, addr, npages, snap, want, want);
}

/*
 * ASSERT_SNAP_ALL() - assert that the @n states of @snap are all @want;
 * ASSERT_SNAP_RANGE() - the same of the @n from @snap[@first]. The first
 * page that is not is printed, with its state.
 */
#define ASSERT_SNAP_ALL(snap, n, want)					\
	ASSERT_EQ(-1, hmm_snap_bad(snap, 0, n, want))
#define ASSERT_SNAP_RANGE(snap, first, n, want)				\
	ASSERT_EQ(-1, hmm_snap_bad(snap, first, n, want))

/*
 * ASSERT_SNAPSHOT() - assert that SNAPSHOT of @npages pages at @addr
 * through @fd, into @snap, does them all and reports @want for each; EXPECT_SNAPSHOT(): the
 * same, going on after a failure. The first page that is not is printed,
 * with its state.
 */
#define ASSERT_SNAPSHOT(fd, addr, npages, snap, want)			\
	ASSERT_EQ(-1, hmm_snap_expect(fd, addr, npages, snap, want))
#define EXPECT_SNAPSHOT(fd, addr, npages, snap, want)			\
	EXPECT_EQ(-1, hmm_snap_expect(fd, addr, npages, snap, want))

/* ASSERT_SNAPSHOT_EITHER() - ASSERT_SNAPSHOT() of two allowed states. */
#define ASSERT_SNAPSHOT_EITHER(fd, addr, npages, snap, want, alt)	\
	ASSERT_EQ(-1, hmm_snap_either(fd, addr, npages, snap, want, alt))

FIXTURE(hmm)
{
	int	fd;			/* the device under test */
	size_t	page_size;
	long	old_nr_hugepages;	/* restored by teardown if >= 0 */
};

FIXTURE_VARIANT(hmm)
{
	int	device;			/* N of /dev/hmm_dmirrorN */
	bool	coherent;		/* needs spm_addr_dev0/1 */
};

FIXTURE_VARIANT_ADD(hmm, private0)
{
	.device = 0,
};

FIXTURE_VARIANT_ADD(hmm, private1)
{
	.device = 1,
};

FIXTURE_VARIANT_ADD(hmm, coherent2)
{
	.device = 2,
	.coherent = true,
};

FIXTURE_VARIANT_ADD(hmm, coherent3)
{
	.device = 3,
	.coherent = true,
};

FIXTURE_SETUP(hmm)
{
	char path[32];

	self->fd = -1;
	self->old_nr_hugepages = -1;
	self->page_size = sysconf(_SC_PAGESIZE);
	hmm_old_nr_hugepages = &self->old_nr_hugepages;

	hmm_dev_path(path, sizeof(path), variant->device);
	if (variant->coherent && access(path, F_OK))
		SKIP(return,
		     "no %s: load test_hmm with spm_addr_dev0 and spm_addr_dev1 for device-coherent memory",
		     path);
	self->fd = hmm_open(variant->device);
	ASSERT_GE(self->fd, 0);
}

/*
 * Runs in the parent of the test process, after it is gone, so that a crash
 * cannot skip it. The test's mappings and file descriptors died with it.
 */
FIXTURE_TEARDOWN_PARENT(hmm)
{
	/* Braced: a failed test leaves the harness's trigger set. */
	if (self->old_nr_hugepages >= 0) {
		EXPECT_EQ(0, hmm_write_long(HMM_NR_HUGEPAGES,
					    self->old_nr_hugepages))
			TH_LOG("could not restore %s to %ld", HMM_NR_HUGEPAGES,
			       self->old_nr_hugepages);
	}
}

/*
 * Each open is a separate device with a mirror of its own: a page the
 * fixture's device has faulted in is still new to a second open, and to an
 * open made after closing that one.
 */
TEST_F(hmm, open_close)
{
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	int fd, i;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, 1, 0x0c105e);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, b.ptr, b.mirror, 1,
			     &cmd));
	ASSERT_EQ(1ULL, cmd.faults);

	for (i = 0; i < 2; i++) {
		fd = hmm_open(variant->device);
		ASSERT_GE(fd, 0);
		memset(b.mirror, 0, b.size);
		ASSERT_CMD_ALL(fd, HMM_DMIRROR_READ, b.ptr, b.mirror, 1, &cmd);
		ASSERT_EQ(1ULL, cmd.faults) TH_LOG("open #%d", i + 2);
		ASSERT_EQ(-1, hmm_check(b.mirror, b.size, 0x0c105e));
		ASSERT_EQ(0, close(fd));
	}

	ASSERT_EQ(0, close(self->fd));
	self->fd = -1;
	hmm_buffer_free(&b);
}

/*
 * PROT_NONE memory cannot be read by the device, whether populated or not,
 * and a failed request reports nothing back. Once readable, it reads fine.
 */
TEST_F(hmm, anon_read_prot_none)
{
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0);
	ASSERT_EQ(0, mprotect(b.ptr, b.size, PROT_NONE));
	ASSERT_EQ(-EFAULT, hmm_cmd(self->fd, HMM_DMIRROR_READ, b.ptr, b.mirror,
				   b.npages, &cmd)) TH_LOG("never populated");
	ASSERT_EQ(HMM_POISON, cmd.cpages);
	ASSERT_EQ(HMM_POISON, cmd.faults);

	ASSERT_EQ(0, mprotect(b.ptr, b.size, PROT_READ | PROT_WRITE));
	hmm_fill(b.ptr, b.size, 0x9090);
	ASSERT_EQ(0, mprotect(b.ptr, b.size, PROT_NONE));
	ASSERT_EQ(-EFAULT, hmm_cmd(self->fd, HMM_DMIRROR_READ, b.ptr, b.mirror,
				   b.npages, &cmd)) TH_LOG("populated");
	ASSERT_EQ(HMM_POISON, cmd.cpages);

	ASSERT_EQ(0, mprotect(b.ptr, b.size, PROT_READ));
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_READ, &b, 0x9090, &cmd);
	ASSERT_EQ(1ULL, cmd.faults);
	hmm_buffer_free(&b);
}

/*
 * The device can read read-only memory but not write it, even once it has
 * the pages mirrored. After mprotect() makes them writable it can.
 */
TEST_F(hmm, anon_write_read_only)
{
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	int i;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0x1111);
	ASSERT_EQ(0, mprotect(b.ptr, b.size, PROT_READ));

	/* Refused before and after the device mirrored the pages for read. */
	for (i = 0; i < 2; i++) {
		hmm_fill(b.mirror, b.size, 0x2222);
		ASSERT_EQ(-EPERM, hmm_cmd(self->fd, HMM_DMIRROR_WRITE, b.ptr,
					  b.mirror, b.npages, &cmd))
			TH_LOG("write #%d", i + 1);
		ASSERT_EQ(HMM_POISON, cmd.cpages);
		ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x1111));

		ASSERT_DEV_READ(self->fd, HMM_DMIRROR_READ, &b, 0x1111, &cmd);
	}

	ASSERT_EQ(0, mprotect(b.ptr, b.size, PROT_READ | PROT_WRITE));
	hmm_fill(b.mirror, b.size, 0x2222);
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_WRITE, b.ptr, b.mirror, b.npages,
		       &cmd);
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x2222));
	hmm_buffer_free(&b);
}

/* --- Device access: operations x backings ------------------------------ */

/*
 * What an operation of hmm_access_ops[] works on: the device under test and a
 * buffer that hmm_buffer_map() filled with @seed, unless the operation
 * wants it untouched. @skipped collects the steps left out.
 */
struct hmm_ctx {
	int			fd;
	int			device;		/* N of /dev/hmm_dmirrorN */
	bool			coherent;
	struct hmm_buffer	b;
	__u32			seed;
	struct hmm_skipped	skipped;
};

/* The data an operation writes over @seed's. */
static __u32 hmm_next_seed(__u32 seed)
{
	return seed ^ 0x5a5a5a5a;
}

/*
 * The device reads what the CPU put there. The first read faults the range
 * in once; reading it again, unchanged, takes no fault.
 */
static void hmm_op_read(struct __test_metadata *_metadata, struct hmm_ctx *c)
{
	struct hmm_buffer *b = &c->b;
	struct hmm_dmirror_cmd cmd;
	int i;

	for (i = 0; i < 2; i++) {
		ASSERT_DEV_READ(c->fd, HMM_DMIRROR_READ, b, c->seed, &cmd);
		ASSERT_EQ(i ? 0ULL : 1ULL, cmd.faults)
			TH_LOG("read #%d", i + 1);
	}
	ASSERT_EQ(-1, hmm_buffer_check(b, c->seed));
}

/*
 * The CPU sees what the device wrote into never-touched memory, and the
 * device then reads it back without faulting.
 */
static void hmm_op_write(struct __test_metadata *_metadata, struct hmm_ctx *c)
{
	struct hmm_buffer *b = &c->b;
	struct hmm_dmirror_cmd cmd;

	hmm_fill(b->mirror, b->size, c->seed);
	ASSERT_CMD_ALL(c->fd, HMM_DMIRROR_WRITE, b->ptr, b->mirror, b->npages,
		       &cmd);
	ASSERT_EQ(1ULL, cmd.faults);
	ASSERT_EQ(-1, hmm_buffer_check(b, c->seed));

	ASSERT_DEV_READ(c->fd, HMM_DMIRROR_READ, b, c->seed, &cmd);
	ASSERT_EQ(0ULL, cmd.faults);
}

/*
 * The device reads what the CPU (or, for a file, pwrite()) put there, then
 * writes over it through the same mirror: the CPU sees the new data, and
 * for a MAP_SHARED file so does pread().
 */
static void hmm_op_read_write(struct __test_metadata *_metadata,
			      struct hmm_ctx *c)
{
	__u32 next = hmm_next_seed(c->seed);
	struct hmm_buffer *b = &c->b;
	struct hmm_dmirror_cmd cmd;

	ASSERT_DEV_READ(c->fd, HMM_DMIRROR_READ, b, c->seed, &cmd);
	ASSERT_EQ(1ULL, cmd.faults);

	hmm_fill(b->mirror, b->size, next);
	ASSERT_CMD_ALL(c->fd, HMM_DMIRROR_WRITE, b->ptr, b->mirror, b->npages,
		       &cmd);
	ASSERT_EQ(-1, hmm_buffer_check(b, next));
}

/*
 * Reading never-touched memory gives zeros, from the shared zero page,
 * which SNAPSHOT then reports for every page.
 */
static void hmm_op_zero_read(struct __test_metadata *_metadata,
			     struct hmm_ctx *c)
{
	const unsigned char zero = HMM_DMIRROR_PROT_ZERO |
				   HMM_DMIRROR_PROT_READ;
	struct hmm_buffer *b = &c->b;
	struct hmm_dmirror_cmd cmd;

	memset(b->mirror, 0xa5, b->size);
	ASSERT_CMD_ALL(c->fd, HMM_DMIRROR_READ, b->ptr, b->mirror, b->npages,
		       &cmd);
	ASSERT_EQ(1ULL, cmd.faults);
	ASSERT_EQ(-1, hmm_check_bytes(b->mirror, b->size, 0));
	ASSERT_SNAPSHOT(c->fd, b->ptr, b->npages, b->snap, zero);
}

/*
 * SNAPSHOT reports every page as the backing maps it once filled (a THP:
 * writable and mapped by a PMD), and the device reads the data with one
 * fault.
 */
static void hmm_op_snapshot_read(struct __test_metadata *_metadata,
				 struct hmm_ctx *c)
{
	struct hmm_buffer *b = &c->b;
	struct hmm_dmirror_cmd cmd;

	ASSERT_SNAPSHOT(c->fd, b->ptr, b->npages, b->snap,
			hmm_backings[b->backing].filled);
	ASSERT_DEV_READ(c->fd, HMM_DMIRROR_READ, b, c->seed, &cmd);
	ASSERT_EQ(1ULL, cmd.faults);
}

/*
 * A forked child's device writes the buffer. Shared memory: the parent sees
 * the data, from the CPU and from its own device. Private memory, which the
 * parent's device mirrored first, is copied on write: the child sees the
 * new data, the parent, from the CPU and from its device, still the old.
 */
static void hmm_op_child_write(struct __test_metadata *_metadata,
			       struct hmm_ctx *c)
{
	struct hmm_buffer *b = &c->b;
	bool shared = hmm_backings[b->backing].shared;
	__u32 next = hmm_next_seed(c->seed);
	__u32 now = shared ? next : c->seed;
	struct hmm_dmirror_cmd cmd;

	if (!shared)
		ASSERT_CMD_ALL(c->fd, HMM_DMIRROR_READ, b->ptr, b->mirror,
			       b->npages, &cmd);
	ASSERT_EQ(0, hmm_fork_child_write(c->device, b->ptr, b->npages,
					  b->page_size, next));
	ASSERT_EQ(-1, hmm_buffer_check(b, now));

	ASSERT_DEV_READ(c->fd, HMM_DMIRROR_READ, b, now, &cmd);
}

/* What SNAPSHOT reports for a page in the memory of the device under test. */
static unsigned char hmm_local(bool coherent)
{
	return coherent ? HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL :
			  HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL;
}

/*
 * What SNAPSHOT reports for a writable page of the device under test once
 * the CPU has touched it: a device-private page has moved back to system
 * memory, a device-coherent one is still on the device.
 */
static unsigned char hmm_cpu_touched(bool coherent)
{
	return coherent ? HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL |
			  HMM_DMIRROR_PROT_WRITE : HMM_DMIRROR_PROT_WRITE;
}

/*
 * Kernel bugs (Linux 7.3) the suite found; the test_hmm project has a patch
 * for each (kernel-fixes/), and its run_vm.sh --kernel-fixes runs the suite
 * on a kernel with them. The environment variable HMM_FIXED_BUGS lists,
 * comma-separated, the ids of the bugs the kernel under test is known to
 * have fixed ("all": every one); run_vm.sh --kernel-fixes sets it from
 * kernel-fixes/BUGS.
 *
 * A test step that would hit a bug not known fixed is left out, and the test
 * ends with SKIP naming the bug (hmm_bug()); where the bug shows without
 * harm to the kernel (pmd_pfn_offset) the step runs, and the test SKIPs
 * naming the bug only when it sees it. On a kernel known fixed, every such
 * step runs and must pass: "fails without the fix" is then a FAIL (or, for
 * the split queue and the split, a kernel WARNING, which fails the run).
 *
 * HMM_BUG_PMD_PFN_OFFSET: hmm_vma_handle_absent_pmd() fills the pfns of a
 * device-private PMD without the offset of a range that starts inside it.
 * The driver corrects them (the device would read the wrong page) and counts
 * each correction (pmd_pfn_fixups), which migrate_thp_read_offset checks.
 *
 * HMM_BUG_COHERENT_THP_TO_SYS: migrate_vma_setup() collects a PMD-mapped
 * folio only with MIGRATE_VMA_SELECT_SYSTEM (migrate_vma_collect_huge_pmd()),
 * device-coherent ones too, so MIGRATE_TO_SYS moves no page of a THP in
 * device-coherent memory (cpages 0, the pages stay), and a migration
 * selecting system memory takes any device-coherent THP as system memory.
 *
 * HMM_BUG_COHERENT_THP_SPLIT_QUEUE: unmapping part of a THP in
 * device-coherent memory, or unmapping it one page table at a time once it
 * is mapped by PTEs across two of them, puts it on the deferred split queue
 * (__folio_remove_rmap() leaves out device-private folios only), and
 * free_zone_device_folio() does not take it off before
 * mem_cgroup_uncharge(): WARNING in uncharge_folio(). Never run unfixed.
 *
 * HMM_BUG_COHERENT_THP_SPLIT: splitting a device-coherent THP (a migration
 * back to system memory in 4 KiB pages) leaves the new folios without their
 * pgmap (zone_device_private_split_cb() handles device-private folios only):
 * WARNING in free_zone_device_folio(), the pages never come back to the
 * driver, and its unload hangs. Only reachable once
 * HMM_BUG_COHERENT_THP_TO_SYS is fixed. Never run unfixed.
 */
enum hmm_bug {
	HMM_BUG_PMD_PFN_OFFSET,
	HMM_BUG_COHERENT_THP_TO_SYS,
	HMM_BUG_COHERENT_THP_SPLIT_QUEUE,
	HMM_BUG_COHERENT_THP_SPLIT,
	HMM_NR_BUGS
};

static const struct {
	const char	*id;
	const char	*what;
} hmm_bugs[HMM_NR_BUGS] = {
	[HMM_BUG_PMD_PFN_OFFSET] = { "pmd_pfn_offset",
		"hmm_range_fault() gives a device-private PMD's pfns without the range's offset" },
	[HMM_BUG_COHERENT_THP_TO_SYS] = { "coherent_thp_to_sys",
		"MIGRATE_TO_SYS moves no page of a device-coherent THP" },
	[HMM_BUG_COHERENT_THP_SPLIT_QUEUE] = { "coherent_thp_split_queue",
		"a partly unmapped device-coherent THP is freed on the deferred split queue" },
	[HMM_BUG_COHERENT_THP_SPLIT] = { "coherent_thp_split",
		"a split device-coherent THP loses the pgmap of its pages" },
};

/* Is @bug among those HMM_FIXED_BUGS says the kernel has the fix of? */
static bool hmm_bug_fixed(enum hmm_bug bug)
{
	const char *list = getenv("HMM_FIXED_BUGS");
	size_t len = strlen(hmm_bugs[bug].id);
	const char *p;

	if (!list)
		return false;
	if (!strcmp(list, "all"))
		return true;
	for (p = list; (p = strstr(p, hmm_bugs[bug].id)); p += len)
		if ((p == list || p[-1] == ',') &&
		    (p[len] == ',' || p[len] == '\0'))
			return true;
	return false;
}

/* How a test names @bug when it leaves a step out for it, or sees it. */
static const char *hmm_bug(enum hmm_bug bug)
{
	static char text[HMM_NR_BUGS][256];

	if (!text[bug][0])
		snprintf(text[bug], sizeof(text[bug]),
			 "kernel bug %s: %s (HMM_FIXED_BUGS=%s on a kernel with the fix)",
			 hmm_bugs[bug].id, hmm_bugs[bug].what,
			 hmm_bugs[bug].id);
	return text[bug];
}

/* Does a device-coherent variant have to leave out a step for @bug? */
static bool hmm_coherent_bug(bool coherent, enum hmm_bug bug)
{
	return coherent && !hmm_bug_fixed(bug);
}

/* Offset of the first word of @buf not holding @filled's data, else -1. */
static long hmm_thp_check(const char *buf, size_t size, bool filled,
			  __u32 seed)
{
	return filled ? hmm_check(buf, size, seed) :
			hmm_check_bytes(buf, size, 0);
}

/*
 * Migration of shared memory, which the CPU filled, to the device fails
 * with ENOENT, reports nothing back and leaves the pages where they were,
 * with their data.
 */
static void hmm_op_migrate_refused(struct __test_metadata *_metadata,
				   struct hmm_ctx *c)
{
	struct hmm_buffer *b = &c->b;
	struct hmm_dmirror_cmd cmd;

	hmm_fill(b->ptr, b->size, c->seed);
	EXPECT_EQ(-ENOENT, hmm_cmd(c->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b->ptr,
				   b->mirror, b->npages, &cmd));
	EXPECT_EQ(HMM_POISON, cmd.cpages);
	EXPECT_SNAPSHOT(c->fd, b->ptr, b->npages, b->snap,
			HMM_DMIRROR_PROT_WRITE);
	EXPECT_EQ(-1, hmm_buffer_check(b, c->seed)) TH_LOG("data changed");
}

/*
 * A PMD-aligned, PMD-sized range moves as one huge page whatever it held:
 * nothing (seed 0), the huge zero page (seed 0), or a THP. It becomes a
 * device THP, mapped by a PMD, with the data (zeros for the first two);
 * MIGRATE_TO_SYS brings it back as a THP and counts all of its pages
 * (device-coherent memory: once HMM_BUG_COHERENT_THP_TO_SYS is fixed).
 * After a second migration, a CPU read brings a device-private THP back
 * whole, and leaves a device-coherent one where it is.
 */
static void hmm_op_migrate_thp(struct __test_metadata *_metadata,
			       struct hmm_ctx *c)
{
	const unsigned char thp = HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD;
	unsigned char local = hmm_local(c->coherent);
	struct hmm_buffer *b = &c->b;
	bool filled = c->seed != 0;
	struct hmm_dmirror_cmd cmd;
	long bad;

	bad = hmm_snap_expect(c->fd, b->ptr, b->npages, b->snap,
			      hmm_backings[b->backing].filled);
	/* A read maps the huge zero page unless the system turned it off. */
	if (b->backing == HMM_PMD_ZERO && bad >= 0 &&
	    !hmm_read_long(HMM_THP_DIR "/use_zero_page"))
		SKIP(return, "a read maps 0x%02x (see %s)", b->snap[0],
		     HMM_THP_DIR "/use_zero_page");
	ASSERT_EQ(-1, bad) TH_LOG("%s", hmm_backings[b->backing].name);

	memset(b->mirror, 0xa5, b->size);
	ASSERT_CMD_ALL(c->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b->ptr, b->mirror,
		       b->npages, &cmd);
	ASSERT_EQ(-1, hmm_thp_check(b->mirror, b->size, filled, c->seed))
		TH_LOG("the device read wrong data");
	ASSERT_SNAPSHOT(c->fd, b->ptr, b->npages, b->snap, local | thp)
		TH_LOG("on the device");

	if (hmm_coherent_bug(c->coherent, HMM_BUG_COHERENT_THP_TO_SYS)) {
		hmm_skip_row(&c->skipped, "MIGRATE_TO_SYS: %s",
			     hmm_bug(HMM_BUG_COHERENT_THP_TO_SYS));
	} else {
		ASSERT_CMD_ALL(c->fd, HMM_DMIRROR_MIGRATE_TO_SYS, b->ptr, NULL,
			       b->npages, &cmd) TH_LOG("moved back");
		ASSERT_SNAPSHOT(c->fd, b->ptr, b->npages, b->snap, thp)
			TH_LOG("moved back");
		ASSERT_EQ(-1, hmm_thp_check(b->ptr, b->size, filled, c->seed))
			TH_LOG("moved back: wrong data");
	}

	ASSERT_CMD_ALL(c->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b->ptr, b->mirror,
		       b->npages, &cmd) TH_LOG("again");
	ASSERT_SNAPSHOT(c->fd, b->ptr, b->npages, b->snap, local | thp)
		TH_LOG("again");
	ASSERT_EQ(-1, hmm_thp_check(b->ptr, b->size, filled, c->seed))
		TH_LOG("CPU read: wrong data");
	ASSERT_SNAPSHOT(c->fd, b->ptr, b->npages, b->snap,
			hmm_cpu_touched(c->coherent) | HMM_DMIRROR_PROT_PMD)
		TH_LOG("CPU read");
}

/* The operations hmm_access_run() can apply to a buffer. */
enum hmm_access_op {
	HMM_DO_READ,
	HMM_DO_WRITE,
	HMM_DO_READ_WRITE,
	HMM_DO_ZERO_READ,
	HMM_DO_SNAPSHOT_READ,
	HMM_DO_CHILD_WRITE,
	HMM_DO_MIGRATE_REFUSED,
	HMM_DO_MIGRATE_THP,
};

/* @untouched: the operation wants the buffer as mapped, not filled. */
static const struct {
	void	(*fn)(struct __test_metadata *_metadata, struct hmm_ctx *c);
	bool	untouched;
} hmm_access_ops[] = {
	[HMM_DO_READ]		 = { hmm_op_read, false },
	[HMM_DO_WRITE]		 = { hmm_op_write, true },
	[HMM_DO_READ_WRITE]	 = { hmm_op_read_write, false },
	[HMM_DO_ZERO_READ]	 = { hmm_op_zero_read, true },
	[HMM_DO_SNAPSHOT_READ]	 = { hmm_op_snapshot_read, false },
	[HMM_DO_CHILD_WRITE]	 = { hmm_op_child_write, false },
	[HMM_DO_MIGRATE_REFUSED] = { hmm_op_migrate_refused, true },
	[HMM_DO_MIGRATE_THP]	 = { hmm_op_migrate_thp, false },
};

/* One scenario: an operation applied to a backing, with its data. */
struct hmm_access {
	enum hmm_backing	backing;
	enum hmm_access_op	op;
	__u32			seed;
};

/*
 * Map a buffer of HMM_NPAGES pages (one huge page for the huge backings) as
 * @a says, filled with its seed unless the operation wants it untouched,
 * and apply the operation to it on the device under test: @fd, a file of
 * device @device, @coherent or not. A backing the system cannot give, or a
 * step left out, makes the test a SKIP, saying why.
 */
static void hmm_access_run(struct __test_metadata *_metadata, int fd,
			   int device, bool coherent,
			   const struct hmm_access *a)
{
	struct hmm_ctx c = {
		.fd = fd,
		.device = device,
		.coherent = coherent,
		.seed = a->seed,
	};

	if (!hmm_buffer_get(_metadata, &c.b, a->backing, HMM_NPAGES,
			    hmm_access_ops[a->op].untouched ? 0 : a->seed))
		return;
	hmm_access_ops[a->op].fn(_metadata, &c);
	hmm_buffer_free(&c.b);
	if (hmm_left_out(&c.skipped, _metadata))
		SKIP(return, "%s", c.skipped.why);
}

/*
 * HMM_ACCESS_TEST() - the test @name of the hmm fixture: the operation @op
 * (enum hmm_access_op) applied to a buffer of @backing (enum hmm_backing),
 * with the data @seed. A new scenario is one more line below.
 */
#define HMM_ACCESS_TEST(name, backing, op, seed)			\
	static const struct hmm_access hmm_access_##name = {		\
		backing, op, seed					\
	};								\
	TEST_F(hmm, name)						\
	{								\
		hmm_access_run(_metadata, self->fd, variant->device,	\
			       variant->coherent, &hmm_access_##name);	\
	}

/*
 * The table of scenarios: test name, backing, operation, data. What each
 * proves is said above its operation's function; the comments here say
 * what the backing adds.
 */
HMM_ACCESS_TEST(anon_read, HMM_ANON, HMM_DO_READ, 0xa110c)
HMM_ACCESS_TEST(anon_write, HMM_ANON, HMM_DO_WRITE, 0xd0d0)
/* Never-touched anonymous memory reads as the zero page. */
HMM_ACCESS_TEST(anon_read_zero_page, HMM_ANON, HMM_DO_ZERO_READ, 0)
/*
 * A MAP_SHARED file mapping: the device reads what pwrite() put in the file
 * and pread() returns what the device wrote through the mapping.
 */
HMM_ACCESS_TEST(file_shared, HMM_FILE_SHARED, HMM_DO_READ_WRITE, 0xf11e)
/* The child's device writes MAP_SHARED anonymous memory: shared. */
HMM_ACCESS_TEST(anon_shared_child_write, HMM_ANON_SHARED, HMM_DO_CHILD_WRITE, 0x5eed)
/* Private memory the parent's device mirrored: copied on write. */
HMM_ACCESS_TEST(anon_cow_child_write, HMM_ANON, HMM_DO_CHILD_WRITE, 0x01d)
/* A transparent huge page: writable and mapped by a PMD. */
HMM_ACCESS_TEST(anon_thp, HMM_THP, HMM_DO_SNAPSHOT_READ, 0x7e9)
/*
 * A hugetlbfs page, from a pool raised by one page for the test (teardown
 * puts nr_hugepages back).
 */
HMM_ACCESS_TEST(anon_hugetlb, HMM_HUGETLB, HMM_DO_WRITE, 0x4a9e)
/* Shared memory cannot move to device memory: anonymous, then a file. */
HMM_ACCESS_TEST(migrate_shared_anon, HMM_ANON_SHARED, HMM_DO_MIGRATE_REFUSED, 0x5a0)
HMM_ACCESS_TEST(migrate_shared_file, HMM_FILE_SHARED, HMM_DO_MIGRATE_REFUSED, 0x5a1)
/*
 * Huge page migration of an empty range, of the huge zero page (a SKIP if
 * use_zero_page is off), of a THP.
 */
HMM_ACCESS_TEST(migrate_thp_empty, HMM_PMD, HMM_DO_MIGRATE_THP, 0)
HMM_ACCESS_TEST(migrate_thp_zero, HMM_PMD_ZERO, HMM_DO_MIGRATE_THP, 0)
HMM_ACCESS_TEST(migrate_thp, HMM_THP, HMM_DO_MIGRATE_THP, 0x7a2)

/* Resolves missing-page faults of [base, base + size) with copies of src. */
struct hmm_uffd_server {
	int		uffd;
	int		stop_fd;	/* readable: time to go */
	char		*base;
	const char	*src;
	size_t		size;
	size_t		page_size;
	unsigned long	copied;		/* pages UFFDIO_COPY filled */
	int		err;		/* first -errno seen, 0 if none */
};

/* Serve one message. Returns 0, or the -errno that ends the service. */
static int hmm_uffd_serve_one(struct hmm_uffd_server *srv)
{
	struct uffdio_copy copy;
	struct uffd_msg msg;
	__u64 page, base = (uintptr_t)srv->base;
	ssize_t n;
	int ret;

	n = read(srv->uffd, &msg, sizeof(msg));
	if (n < 0)
		return errno == EAGAIN || errno == EINTR ? 0 : -errno;
	if (n != sizeof(msg) || msg.event != UFFD_EVENT_PAGEFAULT)
		return -EPROTO;
	page = msg.arg.pagefault.address & ~((__u64)srv->page_size - 1);
	if (page < base || page >= base + srv->size)
		return -ERANGE;

	copy.dst = page;
	copy.src = (uintptr_t)srv->src + (page - base);
	copy.len = srv->page_size;
	copy.mode = 0;
	do {
		copy.copy = 0;
		ret = ioctl(srv->uffd, UFFDIO_COPY, &copy);
	} while (ret && errno == EAGAIN);
	if (!ret)
		srv->copied++;
	else if (errno != EEXIST)	/* EEXIST: a racing fault got it */
		return -errno;
	return 0;
}

static void *hmm_uffd_thread(void *arg)
{
	struct hmm_uffd_server *srv = arg;
	struct pollfd pfd[2] = {
		{ .fd = srv->uffd, .events = POLLIN },
		{ .fd = srv->stop_fd, .events = POLLIN },
	};

	while (!srv->err) {
		if (poll(pfd, 2, -1) < 0) {
			if (errno != EINTR)
				srv->err = -errno;
			continue;
		}
		if (pfd[1].revents)
			return NULL;
		if (pfd[0].revents & (POLLERR | POLLHUP))
			srv->err = -EIO;
		else if (pfd[0].revents & POLLIN)
			srv->err = hmm_uffd_serve_one(srv);
	}
	/* Closing the uffd releases any fault still waiting for us. */
	fprintf(stderr, "# userfaultfd server: %s\n", strerror(-srv->err));
	close(srv->uffd);
	srv->uffd = -1;
	return NULL;
}

/*
 * READ_UNLOCKED needs hmm_range_fault_unlocked_timeout(), new in Linux 7.3;
 * the driver built for an older kernel answers it with EOPNOTSUPP.
 */
#define HMM_NO_READ_UNLOCKED \
	"READ_UNLOCKED: EOPNOTSUPP, the kernel has no hmm_range_fault_unlocked_timeout() (Linux 7.3)"

/* Does the driver behind @fd do READ_UNLOCKED on this kernel? */
static bool hmm_has_read_unlocked(int fd)
{
	size_t ps = sysconf(_SC_PAGESIZE);
	char *p = hmm_map_anon(2 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	struct hmm_dmirror_cmd cmd;
	int ret;

	if (!p)
		return true;	/* and let the test find what is wrong */
	memset(p, 1, ps);
	ret = hmm_cmd(fd, HMM_DMIRROR_READ_UNLOCKED, p, p + ps, 1, &cmd);
	munmap(p, 2 * ps);
	return ret != -EOPNOTSUPP;
}

/*
 * READ_UNLOCKED may drop the mmap lock while faulting, so it can mirror a
 * range whose missing pages a userfaultfd thread supplies: the device gets
 * exactly the pages the thread copied in, one UFFDIO_COPY per page.
 */
TEST_F(hmm, read_unlocked_userfaultfd)
{
	struct hmm_uffd_server srv = { 0 };
	struct uffdio_register reg = { 0 };
	struct uffdio_api api = { 0 };
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	pthread_t thread;
	int stop[2], ret;
	char *src;

	if (!hmm_has_read_unlocked(self->fd))
		SKIP(return, "%s", HMM_NO_READ_UNLOCKED);
	/* Fails only for want of CONFIG_USERFAULTFD, permission or memory. */
	srv.uffd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (srv.uffd < 0)
		SKIP(return, "userfaultfd() unavailable: %s", strerror(errno));
	api.api = UFFD_API;
	ASSERT_EQ(0, ioctl(srv.uffd, UFFDIO_API, &api));

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_UFFD_NPAGES, 0);
	reg.range.start = (uintptr_t)b.ptr;
	reg.range.len = b.size;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	ASSERT_EQ(0, ioctl(srv.uffd, UFFDIO_REGISTER, &reg));
	src = malloc(b.size);
	ASSERT_NE(NULL, src);
	hmm_fill(src, b.size, 0x0ffd);
	ASSERT_EQ(0, pipe2(stop, O_CLOEXEC));

	srv.stop_fd = stop[0];
	srv.base = b.ptr;
	srv.src = src;
	srv.size = b.size;
	srv.page_size = self->page_size;
	ASSERT_EQ(0, pthread_create(&thread, NULL, hmm_uffd_thread, &srv));
	ret = hmm_cmd_all(self->fd, HMM_DMIRROR_READ_UNLOCKED, b.ptr, b.mirror,
			  b.npages, &cmd);
	ASSERT_EQ(1, write(stop[1], "", 1));
	ASSERT_EQ(0, pthread_join(thread, NULL));

	ASSERT_EQ(0, srv.err);
	ASSERT_EQ(0, ret);	/* READ_UNLOCKED did every page */
	ASSERT_EQ(b.npages, srv.copied);
	ASSERT_EQ(-1, hmm_check(b.mirror, b.size, 0x0ffd));
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x0ffd));

	close(stop[0]);
	close(stop[1]);
	close(srv.uffd);
	free(src);
	hmm_buffer_free(&b);
}

struct hmm_unmap_race {
	pthread_barrier_t	start;
	char			*addr;	/* what to munmap() */
	size_t			len;
	int			err;	/* errno of munmap(), 0 if none */
	int			calling; /* set before munmap() is called */
	int			done;	/* set once munmap() returned */
};

static void *hmm_unmap_thread(void *arg)
{
	struct hmm_unmap_race *race = arg;

	pthread_barrier_wait(&race->start);
	__atomic_store_n(&race->calling, 1, __ATOMIC_RELEASE);
	if (munmap(race->addr, race->len))
		race->err = errno;
	__atomic_store_n(&race->done, 1, __ATOMIC_RELEASE);
	return NULL;
}

/*
 * Device reads of a whole buffer while another thread unmaps its second
 * half: each read either fails with EFAULT or returns all of the data, and
 * once munmap() has returned, reads fail. The buffer is mirrored before the
 * race starts, so that reads through the device page table race with the
 * invalidation that clears it, as well as faults with the unmap. A read
 * that began before munmap() returned and ended after it was called
 * overlapped it; if no read of any round did, the race was not run and the
 * test skips rather than pass.
 */
TEST_F_TIMEOUT(hmm, read_vs_munmap, HMM_SLOW_TIMEOUT)
{
	const __u64 npages = HMM_RACE_NPAGES;
	size_t size = npages * self->page_size, half = size / 2;
	unsigned long nread = 0, nfault = 0, noverlap = 0;
	__u64 t0 = hmm_now_ns();
	struct hmm_unmap_race race;
	struct hmm_dmirror_cmd cmd;
	char *buf, *mirror;
	unsigned int round;
	pthread_t thread;
	int ret, done;

	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);

	for (round = 1; round <= HMM_RACE_ROUNDS; round++) {
		buf = hmm_map_anon(size, PROT_READ | PROT_WRITE, MAP_PRIVATE);
		ASSERT_NE(NULL, buf);
		hmm_fill(buf, size, round);
		ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror,
				     npages, &cmd));
		race.addr = buf + half;
		race.len = size - half;
		race.err = 0;
		race.calling = 0;
		race.done = 0;
		ASSERT_EQ(0, pthread_barrier_init(&race.start, NULL, 2));
		ASSERT_EQ(0, pthread_create(&thread, NULL, hmm_unmap_thread,
					    &race));
		pthread_barrier_wait(&race.start);

		do {
			done = __atomic_load_n(&race.done, __ATOMIC_ACQUIRE);
			ret = hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror,
				      npages, &cmd);
			noverlap += !done && __atomic_load_n(&race.calling,
							     __ATOMIC_ACQUIRE);
			if (ret == -EFAULT) {
				nfault++;
				continue;
			}
			ASSERT_EQ(0, ret) TH_LOG("round %u", round);
			ASSERT_FALSE(done)
				TH_LOG("read after munmap() returned");
			ASSERT_EQ(npages, cmd.cpages);
			ASSERT_EQ(-1, hmm_check(mirror, size, round));
			nread++;
		} while (!done);

		ASSERT_EQ(0, pthread_join(thread, NULL));
		ASSERT_EQ(0, race.err);
		ASSERT_EQ(0, pthread_barrier_destroy(&race.start));

		/* What is left of the buffer still reads fine. */
		memset(mirror, 0, size);
		ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_READ, buf, mirror,
			       npages / 2, &cmd);
		ASSERT_EQ(-1, hmm_check(mirror, half, round));
		ASSERT_EQ(0, munmap(buf, half));
	}
	TH_LOG("%lu whole reads, %lu EFAULT, %lu overlapping munmap(), %llu ms",
	       nread, nfault, noverlap, (hmm_now_ns() - t0) / 1000000);
	free(mirror);
	if (!noverlap)
		SKIP(return, "no read overlapped munmap() in %u rounds",
		     HMM_RACE_ROUNDS);
}

enum hmm_op {
	HMM_OP_READ,
	HMM_OP_WRITE,
	HMM_OP_READ_UNLOCKED,
	HMM_OP_SNAPSHOT,
	HMM_NR_OPS
};

static const struct {
	const char	*name;
	unsigned long	request;
} hmm_ops[HMM_NR_OPS] = {
	[HMM_OP_READ]		= { "READ", HMM_DMIRROR_READ },
	[HMM_OP_WRITE]		= { "WRITE", HMM_DMIRROR_WRITE },
	[HMM_OP_READ_UNLOCKED]	= { "READ_UNLOCKED", HMM_DMIRROR_READ_UNLOCKED },
	[HMM_OP_SNAPSHOT]	= { "SNAPSHOT", HMM_DMIRROR_SNAPSHOT },
};

enum hmm_bad_range {
	HMM_RANGE_VALID,	/* first page of a populated buffer */
	HMM_RANGE_UNALIGNED,	/* one byte into that page */
	HMM_RANGE_EMPTY,	/* npages 0 */
	HMM_RANGE_WRAP,		/* two pages from the last page of 2^64 */
	HMM_RANGE_HUGE,		/* npages 2^52: npages * page size overflows */
	HMM_RANGE_PAST_VA,	/* from the buffer to past the user VA space */
	HMM_RANGE_PROT_NONE,	/* a PROT_NONE page */
};

enum hmm_bad_ptr {
	HMM_PTR_VALID,		/* a page-sized malloc() buffer */
	HMM_PTR_NULL,
	HMM_PTR_UNMAPPED,	/* a page with no mapping */
};

struct hmm_bad_case {
	const char		*name;
	enum hmm_bad_range	range;
	enum hmm_bad_ptr	ptr;
	bool			null_cmd;	/* pass NULL for the cmd */
	unsigned long		request;	/* if set, replaces the op's */
	int			err[HMM_NR_OPS]; /* errno, 0: op not tried */
};

/* err[] of a case that every op refuses the same way. */
#define HMM_EINVAL_ALL	{ EINVAL, EINVAL, EINVAL, EINVAL }
#define HMM_EFAULT_ALL	{ EFAULT, EFAULT, EFAULT, EFAULT }

/* err[] is READ, WRITE, READ_UNLOCKED, SNAPSHOT. */
static const struct hmm_bad_case hmm_bad_cases[] = {
	{ .name = "unaligned addr", .range = HMM_RANGE_UNALIGNED,
	  .err = HMM_EINVAL_ALL },
	{ .name = "range wraps around", .range = HMM_RANGE_WRAP,
	  .err = HMM_EINVAL_ALL },
	{ .name = "npages 0", .range = HMM_RANGE_EMPTY, .err = HMM_EINVAL_ALL },
	{ .name = "npages 1 << 52", .range = HMM_RANGE_HUGE,
	  .err = HMM_EINVAL_ALL },
	{ .name = "range ends past the user address space",
	  .range = HMM_RANGE_PAST_VA, .err = HMM_EINVAL_ALL },
	{ .name = "NULL ptr", .ptr = HMM_PTR_NULL, .err = HMM_EFAULT_ALL },
	{ .name = "ptr to an unmapped page", .ptr = HMM_PTR_UNMAPPED,
	  .err = HMM_EFAULT_ALL },
	{ .name = "PROT_NONE addr", .range = HMM_RANGE_PROT_NONE,
	  .err = { EFAULT, EFAULT, EFAULT, 0 } },
	{ .name = "NULL cmd", .null_cmd = true, .err = HMM_EFAULT_ALL },
	{ .name = "unknown ioctl 0x7f",
	  .request = _IOWR('H', 0x7f, struct hmm_dmirror_cmd),
	  .err = { ENOTTY } },
	{ .name = "unknown ioctl 0x0a",
	  .request = _IOWR('H', 0x0a, struct hmm_dmirror_cmd),
	  .err = { ENOTTY } },
	{ .name = "READ with the wrong argument size",
	  .request = _IOWR('H', 0x00, __u64), .err = { ENOTTY } },
};

/* Where the requests of hmm_bad_cases[] point. */
struct hmm_bad_env {
	char	*buf;		/* one populated page */
	char	*prot_none;	/* one PROT_NONE page */
	void	*mirror;	/* page-sized */
	void	*unmapped;	/* a page-aligned address with no mapping */
	size_t	page_size;
	__u64	va_end;
};

static void hmm_bad_cmd(const struct hmm_bad_case *c,
			const struct hmm_bad_env *env,
			struct hmm_dmirror_cmd *cmd)
{
	__u64 buf = (uintptr_t)env->buf;

	cmd->addr = buf;
	cmd->npages = 1;
	switch (c->range) {
	case HMM_RANGE_VALID:
		break;
	case HMM_RANGE_UNALIGNED:
		cmd->addr = buf + 1;
		break;
	case HMM_RANGE_EMPTY:
		cmd->npages = 0;
		break;
	case HMM_RANGE_WRAP:
		cmd->addr = 0ULL - env->page_size;
		cmd->npages = 2;
		break;
	case HMM_RANGE_HUGE:
		cmd->npages = 1ULL << 52;
		break;
	case HMM_RANGE_PAST_VA:
		cmd->npages = (env->va_end - buf) / env->page_size + 16;
		break;
	case HMM_RANGE_PROT_NONE:
		cmd->addr = (uintptr_t)env->prot_none;
		break;
	}

	switch (c->ptr) {
	case HMM_PTR_VALID:
		cmd->ptr = (uintptr_t)env->mirror;
		break;
	case HMM_PTR_NULL:
		cmd->ptr = 0;
		break;
	case HMM_PTR_UNMAPPED:
		cmd->ptr = (uintptr_t)env->unmapped;
		break;
	}
	cmd->cpages = HMM_POISON;
	cmd->faults = HMM_POISON;
}

/*
 * Malformed requests fail with the documented errno and report nothing
 * back, and the device keeps working afterwards.
 */
TEST_F(hmm, bad_input)
{
	struct hmm_bad_env env = { .page_size = self->page_size };
	bool unlocked = hmm_has_read_unlocked(self->fd);
	struct hmm_skipped skipped = { 0 };
	size_t ps = self->page_size;
	struct hmm_dmirror_cmd cmd;
	unsigned int i, op;

	env.va_end = hmm_user_va_end(ps);
	env.buf = hmm_map_anon(ps, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	ASSERT_NE(NULL, env.buf);
	hmm_fill(env.buf, ps, 0xbad);
	env.prot_none = hmm_map_anon(ps, PROT_NONE, MAP_PRIVATE);
	ASSERT_NE(NULL, env.prot_none);
	env.mirror = malloc(ps);
	ASSERT_NE(NULL, env.mirror);
	/* Last, so that nothing gets mapped there. */
	env.unmapped = hmm_map_anon(ps, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	ASSERT_NE(NULL, env.unmapped);
	ASSERT_EQ(0, munmap(env.unmapped, ps));

	for (i = 0; i < ARRAY_SIZE(hmm_bad_cases); i++) {
		const struct hmm_bad_case *c = &hmm_bad_cases[i];

		for (op = 0; op < HMM_NR_OPS; op++) {
			unsigned long request = c->request ?: hmm_ops[op].request;

			if (!c->err[op])
				continue;
			/* Checked before the call that is missing: EINVAL. */
			if (op == HMM_OP_READ_UNLOCKED && !unlocked &&
			    c->err[op] != EINVAL) {
				if (!skipped.why[0])
					hmm_skip_row(&skipped, "%s",
						     HMM_NO_READ_UNLOCKED);
				continue;
			}
			hmm_bad_cmd(c, &env, &cmd);
			EXPECT_EQ(-c->err[op],
				  hmm_ioctl(self->fd, request,
					    c->null_cmd ? NULL : &cmd))
				TH_LOG("%s, %s", c->name, hmm_ops[op].name);
			/* With no cmd there is nothing to write back to. */
			if (c->null_cmd)
				continue;
			EXPECT_EQ(HMM_POISON, cmd.cpages)
				TH_LOG("%s, %s: cpages written back", c->name,
				       hmm_ops[op].name);
			EXPECT_EQ(HMM_POISON, cmd.faults)
				TH_LOG("%s, %s: faults written back", c->name,
				       hmm_ops[op].name);
		}
	}

	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_READ, env.buf, env.mirror, 1,
		       &cmd);
	ASSERT_EQ(-1, hmm_check(env.mirror, ps, 0xbad));

	free(env.mirror);
	munmap(env.prot_none, ps);
	munmap(env.buf, ps);
	if (hmm_left_out(&skipped, _metadata))
		SKIP(return, "%s", skipped.why);
}

enum hmm_snap_setup {
	HMM_SNAP_UNTOUCHED,
	HMM_SNAP_CPU_READ,	/* read-faulted: the zero page */
	HMM_SNAP_CPU_WRITE,
	HMM_SNAP_READ_ONLY,	/* written, then mprotect(PROT_READ) */
	HMM_SNAP_UNMAPPED,
};

static const struct {
	const char		*name;
	enum hmm_snap_setup	setup;
	unsigned char		state;	/* what SNAPSHOT must report */
} hmm_snap_cases[] = {
	{ "untouched", HMM_SNAP_UNTOUCHED, HMM_DMIRROR_PROT_NONE },
	{ "CPU read", HMM_SNAP_CPU_READ,
	  HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ },
	{ "unmapped", HMM_SNAP_UNMAPPED, HMM_DMIRROR_PROT_ERROR },
	{ "CPU written", HMM_SNAP_CPU_WRITE, HMM_DMIRROR_PROT_WRITE },
	{ "read-only", HMM_SNAP_READ_ONLY, HMM_DMIRROR_PROT_READ },
};

#define HMM_SNAP_CASE_PAGES	2
#define HMM_SNAP_NPAGES		(ARRAY_SIZE(hmm_snap_cases) * HMM_SNAP_CASE_PAGES)

/*
 * SNAPSHOT of a buffer whose parts are in different states reports each
 * page's state, and does not fault: a second snapshot is the same.
 */
TEST_F(hmm, snapshot_states)
{
	const __u64 npages = HMM_SNAP_NPAGES;
	size_t ps = self->page_size, size = npages * ps;
	size_t part = HMM_SNAP_CASE_PAGES * ps;
	unsigned char snap[HMM_SNAP_NPAGES], again[HMM_SNAP_NPAGES];
	struct hmm_dmirror_cmd cmd;
	unsigned int i;
	char *buf, *p;
	long bad;

	buf = hmm_map_anon(size, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	ASSERT_NE(NULL, buf);
	for (i = 0; i < ARRAY_SIZE(hmm_snap_cases); i++) {
		p = buf + i * part;
		switch (hmm_snap_cases[i].setup) {
		case HMM_SNAP_UNTOUCHED:
			break;
		case HMM_SNAP_CPU_READ:
			hmm_cpu_read(p, part, ps);
			break;
		case HMM_SNAP_CPU_WRITE:
			memset(p, i + 1, part);
			break;
		case HMM_SNAP_READ_ONLY:
			memset(p, i + 1, part);
			ASSERT_EQ(0, mprotect(p, part, PROT_READ));
			break;
		case HMM_SNAP_UNMAPPED:
			ASSERT_EQ(0, munmap(p, part));
			break;
		}
	}

	memset(snap, 0xee, npages);
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_SNAPSHOT, buf, snap, npages, &cmd);
	ASSERT_EQ(0ULL, cmd.faults);
	for (i = 0; i < ARRAY_SIZE(hmm_snap_cases); i++) {
		unsigned char want = hmm_snap_cases[i].state;

		bad = hmm_snap_bad(snap, i * HMM_SNAP_CASE_PAGES,
				   HMM_SNAP_CASE_PAGES, want);
		EXPECT_EQ(-1, bad) TH_LOG("%s", hmm_snap_cases[i].name);
	}

	memset(again, 0xee, npages);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_SNAPSHOT, buf, again,
			     npages, &cmd));
	ASSERT_EQ(0, memcmp(snap, again, npages));

	munmap(buf, size);
}

/* --- Exclusive (atomic) device access --------------------------------- */

#define HMM_EXCL_THREADS	4
#define HMM_EXCL_ROUNDS		50

/*
 * CHECK_EXCLUSIVE of @npages pages at @addr: 0 if the device behind @fd
 * holds none of them for atomic access any more, -EPERM if it still holds
 * one, else another negative errno. @scratch is a page-sized buffer.
 */
static int hmm_check_exclusive(int fd, void *addr, void *scratch,
			       __u64 npages)
{
	struct hmm_dmirror_cmd cmd;

	return hmm_cmd(fd, HMM_DMIRROR_CHECK_EXCLUSIVE, addr, scratch, npages,
		       &cmd);
}

/*
 * EXCLUSIVE of all of @b through @fd, with the device's statistics reset
 * first: its result, or the error of the statistics calls (printed). How
 * long it took goes to *@ns, the statistics after it to @stats.
 */
static int hmm_exclusive_timed(int fd, struct hmm_buffer *b,
			       struct hmm_dmirror_cmd *cmd, __u64 *ns,
			       struct hmm_dmirror_stats *stats)
{
	__u64 t0;
	int ret;

	memset(b->mirror, 0xa5, b->size);
	ret = hmm_stats_reset(fd);
	if (ret) {
		fprintf(stderr, "# STATS_RESET: %s\n", strerror(-ret));
		return ret;
	}
	t0 = hmm_now_ns();
	ret = hmm_cmd(fd, HMM_DMIRROR_EXCLUSIVE, b->ptr, b->mirror, b->npages,
		      cmd);
	*ns = hmm_now_ns() - t0;
	if (!ret)
		ret = hmm_stats(fd, stats);
	return ret;
}

/*
 * The device takes pages for exclusive access and gets their data. It keeps
 * them while only it touches them, also writing through its atomic mapping
 * without a fault, and loses them at the CPU's first access, a read or a
 * write. The CPU reads what the device wrote, and the device has to fault
 * the pages in again.
 */
TEST_F(hmm, exclusive_cpu_revokes)
{
	static const struct {
		const char	*name;
		bool		write;
	} accesses[] = {
		{ "CPU read", false },
		{ "CPU write", true },
	};
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	unsigned int i;
	__u32 now;	/* the pattern in memory after the CPU access */

	for (i = 0; i < ARRAY_SIZE(accesses); i++) {
		const char *name = accesses[i].name;

		ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0xe1);

		ASSERT_DEV_READ(self->fd, HMM_DMIRROR_EXCLUSIVE, &b, 0xe1, &cmd)
			TH_LOG("%s", name);
		ASSERT_EQ(-EPERM, hmm_check_exclusive(self->fd, b.ptr, b.mirror,
						      b.npages))
			TH_LOG("%s: not exclusive after EXCLUSIVE", name);

		hmm_fill(b.mirror, b.size, 0xe2);
		ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_WRITE, b.ptr, b.mirror,
			       b.npages, &cmd);
		ASSERT_EQ(0ULL, cmd.faults)
			TH_LOG("%s: device write through atomic entries faulted",
			       name);
		ASSERT_EQ(-EPERM, hmm_check_exclusive(self->fd, b.ptr, b.mirror,
						      b.npages))
			TH_LOG("%s: the device's own write revoked it", name);

		if (accesses[i].write) {
			hmm_fill(b.ptr, b.size, 0xe3);
			now = 0xe3;
		} else {
			ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0xe2))
				TH_LOG("CPU does not see the device's write");
			now = 0xe2;
		}
		ASSERT_EQ(0, hmm_check_exclusive(self->fd, b.ptr, b.mirror,
						 b.npages))
			TH_LOG("%s did not revoke exclusive access", name);

		ASSERT_DEV_READ(self->fd, HMM_DMIRROR_READ, &b, now, &cmd)
			TH_LOG("%s", name);
		ASSERT_EQ(1ULL, cmd.faults)
			TH_LOG("%s: device kept its entries", name);
		hmm_buffer_free(&b);
	}
}

/*
 * mprotect(PROT_READ) ends the device's exclusive access: it can no longer
 * write the pages, but still reads their data. Once they are writable
 * again, it can take them again.
 */
TEST_F(hmm, exclusive_mprotect)
{
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0x3e0);

	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_EXCLUSIVE, &b, 0x3e0, &cmd);

	ASSERT_EQ(0, mprotect(b.ptr, b.size, PROT_READ));
	ASSERT_EQ(0, hmm_check_exclusive(self->fd, b.ptr, b.mirror, b.npages))
		TH_LOG("atomic access survived mprotect(PROT_READ)");
	hmm_fill(b.mirror, b.size, 0x3e1);
	ASSERT_EQ(-EPERM, hmm_cmd(self->fd, HMM_DMIRROR_WRITE, b.ptr, b.mirror,
				  b.npages, &cmd));
	ASSERT_EQ(HMM_POISON, cmd.cpages);

	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_READ, &b, 0x3e0, &cmd);
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x3e0));

	ASSERT_EQ(0, mprotect(b.ptr, b.size, PROT_READ | PROT_WRITE));
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_EXCLUSIVE, b.ptr, b.mirror,
		       b.npages, &cmd);
	ASSERT_EQ(-EPERM, hmm_check_exclusive(self->fd, b.ptr, b.mirror,
					      b.npages));

	hmm_buffer_free(&b);
}

/*
 * Body of the child of exclusive_fork_cow: its copy of the buffer holds the
 * parent's pattern @seed; it writes @cpu_seed with the CPU, then has a
 * device of its own write @dev_seed (hmm_child_write()). Returns the exit
 * status: 0 on success.
 */
static int hmm_child_exclusive_cow(int device, char *addr, __u64 npages,
				   size_t page_size, __u32 seed,
				   __u32 cpu_seed, __u32 dev_seed)
{
	size_t size = npages * page_size;

	if (hmm_check(addr, size, seed) >= 0) {
		fprintf(stderr, "# child: does not see the parent's data\n");
		return 5;
	}
	hmm_fill(addr, size, cpu_seed);
	return hmm_child_write(device, addr, npages, page_size, dev_seed);
}

/*
 * fork() of pages a device holds for exclusive access: the parent's pages
 * are mapped again, to be shared copy on write with the child, which ends
 * the device's exclusive access. The child's CPU and device writes go to
 * its own copies: the parent, from the CPU and from its device, keeps its
 * data.
 */
TEST_F(hmm, exclusive_fork_cow)
{
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	pid_t pid;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0xf0);

	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_EXCLUSIVE, &b, 0xf0, &cmd);

	pid = hmm_fork();
	ASSERT_LE(0, pid);
	if (!pid)
		_exit(hmm_child_exclusive_cow(variant->device, b.ptr, b.npages,
					      self->page_size, 0xf0, 0xf1,
					      0xf2));
	ASSERT_CHILD_EXIT(pid, 0);

	ASSERT_EQ(0, hmm_check_exclusive(self->fd, b.ptr, b.mirror, b.npages))
		TH_LOG("atomic access survived fork()");
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0xf0));
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_READ, &b, 0xf0, &cmd);

	hmm_buffer_free(&b);
}

/*
 * Taking the middle half of a transparent huge page for exclusive access
 * splits the PMD that maps it: the whole huge page is then mapped by PTEs,
 * writable ones outside that half, and inside it too once the CPU has taken
 * the pages back. The data stays intact.
 */
TEST_F(hmm, exclusive_thp)
{
	const unsigned char rw = HMM_DMIRROR_PROT_WRITE;
	const unsigned char ro = HMM_DMIRROR_PROT_READ;
	struct hmm_dmirror_cmd cmd;
	__u64 npages, first, part;
	size_t ps = self->page_size;
	struct hmm_buffer b;
	char *ref;

	if (!hmm_buffer_get(_metadata, &b, HMM_THP, 0, 0xe7b))
		return;
	/* Keep khugepaged from collapsing the range again during the test. */
	madvise(b.ptr, b.size, MADV_NOHUGEPAGE);
	npages = b.npages;
	first = npages / 4;
	part = npages / 2;
	ref = malloc(b.size);
	ASSERT_NE(NULL, ref);
	hmm_fill(ref, b.size, 0xe7b);

	memset(b.snap, 0xee, npages);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_SNAPSHOT, b.ptr, b.snap,
			     npages, &cmd));
	if (hmm_snap_bad(b.snap, 0, npages, rw | HMM_DMIRROR_PROT_PMD) >= 0)
		SKIP(return, "the huge page is not mapped by a PMD (state 0x%02x)",
		     b.snap[0]);

	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_EXCLUSIVE, b.ptr + first * ps,
		       b.mirror, part, &cmd);
	ASSERT_EQ(0, memcmp(b.mirror, ref + first * ps, part * ps));

	/* The pages outside the half show the split. */
	memset(b.snap, 0xee, npages);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_SNAPSHOT, b.ptr, b.snap,
			     npages, &cmd));
	ASSERT_SNAP_RANGE(b.snap, 0, first, rw);
	ASSERT_SNAP_RANGE(b.snap, first + part, npages - first - part, rw);
	ASSERT_EQ(-EPERM, hmm_check_exclusive(self->fd, b.ptr + first * ps,
					      b.mirror, part));

	/* The CPU takes the pages back. */
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0xe7b));
	ASSERT_EQ(0, hmm_check_exclusive(self->fd, b.ptr, b.mirror, npages));
	ASSERT_SNAPSHOT_EITHER(self->fd, b.ptr, npages, b.snap, ro, rw);

	memset(b.mirror, 0, b.size);
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_READ, b.ptr, b.mirror, npages,
		       &cmd);
	ASSERT_EQ(-1, hmm_check(b.mirror, b.size, 0xe7b));

	free(ref);
	hmm_buffer_free(&b);
}

enum hmm_excl_setup {
	HMM_EXCL_UNTOUCHED,	/* never touched: the fault allocates */
	HMM_EXCL_ZERO_PAGE,	/* CPU read: the fault replaces the zero page */
	HMM_EXCL_COW_SHARED,	/* shared with a live child: the fault copies */
};

/*
 * @replaced: the fault replaces a page the CPU mapped, an invalidation the
 * request sees as a collision: each page is tried once more.
 */
static const struct {
	const char		*name;
	enum hmm_excl_setup	setup;
	bool			replaced;
} hmm_excl_faults[] = {
	{ "never touched", HMM_EXCL_UNTOUCHED, false },
	{ "zero page", HMM_EXCL_ZERO_PAGE, true },
	{ "copy on write", HMM_EXCL_COW_SHARED, true },
};

/*
 * Child holding a copy-on-write share of @npages pages at @addr, filled with
 * @seed, until @fd reads end of file. Returns its exit status: 0 if its copy
 * still holds @seed then.
 */
static int hmm_child_hold(int fd, const char *addr, __u64 npages,
			  size_t page_size, __u32 seed)
{
	char c;

	while (read(fd, &c, 1) < 0 && errno == EINTR)
		;
	if (hmm_check(addr, npages * page_size, seed) >= 0) {
		fprintf(stderr, "# child: its copy changed\n");
		return 1;
	}
	return 0;
}

/*
 * EXCLUSIVE first faults the pages in writable. When that fault replaces a
 * page, the zero page or a page shared copy on write, it sends an
 * invalidation that is not the device's own exclusive one: the request
 * sees it as a collision and tries that page once more (the driver counts
 * the retries), then succeeds with the data rather than retry until it
 * gives up; a child sharing the pages keeps its copy.
 */
TEST_F(hmm, exclusive_write_fault)
{
	struct hmm_dmirror_stats stats;
	struct hmm_dmirror_cmd cmd;
	int hold[2];
	struct hmm_buffer b;
	unsigned int i;
	pid_t pid;
	__u64 ns;
	long bad;

	for (i = 0; i < ARRAY_SIZE(hmm_excl_faults); i++) {
		const char *name = hmm_excl_faults[i].name;
		bool cow = hmm_excl_faults[i].setup == HMM_EXCL_COW_SHARED;
		bool replaced = hmm_excl_faults[i].replaced;

		ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0);
		pid = -1;
		switch (hmm_excl_faults[i].setup) {
		case HMM_EXCL_UNTOUCHED:
			break;
		case HMM_EXCL_ZERO_PAGE:
			hmm_cpu_read(b.ptr, b.size, self->page_size);
			break;
		case HMM_EXCL_COW_SHARED:
			hmm_fill(b.ptr, b.size, 0xc0e);
			ASSERT_EQ(0, pipe2(hold, O_CLOEXEC));
			pid = hmm_fork();
			ASSERT_LE(0, pid);
			if (!pid) {
				close(hold[1]);
				_exit(hmm_child_hold(hold[0], b.ptr, b.npages,
						     self->page_size, 0xc0e));
			}
			close(hold[0]);
			break;
		}

		ASSERT_EQ(0, hmm_exclusive_timed(self->fd, &b, &cmd, &ns,
						 &stats))
			TH_LOG("%s: after %llu ms", name, ns / 1000000);
		/* Beyond one per replaced page, only reclaim and the like. */
		ASSERT_LE(replaced ? b.npages : 0, stats.exclusive_retries)
			TH_LOG("%s: the fault did not collide", name);
		ASSERT_GT((replaced ? 2 : 1) * b.npages,
			  stats.exclusive_retries)
			TH_LOG("%s: %llu retries for %llu pages", name,
			       stats.exclusive_retries, b.npages);
		TH_LOG("%s: %llu ms, %llu retries", name, ns / 1000000,
		       stats.exclusive_retries);
		ASSERT_EQ(b.npages, cmd.cpages);
		if (cow)
			bad = hmm_check(b.mirror, b.size, 0xc0e);
		else
			bad = hmm_check_bytes(b.mirror, b.size, 0);
		ASSERT_EQ(-1, bad) TH_LOG("%s: wrong data at %ld", name, bad);
		ASSERT_EQ(-EPERM, hmm_check_exclusive(self->fd, b.ptr, b.mirror,
						      b.npages))
			TH_LOG("%s", name);

		/* The CPU takes the pages back and writes its own copy. */
		hmm_fill(b.ptr, b.size, 0xc0f);
		ASSERT_EQ(0, hmm_check_exclusive(self->fd, b.ptr, b.mirror,
						 b.npages)) TH_LOG("%s", name);
		if (cow) {
			close(hold[1]);
			ASSERT_CHILD_EXIT(pid, 0);
		}
		hmm_buffer_free(&b);
	}
}

/* Memory that cannot be taken for exclusive access, and the errno. */
static const struct {
	const char		*name;
	enum hmm_backing	backing;
	int			prot;	/* after it was filled */
	int			err;
} hmm_excl_refused[] = {
	{ "MAP_SHARED file", HMM_FILE_SHARED, PROT_READ | PROT_WRITE,
	  EOPNOTSUPP },
	{ "MAP_SHARED anonymous", HMM_ANON_SHARED, PROT_READ | PROT_WRITE,
	  EOPNOTSUPP },
	{ "hugetlb", HMM_HUGETLB, PROT_READ | PROT_WRITE, EOPNOTSUPP },
	{ "PROT_NONE", HMM_ANON, PROT_NONE, EFAULT },
	{ "PROT_READ", HMM_ANON, PROT_READ, EFAULT },
};

/*
 * Only writable private anonymous memory can be taken for exclusive access.
 * Other memory is refused with the documented errno; the request reports
 * nothing back, takes no page and leaves the data alone.
 */
TEST_F(hmm, exclusive_refused)
{
	struct hmm_skipped skipped = {};
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	int ret;
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(hmm_excl_refused); i++) {
		const char *name = hmm_excl_refused[i].name;

		ret = hmm_buffer_map(&b, hmm_excl_refused[i].backing,
				     HMM_NPAGES, 0);
		if (ret == HMM_BUFFER_SKIP) {
			hmm_skip_row(&skipped, "%s: %s", name, b.why);
			hmm_buffer_free(&b);
			continue;
		}
		ASSERT_EQ(0, ret) TH_LOG("%s", name);
		hmm_fill(b.ptr, b.size, 0x4e0 + i);
		ASSERT_EQ(0, mprotect(b.ptr, b.size,
				      hmm_excl_refused[i].prot));

		EXPECT_EQ(-hmm_excl_refused[i].err,
			  hmm_cmd(self->fd, HMM_DMIRROR_EXCLUSIVE, b.ptr,
				  b.mirror, b.npages, &cmd))
			TH_LOG("%s", name);
		EXPECT_EQ(HMM_POISON, cmd.cpages) TH_LOG("%s", name);
		EXPECT_EQ(0, hmm_check_exclusive(self->fd, b.ptr, b.mirror,
						 b.npages)) TH_LOG("%s", name);

		ASSERT_EQ(0, mprotect(b.ptr, b.size, PROT_READ));
		EXPECT_EQ(-1, hmm_check(b.ptr, b.size, 0x4e0 + i))
			TH_LOG("%s: data changed", name);
		hmm_buffer_free(&b);
	}
	if (hmm_left_out(&skipped, _metadata))
		SKIP(return, "%s", skipped.why);
}

/*
 * Two devices mirror the same pages, the fixture's and the other one of
 * the same kind. Taking the pages for exclusive access keeps the taker's
 * own mirror (its invalidation is filtered out, so the request does not
 * retry: a device that took its own invalidation for a collision would
 * retry every page until it gave up) but drops the other device's. The
 * other device's next read faults, which revokes the taker's access.
 */
TEST_F(hmm, exclusive_two_devices)
{
	int other = variant->device ^ 1;	/* 0 <-> 1, 2 <-> 3 */
	struct hmm_dmirror_stats stats;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	__u64 ns;
	int fd;

	fd = hmm_open(other);
	ASSERT_LE(0, fd);
	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0x2de);

	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, b.ptr, b.mirror,
			     b.npages, &cmd));
	ASSERT_EQ(1ULL, cmd.faults);
	ASSERT_EQ(0, hmm_cmd(fd, HMM_DMIRROR_READ, b.ptr, b.mirror, b.npages,
			     &cmd));
	ASSERT_EQ(1ULL, cmd.faults);

	ASSERT_EQ(0, hmm_exclusive_timed(self->fd, &b, &cmd, &ns, &stats))
		TH_LOG("EXCLUSIVE failed after %llu ms", ns / 1000000);
	/* Only an invalidation from elsewhere (compaction, say) may retry. */
	ASSERT_GT(b.npages, stats.exclusive_retries)
		TH_LOG("EXCLUSIVE retried %llu times for %llu pages: on its own invalidation?",
		       stats.exclusive_retries, b.npages);
	TH_LOG("EXCLUSIVE of %llu pages: %llu ms, %llu retries", b.npages,
	       ns / 1000000, stats.exclusive_retries);
	ASSERT_EQ(b.npages, cmd.cpages);
	ASSERT_EQ(-1, hmm_check(b.mirror, b.size, 0x2de));

	memset(b.mirror, 0, b.size);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, b.ptr, b.mirror,
			     b.npages, &cmd));
	ASSERT_EQ(0ULL, cmd.faults) TH_LOG("the taker lost its mirror");
	ASSERT_EQ(-1, hmm_check(b.mirror, b.size, 0x2de));
	ASSERT_EQ(-EPERM, hmm_check_exclusive(self->fd, b.ptr, b.mirror,
					      b.npages));

	memset(b.mirror, 0, b.size);
	ASSERT_EQ(0, hmm_cmd(fd, HMM_DMIRROR_READ, b.ptr, b.mirror, b.npages,
			     &cmd));
	ASSERT_EQ(1ULL, cmd.faults) TH_LOG("device %d kept its mirror", other);
	ASSERT_EQ(-1, hmm_check(b.mirror, b.size, 0x2de));
	ASSERT_EQ(0, hmm_check_exclusive(self->fd, b.ptr, b.mirror, b.npages))
		TH_LOG("device %d's fault did not revoke exclusive access",
		       other);

	hmm_buffer_free(&b);
	close(fd);
}

/* One thread of exclusive_threads, and what went wrong in it. */
struct hmm_excl_thread {
	pthread_t	thread;
	int		fd;		/* shared by all threads */
	char		*slice;		/* the thread's part of the buffer */
	__u64		npages;
	size_t		page_size;
	unsigned int	id;
	unsigned int	round;		/* the round that failed */
	const char	*failed;	/* what failed, NULL if nothing */
	int		ret;		/* the failed request's result */
};

/* Round @round of thread @t: what failed, NULL if nothing. */
static const char *hmm_excl_round(struct hmm_excl_thread *t, char *mirror,
				  __u32 seed)
{
	size_t size = t->npages * t->page_size;
	struct hmm_dmirror_cmd cmd;

	hmm_fill(t->slice, size, seed);
	t->ret = hmm_cmd(t->fd, HMM_DMIRROR_EXCLUSIVE, t->slice, mirror,
			 t->npages, &cmd);
	if (t->ret)
		return "EXCLUSIVE failed";
	if (cmd.cpages != t->npages)
		return "EXCLUSIVE took part of the slice";
	if (hmm_check(mirror, size, seed) >= 0)
		return "EXCLUSIVE returned the wrong data";
	t->ret = hmm_check_exclusive(t->fd, t->slice, mirror, t->npages);
	if (t->ret != -EPERM)
		return "CHECK_EXCLUSIVE: not exclusive after EXCLUSIVE";
	t->ret = 0;
	if (hmm_check(t->slice, size, seed) >= 0)
		return "the CPU read the wrong data";
	t->ret = hmm_check_exclusive(t->fd, t->slice, mirror, t->npages);
	if (t->ret)
		return "CHECK_EXCLUSIVE: still exclusive after the CPU read";
	return NULL;
}

static void *hmm_excl_thread_fn(void *arg)
{
	struct hmm_excl_thread *t = arg;
	char *mirror = malloc(t->npages * t->page_size);

	if (!mirror) {
		t->failed = "malloc";
		return NULL;
	}
	for (t->round = 0; t->round < HMM_EXCL_ROUNDS; t->round++) {
		t->failed = hmm_excl_round(t, mirror, t->id << 16 | t->round);
		if (t->failed)
			break;
	}
	free(mirror);
	return NULL;
}

/*
 * Threads sharing one device each take their own slice of a buffer for
 * exclusive access and give it back by reading it, over and over: no
 * thread's requests or CPU accesses disturb another thread's pages.
 */
TEST_F_TIMEOUT(hmm, exclusive_threads, HMM_SLOW_TIMEOUT)
{
	const __u64 slice_pages = HMM_NPAGES / HMM_EXCL_THREADS;
	size_t slice = slice_pages * self->page_size;
	struct hmm_excl_thread t[HMM_EXCL_THREADS] = { 0 };
	size_t size = HMM_EXCL_THREADS * slice;
	struct hmm_dmirror_stats stats;
	unsigned int i;
	__u64 t0, ns;
	char *buf;

	buf = hmm_map_anon(size, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	ASSERT_NE(NULL, buf);
	ASSERT_EQ(0, hmm_stats_reset(self->fd));
	t0 = hmm_now_ns();
	for (i = 0; i < HMM_EXCL_THREADS; i++) {
		t[i].fd = self->fd;
		t[i].slice = buf + i * slice;
		t[i].npages = slice_pages;
		t[i].page_size = self->page_size;
		t[i].id = i + 1;
		ASSERT_EQ(0, pthread_create(&t[i].thread, NULL,
					    hmm_excl_thread_fn, &t[i]));
	}
	for (i = 0; i < HMM_EXCL_THREADS; i++)
		ASSERT_EQ(0, pthread_join(t[i].thread, NULL));
	ns = hmm_now_ns() - t0;
	ASSERT_EQ(0, hmm_stats(self->fd, &stats));
	TH_LOG("%u threads x %u rounds: %llu ms, %llu exclusive retries, %llu fault retries",
	       HMM_EXCL_THREADS, HMM_EXCL_ROUNDS, ns / 1000000,
	       stats.exclusive_retries, stats.fault_retries);
	for (i = 0; i < HMM_EXCL_THREADS; i++) {
		const struct hmm_excl_thread *th = &t[i];

		EXPECT_EQ(NULL, th->failed)
			TH_LOG("thread %u, round %u: %s (ret %d)", th->id,
			       th->round, th->failed, th->ret);
	}
	munmap(buf, size);
}

/* --- Device memory and migration --------------------------------------- */

#define HMM_MIGRATE_ROUNDS	8
#define HMM_SMALL_NPAGES	16	/* buffers of the error and NUMA cases */
#define HMM_GUP_NPAGES		4	/* pages per gup_test case */
#define HMM_GUP_TEST		"/sys/kernel/debug/gup_test"
#define HMM_NODE_DIR		"/sys/devices/system/node"

/*
 * gup_test passes its gup_flags on to get_user_pages() and pin_user_pages()
 * as they are: these are the kernel's values (enum gup_flags), which no UAPI
 * header has.
 */
#define HMM_FOLL_WRITE		0x01
#define HMM_FOLL_LONGTERM	0x100

/*
 * Migration to the device moves every page of a private anonymous range to
 * the device's memory and hands back their data, read through the device.
 * The CPU still reads the data: a device-private page moves back to system
 * memory for that, a device-coherent page is read where it is. A page the
 * CPU faulted back keeps no reference behind: the device can then give all
 * of its memory back (RELEASE). Migrating again finds every page on the
 * device.
 */
TEST_F(hmm, migrate_read_back)
{
	const unsigned char rw = HMM_DMIRROR_PROT_WRITE;
	unsigned char local = hmm_local(variant->coherent);
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0x1e1);

	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0x1e1, &cmd);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap, local | rw)
		TH_LOG("migrated");

	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x1e1));
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			hmm_cpu_touched(variant->coherent)) TH_LOG("CPU read");
	ASSERT_EQ(0, hmm_ioctl(self->fd, HMM_DMIRROR_RELEASE, NULL))
		TH_LOG("device memory still in use after the CPU read");

	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0x1e1, &cmd);

	hmm_buffer_free(&b);
}

/*
 * Part of a migrated range comes back to system memory: its first quarter
 * by CPU reads (device-private pages only: device-coherent pages stay), its
 * second quarter by MIGRATE_TO_SYS, which counts the pages it moved.
 * Migrating the whole range again moves what came back: every page is on
 * the device again, with its data.
 */
TEST_F(hmm, migrate_partial_back)
{
	const unsigned char rw = HMM_DMIRROR_PROT_WRITE;
	unsigned char local = hmm_local(variant->coherent);
	const __u64 q = HMM_NPAGES / 4;
	size_t ps = self->page_size;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0x9a7);

	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
		       b.npages, &cmd);

	hmm_cpu_read(b.ptr, q * ps, ps);
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_SYS, b.ptr + q * ps,
		       NULL, q, &cmd);

	ASSERT_SNAPSHOT(self->fd, b.ptr, q, b.snap,
			hmm_cpu_touched(variant->coherent)) TH_LOG("CPU read");
	ASSERT_SNAPSHOT(self->fd, b.ptr + q * ps, q, b.snap, rw)
		TH_LOG("MIGRATE_TO_SYS");
	ASSERT_SNAPSHOT(self->fd, b.ptr + 2 * q * ps, b.npages - 2 * q, b.snap,
			local | rw) TH_LOG("left on the device");

	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0x9a7, &cmd);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap, local | rw)
		TH_LOG("migrated again");
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x9a7));

	hmm_buffer_free(&b);
}

/*
 * Round trips between system and device memory keep the data: each round
 * the CPU writes new data, the range moves to the device, which reads it,
 * and every other round it moves back by MIGRATE_TO_SYS, in the others the
 * CPU's next write takes it (a device-private page moves back for the
 * write, a device-coherent page is written on the device).
 */
TEST_F(hmm, migrate_round_trips)
{
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	unsigned int round;
	__u32 seed;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0);

	for (round = 0; round < HMM_MIGRATE_ROUNDS; round++) {
		seed = 0x7e0 + round;
		hmm_fill(b.ptr, b.size, seed);
		ASSERT_DEV_READ(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, seed,
				&cmd) TH_LOG("round %u", round);
		if (round % 2)
			continue;

		ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_SYS, b.ptr,
			       NULL, b.npages, &cmd) TH_LOG("round %u", round);
		ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
				HMM_DMIRROR_PROT_WRITE)
			TH_LOG("round %u", round);
		ASSERT_EQ(-1, hmm_check(b.ptr, b.size, seed))
			TH_LOG("round %u", round);
	}
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, seed));

	hmm_buffer_free(&b);
}

/* Device memory of each device: module parameter device_memory_mb. */
#define HMM_DEVICE_MEMORY	(256UL << 20)

/*
 * Asking for more than the device has moves what fits, reports -ENOMEM and
 * loses no data: every page reads back as written, from wherever it ended.
 */
TEST_F(hmm, migrate_out_of_memory)
{
	size_t size = HMM_DEVICE_MEMORY + (4UL << 20);
	const __u64 npages = size / self->page_size;
	unsigned char local = hmm_local(variant->coherent);
	struct hmm_dmirror_cmd cmd;
	unsigned char *snap;
	char *map, *buf;
	__u64 i, on_device = 0;

	map = mmap(NULL, size + (2UL << 20), PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ASSERT_NE(MAP_FAILED, map);
	buf = (char *)(((uintptr_t)map + (2UL << 20) - 1) & ~((2UL << 20) - 1));
	madvise(buf, size, MADV_HUGEPAGE);	/* faster; fails without THP */
	snap = malloc(npages);
	ASSERT_NE(NULL, snap);
	hmm_fill(buf, size, 0x00e);

	ASSERT_EQ(-ENOMEM, hmm_cmd(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, buf,
				   NULL, npages, &cmd));
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_SNAPSHOT, buf, snap, npages,
			     &cmd));
	for (i = 0; i < npages; i++)
		on_device += (snap[i] & ~(HMM_DMIRROR_PROT_WRITE |
					  HMM_DMIRROR_PROT_PMD)) == local;
	TH_LOG("%llu of %llu pages on the device", on_device, npages);
	ASSERT_LT(0ULL, on_device);
	ASSERT_GT(npages, on_device);
	ASSERT_EQ(-1, hmm_check(buf, size, 0x00e));

	ASSERT_EQ(0, hmm_ioctl(self->fd, HMM_DMIRROR_RELEASE, NULL));
	free(snap);
	munmap(map, size + (2UL << 20));
}

/*
 * HMM_DMIRROR_RELEASE evicts the device's memory from under a process that
 * uses it: its pages are back in system memory with their data, and the
 * device takes memory again afterwards.
 */
TEST_F(hmm, migrate_release)
{
	unsigned char local = hmm_local(variant->coherent);
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0x4e1);

	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
		       b.npages, &cmd);

	ASSERT_EQ(0, hmm_ioctl(self->fd, HMM_DMIRROR_RELEASE, NULL));
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			HMM_DMIRROR_PROT_WRITE) TH_LOG("released");
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x4e1));

	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0x4e1, &cmd);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			local | HMM_DMIRROR_PROT_WRITE)
		TH_LOG("migrated again");

	hmm_buffer_free(&b);
}

/*
 * A private file mapping: only its anonymous pages, the private copies the
 * CPU made by writing, can move to the device. Pages still in the page
 * cache cannot: while the range has one, migration fails with ENOENT,
 * having moved the anonymous pages and left the page cache ones mapped as
 * they were. Once the CPU has written every page, the whole range moves.
 * The file keeps its data throughout.
 */
TEST_F(hmm, migrate_file_private)
{
	const unsigned char ro = HMM_DMIRROR_PROT_READ;
	unsigned char local = hmm_local(variant->coherent);
	const __u64 half = HMM_NPAGES / 2;
	size_t ps = self->page_size, hsize = half * ps;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	char *io;

	if (!hmm_buffer_get(_metadata, &b, HMM_FILE_PRIVATE, HMM_NPAGES, 0xf1a))
		return;
	io = malloc(b.size);
	ASSERT_NE(NULL, io);
	hmm_fill(io, b.size, 0xf1a);

	/* Read, never written: page cache pages only. */
	hmm_cpu_read(b.ptr, b.size, ps);
	ASSERT_EQ(-ENOENT, hmm_cmd(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr,
				   b.mirror, b.npages, &cmd));
	ASSERT_EQ(HMM_POISON, cmd.cpages);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap, ro)
		TH_LOG("page cache");

	/* The CPU writes the first half: those pages become anonymous. */
	hmm_fill(b.ptr, hsize, 0xc09);
	ASSERT_EQ(-ENOENT, hmm_cmd(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr,
				   b.mirror, b.npages, &cmd));
	ASSERT_SNAPSHOT(self->fd, b.ptr, half, b.snap,
			local | HMM_DMIRROR_PROT_WRITE) TH_LOG("written");
	ASSERT_SNAPSHOT(self->fd, b.ptr + hsize, b.npages - half, b.snap, ro)
		TH_LOG("page cache");
	ASSERT_EQ(-1, hmm_check(b.ptr, hsize, 0xc09));
	ASSERT_EQ(0, memcmp(b.ptr + hsize, io + hsize, b.size - hsize));

	/* Then the rest. */
	hmm_fill(b.ptr, b.size, 0xc0a);
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0xc0a, &cmd);
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0xc0a));

	memset(io, 0, b.size);
	ASSERT_EQ((ssize_t)b.size, pread(b.file_fd, io, b.size, 0));
	ASSERT_EQ(-1, hmm_check(io, b.size, 0xf1a)) TH_LOG("the file changed");

	free(io);
	hmm_buffer_free(&b);
}

/*
 * Two devices of the same kind, the fixture's (A) and the other one (B).
 * B reads pages in A's memory: device-private pages move back to system
 * memory for that, device-coherent pages are read where they are, as any
 * CPU-addressable page. B's migration then takes the pages that are in
 * system memory; it fails with ENOENT for pages in A's coherent memory,
 * which stay there until A gives them back, unless A and B are in one
 * interconnect group (test_hmm.sh groups 2 and 3; FIXTURE(peer)): then they
 * move across. A does not see B's private pages (SNAPSHOT reports them as
 * not populated) but reads their data.
 */
TEST_F(hmm, migrate_two_devices)
{
	const unsigned char rw = HMM_DMIRROR_PROT_WRITE;
	bool coherent = variant->coherent;
	unsigned char local = hmm_local(coherent);
	int other = variant->device ^ 1;	/* 0 <-> 1, 2 <-> 3 */
	unsigned char remote = HMM_DMIRROR_PROT_NONE;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	bool peers;
	int fd;

	fd = hmm_open(other);
	ASSERT_LE(0, fd);
	peers = hmm_group(fd) > 0 && hmm_group(fd) == hmm_group(self->fd);
	ASSERT_FALSE(peers && !coherent) TH_LOG("devices 0 and 1 in a group");
	if (coherent)
		remote = HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | rw |
			 (peers ? HMM_DMIRROR_PROT_INTERCONNECT : 0);
	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0x2d0);

	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
		       b.npages, &cmd);

	ASSERT_DEV_READ(fd, HMM_DMIRROR_READ, &b, 0x2d0, &cmd);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			hmm_cpu_touched(coherent))
		TH_LOG("device %d read", other);
	if (coherent) {
		ASSERT_SNAPSHOT(fd, b.ptr, b.npages, b.snap, remote)
			TH_LOG("device %d's view", other);
	}

	if (coherent && !peers) {
		ASSERT_EQ(-ENOENT, hmm_cmd(fd, HMM_DMIRROR_MIGRATE_TO_DEV,
					   b.ptr, b.mirror, b.npages, &cmd));
		ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap, local | rw)
			TH_LOG("device %d took a page", other);
		ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_SYS, b.ptr,
			       NULL, b.npages, &cmd);
	}
	ASSERT_DEV_READ(fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0x2d0, &cmd);
	ASSERT_SNAPSHOT(fd, b.ptr, b.npages, b.snap, local | rw)
		TH_LOG("device %d's memory", other);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap, remote)
		TH_LOG("device %d's view", variant->device);

	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_READ, &b, 0x2d0, &cmd);
	ASSERT_SNAPSHOT(fd, b.ptr, b.npages, b.snap, hmm_cpu_touched(coherent))
		TH_LOG("device %d read", variant->device);
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x2d0));

	hmm_buffer_free(&b);
	close(fd);
}

enum hmm_mig_range {
	HMM_MIG_PROT_NONE_PAGE,	/* one PROT_NONE page in the middle */
	HMM_MIG_HOLE,		/* one unmapped page in the middle */
	HMM_MIG_READ_ONLY,	/* the whole range PROT_READ */
};

static const struct {
	const char		*name;
	enum hmm_mig_range	range;
	int			err;	/* of either migration, 0 if none */
} hmm_mig_ranges[] = {
	{ "PROT_NONE page", HMM_MIG_PROT_NONE_PAGE, EINVAL },
	{ "hole", HMM_MIG_HOLE, EINVAL },
	{ "read-only", HMM_MIG_READ_ONLY, 0 },
};

/*
 * A range with a page the CPU cannot read, PROT_NONE or not mapped at all,
 * cannot migrate either way: EINVAL, nothing reported back, no data lost.
 * Read-only memory migrates, and stays read-only on the device.
 */
TEST_F(hmm, migrate_bad_range)
{
	const unsigned char ro = HMM_DMIRROR_PROT_READ;
	unsigned char local = hmm_local(variant->coherent);
	const __u64 npages = HMM_SMALL_NPAGES, mid = npages / 2;
	size_t ps = self->page_size, size = npages * ps;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	char *ref, *after;
	unsigned int i;

	ref = malloc(size);
	ASSERT_NE(NULL, ref);

	for (i = 0; i < ARRAY_SIZE(hmm_mig_ranges); i++) {
		const char *name = hmm_mig_ranges[i].name;
		int err = hmm_mig_ranges[i].err;

		ASSERT_BUFFER_MAP(&b, HMM_ANON, npages, 0xbd0 + i);
		hmm_fill(ref, size, 0xbd0 + i);
		after = b.ptr + (mid + 1) * ps;
		switch (hmm_mig_ranges[i].range) {
		case HMM_MIG_PROT_NONE_PAGE:
			ASSERT_EQ(0, mprotect(b.ptr + mid * ps, ps, PROT_NONE));
			break;
		case HMM_MIG_HOLE:
			ASSERT_EQ(0, munmap(b.ptr + mid * ps, ps));
			break;
		case HMM_MIG_READ_ONLY:
			ASSERT_EQ(0, mprotect(b.ptr, size, PROT_READ));
			break;
		}

		memset(b.mirror, 0, size);
		ASSERT_EQ(-err, hmm_cmd(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV,
					b.ptr, b.mirror, npages, &cmd))
			TH_LOG("%s: to the device", name);
		if (err) {
			ASSERT_EQ(HMM_POISON, cmd.cpages) TH_LOG("%s", name);
		} else {
			ASSERT_EQ(npages, cmd.cpages) TH_LOG("%s", name);
			ASSERT_EQ(0, memcmp(b.mirror, ref, size))
				TH_LOG("%s", name);
			ASSERT_SNAPSHOT(self->fd, b.ptr, npages, b.snap,
					local | ro) TH_LOG("%s", name);
		}
		ASSERT_EQ(-err, hmm_cmd(self->fd, HMM_DMIRROR_MIGRATE_TO_SYS,
					b.ptr, NULL, npages, &cmd))
			TH_LOG("%s: to system memory", name);
		if (err) {
			ASSERT_EQ(HMM_POISON, cmd.cpages) TH_LOG("%s", name);
		} else {
			ASSERT_EQ(npages, cmd.cpages) TH_LOG("%s", name);
			ASSERT_SNAPSHOT(self->fd, b.ptr, npages, b.snap, ro)
				TH_LOG("%s", name);
		}

		if (hmm_mig_ranges[i].range == HMM_MIG_PROT_NONE_PAGE)
			ASSERT_EQ(0, mprotect(b.ptr + mid * ps, ps, PROT_READ));
		ASSERT_EQ(0, memcmp(b.ptr, ref, mid * ps))
			TH_LOG("%s: data lost", name);
		ASSERT_EQ(0, memcmp(after, ref + (mid + 1) * ps,
				    size - (mid + 1) * ps))
			TH_LOG("%s: data lost", name);
		if (hmm_mig_ranges[i].range != HMM_MIG_HOLE)
			ASSERT_EQ(-1, hmm_check(b.ptr, size, 0xbd0 + i))
				TH_LOG("%s: data lost", name);
		hmm_buffer_free(&b);
	}
	free(ref);
}

/*
 * 4 KiB pages that have been in device memory and back collapse into a THP
 * (MADV_COLLAPSE), which then moves to the device as a whole.
 */
TEST_F(hmm, migrate_thp_collapse)
{
	const unsigned char rw = HMM_DMIRROR_PROT_WRITE;
	unsigned char local = hmm_local(variant->coherent);
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;

	if (!hmm_buffer_get(_metadata, &b, HMM_PMD, 0, 0))
		return;
	ASSERT_EQ(0, madvise(b.ptr, b.size, MADV_NOHUGEPAGE));
	hmm_fill(b.ptr, b.size, 0xc01);

	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
		       b.npages, &cmd);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap, local | rw)
		TH_LOG("4 KiB on the device");
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_SYS, b.ptr, NULL,
		       b.npages, &cmd);

	ASSERT_EQ(0, madvise(b.ptr, b.size, MADV_HUGEPAGE));
	ASSERT_EQ(0, madvise(b.ptr, b.size, MADV_COLLAPSE))
		TH_LOG("MADV_COLLAPSE: %s", strerror(errno));
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			rw | HMM_DMIRROR_PROT_PMD) TH_LOG("collapsed");

	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0xc01, &cmd);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			local | rw | HMM_DMIRROR_PROT_PMD)
		TH_LOG("THP on the device");
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0xc01));
	hmm_buffer_free(&b);
}

/*
 * MADV_FREE of a THP in device memory: as for any memory, each page then
 * reads either as it was or as zeros, and data written after it stays.
 */
TEST_F(hmm, migrate_thp_madv_free)
{
	size_t ps = self->page_size;
	struct hmm_dmirror_cmd cmd;
	unsigned long freed = 0;
	struct hmm_buffer b;
	__u64 i;
	char *ref;

	if (!hmm_buffer_get(_metadata, &b, HMM_THP, 0, 0xf4e))
		return;
	ref = malloc(b.size);
	ASSERT_NE(NULL, ref);
	hmm_fill(ref, b.size, 0xf4e);

	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
		       b.npages, &cmd);
	ASSERT_EQ(0, madvise(b.ptr, b.size, MADV_FREE));

	for (i = 0; i < b.npages; i++) {
		if (!memcmp(b.ptr + i * ps, ref + i * ps, ps))
			continue;
		ASSERT_EQ(-1, hmm_check_bytes(b.ptr + i * ps, ps, 0))
			TH_LOG("page %llu is neither its data nor zeros", i);
		freed++;
	}
	TH_LOG("%lu of %llu pages freed", freed, b.npages);

	hmm_fill(b.ptr, b.size, 0xf4f);
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0xf4f));
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_READ, &b, 0xf4f, &cmd);

	free(ref);
	hmm_buffer_free(&b);
}

/* Parts of a migrated THP to unmap, in eighths of it. */
static const struct {
	const char	*name;
	unsigned int	first;
	unsigned int	count;
} hmm_thp_holes[] = {
	{ "first half", 0, 4 },
	{ "middle half", 2, 4 },
	{ "second half", 4, 4 },
	{ "last eighth", 7, 1 },
};

/*
 * munmap() of part of a THP in device memory: the rest stays mapped, in
 * device memory, now by 4 KiB entries, and the CPU reads its data.
 * Device-coherent memory: once HMM_BUG_COHERENT_THP_SPLIT_QUEUE is fixed.
 */
TEST_F(hmm, migrate_thp_partial_unmap)
{
	unsigned char local = hmm_local(variant->coherent);
	size_t ps = self->page_size, eighth;
	struct hmm_dmirror_cmd cmd;
	unsigned int i, part;
	struct hmm_buffer b;
	char *ref;

	if (hmm_coherent_bug(variant->coherent,
			     HMM_BUG_COHERENT_THP_SPLIT_QUEUE))
		SKIP(return, "%s", hmm_bug(HMM_BUG_COHERENT_THP_SPLIT_QUEUE));
	for (i = 0; i < ARRAY_SIZE(hmm_thp_holes); i++) {
		const char *name = hmm_thp_holes[i].name;
		unsigned int first = hmm_thp_holes[i].first;
		unsigned int end = first + hmm_thp_holes[i].count;
		/* The parts left: [0, first) and [end, 8) eighths. */
		const unsigned int left[2][2] = { { 0, first }, { end, 8 } };

		if (!hmm_buffer_get(_metadata, &b, HMM_THP, 0, 0x8a0 + i))
			return;
		eighth = b.size / 8;
		ref = malloc(b.size);
		ASSERT_NE(NULL, ref);
		hmm_fill(ref, b.size, 0x8a0 + i);

		ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr,
			       b.mirror, b.npages, &cmd) TH_LOG("%s", name);
		ASSERT_EQ(0, munmap(b.ptr + first * eighth,
				    (end - first) * eighth));

		for (part = 0; part < 2; part++) {
			size_t off = left[part][0] * eighth;
			size_t len = left[part][1] * eighth - off;

			if (!len)
				continue;
			ASSERT_SNAPSHOT(self->fd, b.ptr + off, len / ps, b.snap,
					local | HMM_DMIRROR_PROT_WRITE)
				TH_LOG("%s, from page %zu", name, off / ps);
			ASSERT_EQ(0, memcmp(b.ptr + off, ref + off, len))
				TH_LOG("%s: wrong data after munmap()", name);
			ASSERT_SNAPSHOT(self->fd, b.ptr + off, len / ps, b.snap,
					hmm_cpu_touched(variant->coherent))
				TH_LOG("%s: CPU read, from page %zu", name,
				       off / ps);
		}
		free(ref);
		hmm_buffer_free(&b);
	}
}

/* Where mremap() moves a migrated THP. */
static const struct {
	const char	*name;
	bool		aligned;	/* to a PMD-aligned address */
	bool		dontunmap;	/* MREMAP_DONTUNMAP */
} hmm_thp_moves[] = {
	{ "aligned", true, false },
	{ "unaligned", false, false },
	{ "aligned, MREMAP_DONTUNMAP", true, true },
	{ "unaligned, MREMAP_DONTUNMAP", false, true },
};

/*
 * mremap() of a THP in device memory, to a PMD-aligned address or not: the
 * pages move with the mapping and stay in device memory, and the CPU reads
 * their data at the new address. With MREMAP_DONTUNMAP the old range stays
 * mapped, empty: it reads zeros. Device-coherent memory moves to aligned
 * addresses only until HMM_BUG_COHERENT_THP_SPLIT_QUEUE is fixed: unmapping
 * a THP mapped by PTEs across two page tables hits it.
 */
TEST_F(hmm, migrate_thp_mremap)
{
	const unsigned char rw = HMM_DMIRROR_PROT_WRITE;
	const unsigned char pmd = HMM_DMIRROR_PROT_PMD;
	unsigned char local = hmm_local(variant->coherent);
	unsigned char touched = hmm_cpu_touched(variant->coherent);
	struct hmm_skipped skipped = {};
	char *dmap, *dst, *moved;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	unsigned int i;
	int flags;

	for (i = 0; i < ARRAY_SIZE(hmm_thp_moves); i++) {
		const char *name = hmm_thp_moves[i].name;

		if (!hmm_thp_moves[i].aligned &&
		    hmm_coherent_bug(variant->coherent,
				     HMM_BUG_COHERENT_THP_SPLIT_QUEUE)) {
			hmm_skip_row(&skipped, "%s: %s", name,
				     hmm_bug(HMM_BUG_COHERENT_THP_SPLIT_QUEUE));
			continue;
		}
		if (!hmm_buffer_get(_metadata, &b, HMM_THP, 0, 0x3e0 + i))
			return;
		/* Room for an aligned range and for one a quarter past it. */
		dmap = mmap(NULL, 3 * b.size, PROT_NONE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		ASSERT_NE(MAP_FAILED, dmap);
		dst = (char *)(((uintptr_t)dmap + b.size - 1) &
			       ~((uintptr_t)b.size - 1));
		if (!hmm_thp_moves[i].aligned)
			dst += b.size / 4;

		ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr,
			       b.mirror, b.npages, &cmd) TH_LOG("%s", name);

		flags = MREMAP_MAYMOVE | MREMAP_FIXED;
		if (hmm_thp_moves[i].dontunmap)
			flags |= MREMAP_DONTUNMAP;
		moved = mremap(b.ptr, b.size, b.size, flags, dst);
		ASSERT_EQ(dst, moved) TH_LOG("%s: mremap(): %s", name,
					     strerror(errno));

		ASSERT_SNAPSHOT_EITHER(self->fd, dst, b.npages, b.snap,
				       local | rw, local | rw | pmd)
			TH_LOG("%s: moved", name);
		ASSERT_EQ(-1, hmm_check(dst, b.size, 0x3e0 + i))
			TH_LOG("%s: wrong data at the new address", name);
		ASSERT_SNAPSHOT_EITHER(self->fd, dst, b.npages, b.snap,
				       touched, touched | pmd)
			TH_LOG("%s: CPU read", name);

		if (hmm_thp_moves[i].dontunmap) {
			ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
					HMM_DMIRROR_PROT_NONE)
				TH_LOG("%s: old range", name);
			ASSERT_EQ(-1, hmm_check_bytes(b.ptr, b.size, 0))
				TH_LOG("%s: the old range is not empty", name);
		}
		munmap(dmap, 3 * b.size);
		hmm_buffer_free(&b);
	}
	if (hmm_left_out(&skipped, _metadata))
		SKIP(return, "%s", skipped.why);
}

/*
 * HMM_DMIRROR_FLAG_FAIL_ALLOC makes the next large device-memory allocation
 * of a migration by this file fail, once. Migrating a THP to the device
 * then takes 4 KiB device pages; migrating a device THP back takes 4 KiB
 * system pages (device-coherent memory: once HMM_BUG_COHERENT_THP_TO_SYS
 * and HMM_BUG_COHERENT_THP_SPLIT are fixed).
 * Either way every page moves, with its data, and the next migration has
 * huge pages again. Unknown flags are refused.
 */
TEST_F(hmm, migrate_thp_fail_alloc)
{
	struct hmm_skipped skipped = {};
	static const __u64 bad_flags[] = { 0x2, 1ULL << 63, ~0ULL };
	const unsigned char rw = HMM_DMIRROR_PROT_WRITE;
	const unsigned char pmd = HMM_DMIRROR_PROT_PMD;
	unsigned char local = hmm_local(variant->coherent);
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(bad_flags); i++)
		ASSERT_EQ(-EINVAL, hmm_cmd(self->fd, HMM_DMIRROR_FLAGS, NULL,
					   NULL, bad_flags[i], &cmd))
			TH_LOG("flags 0x%llx", bad_flags[i]);

	if (!hmm_buffer_get(_metadata, &b, HMM_THP, 0, 0xfa1))
		return;

	/* To the device. */
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_FLAGS, NULL, NULL,
			     HMM_DMIRROR_FLAG_FAIL_ALLOC, &cmd));
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0xfa1, &cmd);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap, local | rw)
		TH_LOG("to the device");
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_SYS, b.ptr, NULL,
		       b.npages, &cmd);
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0xfa1));
	hmm_buffer_free(&b);

	/* Back to system memory. */
	if (hmm_coherent_bug(variant->coherent, HMM_BUG_COHERENT_THP_TO_SYS)) {
		hmm_skip_row(&skipped, "from the device: %s",
			     hmm_bug(HMM_BUG_COHERENT_THP_TO_SYS));
		goto out;
	}
	if (hmm_coherent_bug(variant->coherent, HMM_BUG_COHERENT_THP_SPLIT)) {
		hmm_skip_row(&skipped, "from the device: %s",
			     hmm_bug(HMM_BUG_COHERENT_THP_SPLIT));
		goto out;
	}
	if (!hmm_buffer_get(_metadata, &b, HMM_THP, 0, 0xfa2))
		return;
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
		       b.npages, &cmd);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap, local | rw | pmd)
		TH_LOG("the flag is spent");
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_FLAGS, NULL, NULL,
			     HMM_DMIRROR_FLAG_FAIL_ALLOC, &cmd));
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_SYS, b.ptr, NULL,
		       b.npages, &cmd);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap, rw)
		TH_LOG("to system memory");
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0xfa2));
	hmm_buffer_free(&b);
out:
	if (hmm_left_out(&skipped, _metadata))
		SKIP(return, "%s", skipped.why);
}

/*
 * A device read that starts inside a device THP: a second mirror of the
 * device reads it from one page in, and from a page past the driver's first
 * batch (DMIRROR_BATCH_PAGES, 64), and gets the data of those addresses. A
 * device-private THP is mapped by a non-present PMD, whose pfns Linux 7.3
 * hands out without the offset of the range (HMM_BUG_PMD_PFN_OFFSET): the
 * driver corrects them and counts each correction, and that count tells
 * whether the kernel has the bug. A device-coherent THP is mapped by a
 * present PMD, which never had it.
 */
TEST_F(hmm, migrate_thp_read_offset)
{
	static const unsigned int first[] = { 1, 64 + 3 };
	const unsigned char thp = HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD;
	struct hmm_dmirror_stats stats;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	__u64 fixups = 0;
	unsigned int i;
	char *ref;

	if (!hmm_buffer_get(_metadata, &b, HMM_THP, 0, 0x0ff))
		return;
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0x0ff, &cmd);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			hmm_local(variant->coherent) | thp);
	ref = malloc(b.size);
	ASSERT_NE(NULL, ref);
	hmm_fill(ref, b.size, 0x0ff);

	for (i = 0; i < ARRAY_SIZE(first); i++) {
		size_t off = first[i] * self->page_size;
		int other = hmm_open(variant->device);

		ASSERT_GE(other, 0);
		ASSERT_EQ(0, hmm_stats_reset(other));
		memset(b.mirror, 0, b.size);
		ASSERT_CMD_ALL(other, HMM_DMIRROR_READ, b.ptr + off, b.mirror,
			       b.npages - first[i], &cmd);
		ASSERT_EQ(0, memcmp(b.mirror, ref + off, b.size - off))
			TH_LOG("from page %u: the device read wrong data",
			       first[i]);
		ASSERT_EQ(0, hmm_stats(other, &stats));
		fixups += stats.pmd_pfn_fixups;
		close(other);
	}
	free(ref);
	ASSERT_EQ(-1, hmm_buffer_check(&b, 0x0ff));
	hmm_buffer_free(&b);
	if (fixups && !hmm_bug_fixed(HMM_BUG_PMD_PFN_OFFSET))
		SKIP(return, "%s: the driver corrected %llu pfns",
		     hmm_bug(HMM_BUG_PMD_PFN_OFFSET), fixups);
	ASSERT_EQ(0ULL, fixups)
		TH_LOG("%s, although HMM_FIXED_BUGS says it is fixed",
		       hmm_bug(HMM_BUG_PMD_PFN_OFFSET));
}

/*
 * Body of the child of migrate_fork_cow. Its copy of the @npages pages at
 * @addr, shared copy on write with the parent, holds the parent's @seed in
 * device memory. A device of its own (the same device, another file) reads
 * them; the child writes @child_seed over them with the CPU and migrates
 * its copy to that device, tells the parent so on @tell, waits for end of
 * file on @wait and checks that its copy still holds @child_seed. Returns
 * its exit status: 0 on success.
 */
static int hmm_child_fork_cow(int device, char *addr, __u64 npages,
			      size_t page_size, __u32 seed, __u32 child_seed,
			      int tell, int wait)
{
	size_t size = npages * page_size;
	struct hmm_dmirror_cmd cmd;
	char *mirror, c;
	int fd, ret;

	fd = hmm_open(device);
	mirror = malloc(size);
	if (fd < 0 || !mirror)
		return 1;
	ret = hmm_cmd(fd, HMM_DMIRROR_READ, addr, mirror, npages, &cmd);
	if (ret || hmm_check(mirror, size, seed) >= 0) {
		fprintf(stderr, "# child: device READ: %s\n",
			ret ? strerror(-ret) : "not the parent's data");
		return 2;
	}
	hmm_fill(addr, size, child_seed);
	if (hmm_cmd_all(fd, HMM_DMIRROR_MIGRATE_TO_DEV, addr, mirror, npages,
			&cmd))
		return 3;
	if (hmm_check(mirror, size, child_seed) >= 0) {
		fprintf(stderr, "# child: its device read the wrong data\n");
		return 4;
	}
	if (write(tell, "", 1) != 1)
		return 5;
	while (read(wait, &c, 1) < 0 && errno == EINTR)
		;
	if (hmm_check(addr, size, child_seed) >= 0) {
		fprintf(stderr, "# child: its copy changed\n");
		return 6;
	}
	free(mirror);
	close(fd);
	return 0;
}

/*
 * fork() of memory in device memory: parent and child share it copy on
 * write, and a device of the child's reads the parent's data. The child
 * writes its own data with the CPU and migrates its copy to the device
 * through a file of its own; then the parent does the same with other data
 * while the child's copy is in device memory. Each sees only its own data,
 * from the CPU and from its device.
 */
TEST_F(hmm, migrate_fork_cow)
{
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	int tell[2], wait[2];
	char c;
	pid_t pid;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0xf00);
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
		       b.npages, &cmd);

	ASSERT_EQ(0, pipe2(tell, O_CLOEXEC));
	ASSERT_EQ(0, pipe2(wait, O_CLOEXEC));
	pid = hmm_fork();
	ASSERT_LE(0, pid);
	if (!pid) {
		close(tell[0]);
		close(wait[1]);
		_exit(hmm_child_fork_cow(variant->device, b.ptr, b.npages,
					 self->page_size, 0xf00, 0xf01,
					 tell[1], wait[0]));
	}
	close(tell[1]);
	close(wait[0]);

	/* The child has written and migrated its copy. */
	ASSERT_EQ(1, read(tell[0], &c, 1)) TH_LOG("the child failed");
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0xf00))
		TH_LOG("the child's write reached the parent");
	hmm_fill(b.ptr, b.size, 0xf02);
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0xf02, &cmd);

	close(wait[1]);
	ASSERT_CHILD_EXIT(pid, 0);
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0xf02));

	close(tell[0]);
	hmm_buffer_free(&b);
}

/*
 * fork() makes the parent's device pages read-only (copy on write). A
 * device WRITE to them must then break COW through the CPU, not loop on the
 * read-only pages the device is handed as its own, and the child's copy
 * stays as it was.
 */
TEST_F(hmm, migrate_fork_device_write)
{
	struct hmm_dmirror_cmd cmd;
	int pipefd[2];
	struct hmm_buffer b;
	pid_t pid;
	char go;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0xf0f0);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr,
			     b.mirror, b.npages, &cmd));
	ASSERT_EQ(0, pipe(pipefd));

	pid = fork();
	ASSERT_LE(0, pid);
	if (!pid) {
		/* Wait for the parent's device write, then check our copy. */
		close(pipefd[1]);
		if (read(pipefd[0], &go, 1) != 1)
			_exit(2);
		_exit(hmm_check(b.ptr, b.size, 0xf0f0) == -1 ? 0 : 1);
	}
	close(pipefd[0]);

	hmm_fill(b.mirror, b.size, 0x0f0f);
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_WRITE, b.ptr, b.mirror, b.npages,
		       &cmd);
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x0f0f));
	ASSERT_EQ(1, write(pipefd[1], "g", 1));
	ASSERT_CHILD_EXIT(pid, 0);

	close(pipefd[1]);
	hmm_buffer_free(&b);
}

/* Ways gup_test takes references on user pages. */
static const struct {
	const char	*name;
	unsigned long	request;
	__u32		flags;
	bool		longterm;
} hmm_gup_cases[] = {
	{ "get_user_pages()", GUP_BASIC_TEST, HMM_FOLL_WRITE, false },
	{ "get_user_pages_fast()", GUP_FAST_BENCHMARK, HMM_FOLL_WRITE, false },
	{ "pin_user_pages()", PIN_BASIC_TEST, HMM_FOLL_WRITE, false },
	{ "pin_user_pages(), read-only", PIN_BASIC_TEST, 0, false },
	{ "pin_user_pages_fast(FOLL_LONGTERM)", PIN_FAST_BENCHMARK,
	  HMM_FOLL_WRITE | HMM_FOLL_LONGTERM, true },
	{ "pin_user_pages(FOLL_LONGTERM)", PIN_LONGTERM_BENCHMARK,
	  HMM_FOLL_WRITE, true },
};

/*
 * get_user_pages() and pin_user_pages() of pages in device memory, through
 * gup_test: every page is taken. Device-private pages cannot be handed out,
 * so they move back to system memory; device-coherent ones can, and stay,
 * unless the pin is long-term, which device memory may not hold. The data
 * stays intact.
 */
TEST_F(hmm, migrate_gup)
{
	size_t ps = self->page_size;
	size_t part = HMM_GUP_NPAGES * ps;
	unsigned char local = hmm_local(variant->coherent);
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	char *p;
	struct gup_test gup;
	unsigned char want;
	unsigned int i;
	int gup_fd;

	gup_fd = open(HMM_GUP_TEST, O_RDWR | O_CLOEXEC);
	if (gup_fd < 0)
		SKIP(return, "no %s (CONFIG_GUP_TEST, debugfs): %s",
		     HMM_GUP_TEST, strerror(errno));
	ASSERT_BUFFER_MAP(&b, HMM_ANON,
			  ARRAY_SIZE(hmm_gup_cases) * HMM_GUP_NPAGES, 0x6e0);
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
		       b.npages, &cmd);

	for (i = 0; i < ARRAY_SIZE(hmm_gup_cases); i++) {
		const char *name = hmm_gup_cases[i].name;

		p = b.ptr + i * part;
		memset(&gup, 0, sizeof(gup));
		gup.addr = (uintptr_t)p;
		gup.size = part;
		gup.nr_pages_per_call = HMM_GUP_NPAGES;
		gup.gup_flags = hmm_gup_cases[i].flags;
		ASSERT_EQ(0, ioctl(gup_fd, hmm_gup_cases[i].request, &gup))
			TH_LOG("%s: %s", name, strerror(errno));
		ASSERT_EQ(part, gup.size) TH_LOG("%s: not every page taken",
						 name);

		if (variant->coherent && !hmm_gup_cases[i].longterm)
			want = local | HMM_DMIRROR_PROT_WRITE;
		else
			want = HMM_DMIRROR_PROT_WRITE;
		ASSERT_SNAPSHOT(self->fd, p, HMM_GUP_NPAGES, b.snap, want)
			TH_LOG("%s", name);
	}
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x6e0));

	hmm_buffer_free(&b);
	close(gup_fd);
}

/*
 * A long-term pin held across migrations (gup_test's PIN_LONGTERM_TEST_*):
 * taking it moves the pages out of device memory. While it is held the
 * pages cannot move to the device (ENOENT: they stay in system memory),
 * the device reads them in place, and the pin holds the very pages the CPU
 * writes. Once unpinned, they migrate.
 */
TEST_F(hmm, migrate_gup_longterm_held)
{
	unsigned char local = hmm_local(variant->coherent);
	struct pin_longterm_test pin = { 0 };
	char *pinned;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	__u64 uaddr;
	int gup_fd;

	gup_fd = open(HMM_GUP_TEST, O_RDWR | O_CLOEXEC);
	if (gup_fd < 0)
		SKIP(return, "no %s (CONFIG_GUP_TEST, debugfs): %s",
		     HMM_GUP_TEST, strerror(errno));
	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_SMALL_NPAGES, 0);
	pinned = malloc(b.size);
	ASSERT_NE(NULL, pinned);
	uaddr = (uintptr_t)pinned;
	hmm_fill(b.ptr, b.size, 0x91e);
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
		       b.npages, &cmd);

	pin.addr = (uintptr_t)b.ptr;
	pin.size = b.size;
	pin.flags = PIN_LONGTERM_TEST_FLAG_USE_WRITE;
	ASSERT_EQ(0, ioctl(gup_fd, PIN_LONGTERM_TEST_START, &pin))
		TH_LOG("PIN_LONGTERM_TEST_START: %s", strerror(errno));
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			HMM_DMIRROR_PROT_WRITE) TH_LOG("pinned");
	memset(pinned, 0, b.size);
	ASSERT_EQ(0, ioctl(gup_fd, PIN_LONGTERM_TEST_READ, &uaddr));
	ASSERT_EQ(-1, hmm_check(pinned, b.size, 0x91e));

	ASSERT_EQ(-ENOENT, hmm_cmd(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr,
				   b.mirror, b.npages, &cmd));
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			HMM_DMIRROR_PROT_WRITE) TH_LOG("a pinned page moved");
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_READ, &b, 0x91e, &cmd);
	hmm_fill(b.ptr, b.size, 0x91f);
	ASSERT_EQ(0, ioctl(gup_fd, PIN_LONGTERM_TEST_READ, &uaddr));
	ASSERT_EQ(-1, hmm_check(pinned, b.size, 0x91f))
		TH_LOG("the pin does not hold the pages the CPU writes");

	ASSERT_EQ(0, ioctl(gup_fd, PIN_LONGTERM_TEST_STOP));
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0x91f, &cmd);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			local | HMM_DMIRROR_PROT_WRITE) TH_LOG("unpinned");

	free(pinned);
	hmm_buffer_free(&b);
	close(gup_fd);
}

#ifdef HMM_HAVE_LIBURING
/* One fixed-buffer read or write of @len bytes at @buf, offset 0 of @fd. */
static int hmm_uring_rw(struct io_uring *ring, bool write, int fd, void *buf,
			unsigned int len)
{
	struct io_uring_cqe *cqe;
	struct io_uring_sqe *sqe;
	int ret;

	sqe = io_uring_get_sqe(ring);
	if (!sqe)
		return -EBUSY;
	if (write)
		io_uring_prep_write_fixed(sqe, fd, buf, len, 0, 0);
	else
		io_uring_prep_read_fixed(sqe, fd, buf, len, 0, 0);
	ret = io_uring_submit(ring);
	if (ret != 1)
		return ret < 0 ? ret : -EIO;
	ret = io_uring_wait_cqe(ring, &cqe);
	if (ret)
		return ret;
	ret = cqe->res;
	io_uring_cqe_seen(ring, cqe);
	return ret;
}

/* Wait for the CQE with which @ring reports it let go of resource @tag. */
static int hmm_uring_wait_tag(struct io_uring *ring, __u64 tag)
{
	struct io_uring_cqe *cqe;
	bool found;
	int ret;

	do {
		ret = io_uring_wait_cqe(ring, &cqe);
		if (ret)
			return ret;
		found = cqe->user_data == tag;
		io_uring_cqe_seen(ring, cqe);
	} while (!found);
	return 0;
}
#endif

/*
 * A buffer in device memory registered as an io_uring fixed buffer: the
 * registration pins it long-term, which moves it to system memory, where
 * it stays while registered (migration fails with ENOENT, the device reads
 * it in place). IORING_OP_WRITE_FIXED writes its data to a file and
 * IORING_OP_READ_FIXED reads the file's into it, as the CPU and the device
 * see. Once unregistered and let go of, it migrates again. io_uring lets go
 * of a buffer when its last request is freed, which may be after the
 * unregistration returns: the buffer is registered with a tag, and the
 * ring's CQE for that tag says when. The unpin follows that CQE in the same
 * kernel function, maybe on another CPU, so the migration is retried until
 * the pin is gone; if it never goes, the harness's timeout fails the test.
 */
TEST_F(hmm, migrate_io_uring_fixed)
{
#ifndef HMM_HAVE_LIBURING
	SKIP(return, "built without liburing (HMM_HAVE_LIBURING)");
#else
	unsigned char local = hmm_local(variant->coherent);
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	const __u64 tag = 0x10b;
	unsigned long tries;
	struct io_uring ring;
	char *io;
	struct iovec iov;
	int fd, ret;

	ret = io_uring_queue_init(4, &ring, 0);
	if (ret)
		SKIP(return, "io_uring_queue_init(): %s", strerror(-ret));
	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_SMALL_NPAGES, 0x10b);
	fd = hmm_tmpfile(b.size);
	if (fd < 0)
		SKIP(return, "no writable directory for a temporary file");
	io = malloc(b.size);
	ASSERT_NE(NULL, io);
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
		       b.npages, &cmd);

	iov.iov_base = b.ptr;
	iov.iov_len = b.size;
	ret = io_uring_register_buffers_tags(&ring, &iov, &tag, 1);
	ASSERT_EQ(0, ret) TH_LOG("io_uring_register_buffers_tags(): %s",
				 strerror(-ret));
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			HMM_DMIRROR_PROT_WRITE) TH_LOG("registered");
	ASSERT_EQ(-ENOENT, hmm_cmd(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr,
				   b.mirror, b.npages, &cmd));
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			HMM_DMIRROR_PROT_WRITE)
		TH_LOG("a registered page moved");
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_READ, &b, 0x10b, &cmd);

	ASSERT_EQ((int)b.size, hmm_uring_rw(&ring, true, fd, b.ptr, b.size));
	memset(io, 0, b.size);
	ASSERT_EQ((ssize_t)b.size, pread(fd, io, b.size, 0));
	ASSERT_EQ(-1, hmm_check(io, b.size, 0x10b))
		TH_LOG("WRITE_FIXED wrote the wrong data");

	hmm_fill(io, b.size, 0x10c);
	ASSERT_EQ((ssize_t)b.size, pwrite(fd, io, b.size, 0));
	ASSERT_EQ((int)b.size, hmm_uring_rw(&ring, false, fd, b.ptr, b.size));
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x10c))
		TH_LOG("the CPU does not see what READ_FIXED read");
	memset(b.mirror, 0, b.size);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, b.ptr, b.mirror,
			     b.npages, &cmd));
	ASSERT_EQ(-1, hmm_check(b.mirror, b.size, 0x10c))
		TH_LOG("the device does not see what READ_FIXED read");

	ASSERT_EQ(0, io_uring_unregister_buffers(&ring));
	ASSERT_EQ(0, hmm_uring_wait_tag(&ring, tag));
	for (tries = 1;; tries++) {
		ret = hmm_cmd(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr,
			      b.mirror, b.npages, &cmd);
		if (ret != -ENOENT)
			break;
		sched_yield();
	}
	ASSERT_EQ(0, ret);
	ASSERT_EQ(b.npages, cmd.cpages);
	if (tries > 1)
		TH_LOG("the pin went %lu migrations after the tag's CQE",
		       tries - 1);
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			local | HMM_DMIRROR_PROT_WRITE) TH_LOG("unregistered");

	io_uring_queue_exit(&ring);
	free(io);
	hmm_buffer_free(&b);
	close(fd);
#endif
}

/*
 * The first two NUMA nodes with memory, from HMM_NODE_DIR/has_memory (a
 * list such as "0-1" or "0,2"), into @nodes: false if there are fewer.
 */
static bool hmm_two_nodes(int *nodes)
{
	unsigned int found = 0;
	char buf[256], *p, *end;
	long first, last;

	if (hmm_read_file(HMM_NODE_DIR "/has_memory", buf, sizeof(buf)))
		return false;
	for (p = buf; found < 2; p = end + 1) {
		first = strtol(p, &end, 10);
		if (end == p)
			break;
		last = first;
		if (*end == '-')
			last = strtol(end + 1, &end, 10);
		for (; first <= last && found < 2; first++)
			nodes[found++] = first;
		if (*end != ',')
			break;
	}
	return found == 2;
}

/*
 * Index of the first of @npages pages at @addr that move_pages() does not
 * report on @node, -1 if there is none; -2 if move_pages() fails. Their
 * nodes go to @status.
 */
static long hmm_off_node(char *addr, __u64 npages, size_t page_size,
			 int node, int *status)
{
	void *pages[HMM_SMALL_NPAGES];
	__u64 i;

	if (npages > HMM_SMALL_NPAGES)
		return -2;
	for (i = 0; i < npages; i++) {
		pages[i] = addr + i * page_size;
		status[i] = -1;
	}
	if (syscall(SYS_move_pages, 0, npages, pages, NULL, status, 0))
		return -2;
	for (i = 0; i < npages; i++)
		if (status[i] != node)
			return i;
	return -1;
}

/*
 * Memory bound to one NUMA node (mbind(MPOL_BIND)) comes back from the
 * device to that node, by MIGRATE_TO_SYS and by a CPU fault (device-private
 * memory: device-coherent pages do not move for the CPU), for each of two
 * nodes.
 */
TEST_F(hmm, migrate_numa_bind)
{
	int nodes[2], status[HMM_SMALL_NPAGES];
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	unsigned long mask;
	unsigned int n, cpu;
	__u32 seed;
	long bad;

	if (!hmm_two_nodes(nodes))
		SKIP(return, "fewer than two NUMA nodes with memory in %s/has_memory",
		     HMM_NODE_DIR);

	for (n = 0; n < 2; n++) {
		for (cpu = 0; cpu < 2; cpu++) {
			const char *how = cpu ? "CPU fault" : "MIGRATE_TO_SYS";

			if (cpu && variant->coherent)
				continue;
			seed = 0x40de + 2 * n + cpu;
			ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_SMALL_NPAGES, 0);
			mask = 1UL << nodes[n];
			ASSERT_EQ(0, syscall(SYS_mbind, b.ptr, b.size,
					     MPOL_BIND, &mask, 8 * sizeof(mask),
					     0))
				TH_LOG("mbind(): %s", strerror(errno));
			hmm_fill(b.ptr, b.size, seed);
			bad = hmm_off_node(b.ptr, b.npages, self->page_size,
					   nodes[n], status);
			ASSERT_EQ(-1, bad)
				TH_LOG("node %d: page %ld allocated on node %d",
				       nodes[n], bad,
				       bad < 0 ? -1 : status[bad]);

			ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV,
				       b.ptr, b.mirror, b.npages, &cmd);
			if (cpu) {
				ASSERT_EQ(-1, hmm_check(b.ptr, b.size, seed));
			} else {
				ASSERT_CMD_ALL(self->fd,
					       HMM_DMIRROR_MIGRATE_TO_SYS,
					       b.ptr, NULL, b.npages, &cmd);
			}
			bad = hmm_off_node(b.ptr, b.npages, self->page_size,
					   nodes[n], status);
			ASSERT_EQ(-1, bad)
				TH_LOG("node %d, %s: page %ld came back to node %d",
				       nodes[n], how, bad,
				       bad < 0 ? -1 : status[bad]);
			ASSERT_EQ(-1, hmm_check(b.ptr, b.size, seed));
			hmm_buffer_free(&b);
		}
	}
}

/*
 * Device memory belongs to the device, not to the file that migrated the
 * pages: once that file is closed they are still in device memory, as
 * another file of the device sees, and the CPU reads their data.
 */
TEST_F(hmm, migrate_close)
{
	unsigned char local = hmm_local(variant->coherent);
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	int fd;

	fd = hmm_open(variant->device);
	ASSERT_LE(0, fd);
	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0xc105e);

	ASSERT_CMD_ALL(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
		       b.npages, &cmd);
	ASSERT_EQ(0, close(fd));

	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			local | HMM_DMIRROR_PROT_WRITE) TH_LOG("closed");
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0xc105e));
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			hmm_cpu_touched(variant->coherent)) TH_LOG("CPU read");

	hmm_buffer_free(&b);
}

/*
 * Body of the child of migrate_exit: migrate @npages pages holding @seed to
 * a device of its own, and exit with them there and the file open. Returns
 * its exit status: 0 on success.
 */
static int hmm_child_migrate(int device, __u64 npages, __u32 seed)
{
	struct hmm_dmirror_cmd cmd;
	int fd = hmm_open(device);
	struct hmm_buffer b;

	if (fd < 0 || hmm_buffer_map(&b, HMM_ANON, npages, seed))
		return 1;
	return hmm_cmd_all(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
			   npages, &cmd) ? 2 : 0;
}

/*
 * A process that exits with pages in device memory frees them: evicting the
 * device's memory afterwards finds no page held (it would fail with EBUSY),
 * and the device keeps working for the processes left.
 */
TEST_F(hmm, migrate_exit)
{
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	pid_t pid;

	pid = hmm_fork();
	ASSERT_LE(0, pid);
	if (!pid)
		_exit(hmm_child_migrate(variant->device, HMM_NPAGES, 0xe71));
	ASSERT_CHILD_EXIT(pid, 0);
	ASSERT_EQ(0, hmm_ioctl(self->fd, HMM_DMIRROR_RELEASE, NULL))
		TH_LOG("device memory left held by the child");

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0xe72);
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0xe72, &cmd);
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_READ, &b, 0xe72, &cmd);

	hmm_buffer_free(&b);
}

/* --- Many devices: settings, statistics and invalidation --------------- */

/* The device-private devices of the module's default private_devices=8. */
static const int hmm_private_ids[] = { 0, 1, 4, 5, 6, 7, 8, 9 };

#define HMM_NPRIVATE		ARRAY_SIZE(hmm_private_ids)
#define HMM_MS			1000000ULL	/* in ns */

static int hmm_get_settings(int fd, struct hmm_dmirror_settings *set)
{
	return hmm_ioctl(fd, HMM_DMIRROR_GET_SETTINGS, set);
}

static int hmm_set_settings(int fd, const struct hmm_dmirror_settings *set)
{
	return hmm_ioctl(fd, HMM_DMIRROR_SET_SETTINGS, (void *)set);
}

/*
 * NULL if the first @n devices of hmm_private_ids exist, else the reason in
 * @why.
 */
static const char *hmm_private_missing(unsigned int n, char *why, size_t len)
{
	char path[32];
	unsigned int i;

	for (i = 0; i < n; i++) {
		hmm_dev_path(path, sizeof(path), hmm_private_ids[i]);
		if (access(path, F_OK)) {
			snprintf(why, len,
				 "no %s: load test_hmm with private_devices=%u or more",
				 path, n);
			return why;
		}
	}
	return NULL;
}

/*
 * Settings belong to a device, which every test shares: a test saves them
 * before changing them, and its fixture's teardown puts them back.
 */
struct hmm_saved_settings {
	struct hmm_dmirror_settings	set[HMM_NPRIVATE];
	bool				saved[HMM_NPRIVATE];
};

/*
 * Open device hmm_private_ids[@idx] and give the device @set (if not NULL),
 * having saved its settings in @saved unless they already are. The new file
 * has not faulted anything yet, so its mirror follows @set. Returns it, or
 * -1.
 */
static int hmm_open_set(struct hmm_saved_settings *saved, unsigned int idx,
			const struct hmm_dmirror_settings *set)
{
	int fd = hmm_open(hmm_private_ids[idx]);
	int ret = 0;

	if (fd < 0)
		return -1;
	if (!saved->saved[idx]) {
		ret = hmm_get_settings(fd, &saved->set[idx]);
		saved->saved[idx] = !ret;
	}
	if (!ret && set)
		ret = hmm_set_settings(fd, set);
	if (!ret)
		return fd;
	fprintf(stderr, "# settings of device %d: %s\n", hmm_private_ids[idx],
		strerror(-ret));
	close(fd);
	return -1;
}

/*
 * hmm_open_set() for the first @n devices, with @set, or @odd for the odd
 * ones (1, 4, ... of hmm_private_ids) if it is not NULL: false once one
 * fails.
 */
static bool hmm_open_set_n(struct hmm_saved_settings *saved, int *fds,
			   unsigned int n,
			   const struct hmm_dmirror_settings *set,
			   const struct hmm_dmirror_settings *odd)
{
	unsigned int i;

	for (i = 0; i < n; i++) {
		fds[i] = hmm_open_set(saved, i, i % 2 && odd ? odd : set);
		if (fds[i] < 0)
			return false;
	}
	return true;
}

/*
 * hmm_mirror_all() - have each of the @n devices @fd fault all of @b in:
 * one READ each, which must do every page in exactly one fault
 *
 * Return: the index in @fd of the first device that did not, printed; -1
 * if all did.
 */
static int hmm_mirror_all(const int *fd, unsigned int n, struct hmm_buffer *b)
{
	struct hmm_dmirror_cmd cmd;
	unsigned int d;

	for (d = 0; d < n; d++) {
		if (hmm_cmd_all(fd[d], HMM_DMIRROR_READ, b->ptr, b->mirror,
				b->npages, &cmd))
			break;
		if (cmd.faults == 1)
			continue;
		fprintf(stderr, "# %llu faults\n", cmd.faults);
		break;
	}
	if (d == n)
		return -1;
	fprintf(stderr, "# device %d did not mirror the buffer\n",
		hmm_private_ids[d]);
	return d;
}

/* ASSERT_MIRROR_ALL() - assert that hmm_mirror_all() found no failure. */
#define ASSERT_MIRROR_ALL(fd, n, b) ASSERT_EQ(-1, hmm_mirror_all(fd, n, b))

/*
 * Open each of the first @n private devices, into @fds if it is not NULL,
 * and have it READ all of @b (a forked child's mirrors): 0, or -1 once one
 * could not, printed. The files stay open.
 */
static int hmm_mirror_on(unsigned int n, struct hmm_buffer *b, int *fds)
{
	struct hmm_dmirror_cmd cmd;
	unsigned int i;
	int fd;

	for (i = 0; i < n; i++) {
		fd = hmm_open(hmm_private_ids[i]);
		if (fd < 0 || hmm_cmd_all(fd, HMM_DMIRROR_READ, b->ptr,
					  b->mirror, b->npages, &cmd))
			return -1;
		if (fds)
			fds[i] = fd;
	}
	return 0;
}

/* Put back the settings @saved holds: the number of devices that failed. */
static int hmm_restore_settings(struct hmm_saved_settings *saved)
{
	unsigned int idx;
	int fd, failed = 0;

	for (idx = 0; idx < HMM_NPRIVATE; idx++) {
		if (!saved->saved[idx])
			continue;
		fd = hmm_open(hmm_private_ids[idx]);
		if (fd < 0 || hmm_set_settings(fd, &saved->set[idx])) {
			fprintf(stderr, "# could not restore the settings of device %d\n",
				hmm_private_ids[idx]);
			failed++;
		} else {
			saved->saved[idx] = false;
		}
		if (fd >= 0)
			close(fd);
	}
	return failed;
}

/*
 * The notifiers device @id has now, read through a new file; -1 on error.
 * Call it once every mirror of the device is closed or idle.
 */
static long long hmm_live_notifiers(int id)
{
	struct hmm_dmirror_stats stats;
	int fd, ret;

	fd = hmm_open(id);
	if (fd < 0)
		return -1;
	ret = hmm_stats(fd, &stats);
	close(fd);
	return ret ? -1 : (long long)stats.notifiers_live;
}

/* Flush latency of hmm_inval: long enough for flushes to surely overlap. */
#define HMM_INVAL_LATENCY_NS	(20 * HMM_MS)

/* Every private device mirrors this process, in each model and mode. */
FIXTURE(hmm_inval)
{
	int				fd[HMM_NPRIVATE];
	size_t				page_size;
	struct hmm_saved_settings	saved;
};

FIXTURE_VARIANT(hmm_inval)
{
	__u32	notifier_model;
	__u32	invalidation;
};

FIXTURE_VARIANT_ADD(hmm_inval, whole_single_pass)
{
	.notifier_model = HMM_DMIRROR_NOTIFIER_WHOLE,
	.invalidation = HMM_DMIRROR_SINGLE_PASS,
};

FIXTURE_VARIANT_ADD(hmm_inval, whole_two_pass)
{
	.notifier_model = HMM_DMIRROR_NOTIFIER_WHOLE,
	.invalidation = HMM_DMIRROR_TWO_PASS,
};

FIXTURE_VARIANT_ADD(hmm_inval, per_leaf_single_pass)
{
	.notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
	.invalidation = HMM_DMIRROR_SINGLE_PASS,
};

FIXTURE_VARIANT_ADD(hmm_inval, per_leaf_two_pass)
{
	.notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
	.invalidation = HMM_DMIRROR_TWO_PASS,
};

FIXTURE_SETUP(hmm_inval)
{
	const struct hmm_dmirror_settings set = {
		.notifier_model = variant->notifier_model,
		.invalidation = variant->invalidation,
		.flush_latency_ns = HMM_INVAL_LATENCY_NS,
		.leaf_size = HMM_LEAF_SIZE,
	};
	char why[128];
	bool ok;

	self->page_size = sysconf(_SC_PAGESIZE);
	if (hmm_private_missing(HMM_NPRIVATE, why, sizeof(why)))
		SKIP(return, "%s", why);
	ok = hmm_open_set_n(&self->saved, self->fd, HMM_NPRIVATE, &set, NULL);
	/* Teardown runs only after a setup that succeeded. */
	if (!ok)
		hmm_restore_settings(&self->saved);
	ASSERT_TRUE(ok);
}

/* In the parent, so that it runs even if the test crashed. */
FIXTURE_TEARDOWN_PARENT(hmm_inval)
{
	EXPECT_EQ(0, hmm_restore_settings(&self->saved));
}

/*
 * Fork a child that holds a copy-on-write share of @buf until @hold[1] is
 * closed; -1 on failure, else its pid.
 */
static pid_t hmm_fork_holder(char *buf, __u64 npages, size_t page_size,
			     __u32 seed, int hold[2])
{
	pid_t pid;

	if (pipe2(hold, O_CLOEXEC))
		return -1;
	pid = hmm_fork();
	if (!pid) {
		close(hold[1]);
		_exit(hmm_child_hold(hold[0], buf, npages, page_size, seed));
	}
	close(hold[0]);
	return pid;
}

/* Close @hold and reap @pid: 0 if the child exited with status 0. */
static int hmm_reap_holder(pid_t pid, int hold[2])
{
	int status;

	close(hold[1]);
	if (hmm_waitpid(pid, &status) != pid || !WIFEXITED(status))
		return -1;
	return WEXITSTATUS(status);
}

/* CPU operations that change how a mirrored buffer is mapped. */
enum hmm_cpu_op {
	HMM_CPU_MUNMAP,
	HMM_CPU_MPROTECT,	/* mprotect(PROT_READ) */
	HMM_CPU_DONTNEED,	/* madvise(MADV_DONTNEED) */
	HMM_CPU_COW,		/* fork(), then the parent writes */
};

static const struct {
	const char	*name;
	enum hmm_cpu_op	op;
	unsigned int	event;	/* HMM_DMIRROR_EVENT_* the kernel sends */
} hmm_cpu_ops[] = {
	{ "munmap", HMM_CPU_MUNMAP, HMM_DMIRROR_EVENT_UNMAP },
	{ "mprotect(PROT_READ)", HMM_CPU_MPROTECT,
	  HMM_DMIRROR_EVENT_PROTECTION_VMA },
	{ "MADV_DONTNEED", HMM_CPU_DONTNEED, HMM_DMIRROR_EVENT_CLEAR },
	/* fork() write-protects the parent's pages for copy on write. */
	{ "CPU write after fork", HMM_CPU_COW,
	  HMM_DMIRROR_EVENT_PROTECTION_PAGE },
};

/*
 * Every device mirrors a buffer, then one CPU operation changes its mapping.
 * Each device is told, with the event the kernel sends for that operation,
 * and none keeps using the old mapping: after munmap() they fail with
 * EFAULT; after mprotect(PROT_READ) they cannot write, and fault again to
 * read the same data; after MADV_DONTNEED they fault again and read zeros;
 * after the parent wrote pages shared with a forked child, they fault again
 * and read the parent's new data, while the child keeps the old.
 */
TEST_F(hmm_inval, cpu_op_refault)
{
	struct hmm_dmirror_stats stats;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	int hold[2], ret;
	unsigned int i, d;
	__u32 seed;
	pid_t pid;
	long bad;

	for (i = 0; i < ARRAY_SIZE(hmm_cpu_ops); i++) {
		const char *name = hmm_cpu_ops[i].name;
		enum hmm_cpu_op op = hmm_cpu_ops[i].op;

		seed = 0x1e0 + i;
		ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, seed);
		ASSERT_MIRROR_ALL(self->fd, HMM_NPRIVATE, &b);
		for (d = 0; d < HMM_NPRIVATE; d++)
			ASSERT_EQ(0, hmm_stats_reset(self->fd[d]));

		pid = -1;
		switch (op) {
		case HMM_CPU_MUNMAP:
			ASSERT_EQ(0, hmm_buffer_unmap(&b));
			break;
		case HMM_CPU_MPROTECT:
			ASSERT_EQ(0, mprotect(b.ptr, b.size, PROT_READ));
			break;
		case HMM_CPU_DONTNEED:
			ASSERT_EQ(0, madvise(b.ptr, b.size, MADV_DONTNEED));
			break;
		case HMM_CPU_COW:
			pid = hmm_fork_holder(b.ptr, b.npages, self->page_size,
					      seed, hold);
			ASSERT_LE(0, pid);
			seed ^= 0xc0e;
			hmm_fill(b.ptr, b.size, seed);
			break;
		}

		for (d = 0; d < HMM_NPRIVATE; d++) {
			ASSERT_EQ(0, hmm_stats(self->fd[d], &stats));
			ASSERT_LE(1ULL,
				  stats.invalidations[hmm_cpu_ops[i].event])
				TH_LOG("%s: device %d was not told", name,
				       hmm_private_ids[d]);
		}

		for (d = 0; d < HMM_NPRIVATE; d++) {
			int id = hmm_private_ids[d];

			memset(b.mirror, 0xa5, b.size);
			ret = hmm_cmd(self->fd[d], HMM_DMIRROR_READ, b.ptr,
				      b.mirror, b.npages, &cmd);
			if (op == HMM_CPU_MUNMAP) {
				ASSERT_EQ(-EFAULT, ret)
					TH_LOG("%s: device %d still reads",
					       name, id);
				continue;
			}
			ASSERT_EQ(0, ret) TH_LOG("%s: device %d", name, id);
			ASSERT_EQ(b.npages, cmd.cpages);
			ASSERT_EQ(1ULL, cmd.faults)
				TH_LOG("%s: device %d kept its mapping", name,
				       id);
			if (op == HMM_CPU_DONTNEED)
				bad = hmm_check_bytes(b.mirror, b.size, 0);
			else
				bad = hmm_check(b.mirror, b.size, seed);
			ASSERT_EQ(-1, bad)
				TH_LOG("%s: device %d read wrong data at %ld",
				       name, id, bad);
			if (op == HMM_CPU_MPROTECT) {
				ASSERT_EQ(-EPERM, hmm_cmd(self->fd[d],
							  HMM_DMIRROR_WRITE,
							  b.ptr, b.mirror,
							  b.npages, &cmd))
					TH_LOG("%s: device %d wrote", name, id);
			}
		}

		if (pid > 0)
			ASSERT_EQ(0, hmm_reap_holder(pid, hold))
				TH_LOG("%s: the child's copy", name);
		hmm_buffer_free(&b);
	}
}

/*
 * One munmap() of a range that every device mirrors within one leaf of its
 * page table: each device is told once and flushes once. In two passes all
 * of them start their flush before the first finish waits, so all the
 * flushes overlap; in a single pass each device waits for its flush before
 * the next is told, so none do. The driver's record of the munmap() says
 * which happened, whatever the flush latency and however slow the host:
 * the time is only printed.
 */
TEST_F(hmm_inval, flushes_in_flight)
{
	bool two_pass = variant->invalidation == HMM_DMIRROR_TWO_PASS;
	const __u32 ndev = HMM_NPRIVATE;
	struct hmm_dmirror_inval_record rec;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	__u64 t0, ns, mark;
	unsigned int d;

	ASSERT_BUFFER_MAP(&b, HMM_LEAF, 16, 0xf17);
	ASSERT_MIRROR_ALL(self->fd, HMM_NPRIVATE, &b);

	mark = hmm_inval_mark(self->fd[0]);
	t0 = hmm_now_ns();
	ASSERT_EQ(0, hmm_buffer_unmap(&b));
	ns = hmm_now_ns() - t0;

	ASSERT_EQ(0, hmm_inval_find(self->fd[0], b.ptr, b.size, self->page_size,
				    mark, HMM_DMIRROR_EVENT_UNMAP, &rec));
	ASSERT_EQ(ndev, rec.callbacks);
	ASSERT_EQ(ndev, rec.flushes);
	ASSERT_EQ(two_pass ? ndev : 0, rec.two_pass_starts);
	ASSERT_EQ(two_pass ? ndev : 0, rec.two_pass_finishes);
	ASSERT_EQ(0U, rec.sync_fallbacks);
	ASSERT_EQ(0U, rec.refused);
	ASSERT_EQ(two_pass ? ndev : 1, rec.overlapped)
		TH_LOG("flushes submitted before the first wait");
	TH_LOG("munmap() with %u devices: %llu ms", ndev, ns / HMM_MS);

	for (d = 0; d < HMM_NPRIVATE; d++) {
		ASSERT_EQ(-EFAULT, hmm_cmd(self->fd[d], HMM_DMIRROR_READ, b.ptr,
					   b.mirror, b.npages, &cmd))
			TH_LOG("device %d still reads", hmm_private_ids[d]);
	}
	hmm_buffer_free(&b);
}

static int hmm_hold(int fd, __u32 op, __u32 point, void *addr, __u64 npages)
{
	struct hmm_dmirror_hold hold = {
		.op = op,
		.point = point,
		.addr = (uintptr_t)addr,
		.npages = npages,
	};

	return hmm_ioctl(fd, HMM_DMIRROR_HOLD, &hold);
}

/*
 * A job run by a thread of its own that waits, once started, until told to
 * go: the thread exists (its stack is mapped) before the job has to run in
 * a window where the test must not take the mmap lock for writing.
 */
struct hmm_job {
	pthread_t		thread;
	pthread_barrier_t	ready;
	int			go[2];
	int			(*fn)(void *arg);
	void			*arg;
	pid_t			tid;
	int			ret;	/* of fn */
	int			done;	/* fn returned; atomic */
};

static void *hmm_job_thread(void *arg)
{
	struct hmm_job *job = arg;
	char c;

	job->tid = syscall(SYS_gettid);
	pthread_barrier_wait(&job->ready);
	while (read(job->go[0], &c, 1) < 0 && errno == EINTR)
		;
	job->ret = job->fn(job->arg);
	__atomic_store_n(&job->done, 1, __ATOMIC_RELEASE);
	return NULL;
}

/* Start the thread of @job, to run @fn(@arg) at hmm_job_go(). */
static int hmm_job_start(struct hmm_job *job, int (*fn)(void *), void *arg)
{
	job->fn = fn;
	job->arg = arg;
	job->done = 0;
	if (pipe(job->go))
		return -errno;
	if (pthread_barrier_init(&job->ready, NULL, 2) ||
	    pthread_create(&job->thread, NULL, hmm_job_thread, job))
		return -EAGAIN;
	pthread_barrier_wait(&job->ready);
	return 0;
}

static void hmm_job_go(struct hmm_job *job)
{
	close(job->go[1]);
}

static bool hmm_job_done(struct hmm_job *job)
{
	return __atomic_load_n(&job->done, __ATOMIC_ACQUIRE);
}

/* Wait for the job to end: what its function returned. */
static int hmm_job_join(struct hmm_job *job)
{
	pthread_join(job->thread, NULL);
	close(job->go[0]);
	pthread_barrier_destroy(&job->ready);
	return job->ret;
}

/*
 * Whether thread @tid of this process sleeps uninterruptibly ("D" in its
 * /proc stat), as one waiting in mmu_interval_read_begin() does. Plain
 * system calls and a stack buffer: nothing here takes the mmap lock.
 */
static bool hmm_thread_blocked(pid_t tid)
{
	char path[64], buf[512], *p;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", tid);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return false;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return false;
	buf[n] = '\0';
	p = strrchr(buf, ')');
	return p && p[1] == ' ' && p[2] == 'D';
}

/* A device read of a buffer, as a job. */
struct hmm_read_job {
	int			fd;
	char			*buf;
	char			*mirror;
	__u64			npages;
	struct hmm_dmirror_cmd	cmd;
};

static int hmm_read_job_fn(void *arg)
{
	struct hmm_read_job *r = arg;

	return hmm_cmd(r->fd, HMM_DMIRROR_READ, r->buf, r->mirror, r->npages,
		       &r->cmd);
}

/* CPU operations that invalidate a range and keep its VMA. */
struct hmm_held_op {
	char		*buf;
	size_t		size;
	enum hmm_cpu_op	op;
	__u32		seed;	/* HMM_CPU_COW: the parent's new data */
};

static int hmm_held_op_fn(void *arg)
{
	struct hmm_held_op *o = arg;

	if (o->op == HMM_CPU_DONTNEED)
		return madvise(o->buf, o->size, MADV_DONTNEED) ? -errno : 0;
	hmm_fill(o->buf, o->size, o->seed);
	return 0;
}

static const struct {
	const char	*name;
	enum hmm_cpu_op	op;
} hmm_held_ops[] = {
	{ "MADV_DONTNEED", HMM_CPU_DONTNEED },
	{ "CPU write after fork", HMM_CPU_COW },
};

/*
 * Set up @o, hmm_held_ops[@i] on @b, which holds the pattern @seed, and the
 * read job @r to read @b into its mirror buffer.
 */
static void hmm_held_op_init(struct hmm_held_op *o, struct hmm_read_job *r,
			     struct hmm_buffer *b, unsigned int i, __u32 seed)
{
	*o = (struct hmm_held_op){
		.buf = b->ptr,
		.size = b->size,
		.op = hmm_held_ops[i].op,
		.seed = seed ^ 0xc0e,
	};
	r->buf = b->ptr;
	r->mirror = b->mirror;
}

/*
 * The first byte of @mirror, a device read of @len bytes at the start of
 * the buffer, that differs from what the CPU has there after @o; -1 if none.
 */
static long hmm_held_op_check(const struct hmm_held_op *o, const char *mirror,
			      size_t len)
{
	if (o->op == HMM_CPU_DONTNEED)
		return hmm_check_bytes(mirror, len, 0);
	return hmm_check(mirror, len, o->seed);
}

/*
 * Read all of @o's buffer through @fd into @mirror: as hmm_held_op_check(),
 * or -2 if the read failed.
 */
static long hmm_held_op_reread(int fd, const struct hmm_held_op *o,
			       char *mirror, __u64 npages)
{
	struct hmm_dmirror_cmd cmd;

	if (hmm_cmd(fd, HMM_DMIRROR_READ, o->buf, mirror, npages, &cmd) ||
	    cmd.cpages != npages)
		return -2;
	return hmm_held_op_check(o, mirror, o->size);
}

/*
 * The end of a round of a hold test, @name: a second read of all of @b
 * through @fd gives what the CPU has after @o (nothing stale stayed in the
 * device page table), the driver's check of the core found no stale
 * install, and the child @pid, if there is one, kept its copy. @b is freed.
 */
static void hmm_held_op_end(struct __test_metadata *_metadata, int fd,
			    const struct hmm_held_op *o, struct hmm_buffer *b,
			    const char *name, pid_t pid, int hold[2])
{
	struct hmm_dmirror_stats stats;
	long bad;

	bad = hmm_held_op_reread(fd, o, b->mirror, b->npages);
	ASSERT_EQ(-1, bad)
		TH_LOG("%s: the device kept a stale page at %ld", name, bad);
	ASSERT_EQ(0, hmm_stats(fd, &stats));
	ASSERT_EQ(0ULL, stats.stale_installs) TH_LOG("%s", name);
	if (pid > 0)
		ASSERT_EQ(0, hmm_reap_holder(pid, hold)) TH_LOG("%s", name);
	hmm_buffer_free(b);
}

/*
 * A device fault is held after hmm_range_fault() read the CPU page table
 * and before the driver checks mmu_interval_read_retry(); meanwhile the CPU
 * drops the pages (MADV_DONTNEED) or replaces them (copy on write after
 * fork()). Released, the fault must see the collision and run again
 * (fault_retries), read the CPU's new data, and leave nothing stale in the
 * device page table: a second read gives the same data, and the driver's
 * own check of the core (stale_installs) found nothing.
 */
TEST_F(hmm_inval, hold_fault_vs_cpu_op)
{
	const __u64 npages = HMM_NPAGES;
	struct hmm_read_job r = { .fd = self->fd[0], .npages = npages };
	struct hmm_dmirror_stats stats;
	struct hmm_buffer b;
	struct hmm_held_op o;
	struct hmm_job job;
	unsigned int i;
	int hold[2];
	__u32 seed;
	pid_t pid;
	long bad;

	for (i = 0; i < ARRAY_SIZE(hmm_held_ops); i++) {
		const char *name = hmm_held_ops[i].name;

		seed = 0x401d + i;
		ASSERT_BUFFER_MAP(&b, HMM_ANON, npages, seed);
		hmm_held_op_init(&o, &r, &b, i, seed);
		ASSERT_EQ(0, hmm_stats_reset(self->fd[0]));
		pid = -1;

		ASSERT_EQ(0, hmm_job_start(&job, hmm_read_job_fn, &r));
		ASSERT_EQ(0, hmm_hold(self->fd[0], HMM_DMIRROR_HOLD_ARM,
				      HMM_DMIRROR_HOLD_FAULT, o.buf, npages));
		hmm_job_go(&job);
		ASSERT_EQ(0, hmm_hold(self->fd[0], HMM_DMIRROR_HOLD_WAIT, 0,
				      NULL, 0)) TH_LOG("%s", name);
		if (o.op == HMM_CPU_COW) {
			pid = hmm_fork_holder(o.buf, npages, self->page_size,
					      seed, hold);
			ASSERT_LE(0, pid);
		}
		ASSERT_EQ(0, hmm_held_op_fn(&o)) TH_LOG("%s", name);
		ASSERT_EQ(0, hmm_hold(self->fd[0], HMM_DMIRROR_HOLD_RELEASE, 0,
				      NULL, 0));
		ASSERT_EQ(0, hmm_job_join(&job)) TH_LOG("%s", name);
		ASSERT_EQ(npages, r.cmd.cpages);

		bad = hmm_held_op_check(&o, r.mirror, b.size);
		ASSERT_EQ(-1, bad)
			TH_LOG("%s: the held fault read old data at %ld", name,
			       bad);
		ASSERT_EQ(0, hmm_stats(self->fd[0], &stats));
		ASSERT_LE(1ULL, stats.fault_retries)
			TH_LOG("%s: the held fault did not run again", name);
		ASSERT_EQ(0ULL, stats.stale_installs) TH_LOG("%s", name);
		hmm_held_op_end(_metadata, self->fd[0], &o, &b, name, pid,
				hold);
	}
}

/*
 * An invalidation is held in the driver's callback, after it published the
 * new sequence and before the CPU page table changes (two pass: before any
 * invalidate_finish()). A device fault of the range that begins then must
 * wait in mmu_interval_read_begin() until the invalidation ends, so the
 * test lets the invalidation go once the fault is blocked (or, were the
 * core broken, done). The fault then reads what the CPU maps after the
 * operation, and a second read finds the same: no stale page was installed.
 */
TEST_F(hmm_inval, hold_invalidate_vs_fault)
{
	/* One page: the fault must not collide with every page's COW. */
	struct hmm_read_job r = { .fd = self->fd[0], .npages = 1 };
	const __u64 npages = HMM_NPAGES;
	struct hmm_job reader, cpu;
	struct hmm_held_op o;
	struct hmm_buffer b;
	int hold[2];
	unsigned int i;
	pid_t pid;

	for (i = 0; i < ARRAY_SIZE(hmm_held_ops); i++) {
		const char *name = hmm_held_ops[i].name;
		__u32 seed = 0x1a7e + i;

		ASSERT_BUFFER_MAP(&b, HMM_ANON, npages, seed);
		hmm_held_op_init(&o, &r, &b, i, seed);
		pid = -1;
		if (o.op == HMM_CPU_COW) {
			pid = hmm_fork_holder(o.buf, npages, self->page_size,
					      seed, hold);
			ASSERT_LE(0, pid);
		}
		/*
		 * The first page is mirrored, after fork(), whose write
		 * protection empties the device page table: in the per-leaf
		 * model an emptied leaf goes with its notifier, and the
		 * operation would not be told. Only that page: each page the
		 * operation took from the device would cost a flush, and
		 * the fault collides with every one.
		 */
		ASSERT_EQ(0, hmm_read_job_fn(&r));
		ASSERT_EQ(0, hmm_stats_reset(self->fd[0]));

		ASSERT_EQ(0, hmm_job_start(&reader, hmm_read_job_fn, &r));
		ASSERT_EQ(0, hmm_job_start(&cpu, hmm_held_op_fn, &o));
		ASSERT_EQ(0, hmm_hold(self->fd[0], HMM_DMIRROR_HOLD_ARM,
				      HMM_DMIRROR_HOLD_INVALIDATE, o.buf,
				      npages));
		hmm_job_go(&cpu);
		ASSERT_EQ(0, hmm_hold(self->fd[0], HMM_DMIRROR_HOLD_WAIT, 0,
				      NULL, 0)) TH_LOG("%s", name);
		hmm_job_go(&reader);
		while (!hmm_job_done(&reader) && !hmm_thread_blocked(reader.tid))
			sched_yield();
		ASSERT_EQ(0, hmm_hold(self->fd[0], HMM_DMIRROR_HOLD_RELEASE, 0,
				      NULL, 0));
		ASSERT_EQ(0, hmm_job_join(&cpu)) TH_LOG("%s", name);
		ASSERT_EQ(0, hmm_job_join(&reader)) TH_LOG("%s", name);
		ASSERT_EQ(1ULL, r.cmd.cpages);
		if (o.op == HMM_CPU_DONTNEED) {
			/* The page was dropped before the fault could read. */
			ASSERT_EQ(-1, hmm_held_op_check(&o, r.mirror,
							self->page_size))
				TH_LOG("%s: the fault read a dropped page",
				       name);
		}

		hmm_held_op_end(_metadata, self->fd[0], &o, &b, name, pid,
				hold);
	}
}

/* Every two-pass start of device @fd's had its finish, and the pool is full. */
static const char *hmm_finishes_balanced(int fd, struct hmm_dmirror_stats *stats)
{
	if (hmm_stats(fd, stats))
		return "no stats";
	if (stats->two_pass_starts != stats->two_pass_finishes)
		return "a two-pass start had no finish";
	if (stats->finish_free != stats->finish_pool)
		return "finish objects are missing from the pool";
	return NULL;
}

/* Mirror @npages pages on each private device, then exit with the files open. */
static int hmm_child_mirror_exit(__u64 npages)
{
	struct hmm_buffer b;

	if (hmm_buffer_map(&b, HMM_ANON, npages, 0xe5))
		return 1;
	return hmm_mirror_on(HMM_NPRIVATE, &b, NULL) ? 2 : 0;
}

/* Rounds of exit_finishes to wait for a release that reaches the devices. */
#define HMM_EXIT_RELEASE_TRIES	5

/*
 * A process mirrors memory on every device and exits with its files open:
 * exit_mmap() tells every mirror (MMU_NOTIFY_RELEASE) before the files are
 * closed. Every two-pass start of that release had its finish, and every
 * device has all its finish objects back. Should the process's last mm
 * reference be dropped by someone else after its files closed, nothing was
 * mirrored any more and the round is run again.
 */
TEST_F(hmm_inval, exit_finishes)
{
	bool two_pass = variant->invalidation == HMM_DMIRROR_TWO_PASS;
	struct hmm_dmirror_stats stats;
	unsigned int d, released = 0, round;
	const char *why;
	pid_t pid;

	for (round = 0; round < HMM_EXIT_RELEASE_TRIES && released < HMM_NPRIVATE;
	     round++) {
		for (d = 0; d < HMM_NPRIVATE; d++)
			ASSERT_EQ(0, hmm_stats_reset(self->fd[d]));
		pid = hmm_fork();
		ASSERT_LE(0, pid);
		if (!pid)
			_exit(hmm_child_mirror_exit(HMM_NPAGES));
		ASSERT_CHILD_EXIT(pid, 0);

		released = 0;
		for (d = 0; d < HMM_NPRIVATE; d++) {
			why = hmm_finishes_balanced(self->fd[d], &stats);
			ASSERT_EQ(NULL, why)
				TH_LOG("device %d: %s (%llu starts, %llu finishes, %llu/%llu free)",
				       hmm_private_ids[d], why,
				       stats.two_pass_starts,
				       stats.two_pass_finishes,
				       stats.finish_free, stats.finish_pool);
			if (!stats.invalidations[HMM_DMIRROR_EVENT_RELEASE])
				continue;
			released++;
			ASSERT_EQ(two_pass, stats.two_pass_starts > 0)
				TH_LOG("device %d: %llu two-pass starts",
				       hmm_private_ids[d],
				       stats.two_pass_starts);
		}
	}
	if (released < HMM_NPRIVATE)
		SKIP(return, "the exit's release reached %u of %zu devices in %u rounds",
		     released, HMM_NPRIVATE, round);
}

/* Tests that give the private devices settings of their own. */
FIXTURE(hmm_config)
{
	size_t				page_size;
	struct hmm_saved_settings	saved;
	char				cgroup[64];	/* to remove, if set */
	bool				memory_enabled;	/* to disable */
};

FIXTURE_SETUP(hmm_config)
{
	self->page_size = sysconf(_SC_PAGESIZE);
}

#define HMM_CGROUP_ROOT		"/sys/fs/cgroup"
#define HMM_SUBTREE_CONTROL	HMM_CGROUP_ROOT "/cgroup.subtree_control"

/* In the parent, so that it runs even if the test crashed. */
FIXTURE_TEARDOWN_PARENT(hmm_config)
{
	/*
	 * The braces keep the log of a check to its own failure: a failed
	 * test leaves the harness's trigger set for the next check.
	 */
	if (self->cgroup[0] && rmdir(self->cgroup) && errno != ENOENT) {
		EXPECT_EQ(0, -errno)
			TH_LOG("rmdir %s", self->cgroup);
	}
	if (self->memory_enabled) {
		EXPECT_EQ(0, hmm_write_str(HMM_SUBTREE_CONTROL, "-memory"))
			TH_LOG("could not disable the memory controller");
	}
	EXPECT_EQ(0, hmm_restore_settings(&self->saved));
}

/*
 * A two-pass device that finds no free finish object does all of the
 * invalidation in its start, synchronously, and the device is cut off from
 * the range all the same. FAIL_NEXT_FINISH makes that happen once: the next
 * invalidation takes two passes again. Settings read back without the flag.
 */
TEST_F(hmm_config, fail_next_finish)
{
	struct hmm_dmirror_settings got, set = {
		.notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
		.invalidation = HMM_DMIRROR_TWO_PASS,
		.flush_latency_ns = HMM_MS,
		.leaf_size = HMM_LEAF_SIZE,
	};
	struct hmm_dmirror_inval_record rec;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	int fd, round;
	__u64 mark;

	fd = hmm_open_set(&self->saved, 0, &set);
	ASSERT_LE(0, fd);

	for (round = 0; round < 2; round++) {
		bool armed = !round;

		/* Within one leaf: one notifier, one finish object. */
		ASSERT_BUFFER_MAP(&b, HMM_LEAF, 16, 0xf1 + round);
		ASSERT_EQ(0, hmm_cmd(fd, HMM_DMIRROR_READ, b.ptr, b.mirror,
				     b.npages, &cmd));
		ASSERT_EQ(1ULL, cmd.faults);
		if (armed) {
			set.flags = HMM_DMIRROR_SETTING_FAIL_NEXT_FINISH;
			ASSERT_EQ(0, hmm_set_settings(fd, &set));
			set.flags = 0;
			ASSERT_EQ(0, hmm_get_settings(fd, &got));
			ASSERT_EQ(0, memcmp(&set, &got, sizeof(set)))
				TH_LOG("settings read back differ (flags 0x%x)",
				       got.flags);
		}
		mark = hmm_inval_mark(fd);
		ASSERT_EQ(0, hmm_buffer_unmap(&b));

		ASSERT_EQ(0, hmm_inval_find(fd, b.ptr, b.size, self->page_size,
					    mark, HMM_DMIRROR_EVENT_UNMAP,
					    &rec)) TH_LOG("round %d", round);
		ASSERT_EQ(1U, rec.callbacks) TH_LOG("round %d", round);
		ASSERT_EQ(1U, rec.flushes) TH_LOG("round %d", round);
		ASSERT_EQ(armed ? 1U : 0U, rec.sync_fallbacks)
			TH_LOG("round %d", round);
		ASSERT_EQ(armed ? 0U : 1U, rec.two_pass_starts)
			TH_LOG("round %d", round);
		ASSERT_EQ(armed ? 0U : 1U, rec.two_pass_finishes)
			TH_LOG("round %d", round);
		ASSERT_EQ(-EFAULT, hmm_cmd(fd, HMM_DMIRROR_READ, b.ptr,
					   b.mirror, b.npages, &cmd))
			TH_LOG("round %d: the device still reads", round);
		hmm_buffer_free(&b);
	}
	close(fd);
}

/* Flush latencies the driver polls for, and ones it sleeps for first. */
static const struct {
	const char	*name;
	__u32		invalidation;
	__u64		latency_ns;
} hmm_flush_wait_cases[] = {
	{ "single pass, 500 us", HMM_DMIRROR_SINGLE_PASS, HMM_MS / 2 },
	{ "single pass, 20 ms", HMM_DMIRROR_SINGLE_PASS, 20 * HMM_MS },
	{ "two pass, 500 us", HMM_DMIRROR_TWO_PASS, HMM_MS / 2 },
	{ "two pass, 20 ms", HMM_DMIRROR_TWO_PASS, 20 * HMM_MS },
};

/*
 * However the driver waits for a flush, sleeping first or only polling, the
 * wait ends no sooner than the flush: an munmap() of a range one device
 * mirrors takes at least the flush latency, in either mode. (Which waits
 * sleep depends on the machine's wake-ups: it is only printed.)
 */
TEST_F(hmm_config, flush_wait_latency)
{
	struct hmm_dmirror_settings set = {
		.notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
		.leaf_size = HMM_LEAF_SIZE,
	};
	struct hmm_dmirror_inval_record rec;
	struct hmm_dmirror_stats stats;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	unsigned int i;
	__u64 mark, ns;
	int fd;

	for (i = 0; i < ARRAY_SIZE(hmm_flush_wait_cases); i++) {
		const char *name = hmm_flush_wait_cases[i].name;

		set.invalidation = hmm_flush_wait_cases[i].invalidation;
		set.flush_latency_ns = hmm_flush_wait_cases[i].latency_ns;
		fd = hmm_open_set(&self->saved, 0, &set);
		ASSERT_LE(0, fd) TH_LOG("%s", name);
		ASSERT_BUFFER_MAP(&b, HMM_LEAF, 16, 0xf1a + i);
		ASSERT_EQ(0, hmm_cmd(fd, HMM_DMIRROR_READ, b.ptr, b.mirror,
				     b.npages, &cmd)) TH_LOG("%s", name);

		mark = hmm_inval_mark(fd);
		ns = hmm_now_ns();
		ASSERT_EQ(0, hmm_buffer_unmap(&b));
		ns = hmm_now_ns() - ns;
		ASSERT_EQ(0, hmm_inval_find(fd, b.ptr, b.size, self->page_size,
					    mark, HMM_DMIRROR_EVENT_UNMAP,
					    &rec)) TH_LOG("%s", name);
		ASSERT_EQ(1U, rec.flushes) TH_LOG("%s", name);
		ASSERT_LE(set.flush_latency_ns, ns)
			TH_LOG("%s: munmap() took %llu us", name, ns / 1000);
		ASSERT_EQ(0, hmm_stats(fd, &stats));
		TH_LOG("%s: munmap() %llu us, a wake-up costs %llu us here",
		       name, ns / 1000, stats.flush_wake_ns / 1000);
		close(fd);
		hmm_buffer_free(&b);
	}
}

#define HMM_MIXED_DEVICES	4U

/*
 * Devices in both modes mirror one range of one process. MADV_DONTNEED of
 * its first half and munmap() of its second reach each device its own way,
 * a single pass with a flush, or a start and a finish around the flush, and
 * none keeps the old pages: every device faults again and reads zeros in
 * the first half, and fails with EFAULT in the second.
 */
TEST_F(hmm_config, mixed_modes)
{
	struct hmm_dmirror_settings odd, set = {
		.notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
		.invalidation = HMM_DMIRROR_SINGLE_PASS,
		.flush_latency_ns = 2 * HMM_MS,
		.leaf_size = HMM_LEAF_SIZE,
	};
	const __u64 half = 16;
	size_t hsize = half * self->page_size;
	int fd[HMM_MIXED_DEVICES];
	struct hmm_dmirror_inval_record rec;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	char why[128];
	unsigned int d, op;
	__u64 mark;

	if (hmm_private_missing(HMM_MIXED_DEVICES, why, sizeof(why)))
		SKIP(return, "%s", why);
	odd = set;
	odd.invalidation = HMM_DMIRROR_TWO_PASS;
	ASSERT_TRUE(hmm_open_set_n(&self->saved, fd, HMM_MIXED_DEVICES, &set,
				   &odd));
	/* Within one leaf: one notifier call per device and operation. */
	ASSERT_BUFFER_MAP(&b, HMM_LEAF, 2 * half, 0x313);
	ASSERT_MIRROR_ALL(fd, HMM_MIXED_DEVICES, &b);

	mark = hmm_inval_mark(fd[0]);
	ASSERT_EQ(0, madvise(b.ptr, hsize, MADV_DONTNEED));
	ASSERT_EQ(0, munmap(b.ptr + hsize, b.size - hsize));

	/* Each operation: every device told once, half of them in two passes. */
	for (op = 0; op < 2; op++) {
		ASSERT_EQ(0, hmm_inval_find(fd[0], b.ptr + op * hsize, hsize,
					    self->page_size, mark,
					    op ? HMM_DMIRROR_EVENT_UNMAP :
						 HMM_DMIRROR_EVENT_CLEAR,
					    &rec)) TH_LOG("operation %u", op);
		ASSERT_EQ(HMM_MIXED_DEVICES, rec.callbacks);
		ASSERT_EQ(HMM_MIXED_DEVICES, rec.flushes);
		ASSERT_EQ(HMM_MIXED_DEVICES / 2, rec.two_pass_starts);
		ASSERT_EQ(HMM_MIXED_DEVICES / 2, rec.two_pass_finishes);
		ASSERT_EQ(0U, rec.sync_fallbacks);
	}

	for (d = 0; d < HMM_MIXED_DEVICES; d++) {
		int id = hmm_private_ids[d];

		memset(b.mirror, 0xa5, hsize);
		ASSERT_EQ(0, hmm_cmd(fd[d], HMM_DMIRROR_READ, b.ptr, b.mirror,
				     half, &cmd)) TH_LOG("device %d", id);
		ASSERT_EQ(1ULL, cmd.faults)
			TH_LOG("device %d kept its mapping", id);
		ASSERT_EQ(-1, hmm_check_bytes(b.mirror, hsize, 0))
			TH_LOG("device %d", id);
		ASSERT_EQ(-EFAULT, hmm_cmd(fd[d], HMM_DMIRROR_READ,
					   b.ptr + hsize, b.mirror,
					   b.npages - half, &cmd))
			TH_LOG("device %d still reads", id);
	}

	for (d = 0; d < HMM_MIXED_DEVICES; d++)
		close(fd[d]);
	hmm_buffer_free(&b);
}

#define HMM_EXIT_ROUNDS		4
#define HMM_EXIT_NPAGES		16
#define HMM_EXIT_WARMUP		2	/* loop rounds before the exit */

/* The thread of a child of exit_during_invalidation. */
struct hmm_exit_loop {
	pthread_barrier_t	running;
	const int		*fds;
	unsigned int		nfds;
	size_t			page_size;
	char			*mirror;
};

/* Map, mirror on every device and unmap a buffer, until the process exits. */
static void *hmm_exit_loop_fn(void *arg)
{
	struct hmm_exit_loop *loop = arg;
	size_t size = HMM_EXIT_NPAGES * loop->page_size;
	struct hmm_dmirror_cmd cmd;
	unsigned int round, i;
	char *buf;

	for (round = 0; ; round++) {
		if (round == HMM_EXIT_WARMUP)
			pthread_barrier_wait(&loop->running);
		buf = hmm_map_anon(size, PROT_READ | PROT_WRITE, MAP_PRIVATE);
		if (!buf)
			continue;
		hmm_fill(buf, size, round);
		for (i = 0; i < loop->nfds; i++)
			hmm_cmd(loop->fds[i], HMM_DMIRROR_READ, buf,
				loop->mirror, HMM_EXIT_NPAGES, &cmd);
		munmap(buf, size);
	}
	return NULL;
}

/*
 * Body of a child of exit_during_invalidation: mirror a buffer on @n
 * devices, start a thread that unmaps and mirrors buffers on them in a
 * loop, and exit while it is at it. Returns only on failure: its status.
 */
static int hmm_child_exit_busy(unsigned int n, size_t page_size)
{
	struct hmm_exit_loop loop = {
		.nfds = n,
		.page_size = page_size,
	};
	int fds[HMM_NPRIVATE];
	struct hmm_buffer b;
	pthread_t thread;

	loop.mirror = malloc(HMM_EXIT_NPAGES * page_size);
	if (!loop.mirror || hmm_buffer_map(&b, HMM_ANON, HMM_EXIT_NPAGES, 0xe1))
		return 2;
	if (hmm_mirror_on(n, &b, fds))
		return 3;
	loop.fds = fds;
	if (pthread_barrier_init(&loop.running, NULL, 2) ||
	    pthread_create(&thread, NULL, hmm_exit_loop_fn, &loop))
		return 4;
	pthread_barrier_wait(&loop.running);
	_exit(0);
}

/*
 * A process exits while a thread of it keeps unmapping ranges that devices
 * in two passes mirror, so that invalidations are in flight: it exits
 * normally, and every notifier of its mirrors is gone once it is reaped,
 * every two-pass start had its finish and the finish pools are full again.
 * Half of the devices have a notifier per leaf, half one for the whole
 * space.
 */
TEST_F(hmm_config, exit_during_invalidation)
{
	/* Even devices: a notifier per leaf; odd ones: one for all. */
	static const struct hmm_dmirror_settings set[2] = {
		{ .notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
		  .invalidation = HMM_DMIRROR_TWO_PASS,
		  .flush_latency_ns = 2 * HMM_MS, .leaf_size = HMM_LEAF_SIZE },
		{ .notifier_model = HMM_DMIRROR_NOTIFIER_WHOLE,
		  .invalidation = HMM_DMIRROR_TWO_PASS,
		  .flush_latency_ns = 2 * HMM_MS, .leaf_size = HMM_LEAF_SIZE },
	};
	struct hmm_dmirror_stats stats;
	int fd[HMM_NPRIVATE];
	unsigned int d, round;
	const char *why;
	char missing[128];
	pid_t pid;

	if (hmm_private_missing(HMM_NPRIVATE, missing, sizeof(missing)))
		SKIP(return, "%s", missing);
	ASSERT_TRUE(hmm_open_set_n(&self->saved, fd, HMM_NPRIVATE, &set[0],
				   &set[1]));
	for (d = 0; d < HMM_NPRIVATE; d++) {
		ASSERT_EQ(0, hmm_live_notifiers(hmm_private_ids[d]))
			TH_LOG("device %d: notifiers left by an earlier test",
			       hmm_private_ids[d]);
	}

	for (round = 0; round < HMM_EXIT_ROUNDS; round++) {
		pid = hmm_fork();
		ASSERT_LE(0, pid);
		if (!pid)
			_exit(hmm_child_exit_busy(HMM_NPRIVATE,
						  self->page_size));
		ASSERT_CHILD_EXIT(pid, 0) TH_LOG("round %u", round);
		for (d = 0; d < HMM_NPRIVATE; d++) {
			ASSERT_EQ(0, hmm_live_notifiers(hmm_private_ids[d]))
				TH_LOG("round %u: device %d: notifiers left by the child",
				       round, hmm_private_ids[d]);
			why = hmm_finishes_balanced(fd[d], &stats);
			ASSERT_EQ(NULL, why)
				TH_LOG("round %u: device %d: %s", round,
				       hmm_private_ids[d], why);
		}
	}
	for (d = 0; d < HMM_NPRIVATE; d++)
		close(fd[d]);
}

#define HMM_OOM_DEVICES		4
#define HMM_OOM_MEMORY_MAX	(64L << 20)
#define HMM_OOM_CHUNK		(4UL << 20)

/* Whether @word is one of the words of the small file @path. */
static bool hmm_file_has_word(const char *path, const char *word)
{
	char buf[512], *tok, *save;

	if (hmm_read_file(path, buf, sizeof(buf)))
		return false;
	for (tok = strtok_r(buf, "\n ", &save); tok;
	     tok = strtok_r(NULL, "\n ", &save))
		if (!strcmp(tok, word))
			return true;
	return false;
}

/* The value of the "@key value" line of @path, -1 if there is none. */
static long hmm_read_key(const char *path, const char *key)
{
	size_t klen = strlen(key);
	char buf[1024], *line, *save;

	if (hmm_read_file(path, buf, sizeof(buf)))
		return -1;
	for (line = strtok_r(buf, "\n", &save); line;
	     line = strtok_r(NULL, "\n", &save))
		if (!strncmp(line, key, klen) && line[klen] == ' ')
			return strtol(line + klen + 1, NULL, 10);
	return -1;
}

/*
 * Body of the child of oom_kill: move into the cgroup of @procs, mirror a
 * buffer on @n devices, then use memory until the OOM killer kills it.
 * Returns only on failure: its status.
 */
static int hmm_child_oom(const char *procs, unsigned int n)
{
	struct hmm_buffer b;
	char *p;

	if (hmm_write_long(procs, 0))
		return 1;
	if (hmm_buffer_map(&b, HMM_ANON, HMM_NPAGES, 0x00b))
		return 2;
	if (hmm_mirror_on(n, &b, NULL))
		return 3;
	for (;;) {
		p = hmm_map_anon(HMM_OOM_CHUNK, PROT_READ | PROT_WRITE,
				 MAP_PRIVATE);
		if (!p)
			return 5;
		memset(p, 0x5a, HMM_OOM_CHUNK);
	}
}

/*
 * A process whose devices mirror its memory in two passes, with flushes
 * that take time, is killed by the OOM killer of its memory cgroup. The
 * kill is a plain SIGKILL, and the process leaves no notifier behind.
 * Whether the OOM reaper gets to the process before it exits depends on
 * timing, so the devices' refusals of its non-blockable invalidations are
 * only reported here; reap_mirrored asserts them with process_mrelease().
 */
TEST_F(hmm_config, oom_kill)
{
	const struct hmm_dmirror_settings set = {
		.notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
		.invalidation = HMM_DMIRROR_TWO_PASS,
		.flush_latency_ns = 5 * HMM_MS,
		.leaf_size = HMM_LEAF_SIZE,
	};
	struct hmm_dmirror_stats stats;
	int fd[HMM_OOM_DEVICES], status, ret;
	char path[128], why[128];
	unsigned long long refused = 0;
	unsigned int d;
	pid_t pid;

	if (hmm_private_missing(HMM_OOM_DEVICES, why, sizeof(why)))
		SKIP(return, "%s", why);
	if (!hmm_file_has_word(HMM_CGROUP_ROOT "/cgroup.controllers",
			       "memory"))
		SKIP(return, "no memory controller: no cgroup2 at %s or no CONFIG_MEMCG",
		     HMM_CGROUP_ROOT);
	if (!hmm_file_has_word(HMM_SUBTREE_CONTROL, "memory")) {
		ret = hmm_write_str(HMM_SUBTREE_CONTROL, "+memory");
		if (ret)
			SKIP(return, "cannot enable the memory controller in %s: %s",
			     HMM_SUBTREE_CONTROL, strerror(-ret));
		self->memory_enabled = true;
	}
	snprintf(self->cgroup, sizeof(self->cgroup), "%s/hmm-tests.%d",
		 HMM_CGROUP_ROOT, getpid());
	ASSERT_EQ(0, mkdir(self->cgroup, 0755))
		TH_LOG("mkdir %s: %s", self->cgroup, strerror(errno));
	snprintf(path, sizeof(path), "%s/memory.max", self->cgroup);
	ASSERT_EQ(0, hmm_write_long(path, HMM_OOM_MEMORY_MAX));
	snprintf(path, sizeof(path), "%s/memory.swap.max", self->cgroup);
	ret = access(path, F_OK) ? 0 : hmm_write_long(path, 0);
	ASSERT_EQ(0, ret) TH_LOG("%s: %s", path, strerror(-ret));

	ASSERT_TRUE(hmm_open_set_n(&self->saved, fd, HMM_OOM_DEVICES, &set,
				   NULL));
	for (d = 0; d < HMM_OOM_DEVICES; d++)
		ASSERT_EQ(0, hmm_stats_reset(fd[d]));

	snprintf(path, sizeof(path), "%s/cgroup.procs", self->cgroup);
	pid = hmm_fork();
	ASSERT_LE(0, pid);
	if (!pid)
		_exit(hmm_child_oom(path, HMM_OOM_DEVICES));
	ASSERT_EQ(pid, hmm_waitpid(pid, &status));
	ASSERT_TRUE(WIFSIGNALED(status))
		TH_LOG("child not killed: status 0x%x", status);
	ASSERT_EQ(SIGKILL, WTERMSIG(status));
	snprintf(path, sizeof(path), "%s/memory.events", self->cgroup);
	ASSERT_LE(1, hmm_read_key(path, "oom_kill"))
		TH_LOG("the memory cgroup's OOM killer did not kill the child");

	for (d = 0; d < HMM_OOM_DEVICES; d++) {
		ASSERT_EQ(0, hmm_live_notifiers(hmm_private_ids[d]))
			TH_LOG("device %d: notifiers left by the child",
			       hmm_private_ids[d]);
		ASSERT_EQ(0, hmm_stats(fd[d], &stats));
		refused += stats.nonblock_refused;
		close(fd[d]);
	}
	TH_LOG("non-blockable invalidations refused: %llu", refused);

	ASSERT_EQ(0, rmdir(self->cgroup))
		TH_LOG("rmdir %s: %s", self->cgroup, strerror(errno));
	self->cgroup[0] = '\0';
}

/* Sum the counters of the devices of the @n files @fd: 0 or -errno. */
static int hmm_stats_sum(const int *fd, unsigned int n,
			 struct hmm_dmirror_stats *sum)
{
	const __u64 *val;
	__u64 *acc = (__u64 *)sum;
	struct hmm_dmirror_stats stats;
	unsigned int i, j;
	int ret;

	memset(sum, 0, sizeof(*sum));
	for (i = 0; i < n; i++) {
		ret = hmm_stats(fd[i], &stats);
		if (ret)
			return ret;
		val = (const __u64 *)&stats;
		for (j = 0; j < sizeof(stats) / sizeof(*val); j++)
			acc[j] += val[j];
	}
	return 0;
}

#define HMM_REAP_SLOW		4	/* devices that make munmap() slow */
#define HMM_REAP_NPAGES		16

/*
 * Body of the child of reap_mirrored: mirror buffer A on the first
 * HMM_REAP_SLOW devices and buffer B on the others, unmap A, then wait for
 * end of file on @hold. Returns its exit status, but should be killed in
 * the munmap().
 */
static int hmm_child_reap(int hold, size_t page_size)
{
	size_t size = HMM_REAP_NPAGES * page_size;
	struct hmm_dmirror_cmd cmd;
	char *a, *b, *mirror, c;
	unsigned int i;
	int fd;

	/* Whole leaves of their own: no other munmap() reaches A's devices. */
	a = hmm_map_aligned(size, HMM_LEAF_SIZE);
	b = hmm_map_aligned(size, HMM_LEAF_SIZE);
	mirror = malloc(size);
	if (!a || !b || !mirror)
		return 1;
	hmm_fill(a, size, 0xa);
	hmm_fill(b, size, 0xb);
	for (i = 0; i < HMM_NPRIVATE; i++) {
		fd = hmm_open(hmm_private_ids[i]);
		if (fd < 0)
			return 2;
		if (hmm_cmd(fd, HMM_DMIRROR_READ, i < HMM_REAP_SLOW ? a : b,
			    mirror, HMM_REAP_NPAGES, &cmd))
			return 3;
	}
	munmap(a, size);
	while (read(hold, &c, 1) < 0 && errno == EINTR)
		;
	return 4;
}

static const struct {
	const char	*name;
	__u64		latency_ns;	/* of the devices mirroring B */
	int		err;		/* of process_mrelease(), 0 if none */
} hmm_reap_cases[] = {
	{ "flushes take time", 5 * HMM_MS, EAGAIN },
	{ "flushes complete at once", 0, 0 },
};

/*
 * process_mrelease() reaps the memory of a killed process the way the OOM
 * reaper does, with invalidations that may not block. A device that would
 * have to wait for its flush refuses them, so memory it maps is not reaped
 * and the call fails with EAGAIN; a device whose flush completes at once
 * lets the reaper take the memory from it. Either way the process dies of
 * its SIGKILL and leaves no notifier behind.
 *
 * The child is killed while it is inside an munmap() that HMM_REAP_SLOW
 * single-pass devices with 100 ms flushes make last that many times 100 ms
 * from when the parent sees the first of them told: until it returns, the
 * child keeps its memory for the reaper to find.
 */
TEST_F(hmm_config, reap_mirrored)
{
	struct hmm_dmirror_settings set = {
		.notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
		.leaf_size = HMM_LEAF_SIZE,
	};
	int fd[HMM_NPRIVATE], hold[2], pidfd, status = 0, err;
	struct hmm_dmirror_stats sum;
	unsigned int i, d;
	char why[128];
	pid_t pid;

	if (hmm_private_missing(HMM_NPRIVATE, why, sizeof(why)))
		SKIP(return, "%s", why);

	for (i = 0; i < ARRAY_SIZE(hmm_reap_cases); i++) {
		const char *name = hmm_reap_cases[i].name;

		for (d = 0; d < HMM_NPRIVATE; d++) {
			bool slow = d < HMM_REAP_SLOW;

			set.invalidation = slow ? HMM_DMIRROR_SINGLE_PASS :
						  HMM_DMIRROR_TWO_PASS;
			set.flush_latency_ns = slow ? 100 * HMM_MS :
					       hmm_reap_cases[i].latency_ns;
			fd[d] = hmm_open_set(&self->saved, d, &set);
			ASSERT_LE(0, fd[d]);
			ASSERT_EQ(0, hmm_stats_reset(fd[d]));
		}

		ASSERT_EQ(0, pipe2(hold, O_CLOEXEC));
		pid = hmm_fork();
		ASSERT_LE(0, pid);
		if (!pid) {
			close(hold[1]);
			_exit(hmm_child_reap(hold[0], self->page_size));
		}
		close(hold[0]);
		pidfd = syscall(__NR_pidfd_open, pid, 0);
		ASSERT_LE(0, pidfd) TH_LOG("pidfd_open: %s", strerror(errno));

		/*
		 * Wait for the munmap() of A to reach a slow device; if it
		 * never does, the harness's timeout fails the test.
		 */
		for (;;) {
			ASSERT_EQ(0, waitpid(pid, &status, WNOHANG))
				TH_LOG("%s: child exited, status 0x%x", name,
				       status);
			ASSERT_EQ(0, hmm_stats_sum(fd, HMM_REAP_SLOW, &sum));
			if (sum.invalidations[HMM_DMIRROR_EVENT_UNMAP])
				break;
			sched_yield();
		}

		ASSERT_EQ(0, kill(pid, SIGKILL));
		err = syscall(__NR_process_mrelease, pidfd, 0) ? errno : 0;
		ASSERT_EQ(hmm_reap_cases[i].err, err)
			TH_LOG("%s: process_mrelease(): %s", name,
			       strerror(err));
		ASSERT_EQ(pid, hmm_waitpid(pid, &status));
		ASSERT_TRUE(WIFSIGNALED(status))
			TH_LOG("%s: child status 0x%x", name, status);
		ASSERT_EQ(SIGKILL, WTERMSIG(status));

		ASSERT_EQ(0, hmm_stats_sum(fd + HMM_REAP_SLOW,
					   HMM_NPRIVATE - HMM_REAP_SLOW, &sum));
		if (hmm_reap_cases[i].err) {
			/*
			 * B is one VMA: the reaper's one invalidation of it
			 * stops at the first device that refuses.
			 */
			ASSERT_EQ(1ULL, sum.nonblock_refused)
				TH_LOG("%s: devices refused %llu times", name,
				       sum.nonblock_refused);
		} else {
			ASSERT_EQ(0ULL, sum.nonblock_refused)
				TH_LOG("%s", name);
			ASSERT_LE(1ULL,
				  sum.invalidations[HMM_DMIRROR_EVENT_CLEAR])
				TH_LOG("%s: the reaper did not reach B's devices",
				       name);
		}
		for (d = 0; d < HMM_NPRIVATE; d++) {
			ASSERT_EQ(0, hmm_live_notifiers(hmm_private_ids[d]))
				TH_LOG("%s: device %d: notifiers left behind",
				       name, hmm_private_ids[d]);
			close(fd[d]);
		}
		close(pidfd);
		close(hold[1]);
	}
}

/* Mirrors whose notifiers come and go, and what they should have. */
static const struct {
	const char	*name;
	__u32		notifier_model;
	__u64		leaf_size;
	unsigned int	nleaves;	/* the buffer covers these exactly */
} hmm_notifier_cases[] = {
	{ "per leaf, 2 MiB leaves", HMM_DMIRROR_NOTIFIER_PER_LEAF, 2UL << 20,
	  3 },
	{ "per leaf, 64 KiB leaves", HMM_DMIRROR_NOTIFIER_PER_LEAF,
	  64UL << 10, 16 },
	{ "whole", HMM_DMIRROR_NOTIFIER_WHOLE, 2UL << 20, 3 },
};

/*
 * A mirror with a notifier per leaf inserts one for each leaf it faults in,
 * once however often it reads there, and removes them when the range is
 * unmapped. A mirror of the whole space has one notifier whatever it reads,
 * until its file is closed. A file closed has no notifier left.
 */
TEST_F(hmm_config, notifier_lifetime)
{
	struct hmm_dmirror_settings set = {
		.invalidation = HMM_DMIRROR_TWO_PASS,
	};
	struct hmm_dmirror_stats stats;
	struct hmm_dmirror_cmd cmd;
	unsigned int i, read;
	struct hmm_buffer b;
	int fd, other;

	for (i = 0; i < ARRAY_SIZE(hmm_notifier_cases); i++) {
		const char *name = hmm_notifier_cases[i].name;
		bool per_leaf = hmm_notifier_cases[i].notifier_model ==
				HMM_DMIRROR_NOTIFIER_PER_LEAF;
		size_t leaf = hmm_notifier_cases[i].leaf_size;
		__u64 n = per_leaf ? hmm_notifier_cases[i].nleaves : 1;
		size_t size = leaf * hmm_notifier_cases[i].nleaves;

		set.notifier_model = hmm_notifier_cases[i].notifier_model;
		set.leaf_size = leaf;
		fd = hmm_open_set(&self->saved, 0, &set);
		ASSERT_LE(0, fd) TH_LOG("%s", name);
		/* Never faults: its statistics outlive fd. */
		other = hmm_open(hmm_private_ids[0]);
		ASSERT_LE(0, other);
		/* HMM_LEAF_SIZE-aligned: whole leaves of this size or less. */
		ASSERT_BUFFER_MAP(&b, HMM_LEAF, size / self->page_size,
				  0x1ea + i);

		ASSERT_EQ(0, hmm_stats_reset(fd));
		ASSERT_EQ(0, hmm_stats(fd, &stats));
		ASSERT_EQ(0ULL, stats.notifiers_live)
			TH_LOG("%s: notifiers before the first fault", name);
		for (read = 0; read < 2; read++) {
			ASSERT_DEV_READ(fd, HMM_DMIRROR_READ, &b, 0x1ea + i,
					&cmd);
			ASSERT_EQ(read ? 0ULL : 1ULL, cmd.faults)
				TH_LOG("%s: read #%u", name, read + 1);
			ASSERT_EQ(0, hmm_stats(fd, &stats));
			ASSERT_EQ(n, stats.notifier_inserts)
				TH_LOG("%s: read #%u", name, read + 1);
			ASSERT_EQ(n, stats.notifiers_live)
				TH_LOG("%s: read #%u", name, read + 1);
		}

		ASSERT_EQ(0, hmm_buffer_unmap(&b));
		ASSERT_EQ(0, hmm_stats(fd, &stats));
		ASSERT_EQ(per_leaf ? 0ULL : 1ULL, stats.notifiers_live)
			TH_LOG("%s: after munmap()", name);
		ASSERT_EQ(per_leaf ? n : 0ULL, stats.notifier_removals)
			TH_LOG("%s: after munmap()", name);

		ASSERT_EQ(0, close(fd));
		ASSERT_EQ(0, hmm_stats(other, &stats));
		ASSERT_EQ(0ULL, stats.notifiers_live)
			TH_LOG("%s: after close()", name);
		ASSERT_EQ(n, stats.notifier_removals)
			TH_LOG("%s: after close()", name);
		close(other);
		hmm_buffer_free(&b);
	}
}

#define HMM_FAULT_THREADS	16

/* One thread of leaf_concurrent_faults. */
struct hmm_fault_thread {
	pthread_t		thread;
	pthread_barrier_t	*start;
	int			fd;
	char			*page;	/* the page it reads */
	char			*mirror;
	int			ret;
	struct hmm_dmirror_cmd	cmd;
};

static void *hmm_fault_thread_fn(void *arg)
{
	struct hmm_fault_thread *t = arg;

	pthread_barrier_wait(t->start);
	t->ret = hmm_cmd(t->fd, HMM_DMIRROR_READ, t->page, t->mirror, 1,
			 &t->cmd);
	return NULL;
}

/*
 * Threads of a process fault different pages of one leaf at once through
 * one mirror: it creates one leaf with one notifier, and every thread
 * reads its page.
 */
TEST_F(hmm_config, leaf_concurrent_faults)
{
	const struct hmm_dmirror_settings set = {
		.notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
		.invalidation = HMM_DMIRROR_TWO_PASS,
		.leaf_size = HMM_LEAF_SIZE,
	};
	struct hmm_fault_thread t[HMM_FAULT_THREADS] = { 0 };
	struct hmm_dmirror_stats stats;
	size_t ps = self->page_size;
	pthread_barrier_t start;
	struct hmm_buffer b;
	unsigned int i;
	int fd;

	fd = hmm_open_set(&self->saved, 0, &set);
	ASSERT_LE(0, fd);
	ASSERT_BUFFER_MAP(&b, HMM_LEAF, HMM_FAULT_THREADS, 0xc0c);
	ASSERT_EQ(0, hmm_stats_reset(fd));

	ASSERT_EQ(0, pthread_barrier_init(&start, NULL, HMM_FAULT_THREADS));
	for (i = 0; i < HMM_FAULT_THREADS; i++) {
		t[i].start = &start;
		t[i].fd = fd;
		t[i].page = b.ptr + i * ps;
		t[i].mirror = b.mirror + i * ps;
		ASSERT_EQ(0, pthread_create(&t[i].thread, NULL,
					    hmm_fault_thread_fn, &t[i]));
	}
	for (i = 0; i < HMM_FAULT_THREADS; i++)
		ASSERT_EQ(0, pthread_join(t[i].thread, NULL));
	for (i = 0; i < HMM_FAULT_THREADS; i++) {
		ASSERT_EQ(0, t[i].ret) TH_LOG("thread %u", i);
		ASSERT_EQ(1ULL, t[i].cmd.cpages) TH_LOG("thread %u", i);
		ASSERT_EQ(0, memcmp(t[i].page, t[i].mirror, ps))
			TH_LOG("thread %u read wrong data", i);
	}

	ASSERT_EQ(0, hmm_stats(fd, &stats));
	ASSERT_EQ(1ULL, stats.notifier_inserts);
	ASSERT_EQ(1ULL, stats.notifiers_live);
	ASSERT_EQ(0, pthread_barrier_destroy(&start));
	hmm_buffer_free(&b);
	close(fd);
}

#define HMM_HEAVY_BUFS		32
#define HMM_HEAVY_LEAVES	4		/* per buffer */
#define HMM_HEAVY_LEAF		(64UL << 10)

/*
 * A mirror with many leaves in many mappings: unmapping half of the
 * mappings removes their notifiers and keeps the others, which still map
 * their pages; closing the file removes all that are left.
 */
TEST_F(hmm_config, leaf_heavy_close)
{
	const struct hmm_dmirror_settings set = {
		.notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
		.invalidation = HMM_DMIRROR_TWO_PASS,
		.leaf_size = HMM_HEAVY_LEAF,
	};
	const __u64 nleaves = HMM_HEAVY_BUFS * HMM_HEAVY_LEAVES;
	size_t size = HMM_HEAVY_LEAVES * HMM_HEAVY_LEAF;
	__u64 npages = size / self->page_size;
	char *buf[HMM_HEAVY_BUFS], *mirror;
	struct hmm_dmirror_stats stats;
	struct hmm_dmirror_cmd cmd;
	unsigned int b;
	int fd, other;

	fd = hmm_open_set(&self->saved, 0, &set);
	ASSERT_LE(0, fd);
	other = hmm_open(hmm_private_ids[0]);
	ASSERT_LE(0, other);
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);
	ASSERT_EQ(0, hmm_stats_reset(fd));
	for (b = 0; b < HMM_HEAVY_BUFS; b++) {
		buf[b] = hmm_map_aligned(size, HMM_HEAVY_LEAF);
		ASSERT_NE(NULL, buf[b]);
		hmm_fill(buf[b], size, b);
		ASSERT_EQ(0, hmm_cmd(fd, HMM_DMIRROR_READ, buf[b], mirror,
				     npages, &cmd));
	}
	ASSERT_EQ(0, hmm_stats(fd, &stats));
	ASSERT_EQ(nleaves, stats.notifier_inserts);
	ASSERT_EQ(nleaves, stats.notifiers_live);

	for (b = 0; b < HMM_HEAVY_BUFS; b += 2)
		ASSERT_EQ(0, munmap(buf[b], size));
	ASSERT_EQ(0, hmm_stats(fd, &stats));
	ASSERT_EQ(nleaves / 2, stats.notifiers_live);
	ASSERT_EQ(nleaves / 2, stats.notifier_removals);
	for (b = 1; b < HMM_HEAVY_BUFS; b += 2) {
		ASSERT_EQ(0, hmm_cmd(fd, HMM_DMIRROR_READ, buf[b], mirror,
				     npages, &cmd));
		ASSERT_EQ(0ULL, cmd.faults) TH_LOG("buffer %u lost its leaves",
						   b);
		ASSERT_EQ(-1, hmm_check(mirror, size, b));
	}

	ASSERT_EQ(0, close(fd));
	ASSERT_EQ(0, hmm_stats(other, &stats));
	ASSERT_EQ(0ULL, stats.notifiers_live);
	ASSERT_EQ(nleaves, stats.notifier_removals);
	for (b = 1; b < HMM_HEAVY_BUFS; b += 2)
		munmap(buf[b], size);
	free(mirror);
	close(other);
}

enum hmm_setting {
	HMM_SET_MODEL,
	HMM_SET_MODE,
	HMM_SET_LATENCY,
	HMM_SET_LEAF_SIZE,
	HMM_SET_FLAGS,
	HMM_SET_RESERVED,
};

/* Settings a device cannot have: one field set to @value. */
static const struct {
	const char		*name;
	enum hmm_setting	field;
	__u64			value;
} hmm_bad_settings[] = {
	{ "notifier model 2", HMM_SET_MODEL, 2 },
	{ "notifier model 0xffffffff", HMM_SET_MODEL, 0xffffffff },
	{ "invalidation 2", HMM_SET_MODE, 2 },
	{ "invalidation 0xffffffff", HMM_SET_MODE, 0xffffffff },
	{ "flush latency 100 ms + 1 ns", HMM_SET_LATENCY, 100 * HMM_MS + 1 },
	{ "flush latency 2^64 - 1", HMM_SET_LATENCY, ~0ULL },
	{ "leaf size 0", HMM_SET_LEAF_SIZE, 0 },
	{ "leaf size 2 KiB, below a page", HMM_SET_LEAF_SIZE, 2 << 10 },
	{ "leaf size 3 KiB", HMM_SET_LEAF_SIZE, 3 << 10 },
	{ "leaf size 3 MiB", HMM_SET_LEAF_SIZE, 3 << 20 },
	{ "leaf size 1 GiB + 4 KiB", HMM_SET_LEAF_SIZE, (1ULL << 30) + 4096 },
	{ "leaf size 2 GiB", HMM_SET_LEAF_SIZE, 2ULL << 30 },
	{ "leaf size 2^63", HMM_SET_LEAF_SIZE, 1ULL << 63 },
	{ "unknown flag 0x2", HMM_SET_FLAGS, 0x2 },
	{ "unknown flag 0x80000000", HMM_SET_FLAGS, 0x80000000 },
	{ "reserved 1", HMM_SET_RESERVED, 1 },
};

static void hmm_setting_patch(struct hmm_dmirror_settings *set,
			      enum hmm_setting field, __u64 value)
{
	switch (field) {
	case HMM_SET_MODEL:
		set->notifier_model = value;
		break;
	case HMM_SET_MODE:
		set->invalidation = value;
		break;
	case HMM_SET_LATENCY:
		set->flush_latency_ns = value;
		break;
	case HMM_SET_LEAF_SIZE:
		set->leaf_size = value;
		break;
	case HMM_SET_FLAGS:
		set->flags = value;
		break;
	case HMM_SET_RESERVED:
		set->reserved = value;
		break;
	}
}

/*
 * Settings with one bad field are refused with EINVAL as a whole: the
 * device keeps the settings it had.
 */
TEST_F(hmm_config, settings_invalid)
{
	/* Not the defaults, so that a partial update would show. */
	const struct hmm_dmirror_settings good = {
		.notifier_model = HMM_DMIRROR_NOTIFIER_WHOLE,
		.invalidation = HMM_DMIRROR_SINGLE_PASS,
		.flush_latency_ns = 3 * HMM_MS,
		.leaf_size = 1UL << 20,
	};
	struct hmm_dmirror_settings set, got;
	unsigned int i;
	int fd;

	fd = hmm_open_set(&self->saved, 0, &good);
	ASSERT_LE(0, fd);
	for (i = 0; i < ARRAY_SIZE(hmm_bad_settings); i++) {
		const char *name = hmm_bad_settings[i].name;

		set = good;
		hmm_setting_patch(&set, hmm_bad_settings[i].field,
				  hmm_bad_settings[i].value);
		EXPECT_EQ(-EINVAL, hmm_set_settings(fd, &set))
			TH_LOG("%s", name);
		ASSERT_EQ(0, hmm_get_settings(fd, &got));
		EXPECT_EQ(0, memcmp(&good, &got, sizeof(got)))
			TH_LOG("%s: the settings changed", name);
	}
	close(fd);
}

/* Settings at and within the limits; a leaf size of 0 means a page. */
static const struct hmm_dmirror_settings hmm_good_settings[] = {
	{
		.notifier_model = HMM_DMIRROR_NOTIFIER_WHOLE,
		.invalidation = HMM_DMIRROR_SINGLE_PASS,
		.flush_latency_ns = 0,
		.leaf_size = 0,
	}, {
		.notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
		.invalidation = HMM_DMIRROR_TWO_PASS,
		.flush_latency_ns = 100 * HMM_MS,
		.leaf_size = 1ULL << 30,
	}, {
		.notifier_model = HMM_DMIRROR_NOTIFIER_WHOLE,
		.invalidation = HMM_DMIRROR_TWO_PASS,
		.flush_latency_ns = 1,
		.leaf_size = 64UL << 10,
	}, {
		.notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
		.invalidation = HMM_DMIRROR_SINGLE_PASS,
		.flush_latency_ns = 200 * 1000,
		.leaf_size = 2UL << 20,
	},
};

/* The device stores any settings within the limits, and returns them. */
TEST_F(hmm_config, settings_roundtrip)
{
	struct hmm_dmirror_settings set, got;
	unsigned int i;
	int fd;

	fd = hmm_open_set(&self->saved, 0, NULL);
	ASSERT_LE(0, fd);
	for (i = 0; i < ARRAY_SIZE(hmm_good_settings); i++) {
		set = hmm_good_settings[i];
		if (!set.leaf_size)
			set.leaf_size = self->page_size;
		EXPECT_EQ(0, hmm_set_settings(fd, &set)) TH_LOG("case %u", i);
		memset(&got, 0xee, sizeof(got));
		ASSERT_EQ(0, hmm_get_settings(fd, &got));
		EXPECT_EQ(0, memcmp(&set, &got, sizeof(got)))
			TH_LOG("case %u: read back differs", i);
	}
	close(fd);
}

/* The first version of struct hmm_dmirror_stats ended here. */
#define HMM_STATS_V1_SIZE	offsetof(struct hmm_dmirror_stats, fault_retries)

/* HMM_DMIRROR_STATS for a caller whose structure has @size bytes. */
#define HMM_DMIRROR_STATS_SIZED(size) \
	_IOC(_IOC_READ, 'H', _IOC_NR(HMM_DMIRROR_STATS), (size))

/*
 * struct hmm_dmirror_stats grows at its end: a program built with an older,
 * shorter structure gets its part, with the same values, and one built with
 * a longer structure than the driver knows gets zeroes past the driver's.
 */
TEST_F(hmm_config, stats_sizes)
{
	const size_t size = sizeof(struct hmm_dmirror_stats);
	unsigned char small[HMM_STATS_V1_SIZE + 8], large[size + 64];
	struct hmm_dmirror_stats stats;
	int fd;

	fd = hmm_open(0);
	ASSERT_LE(0, fd);
	ASSERT_EQ(0, hmm_stats_reset(fd));
	memset(small, 0xa5, sizeof(small));
	memset(large, 0xa5, sizeof(large));
	ASSERT_EQ(0, hmm_ioctl(fd, HMM_DMIRROR_STATS_SIZED(HMM_STATS_V1_SIZE),
			       small));
	ASSERT_EQ(0, hmm_ioctl(fd, HMM_DMIRROR_STATS_SIZED(sizeof(large)),
			       large));
	ASSERT_EQ(0, hmm_stats(fd, &stats));

	/* Nothing ran in between: the same counters three times. */
	ASSERT_EQ(0, memcmp(small, &stats, HMM_STATS_V1_SIZE));
	ASSERT_EQ(-1, hmm_check_bytes(small + HMM_STATS_V1_SIZE, 8, 0xa5))
		TH_LOG("written past the caller's structure");
	ASSERT_EQ(0, memcmp(large, &stats, size));
	ASSERT_EQ(-1, hmm_check_bytes(large + size, sizeof(large) - size, 0))
		TH_LOG("not zeroed past the driver's structure");
	close(fd);
}

/*
 * HMM_DMIRROR_INVALIDATIONS refuses a bad range or buffer, reports only the
 * caller's invalidations of the range it names, and copies no more records
 * than the buffer holds.
 */
TEST_F(hmm_config, invalidations_query)
{
	struct hmm_dmirror_inval_record recs[2];
	struct hmm_dmirror_inval_query q;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	unsigned int i;
	__u64 mark;
	int fd;

	fd = hmm_open(0);
	ASSERT_LE(0, fd);
	ASSERT_BUFFER_MAP(&b, HMM_ANON, 4, 0);

	memset(&q, 0, sizeof(q));
	q.addr = (uintptr_t)b.ptr + 1;
	q.npages = b.npages;
	EXPECT_EQ(-EINVAL, hmm_ioctl(fd, HMM_DMIRROR_INVALIDATIONS, &q));
	q.addr = 0ULL - self->page_size;
	q.npages = 2;
	EXPECT_EQ(-EINVAL, hmm_ioctl(fd, HMM_DMIRROR_INVALIDATIONS, &q));
	EXPECT_EQ(-EFAULT, hmm_ioctl(fd, HMM_DMIRROR_INVALIDATIONS, NULL));

	/* Each page unmapped on its own: one invalidation each. */
	hmm_fill(b.ptr, b.size, 0x1a5);
	ASSERT_EQ(0, hmm_cmd(fd, HMM_DMIRROR_READ, b.ptr, b.mirror, b.npages,
			     &cmd));
	mark = hmm_inval_mark(fd);
	for (i = 0; i < b.npages; i++)
		ASSERT_EQ(0, munmap(b.ptr + i * self->page_size,
				    self->page_size));

	memset(&q, 0, sizeof(q));
	memset(recs, 0xa5, sizeof(recs));
	q.addr = (uintptr_t)b.ptr + self->page_size;
	q.npages = 1;
	q.since = mark;
	q.ptr = (uintptr_t)recs;
	q.nr_max = 2;
	ASSERT_EQ(0, hmm_ioctl(fd, HMM_DMIRROR_INVALIDATIONS, &q));
	ASSERT_EQ(1U, q.nr);
	ASSERT_EQ(q.addr, recs[0].start);
	ASSERT_EQ(q.addr + self->page_size, recs[0].end);
	ASSERT_EQ((__u32)HMM_DMIRROR_EVENT_UNMAP, recs[0].event);
	ASSERT_LT(mark, recs[0].seq);
	ASSERT_LE(recs[0].seq, q.last);
	ASSERT_EQ(-1, hmm_check_bytes(&recs[1], sizeof(recs[1]), 0xa5))
		TH_LOG("a record past the range was copied");

	/* All four, with room for two: four counted, two copied. */
	memset(recs, 0xa5, sizeof(recs));
	q.addr = (uintptr_t)b.ptr;
	q.npages = b.npages;
	q.nr_max = 1;
	ASSERT_EQ(0, hmm_ioctl(fd, HMM_DMIRROR_INVALIDATIONS, &q));
	ASSERT_EQ(b.npages, q.nr);
	ASSERT_EQ(q.addr, recs[0].start);
	ASSERT_EQ(-1, hmm_check_bytes(&recs[1], sizeof(recs[1]), 0xa5))
		TH_LOG("more records copied than nr_max");
	hmm_buffer_free(&b);
	close(fd);
}

/*
 * mmap() of a device maps zeroed kernel pages at once, as the kernel's own
 * driver does: the device sees them mapped (read-only, as a mixed map)
 * before anyone touched them. A mapping larger than the driver allows,
 * which would take the mmap lock for long, is refused with EINVAL.
 */
TEST_F(hmm, mmap_device)
{
	const size_t max = 64UL << 20;	/* DMIRROR_MMAP_MAX_SIZE */
	const __u64 npages = 4;
	size_t size = npages * self->page_size;
	unsigned char snap[4];
	struct hmm_dmirror_cmd cmd;
	char *p;

	errno = 0;
	p = mmap(NULL, max + self->page_size, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE, self->fd, 0);
	ASSERT_EQ(MAP_FAILED, p);
	ASSERT_EQ(EINVAL, errno);

	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, self->fd, 0);
	ASSERT_NE(MAP_FAILED, p) TH_LOG("mmap: %s", strerror(errno));
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_SNAPSHOT, p, snap, npages,
			     &cmd));
	ASSERT_EQ(-1, hmm_check_bytes(snap, npages, HMM_DMIRROR_PROT_READ));
	ASSERT_EQ(-1, hmm_check_bytes(p, size, 0));
	ASSERT_EQ(0, munmap(p, size));
}

/*
 * Interconnect groups (the driver's interconnect parameter; test_hmm.sh
 * loads it with the groups below). Devices of one group share a pagemap
 * owner: each maps the others' device memory where it is, and migrates
 * their pages into its own memory in one copy. A, B and C are devices of
 * one group, A the one whose memory the pages start in; "other" is a device
 * of another group, to which pages go through system memory as between
 * devices without a group.
 */
#define HMM_PEER_GROUP_SIZE	8	/* devices 10 to 17 */
#define HMM_PEER_ROUNDS		20	/* rounds of the racing tests */
#define HMM_PEER_LOAD \
	"load test_hmm as test_hmm.sh does (private_devices, interconnect)"

FIXTURE(peer)
{
	int	fd[3];		/* A, B, C; -1 where the variant has none */
	int	other;		/* a device outside the group, or -1 */
	size_t	page_size;
};

FIXTURE_VARIANT(peer)
{
	int	dev[3];		/* A, B, C of one group; C < 0: none */
	int	other;		/* < 0: none */
	bool	coherent;
};

FIXTURE_VARIANT_ADD(peer, private)
{
	.dev = { 10, 11, 12 },
	.other = 18,
};

/* Only two coherent devices exist: no C, and no device outside. */
FIXTURE_VARIANT_ADD(peer, coherent)
{
	.dev = { 2, 3, -1 },
	.other = -1,
	.coherent = true,
};

FIXTURE_SETUP(peer)
{
	long group = -1;
	int i;

	self->page_size = sysconf(_SC_PAGESIZE);
	self->other = -1;
	for (i = 0; i < 3; i++) {
		char path[32];

		self->fd[i] = -1;
		if (variant->dev[i] < 0)
			continue;
		hmm_dev_path(path, sizeof(path), variant->dev[i]);
		if (access(path, F_OK))
			SKIP(return, "no %s: %s", path, HMM_PEER_LOAD);
		self->fd[i] = hmm_open(variant->dev[i]);
		ASSERT_LE(0, self->fd[i]);
		if (!i)
			group = hmm_group(self->fd[0]);
		if (group <= 0 || hmm_group(self->fd[i]) != group)
			SKIP(return, "devices %d and %d not in one group: %s",
			     variant->dev[0], variant->dev[i], HMM_PEER_LOAD);
	}
	if (variant->other >= 0) {
		self->other = hmm_open(variant->other);
		ASSERT_LE(0, self->other);
		ASSERT_NE(group, hmm_group(self->other))
			TH_LOG("device %d is in A's group", variant->other);
	}
}

FIXTURE_TEARDOWN(peer)
{
	int i;

	for (i = 0; i < 3; i++)
		if (self->fd[i] >= 0)
			close(self->fd[i]);
	if (self->other >= 0)
		close(self->other);
}

/* What SNAPSHOT reports for a writable page in the device's own memory. */
static unsigned char hmm_peer_local(bool coherent)
{
	return hmm_local(coherent) | HMM_DMIRROR_PROT_WRITE;
}

/* ... for a writable page in the memory of another device of its group. */
static unsigned char hmm_peer_remote(bool coherent)
{
	return (coherent ? HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE :
			   HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE) |
	       HMM_DMIRROR_PROT_INTERCONNECT | HMM_DMIRROR_PROT_WRITE;
}

/* The counters of the devices behind @fds, reset first. */
static int hmm_peer_reset(const int *fds, int n)
{
	int i, ret = 0;

	for (i = 0; i < n && !ret; i++)
		if (fds[i] >= 0)
			ret = hmm_stats_reset(fds[i]);
	return ret;
}

/* One counter of the device behind @fd, or HMM_POISON if it cannot say. */
#define hmm_peer_stat(fd, field) ({					\
	struct hmm_dmirror_stats __s;					\
	hmm_stats(fd, &__s) ? HMM_POISON : __s.field;			\
})

/*
 * hmm_peer_start() - how most peer tests start: map @b, HMM_NPAGES of
 * private anonymous memory filled with @seed, move it into the memory of
 * A (@fds[0]), checking what A read back, and zero the counters of A, B
 * and C.
 */
static void hmm_peer_start(struct __test_metadata *_metadata, const int *fds,
			   struct hmm_buffer *b, __u32 seed)
{
	struct hmm_dmirror_cmd cmd;

	ASSERT_BUFFER_MAP(b, HMM_ANON, HMM_NPAGES, seed);
	ASSERT_DEV_READ(fds[0], HMM_DMIRROR_MIGRATE_TO_DEV, b, seed, &cmd);
	ASSERT_EQ(0, hmm_peer_reset(fds, 3));
}

/*
 * A's pages, read by B: B maps them where they are (SNAPSHOT through B
 * says "another device's, over the interconnect", through A "mine" still),
 * and what B writes lands in A's memory, where the CPU then finds it.
 */
TEST_F(peer, peer_read_write)
{
	bool coherent = variant->coherent;
	int a = self->fd[0], b_fd = self->fd[1];
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;

	hmm_peer_start(_metadata, self->fd, &b, 0x9e1);

	ASSERT_DEV_READ(b_fd, HMM_DMIRROR_READ, &b, 0x9e1, &cmd);
	ASSERT_SNAPSHOT(b_fd, b.ptr, b.npages, b.snap, hmm_peer_remote(coherent))
		TH_LOG("B's view");
	ASSERT_SNAPSHOT(a, b.ptr, b.npages, b.snap, hmm_peer_local(coherent))
		TH_LOG("A's view: B's read moved the pages");
	ASSERT_EQ(b.npages, hmm_peer_stat(b_fd, interconnect_maps));
	ASSERT_EQ(0ULL, hmm_peer_stat(a, migrated_to_sys));

	hmm_fill(b.mirror, b.size, 0x9e2);
	ASSERT_CMD_ALL(b_fd, HMM_DMIRROR_WRITE, b.ptr, b.mirror, b.npages,
		       &cmd);
	ASSERT_SNAPSHOT(a, b.ptr, b.npages, b.snap, hmm_peer_local(coherent))
		TH_LOG("A's view: B's write moved the pages");
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x9e2))
		TH_LOG("the CPU does not see B's write");
	hmm_buffer_free(&b);
}

/*
 * A -> B: MIGRATE_TO_DEV on B of pages in A's memory moves them across in
 * one copy, a THP as a THP: B counts them as from a peer, A moved none to
 * system memory and B pulled none from there, so they never were there.
 */
static void hmm_peer_migrate(struct __test_metadata *_metadata,
			     const int *fds, bool coherent,
			     enum hmm_backing backing, __u32 seed)
{
	int a = fds[0], b_fd = fds[1];
	unsigned char pmd = backing == HMM_THP ? HMM_DMIRROR_PROT_PMD : 0;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;

	if (!hmm_buffer_get(_metadata, &b, backing, HMM_NPAGES, seed))
		return;
	ASSERT_DEV_READ(a, HMM_DMIRROR_MIGRATE_TO_DEV, &b, seed, &cmd);
	ASSERT_SNAPSHOT(a, b.ptr, b.npages, b.snap,
			hmm_peer_local(coherent) | pmd);
	ASSERT_EQ(0, hmm_peer_reset(fds, 2));

	ASSERT_DEV_READ(b_fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, seed, &cmd);
	ASSERT_SNAPSHOT(b_fd, b.ptr, b.npages, b.snap,
			hmm_peer_local(coherent) | pmd) TH_LOG("B's memory");
	ASSERT_SNAPSHOT(a, b.ptr, b.npages, b.snap,
			hmm_peer_remote(coherent) | pmd) TH_LOG("A's view");
	EXPECT_EQ(b.npages, hmm_peer_stat(b_fd, migrated_to_dev));
	EXPECT_EQ(b.npages, hmm_peer_stat(b_fd, migrated_from_peer));
	EXPECT_EQ(0ULL, hmm_peer_stat(b_fd, migrate_pulled));
	EXPECT_EQ(0ULL, hmm_peer_stat(a, migrated_to_sys))
		TH_LOG("the pages went through system memory");

	/* A's migration back moves A's own pages only: these are B's now. */
	ASSERT_EQ(0, hmm_cmd(a, HMM_DMIRROR_MIGRATE_TO_SYS, b.ptr, NULL,
			     b.npages, &cmd));
	ASSERT_EQ(0ULL, cmd.cpages);
	ASSERT_SNAPSHOT(b_fd, b.ptr, b.npages, b.snap,
			hmm_peer_local(coherent) | pmd) TH_LOG("A took B's pages");
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, seed));
	hmm_buffer_free(&b);
}

TEST_F(peer, peer_migrate)
{
	hmm_peer_migrate(_metadata, self->fd, variant->coherent, HMM_ANON,
			 0x9e3);
}

TEST_F(peer, peer_migrate_thp)
{
	if (hmm_coherent_bug(variant->coherent, HMM_BUG_COHERENT_THP_TO_SYS))
		SKIP(return, "%s", hmm_bug(HMM_BUG_COHERENT_THP_TO_SYS));
	hmm_peer_migrate(_metadata, self->fd, variant->coherent, HMM_THP,
			 0x9e4);
}

/*
 * A -> other, a device outside A's group: the pages go through system
 * memory (A migrates them back when the other device's migration faults
 * them in; two copies), as between devices in no group.
 */
TEST_F(peer, peer_migrate_other_group)
{
	int a = self->fd[0];
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	int fds[2] = { a, self->other };

	if (self->other < 0)
		SKIP(return, "no device outside the group");
	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0x9e5);
	ASSERT_DEV_READ(a, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0x9e5, &cmd);
	ASSERT_EQ(0, hmm_peer_reset(fds, 2));

	ASSERT_DEV_READ(self->other, HMM_DMIRROR_MIGRATE_TO_DEV, &b, 0x9e5,
			&cmd);
	ASSERT_SNAPSHOT(self->other, b.ptr, b.npages, b.snap,
			hmm_peer_local(false));
	EXPECT_EQ(b.npages, hmm_peer_stat(self->other, migrated_to_dev));
	EXPECT_EQ(0ULL, hmm_peer_stat(self->other, migrated_from_peer));
	EXPECT_EQ(b.npages, hmm_peer_stat(self->other, migrate_pulled));
	EXPECT_EQ(b.npages, hmm_peer_stat(a, migrated_to_sys));
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x9e5));
	hmm_buffer_free(&b);
}

/*
 * B maps A's pages; A's migration back to system memory is an
 * MMU_NOTIFY_MIGRATE whose owner is the group's, B's too: B must drop its
 * mappings all the same, and read the new data the CPU then writes, never
 * the old pages.
 */
TEST_F(peer, peer_migrate_invalidates)
{
	int a = self->fd[0], b_fd = self->fd[1];
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;

	hmm_peer_start(_metadata, self->fd, &b, 0x9e6);
	ASSERT_DEV_READ(b_fd, HMM_DMIRROR_READ, &b, 0x9e6, &cmd);
	ASSERT_EQ(b.npages, hmm_peer_stat(b_fd, interconnect_maps));

	ASSERT_CMD_ALL(a, HMM_DMIRROR_MIGRATE_TO_SYS, b.ptr, NULL, b.npages,
		       &cmd);
	ASSERT_EQ(b.npages, hmm_peer_stat(b_fd, interconnect_unmaps))
		TH_LOG("B kept mappings of pages A migrated");
	hmm_fill(b.ptr, b.size, 0x9e7);
	ASSERT_DEV_READ(b_fd, HMM_DMIRROR_READ, &b, 0x9e7, &cmd);
	ASSERT_EQ(1ULL, cmd.faults);
	ASSERT_SNAPSHOT(b_fd, b.ptr, b.npages, b.snap, HMM_DMIRROR_PROT_WRITE);
	hmm_buffer_free(&b);
}

/*
 * A CPU fault on a page in A's memory that B and C map: A migrates it back
 * to system memory, and both peers drop their mappings.
 */
TEST_F(peer, peer_cpu_fault)
{
	int a = self->fd[0];
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	int i;

	if (variant->coherent)
		SKIP(return, "the CPU reads device-coherent memory without a fault");
	hmm_peer_start(_metadata, self->fd, &b, 0x9e8);
	for (i = 1; i < 3; i++)
		ASSERT_DEV_READ(self->fd[i], HMM_DMIRROR_READ, &b, 0x9e8, &cmd);

	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x9e8));
	EXPECT_EQ(b.npages, hmm_peer_stat(a, migrated_to_sys));
	for (i = 1; i < 3; i++) {
		EXPECT_EQ(b.npages, hmm_peer_stat(self->fd[i], interconnect_unmaps))
			TH_LOG("device %d kept its mappings", variant->dev[i]);
		ASSERT_SNAPSHOT(self->fd[i], b.ptr, b.npages, b.snap,
				HMM_DMIRROR_PROT_WRITE);
	}
	hmm_buffer_free(&b);
}

/*
 * Exclusive access to pages B maps in A's memory, taken by a third device
 * of the group (private: C, which makes them move to system memory first)
 * or by A itself (coherent). The exclusive owner is the device that took
 * it, not the group: B's mappings go, the taker keeps its own, and B's
 * next read revokes the taker's atomic access.
 */
TEST_F(peer, peer_exclusive)
{
	int taker = variant->coherent ? self->fd[0] : self->fd[2];
	int b_fd = self->fd[1];
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;

	hmm_peer_start(_metadata, self->fd, &b, 0x9e9);
	ASSERT_DEV_READ(b_fd, HMM_DMIRROR_READ, &b, 0x9e9, &cmd);

	ASSERT_DEV_READ(taker, HMM_DMIRROR_EXCLUSIVE, &b, 0x9e9, &cmd);
	EXPECT_EQ(b.npages, hmm_peer_stat(b_fd, interconnect_unmaps))
		TH_LOG("B kept mappings of pages taken for exclusive access");
	ASSERT_EQ(-EPERM, hmm_check_exclusive(taker, b.ptr, b.mirror,
					      b.npages))
		TH_LOG("the taker lost its atomic access");

	ASSERT_DEV_READ(b_fd, HMM_DMIRROR_READ, &b, 0x9e9, &cmd);
	ASSERT_EQ(1ULL, cmd.faults);
	ASSERT_EQ(0, hmm_check_exclusive(taker, b.ptr, b.mirror, b.npages))
		TH_LOG("B's read did not revoke exclusive access");
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x9e9));
	hmm_buffer_free(&b);
}

/*
 * B's advice says its pages belong in system memory: B's faults move them
 * there out of A's memory, which B would otherwise map where it is.
 */
TEST_F(peer, peer_advise_system)
{
	int a = self->fd[0], b_fd = self->fd[1];
	struct hmm_dmirror_advice adv = {
		.location = HMM_DMIRROR_LOC_SYSTEM,
		.policy = HMM_DMIRROR_FAULT_MIGRATE,
		.granule_shift = 21,
	};
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;

	hmm_peer_start(_metadata, self->fd, &b, 0x9ed);
	adv.addr = (uintptr_t)b.ptr;
	adv.npages = b.npages;
	ASSERT_EQ(0, hmm_ioctl(b_fd, HMM_DMIRROR_ADVISE, &adv));

	ASSERT_DEV_READ(b_fd, HMM_DMIRROR_READ, &b, 0x9ed, &cmd);
	ASSERT_SNAPSHOT(a, b.ptr, b.npages, b.snap, HMM_DMIRROR_PROT_WRITE);
	EXPECT_EQ(b.npages, hmm_peer_stat(b_fd, migrate_on_fault));
	EXPECT_EQ(0ULL, hmm_peer_stat(b_fd, interconnect_maps));
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x9ed));
	hmm_buffer_free(&b);
}

/*
 * HMM_DMIRROR_RELEASE on A evicts its memory, pages B maps included: B
 * drops them and reads the data from system memory.
 */
TEST_F(peer, peer_release)
{
	int a = self->fd[0], b_fd = self->fd[1];
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;

	hmm_peer_start(_metadata, self->fd, &b, 0x9ea);
	ASSERT_DEV_READ(b_fd, HMM_DMIRROR_READ, &b, 0x9ea, &cmd);

	ASSERT_EQ(0, hmm_ioctl(a, HMM_DMIRROR_RELEASE, NULL));
	EXPECT_EQ(b.npages, hmm_peer_stat(a, migrated_to_sys));
	EXPECT_EQ(b.npages, hmm_peer_stat(b_fd, interconnect_unmaps));
	ASSERT_DEV_READ(b_fd, HMM_DMIRROR_READ, &b, 0x9ea, &cmd);
	ASSERT_SNAPSHOT(b_fd, b.ptr, b.npages, b.snap, HMM_DMIRROR_PROT_WRITE);
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x9ea));
	hmm_buffer_free(&b);
}

/*
 * A thread that moves a buffer around: request @req[i] through @fd[i],
 * one after the other, HMM_PEER_ROUNDS times or, @forever, until the
 * process dies; it writes a byte to @wake (if >= 0) after its first round.
 */
struct hmm_peer_mover {
	pthread_t	thread;
	int		fd[2];
	unsigned long	req[2];
	bool		forever;
	int		wake;
	struct hmm_buffer *b;
	int		error;		/* the first unexpected errno */
};

/*
 * Migrations that race other devices' faults may find a page busy and
 * leave it where it is (ENOENT); anything else is an error, which ends the
 * rounds unless they go on forever.
 */
static void *hmm_peer_mover_fn(void *arg)
{
	struct hmm_peer_mover *m = arg;
	struct hmm_dmirror_cmd cmd;
	int i, ret;

	for (i = 0; m->forever || (i < HMM_PEER_ROUNDS && !m->error); i++) {
		ret = hmm_cmd(m->fd[i & 1], m->req[i & 1], m->b->ptr,
			      m->b->mirror, m->b->npages, &cmd);
		if (ret && ret != -ENOENT && !m->error)
			m->error = -ret;
		if (!i && m->wake >= 0 && write(m->wake, "x", 1) != 1 &&
		    !m->error)
			m->error = errno;
	}
	return NULL;
}

/*
 * B is opened, reads A's pages over the interconnect and is closed, again
 * and again, while a thread moves the pages between A's and C's memory
 * (coherent: between A's memory and system memory): closing a device that
 * maps a peer's pages while they move leaves nothing behind, and the data
 * is whole at the end.
 */
TEST_F(peer, peer_close_while_migrating)
{
	struct hmm_peer_mover m = {
		.wake = -1,
		.fd = { self->fd[0], self->fd[2] },
		.req = { HMM_DMIRROR_MIGRATE_TO_DEV, HMM_DMIRROR_MIGRATE_TO_DEV },
	};
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b, rb;
	int i, fd, ret;

	if (m.fd[1] < 0) {
		m.fd[1] = self->fd[0];
		m.req[1] = HMM_DMIRROR_MIGRATE_TO_SYS;
	}
	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_NPAGES, 0x9eb);
	ASSERT_BUFFER_MAP(&rb, HMM_ANON, 1, 0);
	m.b = &b;
	ASSERT_EQ(0, pthread_create(&m.thread, NULL, hmm_peer_mover_fn, &m));
	for (i = 0; i < HMM_PEER_ROUNDS; i++) {
		fd = hmm_open(variant->dev[1]);
		if (fd < 0)
			break;
		ret = hmm_cmd(fd, HMM_DMIRROR_READ, b.ptr, rb.mirror, 1, &cmd);
		close(fd);
		if (ret)
			break;
	}
	ASSERT_EQ(0, pthread_join(m.thread, NULL));
	ASSERT_EQ(HMM_PEER_ROUNDS, i) TH_LOG("round %d: open or READ failed", i);
	ASSERT_EQ(0, m.error) TH_LOG("migration: %s", strerror(m.error));
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x9eb));
	hmm_buffer_free(&rb);
	hmm_buffer_free(&b);
}

/*
 * A process whose threads move one buffer around a group of eight devices
 * is killed while they do: its exit tears down eight mirrors of one mm
 * with migrations in flight, and every device gives all its memory back
 * (RELEASE finds no page left behind).
 */
static void hmm_peer_exit_child(int wake)
{
	struct hmm_peer_mover m[HMM_PEER_GROUP_SIZE];
	struct hmm_buffer b;
	int i;

	if (hmm_buffer_map(&b, HMM_ANON, HMM_RACE_NPAGES, 0x9ec))
		_exit(2);
	for (i = 0; i < HMM_PEER_GROUP_SIZE; i++) {
		memset(&m[i], 0, sizeof(m[i]));
		m[i].fd[0] = hmm_open(10 + i);
		m[i].fd[1] = hmm_open(10 + (i + 1) % HMM_PEER_GROUP_SIZE);
		m[i].req[0] = HMM_DMIRROR_MIGRATE_TO_DEV;
		m[i].req[1] = HMM_DMIRROR_MIGRATE_TO_DEV;
		m[i].forever = true;
		m[i].wake = wake;
		m[i].b = &b;
		if (m[i].fd[0] < 0 || m[i].fd[1] < 0 ||
		    pthread_create(&m[i].thread, NULL, hmm_peer_mover_fn,
				   &m[i]))
			_exit(3);
	}
	/* Each mover tells the parent once it has moved the buffer. */
	for (;;)
		pause();
}

TEST_F_TIMEOUT(peer, peer_group_exit, HMM_SLOW_TIMEOUT)
{
	int pipefd[2], fds[HMM_PEER_GROUP_SIZE], i, status;
	bool started;
	char c;
	pid_t pid;

	if (variant->coherent)
		SKIP(return, "a group of %d needs private devices",
		     HMM_PEER_GROUP_SIZE);
	for (i = 0; i < HMM_PEER_GROUP_SIZE; i++) {
		fds[i] = hmm_open(10 + i);
		ASSERT_LE(0, fds[i]);
		ASSERT_EQ(hmm_group(self->fd[0]), hmm_group(fds[i]));
	}
	ASSERT_EQ(0, pipe(pipefd));
	pid = hmm_fork();
	ASSERT_LE(0, pid);
	if (!pid) {
		close(pipefd[0]);
		hmm_peer_exit_child(pipefd[1]);
	}
	close(pipefd[1]);
	/* Kill the child with every mover past its first migration. */
	for (i = 0; i < HMM_PEER_GROUP_SIZE; i++)
		if (read(pipefd[0], &c, 1) != 1)
			break;
	started = i == HMM_PEER_GROUP_SIZE;
	close(pipefd[0]);
	kill(pid, SIGKILL);
	ASSERT_EQ(pid, hmm_waitpid(pid, &status));
	ASSERT_TRUE(started && WIFSIGNALED(status) &&
		    WTERMSIG(status) == SIGKILL)
		TH_LOG("%d of %d movers started; child status 0x%x", i,
		       HMM_PEER_GROUP_SIZE, status);

	for (i = 0; i < HMM_PEER_GROUP_SIZE; i++) {
		EXPECT_EQ(0, hmm_ioctl(fds[i], HMM_DMIRROR_RELEASE, NULL))
			TH_LOG("device %d kept pages of the dead process",
			       10 + i);
		close(fds[i]);
	}
}

/*
 * Placement advice and the device's own fault policy (HMM_DMIRROR_ADVISE):
 * device faults in an advised range migrate it where the advice prefers,
 * at the advice's granule, or map it where it is; device memory capped by
 * the memory_limit_mb setting is evicted, least recently used first, to
 * make room; the timeslice setting keeps migrated pages on the device for
 * a while before a CPU fault takes them back. The teardown puts the
 * device's settings back and releases its memory.
 */
#define HMM_PLACE_LIMIT_MB	4	/* the device memory cap of the tests */
#define HMM_PLACE_NPAGES	((2 * HMM_PLACE_LIMIT_MB << 20) / 4096)
#define HMM_PLACE_ROUNDS	2
#define HMM_TIMESLICE_MS	200
#define HMM_SHIFT_4K		12
#define HMM_SHIFT_2M		21

FIXTURE(placement)
{
	int	fd;
	size_t	page_size;
};

FIXTURE_VARIANT(placement)
{
	int	device;
	bool	coherent;
};

FIXTURE_VARIANT_ADD(placement, private)
{
	.device = 0,
};

FIXTURE_VARIANT_ADD(placement, coherent)
{
	.device = 2,
	.coherent = true,
};

static int hmm_advise(int fd, void *addr, __u64 npages, __u32 location,
		      __u32 policy, __u32 shift)
{
	struct hmm_dmirror_advice a = {
		.addr = (uintptr_t)addr,
		.npages = npages,
		.location = location,
		.policy = policy,
		.granule_shift = shift,
	};

	return hmm_ioctl(fd, HMM_DMIRROR_ADVISE, &a);
}

/* Set the device's memory limit and timeslice: 0 or -errno. */
static int hmm_place_settings(int fd, __u32 limit_mb, __u32 timeslice_ms)
{
	struct hmm_dmirror_settings set;
	int ret = hmm_get_settings(fd, &set);

	if (ret)
		return ret;
	set.memory_limit_mb = limit_mb;
	set.timeslice_ms = timeslice_ms;
	return hmm_set_settings(fd, &set);
}

FIXTURE_SETUP(placement)
{
	char path[32];

	self->fd = -1;
	self->page_size = sysconf(_SC_PAGESIZE);
	hmm_dev_path(path, sizeof(path), variant->device);
	if (variant->coherent && access(path, F_OK))
		SKIP(return, "no %s: load test_hmm with spm_addr_dev0/1", path);
	self->fd = hmm_open(variant->device);
	ASSERT_LE(0, self->fd);
	if (hmm_advise(self->fd, NULL, 1, HMM_DMIRROR_LOC_NONE, 0, 0) ==
	    -ENOTTY)
		SKIP(return, "the driver has no placement advice");
	ASSERT_EQ(0, hmm_place_settings(self->fd, HMM_PLACE_LIMIT_MB, 0));
	ASSERT_EQ(0, hmm_stats_reset(self->fd));
}

FIXTURE_TEARDOWN_PARENT(placement)
{
	int fd = hmm_open(variant->device);

	if (fd < 0)
		return;
	/* Braced: a failed test leaves the harness's trigger set. */
	if (hmm_advise(fd, NULL, 1, HMM_DMIRROR_LOC_NONE, 0, 0) != -ENOTTY) {
		EXPECT_EQ(0, hmm_place_settings(fd, 0, 0))
			TH_LOG("could not put device %d's settings back",
			       variant->device);
	}
	hmm_ioctl(fd, HMM_DMIRROR_RELEASE, NULL);
	close(fd);
}

/* HMM_DMIRROR_GET_ADVICE of @addr: 0 or -errno, the advice in *@a. */
static int hmm_get_advice(int fd, void *addr, struct hmm_dmirror_advice *a)
{
	memset(a, 0xa5, sizeof(*a));
	a->addr = (uintptr_t)addr;
	return hmm_ioctl(fd, HMM_DMIRROR_GET_ADVICE, a);
}

/*
 * Assert that the advice of @at is the range [@first, @first + @n pages)
 * with location @loc, policy @pol and granule shift @sh.
 */
#define ASSERT_ADVICE(fd, at, first, n, loc, pol, sh) do {		\
	struct hmm_dmirror_advice __a;					\
	ASSERT_EQ(0, hmm_get_advice(fd, at, &__a));			\
	ASSERT_EQ((uintptr_t)(first), __a.addr);			\
	ASSERT_EQ((__u64)(n), __a.npages);				\
	ASSERT_EQ((__u32)(loc), __a.location);				\
	ASSERT_EQ((__u32)(pol), __a.policy);				\
	ASSERT_EQ((__u32)(sh), __a.granule_shift);			\
	ASSERT_EQ(0U, __a.reserved);					\
} while (0)

/*
 * Advice reads back as given; advice over part of a range replaces it
 * there and leaves the rest; clearing and munmap() drop it.
 */
TEST_F(placement, advise_round_trip)
{
	const __u32 dev = HMM_DMIRROR_LOC_DEVICE, sys = HMM_DMIRROR_LOC_SYSTEM;
	const __u32 mig = HMM_DMIRROR_FAULT_MIGRATE, map = HMM_DMIRROR_FAULT_MAP;
	size_t ps = self->page_size;
	struct hmm_dmirror_advice a;
	struct hmm_buffer b;
	char *p;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, 64, 0);
	p = b.ptr;
	ASSERT_EQ(-ENOENT, hmm_get_advice(self->fd, p, &a));
	ASSERT_EQ(0, hmm_advise(self->fd, p, 64, dev, mig, HMM_SHIFT_2M));
	ASSERT_ADVICE(self->fd, p + 10 * ps, p, 64, dev, mig, HMM_SHIFT_2M);

	/* A hole in the middle: three ranges. */
	ASSERT_EQ(0, hmm_advise(self->fd, p + 16 * ps, 16, sys, map,
				HMM_SHIFT_4K));
	ASSERT_ADVICE(self->fd, p, p, 16, dev, mig, HMM_SHIFT_2M);
	ASSERT_ADVICE(self->fd, p + 20 * ps, p + 16 * ps, 16, sys, map,
		      HMM_SHIFT_4K);
	ASSERT_ADVICE(self->fd, p + 63 * ps, p + 32 * ps, 32, dev, mig,
		      HMM_SHIFT_2M);

	/* Over the end of one and the start of the next. */
	ASSERT_EQ(0, hmm_advise(self->fd, p + 8 * ps, 16,
				HMM_DMIRROR_LOC_AUTO, mig, HMM_SHIFT_4K));
	ASSERT_ADVICE(self->fd, p, p, 8, dev, mig, HMM_SHIFT_2M);
	ASSERT_ADVICE(self->fd, p + 8 * ps, p + 8 * ps, 16,
		      HMM_DMIRROR_LOC_AUTO, mig, HMM_SHIFT_4K);
	ASSERT_ADVICE(self->fd, p + 24 * ps, p + 24 * ps, 8, sys, map,
		      HMM_SHIFT_4K);

	/* Cleared, and unmapped. */
	ASSERT_EQ(0, hmm_advise(self->fd, p, 8, HMM_DMIRROR_LOC_NONE, 0, 0));
	ASSERT_EQ(-ENOENT, hmm_get_advice(self->fd, p, &a));
	ASSERT_EQ(0, munmap(p + 40 * ps, 8 * ps));
	ASSERT_EQ(-ENOENT, hmm_get_advice(self->fd, p + 40 * ps, &a));
	ASSERT_ADVICE(self->fd, p + 32 * ps, p + 32 * ps, 8, dev, mig,
		      HMM_SHIFT_2M);
	ASSERT_ADVICE(self->fd, p + 48 * ps, p + 48 * ps, 16, dev, mig,
		      HMM_SHIFT_2M);

	/* Another file's mirror has advice of its own. */
	{
		int fd = hmm_open(variant->device);

		ASSERT_LE(0, fd);
		ASSERT_EQ(-ENOENT, hmm_get_advice(fd, p + 50 * ps, &a));
		close(fd);
	}
	hmm_buffer_free(&b);
}

/* Malformed advice: each row one thing wrong. */
static const struct {
	const char	*what;
	__u64		addr_off;	/* from a valid address */
	__u64		npages;
	__u32		location, policy, shift, reserved;
	int		err;
} hmm_bad_advice[] = {
	{ "unaligned", 1, 1, 2, 0, 12, 0, EINVAL },
	{ "empty", 0, 0, 2, 0, 12, 0, EINVAL },
	{ "wrapping", 0, ~0ULL >> 12, 2, 0, 12, 0, EINVAL },
	{ "unknown location", 0, 1, 4, 0, 12, 0, EINVAL },
	{ "unknown policy", 0, 1, 2, 2, 12, 0, EINVAL },
	{ "bad granule", 0, 1, 2, 0, 13, 0, EINVAL },
	{ "no granule", 0, 1, 2, 0, 0, 0, EINVAL },
	{ "reserved", 0, 1, 2, 0, 12, 1, EINVAL },
	{ "clear with a policy", 0, 1, 0, 1, 0, 0, EINVAL },
	{ "clear with a granule", 0, 1, 0, 0, 12, 0, EINVAL },
};

TEST_F(placement, advise_bad)
{
	struct hmm_dmirror_advice a;
	struct hmm_buffer b;
	unsigned int i;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, 4, 0);
	for (i = 0; i < ARRAY_SIZE(hmm_bad_advice); i++) {
		memset(&a, 0, sizeof(a));
		a.addr = (uintptr_t)b.ptr + hmm_bad_advice[i].addr_off;
		a.npages = hmm_bad_advice[i].npages;
		a.location = hmm_bad_advice[i].location;
		a.policy = hmm_bad_advice[i].policy;
		a.granule_shift = hmm_bad_advice[i].shift;
		a.reserved = hmm_bad_advice[i].reserved;
		EXPECT_EQ(-hmm_bad_advice[i].err,
			  hmm_ioctl(self->fd, HMM_DMIRROR_ADVISE, &a))
			TH_LOG("%s", hmm_bad_advice[i].what);
	}
	EXPECT_EQ(-EFAULT, hmm_ioctl(self->fd, HMM_DMIRROR_ADVISE, NULL));
	EXPECT_EQ(-EFAULT, hmm_ioctl(self->fd, HMM_DMIRROR_GET_ADVICE, NULL));
	memset(&a, 0, sizeof(a));
	a.addr = ~0ULL & ~4095ULL;
	EXPECT_EQ(-EINVAL, hmm_ioctl(self->fd, HMM_DMIRROR_GET_ADVICE, &a));
	/* Nothing was advised by the bad requests. */
	EXPECT_EQ(-ENOENT, hmm_get_advice(self->fd, b.ptr, &a));
	hmm_buffer_free(&b);
}

/* One row of the advised-fault table. */
struct hmm_place_case {
	enum hmm_backing backing;
	bool	on_device;	/* migrated to the device first */
	__u32	location, policy, shift;
	bool	to_device;	/* the read leaves the pages on the device */
};

/*
 * A device read of a buffer under advice: where the pages end up, what
 * the device read, and how many pages the faults migrated.
 */
static void hmm_place_run(struct __test_metadata *_metadata, int fd,
			  bool coherent, const struct hmm_place_case *c)
{
	unsigned char pmd = c->backing == HMM_THP && c->shift == HMM_SHIFT_2M ?
			    HMM_DMIRROR_PROT_PMD : 0;
	unsigned char want = HMM_DMIRROR_PROT_WRITE | pmd;
	struct hmm_dmirror_stats stats;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	__u64 moved;

	if (hmm_coherent_bug(coherent, HMM_BUG_COHERENT_THP_TO_SYS) &&
	    c->backing == HMM_THP && c->on_device &&
	    c->location == HMM_DMIRROR_LOC_SYSTEM)
		SKIP(return, "%s", hmm_bug(HMM_BUG_COHERENT_THP_TO_SYS));
	if (!hmm_buffer_get(_metadata, &b, c->backing, HMM_NPAGES, 0x9a1))
		return;
	if (c->on_device)
		ASSERT_CMD_ALL(fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
			       b.npages, &cmd);
	ASSERT_EQ(0, hmm_stats_reset(fd));
	ASSERT_EQ(0, hmm_advise(fd, b.ptr, b.npages, c->location, c->policy,
				c->shift));

	ASSERT_DEV_READ(fd, HMM_DMIRROR_READ, &b, 0x9a1, &cmd);
	if (c->to_device)
		want |= hmm_local(coherent);
	ASSERT_SNAPSHOT(fd, b.ptr, b.npages, b.snap, want);
	ASSERT_EQ(0, hmm_stats(fd, &stats));
	moved = c->on_device == c->to_device ? 0 : b.npages;
	EXPECT_EQ(moved, stats.migrate_on_fault);
	EXPECT_EQ(0ULL, stats.fault_fallbacks);
	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x9a1));
	hmm_buffer_free(&b);
}

/*
 * HMM_PLACE_TEST() - the test @name of the placement fixture: a buffer of
 * @backing, in device memory first if @on_device, advised (location
 * HMM_DMIRROR_LOC_@loc, policy HMM_DMIRROR_FAULT_@pol, granule
 * HMM_SHIFT_@gran) and read by the device, which leaves it in device memory
 * if @to_device, else in system memory. A new case is one line.
 */
#define HMM_PLACE_TEST(name, backing, on_device, loc, pol, gran, to_device) \
	static const struct hmm_place_case hmm_place_##name = {		\
		backing, on_device, HMM_DMIRROR_LOC_##loc,		\
		HMM_DMIRROR_FAULT_##pol, HMM_SHIFT_##gran, to_device	\
	};								\
	TEST_F(placement, name)						\
	{								\
		hmm_place_run(_metadata, self->fd, variant->coherent,	\
			      &hmm_place_##name);			\
	}

HMM_PLACE_TEST(advise_fault_device_4k, HMM_ANON, false, DEVICE, MIGRATE, 4K, true)
HMM_PLACE_TEST(advise_fault_device_thp, HMM_THP, false, DEVICE, MIGRATE, 2M, true)
HMM_PLACE_TEST(advise_fault_auto, HMM_ANON, false, AUTO, MIGRATE, 2M, true)
HMM_PLACE_TEST(advise_fault_map, HMM_ANON, false, DEVICE, MAP, 2M, false)
HMM_PLACE_TEST(advise_fault_system_map, HMM_ANON, false, SYSTEM, MAP, 4K, false)
HMM_PLACE_TEST(advise_fault_system_migrate, HMM_ANON, true, SYSTEM, MIGRATE, 2M, false)
HMM_PLACE_TEST(advise_fault_system_migrate_thp, HMM_THP, true, SYSTEM, MIGRATE, 2M, false)

/* Map @npages pages aligned to 2 MiB, THP or not, filled with @seed. */
static char *hmm_place_map(__u64 npages, size_t ps, bool thp, __u32 seed)
{
	size_t size = npages * ps;
	char *p = hmm_map_aligned(size, 2UL << 20);

	if (!p)
		return NULL;
	madvise(p, size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
	hmm_fill(p, size, seed);
	return p;
}

/*
 * A working set twice the device memory cap, advised to the device, read
 * through the device HMM_PLACE_ROUNDS times: every read is right, device
 * memory is evicted to make room, never ENOMEM, and the device never holds
 * more than its cap.
 */
static void hmm_place_stream(struct __test_metadata *_metadata, int fd,
			     size_t ps, bool thp)
{
	const __u64 npages = HMM_PLACE_NPAGES;
	__u32 shift = thp ? HMM_SHIFT_2M : HMM_SHIFT_4K;
	struct hmm_dmirror_stats stats;
	struct hmm_dmirror_cmd cmd;
	unsigned char *snap;
	char *p, *mirror;
	__u64 i, local = 0;
	int round;

	p = hmm_place_map(npages, ps, thp, 0x9a2);
	mirror = malloc(npages * ps);
	snap = malloc(npages);
	ASSERT_TRUE(p && mirror && snap);
	ASSERT_EQ(0, hmm_advise(fd, p, npages, HMM_DMIRROR_LOC_DEVICE,
				HMM_DMIRROR_FAULT_MIGRATE, shift));
	for (round = 0; round < HMM_PLACE_ROUNDS; round++) {
		memset(mirror, 0, npages * ps);
		ASSERT_EQ(0, hmm_cmd(fd, HMM_DMIRROR_READ, p, mirror, npages,
				     &cmd)) TH_LOG("round %d", round);
		ASSERT_EQ(-1, hmm_check(mirror, npages * ps, 0x9a2))
			TH_LOG("round %d", round);
	}
	ASSERT_EQ(0, hmm_stats(fd, &stats));
	TH_LOG("%llu pages migrated on fault, %llu evictions (%llu pages), %llu fallbacks",
	       stats.migrate_on_fault, stats.evictions, stats.pages_evicted,
	       stats.fault_fallbacks);
	ASSERT_LE(npages, stats.migrate_on_fault);
	ASSERT_LE(npages / 2, stats.pages_evicted);
	ASSERT_LT(0ULL, stats.evictions);
	ASSERT_EQ(0, hmm_cmd(fd, HMM_DMIRROR_SNAPSHOT, p, snap, npages, &cmd));
	for (i = 0; i < npages; i++)
		local += !!(snap[i] & (HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL |
				       HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL));
	ASSERT_GE(npages / 2, local) TH_LOG("more than the cap on the device");
	ASSERT_EQ(-1, hmm_check(p, npages * ps, 0x9a2));
	free(snap);
	free(mirror);
	munmap(p, npages * ps);
}

TEST_F(placement, evict_stream_4k)
{
	hmm_place_stream(_metadata, self->fd, self->page_size, false);
}

TEST_F(placement, evict_stream_thp)
{
	hmm_place_stream(_metadata, self->fd, self->page_size, true);
}

/*
 * Two mirrors of one device: what the first brought in and the second
 * maps is evicted when the first needs room, and the second then reads
 * the data from system memory.
 */
TEST_F(placement, evict_other_mirror)
{
	const __u64 npages = (HMM_PLACE_LIMIT_MB << 20) / 4096;
	struct hmm_dmirror_stats before, after;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer a, b;
	int fd2;

	/* The stats are the device's: both mirrors count in them. */

	ASSERT_BUFFER_MAP(&a, HMM_LEAF, npages, 0x9a3);
	ASSERT_BUFFER_MAP(&b, HMM_LEAF, npages, 0x9a4);
	fd2 = hmm_open(variant->device);
	ASSERT_LE(0, fd2);
	ASSERT_EQ(0, hmm_advise(self->fd, a.ptr, npages,
				HMM_DMIRROR_LOC_DEVICE,
				HMM_DMIRROR_FAULT_MIGRATE, HMM_SHIFT_2M));
	ASSERT_EQ(0, hmm_advise(self->fd, b.ptr, npages,
				HMM_DMIRROR_LOC_DEVICE,
				HMM_DMIRROR_FAULT_MIGRATE, HMM_SHIFT_2M));
	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_READ, &a, 0x9a3, &cmd);
	ASSERT_SNAPSHOT(fd2, a.ptr, a.npages, a.snap,
			hmm_local(variant->coherent) | HMM_DMIRROR_PROT_WRITE);
	ASSERT_DEV_READ(fd2, HMM_DMIRROR_READ, &a, 0x9a3, &cmd);
	ASSERT_EQ(0, hmm_stats(fd2, &before));

	ASSERT_DEV_READ(self->fd, HMM_DMIRROR_READ, &b, 0x9a4, &cmd);
	ASSERT_EQ(0, hmm_stats(fd2, &after));
	ASSERT_LE(npages, after.pages_evicted - before.pages_evicted);
	ASSERT_SNAPSHOT(fd2, a.ptr, a.npages, a.snap, HMM_DMIRROR_PROT_WRITE);
	ASSERT_DEV_READ(fd2, HMM_DMIRROR_READ, &a, 0x9a3, &cmd);
	ASSERT_EQ(1ULL, cmd.faults) TH_LOG("the second mirror kept its PTEs");
	close(fd2);
	hmm_buffer_free(&b);
	hmm_buffer_free(&a);
}

/* The CPU thread of evict_cpu_race, and what it found. */
struct hmm_place_cpu {
	pthread_t	thread;
	const char	*p;
	const char	*ref;	/* what p holds */
	__u64		npages;
	size_t		page_size;
	bool		stop;	/* atomic */
	long		bad;	/* offset of wrong data, or -1 */
	unsigned long	reads;
};

/* Read pages all over the buffer, bringing them back from the device. */
static void *hmm_place_cpu_fn(void *arg)
{
	struct hmm_place_cpu *c = arg;
	unsigned int seed = 1;

	while (!__atomic_load_n(&c->stop, __ATOMIC_RELAXED) && c->bad < 0) {
		size_t off = (rand_r(&seed) % c->npages) * c->page_size;

		if (memcmp(c->p + off, c->ref + off, c->page_size))
			c->bad = off;
		c->reads++;
	}
	return NULL;
}

/*
 * The device streams a working set twice its cap while a CPU thread reads
 * pages at random, taking them back from the device under the eviction:
 * every read of either is right.
 */
TEST_F_TIMEOUT(placement, evict_cpu_race, HMM_SLOW_TIMEOUT)
{
	const __u64 npages = HMM_PLACE_NPAGES;
	size_t ps = self->page_size;
	struct hmm_place_cpu c = {
		.npages = npages, .page_size = ps, .bad = -1,
	};
	struct hmm_dmirror_cmd cmd;
	char *p, *mirror, *ref;
	int round, ret = 0;

	p = hmm_place_map(npages, ps, false, 0x9a5);
	mirror = malloc(npages * ps);
	ref = malloc(npages * ps);
	ASSERT_TRUE(p && mirror && ref);
	hmm_fill(ref, npages * ps, 0x9a5);
	c.ref = ref;
	ASSERT_EQ(0, hmm_advise(self->fd, p, npages, HMM_DMIRROR_LOC_DEVICE,
				HMM_DMIRROR_FAULT_MIGRATE, HMM_SHIFT_2M));
	c.p = p;
	ASSERT_EQ(0, pthread_create(&c.thread, NULL, hmm_place_cpu_fn, &c));
	for (round = 0; round < HMM_PLACE_ROUNDS * 2 && !ret; round++) {
		memset(mirror, 0, npages * ps);
		ret = hmm_cmd(self->fd, HMM_DMIRROR_READ, p, mirror, npages,
			      &cmd);
		if (!ret && hmm_check(mirror, npages * ps, 0x9a5) >= 0)
			ret = 1;
	}
	__atomic_store_n(&c.stop, true, __ATOMIC_RELAXED);
	ASSERT_EQ(0, pthread_join(c.thread, NULL));
	ASSERT_EQ(0, ret) TH_LOG("device read in round %d", round);
	ASSERT_EQ(-1, c.bad) TH_LOG("the CPU read wrong data");
	TH_LOG("%lu CPU reads during %d device rounds", c.reads, round);
	free(ref);
	free(mirror);
	munmap(p, npages * ps);
}

/* How the evict_pinned tests hold pages: GUP long-term, io_uring. */
enum hmm_pin_kind {
	HMM_PIN_GUP,
	HMM_PIN_IO_URING,
};

/*
 * A long-term pin of a buffer, and the means to read the pinned pages
 * through it rather than through the mapping: gup_test's
 * PIN_LONGTERM_TEST_READ, or an io_uring WRITE_FIXED of the registered
 * buffer to a file.
 */
struct hmm_pin {
	enum hmm_pin_kind kind;
	int	gup_fd;
	int	file_fd;
#ifdef HMM_HAVE_LIBURING
	struct io_uring ring;
#endif
	char	why[128];
};

/* Pin @size bytes at @p: 0, or 1 with the reason the system cannot. */
static int hmm_pin_start(struct hmm_pin *pin, char *p, size_t size)
{
	struct pin_longterm_test gup = {
		.addr = (uintptr_t)p,
		.size = size,
		.flags = PIN_LONGTERM_TEST_FLAG_USE_WRITE,
	};

	pin->gup_fd = -1;
	pin->file_fd = -1;
	if (pin->kind == HMM_PIN_GUP) {
		pin->gup_fd = open(HMM_GUP_TEST, O_RDWR | O_CLOEXEC);
		if (pin->gup_fd < 0 ||
		    ioctl(pin->gup_fd, PIN_LONGTERM_TEST_START, &gup)) {
			hmm_why(pin->why, sizeof(pin->why),
				"%s (CONFIG_GUP_TEST, debugfs): %s",
				HMM_GUP_TEST, strerror(errno));
			return 1;
		}
		return 0;
	}
#ifdef HMM_HAVE_LIBURING
	{
		struct iovec iov = { .iov_base = p, .iov_len = size };
		int ret = io_uring_queue_init(4, &pin->ring, 0);

		if (!ret)
			ret = io_uring_register_buffers(&pin->ring, &iov, 1);
		pin->file_fd = ret ? -1 : hmm_tmpfile(size);
		if (ret || pin->file_fd < 0) {
			hmm_why(pin->why, sizeof(pin->why),
				"io_uring fixed buffer or temporary file: %s",
				strerror(ret ? -ret : errno));
			return 1;
		}
		return 0;
	}
#else
	hmm_why(pin->why, sizeof(pin->why),
		"built without liburing (HMM_HAVE_LIBURING)");
	return 1;
#endif
}

/* Read the @size pinned bytes at @p through the pin into @out: 0 or -1. */
static int hmm_pin_read(struct hmm_pin *pin, char *p, size_t size, char *out)
{
	__u64 uaddr = (uintptr_t)out;

	if (pin->kind == HMM_PIN_GUP)
		return ioctl(pin->gup_fd, PIN_LONGTERM_TEST_READ, &uaddr) ? -1 : 0;
#ifdef HMM_HAVE_LIBURING
	if (hmm_uring_rw(&pin->ring, true, pin->file_fd, p, size) !=
	    (int)size)
		return -1;
	return pread(pin->file_fd, out, size, 0) == (ssize_t)size ? 0 : -1;
#else
	(void)p;
	(void)size;
	return -1;
#endif
}

static void hmm_pin_stop(struct hmm_pin *pin)
{
	if (pin->gup_fd >= 0) {
		ioctl(pin->gup_fd, PIN_LONGTERM_TEST_STOP);
		close(pin->gup_fd);
	}
#ifdef HMM_HAVE_LIBURING
	if (pin->kind == HMM_PIN_IO_URING && pin->file_fd >= 0) {
		io_uring_queue_exit(&pin->ring);
		close(pin->file_fd);
	}
#endif
}

/*
 * Pages pinned long-term cannot move: the device faults under advice to
 * migrate them map them where they are (counted as fallbacks), and a
 * stream through the device's memory beside them leaves the pin holding
 * the pages the CPU writes.
 */
static void hmm_place_pinned(struct __test_metadata *_metadata, int fd,
			     enum hmm_pin_kind kind)
{
	struct hmm_pin pin = { .kind = kind };
	struct hmm_dmirror_stats stats;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b, w;
	char *through;

	ASSERT_BUFFER_MAP(&b, HMM_ANON, HMM_SMALL_NPAGES, 0x9a6);
	ASSERT_BUFFER_MAP(&w, HMM_LEAF, HMM_PLACE_NPAGES, 0x9a7);
	through = malloc(b.size);
	ASSERT_NE(NULL, through);
	if (hmm_pin_start(&pin, b.ptr, b.size)) {
		hmm_pin_stop(&pin);
		SKIP(return, "%s", pin.why);
	}

	ASSERT_EQ(0, hmm_advise(fd, b.ptr, b.npages, HMM_DMIRROR_LOC_DEVICE,
				HMM_DMIRROR_FAULT_MIGRATE, HMM_SHIFT_4K));
	ASSERT_EQ(0, hmm_advise(fd, w.ptr, w.npages, HMM_DMIRROR_LOC_DEVICE,
				HMM_DMIRROR_FAULT_MIGRATE, HMM_SHIFT_2M));
	ASSERT_DEV_READ(fd, HMM_DMIRROR_READ, &b, 0x9a6, &cmd);
	ASSERT_EQ(0, hmm_stats(fd, &stats));
	ASSERT_EQ(b.npages, stats.fault_fallbacks);
	ASSERT_SNAPSHOT(fd, b.ptr, b.npages, b.snap, HMM_DMIRROR_PROT_WRITE)
		TH_LOG("a pinned page moved");
	ASSERT_DEV_READ(fd, HMM_DMIRROR_READ, &w, 0x9a7, &cmd);

	hmm_fill(b.ptr, b.size, 0x9a8);
	memset(through, 0, b.size);
	ASSERT_EQ(0, hmm_pin_read(&pin, b.ptr, b.size, through));
	ASSERT_EQ(-1, hmm_check(through, b.size, 0x9a8))
		TH_LOG("the pin does not hold the pages the CPU writes");
	hmm_pin_stop(&pin);
	free(through);
	hmm_buffer_free(&w);
	hmm_buffer_free(&b);
}

TEST_F(placement, evict_pinned_gup)
{
	hmm_place_pinned(_metadata, self->fd, HMM_PIN_GUP);
}

TEST_F(placement, evict_pinned_io_uring)
{
	hmm_place_pinned(_metadata, self->fd, HMM_PIN_IO_URING);
}

/*
 * With a timeslice, a CPU fault right after a migration waits for the end
 * of the slice before it takes the page back (the driver counts the wait,
 * and the time from before the migration to after the fault is at least
 * the slice, less a tick); a fault after the slice does not wait.
 */
TEST_F(placement, timeslice_cpu_fault)
{
	struct hmm_dmirror_stats stats;
	struct hmm_dmirror_cmd cmd;
	struct hmm_buffer b;
	__u64 t0, ms;

	if (variant->coherent)
		SKIP(return, "the CPU reads device-coherent memory without a fault");
	ASSERT_EQ(0, hmm_place_settings(self->fd, 0, HMM_TIMESLICE_MS));
	ASSERT_BUFFER_MAP(&b, HMM_ANON, 2, 0x9a9);
	t0 = hmm_now_ns();
	ASSERT_CMD_ALL(self->fd, HMM_DMIRROR_MIGRATE_TO_DEV, b.ptr, b.mirror,
		       b.npages, &cmd);
	ASSERT_EQ(0, hmm_stats_reset(self->fd));

	ASSERT_EQ(-1, hmm_check(b.ptr, b.page_size, 0x9a9));
	ms = (hmm_now_ns() - t0) / 1000000;
	ASSERT_EQ(0, hmm_stats(self->fd, &stats));
	ASSERT_EQ(1ULL, stats.timeslice_waits);
	ASSERT_LE((__u64)HMM_TIMESLICE_MS - 10, ms)
		TH_LOG("the CPU took the page back after %llu ms", ms);

	ASSERT_EQ(-1, hmm_check(b.ptr, b.size, 0x9a9));
	ASSERT_EQ(0, hmm_stats(self->fd, &stats));
	ASSERT_EQ(1ULL, stats.timeslice_waits) TH_LOG("waited after the slice");
	ASSERT_SNAPSHOT(self->fd, b.ptr, b.npages, b.snap,
			HMM_DMIRROR_PROT_WRITE);
	TH_LOG("the first CPU fault returned %llu ms after the migration", ms);
	hmm_buffer_free(&b);
}

TEST_HARNESS_MAIN
