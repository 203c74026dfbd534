/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * User API of the HMM test device, lib/test_hmm.c.
 *
 * Each open of /dev/hmm_dmirrorN gives the caller an emulated device that
 * mirrors the caller's address space. The ioctls below make that device touch
 * the mirrored memory the way a GPU would, so that the kernel's HMM, migration
 * and mmu notifier code paths can be exercised from user space.
 *
 * The structure and ioctl numbers 0x00-0x09 are the same as those of the
 * kernel's own test_hmm driver: programs written for it run unchanged. This is
 * a private interface of a test module, so it is not exported under
 * include/uapi.
 */
#ifndef _LIB_TEST_HMM_UAPI_H
#define _LIB_TEST_HMM_UAPI_H

#include <linux/types.h>
#include <linux/ioctl.h>

/**
 * struct hmm_dmirror_cmd - argument of every dmirror ioctl
 * @addr: (in) page-aligned start of the range, in the mirrored address space
 * @ptr: (in) user buffer the device copies data to or from; for
 *	%HMM_DMIRROR_SNAPSHOT it receives one state byte per page; for
 *	%HMM_DMIRROR_FLAGS it is unused
 * @npages: (in) number of pages in the range, at least one; for
 *	%HMM_DMIRROR_FLAGS the new flags
 * @cpages: (out) number of pages copied, migrated or reported
 * @faults: (out) number of device page faults the request took
 *
 * A range that is empty, not page aligned, wraps around or does not fit in a
 * user address space is refused with -EINVAL. Faults on @addr or @ptr return
 * -EFAULT. Output fields are written back only when the ioctl succeeds.
 */
struct hmm_dmirror_cmd {
	__u64		addr;
	__u64		ptr;
	__u64		npages;
	__u64		cpages;
	__u64		faults;
};

/*
 * HMM_DMIRROR_READ: the device reads @npages pages at @addr into @ptr,
 * faulting them into its page table with hmm_range_fault() when they are not
 * mirrored yet. -EFAULT for memory the CPU could not read either (PROT_NONE,
 * no mapping).
 *
 * HMM_DMIRROR_WRITE: the device writes @ptr to @npages pages at @addr,
 * faulting them in for write. -EPERM when the mapping is read-only.
 *
 * HMM_DMIRROR_MIGRATE_TO_DEV: move the range to the device's memory; then
 * every page of it must be there (moved now or before), and the device reads
 * it into @ptr; @cpages = @npages. -EINVAL for a hole or memory without read
 * access in the range; -ENOENT when a page could not be there (shared or
 * file memory, a pinned page, a page in the coherent memory of a device
 * outside this device's interconnect group); -ENOMEM when the device ran out
 * of memory (what fitted has moved). A device in an interconnect group
 * moves pages in the private memory of another device too: directly from a
 * device of its group, through system memory from any other; a device in no
 * group, as the kernel's own driver, leaves them (-ENOENT).
 *
 * HMM_DMIRROR_MIGRATE_TO_SYS: move the device's pages of the range back to
 * system memory; @cpages counts the pages moved (a THP counts all its pages).
 * -EINVAL for a hole or memory without read access.
 *
 * HMM_DMIRROR_SNAPSHOT: write to @ptr one byte per page describing how the
 * CPU page table maps it right now (enum hmm_dmirror_prot), without faulting.
 *
 * HMM_DMIRROR_EXCLUSIVE: take the pages for exclusive (atomic) device access.
 * HMM_DMIRROR_CHECK_EXCLUSIVE: -EPERM if any page is still mapped for atomic
 * access, i.e. the CPU did not revoke it.
 *
 * HMM_DMIRROR_RELEASE: evict all of the device's memory back to the system,
 * whoever uses it; -EBUSY if a page could not move (its chunk stays).
 *
 * HMM_DMIRROR_FLAGS: set the device flags (HMM_DMIRROR_FLAG_*) to @npages.
 *
 * HMM_DMIRROR_READ_UNLOCKED: like HMM_DMIRROR_READ, but faults with the mmap
 * lock droppable, so that ranges served by userfaultfd can be mirrored.
 *
 * Numbers this driver does not implement return -ENOTTY.
 */
