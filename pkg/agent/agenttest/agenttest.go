//go:build linux

// Package agenttest runs a real agent and a stand-in proxy for tests of
// the agent, the CNI plugin and ambpfctl: the agent on a private bpffs
// mount with its sockets and state in a temporary directory, and a proxy
// that speaks ZDS through a real zds.Client and starts a pkg/testproxy
// instance inside each pod it is given.
package agenttest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/agent"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/testproxy"
	"github.com/ambpf/ambpf/pkg/zds"
)

// RequireRoot skips the test when not running as root.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root: network namespaces, BPF programs and a bpffs mount")
	}
}

// RandomID returns 8 random hex characters for unique names.
func RandomID() string {
	var b [4]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Env is where agents of one test live: a private bpffs mount and a
// directory for the state and sockets. Agents started from the same Env
// share them, as a restarted agent does.
type Env struct {
	Dir    string
	Config agent.Config
	Client *agentapi.Client
}

// NewEnv mounts a private bpffs and prepares the directories; the agent
// config has probe SNAT off (see agent.Config.NoProbeSNAT). Its cleanup
// detaches whatever pod is still pinned and unmounts (which releases
// probe SNAT pins too).
func NewEnv(tb testing.TB) *Env {
	tb.Helper()
	RequireRoot(tb)
	// Short: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "ambpf-agt-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	bpffs := filepath.Join(dir, "bpffs")
	if err := os.Mkdir(bpffs, 0o700); err != nil {
		tb.Fatal(err)
	}
	if err := unix.Mount("bpf", bpffs, "bpf", 0, "mode=0700"); err != nil {
		tb.Fatalf("mount bpffs: %v", err)
	}
	e := &Env{Dir: dir, Config: agent.Config{
		BPFRoot:   filepath.Join(bpffs, "ambpf"),
		StateDir:  filepath.Join(dir, "state"),
		ZDSPath:   filepath.Join(dir, "zds.sock"),
		APISocket: filepath.Join(dir, "agent.sock"),
		ReadyAddr: agent.ReadyOff,
		// Off: the test process is not in the node netns of a test's
		// topology, and probe SNAT must never touch the host's devices.
		// A test that wants it sets NodeNetns and turns it back on.
		NoProbeSNAT: true,
		RetryMin:    50 * time.Millisecond,
		RetryMax:    500 * time.Millisecond,
		Logger:      slog.New(slog.NewTextHandler(testWriter{tb}, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}}
	e.Client = agentapi.NewClient(e.Config.APISocket)
	tb.Cleanup(func() {
		if l, err := datapath.New(datapath.Config{Root: e.Config.BPFRoot, Logger: slog.New(slog.DiscardHandler)}); err == nil {
			pods, _ := l.List()
			for _, p := range pods {
				l.Detach(p.UID)
			}
		}
		if err := unix.Unmount(bpffs, unix.MNT_DETACH); err != nil {
			tb.Errorf("unmount bpffs: %v", err)
		}
	})
	return e
}

// testWriter sends log lines to the test log, and drops them once the
// test is over (a late line from a stopping goroutine would panic).
type testWriter struct{ tb testing.TB }

var logMu sync.Mutex

func (w testWriter) Write(p []byte) (int, error) {
	logMu.Lock()
	defer logMu.Unlock()
	defer func() { recover() }()
	w.tb.Logf("%s", p)
	return len(p), nil
}

// PinnedUIDs lists the pods pinned under the Env's bpffs.
func (e *Env) PinnedUIDs(tb testing.TB) []string {
	tb.Helper()
	entries, err := os.ReadDir(filepath.Join(e.Config.BPFRoot, "pods"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		tb.Fatal(err)
	}
	var out []string
	for _, en := range entries {
		out = append(out, en.Name())
	}
	return out
}

// Agent is a running agent.
type Agent struct {
	*agent.Agent
	cancel context.CancelFunc
	done   chan error
}

// Start runs an agent on the Env and waits until its API answers ready.
// The test's cleanup stops it if Stop was not called.
func (e *Env) Start(tb testing.TB) *Agent {
	tb.Helper()
	a, err := agent.New(e.Config)
	if err != nil {
		tb.Fatalf("agent.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Agent{Agent: a, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- a.Run(ctx) }()
	tb.Cleanup(func() { r.Stop(tb) })
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := e.Client.Status(context.Background())
		if err == nil && st.Ready {
			return r
		}
		select {
		case err := <-r.done:
			r.done <- err
			tb.Fatalf("agent stopped while starting: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			tb.Fatalf("agent not ready after 20s: %v", err)
		}
	}
}

// Stop stops the agent and checks that Run returned nil. It is idempotent.
func (r *Agent) Stop(tb testing.TB) {
	tb.Helper()
	r.cancel()
	select {
	case err, ok := <-r.done:
		if ok && err != nil {
			tb.Errorf("agent Run: %v", err)
		}
		if ok {
			close(r.done)
		}
	case <-time.After(20 * time.Second):
		tb.Errorf("agent did not stop within 20s")
	}
}

// Proxy is a stand-in for the in-pod proxy: a zds.Client whose handler
// starts a testproxy inside each pod it is given. Its pod proxies outlive
// its connection, as ztunnel's do.
type Proxy struct {
	client *zds.Client
	cancel context.CancelFunc
	done   chan error

	mu        sync.Mutex
	pods      map[string]*podProxy
	addHook   func(uid string) error
	adds      []string
	dels      []string
	snapshots []map[string]bool
}

type podProxy struct {
	ns   *netns.NS
	tp   *testproxy.Proxy
	info zds.WorkloadInfo // of the pod's last Add
}

// NewProxy prepares a proxy for the ZDS socket at path; Connect runs it.
// Its cleanup stops it and closes every pod proxy.
func NewProxy(tb testing.TB, path string) *Proxy {
	tb.Helper()
	p := &Proxy{pods: map[string]*podProxy{}}
	c, err := zds.NewClient(zds.ClientConfig{
		Path: path, Handler: (*handler)(p),
		Logger:     slog.New(slog.NewTextHandler(testWriter{tb}, nil)),
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 100 * time.Millisecond,
		RetryInterval: time.Second,
	})
	if err != nil {
		tb.Fatal(err)
	}
	p.client = c
	tb.Cleanup(func() {
		p.Disconnect()
		p.mu.Lock()
		defer p.mu.Unlock()
		for uid, pp := range p.pods {
			pp.close()
			delete(p.pods, uid)
		}
	})
	return p
}

// Connect starts the client's Run loop (it connects, and reconnects with
// backoff). Disconnect stops it; the pod proxies keep running.
func (p *Proxy) Connect() {
	ctx, cancel := context.WithCancel(context.Background())
	p.cancel, p.done = cancel, make(chan error, 1)
	go func() { p.done <- p.client.Run(ctx) }()
}

// Disconnect stops the Run loop and waits for it.
func (p *Proxy) Disconnect() {
	if p.cancel == nil {
		return
	}
	p.cancel()
	<-p.done
	p.cancel = nil
}

// Ready is the client's readiness: a snapshot received, nothing pending.
func (p *Proxy) Ready() bool { return p.client.Ready() }

// SetAddHook sets a function called at the start of every AddWorkload; a
// non-nil error is sent as the nack.
func (p *Proxy) SetAddHook(fn func(uid string) error) {
	p.mu.Lock()
	p.addHook = fn
	p.mu.Unlock()
}

// Running lists the pods with a running pod proxy, sorted.
func (p *Proxy) Running() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for uid := range p.pods {
		out = append(out, uid)
	}
	sort.Strings(out)
	return out
}

// Pod returns the test proxy running for uid, or nil.
func (p *Proxy) Pod(uid string) *testproxy.Proxy {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pp := p.pods[uid]; pp != nil {
		return pp.tp
	}
	return nil
}

// Info returns the WorkloadInfo of uid's last Add (false when the proxy
// runs no pod uid).
func (p *Proxy) Info(uid string) (zds.WorkloadInfo, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pp := p.pods[uid]
	if pp == nil {
		return zds.WorkloadInfo{}, false
	}
	return pp.info, true
}

// Snapshots returns the keep sets of every snapshot reconciled so far.
func (p *Proxy) Snapshots() []map[string]bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]map[string]bool(nil), p.snapshots...)
}

// Dels returns the uids of every DelWorkload so far.
func (p *Proxy) Dels() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.dels...)
}

