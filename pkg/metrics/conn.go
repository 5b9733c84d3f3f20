package metrics

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Access-log field names, defined once so log queries do not drift.
const (
	LogSrcAddr       = "src.addr"
	LogSrcWorkload   = "src.workload"
	LogSrcNamespace  = "src.namespace"
	LogSrcIdentity   = "src.identity"
	LogDstAddr       = "dst.addr"
	LogDstService    = "dst.service"
	LogDstWorkload   = "dst.workload"
	LogDstNamespace  = "dst.namespace"
	LogDstIdentity   = "dst.identity"
	LogDirection     = "direction"
	LogSecurity      = "security"
	LogBytesSent     = "bytes_sent"
	LogBytesReceived = "bytes_recv"
	LogDuration      = "duration"
	LogOutcome       = "outcome"
	LogReason        = "reason"
	LogError         = "error"
	LogResponseFlags = "response_flags"
)

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
	values := labels.values()
	c := &Conn{
		m: m, labels: labels, values: values, src: src, dst: dst, start: time.Now(),
		// Resolve the byte counters once: the hot path then is one atomic
		// add on each side, with no label lookup.
		sent:     m.sent.WithLabelValues(values...),
		received: m.received.WithLabelValues(values...),
	}
	m.opened.WithLabelValues(values...).Inc()
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

// Close counts the connection closed and writes its access-log line: at
// Info for a normal close, at Warn when o.Err is set. Only the first call
// has an effect.
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
	switch values[flagsIndex] {
	case FlagDenied, FlagConnectFailure:
		c.m.failed.WithLabelValues(values...).Inc()
	}

	l := &c.labels
	level, outcome := slog.LevelInfo, "success"
	if o.Err != nil {
		level, outcome = slog.LevelWarn, "error"
	}
	attrs := []slog.Attr{
		slog.String(LogSrcAddr, addrString(c.src)),
		slog.String(LogSrcWorkload, l.SourceWorkload),
		slog.String(LogSrcNamespace, l.SourceWorkloadNamespace),
		slog.String(LogSrcIdentity, l.SourcePrincipal),
		slog.String(LogDstAddr, addrString(c.dst)),
		slog.String(LogDstService, l.DestinationService),
		slog.String(LogDstWorkload, l.DestinationWorkload),
		slog.String(LogDstNamespace, l.DestinationWorkloadNamespace),
		slog.String(LogDstIdentity, l.DestinationPrincipal),
		slog.String(LogDirection, directionOf(l.Reporter)),
		slog.String(LogSecurity, values[len(values)-1]),
		slog.Uint64(LogBytesSent, c.sentN.Load()),
		slog.Uint64(LogBytesReceived, c.receivedN.Load()),
		slog.Duration(LogDuration, time.Since(c.start)),
		slog.String(LogOutcome, outcome),
		slog.String(LogResponseFlags, values[flagsIndex]),
	}
	if o.Reason != "" {
		attrs = append(attrs, slog.String(LogReason, o.Reason))
	}
	if o.Err != nil {
		attrs = append(attrs, slog.String(LogError, o.Err.Error()))
	}
	c.mu.Lock()
	attrs = append(attrs, c.extra...)
	c.mu.Unlock()
	c.m.log.LogAttrs(context.Background(), level, accessLogMessage, attrs...)
}

// flagsIndex is the position of response_flags in labelNames.
var flagsIndex = func() int {
	for i, n := range labelNames {
		if n == "response_flags" {
			return i
		}
	}
	panic("metrics: response_flags missing from labelNames")
}()

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
