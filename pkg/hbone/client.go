package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/writebatch"
)

// Target is one tunnel to open.
type Target struct {
	// Addr is the HBONE endpoint, usually the destination pod's IP:15008.
	Addr netip.AddrPort
	// Authority is the original destination ip:port, sent as :authority.
	Authority netip.AddrPort
	// ExpectedIdentities are the identities the server may prove; its
	// certificate must name exactly one of them.
	ExpectedIdentities []identity.Identity
	// SourceAddr is the original client; it goes into the Forwarded header
	// and its IP into the pool key and the dialer.
	SourceAddr netip.AddrPort
	// ForwardedHost, when set, is the Service hostname the client asked
	// for, sent as the Forwarded header's host= (ztunnel's
	// destination_service hint to the server).
	ForwardedHost string
	// Credentials override ClientConfig.TLS.Credentials for this tunnel
	// (a node proxy acting for several workloads).
	Credentials Credentials
	// Baggage describes the source workload; empty fields are not sent.
	Baggage Baggage
	// Header holds extra request headers.
	Header http.Header
	// H3 asks for HBONE over HTTP/3 to Addr (UDP); the tunnel falls back
	// to HTTP/2 when the peer does not answer on UDP (Conn.FellBack).
	H3 bool
}

// DialFunc makes the TCP connection to an HBONE endpoint. src is the IP of
// the original client (Target.SourceAddr), for dialers that bind or spoof
// it; the proxy's dialer also sets its socket mark.
type DialFunc func(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error)

// ClientConfig configures a Client.
type ClientConfig struct {
	TLS TLSConfig
	// Dial makes TCP connections; a plain net.Dialer when nil.
	Dial DialFunc
	// MaxStreamsPerConn caps concurrent tunnels on one pooled connection
	// (default 100); another connection is opened when all are full.
	MaxStreamsPerConn int
	// IdleTimeout closes a pooled connection without tunnels (default 5 min).
	IdleTimeout time.Duration
	// PingInterval and PingTimeout: a connection that received nothing for
	// PingInterval is pinged and closed without an answer within
	// PingTimeout (defaults 10 s and 20 s).
	PingInterval, PingTimeout time.Duration
	// HandshakeTimeout bounds the TLS handshake (default 10 s).
	HandshakeTimeout time.Duration
	// HandshakeGate, when set, admits each new TLS connection before it
	// is dialled; a refusal fails the dial with ErrHandshakeLimit.
	HandshakeGate HandshakeGate
	HTTP2         HTTP2Settings
	// H3PacketConn makes the UDP socket every HTTP/3 connection of the
	// Client shares (QUIC multiplexes them by connection ID). It is
	// called once, at the first HTTP/3 dial; nil means a [::]:0 socket
	// in the calling goroutine's network namespace.
	H3PacketConn func() (net.PacketConn, error)
	// H3HandshakeTimeout bounds the QUIC handshake (and the server's
	// SETTINGS) before falling back to HTTP/2 (default 1 s).
	H3HandshakeTimeout time.Duration
	// H3RetryAfter is how long an endpoint that did not answer over
	// HTTP/3 is reached over HTTP/2 only (default 1 min).
	H3RetryAfter time.Duration
	Logger       *slog.Logger
}

// Client opens HBONE tunnels over pooled mutual-TLS HTTP/2 connections. It
// is safe for concurrent use.
type Client struct {
	cfg ClientConfig
	set HTTP2Settings
	log *slog.Logger

	mu      sync.Mutex
	closed  bool
	pool    map[poolKey][]*pooled
	dialing map[poolKey]*dialCall
	stop    chan struct{}
	done    chan struct{}

	h3 *h3Client // pool and down map guarded by mu
}

// poolKey is what makes two tunnels share a connection: same source and
// destination identities, same source IP, same HBONE endpoint.
type poolKey struct {
	src   string // source identity
	dst   string // expected destination identities, sorted
	srcIP netip.Addr
	addr  netip.AddrPort
	h3    bool // an HTTP/3 connection
}

// pooled is one HTTP/2 connection of the pool (h2client.go).
type pooled struct {
	h2   *h2conn
	peer Peer
	// guarded by Client.mu
	active    int       // tunnels handed out and not yet closed
	idleSince time.Time // when active last dropped to 0
}

// dialCall is a connection being made; other callers for the same key wait
// for it instead of opening their own.
type dialCall struct {
	done chan struct{}
	err  error
}

