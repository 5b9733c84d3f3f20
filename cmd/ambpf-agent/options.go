//go:build linux

package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ambpf/ambpf/pkg/agent"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/cgroup"
	"github.com/ambpf/ambpf/pkg/cniinstall"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/envflag"
	"github.com/ambpf/ambpf/pkg/fastpath"
	"github.com/ambpf/ambpf/pkg/podwatch"
	"github.com/ambpf/ambpf/pkg/zds"
)

// binding maps every flag to AMBPF_<FLAG>. The aliases are the names
// the agent read before (AMBPF_AGENT_SOCKET is also ambpfctl's) and the
// usual unprefixed ones. AMBPF_PROXY_* is ambpf-proxy's (a shell or pod
// may set both), AMBPF_TOOLS_DIR and AMBPF_KUBE_BIN_DIR are the build's
// and the tests': none of them is an error here. So that AMBPF_PROXY_*
// stays unambiguous, no agent flag may begin with "proxy-" (a test
// checks).
var binding = envflag.Binding{
	Prefix: "AMBPF_",
	Aliases: map[string]string{
		"AMBPF_AGENT_SOCKET": "api-socket",
		"NODE_NAME":          "node-name",
		"KUBECONFIG":         "kubeconfig",
	},
	Ignore: []string{"AMBPF_PROXY_", "AMBPF_TOOLS_DIR", "AMBPF_KUBE_BIN_DIR"},
}

// defaultExcludePods selects the chart's agent and proxy pods.
const defaultExcludePods = "app.kubernetes.io/name=ambpf,app.kubernetes.io/component in (agent,proxy)"

// options are the parsed flags: agent.Config's fields, and what is turned
// into them.
type options struct {
	cfg         agent.Config
	mode        string
	probeSNAT   bool
	logLevel    slog.Level
	kube        kubeSettings
	excludedNS  string
	podName     string
	podNS       string
	printConfig bool
}

// kubeSettings are the Kubernetes mode's (on when NodeName is set).
type kubeSettings struct {
	NodeName           string   `json:"nodeName"`
	Kubeconfig         string   `json:"kubeconfig"`
	ExcludedNamespaces []string `json:"excludedNamespaces"`
	ExcludePods        string   `json:"excludePods"`
	HostProc           string   `json:"hostProc"`
	DNSCapture         bool     `json:"dnsCapture"`
	// EnablementSelectors is the YAML list of Istio's
	// ambient.enablementSelectors; "" is Istio's default.
	EnablementSelectors string `json:"enablementSelectors"`
	// Self is the agent's own pod, namespace/name, never enrolled.
	Self string `json:"self"`
	// DaemonSet is the agent's own DaemonSet, namespace/name: when the
	// agent stops after it was deleted (helm uninstall), every pod is
	// unenrolled and the node's pins removed. Empty: never.
	DaemonSet string `json:"daemonSet"`
}

