//go:build linux

package proxy

import (
	"net"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/metrics"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/nodelab"
	"github.com/ambpf/ambpf/pkg/promtext"
)

// telemetryDiscovery describes the pods of TestIstioTelemetryBinary as
// the Kubernetes layer would: a Deployment's pod (workloadName, app and
// version labels) on a node in region r1/zone z1, and an echo pod with
// a canonical-revision label on a node in r2/z2 behind Service echo.
const telemetryDiscovery = `
workloads:
- {name: pod0, namespace: ns-a, workloadName: sleep, labels: {app: sleep, version: v1}, region: r1, zone: z1}
- {name: pod1, namespace: ns-b, workloadName: echo, labels: {app: echo, service.istio.io/canonical-revision: v2}, region: r2, zone: z2}
services:
- name: echo
  namespace: ns-b
  vips: [10.96.9.9]
  ports: {80: 8080}
  selector: {app: echo}
`

// TestIstioTelemetryBinary: through the installed proxy binary, one
// connection to a Service over HBONE and one that fails are reported as
// ztunnel reports them. The access log (the binary's JSON lines) has
// ztunnel's fields and units: src/dst.workload the pod names,
// dst.addr the peer's port 15008 and dst.hbone_addr the target, bytes
// from each reporter's side, duration in ms, the failure at ERROR with
// its error. The exposition (parsed with expfmt) has the node
// localities, the canonical labels and, on the inbound side, the
// destination_service the client named in its Forwarded host=, and
// ztunnel's workload-manager metrics.
func TestIstioTelemetryBinary(t *testing.T) {
	e := newBinEnvDiscovery(t, 3, telemetryDiscovery)
	pod0, pod1 := e.lab.Pod(0).Name, e.lab.Pod(1).Name
	if pod0 != "pod0" || pod1 != "pod1" {
		t.Fatalf("topology pods are %s, %s; the discovery names pod0, pod1", pod0, pod1)
	}
	e.enroll(0, "ns-a", "sleep")
	e.enroll(1, "ns-b", "echo")
	e.app(1, "b")

	c, err := e.connect(0, "10.96.9.9:80")
	if err != nil {
		t.Fatalf("connect to the Service: %v", err)
	}
	const msg = "hello telemetry"
	if err := c.Echo(msg); err != nil {
		t.Fatal(err)
	}
	greeting := len(c.Greeting) + 1
	c.Close()
	// A connection that fails: pod2 is outside the mesh, nothing listens.
	failAddr := net.JoinHostPort(e.lab.Pod(2).IPv4.String(), "9")
	if c, err := e.connect(0, failAddr); err == nil {
		c.Close()
	}

	var out, in, failed map[string]any
	waitFor(t, "the three access-log lines", func() bool {
		for _, l := range nodelab.LogLines(e.proc.LogPath(), 0, "connection complete") {
			switch {
			case l[metrics.LogDirection] == "outbound" && l[metrics.LogDstService] == "echo.ns-b.svc.cluster.local":
				out = l
			case l[metrics.LogDirection] == "inbound" && l[metrics.LogDstService] == "echo.ns-b.svc.cluster.local":
				in = l
			case l[metrics.LogDirection] == "outbound" && l[metrics.LogDstAddr] == failAddr:
				failed = l
			}
		}
		return out != nil && in != nil && failed != nil
	})
	// The Service's endpoints are pod1's addresses of both families; the
	// pick is random, so the outbound line says which one was used.
	pod1IP := e.lab.Pod(1).IPv4.String()
	if got, _ := out[metrics.LogDstHBONEAddr].(string); strings.HasPrefix(got, "["+e.lab.Pod(1).IPv6.String()+"]") {
		pod1IP = e.lab.Pod(1).IPv6.String()
	}
	hboneAddr := net.JoinHostPort(pod1IP, strconv.Itoa(meshconst.InboundHBONEPort))
	target := net.JoinHostPort(pod1IP, strconv.Itoa(nettest.AppPort))
	sent, recv := float64(len(msg)+1), float64(greeting+len(msg)+1)
	expectFields(t, "outbound", out, map[string]any{
		"level": "INFO", metrics.LogScope: metrics.LogScopeAccess,
		metrics.LogSrcWorkload: pod0, metrics.LogSrcNamespace: "ns-a", metrics.LogSrcIdentity: "spiffe://cluster.local/ns/ns-a/sa/sleep",
		metrics.LogDstWorkload: pod1, metrics.LogDstNamespace: "ns-b", metrics.LogDstIdentity: "spiffe://cluster.local/ns/ns-b/sa/echo",
		metrics.LogDstAddr: hboneAddr, metrics.LogDstHBONEAddr: target,
		metrics.LogSrcCluster: metrics.DefaultCluster, metrics.LogDstCluster: metrics.DefaultCluster,
		// Outbound: what the client sent, what it received.
		metrics.LogBytesSent: sent, metrics.LogBytesReceived: recv,
	})
	expectFields(t, "inbound", in, map[string]any{
		"level": "INFO", metrics.LogSrcWorkload: pod0, metrics.LogDstWorkload: pod1,
		metrics.LogSrcIdentity: "spiffe://cluster.local/ns/ns-a/sa/sleep",
		metrics.LogDstAddr:     hboneAddr, metrics.LogDstHBONEAddr: target,
		// Inbound: what the server sent, what it received.
		metrics.LogBytesSent: recv, metrics.LogBytesReceived: sent,
	})
	expectFields(t, "failed", failed, map[string]any{
		"level": "ERROR", metrics.LogResponseFlags: metrics.FlagConnectFailure, metrics.LogSrcWorkload: pod0,
	})
	if _, ok := failed[metrics.LogError].(string); !ok {
		t.Errorf("failed line has no error: %v", failed)
	}
	if _, has := failed[metrics.LogSrcIdentity]; has {
		t.Errorf("plaintext line carries an identity: %v", failed)
	}
	ms := regexp.MustCompile(`^[0-9]+ms$`)
	for name, l := range map[string]map[string]any{"outbound": out, "inbound": in, "failed": failed} {
		if d, _ := l[metrics.LogDuration].(string); !ms.MatchString(d) {
			t.Errorf("%s line: duration %v, want <n>ms", name, l[metrics.LogDuration])
		}
	}

	fams, err := promtext.Parse(e.metrics())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		reporter string
		want     map[string]string
	}{
		{metrics.ReporterSource, map[string]string{"source_principal": "spiffe://cluster.local/ns/ns-a/sa/sleep"}},
		// The inbound side learns the Service from the client's
		// Forwarded host= (the pod has no other Service on 8080 to guess).
		{metrics.ReporterDestination, map[string]string{"destination_service_name": "echo"}},
	} {
		want := map[string]string{
			"reporter": tc.reporter, "destination_service": "echo.ns-b.svc.cluster.local",
			"source_workload": "sleep", "source_canonical_service": "sleep", "source_canonical_revision": "v1",
			"source_app": "sleep", "source_version": "v1", "source_region": "r1", "source_zone": "z1",
			"destination_workload": "echo", "destination_canonical_service": "echo", "destination_canonical_revision": "v2",
			"destination_app": "echo", "destination_version": "v2", "destination_region": "r2", "destination_zone": "z2",
			"connection_security_policy": metrics.SecurityMutualTLS, "source_cluster": metrics.DefaultCluster,
		}
		for k, v := range tc.want {
			want[k] = v
		}
		if m := promtext.Find(fams[metrics.ConnectionsOpenedName], want); m == nil || m.GetCounter().GetValue() != 1 {
			t.Errorf("%s: no %s series with %v:\n%v", tc.reporter, metrics.ConnectionsOpenedName, want, fams[metrics.ConnectionsOpenedName])
		}
	}
	failedWant := map[string]string{"reporter": metrics.ReporterSource, "response_flags": metrics.FlagConnectFailure,
		"source_principal": "unknown", "connection_security_policy": metrics.SecurityUnknown}
	if m := promtext.Find(fams[metrics.ConnectionsFailedName], failedWant); m == nil || m.GetCounter().GetValue() != 1 {
		t.Errorf("no %s series with %v: %v", metrics.ConnectionsFailedName, failedWant, fams[metrics.ConnectionsFailedName])
	}
	for name, want := range map[string]float64{
		metrics.ActiveProxiesName: 2, metrics.PendingProxiesName: 0, metrics.ProxiesStartedName: 2, metrics.ProxiesStoppedName: 0,
	} {
		f := fams[name]
		if f == nil || len(f.Metric) != 1 {
			t.Errorf("%s: %v", name, f)
			continue
		}
		got := f.Metric[0].GetGauge().GetValue() + f.Metric[0].GetCounter().GetValue()
		if got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}

// expectFields checks the fields of one access-log line.
func expectFields(t *testing.T, name string, line, want map[string]any) {
	t.Helper()
	for k, v := range want {
		if line[k] != v {
			t.Errorf("%s line: %s = %v, want %v\nline: %v", name, k, line[k], v, line)
		}
	}
}
