package hbone

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"
)

// The HTTP/2 read loop writes a stream's small DATA payloads to its
// destination itself (h2stream.deliverTo). These tests hold a
// destination that does not read, on either end, and check that only
// its own stream waits: another stream on the same connection keeps
// flowing, and once the destination reads, everything arrives in order.

// stalledLen is what the stalled stream carries: beyond the 4 MiB
// stream window and what the sockets of a destination that does not
// read absorb (its receive buffer does not grow while nothing reads,
// the send buffer grows to tcp_wmem's 4 MiB at most), so the sender ends
// up blocked on flow control with data queued on the receiving stream.
const stalledLen = 14 << 20

// messageLen is the size of the messages on the stalled stream: DATA
// frames the read loop may write directly (h2DirectMax).
const messageLen = 16 << 10

// shortReads is an upstream read in messageLen pieces, so that the
// server sends DATA frames of that size.
type shortReads struct{ net.Conn }

func (c shortReads) Read(p []byte) (int, error) { return c.Conn.Read(p[:min(len(p), messageLen)]) }

// streamState reads a stream's queued bytes (in its buffer, or in a bulk
// buffer its deliverer took) and send window.
func streamState(s *h2stream) (queued int, send int64) {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.buf.Len() + s.taken, s.send
}

// serverStream is the server's stream with the given ID.
func serverStream(srv *testServer, id uint32) *h2stream {
	srv.mu.Lock()
	defer srv.mu.Unlock()
	for c := range srv.h2conns {
		c.mu.Lock()
		s := c.streams[id]
		c.mu.Unlock()
		if s != nil {
			return s
		}
	}
	return nil
}

func clientStream(c *Conn) *h2stream { return c.r.(*h2stream) }

// echoRoundTrips checks that c still echoes: small messages one at a
// time, then 1 MiB at once, within a few seconds.
func echoRoundTrips(t *testing.T, c *Conn) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	msg, buf := make([]byte, 64), make([]byte, 64)
	for i := range 100 {
		msg[0] = byte(i)
		if _, err := c.Write(msg); err != nil {
			t.Fatalf("round trip %d on the other stream: write: %v", i, err)
		}
		if _, err := io.ReadFull(c, buf); err != nil || !bytes.Equal(buf, msg) {
			t.Fatalf("round trip %d on the other stream: read %v, %v", i, buf[:4], err)
		}
	}
	bulk := make([]byte, 1<<20)
	rand.Read(bulk)
	errc := make(chan error, 1)
	go func() { _, err := c.Write(bulk); errc <- err }()
	got := make([]byte, len(bulk))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, bulk) {
		t.Fatalf("1 MiB echo on the other stream: %v (equal %v)", err, bytes.Equal(got, bulk))
	}
	if err := <-errc; err != nil {
		t.Fatalf("1 MiB echo on the other stream: write: %v", err)
	}
}

// stalledApp serves one connection that reads nothing until unstall is
// called, then reads to EOF and sends what it read on got.
func stalledApp(t *testing.T) (addr netip.AddrPort, unstall func(), got <-chan []byte) {
	release := make(chan struct{})
	read := make(chan []byte, 1)
	addr = serveTCP(t, func(c net.Conn) {
		<-release
		b, _ := io.ReadAll(c)
		read <- b
	})
	var once sync.Once
	unstall = func() { once.Do(func() { close(release) }) }
	t.Cleanup(unstall) // before serveTCP's cleanup waits for the handler
	return addr, unstall, read
}

// otherStreamFlows waits until the stalled tunnel a has data queued at
// its receiving end (the server's stream, or with atClient the
// client's) and its sender out of window, then checks that a second
// tunnel on the same connection still echoes.
func otherStreamFlows(t *testing.T, f *fixture, a *Conn, atClient bool) {
	t.Helper()
	cs := clientStream(a)
	eventually(t, "the stalled stream's data queued and its sender out of window", func() bool {
		ss := serverStream(f.srv, cs.id)
		if ss == nil {
			return false
		}
		receiver, sender := ss, cs
		if atClient {
			receiver, sender = cs, ss
		}
		queued, _ := streamState(receiver)
		_, window := streamState(sender)
		return queued > 0 && window <= 0
	})
	b := f.dial(t, f.echo)
	if clientStream(b).c != cs.c {
		t.Fatal("the second tunnel is on another connection; the test needs one")
	}
	echoRoundTrips(t, b)
}