// wait waits for the dial to end. It returns the dial's error, or nil
// when the caller should look at the pool again: the dial succeeded, or
// it was cancelled by its own caller's context, which says nothing about
// the target.
func (dc *dialCall) wait(ctx context.Context) error {
	select {
	case <-dc.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if dc.err != nil && !errors.Is(dc.err, context.Canceled) && !errors.Is(dc.err, context.DeadlineExceeded) {
		return dc.err
	}
	return nil
}

// NewClient validates cfg and starts the pool's housekeeping; Close stops it.
func NewClient(cfg ClientConfig) (*Client, error) {
	if err := cfg.TLS.check(); err != nil {
		return nil, fmt.Errorf("new hbone client: %w", err)
	}
	if cfg.Dial == nil {
		var d net.Dialer
		cfg.Dial = func(ctx context.Context, _ netip.Addr, dst netip.AddrPort) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", dst.String())
		}
	}
	cfg.MaxStreamsPerConn = cmp(cfg.MaxStreamsPerConn, defaultStreamsPerConn)
	cfg.IdleTimeout = cmp(cfg.IdleTimeout, defaultIdleTimeout)
	cfg.PingInterval = cmp(cfg.PingInterval, defaultPingInterval)
	cfg.PingTimeout = cmp(cfg.PingTimeout, defaultPingTimeout)
	cfg.HandshakeTimeout = cmp(cfg.HandshakeTimeout, defaultHandshake)
	cfg.H3HandshakeTimeout = cmp(cfg.H3HandshakeTimeout, defaultH3Handshake)
	cfg.H3RetryAfter = cmp(cfg.H3RetryAfter, defaultH3RetryAfter)
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	c := &Client{
		cfg:     cfg,
		set:     cfg.HTTP2.withDefaults(),
		log:     cfg.Logger.With("component", "hbone-client"),
		pool:    map[poolKey][]*pooled{},
		dialing: map[poolKey]*dialCall{},
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
		h3:      newH3Client(),
	}
	go c.janitor()
	return c, nil
}

// Dial opens a tunnel to t.Authority through t.Addr. It returns once the
// server answered 200, that is once the server reached the application;
// any other answer is a *StatusError. ctx bounds connecting and waiting
// for the answer, not the tunnel's life. The net.Conn is a *Conn (for
// CloseWrite, Peer and Transport); the caller must Close it.
//
// With t.H3 the tunnel is tried over HTTP/3 first. Only a peer that does
// not answer on UDP (no QUIC handshake within H3HandshakeTimeout) makes
// it fall back to HTTP/2, and the endpoint is then dialled over HTTP/2
// only for H3RetryAfter; a refusal (status, identity, TLS) is returned as
// it is, never retried over the other transport.
func (c *Client) Dial(ctx context.Context, t Target) (net.Conn, error) {
	conn, err := c.dial(ctx, t)
	if err != nil {
		return nil, fmt.Errorf("hbone connect %s via %s: %w", t.Authority, t.Addr, err)
	}
	return conn, nil
}

func (c *Client) dial(ctx context.Context, t Target) (*Conn, error) {
	if !t.Addr.IsValid() || !t.Authority.IsValid() {
		return nil, errors.New("target address and authority are required")
	}
	if len(t.ExpectedIdentities) == 0 {
		return nil, errors.New("target has no expected server identity")
	}
	creds := t.Credentials
	if creds == nil {
		creds = c.cfg.TLS.Credentials
	}
	ids := make([]string, len(t.ExpectedIdentities))
	for i, id := range t.ExpectedIdentities {
		ids[i] = id.String()
	}
	slices.Sort(ids)
	key := poolKey{src: creds.Identity().String(), dst: strings.Join(ids, " "), srcIP: t.SourceAddr.Addr(), addr: t.Addr}
	fellBack := false
	if t.H3 {
		if c.h3Usable(t.Addr) {
			key.h3 = true
			conn, err := c.dialH3(ctx, key, t, creds)
			if err == nil || !errors.Is(err, errH3NoAnswer) || ctx.Err() != nil {
				return conn, err
			}
			c.h3Unanswered(t.Addr, err)
			key.h3 = false
		}
		fellBack = true
	}
	conn, err := c.dialH2(ctx, key, t, creds)
	if conn != nil {
		conn.fellBack = fellBack
	}
	return conn, err
}

