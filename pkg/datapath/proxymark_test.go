//go:build linux

package datapath

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
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

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

// trustSelf makes the test process's cgroup a proxy cgroup, as the agent
// does for a proxy connecting over ZDS: the in-process test proxy's
// sockets carry the mark and must leave uncaptured.
func trustSelf(t testing.TB, l *Loader) {
	t.Helper()
	if _, _, err := l.TrustProcess(os.Getpid()); err != nil {
		t.Fatal(err)
	}
}

var markApps struct {
	once sync.Once
	dir  string
	err  error
}

// markApp returns the path of testdata/markapp built for goarch, from
// $AMBPF_MARKAPP_DIR when set (the kernel matrix builds them on the host),
// else built once per test binary.
func markApp(t *testing.T, goarch string) string {
	t.Helper()
	if dir := os.Getenv("AMBPF_MARKAPP_DIR"); dir != "" {
		return filepath.Join(dir, "markapp-"+goarch)
	}
	markApps.once.Do(func() {
		markApps.dir, markApps.err = os.MkdirTemp("", "ambpf-markapp-")
		for _, arch := range []string{"amd64", "386"} {
			if markApps.err != nil {
				return
			}
			cmd := exec.Command("go", "build", "-o", filepath.Join(markApps.dir, "markapp-"+arch), "./testdata/markapp")
			cmd.Env = append(os.Environ(), "GOARCH="+arch, "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				markApps.err = &buildError{arch, err, out}
			}
		}
	})
	if markApps.err != nil {
		t.Fatal(markApps.err)
	}
	return filepath.Join(markApps.dir, "markapp-"+goarch)
}

type buildError struct {
	arch string
	err  error
	out  []byte
}

func (e *buildError) Error() string {
	return "build markapp for " + e.arch + ": " + e.err.Error() + "\n" + string(e.out)
}

// cleanupMarkApps removes the built helpers; TestMain calls it.
func cleanupMarkApps() {
	if markApps.dir != "" {
		os.RemoveAll(markApps.dir)
	}
}

// markRun is one run of markapp in a pod: what it printed.
type markRun struct{ mark, answer string }

// runMarkApp runs markapp in the pod's netns and cgroup. With enrol set,
// the app marks its socket first, then enrol runs, then the app connects:
// a socket marked before the pod was enrolled.
func runMarkApp(t *testing.T, p *nettest.Pod, bin string, enrol func(), args ...string) markRun {
	t.Helper()
	if enrol != nil {
		args = append(args, "-wait")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := p.Command(ctx, bin, args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var r markRun
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, "mark="); ok {
			r.mark = v
			if enrol != nil {
				enrol()
			}
			io.WriteString(stdin, "go\n")
		}
		if v, ok := strings.CutPrefix(line, "answer="); ok {
			r.answer = v
		}
	}
	if err := cmd.Wait(); err != nil {
		if strings.Contains(stderr.String(), "Exec format error") {
			// Then no 32-bit process can run here, and no compat ABI
			// can be used to get round anything.
			t.Skipf("this kernel runs no %s binaries (CONFIG_IA32_EMULATION): %s", filepath.Base(bin), stderr.String())
		}
		t.Fatalf("markapp %v: %v\n%s", args, err, stderr.String())
	}
	return r
}

