//go:build linux

package agent_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/fastpath"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// TestFastPathFollowsEnrolment: with --fastpath, enrolling a pod with a
// cgroup attaches the fast path's app program to it (inspect shows it with
// its counters); unenrolling removes it and leaves no pin.
func TestFastPathFollowsEnrolment(t *testing.T) {
	e := agenttest.NewEnv(t)
	_, uid := startWithFastPath(t, e, "fp")
	ctx := context.Background()
	ps, err := e.Client.Pod(ctx, uid)
	if err != nil {
		t.Fatal(err)
	}
	if ps.FastPath == nil || !ps.FastPath.Attached || ps.FastPath.Mode != string(fastpath.ToProxy) || ps.FastPath.Index != ps.Datapath.Index {
		t.Fatalf("fast path after enrolment: %+v (datapath index %d)", ps.FastPath, ps.Datapath.Index)
	}
	dir := filepath.Join(e.Config.BPFRoot, fastpath.Dir, "pods", uid)
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("fast path pins: %v", err)
	}
	if err := e.Client.Unenroll(ctx, uid); err != nil {
		t.Fatal(err)
	}
	if left := bpffstest.Pins(dir); len(left) > 0 {
		t.Errorf("fast path pins left after unenrol: %v", left)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("fast path pod directory left: %v", err)
	}
}

// TestUninstallRemovesFastPath: an agent with --fastpath that stops after
// its DaemonSet was deleted leaves no pin at all under its root, the fast
// path's node-wide programs and maps included, though a pod with the fast
// path was enrolled.
func TestUninstallRemovesFastPath(t *testing.T) {
	e := agenttest.NewEnv(t)
	e.Config.Uninstalling = func(context.Context) bool { return true }
	a, _ := startWithFastPath(t, e, "fpu")
	if left := bpffstest.Pins(filepath.Join(e.Config.BPFRoot, fastpath.Dir)); len(left) == 0 {
		t.Fatal("no fast path pins after the enrolment")
	}
	a.Stop(t)
	if left := bpffstest.Pins(e.Config.BPFRoot); len(left) > 0 {
		t.Errorf("pins left after the uninstall: %v", left)
	}
}

// startWithFastPath starts e's agent with the fast path (mode to-proxy)
// and a proxy connected, then enrols one pod with its cgroup; it returns
// the agent and the pod's uid. It skips on a kernel without the fast path.
func startWithFastPath(t *testing.T, e *agenttest.Env, prefix string) (*agenttest.Agent, string) {
	t.Helper()
	if err := fastpath.Supported(); err != nil {
		t.Skipf("kernel without the fast path: %v", err)
	}
	e.Config.FastPath = fastpath.ToProxy
	topo := nettest.NewTopology(t, 1)
	a := e.Start(t)
	proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
	proxy.Connect()
	pod := topo.Pods[0]
	cg, err := pod.Cgroup()
	if err != nil {
		t.Fatal(err)
	}
	uid := newUID(prefix)
	req := enrollRequest(pod, uid)
	req.Cgroup = cg
	enrollEnabled(t, e, req)
	return a, uid
}
