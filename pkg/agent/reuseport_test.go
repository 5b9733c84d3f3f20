//go:build linux

package agent_test

import (
	"context"
	"testing"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/zds"
)

// TestReusePortSentOverZDS: every Add the agent sends, in a snapshot (a
// pod enrolled before the proxy connected) and live, carries ambpf's
// ambpf_reuseport with the datapath's probe of the kernel
// (datapath.ProbeReusePortAssign): allowed where bpf_sk_assign takes
// SO_REUSEPORT listeners, refused where not, never absent, so the proxy
// does not fall back to its own guess. The status API reports the same,
// with no probe error.
func TestReusePortSentOverZDS(t *testing.T) {
	e := agenttest.NewEnv(t)
	topo := nettest.NewTopology(t, 2)
	startApps(t, topo)
	e.Start(t)
	probed, err := datapath.ProbeReusePortAssign()
	if err != nil {
		t.Fatalf("the probe (the agent's too, cached): %v", err)
	}
	want := zds.ReusePortRefused
	if probed {
		want = zds.ReusePortAllowed
	}
	ctx := context.Background()
	early := newUID("pod0")
	if _, err := e.Client.Enroll(ctx, enrollRequest(topo.Pods[0], early)); err != nil {
		t.Fatal(err)
	}
	proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
	proxy.Connect()
	agenttest.WaitFor(t, waitLong, "pod enabled from the snapshot", func() bool {
		st, err := e.Client.Pod(ctx, early)
		return err == nil && st.State == agentapi.StateEnabled
	})
	live := newUID("pod1")
	enrollEnabled(t, e, enrollRequest(topo.Pods[1], live))
	for _, c := range []struct{ how, uid string }{{"in the snapshot", early}, {"live", live}} {
		info, ok := proxy.Info(c.uid)
		if !ok {
			t.Fatalf("the proxy runs no %s", c.uid)
		}
		if info.ReusePort != want {
			t.Errorf("Add %s: ambpf_reuseport %s, want %s (the probe says %t)", c.how, info.ReusePort, want, probed)
		}
	}
	st, err := e.Client.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Features.ReusePortAssign != probed || st.Features.ReusePortProbeError != "" {
		t.Errorf("status: reuseport_assign %t (probe error %q), the probe says %t", st.Features.ReusePortAssign, st.Features.ReusePortProbeError, probed)
	}
}
