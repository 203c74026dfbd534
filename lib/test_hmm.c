// SPDX-License-Identifier: GPL-2.0
/*
 * HMM test device: an emulated GPU that mirrors a process address space.
 */

/**
 * DOC: Overview
 *
 * This module emulates a device that shares its user's virtual address space,
 * as a GPU using HMM does, so that the kernel's HMM, mmu notifier and
 * ZONE_DEVICE code can be exercised from user space
 * (tools/testing/selftests/mm/hmm-tests.c). It is also meant to be read: each
 * API is used the way a real driver should use it, with the reasons written
 * next to the code. The file is laid out bottom-up, as kernel code is, each
 * part using only those above it: the record of invalidations, the emulated
 * TLB-invalidation engine, the device page table, leaves and their
 * notifiers, the debug hold points, the invalidation callbacks, device
 * faults, device memory, the notifiers of one request, snapshot, migration
 * and eviction, placement advice, the device's accesses (read and write,
 * exclusive, migration requests), statistics and settings, the ioctls,
 * open and release, module setup. A reader following a request starts at the
 * bottom, with dmirror_fops_open() and dmirror_fops_unlocked_ioctl(); the
 * shortest correct sequences are in the Examples.
 *
 * Devices. /dev/hmm_dmirror0 and 1 own device-private memory, 2 and 3
 * device-coherent memory (only when the module is given the physical ranges
 * through spm_addr_dev0 and spm_addr_dev1), as in the kernel's own driver.
 * Devices 4 and up are more device-private devices (module parameter
 * private_devices counts all of them), for tests that need many devices.
 *
 * Interconnect groups. By default each device is its own pagemap owner, as
 * in the kernel's own driver: a device that meets another device's private
 * page has the core migrate it to system memory first. Devices joined by a
 * fast interconnect share one owner instead (module parameter interconnect,
 * as drm_pagemap_acquire_owner() does for GPUs that can reach each other's
 * memory): a device fault maps a peer's device-private page where it is,
 * and a migration to the device takes its peers' pages straight into its
 * memory, one copy, where a page of a device outside the group goes through
 * system memory, two. A device outside every group behaves as before.
 *
 * Mirrors. Every open() creates a &struct dmirror: the opener's mm as seen by
 * the device. It holds an emulated device page table, whose last level, a
 * &struct dmirror_leaf, covers an aligned range of leaf_size bytes (2 MiB by
 * default) like the last level of a GPU page table. A device PTE records the
 * pfn of the page it maps and whether the device may write it.
 *
 * Notifiers. The device page table must never map a page the CPU page table
 * no longer maps. A mirror subscribes to invalidations in one of two models,
 * chosen per device (&struct hmm_dmirror_settings):
 *
 * - whole: one mmu interval notifier over the whole address space, as the
 *   kernel's own test driver does. Every invalidation of the process reaches
 *   the device, mirrored or not.
 * - per leaf: one interval notifier per leaf, inserted when the device first
 *   faults in the leaf's range and removed once an invalidation leaves the
 *   leaf empty. This is what GPU drivers do (nouveau, amdgpu, xe): only
 *   invalidations of mirrored ranges reach the device, at the price of
 *   notifier churn. Removal cannot happen in the callback, which runs under
 *   the notifier's own locking, so it is deferred to a work item that runs
 *   a little later (%DMIRROR_REAP_DELAY_MS): an munmap() does not pay for
 *   waking a worker, and a leaf faulted in again meanwhile is kept.
 *
 * Invalidation. Each device has an emulated TLB-invalidation engine: a flush
 * is submitted, runs asynchronously and completes flush_latency later. A
 * waiter sleeps until shortly before that and polls for the rest, the time
 * a wake-up takes on this machine, which the driver measures on its own
 * sleeps (one wait in %DMIRROR_WAKE_PROBE that would only poll sleeps
 * instead, to keep the measure current): the wait ends when the flush does,
 * not a wake-up later (on TCG a wake-up costs more than the default
 * latency). A device takes invalidations in one of two modes:
 *
 * - single pass (&mmu_interval_notifier_ops.invalidate): clear the PTEs,
 *   flush, wait. With N devices mirroring a range, an munmap() waits N
 *   flush latencies one after the other.
 * - two pass (.invalidate_start / .invalidate_finish, Linux 7.1): the start
 *   clears the PTEs and submits the flush, the finish waits for it. The core
 *   runs every start before any finish, so the N flushes overlap and the
 *   munmap() waits about one latency. Finish objects come from a small
 *   per-device pool, because the start may not sleep to allocate; with the
 *   pool empty the start does the whole invalidation synchronously. In the
 *   per-leaf model one invalidation needs a finish object per leaf it
 *   touches, so one covering more than %DMIRROR_FLUSH_POOL leaves of a
 *   device waits for the rest one by one: a real driver would batch the
 *   flushes of one invalidation per device instead.
 *
 * The driver keeps a record of the last %HMM_DMIRROR_INVAL_RECORDS
 * invalidations, one entry for all the callbacks of one invalidation on all
 * devices: what they did, and how many flushes were submitted before the
 * first was waited for. Tests read it (%HMM_DMIRROR_INVALIDATIONS) to prove
 * the order of the two passes without timing anything.
 *
 * Device accesses read device PTEs under the mirror's pt_lock, so a cleared
 * PTE is never used again even before its flush completes; the engine models
 * the time a real device needs, and the protocol a real driver must follow.
 *
 * Checking the core. A device fault trusts mmu_interval_read_retry() only so
 * far: an invalidation that reached this driver after the fault's
 * mmu_interval_read_begin() returned must make it say retry, and the driver
 * counts and warns if it does not (&hmm_dmirror_stats.stale_installs). The
 * windows such bugs hide in are narrow, so a test can arm a debug hold point
 * (HMM_DMIRROR_HOLD, off by default) that stops the next fault between
 * hmm_range_fault() and that check, or the next invalidation in the driver's
 * callback, until the test has run what it wants inside the window.
 *
 * Device memory. Each device owns ZONE_DEVICE memory in chunks: device
 * private chunks of 64 MiB are created with memremap_pages() when the device
 * first runs out, up to device_memory_mb; the coherent devices own the range
 * reserved at boot. A bitmap per chunk hands out 4 KiB pages and PMD-sized
 * folios. The CPU cannot address device-private memory, so system memory
 * stands in for its storage: an order-0 page for a 4 KiB device page, one
 * order-9 allocation for a PMD-sized folio until the folio is split.
 *
 * Placement. A device that decides for itself where memory goes follows
 * per-range advice (HMM_DMIRROR_ADVISE, kept per mirror in an interval
 * tree and dropped when the range is unmapped): on a device fault it
 * migrates the faulting granule (4 KiB or 2 MiB) to the preferred location
 * before mapping it, or maps the memory where it is. Device memory can be
 * capped (memory_limit_mb); a migration that finds none free evicts the
 * least recently used 2 MiB block of the device's memory, whoever maps it,
 * with migrate_device_range(), never what the same migration brought in. A
 * timeslice keeps migrated pages on the device for a while before a CPU
 * fault takes them back, as drm_pagemap does against thrashing.
 *
 * Migration. HMM_DMIRROR_MIGRATE_TO_DEV and _TO_SYS move memory with
 * migrate_vma_setup() / _pages() / _finalize(), large folios as large folios
 * when both sides have them. A CPU fault on a device-private page migrates
 * it back through &dev_pagemap_ops.migrate_to_ram; HMM_DMIRROR_RELEASE and
 * module unload evict whole chunks with migrate_device_range(). Device pages
 * refer to their device (through their chunk), never to a mirror, so a file
 * can be closed while its memory stays on the device. The time of each
 * phase of a migration (setup, allocation and copy, adding chunks, pages,
 * finalize, the read-back) is added to the device's counters, for the
 * benchmark.
 */

/**
 * DOC: Locking
 *
 * &dmirror.pt_lock (a mutex) is the driver lock of the HMM documentation:
 *
 * - it protects the device PTEs and the leaf counts of valid PTEs;
 * - invalidation callbacks take it to clear PTEs and to advance the notifier
 *   sequence (mmu_interval_set_seq());
 * - the fault path takes it to check mmu_interval_read_retry() and, only if
 *   no invalidation raced with hmm_range_fault(), to install PTEs.
 *
 * Invalidation callbacks run from reclaim and under the mmap lock, so nothing
 * may be done under pt_lock that can enter reclaim, take the mmap lock or
 * fault on user memory: no GFP_KERNEL allocation, no copy_to_user(). Leaves
 * are allocated before pt_lock is taken, and data goes through a kernel
 * bounce buffer. At open() lockdep is told that pt_lock nests inside reclaim,
 * so that a violation is reported at once, not when reclaim happens to hit.
 *
 * &dmirror.leaf_lock (a mutex) serialises creating a leaf with inserting its
 * notifier, and removing them, so that concurrent faults on one leaf from
 * several threads create one leaf and one notifier. It is never taken inside
 * pt_lock's users in the notifier path, and it is held across
 * mmu_interval_notifier_insert(), never across _remove().
 *
 * The table of leaves (an xarray) has its own internal lock. Lookups are
 * lockless (RCU). A leaf is counted (&dmirror_leaf.ref): the table holds one
 * reference and every fault using it one more; it is freed after an RCU
 * grace period. A leaf leaves the table under pt_lock with &dmirror_leaf.dead
 * set, so a fault that looked it up earlier sees, under pt_lock, that it
 * must start again with a new leaf.
 *
 * &dmirror_device.lock (a spinlock) protects the device's settings, its
 * pool of finish objects and its debug hold; it is taken from invalidation
 * callbacks that may not sleep.
 *
 * A task held at a debug hold point (HMM_DMIRROR_HOLD) does not hold pt_lock:
 * the fault path is held with the mmap lock dropped and before pt_lock, an
 * invalidation after its callback dropped pt_lock. It may hold the core's
 * locks (the mmap lock, for madvise()), and an invalidation that this driver
 * caused itself, under one of its outer locks (reclaim while a leaf is
 * allocated under leaf_lock, eviction under chunk_lock), would be held with
 * that lock too: the test that armed the hold must need none of them to
 * release it, and arms it only around what it runs itself. Removing a
 * notifier waits for the invalidation in progress to end, so the leaf reaper
 * waits for a held invalidation, and so does HMM_DMIRROR_STATS, which flushes
 * the reaper: a test does not read the statistics of a file while an
 * invalidation of its mm is held.
 *
 * dmirror_log_lock (a spinlock) protects the record of invalidations; it is
 * taken from invalidation callbacks, alone: nothing else is locked under it.
 *
 * &dmirror_device.chunk_lock (a mutex) serialises adding and evicting chunks
 * of device memory, and evicting blocks to make room (dmirror_make_room());
 * &dmirror_device.mem_lock (a spinlock, irq-safe where a folio is freed)
 * protects the chunk list and the allocation bitmaps.
 *
 * &dmirror.advice_mutex serialises HMM_DMIRROR_ADVISE, which inserts the
 * advice watch; &dmirror.advice_lock (a spinlock) protects the advice tree
 * and is taken, alone, in the watch's callback, which may not sleep: a
 * range an unmap cuts in two takes the node the last ADVISE set aside, or
 * one allocated without sleeping; failing both, the part cut off loses its
 * advice (dmirror_advice_punch()).
 *
 * Lock order, as the code nests them:
 *
 * - leaf_lock -> mmap_lock -> folio lock -> pt_lock. The first notifier
 *   insertion registers with the mm under its mmap lock; the core calls the
 *   invalidation callbacks with the mmap lock or folio locks held; the
 *   exclusive path takes pt_lock with the folio make_device_exclusive()
 *   returned locked. dmirror_reap_work() takes pt_lock inside leaf_lock.
 * - leaf_lock -> device lock (dmirror_bind()).
 * - mmap_lock -> folio lock -> chunk_lock -> mem_lock: device memory is
 *   allocated in the middle of a migration. Making room evicts other
 *   device memory there, under chunk_lock: its folios are only trylocked
 *   (migrate_device_range()), and the invalidations it causes take pt_lock
 *   inside chunk_lock.
 * - advice_mutex -> mmap_lock: inserting the advice watch.
 *
 * pt_lock, the device lock and dmirror_log_lock never nest in one another:
 * an invalidation callback takes them one after the other.
 *
 * Which invalidations a device may ignore. Skipping an invalidation is only
 * safe when the device caused it itself and keeps access to the page. The
 * one this driver skips is its own make_device_exclusive()
 * (MMU_NOTIFY_EXCLUSIVE whose owner is the device). It never skips
 * MMU_NOTIFY_MIGRATE, whatever its owner: a migration carries the pagemap
 * owner, and devices on one interconnect share it, so "the owner is mine"
 * also matches a peer migrating or evicting pages this device maps over the
 * interconnect, and the device would go on using pages being freed. Even a
 * device's own migration moves the data to new pages, so the old mappings
 * must go. dmirror_pt_install() checks that the device maps only device
 * pages of its own owner; dmirror_event_is_own() that no exclusive
 * invalidation carries a group's owner.
 */

/**
 * DOC: Examples
 *
 * What a driver needs at the least, without this driver's leaves, batches,
 * statistics and debug points. The names of the device's own parts (struct
 * my_mirror, my_flush_get(), ...) are made up.
 *
 * A device fault, with the collision-retry loop (dmirror_fault_pass() and
 * dmirror_retry_collisions())::
 *
 *	unsigned long timeout = jiffies + msecs_to_jiffies(HMM_RANGE_DEFAULT_TIMEOUT);
 *	struct hmm_range range = {
 *		.notifier = &mirror->notifier,
 *		.start = start,
 *		.end = end,
 *		.hmm_pfns = pfns,
 *		.default_flags = HMM_PFN_REQ_FAULT |
 *				 (write ? HMM_PFN_REQ_WRITE : 0),
 *		.dev_private_owner = mirror->owner,
 *	};
 *	int ret;
 *
 *	for (;;) {
 *		if (time_after(jiffies, timeout))
 *			return -EBUSY;
 *		range.notifier_seq = mmu_interval_read_begin(range.notifier);
 *		mmap_read_lock(mm);
 *		ret = hmm_range_fault(&range);
 *		mmap_read_unlock(mm);
 *		if (ret == -EBUSY)
 *			continue;
 *		if (ret)
 *			return ret;
 *
 *		mutex_lock(&mirror->pt_lock);
 *		if (!mmu_interval_read_retry(range.notifier,
 *					     range.notifier_seq))
 *			break;
 *		mutex_unlock(&mirror->pt_lock);
 *	}
 *	// Nothing here may allocate with GFP_KERNEL or touch user memory.
 *	my_map_pfns(mirror, &range);
 *	mutex_unlock(&mirror->pt_lock);
 *
 * A two-pass invalidation (dmirror_invalidate_begin(), dmirror_flush_start()
 * and dmirror_invalidate_finish()). The start publishes the new sequence and
 * clears the PTEs under the same lock as the fault's check above, then
 * submits the TLB flush without waiting; the core runs the starts of every
 * subscriber before any finish, so the flushes of several devices overlap::
 *
 *	static bool my_invalidate_start(struct mmu_interval_notifier *mni,
 *					const struct mmu_notifier_range *range,
 *					unsigned long cur_seq,
 *					struct mmu_interval_notifier_finish **finish)
 *	{
 *		struct my_mirror *mirror = container_of(mni, struct my_mirror,
 *							 notifier);
 *		bool blockable = mmu_notifier_range_blockable(range);
 *		struct my_flush *flush;
 *
 *		if (blockable)
 *			mutex_lock(&mirror->pt_lock);
 *		else if (!mutex_trylock(&mirror->pt_lock))
 *			return false;
 *		if (!blockable && my_maps_any(mirror, range->start, range->end)) {
 *			// The flush would have to be waited for.
 *			mutex_unlock(&mirror->pt_lock);
 *			return false;
 *		}
 *		mmu_interval_set_seq(mni, cur_seq);
 *		my_clear_ptes(mirror, range->start, range->end);
 *		mutex_unlock(&mirror->pt_lock);
 *		if (!blockable)
 *			return true;
 *
 *		// Preallocated: reclaim calls this, it must not allocate.
 *		flush = my_flush_get(mirror);
 *		if (!flush) {
 *			my_tlb_flush_and_wait(mirror);
 *			return true;
 *		}
 *		my_tlb_flush_submit(flush);
 *		*finish = &flush->finish;
 *		return true;
 *	}
 *
 *	static void my_invalidate_finish(struct mmu_interval_notifier_finish *finish)
 *	{
 *		struct my_flush *flush = container_of(finish, struct my_flush,
 *						      finish);
 *
 *		my_tlb_flush_wait(flush);
 *		my_flush_put(flush);
 *	}
 *
 *	static const struct mmu_interval_notifier_ops my_notifier_ops = {
 *		.invalidate_start = my_invalidate_start,
 *		.invalidate_finish = my_invalidate_finish,
 *	};
 */

#include <linux/atomic.h>
#include <linux/bitmap.h>
#include <linux/cdev.h>
#include <linux/debugfs.h>
#include <linux/device.h>
#include <linux/fault-inject.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/hmm.h>
#include <linux/hrtimer.h>
#include <linux/huge_mm.h>
#include <linux/ioport.h>
#include <linux/init.h>
#include <linux/instrumented.h>
#include <linux/interval_tree.h>
#include <linux/kernel.h>
#include <linux/kref.h>
#include <linux/llist.h>
#include <linux/log2.h>
#include <linux/memremap.h>
#include <linux/migrate.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/rcupdate.h>
#include <linux/rmap.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/timekeeping.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/workqueue.h>
#include <linux/xarray.h>

#include "test_hmm_uapi.h"

/* Device numbers of the kernel's own driver. */
#define DMIRROR_FIRST_COHERENT		2
#define DMIRROR_NCOHERENT		2
#define DMIRROR_MIN_PRIVATE		2
#define DMIRROR_MAX_PRIVATE		64

/* Pages one device fault, copy or snapshot step handles at a time. */
#define DMIRROR_BATCH_PAGES		64UL

/*
 * How long a fault keeps retrying while invalidations collide with it, and
 * how many times at least, so that a slow host gets as many tries as a
 * fast one.
 */
#define DMIRROR_FAULT_TIMEOUT_MS	HMM_RANGE_DEFAULT_TIMEOUT
#define DMIRROR_RETRY_MIN		16

#define DMIRROR_MAX_LEAF_SIZE		SZ_1G
#define DMIRROR_MAX_FLUSH_LATENCY_NS	(100 * NSEC_PER_MSEC)
/*
 * A flush waiter polls for at most this long (dmirror_flush_wait()), however
 * late the wake-ups of a busy host have been; one late wake-up moves the
 * average by 1/DMIRROR_WAKE_WEIGHT of it.
 */
#define DMIRROR_MAX_POLL_NS		(1 * NSEC_PER_MSEC)
#define DMIRROR_WAKE_WEIGHT		8
#define DMIRROR_WAKE_PROBE		16
/*
 * Emptied leaves are removed at most this long after the first invalidation
 * that queued one (sooner when the statistics are read or the file closed):
 * waking a worker is then no part of the invalidation, and a leaf faulted in
 * again meanwhile keeps its notifier.
 */
#define DMIRROR_REAP_DELAY_MS		10

/* Device memory: private chunks are added on demand, up to the limit. */
#define DMIRROR_CHUNK_SIZE		SZ_64M
#define DMIRROR_COHERENT_SIZE		SZ_256M
/* Device memory is evicted, and its timeslice kept, in blocks of this size. */
#define DMIRROR_BLOCK_SIZE		SZ_2M
#define DMIRROR_BLOCK_PAGES		(DMIRROR_BLOCK_SIZE >> PAGE_SHIFT)

/* The largest mmap() of a device: its pages are allocated up front. */
#define DMIRROR_MMAP_MAX_SIZE		SZ_64M

/* Finish objects per device: invalidations one device can overlap. */
#define DMIRROR_FLUSH_POOL		32

/* A device PTE: pfn above DMIRROR_PTE_PFN_SHIFT, flags below. */
#define DMIRROR_PTE_VALID		BIT_ULL(0)
#define DMIRROR_PTE_WRITE		BIT_ULL(1)
/* Mapped for atomic access after make_device_exclusive(). */
#define DMIRROR_PTE_ATOMIC		BIT_ULL(2)
/* A page in a peer's memory, mapped over the interconnect. */
#define DMIRROR_PTE_PEER		BIT_ULL(3)
#define DMIRROR_PTE_PFN_SHIFT		8

static unsigned long spm_addr_dev0;
module_param(spm_addr_dev0, ulong, 0444);
MODULE_PARM_DESC(spm_addr_dev0,
		 "Physical address of device 2's coherent memory (256 MiB, reserved with memmap=)");

static unsigned long spm_addr_dev1;
module_param(spm_addr_dev1, ulong, 0444);
MODULE_PARM_DESC(spm_addr_dev1,
		 "Physical address of device 3's coherent memory (256 MiB, reserved with memmap=)");

static unsigned int private_devices = 8;
module_param(private_devices, uint, 0444);
MODULE_PARM_DESC(private_devices,
		 "Device-private devices: 0, 1, then 4 and up (2 to 64, default 8)");

static unsigned int notifier_model = HMM_DMIRROR_NOTIFIER_PER_LEAF;
module_param(notifier_model, uint, 0444);
MODULE_PARM_DESC(notifier_model,
		 "Initial notifier model: 0 whole address space, 1 per leaf (default)");

static unsigned int invalidation = HMM_DMIRROR_TWO_PASS;
module_param(invalidation, uint, 0444);
MODULE_PARM_DESC(invalidation,
		 "Initial invalidation mode: 0 single pass, 1 two pass (default)");

static unsigned long flush_latency_ns = 200 * NSEC_PER_USEC;
module_param(flush_latency_ns, ulong, 0444);
MODULE_PARM_DESC(flush_latency_ns,
		 "Initial emulated TLB flush latency in ns (default 200000)");

static unsigned long leaf_size = SZ_2M;
module_param(leaf_size, ulong, 0444);
MODULE_PARM_DESC(leaf_size,
		 "Initial device page table leaf size in bytes (default 2 MiB)");

static unsigned int device_memory_mb = 256;
module_param(device_memory_mb, uint, 0444);
MODULE_PARM_DESC(device_memory_mb,
		 "Device-private memory of each device, in MiB, a multiple of 64 (default 256)");

static char *interconnect = "";
module_param(interconnect, charp, 0444);
MODULE_PARM_DESC(interconnect,
		 "Interconnect groups: ';'-separated lists of ','-separated device numbers or ranges a-b, e.g. \"0,1,4;5-7\" (default none)");

/*
 * Fault injection: with CONFIG_FAULT_INJECTION the driver's allocations, and
 * the kernel calls that allocate for it, fail on the fail_test_hmm attribute
 * (debugfs, fault-injection.rst), which counts what it injected in
 * "injected". The suite runs under it with run_vm.sh --fault-inject: requests
 * fail with clean errnos, and nothing may leak, splat or hang.
 */
#ifdef CONFIG_FAULT_INJECTION
static DECLARE_FAULT_ATTR(dmirror_fail_attr);
static atomic_t dmirror_injected = ATOMIC_INIT(0);
static struct dentry *dmirror_fail_dir;

/* Should this allocation fail? Does not sleep. */
static bool dmirror_inject_failure(void)
{
	if (!should_fail(&dmirror_fail_attr, 1))
		return false;
	atomic_inc(&dmirror_injected);
	return true;
}

static void dmirror_fail_init(void)
{
	struct dentry *dir;

	dir = fault_create_debugfs_attr("fail_test_hmm", NULL,
					&dmirror_fail_attr);
	if (IS_ERR(dir))
		return;
	debugfs_create_atomic_t("injected", 0400, dir, &dmirror_injected);
	dmirror_fail_dir = dir;
}

static void dmirror_fail_exit(void)
{
	debugfs_remove_recursive(dmirror_fail_dir);
}
#else
static bool dmirror_inject_failure(void)
{
	return false;
}

static void dmirror_fail_init(void)
{
}

static void dmirror_fail_exit(void)
{
}
#endif

/**
 * struct dmirror_flush - a TLB flush of the emulated device
 * @finish: handed to the core by a two-pass invalidate_start()
 * @mdevice: device whose engine runs the flush
 * @deadline: when the engine completes the flush
 * @log: record of the invalidation the flush is for
 */
struct dmirror_flush {
	struct mmu_interval_notifier_finish finish;
	struct dmirror_device *mdevice;
	ktime_t deadline;
	u64 log;
};

/*
 * A device keeps its counters in the layout of &struct hmm_dmirror_stats,
 * an atomic64_t for each __u64 of it, so that the UAPI structure is the one
 * list of them: a new counter is a field at its end and the places that
 * count it; reading and resetting take them all. The fields the driver
 * works out when they are read (flushes_in_flight_max, finish_pool,
 * finish_free, interconnect_group, flush_wake_ns) stay zero here.
 */
#define DMIRROR_NR_STATS	(sizeof(struct hmm_dmirror_stats) / sizeof(__u64))

/* The counter of a device behind the UAPI field @field. */
#define dmirror_stat(mdevice, field) \
	(&(mdevice)->stats[offsetof(struct hmm_dmirror_stats, field) / \
			   sizeof(__u64)])

/*
 * Add the time since *@t to the counter @stat, and restart *@t: the phases
 * of a migration, for the benchmark's breakdown.
 */
static void dmirror_time_phase(atomic64_t *stat, u64 *t)
{
	u64 now = ktime_get_ns();

	atomic64_add(now - *t, stat);
	*t = now;
}

/**
 * struct dmirror_hold - the debug hold point of a device (HMM_DMIRROR_HOLD)
 * @owner: mirror whose file armed it; NULL when the hold is idle
 * @point: enum hmm_dmirror_hold_point armed
 * @start: start of the range armed
 * @end: its end
 * @held: a task is held at the point
 * @gen: advanced when the hold ends (released, disarmed, or its task let go
 *	on a fatal signal), which is what the held task waits for
 * @wq: the held task and HMM_DMIRROR_HOLD_WAIT wait here
 *
 * All fields but @wq are under &dmirror_device.lock; @owner, @held and @gen
 * are also read locklessly in wait conditions and in the fast path.
 */
struct dmirror_hold {
	struct dmirror *owner;
	u32 point;
	unsigned long start;
	unsigned long end;
	bool held;
	unsigned long gen;
	wait_queue_head_t wq;
};

/**
 * struct dmirror_group - devices joined by an interconnect
 * @id: number of the group, from 1, as the interconnect parameter lists it
 *
 * The address of a group is the pagemap owner its devices share, as
 * drm_pagemap_acquire_owner() gives devices with a fast interconnect one
 * owner: hmm_range_fault() hands each of them the others' device-private
 * pages to map where they are, and migrate_vma_setup() lets each of them
 * take the others' pages straight into its own memory.
 */
