//go:build linux

package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ambpf/ambpf/pkg/agent/agenttest"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/dpstate"
	"github.com/ambpf/ambpf/pkg/fastpath"
	"github.com/ambpf/ambpf/pkg/metrics"
	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/nettest"
	"github.com/ambpf/ambpf/pkg/promtext"
)

// TestFastPathCountersBinary: with the fast path on (the agent's
// --fastpath to-proxy, then both; the proxy without its --fastpath: the
// agent says so in each pod's ZDS Add), an app of pod A
// (its sockets made in A's cgroup, which the agent gave the fast path)
// talks over the mesh to an app of pod B, and in passthrough to an app of
// pod C outside the mesh (where the proxy relays between two TCP sockets
// and, not knowing of the fast path, would splice from A's socket,
// missing the redirected bytes). For each exchange (a small request and its answer,
// 64 KiB, 1 MiB, and 20 request/response rounds on one connection) the
// server receives exactly A's bytes and A exactly the server's; the
// proxy's byte counters on /stats/prometheus move by exactly those
// amounts on each reporter (source, and destination for B: the same
// proxy serves both ends); and the pod's fast path counters, as the
// agent reports them (ambpfctl inspect), show every byte A sent (and, in
// mode both, every byte A received) redirected, none fallen back to TCP,
// so the test fails if the fast path were silently off.
func TestFastPathCountersBinary(t *testing.T) {
	if err := fastpath.Supported(); err != nil {
		t.Skipf("kernel without the fast path: %v", err)
	}
	if _, err := netlab.Cgroup2Mount(); err != nil {
		t.Skipf("the fast path attaches to cgroups, and there is no cgroup v2: %v", err)
	}
	for _, mode := range []fastpath.Mode{fastpath.ToProxy, fastpath.Both} {
		t.Run(string(mode), func(t *testing.T) { testFastPathCounters(t, mode) })
	}
}

// fpExchange is one connection of TestFastPathCountersBinary: A sends
// send (in writes of chunk bytes), B's sink answers with reply(len(send))
// once A half-closed; with rounds, B echoes and A waits for each chunk's
// echo before the next.
type fpExchange struct {
	name   string
	size   int
	chunk  int
	rounds bool
}

// fpReply is what B's sink answers to n bytes: another length than the
// request, so that swapped directions in the counters would show.
func fpReply(n int) []byte { return pattern(n/3+133, 7) }

// pattern is n bytes that differ with seed and along the stream (a
// reordering or a lost chunk shows).
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*31+i/4099) ^ seed
	}
	return b
}

func testFastPathCounters(t *testing.T, mode fastpath.Mode) {
	m := newMeshNode(t, 3)
	cg, err := m.lab.Cgroup("proxy")
	if err != nil {
		t.Fatal(err)
	}
	m.proxyCgroup = cg
	m.startAgent("--fastpath", string(mode))
	// No --fastpath: the agent's ZDS Add tells the proxy per pod.
	m.startProxy(0)
	id := agenttest.RandomID()
	uidA := "a-" + id
	req := m.request(0, uidA)
	if req.Cgroup, err = m.lab.Pod(0).Cgroup(); err != nil {
		t.Fatal(err)
	}
	m.enrollRequest(req)
	m.waitState(uidA, agentapi.StateEnabled, 20*time.Second)
	m.enroll(1, "b-"+id)
	if fp := m.fastPath(uidA); !fp.Attached || fp.Mode != string(mode) || fp.Error != "" {
		t.Fatalf("pod A's fast path: %+v, want attached in mode %s", fp, mode)
	}

	sink := func(c *net.TCPConn) ([]byte, error) {
		got, err := io.ReadAll(c)
		if err != nil {
			return got, err
		}
		_, err = c.Write(fpReply(len(got)))
		return got, err
	}
	echo := func(c *net.TCPConn) ([]byte, error) {
		var got bytes.Buffer
		_, err := io.Copy(c, io.TeeReader(c, &got))
		return got.Bytes(), err
	}
	type peer struct {
		name       string
		sink, echo *podServer
		reporters  []string
	}
	peers := []peer{
		{"mesh to B", serveInPod(t, m.lab.Pod(1), sink), serveInPod(t, m.lab.Pod(1), echo), []string{"source", "destination"}},
		{"passthrough to C", serveInPod(t, m.lab.Pod(2), sink), serveInPod(t, m.lab.Pod(2), echo), []string{"source"}},
	}
	factory, err := netlab.StartSocketFactory(m.lab.Pod(0))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { factory.Close() })

	for _, pr := range peers {
		for _, x := range []fpExchange{
			{name: "small request and answer", size: 100, chunk: 100},
			{name: "64 KiB + 1", size: 64<<10 + 1, chunk: 64<<10 + 1},
			{name: "1 MiB in 16 KiB writes", size: 1 << 20, chunk: 16 << 10},
			{name: "20 rounds of 100 bytes", size: 2000, chunk: 100, rounds: true},
		} {
			x.name = pr.name + ", " + x.name
			m.checkFastPathExchange(factory, uidA, mode, pr.reporters, pr.sink, pr.echo, x)
		}
	}
}

