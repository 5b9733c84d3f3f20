package hbone

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"

	"github.com/ambpf/ambpf/pkg/writebatch"
)

// The HTTP/2 client side of HBONE (h2conn.go has what both ends share):
// a Client's pooled connection opens CONNECT streams, writes their
// request HEADERS itself and waits for the response HEADERS that the
// read loop hands over on the stream.

// startH2Client starts HTTP/2 on a handshaken client TLS connection tc
// (raw connection wrapped by bc): it writes the preface, our SETTINGS
// and the connection window, then reads frames on a goroutine of its
// own until the connection ends.
func startH2Client(tc net.Conn, bc *writebatch.Conn, set HTTP2Settings, pingInterval, pingTimeout time.Duration, log *slog.Logger) (*h2conn, error) {
	c := newH2conn(tc, bc, set, pingInterval, pingTimeout, log)
	c.nextID = 1
	err := c.write(func(fr *http2.Framer) error {
		if _, err := io.WriteString(c.bw, http2.ClientPreface); err != nil {
			return err
		}
		return c.writeSettings(fr, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	})
	if err != nil {
		return nil, fmt.Errorf("write preface: %w", err)
	}
	go func() { c.teardown(c.loop()) }()
	return c, nil
}

// usable reports whether a client connection may take a new stream with
// active streams already handed out: alive, not going away, below the
// server's concurrency limit and limit (the pool's).
func (c *h2conn) usable(active, limit int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dead == nil && !c.goneAway && active < min(limit, c.peerMaxStreams) && c.nextID < 1<<31
}

// closed reports whether the connection ended.
func (c *h2conn) closed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dead != nil
}

// endErr is why the connection ended, or that it is going away.
func (c *h2conn) endErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead != nil {
		return c.dead
	}
	return errors.New("going away")
}

// shutdown ends a client connection: a GOAWAY, then close. The streams
// still open end with it.
func (c *h2conn) shutdown() {
	c.mu.Lock()
	c.goneAway = true
	c.mu.Unlock()
	c.goAway(http2.ErrCodeNo)
	c.conn.Close()
}

// openStream sends a CONNECT to authority with header h and waits for
// the answer until ctx ends. It returns the stream once the server
// answered 2xx; any other status is a *StatusError. A stream the
// server did not process wraps errRefusedStream.
func (c *h2conn) openStream(ctx context.Context, authority string, h http.Header) (*h2stream, error) {
	// name, value pairs, validated before taking a stream ID
	block := []string{":method", http.MethodConnect, ":authority", authority}
	for k, vs := range h {
		name := lowerHeader(k)
		if !httpguts.ValidHeaderFieldName(k) {
			return nil, fmt.Errorf("invalid header name %q", k)
		}
		switch name {
		case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade", "te", "host":
			continue // connection-specific: not in HTTP/2 (RFC 9113 section 8.2.2)
		}
		for _, v := range vs {
			if !httpguts.ValidHeaderFieldValue(v) {
				return nil, fmt.Errorf("invalid value of header %q", k)
			}
			if name == "user-agent" && v == "" {
				continue
			}
			block = append(block, name, v)
		}
	}

	s := &h2stream{c: c, wroteHeader: true}
	s.cond.L = &c.mu
	var refused error
	err := c.write(func(fr *http2.Framer) error {
		// The stream ID is taken under the write lock so that HEADERS
		// go out in the order of their IDs, as RFC 9113 section 5.1.1
		// requires.
		c.mu.Lock()
		switch {
		case c.dead != nil:
			refused = c.dead
		case c.goneAway || c.nextID >= 1<<31:
			refused = fmt.Errorf("%w: connection going away", errRefusedStream)
		}
		if refused != nil {
			c.mu.Unlock()
			return nil
		}
		s.id = c.nextID
		c.nextID += 2
		c.maxID = s.id
		s.recv, s.send = int64(c.set.StreamWindow), c.peerInitWin
		c.streams[s.id] = s
		c.mu.Unlock()

		maxFrame := c.encodeHeaders(block...)
		return writeHeaderBlock(fr, s.id, c.hbuf.Bytes(), false, maxFrame)
	})
	if refused != nil {
		return nil, refused
	}
	if err != nil {
		// The write closed the connection; its read loop ends and
		// gives the stream the reason, often more telling than ours
		// (the server's TLS alert refusing our certificate, which TLS
		// 1.3 delivers after the handshake).
		c.mu.Lock()
		for s.err == nil {
			s.cond.Wait()
		}
		serr := s.err
		c.mu.Unlock()
		return nil, fmt.Errorf("send CONNECT: %w (%v)", serr, err)
	}

	// Wait for the response HEADERS; ctx's end wakes the wait.
	stop := context.AfterFunc(ctx, func() {
		c.mu.Lock()
		s.cond.Broadcast()
		c.mu.Unlock()
	})
	c.mu.Lock()
	for s.status == 0 && s.err == nil && ctx.Err() == nil {
		s.cond.Wait()
	}
	status, serr := s.status, s.err
	c.mu.Unlock()
	stop()
	switch {
	case status == 0 && serr != nil:
		return nil, serr
	case status == 0:
		s.resetAsync(ctx.Err())
		return nil, ctx.Err()
	case status < 200 || status > 299:
		s.resetAsync(errors.New("hbone: CONNECT refused"))
		return nil, &StatusError{Code: status, Status: statusText(status)}
	}
	return s, nil
}

// onResponseHeaders takes a HEADERS frame from the server: the answer
// to a CONNECT, or the end of its stream (trailers).
func (c *h2conn) onResponseHeaders(f *http2.MetaHeadersFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.streams[f.StreamID]
	if s == nil {
		if f.StreamID%2 == 0 || f.StreamID > c.maxID {
			// Servers open no streams (push is off): a protocol error.
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil // a stream we reset or finished
	}
	if s.status == 0 {
		st := f.PseudoValue("status")
		code, err := strconv.Atoi(st)
		if err != nil || len(st) != 3 || f.Truncated {
			c.resetLocked(s, http2.ErrCodeProtocol, fmt.Errorf("hbone: malformed response status %q", st), true)
			return nil
		}
		if code < 200 {
			// Interim (1xx) answers precede the real one.
			if f.StreamEnded() {
				c.resetLocked(s, http2.ErrCodeProtocol, errors.New("hbone: stream ended on an interim response"), true)
			}
			return nil
		}
		s.status = code
	} else if !f.StreamEnded() {
		// Trailers: only an end of stream means anything to a tunnel.
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	if f.StreamEnded() {
		s.remoteEnd = true
		c.maybeForgetLocked(s)
	}
	s.cond.Broadcast()
	return nil
}

// h2ClientBody is the sending side of a client tunnel: Close ends it
// with END_STREAM (Conn.CloseWrite).
type h2ClientBody struct{ *h2stream }

func (b h2ClientBody) Close() error { return b.CloseWrite() }
