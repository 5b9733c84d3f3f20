package hbone

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// errH3NoAnswer marks an HTTP/3 attempt that failed because the peer (or
// the local UDP socket) did not take part, as opposed to a refusal: only
// this error makes Client.Dial fall back to HTTP/2.
var errH3NoAnswer = errors.New("no answer over http/3")

// h3Client is a Client's HTTP/3 side. Its pool and down map are guarded
// by Client.mu; the transport by its own mutex, since making the socket
// may enter a network namespace and must not hold up the pool.
type h3Client struct {
	pool map[poolKey][]*h3conn
	// down holds endpoints that did not answer, until when they are
	// reached over HTTP/2 only.
	down map[netip.AddrPort]time.Time
	ht   *http3.Transport // only its settings are used: NewClientConn

	trMu   sync.Mutex
	tr     *quic.Transport // nil until the first HTTP/3 dial
	pc     net.PacketConn
	closed bool
}

// h3conn is one pooled QUIC connection and its HTTP/3 client.
type h3conn struct {
	qc        *quic.Conn
	cc        *http3.ClientConn
	peer      Peer
	active    int       // tunnels handed out and not yet closed
	idleSince time.Time // when active last dropped to 0
}

func newH3Client() *h3Client {
	return &h3Client{
		pool: map[poolKey][]*h3conn{},
		down: map[netip.AddrPort]time.Time{},
		ht:   &http3.Transport{DisableCompression: true},
	}
}

func (hc *h3conn) dead() bool { return hc.qc.Context().Err() != nil }

// transport returns the shared QUIC transport, making its socket with
// listen (a [::]:0 socket when nil) on first use.
func (h *h3Client) transport(listen func() (net.PacketConn, error)) (*quic.Transport, error) {
	h.trMu.Lock()
	defer h.trMu.Unlock()
	if h.closed {
		return nil, net.ErrClosed
	}
	if h.tr != nil {
		return h.tr, nil
	}
	if listen == nil {
		listen = func() (net.PacketConn, error) { return net.ListenUDP("udp", &net.UDPAddr{}) }
	}
	pc, err := listen()
	if err != nil {
		return nil, fmt.Errorf("%w: udp socket: %w", errH3NoAnswer, err)
	}
	h.pc, h.tr = pc, &quic.Transport{Conn: pc}
	return h.tr, nil
}

// close closes every connection, the transport and its socket.
func (h *h3Client) close() error {
	for _, list := range h.pool {
		for _, hc := range list {
			hc.qc.CloseWithError(0, "client closed")
		}
	}
	h.trMu.Lock()
	defer h.trMu.Unlock()
	h.closed = true
	if h.tr == nil {
		return nil
	}
	// A Transport does not close a socket it was given.
	return errors.Join(h.tr.Close(), h.pc.Close())
}

// pickLocked reserves a stream on a live connection of key with room
// for one more tunnel, forgetting dead connections.
func (h *h3Client) pickLocked(key poolKey, maxStreams int) *h3conn {
	list := slices.DeleteFunc(h.pool[key], (*h3conn).dead)
	if len(list) == 0 {
		delete(h.pool, key)
		return nil
	}
	h.pool[key] = list
	for _, hc := range list {
		if hc.active < maxStreams {
			hc.active++
			return hc
		}
	}
	return nil
}

// sweepLocked forgets dead connections and closes those idle (no
// tunnel) for longer than idle.
func (h *h3Client) sweepLocked(idle time.Duration) {
	now := time.Now()
	for key, list := range h.pool {
		list = slices.DeleteFunc(list, func(hc *h3conn) bool {
			if hc.active == 0 && now.Sub(hc.idleSince) > idle {
				hc.qc.CloseWithError(0, "idle")
				return true
			}
			return hc.dead()
		})
		if len(list) == 0 {
			delete(h.pool, key)
		} else {
			h.pool[key] = list
		}
	}
}

func (h *h3Client) connsLocked() int {
	n := 0
	for _, list := range h.pool {
		for _, hc := range list {
			if !hc.dead() {
				n++
			}
		}
	}
	return n
}

