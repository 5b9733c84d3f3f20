package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go/http3"

	"github.com/ambpf/ambpf/pkg/copybuf"
	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/writebatch"
)

// Request is one CONNECT as the server understood it; authorization, the
// upstream dialer and observers receive it.
type Request struct {
	// ID is unique per stream within a Server, the same in every hook
	// call about that stream, so callers can pair DialUpstream with Observe.
	ID uint64
	// SrcIdentity is the client's identity, proven by its certificate.
	SrcIdentity identity.Identity
	// SrcAddr is the source policy checks and the application sees: always
	// PeerAddr, as in ztunnel. A Forwarded header is any client's claim
	// (a mesh client can write 127.0.0.1 or another pod's IP there), so it
	// stays informational, in Header, and never becomes the source.
	SrcAddr netip.AddrPort
	// PeerAddr is the address the HBONE connection came from (TCP, or UDP
	// for HTTP/3).
	PeerAddr netip.AddrPort
	// Transport is TransportH2 or TransportH3: how the stream arrived.
	Transport string
	// Dst is the :authority, the original destination in this pod.
	Dst netip.AddrPort
	// Header holds the request headers (baggage, traceparent, ...).
	Header http.Header
}

// Outcome is how a CONNECT ended, reported once per stream to
// ServerConfig.Observe.
type Outcome struct {
	Status   int    // HTTP status sent; 200 for tunnels that were opened
	Reason   string // why the request was refused; empty for 200
	Err      error  // authorization, dial or copy error, if any
	BytesIn  int64  // client -> upstream
	BytesOut int64  // upstream -> client
	Start    time.Time
	Duration time.Duration
}

// ServerConfig configures a Server.
type ServerConfig struct {
	TLS TLSConfig
	// PodIPs are the addresses a CONNECT may target; anything else is 400.
	PodIPs []netip.Addr
	// Authorize, when set, decides whether a request may proceed; an error
	// denies it with 401.
	Authorize func(ctx context.Context, r Request) error
	// DialUpstream connects to r.Dst (typically spoofing r.SrcAddr's IP
	// with IP_TRANSPARENT and mark 0x539). Required. A failure is 503.
	DialUpstream func(ctx context.Context, r Request) (net.Conn, error)
	// Observe, when set, is called once when each stream ends, refused or
	// not, for metrics and access logs. It must not block for long.
	Observe func(Request, Outcome)
	// ResponseBaggage, when set, describes the destination workload in
	// the baggage header of the 200 that opens a tunnel, as ztunnel
	// answers (inbound.rs build_response, ENABLE_RESPONSE_BAGGAGE): a
	// ztunnel client derives its destination labels from it. Refusals
	// carry none.
	ResponseBaggage func(Request) Baggage
	// DialTimeout bounds DialUpstream (default 10 s).
	DialTimeout time.Duration
	// HandshakeTimeout bounds the TLS handshake (default 10 s).
	HandshakeTimeout time.Duration
	// HandshakeGate, when set, admits each TLS handshake; a connection
	// it refuses is reset before the handshake starts.
	HandshakeGate HandshakeGate
	// PingInterval and PingTimeout check idle client connections (defaults
	// 10 s and 20 s).
	PingInterval, PingTimeout time.Duration
	HTTP2                     HTTP2Settings
	Logger                    *slog.Logger
}

// Server accepts HBONE tunnels. It is safe for concurrent use; one Server
// may serve several listeners (for example IPv4 and IPv6).
type Server struct {
	cfg     ServerConfig
	tlsConf *tls.Config
	log     *slog.Logger
	ctx     context.Context
	cancel  context.CancelFunc

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{}
	h2conns   map[*h2conn]struct{} // HTTP/2 connections being served, for Drain
	draining  bool                 // Drain was called: new connections are drained at once
	tunnels   map[*tunnel]struct{}
	h3        map[*http3.Server]struct{} // one per ServeH3 call
	connWG    sync.WaitGroup             // connection goroutines
	streamWG  sync.WaitGroup             // stream handlers
	streamIDs atomic.Uint64              // last Request.ID handed out
}

// tunnel is a live, accepted stream.
type tunnel struct {
	req  Request
	kill func()
}

