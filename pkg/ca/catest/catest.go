//go:build linux

// Package catest runs the ambpf-ca binary against a kubetest control
// plane for tests: a mesh's namespaces, service accounts, nodes and pods
// (the tests play the scheduler), the chart's CA RBAC, projected tokens,
// and the CA process itself (start, crash, restart).
package catest

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambpf/ambpf/pkg/caclient"
	"github.com/ambpf/ambpf/pkg/childproc"
	"github.com/ambpf/ambpf/pkg/kubetest"
)

// Cleanup removes the binary BuildCA built; call it from TestMain after
// the tests.
func Cleanup() {
	if caBin.dir != "" {
		os.RemoveAll(caBin.dir)
	}
}

// caBin is the ambpf-ca binary, built once per test binary.
var caBin struct {
	once sync.Once
	dir  string
	err  error
}

func BuildCA(t *testing.T) string {
	t.Helper()
	caBin.once.Do(func() {
		caBin.dir, caBin.err = os.MkdirTemp("", "ambpf-ca-bin-")
		if caBin.err != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", caBin.dir+"/", "github.com/ambpf/ambpf/cmd/ambpf-ca")
		if out, err := cmd.CombinedOutput(); err != nil {
			caBin.err = fmt.Errorf("go build ambpf-ca: %w\n%s", err, out)
		}
	})
	if caBin.err != nil {
		t.Fatal(caBin.err)
	}
	return filepath.Join(caBin.dir, "ambpf-ca")
}

// mesh is one test's cluster view: a release namespace with the CA's
// and the proxies' service accounts and the chart's CA RBAC, an app
// namespace, and nodes.
type Mesh struct {
	T       *testing.T
	CP      *kubetest.ControlPlane
	Release string // helm release, so cluster-scoped names are the test's own
	Sys     string // release namespace (proxies, CA)
	App     string // workloads
	ProxySA string
	CASA    string
}

// NewMesh makes the mesh objects on cp (kubetest.Shared or Start) with
// names derived from name, removed when the test ends.
func NewMesh(t *testing.T, cp *kubetest.ControlPlane, name string) *Mesh {
	t.Helper()
	m := &Mesh{T: t, CP: cp, Release: name, Sys: name + "-system", App: name + "-app",
		ProxySA: name + "-ambpf-proxy", CASA: name + "-ambpf-ca"}
	for _, ns := range []string{m.Sys, m.App} {
		m.Create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}})
	}
	for _, sa := range []string{m.ProxySA, m.CASA} {
		m.Create(&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa, Namespace: m.Sys}})
	}
	// The chart's own RBAC for the CA: the test proves it is enough.
	out, err := cp.Run(context.Background(), "helm", "template", m.Release, chartDir(t), "--namespace", m.Sys, "--show-only", "templates/ca-rbac.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "rbac.yaml")
	if err := os.WriteFile(f, []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := cp.Run(context.Background(), "kubectl", "apply", "-f", f); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := cp.Run(context.Background(), "kubectl", "delete", "--wait=false", "-f", f); err != nil {
			t.Logf("delete rbac: %v", err)
		}
	})
	return m
}

func chartDir(t *testing.T) string {
	t.Helper()
	for d, _ := os.Getwd(); ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "charts", "ambpf", "Chart.yaml")); err == nil {
			return filepath.Join(d, "charts", "ambpf")
		}
		if filepath.Dir(d) == d {
			t.Fatal("charts/ambpf not found")
		}
	}
}

type object interface {
	GetName() string
}

// create creates obj (Namespace, ServiceAccount, Node, Pod) and removes
// it when the test ends.
func (m *Mesh) Create(obj object) {
	m.T.Helper()
	ctx := context.Background()
	c := m.CP.Client.CoreV1()
	var err error
	var del func() error
	switch o := obj.(type) {
	case *corev1.Namespace:
		_, err = c.Namespaces().Create(ctx, o, metav1.CreateOptions{})
		del = func() error { return c.Namespaces().Delete(ctx, o.Name, metav1.DeleteOptions{}) }
	case *corev1.ServiceAccount:
		_, err = c.ServiceAccounts(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	case *corev1.Node:
		_, err = c.Nodes().Create(ctx, o, metav1.CreateOptions{})
		del = func() error { return c.Nodes().Delete(ctx, o.Name, metav1.DeleteOptions{}) }
	default:
		m.T.Fatalf("create %T", obj)
	}
	if err != nil {
		m.T.Fatalf("create %s: %v", obj.GetName(), err)
	}
	if del != nil {
		m.T.Cleanup(func() {
			if err := del(); err != nil {
				m.T.Logf("delete %s: %v", obj.GetName(), err)
			}
		})
	}
}

// node creates a Node named after the test.
func (m *Mesh) Node(name string) string {
	m.T.Helper()
	name = m.Release + "-" + name
	m.Create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}})
	return name
}

