#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
#
# Check that the README's Quick start works on a fresh Debian 12 machine:
# build a minimal Debian 12 root with debootstrap, copy this checkout into it
# and run `./run_vm.sh`, then `make check`, there as root with a clean
# environment. Nothing this machine has installed, configured or cached can
# help them: the root gets only this machine's Debian mirror and the apt
# settings for reaching it, and only the .debs debootstrap downloads are
# kept between runs.
#
# Steps: deps (debootstrap on this machine), debootstrap (bookworm minbase
# under /var/tmp), copy (the files git tracks, from the working tree), mount
# (proc, sys, dev), run (the two commands), cleanup (on every exit: stop what
# runs in the root, unmount, check nothing is left mounted, remove).
#
# Exit status: 0 both commands passed, else that of the first that failed
# (run_vm.sh: 1 or 125, make: 2); 125 the root could not be built; 2 bad
# usage.

set -euo pipefail

readonly SUITE=bookworm
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly REPO
readonly SELF=$REPO/${BASH_SOURCE[0]##*/}
readonly CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/test_hmm-fresh
readonly LOG=$CACHE/fresh-check.log
T0=$(date +%s.%N)
readonly T0

# The checkout's place in the root, and how its output is marked here.
readonly GUEST_REPO=/root/test_hmm
readonly PREFIX='fresh| '

opt_keep=0
opt_shell_cmd=

ROOT=
BG_SESSION=
STEP=
STEP_T0=
STEP_TIMES=()
RC_RUN_VM=
RC_CHECK=

usage() {
	cat <<EOF
Usage: $0 [options]

Builds a minimal Debian 12 root (debootstrap --variant=minbase) under
/var/tmp, copies this checkout (the files git tracks, as they are in the
working tree) to $GUEST_REPO in it, and runs the README's Quick start there
with chroot, as root, in a clean environment:

  cd $GUEST_REPO && ./run_vm.sh
  cd $GUEST_REPO && make check

Their output is streamed with '$PREFIX' in front. The root is removed on
every exit. Must run as root.

Options:
  --keep            leave the root in place (unmounted) for inspection
  --shell-cmd CMD   run CMD in $GUEST_REPO in the root instead of the two
                    commands (to debug this script)
  -h, --help        this text

Exit status: 0 both commands passed, else that of the first that failed;
125 the root could not be built; 2 usage error. Log, the logs of the runs
inside and the debootstrap .deb cache: $CACHE
EOF
}

# --- Output helpers --------------------------------------------------------

# Seconds since $1 (a date +%s.%N).
since() {
	local now
	now=$(date +%s.%N)
	awk -v a="$1" -v b="$now" 'BEGIN { printf "%.1f", b - a }'
}

progress() {
	printf '[%6ss] %s\n' "$(since "$T0")" "$*" | tee -a "$LOG" >&2
}

die() {
	local code=$1
	shift
	printf 'fresh-check.sh: %s\n' "$*" | tee -a "$LOG" >&2
	exit "$code"
}

step_begin() {
	STEP=$1
	STEP_T0=$(date +%s.%N)
	shift
	progress "$STEP: $*"
}

step_end() {
	local secs
	secs=$(since "$STEP_T0")
	STEP_TIMES+=("$STEP ${secs}s")
	progress "$STEP: $* (${secs}s)"
	STEP=
}

# --- Options ---------------------------------------------------------------

parse_args() {
	while [ $# -gt 0 ]; do
		case $1 in
		--keep) opt_keep=1 ;;
		--shell-cmd) opt_shell_cmd=${2:?}; shift ;;
		-h|--help) usage; exit 0 ;;
		*) usage >&2; exit 2 ;;
		esac
		shift
	done
}

# --- Step: deps ------------------------------------------------------------

# "command package" pairs this script needs on this machine.
readonly HOST_DEPS="
debootstrap debootstrap
git git
"

missing_packages() {
	local what pkg
	while read -r what pkg; do
		[ -n "$what" ] || continue
		command -v "$what" >/dev/null 2>&1 || echo "$pkg"
	done <<<"$HOST_DEPS"
}

