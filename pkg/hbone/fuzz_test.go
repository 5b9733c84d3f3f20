package hbone

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/ambpf/ambpf/pkg/writebatch"
)

// FuzzConnectRequest drives the server's request checks (the same code
// for HTTP/2 and HTTP/3) with arbitrary methods, :authority values and
// Forwarded headers. The upstream dial always fails, so a request the
// checks admit ends in 503 and one they refuse in 400. Properties: those
// are the only outcomes; a request reaches the dial exactly when it is a
// CONNECT to ip:port of one of this pod's IPs on a port that is not the
// proxy's own, with the destination normalised (IPv4-mapped unmapped);
// the source is the Forwarded address when that parses, else the peer.
func FuzzConnectRequest(f *testing.F) {
	for _, s := range []struct {
		method, authority, forwarded string
		h3                           bool
	}{
		{"CONNECT", "10.0.0.5:8080", `for="10.0.0.9:1234"`, false},
		{"CONNECT", "[fd00::5]:80", `for="[fd00::9]:5"`, true},
		{"CONNECT", "[::ffff:10.0.0.5]:80", "", false},
		{"CONNECT", "10.0.0.5:15008", "", false},
		{"CONNECT", "10.0.0.6:80", "", false},
		{"CONNECT", "10.0.0.5:0", "for=unknown", false},
		{"CONNECT", "[fe80::1%eth0]:80", `for="[fe80::2%eth0]:1"`, false},
		{"GET", "10.0.0.5:80", "", false},
		{"CONNECT", "example.com:443", "for=10.0.0.9;proto=https, for=10.0.0.8", true},
		{"CONNECT", "10.0.0.5", `for="10.0.0.9:99999"`, false},
	} {
		f.Add(s.method, s.authority, s.forwarded, s.h3)
	}
	m := newMesh(f)
	podIPs := []netip.Addr{netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("fd00::5")}
	var dialed *Request
	errNoUpstream := errors.New("no upstream in this test")
	s, err := NewServer(ServerConfig{
		TLS:    m.tlsConfig(f, serverID),
		PodIPs: podIPs,
		DialUpstream: func(_ context.Context, r Request) (net.Conn, error) {
			dialed = &r
			return nil, errNoUpstream
		},
		Logger: quietLogs,
	})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })

	f.Fuzz(func(t *testing.T, method, authority, forwarded string, h3 bool) {
		dialed = nil
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.Method, r.Host, r.URL = method, authority, &url.URL{Host: authority}
		r.Header = http.Header{HeaderForwarded: {forwarded}}
		w := httptest.NewRecorder()
		if h3 {
			r.Proto = H3Protocol
			s.serve(w, r, TransportH3, s.relayH3)
		} else {
			r.Proto, r.ProtoMajor, r.ProtoMinor = "HTTP/2.0", 2, 0
			s.serveStream(w, r)
		}

		want, valid := validTarget(method, authority, podIPs)
		switch {
		case w.Code != http.StatusBadRequest && w.Code != http.StatusServiceUnavailable:
			t.Fatalf("%s %q: status %d, want 400 or 503", method, authority, w.Code)
		case (dialed != nil && w.Code != http.StatusServiceUnavailable) ||
			(dialed == nil && w.Code == http.StatusServiceUnavailable && !proxyPortTarget(authority)):
			// 503 means dialled, or a target on a proxy port (refused
			// with 503 as ztunnel does).
			t.Fatalf("%s %q: status %d but dialed=%v", method, authority, w.Code, dialed != nil)
		case valid != (dialed != nil):
			t.Fatalf("%s %q: a valid target is %v, the server dialed: %v", method, authority, valid, dialed != nil)
		case dialed == nil:
			return
		case dialed.Dst != want:
			t.Fatalf("%s %q: dialed %v, want %v", method, authority, dialed.Dst, want)
		}
		// The source is the connection's peer, whatever Forwarded claims
		// (it is informational only, as in ztunnel).
		if dialed.SrcAddr != dialed.PeerAddr {
			t.Fatalf("Forwarded %q: source %v, want the peer %v", forwarded, dialed.SrcAddr, dialed.PeerAddr)
		}
	})
}