// checkFastPathExchange runs exchange x from pod uid's app to sink (or
// echo, for rounds) and checks the bytes, the proxy's counters of
// reporters and the pod's fast path counters.
func (m *meshNode) checkFastPathExchange(factory *netlab.SocketFactory, uidA string, mode fastpath.Mode, reporters []string, sink, echo *podServer, x fpExchange) {
	t := m.t
	t.Helper()
	before, fpBefore := m.proxyTCPCounters(), m.fastPath(uidA).Counters
	send := pattern(x.size, 1)
	wantReply := fpReply(x.size)
	dst, srv := sink, sink
	if x.rounds {
		dst, srv, wantReply = echo, echo, send
	}
	c := m.dialFromPod(factory, uidA, dst.addr)
	got, err := exchange(c, send, x.chunk, x.rounds)
	if err != nil {
		t.Fatalf("%s: %v", x.name, err)
	}
	if !bytes.Equal(got, wantReply) {
		t.Errorf("%s: A received %d bytes, not the %d the server sent", x.name, len(got), len(wantReply))
	}
	r := srv.next(t)
	if r.err != nil || !bytes.Equal(r.got, send) {
		t.Errorf("%s: the server received %d bytes (%v), not the %d A sent", x.name, len(r.got), r.err, len(send))
	}

	// Both ends are counted once the proxy closed them.
	var after map[string]tcpCounters
	agenttest.WaitFor(t, 10*time.Second, x.name+": both ends closed on the proxy", func() bool {
		after = m.proxyTCPCounters()
		for _, rep := range reporters {
			if after[rep].closed != before[rep].closed+1 {
				return false
			}
		}
		return true
	})
	for _, rep := range reporters {
		recv, sent := after[rep].received-before[rep].received, after[rep].sent-before[rep].sent
		if recv != float64(len(send)) || sent != float64(len(wantReply)) {
			t.Errorf("%s, reporter %s: the proxy counted %v bytes received and %v sent, want %d and %d",
				x.name, rep, recv, sent, len(send), len(wantReply))
		}
	}
	fp := m.fastPath(uidA).Counters
	toProxy, toApp := fp.BytesToProxy-fpBefore.BytesToProxy, fp.BytesToApp-fpBefore.BytesToApp
	wantToApp := uint64(0)
	if mode == fastpath.Both {
		wantToApp = uint64(len(wantReply))
	}
	if toProxy != uint64(len(send)) || toApp != wantToApp || fp.Fallback != fpBefore.Fallback {
		t.Errorf("%s: fast path redirected %d bytes to the proxy and %d to the app, %d fallbacks; want %d, %d, 0",
			x.name, toProxy, toApp, fp.Fallback-fpBefore.Fallback, len(send), wantToApp)
	}
	t.Logf("%s: %d bytes sent, %d received; fast path %d msgs to the proxy, %d to the app",
		x.name, len(send), len(got), fp.MsgsToProxy-fpBefore.MsgsToProxy, fp.MsgsToApp-fpBefore.MsgsToApp)
}

// exchange sends send on c in writes of chunk bytes and returns what
// comes back: with rounds, each chunk's echo before the next chunk; then
// (or else after all of send) it half-closes and reads to EOF.
func exchange(c *net.TCPConn, send []byte, chunk int, rounds bool) ([]byte, error) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	var got []byte
	for off := 0; off < len(send); off += chunk {
		part := send[off:min(off+chunk, len(send))]
		if _, err := c.Write(part); err != nil {
			return got, fmt.Errorf("write: %w", err)
		}
		if rounds {
			buf := make([]byte, len(part))
			if _, err := io.ReadFull(c, buf); err != nil {
				return got, fmt.Errorf("round %d: %w", off/chunk, err)
			}
			got = append(got, buf...)
		}
	}
	if err := c.CloseWrite(); err != nil {
		return got, fmt.Errorf("half-close: %w", err)
	}
	rest, err := io.ReadAll(c)
	return append(got, rest...), err
}