require_root() {
	local missing
	[ "$(id -u)" -ne 0 ] || return 0
	missing=$(missing_packages | tr '\n' ' ')
	if [ -n "${missing// /}" ]; then
		echo "fresh-check.sh: missing packages; install them with:
  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing% }" >&2
	fi
	# Not die: nothing is written under the cache as a user.
	echo "fresh-check.sh: debootstrap, mount and chroot need root; run: sudo $0" >&2
	exit 125
}

install_deps() {
	local missing
	missing=$(missing_packages | tr '\n' ' ')
	[ -n "${missing// /}" ] || return 0
	step_begin deps "installing ${missing% }"
	DEBIAN_FRONTEND=noninteractive apt-get update -q >"$CACHE/apt-install.log" 2>&1 ||
		die 125 "apt-get update failed; see $CACHE/apt-install.log"
	# shellcheck disable=SC2086 # one word per package
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		--no-install-recommends $missing >>"$CACHE/apt-install.log" 2>&1 ||
		die 125 "apt-get install $missing failed; see $CACHE/apt-install.log"
	step_end "done"
}

# Mounts made for the root live in a private mount namespace: the rest of the
# machine never sees them (nothing can reach /dev through the root from
# outside), and they go away with the last process using them. The script
# re-executes itself there; unshare execs, so the PID stays the same.
enter_mount_namespace() {
	[ "${TEST_HMM_FRESH_NS:-}" = 1 ] && return 0
	unshare --mount true 2>/dev/null ||
		die 125 "cannot make a mount namespace (unshare --mount)"
	exec unshare --mount --propagation private -- \
		env TEST_HMM_FRESH_NS=1 "$BASH" "$SELF" "$@"
}

# --- Step: debootstrap -----------------------------------------------------

# The Debian mirror the system already uses, so that no host is named here
# (as in run_vm.sh).
debian_mirror() {
	local uri
	uri=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources \
		/etc/apt/sources.list 2>/dev/null |
		grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n 1 | tr -d ' ')
	[ -n "$uri" ] || die 125 "no Debian mirror found in the apt configuration"
	echo "${uri%/}"
}

make_root() {
	local mirror rc=0 extra=()
	mirror=$(debian_mirror)
	mkdir -p "$CACHE/debs"
	ROOT=$(mktemp -d /var/tmp/test_hmm-fresh.XXXXXXXX)
	# mktemp makes it 0700; / of a real machine is 0755 (apt's _apt user).
	chmod 755 "$ROOT"
	# A machine installed from an https mirror has the CA certificates.
	[[ $mirror != https:* ]] || extra+=(--include=ca-certificates)
	step_begin debootstrap "$SUITE minbase from $mirror into $ROOT" \
		"(log: $CACHE/debootstrap.log)"
	# In the background, in its own session: bash runs a trap only once
	# the foreground command ends, and the session is stopped as a whole.
	setsid debootstrap --variant=minbase "${extra[@]}" \
		--cache-dir="$CACHE/debs" "$SUITE" "$ROOT" "$mirror" \
		</dev/null >"$CACHE/debootstrap.log" 2>&1 &
	BG_SESSION=$!
	wait "$BG_SESSION" || rc=$?
	BG_SESSION=
	if [ "$rc" != 0 ]; then
		tail -n 20 "$CACHE/debootstrap.log" >&2
		die 125 "debootstrap failed ($rc); see $CACHE/debootstrap.log"
	fi
	[ ! -e "$ROOT/root/.cache" ] || die 125 "$ROOT/root/.cache exists"
	step_end "done, $(du -sm "$ROOT" | cut -f1) MiB;" \
		"make $(chroot "$ROOT" sh -c 'command -v make' >/dev/null &&
			echo installed || echo 'not installed')"
}

# --- Step: copy ------------------------------------------------------------

# The root uses the host's mirror, so it gets the host's apt settings for
# reaching it, and only those: a mirror frozen in time (Release files past
# their Valid-Until) or a proxy. A machine on the same network would have
# them too; nothing is installed by them.
readonly APT_MIRROR_SETTINGS='Acquire::(Check-Valid-Until|Check-Date|https?::Proxy(::[^ ]*)?)'

