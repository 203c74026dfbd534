#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# Load the HMM test driver (lib/test_hmm.c, CONFIG_TEST_HMM=m), run hmm-tests
# against it and unload it again. The exit status is that of hmm-tests, the
# kselftest way: 0 all passed, 4 skipped, anything else failed; failing to load
# or to unload the driver is a failure too. POSIX sh, so that it also runs
# under busybox.

DRIVER=test_hmm
ksft_skip=4
# Devices and interconnect groups of the peer tests (hmm-tests.c,
# FIXTURE(peer)); the coherent devices 2 and 3 exist only with their memory.
PEER_DEVICES="private_devices=18"
PEER_GROUPS="10-17;18,19"
PEER_COHERENT="2,3"

usage()
{
	cat <<EOF
Usage: $0 [smoke] [<spm_addr_dev0> <spm_addr_dev1>] [-- <hmm-tests args>]
       $0 -h | help

Loads $DRIVER, runs hmm-tests and unloads $DRIVER. Must run as root.

  smoke            accepted for compatibility: the whole suite runs anyway
  <spm_addr_dev0> <spm_addr_dev1>
                   physical addresses of the device-coherent memory for
                   /dev/hmm_dmirror2 and /dev/hmm_dmirror3; without them,
                   the tests of those devices are skipped
  -- <args>        passed to hmm-tests, e.g. "-l" to list the tests or
                   "-r hmm.private0.anon_read" to run one

The driver is loaded with $PEER_DEVICES and the interconnect groups the peer
tests need: $PEER_COHERENT (the coherent devices, when they exist) and
$PEER_GROUPS; devices 0, 1 and 4 to 9 stay alone, as in the kernel's own
driver. Extra module parameters can be given as space-separated
name=value pairs in the TEST_HMM_PARAMS environment variable, and override
these. NUMA balancing and proactive compaction are turned off while the
tests run, and restored after.

Examples:
  $0
  $0 smoke 0x100000000 0x140000000
  $0 -- -r hmm.private0.anon_read
EOF
}

die()
{
	echo "$0: $*" >&2
	exit 1
}

skip()
{
	echo "$0: $*"
	exit $ksft_skip
}

module_available()
{
	if command -v modinfo > /dev/null 2>&1; then
		modinfo "$DRIVER" > /dev/null 2>&1
	else
		find "/lib/modules/$(uname -r)" -name "$DRIVER.ko*" \
			2> /dev/null | grep -q .
	fi
}

unload_driver()
{
	modprobe -r "$DRIVER" || die "could not unload $DRIVER"
}

# Kernel activity that invalidates the tests' memory behind their back:
# NUMA hinting faults and proactive compaction. The tests tell their own
# invalidations from others where they can (the driver's record of
# invalidations); what they count per device (notifiers, faults) could
# still be moved by them, so they are off while the tests run.
QUIET_KNOBS="/proc/sys/kernel/numa_balancing /proc/sys/vm/compaction_proactiveness"
quiet_saved=

quiet_kernel()
{
	for knob in $QUIET_KNOBS; do
		[ -w "$knob" ] || continue
		val=$(cat "$knob") || continue
		[ "$val" = 0 ] && continue
		echo 0 > "$knob" || continue
		quiet_saved="$quiet_saved $knob=$val"
	done
}

restore_kernel()
{
	for saved in $quiet_saved; do
		echo "${saved#*=}" > "${saved%%=*}"
	done
	quiet_saved=
}

spm=
nspm=0
while [ $# -gt 0 ]; do
	case "$1" in
	-h | --help | help)
		usage
		exit 0
		;;
	smoke)
		;;
	--)
		shift
		break
		;;
	[0-9]*)
		nspm=$((nspm + 1))
		[ $nspm -le 2 ] || die "too many addresses (see $0 -h)"
		spm="$spm spm_addr_dev$((nspm - 1))=$1"
		;;
	*)
		usage >&2
		die "unknown argument '$1'"
		;;
	esac
	shift
done
[ $nspm -ne 1 ] || die "spm_addr_dev0 needs spm_addr_dev1 as well (see $0 -h)"

[ "$(id -u)" -eq 0 ] || skip "must be run as root"
command -v modprobe > /dev/null 2>&1 || skip "modprobe is needed"
module_available ||
	skip "no $DRIVER module: build the kernel with CONFIG_TEST_HMM=m"

tests="$(dirname "$0")/hmm-tests"
[ -x "$tests" ] || die "no $tests: build it with make -C tools/testing/selftests TARGETS=mm"

# Start from a fresh module, loaded with our parameters.
if [ -d "/sys/module/$DRIVER" ]; then
	unload_driver
fi

groups="interconnect=${spm:+$PEER_COHERENT;}$PEER_GROUPS"
# Word splitting of the parameters is wanted, globbing is not.
set -f
# shellcheck disable=SC2086
modprobe "$DRIVER" $spm $PEER_DEVICES $groups $TEST_HMM_PARAMS ||
	die "could not load $DRIVER with parameters:$spm $PEER_DEVICES $groups $TEST_HMM_PARAMS"
set +f
trap 'restore_kernel; modprobe -r "$DRIVER"; exit 1' HUP INT TERM

quiet_kernel
"$tests" "$@"
ret=$?
restore_kernel

trap - HUP INT TERM
unload_driver
exit $ret
