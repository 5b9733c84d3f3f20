package kubediscovery

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/kubetest"
)

func pod(name string, created time.Time, ips ...string) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, UID: types.UID("uid-" + name),
		CreationTimestamp: metav1.NewTime(created)}}
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	return p
}

func TestBuildWorkloads(t *testing.T) {
	t0 := time.Unix(1000, 0)
	enabled := pod("enabled", t0, "10.0.0.1", "fd00::1")
	enabled.Annotations = map[string]string{RedirectionAnnotation: RedirectionEnabled}
	enabled.Spec.ServiceAccountName = "sa"
	plain := pod("plain", t0, "10.0.0.2")
	host := pod("host", t0, "192.168.1.1")
	host.Spec.HostNetwork = true
	done := pod("done", t0, "10.0.0.3")
	done.Status.Phase = corev1.PodSucceeded
	// old (being deleted) and new claim the same IP: new wins.
	old := pod("old", t0, "10.0.0.4")
	old.DeletionTimestamp = &metav1.Time{Time: t0.Add(time.Hour)}
	successor := pod("successor", t0.Add(-time.Hour), "10.0.0.4")
	noIP := pod("pending", t0)

	ws := buildWorkloads([]*corev1.Pod{old, successor, enabled, plain, host, done, noIP})
	got := map[string]discovery.Workload{}
	for _, w := range ws {
		got[w.Name] = w
	}
	if len(got) != 3 {
		t.Fatalf("workloads %v, want enabled, plain, successor", ws)
	}
	if w := got["enabled"]; !w.HBONE() || w.Identity("") != "spiffe://cluster.local/ns/ns/sa/sa" || len(w.IPs) != 2 {
		t.Errorf("enabled pod: %+v", w)
	}
	if w := got["plain"]; w.Protocol != "" || w.ServiceAccount != "default" {
		t.Errorf("plain pod: %+v (want empty protocol, default SA)", w)
	}
	if w := got["successor"]; len(w.IPs) != 1 || w.IPs[0] != netip.MustParseAddr("10.0.0.4") {
		t.Errorf("successor pod: %+v", w)
	}
}

func TestBuildServices(t *testing.T) {
	tcp, udp := corev1.ProtocolTCP, corev1.ProtocolUDP
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web"},
		Spec: corev1.ServiceSpec{ClusterIPs: []string{"10.96.0.10", "fd00:96::10"}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("web")},
			{Name: "admin", Port: 81, TargetPort: intstr.FromInt32(9090)},
			{Name: "same", Port: 82},
			{Name: "dns", Port: 53, Protocol: udp},
			{Name: "unresolved", Port: 83, TargetPort: intstr.FromString("nope")},
		}},
	}
	headless := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "headless"},
		Spec: corev1.ServiceSpec{ClusterIP: "None"}}
	yes, no := true, false
	port := int32(8080)
	// Every slice names its port like the service port ("http") and
	// carries the number resolved from the pods' "web" container port.
	slice := func(name string, typ discoveryv1.AddressType, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
		return &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: name, Labels: map[string]string{serviceNameLabel: "web"}},
			AddressType: typ, Endpoints: eps,
			Ports: []discoveryv1.EndpointPort{{Name: new("http"), Protocol: &tcp, Port: &port}},
		}
	}
	a := slice("web-a", discoveryv1.AddressTypeIPv4,
		discoveryv1.Endpoint{Addresses: []string{"10.0.0.1"}, Conditions: discoveryv1.EndpointConditions{Ready: &yes}},
		discoveryv1.Endpoint{Addresses: []string{"10.0.0.2"}, Conditions: discoveryv1.EndpointConditions{Ready: &no}},
		discoveryv1.Endpoint{Addresses: []string{"10.0.0.3"}}) // unset: ready
	b := slice("web-b", discoveryv1.AddressTypeIPv4,
		discoveryv1.Endpoint{Addresses: []string{"10.0.0.2"}, Conditions: discoveryv1.EndpointConditions{Ready: &yes}})
	fqdn := slice("web-c", discoveryv1.AddressTypeFQDN, discoveryv1.Endpoint{Addresses: []string{"example.com"}})

	hs := slice("headless-a", discoveryv1.AddressTypeIPv4,
		discoveryv1.Endpoint{Addresses: []string{"10.0.1.1"}})
	hs.Labels[serviceNameLabel] = "headless"
	out := buildServices([]*corev1.Service{svc, headless}, []*discoveryv1.EndpointSlice{b, fqdn, a, hs})
	// A headless service is kept for DNS (ztunnel answers its name with
	// its endpoints), with no VIP.
	if len(out) != 2 || out[0].Name != "headless" || !out[0].Headless || len(out[0].VIPs) != 0 ||
		len(out[0].Endpoints) != 1 || out[0].Endpoints[0].IP != netip.MustParseAddr("10.0.1.1") {
		t.Fatalf("services %+v, want headless (no VIP, endpoint 10.0.1.1) and web", out)
	}
	s := out[1]
	if len(s.VIPs) != 2 {
		t.Errorf("VIPs %v", s.VIPs)
	}
	want := map[uint16]uint16{80: 8080, 81: 9090, 82: 82}
	if len(s.Ports) != len(want) {
		t.Errorf("ports %v, want %v", s.Ports, want)
	}
	for p, tp := range want {
		if s.Ports[p] != tp {
			t.Errorf("port %d -> %d, want %d", p, s.Ports[p], tp)
		}
	}
	// 10.0.0.2 is not ready in web-a but ready in web-b: ready.
	if len(s.Endpoints) != 3 {
		t.Fatalf("endpoints %+v", s.Endpoints)
	}
	for _, e := range s.Endpoints {
		if !e.IsReady() {
			t.Errorf("endpoint %s not ready", e.IP)
		}
	}
}

