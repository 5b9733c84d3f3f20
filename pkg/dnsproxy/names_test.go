package dnsproxy

import (
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/net/dns/dnsmessage"

	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/metrics"
)

type catalog []*discovery.Service

func (c catalog) Services() []*discovery.Service { return c }

// countingUpstream answers every A question with addr and TTL ttl, and
// counts the questions it got.
func countingUpstream(t *testing.T, addr netip.Addr, ttl uint32) (netip.AddrPort, *atomic.Int64) {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	var n atomic.Int64
	go func() {
		buf := make([]byte, 1500)
		for {
			k, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			var m dnsmessage.Message
			if m.Unpack(buf[:k]) != nil {
				continue
			}
			n.Add(1)
			m.Response = true
			m.Answers = []dnsmessage.Resource{{
				Header: dnsmessage.ResourceHeader{Name: m.Questions[0].Name, Class: dnsmessage.ClassINET, TTL: ttl},
				Body:   &dnsmessage.AResource{A: addr.As4()},
			}}
			b, _ := m.Pack()
			c.WriteToUDPAddrPort(b, from)
		}
	}()
	return c.LocalAddr().(*net.UDPAddr).AddrPort(), &n
}

// serveUDP runs s on a loopback UDP socket and returns an exchange
// function.
func serveUDP(t *testing.T, s *Server) func(q []byte) dnsmessage.Message {
	t.Helper()
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	go s.ServeUDP(uc)
	t.Cleanup(func() { s.Close() })
	return func(q []byte) dnsmessage.Message {
		t.Helper()
		c, err := net.Dial("udp", uc.LocalAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write(q); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("udp answer: %v", err)
		}
		var m dnsmessage.Message
		if err := m.Unpack(buf[:n]); err != nil {
			t.Fatal(err)
		}
		return m
	}
}

// records renders the answer section as "owner A ip" / "owner CNAME
// target" lines.
func records(m dnsmessage.Message) []string {
	var out []string
	for _, a := range m.Answers {
		switch b := a.Body.(type) {
		case *dnsmessage.AResource:
			out = append(out, a.Header.Name.String()+" A "+netip.AddrFrom4(b.A).String())
		case *dnsmessage.AAAAResource:
			out = append(out, a.Header.Name.String()+" AAAA "+netip.AddrFrom16(b.AAAA).String())
		case *dnsmessage.CNAMEResource:
			out = append(out, a.Header.Name.String()+" CNAME "+b.CNAME.String())
		}
	}
	return out
}

