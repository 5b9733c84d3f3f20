package hbone

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/identity"
)

// TestEndToEnd: over each transport a tunnel carries more than a flow
// control window both ways, ends with the client's half-close, and the
// server sees who sent it, from where and to where.
func TestEndToEnd(t *testing.T) {
	forTransports(t, func(t *testing.T, tr transport) {
		f := newFixture(t, tr, nil, nil)
		conn := f.dial(t, f.echo)
		if conn.Transport() != tr.name || conn.FellBack() {
			t.Fatalf("transport %s (fell back %v), want %s", conn.Transport(), conn.FellBack(), tr.name)
		}
		if got := conn.Peer().Identity; got != serverID {
			t.Fatalf("client sees server identity %s, want %s", got, serverID)
		}
		// 8 MiB: more than a stream window, so flow control (HTTP/2's or
		// QUIC's) must work.
		payload := make([]byte, 8<<20)
		rand.Read(payload)
		go func() {
			conn.Write(payload)
			conn.CloseWrite()
		}()
		got, err := io.ReadAll(conn)
		if err != nil {
			t.Fatalf("read echo: %v", err)
		}
		if !bytes.Equal(got, payload) {
			t.Fatalf("echo returned %d bytes, want the %d sent", len(got), len(payload))
		}
		conn.Close()

		eventually(t, "outcome", func() bool { _, o := f.srv.observed(); return len(o) == 1 })
		reqs, outs := f.srv.observed()
		r, o := reqs[0], outs[0]
		if r.Transport != tr.name || r.SrcIdentity != clientID || r.Dst != f.echo {
			t.Errorf("server saw transport %s identity %s dst %s, want %s %s %s", r.Transport, r.SrcIdentity, r.Dst, tr.name, clientID, f.echo)
		}
		// The client sends Forwarded for=127.0.0.1:40000; the source is
		// the connection's peer all the same.
		if r.SrcAddr != r.PeerAddr || r.SrcAddr.Port() == 40000 {
			t.Errorf("server saw source %s, want the peer %s (Forwarded is informational)", r.SrcAddr, r.PeerAddr)
		}
		if r.Header.Get(HeaderTraceparent) == "" || r.Header.Get("User-Agent") != "" {
			t.Errorf("headers %v: want a traceparent and no user agent", r.Header)
		}
		if o.Status != http.StatusOK || o.Err != nil || o.BytesIn != int64(len(payload)) || o.BytesOut != int64(len(payload)) {
			t.Errorf("outcome = status %d err %v in %d out %d, want 200, nil, %d, %d", o.Status, o.Err, o.BytesIn, o.BytesOut, len(payload), len(payload))
		}
		if n := f.srv.ln.accepted.Load(); n != tr.tcpConns {
			t.Errorf("the tunnel used %d TCP connections, want %d", n, tr.tcpConns)
		}
	})
}

// TestHalfClose: over each transport the upstream's end of data reaches
// the client as EOF while the client can still send, more than a stream
// window of it, and the app gets all of it and then the client's FIN.
func TestHalfClose(t *testing.T) {
	forTransports(t, func(t *testing.T, tr transport) {
		f := newFixture(t, tr, nil, nil)
		// The app answers, closes its sending side, then reads until
		// the client's FIN and reports what it read.
		got := make(chan []byte, 1)
		app := serveTCP(t, func(c net.Conn) {
			c.Write([]byte("hello\n"))
			c.(*net.TCPConn).CloseWrite()
			b, _ := io.ReadAll(c)
			got <- b
		})
		conn := f.dial(t, app)
		b, err := io.ReadAll(conn)
		if err != nil || string(b) != "hello\n" {
			t.Fatalf("read %q, %v; want the answer then EOF", b, err)
		}
		rest := make([]byte, 6<<20) // beyond the 4 MiB stream window
		rand.Read(rest)
		if _, err := conn.Write(rest); err != nil {
			t.Fatalf("write after the server's end of stream: %v", err)
		}
		// Close right after CloseWrite: what flow control still holds
		// back must be delivered, not reset.
		conn.CloseWrite()
		conn.Close()
		receivedInOrder(t, got, rest) // all of it, after the app's FIN
		eventually(t, "clean outcome", func() bool { _, o := f.srv.observed(); return len(o) == 1 })
		if _, outs := f.srv.observed(); outs[0].Err != nil || outs[0].BytesIn != int64(len(rest)) {
			t.Fatalf("outcome %+v, want no error and %d bytes in", outs[0], len(rest))
		}
	})
}

