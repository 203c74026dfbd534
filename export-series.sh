#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# export-series.sh KSRC KBUILD OUT: the project as a patch series against
# the kernel tree KSRC (git format-patch files in OUT, with a cover letter),
# then the check that it is ready for git am: the series applied, one patch
# at a time, to a fresh copy of the tree, and after each patch the driver
# built in the tree with the tree's own CONFIG_TEST_HMM=m (the kernel build
# KBUILD, copied) and the tree's mm selftests built with
# make -C tools/testing/selftests TARGETS=mm (KHDR_INCLUDES: the headers of
# that build). Fails if a patch does not
# apply or does not build, or if a file of ours builds with a warning.
#
# Run by ./run_vm.sh --export-series OUT (make patches), which fetches and
# builds the tree first. The patches and their messages: series/.
#
# The copy of the tree is a git repository in the cache, made once per tree
# ($CACHE/series/linux, about 2 GB and a few minutes the first time); the
# branch "base" is the tree, "export" the series, "check" where it is applied.

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly REPO
readonly CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/test_hmm
readonly WORK=$CACHE/series
readonly TREE=$WORK/linux
readonly OBJ=$WORK/build
readonly MM=tools/testing/selftests/mm

KSRC=$1
KBUILD=$2
OUT=$3
LOG=$WORK/export.log

step() {
	printf '[series] %s\n' "$*" | tee -a "$LOG"
}

die() {
	printf 'export-series.sh: %s\n' "$*" >&2
	exit 1
}

git_tree() {
	git -C "$TREE" -c user.name="${GIT_AUTHOR_NAME:-test_hmm}" \
		-c user.email="${GIT_AUTHOR_EMAIL:-test_hmm@localhost}" "$@"
}

# The tree as a git repository, its content on branch "base"; remade when
# the tree is another one.
make_base() {
	local id
	id=$(cat "$KSRC/Makefile" "$KBUILD/include/config/kernel.release" |
	     sha1sum | cut -c1-12)
	if [ "$(cat "$WORK/base.id" 2>/dev/null)" = "$id" ]; then
		return 0
	fi
	step "copying $KSRC into a git repository (once per tree)"
	rm -rf "$TREE" "$WORK/base.id"
	mkdir -p "$WORK"
	cp -a "$KSRC" "$TREE"
	git_tree init -q
	# One big commit: no gc to run beside the builds.
	git_tree config gc.auto 0
	# An unpacked Debian tree: its .gitignore would leave files out.
	git_tree add -A -f .
	git_tree commit -q -m "Linux $(cat "$KBUILD/include/config/kernel.release") (base)"
	git_tree branch -f base
	echo "$id" >"$WORK/base.id"
}

# Our author for the patches: the repository's, else a placeholder.
author() {
	local name email
	name=$(git -C "$REPO" config user.name || echo test_hmm)
	email=$(git -C "$REPO" config user.email || echo test_hmm@localhost)
	GIT_AUTHOR_NAME=$name
	GIT_AUTHOR_EMAIL=$email
	export GIT_AUTHOR_NAME GIT_AUTHOR_EMAIL
}

# commit MSG FILE...: the files as they are in the tree now, one commit.
commit() {
	local msg=$REPO/series/$1
	shift
	git_tree add -f -- "$@"
	git_tree commit -q -F "$msg"
}

# ours FILE...: copy our FILEs over the tree's.
ours() {
	local f
	for f in "$@"; do
		cp "$REPO/$f" "$TREE/$f"
	done
}

# The Makefile lines of patch 3: hmm-tests with liburing when found.
# shellcheck disable=SC2016 # $(...) are make's
makefile_liburing() {
	local mk=$TREE/$MM/Makefile
	grep -q '^\$(OUTPUT)/gup_longterm: LDLIBS += \$(IOURING_EXTRA_LIBS)$' "$mk" ||
		die "$MM/Makefile has no gup_longterm liburing line to add ours after"
	sed -i '/^\$(OUTPUT)\/gup_longterm: LDLIBS += \$(IOURING_EXTRA_LIBS)$/a\
\
$(OUTPUT)/hmm-tests: LDLIBS += $(IOURING_EXTRA_LIBS)\
ifneq ($(IOURING_EXTRA_LIBS),)\
$(OUTPUT)/hmm-tests: CFLAGS += -DHMM_HAVE_LIBURING\
endif' "$mk"
}

# The Makefile line of patch 4: build hmm-bench.
makefile_bench() {
	local mk=$TREE/$MM/Makefile
	grep -q '^TEST_GEN_FILES += hmm-tests$' "$mk" ||
		die "$MM/Makefile has no hmm-tests line to add hmm-bench after"
	sed -i '/^TEST_GEN_FILES += hmm-tests$/a\
TEST_GEN_FILES += hmm-bench' "$mk"
}

# The help text of patch 5.
kconfig_help() {
	local kc=$TREE/lib/Kconfig.debug
	grep -q 'tools/testing/selftest/vm/hmm-tests' "$kc" ||
		die "lib/Kconfig.debug: TEST_HMM's help text is not the one expected"
	sed -i 's|^\t  Doing so will allow you to run tools/testing/selftest/vm/hmm-tests.$|\t  Doing so will allow you to run the HMM selftests in\
\t  tools/testing/selftests/mm/: test_hmm.sh loads the module with the\
\t  parameters hmm-tests needs and runs it; hmm-bench measures the\
\t  driver.|' "$kc"
}

