#!/usr/bin/env bash
# Runs the demo with the real parts: two nodes, pods in throwaway network namespaces
# created through CNI (cnitool + bridge + host-local, ambpf-cni chained),
# ambpf-agent and ambpf-proxy as processes, traffic on every path, then
# everything removed again.
# `make demo` installs the dependencies and builds bin/ first; run on its
# own, this script builds what is missing. The CNI tools are built once
# into .cache/tools by hack/tools.sh.
# Arguments are passed to ambpf-demo (-v shows the agent's and proxy's logs).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
	echo "demo: needs root (network namespaces, BPF programs, a bpffs mount)" >&2
	exit 1
fi
for b in ambpf-demo ambpf-agent ambpf-proxy ambpfctl ambpf-cni; do
	if [ ! -x "bin/$b" ]; then
		mkdir -p bin
		"${GO:-go}" build -o bin/ ./cmd/...
		break
	fi
done
tools="${AMBPF_TOOLS_DIR:-$PWD/.cache/tools}"
AMBPF_TOOLS_DIR="$tools" hack/tools.sh
exec bin/ambpf-demo -bin-dir "$PWD/bin" -tools-dir "$tools" "$@"
