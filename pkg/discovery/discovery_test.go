package discovery

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/authz"
	"github.com/ambpf/ambpf/pkg/logtest"
)

const examplePath = "testdata/discovery/example.yaml"

func loadExample(t *testing.T) *Store {
	t.Helper()
	data, err := os.ReadFile(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := Parse(data)
	if err != nil {
		t.Fatalf("Parse example: %v", err)
	}
	s := NewStore()
	s.Layer("file", 0).Set(snap)
	return s
}

func TestParseExample(t *testing.T) {
	s := loadExample(t)

	w, ok := s.WorkloadByIP(netip.MustParseAddr("fd00:244:1::10"))
	if !ok || w.Key() != "demo/sleep-5d8f" || !w.HBONE() {
		t.Fatalf("WorkloadByIP(v6 sleep) = %+v, %v", w, ok)
	}
	if got := w.Identity(s.TrustDomain()); got != "spiffe://cluster.local/ns/demo/sa/sleep" {
		t.Errorf("Identity = %q", got)
	}
	if w2, ok := s.WorkloadByIP(netip.MustParseAddr("::ffff:10.244.1.10")); !ok || w2 != w {
		t.Errorf("v4-mapped lookup = %v, %v; want the same workload", w2, ok)
	}
	if w, ok := s.WorkloadByUID("9d2e7f0a-8c7b-4e7e-8f7c-6b1c3e0a9f11"); !ok || w.Name != "httpbin-v1-7f9c" {
		t.Errorf("WorkloadByUID = %+v, %v", w, ok)
	}
	db, _ := s.WorkloadByIP(netip.MustParseAddr("10.244.3.30"))
	if db == nil || db.HBONE() || db.Identity("") != "spiffe://cluster.local/ns/legacy/sa/default" {
		t.Errorf("legacy-db = %+v", db)
	}
	if _, ok := s.WorkloadByIP(netip.MustParseAddr("10.244.9.9")); ok {
		t.Error("unknown IP found")
	}

	svc, ok := s.ServiceByVIP(netip.MustParseAddrPort("[fd00:96::10]:8000"))
	if !ok || svc.Key() != "demo/httpbin" || svc.Hostname() != "httpbin.demo.svc.cluster.local" {
		t.Fatalf("ServiceByVIP = %+v, %v", svc, ok)
	}
	// A VIP on a port the service does not have is still the service (so
	// the proxy refuses it, as ztunnel does) but yields no endpoint.
	if svc, ok := s.ServiceByVIP(netip.MustParseAddrPort("10.96.0.10:9999")); !ok || svc.Key() != "demo/httpbin" {
		t.Errorf("ServiceByVIP on an unknown port = %+v, %v; want demo/httpbin", svc, ok)
	} else if ep, ok := s.PickEndpoint(svc, 9999); ok {
		t.Errorf("PickEndpoint on an unknown port = %v", ep)
	}
	dbSvc, ok := s.ServiceByVIP(netip.MustParseAddrPort("10.96.0.30:5432"))
	if !ok {
		t.Fatal("db service not found")
	}
	if ep, ok := s.PickEndpoint(dbSvc, 5432); !ok || ep != netip.MustParseAddrPort("10.244.3.30:5432") {
		t.Errorf("selector endpoint = %v, %v", ep, ok)
	}

	if s.MTLSMode("demo") != MTLSStrict || s.MTLSMode("legacy") != MTLSPermissive {
		t.Errorf("MTLSMode demo=%s legacy=%s", s.MTLSMode("demo"), s.MTLSMode("legacy"))
	}

	httpbin, _ := s.WorkloadByIP(netip.MustParseAddr("10.244.2.20"))
	var ids []string
	for _, p := range s.PoliciesFor(httpbin) {
		ids = append(ids, p.ID())
	}
	if got := strings.Join(ids, " "); got != "istio-system/deny-legacy demo/allow-sleep-to-httpbin demo/deny-outside-pods" {
		t.Errorf("PoliciesFor(httpbin) = %s", got)
	}
	ids = nil
	for _, p := range s.PoliciesFor(w) {
		ids = append(ids, p.ID())
	}
	if got := strings.Join(ids, " "); got != "istio-system/deny-legacy demo/deny-outside-pods" {
		t.Errorf("PoliciesFor(sleep) = %s", got)
	}

	// The example's policies say what its comments claim.
	conn := authz.Conn{SrcIdentity: w.Identity(""), SrcIP: w.IPs[0], DstPort: 8080,
		DstNamespace: httpbin.Namespace, DstLabels: httpbin.Labels}
	if d := authz.Evaluate(s.PoliciesFor(httpbin), conn); !d.Allowed {
		t.Errorf("sleep -> httpbin:8080 denied: %s", d.Reason)
	}
	conn.SrcIP = netip.MustParseAddr("192.168.1.1")
	if d := authz.Evaluate(s.PoliciesFor(httpbin), conn); d.Allowed || d.Policy != "demo/deny-outside-pods" {
		t.Errorf("outside IP: %+v", d)
	}
}

// TestRandomPickSkipsNotReady: endpoints are chosen at random among the
// ready ones, as ztunnel does (uniformly: every workload has capacity 1).
func TestRandomPickSkipsNotReady(t *testing.T) {
	s := loadExample(t)
	svc, ok := s.ServiceByVIP(netip.MustParseAddrPort("10.96.0.10:8000"))
	if !ok {
		t.Fatal("service not found")
	}
	counts := map[netip.AddrPort]int{}
	const n = 2000
	for range n {
		ep, ok := s.PickEndpoint(svc, 8000)
		if !ok {
			t.Fatal("no endpoint")
		}
		counts[ep]++
	}
	a, b := netip.MustParseAddrPort("10.244.2.20:8080"), netip.MustParseAddrPort("10.244.2.21:8080")
	// Binomial(2000, 1/2): 700..1300 is more than 13 standard deviations
	// wide, so this never fails by chance.
	if len(counts) != 2 || counts[a] < 700 || counts[a] > 1300 || counts[b] < 700 || counts[b] > 1300 {
		t.Errorf("picks = %v; want about %d each of %v and %v, never the not-ready 10.244.2.22", counts, n/2, a, b)
	}
	if _, ok := s.PickEndpoint(svc, 1234); ok {
		t.Error("PickEndpoint for a port the service does not have succeeded")
	}

	// No ready endpoint at all: no pick.
	no := false
	s.Layer("file", 0).Set(Snapshot{Services: []Service{{Name: "x", Namespace: "y",
		VIPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}, Ports: map[uint16]uint16{80: 0},
		Endpoints: []Endpoint{{IP: netip.MustParseAddr("10.1.1.1"), Ready: &no}}}}})
	svc, ok = s.ServiceByVIP(netip.MustParseAddrPort("10.0.0.1:80"))
	if !ok {
		t.Fatal("service x not found")
	}
	if ep, ok := s.PickEndpoint(svc, 80); ok {
		t.Errorf("picked %v from a service without ready endpoints", ep)
	}
}

