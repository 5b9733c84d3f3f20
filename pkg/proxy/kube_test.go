//go:build linux

package proxy

import (
	"context"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambpf/ambpf/pkg/kubediscovery"
	"github.com/ambpf/ambpf/pkg/kubetest"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// TestServiceVIPFromKubernetes: the discovery file is empty; the
// Service, its EndpointSlice (with a not-ready endpoint that must never
// be picked) and the pods come from a real API server, and a pod's
// connection to the VIP reaches both ready endpoints over HBONE.
func TestServiceVIPFromKubernetes(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Kubernetes control plane")
	}
	cp := kubetest.Start(t)
	e := newEnv(t, envOptions{pods: 3, kube: cp.Config})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kc := cp.Client

	for _, ns := range []string{"ns-a", "ns-b"} {
		if _, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// The pods as the API knows them: enrolled (annotated by the agent),
	// named like the netns pods so they merge with the ZDS workloads.
	for i, ns := range []string{"ns-a", "ns-b", "ns-b"} {
		pd := e.lab.Pod(i)
		p, err := kc.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: pd.Name, Namespace: ns, Labels: map[string]string{"app": "echo"},
				Annotations: map[string]string{kubediscovery.RedirectionAnnotation: kubediscovery.RedirectionEnabled}},
			Spec: corev1.PodSpec{NodeName: "node-1", ServiceAccountName: "echo",
				Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app:1"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIPs: []corev1.PodIP{{IP: pd.IPv4.String()}}}
		if _, err := kc.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	svc, err := kc.CoreV1().Services("ns-b").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "ns-b"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"},
			Ports: []corev1.ServicePort{{Name: "web", Port: 80, TargetPort: intstr.FromString("http")}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	yes, no := true, false
	if _, err := kc.DiscoveryV1().EndpointSlices("ns-b").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "echo-1", Namespace: "ns-b", Labels: map[string]string{discoveryv1.LabelServiceName: "echo"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: new("web"), Port: new(int32(nettest.AppPort))}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{e.lab.Pod(1).IPv4.String()}, Conditions: discoveryv1.EndpointConditions{Ready: &yes}},
			{Addresses: []string{e.lab.Pod(2).IPv4.String()}, Conditions: discoveryv1.EndpointConditions{Ready: &yes}},
			{Addresses: []string{"10.244.250.250"}, Conditions: discoveryv1.EndpointConditions{Ready: &no}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	vip := netip.MustParseAddrPort(svc.Spec.ClusterIP + ":80")
	waitFor(t, "proxy ready with the API's content", func() bool { return e.p.Ready() == nil })
	waitFor(t, "service VIP in the store", func() bool { _, ok := e.p.Store().ServiceByVIP(vip); return ok })

	e.enroll(0, "ns-a", "echo")
	e.enroll(1, "ns-b", "echo")
	e.enroll(2, "ns-b", "echo")
	e.app(1, "b1")
	e.app(2, "b2")
	got := e.spread(vip.String(), 2)
	if len(got) != 2 {
		t.Errorf("connections reached %v, want both ready endpoints", got)
	}
	e.waitLog("connection complete", "direction=outbound", "dst.service=echo.ns-b.svc.cluster.local",
		"security=mutual_tls", "dst.identity=spiffe://cluster.local/ns/ns-b/sa/echo")
}