// dialH2 opens a tunnel over a pooled HTTP/2 connection for key.
func (c *Client) dialH2(ctx context.Context, key poolKey, t Target, creds Credentials) (*Conn, error) {
	// Retried, on another connection, only when the server did not
	// process the stream: refused (a GOAWAY, REFUSED_STREAM), or a
	// pooled connection that was found dead on the way; never after
	// the server answered.
	for attempt := 0; ; attempt++ {
		pc, fresh, err := c.get(ctx, key, t, creds)
		if err != nil {
			return nil, err
		}
		conn, err := c.open(ctx, pc, t)
		if err == nil {
			return conn, nil
		}
		if attempt < 2 && ctx.Err() == nil && (errors.Is(err, errRefusedStream) || !fresh && errors.Is(err, errConnEnded)) {
			continue
		}
		return nil, err
	}
}

// open sends the CONNECT on pc, whose slot the caller holds; it frees the
// slot unless it returns a Conn, which frees it on Close.
func (c *Client) open(ctx context.Context, pc *pooled, t Target) (*Conn, error) {
	s, err := pc.h2.openStream(ctx, t.Authority.String(), requestHeader(t))
	if err != nil {
		c.release(pc)
		return nil, err
	}
	return newConn(h2ClientBody{s}, s, t.SourceAddr, t.Authority, pc.peer, TransportH2, func(clean bool) {
		if !clean {
			// Resets the stream unless both directions ended; never
			// waits for the network (Close must not block on a peer
			// that stopped reading).
			s.resetAsync(errors.New("hbone: tunnel closed"))
		}
		// After a clean end every byte was written: Write and
		// CloseWrite return once their frames are out.
		c.release(pc)
	}), nil
}

// requestHeader is the header of t's CONNECT, the same on both
// transports.
func requestHeader(t Target) http.Header {
	h := make(http.Header, 4+len(t.Header))
	for k, v := range t.Header {
		h[http.CanonicalHeaderKey(k)] = slices.Clone(v)
	}
	if t.SourceAddr.IsValid() {
		h.Set(HeaderForwarded, FormatForwarded(t.SourceAddr, t.ForwardedHost))
	}
	if b := t.Baggage.String(); b != "" {
		h.Set(HeaderBaggage, b)
	}
	h.Set(HeaderTraceparent, NewTraceparent())
	h.Set("User-Agent", "") // an empty value keeps Go's default off the wire
	return h
}

// get returns a pooled connection for key with a stream slot reserved,
// dialing one if every existing connection is full or closed. fresh tells
// that this call made the connection.
func (c *Client) get(ctx context.Context, key poolKey, t Target, creds Credentials) (pc *pooled, fresh bool, err error) {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, false, net.ErrClosed
		}
		if pc := c.pickLocked(key); pc != nil {
			c.mu.Unlock()
			return pc, false, nil
		}
		if dc := c.dialing[key]; dc != nil {
			c.mu.Unlock()
			if err := dc.wait(ctx); err != nil {
				return nil, false, err
			}
			continue
		}
		dc := &dialCall{done: make(chan struct{})}
		c.dialing[key] = dc
		c.mu.Unlock()
		return c.dialNew(ctx, key, t, creds, dc)
	}
}

// dialNew makes a connection for key, adds it to the pool, wakes the
// callers waiting on dc and reserves the first stream for its caller (so
// a connection that dies at once fails this call instead of looping).
func (c *Client) dialNew(ctx context.Context, key poolKey, t Target, creds Credentials, dc *dialCall) (*pooled, bool, error) {
	pc, err := c.connect(ctx, t, creds)
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.dialing, key)
	defer close(dc.done)
	switch {
	case err != nil:
	case c.closed:
		pc.h2.shutdown()
		err = net.ErrClosed
	case !pc.h2.usable(0, c.cfg.MaxStreamsPerConn):
		pc.h2.shutdown()
		// The cause, typically the server's TLS alert refusing our
		// certificate: TLS 1.3 reports it only after the handshake.
		err = fmt.Errorf("new connection closed before its first stream: %w", pc.h2.endErr())
	default:
		pc.active++
		c.pool[key] = append(c.pool[key], pc)
	}
	dc.err = err
	if err != nil {
		return nil, false, err
	}
	return pc, true, nil
}

