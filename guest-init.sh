#!/bin/busybox sh
# SPDX-License-Identifier: GPL-2.0
#
# /init of the QEMU guest that run_vm.sh boots: mount what the tests need,
# run what the run asks for REPEAT times, the driver loaded before and
# unloaded after each time, report the result through QEMU's isa-debug-exit
# port and power off. POSIX sh for busybox: there is no bash in the guest.
#
# run_vm.sh copies this file into the initramfs unchanged. What varies from
# run to run it writes beside it:
#   /test_hmm.env   NAME=value lines, each value one plain word (letters,
#                   digits, '_' and ','):
#     GUEST_MODE    what to run: suite (our hmm-tests, through test_hmm.sh),
#                   upstream (the kernel tree's hmm-tests), exec (the
#                   --exec command), bench (hmm-bench) or fault (our
#                   hmm-tests with the driver's allocations failing)
#     REPEAT        how many times
#     SPM_ADDR0, SPM_ADDR1
#                   the memory reserved at boot for the device-coherent
#                   devices 2 and 3
#     FAULT_PERCENT fault: the chance that an allocation fails
#     BENCH_BOTH    bench: 1 to measure /test_hmm_upstream.ko (the tree's
#                   driver) after ours
#     FIXED_BUGS    the kernel bugs of hmm-tests that the kernel has the
#                   fixes of (--kernel-fixes), comma-separated, or none;
#                   handed to hmm-tests as HMM_FIXED_BUGS
#     GUEST_PASS, GUEST_FAIL, GUEST_SKIP
#                   the result codes run_vm.sh expects
#   /tests.list     the tests --tests selected, one full name a line (all
#                   when absent)
#   /exec.sh        exec: the command given to --exec, run by sh in /add
#
# Output goes to the second serial port, which run_vm.sh streams; lines
# starting "test_hmm-" are read by its report step.

KMEMLEAK=/sys/kernel/debug/kmemleak

mount_filesystems() {
	mount -t proc proc /proc
	mount -t sysfs sysfs /sys
	mount -t devtmpfs devtmpfs /dev 2>/dev/null
	mount -t debugfs debugfs /sys/kernel/debug
	mount -t tmpfs tmpfs /tmp
	mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
}

# The devices and interconnect groups of our suite's peer tests, as
# test_hmm.sh loads them; not for the tree's suite, whose coherent tests
# expect devices 2 and 3 apart, as the kernel's own driver has them.
PEER_PARAMS="private_devices=18 interconnect=2,3;10-17;18,19"

load_driver() {
	peer=$PEER_PARAMS
	[ "$GUEST_MODE" != upstream ] || peer=
	# shellcheck disable=SC2086 # $peer is a list of parameters
	modprobe test_hmm spm_addr_dev0="$SPM_ADDR0" \
		spm_addr_dev1="$SPM_ADDR1" $peer
}

# with_driver CMD...: CMD with the driver loaded, then unloaded; fails if
# any of the three does.
with_driver() {
	load_driver || return 1
	"$@"
	status=$?
	modprobe -r test_hmm || status=1
	return $status
}

# suite: test_hmm.sh loads the driver, runs our hmm-tests, unloads it.
run_suite() {
	./test_hmm.sh smoke "$SPM_ADDR0" "$SPM_ADDR1" -- "$@"
}

# upstream: the kernel tree's own hmm-tests (the same kselftest harness:
# the same -r selection).
run_upstream() {
	with_driver ./upstream-hmm-tests "$@"
}

# exec: the --exec command, in /add.
run_exec() {
	(cd /add && with_driver sh /exec.sh)
}

