//go:build linux

package kubee2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/podwatch"
)

// authorizationPolicies is Istio's resource, served by the chart's CRD.
var authorizationPolicies = schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"}

func (c *cluster) dynamicClient() dynamic.Interface {
	c.t.Helper()
	d, err := dynamic.NewForConfig(c.cp.Config)
	if err != nil {
		c.t.Fatalf("dynamic client: %v", err)
	}
	return d
}

// createPolicy creates a security.istio.io/v1 AuthorizationPolicy; it is
// deleted when the test ends if the test has not deleted it.
func (c *cluster) createPolicy(ns, name string, spec map[string]any) {
	c.t.Helper()
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": name, "namespace": ns},
		"spec":     spec,
	}}
	res := c.dynamicClient().Resource(authorizationPolicies).Namespace(ns)
	if _, err := res.Create(context.Background(), u, metav1.CreateOptions{}); err != nil {
		c.t.Fatalf("create AuthorizationPolicy %s/%s: %v", ns, name, err)
	}
	c.t.Cleanup(func() { _ = res.Delete(context.Background(), name, metav1.DeleteOptions{}) })
}

func (c *cluster) deletePolicy(ns, name string) {
	c.t.Helper()
	err := c.dynamicClient().Resource(authorizationPolicies).Namespace(ns).Delete(context.Background(), name, metav1.DeleteOptions{})
	if err != nil {
		c.t.Fatalf("delete AuthorizationPolicy %s/%s: %v", ns, name, err)
	}
}

// workload returns what the proxy's discovery knows of a pod (nil when
// it knows nothing).
func (c *cluster) workload(p *kpod) *discovery.Workload {
	w, _ := c.proxy.Store().WorkloadByIP(p.ip)
	return w
}

// waitWorkload waits until the proxy's discovery describes the pod as
// the API does: HBONE, with its labels (policy selectors match those,
// and only the Kubernetes layer has them).
func (c *cluster) waitWorkload(p *kpod, labels map[string]string) {
	c.t.Helper()
	agenttest.WaitFor(c.t, waitLong, fmt.Sprintf("the proxy knows %s with labels %v", p, labels), func() bool {
		w := c.workload(p)
		if w == nil || !w.HBONE() || w.Namespace != p.namespace || w.Name != p.name {
			return false
		}
		for k, v := range labels {
			if w.Labels[k] != v {
				return false
			}
		}
		return true
	})
}

// waitPolicies waits until the proxy applies exactly the named policies
// (namespace/name) to the pod's workload.
func (c *cluster) waitPolicies(p *kpod, want ...string) {
	c.t.Helper()
	agenttest.WaitFor(c.t, waitLong, fmt.Sprintf("the proxy applies %v to %s", want, p), func() bool {
		w := c.workload(p)
		if w == nil {
			return false
		}
		got := c.proxy.Store().PoliciesFor(w)
		if len(got) != len(want) {
			return false
		}
		for i := range got {
			if got[i].ID() != want[i] {
				return false
			}
		}
		return true
	})
}

// waitClosed waits until the other end closes tc (EOF or reset) and
// fails the test when it is still open after waitLong.
func waitClosed(t *testing.T, tc *nettest.TCPConn, what string) {
	t.Helper()
	tc.Conn.SetReadDeadline(time.Now().Add(waitLong))
	_, err := io.Copy(io.Discard, tc.Conn) // nil at EOF
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: still open after %v", what, waitLong)
	}
}

// TestAuthorizationPolicy: a DENY AuthorizationPolicy for the client's
// principal, created through the API while the client and another pod
// each hold an HBONE connection to the server, closes the client's
// connection and refuses its new ones with HBONE 401 (the proxy logs the
// policy that denied), while the other pod's connections carry on;
// deleting the policy lets the client in again.
func TestAuthorizationPolicy(t *testing.T) {
	c := newCluster(t)
	ns := c.namespace("authz", map[string]string{podwatch.DataplaneModeLabel: podwatch.DataplaneAmbient})
	serverLabels := map[string]string{"app": "server"}
	srv := c.startPod(ns, "server", podOpts{labels: serverLabels, serviceAccount: "server"})
	cli := c.startPod(ns, "client", podOpts{serviceAccount: "client"})
	other := c.startPod(ns, "other", podOpts{serviceAccount: "other"})
	for _, p := range []*kpod{srv, cli, other} {
		c.waitAnnotation(p, podwatch.RedirectionEnabled)
	}
	c.waitWorkload(srv, serverLabels)
	c.waitPolicies(srv)

	long := mustDial(t, cli, srv)
	echo(t, long, "before the policy")
	kept := mustDial(t, other, srv)
	echo(t, kept, "before the policy")

	principal := "spiffe://cluster.local/ns/" + ns + "/sa/client"
	const policy = "deny-client"
	reason := fmt.Sprintf("denied by DENY policy %s/%s rule 0", ns, policy)
	c.createPolicy(ns, policy, map[string]any{
		"action":   "DENY",
		"selector": map[string]any{"matchLabels": map[string]any{"app": "server"}},
		"rules": []any{map[string]any{"from": []any{map[string]any{"source": map[string]any{
			"principals": []any{"cluster.local/ns/" + ns + "/sa/client"},
		}}}}},
	})

	// The client's open tunnel is closed, and the proxy says why.
	waitClosed(t, long, "the denied client's connection")
	c.waitLog(`msg="closing hbone tunnel after policy change"`, "src_identity="+principal, fmt.Sprintf("reason=%q", reason))

	// New connections from the client are refused: the server's proxy
	// answers the CONNECT with 401 and logs the policy, the client's
	// proxy closes the app's connection and logs the refusal.
	if tc, err := dial(t, cli, srv); err == nil {
		t.Fatalf("%s -> %s connected under the DENY policy (greeting %q)", cli, srv, tc.Greeting)
	}
	c.waitLog(`msg="hbone request refused"`, "status=401", "src_identity="+principal, fmt.Sprintf("err=%q", reason))
	c.waitLog(`msg="connection complete"`, "direction=outbound", "src.workload=client", "dst.workload=server",
		`reason="hbone server refused: 401 Unauthorized"`)

	// The policy names the client only: the other pod keeps its
	// connection and opens new ones.
	echo(t, kept, "during the policy")
	tc := mustDial(t, other, srv)
	echo(t, tc, marker)
	tc.Conn.Close()

	// Deleted: the client connects again.
	c.deletePolicy(ns, policy)
	c.waitPolicies(srv)
	tc = mustDial(t, cli, srv)
	echo(t, tc, marker)
	tc.Conn.Close()
	echo(t, kept, "after the policy")
}