struct dmirror_group {
	unsigned int id;
};

static struct dmirror_group *dmirror_groups;

/**
 * struct dmirror_device - one emulated device, /dev/hmm_dmirrorN
 * @cdev: character device
 * @dev: device model object, named hmm_dmirrorN
 * @id: N
 * @mem_type: kind of ZONE_DEVICE memory the device owns
 * @owner: the pagemap owner of the device's memory: its interconnect group
 *	when it is in one, else the device itself
 * @group: the group, or NULL
 * @lock: protects @settings, @fail_next_finish, @flush_busy and @hold
 * @settings: current settings; flags and reserved are always 0
 * @fail_next_finish: the next finish object allocation fails
 * @flush_busy: which of @flush_pool are in use
 * @flush_pool: finish objects of two-pass invalidations
 * @hold: the debug hold point
 * @stats: counters, in the layout of &struct hmm_dmirror_stats (dmirror_stat())
 * @chunk_lock: serialises adding and removing chunks of device memory
 * @mem_lock: protects @chunks and the chunks' allocation state
 * @chunks: &struct dmirror_chunk of the device's memory; changed under both
 *	chunk_lock and mem_lock, so either is enough to read it
 * @nr_used: pages allocated in all chunks; under mem_lock
 * @lru_clock: advanced each time device memory is used, for eviction
 *
 * @owner is what the device passes as &hmm_range.dev_private_owner and
 * &migrate_vma.pgmap_owner, so that it recognises memory it may map and
 * migrate directly. make_device_exclusive() gets the address of the device
 * itself, never the group's: that owner comes back in the device's own
 * MMU_NOTIFY_EXCLUSIVE invalidations, which it alone may ignore
 * (dmirror_event_is_own()).
 */
struct dmirror_device {
	struct cdev cdev;
	struct device dev;
	unsigned int id;
	enum hmm_dmirror_memory_type mem_type;
	void *owner;
	struct dmirror_group *group;

	spinlock_t lock;		/* settings and flush pool */
	struct hmm_dmirror_settings settings;
	bool fail_next_finish;
	DECLARE_BITMAP(flush_busy, DMIRROR_FLUSH_POOL);
	struct dmirror_flush flush_pool[DMIRROR_FLUSH_POOL];
	struct dmirror_hold hold;

	atomic64_t stats[DMIRROR_NR_STATS];

	struct mutex chunk_lock;	/* adding and removing chunks */
	spinlock_t mem_lock;		/* chunk list and allocation state */
	struct list_head chunks;
	unsigned long nr_used;
	atomic64_t lru_clock;
};

/**
 * struct dmirror_chunk - a range of ZONE_DEVICE memory of one device
 * @pagemap: the range and its type, private or coherent
 * @mdevice: owning device
 * @node: on &dmirror_device.chunks
 * @used: allocated pages, a bit per page; under &dmirror_device.mem_lock
 * @nr_used: bits set in @used; under mem_lock
 * @evicting: no allocation from this chunk; under mem_lock
 * @backing: device-private only, the system page that stands in for the
 *	device storage of each device page; NULL while the page is free
 * @backing_large: device-private only, a bit per PMD-sized run of the
 *	chunk: the backing of the large folio there is one high-order
 *	allocation, not yet split (dmirror_backing_alloc())
 * @block_used: for each block of %DMIRROR_BLOCK_SIZE, the device's
 *	&dmirror_device.lru_clock when a page of it was last migrated in or
 *	mapped by a device fault; written without a lock, as a hint
 * @block_until: for each block, the jiffies until which a CPU fault may
 *	not take its pages back (&hmm_dmirror_settings.timeslice_ms)
 * @res: device-private only, the physical address region taken; it may be
 *	larger than the chunk (request_free_mem_region() rounds up to a
 *	memory section)
 *
 * A bitmap allocator serves both sizes the device hands out: a 4 KiB page is
 * the first clear bit, a PMD-sized folio a clear aligned run, so small pages
 * fill partly used blocks first and whole blocks stay available for THP.
 */
struct dmirror_chunk {
	struct dev_pagemap pagemap;
	struct dmirror_device *mdevice;
	struct list_head node;
	unsigned long *used;
	unsigned long nr_used;
	bool evicting;
	struct page **backing;
	unsigned long *backing_large;
	u64 *block_used;
	unsigned long *block_until;
	struct resource *res;
};

static struct dmirror_chunk *dmirror_page_chunk(struct page *page)
{
	return container_of(page_pgmap(page), struct dmirror_chunk, pagemap);
}

static unsigned long dmirror_chunk_first_pfn(const struct dmirror_chunk *chunk)
{
	return PHYS_PFN(chunk->pagemap.range.start);
}

static unsigned long dmirror_chunk_npages(const struct dmirror_chunk *chunk)
{
	return PHYS_PFN(range_len(&chunk->pagemap.range));
}

/* Index of the device page @pfn in the chunk's bitmap and backing array. */
static unsigned long dmirror_chunk_index(const struct dmirror_chunk *chunk,
					 unsigned long pfn)
{
	return pfn - dmirror_chunk_first_pfn(chunk);
}

/* Index of the block holding the device page @pfn. */
static unsigned long dmirror_chunk_block(const struct dmirror_chunk *chunk,
					 unsigned long pfn)
{
	return dmirror_chunk_index(chunk, pfn) / DMIRROR_BLOCK_PAGES;
}

/*
 * The block of the device page @pfn has been used: eviction takes the
 * block least recently used first.
 */
static void dmirror_block_touch(struct dmirror_chunk *chunk, unsigned long pfn)
{
	u64 *used = &chunk->block_used[dmirror_chunk_block(chunk, pfn)];
	u64 now = atomic64_inc_return(&chunk->mdevice->lru_clock);
	u64 old = READ_ONCE(*used);

	/* Racing touches: the newest stamp wins, never an older one. */
	while (old < now && !try_cmpxchg64(used, &old, now))
		;
}

/**
 * dmirror_page_owned() - may a device map and migrate this page as it is?
 * @mdevice: device
 * @page: any page
 *
 * Return: true for the device memory of @mdevice's pagemap owner: the
 * device's own and, on an interconnect, that of its group's other devices.
 * Only then is @page known to be in a &struct dmirror_chunk.
 */
static bool dmirror_page_owned(const struct dmirror_device *mdevice,
			       struct page *page)
{
	return is_zone_device_page(page) &&
	       page_pgmap(page)->owner == mdevice->owner;
}

/* Is @page in the memory of @mdevice itself? */
static bool dmirror_page_local(const struct dmirror_device *mdevice,
			       struct page *page)
{
	return dmirror_page_owned(mdevice, page) &&
	       dmirror_page_chunk(page)->mdevice == mdevice;
}

/* Is @page in the memory of another device of @mdevice's group? */
static bool dmirror_page_of_peer(const struct dmirror_device *mdevice,
				 struct page *page)
{
	return dmirror_page_owned(mdevice, page) &&
	       dmirror_page_chunk(page)->mdevice != mdevice;
}

static struct dmirror_device **dmirror_devices;
static unsigned int dmirror_nr_ids;
static dev_t dmirror_devt;

/* Flushes in flight on all devices, and the most seen at once. */
static atomic_t dmirror_flushes_in_flight = ATOMIC_INIT(0);
static atomic_t dmirror_flushes_in_flight_max = ATOMIC_INIT(0);
/* What waking up from a sleep costs here, in ns: see dmirror_sleep_until(). */
static unsigned long dmirror_wake_ns;
/* Flush waits due within a wake-up: dmirror_wake_probe() counts them. */
static atomic_t dmirror_polled_waits = ATOMIC_INIT(0);

struct dmirror;
struct dmirror_advice;
struct dmirror_leaf;

/**
 * struct dmirror_notifier - an interval notifier of a mirror
 * @mni: the notifier
 * @dmirror: mirror it keeps coherent
 * @leaf: the leaf it covers, or NULL for a notifier over the whole space
 * @nr_invalidated: invalidations that published a sequence on it; written
 *	under pt_lock, read locklessly by faults to check the core
 *	(dmirror_may_install())
 */
struct dmirror_notifier {
	struct mmu_interval_notifier mni;
	struct dmirror *dmirror;
	struct dmirror_leaf *leaf;
	unsigned long nr_invalidated;
};

/**
 * struct dmirror_leaf - last level of the emulated device page table
 * @notifier: the leaf's own notifier, in the per-leaf model
 * @ref: references: the table's and those of faults using the leaf
 * @rcu: frees the leaf after lockless lookups are done with it
 * @reap_node: on &dmirror.reap_list
 * @start: first address covered
 * @nr_valid: PTEs with %DMIRROR_PTE_VALID; under pt_lock
 * @queued: on the reap list; under pt_lock
 * @dead: out of the table, its notifier being removed; under pt_lock
 * @pte: one device PTE per page; under pt_lock
 */
struct dmirror_leaf {
	struct dmirror_notifier notifier;
	struct kref ref;
	struct rcu_head rcu;
	struct llist_node reap_node;
	unsigned long start;
	unsigned int nr_valid;
	bool queued;
	bool dead;
	u64 pte[];
};

/**
 * struct dmirror - an address space mirrored by a device (one open file)
 * @mdevice: the device
 * @mm: the mirrored mm (mmgrab()ed)
 * @leaf_lock: serialises leaf creation and removal; see "Locking"
 * @pt_lock: protects the device PTEs; see "Locking"
 * @leaves: &struct dmirror_leaf by address >> @leaf_shift
 * @bound: the settings below are fixed; under leaf_lock
 * @model: notifier model (enum hmm_dmirror_notifier_model)
 * @two_pass: invalidation mode
 * @leaf_shift: log2 of the leaf size
 * @whole: notifier over the whole address space, in the whole model
 * @closing: release() started, leaves are no longer queued for reaping
 * @reap_list: leaves an invalidation emptied
 * @reap_work: removes them with their notifiers
 * @flags: HMM_DMIRROR_FLAG_* set with HMM_DMIRROR_FLAGS; bit 0 is taken
 *	with test_and_clear_bit()
 * @advice_mutex: serialises HMM_DMIRROR_ADVISE, which inserts @advice_watch
 * @advice_lock: protects @advice and @advice_spare; taken in @advice_watch's
 *	callback
 * @advice: &struct dmirror_advice by range (an interval tree)
 * @advice_spare: a node for the callback to split a range with
 * @advice_watch: drops the advice of unmapped ranges
 * @advice_watching: @advice_watch is inserted; under advice_mutex
 */
struct dmirror {
	struct dmirror_device *mdevice;
	struct mm_struct *mm;
	struct mutex leaf_lock;		/* leaf and notifier creation/removal */
	struct mutex pt_lock;		/* device PTEs, notifier sequence */
	struct xarray leaves;

	bool bound;
	u32 model;
	bool two_pass;
	unsigned int leaf_shift;
	struct dmirror_notifier whole;

	bool closing;
	struct llist_head reap_list;
	struct delayed_work reap_work;
	unsigned long flags;

	struct mutex advice_mutex;	/* ADVISE, inserting the watch */
	spinlock_t advice_lock;		/* the advice tree */
	struct rb_root_cached advice;
	struct dmirror_advice *advice_spare;
	struct mmu_interval_notifier advice_watch;
	bool advice_watching;
};

/**
 * struct dmirror_range - a page range taken from an ioctl command
 * @start: first address
 * @end: address after the last page
 */
struct dmirror_range {
	unsigned long start;
	unsigned long end;
};

/**
 * dmirror_user_range() - validate a range given by user space
 * @addr: start
 * @npages: size in pages
 * @range: output
 *
 * Return: 0, or -EINVAL for an empty, unaligned or wrapping range or one
 * that does not fit in a user address space.
 */
static int dmirror_user_range(u64 addr, u64 npages,
			      struct dmirror_range *range)
{
	if (!npages || !PAGE_ALIGNED(addr))
		return -EINVAL;
	if (npages > (TASK_SIZE_MAX >> PAGE_SHIFT))
		return -EINVAL;
	range->start = addr;
	range->end = addr + (npages << PAGE_SHIFT);
	if (range->end <= range->start || range->end > TASK_SIZE_MAX)
		return -EINVAL;
	return 0;
}

/* ------------------------------------------------------------------------
 * The record of invalidations
 */

/* How far back a callback looks for the record of its invalidation. */
#define DMIRROR_LOG_LOOKUP		32

/**
 * struct dmirror_log_entry - what the driver keeps of one invalidation
 * @range: the core's description of it, on the invalidating task's stack
 * @mm: the address space invalidated; compared, never dereferenced
 * @task: the invalidating task; compared, never dereferenced
 * @task_start: when that task started, which tells it from a later task
 *	at the same address
 * @cur_seq: the notifier sequence it publishes
 * @waited: one of its flushes has been waited for
 * @rec: what %HMM_DMIRROR_INVALIDATIONS reports
 */
struct dmirror_log_entry {
	const struct mmu_notifier_range *range;
	const struct mm_struct *mm;
	const struct task_struct *task;
	u64 task_start;
	unsigned long cur_seq;
	bool waited;
	struct hmm_dmirror_inval_record rec;
};

/**
 * enum dmirror_log_note - what a callback did for an invalidation
 * @DMIRROR_LOG_REFUSED: refused a non-blockable invalidation
 * @DMIRROR_LOG_SYNC: submitted a flush and waited for it at once
 * @DMIRROR_LOG_FALLBACK: the same, for want of a finish object
 * @DMIRROR_LOG_START: submitted a flush and returned a finish object
 * @DMIRROR_LOG_FINISH: a finish, about to wait for its flush
 */
enum dmirror_log_note {
	DMIRROR_LOG_REFUSED,
	DMIRROR_LOG_SYNC,
	DMIRROR_LOG_FALLBACK,
	DMIRROR_LOG_START,
	DMIRROR_LOG_FINISH,
};

/* The last HMM_DMIRROR_INVAL_RECORDS invalidations, by seq modulo size. */
static DEFINE_SPINLOCK(dmirror_log_lock);
static u64 dmirror_log_last;
static struct dmirror_log_entry dmirror_log[HMM_DMIRROR_INVAL_RECORDS];

/* The entry of record @seq, NULL if it was overwritten or never was. */
static struct dmirror_log_entry *dmirror_log_entry(u64 seq)
{
	struct dmirror_log_entry *e =
		&dmirror_log[seq % HMM_DMIRROR_INVAL_RECORDS];

	lockdep_assert_held(&dmirror_log_lock);
	return seq && e->rec.seq == seq ? e : NULL;
}

static bool dmirror_log_matches(const struct dmirror_log_entry *e,
				const struct mmu_notifier_range *range,
				unsigned long cur_seq)
{
	return e->range == range && e->mm == range->mm &&
	       e->task == current && e->task_start == current->start_time &&
	       e->cur_seq == cur_seq && e->rec.start == range->start &&
	       e->rec.end == range->end && e->rec.event == range->event;
}

/**
 * dmirror_log_callback() - note a notifier callback of an invalidation
 * @range: the invalidation
 * @cur_seq: the sequence it publishes
 *
 * The callbacks of one invalidation, on every device and notifier, share one
 * record. The core calls them all from the invalidating task, with the
 * same @range, which lives on that task's stack, and @cur_seq, which
 * changes once no invalidation of the mm is left running. A later task may
 * reuse the stack, the mm's address and its sequence numbers (the test
 * processes of a suite do the same things in the same order), so the task
 * and its start time are part of the identity too. The record is among the
 * newest %DMIRROR_LOG_LOOKUP, or a new one is made.
 *
 * Does not sleep.
 *
 * Return: the record's seq, for dmirror_log_note().
 */
static u64 dmirror_log_callback(const struct mmu_notifier_range *range,
				unsigned long cur_seq)
{
	struct dmirror_log_entry *e = NULL;
	u64 seq;

	spin_lock(&dmirror_log_lock);
	for (seq = dmirror_log_last;
	     seq && seq + DMIRROR_LOG_LOOKUP > dmirror_log_last; seq--) {
		e = dmirror_log_entry(seq);
		if (e && dmirror_log_matches(e, range, cur_seq))
			break;
		e = NULL;
	}
	if (!e) {
		seq = ++dmirror_log_last;
		e = &dmirror_log[seq % HMM_DMIRROR_INVAL_RECORDS];
		*e = (struct dmirror_log_entry) {
			.range = range,
			.mm = range->mm,
			.task = current,
			.task_start = current->start_time,
			.cur_seq = cur_seq,
			.rec = {
				.seq = seq,
				.start = range->start,
				.end = range->end,
				.event = range->event,
			},
		};
	}
	e->rec.callbacks++;
	spin_unlock(&dmirror_log_lock);
	return seq;
}

/**
 * dmirror_log_note() - note what a callback did for an invalidation
 * @seq: the invalidation's record, from dmirror_log_callback()
 * @note: what it did
 *
 * A flush counts as overlapped when no flush of the invalidation was waited
 * for before it was submitted. Does not sleep.
 */
static void dmirror_log_note(u64 seq, enum dmirror_log_note note)
{
	struct dmirror_log_entry *e;

	spin_lock(&dmirror_log_lock);
	e = dmirror_log_entry(seq);
	if (!e)
		goto unlock;
	switch (note) {
	case DMIRROR_LOG_REFUSED:
		e->rec.refused++;
		break;
	case DMIRROR_LOG_FALLBACK:
		e->rec.sync_fallbacks++;
		fallthrough;
	case DMIRROR_LOG_SYNC:
		e->rec.flushes++;
		e->rec.overlapped += !e->waited;
		e->waited = true;
		break;
	case DMIRROR_LOG_START:
		e->rec.flushes++;
		e->rec.overlapped += !e->waited;
		e->rec.two_pass_starts++;
		break;
	case DMIRROR_LOG_FINISH:
		e->rec.two_pass_finishes++;
		e->waited = true;
		break;
	}
unlock:
	spin_unlock(&dmirror_log_lock);
}

/**
 * dmirror_log_read() - the records of a mirror's mm within a range
 * @mm: the mirror's mm
 * @range: the range, or NULL for none
 * @since: only records after this seq
 * @recs: output, room for %HMM_DMIRROR_INVAL_RECORDS
 * @last: output, the seq of the newest record
 *
 * Return: the number of records written to @recs, oldest first.
 */
static u32 dmirror_log_read(const struct mm_struct *mm,
			    const struct dmirror_range *range, u64 since,
			    struct hmm_dmirror_inval_record *recs, u64 *last)
{
	struct dmirror_log_entry *e;
	u32 n = 0;
	u64 seq;

	spin_lock(&dmirror_log_lock);
	*last = dmirror_log_last;
	seq = *last > HMM_DMIRROR_INVAL_RECORDS ?
	      *last - HMM_DMIRROR_INVAL_RECORDS : 0;
	for (seq = max(seq, since) + 1; range && seq <= *last; seq++) {
		e = dmirror_log_entry(seq);
		if (e && e->mm == mm && e->rec.start < range->end &&
		    e->rec.end > range->start)
			recs[n++] = e->rec;
	}
	spin_unlock(&dmirror_log_lock);
	return n;
}

/* ------------------------------------------------------------------------
 * The emulated TLB-invalidation engine
 */

static void dmirror_note_in_flight(void)
{
	int now = atomic_inc_return(&dmirror_flushes_in_flight);
	int max = atomic_read(&dmirror_flushes_in_flight_max);

	do {
		if (now <= max)
			return;
	} while (!atomic_try_cmpxchg(&dmirror_flushes_in_flight_max, &max,
				     now));
}

/**
 * dmirror_flush_submit() - start a TLB flush on the device's engine
 * @flush: the flush, idle
 * @latency: how long the flush takes, in ns
 *
 * The engine completes the flush @latency after this, at once when it is 0,
 * without the CPU's help; the flush counts as in flight until it is waited
 * for. Does not sleep.
 */
static void dmirror_flush_submit(struct dmirror_flush *flush, u64 latency)
{
	atomic64_inc(dmirror_stat(flush->mdevice, flushes));
	dmirror_note_in_flight();
	flush->deadline = ktime_add_ns(ktime_get(), latency);
}

/**
 * dmirror_sleep_until() - sleep until a time, and learn what waking up costs
 * @mdevice: device whose sleeps are counted
 * @until: when to wake up
 *
 * How late the task runs again after the timer is folded into
 * dmirror_wake_ns, an average over the last sleeps of all devices. A
 * wake-up before the time (an uninterruptible sleep can be woken by a stray
 * wake_up_process()) sleeps again.
 */
static void dmirror_sleep_until(struct dmirror_device *mdevice, ktime_t until)
{
	unsigned long wake;
	s64 late;

	atomic64_inc(dmirror_stat(mdevice, flush_sleeps));
	do {
		set_current_state(TASK_UNINTERRUPTIBLE);
		schedule_hrtimeout(&until, HRTIMER_MODE_ABS);
		late = ktime_to_ns(ktime_sub(ktime_get(), until));
	} while (late < 0);
	/* Racing updates lose a sample, which an average can afford. */
	wake = READ_ONCE(dmirror_wake_ns);
	wake = wake - wake / DMIRROR_WAKE_WEIGHT +
	       min_t(u64, late, DMIRROR_MAX_POLL_NS) / DMIRROR_WAKE_WEIGHT;
	WRITE_ONCE(dmirror_wake_ns, wake);
}

/*
 * Should a flush wait that would only poll sleep instead, to measure the
 * wake-up again? One in %DMIRROR_WAKE_PROBE does: without it, once the
 * measure exceeds the flush latency nothing would refresh it, and a measure
 * taken on a busy host would keep every wait polling for long.
 */
static bool dmirror_wake_probe(void)
{
	return !(atomic_inc_return(&dmirror_polled_waits) % DMIRROR_WAKE_PROBE);
}

/**
 * dmirror_flush_wait() - wait for a submitted flush to complete
 * @flush: the flush
 *
 * Sleeps until what a wake-up costs (dmirror_wake_ns) before the flush
 * completes, then polls for the rest, as drivers poll for a completion that
 * is due sooner than a sleep would end: a flush due within a wake-up is
 * only polled for (but for the odd one that measures the wake-up again,
 * dmirror_wake_probe()), a longer one costs a sleep and a short poll. A
 * flush that has completed costs nothing. Sleeps only if the flush has not
 * completed, which a flush of latency 0 always has.
 */
static void dmirror_flush_wait(struct dmirror_flush *flush)
{
	ktime_t wake = ktime_sub_ns(flush->deadline, READ_ONCE(dmirror_wake_ns));
	ktime_t now = ktime_get();

	if (ktime_before(now, wake))
		dmirror_sleep_until(flush->mdevice, wake);
	else if (ktime_before(now, flush->deadline) && dmirror_wake_probe())
		dmirror_sleep_until(flush->mdevice, flush->deadline);
	while (ktime_before(ktime_get(), flush->deadline))
		cpu_relax();
	atomic_dec(&dmirror_flushes_in_flight);
}

/**
 * dmirror_flush_sync() - flush and wait, without a finish object
 * @mdevice: device
 * @latency: how long the flush takes, in ns
 * @log: record of the invalidation
 * @note: %DMIRROR_LOG_SYNC, or %DMIRROR_LOG_FALLBACK for a two-pass device
 *	without a finish object
 *
 * May sleep unless @latency is 0 (dmirror_flush_wait()).
 */
static void dmirror_flush_sync(struct dmirror_device *mdevice, u64 latency,
			       u64 log, enum dmirror_log_note note)
{
	struct dmirror_flush flush = { .mdevice = mdevice };

	dmirror_log_note(log, note);
	dmirror_flush_submit(&flush, latency);
	dmirror_flush_wait(&flush);
}

/**
 * dmirror_flush_get() - take a finish object from the device's pool
 * @mdevice: device
 *
 * Does not sleep or allocate.
 *
 * Return: an idle flush, or NULL if none is free or the one-shot
 * %HMM_DMIRROR_SETTING_FAIL_NEXT_FINISH is set.
 */
static struct dmirror_flush *dmirror_flush_get(struct dmirror_device *mdevice)
{
	struct dmirror_flush *flush = NULL;
	unsigned long idx;

	spin_lock(&mdevice->lock);
	if (mdevice->fail_next_finish) {
		mdevice->fail_next_finish = false;
	} else {
		idx = find_first_zero_bit(mdevice->flush_busy,
					  DMIRROR_FLUSH_POOL);
		if (idx < DMIRROR_FLUSH_POOL) {
			__set_bit(idx, mdevice->flush_busy);
			flush = &mdevice->flush_pool[idx];
		}
	}
	spin_unlock(&mdevice->lock);
	return flush;
}

static void dmirror_flush_put(struct dmirror_flush *flush)
{
	struct dmirror_device *mdevice = flush->mdevice;

	spin_lock(&mdevice->lock);
	__clear_bit(flush - mdevice->flush_pool, mdevice->flush_busy);
	spin_unlock(&mdevice->lock);
}

/* ------------------------------------------------------------------------
 * The device page table
 */

/*
 * The leaf layout is fixed once, under leaf_lock, by dmirror_bind(); readers
 * that do not hold leaf_lock look at it after this returns true.
 */
static bool dmirror_is_bound(struct dmirror *dmirror)
{
	/* Pairs with smp_store_release() in dmirror_bind(). */
	return smp_load_acquire(&dmirror->bound);
}

static unsigned long dmirror_leaf_size(const struct dmirror *dmirror)
{
	return 1UL << dmirror->leaf_shift;
}

static unsigned long dmirror_leaf_index(const struct dmirror *dmirror,
					unsigned long addr)
{
	return addr >> dmirror->leaf_shift;
}

static u64 *dmirror_leaf_pte(struct dmirror_leaf *leaf, unsigned long addr)
{
	return &leaf->pte[(addr - leaf->start) >> PAGE_SHIFT];
}

static u64 dmirror_pte_make(unsigned long pfn, u64 flags)
{
	return ((u64)pfn << DMIRROR_PTE_PFN_SHIFT) | DMIRROR_PTE_VALID | flags;
}

/**
 * dmirror_pte_set() - write a device PTE
 * @dmirror: mirror
 * @leaf: leaf holding the PTE, in the table
 * @addr: page address
 * @pte: new PTE, 0 to clear
 *
 * Context: pt_lock held.
 * Return: true if a valid PTE was replaced.
 */
