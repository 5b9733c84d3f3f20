//go:build linux

package proxy

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/hbone"
	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/meshconst"
	"github.com/ambpf/ambpf/pkg/nettest"
)

// TestMeshToMeshThroughZDS enrols two pods through a real ZDS server and
// checks readiness, that A -> B is carried over HBONE (a capture on the
// node bridge sees port 15008 and never the payload) and that B's app sees
// A's pod IP.
func TestMeshToMeshThroughZDS(t *testing.T) {
	e := newEnv(t, envOptions{pods: 2, zds: true})
	if code, body := get(t, e.p.ReadyAddr(), "/healthz/ready"); code != http.StatusServiceUnavailable {
		t.Fatalf("ready before any ZDS snapshot: %d %s", code, body)
	}
	e.startZDS()
	waitFor(t, "readiness after the snapshot", func() bool {
		code, _ := get(t, e.p.ReadyAddr(), "/healthz/ready")
		return code == http.StatusOK
	})
	e.enroll(0, "ns-a", "sa-a")
	e.enroll(1, "ns-b", "sa-b")
	e.app(1, "b")

	const payload = "PAYLOAD-7c3e-must-not-appear-in-clear"
	dump := e.meshEcho(0, 1, "b", "tcp", payload)
	hbonePort := fmt.Sprintf("%s.%d", e.lab.Pod(1).IPv4, meshconst.InboundHBONEPort)
	if !strings.Contains(dump, hbonePort) {
		t.Errorf("capture has no TCP to %s:\n%s", hbonePort, dump)
	}
	e.waitLog("connection complete", "direction=outbound", "security=mutual_tls", "dst.identity=spiffe://cluster.local/ns/ns-b/sa/sa-b")
	e.waitLog("connection complete", "direction=inbound", "src.identity=spiffe://cluster.local/ns/ns-a/sa/sa-a")
}

// TestPassthroughToNonMesh: a destination discovery does not know is
// reached as plain TCP from the pod's own address.
func TestPassthroughToNonMesh(t *testing.T) {
	e := newEnv(t, envOptions{pods: 2})
	e.enroll(0, "ns-a", "sa-a")
	app := e.app(1, "plain")
	c := e.mustConnect(0, appAddr(e, 1))
	if want := "app plain peer=" + e.lab.Pod(0).IPv4.String(); c.Greeting != want {
		t.Fatalf("greeting %q, want %q", c.Greeting, want)
	}
	if err := c.Echo("hello"); err != nil {
		t.Fatal(err)
	}
	if seen := app.Seen(); len(seen) != 1 {
		t.Fatalf("app saw %d connections, want 1", len(seen))
	}
	c.Close()
	e.waitLog("connection complete", "direction=outbound", "security=unknown", "dst.addr="+appAddr(e, 1))
}

// TestServiceVIP: a connection to a Service VIP (assigned nowhere) reaches
// one of its endpoints, over HBONE because the endpoint is a mesh pod.
func TestServiceVIP(t *testing.T) {
	const vip = "10.96.7.7"
	e := newEnv(t, envOptions{pods: 3, discovery: `
services:
- name: echo
  namespace: ns-b
  vips: [` + vip + `]
  ports: {80: 8080}
  endpoints: [{ip: "{{pod1}}"}, {ip: "{{pod2}}"}]
`})
	e.enroll(0, "ns-a", "sa-a")
	e.enroll(1, "ns-b", "echo")
	e.enroll(2, "ns-b", "echo")
	e.app(1, "b1")
	e.app(2, "b2")
	capt := e.startCapture()
	got := e.spread(vip+":80", 2)
	if len(got) != 2 {
		t.Errorf("connections reached %v, want both endpoints", got)
	}
	dump := capt.stop(t)
	if !strings.Contains(dump, fmt.Sprintf(".%d:", meshconst.InboundHBONEPort)) {
		t.Errorf("capture has no HBONE traffic:\n%s", dump)
	}
	e.waitLog("connection complete", "direction=outbound", "dst.service=echo.ns-b.svc.cluster.local", "security=mutual_tls")
}

