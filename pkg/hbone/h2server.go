package hbone

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The HTTP/2 server side of HBONE, framed on x/net/http2's Framer.
//
// x/net/http2's Server cannot half-close: a handler ends its response
// stream only by returning, and the server then resets whatever the
// client still sends (RST_STREAM NO_ERROR). A tunnel needs each
// direction to end on its own, so this file serves CONNECT streams
// itself: END_STREAM in either direction ends that direction only, an
// error in either resets the stream (RST_STREAM), and flow control is
// HTTP/2's (RFC 9113 section 5.2) with Istio's windows.
//
// Concurrency: one goroutine per connection reads frames and never
// blocks on the network for writing (control frames it must answer go
// through a small queue drained by whoever writes next, or by the
// control goroutine); stream handlers write their own HEADERS and DATA
// frames under the connection's write lock, so a response costs no
// goroutine handoff.

// h2MaxStreams is the SETTINGS_MAX_CONCURRENT_STREAMS a server
// advertises: x/net/http2's default, above the 100 a pooling client
// (ztunnel, ours) opens.
const h2MaxStreams = 250

// h2MaxQueuedControl bounds the control frames waiting to be written.
const h2MaxQueuedControl = 10000

// h2MaxHeaderList bounds a request's decoded header block.
const h2MaxHeaderList = 1 << 20

// h2WriteChunk caps one DATA frame we write: large frames mean few
// frame headers and TLS records filled to 16 KiB.
const h2WriteChunk = 256 << 10

var errStreamReset = errors.New("hbone: stream reset by the peer")

// h2conn is one server HTTP/2 connection.
type h2conn struct {
	s    *Server
	conn net.Conn // the TLS connection
	bc   *batchConn
	ctx  context.Context
	set  HTTP2Settings

	fr   *http2.Framer
	wmu  sync.Mutex // serialises frame writes: fr's write side, bw, henc
	bw   *bufio.Writer
	henc *hpack.Encoder
	hbuf bytes.Buffer

	ctlMu  sync.Mutex
	ctl    []func(*http2.Framer) error // frames the read loop queued
	ctlSig chan struct{}

	frames atomic.Uint64 // frames read, for the idle check

	mu           sync.Mutex // guards the fields below and every stream's state
	streams      map[uint32]*h2stream
	maxID        uint32 // highest stream ID the client opened
	connSend     int64  // our send window on the connection
	connRecv     int64  // what the client may still send on the connection
	connUnacked  int64  // consumed bytes not yet returned by WINDOW_UPDATE
	peerInitWin  int64  // the client's SETTINGS_INITIAL_WINDOW_SIZE
	peerMaxFrame int    // the client's SETTINGS_MAX_FRAME_SIZE
	goneAway     bool
	draining     bool  // we sent GOAWAY (Server.Drain): close once the last stream ends
	dead         error // set when the connection ended
	// handlers counts stream handlers still running, reset or not: a
	// client resetting streams as fast as it opens them (rapid reset)
	// cannot run more than h2MaxStreams handlers at once.
	handlers int
}

// h2stream is one CONNECT stream. It is the http.ResponseWriter and the
// request Body that Server.serve sees, and what relayH2 copies through.
type h2stream struct {
	c      *h2conn
	id     uint32
	ctx    context.Context
	cancel context.CancelFunc
	cond   sync.Cond // on c.mu: data, window, state changes
	header http.Header

	// guarded by c.mu
	buf         bytes.Buffer // received, not yet read
	recv        int64        // what the client may still send
	unacked     int64        // read, not yet returned by WINDOW_UPDATE
	send        int64        // our send window
	remoteEnd   bool         // END_STREAM received
	localEnd    bool         // END_STREAM sent
	err         error        // reset (either way) or connection gone
	wroteHeader bool
	refusal     int // a non-2xx status to send when the handler returns
}

