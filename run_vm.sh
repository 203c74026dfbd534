#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Build a kernel with Kconfig.fragment, boot it under QEMU with this
# repository's HMM test driver and kselftests, and report the result.
#
# Steps: fetch (kernel source), configure, build (kernel once per source and
# configuration, then our module and tests), pack (initramfs, with
# guest-init.sh as its /init), boot (QEMU, streaming TAP), report (kernel
# log scan, counts, exit code). The options are in one table (Options).
#
# Runs may share the cache at the same time (two terminals, make -j2 check,
# two checkouts): what one run builds, the others wait for and reuse. The
# locks, always taken in this order and held to the end of the run unless
# said otherwise:
#   apt/.lock              the private apt cache; exclusive, short
#   src/<package>.lock     the unpacked Debian source: shared, exclusive
#                          while it is replaced
#   tools/.lock            the tools --lint builds (sparse): exclusive,
#                          short
#   build/<name>/.test_hmm.lock
#                          the kernel build: shared, exclusive while it is
#                          configured and built, so that no kernel is rebuilt
#                          under a running guest
#   run/<name>/.lock       module, test programs, initramfs, logs of one
#                          kernel: exclusive, one run at a time
#
# Exit codes fit `git bisect run`: 0 all passed (skips allowed), 1 a test
# failed, timed out or the kernel splatted, 125 the kernel could not be built
# or booted, 2 bad usage.

# Some functions are called by name, through use_or_make(), where the
# linter does not see the calls.
# shellcheck disable=SC2317
set -euo pipefail

# Run from make (make -j2 check), we would inherit its jobserver without its
# descriptors, and every make here would warn: the builds set their own -j.
unset MAKEFLAGS MFLAGS

# The Debian kernel series used by default: 7.1 or later has the two-pass
# mmu interval notifiers.
readonly KERNEL_SERIES_DEFAULT=7.3
# Debian suites searched for linux-source-<series>, newest version wins:
# the archive's, and the security archive's (same mirror, debian-security).
readonly KERNEL_SUITES="experimental sid trixie-backports trixie bookworm-backports bookworm"
readonly KERNEL_SECURITY_SUITES="trixie-security bookworm-security"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly REPO
readonly CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/test_hmm
# The fixes of the kernel bugs the suite found, and the list of which
# patch fixes which bug.
readonly KERNEL_FIXES=$REPO/kernel-fixes
readonly KERNEL_FIXES_BUGS=$KERNEL_FIXES/BUGS
T0=$(date +%s.%N)
readonly T0

# Physical ranges reserved at boot for the two device-coherent devices.
readonly SPM_SIZE=256M
readonly SPM_ADDR0=0x100000000
readonly SPM_ADDR1=0x110000000

# Guest result codes written to QEMU's isa-debug-exit port.
readonly GUEST_PASS=1 GUEST_FAIL=2 GUEST_SKIP=3

# How long the guest may print nothing before it is taken for hung: the
# suite's slowest tests may run silently for up to 600 s (HMM_SLOW_TIMEOUT
# in hmm-tests.c) before the harness stops them, however busy the host.
readonly IDLE_DEFAULT=900
# A mutant that hangs the guest should cost minutes, not a quarter hour.
readonly MUTANT_IDLE_DEFAULT=300
# After this many tests in a row stopped by the harness timeout the kernel
# is taken for wedged (a livelock, a task stuck in the kernel that every
# later test runs into): the rest would each cost the timeout, and the run
# has failed already.
readonly MAX_TIMEOUTS_DEFAULT=3
# Wall-clock limit of a whole boot, only a backstop for a guest that keeps
# printing forever; and how much slower the KASAN kernel runs.
readonly TIMEOUT_DEFAULT=7200
readonly KASAN_SLOWDOWN=3
# Chance, in percent, that an allocation of the driver fails (--fault-inject).
readonly FAULT_PERCENT_DEFAULT=10
NPROC=$(nproc)
readonly NPROC

# --- Options ---------------------------------------------------------------
#
# Every option once, in the order --help lists them: a line with the option,
# its argument, its default and the check of its value, then its help text
# on the indented lines below. usage() prints this table and parse_args()
# reads the command line by it; CONFLICTS says which options do not go
# together, and plan_run() decides from the options what the run does.
#
#   ARG      -         a flag
#            WORD      a value: --option WORD or --option=WORD
#            WORD...   the same, repeatable: every value is kept
#            [WORD]    an optional value: the next word, unless it starts
#                      with '-'
#            [=WORD]   an optional value, only as --option=WORD
#   DEFAULT  the value when the option is not given ('-': none); for an
#            optional value, the value when the option is given without it
#            (not given, the option is off)
#   CHECK    the kind of value check_value() accepts: flag, series (X.Y),
#            count (1 or more), count0 (0 or more), seconds, percent,
#            regex, command, dir, path (one to be made), file, patches
#            (a file or a directory)
readonly OPTIONS="
# option          ARG         DEFAULT                 CHECK
--kernel-series   X.Y         $KERNEL_SERIES_DEFAULT  series
	Debian linux-source series to test; the newest Debian version of
	that series is used
--kernel-src      DIR         -                       dir
	use this kernel tree instead (e.g. a git bisect checkout); it is
	built out of tree, never written to
