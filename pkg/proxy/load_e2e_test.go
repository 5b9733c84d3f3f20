//go:build linux

package proxy

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// TestTenThousandConnections holds 10,000 concurrent connections (fewer
// when RLIMIT_NOFILE's hard limit cannot be raised; it says so) from pod
// A to pod B's app through one ambpf-proxy process (A's outbound relay, the
// HBONE tunnel and B's inbound side all in it). Every one must get the
// app's greeting; the proxy's RSS, descriptors and goroutines are measured
// with all of them open; once they are closed the descriptors and
// goroutines must come back to their baseline.
func TestTenThousandConnections(t *testing.T) {
	conns := 10000
	// Each connection costs the proxy two descriptors (A's accepted
	// socket, B's socket to the app) plus its share of the HBONE
	// connections, and this process (client and app) four, as measured.
	perConn, reserve := 4.2, 1500
	need := uint64(float64(conns)*perConn) + uint64(reserve)
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	old := lim
	// Root with CAP_SYS_RESOURCE may raise the hard limit too (up to
	// fs.nr_open); without it the hard limit caps the count.
	raised := lim
	raised.Max = max(lim.Max, need)
	raised.Cur = raised.Max
	// syscall.Setrlimit (not unix's) so that the children get it too.
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
		raised = lim
		raised.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
			t.Fatal(err)
		}
		conns = int(float64(lim.Max-uint64(reserve)) / perConn)
		t.Logf("the RLIMIT_NOFILE hard limit is %d and cannot be raised (%v): %d connections instead of 10,000", lim.Max, err, conns)
		if conns < 1000 {
			t.Skipf("RLIMIT_NOFILE hard limit %d leaves room for only %d connections", lim.Max, conns)
		}
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })

	m := newMeshNode(t, 2)
	m.startAgent()
	proxy := m.startProxy(0, "--max-conns-per-pod", "-1")
	m.meshAB()
	pid := proxy.Pid()
	stat := func() (fds, goroutines int, rssKB int) {
		t.Helper()
		return fdCount(t, pid), int(sumMetric(t, m.metricsOf(0), "go_goroutines")), procRSS(t, pid)
	}
	// Settle: the warm-up connection is gone (its pooled HBONE connection
	// stays).
	agenttest.WaitFor(t, 10*time.Second, "proxy idle", func() bool { return m.openConnsOf(0, "outbound") == 0 })
	fd0, g0, rss0 := stat()

	a, b := m.lab.Pod(0), m.lab.Pod(1)
	addr := fmt.Sprintf("%s:%d", b.IPv4, nettest.AppPort)
	greeting := "app b peer=" + a.IPv4.String()
	open := make([]net.Conn, conns)
	var failed atomic.Int64
	var firstErr atomic.Value
	start := time.Now()
	var wg sync.WaitGroup
	next := atomic.Int64{}
	for range 64 {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= int64(conns) {
					return
				}
				c, err := nettest.OpenTCP(func(ctx context.Context) (net.Conn, error) { return a.Dial(ctx, "tcp", addr) })
				if err == nil && c.Greeting != greeting {
					err = fmt.Errorf("greeting %q", c.Greeting)
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("connection %d: %v", i, err))
					if c != nil {
						c.Close()
					}
					continue
				}
				c.Conn.SetDeadline(time.Time{})
				open[i] = c.Conn
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	t.Cleanup(func() {
		for _, c := range open {
			if c != nil {
				c.Close()
			}
		}
	})
	if n := failed.Load(); n > 0 {
		self, _ := os.ReadDir("/proc/self/fd")
		t.Fatalf("%d of %d connections failed (this process holds %d descriptors, the proxy %d); first: %v", n, conns, len(self), fdCount(t, pid), firstErr.Load())
	}
	fd1, g1, rss1 := stat()
	t.Logf("%d connections open in %v; proxy: %d -> %d descriptors, %d -> %d goroutines, RSS %d -> %d KiB (%.1f KiB per connection)",
		conns, took.Round(time.Millisecond), fd0, fd1, g0, g1, rss0, rss1, float64(rss1-rss0)/float64(conns))

	for i, c := range open {
		c.Close()
		open[i] = nil
	}
	closed := time.Now()
	// What may stay is the HBONE pool: the client keeps its HTTP/2
	// connections to B (each carried many tunnels) until their idle
	// timeout (5 min), and each is two descriptors in this proxy (client
	// and server side) with a few goroutines. Everything per connection
	// must be gone.
	var fd2, g2, rss2 int
	var hb float64
	deadline := time.Now().Add(30 * time.Second)
	for {
		fd2, g2, rss2 = stat()
		body := m.metricsOf(0)
		out := sumMetric(t, body, PodConnectionsMetricName, `listener="outbound"`)
		in := sumMetric(t, body, PodConnectionsMetricName, `listener="inbound"`)
		hb = sumMetric(t, body, PodConnectionsMetricName, `listener="hbone"`)
		if out == 0 && in == 0 && fd2 <= fd0+2*int(hb)+4 && g2 <= g0+4*int(hb)+8 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("30 s after closing: the proxy holds %d descriptors and %d goroutines (baseline %d, %d); pod connections outbound %v, inbound %v, hbone %v",
				fd2, g2, fd0, g0, out, in, hb)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("closed: in %v back to %d descriptors, %d goroutines (baseline %d, %d, plus %v pooled HBONE connections); RSS %d KiB",
		time.Since(closed).Round(time.Millisecond), fd2, g2, fd0, g0, hb, rss2)
	if hb > float64(conns)/20 {
		t.Errorf("%v pooled HBONE connections for %d tunnels: the pool does not multiplex", hb, conns)
	}
}

// fdCount is the number of descriptors pid holds.
func fdCount(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// procRSS is a process's resident set in KiB.
func procRSS(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatalf("no VmRSS for %d", pid)
	return 0
}

// metricsOf fetches /metrics of the proxy in slot from the node netns.
func (m *meshNode) metricsOf(slot int) string {
	m.t.Helper()
	e := &binEnv{t: m.t, lab: m.lab}
	return e.metricsAt(proxyMetricsAddr(slot))
}

// openConnsOf is the proxy's ambpf_proxy_pod_connections of a listener.
func (m *meshNode) openConnsOf(slot int, listener string) float64 {
	return sumMetric(m.t, m.metricsOf(slot), PodConnectionsMetricName, `listener="`+listener+`"`)
}
