//go:build linux

package agent_test

import (
	"context"
	"errors"
	"testing"

	"github.com/ambpf/ambpf/pkg/agent"
	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// admitAll is a Controller that admits every API enrolment as it is and
// has nothing of its own to rebuild: the Kubernetes mode's decisions
// without an API server (pure logic; the real watcher is pkg/podwatch's).
type admitAll struct{}

func (admitAll) Admit(context.Context, *agentapi.EnrollRequest) (bool, string, error) {
	return true, "", nil
}
func (admitAll) Changed(agentapi.PodState, bool)          {}
func (admitAll) Locate(agentapi.PodState) (string, error) { return "", errors.New("not located") }
func (admitAll) Run(ctx context.Context, _ agent.Ops, synced func()) error {
	synced()
	<-ctx.Done()
	return nil
}

// TestNoProxyFailsAPIEnrolment: with a Controller (the Kubernetes mode,
// where the API's caller is the runtime's CNI ADD) an enrolment while no
// proxy is connected, or one the proxy nacks, fails with no_proxy and
// leaves nothing attached: the app answers directly and no pin is left.
// Once a proxy takes pods the same request enrols the pod, enabled.
func TestNoProxyFailsAPIEnrolment(t *testing.T) {
	e := agenttest.NewEnv(t)
	e.Config.Controller = admitAll{}
	topo := nettest.NewTopology(t, 1)
	startApps(t, topo)
	e.Start(t)
	pod := topo.Pods[0]
	uid := newUID("pod0")
	ctx := context.Background()
	refused := func(what string) {
		t.Helper()
		_, err := e.Client.Enroll(ctx, enrollRequest(pod, uid))
		var ae *agentapi.Error
		if !errors.As(err, &ae) || ae.Code != agentapi.CodeNoProxy || ae.HTTPStatus != 503 {
			t.Fatalf("%s: enrol = %v, want a 503 %s error", what, err, agentapi.CodeNoProxy)
		}
		if pins := e.PinnedUIDs(t); len(pins) > 0 {
			t.Errorf("%s: pins left: %v", what, pins)
		}
		if pods, err := e.Client.Pods(ctx); err != nil || len(pods) > 0 {
			t.Errorf("%s: agent still lists %v (%v)", what, pods, err)
		}
		dialApp(t, topo.Node, pod.IPv4) // not captured: the app answers
	}
	refused("no proxy connected")

	proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
	proxy.SetAddHook(func(string) error { return errors.New("not now") })
	proxy.Connect()
	agenttest.WaitFor(t, waitLong, "proxy connected", proxy.Ready)
	refused("the proxy nacks")
	if r := proxy.Running(); len(r) > 0 {
		t.Errorf("pod proxies running for abandoned pods: %v", r)
	}

	proxy.SetAddHook(nil)
	st, err := e.Client.Enroll(ctx, enrollRequest(pod, uid))
	if err != nil || st.State != agentapi.StateEnabled {
		t.Fatalf("with the proxy taking pods: %+v, %v; want enabled", st, err)
	}
	dialApp(t, topo.Node, pod.IPv4)
	expectCaptured(t, proxy.Pod(uid), nettest.BridgeV4, pod.IPv4)
}