--kernel-patches  P           -                       patches
	apply the patch P, or P/*.patch and P/*.diff in name order (patch
	-p1), to a copy of the kernel tree and test that; the copy and its
	build are kept and rebuilt incrementally for the next set of patches
--kernel-fixes    -           -                       flag
	apply the fixes of the kernel bugs the suite found (kernel-fixes/,
	as with --kernel-patches, in a copy and build of their own) and run
	the suite with those bugs known fixed: the tests that name them
	then run the steps they skip on an unfixed kernel
--mutants         [DIR]       $REPO/mutants           dir
	mutation testing: run the suite on the unpatched kernel, then on
	each mutant DIR/*.patch with --kernel-patches, and print which
	mutants the suite caught and with which tests; with
	--upstream-tests, the tree's suite on each mutant too. Exit 0 only
	if every mutant was caught. The idle limit of those runs is
	${MUTANT_IDLE_DEFAULT}s unless --idle-timeout is given
--expected-tests  -           -                       flag
	with --mutants: run on each mutant only the tests of our suite its
	header expects to catch it (Expect:); the baseline still runs the
	whole suite
--tests           PATTERN     -                       regex
	run only the tests whose kselftest name (fixture.variant.test)
	matches this extended regex: of our suite, or with --upstream-tests
	of the tree's
--repeat          N           1                       count
	run the tests N times in one boot, the driver loaded afresh each
	time; then list the tests that failed in any of them ('name: F/N
	failed')
--kasan           -           -                       flag
	use a kernel with KASAN, UBSAN and SLUB debugging (Kconfig.kasan on
	top of Kconfig.fragment), cached apart from the normal one
--fault-inject    [=PERCENT]  $FAULT_PERCENT_DEFAULT  percent
	run our suite with the driver's allocations failing at random,
	PERCENT % of them; test failures are allowed, splats, leaks, hangs
	and a driver that does not unload are not
--host-load       -           -                       flag
	keep 2 x nproc busy loops running on the host while the guest runs,
	to reproduce a loaded machine
--upstream-driver -           -                       flag
	load the kernel tree's own test_hmm.ko instead of ours; with
	--bench, ours first and then the tree's, in the same boot
--bench           -           -                       flag
	run the benchmark (hmm-bench) instead of the suite
--upstream-tests  -           -                       flag
	run the kernel tree's own hmm-tests instead of ours (against our
	driver, or the tree's with --upstream-driver)
--exec            CMD         -                       command
	run the shell command CMD in the guest (driver loaded, in /add)
	instead of the suite
--add             FILE...     -                       file
	copy FILE into the guest's /add (on PATH); repeatable
--idle-timeout    SECONDS     $IDLE_DEFAULT           seconds
	stop the guest when it has printed nothing for this long: a hang
--max-timeouts    N           $MAX_TIMEOUTS_DEFAULT   count0
	stop the guest once N tests in a row have run into the harness
	timeout: a wedged kernel; 0 never stops
--timeout         SECONDS     $TIMEOUT_DEFAULT        seconds
	wall-clock limit for boot and tests, a backstop; the default is
	multiplied by $KASAN_SLOWDOWN with --kasan and by N with --repeat N
-j                N           $NPROC                  count
	kernel build jobs; also -jN
--lint            -           -                       flag
	static checks only: checkpatch --strict on our C files and a W=1
	module build that must be warning-free
--export-series   DIR         -                       path
	write the project as a patch series against the kernel tree into
	DIR (git format-patch, with a cover letter), then check it: git am
	onto a fresh copy of the tree, and after each patch the driver built
	with the tree's CONFIG_TEST_HMM=m and the tree's mm selftests built
	(export-series.sh)
--list-series     -           -                       flag
	list the kernel series Debian offers (linux-source-X.Y in its suites),
	with the newest version of each, and exit
"

# Options that do not go together when both are given: the two, then why.
readonly CONFLICTS="
--exec           --bench            both choose what the guest runs
--exec           --upstream-tests   both choose what the guest runs
--bench          --upstream-tests   both choose what the guest runs
--tests          --exec             --tests selects tests of a suite, and --exec runs none
--tests          --bench            --tests selects tests of a suite, and --bench runs none
--fault-inject   --exec             --fault-inject runs our suite on our driver
--fault-inject   --bench            --fault-inject runs our suite on our driver
--fault-inject   --upstream-tests   --fault-inject runs our suite on our driver
--fault-inject   --upstream-driver  --fault-inject runs our suite on our driver
--mutants        --kernel-patches   --mutants applies each mutant with --kernel-patches itself
--mutants        --kernel-fixes     --mutants applies each mutant with --kernel-patches itself
--kernel-fixes   --kernel-patches   both choose the patches to apply
--mutants        --exec             --mutants runs the suites itself
--mutants        --bench            --mutants runs the suites itself
--mutants        --fault-inject     --mutants runs the suites itself
--mutants        --lint             --mutants runs the suites itself
--mutants        --export-series    --mutants runs the suites itself
--export-series  --lint             both are what the run does
--export-series  --kernel-fixes     the series is against the tree as it is
--export-series  --kernel-patches   the series is against the tree as it is
--mutants        --repeat           --mutants runs the suites itself
--mutants        --add              --mutants runs the suites itself
--expected-tests --tests            --expected-tests picks the tests itself
--expected-tests --upstream-tests   the Expect: headers name tests of our suite
"

# The table, read once: option names in order, and by name their ARG,
# DEFAULT, CHECK and help text.
OPT_NAMES=()
declare -A OPT_ARG=() OPT_DEFAULT=() OPT_CHECK=() OPT_HELP=()
# The values: OPT[--option] is '' when off or not given (a flag: 1 when
# given); --add's files are one a line.
declare -A OPT=()
# The options given on the command line.
declare -A GIVEN=()

read_options_table() {
	local line name arg default check
	while IFS= read -r line; do
		case $line in
		''|'#'*) ;;
		[[:space:]]*)
			# A line of help text, without its indent.
			OPT_HELP[$name]+=" ${line#"${line%%[![:space:]]*}"}" ;;
		*)
			read -r name arg default check <<<"$line"
			OPT_NAMES+=("$name")
			OPT_ARG[$name]=$arg
			OPT_CHECK[$name]=$check
			OPT_HELP[$name]=
			[ "$default" != - ] || default=
			OPT_DEFAULT[$name]=$default
			case $arg in
			-|'['*|*...) OPT[$name]= ;;
			*) OPT[$name]=$default ;;
			esac ;;
		esac
	done <<<"$OPTIONS"
}
read_options_table

# on OPTION: the option is on: a flag given, a value set.
on() {
	[ -n "${OPT[$1]}" ]
}

given() {
	[ -n "${GIVEN[$1]:-}" ]
}

# print_option LEFT HELP: one option of usage(), HELP wrapped beside LEFT.
print_option() {
	awk -v left="$1" -v text="$2" 'BEGIN {
		pad = sprintf("%23s", "")
		out = length(left) <= 20 ? sprintf("  %-20s ", left) \
					 : "  " left "\n" pad
		n = split(text, word, " ")
		for (i = 1; i <= n; i++) {
			if (line != "" && length(line word[i]) > 54) {
				print out line
				out = pad
				line = ""
			}
			line = line == "" ? word[i] : line " " word[i]
		}
		print out line
	}'
}

usage() {
	local name arg left word help default
	cat <<EOF
Usage: $0 [options]

Builds a kernel (cached), boots it under QEMU and runs the HMM kselftests
against this repository's test_hmm.ko. Prints TAP as tests run, then
'N passed, N failed, N skipped'.

Options:
EOF
	for name in "${OPT_NAMES[@]}"; do
		arg=${OPT_ARG[$name]}
		help=${OPT_HELP[$name]}
		default=${OPT_DEFAULT[$name]}
		case $arg in
		-) left=$name ;;
		'[='*) left=$name$arg ;;
		*) left="$name ${arg%...}" ;;
		esac
		case $arg in
		'['*)
			word=${arg#'['}
			word=${word#=}
			help+=" (${word%']'} defaults to $default)" ;;
		-|*...) ;;
		*) [ -z "$default" ] || help+=" (default $default)" ;;
		esac
		print_option "$left" "$help"
	done
	print_option "-h, --help" "this text"
	cat <<EOF

Exit status: 0 passed, 1 failed or kernel splat, 125 kernel not built or
booted, 2 usage error. Cache and logs: $CACHE
EOF
}

# parse_args ARGS: OPT[--option] from the command line, each value checked;
# GIVEN notes the options given.
parse_args() {
	local arg name value attached
	while [ $# -gt 0 ]; do
		arg=$1
		shift
		attached=0
		case $arg in
		-h|--help) usage; exit 0 ;;
		--*=*) name=${arg%%=*} value=${arg#*=} attached=1 ;;
		-j?*) name=-j value=${arg#-j} attached=1 ;;
		*) name=$arg value= ;;
		esac
		if [ -z "$name" ] || [ -z "${OPT_ARG[$name]+set}" ]; then
			die 2 "unknown option '$arg'; see $0 --help"
		fi
		case ${OPT_ARG[$name]} in
		-)
			[ $attached = 0 ] || die 2 "$name takes no value"
			value=1 ;;
		'[='*)
			[ $attached = 1 ] || value=${OPT_DEFAULT[$name]} ;;
		'['*)
			if [ $attached = 0 ]; then
				value=${OPT_DEFAULT[$name]}
				if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
					value=$1
					shift
				fi
			fi ;;
		*)
			if [ $attached = 0 ]; then
				[ $# -gt 0 ] || die 2 "$name wants ${OPT_ARG[$name]%...}"
				value=$1
				shift
			fi ;;
		esac
		check_value "${OPT_CHECK[$name]}" "$name" "$value"
		case ${OPT_ARG[$name]} in
		*...) OPT[$name]+=$VALUE$'\n' ;;
		*) OPT[$name]=$VALUE ;;
		esac
		GIVEN[$name]=1
	done
}

# check_value CHECK OPTION VALUE: sets VALUE to the value to keep (a path
# made absolute), or stops the run with exit 2 saying what OPTION wants.
check_value() {
	local check=$1 name=$2 want='' rc=0
	VALUE=$3
	case $check in
	flag) ;;
	series) [[ $VALUE =~ ^[0-9]+\.[0-9]+$ ]] || want="a series X.Y" ;;
	count) [[ $VALUE =~ ^[1-9][0-9]*$ ]] || want="a count, 1 or more" ;;
	count0) [[ $VALUE =~ ^[0-9]+$ ]] || want="a count, 0 or more" ;;
	seconds) [[ $VALUE =~ ^[1-9][0-9]*$ ]] || want="seconds, 1 or more" ;;
	percent) [[ $VALUE =~ ^([1-9][0-9]?|100)$ ]] ||
			want="a percentage, 1 to 100" ;;
	command) [ -n "$VALUE" ] || want="a command" ;;
	path) [ -n "$VALUE" ] || want="a path" ;;
	regex)
		# grep says 2 for a bad expression, 1 for no match.
		grep -E -- "$VALUE" </dev/null >/dev/null 2>&1 || rc=$?
		if [ -z "$VALUE" ] || [ $rc = 2 ]; then
			want="an extended regular expression"
		fi ;;
	dir) VALUE=$(cd "$3" 2>/dev/null && pwd) || want="a directory" ;;
	file)
		if [ ! -f "$3" ] || [[ $3 == *$'\n'* ]]; then
			want="a file (its name without a newline)"
		else
			VALUE=$(realpath -- "$3")
		fi ;;
	patches)
		VALUE=$(realpath -e -- "$3" 2>/dev/null) ||
			want="a patch or a directory of patches" ;;
	esac
	[ -z "$want" ] || die 2 "$name wants $want, not '$3'"
	[ "$check" != patches ] || patch_files "$VALUE" >/dev/null
}

check_conflicts() {
	local a b why
	while read -r a b why; do
		[ -n "$a" ] || continue
		if given "$a" && given "$b"; then
			die 2 "$a and $b do not go together: $why"
		fi
	done <<<"$CONFLICTS"
}

# What the run does, decided here once from the options, which keep the
# values given:
#   GUEST_MODE   what guest-init.sh runs: suite (ours), upstream (the
#                tree's hmm-tests), exec, bench or fault
#   TESTS_PROG   the program whose tests --tests selects: hmm-tests, or
#                upstream-hmm-tests (the tree's, same kselftest harness)
#   DRIVER_TREE  1: the driver loaded is the tree's lib/test_hmm.ko
#   BENCH_BOTH   1 (--bench --upstream-driver): hmm-bench on our driver,
#                then its migration table on the tree's, in one boot
#   TIMEOUT      the wall-clock limit of the boot
#   FRAGMENTS    the Kconfig fragments, in the order merged
plan_run() {
	if given --expected-tests && ! given --mutants; then
		die 2 "--expected-tests goes with --mutants"
	fi
	# CONFLICTS leaves at most one of these on.
	if on --fault-inject; then
		GUEST_MODE=fault
	elif on --bench; then
		GUEST_MODE=bench
	elif on --upstream-tests; then
		GUEST_MODE=upstream
	elif on --exec; then
		GUEST_MODE='exec'
	else
		GUEST_MODE=suite
	fi
	TESTS_PROG=hmm-tests
	[ "$GUEST_MODE" != upstream ] || TESTS_PROG=upstream-hmm-tests
	DRIVER_TREE=0
	BENCH_BOTH=0
	if on --upstream-driver && [ "$GUEST_MODE" = bench ]; then
		BENCH_BOTH=1
	elif on --upstream-driver; then
		DRIVER_TREE=1
	fi
	TIMEOUT=${OPT[--timeout]}
	if ! given --timeout; then
		TIMEOUT=$((TIMEOUT * ${OPT[--repeat]}))
		if on --kasan; then
			TIMEOUT=$((TIMEOUT * KASAN_SLOWDOWN))
		fi
	fi
	# --kernel-fixes is --kernel-patches with the repository's fixes, in
	# a copy and build of their own, and the suite told of them.
	PATCH_KIND=patched
	FIXED_BUGS=none
	if on --kernel-fixes; then
		OPT[--kernel-patches]=$KERNEL_FIXES
		PATCH_KIND=fixes
		# shellcheck disable=SC2034 # write_guest_env reads it
		FIXED_BUGS=$(fixed_bugs)
	fi
	FRAGMENTS=("$REPO/Kconfig.fragment")
	if on --kasan; then
		[ -f "$REPO/Kconfig.kasan" ] || die 2 "--kasan needs $REPO/Kconfig.kasan"
		FRAGMENTS+=("$REPO/Kconfig.kasan")
	fi
}

# What --mutants passes on to the run of each mutant: every option given
# but its own, --expected-tests and --upstream-tests, which it adds itself.
mutant_args() {
	local name
	MUTANT_ARGS=()
	for name in "${OPT_NAMES[@]}"; do
		given "$name" || continue
		case $name:${OPT_ARG[$name]} in
		--mutants:*|--upstream-tests:*|--expected-tests:*) ;;
		*:-) MUTANT_ARGS+=("$name") ;;
		*:'[='*) MUTANT_ARGS+=("$name=${OPT[$name]}") ;;
		*) MUTANT_ARGS+=("$name" "${OPT[$name]}") ;;
		esac
	done
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

# --- Locks -----------------------------------------------------------------

# Lock file -> the descriptor it is open on, for as long as the run lasts.
declare -A LOCK_FDS=()

# lock FILE MODE STEP WHAT STATE: flock(1) FILE in MODE (-s shared, -x
# exclusive). When another run holds it, says so once, naming it by the PID
# and state ("building", "in use", ...) that its holder wrote in the file,
# and waits. Taking a lock held in the other mode converts it: only ever
# downgrade that way (see MAKE_TRIES).
lock() {
	local file=$1 mode=$2 step=$3 what=$4 state=$5 fd pid='' doing=
	fd=${LOCK_FDS[$file]:-}
	if [ -z "$fd" ]; then
		exec {fd}<>"$file"
		LOCK_FDS[$file]=$fd
	fi
	if ! flock -n "$mode" "$fd"; then
		read -r pid doing <"$file" || true
		if [ -n "$pid" ]; then
			progress "$step: waiting for $what (${doing:-busy}) in PID $pid"
		else
			progress "$step: waiting for $what, held by another run"
		fi
		flock "$mode" "$fd"
	fi
	echo "$$ $state" >"$file"
}

unlock() {
	flock -u "${LOCK_FDS[$1]}"
}

# For processes that must not keep a lock should this run die first.
close_lock_fds() {
	local fd
	for fd in "${LOCK_FDS[@]}"; do
		exec {fd}>&-
	done
}

# What one run makes and the others use (the Debian source, a kernel
# build) is used under a shared lock held to the end of the run and made
# under the exclusive one. Shared is never upgraded in place (two runs doing
# that at once deadlock): it is released, exclusive taken, and the check
# repeated, since another run may have made it meanwhile. Going back to
# shared after making it is a downgrade (flock(2) converts the lock; another
# run may get in between), so it is checked once more.
readonly MAKE_TRIES=3

# use_or_make STEP WHAT LOCKFILE DOING CHECK MAKE: use WHAT, which the
# function CHECK says is up to date, under LOCKFILE shared until the run
# ends; when it is not, make it with the function MAKE under the exclusive
# lock first, as said above. Sets MADE to 1 if this run made it.
use_or_make() {
	local step=$1 what=$2 lockf=$3 doing=$4 check=$5 make=$6 try=0
	MADE=0
	lock "$lockf" -s "$step" "$what" "in use"
	while ! "$check"; do
		try=$((try + 1))
		[ $try -le $MAKE_TRIES ] ||
			die 125 "$what keeps being remade by other runs"
		unlock "$lockf"
		lock "$lockf" -x "$step" "$what" "$doing"
		if ! "$check"; then
			"$make"
			MADE=1
		fi
		lock "$lockf" -s "$step" "$what" "in use"
	done
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
Term::ANSIColor perl
rsync rsync
flock util-linux
patch patch
/usr/include/libelf.h libelf-dev
/usr/include/openssl/ssl.h libssl-dev
/usr/lib/x86_64-linux-gnu/libc.a libc6-dev
/usr/lib/x86_64-linux-gnu/liburing.a liburing-dev
"

# What --export-series needs besides: git, python3-ply for checkpatch's
# SPDX check, and the libraries the tree's other mm selftests link with.
readonly SERIES_DEPS="
git git
/usr/lib/python3/dist-packages/ply/__init__.py python3-ply
/usr/include/sys/capability.h libcap-dev
/usr/include/numa.h libnuma-dev
"

# What --bench needs besides: gnuplot for the plots.
readonly BENCH_DEPS="
gnuplot gnuplot-nox
"

# What --lint needs besides: the analysers (sparse itself may have to be
# built, see find_sparse()), python3-ply for checkpatch's SPDX check of the
# kernel fixes, python3 for the tree's kernel-doc; for coccinelle, OCaml for
# the two rules scripted in it and libpython3.X.so, which spatch loads by
# that name (Debian's coccinelle only recommends them).
readonly LINT_DEPS="
shellcheck shellcheck
/usr/lib/python3/dist-packages/ply/__init__.py python3-ply
spatch coccinelle
ocaml ocaml-nox
dpkg:libpython3-dev libpython3-dev
python3 python3
"

# missing_packages [DEPS]: the packages of DEPS (default: HOST_DEPS) that
# this machine lacks, one a line.
missing_packages() {
	local what pkg
	while read -r what pkg; do
		[ -n "$what" ] || continue
		case $what in
		/bin/busybox)
			# The dynamic busybox package cannot run in the guest.
			dpkg -s busybox-static >/dev/null 2>&1 || echo "$pkg" ;;
		dpkg:*)
			# A package known by its name alone.
			dpkg -s "${what#dpkg:}" >/dev/null 2>&1 || echo "$pkg" ;;
		/*) [ -e "$what" ] || echo "$pkg" ;;
		*::*)
			# A Perl module. perl-base, in every Debian, has
			# /usr/bin/perl but not the modules checkpatch.pl
			# uses (Term::ANSIColor, Encode): those come with perl.
			perl -M"$what" -e 1 >/dev/null 2>&1 || echo "$pkg" ;;
		*) command -v "$what" >/dev/null 2>&1 || echo "$pkg" ;;
		esac
	done <<<"${1:-$HOST_DEPS}"
}

# install_deps [DEPS]: install what missing_packages DEPS names.
install_deps() {
	local deps=${1:-$HOST_DEPS} missing=()
	[ -n "$(missing_packages "$deps")" ] || return 0
	if [ "$(id -u)" -ne 0 ]; then
		die 125 "missing packages; install them with:
  sudo apt-get install -y --no-install-recommends $(missing_packages "$deps" | sort -u | tr '\n' ' ')"
	fi
	# One installer at a time; the first may install what the second needs.
	lock "$CACHE/apt/.lock" -x deps "the package installation" installing
	mapfile -t missing < <(missing_packages "$deps" | sort -u)
	if [ ${#missing[@]} -gt 0 ]; then
		progress "deps: installing ${missing[*]}"
		if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
		       DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
				--no-install-recommends "${missing[@]}"; } \
			>"$CACHE/apt-install.log" 2>&1; then
			die 125 "apt-get install ${missing[*]} failed; see $CACHE/apt-install.log"
		fi
	fi
	unlock "$CACHE/apt/.lock"
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
# directory: the system's sources are neither read nor changed. Callers hold
# apt/.lock.
# APT_DIR, when set, is another such configuration (find_sparse()).
private_apt() {
	local tool=$1 dir=${APT_DIR:-$CACHE/apt}
	shift
	"$tool" -q -o Dir::Etc::SourceList="$dir/sources.list" \
		-o Dir::Etc::SourceParts=/nonexistent \
		-o Dir::State::Lists="$dir/lists" \
		-o Dir::Cache="$dir" \
		-o APT::Sandbox::User=root "$@"
}

private_apt_update() {
	local mirror suite stamp=$CACHE/apt/updated
	mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/archives/partial"
	mirror=$(debian_mirror)
	{
		for suite in $KERNEL_SUITES; do
			echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main"
		done
		for suite in $KERNEL_SECURITY_SUITES; do
			echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror-security $suite main"
		done
	} >"$CACHE/apt/sources.list.new"
	# A new list of suites is fetched now, not at tomorrow's refresh.
	if ! cmp -s "$CACHE/apt/sources.list.new" "$CACHE/apt/sources.list"; then
		mv "$CACHE/apt/sources.list.new" "$CACHE/apt/sources.list"
		rm -f "$stamp"
	fi
	# One index refresh a day is plenty and keeps warm runs fast.
	if [ -f "$stamp" ] && [ -n "$(find "$stamp" -mmin -1440)" ]; then
		return 0
	fi
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

# Is $SRC_DIR the unpacked $SRC_PKG $SRC_VERSION?
source_up_to_date() {
	[ "$(cat "$SRC_DIR.version" 2>/dev/null)" = "$SRC_VERSION" ] &&
		[ -f "$SRC_DIR/Makefile" ]
}

# Replaces $SRC_DIR with $SRC_PKG $SRC_VERSION; holds src/<package>.lock
# exclusive.
unpack_source() {
	local deb tmp
	progress "fetch: downloading $SRC_PKG $SRC_VERSION"
	lock "$CACHE/apt/.lock" -x fetch "the apt cache" downloading
	rm -f "$CACHE/apt/archives/${SRC_PKG}_"*.deb
	(cd "$CACHE/apt/archives" &&
	 private_apt apt-get download "$SRC_PKG=$SRC_VERSION") \
		>"$CACHE/apt/download.log" 2>&1 ||
		die 125 "download of $SRC_PKG failed; see $CACHE/apt/download.log"
	unlock "$CACHE/apt/.lock"
	deb=$(find "$CACHE/apt/archives" -maxdepth 1 -name "${SRC_PKG}_*.deb" |
	      head -n 1)
	progress "fetch: unpacking $SRC_PKG $SRC_VERSION"
	rm -f "$SRC_DIR.version"
	rm -rf "$SRC_DIR"
	tmp=$(mktemp -d "$CACHE/src/.deb.XXXXXX")
	dpkg -x "$deb" "$tmp"
	tar -C "$CACHE/src" -xJf "$tmp/usr/src/$SRC_PKG.tar.xz"
	rm -rf "$tmp" "$deb"
	echo "$SRC_VERSION" >"$SRC_DIR.version"
}


# --list-series: every linux-source-X.Y Debian offers, newest version of
# each, newest series first.
list_series() {
	local pkg
	lock "$CACHE/apt/.lock" -x fetch "the apt cache" "in use"
	private_apt_update
	for pkg in $(private_apt apt-cache pkgnames linux-source- |
		     grep -E '^linux-source-[0-9]+\.[0-9]+$' | sort -rV); do
		printf '%-8s %s\n' "${pkg#linux-source-}" \
			"$(newest_debian_version "$pkg")"
	done
	unlock "$CACHE/apt/.lock"
}

# Sets KSRC to an unpacked linux-source-<series> and KSRC_ID to its version.
fetch_debian_source() {
	SRC_PKG=linux-source-${OPT[--kernel-series]}
	SRC_DIR=$CACHE/src/$SRC_PKG
	mkdir -p "$CACHE/src"
	lock "$CACHE/apt/.lock" -x fetch "the apt cache" "in use"
	private_apt_update
	SRC_VERSION=$(newest_debian_version "$SRC_PKG")
	unlock "$CACHE/apt/.lock"
	[ -n "$SRC_VERSION" ] ||
		die 125 "Debian has no $SRC_PKG in $KERNEL_SUITES $KERNEL_SECURITY_SUITES (see --list-series)"
	use_or_make fetch "the source $SRC_PKG" "$SRC_DIR.lock" unpacking \
		source_up_to_date unpack_source
	KSRC=$SRC_DIR
	KSRC_ID="debian $SRC_PKG $SRC_VERSION"
	BUILD_NAME=debian-${OPT[--kernel-series]}
}

fetch() {
	mkdir -p "$CACHE/apt"
	install_deps
	if on --lint; then
		install_deps "$LINT_DEPS"
	fi
	if on --export-series; then
		install_deps "$SERIES_DEPS"
	fi
	if on --bench; then
		install_deps "$BENCH_DEPS"
	fi
	if on --kernel-src; then
		KSRC=${OPT[--kernel-src]}
		if [ ! -f "$KSRC/Makefile" ] || [ ! -d "$KSRC/mm" ]; then
			die 125 "$KSRC is not a kernel tree"
		fi
		KSRC_ID="tree $KSRC at $(source_tree_state "$KSRC")"
		BUILD_NAME=$(basename "$KSRC")-$(echo "$KSRC" | sha1sum | cut -c1-8)
	else
		fetch_debian_source
	fi
	# The variant kernel has its own build, module and run directories.
	if on --kasan; then
		BUILD_NAME+=-kasan
	fi
	if on --kernel-patches; then
		use_patched_source
	fi
	KBUILD=$CACHE/build/$BUILD_NAME
	mkdir -p "$KBUILD"
	progress "fetch: kernel source $KSRC_ID"
	progress "fetch: version $(make -s -C "${PATCH_BASE:-$KSRC}" kernelversion 2>/dev/null)"
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

# --- --kernel-patches ------------------------------------------------------

# patch_files [P]: the patches of P (default: --kernel-patches), one path a
# line, in the order applied.
patch_files() {
	local p=${1:-${OPT[--kernel-patches]}} files
	if [ -d "$p" ]; then
		files=$(find "$p" -maxdepth 1 -type f \
			\( -name '*.patch' -o -name '*.diff' \) | LC_ALL=C sort)
	else
		files=$p
	fi
	[ -n "$files" ] || die 2 "no *.patch or *.diff in $p"
	echo "$files"
}

# fixed_bugs: the ids of the bugs kernel-fixes/ fixes (the suite's names,
# HMM_BUG_* in hmm-tests.c), comma-separated: one for each patch there.
fixed_bugs() {
	local id patch ids=() f
	[ -f "$KERNEL_FIXES_BUGS" ] || die 2 "$KERNEL_FIXES_BUGS is missing"
	while read -r id patch; do
		case $id in ''|'#'*) continue ;; esac
		[ -f "$KERNEL_FIXES/$patch" ] ||
			die 2 "$KERNEL_FIXES_BUGS: $patch (bug $id) is not in $KERNEL_FIXES"
		ids+=("$id")
	done <"$KERNEL_FIXES_BUGS"
	while read -r f; do
		grep -q " ${f##*/}\$" "$KERNEL_FIXES_BUGS" ||
			die 2 "$KERNEL_FIXES_BUGS does not name the bug ${f##*/} fixes"
	done < <(patch_files "$KERNEL_FIXES")
	(IFS=,; echo "${ids[*]}")
}

