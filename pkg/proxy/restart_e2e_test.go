//go:build linux

package proxy

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
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
	m := newMeshNode(t, 2)
	m.startAgent()
	node := m.lab.Node
	proxy := m.startProxy(0)

	// UIDs sort A before B: the agent's snapshot adds A first.
	a, b := m.lab.Pod(0), m.lab.Pod(1)
	id := agenttest.RandomID()
	m.enroll(0, "a-"+id)
	m.enroll(1, "b-"+id)
	m.app(1, "b")

	capture := m.capture()
	load := startCanaryLoad(t, a, fmt.Sprintf("%s:%d", b.IPv4, nettest.AppPort), "app b peer="+a.IPv4.String())
	load.waitSuccessAfter(t, time.Now(), "first connection through the proxy", proxy)

	t0 := time.Now()
	for i := range restarts {
		proxy.kill(t)
		started := time.Now()
		proxy = m.startProxy(0)
		load.waitSuccessAfter(t, started, fmt.Sprintf("a connection after restart %d", i+1), proxy)
		waitProxyReady(t, node, proxy)
	}
	stats := load.stop()
	t.Logf("%d restarts in %v: %d connections succeeded, %d failed (while the proxy was down or starting)",
		restarts, time.Since(t0).Round(time.Millisecond), stats.ok, stats.failed)
	assertNoPlaintext(t, capture.stop(t), b.IPv4.String())
}

// canaryLoad is pod A's client: a connection attempt every -load-interval
// (10 ms), each in its own goroutine with a bounded lifetime.
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
	fails  []string // the first few failures, for the log
	// dialResets are the start times of attempts whose connect was
	// reset (ECONNRESET): what a listener closed with the connection
	// still in its accept queue does.
	dialResets []time.Time
}

type loadStats struct{ ok, failed int64 }