// flagSet declares the agent's flags into o.
func (o *options) flagSet() *flag.FlagSet {
	cfg, k := &o.cfg, &o.kube
	fs := flag.NewFlagSet("ambpf-agent", flag.ContinueOnError)
	fs.Usage = binding.Usage(fs)
	fs.StringVar(&cfg.BPFRoot, "bpf-root", datapath.DefaultRoot, "bpffs directory for the datapath pins")
	fs.StringVar(&cfg.StateDir, "state-dir", agent.DefaultStateDir, "directory of the state file")
	fs.StringVar(&cfg.ZDSPath, "zds-socket", zds.DefaultPath, "ZDS socket the proxies connect to")
	fs.Func("zds-allow-uids", "comma-separated uids a proxy connecting to the ZDS socket may run as (default: root and the agent's uid)", func(v string) error {
		cfg.ZDSAllowUIDs = nil
		for _, f := range strings.Split(v, ",") {
			uid, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || uid < 0 {
				return fmt.Errorf("bad uid %q", f)
			}
			cfg.ZDSAllowUIDs = append(cfg.ZDSAllowUIDs, uid)
		}
		return nil
	})
	fs.StringVar(&cfg.ZDSProxyCgroup, "zds-proxy-cgroup", "", "cgroup v2 directory (under the cgroup2 mount) a proxy connecting over ZDS must run in or below (default: any)")
	fs.DurationVar(&cfg.NetnsCheckInterval, "netns-check-interval", agent.DefaultNetnsCheck, "how often every enrolled pod's netns is checked; a pod whose netns is gone without a CNI DEL is unenrolled (negative: never)")
	fs.StringVar(&cfg.APISocket, "api-socket", agentapi.DefaultSocket, "enrolment API socket")
	fs.StringVar(&cfg.ReadyAddr, "ready-addr", agent.DefaultReadyAddr, `address serving GET /readyz, or "off"`)
	fs.StringVar(&o.mode, "mode", "", "force the TC attach mode: tcx or clsact (default: detect)")
	fs.BoolVar(&o.probeSNAT, "probe-snat", true, "translate connections from the node to enrolled pods to 169.254.7.127, as kubelet probes")
	fs.Func("fastpath", "in-pod fast path (sockops + sk_msg) between each app and the proxy: off, to-proxy (what the app sends skips TCP) or both (see docs/BENCHMARKS.md before turning it on)", func(v string) error {
		m, err := fastpath.ParseMode(v)
		cfg.FastPath = m
		return err
	})
	fs.Func("fastpath-default", "with --fastpath on: enabled (every pod gets the fast path unless its ambpf.io/fastpath annotation says disabled) or disabled (only pods annotated ambpf.io/fastpath: enabled get it) (default enabled)", func(v string) error {
		switch v {
		case agentapi.FastPathEnabled, agentapi.FastPathDisabled:
			cfg.FastPathOptIn = v == agentapi.FastPathDisabled
			return nil
		}
		return fmt.Errorf("%q: want %s or %s", v, agentapi.FastPathEnabled, agentapi.FastPathDisabled)
	})
	fs.StringVar(&cfg.NodeNetns, "node-netns", "", "netns holding the pods' host-side veths; default: the agent's own")
	fs.TextVar(&o.logLevel, "log-level", slog.LevelInfo, "debug, info, warn or error")
	fs.StringVar(&k.NodeName, "node-name", "", "this node's name: turns on the Kubernetes mode, which enrols the node's pods by label")
	fs.StringVar(&k.Kubeconfig, "kubeconfig", "", "kubeconfig file; empty: the in-cluster configuration")
	fs.StringVar(&o.excludedNS, "excluded-namespaces", "kube-system", "comma-separated namespaces never enrolled")
	fs.StringVar(&k.ExcludePods, "exclude-pods", defaultExcludePods, "label selector of pods never enrolled: the mesh's own")
	fs.StringVar(&k.HostProc, "host-proc", "/proc", "the host's /proc, scanned for running pods' netns")
	fs.BoolVar(&k.DNSCapture, "dns-capture", false, "Kubernetes mode: capture pods' DNS unless their ambient.istio.io/dns-capture annotation says otherwise")
	fs.StringVar(&k.EnablementSelectors, "enablement-selectors", "", "Kubernetes mode: YAML list of {podSelector, namespaceSelector} selecting the pods to enrol, as istio-cni's ambient.enablementSelectors (default: Istio's, istio.io/dataplane-mode=ambient on the pod or its namespace, not none on the pod)")
	fs.StringVar(&o.podName, "pod-name", "", "Kubernetes mode: the agent's own pod (with -pod-namespace), never enrolled")
	fs.StringVar(&o.podNS, "pod-namespace", "", "Kubernetes mode: the agent's own pod's namespace")
	fs.StringVar(&k.DaemonSet, "daemonset", "", "Kubernetes mode: the agent's own DaemonSet, namespace/name, watched from the start; when the agent stops after it was deleted (an uninstall, not a rollout), every pod is unenrolled and the node's pins removed (default: never)")
	fs.BoolVar(&o.printConfig, "print-config", false, "print the configuration as JSON and exit")
	return fs
}