# Tests a copy of the tree instead: $CACHE/src/<kind>-<name> (kind: patched,
# or fixes for --kernel-fixes), one for each kernel build. The build of the
# copy is kept from one set of patches to the next, so that only what the
# patches change is rebuilt.
use_patched_source() {
	local hash
	hash=$(patch_files | while read -r f; do cat "$f"; done |
	       sha1sum | cut -c1-12)
	PATCH_BASE=$KSRC
	KSRC=$CACHE/src/$PATCH_KIND-$BUILD_NAME
	KSRC_ID+=" + patches $hash"
	BUILD_NAME+=-$PATCH_KIND
}

# Makes the copy equal to the tree, then applies the patches; run under the
# build's exclusive lock. rsync compares contents, not times, and writes
# what differs with a new time: make then rebuilds what the last patches
# changed, or what a new base changed (a bisect step), and nothing else.
apply_patches() {
	local f log=$KBUILD/patches.log
	rm -f "$KBUILD/.test_hmm-built"
	mkdir -p "$KBUILD" "$KSRC"
	progress "build: syncing the copy $KSRC with $PATCH_BASE"
	rsync -rlpD --checksum --delete --exclude=/.git --out-format='%i %n' \
		"$PATCH_BASE/" "$KSRC/" >"$log" 2>&1 ||
		die 125 "copying $PATCH_BASE failed; see $log"
	progress "build: $(grep -c '^>f' "$log") files copied"
	while read -r f; do
		progress "build: applying ${f##*/}"
		patch -p1 -N -s --no-backup-if-mismatch -r - -d "$KSRC" \
			<"$f" >>"$log" 2>&1 ||
			die 125 "${f##*/} does not apply to $PATCH_BASE; see $log"
	done < <(patch_files)
}