func TestZDSLayer(t *testing.T) {
	s := loadExample(t)
	ch, cancel := s.Subscribe()
	defer cancel()
	zds := s.Layer("zds", 10)

	// A pod known only through ZDS becomes a mesh workload.
	pod := Workload{UID: "uid-new", Name: "new-pod", Namespace: "demo", ServiceAccount: "worker",
		IPs: []netip.Addr{netip.MustParseAddr("10.244.1.50")}, Protocol: ProtocolHBONE, Node: "node-a"}
	zds.PutWorkload(pod)
	waitNotify(t, ch)
	w, ok := s.WorkloadByIP(netip.MustParseAddr("10.244.1.50"))
	if !ok || w.UID != "uid-new" || !w.HBONE() {
		t.Fatalf("ZDS pod lookup = %+v, %v", w, ok)
	}
	if got := len(s.PoliciesFor(w)); got != 2 { // root deny + namespace-wide deny in demo
		t.Errorf("PoliciesFor(ZDS pod) = %d policies, want 2", got)
	}

	// A pod also in the file merges: ZDS wins on the fields it sets, the
	// file's labels survive.
	zds.PutWorkload(Workload{UID: "uid-v2", Name: "httpbin-v2-51ab", Namespace: "demo",
		IPs: []netip.Addr{netip.MustParseAddr("10.244.2.99")}})
	waitNotify(t, ch)
	w, ok = s.WorkloadByIP(netip.MustParseAddr("10.244.2.99"))
	if !ok || w.Labels["version"] != "v2" || w.ServiceAccount != "httpbin" || w.UID != "uid-v2" {
		t.Errorf("merged workload = %+v, %v", w, ok)
	}
	if _, ok := s.WorkloadByIP(netip.MustParseAddr("10.244.2.21")); ok {
		t.Error("the file's IP is still indexed after ZDS replaced the IPs")
	}

	// Re-adding the same UID replaces; deleting removes.
	pod.IPs = []netip.Addr{netip.MustParseAddr("10.244.1.51")}
	zds.PutWorkload(pod)
	waitNotify(t, ch)
	if _, ok := s.WorkloadByIP(netip.MustParseAddr("10.244.1.50")); ok {
		t.Error("old IP still resolves after replacing the pod")
	}
	if !zds.DeleteWorkload("uid-new") {
		t.Error("DeleteWorkload reported nothing deleted")
	}
	waitNotify(t, ch)
	if _, ok := s.WorkloadByUID("uid-new"); ok {
		t.Error("deleted pod still found")
	}
	if zds.DeleteWorkload("uid-new") {
		t.Error("second DeleteWorkload reported a deletion")
	}
	// Deleting the ZDS half of a merged pod restores the file's view.
	zds.DeleteWorkload("uid-v2")
	waitNotify(t, ch)
	if w, ok := s.WorkloadByIP(netip.MustParseAddr("10.244.2.21")); !ok || w.UID != "" {
		t.Errorf("file workload after ZDS delete = %+v, %v", w, ok)
	}
	if got := len(s.Workloads()); got != 4 {
		t.Errorf("Workloads() = %d, want the file's 4", got)
	}
}

