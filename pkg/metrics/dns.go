package metrics

import (
	"cmp"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Istio's DNS metric names, as ztunnel exports them (src/dns/metrics.rs,
// under the istio_ prefix).
const (
	DNSRequestsName         = "istio_dns_requests_total"
	DNSUpstreamRequestsName = "istio_dns_upstream_requests_total"
	DNSUpstreamFailuresName = "istio_dns_upstream_failures_total"
	DNSUpstreamDurationName = "istio_dns_upstream_request_duration_seconds"
)

// dnsLabelNames is ztunnel's DNS label set.
var dnsLabelNames = []string{"request_query_type", "request_protocol", "source_canonical_service", "source_canonical_revision"}

// DNS holds the DNS proxy's counters. Every request counts in requests;
// one forwarded upstream also counts in upstream requests, its time in
// the duration histogram and, when it fails, in failures.
type DNS struct {
	requests, upstream, failures *prometheus.CounterVec
	duration                     *prometheus.HistogramVec
}

// DNSQuery labels one query: the type in lower case ("a", "aaaa"), the
// transport ("udp", "tcp") and the client's canonical service and
// revision ("" is "unknown").
type DNSQuery struct {
	Type, Protocol    string
	CanonicalService  string
	CanonicalRevision string
}

func (q DNSQuery) values() []string {
	return []string{cmp.Or(q.Type, unknown), cmp.Or(q.Protocol, unknown), cmp.Or(q.CanonicalService, unknown), cmp.Or(q.CanonicalRevision, unknown)}
}

// DNS returns the DNS counters, registered in m's registry on first use.
func (m *Metrics) DNS() *DNS {
	m.dnsOnce.Do(func() {
		counter := func(name, help string) *prometheus.CounterVec {
			return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, dnsLabelNames)
		}
		m.dns = &DNS{
			requests: counter(DNSRequestsName, "Total number of DNS requests."),
			upstream: counter(DNSUpstreamRequestsName, "Total number of DNS requests forwarded to upstream."),
			failures: counter(DNSUpstreamFailuresName, "Total number of DNS requests that failed to forward upstream."),
			// ztunnel's buckets.
			duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: DNSUpstreamDurationName,
				Help:    "Total time in seconds Istio takes to get DNS response from upstream.",
				Buckets: []float64{0.0005, 0.001, 0.01, 0.1, 1, 5}}, dnsLabelNames),
		}
		m.reg.MustRegister(m.dns.requests, m.dns.upstream, m.dns.failures, m.dns.duration)
	})
	return m.dns
}

// Request counts one query the DNS proxy received.
func (d *DNS) Request(q DNSQuery) {
	if d != nil {
		d.requests.WithLabelValues(q.values()...).Inc()
	}
}

// Upstream counts one query forwarded upstream, how long it took and
// whether it failed.
func (d *DNS) Upstream(q DNSQuery, took time.Duration, failed bool) {
	if d == nil {
		return
	}
	v := q.values()
	d.upstream.WithLabelValues(v...).Inc()
	d.duration.WithLabelValues(v...).Observe(took.Seconds())
	if failed {
		d.failures.WithLabelValues(v...).Inc()
	}
}
