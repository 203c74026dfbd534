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
 * next to the code.
 *
 * Devices /dev/hmm_dmirror0 and 1 own device-private memory, 2 and 3
 * device-coherent memory (only when the module is given the physical ranges
 * through spm_addr_dev0 and spm_addr_dev1), as in the kernel's own driver.
 *
 * Every open() creates a &struct dmirror: the caller's mm as seen by the
 * device. It holds
 *
 * - an emulated device page table: a two-level table whose leaves cover
 *   %DMIRROR_LEAF_SIZE of address space each (a last-level GPU page table);
 *   a device PTE records the pfn of the page it maps and whether the device
 *   may write it;
 * - an mmu interval notifier over the whole address space that clears device
 *   PTEs whenever the CPU page table changes, so the device never reaches a
 *   page the CPU has unmapped, moved or write-protected.
 *
 * The ioctls make the device access memory through its page table. A missing
 * or read-only PTE is a device page fault: the driver asks the CPU page table
 * for the pages with hmm_range_fault() and installs the result, following the
 * collision-retry protocol described below.
 */

/**
 * DOC: Locking
 *
 * &dmirror.pt_lock (a mutex) is the driver lock of the HMM documentation:
 *
 * - it protects the contents of the device PTEs;
 * - the invalidate callback takes it to clear PTEs and to advance the
 *   notifier sequence (mmu_interval_set_seq());
 * - the fault path takes it to check mmu_interval_read_retry() and, only if
 *   no invalidation raced with hmm_range_fault(), to install PTEs.
 *
 * Because the invalidate callback runs from reclaim and under the mmap lock,
 * nothing may be done under pt_lock that can enter reclaim, take the mmap
 * lock or fault on user memory: no GFP_KERNEL allocation, no copy_to_user()
 * or copy_from_user(). Leaves of the page table are therefore allocated
 * before pt_lock is taken, and data goes through a kernel bounce buffer. At
 * open() lockdep is told that pt_lock nests inside reclaim so that a
 * violation is reported at once rather than when reclaim happens to hit.
 *
 * The table of leaves (an xarray) has its own internal lock. A leaf is added
 * without pt_lock (an all-invalid leaf maps nothing) and freed only when the
 * file is released, when no ioctl and no notifier can run any more; readers
 * of leaves under pt_lock may thus use them without further references.
 *
 * Lock order: mmap_lock -> (released) ; pt_lock is innermost.
 */

#include <linux/cdev.h>
#include <linux/device.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/hmm.h>
#include <linux/init.h>
#include <linux/kernel.h>
#include <linux/memremap.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/xarray.h>

#include "test_hmm_uapi.h"

#define DMIRROR_NDEVICES		4
#define DMIRROR_NPRIVATE		2

/* Pages one device fault, copy or snapshot step handles at a time. */
#define DMIRROR_BATCH_PAGES		64UL

/* How long a fault keeps retrying while invalidations collide with it. */
#define DMIRROR_FAULT_TIMEOUT_MS	HMM_RANGE_DEFAULT_TIMEOUT

#define DMIRROR_LEAF_SHIFT		PMD_SHIFT
#define DMIRROR_LEAF_SIZE		BIT(DMIRROR_LEAF_SHIFT)
#define DMIRROR_LEAF_PTES		(DMIRROR_LEAF_SIZE >> PAGE_SHIFT)

/* A device PTE: pfn above DMIRROR_PTE_PFN_SHIFT, flags below. */
#define DMIRROR_PTE_VALID		BIT_ULL(0)
#define DMIRROR_PTE_WRITE		BIT_ULL(1)
#define DMIRROR_PTE_PFN_SHIFT		8

static unsigned long spm_addr_dev0;
module_param(spm_addr_dev0, ulong, 0444);
MODULE_PARM_DESC(spm_addr_dev0,
		 "Physical address of device 2's coherent memory (256 MiB, reserved with memmap=)");

static unsigned long spm_addr_dev1;
module_param(spm_addr_dev1, ulong, 0444);
MODULE_PARM_DESC(spm_addr_dev1,
		 "Physical address of device 3's coherent memory (256 MiB, reserved with memmap=)");

