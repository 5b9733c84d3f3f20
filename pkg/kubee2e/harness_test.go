//go:build linux

package kubee2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/kubetest"
	"github.com/ambpf/ambpf/pkg/logtest"
	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/podwatch"
	"github.com/ambpf/ambpf/pkg/proxy"
)

func TestMain(m *testing.M) { os.Exit(kubetest.RunShared(m)) }

const (
	waitLong  = 20 * time.Second
	podSubnet = "10.89.0.0/24"
	bridge    = "cni0"
)

// gateway is the bridge's address in the node namespace (isGateway),
// which is also the node's address seen from the pods.
func gateway() netip.Addr { return netip.MustParsePrefix(podSubnet).Addr().Next() }

// cluster is one node of a test: a netlab node namespace, the real agent
// (Kubernetes mode) and proxy in-process, the CNI tools, and the shared
// control plane.
type cluster struct {
	t      *testing.T
	cp     *kubetest.ControlPlane
	client kubernetes.Interface
	id     string
	node   string
	lab    *netlab.Lab
	env    *agenttest.Env
	agent  *agenttest.Agent
	proxy  *proxy.Proxy

	// logs keeps the proxy's log lines for waitLog.
	logs *logBuffer

	tools, plugins, confDir, netName string
	cgroupRoot                       string
}

// logger logs to the test log and, when keep is set, to keep as well.
func logger(t *testing.T, keep *logBuffer) *slog.Logger {
	var w io.Writer = testWriter{t}
	if keep != nil {
		w = io.MultiWriter(w, keep)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// logBuffer holds log lines for tests to search (safe for concurrent
// writers).
type logBuffer = logtest.Buffer

// waitLog waits until the proxy logged a line holding every one of want
// and returns that line.
func (c *cluster) waitLog(want ...string) string {
	c.t.Helper()
	var line string
	agenttest.WaitFor(c.t, waitLong, fmt.Sprintf("proxy log line with %q", want), func() bool {
		var ok bool
		line, ok = c.logs.Find(want...)
		return ok
	})
	return line
}

// testWriter sends log lines to the test log and drops them once the
// test is over (a late line from a stopping goroutine would panic).
type testWriter struct{ t *testing.T }

var logMu sync.Mutex

func (w testWriter) Write(p []byte) (int, error) {
	logMu.Lock()
	defer logMu.Unlock()
	defer func() { recover() }()
	w.t.Logf("%s", bytes.TrimRight(p, "\n"))
	return len(p), nil
}

func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			t.Fatal("no go.mod above " + dir)
		}
	}
}

// buildTools returns the directory of cnitool and the reference plugins
// (hack/tools.sh builds what is missing) and a directory holding a fresh
// ambpf-cni.
func buildTools(t *testing.T) (tools, plugins string) {
	t.Helper()
	root := repoRoot(t)
	tools = os.Getenv("AMBPF_TOOLS_DIR")
	if tools == "" {
		tools = filepath.Join(root, ".cache", "tools")
	}
	cmd := exec.Command(filepath.Join(root, "hack", "tools.sh"))
	cmd.Env = append(os.Environ(), "AMBPF_TOOLS_DIR="+tools)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("hack/tools.sh: %v\n%s", err, out)
	}
	plugins = t.TempDir()
	build := exec.Command("go", "build", "-o", filepath.Join(plugins, "ambpf-cni"), "./cmd/ambpf-cni")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/ambpf-cni: %v\n%s", err, out)
	}
	return tools, plugins
}

// crds installs the chart's Istio CRDs into the shared control plane once
// per test binary.
var crds struct {
	once sync.Once
	err  error
}

// installCRDs applies charts/ambpf/crds and waits until the API serves
// them. It must happen before a proxy starts: a proxy that finds a CRD
// missing looks again only every kubediscovery.DefaultCRDPoll.
func installCRDs(t *testing.T, cp *kubetest.ControlPlane) {
	t.Helper()
	dir := filepath.Join(repoRoot(t), "charts", "ambpf", "crds")
	crds.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := cp.Run(ctx, "kubectl", "apply", "-f", dir); err != nil {
			crds.err = fmt.Errorf("install the CRDs: %w", err)
			return
		}
		if _, err := cp.Run(ctx, "kubectl", "wait", "--for=condition=Established", "--timeout=50s",
			"crd/authorizationpolicies.security.istio.io", "crd/peerauthentications.security.istio.io"); err != nil {
			crds.err = fmt.Errorf("wait for the CRDs: %w", err)
		}
	})
	if crds.err != nil {
		t.Fatal(crds.err)
	}
}

