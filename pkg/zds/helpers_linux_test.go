//go:build linux

package zds

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/netns"
)

// Test timings: short enough to keep the package fast, long enough for a
// loaded CI machine.
const (
	testTimeout = 3 * time.Second
	testProbe   = 50 * time.Millisecond
	testRetry   = 50 * time.Millisecond
	waitLimit   = 10 * time.Second
)

// testLogger logs into the test's output, shown on failure or with -v.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: opens network namespaces and creates them with ip netns")
	}
}

// sockPath returns a short socket path in a fresh directory removed at
// cleanup (sun_path is limited to 108 bytes).
func sockPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "zds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "z.sock")
}

func randSuffix(t *testing.T) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// newNetns creates a named network namespace, removed at cleanup, and
// returns its path.
func newNetns(t *testing.T) string {
	t.Helper()
	name := "zds-" + randSuffix(t)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	return "/var/run/netns/" + name
}

// openFile opens path for the test, closed at cleanup.
func openFile(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func opener(path string) func() (*os.File, error) {
	return func() (*os.File, error) { return os.Open(path) }
}

func nsID(t *testing.T, path string) netns.ID {
	t.Helper()
	ns, err := netns.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	id, err := ns.ID()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// checkNoFDLeak fails the test, at cleanup, when more descriptors are
// open than when it was called. Register it first so that it runs last.
func checkNoFDLeak(t *testing.T) {
	t.Helper()
	before := countFDs(t)
	t.Cleanup(func() {
		// Closing is synchronous, but give goroutines that are returning
		// from Run/Serve a moment.
		var after int
		for deadline := time.Now().Add(waitLimit); ; time.Sleep(10 * time.Millisecond) {
			if after = countFDs(t); after <= before || time.Now().After(deadline) {
				break
			}
		}
		if after > before {
			t.Errorf("fd leak: %d open before, %d after", before, after)
		}
	})
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(waitLimit); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// fakeHandler is a Handler that records what it was asked and can be told
// to fail.
type fakeHandler struct {
	mu         sync.Mutex
	running    map[string]netns.ID
	adds       map[string]int
	dels       map[string]int
	keeps      []string
	reconciles []map[string]bool
	failAdds   map[string]int // uid -> how many more AddWorkload calls fail
	addErr     error
}

func newFakeHandler() *fakeHandler {
	return &fakeHandler{running: map[string]netns.ID{}, adds: map[string]int{}, dels: map[string]int{}, failAdds: map[string]int{}}
}

func (h *fakeHandler) AddWorkload(uid string, info WorkloadInfo, f *os.File) error {
	// Prove that the descriptor received really is a usable netns.
	ns, err := netns.FromFd(int(f.Fd()))
	if err != nil {
		return fmt.Errorf("fake handler: %w", err)
	}
	defer ns.Close()
	id, err := ns.ID()
	if err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.adds[uid]++
	if h.failAdds[uid] > 0 {
		h.failAdds[uid]--
		return h.addErr
	}
	if info.Name == "" {
		return errors.New("fake handler: no workload name")
	}
	h.running[uid] = id
	return nil
}

func (h *fakeHandler) KeepWorkload(uid string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.keeps = append(h.keeps, uid)
}

func (h *fakeHandler) DelWorkload(uid string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.dels[uid]++
	delete(h.running, uid)
	return nil
}

func (h *fakeHandler) Reconcile(keep map[string]bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.reconciles = append(h.reconciles, keep)
	for uid := range h.running {
		if !keep[uid] {
			delete(h.running, uid)
		}
	}
}

func (h *fakeHandler) isRunning(uid string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.running[uid]
	return ok
}

func (h *fakeHandler) runningID(uid string) netns.ID {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.running[uid]
}

func (h *fakeHandler) count(m map[string]int, uid string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return m[uid]
}

func (h *fakeHandler) reconcileCount() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.reconciles)
}

// podList is a SnapshotSource the test can change.
type podList struct {
	mu   sync.Mutex
	pods []Pod
}

func (l *podList) set(pods ...Pod) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.pods = pods
}

func (l *podList) Snapshot(context.Context) ([]Pod, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Pod(nil), l.pods...), nil
}

func info(name string) WorkloadInfo {
	return WorkloadInfo{Name: name, Namespace: "default", ServiceAccount: "sa-" + name}
}

