//go:build linux

package nettest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

// Result is what one scenario observed, normalized so that two capture
// mechanisms that both honour the contract produce equal Results: addresses
// are roles ("A" the enrolled pod, "R" the remote pod, "probe", "node",
// "loopback"), never ephemeral ports or the REDIRECT local address.
type Result struct {
	// Via is the first hop that accepted the client's traffic:
	// "proxy:<port>" for a proxy listener, "direct" when no proxy
	// listener saw it, "none" when the client got no answer at all.
	Via string
	// OrigDst is the original destination the proxy recovered for a TCP
	// connection ("R:8080"); empty when Via is not a TCP proxy listener.
	OrigDst string
	// Answer is who answered the client: "app@R", "udp@R",
	// "dns-proxy", "hbone-listener", "icmp"; empty when nobody did.
	Answer string
	// AppPeer is the peer address the answering app saw, as a role.
	AppPeer string
	// Reached reports that the app owning the destination received the
	// connection or datagram.
	Reached bool
	// ReplyFrom is the role (and port, for UDP) the reply came from;
	// set for UDP and ICMP.
	ReplyFrom string
	// Reply reports that the whole exchange completed (greeting, echo).
	Reply bool
	// Failed reports that the client saw an error (refused, reset, timeout).
	Failed bool
	// Err is the client's error, for diagnostics only: it is not compared,
	// since refused and timed out are both a correct fail-closed answer.
	Err string
}

// comparable returns r without the diagnostic fields.
func (r Result) comparable() Result { r.Err = ""; return r }

func (r Result) String() string {
	s := fmt.Sprintf("via=%s orig=%s answer=%s app_peer=%s reached=%v reply_from=%s reply=%v failed=%v",
		r.Via, r.OrigDst, r.Answer, r.AppPeer, r.Reached, r.ReplyFrom, r.Reply, r.Failed)
	if r.Err != "" {
		s += " err=" + r.Err
	}
	return s
}

// Scenario is one check of the datapath contract, run in a fresh topology:
// pod A (enrolled, the test proxy running in it) and pod R (never
// enrolled), both running the test apps, attached to one node.
type Scenario struct {
	// Name is "<behaviour>-<what>/v4" or ".../v6".
	Name string
	// Behaviour is the number of the spec behaviour (1-12) it checks.
	Behaviour int
	// V6 selects IPv6 addresses for every client in the scenario.
	V6 bool
	// Options are the capture options A is enrolled with; the proxy
	// opens its DNS listeners when Options.DNS is set.
	Options CaptureOptions
	// NoProxy leaves the proxy stopped.
	NoProxy bool
	// Manual means Run enrolls A itself (Env.Enroll) instead of the
	// harness enrolling it before Run.
	Manual bool
	// Run performs the scenario's client actions.
	Run func(e *Env) Result
	// Want is what the spec requires (Err is ignored).
	Want Result
}

// Expect checks r against the spec behaviour.
func (s Scenario) Expect(r Result) error {
	if r.comparable() != s.Want.comparable() {
		return fmt.Errorf("behaviour %d:\n got  %v\n want %v", s.Behaviour, r, s.Want)
	}
	return nil
}

// Env is the world a scenario runs in.
type Env struct {
	T       testing.TB
	Topo    *Topology
	A, R    *Pod
	AppA    *App
	AppR    *App
	Proxy   *testproxy.Proxy // nil with NoProxy
	Capture Capture
	Options CaptureOptions
	V6      bool

	enrolled bool
}

// Enroll enrolls A with the scenario's options; cleanup unenrolls it.
func (e *Env) Enroll() error {
	if err := e.Capture.Enroll(e.A, e.Options); err != nil {
		return err
	}
	e.enrolled = true
	return nil
}

// Unenroll unenrolls A.
func (e *Env) Unenroll() error {
	e.enrolled = false
	return e.Capture.Unenroll(e.A)
}

// Role names an address for results: "A", "R" or the topology's role.
func (e *Env) Role(a netip.Addr) string {
	a = a.Unmap()
	switch {
	case !a.IsValid():
		return ""
	case a == e.A.IPv4 || a == e.A.IPv6:
		return "A"
	case a == e.R.IPv4 || a == e.R.IPv6:
		return "R"
	}
	return e.Topo.Role(a)
}

// RoleAP names an address and port: "R:8080".
func (e *Env) RoleAP(ap netip.AddrPort) string {
	if !ap.IsValid() {
		return ""
	}
	return fmt.Sprintf("%s:%d", e.Role(ap.Addr()), ap.Port())
}

// Addr returns p's address of the scenario's family.
func (e *Env) Addr(p *Pod) netip.Addr { return p.Addr(e.V6) }

// AP returns p's address of the scenario's family with port.
func (e *Env) AP(p *Pod, port uint16) netip.AddrPort { return netip.AddrPortFrom(e.Addr(p), port) }

// Loopback returns 127.0.0.1 or ::1.
func (e *Env) Loopback() netip.Addr {
	if e.V6 {
		return netip.IPv6Loopback()
	}
	return netip.MustParseAddr("127.0.0.1")
}

