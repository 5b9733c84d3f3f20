#!/usr/bin/env bash
# Runs the datapath demo: pods in throwaway network namespaces on a bridge,
# captured by the eBPF datapath, then everything removed again.
# `make demo` installs the dependencies and builds bin/ambpf-demo first;
# run on its own, this script builds the binary when it is missing.
# Arguments are passed to ambpf-demo (-v logs the datapath's decisions).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
	echo "demo: needs root (network namespaces, BPF programs, a bpffs mount)" >&2
	exit 1
fi
bin=bin/ambpf-demo
if [ ! -x "$bin" ]; then
	mkdir -p bin
	"${GO:-go}" build -o "$bin" ./cmd/ambpf-demo
fi
exec "$bin" "$@"
