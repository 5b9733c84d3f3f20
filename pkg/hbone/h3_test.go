package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// startH3Server is startServer that also serves HTTP/3 on the UDP port
// with the TCP listener's number, so one Target.Addr names both.
func startH3Server(t testing.TB, m *mesh, edit func(*ServerConfig)) *testServer {
	t.Helper()
	ts := startServer(t, m, edit)
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(ts.addr))
	if err != nil {
		t.Fatalf("udp on the tcp listener's port: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- ts.ServeH3(pc) }()
	t.Cleanup(func() {
		ts.Close()
		if err := <-done; err != nil {
			t.Errorf("ServeH3: %v", err)
		}
	})
	return ts
}

// TestH3Fallback: a peer that does not serve UDP is reached over HTTP/2
// within a bounded delay, and later tunnels skip HTTP/3 for a while.
func TestH3Fallback(t *testing.T) {
	f := newFixture(t, overH2, nil, func(c *ClientConfig) { c.H3HandshakeTimeout = 300 * time.Millisecond }) // TCP only
	srv, cl := f.srv, f.cl

	start := time.Now()
	conn, err := cl.Dial(ctxTimeout(t), overH3.target(srv, f.echo))
	delay := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("fallback to http/2 took %v", delay)
	if delay > 5*time.Second {
		t.Errorf("fallback took %v, not bounded", delay)
	}
	c := conn.(*Conn)
	if c.Transport() != TransportH2 || !c.FellBack() {
		t.Fatalf("transport %s fell back %v, want h2 after a fallback", c.Transport(), c.FellBack())
	}
	echoByte(t, c)
	c.Close()
	if cl.h3Usable(srv.addr) {
		t.Error("the unanswered endpoint is not remembered")
	}
	// The next tunnel goes straight to HTTP/2: its pooled connection,
	// no new QUIC attempt.
	conn, err = cl.Dial(ctxTimeout(t), overH3.target(srv, f.echo))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if !conn.(*Conn).FellBack() || srv.ln.accepted.Load() != 1 {
		t.Errorf("second tunnel: fell back %v, %d tcp connections, want the pooled one", conn.(*Conn).FellBack(), srv.ln.accepted.Load())
	}
}

// TestH3ConformanceIndependentClient drives the HTTP/3 server with
// quic-go/http3 directly (not this package's Client): status codes for
// each kind of request, classic and extended CONNECT, and the handshake
// checks.
func TestH3ConformanceIndependentClient(t *testing.T) {
	f := newFixture(t, overH3, func(c *ServerConfig) { c.Authorize = authorizeTest }, nil)
	srv, echo := f.srv, f.echo
	src := f.m.source(t, clientID)
	tlsConf := &tls.Config{
		MinVersion: tls.VersionTLS13, NextProtos: []string{"h3"},
		InsecureSkipVerify:   true, // the server is under test, not its certificate
		GetClientCertificate: src.GetClientCertificate,
	}
	ctx := ctxTimeout(t)
	qc, err := quic.DialAddr(ctx, srv.addr.String(), tlsConf, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qc.CloseWithError(0, "") })
	if p := qc.ConnectionState().TLS.NegotiatedProtocol; p != "h3" {
		t.Fatalf("ALPN %q, want h3", p)
	}
	cc := (&http3.Transport{DisableCompression: true}).NewClientConn(qc)
	select {
	case <-cc.ReceivedSettings():
	case <-ctx.Done():
		t.Fatal("no SETTINGS from the server")
	}
	if !cc.Settings().EnableExtendedConnect {
		t.Fatal("server SETTINGS do not enable extended CONNECT")
	}

	// send issues one request on a fresh stream and returns the status
	// and the stream (to exchange data on a 200).
	send := func(method, proto, authority, path string) (int, *http3.RequestStream) {
		t.Helper()
		str, err := cc.OpenRequestStream(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { str.CancelRead(0); str.CancelWrite(0) })
		u := &url.URL{Host: authority}
		if path != "" {
			u.Scheme, u.Path = "https", path
		}
		req := &http.Request{Method: method, Proto: proto, URL: u, Host: authority, Header: http.Header{
			"Forwarded": {FormatForwarded(netip.MustParseAddrPort("127.0.0.1:4242"))},
		}}
		if err := str.SendRequestHeader(req); err != nil {
			t.Fatal(err)
		}
		resp, err := str.ReadResponse()
		if err != nil {
			t.Fatalf("%s %s %s: %v", method, proto, authority, err)
		}
		return resp.StatusCode, str
	}
	for _, tc := range []struct {
		name                   string
		method, proto, host, p string
		want                   int
	}{
		{"GET", http.MethodGet, "", echo.String(), "/", http.StatusBadRequest},
		{"other :protocol", http.MethodConnect, "websocket", echo.String(), "/", http.StatusBadRequest},
		{"authority not this pod", http.MethodConnect, H3Protocol, "10.9.9.9:80", "/", http.StatusBadRequest},
		{"authority a name", http.MethodConnect, H3Protocol, "localhost:80", "/", http.StatusBadRequest},
		{"proxy port", http.MethodConnect, H3Protocol, fmt.Sprintf("127.0.0.1:%d", OutboundPort), "/", http.StatusServiceUnavailable},
		{"denied", http.MethodConnect, H3Protocol, "127.0.0.1:9", "/", http.StatusUnauthorized},
		{"upstream refused", http.MethodConnect, H3Protocol, closedPort(t).String(), "/", http.StatusServiceUnavailable},
		{"classic CONNECT", http.MethodConnect, "", echo.String(), "", http.StatusOK},
		{"extended CONNECT", http.MethodConnect, H3Protocol, echo.String(), "/", http.StatusOK},
	} {
		code, str := send(tc.method, tc.proto, tc.host, tc.p)
		if code != tc.want {
			t.Errorf("%s: status %d, want %d", tc.name, code, tc.want)
			continue
		}
		if code != http.StatusOK {
			continue
		}
		// The tunnel carries data both ways and forwards the FIN.
		if _, err := str.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		str.Close()
		b, err := io.ReadAll(str)
		if err != nil || string(b) != "ping" {
			t.Errorf("%s: echo %q, %v", tc.name, b, err)
		}
	}
	eventually(t, "outcomes", func() bool { _, o := srv.observed(); return len(o) == 9 })
	reqs, _ := srv.observed()
	for _, r := range reqs {
		if r.Transport != TransportH3 || r.SrcIdentity != clientID {
			t.Errorf("request %d: transport %q identity %s", r.ID, r.Transport, r.SrcIdentity)
		}
		if r.Dst == echo && (r.SrcAddr != r.PeerAddr || r.SrcAddr.Port() == 4242) {
			t.Errorf("request %d: source %s, want the UDP peer %s, not the Forwarded address", r.ID, r.SrcAddr, r.PeerAddr)
		}
	}

	// Handshake checks: no client certificate, and the wrong ALPN.
	for name, conf := range map[string]*tls.Config{
		"no client certificate": {MinVersion: tls.VersionTLS13, NextProtos: []string{"h3"}, InsecureSkipVerify: true},
		"ALPN h2 over QUIC":     {MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, InsecureSkipVerify: true, GetClientCertificate: src.GetClientCertificate},
	} {
		hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		qc, err := quic.DialAddr(hctx, srv.addr.String(), conf, &quic.Config{})
		cancel()
		if err == nil {
			// TLS 1.3: a refused client certificate may only show after
			// the client's handshake completes.
			_, err = qc.AcceptStream(ctxWithin(t, 5*time.Second))
			qc.CloseWithError(0, "")
		}
		var te *quic.TransportError
		if !errors.As(err, &te) {
			t.Errorf("%s: %v, want a QUIC transport error (TLS alert)", name, err)
		}
	}
}