// validTarget is the rule a CONNECT must pass, written from the spec
// (shared/spec/hbone.md) rather than from the server's code.
func validTarget(method, authority string, podIPs []netip.Addr) (netip.AddrPort, bool) {
	if method != http.MethodConnect {
		return netip.AddrPort{}, false
	}
	ap, err := netip.ParseAddrPort(authority)
	if err != nil || ap.Addr().Zone() != "" || ap.Port() == 0 {
		return netip.AddrPort{}, false
	}
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	if !slices.Contains(podIPs, ap.Addr()) {
		return netip.AddrPort{}, false
	}
	switch ap.Port() {
	case OutboundPort, InboundPlaintextPort, InboundHBONEPort:
		return netip.AddrPort{}, false
	}
	return ap, true
}

// FuzzForwarded checks that any address survives FormatForwarded then
// ParseForwarded (unmapped), and that parsing an arbitrary header never
// yields an address a socket could not use: invalid, IPv4-mapped, or
// carrying a zone from another host.
func FuzzForwarded(f *testing.F) {
	f.Add(`for="10.0.0.1:80"`, []byte{10, 0, 0, 1}, uint16(80))
	f.Add(`For=[2001:db8::1];proto=http`, []byte(netip.MustParseAddr("2001:db8::1").AsSlice()), uint16(0))
	f.Add(`for="[fe80::1%25eth0]:1", for=10.0.0.2`, []byte(netip.MustParseAddr("::ffff:10.0.0.3").AsSlice()), uint16(7))
	f.Add(`for=_hidden;by=10.0.0.1`, []byte{}, uint16(1))
	f.Fuzz(func(t *testing.T, header string, ip []byte, port uint16) {
		if got, ok := ParseForwarded([]string{header}); ok {
			if a := got.Addr(); !a.IsValid() || a.Is4In6() || a.Zone() != "" {
				t.Fatalf("ParseForwarded(%q) = %v: not a usable source address", header, got)
			}
		}
		a, ok := netip.AddrFromSlice(ip)
		if !ok {
			return
		}
		in := netip.AddrPortFrom(a, port)
		got, ok := ParseForwarded([]string{FormatForwarded(in)})
		if want := netip.AddrPortFrom(a.Unmap(), port); !ok || got != want {
			t.Fatalf("round trip of %v through %q: %v, %v", in, FormatForwarded(in), got, ok)
		}
	})
}

// FuzzBaggage checks that the baggage header carries every value intact
// (percent-decoding gives it back) and only bytes the W3C grammar allows,
// so no value can add or split an entry.
func FuzzBaggage(f *testing.F) {
	f.Add("Kubernetes", "ns", "Deployment", "web", "svc", "v1")
	f.Add("a,b", "c;d", "StatefulSet", "e=f", "%41", "\x00\xff \"\\")
	f.Fuzz(func(t *testing.T, cluster, ns, kind, name, svc, version string) {
		// Kinds are Kubernetes type names (letters only); they form a key,
		// which baggage cannot escape.
		kind = strings.Map(func(r rune) rune {
			if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' {
				return r
			}
			return -1
		}, kind)
		b := Baggage{ClusterName: cluster, Namespace: ns, WorkloadKind: kind, WorkloadName: name, ServiceName: svc, ServiceVersion: version}
		want := map[string]string{}
		for k, v := range map[string]string{"k8s.cluster.name": cluster, "k8s.namespace.name": ns, "service.name": svc, "service.version": version} {
			if v != "" {
				want[k] = v
			}
		}
		if kind != "" && name != "" {
			want["k8s."+strings.ToLower(kind)+".name"] = name
		}
		s := b.String()
		got := map[string]string{}
		if s != "" {
			for entry := range strings.SplitSeq(s, ",") {
				k, v, ok := strings.Cut(entry, "=")
				if !ok {
					t.Fatalf("%q: entry %q has no '='", s, entry)
				}
				for i := 0; i < len(v); i++ {
					if c := v[i]; c <= 0x20 || c >= 0x7f || strings.IndexByte("\",;\\", c) >= 0 {
						t.Fatalf("%q: value %q holds %q", s, v, c)
					}
				}
				dec, err := url.PathUnescape(v)
				if err != nil {
					t.Fatalf("%q: value %q does not decode: %v", s, v, err)
				}
				got[k] = dec
			}
		}
		if len(got) != len(want) {
			t.Fatalf("%q: entries %q, want %q", s, got, want)
		}
		for k, v := range want {
			if got[k] != v {
				t.Fatalf("%q: %s=%q, want %q", s, k, got[k], v)
			}
		}
	})
}

