//go:build linux

package sockopt_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/sockopt"
)

func getInt(t *testing.T, c syscall.Conn, level, opt int) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), level, opt) })
	if gerr != nil {
		t.Fatalf("getsockopt %d/%d: %v", level, opt, gerr)
	}
	return v
}

func TestControlSetsOptions(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SO_MARK and IP_TRANSPARENT need CAP_NET_ADMIN")
	}
	p := nettest.NewTopology(t, 1).Pod(0)
	lc := &net.ListenConfig{Control: sockopt.Control(
		sockopt.Mark(0x539), sockopt.Transparent(), sockopt.Freebind(), sockopt.ReusePort())}
	for _, tc := range []struct {
		network, addr string
		v6            bool
	}{
		{"tcp", "[::]:7200", true}, // dual stack: both families' options
		{"tcp4", "0.0.0.0:7201", false},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			var ls []net.Listener
			for range 2 { // the second bind only works with SO_REUSEPORT
				l, err := p.ListenConfig(lc, tc.network, tc.addr)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { l.Close() })
				ls = append(ls, l)
			}
			c := ls[0].(*net.TCPListener)
			checks := map[string][3]int{
				"SO_MARK":        {unix.SOL_SOCKET, unix.SO_MARK, 0x539},
				"SO_REUSEPORT":   {unix.SOL_SOCKET, unix.SO_REUSEPORT, 1},
				"IP_TRANSPARENT": {unix.SOL_IP, unix.IP_TRANSPARENT, 1},
				"IP_FREEBIND":    {unix.SOL_IP, unix.IP_FREEBIND, 1},
			}
			if tc.v6 {
				checks["IPV6_TRANSPARENT"] = [3]int{unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1}
				checks["IPV6_FREEBIND"] = [3]int{unix.SOL_IPV6, unix.IPV6_FREEBIND, 1}
			}
			for name, ck := range checks {
				if got := getInt(t, c, ck[0], ck[1]); got != ck[2] {
					t.Errorf("%s = %d, want %d", name, got, ck[2])
				}
			}
		})
	}
}

func TestControlReportsErrors(t *testing.T) {
	// An option's error must abort the dial, not be swallowed.
	d := &net.Dialer{Control: sockopt.Control(func(fd, family int) error {
		return fmt.Errorf("refused by test (family %d)", family)
	})}
	_, err := d.Dial("udp4", "127.0.0.1:9")
	if err == nil {
		t.Fatal("dial succeeded although Control failed")
	}
}

func TestOriginalDst(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces and iptables")
	}
	topo := nettest.NewTopology(t, 2)
	a, r := topo.Pod(0), topo.Pod(1)
	l, err := a.Listen("tcp", "[::]:7300")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c.(*net.TCPConn)
		}
	}()
	accept := func(from *nettest.Pod, dst netip.AddrPort) *net.TCPConn {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		c, err := from.Dial(ctx, "tcp", dst.String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		select {
		case s := <-accepted:
			t.Cleanup(func() { s.Close() })
			return s
		case <-time.After(3 * time.Second):
			t.Fatal("not accepted")
		}
		return nil
	}

	// No NAT rule yet: conntrack is not even hooked, the answer is ENOENT.
	_, err = sockopt.OriginalDst(accept(r, netip.AddrPortFrom(a.IPv4, 7300)))
	if !errors.Is(err, unix.ENOENT) {
		t.Errorf("OriginalDst without conntrack: %v, want ENOENT", err)
	}

	for _, cmd := range []string{"iptables", "ip6tables"} {
		if out, err := a.Exec(context.Background(), cmd, "-w", "-t", "nat", "-A", "PREROUTING",
			"-p", "tcp", "--dport", "7777", "-j", "REDIRECT", "--to-ports", "7300"); err != nil {
			t.Fatalf("%s: %v", out, err)
		}
	}
	// v4 arrives v4-mapped on the [::] listener, v6 natively.
	for _, dst := range []netip.AddrPort{netip.AddrPortFrom(a.IPv4, 7777), netip.AddrPortFrom(a.IPv6, 7777)} {
		got, err := sockopt.OriginalDst(accept(r, dst))
		if err != nil || got != dst {
			t.Errorf("OriginalDst = %v, %v; want %v", got, err, dst)
		}
	}
}