// receivedInOrder waits for what a destination app read (sent on got)
// and compares it with data.
func receivedInOrder(t *testing.T, got <-chan []byte, data []byte) {
	t.Helper()
	select {
	case b := <-got:
		if !bytes.Equal(b, data) {
			t.Fatalf("the destination read %d bytes, want the %d sent, in order", len(b), len(data))
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the destination never got the stalled stream's data")
	}
}

// TestSlowUpstreamHoldsOnlyItsStream: on the server, the app behind one
// stream does not read; the client's data for it queues on that stream
// until flow control stops the client, while a second stream on the same
// connection echoes. When the app reads, it gets every byte in order.
func TestSlowUpstreamHoldsOnlyItsStream(t *testing.T) {
	f := newFixture(t, overH2, nil, nil)
	stalled, unstall, got := stalledApp(t)
	a := f.dial(t, stalled)
	data := make([]byte, stalledLen)
	rand.Read(data)
	wrote := make(chan error, 1)
	go func() {
		// One DATA frame per write, each small enough for the read
		// loop to write directly while the app's socket takes it.
		for p := data; len(p) > 0; p = p[messageLen:] {
			if _, err := a.Write(p[:messageLen]); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- a.CloseWrite()
	}()
	otherStreamFlows(t, f, a, false)

	unstall()
	receivedInOrder(t, got, data)
	if err := <-wrote; err != nil {
		t.Fatalf("write on the stalled stream: %v", err)
	}
}

// TestSlowClientDestinationHoldsOnlyItsStream: on the client, one
// tunnel's destination socket does not read (DeliverTo); what the
// upstream sends queues on that stream until flow control stops the
// server, while a second stream on the same connection echoes. When the
// destination reads, it gets every byte in order and DeliverTo returns
// at the end of the stream.
func TestSlowClientDestinationHoldsOnlyItsStream(t *testing.T) {
	f := newFixture(t, overH2, func(c *ServerConfig) {
		c.DialUpstream = func(ctx context.Context, r Request) (net.Conn, error) {
			up, err := dialTCP(ctx, r)
			if err != nil {
				return nil, err
			}
			return shortReads{up}, nil
		}
	}, nil)
	data := make([]byte, stalledLen)
	rand.Read(data)
	source := serveTCP(t, func(c net.Conn) {
		c.Write(data)
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c)
	})
	a := f.dial(t, source)
	stalled, unstall, got := stalledApp(t)
	dst, err := net.Dial("tcp", stalled.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dst.Close() })

	type result struct {
		n   int64
		err error
	}
	delivered := make(chan result, 1)
	go func() {
		n, err := a.DeliverTo(dst, nil)
		dst.(*net.TCPConn).CloseWrite()
		delivered <- result{n, err}
	}()
	otherStreamFlows(t, f, a, true)

	unstall()
	receivedInOrder(t, got, data)
	if r := <-delivered; r.err != nil || r.n != stalledLen {
		t.Fatalf("DeliverTo = %d, %v; want %d, nil at the end of the stream", r.n, r.err, stalledLen)
	}
}

// gateSink is a destination whose first direct write (TryWrite, as the
// read loop writes) waits until released, so that a test can act on the
// stream while the read loop is inside that write.
type gateSink struct {
	entered, release chan struct{}
	once             sync.Once
}

func (g *gateSink) TryWrite(p []byte) (int, error) {
	g.once.Do(func() { close(g.entered); <-g.release })
	return len(p), nil
}

func (g *gateSink) Write(p []byte) (int, error) { return len(p), nil }

