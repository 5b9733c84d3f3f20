package hbone

import (
	"errors"
	"net"
)

// HandshakeGate admits one TLS handshake: it returns the release to call
// when the handshake is over, or false to refuse it. It lets the caller
// bound the handshakes in flight (the proxy does so per pod), so that a
// peer opening connections faster than they complete cannot make the
// process hold an unbounded number of half-done handshakes.
type HandshakeGate func() (release func(), ok bool)

// ErrHandshakeLimit is the dial error when the client's HandshakeGate
// refused a new connection.
var ErrHandshakeLimit = errors.New("hbone: too many TLS handshakes in flight")

// enter runs the gate; a nil gate admits everything.
func (g HandshakeGate) enter() (func(), bool) {
	if g == nil {
		return func() {}, true
	}
	return g()
}

// resetClose closes c with a reset (SO_LINGER 0) when it is TCP: a
// refused connection leaves no TIME_WAIT and costs its peer no timeout.
func resetClose(c net.Conn) {
	if l, ok := c.(interface{ SetLinger(int) error }); ok {
		l.SetLinger(0)
	}
	c.Close()
}
