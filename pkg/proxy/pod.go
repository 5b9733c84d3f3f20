//go:build linux

package proxy

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/dnsproxy"
	"github.com/ambpf/ambpf/pkg/hbone"
	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/kernfeat"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/metrics"
	"github.com/ambpf/ambpf/pkg/netns"
	"github.com/ambpf/ambpf/pkg/sockopt"
	"github.com/ambpf/ambpf/pkg/zds"
)

// pod is the proxy instance of one enrolled pod: its listeners inside the
// pod's netns, its certificate, its HBONE server and client and the
// connections it relays.
type pod struct {
	p        *Proxy
	uid      string
	info     zds.WorkloadInfo
	ns       *netns.NS
	id       identity.Identity
	workload discovery.Workload // what the ZDS layer says about the pod
	log      *slog.Logger

	creds  *identity.Source
	server *hbone.Server
	client *hbone.Client
	dns    *dnsproxy.Server
	lim    *podLimits

	stopped chan struct{} // closed when close starts

	mu        sync.Mutex
	closed    bool
	draining  bool // listeners closed by a drain; connections still served
	listeners []io.Closer
	conns     map[*tracked]struct{}
	inflight  map[uint64]*inboundStream // HBONE streams between dial and end
	wg        sync.WaitGroup
}

// fastPath reports whether the pod's app sockets may be redirected into
// the proxy's by the in-pod fast path, so that they must be read without
// splice: the agent says so in the pod's ZDS Add (ambpf's extension), or
// the proxy was told for every pod (--fastpath, for an agent that does
// not say).
func (pd *pod) fastPath() bool { return pd.info.FastPath || pd.p.cfg.FastPath }

// reusePort reports whether the pod's listeners take SO_REUSEPORT, which
// lets a second proxy share them during an upgrade but which the
// datapath cannot steer to before Linux 6.6 (bpf_sk_assign refuses such
// a listener, and what is captured for it is dropped). --no-reuseport
// (Config.NoReusePort) always wins. Otherwise the agent decides, in the
// pod's ZDS Add (ambpf's extension ambpf_reuseport, from its probe of the
// kernel); an agent that does not say (Istio's, an older ambpf-agent, or
// a value this proxy does not know) leaves it to the kernel's version
// (kernfeat.ReusePortAssign).
func (pd *pod) reusePort() bool {
	if pd.p.cfg.NoReusePort {
		return false
	}
	switch pd.info.ReusePort {
	case zds.ReusePortAllowed:
		return true
	case zds.ReusePortRefused:
		return false
	}
	return kernfeat.ReusePortAssign()
}

