//go:build linux

package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"

	"github.com/ambpf/ambpf/pkg/authz"
	"github.com/ambpf/ambpf/pkg/copybuf"
	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/hbone"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/metrics"
)

// authorize decides an inbound connection to this pod with the
// discovery's policies: DENY first, then ALLOW (pkg/authz). srcIdentity
// is the peer's SPIFFE ID, "" for plaintext.
func (pd *pod) authorize(srcIdentity string, src netip.Addr, dst netip.AddrPort) authz.Decision {
	return discovery.Authorize(pd.p.store, pd.merged(), authz.Conn{
		SrcIdentity: srcIdentity, SrcIP: src.Unmap(), DstIP: dst.Addr(), DstPort: dst.Port(),
	})
}

// admitPlaintext decides a plaintext inbound connection: refused under
// STRICT mTLS for the pod's namespace, else authorized without identity
// (a workload- or port-level STRICT, or a PeerAuthentication the proxy
// cannot read, is a DENY policy for plaintext).
func (pd *pod) admitPlaintext(src, dst netip.AddrPort) authz.Decision {
	return discovery.AdmitPlaintext(pd.p.store, pd.merged(), authz.Conn{SrcIP: src.Addr().Unmap(), DstIP: dst.Addr(), DstPort: dst.Port()})
}

// handleInbound relays one plaintext connection captured on 15006 to the
// app, from the client's own address.
func (pd *pod) handleInbound(c *net.TCPConn) {
	src, dst := unmapAddr(c.RemoteAddr()), originalDst(c)
	t, ok := pd.track(c, true, src, dst)
	if !ok {
		return
	}
	defer pd.untrack(t)
	if isProxyPort(dst.Port()) {
		pd.log.Debug("inbound connection without original destination", "src", src, "local", dst)
		return
	}
	labels := pd.sourceLabels(metrics.ReporterDestination)
	pd.peerLabels(&labels, src.Addr(), "", hbone.Baggage{})
	pd.inboundService(&labels, dst, "")
	mc := pd.p.metrics.Open(labels, src, dst)
	if d := pd.admitPlaintext(src, dst); !d.Allowed {
		pd.log.Info("inbound plaintext connection refused", "src", src, "dst", dst, "reason", d.Reason)
		mc.Close(metrics.Outcome{Reason: d.Reason, ResponseFlags: metrics.FlagDenied})
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), pd.p.cfg.DialTimeout)
	up, err := pd.dial(ctx, "tcp", src.Addr(), dst)
	cancel()
	if err != nil {
		mc.Close(metrics.Outcome{Err: err, ResponseFlags: metrics.FlagConnectFailure})
		return
	}
	if !t.add(up) {
		mc.Close(metrics.Outcome{Err: t.err()})
		return
	}
	err = relay(c, up, mc, false)
	mc.Close(metrics.Outcome{Err: closeCause(t, err)})
}

// peerLabels fills the source labels of an inbound connection as ztunnel
// does: first from the client's HBONE baggage (with_derived_source:
// what a client tells about itself), then from the workload that owns
// ip, which wins when discovery knows it (with_source); the principal is
// the proven identity.
func (pd *pod) peerLabels(l *metrics.Labels, ip netip.Addr, principal string, bag hbone.Baggage) {
	if bag != (hbone.Baggage{}) {
		l.SourceWorkload, l.SourceWorkloadNamespace = bag.WorkloadName, bag.Namespace
		l.SourceCanonicalService, l.SourceCanonicalRevision = bag.ServiceName, bag.ServiceVersion
		// ztunnel's with_derived_source takes source_app from the
		// workload name.
		l.SourceApp, l.SourceVersion = bag.WorkloadName, bag.ServiceVersion
		l.SourceCluster = bag.ClusterName
		l.SourceRegion, l.SourceZone = bag.Region, bag.Zone
	}
	l.SourcePrincipal = principal
	if w, ok := pd.p.store.WorkloadByIP(ip); ok {
		sourceLabels(l, w)
		l.SourceCluster = pd.p.cfg.ClusterName
	}
	if principal != "" {
		l.ConnectionSecurityPolicy = metrics.SecurityMutualTLS
	}
}

// inboundService fills destination_service for an inbound connection to
// dst (this pod) from the pod's Services, host (the client's Forwarded
// host=) first (discovery.Store.InboundService).
func (pd *pod) inboundService(l *metrics.Labels, dst netip.AddrPort, host string) {
	if svc, ok := pd.p.store.InboundService(dst.Addr(), host, dst.Port()); ok {
		l.DestinationService = svc.Hostname()
		l.DestinationServiceNamespace = svc.Namespace
		l.DestinationServiceName = svc.Name
	}
}

// errDenied wraps an authorization decision for the HBONE server, which
// answers 401 and logs it.
type errDenied struct{ d authz.Decision }

func (e errDenied) Error() string { return e.d.Reason }

// authorizeHBONE is the HBONE server's Authorize hook.
func (pd *pod) authorizeHBONE(_ context.Context, r hbone.Request) error {
	if d := pd.authorize(r.SrcIdentity.String(), r.SrcAddr.Addr(), r.Dst); !d.Allowed {
		return errDenied{d}
	}
	return nil
}

// inboundStream is an accepted HBONE stream's metrics recorder, from
// the upstream dial to the stream's end (observeHBONE).
type inboundStream struct {
	mc *metrics.Conn
}

