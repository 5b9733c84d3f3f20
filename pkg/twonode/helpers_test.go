//go:build linux

package twonode

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/ambpf/ambpf/pkg/kubetest"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/metrics"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/nodelab"
)

// built is this package's ambpf binaries, built once per test run.
var built = nodelab.BinaryCache{Prefix: "ambpf-twonode-bin-"}

func TestMain(m *testing.M) {
	// The Kubernetes test shares one control plane, started on first use.
	code := kubetest.RunShared(m)
	built.Remove()
	os.Exit(code)
}

// binaries returns the ambpf binaries and the CNI tools, built once.
func binaries(t *testing.T) (bins, tools string) { return built.Get(t) }

// lab is one test's two nodes with the standard pods:
//
//	node1: a (mesh, namespace ns-a), p (not in the mesh, ns-p)
//	node2: b (mesh, ns-b), c (not in the mesh, ns-c), d (mesh, ns-d)
//
// each running the greeting/echo app on 8080.
type lab struct {
	t        *testing.T
	c        *nodelab.Cluster
	n1, n2   *nodelab.Node
	a, p     *nodelab.Pod
	b, cc, d *nodelab.Pod
	apps     map[string]*nettest.App
	prefix   string
	kube     kubernetes.Interface
}

type labOptions struct {
	proxyArgs []string
	// kube, when set, runs the proxies against this API server
	// (--kubeconfig, STRICT mesh-wide) and registers the nodes and pods
	// in it instead of listing the pods in the discovery file.
	kube *kubetest.ControlPlane
}

// newLab builds the cluster and the pods; the test's cleanup removes all
// of it and checks that nothing with the lab's prefix is left.
func newLab(t *testing.T, o labOptions) *lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("two-node tests need root: network namespaces, BPF programs, a bpffs mount")
	}
	bins, tools := binaries(t)
	l := &lab{t: t, apps: map[string]*nettest.App{}, prefix: "ambpf-tn" + nodelab.RandomID() + "-"}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dir := t.TempDir()
	cfg := nodelab.Config{
		Prefix: l.prefix, Dir: dir, BinDir: bins, ToolsDir: tools, Nodes: 2,
		ProxyArgs: o.proxyArgs,
	}
	if o.kube != nil {
		l.kube = o.kube.Client
		cfg.ProxyArgs = append(cfg.ProxyArgs, "--kubeconfig", o.kube.Kubeconfig, "--mtls-mode", "STRICT")
		u, err := url.Parse(o.kube.Server)
		if err != nil {
			t.Fatal(err)
		}
		cfg.BeforeStart = func(n *nodelab.Node) error {
			f, err := forwardAPI(n, u.Host)
			if err != nil {
				return err
			}
			// Registered before the cluster's cleanup, so it runs after
			// the proxies, the forwarder's clients, have stopped.
			t.Cleanup(func() { f.Close() })
			return nil
		}
	}
	c, err := nodelab.New(ctx, cfg)
	if err != nil {
		t.Fatalf("build two nodes: %v", err)
	}
	l.c, l.n1, l.n2 = c, c.Nodes[0], c.Nodes[1]
	if l.kube != nil {
		kubeNodes(t, l.kube, c.Nodes)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range c.Nodes {
				t.Logf("%s", n.LogTails(30))
			}
		}
		for _, a := range l.apps {
			a.Close()
		}
		if err := c.Close(); err != nil {
			t.Errorf("clean up: %v", err)
		}
		assertNothingLeft(t, l.prefix, dir)
	})
	l.a = l.addPod(l.n1, "a", true)
	l.p = l.addPod(l.n1, "p", false)
	l.b = l.addPod(l.n2, "b", true)
	l.cc = l.addPod(l.n2, "c", false)
	l.d = l.addPod(l.n2, "d", true)
	if l.kube == nil {
		l.writeDiscovery("")
	}
	return l
}

// addPod makes pod name in namespace ns-<name> on n and starts its app.
func (l *lab) addPod(n *nodelab.Node, name string, mesh bool) *nodelab.Pod {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	p, err := l.c.AddPod(ctx, n, nodelab.PodSpec{Name: name, Namespace: "ns-" + name, Mesh: mesh})
	if err != nil {
		l.t.Fatal(err)
	}
	if l.kube != nil {
		kubePod(l.t, l.kube, p)
	}
	app, err := nettest.StartApp(p.Netns, name, []uint16{nettest.AppPort}, nil)
	if err != nil {
		l.t.Fatal(err)
	}
	if old := l.apps[name]; old != nil {
		old.Close()
	}
	l.apps[name] = app
	return p
}

func (l *lab) writeDiscovery(extra string) {
	l.t.Helper()
	if err := l.c.WriteDiscovery(extra); err != nil {
		l.t.Fatal(err)
	}
}

// connect opens a connection from pod from to addr and reads the
// greeting.
func connect(from *nodelab.Pod, addr string) (*nettest.TCPConn, error) {
	return nettest.OpenTCP(func(ctx context.Context) (net.Conn, error) { return from.Dial(ctx, "tcp", addr) })
}

func appAddr(p *nodelab.Pod) string {
	return net.JoinHostPort(p.IP.String(), strconv.Itoa(nettest.AppPort))
}

// greeting is what the app of to answers a client at from's address.
func greeting(to, from *nodelab.Pod) string {
	return "app " + to.Name + " peer=" + from.IP.String()
}