// serveH2 speaks HTTP/2 on an accepted, handshaken TLS connection until
// it ends. ctx carries the peer.
func (s *Server) serveH2(ctx context.Context, tc net.Conn, bc *batchConn) {
	set := s.cfg.HTTP2.withDefaults()
	c := &h2conn{
		s: s, conn: tc, bc: bc, ctx: ctx, set: set,
		ctlSig:       make(chan struct{}, 1),
		streams:      map[uint32]*h2stream{},
		connSend:     65535,
		connRecv:     int64(set.ConnWindow),
		peerInitWin:  65535,
		peerMaxFrame: 16384,
	}
	c.bw = bufio.NewWriterSize(tc, 64<<10)
	c.fr = http2.NewFramer(c.bw, bufio.NewReaderSize(tc, 64<<10))
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = h2MaxHeaderList
	c.fr.SetMaxReadFrameSize(set.MaxFrameSize)
	c.fr.SetReuseFrames()
	c.henc = hpack.NewEncoder(&c.hbuf)

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

// closeIfDrainedLocked closes a draining connection with no stream and no
// handler left, after writing what is queued (the GOAWAY). Off the lock:
// the write may wait for the network.
func (c *h2conn) closeIfDrainedLocked() {
	if !c.draining || c.dead != nil || len(c.streams) > 0 || c.handlers > 0 {
		return
	}
	go func() {
		c.conn.SetWriteDeadline(time.Now().Add(time.Second))
		c.write(func(*http2.Framer) error { return nil })
		c.conn.Close()
	}()
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
		err := fr.WriteSettings(
			http2.Setting{ID: http2.SettingMaxFrameSize, Val: c.set.MaxFrameSize},
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: h2MaxStreams},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: h2MaxHeaderList},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: uint32(c.set.StreamWindow)},
		)
		if err == nil {
			err = fr.WriteWindowUpdate(0, uint32(c.set.ConnWindow)-65535)
		}
		return err
	}); err != nil {
		return fmt.Errorf("write settings: %w", err)
	}
	done := make(chan struct{})
	defer close(done)
	go c.control(done)

	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				c.resetFromReader(se.StreamID, se.Code)
				continue
			}
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				c.goAway(http2.ErrCode(ce))
			}
			return err
		}
		c.frames.Add(1)
		if err := c.handle(f); err != nil {
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				c.goAway(http2.ErrCode(ce))
			}
			return err
		}
	}
}

func (c *h2conn) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		err := f.ForeachSetting(func(st http2.Setting) error {
			switch st.ID {
			case http2.SettingInitialWindowSize:
				c.mu.Lock()
				delta := int64(st.Val) - c.peerInitWin
				c.peerInitWin = int64(st.Val)
				for _, s := range c.streams {
					s.send += delta
					if s.send > 1<<31-1 {
						c.mu.Unlock()
						return http2.ConnectionError(http2.ErrCodeFlowControl)
					}
					s.cond.Broadcast()
				}
				c.mu.Unlock()
			case http2.SettingMaxFrameSize:
				c.mu.Lock()
				c.peerMaxFrame = int(st.Val)
				c.mu.Unlock()
			}
			return nil
		})
		if err != nil {
			return err
		}
		c.queue(func(fr *http2.Framer) error { return fr.WriteSettingsAck() })
	case *http2.MetaHeadersFrame:
		return c.onHeaders(f)
	case *http2.DataFrame:
		return c.onData(f)
	case *http2.WindowUpdateFrame:
		c.mu.Lock()
		defer c.mu.Unlock()
		inc := int64(f.Increment)
		if f.StreamID == 0 {
			c.connSend += inc
			if c.connSend > 1<<31-1 {
				return http2.ConnectionError(http2.ErrCodeFlowControl)
			}
			for _, s := range c.streams {
				s.cond.Broadcast()
			}
			return nil
		}
		if s := c.streams[f.StreamID]; s != nil {
			s.send += inc
			if s.send > 1<<31-1 {
				c.resetLocked(s, http2.ErrCodeFlowControl, errors.New("hbone: stream send window overflow"), true)
				return nil
			}
			s.cond.Broadcast()
		}
	case *http2.RSTStreamFrame:
		c.mu.Lock()
		if s := c.streams[f.StreamID]; s != nil {
			c.resetLocked(s, 0, fmt.Errorf("%w (%v)", errStreamReset, f.ErrCode), false)
		}
		c.mu.Unlock()
	case *http2.PingFrame:
		if !f.IsAck() {
			data := f.Data
			c.queue(func(fr *http2.Framer) error { return fr.WritePing(true, data) })
		}
	case *http2.GoAwayFrame:
		c.mu.Lock()
		c.goneAway = true
		c.mu.Unlock()
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	// PRIORITY and unknown frames are ignored, as RFC 9113 allows.
	return nil
}

