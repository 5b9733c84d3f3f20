#!/usr/bin/env bash
# Kernel matrix: runs pkg/datapath's tests inside Debian's kernels, from the
# 5.10 floor to the newest in sid, with virtme-ng (root filesystem = this
# machine's, over 9p), and prints kernel x test -> pass / FAIL / skip.
#
#   hack/kernel-matrix/run.sh          (make kernel-matrix)
#
# On every kernel it runs the verifier set (the prog.Run tests load every
# program, so a verifier rejection fails them) plus one real attach in the
# loader's own mode; on the oldest and newest kernels it also runs the
# netns behaviour tests, and the tests of other packages that depend on the
# kernel (KERNEL_MATRIX_EXTRA_RUN: netlink dump retries under churn, proxy
# upgrades with and without SO_REUSEPORT steering). Everything downloaded is kept under
# .cache/kernel-matrix/ and reused; the machine's /etc/apt is not touched.
#
# Environment (all optional):
#   KERNEL_MATRIX_SUITES            Debian suites to take kernels from
#                                   (default "bullseye bookworm trixie sid")
#   KERNEL_MATRIX_BEHAVIOUR_SUITES  suites that also run the behaviour set
#                                   (default: the first and last suite)
#   KERNEL_MATRIX_VERIFIER_RUN      -test.run regex of the verifier set
#   KERNEL_MATRIX_BEHAVIOUR_RUN     -test.run regex of the behaviour set
#   KERNEL_MATRIX_EXTRA_RUN         the other packages' tests the behaviour
#                                   set runs after pkg/datapath's, as
#                                   "pkg=regex[=arg,...]" words (default: nlretry's
#                                   churn test, and proxy's rolling
#                                   upgrades through the real binaries)
#   KERNEL_MATRIX_KVM               auto (try KVM, fall back to TCG), on, off
#   KERNEL_MATRIX_MIRROR            Debian mirror (default: the one apt uses)
#   KERNEL_MATRIX_REFRESH           1: refresh the package lists even when cached
#   KERNEL_MATRIX_CACHE             cache directory (default .cache/kernel-matrix)
#
# Exits non-zero when any test fails or a kernel produces no result.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${KERNEL_MATRIX_CACHE:-$repo/.cache/kernel-matrix}
read -r -a suites <<<"${KERNEL_MATRIX_SUITES:-bullseye bookworm trixie sid}"
read -r -a behaviour_suites <<<"${KERNEL_MATRIX_BEHAVIOUR_SUITES:-${suites[0]} ${suites[-1]}}"
verifier_run=${KERNEL_MATRIX_VERIFIER_RUN:-'^(TestEgressClassification|TestEgressDNS|TestIngressClassification|TestParsePolicyEgress|TestParsePolicyIngress|TestParsePolicyDNS|TestDirectFlowLifecycle|TestRestartThroughPins|TestProxyCgroups|TestNodeFull|TestDetectFeaturesProbes|TestReusePortAssignProbe)$'}
# TestDifferential is left out: it runs the whole scenario table a second
# time under iptables, which says nothing about the kernel's BPF support
# and doubles the slowest part of the run under emulation.
behaviour_run=${KERNEL_MATRIX_BEHAVIOUR_RUN:-'^(TestEgressClassification|TestEgressDNS|TestIngressClassification|TestParsePolicyEgress|TestParsePolicyIngress|TestParsePolicyDNS|TestDirectFlowLifecycle|TestBehaviours|TestRestartThroughPins|TestMarkSpoofing|TestNoRulesInPod|TestAttachFailureLeavesNothing|TestUpgradeKeepsFlows|TestUpgradeFromPerPodBuild|TestNodeMapsResized|TestNodeFull|TestParsePolicySockets|TestParsePolicyQinQ|TestDirectFlowExpirySockets|TestProxyMarkNotACredential|TestProxyCgroups|TestRawSocketRoutes|TestDetectFeaturesProbes|TestReusePortAssignProbe|TestEnrolAnnouncesNoLinkChange|TestNodeHandlesFollowSwap)$'}
# The churn test's dumps are interrupted differently on each kernel; the
# rolling upgrades are the one place the kernel decides whether two
# proxies share a pod's listeners (SO_REUSEPORT steering, 6.6+) or hand
# them over (before 6.6: TestRollingUpgradeKeepsConnections skips there
# and TestRollingUpgradeWithoutReusePort is what the proxy does).
# The proxy's load is a connection every 50 ms rather than 10: the guests
# run emulated (TCG) here, several times slower than the host.
extra_run=${KERNEL_MATRIX_EXTRA_RUN:-'nlretry=^TestDumpsSurviveChurn$ proxy=^(TestRollingUpgradeKeepsConnections|TestRollingUpgradeWithoutReusePort)$=-load-interval=50ms'}
# The in-pod fast path (sockops + sk_msg, 5.15+) on every kernel: its
# semantics tests compare each mode with the plain TCP path, and skip,
# saying so, where the kernel lacks what it needs (5.10).
all_extra=${KERNEL_MATRIX_ALL_EXTRA:-'fastpath=^(TestSemantics|TestProxyRestartFailsClosed|TestPairingAndGuard|TestUpgradeKeepsConnections)$'}
kvm=${KERNEL_MATRIX_KVM:-auto}
GO=${GO:-go}

