package kubediscovery

import (
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/kubetest"
)

// TestServiceRoutingFromAPI: against a real API server, Services route
// as ztunnel routes them (istiod's conversion and ztunnel's state.rs
// load_balance): a named targetPort that two slices number differently
// maps per endpoint; publishNotReadyAddresses makes not-ready endpoints
// eligible; internalTrafficPolicy Local keeps a client on its node; a
// headless Service is kept (for DNS) without a VIP; a VIP on a port the
// Service does not have is a Service with no endpoint (refused).
func TestServiceRoutingFromAPI(t *testing.T) {
	cp := kubetest.Shared(t)
	w := newWorld(t, cp, Config{})
	tcp := corev1.ProtocolTCP
	local := corev1.ServiceInternalTrafficPolicyLocal
	mk := func(name string, spec corev1.ServiceSpec) *corev1.Service {
		t.Helper()
		svc, err := cp.Client.CoreV1().Services(w.ns).Create(w.ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: w.ns}, Spec: spec}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create service %s: %v", name, err)
		}
		return svc
	}
	slice := func(svc, name string, port int32, eps ...discoveryv1.Endpoint) {
		t.Helper()
		es := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: w.ns, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: new("web"), Protocol: &tcp, Port: new(port)}},
			Endpoints:   eps,
		}
		if _, err := cp.Client.DiscoveryV1().EndpointSlices(w.ns).Create(w.ctx, es, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create endpointslice %s: %v", name, err)
		}
	}
	no := false
	ep := func(ip, node string, ready bool) discoveryv1.Endpoint {
		e := discoveryv1.Endpoint{Addresses: []string{ip}, NodeName: new(node)}
		if !ready {
			e.Conditions.Ready = &no
		}
		return e
	}
	named := corev1.ServicePort{Name: "web", Port: 80, TargetPort: intstr.FromString("http")}
	multi := mk("multi", corev1.ServiceSpec{Ports: []corev1.ServicePort{named}, PublishNotReadyAddresses: true})
	slice("multi", "multi-a", 8080, ep("10.246.4.1", "n1", true))
	slice("multi", "multi-b", 9090, ep("10.246.4.2", "n1", false)) // not ready, but published
	loc := mk("local", corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "web", Port: 80, TargetPort: intstr.FromInt32(8080)}},
		InternalTrafficPolicy: &local})
	slice("local", "local-a", 8080, ep("10.246.4.3", "n1", true), ep("10.246.4.4", "n2", true))
	mk("headless", corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone, Ports: []corev1.ServicePort{{Name: "web", Port: 80}}})
	slice("headless", "headless-a", 80, ep("10.246.4.5", "n1", true))

	vip := func(svc *corev1.Service, port uint16) netip.AddrPort {
		return netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), port)
	}
	picks := func(svc *discovery.Service, src *discovery.Workload) map[netip.AddrPort]bool {
		seen := map[netip.AddrPort]bool{}
		for range 200 {
			if e, ok := w.store.PickEndpointFrom(svc, 80, src); ok {
				seen[e] = true
			}
		}
		return seen
	}
	w.eventually("all three services", func() bool {
		m, okM := w.store.ServiceByVIP(vip(multi, 80))
		l, okL := w.store.ServiceByVIP(vip(loc, 80))
		headless := false
		for _, s := range w.store.Services() {
			headless = headless || (s.Name == "headless" && len(s.Endpoints) == 1)
		}
		return okM && okL && headless && len(picks(m, nil)) == 2 && len(l.Endpoints) == 2
	})
	m, _ := w.store.ServiceByVIP(vip(multi, 80))
	if got := picks(m, nil); !got[netip.MustParseAddrPort("10.246.4.1:8080")] || !got[netip.MustParseAddrPort("10.246.4.2:9090")] {
		t.Errorf("multi picks %v: want 10.246.4.1:8080 and the published not-ready 10.246.4.2:9090", got)
	}
	l, _ := w.store.ServiceByVIP(vip(loc, 80))
	if got := picks(l, &discovery.Workload{Name: "c", Namespace: w.ns, Node: "n2"}); len(got) != 1 || !got[netip.MustParseAddrPort("10.246.4.4:8080")] {
		t.Errorf("Local service from n2 picks %v: want only 10.246.4.4:8080", got)
	}
	if got := picks(l, &discovery.Workload{Name: "c", Namespace: w.ns, Node: "n9"}); len(got) != 0 {
		t.Errorf("Local service from a node without endpoints picks %v: want none", got)
	}
	if s, ok := w.store.ServiceByVIP(vip(multi, 81)); !ok || s.Name != "multi" {
		t.Errorf("VIP on an unknown port: %v, %v; want the service (so that the proxy refuses)", s, ok)
	} else if e, ok := w.store.PickEndpoint(s, 81); ok {
		t.Errorf("VIP on an unknown port picked %v", e)
	}
}