# The series on branch "export", then the patch files.
make_series() {
	step "writing the series"
	git_tree checkout -q -f -B export base
	ours lib/test_hmm.c lib/test_hmm_uapi.h
	commit 1-driver.txt lib/test_hmm.c lib/test_hmm_uapi.h
	ours $MM/hmm-tests.c $MM/test_hmm.sh
	commit 2-tests.txt $MM/hmm-tests.c $MM/test_hmm.sh
	makefile_liburing
	commit 3-liburing.txt $MM/Makefile
	ours $MM/hmm-bench.c
	makefile_bench
	commit 4-bench.txt $MM/hmm-bench.c $MM/Makefile
	kconfig_help
	commit 5-kconfig.txt lib/Kconfig.debug
	rm -rf "$OUT"
	mkdir -p "$OUT"
	# -B: the driver and the tests are rewrites; as such, each reads as
	# the new file rather than as old and new lines interleaved.
	git_tree format-patch -q -B --cover-letter -o "$OUT" base..export
	sed -i -e "s/\*\*\* SUBJECT HERE \*\*\*/test_hmm: a test device for HMM, and its selftests/" \
		-e "/\*\*\* BLURB HERE \*\*\*/{
r $REPO/series/0-cover.txt
d
}" "$OUT"/0000-cover-letter.patch
	step "$(find "$OUT" -name '*.patch' | wc -l) files in $OUT"
}

# The driver in the tree, with the tree's configuration (CONFIG_TEST_HMM=m),
# and the tree's mm selftests; warnings in our files fail.
build_check() {
	local what=$1
	make -C "$TREE" O="$OBJ" -j"$(nproc)" lib/test_hmm.ko \
		>"$WORK/module.log" 2>&1 ||
		{ cat "$WORK/module.log"; die "$what: the driver does not build"; }
	if grep -E 'warning:|error:' "$WORK/module.log"; then
		die "$what: the driver builds with warnings"
	fi
	# Built afresh each time: make does not see a changed Makefile.
	rm -f "$TREE/$MM/hmm-tests" "$TREE/$MM/hmm-bench"
	make -C "$TREE/tools/testing/selftests" TARGETS=mm -j"$(nproc)" \
		KHDR_INCLUDES="-isystem $OBJ/usr/include" \
		>"$WORK/selftests.log" 2>&1 ||
		{ tail -n 30 "$WORK/selftests.log"; die "$what: the mm selftests do not build"; }
	if grep -E '(hmm-tests|hmm-bench|test_hmm)[^ ]*: *(warning|error)' \
		"$WORK/selftests.log"; then
		die "$what: our tests build with warnings"
	fi
}

# git am onto a fresh checkout of the tree, building after each patch.
check_series() {
	local p n=0
	step "checking: git am onto a fresh checkout of base, building after each patch"
	git_tree checkout -q -f -B check base
	git_tree clean -q -f -d -x
	rm -rf "$OBJ"
	cp -a "$KBUILD" "$OBJ"
	grep -q '^CONFIG_TEST_HMM=m$' "$OBJ/.config" ||
		die "the kernel build $KBUILD does not have CONFIG_TEST_HMM=m"
	# The UAPI headers the selftests build with, from the kernel build:
	# made in the tree itself they would make it unclean for O= builds.
	make -C "$TREE" O="$OBJ" headers >"$WORK/headers.log" 2>&1 ||
		die "make headers failed; see $WORK/headers.log"
	for p in "$OUT"/0*.patch; do
		case $p in */0000-cover-letter.patch) continue ;; esac
		n=$((n + 1))
		# The sign-off is the submitter's to give; MAINTAINERS' HMM
		# entry already covers new files (tools/.../mm/*hmm*).
		"$TREE/scripts/checkpatch.pl" --strict --quiet --show-types \
			--ignore MISSING_SIGN_OFF,FILE_PATH_CHANGES "$p" ||
			die "$(basename "$p"): checkpatch.pl --strict complains"
		git_tree am -q "$p" ||
			die "$(basename "$p") does not apply with git am"
		build_check "$(basename "$p")"
		step "ok $n $(basename "$p"): checkpatch clean, applies, driver and mm selftests build"
	done
	for p in lib/test_hmm.ko $MM/hmm-tests $MM/hmm-bench; do
		case $p in
		*.ko) [ -f "$OBJ/$p" ] ;;
		*) [ -x "$TREE/$p" ] ;;
		esac || die "$p was not built"
	done
	# grep -q would end the pipe early, and pipefail fail it.
	if ! nm "$TREE/$MM/hmm-tests" | grep io_uring_queue_init >/dev/null; then
		die "hmm-tests was built without liburing"
	fi
	step "the series applies and builds: lib/test_hmm.ko, $MM/hmm-tests (with liburing), $MM/hmm-bench"
}

main() {
	[ $# = 3 ] || die "usage: $0 KSRC KBUILD OUT"
	case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
	mkdir -p "$WORK"
	: >"$LOG"
	author
	make_base
	make_series
	check_series
}

main "$@"
