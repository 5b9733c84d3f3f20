package metrics

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ambpf/ambpf/pkg/logtest"
)

var testLabels = Labels{
	Reporter:                     ReporterDestination,
	SourceWorkload:               "sleep",
	SourceWorkloadNamespace:      "demo",
	SourcePrincipal:              "spiffe://cluster.local/ns/demo/sa/sleep",
	SourceApp:                    "sleep",
	DestinationService:           "httpbin.demo.svc.cluster.local",
	DestinationServiceNamespace:  "demo",
	DestinationServiceName:       "httpbin",
	DestinationWorkload:          "httpbin",
	DestinationWorkloadNamespace: "demo",
	DestinationPrincipal:         "spiffe://cluster.local/ns/demo/sa/httpbin",
	DestinationApp:               "httpbin",
	DestinationVersion:           "v1",
	ConnectionSecurityPolicy:     SecurityMutualTLS,
}

// logBuffer collects JSON log lines written from several goroutines.
type logBuffer struct{ logtest.Buffer }

func (b *logBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range b.Lines() {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line is not JSON: %v: %s", err, l)
		}
		out = append(out, m)
	}
	return out
}

func newTestMetrics() (*Metrics, *logBuffer) {
	var logs logBuffer
	return New(slog.New(slog.NewJSONHandler(&logs, nil))), &logs
}

// transfer runs a real TCP exchange on loopback: the client sends
// request bytes, the server reads them all and answers with response
// bytes. The server side records it like an inbound proxy would, and
// checks before closing that the counters already show the bytes.
func transfer(t *testing.T, m *Metrics, request, response int) *Conn {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })

	type result struct {
		conn *Conn
		err  error
	}
	done := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- result{err: err}
			return
		}
		defer c.Close()
		src := netip.MustParseAddrPort(c.RemoteAddr().String())
		dst := netip.MustParseAddrPort(c.LocalAddr().String())
		rec := m.Open(testLabels, src, dst)
		buf := make([]byte, 1000)
		for got := 0; got < request; {
			n, err := c.Read(buf)
			rec.AddReceived(n)
			got += n
			if err != nil {
				done <- result{rec, err}
				return
			}
		}
		out := bytes.Repeat([]byte("r"), response)
		for len(out) > 0 {
			n, err := c.Write(out[:min(len(out), 777)])
			rec.AddSent(n)
			out = out[n:]
			if err != nil {
				done <- result{rec, err}
				return
			}
		}
		done <- result{conn: rec}
	}()

	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(bytes.Repeat([]byte("q"), request)); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(io.LimitReader(c, int64(response)))
	if err != nil || len(got) != response {
		t.Fatalf("client read %d bytes (%v), want %d", len(got), err, response)
	}
	r := <-done
	if r.err != nil {
		t.Fatalf("server: %v", r.err)
	}
	return r.conn
}

func TestCountersExactTransfer(t *testing.T) {
	m, _ := newTestMetrics()
	vals := testLabels.values()

	conn := transfer(t, m, 12345, 54321)
	// Bytes are exported while the connection is still open.
	if got := testutil.ToFloat64(m.received.WithLabelValues(vals...)); got != 12345 {
		t.Errorf("received before close = %v, want 12345", got)
	}
	if got := testutil.ToFloat64(m.sent.WithLabelValues(vals...)); got != 54321 {
		t.Errorf("sent before close = %v, want 54321", got)
	}
	if got := testutil.ToFloat64(m.opened.WithLabelValues(vals...)); got != 1 {
		t.Errorf("opened = %v, want 1", got)
	}
	if got := testutil.CollectAndCount(m.closed); got != 0 {
		t.Errorf("closed series before Close = %d, want 0", got)
	}
	conn.Close(Outcome{})
	conn.Close(Outcome{Err: errors.New("again")}) // ignored
	if got := testutil.ToFloat64(m.closed.WithLabelValues(vals...)); got != 1 {
		t.Errorf("closed = %v, want 1", got)
	}

	// A second connection adds exactly its own bytes.
	transfer(t, m, 1, 2).Close(Outcome{})
	if got := testutil.ToFloat64(m.received.WithLabelValues(vals...)); got != 12346 {
		t.Errorf("received after second = %v, want 12346", got)
	}
	if got := testutil.ToFloat64(m.sent.WithLabelValues(vals...)); got != 54323 {
		t.Errorf("sent after second = %v, want 54323", got)
	}
}