#define HMM_DMIRROR_READ		_IOWR('H', 0x00, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_WRITE		_IOWR('H', 0x01, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_MIGRATE_TO_DEV	_IOWR('H', 0x02, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_MIGRATE_TO_SYS	_IOWR('H', 0x03, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_SNAPSHOT		_IOWR('H', 0x04, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_EXCLUSIVE		_IOWR('H', 0x05, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_CHECK_EXCLUSIVE	_IOWR('H', 0x06, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_RELEASE		_IOWR('H', 0x07, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_FLAGS		_IOWR('H', 0x08, struct hmm_dmirror_cmd)
#define HMM_DMIRROR_READ_UNLOCKED	_IOWR('H', 0x09, struct hmm_dmirror_cmd)

/*
 * Ioctls of this driver only, numbered from 0x40 so that upstream can grow.
 *
 * HMM_DMIRROR_STATS: fill a struct hmm_dmirror_stats for the device of this
 * file. Removals of notifiers this file deferred are finished first, so the
 * notifier counts are exact when no other file of the device is busy. The
 * structure grows at its end: the driver copies out as many bytes as the
 * caller's ioctl number encodes, and zeroes what it has no counter for, so
 * programs built with an older or newer header keep working.
 *
 * HMM_DMIRROR_STATS_RESET: zero the device's counters and the global
 * largest-number-of-flushes-in-flight (the live notifier count and the
 * driver's measure of a wake-up are gauges and stay).
 *
 * HMM_DMIRROR_GET_SETTINGS / HMM_DMIRROR_SET_SETTINGS: read or change the
 * device's struct hmm_dmirror_settings. The invalidation mode and the flush
 * latency apply from the next invalidation; the notifier model and the leaf
 * size apply to mirrors that have not faulted anything yet (including the
 * caller's); the memory limit and the timeslice at once. -EINVAL for an
 * unknown value. The structure grows at its end, as the stats do: GET fills
 * as many bytes as the caller's ioctl number encodes, zeroing what the
 * driver does not know; SET takes a shorter structure with the missing
 * fields 0 (their defaults), and refuses a longer one with -E2BIG unless
 * what the driver does not know is 0.
 *
 * HMM_DMIRROR_INVALIDATIONS: read the driver's record of recent invalidations
 * of the address space the file mirrors (struct hmm_dmirror_inval_query), as
 * all devices together saw them: what each cost and in which order its
 * passes ran. Tests prove the two-pass protocol from it rather than from time, and
 * ignore invalidations they did not cause (reclaim, compaction, NUMA
 * balancing) by their range and event.
 *
 * HMM_DMIRROR_ADVISE: set the placement advice of a range of the address
 * space the file mirrors (struct hmm_dmirror_advice), for this file's
 * mirror only; HMM_DMIRROR_GET_ADVICE reads it back.
 *
 * HMM_DMIRROR_HOLD: a debug hold point (struct hmm_dmirror_hold). A test arms
 * one point of the device for a range of the address space its file mirrors;
 * the next task of that address space to reach the point for the range stops
 * there until the test releases it, so that the test can run something in
 * the window every time rather than when it happens to fall in it. Off
 * unless armed; one hold per device at a time.
 */
