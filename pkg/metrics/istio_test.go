package metrics

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// TestIstioExposition: the exposition served on both Istio paths
// (/metrics and /stats/prometheus, over real HTTP on loopback) parses
// with Prometheus' text parser and carries ztunnel's istio_build gauge and
// istio_tcp_connections_failed_total for a connection closed with a
// failure flag (src/proxy/metrics.rs: ConnectionFailure,
// AuthorizationPolicyDenied, ...), not for a normal close.
func TestIstioExposition(t *testing.T) {
	m := New(nil)
	l := Labels{Reporter: ReporterDestination, SourceWorkload: "sleep", DestinationWorkload: "httpbin"}
	src, dst := netip.MustParseAddrPort("10.0.0.1:40000"), netip.MustParseAddrPort("10.0.0.2:8080")
	m.Open(l, src, dst).Close(Outcome{Err: errors.New("denied"), ResponseFlags: FlagDenied})
	m.Open(l, src, dst).Close(Outcome{})

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: m.MetricsMux(), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	for _, path := range []string{MetricsPath, StatsPath} {
		resp, err := http.Get("http://" + ln.Addr().String() + path)
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %d, %v", path, resp.StatusCode, err)
		}
		p := expfmt.NewTextParser(model.UTF8Validation)
		fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
		if err != nil {
			t.Fatalf("%s does not parse: %v", path, err)
		}
		build := fams[BuildName]
		if build == nil || len(build.Metric) != 1 || build.Metric[0].GetGauge().GetValue() != 1 || label(build.Metric[0], "component") != BuildComponent || label(build.Metric[0], "tag") == "" {
			t.Errorf("%s: %s = %v", path, BuildName, build)
		}
		failed := fams[ConnectionsFailedName]
		if failed == nil || len(failed.Metric) != 1 || failed.Metric[0].GetCounter().GetValue() != 1 ||
			label(failed.Metric[0], "response_flags") != FlagDenied || label(failed.Metric[0], "source_workload") != "sleep" {
			t.Errorf("%s: %s = %v, want one series, 1, response_flags DENY", path, ConnectionsFailedName, failed)
		}
		if closed := fams[ConnectionsClosedName]; closed == nil || len(closed.Metric) != 2 {
			t.Errorf("%s: %s = %v, want the denied and the normal close", path, ConnectionsClosedName, closed)
		}
	}
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.Label {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}
