//go:build linux

package datapath

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/nettest"
)

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// connKey is the direct_flows key of a connection as its pod sees it.
func connKey(c net.Conn) captureFlow {
	l := c.LocalAddr().(*net.TCPAddr).AddrPort()
	r := c.RemoteAddr().(*net.TCPAddr).AddrPort()
	return flowKey(l.Addr().Unmap(), l.Port(), r.Addr().Unmap(), r.Port())
}

func (b *behaviourPods) hasFlow(t *testing.T, k captureFlow) bool {
	t.Helper()
	k.Pod = b.index
	_, ok := directEntry(t, b.directFlowsM, k)
	return ok
}

// TestDirectFlowFloodSockets: with bypass-inbound, R floods A with SYNs
// from tens of thousands of ports (more than direct_flows held as an LRU
// before, so the flood used to evict live flows into drops). A bypassed
// inbound connection and one open since before the attach keep working.
func TestDirectFlowFloodSockets(t *testing.T) {
	b := attachedPods(t, "direct-flood")
	before, err := nettest.OpenTCP(nettest.Dialer(&b.a.Netns, netip.Addr{}, netip.AddrPortFrom(b.r.IPv4, 8080)))
	if err != nil {
		t.Fatal(err)
	}
	defer before.Close()
	b.attach(t, Options{BypassInbound: true})
	var inbound []*nettest.TCPConn
	for _, v6 := range []bool{false, true} {
		c, err := nettest.OpenTCP(nettest.Dialer(&b.r.Netns, netip.Addr{}, netip.AddrPortFrom(b.a.Addr(v6), 8080)))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Echo("before the flood"); err != nil {
			t.Fatal(err)
		}
		// The pod's side of the flow, as direct_flows keys it.
		l := c.Conn.RemoteAddr().(*net.TCPAddr).AddrPort()
		r := c.Conn.LocalAddr().(*net.TCPAddr).AddrPort()
		k := flowKey(l.Addr().Unmap(), l.Port(), r.Addr().Unmap(), r.Port())
		waitFor(t, 2*time.Second, "the bypassed flow in direct_flows", func() bool { return b.hasFlow(t, k) })
		inbound = append(inbound, c)
	}
	if err := before.Echo("before the flood"); err != nil {
		t.Fatal(err)
	}

	// SYNs to a closed port of A, each from its own source port: A's
	// kernel answers each with an RST.
	flood := 4 * (int(b.directFlowsM.MaxEntries()) + 2048)
	start := time.Now()
	sent := 0
	err = b.r.Do(func() error {
		sa := &unix.SockaddrInet4{Port: 9, Addr: b.a.IPv4.As4()}
		for port := 10000; sent < flood && port < 65000; port++ {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
			if unix.Bind(fd, &unix.SockaddrInet4{Port: port, Addr: b.r.IPv4.As4()}) == nil {
				err = unix.Connect(fd, sa)
				if !errors.Is(err, unix.ECONNREFUSED) {
					unix.Close(fd)
					return err
				}
				sent++
			}
			unix.Close(fd)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("flood: %v", err)
	}
	t.Logf("%d SYNs from R in %v", sent, time.Since(start))
	if sent < flood/2 {
		t.Fatalf("only %d SYNs sent", sent)
	}
	for i, c := range inbound {
		if err := c.Echo("after the flood"); err != nil {
			t.Errorf("bypassed inbound flow %d broken by the flood: %v", i, err)
		}
	}
	if err := before.Echo("after the flood"); err != nil {
		t.Errorf("flow open before attach broken by the flood: %v", err)
	}
	if c := b.counters(t); c.DirectFull != 0 {
		t.Errorf("direct_full = %d, want 0", c.DirectFull)
	}
}

// TestDirectFlowExpirySockets: flows open at attach leave direct_flows when
// the pod resets them, when the peer resets them, and expire shortly once
// both sides closed; an entry for a 4-tuple whose flow is gone does not
// let a new connection on it leave uncaptured.
func TestDirectFlowExpirySockets(t *testing.T) {
	b := attachedPods(t, "direct-expiry")
	// A listener of the test's own in R, so R's side can be reset.
	ln, err := b.r.Listen("tcp", "[::]:8081")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	dial := func(port uint16) net.Conn {
		c, err := b.a.Dial(context.Background(), "tcp", netip.AddrPortFrom(b.r.IPv4, port).String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	podRST, fins, peerRST := dial(8080), dial(8080), dial(8081)
	peerSide, ok := <-accepted
	if !ok {
		t.Fatal("accept in R failed")
	}
	defer peerSide.Close()
	b.attach(t, Options{})
	for _, c := range []net.Conn{podRST, fins, peerRST} {
		if v, ok := directEntry(t, b.directFlowsM, connKey(c)); !ok || v.Origin != directAttached {
			t.Fatalf("flow %s open at attach: entry %+v (present %t)", c.LocalAddr(), v, ok)
		}
	}

	t.Run("rst from the pod", func(t *testing.T) {
		podRST.(*net.TCPConn).SetLinger(0)
		podRST.Close()
		waitFor(t, 2*time.Second, "the entry to go", func() bool { return !b.hasFlow(t, connKey(podRST)) })
	})
	t.Run("rst from the peer", func(t *testing.T) {
		k := connKey(peerRST)
		peerSide.(*net.TCPConn).SetLinger(0)
		peerSide.Close()
		waitFor(t, 2*time.Second, "the entry to go", func() bool { return !b.hasFlow(t, k) })
	})
	t.Run("fin from both sides", func(t *testing.T) {
		k := connKey(fins)
		// Read R's greeting first: closing with unread data would reset.
		fins.SetReadDeadline(time.Now().Add(nettest.ReplyTimeout))
		if _, err := bufio.NewReader(fins).ReadString('\n'); err != nil {
			t.Fatal(err)
		}
		fins.Close() // R's app sees EOF and closes its side
		waitFor(t, 2*time.Second, "both FINs", func() bool {
			v, ok := directEntry(t, b.directFlowsM, k)
			return ok && v.FinIn == 1 && v.FinOut == 1
		})
		if v, _ := directEntry(t, b.directFlowsM, k); v.ExpiresNs > monotonicNow()+60e9 {
			t.Errorf("closed flow expires in %v, want at most 60 s", time.Duration(v.ExpiresNs-monotonicNow()))
		}
	})
	t.Run("stale entry and a new connection on its 4-tuple", func(t *testing.T) {
		const port = 45000
		k := flowKey(b.a.IPv4, port, b.r.IPv4, 8080)
		if err := b.directFlowsM.Put(k, captureDirectFlow{ExpiresNs: monotonicNow() + uint64(directIdle), Origin: directAttached}); err != nil {
			t.Fatal(err)
		}
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: b.a.IPv4.AsSlice(), Port: port}}
		tc, err := nettest.OpenTCP(func(ctx context.Context) (net.Conn, error) {
			return b.a.DialWith(ctx, d, "tcp", netip.AddrPortFrom(b.r.IPv4, 8080).String())
		})
		if err != nil {
			t.Fatal(err)
		}
		defer tc.Close()
		if err := tc.Echo("new"); err != nil {
			t.Fatal(err)
		}
		if !b.observed(tc.Local) {
			t.Errorf("the new connection on a stale entry's 4-tuple was not captured")
		}
		if b.hasFlow(t, k) {
			t.Errorf("the stale entry survived the new connection's SYN")
		}
	})
}
