//go:build linux

package ca_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambpf/ambpf/pkg/ca"
	"github.com/ambpf/ambpf/pkg/ca/catest"
	"github.com/ambpf/ambpf/pkg/caclient"
	"github.com/ambpf/ambpf/pkg/hbone"
	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/kubetest"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// meshPair is two workloads of one node talking HBONE over loopback, each
// with a rotating certificate from the CA service: a client (api) and a
// server (web) that relays to an echo upstream.
type meshPair struct {
	t              *testing.T
	ca             *caclient.Client
	web, api       *identity.Source
	webRot, apiRot atomic.Int32
	hboneAddr      netip.AddrPort
	echoAddr       netip.AddrPort
	server         *hbone.Server
	webID          identity.Identity
}

func newMeshPair(t *testing.T, c *caclient.Client, web, api identity.Identity, lifetime time.Duration) *meshPair {
	t.Helper()
	mp := &meshPair{t: t, ca: c, webID: web}
	var err error
	src := func(id identity.Identity, n *atomic.Int32) *identity.Source {
		s, err := identity.NewSource(identity.SourceConfig{
			Identity: id, Issuer: c, Lifetime: lifetime,
			RetryInterval: 100 * time.Millisecond, RetryMax: 500 * time.Millisecond,
			OnRotate: func(*tls.Certificate) { n.Add(1) }, Logger: quiet,
		})
		if err != nil {
			t.Fatalf("first certificate of %s: %v", id, err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	mp.web, mp.api = src(web, &mp.webRot), src(api, &mp.apiRot)

	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { echo.Close() })
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	mp.echoAddr = echo.Addr().(*net.TCPAddr).AddrPort()
	mp.server, err = hbone.NewServer(hbone.ServerConfig{
		TLS:    hbone.TLSConfig{Credentials: mp.web, Roots: c.Roots},
		PodIPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")},
		DialUpstream: func(ctx context.Context, r hbone.Request) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", mp.echoAddr.String())
		},
		Logger: quiet,
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mp.hboneAddr = ln.Addr().(*net.TCPAddr).AddrPort()
	go mp.server.Serve(ln)
	t.Cleanup(func() { mp.server.Close() })
	return mp
}

// dial opens a tunnel from api to web with a fresh client (so a fresh TLS
// handshake, with the certificates current now).
func (mp *meshPair) dial() net.Conn {
	mp.t.Helper()
	cl, err := hbone.NewClient(hbone.ClientConfig{TLS: hbone.TLSConfig{Credentials: mp.api, Roots: mp.ca.Roots}, Logger: quiet})
	if err != nil {
		mp.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := cl.Dial(ctx, hbone.Target{Addr: mp.hboneAddr, Authority: mp.echoAddr, ExpectedIdentities: []identity.Identity{mp.webID}})
	if err != nil {
		mp.t.Fatalf("HBONE tunnel api -> web: %v", err)
	}
	mp.t.Cleanup(func() { c.Close() })
	return c
}

// echo writes msg on c and checks it comes back.
func echoOn(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write %q: %v", msg, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo of %q: %q, %v", msg, buf, err)
	}
}

func clientFor(t *testing.T, m *catest.Mesh, p *catest.CAProcess, proxyPod string) *caclient.Client {
	t.Helper()
	pod, err := m.CP.Client.CoreV1().Pods(m.Sys).Get(context.Background(), proxyPod, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p.Client(m.Token(pod, ca.Audience))
}

// TestRotationKeepsOpenConnection: certificates of a few seconds rotate
// (new key, new serial) several times under an open HBONE tunnel, which
// keeps working past the expiry of the certificates it was opened with,
// while new tunnels handshake with the rotated ones.
func TestRotationKeepsOpenConnection(t *testing.T) {
	m := catest.NewMesh(t, kubetest.Shared(t), "car")
	node := m.Node("a")
	m.Pod(m.Sys, "proxy-a", m.ProxySA, node)
	m.Pod(m.App, "web-0", "web", node)
	m.Pod(m.App, "api-0", "api", node)
	p := m.StartCA("--rate=100", "--burst=100")
	mp := newMeshPair(t, clientFor(t, m, p, "proxy-a"), td(m.App, "web"), td(m.App, "api"), 3*time.Second)

	first := mp.web.Certificate().Leaf
	conn := mp.dial()
	echoOn(t, conn, "before rotation")
	catest.Eventually(t, 30*time.Second, func() error {
		if mp.webRot.Load() < 2 || mp.apiRot.Load() < 2 || time.Now().Before(first.NotAfter) {
			return fmt.Errorf("rotations web %d api %d, first expires %v", mp.webRot.Load(), mp.apiRot.Load(), first.NotAfter)
		}
		return nil
	})
	echoOn(t, conn, "after rotation, on the connection opened with expired certificates")
	if cur := mp.web.Certificate().Leaf; cur.SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Fatal("web certificate did not rotate")
	}
	echoOn(t, mp.dial(), "new tunnel with rotated certificates")
}

// TestCARestartKeepsMeshTraffic: the CA process is killed; established
// tunnels keep working, new tunnels still handshake on the valid
// certificates, a new pod's certificate is refused with the CA's address
// and a metric, renewal retries with backoff; when the CA is back,
// renewals succeed and the old tunnel is still up.
func TestCARestartKeepsMeshTraffic(t *testing.T) {
	m := catest.NewMesh(t, kubetest.Shared(t), "cak")
	node := m.Node("a")
	m.Pod(m.Sys, "proxy-a", m.ProxySA, node)
	m.Pod(m.App, "web-0", "web", node)
	m.Pod(m.App, "api-0", "api", node)
	m.Pod(m.App, "new-0", "new", node)
	p := m.StartCA("--rate=100", "--burst=100")
	c := clientFor(t, m, p, "proxy-a")
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	mp := newMeshPair(t, c, td(m.App, "web"), td(m.App, "api"), 20*time.Second)
	conn := mp.dial()
	echoOn(t, conn, "CA up")

	p.Kill()
	echoOn(t, conn, "CA down, established tunnel")
	echoOn(t, mp.dial(), "CA down, new tunnel on the current certificates")
	_, err := identity.NewSource(identity.SourceConfig{Identity: td(m.App, "new"), Issuer: c, Logger: quiet})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), p.Addr) {
		t.Fatalf("new pod's certificate with the CA down: %v, want Unavailable naming %s", err, p.Addr)
	}
	if n := failures(t, reg); n < 1 {
		t.Fatalf("no failed request counted in ambpf_ca_client_requests_total")
	}
	before := mp.webRot.Load()
	// Renewal (at 50-80% of 20 s) fails while the CA is down.
	catest.Eventually(t, 20*time.Second, func() error {
		if failures(t, reg) < 3 {
			return fmt.Errorf("failed requests %v", failures(t, reg))
		}
		return nil
	})
	echoOn(t, conn, "CA still down")

	if err := p.Start(catest.BuildCA(t)); err != nil {
		t.Fatalf("restart the CA: %v", err)
	}
	catest.Eventually(t, 30*time.Second, func() error {
		if mp.webRot.Load() <= before || mp.apiRot.Load() < 1 {
			return fmt.Errorf("no renewal since the CA came back (web %d api %d)", mp.webRot.Load(), mp.apiRot.Load())
		}
		return nil
	})
	echoOn(t, conn, "CA back, the tunnel opened before the restart")
	echoOn(t, mp.dial(), "CA back, new tunnel")
	if _, err := identity.NewSource(identity.SourceConfig{Identity: td(m.App, "new"), Issuer: c, Logger: quiet}); err != nil {
		t.Fatalf("new pod's certificate with the CA back: %v", err)
	}
}

// failures sums ambpf_ca_client_requests_total over results other than ok.
func failures(t *testing.T, reg *prometheus.Registry) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != "ambpf_ca_client_requests_total" {
			continue
		}
		for _, mt := range mf.GetMetric() {
			if mt.GetLabel()[0].GetValue() != "ok" {
				n += mt.GetCounter().GetValue()
			}
		}
	}
	return n
}