// newCluster builds a node and starts the agent and the proxy on it.
func newCluster(t *testing.T) *cluster {
	t.Helper()
	agenttest.RequireRoot(t)
	cp := kubetest.Shared(t)
	installCRDs(t, cp)
	c := &cluster{t: t, cp: cp, client: cp.Client, id: agenttest.RandomID(), logs: &logBuffer{}}
	c.node = "node-" + c.id
	c.tools, c.plugins = buildTools(t)
	lab, err := netlab.Build(netlab.Options{Prefix: "ambpf-e2e-"})
	if err != nil {
		t.Fatal(err)
	}
	c.lab = lab
	t.Cleanup(func() {
		if err := lab.Close(); err != nil {
			t.Errorf("close lab: %v", err)
		}
	})
	mnt, err := netlab.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	// The node's "kubepods" cgroup: pod cgroups are created below it.
	c.cgroupRoot = filepath.Join(mnt, "ambpf-e2e-"+c.id)
	if err := os.Mkdir(c.cgroupRoot, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeCgroup(t, c.cgroupRoot) })

	c.netName = "ambpf-e2e-" + c.id
	c.env = agenttest.NewEnv(t)
	c.env.Config.NoProbeSNAT = false
	c.env.Config.NodeNetns = lab.Node.NSPath
	c.confDir = t.TempDir()
	conflist := fmt.Sprintf(`{"cniVersion":"1.1.0","name":%q,"plugins":[
	  {"type":"bridge","bridge":%q,"isGateway":true,"ipMasq":false,
	   "ipam":{"type":"host-local","subnet":%q,"dataDir":%q}},
	  {"type":"ambpf-cni","agent_socket":%q}]}`, c.netName, bridge, podSubnet, t.TempDir(), c.env.Config.APISocket)
	loconf := fmt.Sprintf(`{"cniVersion":"1.1.0","name":"%s-lo","plugins":[{"type":"loopback"}]}`, c.netName)
	for name, conf := range map[string]string{c.netName: conflist, c.netName + "-lo": loconf} {
		if err := os.WriteFile(filepath.Join(c.confDir, name+".conflist"), []byte(conf), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		m, _ := filepath.Glob("/var/lib/cni/results/" + c.netName + "-*")
		for _, f := range m {
			os.Remove(f)
		}
	})
	c.startAgent()
	c.startProxy()
	return c
}

// watcher is a fresh Kubernetes controller for the agent (one per Run).
func (c *cluster) watcher() *podwatch.Watcher {
	w, err := podwatch.New(podwatch.Config{
		Client: c.client, NodeName: c.node,
		Policy:   podwatch.Policy{ExcludedNamespaces: []string{"kube-system"}},
		Finder:   podwatch.Finder{ProcRoot: "/proc", CgroupRoot: filepath.Dir(c.cgroupRoot)},
		RetryMin: 50 * time.Millisecond, RetryMax: time.Second,
		Logger: logger(c.t, nil),
	})
	if err != nil {
		c.t.Fatal(err)
	}
	return w
}

func (c *cluster) startAgent() {
	c.env.Config.Controller = c.watcher()
	c.agent = c.env.Start(c.t)
}

func (c *cluster) stopAgent() { c.agent.Stop(c.t) }

func (c *cluster) startProxy() {
	t := c.t
	p, err := proxy.New(proxy.Config{
		ZDSPath: c.env.Config.ZDSPath, StateDir: t.TempDir(),
		Kubernetes:  c.cp.Config,
		MetricsAddr: "off", ReadyAddr: "off", Logger: logger(t, c.logs),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("proxy Run: %v", err)
		}
	})
	c.proxy = p
	agenttest.WaitFor(t, waitLong, "proxy synced", func() bool { return p.Ready() == nil })
}

