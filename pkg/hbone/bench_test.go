package hbone

import (
	"io"
	"net"
	"net/netip"
	"testing"
)

// Benchmarks compare a tunnel with plain loopback TCP; timings on the
// project's 2-core machines are noisy, so compare them as ratios within a
// run (go test -bench . -count 5 | benchstat).

const benchChunk = 64 << 10

// sinkServer reads until EOF and then answers one byte, so the writer knows
// everything arrived.
func sinkServer(b *testing.B) netip.AddrPort {
	return serveTCP(b, func(c net.Conn) {
		io.Copy(io.Discard, c)
		c.Write([]byte{1})
	})
}

// pushThrough writes b.N chunks to c, half-closes and waits for the ack.
func pushThrough(b *testing.B, c net.Conn, closeWrite func() error) {
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := closeWrite(); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf[:1]); err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
}

// echoByte sends one byte and waits for it to come back.
func echoByte(b *testing.B, c net.Conn) {
	var one [1]byte
	if _, err := c.Write(one[:]); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(c, one[:]); err != nil {
		b.Fatal(err)
	}
}

func BenchmarkHBONEThroughput(b *testing.B) {
	m := newMesh(b)
	sink := sinkServer(b)
	srv := startServer(b, m, nil)
	cl := newClient(b, m, clientID, nil)
	c, err := cl.Dial(ctxTimeout(b), target(srv, sink))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	pushThrough(b, c, c.(*Conn).CloseWrite)
}

// BenchmarkHBONEConnect measures one tunnel's life on a warm pooled
// connection: CONNECT, upstream dial, one byte each way, close.
func BenchmarkHBONEConnect(b *testing.B) {
	m := newMesh(b)
	echo := echoServer(b)
	srv := startServer(b, m, nil)
	cl := newClient(b, m, clientID, nil)
	ctx := ctxTimeout(b)
	b.ResetTimer()
	for range b.N {
		c, err := cl.Dial(ctx, target(srv, echo))
		if err != nil {
			b.Fatal(err)
		}
		echoByte(b, c)
		c.Close()
	}
}

// BenchmarkDirectTCP is the baseline: the same work over plain loopback TCP.
func BenchmarkDirectTCP(b *testing.B) {
	b.Run("connect", func(b *testing.B) {
		echo := echoServer(b)
		b.ResetTimer()
		for range b.N {
			c, err := net.Dial("tcp", echo.String())
			if err != nil {
				b.Fatal(err)
			}
			echoByte(b, c)
			c.Close()
		}
	})
	b.Run("throughput", func(b *testing.B) {
		sink := sinkServer(b)
		c, err := net.Dial("tcp", sink.String())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		pushThrough(b, c, c.(*net.TCPConn).CloseWrite)
	})
}
