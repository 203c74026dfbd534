#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Build a kernel with Kconfig.fragment, boot it under QEMU with this
# repository's HMM test driver and kselftests, and report the result.
#
# Steps: fetch (kernel source), configure, build (kernel once per source and
# configuration, then our module and tests), pack (initramfs), boot (QEMU,
# streaming TAP), report (kernel log scan, counts, exit code).
#
# Exit codes fit `git bisect run`: 0 all passed (skips allowed), 1 a test
# failed, timed out or the kernel splatted, 125 the kernel could not be built
# or booted, 2 bad usage.

set -euo pipefail

# The Debian kernel series used by default: 7.1 or later has the two-pass
# mmu interval notifiers.
readonly KERNEL_SERIES_DEFAULT=7.3
# Debian suites searched for linux-source-<series>, newest version wins.
readonly KERNEL_SUITES="trixie-backports sid"

readonly REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/test_hmm
readonly T0=$(date +%s.%N)

# Physical ranges reserved at boot for the two device-coherent devices.
readonly SPM_SIZE=256M
readonly SPM_ADDR0=0x100000000
readonly SPM_ADDR1=0x110000000

# Guest result codes written to QEMU's isa-debug-exit port.
readonly GUEST_PASS=1 GUEST_FAIL=2 GUEST_SKIP=3

opt_series=$KERNEL_SERIES_DEFAULT
opt_src=
opt_tests=
opt_upstream=0
opt_exec=
opt_add=()
opt_jobs=$(nproc)
opt_timeout=1200
opt_lint=0
opt_bench=0
opt_upstream_tests=0

usage() {
	cat <<EOF
Usage: $0 [options]

Builds a kernel (cached), boots it under QEMU and runs the HMM kselftests
against this repository's test_hmm.ko. Prints TAP as tests run, then
'N passed, N failed, N skipped'.

Options:
  --kernel-series X.Y  Debian linux-source series to test (default $KERNEL_SERIES_DEFAULT)
  --kernel-src DIR     use this kernel tree instead (e.g. a git bisect
                       checkout); it is built out of tree, never written to
  --tests PATTERN      run only tests whose kselftest name
                       (fixture.variant.test) matches this extended regex
  --upstream-driver    load the kernel tree's own test_hmm.ko instead of ours
  --bench              run the benchmark (hmm-bench) instead of the suite;
                       with --upstream-driver, also the tree's driver, in
                       the same boot
  --upstream-tests     run the kernel tree's own hmm-tests instead of ours
                       (against our driver, or the tree's with
                       --upstream-driver)
  --exec 'CMD'         run CMD in the guest (driver loaded) instead of the suite
  --add FILE           copy FILE into the guest's /add (on PATH); repeatable
  --timeout SECONDS    wall-clock limit for boot and tests (default $opt_timeout)
  -j N                 build jobs (default $(nproc))
  --lint               static checks only: checkpatch --strict on our C
                       files and a W=1 module build that must be warning-free
  -h, --help           this text

Exit status: 0 passed, 1 failed or kernel splat, 125 kernel not built or
booted, 2 usage error. Cache and logs: $CACHE
EOF
}

# --- Output helpers --------------------------------------------------------

elapsed() {
	local now
	now=$(date +%s.%N)
	awk -v a="$T0" -v b="$now" 'BEGIN { printf "%6.1fs", b - a }'
}

progress() {
	printf '[%s] %s\n' "$(elapsed)" "$*" >&2
}

die() {
	local code=$1
	shift
	printf 'run_vm.sh: %s\n' "$*" >&2
	exit "$code"
}

# --- Options ---------------------------------------------------------------

