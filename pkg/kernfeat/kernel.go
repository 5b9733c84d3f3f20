//go:build linux

package kernfeat

import (
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Kernel is the running kernel's release.
type Kernel struct {
	// Release is the full release string, as uname -r prints it.
	Release string
	// Major and Minor are its leading version numbers.
	Major, Minor int
}

// DetectKernel reads the running kernel's release.
func DetectKernel() (Kernel, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return Kernel{}, fmt.Errorf("uname: %w", err)
	}
	return ParseRelease(unix.ByteSliceToString(u.Release[:]))
}

// ParseRelease reads the version numbers of a release string such as
// "6.18.0-1-amd64" or "5.10.0+".
func ParseRelease(rel string) (Kernel, error) {
	parts := strings.SplitN(rel, ".", 3)
	if len(parts) < 2 {
		return Kernel{}, fmt.Errorf("parse kernel release %q", rel)
	}
	major, err := strconv.Atoi(parts[0])
	if err != nil {
		return Kernel{}, fmt.Errorf("parse kernel release %q: %w", rel, err)
	}
	minorStr := parts[1]
	if i := strings.IndexFunc(minorStr, func(r rune) bool { return r < '0' || r > '9' }); i >= 0 {
		minorStr = minorStr[:i]
	}
	minor, err := strconv.Atoi(minorStr)
	if err != nil {
		return Kernel{}, fmt.Errorf("parse kernel release %q: %w", rel, err)
	}
	return Kernel{Release: rel, Major: major, Minor: minor}, nil
}

// AtLeast reports whether the kernel is major.minor or newer (the tests
// compare the probes with it).
func (k Kernel) AtLeast(major, minor int) bool {
	return k.Major > major || (k.Major == major && k.Minor >= minor)
}
