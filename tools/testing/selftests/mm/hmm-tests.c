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
 * Every test runs on each device: 0 and 1 are device-private; 2 and 3 are
 * device-coherent and exist only when the module was given spm_addr_dev0 and
 * spm_addr_dev1, else their variants are skipped. The suite covers:
 * - device reads and writes of private and shared anonymous memory, of a
 *   shared file mapping, of THP and of hugetlbfs pages: the data on both
 *   sides and the device fault counts;
 * - access rights: PROT_NONE cannot be read, read-only memory cannot be
 *   written until mprotect() allows it;
 * - memory shared with, or copied on write for, a forked child;
 * - READ_UNLOCKED of a range served by userfaultfd;
 * - device reads racing with munmap();
 * - the per-page states SNAPSHOT reports;
 * - rejection of malformed requests.
 *
 * Run it as root with the test_hmm module available:
 *	./test_hmm.sh [-- <hmm-tests arguments>]
 * loads the module, runs this program and unloads the module again; run_vm.sh
 * in the repository does the same in a QEMU guest. "./hmm-tests -l" lists the
 * tests and "-r hmm.<variant>.<test>" runs a single one.
 */

#include "kselftest_harness.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>

/* Private interface of the test module: it is not in include/uapi. */
#include <lib/test_hmm_uapi.h>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE		25
#endif

#define HMM_NPAGES		128	/* size of most test buffers */
#define HMM_UFFD_NPAGES		16
#define HMM_RACE_NPAGES		64
#define HMM_RACE_ROUNDS		50
#define HMM_MAX_HUGETLB_SIZE	(64UL << 20)

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

/* Issue @request, retrying on EINTR: its result, or a negative errno. */
static int hmm_ioctl(int fd, unsigned long request,
		     struct hmm_dmirror_cmd *cmd)
{
	int ret;

	do {
		ret = ioctl(fd, request, cmd);
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

static int hmm_write_long(const char *path, long val)
{
	char buf[32];
	int fd, len, ret = 0;
	ssize_t n;

	len = snprintf(buf, sizeof(buf), "%ld\n", val);
	fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	n = write(fd, buf, len);
	if (n < 0)
		ret = -errno;
	else if (n != len)
		ret = -EIO;
	close(fd);
	return ret;
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

/* Run hmm_child_write() in a child; returns its wait status, -1 on error. */
static int hmm_fork_child_write(int device, char *addr, __u64 npages,
				size_t page_size, __u32 seed)
{
	int status;
	pid_t pid;

	fflush(NULL);
	pid = fork();
	if (pid < 0)
		return -1;
	if (!pid)
		_exit(hmm_child_write(device, addr, npages, page_size, seed));
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return -1;
	return status;
}

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
	if (self->old_nr_hugepages >= 0)
		EXPECT_EQ(0, hmm_write_long(HMM_NR_HUGEPAGES,
					    self->old_nr_hugepages))
			TH_LOG("could not restore %s to %ld", HMM_NR_HUGEPAGES,
			       self->old_nr_hugepages);
}

/*
 * Each open is a separate device with a mirror of its own: a page the
 * fixture's device has faulted in is still new to a second open, and to an
 * open made after closing that one.
 */
TEST_F(hmm, open_close)
{
	size_t size = self->page_size;
	struct hmm_dmirror_cmd cmd;
	char *buf, *mirror;
	int fd, i;

	buf = hmm_map_anon(size, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	ASSERT_NE(NULL, buf);
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);
	hmm_fill(buf, size, 0x0c105e);

	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror, 1, &cmd));
	ASSERT_EQ(1ULL, cmd.faults);

	for (i = 0; i < 2; i++) {
		fd = hmm_open(variant->device);
		ASSERT_GE(fd, 0);
		memset(mirror, 0, size);
		ASSERT_EQ(0, hmm_cmd(fd, HMM_DMIRROR_READ, buf, mirror, 1,
				     &cmd));
		ASSERT_EQ(1ULL, cmd.cpages);
		ASSERT_EQ(1ULL, cmd.faults) TH_LOG("open #%d", i + 2);
		ASSERT_EQ(-1, hmm_check(mirror, size, 0x0c105e));
		ASSERT_EQ(0, close(fd));
	}

	ASSERT_EQ(0, close(self->fd));
	self->fd = -1;
	free(mirror);
	munmap(buf, size);
}

/*
 * The device reads what the CPU wrote. The first read faults the range in
 * once; reading it again, unchanged, takes no fault.
 */
