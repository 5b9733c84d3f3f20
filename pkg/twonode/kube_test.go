//go:build linux

package twonode

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/ambpf/ambpf/pkg/kubediscovery"
	"github.com/ambpf/ambpf/pkg/kubetest"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/nodelab"
)

// TestCrossNodeKubernetes runs both proxies with --kubeconfig against the
// test control plane and an empty discovery file: each learns the other
// node's pods only from the API, where the test, playing the kubelets,
// registers two Node objects and binds every pod to its node (spec.nodeName,
// the ambient redirection annotation on mesh pods, status.podIP). With
// STRICT mesh-wide, A (node 1) reaching B (node 2) proves node 1 knew B as
// an HBONE workload (plaintext would be refused); the link then carries
// only TLS to B:15008, both ways. C (in the API, not in the mesh) is
// passed through in plaintext; P, node 1's non-mesh pod, is refused by B.
func TestCrossNodeKubernetes(t *testing.T) {
	cp := kubetest.Shared(t)
	l := newLab(t, labOptions{kube: cp})

	waitReach := func(from, to *nodelab.Pod) {
		t.Helper()
		waitFor(t, 10*time.Second, from.Name+" -> "+to.Name+" once the API's pods reached the proxies", func() bool {
			c, err := connect(from, appAddr(to))
			if err != nil {
				return false
			}
			c.Close()
			return c.Greeting == greeting(to, from)
		})
	}
	waitReach(l.a, l.b)
	waitReach(l.b, l.a)

	capt := l.capture(l.n1, "tcp")
	const secret = "CANARY-kube-a-to-b"
	l.mustReach(l.a, l.b, secret)
	l.mustReach(l.b, l.a, secret)
	l.mustReach(l.a, l.cc, "plain to c")
	dump := read(t, capt, "-A")
	counts := flows(dump)
	for _, f := range []struct {
		what     string
		got      int
		wantSome bool
	}{
		{"a -> b:15008", to(counts, l.a.IP, l.b.IP, hbonePort), true},
		{"b -> a:15008", to(counts, l.b.IP, l.a.IP, hbonePort), true},
		{"a -> b:8080", to(counts, l.a.IP, l.b.IP, nettest.AppPort), false},
		{"b -> a:8080", to(counts, l.b.IP, l.a.IP, nettest.AppPort), false},
		{"a -> c:8080", to(counts, l.a.IP, l.cc.IP, nettest.AppPort), true},
	} {
		if (f.got > 0) != f.wantSome {
			t.Errorf("%d packets %s on the inter-node link, want some: %v", f.got, f.what, f.wantSome)
		}
	}
	if strings.Contains(dump, secret) {
		t.Error("the mesh payload crossed the inter-node link in clear")
	}
	checkIdentities(t, l.a, l.b)
	checkIdentities(t, l.b, l.a)
	l.mustBeRefused(l.p, l.b, "STRICT on node 2")
}

// kubeNodes registers node objects for the lab's nodes; the test's
// cleanup deletes them.
func kubeNodes(t *testing.T, client kubernetes.Interface, nodes []*nodelab.Node) {
	t.Helper()
	ctx := context.Background()
	for _, n := range nodes {
		_, err := client.CoreV1().Nodes().Create(ctx, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: n.Name},
			Spec:       corev1.NodeSpec{PodCIDR: n.Subnet.String(), PodCIDRs: []string{n.Subnet.String()}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create node %s: %v", n.Name, err)
		}
		t.Cleanup(func() {
			if err := client.CoreV1().Nodes().Delete(context.Background(), n.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				t.Errorf("delete node %s: %v", n.Name, err)
			}
		})
	}
}

// kubePod does the kubelet's part for p in the API: the Pod object bound
// to p's node (annotated as redirected when in the mesh, as the agent
// does in Kubernetes mode) with p's IP in its status. The test's cleanup
// deletes it (and the namespace, created on first use).
func kubePod(t *testing.T, client kubernetes.Interface, p *nodelab.Pod) {
	t.Helper()
	ctx := context.Background()
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: p.Namespace}}, metav1.CreateOptions{}); err == nil {
		t.Cleanup(func() { client.CoreV1().Namespaces().Delete(context.Background(), p.Namespace, metav1.DeleteOptions{}) })
	} else if !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create namespace %s: %v", p.Namespace, err)
	}
	meta := metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace}
	if p.Mesh {
		meta.Annotations = map[string]string{kubediscovery.RedirectionAnnotation: kubediscovery.RedirectionEnabled}
	}
	if _, err := client.CoreV1().Pods(p.Namespace).Create(ctx, &corev1.Pod{
		ObjectMeta: meta,
		Spec: corev1.PodSpec{
			NodeName:   p.Node.Name,
			Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app:1"}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod %s/%s: %v", p.Namespace, p.Name, err)
	}
	t.Cleanup(func() {
		err := client.CoreV1().Pods(p.Namespace).Delete(context.Background(), p.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64(0))})
		if err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete pod %s/%s: %v", p.Namespace, p.Name, err)
		}
	})
	status, _ := json.Marshal(map[string]any{"status": corev1.PodStatus{
		Phase: corev1.PodRunning, PodIP: p.IP.String(), PodIPs: []corev1.PodIP{{IP: p.IP.String()}},
	}})
	if _, err := client.CoreV1().Pods(p.Namespace).Patch(ctx, p.Name, types.MergePatchType, status, metav1.PatchOptions{}, "status"); err != nil {
		t.Fatalf("set status of %s/%s: %v", p.Namespace, p.Name, err)
	}
}

// apiForwarder makes the API server, which listens on the test's own
// loopback, reachable from inside a node namespace at the same address
// (so the kubeconfig and the serving certificate still match), as a real
// node reaches its control plane over the network. Close stops it.
type apiForwarder struct {
	l  net.Listener
	wg sync.WaitGroup
}

func forwardAPI(n *nodelab.Node, addr string) (*apiForwarder, error) {
	l, err := n.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	f := &apiForwarder{l: l}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				defer in.Close()
				// This goroutine is in the test's namespace: the dial
				// reaches the API server's loopback.
				out, err := net.DialTimeout("tcp", addr, 5*time.Second)
				if err != nil {
					return
				}
				defer out.Close()
				done := make(chan struct{})
				go func() { io.Copy(out, in); out.(*net.TCPConn).CloseWrite(); close(done) }()
				io.Copy(in, out)
				in.(*net.TCPConn).CloseWrite()
				<-done
			}()
		}
	}()
	return f, nil
}

func (f *apiForwarder) Close() error {
	err := f.l.Close()
	f.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
