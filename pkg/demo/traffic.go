//go:build linux

package demo

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/testproxy"
)

// appPort is where every pod's app listens.
const appPort = 8080

// exchangeTimeout bounds each dial and each reply: a captured connection
// answers at once, a fail-closed one must not hold the demo up.
const exchangeTimeout = 2 * time.Second

// greeter is a pod's app: it answers every TCP connection with one line,
// "app=<pod> peer=<address>", naming the peer address it saw, and closes
// it. That address is what tells a spoofed-source proxy hop (the app sees
// the real client) from a plain one (the app would see the proxy).
type greeter struct {
	name string
	l    net.Listener
	wg   sync.WaitGroup
}

func startGreeter(n *netlab.Netns, name string) (*greeter, error) {
	l, err := n.Listen("tcp", fmt.Sprintf("[::]:%d", appPort))
	if err != nil {
		return nil, fmt.Errorf("app in %s: %w", name, err)
	}
	g := &greeter{name: name, l: l}
	g.wg.Add(1)
	go g.serve()
	return g, nil
}

func (g *greeter) serve() {
	defer g.wg.Done()
	for {
		c, err := g.l.Accept()
		if err != nil {
			return
		}
		peer := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		c.SetWriteDeadline(time.Now().Add(exchangeTimeout))
		fmt.Fprintf(c, "app=%s peer=%s\n", g.name, peer)
		c.Close()
	}
}

// Close stops the app and waits for it.
func (g *greeter) Close() error {
	err := g.l.Close()
	g.wg.Wait()
	return err
}

// capture is one proxy listener accepting a flow.
type capture struct {
	pod      string
	listener int
}

func (c capture) String() string { return fmt.Sprintf("%s:%d", c.pod, c.listener) }

// exchange sends one request and returns the first line of the answer
// and where it came from.
type exchange func(ctx context.Context) (reply string, from netip.AddrPort, err error)

// flow is one exchange of the demo and what the datapath contract says
// must happen to it.
type flow struct {
	title string
	// why is the rule the flow shows, printed when it behaved.
	why string
	dst netip.AddrPort
	do  exchange
	// captures are the proxy listeners that must accept it, in order.
	captures []capture
	// reply is the answer that must come back from dst; fails means no
	// answer may come back at all.
	reply string
	fails bool
}

// tcpFrom connects from n (from src when valid) to dst and reads a line.
func tcpFrom(n *netlab.Netns, src netip.Addr, dst netip.AddrPort) exchange {
	d := &net.Dialer{}
	if src.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	return func(ctx context.Context) (string, netip.AddrPort, error) {
		ctx, cancel := context.WithTimeout(ctx, exchangeTimeout)
		defer cancel()
		c, err := n.DialWith(ctx, d, "tcp", dst.String())
		if err != nil {
			return "", netip.AddrPort{}, err
		}
		return readLine(c)
	}
}

// proxyTCP connects with the proxy's own marked socket, as ztunnel does
// for its upstream connections.
func proxyTCP(px *testproxy.Proxy, dst netip.AddrPort) exchange {
	return func(ctx context.Context) (string, netip.AddrPort, error) {
		ctx, cancel := context.WithTimeout(ctx, exchangeTimeout)
		defer cancel()
		c, err := px.Dial(ctx, "tcp", dst)
		if err != nil {
			return "", netip.AddrPort{}, err
		}
		return readLine(c)
	}
}

// udpFrom sends one datagram from n to dst on an unconnected socket, so
// the reply's real source is visible, and reads the answer.
func udpFrom(n *netlab.Netns, dst netip.AddrPort) exchange {
	return func(ctx context.Context) (string, netip.AddrPort, error) {
		pc, err := n.ListenPacket("udp4", "0.0.0.0:0")
		if err != nil {
			return "", netip.AddrPort{}, err
		}
		c := pc.(*net.UDPConn)
		defer c.Close()
		stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
		defer stop()
		if _, err := c.WriteToUDPAddrPort([]byte("query\n"), dst); err != nil {
			return "", netip.AddrPort{}, fmt.Errorf("send to %s: %w", dst, err)
		}
		c.SetReadDeadline(time.Now().Add(exchangeTimeout))
		buf := make([]byte, 512)
		k, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return "", netip.AddrPort{}, fmt.Errorf("read answer: %w", err)
		}
		return strings.TrimSpace(string(buf[:k])), unmap(from), nil
	}
}

