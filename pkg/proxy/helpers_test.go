//go:build linux

package proxy

import (
	"bufio"
	"cmp"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/client-go/rest"

	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/logtest"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/zds"
)

// env is one test's world: a topology of netns pods on a bridge, the eBPF
// datapath on a private bpffs, and one proxy running in-process in the
// test's own netns (its metrics listeners on loopback).
type env struct {
	t      *testing.T
	lab    *nettest.Topology
	loader *datapath.Loader
	p      *Proxy
	logs   *logtest.Buffer
	dir    string
	disc   string // discovery file path

	zdsSrv *zds.Server
	snap   *podList
	// stop ends the proxy's Run (its drain included) and returns Run's
	// error; the cleanup calls it too.
	stop func() error
}

type envOptions struct {
	pods         int
	discovery    string // discovery file content (may use {{podN}} for pod N's IPv4)
	certLifetime time.Duration
	zds          bool // feed the proxy through a real ZDS server
	dns          bool
	h3           H3Config
	kube         *rest.Config // the Kubernetes API to watch, if any
	mtlsMode     discovery.MTLSMode
	syncWait     time.Duration
	authority    identity.Authority // a remote CA instead of the local one
	drain        time.Duration      // Config.DrainTimeout; zero: no drain
	noReusePort  bool               // Config.NoReusePort
}

func newEnv(t *testing.T, o envOptions) *env {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("proxy end-to-end tests need root (netns, bpffs, IP_TRANSPARENT)")
	}
	e := &env{t: t, lab: nettest.NewTopology(t, o.pods), dir: t.TempDir(), logs: &logtest.Buffer{}}
	e.loader = testLoader(t)
	e.disc = filepath.Join(e.dir, "discovery.yaml")
	e.writeDiscovery(o.discovery)
	cfg := Config{
		StateDir:      e.dir,
		CertLifetime:  o.certLifetime,
		DiscoveryFile: e.disc,
		DiscoveryPoll: 20 * time.Millisecond,
		MetricsAddr:   "127.0.0.1:0",
		ReadyAddr:     "127.0.0.1:0",
		DialTimeout:   2 * time.Second,
		DNSCapture:    o.dns,
		H3:            o.h3,
		Kubernetes:    o.kube,
		MTLSMode:      o.mtlsMode,
		SyncWait:      o.syncWait,
		Authority:     o.authority,
		DrainTimeout:  cmp.Or(o.drain, -1),
		NoReusePort:   o.noReusePort,
		Logger:        slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if o.zds {
		cfg.ZDSPath = filepath.Join(e.dir, "zds.sock")
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatalf("new proxy: %v", err)
	}
	e.p = p
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	e.stop = sync.OnceValue(func() error {
		cancel()
		return <-done
	})
	t.Cleanup(func() {
		if err := e.stop(); err != nil {
			t.Errorf("proxy run: %v", err)
		}
		if t.Failed() {
			t.Logf("proxy log:\n%s", e.logs.String())
		}
	})
	return e
}

