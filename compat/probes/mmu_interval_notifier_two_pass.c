// SPDX-License-Identifier: GPL-2.0
/*
 * Two-pass interval notifiers, Linux 7.1: .invalidate_start and
 * .invalidate_finish. The driver is built on them; without them it does not
 * build at all (run_vm.sh says so and offers the tree's own driver).
 */
#include <linux/mmu_notifier.h>

void *dmirror_probe(void);
void *dmirror_probe(void)
{
	static const struct mmu_interval_notifier_ops ops = {
		.invalidate_start = NULL,
		.invalidate_finish = NULL,
	};

	return (void *)&ops;
}
