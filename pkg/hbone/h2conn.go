package hbone

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/ambpf/ambpf/pkg/copybuf"
	"github.com/ambpf/ambpf/pkg/writebatch"
)

// HBONE's HTTP/2 connections, both ends, framed on x/net/http2's Framer.
//
// x/net/http2 cannot half-close: its Server ends a response stream only
// when the handler returns and then resets what the client still sends,
// and its client Transport hands every DATA frame to the reader, and
// takes the request body from the writer, through pipes (a goroutine
// handoff per message). A tunnel needs each direction to end on its own
// and to cost no handoff, so HBONE frames its CONNECT streams itself:
// END_STREAM in either direction ends that direction only, an error in
// either resets the stream (RST_STREAM), and flow control is HTTP/2's
// (RFC 9113 section 5.2) with Istio's windows.
//
// This file is what the two ends share: the frame reader, flow control,
// the stream table, a stream's Read, Write, CloseWrite and Reset, pings
// and GOAWAY. h2server.go adds accepting streams (request HEADERS, the
// handler, the response status, Drain); h2client.go adds opening them
// (request HEADERS, the response status, the pool's view).
//
// Concurrency: one goroutine per connection reads frames and never
// blocks on the network for writing (control frames it must answer go
// through a small queue drained by whoever writes next, or by the
// control goroutine); a stream's users write its HEADERS and DATA
// frames themselves under the connection's write lock, and a reader
// waits on the stream's condition variable for what the read loop
// buffered, so a message costs no goroutine handoff.
//
// Lock order: wmu, then mu, then ctlMu.

// h2MaxQueuedControl bounds the control frames waiting to be written.
const h2MaxQueuedControl = 10000

// h2MaxHeaderList bounds a decoded header block, both ways.
const h2MaxHeaderList = 1 << 20

// h2WriteBuf is the buffer frames are gathered in before TLS: one full
// TLS record. Control frames and small DATA frames written together go
// out as one record; a large DATA frame is copied only up to this size
// (its header and first bytes), the rest goes to TLS from the caller's
// buffer.
const h2WriteBuf = 16 << 10

// h2WriteChunk caps one DATA frame we write: large frames mean few
// frame headers and TLS records filled to 16 KiB.
const h2WriteChunk = 256 << 10

var (
	errStreamReset = errors.New("hbone: stream reset by the peer")
	// errRefusedStream marks a stream the peer did not process (RST_STREAM
	// REFUSED_STREAM, or above a GOAWAY's last stream ID): a client may
	// open it again on another connection.
	errRefusedStream = errors.New("hbone: stream refused by the peer")
	// errConnEnded marks a stream ended by the end of its connection.
	errConnEnded = errors.New("hbone connection ended")
)

// h2conn is one HTTP/2 connection, server (s set) or client (s nil).
type h2conn struct {
	s    *Server // the server serving it; nil on a client connection
	conn net.Conn
	bc   *writebatch.Conn
	ctx  context.Context // the server's, with the peer; a client's: Background
	set  HTTP2Settings
	log  *slog.Logger

	pingInterval, pingTimeout time.Duration

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
	maxID        uint32 // highest stream ID opened (by the client, on either end)
	nextID       uint32 // client: the ID of the next stream it opens
	connSend     int64  // our send window on the connection
	connRecv     int64  // what the peer may still send on the connection
	connUnacked  int64  // consumed bytes not yet returned by WINDOW_UPDATE
	peerInitWin  int64  // the peer's SETTINGS_INITIAL_WINDOW_SIZE
	peerMaxFrame int    // the peer's SETTINGS_MAX_FRAME_SIZE
	// peerMaxStreams is the peer's SETTINGS_MAX_CONCURRENT_STREAMS
	// (unlimited until it says): how many streams a client may open.
	peerMaxStreams int
	// peerHeaderTable is the peer's SETTINGS_HEADER_TABLE_SIZE, the
	// largest dynamic table our encoder may use; henc learns it before
	// the next header block (encodeHeaders).
	peerHeaderTable uint32
	goneAway        bool  // GOAWAY sent or received: no new streams
	draining        bool  // close once the last stream (and handler) ended
	dead            error // set when the connection ended
	// handlers counts a server's stream handlers still running, reset or
	// not: a client resetting streams as fast as it opens them (rapid
	// reset) cannot run more than h2MaxStreams handlers at once.
	handlers int
}