// TestClientRejectsUnexpectedServerIdentity: a server whose identity is
// not one the target expects gets no stream, and over HTTP/3 the refusal
// does not fall back to HTTP/2.
func TestClientRejectsUnexpectedServerIdentity(t *testing.T) {
	forTransports(t, func(t *testing.T, tr transport) {
		f := newFixture(t, tr, nil, nil)
		tg := tr.target(f.srv, f.echo)
		tg.ExpectedIdentities = []identity.Identity{identity.MustParse("spiffe://cluster.local/ns/server-ns/sa/other")}
		_, err := f.cl.Dial(ctxTimeout(t), tg)
		if err == nil || !strings.Contains(err.Error(), "is not one of the expected") {
			t.Fatalf("Dial error = %v, want an identity mismatch", err)
		}
		if _, outs := f.srv.observed(); len(outs) != 0 {
			t.Fatalf("server served %d streams to a client that rejected it", len(outs))
		}
		f.noFallback(t)
	})
}

func TestServerRejectsForeignClients(t *testing.T) {
	m := newMesh(t)
	srv := startServer(t, m, nil)
	echo := echoServer(t)

	// Same CA, but another trust domain.
	foreignTD := newClient(t, m, identity.MustParse("spiffe://evil.local/ns/client-ns/sa/client"), nil)
	// Right trust domain, but a CA the server does not trust.
	otherCA := newMesh(t)
	untrusted := newClient(t, otherCA, clientID, func(c *ClientConfig) { c.TLS.Roots = m.ca.Roots })

	for name, cl := range map[string]*Client{"foreign trust domain": foreignTD, "untrusted CA": untrusted} {
		_, err := cl.Dial(ctxTimeout(t), target(srv, echo))
		if err == nil {
			t.Errorf("%s: Dial succeeded", name)
			continue
		}
		// TLS 1.3 clients finish their handshake before the server judges
		// the client certificate; the server's alert arrives afterwards.
		if !strings.Contains(err.Error(), "tls") {
			t.Errorf("%s: Dial error = %v, want a TLS alert", name, err)
		}
	}
	if _, outs := srv.observed(); len(outs) != 0 {
		t.Fatalf("server served %d streams to refused clients", len(outs))
	}
	// A handshake refusal is final: no retry loop of connections.
	if n := srv.ln.accepted.Load(); n != 2 {
		t.Fatalf("%d connections for 2 refused dials, want 2", n)
	}
}

// TestRefusals: over each transport every kind of bad request is refused
// with its status and reason, and refusals neither poison the pooled
// connection nor make the client fall back from HTTP/3.
func TestRefusals(t *testing.T) {
	forTransports(t, func(t *testing.T, tr transport) {
		f := newFixture(t, tr, func(c *ServerConfig) { c.Authorize = authorizeTest }, nil)
		for _, tc := range []struct {
			name   string
			dst    netip.AddrPort
			header http.Header
			status int
			reason string
		}{
			{"not a pod IP", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), f.echo.Port()), nil, 400, "not this pod's"},
			{"not this pod", netip.MustParseAddrPort("10.1.2.3:80"), nil, 400, "not this pod's"},
			{"port 15008", netip.AddrPortFrom(loopback, InboundHBONEPort), nil, 503, "proxy port"},
			{"port 15001", netip.AddrPortFrom(loopback, 15001), nil, 503, "proxy port"},
			{"port 15006", netip.AddrPortFrom(loopback, 15006), nil, 503, "proxy port"},
			{"denied by header", f.echo, http.Header{"X-Deny": {"1"}}, 401, "authorization denied"},
			{"denied port", netip.AddrPortFrom(loopback, 9), nil, 401, "authorization denied"},
			{"upstream refuses", closedPort(t), nil, 503, "upstream connect failed"},
		} {
			tg := tr.target(f.srv, tc.dst)
			tg.Header = tc.header
			_, err := f.cl.Dial(ctxTimeout(t), tg)
			var se *StatusError
			if !errors.As(err, &se) || se.Code != tc.status {
				t.Errorf("%s: Dial error = %v, want status %d", tc.name, err, tc.status)
				continue
			}
			_, outs := f.srv.observed()
			last := outs[len(outs)-1]
			if last.Status != tc.status || !strings.Contains(last.Reason, tc.reason) {
				t.Errorf("%s: outcome %d %q, want %d %q", tc.name, last.Status, last.Reason, tc.status, tc.reason)
			}
			if tc.status == 401 && !errors.Is(last.Err, errDenied) {
				t.Errorf("%s: outcome error %v, want the authorizer's", tc.name, last.Err)
			}
		}
		// Refused streams do not poison the pooled connection.
		f.dial(t, f.echo).Close()
		f.noFallback(t)
	})
}

