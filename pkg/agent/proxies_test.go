//go:build linux

package agent_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/cgroup"
)

// TestProxyAdmission: a proxy connecting over ZDS has its cgroup trusted by
// the datapath before anything else (status lists it, with its pid), and a
// process running as a uid that may not be a proxy is refused: no
// connection, nothing trusted.
func TestProxyAdmission(t *testing.T) {
	self, err := cgroup.OfProcess(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	selfID, err := cgroup.ID(self)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("allowed", func(t *testing.T) {
		e := agenttest.NewEnv(t)
		e.Start(t)
		proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
		proxy.Connect()
		agenttest.WaitFor(t, 10*time.Second, "proxy synced", proxy.Ready)
		st, err := e.Client.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Proxy.Cgroups) != 1 || st.Proxy.Cgroups[0].ID != selfID || st.Proxy.Cgroups[0].PID != uint32(os.Getpid()) {
			t.Errorf("trusted cgroups %+v, want this process's (%d, pid %d)", st.Proxy.Cgroups, selfID, os.Getpid())
		}
	})
	t.Run("uid refused", func(t *testing.T) {
		e := agenttest.NewEnv(t)
		e.Config.ZDSAllowUIDs = []int{4242}
		e.Start(t)
		proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
		proxy.Connect()
		// The proxy retries with backoff; give it several attempts.
		deadline := time.Now().Add(time.Second)
		for time.Now().Before(deadline) {
			st, err := e.Client.Status(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if st.Proxy.Connections != 0 || len(st.Proxy.Cgroups) != 0 || proxy.Ready() {
				t.Fatalf("a refused uid got in: %+v", st.Proxy)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}
