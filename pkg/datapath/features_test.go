//go:build linux

package datapath

import (
	"testing"

	"github.com/ambpf/ambpf/pkg/kernfeat"
)

// TestDetectFeaturesProbes: the tcx probe agrees, on the kernels of the
// kernel matrix (5.10 to the newest), with the version tcx came in, 6.6,
// as SO_REUSEPORT steering does (read from the version: kernfeat). The
// default attach mode is clsact whatever the probe says.
func TestDetectFeaturesProbes(t *testing.T) {
	requireRoot(t)
	f, err := DetectFeatures()
	if err != nil {
		t.Fatal(err)
	}
	k, err := kernfeat.ParseRelease(f.Kernel)
	if err != nil {
		t.Fatal(err)
	}
	want := k.AtLeast(6, 6)
	if f.TCX != want || f.ReusePortAssign != want {
		t.Errorf("kernel %s: probed tcx %t, SO_REUSEPORT assign %t; the version says %t for both", f.Kernel, f.TCX, f.ReusePortAssign, want)
	}
	if f.Mode != ModeClsact {
		t.Errorf("default mode %s, want clsact", f.Mode)
	}
	t.Logf("features: %s", f)
}
