//go:build linux

// Package kernfeat answers what the running kernel can do for the parts
// of ambpf that link no BPF library (the proxy), and reads the kernel's
// release. Where the kernel can be asked it is (tcattach.HaveTCX probes
// tcx); SO_REUSEPORT steering cannot be asked cheaply and is read from the
// version (ReusePortAssign).
package kernfeat

import "sync"

var reusePort = sync.OnceValues(func() (bool, error) {
	k, err := DetectKernel()
	if err != nil {
		return false, err
	}
	return k.AtLeast(6, 6), nil
})

// ReusePortAssign reports whether bpf_sk_assign accepts SO_REUSEPORT
// listeners on the running kernel (Linux 6.6, "bpf, net: Support
// SO_REUSEPORT sockets with bpf_sk_assign"). Without it a proxy listening
// with SO_REUSEPORT has every captured connection dropped, so the answer is
// false when the kernel's release cannot be read: that only costs the
// proxy its SO_REUSEPORT upgrade handoff.
//
// It is the one feature read from the version. A probe would have to send
// a real packet through a TC ingress hook into a reuseport listener (a
// BPF test run is not at ingress), and the symbol the 6.6 series exported,
// inet_lookup_reuseport, is no proof: Debian's 5.10.0-32 has it and still
// refuses reuseport listeners (the kernel matrix found it; docs/KERNELS.md).
func ReusePortAssign() bool {
	ok, err := reusePort()
	return err == nil && ok
}
