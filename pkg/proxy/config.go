//go:build linux

package proxy

import (
	_ "embed"
	"log/slog"
	"net/netip"
	"path/filepath"
	"time"

	"k8s.io/client-go/rest"

	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/metrics"
)

// Defaults of Config.
const (
	DefaultStateDir    = "/var/run/ambpf-proxy"
	DefaultDialTimeout = 5 * time.Second
)

// emptyDiscovery is the discovery content used when no file is given: no
// workloads, services or policies, mesh-wide PERMISSIVE. Pods enrolled
// through ZDS still become mesh workloads (the ZDS layer), so two pods
// of one node talk HBONE with nothing configured.
//
//go:embed default_discovery.yaml
var emptyDiscovery []byte

// Config configures a Proxy. Zero values take the defaults.
type Config struct {
	// ZDSPath is the node agent's ZDS socket. Empty means no ZDS client:
	// pods are added only by calling the Proxy's zds.Handler methods
	// (tests, or an embedding program), and the proxy is ready at once.
	ZDSPath string
	// StateDir holds what the proxy keeps across restarts (the CA when
	// CADir is empty); DefaultStateDir when empty.
	StateDir string
	// CADir is the certificate authority directory for identity.LoadOrCreate;
	// <StateDir>/ca when empty. A CA is created there on first start.
	CADir string
	// Authority, when set, issues the pods' certificates and holds the
	// roots peers are verified against instead of the local CA of CADir,
	// which is then neither read nor created: a remote CA
	// (pkg/caclient), so that no CA key is on the node. When it
	// implements prometheus.Collector its metrics join the proxy's.
	Authority identity.Authority `json:"-"`
	// CertLifetime is the lifetime of each pod certificate; renewal
	// happens at 50-80% of it. identity.DefaultLifetime when zero.
	CertLifetime time.Duration
	// TrustDomain overrides the trust domain of pod identities; empty
	// means the discovery's (default cluster.local).
	TrustDomain string
	// DiscoveryFile is a discovery YAML file (pkg/discovery format),
	// polled for changes. Empty means an embedded empty configuration.
	DiscoveryFile string
	// DiscoveryPoll is how often the file is checked;
	// discovery.DefaultPollInterval when zero.
	DiscoveryPoll time.Duration
	// Kubernetes, when set, is how to reach the Kubernetes API: pods,
	// Services, EndpointSlices, AuthorizationPolicies and
	// PeerAuthentications are watched (pkg/kubediscovery) into a layer
	// below the discovery file's, and the proxy is ready only once they
	// are loaded. Nil means no API.
	Kubernetes *rest.Config
	// MTLSMode is the mesh-wide mTLS mode that applies when neither the
	// discovery file nor a PeerAuthentication in the root namespace sets
	// one: discovery.MTLSStrict refuses plaintext inbound to every pod,
	// MTLSPermissive (or empty) accepts it. Namespace-wide
	// PeerAuthentications still override it per namespace.
	MTLSMode discovery.MTLSMode
	// AdminAddr is where the admin endpoint listens (ztunnel's: see
	// Proxy.ConfigDump and the Admin*Path constants): "" or "off" serves
	// none, so that embedding programs and tests open no fixed port; the
	// ambpf-proxy command defaults to DefaultAdminAddr. Keep it on
	// loopback: it can stop the proxy and change its log level.
	AdminAddr string
	// LogLevel, when set, is the level Logger's handler reads; the admin
	// endpoint's /logging changes it at run time.
	LogLevel *slog.LevelVar
	// MetricsAddr and ReadyAddr are where /metrics and /healthz/ready are
	// served, in the proxy's own network namespace (not the pods'). Empty
	// means Istio's ports :15020 and :15021; "off" serves nothing.
	MetricsAddr, ReadyAddr string
	// FastPath says the agent runs the in-pod fast path (pkg/fastpath)
	// for every pod: an app's bytes then reach the outbound socket's
	// receive queue outside TCP's, which splice(2) does not read, so the
	// proxy reads its outbound (15001) sockets with read only. ambpf-agent
	// says so per pod in the ZDS Add (WorkloadInfo.FastPath), which is
	// enough; this is for an agent that does not.
	FastPath bool
	// DNSCapture opens the DNS listeners (127.0.0.1:15053 and
	// [::1]:15053, UDP and TCP) in every pod. ZDS WorkloadInfo carries no
	// DNS flag, so this is proxy-wide and must match the datapath's
	// per-pod DNSCapture option: with the option on and no listener, the
	// pod's DNS is dropped.
	DNSCapture bool
	// DNSUpstreams are the resolvers queries for non-mesh names go to.
	DNSUpstreams []netip.AddrPort
	// ClusterDomain is the Kubernetes cluster DNS domain the DNS proxy
	// answers service names under; "" is cluster.local.
	ClusterDomain string
	// NoReusePort leaves SO_REUSEPORT off the pod listeners. It is on by
	// default, so that a second proxy can take over during an upgrade,
	// except where the datapath cannot steer to SO_REUSEPORT listeners
	// (before Linux 6.6): ambpf-agent says so per pod in the ZDS Add
	// (WorkloadInfo.ReusePort, from its probe of the kernel), and for an
	// agent that does not the kernel's version decides
	// (kernfeat.ReusePortAssign). NoReusePort wins over both.
	NoReusePort bool
	// DialTimeout bounds every upstream connect; DefaultDialTimeout when
	// zero.
	DialTimeout time.Duration
	// SyncWait is how long a captured connection that would leave in
	// plaintext waits for a complete view of the mesh (the ZDS snapshot
	// of the current agent connection, the Kubernetes caches) before it is
	// refused; DefaultSyncWait when zero. It is never passed through
	// before.
	SyncWait time.Duration
	// DrainTimeout is how long Run, once its context ends, lets the
	// established connections finish after closing the listeners (see
	// Proxy.Run); DefaultDrainTimeout when zero, negative: no drain.
	DrainTimeout time.Duration
	// H3 configures HBONE over HTTP/3, the opt-in transport.
	H3 H3Config
	// ClusterName goes into metrics labels and HBONE baggage.
	ClusterName string
	// Limits bound what each pod can take from the proxy (connections,
	// TLS handshakes, DNS queries, idle time); see Limits.
	Limits Limits
	// Logger receives the proxy's logs and access-log lines;
	// slog.Default() when nil.
	Logger *slog.Logger
}

