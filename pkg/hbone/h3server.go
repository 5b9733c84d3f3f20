package hbone

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// h3Cancelled is the stream error a tunnel is reset with: HTTP/3's
// H3_REQUEST_CANCELLED, the counterpart of the RST_STREAM CANCEL an
// HTTP/2 tunnel ends with.
const h3Cancelled = quic.StreamErrorCode(http3.ErrCodeRequestCanceled)

// ServeH3 serves HBONE over HTTP/3 on pc, a UDP socket the caller made
// (inside the pod's network namespace, with the proxy mark), until Close
// (then it returns nil) or a fatal socket error. It closes pc when it
// returns. The TLS configuration, checks, status codes, hooks and
// Request.ID sequence are those of Serve; Request.Transport is
// TransportH3. Requests may be an extended CONNECT with :protocol
// H3Protocol or a classic CONNECT; the target is :authority either way.
//
// Unlike HTTP/2, a tunnel half-closes in both directions: the upstream's
// EOF ends the stream's sending side (FIN) and the tunnel lives on until
// the client ends its side too.
func (s *Server) ServeH3(pc net.PacketConn) error {
	defer pc.Close()
	tlsConf, err := serverTLS(s.cfg.TLS, ALPNH3)
	if err != nil {
		return fmt.Errorf("hbone h3 on %s: %w", pc.LocalAddr(), err)
	}
	tr := &quic.Transport{Conn: pc}
	defer tr.Close()
	ln, err := tr.Listen(tlsConf, s.quicConfig())
	if err != nil {
		return fmt.Errorf("hbone h3 listen on %s: %w", pc.LocalAddr(), err)
	}
	defer ln.Close()
	srv := &http3.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			s.serve(w, r, TransportH3, s.relayH3)
		}),
		// The handshake is complete when a connection is accepted: the
		// peer's certificate was verified by ServerTLS's checks.
		ConnContext: func(ctx context.Context, c *quic.Conn) context.Context {
			cs := c.ConnectionState().TLS
			return context.WithValue(ctx, peerKey{}, Peer{Identity: peerIdentity(cs), Addr: addrPortOf(c.RemoteAddr())})
		},
		Logger: s.log,
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.h3[srv] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.h3, srv)
		s.mu.Unlock()
	}()
	err = srv.ServeListener(ln)
	if s.isClosed() || errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("hbone h3 on %s: %w", pc.LocalAddr(), err)
}

// quicConfig maps the HTTP/2 settings onto QUIC: the same receive
// windows and stream limit, keep-alive PINGs every PingInterval, and a
// connection that heard nothing for PingInterval+PingTimeout is dead.
func (s *Server) quicConfig() *quic.Config {
	set := s.cfg.HTTP2.withDefaults()
	return &quic.Config{
		HandshakeIdleTimeout:       s.cfg.HandshakeTimeout,
		MaxIdleTimeout:             s.cfg.PingInterval + s.cfg.PingTimeout,
		KeepAlivePeriod:            s.cfg.PingInterval,
		MaxIncomingStreams:         defaultStreamsPerConn,
		MaxStreamReceiveWindow:     uint64(set.StreamWindow),
		MaxConnectionReceiveWindow: uint64(set.ConnWindow),
	}
}

// connectProtocolOK reports whether a CONNECT's protocol is one HBONE
// serves on transport: any CONNECT over HTTP/2 (as before HTTP/3
// existed), a classic or a H3Protocol extended CONNECT over HTTP/3.
func connectProtocolOK(transport, proto string) bool {
	if transport != TransportH3 {
		return true
	}
	return proto == H3Protocol || proto == "HTTP/3.0"
}

// relayH3 is relayFunc for HTTP/3: it takes the stream over once the 200
// is sent and copies both ways, forwarding each side's end of data as a
// half-close. An error in either direction, or a kill, resets the stream
// both ways (H3_REQUEST_CANCELLED) and closes the upstream.
func (s *Server) relayH3(w http.ResponseWriter, _ *http.Request, up net.Conn, req Request, out *Outcome) {
	w.WriteHeader(http.StatusOK)
	streamer, ok := w.(http3.HTTPStreamer)
	if !ok {
		up.Close()
		out.Err = errors.New("http3 response writer cannot hand over its stream")
		return
	}
	str, err := streamer.HTTPStream()
	if err != nil {
		up.Close()
		out.Err = fmt.Errorf("take over http3 stream: %w", err)
		return
	}
	// The request context says nothing about a stream taken over; a
	// reset reaches the copies as errors.
	s.relayTunnel(context.Background(), h3Tunnel{str}, up, req, out)
}

// h3Tunnel is an HTTP/3 stream as relayTunnel drives it.
type h3Tunnel struct{ *http3.Stream }

// CloseWrite sends FIN: the client reads EOF, its side stays open.
func (t h3Tunnel) CloseWrite() error { return t.Stream.Close() }

// Reset stops both directions with H3_REQUEST_CANCELLED.
func (t h3Tunnel) Reset(error) {
	t.CancelRead(h3Cancelled)
	t.CancelWrite(h3Cancelled)
}