// TestResetDuringDirectWrite resets a stream (the client closes it) while
// the read loop is inside a direct write to the stream's destination.
// The deliverer waits while that write runs and the reset's wake-up
// comes meanwhile; once the write is done it must still see the reset
// and return, not wait for good (a lost wake-up hung the server's Close
// in TestServerClose once).
func TestResetDuringDirectWrite(t *testing.T) {
	f := newFixture(t, overH2, nil, nil)
	c := f.dial(t, f.echo)
	s := clientStream(c)
	g := &gateSink{entered: make(chan struct{}), release: make(chan struct{})}
	done := make(chan error, 1)
	go func() { _, err := c.DeliverTo(g, nil); done <- err }()
	eventually(t, "the deliverer waiting on the stream", func() bool {
		s.c.mu.Lock()
		defer s.c.mu.Unlock()
		return s.sink != nil
	})
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the echo never reached the destination's direct write")
	}
	c.Close()
	close(g.release)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the deliverer did not return after the stream was reset during a direct write")
	}
}

// TestBulkTransferReusesReceiveBuffers: a long one-way transfer through an
// HBONE/HTTP/2 tunnel allocates much less than it moves. The receive
// buffer of a bulk stream was dropped at every drain and grown again from
// nothing at the next fill (zeroed, up to the stream's window): more than
// twice the bytes moved were allocated, which cost a sixth of the proxy's
// CPU. Memory is counted, not time: TotalAlloc over the transfer, which
// includes both ends, TLS and the test's own writer.
func TestBulkTransferReusesReceiveBuffers(t *testing.T) {
	const total = 64 << 20
	m := newMesh(t)
	done := make(chan int64, 1)
	sink := serveTCP(t, func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		done <- n
		c.Write([]byte{1})
	})
	srv := startServer(t, m, nil)
	cl := newClient(t, m, clientID, nil)
	c, err := cl.Dial(ctxTimeout(t), target(srv, sink))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64<<10)
	// Warm up: the connection's own buffers and the pool.
	for range 64 {
		if _, err := c.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for sent := 0; sent < total; sent += len(buf) {
		if _, err := c.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.(*Conn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n := <-done; n != total+64*int64(len(buf)) {
		t.Fatalf("the sink got %d bytes, want %d", n, total+64*len(buf))
	}
	runtime.ReadMemStats(&after)
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > total/2 {
		t.Errorf("moving %d MiB allocated %d MiB: the receive buffers are not reused", total>>20, alloc>>20)
	} else {
		t.Logf("moving %d MiB allocated %.1f MiB", total>>20, float64(alloc)/(1<<20))
	}
}

// TestResetDuringBulkDeliveryReturnsWindow: the client's deliverer is
// writing a bulk buffer it took whole (no copy) to a destination that
// does not read when the tunnel is closed, which resets the stream. Once
// that write ends, the rest of the buffer is dropped, and every byte of
// it goes back to the connection window: a reset stream leaves the
// connection's window whole.
func TestResetDuringBulkDeliveryReturnsWindow(t *testing.T) {
	f := newFixture(t, overH2, nil, nil)
	data := make([]byte, stalledLen)
	source := serveTCP(t, func(c net.Conn) {
		c.Write(data)
		io.Copy(io.Discard, c)
	})
	a := f.dial(t, source)
	stalled, unstall, _ := stalledApp(t)
	dst, err := net.Dial("tcp", stalled.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dst.Close() })
	delivered := make(chan error, 1)
	go func() {
		_, err := a.DeliverTo(dst, nil)
		delivered <- err
	}()
	cs := clientStream(a)
	c := cs.c
	eventually(t, "the deliverer blocked on the destination with its stream's window used up", func() bool {
		ss := serverStream(f.srv, cs.id)
		if ss == nil {
			return false
		}
		_, window := streamState(ss)
		c.mu.Lock()
		busy := cs.sinkBusy
		c.mu.Unlock()
		return busy && window <= 0
	})
	a.Close()
	unstall()
	select {
	case err := <-delivered:
		if err == nil {
			t.Fatal("DeliverTo returned nil for a reset stream")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("DeliverTo did not return after the reset")
	}
	eventually(t, "the connection window whole again", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.connRecv+c.connUnacked == int64(c.set.ConnWindow)
	})
}
