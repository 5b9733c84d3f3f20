//go:build linux

package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/ambpf/ambpf/hack/bench/benchproc"
	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// BenchmarkScaleProcesses measures the installed agent and proxy (the
// ambpf-agent and ambpf-proxy binaries, started as the README runs them,
// in the node's namespace) with 1 pod and then with 250 pods enrolled
// through the agent's API: their resident memory (VmRSS, read from
// /proc/<pid>/status of the real processes) once every pod is enabled
// (attached and acked by the proxy). The timed loop is the agent's status
// call, which reads the state of every pod.
func BenchmarkScaleProcesses(b *testing.B) {
	requireRoot(b)
	maxLevel := scaleLevels[len(scaleLevels)-1]
	pods, topo := podPool(b, maxLevel)
	ae := agenttest.NewEnv(b)
	bins := benchproc.Build(b, "ambpf-agent", "ambpf-proxy")
	agent := benchproc.Start(b, topo.Node, ae.Dir, nil, filepath.Join(bins, "ambpf-agent"),
		"--bpf-root", ae.Config.BPFRoot, "--state-dir", ae.Config.StateDir,
		"--zds-socket", ae.Config.ZDSPath, "--api-socket", ae.Config.APISocket,
		"--ready-addr", "off", "--probe-snat=false", "--log-level", "warn")
	agenttest.WaitFor(b, 20*time.Second, "agent ready", func() bool {
		st, err := ae.Client.Status(context.Background())
		return err == nil && st.Ready && !agent.Exited()
	})
	proxy := benchproc.Start(b, topo.Node, ae.Dir, nil, filepath.Join(bins, "ambpf-proxy"),
		"--zds-path", ae.Config.ZDSPath, "--state-dir", filepath.Join(ae.Dir, "proxy"),
		"--metrics-addr", "127.0.0.1:0", "--ready-addr", "off", "--log-level", "warn")
	enrolled := 0
	b.Cleanup(func() {
		forAll(pods[:enrolled], func(p *nettest.Pod) error { return ae.Client.Unenroll(context.Background(), p.NSName) })
	})
	for _, level := range []int{1, maxLevel} {
		batch := pods[enrolled:level]
		if err := forAll(batch, func(p *nettest.Pod) error {
			_, err := ae.Client.Enroll(context.Background(), agentapi.EnrollRequest{
				UID: p.NSName, Name: p.Name, Namespace: "bench", ServiceAccount: "sa", Netns: p.NSPath})
			return err
		}); err != nil {
			b.Fatalf("enrol %d pods: %v", level, err)
		}
		enrolled = level
		agenttest.WaitFor(b, 2*time.Minute, fmt.Sprintf("%d pods enabled", level), func() bool {
			ps, err := ae.Client.Pods(context.Background())
			if err != nil || len(ps) != level {
				return false
			}
			for _, p := range ps {
				if p.State != agentapi.StateEnabled {
					return false
				}
			}
			return true
		})
		name := "ebpf-1pod"
		if level > 1 {
			name = fmt.Sprintf("ebpf-%dpods", level)
		}
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				if _, err := ae.Client.Status(context.Background()); err != nil {
					b.Fatal(err)
				}
			}
			for _, p := range []struct {
				proc *benchproc.Process
				unit string
			}{{agent, "agent-rss-mib"}, {proxy, "proxy-rss-mib"}} {
				if p.proc.Exited() {
					b.Fatalf("%s: process exited: %v\n%s", p.unit, p.proc.Err(), p.proc.Tail(20))
				}
				rss, err := p.proc.RSS()
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(float64(rss)/(1<<20), p.unit)
			}
		})
	}
}