static bool dmirror_pte_set(struct dmirror *dmirror, struct dmirror_leaf *leaf,
			    unsigned long addr, u64 pte)
{
	u64 *slot = dmirror_leaf_pte(leaf, addr);
	bool was_valid = *slot & DMIRROR_PTE_VALID;

	lockdep_assert_held(&dmirror->pt_lock);
	if ((*slot & DMIRROR_PTE_PEER) && !(pte & DMIRROR_PTE_VALID))
		atomic64_inc(dmirror_stat(dmirror->mdevice,
					  interconnect_unmaps));
	leaf->nr_valid -= was_valid;
	leaf->nr_valid += !!(pte & DMIRROR_PTE_VALID);
	*slot = pte;
	return was_valid;
}

/**
 * dmirror_pte_get() - read the device PTE of a page
 * @dmirror: mirror
 * @addr: page address
 *
 * Context: pt_lock held.
 * Return: the PTE, 0 when the page is not mirrored.
 */
static u64 dmirror_pte_get(struct dmirror *dmirror, unsigned long addr)
{
	struct dmirror_leaf *leaf;

	lockdep_assert_held(&dmirror->pt_lock);
	if (!dmirror_is_bound(dmirror))
		return 0;
	leaf = xa_load(&dmirror->leaves, dmirror_leaf_index(dmirror, addr));
	return leaf ? *dmirror_leaf_pte(leaf, addr) : 0;
}

/**
 * dmirror_leaf_clear() - clear the PTEs of a leaf within a range
 * @dmirror: mirror
 * @leaf: leaf
 * @start: start of the range, may lie before the leaf
 * @end: end of the range, may lie after the leaf
 * @count_only: only count the valid PTEs
 *
 * Context: pt_lock held.
 * Return: the number of valid PTEs in the range, before clearing.
 */
static unsigned long dmirror_leaf_clear(struct dmirror *dmirror,
					struct dmirror_leaf *leaf,
					unsigned long start, unsigned long end,
					bool count_only)
{
	unsigned long addr = max(start, leaf->start);
	unsigned long last = min(end, leaf->start + dmirror_leaf_size(dmirror));
	unsigned long n = 0;

	lockdep_assert_held(&dmirror->pt_lock);
	if (!leaf->nr_valid)
		return 0;
	for (; addr < last; addr += PAGE_SIZE) {
		if (count_only)
			n += !!(*dmirror_leaf_pte(leaf, addr) & DMIRROR_PTE_VALID);
		else
			n += dmirror_pte_set(dmirror, leaf, addr, 0);
	}
	return n;
}

/**
 * dmirror_pt_clear() - clear the PTEs of all leaves within a range
 * @dmirror: mirror
 * @start: first address
 * @end: end address
 * @count_only: only count the valid PTEs
 *
 * Only leaves that exist are visited, so clearing the whole address space
 * (as exit_mmap() does) costs as much as the mirror is large.
 *
 * Context: pt_lock held.
 * Return: the number of valid PTEs in the range, before clearing.
 */
static unsigned long dmirror_pt_clear(struct dmirror *dmirror,
				      unsigned long start, unsigned long end,
				      bool count_only)
{
	struct dmirror_leaf *leaf;
	unsigned long idx, n = 0;

	lockdep_assert_held(&dmirror->pt_lock);
	if (!dmirror_is_bound(dmirror))
		return 0;
	xa_for_each_range(&dmirror->leaves, idx, leaf,
			  dmirror_leaf_index(dmirror, start),
			  dmirror_leaf_index(dmirror, end - 1))
		n += dmirror_leaf_clear(dmirror, leaf, start, end, count_only);
	return n;
}

/* ------------------------------------------------------------------------
 * Leaves and their notifiers
 */

static const struct mmu_interval_notifier_ops dmirror_single_pass_ops;
static const struct mmu_interval_notifier_ops dmirror_two_pass_ops;

static const struct mmu_interval_notifier_ops *
dmirror_notifier_ops(const struct dmirror *dmirror)
{
	return dmirror->two_pass ? &dmirror_two_pass_ops :
				   &dmirror_single_pass_ops;
}

/**
 * dmirror_notifier_insert() - subscribe to invalidations of a range
 * @dmirror: mirror
 * @dn: notifier to insert
 * @start: first address
 * @length: bytes
 *
 * Context: leaf_lock held, mmap lock not held.
 * Return: 0 or the error of mmu_interval_notifier_insert().
 */
static int dmirror_notifier_insert(struct dmirror *dmirror,
				   struct dmirror_notifier *dn,
				   unsigned long start, unsigned long length)
{
	struct dmirror_device *mdevice = dmirror->mdevice;
	int ret;

	lockdep_assert_held(&dmirror->leaf_lock);
	/* The first insertion registers with the mm under its mmap lock. */
	lockdep_assert_not_held(&dmirror->mm->mmap_lock);
	dn->dmirror = dmirror;
	if (dmirror_inject_failure())
		return -ENOMEM;
	ret = mmu_interval_notifier_insert(&dn->mni, dmirror->mm, start, length,
					   dmirror_notifier_ops(dmirror));
	if (ret)
		return ret;
	atomic64_inc(dmirror_stat(mdevice, notifier_inserts));
	atomic64_inc(dmirror_stat(mdevice, notifiers_live));
	return 0;
}

/**
 * dmirror_notifier_remove() - unsubscribe and wait for running callbacks
 * @dmirror: mirror
 * @dn: notifier to remove
 *
 * mmu_interval_notifier_remove() waits until no invalidation of the mm is
 * running, and those take pt_lock: holding it would deadlock (lockdep knows
 * the wait as the invalidation's pseudo-lock). Nor is leaf_lock held: the
 * wait can be as long as any invalidation of the process, and every fault
 * that needs a new leaf would wait with it.
 *
 * Context: process context, neither pt_lock nor leaf_lock held.
 */
static void dmirror_notifier_remove(struct dmirror *dmirror,
				    struct dmirror_notifier *dn)
{
	struct dmirror_device *mdevice = dmirror->mdevice;

	lockdep_assert_not_held(&dmirror->leaf_lock);
	lockdep_assert_not_held(&dmirror->pt_lock);
	mmu_interval_notifier_remove(&dn->mni);
	atomic64_inc(dmirror_stat(mdevice, notifier_removals));
	atomic64_dec(dmirror_stat(mdevice, notifiers_live));
}

/**
 * dmirror_bind() - fix the mirror's page table layout and notifier model
 * @dmirror: mirror
 *
 * Done at the first fault, so that settings made on a fresh file apply to
 * it. In the whole model this inserts the one notifier.
 *
 * Context: leaf_lock held.
 * Return: 0 or the error of mmu_interval_notifier_insert().
 */
static int dmirror_bind(struct dmirror *dmirror)
{
	struct dmirror_device *mdevice = dmirror->mdevice;
	int ret = 0;

	lockdep_assert_held(&dmirror->leaf_lock);
	if (dmirror->bound)
		return 0;

	spin_lock(&mdevice->lock);
	dmirror->model = mdevice->settings.notifier_model;
	dmirror->two_pass = mdevice->settings.invalidation ==
			    HMM_DMIRROR_TWO_PASS;
	dmirror->leaf_shift = ilog2(mdevice->settings.leaf_size);
	spin_unlock(&mdevice->lock);

	if (dmirror->model == HMM_DMIRROR_NOTIFIER_WHOLE)
		ret = dmirror_notifier_insert(dmirror, &dmirror->whole, 0,
					      ULONG_MAX & PAGE_MASK);
	if (!ret) {
		/* Paired with lockless readers of the leaf layout. */
		smp_store_release(&dmirror->bound, true);
	}
	return ret;
}

static void dmirror_leaf_free_rcu(struct kref *ref)
{
	struct dmirror_leaf *leaf = container_of(ref, struct dmirror_leaf, ref);

	kvfree_rcu(leaf, rcu);
}

static void dmirror_leaf_put(struct dmirror_leaf *leaf)
{
	kref_put(&leaf->ref, dmirror_leaf_free_rcu);
}

/**
 * dmirror_leaf_create() - add the leaf covering an address
 * @dmirror: mirror
 * @addr: address
 *
 * Everything that can fail comes first: the leaf and its slot in the table.
 * In the per-leaf model the leaf's notifier is inserted next, and only then
 * is the leaf published, so that a published leaf is always covered. Once
 * the notifier is in, its callbacks may queue the leaf for reaping at any
 * time, so from there on the leaf must be published: a leaf freed on an
 * error path after that would be left on the reap list.
 *
 * Context: leaf_lock held, the mirror bound.
 * Return: the leaf with a reference for the caller, or an ERR_PTR().
 */
static struct dmirror_leaf *dmirror_leaf_create(struct dmirror *dmirror,
						unsigned long addr)
{
	unsigned long size = dmirror_leaf_size(dmirror);
	unsigned long idx = dmirror_leaf_index(dmirror, addr);
	struct dmirror_leaf *leaf;
	int ret;

	lockdep_assert_held(&dmirror->leaf_lock);
	if (WARN_ON_ONCE(!dmirror_is_bound(dmirror)))
		return ERR_PTR(-EINVAL);
	if (dmirror_inject_failure())
		return ERR_PTR(-ENOMEM);
	leaf = kvzalloc(struct_size(leaf, pte, size >> PAGE_SHIFT),
			GFP_KERNEL);
	if (!leaf)
		return ERR_PTR(-ENOMEM);
	kref_init(&leaf->ref);
	leaf->start = ALIGN_DOWN(addr, size);
	leaf->notifier.leaf = leaf;

	/* Lookups see a reserved slot as empty. */
	ret = dmirror_inject_failure() ? -ENOMEM :
	      xa_reserve(&dmirror->leaves, idx, GFP_KERNEL);
	if (ret)
		goto free;
	if (dmirror->model == HMM_DMIRROR_NOTIFIER_PER_LEAF) {
		ret = dmirror_notifier_insert(dmirror, &leaf->notifier,
					      leaf->start, size);
		if (ret)
			goto release;
	}
	/* Storing into a reserved slot does not allocate: it cannot fail. */
	xa_store(&dmirror->leaves, idx, leaf, GFP_KERNEL);
	kref_get(&leaf->ref);
	return leaf;

release:
	xa_release(&dmirror->leaves, idx);
free:
	kvfree(leaf);
	return ERR_PTR(ret);
}

/**
 * dmirror_leaf_get() - find or create the leaf covering an address
 * @dmirror: mirror
 * @addr: address
 *
 * The common case, an existing leaf, takes no lock but RCU.
 *
 * Return: the leaf with a reference, to drop with dmirror_leaf_put(), or an
 * ERR_PTR().
 */
static struct dmirror_leaf *dmirror_leaf_get(struct dmirror *dmirror,
					     unsigned long addr)
{
	struct dmirror_leaf *leaf = NULL;
	int ret;

	if (dmirror_is_bound(dmirror)) {
		rcu_read_lock();
		leaf = xa_load(&dmirror->leaves,
			       dmirror_leaf_index(dmirror, addr));
		if (leaf && !kref_get_unless_zero(&leaf->ref))
			leaf = NULL;
		rcu_read_unlock();
		if (leaf)
			return leaf;
	}

	mutex_lock(&dmirror->leaf_lock);
	ret = dmirror_bind(dmirror);
	if (ret) {
		leaf = ERR_PTR(ret);
	} else {
		leaf = xa_load(&dmirror->leaves,
			       dmirror_leaf_index(dmirror, addr));
		if (leaf)
			kref_get(&leaf->ref);
		else
			leaf = dmirror_leaf_create(dmirror, addr);
	}
	mutex_unlock(&dmirror->leaf_lock);
	return leaf;
}

static struct mmu_interval_notifier *
dmirror_leaf_notifier(struct dmirror *dmirror, struct dmirror_leaf *leaf)
{
	if (dmirror->model == HMM_DMIRROR_NOTIFIER_PER_LEAF)
		return &leaf->notifier.mni;
	return &dmirror->whole.mni;
}

/**
 * dmirror_leaf_queue_reap() - have an empty leaf removed
 * @dmirror: mirror
 * @leaf: leaf an invalidation just emptied
 *
 * Called from invalidation callbacks, which cannot remove notifiers: the
 * leaf goes on a list for dmirror_reap_work(). Does not sleep.
 *
 * Context: pt_lock held.
 */
static void dmirror_leaf_queue_reap(struct dmirror *dmirror,
				    struct dmirror_leaf *leaf)
{
	lockdep_assert_held(&dmirror->pt_lock);
	/* In the whole model leaves have no notifier and live until close. */
	if (dmirror->model != HMM_DMIRROR_NOTIFIER_PER_LEAF)
		return;
	if (leaf->nr_valid || leaf->queued || leaf->dead || dmirror->closing)
		return;
	leaf->queued = true;
	llist_add(&leaf->reap_node, &dmirror->reap_list);
	queue_delayed_work(system_dfl_wq, &dmirror->reap_work,
			   msecs_to_jiffies(DMIRROR_REAP_DELAY_MS));
}

/**
 * dmirror_leaf_unpublish() - take a leaf out of the table
 * @dmirror: mirror
 * @leaf: leaf
 *
 * Faults holding a reference notice @leaf->dead under pt_lock and retry.
 *
 * Context: leaf_lock and pt_lock held.
 */
static void dmirror_leaf_unpublish(struct dmirror *dmirror,
				   struct dmirror_leaf *leaf)
{
	lockdep_assert_held(&dmirror->leaf_lock);
	lockdep_assert_held(&dmirror->pt_lock);
	leaf->dead = true;
	xa_erase(&dmirror->leaves, dmirror_leaf_index(dmirror, leaf->start));
}

/**
 * dmirror_reap_work() - remove leaves that invalidations emptied
 * @work: &dmirror.reap_work
 *
 * A leaf refaulted since it was queued is kept. release() flushes this work
 * before tearing the mirror down, so it never outlives the file.
 */
static void dmirror_reap_work(struct work_struct *work)
{
	struct dmirror *dmirror = container_of(to_delayed_work(work),
					       struct dmirror, reap_work);
	struct dmirror_leaf *leaf, *next;
	struct llist_node *list;

	list = llist_del_all(&dmirror->reap_list);
	llist_for_each_entry_safe(leaf, next, list, reap_node) {
		bool reap;

		mutex_lock(&dmirror->leaf_lock);
		mutex_lock(&dmirror->pt_lock);
		leaf->queued = false;
		reap = !leaf->nr_valid && !leaf->dead;
		if (reap)
			dmirror_leaf_unpublish(dmirror, leaf);
		mutex_unlock(&dmirror->pt_lock);
		mutex_unlock(&dmirror->leaf_lock);

		if (reap) {
			/* Waits for callbacks running on this notifier. */
			dmirror_notifier_remove(dmirror, &leaf->notifier);
			dmirror_leaf_put(leaf);
		}
	}
}

/* ------------------------------------------------------------------------
 * Debug hold points
 */

/**
 * dmirror_hold_end() - end a hold and let its task, if any, go on
 * @mdevice: device
 * @gen: the &dmirror_hold.gen of the hold to end
 *
 * Nothing happens when that hold has ended already.
 */
static void dmirror_hold_end(struct dmirror_device *mdevice, unsigned long gen)
{
	struct dmirror_hold *hold = &mdevice->hold;

	spin_lock(&mdevice->lock);
	if (hold->owner && hold->gen == gen) {
		WRITE_ONCE(hold->owner, NULL);
		WRITE_ONCE(hold->held, false);
		WRITE_ONCE(hold->gen, gen + 1);
	}
	spin_unlock(&mdevice->lock);
	wake_up_all(&hold->wq);
}

/**
 * dmirror_hold_reached() - a task reached a hold point
 * @dmirror: mirror the task works for
 * @point: enum hmm_dmirror_hold_point
 * @start: start of the range the task works on
 * @end: its end
 *
 * Holds the task when the device's hold is armed for @point, the mirrored
 * address space and a range overlapping [@start, @end), and the task is one
 * of the mirrored process (not a kernel thread such as khugepaged), until the
 * hold is released or the task gets a fatal signal. Costs one load when no
 * hold is armed. An exiting task is never held: nobody could release the
 * invalidations of its exit_mmap() in time to let it die.
 *
 * Context: may sleep; no lock of this driver held.
 */
static void dmirror_hold_reached(struct dmirror *dmirror, u32 point,
				 unsigned long start, unsigned long end)
{
	struct dmirror_device *mdevice = dmirror->mdevice;
	struct dmirror_hold *hold = &mdevice->hold;
	unsigned long gen;

	/* See DOC: Locking: a held task does not hold pt_lock. */
	lockdep_assert_not_held(&dmirror->pt_lock);
	if (likely(!READ_ONCE(hold->owner)) || (current->flags & PF_EXITING))
		return;

	spin_lock(&mdevice->lock);
	if (!hold->owner || hold->held || hold->point != point ||
	    hold->owner->mm != dmirror->mm || current->mm != dmirror->mm ||
	    end <= hold->start || start >= hold->end) {
		spin_unlock(&mdevice->lock);
		return;
	}
	WRITE_ONCE(hold->held, true);
	gen = hold->gen;
	spin_unlock(&mdevice->lock);
	wake_up_all(&hold->wq);

	if (wait_event_killable(hold->wq, READ_ONCE(hold->gen) != gen))
		dmirror_hold_end(mdevice, gen);
}

/**
 * dmirror_hold_arm() - HMM_DMIRROR_HOLD_ARM
 * @dmirror: mirror of the file arming the hold
 * @point: enum hmm_dmirror_hold_point
 * @range: range of the mirrored address space to hold tasks for
 *
 * Return: 0, -EINVAL for an unknown @point, -EBUSY when the device's hold is
 * in use.
 */
static int dmirror_hold_arm(struct dmirror *dmirror, u32 point,
			    const struct dmirror_range *range)
{
	struct dmirror_device *mdevice = dmirror->mdevice;
	struct dmirror_hold *hold = &mdevice->hold;
	int ret = 0;

	if (point != HMM_DMIRROR_HOLD_FAULT &&
	    point != HMM_DMIRROR_HOLD_INVALIDATE)
		return -EINVAL;

	spin_lock(&mdevice->lock);
	if (hold->owner) {
		ret = -EBUSY;
	} else {
		hold->point = point;
		hold->start = range->start;
		hold->end = range->end;
		WRITE_ONCE(hold->held, false);
		WRITE_ONCE(hold->owner, dmirror);
	}
	spin_unlock(&mdevice->lock);
	return ret;
}

/* The file's hold is armed or holding a task; its generation in @gen. */
static bool dmirror_hold_owned(struct dmirror *dmirror, unsigned long *gen)
{
	struct dmirror_device *mdevice = dmirror->mdevice;
	bool owned;

	spin_lock(&mdevice->lock);
	owned = mdevice->hold.owner == dmirror;
	*gen = mdevice->hold.gen;
	spin_unlock(&mdevice->lock);
	return owned;
}

/**
 * dmirror_hold_wait() - HMM_DMIRROR_HOLD_WAIT
 * @dmirror: mirror of the file that armed the hold
 *
 * Return: 0 once a task is held, -ENOENT when the file's hold ended or there
 * is none, -EINTR on a fatal signal.
 */
static int dmirror_hold_wait(struct dmirror *dmirror)
{
	struct dmirror_hold *hold = &dmirror->mdevice->hold;
	unsigned long gen;

	if (!dmirror_hold_owned(dmirror, &gen))
		return -ENOENT;
	if (wait_event_killable(hold->wq,
				READ_ONCE(hold->gen) != gen || READ_ONCE(hold->held)))
		return -EINTR;
	return READ_ONCE(hold->gen) == gen ? 0 : -ENOENT;
}

/**
 * dmirror_hold_release() - HMM_DMIRROR_HOLD_RELEASE, and on close
 * @dmirror: mirror of the file that armed the hold
 *
 * Return: 0, or -ENOENT when the file has no hold.
 */
static int dmirror_hold_release(struct dmirror *dmirror)
{
	unsigned long gen;

	if (!dmirror_hold_owned(dmirror, &gen))
		return -ENOENT;
	dmirror_hold_end(dmirror->mdevice, gen);
	return 0;
}

/* ------------------------------------------------------------------------
 * Invalidation
 */

static struct dmirror_notifier *
to_dmirror_notifier(struct mmu_interval_notifier *mni)
{
	return container_of(mni, struct dmirror_notifier, mni);
}

/**
 * dmirror_event_is_own() - is this invalidation the device's own doing?
 * @dmirror: mirror
 * @range: the invalidation
 *
 * make_device_exclusive() on behalf of this device replaces the CPU PTE with
 * a device-exclusive entry for a page the device is about to map for atomic
 * access: the device keeps access, so there is nothing to clear. Advancing
 * the notifier sequence would also make the loop that caused it see a
 * collision and retry, causing the same invalidation again, forever. Another
 * device's exclusive access is honoured like any other invalidation.
 *
 * Nothing else is ignored, MMU_NOTIFY_MIGRATE in particular (see "Which
 * invalidations a device may ignore" in the Locking section): its owner is
 * the pagemap owner, which a whole interconnect group shares.
 *
 * Return: true if the device must ignore @range.
 */
static bool dmirror_event_is_own(struct dmirror *dmirror,
				 const struct mmu_notifier_range *range)
{
	struct dmirror_device *mdevice = dmirror->mdevice;

	if (range->event != MMU_NOTIFY_EXCLUSIVE)
		return false;
	/* An exclusive owner is a device, never a group: it would match peers. */
	WARN_ON_ONCE(mdevice->group && range->owner == mdevice->owner);
	return range->owner == mdevice;
}

/**
 * dmirror_invalidate_begin() - the part of an invalidation done under pt_lock
 * @dn: notifier called
 * @range: what changes, and why
 * @cur_seq: sequence to publish
 * @log: output, the record of the invalidation
 * @cleared: output, the number of PTEs cleared
 * @latency: output, the flush latency this invalidation must use: the
 *	decision to go ahead without blocking rests on it
 *
 * Clears the device PTEs of the range and, in the per-leaf model, queues an
 * emptied leaf for removal. A range that may not block is refused when
 * pt_lock is contended or when valid PTEs would need a flush that takes
 * time: waiting for it would mean sleeping.
 *
 * Return: false if refused.
 */
static bool dmirror_invalidate_begin(struct dmirror_notifier *dn,
				     const struct mmu_notifier_range *range,
				     unsigned long cur_seq, u64 *log,
				     unsigned long *cleared, u64 *latency)
{
	struct dmirror *dmirror = dn->dmirror;
	struct dmirror_device *mdevice = dmirror->mdevice;
	bool blockable = mmu_notifier_range_blockable(range);
	unsigned long start = range->start, end = range->end;

	*log = dmirror_log_callback(range, cur_seq);
	if (blockable)
		mutex_lock(&dmirror->pt_lock);
	else if (!mutex_trylock(&dmirror->pt_lock))
		goto refuse;

	*latency = READ_ONCE(mdevice->settings.flush_latency_ns);
	if (!blockable && *latency &&
	    (dn->leaf ? dmirror_leaf_clear(dmirror, dn->leaf, start, end, true) :
			dmirror_pt_clear(dmirror, start, end, true))) {
		mutex_unlock(&dmirror->pt_lock);
		goto refuse;
	}

	mmu_interval_set_seq(&dn->mni, cur_seq);
	WRITE_ONCE(dn->nr_invalidated, dn->nr_invalidated + 1);
	/*
	 * Before the core ends the invalidation: a fault that sees the end in
	 * mmu_interval_read_begin() sees the count (dmirror_range_fault_locked()).
	 */
	smp_wmb();
	if (dn->leaf) {
		*cleared = dmirror_leaf_clear(dmirror, dn->leaf, start, end,
					      false);
		dmirror_leaf_queue_reap(dmirror, dn->leaf);
	} else {
		*cleared = dmirror_pt_clear(dmirror, start, end, false);
	}
	mutex_unlock(&dmirror->pt_lock);

	if (range->event < HMM_DMIRROR_NR_EVENTS)
		atomic64_inc(dmirror_stat(mdevice, invalidations) +
			     range->event);
	return true;

refuse:
	atomic64_inc(dmirror_stat(mdevice, nonblock_refused));
	dmirror_log_note(*log, DMIRROR_LOG_REFUSED);
	return false;
}

/*
 * HMM_DMIRROR_HOLD_INVALIDATE: the new sequence is published and the device
 * PTEs are clear, the CPU page table is not changed yet.
 */
static void dmirror_hold_invalidation(struct dmirror *dmirror,
				      const struct mmu_notifier_range *range)
{
	if (mmu_notifier_range_blockable(range))
		dmirror_hold_reached(dmirror, HMM_DMIRROR_HOLD_INVALIDATE,
				     range->start, range->end);
}

/**
 * dmirror_flush_start() - the flush of a two-pass invalidate_start()
 * @mdevice: device
 * @range: the invalidation
 * @latency: how long the flush takes, in ns
 * @log: record of the invalidation
 *
 * Submits the flush without waiting for it, with a finish object to wait in
 * the second pass. Without a free finish object, waits here instead (counted
 * as a synchronous fallback). A range that may not block never gets a finish
 * object: dmirror_invalidate_begin() lets one through only when its flush
 * completes at once, and the finish pass of such a range may not sleep.
 *
 * Return: the finish object, or NULL when the flush is done.
 */
static struct mmu_interval_notifier_finish *
dmirror_flush_start(struct dmirror_device *mdevice,
		    const struct mmu_notifier_range *range, u64 latency,
		    u64 log)
{
	struct dmirror_flush *flush;

	if (!mmu_notifier_range_blockable(range)) {
		/* Only let through when the flush completes at once. */
		dmirror_flush_sync(mdevice, latency, log, DMIRROR_LOG_SYNC);
		return NULL;
	}

	flush = dmirror_flush_get(mdevice);
	if (!flush) {
		atomic64_inc(dmirror_stat(mdevice, sync_fallbacks));
		dmirror_flush_sync(mdevice, latency, log, DMIRROR_LOG_FALLBACK);
		return NULL;
	}
	flush->log = log;
	dmirror_log_note(log, DMIRROR_LOG_START);
	dmirror_flush_submit(flush, latency);
	atomic64_inc(dmirror_stat(mdevice, two_pass_starts));
	return &flush->finish;
}

/**
 * dmirror_invalidate_range() - the callback of both invalidation modes
 * @mni: notifier called
 * @range: what changes, and why
 * @cur_seq: sequence to publish
 * @finish: two pass: output, the finish object when a second pass is
 *	needed; single pass: NULL
 *
 * Clears the device PTEs and flushes the device TLB. A single pass waits
 * for the flush here; a first pass submits it and leaves the wait to the
 * finish pass, so that the core can start the flushes of every device
 * before waiting for any (dmirror_flush_start()).
 *
 * Return: false if the range may not block and the work would sleep.
 */
static bool dmirror_invalidate_range(struct mmu_interval_notifier *mni,
				     const struct mmu_notifier_range *range,
				     unsigned long cur_seq,
				     struct mmu_interval_notifier_finish **finish)
{
	struct dmirror_notifier *dn = to_dmirror_notifier(mni);
	struct dmirror_device *mdevice = dn->dmirror->mdevice;
	unsigned long cleared;
	u64 latency, log;

