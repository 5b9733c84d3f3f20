//go:build linux

package agent_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/bpffs/bpffstest"
	"github.com/ambpf/ambpf/pkg/fastpath"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// TestFastPathFollowsEnrolment: with --fastpath, enrolling a pod with a
// cgroup attaches the fast path's app program to it (inspect shows it with
// its counters); unenrolling removes it and leaves no pin.
func TestFastPathFollowsEnrolment(t *testing.T) {
	e := agenttest.NewEnv(t)
	_, proxy, req := startWithFastPath(t, e, "fp", "")
	uid := req.UID
	// The proxy hears that the pod's sockets may be redirected (ZDS
	// WorkloadInfo.FastPath), so it reads them without splice.
	if info, ok := proxy.Info(uid); !ok || !info.FastPath {
		t.Errorf("the proxy's Add of the pod: %+v (running %v), want FastPath set", info, ok)
	}
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
	a, _, _ := startWithFastPath(t, e, "fpu", "")
	if left := bpffstest.Pins(filepath.Join(e.Config.BPFRoot, fastpath.Dir)); len(left) == 0 {
		t.Fatal("no fast path pins after the enrolment")
	}
	a.Stop(t)
	if left := bpffstest.Pins(e.Config.BPFRoot); len(left) > 0 {
		t.Errorf("pins left after the uninstall: %v", left)
	}
}

// TestFastPathOffRemovesLeftovers: an agent started without --fastpath
// on a node where an earlier run attached it removes every fast path pin
// (pods, proxies, node-wide programs and maps): left attached, its
// programs would go on redirecting the pods' new connections while the
// proxy, told of no fast path, splices. The pod stays enrolled.
func TestFastPathOffRemovesLeftovers(t *testing.T) {
	e := agenttest.NewEnv(t)
	a, _, req := startWithFastPath(t, e, "fpl", "")
	dir := filepath.Join(e.Config.BPFRoot, fastpath.Dir)
	if left := bpffstest.Pins(dir); len(left) == 0 {
		t.Fatal("no fast path pins after the enrolment")
	}
	a.Stop(t)
	e.Config.FastPath = fastpath.Off
	e.Start(t)
	if left := bpffstest.Pins(dir); len(left) > 0 {
		t.Errorf("fast path pins left by an agent without the fast path: %v", left)
	}
	ps, err := e.Client.Pod(context.Background(), req.UID)
	if err != nil || ps.FastPath != nil {
		t.Errorf("the pod after the restart without the fast path: %+v, %v; want enrolled, no fast path", ps.FastPath, err)
	}
}

// TestFastPathAnnotation: the pod's choice (its ambpf.io/fastpath
// annotation, as the pod watcher puts it in the enrolment) over the node's
// default. With the default enabled, a pod that says disabled gets no
// fast path (inspect says why, and that is no error) until it changes its
// mind, and loses it again when it says disabled; with --fastpath-default
// disabled only a pod that says enabled gets it.
func TestFastPathAnnotation(t *testing.T) {
	t.Run("default enabled", func(t *testing.T) {
		e := agenttest.NewEnv(t)
		_, _, req := startWithFastPath(t, e, "fpd", agentapi.FastPathDisabled)
		wantFastPath(t, e, req.UID, false, "annotation says disabled")
		req.FastPath = ""
		enrollEnabled(t, e, req)
		wantFastPath(t, e, req.UID, true, "")
		req.FastPath = agentapi.FastPathDisabled
		enrollEnabled(t, e, req)
		wantFastPath(t, e, req.UID, false, "annotation says disabled")
	})
	t.Run("default disabled", func(t *testing.T) {
		e := agenttest.NewEnv(t)
		e.Config.FastPathOptIn = true
		_, _, req := startWithFastPath(t, e, "fpo", "")
		wantFastPath(t, e, req.UID, false, "default is disabled")
		req.FastPath = agentapi.FastPathEnabled
		enrollEnabled(t, e, req)
		wantFastPath(t, e, req.UID, true, "")
	})
}

// wantFastPath checks what the agent reports of pod uid's fast path, and
// its pins: attached, or not attached for a reason containing why.
func wantFastPath(t *testing.T, e *agenttest.Env, uid string, attached bool, why string) {
	t.Helper()
	ps, err := e.Client.Pod(context.Background(), uid)
	if err != nil {
		t.Fatal(err)
	}
	fp := ps.FastPath
	if fp == nil || fp.Attached != attached || fp.Error != "" || !strings.Contains(fp.Disabled, why) || (why == "") != (fp.Disabled == "") {
		t.Fatalf("fast path of %s: %+v, want attached %v, disabled for %q", uid, fp, attached, why)
	}
	_, err = os.Stat(filepath.Join(e.Config.BPFRoot, fastpath.Dir, "pods", uid))
	if attached != (err == nil) {
		t.Errorf("fast path pins of %s (attached %v): %v", uid, attached, err)
	}
}

// startWithFastPath starts e's agent with the fast path (mode to-proxy)
// and a proxy connected, then enrols one pod with its cgroup and the fast
// path choice choice; it returns the agent, the proxy and the pod's
// request. It skips on a kernel without the fast path.
func startWithFastPath(t *testing.T, e *agenttest.Env, prefix, choice string) (*agenttest.Agent, *agenttest.Proxy, agentapi.EnrollRequest) {
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
	req := enrollRequest(pod, newUID(prefix))
	req.Cgroup = cg
	req.FastPath = choice
	enrollEnabled(t, e, req)
	return a, proxy, req
}
