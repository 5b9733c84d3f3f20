//go:build linux

package cniinstall

import (
	"context"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ambpf/ambpf/pkg/kubetest"
)

// TestDaemonSetGone asks a real API server: present -> false; being
// deleted (foreground deletion leaves the object with a deletion
// timestamp, no garbage collector runs here) -> true; absent -> true; and
// an identity RBAC refuses -> an error, not an answer.
func TestDaemonSetGone(t *testing.T) {
	cp := kubetest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ns := createAgentDaemonSet(ctx, t, cp, "cni")
	if gone, err := DaemonSetGone(ctx, cp.Client, ns, "agent"); err != nil || gone {
		t.Errorf("present DaemonSet: gone = %v, %v; want false", gone, err)
	}
	if gone, err := DaemonSetGone(ctx, cp.Client, ns, "other"); err != nil || !gone {
		t.Errorf("absent DaemonSet: gone = %v, %v; want true", gone, err)
	}

	nobody, err := kubernetes.NewForConfig(cp.ServiceAccountConfig(ns, "nobody"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := DaemonSetGone(ctx, nobody, ns, "agent"); err == nil {
		t.Errorf("DaemonSetGone as an unauthorized identity: no error")
	}

	fg := metav1.DeletePropagationForeground
	if err := cp.Client.AppsV1().DaemonSets(ns).Delete(ctx, "agent", metav1.DeleteOptions{PropagationPolicy: &fg}); err != nil {
		t.Fatal(err)
	}
	if gone, err := DaemonSetGone(ctx, cp.Client, ns, "agent"); err != nil || !gone {
		t.Errorf("DaemonSet being deleted: gone = %v, %v; want true", gone, err)
	}
}

// TestDaemonSetWatch: as an identity that may get, list and watch only
// its DaemonSet, the watch answers "not gone" while it exists; after the
// DaemonSet is deleted and, right after, the identity's RoleBinding (as
// helm uninstall does), the API server refuses the question but Gone
// still answers true from what the watch saw. A DaemonSet the watch
// never saw is never gone.
func TestDaemonSetWatch(t *testing.T) {
	cp := kubetest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ns := createAgentDaemonSet(ctx, t, cp, "dsw")
	role := &rbacv1.Role{
		ObjectMeta: metav1.ObjectMeta{Name: "agent", Namespace: ns},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{"apps"}, Resources: []string{"daemonsets"},
			ResourceNames: []string{"agent"}, Verbs: []string{"get", "list", "watch"}}},
	}
	if _, err := cp.Client.RbacV1().Roles(ns).Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	rb := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "agent", Namespace: ns},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "agent"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: "agent", Namespace: ns}},
	}
	if _, err := cp.Client.RbacV1().RoleBindings(ns).Create(ctx, rb, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	agent, err := kubernetes.NewForConfig(cp.ServiceAccountConfig(ns, "agent"))
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithCancel(context.Background())
	defer wcancel()
	w, err := WatchDaemonSet(wctx, agent, ns, "agent")
	if err != nil {
		t.Fatal(err)
	}
	other, err := WatchDaemonSet(wctx, agent, ns, "other")
	if err != nil {
		t.Fatal(err)
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not after 30 s", what)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitFor("the watch sees the DaemonSet", w.seen.Load)
	if gone, err := w.Gone(ctx); err != nil || gone {
		t.Errorf("present DaemonSet: gone = %v, %v; want false", gone, err)
	}
	// Forbidden for "other" (not in resourceNames) and never seen.
	if gone, err := other.Gone(ctx); err == nil || gone {
		t.Errorf("a DaemonSet the watch never saw: gone = %v, %v; want false and an error", gone, err)
	}

	if err := cp.Client.AppsV1().DaemonSets(ns).Delete(ctx, "agent", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := cp.Client.RbacV1().RoleBindings(ns).Delete(ctx, "agent", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("the identity is refused", func() bool {
		_, err := DaemonSetGone(ctx, agent, ns, "agent")
		return err != nil
	})
	if gone, err := w.Gone(ctx); err != nil || !gone {
		t.Errorf("deleted DaemonSet, credentials revoked: gone = %v, %v; want true (from the watch)", gone, err)
	}
}

// createAgentDaemonSet creates a namespace named prefix-<time> holding a
// DaemonSet "agent" and returns the namespace.
func createAgentDaemonSet(ctx context.Context, t *testing.T, cp *kubetest.ControlPlane, prefix string) string {
	t.Helper()
	ns := prefix + "-" + time.Now().Format("150405")
	if _, err := cp.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	labels := map[string]string{"app": "agent"}
	ds := &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "agent", Namespace: ns},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "a", Image: "registry.invalid/a"}}},
			},
		},
	}
	if _, err := cp.Client.AppsV1().DaemonSets(ns).Create(ctx, ds, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return ns
}