func readLine(c net.Conn) (string, netip.AddrPort, error) {
	defer c.Close()
	from := unmap(c.RemoteAddr().(*net.TCPAddr).AddrPort())
	c.SetReadDeadline(time.Now().Add(exchangeTimeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", from, fmt.Errorf("read answer from %s: %w", from, err)
	}
	return strings.TrimSpace(line), from, nil
}

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// traffic runs the flows, then stops app-a's proxy and shows that new
// connections fail instead of leaving uncaptured.
func (d *demo) traffic(ctx context.Context) error {
	a, b, out := d.lab.PodNamed(podA), d.lab.PodNamed(podB), d.lab.PodNamed(podOutside)
	pxA := d.proxies[podA]
	at := func(p *netlab.Pod, v6 bool) netip.AddrPort { return netip.AddrPortFrom(p.Addr(v6), appPort) }
	answer := func(p *netlab.Pod, peer netip.Addr) string { return fmt.Sprintf("app=%s peer=%s", p.Name, peer) }
	dns := netip.AddrPortFrom(netlab.BridgeV4, 53)

	flows := []flow{
		{
			title: "app-a -> outside:8080", dst: at(out, false), do: tcpFrom(&a.Netns, netip.Addr{}, at(out, false)),
			captures: []capture{{podA, meshconst.OutboundPort}}, reply: answer(out, a.IPv4),
			why: "outbound TCP is captured at 15001 and the proxy recovers the original destination",
		},
		{
			title: "app-a -> outside:8080 over IPv6", dst: at(out, true), do: tcpFrom(&a.Netns, netip.Addr{}, at(out, true)),
			captures: []capture{{podA, meshconst.OutboundPort}}, reply: answer(out, a.IPv6),
			why: "IPv6 is captured the same way",
		},
		{
			title: "outside -> app-a:8080", dst: at(a, false), do: tcpFrom(&out.Netns, netip.Addr{}, at(a, false)),
			captures: []capture{{podA, meshconst.InboundPlaintextPort}}, reply: answer(a, out.IPv4),
			why: "inbound TCP is captured at 15006; the app sees the real client address, not the proxy's",
		},
		{
			title: "app-a -> app-b:8080", dst: at(b, false), do: tcpFrom(&a.Netns, netip.Addr{}, at(b, false)),
			captures: []capture{{podA, meshconst.OutboundPort}, {podB, meshconst.InboundPlaintextPort}},
			reply:    answer(b, a.IPv4),
			why:      "captured on both ends: out of app-a at 15001, into app-b at 15006",
		},
		{
			title: "node 169.254.7.127 -> app-a:8080 (kubelet probe)", dst: at(a, false),
			do:    tcpFrom(d.lab.Node, meshconst.ProbeSourceV4, at(a, false)),
			reply: answer(a, meshconst.ProbeSourceV4),
			why:   "kubelet probes (SNAT'd to 169.254.7.127) and their replies are not captured",
		},
		{
			title: "app-a -> node 10.77.0.1:53/udp (DNS)", dst: dns, do: udpFrom(&a.Netns, dns),
			captures: []capture{{podA, meshconst.DNSPort}}, reply: strings.TrimSpace(testproxy.DNSAnswer),
			why: "DNS is captured to the proxy's resolver on 127.0.0.1:15053; the reply comes from the address asked",
		},
		{
			title: "app-a's proxy (mark 0x539) -> outside:8080", dst: at(out, false), do: proxyTCP(pxA, at(out, false)),
			reply: answer(out, a.IPv4),
			why:   "the proxy's own sockets carry mark 0x539 and are never captured",
		},
	}
	d.printf("  (counters: \"bypassed\" counts connections let through uncaptured: probes and the\n")
	d.printf("   proxy's own marked connections, such as its upstream leg of a captured one)\n")
	for _, f := range flows {
		if err := d.runFlow(ctx, f); err != nil {
			return err
		}
	}

	d.printf("\n  -- stopping app-a's proxy --\n")
	if err := pxA.Close(); err != nil {
		return fmt.Errorf("stop app-a's proxy: %w", err)
	}
	for _, f := range []flow{
		{
			title: "app-a -> outside:8080, app-a's proxy stopped", dst: at(out, false),
			do: tcpFrom(&a.Netns, netip.Addr{}, at(out, false)), fails: true,
			why: "no proxy listening: the connection fails (fail closed), it never leaves uncaptured",
		},
		{
			title: "outside -> app-a:8080, app-a's proxy stopped", dst: at(a, false),
			do: tcpFrom(&out.Netns, netip.Addr{}, at(a, false)), fails: true,
			why: "inbound fails closed too: the app is not reachable around the proxy",
		},
	} {
		if err := d.runFlow(ctx, f); err != nil {
			return err
		}
	}
	return nil
}

// runFlow runs one flow, prints the path it took and checks it. Only an
// interrupted context is returned as an error; a flow that misbehaves is
// a failed check.
func (d *demo) runFlow(ctx context.Context, f flow) error {
	before := map[string]int{}
	for _, name := range enrolled {
		before[name] = len(d.proxies[name].Observations())
	}
	countersBefore, cerr := d.counters()
	if cerr != nil {
		return cerr
	}
	reply, from, err := f.do(ctx)
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	countersAfter, cerr := d.counters()
	if cerr != nil {
		return cerr
	}
	d.printf("\n  %s\n", f.title)
	var got []capture
	origOK := true
	for _, name := range enrolled {
		// The flows run one at a time, so what a proxy observed since
		// the flow started is this flow.
		for _, o := range d.proxies[name].Observations()[before[name]:] {
			got = append(got, capture{name, o.Listener})
			if o.Proto == "udp" {
				d.printf("    %s proxy :%d answered the query from %s\n", name, o.Listener, o.Peer)
				continue
			}
			d.printf("    %s proxy :%d accepted %s, original destination %s\n", name, o.Listener, o.Peer, o.OrigDst)
			origOK = origOK && o.OrigDst == f.dst
		}
	}
	if len(got) == 0 {
		d.printf("    no proxy accepted it\n")
	}
	for _, name := range enrolled {
		if delta := formatDelta(countersBefore[name], countersAfter[name]); delta != "" {
			d.printf("    %s datapath counters: %s\n", name, delta)
		}
	}
	if err != nil {
		d.printf("    no answer: %v\n", shortErr(err))
	} else {
		d.printf("    answer from %s: %s\n", from, reply)
	}

	var problems []string
	if !slices.Equal(got, f.captures) {
		problems = append(problems, fmt.Sprintf("captured by %v, want %v", got, f.captures))
	}
	if !origOK {
		problems = append(problems, "original destination lost")
	}
	switch {
	case f.fails && err == nil:
		problems = append(problems, "got an answer, want the connection to fail")
	case !f.fails && err != nil:
		problems = append(problems, "no answer")
	case !f.fails && (reply != f.reply || from != f.dst):
		problems = append(problems, fmt.Sprintf("answer %q from %s, want %q from %s", reply, from, f.reply, f.dst))
	}
	if len(problems) > 0 {
		d.printf("    FAIL: %s\n", strings.Join(problems, "; "))
		d.check(false, f.title+": "+strings.Join(problems, "; "))
		return nil
	}
	d.printf("    ok: %s\n", f.why)
	return nil
}

// shortErr keeps the cause of a network error ("connect: connection
// refused", "i/o timeout"): the rest repeats the flow's title.
func shortErr(err error) string {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err.Error()
	}
	return err.Error()
}
