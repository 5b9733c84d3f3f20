//go:build linux

package demo

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/metrics"
	"github.com/ambpf/ambpf/pkg/netlab"
	"github.com/ambpf/ambpf/pkg/nodelab"
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

// shortErr keeps the cause of a network error ("connect: connection
// refused", "i/o timeout"): the rest repeats the flow's title.
func shortErr(err error) string {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return oe.Err.Error()
	}
	return err.Error()
}

// flow is one connection of the demo and what must happen to it.
type flow struct {
	title string
	// why is the path the flow shows, printed when it behaved.
	why  string
	from *netlab.Netns
	to   *pod
	// reply is the app's answer that must come back.
	reply string
	// logs are the access-log lines the proxy must write for it.
	logs []wantLog
	// probe: the node's connection must be translated by the probe SNAT.
	probe bool
}

// wantLog is an expected access-log line: the node whose proxy writes
// it, its direction and whether the connection was mutual TLS.
type wantLog struct {
	node      string
	direction string
	mtls      bool
}

func (w wantLog) String() string {
	if w.mtls {
		return w.node + "/" + w.direction + "/mtls"
	}
	return w.node + "/" + w.direction + "/plaintext"
}

// traffic starts the capture on node 1 (every bridge port and the
// inter-node link), then runs one connection per path.
func (d *demo) traffic(ctx context.Context) error {
	if err := d.openCounters(); err != nil {
		return err
	}
	w, err := nodelab.StartCapture(ctx, d.n1.Netns, "any", "tcp", filepath.Join(d.runDir, "wire.pcap"))
	if err != nil {
		return err
	}
	d.onCleanup("tcpdump", w.Stop)
	d.wire = w
	a, b, c, out := d.podNamed(podA), d.podNamed(podB), d.podNamed(podC), d.podNamed(podOutside)
	n1, n2 := d.n1.Name, d.n2.Name
	answer := func(p *pod, peer netip.Addr) string { return fmt.Sprintf("app=%s peer=%s", p.Name, peer) }
	flows := []flow{
		{
			title: "app-a -> app-b:8080 (mesh -> mesh, same node)", from: a.Netns, to: b, reply: answer(b, a.IP),
			logs: []wantLog{{n1, "outbound", true}, {n1, "inbound", true}},
			why:  "captured at app-a's 15001, carried over HBONE to app-b:15008 (mutual TLS, SPIFFE identities), delivered to app-b's app from app-a's own address",
		},
		{
			title: "app-a -> app-c:8080 (mesh on node1 -> mesh on node2)", from: a.Netns, to: c, reply: answer(c, a.IP),
			logs: []wantLog{{n1, "outbound", true}, {n2, "inbound", true}},
			why:  "node1's proxy (its own intermediate) tunnelled it over HBONE across the inter-node link to app-c:15008, where node2's proxy verified app-a's certificate against the shared root and delivered it from app-a's address",
		},
		{
			title: "app-a -> outside:8080 (mesh -> not in the mesh)", from: a.Netns, to: out, reply: answer(out, a.IP),
			logs: []wantLog{{n1, "outbound", false}},
			why:  "captured at app-a's 15001; outside is no mesh workload, so the proxy passes it through as plain TCP from app-a's address",
		},
		{
			title: "outside -> app-a:8080 (not in the mesh -> mesh)", from: out.Netns, to: a, reply: answer(a, out.IP),
			logs: []wantLog{{n1, "inbound", false}},
			why:  "captured at app-a's 15006 and allowed (PERMISSIVE); the app sees the real client address",
		},
		{
			title: "node1 -> app-a:8080 (a kubelet probe)", from: d.n1.Netns, to: a, reply: answer(a, meshconst.ProbeSourceV4),
			probe: true,
			why:   "the agent's probe SNAT on app-a's host veth gave the node's connection the source 169.254.7.127, which the in-pod datapath lets through: no proxy involved",
		},
	}
	d.printf("  tcpdump -i any in node1's netns (every bridge port and the inter-node link), writing %s\n", w.Path)
	for _, f := range flows {
		if err := d.runFlow(ctx, f); err != nil {
			return err
		}
	}
	return nil
}