func (c *h2conn) onHeaders(f *http2.MetaHeadersFrame) error {
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

func (c *h2conn) onData(f *http2.DataFrame) error {
	n := int64(f.Length) // flow control counts padding too
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.connRecv -= n; c.connRecv < 0 {
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	s := c.streams[f.StreamID]
	if s == nil || s.remoteEnd {
		if f.StreamID > c.maxID {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		// A stream we reset or finished: data already in flight. Give
		// the connection window back, drop the bytes.
		c.returnConnLocked(n)
		return nil
	}
	if s.recv -= n; s.recv < 0 {
		c.resetLocked(s, http2.ErrCodeFlowControl, errors.New("hbone: client overran the stream window"), true)
		c.returnConnLocked(n)
		return nil
	}
	data := f.Data()
	if pad := n - int64(len(data)); pad > 0 {
		c.returnConnLocked(pad)
		s.unacked += pad
	}
	s.buf.Write(data)
	if f.StreamEnded() {
		s.remoteEnd = true
		c.maybeForgetLocked(s)
	}
	s.cond.Broadcast()
	return nil
}

// returnConnLocked accounts n consumed connection-window bytes and
// queues a WINDOW_UPDATE once a quarter of the window is due, so that a
// bulk sender never waits for it.
func (c *h2conn) returnConnLocked(n int64) {
	c.connUnacked += n
	if c.connUnacked < int64(c.set.ConnWindow)/4 {
		return
	}
	inc := c.connUnacked
	c.connUnacked = 0
	c.connRecv += inc
	c.queue(func(fr *http2.Framer) error { return fr.WriteWindowUpdate(0, uint32(inc)) })
}

// resetLocked ends s with err; with send it also tells the client
// (RST_STREAM code), through the control queue since the caller may be
// the read loop.
func (c *h2conn) resetLocked(s *h2stream, code http2.ErrCode, err error, send bool) {
	if s.err == nil {
		s.err = err
	}
	s.remoteEnd, s.localEnd = true, true
	delete(c.streams, s.id)
	c.dropBufferedLocked(s)
	s.cond.Broadcast()
	s.cancel()
	if send {
		id := s.id
		c.queue(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, code) })
	}
}

// dropBufferedLocked discards what s received and nobody will read, and
// gives it back to the connection window: otherwise every reset stream
// with unread data would shrink the window of the whole connection.
func (c *h2conn) dropBufferedLocked(s *h2stream) {
	if n := s.buf.Len(); n > 0 {
		s.buf = bytes.Buffer{}
		c.returnConnLocked(int64(n))
	}
}

// maybeForgetLocked drops s from the stream table once both directions
// ended: it no longer counts against the concurrency limit. Its reader
// still gets the buffered data.
func (c *h2conn) maybeForgetLocked(s *h2stream) {
	if s.remoteEnd && s.localEnd {
		delete(c.streams, s.id)
		c.closeIfDrainedLocked()
	}
}

// resetFromReader resets a stream the read loop refused or that failed.
func (c *h2conn) resetFromReader(id uint32, code http2.ErrCode) {
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		c.resetLocked(s, code, fmt.Errorf("hbone: stream error %v", code), true)
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	c.queue(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, code) })
}

// goAway tells the client why the connection ends; best effort, the
// connection is closing anyway.
func (c *h2conn) goAway(code http2.ErrCode) {
	c.mu.Lock()
	last := c.maxID
	c.mu.Unlock()
	c.queue(func(fr *http2.Framer) error { return fr.WriteGoAway(last, code, nil) })
	c.conn.SetWriteDeadline(time.Now().Add(time.Second))
	c.write(func(*http2.Framer) error { return nil })
}

// queue adds a frame for the next writer and wakes the control
// goroutine; it never blocks on the network.
func (c *h2conn) queue(fn func(*http2.Framer) error) {
	c.ctlMu.Lock()
	c.ctl = append(c.ctl, fn)
	flood := len(c.ctl) > h2MaxQueuedControl
	c.ctlMu.Unlock()
	if flood {
		// A client that makes us answer (PING, SETTINGS, resets)
		// faster than it reads: drop it, as x/net/http2 does.
		c.conn.Close()
		return
	}
	select {
	case c.ctlSig <- struct{}{}:
	default:
	}
}

