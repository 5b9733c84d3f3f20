//go:build linux

package twonode

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/nettest"
)

// serviceVIP is the VIP of service m in ns-m: port 80 to the app's 8080.
var serviceVIP = netip.MustParseAddr("10.96.0.10")

func serviceDoc(endpoint netip.Addr) string {
	return fmt.Sprintf(`services:
- name: m
  namespace: ns-m
  vips: [%s]
  ports: {80: %d}
  endpoints:
  - {ip: %s}
`, serviceVIP, nettest.AppPort, endpoint)
}

// TestCrossNodePodMove: pod M (namespace ns-m) behind service m starts
// on node 1 next to A; it is deleted there (CNI DEL) and created again
// with the same identity on node 2, with a new address. After one
// discovery update (the file names M's new address and node, and the
// service's new endpoint), A's very first connection to the service
// reaches M on node 2 over HBONE across the link, proving M's identity
// there.
func TestCrossNodePodMove(t *testing.T) {
	l := newLab(t, labOptions{})
	vip := net.JoinHostPort(serviceVIP.String(), "80")
	m := l.addPod(l.n1, "m", true)
	l.writeDiscovery(serviceDoc(m.IP))
	c, err := connect(l.a, vip)
	if err != nil {
		t.Fatalf("a -> m (same node): %v", err)
	}
	c.Close()
	if want := greeting(m, l.a); c.Greeting != want {
		t.Fatalf("a -> m (same node): greeting %q, want %q", c.Greeting, want)
	}

	if err := m.Delete(); err != nil {
		t.Fatalf("delete m on node 1: %v", err)
	}
	moved := l.addPod(l.n2, "m", true)
	if moved.IP == m.IP || moved.Identity() != m.Identity() {
		t.Fatalf("moved pod: %s %s, was %s %s", moved.IP, moved.Identity(), m.IP, m.Identity())
	}
	capt := l.capture(l.n1, "tcp")
	l.writeDiscovery(serviceDoc(moved.IP))
	c, err = connect(l.a, vip)
	if err != nil {
		t.Fatalf("a -> m after one discovery update: %v", err)
	}
	c.Close()
	if want := greeting(moved, l.a); c.Greeting != want {
		t.Fatalf("a -> m after the move: greeting %q, want %q", c.Greeting, want)
	}
	counts := flows(read(t, capt))
	if to(counts, l.a.IP, moved.IP, hbonePort) == 0 {
		t.Errorf("a -> m did not cross the link as HBONE to %s:%d: %v", moved.IP, hbonePort, counts)
	}
	checkIdentities(t, l.a, moved)
}

// TestCrossNodePooling opens N concurrent connections from A (node 1) to
// B (node 2) and holds them: they must share at most ⌈N/100⌉ TLS
// connections on the inter-node link (the HBONE client multiplexes up to
// 100 tunnels on one HTTP/2 connection per source, destination and
// identities), counted as SYNs to B:15008.
func TestCrossNodePooling(t *testing.T) {
	const n = 150
	l := newLab(t, labOptions{})
	capt := l.capture(l.n1, fmt.Sprintf("tcp dst port %d and tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn", hbonePort))

	conns := make([]*nettest.TCPConn, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 50)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			conns[i], errs[i] = connect(l.a, appAddr(l.b))
		}()
	}
	wg.Wait()
	for i, c := range conns {
		if c != nil {
			t.Cleanup(func() { c.Close() })
		}
		if errs[i] != nil {
			t.Fatalf("connection %d: %v", i, errs[i])
		}
	}
	// Every connection still open and working, so none of them gave its
	// stream slot back before the others were opened.
	for i, c := range conns {
		if err := c.Echo(fmt.Sprintf("conn %d", i)); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
	}
	want := (n + 99) / 100
	var syns int
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dump, err := capt.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(dump, "\n") {
		if strings.Contains(line, fmt.Sprintf("> %s.%d:", l.b.IP, hbonePort)) {
			syns++
		}
	}
	t.Logf("%d connections a -> b used %d TLS connection(s) on the link", n, syns)
	if syns == 0 || syns > want {
		t.Errorf("%d TLS connections for %d tunnels, want 1 to %d:\n%s", syns, n, want, dump)
	}
}