// h2stream is one CONNECT stream. On a server it is the
// http.ResponseWriter and the request Body that Server.serve sees; on a
// client, the two directions of a Conn.
type h2stream struct {
	c      *h2conn
	id     uint32
	ctx    context.Context // server: cancelled when the stream ends
	cancel context.CancelFunc
	cond   sync.Cond   // on c.mu: data, window, state changes
	header http.Header // server: the response header

	// guarded by c.mu
	buf         bytes.Buffer // received, not yet read
	recv        int64        // what the peer may still send
	unacked     int64        // read, not yet returned by WINDOW_UPDATE
	send        int64        // our send window
	remoteEnd   bool         // END_STREAM received
	localEnd    bool         // END_STREAM sent
	err         error        // reset (either way) or connection gone
	wroteHeader bool         // our HEADERS went out (or, server, are due)
	refusal     int          // server: a non-2xx status to send when the handler returns
	status      int          // client: the response's :status, once received

	// Delivery (deliverTo), guarded by c.mu: while sink is set, the read
	// loop writes small DATA payloads to it itself, when nothing is
	// queued and nobody else is writing to it (sinkBusy), and queues the
	// rest in buf for the deliverer.
	sink      copybuf.TryWriter
	sinkCount func(int) // called with the bytes written to sink, if set
	sinkBusy  bool      // the read loop or the deliverer is writing to sink
	sinkErr   error     // a write to sink failed: the deliverer returns it
	delivered int64     // bytes written to sink
	// dropped: what s receives is discarded (dropBufferedLocked: a reset,
	// or a handler that returned), so a deliverer writing a bulk buffer
	// it took stops too.
	dropped bool
	taken   int // bytes of a bulk buffer the deliverer took, not yet written
}

// newH2conn sets up the framing of a handshaken TLS connection tc, whose
// raw connection is wrapped by bc.
func newH2conn(tc net.Conn, bc *writebatch.Conn, set HTTP2Settings, pingInterval, pingTimeout time.Duration, log *slog.Logger) *h2conn {
	c := &h2conn{
		conn: tc, bc: bc, ctx: context.Background(), set: set, log: log,
		pingInterval: pingInterval, pingTimeout: pingTimeout,
		ctlSig:          make(chan struct{}, 1),
		streams:         map[uint32]*h2stream{},
		connSend:        65535,
		connRecv:        int64(set.ConnWindow),
		peerInitWin:     65535,
		peerMaxFrame:    16384,
		peerMaxStreams:  1<<31 - 1,
		peerHeaderTable: 4096,
	}
	c.bw = bufio.NewWriterSize(tc, h2WriteBuf)
	c.fr = http2.NewFramer(c.bw, bufio.NewReaderSize(tc, 64<<10))
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = h2MaxHeaderList
	c.fr.SetMaxReadFrameSize(set.MaxFrameSize)
	c.fr.SetReuseFrames()
	c.henc = hpack.NewEncoder(&c.hbuf)
	return c
}

// writeSettings writes our SETTINGS and opens the connection window to
// its configured size; a client sends the preface first.
func (c *h2conn) writeSettings(fr *http2.Framer, extra ...http2.Setting) error {
	settings := append([]http2.Setting{
		{ID: http2.SettingMaxFrameSize, Val: c.set.MaxFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: h2MaxHeaderList},
		{ID: http2.SettingInitialWindowSize, Val: uint32(c.set.StreamWindow)},
	}, extra...)
	if err := fr.WriteSettings(settings...); err != nil {
		return err
	}
	return fr.WriteWindowUpdate(0, uint32(c.set.ConnWindow)-65535)
}

