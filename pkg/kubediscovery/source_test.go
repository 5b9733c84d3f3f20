//go:build linux

package kubediscovery

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"

	"github.com/ambpf/ambpf/pkg/authz"
	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/kubetest"
	"github.com/ambpf/ambpf/pkg/logtest"
)

func TestMain(m *testing.M) { os.Exit(kubetest.RunShared(m)) }

// crdDir holds the chart's minimal Istio CRDs.
var crdDir = filepath.Join("..", "..", "charts", "ambpf", "crds")

// world is one test's view of a control plane with a running Source.
type world struct {
	t     *testing.T
	cp    *kubetest.ControlPlane
	ctx   context.Context
	dyn   *dynamic.DynamicClient
	store *discovery.Store
	src   *Source
	logs  *logtest.Buffer
	ns    string // a fresh namespace
	root  string // a fresh root namespace
}

func uniqueName(t *testing.T, prefix string) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return prefix + "-" + hex.EncodeToString(b)
}

// newWorld creates two namespaces on cp and runs a Source into a fresh
// store until the test ends, checking that Run returns nil on cancel.
func newWorld(t *testing.T, cp *kubetest.ControlPlane, cfg Config) *world {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	t.Cleanup(cancel)
	w := &world{t: t, cp: cp, ctx: ctx, store: discovery.NewStore(), logs: &logtest.Buffer{},
		ns: uniqueName(t, "kd"), root: uniqueName(t, "root")}
	var err error
	if w.dyn, err = dynamic.NewForConfig(cp.Config); err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{w.ns, w.root} {
		if _, err := cp.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create namespace: %v", err)
		}
		t.Cleanup(func() {
			// Without a controller manager the namespace stays
			// Terminating with its objects; the control plane goes
			// away with the test binary.
			_ = cp.Client.CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{})
		})
	}
	cfg.REST = cp.Config
	cfg.Layer = w.store.Layer("kubernetes", 5)
	cfg.RootNamespace = w.root
	cfg.Debounce = cmpOr(cfg.Debounce, 20*time.Millisecond)
	cfg.CRDPoll = cmpOr(cfg.CRDPoll, 200*time.Millisecond)
	cfg.Logger = slog.New(slog.NewTextHandler(w.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if w.src, err = New(cfg); err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.src.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("Run did not return after cancel")
		}
		if t.Failed() {
			t.Logf("source log:\n%s", w.logs.String())
		}
	})
	if err := w.src.WaitSynced(ctx); err != nil {
		t.Fatal(err)
	}
	return w
}

func cmpOr(a, b time.Duration) time.Duration {
	if a != 0 {
		return a
	}
	return b
}

// eventually polls cond until it holds, failing the test after a while.
func (w *world) eventually(what string, cond func() bool) {
	w.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			w.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// pod creates a pod and sets its status IPs, as a kubelet would.
func (w *world) pod(name, sa string, ip string, annotations, labels map[string]string) *corev1.Pod {
	w.t.Helper()
	return w.podOn("node-1", name, sa, ip, annotations, labels)
}

// podOn is pod on the named node.
func (w *world) podOn(node, name, sa string, ip string, annotations, labels map[string]string) *corev1.Pod {
	w.t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: w.ns, Annotations: annotations, Labels: labels},
		Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: sa,
			Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app:1"}}},
	}
	p, err := w.cp.Client.CoreV1().Pods(w.ns).Create(w.ctx, p, metav1.CreateOptions{})
	if err != nil {
		w.t.Fatalf("create pod %s: %v", name, err)
	}
	p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}
	if p, err = w.cp.Client.CoreV1().Pods(w.ns).UpdateStatus(w.ctx, p, metav1.UpdateOptions{}); err != nil {
		w.t.Fatalf("update pod %s status: %v", name, err)
	}
	return p
}

// istio creates an Istio security object from a spec.
func (w *world) istio(resource, kind, ns, name string, spec map[string]any) {
	w.t.Helper()
	w.istioAnnotated(resource, kind, ns, name, nil, spec)
}

