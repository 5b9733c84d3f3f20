package hbone

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambpf/ambpf/pkg/copybuf"
)

// Conn is a client tunnel: one HTTP/2 or HTTP/3 CONNECT stream seen as a
// net.Conn.
// Close (or CloseWrite) ends the stream; callers must Close every Conn to
// free its slot in the connection pool.
//
// Deadlines apply to Read and Write calls that start after they are set; a
// call already blocked without a deadline is unblocked by Close, not by a
// later deadline.
type Conn struct {
	w      io.WriteCloser // request body: what we send; Close ends it
	r      io.ReadCloser  // response body: what we receive
	local  net.Addr
	remote net.Addr
	peer   Peer
	// done ends the stream (Close) and releases it; clean tells that
	// both directions ended without error (we sent our end, we read the
	// peer's), so whatever the transport still has to send must not be
	// cut off.
	done func(clean bool)
	once sync.Once

	wclosed atomic.Bool // CloseWrite was called
	reof    atomic.Bool // Read returned io.EOF

	transport string // TransportH2 or TransportH3
	fellBack  bool   // HTTP/3 was wanted, HTTP/2 is used

	rd, wd deadline

	rmu      sync.Mutex
	rpending chan ioResult // a read that outlived its deadline
	rleft    []byte        // data read in the background not yet returned
	rerr     error         // error that came with rleft

	wmu      sync.Mutex
	wpending chan ioResult // a write that outlived its deadline
}

type ioResult struct {
	buf []byte
	n   int
	err error
}

var _ net.Conn = (*Conn)(nil)

func newConn(w io.WriteCloser, r io.ReadCloser, local, remote netip.AddrPort, peer Peer, transport string, done func(clean bool)) *Conn {
	return &Conn{
		w: w, r: r, peer: peer, done: done, transport: transport,
		local:  net.TCPAddrFromAddrPort(local),
		remote: net.TCPAddrFromAddrPort(remote),
	}
}

// Read reads data the upstream sent. It returns io.EOF once the server
// ended the stream.
func (c *Conn) Read(p []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	if len(c.rleft) > 0 {
		n := copy(p, c.rleft)
		c.rleft = c.rleft[n:]
		return n, nil
	}
	if c.rerr != nil {
		return 0, c.rerr
	}
	expired, armed := c.rd.state()
	if c.rpending == nil {
		if !armed {
			n, err := c.r.Read(p) // the fast path: no deadline, no goroutine
			if err == io.EOF {
				c.reof.Store(true)
			}
			return n, err
		}
		if expired {
			return 0, os.ErrDeadlineExceeded
		}
		// The background read needs its own buffer: p belongs to the
		// caller again once we return on a deadline.
		buf := make([]byte, len(p))
		ch := make(chan ioResult, 1)
		go func() {
			n, err := c.r.Read(buf)
			ch <- ioResult{buf, n, err}
		}()
		c.rpending = ch
	}
	select {
	case res := <-c.rpending:
		c.rpending = nil
		if res.err == io.EOF {
			c.reof.Store(true)
		}
		n := copy(p, res.buf[:res.n])
		c.rleft = res.buf[n:res.n]
		if res.err != nil && len(c.rleft) > 0 {
			c.rerr = res.err
			return n, nil
		}
		return n, res.err
	case <-c.rd.wait():
		return 0, os.ErrDeadlineExceeded
	}
}

// DeliverTo copies what the upstream sends to dst until the server ends
// the stream (then it returns nil) or an error, calling count, if set,
// with the bytes as they are written, and returns the bytes written.
// Over HTTP/2, to a socket (or a copybuf.TryWriter), with no read
// deadline set, the connection's read loop writes small messages to dst
// itself, so a message costs no goroutine wake-up; what dst does not
// take at once waits on the stream, within its flow-control window, and
// is written from here. Otherwise it copies as io.Copy would. A read
// deadline set while it runs does not apply to it; Close ends it.
func (c *Conn) DeliverTo(dst io.Writer, count func(int)) (int64, error) {
	s, ok := c.r.(*h2stream)
	tw := copybuf.Direct(dst)
	c.rmu.Lock()
	_, armed := c.rd.state()
	if ok && tw != nil && !armed && c.rpending == nil && len(c.rleft) == 0 && c.rerr == nil {
		defer c.rmu.Unlock() // Read waits: the stream has one reader
		n, err := s.deliverTo(tw, count)
		if err == nil {
			c.reof.Store(true)
		}
		return n, err
	}
	c.rmu.Unlock()
	n, _, err := copybuf.Copy(dst, c, count, false)
	return n, err
}

