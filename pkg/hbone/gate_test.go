package hbone

import (
	"errors"
	"net"
	"sync/atomic"
	"testing"
)

// oneAtATime is a HandshakeGate admitting a single handshake; it counts
// refusals.
func oneAtATime(refused *atomic.Int32) HandshakeGate {
	var held atomic.Int32
	return func() (func(), bool) {
		if held.Add(1) > 1 {
			held.Add(-1)
			refused.Add(1)
			return nil, false
		}
		return func() { held.Add(-1) }, true
	}
}

// TestServerHandshakeGate: while a peer holds the server's only
// handshake slot (connected, no ClientHello), a mesh client is reset
// before any handshake; once the peer goes, the client gets through.
func TestServerHandshakeGate(t *testing.T) {
	m := newMesh(t)
	var refused atomic.Int32
	srv := startServer(t, m, func(c *ServerConfig) { c.HandshakeGate = oneAtATime(&refused) })
	cl := newClient(t, m, clientID, nil)
	dst := echoServer(t)

	idle, err := net.Dial("tcp", srv.addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	eventually(t, "the idle peer accepted", func() bool { return srv.ln.accepted.Load() == 1 })
	if c, err := cl.Dial(ctxTimeout(t), target(srv, dst)); err == nil {
		c.Close()
		t.Fatal("dial while the handshake slot is held: want it refused")
	}
	if refused.Load() == 0 {
		t.Error("the gate refused nothing")
	}
	idle.Close()
	eventually(t, "a dial after the slot was released", func() bool {
		c, err := cl.Dial(ctxTimeout(t), target(srv, dst))
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}

// TestClientHandshakeGate: a client whose gate refuses fails the dial
// with ErrHandshakeLimit and never connects.
func TestClientHandshakeGate(t *testing.T) {
	m := newMesh(t)
	srv := startServer(t, m, nil)
	cl := newClient(t, m, clientID, func(c *ClientConfig) {
		c.HandshakeGate = func() (func(), bool) { return nil, false }
	})
	_, err := cl.Dial(ctxTimeout(t), target(srv, echoServer(t)))
	if !errors.Is(err, ErrHandshakeLimit) {
		t.Fatalf("dial: %v, want ErrHandshakeLimit", err)
	}
	if n := srv.ln.accepted.Load(); n != 0 {
		t.Errorf("server accepted %d connections, want 0", n)
	}
}
