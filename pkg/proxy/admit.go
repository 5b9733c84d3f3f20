//go:build linux

package proxy

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/prometheus/client_golang/prometheus"
)

// Names of the limit metrics (per pod: labels namespace and pod).
const (
	// RefusedMetricName counts connections and queries refused before
	// any work was done for them, by listener and reason (loop,
	// conn_limit, handshake_limit, dns_limit).
	RefusedMetricName = "ambpf_proxy_refused_total"
	// IdleClosedMetricName counts relayed connections closed by
	// Limits.ConnIdleTimeout, by listener.
	IdleClosedMetricName = "ambpf_proxy_idle_closed_total"
	// PodConnectionsMetricName is the number of connections a pod holds
	// now, by listener (outbound, inbound, hbone): what MaxConnsPerPod
	// caps.
	PodConnectionsMetricName = "ambpf_proxy_pod_connections"
)

// limitMetrics are the proxy-wide collectors of the per-pod limits.
type limitMetrics struct {
	refused *prometheus.CounterVec
	idle    *prometheus.CounterVec
	conns   *prometheus.GaugeVec
}

func newLimitMetrics(reg prometheus.Registerer) *limitMetrics {
	m := &limitMetrics{
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: RefusedMetricName,
			Help: "Connections and DNS queries refused before any work was done for them (proxy loops, per-pod limits), by pod, listener and reason.",
		}, []string{"namespace", "pod", "listener", "reason"}),
		idle: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: IdleClosedMetricName,
			Help: "Relayed connections closed after the idle timeout, by pod and listener.",
		}, []string{"namespace", "pod", "listener"}),
		conns: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: PodConnectionsMetricName,
			Help: "Connections a pod holds in the proxy now, by listener; capped by the per-pod connection limit.",
		}, []string{"namespace", "pod", "listener"}),
	}
	reg.MustRegister(m.refused, m.idle, m.conns)
	return m
}

// forget drops a stopped pod's series, so that pods coming and going do
// not grow the exposition forever.
func (m *limitMetrics) forget(namespace, name string) {
	l := prometheus.Labels{"namespace": namespace, "pod": name}
	m.refused.DeletePartialMatch(l)
	m.idle.DeletePartialMatch(l)
	m.conns.DeletePartialMatch(l)
}

// countRefused counts one refusal and logs it, at most once per
// logInterval per pod and kind, with how many were not logged.
func (pd *pod) countRefused(listener, reason, why string, src, dst netip.AddrPort) {
	pd.p.limits.refused.WithLabelValues(pd.info.Namespace, pd.info.Name, listener, reason).Inc()
	rl := &pd.lim.limitLogged
	if reason == reasonLoop {
		rl = &pd.lim.loopLogged
	}
	if ok, dropped := rl.allow(); ok {
		pd.log.Warn("connection refused", "listener", listener, "reason", reason, "why", why,
			"src", src, "dst", dst, "refused_since_last_line", dropped)
	}
}

// admit decides a connection accepted on listener before a goroutine or
// a dial exists for it: a destination that would loop into the proxy, or
// a pod over its connection limit, gets the connection reset. Otherwise
// it returns the release to call when the connection ends.
func (pd *pod) admit(listener string, c *net.TCPConn) (release func(), ok bool) {
	// A flood is refused here, so this path stays short: one
	// SO_ORIGINAL_DST lookup, no allocation but the refusal's counter.
	outbound := listener == listenerOutbound
	var (
		why string
		dst netip.AddrPort
	)
	if listener == listenerHBONE {
		// HBONE is addressed to the pod: its own address on 15008 (the
		// proxy's own hairpin tunnels come that way too). Anything else
		// reached the listener directly.
		if dst = unmapAddr(c.LocalAddr()); !pd.isOwn(dst.Addr()) {
			why = "destination is not the pod"
		}
	} else {
		dst = originalDst(c)
		why = pd.loopReason(dst, outbound)
	}
	if why != "" {
		refuse(c)
		pd.countRefused(listener, reasonLoop, why, unmapAddr(c.RemoteAddr()), dst)
		return nil, false
	}
	s := pd.lim.in
	if outbound {
		s = pd.lim.out
	}
	if !s.take() {
		refuse(c)
		pd.countRefused(listener, reasonConnLimit, "too many connections", unmapAddr(c.RemoteAddr()), dst)
		return nil, false
	}
	g := pd.p.limits.conns.WithLabelValues(pd.info.Namespace, pd.info.Name, listener)
	g.Inc()
	var once sync.Once
	return func() { once.Do(func() { s.put(); g.Dec() }) }, true
}