// control writes queued frames and pings a silent client, until done.
func (c *h2conn) control(done <-chan struct{}) {
	tick := time.NewTicker(c.s.cfg.PingInterval)
	defer tick.Stop()
	var seen uint64
	var pingSent time.Time
	for {
		select {
		case <-done:
			return
		case <-c.ctlSig:
			if err := c.write(func(*http2.Framer) error { return nil }); err != nil {
				c.conn.Close()
				return
			}
		case <-tick.C:
			if n := c.frames.Load(); n != seen {
				seen, pingSent = n, time.Time{}
				continue
			}
			if pingSent.IsZero() {
				pingSent = time.Now()
				var data [8]byte
				if err := c.write(func(fr *http2.Framer) error { return fr.WritePing(false, data) }); err != nil {
					c.conn.Close()
					return
				}
				continue
			}
			if time.Since(pingSent) > c.s.cfg.PingTimeout {
				c.s.log.Info("hbone client stopped answering pings; closing", "peer", c.conn.RemoteAddr())
				c.conn.Close()
				return
			}
		}
	}
}

// write runs fn on the framer, then writes the queued control frames and
// flushes, all in one batch (one TLS write, coalesced into as few
// syscalls as the records allow).
func (c *h2conn) write(fn func(*http2.Framer) error) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	err := fn(c.fr)
	c.ctlMu.Lock()
	ctl := c.ctl
	c.ctl = nil
	c.ctlMu.Unlock()
	for _, f := range ctl {
		if err == nil {
			err = f(c.fr)
		}
	}
	if err == nil {
		c.bc.hold()
		err = c.bw.Flush()
		if ferr := c.bc.flush(); err == nil {
			err = ferr
		}
	}
	if err != nil {
		c.conn.Close()
	}
	return err
}

// teardown ends every stream when the connection is gone.
func (c *h2conn) teardown(err error) {
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	c.mu.Lock()
	c.dead = fmt.Errorf("hbone connection ended: %w", err)
	for _, s := range c.streams {
		if s.err == nil {
			s.err = c.dead
		}
		s.remoteEnd, s.localEnd = true, true
		s.cond.Broadcast()
		s.cancel()
	}
	clear(c.streams)
	c.mu.Unlock()
	c.conn.Close()
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

// flushQueued writes frames the stream code queued, from a goroutine
// that may block.
func (c *h2conn) flushQueued() {
	c.ctlMu.Lock()
	n := len(c.ctl)
	c.ctlMu.Unlock()
	if n > 0 {
		c.write(func(*http2.Framer) error { return nil })
	}
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
	c.write(func(fr *http2.Framer) error {
		c.hbuf.Reset()
		c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(code)})
		for k, vs := range s.header {
			for _, v := range vs {
				c.henc.WriteField(hpack.HeaderField{Name: lowerHeader(k), Value: v})
			}
		}
		return writeHeaderBlock(fr, s.id, c.hbuf.Bytes(), end, c.peerMaxFrameSnapshot())
	})
}

func (c *h2conn) peerMaxFrameSnapshot() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.peerMaxFrame
}

// writeHeaderBlock writes a header block as HEADERS plus CONTINUATION
// frames no larger than maxFrame.
func writeHeaderBlock(fr *http2.Framer, id uint32, block []byte, end bool, maxFrame int) error {
	first := block
	if len(first) > maxFrame {
		first = first[:maxFrame]
	}
	rest := block[len(first):]
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndStream: end, EndHeaders: len(rest) == 0}); err != nil {
		return err
	}
	for len(rest) > 0 {
		n := min(len(rest), maxFrame)
		if err := fr.WriteContinuation(id, n == len(rest), rest[:n]); err != nil {
			return err
		}
		rest = rest[n:]
	}
	return nil
}

func lowerHeader(k string) string {
	b := []byte(k)
	for i, ch := range b {
		if 'A' <= ch && ch <= 'Z' {
			b[i] = ch + 'a' - 'A'
		}
	}
	return string(b)
}

