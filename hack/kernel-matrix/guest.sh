#!/usr/bin/env bash
# Runs inside a virtme-ng guest (root filesystem = the host's, over 9p).
# Usage: guest.sh OUTDIR BINDIR PKGDIR
# OUTDIR/run-regex holds RUNREGEX and OUTDIR/extra-run EXTRA (files, not
# arguments: the arguments go on the guest kernel's command line, which
# x86 bounds at 2048 bytes, and the test regexes with the checkout's paths
# went past that: the kernel panics at boot on an overlong command line).
# BINDIR holds datapath.test (go test -c ./pkg/datapath), probe and
# markapp-{amd64,386} (pkg/datapath/testdata/markapp); for EXTRA, a
# <pkg>.test of each package it names and the ambpf-agent and ambpf-proxy
# binaries. EXTRA is "pkg=regex[=arg,arg...]" words: after pkg/datapath's
# tests, each <pkg>.test runs the tests regex matches, from pkg/<pkg>,
# with the args given.
#
# Writes into OUTDIR (a --rwdir shared with the host, so results survive a
# guest whose console output is lost):
#   booted     written first: the host's watchdog knows the kernel came up
#   env        uname, bpffs and cgroup2 mounts, as the tests will see them
#   features   the loader's choices on this kernel (probe)
#   test.log   the test binaries' -test.v output, stdout and stderr together
#   exit       0 when every test binary exited 0, else the first non-zero status
# The console gets the same lines, for a human following along.
set -u
out=$1 bindir=$2 pkgdir=$3
run=$(cat "$out/run-regex")
extra=$(cat "$out/extra-run" 2>/dev/null || true)

uname -r >"$out/booted"

# bpffs is not mounted in a fresh guest; the loader's default root and
# bpftool expect it at /sys/fs/bpf.
if ! grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts; then
	mount -t bpf bpf /sys/fs/bpf
fi
# The tests find cgroup2 from mountinfo; record where it is, and mount it
# when the guest's init did not.
cg=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
if [ -z "$cg" ]; then
	mkdir -p /run/kernel-matrix-cgroup2
	mount -t cgroup2 none /run/kernel-matrix-cgroup2
	cg=/run/kernel-matrix-cgroup2
fi
{
	echo "kernel=$(uname -r)"
	echo "bpffs=$(awk '$3 == "bpf" { print $2; exit }' /proc/self/mounts)"
	echo "cgroup2=$cg"
	echo "cpus=$(nproc)"
} >"$out/env"
cat "$out/env"

# Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (64 KiB by default
# here). The loader lifts the limit itself (datapath.New), but the prog.Run
# tests load the objects without it: without this line they fail on 5.10
# with "map create: operation not permitted" before the verifier is asked.
ulimit -l unlimited || echo "kernel-matrix: cannot lift RLIMIT_MEMLOCK"

"$bindir/probe" >"$out/features" 2>"$out/probe.log" || echo "probe failed: $(cat "$out/probe.log")"
cat "$out/features"

# The tests change sysctls and create netns only inside namespaces they
# own; run from the package directory as `go test` would.
cd "$pkgdir" || exit 1
AMBPF_MARKAPP_DIR="$bindir" "$bindir/datapath.test" -test.v -test.count=1 -test.timeout=30m -test.run "$run" >"$out/test.log" 2>&1
rc=$?
# The agent and proxy binaries are started by the tests under time bounds;
# paged in over 9p under emulation, the agent's first start took more than
# 20 s. Copied once into guest memory, they start at once.
testbins=$bindir
if [ -n "$extra" ] && mkdir -p /run/kernel-matrix-bin && mount -t tmpfs tmpfs /run/kernel-matrix-bin &&
	cp "$bindir/ambpf-agent" "$bindir/ambpf-proxy" /run/kernel-matrix-bin/; then
	testbins=/run/kernel-matrix-bin
fi
for word in $extra; do
	pkg=${word%%=*} rest=${word#*=}
	prun=${rest%%=*} pargs=${rest#"$prun"}
	IFS=, read -r -a argv <<<"${pargs#=}"
	echo "kernel-matrix: pkg/$pkg: $prun ${argv[*]}"
	(cd "$pkgdir/../$pkg" && AMBPFTEST_BIN_DIR="$testbins" "$bindir/$pkg.test" -test.v -test.count=1 -test.timeout=10m -test.run "$prun" "${argv[@]}") >>"$out/test.log" 2>&1
	prc=$?
	[ "$rc" -ne 0 ] || rc=$prc
done
echo "$rc" >"$out/exit"
tail -n 40 "$out/test.log"
echo "kernel-matrix: tests exited $rc"
