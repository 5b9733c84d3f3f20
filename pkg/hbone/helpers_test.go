package hbone

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/identity"
)

var (
	loopback  = netip.MustParseAddr("127.0.0.1")
	clientID  = identity.MustParse("spiffe://cluster.local/ns/client-ns/sa/client")
	serverID  = identity.MustParse("spiffe://cluster.local/ns/server-ns/sa/server")
	quietLogs = slog.New(slog.DiscardHandler)
)

// mesh is a CA and the identities it issued, for one test.
type mesh struct {
	ca *identity.CA
}

func newMesh(t testing.TB) *mesh {
	t.Helper()
	ca, err := identity.LoadOrCreate(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return &mesh{ca: ca}
}

func (m *mesh) source(t testing.TB, id identity.Identity) *identity.Source {
	t.Helper()
	src, err := identity.NewSource(identity.SourceConfig{Identity: id, Issuer: m.ca, Logger: quietLogs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

func (m *mesh) tlsConfig(t testing.TB, id identity.Identity) TLSConfig {
	return TLSConfig{Credentials: m.source(t, id), Roots: m.ca.Roots}
}

// listen opens a loopback listener that counts accepted connections.
type countingListener struct {
	net.Listener
	accepted atomic.Int32
	open     atomic.Int32
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.accepted.Add(1)
	l.open.Add(1)
	return &countedConn{Conn: c, l: l}, nil
}

type countedConn struct {
	net.Conn
	l    *countingListener
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.l.open.Add(-1) })
	return c.Conn.Close()
}

// echoServer echoes each connection until the client's FIN, then
// half-closes, like a well-behaved application.
func echoServer(t testing.TB) netip.AddrPort {
	t.Helper()
	return serveTCP(t, func(c net.Conn) {
		io.Copy(c, c)
		c.(*net.TCPConn).CloseWrite()
	})
}

func serveTCP(t testing.TB, handle func(net.Conn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	conns := map[net.Conn]struct{}{}
	var mu sync.Mutex
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				handle(c)
			})
		}
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func dialTCP(ctx context.Context, r Request) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", r.Dst.String())
}

type testServer struct {
	*Server
	addr netip.AddrPort
	ln   *countingListener

	mu       sync.Mutex
	outcomes []Outcome
	requests []Request
}

func (s *testServer) observed() ([]Request, []Outcome) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.requests...), append([]Outcome(nil), s.outcomes...)
}

// startServer serves HBONE for serverID on loopback; edit changes the
// configuration before the server is made.
func startServer(t testing.TB, m *mesh, edit func(*ServerConfig)) *testServer {
	t.Helper()
	ts := &testServer{}
	cfg := ServerConfig{
		TLS:          m.tlsConfig(t, serverID),
		PodIPs:       []netip.Addr{loopback},
		DialUpstream: dialTCP,
		Logger:       quietLogs,
		Observe: func(r Request, o Outcome) {
			ts.mu.Lock()
			ts.requests = append(ts.requests, r)
			ts.outcomes = append(ts.outcomes, o)
			ts.mu.Unlock()
		},
	}
	if edit != nil {
		edit(&cfg)
	}
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts.Server, ts.ln = srv, &countingListener{Listener: ln}
	ts.addr = ln.Addr().(*net.TCPAddr).AddrPort()
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ts.ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return ts
}

func newClient(t testing.TB, m *mesh, id identity.Identity, edit func(*ClientConfig)) *Client {
	t.Helper()
	cfg := ClientConfig{TLS: m.tlsConfig(t, id), Logger: quietLogs}
	if edit != nil {
		edit(&cfg)
	}
	c, err := NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func target(srv *testServer, dst netip.AddrPort) Target {
	return Target{
		Addr:               srv.addr,
		Authority:          dst,
		ExpectedIdentities: []identity.Identity{serverID},
		SourceAddr:         netip.AddrPortFrom(loopback, 40000),
	}
}

// ctxTimeout is the deadline of one test's dials: 20 s.
func ctxTimeout(t testing.TB) context.Context { return ctxWithin(t, 20*time.Second) }

// ctxWithin is a context that ends after d or with the test.
func ctxWithin(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// closedPort is a loopback TCP port with nothing listening.
func closedPort(t testing.TB) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// errDenied is what authorizeTest returns for a refused request.
var errDenied = errors.New("policy says no")

// authorizeTest is a ServerConfig.Authorize that refuses requests with an
// X-Deny header and requests to port 9.
func authorizeTest(_ context.Context, r Request) error {
	if r.Header.Get("X-Deny") != "" || r.Dst.Port() == 9 {
		return errDenied
	}
	return nil
}

// transport is one way of carrying tunnels, for the tests that must hold
// over both.
type transport struct {
	name     string // TransportH2 or TransportH3
	start    func(t testing.TB, m *mesh, edit func(*ServerConfig)) *testServer
	h3       bool  // Target.H3: the client dials HTTP/3
	tcpConns int32 // TCP connections a server accepts for a pool of tunnels
}

var (
	overH2 = transport{name: TransportH2, start: startServer, tcpConns: 1}
	overH3 = transport{name: TransportH3, start: startH3Server, h3: true}
)

// forTransports runs test as one subtest per transport.
func forTransports(t *testing.T, test func(t *testing.T, tr transport)) {
	for _, tr := range []transport{overH2, overH3} {
		t.Run(tr.name, func(t *testing.T) { test(t, tr) })
	}
}

// target is the Target of a tunnel to dst through srv over tr.
func (tr transport) target(srv *testServer, dst netip.AddrPort) Target {
	tg := target(srv, dst)
	tg.H3 = tr.h3
	return tg
}

// fixture is the start of most tunnel tests: a mesh, an echo upstream, a
// server for serverID over one transport and a client for clientID.
type fixture struct {
	tr   transport
	m    *mesh
	echo netip.AddrPort
	srv  *testServer
	cl   *Client
}

// newFixture starts a fixture; editServer and editClient (either may be
// nil) change the configurations before the server and client are made.
func newFixture(t testing.TB, tr transport, editServer func(*ServerConfig), editClient func(*ClientConfig)) *fixture {
	t.Helper()
	f := &fixture{tr: tr, m: newMesh(t), echo: echoServer(t)}
	f.srv = tr.start(t, f.m, editServer)
	f.cl = newClient(t, f.m, clientID, editClient)
	return f
}

// dial opens a tunnel to dst over the fixture's transport and fails the
// test when it cannot; the test's cleanup closes it.
func (f *fixture) dial(t testing.TB, dst netip.AddrPort) *Conn {
	t.Helper()
	c, err := f.cl.Dial(ctxTimeout(t), f.tr.target(f.srv, dst))
	if err != nil {
		t.Fatalf("dial %s over %s: %v", dst, f.tr.name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*Conn)
}

// noFallback checks that the refusals so far kept the client on its
// transport: HTTP/3 still usable, and no TCP connections beyond the one
// pool the transport uses.
func (f *fixture) noFallback(t testing.TB) {
	t.Helper()
	if n := f.srv.ln.accepted.Load(); !f.cl.h3Usable(f.srv.addr) || n != f.tr.tcpConns {
		t.Errorf("after refusals: http/3 usable %v, %d TCP connections, want true and %d (no new connection, no fallback)",
			f.cl.h3Usable(f.srv.addr), n, f.tr.tcpConns)
	}
}

// eventually polls cond until it holds or 10 s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
