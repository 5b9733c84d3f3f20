//go:build linux

package proxy

import (
	"net/netip"
	"testing"

	"github.com/ambpf/ambpf/pkg/discovery"
)

// TestLoopReason: the destinations refused before any dial, outbound
// and inbound.
func TestLoopReason(t *testing.T) {
	pd := &pod{
		p:        &Proxy{cfg: Config{Limits: Limits{AllowLinkLocal: []netip.Prefix{netip.MustParsePrefix("169.254.169.254/32")}}}},
		workload: discovery.Workload{IPs: []netip.Addr{netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("fd00::5")}},
	}
	for _, tc := range []struct {
		dst      string
		outbound bool
		refused  bool
	}{
		{"127.0.0.1:15001", true, true},
		{"127.0.0.53:53", true, true},
		{"[::1]:15001", true, true},
		{"[::ffff:127.0.0.1]:15001", true, true},
		{"0.0.0.0:80", true, true},
		{"[::]:80", true, true},
		{"10.0.0.5:15001", true, true},
		{"10.0.0.5:8080", true, true}, // the pod itself, any port
		{"[fd00::5]:8080", true, true},
		{"169.254.1.1:80", true, true},
		{"[fe80::1]:80", true, true},
		{"169.254.169.254:80", true, false}, // allowed link-local
		{"224.0.0.1:80", true, true},
		{"10.0.0.6:8080", true, false},
		{"[fd00::6]:8080", true, false},
		{"93.184.216.34:443", true, false},

		{"10.0.0.5:8080", false, false},
		{"[fd00::5]:8080", false, false},
		{"10.0.0.5:15001", false, true},
		{"10.0.0.5:15006", false, true},
		{"10.0.0.5:15008", false, true},
		{"127.0.0.1:15006", false, true},
		{"10.0.0.6:8080", false, true}, // not the pod: never relayed onwards
		{"169.254.169.254:80", false, true},
	} {
		got := pd.loopReason(netip.MustParseAddrPort(tc.dst), tc.outbound)
		if (got != "") != tc.refused {
			t.Errorf("loopReason(%s, outbound=%v) = %q, want refused=%v", tc.dst, tc.outbound, got, tc.refused)
		}
	}
}