#define HMM_DMIRROR_STATS		_IOR('H', 0x40, struct hmm_dmirror_stats)
#define HMM_DMIRROR_STATS_RESET		_IO('H', 0x41)
#define HMM_DMIRROR_GET_SETTINGS	_IOR('H', 0x42, struct hmm_dmirror_settings)
#define HMM_DMIRROR_SET_SETTINGS	_IOW('H', 0x43, struct hmm_dmirror_settings)
#define HMM_DMIRROR_INVALIDATIONS	_IOWR('H', 0x44, struct hmm_dmirror_inval_query)
#define HMM_DMIRROR_HOLD		_IOW('H', 0x45, struct hmm_dmirror_hold)
#define HMM_DMIRROR_ADVISE		_IOW('H', 0x46, struct hmm_dmirror_advice)
#define HMM_DMIRROR_GET_ADVICE		_IOWR('H', 0x47, struct hmm_dmirror_advice)

/*
 * Index of hmm_dmirror_stats.invalidations: the kernel's enum
 * mmu_notifier_event, which says why the CPU page table changed.
 */
#define HMM_DMIRROR_EVENT_UNMAP			0
#define HMM_DMIRROR_EVENT_CLEAR			1
#define HMM_DMIRROR_EVENT_PROTECTION_VMA	2
#define HMM_DMIRROR_EVENT_PROTECTION_PAGE	3
#define HMM_DMIRROR_EVENT_SOFT_DIRTY		4
#define HMM_DMIRROR_EVENT_RELEASE		5
#define HMM_DMIRROR_EVENT_MIGRATE		6
#define HMM_DMIRROR_EVENT_EXCLUSIVE		7
#define HMM_DMIRROR_NR_EVENTS			16

/**
 * struct hmm_dmirror_stats - counters of one device
 * @faults: device page faults (hmm_range_fault() passes that installed PTEs)
 * @invalidations: notifier callbacks by event (HMM_DMIRROR_EVENT_*), not
 *	counting the device's own MMU_NOTIFY_EXCLUSIVE ones, which it ignores
 * @flushes: TLB flushes submitted to the device's flush engine
 * @two_pass_starts: invalidate_start() calls that returned a finish object
 * @two_pass_finishes: invalidate_finish() calls
 * @sync_fallbacks: invalidate_start() calls that found no free finish object
 *	and did the whole invalidation synchronously
 * @nonblock_refused: non-blockable invalidations refused because they
 *	would have had to wait for a flush
 * @flushes_in_flight_max: the largest number of flushes in flight at once
 *	(submitted and not yet waited for), over all devices
 * @notifiers_live: interval notifiers the device's mirrors have now
 * @notifier_inserts: interval notifiers inserted
 * @notifier_removals: interval notifiers removed
 * @fault_retries: device fault passes whose result an invalidation made
 *	stale (mmu_interval_read_retry() said so, or the leaf went away), so
 *	the fault ran again
 * @exclusive_retries: attempts to take a page for exclusive access that
 *	an invalidation of the page made stale, so the attempt ran again
 * @stale_installs: device fault passes that mmu_interval_read_retry() let
 *	install although an invalidation of the range had reached the driver
 *	after mmu_interval_read_begin() returned: the core broke the
 *	collision-retry protocol. The driver warns once, installs nothing and
 *	runs the pass again. Only faults that call mmu_interval_read_begin()
 *	themselves are checked (not %HMM_DMIRROR_READ_UNLOCKED)
 * @finish_pool: finish objects the device has for two-pass invalidations
 * @finish_free: how many of them are free now; @finish_pool when no
 *	two-pass invalidation of the device is between its passes
 * @interconnect_group: the device's interconnect group, numbered from 1 in
 *	the order of the interconnect module parameter; 0 when it is in none.
 *	Devices of one group share a pagemap owner: each maps the others'
 *	device memory directly and migrates it into its own without a stop
 *	in system memory
 * @interconnect_maps: device PTEs installed for a page in the memory of
 *	another device of the group (mapped where it is, not migrated)
 * @interconnect_unmaps: such PTEs cleared by an invalidation or by new
 *	advice (a file closed drops its page table without counting)
 * @migrated_to_dev: pages moved into the device's memory
 * @migrated_from_peer: of those, pages that came straight from the memory
 *	of another device of the group, in one copy
 * @migrate_pulled: pages a migration to the device first faulted into
 *	system memory because it could not take them where they were: in the
 *	memory of a device outside the group (that device migrates them back,
 *	a second copy), or swapped out
 * @migrated_to_sys: pages moved out of the device's memory into system
 *	memory: %HMM_DMIRROR_MIGRATE_TO_SYS, CPU faults, eviction
 * @migrate_on_fault: pages device faults migrated to where the advice of
 *	their range prefers (&struct hmm_dmirror_advice)
 * @fault_fallbacks: device faults whose advice said migrate to the device
 *	but whose page could not be moved there (pinned, busy, no device
 *	memory and nothing to evict): the device mapped it where it was
 * @evictions: blocks of device memory evicted to make room for a migration
 * @pages_evicted: pages those evictions moved back to system memory
 * @timeslice_waits: CPU faults on device pages that waited for the end of
 *	their timeslice (&hmm_dmirror_settings.timeslice_ms) before taking
 *	them back
 * @pmd_pfn_fixups: outputs of hmm_range_fault() for a device-private PMD
 *	whose pfn the driver corrected: Linux 7.3's
 *	hmm_vma_handle_absent_pmd() leaves out the offset of a range that
 *	starts inside the PMD. Stays 0 on a kernel without that bug.
 * @migrate_setup_ns: time the device's migrations spent in
 *	migrate_vma_setup() (collecting and unmapping the sources), in ns
 * @migrate_copy_ns: in the driver's allocation of the destinations and
 *	copy of the data, including @migrate_chunk_ns
 * @migrate_pages_ns: in migrate_vma_pages()
 * @migrate_finalize_ns: in migrate_vma_finalize()
 * @migrate_readback_ns: in the device's read-back of the range that ends a
 *	%HMM_DMIRROR_MIGRATE_TO_DEV
 * @migrate_chunk_ns: in adding chunks of device memory (memremap_pages())
 *	for migrations
 * @flush_sleeps: waits for a TLB flush that slept; a wait for a flush due
 *	sooner than a wake-up from a sleep would take (@flush_wake_ns) only
 *	polls
 * @flush_wake_ns: how late, on average, a task that slept until a given
 *	time runs again, as the driver measures its own sleeps on this
 *	machine, in ns; 0 before the first sleep, at most 1 ms (the longest a
 *	flush waiter polls). Shared by all devices.
 *
 * @finish_pool, @finish_free, @notifiers_live, @interconnect_group and
 * @flush_wake_ns are gauges, the rest counters.
 */
