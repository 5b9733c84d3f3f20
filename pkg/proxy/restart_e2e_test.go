//go:build linux

package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/logtest"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// restartCanary is what pod A's client writes first on every connection
// to pod B: it must never be on the wire in clear.
const restartCanary = "CANARY-8d1f-plaintext-between-mesh-pods"

// TestNoPlaintextAcrossProxyRestarts runs the real ambpf-agent and
// ambpf-proxy binaries in the node netns of a two-pod bridge, enrols both
// pods, and has a client in pod A open a connection to pod B every 10 ms,
// writing restartCanary at once. The proxy is killed with SIGKILL and
// started again 20 times; after each start a connection made after it
// must get through. tcpdump on the node then must show no byte to B's
// app port and no canary at all: a restarted proxy that served A before
// it knew B (its Add comes after A's in the snapshot, pods being sorted
// by UID) used to pass such connections through as plain TCP.
func TestNoPlaintextAcrossProxyRestarts(t *testing.T) {
	const restarts = 20
	ae := agenttest.NewEnv(t)
	lab := nettest.NewTopology(t, 2)
	t0 := time.Now()
	bins := buildBinaries(t, "ambpf-agent", "ambpf-proxy")
	t.Logf("built the binaries in %v", time.Since(t0).Round(time.Millisecond))
	node := lab.Node

	agent := startNodeProcess(t, node, ae.Dir, "agent", filepath.Join(bins, "ambpf-agent"),
		"--bpf-root", ae.Config.BPFRoot, "--state-dir", ae.Config.StateDir,
		"--zds-socket", ae.Config.ZDSPath, "--api-socket", ae.Config.APISocket,
		"--ready-addr", "off", "--probe-snat=false")
	agenttest.WaitFor(t, 20*time.Second, "agent ready", func() bool {
		st, err := ae.Client.Status(context.Background())
		return err == nil && st.Ready && !agent.exited()
	})
	proxyArgs := []string{
		"--zds-path", ae.Config.ZDSPath, "--state-dir", filepath.Join(ae.Dir, "proxy"),
		"--metrics-addr", "127.0.0.1:15020", "--ready-addr", "127.0.0.1:15021",
	}
	startProxy := func() *nodeProcess {
		return startNodeProcess(t, node, ae.Dir, "proxy", filepath.Join(bins, "ambpf-proxy"), proxyArgs...)
	}
	proxy := startProxy()

	// UIDs sort A before B: the agent's snapshot adds A first.
	a, b := lab.Pod(0), lab.Pod(1)
	id := agenttest.RandomID()
	for _, p := range []struct {
		uid string
		pod *nettest.Pod
	}{{"a-" + id, a}, {"b-" + id, b}} {
		req := agentapi.EnrollRequest{UID: p.uid, Name: p.pod.Name, Namespace: "ns-" + p.pod.Name, ServiceAccount: "sa", Netns: p.pod.NSPath}
		if _, err := ae.Client.Enroll(context.Background(), req); err != nil {
			t.Fatalf("enroll %s: %v", p.pod.Name, err)
		}
		t.Cleanup(func() { ae.Client.Unenroll(context.Background(), p.uid) })
		agenttest.WaitFor(t, 20*time.Second, p.pod.Name+" enabled", func() bool {
			ps, err := ae.Client.Pod(context.Background(), p.uid)
			return err == nil && ps.State == agentapi.StateEnabled
		})
	}
	app, err := nettest.StartApp(&b.Netns, "b", []uint16{nettest.AppPort}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { app.Close() })

	capture := (&env{t: t, lab: lab, dir: ae.Dir, logs: &logtest.Buffer{}}).startCaptureFilter("tcp")
	load := startCanaryLoad(t, a, fmt.Sprintf("%s:%d", b.IPv4, nettest.AppPort), "app b peer="+a.IPv4.String())
	load.waitSuccessAfter(t, time.Now(), "first connection through the proxy", proxy)

	t0 = time.Now()
	for i := range restarts {
		proxy.kill(t)
		started := time.Now()
		proxy = startProxy()
		load.waitSuccessAfter(t, started, fmt.Sprintf("a connection after restart %d", i+1), proxy)
		waitProxyReady(t, node, proxy)
	}
	stats := load.stop()
	t.Logf("%d restarts in %v: %d connections succeeded, %d failed (while the proxy was down or starting)",
		restarts, time.Since(t0).Round(time.Millisecond), stats.ok, stats.failed)

	dump := capture.stop(t)
	// Any packet to B's app port is plaintext between mesh pods: a SYN
	// shows a connection passed through, payload shows it carried data.
	appPort := fmt.Sprintf("> %s.%d:", b.IPv4, nettest.AppPort)
	var plain, withData []string
	for line := range strings.SplitSeq(dump, "\n") {
		if strings.Contains(line, appPort) {
			plain = append(plain, line)
			if !strings.HasSuffix(line, "length 0") {
				withData = append(withData, line)
			}
		}
	}
	if len(plain) > 0 {
		t.Errorf("%d packets to B's app port (plaintext between mesh pods), %d with payload; first: %s", len(plain), len(withData), plain[0])
	}
	if n := strings.Count(dump, restartCanary); n > 0 {
		t.Errorf("the canary is in clear on the wire %d times", n)
	}
	if hb := fmt.Sprintf("%s.%d", b.IPv4, meshconst.InboundHBONEPort); !strings.Contains(dump, hb) {
		t.Errorf("the capture has no HBONE connection to %s", hb)
	}
}