# --- Step: configure -------------------------------------------------------

config_hash() {
	# The recipe: tinyconfig + fragment(s), and this function's version.
	# Kconfig.fragment alone hashes as it always did.
	{
		echo "tinyconfig+fragment v1"
		cat "$REPO/Kconfig.fragment"
			if on --kasan; then
			echo "+Kconfig.kasan"
			cat "$REPO/Kconfig.kasan"
		fi
	} | sha1sum | cut -c1-16
}

# Every CONFIG_X=v and "# CONFIG_X is not set" of the fragments, as X=v;
# when several set a symbol, the last one wins, as in merge_config.sh.
fragment_symbols() {
	sed -nE -e 's/^(CONFIG_[A-Za-z0-9_]+)=(.*)$/\1=\2/p' \
		-e 's/^# (CONFIG_[A-Za-z0-9_]+) is not set$/\1=n/p' \
		"${FRAGMENTS[@]}" |
		awk '{
			i = index($0, "="); sym = substr($0, 1, i - 1);
			if (!(sym in val)) order[n++] = sym;
			val[sym] = substr($0, i + 1);
		}
		END { for (i = 0; i < n; i++) print order[i] "=" val[order[i]] }'
}

check_config() {
	local line sym want got bad=
	while read -r line; do
		sym=${line%%=*}
		want=${line#*=}
		got=$(sed -nE "s/^$sym=(.*)$/\1/p" "$KBUILD/.config")
		[ -n "$got" ] || got=n
		[ "$got" = "$want" ] || bad+=" $sym=$want(got $got)"
	done < <(fragment_symbols)
	[ -z "$bad" ] || die 125 "configuration lacks:$bad; see $KBUILD/config.log"
}

configure() {
	if [ -f "$KBUILD/.config" ] &&
	   [ "$(cat "$KBUILD/.test_hmm-config" 2>/dev/null)" = "$CONFIG_HASH" ]; then
		return 0
	fi
	progress "configure: tinyconfig + ${FRAGMENTS[*]##*/} in $KBUILD"
	rm -f "$KBUILD/.test_hmm-config" "$KBUILD/.test_hmm-built"
	{
		make -C "$KSRC" O="$KBUILD" tinyconfig &&
		"$KSRC/scripts/kconfig/merge_config.sh" -m -O "$KBUILD" \
			"$KBUILD/.config" "${FRAGMENTS[@]}" &&
		make -C "$KSRC" O="$KBUILD" olddefconfig
	} >"$KBUILD/config.log" 2>&1 ||
		die 125 "configuration failed; see $KBUILD/config.log"
	check_config
	echo "$CONFIG_HASH" >"$KBUILD/.test_hmm-config"
}

# --- Step: build -----------------------------------------------------------

kernel_up_to_date() {
	[ -f "$KBUILD/arch/x86/boot/bzImage" ] &&
	[ -f "$KBUILD/.config" ] &&
	[ "$(cat "$KBUILD/.test_hmm-config" 2>/dev/null)" = "$CONFIG_HASH" ] &&
	[ "$(cat "$KBUILD/.test_hmm-built" 2>/dev/null)" = "$KSRC_ID $CONFIG_HASH" ]
}

build_kernel() {
	rm -f "$KBUILD/.test_hmm-built"
	progress "build: kernel with -j${OPT[-j]} (log: $KBUILD/build.log)"
	make -C "$KSRC" O="$KBUILD" -j"${OPT[-j]}" bzImage modules \
		>"$KBUILD/build.log" 2>&1 ||
		die 125 "kernel build failed; see $KBUILD/build.log"
	make -C "$KSRC" O="$KBUILD" headers_install \
		INSTALL_HDR_PATH="$KBUILD/usr" >>"$KBUILD/build.log" 2>&1 ||
		die 125 "headers_install failed; see $KBUILD/build.log"
	echo "$KSRC_ID $CONFIG_HASH" >"$KBUILD/.test_hmm-built"
	progress "build: kernel done"
}

# The configure step and the kernel build, under the kernel's lock: whoever
# finds the kernel out of date builds it, the others wait; the kernel is
# then used under a shared lock until the run ends.
kernel() {
	CONFIG_HASH=$(config_hash)
	use_or_make build "the kernel build/$BUILD_NAME" \
		"$KBUILD/.test_hmm.lock" building kernel_up_to_date \
		configure_and_build_kernel
	[ "$MADE" = 1 ] || progress "build: kernel up to date ($KBUILD)"
}

configure_and_build_kernel() {
	if on --kernel-patches; then
		apply_patches
	fi
	configure
	build_kernel
}

# Module, test programs, initramfs and logs of one kernel live in
# module/<name> and run/<name>: one run at a time, from here to the end.
lock_run_dir() {
	local dir=$CACHE/run/$BUILD_NAME
	mkdir -p "$dir"
	lock "$dir/.lock" -x build "run/$BUILD_NAME" running
}

# Copy a file only when its content changed, so make sees what is new.
sync_file() {
	cmp -s "$1" "$2" 2>/dev/null || cp "$1" "$2"
}

# The kernel APIs the tree has (compat/probe.sh), into
# $MODDIR/test_hmm_probes.h, probed again whenever the kernel was rebuilt
# (a bisect step) or a probe changed. A tree without what the driver is
# built on cannot run our driver: exit 125, so that a bisect skips it.
probe_tree() {
	local key probes=("$REPO"/compat/probes/*.c)
	key=$({ cat "$REPO/compat/probe.sh" "${probes[@]}"
		stat -c %Y "$KBUILD/vmlinux"
		cat "$KBUILD/include/config/kernel.release"; } |
	      sha256sum | cut -c1-16)
	if [ "$(cat "$MODDIR/probes.key" 2>/dev/null)" != "$key" ]; then
		"$REPO/compat/probe.sh" "$KSRC" "$KBUILD" "$MODDIR" ||
			die 125 "probing the kernel tree failed"
		echo "$key" >"$MODDIR/probes.key"
		progress "probe: $(grep -c '^#define' "$MODDIR/test_hmm_probes.h") of ${#probes[@]} kernel APIs present ($MODDIR/test_hmm_probes.h)"
	fi
	grep -q DMIRROR_HAVE_MMU_INTERVAL_NOTIFIER_TWO_PASS \
		"$MODDIR/test_hmm_probes.h" ||
		die 125 "our driver needs Linux 7.1 or later (two-pass mmu interval notifiers), which $(cat "$KBUILD/include/config/kernel.release") lacks; run the tree's own driver and suite instead: --upstream-driver --upstream-tests"
}

# Builds $REPO/lib/test_hmm.c as an external module against the tree, with
# compat/test_hmm_compat.h forced in for what the tree lacks. Prints
# nothing; the log is $MODDIR/build.log.
build_module() {
	MODDIR=$CACHE/module/$BUILD_NAME
	mkdir -p "$MODDIR"
	probe_tree
	sync_file "$REPO/lib/test_hmm.c" "$MODDIR/test_hmm.c"
	sync_file "$REPO/lib/test_hmm_uapi.h" "$MODDIR/test_hmm_uapi.h"
	sync_file "$REPO/compat/test_hmm_compat.h" "$MODDIR/test_hmm_compat.h"
	# shellcheck disable=SC2016 # $(src) is make's
	printf 'obj-m := test_hmm.o\nccflags-y := -include $(src)/test_hmm_compat.h\n' \
		>"$MODDIR/Kbuild.new"
	sync_file "$MODDIR/Kbuild.new" "$MODDIR/Kbuild"
	make -C "$KSRC" O="$KBUILD" M="$MODDIR" W=1 modules \
		>"$MODDIR/build.log" 2>&1 ||
		die 125 "module build failed; see $MODDIR/build.log"
}

# The test programs, static, against the tree's harness and UAPI headers;
# our lib/test_hmm_uapi.h comes before the tree's, the tree gives
# mm/gup_test.h. liburing is optional in a kernel tree, here it is used.
# cc_test PROG OUT FLAGS...: gcc on our test program PROG into OUT, as the
# runs build it and lint checks it, with FLAGS last.
cc_test() {
	local prog=$1 out=$2
	shift 2
	gcc -O2 -Wall -Wextra -DHMM_HAVE_LIBURING \
		-isystem "$KBUILD/usr/include" \
		-I "$KSRC/tools/testing/selftests" -I "$REPO" -I "$KSRC" \
		-o "$out" "$REPO/tools/testing/selftests/mm/$prog.c" "$@"
}

build_tests() {
	local out=$CACHE/run/$BUILD_NAME prog
	mkdir -p "$out"
	: >"$out/tests-build.log"
	for prog in hmm-tests hmm-bench; do
		cc_test "$prog" "$out/$prog" -static -luring -lpthread \
			>>"$out/tests-build.log" 2>&1 ||
			die 125 "$prog build failed; see $out/tests-build.log"
	done
	TESTS_DIR=$out
	[ "$GUEST_MODE" = upstream ] || return 0
	(cd "$KSRC/tools/testing/selftests/mm" &&
	 gcc -static -O2 -w -isystem "$KBUILD/usr/include" \
		-I "$KSRC/tools/testing/selftests" -I "$KSRC" \
		-o "$out/upstream-hmm-tests" hmm-tests.c vm_util.c \
		hugepage_settings.c -lpthread -lm) >>"$out/tests-build.log" 2>&1 ||
		die 125 "the tree's hmm-tests did not build; see $out/tests-build.log"
}

build() {
	if on --lint; then
		find_sparse
	fi
	kernel
	# The series is checked in a copy of its own (export-series.sh).
	if on --export-series; then
		return 0
	fi
	lock_run_dir
	if on --lint; then
		return 0
	fi
	# The tree's driver alone needs nothing of ours to build.
	if [ "$DRIVER_TREE" = 0 ] || [ "$BENCH_BOTH" = 1 ]; then
		build_module
	fi
	build_tests
	KREL=$(cat "$KBUILD/include/config/kernel.release")
	# The driver loaded (packed as test_hmm.ko), and the tree's.
	TREE_DRIVER=$KBUILD/lib/test_hmm.ko
	if [ "$DRIVER_TREE" = 1 ] || [ "$BENCH_BOTH" = 1 ]; then
		[ -f "$TREE_DRIVER" ] ||
			die 125 "the tree did not build lib/test_hmm.ko"
	fi
	DRIVER=$TREE_DRIVER
	[ "$DRIVER_TREE" = 1 ] || DRIVER=$MODDIR/test_hmm.ko
	progress "build: driver $DRIVER"
	[ "$BENCH_BOTH" = 0 ] || progress "build: then the driver $TREE_DRIVER"
}

# --- Step: lint ------------------------------------------------------------

# Is $1 a sparse the tree accepts (its scripts/checker-valid.sh)?
sparse_valid() {
	[ "$(sh "$KSRC/scripts/checker-valid.sh" "$1" 2>/dev/null)" = 1 ]
}

# SPARSE: a sparse the tree accepts. Linux 7.3's headers use
# __typeof_unqual__ under __CHECKER__, which Debian 12's sparse (0.6.4) does
# not parse, so the tree refuses it; then sparse is built, once, from the
# source package of Debian sid (0.6.5~rc1 today: its upstream tarball, with
# none of Debian's build patches) into $CACHE/tools/sparse.
find_sparse() {
	local tools=$CACHE/tools dir=$CACHE/tools/sparse log=$CACHE/tools/sparse.log
	local src
	for SPARSE in sparse "$dir/sparse"; do
		! sparse_valid "$SPARSE" || return 0
	done
	mkdir -p "$tools"
	lock "$tools/.lock" -x build "the tools" building
	if ! sparse_valid "$dir/sparse"; then
		progress "lint: building sparse from Debian sid's source (the system's is too old for the tree)"
		rm -rf "$dir" "$tools/apt"
		mkdir -p "$dir" "$tools/apt/lists/partial" "$tools/apt/archives/partial"
		echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(debian_mirror) sid main" \
			>"$tools/apt/sources.list"
		{ APT_DIR=$tools/apt private_apt apt-get update &&
		  (cd "$tools/apt" &&
		   APT_DIR=$tools/apt private_apt apt-get source \
			--download-only sparse); } >"$log" 2>&1 ||
			die 125 "could not fetch the source of sparse; see $log"
		src=$(find "$tools/apt" -maxdepth 1 -name 'sparse_*.orig.tar.*')
		if ! { tar -xf "$src" -C "$dir" --strip-components=1 &&
		       make -C "$dir" -j"$NPROC" HAVE_LLVM=no HAVE_SQLITE=no \
				HAVE_GTK=no sparse; } >>"$log" 2>&1; then
			die 125 "could not build sparse; see $log"
		fi
		sparse_valid "$dir/sparse" ||
			die 125 "the tree does not accept $dir/sparse either"
	fi
	unlock "$tools/.lock"
	SPARSE=$dir/sparse
}

# lint_step NAME CMD...: one analyser, a progress line, and its output; fails
# if CMD fails or prints anything.
lint_step() {
	local name=$1 out
	shift
	progress "lint: $name"
	if ! out=$("$@" 2>&1) || [ -n "$out" ]; then
		printf '%s\n' "$out"
		progress "lint: $name: FAILED"
		return 1
	fi
}

lint_checkpatch() {
	local files=(lib/test_hmm.c lib/test_hmm_uapi.h
		     tools/testing/selftests/mm/hmm-tests.c
		     tools/testing/selftests/mm/hmm-bench.c
		     compat/test_hmm_compat.h compat/probes/*.c)
	cd "$REPO" &&
	"$KSRC/scripts/checkpatch.pl" --strict --no-tree --quiet \
		--show-types -f "${files[@]}"
}

# The fixes are patches for the submitter to sign: all but the sign-off.
lint_kernel_fixes() {
	fixed_bugs >/dev/null &&
	patch_files "$KERNEL_FIXES" | while read -r f; do
		"$KSRC/scripts/checkpatch.pl" --strict --quiet --show-types \
			--ignore MISSING_SIGN_OFF "$f" || exit 1
	done
}

# From scratch, or an up-to-date module would hide its warnings.
lint_module_w1() {
	rm -f "$MODDIR"/*.o "$MODDIR"/*.ko
	build_module
	grep -E 'warning:|error:' "$MODDIR/build.log" || true
}

# sparse over the module (C=2: every file, built or not); its findings are
# warnings and errors in the build output.
lint_sparse() {
	make -C "$KSRC" O="$KBUILD" M="$MODDIR" W=1 C=2 CHECK="$SPARSE" modules \
		>"$MODDIR/sparse.log" 2>&1 || cat "$MODDIR/sparse.log"
	grep -E 'warning:|error:' "$MODDIR/sparse.log" || true
}

lint_kernel_doc() {
	"$KSRC/scripts/kernel-doc" -Wall -none "$REPO/lib/test_hmm.c" \
		"$REPO/lib/test_hmm_uapi.h"
}

# The tree's coccinelle rules on the module; a finding is a line naming one
# of its files.
lint_coccicheck() {
	make -C "$KSRC" O="$KBUILD" M="$MODDIR" coccicheck MODE=report \
		J="$NPROC" >"$MODDIR/coccicheck.log" 2>&1 ||
		cat "$MODDIR/coccicheck.log"
	grep -E '^(\./)?[^ ]*\.[ch]:[0-9]+:' "$MODDIR/coccicheck.log" || true
}

# The test programs as the run builds them, every warning an error.
lint_tests() {
	local prog
	for prog in hmm-tests hmm-bench; do
		cc_test "$prog" /dev/null -c -Werror || return 1
	done
}

lint_shellcheck() {
	cd "$REPO" &&
	shellcheck run_vm.sh fresh-check.sh export-series.sh .ci/run \
		compat/probe.sh &&
	shellcheck -s sh guest-init.sh tools/testing/selftests/mm/test_hmm.sh
}

# Every analyser, each a progress line; all of them run even if one fails.
lint() {
	local rc=0
	MODDIR=$CACHE/module/$BUILD_NAME
	lint_step "checkpatch.pl --strict" lint_checkpatch || rc=1
	lint_step "checkpatch.pl --strict kernel-fixes/ (but the sign-off)" \
		lint_kernel_fixes || rc=1
	lint_step "module build with W=1" lint_module_w1 || rc=1
	lint_step "sparse C=2 ($SPARSE)" lint_sparse || rc=1
	lint_step "kernel-doc -Wall -none" lint_kernel_doc || rc=1
	lint_step "coccicheck MODE=report" lint_coccicheck || rc=1
	lint_step "test programs with -Wall -Wextra -Werror" lint_tests ||
		rc=1
	lint_step "shellcheck" lint_shellcheck || rc=1
	if [ $rc = 0 ]; then
		progress "lint: clean"
	else
		progress "lint: FAILED"
	fi
	return $rc
}

# --- Step: pack ------------------------------------------------------------

# list_tests PROG: the kselftest names (fixture.variant.test) of PROG, from
# the table the harness prints on stderr for -l. Each row is
# printf("%-20s %-25s %s\n", fixture, variant, test), any of them empty: a
# column is its value padded to its width, then one space, and a value
# longer than its width pushes the rest of the row right. So each row is
# read column by column from the left, never at fixed offsets. A fixture's
# first row names it; its variants and tests follow, one of each a row,
# until a row of dashes. Lines starting with '#' are the header and
# messages (the kernel's hmm-tests says "# [INFO] detected hugetlb page
# size" on stdout); stdout is not read.
list_tests() {
	"$1" -l 2>&1 >/dev/null | awk '
		# The next column of row, WIDTH wide; takes it off row.
		function column(width,   v) {
			v = row
			sub(/ .*/, "", v)
			row = substr(row, (length(v) > width ? length(v) : width) + 2)
			return v
		}
		function flush(  i, j) {
			for (i = 0; i < nt; i++)
				if (nv == 0) print fixture "." tests[i]
				else for (j = 0; j < nv; j++)
					print fixture "." vars[j] "." tests[i]
			nv = nt = 0
		}
		/^-+$/ { flush(); next }
		/^#/ { next }
		{
			row = $0
			f = column(20); v = column(25); t = row
			sub(/ +$/, "", t)
			if (f != "") fixture = f
			if (v != "") vars[nv++] = v
			if (t != "") tests[nt++] = t
		}
		END { flush() }'
}