/**
 * struct dmirror_device - one emulated device, /dev/hmm_dmirrorN
 * @cdev: character device
 * @dev: device model object, named hmm_dmirrorN
 * @id: N
 * @mem_type: kind of ZONE_DEVICE memory the device owns
 *
 * The address of this structure is the device's owner cookie: it is passed
 * as &hmm_range.dev_private_owner and set in its pagemaps, so that the
 * device's own memory can be told from another device's.
 */
struct dmirror_device {
	struct cdev cdev;
	struct device dev;
	unsigned int id;
	enum hmm_dmirror_memory_type mem_type;
};

static struct dmirror_device dmirror_devices[DMIRROR_NDEVICES];
static dev_t dmirror_devt;

/**
 * struct dmirror_pt_leaf - last level of the emulated device page table
 * @pte: one device PTE per page of the %DMIRROR_LEAF_SIZE range
 * @nr_valid: number of PTEs with %DMIRROR_PTE_VALID set
 */
struct dmirror_pt_leaf {
	u64 pte[DMIRROR_LEAF_PTES];
	unsigned int nr_valid;
};

/**
 * struct dmirror - an address space mirrored by a device (one open file)
 * @mdevice: the device
 * @notifier: keeps the device PTEs coherent with the CPU page table
 * @pt_lock: protects the device PTEs; see "Locking"
 * @leaves: &struct dmirror_pt_leaf indexed by address >> DMIRROR_LEAF_SHIFT
 */
