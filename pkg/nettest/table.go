//go:build linux

package nettest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/ambpf/ambpf/pkg/meshconst"
)

// Shorthands for expected results.
func direct(answer, peer string) Result {
	return Result{Via: "direct", Answer: answer, AppPeer: peer, Reached: true, Reply: true}
}

func proxied(port int, origDst, answer, peer string) Result {
	return Result{Via: fmt.Sprintf("proxy:%d", port), OrigDst: origDst, Answer: answer, AppPeer: peer,
		Reached: strings.HasPrefix(answer, "app@"), Reply: true}
}

func udpDirect(answer, peer, from string) Result {
	r := direct(answer, peer)
	r.ReplyFrom = from
	return r
}

var failedClosed = Result{Via: "none", Failed: true}

// Scenarios returns the scenario table: one or more scenarios per
// behaviour 1-12 of the datapath spec, each in IPv4 and IPv6. A is the
// enrolled pod running the proxy, R the outside world.
func Scenarios() []Scenario {
	var out []Scenario
	for _, v6 := range []bool{false, true} {
		fam := "/v4"
		if v6 {
			fam = "/v6"
		}
		for _, s := range scenarioTemplates() {
			s.Name += fam
			s.V6 = v6
			out = append(out, s)
		}
	}
	return out
}

// fromR dials A:port from R; fromA dials dst from A.
func (e *Env) fromR(port uint16) Result {
	return e.TCP(Dialer(&e.R.Netns, netip.Addr{}, e.AP(e.A, port)), e.AppA)
}

func (e *Env) fromA(dst netip.AddrPort, target *App) Result {
	return e.TCP(Dialer(&e.A.Netns, netip.Addr{}, dst), target)
}

// proxyDial makes the proxy's own marked TCP connection to dst.
func (e *Env) proxyDial(dst netip.AddrPort, target *App) Result {
	return e.TCP(func(ctx context.Context) (net.Conn, error) { return e.Proxy.Dial(ctx, "tcp", dst) }, target)
}