// H3Config configures HBONE over HTTP/3 (QUIC on UDP 15008). Serving and
// dialing are separate: a pod may serve HTTP/3 while its clients still
// dial HTTP/2, and a client that wants HTTP/3 falls back to HTTP/2 when
// the peer does not answer on UDP.
type H3Config struct {
	// Serve opens UDP [::]:15008 in every pod (proxy mark, SO_REUSEPORT
	// when the pod's TCP listeners have it: see NoReusePort) and serves
	// HBONE over HTTP/3 there with the pod's certificate.
	Serve bool
	// Dial makes every HBONE destination be tried over HTTP/3 first
	// (mesh-wide).
	Dial bool
	// Namespaces are destination namespaces tried over HTTP/3 first.
	// A workload's discovery field hboneTransport (h2 or h3) overrides
	// both Dial and Namespaces.
	Namespaces []string
	// HandshakeTimeout is how long an HTTP/3 handshake may go unanswered
	// before the tunnel falls back to HTTP/2 (default 1 s); RetryAfter is
	// how long such a peer is then dialled over HTTP/2 only (default
	// 1 min).
	HandshakeTimeout, RetryAfter time.Duration
}

// enabled reports whether the proxy uses QUIC at all.
func (c H3Config) enabled() bool { return c.Serve || c.Dial || len(c.Namespaces) > 0 }

// disabled is the address value that turns a listener off.
const disabled = "off"

func (c Config) withDefaults() Config {
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.CADir == "" {
		c.CADir = filepath.Join(c.StateDir, "ca")
	}
	if c.MetricsAddr == "" {
		c.MetricsAddr = metrics.DefaultMetricsAddr
	}
	if c.ReadyAddr == "" {
		c.ReadyAddr = metrics.DefaultReadyAddr
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = DefaultDrainTimeout
	}
	if c.SyncWait <= 0 {
		c.SyncWait = DefaultSyncWait
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	c.Limits = c.Limits.withDefaults()
	return c
}
