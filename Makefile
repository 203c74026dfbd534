# SPDX-License-Identifier: GPL-2.0
#
# make check: static checks (checkpatch --strict, W=1 module build, shell
# syntax), then the whole suite in a QEMU guest. See README.md.

RUN_VM ?= ./run_vm.sh

.PHONY: check lint vm

check: lint vm

lint:
	$(RUN_VM) --lint

vm:
	$(RUN_VM)