TEST_F(hmm, anon_read)
{
	const __u64 npages = HMM_NPAGES;
	size_t size = npages * self->page_size;
	struct hmm_dmirror_cmd cmd;
	char *buf, *mirror;
	int i;

	buf = hmm_map_anon(size, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	ASSERT_NE(NULL, buf);
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);
	hmm_fill(buf, size, 0xa110c);

	for (i = 0; i < 2; i++) {
		memset(mirror, 0, size);
		ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror,
				     npages, &cmd));
		ASSERT_EQ(npages, cmd.cpages);
		ASSERT_EQ(i ? 0ULL : 1ULL, cmd.faults) TH_LOG("read #%d", i + 1);
		ASSERT_EQ(-1, hmm_check(mirror, size, 0xa110c));
	}
	ASSERT_EQ(-1, hmm_check(buf, size, 0xa110c));

	free(mirror);
	munmap(buf, size);
}

/*
 * The CPU sees what the device wrote into never-touched memory, and the
 * device then reads it back without faulting.
 */
TEST_F(hmm, anon_write)
{
	const __u64 npages = HMM_NPAGES;
	size_t size = npages * self->page_size;
	struct hmm_dmirror_cmd cmd;
	char *buf, *mirror;

	buf = hmm_map_anon(size, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	ASSERT_NE(NULL, buf);
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);

	hmm_fill(mirror, size, 0xd0d0);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_WRITE, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(1ULL, cmd.faults);
	ASSERT_EQ(-1, hmm_check(buf, size, 0xd0d0));

	memset(mirror, 0, size);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(0ULL, cmd.faults);
	ASSERT_EQ(-1, hmm_check(mirror, size, 0xd0d0));

	free(mirror);
	munmap(buf, size);
}

/*
 * PROT_NONE memory cannot be read by the device, whether populated or not,
 * and a failed request reports nothing back. Once readable, it reads fine.
 */
TEST_F(hmm, anon_read_prot_none)
{
	const __u64 npages = HMM_NPAGES;
	size_t size = npages * self->page_size;
	struct hmm_dmirror_cmd cmd;
	char *buf, *mirror;

	buf = hmm_map_anon(size, PROT_NONE, MAP_PRIVATE);
	ASSERT_NE(NULL, buf);
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);

	ASSERT_EQ(-EFAULT, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror,
				   npages, &cmd)) TH_LOG("never populated");
	ASSERT_EQ(HMM_POISON, cmd.cpages);
	ASSERT_EQ(HMM_POISON, cmd.faults);

	ASSERT_EQ(0, mprotect(buf, size, PROT_READ | PROT_WRITE));
	hmm_fill(buf, size, 0x9090);
	ASSERT_EQ(0, mprotect(buf, size, PROT_NONE));
	ASSERT_EQ(-EFAULT, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror,
				   npages, &cmd)) TH_LOG("populated");
	ASSERT_EQ(HMM_POISON, cmd.cpages);

	ASSERT_EQ(0, mprotect(buf, size, PROT_READ));
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(1ULL, cmd.faults);
	ASSERT_EQ(-1, hmm_check(mirror, size, 0x9090));

	free(mirror);
	munmap(buf, size);
}

/*
 * The device can read read-only memory but not write it, even once it has
 * the pages mirrored. After mprotect() makes them writable it can.
 */
TEST_F(hmm, anon_write_read_only)
{
	const __u64 npages = HMM_NPAGES;
	size_t size = npages * self->page_size;
	struct hmm_dmirror_cmd cmd;
	char *buf, *mirror;
	int i;

	buf = hmm_map_anon(size, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	ASSERT_NE(NULL, buf);
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);
	hmm_fill(buf, size, 0x1111);
	ASSERT_EQ(0, mprotect(buf, size, PROT_READ));

	/* Refused before and after the device mirrored the pages for read. */
	for (i = 0; i < 2; i++) {
		hmm_fill(mirror, size, 0x2222);
		ASSERT_EQ(-EPERM, hmm_cmd(self->fd, HMM_DMIRROR_WRITE, buf,
					  mirror, npages, &cmd))
			TH_LOG("write #%d", i + 1);
		ASSERT_EQ(HMM_POISON, cmd.cpages);
		ASSERT_EQ(-1, hmm_check(buf, size, 0x1111));

		ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror,
				     npages, &cmd));
		ASSERT_EQ(npages, cmd.cpages);
		ASSERT_EQ(-1, hmm_check(mirror, size, 0x1111));
	}

	ASSERT_EQ(0, mprotect(buf, size, PROT_READ | PROT_WRITE));
	hmm_fill(mirror, size, 0x2222);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_WRITE, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(-1, hmm_check(buf, size, 0x2222));

	free(mirror);
	munmap(buf, size);
}