// istioAnnotated is istio with metadata.annotations.
func (w *world) istioAnnotated(resource, kind, ns, name string, annotations map[string]any, spec map[string]any) {
	w.t.Helper()
	meta := map[string]any{"name": name, "namespace": ns}
	if annotations != nil {
		meta["annotations"] = annotations
	}
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": kind,
		"metadata": meta, "spec": spec}}
	gvr := authorizationPolicies
	if resource == peerAuthentications.Resource {
		gvr = peerAuthentications
	}
	if _, err := w.dyn.Resource(gvr).Namespace(ns).Create(w.ctx, u, metav1.CreateOptions{}); err != nil {
		w.t.Fatalf("create %s %s/%s: %v", kind, ns, name, err)
	}
}

func (w *world) deleteIstio(resource, ns, name string) {
	w.t.Helper()
	gvr := authorizationPolicies
	if resource == peerAuthentications.Resource {
		gvr = peerAuthentications
	}
	if err := w.dyn.Resource(gvr).Namespace(ns).Delete(w.ctx, name, metav1.DeleteOptions{}); err != nil {
		w.t.Fatalf("delete %s %s/%s: %v", resource, ns, name, err)
	}
}

// installCRDs applies the chart's CRDs and waits until they are served.
func installCRDs(t *testing.T, cp *kubetest.ControlPlane) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := cp.Run(ctx, "kubectl", "apply", "-f", crdDir); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Run(ctx, "kubectl", "wait", "--for=condition=Established", "--timeout=50s",
		"crd/authorizationpolicies.security.istio.io", "crd/peerauthentications.security.istio.io"); err != nil {
		t.Fatal(err)
	}
}

var sharedCRDs sync.Once

