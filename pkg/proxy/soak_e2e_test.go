//go:build linux

package proxy

import (
	"context"
	"flag"
	"fmt"
	"io/fs"
	"path/filepath"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/nettest"
)

var soakTime = flag.Duration("soak", 3*time.Second, "how long TestSoak churns (make soak: 10m)")

// soakSample is one reading of the node's resources.
type soakSample struct {
	at                   time.Duration
	proxyFDs, goroutines int
	rssKB, liveKB        int
	agentFDs, pinFiles   int
}

// TestSoak churns connections and pods through the real binaries for
// -soak (3 s in make test, 10 min with make soak): pod A opens a
// connection to pod B every 10 ms (each must succeed), while pods 2 and
// 3 are enrolled, reached from A and unenrolled in a loop. Once the churn
// stops and the node is idle again, the proxy's descriptors and
// goroutines (less its pooled HBONE connections), the agent's descriptors
// and the files under the bpffs must be back to their baseline; for runs
// of a minute or more, the proxy's live heap may not grow faster than
// 512 KiB a minute over the second half of the run. RSS is reported, not
// checked: it keeps the heap's high-water mark, which the runtime gives
// back slowly.
func TestSoak(t *testing.T) {
	m := newMeshNode(t, 4)
	agent := m.startAgent()
	proxy := m.startProxy(0)
	id := agenttest.RandomID()
	m.enroll(0, "a-"+id)
	m.enroll(1, "b-"+id)
	m.app(1, "b")
	m.app(2, "c")
	m.app(3, "d")
	agenttest.WaitFor(t, 10*time.Second, "A reaches B", func() bool { return m.served(0, 1, "b") })
	sample := func(start time.Time) soakSample {
		body := m.metricsOf(0)
		return soakSample{
			at:       time.Since(start),
			proxyFDs: fdCount(t, proxy.Pid()), goroutines: int(sumMetric(t, body, "go_goroutines")),
			rssKB: procRSS(t, proxy.Pid()), liveKB: liveHeapKB(t, body),
			agentFDs: fdCount(t, agent.Pid()), pinFiles: countFiles(t, m.ae.Config.BPFRoot),
		}
	}
	idle := func() bool { return m.openConnsOf(0, "outbound") == 0 && m.openConnsOf(0, "inbound") == 0 }
	agenttest.WaitFor(t, 10*time.Second, "idle before the churn", idle)
	start := time.Now()
	base := sample(start)

	addr := fmt.Sprintf("%s:%d", m.lab.Pod(1).IPv4, nettest.AppPort)
	load := startCanaryLoad(t, m.lab.Pod(0), addr, "app b peer="+m.lab.Pod(0).IPv4.String())
	var samples []soakSample
	lastSample := time.Now()
	rounds := 0
	for time.Since(start) < *soakTime {
		for _, i := range []int{2, 3} {
			uid := fmt.Sprintf("churn%d-%d-%s", i, rounds, id)
			m.enrollNoWait(i, uid)
			m.waitState(uid, "enabled", 10*time.Second)
			app := map[int]string{2: "c", 3: "d"}[i]
			agenttest.WaitFor(t, 10*time.Second, "A reaches a churned pod", func() bool { return m.served(0, i, app) })
			if err := m.ae.Client.Unenroll(context.Background(), uid); err != nil {
				t.Fatalf("unenroll %s: %v", uid, err)
			}
		}
		rounds++
		if time.Since(lastSample) >= time.Second {
			samples = append(samples, sample(start))
			lastSample = time.Now()
		}
	}
	stats := load.stop()
	if stats.failed > 0 {
		t.Errorf("%d of %d connections failed during the soak: %v", stats.failed, stats.ok+stats.failed, load.failures())
	}
	agenttest.WaitFor(t, 30*time.Second, "idle after the churn", idle)
	var end soakSample
	var hb float64
	agenttest.WaitFor(t, 30*time.Second, "resources back to baseline", func() bool {
		end = sample(start)
		hb = sumMetric(t, m.metricsOf(0), PodConnectionsMetricName, `listener="hbone"`)
		return end.proxyFDs <= base.proxyFDs+2*int(hb)+4 && end.goroutines <= base.goroutines+4*int(hb)+8 &&
			end.agentFDs <= base.agentFDs+2 && end.pinFiles == base.pinFiles
	})
	slope := kbSlope(samples, func(s soakSample) int { return s.rssKB })
	liveSlope := kbSlope(samples, func(s soakSample) int { return s.liveKB })
	t.Logf("soak %v: %d pod churn rounds (%d enrolments), %d connections ok, %d failed; proxy fds %d -> %d, goroutines %d -> %d (%v pooled HBONE connections), RSS %d -> %d KiB (second-half slope %.0f KiB/min), live heap %d -> %d KiB (second-half slope %.0f KiB/min); agent fds %d -> %d; bpffs files %d -> %d",
		time.Since(start).Round(time.Second), rounds, 2*rounds, stats.ok, stats.failed, base.proxyFDs, end.proxyFDs, base.goroutines, end.goroutines, hb,
		base.rssKB, end.rssKB, slope, base.liveKB, end.liveKB, liveSlope, base.agentFDs, end.agentFDs, base.pinFiles, end.pinFiles)
	if *soakTime >= time.Minute && liveSlope > 512 {
		t.Errorf("the proxy's live heap grows %.0f KiB/min over the second half of the soak", liveSlope)
	}
}

// liveHeapKB estimates the proxy's live heap from /metrics: half the
// heap goal, which the runtime sets to twice the heap that survived the
// last GC (GOGC=100). Unlike RSS and heap in use, it holds no garbage.
func liveHeapKB(t *testing.T, body string) int {
	return int(sumMetric(t, body, "go_memstats_next_gc_bytes") / 2 / 1024)
}

// kbSlope is the least-squares slope, in KiB per minute, of what v reads
// over the second half of the samples (the first half includes warming
// up).
func kbSlope(s []soakSample, v func(soakSample) int) float64 {
	s = s[len(s)/2:]
	if len(s) < 2 {
		return 0
	}
	var sx, sy, sxx, sxy float64
	for _, p := range s {
		x, y := p.at.Minutes(), float64(v(p))
		sx, sy, sxx, sxy = sx+x, sy+y, sxx+x*x, sxy+x*y
	}
	n := float64(len(s))
	d := n*sxx - sx*sx
	if d == 0 {
		return 0
	}
	return (n*sxy - sx*sy) / d
}

// countFiles counts the files under dir (the bpffs pins).
func countFiles(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			n++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}
