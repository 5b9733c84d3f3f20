//go:build linux

package kubee2e

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/podwatch"
)

// TestAgentRestart: with a captured HBONE connection open, the agent stops,
// loses its state file, and starts again. It rebuilds its pods from the
// API (the pods annotated enabled, their netns found through /proc), the
// connection carries on, the annotations stay, new connections are HBONE.
func TestAgentRestart(t *testing.T) {
	c := newCluster(t)
	mesh := c.namespace("restart", map[string]string{podwatch.DataplaneModeLabel: podwatch.DataplaneAmbient})
	a := c.startPod(mesh, "a", podOpts{})
	b := c.startPod(mesh, "b", podOpts{})
	for _, p := range []*kpod{a, b} {
		c.waitAnnotation(p, podwatch.RedirectionEnabled)
	}
	long := mustDial(t, a, b)
	echo(t, long, "before")

	c.stopAgent()
	if err := os.Remove(filepath.Join(c.env.Config.StateDir, "state.json")); err != nil {
		t.Fatalf("remove the state file: %v", err)
	}
	c.startAgent()
	for _, p := range []*kpod{a, b} {
		if ok, _ := c.enrolled(p); !ok {
			t.Fatalf("%s not rebuilt from the API", p)
		}
	}
	agenttest.WaitFor(t, waitLong, "the proxy acks the rebuilt pods", func() bool {
		sa, _ := c.agent.Pod(a.uid)
		sb, _ := c.agent.Pod(b.uid)
		return sa.State == podwatch.RedirectionEnabled && sb.State == podwatch.RedirectionEnabled
	})
	for _, p := range []*kpod{a, b} {
		c.waitAnnotation(p, podwatch.RedirectionEnabled)
	}
	echo(t, long, "after the restart")

	cap := c.capture()
	tc := mustDial(t, a, b)
	echo(t, tc, marker)
	tc.Conn.Close()
	raw, lines := cap.stop(a, b, "")
	expectHBONE(t, raw, lines)
	echo(t, long, "still there")
}
