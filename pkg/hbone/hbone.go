// Package hbone implements HBONE, Istio ambient mode's tunnel: an HTTP/2
// CONNECT stream per proxied TCP connection, inside mutual TLS between
// workload (SPIFFE) identities, on port 15008 of the destination pod. It is
// wire compatible with ztunnel in both directions.
//
// Server accepts tunnels on a listener the caller made (inside the pod's
// network namespace) and connects each to the application through a dialer
// the caller supplies. Client opens tunnels over pooled HTTP/2 connections
// and returns them as net.Conn.
//
// Beyond Istio, both ends also speak HBONE over HTTP/3 (QUIC, quic-go) on
// UDP 15008, an opt-in transport: Server.ServeH3 serves it on a UDP socket
// the caller made, and a Target with H3 set is tried over HTTP/3 first,
// falling back to HTTP/2 when the peer does not answer on UDP within
// ClientConfig.H3HandshakeTimeout. Certificates, identity checks,
// authority, headers and status codes are the same on both transports.
package hbone

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"net/netip"
	"time"

	"github.com/ambpf/ambpf/pkg/identity"
)

// Port is the HBONE port of every ambient pod.
const Port = 15008

// Ports of the in-pod proxy that a tunnel must never target: reaching them
// through HBONE would loop traffic back into the proxy.
const (
	OutboundPort         = 15001
	InboundPlaintextPort = 15006
	InboundHBONEPort     = Port
)

// Transports, as Request.Transport and Conn.Transport name them.
const (
	TransportH2 = "h2" // HTTP/2 over TLS over TCP, Istio's HBONE
	TransportH3 = "h3" // HTTP/3 over QUIC over UDP
)

// H3Protocol is the :protocol of the extended CONNECT (RFC 9220) a Client
// sends over HTTP/3. Unlike the connect-tcp draft's templated path, the
// target stays in :authority, exactly as in HBONE over HTTP/2; the server
// also accepts a classic CONNECT (RFC 9114 section 4.4).
const H3Protocol = "connect-tcp"

// Defaults, Istio's where Istio has one.
const (
	defaultDialTimeout    = 10 * time.Second
	defaultHandshake      = 10 * time.Second
	defaultIdleTimeout    = 5 * time.Minute
	defaultPingInterval   = 10 * time.Second
	defaultPingTimeout    = 20 * time.Second
	defaultStreamsPerConn = 100
	// A QUIC handshake to a peer that serves HTTP/3 completes in one round
	// trip; a second without an answer means nothing listens on UDP.
	defaultH3Handshake  = time.Second
	defaultH3RetryAfter = time.Minute
)

// Credentials supply the local workload's certificate; *identity.Source is
// one. The callbacks are consulted on every handshake, so a rotated
// certificate is used from the next connection on.
type Credentials interface {
	Identity() identity.Identity
	GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error)
	GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error)
}

// HTTP2Settings are the flow-control and frame settings both ends
// advertise. Zero fields take Istio's defaults.
type HTTP2Settings struct {
	StreamWindow int32  // initial stream receive window; default 4 MiB
	ConnWindow   int32  // connection receive window; default 16 MiB
	MaxFrameSize uint32 // largest frame accepted; default 1 MiB
}

func (s HTTP2Settings) withDefaults() HTTP2Settings {
	if s.StreamWindow == 0 {
		s.StreamWindow = 4 << 20
	}
	if s.ConnWindow == 0 {
		s.ConnWindow = 16 << 20
	}
	if s.MaxFrameSize == 0 {
		s.MaxFrameSize = 1 << 20
	}
	return s
}

// StatusError is returned by Client.Dial when the server answers the
// CONNECT with a status other than 200.
type StatusError struct {
	Code   int
	Status string // the full status line text, e.g. "401 Unauthorized"
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("hbone server answered %s", e.Status)
}

// Peer describes the remote end of an HBONE connection as its TLS handshake
// proved it.
type Peer struct {
	Identity identity.Identity
	Addr     netip.AddrPort // TCP (HTTP/2) or UDP (HTTP/3) address of the connection
}

type peerKey struct{}

// PeerFromContext returns the peer of the HBONE connection a request
// arrived on. Contexts of requests served by Server carry it.
func PeerFromContext(ctx context.Context) (Peer, bool) {
	p, ok := ctx.Value(peerKey{}).(Peer)
	return p, ok
}

// statusText is the status as HTTP/2 carries it, for StatusError.
func statusText(code int) string {
	return fmt.Sprintf("%d %s", code, http.StatusText(code))
}
