//go:build linux

package kubetest

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

func chartDir(t *testing.T) string {
	t.Helper()
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(root, "charts", "ambpf")
}

// createNamespace makes a namespace for one test; it is deleted at the end
// (it stays Terminating: there is no namespace controller).
func createNamespace(t *testing.T, cp *ControlPlane, prefix string) string {
	t.Helper()
	ns := uniqueName(t, prefix)
	ctx := testContext(t)
	if _, err := cp.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace %s: %v", ns, err)
	}
	t.Cleanup(func() {
		cp.Client.CoreV1().Namespaces().Delete(context.Background(), ns, metav1.DeleteOptions{})
	})
	return ns
}

func TestChartLint(t *testing.T) {
	cp := Shared(t)
	ctx := testContext(t)
	chart := chartDir(t)
	if out, err := cp.Run(ctx, "helm", "lint", "--strict", chart); err != nil {
		t.Fatal(err)
	} else if !strings.Contains(out, "0 chart(s) failed") {
		t.Errorf("helm lint: %s", out)
	}
	// The render refuses a mode the proxy does not know.
	if out, err := cp.Run(ctx, "helm", "template", "x", chart, "--set", "mtlsMode=DISABLE"); err == nil {
		t.Errorf("helm template with mtlsMode=DISABLE succeeded:\n%s", out)
	}
}

// TestChartServerDryRun renders the chart and has the API server validate
// every object (schemas, admission) without storing it.
func TestChartServerDryRun(t *testing.T) {
	cp := Shared(t)
	ctx := testContext(t)
	ns := createNamespace(t, cp, "dryrun")
	rendered, err := cp.Run(ctx, "helm", "template", "ambpf", chartDir(t), "--namespace", ns, "--include-crds",
		"--set", "dnsCapture=true", "--set", "mtlsMode=STRICT")
	if err != nil {
		t.Fatal(err)
	}
	manifest := filepath.Join(t.TempDir(), "ambpf.yaml")
	if err := writeFile(manifest, rendered); err != nil {
		t.Fatal(err)
	}
	out, err := cp.Run(ctx, "kubectl", "apply", "--dry-run=server", "-f", manifest)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"daemonset.apps/ambpf-agent created (server dry run)",
		"daemonset.apps/ambpf-proxy created (server dry run)",
		"clusterrole.rbac.authorization.k8s.io/ambpf-agent created (server dry run)",
		"customresourcedefinition.apiextensions.k8s.io/authorizationpolicies.security.istio.io",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("kubectl apply --dry-run=server output lacks %q:\n%s", want, out)
		}
	}
	if _, err := cp.Client.AppsV1().DaemonSets(ns).Get(ctx, "ambpf-agent", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("dry run stored the agent DaemonSet: %v", err)
	}
}

