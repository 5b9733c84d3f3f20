//go:build linux

// Command ambpf-proxy is the node's in-pod mesh proxy (ztunnel
// compatible): it connects to the node agent over ZDS and serves every
// enrolled pod from inside the pod's network namespace. See package
// github.com/ambpf/ambpf/pkg/proxy.
//
// Every flag can also be given in the environment as AMBPF_PROXY_<FLAG>,
// upper case with '-' as '_' (AMBPF_PROXY_DISCOVERY_FILE); a flag on the
// command line wins.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/ambpf/ambpf/pkg/kubediscovery"
	"github.com/ambpf/ambpf/pkg/proxy"
	"github.com/ambpf/ambpf/pkg/zds"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "ambpf-proxy:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		cfg        proxy.Config
		upstreams  string
		kubeconfig string
		inCluster  bool
		h3NS       string
		linkLocal  string
		logLevel   slog.Level
	)
	fs := flag.NewFlagSet("ambpf-proxy", flag.ContinueOnError)
	fs.StringVar(&cfg.ZDSPath, "zds-path", zds.DefaultPath, "node agent ZDS socket (empty: no ZDS)")
	fs.StringVar(&cfg.StateDir, "state-dir", proxy.DefaultStateDir, "directory for state kept across restarts")
	fs.StringVar(&cfg.CADir, "ca-dir", "", "CA directory, created on first start (default <state-dir>/ca)")
	fs.DurationVar(&cfg.CertLifetime, "cert-lifetime", 0, "pod certificate lifetime (default 24h)")
	fs.StringVar(&cfg.TrustDomain, "trust-domain", "", "trust domain of pod identities (default: the discovery's, cluster.local)")
	fs.StringVar(&cfg.DiscoveryFile, "discovery-file", "", "discovery YAML file, watched (default: empty)")
	fs.BoolVar(&inCluster, "kubernetes", false, "watch the Kubernetes API with the pod's service account (in-cluster)")
	fs.StringVar(&kubeconfig, "kubeconfig", "", "watch the Kubernetes API with this kubeconfig file")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", ":15020", `metrics address ("off" to disable)`)
	fs.StringVar(&cfg.ReadyAddr, "ready-addr", ":15021", `readiness address ("off" to disable)`)
	fs.BoolVar(&cfg.DNSCapture, "dns-capture", false, "open the DNS proxy (15053) in every pod; must match the datapath's DNS capture")
	fs.StringVar(&upstreams, "dns-upstream", "", "comma-separated upstream resolvers ip[:port] (default: /etc/resolv.conf)")
	fs.BoolVar(&cfg.NoReusePort, "no-reuseport", false, "do not set SO_REUSEPORT on pod listeners")
	fs.DurationVar(&cfg.DialTimeout, "dial-timeout", proxy.DefaultDialTimeout, "upstream connect timeout")
	fs.BoolVar(&cfg.H3.Serve, "hbone-h3-serve", false, "serve HBONE over HTTP/3 on UDP 15008 in every pod")
	fs.BoolVar(&cfg.H3.Dial, "hbone-h3-dial", false, "try HBONE over HTTP/3 first to every destination (mesh-wide; falls back to HTTP/2)")
	fs.StringVar(&h3NS, "hbone-h3-namespaces", "", "comma-separated destination namespaces tried over HTTP/3 first (a workload's hboneTransport overrides)")
	fs.DurationVar(&cfg.H3.HandshakeTimeout, "hbone-h3-handshake-timeout", 0, "unanswered HTTP/3 handshake before falling back to HTTP/2 (default 1s)")
	fs.DurationVar(&cfg.H3.RetryAfter, "hbone-h3-retry-after", 0, "how long a peer that did not answer over HTTP/3 is dialled over HTTP/2 only (default 1m)")
	fs.StringVar(&cfg.ClusterName, "cluster-name", "", "cluster name for metrics and baggage")
	fs.IntVar(&cfg.Limits.MaxConnsPerPod, "max-conns-per-pod", proxy.DefaultMaxConnsPerPod, "concurrent connections per pod and direction (outbound; inbound 15006+15008); excess reset at once (-1: no limit)")
	fs.DurationVar(&cfg.Limits.ConnIdleTimeout, "conn-idle-timeout", proxy.DefaultConnIdleTimeout, "close a relayed connection that moved no data for this long (-1s: never)")
	fs.IntVar(&cfg.Limits.MaxHandshakesPerPod, "max-handshakes-per-pod", proxy.DefaultMaxHandshakesPerPod, "HBONE TLS handshakes in flight per pod, client and server side each (-1: no limit)")
	fs.DurationVar(&cfg.Limits.HandshakeTimeout, "handshake-timeout", proxy.DefaultHandshakeTimeout, "HBONE TLS handshake timeout")
	fs.IntVar(&cfg.Limits.MaxDNSQueriesPerPod, "max-dns-queries-per-pod", proxy.DefaultMaxDNSQueriesPerPod, "DNS queries in flight (and DNS TCP connections) per pod; excess answered REFUSED (-1: no limit)")
	fs.DurationVar(&cfg.Limits.DNSTimeout, "dns-timeout", proxy.DefaultDNSTimeout, "upstream DNS exchange timeout, and idle timeout of DNS TCP connections")
	fs.StringVar(&linkLocal, "allow-link-local", "", "comma-separated link-local prefixes outbound connections may still reach (e.g. 169.254.169.254/32); every other link-local destination is refused")
	fs.TextVar(&logLevel, "log-level", slog.LevelInfo, "log level: debug, info, warn, error")
	if err := parse(fs, os.Args[1:]); err != nil {
		return err
	}
	for ns := range strings.SplitSeq(h3NS, ",") {
		if ns = strings.TrimSpace(ns); ns != "" {
			cfg.H3.Namespaces = append(cfg.H3.Namespaces, ns)
		}
	}
	for p := range strings.SplitSeq(linkLocal, ",") {
		if p = strings.TrimSpace(p); p == "" {
			continue
		}
		pfx, err := netip.ParsePrefix(p)
		if err != nil {
			return fmt.Errorf("--allow-link-local: %w", err)
		}
		cfg.Limits.AllowLinkLocal = append(cfg.Limits.AllowLinkLocal, pfx.Masked())
	}
	cfg.Logger = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel}))
	if cfg.DNSCapture {
		ups, err := resolvers(upstreams)
		if err != nil {
			return err
		}
		cfg.DNSUpstreams = ups
	}
	if kubeconfig != "" || inCluster {
		rc, err := kubediscovery.RESTConfig(kubeconfig)
		if err != nil {
			return err
		}
		cfg.Kubernetes = rc
	}
	p, err := proxy.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return p.Run(ctx)
}

// parse fills flags from the environment first, then the command line.
func parse(fs *flag.FlagSet, args []string) error {
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		env := "AMBPF_PROXY_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(env); ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", env, err))
			}
		}
	})
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return fs.Parse(args)
}

// resolvers parses the --dns-upstream list, or reads the nameservers of
// /etc/resolv.conf when it is empty.
func resolvers(list string) ([]netip.AddrPort, error) {
	var fields []string
	if list != "" {
		fields = strings.Split(list, ",")
	} else {
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
		s = strings.TrimSpace(s)
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