// WaitFor polls cond every 20 ms until it holds or timeout passes.
func WaitFor(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (pp *podProxy) close() error {
	return errors.Join(pp.tp.Close(), pp.ns.Close())
}

// handler is the zds.Handler of a Proxy.
type handler Proxy

func (h *handler) AddWorkload(uid string, info zds.WorkloadInfo, f *os.File) error {
	h.mu.Lock()
	hook := h.addHook
	h.mu.Unlock()
	if hook != nil {
		if err := hook(uid); err != nil {
			return err
		}
	}
	ns, err := netns.FromFd(int(f.Fd()))
	if err != nil {
		return err
	}
	// Without splice when the agent says the fast path may redirect the
	// pod's sockets, as ambpf-proxy reads them then; without SO_REUSEPORT
	// when the agent says the kernel refuses it, as ambpf-proxy listens.
	tp, err := testproxy.Start(ns, testproxy.Options{DNS: true, NoSplice: info.FastPath, NoReusePort: info.ReusePort == zds.ReusePortRefused})
	if err != nil {
		ns.Close()
		return fmt.Errorf("start test proxy: %w", err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if old := h.pods[uid]; old != nil {
		old.close()
	}
	h.pods[uid] = &podProxy{ns: ns, tp: tp, info: info}
	h.adds = append(h.adds, uid)
	return nil
}

func (h *handler) KeepWorkload(string) {}

func (h *handler) DelWorkload(uid string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.dels = append(h.dels, uid)
	if pp := h.pods[uid]; pp != nil {
		delete(h.pods, uid)
		return pp.close()
	}
	return nil
}

func (h *handler) Reconcile(keep map[string]bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.snapshots = append(h.snapshots, keep)
	for uid, pp := range h.pods {
		if !keep[uid] {
			pp.close()
			delete(h.pods, uid)
		}
	}
}
