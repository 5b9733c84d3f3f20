//go:build linux

package kernfeat

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

func TestReusePortAssign(t *testing.T) {
	k, err := DetectKernel()
	if err != nil {
		t.Fatal(err)
	}
	if got := ReusePortAssign(); got != k.AtLeast(6, 6) {
		t.Errorf("kernel %s: ReusePortAssign %t", k.Release, got)
	}
}