struct hmm_dmirror_stats {
	__u64		faults;
	__u64		invalidations[HMM_DMIRROR_NR_EVENTS];
	__u64		flushes;
	__u64		two_pass_starts;
	__u64		two_pass_finishes;
	__u64		sync_fallbacks;
	__u64		nonblock_refused;
	__u64		flushes_in_flight_max;
	__u64		notifiers_live;
	__u64		notifier_inserts;
	__u64		notifier_removals;
	__u64		fault_retries;
	__u64		exclusive_retries;
	__u64		stale_installs;
	__u64		finish_pool;
	__u64		finish_free;
	__u64		interconnect_group;
	__u64		interconnect_maps;
	__u64		interconnect_unmaps;
	__u64		migrated_to_dev;
	__u64		migrated_from_peer;
	__u64		migrate_pulled;
	__u64		migrated_to_sys;
	__u64		migrate_on_fault;
	__u64		fault_fallbacks;
	__u64		evictions;
	__u64		pages_evicted;
	__u64		timeslice_waits;
	__u64		pmd_pfn_fixups;
	__u64		migrate_setup_ns;
	__u64		migrate_copy_ns;
	__u64		migrate_pages_ns;
	__u64		migrate_finalize_ns;
	__u64		migrate_readback_ns;
	__u64		migrate_chunk_ns;
	__u64		flush_sleeps;
	__u64		flush_wake_ns;
};

