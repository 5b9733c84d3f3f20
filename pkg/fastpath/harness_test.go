//go:build linux

package fastpath

import (
	"context"
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
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

// The test binary is also the apps' socket factory: run with this variable
// set (inside a pod's netns and cgroup), it answers each request byte on
// fd 3 ('4' or '6') with a fresh TCP socket passed back over SCM_RIGHTS,
// and 'm' with the errno of setting SO_MARK 0x539 on a socket of its own
// (0 = allowed): the mark guard judges the calling task's cgroup.
// A socket belongs to the cgroup of the task that created it, so the test
// process can drive the app's side of every exchange with raw syscalls
// while the kernel treats the socket as the pod's.
const helperEnv = "AMBPF_FASTPATH_SOCKET_FACTORY"

// proxyCgroup is the cgroup this test process moved itself into, so the
// in-process test proxy's sockets belong to a cgroup of their own (the
// machine's root cgroup never gets a program attached).
var proxyCgroup string

// cgroupErr is why the process could not get a cgroup of its own.
var cgroupErr error

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		os.Exit(socketFactory())
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

func socketFactory() int {
	ctl := os.NewFile(3, "ctl")
	fd := int(ctl.Fd())
	req := make([]byte, 1)
	for {
		n, err := unix.Read(fd, req)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if n != 1 || err != nil {
			return 0
		}
		if req[0] == 'm' {
			s, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err == nil {
				err = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_MARK, 0x539)
				unix.Close(s)
			}
			var errno unix.Errno
			errors.As(err, &errno)
			unix.Write(fd, []byte{byte(errno)})
			continue
		}
		family := unix.AF_INET
		if req[0] == '6' {
			family = unix.AF_INET6
		}
		s, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, "socket:", err)
			return 1
		}
		if err := unix.Sendmsg(fd, []byte{'s'}, unix.UnixRights(s), nil, 0); err != nil {
			fmt.Fprintln(os.Stderr, "send fd:", err)
			return 1
		}
		unix.Close(s)
	}
}

// factory hands out sockets created inside a pod.
type factory struct {
	mu  sync.Mutex
	ctl int
}

func startFactory(t *testing.T, pod *nettest.Pod) *factory {
	t.Helper()
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	child := os.NewFile(uintptr(pair[1]), "factory")
	cmd := pod.Command(context.Background(), os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	cmd.ExtraFiles = []*os.File{child}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start socket factory: %v", err)
	}
	child.Close()
	f := &factory{ctl: pair[0]}
	t.Cleanup(func() {
		unix.Close(f.ctl) // EOF: the factory exits
		cmd.Wait()
	})
	return f
}

// markErrno asks the factory, a process of the pod, to set the proxy mark.
func (f *factory) markErrno() (unix.Errno, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := unix.Write(f.ctl, []byte{'m'}); err != nil {
		return 0, err
	}
	b := make([]byte, 1)
	if _, err := unix.Read(f.ctl, b); err != nil {
		return 0, err
	}
	return unix.Errno(b[0]), nil
}

func (f *factory) socket(v6 bool) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	req := []byte{'4'}
	if v6 {
		req[0] = '6'
	}
	if _, err := unix.Write(f.ctl, req); err != nil {
		return -1, fmt.Errorf("ask for a socket: %w", err)
	}
	buf := make([]byte, 1)
	oob := make([]byte, unix.CmsgSpace(4))
	_, oobn, _, _, err := unix.Recvmsg(f.ctl, buf, oob, 0)
	if err != nil {
		return -1, fmt.Errorf("receive socket: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return -1, fmt.Errorf("receive socket: bad control message (%v)", err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return -1, fmt.Errorf("receive socket: %v", err)
	}
	return fds[0], nil
}

// lab is a pod A enrolled in the real capture datapath with the test
// proxy in its netns, a server pod B, and optionally the fast path.
type lab struct {
	a, b    *nettest.Pod
	dp      *datapath.Loader
	fp      *Loader
	index   uint32
	proxy   *testproxy.Proxy
	factory *factory
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
	l.factory = startFactory(t, l.a)
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
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(20 * time.Second))
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String())
}

// dial connects a pod-A app socket to dst (captured: it reaches the proxy)
// and returns its descriptor, with 10 s send and receive timeouts so that
// no test blocks for ever.
func (l *lab) dial(t *testing.T, dst netip.AddrPort) int {
	t.Helper()
	fd, err := l.factory.socket(dst.Addr().Is6())
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
