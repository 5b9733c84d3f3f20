//go:build linux

package proxy

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambpf/ambpf/pkg/meshconst"
)

// Defaults of Limits. They bound what one pod can make the node's proxy
// hold: with the defaults a pod costs at most about 2 x 1024 connections
// each way (4 fds for a relayed pair, fewer through a shared HBONE
// tunnel), 64 TLS handshakes each way and 256 DNS queries.
const (
	DefaultMaxConnsPerPod      = 1024
	DefaultConnIdleTimeout     = time.Hour
	DefaultMaxHandshakesPerPod = 64
	DefaultHandshakeTimeout    = 10 * time.Second
	DefaultMaxDNSQueriesPerPod = 256
	DefaultDNSTimeout          = 5 * time.Second
)

// Limits bound the resources one pod can take from the proxy, so that a
// pod that floods it (or loops through it) hurts no other pod. Zero
// values take the defaults; a negative count turns that limit off.
//
// What is over a limit is refused at once, never queued: a TCP
// connection is accepted and reset (one descriptor, never dialled), an
// HBONE handshake is not started (the client side fails the outbound
// connection, the server side resets the TCP connection), a DNS query is
// answered REFUSED. Every refusal is counted per pod in
// RefusedMetricName.
type Limits struct {
	// MaxConnsPerPod caps the pod's concurrent connections in each
	// direction: outbound (its apps' connections through 15001) and,
	// separately, inbound (plaintext on 15006 plus HBONE connections on
	// 15008). DefaultMaxConnsPerPod when zero.
	MaxConnsPerPod int
	// ConnIdleTimeout closes a relayed connection (15001, 15006) that
	// moved no data either way for that long, measured by the kernel
	// (TCP_INFO) so that spliced copies need no per-read bookkeeping.
	// DefaultConnIdleTimeout when zero; negative: never.
	ConnIdleTimeout time.Duration
	// MaxHandshakesPerPod caps the pod's HBONE TLS handshakes in flight,
	// as client (its outbound tunnels) and, separately, as server.
	// DefaultMaxHandshakesPerPod when zero.
	MaxHandshakesPerPod int
	// HandshakeTimeout bounds one HBONE TLS handshake, client and server
	// side. DefaultHandshakeTimeout when zero.
	HandshakeTimeout time.Duration
	// MaxDNSQueriesPerPod caps the pod's DNS queries in flight (UDP and
	// TCP together) and its open DNS TCP connections.
	// DefaultMaxDNSQueriesPerPod when zero.
	MaxDNSQueriesPerPod int
	// DNSTimeout bounds one upstream DNS exchange and how long a DNS TCP
	// connection may stay idle. DefaultDNSTimeout when zero.
	DNSTimeout time.Duration
	// AllowLinkLocal are link-local destinations that outbound
	// connections may still reach as plain TCP (a cloud metadata server
	// such as 169.254.169.254/32). Every other link-local destination is
	// refused.
	AllowLinkLocal []netip.Prefix
}

func (l Limits) withDefaults() Limits {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&l.MaxConnsPerPod, DefaultMaxConnsPerPod)
	def(&l.MaxHandshakesPerPod, DefaultMaxHandshakesPerPod)
	def(&l.MaxDNSQueriesPerPod, DefaultMaxDNSQueriesPerPod)
	if l.ConnIdleTimeout == 0 {
		l.ConnIdleTimeout = DefaultConnIdleTimeout
	}
	if l.HandshakeTimeout <= 0 {
		l.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if l.DNSTimeout <= 0 {
		l.DNSTimeout = DefaultDNSTimeout
	}
	return l
}

// Listener names, the listener label of the limit metrics.
const (
	listenerOutbound = "outbound" // 15001
	listenerInbound  = "inbound"  // 15006
	listenerHBONE    = "hbone"    // 15008
	listenerDNS      = "dns"      // 15053
)

// Refusal reasons, the reason label of RefusedMetricName.
const (
	reasonLoop           = "loop"            // the destination would make the proxy dial itself
	reasonConnLimit      = "conn_limit"      // MaxConnsPerPod
	reasonHandshakeLimit = "handshake_limit" // MaxHandshakesPerPod
	reasonDNSLimit       = "dns_limit"       // MaxDNSQueriesPerPod
)