// dialUpstream is the HBONE server's DialUpstream hook: it connects to
// the app from the client's address and counts the stream's bytes as they
// move.
func (pd *pod) dialUpstream(ctx context.Context, r hbone.Request) (net.Conn, error) {
	if upstreamLoop(r.Dst) {
		pd.countRefused(listenerHBONE, reasonLoop, "tunnel to a proxy port", r.SrcAddr, r.Dst)
		return nil, errUpstreamLoop
	}
	c, err := pd.dial(ctx, "tcp", r.SrcAddr.Addr(), r.Dst)
	if err != nil {
		return nil, err
	}
	mc := pd.openHBONE(r)
	pd.p.h3.tunnel(metrics.ReporterDestination, r.Transport, false, mc)
	pd.mu.Lock()
	pd.inflight[r.ID] = &inboundStream{mc: mc}
	pd.mu.Unlock()
	return &countedConn{Conn: c, mc: mc, direct: copybuf.Direct(c)}, nil
}

// openHBONE opens the recorder of an inbound HBONE stream. As in
// ztunnel's access log, dst.addr is the address the tunnel came in on
// (the pod's IP, port 15008) and dst.hbone_addr the CONNECT target.
func (pd *pod) openHBONE(r hbone.Request) *metrics.Conn {
	l := pd.sourceLabels(metrics.ReporterDestination)
	pd.peerLabels(&l, r.SrcAddr.Addr(), r.SrcIdentity.String(), hbone.ParseBaggage(r.Header.Values(hbone.HeaderBaggage)))
	pd.inboundService(&l, r.Dst, hbone.ParseForwardedHost(r.Header.Values(hbone.HeaderForwarded)))
	return pd.p.metrics.OpenHBONE(l, r.SrcAddr, netip.AddrPortFrom(r.Dst.Addr(), meshconst.InboundHBONEPort), r.Dst)
}

// observeHBONE is the HBONE server's Observe hook: it closes the
// stream's recorder (or records a refused stream) and so writes its
// access-log line.
func (pd *pod) observeHBONE(r hbone.Request, out hbone.Outcome) {
	pd.mu.Lock()
	st := pd.inflight[r.ID]
	delete(pd.inflight, r.ID)
	pd.mu.Unlock()
	o := metrics.Outcome{Err: out.Err, Reason: out.Reason}
	switch out.Status {
	case http.StatusOK:
	case http.StatusUnauthorized:
		o.ResponseFlags = metrics.FlagDenied
		var d errDenied
		if errors.As(out.Err, &d) {
			o.Err, o.Reason = nil, d.d.Reason
		}
	default:
		o.ResponseFlags = metrics.FlagConnectFailure
		if o.Err == nil {
			o.Err = fmt.Errorf("hbone %d: %s", out.Status, out.Reason)
		}
	}
	if st == nil {
		// Refused before the dial, or a server without the Header map:
		// count it now, with the bytes the server reports.
		mc := pd.openHBONE(r)
		mc.AddReceived(int(out.BytesIn))
		mc.AddSent(int(out.BytesOut))
		st = &inboundStream{mc: mc}
	}
	st.mc.Close(o)
}

// countedConn counts the bytes of an HBONE stream's upstream connection:
// what the app sends goes to the client ("sent"), what it reads came
// from the client ("received").
type countedConn struct {
	net.Conn
	mc     *metrics.Conn
	direct copybuf.TryWriter // c's socket written without blocking; nil if it has none
}

func (c *countedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.mc.AddSent(n)
	}
	return n, err
}

func (c *countedConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if n > 0 {
		c.mc.AddReceived(n)
	}
	return n, err
}

// TryWrite writes what the app's socket takes at once (copybuf.TryWriter:
// the HBONE read loop writes small messages to the app itself) and
// counts it as Write does. Without a socket it takes nothing, and the
// stream's deliverer writes instead.
func (c *countedConn) TryWrite(p []byte) (int, error) {
	if c.direct == nil {
		return 0, nil
	}
	n, err := c.direct.TryWrite(p)
	if n > 0 {
		c.mc.AddReceived(n)
	}
	return n, err
}

// CloseWrite half-closes the app connection (the HBONE server forwards
// the client's end of stream this way).
func (c *countedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// reauthorize applies the current discovery to the pod's open inbound
// connections and closes those it now refuses: HBONE tunnels by policy,
// plaintext ones by policy or a switch to STRICT.
func (pd *pod) reauthorize() {
	n := pd.server.CloseMatching(func(r hbone.Request) bool {
		d := pd.authorize(r.SrcIdentity.String(), r.SrcAddr.Addr(), r.Dst)
		if !d.Allowed {
			pd.log.Info("closing hbone tunnel after policy change", "src", r.SrcAddr,
				"src_identity", r.SrcIdentity.String(), "dst", r.Dst, "reason", d.Reason)
		}
		return !d.Allowed
	})
	pd.mu.Lock()
	var victims []*tracked
	for t := range pd.conns {
		if t.inbound {
			victims = append(victims, t)
		}
	}
	pd.mu.Unlock()
	for _, t := range victims {
		if d := pd.admitPlaintext(t.src, t.dst); !d.Allowed {
			pd.log.Info("closing plaintext connection after policy change", "src", t.src, "dst", t.dst, "reason", d.Reason)
			t.kill(fmt.Errorf("closed after policy change: %s", d.Reason))
			n++
		}
	}
	if n > 0 {
		pd.log.Info("policy change closed connections", "count", n)
	}
}