// startPod builds and starts a pod instance. On error everything it made
// is released.
func (p *Proxy) startPod(uid string, info zds.WorkloadInfo, nsFile *os.File) (pd *pod, err error) {
	if nsFile == nil {
		return nil, errors.New("no netns")
	}
	// The file is only valid during the ZDS call: keep a duplicate.
	ns, err := netns.FromFd(int(nsFile.Fd()))
	if err != nil {
		return nil, err
	}
	sa := cmp.Or(info.ServiceAccount, "default")
	id, err := identity.New(p.trustDomain(), info.Namespace, sa)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("pod identity: %w", err)
	}
	pd = &pod{
		p: p, uid: uid, info: info, ns: ns, id: id,
		log:      p.cfg.Logger.With("component", "pod-proxy", "uid", uid, "pod", info.Namespace+"/"+info.Name),
		conns:    map[*tracked]struct{}{},
		inflight: map[uint64]*inboundStream{},
		stopped:  make(chan struct{}),
		lim:      newPodLimits(p.cfg.Limits),
	}
	// The returns below set pd to nil: release the instance made here.
	made := pd
	defer func() {
		if err != nil {
			made.close()
		}
	}()
	ips, err := podIPs(ns)
	if err != nil {
		return nil, err
	}
	pd.workload = discovery.Workload{
		UID: uid, Name: info.Name, Namespace: info.Namespace, ServiceAccount: sa,
		IPs: ips, Protocol: discovery.ProtocolHBONE,
	}
	pd.creds, err = identity.NewSource(identity.SourceConfig{
		Identity: id, Issuer: p.auth, Lifetime: p.cfg.CertLifetime, Logger: pd.log,
		OnRotate: func(*tls.Certificate) { pd.log.Debug("certificate rotated") },
	})
	if err != nil {
		return nil, fmt.Errorf("pod certificate: %w", err)
	}
	tlsConf := hbone.TLSConfig{Credentials: pd.creds, Roots: p.auth.Roots}
	pd.server, err = hbone.NewServer(hbone.ServerConfig{
		TLS:          tlsConf,
		PodIPs:       ips,
		Authorize:    pd.authorizeHBONE,
		DialUpstream: pd.dialUpstream,
		Observe:      pd.observeHBONE,
		// What ztunnel answers about itself on a 200.
		ResponseBaggage: func(hbone.Request) hbone.Baggage { return pd.baggage(pd.merged()) },
		DialTimeout:     p.cfg.DialTimeout,
		Logger:          pd.log,

		HandshakeTimeout: p.cfg.Limits.HandshakeTimeout,
		HandshakeGate:    pd.handshakeGate(pd.lim.hsIn, listenerHBONE),
	})
	if err != nil {
		return nil, err
	}
	pd.client, err = hbone.NewClient(hbone.ClientConfig{
		TLS: tlsConf,
		Dial: func(ctx context.Context, _ netip.Addr, dst netip.AddrPort) (net.Conn, error) {
			// The pod's own address is the source: no bind, only the
			// mark so the datapath lets the connection leave.
			return pd.dial(ctx, "tcp", netip.Addr{}, dst)
		},
		H3PacketConn:       pd.h3ClientSocket,
		H3HandshakeTimeout: p.cfg.H3.HandshakeTimeout,
		H3RetryAfter:       p.cfg.H3.RetryAfter,
		Logger:             pd.log,

		HandshakeTimeout: p.cfg.Limits.HandshakeTimeout,
		HandshakeGate:    pd.handshakeGate(pd.lim.hsOut, listenerOutbound),
	})
	if err != nil {
		return nil, err
	}
	if p.cfg.DNSCapture {
		pd.dns = dnsproxy.New(dnsproxy.Config{
			Names:   &dnsproxy.Names{Catalog: p.store, Namespace: info.Namespace, ClusterDomain: p.cfg.ClusterDomain},
			Metrics: p.metrics.DNS(),
			// ztunnel labels DNS metrics with the client's canonical
			// service and revision (dns/metrics.rs DnsLabels::with_source).
			ClientFunc: func() metrics.DNSQuery {
				me := pd.merged()
				svc, rev := metrics.Canonical(me.Labels, cmp.Or(me.WorkloadName, me.Name))
				return metrics.DNSQuery{CanonicalService: svc, CanonicalRevision: rev}
			},
			Upstreams: p.cfg.DNSUpstreams,
			Dial: func(ctx context.Context, network string, addr netip.AddrPort) (net.Conn, error) {
				return pd.dial(ctx, network, netip.Addr{}, addr)
			},
			Timeout:     p.cfg.Limits.DNSTimeout,
			MaxInFlight: p.cfg.Limits.MaxDNSQueriesPerPod,
			OnRefuse: func(network string) {
				pd.countRefused(listenerDNS, reasonDNSLimit, "too many DNS queries in flight ("+network+")", netip.AddrPort{}, netip.AddrPort{})
			},
			Logger: pd.log,
		})
	}
	if err := pd.listen(); err != nil {
		return nil, err
	}
	return pd, nil
}

