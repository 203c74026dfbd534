/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What lib/test_hmm.c needs from a kernel older than the newest it is
 * written for, in one place. run_vm.sh builds the driver with
 * "-include test_hmm_compat.h" next to the test_hmm_probes.h that
 * compat/probe.sh wrote for the tree: the driver's source has no switch of
 * its own, and is the file that goes upstream as it is.
 *
 * Each probe (compat/probes/NAME.c) compiles a use of one kernel API
 * against the tree; test_hmm_probes.h defines DMIRROR_HAVE_NAME for those
 * that compiled. A feature whose API is missing is left out here: its
 * ioctl returns -EOPNOTSUPP and the tests that need it report SKIP naming
 * the kernel feature.
 */
#ifndef _TEST_HMM_COMPAT_H
#define _TEST_HMM_COMPAT_H

#include <linux/errno.h>
#include <linux/hmm.h>

#include "test_hmm_probes.h"

#ifndef DMIRROR_HAVE_HMM_RANGE_FAULT_UNLOCKED_TIMEOUT
/* Linux 7.3: without it there is no READ_UNLOCKED (userfaultfd ranges). */
static inline int hmm_range_fault_unlocked_timeout(struct hmm_range *range,
						   unsigned long timeout)
{
	return -EOPNOTSUPP;
}
#endif

#endif /* _TEST_HMM_COMPAT_H */
