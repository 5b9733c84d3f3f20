//go:build linux

package fastpath

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var (
	benchFlag   = flag.Bool("fastpath-bench", false, "run TestBenchFastPath (make bench-fastpath): capture + proxy without and with the fast path, interleaved")
	benchRounds = flag.Int("fastpath-bench-rounds", 3, "rounds of the interleaved rows (median reported)")
)

// benchResult is one row's figures in one round.
type benchResult struct {
	p50, p99   time.Duration // request/response latency
	cpuPerReq  time.Duration // this process's CPU (app, proxy, server and their kernel work) per request
	connPerSec float64       // connect + 64 B echo + close, one at a time
	gbps       float64       // one stream app -> proxy -> B
}

// processCPU is this process's user + system time.
func processCPU(t *testing.T) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// benchRow is one configuration measured.
type benchRow struct {
	name     string
	mode     Mode
	noSplice bool // the proxy copies with read/write only
}

// measure runs the three loads on a fresh lab for row.
func measure(t *testing.T, row benchRow) benchResult {
	var r benchResult
	l := newLabWith(t, row.mode, row.noSplice)
	echo := l.serve(t, false, func(c *net.TCPConn) {
		buf := make([]byte, 16<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, err := c.Write(buf[:n]); err != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	})
	sink := l.serve(t, false, func(c *net.TCPConn) { io.Copy(io.Discard, c) })

	// Request/response, 64 B, one connection.
	const reqs, warm = 20000, 200
	fd := l.dial(t, echo)
	msg, buf := make([]byte, 64), make([]byte, 64)
	rr := func() {
		if err := writeAll(fd, msg); err != nil {
			t.Fatal(err)
		}
		if _, err := readFull(fd, len(buf)); err != nil {
			t.Fatal(err)
		}
	}
	for range warm {
		rr()
	}
	lat := make([]time.Duration, reqs)
	cpu0 := processCPU(t)
	for i := range lat {
		t0 := time.Now()
		rr()
		lat[i] = time.Since(t0)
	}
	r.cpuPerReq = (processCPU(t) - cpu0) / reqs
	slices.Sort(lat)
	r.p50, r.p99 = lat[len(lat)/2], lat[len(lat)*99/100]
	l.closeApp(fd)

	// Connection rate: sockets made in the pod beforehand, so the factory
	// round trip is outside the timing.
	const conns = 1500
	fds := make([]int, conns)
	for i := range fds {
		s, err := l.factory.Socket(false)
		if err != nil {
			t.Fatal(err)
		}
		fds[i] = s
	}
	t0 := time.Now()
	for _, s := range fds {
		if err := retryEINTR(func() error { return unix.Connect(s, sockaddr(echo)) }); err != nil {
			t.Fatal(err)
		}
		if err := writeAll(s, msg); err != nil {
			t.Fatal(err)
		}
		tv := unix.Timeval{Sec: 5}
		unix.SetsockoptTimeval(s, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		if _, err := readFull(s, len(buf)); err != nil {
			t.Fatal(err)
		}
		unix.Close(s)
	}
	r.connPerSec = conns / time.Since(t0).Seconds()

	// One stream for 2 s.
	fd = l.dial(t, sink)
	chunk := make([]byte, 256<<10)
	var sent int64
	t0 = time.Now()
	for time.Since(t0) < 2*time.Second {
		if err := writeAll(fd, chunk); err != nil {
			t.Fatal(err)
		}
		sent += int64(len(chunk))
	}
	r.gbps = float64(sent) * 8 / 1e9 / time.Since(t0).Seconds()
	l.closeApp(fd)
	return r
}

// TestBenchFastPath measures capture + the test proxy (the datapath
// tests' proxy, in this process) with the fast path off, to-proxy and
// both: the rows interleaved, each round on fresh labs, medians printed
// as a docs/BENCHMARKS.md table with the load average. Off unless
// -fastpath-bench (make bench-fastpath).
func TestBenchFastPath(t *testing.T) {
	if !*benchFlag {
		t.Skip("a measurement, not a test: make bench-fastpath (-fastpath-bench)")
	}
	rows := []benchRow{
		{"off (today: the proxy splices)", Off, false},
		{"off, proxy without splice", Off, true},
		{"to-proxy", ToProxy, true},
		{"both", Both, true},
	}
	res := map[string][]benchResult{}
	load := []string{loadavg()}
	for round := range *benchRounds {
		for i := range rows {
			// Rotate the order each round so no row always runs first.
			row := rows[(i+round)%len(rows)]
			t.Run(fmt.Sprintf("%d/%d", round, (i+round)%len(rows)), func(t *testing.T) {
				r := measure(t, row)
				res[row.name] = append(res[row.name], r)
				t.Logf("%s: p50 %v p99 %v cpu/req %v conn/s %.0f %.2f Gb/s", row.name, r.p50, r.p99, r.cpuPerReq, r.connPerSec, r.gbps)
			})
		}
		load = append(load, loadavg())
	}
	med := func(m string, f func(benchResult) float64) float64 {
		var v []float64
		for _, r := range res[m] {
			v = append(v, f(r))
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	var b strings.Builder
	fmt.Fprintf(&b, "| fast path | RR p50 µs | RR p99 µs | CPU µs/req | conn/s | stream Gb/s |\n|---|---|---|---|---|---|\n")
	for _, row := range rows {
		m := row.name
		fmt.Fprintf(&b, "| %s | %.1f | %.1f | %.1f | %.0f | %.2f |\n", m,
			med(m, func(r benchResult) float64 { return float64(r.p50.Nanoseconds()) / 1e3 }),
			med(m, func(r benchResult) float64 { return float64(r.p99.Nanoseconds()) / 1e3 }),
			med(m, func(r benchResult) float64 { return float64(r.cpuPerReq.Nanoseconds()) / 1e3 }),
			med(m, func(r benchResult) float64 { return r.connPerSec }),
			med(m, func(r benchResult) float64 { return r.gbps }))
	}
	fmt.Fprintf(&b, "\nmedians of %d rounds; load average (1/5/15 min) at start and after each round: %s\n", *benchRounds, strings.Join(load, " | "))
	t.Logf("\n%s", b.String())
}