/**
 * struct hmm_dmirror_inval_record - one invalidation, as the devices saw it
 * @seq: position in the driver's record, from 1, increasing; records are
 *	kept for the last %HMM_DMIRROR_INVAL_RECORDS invalidations
 * @start: start of the invalidated range
 * @end: end of the invalidated range
 * @event: why (HMM_DMIRROR_EVENT_*)
 * @callbacks: notifier callbacks it made into this driver, over all devices
 *	and mirrors: one per device in the whole model, one per leaf the
 *	range touches in the per-leaf model
 * @flushes: TLB flushes it made devices submit
 * @overlapped: flushes submitted before any was waited for. A device that
 *	waits for its flush before the next device is told (single pass)
 *	gives 1; devices that all start their flush before the first finish
 *	waits (two pass) give one per flushing callback
 * @two_pass_starts: invalidate_start() calls that returned a finish object
 * @two_pass_finishes: invalidate_finish() calls
 * @sync_fallbacks: invalidate_start() calls that found no finish object and
 *	waited for their flush at once
 * @refused: non-blockable callbacks refused because they would have slept
 * @reserved: 0
 */
struct hmm_dmirror_inval_record {
	__u64		seq;
	__u64		start;
	__u64		end;
	__u32		event;
	__u32		callbacks;
	__u32		flushes;
	__u32		overlapped;
	__u32		two_pass_starts;
	__u32		two_pass_finishes;
	__u32		sync_fallbacks;
	__u32		refused;
	__u32		reserved;
};

/* How many invalidations the driver keeps records of, over all processes. */
#define HMM_DMIRROR_INVAL_RECORDS	256

/**
 * struct hmm_dmirror_inval_query - argument of %HMM_DMIRROR_INVALIDATIONS
 * @addr: (in) page-aligned start of the range of interest
 * @npages: (in) its size in pages; 0 to only read @last
 * @since: (in) only records with a larger &hmm_dmirror_inval_record.seq
 * @ptr: (in) user array of @nr_max struct hmm_dmirror_inval_record
 * @nr_max: (in) size of that array
 * @nr: (out) records of the mirrored address space that overlap the range,
 *	oldest first; only the first @nr_max are copied
 * @last: (out) the seq of the newest record, of any process: pass it as
 *	@since of a later query to see only what happened in between
 *
 * A range that is not page aligned, wraps around or does not fit in a user
 * address space is refused with -EINVAL, a bad @ptr with -EFAULT.
 */
struct hmm_dmirror_inval_query {
	__u64		addr;
	__u64		npages;
	__u64		since;
	__u64		ptr;
	__u32		nr_max;
	__u32		nr;
	__u64		last;
};

/**
 * enum hmm_dmirror_hold_op - operations of %HMM_DMIRROR_HOLD
 * @HMM_DMIRROR_HOLD_ARM: arm a hold point for a range
 * @HMM_DMIRROR_HOLD_WAIT: wait until a task is held there
 * @HMM_DMIRROR_HOLD_RELEASE: let it go, or disarm
 *
 * See &struct hmm_dmirror_hold for what each does and its errors.
 */
enum hmm_dmirror_hold_op {
	HMM_DMIRROR_HOLD_ARM = 1,
	HMM_DMIRROR_HOLD_WAIT = 2,
	HMM_DMIRROR_HOLD_RELEASE = 3,
};

/**
 * enum hmm_dmirror_hold_point - where a task can be held
 * @HMM_DMIRROR_HOLD_FAULT: a device fault pass, after hmm_range_fault() has
 *	read the CPU page table and dropped the mmap lock, before the driver
 *	takes its page-table lock to ask mmu_interval_read_retry() whether the
 *	result may be installed. An invalidation run meanwhile must make the
 *	pass run again (&hmm_dmirror_stats.fault_retries).
 * @HMM_DMIRROR_HOLD_INVALIDATE: an invalidation, in the driver's callback
 *	after it published the new notifier sequence and cleared the device
 *	PTEs, and before the core changes the CPU page table: single pass,
 *	before invalidate() returns; two pass, before invalidate_start()
 *	returns, so before any invalidate_finish(). A device fault that begins
 *	meanwhile must wait in mmu_interval_read_begin(). Only invalidations
 *	that may block are held, and none of a task that is exiting.
 */
