//go:build linux

package agent_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// TestUninstallOnStop: an agent whose Uninstalling answers false on its
// first stop keeps every pod captured through its pins (a restart); on a
// stop where it answers true the agent unenrols every pod, so the apps
// answer directly, and leaves no pin at all under its root (pods, the
// node-wide programs and maps, the probe SNAT's), and no qdisc on the
// pods' interfaces.
func TestUninstallOnStop(t *testing.T) {
	e := agenttest.NewEnv(t)
	var uninstalling atomic.Bool
	asked := 0
	e.Config.Uninstalling = func(context.Context) bool { asked++; return uninstalling.Load() }
	topo := nettest.NewTopology(t, 2)
	startApps(t, topo)
	a := e.Start(t)
	proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
	proxy.Connect()
	uids := enrollAll(t, e, topo.Pods)

	a.Stop(t)
	if asked != 1 {
		t.Fatalf("Uninstalling asked %d times on a stop, want 1", asked)
	}
	if got := e.PinnedUIDs(t); len(got) != len(uids) {
		t.Fatalf("a restart's stop left %v pinned, want %v", got, uids)
	}

	a = e.Start(t)
	agenttest.WaitFor(t, waitLong, "pods enabled again", func() bool {
		st, err := e.Client.Status(context.Background())
		return err == nil && st.Pods.Enabled == len(uids)
	})
	uninstalling.Store(true)
	a.Stop(t)
	if got := e.PinnedUIDs(t); len(got) > 0 {
		t.Errorf("pods still pinned after the uninstall: %v", got)
	}
	if left := bpffstest.Pins(e.Config.BPFRoot); len(left) > 0 {
		t.Errorf("pins left after the uninstall: %v", left)
	}
	for _, p := range topo.Pods {
		out, err := p.Exec(context.Background(), "tc", "qdisc", "show", "dev", "eth0")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(out), "clsact") {
			t.Errorf("%s: clsact qdisc left: %s", p.Name, out)
		}
		dialApp(t, topo.Node, p.IPv4) // uncaptured: the app answers
	}
}