/*
 * Reading never-touched anonymous memory gives zeros, from the shared zero
 * page, which SNAPSHOT then reports for every page.
 */
TEST_F(hmm, anon_read_zero_page)
{
	const __u64 npages = HMM_NPAGES;
	size_t size = npages * self->page_size;
	struct hmm_dmirror_cmd cmd;
	unsigned char *snap;
	char *buf, *mirror;
	long bad;

	buf = hmm_map_anon(size, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	ASSERT_NE(NULL, buf);
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);
	snap = malloc(npages);
	ASSERT_NE(NULL, snap);

	memset(mirror, 0xa5, size);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(1ULL, cmd.faults);
	ASSERT_EQ(-1, hmm_check_bytes(mirror, size, 0));

	memset(snap, 0xee, npages);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_SNAPSHOT, buf, snap, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	bad = hmm_check_bytes(snap, npages,
			      HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ);
	ASSERT_EQ(-1, bad) TH_LOG("page %ld: state 0x%02x", bad, snap[bad]);

	free(snap);
	free(mirror);
	munmap(buf, size);
}

/*
 * A MAP_SHARED file mapping: the device reads what pwrite() put in the file
 * and pread() returns what the device wrote through the mapping.
 */
TEST_F(hmm, file_shared)
{
	const __u64 npages = HMM_NPAGES;
	size_t size = npages * self->page_size;
	struct hmm_dmirror_cmd cmd;
	char *buf, *mirror, *io;
	int fd;

	fd = hmm_tmpfile(size);
	if (fd < 0)
		SKIP(return, "no writable directory for a temporary file");
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);
	io = malloc(size);
	ASSERT_NE(NULL, io);

	hmm_fill(io, size, 0xf11e);
	ASSERT_EQ((ssize_t)size, pwrite(fd, io, size, 0));
	buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	ASSERT_NE(MAP_FAILED, buf);

	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(1ULL, cmd.faults);
	ASSERT_EQ(-1, hmm_check(mirror, size, 0xf11e));

	hmm_fill(mirror, size, 0xf00d);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_WRITE, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	memset(io, 0, size);
	ASSERT_EQ((ssize_t)size, pread(fd, io, size, 0));
	ASSERT_EQ(-1, hmm_check(io, size, 0xf00d));
	ASSERT_EQ(-1, hmm_check(buf, size, 0xf00d));

	munmap(buf, size);
	free(io);
	free(mirror);
	close(fd);
}

/*
 * A forked child's device writes MAP_SHARED anonymous memory: the parent
 * sees the data, from the CPU and from its own device.
 */
TEST_F(hmm, anon_shared_child_write)
{
	const __u64 npages = HMM_NPAGES;
	size_t size = npages * self->page_size;
	struct hmm_dmirror_cmd cmd;
	char *buf, *mirror;

	buf = hmm_map_anon(size, PROT_READ | PROT_WRITE, MAP_SHARED);
	ASSERT_NE(NULL, buf);
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);
	hmm_fill(buf, size, 0x5eed);

	ASSERT_EQ(0, hmm_fork_child_write(variant->device, buf, npages,
					  self->page_size, 0xc41d));
	ASSERT_EQ(-1, hmm_check(buf, size, 0xc41d));

	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(-1, hmm_check(mirror, size, 0xc41d));

	free(mirror);
	munmap(buf, size);
}

/*
 * Copy on write: a forked child's device writes its copy of private memory
 * the parent's device had mirrored. The child sees the new data; the parent,
 * from the CPU and from its device, still sees the old.
 */
TEST_F(hmm, anon_cow_child_write)
{
	const __u64 npages = HMM_NPAGES;
	size_t size = npages * self->page_size;
	struct hmm_dmirror_cmd cmd;
	char *buf, *mirror;

	buf = hmm_map_anon(size, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	ASSERT_NE(NULL, buf);
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);
	hmm_fill(buf, size, 0x01d);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);

	ASSERT_EQ(0, hmm_fork_child_write(variant->device, buf, npages,
					  self->page_size, 0x2e3));
	ASSERT_EQ(-1, hmm_check(buf, size, 0x01d));

	memset(mirror, 0, size);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(-1, hmm_check(mirror, size, 0x01d));

	free(mirror);
	munmap(buf, size);
}

