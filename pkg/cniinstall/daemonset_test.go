//go:build linux

package cniinstall

import (
	"context"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
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
	ns := "cni-" + time.Now().Format("150405")
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