// TestConvergence drives pods, a service with a named target port, its
// EndpointSlice, policies and peer authentications through the API and
// checks the store follows every change.
func TestConvergence(t *testing.T) {
	cp := kubetest.Shared(t)
	sharedCRDs.Do(func() { installCRDs(t, cp) })
	w := newWorld(t, cp, Config{})
	ip := netip.MustParseAddr

	a := w.pod("a", "sa-a", "10.244.1.1", map[string]string{RedirectionAnnotation: RedirectionEnabled}, map[string]string{"app": "a"})
	w.pod("b", "", "10.244.1.2", nil, map[string]string{"app": "b"})
	w.eventually("pods a and b", func() bool {
		_, okB := w.store.WorkloadByIP(ip("10.244.1.2"))
		wa, okA := w.store.WorkloadByIP(ip("10.244.1.1"))
		return okA && okB && wa.HBONE()
	})
	wa, _ := w.store.WorkloadByIP(ip("10.244.1.1"))
	if got := wa.Identity(w.store.TrustDomain()); got != "spiffe://cluster.local/ns/"+w.ns+"/sa/sa-a" || wa.UID != string(a.UID) || wa.Labels["app"] != "a" || wa.Node != "node-1" {
		t.Errorf("workload a: %+v identity %s", wa, got)
	}
	if wb, _ := w.store.WorkloadByIP(ip("10.244.1.2")); wb.HBONE() || wb.ServiceAccount != "default" {
		t.Errorf("workload b: %+v, want plain TCP with SA default", wb)
	}

	// A service whose port 80 targets the named port "http".
	svc, err := cp.Client.CoreV1().Services(w.ns).Create(w.ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: w.ns},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"}, Ports: []corev1.ServicePort{
			{Name: "web", Port: 80, TargetPort: intstr.FromString("http")},
		}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service: %v", err)
	}
	vip := netip.AddrPortFrom(ip(svc.Spec.ClusterIP), 80)
	yes, no := true, false
	tcp := corev1.ProtocolTCP
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "echo-1", Namespace: w.ns, Labels: map[string]string{discoveryv1.LabelServiceName: "echo"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: new("web"), Protocol: &tcp, Port: new(int32(8080))}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.244.1.1"}, Conditions: discoveryv1.EndpointConditions{Ready: &yes}},
			{Addresses: []string{"10.244.1.2"}, Conditions: discoveryv1.EndpointConditions{Ready: &no}},
		},
	}
	if slice, err = cp.Client.DiscoveryV1().EndpointSlices(w.ns).Create(w.ctx, slice, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create endpointslice: %v", err)
	}
	w.eventually("service VIP with its named port resolved", func() bool {
		s, ok := w.store.ServiceByVIP(vip)
		if !ok {
			return false
		}
		_, ok = w.store.PickEndpoint(s, 80)
		return ok
	})
	s, _ := w.store.ServiceByVIP(vip)
	for range 4 { // the not-ready endpoint is never picked
		if ep, ok := w.store.PickEndpoint(s, 80); !ok || ep != netip.MustParseAddrPort("10.244.1.1:8080") {
			t.Fatalf("PickEndpoint = %v, %v; want 10.244.1.1:8080", ep, ok)
		}
	}
	// b becomes ready: both are picked.
	slice.Endpoints[1].Conditions.Ready = &yes
	if _, err := cp.Client.DiscoveryV1().EndpointSlices(w.ns).Update(w.ctx, slice, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("update endpointslice: %v", err)
	}
	w.eventually("both endpoints picked", func() bool {
		s, ok := w.store.ServiceByVIP(vip)
		if !ok {
			return false
		}
		seen := map[netip.AddrPort]bool{}
		for range 4 {
			ep, _ := w.store.PickEndpoint(s, 80)
			seen[ep] = true
		}
		return len(seen) == 2
	})

	// Policies: a DENY for app=a, and a malformed one, enforced as a
	// deny-all for its namespace (fail closed).
	w.istio("authorizationpolicies", "AuthorizationPolicy", w.ns, "deny-a", map[string]any{
		"action": "DENY", "selector": map[string]any{"matchLabels": map[string]any{"app": "a"}},
		"rules": []any{map[string]any{"to": []any{map[string]any{"operation": map[string]any{"ports": []any{"8080"}}}}}},
	})
	w.istio("authorizationpolicies", "AuthorizationPolicy", w.ns, "broken", map[string]any{"action": "MAYBE"})
	w.eventually("policies deny-a and broken apply to a", func() bool {
		wa, ok := w.store.WorkloadByIP(ip("10.244.1.1"))
		return ok && len(w.store.PoliciesFor(wa)) == 2
	})
	wb, _ := w.store.WorkloadByIP(ip("10.244.1.2"))
	if ps := w.store.PoliciesFor(wb); len(ps) != 1 || ps[0].Metadata.Name != "broken" || ps[0].Spec.Action != authz.ActionDeny {
		t.Errorf("policies for b: %v, want only broken as a deny-all (deny-a selects app=a)", ps)
	} else if d := authz.Evaluate(ps, authz.Conn{DstPort: 8080, DstNamespace: w.ns, DstLabels: wb.Labels}); d.Allowed {
		t.Errorf("malformed policy allowed traffic: %+v", d)
	}
	w.eventually("malformed policy logged", func() bool {
		for _, l := range strings.Split(w.logs.String(), "\n") {
			if strings.Contains(l, `msg="malformed authorization policy: denying all traffic to the workloads it selects (fail closed)"`) &&
				strings.Contains(l, `object="AuthorizationPolicy `+w.ns+`/broken"`) && strings.Contains(l, `MAYBE`) {
				return true
			}
		}
		return false
	})

	// mTLS: mesh-wide STRICT from the root namespace, PERMISSIVE in ns.
	w.istio("peerauthentications", "PeerAuthentication", w.root, "default", map[string]any{"mtls": map[string]any{"mode": "STRICT"}})
	w.istio("peerauthentications", "PeerAuthentication", w.ns, "legacy", map[string]any{"mtls": map[string]any{"mode": "PERMISSIVE"}})
	w.eventually("mTLS modes", func() bool {
		return w.store.MTLSMode("elsewhere") == discovery.MTLSStrict && w.store.MTLSMode(w.ns) == discovery.MTLSPermissive
	})
	w.deleteIstio("peerauthentications", w.root, "default")
	w.eventually("mesh-wide mode back to PERMISSIVE", func() bool {
		return w.store.MTLSMode("elsewhere") == discovery.MTLSPermissive
	})

	// Deletions. Without a kubelet a graceful pod deletion only marks
	// the pod terminating (still a workload): delete at once.
	if err := cp.Client.CoreV1().Pods(w.ns).Delete(w.ctx, "a", metav1.DeleteOptions{GracePeriodSeconds: new(int64(0))}); err != nil {
		t.Fatal(err)
	}
	if err := cp.Client.CoreV1().Services(w.ns).Delete(w.ctx, "echo", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	w.deleteIstio("authorizationpolicies", w.ns, "deny-a")
	w.deleteIstio("authorizationpolicies", w.ns, "broken")
	w.eventually("pod a, service and policy gone", func() bool {
		_, podA := w.store.WorkloadByIP(ip("10.244.1.1"))
		_, svc := w.store.ServiceByVIP(vip)
		wb, _ := w.store.WorkloadByIP(ip("10.244.1.2"))
		return !podA && !svc && len(w.store.PoliciesFor(&discovery.Workload{Namespace: w.ns, Labels: wb.Labels})) == 0
	})
	if n := strings.Count(w.logs.String(), `object="AuthorizationPolicy `+w.ns+`/broken"`); n != 1 {
		t.Errorf("malformed policy logged %d times, want once", n)
	}
}

