// SPDX-License-Identifier: GPL-2.0
/*
 * hmm_range_fault_unlocked_timeout(), Linux 7.3: a fault that may drop the
 * mmap lock (userfaultfd). Without it, HMM_DMIRROR_READ_UNLOCKED returns
 * -EOPNOTSUPP.
 */
#include <linux/hmm.h>

int dmirror_probe(struct hmm_range *range);
int dmirror_probe(struct hmm_range *range)
{
	return hmm_range_fault_unlocked_timeout(range, 0);
}