struct dmirror {
	struct dmirror_device *mdevice;
	struct mmu_interval_notifier notifier;
	struct mutex pt_lock;	/* device PTEs, notifier sequence */
	struct xarray leaves;
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

static unsigned long dmirror_pte_index(unsigned long addr)
{
	return (addr & (DMIRROR_LEAF_SIZE - 1)) >> PAGE_SHIFT;
}

static struct dmirror_pt_leaf *dmirror_leaf_lookup(struct dmirror *dmirror,
						   unsigned long addr)
{
	return xa_load(&dmirror->leaves, addr >> DMIRROR_LEAF_SHIFT);
}

/**
 * dmirror_leaves_prepare() - make sure leaves exist for a range
 * @dmirror: mirror
 * @start: first address
 * @end: end address
 *
 * Allocates the missing leaves, with GFP_KERNEL, so it must be called
 * without pt_lock. A concurrent caller may insert the same leaf first; the
 * loser frees its copy.
 *
 * Return: 0 or -ENOMEM.
 */
static int dmirror_leaves_prepare(struct dmirror *dmirror, unsigned long start,
				  unsigned long end)
{
	unsigned long idx;

	for (idx = start >> DMIRROR_LEAF_SHIFT;
	     idx <= (end - 1) >> DMIRROR_LEAF_SHIFT; idx++) {
		struct dmirror_pt_leaf *leaf;
		int ret;

		if (xa_load(&dmirror->leaves, idx))
			continue;
		leaf = kzalloc_obj(*leaf);
		if (!leaf)
			return -ENOMEM;
		ret = xa_insert(&dmirror->leaves, idx, leaf, GFP_KERNEL);
		if (ret) {
			kfree(leaf);
			if (ret != -EBUSY)
				return ret;
		}
	}
	return 0;
}

static void dmirror_leaves_free(struct dmirror *dmirror)
{
	struct dmirror_pt_leaf *leaf;
	unsigned long idx;

	xa_for_each(&dmirror->leaves, idx, leaf)
		kfree(leaf);
	xa_destroy(&dmirror->leaves);
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
	struct dmirror_pt_leaf *leaf;

	lockdep_assert_held(&dmirror->pt_lock);
	leaf = dmirror_leaf_lookup(dmirror, addr);
	return leaf ? leaf->pte[dmirror_pte_index(addr)] : 0;
}

static void dmirror_pte_set(struct dmirror_pt_leaf *leaf, unsigned long addr,
			    u64 pte)
{
	u64 *slot = &leaf->pte[dmirror_pte_index(addr)];

	leaf->nr_valid -= !!(*slot & DMIRROR_PTE_VALID);
	leaf->nr_valid += !!(pte & DMIRROR_PTE_VALID);
	*slot = pte;
}

/**
 * dmirror_pt_install() - map the result of hmm_range_fault() in the device
 * @dmirror: mirror
 * @range: a range hmm_range_fault() filled, not invalidated since
 *
 * The leaves must have been prepared with dmirror_leaves_prepare().
 *
 * Context: pt_lock held, after mmu_interval_read_retry() returned false.
 */
static void dmirror_pt_install(struct dmirror *dmirror,
			       const struct hmm_range *range)
{
	unsigned long addr;
	unsigned long i;

	lockdep_assert_held(&dmirror->pt_lock);
	for (addr = range->start, i = 0; addr < range->end;
	     addr += PAGE_SIZE, i++) {
		unsigned long hpfn = range->hmm_pfns[i];
		struct dmirror_pt_leaf *leaf;
		u64 pte;

		if (WARN_ON_ONCE(!(hpfn & HMM_PFN_VALID)))
			continue;
		leaf = dmirror_leaf_lookup(dmirror, addr);
		if (WARN_ON_ONCE(!leaf))
			continue;
		pte = ((u64)(hpfn & ~HMM_PFN_FLAGS) << DMIRROR_PTE_PFN_SHIFT) |
		      DMIRROR_PTE_VALID;
		if (hpfn & HMM_PFN_WRITE)
			pte |= DMIRROR_PTE_WRITE;
		dmirror_pte_set(leaf, addr, pte);
	}
}

/**
 * dmirror_pt_clear() - unmap a range from the device
 * @dmirror: mirror
 * @start: first address
 * @end: end address
 *
 * Only leaves that exist are visited, so clearing the whole address space
 * (as exit_mmap() does) costs as much as the mirror is large.
 *
 * Context: pt_lock held.
 */
static void dmirror_pt_clear(struct dmirror *dmirror, unsigned long start,
			     unsigned long end)
{
	struct dmirror_pt_leaf *leaf;
	unsigned long idx;

	lockdep_assert_held(&dmirror->pt_lock);
	xa_for_each_range(&dmirror->leaves, idx, leaf,
			  start >> DMIRROR_LEAF_SHIFT,
			  (end - 1) >> DMIRROR_LEAF_SHIFT) {
		unsigned long leaf_start = idx << DMIRROR_LEAF_SHIFT;
		unsigned long addr = max(start, leaf_start);
		unsigned long last = min(end - 1,
					 leaf_start + DMIRROR_LEAF_SIZE - 1);

		if (!leaf->nr_valid)
			continue;
		for (; addr <= last; addr += PAGE_SIZE)
			dmirror_pte_set(leaf, addr, 0);
	}
}

/**
 * dmirror_invalidate() - the CPU page table changed under a mirrored range
 * @mni: the mirror's notifier
 * @range: what changes, and why
 * @cur_seq: the sequence to publish
 *
 * Clears the device PTEs of the range. After this returns the device no
 * longer reaches the old pages, so the core may free or move them.
 *
 * Return: false if the range is not blockable and pt_lock is contended.
 */
static bool dmirror_invalidate(struct mmu_interval_notifier *mni,
			       const struct mmu_notifier_range *range,
			       unsigned long cur_seq)
{
	struct dmirror *dmirror = container_of(mni, struct dmirror, notifier);

	if (mmu_notifier_range_blockable(range))
		mutex_lock(&dmirror->pt_lock);
	else if (!mutex_trylock(&dmirror->pt_lock))
		return false;

	mmu_interval_set_seq(mni, cur_seq);
	dmirror_pt_clear(dmirror, range->start, range->end);

	mutex_unlock(&dmirror->pt_lock);
	return true;
}

static const struct mmu_interval_notifier_ops dmirror_notifier_ops = {
	.invalidate = dmirror_invalidate,
};

/**
 * dmirror_range_fault_locked() - one hmm_range_fault() pass under mmap lock
 * @range: range to fault; its notifier sequence is refreshed
 *
 * Return: as hmm_range_fault(), or -EINTR on a fatal signal.
 */
static int dmirror_range_fault_locked(struct hmm_range *range)
{
	struct mm_struct *mm = range->notifier->mm;
	int ret;

	range->notifier_seq = mmu_interval_read_begin(range->notifier);
	ret = mmap_read_lock_killable(mm);
	if (ret)
		return ret;
	ret = hmm_range_fault(range);
	mmap_read_unlock(mm);
	return ret;
}

/**
 * dmirror_fault_batch() - fault one batch of pages into the device
 * @dmirror: mirror
 * @range: the batch; start, end, flags and pfn array set by the caller
 * @unlocked: let the CPU fault handler drop the mmap lock (userfaultfd)
 *
 * The collision-retry loop of the HMM documentation: read the CPU page
 * table, then take pt_lock and install the result only if no invalidation
 * ran since mmu_interval_read_begin(). Gives up with -EBUSY if invalidations
 * keep colliding for %DMIRROR_FAULT_TIMEOUT_MS.
 *
 * Return: 0, or the error of hmm_range_fault().
 */
static int dmirror_fault_batch(struct dmirror *dmirror,
			       struct hmm_range *range, bool unlocked)
{
	unsigned long timeout = msecs_to_jiffies(DMIRROR_FAULT_TIMEOUT_MS);
	unsigned long deadline = jiffies + timeout;
	int ret;