parse_args() {
	while [ $# -gt 0 ]; do
		case $1 in
		--kernel-series) opt_series=${2:?}; shift ;;
		--kernel-src) opt_src=$(cd "${2:?}" && pwd) ||
			die 2 "no such directory: $2"; shift ;;
		--tests) opt_tests=${2:?}; shift ;;
		--upstream-driver) opt_upstream=1 ;;
		--exec) opt_exec=${2:?}; shift ;;
		--add) [ -f "${2:?}" ] || die 2 "no such file: $2"
			opt_add+=("$(realpath "$2")"); shift ;;
		--timeout) opt_timeout=${2:?}; shift ;;
		-j) opt_jobs=${2:?}; shift ;;
		-j*) opt_jobs=${1#-j} ;;
		--lint) opt_lint=1 ;;
		--bench) opt_bench=1 ;;
		--upstream-tests) opt_upstream_tests=1 ;;
		-h|--help) usage; exit 0 ;;
		*) usage >&2; exit 2 ;;
		esac
		shift
	done
	[[ $opt_series =~ ^[0-9]+\.[0-9]+$ ]] ||
		die 2 "--kernel-series wants X.Y, not '$opt_series'"
	[[ $opt_jobs =~ ^[1-9][0-9]*$ ]] || die 2 "-j wants a number"
	[[ $opt_timeout =~ ^[1-9][0-9]*$ ]] || die 2 "--timeout wants seconds"
	if [ "$opt_upstream_tests" = 1 ]; then
		[ -z "$opt_exec" ] && [ "$opt_bench" = 0 ] ||
			die 2 "--upstream-tests goes with neither --exec nor --bench"
		opt_exec=upstream-hmm-tests
	fi
	if [ "$opt_bench" = 1 ]; then
		[ -z "$opt_exec" ] || die 2 "--bench and --exec do not go together"
		opt_exec=hmm-bench
		# Both drivers in one boot: ours first, then the tree's.
		if [ "$opt_upstream" = 1 ]; then
			opt_upstream=0
			opt_exec="echo '# test_hmm: this repository'; hmm-bench &&
modprobe -r test_hmm &&
insmod /add/test_hmm_upstream.ko spm_addr_dev0=$SPM_ADDR0 spm_addr_dev1=$SPM_ADDR1 &&
echo '# test_hmm: the kernel tree (upstream)' && hmm-bench -M &&
rmmod test_hmm && modprobe test_hmm spm_addr_dev0=$SPM_ADDR0 spm_addr_dev1=$SPM_ADDR1"
			opt_bench=2
		fi
	fi
	if [ -n "$opt_tests" ] && [ -n "$opt_exec" ]; then
		die 2 "--tests goes with neither --exec nor --bench"
	fi
	return 0
}

# --- Host dependencies -----------------------------------------------------

# "command-or-file package" pairs the run needs.
readonly HOST_DEPS="
qemu-system-x86_64 qemu-system-x86
/bin/busybox busybox-static
gcc gcc
make make
flex flex
bison bison
bc bc
cpio cpio
gzip gzip
xz xz-utils
depmod kmod
perl perl
rsync rsync
/usr/include/libelf.h libelf-dev
/usr/include/openssl/ssl.h libssl-dev
/usr/lib/x86_64-linux-gnu/libc.a libc6-dev
/usr/lib/x86_64-linux-gnu/liburing.a liburing-dev
"