# The names of the tests of $TESTS_PROG matching --tests, one a line;
# nothing for all.
select_tests() {
	local names prog=$TESTS_DIR/$TESTS_PROG
	on --tests || return 0
	names=$(list_tests "$prog" | grep -E -- "${OPT[--tests]}" || true)
	[ -n "$names" ] || die 2 "no test of $TESTS_PROG matches '${OPT[--tests]}'; names are:
$(list_tests "$prog")"
	progress "pack: $(echo "$names" | wc -l) tests of $TESTS_PROG match '${OPT[--tests]}'"
	echo "$names"
}

# The guest's settings, read by guest-init.sh: NAME=value lines, each value
# one word that needs no quoting.
write_guest_env() {
	local name value
	for name in GUEST_MODE REPEAT SPM_ADDR0 SPM_ADDR1 FAULT_PERCENT \
		    BENCH_BOTH FIXED_BUGS GUEST_PASS GUEST_FAIL GUEST_SKIP; do
		case $name in
		REPEAT) value=${OPT[--repeat]} ;;
		FAULT_PERCENT) value=${OPT[--fault-inject]:-0} ;;
		*) value=${!name} ;;
		esac
		[[ $value =~ ^[A-Za-z0-9_,]+$ ]] ||
			die 125 "guest setting $name='$value' is not one plain word"
		echo "$name=$value"
	done
}

