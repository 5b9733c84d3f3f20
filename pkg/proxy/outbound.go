//go:build linux

package proxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/hbone"
	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/metrics"
)

// route is where an outbound connection goes.
type route struct {
	// tunnel is set when the destination is reached over HBONE.
	tunnel *hbone.Target
	// addr is the plain TCP destination otherwise.
	addr   netip.AddrPort
	labels metrics.Labels
}

// handleOutbound relays one connection captured on 15001.
func (pd *pod) handleOutbound(c *net.TCPConn) {
	src, dst := unmapAddr(c.RemoteAddr()), originalDst(c)
	t, ok := pd.track(c, false, src, dst)
	if !ok {
		return
	}
	defer pd.untrack(t)
	if isProxyPort(dst.Port()) && pd.isOwn(dst.Addr()) {
		pd.log.Debug("outbound connection without original destination", "src", src, "local", dst)
		return
	}
	rt, rerr := pd.routeKnown(src, dst)
	mc := rt.open(pd.p.metrics, src, dst)
	if rerr != nil {
		mc.Close(metrics.Outcome{Err: rerr, ResponseFlags: metrics.FlagConnectFailure})
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), pd.p.cfg.DialTimeout)
	var (
		up  net.Conn
		err error
	)
	if rt.tunnel != nil {
		up, err = pd.client.Dial(ctx, *rt.tunnel)
	} else {
		up, err = pd.dial(ctx, "tcp", netip.Addr{}, rt.addr)
	}
	cancel()
	if err != nil {
		mc.Close(metrics.Outcome{Err: err, Reason: refusalReason(err), ResponseFlags: metrics.FlagConnectFailure})
		return
	}
	if rt.tunnel != nil {
		transport, fellBack := tunnelTransport(up)
		pd.p.h3.tunnel(metrics.ReporterSource, transport, fellBack, mc)
	}
	if !t.add(up) {
		mc.Close(metrics.Outcome{Err: t.err()})
		return
	}
	err = relay(c, up, mc, pd.fastPath())
	mc.Close(metrics.Outcome{Err: closeCause(t, err)})
}

// open opens the connection's recorder. As in ztunnel's access log,
// dst.addr is where the proxy connects (the endpoint chosen for a
// Service; over HBONE the peer's port 15008) and dst.hbone_addr the
// CONNECT target; before a route is known, the original destination.
func (rt *route) open(m *metrics.Metrics, src, dst netip.AddrPort) *metrics.Conn {
	switch {
	case rt.tunnel != nil:
		return m.OpenHBONE(rt.labels, src, rt.tunnel.Addr, rt.tunnel.Authority)
	case rt.addr.IsValid():
		return m.Open(rt.labels, src, rt.addr)
	}
	return m.Open(rt.labels, src, dst)
}

// closeCause is the error to report for a relayed connection: why it was
// killed if it was (pod stopped, policy), else the relay's error.
func closeCause(t *tracked, relayErr error) error {
	if cause := t.err(); cause != nil && !errors.Is(cause, net.ErrClosed) {
		return cause
	}
	return relayErr
}

// refusalReason explains a failed HBONE connect for the access log.
func refusalReason(err error) string {
	var se *hbone.StatusError
	switch {
	case errors.As(err, &se):
		return "hbone server refused: " + se.Status
	case strings.Contains(err.Error(), "is not one of the expected"):
		return "server identity mismatch"
	}
	return ""
}