// runFlow runs one flow, prints the path it took and checks it. Only an
// interrupted context or an unreadable counter is returned as an error; a
// flow that misbehaves is a failed check.
func (d *demo) runFlow(ctx context.Context, f flow) error {
	before, err := d.readCounters()
	if err != nil {
		return err
	}
	logFrom := map[*nodelab.Node]int64{}
	for _, n := range d.cluster.Nodes {
		logFrom[n] = fileSize(n.Proxy.LogPath())
	}
	dst := netip.AddrPortFrom(f.to.IP, appPort)
	reply, from, ferr := dial(ctx, f.from, dst)
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	logs := d.waitAccessLog(ctx, logFrom, len(f.logs))
	after, err := d.readCounters()
	if err != nil {
		return err
	}

	d.printf("\n  %s\n", f.title)
	if ferr != nil {
		d.printf("    no answer: %v\n", shortErr(ferr))
	} else {
		d.printf("    answer from %s: %s\n", from, reply)
	}
	var got []wantLog
	for _, l := range logs {
		d.printf("    %s proxy %-8s %s (%s) -> %s (%s), %s\n", l.Node, l.Direction, l.SrcAddr, l.SrcWorkload, l.DstAddr, l.DstWorkload, l.security())
		got = append(got, wantLog{l.Node, l.Direction, l.Security == metrics.SecurityMutualTLS})
	}
	if len(logs) == 0 {
		d.printf("    proxy: no connection logged\n")
	}
	for _, k := range slices.Sorted(maps.Keys(after)) {
		if delta := formatDelta(before[k], after[k]); delta != "" {
			d.printf("    %s: %s\n", k, delta)
		}
	}

	var problems []string
	switch {
	case ferr != nil:
		problems = append(problems, "no answer")
	case reply != f.reply || from != dst:
		problems = append(problems, fmt.Sprintf("answer %q from %s, want %q from %s", reply, from, f.reply, dst))
	}
	if !slices.Equal(sortedLogs(got), sortedLogs(f.logs)) {
		problems = append(problems, fmt.Sprintf("proxies logged %v, want %v", got, f.logs))
	}
	if f.probe {
		k := probeKey(f.to)
		if after[k] == nil || before[k] == nil || fieldValue(after[k], "translated") <= fieldValue(before[k], "translated") {
			problems = append(problems, "the probe snat translated nothing")
		}
	}
	if len(problems) > 0 {
		d.check(false, f.title+": "+strings.Join(problems, "; "))
		return nil
	}
	d.printf("    ok: %s\n", f.why)
	return nil
}

func sortedLogs(l []wantLog) []string {
	out := make([]string, 0, len(l))
	for _, w := range l {
		out = append(out, w.String())
	}
	slices.Sort(out)
	return out
}

// dial connects from n to dst and reads the app's line.
func dial(ctx context.Context, n *netlab.Netns, dst netip.AddrPort) (string, netip.AddrPort, error) {
	ctx, cancel := context.WithTimeout(ctx, exchangeTimeout)
	defer cancel()
	c, err := n.Dial(ctx, "tcp", dst.String())
	if err != nil {
		return "", netip.AddrPort{}, err
	}
	return readLine(c)
}

// accessLine is one access-log line of a proxy (pkg/metrics).
type accessLine struct {
	Node                              string
	Direction, Security               string
	SrcAddr, SrcWorkload, SrcIdentity string
	DstAddr, DstWorkload, DstIdentity string
}

func (l accessLine) security() string {
	if l.Security == metrics.SecurityMutualTLS {
		return fmt.Sprintf("mutual TLS %s -> %s", l.SrcIdentity, l.DstIdentity)
	}
	return "plaintext"
}

// accessLogMessage is the msg of pkg/metrics' access-log lines.
const accessLogMessage = "connection complete"

// waitAccessLog returns the access-log lines the proxies wrote after the
// offsets from, waiting until there are want of them (lines are written
// when a connection ends) or a short while for none.
func (d *demo) waitAccessLog(ctx context.Context, from map[*nodelab.Node]int64, want int) []accessLine {
	wait := exchangeTimeout
	if want == 0 {
		wait = 300 * time.Millisecond
	}
	deadline := time.Now().Add(wait)
	for {
		var lines []accessLine
		for _, n := range d.cluster.Nodes {
			lines = append(lines, readAccessLog(n, from[n])...)
		}
		if (want > 0 && len(lines) >= want) || time.Now().After(deadline) || ctx.Err() != nil {
			return lines
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func readAccessLog(n *nodelab.Node, from int64) []accessLine {
	var out []accessLine
	for _, m := range nodelab.LogLines(n.Proxy.LogPath(), from, accessLogMessage) {
		s := func(k string) string { v, _ := m[k].(string); return v }
		out = append(out, accessLine{
			Node:      n.Name,
			Direction: s(metrics.LogDirection), Security: s(metrics.LogSecurity),
			SrcAddr: s(metrics.LogSrcAddr), SrcWorkload: s(metrics.LogSrcWorkload), SrcIdentity: s(metrics.LogSrcIdentity),
			DstAddr: s(metrics.LogDstAddr), DstWorkload: s(metrics.LogDstWorkload), DstIdentity: s(metrics.LogDstIdentity),
		})
	}
	return out
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}