# The initramfs: busybox, the test programs, the driver, our guest-init.sh
# as /init, and beside it what this run asks of it (see guest-init.sh).
pack() {
	local root=$CACHE/run/$BUILD_NAME/root mods names f
	names=$(select_tests)
	rm -rf "$root"
	mods=$root/lib/modules/$KREL
	mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,add,usr/share/kselftest/mm} \
		"$mods/kernel/lib"
	cp /bin/busybox "$root/bin/busybox"
	cp "$TESTS_DIR/hmm-tests" "$TESTS_DIR/hmm-bench" \
		"$REPO/tools/testing/selftests/mm/test_hmm.sh" \
		"$root/usr/share/kselftest/mm/"
	if [ "$GUEST_MODE" = upstream ]; then
		cp "$TESTS_DIR/upstream-hmm-tests" "$root/usr/share/kselftest/mm/"
	fi
	cp "$DRIVER" "$mods/kernel/lib/test_hmm.ko"
	echo kernel/lib/test_hmm.ko >"$mods/modules.order"
	cp "$KBUILD"/modules.builtin{,.modinfo} "$mods/"
	depmod -b "$root" "$KREL"
	if [ "$BENCH_BOTH" = 1 ]; then
		cp "$TREE_DRIVER" "$root/test_hmm_upstream.ko"
	fi
	while IFS= read -r f; do
		[ -z "$f" ] || cp "$f" "$root/add/"
	done <<<"${OPT[--add]}"
	cp "$REPO/guest-init.sh" "$root/init"
	chmod +x "$root/init"
	write_guest_env >"$root/test_hmm.env"
	[ -z "$names" ] || echo "$names" >"$root/tests.list"
	if [ "$GUEST_MODE" = exec ]; then
		printf '%s\n' "${OPT[--exec]}" >"$root/exec.sh"
	fi
	INITRD=$CACHE/run/$BUILD_NAME/initramfs.cpio.gz
	(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD"
}

# --- Step: boot ------------------------------------------------------------

# Sets QEMU_ARGS to what every boot has in common.
qemu_base_args() {
	# One socket per node: CPUs sharing a cache across nodes make the
	# scheduler's topology check WARN.
	QEMU_ARGS=(-machine pc -smp "2,sockets=2,cores=1,threads=1" -m 4G
		-object "memory-backend-ram,id=m0,size=2G"
		-object "memory-backend-ram,id=m1,size=2G"
		-numa "node,nodeid=0,cpus=0,memdev=m0"
		-numa "node,nodeid=1,cpus=1,memdev=m1"
		-display none -monitor none -no-reboot
		-device "isa-debug-exit,iobase=0xf4,iosize=0x04"
		-kernel "$KBUILD/arch/x86/boot/bzImage")
}

# KVM is used only when a short probe boot reaches user space; on hosts where
# /dev/kvm exists but guests hang, that costs one probe per host boot.
pick_accel() {
	local cache=$CACHE/kvm-probe boot_id probe_init dir
	ACCEL=tcg
	[ -w /dev/kvm ] || return 0
	boot_id=$(cat /proc/sys/kernel/random/boot_id)
	lock "$CACHE/kvm-probe.lock" -x boot "the KVM probe" probing
	if [ "$(sed -n 1p "$cache" 2>/dev/null)" = "$boot_id" ]; then
		ACCEL=$(sed -n 2p "$cache")
		unlock "$CACHE/kvm-probe.lock"
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
	if timeout -k 2 20 qemu-system-x86_64 "${QEMU_ARGS[@]}" -accel kvm \
		-cpu host -initrd "$dir.cpio.gz" -serial stdio \
		-append "console=ttyS0 panic=-1 quiet" </dev/null 2>/dev/null |
		grep -q test_hmm-kvm-probe-ok; then
		ACCEL=kvm
	fi
	rm -rf "$dir" "$dir.cpio.gz"
	printf '%s\n%s\n' "$boot_id" "$ACCEL" >"$cache"
	unlock "$CACHE/kvm-probe.lock"
}

loadavg() {
	cut -d' ' -f1-3 /proc/loadavg
}

HOST_LOAD_PIDS=()

# --host-load: 2 x nproc busy loops until the boot step ends. Each is
# stopped by stop_host_load (also on exit and on INT/TERM) and, should that
# never run, by timeout(1) shortly after the guest's own time limit.
start_host_load() {
	local n i secs=$((TIMEOUT + 60))
	n=$((2 * $(nproc)))
	trap stop_host_load EXIT
	trap 'stop_host_load; exit 130' INT
	trap 'stop_host_load; exit 143' TERM
	for ((i = 0; i < n; i++)); do
		(close_lock_fds
		 exec timeout -k 5 "$secs" sh -c 'while :; do :; done') &
		HOST_LOAD_PIDS+=("$!")
	done
	progress "boot: host load: $n busy loops (for at most ${secs}s); load average $(loadavg)"
}

