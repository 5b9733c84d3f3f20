//go:build linux

// Package nettest builds throwaway network topologies for privileged tests
// (a "node" network namespace with a bridge and pods attached to it, see
// pkg/netlab), runs code and commands inside them, and holds the scenario
// table that checks a capture mechanism (Istio's iptables rules, or the
// eBPF datapath) against the in-pod datapath contract of docs/spec
// datapath.md.
package nettest

import (
	"fmt"
	"net/netip"
	"os"
	"testing"

	"github.com/ambpf/ambpf/pkg/netlab"
)

// The topology types are pkg/netlab's; nettest only ties their lifetime
// to a test.
type (
	// Topology is a node namespace with a bridge and pods attached to it.
	Topology = netlab.Lab
	// Netns is a named network namespace of a Topology.
	Netns = netlab.Netns
	// Pod is a pod network namespace of a Topology.
	Pod = netlab.Pod
)

// Addresses of the node bridge; pod i gets .(10+i) / ::(10+i).
var (
	BridgeV4 = netlab.BridgeV4
	BridgeV6 = netlab.BridgeV6
)

// Prefix is the name prefix of every network namespace and cgroup nettest
// creates; a leak check can look for it in /run/netns.
const Prefix = netlab.DefaultPrefix

// NewTopology creates the node namespace and n pods named pod0, pod1, ...
// It skips the test when not root, fails it on error and removes the
// topology in tb's cleanup. IPv6 addresses are usable (not tentative)
// when it returns.
func NewTopology(tb testing.TB, n int) *Topology {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("nettest: network namespaces need root")
	}
	pods := make([]string, n)
	for i := range pods {
		pods[i] = fmt.Sprintf("pod%d", i)
	}
	lab, err := netlab.Build(netlab.Options{Prefix: Prefix, Pods: pods})
	if err != nil {
		tb.Fatalf("build topology: %v", err)
	}
	tb.Cleanup(func() {
		if err := lab.Close(); err != nil {
			tb.Errorf("topology cleanup: %v", err)
		}
	})
	return lab
}

// Cgroup2Mount returns the mount point of the cgroup2 hierarchy (see
// netlab.Cgroup2Mount).
func Cgroup2Mount() (string, error) { return netlab.Cgroup2Mount() }

// run runs cmd and wraps a failure with the command line and its output.
var run = netlab.Run

func netipJoin(a netip.Addr, port uint16) string { return netip.AddrPortFrom(a, port).String() }
