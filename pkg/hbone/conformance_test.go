package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/ambpf/ambpf/pkg/identity"
)

// rawClient speaks HTTP/2 frame by frame, independent of this package's
// Client and of x/net's Transport, the way ztunnel's client would.
type rawClient struct {
	t    *testing.T
	conn *tls.Conn
	fr   *http2.Framer
	hbuf bytes.Buffer
	henc *hpack.Encoder
	// serverSettings records the server's first SETTINGS frame.
	serverSettings map[http2.SettingID]uint32
	connWindowInc  uint32
}

func newRawClient(t *testing.T, m *mesh, addr netip.AddrPort) *rawClient {
	t.Helper()
	src := m.source(t, clientID)
	conn, err := tls.Dial("tcp", addr.String(), &tls.Config{
		MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"},
		InsecureSkipVerify:   true, // the server is under test, not its certificate
		GetClientCertificate: src.GetClientCertificate,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if p := conn.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("ALPN %q, want h2", p)
	}
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	rc := &rawClient{t: t, conn: conn, fr: http2.NewFramer(conn, conn), serverSettings: map[http2.SettingID]uint32{}}
	rc.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	rc.henc = hpack.NewEncoder(&rc.hbuf)
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	if err := rc.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return rc
}

// headers opens stream id with the given header fields in order.
func (rc *rawClient) headers(id uint32, endStream bool, fields ...string) {
	rc.t.Helper()
	rc.hbuf.Reset()
	for i := 0; i < len(fields); i += 2 {
		rc.henc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	if err := rc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: rc.hbuf.Bytes(), EndHeaders: true, EndStream: endStream}); err != nil {
		rc.t.Fatal(err)
	}
}

// event is what arrived on a stream.
type event struct {
	status    int
	data      []byte
	endStream bool
	reset     bool
	baggage   string // the response's baggage header
}

// next reads frames until one concerns stream id, answering SETTINGS and
// PING and recording connection-level frames on the way.
func (rc *rawClient) next(id uint32) event {
	rc.t.Helper()
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			rc.t.Fatalf("read frame waiting for stream %d: %v", id, err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				f.ForeachSetting(func(s http2.Setting) error { rc.serverSettings[s.ID] = s.Val; return nil })
				rc.fr.WriteSettingsAck()
			}
			continue
		case *http2.PingFrame:
			if !f.IsAck() {
				rc.fr.WritePing(true, f.Data)
			}
			continue
		case *http2.WindowUpdateFrame:
			if f.StreamID == 0 {
				rc.connWindowInc += f.Increment
			}
			continue
		}
		if _, ok := f.(*http2.RSTStreamFrame); ok && f.Header().StreamID < id {
			// A refused stream whose request side we left open is reset
			// with NO_ERROR after the answer (RFC 9113 8.1).
			continue
		}
		if f.Header().StreamID != id {
			rc.t.Fatalf("frame %v for stream %d while waiting for stream %d", f.Header().Type, f.Header().StreamID, id)
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			st, _ := strconv.Atoi(f.PseudoValue("status"))
			ev := event{status: st, endStream: f.StreamEnded()}
			for _, hf := range f.RegularFields() {
				if hf.Name == "baggage" {
					ev.baggage = hf.Value
				}
			}
			return ev
		case *http2.DataFrame:
			return event{data: bytes.Clone(f.Data()), endStream: f.StreamEnded()}
		case *http2.RSTStreamFrame:
			return event{reset: true}
		default:
			rc.t.Fatalf("unexpected frame %v", f.Header().Type)
		}
	}
}

