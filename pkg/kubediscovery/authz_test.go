package kubediscovery

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/ambpf/ambpf/pkg/authz"
	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/kubetest"
)

// TestAuthorizationPolicyFidelity: against a real API server, policies
// mean at L4 what istiod's conversion for ztunnel makes them mean
// (pilot/pkg/serviceregistry/ambient/authorization.go): a DENY whose to
// entry only names HTTP methods denies nothing, serviceAccounts is a valid
// field (not a malformed policy turned DENY-all), and an istio.io/dry-run
// policy is logged, not enforced.
func TestAuthorizationPolicyFidelity(t *testing.T) {
	cp := kubetest.Shared(t)
	sharedCRDs.Do(func() { installCRDs(t, cp) })
	w := newWorld(t, cp, Config{})
	ipA, ipB := netip.MustParseAddr("10.246.2.1"), netip.MustParseAddr("10.246.2.2")
	w.pod("a", "sa-a", ipA.String(), nil, map[string]string{"app": "a"})
	w.pod("b", "sa-b", ipB.String(), nil, map[string]string{"app": "b"})
	w.eventually("pods a and b", func() bool {
		_, okA := w.store.WorkloadByIP(ipA)
		_, okB := w.store.WorkloadByIP(ipB)
		return okA && okB
	})
	// Only on a: ALLOW the service account x/y.
	w.istio("authorizationpolicies", "AuthorizationPolicy", w.ns, "allow-sa", map[string]any{
		"selector": map[string]any{"matchLabels": map[string]any{"app": "a"}},
		"rules":    []any{map[string]any{"from": []any{map[string]any{"source": map[string]any{"serviceAccounts": []any{"x/y"}}}}}}})
	// Only on b: DENY from this namespace for DELETE (HTTP only).
	w.istio("authorizationpolicies", "AuthorizationPolicy", w.ns, "deny-delete", map[string]any{
		"selector": map[string]any{"matchLabels": map[string]any{"app": "b"}},
		"action":   "DENY",
		"rules": []any{map[string]any{
			"from": []any{map[string]any{"source": map[string]any{"namespaces": []any{w.ns}}}},
			"to":   []any{map[string]any{"operation": map[string]any{"methods": []any{"DELETE"}}}}}}})
	// On b too: a dry-run DENY of everything.
	w.istioAnnotated("authorizationpolicies", "AuthorizationPolicy", w.ns, "deny-all-dry", map[string]any{"istio.io/dry-run": "true"}, map[string]any{
		"selector": map[string]any{"matchLabels": map[string]any{"app": "b"}},
		"action":   "DENY", "rules": []any{map[string]any{}}})
	w.eventually("three policies", func() bool {
		wb, _ := w.store.WorkloadByIP(ipB)
		wa, _ := w.store.WorkloadByIP(ipA)
		return len(w.store.PoliciesFor(wa)) == 1 && len(w.store.PoliciesFor(wb)) == 2
	})
	decide := func(ip netip.Addr, id string) authz.Decision {
		wl, _ := w.store.WorkloadByIP(ip)
		return discovery.Authorize(w.store, wl, authz.Conn{SrcIdentity: id, SrcIP: netip.MustParseAddr("10.9.0.1"), DstIP: ip, DstPort: 8080})
	}
	if d := decide(ipA, "spiffe://cluster.local/ns/x/sa/y"); !d.Allowed {
		t.Errorf("serviceAccounts x/y to a: %s", d.Reason)
	}
	if d := decide(ipA, "spiffe://cluster.local/ns/x/sa/z"); d.Allowed {
		t.Errorf("x/z to a allowed by a serviceAccounts [x/y] ALLOW: %s", d.Reason)
	}
	d := decide(ipB, "spiffe://cluster.local/ns/"+w.ns+"/sa/c")
	if !d.Allowed {
		t.Errorf("DENY with only HTTP methods in to denied at L4: %s", d.Reason)
	}
	if want := "dry-run: DENY policy " + w.ns + "/deny-all-dry rule 0 matches"; len(d.DryRun) != 1 || d.DryRun[0] != want {
		t.Errorf("DryRun = %q, want [%q]", d.DryRun, want)
	}
	for _, want := range []string{"dry-run authorization policy", "HTTP attributes"} {
		if !strings.Contains(w.logs.String(), want) {
			t.Errorf("source log lacks %q", want)
		}
	}
	if strings.Contains(w.logs.String(), "malformed authorization policy") {
		t.Errorf("a valid policy was read as malformed:\n%s", w.logs.String())
	}
}
