//go:build linux

package testproxy_test

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

func start(t *testing.T, p *nettest.Pod, o testproxy.Options) *testproxy.Proxy {
	t.Helper()
	px, err := testproxy.Start(p.NS, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { px.Close() })
	return px
}

func readLine(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("read from %s: %v", c.RemoteAddr(), err)
	}
	return line
}

func dial(t *testing.T, n *nettest.Netns, network string, dst netip.AddrPort) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := n.Dial(ctx, network, dst.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestListenersAndObservations(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	topo := nettest.NewTopology(t, 2)
	a, r := topo.Pod(0), topo.Pod(1)
	px := start(t, a, testproxy.Options{DNS: true})

	// 15008 answers with the greeting; without NAT there is no conntrack
	// entry, so the original destination falls back to the local address.
	dst := netip.AddrPortFrom(a.IPv6, meshconst.InboundHBONEPort)
	c := dial(t, &r.Netns, "tcp", dst)
	if got := readLine(t, c); got != testproxy.HBONEGreeting {
		t.Errorf("15008 greeting = %q", got)
	}
	o, ok := px.WaitFor(func(o testproxy.Observation) bool { return o.Listener == meshconst.InboundHBONEPort }, 3*time.Second)
	if !ok {
		t.Fatal("no 15008 observation")
	}
	if o.Local != dst || o.OrigDst != dst || o.Peer.Addr() != r.IPv6 || o.OrigDstErr == "" || o.Proto != "tcp" {
		t.Errorf("15008 observation = %+v", o)
	}

	// A direct connection to 15006 has no original destination: the
	// proxy must close it instead of dialing itself.
	c = dial(t, &r.Netns, "tcp", netip.AddrPortFrom(a.IPv4, meshconst.InboundPlaintextPort))
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Errorf("15006 without original destination answered %d bytes", n)
	}
	if n := count(px, meshconst.InboundPlaintextPort); n != 1 {
		t.Errorf("15006 observations = %d, want 1 (a loop would add more)", n)
	}

	// DNS over UDP and TCP on both loopbacks, from inside the pod.
	for _, lo := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()} {
		d := netip.AddrPortFrom(lo, meshconst.DNSPort)
		uc := dial(t, &a.Netns, "udp", d)
		if _, err := uc.Write([]byte("q")); err != nil {
			t.Fatal(err)
		}
		if got := readLine(t, uc); got != testproxy.DNSAnswer {
			t.Errorf("udp %s answered %q", d, got)
		}
		if got := readLine(t, dial(t, &a.Netns, "tcp", d)); got != testproxy.DNSAnswer {
			t.Errorf("tcp %s answered %q", d, got)
		}
	}
	udp := 0
	for _, o := range px.Observations() {
		if o.Proto == "udp" && o.Listener == meshconst.DNSPort && o.OrigDst == o.Local {
			udp++
		}
	}
	if udp != 2 {
		t.Errorf("udp dns observations = %d, want 2: %+v", udp, px.Observations())
	}

	if err := px.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	if _, ok := px.WaitFor(func(testproxy.Observation) bool { return false }, 10*time.Second); ok {
		t.Error("WaitFor after Close reported success")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if c, err := r.Dial(ctx, "tcp", dst.String()); err == nil {
		c.Close()
		t.Error("15008 still accepts after Close")
	}
}

func count(px *testproxy.Proxy, port int) int {
	n := 0
	for _, o := range px.Observations() {
		if o.Listener == port {
			n++
		}
	}
	return n
}

func TestOwnTrafficIsMarked(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	topo := nettest.NewTopology(t, 2)
	a, r := topo.Pod(0), topo.Pod(1)
	px := start(t, a, testproxy.Options{})
	l, err := r.Listen("tcp", "[::]:7100")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		if c, err := l.Accept(); err == nil {
			c.Write([]byte(c.RemoteAddr().String() + "\n"))
			c.Close()
		}
	}()
	c, err := px.Dial(context.Background(), "tcp", netip.AddrPortFrom(r.IPv4, 7100))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if m := mark(t, c.(syscall.Conn)); m != int(meshconst.ProxyMark) {
		t.Errorf("proxy dial SO_MARK = %#x", m)
	}
	if got := readLine(t, c); !strings.HasPrefix(got, a.IPv4.String()+":") {
		t.Errorf("remote saw %q, want the pod's address %s", got, a.IPv4)
	}
	u, err := px.ListenPacket(true)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if m := mark(t, u); m != int(meshconst.ProxyMark) {
		t.Errorf("proxy udp SO_MARK = %#x", m)
	}
}

func mark(t *testing.T, c syscall.Conn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var m int
	var gerr error
	rc.Control(func(fd uintptr) { m, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK) })
	if gerr != nil {
		t.Fatal(gerr)
	}
	return m
}

func TestReusePort(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	a := nettest.NewTopology(t, 1).Pod(0)
	start(t, a, testproxy.Options{})
	// A second proxy shares the ports (the upgrade handoff) ...
	start(t, a, testproxy.Options{})
	// ... unless reuseport is off.
	px, err := testproxy.Start(a.NS, testproxy.Options{NoReusePort: true})
	if err == nil {
		px.Close()
		t.Fatal("NoReusePort proxy started on ports already in use")
	}
	if !errors.Is(err, unix.EADDRINUSE) {
		t.Errorf("NoReusePort error = %v, want EADDRINUSE", err)
	}
}
