//go:build linux

// Package testproxy is a small stand-in for ztunnel's in-pod listeners,
// used by datapath tests. It opens the listeners the way ztunnel does
// (mark 0x539, IP_TRANSPARENT, SO_REUSEPORT, inside the pod's network
// namespace), passes L4 traffic through without the HBONE hop, and records
// every connection or datagram it accepts so a test can tell which
// listener caught what and which original destination it recovered.
package testproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/ambpf/ambpf/pkg/closers"
	"github.com/ambpf/ambpf/pkg/kernfeat"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/sockopt"
)

// Fixed answers of the listeners that do not pass traffic through.
const (
	HBONEGreeting = "hbone-listener\n"
	DNSAnswer     = "dns-proxy\n"
)

// Options configure Start.
type Options struct {
	// DNS opens UDP and TCP listeners on 127.0.0.1:15053 and [::1]:15053.
	DNS bool
	// NoReusePort leaves SO_REUSEPORT off the TCP listeners (agenttest
	// sets it when the agent's ZDS Add says the kernel refuses them). It
	// is off anyway on kernels before 6.6 by the version
	// (kernfeat.ReusePortAssign), where the datapath cannot steer to
	// SO_REUSEPORT listeners.
	NoReusePort bool
	// NoSplice copies with read and write only. The fast path
	// (pkg/fastpath) moves an app's bytes into the receive queue of the
	// proxy's socket outside TCP's, where splice(2), which io.Copy between
	// two TCP connections uses, does not look.
	NoSplice bool
	// DialTimeout bounds upstream dials; 0 means 2 seconds.
	DialTimeout time.Duration
	// Logger receives debug logs; nil discards them.
	Logger *slog.Logger
}

// Observation is one connection or datagram a listener accepted.
type Observation struct {
	// Proto is "tcp" or "udp".
	Proto string
	// Listener is the port of the listener: 15001, 15006, 15008 or 15053.
	Listener int
	// Local and Peer are the accepted socket's addresses (v4-mapped
	// addresses unmapped).
	Local, Peer netip.AddrPort
	// OrigDst is SO_ORIGINAL_DST when it answers, else Local (ztunnel's
	// rule). Datagrams always use Local.
	OrigDst netip.AddrPort
	// OrigDstErr is why SO_ORIGINAL_DST did not answer, if it did not.
	OrigDstErr string
}

// Proxy is a running test proxy. Its methods are safe for concurrent use.
type Proxy struct {
	ns   *netns.NS
	opts Options
	log  *slog.Logger

	mu        sync.Mutex
	cond      *sync.Cond
	obs       []Observation
	open      closers.Set
	closed    bool
	listeners []io.Closer
	wg        sync.WaitGroup
}

// Start opens the listeners inside ns and starts serving. On error nothing
// is left open.
func Start(ns *netns.NS, opts Options) (*Proxy, error) {
	if opts.DialTimeout == 0 {
		opts.DialTimeout = 2 * time.Second
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Proxy{ns: ns, opts: opts, log: log}
	p.cond = sync.NewCond(&p.mu)

	tcpOpts := []sockopt.Opt{sockopt.Mark(meshconst.ProxyMark), sockopt.Transparent()}
	if !opts.NoReusePort && kernfeat.ReusePortAssign() {
		tcpOpts = append(tcpOpts, sockopt.ReusePort())
	}
	tproxy := &net.ListenConfig{Control: sockopt.Control(tcpOpts...)}
	dns := &net.ListenConfig{Control: sockopt.Control(sockopt.Mark(meshconst.ProxyMark))}

	type tcpSpec struct {
		lc     *net.ListenConfig
		addr   string
		port   int
		handle func(*net.TCPConn, Observation)
	}
	specs := []tcpSpec{
		{tproxy, "[::]", meshconst.OutboundPort, p.outbound},
		{tproxy, "[::]", meshconst.InboundPlaintextPort, p.inbound},
		{tproxy, "[::]", meshconst.InboundHBONEPort, p.fixed(HBONEGreeting)},
	}
	var udpAddrs []string
	if opts.DNS {
		for _, a := range []string{"127.0.0.1", "[::1]"} {
			specs = append(specs, tcpSpec{dns, a, meshconst.DNSPort, p.fixed(DNSAnswer)})
			udpAddrs = append(udpAddrs, net.JoinHostPort(trimBrackets(a), strconv.Itoa(meshconst.DNSPort)))
		}
	}

	var (
		tcpLs []*net.TCPListener
		udpLs []*net.UDPConn
	)
	err := ns.Do(func() error {
		for _, s := range specs {
			addr := net.JoinHostPort(trimBrackets(s.addr), strconv.Itoa(s.port))
			l, err := s.lc.Listen(context.Background(), "tcp", addr)
			if err != nil {
				return fmt.Errorf("listen tcp %s: %w", addr, err)
			}
			tcpLs = append(tcpLs, l.(*net.TCPListener))
			p.listeners = append(p.listeners, l)
		}
		for _, addr := range udpAddrs {
			c, err := dns.ListenPacket(context.Background(), "udp", addr)
			if err != nil {
				return fmt.Errorf("listen udp %s: %w", addr, err)
			}
			udpLs = append(udpLs, c.(*net.UDPConn))
			p.listeners = append(p.listeners, c)
		}
		return nil
	})
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("start test proxy: %w", err)
	}
	for i, l := range tcpLs {
		p.wg.Add(1)
		go p.serveTCP(l, specs[i].port, specs[i].handle)
	}
	for _, c := range udpLs {
		p.wg.Add(1)
		go p.serveDNSUDP(c)
	}
	return p, nil
}

