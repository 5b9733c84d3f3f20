package metrics

import (
	"cmp"
	"context"
	"log/slog"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Access-log field names, ztunnel's (src/proxy/metrics.rs
// ConnectionResult), defined once so log queries do not drift. The
// fields after LogDuration are ambpf's additions. docs/ISTIO.md maps
// each field to ztunnel's.
const (
	LogScope        = "scope" // ztunnel's JSON key for the log target
	LogScopeAccess  = "access"
	LogSrcAddr      = "src.addr"
	LogSrcWorkload  = "src.workload" // the pod's name, else its canonical service
	LogSrcNamespace = "src.namespace"
	LogSrcIdentity  = "src.identity" // only with mutual TLS
	LogSrcCluster   = "src.cluster"
	LogDstAddr      = "dst.addr" // the address connected to (pod IP:15008 over HBONE)
	LogDstHBONEAddr = "dst.hbone_addr"
	LogDstService   = "dst.service"
	LogDstWorkload  = "dst.workload"
	LogDstNamespace = "dst.namespace"
	LogDstIdentity  = "dst.identity"
	LogDstCluster   = "dst.cluster"
	LogDirection    = "direction"
	// LogBytesSent and LogBytesReceived are from the reporting workload's
	// side: for outbound what the source sent and received, for inbound
	// what the destination sent and received.
	LogBytesSent     = "bytes_sent"
	LogBytesReceived = "bytes_recv"
	LogDuration      = "duration" // "<n>ms"
	LogError         = "error"    // set on failures, which are logged at ERROR

	LogSecurity      = "security"
	LogOutcome       = "outcome"
	LogReason        = "reason"
	LogResponseFlags = "response_flags"
)

// openedMessage is the Debug line of a connection's start.
const openedMessage = "connection opened"

// accessLogMessage is the message of every access-log line.
const accessLogMessage = "connection complete"

// Conn records one connection. AddSent and AddReceived may be called from
// any goroutine; Close may be called more than once, only the first call
// counts.
type Conn struct {
	m        *Metrics
	labels   Labels
	values   []string
	src, dst netip.AddrPort
	start    time.Time

	sentN, receivedN atomic.Uint64
	sent, received   prometheus.Counter
	closed           atomic.Bool

	hboneAddr netip.AddrPort // the HBONE target (OpenHBONE)

	mu    sync.Mutex
	extra []slog.Attr // added by SetLogAttr, written by Close
}

// SetLogAttr adds a field to the connection's access-log line (for what
// only the caller knows, such as how a tunnel is carried). Setting a key
// again replaces its value.
func (c *Conn) SetLogAttr(key, value string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range c.extra {
		if c.extra[i].Key == key {
			c.extra[i].Value = slog.StringValue(value)
			return
		}
	}
	c.extra = append(c.extra, slog.String(key, value))
}

// Open counts a new connection from src to dst with labels and returns
// its recorder.
func (m *Metrics) Open(labels Labels, src, dst netip.AddrPort) *Conn {
	return m.OpenHBONE(labels, src, dst, netip.AddrPort{})
}

// OpenHBONE is Open for a connection carried over HBONE: dst is the
// address connected to (a peer's port 15008) and target the CONNECT
// target, the access log's dst.hbone_addr. As ztunnel, a "connection
// opened" line is logged at Debug.
func (m *Metrics) OpenHBONE(labels Labels, src, dst, target netip.AddrPort) *Conn {
	values := labels.values()
	c := &Conn{
		m: m, labels: labels, values: values, src: src, dst: dst, hboneAddr: target, start: time.Now(),
		// Resolve the byte counters once: the hot path then is one atomic
		// add on each side, with no label lookup.
		sent:     m.sent.WithLabelValues(values...),
		received: m.received.WithLabelValues(values...),
	}
	m.opened.WithLabelValues(values...).Inc()
	if ctx := context.Background(); m.log.Enabled(ctx, slog.LevelDebug) {
		m.log.LogAttrs(ctx, slog.LevelDebug, openedMessage, c.peerAttrs(make([]slog.Attr, 0, 14), values)...)
	}
	return c
}

// AddSent adds n bytes sent from the server side to the client
// (Istio's "sent during response").
func (c *Conn) AddSent(n int) {
	if n > 0 {
		c.sentN.Add(uint64(n))
		c.sent.Add(float64(n))
	}
}

// AddReceived adds n bytes received from the client toward the server
// (Istio's "received during request").
func (c *Conn) AddReceived(n int) {
	if n > 0 {
		c.receivedN.Add(uint64(n))
		c.received.Add(float64(n))
	}
}

// Sent returns the bytes counted by AddSent so far.
func (c *Conn) Sent() uint64 { return c.sentN.Load() }

// Received returns the bytes counted by AddReceived so far.
func (c *Conn) Received() uint64 { return c.receivedN.Load() }

// Outcome is how a connection ended.
type Outcome struct {
	// Err is why the connection failed; nil for a normal close.
	Err error
	// Reason is a short explanation for the log, such as an
	// authorization decision ("denied by DENY policy ns/name rule 0").
	Reason string
	// ResponseFlags overrides the response_flags label of the closed
	// counter (FlagDenied, FlagConnectFailure); "" keeps Open's value.
	ResponseFlags string
}

// Close counts the connection closed and writes its access-log line:
// at Info for a normal close, at Error (as ztunnel) when o.Err is set or
// the response flags say it failed. Only the first call has an effect.
func (c *Conn) Close(o Outcome) {
	if !c.closed.CompareAndSwap(false, true) {
		return
	}
	values := c.values
	if o.ResponseFlags != "" {
		values = append([]string(nil), c.values...)
		values[flagsIndex] = o.ResponseFlags
	}
	c.m.closed.WithLabelValues(values...).Inc()
	failed := o.Err != nil
	switch values[flagsIndex] {
	case FlagDenied, FlagConnectFailure:
		c.m.failed.WithLabelValues(values...).Inc()
		failed = true
	}
	c.m.log.LogAttrs(context.Background(), c.level(failed), accessLogMessage, c.logAttrs(o, values, failed)...)
}

func (c *Conn) level(failed bool) slog.Level {
	if failed {
		return slog.LevelError
	}
	return slog.LevelInfo
}

// logAttrs are the fields of the access-log line, in ztunnel's order; a
// field ztunnel would leave out (no value) is left out.
func (c *Conn) logAttrs(o Outcome, values []string, failed bool) []slog.Attr {
	l := &c.labels
	attrs := c.peerAttrs(make([]slog.Attr, 0, 24), values)
	add := func(k, v string) {
		if v != "" {
			attrs = append(attrs, slog.String(k, v))
		}
	}
	// The counters are the server's view (sent: toward the client); the
	// log unflips them for the source reporter, as ztunnel does
	// (istio/istio#32399).
	sent, recv := c.sentN.Load(), c.receivedN.Load()
	if l.Reporter == ReporterSource {
		sent, recv = recv, sent
	}
	attrs = append(attrs,
		slog.Uint64(LogBytesSent, sent),
		slog.Uint64(LogBytesReceived, recv),
		slog.String(LogDuration, strconv.FormatInt(time.Since(c.start).Milliseconds(), 10)+"ms"))
	if failed {
		msg := o.Reason
		if o.Err != nil {
			msg = o.Err.Error()
		}
		add(LogError, cmp.Or(msg, values[flagsIndex]))
	}
	outcome := "success"
	if failed {
		outcome = "error"
	}
	attrs = append(attrs, slog.String(LogSecurity, values[securityIndex]), slog.String(LogOutcome, outcome),
		slog.String(LogResponseFlags, values[flagsIndex]))
	add(LogReason, o.Reason)
	c.mu.Lock()
	attrs = append(attrs, c.extra...)
	c.mu.Unlock()
	return attrs
}

// peerAttrs appends the fields that describe both ends, ztunnel's
// src.* and dst.* and direction; empty ones are left out, as ztunnel
// leaves out what it does not know.
func (c *Conn) peerAttrs(attrs []slog.Attr, values []string) []slog.Attr {
	l := &c.labels
	mtls := values[securityIndex] == SecurityMutualTLS
	add := func(k, v string) {
		if v != "" {
			attrs = append(attrs, slog.String(k, v))
		}
	}
	ident := func(id string) string {
		if mtls {
			return id
		}
		return ""
	}
	cluster := func(known bool, c string) string {
		if known {
			return cmp.Or(c, DefaultCluster)
		}
		return ""
	}
	add(LogSrcAddr, addrString(c.src))
	add(LogSrcWorkload, cmp.Or(l.SourcePod, l.SourceCanonicalService))
	add(LogSrcNamespace, l.SourceWorkloadNamespace)
	add(LogSrcIdentity, ident(l.SourcePrincipal))
	add(LogSrcCluster, cluster(l.SourceWorkloadNamespace != "", l.SourceCluster))
	add(LogDstAddr, addrString(c.dst))
	add(LogDstHBONEAddr, addrString(c.hboneAddr))
	add(LogDstService, l.DestinationService)
	add(LogDstWorkload, cmp.Or(l.DestinationPod, l.DestinationCanonicalService))
	add(LogDstNamespace, l.DestinationWorkloadNamespace)
	add(LogDstIdentity, ident(l.DestinationPrincipal))
	add(LogDstCluster, cluster(l.DestinationWorkloadNamespace != "", l.DestinationCluster))
	add(LogDirection, directionOf(l.Reporter))
	return attrs
}

// flagsIndex and securityIndex are the positions of response_flags and
// connection_security_policy in labelNames.
var flagsIndex, securityIndex = labelIndex("response_flags"), labelIndex("connection_security_policy")

func labelIndex(name string) int {
	for i, n := range labelNames {
		if n == name {
			return i
		}
	}
	panic("metrics: " + name + " missing from labelNames")
}

// directionOf names the direction as ztunnel's access log does: the
// destination reporter handles inbound traffic.
func directionOf(reporter string) string {
	switch reporter {
	case ReporterDestination:
		return "inbound"
	case ReporterSource:
		return "outbound"
	}
	return unknown
}

func addrString(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}