# Time bounds, in seconds. A KVM guest boots in seconds; when it has not
# written its boot marker after kvm_boot it is taken as hung (seen here:
# "Probing EDD" forever, or qemu asserting on an MSR) and TCG takes over.
# TCG boots in about a minute on these machines.
kvm_boot=45
tcg_boot=300
verifier_limit=900
behaviour_limit=1800

log() { printf '>> %s\n' "$*" >&2; }
die() { printf 'kernel-matrix: %s\n' "$*" >&2; exit 2; }

# --- host tools ------------------------------------------------------------

# virtme-ng's dependencies (busybox-static for the initramfs, kmod for
# depmod and the guest's modprobe, file for the kernel version) and qemu.
"$repo/hack/deps.sh" qemu-system-x86 busybox-static util-linux-extra python3-argcomplete \
	python3-requests kbd kmod file iproute2
[ -c /dev/kvm ] || { [ "$kvm" != on ] || die "KERNEL_MATRIX_KVM=on but /dev/kvm is missing"; kvm=off; }

# --- private apt configuration ----------------------------------------------

aptdir=$cache/apt
mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$aptdir/sources.list.d" "$aptdir/preferences.d"

# mirror prints the base URI this machine's apt uses for its own suite.
mirror() {
	local codename
	# shellcheck disable=SC1091 # the host's, read at run time
	codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
	# shellcheck disable=SC2016 # apt expands $(REPO_URI), not the shell
	apt-get indextargets --format '$(REPO_URI) $(CODENAME)' "Identifier: Packages" 2>/dev/null |
		awk -v c="$codename" '$2 == c { print $1; exit }'
}

apt_opts=(
	-o "Dir::Etc::sourcelist=$aptdir/sources.list"
	-o "Dir::Etc::sourceparts=$aptdir/sources.list.d"
	-o "Dir::Etc::preferencesparts=$aptdir/preferences.d"
	-o "Dir::State::Lists=$aptdir/lists"
	-o "Dir::Cache=$aptdir/cache"
	-o "Acquire::Languages=none"
	# Only the Packages indices: no AppStream metadata or icons.
	-o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
	-o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
	-o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
	-o "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false"
	-o "APT::Update::Post-Invoke-Success::="
	# The cache belongs to root; apt's _apt user cannot write there.
	-o "APT::Sandbox::User=root"
)

lists_fresh() {
	[ "${KERNEL_MATRIX_REFRESH:-0}" != 1 ] && [ -f "$aptdir/updated" ] &&
		cmp -s "$aptdir/sources.list" "$aptdir/sources.list.new"
}

url=${KERNEL_MATRIX_MIRROR:-$(mirror)}
[ -n "$url" ] || die "cannot find the Debian mirror apt uses; set KERNEL_MATRIX_MIRROR"
# Always the four default suites (plus any asked for), so that running a
# subset does not make the cached lists look stale.
for s in bullseye bookworm trixie sid "${suites[@]}"; do
	echo "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $url $s main"
done | sort -u >"$aptdir/sources.list.new"
if ! lists_fresh; then
	log "apt: refreshing package lists from $url: $(awk '{print $5}' "$aptdir/sources.list.new" | tr '\n' ' ')"
	mv "$aptdir/sources.list.new" "$aptdir/sources.list"
	rm -f "$aptdir/updated"
	apt-get "${apt_opts[@]}" -qq update
	touch "$aptdir/updated"
else
	rm -f "$aptdir/sources.list.new"
fi

# depends prints the package names pkg/suite depends on, one a line.
depends() {
	apt-cache "${apt_opts[@]}" show "$1" 2>/dev/null | awk -F': ' '$1 == "Depends" { print $2; exit }' |
		sed -E 's/[,|]/\n/g' | sed -E 's/^ *//; s/ .*//' | grep -v '^$'
}