missing_packages() {
	local what pkg
	while read -r what pkg; do
		[ -n "$what" ] || continue
		case $what in
		/bin/busybox)
			# The dynamic busybox package cannot run in the guest.
			dpkg -s busybox-static >/dev/null 2>&1 || echo "$pkg" ;;
		/*) [ -e "$what" ] || echo "$pkg" ;;
		*) command -v "$what" >/dev/null 2>&1 || echo "$pkg" ;;
		esac
	done <<<"$HOST_DEPS"
}

install_deps() {
	local missing
	missing=$(missing_packages | sort -u | tr '\n' ' ')
	[ -n "${missing// /}" ] || return 0
	if [ "$(id -u)" -ne 0 ]; then
		die 125 "missing packages; install them with:
  sudo apt-get install -y --no-install-recommends $missing"
	fi
	progress "deps: installing $missing"
	DEBIAN_FRONTEND=noninteractive apt-get update -q >"$CACHE/apt-install.log" 2>&1 &&
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		--no-install-recommends $missing \
		>>"$CACHE/apt-install.log" 2>&1 ||
		die 125 "apt-get install $missing failed; see $CACHE/apt-install.log"
}

# --- Step: fetch -----------------------------------------------------------

# The Debian mirror the system already uses, so that no host is named here.
debian_mirror() {
	local uri
	uri=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources \
		/etc/apt/sources.list 2>/dev/null |
		grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n 1 | tr -d ' ')
	[ -n "$uri" ] || die 125 "no Debian mirror found in the apt configuration"
	echo "${uri%/}"
}

# apt-get and apt-cache with a private configuration under the cache
# directory: the system's sources are neither read nor changed.
private_apt() {
	local tool=$1
	shift
	"$tool" -q -o Dir::Etc::SourceList="$CACHE/apt/sources.list" \
		-o Dir::Etc::SourceParts=/nonexistent \
		-o Dir::State::Lists="$CACHE/apt/lists" \
		-o Dir::Cache="$CACHE/apt" \
		-o APT::Sandbox::User=root "$@"
}

private_apt_update() {
	local mirror suite stamp=$CACHE/apt/updated
	mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/archives/partial"
	# One index refresh a day is plenty and keeps warm runs fast.
	if [ -f "$stamp" ] && [ -n "$(find "$stamp" -mmin -1440)" ]; then
		return 0
	fi
	mirror=$(debian_mirror)
	for suite in $KERNEL_SUITES; do
		echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main"
	done >"$CACHE/apt/sources.list"
	private_apt apt-get update >"$CACHE/apt/update.log" 2>&1 ||
		die 125 "apt-get update failed; see $CACHE/apt/update.log"
	touch "$stamp"
}

newest_debian_version() {
	local pkg=$1 v best=
	for v in $(private_apt apt-cache madison "$pkg" 2>/dev/null |
		   awk -F'|' '{ gsub(/ /, "", $2); print $2 }'); do
		if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then
			best=$v
		fi
	done
	echo "$best"
}

# Sets KSRC to an unpacked linux-source-<series> and KSRC_ID to its version.
fetch_debian_source() {
	local pkg=linux-source-$opt_series version deb dir
	dir=$CACHE/src/$pkg
	private_apt_update
	version=$(newest_debian_version "$pkg")
	[ -n "$version" ] || die 125 "Debian has no $pkg in $KERNEL_SUITES"
	if [ "$(cat "$dir.version" 2>/dev/null)" != "$version" ]; then
		progress "fetch: downloading $pkg $version"
		(cd "$CACHE/apt/archives" &&
		 private_apt apt-get download "$pkg=$version") \
			>"$CACHE/apt/download.log" 2>&1 ||
			die 125 "download of $pkg failed; see $CACHE/apt/download.log"
		deb=$(ls "$CACHE/apt/archives/${pkg}_"*.deb | head -n 1)
		progress "fetch: unpacking $pkg $version"
		rm -rf "$dir" "$CACHE/src/deb"
		mkdir -p "$CACHE/src/deb"
		dpkg -x "$deb" "$CACHE/src/deb"
		tar -C "$CACHE/src" -xJf "$CACHE/src/deb/usr/src/$pkg.tar.xz"
		rm -rf "$CACHE/src/deb" "$deb"
		echo "$version" >"$dir.version"
	fi
	KSRC=$dir
	KSRC_ID="debian $pkg $version"
	BUILD_NAME=debian-$opt_series
}

fetch() {
	mkdir -p "$CACHE"
	install_deps
	if [ -n "$opt_src" ]; then
		[ -f "$opt_src/Makefile" ] && [ -d "$opt_src/mm" ] ||
			die 125 "$opt_src is not a kernel tree"
		KSRC=$opt_src
		KSRC_ID="tree $opt_src at $(source_tree_state "$opt_src")"
		BUILD_NAME=$(basename "$opt_src")-$(echo "$opt_src" | sha1sum | cut -c1-8)
	else
		fetch_debian_source
	fi
	KBUILD=$CACHE/build/$BUILD_NAME
	mkdir -p "$KBUILD"
	progress "fetch: kernel source $KSRC_ID"
	progress "fetch: version $(make -s -C "$KSRC" kernelversion 2>/dev/null)"
}

# What identifies the contents of a tree: commit and local changes for git,
# nothing (always let kbuild decide) otherwise.
source_tree_state() {
	local dir=$1
	if git -C "$dir" rev-parse -q --verify HEAD >/dev/null 2>&1; then
		printf '%s+%s' "$(git -C "$dir" rev-parse HEAD)" \
			"$(git -C "$dir" diff HEAD | sha1sum | cut -c1-12)"
	else
		# Never equal to a stamp: kbuild decides what to rebuild.
		echo "not-git-$(date +%s%N)"
	fi
}

# --- Step: configure -------------------------------------------------------

config_hash() {
	# The recipe: tinyconfig + fragment, and this function's version.
	{ echo "tinyconfig+fragment v1"; cat "$REPO/Kconfig.fragment"; } |
		sha1sum | cut -c1-16
}

# Every CONFIG_X=v and "# CONFIG_X is not set" of the fragment, as X=v.
fragment_symbols() {
	sed -nE -e 's/^(CONFIG_[A-Za-z0-9_]+)=(.*)$/\1=\2/p' \
		-e 's/^# (CONFIG_[A-Za-z0-9_]+) is not set$/\1=n/p' \
		"$REPO/Kconfig.fragment"
}

check_config() {
	local line sym want got bad=
	for line in $(fragment_symbols); do
		sym=${line%%=*}
		want=${line#*=}
		got=$(sed -nE "s/^$sym=(.*)$/\1/p" "$KBUILD/.config")
		[ -n "$got" ] || got=n
		[ "$got" = "$want" ] || bad+=" $sym=$want(got $got)"
	done
	[ -z "$bad" ] || die 125 "configuration lacks:$bad; see $KBUILD/config.log"
}

configure() {
	local hash
	hash=$(config_hash)
	if [ -f "$KBUILD/.config" ] &&
	   [ "$(cat "$KBUILD/.test_hmm-config" 2>/dev/null)" = "$hash" ]; then
		return 0
	fi
	progress "configure: tinyconfig + Kconfig.fragment in $KBUILD"
	{
		make -C "$KSRC" O="$KBUILD" tinyconfig &&
		"$KSRC/scripts/kconfig/merge_config.sh" -m -O "$KBUILD" \
			"$KBUILD/.config" "$REPO/Kconfig.fragment" &&
		make -C "$KSRC" O="$KBUILD" olddefconfig
	} >"$KBUILD/config.log" 2>&1 ||
		die 125 "configuration failed; see $KBUILD/config.log"
	check_config
	echo "$hash" >"$KBUILD/.test_hmm-config"
}

# --- Step: build -----------------------------------------------------------

build_kernel() {
	local stamp="$KSRC_ID $(config_hash)"
	if [ -f "$KBUILD/arch/x86/boot/bzImage" ] &&
	   [ "$(cat "$KBUILD/.test_hmm-built" 2>/dev/null)" = "$stamp" ]; then
		progress "build: kernel up to date ($KBUILD)"
		return 0
	fi
	rm -f "$KBUILD/.test_hmm-built"
	progress "build: kernel with -j$opt_jobs (log: $KBUILD/build.log)"
	make -C "$KSRC" O="$KBUILD" -j"$opt_jobs" bzImage modules \
		>"$KBUILD/build.log" 2>&1 ||
		die 125 "kernel build failed; see $KBUILD/build.log"
	make -C "$KSRC" O="$KBUILD" headers_install \
		INSTALL_HDR_PATH="$KBUILD/usr" >>"$KBUILD/build.log" 2>&1 ||
		die 125 "headers_install failed; see $KBUILD/build.log"
	echo "$stamp" >"$KBUILD/.test_hmm-built"
	progress "build: kernel done"
}

# Copy a file only when its content changed, so make sees what is new.
sync_file() {
	cmp -s "$1" "$2" 2>/dev/null || cp "$1" "$2"
}

# Builds $REPO/lib/test_hmm.c as an external module against the tree.
# Prints nothing; the log is $MODDIR/build.log.
build_module() {
	MODDIR=$CACHE/module/$BUILD_NAME
	mkdir -p "$MODDIR"
	sync_file "$REPO/lib/test_hmm.c" "$MODDIR/test_hmm.c"
	sync_file "$REPO/lib/test_hmm_uapi.h" "$MODDIR/test_hmm_uapi.h"
	echo 'obj-m := test_hmm.o' >"$MODDIR/Kbuild.new"
	sync_file "$MODDIR/Kbuild.new" "$MODDIR/Kbuild"
	make -C "$KSRC" O="$KBUILD" M="$MODDIR" W=1 modules \
		>"$MODDIR/build.log" 2>&1 ||
		die 125 "module build failed; see $MODDIR/build.log"
}

# The test programs, static, against the tree's harness and UAPI headers;
# our lib/test_hmm_uapi.h comes before the tree's, the tree gives
# mm/gup_test.h. liburing is optional in a kernel tree, here it is used.
build_tests() {
	local out=$CACHE/run/$BUILD_NAME prog
	mkdir -p "$out"
	: >"$out/tests-build.log"
	for prog in hmm-tests hmm-bench; do
		gcc -static -O2 -Wall -Wextra -DHMM_HAVE_LIBURING \
			-isystem "$KBUILD/usr/include" \
			-I "$KSRC/tools/testing/selftests" -I "$REPO" \
			-I "$KSRC" \
			-o "$out/$prog" \
			"$REPO/tools/testing/selftests/mm/$prog.c" \
			-luring -lpthread \
			>>"$out/tests-build.log" 2>&1 ||
			die 125 "$prog build failed; see $out/tests-build.log"
	done
	TESTS_BIN=$out/hmm-tests
	BENCH_BIN=$out/hmm-bench
	[ "$opt_upstream_tests" = 1 ] || return 0
	(cd "$KSRC/tools/testing/selftests/mm" &&
	 gcc -static -O2 -w -isystem "$KBUILD/usr/include" \
		-I "$KSRC/tools/testing/selftests" -I "$KSRC" \
		-o "$out/upstream-hmm-tests" hmm-tests.c vm_util.c \
		hugepage_settings.c -lpthread -lm) >>"$out/tests-build.log" 2>&1 ||
		die 125 "the tree's hmm-tests did not build; see $out/tests-build.log"
}

build() {
	build_kernel
	build_module
	build_tests
	KREL=$(cat "$KBUILD/include/config/kernel.release")
	if [ "$opt_upstream" = 1 ]; then
		DRIVER=$KBUILD/lib/test_hmm.ko
		[ -f "$DRIVER" ] || die 125 "the tree did not build lib/test_hmm.ko"
	else
		DRIVER=$MODDIR/test_hmm.ko
	fi
	progress "build: driver $DRIVER"
}

# --- Step: lint ------------------------------------------------------------

lint() {
	local files=(lib/test_hmm.c lib/test_hmm_uapi.h
		     tools/testing/selftests/mm/hmm-tests.c
		     tools/testing/selftests/mm/hmm-bench.c)
	local rc=0
	progress "lint: checkpatch.pl --strict"
	(cd "$REPO" && "$KSRC/scripts/checkpatch.pl" --strict --no-tree \
		--quiet --show-types -f "${files[@]}") || rc=1
	progress "lint: module build with W=1"
	# From scratch, or an up-to-date module would hide its warnings.
	rm -f "$CACHE/module/$BUILD_NAME"/*.o "$CACHE/module/$BUILD_NAME"/*.ko
	build_module
	if grep -E 'warning:|error:' "$MODDIR/build.log"; then
		rc=1
	fi
	progress "lint: bash -n / sh -n on scripts"
	bash -n "$REPO/run_vm.sh" || rc=1
	sh -n "$REPO/tools/testing/selftests/mm/test_hmm.sh" || rc=1
	bash -n "$REPO/.ci/run" || rc=1
	[ $rc = 0 ] && progress "lint: clean" || progress "lint: FAILED"
	return $rc
}

# --- Step: pack ------------------------------------------------------------

# Runs of one kernel share their run directory: one at a time.
lock_run_dir() {
	local dir=$CACHE/run/$BUILD_NAME
	mkdir -p "$dir"
	exec 9>"$dir/.lock"
	if ! flock -n 9; then
		progress "pack: waiting for another run using $dir"
		flock 9
	fi
}

# kselftest names (fixture.variant.test) listed by the harness's -l table.
list_tests() {
	"$TESTS_BIN" -l 2>&1 | awk '
		/^-+$/ { flush(); next }
		/^# FIXTURE/ { next }
		{
			f = substr($0, 1, 20); v = substr($0, 22, 25);
			t = substr($0, 48);
			gsub(/ /, "", f); gsub(/ /, "", v); gsub(/ /, "", t);
			if (f != "") fixture = f;
			if (v != "") vars[nv++] = v;
			if (t != "") tests[nt++] = t;
		}
		function flush(  i, j) {
			for (i = 0; i < nt; i++)
				if (nv == 0) print fixture "." tests[i];
				else for (j = 0; j < nv; j++)
					print fixture "." vars[j] "." tests[i];
			nv = nt = 0;
		}
		END { flush() }'
}

# Harness arguments that select the tests matching --tests.
select_tests() {
	local names
	[ -n "$opt_tests" ] || return 0
	names=$(list_tests | grep -E -- "$opt_tests" || true)
	[ -n "$names" ] || die 2 "no test matches '$opt_tests'; names are:
$(list_tests)"
	progress "pack: $(echo "$names" | wc -l) tests match '$opt_tests'"
	printf -- '-r %s ' $names
}

write_init() {
	local harness_args=$1
	cat <<EOF
#!/bin/busybox sh
# Guest init: generated by run_vm.sh.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/share/kselftest/mm:/add
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs tmpfs /tmp
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
# Results go to the second serial port; the kernel keeps the first.
exec >/dev/ttyS1 2>&1
echo "test_hmm-guest: started on \$(uname -r)"
# Leaks found at boot are not ours: report them once, then forget them.
if [ -w /sys/kernel/debug/kmemleak ]; then
	echo scan >/sys/kernel/debug/kmemleak
	echo clear >/sys/kernel/debug/kmemleak
fi
cd /usr/share/kselftest/mm
$(if [ -n "$opt_exec" ]; then
	echo "rc=1"
	echo "modprobe test_hmm spm_addr_dev0=$SPM_ADDR0 spm_addr_dev1=$SPM_ADDR1 && {"
	echo "	(cd /add && sh /add/.exec); rc=\$?"
	echo "	modprobe -r test_hmm || rc=1; }"
else
	echo "./test_hmm.sh smoke $SPM_ADDR0 $SPM_ADDR1 -- $harness_args; rc=\$?"
fi)
if [ -w /sys/kernel/debug/kmemleak ]; then
	# kmemleak reports only objects older than 5 s.
	sleep 6
	echo scan >/sys/kernel/debug/kmemleak
	cat /sys/kernel/debug/kmemleak >/dev/ttyS0
fi
echo "test_hmm-guest: finished rc=\$rc"
case \$rc in
0) code=$GUEST_PASS ;;
4) code=$GUEST_SKIP ;;
*) code=$GUEST_FAIL ;;
esac
printf "\\\\\$(printf %o \$code)" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
poweroff -f
EOF
}

pack() {
	local root=$CACHE/run/$BUILD_NAME/root harness_args f
	harness_args=$(select_tests)
	rm -rf "$root"
	mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,add,usr/share/kselftest/mm} \
		"$root/lib/modules/$KREL/kernel/lib"
	cp /bin/busybox "$root/bin/busybox"
	cp "$TESTS_BIN" "$BENCH_BIN" "$REPO/tools/testing/selftests/mm/test_hmm.sh" \
		"$root/usr/share/kselftest/mm/"
	if [ "$opt_upstream_tests" = 1 ]; then
		cp "$(dirname "$TESTS_BIN")/upstream-hmm-tests" \
			"$root/usr/share/kselftest/mm/"
	fi
	cp "$DRIVER" "$root/lib/modules/$KREL/kernel/lib/test_hmm.ko"
	echo kernel/lib/test_hmm.ko >"$root/lib/modules/$KREL/modules.order"
	cp "$KBUILD"/modules.builtin{,.modinfo} "$root/lib/modules/$KREL/"
	depmod -b "$root" "$KREL"
	for f in "${opt_add[@]}"; do
		cp "$f" "$root/add/"
	done
	printf '%s\n' "$opt_exec" >"$root/add/.exec"
	if [ "$opt_bench" = 2 ]; then
		cp "$KBUILD/lib/test_hmm.ko" "$root/add/test_hmm_upstream.ko"
	fi
	write_init "$harness_args" >"$root/init"
	chmod +x "$root/init"
	INITRD=$CACHE/run/$BUILD_NAME/initramfs.cpio.gz
	(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD"
}

# --- Step: boot ------------------------------------------------------------

qemu_base_args() {
	# One socket per node: CPUs sharing a cache across nodes make the
	# scheduler's topology check WARN.
	echo -machine pc -smp 2,sockets=2,cores=1,threads=1 -m 4G \
		-object memory-backend-ram,id=m0,size=2G \
		-object memory-backend-ram,id=m1,size=2G \
		-numa node,nodeid=0,cpus=0,memdev=m0 \
		-numa node,nodeid=1,cpus=1,memdev=m1 \
		-display none -monitor none -no-reboot \
		-device isa-debug-exit,iobase=0xf4,iosize=0x04 \
		-kernel "$KBUILD/arch/x86/boot/bzImage"
}

# KVM is used only when a short probe boot reaches user space; on hosts where
# /dev/kvm exists but guests hang, that costs one probe per host boot.
pick_accel() {
	local cache=$CACHE/kvm-probe boot_id probe_init dir
	ACCEL=tcg
	[ -w /dev/kvm ] || return 0
	boot_id=$(cat /proc/sys/kernel/random/boot_id)
	if [ "$(sed -n 1p "$cache" 2>/dev/null)" = "$boot_id" ]; then
		ACCEL=$(sed -n 2p "$cache")
		return 0
	fi
	progress "boot: probing KVM"
	dir=$(mktemp -d)
	mkdir -p "$dir/bin"
	cp /bin/busybox "$dir/bin/"
	probe_init='#!/bin/busybox sh
/bin/busybox echo test_hmm-kvm-probe-ok
/bin/busybox poweroff -f'
	echo "$probe_init" >"$dir/init"
	chmod +x "$dir/init"
	(cd "$dir" && find . | cpio -o -H newc --quiet | gzip -1) >"$dir.cpio.gz"
	if timeout -k 2 20 qemu-system-x86_64 $(qemu_base_args) -accel kvm \
		-cpu host -initrd "$dir.cpio.gz" -serial stdio \
		-append "console=ttyS0 panic=-1 quiet" </dev/null 2>/dev/null |
		grep -q test_hmm-kvm-probe-ok; then
		ACCEL=kvm
	fi
	rm -rf "$dir" "$dir.cpio.gz"
	printf '%s\n%s\n' "$boot_id" "$ACCEL" >"$cache"
}

boot() {
	local rundir=$CACHE/run/$BUILD_NAME cpu=max rc
	CONSOLE_LOG=$rundir/console.log
	RESULTS_LOG=$rundir/results.log
	pick_accel
	[ "$ACCEL" = kvm ] && cpu=host
	progress "boot: QEMU ($ACCEL), timeout ${opt_timeout}s"
	progress "boot: console log $CONSOLE_LOG"
	: >"$CONSOLE_LOG"
	set +e
	timeout -k 5 "$opt_timeout" qemu-system-x86_64 $(qemu_base_args) \
		-accel "$ACCEL" -cpu "$cpu" -initrd "$INITRD" \
		-serial "file:$CONSOLE_LOG" -serial stdio \
		-append "console=ttyS0 panic=-1 loglevel=7 \
memmap=$SPM_SIZE\$$SPM_ADDR0 memmap=$SPM_SIZE\$$SPM_ADDR1" \
		</dev/null 2>"$rundir/qemu.log" |
		sed -u 's/\r$//' | tee "$RESULTS_LOG"
	rc=${PIPESTATUS[0]}
	set -e
	QEMU_RC=$rc
}

# --- Step: report ----------------------------------------------------------

readonly SPLAT_RE='BUG:|WARNING:|Oops|general protection fault|KASAN|UBSAN|possible recursive locking|possible circular locking|inconsistent lock state|suspicious RCU usage|INFO: task .* blocked for more than|soft lockup|hard LOCKUP|unreferenced object|Call Trace|Kernel panic|oom_reaper: unable to reap|Trying to free nonexistent resource'

# Line numbers of splats in the console log. The report of an OOM kill,
# which tests provoke on purpose, carries a stack dump: from "invoked
# oom-killer" to "Killed process" it is not a splat.
splat_lines() {
	awk -v re="$SPLAT_RE" '
		/invoked oom-killer/ { oom = 1 }
		oom && /Killed process/ { oom = 0; next }
		!oom && $0 ~ re { print NR }' "$CONSOLE_LOG"
}

print_splats() {
	local n
	for n in $(splat_lines | head -n 8); do
		sed -n "${n},$((n + 25))p" "$CONSOLE_LOG"
		echo ---
	done >&2
}

report() {
	local pass fail skip code running
	pass=$(grep -cE '^ok [0-9]+ ' "$RESULTS_LOG" || true)
	skip=$(grep -cE '^ok [0-9]+ .*# SKIP' "$RESULTS_LOG" || true)
	fail=$(grep -cE '^not ok [0-9]+ ' "$RESULTS_LOG" || true)
	pass=$((pass - skip))
	code=0

	if ! grep -q '^test_hmm-guest: started' "$RESULTS_LOG"; then
		progress "report: the guest never reached user space"
		tail -n 40 "$CONSOLE_LOG" >&2
		echo "0 passed, 0 failed, 0 skipped"
		exit 125
	fi
	if [ "$QEMU_RC" = 124 ] || [ "$QEMU_RC" = 137 ]; then
		running=$(grep -oE '^#  RUN +[^ ]+' "$RESULTS_LOG" | tail -n 1 |
			  awk '{ print $3 }' || true)
		echo "not ok - timeout after ${opt_timeout}s while running ${running:-the command}"
		fail=$((fail + 1))
		code=1
	elif [ $((QEMU_RC & 1)) != 1 ] || [ $((QEMU_RC >> 1)) -lt $GUEST_PASS ]; then
		# Only the guest's init can choose an odd exit status.
		echo "not ok - the guest died before reporting (QEMU exit $QEMU_RC)"
		fail=$((fail + 1))
		code=1
	elif [ $((QEMU_RC >> 1)) = $GUEST_FAIL ]; then
		code=1
		if [ "$fail" = 0 ]; then
			echo "not ok - the guest command failed"
			fail=1
		fi
	elif [ -n "$opt_exec" ] && [ "$pass$fail$skip" = 000 ]; then
		# A plain command: one test.
		if [ $((QEMU_RC >> 1)) = $GUEST_SKIP ]; then
			skip=1
		else
			pass=1
		fi
	fi

	if [ -n "$(splat_lines)" ]; then
		echo "not ok - kernel log: splat (see $CONSOLE_LOG)"
		print_splats
		fail=$((fail + 1))
		code=1
	else
		echo "ok - kernel log: no splat"
		pass=$((pass + 1))
	fi
	progress "report: console $CONSOLE_LOG, results $RESULTS_LOG"
	echo "$pass passed, $fail failed, $skip skipped"
	exit $code
}

main() {
	parse_args "$@"
	fetch
	configure
	if [ "$opt_lint" = 1 ]; then
		build_kernel
		lint
		exit
	fi
	build
	lock_run_dir
	pack
	boot
	report
}

main "$@"