enum hmm_dmirror_hold_point {
	HMM_DMIRROR_HOLD_FAULT = 1,
	HMM_DMIRROR_HOLD_INVALIDATE = 2,
};

/**
 * struct hmm_dmirror_hold - argument of %HMM_DMIRROR_HOLD
 * @op: (in) enum hmm_dmirror_hold_op
 * @point: (in) enum hmm_dmirror_hold_point, for %HMM_DMIRROR_HOLD_ARM
 * @addr: (in) page-aligned start of the range, for %HMM_DMIRROR_HOLD_ARM
 * @npages: (in) its size in pages, for %HMM_DMIRROR_HOLD_ARM
 *
 * %HMM_DMIRROR_HOLD_ARM: hold the next thread of the mirrored process that
 * reaches @point for a range overlapping [@addr, @addr + @npages pages).
 * -EBUSY when a hold of the device is armed already, -EINVAL for a bad @op,
 * @point or range.
 *
 * %HMM_DMIRROR_HOLD_WAIT: wait until a task is held at the point armed with
 * this file. -ENOENT when the file has no hold armed or holding (a held task
 * that got a fatal signal lets go on its own), -EINTR on a fatal signal.
 *
 * %HMM_DMIRROR_HOLD_RELEASE: let the held task go on, or disarm the hold if
 * no task reached it yet. -ENOENT when the file has no hold. Closing the file
 * releases its hold.
 *
 * The task that arms a hold must not reach the point itself.
 */
struct hmm_dmirror_hold {
	__u32		op;
	__u32		point;
	__u64		addr;
	__u64		npages;
};

/**
 * enum hmm_dmirror_notifier_model - how a device subscribes to invalidations
 * of the address space it mirrors
 * @HMM_DMIRROR_NOTIFIER_WHOLE: one interval notifier per mirror over the
 *	whole address space, as the kernel's own test driver does
 * @HMM_DMIRROR_NOTIFIER_PER_LEAF: one per leaf of the device page table,
 *	inserted when the device first faults in the leaf's range and removed
 *	once an invalidation empties it, as GPU drivers do
 */
enum hmm_dmirror_notifier_model {
	HMM_DMIRROR_NOTIFIER_WHOLE = 0,
	HMM_DMIRROR_NOTIFIER_PER_LEAF = 1,
};

/**
 * enum hmm_dmirror_invalidation - how a device takes an invalidation
 * @HMM_DMIRROR_SINGLE_PASS: &mmu_interval_notifier_ops.invalidate clears the
 *	device PTEs, flushes the device TLB and waits for the flush
 * @HMM_DMIRROR_TWO_PASS: invalidate_start() clears and submits the flush,
 *	invalidate_finish() waits for it (Linux 7.1 and later), so that the
 *	flushes of several devices overlap
 */
enum hmm_dmirror_invalidation {
	HMM_DMIRROR_SINGLE_PASS = 0,
	HMM_DMIRROR_TWO_PASS = 1,
};

/* The next invalidate_start() finds no finish object, once. */
#define HMM_DMIRROR_SETTING_FAIL_NEXT_FINISH	0x1U