// ProbeSource returns the kubelet probe source address of the family.
func (e *Env) ProbeSource() netip.Addr {
	if e.V6 {
		return meshconst.ProbeSourceV6
	}
	return meshconst.ProbeSourceV4
}

// Dialer returns a function dialing dst from inside n, optionally from src.
func Dialer(n *Netns, src netip.Addr, dst netip.AddrPort) func(context.Context) (net.Conn, error) {
	d := &net.Dialer{}
	if src.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	return func(ctx context.Context) (net.Conn, error) {
		return n.DialWith(ctx, d, "tcp", dst.String())
	}
}

// TCP opens a connection with dial, completes the exchange and reports it;
// target is the app that owns the destination (nil if none).
func (e *Env) TCP(dial func(context.Context) (net.Conn, error), target *App) Result {
	before := seenCount(target)
	tc, err := OpenTCP(dial)
	if err == nil {
		err = finishTCP(tc)
	}
	return e.tcpResult(tc, err, target, before)
}

// finishTCP completes an exchange on an open connection: an app greeting
// is followed by an echo round trip, a proxy's fixed answer is not.
func finishTCP(tc *TCPConn) error {
	if strings.HasPrefix(tc.Greeting, "app ") {
		return tc.Echo("ping")
	}
	return nil
}

func (e *Env) tcpResult(tc *TCPConn, err error, target *App, before int) Result {
	r := Result{Via: "none"}
	if tc != nil {
		defer tc.Close()
		r.Answer, r.AppPeer = e.parseAnswer(tc.Greeting)
		if o, ok := e.observed(tc.Local, "tcp"); ok {
			r.Via = fmt.Sprintf("proxy:%d", o.Listener)
			r.OrigDst = e.RoleAP(o.OrigDst)
		} else if r.Answer != "" {
			r.Via = "direct"
		}
	}
	r.Reached = seenCount(target) > before
	if err != nil {
		r.Failed, r.Err = true, err.Error()
	} else {
		r.Reply = true
	}
	return r
}

// parseAnswer turns a greeting into an answer name and the app's peer.
func (e *Env) parseAnswer(line string) (answer, peer string) {
	switch {
	case line == strings.TrimSpace(testproxy.HBONEGreeting):
		return "hbone-listener", ""
	case line == strings.TrimSpace(testproxy.DNSAnswer):
		return "dns-proxy", ""
	}
	f := strings.Fields(line)
	if len(f) == 3 && (f[0] == "app" || f[0] == "udp") && strings.HasPrefix(f[2], "peer=") {
		a, err := netip.ParseAddr(strings.TrimPrefix(f[2], "peer="))
		if err == nil {
			return f[0] + "@" + f[1], e.Role(a)
		}
	}
	return line, ""
}

// observed finds the proxy observation of the client socket local. The
// port must match; the address must too unless either side is loopback
// (a mechanism may rewrite the client's view of its own address).
func (e *Env) observed(local netip.AddrPort, proto string) (testproxy.Observation, bool) {
	if e.Proxy == nil || !local.IsValid() {
		return testproxy.Observation{}, false
	}
	for _, o := range e.Proxy.Observations() {
		if o.Proto != proto || o.Peer.Port() != local.Port() {
			continue
		}
		if a, b := o.Peer.Addr(), local.Addr(); a == b || a.IsLoopback() || b.IsLoopback() || b.IsUnspecified() {
			return o, true
		}
	}
	return testproxy.Observation{}, false
}

func seenCount(a *App) int {
	if a == nil {
		return 0
	}
	return len(a.Seen())
}

// UDP sends one datagram on c to dst and reports it.
func (e *Env) UDP(c *net.UDPConn, dst netip.AddrPort, target *App) Result {
	defer c.Close()
	before := seenCount(target)
	answer, from, err := UDPExchange(c, dst)
	r := Result{Via: "none"}
	r.Answer, r.AppPeer = e.parseAnswer(answer)
	local := unmap(c.LocalAddr().(*net.UDPAddr).AddrPort())
	if _, ok := e.observed(local, "udp"); ok {
		r.Via = fmt.Sprintf("proxy:%d", meshconst.DNSPort)
	} else if err == nil {
		r.Via = "direct"
	}
	r.ReplyFrom = e.RoleAP(from)
	r.Reached = seenCount(target) > before
	if err != nil {
		r.Failed, r.Err = true, err.Error()
	} else {
		r.Reply = true
	}
	return r
}

// UDPSocket opens an unconnected UDP socket of the scenario's family in n.
func (e *Env) UDPSocket(n *Netns) *net.UDPConn {
	nw, addr := "udp4", "0.0.0.0:0"
	if e.V6 {
		nw, addr = "udp6", "[::]:0"
	}
	pc, err := n.ListenPacket(nw, addr)
	if err != nil {
		e.T.Fatalf("udp socket: %v", err)
	}
	return pc.(*net.UDPConn)
}