// startZDS starts the node agent's ZDS server for the proxy to connect to.
func (e *env) startZDS() {
	e.t.Helper()
	e.snap = &podList{pods: map[string]zds.Pod{}}
	srv, err := zds.NewServer(zds.ServerConfig{Path: e.p.cfg.ZDSPath, Snapshot: e.snap, Logger: slog.New(slog.NewTextHandler(e.logs, nil))})
	if err != nil {
		e.t.Fatalf("zds server: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx); close(done) }()
	e.t.Cleanup(func() { cancel(); srv.Close(); <-done })
	e.zdsSrv = srv
	waitFor(e.t, "zds proxy connected and synced", srv.Ready)
}

// writeDiscovery writes the discovery file, replacing {{podN}} with pod
// N's IPv4 address. It swaps the file in by rename, as a ConfigMap update
// does, so the proxy never reads it half written.
func (e *env) writeDiscovery(content string) {
	e.t.Helper()
	for i, pd := range e.lab.Pods {
		content = strings.ReplaceAll(content, fmt.Sprintf("{{pod%d}}", i), pd.IPv4.String())
	}
	tmp := e.disc + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Rename(tmp, e.disc); err != nil {
		e.t.Fatal(err)
	}
}

// enroll attaches the datapath to pod i and starts its pod proxy (through
// ZDS when the env has a server, else by calling the handler).
func (e *env) enroll(i int, namespace, sa string) string {
	e.t.Helper()
	pd := e.lab.Pod(i)
	uid := "uid-" + pd.Name + "-" + e.lab.ID
	if _, err := e.loader.Attach(datapath.Pod{UID: uid, Netns: pd.NS, Options: datapath.Options{DNSCapture: e.p.cfg.DNSCapture}}); err != nil {
		e.t.Fatalf("attach datapath to %s: %v", pd.Name, err)
	}
	e.t.Cleanup(func() {
		if err := e.loader.Detach(uid); err != nil {
			e.t.Errorf("detach %s: %v", pd.Name, err)
		}
	})
	info := zds.WorkloadInfo{Name: pd.Name, Namespace: namespace, ServiceAccount: sa}
	if e.zdsSrv != nil {
		e.snap.put(zds.Pod{UID: uid, Info: info, OpenNetns: func() (*os.File, error) { return os.Open(pd.NSPath) }})
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := e.zdsSrv.Add(ctx, uid, info, pd.NS.File()); err != nil {
			e.t.Fatalf("zds add %s: %v", pd.Name, err)
		}
		return uid
	}
	if err := e.p.AddWorkload(uid, info, pd.NS.File()); err != nil {
		e.t.Fatalf("add workload %s: %v", pd.Name, err)
	}
	return uid
}

// app starts the greeting/echo app on port 8080 of pod i.
func (e *env) app(i int, name string) *nettest.App {
	e.t.Helper()
	a, err := nettest.StartApp(&e.lab.Pod(i).Netns, name, []uint16{nettest.AppPort}, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { a.Close() })
	return a
}

// connect opens a connection from pod i to addr and reads the greeting.
func (e *env) connect(i int, addr string) (*nettest.TCPConn, error) {
	pd := e.lab.Pod(i)
	return nettest.OpenTCP(func(ctx context.Context) (net.Conn, error) { return pd.Dial(ctx, "tcp", addr) })
}

// mustConnect is connect that fails the test on error and closes the
// connection in cleanup.
func (e *env) mustConnect(i int, addr string) *nettest.TCPConn {
	e.t.Helper()
	c, err := e.connect(i, addr)
	if err != nil {
		e.t.Fatalf("pod%d -> %s: %v", i, addr, err)
	}
	e.t.Cleanup(func() { c.Close() })
	return c
}

// meshEcho connects pod from to pod to's app, named app, while the node
// captures packets matching filter; it checks that the app sees from's
// pod IP and echoes payload, and that the capture shows neither the
// payload in clear nor a plaintext connection to the app port. It returns
// the capture for the caller's transport checks.
func (e *env) meshEcho(from, to int, app, filter, payload string) string {
	t := e.t
	t.Helper()
	capt := e.startCaptureFilter(filter)
	c := e.mustConnect(from, appAddr(e, to))
	if want := "app " + app + " peer=" + e.lab.Pod(from).IPv4.String(); c.Greeting != want {
		t.Fatalf("greeting %q, want %q (the app must see A's pod IP)", c.Greeting, want)
	}
	if err := c.Echo(payload); err != nil {
		t.Fatal(err)
	}
	c.Close()
	dump := capt.stop(t)
	if strings.Contains(dump, payload) {
		t.Errorf("capture shows the payload in clear")
	}
	if strings.Contains(dump, fmt.Sprintf("%s.%d", e.lab.Pod(to).IPv4, nettest.AppPort)) {
		t.Errorf("capture shows a plaintext connection to the app port")
	}
	return dump
}

// spread connects from pod 0 to addr, a service whose endpoints run apps
// named "b<something>" (two characters), until want apps were reached (at
// most 64 times), checks each app sees pod 0's IP and returns the app
// names reached.
func (e *env) spread(addr string, want int) map[string]bool {
	e.t.Helper()
	got := map[string]bool{}
	// Endpoints are chosen at random (as ztunnel does): 64 connections
	// miss one of a few endpoints with negligible probability.
	for range 64 {
		c := e.mustConnect(0, addr)
		if !strings.HasPrefix(c.Greeting, "app b") || !strings.HasSuffix(c.Greeting, "peer="+e.lab.Pod(0).IPv4.String()) {
			e.t.Fatalf("greeting %q", c.Greeting)
		}
		got[c.Greeting[:6]] = true
		c.Close()
		if len(got) >= want {
			break
		}
	}
	return got
}

// denyFromA is a discovery document: an AuthorizationPolicy no-a in
// namespace ns that denies pod 0's identity (ns-a/sa-a, as the tests here
// enrol it).
func denyFromA(ns string) string {
	return `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-a, namespace: ` + ns + `}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/ns-a/sa/sa-a]
`
}

func appAddr(e *env, i int) string {
	return net.JoinHostPort(e.lab.Pod(i).IPv4.String(), strconv.Itoa(nettest.AppPort))
}

// get fetches a URL path from one of the proxy's HTTP listeners.
func get(t *testing.T, addr net.Addr, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + addr.String() + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitLog waits for a log line containing every one of parts.
func (e *env) waitLog(parts ...string) string {
	e.t.Helper()
	var found string
	waitFor(e.t, fmt.Sprintf("log line with %q", parts), func() bool {
		for line := range strings.SplitSeq(e.logs.String(), "\n") {
			ok := true
			for _, p := range parts {
				if !strings.Contains(line, p) {
					ok = false
					break
				}
			}
			if ok {
				found = line
				return true
			}
		}
		return false
	})
	return found
}

// podList is the test agent's snapshot source.
type podList struct {
	mu   sync.Mutex
	pods map[string]zds.Pod
}

func (l *podList) put(p zds.Pod) {
	l.mu.Lock()
	l.pods[p.UID] = p
	l.mu.Unlock()
}

func (l *podList) Snapshot(context.Context) ([]zds.Pod, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]zds.Pod, 0, len(l.pods))
	for _, p := range l.pods {
		out = append(out, p)
	}
	return out, nil
}

// testLoader returns a datapath Loader whose pins live on a bpffs mounted
// for this test only.
func testLoader(t *testing.T) *datapath.Loader {
	t.Helper()
	mnt := t.TempDir()
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount bpffs: %v", err)
		}
	})
	l, err := datapath.New(datapath.Config{Root: filepath.Join(mnt, "ambpf"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	// The proxy runs in this process: its cgroup is the proxy's, as the
	// agent would record for a proxy connecting over ZDS.
	if _, _, err := l.TrustProcess(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	return l
}

// capture runs tcpdump in the node netns on every interface (the bridge
// ports: frames forwarded between pods never reach br0's own interface);
// stop ends it and returns
// the decoded packets (tcpdump -r -A).
type capture struct {
	cmd  *exec.Cmd
	file string
}

func (e *env) startCapture() *capture {
	e.t.Helper()
	return e.startCaptureFilter("tcp")
}

// startCaptureFilter is startCapture with a pcap filter expression.
func (e *env) startCaptureFilter(filter string) *capture {
	e.t.Helper()
	c := &capture{file: filepath.Join(e.dir, "node.pcap")}
	c.cmd = exec.Command("ip", "netns", "exec", e.lab.Node.NSName, "tcpdump", "-i", "any", "--immediate-mode", "-U", "-n", "-s", "0", "-w", c.file, filter)
	stderr, err := c.cmd.StderrPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		e.t.Skipf("tcpdump: %v", err)
	}
	e.t.Cleanup(func() { c.cmd.Process.Kill(); c.cmd.Wait() })
	// tcpdump says "listening on br0" once the capture is live.
	sc := bufio.NewScanner(stderr)
	for sc.Scan() {
		if strings.Contains(sc.Text(), "listening on") {
			go io.Copy(e.logs, stderr)
			return c
		}
	}
	e.t.Fatalf("tcpdump did not start: %v", sc.Err())
	return nil
}

func (c *capture) stop(t *testing.T) string {
	t.Helper()
	// Immediate mode hands packets over as they arrive; the pause lets
	// the last ones of the test reach the file before the interrupt.
	time.Sleep(200 * time.Millisecond)
	c.cmd.Process.Signal(os.Interrupt)
	c.cmd.Wait()
	out, err := exec.Command("tcpdump", "-r", c.file, "-n", "-A").CombinedOutput()
	if err != nil {
		t.Fatalf("tcpdump -r: %v: %s", err, out)
	}
	return string(out)
}