// podIPs returns the pod's global unicast addresses, read inside its
// netns (ZDS does not carry them).
func podIPs(ns *netns.NS) ([]netip.Addr, error) {
	var ips []netip.Addr
	err := ns.Do(func() error {
		addrs, err := net.InterfaceAddrs()
		if err != nil {
			return err
		}
		for _, a := range addrs {
			ipn, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(ipn.IP)
			if ok && ip.Unmap().IsGlobalUnicast() {
				ips = append(ips, ip.Unmap())
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read pod addresses: %w", err)
	}
	if len(ips) == 0 {
		return nil, errors.New("pod has no global unicast address")
	}
	return ips, nil
}

// listen opens the pod's listeners inside its netns and starts serving
// them.
func (pd *pod) listen() error {
	tproxy := []sockopt.Opt{sockopt.Mark(meshconst.ProxyMark), sockopt.Transparent()}
	local := []sockopt.Opt{sockopt.Mark(meshconst.ProxyMark)}
	if pd.reusePort() {
		tproxy = append(tproxy, sockopt.ReusePort())
		local = append(local, sockopt.ReusePort())
	}
	tlc := &net.ListenConfig{Control: sockopt.Control(tproxy...)}
	llc := &net.ListenConfig{Control: sockopt.Control(local...)}
	var (
		out, in, hb *net.TCPListener
		dnsTCP      []net.Listener
		dnsUDP      []*net.UDPConn
		h3          *net.UDPConn
	)
	err := pd.ns.Do(func() error {
		ctx := context.Background()
		for _, l := range []struct {
			ln   **net.TCPListener
			port int
		}{{&out, meshconst.OutboundPort}, {&in, meshconst.InboundPlaintextPort}, {&hb, meshconst.InboundHBONEPort}} {
			ln, err := tlc.Listen(ctx, "tcp", "[::]:"+strconv.Itoa(l.port))
			if err != nil {
				return fmt.Errorf("listen [::]:%d: %w", l.port, err)
			}
			*l.ln = ln.(*net.TCPListener)
			pd.listeners = append(pd.listeners, ln)
		}
		if pd.p.cfg.H3.Serve {
			c, err := pd.listenH3(ctx)
			if err != nil {
				return err
			}
			h3 = c
			pd.listeners = append(pd.listeners, c)
		}
		if pd.dns == nil {
			return nil
		}
		for _, host := range []string{"127.0.0.1", "::1"} {
			addr := net.JoinHostPort(host, strconv.Itoa(meshconst.DNSPort))
			ln, err := llc.Listen(ctx, "tcp", addr)
			if err != nil {
				return fmt.Errorf("listen tcp %s: %w", addr, err)
			}
			pd.listeners = append(pd.listeners, ln)
			dnsTCP = append(dnsTCP, ln)
			pc, err := llc.ListenPacket(ctx, "udp", addr)
			if err != nil {
				return fmt.Errorf("listen udp %s: %w", addr, err)
			}
			pd.listeners = append(pd.listeners, pc)
			dnsUDP = append(dnsUDP, pc.(*net.UDPConn))
		}
		return nil
	})
	if err != nil {
		return err
	}
	pd.wg.Go(func() { pd.accept(out, listenerOutbound, pd.handleOutbound) })
	pd.wg.Go(func() { pd.accept(in, listenerInbound, pd.handleInbound) })
	pd.wg.Go(pd.sweepIdle)
	pd.wg.Go(func() {
		if err := pd.server.Serve(limitListener{TCPListener: hb, pd: pd}); err != nil && !pd.isDraining() {
			pd.log.Warn("hbone listener stopped", "err", err)
		}
	})
	if h3 != nil {
		pd.wg.Go(func() {
			if err := pd.server.ServeH3(h3); err != nil && !pd.isDraining() {
				pd.log.Warn("hbone http/3 listener stopped", "err", err)
			}
		})
	}
	for _, ln := range dnsTCP {
		pd.wg.Go(func() { pd.dns.ServeTCP(ln) })
	}
	for _, c := range dnsUDP {
		pd.wg.Go(func() { pd.dns.ServeUDP(c) })
	}
	return nil
}

// accept serves ln until it is closed, one goroutine per connection
// that admit lets in (the others are reset in this loop, at the cost of
// one descriptor for a moment).
func (pd *pod) accept(ln *net.TCPListener, listener string, handle func(*net.TCPConn)) {
	var backoff time.Duration
	for {
		c, err := ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors or an aborted connection: wait and go
			// on rather than lose the listener.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			pd.log.Warn("accept", "addr", ln.Addr(), "err", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		release, ok := pd.admit(listener, c)
		if !ok {
			continue
		}
		pd.wg.Go(func() {
			defer release()
			handle(c)
		})
	}
}

// dial connects to dst from inside the pod with the proxy mark. With a
// valid src of dst's family the socket is bound to it with IP_TRANSPARENT
// and IP_FREEBIND: the connection to the app then comes from the
// original client's address.
func (pd *pod) dial(ctx context.Context, network string, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	opts := []sockopt.Opt{sockopt.Mark(meshconst.ProxyMark)}
	d := &net.Dialer{Timeout: pd.p.cfg.DialTimeout}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	src = src.Unmap()
	if src.IsValid() && src.Is4() == dst.Addr().Is4() {
		opts = append(opts, sockopt.Transparent(), sockopt.Freebind())
		if network == "udp" {
			d.LocalAddr = &net.UDPAddr{IP: src.AsSlice()}
		} else {
			d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
		}
	}
	d.Control = sockopt.Control(opts...)
	if dst.Addr().Is4() {
		network += "4"
	} else {
		network += "6"
	}
	// The socket is made in the pod's netns, by this process (so it
	// carries the proxy's cgroup, which the datapath's trust check
	// relies on: docs/SECURITY.md); the connect waits in the netpoller.
	c, err := pd.ns.DialContext(ctx, d, network, dst.String())
	if err != nil {
		return nil, fmt.Errorf("dial %s from pod %s: %w", dst, pd.uid, err)
	}
	return c, nil
}

// isOwn reports whether ip is one of the pod's addresses.
func (pd *pod) isOwn(ip netip.Addr) bool {
	ip = ip.Unmap()
	for _, a := range pd.workload.IPs {
		if a == ip {
			return true
		}
	}
	return false
}

// merged returns the pod's workload as discovery sees it (the file may
// add labels or override fields), or the ZDS view when it is not there.
func (pd *pod) merged() *discovery.Workload {
	if w, ok := pd.p.store.WorkloadByUID(pd.uid); ok {
		return w
	}
	return &pd.workload
}

// tracked is one relayed connection: everything to close to end it, and
// for plaintext inbound connections what re-authorization needs.
type tracked struct {
	inbound  bool // plaintext inbound: re-authorized on discovery changes
	src, dst netip.AddrPort

	mu      sync.Mutex
	closers []io.Closer
	cause   error // why it was killed; nil while alive
}

// add registers c to be closed with t; when t was already killed it
// closes c and returns false.
func (t *tracked) add(c io.Closer) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cause != nil {
		c.Close()
		return false
	}
	t.closers = append(t.closers, c)
	return true
}

// kill closes everything of t, remembering the first cause.
func (t *tracked) kill(cause error) {
	t.mu.Lock()
	if t.cause == nil {
		t.cause = cause
	}
	cs := t.closers
	t.closers = nil
	t.mu.Unlock()
	for _, c := range cs {
		c.Close()
	}
}

// err returns why t was killed, nil if it was not.
func (t *tracked) err() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.cause
}

var errPodStopped = errors.New("pod proxy stopped")

// track registers a connection starting with c; false (c closed) when
// the pod is closing.
func (pd *pod) track(c io.Closer, inbound bool, src, dst netip.AddrPort) (*tracked, bool) {
	t := &tracked{inbound: inbound, src: src, dst: dst, closers: []io.Closer{c}}
	pd.mu.Lock()
	defer pd.mu.Unlock()
	if pd.closed {
		c.Close()
		return nil, false
	}
	pd.conns[t] = struct{}{}
	return t, true
}

// untrack forgets t and closes what is left of it.
func (pd *pod) untrack(t *tracked) {
	pd.mu.Lock()
	delete(pd.conns, t)
	pd.mu.Unlock()
	t.kill(net.ErrClosed)
}

// close stops the pod instance: listeners, relayed connections, HBONE
// tunnels both ways, DNS; then waits for its goroutines and releases the
// certificate source and the netns. It is safe on a partly started pod
// and idempotent.
func (pd *pod) close() error {
	pd.mu.Lock()
	if pd.closed {
		pd.mu.Unlock()
		return nil
	}
	pd.closed = true
	close(pd.stopped)
	if pd.lim != nil {
		pd.lim.close()
	}
	listeners := pd.listeners
	conns := make([]*tracked, 0, len(pd.conns))
	for t := range pd.conns {
		conns = append(conns, t)
	}
	pd.mu.Unlock()

	var errs []error
	// The HBONE server first: it then sees its listener closing as its
	// own shutdown rather than an accept failure.
	if pd.server != nil {
		errs = append(errs, pd.server.Close())
	}
	for _, l := range listeners {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for _, t := range conns {
		t.kill(errPodStopped)
	}
	if pd.client != nil {
		errs = append(errs, pd.client.Close())
	}
	if pd.dns != nil {
		errs = append(errs, pd.dns.Close())
	}
	pd.wg.Wait()
	if pd.creds != nil {
		errs = append(errs, pd.creds.Close())
	}
	errs = append(errs, pd.ns.Close())
	return errors.Join(errs...)
}

// unmapAddr returns a's address with a v4-mapped IP unmapped.
func unmapAddr(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// originalDst is where the client meant to go: SO_ORIGINAL_DST when
// netfilter redirected the connection, else (the eBPF datapath assigns
// the packet to the listener without NAT) the accepted socket's local
// address.
func originalDst(c *net.TCPConn) netip.AddrPort {
	if od, err := sockopt.OriginalDst(c); err == nil {
		return netip.AddrPortFrom(od.Addr().Unmap(), od.Port())
	}
	return unmapAddr(c.LocalAddr())
}

// isProxyPort reports the in-pod proxy's own ports: a connection whose
// original destination is one of them reached the listener directly and
// must not be relayed (it would loop into the proxy).
func isProxyPort(port uint16) bool {
	switch port {
	case meshconst.OutboundPort, meshconst.InboundPlaintextPort, meshconst.InboundHBONEPort:
		return true
	}
	return false
}