func TestDecodePolicy(t *testing.T) {
	obj := func(spec map[string]any) *unstructured.Unstructured {
		return &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
			"metadata": map[string]any{"name": "p", "namespace": "ns"}, "spec": spec}}
	}
	p, err := decodePolicy(obj(map[string]any{"action": "DENY",
		"rules": []any{map[string]any{"to": []any{map[string]any{"operation": map[string]any{"ports": []any{"22"}}}}}}}))
	if err != nil || p.Spec.Action != "DENY" || p.Spec.Rules[0].To[0].Operation.Ports[0] != "22" {
		t.Fatalf("valid policy: %+v, %v", p, err)
	}
	for name, spec := range map[string]map[string]any{
		"unknown field": {"rule": []any{}},
		"wrong type":    {"rules": "all"},
		"bad action":    {"action": "MAYBE"},
		"bad port":      {"rules": []any{map[string]any{"to": []any{map[string]any{"operation": map[string]any{"ports": []any{"http"}}}}}}},
	} {
		if _, err := decodePolicy(obj(spec)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestBuildMTLS(t *testing.T) {
	pa := func(ns, name string, age time.Duration, spec map[string]any) *unstructured.Unstructured {
		u := &unstructured.Unstructured{Object: map[string]any{"spec": spec}}
		u.SetNamespace(ns)
		u.SetName(name)
		u.SetCreationTimestamp(metav1.NewTime(time.Unix(1e6, 0).Add(-age)))
		return u
	}
	mode := func(m string) map[string]any { return map[string]any{"mtls": map[string]any{"mode": m}} }
	var logs bytes.Buffer
	n := newNotes(slog.New(slog.NewTextHandler(&logs, nil)))
	n.begin()
	cfg, strict, perWorkload := buildMTLS([]*unstructured.Unstructured{
		pa("root", "mesh", 0, mode("STRICT")),
		pa("a", "newer", time.Minute, mode("STRICT")),
		pa("a", "older", time.Hour, mode("PERMISSIVE")), // oldest wins
		pa("b", "off", 0, mode("DISABLE")),              // PERMISSIVE
		pa("c", "unset", 0, mode("UNSET")),
		pa("d", "workload", 0, map[string]any{"selector": map[string]any{"matchLabels": map[string]any{"app": "x"}}, "mtls": map[string]any{"mode": "PERMISSIVE"}}),
	}, "root", []discovery.Workload{{Name: "w", Namespace: "d", Labels: map[string]string{"app": "x"}}}, n)
	n.end()
	if cfg.Mode != discovery.MTLSStrict {
		t.Errorf("mesh mode %q", cfg.Mode)
	}
	if len(cfg.Namespaces) != 2 || cfg.Namespaces["a"] != discovery.MTLSPermissive || cfg.Namespaces["b"] != discovery.MTLSPermissive {
		t.Errorf("namespaces %v, want a and b PERMISSIVE", cfg.Namespaces)
	}
	if len(strict) != 0 {
		t.Errorf("policies %v, want none", strict)
	}
	if m := perWorkload["d/w"]; m == nil || m.Mode != discovery.MTLSPermissive {
		t.Errorf("workload d/w mTLS %+v, want PERMISSIVE", m)
	}
	for _, want := range []string{"DISABLE: plaintext accepted", "older namespace-wide"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs.String())
		}
	}
}