// loop reads and handles frames until the connection fails, running the
// control goroutine meanwhile.
func (c *h2conn) loop() error {
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
			if err := st.Valid(); err != nil {
				return err
			}
			c.mu.Lock()
			defer c.mu.Unlock()
			switch st.ID {
			case http2.SettingInitialWindowSize:
				delta := int64(st.Val) - c.peerInitWin
				c.peerInitWin = int64(st.Val)
				for _, s := range c.streams {
					s.send += delta
					if s.send > 1<<31-1 {
						return http2.ConnectionError(http2.ErrCodeFlowControl)
					}
					s.cond.Broadcast()
				}
			case http2.SettingMaxFrameSize:
				c.peerMaxFrame = int(st.Val)
			case http2.SettingMaxConcurrentStreams:
				c.peerMaxStreams = int(min(st.Val, 1<<31-1))
			case http2.SettingHeaderTableSize:
				c.peerHeaderTable = st.Val
			}
			return nil
		})
		if err != nil {
			return err
		}
		c.queue(func(fr *http2.Framer) error { return fr.WriteSettingsAck() })
	case *http2.MetaHeadersFrame:
		if c.s != nil {
			return c.onRequestHeaders(f)
		}
		return c.onResponseHeaders(f)
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
			err := fmt.Errorf("%w (%v)", errStreamReset, f.ErrCode)
			if f.ErrCode == http2.ErrCodeRefusedStream {
				err = fmt.Errorf("%w (%v)", errRefusedStream, f.ErrCode)
			}
			c.resetLocked(s, 0, err, false)
		}
		c.mu.Unlock()
	case *http2.PingFrame:
		if !f.IsAck() {
			data := f.Data
			c.queue(func(fr *http2.Framer) error { return fr.WritePing(true, data) })
		}
	case *http2.GoAwayFrame:
		c.onGoAway(f)
	case *http2.PushPromiseFrame:
		// A server never sends one to a server; a client said
		// SETTINGS_ENABLE_PUSH 0.
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	// PRIORITY and unknown frames are ignored, as RFC 9113 allows.
	return nil
}

// onGoAway takes the peer's GOAWAY: no new stream on this connection.
// On a client, streams above its last stream ID were not processed and
// end as refused (the caller may retry them elsewhere), the others go on,
// and the connection closes after the last of them.
func (c *h2conn) onGoAway(f *http2.GoAwayFrame) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.goneAway = true
	if c.s != nil {
		return
	}
	c.draining = true
	for id, s := range c.streams {
		if id > f.LastStreamID {
			c.resetLocked(s, 0, fmt.Errorf("%w: GOAWAY (%v), last stream %d", errRefusedStream, f.ErrCode, f.LastStreamID), false)
		}
	}
	c.closeIfDrainedLocked()
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
		c.resetLocked(s, http2.ErrCodeFlowControl, errors.New("hbone: peer overran the stream window"), true)
		c.returnConnLocked(n)
		return nil
	}
	data := f.Data()
	if pad := n - int64(len(data)); pad > 0 {
		c.returnConnLocked(pad)
		s.unacked += pad
	}
	wake := s.sink == nil
	if s.sink != nil && !s.sinkBusy && s.buf.Len() == 0 && s.sinkErr == nil && len(data) > 0 && len(data) <= h2DirectMax {
		data = c.writeDirectLocked(s, data)
	}
	if len(data) > 0 {
		if s.err != nil || s.sinkErr != nil {
			// Reset while we wrote, or the destination failed: nobody
			// will take the rest.
			c.returnConnLocked(int64(len(data)))
		} else {
			s.bufferLocked(data)
		}
		wake = true
	}
	if f.StreamEnded() && !s.remoteEnd {
		s.remoteEnd = true
		c.maybeForgetLocked(s)
		wake = true
	}
	if wake {
		s.cond.Broadcast()
	}
	return nil
}

// h2DirectMax is the largest DATA payload the read loop writes to a
// stream's destination itself: a small message then costs no goroutine
// wake-up, while bulk data goes through the stream's deliverer so that
// reading the connection and writing the destinations overlap.
const h2DirectMax = copybuf.Small

