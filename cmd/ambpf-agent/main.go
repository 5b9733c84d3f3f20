//go:build linux

// Command ambpf-agent is ambpf's node agent: it enrols pods into the eBPF
// datapath, serves the enrolment API to ambpf-cni and ambpfctl, and talks
// ZDS to the in-pod proxies. See pkg/agent. Given a node name it runs in
// Kubernetes mode: it watches the node's pods and decides enrolment from
// their labels (pkg/podwatch).
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ambpf/ambpf/pkg/agent"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/cgroup"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/podwatch"
	"github.com/ambpf/ambpf/pkg/zds"
)

// defaultExcludePods selects the chart's agent and proxy pods.
const defaultExcludePods = "app.kubernetes.io/name=ambpf,app.kubernetes.io/component in (agent,proxy)"

// kubeFlags are the Kubernetes mode's settings.
type kubeFlags struct {
	node, kubeconfig, excludedNS, excludePods, hostProc string
	dnsCapture                                          bool
}

// watcher builds the Kubernetes mode's controller.
func (k kubeFlags) watcher(log *slog.Logger) (*podwatch.Watcher, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", k.kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client config: %w", err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	sel, err := labels.Parse(k.excludePods)
	if err != nil {
		return nil, fmt.Errorf("-exclude-pods: %w", err)
	}
	var excluded []string
	for _, ns := range strings.Split(k.excludedNS, ",") {
		if ns = strings.TrimSpace(ns); ns != "" {
			excluded = append(excluded, ns)
		}
	}
	cg, err := cgroup.Mount()
	if err != nil {
		log.Warn("no cgroup2 mount: pods are enrolled without the mark guard", "err", err)
	}
	self := ""
	if ns, name := os.Getenv("AMBPF_POD_NAMESPACE"), os.Getenv("AMBPF_POD_NAME"); ns != "" && name != "" {
		self = ns + "/" + name
	}
	return podwatch.New(podwatch.Config{
		Client: client, NodeName: k.node,
		Policy: podwatch.Policy{ExcludedNamespaces: excluded, Exclude: sel, Self: self, DNSCapture: k.dnsCapture},
		Finder: podwatch.Finder{ProcRoot: k.hostProc, CgroupRoot: cg},
		Logger: log,
	})
}

// env returns the environment variable's value, or def when unset, so every
// flag can also be set from the pod spec.
func env(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}

func main() {
	var cfg agent.Config
	var mode, level string
	fs := flag.NewFlagSet("ambpf-agent", flag.ExitOnError)
	fs.StringVar(&cfg.BPFRoot, "bpf-root", env("AMBPF_BPF_ROOT", datapath.DefaultRoot), "bpffs directory for the datapath pins (AMBPF_BPF_ROOT)")
	fs.StringVar(&cfg.StateDir, "state-dir", env("AMBPF_STATE_DIR", agent.DefaultStateDir), "directory of the state file (AMBPF_STATE_DIR)")
	fs.StringVar(&cfg.ZDSPath, "zds-socket", env("AMBPF_ZDS_SOCKET", zds.DefaultPath), "ZDS socket the proxies connect to (AMBPF_ZDS_SOCKET)")
	fs.StringVar(&cfg.APISocket, "api-socket", env("AMBPF_AGENT_SOCKET", agentapi.DefaultSocket), "enrolment API socket (AMBPF_AGENT_SOCKET)")
	fs.StringVar(&cfg.ReadyAddr, "ready-addr", env("AMBPF_READY_ADDR", agent.DefaultReadyAddr), "address serving GET /readyz, or \"off\" (AMBPF_READY_ADDR)")
	fs.StringVar(&mode, "mode", env("AMBPF_MODE", ""), "force the TC attach mode: tcx or clsact (default: detect) (AMBPF_MODE)")
	probeSNAT := env("AMBPF_PROBE_SNAT", "true") != "false"
	fs.BoolVar(&probeSNAT, "probe-snat", probeSNAT, "translate connections from the node to enrolled pods to 169.254.7.127, as kubelet probes (AMBPF_PROBE_SNAT)")
	fs.StringVar(&cfg.NodeNetns, "node-netns", env("AMBPF_NODE_NETNS", ""), "netns holding the pods' host-side veths; default: the agent's own (AMBPF_NODE_NETNS)")
	fs.StringVar(&level, "log-level", env("AMBPF_LOG_LEVEL", "info"), "debug, info, warn or error (AMBPF_LOG_LEVEL)")
	var kube kubeFlags
	fs.StringVar(&kube.node, "node-name", env("AMBPF_NODE_NAME", os.Getenv("NODE_NAME")), "this node's name: turns on the Kubernetes mode, which enrols the node's pods by label (AMBPF_NODE_NAME, NODE_NAME)")
	fs.StringVar(&kube.kubeconfig, "kubeconfig", env("KUBECONFIG", ""), "kubeconfig file; empty: the in-cluster configuration (KUBECONFIG)")
	fs.StringVar(&kube.excludedNS, "excluded-namespaces", env("AMBPF_EXCLUDED_NAMESPACES", "kube-system"), "comma-separated namespaces never enrolled (AMBPF_EXCLUDED_NAMESPACES)")
	fs.StringVar(&kube.excludePods, "exclude-pods", env("AMBPF_EXCLUDE_PODS", defaultExcludePods), "label selector of pods never enrolled: the mesh's own (AMBPF_EXCLUDE_PODS)")
	fs.StringVar(&kube.hostProc, "host-proc", env("AMBPF_HOST_PROC", "/proc"), "the host's /proc, scanned for running pods' netns (AMBPF_HOST_PROC)")
	kube.dnsCapture = env("AMBPF_DNS_CAPTURE", "false") == "true"
	fs.BoolVar(&kube.dnsCapture, "dns-capture", kube.dnsCapture, "Kubernetes mode: capture pods' DNS unless their ambient.istio.io/dns-capture annotation says otherwise (AMBPF_DNS_CAPTURE)")
	fs.Parse(os.Args[1:])
	cfg.NoProbeSNAT = !probeSNAT
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "ambpf-agent: unexpected arguments %q\n", fs.Args())
		os.Exit(2)
	}

	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		fmt.Fprintf(os.Stderr, "ambpf-agent: -log-level: %v\n", err)
		os.Exit(2)
	}
	cfg.Logger = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	switch mode {
	case "":
	case "tcx":
		cfg.Mode = datapath.ModeTCX
	case "clsact":
		cfg.Mode = datapath.ModeClsact
	default:
		fmt.Fprintf(os.Stderr, "ambpf-agent: -mode %q: want tcx or clsact\n", mode)
		os.Exit(2)
	}

	if kube.node != "" {
		w, err := kube.watcher(cfg.Logger)
		if err != nil {
			cfg.Logger.Error("ambpf-agent: kubernetes mode", "err", err)
			os.Exit(2)
		}
		cfg.Controller = w
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a, err := agent.New(cfg)
	if err == nil {
		err = a.Run(ctx)
	}
	if err != nil {
		cfg.Logger.Error("ambpf-agent failed", "err", err)
		os.Exit(1)
	}
}
