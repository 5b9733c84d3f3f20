#!/usr/bin/env bash
# Builds the external CNI tools the ambpf-cni tests run against into
# .cache/tools/ (or $AMBPF_TOOLS_DIR): cnitool and the reference bridge,
# host-local and loopback plugins. A tool already there is left alone, so
# a second run is instant; delete the directory to rebuild.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${AMBPF_TOOLS_DIR:-$repo/.cache/tools}"
mkdir -p "$dir"

# name=module path@version; versions pinned so every machine tests the same.
tools=(
	"cnitool=github.com/containernetworking/cni/cnitool@v1.3.1"
	"bridge=github.com/containernetworking/plugins/plugins/main/bridge@v1.9.1"
	"host-local=github.com/containernetworking/plugins/plugins/ipam/host-local@v1.9.1"
	"loopback=github.com/containernetworking/plugins/plugins/main/loopback@v1.9.1"
)

for t in "${tools[@]}"; do
	name="${t%%=*}"
	pkg="${t#*=}"
	if [ -x "$dir/$name" ]; then
		continue
	fi
	echo ">> building $name ($pkg) into $dir" >&2
	# Outside any module: go install pkg@version resolves the tool's own
	# go.mod, not ambpf's, and leaves ambpf's go.mod/go.sum untouched.
	(cd / && GOBIN="$dir" GOFLAGS=-buildvcs=false go install "$pkg")
done
