//go:build linux

package zds

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

const selfNetns = "/proc/self/ns/net"

// TestConformance runs the whole sequence between our server and client:
// hello, a snapshot with an Add and a Keep, reconcile, then Add and Del.
func TestConformance(t *testing.T) {
	requireRoot(t)
	checkNoFDLeak(t)
	path := sockPath(t)
	otherNs := newNetns(t)
	src := &podList{}
	src.set(
		Pod{UID: "a", Info: info("a"), OpenNetns: opener(selfNetns)},
		Pod{UID: "k", Info: info("k")}, // netns unavailable: Keep
		Pod{UID: "e", Info: info("e"), OpenNetns: func() (*os.File, error) { return nil, os.ErrNotExist }},
	)
	srv, _ := startServer(t, path, src)
	h := newFakeHandler()
	cl, _, _ := startClient(t, path, h)

	waitFor(t, "snapshot acked", srv.Ready)
	waitFor(t, "client ready", cl.Ready)
	if st := srv.Status(); st != (Status{Connections: 1, Synced: 1}) {
		t.Errorf("status %+v", st)
	}
	if !h.isRunning("a") || h.runningID("a") != nsID(t, selfNetns) {
		t.Errorf("pod a not running in its netns: %+v", h.running)
	}
	h.mu.Lock()
	if !reflect.DeepEqual(h.keeps, []string{"k", "e"}) {
		t.Errorf("keeps %v, want [k e]", h.keeps)
	}
	if want := []map[string]bool{{"a": true, "k": true, "e": true}}; !reflect.DeepEqual(h.reconciles, want) {
		t.Errorf("reconciles %v, want %v", h.reconciles, want)
	}
	h.mu.Unlock()

	ctx := context.Background()
	if err := srv.Add(ctx, "b", info("b"), openFile(t, otherNs)); err != nil {
		t.Fatalf("add b: %v", err)
	}
	if h.runningID("b") != nsID(t, otherNs) {
		t.Errorf("pod b runs in %+v, want its own netns", h.runningID("b"))
	}
	// Same UID, same netns: nothing to do.
	if err := srv.Add(ctx, "a", info("a"), openFile(t, selfNetns)); err != nil {
		t.Fatalf("re-add a: %v", err)
	}
	if n := h.count(h.adds, "a"); n != 1 {
		t.Errorf("AddWorkload(a) called %d times, want 1 (same netns is a no-op)", n)
	}
	// Same UID, another netns: replaced.
	if err := srv.Add(ctx, "a", info("a"), openFile(t, otherNs)); err != nil {
		t.Fatalf("replace a: %v", err)
	}
	if h.count(h.dels, "a") != 1 || h.count(h.adds, "a") != 2 || h.runningID("a") != nsID(t, otherNs) {
		t.Errorf("replace: dels %d adds %d id %+v", h.count(h.dels, "a"), h.count(h.adds, "a"), h.runningID("a"))
	}
	if err := srv.Del(ctx, "b"); err != nil {
		t.Fatalf("del b: %v", err)
	}
	if h.isRunning("b") {
		t.Error("pod b still running after Del")
	}
	// Del of a pod the proxy does not run is acked.
	if err := srv.Del(ctx, "nope"); err != nil {
		t.Errorf("del unknown: %v", err)
	}
}

// TestReconnectReconcile restarts the agent while a pod is removed; the
// client reconnects and the new snapshot tears the pod down, while a pod
// sent again with the same netns is not restarted.
func TestReconnectReconcile(t *testing.T) {
	checkNoFDLeak(t)
	path := sockPath(t)
	src := &podList{}
	src.set(
		Pod{UID: "a", Info: info("a"), OpenNetns: opener(selfNetns)},
		Pod{UID: "b", Info: info("b"), OpenNetns: opener(selfNetns)},
	)
	srv, stopSrv := startServer(t, path, src)
	h := newFakeHandler()
	startClient(t, path, h)
	waitFor(t, "first snapshot", srv.Ready)
	waitFor(t, "a and b running", func() bool { return h.isRunning("a") && h.isRunning("b") })

	stopSrv()
	src.set(Pod{UID: "a", Info: info("a"), OpenNetns: opener(selfNetns)})
	srv2, _ := startServer(t, path, src)
	waitFor(t, "second snapshot", srv2.Ready)
	waitFor(t, "second reconcile", func() bool { return h.reconcileCount() == 2 })
	if h.isRunning("b") {
		t.Error("pod b removed while disconnected is still running")
	}
	if !h.isRunning("a") || h.count(h.adds, "a") != 1 {
		t.Errorf("pod a: running %v, AddWorkload called %d times, want running and once", h.isRunning("a"), h.count(h.adds, "a"))
	}
}