	if (dmirror_event_is_own(dn->dmirror, range))
		return true;
	if (!dmirror_invalidate_begin(dn, range, cur_seq, &log, &cleared,
				      &latency))
		return false;
	if (cleared && finish)
		*finish = dmirror_flush_start(mdevice, range, latency, log);
	else if (cleared)
		dmirror_flush_sync(mdevice, latency, log, DMIRROR_LOG_SYNC);
	dmirror_hold_invalidation(dn->dmirror, range);
	return true;
}

/* &mmu_interval_notifier_ops.invalidate of a single-pass device. */
static bool dmirror_invalidate(struct mmu_interval_notifier *mni,
			       const struct mmu_notifier_range *range,
			       unsigned long cur_seq)
{
	return dmirror_invalidate_range(mni, range, cur_seq, NULL);
}

/* &mmu_interval_notifier_ops.invalidate_start of a two-pass device. */
static bool
dmirror_invalidate_start(struct mmu_interval_notifier *mni,
			 const struct mmu_notifier_range *range,
			 unsigned long cur_seq,
			 struct mmu_interval_notifier_finish **finish)
{
	return dmirror_invalidate_range(mni, range, cur_seq, finish);
}

/**
 * dmirror_invalidate_finish() - second pass: wait for the flush
 * @finish: what dmirror_invalidate_start() returned
 */
static void
dmirror_invalidate_finish(struct mmu_interval_notifier_finish *finish)
{
	struct dmirror_flush *flush =
		container_of(finish, struct dmirror_flush, finish);

	dmirror_log_note(flush->log, DMIRROR_LOG_FINISH);
	dmirror_flush_wait(flush);
	atomic64_inc(dmirror_stat(flush->mdevice, two_pass_finishes));
	dmirror_flush_put(flush);
}

static const struct mmu_interval_notifier_ops dmirror_single_pass_ops = {
	.invalidate = dmirror_invalidate,
};

static const struct mmu_interval_notifier_ops dmirror_two_pass_ops = {
	.invalidate_start = dmirror_invalidate_start,
	.invalidate_finish = dmirror_invalidate_finish,
};

/* ------------------------------------------------------------------------
 * Device faults
 */

/**
 * dmirror_range_fault_locked() - one hmm_range_fault() pass under mmap lock
 * @range: range to fault; its notifier sequence is refreshed
 * @seen: NULL, or for a range of a &struct dmirror_notifier, output: its
 *	&dmirror_notifier.nr_invalidated when mmu_interval_read_begin() returned
 *
 * Return: as hmm_range_fault(), or -EINTR on a fatal signal.
 */
static int dmirror_range_fault_locked(struct hmm_range *range,
				      unsigned long *seen)
{
	struct mm_struct *mm = range->notifier->mm;
	int ret;

	range->notifier_seq = mmu_interval_read_begin(range->notifier);
	if (seen) {
		/* Pairs with smp_wmb() in dmirror_invalidate_begin(). */
		smp_rmb();
		*seen = READ_ONCE(to_dmirror_notifier(range->notifier)->nr_invalidated);
	}
	ret = mmap_read_lock_killable(mm);
	if (ret)
		return ret;
	ret = hmm_range_fault(range);
	mmap_read_unlock(mm);
	return ret;
}

/**
 * dmirror_hmm_pfn() - the pfn of one hmm_range_fault() output
 * @mdevice: device
 * @hpfn: the output for @addr
 * @addr: its address
 *
 * For a device-private folio mapped by a PMD, hmm_vma_handle_absent_pmd() in
 * Linux 7.3 returns the folio's first pfn for the first page of the range
 * and counts up from there, which is wrong when the range starts inside the
 * folio (the present-PMD path adds the offset; fixed by "mm/hmm: add the
 * offset of start to the pfn of a device-private PMD"). The pfn is
 * recomputed from the folio, which gives the same answer where the core is
 * right; each output that needed it is counted (pmd_pfn_fixups), so that
 * the bug stays visible to the tests.
 *
 * Context: pt_lock held after a successful mmu_interval_read_retry(), so
 * the page cannot go away.
 * Return: the pfn mapped at @addr.
 */
static unsigned long dmirror_hmm_pfn(struct dmirror_device *mdevice,
				     unsigned long hpfn, unsigned long addr)
{
	unsigned long pfn = hpfn & ~HMM_PFN_FLAGS;
	unsigned int order = hmm_pfn_to_map_order(hpfn);
	struct page *page = pfn_to_page(pfn);
	unsigned long right;

	if (!order || !is_device_private_page(page))
		return pfn;
	right = folio_pfn(page_folio(page)) +
		((addr & ((PAGE_SIZE << order) - 1)) >> PAGE_SHIFT);
	if (right != pfn)
		atomic64_inc(dmirror_stat(mdevice, pmd_pfn_fixups));
	return right;
}

/**
 * dmirror_pte_flags() - the device PTE flags for one hmm_range_fault() output
 * @mdevice: device
 * @page: the page mapped
 * @hpfn: the output
 *
 * hmm_range_fault() hands out device-private pages only of the owner the
 * range names (the device's, or its group's), which the device can reach;
 * any other would be a core bug, and the device could not read it.
 *
 * Return: the flags, %DMIRROR_PTE_PEER for a page in a peer's memory.
 */
static u64 dmirror_pte_flags(struct dmirror_device *mdevice, struct page *page,
			     unsigned long hpfn)
{
	u64 flags = (hpfn & HMM_PFN_WRITE) ? DMIRROR_PTE_WRITE : 0;
	struct dmirror_chunk *chunk;

	if (!dmirror_page_owned(mdevice, page)) {
		WARN_ON_ONCE(is_device_private_page(page));
		return flags;
	}
	chunk = dmirror_page_chunk(page);
	if (chunk->mdevice == mdevice) {
		dmirror_block_touch(chunk, page_to_pfn(page));
	} else {
		flags |= DMIRROR_PTE_PEER;
		atomic64_inc(dmirror_stat(mdevice, interconnect_maps));
	}
	return flags;
}

/**
 * dmirror_pt_install() - map the result of hmm_range_fault() in the device
 * @dmirror: mirror
 * @leaf: leaf holding the whole range, in the table
 * @range: a range hmm_range_fault() filled, not invalidated since
 *
 * Context: pt_lock held, after mmu_interval_read_retry() returned false.
 */
static void dmirror_pt_install(struct dmirror *dmirror,
			       struct dmirror_leaf *leaf,
			       const struct hmm_range *range)
{
	unsigned long addr;
	unsigned long i;

	lockdep_assert_held(&dmirror->pt_lock);
	for (addr = range->start, i = 0; addr < range->end;
	     addr += PAGE_SIZE, i++) {
		unsigned long hpfn = range->hmm_pfns[i];
		unsigned long pfn;
		u64 flags;

		if (WARN_ON_ONCE(!(hpfn & HMM_PFN_VALID)))
			continue;
		pfn = dmirror_hmm_pfn(dmirror->mdevice, hpfn, addr);
		flags = dmirror_pte_flags(dmirror->mdevice, pfn_to_page(pfn),
					  hpfn);
		dmirror_pte_set(dmirror, leaf, addr,
				dmirror_pte_make(pfn, flags));
	}
}

/* A write fault got a page without write access: one of its owner's. */
static bool dmirror_needs_cpu_write_fault(const struct hmm_range *range)
{
	unsigned long i, npages = (range->end - range->start) >> PAGE_SHIFT;

	if (!(range->default_flags & HMM_PFN_REQ_WRITE) ||
	    !range->dev_private_owner)
		return false;
	for (i = 0; i < npages; i++)
		if (!(range->hmm_pfns[i] & HMM_PFN_WRITE))
			return true;
	return false;
}

/**
 * dmirror_retry_collisions() - the collision-retry loop of every device walk
 * @pass: one attempt: reads the CPU page table, then under pt_lock uses the
 *	result only if no invalidation collided with it; returns 0 when done,
 *	-EAGAIN when a collision made the attempt stale, or an error
 * @arg: passed to @pass
 * @retries: counts the collisions, or NULL
 *
 * The device fault, exclusive access and snapshot all need the loop of the
 * HMM documentation; this is it, once. It gives up once invalidations have
 * kept colliding for %DMIRROR_FAULT_TIMEOUT_MS and at least
 * %DMIRROR_RETRY_MIN times: where one attempt takes a good part of the time
 * limit (a loaded host, a debug kernel), time alone would give up after an
 * attempt or two.
 *
 * Return: the first result of @pass other than -EAGAIN, -EBUSY when giving
 * up, or -EINTR on a fatal signal.
 */
static int dmirror_retry_collisions(int (*pass)(void *arg), void *arg,
				    atomic64_t *retries)
{
	unsigned long deadline = jiffies +
				 msecs_to_jiffies(DMIRROR_FAULT_TIMEOUT_MS);
	unsigned int tries = 0;
	int ret;

	while ((ret = pass(arg)) == -EAGAIN) {
		if (retries)
			atomic64_inc(retries);
		if (fatal_signal_pending(current))
			return -EINTR;
		if (++tries >= DMIRROR_RETRY_MIN && time_after(jiffies, deadline))
			return -EBUSY;
	}
	return ret;
}

/**
 * dmirror_may_install() - may a fault pass install what it read?
 * @dmirror: mirror
 * @leaf: the leaf the pass looked up
 * @range: the pass
 * @seen: what dmirror_range_fault_locked() saw, NULL when the pass did not
 *	call mmu_interval_read_begin() itself
 *
 * Asks mmu_interval_read_retry(), and checks its answer: an invalidation
 * that reached this driver's callback after mmu_interval_read_begin()
 * returned published a new sequence, so the core must say retry. When it
 * does not, the device would map pages the CPU no longer maps: warn once,
 * count it, and retry anyway.
 *
 * Context: pt_lock held.
 * Return: true if the pass may install.
 */
static bool dmirror_may_install(struct dmirror *dmirror,
				struct dmirror_leaf *leaf,
				const struct hmm_range *range,
				const unsigned long *seen)
{
	struct dmirror_notifier *dn = to_dmirror_notifier(range->notifier);

	lockdep_assert_held(&dmirror->pt_lock);
	if (leaf->dead ||
	    mmu_interval_read_retry(range->notifier, range->notifier_seq))
		return false;
	if (!seen || dn->nr_invalidated == *seen)
		return true;
	WARN_ONCE(1, "test_hmm: mmu_interval_read_retry() missed an invalidation of [%#lx, %#lx)\n",
		  range->start, range->end);
	atomic64_inc(dmirror_stat(dmirror->mdevice, stale_installs));
	return false;
}

/**
 * struct dmirror_fault_batch - one batch of a device fault
 * @dmirror: mirror
 * @range: the batch; start, end, flags and pfn array set by the caller, end
 *	cut to the end of the leaf holding start
 * @unlocked: let the CPU fault handler drop the mmap lock (userfaultfd)
 */
struct dmirror_fault_batch {
	struct dmirror *dmirror;
	struct hmm_range *range;
	bool unlocked;
};

/**
 * dmirror_fault_range() - hmm_range_fault() for a device fault
 * @batch: the batch
 * @seen: output, see dmirror_range_fault_locked(); NULL when unlocked
 *
 * hmm_range_fault() hands out the device's own private pages as they are,
 * read-only ones too (after fork(), say); a write fault has the CPU fault
 * them, and break COW, by not claiming them this once.
 *
 * Return: as hmm_range_fault().
 */
static int dmirror_fault_range(struct dmirror_fault_batch *batch,
			       unsigned long *seen)
{
	unsigned long timeout = msecs_to_jiffies(DMIRROR_FAULT_TIMEOUT_MS);
	struct hmm_range *range = batch->range;
	int ret;

	for (;;) {
		if (batch->unlocked)
			ret = hmm_range_fault_unlocked_timeout(range, timeout);
		else
			ret = dmirror_range_fault_locked(range, seen);
		if (ret || !dmirror_needs_cpu_write_fault(range))
			break;
		range->dev_private_owner = NULL;
	}
	range->dev_private_owner = batch->dmirror->mdevice->owner;
	return ret;
}

/**
 * dmirror_fault_pass() - one attempt at faulting a batch into the device
 * @arg: the &struct dmirror_fault_batch
 *
 * Read the CPU page table, then take pt_lock and install the result only if
 * no invalidation ran since mmu_interval_read_begin() and the leaf is still
 * in the table (dmirror_may_install()). HMM_DMIRROR_HOLD_FAULT holds the
 * attempt in between.
 *
 * Return: 0, -EAGAIN when an invalidation made the attempt stale, or the
 * error of hmm_range_fault() or of leaf creation.
 */
static int dmirror_fault_pass(void *arg)
{
	struct dmirror_fault_batch *batch = arg;
	struct dmirror *dmirror = batch->dmirror;
	struct hmm_range *range = batch->range;
	struct dmirror_leaf *leaf;
	unsigned long seen = 0;
	int ret;

	leaf = dmirror_leaf_get(dmirror, range->start);
	if (IS_ERR(leaf))
		return PTR_ERR(leaf);
	range->end = min(range->end, leaf->start + dmirror_leaf_size(dmirror));
	range->notifier = dmirror_leaf_notifier(dmirror, leaf);

	ret = dmirror_fault_range(batch, batch->unlocked ? NULL : &seen);
	if (ret == -EBUSY) {
		ret = -EAGAIN;
	} else if (ret) {
		/* Do not keep a leaf only a failed fault wanted. */
		mutex_lock(&dmirror->pt_lock);
		dmirror_leaf_queue_reap(dmirror, leaf);
		mutex_unlock(&dmirror->pt_lock);
	} else {
		dmirror_hold_reached(dmirror, HMM_DMIRROR_HOLD_FAULT,
				     range->start, range->end);
		mutex_lock(&dmirror->pt_lock);
		if (dmirror_may_install(dmirror, leaf, range,
					batch->unlocked ? NULL : &seen))
			dmirror_pt_install(dmirror, leaf, range);
		else
			ret = -EAGAIN;
		mutex_unlock(&dmirror->pt_lock);
	}
	dmirror_leaf_put(leaf);
	return ret;
}

/*
 * The end of the batch starting at @addr of a walk ending at @end: device
 * faults, copies and snapshots go %DMIRROR_BATCH_PAGES at a time, so that
 * their pfn arrays and bounce buffers stay small and no lock is held long.
 */
static unsigned long dmirror_batch_end(unsigned long addr, unsigned long end)
{
	return min(end, addr + DMIRROR_BATCH_PAGES * PAGE_SIZE);
}

/**
 * dmirror_fault() - handle a device page fault
 * @dmirror: mirror
 * @start: faulting address
 * @end: end of the access; the device prefetches up to here
 * @write: the device needs write access
 * @unlocked: see &struct dmirror_fault_batch
 *
 * Context: process context, the mirrored mm held with mmget().
 * Return: 0, -EFAULT (no access possible), -EPERM (write to a read-only
 * mapping), -ENOMEM, -EBUSY or -EINTR.
 */
static int dmirror_fault(struct dmirror *dmirror, unsigned long start,
			 unsigned long end, bool write, bool unlocked)
{
	unsigned long pfns[DMIRROR_BATCH_PAGES];
	struct hmm_range range = {
		.hmm_pfns = pfns,
		.default_flags = HMM_PFN_REQ_FAULT |
				 (write ? HMM_PFN_REQ_WRITE : 0),
		.dev_private_owner = dmirror->mdevice->owner,
	};
	struct dmirror_fault_batch batch = {
		.dmirror = dmirror,
		.range = &range,
		.unlocked = unlocked,
	};
	unsigned long addr;
	int ret;

	atomic64_inc(dmirror_stat(dmirror->mdevice, faults));
	for (addr = start; addr < end; addr = range.end) {
		range.start = addr;
		range.end = dmirror_batch_end(addr, end);
		/* A pass may end the batch early, at the end of a leaf. */
		ret = dmirror_retry_collisions(dmirror_fault_pass, &batch,
					       dmirror_stat(dmirror->mdevice,
							    fault_retries));
		if (ret)
			return ret;
	}
	return 0;
}

/* ------------------------------------------------------------------------
 * Device memory
 */

static const struct dev_pagemap_ops dmirror_devmem_ops;

static bool dmirror_is_private(const struct dmirror_device *mdevice)
{
	return mdevice->mem_type == HMM_DMIRROR_MEMORY_DEVICE_PRIVATE;
}

/**
 * dmirror_page_storage() - where the data of a mapped page lives
 * @page: system, device-coherent or device-private page
 *
 * Return: @page itself when the CPU can address it, else the backing page
 * standing in for the device-private storage.
 */
static struct page *dmirror_page_storage(struct page *page)
{
	struct dmirror_chunk *chunk;

	if (!is_device_private_page(page))
		return page;
	chunk = dmirror_page_chunk(page);
	return chunk->backing[dmirror_chunk_index(chunk, page_to_pfn(page))];
}

static void dmirror_chunk_free(struct dmirror_chunk *chunk)
{
	kvfree(chunk->backing);
	bitmap_free(chunk->backing_large);
	kfree(chunk->block_until);
	kfree(chunk->block_used);
	bitmap_free(chunk->used);
	kfree(chunk);
}

/* The device memory limit of the settings, in pages; 0 for none. */
static unsigned long dmirror_devmem_limit(struct dmirror_device *mdevice)
{
	return (unsigned long)READ_ONCE(mdevice->settings.memory_limit_mb) <<
	       (20 - PAGE_SHIFT);
}

/*
 * Would @nr more pages take the device over its limit? Context: mem_lock
 * held, or chunk_lock for a decision that mem_lock will check again.
 */
static bool dmirror_devmem_full(struct dmirror_device *mdevice,
				unsigned long nr)
{
	unsigned long limit = dmirror_devmem_limit(mdevice);

	return limit && READ_ONCE(mdevice->nr_used) + nr > limit;
}

/**
 * dmirror_chunk_add() - give a device one more chunk of memory
 * @mdevice: device
 * @order: of the allocation that needs it: no chunk is added for what the
 *	device's memory limit would refuse anyway
 *
 * Device-private chunks take a free physical address range; the coherent
 * chunk is the range reserved at boot and passed as spm_addr_dev0/1.
 *
 * Context: chunk_lock held.
 * Return: 0, -ENOSPC when the device is at its size limit, or an error of
 * request_free_mem_region() or memremap_pages().
 */
static int dmirror_chunk_add(struct dmirror_device *mdevice,
			     unsigned int order)
{
	unsigned long size = dmirror_is_private(mdevice) ?
			     DMIRROR_CHUNK_SIZE : DMIRROR_COHERENT_SIZE;
	unsigned long max = dmirror_is_private(mdevice) ?
			    device_memory_mb / (DMIRROR_CHUNK_SIZE >> 20) : 1;
	unsigned long npages = size >> PAGE_SHIFT;
	struct dmirror_chunk *chunk;
	struct resource *res = NULL;
	void *addr;
	int ret = -ENOMEM;

	lockdep_assert_held(&mdevice->chunk_lock);
	if (list_count_nodes(&mdevice->chunks) >= max ||
	    dmirror_devmem_full(mdevice, 1UL << order))
		return -ENOSPC;
	if (dmirror_inject_failure())
		return -ENOMEM;

	chunk = kzalloc_obj(*chunk);
	if (!chunk)
		return -ENOMEM;
	chunk->mdevice = mdevice;
	chunk->used = bitmap_zalloc(npages, GFP_KERNEL);
	chunk->block_used = kcalloc(npages / DMIRROR_BLOCK_PAGES,
				    sizeof(*chunk->block_used), GFP_KERNEL);
	chunk->block_until = kcalloc(npages / DMIRROR_BLOCK_PAGES,
				     sizeof(*chunk->block_until), GFP_KERNEL);
	if (!chunk->used || !chunk->block_used || !chunk->block_until)
		goto free;

	if (dmirror_is_private(mdevice)) {
		chunk->backing = kvcalloc(npages, sizeof(*chunk->backing),
					  GFP_KERNEL);
		chunk->backing_large = bitmap_zalloc(npages / HPAGE_PMD_NR,
						     GFP_KERNEL);
		if (!chunk->backing || !chunk->backing_large)
			goto free;
		res = request_free_mem_region(&iomem_resource, size,
					      "hmm_dmirror");
		if (IS_ERR(res)) {
			ret = PTR_ERR(res);
			goto free;
		}
		chunk->res = res;
		chunk->pagemap.type = MEMORY_DEVICE_PRIVATE;
		chunk->pagemap.range.start = res->start;
	} else {
		chunk->pagemap.type = MEMORY_DEVICE_COHERENT;
		chunk->pagemap.range.start =
			mdevice->id == DMIRROR_FIRST_COHERENT ? spm_addr_dev0 :
								spm_addr_dev1;
	}
	chunk->pagemap.range.end = chunk->pagemap.range.start + size - 1;
	chunk->pagemap.nr_range = 1;
	chunk->pagemap.ops = &dmirror_devmem_ops;
	chunk->pagemap.owner = mdevice->owner;

	addr = memremap_pages(&chunk->pagemap, numa_node_id());
	if (IS_ERR(addr)) {
		ret = PTR_ERR(addr);
		goto release;
	}

	spin_lock_irq(&mdevice->mem_lock);
	list_add_tail(&chunk->node, &mdevice->chunks);
	spin_unlock_irq(&mdevice->mem_lock);
	return 0;

release:
	if (res)
		release_mem_region(res->start, resource_size(res));
free:
	dmirror_chunk_free(chunk);
	return ret;
}

/**
 * dmirror_chunk_take() - reserve device pages in one chunk
 * @chunk: chunk
 * @order: 0 or the PMD order
 *
 * Context: mem_lock held.
 * Return: the first pfn, or 0 if the chunk has no room or the device is at
 * its memory limit.
 */
static unsigned long dmirror_chunk_take(struct dmirror_chunk *chunk,
					unsigned int order)
{
	struct dmirror_device *mdevice = chunk->mdevice;
	unsigned long npages = dmirror_chunk_npages(chunk);
	unsigned long nr = 1UL << order, idx;

	lockdep_assert_held(&mdevice->mem_lock);
	if (chunk->evicting || dmirror_devmem_full(mdevice, nr))
		return 0;
	idx = bitmap_find_next_zero_area(chunk->used, npages, 0, nr, nr - 1);
	if (idx >= npages)
		return 0;
	bitmap_set(chunk->used, idx, nr);
	chunk->nr_used += nr;
	WRITE_ONCE(mdevice->nr_used, mdevice->nr_used + nr);
	return dmirror_chunk_first_pfn(chunk) + idx;
}

/* Reserve pages in the first chunk with room; *chunkp says which. */
static unsigned long dmirror_devmem_take(struct dmirror_device *mdevice,
					 unsigned int order,
					 struct dmirror_chunk **chunkp)
{
	struct dmirror_chunk *chunk;
	unsigned long pfn = 0;

	spin_lock_irq(&mdevice->mem_lock);
	list_for_each_entry(chunk, &mdevice->chunks, node) {
		pfn = dmirror_chunk_take(chunk, order);
		if (pfn) {
			*chunkp = chunk;
			break;
		}
	}
	spin_unlock_irq(&mdevice->mem_lock);
	return pfn;
}

static void dmirror_devmem_give(struct dmirror_chunk *chunk,
				unsigned long pfn, unsigned int order)
{
	struct dmirror_device *mdevice = chunk->mdevice;
	unsigned long flags;

	spin_lock_irqsave(&mdevice->mem_lock, flags);
	bitmap_clear(chunk->used, dmirror_chunk_index(chunk, pfn), 1UL << order);
	chunk->nr_used -= 1UL << order;
	WRITE_ONCE(mdevice->nr_used, mdevice->nr_used - (1UL << order));
	spin_unlock_irqrestore(&mdevice->mem_lock, flags);
}

/* The bit of @chunk->backing_large for the PMD-sized run holding @pfn. */
static unsigned long dmirror_backing_run(const struct dmirror_chunk *chunk,
					 unsigned long pfn)
{
	return dmirror_chunk_index(chunk, pfn) >> HPAGE_PMD_ORDER;
}

/**
 * dmirror_backing_alloc() - emulated device storage for new device pages
 * @chunk: device-private chunk
 * @pfn: first device pfn
 * @order: 0 or the PMD order
 *
 * A large folio gets one high-order, non-compound allocation when one is
 * free: copies of it stay fast, and so does freeing it, which a folio
 * leaving the device does once for all its pages. A split of the folio
 * splits it into order-0 pages (dmirror_backing_split()). Without one, and
 * for small folios, it gets order-0 pages.
 *
 * Return: 0 or -ENOMEM.
 */
static int dmirror_backing_alloc(struct dmirror_chunk *chunk,
				 unsigned long pfn, unsigned int order)
{
	unsigned long i, nr = 1UL << order, idx = dmirror_chunk_index(chunk, pfn);
	struct page *page;

	if (dmirror_inject_failure())
		return -ENOMEM;
	page = order ? alloc_pages(GFP_HIGHUSER | __GFP_NOWARN, order) : NULL;
	if (page) {
		for (i = 0; i < nr; i++)
			chunk->backing[idx + i] = page + i;
		set_bit(dmirror_backing_run(chunk, pfn), chunk->backing_large);
		return 0;
	}
	for (i = 0; i < nr; i++) {
		chunk->backing[idx + i] = alloc_page(GFP_HIGHUSER);
		if (!chunk->backing[idx + i])
			goto undo;
	}
	return 0;

undo:
	while (i--) {
		__free_page(chunk->backing[idx + i]);
		chunk->backing[idx + i] = NULL;
	}
	return -ENOMEM;
}

/*
 * The large device folio holding @pfn is being split: give its pages
 * order-0 backing that they can free one by one. Does not sleep.
 */
static void dmirror_backing_split(struct dmirror_chunk *chunk,
				  unsigned long pfn)
{
	unsigned long run = dmirror_backing_run(chunk, pfn);

	/* test_bit() first: called once for every page split off. */
	if (test_bit(run, chunk->backing_large) &&
	    test_and_clear_bit(run, chunk->backing_large))
		split_page(chunk->backing[run << HPAGE_PMD_ORDER],
			   HPAGE_PMD_ORDER);
}