func TestScrapeHandler(t *testing.T) {
	m, _ := newTestMetrics()
	c := m.Open(Labels{Reporter: ReporterSource}, netip.AddrPort{}, netip.AddrPort{})
	c.AddReceived(100)
	c.AddSent(7)
	c.AddSent(0)
	c.AddSent(-3) // ignored: not a byte count
	c.Close(Outcome{Err: errors.New("upstream refused"), ResponseFlags: FlagConnectFailure})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, ln, m.MetricsMux()) }()
	t.Cleanup(func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})

	resp, err := http.Get("http://" + ln.Addr().String() + MetricsPath)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	text := string(body)
	// Defaults: unknown labels, tcp, "-" while open; the closed counter
	// carries the outcome's flag.
	// The cluster defaults to Istio's "Kubernetes".
	common := `connection_security_policy="unknown",destination_app="unknown",` +
		`destination_canonical_revision="unknown",destination_canonical_service="unknown",destination_cluster="Kubernetes",` +
		`destination_principal="unknown",destination_region="unknown",destination_service="unknown",destination_service_name="unknown",` +
		`destination_service_namespace="unknown",destination_version="unknown",destination_workload="unknown",` +
		`destination_workload_namespace="unknown",destination_zone="unknown",reporter="source",request_protocol="tcp",`
	src := `source_app="unknown",source_canonical_revision="unknown",source_canonical_service="unknown",source_cluster="Kubernetes",` +
		`source_principal="unknown",source_region="unknown",source_version="unknown",` +
		`source_workload="unknown",source_workload_namespace="unknown",source_zone="unknown"}`
	for _, want := range []string{
		`istio_tcp_received_bytes_total{` + common + `response_flags="-",` + src + ` 100`,
		`istio_tcp_sent_bytes_total{` + common + `response_flags="-",` + src + ` 7`,
		`istio_tcp_connections_opened_total{` + common + `response_flags="-",` + src + ` 1`,
		`istio_tcp_connections_closed_total{` + common + `response_flags="CONNECT",` + src + ` 1`,
		"go_goroutines ",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("scrape lacks %s", want)
		}
	}
	if t.Failed() {
		t.Logf("scrape:\n%s", text)
	}
}

