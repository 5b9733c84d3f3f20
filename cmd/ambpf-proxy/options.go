//go:build linux

package main

import (
	"bufio"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"

	"github.com/ambpf/ambpf/pkg/caclient"
	"github.com/ambpf/ambpf/pkg/discovery"
	"github.com/ambpf/ambpf/pkg/envflag"
	"github.com/ambpf/ambpf/pkg/proxy"
	"github.com/ambpf/ambpf/pkg/zds"
)

// binding maps every flag to AMBPF_PROXY_<FLAG>.
var binding = envflag.Binding{Prefix: "AMBPF_PROXY_"}

// options are the parsed flags: proxy.Config's fields, and what is turned
// into them.
type options struct {
	cfg         proxy.Config
	mtlsMode    string
	upstreams   string
	h3NS        string
	linkLocal   string
	kubeconfig  string
	inCluster   bool
	caClient    caclient.Config
	logLevel    slog.Level
	printConfig bool
}

// parse reads the flags from environ and args (the command line wins).
func parse(args, environ []string) (*options, error) {
	var o options
	cfg := &o.cfg
	fs := flag.NewFlagSet("ambpf-proxy", flag.ContinueOnError)
	fs.Usage = binding.Usage(fs)
	fs.StringVar(&cfg.ZDSPath, "zds-path", zds.DefaultPath, "node agent ZDS socket (empty: no ZDS)")
	fs.StringVar(&cfg.StateDir, "state-dir", proxy.DefaultStateDir, "directory for state kept across restarts")
	fs.StringVar(&cfg.CADir, "ca-dir", "", "CA directory, created on first start (default <state-dir>/ca)")
	fs.StringVar(&o.caClient.Address, "ca-address", "", "remote CA serving Istio's certificate API, host:port (ambpf-ca, or istiod:15012); empty: the local CA of --ca-dir")
	fs.StringVar(&o.caClient.RootFile, "ca-root-file", caclient.DefaultRootFile, "mesh root(s) PEM that verify the remote CA and peers (istio-ca-root-cert's root-cert.pem)")
	fs.StringVar(&o.caClient.TokenFile, "ca-token-file", caclient.DefaultTokenFile, "projected service account token (audience istio-ca) sent to the remote CA")
	fs.StringVar(&o.caClient.ServerName, "ca-server-name", "", "name the remote CA's certificate is verified for (default: --ca-address's host)")
	fs.StringVar(&o.caClient.ClusterID, "ca-cluster-id", caclient.DefaultClusterID, "ClusterID header sent to the remote CA")
	fs.DurationVar(&cfg.CertLifetime, "cert-lifetime", 0, "pod certificate lifetime (default 24h)")
	fs.StringVar(&cfg.TrustDomain, "trust-domain", "", "trust domain of pod identities (default: the discovery's, cluster.local)")
	fs.StringVar(&cfg.DiscoveryFile, "discovery-file", "", "discovery YAML file, watched (default: empty)")
	fs.StringVar(&o.mtlsMode, "mtls-mode", "", "mesh-wide mTLS mode when no PeerAuthentication or discovery file sets one: STRICT or PERMISSIVE (default PERMISSIVE)")
	fs.BoolVar(&o.inCluster, "kubernetes", false, "watch the Kubernetes API with the pod's service account (in-cluster)")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "watch the Kubernetes API with this kubeconfig file")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", ":15020", `metrics address ("off" to disable)`)
	fs.StringVar(&cfg.ReadyAddr, "ready-addr", ":15021", `readiness address ("off" to disable)`)
	fs.StringVar(&cfg.AdminAddr, "admin-addr", proxy.DefaultAdminAddr, `admin endpoint address, as ztunnel's: /config_dump, /logging, /debug/pprof/, /quitquitquit ("off" to disable; keep it on loopback)`)
	fs.BoolVar(&cfg.FastPath, "fastpath", false, "read every pod's outbound sockets without splice, as the in-pod fast path needs (ambpf-agent says so per pod over ZDS; this is for an agent that does not)")
	fs.BoolVar(&cfg.DNSCapture, "dns-capture", false, "open the DNS proxy (15053) in every pod; must match the datapath's DNS capture")
	fs.StringVar(&o.upstreams, "dns-upstream", "", "comma-separated upstream resolvers ip[:port] (default: /etc/resolv.conf)")
	fs.StringVar(&cfg.ClusterDomain, "cluster-domain", "cluster.local", "Kubernetes cluster DNS domain the DNS proxy answers service names under")
	fs.BoolVar(&cfg.NoReusePort, "no-reuseport", false, "do not set SO_REUSEPORT on pod listeners, whatever the agent says (by default the agent says per pod whether the kernel can steer to them)")
	fs.DurationVar(&cfg.DialTimeout, "dial-timeout", proxy.DefaultDialTimeout, "upstream connect timeout")
	fs.DurationVar(&cfg.DrainTimeout, "drain-timeout", proxy.DefaultDrainTimeout, "on SIGTERM or SIGINT: close the pod listeners (a new proxy takes new connections) and let established connections finish for up to this long, then close the rest (-1s: close at once); keep it below the pod's terminationGracePeriodSeconds")
	fs.DurationVar(&cfg.SyncWait, "sync-wait", proxy.DefaultSyncWait, "how long a connection that would leave in plaintext waits for the full mesh view (ZDS snapshot, Kubernetes caches) before it is refused")
	fs.IntVar(&cfg.Limits.MaxConnsPerPod, "max-conns-per-pod", proxy.DefaultMaxConnsPerPod, "concurrent connections per pod and direction (outbound; inbound 15006+15008); excess reset at once (-1: no limit)")
	fs.DurationVar(&cfg.Limits.ConnIdleTimeout, "conn-idle-timeout", proxy.DefaultConnIdleTimeout, "close a relayed connection that moved no data for this long (-1s: never)")
	fs.IntVar(&cfg.Limits.MaxHandshakesPerPod, "max-handshakes-per-pod", proxy.DefaultMaxHandshakesPerPod, "HBONE TLS handshakes in flight per pod, client and server side each (-1: no limit)")
	fs.DurationVar(&cfg.Limits.HandshakeTimeout, "handshake-timeout", proxy.DefaultHandshakeTimeout, "HBONE TLS handshake timeout")
	fs.IntVar(&cfg.Limits.MaxDNSQueriesPerPod, "max-dns-queries-per-pod", proxy.DefaultMaxDNSQueriesPerPod, "DNS queries in flight (and DNS TCP connections) per pod; excess answered REFUSED (-1: no limit)")
	fs.DurationVar(&cfg.Limits.DNSTimeout, "dns-timeout", proxy.DefaultDNSTimeout, "upstream DNS exchange timeout, and idle timeout of DNS TCP connections")
	fs.StringVar(&o.linkLocal, "allow-link-local", "", "comma-separated link-local prefixes outbound connections may still reach (e.g. 169.254.169.254/32); every other link-local destination is refused")
	fs.BoolVar(&cfg.H3.Serve, "hbone-h3-serve", false, "serve HBONE over HTTP/3 on UDP 15008 in every pod")
	fs.BoolVar(&cfg.H3.Dial, "hbone-h3-dial", false, "try HBONE over HTTP/3 first to every destination (mesh-wide; falls back to HTTP/2)")
	fs.StringVar(&o.h3NS, "hbone-h3-namespaces", "", "comma-separated destination namespaces tried over HTTP/3 first (a workload's hboneTransport overrides)")
	fs.DurationVar(&cfg.H3.HandshakeTimeout, "hbone-h3-handshake-timeout", 0, "unanswered HTTP/3 handshake before falling back to HTTP/2 (default 1s)")
	fs.DurationVar(&cfg.H3.RetryAfter, "hbone-h3-retry-after", 0, "how long a peer that did not answer over HTTP/3 is dialled over HTTP/2 only (default 1m)")
	fs.StringVar(&cfg.ClusterName, "cluster-name", "", "cluster name for metrics and baggage")
	fs.TextVar(&o.logLevel, "log-level", slog.LevelInfo, "log level: debug, info, warn, error")
	fs.BoolVar(&o.printConfig, "print-config", false, "print the configuration as JSON and exit")
	if err := binding.Parse(fs, args, environ); err != nil {
		return nil, err
	}
	return &o, nil
}

