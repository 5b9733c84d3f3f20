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

// TestTenThousandConnections holds 10,000 concurrent connections from pod
// A to pod B's app through one ambpf-proxy process (A's outbound relay, the
// HBONE tunnel and B's inbound side all in it). Every one must get the
// app's greeting; the proxy's RSS, descriptors and goroutines are measured
// with all of them open; once they are closed the descriptors and
// goroutines must come back to their baseline.
func TestTenThousandConnections(t *testing.T) {
	const conns = 10000
	// Each connection costs this process two descriptors (client and the
	// app's side) and the proxy about four.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Max < 8*conns {
		t.Skipf("RLIMIT_NOFILE hard limit %d is below the %d descriptors the test needs", lim.Max, 8*conns)
	}
	old := lim
	lim.Cur = lim.Max
	// syscall.Setrlimit (not unix's) so that the children get it too.
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })

	m := newMeshNode(t, 2)
	m.startAgent()
	proxy := m.startProxy(0, "--max-conns-per-pod", "-1")
	id := agenttest.RandomID()
	m.enroll(0, "a-"+id)
	m.enroll(1, "b-"+id)
	m.app(1, "b")
	agenttest.WaitFor(t, 10*time.Second, "A reaches B", func() bool { return m.served(0, 1, "b") })
	pid := proxy.cmd.Process.Pid
	stat := func() (fds, goroutines int, rssKB int) {
		t.Helper()
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			t.Fatal(err)
		}
		return len(ents), int(sumMetric(t, m.metricsOf(0), "go_goroutines")), procRSS(t, pid)
	}
	// Settle: the warm-up connection and its tunnel are gone.
	agenttest.WaitFor(t, 10*time.Second, "proxy idle", func() bool { return m.openConnsOf(0) == 0 })
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
				if i >= conns {
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
		t.Fatalf("%d of %d connections failed; first: %v", n, conns, firstErr.Load())
	}
	fd1, g1, rss1 := stat()
	t.Logf("%d connections open in %v; proxy: %d -> %d descriptors, %d -> %d goroutines, RSS %d -> %d KiB (%.1f KiB per connection)",
		conns, took.Round(time.Millisecond), fd0, fd1, g0, g1, rss0, rss1, float64(rss1-rss0)/conns)

	for i, c := range open {
		c.Close()
		open[i] = nil
	}
	closed := time.Now()
	// The HBONE pool may keep a connection or two to B open: a small slack.
	agenttest.WaitFor(t, 30*time.Second, "proxy descriptors and goroutines back to baseline", func() bool {
		fd, g, _ := stat()
		return fd <= fd0+4 && g <= g0+8
	})
	fd2, g2, rss2 := stat()
	t.Logf("closed: back to %d descriptors, %d goroutines in %v; RSS %d KiB", fd2, g2, time.Since(closed).Round(time.Millisecond), rss2)
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

// openConnsOf is the proxy's ambpf_proxy_pod_connections total.
func (m *meshNode) openConnsOf(slot int) float64 {
	return sumMetric(m.t, m.metricsOf(slot), PodConnectionsMetricName)
}