// canaryLoad is pod A's client: a connection attempt every 10 ms, each in
// its own goroutine with a bounded lifetime.
type canaryLoad struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	ok     atomic.Int64
	failed atomic.Int64
	// lastOK is the start time (UnixNano) of the latest attempt that got
	// its echo back with A's IP in the greeting.
	lastOK atomic.Int64
	errMu  sync.Mutex
	errs   []string // a few unexpected answers (wrong greeting)
}

type loadStats struct{ ok, failed int64 }

func startCanaryLoad(t *testing.T, from *nettest.Pod, addr, greeting string) *canaryLoad {
	ctx, cancel := context.WithCancel(context.Background())
	l := &canaryLoad{cancel: cancel}
	l.wg.Go(func() {
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			l.wg.Go(func() { l.attempt(ctx, from, addr, greeting) })
		}
	})
	t.Cleanup(func() { l.stop() })
	return l
}

// attempt connects, writes the canary before reading anything (so that a
// passed-through connection would carry it in clear), then expects the
// app's greeting and the canary's echo.
func (l *canaryLoad) attempt(ctx context.Context, from *nettest.Pod, addr, greeting string) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	c, err := from.Dial(ctx, "tcp", addr)
	if err != nil {
		l.failed.Add(1)
		return
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	r := bufio.NewReader(c)
	_, err = io.WriteString(c, restartCanary+"\n")
	var g, echo string
	if err == nil {
		g, err = r.ReadString('\n')
	}
	if err == nil {
		echo, err = r.ReadString('\n')
	}
	if err != nil {
		l.failed.Add(1)
		return
	}
	if strings.TrimSpace(g) != greeting || strings.TrimSpace(echo) != restartCanary {
		l.failed.Add(1)
		l.errMu.Lock()
		if len(l.errs) < 5 {
			l.errs = append(l.errs, fmt.Sprintf("greeting %q echo %q", g, echo))
		}
		l.errMu.Unlock()
		return
	}
	l.ok.Add(1)
	for {
		last := l.lastOK.Load()
		if start.UnixNano() <= last || l.lastOK.CompareAndSwap(last, start.UnixNano()) {
			return
		}
	}
}

// waitSuccessAfter waits until an attempt started after t0 succeeded.
func (l *canaryLoad) waitSuccessAfter(t *testing.T, t0 time.Time, what string, p *nodeProcess) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for l.lastOK.Load() <= t0.UnixNano() {
		if p.exited() {
			t.Fatalf("%s: the proxy exited: %v\n%s", what, p.Err(), p.tail(20))
		}
		if time.Now().After(deadline) {
			l.errMu.Lock()
			defer l.errMu.Unlock()
			t.Fatalf("timed out waiting for %s (%d ok, %d failed, odd answers %v); proxy log:\n%s", what, l.ok.Load(), l.failed.Load(), l.errs, p.tail(30))
		}
		time.Sleep(10 * time.Millisecond)
	}
	l.errMu.Lock()
	defer l.errMu.Unlock()
	if len(l.errs) > 0 {
		t.Fatalf("unexpected answers: %v", l.errs)
	}
}

// stop ends the load and waits for every attempt; it is idempotent.
func (l *canaryLoad) stop() loadStats {
	l.cancel()
	l.wg.Wait()
	return loadStats{ok: l.ok.Load(), failed: l.failed.Load()}
}

// waitProxyReady waits for the proxy's /healthz/ready (in the node netns)
// to answer 200.
func waitProxyReady(t *testing.T, node *nettest.Netns, p *nodeProcess) {
	t.Helper()
	hc := &http.Client{Timeout: time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return node.Dial(ctx, network, addr)
		},
	}}
	defer hc.CloseIdleConnections()
	agenttest.WaitFor(t, 10*time.Second, "proxy ready", func() bool {
		resp, err := hc.Get("http://127.0.0.1:15021/healthz/ready")
		if err != nil {
			return p.exited()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	if p.exited() {
		t.Fatalf("proxy exited: %v\n%s", p.Err(), p.tail(20))
	}
}

// buildBinaries builds ./cmd/<name> for each name with go build into a
// directory of the test's and returns it.
func buildBinaries(t *testing.T, names ...string) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	args := []string{"build", "-o", dir + "/"}
	for _, n := range names {
		args = append(args, "./cmd/"+n)
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return dir
}

// nodeProcess is a binary running in the node netns (netlab.Process, the
// runner the demo and the two-node tests use too).
type nodeProcess struct{ *netlab.Process }

// startNodeProcess starts bin in node, its output in a log file in dir;
// the test's cleanup stops it (SIGTERM, then SIGKILL) if it still runs.
func startNodeProcess(t *testing.T, node *nettest.Netns, dir, name, bin string, args ...string) *nodeProcess {
	t.Helper()
	p, err := netlab.StartProcess(netlab.ProcessConfig{
		Name: name, NetnsPath: node.NSPath, Bin: bin, Args: args,
		LogPath:  filepath.Join(dir, fmt.Sprintf("%s-%d.log", name, time.Now().UnixNano())),
		StopWait: 10 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if p.Exited() {
			return
		}
		if err := p.Stop(); err != nil {
			t.Error(err)
		}
		if t.Failed() {
			t.Logf("%s log (last lines):\n%s", name, p.Tail(40))
		}
	})
	return &nodeProcess{p}
}

func (p *nodeProcess) exited() bool { return p.Exited() }

// kill sends SIGKILL and waits until the process is reaped.
func (p *nodeProcess) kill(*testing.T) { p.Kill() }

func (p *nodeProcess) tail(n int) string { return p.Tail(n) }
