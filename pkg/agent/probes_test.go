//go:build linux

package agent_test

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/probesnat"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

// probeView opens the probe SNAT pins of the Env from the topology's node
// namespace, as a second process would.
func probeView(t *testing.T, e *agenttest.Env, node *nettest.Netns) *probesnat.Loader {
	t.Helper()
	l, err := probesnat.New(probesnat.Config{Root: e.Config.BPFRoot, Netns: node.NS, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func probeDevices(t *testing.T, l *probesnat.Loader) []string {
	t.Helper()
	all, err := l.List()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, st := range all {
		if !st.Attached {
			t.Errorf("probe snat on %s is pinned but not attached: %+v", st.Interface, st)
		}
		out = append(out, st.Interface)
	}
	return out
}

// expectProbeBypass checks that a connection from the node to the pod's
// app arrives from the probe source and that the pod's proxy never saw it.
func expectProbeBypass(t *testing.T, node *nettest.Netns, tp *testproxy.Proxy, pod *nettest.Pod, v6 bool) {
	t.Helper()
	src := meshconst.ProbeSourceV4
	if v6 {
		src = meshconst.ProbeSourceV6
	}
	seen := len(tp.Observations())
	l := dialApp(t, node, pod.Addr(v6))
	if want := "app " + pod.Name + " peer=" + src.String(); strings.TrimSpace(l.greeting) != want {
		t.Errorf("node -> %s: greeting %q, want %q (direct, from the probe source)", pod.Addr(v6), l.greeting, want)
	}
	l.echo(t, "probe")
	if obs := tp.Observations()[seen:]; len(obs) > 0 {
		t.Errorf("the proxy saw the node's connection: %+v", obs)
	}
}

// TestProbeSNAT: with probe SNAT on and the agent pointed at the lab's node
// namespace, enrolling a pod attaches the translation to its bridge port:
// connections from the node reach the app directly from 169.254.7.127 (and
// the IPv6 probe source), while a connection from another pod, forwarded
// by the bridge, is still captured. A restart puts back a translation that
// went missing and removes one no pod owns; unenrolling removes it.
func TestProbeSNAT(t *testing.T) {
	e := agenttest.NewEnv(t)
	topo := nettest.NewTopology(t, 2)
	startApps(t, topo)
	e.Config.NoProbeSNAT = false
	e.Config.NodeNetns = topo.Node.NSPath
	a1 := e.Start(t)
	proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
	proxy.Connect()
	view := probeView(t, e, topo.Node)

	pod0, pod1 := topo.Pods[0], topo.Pods[1]
	uid := newUID("pod0")
	enrollEnabled(t, e, enrollRequest(pod0, uid))
	if got := probeDevices(t, view); !slices.Equal(got, []string{pod0.HostVeth}) {
		t.Fatalf("probe snat on %v, want only pod0's host veth %s", got, pod0.HostVeth)
	}
	tp := proxy.Pod(uid)
	for _, v6 := range []bool{false, true} {
		expectProbeBypass(t, topo.Node, tp, pod0, v6)
	}
	fromPod := dialApp(t, &pod1.Netns, pod0.IPv4)
	expectCaptured(t, tp, pod1.IPv4, pod0.IPv4)
	if !strings.Contains(fromPod.greeting, "peer="+pod1.IPv4.String()) {
		t.Errorf("pod1 -> pod0 through the proxy: greeting %q, want pod1's address", fromPod.greeting)
	}
	st, err := view.Get(pod0.HostVeth)
	if err != nil || st.Counters.Translated == 0 || st.Counters.NotLocal == 0 {
		t.Errorf("probe snat counters %+v (%v): want translated (node) and not_local (forwarded) SYNs", st.Counters, err)
	}

	// Agent down: pod0's translation disappears, a stray one appears on
	// pod1's veth (not enrolled). The restart reconciles both.
	a1.Stop(t)
	if err := view.Detach(pod0.HostVeth); err != nil {
		t.Fatal(err)
	}
	if _, err := view.Attach(pod1.HostVeth); err != nil {
		t.Fatal(err)
	}
	e.Start(t)
	if got := probeDevices(t, view); !slices.Equal(got, []string{pod0.HostVeth}) {
		t.Fatalf("probe snat after restart on %v, want only %s", got, pod0.HostVeth)
	}
	expectProbeBypass(t, topo.Node, tp, pod0, false)

	if err := e.Client.Unenroll(context.Background(), uid); err != nil {
		t.Fatal(err)
	}
	if _, err := view.Get(pod0.HostVeth); !errors.Is(err, probesnat.ErrNotAttached) {
		t.Errorf("probe snat after unenrol: %v, want not attached", err)
	}
	if g := dialApp(t, topo.Node, pod0.IPv4).greeting; !strings.Contains(g, "peer="+nettest.BridgeV4.String()) {
		t.Errorf("node -> pod0 after unenrol: greeting %q, want the node's own address", g)
	}
}

// TestProbeSNATPeerElsewhere: a pod whose eth0 is a veth with its peer
// outside the node namespace cannot get probe SNAT, so its enrolment
// fails and leaves nothing attached.
func TestProbeSNATPeerElsewhere(t *testing.T) {
	e := agenttest.NewEnv(t)
	topo := nettest.NewTopology(t, 0)
	e.Config.NoProbeSNAT = false
	e.Config.NodeNetns = topo.Node.NSPath
	e.Start(t)
	path := ownNetns(t) // eth0's peer stays inside the pod
	uid := newUID("lonely")
	_, err := e.Client.Enroll(context.Background(), enrollRequestPath(path, uid))
	if err == nil || !strings.Contains(err.Error(), "not in the node netns") {
		t.Fatalf("enrol with the veth peer outside the node: %v, want a probe snat error", err)
	}
	if got := e.PinnedUIDs(t); len(got) != 0 {
		t.Errorf("pins left after the failed enrolment: %v", got)
	}
	if probeDevices(t, probeView(t, e, topo.Node)) != nil {
		t.Errorf("probe snat left after the failed enrolment")
	}
}

func enrollRequestPath(path, uid string) agentapi.EnrollRequest {
	return agentapi.EnrollRequest{UID: uid, Name: "lonely", Namespace: "default", ServiceAccount: "default", Netns: path}
}