/*
 * A transparent huge page: SNAPSHOT reports every page as writable and
 * mapped by a PMD, and the device reads the data.
 */
TEST_F(hmm, anon_thp)
{
	const char *why = hmm_thp_unavailable();
	struct hmm_dmirror_cmd cmd;
	char *map, *buf, *mirror;
	unsigned char *snap;
	__u64 npages;
	long size, bad;

	if (why)
		SKIP(return, "%s", why);
	size = hmm_read_long(HMM_THP_DIR "/hpage_pmd_size");
	if (size <= 0)
		size = 2L << 20;
	npages = size / self->page_size;

	map = mmap(NULL, 2 * size, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ASSERT_NE(MAP_FAILED, map);
	buf = (char *)(((uintptr_t)map + size - 1) & ~((uintptr_t)size - 1));
	ASSERT_EQ(0, madvise(buf, size, MADV_HUGEPAGE));
	hmm_fill(buf, size, 0x7e9);
	/* Make sure of a THP: the write fault may have fallen back. */
	if (madvise(buf, size, MADV_COLLAPSE))
		SKIP(return, "no THP for the range (MADV_COLLAPSE: %s)",
		     strerror(errno));
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);
	snap = malloc(npages);
	ASSERT_NE(NULL, snap);

	memset(snap, 0xee, npages);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_SNAPSHOT, buf, snap, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	bad = hmm_check_bytes(snap, npages,
			      HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD);
	ASSERT_EQ(-1, bad) TH_LOG("page %ld: state 0x%02x", bad, snap[bad]);

	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(1ULL, cmd.faults);
	ASSERT_EQ(-1, hmm_check(mirror, size, 0x7e9));

	free(snap);
	free(mirror);
	munmap(map, 2 * size);
}

/*
 * A hugetlbfs page, from a pool raised by one page for the test (teardown
 * puts nr_hugepages back): the CPU sees what the device wrote, and the
 * device reads it back without faulting.
 */
TEST_F(hmm, anon_hugetlb)
{
	long size_kb = hmm_meminfo_kb("Hugepagesize");
	struct hmm_dmirror_cmd cmd;
	char *buf, *mirror;
	size_t size;
	__u64 npages;
	long old;
	int ret;

	if (size_kb <= 0)
		SKIP(return, "no hugetlb support: no Hugepagesize in /proc/meminfo");
	size = size_kb * 1024;
	if (size > HMM_MAX_HUGETLB_SIZE)
		SKIP(return, "default huge page size (%ld kB) too large for the test",
		     size_kb);
	npages = size / self->page_size;

	old = hmm_read_long(HMM_NR_HUGEPAGES);
	if (old < 0)
		SKIP(return, "cannot read %s", HMM_NR_HUGEPAGES);
	ret = hmm_write_long(HMM_NR_HUGEPAGES, old + 1);
	if (ret)
		SKIP(return, "cannot raise %s: %s", HMM_NR_HUGEPAGES,
		     strerror(-ret));
	self->old_nr_hugepages = old;
	if (hmm_read_long(HMM_NR_HUGEPAGES) <= old)
		SKIP(return, "the kernel could not allocate a huge page");
	buf = mmap(NULL, size, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
	if (buf == MAP_FAILED)
		SKIP(return, "no free huge page to map: %s", strerror(errno));
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);

	hmm_fill(mirror, size, 0x4a9e);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_WRITE, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(1ULL, cmd.faults);
	ASSERT_EQ(-1, hmm_check(buf, size, 0x4a9e));

	memset(mirror, 0, size);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(0ULL, cmd.faults);
	ASSERT_EQ(-1, hmm_check(mirror, size, 0x4a9e));

	free(mirror);
	munmap(buf, size);
}

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
 * READ_UNLOCKED may drop the mmap lock while faulting, so it can mirror a
 * range whose missing pages a userfaultfd thread supplies: the device gets
 * exactly the pages the thread copied in, one UFFDIO_COPY per page.
 */