func scenarioTemplates() []Scenario {
	dnsOn := CaptureOptions{DNS: true}
	return []Scenario{
		// 1. Inbound TCP on any port but 15008 reaches 15006 with the
		// original destination.
		{Name: "01-inbound-app-port", Behaviour: 1,
			Run:  func(e *Env) Result { return e.fromR(AppPort) },
			Want: proxied(meshconst.InboundPlaintextPort, "A:8080", "app@A", "R")},
		{Name: "01-inbound-other-port", Behaviour: 1,
			Run:  func(e *Env) Result { return e.fromR(DNSAppPort) },
			Want: proxied(meshconst.InboundPlaintextPort, "A:53", "app@A", "R")},
		{Name: "01-inbound-from-node", Behaviour: 1,
			Run: func(e *Env) Result {
				return e.TCP(Dialer(e.Topo.Node, netip.Addr{}, e.AP(e.A, AppPort)), e.AppA)
			},
			Want: proxied(meshconst.InboundPlaintextPort, "A:8080", "app@A", "node")},
		{Name: "01-bypass-inbound-direct", Behaviour: 1, Options: CaptureOptions{BypassInbound: true},
			Run:  func(e *Env) Result { return e.fromR(AppPort) },
			Want: direct("app@A", "R")},
		{Name: "01-bypass-inbound-outbound-captured", Behaviour: 1, Options: CaptureOptions{BypassInbound: true},
			Run:  func(e *Env) Result { return e.fromA(e.AP(e.R, AppPort), e.AppR) },
			Want: proxied(meshconst.OutboundPort, "R:8080", "app@R", "A")},

		// 2. Port 15008 reaches the HBONE listener untouched.
		{Name: "02-inbound-hbone", Behaviour: 2,
			Run: func(e *Env) Result { return e.fromR(meshconst.InboundHBONEPort) },
			Want: Result{Via: fmt.Sprintf("proxy:%d", meshconst.InboundHBONEPort), OrigDst: "A:15008",
				Answer: "hbone-listener", Reply: true}},

		// 3. Outbound TCP reaches 15001; the remote app sees A.
		{Name: "03-outbound", Behaviour: 3,
			Run:  func(e *Env) Result { return e.fromA(e.AP(e.R, AppPort), e.AppR) },
			Want: proxied(meshconst.OutboundPort, "R:8080", "app@R", "A")},
		{Name: "03-outbound-to-node", Behaviour: 3,
			Run: func(e *Env) Result {
				// Nothing listens on the node: the proxy accepts, then
				// its upstream dial is refused and it closes.
				return e.fromA(netip.AddrPortFrom(e.nodeAddr(), AppPort), nil)
			},
			Want: Result{Via: fmt.Sprintf("proxy:%d", meshconst.OutboundPort), OrigDst: "node:8080", Failed: true}},

		// 4. The proxy's own (marked) connections are not captured.
		{Name: "04-proxy-own-outbound", Behaviour: 4,
			Run:  func(e *Env) Result { return e.proxyDial(e.AP(e.R, AppPort), e.AppR) },
			Want: direct("app@R", "A")},
		{Name: "04-proxy-own-to-own-ip", Behaviour: 4,
			Run:  func(e *Env) Result { return e.proxyDial(e.AP(e.A, AppPort), e.AppA) },
			Want: direct("app@A", "A")},

		// 5. Kubelet probes are not captured, and their replies return.
		{Name: "05-probe-source", Behaviour: 5,
			Run: func(e *Env) Result {
				return e.TCP(Dialer(e.Topo.Node, e.ProbeSource(), e.AP(e.A, AppPort)), e.AppA)
			},
			Want: direct("app@A", "probe")},

		// 6. Traffic to the pod's own IP and to loopback is not captured.
		{Name: "06-own-ip", Behaviour: 6,
			Run:  func(e *Env) Result { return e.fromA(e.AP(e.A, AppPort), e.AppA) },
			Want: direct("app@A", "A")},
		{Name: "06-loopback", Behaviour: 6,
			Run: func(e *Env) Result {
				return e.fromA(netip.AddrPortFrom(e.Loopback(), AppPort), e.AppA)
			},
			Want: direct("app@A", "loopback")},

		// 7. The app sees the real client and its replies reach the proxy.
		{Name: "07-app-sees-client", Behaviour: 7,
			Run: func(e *Env) Result {
				r := e.fromR(AppPort)
				if seen := e.AppA.Seen(); len(seen) != 1 || e.Role(seen[0].Peer.Addr()) != "R" {
					r.AppPeer = fmt.Sprintf("app log %v", seen)
				}
				return r
			},
			Want: proxied(meshconst.InboundPlaintextPort, "A:8080", "app@A", "R")},

		// 8. DNS capture.
		{Name: "08-dns-udp-captured", Behaviour: 8, Options: dnsOn,
			Run: func(e *Env) Result { return e.UDP(e.UDPSocket(&e.A.Netns), e.AP(e.R, DNSAppPort), e.AppR) },
			Want: Result{Via: fmt.Sprintf("proxy:%d", meshconst.DNSPort), Answer: "dns-proxy",
				ReplyFrom: "R:53", Reply: true}},
		{Name: "08-dns-tcp-captured", Behaviour: 8, Options: dnsOn,
			Run: func(e *Env) Result { return e.fromA(e.AP(e.R, DNSAppPort), e.AppR) },
			Want: Result{Via: fmt.Sprintf("proxy:%d", meshconst.DNSPort), OrigDst: "R:53", Answer: "dns-proxy",
				Reply: true}},
		{Name: "08-dns-proxy-own-udp", Behaviour: 8, Options: dnsOn,
			Run: func(e *Env) Result {
				c, err := e.Proxy.ListenPacket(e.V6)
				if err != nil {
					e.T.Fatal(err)
				}
				return e.UDP(c, e.AP(e.R, DNSAppPort), e.AppR)
			},
			Want: udpDirect("udp@R", "A", "R:53")},
		{Name: "08-dns-proxy-own-tcp", Behaviour: 8, Options: dnsOn,
			Run:  func(e *Env) Result { return e.proxyDial(e.AP(e.R, DNSAppPort), e.AppR) },
			Want: direct("app@R", "A")},
		{Name: "08-dns-off-udp-direct", Behaviour: 8,
			Run:  func(e *Env) Result { return e.UDP(e.UDPSocket(&e.A.Netns), e.AP(e.R, DNSAppPort), e.AppR) },
			Want: udpDirect("udp@R", "A", "R:53")},
		{Name: "08-dns-off-tcp-is-plain-tcp", Behaviour: 8,
			Run:  func(e *Env) Result { return e.fromA(e.AP(e.R, DNSAppPort), e.AppR) },
			Want: proxied(meshconst.OutboundPort, "R:53", "app@R", "A")},

		// 9. Other non-TCP traffic is untouched (with DNS capture on).
		{Name: "09-udp-outbound", Behaviour: 9, Options: dnsOn,
			Run:  func(e *Env) Result { return e.UDP(e.UDPSocket(&e.A.Netns), e.AP(e.R, UDPAppPort), e.AppR) },
			Want: udpDirect("udp@R", "A", "R:9999")},
		{Name: "09-udp-inbound", Behaviour: 9, Options: dnsOn,
			Run:  func(e *Env) Result { return e.UDP(e.UDPSocket(&e.R.Netns), e.AP(e.A, UDPAppPort), e.AppA) },
			Want: udpDirect("udp@A", "R", "A:9999")},
		{Name: "09-ping-outbound", Behaviour: 9, Options: dnsOn,
			Run:  func(e *Env) Result { return e.Ping(&e.A.Netns, e.Addr(e.R)) },
			Want: Result{Via: "direct", Answer: "icmp", ReplyFrom: "R", Reply: true}},
		{Name: "09-ping-inbound", Behaviour: 9, Options: dnsOn,
			Run:  func(e *Env) Result { return e.Ping(&e.R.Netns, e.Addr(e.A)) },
			Want: Result{Via: "direct", Answer: "icmp", ReplyFrom: "A", Reply: true}},

		// 10. Established connections survive enrolment; unenrolment
		// restores direct traffic.
		{Name: "10-outbound-established-before-enroll", Behaviour: 10, Manual: true,
			Run: func(e *Env) Result {
				return e.acrossEnroll(Dialer(&e.A.Netns, netip.Addr{}, e.AP(e.R, AppPort)), e.AppR, e.Enroll)
			},
			Want: direct("app@R", "A")},
		{Name: "10-inbound-established-before-enroll", Behaviour: 10, Manual: true,
			Run: func(e *Env) Result {
				return e.acrossEnroll(Dialer(&e.R.Netns, netip.Addr{}, e.AP(e.A, AppPort)), e.AppA, e.Enroll)
			},
			Want: direct("app@A", "R")},
		{Name: "10-captured-survives-reattach", Behaviour: 10,
			Run: func(e *Env) Result {
				// Re-attach is Enroll on an enrolled pod (agent restart).
				return e.acrossEnroll(Dialer(&e.A.Netns, netip.Addr{}, e.AP(e.R, AppPort)), e.AppR, e.Enroll)
			},
			Want: proxied(meshconst.OutboundPort, "R:8080", "app@R", "A")},
		{Name: "10-outbound-direct-after-unenroll", Behaviour: 10,
			Run: func(e *Env) Result {
				if err := e.Unenroll(); err != nil {
					e.T.Fatal(err)
				}
				return e.fromA(e.AP(e.R, AppPort), e.AppR)
			},
			Want: direct("app@R", "A")},
		{Name: "10-inbound-direct-after-unenroll", Behaviour: 10,
			Run: func(e *Env) Result {
				if err := e.Unenroll(); err != nil {
					e.T.Fatal(err)
				}
				return e.fromR(AppPort)
			},
			Want: direct("app@A", "R")},

		// 12. Fail closed when no proxy listens.
		{Name: "12-no-proxy-inbound", Behaviour: 12, NoProxy: true,
			Run:  func(e *Env) Result { return e.fromR(AppPort) },
			Want: failedClosed},
		{Name: "12-no-proxy-outbound", Behaviour: 12, NoProxy: true,
			Run:  func(e *Env) Result { return e.fromA(e.AP(e.R, AppPort), e.AppR) },
			Want: failedClosed},
		{Name: "12-no-proxy-hbone", Behaviour: 12, NoProxy: true,
			Run:  func(e *Env) Result { return e.fromR(meshconst.InboundHBONEPort) },
			Want: failedClosed},
	}
}

func (e *Env) nodeAddr() netip.Addr {
	if e.V6 {
		return BridgeV6
	}
	return BridgeV4
}

// acrossEnroll opens a connection, runs change (enrol, re-enrol), then
// checks that the connection still carries data both ways. The result
// describes the connection as it was first accepted.
func (e *Env) acrossEnroll(dial func(context.Context) (net.Conn, error), target *App, change func() error) Result {
	before := seenCount(target)
	tc, err := OpenTCP(dial)
	if err == nil {
		err = tc.Echo("before")
	}
	if err == nil {
		if cerr := change(); cerr != nil {
			e.T.Fatalf("change capture: %v", cerr)
		}
		err = tc.Echo("after")
	}
	return e.tcpResult(tc, err, target, before)
}