// NewServer validates cfg and returns a Server that serves nothing until
// Serve is called.
func NewServer(cfg ServerConfig) (*Server, error) {
	tlsConf, err := ServerTLS(cfg.TLS)
	if err != nil {
		return nil, fmt.Errorf("new hbone server: %w", err)
	}
	if cfg.DialUpstream == nil {
		return nil, errors.New("new hbone server: DialUpstream is required")
	}
	if len(cfg.PodIPs) == 0 {
		return nil, errors.New("new hbone server: no pod IPs")
	}
	cfg.PodIPs = slices.Clone(cfg.PodIPs)
	for i, a := range cfg.PodIPs {
		cfg.PodIPs[i] = a.Unmap()
	}
	cfg.DialTimeout = cmp(cfg.DialTimeout, defaultDialTimeout)
	cfg.HandshakeTimeout = cmp(cfg.HandshakeTimeout, defaultHandshake)
	cfg.PingInterval = cmp(cfg.PingInterval, defaultPingInterval)
	cfg.PingTimeout = cmp(cfg.PingTimeout, defaultPingTimeout)
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	log := cfg.Logger.With("component", "hbone-server", "identity", cfg.TLS.Credentials.Identity().String())
	s := &Server{
		cfg:       cfg,
		tlsConf:   tlsConf,
		log:       log,
		listeners: map[net.Listener]struct{}{},
		conns:     map[net.Conn]struct{}{},
		h2conns:   map[*h2conn]struct{}{},
		tunnels:   map[*tunnel]struct{}{},
		h3:        map[*http3.Server]struct{}{},
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// cmp returns v, or def when v is zero.
func cmp[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// Serve accepts connections on ln until Close (then it returns nil) or an
// accept error that is not temporary. It closes ln when it returns.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return net.ErrClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			if isTemporary(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("hbone accept", "err", err, "retry_in", backoff)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("hbone accept on %s: %w", ln.Addr(), err)
		}
		backoff = 0
		if !s.track(c) {
			c.Close()
			return nil
		}
		s.connWG.Go(func() { s.serveConn(c) })
	}
}

// isTemporary reports accept errors worth retrying (out of file
// descriptors, aborted connections).
func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) serveConn(c net.Conn) {
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	peerAddr := addrPortOf(c.RemoteAddr())
	release, ok := s.cfg.HandshakeGate.enter()
	if !ok {
		resetClose(c)
		return
	}
	bc := &writebatch.Conn{Conn: c}
	tc := tls.Server(bc, s.tlsConf)
	hctx, cancel := context.WithTimeout(s.ctx, s.cfg.HandshakeTimeout)
	err := tc.HandshakeContext(hctx)
	cancel()
	release()
	if err != nil {
		s.log.Info("hbone handshake failed", "peer", peerAddr, "err", err)
		lingerClose(c)
		return
	}
	cs := tc.ConnectionState()
	if cs.NegotiatedProtocol != ALPN {
		s.log.Info("hbone connection refused: client did not negotiate ALPN h2", "peer", peerAddr, "alpn", cs.NegotiatedProtocol)
		return
	}
	ctx := context.WithValue(s.ctx, peerKey{}, Peer{Identity: peerIdentity(cs), Addr: peerAddr})
	s.serveH2(ctx, tc, bc)
}

// lingerClose ends a connection whose handshake we refused so that the
// client reads our TLS alert: in TLS 1.3 the client already sends HTTP/2
// data, and closing with that data unread would make the kernel answer
// with a reset that can destroy the alert before the client reads it.
func lingerClose(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	c.SetReadDeadline(time.Now().Add(time.Second))
	io.Copy(io.Discard, io.LimitReader(c, 256<<10))
}