// Write sends p as DATA frames as flow control allows (the response
// body: upstream to client). It sends the 200 first if needed.
func (s *h2stream) Write(p []byte) (int, error) {
	c := s.c
	c.mu.Lock()
	wrote := s.wroteHeader
	c.mu.Unlock()
	if !wrote {
		s.WriteHeader(http.StatusOK)
	}
	total := 0
	for len(p) > 0 {
		c.mu.Lock()
		for s.err == nil && !s.localEnd && (s.send <= 0 || c.connSend <= 0) {
			s.cond.Wait()
		}
		if s.err != nil {
			err := s.err
			c.mu.Unlock()
			return total, err
		}
		if s.localEnd {
			c.mu.Unlock()
			return total, errors.New("hbone: write after end of stream")
		}
		n := int64(min(len(p), c.peerMaxFrame, h2WriteChunk))
		n = min(n, s.send, c.connSend)
		s.send -= n
		c.connSend -= n
		c.mu.Unlock()
		chunk := p[:n]
		if err := c.write(func(fr *http2.Framer) error { return fr.WriteData(s.id, false, chunk) }); err != nil {
			return total, err
		}
		total += int(n)
		p = p[n:]
	}
	return total, nil
}

// Flush is a no-op: every Write is flushed.
func (s *h2stream) Flush() {}

// CloseWrite ends the response direction with END_STREAM; data from
// the client still arrives.
func (s *h2stream) CloseWrite() error {
	c := s.c
	c.mu.Lock()
	if s.err != nil || s.localEnd {
		err := s.err
		c.mu.Unlock()
		return err
	}
	s.localEnd = true
	c.maybeForgetLocked(s)
	c.mu.Unlock()
	return c.write(func(fr *http2.Framer) error { return fr.WriteData(s.id, true, nil) })
}

// Reset ends both directions with RST_STREAM CANCEL.
func (s *h2stream) Reset(err error) {
	c := s.c
	c.mu.Lock()
	if s.err == nil && !(s.localEnd && s.remoteEnd) {
		c.resetLocked(s, http2.ErrCodeCancel, err, true)
	}
	c.mu.Unlock()
	c.flushQueued()
}

// Read reads the request body (client to upstream); io.EOF after the
// client's END_STREAM.
func (s *h2stream) Read(p []byte) (int, error) {
	c := s.c
	c.mu.Lock()
	for s.buf.Len() == 0 && !s.remoteEnd && s.err == nil {
		s.cond.Wait()
	}
	if s.buf.Len() == 0 {
		err := s.err
		c.mu.Unlock()
		if err == nil {
			err = io.EOF
		}
		return 0, err
	}
	n, _ := s.buf.Read(p)
	if s.buf.Len() == 0 && s.buf.Cap() > 256<<10 {
		s.buf = bytes.Buffer{} // do not pin a bulk transfer's buffer
	}
	// Return the window: the stream's once half of it is due (nothing
	// when the client finished sending), the connection's by quarters.
	var streamInc int64
	if !s.remoteEnd {
		s.unacked += int64(n)
		if s.unacked >= int64(c.set.StreamWindow)/2 {
			streamInc, s.unacked = s.unacked, 0
			s.recv += streamInc
		}
	}
	c.returnConnLocked(int64(n))
	c.mu.Unlock()
	if streamInc > 0 {
		id := s.id
		c.queue(func(fr *http2.Framer) error { return fr.WriteWindowUpdate(id, uint32(streamInc)) })
	}
	return n, nil
}

// Close stops reading the request body (http.Request.Body).
func (s *h2stream) Close() error { return nil }

// batchConn sits under the TLS connection and, between hold and flush,
// gathers what TLS writes (one record per 16 KiB) into one write.
type batchConn struct {
	net.Conn
	mu      sync.Mutex
	holding bool
	buf     []byte
}

func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.holding {
		b.buf = append(b.buf, p...)
		return len(p), nil
	}
	return b.Conn.Write(p)
}

func (b *batchConn) hold() {
	b.mu.Lock()
	b.holding = true
	b.mu.Unlock()
}

// flush writes what was gathered since hold and stops gathering.
func (b *batchConn) flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.holding = false
	if len(b.buf) == 0 {
		return nil
	}
	_, err := b.Conn.Write(b.buf)
	if cap(b.buf) > 1<<20 {
		b.buf = nil
	} else {
		b.buf = b.buf[:0]
	}
	return err
}