// TestWorkloadName: the workload label of a pod is its Deployment,
// CronJob or controller, as Istio derives it (pkg/kube/util.go
// GetDeployMetaFromPod).
func TestWorkloadName(t *testing.T) {
	yes := true
	owned := func(name, generate, kind, owner string, labels map[string]string) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, GenerateName: generate, Labels: labels}}
		if owner != "" {
			p.OwnerReferences = []metav1.OwnerReference{{Kind: kind, Name: owner, Controller: &yes}}
		}
		return p
	}
	for _, tc := range []struct {
		pod  *corev1.Pod
		want string
	}{
		{owned("web-7d9f8-abcde", "web-7d9f8-", "ReplicaSet", "web-7d9f8", map[string]string{"pod-template-hash": "7d9f8"}), "web"},
		{owned("rs-abcde", "rs-", "ReplicaSet", "rs", nil), "rs"},
		{owned("db-0", "db-", "StatefulSet", "db", nil), "db"},
		{owned("backup-28123456-x", "backup-28123456-", "Job", "backup-28123456", nil), "backup"},
		{owned("once-x", "once-", "Job", "once", nil), "once"},
		{owned("bare", "", "", "", nil), "bare"},
		{owned("gen-x", "gen-", "", "", nil), "gen-x"},
	} {
		if got := workloadName(tc.pod); got != tc.want {
			t.Errorf("workloadName(%s) = %q, want %q", tc.pod.Name, got, tc.want)
		}
	}
}

// TestWorkloadLocality: a pod's region and zone are its node's
// topology.kubernetes.io labels, as istiod's nodeLocality reads them,
// through the real API server; a label change on the node reaches the
// workload, and a pod on an unknown node has none.
func TestWorkloadLocality(t *testing.T) {
	cp := kubetest.Shared(t)
	w := newWorld(t, cp, Config{})
	node := uniqueName(t, "node")
	n, err := cp.Client.CoreV1().Nodes().Create(w.ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node,
		Labels: map[string]string{corev1.LabelTopologyRegion: "eu-west", corev1.LabelTopologyZone: "eu-west-1a", "other": "x"}}},
		metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create node: %v", err)
	}
	t.Cleanup(func() { _ = cp.Client.CoreV1().Nodes().Delete(context.Background(), node, metav1.DeleteOptions{}) })
	w.podOn(node, "located", "sa", "10.246.9.1", nil, nil)
	w.podOn(uniqueName(t, "ghost"), "unlocated", "sa", "10.246.9.2", nil, nil)
	locality := func(name string) (string, string, bool) {
		wl, ok := w.store.Workload(w.ns, name)
		if !ok {
			return "", "", false
		}
		return wl.Region, wl.Zone, true
	}
	w.eventually("the pod's workload has its node's locality", func() bool {
		r, z, ok := locality("located")
		return ok && r == "eu-west" && z == "eu-west-1a"
	})
	if r, z, ok := locality("unlocated"); !ok || r != "" || z != "" {
		t.Errorf("pod on an unknown node: %q %q %v, want no locality", r, z, ok)
	}
	n.Labels[corev1.LabelTopologyZone] = "eu-west-1b"
	if _, err := cp.Client.CoreV1().Nodes().Update(w.ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update node: %v", err)
	}
	w.eventually("the zone change reaches the workload", func() bool {
		_, z, _ := locality("located")
		return z == "eu-west-1b"
	})
}