func addrPortOf(a net.Addr) netip.AddrPort {
	var ap netip.AddrPort
	switch a := a.(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	default:
		ap, _ = netip.ParseAddrPort(a.String())
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// serveStream handles one HTTP/2 stream.
func (s *Server) serveStream(w http.ResponseWriter, r *http.Request) {
	s.serve(w, r, TransportH2, s.relayH2)
}

// relayFunc carries an admitted stream's bytes to and from up and fills
// out's byte counts and error; it owns up.
type relayFunc func(w http.ResponseWriter, r *http.Request, up net.Conn, req Request, out *Outcome)

// serve handles one stream of either transport: validate, authorize,
// dial, then relay until the tunnel ends. The checks and status codes
// are the same for HTTP/2 and HTTP/3.
func (s *Server) serve(w http.ResponseWriter, r *http.Request, transport string, relay relayFunc) {
	peer, _ := PeerFromContext(r.Context())
	req := Request{ID: s.streamIDs.Add(1), SrcIdentity: peer.Identity, PeerAddr: peer.Addr, SrcAddr: peer.Addr, Header: r.Header, Transport: transport}
	out := Outcome{Start: time.Now()}
	defer func() {
		out.Duration = time.Since(out.Start)
		if s.cfg.Observe != nil {
			s.cfg.Observe(req, out)
		}
	}()
	refuse := func(status int, reason string, err error) {
		out.Status, out.Reason, out.Err = status, reason, err
		s.log.Info("hbone request refused", "transport", transport, "status", status, "reason", reason, "err", err,
			"src_identity", req.SrcIdentity.String(), "peer", req.PeerAddr, "authority", r.Host, "method", r.Method)
		w.WriteHeader(status)
	}

	if !s.enterStream() {
		refuse(http.StatusServiceUnavailable, "server is closing", nil)
		return
	}
	defer s.streamWG.Done()
	if r.Method != http.MethodConnect || !connectProtocolOK(transport, r.Proto) {
		refuse(http.StatusBadRequest, "method is not CONNECT", nil)
		return
	}
	dst, err := netip.ParseAddrPort(r.Host)
	if err != nil || dst.Addr().Zone() != "" || dst.Port() == 0 {
		refuse(http.StatusBadRequest, "authority is not ip:port", err)
		return
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	req.Dst = dst
	if !slices.Contains(s.cfg.PodIPs, dst.Addr()) {
		refuse(http.StatusBadRequest, "authority IP is not this pod's", nil)
		return
	}
	switch dst.Port() {
	case OutboundPort, InboundPlaintextPort, InboundHBONEPort:
		// 503 as ztunnel answers its illegal ports (SelfCall, from
		// find_inbound_upstream in src/proxy/inbound.rs).
		refuse(http.StatusServiceUnavailable, "target port is a proxy port", nil)
		return
	}
	ctx := r.Context()
	if s.cfg.Authorize != nil {
		if err := s.cfg.Authorize(ctx, req); err != nil {
			refuse(http.StatusUnauthorized, "authorization denied", err)
			return
		}
	}
	dctx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
	up, err := s.cfg.DialUpstream(dctx, req)
	cancel()
	if err != nil {
		refuse(http.StatusServiceUnavailable, "upstream connect failed", err)
		return
	}
	out.Status = http.StatusOK
	if s.cfg.ResponseBaggage != nil {
		if b := s.cfg.ResponseBaggage(req).String(); b != "" {
			w.Header().Set(HeaderBaggage, b)
		}
	}
	relay(w, r, up, req, &out)
}

func (s *Server) enterStream() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.streamWG.Add(1)
	return true
}

// tunnelStream is an accepted stream as relayTunnel drives it, whatever
// the transport.
type tunnelStream interface {
	io.ReadWriter
	// CloseWrite ends the direction toward the client (END_STREAM over
	// HTTP/2, FIN over HTTP/3); the client's direction stays open.
	CloseWrite() error
	// Reset ends both directions with an error (RST_STREAM, or
	// STOP_SENDING plus RESET_STREAM).
	Reset(err error)
}

// relayH2 is relayFunc for HTTP/2: w is the stream itself (h2server.go).
func (s *Server) relayH2(w http.ResponseWriter, _ *http.Request, up net.Conn, req Request, out *Outcome) {
	st, ok := w.(*h2stream)
	if !ok {
		up.Close()
		out.Err = errors.New("http2 response writer is not an hbone stream")
		return
	}
	st.WriteHeader(http.StatusOK)
	s.relayTunnel(st.ctx, st, up, req, out)
}

// relayTunnel copies between an admitted stream and the upstream
// connection, each direction on its own: the client's end of data
// half-closes the upstream (FIN), the upstream's end of data half-closes
// the stream, and the tunnel lasts until both ended. An error in either
// direction, a reset from the client (when the transport cancels ctx for it),
// or a kill resets the stream both ways and closes the upstream.
func (s *Server) relayTunnel(ctx context.Context, str tunnelStream, up net.Conn, req Request, out *Outcome) {
	// cause is the first reason the tunnel failed; nil after a clean end.
	var cause error
	var once sync.Once
	abort := func(err error) {
		once.Do(func() {
			cause = err
			str.Reset(err)
			up.Close()
		})
	}
	t := &tunnel{req: req, kill: func() { abort(errTunnelClosed) }}
	if !s.addTunnel(t) {
		abort(errTunnelClosed)
		out.Err = errTunnelClosed
		return
	}
	defer s.removeTunnel(t)
	stop := context.AfterFunc(ctx, func() { abort(fmt.Errorf("stream ended: %w", context.Cause(ctx))) })
	defer stop()

	var inBytes int64
	inDone := make(chan struct{})
	go func() {
		defer close(inDone)
		n, err := deliver(up, str)
		inBytes = n
		if err != nil {
			abort(fmt.Errorf("client to upstream: %w", err))
			return
		}
		closeWrite(up)
	}()
	n, err := copyBuffered(str, up)
	out.BytesOut = n
	if err != nil {
		abort(fmt.Errorf("upstream to client: %w", err))
	} else if err := str.CloseWrite(); err != nil {
		abort(fmt.Errorf("end stream toward client: %w", err))
	}
	<-inDone
	up.Close()
	out.BytesIn = inBytes
	once.Do(func() {}) // wait for a concurrent kill to set cause
	if cause != nil {
		out.Err = cause
	}
}

var errTunnelClosed = errors.New("tunnel closed by the server")

func (s *Server) addTunnel(t *tunnel) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.tunnels[t] = struct{}{}
	return true
}

func (s *Server) removeTunnel(t *tunnel) {
	s.mu.Lock()
	delete(s.tunnels, t)
	s.mu.Unlock()
}

// CloseMatching resets every live tunnel whose request satisfies match (for
// example after a policy change) and returns how many it reset.
func (s *Server) CloseMatching(match func(Request) bool) int {
	s.mu.Lock()
	var victims []*tunnel
	for t := range s.tunnels {
		if match(t.req) {
			victims = append(victims, t)
		}
	}
	s.mu.Unlock()
	for _, t := range victims {
		t.kill()
	}
	return len(victims)
}

// Tunnels returns the number of live tunnels.
func (s *Server) Tunnels() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.tunnels)
}

