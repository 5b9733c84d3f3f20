// Command ambpf-ca is the mesh's certificate authority: it serves Istio's
// certificate API (IstioCertificateService/CreateCertificate) over gRPC
// with TLS, authenticates callers by TokenReview, authorizes node proxies
// for the pods of their node, signs with the key of --ca-dir (the only
// place it lives) and publishes the trust bundle in the
// istio-ca-root-cert ConfigMap of every namespace. See package
// github.com/ambpf/ambpf/pkg/ca.
//
// Every flag can also be given as AMBPF_CA_<FLAG> (pkg/envflag); an
// AMBPF_CA_ variable that names no flag is a startup error.
// --print-config prints the parsed configuration as JSON and exits.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/ambpf/ambpf/pkg/ca"
	"github.com/ambpf/ambpf/pkg/envflag"
	"github.com/ambpf/ambpf/pkg/identity"
	"github.com/ambpf/ambpf/pkg/kubediscovery"
)

var binding = envflag.Binding{Prefix: "AMBPF_CA_"}

// kubeQPS is the API request rate the CA allows itself.
const kubeQPS = 100

// options are the parsed flags.
type options struct {
	Listen          string
	CADir           string
	TrustDomain     string
	ClusterID       string
	Kubeconfig      string
	Audiences       []string
	TrustedAccounts []string
	ServingNames    []string
	DefaultLifetime time.Duration
	MaxLifetime     time.Duration
	MaxCSRBytes     int
	Rate            float64
	Burst           int
	PublishRoots    bool
	MetricsAddr     string
	LogLevel        string

	logLevel    slog.Level
	printConfig bool
}

func main() {
	if err := run(os.Args[1:], os.Environ(), os.Stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "ambpf-ca:", err)
		os.Exit(1)
	}
}

func parse(args, environ []string) (*options, error) {
	var o options
	var audiences, trusted, names string
	fs := flag.NewFlagSet("ambpf-ca", flag.ContinueOnError)
	fs.Usage = binding.Usage(fs)
	fs.StringVar(&o.Listen, "listen", ":15012", "gRPC (TLS) listen address")
	fs.StringVar(&o.CADir, "ca-dir", "/etc/ambpf/ca", "CA directory: ca.crt+ca.key, or cert-manager's tls.crt+tls.key+ca.crt; a root is created when empty and writable")
	fs.StringVar(&o.TrustDomain, "trust-domain", "cluster.local", "trust domain of the identities issued")
	fs.StringVar(&o.ClusterID, "cluster-id", ca.DefaultClusterID, "this cluster's ID; requests whose ClusterID header names another are refused")
	fs.StringVar(&o.Kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster service account)")
	fs.StringVar(&audiences, "audiences", ca.Audience, "comma-separated token audiences accepted")
	fs.StringVar(&trusted, "trusted-node-accounts", "", "comma-separated namespace/serviceaccount of the node proxies, which may ask for the identities of their node's pods")
	fs.StringVar(&names, "serving-names", "localhost", "comma-separated DNS names and IPs of the CA's serving certificate")
	fs.DurationVar(&o.DefaultLifetime, "default-cert-lifetime", ca.DefaultLifetime, "certificate lifetime when a request asks for none")
	fs.DurationVar(&o.MaxLifetime, "max-cert-lifetime", ca.DefaultMaxLifetime, "longest certificate lifetime issued")
	fs.IntVar(&o.MaxCSRBytes, "max-csr-bytes", ca.DefaultMaxCSRBytes, "largest PEM CSR accepted")
	fs.Float64Var(&o.Rate, "rate", ca.DefaultRate, "requests per second allowed per caller pod")
	fs.IntVar(&o.Burst, "burst", ca.DefaultBurst, "request burst allowed per caller pod")
	fs.BoolVar(&o.PublishRoots, "publish-roots", true, "keep the istio-ca-root-cert ConfigMap in every namespace")
	fs.StringVar(&o.MetricsAddr, "metrics-addr", ":15014", `metrics address ("off" to disable)`)
	fs.TextVar(&o.logLevel, "log-level", slog.LevelInfo, "log level: debug, info, warn, error")
	fs.BoolVar(&o.printConfig, "print-config", false, "print the configuration as JSON and exit")
	if err := binding.Parse(fs, args, environ); err != nil {
		return nil, err
	}
	o.Audiences, o.TrustedAccounts, o.ServingNames = list(audiences), list(trusted), list(names)
	o.LogLevel = o.logLevel.String()
	return &o, nil
}

func list(s string) []string {
	var out []string
	for item := range strings.SplitSeq(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

func run(args, environ []string, stdout io.Writer) error {
	o, err := parse(args, environ)
	if err != nil {
		return err
	}
	var accounts []types.NamespacedName
	for _, a := range o.TrustedAccounts {
		ns, name, ok := strings.Cut(a, "/")
		if !ok || ns == "" || name == "" {
			return fmt.Errorf("-trusted-node-accounts: %q is not namespace/serviceaccount", a)
		}
		accounts = append(accounts, types.NamespacedName{Namespace: ns, Name: name})
	}
	if o.printConfig {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(o)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: o.logLevel}))
	authority, err := identity.LoadOrCreate(o.CADir)
	if err != nil {
		return err
	}
	rc, err := kubediscovery.RESTConfig(o.Kubeconfig)
	if err != nil {
		return err
	}
	// Each request costs up to four API calls (TokenReview, caller pod,
	// node, pods of the node): client-go's default 5 QPS would make the
	// CA itself the bottleneck when a node's proxy starts.
	rc.QPS, rc.Burst = kubeQPS, 2*kubeQPS
	kube, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	reg := prometheus.NewRegistry()
	srv, err := ca.New(ca.Config{
		CA: authority, Kube: kube, TrustDomain: o.TrustDomain, ClusterID: o.ClusterID,
		Audiences: o.Audiences, TrustedNodeAccounts: accounts,
		DefaultLifetime: o.DefaultLifetime, MaxLifetime: o.MaxLifetime, MaxCSRBytes: o.MaxCSRBytes,
		Rate: o.Rate, Burst: o.Burst, Registerer: reg, Logger: log,
	})
	if err != nil {
		return err
	}
	cert := &ca.ServingCert{CA: authority}
	for _, n := range o.ServingNames {
		if ip := net.ParseIP(n); ip != nil {
			cert.IPs = append(cert.IPs, ip)
		} else {
			cert.Names = append(cert.Names, n)
		}
	}
	if _, err := cert.GetCertificate(nil); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", o.Listen, err)
	}
	g := ca.NewGRPCServer(srv, cert)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if o.PublishRoots {
		go (&ca.Publisher{Kube: kube, Roots: authority.RootsPEM(), Logger: log}).Run(ctx)
	}
	if o.MetricsAddr != "off" {
		mln, err := net.Listen("tcp", o.MetricsAddr)
		if err != nil {
			return fmt.Errorf("listen %s: %w", o.MetricsAddr, err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go hs.Serve(mln)
		defer hs.Close()
	}
	go func() {
		<-ctx.Done()
		g.GracefulStop()
	}()
	log.Info("serving", "addr", ln.Addr().String(), "trust_domain", o.TrustDomain, "signer", authority.Certificate().Subject.String())
	if err := g.Serve(ln); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}