TEST_F(hmm, read_unlocked_userfaultfd)
{
	const __u64 npages = HMM_UFFD_NPAGES;
	size_t size = npages * self->page_size;
	struct hmm_uffd_server srv = { 0 };
	struct uffdio_register reg = { 0 };
	struct uffdio_api api = { 0 };
	struct hmm_dmirror_cmd cmd;
	char *buf, *mirror, *src;
	pthread_t thread;
	int stop[2], ret;

	/* Fails only for want of CONFIG_USERFAULTFD, permission or memory. */
	srv.uffd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (srv.uffd < 0)
		SKIP(return, "userfaultfd() unavailable: %s", strerror(errno));
	api.api = UFFD_API;
	ASSERT_EQ(0, ioctl(srv.uffd, UFFDIO_API, &api));

	buf = hmm_map_anon(size, PROT_READ | PROT_WRITE, MAP_PRIVATE);
	ASSERT_NE(NULL, buf);
	reg.range.start = (uintptr_t)buf;
	reg.range.len = size;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	ASSERT_EQ(0, ioctl(srv.uffd, UFFDIO_REGISTER, &reg));
	src = malloc(size);
	ASSERT_NE(NULL, src);
	hmm_fill(src, size, 0x0ffd);
	mirror = malloc(size);
	ASSERT_NE(NULL, mirror);
	ASSERT_EQ(0, pipe2(stop, O_CLOEXEC));

	srv.stop_fd = stop[0];
	srv.base = buf;
	srv.src = src;
	srv.size = size;
	srv.page_size = self->page_size;
	ASSERT_EQ(0, pthread_create(&thread, NULL, hmm_uffd_thread, &srv));
	ret = hmm_cmd(self->fd, HMM_DMIRROR_READ_UNLOCKED, buf, mirror, npages,
		      &cmd);
	ASSERT_EQ(1, write(stop[1], "", 1));
	ASSERT_EQ(0, pthread_join(thread, NULL));

	ASSERT_EQ(0, srv.err);
	ASSERT_EQ(0, ret);
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(npages, srv.copied);
	ASSERT_EQ(-1, hmm_check(mirror, size, 0x0ffd));
	ASSERT_EQ(-1, hmm_check(buf, size, 0x0ffd));

	close(stop[0]);
	close(stop[1]);
	close(srv.uffd);
	free(mirror);
	free(src);
	munmap(buf, size);
}

struct hmm_unmap_race {
	pthread_barrier_t	start;
	char			*addr;	/* what to munmap() */
	size_t			len;
	int			err;	/* errno of munmap(), 0 if none */
	int			done;	/* set once munmap() returned */
};

static void *hmm_unmap_thread(void *arg)
{
	struct hmm_unmap_race *race = arg;

	pthread_barrier_wait(&race->start);
	if (munmap(race->addr, race->len))
		race->err = errno;
	__atomic_store_n(&race->done, 1, __ATOMIC_RELEASE);
	return NULL;
}

/*
 * Device reads of a whole buffer while another thread unmaps its second
 * half: each read either fails with EFAULT or returns all of the data, and
 * once munmap() has returned, reads fail.
 */
TEST_F(hmm, read_vs_munmap)
{
	const __u64 npages = HMM_RACE_NPAGES;
	size_t size = npages * self->page_size, half = size / 2;
	unsigned long nread = 0, nfault = 0;
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
		race.addr = buf + half;
		race.len = size - half;
		race.err = 0;
		race.done = 0;
		ASSERT_EQ(0, pthread_barrier_init(&race.start, NULL, 2));
		ASSERT_EQ(0, pthread_create(&thread, NULL, hmm_unmap_thread,
					    &race));
		pthread_barrier_wait(&race.start);

		do {
			done = __atomic_load_n(&race.done, __ATOMIC_ACQUIRE);
			ret = hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror,
				      npages, &cmd);
			if (ret == -EFAULT) {
				nfault++;
				continue;
			}
			ASSERT_EQ(0, ret) TH_LOG("round %u", round);
			ASSERT_FALSE(done) TH_LOG("read after munmap() returned");
			ASSERT_EQ(npages, cmd.cpages);
			ASSERT_EQ(-1, hmm_check(mirror, size, round));
			nread++;
		} while (!done);

		ASSERT_EQ(0, pthread_join(thread, NULL));
		ASSERT_EQ(0, race.err);
		ASSERT_EQ(0, pthread_barrier_destroy(&race.start));

		/* What is left of the buffer still reads fine. */
		memset(mirror, 0, size);
		ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, buf, mirror,
				     npages / 2, &cmd));
		ASSERT_EQ(npages / 2, cmd.cpages);
		ASSERT_EQ(-1, hmm_check(mirror, half, round));
		ASSERT_EQ(0, munmap(buf, half));
	}
	TH_LOG("%lu whole reads, %lu EFAULT", nread, nfault);
	free(mirror);
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