// Close stops all listeners, closes every connection and tunnel and waits
// for their goroutines. It is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	var errs []error
	for ln := range s.listeners {
		if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for c := range s.conns {
		c.Close()
	}
	h3 := make([]*http3.Server, 0, len(s.h3))
	for srv := range s.h3 {
		h3 = append(h3, srv)
	}
	var tunnels []*tunnel
	for t := range s.tunnels {
		tunnels = append(tunnels, t)
	}
	s.mu.Unlock()
	for _, t := range tunnels {
		t.kill()
	}
	// Unlocked and after the kills: closing an HTTP/3 server waits for
	// its handlers, which need s.mu to leave. ServeH3 then returns and
	// releases its listener and socket.
	for _, srv := range h3 {
		if err := srv.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	s.cancel()
	s.connWG.Wait()
	s.streamWG.Wait()
	return errors.Join(errs...)
}

// copyBuffered copies src to dst through pooled buffers that grow with
// bulk traffic (pkg/copybuf). Both stream types send what each Write
// gets at once, so nothing is held back. It returns nil at src's EOF.
func copyBuffered(dst io.Writer, src io.Reader) (int64, error) {
	n, _, err := copybuf.Copy(dst, src, nil, false)
	return n, err
}

// deliver copies what the client sends on str to up: through the
// stream's deliverer (h2stream.deliverTo: small messages written to up
// by the read loop itself) when up is a socket, else as copyBuffered.
func deliver(up net.Conn, str tunnelStream) (int64, error) {
	if s, ok := str.(*h2stream); ok {
		if tw := copybuf.Direct(up); tw != nil {
			return s.deliverTo(tw, nil)
		}
	}
	return copyBuffered(up, str)
}

// closeWrite half-closes c when it supports it, else closes it.
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	c.Close()
}