// writeDirectLocked writes data to s.sink from the read loop without
// blocking, off c.mu (other streams go on meanwhile), and returns what
// the destination did not take, for the caller to queue. The bytes
// written are consumed: their window goes back to the peer, as when a
// reader takes them.
func (c *h2conn) writeDirectLocked(s *h2stream, data []byte) []byte {
	s.sinkBusy = true
	sink := s.sink
	c.mu.Unlock()
	n, err := sink.TryWrite(data)
	c.mu.Lock()
	s.sinkBusy = false
	if n > 0 {
		c.deliveredLocked(s, n)
	}
	if err != nil {
		s.sinkErr = err
	}
	// The deliverer waits while sinkBusy; whatever happened to the
	// stream meanwhile (a reset, the connection's teardown, queued data,
	// this error) was broadcast while it could not act on it, so wake it
	// again now. Not otherwise: an idle deliverer woken per message is
	// the wake-up the direct write exists to save.
	if s.sinkErr != nil || s.err != nil || s.remoteEnd || s.buf.Len() > 0 {
		s.cond.Broadcast()
	}
	return data[n:]
}

// deliveredLocked accounts n bytes written to s.sink.
func (c *h2conn) deliveredLocked(s *h2stream, n int) {
	s.delivered += int64(n)
	if s.sinkCount != nil {
		s.sinkCount(n)
	}
	c.consumedLocked(s, int64(n))
}

// consumedLocked returns the window of n bytes of s that were taken
// (read, or written to its destination): the stream's once half of it
// is due (nothing when the peer finished sending), the connection's by
// quarters.
func (c *h2conn) consumedLocked(s *h2stream, n int64) {
	if !s.remoteEnd && s.err == nil {
		s.unacked += n
		if s.unacked >= int64(c.set.StreamWindow)/2 {
			inc := s.unacked
			s.unacked = 0
			s.recv += inc
			id := s.id
			c.queue(func(fr *http2.Framer) error { return fr.WriteWindowUpdate(id, uint32(inc)) })
		}
	}
	c.returnConnLocked(n)
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

// resetLocked ends s with err; with send it also tells the peer
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
	if s.cancel != nil {
		s.cancel()
	}
	if send {
		id := s.id
		c.queue(func(fr *http2.Framer) error { return fr.WriteRSTStream(id, code) })
	}
	c.closeIfDrainedLocked()
}

// dropBufferedLocked discards what s received and nobody will read, and
// gives it back to the connection window: otherwise every reset stream
// with unread data would shrink the window of the whole connection.
func (c *h2conn) dropBufferedLocked(s *h2stream) {
	s.dropped = true
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

// closeIfDrainedLocked closes a draining connection (GOAWAY sent by a
// server, received by a client) with no stream and no handler left,
// after writing what is queued. Off the lock: the write may wait for the
// network.
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

// goAway tells the peer why the connection ends; best effort, the
// connection is closing anyway.
func (c *h2conn) goAway(code http2.ErrCode) {
	c.mu.Lock()
	last := c.maxID
	if c.s == nil {
		last = 0 // a client processes no stream the server opened
	}
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
		// A peer that makes us answer (PING, SETTINGS, resets)
		// faster than it reads: drop it, as x/net/http2 does.
		c.conn.Close()
		return
	}
	select {
	case c.ctlSig <- struct{}{}:
	default:
	}
}