// dialFromPod connects a socket of pod uid's (made by f, in the pod's
// netns and cgroup) to dst, waits until the fast path recorded the
// proxy's side of it (a byte sent before takes TCP for good, correctly,
// but the test is about the redirect), and returns it as a *net.TCPConn.
func (m *meshNode) dialFromPod(f *netlab.SocketFactory, uid string, dst netip.AddrPort) *net.TCPConn {
	m.t.Helper()
	fd, err := f.Socket(dst.Addr().Is6())
	if err != nil {
		m.t.Fatal(err)
	}
	paired := m.fastPath(uid).Counters.Paired
	sa := &unix.SockaddrInet4{Addr: dst.Addr().As4(), Port: int(dst.Port())}
	// A signal can interrupt the blocking connect; it goes on in the
	// kernel, and a repeated call reports how far it got.
	for {
		err = unix.Connect(fd, sa)
		if err == nil || errors.Is(err, unix.EISCONN) {
			break
		}
		if !errors.Is(err, unix.EINTR) && !errors.Is(err, unix.EALREADY) {
			unix.Close(fd)
			m.t.Fatalf("connect %s from the pod: %v", dst, err)
		}
		time.Sleep(time.Millisecond)
	}
	file := os.NewFile(uintptr(fd), "app")
	nc, err := net.FileConn(file) // a duplicate, in the runtime's poller
	file.Close()
	if err != nil {
		m.t.Fatal(err)
	}
	m.t.Cleanup(func() { nc.Close() })
	agenttest.WaitFor(m.t, 5*time.Second, "the proxy's socket paired with the app's", func() bool {
		return m.fastPath(uid).Counters.Paired > paired
	})
	return nc.(*net.TCPConn)
}

// fastPath is pod uid's fast path as the agent reports it.
func (m *meshNode) fastPath(uid string) dpstate.FastPath {
	m.t.Helper()
	ps, err := m.ae.Client.Pod(context.Background(), uid)
	if err != nil {
		m.t.Fatal(err)
	}
	if ps.FastPath == nil {
		m.t.Fatalf("the agent reports no fast path for %s", uid)
	}
	return *ps.FastPath
}

// tcpCounters are one reporter's TCP series, summed over its labels.
type tcpCounters struct{ closed, received, sent float64 }

// proxyTCPCounters scrapes the proxy of slot 0's /stats/prometheus (as
// Prometheus parses it) and sums its TCP counters per reporter.
func (m *meshNode) proxyTCPCounters() map[string]tcpCounters {
	m.t.Helper()
	fams, err := promtext.Parse(getInNetns(m.t, m.lab.Node, "http://"+proxyMetricsAddr(0)+metrics.StatsPath))
	if err != nil {
		m.t.Fatal(err)
	}
	out := map[string]tcpCounters{}
	for _, rep := range []string{"source", "destination"} {
		want := map[string]string{"reporter": rep}
		out[rep] = tcpCounters{
			closed:   promtext.Sum(fams[metrics.ConnectionsClosedName], want),
			received: promtext.Sum(fams[metrics.ReceivedBytesName], want),
			sent:     promtext.Sum(fams[metrics.SentBytesName], want),
		}
	}
	return out
}

// podServer is a server in a pod that reports what each connection
// brought.
type podServer struct {
	addr    netip.AddrPort
	results chan podServerResult
}

type podServerResult struct {
	got []byte
	err error
}

// serveInPod serves handle on a free port of pod p's IPv4 address (a
// process of the node, not of the pod's cgroup) until the test ends; what
// handle read and its error are reported in order of the connections'
// ends.
func serveInPod(t *testing.T, p *netlab.Pod, handle func(*net.TCPConn) ([]byte, error)) *podServer {
	t.Helper()
	ln, err := p.Listen("tcp", netip.AddrPortFrom(p.IPv4, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	s := &podServer{addr: netip.MustParseAddrPort(ln.Addr().String()), results: make(chan podServerResult, 16)}
	nettest.Serve(t, ln, 20*time.Second, func(c net.Conn) {
		got, err := handle(c.(*net.TCPConn))
		s.results <- podServerResult{got, err}
	})
	return s
}

// next waits for the next connection's result.
func (s *podServer) next(t *testing.T) podServerResult {
	t.Helper()
	select {
	case r := <-s.results:
		return r
	case <-time.After(20 * time.Second):
		t.Fatal("the server saw no connection end")
		return podServerResult{}
	}
}
