package dnsproxy

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// query builds a question for name and type.
func query(t *testing.T, id uint16, name string, typ dnsmessage.Type) []byte {
	t.Helper()
	m := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: id, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}},
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// upstream is a fake resolver answering every A question with addr.
func upstream(t *testing.T, addr netip.Addr) netip.AddrPort {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			var m dnsmessage.Message
			if m.Unpack(buf[:n]) != nil {
				continue
			}
			m.Response = true
			m.Answers = []dnsmessage.Resource{{
				Header: dnsmessage.ResourceHeader{Name: m.Questions[0].Name, Class: dnsmessage.ClassINET, TTL: 5},
				Body:   &dnsmessage.AResource{A: addr.As4()},
			}}
			b, _ := m.Pack()
			c.WriteToUDPAddrPort(b, from)
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

func answerA(t *testing.T, b []byte) (dnsmessage.RCode, []netip.Addr) {
	t.Helper()
	var m dnsmessage.Message
	if err := m.Unpack(b); err != nil {
		t.Fatalf("unpack answer: %v", err)
	}
	var out []netip.Addr
	for _, a := range m.Answers {
		if r, ok := a.Body.(*dnsmessage.AResource); ok {
			out = append(out, netip.AddrFrom4(r.A))
		}
	}
	return m.RCode, out
}

// TestLocalAndForwarded: mesh names are answered locally over UDP and
// TCP, other names are forwarded to the upstream.
func TestLocalAndForwarded(t *testing.T) {
	vip := netip.MustParseAddr("10.96.0.10")
	ext := netip.MustParseAddr("192.0.2.7")
	s := New(Config{
		Lookup: func(name string) ([]netip.Addr, bool) {
			if name == "echo.demo.svc.cluster.local" {
				return []netip.Addr{vip}, true
			}
			return nil, false
		},
		Upstreams: []netip.AddrPort{upstream(t, ext)},
		Timeout:   2 * time.Second,
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

	exchangeUDP := func(q []byte) []byte {
		c, err := net.Dial("udp", uc.LocalAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		c.Write(q)
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("udp answer: %v", err)
		}
		return buf[:n]
	}
	if rc, got := answerA(t, exchangeUDP(query(t, 1, "echo.demo.svc.cluster.local.", dnsmessage.TypeA))); rc != dnsmessage.RCodeSuccess || len(got) != 1 || got[0] != vip {
		t.Errorf("mesh name over UDP: rcode %v, answers %v; want %v", rc, got, vip)
	}
	if rc, got := answerA(t, exchangeUDP(query(t, 2, "example.org.", dnsmessage.TypeA))); rc != dnsmessage.RCodeSuccess || len(got) != 1 || got[0] != ext {
		t.Errorf("forwarded name: rcode %v, answers %v; want %v", rc, got, ext)
	}
	if rc, got := answerA(t, exchangeUDP(query(t, 3, "echo.demo.svc.cluster.local.", dnsmessage.TypeAAAA))); rc != dnsmessage.RCodeSuccess || len(got) != 0 {
		t.Errorf("AAAA of a v4-only mesh name: rcode %v, answers %v; want NODATA", rc, got)
	}

	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if err := writeTCPMessage(c, query(t, 4, "echo.demo.svc.cluster.local.", dnsmessage.TypeA)); err != nil {
		t.Fatal(err)
	}
	resp, err := readTCPMessage(c)
	if err != nil {
		t.Fatalf("tcp answer: %v", err)
	}
	if rc, got := answerA(t, resp); rc != dnsmessage.RCodeSuccess || len(got) != 1 || got[0] != vip {
		t.Errorf("mesh name over TCP: rcode %v, answers %v", rc, got)
	}
}

// TestNoUpstream: a non-mesh name without an upstream is SERVFAIL.
func TestNoUpstream(t *testing.T) {
	s := New(Config{})
	defer s.Close()
	if rc, _ := answerA(t, s.answer(t.Context(), query(t, 9, "example.org.", dnsmessage.TypeA), "udp")); rc != dnsmessage.RCodeServerFailure {
		t.Errorf("rcode %v, want SERVFAIL", rc)
	}
}
