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
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/writebatch"
)

// xnetServer is an HBONE server made of x/net/http2's Server, an HTTP/2
// implementation independent of this package's framing, with a CONNECT
// handler that echoes the tunnel until the client's end of data, then
// sends "bye" and ends the response.
type xnetServer struct {
	addr     netip.AddrPort
	hs       *http.Server // for Shutdown: x/net's GOAWAY to every connection
	accepted atomic.Int32
	// resets counts handlers whose request body ended with an error
	// (the client reset the stream), not with io.EOF.
	resets atomic.Int32
	mu     sync.Mutex
	hdrs   []http.Header
	hosts  []string
}

func startXNetServer(t *testing.T, m *mesh) *xnetServer {
	t.Helper()
	tlsConf, err := ServerTLS(m.tlsConfig(t, serverID))
	if err != nil {
		t.Fatal(err)
	}
	xs := &xnetServer{}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		xs.mu.Lock()
		xs.hdrs = append(xs.hdrs, r.Header.Clone())
		xs.hosts = append(xs.hosts, r.Host)
		xs.mu.Unlock()
		if r.Method != http.MethodConnect {
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		rc.Flush()
		buf := make([]byte, 64<<10)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return
				}
				rc.Flush()
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				xs.resets.Add(1)
				return
			}
		}
		io.WriteString(w, "bye")
	})
	h2s := &http2.Server{}
	xs.hs = &http.Server{Handler: handler}
	if err := http2.ConfigureServer(xs.hs, h2s); err != nil {
		t.Fatal(err)
	}
	xs.addr = serveTCP(t, func(c net.Conn) {
		xs.accepted.Add(1)
		tc := tls.Server(c, tlsConf)
		if err := tc.Handshake(); err != nil {
			return
		}
		h2s.ServeConn(tc, &http2.ServeConnOpts{BaseConfig: xs.hs, Handler: handler})
	})
	return xs
}

func (xs *xnetServer) target() Target {
	return Target{
		Addr:               xs.addr,
		Authority:          netip.MustParseAddrPort("10.1.2.3:8080"),
		ExpectedIdentities: []identity.Identity{serverID},
		SourceAddr:         netip.MustParseAddrPort("10.9.8.7:40000"),
	}
}

// echoAndClose writes data through c, reads it back while writing (the
// server echoes), half-closes, and checks that what follows is "bye" and
// a clean end of stream.
func echoAndClose(t *testing.T, c net.Conn, data []byte) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.(*Conn).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read the echo: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("write: %v", err)
	}
	want := append(bytes.Clone(data), "bye"...)
	if !bytes.Equal(got, want) {
		t.Fatalf("echo: got %d bytes, want %d (data then bye)", len(got), len(want))
	}
}

