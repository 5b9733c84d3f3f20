//go:build linux

package kubee2e

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/kubetest"
	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/podwatch"
)

// endpoint is an EndpointSlice entry for a pod.
func endpoint(p *kpod, ready bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{p.ip.String()},
		Conditions: discoveryv1.EndpointConditions{Ready: &ready},
		TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: p.namespace, Name: p.name, UID: types.UID(p.uid)},
	}
}

// waitEndpoints waits until the proxy's discovery has the service of vip
// with exactly the ready endpoints want.
func (c *cluster) waitEndpoints(vip netip.AddrPort, want ...netip.Addr) {
	c.t.Helper()
	slices.SortFunc(want, netip.Addr.Compare)
	agenttest.WaitFor(c.t, waitLong, fmt.Sprintf("the proxy routes %s to %v", vip, want), func() bool {
		svc, ok := c.proxy.Store().ServiceByVIP(vip)
		if !ok {
			return false
		}
		var ready []netip.Addr
		for _, e := range svc.Endpoints {
			if e.IsReady() {
				ready = append(ready, e.IP)
			}
		}
		slices.SortFunc(ready, netip.Addr.Compare)
		return slices.Equal(ready, want)
	})
}

// routeServices gives a pod a route to the service CIDR through its
// gateway when it has none (the bridge plugin adds no default route
// here). Without one, connecting to a VIP fails with "network is
// unreachable" in the socket layer, before the SYN reaches eth0 where
// the datapath captures it.
func (c *cluster) routeServices(p *kpod, vip netip.Addr) {
	c.t.Helper()
	if exec.Command("ip", "-n", p.netns.NSName, "route", "get", vip.String()).Run() == nil {
		return
	}
	out, err := exec.Command("ip", "-n", p.netns.NSName, "route", "add", kubetest.ServiceCIDR,
		"via", gateway().String(), "dev", "eth0").CombinedOutput()
	if err != nil {
		c.t.Fatalf("route %s in %s: %v: %s", kubetest.ServiceCIDR, p, err, out)
	}
	c.t.Logf("%s had no route to %s: added %s via %s dev eth0", p, vip, kubetest.ServiceCIDR, gateway())
}

// hasAddr reports whether an interface of the namespace holds ip.
func hasAddr(t *testing.T, ns *netlab.Netns, ip netip.Addr) bool {
	t.Helper()
	out, err := exec.Command("ip", "-n", ns.NSName, "-o", "addr", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip -n %s addr: %v: %s", ns.NSName, err, out)
	}
	return strings.Contains(string(out), " "+ip.String()+"/")
}

// TestServiceVIP: a ClusterIP Service whose EndpointSlice (written by the
// test, as the EndpointSlice controller would) lists two server pods, one
// not ready. A mesh client's connections to the VIP, which no interface
// holds, reach only the ready pod, over HBONE to its 15008 with the
// client's own address seen; once the other pod is marked ready, round
// robin reaches both. The VIP never appears on the wire.
func TestServiceVIP(t *testing.T) {
	c := newCluster(t)
	ns := c.namespace("svc", map[string]string{podwatch.DataplaneModeLabel: podwatch.DataplaneAmbient})
	cli := c.startPod(ns, "client", podOpts{})
	s1 := c.startPod(ns, "echo-1", podOpts{labels: map[string]string{"app": "echo"}})
	s2 := c.startPod(ns, "echo-2", podOpts{labels: map[string]string{"app": "echo"}})
	for _, p := range []*kpod{cli, s1, s2} {
		c.waitAnnotation(p, podwatch.RedirectionEnabled)
	}

	ctx := context.Background()
	// No selector: the test plays the EndpointSlice controller.
	svc, err := c.client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: ns},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, Ports: []corev1.ServicePort{
			{Name: "web", Port: 80, TargetPort: intstr.FromInt32(nettest.AppPort)},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service: %v", err)
	}
	t.Cleanup(func() {
		_ = c.client.CoreV1().Services(ns).Delete(context.Background(), "echo", metav1.DeleteOptions{})
	})
	vip := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIP), 80)
	tcp := corev1.ProtocolTCP
	slice, err := c.client.DiscoveryV1().EndpointSlices(ns).Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "echo-" + c.id, Namespace: ns, Labels: map[string]string{
			discoveryv1.LabelServiceName: "echo", discoveryv1.LabelManagedBy: "kubee2e.ambpf.io",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: new("web"), Protocol: &tcp, Port: new(int32(nettest.AppPort))}},
		Endpoints:   []discoveryv1.Endpoint{endpoint(s1, true), endpoint(s2, false)},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create endpointslice: %v", err)
	}
	c.waitEndpoints(vip, s1.ip)

	c.routeServices(cli, vip.Addr())
	for _, n := range []*netlab.Netns{cli.netns, c.lab.Node} {
		if hasAddr(t, n, vip.Addr()) {
			t.Fatalf("the VIP %s is assigned to an interface of %s", vip.Addr(), n.NSName)
		}
	}

	cap := c.capture()
	// connect dials the VIP and returns the name of the pod that answered.
	connect := func() string {
		t.Helper()
		tc, err := dialAddr(t, cli, vip)
		if err != nil {
			t.Fatalf("connect %s -> %s: %v", cli, vip, err)
		}
		defer tc.Conn.Close()
		name, ok := strings.CutPrefix(tc.Greeting, "app ")
		name, peer, _ := strings.Cut(name, " ")
		if !ok || peer != "peer="+cli.ip.String() {
			t.Fatalf("connect %s -> %s: greeting %q, want an echo pod seeing peer=%s", cli, vip, tc.Greeting, cli.ip)
		}
		echo(t, tc, marker)
		return name
	}
	for range 3 {
		if got := connect(); got != s1.name {
			t.Fatalf("the VIP reached %s while only %s is ready", got, s1.name)
		}
	}

	slice.Endpoints[1].Conditions.Ready = new(true)
	if _, err := c.client.DiscoveryV1().EndpointSlices(ns).Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update endpointslice: %v", err)
	}
	c.waitEndpoints(vip, s1.ip, s2.ip)
	// Endpoints are chosen at random (as ztunnel does): 64 tries miss
	// one of two with probability 2^-63.
	seen := map[string]int{}
	for i := 0; i < 64 && (i < 4 || len(seen) < 2); i++ {
		seen[connect()]++
	}
	if seen[s1.name] == 0 || seen[s2.name] == 0 || len(seen) != 2 {
		t.Errorf("connections over two ready endpoints reached %v, want both %s and %s", seen, s1.name, s2.name)
	}

	raw, all := cap.stopAll("")
	for _, s := range []*kpod{s1, s2} {
		expectHBONE(t, raw, between(all, cli.ip, s.ip))
	}
	for _, l := range all {
		if mentions(l, vip.Addr()) {
			t.Errorf("the VIP crossed the wire: %s", l)
		}
	}
	c.waitLog(`msg="connection complete"`, "direction=outbound", "src.workload=client",
		"dst.service=echo."+ns+".svc.cluster.local", "dst.workload="+s2.name, "security=mutual_tls")
}
