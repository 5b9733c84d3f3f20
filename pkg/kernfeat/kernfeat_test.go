//go:build linux

package kernfeat

import (
	"fmt"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestHasSymbol(t *testing.T) {
	listing := "ffffffff81000000 T _stext\n" +
		"0000000000000000 t lookup_reuseport\n" +
		"ffffffffc0000000 t inet_lookup_reuseport\t[somemod]\n" +
		"ffffffff82063310 T inet_lookup_reuseport_extra\n"
	if ok, err := hasSymbol(strings.NewReader(listing), reusePortSymbol); err != nil || ok {
		t.Errorf("a look-alike, a module's and a prefixed symbol taken for %s: %t, %v", reusePortSymbol, ok, err)
	}
	ok, err := hasSymbol(strings.NewReader(listing+"0000000000000000 T inet_lookup_reuseport\n"), reusePortSymbol)
	if err != nil || !ok {
		t.Errorf("%s not found: %t, %v", reusePortSymbol, ok, err)
	}
}

// TestReusePortAssignMatchesVersion: on the mainline kernels the project
// runs on, the probe agrees with the version the feature came in (6.6).
func TestReusePortAssignMatchesVersion(t *testing.T) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	rel := unix.ByteSliceToString(u.Release[:])
	var major, minor int
	if _, err := fmt.Sscanf(rel, "%d.%d", &major, &minor); err != nil {
		t.Fatalf("kernel release %q: %v", rel, err)
	}
	want := major > 6 || (major == 6 && minor >= 6)
	got, err := ReusePortAssignErr()
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Errorf("kernel %s: probe says SO_REUSEPORT assign %t, the version says %t", rel, got, want)
	}
}
