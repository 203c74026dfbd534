// SPDX-License-Identifier: GPL-2.0
/*
 * Benchmark of multi-device invalidation with the HMM test device.
 *
 * N devices (1, 2, 4, 8) mirror one small range; the time of one munmap() of
 * that range is measured with every device in single-pass mode and then in
 * two-pass mode, at a fixed emulated TLB flush latency L. A single-pass
 * device waits for its flush before the next device is even asked, so the
 * munmap() costs about N * L; two-pass devices all start their flush first
 * and are waited for second, about L.
 *
 * Each table also gives the cost at L = 0, the fixed cost of the munmap()
 * and of the notifier calls, so that (two-pass - fixed) / L shows how much
 * of one flush latency two-pass invalidation costs.
 *
 * It first measures migration throughput to device-private memory and back,
 * with 4 KiB pages and with THP, using only the kernel's own ioctls, so that
 * the same program measures the kernel's own test_hmm driver too; with this
 * repository's driver, also where the time of the 8 and 64 MiB migrations
 * goes (its phase counters in HMM_DMIRROR_STATS). Then,
 * with the interconnect groups test_hmm.sh sets up, migration from one
 * device's memory to another's: directly within a group (one copy) and
 * through system memory between groups (two). Then oversubscription: a
 * working set of 1, 2 and 4 times a device memory cap, advised to the
 * device and read by it in 2 MiB steps, in order and at random, so that
 * device faults migrate it in and evict the least recently used memory
 * (the same order every pass is LRU's worst case: every step misses).
 *
 * Usage: hmm-bench [-M] [-l latency_us]... [-r runs]   (root, test_hmm loaded)
 * -M: migration only.
 * Each table is printed for people ("# " lines) and once more as CSV: lines
 * "csv,<table>,<column>,..." (the first of each table its header), which
 * run_vm.sh --bench collects into CSV files and plots.
 * Default: tables at L = 200 us (the driver's default) and 2000 us.
 * run_vm.sh --bench runs it in the QEMU guest.
 */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/types.h>

#include <lib/test_hmm_uapi.h>

#define BENCH_PAGES		16
#define ARRAY_SIZE(a)		(sizeof(a) / sizeof((a)[0]))
#define BENCH_MAX_DEVICES	8

/* Device-private devices: 0 and 1, then 4 and up (2 and 3 are coherent). */
static const int bench_device_ids[BENCH_MAX_DEVICES] = {
	0, 1, 4, 5, 6, 7, 8, 9
};

static const int bench_device_counts[] = { 1, 2, 4, 8 };

/* Open /dev/hmm_dmirror<@id>: the file, or -1 with errno set. */
static int bench_dev_open(int id)
{
	char path[32];

	snprintf(path, sizeof(path), "/dev/hmm_dmirror%d", id);
	return open(path, O_RDWR | O_CLOEXEC);
}

static int bench_open(int id, __u32 invalidation, __u64 latency_ns)
{
	struct hmm_dmirror_settings set = {
		.notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF,
		.invalidation = invalidation,
		.flush_latency_ns = latency_ns,
		.leaf_size = 2UL << 20,
	};
	int fd = bench_dev_open(id);

	if (fd < 0) {
		fprintf(stderr, "open /dev/hmm_dmirror%d: %s\n", id,
			strerror(errno));
		exit(1);
	}
	if (ioctl(fd, HMM_DMIRROR_SET_SETTINGS, &set)) {
		fprintf(stderr, "settings of /dev/hmm_dmirror%d: %s\n", id,
			strerror(errno));
		exit(1);
	}
	return fd;
}

static double bench_now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