// pod creates a pod scheduled on node, playing the scheduler, and returns
// it as stored.
func (m *Mesh) Pod(ns, name, sa, node string) *corev1.Pod {
	m.T.Helper()
	p, err := m.CP.Client.CoreV1().Pods(ns).Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa, NodeName: node,
			Containers: []corev1.Container{{Name: "c", Image: "example.invalid/none"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		m.T.Fatalf("create pod %s/%s: %v", ns, name, err)
	}
	return p
}

// token requests a projected token of pod's service account bound to the
// pod, for audience, written to a file whose path is returned.
func (m *Mesh) Token(p *corev1.Pod, audience string) string {
	m.T.Helper()
	exp := int64(600)
	tr, err := m.CP.Client.CoreV1().ServiceAccounts(p.Namespace).CreateToken(context.Background(), p.Spec.ServiceAccountName, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{
			Audiences:         []string{audience},
			ExpirationSeconds: &exp,
			BoundObjectRef:    &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		m.T.Fatalf("token for %s/%s: %v", p.Namespace, p.Name, err)
	}
	return m.TokenFile(tr.Status.Token)
}

func (m *Mesh) TokenFile(tok string) string {
	m.T.Helper()
	f, err := os.CreateTemp(m.T.TempDir(), "token-")
	if err != nil {
		m.T.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(tok); err != nil {
		m.T.Fatal(err)
	}
	return f.Name()
}

// caProcess is a running ambpf-ca binary.
type CAProcess struct {
	t       *testing.T
	args    []string
	env     []string
	Dir     string // --ca-dir
	Addr    string // localhost:port, the gRPC endpoint
	Metrics string // host:port of /metrics
	cmd     *exec.Cmd
	done    chan struct{}
	log     string
}

// startCA runs ambpf-ca as the chart's CA service account (impersonated
// through a kubeconfig) with a fresh CA directory, trusting the mesh's
// proxy account, and waits until it serves.
func (m *Mesh) StartCA(extra ...string) *CAProcess {
	m.T.Helper()
	return m.StartCAIn(filepath.Join(m.T.TempDir(), "ca"), extra...)
}

// StartCAIn is StartCA with the CA directory caDir (a prepared key, for
// example cert-manager's layout). RootFile is then caDir's ca.crt.
func (m *Mesh) StartCAIn(caDir string, extra ...string) *CAProcess {
	m.T.Helper()
	kc, err := m.CP.ServiceAccountKubeconfig(m.Sys, m.CASA)
	if err != nil {
		m.T.Fatal(err)
	}
	dir := m.T.TempDir()
	p := &CAProcess{t: m.T, Dir: caDir, log: filepath.Join(dir, "ca.log")}
	p.env = append(os.Environ(),
		"AMBPF_CA_KUBECONFIG="+kc,
		"AMBPF_CA_TRUSTED_NODE_ACCOUNTS="+m.Sys+"/"+m.ProxySA,
	)
	p.args = append([]string{"--ca-dir=" + p.Dir, "--serving-names=localhost", "--log-level=debug"}, extra...)
	bin := BuildCA(m.T)
	var lastErr error
	for range 3 { // a port picked free may be taken before the CA binds it
		ports := freePorts(m.T, 2)
		p.Addr = "localhost:" + strconv.Itoa(ports[0])
		p.Metrics = "127.0.0.1:" + strconv.Itoa(ports[1])
		if lastErr = p.Start(bin); lastErr == nil {
			m.T.Cleanup(p.stop)
			return p
		}
		if !strings.Contains(lastErr.Error(), "address already in use") {
			break
		}
	}
	m.T.Fatal(lastErr)
	return nil
}

// start (re)starts the process on p.Addr and waits for it to serve.
func (p *CAProcess) Start(bin string) error {
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, append(slicesClone(p.args), "--listen="+p.Addr, "--metrics-addr="+p.Metrics)...)
	cmd.Env = p.env
	cmd.Stdout, cmd.Stderr = logf, logf
	done := make(chan struct{})
	if err := childproc.Start(cmd, func(error) { logf.Close(); close(done) }); err != nil {
		logf.Close()
		return fmt.Errorf("start ambpf-ca: %w", err)
	}
	p.cmd, p.done = cmd, done
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-done:
			return fmt.Errorf("ambpf-ca exited: %s", p.logTail())
		default:
		}
		if c, err := net.DialTimeout("tcp", p.Addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			p.Kill()
			return fmt.Errorf("ambpf-ca not serving after 30s: %s", p.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func slicesClone(s []string) []string { return append([]string(nil), s...) }

// kill SIGKILLs the process (a crash) and waits for it.
func (p *CAProcess) Kill() {
	if p.cmd == nil {
		return
	}
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
	p.cmd = nil
}

func (p *CAProcess) stop() {
	if p.cmd != nil {
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-p.done:
			p.cmd = nil
		case <-time.After(10 * time.Second):
			p.Kill()
		}
	}
	if p.t.Failed() {
		p.t.Logf("ambpf-ca log:\n%s", p.logTail())
	}
}

func (p *CAProcess) logTail() string {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return strings.Join(lines, "\n")
}

// rootFile is the CA's trust bundle, the file a proxy is given.
func (p *CAProcess) RootFile() string { return filepath.Join(p.Dir, "ca.crt") }

// client is a proxy's CA client with the given token file.
func (p *CAProcess) Client(tokenFile string) *caclient.Client {
	p.t.Helper()
	c, err := caclient.New(caclient.Config{Address: p.Addr, RootFile: p.RootFile(), TokenFile: tokenFile, Timeout: 5 * time.Second})
	if err != nil {
		p.t.Fatal(err)
	}
	p.t.Cleanup(func() { c.Close() })
	return c
}

// counter reads ambpf_ca_requests_total{result=...} from /metrics.
func (p *CAProcess) Counter(result string) float64 {
	p.t.Helper()
	resp, err := http.Get("http://" + p.Metrics + "/metrics")
	if err != nil {
		p.t.Fatal(err)
	}
	defer resp.Body.Close()
	want := `ambpf_ca_requests_total{result="` + result + `"} `
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), want); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				p.t.Fatal(err)
			}
			return f
		}
	}
	return 0
}

func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var out []int
	var ls []net.Listener
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		out = append(out, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return out
}

// eventually polls cond until it returns nil or timeout passes.
func Eventually(t *testing.T, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %v", timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