func startCanaryLoad(t *testing.T, from *nettest.Pod, addr, greeting string) *canaryLoad {
	ctx, cancel := context.WithCancel(context.Background())
	l := &canaryLoad{cancel: cancel}
	l.wg.Go(func() {
		tick := time.NewTicker(*loadInterval)
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
func (l *canaryLoad) attempt(parent context.Context, from *nettest.Pod, addr, greeting string) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(parent, 3*time.Second)
	defer cancel()
	// An attempt that stop interrupted neither failed nor succeeded.
	fail := func(err error) {
		if parent.Err() == nil {
			l.fail(start, err)
		}
	}
	c, err := from.Dial(ctx, "tcp", addr)
	if err != nil {
		if errors.Is(err, syscall.ECONNRESET) && parent.Err() == nil {
			l.errMu.Lock()
			l.dialResets = append(l.dialResets, start)
			l.errMu.Unlock()
		}
		fail(err)
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
		fail(err)
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

// fail counts a failed attempt and keeps the first few for the log.
func (l *canaryLoad) fail(start time.Time, err error) {
	l.failed.Add(1)
	l.errMu.Lock()
	defer l.errMu.Unlock()
	if len(l.fails) < 5 {
		l.fails = append(l.fails, fmt.Sprintf("%s: %v", start.Format("15:04:05.000"), err))
	}
}

// failures returns the first few failures.
func (l *canaryLoad) failures() []string {
	l.errMu.Lock()
	defer l.errMu.Unlock()
	return append([]string(nil), l.fails...)
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

// waitProxyReady waits for the proxy's /healthz/ready (in the node netns,
// on 127.0.0.1:15021) to answer 200.
func waitProxyReady(t *testing.T, node *nettest.Netns, p *nodeProcess) {
	t.Helper()
	waitProxyReadyAt(t, node, p, "127.0.0.1:15021")
}

// waitProxyReadyAt is waitProxyReady for a proxy whose readiness is on addr.
func waitProxyReadyAt(t *testing.T, node *nettest.Netns, p *nodeProcess, addr string) {
	t.Helper()
	hc := &http.Client{Timeout: time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return node.Dial(ctx, network, addr)
		},
	}}
	defer hc.CloseIdleConnections()
	// 30 s, not less: under the kernel matrix's emulated guests a second
	// proxy starting next to a loaded first one took more than 10 s.
	agenttest.WaitFor(t, 30*time.Second, "proxy ready", func() bool {
		resp, err := hc.Get("http://" + addr + "/healthz/ready")
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

// loadInterval is how often the canary load opens a connection: the
// issue's 10 ms by default; the kernel matrix, whose guests are emulated,
// asks for fewer.
var loadInterval = flag.Duration("load-interval", 10*time.Millisecond, "how often the fault tests' canary load opens a connection")

// binCache holds the binaries built for this test binary: each is built
// once, the first time a test asks for it, and removed by TestMain.
var binCache struct {
	mu    sync.Mutex
	dir   string
	built map[string]bool
}

// binDirEnv names a directory of binaries built beforehand (by the kernel
// matrix, whose guests would build slowly): buildBinaries then builds
// nothing and returns it. Not AMBPF_: the agent refuses unknown AMBPF_
// variables, and its children inherit the test's environment.
const binDirEnv = "AMBPFTEST_BIN_DIR"

// testHooksTag is the build tag of the agent's test hooks (pkg/agent
// testhook_on.go); buildBinaries names such a binary <name>.<tag>.
const testHooksTag = "ambpf_testhooks"

// buildBinaries builds ./cmd/<name> for each name with go build (once per
// test binary) and returns the directory that holds them. A name
// "<cmd>.<tag>" is ./cmd/<cmd> built with -tags <tag>.
func buildBinaries(t *testing.T, names ...string) string {
	t.Helper()
	if dir := os.Getenv(binDirEnv); dir != "" {
		return dir
	}
	binCache.mu.Lock()
	defer binCache.mu.Unlock()
	if binCache.dir == "" {
		dir, err := os.MkdirTemp("", "ambpf-bins-")
		if err != nil {
			t.Fatal(err)
		}
		binCache.dir, binCache.built = dir, map[string]bool{}
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	build := func(args ...string) {
		cmd := exec.Command("go", append([]string{"build"}, args...)...)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build: %v\n%s", err, out)
		}
	}
	args := []string{"-o", binCache.dir + "/"}
	var todo []string
	for _, n := range names {
		if binCache.built[n] {
			continue
		}
		if cmd, tag, tagged := strings.Cut(n, "."); tagged {
			build("-tags", tag, "-o", filepath.Join(binCache.dir, n), "./cmd/"+cmd)
			binCache.built[n] = true
			continue
		}
		args = append(args, "./cmd/"+n)
		todo = append(todo, n)
	}
	if len(todo) > 0 {
		build(args...)
	}
	for _, n := range todo {
		binCache.built[n] = true
	}
	return binCache.dir
}

// TestMain removes the built binaries after the tests. The test binary
// is also the pods' socket factory (netlab.SocketFactory).
func TestMain(m *testing.M) {
	if netlab.IsSocketFactory() {
		os.Exit(netlab.ServeSocketFactory())
	}
	code := m.Run()
	if binCache.dir != "" {
		os.RemoveAll(binCache.dir)
	}
	os.Exit(code)
}

// nodeProcess is a binary running in the node netns (netlab.Process, the
// runner the demo and the two-node tests use too).
type nodeProcess struct{ *netlab.Process }

// startNodeProcess starts bin in node, its output in a log file in dir;
// the test's cleanup stops it (SIGTERM, then SIGKILL) if it still runs.
func startNodeProcess(t *testing.T, node *nettest.Netns, dir, name, bin string, args ...string) *nodeProcess {
	t.Helper()
	return startNodeProcessEnv(t, node, dir, name, bin, nil, args...)
}

// startNodeProcessEnv is startNodeProcess with env added to the test's
// environment.
func startNodeProcessEnv(t *testing.T, node *nettest.Netns, dir, name, bin string, env []string, args ...string) *nodeProcess {
	t.Helper()
	return startNodeProcessIn(t, node, "", dir, name, bin, env, args...)
}

// startNodeProcessIn is startNodeProcessEnv in the cgroup v2 directory
// cgroupDir (the caller's cgroup when empty), as a container runs in its
// own.
func startNodeProcessIn(t *testing.T, node *nettest.Netns, cgroupDir, dir, name, bin string, env []string, args ...string) *nodeProcess {
	t.Helper()
	p, err := netlab.StartProcess(netlab.ProcessConfig{
		Name: name, NetnsPath: node.NSPath, CgroupDir: cgroupDir, Bin: bin, Args: args, Env: env,
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

// dialResetsNear counts the attempts reset at connect that started
// within d of t.
func (l *canaryLoad) dialResetsNear(t time.Time, d time.Duration) int {
	l.errMu.Lock()
	defer l.errMu.Unlock()
	n := 0
	for _, s := range l.dialResets {
		if s.Sub(t).Abs() <= d {
			n++
		}
	}
	return n
}