static void dmirror_backing_free(struct dmirror_chunk *chunk,
				 unsigned long pfn, unsigned int order)
{
	unsigned long i, idx = dmirror_chunk_index(chunk, pfn);

	if (!chunk->backing)
		return;
	if (order == HPAGE_PMD_ORDER &&
	    test_and_clear_bit(dmirror_backing_run(chunk, pfn),
			       chunk->backing_large)) {
		__free_pages(chunk->backing[idx], order);
	} else {
		/* Part of a folio split without dmirror_devmem_folio_split(). */
		if (WARN_ON_ONCE(order < HPAGE_PMD_ORDER &&
				 test_bit(dmirror_backing_run(chunk, pfn),
					  chunk->backing_large)))
			dmirror_backing_split(chunk, pfn);
		for (i = 0; i < (1UL << order); i++)
			__free_page(chunk->backing[idx + i]);
	}
	for (i = 0; i < (1UL << order); i++)
		chunk->backing[idx + i] = NULL;
}

/**
 * dmirror_devmem_alloc() - allocate a device folio
 * @mdevice: device
 * @order: 0 or the PMD order
 *
 * Adds a chunk when every chunk is full, up to the device's size limit.
 * The new folio is for a migration into device memory: its block counts as
 * just used and starts its timeslice.
 *
 * Return: the folio, locked and referenced as migrate_vma_pages() wants its
 * destinations, or NULL when the device is out of memory.
 */
static struct folio *dmirror_devmem_alloc(struct dmirror_device *mdevice,
					  unsigned int order)
{
	struct dmirror_chunk *chunk = NULL;
	unsigned long pfn;
	struct page *page;
	u64 t;

	pfn = dmirror_devmem_take(mdevice, order, &chunk);
	if (!pfn) {
		mutex_lock(&mdevice->chunk_lock);
		pfn = dmirror_devmem_take(mdevice, order, &chunk);
		t = ktime_get_ns();
		if (!pfn && !dmirror_chunk_add(mdevice, order))
			pfn = dmirror_devmem_take(mdevice, order, &chunk);
		dmirror_time_phase(dmirror_stat(mdevice, migrate_chunk_ns), &t);
		mutex_unlock(&mdevice->chunk_lock);
		if (!pfn)
			return NULL;
	}

	if (chunk->backing && dmirror_backing_alloc(chunk, pfn, order)) {
		dmirror_devmem_give(chunk, pfn, order);
		return NULL;
	}
	dmirror_block_touch(chunk, pfn);
	WRITE_ONCE(chunk->block_until[dmirror_chunk_block(chunk, pfn)],
		   jiffies + msecs_to_jiffies(READ_ONCE(mdevice->settings.timeslice_ms)));
	page = pfn_to_page(pfn);
	zone_device_page_init(page, &chunk->pagemap, order);
	if (order)
		folio_set_large_rmappable(page_folio(page));
	return page_folio(page);
}

/**
 * dmirror_devmem_folio_free() - &dev_pagemap_ops.folio_free
 * @folio: device folio whose last reference went
 *
 * May run in any context that drops a page reference.
 */
static void dmirror_devmem_folio_free(struct folio *folio)
{
	struct dmirror_chunk *chunk = dmirror_page_chunk(&folio->page);
	unsigned int order = folio_order(folio);

	dmirror_backing_free(chunk, folio_pfn(folio), order);
	dmirror_devmem_give(chunk, folio_pfn(folio), order);
}

/**
 * dmirror_devmem_folio_split() - &dev_pagemap_ops.folio_split
 * @head: folio being split
 * @tail: a new folio split off it, or NULL when the split is done
 *
 * The first call splits the backing of the whole folio into order-0 pages;
 * the new folios then need only their pagemap and mapping set. Called with
 * the folio frozen, possibly under spinlocks.
 */
static void dmirror_devmem_folio_split(struct folio *head, struct folio *tail)
{
	struct dmirror_chunk *chunk = dmirror_page_chunk(&head->page);

	if (!tail)
		return;
	if (chunk->backing)
		dmirror_backing_split(chunk, folio_pfn(head));
	tail->pgmap = head->pgmap;
	tail->page.mapping = head->page.mapping;
}

/* ------------------------------------------------------------------------
 * Watches: notifiers of one request
 */

/**
 * struct dmirror_watch - a temporary notifier that only detects collisions
 * @mni: the notifier
 * @dmirror: mirror whose pt_lock serialises the sequence
 *
 * Used where the device needs a collision-retry window over a range without
 * mapping it through the mirror's notifiers: a snapshot, which maps nothing,
 * the pull of a migration (dmirror_migrate_pull()), which only faults, and
 * exclusive access to a range, which must not retry because of
 * invalidations elsewhere in the leaf.
 */
struct dmirror_watch {
	struct mmu_interval_notifier mni;
	struct dmirror *dmirror;
};

static bool dmirror_watch_invalidate(struct mmu_interval_notifier *mni,
				     const struct mmu_notifier_range *range,
				     unsigned long cur_seq)
{
	struct dmirror_watch *watch =
		container_of(mni, struct dmirror_watch, mni);
	struct dmirror *dmirror = watch->dmirror;

	/* See dmirror_event_is_own(): this one would retry forever too. */
	if (dmirror_event_is_own(dmirror, range))
		return true;
	if (mmu_notifier_range_blockable(range))
		mutex_lock(&dmirror->pt_lock);
	else if (!mutex_trylock(&dmirror->pt_lock))
		return false;
	mmu_interval_set_seq(mni, cur_seq);
	mutex_unlock(&dmirror->pt_lock);
	return true;
}

static const struct mmu_interval_notifier_ops dmirror_watch_ops = {
	.invalidate = dmirror_watch_invalidate,
};

/*
 * A watch lives for one request. Inserting may take the mmap lock and
 * removing waits for callbacks that take pt_lock: neither lock is held.
 */
static int dmirror_watch_insert(struct dmirror_watch *watch,
				struct dmirror *dmirror, unsigned long start,
				unsigned long end)
{
	lockdep_assert_not_held(&dmirror->mm->mmap_lock);
	watch->dmirror = dmirror;
	if (dmirror_inject_failure())
		return -ENOMEM;
	return mmu_interval_notifier_insert(&watch->mni, dmirror->mm, start,
					    end - start, &dmirror_watch_ops);
}

static void dmirror_watch_remove(struct dmirror_watch *watch)
{
	lockdep_assert_not_held(&watch->dmirror->pt_lock);
	mmu_interval_notifier_remove(&watch->mni);
}

/* ------------------------------------------------------------------------
 * SNAPSHOT
 */

/* Where a device page is, as &enum hmm_dmirror_prot says it. */
static u8 dmirror_snapshot_where(struct dmirror_device *mdevice,
				 struct page *page, u8 local, u8 remote)
{
	if (dmirror_page_local(mdevice, page))
		return local;
	if (dmirror_page_of_peer(mdevice, page))
		return remote | HMM_DMIRROR_PROT_INTERCONNECT;
	return remote;
}

/**
 * dmirror_snapshot_entry() - encode one hmm_range_fault() output
 * @dmirror: mirror asking
 * @hpfn: the entry
 *
 * Context: pt_lock held, so that the page cannot go away under us.
 * Return: an &enum hmm_dmirror_prot value.
 */
static u8 dmirror_snapshot_entry(struct dmirror *dmirror, unsigned long hpfn)
{
	unsigned int order;
	struct page *page;
	u8 state;

	lockdep_assert_held(&dmirror->pt_lock);
	if (hpfn & HMM_PFN_ERROR)
		return HMM_DMIRROR_PROT_ERROR;
	if (!(hpfn & HMM_PFN_VALID))
		return HMM_DMIRROR_PROT_NONE;

	page = hmm_pfn_to_page(hpfn);
	if (is_device_private_page(page))
		state = dmirror_snapshot_where(dmirror->mdevice, page,
					       HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL,
					       HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE);
	else if (is_device_coherent_page(page))
		state = dmirror_snapshot_where(dmirror->mdevice, page,
					       HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL,
					       HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE);
	else if (is_zero_page(page))
		state = HMM_DMIRROR_PROT_ZERO;
	else
		state = HMM_DMIRROR_PROT_NONE;

	state |= (hpfn & HMM_PFN_WRITE) ? HMM_DMIRROR_PROT_WRITE :
					  HMM_DMIRROR_PROT_READ;
	order = hmm_pfn_to_map_order(hpfn) + PAGE_SHIFT;
	if (order == PMD_SHIFT)
		state |= HMM_DMIRROR_PROT_PMD;
	else if (order == PUD_SHIFT)
		state |= HMM_DMIRROR_PROT_PUD;
	return state;
}

/**
 * struct dmirror_snapshot_batch - one batch of a snapshot
 * @dmirror: mirror asking
 * @range: the batch, with default_flags 0 so that nothing is faulted, and
 *	the snapshot's own notifier
 * @states: one output byte per page
 */
struct dmirror_snapshot_batch {
	struct dmirror *dmirror;
	struct hmm_range *range;
	u8 *states;
};

/**
 * dmirror_snapshot_pass() - one attempt at a snapshot of a batch
 * @arg: the &struct dmirror_snapshot_batch
 *
 * Return: 0, -EAGAIN after a collision, or the error of hmm_range_fault().
 */
static int dmirror_snapshot_pass(void *arg)
{
	struct dmirror_snapshot_batch *batch = arg;
	struct dmirror *dmirror = batch->dmirror;
	struct hmm_range *range = batch->range;
	unsigned long i, npages = (range->end - range->start) >> PAGE_SHIFT;
	int ret;

	ret = dmirror_range_fault_locked(range, NULL);
	if (ret)
		return ret == -EBUSY ? -EAGAIN : ret;
	mutex_lock(&dmirror->pt_lock);
	if (mmu_interval_read_retry(range->notifier, range->notifier_seq)) {
		mutex_unlock(&dmirror->pt_lock);
		return -EAGAIN;
	}
	for (i = 0; i < npages; i++)
		batch->states[i] = dmirror_snapshot_entry(dmirror,
							  range->hmm_pfns[i]);
	mutex_unlock(&dmirror->pt_lock);
	return 0;
}

/**
 * dmirror_snapshot_walk() - snapshot a range batch by batch
 * @dmirror: mirror
 * @range: range
 * @consume: called with the states of each batch, in order; a nonzero
 *	return ends the walk with that value
 * @arg: passed to @consume
 *
 * A snapshot maps nothing in the device, so it tracks collisions with a
 * notifier of its own rather than the mirror's. @consume runs without
 * pt_lock and may touch user memory.
 *
 * Return: 0, the first nonzero @consume return, an error of
 * dmirror_snapshot_pass(), or -EBUSY if invalidations kept colliding.
 */
static int dmirror_snapshot_walk(struct dmirror *dmirror,
				 const struct dmirror_range *range,
				 int (*consume)(void *arg, const u8 *states,
						unsigned long n),
				 void *arg)
{
	unsigned long pfns[DMIRROR_BATCH_PAGES];
	u8 states[DMIRROR_BATCH_PAGES];
	struct hmm_range hrange = {
		.hmm_pfns = pfns,
		.dev_private_owner = dmirror->mdevice->owner,
	};
	struct dmirror_snapshot_batch batch = {
		.dmirror = dmirror,
		.range = &hrange,
		.states = states,
	};
	struct dmirror_watch watch;
	unsigned long addr;
	int ret;

	ret = dmirror_watch_insert(&watch, dmirror, range->start, range->end);
	if (ret)
		return ret;
	hrange.notifier = &watch.mni;
	for (addr = range->start; !ret && addr < range->end;
	     addr = hrange.end) {
		hrange.start = addr;
		hrange.end = dmirror_batch_end(addr, range->end);
		ret = dmirror_retry_collisions(dmirror_snapshot_pass, &batch,
					       NULL);
		if (!ret)
			ret = consume(arg, states,
				      (hrange.end - addr) >> PAGE_SHIFT);
	}
	dmirror_watch_remove(&watch);
	return ret;
}

/* Copies the states of a batch to the user, for dmirror_snapshot(). */
static int dmirror_snapshot_copy(void *arg, const u8 *states, unsigned long n)
{
	struct hmm_dmirror_cmd *cmd = arg;

	if (copy_to_user(u64_to_user_ptr(cmd->ptr + cmd->cpages), states, n))
		return -EFAULT;
	cmd->cpages += n;
	return 0;
}

/**
 * dmirror_snapshot() - HMM_DMIRROR_SNAPSHOT
 * @dmirror: mirror
 * @cmd: the request; @cmd->ptr receives one state byte per page
 * @range: the range of @cmd
 *
 * Return: 0, -EFAULT if @cmd->ptr cannot be written, -EBUSY, -EINTR, -ENOMEM.
 */
static int dmirror_snapshot(struct dmirror *dmirror,
			    struct hmm_dmirror_cmd *cmd,
			    const struct dmirror_range *range)
{
	return dmirror_snapshot_walk(dmirror, range, dmirror_snapshot_copy,
				     cmd);
}

/* ------------------------------------------------------------------------
 * Migration
 */

/*
 * Whether the device takes migrations of large folios as large folios.
 * Device-coherent THPs run into Linux 7.3 core bugs that the test suite
 * names and steps around on a kernel without their fixes
 * (HMM_BUG_COHERENT_THP_* in hmm-tests.c): migrate_vma_setup() does not
 * collect a PMD-mapped coherent folio for migration back, a partly unmapped
 * one is freed while still on the deferred split queue, and a split one
 * loses the pgmap of its pages. They are kept large so that the suite keeps
 * exercising those paths.
 */
static bool dmirror_want_large(unsigned long src)
{
	return thp_migration_supported() && (src & MIGRATE_PFN_COMPOUND);
}

static bool dmirror_fail_alloc(struct dmirror *dmirror)
{
	return test_and_clear_bit(0, &dmirror->flags);
}

/* One copy, also from a peer's device-private page: no system memory stop. */
static void dmirror_copy_in(struct page *dpage, struct page *spage)
{
	struct page *to = dmirror_page_storage(dpage);

	if (spage)
		copy_highpage(to, dmirror_page_storage(spage));
	else
		clear_highpage(to);
}

/*
 * A device-coherent THP of an owner the migration did not select stays where
 * it is: Linux 7.3's migrate_vma_setup() collects a PMD-mapped one whenever
 * system memory is selected, as if it were system memory (the bug the suite
 * names HMM_BUG_COHERENT_THP_TO_SYS, fixed by "mm/migrate_device: select a
 * device-coherent PMD folio by its owner"), and its own driver does not
 * expect it to move. One of the device's own owner (its group's) is
 * collected as device-coherent memory by a fixed kernel, and moves.
 */
static bool dmirror_foreign_coherent_thp(struct dmirror_device *mdevice,
					 struct page *spage, unsigned long nr)
{
	return spage && nr > 1 && is_device_coherent_page(spage) &&
	       !dmirror_page_owned(mdevice, spage);
}

/* Give back the first @n destinations of a migration, before it runs. */
static void dmirror_dst_undo(unsigned long *dst, unsigned long n)
{
	unsigned long k;

	for (k = 0; k < n; k++) {
		struct folio *folio = page_folio(migrate_pfn_to_page(dst[k]));

		folio_unlock(folio);
		folio_put(folio);
		dst[k] = 0;
	}
}

/**
 * dmirror_migrate_alloc_to_sys() - fill the destinations of a migration back
 * @args: migrate_vma_setup() or migrate_device_range() output
 * @vma: VMA for NUMA placement, NULL when evicting without one
 * @only: move only the pages of this device, NULL for all sources
 * @fail_large: allocate 4 KiB pages even for large sources (one-shot flag)
 *
 * Memory comes from the node the VMA's memory policy chooses. A large
 * source whose large allocation fails falls back to 4 KiB pages, except on
 * eviction (no VMA), which migrate_device_pages() only takes whole. On an
 * interconnect migrate_vma_setup() also collects the peers' pages, which
 * @only leaves where they are.
 *
 * Return: 0, or -ENOMEM if a page could not be allocated at all; that page
 * stays in device memory.
 */
static int dmirror_migrate_alloc_to_sys(struct migrate_vma *args,
					struct vm_area_struct *vma,
					struct dmirror_device *only,
					bool fail_large)
{
	unsigned long i = 0, j, nr;
	int ret = 0;

	while (i < args->npages) {
		unsigned long src = args->src[i];
		struct page *spage = migrate_pfn_to_page(src);
		unsigned long addr = args->start + i * PAGE_SIZE;
		unsigned long write = src & MIGRATE_PFN_WRITE;
		struct folio *folio = NULL;
		unsigned int order;

		if (!spage || !(src & MIGRATE_PFN_MIGRATE)) {
			i++;
			continue;
		}
		order = folio_order(page_folio(spage));
		nr = 1UL << order;
		if (only && dmirror_page_chunk(spage)->mdevice != only) {
			i += nr;
			continue;
		}
		if (order && !fail_large && !dmirror_inject_failure())
			folio = vma ? vma_alloc_folio(GFP_HIGHUSER_MOVABLE, order,
						      vma, addr) :
				      folio_alloc(GFP_HIGHUSER_MOVABLE, order);
		if (folio) {
			folio_lock(folio);
			args->dst[i] = migrate_pfn(folio_pfn(folio)) | write |
				       MIGRATE_PFN_COMPOUND;
			for (j = 0; j < nr; j++)
				copy_highpage(folio_page(folio, j),
					      dmirror_page_storage(spage + j));
			i += nr;
			continue;
		}
		for (j = 0; j < nr && (vma || !order); j++) {
			struct page *page = dmirror_inject_failure() ? NULL :
				vma ? alloc_page_vma(GFP_HIGHUSER_MOVABLE, vma,
						     addr + j * PAGE_SIZE) :
				alloc_page(GFP_HIGHUSER_MOVABLE);

			if (!page)
				break;
			lock_page(page);
			args->dst[i + j] = migrate_pfn(page_to_pfn(page)) | write;
			copy_highpage(page, dmirror_page_storage(spage + j));
		}
		if (j < nr)
			ret = -ENOMEM;
		i += nr;
	}
	return ret;
}

/**
 * dmirror_migrated() - count what migrate_vma_pages() moved
 * @src: source array
 * @dst: destination array
 * @npages: their size
 * @from_devmem: output, how many of the pages came from device memory; NULL
 *	if not wanted
 *
 * A large destination stands for all of its pages, whose other entries are
 * empty.
 *
 * Return: the number of pages moved.
 */
static unsigned long dmirror_migrated(const unsigned long *src,
				      const unsigned long *dst,
				      unsigned long npages,
				      unsigned long *from_devmem)
{
	unsigned long i, n = 0, nr;

	for (i = 0; i < npages; i++) {
		struct page *spage = migrate_pfn_to_page(src[i]);

		if (!(src[i] & MIGRATE_PFN_MIGRATE) || !dst[i])
			continue;
		nr = (dst[i] & MIGRATE_PFN_COMPOUND) ?
		     folio_nr_pages(page_folio(migrate_pfn_to_page(dst[i]))) : 1;
		n += nr;
		if (from_devmem && spage && is_zone_device_page(spage))
			*from_devmem += nr;
	}
	return n;
}

/* Count pages that left @mdevice's memory for system memory. */
static void dmirror_count_to_sys(struct dmirror_device *mdevice,
				 const unsigned long *src,
				 const unsigned long *dst, unsigned long npages)
{
	atomic64_add(dmirror_migrated(src, dst, npages, NULL),
		     dmirror_stat(mdevice, migrated_to_sys));
}

/* What a migration of the device takes: system memory, or the device's. */
static unsigned long dmirror_migrate_select(struct dmirror_device *mdevice,
					    bool to_dev)
{
	unsigned long flags = MIGRATE_VMA_SELECT_COMPOUND;

	if (to_dev) {
		flags |= MIGRATE_VMA_SELECT_SYSTEM;
		/* The peers' memory, taken across the interconnect. */
		if (mdevice->group)
			flags |= MIGRATE_VMA_SELECT_DEVICE_PRIVATE |
				 MIGRATE_VMA_SELECT_DEVICE_COHERENT;
	} else if (dmirror_is_private(mdevice)) {
		flags |= MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
	} else {
		flags |= MIGRATE_VMA_SELECT_DEVICE_COHERENT;
	}
	return flags;
}

/**
 * struct dmirror_migration - a migration of a range, batch by batch
 * @dmirror: mirror asking
 * @args: the batch; its arrays are allocated with the migration
 * @req: to a device in an interconnect group: the pages of the batch to
 *	fault into system memory before running it again
 *	(dmirror_uncollected()); else NULL
 * @to_dev: direction
 * @only: to system memory: move only the pages of this device (as
 *	HMM_DMIRROR_MIGRATE_TO_SYS does), NULL for its peers' too
 * @evict_before: to the device: device memory last used before this
 *	&dmirror_device.lru_clock value may be evicted to make room; 0 for none
 * @out_of_memory: the device ran out of memory for a page
 * @moved: pages migrated
 */
struct dmirror_migration {
	struct dmirror *dmirror;
	struct migrate_vma args;
	unsigned long *req;
	bool to_dev;
	struct dmirror_device *only;
	u64 evict_before;
	bool out_of_memory;
	unsigned long moved;
};

/**
 * dmirror_migration_init() - prepare a migration
 * @mig: the migration
 * @dmirror: mirror asking
 * @to_dev: direction
 * @evict: to the device, evict older device memory when none is free
 *
 * Memory the migration brings in itself is never evicted to make room for
 * the rest of it: only memory last used before it started is.
 *
 * Return: 0 or -ENOMEM.
 */
static int dmirror_migration_init(struct dmirror_migration *mig,
				  struct dmirror *dmirror, bool to_dev,
				  bool evict)
{
	unsigned long *pfns;

	memset(mig, 0, sizeof(*mig));
	pfns = dmirror_inject_failure() ? NULL :
	       kvcalloc(3 * HPAGE_PMD_NR, sizeof(*pfns), GFP_KERNEL);
	if (!pfns)
		return -ENOMEM;
	mig->dmirror = dmirror;
	mig->to_dev = to_dev;
	mig->only = to_dev ? NULL : dmirror->mdevice;
	mig->args.flags = dmirror_migrate_select(dmirror->mdevice, to_dev);
	mig->args.src = pfns;
	mig->args.dst = pfns + HPAGE_PMD_NR;
	/* A device in no group leaves them, as the kernel's own driver does. */
	if (to_dev && dmirror->mdevice->group)
		mig->req = pfns + 2 * HPAGE_PMD_NR;
	if (to_dev && evict)
		mig->evict_before =
			atomic64_read(&dmirror->mdevice->lru_clock) + 1;
	return 0;
}

static void dmirror_migration_fini(struct dmirror_migration *mig)
{
	kvfree(mig->args.src);
}

/**
 * dmirror_evict_pfns() - move device pages back to system memory
 * @chunk: chunk holding them
 * @pfn: first device pfn
 * @npages: how many
 *
 * Works on physical pages, whoever maps them, with migrate_device_range():
 * free pages and pages another migration holds locked are skipped.
 *
 * Return: the number of pages moved, or -ENOMEM.
 */
static long dmirror_evict_pfns(struct dmirror_chunk *chunk, unsigned long pfn,
			       unsigned long npages)
{
	struct migrate_vma args = { .npages = npages };
	long ret = -ENOMEM;

	args.src = kvcalloc(npages, sizeof(*args.src), GFP_KERNEL);
	args.dst = kvcalloc(npages, sizeof(*args.dst), GFP_KERNEL);
	if (!args.src || !args.dst)
		goto out;
	ret = migrate_device_range(args.src, pfn, npages);
	if (ret)
		goto out;
	dmirror_migrate_alloc_to_sys(&args, NULL, NULL, false);
	migrate_device_pages(args.src, args.dst, npages);
	ret = dmirror_migrated(args.src, args.dst, npages, NULL);
	atomic64_add(ret, dmirror_stat(chunk->mdevice, migrated_to_sys));
	migrate_device_finalize(args.src, args.dst, npages);
out:
	kvfree(args.src);
	kvfree(args.dst);
	return ret;
}

/* Does block @i of @chunk hold an allocated page? Context: mem_lock held. */
static bool dmirror_block_in_use(const struct dmirror_chunk *chunk,
				 unsigned long i)
{
	unsigned long first = i * DMIRROR_BLOCK_PAGES;

	lockdep_assert_held(&chunk->mdevice->mem_lock);
	return find_next_bit(chunk->used, first + DMIRROR_BLOCK_PAGES, first) <
	       first + DMIRROR_BLOCK_PAGES;
}

/**
 * dmirror_make_room() - evict the least recently used block of device memory
 * @mdevice: device
 * @before: consider only blocks last used before this clock value
 * @tried: blocks last used up to this clock value were tried already;
 *	set to the one tried now
 *
 * Device memory is evicted a block at a time, whoever maps it, least
 * recently used first (migrated in or mapped by a device fault). A block
 * whose pages cannot all move (pinned, locked by a migration, no system
 * memory) keeps them; the caller tries its allocation again and, if it
 * still fails, the next block.
 *
 * Context: may sleep; chunk_lock not held. Called from a migration, whose
 * own pages, locked, the eviction skips.
 * Return: false when no block is left to try.
 */
static bool dmirror_make_room(struct dmirror_device *mdevice, u64 before,
			      u64 *tried)
{
	struct dmirror_chunk *chunk, *victim = NULL;
	unsigned long i, block = 0;
	u64 best = before;
	long n;

	mutex_lock(&mdevice->chunk_lock);
	spin_lock_irq(&mdevice->mem_lock);
	list_for_each_entry(chunk, &mdevice->chunks, node) {
		unsigned long nblocks = dmirror_chunk_npages(chunk) /
					DMIRROR_BLOCK_PAGES;

		for (i = 0; i < nblocks && !chunk->evicting; i++) {
			u64 used = READ_ONCE(chunk->block_used[i]);

			if (used <= *tried || used >= best ||
			    !dmirror_block_in_use(chunk, i))
				continue;
			best = used;
			victim = chunk;
			block = i;
		}
	}
	spin_unlock_irq(&mdevice->mem_lock);
	if (victim) {
		*tried = best;
		n = dmirror_evict_pfns(victim, dmirror_chunk_first_pfn(victim) +
					       block * DMIRROR_BLOCK_PAGES,
				       DMIRROR_BLOCK_PAGES);
		if (n > 0) {
			atomic64_inc(dmirror_stat(mdevice, evictions));
			atomic64_add(n, dmirror_stat(mdevice, pages_evicted));
		}
	}
	mutex_unlock(&mdevice->chunk_lock);
	return victim;
}

/* dmirror_devmem_alloc(), evicting older device memory if @mig may. */
static struct folio *dmirror_migration_alloc(struct dmirror_migration *mig,
					     unsigned int order)
{
	struct dmirror_device *mdevice = mig->dmirror->mdevice;
	unsigned long limit = dmirror_devmem_limit(mdevice);
	bool evict = mig->evict_before && (!limit || (1UL << order) <= limit);
	struct folio *folio;
	u64 tried = 0;

	/* No eviction makes room for what the limit itself refuses. */
	while (!(folio = dmirror_devmem_alloc(mdevice, order)) && evict &&
	       dmirror_make_room(mdevice, mig->evict_before, &tried))
		;
	return folio;
}

