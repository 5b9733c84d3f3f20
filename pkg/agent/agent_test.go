//go:build linux

package agent_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

const waitLong = 15 * time.Second

func enrollRequest(p *nettest.Pod, uid string) agentapi.EnrollRequest {
	return agentapi.EnrollRequest{
		UID: uid, Name: p.Name, Namespace: "default", ServiceAccount: "sa-" + p.Name,
		Netns: p.NSPath, IPs: []netip.Addr{p.IPv4, p.IPv6},
	}
}

// enrollEnabled enrols a pod and waits until the proxy acked it.
func enrollEnabled(t *testing.T, e *agenttest.Env, req agentapi.EnrollRequest) agentapi.PodState {
	t.Helper()
	ctx := context.Background()
	st, err := e.Client.Enroll(ctx, req)
	if err != nil {
		t.Fatalf("enroll %s: %v", req.UID, err)
	}
	agenttest.WaitFor(t, waitLong, "pod "+req.UID+" enabled", func() bool {
		ps, err := e.Client.Pod(ctx, req.UID)
		st = ps.PodState
		return err == nil && st.State == agentapi.StateEnabled
	})
	return st
}

// tcpLine is a connection to an app: it reads the app's greeting, then
// echoes lines.
type tcpLine struct {
	c        net.Conn
	r        *bufio.Reader
	greeting string
}

func dialApp(t *testing.T, from *nettest.Netns, to netip.Addr) *tcpLine {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := from.Dial(ctx, "tcp", netip.AddrPortFrom(to, nettest.AppPort).String())
	if err != nil {
		t.Fatalf("dial %s: %v", to, err)
	}
	t.Cleanup(func() { c.Close() })
	l := &tcpLine{c: c, r: bufio.NewReader(c)}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	l.greeting, err = l.r.ReadString('\n')
	if err != nil {
		t.Fatalf("read greeting from %s: %v", to, err)
	}
	return l
}

func (l *tcpLine) echo(t *testing.T, msg string) {
	t.Helper()
	l.c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := fmt.Fprintf(l.c, "%s\n", msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got, err := l.r.ReadString('\n')
	if err != nil || strings.TrimSpace(got) != msg {
		t.Fatalf("echo %q: got %q, %v", msg, got, err)
	}
}

// expectCaptured checks that the pod's test proxy accepted a connection
// on the inbound listener for the app's port from src.
func expectCaptured(t *testing.T, tp *testproxy.Proxy, src netip.Addr, dst netip.Addr) {
	t.Helper()
	if tp == nil {
		t.Fatalf("no proxy runs in the pod")
	}
	want := netip.AddrPortFrom(dst, nettest.AppPort)
	_, ok := tp.WaitFor(func(o testproxy.Observation) bool {
		return o.Listener == 15006 && o.OrigDst == want && o.Peer.Addr() == src
	}, 3*time.Second)
	if !ok {
		t.Fatalf("proxy saw no inbound connection %s -> %s; saw %+v", src, want, tp.Observations())
	}
}

func startApps(t *testing.T, topo *nettest.Topology) {
	t.Helper()
	for _, p := range topo.Pods {
		app, err := nettest.StartApp(&p.Netns, p.Name, []uint16{nettest.AppPort}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { app.Close() })
	}
}

func newUID(name string) string { return name + "-" + agenttest.RandomID() }

// startWithProxy is the start of most tests here: n pods running their
// apps, an agent, and a test proxy connected to its ZDS socket.
func startWithProxy(t *testing.T, n int) (*agenttest.Env, *nettest.Topology, *agenttest.Agent, *agenttest.Proxy) {
	t.Helper()
	e := agenttest.NewEnv(t)
	topo := nettest.NewTopology(t, n)
	startApps(t, topo)
	a := e.Start(t)
	proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
	proxy.Connect()
	return e, topo, a, proxy
}

// enrollAll enrols each pod (UIDs named pod0, pod1, ... in order) and
// waits until each is enabled; it returns the UIDs in the pods' order.
func enrollAll(t *testing.T, e *agenttest.Env, pods []*nettest.Pod) []string {
	t.Helper()
	uids := make([]string, len(pods))
	for i, p := range pods {
		uids[i] = newUID(fmt.Sprintf("pod%d", i))
		enrollEnabled(t, e, enrollRequest(p, uids[i]))
	}
	return uids
}

// statusView is the part of the status and pod list a restart must keep.
func statusView(t *testing.T, e *agenttest.Env) string {
	t.Helper()
	ctx := context.Background()
	st, err := e.Client.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pods, err := e.Client.Pods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "ready=%t mode=%s proxies=%d synced=%d pods=%+v\n", st.Ready, st.Features.Mode, st.Proxy.Connections, st.Proxy.Synced, st.Pods)
	for _, p := range pods {
		fmt.Fprintf(&b, "%s %s/%s %s netns=%s %v enrolled=%s\n", p.UID, p.Namespace, p.Name, p.State, p.Netns, p.NetnsID, p.EnrolledAt.Format(time.RFC3339Nano))
	}
	return b.String()
}