	for (;;) {
		if (unlocked)
			ret = hmm_range_fault_unlocked_timeout(range, timeout);
		else
			ret = dmirror_range_fault_locked(range);
		if (ret && ret != -EBUSY)
			return ret;
		if (!ret) {
			mutex_lock(&dmirror->pt_lock);
			if (!mmu_interval_read_retry(range->notifier,
						     range->notifier_seq))
				break;
			mutex_unlock(&dmirror->pt_lock);
		}
		if (time_after(jiffies, deadline))
			return -EBUSY;
		if (fatal_signal_pending(current))
			return -EINTR;
	}
	dmirror_pt_install(dmirror, range);
	mutex_unlock(&dmirror->pt_lock);
	return 0;
}

/**
 * dmirror_fault() - handle a device page fault
 * @dmirror: mirror
 * @start: faulting address
 * @end: end of the access; the device prefetches up to here
 * @write: the device needs write access
 * @unlocked: see dmirror_fault_batch()
 *
 * Context: process context, mm of @dmirror held with mmget().
 * Return: 0, -EFAULT (no access possible), -EPERM (write to a read-only
 * mapping), -ENOMEM, -EBUSY or -EINTR.
 */
static int dmirror_fault(struct dmirror *dmirror, unsigned long start,
			 unsigned long end, bool write, bool unlocked)
{
	unsigned long pfns[DMIRROR_BATCH_PAGES];
	struct hmm_range range = {
		.notifier = &dmirror->notifier,
		.hmm_pfns = pfns,
		.default_flags = HMM_PFN_REQ_FAULT |
				 (write ? HMM_PFN_REQ_WRITE : 0),
		.dev_private_owner = dmirror->mdevice,
	};
	unsigned long addr;
	int ret;

	for (addr = start; addr < end; addr = range.end) {
		range.start = addr;
		range.end = min(end, addr + DMIRROR_BATCH_PAGES * PAGE_SIZE);
		ret = dmirror_leaves_prepare(dmirror, range.start, range.end);
		if (ret)
			return ret;
		ret = dmirror_fault_batch(dmirror, &range, unlocked);
		if (ret)
			return ret;
	}
	return 0;
}

/**
 * dmirror_copy_mapped() - device access through the device page table
 * @dmirror: mirror
 * @start: first address
 * @end: end address
 * @bounce: kernel buffer holding the data of [@start, @end)
 * @write: copy @bounce to memory rather than memory to @bounce
 *
 * Stops at the first page the device cannot access without a fault.
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
		struct page *page;

		if (!(pte & DMIRROR_PTE_VALID))
			break;
		if (write && !(pte & DMIRROR_PTE_WRITE))
			break;
		page = pfn_to_page(pte >> DMIRROR_PTE_PFN_SHIFT);
		if (write)
			memcpy_to_page(page, 0, bounce, PAGE_SIZE);
		else
			memcpy_from_page(bounce, page, 0, PAGE_SIZE);
	}
	return (addr - start) >> PAGE_SHIFT;
}

/**
 * dmirror_access_batch() - device read or write of one batch
 * @dmirror: mirror
 * @start: first address of the batch
 * @end: end of the batch
 * @req_end: end of the whole request, the device fault prefetch window
 * @bounce: data of the batch
 * @write: direction
 * @unlocked: see dmirror_fault_batch()
 * @faults: incremented for every device fault taken
 *
 * Return: 0 or the error of dmirror_fault().
 */
static int dmirror_access_batch(struct dmirror *dmirror, unsigned long start,
				unsigned long end, unsigned long req_end,
				char *bounce, bool write, bool unlocked,
				u64 *faults)
{
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
		ret = dmirror_fault(dmirror, addr, req_end, write, unlocked);
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
 * @write: direction
 * @unlocked: see dmirror_fault_batch()
 *
 * Data moves through a bounded bounce buffer one batch at a time, because
 * user memory cannot be touched under pt_lock.
 *
 * Return: 0, -EFAULT when @cmd->ptr cannot be accessed, or an error of
 * dmirror_fault().
 */
static int dmirror_access(struct dmirror *dmirror, struct hmm_dmirror_cmd *cmd,
			  const struct dmirror_range *range, bool write,
			  bool unlocked)
{
	char __user *uptr = u64_to_user_ptr(cmd->ptr);
	unsigned long addr, next;
	char *bounce;
	int ret = 0;

	bounce = kvmalloc(DMIRROR_BATCH_PAGES * PAGE_SIZE, GFP_KERNEL);
	if (!bounce)
		return -ENOMEM;

	for (addr = range->start; addr < range->end; addr = next) {
		unsigned long len;

		next = min(range->end, addr + DMIRROR_BATCH_PAGES * PAGE_SIZE);
		len = next - addr;
		if (write && copy_from_user(bounce, uptr, len)) {
			ret = -EFAULT;
			break;
		}
		ret = dmirror_access_batch(dmirror, addr, next, range->end,
					   bounce, write, unlocked,
					   &cmd->faults);
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

/**
 * struct dmirror_snapshot - a temporary notifier over a snapshot range
 * @notifier: detects CPU page table changes during the snapshot
 * @dmirror: mirror whose pt_lock serialises the sequence
 *
 * A snapshot reads the CPU page table without faulting and without mapping
 * anything in the device, so it tracks collisions with a notifier of its
 * own rather than the mirror's.
 */
struct dmirror_snapshot {
	struct mmu_interval_notifier notifier;
	struct dmirror *dmirror;
};

static bool dmirror_snapshot_invalidate(struct mmu_interval_notifier *mni,
					const struct mmu_notifier_range *range,
					unsigned long cur_seq)
{
	struct dmirror_snapshot *snap =
		container_of(mni, struct dmirror_snapshot, notifier);
	struct dmirror *dmirror = snap->dmirror;

	if (mmu_notifier_range_blockable(range))
		mutex_lock(&dmirror->pt_lock);
	else if (!mutex_trylock(&dmirror->pt_lock))
		return false;
	mmu_interval_set_seq(mni, cur_seq);
	mutex_unlock(&dmirror->pt_lock);
	return true;
}

static const struct mmu_interval_notifier_ops dmirror_snapshot_ops = {
	.invalidate = dmirror_snapshot_invalidate,
};

static bool dmirror_page_is_ours(struct dmirror *dmirror, struct page *page)
{
	return page_pgmap(page)->owner == dmirror->mdevice;
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
		state = dmirror_page_is_ours(dmirror, page) ?
			HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL :
			HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE;
	else if (is_device_coherent_page(page))
		state = dmirror_page_is_ours(dmirror, page) ?
			HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL :
			HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE;
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
 * dmirror_snapshot_batch() - snapshot the CPU page table of one batch
 * @snap: snapshot notifier covering the batch
 * @range: the batch, with default_flags 0 so that nothing is faulted
 * @states: one output byte per page
 *
 * Return: 0, -EBUSY if invalidations kept colliding, -EINTR.
 */
static int dmirror_snapshot_batch(struct dmirror_snapshot *snap,
				  struct hmm_range *range, u8 *states)
{
	struct dmirror *dmirror = snap->dmirror;
	unsigned long deadline = jiffies +
				 msecs_to_jiffies(DMIRROR_FAULT_TIMEOUT_MS);
	unsigned long i, npages;
	int ret;

	for (;;) {
		ret = dmirror_range_fault_locked(range);
		if (ret && ret != -EBUSY)
			return ret;
		if (!ret) {
			mutex_lock(&dmirror->pt_lock);
			if (!mmu_interval_read_retry(range->notifier,
						     range->notifier_seq))
				break;
			mutex_unlock(&dmirror->pt_lock);
		}
		if (time_after(jiffies, deadline))
			return -EBUSY;
		if (fatal_signal_pending(current))
			return -EINTR;
	}
	npages = (range->end - range->start) >> PAGE_SHIFT;
	for (i = 0; i < npages; i++)
		states[i] = dmirror_snapshot_entry(dmirror, range->hmm_pfns[i]);
	mutex_unlock(&dmirror->pt_lock);
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
	u8 __user *uptr = u64_to_user_ptr(cmd->ptr);
	struct dmirror_snapshot snap = { .dmirror = dmirror };
	unsigned long pfns[DMIRROR_BATCH_PAGES];
	u8 states[DMIRROR_BATCH_PAGES];
	struct hmm_range hrange = {
		.notifier = &snap.notifier,
		.hmm_pfns = pfns,
		.dev_private_owner = dmirror->mdevice,
	};
	unsigned long addr;
	int ret;

	ret = mmu_interval_notifier_insert(&snap.notifier, dmirror->notifier.mm,
					   range->start,
					   range->end - range->start,
					   &dmirror_snapshot_ops);
	if (ret)
		return ret;

	for (addr = range->start; addr < range->end; addr = hrange.end) {
		unsigned long n;

		hrange.start = addr;
		hrange.end = min(range->end,
				 addr + DMIRROR_BATCH_PAGES * PAGE_SIZE);
		n = (hrange.end - hrange.start) >> PAGE_SHIFT;
		ret = dmirror_snapshot_batch(&snap, &hrange, states);
		if (ret)
			break;
		if (copy_to_user(uptr, states, n)) {
			ret = -EFAULT;
			break;
		}
		uptr += n;
		cmd->cpages += n;
	}
	mmu_interval_notifier_remove(&snap.notifier);
	return ret;
}

/**
 * dmirror_cmd_range() - validate the range of a command
 * @cmd: the command
 * @range: output
 *
 * Return: 0, or -EINVAL for an empty, unaligned or wrapping range or one
 * that does not fit in a user address space.
 */
static int dmirror_cmd_range(const struct hmm_dmirror_cmd *cmd,
			     struct dmirror_range *range)
{
	if (!cmd->npages || !PAGE_ALIGNED(cmd->addr))
		return -EINVAL;
	if (cmd->npages > (TASK_SIZE_MAX >> PAGE_SHIFT))
		return -EINVAL;
	range->start = cmd->addr;
	range->end = cmd->addr + (cmd->npages << PAGE_SHIFT);
	if (range->end <= range->start || range->end > TASK_SIZE_MAX)
		return -EINVAL;
	return 0;
}

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
	struct mm_struct *mm = dmirror->notifier.mm;
	struct dmirror_range range;
	long ret;

	ret = dmirror_cmd_range(cmd, &range);
	if (ret)
		return ret;
	if (!mmget_not_zero(mm))
		return -EINVAL;

	switch (command) {
	case HMM_DMIRROR_READ:
		ret = dmirror_access(dmirror, cmd, &range, false, false);
		break;
	case HMM_DMIRROR_WRITE:
		ret = dmirror_access(dmirror, cmd, &range, true, false);
		break;
	case HMM_DMIRROR_READ_UNLOCKED:
		ret = dmirror_access(dmirror, cmd, &range, false, true);
		break;
	case HMM_DMIRROR_SNAPSHOT:
		ret = dmirror_snapshot(dmirror, cmd, &range);
		break;
	default:
		ret = -ENOTTY;
		break;
	}
	mmput(mm);
	return ret;
}

static long dmirror_fops_unlocked_ioctl(struct file *filp, unsigned int command,
					unsigned long arg)
{
	struct hmm_dmirror_cmd __user *ucmd = (void __user *)arg;
	struct dmirror *dmirror = filp->private_data;
	struct hmm_dmirror_cmd cmd;
	long ret;

	switch (command) {
	case HMM_DMIRROR_READ:
	case HMM_DMIRROR_WRITE:
	case HMM_DMIRROR_READ_UNLOCKED:
	case HMM_DMIRROR_SNAPSHOT:
		break;
	default:
		return -ENOTTY;
	}

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
 * dmirror_fops_open() - create a device mirror of the caller's mm
 * @inode: device inode
 * @filp: the new file
 *
 * Return: 0, -ENOMEM, or the error of mmu_interval_notifier_insert().
 */
static int dmirror_fops_open(struct inode *inode, struct file *filp)
{
	struct dmirror *dmirror;
	int ret;

	dmirror = kzalloc_obj(*dmirror);
	if (!dmirror)
		return -ENOMEM;

	dmirror->mdevice = container_of(inode->i_cdev, struct dmirror_device,
					cdev);
	mutex_init(&dmirror->pt_lock);
	xa_init(&dmirror->leaves);

	/* Teach lockdep that pt_lock is taken from reclaim; see "Locking". */
	if (IS_ENABLED(CONFIG_LOCKDEP)) {
		fs_reclaim_acquire(GFP_KERNEL);
		might_lock(&dmirror->pt_lock);
		fs_reclaim_release(GFP_KERNEL);
	}

	ret = mmu_interval_notifier_insert(&dmirror->notifier, current->mm, 0,
					   ULONG_MAX & PAGE_MASK,
					   &dmirror_notifier_ops);
	if (ret) {
		kfree(dmirror);
		return ret;
	}

	filp->private_data = dmirror;
	return 0;
}

/**
 * dmirror_fops_release() - tear down a mirror
 * @inode: device inode
 * @filp: the file
 *
 * Once the notifier is removed no invalidation can run, and no ioctl can run
 * on a file being released, so the page table is freed without pt_lock.
 *
 * Return: 0.
 */
static int dmirror_fops_release(struct inode *inode, struct file *filp)
{
	struct dmirror *dmirror = filp->private_data;

	mmu_interval_notifier_remove(&dmirror->notifier);
	dmirror_leaves_free(dmirror);
	mutex_destroy(&dmirror->pt_lock);
	kfree(dmirror);
	return 0;
}

static const struct file_operations dmirror_fops = {
	.owner		= THIS_MODULE,
	.open		= dmirror_fops_open,
	.release	= dmirror_fops_release,
	.unlocked_ioctl	= dmirror_fops_unlocked_ioctl,
	.llseek		= default_llseek,
};

static void dmirror_device_release(struct device *dev)
{
	/* The devices are static; nothing to free. */
}

/**
 * dmirror_device_add() - create /dev/hmm_dmirror<id>
 * @mdevice: the device
 * @id: its number
 * @mem_type: the memory it owns
 *
 * Return: 0 or a negative errno.
 */
static int dmirror_device_add(struct dmirror_device *mdevice, unsigned int id,
			      enum hmm_dmirror_memory_type mem_type)
{
	int ret;

	mdevice->id = id;
	mdevice->mem_type = mem_type;
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
		mdevice->mem_type = 0;
	}
	return ret;
}

static void dmirror_device_remove(struct dmirror_device *mdevice)
{
	if (!mdevice->mem_type)
		return;
	cdev_device_del(&mdevice->cdev, &mdevice->dev);
	put_device(&mdevice->dev);
	mdevice->mem_type = 0;
}

static void dmirror_devices_remove(void)
{
	unsigned int id;

	for (id = 0; id < DMIRROR_NDEVICES; id++)
		dmirror_device_remove(&dmirror_devices[id]);
}

static int __init dmirror_init(void)
{
	unsigned int ndevices = DMIRROR_NPRIVATE;
	unsigned int id;
	int ret;

	/* Coherent devices need both physical ranges, as upstream. */
	if (spm_addr_dev0 && spm_addr_dev1)
		ndevices = DMIRROR_NDEVICES;

	ret = alloc_chrdev_region(&dmirror_devt, 0, DMIRROR_NDEVICES,
				  "HMM_DMIRROR");
	if (ret)
		return ret;

	for (id = 0; id < ndevices; id++) {
		ret = dmirror_device_add(&dmirror_devices[id], id,
					 id < DMIRROR_NPRIVATE ?
					 HMM_DMIRROR_MEMORY_DEVICE_PRIVATE :
					 HMM_DMIRROR_MEMORY_DEVICE_COHERENT);
		if (ret) {
			dmirror_devices_remove();
			unregister_chrdev_region(dmirror_devt,
						 DMIRROR_NDEVICES);
			return ret;
		}
	}
	pr_info("HMM test device loaded: %u devices\n", ndevices);
	return 0;
}

static void __exit dmirror_exit(void)
{
	dmirror_devices_remove();
	unregister_chrdev_region(dmirror_devt, DMIRROR_NDEVICES);
}

module_init(dmirror_init);
module_exit(dmirror_exit);
MODULE_DESCRIPTION("HMM test device: an emulated GPU mirroring process memory");
MODULE_LICENSE("GPL");