// control writes queued frames and pings a silent peer, until done.
func (c *h2conn) control(done <-chan struct{}) {
	tick := time.NewTicker(c.pingInterval)
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
			if time.Since(pingSent) > c.pingTimeout {
				c.log.Info("hbone peer stopped answering pings; closing", "peer", c.conn.RemoteAddr())
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
		c.bc.Hold()
		err = c.bw.Flush()
		if ferr := c.bc.Flush(); err == nil {
			err = ferr
		}
	}
	if err != nil {
		c.conn.Close()
	}
	return err
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

// teardown ends every stream when the connection is gone.
func (c *h2conn) teardown(err error) {
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	c.mu.Lock()
	c.dead = fmt.Errorf("%w: %w", errConnEnded, err)
	for _, s := range c.streams {
		if s.err == nil {
			s.err = c.dead
		}
		s.remoteEnd, s.localEnd = true, true
		s.cond.Broadcast()
		if s.cancel != nil {
			s.cancel()
		}
	}
	clear(c.streams)
	c.mu.Unlock()
	c.conn.Close()
}

// encodeHeaders HPACK-encodes fields (name, value pairs) into c.hbuf
// within the dynamic table size the peer allows, and returns the
// peer's largest frame size. The caller holds wmu.
func (c *h2conn) encodeHeaders(fields ...string) int {
	c.mu.Lock()
	table, maxFrame := c.peerHeaderTable, c.peerMaxFrame
	c.mu.Unlock()
	// The encoder never grows its table beyond 4096 (our decoder's
	// default on the other side); a smaller limit is announced in the
	// next block.
	c.henc.SetMaxDynamicTableSizeLimit(min(table, 4096))
	c.hbuf.Reset()
	for i := 0; i+1 < len(fields); i += 2 {
		c.henc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	return maxFrame
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

// Write sends p as DATA frames as flow control allows (a server's
// response body, a client's request body). On a server it sends the 200
// first if needed; a client's HEADERS went out when the stream opened.
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
		if err := c.write(func(*http2.Framer) error { return c.writeDataLocked(s.id, chunk) }); err != nil {
			return total, err
		}
		total += int(n)
		p = p[n:]
	}
	return total, nil
}

// writeDataLocked writes a DATA frame of p on stream id, without
// END_STREAM, to c.bw; the caller holds c.wmu (c.write). The Framer's
// WriteData builds each frame in a buffer of its own, a copy of every
// byte sent; here the header goes into c.bw and so does the payload, which
// bufio copies only to fill its buffer (one TLS record, h2WriteBuf) and
// hands on uncopied after that.
func (c *h2conn) writeDataLocked(id uint32, p []byte) error {
	hdr := [9]byte{byte(len(p) >> 16), byte(len(p) >> 8), byte(len(p)), byte(http2.FrameData), 0,
		byte(id >> 24), byte(id >> 16), byte(id >> 8), byte(id)}
	if _, err := c.bw.Write(hdr[:]); err != nil {
		return err
	}
	_, err := c.bw.Write(p)
	return err
}

// CloseWrite ends our direction with END_STREAM; data from the peer
// still arrives.
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

// Reset ends both directions with RST_STREAM CANCEL, unless both already
// ended, and writes it before returning.
func (s *h2stream) Reset(err error) {
	s.resetAsync(err)
	s.c.flushQueued()
}

// resetAsync is Reset leaving the RST_STREAM to the control goroutine:
// it never waits for the network.
func (s *h2stream) resetAsync(err error) {
	c := s.c
	c.mu.Lock()
	if s.err == nil && !(s.localEnd && s.remoteEnd) {
		c.resetLocked(s, http2.ErrCodeCancel, err, true)
	}
	c.mu.Unlock()
}

// Read reads what the peer sent on the stream; io.EOF after its
// END_STREAM.
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
	n := s.readBufLocked(p)
	c.consumedLocked(s, int64(n))
	c.mu.Unlock()
	return n, nil
}

// bulkBufs holds the receive buffers of bulk transfers between their
// fills. A drained buffer larger than bulkBufMin leaves its stream, so an
// idle stream pins no memory; dropped instead of reused, every refill grew
// a new one from nothing, zeroed, up to the stream's window: a sixth of
// the proxy's CPU in a one-stream transfer (docs/BENCHMARKS.md, "One
// stream: where the proxy's CPU goes"). A free list, not a sync.Pool: a
// bulk transfer allocates enough for the collector to empty a pool every
// few fills. At most bulkBufSlots buffers of at most bulkBufMax wait in
// it, bounding what it pins.
var bulkBufs = make(chan []byte, bulkBufSlots)

const (
	bulkBufMin = 256 << 10
	// bulkBufMax is twice the default stream window: a buffer grows to
	// about that while the window's worth waits in it. Together with
	// bulkBufSlots: at most 16 MiB kept for the next bulk stream.
	bulkBufMax   = 8 << 20
	bulkBufSlots = 2
	// bulkData is a DATA payload large enough that buffering it into an
	// empty stream starts from a pooled bulk buffer.
	bulkData = 16 << 10
)

// bufferLocked appends data to what s received. The caller holds c.mu.
func (s *h2stream) bufferLocked(data []byte) {
	if s.buf.Cap() == 0 && len(data) >= bulkData {
		select {
		case b := <-bulkBufs:
			s.buf = *bytes.NewBuffer(b)
		default:
		}
	}
	s.buf.Write(data)
}