func trimBrackets(s string) string {
	if len(s) > 1 && s[0] == '[' {
		return s[1 : len(s)-1]
	}
	return s
}

// Close closes the listeners and every open connection, waits for all
// goroutines and returns the first error from closing a listener.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	var errs []error
	for _, l := range p.listeners {
		errs = append(errs, l.Close())
	}
	p.open.Close()
	p.cond.Broadcast()
	p.mu.Unlock()
	p.wg.Wait()
	return errors.Join(errs...)
}

// Observations returns a copy of everything observed so far, in order.
func (p *Proxy) Observations() []Observation {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Observation(nil), p.obs...)
}

// WaitFor waits up to timeout for an observation satisfying pred (already
// recorded or new) and returns it; ok is false on timeout or Close.
func (p *Proxy) WaitFor(pred func(Observation) bool, timeout time.Duration) (o Observation, ok bool) {
	timer := time.AfterFunc(timeout, func() {
		p.mu.Lock()
		p.cond.Broadcast()
		p.mu.Unlock()
	})
	defer timer.Stop()
	deadline := time.Now().Add(timeout)
	p.mu.Lock()
	defer p.mu.Unlock()
	seen := 0
	for {
		for ; seen < len(p.obs); seen++ {
			if pred(p.obs[seen]) {
				return p.obs[seen], true
			}
		}
		if p.closed || !time.Now().Before(deadline) {
			return Observation{}, false
		}
		p.cond.Wait()
	}
}

func (p *Proxy) record(o Observation) {
	p.mu.Lock()
	p.obs = append(p.obs, o)
	p.cond.Broadcast()
	p.mu.Unlock()
	p.log.Debug("observed", "listener", o.Listener, "peer", o.Peer, "local", o.Local, "orig_dst", o.OrigDst, "orig_dst_err", o.OrigDstErr)
}

func unmapAP(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	case *net.UDPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

func (p *Proxy) serveTCP(l *net.TCPListener, port int, handle func(*net.TCPConn, Observation)) {
	defer p.wg.Done()
	for {
		c, err := l.AcceptTCP()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				p.log.Warn("accept", "port", port, "err", err)
			}
			return
		}
		o := Observation{Proto: "tcp", Listener: port, Local: unmapAP(c.LocalAddr()), Peer: unmapAP(c.RemoteAddr())}
		if od, err := sockopt.OriginalDst(c); err == nil {
			o.OrigDst = netip.AddrPortFrom(od.Addr().Unmap(), od.Port())
		} else {
			o.OrigDst, o.OrigDstErr = o.Local, err.Error()
		}
		p.record(o)
		if !p.open.Add(c) {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer p.open.Remove(c)
			handle(c, o)
		}()
	}
}

// fixed answers every connection with msg and closes it.
func (p *Proxy) fixed(msg string) func(*net.TCPConn, Observation) {
	return func(c *net.TCPConn, _ Observation) {
		if _, err := io.WriteString(c, msg); err != nil {
			p.log.Debug("write greeting", "err", err)
		}
	}
}

// outbound passes a captured outbound connection to its original
// destination from the pod's own address, with the proxy mark so that the
// upstream connection is not captured again.
func (p *Proxy) outbound(c *net.TCPConn, o Observation) {
	d := &net.Dialer{Timeout: p.opts.DialTimeout, Control: sockopt.Control(sockopt.Mark(meshconst.ProxyMark))}
	p.relay(c, d, o)
}