# The NUL-separated paths of stdin that exist in the working tree: a
# tracked file deleted there is not copied.
present_files() {
	local f
	while IFS= read -r -d '' f; do
		if [ -e "$f" ] || [ -L "$f" ]; then
			printf '%s\0' "$f"
		fi
	done
}

copy_checkout() {
	local dest=$ROOT$GUEST_REPO n
	step_begin copy "the files git tracks, from the working tree, to $GUEST_REPO"
	mkdir -p "$dest"
	(cd "$REPO" && git -c safe.directory="$REPO" ls-files -z |
	 present_files | tar --null -T - -cf -) |
		tar -C "$dest" --no-same-owner -xpf - ||
		die 125 "copying the checkout failed"
	n=$(find "$dest" -type f | wc -l)
	[ "$n" -gt 0 ] || die 125 "no files copied from $REPO"
	copy_apt_settings
	step_end "$n files"
}

copy_apt_settings() {
	local settings conf=$ROOT/etc/apt/apt.conf.d/99test_hmm-fresh-mirror
	settings=$(apt-config dump | grep -iE "^$APT_MIRROR_SETTINGS " || true)
	[ -n "$settings" ] || return 0
	{
		echo "// The host's settings for its mirror, from fresh-check.sh."
		echo "$settings"
	} >"$conf"
	progress "copy: the host's apt settings for its mirror: ${settings//$'\n'/ }"
}

# --- Step: mount -----------------------------------------------------------

mount_root() {
	step_begin mount "proc, sys, dev, dev/pts, dev/shm"
	{
		mount -t proc proc "$ROOT/proc" &&
		mount -t sysfs sysfs "$ROOT/sys" &&
		mount --bind /dev "$ROOT/dev" &&
		mount --bind /dev/pts "$ROOT/dev/pts" &&
		mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$ROOT/dev/shm"
	} || die 125 "mounting in $ROOT failed"
	step_end "done"
}

# --- Step: run -------------------------------------------------------------

# Runs the shell command $2 in the root's checkout, as root, in a clean
# environment; output to ours and the log, prefixed. $1 names the step.
run_in_root() {
	local name=$1 cmd=$2 rc=0
	step_begin "$name" "$cmd"
	# In the background, so that a signal is handled at once; the cleanup
	# stops what runs in the root, and the pipe then ends.
	(
		chroot "$ROOT" /usr/bin/env -i HOME=/root \
			PATH=/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb CI="${CI:-}" \
			/bin/bash -c "cd $GUEST_REPO || exit 125
$cmd" </dev/null 2>&1 |
			sed -u "s/^/$PREFIX/" | tee -a "$LOG"
		exit "${PIPESTATUS[0]}"
	) &
	wait $! || rc=$?
	step_end "exit $rc"
	return "$rc"
}

run() {
	local rc
	if [ -n "$opt_shell_cmd" ]; then
		rc=0
		run_in_root shell-cmd "$opt_shell_cmd" || rc=$?
		return "$rc"
	fi
	RC_RUN_VM=0
	run_in_root run_vm.sh ./run_vm.sh || RC_RUN_VM=$?
	# The README's second command runs whatever the first did.
	RC_CHECK=0
	run_in_root "make check" "make check" || RC_CHECK=$?
	[ "$RC_RUN_VM" != 0 ] && return "$RC_RUN_VM"
	return "$RC_CHECK"
}

# --- Step: cleanup ---------------------------------------------------------

# PIDs of the processes whose root directory is the fresh root (fuser and
# lsof may not be installed): their /proc/PID/root links point into it.
root_pids() {
	find /proc -mindepth 2 -maxdepth 2 -name root \
		\( -lname "$ROOT" -o -lname "$ROOT/*" \) 2>/dev/null |
		cut -d/ -f3
}