func TestOKOnlyAfterUpstreamConnect(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	f := newFixture(t, overH2, func(c *ServerConfig) {
		c.DialUpstream = func(ctx context.Context, r Request) (net.Conn, error) {
			close(entered)
			<-release
			return dialTCP(ctx, r)
		}
	}, nil)
	result := make(chan error, 1)
	go func() {
		conn, err := f.cl.Dial(ctxTimeout(t), target(f.srv, f.echo))
		if err == nil {
			conn.Close()
		}
		result <- err
	}()
	<-entered
	// The upstream dial is blocked, so no answer may have been sent.
	select {
	case err := <-result:
		t.Fatalf("Dial returned (%v) before the upstream connection was made", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	if err := <-result; err != nil {
		t.Fatalf("Dial after upstream connect: %v", err)
	}
}

func TestPooling(t *testing.T) {
	f := newFixture(t, overH2, nil, func(c *ClientConfig) { c.MaxStreamsPerConn = 3 })
	ctx := ctxTimeout(t)

	// Three concurrent tunnels share one connection, even though they are
	// dialed at the same time (the first dial is shared).
	var conns []net.Conn
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() {
			c, err := f.cl.Dial(ctx, target(f.srv, f.echo))
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		})
	}
	wg.Wait()
	if n := f.srv.ln.accepted.Load(); n != 1 {
		t.Fatalf("3 concurrent tunnels used %d TCP connections, want 1", n)
	}
	for i, c := range conns {
		msg := []byte{byte('a' + i)}
		c.Write(msg)
		buf := make([]byte, 1)
		if _, err := io.ReadFull(c, buf); err != nil || buf[0] != msg[0] {
			t.Fatalf("tunnel %d echo = %q, %v", i, buf, err)
		}
	}
	// A fourth exceeds MaxStreamsPerConn: a second connection.
	fourth, err := f.cl.Dial(ctx, target(f.srv, f.echo))
	if err != nil {
		t.Fatal(err)
	}
	if n := f.srv.ln.accepted.Load(); n != 2 {
		t.Fatalf("4th tunnel: %d TCP connections, want 2", n)
	}
	fourth.Close()
	for _, c := range conns {
		c.Close()
	}
	// Closed tunnels free their slots: no new connection.
	for range 5 {
		c, err := f.cl.Dial(ctx, target(f.srv, f.echo))
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	if n := f.srv.ln.accepted.Load(); n != 2 {
		t.Fatalf("after reuse: %d TCP connections, want still 2", n)
	}
	// Another source IP is another pool key.
	tg := target(f.srv, f.echo)
	tg.SourceAddr = netip.MustParseAddrPort("127.0.0.9:1234")
	c, err := f.cl.Dial(ctx, tg)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := f.srv.ln.accepted.Load(); n != 3 {
		t.Fatalf("other source IP: %d TCP connections, want 3", n)
	}
}

func TestIdleConnectionReleased(t *testing.T) {
	f := newFixture(t, overH2, nil, func(c *ClientConfig) { c.IdleTimeout = 300 * time.Millisecond })
	c := f.dial(t, f.echo)
	if f.cl.Conns() != 1 {
		t.Fatalf("Conns = %d, want 1", f.cl.Conns())
	}
	c.Close()
	eventually(t, "idle client connection closed", func() bool { return f.cl.Conns() == 0 })
	eventually(t, "server side of the idle connection closed", func() bool { return f.srv.ln.open.Load() == 0 })
}

// TestCloseMatching: over each transport CloseMatching resets the tunnels
// it matches, promptly, and leaves the others working.
func TestCloseMatching(t *testing.T) {
	forTransports(t, func(t *testing.T, tr transport) {
		f := newFixture(t, tr, nil, nil)
		other := echoServer(t)
		victim := f.dial(t, f.echo)
		survivor := f.dial(t, other)
		echoByte(t, victim)
		echoByte(t, survivor)
		eventually(t, "two tunnels", func() bool { return f.srv.Tunnels() == 2 })

		// The victim was dialled first: request 1.
		if n := f.srv.CloseMatching(func(r Request) bool { return r.Transport == tr.name && r.ID == 1 && r.Dst == f.echo }); n != 1 {
			t.Fatalf("CloseMatching closed %d tunnels, want 1", n)
		}
		expectReset(t, victim, "killed tunnel")
		echoByte(t, survivor)
		eventually(t, "outcome of the killed tunnel", func() bool {
			_, outs := f.srv.observed()
			return len(outs) == 1 && outs[0].Err != nil
		})
	})
}

// TestServerClose: over each transport the server's Close resets every
// tunnel.
func TestServerClose(t *testing.T) {
	forTransports(t, func(t *testing.T, tr transport) {
		f := newFixture(t, tr, nil, nil)
		c := f.dial(t, f.echo)
		echoByte(t, c)
		if err := f.srv.Close(); err != nil {
			t.Fatal(err)
		}
		expectReset(t, c, "tunnel after the server's Close")
		if f.srv.Tunnels() != 0 {
			t.Fatalf("%d tunnels left after Close", f.srv.Tunnels())
		}
	})
}

// expectReset checks that c ends with an error within 5 s, not cleanly
// and not by the deadline.
func expectReset(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("%s: read %v, want a reset", what, err)
	}
}

