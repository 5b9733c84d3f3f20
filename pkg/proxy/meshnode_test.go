//go:build linux

package proxy

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/logtest"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// meshNode is a node as the fault tests need it: pods on a bridge, and the
// real ambpf-agent and ambpf-proxy binaries, built from this tree, running
// in the node netns (the agent with its bpffs, state directory, ZDS and
// API sockets from agenttest.Env). Several proxies may run at once (an
// upgrade): each has a slot, which picks its metrics and readiness ports
// and its state directory; they share one CA directory, as the chart's
// proxies share the CA secret.
type meshNode struct {
	t    *testing.T
	ae   *agenttest.Env
	lab  *nettest.Topology
	bins string
	// agent is the agent started last.
	agent *nodeProcess
	// proxyCgroup, when set, is the cgroup the proxies run in (the
	// test's own otherwise): the agent trusts it as the proxy's, and the
	// fast path attaches its proxy program there.
	proxyCgroup string
}

// newMeshNode builds the binaries and starts nothing.
func newMeshNode(t *testing.T, pods int) *meshNode {
	t.Helper()
	ae := agenttest.NewEnv(t)
	lab := nettest.NewTopology(t, pods)
	t0 := time.Now()
	bins := buildBinaries(t, "ambpf-agent", "ambpf-proxy")
	t.Logf("built the binaries in %v", time.Since(t0).Round(time.Millisecond))
	return &meshNode{t: t, ae: ae, lab: lab, bins: bins}
}

// startAgent starts the agent with extra flags and waits until its API
// answers ready.
// meshAB enrols pods 0 (A) and 1 (B) under a fresh id ("a-"+id, "b-"+id),
// serves app "b" in B, and waits until A reaches it through the mesh; the
// agent and a proxy must be running. It returns the id.
func (m *meshNode) meshAB() string {
	m.t.Helper()
	id := agenttest.RandomID()
	m.enroll(0, "a-"+id)
	m.enroll(1, "b-"+id)
	m.app(1, "b")
	agenttest.WaitFor(m.t, 10*time.Second, "A reaches B", func() bool { return m.served(0, 1, "b") })
	return id
}

func (m *meshNode) startAgent(extra ...string) *nodeProcess {
	m.t.Helper()
	return m.startAgentBin("ambpf-agent", nil, extra...)
}

// startAgentBin is startAgent for the binary bin (of buildBinaries'
// directory; an agent built with other tags) with env added to its
// environment.
func (m *meshNode) startAgentBin(bin string, env []string, extra ...string) *nodeProcess {
	m.t.Helper()
	c := m.ae.Config
	args := append([]string{"--bpf-root", c.BPFRoot, "--state-dir", c.StateDir,
		"--zds-socket", c.ZDSPath, "--api-socket", c.APISocket,
		"--ready-addr", "off", "--probe-snat=false"}, extra...)
	agent := startNodeProcessEnv(m.t, m.lab.Node, m.ae.Dir, "agent", filepath.Join(m.bins, bin), env, args...)
	agenttest.WaitFor(m.t, 20*time.Second, "agent ready", func() bool {
		st, err := m.ae.Client.Status(context.Background())
		return err == nil && st.Ready || agent.exited()
	})
	if agent.exited() {
		m.t.Fatalf("agent exited: %v\n%s", agent.Err(), agent.Tail(30))
	}
	m.agent = agent
	return agent
}

// proxyReadyAddr is where the proxy of a slot serves /healthz/ready.
func proxyReadyAddr(slot int) string { return fmt.Sprintf("127.0.0.1:%d", 15021+10*slot) }

// proxyMetricsAddr is where the proxy of a slot serves /metrics.
func proxyMetricsAddr(slot int) string { return fmt.Sprintf("127.0.0.1:%d", 15020+10*slot) }

// proxyAdminAddr is where the proxy of a slot serves its admin endpoint.
func proxyAdminAddr(slot int) string { return fmt.Sprintf("127.0.0.1:%d", 15000+10*slot) }

// startProxy starts a proxy in slot with extra flags; it does not wait.
func (m *meshNode) startProxy(slot int, extra ...string) *nodeProcess {
	m.t.Helper()
	// A short drain by default: the cleanup's SIGTERM must not wait long
	// for connections a test leaves open (extra may set another).
	args := append([]string{
		"--drain-timeout", "1s",
		"--zds-path", m.ae.Config.ZDSPath,
		"--state-dir", filepath.Join(m.ae.Dir, fmt.Sprintf("proxy-%d", slot)),
		"--ca-dir", filepath.Join(m.ae.Dir, "ca"),
		"--metrics-addr", proxyMetricsAddr(slot), "--ready-addr", proxyReadyAddr(slot),
		"--admin-addr", proxyAdminAddr(slot),
	}, extra...)
	return startNodeProcessIn(m.t, m.lab.Node, m.proxyCgroup, m.ae.Dir, fmt.Sprintf("proxy%d", slot), filepath.Join(m.bins, "ambpf-proxy"), nil, args...)
}

