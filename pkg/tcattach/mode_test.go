//go:build linux

package tcattach

import "testing"

func TestParseRelease(t *testing.T) {
	for _, c := range []struct {
		rel          string
		major, minor int
		mode         Mode
	}{
		{"6.18.0-1-amd64", 6, 18, ModeTCX},
		{"6.6.0", 6, 6, ModeTCX},
		{"6.5.13-cloud", 6, 5, ModeClsact},
		{"5.10.0+", 5, 10, ModeClsact},
		{"7.0", 7, 0, ModeTCX},
		{"6.10rc1", 6, 10, ModeTCX},
	} {
		k, err := ParseRelease(c.rel)
		if err != nil {
			t.Errorf("%s: %v", c.rel, err)
			continue
		}
		if k.Major != c.major || k.Minor != c.minor || k.Mode() != c.mode || k.Release != c.rel {
			t.Errorf("%s: got %d.%d %s, want %d.%d %s", c.rel, k.Major, k.Minor, k.Mode(), c.major, c.minor, c.mode)
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

func TestModeString(t *testing.T) {
	if ModeTCX.String() != "tcx" || ModeClsact.String() != "clsact" || Mode(9).String() != "mode(9)" {
		t.Errorf("mode names: %s %s %s", ModeTCX, ModeClsact, Mode(9))
	}
}
