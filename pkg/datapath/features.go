//go:build linux

package datapath

import (
	"fmt"

	"github.com/ambpf/ambpf/pkg/kernfeat"
	"github.com/ambpf/ambpf/pkg/tcattach"
)

// Mode is how the TC programs are attached to a pod's devices.
type Mode = tcattach.Mode

const (
	// ModeTCX attaches through tcx links (kernel 6.6, tcattach.HaveTCX).
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
	// TCX is true when the kernel has tcx links (6.6, probed); they are
	// used only when asked for (Config.Mode), see DetectFeatures.
	TCX bool
	// ReusePortAssign is true when bpf_sk_assign accepts SO_REUSEPORT
	// listeners (6.6, probed: ProbeReusePortAssign). Without it the proxy
	// must listen without SO_REUSEPORT, or captured connections are
	// dropped (never passed); the agent tells it so per pod over ZDS.
	ReusePortAssign bool
	// ReusePortErr is why the SO_REUSEPORT probe could not answer; nil
	// when it did. ReusePortAssign is false then (fail safe: it only
	// costs the proxy its SO_REUSEPORT upgrade handoff).
	ReusePortErr error
}

// String reports the choices in one line, for logs and status output.
func (f Features) String() string {
	return fmt.Sprintf("kernel=%s attach=%s tcx-available=%t reuseport-assign=%t", f.Kernel, f.Mode, f.TCX, f.ReusePortAssign)
}

// DetectFeatures finds the kernel's mechanisms and picks the attach mode:
// tcx is probed (tcattach.HaveTCX), and so is SO_REUSEPORT steering
// (ProbeReusePortAssign, a real packet through a TC ingress hook in a
// scratch network namespace). A tcx probe that cannot run is an error; a
// SO_REUSEPORT probe that cannot answer is not: it is reported in
// ReusePortErr and taken as unsupported. Both probes run once per process.
//
// The default is clsact on every kernel, tcx only on request. Creating or
// detaching a tcx link waits for an RCU grace period with the RTNL lock
// held (the device's program list is swapped, then the old one must be
// unused), so a pod's three hooks cost three grace periods to enrol and
// three to remove, serialised across the whole node: measured here,
// 51 ms to enrol and 43 ms to remove a pod with tcx against 10 ms and 4 ms
// with clsact filters, which need no grace period (docs/BENCHMARKS.md,
// "Enrolment"). Both run the same programs on the same hooks.
func DetectFeatures() (Features, error) {
	k, err := kernfeat.DetectKernel()
	if err != nil {
		return Features{}, err
	}
	tcx, err := tcattach.HaveTCX()
	if err != nil {
		return Features{}, err
	}
	reusePort, reusePortErr := ProbeReusePortAssign()
	return Features{Kernel: k.Release, Mode: ModeClsact, TCX: tcx, ReusePortAssign: reusePort && reusePortErr == nil, ReusePortErr: reusePortErr}, nil
}