// config is the proxy.Config the options make, without Kubernetes (run
// adds it: the in-cluster configuration exists only in a pod).
func (o *options) config() (proxy.Config, error) {
	cfg := o.cfg
	cfg.H3.Namespaces = list(o.h3NS)
	cfg.MTLSMode = discovery.MTLSMode(o.mtlsMode)
	if err := cfg.MTLSMode.Validate(); err != nil {
		return cfg, fmt.Errorf("-mtls-mode: %w", err)
	}
	// A LevelVar, so that the admin endpoint's /logging can change it.
	cfg.LogLevel = new(slog.LevelVar)
	cfg.LogLevel.Set(o.logLevel)
	cfg.Logger = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.LogLevel}))
	for _, p := range list(o.linkLocal) {
		pfx, err := netip.ParsePrefix(p)
		if err != nil {
			return cfg, fmt.Errorf("-allow-link-local: %w", err)
		}
		cfg.Limits.AllowLinkLocal = append(cfg.Limits.AllowLinkLocal, pfx.Masked())
	}
	// A given list is checked even with DNS capture off, so a typo fails
	// at once rather than on the day capture is turned on.
	if o.upstreams != "" || cfg.DNSCapture {
		ups, err := resolvers(o.upstreams)
		if err != nil {
			return cfg, err
		}
		cfg.DNSUpstreams = ups
	}
	return cfg, nil
}

// list splits a comma-separated flag value, dropping empty items.
func list(s string) []string {
	var out []string
	for item := range strings.SplitSeq(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

// resolvers parses the --dns-upstream list, or reads the nameservers of
// /etc/resolv.conf when it is empty.
func resolvers(csv string) ([]netip.AddrPort, error) {
	fields := list(csv)
	if len(fields) == 0 {
		f, err := os.Open("/etc/resolv.conf")
		if err != nil {
			return nil, fmt.Errorf("read resolvers: %w", err)
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if w := strings.Fields(sc.Text()); len(w) >= 2 && w[0] == "nameserver" {
				fields = append(fields, w[1])
			}
		}
	}
	var out []netip.AddrPort
	for _, s := range fields {
		if ap, err := netip.ParseAddrPort(s); err == nil {
			out = append(out, ap)
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("dns upstream %q: not ip or ip:port", s)
		}
		out = append(out, netip.AddrPortFrom(a, 53))
	}
	return out, nil
}
