// Package writebatch gathers the writes made to a connection between Hold
// and Flush into one write. It sits under a TLS connection, which writes
// one record of at most 16 KiB per call to the connection below: a
// 256 KiB write through TLS becomes sixteen system calls and, with
// TCP_NODELAY, sixteen small segments, where gathered it is one of each.
package writebatch

import (
	"net"
	"sync"
)

// Conn is a net.Conn whose writes between Hold and Flush are gathered;
// outside them (the TLS handshake, alerts) they go straight through. It
// is safe for concurrent use: a write from another goroutine while one
// holds joins the batch, in order.
type Conn struct {
	net.Conn
	mu      sync.Mutex
	holding bool
	buf     []byte
}

// maxKeep is the largest batch buffer kept between batches: a bulk
// transfer's buffer is reused, a one-off burst's is not pinned.
const maxKeep = 1 << 20

// Write gathers p while holding and writes it through otherwise.
func (b *Conn) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.holding {
		b.buf = append(b.buf, p...)
		return len(p), nil
	}
	return b.Conn.Write(p)
}

// Hold starts gathering writes.
func (b *Conn) Hold() {
	b.mu.Lock()
	b.holding = true
	b.mu.Unlock()
}

// Flush writes what was gathered since Hold, in one write, and stops
// gathering.
func (b *Conn) Flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.holding = false
	if len(b.buf) == 0 {
		return nil
	}
	_, err := b.Conn.Write(b.buf)
	if cap(b.buf) > maxKeep {
		b.buf = nil
	} else {
		b.buf = b.buf[:0]
	}
	return err
}