// parse reads the flags from environ and args (the command line wins).
func parse(args, environ []string) (*options, error) {
	var o options
	if err := binding.Parse(o.flagSet(), args, environ); err != nil {
		return nil, err
	}
	return &o, nil
}

// config is the agent.Config the options make, without Controller (run
// adds it: it needs the API server), and completes o.kube.
func (o *options) config() (agent.Config, error) {
	cfg := o.cfg
	cfg.NoProbeSNAT = !o.probeSNAT
	cfg.Logger = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: o.logLevel}))
	switch o.mode {
	case "":
	case "tcx":
		cfg.Mode = datapath.ModeTCX
	case "clsact":
		cfg.Mode = datapath.ModeClsact
	default:
		return cfg, fmt.Errorf("-mode %q: want tcx or clsact", o.mode)
	}
	if _, err := labels.Parse(o.kube.ExcludePods); err != nil {
		return cfg, fmt.Errorf("-exclude-pods: %w", err)
	}
	if _, err := podwatch.ParseEnablement(o.kube.EnablementSelectors); err != nil {
		return cfg, fmt.Errorf("-enablement-selectors: %w", err)
	}
	o.kube.ExcludedNamespaces = nil
	for _, ns := range strings.Split(o.excludedNS, ",") {
		if ns = strings.TrimSpace(ns); ns != "" {
			o.kube.ExcludedNamespaces = append(o.kube.ExcludedNamespaces, ns)
		}
	}
	if d := o.kube.DaemonSet; d != "" {
		if ns, name, ok := strings.Cut(d, "/"); !ok || ns == "" || name == "" || strings.Contains(name, "/") {
			return cfg, fmt.Errorf("-daemonset %q: want namespace/name", d)
		}
	}
	o.kube.Self = ""
	if o.podNS != "" && o.podName != "" {
		o.kube.Self = o.podNS + "/" + o.podName
	}
	return cfg, nil
}

// client is the Kubernetes mode's API client.
func (k kubeSettings) client() (kubernetes.Interface, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", k.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client config: %w", err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return client, nil
}

// uninstalling is agent.Config.Uninstalling for the Kubernetes mode: it
// watches the agent's DaemonSet for the life of the process (so an
// uninstall is recognised even after helm revoked the agent's
// credentials) and answers whether it was deleted. When it cannot tell it
// answers false: pods stay captured for the next agent.
func (k kubeSettings) uninstalling(client kubernetes.Interface, log *slog.Logger) (func(context.Context) bool, error) {
	if k.DaemonSet == "" {
		return nil, nil
	}
	ns, name, _ := strings.Cut(k.DaemonSet, "/")
	w, err := cniinstall.WatchDaemonSet(context.Background(), client, ns, name)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context) bool {
		gone, err := w.Gone(ctx)
		if err != nil {
			log.Warn("cannot tell whether the agent's DaemonSet is gone: treating the stop as a restart", "daemonset", k.DaemonSet, "err", err)
		}
		return gone
	}, nil
}

// watcher builds the Kubernetes mode's controller.
func (k kubeSettings) watcher(client kubernetes.Interface, log *slog.Logger) (*podwatch.Watcher, error) {
	sel, err := labels.Parse(k.ExcludePods)
	if err != nil {
		return nil, fmt.Errorf("-exclude-pods: %w", err)
	}
	enablement, err := podwatch.ParseEnablement(k.EnablementSelectors)
	if err != nil {
		return nil, fmt.Errorf("-enablement-selectors: %w", err)
	}
	cg, err := cgroup.Mount()
	if err != nil {
		log.Warn("no cgroup2 mount: pods are enrolled without the mark guard", "err", err)
	}
	return podwatch.New(podwatch.Config{
		Client: client, NodeName: k.NodeName,
		Policy: podwatch.Policy{ExcludedNamespaces: k.ExcludedNamespaces, Exclude: sel, Self: k.Self, DNSCapture: k.DNSCapture, Enablement: enablement},
		Finder: podwatch.Finder{ProcRoot: k.HostProc, CgroupRoot: cg},
		Logger: log,
	})
}