// TestProxyMarkNotACredential: an app in an enrolled pod carrying the proxy
// mark is captured like any other app, however it got the mark: the
// 64-bit setsockopt with no mark guard attached (enrolment without a pod
// cgroup, as through the CNI plugin), the 32-bit compat setsockopt that
// the guard never sees, a socket marked before enrolment, and SO_MARK as
// a sendmsg control message on DNS. Only sockets of a proxy cgroup leave
// with the mark. Each case bypassed capture when the mark was trusted.
func TestProxyMarkNotACredential(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 2)
	a, r := topo.Pod(0), topo.Pod(1)
	proxy, err := testproxy.Start(a.NS, testproxy.Options{DNS: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	appR, err := nettest.StartApp(&r.Netns, "R", []uint16{8080}, []uint16{53})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { appR.Close() })
	cg, err := a.Cgroup()
	if err != nil {
		t.Fatal(err)
	}
	l := testLoader(t, 0)
	enrol := func(t *testing.T, withGuard bool) {
		t.Helper()
		pod := Pod{UID: "markpod", Netns: a.NS, Options: Options{DNSCapture: true}}
		if withGuard {
			pod.Cgroup = cg
		}
		if _, err := l.Attach(pod); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { l.Detach("markpod") })
	tcpTarget := netip.AddrPortFrom(r.IPv4, 8080).String()
	dnsTarget := netip.AddrPortFrom(r.IPv4, 53).String()

	for _, tc := range []struct {
		name      string
		arch      string
		guard     bool
		before    bool // mark the socket before the pod is enrolled
		args      []string
		wantMark  string // prefix of what setting the mark gave
		wantProxy int    // the proxy listener that must see the connection
		wantAns   string // prefix of the answer: the proxy's, or R's relayed
	}{
		{"setsockopt-64bit-no-guard", "amd64", false, false, []string{"-target", tcpTarget}, "ok", meshconst.OutboundPort, "app R"},
		{"setsockopt-64bit-guard", "amd64", true, false, []string{"-target", tcpTarget}, "error", meshconst.OutboundPort, "app R"},
		{"setsockopt-32bit-guard", "386", true, false, []string{"-target", tcpTarget}, "ok", meshconst.OutboundPort, "app R"},
		{"marked-before-enrolment", "amd64", false, true, []string{"-target", tcpTarget}, "ok", meshconst.OutboundPort, "app R"},
		{"marked-before-enrolment-32bit", "386", true, true, []string{"-target", tcpTarget}, "ok", meshconst.OutboundPort, "app R"},
		// io_uring socket commands (6.7+): a route to SO_MARK that is not
		// the setsockopt system call; with the guard the mark may or may
		// not be refused, captured either way.
		{"io_uring-setsockopt-no-guard", "amd64", false, false, []string{"-target", tcpTarget, "-how", "uring"}, "ok", meshconst.OutboundPort, "app R"},
		{"io_uring-setsockopt-guard", "amd64", true, false, []string{"-target", tcpTarget, "-how", "uring"}, "", meshconst.OutboundPort, "app R"},
		{"udp-dns-cmsg", "amd64", true, false, []string{"-target", dnsTarget, "-udp", "-how", "cmsg"}, "ok", meshconst.DNSPort, strings.TrimSpace(testproxy.DNSAnswer)},
		{"udp-dns-setsockopt-32bit", "386", true, false, []string{"-target", dnsTarget, "-udp"}, "ok", meshconst.DNSPort, strings.TrimSpace(testproxy.DNSAnswer)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bin := markApp(t, tc.arch)
			t.Cleanup(func() { l.Detach("markpod") })
			before := len(proxy.Observations())
			seenR := len(appR.Seen())
			var run markRun
			if tc.before {
				run = runMarkApp(t, a, bin, func() { enrol(t, tc.guard) }, tc.args...)
			} else {
				enrol(t, tc.guard)
				run = runMarkApp(t, a, bin, nil, tc.args...)
			}
			if strings.HasPrefix(run.mark, "unsupported") {
				t.Skipf("no io_uring socket commands here (6.7+, io_uring enabled): %s", run.mark)
			}
			if !strings.HasPrefix(run.mark, tc.wantMark) {
				t.Errorf("setting the mark: %q, want %s", run.mark, tc.wantMark)
			}
			obs := proxy.Observations()[before:]
			if len(obs) != 1 || obs[0].Listener != tc.wantProxy {
				t.Errorf("not captured: proxy observations %+v, want one on %d (answer %q)", obs, tc.wantProxy, run.answer)
			}
			if !strings.HasPrefix(run.answer, tc.wantAns) {
				t.Errorf("answer %q, want %q", run.answer, tc.wantAns)
			}
			// R hears only what the proxy relayed (TCP), nothing for DNS.
			wantR := 1
			if tc.wantProxy == meshconst.DNSPort {
				wantR = 0
			}
			if got := len(appR.Seen()) - seenR; got != wantR {
				t.Errorf("R saw %d new connections/datagrams, want %d", got, wantR)
			}
			st, err := l.Get("markpod")
			if err != nil {
				t.Fatal(err)
			}
			if tc.wantMark == "ok" && tc.wantProxy == meshconst.OutboundPort && st.Counters.MarkUntrusted != 1 {
				t.Errorf("mark_untrusted = %d, want 1", st.Counters.MarkUntrusted)
			}
		})
	}
}

