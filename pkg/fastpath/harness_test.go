//go:build linux

package fastpath

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/cgroup"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

// The test binary is also the apps' socket factory (netlab.SocketFactory):
// the test process drives the app's side of every exchange with raw
// syscalls on sockets the kernel treats as pod A's.

// proxyCgroup is the cgroup this test process moved itself into, so the
// in-process test proxy's sockets belong to a cgroup of their own (the
// machine's root cgroup never gets a program attached).
var proxyCgroup string

// cgroupErr is why the process could not get a cgroup of its own.
var cgroupErr error

func TestMain(m *testing.M) {
	if netlab.IsSocketFactory() {
		os.Exit(netlab.ServeSocketFactory())
	}
	if os.Geteuid() != 0 || Supported() != nil {
		os.Exit(m.Run()) // the tests skip, saying why
	}
	back, err := enterOwnCgroup()
	if err != nil {
		// The tests that need it skip, saying why.
		cgroupErr = err
		os.Exit(m.Run())
	}
	code := m.Run()
	if err := back(); err != nil {
		fmt.Fprintln(os.Stderr, "fastpath tests: leave cgroup:", err)
		code = 1
	}
	os.Exit(code)
}

// enterOwnCgroup moves this process into a new cgroup below the cgroup2
// root and returns how to move back and remove it.
func enterOwnCgroup() (func() error, error) {
	mnt, err := cgroup.Mount()
	if err != nil {
		return nil, err
	}
	orig, err := cgroup.OfProcess(os.Getpid())
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(mnt, fmt.Sprintf("%sfastpath-proxy-%d", nettest.Prefix, os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create proxy cgroup: %w", err)
	}
	move := func(to string) error {
		return os.WriteFile(filepath.Join(to, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0)
	}
	if err := move(dir); err != nil {
		os.Remove(dir)
		return nil, fmt.Errorf("enter proxy cgroup: %w", err)
	}
	proxyCgroup = dir
	return func() error {
		if err := move(orig); err != nil {
			return err
		}
		return os.Remove(dir)
	}, nil
}

// lab is a pod A enrolled in the real capture datapath with the test
// proxy in its netns, a server pod B, and optionally the fast path.
type lab struct {
	a, b    *nettest.Pod
	dp      *datapath.Loader
	fp      *Loader
	index   uint32
	proxy   *testproxy.Proxy
	factory *netlab.SocketFactory
	// noSplice: the proxy reads with recvmsg (needed with the fast path).
	noSplice bool
	mu       sync.Mutex
	open     map[int]bool // app descriptors dial handed out, not closed yet
}

const podUID = "fastpath-a"

func newLab(t *testing.T, mode Mode) *lab { return newLabWith(t, mode, mode != Off) }

// newLabWith is newLab with the proxy's copying chosen: noSplice reads
// and writes only (required with the fast path).
func newLabWith(t *testing.T, mode Mode, noSplice bool) *lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the fast path tests need root (netns, cgroups, BPF)")
	}
	if err := Supported(); err != nil {
		t.Skipf("kernel without the fast path: %v", err)
	}
	if proxyCgroup == "" {
		t.Skipf("no cgroup of its own for the test proxy (cgroup v2 needed): %v", cgroupErr)
	}
	topo := nettest.NewTopology(t, 2)
	root := filepath.Join(bpffstest.Mount(t), "ambpf")
	dp, err := datapath.New(datapath.Config{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := dp.TrustProcess(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	l := &lab{a: topo.Pod(0), b: topo.Pod(1), dp: dp}
	cg, err := l.a.Cgroup()
	if err != nil {
		t.Fatal(err)
	}
	st, err := dp.Attach(datapath.Pod{UID: podUID, Netns: l.a.NS, Cgroup: cg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := dp.Detach(podUID); err != nil {
			t.Errorf("detach datapath: %v", err)
		}
	})
	l.index = st.Index
	l.noSplice = noSplice
	l.startProxy(t)
	if mode != Off {
		if l.fp, err = New(Config{Root: root}); err != nil {
			t.Fatal(err)
		}
		if err := l.fp.AttachProxy(proxyCgroup); err != nil {
			t.Fatal(err)
		}
		if err := l.fp.AttachPod(podUID, st.Index, cg, mode); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			id, _ := cgroup.ID(proxyCgroup)
			if err := errors.Join(l.fp.DetachPod(podUID), l.fp.DetachProxy(id), l.fp.RemoveNodeState()); err != nil {
				t.Errorf("detach fast path: %v", err)
			}
			if left := bpffstest.Pins(filepath.Join(root, Dir)); len(left) > 0 {
				t.Errorf("fast path pins left: %v", left)
			}
		})
	}
	f, err := netlab.StartSocketFactory(l.a)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	l.factory = f
	return l
}

func (l *lab) startProxy(t *testing.T) {
	t.Helper()
	p, err := testproxy.Start(l.a.NS, testproxy.Options{NoSplice: l.noSplice})
	if err != nil {
		t.Fatal(err)
	}
	l.mu.Lock()
	l.proxy = p
	l.mu.Unlock()
	t.Cleanup(func() { p.Close() })
}

// counters reads the pod's fast path counters (zero without the fast path).
func (l *lab) counters(t *testing.T) Counters {
	t.Helper()
	if l.fp == nil {
		return Counters{}
	}
	st, err := l.fp.PodStatus(podUID)
	if err != nil {
		t.Fatal(err)
	}
	return st.Counters
}

// serve runs handle for every connection to B's address on port, in B.
func (l *lab) serve(t *testing.T, v6 bool, handle func(*net.TCPConn)) netip.AddrPort {
	t.Helper()
	addr := netip.AddrPortFrom(l.b.Addr(v6), 0)
	ln, err := l.b.Listen("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	nettest.Serve(t, ln, 20*time.Second, func(c net.Conn) { handle(c.(*net.TCPConn)) })
	return netip.MustParseAddrPort(ln.Addr().String())
}

// dial connects a pod-A app socket to dst (captured: it reaches the proxy)
// and returns its descriptor, with 10 s send and receive timeouts so that
// no test blocks for ever.
func (l *lab) dial(t *testing.T, dst netip.AddrPort) int {
	t.Helper()
	fd, err := l.factory.Socket(dst.Addr().Is6())
	if err != nil {
		t.Fatal(err)
	}
	l.mu.Lock()
	if l.open == nil {
		l.open = map[int]bool{}
	}
	l.open[fd] = true
	l.mu.Unlock()
	t.Cleanup(func() { l.closeApp(fd) })
	tv := unix.Timeval{Sec: 10}
	for _, o := range []int{unix.SO_RCVTIMEO, unix.SO_SNDTIMEO} {
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, o, &tv); err != nil {
			t.Fatal(err)
		}
	}
	paired := l.counters(t).Paired
	if err := retryEINTR(func() error { return unix.Connect(fd, sockaddr(dst)) }); err != nil {
		t.Fatalf("connect %s: %v", dst, err)
	}
	if l.fp != nil {
		// The app's connect completes before the proxy's accept side does;
		// a byte sent in between takes TCP and keeps the connection there
		// (correct, counted as fallback). The scenarios are about the
		// redirected path, so they start once the pair is recorded.
		waitFor(t, "the proxy's socket paired", func() bool { return l.counters(t).Paired > paired })
	}
	return fd
}

// closeApp closes an app descriptor from dial once: a second close could
// hit a descriptor number the process has reused since.
func (l *lab) closeApp(fd int) {
	l.mu.Lock()
	open := l.open[fd]
	delete(l.open, fd)
	l.mu.Unlock()
	if open {
		unix.Close(fd)
	}
}

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Is4() {
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

func retryEINTR(f func() error) error {
	for {
		if err := f(); !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// writeAll writes b to fd.
func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// spuriousEAGAIN counts blocking reads that answered EAGAIN long before
// their receive timeout. A socket in a sockmap reads through tcp_bpf's
// recvmsg, which waits once and answers EAGAIN when woken without data
// (by write space, say); the readers retry, as a non-blocking app would,
// and the tests report the count (docs/KERNELS.md).
var spuriousEAGAIN atomic.Int64

// read is read(2) on a blocking fd with the 10 s SO_RCVTIMEO, retrying
// EINTR and EAGAIN that came before the timeout.
func read(fd int, buf []byte) (int, error) {
	start := time.Now()
	for {
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) && time.Since(start) < 9*time.Second {
			spuriousEAGAIN.Add(1)
			continue
		}
		return n, err
	}
}

// readAll reads fd to EOF; the error is what ended it otherwise.
func readAll(fd int) ([]byte, error) {
	var out []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := read(fd, buf)
		if err != nil {
			return out, err
		}
		if n == 0 {
			return out, nil
		}
		out = append(out, buf[:n]...)
	}
}

// readFull reads exactly n bytes.
func readFull(fd int, n int) ([]byte, error) {
	out := make([]byte, 0, n)
	buf := make([]byte, 64<<10)
	for len(out) < n {
		m, err := read(fd, buf[:min(len(buf), n-len(out))])
		if err != nil {
			return out, err
		}
		if m == 0 {
			return out, errors.New("EOF")
		}
		out = append(out, buf[:m]...)
	}
	return out, nil
}

// waitFor waits up to 5 s for cond.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