/**
 * dmirror_migrate_alloc_to_dev() - fill the destinations of a migration
 * @mig: the migration, after migrate_vma_setup()
 *
 * A large source gets a large device folio when the device has one, else
 * 4 KiB device pages (migrate_vma_pages() then splits the source). A source
 * that finds no device memory stays where it is. An empty source (a hole or
 * the zero page) becomes zeroed device memory. On an interconnect the
 * sources include the device's own pages, which stay, and its peers' pages,
 * which are copied across directly. (A device in no group gets its own
 * pages only as migrate_vma_setup() collects a device-coherent THP as
 * system memory, and moves them as the kernel's own driver does.) With no free device memory, the
 * migration may evict older device memory (dmirror_migration_alloc()).
 *
 * Return: true if the device ran out of memory for a page.
 */
static bool dmirror_migrate_alloc_to_dev(struct dmirror_migration *mig)
{
	struct dmirror_device *mdevice = mig->dmirror->mdevice;
	struct migrate_vma *args = &mig->args;
	unsigned long i = 0, j, nr;
	bool out_of_memory = false;

	while (i < args->npages) {
		unsigned long src = args->src[i];
		struct page *spage = migrate_pfn_to_page(src);
		unsigned long write = src & MIGRATE_PFN_WRITE;
		struct folio *dfolio = NULL;

		nr = 1;
		if (dmirror_want_large(src))
			nr = spage ? folio_nr_pages(page_folio(spage)) :
				     HPAGE_PMD_NR;
		if (!(src & MIGRATE_PFN_MIGRATE) ||
		    (mdevice->group && spage &&
		     dmirror_page_local(mdevice, spage)) ||
		    dmirror_foreign_coherent_thp(mdevice, spage, nr)) {
			i += nr;
			continue;
		}
		if (nr > 1 && !dmirror_fail_alloc(mig->dmirror))
			dfolio = dmirror_migration_alloc(mig, ilog2(nr));
		if (dfolio) {
			args->dst[i] = migrate_pfn(folio_pfn(dfolio)) | write |
				       MIGRATE_PFN_COMPOUND;
			for (j = 0; j < nr; j++)
				dmirror_copy_in(folio_page(dfolio, j),
						spage ? spage + j : NULL);
			i += nr;
			continue;
		}
		/* One page at a time: a large source is split. */
		for (j = 0; j < nr && i + j < args->npages; j++) {
			dfolio = dmirror_migration_alloc(mig, 0);
			if (!dfolio)
				break;
			args->dst[i + j] = migrate_pfn(folio_pfn(dfolio)) |
					   write;
			dmirror_copy_in(&dfolio->page, spage ? spage + j : NULL);
		}
		/*
		 * An empty large range is filled whole or not at all:
		 * migrate_vma_pages() inserts every page of it and does not
		 * expect an empty destination among them.
		 */
		if (j < nr && !spage && nr > 1)
			dmirror_dst_undo(&args->dst[i], j);
		out_of_memory |= j < nr;
		i += nr;
	}
	return out_of_memory;
}

/**
 * dmirror_uncollected() - the pages of a batch migrate_vma_setup() left out
 * @args: the batch, after migrate_vma_setup()
 * @req: output, %HMM_PFN_REQ_FAULT for each such page, else 0
 *
 * An empty source is a page migrate_vma_setup() could not take where it
 * is: in the memory of a device of another owner, swapped out, or under
 * migration. The entries after the first of a large source are empty too,
 * and are not counted.
 *
 * Context: before migrate_vma_pages(), while the sources are isolated.
 */
static void dmirror_uncollected(const struct migrate_vma *args,
				unsigned long *req)
{
	unsigned long i = 0, nr;

	while (i < args->npages) {
		unsigned long src = args->src[i];
		struct page *spage = migrate_pfn_to_page(src);

		nr = 1;
		if (src & MIGRATE_PFN_COMPOUND)
			nr = spage ? folio_nr_pages(page_folio(spage)) :
				     HPAGE_PMD_NR;
		req[i] = src ? 0 : HMM_PFN_REQ_FAULT;
		i += nr;
	}
}

/**
 * dmirror_migrate_batch() - migrate one batch of a VMA
 * @mig: the migration; its vma, start and end set
 * @req: NULL, or output: see dmirror_uncollected()
 *
 * Context: mmap lock held for read.
 * Return: pages migrated, or a negative errno.
 */
static long dmirror_migrate_batch(struct dmirror_migration *mig,
				  unsigned long *req)
{
	struct dmirror *dmirror = mig->dmirror;
	struct dmirror_device *mdevice = dmirror->mdevice;
	struct migrate_vma *args = &mig->args;
	unsigned long moved, from_devmem = 0;
	u64 t = ktime_get_ns();
	long ret;

	mmap_assert_locked(dmirror->mm);
	args->pgmap_owner = mdevice->owner;
	ret = migrate_vma_setup(args);
	dmirror_time_phase(dmirror_stat(mdevice, migrate_setup_ns), &t);
	if (ret)
		return ret;
	if (req)
		dmirror_uncollected(args, req);
	memset(args->dst, 0, args->npages * sizeof(*args->dst));
	if (mig->to_dev)
		mig->out_of_memory |= dmirror_migrate_alloc_to_dev(mig);
	else if (dmirror_migrate_alloc_to_sys(args, args->vma, mig->only,
					      dmirror_fail_alloc(dmirror)))
		ret = -ENOMEM;
	dmirror_time_phase(dmirror_stat(mdevice, migrate_copy_ns), &t);
	migrate_vma_pages(args);
	dmirror_time_phase(dmirror_stat(mdevice, migrate_pages_ns), &t);
	moved = dmirror_migrated(args->src, args->dst, args->npages,
				 &from_devmem);
	migrate_vma_finalize(args);
	dmirror_time_phase(dmirror_stat(mdevice, migrate_finalize_ns), &t);

	if (mig->to_dev) {
		atomic64_add(moved, dmirror_stat(mdevice, migrated_to_dev));
		atomic64_add(from_devmem,
			     dmirror_stat(mdevice, migrated_from_peer));
	} else {
		atomic64_add(moved, dmirror_stat(mdevice, migrated_to_sys));
	}
	return ret ?: moved;
}

/**
 * dmirror_migrate_vma() - migrate the batch of a range that starts at @addr
 * @mig: the migration; the batch's vma, start and end are set here
 * @addr: start of the batch
 * @end: end of the range
 * @req: NULL, or output: see dmirror_uncollected(); all 0 unless the VMA
 *	is anonymous, the only memory a fault may bring in to migrate
 *
 * A batch ends at the end of the range, of the VMA or of a PMD, so that
 * huge pages move whole.
 *
 * Return: pages migrated; -EINVAL for no VMA or one without read access,
 * -ENOENT for shared memory moving to the device, or the error of the
 * migration.
 */
static long dmirror_migrate_vma(struct dmirror_migration *mig,
				unsigned long addr, unsigned long end,
				unsigned long *req)
{
	struct mm_struct *mm = mig->dmirror->mm;
	struct migrate_vma *args = &mig->args;
	long ret = -EINVAL;

	if (req)
		memset(req, 0, HPAGE_PMD_NR * sizeof(*req));
	mmap_read_lock(mm);
	args->vma = vma_lookup(mm, addr);
	if (!args->vma || !(args->vma->vm_flags & VM_READ))
		goto unlock;
	ret = -ENOENT;
	if (mig->to_dev && (args->vma->vm_flags & VM_SHARED))
		goto unlock;
	args->start = addr;
	args->end = min3(end, args->vma->vm_end,
			 ALIGN(addr + 1, HPAGE_PMD_SIZE));
	ret = dmirror_migrate_batch(mig, vma_is_anonymous(args->vma) ?
					 req : NULL);
unlock:
	mmap_read_unlock(mm);
	return ret;
}

/**
 * struct dmirror_pull - pages a migration to the device brings in first
 * @dmirror: mirror
 * @range: the batch; its pfn array receives the output
 * @req: %HMM_PFN_REQ_FAULT for each page to bring in; a page found present
 *	where it is gets 0
 * @pulled: output, the pages now in system memory
 */
struct dmirror_pull {
	struct dmirror *dmirror;
	struct hmm_range *range;
	unsigned long *req;
	unsigned long pulled;
};

/**
 * dmirror_pull_look() - which pages a pull must fault in
 * @arg: the &struct dmirror_pull
 *
 * Of the pages migrate_vma_setup() left out, those present where they are
 * (pinned, locked, a large folio it could not split) need no fault: they
 * are left to be mapped there. Looks without faulting, once, before the
 * pull: a retry of the pull itself would find its own pages present.
 *
 * Return: 0, -EAGAIN after a collision, or the error of hmm_range_fault().
 */
static int dmirror_pull_look(void *arg)
{
	struct dmirror_pull *pull = arg;
	struct hmm_range *range = pull->range;
	unsigned long i, npages = (range->end - range->start) >> PAGE_SHIFT;
	int ret;

	range->pfn_flags_mask = 0;
	ret = dmirror_range_fault_locked(range, NULL);
	range->pfn_flags_mask = HMM_PFN_REQ_FAULT;
	if (ret)
		return ret == -EBUSY ? -EAGAIN : ret;
	for (i = 0; i < npages; i++)
		if (range->hmm_pfns[i] & HMM_PFN_VALID)
			pull->req[i] = 0;
	return 0;
}

/**
 * dmirror_pull_pass() - one attempt at bringing pages into system memory
 * @arg: the &struct dmirror_pull
 *
 * The pages are looked at under pt_lock after mmu_interval_read_retry(),
 * as a fault pass does before it maps them: only then are they known to
 * be still there.
 *
 * Return: 0, -EAGAIN after a collision, or the error of hmm_range_fault().
 */
static int dmirror_pull_pass(void *arg)
{
	struct dmirror_pull *pull = arg;
	struct hmm_range *range = pull->range;
	unsigned long i, npages = (range->end - range->start) >> PAGE_SHIFT;
	int ret;

	memcpy(range->hmm_pfns, pull->req, npages * sizeof(*pull->req));
	ret = dmirror_range_fault_locked(range, NULL);
	if (ret)
		return ret == -EBUSY ? -EAGAIN : ret;

	mutex_lock(&pull->dmirror->pt_lock);
	if (mmu_interval_read_retry(range->notifier, range->notifier_seq)) {
		mutex_unlock(&pull->dmirror->pt_lock);
		return -EAGAIN;
	}
	pull->pulled = 0;
	for (i = 0; i < npages; i++) {
		unsigned long hpfn = range->hmm_pfns[i];

		if (pull->req[i] && (hpfn & HMM_PFN_VALID) &&
		    !is_zone_device_page(hmm_pfn_to_page(hpfn)))
			pull->pulled++;
	}
	mutex_unlock(&pull->dmirror->pt_lock);
	return 0;
}

/**
 * dmirror_migrate_pull() - fault in what a migration batch could not take
 * @mig: the migration, its batch done; the destination array is free
 *
 * A page in the memory of a device outside the device's interconnect group
 * cannot move across directly: the fault, as the CPU's would, has its
 * owner migrate it to system memory, from where the batch, run again,
 * takes it (two copies, against one from a peer). A swapped-out page is
 * read in the same way. Pages in the memory of the device's own pagemap
 * owner are left where they are (hmm_range_fault() returns them as they
 * are).
 *
 * Context: mmap lock not held.
 * Return: the number of pages brought into system memory; 0 if none, or
 * when the fault failed: the pages then stay where they are.
 */
static unsigned long dmirror_migrate_pull(struct dmirror_migration *mig)
{
	struct dmirror *dmirror = mig->dmirror;
	struct migrate_vma *args = &mig->args;
	unsigned long *req = mig->req;
	unsigned long i, npages = (args->end - args->start) >> PAGE_SHIFT;
	struct hmm_range range = {
		.start = args->start,
		.end = args->end,
		.hmm_pfns = args->dst,
		.pfn_flags_mask = HMM_PFN_REQ_FAULT,
		.dev_private_owner = dmirror->mdevice->owner,
	};
	struct dmirror_pull pull = {
		.dmirror = dmirror,
		.range = &range,
		.req = req,
	};
	struct dmirror_watch watch;
	int ret;

	for (i = 0; i < npages && !req[i]; i++)
		;
	if (i == npages)
		return 0;
	if (dmirror_watch_insert(&watch, dmirror, range.start, range.end))
		return 0;
	range.notifier = &watch.mni;
	ret = dmirror_retry_collisions(dmirror_pull_look, &pull, NULL);
	for (i = 0; !ret && i < npages && !req[i]; i++)
		;
	if (!ret && i < npages)
		ret = dmirror_retry_collisions(dmirror_pull_pass, &pull, NULL);
	dmirror_watch_remove(&watch);
	if (ret)
		return 0;
	atomic64_add(pull.pulled, dmirror_stat(dmirror->mdevice,
					       migrate_pulled));
	return pull.pulled;
}

/**
 * dmirror_migrate_range() - migrate a range
 * @mig: the migration
 * @range: the range
 *
 * Migrates in PMD-aligned batches, so that huge pages move whole. To the
 * device, pages in the memory of an interconnect peer move across directly;
 * for a device in a group, pages that cannot be taken where they are (on a
 * device outside the group, swapped out) are faulted into system memory
 * first and the batch runs again (dmirror_migrate_pull()); a device in no
 * group leaves them, as the kernel's own driver does. To system memory, only the device's own
 * pages move, not its peers'. @mig counts what moved.
 *
 * Return: 0, or the first error of dmirror_migrate_vma().
 */
static int dmirror_migrate_range(struct dmirror_migration *mig,
				 const struct dmirror_range *range)
{
	unsigned long addr;
	long ret;

	for (addr = range->start; addr < range->end; addr = mig->args.end) {
		ret = dmirror_migrate_vma(mig, addr, range->end, mig->req);
		if (ret >= 0 && mig->req && dmirror_migrate_pull(mig)) {
			mig->moved += ret;
			ret = dmirror_migrate_vma(mig, addr, range->end, NULL);
		}
		if (ret < 0)
			return ret;
		mig->moved += ret;
	}
	return 0;
}

/* Does a SNAPSHOT state say the page is in the device's own memory? */
static bool dmirror_state_local(u8 state)
{
	u8 where = state & (u8)~(HMM_DMIRROR_PROT_READ | HMM_DMIRROR_PROT_WRITE |
				 HMM_DMIRROR_PROT_PMD | HMM_DMIRROR_PROT_PUD);

	return where == HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL ||
	       where == HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL;
}

/* Fails a batch with a page outside the device's memory. */
static int dmirror_states_local(void *arg, const u8 *states, unsigned long n)
{
	unsigned long i;

	for (i = 0; i < n; i++)
		if (!dmirror_state_local(states[i]))
			return -ENOENT;
	return 0;
}

/**
 * dmirror_check_local() - is every page of a range in the device's memory?
 * @dmirror: mirror
 * @range: range
 *
 * Reads the CPU page table without faulting, so that a page elsewhere (in
 * system memory, on another device) is not moved by looking.
 *
 * Return: 0, -ENOENT if a page is elsewhere, or an error of the walk.
 */
static int dmirror_check_local(struct dmirror *dmirror,
			       const struct dmirror_range *range)
{
	return dmirror_snapshot_walk(dmirror, range, dmirror_states_local,
				     NULL);
}

/**
 * dmirror_timeslice_wait() - let device pages stay for their timeslice
 * @vmf: CPU fault on a device page
 *
 * Pages a migration just brought into device memory stay there for the
 * device's timeslice (per block), so that memory the CPU and the device
 * both touch does not bounce between them on every access; drm_pagemap
 * does the same for GPUs. The CPU fault waits, killably, for the rest of
 * the slice (at most %HMM_DMIRROR_MAX_TIMESLICE_MS), and the wait is
 * counted. Where the fault may be retried it waits without the mmap lock
 * (or the VMA lock) and has the fault retried; the page lock that the
 * fault handler holds is kept, so nothing else moves the page meanwhile.
 *
 * Return: 0 to go on with the migration, or %VM_FAULT_RETRY with the fault
 * lock released.
 */
static vm_fault_t dmirror_timeslice_wait(struct vm_fault *vmf)
{
	struct dmirror_chunk *chunk = dmirror_page_chunk(vmf->page);
	unsigned long block = dmirror_chunk_block(chunk,
						  page_to_pfn(vmf->page));
	long left = (long)(READ_ONCE(chunk->block_until[block]) - jiffies);

	if (left <= 0 ||
	    left > msecs_to_jiffies(HMM_DMIRROR_MAX_TIMESLICE_MS))
		return 0;
	atomic64_inc(dmirror_stat(chunk->mdevice, timeslice_waits));
	if (!(vmf->flags & FAULT_FLAG_ALLOW_RETRY) ||
	    (vmf->flags & FAULT_FLAG_RETRY_NOWAIT)) {
		schedule_timeout_killable(left);
		return 0;
	}
	release_fault_lock(vmf);
	schedule_timeout_killable(left);
	return VM_FAULT_RETRY;
}

/**
 * dmirror_devmem_migrate_to_ram() - &dev_pagemap_ops.migrate_to_ram
 * @vmf: CPU fault on a device-private page
 *
 * Moves the faulting page, or its whole folio when a PMD maps it, back to
 * system memory. Only the device is needed, never a mirror: a file may be
 * closed, and its mirror freed, while its pages stay in device memory. The
 * migration selects by the page's pagemap owner, which is the device's
 * interconnect group when it is in one. Within the timeslice of the page's
 * block (dmirror_timeslice_wait()) the fault first waits for its end.
 *
 * Return: 0, VM_FAULT_RETRY, VM_FAULT_OOM or VM_FAULT_SIGBUS.
 */
static vm_fault_t dmirror_devmem_migrate_to_ram(struct vm_fault *vmf)
{
	struct folio *folio = page_folio(vmf->page);
	struct dmirror_device *mdevice = dmirror_page_chunk(vmf->page)->mdevice;
	unsigned int order = vmf->pte ? 0 : folio_order(folio);
	unsigned long nr = 1UL << order;
	struct migrate_vma args = {
		.vma = vmf->vma,
		.start = ALIGN_DOWN(vmf->address, PAGE_SIZE << order),
		.pgmap_owner = mdevice->owner,
		.flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE |
			 (order ? MIGRATE_VMA_SELECT_COMPOUND : 0),
		.fault_page = vmf->page,
	};
	vm_fault_t ret;

	ret = dmirror_timeslice_wait(vmf);
	if (ret)
		return ret;
	args.end = args.start + (PAGE_SIZE << order);
	if (!dmirror_inject_failure()) {
		args.src = kcalloc(nr, sizeof(*args.src), GFP_KERNEL);
		args.dst = kcalloc(nr, sizeof(*args.dst), GFP_KERNEL);
	}
	if (!args.src || !args.dst) {
		ret = VM_FAULT_OOM;
		goto out;
	}
	if (migrate_vma_setup(&args)) {
		ret = VM_FAULT_SIGBUS;
		goto out;
	}
	if (dmirror_migrate_alloc_to_sys(&args, args.vma, NULL, false))
		ret = VM_FAULT_OOM;
	migrate_vma_pages(&args);
	dmirror_count_to_sys(mdevice, args.src, args.dst, nr);
	migrate_vma_finalize(&args);
out:
	kfree(args.src);
	kfree(args.dst);
	return ret;
}

static const struct dev_pagemap_ops dmirror_devmem_ops = {
	.folio_free	= dmirror_devmem_folio_free,
	.migrate_to_ram	= dmirror_devmem_migrate_to_ram,
	.folio_split	= dmirror_devmem_folio_split,
};

/* Move every page of a chunk, marked evicting, back to system memory. */
static long dmirror_chunk_evict(struct dmirror_chunk *chunk)
{
	return dmirror_evict_pfns(chunk, dmirror_chunk_first_pfn(chunk),
				  dmirror_chunk_npages(chunk));
}

/* Context: chunk_lock held, the chunk evicted. */
static void dmirror_chunk_remove(struct dmirror_chunk *chunk)
{
	struct dmirror_device *mdevice = chunk->mdevice;

	lockdep_assert_held(&mdevice->chunk_lock);
	spin_lock_irq(&mdevice->mem_lock);
	list_del(&chunk->node);
	spin_unlock_irq(&mdevice->mem_lock);
	memunmap_pages(&chunk->pagemap);
	if (chunk->res)
		release_mem_region(chunk->res->start,
				   resource_size(chunk->res));
	dmirror_chunk_free(chunk);
}

/**
 * dmirror_devmem_release() - HMM_DMIRROR_RELEASE: evict all device memory
 * @mdevice: device
 *
 * Processes keep running with their data moved back to system memory; the
 * chunks are given back. A chunk with a page that could not move (pinned,
 * or no system memory) stays.
 *
 * Return: 0, or -EBUSY if a chunk stayed.
 */
static int dmirror_devmem_release(struct dmirror_device *mdevice)
{
	struct dmirror_chunk *chunk, *next;
	int ret = 0;

	mutex_lock(&mdevice->chunk_lock);
	list_for_each_entry_safe(chunk, next, &mdevice->chunks, node) {
		bool empty;

		spin_lock_irq(&mdevice->mem_lock);
		chunk->evicting = true;
		spin_unlock_irq(&mdevice->mem_lock);

		dmirror_chunk_evict(chunk);

		spin_lock_irq(&mdevice->mem_lock);
		empty = !chunk->nr_used;
		if (!empty)
			chunk->evicting = false;
		spin_unlock_irq(&mdevice->mem_lock);
		if (empty)
			dmirror_chunk_remove(chunk);
		else
			ret = -EBUSY;
	}
	mutex_unlock(&mdevice->chunk_lock);
	return ret;
}

/* ------------------------------------------------------------------------
 * Placement advice: the device's own fault policy
 */

/**
 * struct dmirror_advice - advice over a virtual range of a mirror
 * @it: the range, [start, last], in &dmirror.advice
 * @location: enum hmm_dmirror_location, never %HMM_DMIRROR_LOC_NONE
 * @policy: enum hmm_dmirror_fault_policy
 * @shift: log2 of the bytes a migrating device fault moves at once
 */
struct dmirror_advice {
	struct interval_tree_node it;
	u32 location;
	u32 policy;
	u32 shift;
};

/**
 * struct dmirror_placement - advice looked up for an address
 * @start: start of the advised range
 * @end: its end
 * @location: as &struct dmirror_advice
 * @policy: as &struct dmirror_advice
 * @shift: as &struct dmirror_advice
 */
struct dmirror_placement {
	unsigned long start;
	unsigned long end;
	u32 location;
	u32 policy;
	u32 shift;
};

/*
 * A node for the part of an advised range that an unmap in its middle cuts
 * off: the spare the last ADVISE left, else whatever an allocation that
 * does not sleep gives, since this runs in invalidation callbacks.
 */
static struct dmirror_advice *dmirror_advice_spare(struct dmirror *dmirror)
{
	struct dmirror_advice *adv = dmirror->advice_spare;

	lockdep_assert_held(&dmirror->advice_lock);
	if (adv) {
		dmirror->advice_spare = NULL;
		return adv;
	}
	return kmalloc(sizeof(*adv), GFP_NOWAIT | __GFP_NOWARN);
}

/**
 * dmirror_advice_punch() - remove the advice of a range
 * @dmirror: mirror
 * @start: first address
 * @end: end address
 *
 * Ranges that overlap @start or @end keep their advice outside the range.
 * One range can hold both ends and be cut in two: the second part needs a
 * node (dmirror_advice_spare()); without one, that part loses its advice.
 *
 * Context: advice_lock held; may be an invalidation callback, so nothing
 * here sleeps.
 */
static void dmirror_advice_punch(struct dmirror *dmirror, unsigned long start,
				 unsigned long end)
{
	struct rb_root_cached *root = &dmirror->advice;
	unsigned long last = end - 1;
	struct interval_tree_node *it;

	lockdep_assert_held(&dmirror->advice_lock);
	while ((it = interval_tree_iter_first(root, start, last))) {
		struct dmirror_advice *adv =
			container_of(it, struct dmirror_advice, it);
		bool left = it->start < start, right = it->last > last;
		struct dmirror_advice *tail;

		interval_tree_remove(it, root);
		if (left && right) {
			tail = dmirror_advice_spare(dmirror);
			if (tail) {
				*tail = *adv;
				tail->it.start = end;
				interval_tree_insert(&tail->it, root);
			}
		}
		if (left) {
			it->last = start - 1;
			interval_tree_insert(it, root);
		} else if (right) {
			it->start = end;
			interval_tree_insert(it, root);
		} else {
			kfree(adv);
		}
	}
}

/*
 * The advice watch: an unmap (munmap(), the old range of an mremap()) or
 * the exit of the mm drops the advice of what it unmaps. It covers the
 * whole address space, as advice may cover ranges the device never
 * faulted in, which its page table notifiers do not see.
 */
static bool dmirror_advice_invalidate(struct mmu_interval_notifier *mni,
				      const struct mmu_notifier_range *range,
				      unsigned long cur_seq)
{
	struct dmirror *dmirror = container_of(mni, struct dmirror,
					       advice_watch);

	spin_lock(&dmirror->advice_lock);
	mmu_interval_set_seq(mni, cur_seq);
	if (range->event == MMU_NOTIFY_UNMAP ||
	    range->event == MMU_NOTIFY_RELEASE)
		dmirror_advice_punch(dmirror, range->start, range->end);
	spin_unlock(&dmirror->advice_lock);
	return true;
}

static const struct mmu_interval_notifier_ops dmirror_advice_ops = {
	.invalidate = dmirror_advice_invalidate,
};

/* Insert the advice watch once, at the first advice. */
static int dmirror_advice_watch(struct dmirror *dmirror)
{
	int ret;

	lockdep_assert_held(&dmirror->advice_mutex);
	lockdep_assert_not_held(&dmirror->mm->mmap_lock);
	if (dmirror->advice_watching)
		return 0;
	if (dmirror_inject_failure())
		return -ENOMEM;
	ret = mmu_interval_notifier_insert(&dmirror->advice_watch, dmirror->mm,
					   0, ULONG_MAX & PAGE_MASK,
					   &dmirror_advice_ops);
	dmirror->advice_watching = !ret;
	return ret;
}

/* Remove the advice watch and all advice, at release. */
static void dmirror_advice_teardown(struct dmirror *dmirror)
{
	if (dmirror->advice_watching)
		mmu_interval_notifier_remove(&dmirror->advice_watch);
	spin_lock(&dmirror->advice_lock);
	dmirror_advice_punch(dmirror, 0, ULONG_MAX);
	spin_unlock(&dmirror->advice_lock);
	kfree(dmirror->advice_spare);
}