func TestLayerPriority(t *testing.T) {
	s := NewStore()
	hi := s.Layer("hi", 5)
	lo := s.Layer("lo", 1) // created later, lower priority
	if s.Layer("hi", -100) != hi {
		t.Fatal("Layer did not return the existing layer")
	}
	lo.Set(Snapshot{TrustDomain: "lo.example", MTLS: MTLSConfig{Mode: MTLSStrict},
		Services: []Service{{Name: "s", Namespace: "n", Ports: map[uint16]uint16{80: 1}}}})
	hi.Set(Snapshot{TrustDomain: "hi.example",
		Services: []Service{{Name: "s", Namespace: "n", Ports: map[uint16]uint16{80: 2}}}})
	if s.TrustDomain() != "hi.example" {
		t.Errorf("TrustDomain = %s", s.TrustDomain())
	}
	if s.MTLSMode("x") != MTLSStrict {
		t.Errorf("MTLSMode = %s; the lower layer's mode should show through", s.MTLSMode("x"))
	}
	if svcs := s.Services(); len(svcs) != 1 || svcs[0].Ports[80] != 2 {
		t.Errorf("Services = %+v; want the higher layer's", svcs)
	}
	if NewStore().MTLSMode("any") != MTLSPermissive || NewStore().RootNamespace() != "istio-system" {
		t.Error("defaults: want PERMISSIVE and istio-system")
	}
}

// TestHBONETransport: the per-workload HBONE transport parses and, like
// other fields, a higher layer sets it over the ZDS view of the pod.
func TestHBONETransport(t *testing.T) {
	snap, err := Parse([]byte("workloads:\n- {name: a, namespace: ns, hboneTransport: h3}\n"))
	if err != nil {
		t.Fatal(err)
	}
	s := NewStore()
	s.Layer("zds", 0).PutWorkload(Workload{UID: "u1", Name: "a", Namespace: "ns", Protocol: ProtocolHBONE,
		IPs: []netip.Addr{netip.MustParseAddr("10.0.0.9")}})
	file := s.Layer("file", 10)
	file.Set(snap)
	w, ok := s.WorkloadByIP(netip.MustParseAddr("10.0.0.9"))
	if !ok || w.HBONETransport != HBONETransportH3 || !w.HBONE() {
		t.Fatalf("merged workload %+v, want HBONE with transport h3", w)
	}
	file.Set(Snapshot{})
	if w, _ := s.WorkloadByIP(netip.MustParseAddr("10.0.0.9")); w.HBONETransport != "" {
		t.Fatalf("transport %q after the file dropped it, want none", w.HBONETransport)
	}
}

func waitNotify(t *testing.T, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("no change notification")
	}
}

