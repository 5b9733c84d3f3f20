//go:build linux

package bench

import (
	"errors"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// Every benchmark builds its world inside the function, so each of the
// runs testing.B makes while it sizes b.N gets a fresh topology: the
// reported (last) run never inherits TIME_WAIT or conntrack state from a
// previous run or another mechanism. Setup is outside the timer.

// forEachCase runs fn for each direction and, inside it, each mechanism
// in -mechs order: BenchmarkX/out/none, BenchmarkX/out/iptables, ...
func forEachCase(b *testing.B, fn func(b *testing.B, mech string, dir direction)) {
	for _, dir := range []direction{outbound, inbound} {
		b.Run(string(dir), func(b *testing.B) {
			for _, m := range mechanisms(b) {
				b.Run(m, func(b *testing.B) { fn(b, m, dir) })
			}
		})
	}
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// BenchmarkConnect measures connection setup: connect, echo 64 bytes,
// close, one connection per op, client pod -> server pod. Besides ns/op it
// reports the CPU the whole system spent per connection and the conntrack
// entries each connection left in the captured pod.
func BenchmarkConnect(b *testing.B) {
	forEachCase(b, func(b *testing.B, mech string, dir direction) {
		s := newScenario(b, mech, dir)
		if err := s.connectLoop(warmup); err != nil {
			b.Fatalf("warm-up: %v", err)
		}
		ctBefore, ctOK := conntrackEntries(s.a)
		before := readCPU(b)
		b.ResetTimer()
		start := time.Now()
		err := s.connectLoop(b.N)
		elapsed := time.Since(start)
		b.StopTimer()
		used := readCPU(b).sub(before)
		if err != nil {
			b.Fatal(err)
		}
		n := float64(b.N)
		b.ReportMetric(n/elapsed.Seconds(), "conn/s")
		b.ReportMetric(us(used.self)/n, "cpu-us/conn")
		b.ReportMetric(us(used.cpuset)/n, "cpuset-us/conn")
		if ct, ok := conntrackEntries(s.a); ok && ctOK {
			b.ReportMetric(float64(ct-ctBefore)/n, "ct/conn")
		}
	})
}

// BenchmarkRequest measures request latency on one long-lived connection:
// one op is a 64-byte ping-pong. It reports the median and 99th percentile
// of the individual round trips besides the mean (ns/op).
func BenchmarkRequest(b *testing.B) {
	forEachCase(b, func(b *testing.B, mech string, dir direction) {
		measureRequests(b, newScenario(b, mech, dir))
	})
}

// measureRequests runs b.N 64-byte ping-pongs on one connection of s and
// reports p50-us, p99-us, cpu-us/req and cpuset-us/req.
func measureRequests(b *testing.B, s *scenario) {
	c, err := s.dial()
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	out, in := message(), make([]byte, msgSize)
	for range warmup {
		if err := echo(c, out, in); err != nil {
			b.Fatalf("warm-up: %v", err)
		}
	}
	lat := make([]time.Duration, b.N)
	deadline := time.Now().Add(loopLimit)
	before := readCPU(b)
	b.ResetTimer()
	for i := range b.N {
		t0 := time.Now()
		if err := echo(c, out, in); err != nil {
			b.Fatalf("request %d: %v", i, err)
		}
		lat[i] = time.Since(t0)
		if t0.After(deadline) {
			b.Fatalf("request loop passed %v after %d of %d requests", loopLimit, i+1, b.N)
		}
	}
	b.StopTimer()
	used := readCPU(b).sub(before)
	n := float64(b.N)
	b.ReportMetric(us(percentile(lat, 50)), "p50-us")
	b.ReportMetric(us(percentile(lat, 99)), "p99-us")
	b.ReportMetric(us(used.self)/n, "cpu-us/req")
	b.ReportMetric(us(used.cpuset)/n, "cpuset-us/req")
}

// maxEnrolPods caps the fresh pods one enrolment run creates (pod
// addresses are 10.77.0.10 + i); beyond it pods are reused, which a
// -benchtime of a few seconds never reaches.
const maxEnrolPods = 200

// BenchmarkEnroll measures enrolling a fresh pod, as at pod start, and
// removing it again, one pod per op: nettest.IPTables (what the scenario
// table uses: checks, both restores through `ip netns exec`, policy
// routing), the bare iptables-restore + ip6tables-restore floor, and
// datapath.Attach/Detach (programs loaded and verified per pod). CPU
// includes child processes. Pod 0 stays enrolled with the same mechanism
// for the whole run, as other pods on a node would be, so the ops do not
// also switch the kernel's global hooks and static keys on and off.
func BenchmarkEnroll(b *testing.B) {
	for _, m := range enrolMechanisms(b) {
		b.Run(m, func(b *testing.B) {
			requireRoot(b)
			topo := nettest.NewTopology(b, 1+min(b.N, maxEnrolPods))
			neighbour, pods := topo.Pod(0), topo.Pods[1:]
			c := newCapture(b, topo, m)
			if err := c.Enroll(neighbour, nettest.CaptureOptions{}); err != nil {
				b.Fatalf("enroll the neighbour pod: %v", err)
			}
			topo.Cleanup(func() error {
				// A failed loop may leave a pod enrolled.
				errs := []error{c.Unenroll(neighbour)}
				for _, p := range pods {
					if err := c.Unenroll(p); err != nil && !errors.Is(err, datapath.ErrNotAttached) {
						errs = append(errs, err)
					}
				}
				return errors.Join(errs...)
			})
			var enrol, unenrol time.Duration
			before := readCPU(b)
			b.ResetTimer()
			for i := range b.N {
				p := pods[i%len(pods)]
				t0 := time.Now()
				if err := c.Enroll(p, nettest.CaptureOptions{}); err != nil {
					b.Fatalf("pod %d: %v", i, err)
				}
				t1 := time.Now()
				if err := c.Unenroll(p); err != nil {
					b.Fatalf("pod %d: %v", i, err)
				}
				enrol += t1.Sub(t0)
				unenrol += time.Since(t1)
			}
			b.StopTimer()
			used := readCPU(b).sub(before)
			n := float64(b.N)
			b.ReportMetric(us(enrol)/n, "enroll-us")
			b.ReportMetric(us(unenrol)/n, "unenroll-us")
			b.ReportMetric(us(used.self+used.children)/n, "cpu-us/cycle")
			b.ReportMetric(us(used.cpuset)/n, "cpuset-us/cycle")
		})
	}
}