// pickLocked reserves a stream on a usable connection of key, dropping
// connections that can take no more streams ever (closed or draining).
func (c *Client) pickLocked(key poolKey) *pooled {
	list := c.pool[key]
	list = slices.DeleteFunc(list, func(pc *pooled) bool {
		if pc.h2.usable(0, 1) {
			return false
		}
		if pc.active == 0 {
			// Out of the pool, nothing would close it (a server that
			// lowered its stream limit to 0, say); a closed or
			// drained one is closed already.
			go pc.h2.shutdown()
		}
		return true
	})
	if len(list) == 0 {
		delete(c.pool, key)
		return nil
	}
	c.pool[key] = list
	for _, pc := range list {
		if pc.h2.usable(pc.active, c.cfg.MaxStreamsPerConn) {
			pc.active++
			return pc
		}
	}
	return nil
}

func (c *Client) release(pc *pooled) {
	c.mu.Lock()
	pc.active--
	if pc.active == 0 {
		pc.idleSince = time.Now()
	}
	c.mu.Unlock()
}

// connect makes one new mutual-TLS HTTP/2 connection.
func (c *Client) connect(ctx context.Context, t Target, creds Credentials) (*pooled, error) {
	tlsConf, err := ClientTLS(TLSConfig{Credentials: creds, Roots: c.cfg.TLS.Roots, AllowTLS12: c.cfg.TLS.AllowTLS12}, t.ExpectedIdentities)
	if err != nil {
		return nil, err
	}
	release, ok := c.cfg.HandshakeGate.enter()
	if !ok {
		return nil, ErrHandshakeLimit
	}
	defer release()
	raw, err := c.cfg.Dial(ctx, t.SourceAddr.Addr(), t.Addr)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	bc := &writebatch.Conn{Conn: raw}
	tc := tls.Client(bc, tlsConf)
	hctx, cancel := context.WithTimeout(ctx, c.cfg.HandshakeTimeout)
	err = tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		raw.Close()
		return nil, fmt.Errorf("tls handshake: %w", err)
	}
	cs := tc.ConnectionState()
	if cs.NegotiatedProtocol != ALPN {
		raw.Close()
		return nil, fmt.Errorf("server negotiated ALPN %q, want %q", cs.NegotiatedProtocol, ALPN)
	}
	peer := Peer{Identity: peerIdentity(cs), Addr: addrPortOf(raw.RemoteAddr())}
	h2, err := startH2Client(tc, bc, c.set, c.cfg.PingInterval, c.cfg.PingTimeout, c.log.With("peer", peer.Addr))
	if err != nil {
		raw.Close()
		return nil, fmt.Errorf("start http2: %w", err)
	}
	c.log.Debug("hbone connection opened", "peer", peer.Addr, "peer_identity", peer.Identity.String(), "local", raw.LocalAddr())
	return &pooled{h2: h2, peer: peer, idleSince: time.Now()}, nil
}

// janitor closes pooled connections idle (no tunnel) for IdleTimeout and
// forgets those that closed (failed ping, GOAWAY), so that keys of
// departed peers do not accumulate.
func (c *Client) janitor() {
	defer close(c.done)
	tick := time.NewTicker(max(min(c.cfg.IdleTimeout/2, 30*time.Second), 10*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-tick.C:
		}
		c.mu.Lock()
		now := time.Now()
		for key, list := range c.pool {
			list = slices.DeleteFunc(list, func(pc *pooled) bool {
				if pc.active == 0 && now.Sub(pc.idleSince) > c.cfg.IdleTimeout {
					go pc.h2.shutdown() // a GOAWAY first: it may wait for the network
					return true
				}
				return pc.h2.closed()
			})
			if len(list) == 0 {
				delete(c.pool, key)
			} else {
				c.pool[key] = list
			}
		}
		c.h3.sweepLocked(c.cfg.IdleTimeout)
		c.mu.Unlock()
	}
}

// Conns returns the number of open pooled connections.
func (c *Client) Conns() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, list := range c.pool {
		for _, pc := range list {
			if !pc.h2.closed() {
				n++
			}
		}
	}
	return n + c.h3.connsLocked()
}

// Close closes every pooled connection, ending all tunnels, and stops the
// housekeeping goroutine. It is idempotent.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	var errs []error
	for _, list := range c.pool {
		for _, pc := range list {
			if err := pc.h2.conn.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				errs = append(errs, err)
			}
		}
	}
	c.pool = nil
	h3 := c.h3
	c.mu.Unlock()
	close(c.stop)
	<-c.done
	errs = append(errs, h3.close())
	return errors.Join(errs...)
}
