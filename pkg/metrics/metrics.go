// Package metrics exports the proxy's TCP telemetry with Istio's metric
// names and labels, so existing Istio dashboards and Kiali work, and
// writes one access-log line per connection.
//
// A connection is recorded with Open, which counts it opened; the proxy
// then calls AddSent/AddReceived as bytes move (each call adds to the
// exported counters at once, so a long connection shows progress), and
// Close, which counts it closed and logs it. Every Metrics has its own
// prometheus.Registry: nothing is registered globally.
package metrics

import (
	"cmp"
	"log/slog"
	"net/http"
	"runtime/debug"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Istio's TCP metric names.
const (
	ConnectionsOpenedName = "istio_tcp_connections_opened_total"
	ConnectionsClosedName = "istio_tcp_connections_closed_total"
	SentBytesName         = "istio_tcp_sent_bytes_total"
	ReceivedBytesName     = "istio_tcp_received_bytes_total"
	// ConnectionsFailedName counts connections closed with a failure
	// flag (FlagDenied, FlagConnectFailure), as ztunnel does.
	ConnectionsFailedName = "istio_tcp_connections_failed_total"
	// BuildName is ztunnel's build-info gauge: 1 with component and tag.
	BuildName = "istio_build"
)

// BuildComponent is the component label of BuildName: the role this proxy
// plays in Istio's ambient mesh, so that dashboards find it.
const BuildComponent = "ztunnel"

// Values of the reporter label: which end of the connection reports.
const (
	ReporterSource      = "source"
	ReporterDestination = "destination"
)

// Values of the connection_security_policy label.
const (
	SecurityMutualTLS = "mutual_tls"
	SecurityUnknown   = "unknown"
)

// Values of the response_flags label, as ztunnel reports them.
const (
	FlagNone           = "-"
	FlagDenied         = "DENY"    // refused by authorization policy
	FlagConnectFailure = "CONNECT" // the upstream connection failed
)

// unknown is Istio's value for a label it cannot fill.
const unknown = "unknown"

// DefaultCluster is the cluster label when none is configured: Istio's
// default cluster ID.
const DefaultCluster = "Kubernetes"

// Canonical returns a workload's canonical service and revision as Istio
// derives them (pkg/kube/labels CanonicalService): the
// service.istio.io/canonical-name label, else app.kubernetes.io/name,
// else app, else workload; the service.istio.io/canonical-revision
// label, else app.kubernetes.io/version, else version, else "latest".
func Canonical(labels map[string]string, workload string) (service, revision string) {
	first := func(def string, keys ...string) string {
		for _, k := range keys {
			if v, ok := labels[k]; ok {
				return v
			}
		}
		return def
	}
	return first(workload, "service.istio.io/canonical-name", "app.kubernetes.io/name", "app"),
		first("latest", "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
}

// labelNames is the label set of every TCP metric, in Istio's names; the
// order matches Labels.values.
var labelNames = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal",
	"source_app", "source_version", "source_cluster",
	"source_canonical_service", "source_canonical_revision",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_workload_namespace", "destination_principal",
	"destination_app", "destination_version", "destination_cluster",
	"destination_canonical_service", "destination_canonical_revision",
	"request_protocol", "response_flags", "connection_security_policy",
	// ztunnel's LocalityLabels, flattened at the end of its label set.
	"source_region", "source_zone", "destination_region", "destination_zone",
}

// Labels are the label values of one connection. Empty values are
// exported as Istio does: "unknown", except RequestProtocol ("tcp") and
// ResponseFlags ("-").
type Labels struct {
	Reporter string // ReporterSource or ReporterDestination

	SourceWorkload          string
	SourceWorkloadNamespace string
	SourcePrincipal         string // SPIFFE ID, "spiffe://td/ns/x/sa/y"
	SourceApp               string
	SourceVersion           string
	SourceCluster           string // "" is DefaultCluster
	// SourceCanonicalService and SourceCanonicalRevision: see Canonical.
	SourceCanonicalService  string
	SourceCanonicalRevision string

	DestinationService           string // hostname, name.namespace.svc.cluster.local
	DestinationServiceNamespace  string
	DestinationServiceName       string
	DestinationWorkload          string
	DestinationWorkloadNamespace string
	DestinationPrincipal         string
	DestinationApp               string
	DestinationVersion           string
	DestinationCluster           string // "" is DefaultCluster
	DestinationCanonicalService  string
	DestinationCanonicalRevision string

	RequestProtocol          string
	ResponseFlags            string
	ConnectionSecurityPolicy string // SecurityMutualTLS or SecurityUnknown

	// Locality: the region and zone of each side's node (Istio takes
	// them from the node's topology.kubernetes.io labels).
	SourceRegion, SourceZone           string
	DestinationRegion, DestinationZone string

	// SourcePod and DestinationPod are not metric labels: they are the
	// pods' names, which ztunnel's access log writes as src.workload and
	// dst.workload ("" falls back to the canonical service).
	SourcePod, DestinationPod string
}

// values returns the label values in labelNames order, defaults applied.
func (l *Labels) values() []string {
	u := func(s string) string { return cmp.Or(s, unknown) }
	return []string{
		u(l.Reporter),
		u(l.SourceWorkload), u(l.SourceWorkloadNamespace), u(l.SourcePrincipal),
		u(l.SourceApp), u(l.SourceVersion), cmp.Or(l.SourceCluster, DefaultCluster),
		u(l.SourceCanonicalService), u(l.SourceCanonicalRevision),
		u(l.DestinationService), u(l.DestinationServiceNamespace), u(l.DestinationServiceName),
		u(l.DestinationWorkload), u(l.DestinationWorkloadNamespace), u(l.DestinationPrincipal),
		u(l.DestinationApp), u(l.DestinationVersion), cmp.Or(l.DestinationCluster, DefaultCluster),
		u(l.DestinationCanonicalService), u(l.DestinationCanonicalRevision),
		cmp.Or(l.RequestProtocol, "tcp"), cmp.Or(l.ResponseFlags, FlagNone), u(l.ConnectionSecurityPolicy),
		u(l.SourceRegion), u(l.SourceZone), u(l.DestinationRegion), u(l.DestinationZone),
	}
}

// Metrics holds the TCP counters, their registry and the access logger.
type Metrics struct {
	reg      *prometheus.Registry
	opened   *prometheus.CounterVec
	closed   *prometheus.CounterVec
	sent     *prometheus.CounterVec
	received *prometheus.CounterVec
	failed   *prometheus.CounterVec
	log      *slog.Logger

	dnsOnce sync.Once
	dns     *DNS
}

// New creates the counters in a new registry, together with the Go
// runtime and process collectors. Access-log lines go to logger (nil
// means slog.Default()), with scope "access" (ztunnel's log target).
func New(logger *slog.Logger) *Metrics {
	if logger == nil {
		logger = slog.Default()
	}
	logger = logger.With(LogScope, LogScopeAccess)
	counter := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labelNames)
	}
	m := &Metrics{
		reg:      prometheus.NewRegistry(),
		opened:   counter(ConnectionsOpenedName, "Total TCP connections opened."),
		closed:   counter(ConnectionsClosedName, "Total TCP connections closed."),
		sent:     counter(SentBytesName, "Total bytes sent during response (server to client) over TCP connections."),
		received: counter(ReceivedBytesName, "Total bytes received during request (client to server) over TCP connections."),
		failed:   counter(ConnectionsFailedName, "The total number of TCP connections that failed to establish."),
		log:      logger,
	}
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: BuildName, Help: "Istio component build info."}, []string{"component", "tag"})
	build.WithLabelValues(BuildComponent, buildTag()).Set(1)
	m.reg.MustRegister(m.opened, m.closed, m.sent, m.received, m.failed, build,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// buildTag is the main module's version, or "unknown" (a build from a
// work tree has "(devel)").
func buildTag() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return unknown
}

