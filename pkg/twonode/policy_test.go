//go:build linux

package twonode

import (
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/metrics"
	"github.com/ambpf/ambpf/pkg/nodelab"
)

// policy is an AuthorizationPolicy document in namespace ns-b with the
// action, admitting or refusing the principal.
func policy(action, principal string) string {
	return `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-policy, namespace: ns-b}
spec:
  action: ` + action + `
  rules:
  - from:
    - source:
        principals: [` + principal + `]
`
}

// principal is the pod's identity without the spiffe:// scheme, as
// AuthorizationPolicy principals name it.
func principal(p *nodelab.Pod) string { return p.Identity()[len("spiffe://"):] }

// TestCrossNodePolicy: an AuthorizationPolicy for B (node 2) that denies
// A's identity refuses A's connection from node 1 on node 2 (node 2's
// proxy logs the denial with A's identity, which it only knows from A's
// certificate), while D (node 2) still gets through; an ALLOW policy for
// A alone lets A through and refuses D.
func TestCrossNodePolicy(t *testing.T) {
	l := newLab(t, labOptions{})
	l.mustReach(l.a, l.b, "before any policy")

	l.writeDiscovery(policy("DENY", principal(l.a)))
	l.mustBeRefused(l.a, l.b, "the DENY policy on node 2")
	in := waitAccessLog(t, l.n2, "inbound", "node 2's denial of a", func(m map[string]any) bool {
		return m[metrics.LogSrcIdentity] == l.a.Identity() && m[metrics.LogResponseFlags] == metrics.FlagDenied
	})
	t.Logf("node 2 logged: %v", in)
	l.mustReach(l.d, l.b, "d is not denied")

	l.writeDiscovery(policy("ALLOW", principal(l.a)))
	l.mustReach(l.a, l.b, "allowed from node 1")
	checkIdentities(t, l.a, l.b)
	l.mustBeRefused(l.d, l.b, "the ALLOW policy admits a alone")
}

// TestCrossNodeStrict: B's namespace under a STRICT PeerAuthentication
// refuses plaintext from P, node 1's pod outside the mesh (which got
// through while PERMISSIVE), and still admits A over HBONE.
func TestCrossNodeStrict(t *testing.T) {
	l := newLab(t, labOptions{})
	l.mustReach(l.p, l.b, "permissive: plaintext admitted")

	l.writeDiscovery(`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: ns-b}
spec:
  mtls: {mode: STRICT}
`)
	from := time.Now()
	l.mustBeRefused(l.p, l.b, "STRICT on node 2")
	waitFor(t, 5*time.Second, "node 2's proxy to log the refused plaintext connection", func() bool {
		for _, f := range proxyLogs(l.n2) {
			for _, m := range nodelab.LogLines(f, 0, "inbound plaintext connection refused") {
				if ts, ok := m["time"].(string); ok {
					if at, err := time.Parse(time.RFC3339Nano, ts); err == nil && at.After(from.Add(-time.Second)) {
						return true
					}
				}
			}
		}
		return false
	})
	l.mustReach(l.a, l.b, "mTLS from node 1 under STRICT")
	checkIdentities(t, l.a, l.b)
	l.mustReach(l.p, l.cc, "c is outside the mesh: STRICT on ns-b does not apply")
}
