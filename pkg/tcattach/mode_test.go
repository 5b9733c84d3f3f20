//go:build linux

package tcattach

import (
	"testing"

	"github.com/ambpf/ambpf/pkg/kernfeat"
)

// TestHaveTCX: the probe agrees with the version tcx came in (6.6) on the
// mainline kernels the project runs on (the kernel matrix runs 5.10 to
// the newest), and a second call gives the same answer.
func TestHaveTCX(t *testing.T) {
	requireRoot(t)
	k, err := kernfeat.DetectKernel()
	if err != nil {
		t.Fatal(err)
	}
	got, err := HaveTCX()
	if err != nil {
		t.Fatal(err)
	}
	if want := k.AtLeast(6, 6); got != want {
		t.Errorf("kernel %s: probe says tcx %t, the version says %t", k.Release, got, want)
	}
	if again, _ := HaveTCX(); again != got {
		t.Errorf("second probe %t, first %t", again, got)
	}
}

func TestModeString(t *testing.T) {
	if ModeTCX.String() != "tcx" || ModeClsact.String() != "clsact" || Mode(9).String() != "mode(9)" {
		t.Errorf("mode names: %s %s %s", ModeTCX, ModeClsact, Mode(9))
	}
}