// waitFor polls cond until it holds, failing the test after 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func drain(ch <-chan struct{}) {
	select {
	case <-ch:
	default:
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name, doc, want string
	}{
		{"yaml syntax in second document", "workloads: []\n---\nworkloads:\n- name: a\n  labels: {a: b\n", "line 5: "},
		{"unknown field", "workloads:\n- name: a\n  namespace: b\n  ipz: [1.2.3.4]\n", `line 4: `},
		{"bad IP", "workloads:\n- name: a\n  namespace: b\n  ips:\n  - 10.0.0.300\n", "line 5: "},
		{"bad port", "services:\n- name: a\n  namespace: b\n  ports: {80: 70000}\n", "line 4: "},
		{"bad policy CIDR", "workloads: []\n---\n" + "kind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns}\nspec:\n  rules:\n  - from: [{source: {ipBlocks: [10.0.0.0/99]}}]\n", "line 7: "},
		{"unknown kind", "kind: Gateway\n", "unsupported kind"},
		{"duplicate IP", "workloads:\n- {name: a, namespace: ns, ips: [1.1.1.1]}\n- {name: b, namespace: ns, ips: [1.1.1.1]}\n", "already belongs to ns/a"},
		{"protocol", "workloads:\n- {name: a, namespace: ns, protocol: QUIC}\n", `protocol "QUIC"`},
		{"hbone transport", "workloads:\n- {name: a, namespace: ns, hboneTransport: h4}\n", `hboneTransport "h4" is not h2 or h3`},
		{"mtls mode", "mtls: {mode: DISABLE}\n", "DISABLE is not supported"},
		{"peer auth selector", "kind: PeerAuthentication\nmetadata: {name: a, namespace: ns}\nspec: {selector: {matchLabels: {a: b}}, mtls: {mode: STRICT}}\n", "selector and portLevelMtls are not supported"},
		{"missing namespace", "workloads:\n- {name: a}\n", "name and namespace are required"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.doc))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Parse error = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestAuthorizeUsesRootNamespace(t *testing.T) {
	snap, err := Parse([]byte(`
rootNamespace: mesh
workloads: [{name: a, namespace: app, ips: [10.0.0.1]}]
---
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: mesh}
spec: {action: DENY, rules: [{}]}
`))
	if err != nil {
		t.Fatal(err)
	}
	s := NewStore()
	s.Layer("file", 0).Set(snap)
	w, _ := s.WorkloadByIP(netip.MustParseAddr("10.0.0.1"))
	d := Authorize(s, w, authz.Conn{SrcIP: netip.MustParseAddr("10.0.0.2"), DstPort: 80})
	if d.Allowed || d.Policy != "mesh/deny-all" {
		t.Errorf("Authorize = %+v, want denied by the root namespace policy", d)
	}
}

func TestParsePeerAuthentication(t *testing.T) {
	doc := `
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec: {mtls: {mode: STRICT}}
---
kind: PeerAuthentication
metadata: {name: default, namespace: legacy}
spec: {mtls: {mode: PERMISSIVE}}
---
rootNamespace: mesh
`
	snap, err := Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if snap.MTLS.Mode != MTLSStrict || snap.MTLS.Namespaces["legacy"] != MTLSPermissive {
		t.Errorf("MTLS = %+v", snap.MTLS)
	}
}