// mustReach connects from -> to's app, checks the app saw from's IP and
// echoes payload.
func (l *lab) mustReach(from, to *nodelab.Pod, payload string) {
	l.t.Helper()
	c, err := connect(from, appAddr(to))
	if err != nil {
		l.t.Fatalf("%s -> %s: %v", from.Name, to.Name, err)
	}
	defer c.Close()
	if want := greeting(to, from); c.Greeting != want {
		l.t.Fatalf("%s -> %s: greeting %q, want %q (the app must see the client's pod IP)", from.Name, to.Name, c.Greeting, want)
	}
	if err := c.Echo(payload); err != nil {
		l.t.Fatalf("%s -> %s: %v", from.Name, to.Name, err)
	}
}

// mustBeRefused checks that from cannot get a greeting from to's app.
func (l *lab) mustBeRefused(from, to *nodelab.Pod, why string) {
	l.t.Helper()
	c, err := connect(from, appAddr(to))
	if err == nil {
		c.Close()
		l.t.Fatalf("%s -> %s got %q: %s must refuse it", from.Name, to.Name, c.Greeting, why)
	}
	if c != nil {
		c.Close()
	}
}

// capture starts tcpdump on node n's inter-node link; the cleanup stops
// it.
func (l *lab) capture(n *nodelab.Node, filter string) *nodelab.Capture {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := nodelab.StartCapture(ctx, n.Netns, nodelab.LinkName, filter, filepath.Join(l.t.TempDir(), "link.pcap"))
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { c.Stop() })
	return c
}

// read stops c and returns its packets as `tcpdump -r -nn -A` prints them
// (headers and payload in ASCII).
func read(t *testing.T, c *nodelab.Capture, args ...string) string {
	t.Helper()
	// Immediate mode hands packets over as they arrive; the pause lets
	// the last ones reach the file before the interrupt.
	time.Sleep(200 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := c.Read(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// flowLine matches a tcpdump -nn line's addresses: "IP a.b.c.d.sport > e.f.g.h.dport:".
var flowLine = regexp.MustCompile(`IP (\d+\.\d+\.\d+\.\d+)\.(\d+) > (\d+\.\d+\.\d+\.\d+)\.(\d+):`)

// flows counts the packets of a capture per "src > dst:dport" with the
// client side's port dropped (dst:port for packets to the server, and
// "dst < src:sport" for the answers).
func flows(dump string) map[string]int {
	out := map[string]int{}
	for _, m := range flowLine.FindAllStringSubmatch(dump, -1) {
		out[fmt.Sprintf("%s > %s:%s", m[1], m[3], m[4])]++
	}
	return out
}

// to returns how many packets of the flow counts went from src to dst:port.
func to(counts map[string]int, src, dst netip.Addr, port int) int {
	return counts[fmt.Sprintf("%s > %s:%d", src, dst, port)]
}

// tlsHandshakes counts the packets to the HBONE port in the capture whose
// payload starts with a TLS handshake record (content type 22).
func tlsHandshakes(t *testing.T, c *nodelab.Capture) int {
	t.Helper()
	filter := fmt.Sprintf("tcp dst port %d and tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x16", meshconst.InboundHBONEPort)
	return len(flowLine.FindAllString(read(t, c, filter), -1))
}

// accessLogs returns the proxy's access-log lines (every run of it) in
// direction.
func accessLogs(n *nodelab.Node, direction string) []map[string]any {
	var out []map[string]any
	for _, f := range proxyLogs(n) {
		for _, m := range nodelab.LogLines(f, 0, "connection complete") {
			if m[metrics.LogDirection] == direction {
				out = append(out, m)
			}
		}
	}
	return out
}

// proxyLogs are the log files of every run of n's proxy.
func proxyLogs(n *nodelab.Node) []string {
	logs, _ := filepath.Glob(filepath.Join(n.Dir, "proxy-*.log"))
	return logs
}

// waitAccessLog waits until n's proxy logged a connection in direction
// for which match holds.
func waitAccessLog(t *testing.T, n *nodelab.Node, direction, what string, match func(map[string]any) bool) map[string]any {
	t.Helper()
	var found map[string]any
	waitFor(t, 5*time.Second, what, func() bool {
		for _, m := range accessLogs(n, direction) {
			if match(m) {
				found = m
				return true
			}
		}
		return false
	})
	return found
}

// waitFor polls cond every 20 ms for up to d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// assertNothingLeft checks for what a lab creates: network namespaces
// and cgroups with its prefix, mounts under its directory, libcni cache
// files of its networks, child processes.
func assertNothingLeft(t *testing.T, prefix, dir string) {
	t.Helper()
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			t.Errorf("netns left behind: /run/netns/%s", e.Name())
		}
	}
	mountinfo, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mountinfo), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir) {
			t.Errorf("mount left behind: %s", line)
		}
	}
	if cached, _ := filepath.Glob(filepath.Join("/var/lib/cni/results", prefix+"*")); len(cached) > 0 {
		t.Errorf("CNI cache files left behind: %v", cached)
	}
	if cgs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", prefix+"*")); len(cgs) > 0 {
		t.Errorf("cgroups left behind: %v", cgs)
	}
	if cgs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", prefix+"*")); len(cgs) > 0 {
		t.Errorf("cgroups left behind: %v", cgs)
	}
	// Children of the lab's: the binaries, nsenter, tcpdump, cnitool
	// (the shared control plane's etcd and kube-apiserver stay).
	tasks, _ := filepath.Glob("/proc/self/task/*/children")
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, pid := range strings.Fields(string(b)) {
			cmd, _ := os.ReadFile("/proc/" + pid + "/cmdline")
			c := strings.ReplaceAll(string(cmd), "\x00", " ")
			for _, mark := range []string{built.Dir(), "tcpdump", "nsenter", "cnitool", prefix} {
				if mark != "" && strings.Contains(c, mark) {
					t.Errorf("child process left behind: %s: %s", pid, c)
					break
				}
			}
		}
	}
}