// h3Usable reports whether addr may be tried over HTTP/3: it has not
// failed to answer within H3RetryAfter.
func (c *Client) h3Usable(addr netip.AddrPort) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	until, ok := c.h3.down[addr]
	if ok && time.Now().Before(until) {
		return false
	}
	delete(c.h3.down, addr)
	return true
}

// h3Unanswered remembers that addr did not answer over HTTP/3.
func (c *Client) h3Unanswered(addr netip.AddrPort, err error) {
	c.mu.Lock()
	if c.h3.down != nil {
		c.h3.down[addr] = time.Now().Add(c.cfg.H3RetryAfter)
	}
	c.mu.Unlock()
	c.log.Info("hbone over http/3 unanswered, using http/2", "addr", addr, "retry_after", c.cfg.H3RetryAfter, "err", err)
}

// dialH3 opens a tunnel over a pooled HTTP/3 connection for key.
func (c *Client) dialH3(ctx context.Context, key poolKey, t Target, creds Credentials) (*Conn, error) {
	hc, err := c.getH3(ctx, key, t, creds)
	if err != nil {
		return nil, err
	}
	conn, err := c.openH3(ctx, hc, t)
	if err != nil {
		c.releaseH3(hc)
		return nil, err
	}
	return conn, nil
}

// getH3 returns a connection for key with a tunnel slot reserved,
// dialing one when every pooled connection is full or dead. Concurrent
// callers for one key share a dial.
func (c *Client) getH3(ctx context.Context, key poolKey, t Target, creds Credentials) (*h3conn, error) {
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, net.ErrClosed
		}
		if hc := c.h3.pickLocked(key, c.cfg.MaxStreamsPerConn); hc != nil {
			c.mu.Unlock()
			return hc, nil
		}
		if dc := c.dialing[key]; dc != nil {
			c.mu.Unlock()
			if err := dc.wait(ctx); err != nil {
				return nil, err
			}
			continue
		}
		dc := &dialCall{done: make(chan struct{})}
		c.dialing[key] = dc
		c.mu.Unlock()

		hc, err := c.connectH3(ctx, t, creds)
		c.mu.Lock()
		delete(c.dialing, key)
		switch {
		case err != nil:
		case c.closed:
			hc.qc.CloseWithError(0, "client closed")
			err = net.ErrClosed
		default:
			hc.active++
			c.h3.pool[key] = append(c.h3.pool[key], hc)
		}
		dc.err = err
		close(dc.done)
		c.mu.Unlock()
		if err != nil {
			return nil, err
		}
		return hc, nil
	}
}

func (c *Client) releaseH3(hc *h3conn) {
	c.mu.Lock()
	hc.active--
	if hc.active == 0 {
		hc.idleSince = time.Now()
	}
	c.mu.Unlock()
}

// quicConfig is the client side of Server.quicConfig, with the short
// handshake timeout that decides the fallback.
func (c *Client) quicConfig() *quic.Config {
	set := c.cfg.HTTP2.withDefaults()
	return &quic.Config{
		HandshakeIdleTimeout:       c.cfg.H3HandshakeTimeout,
		MaxIdleTimeout:             c.cfg.PingInterval + c.cfg.PingTimeout,
		KeepAlivePeriod:            c.cfg.PingInterval,
		MaxIncomingStreams:         -1, // an HTTP/3 server opens no request streams
		MaxStreamReceiveWindow:     uint64(set.StreamWindow),
		MaxConnectionReceiveWindow: uint64(set.ConnWindow),
	}
}