// TestChartInstall installs the chart with helm, checks the objects and
// what RBAC lets each service account do, upgrades (the CA must survive),
// and uninstalls.
func TestChartInstall(t *testing.T) {
	cp := Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ns := createNamespace(t, cp, "ambpf")
	rel := uniqueName(t, "rel") // cluster-scoped names derive from it
	chart := chartDir(t)
	t.Cleanup(func() { cp.Run(context.Background(), "helm", "uninstall", rel, "--namespace", ns) })

	if _, err := cp.Run(ctx, "helm", "install", rel, chart, "--namespace", ns, "--timeout", "1m"); err != nil {
		t.Fatal(err)
	}
	agent, proxy := rel+"-ambpf-agent", rel+"-ambpf-proxy"
	for _, name := range []string{agent, proxy} {
		ds, err := cp.Client.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("get daemonset %s: %v", name, err)
		}
		if ds.Spec.Template.Spec.ServiceAccountName != name {
			t.Errorf("daemonset %s runs as %q", name, ds.Spec.Template.Spec.ServiceAccountName)
		}
	}
	caSA := rel + "-ambpf-ca"
	if d, err := cp.Client.AppsV1().Deployments(ns).Get(ctx, caSA, metav1.GetOptions{}); err != nil {
		t.Fatalf("get CA deployment: %v", err)
	} else if d.Spec.Template.Spec.ServiceAccountName != caSA {
		t.Errorf("CA deployment runs as %q", d.Spec.Template.Spec.ServiceAccountName)
	}
	ca := caCert(t, ctx, cp, ns, rel+"-ambpf-ca")
	if !ca.IsCA {
		t.Errorf("generated CA certificate is not a CA")
	}

	// Effective permissions, as the RBAC authorizer decides them.
	sa := func(name string) string { return "system:serviceaccount:" + ns + ":" + name }
	checks := []struct {
		user     string
		attrs    authzv1.ResourceAttributes
		allowed  bool
		describe string
	}{
		{sa(agent), authzv1.ResourceAttributes{Verb: "watch", Resource: "pods"}, true, "agent watches pods"},
		{sa(agent), authzv1.ResourceAttributes{Verb: "list", Resource: "namespaces"}, true, "agent lists namespaces"},
		{sa(agent), authzv1.ResourceAttributes{Verb: "patch", Resource: "pods", Subresource: "status", Namespace: "shop"}, true, "agent patches pods/status"},
		{sa(agent), authzv1.ResourceAttributes{Verb: "patch", Resource: "pods", Namespace: "shop"}, false, "agent patches pod specs"},
		{sa(agent), authzv1.ResourceAttributes{Verb: "create", Resource: "pods", Namespace: "shop"}, false, "agent creates pods"},
		{sa(agent), authzv1.ResourceAttributes{Verb: "get", Resource: "secrets", Namespace: ns}, false, "agent reads secrets"},
		{sa(agent), authzv1.ResourceAttributes{Verb: "get", Group: "apps", Resource: "daemonsets", Namespace: ns, Name: agent}, true, "agent gets its DaemonSet"},
		{sa(agent), authzv1.ResourceAttributes{Verb: "get", Group: "apps", Resource: "daemonsets", Namespace: ns, Name: proxy}, false, "agent gets another DaemonSet"},
		{sa(proxy), authzv1.ResourceAttributes{Verb: "list", Resource: "services"}, true, "proxy lists services"},
		{sa(proxy), authzv1.ResourceAttributes{Verb: "watch", Group: "discovery.k8s.io", Resource: "endpointslices"}, true, "proxy watches endpointslices"},
		{sa(proxy), authzv1.ResourceAttributes{Verb: "watch", Resource: "nodes"}, true, "proxy watches nodes (locality)"},
		{sa(proxy), authzv1.ResourceAttributes{Verb: "patch", Resource: "nodes", Name: "n1"}, false, "proxy patches nodes"},
		{sa(proxy), authzv1.ResourceAttributes{Verb: "list", Group: "security.istio.io", Resource: "authorizationpolicies"}, true, "proxy lists authorizationpolicies"},
		{sa(proxy), authzv1.ResourceAttributes{Verb: "watch", Group: "security.istio.io", Resource: "peerauthentications"}, true, "proxy watches peerauthentications"},
		{sa(proxy), authzv1.ResourceAttributes{Verb: "patch", Resource: "pods", Subresource: "status", Namespace: "shop"}, false, "proxy patches pods/status"},
		{sa(proxy), authzv1.ResourceAttributes{Verb: "list", Resource: "secrets"}, false, "proxy lists secrets"},
		{sa(proxy), authzv1.ResourceAttributes{Verb: "create", Group: "security.istio.io", Resource: "authorizationpolicies", Namespace: "shop"}, false, "proxy creates policies"},
		{sa(proxy), authzv1.ResourceAttributes{Verb: "get", Resource: "secrets", Namespace: ns, Name: rel + "-ambpf-ca"}, false, "proxy reads the CA secret"},
		{sa(caSA), authzv1.ResourceAttributes{Verb: "create", Group: "authentication.k8s.io", Resource: "tokenreviews"}, true, "CA reviews tokens"},
		{sa(caSA), authzv1.ResourceAttributes{Verb: "list", Resource: "pods", Namespace: "shop"}, true, "CA lists pods"},
		{sa(caSA), authzv1.ResourceAttributes{Verb: "get", Resource: "nodes"}, true, "CA gets nodes"},
		{sa(caSA), authzv1.ResourceAttributes{Verb: "create", Resource: "configmaps", Namespace: "shop"}, true, "CA publishes the root ConfigMap"},
		{sa(caSA), authzv1.ResourceAttributes{Verb: "get", Resource: "secrets", Namespace: ns}, false, "CA reads secrets through the API"},
		{sa(caSA), authzv1.ResourceAttributes{Verb: "create", Resource: "pods", Namespace: "shop"}, false, "CA creates pods"},
		{sa(caSA), authzv1.ResourceAttributes{Verb: "patch", Resource: "nodes"}, false, "CA patches nodes"},
	}
	for _, c := range checks {
		attrs := c.attrs
		sar, err := cp.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authzv1.SubjectAccessReview{
			Spec: authzv1.SubjectAccessReviewSpec{
				User:               c.user,
				Groups:             []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated"},
				ResourceAttributes: &attrs,
			},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("%s: subject access review: %v", c.describe, err)
		}
		if sar.Status.Allowed != c.allowed {
			t.Errorf("%s: allowed = %v, want %v (%s)", c.describe, sar.Status.Allowed, c.allowed, sar.Status.Reason)
		}
	}

	// The shipped CRDs are served: the proxy's identity can list a policy
	// the admin created.
	gvr := schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"}
	admin, err := dynamic.NewForConfig(cp.Config)
	if err != nil {
		t.Fatal(err)
	}
	policy := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "deny-all", "namespace": ns},
		"spec":     map[string]any{"action": "DENY", "rules": []any{map[string]any{}}},
	}}
	if _, err := admin.Resource(gvr).Namespace(ns).Create(ctx, policy, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create AuthorizationPolicy: %v", err)
	}
	asProxy, err := dynamic.NewForConfig(cp.ServiceAccountConfig(ns, proxy))
	if err != nil {
		t.Fatal(err)
	}
	list, err := asProxy.Resource(gvr).Namespace(ns).List(ctx, metav1.ListOptions{})
	if err != nil || len(list.Items) != 1 {
		t.Errorf("list AuthorizationPolicies as the proxy: %v, %d items; want 1", err, len(list.Items))
	} else if action, _, _ := unstructured.NestedString(list.Items[0].Object, "spec", "action"); action != "DENY" {
		t.Errorf("stored policy spec.action = %q, want DENY (unknown fields preserved)", action)
	}

	// An upgrade keeps the mesh CA (a new one would split the mesh).
	if _, err := cp.Run(ctx, "helm", "upgrade", rel, chart, "--namespace", ns, "--set", "logLevel=debug"); err != nil {
		t.Fatal(err)
	}
	if again := caCert(t, ctx, cp, ns, rel+"-ambpf-ca"); !again.Equal(ca) {
		t.Errorf("helm upgrade replaced the mesh CA")
	}

	if _, err := cp.Run(ctx, "helm", "uninstall", rel, "--namespace", ns, "--wait", "--timeout", "1m"); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Client.AppsV1().DaemonSets(ns).Get(ctx, agent, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("agent DaemonSet after uninstall: %v, want NotFound", err)
	}
	if _, err := cp.Client.RbacV1().ClusterRoles().Get(ctx, proxy, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("proxy ClusterRole after uninstall: %v, want NotFound", err)
	}
	if _, err := cp.Client.CoreV1().Secrets(ns).Get(ctx, rel+"-ambpf-ca", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("CA secret after uninstall: %v, want NotFound", err)
	}
}