// TestProxyCgroups: the node-wide proxy cgroup set is shared by every pod,
// survives the Loader (it is pinned), and an untrusted proxy's own
// connections are captured: fail closed rather than open.
func TestProxyCgroups(t *testing.T) {
	l := testLoader(t, 0)
	list, err := l.ProxyCgroups()
	if err != nil || len(list) != 1 || list[0].PID != uint32(os.Getpid()) {
		t.Fatalf("after testLoader: %+v, %v; want the test process", list, err)
	}
	if err := l.TrustProxy(0, 1); err == nil {
		t.Error("TrustProxy(0): want an error")
	}
	l2, err := New(Config{Root: l.Root()})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := l2.ProxyCgroups(); err != nil || len(got) != 1 || got[0].ID != list[0].ID {
		t.Errorf("a second Loader sees %+v, %v", got, err)
	}

	// Pod A has no proxy: what its programs capture is dropped.
	topo := nettest.NewTopology(t, 2)
	a, r := topo.Pod(0), topo.Pod(1)
	appR, err := nettest.StartApp(&r.Netns, "R", []uint16{8080}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { appR.Close() })
	if _, err := l.Attach(Pod{UID: "p", Netns: a.NS}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Detach("p") })
	to := netip.AddrPortFrom(r.IPv4, 8080)
	markedDial := func() error {
		d := net.Dialer{Timeout: time.Second, Control: func(_, _ string, c syscall.RawConn) error {
			var err error
			c.Control(func(fd uintptr) {
				err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(meshconst.ProxyMark))
			})
			return err
		}}
		return a.NS.Do(func() error {
			c, err := d.Dial("tcp", to.String())
			if err == nil {
				c.Close()
			}
			return err
		})
	}
	// Trusted: a marked connection of this (proxy) cgroup leaves directly.
	if err := markedDial(); err != nil {
		t.Errorf("marked dial while trusted: %v", err)
	}
	if err := l.ForgetProxy(list[0].ID); err != nil {
		t.Fatal(err)
	}
	if err := l.ForgetProxy(list[0].ID); err != nil {
		t.Errorf("forgetting twice: %v", err)
	}
	// Untrusted: the same connection is captured like an app's and, with
	// no proxy listening, dropped: closed, never passed on.
	if err := markedDial(); err == nil {
		t.Error("marked dial from an untrusted cgroup reached R")
	}
	st, err := l.Get("p")
	if err != nil {
		t.Fatal(err)
	}
	if st.Counters.MarkUntrusted == 0 || st.Counters.DroppedNoListener == 0 {
		t.Errorf("counters %+v: want mark_untrusted and a drop", st.Counters)
	}
	if n := len(appR.Seen()); n != 1 {
		t.Errorf("R saw %d connections, want 1 (the trusted one)", n)
	}
}

// tcpInSegs reads Tcp InSegs (TCP segments received) of the pod's netns.
func tcpInSegs(t *testing.T, p *nettest.Pod) int {
	t.Helper()
	var n int
	err := p.NS.Do(func() error {
		// thread-self: /proc/self/net is the netns of the thread group
		// leader, not of this (setns'd) thread.
		data, err := os.ReadFile("/proc/thread-self/net/snmp")
		if err != nil {
			return err
		}
		var names []string
		for _, line := range strings.Split(string(data), "\n") {
			f := strings.Fields(line)
			if len(f) == 0 || f[0] != "Tcp:" {
				continue
			}
			if names == nil {
				names = f
				continue
			}
			for i, name := range names {
				if name == "InSegs" && i < len(f) {
					_, err := fmt.Sscan(f[i], &n)
					return err
				}
			}
		}
		return errors.New("no Tcp: InSegs in /proc/net/snmp")
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestRawSocketRoutes: what an app holding CAP_NET_RAW gets from raw and
// packet sockets (docs/SECURITY.md). A hand-built SYN through a raw IP
// socket takes the IP output path and is captured like any other (the
// proxy's listener takes it; the peer receives nothing). The same SYN as a
// whole frame through a packet socket with PACKET_QDISC_BYPASS passes no
// TC program and reaches the peer: the documented opening, asserted here so
// the documentation stays true.
func TestRawSocketRoutes(t *testing.T) {
	requireRoot(t)
	topo := nettest.NewTopology(t, 2)
	a, r, _, _, _ := startProxyAndApps(t, topo)
	cg, err := a.Cgroup()
	if err != nil {
		t.Fatal(err)
	}
	l := testLoader(t, 0)
	st, err := l.Attach(Pod{UID: "raw", Netns: a.NS, Cgroup: cg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Detach("raw") })
	var rMAC string
	if err := r.NS.Do(func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err == nil {
			rMAC = ifi.HardwareAddr.String()
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	target := netip.AddrPortFrom(r.IPv4, 8080).String()
	bin := markApp(t, "amd64")

	t.Run("raw-ip-captured", func(t *testing.T) {
		before, opens := st.Counters.CapturedOut, tcpInSegs(t, r)
		if got := runMarkApp(t, a, bin, nil, "-target", target, "-raw-syn", "ip"); got.answer != "ok" {
			t.Fatalf("raw SYN not sent: %q", got.answer)
		}
		agenttestWait(t, "the SYN captured", func() bool {
			s, err := l.Get("raw")
			return err == nil && s.Counters.CapturedOut == before+1
		})
		if n := tcpInSegs(t, r); n != opens {
			t.Errorf("R received %d TCP segments: the raw SYN went around the capture", n-opens)
		}
	})
	t.Run("packet-qdisc-bypass", func(t *testing.T) {
		opens := tcpInSegs(t, r)
		got := runMarkApp(t, a, bin, nil, "-target", target, "-raw-syn", "packet", "-dev", "eth0", "-dst-mac", rMAC)
		if got.answer != "ok" {
			t.Fatalf("frame not sent: %q", got.answer)
		}
		agenttestWait(t, "R to receive the bypassing SYN (the documented opening)", func() bool {
			return tcpInSegs(t, r) > opens
		})
	})
}

// agenttestWait waits up to 5 s for cond.
func agenttestWait(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