// TestClientInteropXNetServer drives this package's HTTP/2 client against
// x/net's server: CONNECT with :authority and the HBONE headers, bulk
// data beyond every flow-control window in both directions, END_STREAM
// each way on its own (the server reads our end of data, then still
// sends), pooling, RST_STREAM when a tunnel is closed early, and a GOAWAY
// that moves new tunnels to a new connection while the old ones finish.
func TestClientInteropXNetServer(t *testing.T) {
	m := newMesh(t)
	xs := startXNetServer(t, m)
	cl := newClient(t, m, clientID, nil)
	ctx := ctxTimeout(t)

	t.Run("bulk and half-close", func(t *testing.T) {
		c, err := cl.Dial(ctx, xs.target())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		data := make([]byte, 24<<20) // above the 16 MiB connection window
		rand.Read(data)
		echoAndClose(t, c, data)
		xs.mu.Lock()
		host, fwd := xs.hosts[len(xs.hosts)-1], xs.hdrs[len(xs.hdrs)-1].Get(HeaderForwarded)
		xs.mu.Unlock()
		if host != "10.1.2.3:8080" || fwd != FormatForwarded(xs.target().SourceAddr) {
			t.Errorf("server saw :authority %q, Forwarded %q", host, fwd)
		}
	})

	t.Run("pooled streams", func(t *testing.T) {
		before := xs.accepted.Load()
		var wg sync.WaitGroup
		for i := range 20 {
			wg.Go(func() {
				c, err := cl.Dial(ctx, xs.target())
				if err != nil {
					t.Error(err)
					return
				}
				defer c.Close()
				msg := bytes.Repeat([]byte{byte('a' + i)}, 1000+i)
				errc := make(chan error, 1)
				go func() {
					_, err := c.Write(msg)
					if err == nil {
						err = c.(*Conn).CloseWrite()
					}
					errc <- err
				}()
				got, err := io.ReadAll(c)
				if err := errors.Join(err, <-errc); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(got, append(msg, "bye"...)) {
					t.Errorf("tunnel %d: got %d bytes", i, len(got))
				}
			})
		}
		wg.Wait()
		if n := xs.accepted.Load() - before; n != 0 {
			t.Errorf("20 tunnels opened %d new TCP connections, want 0 (the pooled one)", n)
		}
	})

	t.Run("reset on early close", func(t *testing.T) {
		before := xs.resets.Load()
		c, err := cl.Dial(ctx, xs.target())
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("ping"))
		buf := make([]byte, 4)
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
		c.Close() // neither direction ended: RST_STREAM
		eventually(t, "x/net's handler sees the stream reset", func() bool { return xs.resets.Load() > before })
	})

	t.Run("GOAWAY moves the pool", func(t *testing.T) {
		old, err := cl.Dial(ctx, xs.target())
		if err != nil {
			t.Fatal(err)
		}
		defer old.Close()
		before := xs.accepted.Load()
		// Shutdown makes x/net send GOAWAY on its connections; it has no
		// listener or tracked connection of its own, so it returns.
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := xs.hs.Shutdown(sctx); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the pooled connection takes the GOAWAY", func() bool {
			cl.mu.Lock()
			defer cl.mu.Unlock()
			for _, list := range cl.pool {
				for _, pc := range list {
					if !pc.h2.usable(0, 1) {
						return true
					}
				}
			}
			return false
		})
		c, err := cl.Dial(ctx, xs.target())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if n := xs.accepted.Load() - before; n != 1 {
			t.Errorf("tunnel after GOAWAY: %d new TCP connections, want 1", n)
		}
		echoAndClose(t, c, []byte("new connection"))
		// The tunnel opened before the GOAWAY goes on to its end.
		echoAndClose(t, old, []byte("old connection"))
		old.Close()
		eventually(t, "the drained connection closed", func() bool { return cl.Conns() == 1 })
	})
}

// TestClientHonoursHeaderTableSize: a server that allows no HPACK dynamic
// table (SETTINGS_HEADER_TABLE_SIZE 0) decodes every CONNECT the client
// sends, the second included (with a dynamic table, the client's second
// block would refer to entries its first one added).
func TestClientHonoursHeaderTableSize(t *testing.T) {
	cside, sside := net.Pipe()
	t.Cleanup(func() { cside.Close(); sside.Close() })
	sfr := http2.NewFramer(sside, sside)
	sfr.ReadMetaHeaders = hpack.NewDecoder(0, nil)
	settingsSent := make(chan error, 1)
	go func() { settingsSent <- sfr.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0}) }()
	frames := make(chan http2.Frame)
	go func() {
		// The server's reader: net.Pipe blocks the client's writes
		// (its preface first) until they are read.
		preface := make([]byte, len(http2.ClientPreface))
		if _, err := io.ReadFull(sside, preface); err != nil {
			close(frames)
			return
		}
		for {
			f, err := sfr.ReadFrame()
			if err != nil {
				close(frames)
				return
			}
			if mh, ok := f.(*http2.MetaHeadersFrame); ok {
				frames <- mh
			}
		}
	}()
	c, err := startH2Client(cside, &writebatch.Conn{Conn: cside}, HTTP2Settings{}.withDefaults(), time.Hour, time.Hour, quietLogs)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-settingsSent; err != nil {
		t.Fatal(err)
	}
	eventually(t, "the client applies the server's SETTINGS", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.peerHeaderTable == 0
	})
	h := http.Header{"X-Long-Header": {strings.Repeat("v", 50)}}
	for i := range 2 {
		go c.openStream(context.Background(), "10.0.0.5:80", h)
		f, ok := <-frames
		if !ok {
			t.Fatalf("CONNECT %d: the server could not decode the client's frames", i+1)
		}
		mh := f.(*http2.MetaHeadersFrame)
		if mh.PseudoValue("authority") != "10.0.0.5:80" || len(mh.RegularFields()) != 1 || mh.RegularFields()[0].Value != h.Get("X-Long-Header") {
			t.Fatalf("CONNECT %d decoded as %v", i+1, mh.Fields)
		}
	}
}
