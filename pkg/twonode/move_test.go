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
	"github.com/ambpf/ambpf/pkg/nodelab"
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

// TestCrossNodePooling opens concurrent connections from A (node 1) to
// two pods on node 2, 150 to B and 50 to D, and holds them all open: the
// connections to each pod must share at most ⌈N/100⌉ TLS connections on
// the inter-node link (counted as SYNs to port 15008). The HBONE client
// multiplexes up to 100 tunnels on one HTTP/2 connection per source
// identity and IP, destination identities and destination pod address,
// so tunnels to different pods of one node do not share a connection.
func TestCrossNodePooling(t *testing.T) {
	l := newLab(t, labOptions{})
	capt := l.capture(l.n1, fmt.Sprintf("tcp dst port %d and tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn", hbonePort))
	want := map[*nodelab.Pod]int{l.b: 150, l.d: 50}

	var targets []*nodelab.Pod
	for p, n := range want {
		for range n {
			targets = append(targets, p)
		}
	}
	conns := make([]*nettest.TCPConn, len(targets))
	errs := make([]error, len(targets))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 50)
	for i, p := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			conns[i], errs[i] = connect(l.a, appAddr(p))
		}()
	}
	wg.Wait()
	for i, c := range conns {
		if c != nil {
			t.Cleanup(func() { c.Close() })
		}
		if errs[i] != nil {
			t.Fatalf("connection %d to %s: %v", i, targets[i].Name, errs[i])
		}
		if c.Greeting != greeting(targets[i], l.a) {
			t.Fatalf("connection %d: greeting %q", i, c.Greeting)
		}
	}
	// Every connection still open and working, so none of them gave its
	// stream slot back before the others were opened.
	for i, c := range conns {
		if err := c.Echo(fmt.Sprintf("conn %d", i)); err != nil {
			t.Fatalf("connection %d to %s: %v", i, targets[i].Name, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dump, err := capt.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for p, n := range want {
		syns := strings.Count(dump, fmt.Sprintf("> %s.%d:", p.IP, hbonePort))
		t.Logf("%d connections a -> %s used %d TLS connection(s) on the link", n, p.Name, syns)
		if limit := (n + 99) / 100; syns == 0 || syns > limit {
			t.Errorf("%d TLS connections for %d tunnels to %s, want 1 to %d", syns, n, p.Name, limit)
		}
	}
	if t.Failed() {
		t.Logf("SYNs to port %d:\n%s", hbonePort, dump)
	}
}