# TERM for 5 s, then KILL for 10 s. Fails if any process is left.
stop_root_processes() {
	local pids i sig=TERM
	if [ -n "$BG_SESSION" ]; then
		kill -TERM -- "-$BG_SESSION" 2>/dev/null
	fi
	for i in $(seq 30); do
		pids=$(root_pids | tr '\n' ' ')
		if [ -n "$BG_SESSION" ] && kill -0 -- "-$BG_SESSION" 2>/dev/null; then
			pids+="-$BG_SESSION"
		fi
		pids=${pids% }
		[ -n "$pids" ] || return 0
		[ "$i" -le 10 ] || sig=KILL
		case $i in
		1|11) progress "cleanup: sending $sig to $pids" ;;
		esac
		# shellcheck disable=SC2086 # one word per PID
		kill -"$sig" -- $pids 2>/dev/null
		sleep 0.5
	done
	progress "cleanup: still running in the root: $pids"
	return 1
}

# Mount points at or below the root, deepest first.
mounts_below() {
	awk -v root="$ROOT" '$2 == root || index($2, root "/") == 1 { print $2 }' \
		/proc/mounts | sort -r
}

unmount_root() {
	local m
	for m in $(mounts_below); do
		umount -R "$m" 2>/dev/null
	done
	for m in $(mounts_below); do
		progress "cleanup: $m is busy; lazy unmount"
		umount -R -l "$m"
	done
	[ -z "$(mounts_below)" ]
}

# The logs of the runs inside (build.log, console.log, ...) outlive the root.
save_logs() {
	[ -d "$ROOT/root/.cache/test_hmm" ] || return 0
	mkdir -p "$CACHE/logs"
	(cd "$ROOT/root/.cache" &&
	 find test_hmm -name '*.log' -type f -exec cp --parents {} "$CACHE/logs/" \;)
	progress "cleanup: logs of the runs inside in $CACHE/logs/test_hmm"
}

remove_root() {
	case $ROOT in
	/var/tmp/test_hmm-fresh.?*) ;;
	*) progress "cleanup: not removing unexpected path '$ROOT'"; return 1 ;;
	esac
	if [ -n "$(mounts_below)" ]; then
		progress "cleanup: still mounted below $ROOT, not removing it:"
		mounts_below >&2
		return 1
	fi
	rm -rf --one-file-system "$ROOT"
}

print_summary() {
	local rc=$1 t
	for t in "${STEP_TIMES[@]}"; do
		printf '  %-12s %9s\n' "${t% *}" "${t##* }"
	done | tee -a "$LOG" >&2
	printf '  %-12s %8.1fs\n' total "$(since "$T0")" | tee -a "$LOG" >&2
	if [ -n "$RC_RUN_VM" ]; then
		progress "fresh-check: ./run_vm.sh exit $RC_RUN_VM, make check exit $RC_CHECK"
	fi
	progress "fresh-check: $([ "$rc" = 0 ] && echo PASS || echo "FAIL ($rc)")"
}

cleanup() {
	local rc=$? ok=1
	set +e
	trap - EXIT INT TERM
	if [ -n "$STEP" ]; then
		STEP_TIMES+=("$STEP $(since "$STEP_T0")s")
	fi
	if [ -n "$ROOT" ] && [ -d "$ROOT" ]; then
		step_begin cleanup "$ROOT"
		stop_root_processes || ok=0
		unmount_root || ok=0
		save_logs
		if [ "$opt_keep" = 1 ] || [ "$ok" = 0 ]; then
			[ "$ok" = 1 ] || progress "cleanup: FAILED; left in place"
			progress "cleanup: kept $ROOT; remove it with: rm -rf --one-file-system $ROOT"
		else
			remove_root || ok=0
		fi
		step_end "$([ "$ok" = 1 ] && echo "done" || echo FAILED)"
		[ "$ok" = 1 ] || [ "$rc" != 0 ] || rc=1
	fi
	print_summary "$rc"
	exit "$rc"
}

main() {
	local rc=0
	parse_args "$@"
	require_root
	enter_mount_namespace "$@"
	mkdir -p "$CACHE"
	: >"$LOG"
	rm -rf "$CACHE/logs"
	trap cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	progress "fresh-check: $REPO in a fresh Debian 12 root (log: $LOG)"
	install_deps
	make_root
	copy_checkout
	mount_root
	run || rc=$?
	# The EXIT trap cleans up and exits with this.
	return "$rc"
}

main "$@"
