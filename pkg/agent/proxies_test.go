//go:build linux

package agent_test

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/agent"
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
	mnt, err := cgroup.Mount()
	if err != nil {
		t.Fatal(err)
	}
	rel := strings.TrimPrefix(self, mnt)
	if rel == "" {
		rel = "/"
	}
	t.Run("cgroup allowed", func(t *testing.T) {
		e := agenttest.NewEnv(t)
		e.Config.ZDSProxyCgroup = rel
		e.Start(t)
		proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
		proxy.Connect()
		agenttest.WaitFor(t, 10*time.Second, "proxy synced", proxy.Ready)
	})
	for name, cfg := range map[string]func(*agent.Config){
		"uid refused":    func(c *agent.Config) { c.ZDSAllowUIDs = []int{4242} },
		"cgroup refused": func(c *agent.Config) { c.ZDSProxyCgroup = "/ambpf-no-such-proxy-cgroup" },
	} {
		t.Run(name, func(t *testing.T) { testRefused(t, cfg) })
	}
}

// testRefused: an agent configured by cfg refuses the test proxy: no
// connection, nothing trusted, the proxy never synced.
func testRefused(t *testing.T, cfg func(*agent.Config)) {
	e := agenttest.NewEnv(t)
	cfg(&e.Config)
	e.Start(t)
	proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
	proxy.Connect()
	// A negative: watch for a bounded time while the proxy retries (its
	// backoff starts at 10 ms, so it tries several times in a second).
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		st, err := e.Client.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if st.Proxy.Connections != 0 || len(st.Proxy.Cgroups) != 0 || proxy.Ready() {
			t.Fatalf("a refused proxy got in: %+v", st.Proxy)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