// connectH3 makes one QUIC connection with mutual TLS (ALPN h3) and waits
// for the server's SETTINGS, which must allow extended CONNECT. Silence
// for H3HandshakeTimeout is errH3NoAnswer.
func (c *Client) connectH3(ctx context.Context, t Target, creds Credentials) (*h3conn, error) {
	tlsConf, err := clientTLS(TLSConfig{Credentials: creds, Roots: c.cfg.TLS.Roots}, t.ExpectedIdentities, ALPNH3)
	if err != nil {
		return nil, err
	}
	tr, err := c.h3.transport(c.cfg.H3PacketConn)
	if err != nil {
		return nil, err
	}
	hctx, cancel := context.WithTimeout(ctx, c.cfg.H3HandshakeTimeout)
	defer cancel()
	qc, err := tr.Dial(hctx, net.UDPAddrFromAddrPort(t.Addr), tlsConf, c.quicConfig())
	if err != nil {
		return nil, fmt.Errorf("quic handshake: %w", noAnswer(ctx, hctx, err))
	}
	cc := c.h3.ht.NewClientConn(qc)
	select {
	case <-cc.ReceivedSettings():
	case <-hctx.Done():
		qc.CloseWithError(0, "no settings")
		return nil, fmt.Errorf("http3 settings: %w", noAnswer(ctx, hctx, hctx.Err()))
	}
	if s := cc.Settings(); s == nil || !s.EnableExtendedConnect {
		qc.CloseWithError(0, "no extended connect")
		return nil, errors.New("http3 server does not allow extended CONNECT")
	}
	cs := qc.ConnectionState().TLS
	peer := Peer{Identity: peerIdentity(cs), Addr: addrPortOf(qc.RemoteAddr())}
	c.log.Debug("hbone connection opened", "transport", TransportH3, "peer", peer.Addr,
		"peer_identity", peer.Identity.String(), "local", qc.LocalAddr(), "gso", qc.ConnectionState().GSO)
	return &h3conn{qc: qc, cc: cc, peer: peer}, nil
}

// noAnswer wraps err in errH3NoAnswer when the handshake timer or QUIC's
// own timeouts, not the caller's ctx, ended the wait.
func noAnswer(ctx, hctx context.Context, err error) error {
	if ctx.Err() != nil {
		return err
	}
	var idle *quic.IdleTimeoutError
	var hs *quic.HandshakeTimeoutError
	if hctx.Err() != nil || errors.As(err, &idle) || errors.As(err, &hs) {
		return fmt.Errorf("%w: %w", errH3NoAnswer, err)
	}
	return err
}

// openH3 sends the extended CONNECT on hc, whose slot the caller holds
// and frees on error; a returned Conn frees it on Close.
func (c *Client) openH3(ctx context.Context, hc *h3conn, t Target) (*Conn, error) {
	str, err := hc.cc.OpenRequestStream(ctx)
	if err != nil {
		return nil, fmt.Errorf("open http3 stream: %w", err)
	}
	reset := func() {
		str.CancelRead(h3Cancelled)
		str.CancelWrite(h3Cancelled)
	}
	authority := t.Authority.String()
	req := &http.Request{
		Method: http.MethodConnect,
		Proto:  H3Protocol,
		URL:    &url.URL{Scheme: "https", Host: authority, Path: "/"},
		Host:   authority,
		Header: requestHeader(t),
	}
	// ctx bounds the wait for the answer only: resetting the stream
	// unblocks ReadResponse.
	stop := context.AfterFunc(ctx, reset)
	var resp *http.Response
	err = str.SendRequestHeader(req)
	if err == nil {
		resp, err = str.ReadResponse()
	}
	if !stop() {
		err = errors.Join(ctx.Err(), err)
	}
	if err != nil {
		reset()
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		reset()
		return nil, &StatusError{Code: resp.StatusCode, Status: statusText(resp.StatusCode)}
	}
	return newConn(str, h3Body{str}, t.SourceAddr, t.Authority, hc.peer, TransportH3,
		func(bool) {
			// The FIN keeps delivering what was written; stopping the
			// receiving side never cuts the sending one.
			str.Close()
			str.CancelRead(h3Cancelled)
			c.releaseH3(hc)
		}), nil
}

// h3Body is the receiving side of a client stream: Close stops reading
// (STOP_SENDING) so that a server still sending sees the tunnel end.
type h3Body struct{ str *http3.RequestStream }

func (b h3Body) Read(p []byte) (int, error) { return b.str.Read(p) }

func (b h3Body) Close() error {
	b.str.CancelRead(h3Cancelled)
	return nil
}
