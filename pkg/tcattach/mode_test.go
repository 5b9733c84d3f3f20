//go:build linux

package tcattach

import "testing"

func TestParseRelease(t *testing.T) {
	for _, c := range []struct {
		rel          string
		major, minor int
		from66       bool
	}{
		{"6.18.0-1-amd64", 6, 18, true},
		{"6.6.0", 6, 6, true},
		{"6.5.13-cloud", 6, 5, false},
		{"5.10.0+", 5, 10, false},
		{"7.0", 7, 0, true},
		{"6.10rc1", 6, 10, true},
	} {
		k, err := ParseRelease(c.rel)
		if err != nil {
			t.Errorf("%s: %v", c.rel, err)
			continue
		}
		if k.Major != c.major || k.Minor != c.minor || k.AtLeast(6, 6) != c.from66 || k.Release != c.rel {
			t.Errorf("%s: got %d.%d (>= 6.6 %t), want %d.%d (%t)", c.rel, k.Major, k.Minor, k.AtLeast(6, 6), c.major, c.minor, c.from66)
		}
	}
	for _, bad := range []string{"", "6", "x.1", "6.x"} {
		if _, err := ParseRelease(bad); err == nil {
			t.Errorf("%q parsed without error", bad)
		}
	}
}

func TestDetectKernel(t *testing.T) {
	k, err := DetectKernel()
	if err != nil {
		t.Fatal(err)
	}
	if k.Major < 5 || k.Release == "" {
		t.Errorf("implausible kernel %+v", k)
	}
}

// TestHaveTCX: the probe agrees with the version tcx came in (6.6) on the
// mainline kernels the project runs on (the kernel matrix runs 5.10 to
// the newest), and a second call gives the same answer.
func TestHaveTCX(t *testing.T) {
	requireRoot(t)
	k, err := DetectKernel()
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
