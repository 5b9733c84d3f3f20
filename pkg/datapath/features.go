//go:build linux

package datapath

import (
	"fmt"

	"github.com/ambpf/ambpf/pkg/tcattach"
)

// Mode is how the TC programs are attached to a pod's devices.
type Mode = tcattach.Mode

const (
	// ModeTCX attaches through tcx links (kernel >= 6.6).
	ModeTCX = tcattach.ModeTCX
	// ModeClsact attaches as clsact filters, for kernels without tcx.
	ModeClsact = tcattach.ModeClsact
)

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
	k, err := tcattach.DetectKernel()
	if err != nil {
		return Features{}, err
	}
	return Features{Kernel: k.Release, Mode: k.Mode(), ReusePortAssign: k.ReusePortAssign()}, nil
}