// enroll enrols pod i through the agent's API under uid and waits until
// the agent reports it enabled (the proxy acked it).
func (m *meshNode) enroll(i int, uid string) {
	m.t.Helper()
	m.enrollNoWait(i, uid)
	m.waitState(uid, agentapi.StateEnabled, 20*time.Second)
}

// enrollNoWait enrols pod i and returns once the agent has answered.
func (m *meshNode) enrollNoWait(i int, uid string) {
	m.t.Helper()
	m.enrollRequest(m.request(i, uid))
}

// request is the CNI plugin's enrolment request for pod i under uid
// (without the pod's cgroup).
func (m *meshNode) request(i int, uid string) agentapi.EnrollRequest {
	p := m.lab.Pod(i)
	return agentapi.EnrollRequest{UID: uid, Name: p.Name, Namespace: "ns-" + p.Name, ServiceAccount: "sa", Netns: p.NSPath}
}

// enrollRequest sends req to the agent and returns once it has answered.
func (m *meshNode) enrollRequest(req agentapi.EnrollRequest) {
	m.t.Helper()
	if _, err := m.ae.Client.Enroll(context.Background(), req); err != nil {
		m.t.Fatalf("enroll %s: %v", req.Name, err)
	}
	m.t.Cleanup(func() { m.ae.Client.Unenroll(context.Background(), req.UID) })
}

// waitState waits until the agent reports uid in state.
func (m *meshNode) waitState(uid string, state string, timeout time.Duration) {
	m.t.Helper()
	agenttest.WaitFor(m.t, timeout, uid+" "+state, func() bool {
		ps, err := m.ae.Client.Pod(context.Background(), uid)
		return err == nil && string(ps.State) == state
	})
}

// app starts the greeting/echo app on port 8080 of pod i.
func (m *meshNode) app(i int, name string) {
	m.t.Helper()
	a, err := nettest.StartApp(&m.lab.Pod(i).Netns, name, []uint16{nettest.AppPort}, nil)
	if err != nil {
		m.t.Fatal(err)
	}
	m.t.Cleanup(func() { a.Close() })
}

// capture starts tcpdump on every interface of the node netns.
func (m *meshNode) capture() *capture {
	return (&env{t: m.t, lab: m.lab, dir: m.ae.Dir, logs: &logtest.Buffer{}}).startCaptureFilter("tcp")
}

// assertNoPlaintext checks a node capture for plaintext between mesh pods:
// any packet to app port 8080 of the pod at dst (a SYN means a connection
// passed through), the canary anywhere, and it wants HBONE to dst:15008.
func assertNoPlaintext(t *testing.T, dump string, dst string) {
	t.Helper()
	appPort := fmt.Sprintf("> %s.%d:", dst, nettest.AppPort)
	var plain []string
	for line := range strings.SplitSeq(dump, "\n") {
		if strings.Contains(line, appPort) {
			plain = append(plain, line)
		}
	}
	if len(plain) > 0 {
		t.Errorf("%d packets to %s's app port (plaintext between mesh pods); first: %s", len(plain), dst, plain[0])
	}
	if n := strings.Count(dump, restartCanary); n > 0 {
		t.Errorf("the canary is in clear on the wire %d times", n)
	}
	if hb := fmt.Sprintf("%s.%d", dst, meshconst.InboundHBONEPort); !strings.Contains(dump, hb) {
		t.Errorf("the capture has no HBONE connection to %s", hb)
	}
}

// longLived holds connections open and pings each every interval.
type longLived struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	conns  []*nettest.TCPConn
	pings  atomic.Int64
	mu     sync.Mutex
	errs   []string // the first error of each connection that failed
}

// startLongLived opens n connections from pod from to addr (each must get
// greeting) and pings each every interval with a line the app echoes.
func startLongLived(t *testing.T, from *nettest.Pod, addr, greeting string, n int, interval time.Duration) *longLived {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	l := &longLived{cancel: cancel}
	t.Cleanup(func() { l.stop() })
	for i := range n {
		c, err := nettest.OpenTCP(func(ctx context.Context) (net.Conn, error) { return from.Dial(ctx, "tcp", addr) })
		if err != nil {
			t.Fatalf("long-lived connection %d: %v", i, err)
		}
		if c.Greeting != greeting {
			c.Close()
			t.Fatalf("long-lived connection %d: greeting %q, want %q", i, c.Greeting, greeting)
		}
		l.conns = append(l.conns, c)
		l.wg.Go(func() {
			tick := time.NewTicker(interval)
			defer tick.Stop()
			for seq := 0; ; seq++ {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				if err := c.Echo(fmt.Sprintf("ping %d %d", i, seq)); err != nil {
					if ctx.Err() != nil {
						return
					}
					l.mu.Lock()
					l.errs = append(l.errs, fmt.Sprintf("connection %d, ping %d: %v", i, seq, err))
					l.mu.Unlock()
					return
				}
				l.pings.Add(1)
			}
		})
	}
	return l
}

// failures returns the connections that failed so far.
func (l *longLived) failures() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.errs...)
}

// stop ends the pings and closes the connections; it is idempotent.
func (l *longLived) stop() {
	l.cancel()
	l.wg.Wait()
	for _, c := range l.conns {
		c.Close()
	}
}
