//go:build linux

package ca_test

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
	"github.com/ambpf/ambpf/pkg/kubetest"
)

func TestMain(m *testing.M) {
	code := kubetest.RunShared(m)
	if caBin.dir != "" {
		os.RemoveAll(caBin.dir)
	}
	os.Exit(code)
}

// caBin is the ambpf-ca binary, built once per test binary.
var caBin struct {
	once sync.Once
	dir  string
	err  error
}

func buildCA(t *testing.T) string {
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
type mesh struct {
	t       *testing.T
	cp      *kubetest.ControlPlane
	release string // helm release, so cluster-scoped names are the test's own
	sys     string // release namespace (proxies, CA)
	app     string // workloads
	proxySA string
	caSA    string
}

func newMesh(t *testing.T, name string) *mesh {
	t.Helper()
	cp := kubetest.Shared(t)
	m := &mesh{t: t, cp: cp, release: name, sys: name + "-system", app: name + "-app",
		proxySA: name + "-ambpf-proxy", caSA: name + "-ambpf-ca"}
	for _, ns := range []string{m.sys, m.app} {
		m.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}})
	}
	for _, sa := range []string{m.proxySA, m.caSA} {
		m.create(&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa, Namespace: m.sys}})
	}
	// The chart's own RBAC for the CA: the test proves it is enough.
	out, err := cp.Run(context.Background(), "helm", "template", m.release, chartDir(t), "--namespace", m.sys, "--show-only", "templates/ca-rbac.yaml")
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
func (m *mesh) create(obj object) {
	m.t.Helper()
	ctx := context.Background()
	c := m.cp.Client.CoreV1()
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
		m.t.Fatalf("create %T", obj)
	}
	if err != nil {
		m.t.Fatalf("create %s: %v", obj.GetName(), err)
	}
	if del != nil {
		m.t.Cleanup(func() {
			if err := del(); err != nil {
				m.t.Logf("delete %s: %v", obj.GetName(), err)
			}
		})
	}
}

// node creates a Node named after the test.
func (m *mesh) node(name string) string {
	m.t.Helper()
	name = m.release + "-" + name
	m.create(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}})
	return name
}

// pod creates a pod scheduled on node, playing the scheduler, and returns
// it as stored.
func (m *mesh) pod(ns, name, sa, node string) *corev1.Pod {
	m.t.Helper()
	p, err := m.cp.Client.CoreV1().Pods(ns).Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PodSpec{
			ServiceAccountName: sa, NodeName: node,
			Containers: []corev1.Container{{Name: "c", Image: "example.invalid/none"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		m.t.Fatalf("create pod %s/%s: %v", ns, name, err)
	}
	return p
}

// token requests a projected token of pod's service account bound to the
// pod, for audience, written to a file whose path is returned.
func (m *mesh) token(p *corev1.Pod, audience string) string {
	m.t.Helper()
	exp := int64(600)
	tr, err := m.cp.Client.CoreV1().ServiceAccounts(p.Namespace).CreateToken(context.Background(), p.Spec.ServiceAccountName, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{
			Audiences:         []string{audience},
			ExpirationSeconds: &exp,
			BoundObjectRef:    &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: p.Name, UID: p.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		m.t.Fatalf("token for %s/%s: %v", p.Namespace, p.Name, err)
	}
	return m.tokenFile(tr.Status.Token)
}

func (m *mesh) tokenFile(tok string) string {
	m.t.Helper()
	f, err := os.CreateTemp(m.t.TempDir(), "token-")
	if err != nil {
		m.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(tok); err != nil {
		m.t.Fatal(err)
	}
	return f.Name()
}

// caProcess is a running ambpf-ca binary.
type caProcess struct {
	t       *testing.T
	args    []string
	env     []string
	dir     string // --ca-dir
	addr    string // localhost:port
	metrics string
	cmd     *exec.Cmd
	done    chan struct{}
	log     string
}

// startCA runs ambpf-ca as the chart's CA service account (impersonated
// through a kubeconfig) with a fresh CA directory, trusting the mesh's
// proxy account, and waits until it serves.
func (m *mesh) startCA(extra ...string) *caProcess {
	m.t.Helper()
	kc, err := m.cp.ServiceAccountKubeconfig(m.sys, m.caSA)
	if err != nil {
		m.t.Fatal(err)
	}
	dir := m.t.TempDir()
	p := &caProcess{t: m.t, dir: filepath.Join(dir, "ca"), log: filepath.Join(dir, "ca.log")}
	p.env = append(os.Environ(),
		"AMBPF_CA_KUBECONFIG="+kc,
		"AMBPF_CA_TRUSTED_NODE_ACCOUNTS="+m.sys+"/"+m.proxySA,
	)
	p.args = append([]string{"--ca-dir=" + p.dir, "--serving-names=localhost", "--log-level=debug"}, extra...)
	bin := buildCA(m.t)
	var lastErr error
	for range 3 { // a port picked free may be taken before the CA binds it
		ports := freePorts(m.t, 2)
		p.addr = "localhost:" + strconv.Itoa(ports[0])
		p.metrics = "127.0.0.1:" + strconv.Itoa(ports[1])
		if lastErr = p.start(bin); lastErr == nil {
			m.t.Cleanup(p.stop)
			return p
		}
		if !strings.Contains(lastErr.Error(), "address already in use") {
			break
		}
	}
	m.t.Fatal(lastErr)
	return nil
}

// start (re)starts the process on p.addr and waits for it to serve.
func (p *caProcess) start(bin string) error {
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, append(slicesClone(p.args), "--listen="+p.addr, "--metrics-addr="+p.metrics)...)
	cmd.Env = p.env
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start ambpf-ca: %w", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	p.cmd, p.done = cmd, done
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-done:
			return fmt.Errorf("ambpf-ca exited: %s", p.logTail())
		default:
		}
		if c, err := net.DialTimeout("tcp", p.addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			p.kill()
			return fmt.Errorf("ambpf-ca not serving after 30s: %s", p.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func slicesClone(s []string) []string { return append([]string(nil), s...) }

// kill SIGKILLs the process (a crash) and waits for it.
func (p *caProcess) kill() {
	if p.cmd == nil {
		return
	}
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
	p.cmd = nil
}

func (p *caProcess) stop() {
	if p.cmd != nil {
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-p.done:
			p.cmd = nil
		case <-time.After(10 * time.Second):
			p.kill()
		}
	}
	if p.t.Failed() {
		p.t.Logf("ambpf-ca log:\n%s", p.logTail())
	}
}

func (p *caProcess) logTail() string {
	b, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	return strings.Join(lines, "\n")
}

// rootFile is the CA's trust bundle, the file a proxy is given.
func (p *caProcess) rootFile() string { return filepath.Join(p.dir, "ca.crt") }

// client is a proxy's CA client with the given token file.
func (p *caProcess) client(tokenFile string) *caclient.Client {
	p.t.Helper()
	c, err := caclient.New(caclient.Config{Address: p.addr, RootFile: p.rootFile(), TokenFile: tokenFile, Timeout: 5 * time.Second})
	if err != nil {
		p.t.Fatal(err)
	}
	p.t.Cleanup(func() { c.Close() })
	return c
}

// counter reads ambpf_ca_requests_total{result=...} from /metrics.
func (p *caProcess) counter(result string) float64 {
	p.t.Helper()
	resp, err := http.Get("http://" + p.metrics + "/metrics")
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
func eventually(t *testing.T, timeout time.Duration, cond func() error) {
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