// namespace creates a uniquely named namespace with labels.
func (c *cluster) namespace(prefix string, labels map[string]string) string {
	c.t.Helper()
	name := prefix + "-" + c.id
	_, err := c.client.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
	}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		c.t.Fatalf("create namespace %s: %v", name, err)
	}
	return name
}

// setNamespaceLabel sets (or with value "" removes) the dataplane-mode
// label of a namespace.
func (c *cluster) setNamespaceLabel(ns, value string) {
	c.t.Helper()
	var v any
	if value != "" {
		v = value
	}
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]any{podwatch.DataplaneModeLabel: v}}})
	if _, err := c.client.CoreV1().Namespaces().Patch(context.Background(), ns, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		c.t.Fatalf("label namespace %s: %v", ns, err)
	}
}

type podOpts struct {
	labels, annotations map[string]string
	hostNetwork         bool
	serviceAccount      string // "" is the default service account
}

// kpod is a pod the test started as the kubelet would.
type kpod struct {
	name, namespace, uid string
	netns                *netlab.Netns // nil for a hostNetwork pod
	ip                   netip.Addr
	app                  *nettest.App
}

func (p *kpod) String() string { return p.namespace + "/" + p.name }

// startPod plays kubelet and runtime: the Pod through the API, its netns,
// the CNI chain, a pause process in the pod's netns and cgroup, an app on
// nettest.AppPort, and the pod IP in the Pod's status.
func (c *cluster) startPod(namespace, name string, o podOpts) *kpod {
	t := c.t
	t.Helper()
	ctx := context.Background()
	pod, err := c.client.CoreV1().Pods(namespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: o.labels, Annotations: o.annotations},
		Spec: corev1.PodSpec{
			NodeName:           c.node,
			HostNetwork:        o.hostNetwork,
			ServiceAccountName: o.serviceAccount,
			Containers:         []corev1.Container{{Name: "app", Image: "registry.invalid/app:1"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s/%s: %v", namespace, name, err)
	}
	p := &kpod{name: name, namespace: namespace, uid: string(pod.UID)}
	if o.hostNetwork {
		p.netns, p.ip = c.lab.Node, gateway()
	} else {
		p.netns = c.podNetns(name)
		p.ip = c.cniAdd(p)
		c.pause(p)
	}
	app, err := nettest.StartApp(p.netns, name, []uint16{nettest.AppPort}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { app.Close() })
	p.app = app
	// A patch, not an update: the agent may have annotated the pod since.
	status, _ := json.Marshal(map[string]any{"status": corev1.PodStatus{
		Phase: corev1.PodRunning, PodIP: p.ip.String(), PodIPs: []corev1.PodIP{{IP: p.ip.String()}},
	}})
	if _, err := c.client.CoreV1().Pods(namespace).Patch(ctx, name, types.MergePatchType, status, metav1.PatchOptions{}, "status"); err != nil {
		t.Fatalf("set status of %s: %v", p, err)
	}
	// Every test's pods get addresses from the same subnet, and the
	// proxy's Kubernetes source sees the pods of every test: an old pod
	// left in the API would claim a new pod's IP. Registered last so it
	// runs first, before the runtime's teardown, and without grace (no
	// kubelet finishes a graceful deletion).
	t.Cleanup(func() {
		err := c.client.CoreV1().Pods(namespace).Delete(context.Background(), name, metav1.DeleteOptions{GracePeriodSeconds: new(int64(0))})
		if err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete pod %s/%s: %v", namespace, name, err)
		}
	})
	return p
}

// podNetns creates an empty network namespace, as the runtime does.
func (c *cluster) podNetns(name string) *netlab.Netns {
	t := c.t
	t.Helper()
	nsName := "ambpf-e2e-" + c.id + "-" + name
	if out, err := exec.Command("ip", "netns", "add", nsName).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	path := "/run/netns/" + nsName
	h, err := netns.Open(path)
	if err != nil {
		exec.Command("ip", "netns", "del", nsName).Run()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		h.Close()
		exec.Command("ip", "netns", "del", nsName).Run()
	})
	return &netlab.Netns{Name: name, NSName: nsName, NSPath: path, NS: h}
}