# fetch downloads pkg/suite into the deb cache unless a copy is there, and
# prints the file.
debs=$cache/debs
mkdir -p "$debs"
fetch() {
	local pkg=${1%/*} version file
	version=$(apt-cache "${apt_opts[@]}" show "$1" 2>/dev/null | awk -F': ' '$1 == "Version" { print $2; exit }')
	[ -n "$version" ] || die "no package $1 in the mirror"
	file=$debs/${pkg}_${version//:/%3a}_$(apt-cache "${apt_opts[@]}" show "$1" | awk -F': ' '$1 == "Architecture" { print $2; exit }').deb
	if [ ! -s "$file" ]; then
		log "apt: downloading $1 ($version)"
		(cd "$debs" && apt-get "${apt_opts[@]}" -qq download "$1") >&2
	fi
	[ -s "$file" ] || die "download of $1 did not produce $file"
	echo "$file"
}

# --- virtme-ng ---------------------------------------------------------------

vng_deb=$(fetch virtme-ng/sid)
vng_root=$cache/virtme-ng/$(basename "$vng_deb" .deb)
if [ ! -x "$vng_root/usr/bin/vng" ]; then
	rm -rf "$vng_root" && mkdir -p "$vng_root"
	dpkg -x "$vng_deb" "$vng_root"
fi
export PATH="$vng_root/usr/bin:$PATH"
export PYTHONPATH="$vng_root/usr/lib/python3/dist-packages"

# --- kernels -----------------------------------------------------------------

# kernel unpacks the newest generic amd64 kernel of a suite and prints
# "<release> <vmlinuz>". Newer suites split the image package into
# linux-binary-*, linux-modules-* and linux-base-*: take every dependency
# named for the same release.
kernel() {
	local suite=$1 image abi root deb vmlinuz moddir
	image=$(depends "linux-image-amd64/$suite" | grep -m1 '^linux-image-') ||
		die "linux-image-amd64/$suite names no linux-image package"
	abi=${image#linux-image-}
	root=$cache/kernels/$abi
	if [ ! -f "$root/.unpacked" ]; then
		rm -rf "$root" && mkdir -p "$root"
		for pkg in "$image" $(depends "$image/$suite" | grep -E "^linux-(binary|modules|base)-${abi//+/\\+}\$"); do
			deb=$(fetch "$pkg/$suite")
			dpkg -x "$deb" "$root"
		done
		# The packages' postinst would run depmod; virtme-ng needs
		# modules.dep to put 9p and virtio into its initramfs.
		moddir=$(find "$root" -path "*/lib/modules/$abi" -type d | head -n1)
		depmod -b "${moddir%/lib/modules/*}" "$abi"
		touch "$root/.unpacked"
	fi
	vmlinuz=$(find "$root" \( -name "vmlinuz-$abi" -o -path "*/modules/$abi/vmlinuz" \) -type f | head -n1)
	[ -n "$vmlinuz" ] || die "no vmlinuz in $root"
	echo "$abi $vmlinuz"
}

# --- test binaries -------------------------------------------------------------

bin=$cache/bin
mkdir -p "$bin"
log "go: building the test binaries, the agent and proxy binaries and the probe"
(cd "$repo" && "$GO" test -c -o "$bin/datapath.test" ./pkg/datapath)
for word in $extra_run $all_extra; do
	(cd "$repo" && "$GO" test -c -o "$bin/${word%%=*}.test" "./pkg/${word%%=*}")
done
# The proxy's tests run these (AMBPFTEST_BIN_DIR) instead of building them
# in the guest, slowly under emulation.
(cd "$repo" && "$GO" build -ldflags=-s -o "$bin/" ./cmd/ambpf-agent ./cmd/ambpf-proxy)
(cd "$repo" && "$GO" build -o "$bin/probe" ./hack/kernel-matrix/probe)
# The mark-spoofing app, 64- and 32-bit (the tests would build it in the
# guest otherwise, slowly under emulation).
for arch in amd64 386; do
	(cd "$repo/pkg/datapath" && GOARCH=$arch CGO_ENABLED=0 "$GO" build -o "$bin/markapp-$arch" ./testdata/markapp)
done

# --- guests ----------------------------------------------------------------------

# boot runs the guest script under one accelerator and waits. It returns 0
# when the guest ran the tests to the end, 3 when it never booted (so
# another accelerator may be tried), 4 when its kernel locked up (soft
# lockup or RCU stall on the console) and 1 when it booted but did not
# finish.
boot() {
	local accel=$1 kimg=$2 out=$3 run=$4 limit=$5 extra=$6 boot_limit pid started
	rm -f "$out/booted" "$out/exit" "$out/test.log" "$out/env" "$out/features"
	local args=(--run "$kimg" --force-9p --verbose --memory 2G --cpus 2 --rwdir="$out")
	if [ "$accel" = tcg ]; then
		args+=(--disable-kvm)
		boot_limit=$tcg_boot
	else
		boot_limit=$kvm_boot
	fi
	# The regexes go in files (guest.sh reads them): on the kernel command
	# line, with this checkout's paths, they passed x86's 2048 bytes.
	printf '%s' "$run" >"$out/run-regex"
	printf '%s' "$extra" >"$out/extra-run"
	# vng joins its arguments into a shell command line: quote once for it.
	args+=(--exec "$(printf '%q ' "$here/guest.sh" "$out" "$bin" "$repo/pkg/datapath")")
	# timeout runs vng in a process group of its own and kills the whole
	# group (qemu included) at the limit, or when it is sent SIGTERM.
	timeout --kill-after=15 "$limit" vng "${args[@]}" </dev/null >"$out/console-$accel.log" 2>&1 &
	pid=$!
	started=$SECONDS
	while kill -0 "$pid" 2>/dev/null; do
		if [ ! -s "$out/booted" ] && ((SECONDS - started > boot_limit)); then
			log "$accel: no boot after ${boot_limit}s, stopping the guest"
			kill -TERM "$pid" 2>/dev/null || true
			wait "$pid" 2>/dev/null || true
			return 3
		fi
		# A guest whose kernel reports a soft lockup or an RCU stall
		# makes no more progress (seen once under TCG on 5.10: both CPUs
		# in softirq, process_backlog); stop it now instead of at the
		# limit, so the caller can try once more.
		if grep -q -e 'BUG: soft lockup' -e 'rcu_sched self-detected stall' "$out/console-$accel.log" 2>/dev/null; then
			log "$accel: the guest kernel locked up (see console-$accel.log), stopping it"
			cp "$out/console-$accel.log" "$out/console-$accel-lockup.log"
			kill -TERM "$pid" 2>/dev/null || true
			wait "$pid" 2>/dev/null || true
			return 4
		fi
		sleep 2
	done
	wait "$pid" 2>/dev/null || true # vng's status is not the guest's: read the files
	[ -s "$out/booted" ] || return 3
	[ -s "$out/exit" ] || return 1
	return 0
}

results=$cache/results
rm -rf "$results" && mkdir -p "$results"
: >"$results/kernels.tsv"
start=$SECONDS
for suite in "${suites[@]}"; do
	read -r release kimg < <(kernel "$suite")
	set=verifier run=$verifier_run limit=$verifier_limit extra=$all_extra
	for b in "${behaviour_suites[@]}"; do
		if [ "$b" = "$suite" ]; then
			set=behaviour run=$behaviour_run limit=$behaviour_limit extra="$extra_run $all_extra"
		fi
	done
	out=$results/$suite
	mkdir -p "$out"
	printf '%s\t%s\t%s\n' "$suite" "$release" "$set" >>"$results/kernels.tsv"
	case $kvm in
	auto) accels=(kvm tcg) ;;
	broken) accels=(tcg) ;;
	on) accels=(kvm) ;;
	off) accels=(tcg) ;;
	*) die "KERNEL_MATRIX_KVM must be auto, on or off" ;;
	esac
	rc=3
	for accel in "${accels[@]}"; do
		log "$release ($suite): $set set under $accel"
		t0=$SECONDS
		rc=0
		boot "$accel" "$kimg" "$out" "$run" "$limit" "$extra" || rc=$?
		if [ "$rc" -eq 4 ]; then
			# Once: a second lockup is a result (the report shows it).
			log "$release ($suite): guest locked up; running the $set set once more"
			echo "the guest kernel locked up once (console-$accel-lockup.log); the set ran again" >"$out/retried"
			rc=0
			boot "$accel" "$kimg" "$out" "$run" "$limit" "$extra" || rc=$?
			[ "$rc" -ne 4 ] || rc=1
		fi
		log "$release ($suite): $accel guest done in $((SECONDS - t0))s"
		if [ "$rc" -ne 3 ]; then
			echo "$accel" >"$out/vm"
			break
		fi
		if [ "$accel" = kvm ] && [ "$kvm" = auto ]; then
			# The cause so far was always the host (nested KVM and this
			# qemu), not the guest kernel: spare the next kernels the wait.
			log "KVM failed with $release: TCG for the remaining kernels"
			kvm=broken
		fi
	done
	case $rc in
	3) echo "did not boot under ${accels[*]}; see console-*.log" >"$out/note" ;;
	1) echo "booted under $accel but the tests did not finish within ${limit}s; see console-$accel.log" >"$out/note" ;;
	esac
	if [ -f "$out/test.log" ]; then
		"$GO" tool test2json -p datapath <"$out/test.log" >"$out/test.json"
	fi
done
log "kernel matrix: $((SECONDS - start))s in guests"

(cd "$repo" && "$GO" run ./hack/kernel-matrix/report -results "$results" -markdown "$results/matrix.md")
