package hbone

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"golang.org/x/net/http2"

	"github.com/ambpf/ambpf/pkg/writebatch"
)

// The HTTP/2 server side of HBONE (h2conn.go has what both ends share):
// CONNECT streams are accepted from the read loop, each runs its handler
// (Server.serve) on a goroutine of its own, and the handler writes its
// response HEADERS and DATA frames itself.

// h2MaxStreams is the SETTINGS_MAX_CONCURRENT_STREAMS a server
// advertises: x/net/http2's default, above the 100 a pooling client
// (ztunnel, ours) opens.
const h2MaxStreams = 250

// serveH2 speaks HTTP/2 on an accepted, handshaken TLS connection until
// it ends. ctx carries the peer.
func (s *Server) serveH2(ctx context.Context, tc net.Conn, bc *writebatch.Conn) {
	c := newH2conn(tc, bc, s.cfg.HTTP2.withDefaults(), s.cfg.PingInterval, s.cfg.PingTimeout, s.log)
	c.s, c.ctx = s, ctx

	s.mu.Lock()
	s.h2conns[c] = struct{}{}
	draining := s.draining
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.h2conns, c)
		s.mu.Unlock()
	}()
	if draining {
		c.drain()
	}
	err := c.run()
	c.teardown(err)
}

// drain sends the client a GOAWAY (NO_ERROR, the last stream it opened):
// the streams open go on, new ones are refused, and the connection closes
// when the last of them ends.
func (c *h2conn) drain() {
	c.mu.Lock()
	if c.draining || c.dead != nil {
		c.mu.Unlock()
		return
	}
	c.draining, c.goneAway = true, true
	last := c.maxID
	c.mu.Unlock()
	c.queue(func(fr *http2.Framer) error { return fr.WriteGoAway(last, http2.ErrCodeNo, nil) })
	c.mu.Lock()
	c.closeIfDrainedLocked()
	c.mu.Unlock()
}

func (c *h2conn) run() error {
	c.conn.SetReadDeadline(time.Now().Add(c.s.cfg.HandshakeTimeout))
	preface := make([]byte, len(http2.ClientPreface))
	if _, err := io.ReadFull(c.conn, preface); err != nil {
		return fmt.Errorf("read client preface: %w", err)
	}
	if string(preface) != http2.ClientPreface {
		return errors.New("bad client preface")
	}
	c.conn.SetReadDeadline(time.Time{})
	if err := c.write(func(fr *http2.Framer) error {
		return c.writeSettings(fr, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: h2MaxStreams})
	}); err != nil {
		return fmt.Errorf("write settings: %w", err)
	}
	return c.loop()
}

// onRequestHeaders takes a HEADERS frame from the client: a new CONNECT
// stream, or the end of one (trailers).
func (c *h2conn) onRequestHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		// Trailers: only an end of stream means anything to a tunnel.
		if !f.StreamEnded() {
			c.mu.Unlock()
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		s.remoteEnd = true
		c.maybeForgetLocked(s)
		s.cond.Broadcast()
		c.mu.Unlock()
		return nil
	}
	if id%2 == 0 || id <= c.maxID {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	c.maxID = id
	if c.goneAway || c.dead != nil || len(c.streams) >= h2MaxStreams || c.handlers >= h2MaxStreams {
		c.mu.Unlock()
		c.resetFromReader(id, http2.ErrCodeRefusedStream)
		return nil
	}
	ctx, cancel := context.WithCancel(c.ctx)
	s := &h2stream{
		c: c, id: id, ctx: ctx, cancel: cancel, header: http.Header{},
		recv: int64(c.set.StreamWindow), send: c.peerInitWin,
		remoteEnd: f.StreamEnded(),
	}
	s.cond.L = &c.mu
	c.streams[id] = s
	c.handlers++
	c.mu.Unlock()

	authority := f.PseudoValue("authority")
	h := make(http.Header, len(f.Fields))
	for _, hf := range f.RegularFields() {
		k := http.CanonicalHeaderKey(hf.Name)
		h[k] = append(h[k], hf.Value)
	}
	r := (&http.Request{
		Method:     f.PseudoValue("method"),
		URL:        &url.URL{Host: authority, Path: f.PseudoValue("path")},
		Proto:      "HTTP/2.0",
		ProtoMajor: 2,
		Header:     h,
		Host:       authority,
		Body:       s,
		RemoteAddr: c.conn.RemoteAddr().String(),
	}).WithContext(ctx)
	if f.Truncated {
		go s.finish(func() { s.WriteHeader(http.StatusRequestHeaderFieldsTooLarge) })
		return nil
	}
	go s.finish(func() { c.s.serveStream(s, r) })
	return nil
}

// finish runs a stream's handler and then closes whatever the handler
// left open: a response that never started is a 500, an open request
// side is reset with NO_ERROR (RFC 9113 section 8.1: the response is
// complete, the client may stop sending).
func (s *h2stream) finish(handler func()) {
	defer func() {
		s.c.mu.Lock()
		s.c.handlers--
		s.c.closeIfDrainedLocked()
		s.c.mu.Unlock()
	}()
	defer s.cancel()
	defer func() {
		if p := recover(); p != nil && p != http.ErrAbortHandler {
			s.c.s.log.Error("hbone stream handler panicked", "panic", p)
		}
		s.c.mu.Lock()
		wrote := s.wroteHeader
		s.c.mu.Unlock()
		if !wrote {
			s.WriteHeader(http.StatusInternalServerError)
		}
		s.c.mu.Lock()
		if code := s.refusal; code != 0 && s.err == nil {
			s.c.mu.Unlock()
			s.writeHeaders(code, true)
			s.c.mu.Lock()
		}
		s.c.dropBufferedLocked(s) // the handler reads no more
		switch {
		case s.err != nil:
		case !s.localEnd:
			s.c.resetLocked(s, http2.ErrCodeCancel, errors.New("hbone: handler ended the stream"), true)
		case !s.remoteEnd:
			s.c.resetLocked(s, http2.ErrCodeNo, errors.New("hbone: response complete"), true)
		}
		s.c.mu.Unlock()
		s.c.flushQueued()
	}()
	handler()
}

// Header is the response header (http.ResponseWriter).
func (s *h2stream) Header() http.Header { return s.header }

// WriteHeader sends the response HEADERS. A status other than 2xx ends
// the response (END_STREAM), as a CONNECT refusal does.
func (s *h2stream) WriteHeader(code int) {
	c := s.c
	c.mu.Lock()
	if s.wroteHeader || s.err != nil {
		c.mu.Unlock()
		return
	}
	s.wroteHeader = true
	end := code < 200 || code > 299
	if end {
		s.localEnd = true
		c.maybeForgetLocked(s)
		// A refusal is sent when the handler returns, as x/net/http2
		// does, so that its Observe call happens before the client
		// sees the answer.
		s.refusal = code
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	s.writeHeaders(code, false)
}

// writeHeaders sends the response HEADERS (and CONTINUATION) frames.
func (s *h2stream) writeHeaders(code int, end bool) {
	c := s.c
	fields := []string{":status", strconv.Itoa(code)}
	for k, vs := range s.header {
		for _, v := range vs {
			fields = append(fields, lowerHeader(k), v)
		}
	}
	c.write(func(fr *http2.Framer) error {
		maxFrame := c.encodeHeaders(fields...)
		return writeHeaderBlock(fr, s.id, c.hbuf.Bytes(), end, maxFrame)
	})
}

// Flush is a no-op: every Write is flushed.
func (s *h2stream) Flush() {}

// Close stops reading the request body (http.Request.Body).
func (s *h2stream) Close() error { return nil }