// TestAddNewestDelAll connects two proxies (an upgrade): Add reaches only
// the newer one, Del reaches both.
func TestAddNewestDelAll(t *testing.T) {
	path := sockPath(t)
	src := &podList{}
	src.set(Pod{UID: "p", Info: info("p"), OpenNetns: opener(selfNetns)})
	srv, _ := startServer(t, path, src)
	old, neu := newFakeHandler(), newFakeHandler()
	startClient(t, path, old)
	waitFor(t, "old proxy synced", func() bool { return srv.Status().Synced == 1 })
	startClient(t, path, neu)
	waitFor(t, "new proxy synced", func() bool { return srv.Status().Synced == 2 })

	ctx := context.Background()
	if err := srv.Add(ctx, "x", info("x"), openFile(t, selfNetns)); err != nil {
		t.Fatalf("add: %v", err)
	}
	if !neu.isRunning("x") || old.count(old.adds, "x") != 0 {
		t.Errorf("add x: newest runs it %v, oldest was asked %d times", neu.isRunning("x"), old.count(old.adds, "x"))
	}
	if err := srv.Del(ctx, "p"); err != nil {
		t.Fatalf("del: %v", err)
	}
	if old.isRunning("p") || neu.isRunning("p") || old.count(old.dels, "p") != 1 || neu.count(neu.dels, "p") != 1 {
		t.Errorf("del p did not reach both proxies")
	}
}

// TestHandlerErrorNacks checks that a pod proxy that fails to start is
// nacked with the handler's text, keeps the client not ready, and is
// retried until it starts.
func TestHandlerErrorNacks(t *testing.T) {
	checkNoFDLeak(t)
	path := sockPath(t)
	srv, _ := startServer(t, path, &podList{})
	h := newFakeHandler()
	h.addErr = errors.New("listen [::]:15008: address already in use")
	h.failAdds["f"] = 3
	cl, _, _ := startClient(t, path, h)
	waitFor(t, "client ready", cl.Ready)

	err := srv.Add(context.Background(), "f", info("f"), openFile(t, selfNetns))
	var nack *NackError
	if !errors.As(err, &nack) || nack.Reason != h.addErr.Error() || nack.UID != "f" || nack.Op != "add" {
		t.Fatalf("add: %v, want a NackError with the handler's text", err)
	}
	if cl.Ready() && !h.isRunning("f") {
		t.Error("client ready while a pod is pending")
	}
	waitFor(t, "retried add to succeed", func() bool { return h.isRunning("f") })
	waitFor(t, "client ready again", cl.Ready)
	if n := h.count(h.adds, "f"); n != 4 {
		t.Errorf("AddWorkload called %d times, want 4", n)
	}
	if st := srv.Status(); st.Connections != 1 {
		t.Errorf("connection dropped after a nack: %+v", st)
	}
}

// TestBusyAddStaysReady: an Add that fails because a port is in use
// (EADDRINUSE: another proxy holds the pod's listeners, a rolling upgrade
// without SO_REUSEPORT) is nacked but leaves the client ready, and is
// retried every BusyRetryInterval rather than every RetryInterval, so the
// pod is taken over as soon as the port is free.
func TestBusyAddStaysReady(t *testing.T) {
	checkNoFDLeak(t)
	path := sockPath(t)
	srv, _ := startServer(t, path, &podList{})
	h := newFakeHandler()
	h.addErr = fmt.Errorf("listen [::]:15008: %w", syscall.EADDRINUSE)
	h.failAdds["b"] = 3
	cl, _, _ := startClientConfig(t, ClientConfig{
		Path: path, Handler: h, Timeout: testTimeout, Logger: testLogger(t),
		RetryInterval: time.Hour, BusyRetryInterval: 20 * time.Millisecond,
	})
	waitFor(t, "client ready", cl.Ready)

	var nack *NackError
	if err := srv.Add(context.Background(), "b", info("b"), openFile(t, selfNetns)); !errors.As(err, &nack) {
		t.Fatalf("add: %v, want a nack", err)
	}
	if !cl.Ready() {
		t.Error("client not ready while the only pending pod waits for another proxy's ports")
	}
	start := time.Now()
	waitFor(t, "the busy add retried until it starts", func() bool { return h.isRunning("b") })
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("the busy add took %v to be retried 3 times", d)
	}
	if n := h.count(h.adds, "b"); n != 4 {
		t.Errorf("AddWorkload called %d times, want 4", n)
	}
}