// inbound passes a captured inbound connection to the app from the
// original client's address (IP_TRANSPARENT + IP_FREEBIND), so the app
// sees its real peer.
func (p *Proxy) inbound(c *net.TCPConn, o Observation) {
	d := &net.Dialer{
		Timeout:   p.opts.DialTimeout,
		LocalAddr: &net.TCPAddr{IP: o.Peer.Addr().AsSlice()},
		Control: sockopt.Control(sockopt.Mark(meshconst.ProxyMark),
			sockopt.Transparent(), sockopt.Freebind()),
	}
	p.relay(c, d, o)
}

func network(a netip.Addr, proto string) string {
	if a.Is4() {
		return proto + "4"
	}
	return proto + "6"
}

// relay dials dst with d inside the pod and copies both ways until both
// directions are done.
func (p *Proxy) relay(c *net.TCPConn, d *net.Dialer, o Observation) {
	dst := o.OrigDst
	if int(dst.Port()) == o.Listener {
		// The connection reached the listener's own port directly (no
		// original destination): passing it on would loop back to us.
		// (Under sk_assign the local address is the original destination,
		// so only the listener's own port means "none".)
		p.log.Debug("no original destination", "peer", c.RemoteAddr(), "local", c.LocalAddr())
		return
	}
	var up net.Conn
	err := p.ns.Do(func() (err error) {
		up, err = d.Dial(network(dst.Addr(), "tcp"), dst.String())
		return err
	})
	if err != nil {
		p.log.Debug("upstream dial", "dst", dst, "err", err)
		return
	}
	if !p.open.Add(up) {
		return
	}
	defer p.open.Remove(up)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.halfCopy(up.(*net.TCPConn), c) }()
	go func() { defer wg.Done(); p.halfCopy(c, up.(*net.TCPConn)) }()
	wg.Wait()
}

// halfCopy copies src to dst and then half-closes dst for writing, so an
// EOF in one direction reaches the other side.
func (p *Proxy) halfCopy(dst, src *net.TCPConn) {
	if p.opts.NoSplice {
		// Hide ReadFrom/WriteTo so io.Copy reads and writes.
		io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, make([]byte, 64<<10))
	} else {
		io.Copy(dst, src)
	}
	dst.CloseWrite()
}

func (p *Proxy) serveDNSUDP(c *net.UDPConn) {
	defer p.wg.Done()
	local := unmapAP(c.LocalAddr())
	buf := make([]byte, 2048)
	for {
		_, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				p.log.Warn("dns read", "err", err)
			}
			return
		}
		p.record(Observation{Proto: "udp", Listener: meshconst.DNSPort, Local: local,
			Peer: netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), OrigDst: local})
		if _, err := c.WriteToUDPAddrPort([]byte(DNSAnswer), from); err != nil {
			p.log.Debug("dns reply", "to", from, "err", err)
		}
	}
}

// Dial opens the proxy's own upstream connection ("tcp" or "udp") to dst
// from inside the pod with the proxy mark, as ztunnel does for its own
// traffic. The datapath must never capture it.
func (p *Proxy) Dial(ctx context.Context, proto string, dst netip.AddrPort) (net.Conn, error) {
	d := &net.Dialer{Timeout: p.opts.DialTimeout, Control: sockopt.Control(sockopt.Mark(meshconst.ProxyMark))}
	var c net.Conn
	err := p.ns.Do(func() (err error) {
		c, err = d.DialContext(ctx, network(dst.Addr(), proto), dst.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("proxy dial %s %s: %w", proto, dst, err)
	}
	return c, nil
}

// ListenPacket opens the proxy's own unconnected UDP socket inside the pod
// with the proxy mark (for upstream DNS queries that read the reply's
// source).
func (p *Proxy) ListenPacket(v6 bool) (*net.UDPConn, error) {
	lc := &net.ListenConfig{Control: sockopt.Control(sockopt.Mark(meshconst.ProxyMark))}
	addr := "0.0.0.0:0"
	nw := "udp4"
	if v6 {
		addr, nw = "[::]:0", "udp6"
	}
	var c net.PacketConn
	err := p.ns.Do(func() (err error) {
		c, err = lc.ListenPacket(context.Background(), nw, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("proxy listen %s: %w", nw, err)
	}
	return c.(*net.UDPConn), nil
}
