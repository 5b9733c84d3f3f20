#!/usr/bin/env bash
# Builds the binaries of the pkg/kubetest control plane and the chart tests
# from the Go module proxy: etcd, kube-apiserver, (with AMBPF_KUBE_NODE=1)
# kubelet, kube-scheduler and kube-controller-manager, kubectl (only when the
# machine's kubectl is missing or more than one minor version away from the
# API server) and helm, into .cache/kube/bin/<kubernetes version>/ (or
# $AMBPF_KUBE_BIN_DIR). A binary whose version stamp matches is left alone,
# so a second run is instant; delete the directory to rebuild.
#
# Progress goes to stderr; the last line on stdout is the binary directory.
# The first run takes about 5 minutes on 2 cores (kube-apiserver dominates).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export GOFLAGS=-buildvcs=false
# Kubernetes release binaries are static; building them the same way keeps
# them independent of the machine's libc.
export CGO_ENABLED=0

# Pinned outside the tools module: helm's own go.mod chooses its client-go,
# and forcing the tools module's v0.37 replaces onto it could break it.
HELM_VERSION=v3.22.0

modver() { (cd "$here" && go list -m -f '{{.Version}}' "$1"); }
k8s_version="$(modver k8s.io/kubernetes)"
etcd_version="$(modver go.etcd.io/etcd/server/v3)"
dir="${AMBPF_KUBE_BIN_DIR:-$repo/.cache/kube/bin/$k8s_version}"
mkdir -p "$dir"
# Test packages run in parallel and may all find the binaries missing: one
# builds, the others wait and then find them fresh.
exec 9>"$dir/.lock"
flock 9

# fresh NAME VERSION succeeds when NAME was already built at VERSION.
fresh() { [ -x "$dir/$1" ] && [ "$(cat "$dir/$1.version" 2>/dev/null)" = "$2" ]; }
stamp() { echo "$2" >"$dir/$1.version"; }

log() { echo ">> kube: $*" >&2; }

k8s_minor="$(echo "$k8s_version" | cut -d. -f2)"
k8s_major="$(echo "$k8s_version" | cut -d. -f1 | tr -d v)"
# Clients that parse the server version (helm, kubectl) need the real
# release version, not the "v0.0.0-master" a plain go build reports.
k8s_ldflags="-s -w \
-X k8s.io/component-base/version.gitVersion=$k8s_version \
-X k8s.io/component-base/version.gitMajor=$k8s_major \
-X k8s.io/component-base/version.gitMinor=$k8s_minor \
-X k8s.io/component-base/version.gitTreeState=clean \
-X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"

# gobuild NAME VERSION PACKAGE [go build flags...] builds a tool of the
# tools module unless it is already fresh.
gobuild() {
	local name="$1" version="$2" pkg="$3"
	shift 3
	if fresh "$name" "$version"; then
		log "$name $version up to date"
		return
	fi
	log "building $name $version (${pkg})"
	local start=$SECONDS
	(cd "$here" && go build -o "$dir/$name.tmp" "$@" "$pkg")
	mv -f "$dir/$name.tmp" "$dir/$name"
	stamp "$name" "$version"
	log "built $name in $((SECONDS - start))s"
}

gobuild etcd "$etcd_version" go.etcd.io/etcd/server/v3 -ldflags "-s -w"
gobuild kube-apiserver "$k8s_version" k8s.io/kubernetes/cmd/kube-apiserver -ldflags "$k8s_ldflags"

# The real node (hack/node) also runs kubelet, kube-scheduler and
# kube-controller-manager, only when asked (AMBPF_KUBE_NODE=1): one go build
# for the three so their shared packages compile once (541 s here on a
# loaded 2-core machine with kube-apiserver's packages already in the Go
# build cache).
node_bins=(kubelet kube-scheduler kube-controller-manager)
if [ "${AMBPF_KUBE_NODE:-0}" = 1 ]; then
	stale=()
	for b in "${node_bins[@]}"; do fresh "$b" "$k8s_version" || stale+=("$b"); done
	if [ ${#stale[@]} -eq 0 ]; then
		log "${node_bins[*]} $k8s_version up to date"
	else
		log "building ${stale[*]} $k8s_version"
		start=$SECONDS
		ntmp="$(mktemp -d "$dir/.node.XXXXXX")"
		(cd "$here" && go build -o "$ntmp/" -ldflags "$k8s_ldflags" $(printf 'k8s.io/kubernetes/cmd/%s ' "${stale[@]}"))
		for b in "${stale[@]}"; do
			mv -f "$ntmp/$b" "$dir/$b"
			stamp "$b" "$k8s_version"
		done
		rmdir "$ntmp"
		log "built ${stale[*]} in $((SECONDS - start))s"
	fi
fi

# kubectl supports one minor version of skew with the API server; a
# machine kubectl inside that window is linked instead of built.
machine_kubectl_ok() {
	local kc minor
	kc="$(command -v kubectl 2>/dev/null)" || return 1
	[ "$kc" = "$dir/kubectl" ] && return 1
	minor="$("$kc" version --client -o json 2>/dev/null | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -1)"
	[ -n "$minor" ] && [ $((minor - k8s_minor)) -le 1 ] && [ $((k8s_minor - minor)) -le 1 ]
}
if fresh kubectl "$k8s_version"; then
	log "kubectl $k8s_version up to date"
elif machine_kubectl_ok; then
	log "using the machine's kubectl ($(command -v kubectl))"
	ln -sf "$(command -v kubectl)" "$dir/kubectl"
	stamp kubectl "$k8s_version"
else
	gobuild kubectl "$k8s_version" k8s.io/kubernetes/cmd/kubectl -ldflags "$k8s_ldflags"
fi

# helm renders and lints for the Kubernetes version baked in at link time
# (v1.20 without it, which fails charts asking for newer). Its release
# Makefile bakes the client-go minor of its go.mod; helm v3.22 uses v0.37,
# the API server's minor, so the API server's version is used.
helm_stamp="$HELM_VERSION+k8s$k8s_major.$k8s_minor"
if fresh helm "$helm_stamp"; then
	log "helm $helm_stamp up to date"
else
	log "building helm $helm_stamp"
	start=$SECONDS
	tmp="$(mktemp -d)"
	trap 'rm -rf "$tmp"' EXIT
	helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
	for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
		helm_ldflags+=" -X $pkg.k8sVersionMajor=$k8s_major -X $pkg.k8sVersionMinor=$k8s_minor"
	done
	# Outside any module: go install pkg@version resolves helm's own go.mod.
	(cd / && GOBIN="$tmp" go install -ldflags "$helm_ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
	mv -f "$tmp/helm" "$dir/helm"
	stamp helm "$helm_stamp"
	log "built helm in $((SECONDS - start))s"
fi

echo "$dir"
