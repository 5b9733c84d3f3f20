#!/usr/bin/env bash
# Builds the images the chart and the real-node tests run, as OCI image
# tarballs, without Docker (hack/image/cmd/mkimage, go-containerregistry):
#   ambpf.tar   ghcr.io/ambpf/ambpf:$TAG  every ambpf binary in /opt/ambpf/bin
#   testapp.tar localhost/ambpf-testapp:1 the e2e echo/peer server
#   pause.tar   localhost/ambpf-pause:1   the pod sandbox process
# into $OUT (default .cache/images). TAG defaults to the chart's appVersion.
# Binaries are static and built with -trimpath and no VCS stamp, and
# mkimage fixes every time stamp (SOURCE_DATE_EPOCH, default 0), so the
# same source gives the same image digests.
# The last line on stdout is the output directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export GOFLAGS=-buildvcs=false CGO_ENABLED=0
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-0}"
out="${OUT:-$repo/.cache/images}"
tag="${TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$repo/charts/ambpf/Chart.yaml")}"
mkdir -p "$out/bin"
# Concurrent test packages may build at once: one builds, the others wait.
exec 9>"$out/.lock"
flock 9

log() { echo ">> image: $*" >&2; }
start=$SECONDS
bins=(ambpf-agent ambpf-proxy ambpf-cni ambpf-cni-install ambpfctl ambpf-ca)
(cd "$repo" && go build -trimpath -ldflags "-s -w" -o "$out/bin/" $(printf './cmd/%s ' "${bins[@]}"))
(cd "$here" && go build -trimpath -ldflags "-s -w" -o "$out/bin/" ./cmd/mkimage ./testapp ./pause)

mk() { "$out/bin/mkimage" "$@" >&2; }
files=()
for b in "${bins[@]}"; do files+=(--file "$out/bin/$b=/opt/ambpf/bin/$b"); done
mk --ref "ghcr.io/ambpf/ambpf:$tag" --out "$out/ambpf.tar" "${files[@]}" \
	--env PATH=/opt/ambpf/bin:/usr/local/bin:/usr/bin:/bin
mk --ref localhost/ambpf-testapp:1 --out "$out/testapp.tar" \
	--file "$out/bin/testapp=/usr/local/bin/testapp" \
	--env PATH=/usr/local/bin:/usr/bin:/bin --entrypoint /usr/local/bin/testapp
mk --ref localhost/ambpf-pause:1 --out "$out/pause.tar" \
	--file "$out/bin/pause=/pause" --entrypoint /pause
log "built images ($tag) in $((SECONDS - start))s"
echo "$out"
