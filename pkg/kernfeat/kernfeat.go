//go:build linux

// Package kernfeat answers what the running kernel can do for the parts
// of ambpf that link no BPF library (the proxy), and reads the kernel's
// release. Where the kernel can be asked it is, by the agent's side,
// which links cilium/ebpf: tcattach.HaveTCX probes tcx, and
// datapath.ProbeReusePortAssign probes SO_REUSEPORT steering, whose answer
// the agent sends the proxy with every pod (ZDS WorkloadInfo.ReusePort).
// ReusePortAssign here, read from the version, is only the proxy's
// fallback for an agent that does not say.
package kernfeat

import "sync"

var reusePort = sync.OnceValues(func() (bool, error) {
	k, err := DetectKernel()
	if err != nil {
		return false, err
	}
	return k.AtLeast(6, 6), nil
})

// ReusePortAssign guesses from the kernel's release whether bpf_sk_assign
// accepts SO_REUSEPORT listeners (Linux 6.6, "bpf, net: Support
// SO_REUSEPORT sockets with bpf_sk_assign"). Without it a proxy listening
// with SO_REUSEPORT has every captured connection dropped, so the answer is
// false when the kernel's release cannot be read: that only costs the
// proxy its SO_REUSEPORT upgrade handoff.
//
// It is a fallback, for the proxy's pods whose agent does not say
// (Istio's istio-cni, an ambpf-agent older than ambpf_reuseport), and for
// tests that need no BPF. The answer that counts is the agent's probe,
// datapath.ProbeReusePortAssign: it sends a real packet through a TC
// ingress hook into a reuseport listener, because nothing cheaper proves
// it. A version misses backports either way, a BPF test run is not at
// ingress, and the symbol the 6.6 series exported, inet_lookup_reuseport,
// is no proof: Debian's 5.10.0-32 has it and still refuses reuseport
// listeners (the kernel matrix found it; docs/KERNELS.md).
func ReusePortAssign() bool {
	ok, err := reusePort()
	return err == nil && ok
}