// route decides where a connection from src to dst goes: a mesh workload
// over HBONE to its pod IP:15008 (its identity expected); a service VIP
// to one ready endpoint, over HBONE when the endpoint is a mesh workload;
// anything else as plain TCP to dst. The labels describe the route even
// when it fails.
func (pd *pod) route(src, dst netip.AddrPort) (route, error) {
	store := pd.p.store
	rt := route{addr: dst, labels: pd.sourceLabels(metrics.ReporterSource)}
	target := dst
	if svc, ok := store.ServiceByVIP(dst); ok {
		rt.labels.DestinationService = svc.Hostname()
		rt.labels.DestinationServiceNamespace = svc.Namespace
		rt.labels.DestinationServiceName = svc.Name
		// The client as the store knows it (with its node, from the
		// Kubernetes layer), for internalTrafficPolicy: Local.
		src, _ := store.WorkloadByUID(pd.uid)
		ep, ok := store.PickEndpointFrom(svc, dst.Port(), src)
		if !ok {
			return rt, fmt.Errorf("service %s has no ready endpoint for port %d", svc.Key(), dst.Port())
		}
		target = ep
		rt.addr = ep
	}
	w, ok := store.WorkloadByIP(target.Addr())
	if !ok {
		return rt, nil // passthrough
	}
	destinationLabels(&rt.labels, w, pd.p.trustDomain())
	if !w.HBONE() {
		return rt, nil
	}
	want, err := identity.Parse(w.Identity(pd.p.trustDomain()))
	if err != nil {
		return rt, fmt.Errorf("identity of %s: %w", w.Key(), err)
	}
	rt.labels.ConnectionSecurityPolicy = metrics.SecurityMutualTLS
	// As ztunnel, the source principal is reported only when it is
	// proven to the peer (HBONE), not for plaintext.
	rt.labels.SourcePrincipal = pd.id.String()
	me := pd.merged()
	rt.tunnel = &hbone.Target{
		H3:                 pd.p.h3.wantH3(w),
		Addr:               netip.AddrPortFrom(target.Addr(), meshconst.InboundHBONEPort),
		Authority:          target,
		ExpectedIdentities: []identity.Identity{want},
		SourceAddr:         src,
		ForwardedHost:      rt.labels.DestinationService,
		Baggage:            pd.baggage(me),
	}
	return rt, nil
}

// baggage is what ztunnel sends about the source workload me
// (baggage.rs baggage_header_val from Workload::baggage): its cluster,
// namespace, workload name under its workload type (istiod sets "pod" for
// every pod), canonical service and revision, region and zone.
func (pd *pod) baggage(me *discovery.Workload) hbone.Baggage {
	name := cmp.Or(me.WorkloadName, me.Name)
	svc, rev := metrics.Canonical(me.Labels, name)
	return hbone.Baggage{
		ClusterName:    cmp.Or(pd.p.cfg.ClusterName, metrics.DefaultCluster),
		Namespace:      me.Namespace,
		WorkloadKind:   "pod",
		WorkloadName:   name,
		ServiceName:    svc,
		ServiceVersion: rev,
		Region:         me.Region,
		Zone:           me.Zone,
	}
}

// sourceLabels are the labels with this pod as the source (outbound) or
// the destination (inbound, reporter destination).
func (pd *pod) sourceLabels(reporter string) metrics.Labels {
	me := pd.merged()
	l := metrics.Labels{Reporter: reporter}
	if reporter == metrics.ReporterSource {
		sourceLabels(&l, me)
		l.SourceCluster = pd.p.cfg.ClusterName
		return l
	}
	destinationLabels(&l, me, pd.p.trustDomain())
	l.DestinationPrincipal = pd.id.String()
	l.DestinationCluster = pd.p.cfg.ClusterName
	return l
}

// sourceLabels fills the source workload labels from w as ztunnel's
// CommonTrafficLabels::with_source does: _app and _version are the
// canonical service and revision. The principal is left to the caller.
func sourceLabels(l *metrics.Labels, w *discovery.Workload) {
	l.SourceWorkload, l.SourceWorkloadNamespace = cmp.Or(w.WorkloadName, w.Name), w.Namespace
	l.SourcePod = w.Name
	l.SourceCanonicalService, l.SourceCanonicalRevision = metrics.Canonical(w.Labels, l.SourceWorkload)
	l.SourceApp, l.SourceVersion = l.SourceCanonicalService, l.SourceCanonicalRevision
	l.SourceRegion, l.SourceZone = w.Region, w.Zone
}

// destinationLabels fills the destination workload labels from w
// (ztunnel's with_destination).
func destinationLabels(l *metrics.Labels, w *discovery.Workload, trustDomain string) {
	l.DestinationWorkload, l.DestinationWorkloadNamespace = cmp.Or(w.WorkloadName, w.Name), w.Namespace
	l.DestinationPod = w.Name
	l.DestinationCanonicalService, l.DestinationCanonicalRevision = metrics.Canonical(w.Labels, l.DestinationWorkload)
	l.DestinationApp, l.DestinationVersion = l.DestinationCanonicalService, l.DestinationCanonicalRevision
	l.DestinationRegion, l.DestinationZone = w.Region, w.Zone
	if w.HBONE() {
		l.DestinationPrincipal = w.Identity(trustDomain)
	}
}
