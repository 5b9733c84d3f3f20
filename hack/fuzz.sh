#!/usr/bin/env bash
# Runs every Go native fuzz target of the repository, one `go test -fuzz`
# invocation per target (Go fuzzes one target at a time), each for
# $FUZZTIME (default 30s). Targets are discovered, not listed: any
# `func FuzzXxx(f *testing.F)` in a _test.go file under pkg/ or cmd/ is
# picked up. Their seed corpora live in the package's testdata/fuzz/.
#
#   hack/fuzz.sh            run all targets
#   hack/fuzz.sh -l         list them (package target), run nothing
#   hack/fuzz.sh Zds Dns    only targets whose package/name matches a word
#
# A crash makes go test write the input to testdata/fuzz/<target>/ (commit
# it with the fix, as a regression seed) and this script exit 1 after the
# other targets ran. Targets that need root skip themselves otherwise.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
GO="${GO:-go}"
FUZZTIME="${FUZZTIME:-30s}"

# targets prints "<package dir> <target>" lines, sorted.
targets() {
	grep -rEo --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*\(f \*testing\.F\)' pkg cmd 2>/dev/null |
		sed -E 's|^(.*)/[^/]*_test\.go:func (Fuzz[A-Za-z0-9_]*)\(.*$|./\1 \2|' | sort -u
}

list=0
filters=()
for a in "$@"; do
	case "$a" in
	-l) list=1 ;;
	*) filters+=("$a") ;;
	esac
done

mapfile -t all < <(targets)
selected=()
for t in "${all[@]}"; do
	if [ ${#filters[@]} -eq 0 ]; then
		selected+=("$t")
		continue
	fi
	for w in "${filters[@]}"; do
		if [[ "${t,,}" == *"${w,,}"* ]]; then
			selected+=("$t")
			break
		fi
	done
done
if [ "$list" = 1 ]; then
	printf '%s\n' "${selected[@]}"
	exit 0
fi
if [ ${#selected[@]} -eq 0 ]; then
	echo "fuzz: no target matches ${filters[*]}" >&2
	exit 1
fi

echo ">> fuzzing ${#selected[@]} targets, $FUZZTIME each"
start=$SECONDS
failed=()
for t in "${selected[@]}"; do
	pkg="${t% *}"
	name="${t#* }"
	t0=$SECONDS
	if out=$("$GO" test -run '^$' -fuzz "^${name}\$" -fuzztime "$FUZZTIME" "$pkg" 2>&1); then
		status=ok
	else
		status=FAIL
		failed+=("$pkg $name")
		echo "$out" | tail -n 40
	fi
	printf '   %-4s %-22s %-28s %4ds\n' "$status" "$pkg" "$name" $((SECONDS - t0))
done
echo ">> fuzzing took $((SECONDS - start))s"
if [ ${#failed[@]} -gt 0 ]; then
	printf 'fuzz: failed: %s\n' "${failed[@]}" >&2
	exit 1
fi