/* err[] is READ, WRITE, READ_UNLOCKED, SNAPSHOT. */
static const struct hmm_bad_case hmm_bad_cases[] = {
	{
		.name = "unaligned addr",
		.range = HMM_RANGE_UNALIGNED,
		.err = { EINVAL, EINVAL, EINVAL, EINVAL },
	}, {
		.name = "range wraps around",
		.range = HMM_RANGE_WRAP,
		.err = { EINVAL, EINVAL, EINVAL, EINVAL },
	}, {
		.name = "npages 0",
		.range = HMM_RANGE_EMPTY,
		.err = { EINVAL, EINVAL, EINVAL, EINVAL },
	}, {
		.name = "npages 1 << 52",
		.range = HMM_RANGE_HUGE,
		.err = { EINVAL, EINVAL, EINVAL, EINVAL },
	}, {
		.name = "range ends past the user address space",
		.range = HMM_RANGE_PAST_VA,
		.err = { EINVAL, EINVAL, EINVAL, EINVAL },
	}, {
		.name = "NULL ptr",
		.ptr = HMM_PTR_NULL,
		.err = { EFAULT, EFAULT, EFAULT, EFAULT },
	}, {
		.name = "ptr to an unmapped page",
		.ptr = HMM_PTR_UNMAPPED,
		.err = { EFAULT, EFAULT, EFAULT, EFAULT },
	}, {
		.name = "PROT_NONE addr",
		.range = HMM_RANGE_PROT_NONE,
		.err = { EFAULT, EFAULT, EFAULT, 0 },
	}, {
		.name = "NULL cmd",
		.null_cmd = true,
		.err = { EFAULT, EFAULT, EFAULT, EFAULT },
	}, {
		.name = "unknown ioctl 0x7f",
		.request = _IOWR('H', 0x7f, struct hmm_dmirror_cmd),
		.err = { ENOTTY },
	}, {
		.name = "unknown ioctl 0x0a",
		.request = _IOWR('H', 0x0a, struct hmm_dmirror_cmd),
		.err = { ENOTTY },
	}, {
		.name = "READ with the wrong argument size",
		.request = _IOWR('H', 0x00, __u64),
		.err = { ENOTTY },
	},
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
			hmm_bad_cmd(c, &env, &cmd);
			EXPECT_EQ(-c->err[op],
				  hmm_ioctl(self->fd, request,
					    c->null_cmd ? NULL : &cmd))
				TH_LOG("%s, %s", c->name, hmm_ops[op].name);
			EXPECT_EQ(HMM_POISON, cmd.cpages)
				TH_LOG("%s, %s: cpages written back", c->name,
				       hmm_ops[op].name);
			EXPECT_EQ(HMM_POISON, cmd.faults)
				TH_LOG("%s, %s: faults written back", c->name,
				       hmm_ops[op].name);
		}
	}

	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_READ, env.buf, env.mirror,
			     1, &cmd));
	ASSERT_EQ(1ULL, cmd.cpages);
	ASSERT_EQ(-1, hmm_check(env.mirror, ps, 0xbad));

	free(env.mirror);
	munmap(env.prot_none, ps);
	munmap(env.buf, ps);
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
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_SNAPSHOT, buf, snap, npages,
			     &cmd));
	ASSERT_EQ(npages, cmd.cpages);
	ASSERT_EQ(0ULL, cmd.faults);
	for (i = 0; i < ARRAY_SIZE(hmm_snap_cases); i++) {
		p = (char *)snap + i * HMM_SNAP_CASE_PAGES;
		bad = hmm_check_bytes(p, HMM_SNAP_CASE_PAGES,
				      hmm_snap_cases[i].state);
		EXPECT_EQ(-1, bad)
			TH_LOG("%s: state 0x%02x, expected 0x%02x",
			       hmm_snap_cases[i].name, p[bad] & 0xff,
			       hmm_snap_cases[i].state);
	}

	memset(again, 0xee, npages);
	ASSERT_EQ(0, hmm_cmd(self->fd, HMM_DMIRROR_SNAPSHOT, buf, again,
			     npages, &cmd));
	ASSERT_EQ(0, memcmp(snap, again, npages));

	munmap(buf, size);
}

TEST_HARNESS_MAIN
