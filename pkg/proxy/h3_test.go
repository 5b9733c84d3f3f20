//go:build linux

package proxy

import (
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/meshconst"
)

// TestH3MeshToMesh: with HTTP/3 served and dialled, pod A reaches pod B's
// app over QUIC on UDP 15008 through the real datapath: the app sees A's
// IP, the node sees only encrypted UDP to 15008 (no TCP 15008, no
// payload, no plaintext app port), metrics and access logs name the
// transport; a server identity mismatch and a DENY policy are refused
// over HTTP/3 as over HTTP/2.
func TestH3MeshToMesh(t *testing.T) {
	e := newEnv(t, envOptions{pods: 3, h3: H3Config{Serve: true, Dial: true}, discovery: `
workloads:
- name: pod2
  namespace: ns-c
  serviceAccount: impostor
`})
	e.enroll(0, "ns-a", "sa-a")
	e.enroll(1, "ns-b", "sa-b")
	e.enroll(2, "ns-c", "sa-c") // discovery says sa "impostor"
	e.app(1, "b")
	e.app(2, "c")

	const payload = "PAYLOAD-h3-5b1d-must-not-appear-in-clear"
	dump := e.meshEcho(0, 1, "b", "tcp or udp", payload)
	hbonePort := fmt.Sprintf("%s.%d:", e.lab.Pod(1).IPv4, meshconst.InboundHBONEPort)
	var udp, tcp int
	for line := range strings.SplitSeq(dump, "\n") {
		if !strings.Contains(line, hbonePort) {
			continue
		}
		if strings.Contains(line, "UDP") {
			udp++
		}
		if strings.Contains(line, "Flags [") {
			tcp++
		}
	}
	if udp == 0 || tcp != 0 {
		t.Errorf("capture: %d UDP and %d TCP packets to %s, want UDP only:\n%s", udp, tcp, hbonePort, dump)
	}
	e.waitLog("connection complete", "direction=outbound", "security=mutual_tls", "hbone.transport=h3")
	e.waitLog("connection complete", "direction=inbound", "src.identity=spiffe://cluster.local/ns/ns-a/sa/sa-a", "hbone.transport=h3")
	for _, rep := range []string{"source", "destination"} {
		if got := scrapeTunnels(t, e, rep, "h3", false); got != 1 {
			t.Errorf("%s h3 tunnels = %v, want 1", rep, got)
		}
	}

	t.Run("identity mismatch", func(t *testing.T) {
		if c, err := e.connect(0, appAddr(e, 2)); err == nil {
			c.Close()
			t.Fatal("connection to a server with the wrong identity succeeded")
		}
		e.waitLog("connection complete", "reason=\"server identity mismatch\"", "spiffe://cluster.local/ns/ns-c/sa/impostor")
		if got := scrapeTunnels(t, e, "source", "h2", true); got != 0 {
			t.Errorf("the refusal fell back to http/2 (%v tunnels)", got)
		}
	})
}

// TestH3DenyPolicy: a DENY policy refuses an HTTP/3 tunnel with 401.
func TestH3DenyPolicy(t *testing.T) {
	e := newEnv(t, envOptions{pods: 2, h3: H3Config{Serve: true, Dial: true}, discovery: denyFromA("ns-b")})
	e.enroll(0, "ns-a", "sa-a")
	e.enroll(1, "ns-b", "sa-b")
	e.app(1, "b")
	if c, err := e.connect(0, appAddr(e, 1)); err == nil {
		c.Close()
		t.Fatal("connection denied by policy succeeded")
	}
	e.waitLog("hbone request refused", "transport=h3", "status=401", "denied by DENY policy ns-b/no-a")
	e.waitLog("connection complete", "direction=outbound", "401 Unauthorized")
}

// TestH3Fallback: the destination's pod serves no HTTP/3 (the proxy runs
// without H3 serving) while clients want it: the tunnel falls back to
// HTTP/2 within a bounded delay, and metrics and the access log say so.
func TestH3Fallback(t *testing.T) {
	e := newEnv(t, envOptions{pods: 2, h3: H3Config{Dial: true, HandshakeTimeout: time.Second}})
	e.enroll(0, "ns-a", "sa-a")
	e.enroll(1, "ns-b", "sa-b")
	e.app(1, "b")
	start := time.Now()
	c := e.mustConnect(0, appAddr(e, 1))
	delay := time.Since(start)
	t.Logf("first connection with fallback took %v", delay)
	if delay > 5*time.Second {
		t.Errorf("fallback took %v, not bounded", delay)
	}
	if err := c.Echo("over h2"); err != nil {
		t.Fatal(err)
	}
	c.Close()
	e.waitLog("hbone over http/3 unanswered, using http/2", fmt.Sprintf("addr=%s:%d", e.lab.Pod(1).IPv4, meshconst.InboundHBONEPort))
	e.waitLog("connection complete", "direction=outbound", "hbone.transport=h2")
	e.waitLog("connection complete", "direction=inbound", "hbone.transport=h2")
	if got := scrapeTunnels(t, e, "source", "h2", true); got != 1 {
		t.Errorf("source h2 fallback tunnels = %v, want 1", got)
	}
	// Remembered: the next connection does not try HTTP/3 again.
	c2 := e.mustConnect(0, appAddr(e, 1))
	if err := c2.Echo("again"); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(e.logs.String(), "hbone over http/3 unanswered"); n != 1 {
		t.Errorf("%d fallbacks logged, want 1 (the failure is remembered)", n)
	}
}

// scrapeTunnels reads ambpf_hbone_tunnels_total for one label set.
func scrapeTunnels(t *testing.T, e *env, reporter, transport string, fellBack bool) float64 {
	t.Helper()
	code, body := get(t, e.p.MetricsAddr(), "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	want := fmt.Sprintf(`%s{fallback="%t",reporter="%s",transport="%s"} `, TunnelsMetricName, fellBack, reporter, transport)
	for line := range strings.SplitSeq(body, "\n") {
		if v, ok := strings.CutPrefix(line, want); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric line %q: %v", line, err)
			}
			return f
		}
	}
	return 0
}

// TestWantH3: the per-workload field wins over the namespace list, which
// adds to the mesh-wide flag.
func TestWantH3(t *testing.T) {
	h := newH3State(H3Config{Namespaces: []string{"fast"}}, slog.New(slog.DiscardHandler))
	all := newH3State(H3Config{Dial: true}, slog.New(slog.DiscardHandler))
	for _, tc := range []struct {
		w         discovery.Workload
		want, all bool
	}{
		{discovery.Workload{Namespace: "slow"}, false, true},
		{discovery.Workload{Namespace: "fast"}, true, true},
		{discovery.Workload{Namespace: "slow", HBONETransport: discovery.HBONETransportH3}, true, true},
		{discovery.Workload{Namespace: "fast", HBONETransport: discovery.HBONETransportH2}, false, false},
	} {
		if got := h.wantH3(&tc.w); got != tc.want {
			t.Errorf("namespaces [fast], %s/%q: %v, want %v", tc.w.Namespace, tc.w.HBONETransport, got, tc.want)
		}
		if got := all.wantH3(&tc.w); got != tc.all {
			t.Errorf("mesh-wide, %s/%q: %v, want %v", tc.w.Namespace, tc.w.HBONETransport, got, tc.all)
		}
	}
}