func TestConformanceRawHTTP2(t *testing.T) {
	m := newMesh(t)
	echo := echoServer(t)
	dead := func() netip.AddrPort {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().(*net.TCPAddr).AddrPort()
	}()
	srv := startServer(t, m, nil)
	rc := newRawClient(t, m, srv.addr)

	// A tunnel: 200, bytes both ways, and the client's END_STREAM reaches
	// the application as FIN, whose own FIN ends the stream.
	rc.headers(1, false, ":method", "CONNECT", ":authority", echo.String(),
		"forwarded", `for="10.0.0.1:5555"`, "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
	if ev := rc.next(1); ev.status != 200 || ev.endStream {
		t.Fatalf("CONNECT answered %+v, want an open 200", ev)
	}
	if err := rc.fr.WriteData(1, false, []byte("ping")); err != nil {
		t.Fatal(err)
	}
	var got []byte
	for len(got) < 4 {
		ev := rc.next(1)
		if ev.reset || ev.endStream {
			t.Fatalf("stream ended before the echo: %+v", ev)
		}
		got = append(got, ev.data...)
	}
	if string(got) != "ping" {
		t.Fatalf("echo = %q", got)
	}
	if err := rc.fr.WriteData(1, true, nil); err != nil {
		t.Fatal(err)
	}
	if ev := rc.next(1); !ev.endStream || ev.reset || len(ev.data) != 0 {
		t.Fatalf("after our END_STREAM: %+v, want the server's END_STREAM", ev)
	}

	// Istio's flow-control settings.
	if got := rc.serverSettings[http2.SettingInitialWindowSize]; got != 4<<20 {
		t.Errorf("SETTINGS_INITIAL_WINDOW_SIZE = %d, want 4 MiB", got)
	}
	if got := rc.serverSettings[http2.SettingMaxFrameSize]; got != 1<<20 {
		t.Errorf("SETTINGS_MAX_FRAME_SIZE = %d, want 1 MiB", got)
	}
	if got := rc.connWindowInc + 65535; got != 16<<20 {
		t.Errorf("connection window = %d, want 16 MiB", got)
	}

	// Refusals, each on its own stream of the same connection.
	for i, tc := range []struct {
		fields []string
		status int
	}{
		{[]string{":method", "GET", ":scheme", "https", ":path", "/", ":authority", echo.String()}, 400},
		{[]string{":method", "POST", ":scheme", "https", ":path", "/", ":authority", echo.String()}, 400},
		{[]string{":method", "CONNECT", ":authority", "not-an-address:80"}, 400},
		{[]string{":method", "CONNECT", ":authority", "127.0.0.1"}, 400},
		{[]string{":method", "CONNECT", ":authority", "10.9.9.9:80"}, 400},
		{[]string{":method", "CONNECT", ":authority", "127.0.0.1:15008"}, 503}, // as ztunnel (SelfCall)
		{[]string{":method", "CONNECT", ":authority", "127.0.0.1:15001"}, 503}, // as ztunnel (SelfCall)
		{[]string{":method", "CONNECT", ":authority", "127.0.0.1:15006"}, 503}, // as ztunnel (SelfCall)
		{[]string{":method", "CONNECT", ":authority", dead.String()}, 503},
	} {
		id := uint32(3 + 2*i)
		rc.headers(id, false, tc.fields...)
		ev := rc.next(id)
		if ev.status != tc.status || !ev.endStream {
			t.Errorf("%v: got %+v, want status %d with END_STREAM", tc.fields, ev, tc.status)
		}
	}

	reqs, _ := srv.observed()
	// Forwarded is the client's claim: the source stays the TCP peer.
	if reqs[0].SrcAddr != reqs[0].PeerAddr || reqs[0].SrcAddr.Addr() == netip.MustParseAddr("10.0.0.1") {
		t.Errorf("SrcAddr = %s with Forwarded for=10.0.0.1:5555 from peer %s, want the peer", reqs[0].SrcAddr, reqs[0].PeerAddr)
	}
	if got := fmt.Sprint(reqs[0].SrcIdentity); got != clientID.String() {
		t.Errorf("SrcIdentity = %s", got)
	}
}

// The server pings a connection that has been silent for PingInterval.
func TestServerPingsIdleClient(t *testing.T) {
	m := newMesh(t)
	srv := startServer(t, m, func(c *ServerConfig) {
		c.PingInterval = 100 * time.Millisecond
		c.PingTimeout = 5 * time.Second
	})
	rc := newRawClient(t, m, srv.addr)
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			t.Fatalf("no PING before the connection failed: %v", err)
		}
		if p, ok := f.(*http2.PingFrame); ok && !p.IsAck() {
			return
		}
	}
}