// proxyPortTarget reports whether authority is ip:port on one of the
// proxy's own ports.
func proxyPortTarget(authority string) bool {
	ap, err := netip.ParseAddrPort(authority)
	if err != nil {
		return false
	}
	switch ap.Port() {
	case OutboundPort, InboundPlaintextPort, InboundHBONEPort:
		return true
	}
	return false
}

// FuzzClientFrames drives the HTTP/2 client connection (h2conn.go,
// h2client.go) with arbitrary frames from a server, after a valid
// SETTINGS: each input is a list of frames, 4 header bytes (type, flags,
// stream ID 0-7, payload length) then the payload. Properties: no panic;
// opening a stream ends (answered, refused or failed) once the server
// stops; a stream it returned ends too, and the connection is then
// dead, with nothing left waiting.
func FuzzClientFrames(f *testing.F) {
	var hb bytes.Buffer
	hpack.NewEncoder(&hb).WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
	ok := append([]byte{byte(http2.FrameHeaders), byte(http2.FlagHeadersEndHeaders), 1, byte(hb.Len())}, hb.Bytes()...)
	f.Add(ok)
	f.Add(append(bytes.Clone(ok), byte(http2.FrameData), byte(http2.FlagDataEndStream), 1, 3, 'a', 'b', 'c'))
	f.Add(append(bytes.Clone(ok), byte(http2.FrameRSTStream), 0, 1, 4, 0, 0, 0, 8))
	f.Add([]byte{byte(http2.FrameGoAway), 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{byte(http2.FrameSettings), 0, 0, 6, 0, 4, 0xff, 0xff, 0xff, 0xff})
	f.Add(append(bytes.Clone(ok), byte(http2.FrameWindowUpdate), 0, 1, 4, 0x7f, 0xff, 0xff, 0xff))
	f.Fuzz(func(t *testing.T, in []byte) {
		cside, sside := net.Pipe()
		defer sside.Close()
		go io.Copy(io.Discard, sside)
		c, err := startH2Client(cside, &writebatch.Conn{Conn: cside}, HTTP2Settings{}.withDefaults(), time.Hour, time.Hour, quietLogs)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			fr := http2.NewFramer(sside, nil)
			fr.WriteSettings()
			for len(in) >= 4 {
				n := min(int(in[3]), len(in)-4)
				if fr.WriteRawFrame(http2.FrameType(in[0]), http2.Flags(in[1]), uint32(in[2]), in[4:4+n]) != nil {
					return
				}
				in = in[4+n:]
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		type result struct {
			s   *h2stream
			err error
		}
		opened := make(chan result, 1)
		go func() {
			s, err := c.openStream(ctx, "10.0.0.5:80", http.Header{})
			opened <- result{s, err}
		}()
		<-done
		sside.Close() // the server is gone: everything must end now
		r := <-opened
		if r.err == nil {
			io.ReadAll(r.s)        // ends: at END_STREAM, a reset or the teardown
			r.s.Write([]byte("x")) // fails or succeeds, never hangs
			r.s.CloseWrite()
		} else if ctx.Err() != nil {
			t.Fatalf("openStream waited until its deadline: %v", r.err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for !c.closed() {
			if time.Now().After(deadline) {
				t.Fatal("connection not torn down after the server left")
			}
			time.Sleep(time.Millisecond)
		}
	})
}