// Registry returns the registry the metrics live in, for tests and for
// registering more collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the registry in the Prometheus exposition format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// ztunnel's workload-manager metrics (src/inpod/metrics.rs, registered
// under the workload_manager prefix, outside istio_).
const (
	ActiveProxiesName  = "workload_manager_active_proxy_count"
	PendingProxiesName = "workload_manager_pending_proxy_count"
	ProxiesStartedName = "workload_manager_proxies_started_total"
	ProxiesStoppedName = "workload_manager_proxies_stopped_total"
)

// WorkloadManager counts the pod proxies started and stopped.
type WorkloadManager struct {
	Started, Stopped prometheus.Counter
}

// WorkloadManager registers ztunnel's workload-manager metrics in m's
// registry: the gauges read active (pod proxies running) and pending
// (pods whose start failed and is retried) at each scrape; the returned
// counters are for the caller to increment. Call it once.
func (m *Metrics) WorkloadManager(active, pending func() int) *WorkloadManager {
	gauge := func(name, help string, f func() int) prometheus.GaugeFunc {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return float64(f()) })
	}
	w := &WorkloadManager{
		Started: prometheus.NewCounter(prometheus.CounterOpts{Name: ProxiesStartedName, Help: "The total number of proxies that were started."}),
		Stopped: prometheus.NewCounter(prometheus.CounterOpts{Name: ProxiesStoppedName, Help: "The total number of proxies that were stopped."}),
	}
	m.reg.MustRegister(w.Started, w.Stopped,
		gauge(ActiveProxiesName, "The total number current workloads with active proxies.", active),
		gauge(PendingProxiesName, "The total number current workloads with pending proxies.", pending))
	return w
}
