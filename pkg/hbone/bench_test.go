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
func echoByte(b testing.TB, c net.Conn) {
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
	b.Run("request", func(b *testing.B) {
		echo := echoServer(b)
		c, err := net.Dial("tcp", echo.String())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		b.ResetTimer()
		for range b.N {
			echoByte(b, c)
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

// BenchmarkTransports compares HBONE over HTTP/2 and over HTTP/3 side by
// side in one run (go test -bench Transports -count 5 | benchstat):
//   - throughput: one stream pushing 64 KiB writes;
//   - request: one byte there and back on an open tunnel (latency);
//   - tunnel: a new tunnel on a warm pooled connection, one byte each way;
//   - setup: a new connection (TCP+TLS or QUIC handshake) and its first
//     tunnel, one byte each way.
func BenchmarkTransports(b *testing.B) {
	for _, tr := range []string{TransportH2, TransportH3} {
		h3 := tr == TransportH3
		setup := func(b *testing.B) (*mesh, *testServer, *Client) {
			m := newMesh(b)
			var srv *testServer
			if h3 {
				srv = startH3Server(b, m, nil)
			} else {
				srv = startServer(b, m, nil)
			}
			return m, srv, newClient(b, m, clientID, nil)
		}
		tg := func(srv *testServer, dst netip.AddrPort) Target {
			t := target(srv, dst)
			t.H3 = h3
			return t
		}
		dial := func(b *testing.B, cl *Client, t Target) *Conn {
			c, err := cl.Dial(ctxTimeout(b), t)
			if err != nil {
				b.Fatal(err)
			}
			if c.(*Conn).Transport() != tr {
				b.Fatalf("transport %s, want %s", c.(*Conn).Transport(), tr)
			}
			return c.(*Conn)
		}
		b.Run("throughput/"+tr, func(b *testing.B) {
			_, srv, cl := setup(b)
			c := dial(b, cl, tg(srv, sinkServer(b)))
			defer c.Close()
			pushThrough(b, c, c.CloseWrite)
		})
		b.Run("request/"+tr, func(b *testing.B) {
			_, srv, cl := setup(b)
			c := dial(b, cl, tg(srv, echoServer(b)))
			defer c.Close()
			b.ResetTimer()
			for range b.N {
				echoByte(b, c)
			}
		})
		b.Run("tunnel/"+tr, func(b *testing.B) {
			_, srv, cl := setup(b)
			t := tg(srv, echoServer(b))
			dial(b, cl, t).Close() // warm the pool
			b.ResetTimer()
			for range b.N {
				c := dial(b, cl, t)
				echoByte(b, c)
				c.Close()
			}
		})
		b.Run("setup/"+tr, func(b *testing.B) {
			m, srv, _ := setup(b)
			t := tg(srv, echoServer(b))
			tlsConf := m.tlsConfig(b, clientID)
			b.ResetTimer()
			for range b.N {
				cl, err := NewClient(ClientConfig{TLS: tlsConf, Logger: quietLogs})
				if err != nil {
					b.Fatal(err)
				}
				c := dial(b, cl, t)
				echoByte(b, c)
				c.Close()
				cl.Close()
			}
		})
	}
}