func TestHeadersSeenByServer(t *testing.T) {
	f := newFixture(t, overH2, nil, nil)
	traceRE := regexp.MustCompile(`^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$`)

	for i, src := range []netip.AddrPort{
		netip.MustParseAddrPort("10.1.2.3:41000"),
		netip.MustParseAddrPort("[2001:db8::7]:41001"),
	} {
		tg := target(f.srv, f.echo)
		tg.SourceAddr = src
		tg.Baggage = Baggage{ClusterName: "c1", Namespace: "client-ns", WorkloadKind: "Deployment", WorkloadName: "web", ServiceName: "web", ServiceVersion: "v1,2"}
		c, err := f.cl.Dial(ctxTimeout(t), tg)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		// Wait, so that the observations come in dial order.
		eventually(t, "request observed", func() bool { r, _ := f.srv.observed(); return len(r) == i+1 })
	}
	reqs, _ := f.srv.observed()
	wantFwd := []string{`for="10.1.2.3:41000"`, `for="[2001:db8::7]:41001"`}
	for i, r := range reqs {
		if got := r.Header.Values("Forwarded"); len(got) != 1 || got[0] != wantFwd[i] {
			t.Errorf("forwarded = %q, want %q", got, wantFwd[i])
		}
		// The header arrives, but the source is the TCP peer.
		if claimed := netip.MustParseAddrPort(strings.Trim(wantFwd[i][4:], `"`)); r.SrcAddr == claimed || r.SrcAddr != r.PeerAddr {
			t.Errorf("SrcAddr = %s, want the peer %s, not the Forwarded %s", r.SrcAddr, r.PeerAddr, claimed)
		}
		if tp := r.Header.Get("Traceparent"); !traceRE.MatchString(tp) {
			t.Errorf("traceparent %q is not W3C", tp)
		}
		if b, want := r.Header.Get("Baggage"), "k8s.cluster.name=c1,k8s.namespace.name=client-ns,k8s.deployment.name=web,service.name=web,service.version=v1%2C2"; b != want {
			t.Errorf("baggage = %q, want %q", b, want)
		}
		if ua := r.Header.Get("User-Agent"); ua != "" {
			t.Errorf("client sent user-agent %q", ua)
		}
	}
	if reqs[0].Header.Get("Traceparent") == reqs[1].Header.Get("Traceparent") {
		t.Error("two connections shared a traceparent")
	}
}

func TestConnDeadlines(t *testing.T) {
	f := newFixture(t, overH2, nil, nil)
	c := f.dial(t, f.echo)
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	buf := make([]byte, 16)
	if _, err := c.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read with expired deadline: %v", err)
	}
	// The read that timed out keeps waiting in the background; its data
	// is delivered to the next Read.
	c.SetReadDeadline(time.Time{})
	c.Write([]byte("late"))
	got, err := io.ReadAtLeast(c, buf, 4)
	if err != nil || string(buf[:got]) != "late" {
		t.Fatalf("Read after clearing the deadline = %q, %v", buf[:got], err)
	}
	c.SetWriteDeadline(time.Now().Add(-time.Second))
	if _, err := c.Write([]byte("x")); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Write with past deadline: %v", err)
	}
	if c.LocalAddr().String() != "127.0.0.1:40000" || c.RemoteAddr().String() != f.echo.String() {
		t.Fatalf("addresses %s -> %s", c.LocalAddr(), c.RemoteAddr())
	}
}

func TestTLS12Option(t *testing.T) {
	m := newMesh(t)
	for _, allow := range []bool{false, true} {
		srv := startServer(t, m, func(c *ServerConfig) { c.TLS.AllowTLS12 = allow })
		src := m.source(t, clientID)
		conn, err := tls.Dial("tcp", srv.addr.String(), &tls.Config{
			MaxVersion: tls.VersionTLS12, NextProtos: []string{"h2"}, InsecureSkipVerify: true,
			GetClientCertificate: src.GetClientCertificate,
		})
		if err == nil {
			// Make sure the server accepted the client certificate too.
			_, err = conn.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
			conn.Close()
		}
		if allow && err != nil {
			t.Errorf("AllowTLS12: TLS 1.2 handshake failed: %v", err)
		}
		if !allow && err == nil {
			t.Error("TLS 1.2 accepted without AllowTLS12")
		}
	}
}