// TestAgentRestart: pods enrolled, a long-lived captured connection open;
// the agent stops and starts again. The connection survives, new
// connections are captured throughout, the links are the same ones (no
// re-attach), and the status after the restart matches the one before.
func TestAgentRestart(t *testing.T) {
	e, topo, a1, proxy := startWithProxy(t, 2)
	agenttest.WaitFor(t, waitLong, "proxy synced", proxy.Ready)
	uids := enrollAll(t, e, topo.Pods)
	pod0, pod1 := topo.Pods[0], topo.Pods[1]
	long := dialApp(t, topo.Node, pod0.IPv4)
	expectCaptured(t, proxy.Pod(uids[0]), nettest.BridgeV4, pod0.IPv4)
	if !strings.Contains(long.greeting, "peer="+nettest.BridgeV4.String()) {
		t.Fatalf("app did not see the client's address through the proxy: %q", long.greeting)
	}
	long.echo(t, "before restart")
	before := statusView(t, e)
	links := func() string {
		st, err := e.Client.Pod(context.Background(), uids[0])
		if err != nil || st.Datapath == nil {
			t.Fatalf("pod %s: %v %+v", uids[0], err, st)
		}
		return fmt.Sprint(st.Datapath.Attachments)
	}
	linksBefore := links()

	a1.Stop(t)
	// With no agent at all, the pins keep capturing new connections.
	dialApp(t, topo.Node, pod1.IPv6)
	expectCaptured(t, proxy.Pod(uids[1]), nettest.BridgeV6, pod1.IPv6)
	long.echo(t, "agent down")

	e.Start(t)
	agenttest.WaitFor(t, waitLong, "proxy reconnected and synced", func() bool {
		st, err := e.Client.Status(context.Background())
		return err == nil && st.Proxy.Synced == 1
	})
	long.echo(t, "after restart")
	dialApp(t, topo.Node, pod0.IPv6)
	expectCaptured(t, proxy.Pod(uids[0]), nettest.BridgeV6, pod0.IPv6)
	if after := statusView(t, e); after != before {
		t.Errorf("status changed across the restart:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if got := links(); got != linksBefore {
		t.Errorf("attachments changed across the restart (re-attached?):\nbefore %s\nafter  %s", linksBefore, got)
	}
	if got := proxy.Running(); !slices.Equal(got, uids) {
		t.Errorf("proxy runs %v, want %v", got, uids)
	}
}

// TestProxyRestart: the proxy disconnects, a pod is unenrolled meanwhile,
// the proxy reconnects: the agent's snapshot names only the remaining pod
// and the proxy reconciles the removed one away.
func TestProxyRestart(t *testing.T) {
	e, topo, _, proxy := startWithProxy(t, 2)
	uids := enrollAll(t, e, topo.Pods)
	if got := proxy.Running(); !slices.Equal(got, uids) {
		t.Fatalf("proxy runs %v, want %v", got, uids)
	}
	snapshotsBefore := len(proxy.Snapshots())

	proxy.Disconnect()
	agenttest.WaitFor(t, waitLong, "agent sees the proxy gone", func() bool {
		st, err := e.Client.Status(context.Background())
		return err == nil && st.Proxy.Connections == 0
	})
	if err := e.Client.Unenroll(context.Background(), uids[1]); err != nil {
		t.Fatalf("unenroll with no proxy: %v", err)
	}
	if slices.Contains(proxy.Dels(), uids[1]) {
		t.Fatalf("a disconnected proxy got a del")
	}
	proxy.Connect()
	agenttest.WaitFor(t, waitLong, "a new snapshot", func() bool { return len(proxy.Snapshots()) > snapshotsBefore })
	snap := proxy.Snapshots()[len(proxy.Snapshots())-1]
	if !snap[uids[0]] || snap[uids[1]] {
		t.Errorf("snapshot keeps %v, want only %s", snap, uids[0])
	}
	if got := proxy.Running(); !slices.Equal(got, uids[:1]) {
		t.Errorf("after reconciling the proxy runs %v, want %v", got, uids[:1])
	}
	// pod0 is still captured by the proxy that survived the reconnect;
	// pod1 is direct again.
	dialApp(t, topo.Node, topo.Pods[0].IPv4)
	expectCaptured(t, proxy.Pod(uids[0]), nettest.BridgeV4, topo.Pods[0].IPv4)
	direct := dialApp(t, topo.Node, topo.Pods[1].IPv4)
	if !strings.Contains(direct.greeting, "app "+topo.Pods[1].Name) {
		t.Errorf("pod1 after unenrol: greeting %q", direct.greeting)
	}
	if got := e.PinnedUIDs(t); !slices.Equal(got, uids[:1]) {
		t.Errorf("pinned %v, want %v", got, uids[:1])
	}
}

// TestPendingUntilProxy: with no proxy connected an enrolment is pending
// (the datapath is attached: fail closed); when a proxy connects it gets
// the pod in its snapshot and the pod becomes enabled.
func TestPendingUntilProxy(t *testing.T) {
	e := agenttest.NewEnv(t)
	topo := nettest.NewTopology(t, 1)
	startApps(t, topo)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.Config.ReadyAddr = ln.Addr().String()
	ln.Close()
	e.Start(t)
	resp, err := http.Get("http://" + e.Config.ReadyAddr + "/readyz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("readyz: %v %v", resp, err)
	}
	resp.Body.Close()
	uid := newUID("pod0")
	st, err := e.Client.Enroll(context.Background(), enrollRequest(topo.Pods[0], uid))
	if err != nil {
		t.Fatal(err)
	}
	if st.State != agentapi.StatePending || st.Reason == "" {
		t.Fatalf("with no proxy: state %q reason %q, want pending with a reason", st.State, st.Reason)
	}
	// Fail closed: captured, no listener, no connection.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if c, err := topo.Node.Dial(ctx, "tcp", netip.AddrPortFrom(topo.Pods[0].IPv4, nettest.AppPort).String()); err == nil {
		c.Close()
		t.Fatalf("a pending pod let a connection reach the app around the proxy")
	}
	proxy := agenttest.NewProxy(t, e.Config.ZDSPath)
	proxy.Connect()
	agenttest.WaitFor(t, waitLong, "pod enabled", func() bool {
		st, err := e.Client.Pod(context.Background(), uid)
		return err == nil && st.State == agentapi.StateEnabled && st.Reason == ""
	})
	dialApp(t, topo.Node, topo.Pods[0].IPv4)
	expectCaptured(t, proxy.Pod(uid), nettest.BridgeV4, topo.Pods[0].IPv4)
}

