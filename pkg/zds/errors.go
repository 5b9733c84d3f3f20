package zds

import (
	"errors"
	"fmt"
	"unicode/utf8"
)

// NackError is a request the peer answered with a non-empty Ack.error. It
// is what the server's Add and Del return when the proxy refused, as
// opposed to a transport error (the request may not have arrived).
type NackError struct {
	Op     string // "add", "del", "keep" or "snapshot_sent"
	UID    string // empty for snapshot_sent
	Reason string // the proxy's Ack.error
}

func (e *NackError) Error() string {
	if e.UID == "" {
		return fmt.Sprintf("zds %s nacked: %s", e.Op, e.Reason)
	}
	return fmt.Sprintf("zds %s %s nacked: %s", e.Op, e.UID, e.Reason)
}

// ProtocolError is a request the protocol forbids at this point (Keep or
// a second SnapshotSent after the snapshot, Add without workload_info).
// The client nacks it, disconnects and Run returns it: the in-pod manager
// stops, and the pods already running are left alone.
type ProtocolError struct {
	Reason string
}

func (e *ProtocolError) Error() string { return "zds protocol error: " + e.Reason }

var (
	// ErrNoConnection is returned by Server.Add when no proxy is connected.
	ErrNoConnection = errors.New("no proxy connected")
	// ErrConnClosed is returned for a request whose connection closed
	// before it was acked.
	ErrConnClosed = errors.New("proxy connection closed")
	// ErrTooLarge is returned when sending a message of more than
	// MaxMessageSize bytes.
	ErrTooLarge = errors.New("message too large")
	// ErrTruncated is returned when a received datagram or its control
	// data did not fit (MSG_TRUNC / MSG_CTRUNC). The message is lost; the
	// connection stays usable because datagram boundaries are kept.
	ErrTruncated = errors.New("message truncated")
)

func opName(p RequestPayload) string {
	switch p.(type) {
	case *AddWorkload:
		return "add"
	case *DelWorkload:
		return "del"
	case *KeepWorkload:
		return "keep"
	case *SnapshotSent:
		return "snapshot_sent"
	}
	return "unknown"
}

func payloadUID(p RequestPayload) string {
	switch p := p.(type) {
	case *AddWorkload:
		return p.UID
	case *DelWorkload:
		return p.UID
	case *KeepWorkload:
		return p.UID
	}
	return ""
}

// MaxNackText bounds the error text of a nack, in bytes: istio-cni reads
// an answer into a 1024-byte buffer (cni/pkg/nodeagent/ztunnelserver_linux.go),
// so a longer ack would arrive truncated and unparsable. With the
// message's framing (a few bytes) the ack stays under 1 KiB.
const MaxNackText = 1000

// boundNack cuts reason to MaxNackText bytes at a UTF-8 boundary, marking
// the cut; the full text is in the proxy's log.
func boundNack(reason string) string {
	if len(reason) <= MaxNackText {
		return reason
	}
	const mark = " [truncated]"
	cut := MaxNackText - len(mark)
	for cut > 0 && !utf8.RuneStart(reason[cut]) {
		cut--
	}
	return reason[:cut] + mark
}