// readBufLocked reads what s received into p and returns how much; a
// drained bulk buffer goes back to bulkBufs. The caller holds c.mu.
func (s *h2stream) readBufLocked(p []byte) int {
	n, _ := s.buf.Read(p)
	if s.buf.Len() == 0 && s.buf.Cap() > bulkBufMin {
		s.buf.Reset()
		putBulk(s.buf.Bytes()) // empty, with the whole capacity
		s.buf = bytes.Buffer{}
	}
	return n
}

// takeBulkLocked detaches what s received, if it sits in a bulk buffer,
// and returns it (the caller hands the buffer to putBulk once written);
// nil if the buffer is a small one. The read loop's next data starts a
// new buffer (from bulkBufs when large). The caller holds c.mu.
func (s *h2stream) takeBulkLocked() []byte {
	if s.buf.Cap() <= bulkBufMin {
		return nil
	}
	data := s.buf.Bytes()
	s.buf = bytes.Buffer{}
	return data
}

// putBulk keeps b's array for the next bulk stream if bulkBufs has room
// and it is a bulk buffer no larger than bulkBufMax.
func putBulk(b []byte) {
	if cap(b) <= bulkBufMin || cap(b) > bulkBufMax {
		return
	}
	select {
	case bulkBufs <- b[:0]:
	default:
	}
}

// deliverTo copies what the peer sends on s to dst until the peer's
// END_STREAM (then it returns nil) or an error, calling count, if set,
// with the bytes as they are written; it returns the bytes written.
// While it runs, the read loop writes small DATA payloads to dst itself
// when dst takes them at once, so a message costs no wake-up of this
// goroutine; what dst does not take at once is queued on the stream
// (bounded by the stream's window, which is only returned once the
// bytes are written) and written here, with blocking writes, so a slow
// destination holds back its own stream and no other.
func (s *h2stream) deliverTo(dst copybuf.TryWriter, count func(int)) (int64, error) {
	c := s.c
	var b copybuf.Buffer
	defer b.Release()
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.sink != nil {
		return 0, errors.New("hbone: stream already delivered")
	}
	s.sink, s.sinkCount = dst, count
	defer func() { s.sink, s.sinkCount = nil, nil }()
	for {
		for s.sinkBusy || (s.buf.Len() == 0 && !s.remoteEnd && s.err == nil && s.sinkErr == nil) {
			s.cond.Wait()
		}
		if s.sinkErr != nil {
			return s.delivered, s.sinkErr
		}
		if s.buf.Len() == 0 {
			return s.delivered, s.err // nil at the end of the stream
		}
		// Queued data: write it here, off the lock; the read loop
		// queues behind it meanwhile, keeping the order. A bulk buffer
		// is taken whole and written from where it is, in pieces of
		// copybuf.Large (each returns its window once written), while
		// the read loop fills another: no copy. A small one is copied
		// out, so that its stream keeps no buffer.
		if bulk := s.takeBulkLocked(); bulk != nil {
			off := 0
			for off < len(bulk) && s.sinkErr == nil && !s.dropped {
				s.taken = len(bulk) - off
				off += c.writeSinkLocked(s, dst, bulk[off:min(len(bulk), off+copybuf.Large)])
			}
			s.taken = 0
			if off < len(bulk) {
				// The destination failed or the stream's data was
				// dropped (reset): no reader will take the rest.
				c.returnConnLocked(int64(len(bulk) - off))
			}
			putBulk(bulk)
			continue
		}
		buf := b.Bytes()
		n := s.readBufLocked(buf)
		c.writeSinkLocked(s, dst, buf[:n])
		b.Filled(n)
	}
}

// writeSinkLocked writes p to dst, the stream's sink, off c.mu with
// sinkBusy set (the read loop queues meanwhile), and accounts it: what
// was written is delivered, and after a failure (recorded in sinkErr) the
// rest goes back to the connection window, as no reader will take it. It
// returns len(p): every byte is either written or given back.
func (c *h2conn) writeSinkLocked(s *h2stream, dst copybuf.TryWriter, p []byte) int {
	s.sinkBusy = true
	c.mu.Unlock()
	w, err := dst.Write(p)
	c.mu.Lock()
	s.sinkBusy = false
	if w > 0 {
		c.deliveredLocked(s, w)
	}
	if err == nil && w < len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		s.sinkErr = err
		c.returnConnLocked(int64(len(p) - w))
	}
	return len(p)
}