/* Validate an HMM_DMIRROR_ADVISE argument and take its range. */
static int dmirror_advice_check(const struct hmm_dmirror_advice *ua,
				struct dmirror_range *range)
{
	int ret = dmirror_user_range(ua->addr, ua->npages, range);

	if (ret)
		return ret;
	if (ua->reserved || ua->location > HMM_DMIRROR_LOC_AUTO ||
	    ua->policy > HMM_DMIRROR_FAULT_MAP)
		return -EINVAL;
	if (ua->location == HMM_DMIRROR_LOC_NONE)
		return ua->policy || ua->granule_shift ? -EINVAL : 0;
	if (ua->granule_shift != PAGE_SHIFT && ua->granule_shift != PMD_SHIFT)
		return -EINVAL;
	return 0;
}

/*
 * New advice applies from the next device fault: the device drops its
 * mappings of the range, as GPU drivers invalidate theirs when an madvise()
 * changes where a range should be. A fault already past its advice lookup
 * may still map by the old advice; the next one follows the new.
 */
static void dmirror_advice_apply(struct dmirror *dmirror,
				 const struct dmirror_range *range)
{
	struct dmirror_device *mdevice = dmirror->mdevice;
	unsigned long cleared;

	mutex_lock(&dmirror->pt_lock);
	cleared = dmirror_pt_clear(dmirror, range->start, range->end, false);
	mutex_unlock(&dmirror->pt_lock);
	if (cleared)
		dmirror_flush_sync(mdevice,
				   READ_ONCE(mdevice->settings.flush_latency_ns),
				   0, DMIRROR_LOG_SYNC);
}

/**
 * dmirror_advise() - HMM_DMIRROR_ADVISE
 * @dmirror: mirror
 * @uarg: the caller's &struct hmm_dmirror_advice
 *
 * Allocates what the update needs first, then replaces the advice of the
 * range under advice_lock, leaving a spare node for unmaps to come, and
 * drops the device's mappings of the range (dmirror_advice_apply()).
 *
 * Return: 0, -EINVAL (see &struct hmm_dmirror_advice), -EFAULT or -ENOMEM.
 */
static int dmirror_advise(struct dmirror *dmirror, const void __user *uarg)
{
	struct dmirror_advice *adv = NULL, *spare;
	struct hmm_dmirror_advice ua;
	struct dmirror_range range;
	int ret;

	if (copy_from_user(&ua, uarg, sizeof(ua)))
		return -EFAULT;
	ret = dmirror_advice_check(&ua, &range);
	if (ret)
		return ret;
	spare = kzalloc_obj(*spare);
	if (ua.location != HMM_DMIRROR_LOC_NONE) {
		adv = kzalloc_obj(*adv);
		if (adv) {
			adv->it.start = range.start;
			adv->it.last = range.end - 1;
			adv->location = ua.location;
			adv->policy = ua.policy;
			adv->shift = ua.granule_shift;
		}
	}
	ret = -ENOMEM;
	if (!spare || (ua.location != HMM_DMIRROR_LOC_NONE && !adv))
		goto free;
	ret = -EINVAL;
	if (!mmget_not_zero(dmirror->mm))
		goto free;

	mutex_lock(&dmirror->advice_mutex);
	ret = dmirror_advice_watch(dmirror);
	if (!ret) {
		spin_lock(&dmirror->advice_lock);
		if (!dmirror->advice_spare)
			swap(dmirror->advice_spare, spare);
		dmirror_advice_punch(dmirror, range.start, range.end);
		if (adv)
			interval_tree_insert(&adv->it, &dmirror->advice);
		adv = NULL;
		if (!dmirror->advice_spare)
			swap(dmirror->advice_spare, spare);
		spin_unlock(&dmirror->advice_lock);
	}
	mutex_unlock(&dmirror->advice_mutex);
	mmput(dmirror->mm);
	if (!ret)
		dmirror_advice_apply(dmirror, &range);
free:
	kfree(adv);
	kfree(spare);
	return ret;
}

/* The advice of @addr into @pl: false when there is none. */
static bool dmirror_advice_lookup(struct dmirror *dmirror, unsigned long addr,
				  struct dmirror_placement *pl)
{
	struct interval_tree_node *it;

	spin_lock(&dmirror->advice_lock);
	it = interval_tree_iter_first(&dmirror->advice, addr, addr);
	if (it) {
		struct dmirror_advice *adv =
			container_of(it, struct dmirror_advice, it);

		pl->start = it->start;
		pl->end = it->last + 1;
		pl->location = adv->location;
		pl->policy = adv->policy;
		pl->shift = adv->shift;
	}
	spin_unlock(&dmirror->advice_lock);
	return it;
}

/**
 * dmirror_get_advice() - HMM_DMIRROR_GET_ADVICE
 * @dmirror: mirror
 * @uarg: the caller's &struct hmm_dmirror_advice
 *
 * Return: 0, -ENOENT when no advice covers the address, -EINVAL for an
 * address beyond the user address space, -EFAULT.
 */
static int dmirror_get_advice(struct dmirror *dmirror, void __user *uarg)
{
	struct dmirror_placement pl;
	struct hmm_dmirror_advice ua;

	if (copy_from_user(&ua, uarg, sizeof(ua)))
		return -EFAULT;
	if (ua.addr >= TASK_SIZE_MAX)
		return -EINVAL;
	if (!dmirror_advice_lookup(dmirror, ua.addr, &pl))
		return -ENOENT;
	ua.addr = pl.start;
	ua.npages = (pl.end - pl.start) >> PAGE_SHIFT;
	ua.location = pl.location;
	ua.policy = pl.policy;
	ua.granule_shift = pl.shift;
	ua.reserved = 0;
	return copy_to_user(uarg, &ua, sizeof(ua)) ? -EFAULT : 0;
}

/* Keeps the state of the one page a snapshot walk looked at. */
static int dmirror_state_keep(void *arg, const u8 *states, unsigned long n)
{
	*(u8 *)arg = states[0];
	return 0;
}

/*
 * Where the page at @addr is, for placement: in the device's own memory
 * (*@local), or in the memory of its pagemap owner, its own or a peer's
 * (*@owned). Reads the CPU page table without faulting.
 */
static void dmirror_page_where(struct dmirror *dmirror, unsigned long addr,
			       bool *local, bool *owned)
{
	struct dmirror_range page = { addr, addr + PAGE_SIZE };
	u8 state = HMM_DMIRROR_PROT_ERROR;

	dmirror_snapshot_walk(dmirror, &page, dmirror_state_keep, &state);
	*local = dmirror_state_local(state);
	*owned = *local || (state != HMM_DMIRROR_PROT_ERROR &&
			    (state & HMM_DMIRROR_PROT_INTERCONNECT));
}

/*
 * The granule of advice @pl holding @addr, within the advised range and
 * the VMA holding @addr. Return: false if there is no such VMA.
 */
static bool dmirror_granule(struct dmirror *dmirror, unsigned long addr,
			    const struct dmirror_placement *pl,
			    struct dmirror_range *granule)
{
	unsigned long base = ALIGN_DOWN(addr, 1UL << pl->shift);
	struct vm_area_struct *vma;

	granule->start = max(base, pl->start);
	granule->end = min(base + (1UL << pl->shift), pl->end);
	if (mmap_read_lock_killable(dmirror->mm))
		return false;
	vma = vma_lookup(dmirror->mm, addr);
	if (vma) {
		granule->start = max(granule->start, vma->vm_start);
		granule->end = min(granule->end, vma->vm_end);
	}
	mmap_read_unlock(dmirror->mm);
	return vma;
}

/**
 * dmirror_fault_place() - follow the advice of a device fault's address
 * @dmirror: mirror
 * @addr: faulting address
 * @end: end of the access
 *
 * What a GPU's fault handler does before it maps: look up the advice of the
 * range and, where it says migrate, move the granule holding @addr to the
 * preferred location if the page is not there yet: into the device's
 * memory, or out of device memory (the device's or a peer's) into system
 * memory. Into the device's memory older device memory is evicted to make
 * room when the location is the device, not when the device decides (it
 * then only takes free memory). A page that cannot move to the device is
 * mapped where it is, and counted. The fault then maps no further than the
 * granule, so that the next granule faults, and migrates, in turn.
 *
 * Return: the end of what the fault may map: @end without migrate advice.
 */
static unsigned long dmirror_fault_place(struct dmirror *dmirror,
					 unsigned long addr, unsigned long end)
{
	struct dmirror_device *mdevice = dmirror->mdevice;
	struct dmirror_migration mig;
	struct dmirror_placement pl;
	struct dmirror_range granule;
	bool to_dev, local, owned;

	if (!dmirror_advice_lookup(dmirror, addr, &pl) ||
	    pl.policy != HMM_DMIRROR_FAULT_MIGRATE ||
	    !dmirror_granule(dmirror, addr, &pl, &granule))
		return end;
	to_dev = pl.location != HMM_DMIRROR_LOC_SYSTEM;
	dmirror_page_where(dmirror, addr, &local, &owned);
	if ((to_dev ? local : !owned) ||
	    dmirror_migration_init(&mig, dmirror, to_dev,
				   pl.location == HMM_DMIRROR_LOC_DEVICE))
		return min(end, granule.end);

	/* Out to system memory from a peer's memory too. */
	mig.only = NULL;
	dmirror_migrate_range(&mig, &granule);
	dmirror_migration_fini(&mig);
	atomic64_add(mig.moved, dmirror_stat(mdevice, migrate_on_fault));
	if (to_dev) {
		dmirror_page_where(dmirror, addr, &local, &owned);
		if (!local)
			atomic64_inc(dmirror_stat(mdevice, fault_fallbacks));
	}
	return min(end, granule.end);
}

/* ------------------------------------------------------------------------
 * Device access: READ, WRITE, READ_UNLOCKED
 */

/* copy_page(), checked by KASAN and KCSAN as memcpy() is. */
static void dmirror_copy_page(void *to, void *from)
{
	instrument_memcpy_before(to, from, PAGE_SIZE);
	copy_page(to, from);
	instrument_memcpy_after(to, from, PAGE_SIZE, 0);
}

/**
 * dmirror_copy_mapped() - device access through the device page table
 * @dmirror: mirror
 * @start: first address
 * @end: end address
 * @bounce: page-aligned kernel buffer holding the data of [@start, @end)
 * @write: copy @bounce to memory rather than memory to @bounce
 *
 * Stops at the first page the device cannot access without a fault. Whole
 * pages move with copy_page(), which under TCG is several times faster than
 * memcpy() (rep movsq, not a loop of moves).
 *
 * Context: pt_lock held, which keeps the mapped pages from being freed.
 * Return: the number of pages copied.
 */
static unsigned long dmirror_copy_mapped(struct dmirror *dmirror,
					 unsigned long start, unsigned long end,
					 char *bounce, bool write)
{
	unsigned long addr;

	lockdep_assert_held(&dmirror->pt_lock);
	for (addr = start; addr < end; addr += PAGE_SIZE, bounce += PAGE_SIZE) {
		u64 pte = dmirror_pte_get(dmirror, addr);
		struct page *mapped, *page;
		void *kaddr;

		if (!(pte & DMIRROR_PTE_VALID))
			break;
		if (write && !(pte & DMIRROR_PTE_WRITE))
			break;
		mapped = pfn_to_page(pte >> DMIRROR_PTE_PFN_SHIFT);
		page = dmirror_page_storage(mapped);
		kaddr = kmap_local_page(page);
		if (write)
			dmirror_copy_page(kaddr, bounce);
		else
			dmirror_copy_page(bounce, kaddr);
		kunmap_local(kaddr);
		/* As a CPU store would, so that reclaim keeps the data. */
		if (write && page == mapped)
			folio_mark_dirty(page_folio(page));
	}
	return (addr - start) >> PAGE_SHIFT;
}

/*
 * How the device accesses memory (dmirror_access()): a write rather than a
 * read; faulting with the mmap lock droppable (&struct dmirror_fault_batch);
 * following placement advice on faults, as the device's own accesses do,
 * but not the read-back of a migration or of exclusive access, which must
 * find the pages where the request put them.
 */
#define DMIRROR_ACCESS_WRITE		BIT(0)
#define DMIRROR_ACCESS_UNLOCKED		BIT(1)
#define DMIRROR_ACCESS_ADVISED		BIT(2)

/**
 * dmirror_access_batch() - device read or write of one batch
 * @dmirror: mirror
 * @start: first address of the batch
 * @end: end of the batch
 * @req_end: end of the whole request, the device fault prefetch window
 * @bounce: data of the batch
 * @how: DMIRROR_ACCESS_*
 * @faults: incremented for every device fault taken
 *
 * Return: 0 or the error of dmirror_fault().
 */
static int dmirror_access_batch(struct dmirror *dmirror, unsigned long start,
				unsigned long end, unsigned long req_end,
				char *bounce, unsigned int how, u64 *faults)
{
	bool write = how & DMIRROR_ACCESS_WRITE;
	unsigned long addr = start;
	int ret;

	for (;;) {
		unsigned long done;

		mutex_lock(&dmirror->pt_lock);
		done = dmirror_copy_mapped(dmirror, addr, end,
					   bounce + (addr - start), write);
		mutex_unlock(&dmirror->pt_lock);
		addr += done << PAGE_SHIFT;
		if (addr == end)
			return 0;

		if (fatal_signal_pending(current))
			return -EINTR;
		ret = dmirror_fault(dmirror, addr,
				    (how & DMIRROR_ACCESS_ADVISED) ?
				    dmirror_fault_place(dmirror, addr, req_end) :
				    req_end,
				    write, how & DMIRROR_ACCESS_UNLOCKED);
		if (ret)
			return ret;
		(*faults)++;
	}
}

/**
 * dmirror_access() - HMM_DMIRROR_READ, _WRITE and _READ_UNLOCKED
 * @dmirror: mirror
 * @cmd: the request
 * @range: the range of @cmd
 * @how: DMIRROR_ACCESS_*
 *
 * Data moves through a bounded bounce buffer one batch at a time, because
 * user memory cannot be touched under pt_lock. The buffer's size is a power
 * of two, so kvmalloc() returns it page-aligned, as copy_page() needs.
 *
 * Return: 0, -EFAULT when @cmd->ptr cannot be accessed, or an error of
 * dmirror_fault().
 */
static int dmirror_access(struct dmirror *dmirror, struct hmm_dmirror_cmd *cmd,
			  const struct dmirror_range *range, unsigned int how)
{
	bool write = how & DMIRROR_ACCESS_WRITE;
	char __user *uptr = u64_to_user_ptr(cmd->ptr);
	unsigned long addr, next;
	char *bounce;
	int ret = 0;

	BUILD_BUG_ON(!is_power_of_2(DMIRROR_BATCH_PAGES));
	bounce = dmirror_inject_failure() ? NULL :
		 kvmalloc(DMIRROR_BATCH_PAGES * PAGE_SIZE, GFP_KERNEL);
	if (!bounce)
		return -ENOMEM;

	for (addr = range->start; addr < range->end; addr = next) {
		unsigned long len;

		next = dmirror_batch_end(addr, range->end);
		len = next - addr;
		if (write && copy_from_user(bounce, uptr, len)) {
			ret = -EFAULT;
			break;
		}
		ret = dmirror_access_batch(dmirror, addr, next, range->end,
					   bounce, how, &cmd->faults);
		if (ret)
			break;
		if (!write && copy_to_user(uptr, bounce, len)) {
			ret = -EFAULT;
			break;
		}
		uptr += len;
		cmd->cpages += len >> PAGE_SHIFT;
	}
	kvfree(bounce);
	return ret;
}

/* ------------------------------------------------------------------------
 * Exclusive (atomic) access
 */

/**
 * dmirror_exclusive_give_back() - return an unused exclusive page to the CPU
 * @mm: mirrored mm
 * @addr: page address
 *
 * When an invalidation collided with an attempt at exclusive access, the page is
 * left with a device-exclusive CPU entry the device never mapped. The next
 * make_device_exclusive() would fault it back first, an MMU_NOTIFY_CLEAR
 * inside the new read window: a collision again, and so forever. Faulting it
 * back here, before the window opens, breaks that cycle.
 *
 * Return: 0 or the error of the fault.
 */
static int dmirror_exclusive_give_back(struct mm_struct *mm,
				       unsigned long addr)
{
	int ret;

	ret = mmap_read_lock_killable(mm);
	if (ret)
		return ret;
	ret = fixup_user_fault(mm, addr, FAULT_FLAG_WRITE, NULL);
	mmap_read_unlock(mm);
	return ret;
}

/**
 * dmirror_exclusive_try() - one attempt at making a page exclusive
 * @dmirror: mirror
 * @leaf: leaf covering @addr, referenced
 * @watch: notifier over the request's range
 * @addr: page address
 * @installed: output, true if the atomic PTE was installed
 *
 * make_device_exclusive() returns the page locked, so the CPU cannot take it
 * back before the device PTE is written. The collision check still applies:
 * the page may have been unmapped between the GUP inside
 * make_device_exclusive() and pt_lock. It uses @watch rather than the leaf's
 * notifier: only invalidations of the request's range matter, and with
 * other threads busy in the leaf the page would otherwise keep retrying.
 *
 * Return: 0 or the error of make_device_exclusive().
 */
static int dmirror_exclusive_try(struct dmirror *dmirror,
				 struct dmirror_leaf *leaf,
				 struct dmirror_watch *watch,
				 unsigned long addr, bool *installed)
{
	struct mmu_interval_notifier *mni = &watch->mni;
	struct mm_struct *mm = dmirror->mm;
	struct folio *folio;
	struct page *page;
	unsigned long seq;
	int ret;

	seq = mmu_interval_read_begin(mni);
	ret = mmap_read_lock_killable(mm);
	if (ret)
		return ret;
	page = make_device_exclusive(mm, addr, dmirror->mdevice, &folio);
	if (IS_ERR(page)) {
		mmap_read_unlock(mm);
		return PTR_ERR(page);
	}

	mutex_lock(&dmirror->pt_lock);
	*installed = !leaf->dead && !mmu_interval_read_retry(mni, seq);
	if (*installed)
		dmirror_pte_set(dmirror, leaf, addr,
				dmirror_pte_make(page_to_pfn(page),
						 DMIRROR_PTE_WRITE |
						 DMIRROR_PTE_ATOMIC));
	mutex_unlock(&dmirror->pt_lock);

	folio_unlock(folio);
	folio_put(folio);
	mmap_read_unlock(mm);
	return 0;
}

/**
 * struct dmirror_exclusive_req - a page to take for atomic device access
 * @dmirror: mirror
 * @watch: notifier over the request's range
 * @addr: page address
 */
struct dmirror_exclusive_req {
	struct dmirror *dmirror;
	struct dmirror_watch *watch;
	unsigned long addr;
};

/**
 * dmirror_exclusive_pass() - one attempt at taking a page for atomic access
 * @arg: the &struct dmirror_exclusive_req
 *
 * After a collision the page is given back to the CPU before the next
 * attempt (dmirror_exclusive_give_back()).
 *
 * Return: 0; -EAGAIN after a collision; -EOPNOTSUPP for file-backed or
 * hugetlb memory; -EFAULT when the page cannot be faulted in writable;
 * -EINTR, -ENOMEM.
 */
static int dmirror_exclusive_pass(void *arg)
{
	struct dmirror_exclusive_req *req = arg;
	struct dmirror *dmirror = req->dmirror;
	struct dmirror_leaf *leaf;
	bool installed = false;
	int ret;

	leaf = dmirror_leaf_get(dmirror, req->addr);
	if (IS_ERR(leaf))
		return PTR_ERR(leaf);
	ret = dmirror_exclusive_try(dmirror, leaf, req->watch, req->addr,
				    &installed);
	dmirror_leaf_put(leaf);
	if (ret || installed)
		return ret;
	ret = dmirror_exclusive_give_back(dmirror->mm, req->addr);
	return ret ?: -EAGAIN;
}

/**
 * dmirror_exclusive() - HMM_DMIRROR_EXCLUSIVE
 * @dmirror: mirror
 * @cmd: the request; the data of the range is copied to @cmd->ptr
 * @range: the range of @cmd
 *
 * One watch notifier serves the whole request: inserting and removing one
 * per page would cost more than the pages, and mmu_interval_notifier_remove()
 * waits until no invalidation of the mm is running, which, with other
 * threads busy invalidating their own pages, can take long.
 *
 * Return: 0, an error of dmirror_exclusive_pass() or dmirror_access(), or
 * -EBUSY if invalidations kept colliding.
 */
static int dmirror_exclusive(struct dmirror *dmirror,
			     struct hmm_dmirror_cmd *cmd,
			     const struct dmirror_range *range)
{
	struct dmirror_watch watch;
	struct dmirror_exclusive_req req = {
		.dmirror = dmirror,
		.watch = &watch,
	};
	int ret;

	ret = dmirror_watch_insert(&watch, dmirror, range->start, range->end);
	if (ret)
		return ret;
	for (req.addr = range->start; !ret && req.addr < range->end;
	     req.addr += PAGE_SIZE)
		ret = dmirror_retry_collisions(dmirror_exclusive_pass, &req,
					       dmirror_stat(dmirror->mdevice,
							    exclusive_retries));
	dmirror_watch_remove(&watch);
	if (ret)
		return ret;
	/* Read the data back through the atomic mappings. */
	return dmirror_access(dmirror, cmd, range, 0);
}

/**
 * dmirror_check_exclusive() - HMM_DMIRROR_CHECK_EXCLUSIVE
 * @dmirror: mirror
 * @range: range to check
 *
 * Return: -EPERM if a page of the range is still mapped for atomic access,
 * that is if the CPU has not taken it back since, else 0.
 */
static int dmirror_check_exclusive(struct dmirror *dmirror,
				   const struct dmirror_range *range)
{
	unsigned long addr;
	int ret = 0;

	mutex_lock(&dmirror->pt_lock);
	for (addr = range->start; addr < range->end; addr += PAGE_SIZE) {
		if (dmirror_pte_get(dmirror, addr) & DMIRROR_PTE_ATOMIC) {
			ret = -EPERM;
			break;
		}
	}
	mutex_unlock(&dmirror->pt_lock);
	return ret;
}

/* ------------------------------------------------------------------------
 * Migration requests: MIGRATE_TO_DEV, MIGRATE_TO_SYS
 */

/**
 * dmirror_migrate() - HMM_DMIRROR_MIGRATE_TO_DEV and _TO_SYS
 * @dmirror: mirror
 * @cmd: the request; cpages gets the number of pages moved
 * @range: the range of @cmd
 * @to_dev: direction
 *
 * See dmirror_migrate_range(). As in the kernel's own driver, migration to
 * the device then requires every page of the range to be in the device's
 * memory, moved now or before, and reads them through the device into
 * @cmd->ptr; @cmd->cpages is the range's size. Migration to system memory
 * counts the pages moved. A migration to the device evicts older device
 * memory when it runs out, never what it brought in itself.
 *
 * Return: 0; -EINVAL for a hole or memory without read access in the range;
 * -ENOENT when a page of the range is not in the device's memory afterwards
 * (shared or file memory, which cannot move, or a page in the coherent
 * memory of a device outside the group); -ENOMEM when the device ran out of
 * memory (what fitted has moved).
 */
static int dmirror_migrate(struct dmirror *dmirror, struct hmm_dmirror_cmd *cmd,
			   const struct dmirror_range *range, bool to_dev)
{
	struct hmm_dmirror_cmd readback = *cmd;
	struct dmirror_migration mig;
	u64 t;
	int ret;

	ret = dmirror_migration_init(&mig, dmirror, to_dev, true);
	if (ret)
		return ret;
	ret = dmirror_migrate_range(&mig, range);
	dmirror_migration_fini(&mig);
	if (ret)
		return ret;

	cmd->cpages = mig.moved;
	if (!to_dev)
		return 0;
	ret = dmirror_check_local(dmirror, range);
	if (ret == -ENOENT && mig.out_of_memory)
		ret = -ENOMEM;
	if (ret)
		return ret;
	readback.cpages = 0;
	t = ktime_get_ns();
	ret = dmirror_access(dmirror, &readback, range, 0);
	dmirror_time_phase(dmirror_stat(dmirror->mdevice, migrate_readback_ns),
			   &t);
	cmd->faults = readback.faults;
	cmd->cpages = readback.cpages;
	return ret;
}

/* ------------------------------------------------------------------------
 * Statistics and settings
 */

/**
 * dmirror_stats_read() - HMM_DMIRROR_STATS
 * @dmirror: mirror asking
 * @out: the counters of its device
 */
static void dmirror_stats_read(struct dmirror *dmirror,
			       struct hmm_dmirror_stats *out)
{
	struct dmirror_device *mdevice = dmirror->mdevice;
	u64 *field = (u64 *)out;
	unsigned int i;

	/* Deferred removals of this file count as done. */
	flush_delayed_work(&dmirror->reap_work);

	for (i = 0; i < DMIRROR_NR_STATS; i++)
		field[i] = atomic64_read(&mdevice->stats[i]);
	out->flushes_in_flight_max =
		atomic_read(&dmirror_flushes_in_flight_max);
	out->finish_pool = DMIRROR_FLUSH_POOL;
	out->flush_wake_ns = READ_ONCE(dmirror_wake_ns);
	out->interconnect_group = mdevice->group ? mdevice->group->id : 0;
	spin_lock(&mdevice->lock);
	out->finish_free = DMIRROR_FLUSH_POOL -
			   bitmap_weight(mdevice->flush_busy,
					 DMIRROR_FLUSH_POOL);
	spin_unlock(&mdevice->lock);
}

/* HMM_DMIRROR_STATS_RESET: every counter but the live notifiers, a gauge. */
static void dmirror_stats_reset(struct dmirror_device *mdevice)
{
	unsigned int i;

	for (i = 0; i < DMIRROR_NR_STATS; i++)
		if (&mdevice->stats[i] != dmirror_stat(mdevice, notifiers_live))
			atomic64_set(&mdevice->stats[i], 0);
	atomic_set(&dmirror_flushes_in_flight_max,
		   atomic_read(&dmirror_flushes_in_flight));
}

static int dmirror_settings_check(const struct hmm_dmirror_settings *set)
{
	if (set->notifier_model > HMM_DMIRROR_NOTIFIER_PER_LEAF ||
	    set->invalidation > HMM_DMIRROR_TWO_PASS ||
	    set->flush_latency_ns > DMIRROR_MAX_FLUSH_LATENCY_NS ||
	    !is_power_of_2(set->leaf_size) || set->leaf_size < PAGE_SIZE ||
	    set->leaf_size > DMIRROR_MAX_LEAF_SIZE ||
	    (set->flags & ~HMM_DMIRROR_SETTING_FAIL_NEXT_FINISH) ||
	    set->reserved || set->timeslice_ms > HMM_DMIRROR_MAX_TIMESLICE_MS)
		return -EINVAL;
	return 0;
}