// handshakeGate returns the HBONE handshake gate of one side: it admits
// a handshake while the pod has fewer than MaxHandshakesPerPod in
// flight on that side.
func (pd *pod) handshakeGate(s *slots, listener string) func() (func(), bool) {
	return func() (func(), bool) {
		if !s.take() {
			pd.countRefused(listener, reasonHandshakeLimit, "too many TLS handshakes in flight", netip.AddrPort{}, netip.AddrPort{})
			return nil, false
		}
		var once sync.Once
		return func() { once.Do(s.put) }, true
	}
}

// limitListener is the HBONE listener with admission: what admit
// refuses is reset here, and the HBONE server only sees the rest.
type limitListener struct {
	*net.TCPListener
	pd *pod
}

func (l limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.AcceptTCP()
		if err != nil {
			return nil, err
		}
		if release, ok := l.pd.admit(listenerHBONE, c); ok {
			return &admittedConn{TCPConn: c, release: release}, nil
		}
	}
}

// admittedConn gives its slot back when it is closed.
type admittedConn struct {
	*net.TCPConn
	release func()
}

func (c *admittedConn) Close() error {
	c.release()
	return c.TCPConn.Close()
}

// errIdle is why a connection closed by the idle timeout ended.
var errIdle = errors.New("closed after the idle timeout")

// sweepIdle closes, every tick until the pod stops, the pod's relayed
// connections that moved no data for the idle timeout.
func (pd *pod) sweepIdle() {
	timeout := pd.p.cfg.Limits.ConnIdleTimeout
	if timeout < 0 {
		return
	}
	tick := time.NewTicker(pd.lim.idleCheckTick)
	defer tick.Stop()
	for {
		select {
		case <-pd.lim.stop:
			return
		case <-tick.C:
		}
		pd.mu.Lock()
		conns := make([]*tracked, 0, len(pd.conns))
		for t := range pd.conns {
			conns = append(conns, t)
		}
		pd.mu.Unlock()
		for _, t := range conns {
			c := t.client()
			if c == nil {
				continue
			}
			if idle, err := tcpIdle(c); err == nil && idle >= timeout {
				listener := listenerOutbound
				if t.inbound {
					listener = listenerInbound
				}
				pd.p.limits.idle.WithLabelValues(pd.info.Namespace, pd.info.Name, listener).Inc()
				pd.log.Debug("closing idle connection", "src", t.src, "dst", t.dst, "idle", idle)
				t.kill(errIdle)
			}
		}
	}
}

// client is the connection t was accepted as (the app's side), nil once
// t was killed.
func (t *tracked) client() *net.TCPConn {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cause != nil || len(t.closers) == 0 {
		return nil
	}
	c, _ := t.closers[0].(*net.TCPConn)
	return c
}

// tcpIdle is how long c has neither sent nor received data, as the
// kernel keeps it (TCP_INFO), so that it works under splice as well.
func tcpIdle(c *net.TCPConn) (time.Duration, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		info *unix.TCPInfo
		gerr error
	)
	if err := rc.Control(func(fd uintptr) {
		info, gerr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); err != nil {
		return 0, err
	}
	if gerr != nil {
		return 0, gerr
	}
	ms := min(info.Last_data_sent, info.Last_data_recv)
	return time.Duration(ms) * time.Millisecond, nil
}