// The client closes a connection whose peer stops answering PINGs, which
// fails its tunnels instead of leaving them hanging.
func TestClientDetectsDeadPeer(t *testing.T) {
	m := newMesh(t)
	srvTLS, err := ServerTLS(m.tlsConfig(t, serverID))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srvTLS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	// A server that answers the first CONNECT with 200 and then goes
	// silent: it keeps reading but never acknowledges anything.
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		preface := make([]byte, len(http2.ClientPreface))
		if _, err := io.ReadFull(c, preface); err != nil {
			return
		}
		fr := http2.NewFramer(c, c)
		fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		fr.WriteSettings()
		var hbuf bytes.Buffer
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			if h, ok := f.(*http2.MetaHeadersFrame); ok {
				hpack.NewEncoder(&hbuf).WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
				fr.WriteHeaders(http2.HeadersFrameParam{StreamID: h.StreamID, BlockFragment: hbuf.Bytes(), EndHeaders: true})
			}
		}
	}()
	cl := newClient(t, m, clientID, func(c *ClientConfig) {
		c.PingInterval = 100 * time.Millisecond
		c.PingTimeout = 200 * time.Millisecond
	})
	conn, err := cl.Dial(ctxTimeout(t), Target{
		Addr:               ln.Addr().(*net.TCPAddr).AddrPort(),
		Authority:          netip.MustParseAddrPort("127.0.0.1:8080"),
		ExpectedIdentities: []identity.Identity{serverID},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.ReadAll(conn); err == nil {
		t.Fatal("tunnel to a dead peer ended cleanly; want an error")
	}
	eventually(t, "dead connection dropped from the pool", func() bool { return cl.Conns() == 0 })
}

// TestConformanceHalfClose, frame by frame: the app's FIN reaches the
// client as END_STREAM on DATA, not as RST_STREAM, and DATA the client
// sends afterwards (then its own END_STREAM) still reaches the app.
func TestConformanceHalfClose(t *testing.T) {
	m := newMesh(t)
	got := make(chan []byte, 1)
	app := serveTCP(t, func(c net.Conn) {
		c.Write([]byte("answer"))
		c.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(c)
		got <- b
	})
	srv := startServer(t, m, nil)
	rc := newRawClient(t, m, srv.addr)
	rc.headers(1, false, ":method", "CONNECT", ":authority", app.String())
	if ev := rc.next(1); ev.status != 200 || ev.endStream {
		t.Fatalf("CONNECT answered %+v, want an open 200", ev)
	}
	var answer []byte
	for {
		ev := rc.next(1)
		if ev.reset {
			t.Fatalf("stream reset after %q; want END_STREAM", answer)
		}
		answer = append(answer, ev.data...)
		if ev.endStream {
			break
		}
	}
	if string(answer) != "answer" {
		t.Fatalf("answer %q", answer)
	}
	if err := rc.fr.WriteData(1, false, []byte("late ")); err != nil {
		t.Fatal(err)
	}
	if err := rc.fr.WriteData(1, true, []byte("data")); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if string(b) != "late data" {
			t.Fatalf("app read %q after its FIN, want %q", b, "late data")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("app never got the client's data and FIN")
	}
	// Both directions ended: the stream is closed with no reset, so a
	// PING round trip comes back with nothing for stream 1 before it.
	if err := rc.fr.WritePing(false, [8]byte{1}); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if p, ok := f.(*http2.PingFrame); ok && p.IsAck() {
			break
		}
		if f.Header().StreamID == 1 {
			t.Fatalf("frame %v on the finished stream", f.Header().Type)
		}
	}
	eventually(t, "clean outcome", func() bool { _, o := srv.observed(); return len(o) == 1 })
	if _, outs := srv.observed(); outs[0].Err != nil || outs[0].BytesIn != 9 || outs[0].BytesOut != 6 {
		t.Fatalf("outcome %+v, want no error, 9 bytes in, 6 out", outs[0])
	}
}