// TestNamesAsZtunnel: over a real UDP socket, service names are answered
// in every form ztunnel answers (src/dns/server.rs get_aliases,
// to_kube_fqdns), search-domain expansions get a CNAME to the stripped
// name, headless services answer their ready endpoints, and other names
// go upstream.
func TestNamesAsZtunnel(t *testing.T) {
	notReady := false
	svcs := catalog{
		{Name: "httpbin", Namespace: "demo", VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.10")}},
		{Name: "other", Namespace: "prod", VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.20")}},
		{Name: "db", Namespace: "demo", Headless: true, Endpoints: []discovery.Endpoint{
			{IP: netip.MustParseAddr("10.1.0.5")}, {IP: netip.MustParseAddr("10.1.0.6"), Ready: &notReady}}},
	}
	up, _ := countingUpstream(t, netip.MustParseAddr("192.0.2.1"), 60)
	for _, tc := range []struct {
		domain string
		name   string
		want   []string
	}{
		{"", "httpbin.", []string{"httpbin. A 10.96.0.10"}},
		{"", "httpbin.demo.", []string{"httpbin.demo. A 10.96.0.10"}},
		{"", "HTTPBIN.demo.svc.", []string{"HTTPBIN.demo.svc. A 10.96.0.10"}},
		{"", "httpbin.demo.svc.cluster.local.", []string{"httpbin.demo.svc.cluster.local. A 10.96.0.10"}},
		{"", "other.prod.", []string{"other.prod. A 10.96.0.20"}},
		// A bare name is the client's namespace only: upstream.
		{"", "other.", []string{"other. A 192.0.2.1"}},
		// The resolver library appended the pod's search domains.
		{"", "httpbin.demo.svc.cluster.local.demo.svc.cluster.local.", []string{
			"httpbin.demo.svc.cluster.local.demo.svc.cluster.local. CNAME httpbin.demo.svc.cluster.local.",
			"httpbin.demo.svc.cluster.local. A 10.96.0.10"}},
		{"", "other.prod.svc.cluster.local.", []string{"other.prod.svc.cluster.local. A 10.96.0.20"}},
		{"", "other.prod.svc.cluster.local.", []string{"other.prod.svc.cluster.local. A 10.96.0.20"}},
		{"", "other.prod.cluster.local.", []string{"other.prod.cluster.local. CNAME other.prod.", "other.prod. A 10.96.0.20"}},
		{"", "example.org.demo.svc.cluster.local.", []string{"example.org.demo.svc.cluster.local. A 192.0.2.1"}},
		{"", "db.", []string{"db. A 10.1.0.5"}},
		{"corp.internal", "httpbin.demo.svc.corp.internal.", []string{"httpbin.demo.svc.corp.internal. A 10.96.0.10"}},
		{"corp.internal", "httpbin.demo.svc.cluster.local.", []string{"httpbin.demo.svc.cluster.local. A 192.0.2.1"}},
		{"corp.internal", "httpbin.", []string{"httpbin. A 10.96.0.10"}},
	} {
		s := New(Config{Names: &Names{Catalog: svcs, Namespace: "demo", ClusterDomain: tc.domain},
			Upstreams: []netip.AddrPort{up}, Timeout: 2 * time.Second, CacheSize: -1})
		exchange := serveUDP(t, s)
		m := exchange(query(t, 7, tc.name, dnsmessage.TypeA))
		if got := records(m); m.RCode != dnsmessage.RCodeSuccess || !slices.Equal(got, tc.want) {
			t.Errorf("domain %q, %s: rcode %v, answers %q; want %q", tc.domain, tc.name, m.RCode, got, tc.want)
		}
		s.Close()
	}
	// AAAA of a v4-only service: NODATA, authoritative, no CNAME.
	s := New(Config{Names: &Names{Catalog: svcs, Namespace: "demo"}})
	m := serveUDP(t, s)(query(t, 8, "httpbin.demo.svc.cluster.local.demo.svc.cluster.local.", dnsmessage.TypeAAAA))
	if m.RCode != dnsmessage.RCodeSuccess || len(m.Answers) != 0 || !m.Authoritative {
		t.Errorf("AAAA of a v4 service: %+v", m)
	}
}

// TestUpstreamCacheAndMetrics: an upstream answer is served from the
// cache within its TTL (with the TTL counted down) and asked again once
// it expired; every query counts in istio_dns_requests_total, every
// upstream exchange in istio_dns_upstream_requests_total, and a failed
// one in istio_dns_upstream_failures_total.
func TestUpstreamCacheAndMetrics(t *testing.T) {
	up, asked := countingUpstream(t, netip.MustParseAddr("192.0.2.9"), 30)
	m := metrics.New(nil)
	s := New(Config{Upstreams: []netip.AddrPort{up}, Timeout: 2 * time.Second, Metrics: m.DNS(),
		Client: metrics.DNSQuery{CanonicalService: "sleep", CanonicalRevision: "v1"}})
	// The clock the cache reads, moved by the test (atomic: the server
	// reads it on its own goroutine).
	var offset atomic.Int64
	start := time.Now()
	s.cache.now = func() time.Time { return start.Add(time.Duration(offset.Load())) }
	exchange := serveUDP(t, s)
	first := exchange(query(t, 1, "example.org.", dnsmessage.TypeA))
	offset.Add(int64(10 * time.Second))
	second := exchange(query(t, 2, "Example.org.", dnsmessage.TypeA))
	if asked.Load() != 1 {
		t.Fatalf("upstream asked %d times, want 1 (the second answer from the cache)", asked.Load())
	}
	if second.ID != 2 || len(second.Answers) != 1 || second.Answers[0].Header.TTL != 20 || first.Answers[0].Header.TTL != 30 {
		t.Errorf("cached answer: id %d, answers %+v (first TTL %d); want id 2, TTL 20", second.ID, second.Answers, first.Answers[0].Header.TTL)
	}
	offset.Add(int64(21 * time.Second))
	exchange(query(t, 3, "example.org.", dnsmessage.TypeA))
	if asked.Load() != 2 {
		t.Errorf("upstream asked %d times after the TTL, want 2", asked.Load())
	}
	// A failing upstream: a closed port.
	dead, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.LocalAddr().(*net.UDPAddr).AddrPort()
	dead.Close()
	s2 := New(Config{Upstreams: []netip.AddrPort{deadAddr}, Timeout: time.Second, Metrics: m.DNS()})
	if r := serveUDP(t, s2)(query(t, 4, "example.net.", dnsmessage.TypeA)); r.RCode != dnsmessage.RCodeServerFailure {
		t.Errorf("dead upstream: rcode %v", r.RCode)
	}
	want := `
# HELP istio_dns_requests_total Total number of DNS requests.
# TYPE istio_dns_requests_total counter
istio_dns_requests_total{request_protocol="udp",request_query_type="a",source_canonical_revision="unknown",source_canonical_service="unknown"} 1
istio_dns_requests_total{request_protocol="udp",request_query_type="a",source_canonical_revision="v1",source_canonical_service="sleep"} 3
# HELP istio_dns_upstream_failures_total Total number of DNS requests that failed to forward upstream.
# TYPE istio_dns_upstream_failures_total counter
istio_dns_upstream_failures_total{request_protocol="udp",request_query_type="a",source_canonical_revision="unknown",source_canonical_service="unknown"} 1
# HELP istio_dns_upstream_requests_total Total number of DNS requests forwarded to upstream.
# TYPE istio_dns_upstream_requests_total counter
istio_dns_upstream_requests_total{request_protocol="udp",request_query_type="a",source_canonical_revision="unknown",source_canonical_service="unknown"} 1
istio_dns_upstream_requests_total{request_protocol="udp",request_query_type="a",source_canonical_revision="v1",source_canonical_service="sleep"} 2
`
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want),
		metrics.DNSRequestsName, metrics.DNSUpstreamRequestsName, metrics.DNSUpstreamFailuresName); err != nil {
		t.Error(err)
	}
	if n := testutil.CollectAndCount(m.Registry(), metrics.DNSUpstreamDurationName); n != 2 {
		t.Errorf("%s has %d series, want 2", metrics.DNSUpstreamDurationName, n)
	}
}