// Ping pings dst from n and reports it.
func (e *Env) Ping(n *Netns, dst netip.Addr) Result {
	from, err := Ping(n, dst)
	if err != nil {
		return Result{Via: "none", Failed: true, Err: err.Error()}
	}
	return Result{Via: "direct", Answer: "icmp", ReplyFrom: e.Role(from), Reply: true}
}

// newEnv builds the scenario's world and registers its teardown.
func newEnv(t *testing.T, s Scenario, c Capture) *Env {
	topo := NewTopology(t, 2)
	e := &Env{T: t, Topo: topo, A: topo.Pod(0), R: topo.Pod(1), Capture: c, Options: s.Options, V6: s.V6}
	tcpPorts := []uint16{AppPort, DNSAppPort}
	udpPorts := []uint16{DNSAppPort, UDPAppPort}
	var err error
	if e.AppA, err = StartApp(&e.A.Netns, "A", tcpPorts, udpPorts); err != nil {
		t.Fatalf("start app in A: %v", err)
	}
	topo.Cleanup(e.AppA.Close)
	if e.AppR, err = StartApp(&e.R.Netns, "R", tcpPorts, udpPorts); err != nil {
		t.Fatalf("start app in R: %v", err)
	}
	topo.Cleanup(e.AppR.Close)
	if !s.NoProxy {
		if e.Proxy, err = testproxy.Start(e.A.NS, testproxy.Options{DNS: s.Options.DNS}); err != nil {
			t.Fatalf("start proxy: %v", err)
		}
		topo.Cleanup(e.Proxy.Close)
	}
	// Unenroll before the namespaces go, so a capture that keeps state
	// outside the pod (pins, maps) is exercised on its removal path.
	topo.Cleanup(func() error {
		if !e.enrolled {
			return nil
		}
		return e.Unenroll()
	})
	if !s.Manual {
		if err := e.Enroll(); err != nil {
			t.Fatalf("enroll A with %s: %v", c.Name(), err)
		}
	}
	return e
}

// Collect runs every scenario whose name contains one of filter (all when
// filter is empty) against capture, each as a subtest in a fresh topology,
// and returns the results by scenario name. It checks no expectations.
func Collect(t *testing.T, capture Capture, filter ...string) map[string]Result {
	return collect(t, capture, false, filter)
}

// Run is Collect plus the checks: every scenario's Expect, and that each
// scenario gives the same result in IPv4 and IPv6 (behaviour 11).
func Run(t *testing.T, capture Capture, filter ...string) map[string]Result {
	res := collect(t, capture, true, filter)
	for name, r4 := range res {
		base, ok := strings.CutSuffix(name, "/v4")
		if !ok {
			continue
		}
		if r6, ok := res[base+"/v6"]; ok && r4.comparable() != r6.comparable() {
			t.Errorf("behaviour 11: %s differs between IPv4 and IPv6:\n v4 %v\n v6 %v", base, r4, r6)
		}
	}
	return res
}

func collect(t *testing.T, capture Capture, check bool, filter []string) map[string]Result {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("nettest scenarios need root")
	}
	var mu sync.Mutex
	res := map[string]Result{}
	var deviations map[string]string
	if d, ok := capture.(Deviator); ok {
		deviations = d.KnownDeviations()
	}
	for _, s := range Scenarios() {
		if !matches(s.Name, filter) {
			continue
		}
		t.Run(s.Name, func(t *testing.T) {
			e := newEnv(t, s, capture)
			r := s.Run(e)
			mu.Lock()
			res[s.Name] = r
			mu.Unlock()
			t.Logf("%s: %v", capture.Name(), r)
			if !check {
				return
			}
			err := s.Expect(r)
			base, _, _ := strings.Cut(s.Name, "/")
			why, known := deviations[base]
			switch {
			case err != nil && known:
				t.Logf("%s: known deviation (%s): %v", capture.Name(), why, err)
			case err != nil:
				t.Errorf("%s: %v", capture.Name(), err)
			case known:
				t.Errorf("%s: listed as a known deviation (%s) but meets the spec; drop it from the list", capture.Name(), why)
			}
		})
	}
	return res
}

func matches(name string, filter []string) bool {
	if len(filter) == 0 {
		return true
	}
	for _, f := range filter {
		if strings.Contains(name, f) {
			return true
		}
	}
	return false
}

// Diff compares two result maps (for example iptables against eBPF) and
// returns one line per scenario whose results differ or that only one
// side ran, sorted by name; nil means they agree.
func Diff(a, b map[string]Result) []string {
	names := map[string]bool{}
	for n := range a {
		names[n] = true
	}
	for n := range b {
		names[n] = true
	}
	var out []string
	for n := range names {
		ra, oka := a[n]
		rb, okb := b[n]
		switch {
		case !oka:
			out = append(out, fmt.Sprintf("%s: only in second: %v", n, rb))
		case !okb:
			out = append(out, fmt.Sprintf("%s: only in first: %v", n, ra))
		case ra.comparable() != rb.comparable():
			out = append(out, fmt.Sprintf("%s:\n  first  %v\n  second %v", n, ra, rb))
		}
	}
	sort.Strings(out)
	return out
}