func caCert(t *testing.T, ctx context.Context, cp *ControlPlane, ns, name string) *x509.Certificate {
	t.Helper()
	s, err := cp.Client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get CA secret: %v", err)
	}
	if len(s.Data["ca.key"]) == 0 {
		t.Errorf("CA secret has no ca.key")
	}
	block, _ := pem.Decode(s.Data["ca.crt"])
	if block == nil {
		t.Fatalf("CA secret ca.crt is not PEM")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatalf("parse CA certificate: %v", err)
	}
	return cert
}

// TestChartProxyWatchesAPI installs the chart, takes the proxy container's
// env from the DaemonSet the API server stored, and runs the real
// ambpf-proxy with it as the proxy's service account (the chart's RBAC):
// it must turn on Kubernetes discovery and become ready, which it does
// only once pods, Services, EndpointSlices, AuthorizationPolicies and
// PeerAuthentications are all listed. Flags on the command line replace
// what only a pod has (in-cluster credentials, the host's ZDS socket, the
// mounted CA), which also proves they win over the env.
func TestChartProxyWatchesAPI(t *testing.T) {
	cp := Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ns := createNamespace(t, cp, "proxyapi")
	rel := uniqueName(t, "rel")
	t.Cleanup(func() { cp.Run(context.Background(), "helm", "uninstall", rel, "--namespace", ns) })
	if _, err := cp.Run(ctx, "helm", "install", rel, chartDir(t), "--namespace", ns, "--set", "mtlsMode=STRICT"); err != nil {
		t.Fatal(err)
	}
	name := rel + "-ambpf-proxy"
	ds, err := cp.Client.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var env []string
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name != "proxy" {
			continue
		}
		for _, e := range c.Env {
			if e.ValueFrom != nil {
				t.Fatalf("proxy env %s comes from %+v: not simulated here", e.Name, e.ValueFrom)
			}
			env = append(env, e.Name+"="+e.Value)
		}
	}
	if !slices.Contains(env, "AMBPF_PROXY_KUBERNETES=true") || !slices.Contains(env, "AMBPF_PROXY_MTLS_MODE=STRICT") {
		t.Fatalf("stored proxy env %q lacks Kubernetes discovery or the mTLS mode", env)
	}

	caDir := t.TempDir()
	secret, err := cp.Client.CoreV1().Secrets(ns).Get(ctx, rel+"-ambpf-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"ca.crt", "ca.key"} {
		if err := os.WriteFile(filepath.Join(caDir, f), secret.Data[f], 0o600); err != nil {
			t.Fatal(err)
		}
	}
	kubeconfig, err := cp.ServiceAccountKubeconfig(ns, name)
	if err != nil {
		t.Fatal(err)
	}
	ports, err := freePorts(1)
	if err != nil {
		t.Fatal(err)
	}
	ready := fmt.Sprintf("127.0.0.1:%d", ports[0])
	dir := t.TempDir()
	p, err := startProcessEnv("ambpf-proxy", filepath.Join(buildChartBinaries(t), "ambpf-proxy"), []string{
		// --ca-address= : the local CA of --ca-dir instead of the CA
		// Service, which has no pod here.
		"--kubeconfig=" + kubeconfig, "--ca-address=", "--ca-dir=" + caDir, "--state-dir=" + dir, "--zds-path=",
		"--metrics-addr=off", "--ready-addr=" + ready, "--admin-addr=off",
	}, env, filepath.Join(dir, "proxy.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.stop(10 * time.Second); err != nil {
			t.Error(err)
		}
	})
	client := &http.Client{}
	if err := waitReady(ctx, p, time.Minute, func(ctx context.Context) error {
		return httpOK(ctx, client, "http://"+ready+"/healthz/ready")
	}); err != nil {
		t.Fatal(err)
	}
	if log := p.logTail(200); strings.Contains(log, "forbidden") {
		t.Errorf("the proxy was refused by RBAC:\n%s", log)
	}
}
