//go:build linux

// Command ambpf-agent is ambpf's node agent: it enrols pods into the eBPF
// datapath, serves the enrolment API to ambpf-cni and ambpfctl, and talks
// ZDS to the in-pod proxies. See pkg/agent.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/ambpf/ambpf/pkg/agent"
	"github.com/ambpf/ambpf/pkg/agentapi"
	"github.com/ambpf/ambpf/pkg/datapath"
	"github.com/ambpf/ambpf/pkg/zds"
)

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
