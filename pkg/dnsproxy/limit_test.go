package dnsproxy

import (
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// silentUpstream reads queries and never answers; it counts them.
func silentUpstream(t *testing.T) (netip.AddrPort, *atomic.Int64) {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	var n atomic.Int64
	go func() {
		buf := make([]byte, 1500)
		for {
			if _, _, err := c.ReadFromUDPAddrPort(buf); err != nil {
				return
			}
			n.Add(1)
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort(), &n
}

// TestMaxInFlight: with MaxInFlight 2 and an upstream that never
// answers, two UDP queries wait for it; the third is answered REFUSED at
// once without reaching the upstream, and counted. A third TCP
// connection is reset. Once the waiting queries time out, queries are
// admitted again.
func TestMaxInFlight(t *testing.T) {
	up, asked := silentUpstream(t)
	var refusedUDP, refusedTCP atomic.Int64
	s := New(Config{
		Upstreams:   []netip.AddrPort{up},
		Timeout:     time.Second,
		MaxInFlight: 2,
		OnRefuse: func(network string) {
			if network == "udp" {
				refusedUDP.Add(1)
			} else {
				refusedTCP.Add(1)
			}
		},
	})
	defer s.Close()
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.ServeUDP(uc)
	go s.ServeTCP(ln)

	c, err := net.Dial("udp", uc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for id := uint16(1); id <= 2; id++ {
		c.Write(query(t, id, "example.org.", dnsmessage.TypeA))
	}
	waitUntil(t, "two queries at the upstream", func() bool { return asked.Load() == 2 })
	start := time.Now()
	c.Write(query(t, 3, "example.org.", dnsmessage.TypeA))
	c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("third query: no answer within 500ms: %v", err)
	}
	var m dnsmessage.Message
	if err := m.Unpack(buf[:n]); err != nil {
		t.Fatal(err)
	}
	if m.ID != 3 || m.RCode != dnsmessage.RCodeRefused {
		t.Errorf("third query: id %d rcode %v, want id 3 REFUSED", m.ID, m.RCode)
	}
	t.Logf("refused in %v", time.Since(start))
	if asked.Load() != 2 || refusedUDP.Load() != 1 {
		t.Errorf("upstream asked %d times, %d refused; want 2 and 1", asked.Load(), refusedUDP.Load())
	}

	// TCP: two connections are served (idle, each holds a slot), the
	// third is reset.
	for range 2 {
		tc, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer tc.Close()
	}
	waitUntil(t, "two TCP connections held", func() bool { return s.tcpConns.held.Load() == 2 })
	if third, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		// Accepted by the kernel before the server reset it.
		third.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		_, err := third.Read(buf)
		third.Close()
		var ne net.Error
		if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
			t.Errorf("third TCP connection: read %v, want it reset at once", err)
		}
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("third TCP connection: %v", err)
	}
	waitUntil(t, "the TCP refusal counted", func() bool { return refusedTCP.Load() == 1 })

	// The waiting UDP queries time out (SERVFAIL) and free their slots.
	waitUntil(t, "slots released after the upstream timeout", func() bool { return s.queries.held.Load() == 0 })
	if _, err := c.Write(query(t, 4, "example.org.", dnsmessage.TypeA)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the fourth query admitted to the upstream", func() bool { return asked.Load() == 3 })
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