// TestRefusals: a server whose certificate does not match what discovery
// expects, a client from another trust domain and a DENY policy are each
// refused, with the reason logged; a DENY policy added later closes an
// open tunnel.
func TestRefusals(t *testing.T) {
	e := newEnv(t, envOptions{pods: 3, discovery: `
workloads:
- name: pod1
  namespace: ns-b
  serviceAccount: impostor
`})
	e.enroll(0, "ns-a", "sa-a")
	e.enroll(1, "ns-b", "sa-b") // discovery says sa "impostor"
	e.enroll(2, "ns-c", "sa-c")
	e.app(1, "b")
	e.app(2, "c")

	t.Run("identity mismatch", func(t *testing.T) {
		if c, err := e.connect(0, appAddr(e, 1)); err == nil {
			c.Close()
			t.Fatal("connection to a server with the wrong identity succeeded")
		}
		e.waitLog("connection complete", "reason=\"server identity mismatch\"", "spiffe://cluster.local/ns/ns-b/sa/impostor")
	})

	t.Run("other trust domain", func(t *testing.T) {
		other, err := identity.LoadOrCreate(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		evil := identity.MustParse("spiffe://evil.local/ns/x/sa/y")
		// From a second CA, and from the mesh CA itself: the server must
		// refuse both, the first as an unknown chain, the second by its
		// trust domain.
		for name, issuer := range map[string]identity.Issuer{"second CA": other, "mesh CA": e.p.CA()} {
			src, err := identity.NewSource(identity.SourceConfig{Identity: evil, Issuer: issuer})
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			pool := x509.NewCertPool()
			for _, c := range append(other.RootCertificates(), e.p.CA().RootCertificates()...) {
				pool.AddCert(c)
			}
			node := e.lab.Node
			cl, err := hbone.NewClient(hbone.ClientConfig{
				TLS: hbone.TLSConfig{Credentials: src, Roots: func() *x509.CertPool { return pool }},
				Dial: func(ctx context.Context, _ netip.Addr, dst netip.AddrPort) (net.Conn, error) {
					return node.Dial(ctx, "tcp", dst.String())
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			dst := netip.AddrPortFrom(e.lab.Pod(2).IPv4, nettest.AppPort)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			conn, err := cl.Dial(ctx, hbone.Target{
				Addr: netip.AddrPortFrom(dst.Addr(), hbone.Port), Authority: dst,
				ExpectedIdentities: []identity.Identity{identity.MustParse("spiffe://cluster.local/ns/ns-c/sa/sa-c")},
			})
			cancel()
			if err == nil {
				conn.Close()
				t.Fatalf("%s: tunnel from another trust domain was accepted", name)
			}
		}
		e.waitLog("hbone handshake failed", "peer="+nettest.BridgeV4.String(), "unknown authority")
		e.waitLog("hbone handshake failed", "peer="+nettest.BridgeV4.String(), `is not in trust domain \"cluster.local\"`)
	})

	t.Run("deny policy", func(t *testing.T) {
		open := e.mustConnect(0, appAddr(e, 2))
		if err := open.Echo("before policy"); err != nil {
			t.Fatal(err)
		}
		e.writeDiscovery(`
workloads:
- name: pod1
  namespace: ns-b
  serviceAccount: impostor
---` + denyFromA("ns-c"))
		// The open tunnel is closed by the policy change.
		open.Conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(open.Conn); errors.Is(err, timeoutErr) {
			t.Fatalf("open tunnel survived the DENY policy: %v", err)
		}
		e.waitLog("closing hbone tunnel after policy change", "denied by DENY policy ns-c/no-a")
		if c, err := e.connect(0, appAddr(e, 2)); err == nil {
			c.Close()
			t.Fatal("connection denied by policy succeeded")
		}
		e.waitLog("hbone request refused", "status=401", "denied by DENY policy ns-c/no-a")
		e.waitLog("connection complete", "direction=outbound", "401 Unauthorized")
	})
}

// timeoutErr matches a deadline expiry with errors.Is.
var timeoutErr = errTimeout{}

type errTimeout struct{}

func (errTimeout) Error() string { return "timeout" }
func (errTimeout) Is(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestInboundPlaintext: STRICT refuses plaintext on 15006, PERMISSIVE
// accepts it (the app sees the client's IP), and switching a namespace to
// STRICT closes its open plaintext connections.
func TestInboundPlaintext(t *testing.T) {
	const permissive = `
mtls:
  mode: PERMISSIVE
  namespaces: {tight: STRICT}
`
	e := newEnv(t, envOptions{pods: 3, discovery: permissive})
	e.enroll(1, "loose", "sa-b")
	e.enroll(2, "tight", "sa-c")
	e.app(1, "b")
	e.app(2, "c")

	c := e.mustConnect(0, appAddr(e, 1))
	if want := "app b peer=" + e.lab.Pod(0).IPv4.String(); c.Greeting != want {
		t.Fatalf("greeting %q, want %q", c.Greeting, want)
	}
	if err := c.Echo("plaintext ok"); err != nil {
		t.Fatal(err)
	}
	if s, err := e.connect(0, appAddr(e, 2)); err == nil {
		s.Close()
		t.Fatal("STRICT namespace accepted plaintext")
	}
	e.waitLog("inbound plaintext connection refused", "mTLS mode STRICT for namespace tight")

	e.writeDiscovery("mtls: {mode: STRICT}\n")
	c.Conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c.Conn); errors.Is(err, timeoutErr) {
		t.Fatal("plaintext connection survived the switch to STRICT")
	}
	e.waitLog("closing plaintext connection after policy change")
}

// TestConfigMTLSMode: Config.MTLSMode (the --mtls-mode flag, the chart's
// mtlsMode) makes the mesh STRICT when nothing else sets a mode, and a
// mesh-wide mode from discovery wins over it.
func TestConfigMTLSMode(t *testing.T) {
	e := newEnv(t, envOptions{pods: 2, mtlsMode: discovery.MTLSStrict})
	e.enroll(1, "shop", "sa-b")
	e.app(1, "b")
	if s, err := e.connect(0, appAddr(e, 1)); err == nil {
		s.Close()
		t.Fatal("Config.MTLSMode STRICT: plaintext accepted")
	}
	e.waitLog("inbound plaintext connection refused", "mTLS mode STRICT for namespace shop")

	e.writeDiscovery("mtls: {mode: PERMISSIVE}\n")
	waitFor(t, "the discovery file's PERMISSIVE over Config.MTLSMode", func() bool {
		return e.p.Store().MTLSMode("shop") == discovery.MTLSPermissive
	})
	c := e.mustConnect(0, appAddr(e, 1))
	if err := c.Echo("plaintext ok"); err != nil {
		t.Fatal(err)
	}
}

func TestConfigMTLSModeInvalid(t *testing.T) {
	if _, err := New(Config{StateDir: t.TempDir(), MTLSMode: "DISABLE", ZDSPath: "", MetricsAddr: "off", ReadyAddr: "off"}); err == nil || !strings.Contains(err.Error(), "DISABLE") {
		t.Errorf("New with MTLSMode DISABLE: %v, want an error naming it", err)
	}
}

// TestMetrics: the TCP counters move by exactly the bytes of a known
// transfer, on both reporters.
func TestMetrics(t *testing.T) {
	e := newEnv(t, envOptions{pods: 2})
	e.enroll(0, "ns-a", "sa-a")
	e.enroll(1, "ns-b", "sa-b")
	e.app(1, "b")
	c := e.mustConnect(0, appAddr(e, 1))
	msg := strings.Repeat("m", 999)
	if err := c.Echo(msg); err != nil {
		t.Fatal(err)
	}
	c.Close()
	greeting := len(c.Greeting) + 1
	received, sent := 1000, greeting+1000
	for _, rep := range []string{"source", "destination"} {
		waitFor(t, rep+" connection closed", func() bool {
			return scrape(t, e, "istio_tcp_connections_closed_total", rep) == 1
		})
		if got := scrape(t, e, "istio_tcp_connections_opened_total", rep); got != 1 {
			t.Errorf("%s opened = %v, want 1", rep, got)
		}
		if got := scrape(t, e, "istio_tcp_received_bytes_total", rep); got != float64(received) {
			t.Errorf("%s received bytes = %v, want %d", rep, got, received)
		}
		if got := scrape(t, e, "istio_tcp_sent_bytes_total", rep); got != float64(sent) {
			t.Errorf("%s sent bytes = %v, want %d", rep, got, sent)
		}
	}
}

// scrape sums a metric's samples with reporter rep from /metrics.
func scrape(t *testing.T, e *env, name, rep string) float64 {
	code, body := get(t, e.p.MetricsAddr(), "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	var sum float64
	for line := range strings.SplitSeq(body, "\n") {
		if !strings.HasPrefix(line, name+"{") || !strings.Contains(line, `reporter="`+rep+`"`) {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		sum += v
	}
	return sum
}

// TestCertRotation: pod certificates that live 2 s rotate under an open
// connection without breaking it, and new connections still work.
func TestCertRotation(t *testing.T) {
	e := newEnv(t, envOptions{pods: 2, certLifetime: 2 * time.Second})
	e.enroll(0, "ns-a", "sa-a")
	e.enroll(1, "ns-b", "sa-b")
	e.app(1, "b")
	c := e.mustConnect(0, appAddr(e, 1))
	if err := c.Echo("before rotation"); err != nil {
		t.Fatal(err)
	}
	// Wait until both pods rotated past their first certificate's expiry.
	time.Sleep(2500 * time.Millisecond)
	if n := strings.Count(e.logs.String(), "certificate rotated"); n < 2 {
		t.Fatalf("saw %d rotations, want at least 2", n)
	}
	if err := c.Echo("after rotation"); err != nil {
		t.Fatalf("open connection broke across rotation: %v", err)
	}
	c2 := e.mustConnect(0, appAddr(e, 1))
	if err := c2.Echo("new connection"); err != nil {
		t.Fatal(err)
	}
}

// TestDelClosesAtOnce: DelWorkload closes the pod's connections and
// listeners immediately; the datapath then fails closed.
func TestDelClosesAtOnce(t *testing.T) {
	e := newEnv(t, envOptions{pods: 3})
	uid := e.enroll(0, "ns-a", "sa-a")
	e.enroll(1, "ns-b", "sa-b")
	e.app(1, "b")
	e.app(2, "plain")
	viaHBONE := e.mustConnect(0, appAddr(e, 1))
	plain := e.mustConnect(0, appAddr(e, 2))
	if err := e.p.DelWorkload(uid); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]*nettest.TCPConn{"hbone": viaHBONE, "passthrough": plain} {
		// A generous deadline: the point is that the read ends with an
		// error or EOF (the proxy closed) rather than by the deadline.
		c.Conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadAll(c.Conn); errors.Is(err, timeoutErr) {
			t.Errorf("%s connection still open after Del", name)
		}
	}
	if c, err := e.connect(0, appAddr(e, 2)); err == nil {
		c.Close()
		t.Fatal("new connection succeeded after Del (no listener, must fail closed)")
	}
	if pods := e.p.Pods(); len(pods) != 1 {
		t.Errorf("pods after Del: %v", pods)
	}
}

// TestNoGoroutineLeak: many connections leave no goroutines behind.
func TestNoGoroutineLeak(t *testing.T) {
	e := newEnv(t, envOptions{pods: 3})
	e.enroll(0, "ns-a", "sa-a")
	e.enroll(1, "ns-b", "sa-b")
	e.app(1, "b")
	e.app(2, "plain")
	roundTrip := func(i int) {
		c, err := e.connect(0, appAddr(e, i))
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Echo("x"); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	// Warm up: the pooled HBONE connection and the apps' goroutines.
	roundTrip(1)
	roundTrip(2)
	waitFor(t, "warm-up connections done", func() bool {
		return scrape(t, e, "istio_tcp_connections_closed_total", "source") == 2
	})
	base := runtime.NumGoroutine()
	const n = 100
	for range n {
		roundTrip(1)
		roundTrip(2)
	}
	waitFor(t, "all connections closed", func() bool {
		return scrape(t, e, "istio_tcp_connections_closed_total", "source") == 2+2*n
	})
	waitFor(t, fmt.Sprintf("goroutines back to %d", base), func() bool {
		return runtime.NumGoroutine() <= base+3
	})
}

// TestDNSCapture: with DNS capture, a pod's query to any resolver reaches
// the pod's DNS proxy, which answers a service hostname with its VIP.
func TestDNSCapture(t *testing.T) {
	e := newEnv(t, envOptions{pods: 1, dns: true, discovery: `
services:
- {name: echo, namespace: demo, vips: [10.96.0.10], ports: {80: 8080}}
`})
	e.enroll(0, "demo", "sa-a")
	q := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: 77, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName("echo.demo.svc.cluster.local."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}},
	}
	b, err := q.Pack()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// The resolver address is the node's: nothing listens on :53 there,
	// so only the capture can answer.
	c, err := e.lab.Pod(0).Dial(ctx, "udp", netip.AddrPortFrom(nettest.BridgeV4, 53).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("dns answer: %v", err)
	}
	var m dnsmessage.Message
	if err := m.Unpack(buf[:n]); err != nil {
		t.Fatal(err)
	}
	if len(m.Answers) != 1 || m.Answers[0].Body.(*dnsmessage.AResource).A != [4]byte{10, 96, 0, 10} {
		t.Fatalf("answers %v, want 10.96.0.10", m.Answers)
	}
}