/**
 * struct hmm_dmirror_settings - behaviour of one device
 * @notifier_model: enum hmm_dmirror_notifier_model
 * @invalidation: enum hmm_dmirror_invalidation
 * @flush_latency_ns: how long the emulated TLB flush takes, 0 to 100 ms
 * @leaf_size: bytes covered by one leaf of the device page table: a power
 *	of two from PAGE_SIZE to 1 GiB
 * @flags: HMM_DMIRROR_SETTING_* (write only: every SET arms or disarms the
 *	one-shot; reads return 0)
 * @reserved: must be 0
 * @memory_limit_mb: the most device memory the device hands out, in MiB;
 *	0 for all it has. A migration that needs more evicts the device memory
 *	least recently used (by any mirror of the device) to system memory, a
 *	2 MiB block at a time, but never what the same migration brought in
 *	(a device access under advice migrates a granule at a time, each a
 *	migration of its own); it fails with -ENOMEM only when nothing is left
 *	to evict
 * @timeslice_ms: 0 to %HMM_DMIRROR_MAX_TIMESLICE_MS: how long pages stay in
 *	device memory after a migration brought them there (per 2 MiB block)
 *	before a CPU fault may take them back; a CPU fault before then waits
 *	for the end of the slice, so that a range the CPU and the device both
 *	touch does not bounce between them with every access
 */
struct hmm_dmirror_settings {
	__u32		notifier_model;
	__u32		invalidation;
	__u64		flush_latency_ns;
	__u64		leaf_size;
	__u32		flags;
	__u32		reserved;
	__u32		memory_limit_mb;
	__u32		timeslice_ms;
};

#define HMM_DMIRROR_MAX_TIMESLICE_MS	1000

/* The next device-memory allocation of a migration fails, once. */
#define HMM_DMIRROR_FLAG_FAIL_ALLOC	0x1ULL

/**
 * enum hmm_dmirror_prot - per-page state reported by %HMM_DMIRROR_SNAPSHOT
 * @HMM_DMIRROR_PROT_ERROR: the page cannot be accessed (no VMA, PROT_NONE,
 *	special mapping, poisoned)
 * @HMM_DMIRROR_PROT_NONE: not populated (reading would fault)
 * @HMM_DMIRROR_PROT_READ: mapped read-only
 * @HMM_DMIRROR_PROT_WRITE: mapped writable
 * @HMM_DMIRROR_PROT_PMD: or-ed in when a PMD maps the whole huge page
 * @HMM_DMIRROR_PROT_PUD: or-ed in when a PUD maps the whole huge page
 * @HMM_DMIRROR_PROT_ZERO: the shared 4 KiB zero page (read-only); the huge
 *	zero page reads as READ | PMD
 * @HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL: device-private page of this device
 * @HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE: device-private page of another device
 * @HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL: device-coherent page of this device
 * @HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE: device-coherent page of another device
 * @HMM_DMIRROR_PROT_INTERCONNECT: or-ed into a REMOTE value when the other
 *	device is in this device's interconnect group, so that this device
 *	maps the page where it is (&hmm_dmirror_stats.interconnect_group).
 *	Without a group, a device sees no other device's private pages: the
 *	core moves them to system memory for it. %HMM_DMIRROR_PROT_ERROR has
 *	every bit set: compare with it first
 *
 * READ or WRITE is or-ed into the ZERO and device values, and PMD or PUD into
 * any mapped value.
 */
enum hmm_dmirror_prot {
	HMM_DMIRROR_PROT_ERROR			= 0xFF,
	HMM_DMIRROR_PROT_NONE			= 0x00,
	HMM_DMIRROR_PROT_READ			= 0x01,
	HMM_DMIRROR_PROT_WRITE			= 0x02,
	HMM_DMIRROR_PROT_PMD			= 0x04,
	HMM_DMIRROR_PROT_PUD			= 0x08,
	HMM_DMIRROR_PROT_ZERO			= 0x10,
	HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL	= 0x20,
	HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE	= 0x30,
	HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL	= 0x40,
	HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE	= 0x50,
	HMM_DMIRROR_PROT_INTERCONNECT		= 0x80,
};