// TestServerNoConnection: Add with no proxy fails with ErrNoConnection,
// Del succeeds.
func TestServerNoConnection(t *testing.T) {
	path := sockPath(t)
	srv, _ := startServer(t, path, &podList{})
	ctx := context.Background()
	if err := srv.Add(ctx, "a", info("a"), openFile(t, selfNetns)); !errors.Is(err, ErrNoConnection) {
		t.Errorf("add: %v, want ErrNoConnection", err)
	}
	if err := srv.Del(ctx, "a"); err != nil {
		t.Errorf("del: %v", err)
	}
}

// TestServerRemovesStaleSocket: a socket file left behind by a dead agent
// does not stop a new one from listening.
func TestServerRemovesStaleSocket(t *testing.T) {
	path := sockPath(t)
	fd := rawSocket(t)
	p := &rawPeer{t: t, fd: fd}
	t.Cleanup(p.close)
	if err := bindRaw(fd, path); err != nil {
		t.Fatal(err)
	}
	p.close() // the file stays
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("stale socket not there: %v", err)
	}
	srv, stop := startServer(t, path, &podList{})
	rawDial(t, srv.Path())
	stop()
}

// TestServerRawProxy plays ztunnel byte for byte against the server.
func TestServerRawProxy(t *testing.T) {
	checkNoFDLeak(t)
	path := sockPath(t)
	src := &podList{}
	src.set(Pod{UID: "u1", Info: info("a"), OpenNetns: opener(selfNetns)})
	srv, _ := startServer(t, path, src)

	t.Run("bad hello is dropped", func(t *testing.T) {
		for _, hello := range [][]byte{{0x08, 0x02}, {0xff}} {
			p := rawDial(t, path)
			p.send(hello)
			p.expectEOF()
		}
		if st := srv.Status(); st.Connections != 0 {
			t.Errorf("status %+v after bad hellos", st)
		}
	})

	p := rawDial(t, path)
	p.send([]byte{0x08, 0x01})
	// Snapshot: the Add for u1 with its netns.
	buf := make([]byte, 1024)
	oob := make([]byte, 64)
	n, oobn, _, _, err := recvmsg(p.fd, buf, oob)
	if err != nil {
		t.Fatal(err)
	}
	fds := rightsOf(t, oob[:oobn])
	if len(fds) != 1 {
		t.Fatalf("add carried %d fds, want 1", len(fds))
	}
	var req WorkloadRequest
	if err := req.Unmarshal(buf[:n]); err != nil {
		t.Fatal(err)
	}
	want := &AddWorkload{UID: "u1", WorkloadInfo: &WorkloadInfo{Name: "a", Namespace: "default", ServiceAccount: "sa-a"}}
	if !reflect.DeepEqual(req.Payload, want) {
		t.Errorf("snapshot add %#v, want %#v", req.Payload, want)
	}
	if got, want := fdID(t, fds[0]), nsID(t, selfNetns); got != want {
		t.Errorf("fd is %+v, want the pod's netns %+v", got, want)
	}
	fds[0].Close()
	p.send([]byte{0x0a, 0x00})
	if b := p.recv(); string(b) != "\x1a\x00" {
		t.Fatalf("want SnapshotSent 1a 00, got % x", b)
	}
	p.send([]byte{0x0a, 0x00})
	waitFor(t, "ready", srv.Ready)

	// A nack is a NackError with the proxy's reason.
	errc := make(chan error, 1)
	go func() { errc <- srv.Del(context.Background(), "u1") }()
	if b := p.recv(); string(b) != "\x12\x04\x12\x02u1" {
		t.Errorf("del u1: got % x, want 12 04 12 02 75 31", b)
	}
	p.send(WorkloadResponse{Ack: &Ack{Error: "boom"}}.Marshal())
	var nack *NackError
	if err := <-errc; !errors.As(err, &nack) || nack.Reason != "boom" {
		t.Errorf("del: %v, want NackError boom", err)
	}

	// A peer that vanishes is dropped by the idle check.
	p.close()
	waitFor(t, "vanished proxy dropped", func() bool { return srv.Status().Connections == 0 })
}