// writeFile replaces path atomically (as editors and ConfigMaps do).
func writeFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestFileReload(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "discovery.yaml")
	writeFile(t, path, "workloads:\n- {name: a, namespace: ns, ips: [10.0.0.1]}\n")

	var logs logtest.Buffer
	s := NewStore()
	f := NewFile(path, s.Layer("file", 0), FileOptions{PollInterval: 10 * time.Millisecond,
		Logger: slog.New(slog.NewJSONHandler(&logs, nil))})
	if err := f.Load(); err != nil {
		t.Fatal(err)
	}
	ch, cancel := s.Subscribe()
	defer cancel()
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	t.Cleanup(func() {
		stop()
		<-done
	})

	// A change is picked up and notified.
	writeFile(t, path, "workloads:\n- {name: b, namespace: ns, ips: [10.0.0.2]}\n")
	waitNotify(t, ch)
	waitFor(t, "new workload loaded", func() bool {
		_, ok := s.WorkloadByIP(netip.MustParseAddr("10.0.0.2"))
		return ok
	})
	if _, ok := s.WorkloadByIP(netip.MustParseAddr("10.0.0.1")); ok {
		t.Error("old workload still present")
	}

	// An in-place write (same inode) is picked up too.
	if err := os.WriteFile(path, []byte("workloads:\n- {name: c, namespace: ns, ips: [10.0.0.3]}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "in-place write loaded", func() bool {
		_, ok := s.WorkloadByIP(netip.MustParseAddr("10.0.0.3"))
		return ok
	})
	drain(ch)

	// A bad file keeps the last good state and is reported with its line.
	writeFile(t, path, "workloads:\n- {name: d, namespace: ns, ips: [10.0.0.4]}\n- name: e\n  namespace: ns\n  ips: [nope]\n")
	waitFor(t, "bad file rejected", func() bool { return f.Err() != nil })
	err := f.Err()
	if err == nil || !strings.Contains(err.Error(), "line 5") {
		t.Fatalf("Err() = %v, want a parse error at line 5", err)
	}
	if _, ok := s.WorkloadByIP(netip.MustParseAddr("10.0.0.3")); !ok {
		t.Error("last good state lost after a bad file")
	}
	if _, ok := s.WorkloadByIP(netip.MustParseAddr("10.0.0.4")); ok {
		t.Error("part of the bad file was applied")
	}
	select {
	case <-ch:
		t.Error("a rejected file notified subscribers")
	default:
	}
	if !strings.Contains(logs.String(), "keeping the last good state") || !strings.Contains(logs.String(), "line 5") {
		t.Errorf("log lacks the rejection with its line:\n%s", logs.String())
	}

	// Fixing the file recovers.
	writeFile(t, path, "workloads:\n- {name: f, namespace: ns, ips: [10.0.0.6]}\n")
	waitNotify(t, ch)
	if _, ok := s.WorkloadByIP(netip.MustParseAddr("10.0.0.6")); !ok || f.Err() != nil {
		t.Errorf("fixed file not loaded (Err=%v)", f.Err())
	}

	// A deleted file keeps the state too.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "missing file reported", func() bool { return f.Err() != nil })
	if _, ok := s.WorkloadByIP(netip.MustParseAddr("10.0.0.6")); !ok {
		t.Error("state lost after the file was removed")
	}
}

// TestPickEndpointRouting: internalTrafficPolicy Local keeps a client on
// its node's endpoints (none elsewhere: refused), and an endpoint's own
// target port wins over the service's, as in ztunnel (state.rs
// find_upstream_from_service, load_balance).
func TestPickEndpointRouting(t *testing.T) {
	s := NewStore()
	s.Layer("file", 0).Set(Snapshot{Services: []Service{
		{Name: "local", Namespace: "ns", VIPs: []netip.Addr{netip.MustParseAddr("10.96.1.1")}, Ports: map[uint16]uint16{80: 8080},
			NodeLocal: true, Endpoints: []Endpoint{
				{IP: netip.MustParseAddr("10.1.0.1"), Node: "n1"},
				{IP: netip.MustParseAddr("10.1.0.2"), Node: "n2"}}},
		{Name: "named", Namespace: "ns", VIPs: []netip.Addr{netip.MustParseAddr("10.96.1.2")}, Ports: map[uint16]uint16{80: 8080},
			Endpoints: []Endpoint{{IP: netip.MustParseAddr("10.1.0.3"), Ports: map[uint16]uint16{80: 9090}}}},
	}})
	local, _ := s.ServiceByVIP(netip.MustParseAddrPort("10.96.1.1:80"))
	for range 50 {
		if ep, ok := s.PickEndpointFrom(local, 80, &Workload{Name: "c", Namespace: "ns", Node: "n2"}); !ok || ep != netip.MustParseAddrPort("10.1.0.2:8080") {
			t.Fatalf("Local service from n2: %v, %v; want 10.1.0.2:8080 only", ep, ok)
		}
	}
	if ep, ok := s.PickEndpointFrom(local, 80, &Workload{Name: "c", Namespace: "ns", Node: "n3"}); ok {
		t.Errorf("Local service from a node without endpoints: %v", ep)
	}
	if ep, ok := s.PickEndpoint(local, 80); ok {
		t.Errorf("Local service from an unknown client: %v", ep)
	}
	named, _ := s.ServiceByVIP(netip.MustParseAddrPort("10.96.1.2:80"))
	if ep, ok := s.PickEndpoint(named, 80); !ok || ep != netip.MustParseAddrPort("10.1.0.3:9090") {
		t.Errorf("per-endpoint target port: %v, %v; want 10.1.0.3:9090", ep, ok)
	}
}