/**
 * enum hmm_dmirror_location - where advice prefers a range's pages
 * @HMM_DMIRROR_LOC_NONE: no advice: %HMM_DMIRROR_ADVISE with it clears the
 *	advice of the range, and device faults there map pages where they are
 * @HMM_DMIRROR_LOC_SYSTEM: system memory
 * @HMM_DMIRROR_LOC_DEVICE: the device's memory, evicting other device memory
 *	to make room if it must
 * @HMM_DMIRROR_LOC_AUTO: the device decides: its memory while it has free
 *	memory (no eviction), else system memory where the page is
 */
enum hmm_dmirror_location {
	HMM_DMIRROR_LOC_NONE = 0,
	HMM_DMIRROR_LOC_SYSTEM = 1,
	HMM_DMIRROR_LOC_DEVICE = 2,
	HMM_DMIRROR_LOC_AUTO = 3,
};

/**
 * enum hmm_dmirror_fault_policy - what a device fault does in an advised range
 * @HMM_DMIRROR_FAULT_MIGRATE: migrate the faulting granule to the preferred
 *	location first, then map it; map it where it is if it cannot move
 *	(&hmm_dmirror_stats.fault_fallbacks)
 * @HMM_DMIRROR_FAULT_MAP: map the page where it is, whatever the location
 *	(remote access: a peer's memory over the interconnect, system memory
 *	over the bus)
 */
enum hmm_dmirror_fault_policy {
	HMM_DMIRROR_FAULT_MIGRATE = 0,
	HMM_DMIRROR_FAULT_MAP = 1,
};

/**
 * struct hmm_dmirror_advice - argument of %HMM_DMIRROR_ADVISE and
 * %HMM_DMIRROR_GET_ADVICE
 * @addr: ADVISE: (in) page-aligned start of the range; GET_ADVICE: (in) an
 *	address, (out) the start of the advised range holding it
 * @npages: ADVISE: (in) size of the range in pages; GET_ADVICE: (out) size
 *	of the advised range
 * @location: enum hmm_dmirror_location
 * @policy: enum hmm_dmirror_fault_policy
 * @granule_shift: log2 of the bytes a migrating device fault moves at once,
 *	aligned: 12 (4 KiB) or 21 (2 MiB, a huge page where the memory has
 *	one); 0 with %HMM_DMIRROR_LOC_NONE
 * @reserved: must be 0
 *
 * Advice belongs to the mirror of the file that gave it, as GPU drivers
 * keep it per VM. Advice over a range replaces whatever advice overlapped it
 * (the rest of an overlapped range keeps its advice); it lasts until it is
 * replaced or cleared, until the range is unmapped (munmap(), or the source
 * of an mremap()), or until the file is closed. The range need not be
 * mapped.
 *
 * ADVISE returns -EINVAL for an empty, unaligned or wrapping range or one
 * beyond the user address space, an unknown location, policy or granule, a
 * nonzero @reserved, or %HMM_DMIRROR_LOC_NONE with a policy or granule;
 * -EFAULT for a bad pointer, -ENOMEM. GET_ADVICE returns -ENOENT when no
 * advice covers @addr.
 */
struct hmm_dmirror_advice {
	__u64		addr;
	__u64		npages;
	__u32		location;
	__u32		policy;
	__u32		granule_shift;
	__u32		reserved;
};

/**
 * enum hmm_dmirror_memory_type - kind of memory a device owns
 * @HMM_DMIRROR_MEMORY_DEVICE_PRIVATE: ZONE_DEVICE private memory, which the
 *	CPU cannot address (devices 0 and 1)
 * @HMM_DMIRROR_MEMORY_DEVICE_COHERENT: ZONE_DEVICE coherent memory, which the
 *	CPU can address (devices 2 and 3)
 *
 * 0 is not used, so that an unset field is caught.
 */
enum hmm_dmirror_memory_type {
	HMM_DMIRROR_MEMORY_DEVICE_PRIVATE = 1,
	HMM_DMIRROR_MEMORY_DEVICE_COHERENT,
};

#endif /* _LIB_TEST_HMM_UAPI_H */