// TestAccessLog: the access-log line has ztunnel's fields and units
// (src/proxy/metrics.rs ConnectionResult::record_internal): duration in
// "<n>ms", bytes from the reporter's side (unflipped for outbound),
// identities only with mutual TLS, the pod name as src/dst.workload,
// failures (an error, or a DENY/CONNECT flag) at ERROR with an error
// field, scope "access".
func TestAccessLog(t *testing.T) {
	m, logs := newTestMetrics()
	in := testLabels
	in.SourcePod, in.DestinationPod = "sleep-7d4f-abcde", "httpbin-5c6b-fghij"
	conn := transfer(t, m, 300, 4000)
	conn.labels = in // transfer opened it with testLabels
	conn.hboneAddr = netip.MustParseAddrPort("10.0.0.2:8080")
	conn.Close(Outcome{Reason: "allowed by ALLOW policy demo/allow rule 0"})
	denied := m.Open(testLabels, netip.MustParseAddrPort("[fd00::1]:40000"), netip.MustParseAddrPort("[fd00::2]:8080"))
	denied.Close(Outcome{Reason: "denied by DENY policy demo/x rule 0", ResponseFlags: FlagDenied})
	out := Labels{Reporter: ReporterSource, SourceWorkload: "sleep", SourceWorkloadNamespace: "demo", SourcePod: "sleep-1",
		SourcePrincipal: "spiffe://cluster.local/ns/demo/sa/sleep", ConnectionSecurityPolicy: SecurityUnknown}
	plain := m.Open(out, netip.MustParseAddrPort("10.0.0.1:1000"), netip.MustParseAddrPort("10.0.0.9:80"))
	plain.AddReceived(11) // the client sent 11 bytes
	plain.AddSent(22)     // and got 22 back
	plain.Close(Outcome{Err: errors.New("connection reset by peer")})

	lines := logs.lines(t)
	if len(lines) != 3 {
		t.Fatalf("got %d log lines, want one per connection: %v", len(lines), lines)
	}
	durationMS := regexp.MustCompile(`^[0-9]+ms$`)
	for i, l := range lines {
		if d, _ := l[LogDuration].(string); !durationMS.MatchString(d) {
			t.Errorf("line %d: duration = %v, want <n>ms", i, l[LogDuration])
		}
		if l[LogScope] != LogScopeAccess || l["msg"] != accessLogMessage {
			t.Errorf("line %d: scope %v msg %v", i, l[LogScope], l["msg"])
		}
	}
	expect := func(name string, line map[string]any, want map[string]any, absent ...string) {
		t.Helper()
		for k, v := range want {
			if line[k] != v {
				t.Errorf("%s line: %s = %v, want %v", name, k, line[k], v)
			}
		}
		for _, k := range absent {
			if v, has := line[k]; has {
				t.Errorf("%s line has %s = %v, want none", name, k, v)
			}
		}
	}
	expect("inbound", lines[0], map[string]any{
		"level": "INFO", LogSrcWorkload: "sleep-7d4f-abcde", LogSrcNamespace: "demo",
		LogSrcIdentity: "spiffe://cluster.local/ns/demo/sa/sleep", LogSrcCluster: DefaultCluster,
		LogDstService: "httpbin.demo.svc.cluster.local", LogDstWorkload: "httpbin-5c6b-fghij", LogDstCluster: DefaultCluster,
		LogDstIdentity: "spiffe://cluster.local/ns/demo/sa/httpbin", LogDirection: "inbound", LogDstHBONEAddr: "10.0.0.2:8080",
		// Inbound: the destination sent the response.
		LogBytesSent: float64(4000), LogBytesReceived: float64(300),
		LogSecurity: SecurityMutualTLS, LogOutcome: "success", LogResponseFlags: FlagNone,
		LogReason: "allowed by ALLOW policy demo/allow rule 0",
	}, LogError)
	for _, k := range []string{LogSrcAddr, LogDstAddr} {
		if _, err := netip.ParseAddrPort(lines[0][k].(string)); err != nil {
			t.Errorf("%s = %v: %v", k, lines[0][k], err)
		}
	}
	expect("denied", lines[1], map[string]any{
		"level": "ERROR", LogOutcome: "error", LogError: "denied by DENY policy demo/x rule 0",
		LogResponseFlags: FlagDenied, LogSrcAddr: "[fd00::1]:40000", LogDstAddr: "[fd00::2]:8080",
		LogBytesSent: float64(0),
	}, LogSrcWorkload) // no pod name and no canonical service: left out
	expect("outbound plaintext", lines[2], map[string]any{
		"level": "ERROR", LogDirection: "outbound", LogSrcWorkload: "sleep-1", LogError: "connection reset by peer",
		// Outbound: what the source sent, what it received.
		LogBytesSent: float64(11), LogBytesReceived: float64(22),
	}, LogSrcIdentity, LogDstIdentity, LogDstWorkload, LogDstService, LogDstHBONEAddr, LogDstCluster)
}