// TestClientFuncLabels: with ClientFunc the source labels are read per
// query, so a client whose canonical labels change (discovery caught up
// with its pod) is counted under the new ones.
func TestClientFuncLabels(t *testing.T) {
	m := metrics.New(nil)
	var rev atomic.Value
	rev.Store("v1")
	s := New(Config{Lookup: func(string) ([]netip.Addr, bool) { return nil, false }, Metrics: m.DNS(),
		ClientFunc: func() metrics.DNSQuery {
			return metrics.DNSQuery{CanonicalService: "sleep", CanonicalRevision: rev.Load().(string)}
		}})
	exchange := serveUDP(t, s)
	exchange(query(t, 1, "a.example.", dnsmessage.TypeA))
	rev.Store("v2")
	exchange(query(t, 2, "a.example.", dnsmessage.TypeA))
	want := `
# HELP istio_dns_requests_total Total number of DNS requests.
# TYPE istio_dns_requests_total counter
istio_dns_requests_total{request_protocol="udp",request_query_type="a",source_canonical_revision="v1",source_canonical_service="sleep"} 1
istio_dns_requests_total{request_protocol="udp",request_query_type="a",source_canonical_revision="v2",source_canonical_service="sleep"} 1
`
	if err := testutil.GatherAndCompare(m.Registry(), strings.NewReader(want), metrics.DNSRequestsName); err != nil {
		t.Error(err)
	}
}