# bench: hmm-bench on our driver; with BENCH_BOTH, then its migration table
# (the part that uses only the kernel's own ioctls) on the tree's driver.
run_bench() {
	[ "$BENCH_BOTH" = 0 ] || echo "# test_hmm: this repository"
	with_driver ./hmm-bench || return 1
	[ "$BENCH_BOTH" = 1 ] || return 0
	insmod /test_hmm_upstream.ko spm_addr_dev0="$SPM_ADDR0" \
		spm_addr_dev1="$SPM_ADDR1" || return 1
	echo "# test_hmm: the kernel tree (upstream)"
	./hmm-bench -M
	status=$?
	rmmod test_hmm || status=1
	return $status
}

# fault: our hmm-tests with the driver's allocations failing at random.
# Test failures are expected; run_vm.sh judges the rest from the
# "test_hmm-fault:" lines and the kernel log.
run_fault() {
	fail=/sys/kernel/debug/fail_test_hmm
	load_driver || return 1
	if [ ! -d $fail ]; then
		echo "test_hmm-fault: no-debugfs $fail"
		modprobe -r test_hmm
		return 1
	fi
	echo -1 >$fail/times
	echo 1 >$fail/interval
	echo 0 >$fail/space
	echo 0 >$fail/verbose
	echo "$FAULT_PERCENT" >$fail/probability
	echo "test_hmm-fault: probability $FAULT_PERCENT %"
	./hmm-tests "$@"
	echo "test_hmm-fault: hmm-tests exit $?"
	echo 0 >$fail/probability
	echo "test_hmm-fault: injected $(cat $fail/injected)"
	if ! modprobe -r test_hmm; then
		echo "test_hmm-fault: unload failed"
		return 1
	fi
	echo "test_hmm-fault: unloaded"
}

# run_repetitions ARGS: run_$GUEST_MODE ARGS, REPEAT times. The result, in
# RC, fails if any repetition fails, and skips (4) if one skips and none
# fails.
run_repetitions() {
	RC=0
	i=1
	while [ $i -le "$REPEAT" ]; do
		[ "$REPEAT" = 1 ] ||
			echo "# test_hmm-guest: repetition $i of $REPEAT"
		"run_$GUEST_MODE" "$@"
		r=$?
		case $r in
		0) ;;
		4) [ $RC != 0 ] || RC=4 ;;
		*) RC=$r ;;
		esac
		i=$((i + 1))
	done
}

# Leaks found at boot are not ours: report them once, then forget them.
kmemleak_clear() {
	[ -w $KMEMLEAK ] || return 0
	echo scan >$KMEMLEAK
	echo clear >$KMEMLEAK
}

# Leaks of the run, to the kernel's console, which run_vm.sh scans.
kmemleak_report() {
	[ -w $KMEMLEAK ] || return 0
	# kmemleak reports only objects older than 5 s.
	sleep 6
	echo scan >$KMEMLEAK
	cat $KMEMLEAK >/dev/ttyS0
}

# power_off RC: QEMU exits with (code << 1) | 1, code written to the
# isa-debug-exit port (0xf4) as one byte.
power_off() {
	case $1 in
	0) code=$GUEST_PASS ;;
	4) code=$GUEST_SKIP ;;
	*) code=$GUEST_FAIL ;;
	esac
	# shellcheck disable=SC2059 # the format is the byte, an octal escape
	printf "\\$(printf %o "$code")" |
		dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
	poweroff -f
}

/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/share/kselftest/mm:/add
mount_filesystems
# Results go to the second serial port; the kernel keeps the first.
exec >/dev/ttyS1 2>&1
# shellcheck source=/dev/null # written by run_vm.sh
. /test_hmm.env
[ "$FIXED_BUGS" = none ] || export HMM_FIXED_BUGS="$FIXED_BUGS"
echo "test_hmm-guest: started on $(uname -r)"
kmemleak_clear

# The selected tests, as the harness's "-r fixture.variant.test" options.
set --
if [ -f /tests.list ]; then
	while read -r name; do
		set -- "$@" -r "$name"
	done </tests.list
fi
cd /usr/share/kselftest/mm || power_off 1
run_repetitions "$@"

kmemleak_report
echo "test_hmm-guest: finished rc=$RC"
power_off $RC