// TestOpenedLine: at Debug a connection's start is logged as ztunnel's
// "connection opened", with the src/dst fields (dst.hbone_addr from
// OpenHBONE); at Info it is not.
func TestOpenedLine(t *testing.T) {
	var logs logBuffer
	m := New(slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	l := testLabels
	l.SourcePod = "sleep-1"
	m.OpenHBONE(l, netip.MustParseAddrPort("10.0.0.1:1000"), netip.MustParseAddrPort("10.0.0.2:15008"), netip.MustParseAddrPort("10.0.0.2:8080"))
	lines := logs.lines(t)
	if len(lines) != 1 || lines[0]["msg"] != openedMessage || lines[0]["level"] != "DEBUG" ||
		lines[0][LogDstHBONEAddr] != "10.0.0.2:8080" || lines[0][LogSrcWorkload] != "sleep-1" || lines[0][LogDirection] != "inbound" {
		t.Errorf("opened lines %v", lines)
	}
	quiet, qlogs := newTestMetrics()
	quiet.Open(l, netip.AddrPort{}, netip.AddrPort{})
	if n := len(qlogs.Lines()); n != 0 {
		t.Errorf("%d lines at Info for an open", n)
	}
}

func TestConcurrentAdds(t *testing.T) {
	m, _ := newTestMetrics()
	c := m.Open(testLabels, netip.AddrPort{}, netip.AddrPort{})
	var wg sync.WaitGroup
	var total atomic.Int64
	for i := range 8 {
		wg.Go(func() {
			for range 1000 {
				c.AddSent(i + 1)
				c.AddReceived(1)
				total.Add(int64(i + 1))
			}
		})
	}
	wg.Wait()
	if c.Sent() != uint64(total.Load()) || c.Received() != 8000 {
		t.Errorf("Sent=%d Received=%d, want %d and 8000", c.Sent(), c.Received(), total.Load())
	}
	if got := testutil.ToFloat64(m.sent.WithLabelValues(testLabels.values()...)); got != float64(total.Load()) {
		t.Errorf("exported sent = %v, want %d", got, total.Load())
	}
}

func TestReadyHandler(t *testing.T) {
	var notReady atomic.Pointer[error]
	check := func() error {
		if e := notReady.Load(); e != nil {
			return *e
		}
		return nil
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, ln, ReadyMux(check)) }()
	t.Cleanup(func() {
		cancel()
		<-served
	})
	url := "http://" + ln.Addr().String() + ReadyPath
	get := func() (int, string) {
		t.Helper()
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}

	e := errors.New("ZDS snapshot not received")
	notReady.Store(&e)
	if code, body := get(); code != http.StatusServiceUnavailable || !strings.Contains(body, "ZDS snapshot not received") {
		t.Errorf("not ready: %d %q", code, body)
	}
	notReady.Store(nil)
	if code, body := get(); code != http.StatusOK || body != "ready\n" {
		t.Errorf("ready: %d %q", code, body)
	}
	resp, err := http.Get("http://" + ln.Addr().String() + "/other")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("/other = %d, want 404", resp.StatusCode)
	}
}

// TestSetLogAttr: fields the caller adds land on the access-log line, the
// last value of a key winning.
func TestSetLogAttr(t *testing.T) {
	m, logs := newTestMetrics()
	c := m.Open(Labels{Reporter: ReporterSource}, netip.MustParseAddrPort("10.0.0.1:1000"), netip.MustParseAddrPort("10.0.0.2:80"))
	c.SetLogAttr("hbone.transport", "h3")
	c.SetLogAttr("hbone.transport", "h2")
	c.SetLogAttr("note", "x")
	c.Close(Outcome{})
	lines := logs.lines(t)
	if len(lines) != 1 {
		t.Fatalf("%d access-log lines, want 1", len(lines))
	}
	if lines[0]["hbone.transport"] != "h2" || lines[0]["note"] != "x" {
		t.Errorf("access-log line %v lacks the added fields", lines[0])
	}
}

// TestCanonical: canonical service and revision follow Istio's label
// order and defaults (pkg/kube/labels CanonicalService).
func TestCanonical(t *testing.T) {
	for _, tc := range []struct {
		labels       map[string]string
		svc, revison string
	}{
		{nil, "wl", "latest"},
		{map[string]string{"app": "a", "version": "v1"}, "a", "v1"},
		{map[string]string{"app": "a", "app.kubernetes.io/name": "k", "version": "v1", "app.kubernetes.io/version": "2"}, "k", "2"},
		{map[string]string{"app": "a", "service.istio.io/canonical-name": "c", "service.istio.io/canonical-revision": "r", "version": "v1"}, "c", "r"},
	} {
		if s, r := Canonical(tc.labels, "wl"); s != tc.svc || r != tc.revison {
			t.Errorf("Canonical(%v) = %s, %s; want %s, %s", tc.labels, s, r, tc.svc, tc.revison)
		}
	}
}