static int dmirror_settings_set(struct dmirror_device *mdevice,
				const struct hmm_dmirror_settings *set)
{
	int ret = dmirror_settings_check(set);

	if (ret)
		return ret;
	spin_lock(&mdevice->lock);
	mdevice->settings = *set;
	mdevice->settings.flags = 0;
	/* Every SET arms or disarms the one-shot, so teardown can clear it. */
	mdevice->fail_next_finish =
		set->flags & HMM_DMIRROR_SETTING_FAIL_NEXT_FINISH;
	spin_unlock(&mdevice->lock);
	return 0;
}

static void dmirror_settings_get(struct dmirror_device *mdevice,
				 struct hmm_dmirror_settings *set)
{
	spin_lock(&mdevice->lock);
	*set = mdevice->settings;
	spin_unlock(&mdevice->lock);
}

/* ------------------------------------------------------------------------
 * ioctl
 */

/**
 * dmirror_ioctl_mm() - run one mm-using command
 * @dmirror: mirror
 * @command: ioctl number
 * @cmd: the command
 *
 * Return: 0 or a negative errno; -EINVAL once the mirrored process is gone.
 */
static long dmirror_ioctl_mm(struct dmirror *dmirror, unsigned int command,
			     struct hmm_dmirror_cmd *cmd)
{
	struct mm_struct *mm = dmirror->mm;
	struct dmirror_range range;
	long ret;

	ret = dmirror_user_range(cmd->addr, cmd->npages, &range);
	if (ret)
		return ret;
	if (!mmget_not_zero(mm))
		return -EINVAL;

	switch (command) {
	case HMM_DMIRROR_READ:
		ret = dmirror_access(dmirror, cmd, &range,
				     DMIRROR_ACCESS_ADVISED);
		break;
	case HMM_DMIRROR_WRITE:
		ret = dmirror_access(dmirror, cmd, &range,
				     DMIRROR_ACCESS_ADVISED | DMIRROR_ACCESS_WRITE);
		break;
	case HMM_DMIRROR_READ_UNLOCKED:
		ret = dmirror_access(dmirror, cmd, &range,
				     DMIRROR_ACCESS_ADVISED |
				     DMIRROR_ACCESS_UNLOCKED);
		break;
	case HMM_DMIRROR_SNAPSHOT:
		ret = dmirror_snapshot(dmirror, cmd, &range);
		break;
	case HMM_DMIRROR_EXCLUSIVE:
		ret = dmirror_exclusive(dmirror, cmd, &range);
		break;
	case HMM_DMIRROR_CHECK_EXCLUSIVE:
		ret = dmirror_check_exclusive(dmirror, &range);
		break;
	case HMM_DMIRROR_MIGRATE_TO_DEV:
		ret = dmirror_migrate(dmirror, cmd, &range, true);
		break;
	case HMM_DMIRROR_MIGRATE_TO_SYS:
		ret = dmirror_migrate(dmirror, cmd, &range, false);
		break;
	default:
		ret = -ENOTTY;
		break;
	}
	mmput(mm);
	return ret;
}

/* HMM_DMIRROR_FLAGS: the new flags are in npages, as upstream. */
static long dmirror_set_flags(struct dmirror *dmirror,
			      struct hmm_dmirror_cmd __user *ucmd)
{
	struct hmm_dmirror_cmd cmd;

	if (copy_from_user(&cmd, ucmd, sizeof(cmd)))
		return -EFAULT;
	if (cmd.npages & ~HMM_DMIRROR_FLAG_FAIL_ALLOC)
		return -EINVAL;
	WRITE_ONCE(dmirror->flags, cmd.npages);
	return 0;
}

static long dmirror_ioctl_cmd(struct dmirror *dmirror, unsigned int command,
			      struct hmm_dmirror_cmd __user *ucmd)
{
	struct hmm_dmirror_cmd cmd;
	long ret;

	if (copy_from_user(&cmd, ucmd, sizeof(cmd)))
		return -EFAULT;
	cmd.cpages = 0;
	cmd.faults = 0;

	ret = dmirror_ioctl_mm(dmirror, command, &cmd);
	if (ret)
		return ret;
	if (copy_to_user(ucmd, &cmd, sizeof(cmd)))
		return -EFAULT;
	return 0;
}

/**
 * dmirror_stats_ioctl() - HMM_DMIRROR_STATS of any size
 * @dmirror: mirror
 * @command: the ioctl number, whose size field is the caller's structure's
 * @uarg: the caller's &struct hmm_dmirror_stats
 *
 * Copies out what both sides know and zeroes the rest of the caller's
 * structure, so that the structure can grow at its end.
 *
 * Return: 0 or -EFAULT.
 */
static long dmirror_stats_ioctl(struct dmirror *dmirror, unsigned int command,
				void __user *uarg)
{
	size_t usize = _IOC_SIZE(command);
	size_t n = min(usize, sizeof(struct hmm_dmirror_stats));
	struct hmm_dmirror_stats stats;

	dmirror_stats_read(dmirror, &stats);
	if (copy_to_user(uarg, &stats, n))
		return -EFAULT;
	if (usize > n && clear_user(uarg + n, usize - n))
		return -EFAULT;
	return 0;
}

/* HMM_DMIRROR_STATS with the size of any version of the structure. */
static bool dmirror_ioctl_is(unsigned int command, unsigned int request)
{
	return _IOC_TYPE(command) == _IOC_TYPE(request) &&
	       _IOC_NR(command) == _IOC_NR(request) &&
	       _IOC_DIR(command) == _IOC_DIR(request);
}

/* The size of the first version of &struct hmm_dmirror_settings. */
#define DMIRROR_SETTINGS_V1_SIZE \
	offsetof(struct hmm_dmirror_settings, memory_limit_mb)

/**
 * dmirror_settings_ioctl() - GET_SETTINGS and SET_SETTINGS, any size
 * @mdevice: device
 * @command: the ioctl number, with the size of the caller's structure
 * @uarg: the caller's structure
 *
 * Return: 0, -EINVAL for a structure shorter than the first version or a
 * bad value, -E2BIG for unknown fields that are not 0, -EFAULT.
 */
static long dmirror_settings_ioctl(struct dmirror_device *mdevice,
				   unsigned int command, void __user *uarg)
{
	size_t usize = _IOC_SIZE(command);
	struct hmm_dmirror_settings set;
	size_t n = min(usize, sizeof(set));
	int ret;

	if (usize < DMIRROR_SETTINGS_V1_SIZE)
		return -EINVAL;
	if (_IOC_DIR(command) == _IOC_READ) {
		dmirror_settings_get(mdevice, &set);
		if (copy_to_user(uarg, &set, n))
			return -EFAULT;
		if (usize > n && clear_user(uarg + n, usize - n))
			return -EFAULT;
		return 0;
	}
	ret = copy_struct_from_user(&set, sizeof(set), uarg, usize);
	return ret ?: dmirror_settings_set(mdevice, &set);
}

/**
 * dmirror_invalidations() - HMM_DMIRROR_INVALIDATIONS
 * @dmirror: mirror
 * @uq: the caller's &struct hmm_dmirror_inval_query
 *
 * Return: 0, -EINVAL for a bad range, -EFAULT or -ENOMEM.
 */
static long dmirror_invalidations(struct dmirror *dmirror,
				  struct hmm_dmirror_inval_query __user *uq)
{
	struct hmm_dmirror_inval_record *recs;
	struct hmm_dmirror_inval_query q;
	struct dmirror_range range;
	long ret = 0;

	if (copy_from_user(&q, uq, sizeof(q)))
		return -EFAULT;
	if (q.npages) {
		ret = dmirror_user_range(q.addr, q.npages, &range);
		if (ret)
			return ret;
	}
	recs = dmirror_inject_failure() ? NULL :
	       kvmalloc_array(HMM_DMIRROR_INVAL_RECORDS, sizeof(*recs),
			      GFP_KERNEL);
	if (!recs)
		return -ENOMEM;
	q.nr = dmirror_log_read(dmirror->mm, q.npages ? &range : NULL,
				q.since, recs, &q.last);
	if (copy_to_user(u64_to_user_ptr(q.ptr), recs,
			 min(q.nr, q.nr_max) * sizeof(*recs)) ||
	    copy_to_user(uq, &q, sizeof(q)))
		ret = -EFAULT;
	kvfree(recs);
	return ret;
}

/**
 * dmirror_hold_ioctl() - HMM_DMIRROR_HOLD
 * @dmirror: mirror
 * @uarg: the caller's &struct hmm_dmirror_hold
 *
 * Return: as the operation, -EINVAL for an unknown one or a bad range,
 * -EFAULT.
 */
static long dmirror_hold_ioctl(struct dmirror *dmirror,
			       struct hmm_dmirror_hold __user *uarg)
{
	struct hmm_dmirror_hold arg;
	struct dmirror_range range;
	int ret;

	if (copy_from_user(&arg, uarg, sizeof(arg)))
		return -EFAULT;
	switch (arg.op) {
	case HMM_DMIRROR_HOLD_ARM:
		ret = dmirror_user_range(arg.addr, arg.npages, &range);
		return ret ? ret : dmirror_hold_arm(dmirror, arg.point, &range);
	case HMM_DMIRROR_HOLD_WAIT:
		return dmirror_hold_wait(dmirror);
	case HMM_DMIRROR_HOLD_RELEASE:
		return dmirror_hold_release(dmirror);
	default:
		return -EINVAL;
	}
}

static long dmirror_fops_unlocked_ioctl(struct file *filp, unsigned int command,
					unsigned long arg)
{
	struct dmirror *dmirror = filp->private_data;
	struct dmirror_device *mdevice = dmirror->mdevice;
	void __user *uarg = (void __user *)arg;

	/* The structures that grow: any size of them. */
	if (dmirror_ioctl_is(command, HMM_DMIRROR_STATS))
		return dmirror_stats_ioctl(dmirror, command, uarg);
	if (dmirror_ioctl_is(command, HMM_DMIRROR_GET_SETTINGS) ||
	    dmirror_ioctl_is(command, HMM_DMIRROR_SET_SETTINGS))
		return dmirror_settings_ioctl(mdevice, command, uarg);

	switch (command) {
	case HMM_DMIRROR_READ:
	case HMM_DMIRROR_WRITE:
	case HMM_DMIRROR_READ_UNLOCKED:
	case HMM_DMIRROR_SNAPSHOT:
	case HMM_DMIRROR_EXCLUSIVE:
	case HMM_DMIRROR_CHECK_EXCLUSIVE:
	case HMM_DMIRROR_MIGRATE_TO_DEV:
	case HMM_DMIRROR_MIGRATE_TO_SYS:
		return dmirror_ioctl_cmd(dmirror, command, uarg);
	case HMM_DMIRROR_RELEASE:
		return dmirror_devmem_release(mdevice);
	case HMM_DMIRROR_FLAGS:
		return dmirror_set_flags(dmirror, uarg);
	case HMM_DMIRROR_STATS_RESET:
		dmirror_stats_reset(mdevice);
		return 0;
	case HMM_DMIRROR_ADVISE:
		return dmirror_advise(dmirror, uarg);
	case HMM_DMIRROR_GET_ADVICE:
		return dmirror_get_advice(dmirror, uarg);
	case HMM_DMIRROR_INVALIDATIONS:
		return dmirror_invalidations(dmirror, uarg);
	case HMM_DMIRROR_HOLD:
		return dmirror_hold_ioctl(dmirror, uarg);
	default:
		return -ENOTTY;
	}
}

/* ------------------------------------------------------------------------
 * open and release
 */

/**
 * dmirror_fops_open() - create a device mirror of the caller's mm
 * @inode: device inode
 * @filp: the new file
 *
 * Nothing is subscribed yet: the first device fault binds the mirror to the
 * device's settings and inserts the notifiers.
 *
 * Return: 0, -ENOMEM, or -EINVAL for a caller without an mm.
 */
static int dmirror_fops_open(struct inode *inode, struct file *filp)
{
	struct dmirror *dmirror;

	if (!current->mm)
		return -EINVAL;
	dmirror = dmirror_inject_failure() ? NULL : kzalloc_obj(*dmirror);
	if (!dmirror)
		return -ENOMEM;

	dmirror->mdevice = container_of(inode->i_cdev, struct dmirror_device,
					cdev);
	dmirror->mm = current->mm;
	mmgrab(dmirror->mm);
	mutex_init(&dmirror->leaf_lock);
	mutex_init(&dmirror->pt_lock);
	xa_init(&dmirror->leaves);
	init_llist_head(&dmirror->reap_list);
	INIT_DELAYED_WORK(&dmirror->reap_work, dmirror_reap_work);
	dmirror->whole.dmirror = dmirror;
	mutex_init(&dmirror->advice_mutex);
	spin_lock_init(&dmirror->advice_lock);
	dmirror->advice = RB_ROOT_CACHED;

	/* Teach lockdep that pt_lock is taken from reclaim; see "Locking". */
	if (IS_ENABLED(CONFIG_LOCKDEP)) {
		fs_reclaim_acquire(GFP_KERNEL);
		might_lock(&dmirror->pt_lock);
		fs_reclaim_release(GFP_KERNEL);
	}

	filp->private_data = dmirror;
	return 0;
}

/**
 * dmirror_teardown() - remove every notifier and leaf of a mirror
 * @dmirror: mirror, whose file is being released
 *
 * First stop invalidations from queueing leaves and let queued removals
 * finish, then remove what is left. No ioctl can run on a file being
 * released, so nothing faults in meanwhile.
 */
static void dmirror_teardown(struct dmirror *dmirror)
{
	struct dmirror_leaf *leaf;
	unsigned long idx;

	mutex_lock(&dmirror->pt_lock);
	dmirror->closing = true;
	mutex_unlock(&dmirror->pt_lock);
	flush_delayed_work(&dmirror->reap_work);

	if (!dmirror_is_bound(dmirror))
		return;
	if (dmirror->model == HMM_DMIRROR_NOTIFIER_WHOLE)
		dmirror_notifier_remove(dmirror, &dmirror->whole);

	xa_for_each(&dmirror->leaves, idx, leaf) {
		if (dmirror->model == HMM_DMIRROR_NOTIFIER_PER_LEAF)
			dmirror_notifier_remove(dmirror, &leaf->notifier);
		xa_erase(&dmirror->leaves, idx);
		dmirror_leaf_put(leaf);
	}
}

/**
 * dmirror_fops_release() - tear down a mirror
 * @inode: device inode
 * @filp: the file
 *
 * Return: 0.
 */
static int dmirror_fops_release(struct inode *inode, struct file *filp)
{
	struct dmirror *dmirror = filp->private_data;

	/* A task held for this file would keep the teardown waiting. */
	dmirror_hold_release(dmirror);
	dmirror_teardown(dmirror);
	dmirror_advice_teardown(dmirror);
	xa_destroy(&dmirror->leaves);
	mmdrop(dmirror->mm);
	mutex_destroy(&dmirror->advice_mutex);
	mutex_destroy(&dmirror->pt_lock);
	mutex_destroy(&dmirror->leaf_lock);
	kfree(dmirror);
	return 0;
}

/**
 * dmirror_fops_mmap() - map zeroed kernel pages, as the kernel's own driver
 * @filp: the file
 * @vma: the new mapping
 *
 * Gives tests memory that is neither anonymous nor file-backed (a mixed map,
 * VM_MIXEDMAP), which HMM must report and refuse to migrate. The pages are
 * inserted here, under the mmap lock, as the kernel's driver does (its tests
 * expect them mapped before any access), so a mapping is limited to
 * %DMIRROR_MMAP_MAX_SIZE, the pages are charged to the caller's memory
 * cgroup, and a fatal signal stops the loop.
 *
 * Return: 0; -EINVAL for a mapping larger than %DMIRROR_MMAP_MAX_SIZE;
 * -ENOMEM, -EINTR, or the error of vm_insert_page(). The core unmaps what
 * was inserted when this fails.
 */
static int dmirror_fops_mmap(struct file *filp, struct vm_area_struct *vma)
{
	unsigned long addr;
	int ret;

	if (vma->vm_end - vma->vm_start > DMIRROR_MMAP_MAX_SIZE)
		return -EINVAL;
	for (addr = vma->vm_start; addr < vma->vm_end; addr += PAGE_SIZE) {
		struct page *page;

		if (fatal_signal_pending(current))
			return -EINTR;
		page = dmirror_inject_failure() ? NULL :
		       alloc_page(GFP_KERNEL_ACCOUNT | __GFP_ZERO);
		if (!page)
			return -ENOMEM;
		ret = vm_insert_page(vma, addr, page);
		/* The mapping holds its own reference. */
		put_page(page);
		if (ret)
			return ret;
	}
	return 0;
}

static const struct file_operations dmirror_fops = {
	.owner		= THIS_MODULE,
	.open		= dmirror_fops_open,
	.release	= dmirror_fops_release,
	.mmap		= dmirror_fops_mmap,
	.unlocked_ioctl	= dmirror_fops_unlocked_ioctl,
	.llseek		= default_llseek,
};

/* ------------------------------------------------------------------------
 * Devices and module
 */

static void dmirror_device_release(struct device *dev)
{
	kfree(container_of(dev, struct dmirror_device, dev));
}

static void dmirror_device_init_settings(struct dmirror_device *mdevice)
{
	struct hmm_dmirror_settings *set = &mdevice->settings;

	set->notifier_model = notifier_model;
	set->invalidation = invalidation;
	set->flush_latency_ns = flush_latency_ns;
	set->leaf_size = leaf_size;
}

/**
 * dmirror_device_add() - create /dev/hmm_dmirror<id>
 * @id: its number
 * @mem_type: the memory it owns
 * @group: its interconnect group, or NULL
 *
 * Return: 0 or a negative errno.
 */
static int dmirror_device_add(unsigned int id,
			      enum hmm_dmirror_memory_type mem_type,
			      struct dmirror_group *group)
{
	struct dmirror_device *mdevice;
	unsigned int i;
	int ret;

	mdevice = kzalloc_obj(*mdevice);
	if (!mdevice)
		return -ENOMEM;
	mdevice->id = id;
	mdevice->mem_type = mem_type;
	mdevice->group = group;
	mdevice->owner = group ? (void *)group : (void *)mdevice;
	spin_lock_init(&mdevice->lock);
	init_waitqueue_head(&mdevice->hold.wq);
	mutex_init(&mdevice->chunk_lock);
	spin_lock_init(&mdevice->mem_lock);
	INIT_LIST_HEAD(&mdevice->chunks);
	dmirror_device_init_settings(mdevice);
	for (i = 0; i < DMIRROR_FLUSH_POOL; i++)
		mdevice->flush_pool[i].mdevice = mdevice;

	cdev_init(&mdevice->cdev, &dmirror_fops);
	mdevice->cdev.owner = THIS_MODULE;
	device_initialize(&mdevice->dev);
	mdevice->dev.devt = MKDEV(MAJOR(dmirror_devt), id);
	mdevice->dev.release = dmirror_device_release;

	ret = dev_set_name(&mdevice->dev, "hmm_dmirror%u", id);
	if (!ret)
		ret = cdev_device_add(&mdevice->cdev, &mdevice->dev);
	if (ret) {
		put_device(&mdevice->dev);
		return ret;
	}
	dmirror_devices[id] = mdevice;
	return 0;
}

/*
 * Every file of the device is closed, so no flush is pending. Processes may
 * still map device memory: it is evicted to system memory first, and
 * memunmap_pages() waits for any page that could not move.
 */
static void dmirror_device_remove(struct dmirror_device *mdevice)
{
	struct dmirror_chunk *chunk, *next;

	cdev_device_del(&mdevice->cdev, &mdevice->dev);
	if (dmirror_devmem_release(mdevice))
		pr_warn("test_hmm: device %u: pages pinned in device memory\n",
			mdevice->id);
	mutex_lock(&mdevice->chunk_lock);
	list_for_each_entry_safe(chunk, next, &mdevice->chunks, node)
		dmirror_chunk_remove(chunk);
	mutex_unlock(&mdevice->chunk_lock);
	put_device(&mdevice->dev);
}

static void dmirror_devices_remove(void)
{
	unsigned int id;

	for (id = 0; id < dmirror_nr_ids; id++) {
		if (dmirror_devices[id])
			dmirror_device_remove(dmirror_devices[id]);
	}
	kfree(dmirror_devices);
	kfree(dmirror_groups);
	unregister_chrdev_region(dmirror_devt, dmirror_nr_ids);
}

static enum hmm_dmirror_memory_type dmirror_id_type(unsigned int id)
{
	bool coherent = id >= DMIRROR_FIRST_COHERENT &&
			id < DMIRROR_FIRST_COHERENT + DMIRROR_NCOHERENT;

	if (!coherent)
		return HMM_DMIRROR_MEMORY_DEVICE_PRIVATE;
	/* Coherent devices need both physical ranges, as upstream. */
	if (spm_addr_dev0 && spm_addr_dev1)
		return HMM_DMIRROR_MEMORY_DEVICE_COHERENT;
	return 0;
}

/**
 * dmirror_group_parse() - read one group of the interconnect parameter
 * @list: ','-separated device numbers and ranges a-b; changed
 * @group_of: the group of each device number, 0 for none; updated
 * @group: number of this group
 *
 * Return: 0, or -EINVAL for a number that is not a device, a device in two
 * groups, or a group of fewer than two devices.
 */
static int dmirror_group_parse(char *list, unsigned int *group_of,
			       unsigned int group)
{
	unsigned int first, last, id, n = 0;
	char *item;

	while ((item = strsep(&list, ","))) {
		char *dash = strchr(item, '-');

		if (dash)
			*dash++ = '\0';
		if (kstrtouint(item, 10, &first) ||
		    kstrtouint(dash ?: item, 10, &last) || first > last ||
		    last >= dmirror_nr_ids)
			return -EINVAL;
		for (id = first; id <= last; id++, n++) {
			if (!dmirror_id_type(id) || group_of[id])
				return -EINVAL;
			group_of[id] = group;
		}
	}
	return n >= 2 ? 0 : -EINVAL;
}

/**
 * dmirror_groups_init() - make the groups of the interconnect parameter
 * @group_of: output, the group of each device number, 0 for none
 *
 * Groups are disjoint and of two devices or more, so there are at most
 * half as many as device numbers.
 *
 * Return: 0, -EINVAL (with a message) for a bad parameter, or -ENOMEM.
 */
static int dmirror_groups_init(unsigned int *group_of)
{
	char *spec, *cur, *list;
	unsigned int n = 0;
	int ret = 0;

	dmirror_groups = kcalloc(dmirror_nr_ids / 2 + 1,
				 sizeof(*dmirror_groups), GFP_KERNEL);
	spec = kstrdup(interconnect ?: "", GFP_KERNEL);
	cur = spec;
	if (!dmirror_groups || !spec) {
		ret = -ENOMEM;
		goto out;
	}
	while (!ret && (list = strsep(&cur, ";"))) {
		if (!*list)
			continue;
		dmirror_groups[n].id = n + 1;
		ret = dmirror_group_parse(list, group_of, ++n);
	}
	if (ret)
		pr_err("test_hmm: bad interconnect=\"%s\": groups of two or more existing devices, each in one group\n",
		       interconnect);
out:
	kfree(spec);
	return ret;
}

static int dmirror_params_check(void)
{
	struct hmm_dmirror_settings set = {
		.notifier_model = notifier_model,
		.invalidation = invalidation,
		.flush_latency_ns = flush_latency_ns,
		.leaf_size = leaf_size,
	};

	if (private_devices < DMIRROR_MIN_PRIVATE ||
	    private_devices > DMIRROR_MAX_PRIVATE)
		return -EINVAL;
	if (!device_memory_mb || device_memory_mb % (DMIRROR_CHUNK_SIZE >> 20))
		return -EINVAL;
	return dmirror_settings_check(&set);
}

static int __init dmirror_init(void)
{
	unsigned int *group_of;
	unsigned int id;
	int ret;

	/* The counters mirror the UAPI structure field for field. */
	BUILD_BUG_ON(sizeof(struct hmm_dmirror_stats) % sizeof(__u64));
	BUILD_BUG_ON(MMU_NOTIFY_UNMAP != HMM_DMIRROR_EVENT_UNMAP);
	BUILD_BUG_ON(MMU_NOTIFY_RELEASE != HMM_DMIRROR_EVENT_RELEASE);
	BUILD_BUG_ON(MMU_NOTIFY_EXCLUSIVE != HMM_DMIRROR_EVENT_EXCLUSIVE);

	ret = dmirror_params_check();
	if (ret) {
		pr_err("test_hmm: invalid module parameter\n");
		return ret;
	}

	/* Private devices 2 and up take the numbers after the coherent ones. */
	dmirror_nr_ids = private_devices + DMIRROR_NCOHERENT;
	group_of = kcalloc(dmirror_nr_ids, sizeof(*group_of), GFP_KERNEL);
	if (!group_of)
		return -ENOMEM;
	ret = dmirror_groups_init(group_of);
	if (ret)
		goto free_groups;
	ret = alloc_chrdev_region(&dmirror_devt, 0, dmirror_nr_ids,
				  "HMM_DMIRROR");
	if (ret)
		goto free_groups;
	dmirror_devices = kcalloc(dmirror_nr_ids, sizeof(*dmirror_devices),
				  GFP_KERNEL);
	if (!dmirror_devices) {
		unregister_chrdev_region(dmirror_devt, dmirror_nr_ids);
		ret = -ENOMEM;
		goto free_groups;
	}

	for (id = 0; id < dmirror_nr_ids; id++) {
		enum hmm_dmirror_memory_type type = dmirror_id_type(id);

		if (!type)
			continue;
		ret = dmirror_device_add(id, type, group_of[id] ?
					 &dmirror_groups[group_of[id] - 1] :
					 NULL);
		if (ret) {
			dmirror_devices_remove();
			kfree(group_of);
			return ret;
		}
	}
	kfree(group_of);
	dmirror_fail_init();
	pr_info("HMM test device loaded: %u device numbers\n", dmirror_nr_ids);
	return 0;

free_groups:
	kfree(dmirror_groups);
	kfree(group_of);
	return ret;
}

static void __exit dmirror_exit(void)
{
	dmirror_fail_exit();
	dmirror_devices_remove();
}

module_init(dmirror_init);
module_exit(dmirror_exit);
MODULE_DESCRIPTION("HMM test device: an emulated GPU mirroring process memory");
MODULE_LICENSE("GPL");