// slots is a counting limit: take succeeds while fewer than max are
// held. A nil or unlimited slots always succeeds.
type slots struct {
	max  int64 // <= 0: no limit
	held atomic.Int64
}

func newSlots(max int) *slots { return &slots{max: int64(max)} }

// take holds one slot; false (nothing held) when all are taken.
func (s *slots) take() bool {
	if s.max <= 0 {
		s.held.Add(1)
		return true
	}
	if s.held.Add(1) > s.max {
		s.held.Add(-1)
		return false
	}
	return true
}

func (s *slots) put() { s.held.Add(-1) }

// podLimits is one pod's share of Limits: its slots and its idle sweeper.
type podLimits struct {
	out, in       *slots // connections
	hsOut, hsIn   *slots // TLS handshakes
	stop          chan struct{}
	stopOnce      sync.Once
	loopLogged    rateLimit
	limitLogged   rateLimit
	idleCheckTick time.Duration
}

func newPodLimits(l Limits) *podLimits {
	return &podLimits{
		out: newSlots(l.MaxConnsPerPod), in: newSlots(l.MaxConnsPerPod),
		hsOut: newSlots(l.MaxHandshakesPerPod), hsIn: newSlots(l.MaxHandshakesPerPod),
		stop:          make(chan struct{}),
		idleCheckTick: min(max(l.ConnIdleTimeout/4, 10*time.Millisecond), 30*time.Second),
	}
}

func (pl *podLimits) close() { pl.stopOnce.Do(func() { close(pl.stop) }) }

// rateLimit lets one event through per interval and counts the others,
// for logs a flood would otherwise turn into a flood of lines.
type rateLimit struct {
	mu         sync.Mutex
	next       time.Time
	suppressed int
}

const logInterval = 10 * time.Second

// allow reports whether to log now, and how many events were dropped
// since the last line.
func (r *rateLimit) allow() (bool, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if now.Before(r.next) {
		r.suppressed++
		return false, 0
	}
	n := r.suppressed
	r.suppressed, r.next = 0, now.Add(logInterval)
	return true, n
}

// refuse ends an accepted connection with a reset: no FIN handshake, no
// TIME_WAIT, the descriptor is released at once.
func refuse(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}

// loopReason says why a connection to dst must not be relayed, "" when
// it may. An outbound connection (15001) is refused when dst is this
// pod's own address (capture never produces that: it goes over lo),
// loopback, unspecified, or link-local (unless allowed); any of those
// reached the listener directly and relaying it would dial the proxy
// again. An inbound connection (15006) is refused unless dst is the pod's
// own address on a port that is not one of the proxy's.
func (pd *pod) loopReason(dst netip.AddrPort, outbound bool) string {
	a := dst.Addr().Unmap()
	switch {
	case !a.IsValid(), a.IsUnspecified():
		return "unspecified destination"
	case a.IsLoopback():
		return "loopback destination"
	case pd.isOwn(a):
		if outbound {
			return "destination is the pod itself"
		}
		if isProxyPort(dst.Port()) {
			return "destination is a proxy port"
		}
		return ""
	case !outbound:
		return "destination is not the pod"
	case a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast():
		for _, p := range pd.p.cfg.Limits.AllowLinkLocal {
			if p.Contains(a) {
				return ""
			}
		}
		return "link-local destination"
	case a.IsMulticast():
		return "multicast destination"
	}
	return ""
}

// errUpstreamLoop refuses an HBONE tunnel to one of the proxy's ports.
var errUpstreamLoop = errors.New("tunnel destination is a proxy port")

// upstreamLoop is loopReason for the HBONE server's upstream dial: the
// destination was checked against the pod's IPs by the server; a proxy
// port there would connect the tunnel to the proxy itself.
func upstreamLoop(dst netip.AddrPort) bool {
	return isProxyPort(dst.Port()) || dst.Port() == meshconst.DNSPort
}
