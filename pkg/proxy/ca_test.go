//go:build linux

package proxy

import (
	"strings"
	"testing"

	"github.com/ambpf/ambpf/pkg/ca"
	"github.com/ambpf/ambpf/pkg/ca/catest"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/kubetest"
	"github.com/ambpf/ambpf/pkg/zds"
)

// TestCertificatesFromCAService runs the proxy with no local CA, getting
// its pods' certificates from the ambpf-ca binary with a node proxy's
// projected token: two pods of its node talk over HBONE with those
// certificates, and a pod whose service account runs only on another
// node is refused its certificate, so its start fails with the CA's
// reason and the refusal is counted on /metrics.
func TestCertificatesFromCAService(t *testing.T) {
	m := catest.NewMesh(t, kubetest.Start(t), "pxca")
	nodeA, nodeB := m.Node("a"), m.Node("b")
	self := m.Pod(m.Sys, "proxy-a", m.ProxySA, nodeA)
	m.Pod(m.App, "api-0", "api", nodeA)
	m.Pod(m.App, "web-0", "web", nodeA)
	m.Pod(m.App, "db-0", "db", nodeB)
	p := m.StartCA()
	e := newEnv(t, envOptions{pods: 3, authority: p.Client(m.Token(self, ca.Audience))})
	if e.p.CA() != nil {
		t.Fatal("the proxy loaded a local CA although it has a remote one")
	}

	e.enroll(0, m.App, "api")
	e.enroll(1, m.App, "web")
	e.app(1, "b")
	e.meshEcho(0, 1, "b", "tcp", "PAYLOAD-ca-issued-certificates")
	e.waitLog("connection complete", "direction=inbound", "security=mutual_tls", "src.identity=spiffe://cluster.local/ns/"+m.App+"/sa/api")

	pd := e.lab.Pod(2)
	uid := "uid-" + pd.Name + "-" + e.lab.ID
	if _, err := e.loader.Attach(datapath.Pod{UID: uid, Netns: pd.NS}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.loader.Detach(uid); err != nil {
			t.Errorf("detach: %v", err)
		}
	})
	err := e.p.AddWorkload(uid, zds.WorkloadInfo{Name: pd.Name, Namespace: m.App, ServiceAccount: "db"}, pd.NS.File())
	if err == nil || !strings.Contains(err.Error(), "PermissionDenied") || !strings.Contains(err.Error(), nodeA) {
		t.Fatalf("pod of a service account on another node: %v, want the CA's PermissionDenied naming %s", err, nodeA)
	}
	waitFor(t, "the refusal counted on /metrics", func() bool {
		_, body := get(t, e.p.MetricsAddr(), "/metrics")
		return strings.Contains(body, `ambpf_ca_client_requests_total{result="PermissionDenied"} 1`)
	})
}