// startServer runs a server until the test ends; cleanup checks that
// Serve returned nil.
func startServer(t *testing.T, path string, src SnapshotSource) (*Server, context.CancelFunc) {
	t.Helper()
	s, err := NewServer(ServerConfig{Path: path, Snapshot: src, Timeout: testTimeout, ProbeInterval: testProbe, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	stop := sync.OnceFunc(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	t.Cleanup(stop)
	return s, stop
}

// startClient runs a client until the test ends; the returned channel
// yields Run's result.
func startClient(t *testing.T, path string, h Handler) (*Client, <-chan error, context.CancelFunc) {
	t.Helper()
	return startClientConfig(t, ClientConfig{
		Path: path, Handler: h, Timeout: testTimeout, RetryInterval: testRetry, Logger: testLogger(t),
		MinBackoff: 5 * time.Millisecond, MaxBackoff: 100 * time.Millisecond,
	})
}

// startClientConfig is startClient with a configuration of its own.
func startClientConfig(t *testing.T, cfg ClientConfig) (*Client, <-chan error, context.CancelFunc) {
	t.Helper()
	c, err := NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	exited := make(chan struct{})
	go func() {
		done <- c.Run(ctx)
		close(exited)
	}()
	t.Cleanup(func() {
		cancel()
		<-exited
	})
	return c, done, cancel
}

// rawPeer is one end of a SOCK_SEQPACKET connection driven with plain
// syscalls, to play the other implementation byte for byte.
type rawPeer struct {
	t  *testing.T
	fd int
}

func setRecvTimeout(t *testing.T, fd int) {
	t.Helper()
	tv := unix.NsecToTimeval(waitLimit.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
}

func rawSocket(t *testing.T) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	setRecvTimeout(t, fd)
	return fd
}

// rawListen listens at path like istio-cni would; the returned function
// accepts one connection.
func rawListen(t *testing.T, path string) func() *rawPeer {
	t.Helper()
	lfd := rawSocket(t)
	t.Cleanup(func() { unix.Close(lfd) })
	if err := unix.Bind(lfd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(lfd, 8); err != nil {
		t.Fatal(err)
	}
	return func() *rawPeer {
		t.Helper()
		fd, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		for err == unix.EINTR { // SO_RCVTIMEO: not restarted after a signal (see recvmsg)
			fd, _, err = unix.Accept4(lfd, unix.SOCK_CLOEXEC)
		}
		if err != nil {
			t.Fatalf("accept: %v", err)
		}
		setRecvTimeout(t, fd)
		p := &rawPeer{t: t, fd: fd}
		t.Cleanup(p.close)
		return p
	}
}

// rawDial connects to path like ztunnel would.
func rawDial(t *testing.T, path string) *rawPeer {
	t.Helper()
	fd := rawSocket(t)
	p := &rawPeer{t: t, fd: fd}
	t.Cleanup(p.close)
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		t.Fatalf("connect %s: %v", path, err)
	}
	return p
}

func (p *rawPeer) close() {
	if p.fd >= 0 {
		unix.Close(p.fd)
		p.fd = -1
	}
}

func (p *rawPeer) send(b []byte, files ...*os.File) {
	p.t.Helper()
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	if err := unix.Sendmsg(p.fd, b, oob, nil, 0); err != nil {
		p.t.Fatalf("sendmsg: %v", err)
	}
}

// recv reads one datagram; it fails the test on timeout or when a
// descriptor came with it.
func (p *rawPeer) recv() []byte {
	p.t.Helper()
	buf := make([]byte, 4096)
	oob := make([]byte, 256)
	n, oobn, _, _, err := recvmsg(p.fd, buf, oob)
	if err != nil {
		p.t.Fatalf("recvmsg: %v", err)
	}
	if oobn != 0 {
		p.t.Fatalf("unexpected control data (%d bytes)", oobn)
	}
	return buf[:n]
}

// expectAck reads one response and returns its Ack.error.
func (p *rawPeer) expectAck() string {
	p.t.Helper()
	b := p.recv()
	var r WorkloadResponse
	if err := r.Unmarshal(b); err != nil {
		p.t.Fatalf("response % x: %v", b, err)
	}
	return r.Ack.Error
}

// expectEOF checks that the other end closed the connection.
func (p *rawPeer) expectEOF() {
	p.t.Helper()
	buf := make([]byte, 4096)
	n, _, _, _, err := recvmsg(p.fd, buf, nil)
	if err != nil || n != 0 {
		p.t.Fatalf("want EOF, got %d bytes (% x), %v", n, buf[:n], err)
	}
}
