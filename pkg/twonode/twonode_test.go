//go:build linux

package twonode

import (
	"strconv"
	"strings"
	"testing"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/metrics"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/nodelab"
)

const hbonePort = meshconst.InboundHBONEPort

// TestCrossNodeHBONE: A (node 1) -> B (node 2) crosses the inter-node
// link only as TLS to B:15008, B's app sees A's IP, and each proxy logs
// the other side's identity (two proxies with their own intermediates
// verified each other against the shared root). B -> A is the same the
// other way. A -> C (node 2, not in the mesh) is plain TCP on the link.
func TestCrossNodeHBONE(t *testing.T) {
	l := newLab(t, labOptions{})

	t.Run("a-to-b", func(t *testing.T) {
		const secret = "CANARY-a-to-b-must-not-cross-in-clear"
		capt := l.capture(l.n1, "tcp")
		l.mustReach(l.a, l.b, secret)
		tls := tlsHandshakes(t, capt)
		dump := read(t, capt, "-A")
		counts := flows(dump)
		if to(counts, l.a.IP, l.b.IP, hbonePort) == 0 {
			t.Errorf("no packet a -> b:%d on the inter-node link:\n%s", hbonePort, dump)
		}
		if n := to(counts, l.a.IP, l.b.IP, nettest.AppPort); n > 0 {
			t.Errorf("%d packets a -> b:%d (plaintext) on the inter-node link", n, nettest.AppPort)
		}
		for k := range counts {
			if !strings.HasSuffix(k, ":"+itoa(hbonePort)) && !strings.Contains(k, l.b.IP.String()+" > ") {
				t.Errorf("unexpected flow on the link: %s", k)
			}
		}
		if strings.Contains(dump, secret) {
			t.Error("the payload crossed the inter-node link in clear")
		}
		if tls == 0 {
			t.Error("no TLS handshake record to port 15008 on the link")
		}
		checkIdentities(t, l.a, l.b)
	})

	t.Run("b-to-a", func(t *testing.T) {
		const secret = "CANARY-b-to-a-must-not-cross-in-clear"
		capt := l.capture(l.n2, "tcp")
		l.mustReach(l.b, l.a, secret)
		dump := read(t, capt, "-A")
		counts := flows(dump)
		if to(counts, l.b.IP, l.a.IP, hbonePort) == 0 {
			t.Errorf("no packet b -> a:%d on the inter-node link:\n%s", hbonePort, dump)
		}
		if n := to(counts, l.b.IP, l.a.IP, nettest.AppPort); n > 0 {
			t.Errorf("%d packets b -> a:%d (plaintext) on the link", n, nettest.AppPort)
		}
		if strings.Contains(dump, secret) {
			t.Error("the payload crossed the inter-node link in clear")
		}
		checkIdentities(t, l.b, l.a)
	})

	t.Run("a-to-c-passthrough", func(t *testing.T) {
		const visible = "PASSTHROUGH-a-to-c-is-plain-tcp"
		capt := l.capture(l.n1, "tcp")
		l.mustReach(l.a, l.cc, visible)
		dump := read(t, capt, "-A")
		counts := flows(dump)
		if to(counts, l.a.IP, l.cc.IP, nettest.AppPort) == 0 {
			t.Errorf("no plain packet a -> c:%d on the link:\n%s", nettest.AppPort, dump)
		}
		if n := to(counts, l.a.IP, l.cc.IP, hbonePort); n > 0 {
			t.Errorf("%d packets a -> c:%d: c is not in the mesh", n, hbonePort)
		}
		if !strings.Contains(dump, visible) {
			t.Error("the passthrough payload is not in the capture (is the capture blind?)")
		}
	})
}

// checkIdentities waits for the access-log lines of the src -> dst
// connection on both nodes: the source node's proxy logs it outbound with
// mutual TLS to dst's identity, the destination node's proxy inbound from
// src's identity and address.
func checkIdentities(t *testing.T, src, dst *nodelab.Pod) {
	t.Helper()
	mtls := func(m map[string]any) bool {
		return m[metrics.LogSecurity] == metrics.SecurityMutualTLS && m[metrics.LogSrcIdentity] == src.Identity() && m[metrics.LogDstIdentity] == dst.Identity()
	}
	waitAccessLog(t, src.Node, "outbound", "outbound mTLS log on "+src.Node.Name, mtls)
	in := waitAccessLog(t, dst.Node, "inbound", "inbound mTLS log on "+dst.Node.Name, mtls)
	if addr, _ := in[metrics.LogSrcAddr].(string); !strings.HasPrefix(addr, src.IP.String()+":") {
		t.Errorf("%s proxy logged source %q, want %s", dst.Node.Name, addr, src.IP)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