// Write sends p to the upstream. It blocks while flow control holds
// the data back. After a Write returns os.ErrDeadlineExceeded its data may
// still be sent; treat the connection as broken.
func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.wpending != nil {
		select {
		case res := <-c.wpending:
			c.wpending = nil
			if res.err != nil {
				return 0, res.err
			}
		case <-c.wd.wait():
			return 0, os.ErrDeadlineExceeded
		}
	}
	expired, armed := c.wd.state()
	if !armed {
		return c.w.Write(p)
	}
	if expired {
		return 0, os.ErrDeadlineExceeded
	}
	buf := bytes.Clone(p)
	ch := make(chan ioResult, 1)
	go func() {
		n, err := c.w.Write(buf)
		ch <- ioResult{nil, n, err}
	}()
	select {
	case res := <-ch:
		return res.n, res.err
	case <-c.wd.wait():
		c.wpending = ch
		return 0, os.ErrDeadlineExceeded
	}
}

// CloseWrite ends the stream in the sending direction (END_STREAM, FIN): the
// upstream application reads EOF while data can still arrive from it.
func (c *Conn) CloseWrite() error {
	c.wclosed.Store(true)
	return c.w.Close()
}

// Close ends both directions and releases the pooled connection's slot.
// After a clean end (CloseWrite, then EOF read) the data written before
// CloseWrite is still delivered; otherwise the stream is reset if the
// server has not finished it.
func (c *Conn) Close() error {
	c.once.Do(func() { c.done(c.wclosed.Load() && c.reof.Load()) })
	return nil
}

// LocalAddr is the original client address (Target.SourceAddr).
func (c *Conn) LocalAddr() net.Addr { return c.local }

// RemoteAddr is the original destination (Target.Authority).
func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// Peer is the identity and address of the HBONE server.
func (c *Conn) Peer() Peer { return c.peer }

// Transport is how the tunnel is carried: TransportH2 or TransportH3.
func (c *Conn) Transport() string { return c.transport }

// FellBack reports that the target asked for HTTP/3 and the tunnel runs
// over HTTP/2 because the peer did not answer on UDP (now or recently).
func (c *Conn) FellBack() bool { return c.fellBack }

func (c *Conn) SetDeadline(t time.Time) error {
	c.rd.set(t)
	c.wd.set(t)
	return nil
}

func (c *Conn) SetReadDeadline(t time.Time) error  { c.rd.set(t); return nil }
func (c *Conn) SetWriteDeadline(t time.Time) error { c.wd.set(t); return nil }

// deadline is a settable point in time. wait returns a channel that is
// closed while the deadline is in the past.
type deadline struct {
	mu    sync.Mutex
	at    time.Time
	timer *time.Timer
	gen   uint64 // bumped by set, so a stale timer cannot close a newer channel
	ch    chan struct{}
}

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	d.at = t
	d.gen++
	if d.ch == nil || isClosed(d.ch) {
		d.ch = make(chan struct{})
	}
	if t.IsZero() {
		return
	}
	if dur := time.Until(t); dur > 0 {
		gen := d.gen
		d.timer = time.AfterFunc(dur, func() {
			d.mu.Lock()
			defer d.mu.Unlock()
			if d.gen == gen && !isClosed(d.ch) {
				close(d.ch)
			}
		})
		return
	}
	close(d.ch)
}

// state reports whether a deadline is set and whether it has passed.
func (d *deadline) state() (expired, armed bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.at.IsZero() {
		return false, false
	}
	return !time.Now().Before(d.at), true
}

func (d *deadline) wait() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ch == nil {
		d.ch = make(chan struct{})
	}
	return d.ch
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