// cniAdd runs loopback and then bridge + host-local + ambpf-cni through
// cnitool inside the node namespace and returns the pod's address.
func (c *cluster) cniAdd(p *kpod) netip.Addr {
	t := c.t
	t.Helper()
	args := "IgnoreUnknown=1;K8S_POD_NAMESPACE=" + p.namespace + ";K8S_POD_NAME=" + p.name + ";K8S_POD_UID=" + p.uid
	if out, err := c.cnitool(args, "add", c.netName+"-lo", p.netns.NSPath); err != nil {
		t.Fatalf("cnitool add loopback: %v\n%s", err, out)
	}
	out, err := c.cnitool(args, "add", c.netName, p.netns.NSPath)
	if err != nil {
		t.Fatalf("cnitool add %s: %v\n%s", p, err, out)
	}
	var res struct {
		IPs []struct{ Address string } `json:"ips"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.IPs) == 0 {
		t.Fatalf("cnitool add %s printed no IP (%v):\n%s", p, err, out)
	}
	t.Cleanup(func() {
		if out, err := c.cnitool(args, "del", c.netName, p.netns.NSPath); err != nil {
			t.Logf("cnitool del %s: %v\n%s", p, err, out)
		}
	})
	return netip.MustParsePrefix(res.IPs[0].Address).Addr()
}

func (c *cluster) cnitool(podArgs string, args ...string) (string, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", c.lab.Node.NSName, filepath.Join(c.tools, "cnitool")}, args...)...)
	cmd.Env = append(os.Environ(), "CNI_PATH="+c.plugins+":"+c.tools, "NETCONFPATH="+c.confDir, "CNI_ARGS="+podArgs)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String() + stderr.String(), err
	}
	return stdout.String(), nil
}

// pause starts the pod's "pause" process: in the pod's netns and in a
// cgroup named as the kubelet's systemd driver names pod cgroups, so
// the agent's /proc search can find the pod.
func (c *cluster) pause(p *kpod) {
	t := c.t
	t.Helper()
	dir := filepath.Join(c.cgroupRoot, "kubepods-pod"+strings.ReplaceAll(p.uid, "-", "_")+".slice")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeCgroup(t, dir) })
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd := exec.Command("ip", "netns", "exec", p.netns.NSName, "sleep", "1000000")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pause of %s: %v", p, err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
}

func removeCgroup(t *testing.T, dir string) {
	os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0o644)
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := os.Remove(dir)
		if err == nil || os.IsNotExist(err) {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("remove cgroup %s: %v", dir, err)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// annotation returns the pod's redirection annotation ("" when absent).
func (c *cluster) annotation(p *kpod) string {
	pod, err := c.client.CoreV1().Pods(p.namespace).Get(context.Background(), p.name, metav1.GetOptions{})
	if err != nil {
		c.t.Fatalf("get %s: %v", p, err)
	}
	return pod.Annotations[podwatch.RedirectionAnnotation]
}

func (c *cluster) waitAnnotation(p *kpod, want string) {
	c.t.Helper()
	agenttest.WaitFor(c.t, waitLong, fmt.Sprintf("%s annotated %q", p, want), func() bool { return c.annotation(p) == want })
}

// enrolled reports whether the agent has the pod, and its record's netns.
func (c *cluster) enrolled(p *kpod) (bool, string) {
	st, ok := c.agent.Pod(p.uid)
	return ok, st.Netns
}

// dial opens a connection from one pod's netns to another's app and
// returns it with the peer address the app reported.
func dial(t *testing.T, from, to *kpod) (*nettest.TCPConn, error) {
	t.Helper()
	return dialAddr(t, from, netip.AddrPortFrom(to.ip, nettest.AppPort))
}

// dialAddr opens a connection from a pod's netns to dst and reads the
// app's greeting; on error nothing is left open.
func dialAddr(t *testing.T, from *kpod, dst netip.AddrPort) (*nettest.TCPConn, error) {
	t.Helper()
	tc, err := nettest.OpenTCP(func(ctx context.Context) (net.Conn, error) {
		return from.netns.Dial(ctx, "tcp", dst.String())
	})
	if err != nil {
		if tc != nil {
			tc.Conn.Close()
		}
		return nil, err
	}
	t.Cleanup(func() { tc.Conn.Close() })
	return tc, nil
}

// mustDial is dial that fails the test, and checks that the app saw the
// client's own address.
func mustDial(t *testing.T, from, to *kpod) *nettest.TCPConn {
	t.Helper()
	tc, err := dial(t, from, to)
	if err != nil {
		t.Fatalf("connect %s -> %s: %v", from, to, err)
	}
	want := fmt.Sprintf("app %s peer=%s", to.name, from.ip)
	if tc.Greeting != want {
		t.Fatalf("connect %s -> %s: greeting %q, want %q (the app must see the real peer)", from, to, tc.Greeting, want)
	}
	return tc
}

// echo sends msg on the connection and checks it comes back.
func echo(t *testing.T, tc *nettest.TCPConn, msg string) {
	t.Helper()
	tc.Conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(tc.Conn, "%s\n", msg); err != nil {
		t.Fatalf("write %q: %v", msg, err)
	}
	got, err := bufio.NewReader(tc.Conn).ReadString('\n')
	if err != nil || strings.TrimSpace(got) != msg {
		t.Fatalf("echo %q: got %q, %v", msg, got, err)
	}
}

// capture is tcpdump on every device of the node namespace (the pods'
// host-side veths and the bridge): what crosses the wire between pods. A
// capture inside a pod would also see the datapath's in-pod loop (egress
// redirected to ingress), which never leaves the pod.
type capture struct {
	t    *testing.T
	cmd  *exec.Cmd
	file string
}

func (c *cluster) capture() *capture {
	t := c.t
	t.Helper()
	file := filepath.Join(t.TempDir(), "node.pcap")
	cmd := exec.Command("ip", "netns", "exec", c.lab.Node.NSName, "tcpdump", "--immediate-mode", "-Z", "root", "-i", "any", "-nn", "-U", "-s", "0", "-w", file, "tcp")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("tcpdump: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	started := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "listening on") {
				started <- true
			}
		}
	}()
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("tcpdump did not start")
	}
	return &capture{t: t, cmd: cmd, file: file}
}

// stop ends the capture and returns the raw file and tcpdump's one-line
// summaries of the packets between a and b. When wantClear is set, it
// first waits (a few seconds at most) for that text to reach the file.
func (cp *capture) stop(a, b *kpod, wantClear string) (raw []byte, lines []string) {
	cp.t.Helper()
	raw, all := cp.stopAll(wantClear)
	return raw, between(all, a.ip, b.ip)
}

// between returns the summary lines of packets between a and b.
func between(lines []string, a, b netip.Addr) []string {
	var out []string
	for _, l := range lines {
		if mentions(l, a) && mentions(l, b) {
			out = append(out, l)
		}
	}
	return out
}

// mentions reports whether a tcpdump -nn summary line has ip as an
// endpoint ("ip.port").
func mentions(line string, ip netip.Addr) bool {
	return strings.Contains(line, " "+ip.String()+".")
}

// stopAll is stop without the filter: every packet's summary line.
func (cp *capture) stopAll(wantClear string) (raw []byte, lines []string) {
	cp.t.Helper()
	// tcpdump drops what it has not written when it stops: wait until
	// the file has stopped growing.
	// A marker expected in clear is waited for.
	last, stable := int64(-1), 0
	for deadline := time.Now().Add(5 * time.Second); stable < 5 && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
		b, err := os.ReadFile(cp.file)
		switch {
		case err != nil:
		case wantClear != "" && !bytes.Contains(b, []byte(wantClear)):
			stable = 0
		case int64(len(b)) == last:
			stable++
		default:
			last, stable = int64(len(b)), 0
		}
	}
	cp.cmd.Process.Signal(syscall.SIGTERM)
	cp.cmd.Wait()
	raw, err := os.ReadFile(cp.file)
	if err != nil {
		cp.t.Fatal(err)
	}
	out, err := exec.Command("tcpdump", "-r", cp.file, "-nn", "-q").Output()
	if err != nil {
		cp.t.Fatalf("tcpdump -r: %v", err)
	}
	if len(out) == 0 {
		cp.t.Logf("the capture is empty (%d bytes in %s)", len(raw), cp.file)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if l != "" {
			lines = append(lines, l)
		}
	}
	return raw, lines
}
