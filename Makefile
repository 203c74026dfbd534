# SPDX-License-Identifier: GPL-2.0
#
# make check: static checks (checkpatch --strict, W=1 module build, shell
# syntax), then the whole suite in a QEMU guest. See README.md.
#
# make patches: see below.
#
# make fresh-check: the README's Quick start (./run_vm.sh, then make check)
# in a minimal Debian 12 root built with debootstrap, so that nothing this
# machine has installed or cached can help it. Needs root. See fresh-check.sh.

RUN_VM ?= ./run_vm.sh
FRESH_CHECK ?= ./fresh-check.sh

# Targets that name no file; fresh-check is not part of check (it builds a
# root and a kernel from nothing: 30 minutes or more).
.PHONY: check lint vm fresh-check patches

check: lint vm

lint:
	$(RUN_VM) --lint

vm:
	$(RUN_VM)

fresh-check:
	$(FRESH_CHECK)

# make patches: the project as a patch series against the kernel tree, in
# $(PATCHES), checked with git am and a build of the tree (not part of
# check: a first run copies the tree and builds its mm selftests).
PATCHES ?= patches
patches:
	$(RUN_VM) --export-series $(PATCHES)