// ownNetns makes a network namespace this test may delete, with a dummy
// eth0 (a veth whose peer stays inside), so a test can make it vanish mid-enrolment.
func ownNetns(t *testing.T) string {
	t.Helper()
	name := "ambpf-agt-" + agenttest.RandomID()
	for _, args := range [][]string{
		{"netns", "add", name},
		{"-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"},
		{"-n", name, "link", "set", "eth0", "up"},
		{"-n", name, "link", "set", "lo", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			exec.Command("ip", "netns", "del", name).Run()
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return "/run/netns/" + name
}

// TestEnrolFailures: a pod netns deleted mid-enrolment, bad requests and a
// duplicate enrolment give clean errors, leave no pins or routes behind,
// and leave the other pods working.
func TestEnrolFailures(t *testing.T) {
	e, topo, _, proxy := startWithProxy(t, 2)
	ctx := context.Background()
	pod0, pod1 := topo.Pods[0], topo.Pods[1]
	good := newUID("pod0")
	enrollEnabled(t, e, enrollRequest(pod0, good))

	expectErr := func(t *testing.T, err error, code, contains string) {
		t.Helper()
		var ae *agentapi.Error
		if !errors.As(err, &ae) {
			t.Fatalf("want an API error %s, got %v", code, err)
		}
		if ae.Code != code || !strings.Contains(ae.Message, contains) {
			t.Fatalf("got %s %q, want %s containing %q", ae.Code, ae.Message, code, contains)
		}
	}

	t.Run("netns deleted mid-enrolment", func(t *testing.T) {
		path := ownNetns(t)
		uid := newUID("vanish")
		// The proxy is slow to start the pod; meanwhile the pod is deleted.
		proxy.SetAddHook(func(u string) error {
			if u != uid {
				return nil
			}
			if out, err := exec.Command("ip", "netns", "del", strings.TrimPrefix(path, "/run/netns/")).CombinedOutput(); err != nil {
				return fmt.Errorf("ip netns del: %v: %s", err, out)
			}
			return errors.New("pod sandbox is gone")
		})
		t.Cleanup(func() { proxy.SetAddHook(nil) })
		req := agentapi.EnrollRequest{UID: uid, Name: "vanish", Namespace: "default", ServiceAccount: "default", Netns: path}
		_, err := e.Client.Enroll(ctx, req)
		expectErr(t, err, agentapi.CodeNetnsGone, "vanished")
		if slices.Contains(e.PinnedUIDs(t), uid) {
			t.Errorf("pins left for %s", uid)
		}
		if _, err := e.Client.Pod(ctx, uid); !agentapi.IsNotFound(err) {
			t.Errorf("the agent still knows %s: %v", uid, err)
		}
	})

	bad := []struct {
		name     string
		mutate   func(*agentapi.EnrollRequest)
		code     string
		contains string
	}{
		{"no uid", func(r *agentapi.EnrollRequest) { r.UID = "" }, agentapi.CodeInvalid, "uid is required"},
		{"uid with a slash", func(r *agentapi.EnrollRequest) { r.UID = "../etc" }, agentapi.CodeInvalid, "uid \"../etc\" is invalid"},
		{"no name", func(r *agentapi.EnrollRequest) { r.Name = "" }, agentapi.CodeInvalid, "name is required"},
		{"bad namespace", func(r *agentapi.EnrollRequest) { r.Namespace = "Kube_System" }, agentapi.CodeInvalid, "namespace \"Kube_System\" is invalid"},
		{"relative netns", func(r *agentapi.EnrollRequest) { r.Netns = "run/netns/x" }, agentapi.CodeInvalid, "must be an absolute path"},
		{"missing netns", func(r *agentapi.EnrollRequest) { r.Netns = "/run/netns/does-not-exist-" + agenttest.RandomID() }, agentapi.CodeBadNetns, "no such file"},
		{"netns not a netns", func(r *agentapi.EnrollRequest) { r.Netns = "/proc/self/status" }, agentapi.CodeBadNetns, "not a namespace file"},
		{"no such interface", func(r *agentapi.EnrollRequest) { r.Interface = "eth9" }, agentapi.CodeBadNetns, "has no interface \"eth9\""},
		{"cgroup not cgroup2", func(r *agentapi.EnrollRequest) { r.Cgroup = os.TempDir() }, agentapi.CodeInvalid, "is not a cgroup v2 directory"},
		{"bad ip", func(r *agentapi.EnrollRequest) { r.IPs = []netip.Addr{{}} }, agentapi.CodeInvalid, "ips[0] is not an IP address"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			req := enrollRequest(pod1, newUID("bad"))
			tc.mutate(&req)
			_, err := e.Client.Enroll(ctx, req)
			expectErr(t, err, tc.code, tc.contains)
			if ae := (*agentapi.Error)(nil); errors.As(err, &ae) && ae.HTTPStatus != 400 {
				t.Errorf("HTTP status %d, want 400", ae.HTTPStatus)
			}
		})
	}

	t.Run("duplicate", func(t *testing.T) {
		again, err := e.Client.Enroll(ctx, enrollRequest(pod0, good))
		if err != nil {
			t.Fatalf("re-enrolling the same pod: %v", err)
		}
		if again.State != agentapi.StateEnabled {
			t.Errorf("re-enrolment changed the state to %s", again.State)
		}
		_, err = e.Client.Enroll(ctx, enrollRequest(pod1, good))
		expectErr(t, err, agentapi.CodeConflict, "another network namespace")
		var ae *agentapi.Error
		if errors.As(err, &ae) && ae.HTTPStatus != 409 {
			t.Errorf("HTTP status %d, want 409", ae.HTTPStatus)
		}
	})

	t.Run("unknown", func(t *testing.T) {
		if err := e.Client.Unenroll(ctx, newUID("nobody")); !agentapi.IsNotFound(err) {
			t.Errorf("unenrolling an unknown pod: %v, want not found", err)
		}
	})

	// Nothing of the failures stayed: only the good pod is pinned, pod1
	// has no policy rule or table-100 route, and pod0 is still captured
	// while pod1 is reached directly.
	if got := e.PinnedUIDs(t); !slices.Equal(got, []string{good}) {
		t.Errorf("pinned %v, want only %s", got, good)
	}
	for _, args := range [][]string{{"ip", "rule"}, {"ip", "-6", "rule"}, {"ip", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"}} {
		out, err := pod1.Exec(ctx, args[0], args[1:]...)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(out), "100") {
			t.Errorf("pod1 has ambpf routing left: %v:\n%s", args, out)
		}
	}
	dialApp(t, topo.Node, pod0.IPv4)
	expectCaptured(t, proxy.Pod(good), nettest.BridgeV4, pod0.IPv4)
	if g := dialApp(t, topo.Node, pod1.IPv4).greeting; !strings.Contains(g, "app "+pod1.Name) {
		t.Errorf("pod1 greeting %q", g)
	}
	if err := e.Client.Unenroll(ctx, good); err != nil {
		t.Fatal(err)
	}
	if got := e.PinnedUIDs(t); len(got) != 0 {
		t.Errorf("pins left after unenrol: %v", got)
	}
	if !slices.Contains(proxy.Dels(), good) || len(proxy.Running()) != 0 {
		t.Errorf("proxy dels %v running %v after unenrol", proxy.Dels(), proxy.Running())
	}
}

// TestReconcileOnStart: while the agent is down one pod's pins disappear
// and a pod the agent never enrolled gets pinned; on start the agent
// attaches the first again (and hands it to the proxy) and detaches the
// stranger.
func TestReconcileOnStart(t *testing.T) {
	e, topo, a1, proxy := startWithProxy(t, 3)
	uids := enrollAll(t, e, topo.Pods[:2])
	a1.Stop(t)

	dp, err := datapath.New(datapath.Config{Root: e.Config.BPFRoot})
	if err != nil {
		t.Fatal(err)
	}
	if err := dp.Detach(uids[1]); err != nil {
		t.Fatal(err)
	}
	stranger := newUID("stranger")
	if _, err := dp.Attach(datapath.Pod{UID: stranger, Netns: topo.Pods[2].NS}); err != nil {
		t.Fatal(err)
	}

	e.Start(t)
	if got, want := e.PinnedUIDs(t), slices.Sorted(slices.Values(uids)); !slices.Equal(got, want) {
		t.Errorf("pinned after start: %v, want %v", got, want)
	}
	agenttest.WaitFor(t, waitLong, "re-attached pod enabled", func() bool {
		st, err := e.Client.Pod(context.Background(), uids[1])
		return err == nil && st.State == agentapi.StateEnabled && st.Datapath != nil && st.Datapath.Attached()
	})
	dialApp(t, topo.Node, topo.Pods[1].IPv4)
	expectCaptured(t, proxy.Pod(uids[1]), nettest.BridgeV4, topo.Pods[1].IPv4)
	if g := dialApp(t, topo.Node, topo.Pods[2].IPv4).greeting; !strings.Contains(g, "app "+topo.Pods[2].Name) {
		t.Errorf("the stranger pod is still captured: %q", g)
	}
}