// TestDebounce: a burst of events becomes far fewer layer updates than
// events.
func TestDebounce(t *testing.T) {
	cp := kubetest.Shared(t)
	// A long quiet period, so that the burst below (a few milliseconds
	// per create) is one batch even on a loaded machine.
	w := newWorld(t, cp, Config{Debounce: time.Second, MaxDelay: time.Minute})
	before := strings.Count(w.logs.String(), "discovery layer updated")
	const n = 20
	for i := range n {
		w.pod(uniqueName(t, "burst"), "", netip.AddrFrom4([4]byte{10, 245, 0, byte(i + 1)}).String(), nil, nil)
	}
	w.eventually("every burst pod", func() bool {
		mine := 0
		for _, wl := range w.store.Workloads() {
			if wl.Namespace == w.ns {
				mine++
			}
		}
		return mine == n
	})
	if got := strings.Count(w.logs.String(), "discovery layer updated") - before; got > n/4 {
		t.Errorf("%d pods (%d events) made %d layer updates, want a few", n, 2*n, got)
	}
}

// TestMissingCRDs: without the Istio CRDs the source still syncs and
// serves pods; CRDs installed later are picked up, and deleting one
// empties its kind.
func TestMissingCRDs(t *testing.T) {
	cp := kubetest.Start(t) // its own: the shared one has the CRDs
	w := newWorld(t, cp, Config{})
	if !w.src.Synced() {
		t.Fatal("not synced without CRDs")
	}
	w.pod("p", "", "10.246.0.1", nil, map[string]string{"app": "p"})
	w.eventually("pod without CRDs", func() bool {
		_, ok := w.store.WorkloadByIP(netip.MustParseAddr("10.246.0.1"))
		return ok
	})
	installCRDs(t, cp)
	w.istio("authorizationpolicies", "AuthorizationPolicy", w.ns, "allow-nothing", map[string]any{})
	w.eventually("policy after the CRD appeared", func() bool {
		wp, ok := w.store.WorkloadByIP(netip.MustParseAddr("10.246.0.1"))
		return ok && len(w.store.PoliciesFor(wp)) == 1
	})
	if n := strings.Count(w.logs.String(), "CRD not installed"); n != 2 {
		t.Errorf("%q logged %d times, want once per CRD", "CRD not installed", n)
	}
	if _, err := cp.Run(w.ctx, "kubectl", "delete", "crd", "authorizationpolicies.security.istio.io"); err != nil {
		t.Fatal(err)
	}
	w.eventually("policies gone with their CRD", func() bool {
		wp, ok := w.store.WorkloadByIP(netip.MustParseAddr("10.246.0.1"))
		return ok && len(w.store.PoliciesFor(wp)) == 0
	})
}
