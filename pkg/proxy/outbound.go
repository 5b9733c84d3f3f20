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
	mc := pd.p.metrics.Open(rt.labels, src, dst)
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
	err = relay(c, up, mc, pd.p.cfg.FastPath)
	mc.Close(metrics.Outcome{Err: closeCause(t, err)})
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
	me := pd.merged()
	rt.tunnel = &hbone.Target{
		H3:                 pd.p.h3.wantH3(w),
		Addr:               netip.AddrPortFrom(target.Addr(), meshconst.InboundHBONEPort),
		Authority:          target,
		ExpectedIdentities: []identity.Identity{want},
		SourceAddr:         src,
		Baggage: hbone.Baggage{
			ClusterName:    pd.p.cfg.ClusterName,
			Namespace:      me.Namespace,
			WorkloadKind:   "pod",
			WorkloadName:   me.Name,
			ServiceName:    me.Labels["app"],
			ServiceVersion: me.Labels["version"],
		},
	}
	return rt, nil
}

// sourceLabels are the labels with this pod as the source (outbound) or
// the destination (inbound, reporter destination).
func (pd *pod) sourceLabels(reporter string) metrics.Labels {
	me := pd.merged()
	l := metrics.Labels{Reporter: reporter}
	if reporter == metrics.ReporterSource {
		l.SourceWorkload, l.SourceWorkloadNamespace = cmp.Or(me.WorkloadName, me.Name), me.Namespace
		l.SourcePrincipal = pd.id.String()
		l.SourceApp, l.SourceVersion = me.Labels["app"], me.Labels["version"]
		l.SourceCanonicalService, l.SourceCanonicalRevision = metrics.Canonical(me.Labels, l.SourceWorkload)
		l.SourceCluster = pd.p.cfg.ClusterName
		return l
	}
	destinationLabels(&l, me, pd.p.trustDomain())
	l.DestinationPrincipal = pd.id.String()
	l.DestinationCluster = pd.p.cfg.ClusterName
	return l
}

// destinationLabels fills the destination workload labels from w.
func destinationLabels(l *metrics.Labels, w *discovery.Workload, trustDomain string) {
	l.DestinationWorkload, l.DestinationWorkloadNamespace = cmp.Or(w.WorkloadName, w.Name), w.Namespace
	l.DestinationApp, l.DestinationVersion = w.Labels["app"], w.Labels["version"]
	l.DestinationCanonicalService, l.DestinationCanonicalRevision = metrics.Canonical(w.Labels, l.DestinationWorkload)
	if w.HBONE() {
		l.DestinationPrincipal = w.Identity(trustDomain)
	}
}