stop_host_load() {
	[ ${#HOST_LOAD_PIDS[@]} -gt 0 ] || return 0
	kill "${HOST_LOAD_PIDS[@]}" 2>/dev/null || true
	wait "${HOST_LOAD_PIDS[@]}" 2>/dev/null || true
	HOST_LOAD_PIDS=()
}

# How many of the last tests in a row the harness stopped for running past
# its timeout.
trailing_timeouts() {
	awk '/^# [^ ]+: Test terminated by timeout/ { timed_out = 1; next }
	     /^(not )?ok [0-9]+ / { n = timed_out ? n + 1 : 0; timed_out = 0 }
	     END { print n + 0 }' "$RESULTS_LOG"
}

# Stops QEMU once the guest has printed nothing for --idle-timeout seconds,
# or once --max-timeouts tests in a row ran into the harness timeout, and
# leaves a note saying which. A slow host makes tests slower, not silent:
# every test prints when it starts and when it ends.
watch_idle() {
	local last
	while sleep 10; do
		last=$(stat -c %Y "$RESULTS_LOG" 2>/dev/null) || continue
		if [ "${OPT[--max-timeouts]}" -gt 0 ] &&
		   [ "$(trailing_timeouts)" -ge "${OPT[--max-timeouts]}" ]; then
			echo timeouts >"$IDLE_NOTE"
		elif [ $(($(date +%s) - last)) -ge "${OPT[--idle-timeout]}" ]; then
			echo idle >"$IDLE_NOTE"
		else
			continue
		fi
		pkill -f -- "-initrd $INITRD" || true
		return
	done
}

boot() {
	# QEMU 7.2's TCG runs rep movsb a byte per step, at a sixth of the
	# speed of rep movsq (520 against 3050 MiB/s measured in the guest):
	# a CPU that advertises fast rep movsb (ERMS, FSRM) makes the kernel
	# copy to and from user space, and memcpy(), that much slower, so the
	# emulated CPU does not advertise it.
	local rundir=$CACHE/run/$BUILD_NAME cpu=max,-erms,-fsrm rc watcher
	CONSOLE_LOG=$rundir/console.log
	RESULTS_LOG=$rundir/results.log
	qemu_base_args
	pick_accel
	[ "$ACCEL" = kvm ] && cpu=host
	if on --host-load; then
		start_host_load
	fi
	progress "boot: QEMU ($ACCEL), stopped after ${OPT[--idle-timeout]}s without output (at most ${TIMEOUT}s)"
	progress "boot: console log $CONSOLE_LOG"
	: >"$CONSOLE_LOG"
	: >"$RESULTS_LOG"
	IDLE_NOTE=$rundir/idle
	rm -f "$IDLE_NOTE"
	(close_lock_fds; watch_idle) &
	watcher=$!
	# --foreground: QEMU stays in our process group, so that ^C stops it.
	set +e
	timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 \
		"${QEMU_ARGS[@]}" \
		-accel "$ACCEL" -cpu "$cpu" -initrd "$INITRD" \
		-serial "file:$CONSOLE_LOG" -serial stdio \
		-append "console=ttyS0 panic=-1 loglevel=7 \
memmap=$SPM_SIZE\$$SPM_ADDR0 memmap=$SPM_SIZE\$$SPM_ADDR1" \
		</dev/null 2>"$rundir/qemu.log" |
		sed -u 's/\r$//' | tee "$RESULTS_LOG"
	rc=${PIPESTATUS[0]}
	kill "$watcher" 2>/dev/null
	wait "$watcher" 2>/dev/null
	set -e
	QEMU_RC=$rc
	if on --host-load; then
		progress "boot: host load average $(loadavg) at the end; stopping the busy loops"
		stop_host_load
	fi
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

# One line for each of the first splats, without what differs between two
# runs of the same bug (time, CPU, task, offsets), for --mutants to compare.
splat_signatures() {
	local n
	for n in $(splat_lines | head -n 8); do
		sed -n "${n}p" "$CONSOLE_LOG" |
			sed -E -e 's/^\[ *[0-9.]+\] //' -e 's/(\+0x| CPU| PID|, CPU).*//' \
			       -e 's/(task [^ ]+):[0-9]+ /\1 /' \
			       -e 's/^/# splat: /'
	done | sort -u
}

print_splats() {
	local n
	for n in $(splat_lines | head -n 8); do
		sed -n "${n},$((n + 25))p" "$CONSOLE_LOG"
		echo ---
	done >&2
}

# verdict ok|fail TEXT: one check of the run, counted in the closing line.
verdict() {
	if [ "$1" = ok ]; then
		echo "ok - $2"
		N_PASS=$((N_PASS + 1))
	else
		echo "not ok - $2"
		N_FAIL=$((N_FAIL + 1))
	fi
}

# TAP lines of the guest: sets TAP_PASS, TAP_FAIL, TAP_SKIP.
count_tap() {
	TAP_PASS=$(grep -cE '^ok [0-9]+ ' "$RESULTS_LOG" || true)
	TAP_SKIP=$(grep -cE '^ok [0-9]+ .*# SKIP' "$RESULTS_LOG" || true)
	TAP_FAIL=$(grep -cE '^not ok [0-9]+ ' "$RESULTS_LOG" || true)
	TAP_PASS=$((TAP_PASS - TAP_SKIP))
}

# Fails a check when the guest did not end by itself: timed out (naming the
# test that was running) or died without reporting. Only the guest's init
# can make QEMU exit with an odd status.
check_guest_end() {
	local running
	running=$(grep -oE '^#  RUN +[^ ]+' "$RESULTS_LOG" | tail -n 1 |
		  awk '{ print $3 }' || true)
	if [ "$(cat "$IDLE_NOTE" 2>/dev/null)" = timeouts ]; then
		running=$(grep -oE '^not ok [0-9]+ [^ ]+' "$RESULTS_LOG" |
			  tail -n 1 | awk '{ print $4 }')
		verdict fail "wedged: ${OPT[--max-timeouts]} harness timeouts in a row, the last $running; the rest not run"
		return 1
	fi
	if [ -f "$IDLE_NOTE" ]; then
		verdict fail "no output for ${OPT[--idle-timeout]}s while running ${running:-the command}: hung"
		return 1
	fi
	if [ "$QEMU_RC" = 124 ] || [ "$QEMU_RC" = 137 ]; then
		verdict fail "timeout after ${TIMEOUT}s while running ${running:-the command}"
		return 1
	fi
	if [ $((QEMU_RC & 1)) != 1 ] || [ $((QEMU_RC >> 1)) -lt $GUEST_PASS ]; then
		verdict fail "the guest died before reporting (QEMU exit $QEMU_RC)"
		return 1
	fi
}

# --repeat: the tests that failed in at least one repetition, with how many
# times they failed out of how many times they ran.
repeat_table() {
	local table finished
	# The harness closes each repetition it finished with its totals.
	finished=$(grep -c '^# Totals:' "$RESULTS_LOG" || true)
	table=$(awk '
		/^ok [0-9]+ / { runs[$3]++ }
		/^not ok [0-9]+ / { runs[$4]++; failed[$4]++ }
		END {
			for (t in failed)
				printf "%s: %d/%d failed\n", t, failed[t], runs[t]
		}' "$RESULTS_LOG" | sort)
	if [ -n "$table" ]; then
		echo "# tests that failed in any repetition ($finished of ${OPT[--repeat]} finished):"
		echo "$table"
	else
		echo "# no test failed in any repetition ($finished of ${OPT[--repeat]} finished)"
	fi
}

# The suite, --exec, --bench: every TAP line counts, then the guest's end.
report_tests() {
	count_tap
	N_PASS=$TAP_PASS N_FAIL=$TAP_FAIL N_SKIP=$TAP_SKIP
	[ "${OPT[--repeat]}" = 1 ] || repeat_table
	if ! check_guest_end; then
		:
	elif [ $((QEMU_RC >> 1)) = $GUEST_FAIL ]; then
		[ "$N_FAIL" != 0 ] || verdict fail "the guest command failed"
	elif [[ $GUEST_MODE == @(exec|bench) ]] &&
	     [ "$N_PASS$N_FAIL$N_SKIP" = 000 ]; then
		# A plain command: one test.
		if [ $((QEMU_RC >> 1)) = $GUEST_SKIP ]; then
			N_SKIP=1
		else
			N_PASS=1
		fi
	fi
}

# --fault-inject: test failures are allowed; the checks are that tests ran,
# failures were injected, the driver unloaded after each repetition and
# (in report) that the kernel log is clean.
report_fault() {
	local injected unloaded
	N_PASS=0 N_FAIL=0 N_SKIP=0
	if grep -q '^test_hmm-fault: no-debugfs' "$RESULTS_LOG"; then
		verdict fail "fault injection: the guest has no /sys/kernel/debug/fail_test_hmm: the driver does not create it, or the kernel lacks CONFIG_FAULT_INJECTION_DEBUG_FS"
		return 0
	fi
	check_guest_end || true
	count_tap
	if [ $((TAP_PASS + TAP_FAIL + TAP_SKIP)) -gt 0 ]; then
		verdict ok "$((TAP_PASS + TAP_FAIL + TAP_SKIP)) tests ran: $TAP_PASS passed, $TAP_FAIL failed under injection (allowed), $TAP_SKIP skipped"
	else
		verdict fail "no test ran under fault injection"
	fi
	injected=$(awk '/^test_hmm-fault: injected [0-9]+$/ { n += $3; seen = 1 }
			END { if (seen) print n }' "$RESULTS_LOG")
	if [ -z "$injected" ]; then
		verdict fail "failures injected: unknown, the guest did not get that far"
	elif [ "$injected" -gt 0 ]; then
		verdict ok "$injected failures injected (probability ${OPT[--fault-inject]} %)"
	else
		verdict fail "no failure injected at ${OPT[--fault-inject]} %: select more tests or raise the percentage"
	fi
	unloaded=$(grep -c '^test_hmm-fault: unloaded$' "$RESULTS_LOG" || true)
	if grep -q '^test_hmm-fault: unload failed' "$RESULTS_LOG"; then
		verdict fail "module did not unload"
	elif [ "$unloaded" = "${OPT[--repeat]}" ]; then
		verdict ok "module unloaded"
	else
		verdict fail "module unloaded $unloaded times of ${OPT[--repeat]}"
	fi
}

report() {
	if ! grep -q '^test_hmm-guest: started' "$RESULTS_LOG"; then
		progress "report: the guest never reached user space"
		tail -n 40 "$CONSOLE_LOG" >&2
		echo "0 passed, 0 failed, 0 skipped"
		exit 125
	fi
	if [ "$GUEST_MODE" = fault ]; then
		report_fault
	else
		report_tests
	fi
	if [ "$GUEST_MODE" = bench ]; then
		bench_outputs
	fi
	if [ -n "$(splat_lines)" ]; then
		verdict fail "kernel log: splat (see $CONSOLE_LOG)"
		splat_signatures
		print_splats
	else
		verdict ok "kernel log: no splat"
	fi
	progress "report: console $CONSOLE_LOG, results $RESULTS_LOG"
	echo "$N_PASS passed, $N_FAIL failed, $N_SKIP skipped"
	[ "$N_FAIL" = 0 ] || exit 1
	exit 0
}

# The bench's tables as CSV files, one a table, and plots of them, in
# run/<name>/bench: hmm-bench prints each table also as "csv,<table>,..."
# lines, the first its header; after guest-init.sh's "# test_hmm: the
# kernel tree" line they are the tree's driver's (--bench
# --upstream-driver). The files have a first column "driver": ours or tree.
bench_outputs() {
	local dir=$CACHE/run/$BUILD_NAME/bench f
	rm -rf "$dir"
	mkdir -p "$dir"
	awk -v dir="$dir" '
		BEGIN { driver = "ours" }
		/^# test_hmm: the kernel tree/ { driver = "tree" }
		/^csv,[a-z0-9_]+,/ {
			table = $0
			sub(/^csv,/, "", table)
			row = table
			sub(/,.*/, "", table)
			sub(/^[^,]*,/, "", row)
			file = dir "/" table ".csv"
			if (row !~ /^[0-9]/) {
				if (!(file in header))
					print "driver," row > file
				header[file] = 1
			} else if (file in header) {
				print driver "," row > file
			}
		}' "$RESULTS_LOG"
	for f in "$dir"/*.csv; do
		[ -f "$f" ] || continue
		progress "bench: $f"
	done
	bench_plots "$dir"
	bench_goals "$dir"
}

# bench_goals DIR: one line per goal of the benchmark: its name,
# measured, target, met or not, from the CSV files of DIR.
bench_goals() {
	local dir=$1
	[ -f "$dir/migration.csv" ] || return 0
	awk -F, '
		function goal(name, v, op, t,   met) {
			if (v == "") {
				printf "# goal: %s: not measured (target %s %s)\n", name, op, t
				return
			}
			met = op == ">=" ? v >= t : v <= t
			printf "# goal: %s: %.2f (target %s %s): %s\n", name, v, op, t,
			       met ? "met" : "NOT met"
		}
		FNR == 1 { file = FILENAME; sub(/.*\//, "", file); next }
		file == "migration.csv" { for (c = 3; c <= 6; c++) m[$1, $2, c] = $c }
		file ~ /^munmap_/ && $1 == "ours" {
			lat = file; sub(/^munmap_/, "", lat); sub(/\.csv$/, "", lat)
			fixed[lat, $2] = $3; single[lat, $2] = $4; two[lat, $2] = $5
		}
		function ratio(a, b) { return a == "" || b == "" || b == 0 ? "" : a / b }
		END {
			goal("THP/4K sys->dev, 64 MiB", ratio(m["ours", 64, 4], m["ours", 64, 3]), ">=", 3)
			goal("THP/4K dev->sys, 64 MiB", ratio(m["ours", 64, 6], m["ours", 64, 5]), ">=", 3)
			goal("THP sys->dev, 64 MiB / 8 MiB (no fall, within 10 %)",
			     ratio(m["ours", 64, 4], m["ours", 8, 4]), ">=", 0.9)
			goal("THP dev->sys, 64 MiB / 8 MiB (no fall, within 10 %)",
			     ratio(m["ours", 64, 6], m["ours", 8, 6]), ">=", 0.9)
			goal("ours/tree 4K sys->dev, 64 MiB", ratio(m["ours", 64, 3], m["tree", 64, 3]), ">=", 1)
			goal("ours/tree THP sys->dev, 64 MiB", ratio(m["ours", 64, 4], m["tree", 64, 4]), ">=", 1)
			goal("ours/tree 4K dev->sys, 64 MiB", ratio(m["ours", 64, 5], m["tree", 64, 5]), ">=", 1)
			goal("ours/tree THP dev->sys, 64 MiB", ratio(m["ours", 64, 6], m["tree", 64, 6]), ">=", 1)
			goal("two-pass - fixed, in L, L = 200 us, N = 8",
			     two[200, 8] == "" ? "" : (two[200, 8] - fixed[200, 8]) / 200, "<=", 2)
			goal("single/two-pass, L = 2 ms, N = 8", ratio(single[2000, 8], two[2000, 8]), ">=", 6)
		}' "$dir/migration.csv" "$dir"/munmap_*.csv
}

# bench_plots DIR: SVG plots of the CSV files in DIR: migration throughput
# over the size (4 KiB and THP, both ways, each driver), and munmap() time
# over the number of devices (single-pass, two-pass and the fixed cost, one
# plot per flush latency).
bench_plots() {
	local dir=$1 f name lat driver series
	if ! command -v gnuplot >/dev/null; then
		progress "bench: no gnuplot (Debian: gnuplot-nox): no plots"
		return 0
	fi
	for f in "$dir"/*.csv; do
		[ -f "$f" ] || continue
		name=$(basename "$f" .csv)
		case $name in
		migration)
			series=()
			for driver in ours tree; do
				series+=("$(bench_series "$f" $driver \
					3 "$driver, 4K sys->dev" \
					4 "$driver, THP sys->dev" \
					5 "$driver, 4K dev->sys" \
					6 "$driver, THP dev->sys")")
			done
			bench_gnuplot "$dir/$name.svg" \
				"Migration throughput (median)" "size (MiB)" \
				"MiB/s" "set logscale x 2" "${series[@]}" ;;
		munmap_*)
			lat=${name#munmap_}
			bench_gnuplot "$dir/$name.svg" \
				"munmap() over N mirroring devices, flush latency $lat us (median)" \
				"devices" "us" "set xtics (1, 2, 4, 8)" \
				"$(bench_series "$f" ours 3 "fixed cost (L = 0)" \
					4 "single-pass" 5 "two-pass")" ;;
		*) continue ;;
		esac
		progress "bench: plot $dir/$name.svg"
	done
}

# bench_series CSV DRIVER COLUMN TITLE...: the gnuplot plot clauses of
# DRIVER's rows (x: the second column), comma-separated; nothing if the
# file has none.
bench_series() {
	local csv=$1 driver=$2 out=()
	shift 2
	grep -q "^$driver," "$csv" || return 0
	while [ $# -ge 2 ]; do
		out+=("\"< grep '^$driver,' $csv\" using 2:$1 with linespoints title \"$2\"")
		shift 2
	done
	(IFS=,; echo "${out[*]}")
}

# bench_gnuplot SVG TITLE XLABEL YLABEL SETUP SERIES...: one plot of the
# non-empty SERIES.
bench_gnuplot() {
	local svg=$1 title=$2 xlabel=$3 ylabel=$4 setup=$5 plot='' series
	shift 5
	for series in "$@"; do
		[ -z "$series" ] || plot+=${plot:+, }$series
	done
	if ! gnuplot >"$svg.log" 2>&1 <<EOF; then
set terminal svg size 900,540 dynamic
set output "$svg"
set datafile separator ","
set title "$title"
set xlabel "$xlabel"
set ylabel "$ylabel"
set key outside right
set grid
$setup
plot $plot
EOF
		progress "bench: gnuplot failed; see $svg.log"
		return 0
	fi
	rm -f "$svg.log"
}

# --- Mode: --mutants -------------------------------------------------------

# mutant_field FILE KEY: the value of "KEY:" in the text before the diff.
mutant_field() {
	awk -v key="$2:" '/^(diff |--- |Index: )/ { exit }
		$1 == key { sub(/^[^:]*: */, ""); print; exit }' "$1"
}

# What a finished run failed on, one a line: the tests it reported 'not
# ok', its own failed checks but the kernel log's, and each splat.
run_failures() {
	sed -nE -e 's/^not ok [0-9]+ ([^ ]+).*/\1/p' \
		-e '/^not ok - kernel log: splat/d' -e 's/^not ok - (.*)/\1/p' \
		-e 's/^# (splat: .*)/\1/p' "$1" | LC_ALL=C sort -u
}

# run_suite_on LOG ARGS: this script with ARGS, output to LOG; sets
# RUN_RC and RUN_SECS.
run_suite_on() {
	local log=$1 start
	shift
	start=$(date +%s)
	RUN_RC=0
	"$REPO/run_vm.sh" "${MUTANT_ARGS[@]}" "$@" >"$log" 2>&1 || RUN_RC=$?
	RUN_SECS=$(($(date +%s) - start))
}

# The baseline of one suite: the unpatched kernel. Our suite must pass
# there; what the tree's suite fails on there is not counted for a mutant.
mutants_baseline() {
	local suite=$1 dir=$2
	shift 2
	progress "mutants: baseline, $suite suite, unpatched kernel"
	run_suite_on "$dir/baseline.$suite.log" "$@"
	case $RUN_RC in
	0|1) ;;
	2) die 2 "the run of the $suite suite refused its options (e.g. --tests matches none of its tests); see $dir/baseline.$suite.log" ;;
	*) die "$RUN_RC" "the unpatched kernel did not build or boot; see $dir/baseline.$suite.log" ;;
	esac
	if [ "$suite" = ours ] && [ "$RUN_RC" != 0 ]; then
		die 1 "our suite fails on the unpatched kernel: fix that first; see $dir/baseline.$suite.log"
	fi
	run_failures "$dir/baseline.$suite.log" >"$dir/baseline.$suite.failures"
	progress "mutants: baseline, $suite suite: $(grep -E '^[0-9]+ passed' "$dir/baseline.$suite.log" | tail -n 1) in ${RUN_SECS}s"
}