/* One sample: map, mirror on every device, time the munmap(). */
static double bench_munmap_once(const int *fds, int ndev, char *mirror)
{
	size_t size = BENCH_PAGES * (size_t)getpagesize();
	struct hmm_dmirror_cmd cmd;
	double t0;
	char *buf;
	int i;

	buf = mmap(NULL, size, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	memset(buf, 0x5a, size);
	for (i = 0; i < ndev; i++) {
		memset(&cmd, 0, sizeof(cmd));
		cmd.addr = (__u64)(unsigned long)buf;
		cmd.ptr = (__u64)(unsigned long)mirror;
		cmd.npages = BENCH_PAGES;
		if (ioctl(fds[i], HMM_DMIRROR_READ, &cmd)) {
			perror("HMM_DMIRROR_READ");
			exit(1);
		}
	}
	t0 = bench_now_us();
	munmap(buf, size);
	return bench_now_us() - t0;
}

static int bench_cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/*
 * Median munmap() time, in us, with @ndev devices in mode @invalidation; 0
 * devices: of the munmap() alone.
 */
static double bench_config(int ndev, __u32 invalidation, __u64 latency_ns,
			   int runs)
{
	char mirror[BENCH_PAGES * 4096 * 4];
	int fds[BENCH_MAX_DEVICES] = { 0 };
	double *samples, median;
	int i;

	if (ndev < 0 || ndev > BENCH_MAX_DEVICES) {
		fprintf(stderr, "hmm-bench: %d devices, 0 to %d possible\n",
			ndev, BENCH_MAX_DEVICES);
		exit(1);
	}
	samples = calloc(runs, sizeof(*samples));
	if (!samples)
		exit(1);
	for (i = 0; i < ndev; i++)
		fds[i] = bench_open(bench_device_ids[i], invalidation,
				    latency_ns);
	/* One warm-up round binds the mirrors and inserts the notifiers. */
	bench_munmap_once(fds, ndev, mirror);
	for (i = 0; i < runs; i++)
		samples[i] = bench_munmap_once(fds, ndev, mirror);
	for (i = 0; i < ndev; i++)
		close(fds[i]);
	qsort(samples, runs, sizeof(*samples), bench_cmp);
	median = samples[runs / 2];
	free(samples);
	return median;
}

/* ------------------------------------------------------------------------
 * Migration throughput
 */

#define MIG_RUNS		5
#define MIG_THP_SIZE		(2UL << 20)

static const unsigned long mig_sizes_mb[] = { 2, 8, 32, 64 };

static int mig_cmd(int fd, unsigned long req, void *addr, void *ptr,
		   unsigned long npages)
{
	struct hmm_dmirror_cmd cmd = {
		.addr = (__u64)(unsigned long)addr,
		.ptr = (__u64)(unsigned long)ptr,
		.npages = npages,
	};

	if (ioctl(fd, req, &cmd))
		return -errno;
	/* Reported, not fatal: the point is to compare drivers. */
	if (cmd.cpages != npages)
		printf("# note: %s reported %llu of %lu pages moved\n",
		       req == HMM_DMIRROR_MIGRATE_TO_DEV ? "to device" : "to system",
		       (unsigned long long)cmd.cpages, npages);
	return 0;
}

/* Map @size bytes aligned to 2 MiB, THP or 4 KiB pages, filled. */
static char *mig_map(size_t size, int thp, void **raw)
{
	char *p = mmap(NULL, size + MIG_THP_SIZE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	*raw = p;
	p = (char *)(((unsigned long)p + MIG_THP_SIZE - 1) &
		     ~(MIG_THP_SIZE - 1));
	madvise(p, size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
	memset(p, 0x3c, size);
	return p;
}

/* MiB/s of moving @size bytes in the median of MIG_RUNS times @us (sorted). */
static double mig_mibps(size_t size, double *us)
{
	qsort(us, MIG_RUNS, sizeof(double), bench_cmp);
	return size / 1048576.0 / (us[MIG_RUNS / 2] / 1e6);
}

/* One migration request of a measurement: @req through device file @fd. */
struct mig_step {
	int		fd;
	unsigned long	req;
};

/* The migration phases the driver times (HMM_DMIRROR_STATS), as printed. */
#define MIG_NR_PHASES		6

static const char *const mig_phase_names[MIG_NR_PHASES] = {
	"setup", "copy", "chunks", "pages", "finalize", "readback",
};

/*
 * Where the time of the two steps of a measurement went: the wall time and
 * the driver's phases, in ms, summed over the runs. Only for a driver with
 * the phase counters (valid).
 */
struct mig_breakdown {
	int	valid;
	double	total_ms[2];
	double	phase_ms[2][MIG_NR_PHASES];
};

/* The phase counters of the device behind @fd, in ms; -errno without. */
static int mig_phases(int fd, double ms[MIG_NR_PHASES])
{
	struct hmm_dmirror_stats st;

	memset(&st, 0, sizeof(st));
	if (ioctl(fd, HMM_DMIRROR_STATS, &st))
		return -errno;
	ms[0] = st.migrate_setup_ns / 1e6;
	ms[1] = (st.migrate_copy_ns - st.migrate_chunk_ns) / 1e6;
	ms[2] = st.migrate_chunk_ns / 1e6;
	ms[3] = st.migrate_pages_ns / 1e6;
	ms[4] = st.migrate_finalize_ns / 1e6;
	ms[5] = st.migrate_readback_ns / 1e6;
	return 0;
}

/*
 * MIG_RUNS times: map @size bytes, THP or 4 KiB pages, and run the two
 * steps on them one after the other, each timed; the median MiB/s of each
 * step into @out, and where the time went into @bd (NULL: not wanted).
 */
static int mig_steps(const struct mig_step step[2], size_t size, int thp,
		     double out[2], struct mig_breakdown *bd)
{
	unsigned long npages = size / getpagesize();
	double us[2][MIG_RUNS], t0, before[MIG_NR_PHASES], after[MIG_NR_PHASES];
	char *mirror = malloc(size);
	int i, k, p, ret = 0;

	if (!mirror)
		exit(1);
	if (bd) {
		memset(bd, 0, sizeof(*bd));
		bd->valid = !mig_phases(step[0].fd, before) &&
			    !mig_phases(step[1].fd, before);
	}
	for (i = 0; i < MIG_RUNS && !ret; i++) {
		void *raw;
		char *buf = mig_map(size, thp, &raw);

		for (k = 0; k < 2 && !ret; k++) {
			if (bd && bd->valid)
				mig_phases(step[k].fd, before);
			t0 = bench_now_us();
			ret = mig_cmd(step[k].fd, step[k].req, buf, mirror,
				      npages);
			us[k][i] = bench_now_us() - t0;
			if (!bd || !bd->valid)
				continue;
			mig_phases(step[k].fd, after);
			bd->total_ms[k] += us[k][i] / 1e3;
			for (p = 0; p < MIG_NR_PHASES; p++)
				bd->phase_ms[k][p] += after[p] - before[p];
		}
		munmap(raw, size + MIG_THP_SIZE);
	}
	free(mirror);
	if (ret)
		return ret;
	out[0] = mig_mibps(size, us[0]);
	out[1] = mig_mibps(size, us[1]);
	return 0;
}

/*
 * Median MiB/s of moving @size bytes to the device (@out[0]) and back
 * (@out[1]), with THP or with 4 KiB pages.
 */
static int mig_measure(int fd, size_t size, int thp, double out[2],
		       struct mig_breakdown *bd)
{
	const struct mig_step step[2] = {
		{ fd, HMM_DMIRROR_MIGRATE_TO_DEV },
		{ fd, HMM_DMIRROR_MIGRATE_TO_SYS },
	};

	return mig_steps(step, size, thp, out, bd);
}

/* The sizes whose phases are printed, and their breakdowns [size][thp]. */
static const unsigned long mig_phase_sizes_mb[] = { 8, 64 };
static struct mig_breakdown mig_bd[2][2];

/* Where the time of the migrations of mig_phase_sizes_mb went, in ms. */
static void mig_print_phases(void)
{
	static const char *const dir[2] = { "s->d", "d->s" };
	unsigned int i, thp, k, p;
	double rest;

	if (!mig_bd[0][0].valid)
		return;
	printf("# migration phases, ms per migration, mean of %d runs ", MIG_RUNS);
	printf("(copy: allocation and copy, less chunks; other: the rest of the ioctl)\n");
	printf("# %6s %5s %4s %8s", "MiB", "pages", "dir", "total");
	for (p = 0; p < MIG_NR_PHASES; p++)
		printf(" %8s", mig_phase_names[p]);
	printf(" %8s\n", "other");
	printf("csv,migration_phases,mib,pages,dir,total_ms");
	for (p = 0; p < MIG_NR_PHASES; p++)
		printf(",%s_ms", mig_phase_names[p]);
	printf(",other_ms\n");
	for (i = 0; i < ARRAY_SIZE(mig_phase_sizes_mb); i++)
		for (thp = 0; thp < 2; thp++)
			for (k = 0; k < 2; k++) {
				const struct mig_breakdown *bd = &mig_bd[i][thp];

				rest = bd->total_ms[k];
				printf("# %6lu %5s %4s %8.2f",
				       mig_phase_sizes_mb[i],
				       thp ? "THP" : "4K", dir[k],
				       bd->total_ms[k] / MIG_RUNS);
				for (p = 0; p < MIG_NR_PHASES; p++) {
					printf(" %8.2f",
					       bd->phase_ms[k][p] / MIG_RUNS);
					rest -= bd->phase_ms[k][p];
				}
				printf(" %8.2f\n", rest / MIG_RUNS);
				printf("csv,migration_phases,%lu,%s,%s,%.3f",
				       mig_phase_sizes_mb[i],
				       thp ? "thp" : "4k", k ? "d2s" : "s2d",
				       bd->total_ms[k] / MIG_RUNS);
				for (p = 0; p < MIG_NR_PHASES; p++)
					printf(",%.3f",
					       bd->phase_ms[k][p] / MIG_RUNS);
				printf(",%.3f\n", rest / MIG_RUNS);
			}
}

/* mig_bd's entry for @size_mb, or NULL if its phases are not printed. */
static struct mig_breakdown *mig_breakdown_of(unsigned long size_mb, int thp)
{
	unsigned int i;

	for (i = 0; i < ARRAY_SIZE(mig_phase_sizes_mb); i++)
		if (mig_phase_sizes_mb[i] == size_mb)
			return &mig_bd[i][thp];
	return NULL;
}

/* The migration table; uses only upstream's ioctls. */
static int mig_table(void)
{
	int fd = bench_dev_open(0);
	unsigned int i;

	if (fd < 0) {
		perror("open /dev/hmm_dmirror0");
		return 1;
	}
	printf("# migration throughput, MiB/s, median of %d runs ", MIG_RUNS);
	printf("(sys->dev includes the device's read-back)\n");
	printf("# %6s %12s %12s %12s %12s %8s %8s\n", "MiB", "4K s->d",
	       "THP s->d", "4K d->s", "THP d->s", "THP/4K", "THP/4K");
	printf("csv,migration,mib,4k_s2d,thp_s2d,4k_d2s,thp_d2s\n");
	for (i = 0; i < ARRAY_SIZE(mig_sizes_mb); i++) {
		size_t size = mig_sizes_mb[i] << 20;
		double small[2], huge[2];
		int ret;

		ret = mig_measure(fd, size, 0, small,
				  mig_breakdown_of(mig_sizes_mb[i], 0));
		if (!ret)
			ret = mig_measure(fd, size, 1, huge,
					  mig_breakdown_of(mig_sizes_mb[i], 1));
		if (ret) {
			printf("# %6lu migration failed: %s\n", mig_sizes_mb[i],
			       strerror(-ret));
			close(fd);
			return 1;
		}
		printf("# %6lu %12.0f %12.0f %12.0f %12.0f %8.2f %8.2f\n",
		       mig_sizes_mb[i], small[0], huge[0], small[1], huge[1],
		       huge[0] / small[0], huge[1] / small[1]);
		printf("csv,migration,%lu,%.1f,%.1f,%.1f,%.1f\n",
		       mig_sizes_mb[i], small[0], huge[0], small[1], huge[1]);
	}
	close(fd);
	mig_print_phases();
	return 0;
}

/* ------------------------------------------------------------------------
 * Device-to-device migration
 */

/* Devices of test_hmm.sh's interconnect groups 10-17 and 18-19. */
#define PEER_FROM		10
#define PEER_SAME_GROUP		11
#define PEER_OTHER_GROUP	18
#define PEER_SIZE_MB		64

/* The interconnect group of device @id, opened into *@fd; -1 if unknown. */
static long peer_open(int id, int *fd)
{
	struct hmm_dmirror_stats stats;

	*fd = bench_dev_open(id);
	if (*fd < 0 || ioctl(*fd, HMM_DMIRROR_STATS, &stats))
		return -1;
	return stats.interconnect_group;
}

/*
 * Median MiB/s of MIGRATE_TO_DEV through @to of @size bytes that are in
 * @from's memory (put there first by the step before it); it includes the
 * read-back.
 */
static int peer_measure(int from, int to, size_t size, int thp, double *out)
{
	const struct mig_step step[2] = {
		{ from, HMM_DMIRROR_MIGRATE_TO_DEV },
		{ to, HMM_DMIRROR_MIGRATE_TO_DEV },
	};
	double mibps[2];
	int ret = mig_steps(step, size, thp, mibps, NULL);

	*out = mibps[1];
	return ret;
}

/* The device-to-device table, if the groups are there. */
static int peer_table(void)
{
	size_t size = (size_t)PEER_SIZE_MB << 20;
	int from, same, other, thp, ret = 0;
	long group, same_group, other_group;

	group = peer_open(PEER_FROM, &from);
	same_group = peer_open(PEER_SAME_GROUP, &same);
	other_group = peer_open(PEER_OTHER_GROUP, &other);
	if (group <= 0 || same_group != group || other_group <= 0 ||
	    other_group == group) {
		printf("# device-to-device migration skipped: ");
		printf("devices %d and %d in one interconnect group, %d in another needed\n",
		       PEER_FROM, PEER_SAME_GROUP, PEER_OTHER_GROUP);
		goto out;
	}
	printf("# device-to-device migration of %d MiB, MiB/s, ", PEER_SIZE_MB);
	printf("median of %d runs (includes the read-back)\n", MIG_RUNS);
	printf("# %6s %14s %14s %14s\n", "pages", "direct", "via system",
	       "direct/via");
	for (thp = 0; thp < 2 && !ret; thp++) {
		double direct, via;

		ret = peer_measure(from, same, size, thp, &direct);
		if (!ret)
			ret = peer_measure(from, other, size, thp, &via);
		if (ret)
			printf("# %6s migration failed: %s\n",
			       thp ? "THP" : "4K", strerror(-ret));
		else
			printf("# %6s %14.0f %14.0f %14.2f\n",
			       thp ? "THP" : "4K", direct, via, direct / via);
	}
out:
	if (from >= 0)
		close(from);
	if (same >= 0)
		close(same);
	if (other >= 0)
		close(other);
	return ret ? 1 : 0;
}

/* ------------------------------------------------------------------------
 * Oversubscription
 */

#define OVER_CAP_MB		16
#define OVER_PASSES		2
#define OVER_STEP		MIG_THP_SIZE

static const int over_factors[] = { 1, 2, 4 };

/* Set device @fd's memory limit: 0 or -errno. */
static int over_limit(int fd, __u32 limit_mb)
{
	struct hmm_dmirror_settings set;

	if (ioctl(fd, HMM_DMIRROR_GET_SETTINGS, &set))
		return -errno;
	set.memory_limit_mb = limit_mb;
	return ioctl(fd, HMM_DMIRROR_SET_SETTINGS, &set) ? -errno : 0;
}

/*
 * OVER_PASSES passes of device reads over @size bytes advised to the
 * device, in OVER_STEP steps, in order or in a fixed random order: MiB/s
 * read into *@mibps, evictions per MiB read into *@evictions.
 */
static int over_measure(int fd, size_t size, int shuffle, double *mibps,
			double *evictions)
{
	unsigned long nsteps = size / OVER_STEP, i, j, *order;
	struct hmm_dmirror_advice advice = {
		.npages = size / getpagesize(),
		.location = HMM_DMIRROR_LOC_DEVICE,
		.policy = HMM_DMIRROR_FAULT_MIGRATE,
		.granule_shift = 21,
	};
	struct hmm_dmirror_stats stats;
	char *mirror = malloc(OVER_STEP);
	unsigned int seed = 1;
	int pass, ret = 0;
	double t0, mib;
	void *raw;
	char *buf;

	order = calloc(nsteps, sizeof(*order));
	if (!mirror || !order)
		exit(1);
	for (i = 0; i < nsteps; i++)
		order[i] = i;
	buf = mig_map(size, 1, &raw);
	advice.addr = (__u64)(unsigned long)buf;
	if (ioctl(fd, HMM_DMIRROR_ADVISE, &advice) ||
	    ioctl(fd, HMM_DMIRROR_STATS_RESET))
		ret = -errno;
	t0 = bench_now_us();
	for (pass = 0; pass < OVER_PASSES && !ret; pass++) {
		/* A new random order each pass (Fisher-Yates). */
		for (i = nsteps - 1; shuffle && i > 0; i--) {
			unsigned long t = order[i];

			j = rand_r(&seed) % (i + 1);
			order[i] = order[j];
			order[j] = t;
		}
		for (i = 0; i < nsteps && !ret; i++)
			ret = mig_cmd(fd, HMM_DMIRROR_READ,
				      buf + order[i] * OVER_STEP, mirror,
				      OVER_STEP / getpagesize());
	}
	mib = OVER_PASSES * size / 1048576.0;
	*mibps = mib / ((bench_now_us() - t0) / 1e6);
	if (!ret && ioctl(fd, HMM_DMIRROR_STATS, &stats))
		ret = -errno;
	*evictions = ret ? 0 : stats.evictions / mib;
	ioctl(fd, HMM_DMIRROR_RELEASE, NULL);
	munmap(raw, size + MIG_THP_SIZE);
	free(order);
	free(mirror);
	return ret;
}

/* The oversubscription table, if the driver has placement advice. */
static int over_table(void)
{
	int fd = bench_dev_open(0);
	unsigned int i;
	int shuffle, ret = 0;

	if (fd < 0 || over_limit(fd, OVER_CAP_MB)) {
		printf("# oversubscription skipped: no memory limit setting\n");
		if (fd >= 0)
			close(fd);
		return 0;
	}
	printf("# oversubscription: device memory capped at %d MiB, ",
	       OVER_CAP_MB);
	printf("advised to the device, %d passes of device reads in 2 MiB steps\n",
	       OVER_PASSES);
	printf("# %8s %8s %10s %14s\n", "set/cap", "order", "MiB/s",
	       "evictions/MiB");
	for (i = 0; i < ARRAY_SIZE(over_factors) && !ret; i++) {
		for (shuffle = 0; shuffle < 2 && !ret; shuffle++) {
			size_t size = (size_t)over_factors[i] * OVER_CAP_MB << 20;
			double mibps, evictions;

			ret = over_measure(fd, size, shuffle, &mibps,
					   &evictions);
			if (ret)
				printf("# %8d failed: %s\n", over_factors[i],
				       strerror(-ret));
			else
				printf("# %8d %8s %10.0f %14.2f\n",
				       over_factors[i],
				       shuffle ? "random" : "in order", mibps,
				       evictions);
		}
	}
	over_limit(fd, 0);
	close(fd);
	return ret ? 1 : 0;
}

/* Reset the statistics of the devices the munmap() tables use. */
static void bench_stats_reset(void)
{
	int i, fd;

	for (i = 0; i < BENCH_MAX_DEVICES; i++) {
		fd = bench_dev_open(bench_device_ids[i]);
		if (fd < 0)
			continue;
		ioctl(fd, HMM_DMIRROR_STATS_RESET);
		close(fd);
	}
}

/*
 * How long a wake-up from a sleep takes in this machine, as the driver
 * measured it on its flush waits (-1 for a driver without the statistics),
 * and, on the devices the tables use since bench_stats_reset(), how many
 * flush waits slept and how many flushes there were.
 */
static void bench_flush_waits(double *wake_us, long long *sleeps,
			      long long *flushes)
{
	struct hmm_dmirror_stats st;
	int i, fd;

	*wake_us = -1;
	*sleeps = 0;
	*flushes = 0;
	for (i = 0; i < BENCH_MAX_DEVICES; i++) {
		fd = bench_dev_open(bench_device_ids[i]);
		if (fd < 0)
			continue;
		memset(&st, 0, sizeof(st));
		if (!ioctl(fd, HMM_DMIRROR_STATS, &st)) {
			*wake_us = st.flush_wake_ns / 1e3;
			*sleeps += st.flush_sleeps;
			*flushes += st.flushes;
		}
		close(fd);
	}
}

/* One table: every device count at flush latency @latency_us. */
static void bench_table(unsigned long latency_us, int runs)
{
	long long sleeps, flushes;
	double wake_us;
	unsigned int i;

	printf("# munmap() of %d pages mirrored by N devices, ", BENCH_PAGES);
	printf("flush latency L = %lu us, median of %d runs\n", latency_us,
	       runs);
	bench_stats_reset();
	printf("# munmap() alone, no device: %.1f us\n",
	       bench_config(0, HMM_DMIRROR_TWO_PASS, 0, runs));
	printf("# %7s %10s %16s %14s %11s %15s\n", "devices", "L=0 us",
	       "single-pass us", "two-pass us", "single/two",
	       "(two-L=0)/L");
	printf("csv,munmap_%lu,devices,fixed_us,single_us,two_us\n",
	       latency_us);
	for (i = 0; i < sizeof(bench_device_counts) / sizeof(int); i++) {
		int n = bench_device_counts[i];
		double base, single, two;

		/* Without latency the modes cost the same: the fixed cost. */
		base = bench_config(n, HMM_DMIRROR_TWO_PASS, 0, runs);
		single = bench_config(n, HMM_DMIRROR_SINGLE_PASS,
				      latency_us * 1000, runs);
		two = bench_config(n, HMM_DMIRROR_TWO_PASS, latency_us * 1000,
				   runs);
		printf("# %7d %10.1f %16.1f %14.1f %11.2f %15.2f\n", n, base,
		       single, two, single / two, (two - base) / latency_us);
		printf("csv,munmap_%lu,%d,%.1f,%.1f,%.1f\n", latency_us, n,
		       base, single, two);
	}
	bench_flush_waits(&wake_us, &sleeps, &flushes);
	printf("# a wake-up from a sleep costs %.1f us here (the driver's measure); ",
	       wake_us);
	printf("%lld flush waits slept (%lld flushes, L = 0 included)\n",
	       sleeps, flushes);
}

int main(int argc, char **argv)
{
	unsigned long latencies[8] = { 200, 2000 };
	int runs = 51, opt, migration_only = 0;
	unsigned int nlat = 0, i;
	struct hmm_dmirror_settings set;
	int fd;

	while ((opt = getopt(argc, argv, "Ml:r:")) != -1) {
		switch (opt) {
		case 'M':
			migration_only = 1;
			break;
		case 'l':
			if (nlat == 8)
				return 2;
			latencies[nlat++] = strtoul(optarg, NULL, 0);
			break;
		case 'r':
			runs = atoi(optarg);
			break;
		default:
			fprintf(stderr, "usage: %s [-M] [-l latency_us]... [-r runs]\n",
				argv[0]);
			return 2;
		}
	}
	if (!nlat)
		nlat = 2;
	if (runs < 1 || getpagesize() > 4096 * 4) {
		fprintf(stderr, "bad arguments\n");
		return 2;
	}
	if (mig_table())
		return 1;
	if (migration_only)
		return 0;
	if (peer_table() || over_table())
		return 1;

	/* The kernel's own driver has no invalidation settings. */
	fd = bench_dev_open(0);
	if (fd < 0 || ioctl(fd, HMM_DMIRROR_GET_SETTINGS, &set)) {
		printf("# invalidation benchmark skipped: no settings ioctl\n");
		return 0;
	}
	close(fd);
	for (i = 0; i < nlat; i++) {
		if (!latencies[i]) {
			fprintf(stderr, "latency must be > 0\n");
			return 2;
		}
		bench_table(latencies[i], runs);
	}
	return 0;
}
