//go:build linux

// Package tcattach attaches eBPF programs to a device's TC hooks, the same
// way for every ambpf program family: as tcx links on kernels that have
// them (>= 6.6), else as clsact filters with a private priority and handle.
// It also probes whether the running kernel has tcx (HaveTCX), detaches
// pinned links, and reads their state back.
//
// Functions that take an ifindex act in the network namespace of the
// calling thread: run them inside netns.NS.Do for another namespace.
package tcattach

import (
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Mode is how TC programs are attached to a device.
type Mode uint32

const (
	// ModeTCX attaches through tcx links (kernel >= 6.6): pinnable, chain
	// safely with other programs, replaced atomically.
	ModeTCX Mode = 1
	// ModeClsact attaches as clsact filters with a private priority and
	// handle, for kernels without tcx.
	ModeClsact Mode = 2
)

func (m Mode) String() string {
	switch m {
	case ModeTCX:
		return "tcx"
	case ModeClsact:
		return "clsact"
	}
	return fmt.Sprintf("mode(%d)", uint32(m))
}

// Kernel is the running kernel's release, for logs and status output:
// what the kernel can do is probed (HaveTCX, kernfeat), never read from
// the version.
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
