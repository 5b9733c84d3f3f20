//go:build linux

package datapath

import (
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Mode is how the TC programs are attached to a pod's devices.
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

// Features are the kernel mechanisms the datapath uses, detected at run time.
type Features struct {
	// Kernel is the running kernel release.
	Kernel string
	// Mode is the TC attach mode chosen.
	Mode Mode
	// ReusePortAssign is true when bpf_sk_assign accepts SO_REUSEPORT
	// listeners (>= 6.6). Without it the proxy must listen without
	// SO_REUSEPORT, or captured connections are dropped (never passed).
	ReusePortAssign bool
}

// String reports the choices in one line, for logs and status output.
func (f Features) String() string {
	return fmt.Sprintf("kernel=%s attach=%s reuseport-assign=%t", f.Kernel, f.Mode, f.ReusePortAssign)
}

// DetectFeatures reads the kernel version and picks the attach mode. Both
// tcx and reuseport support for sk_assign arrived in 6.6.
func DetectFeatures() (Features, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return Features{}, fmt.Errorf("uname: %w", err)
	}
	rel := unix.ByteSliceToString(u.Release[:])
	major, minor, err := parseRelease(rel)
	if err != nil {
		return Features{}, err
	}
	modern := major > 6 || (major == 6 && minor >= 6)
	f := Features{Kernel: rel, Mode: ModeClsact, ReusePortAssign: modern}
	if modern {
		f.Mode = ModeTCX
	}
	return f, nil
}

func parseRelease(rel string) (major, minor int, err error) {
	parts := strings.SplitN(rel, ".", 3)
	if len(parts) < 2 {
		return 0, 0, fmt.Errorf("parse kernel release %q", rel)
	}
	major, err = strconv.Atoi(parts[0])
	if err != nil {
		return 0, 0, fmt.Errorf("parse kernel release %q: %w", rel, err)
	}
	minorStr := parts[1]
	if i := strings.IndexFunc(minorStr, func(r rune) bool { return r < '0' || r > '9' }); i >= 0 {
		minorStr = minorStr[:i]
	}
	minor, err = strconv.Atoi(minorStr)
	if err != nil {
		return 0, 0, fmt.Errorf("parse kernel release %q: %w", rel, err)
	}
	return major, minor, nil
}