# The tests a mutant's header expects to catch it (Expect:, full names or
# test names), one regex a line matching a kselftest name; none for
# "Expect: none known".
expected_res() {
	local e expect
	expect=$(mutant_field "$1" Expect)
	[[ $expect != none* ]] || return 0
	for e in $expect; do
		[[ $e =~ ^[a-z0-9_.]+$ ]] && echo "(^|\.)${e//./\\.}\$"
	done
	return 0
}

# expected_caught MUTANT FAILURES LOG: how many of the tests the mutant's
# header expects are among FAILURES, of those that ran in LOG, as "k/n", and
# how many did not run (a run stopped as wedged ends early); empty when it
# expects none.
expected_caught() {
	local m=$1 failures=$2 log=$3 re n=0 k=0 unrun=0
	while read -r re; do
		if ! sed -nE 's/^(not )?ok [0-9]+ ([^ ]+).*/\2/p' "$log" |
		     grep -qE "$re"; then
			unrun=$((unrun + 1))
			continue
		fi
		n=$((n + 1))
		if echo "$failures" | grep -qE "$re"; then
			k=$((k + 1))
		fi
	done < <(expected_res "$m")
	[ $((n + unrun)) = 0 ] && return 0
	if [ "$unrun" = 0 ]; then
		echo "$k/$n"
	else
		echo "$k/$n, $unrun not run"
	fi
}

# mutant_verdict MUTANT SUITE LOG BASELINE: the verdict on one mutant for
# one suite in CELL; CAUGHT is 1 when the suite failed on something the
# baseline did not.
mutant_verdict() {
	local m=$1 suite=$2 log=$3 base=$4 new n
	CAUGHT=0
	case $RUN_RC in
	0) CELL="MISSED"; return ;;
	1) ;;
	125) CELL="ERROR: not built or not booted"; return ;;
	*) CELL="ERROR: exit $RUN_RC"; return ;;
	esac
	new=$(run_failures "$log" | LC_ALL=C comm -23 - "$base")
	if [ -z "$new" ]; then
		CELL="MISSED (fails only as the baseline does)"
		return
	fi
	CAUGHT=1
	n=$(echo "$new" | wc -l)
	CELL="caught by $n: $(echo "$new" | head -n 3 | sed 's/^hmm\.//' |
		paste -sd ' ')"
	[ "$n" -le 3 ] || CELL+=" +$((n - 3))"
	# The header names tests of our suite.
	[ "$suite" = ours ] || return 0
	n=$(expected_caught "$m" "$new" "$log")
	[ -z "$n" ] || CELL+=" (expected: $n)"
}

# --mutants: the suite (and with --upstream-tests, the tree's) on the
# unpatched kernel, then on each mutant; a table of what caught what.
run_mutants() {
	local dir mutants m name i=0 total suites=(ours) suite args
	local missed=0 table tests
	mapfile -t mutants < <(find "${OPT[--mutants]}" -maxdepth 1 -type f \
		-name '*.patch' | LC_ALL=C sort)
	total=${#mutants[@]}
	[ "$total" -gt 0 ] || die 2 "no *.patch in ${OPT[--mutants]}"
	if on --upstream-tests; then
		suites+=(upstream)
	fi
	mutant_args
	given --idle-timeout ||
		MUTANT_ARGS+=(--idle-timeout "$MUTANT_IDLE_DEFAULT")
	dir=$CACHE/mutants/$(date +%Y%m%d-%H%M%S)
	mkdir -p "$dir"
	table=$dir/table
	progress "mutants: $total in ${OPT[--mutants]}, suites: ${suites[*]}; logs in $dir"
	mutants_baseline ours "$dir"
	if on --upstream-tests; then
		mutants_baseline upstream "$dir" --upstream-tests
	fi
	for m in "${mutants[@]}"; do
		i=$((i + 1))
		name=$(basename "$m" .patch)
		for suite in "${suites[@]}"; do
			args=(--kernel-patches "$m")
			[ "$suite" = ours ] || args+=(--upstream-tests)
			tests=
			if [ "$suite" = ours ] && on --expected-tests; then
				tests=$(expected_res "$m" | paste -sd '|')
			fi
			[ -z "$tests" ] || args+=(--tests "$tests")
			run_suite_on "$dir/$name.$suite.log" "${args[@]}"
			mutant_verdict "$m" "$suite" "$dir/$name.$suite.log" \
				"$dir/baseline.$suite.failures"
			[ "$suite" != ours ] || [ "$CAUGHT" = 1 ] ||
				missed=$((missed + 1))
			progress "mutants: [$i/$total] $name, $suite suite: $CELL (${RUN_SECS}s)"
			printf '# %-46s %-8s %5ss  %s\n' "$name" "$suite" \
				"$RUN_SECS" "$CELL" >>"$table"
		done
	done
	printf '# %-46s %-8s %6s  %s\n' mutant suite time verdict
	cat "$table"
	echo "# $((total - missed)) of $total mutants caught by our suite; logs in $dir"
	[ "$missed" = 0 ]
}

main() {
	parse_args "$@"
	check_conflicts
	if on --list-series; then
		list_series
		exit
	fi
	plan_run
	if on --mutants; then
		run_mutants
		exit
	fi
	fetch
	build
	if on --lint; then
		lint
		exit
	fi
	if on --export-series; then
		"$REPO/export-series.sh" "$KSRC" "$KBUILD" "${OPT[--export-series]}"
		exit
	fi
	pack
	boot
	report
}

main "$@"
