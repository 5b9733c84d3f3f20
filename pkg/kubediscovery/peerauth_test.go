package kubediscovery

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/ambpf/ambpf/pkg/authz"
	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/kubetest"
)

// TestPeerAuthenticationFailsClosed: against a real API server, every
// PeerAuthentication the proxy cannot express as a namespace mode —
// workload- and port-level STRICT, an unsupported selector form, a
// malformed spec, an unknown mode — refuses plaintext to what it selects
// (its whole namespace when the selector cannot be read) and still lets
// mTLS in. Deleting it opens plaintext again (the namespace is
// PERMISSIVE).
func TestPeerAuthenticationFailsClosed(t *testing.T) {
	cp := kubetest.Shared(t)
	sharedCRDs.Do(func() { installCRDs(t, cp) })
	w := newWorld(t, cp, Config{})
	ipA, ipB := netip.MustParseAddr("10.246.1.1"), netip.MustParseAddr("10.246.1.2")
	w.pod("a", "sa-a", ipA.String(), map[string]string{RedirectionAnnotation: RedirectionEnabled}, map[string]string{"app": "a"})
	w.pod("b", "sa-b", ipB.String(), map[string]string{RedirectionAnnotation: RedirectionEnabled}, map[string]string{"app": "b"})
	w.eventually("pods a and b", func() bool {
		_, okA := w.store.WorkloadByIP(ipA)
		_, okB := w.store.WorkloadByIP(ipB)
		return okA && okB
	})

	// plaintext says whether a plaintext connection to ip:port is
	// admitted, as the proxy's inbound 15006 decides.
	plaintext := func(ip netip.Addr, port uint16) bool {
		wl, ok := w.store.WorkloadByIP(ip)
		if !ok {
			t.Fatalf("workload %s gone", ip)
		}
		return discovery.AdmitPlaintext(w.store, wl, authz.Conn{SrcIP: netip.MustParseAddr("10.9.0.1"), DstIP: ip, DstPort: port}).Allowed
	}
	mtls := func(ip netip.Addr, port uint16) bool {
		wl, _ := w.store.WorkloadByIP(ip)
		return discovery.Authorize(w.store, wl, authz.Conn{SrcIdentity: "spiffe://cluster.local/ns/x/sa/y", SrcIP: netip.MustParseAddr("10.9.0.1"), DstIP: ip, DstPort: port}).Allowed
	}
	type want struct {
		ip    netip.Addr
		port  uint16
		plain bool // plaintext admitted while the object exists
	}
	strictA := map[string]any{"selector": map[string]any{"matchLabels": map[string]any{"app": "a"}}, "mtls": map[string]any{"mode": "STRICT"}}
	for i, tc := range []struct {
		name       string
		meshStrict bool // a mesh-wide STRICT in the root namespace too
		spec       map[string]any
		want       []want
	}{
		{"workload-level STRICT", false, strictA,
			[]want{{ipA, 8080, false}, {ipB, 8080, true}}},
		// Mesh-wide STRICT: read as namespace-wide, this PERMISSIVE would
		// open the namespace.
		{"selector with matchExpressions", true, map[string]any{
			"selector": map[string]any{"matchExpressions": []any{map[string]any{"key": "app", "operator": "In", "values": []any{"a"}}}},
			"mtls":     map[string]any{"mode": "PERMISSIVE"}},
			[]want{{ipA, 8080, false}, {ipB, 8080, false}}},
		{"mtls not an object", false, map[string]any{"mtls": "STRICT"},
			[]want{{ipA, 8080, false}, {ipB, 8080, false}}},
		{"unknown mode", false, map[string]any{"mtls": map[string]any{"mode": "STRCT"}},
			[]want{{ipA, 8080, false}, {ipB, 8080, false}}},
		{"unknown field, selector readable", false, map[string]any{
			"selector": map[string]any{"matchLabels": map[string]any{"app": "a"}},
			"mtls":     map[string]any{"mode": "PERMISSIVE"}, "mtlsFuture": map[string]any{"mode": "STRICT"}},
			[]want{{ipA, 8080, false}, {ipB, 8080, true}}},
		{"port-level STRICT under PERMISSIVE", false, map[string]any{
			"mtls": map[string]any{"mode": "PERMISSIVE"}, "portLevelMtls": map[string]any{"8080": map[string]any{"mode": "STRICT"}}},
			[]want{{ipA, 8080, false}, {ipA, 9090, true}, {ipB, 8080, false}, {ipB, 9090, true}}},
		{"port-level unknown mode", false, map[string]any{
			"selector":      map[string]any{"matchLabels": map[string]any{"app": "b"}},
			"portLevelMtls": map[string]any{"9090": map[string]any{"mode": "strict"}}},
			[]want{{ipA, 9090, true}, {ipB, 9090, false}, {ipB, 8080, true}}},
		{"port not a number", false, map[string]any{
			"selector":      map[string]any{"matchLabels": map[string]any{"app": "b"}},
			"portLevelMtls": map[string]any{"http": map[string]any{"mode": "STRICT"}}},
			[]want{{ipA, 8080, true}, {ipB, 8080, false}}},
	} {
		parent := w.t
		t.Run(tc.name, func(t *testing.T) {
			w.t = t // world helpers fail the subtest
			defer func() { w.t = parent }()
			name := fmt.Sprintf("pa-%d", i)
			// Where the case's objects are, deleted at the end (or at
			// cleanup, so that a failed case leaves nothing to the next).
			var made []string
			deleteAll := func() {
				w.t = t
				for _, ns := range made {
					w.deleteIstio("peerauthentications", ns, name)
				}
				made, w.t = nil, parent
			}
			t.Cleanup(deleteAll)
			if tc.meshStrict {
				w.istio("peerauthentications", "PeerAuthentication", w.root, name, map[string]any{"mtls": map[string]any{"mode": "STRICT"}})
				made = append(made, w.root)
			}
			w.istio("peerauthentications", "PeerAuthentication", w.ns, name, tc.spec)
			made = append(made, w.ns)
			w.eventually("the peer authentication applied", func() bool {
				for _, c := range tc.want {
					if plaintext(c.ip, c.port) != c.plain {
						return false
					}
				}
				return true
			})
			for _, c := range tc.want {
				if !mtls(c.ip, c.port) {
					t.Errorf("mTLS to %s:%d refused", c.ip, c.port)
				}
			}
			deleteAll()
			w.eventually("plaintext admitted again after the delete", func() bool {
				for _, c := range tc.want {
					if !plaintext(c.ip, c.port) {
						return false
					}
				}
				return true
			})
		})
	}
}

