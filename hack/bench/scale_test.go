//go:build linux

package bench

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// The node-scale benchmarks: what enrolling costs with many pods already
// on the node, a burst of pods at once, the kernel memory per pod, and
// whether the per-packet cost stays flat as pods are added. Each sets up
// its pods once, outside the timed sub-benchmarks.

// scaleLevels are the numbers of pods already enrolled that enrolment is
// measured at; scaleBurst is the burst size.
var scaleLevels = []int{1, 100, 250}

const (
	scaleBurst = 100
	// scaleMeasured pods are enrolled and removed in turn by the timed loop.
	scaleMeasured = 10
	// labPods is how many pods one lab holds here (netlab allows 244).
	labPods = 200
)

// podPool returns n pods, from as many labs as needed. Labs are separate
// node namespaces (their addresses repeat), which enrolment does not mind.
func podPool(tb testing.TB, n int) (pods []*nettest.Pod, first *nettest.Topology) {
	tb.Helper()
	for len(pods) < n {
		topo := nettest.NewTopology(tb, min(labPods, n-len(pods)))
		if first == nil {
			first = topo
		}
		pods = append(pods, topo.Pods...)
	}
	return pods, first
}

// forAll runs fn on every pod at once and joins the errors.
func forAll(pods []*nettest.Pod, fn func(*nettest.Pod) error) error {
	errs := make([]error, len(pods))
	var wg sync.WaitGroup
	for i, p := range pods {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fn(p)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// scaleMechanisms are the enrolment mechanisms compared at scale, in
// -mechs order: eBPF against the bare iptables-restore floor.
func scaleMechanisms(tb testing.TB) []string {
	var out []string
	for _, m := range enrolMechanisms(tb) {
		if m == mechEBPF || m == mechRestore {
			out = append(out, m)
		}
	}
	return out
}

// BenchmarkScaleEnroll measures, per mechanism: enrolling and removing one
// pod (p50 and p99 of the loop's cycles, CPU per cycle) with 1, 100 and
// 250 pods already enrolled; a burst of 100 pods enrolled all at once and
// removed all at once; and, for eBPF, the kernel memory of the BPF maps
// and programs at 250 pods.
func BenchmarkScaleEnroll(b *testing.B) {
	requireRoot(b)
	maxLevel := scaleLevels[len(scaleLevels)-1]
	for _, m := range scaleMechanisms(b) {
		pods, topo := podPool(b, maxLevel+scaleMeasured+1)
		background, measured, scratch := pods[:maxLevel], pods[maxLevel:maxLevel+scaleMeasured], pods[len(pods)-1]
		c := newScaleCapture(b, topo, m, scratch)
		enrolledN := 0
		topo.Cleanup(func() error {
			return forAll(background, func(p *nettest.Pod) error {
				if err := c.Unenroll(p); err != nil && !errors.Is(err, datapath.ErrNotAttached) && m == mechEBPF {
					return err
				}
				return nil
			})
		})
		for _, level := range scaleLevels {
			if err := forAll(background[enrolledN:level], func(p *nettest.Pod) error {
				return c.Enroll(p, nettest.CaptureOptions{})
			}); err != nil {
				b.Fatalf("enrol %d pods: %v", level, err)
			}
			enrolledN = level
			b.Run(fmt.Sprintf("with-%d/%s", level, m), func(b *testing.B) {
				enrolCycles(b, c, measured)
				if e, ok := c.(ebpfCapture); ok && level == maxLevel {
					reportMemory(b, e.l)
				}
			})
		}
		if err := forAll(background, c.Unenroll); err != nil {
			b.Fatalf("remove the pods: %v", err)
		}
		enrolledN = 0
		b.Run(fmt.Sprintf("burst-%d/%s", scaleBurst, m), func(b *testing.B) {
			burst(b, c, background[:scaleBurst])
		})
	}
}

// newScaleCapture is newCapture for the scale benchmarks: the restore
// floor reads its rules back from scratch, which is never enrolled again.
func newScaleCapture(b *testing.B, topo *nettest.Topology, m string, scratch *nettest.Pod) nettest.Capture {
	if m == mechRestore {
		return newRestoreCapture(b, scratch)
	}
	return newCapture(b, topo, m)
}

// enrolCycles enrols and removes the measured pods in turn, b.N times,
// and reports the median and 99th percentile of each step and the CPU of
// the process and its children per cycle.
func enrolCycles(b *testing.B, c nettest.Capture, measured []*nettest.Pod) {
	enrol, remove := make([]time.Duration, b.N), make([]time.Duration, b.N)
	before := readCPU(b)
	b.ResetTimer()
	for i := range b.N {
		p := measured[i%len(measured)]
		t0 := time.Now()
		if err := c.Enroll(p, nettest.CaptureOptions{}); err != nil {
			b.Fatalf("cycle %d: %v", i, err)
		}
		t1 := time.Now()
		if err := c.Unenroll(p); err != nil {
			b.Fatalf("cycle %d: %v", i, err)
		}
		enrol[i], remove[i] = t1.Sub(t0), time.Since(t1)
	}
	b.StopTimer()
	used := readCPU(b).sub(before)
	b.ReportMetric(us(percentile(enrol, 50)), "enroll-p50-us")
	b.ReportMetric(us(percentile(enrol, 99)), "enroll-p99-us")
	b.ReportMetric(us(percentile(remove, 50)), "unenroll-p50-us")
	b.ReportMetric(us(percentile(remove, 99)), "unenroll-p99-us")
	b.ReportMetric(us(used.self+used.children)/float64(b.N), "cpu-us/cycle")
}

// burst enrols all pods at once and removes them all at once, b.N times,
// reporting the wall time of each and the CPU per pod.
func burst(b *testing.B, c nettest.Capture, pods []*nettest.Pod) {
	var enrol, remove time.Duration
	before := readCPU(b)
	b.ResetTimer()
	for i := range b.N {
		t0 := time.Now()
		if err := forAll(pods, func(p *nettest.Pod) error { return c.Enroll(p, nettest.CaptureOptions{}) }); err != nil {
			b.Fatalf("burst %d: %v", i, err)
		}
		t1 := time.Now()
		if err := forAll(pods, c.Unenroll); err != nil {
			b.Fatalf("burst %d: %v", i, err)
		}
		enrol += t1.Sub(t0)
		remove += time.Since(t1)
	}
	b.StopTimer()
	used := readCPU(b).sub(before)
	n := float64(b.N)
	b.ReportMetric(us(enrol)/1000/n, "burst-enroll-ms")
	b.ReportMetric(us(remove)/1000/n, "burst-unenroll-ms")
	b.ReportMetric(us(used.self+used.children)/n/float64(len(pods)), "cpu-us/pod")
}

// reportMemory reports the kernel memory of the datapath's BPF objects.
func reportMemory(b *testing.B, l *datapath.Loader) {
	m, err := l.Memory()
	if err != nil {
		b.Fatalf("memory: %v", err)
	}
	b.ReportMetric(float64(m.PerPod())/1024, "bpf-kib/pod")
	b.ReportMetric(float64(m.Total())/1024, "bpf-kib-total")
	b.ReportMetric(float64(m.Node)/1024, "bpf-kib-node")
}

// BenchmarkScaleRequest measures 64-byte request latency and CPU per
// request through the eBPF capture with only the client's pod enrolled,
// then with 249 more pods enrolled on the same node programs: the
// per-packet cost must not grow with the pod count.
func BenchmarkScaleRequest(b *testing.B) {
	requireRoot(b)
	for _, m := range mechanisms(b) {
		if m != mechEBPF {
			continue
		}
		s := newScenario(b, m, outbound)
		l := s.capture.(ebpfCapture).l
		b.Run("ebpf-1pod", func(b *testing.B) { measureRequests(b, s) })
		others, _ := podPool(b, scaleLevels[len(scaleLevels)-1]-1)
		s.topo.Cleanup(func() error {
			return forAll(others, func(p *nettest.Pod) error {
				if err := l.Detach(p.NSName); err != nil && !errors.Is(err, datapath.ErrNotAttached) {
					return err
				}
				return nil
			})
		})
		if err := forAll(others, func(p *nettest.Pod) error {
			_, err := l.Attach(datapath.Pod{UID: p.NSName, Netns: p.NS})
			return err
		}); err != nil {
			b.Fatalf("enrol the other pods: %v", err)
		}
		b.Run(fmt.Sprintf("ebpf-%dpods", len(others)+1), func(b *testing.B) { measureRequests(b, s) })
	}
}
