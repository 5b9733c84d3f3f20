//go:build linux

package kubetest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

func TestMain(m *testing.M) {
	code := RunShared(m)
	removeChartBins()
	os.Exit(code)
}

// uniqueName returns prefix with a random suffix, a valid DNS label.
func uniqueName(t testing.TB, prefix string) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return prefix + "-" + hex.EncodeToString(b)
}

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// TestControlPlaneSmoke starts a private control plane, stores a Pod
// through the API, reads it back with client-go and kubectl, checks that
// RBAC refuses an unprivileged user, and that Stop leaves nothing behind.
func TestControlPlaneSmoke(t *testing.T) {
	cp := Start(t)
	ctx := testContext(t)

	ns := uniqueName(t, "smoke")
	if _, err := cp.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: ns},
		Spec: corev1.PodSpec{
			NodeName:   "node-1",
			Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app:1"}},
		},
	}
	if _, err := cp.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod: %v", err)
	}
	pods, err := cp.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=node-1"})
	if err != nil {
		t.Fatalf("list pods: %v", err)
	}
	if len(pods.Items) != 1 || pods.Items[0].Name != "app" || pods.Items[0].UID == "" {
		t.Fatalf("listed pods = %+v, want the one pod app with a UID", pods.Items)
	}

	out, err := cp.Run(ctx, "kubectl", "get", "ns", "-o", "name")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "namespace/"+ns+"\n") {
		t.Errorf("kubectl get ns = %q, want namespace/%s", out, ns)
	}

	// RBAC is the authorizer: a user nothing is bound to is refused.
	nobody, err := kubernetes.NewForConfig(cp.ImpersonatedConfig("nobody", "system:authenticated"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = nobody.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("list pods as an unbound user: err = %v, want Forbidden", err)
	}

	pids := []int{cp.etcd.cmd.Process.Pid, cp.apiserver.cmd.Process.Pid}
	dir := cp.Dir
	if err := cp.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("process %d after Stop: kill(0) = %v, want ESRCH", pid, err)
		}
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("control plane dir %s after Stop: stat = %v, want not exist", dir, err)
	}
}

func writeFile(path, data string) error { return os.WriteFile(path, []byte(data), 0o644) }