// TestRapidResetBounded: a client that opens streams and resets each at
// once (CVE-2023-44487) gets REFUSED_STREAM once h2MaxStreams handlers
// are still running, so it can never have more than that many upstream
// dials in flight.
func TestRapidResetBounded(t *testing.T) {
	m := newMesh(t)
	release := make(chan struct{})
	var mu sync.Mutex
	inFlight, peak := 0, 0
	srv := startServer(t, m, func(c *ServerConfig) {
		c.DialUpstream = func(context.Context, Request) (net.Conn, error) {
			mu.Lock()
			inFlight++
			peak = max(peak, inFlight)
			mu.Unlock()
			<-release // a dial that ignores the stream's reset
			mu.Lock()
			inFlight--
			mu.Unlock()
			return nil, errors.New("no upstream in this test")
		}
	})
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	rc := newRawClient(t, m, srv.addr)
	const streams = h2MaxStreams + 50
	for i := range streams {
		id := uint32(1 + 2*i)
		rc.headers(id, false, ":method", "CONNECT", ":authority", "127.0.0.1:9")
		if err := rc.fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
			t.Fatal(err)
		}
	}
	// The server answers streams beyond the limit with REFUSED_STREAM.
	refused := 0
	for refused == 0 {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			t.Fatalf("no REFUSED_STREAM before the connection failed: %v", err)
		}
		if r, ok := f.(*http2.RSTStreamFrame); ok && r.ErrCode == http2.ErrCodeRefusedStream {
			refused++
		}
	}
	mu.Lock()
	p := peak
	mu.Unlock()
	if p > h2MaxStreams {
		t.Fatalf("%d upstream dials in flight, want at most %d", p, h2MaxStreams)
	}
	close(release)
}

// TestResetStreamReturnsWindow: data a stream received but nobody will
// read (the upstream is stuck, then the client resets the stream) is
// given back to the connection's flow-control window, so resets cannot
// starve the connection's other streams.
func TestResetStreamReturnsWindow(t *testing.T) {
	m := newMesh(t)
	var mu sync.Mutex
	var stuck []net.Conn
	srv := startServer(t, m, func(c *ServerConfig) {
		c.DialUpstream = func(context.Context, Request) (net.Conn, error) {
			// An upstream that never reads: the relay's first write
			// blocks, the rest stays in the stream's buffer.
			a, b := net.Pipe()
			mu.Lock()
			stuck = append(stuck, b)
			mu.Unlock()
			return a, nil
		}
	})
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range stuck {
			c.Close()
		}
	})
	rc := newRawClient(t, m, srv.addr)
	chunk := make([]byte, 1<<20)
	for _, id := range []uint32{1, 3} {
		rc.headers(id, false, ":method", "CONNECT", ":authority", "127.0.0.1:9")
		if ev := rc.next(id); ev.status != 200 {
			t.Fatalf("stream %d answered %+v", id, ev)
		}
		for range 3 { // 3 MiB, within the 4 MiB stream window
			if err := rc.fr.WriteData(id, false, chunk); err != nil {
				t.Fatal(err)
			}
		}
	}
	before := rc.connWindowInc
	for _, id := range []uint32{1, 3} {
		if err := rc.fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
			t.Fatal(err)
		}
	}
	// 6 MiB dropped: more than the quarter of the 16 MiB window after
	// which the server returns it.
	for rc.connWindowInc-before < 4<<20 {
		f, err := rc.fr.ReadFrame()
		if err != nil {
			t.Fatalf("connection window grew by %d after the resets, want >= 4 MiB: %v", rc.connWindowInc-before, err)
		}
		if wu, ok := f.(*http2.WindowUpdateFrame); ok && wu.StreamID == 0 {
			rc.connWindowInc += wu.Increment
		}
	}
}

// TestResponseBaggage: a server with ResponseBaggage answers the 200 of
// a tunnel with the destination's baggage, as ztunnel's build_response
// does, read here by a raw HTTP/2 client as ztunnel's client reads it;
// a refused CONNECT carries none.
func TestResponseBaggage(t *testing.T) {
	m := newMesh(t)
	echo := echoServer(t)
	b := Baggage{ClusterName: "Kubernetes", Namespace: "shop", WorkloadKind: "pod", WorkloadName: "api",
		ServiceName: "api", ServiceVersion: "v2", Region: "r1", Zone: "z1"}
	srv := startServer(t, m, func(c *ServerConfig) { c.ResponseBaggage = func(Request) Baggage { return b } })
	rc := newRawClient(t, m, srv.addr)
	rc.headers(1, false, ":method", "CONNECT", ":authority", echo.String())
	ev := rc.next(1)
	if ev.status != 200 || ParseBaggage([]string{ev.baggage}) != b {
		t.Errorf("200 with baggage %q, want %q", ev.baggage, b.String())
	}
	rc.headers(3, true, ":method", "CONNECT", ":authority", "192.0.2.1:80")
	if ev := rc.next(3); ev.status != 400 || ev.baggage != "" {
		t.Errorf("refusal %+v, want 400 without baggage", ev)
	}
}