// TestPeerAuthenticationIstioModes: against a real API server, the
// effective mode of each workload and port is the one istiod computes for
// ztunnel (pilot/pkg/serviceregistry/ambient/authorization.go):
// workload-level objects override their namespace both ways, DISABLE
// accepts plaintext like PERMISSIVE instead of inheriting a STRICT, and
// portLevelMtls exempts or tightens single ports.
func TestPeerAuthenticationIstioModes(t *testing.T) {
	cp := kubetest.Shared(t)
	sharedCRDs.Do(func() { installCRDs(t, cp) })
	w := newWorld(t, cp, Config{})
	ipA, ipB := netip.MustParseAddr("10.246.3.1"), netip.MustParseAddr("10.246.3.2")
	// c carries a sentinel STRICT created after each case's objects: once
	// it shows, the snapshot holds them all (one informer, in order), so
	// a case whose expectation equals the initial state cannot pass early.
	ipC := netip.MustParseAddr("10.246.3.3")
	w.pod("a", "sa-a", ipA.String(), nil, map[string]string{"app": "a"})
	w.pod("b", "sa-b", ipB.String(), nil, map[string]string{"app": "b"})
	w.pod("c", "sa-c", ipC.String(), nil, map[string]string{"app": "c"})
	w.eventually("pods a, b and c", func() bool {
		_, okA := w.store.WorkloadByIP(ipA)
		_, okB := w.store.WorkloadByIP(ipB)
		_, okC := w.store.WorkloadByIP(ipC)
		return okA && okB && okC
	})
	plaintext := func(ip netip.Addr, port uint16) bool {
		wl, ok := w.store.WorkloadByIP(ip)
		if !ok {
			t.Fatalf("workload %s gone", ip)
		}
		return discovery.AdmitPlaintext(w.store, wl, authz.Conn{SrcIP: netip.MustParseAddr("10.9.0.1"), DstIP: ip, DstPort: port}).Allowed
	}
	mode := func(m string) map[string]any { return map[string]any{"mtls": map[string]any{"mode": m}} }
	onA := func(m string, ports map[string]string) map[string]any {
		spec := map[string]any{"selector": map[string]any{"matchLabels": map[string]any{"app": "a"}}}
		if m != "" {
			spec["mtls"] = map[string]any{"mode": m}
		}
		if ports != nil {
			pl := map[string]any{}
			for p, pm := range ports {
				pl[p] = map[string]any{"mode": pm}
			}
			spec["portLevelMtls"] = pl
		}
		return spec
	}
	type obj struct {
		root bool // in the root namespace, else in the test namespace
		name string
		spec map[string]any
	}
	type want struct {
		ip    netip.Addr
		port  uint16
		plain bool
	}
	for _, tc := range []struct {
		name string
		objs []obj
		want []want
	}{
		{"workload STRICT in a PERMISSIVE namespace",
			[]obj{{false, "ns", mode("PERMISSIVE")}, {false, "wl", onA("STRICT", nil)}},
			[]want{{ipA, 8080, false}, {ipB, 8080, true}}},
		{"namespace DISABLE under mesh STRICT",
			[]obj{{true, "mesh", mode("STRICT")}, {false, "ns", mode("DISABLE")}},
			[]want{{ipA, 8080, true}, {ipB, 8080, true}}},
		{"workload PERMISSIVE in a STRICT namespace",
			[]obj{{false, "ns", mode("STRICT")}, {false, "wl", onA("PERMISSIVE", nil)}},
			[]want{{ipA, 8080, true}, {ipB, 8080, false}}},
		{"workload DISABLE under mesh STRICT",
			[]obj{{true, "mesh", mode("STRICT")}, {false, "wl", onA("DISABLE", nil)}},
			[]want{{ipA, 8080, true}, {ipB, 8080, false}}},
		{"port PERMISSIVE under an inherited STRICT",
			[]obj{{false, "ns", mode("STRICT")}, {false, "wl", onA("", map[string]string{"8080": "PERMISSIVE"})}},
			[]want{{ipA, 8080, true}, {ipA, 9090, false}, {ipB, 8080, false}}},
		{"port DISABLE under workload STRICT",
			[]obj{{false, "wl", onA("STRICT", map[string]string{"8080": "DISABLE"})}},
			[]want{{ipA, 8080, true}, {ipA, 9090, false}, {ipB, 9090, true}}},
		// istiod keeps its static STRICT policy here (it only looks for
		// PERMISSIVE ports under an UNSET workload mode).
		{"port DISABLE under an inherited STRICT stays STRICT",
			[]obj{{false, "ns", mode("STRICT")}, {false, "wl", onA("", map[string]string{"8080": "DISABLE"})}},
			[]want{{ipA, 8080, false}, {ipB, 8080, false}}},
		{"port STRICT under workload PERMISSIVE in a STRICT namespace",
			[]obj{{false, "ns", mode("STRICT")}, {false, "wl", onA("PERMISSIVE", map[string]string{"9090": "STRICT"})}},
			[]want{{ipA, 8080, true}, {ipA, 9090, false}, {ipB, 8080, false}}},
	} {
		parent := w.t
		t.Run(tc.name, func(t *testing.T) {
			w.t = t
			defer func() { w.t = parent }()
			var made [][2]string
			deleteAll := func() {
				w.t = t
				for _, m := range made {
					w.deleteIstio("peerauthentications", m[0], m[1])
				}
				made, w.t = nil, parent
			}
			t.Cleanup(deleteAll)
			for _, o := range tc.objs {
				ns := w.ns
				if o.root {
					ns = w.root
				}
				w.istio("peerauthentications", "PeerAuthentication", ns, o.name, o.spec)
				made = append(made, [2]string{ns, o.name})
			}
			w.istio("peerauthentications", "PeerAuthentication", w.ns, "sentinel", map[string]any{
				"selector": map[string]any{"matchLabels": map[string]any{"app": "c"}}, "mtls": map[string]any{"mode": "STRICT"}})
			made = append(made, [2]string{w.ns, "sentinel"})
			w.eventually("the sentinel applied", func() bool { return !plaintext(ipC, 80) })
			for _, c := range tc.want {
				if plaintext(c.ip, c.port) != c.plain {
					t.Errorf("plaintext to %s:%d admitted=%v, want %v", c.ip, c.port, !c.plain, c.plain)
				}
			}
			deleteAll()
			w.eventually("plaintext admitted again after the delete", func() bool {
				if !plaintext(ipC, 80) {
					return false // the sentinel is still there
				}
				for _, c := range tc.want {
					if !plaintext(c.ip, c.port) {
						return false
					}
				}
				return true
			})
		})
	}
}