// TestServerAckTimeout: a proxy that never acks gets a transport error,
// not a nack, and its connection is dropped.
func TestServerAckTimeout(t *testing.T) {
	path := sockPath(t)
	srv, err := NewServer(ServerConfig{Path: path, Snapshot: &podList{}, Timeout: 200 * time.Millisecond, ProbeInterval: time.Hour, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	p := rawDial(t, path)
	p.send([]byte{0x08, 0x01})
	if b := p.recv(); string(b) != "\x1a\x00" {
		t.Fatalf("want SnapshotSent, got % x", b)
	}
	p.send([]byte{0x0a, 0x00})
	waitFor(t, "ready", srv.Ready)
	err = srv.Add(context.Background(), "u", info("u"), openFile(t, selfNetns))
	var nack *NackError
	if err == nil || errors.As(err, &nack) || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("add without ack: %v, want a deadline error that is not a nack", err)
	}
	waitFor(t, "connection dropped", func() bool { return srv.Status().Connections == 0 })
}

// TestServerPeerAdmission: the socket is mode 0600 whatever the umask; the
// Admit hook gets the connecting process's kernel credentials before the
// hello, and a refusal closes the connection with no snapshot sent; Gone
// follows each admitted connection.
func TestServerPeerAdmission(t *testing.T) {
	path := sockPath(t)
	old := unix.Umask(0)
	var (
		mu     sync.Mutex
		seen   []Peer
		gone   int
		refuse = true
	)
	src := &podList{}
	src.set(Pod{UID: "u1", Info: info("a"), OpenNetns: opener(selfNetns)})
	s, err := NewServer(ServerConfig{Path: path, Snapshot: src, Timeout: testTimeout, ProbeInterval: testProbe, Logger: testLogger(t),
		Admit: func(p Peer) error {
			mu.Lock()
			defer mu.Unlock()
			seen = append(seen, p)
			if refuse {
				return errors.New("not a proxy")
			}
			return nil
		},
		Gone: func(Peer) { mu.Lock(); gone++; mu.Unlock() },
	})
	unix.Umask(old)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	stop := sync.OnceFunc(func() { cancel(); <-done })
	t.Cleanup(stop)

	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want a socket with 0600", st.Mode())
	}
	if left, _ := filepath.Glob(path + ".*"); len(left) > 0 {
		t.Errorf("temporary socket files left: %v", left)
	}

	p := rawDial(t, path)
	p.expectEOF() // refused before its hello: no snapshot
	mu.Lock()
	if len(seen) != 1 || seen[0].PID != os.Getpid() || seen[0].UID != os.Geteuid() {
		t.Errorf("admit saw %+v, want this process (pid %d uid %d)", seen, os.Getpid(), os.Geteuid())
	}
	refuse = false
	mu.Unlock()
	if st := s.Status(); st.Connections != 0 {
		t.Errorf("refused peer counted: %+v", st)
	}

	p = rawDial(t, path)
	p.send([]byte{0x08, 0x01})
	buf := make([]byte, 1024)
	oob := make([]byte, 64)
	if _, oobn, _, _, err := recvmsg(p.fd, buf, oob); err != nil {
		t.Fatalf("admitted peer got no snapshot: %v", err)
	} else {
		for _, f := range rightsOf(t, oob[:oobn]) {
			f.Close()
		}
	}
	p.close()
	waitFor(t, "gone after the admitted peer left", func() bool { mu.Lock(); defer mu.Unlock(); return gone == 1 })
	stop()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file after Close: %v", err)
	}
}

// TestLongNackBounded: a handler error longer than istio-cni's 1 KiB read
// buffer is nacked cut to MaxNackText bytes of valid UTF-8, marked, and
// the whole ack message stays under 1024 bytes.
func TestLongNackBounded(t *testing.T) {
	checkNoFDLeak(t)
	path := sockPath(t)
	srv, _ := startServer(t, path, &podList{})
	h := newFakeHandler()
	long := "listen: " + strings.Repeat("é", 3000)
	h.addErr = errors.New(long)
	h.failAdds["f"] = 1
	cl, _, _ := startClient(t, path, h)
	waitFor(t, "client ready", cl.Ready)
	err := srv.Add(context.Background(), "f", info("f"), openFile(t, selfNetns))
	var nack *NackError
	if !errors.As(err, &nack) {
		t.Fatalf("add: %v, want a NackError", err)
	}
	if len(nack.Reason) > MaxNackText || !utf8.ValidString(nack.Reason) ||
		!strings.HasPrefix(long, strings.TrimSuffix(nack.Reason, " [truncated]")) || !strings.HasSuffix(nack.Reason, " [truncated]") {
		t.Errorf("nack of %d bytes (valid UTF-8 %t): %.60q...", len(nack.Reason), utf8.ValidString(nack.Reason), nack.Reason)
	}
	if n := len(WorkloadResponse{Ack: &Ack{Error: nack.Reason}}.Marshal()); n >= 1024 {
		t.Errorf("ack message of %d bytes, want < 1024", n)
	}
	waitFor(t, "retried add to succeed", func() bool { return h.isRunning("f") })
}
