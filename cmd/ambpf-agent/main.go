//go:build linux

// Command ambpf-agent is ambpf's node agent: it enrols pods into the eBPF
// datapath, serves the enrolment API to ambpf-cni and ambpfctl, and talks
// ZDS to the in-pod proxies. See pkg/agent. Given a node name it runs in
// Kubernetes mode: it watches the node's pods and decides enrolment from
// their labels (pkg/podwatch).
//
// Every flag can also be given in the environment as AMBPF_<FLAG>, upper
// case with '-' as '_' (AMBPF_BPF_ROOT); a flag on the command line wins.
// An AMBPF_ variable that names no flag is a startup error (pkg/envflag),
// except the proxy's AMBPF_PROXY_* and the build's AMBPF_TOOLS_DIR and
// AMBPF_KUBE_BIN_DIR, which belong to other programs. --print-config
// prints the configuration the flags and environment make, as JSON, and
// exits.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/ambpf/ambpf/pkg/agent"
)

func main() {
	if err := run(os.Args[1:], os.Environ(), os.Stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "ambpf-agent:", err)
		os.Exit(1)
	}
}

// run is the whole command: flags and environment → Config → New → Run.
func run(args, environ []string, stdout io.Writer) error {
	if len(args) > 0 && args[0] == inspectPinsCommand {
		return inspectPins(args[1:], stdout)
	}
	o, err := parse(args, environ)
	if err != nil {
		return err
	}
	cfg, err := o.config()
	if err != nil {
		return err
	}
	if o.printConfig {
		return printConfig(stdout, cfg, o)
	}
	if o.kube.NodeName != "" {
		client, err := o.kube.client()
		if err != nil {
			return fmt.Errorf("kubernetes mode: %w", err)
		}
		if cfg.Controller, err = o.kube.watcher(client, cfg.Logger); err != nil {
			return fmt.Errorf("kubernetes mode: %w", err)
		}
		if cfg.Uninstalling, err = o.kube.uninstalling(client, cfg.Logger); err != nil {
			return fmt.Errorf("kubernetes mode: %w", err)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a, err := agent.New(cfg)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}

// printed is what --print-config writes: the agent.Config New would get
// (Controller and Logger left out: they are built from Kubernetes and
// LogLevel), so tests of the chart check what the binary really parsed.
type printed struct {
	Config agent.Config `json:"config"`
	// Mode is Config.Mode by name ("tcx", "clsact"; empty: detect).
	Mode       string       `json:"mode"`
	Kubernetes kubeSettings `json:"kubernetes"`
	LogLevel   string       `json:"logLevel"`
}

func printConfig(w io.Writer, cfg agent.Config, o *options) error {
	out := printed{Config: cfg, Kubernetes: o.kube, LogLevel: o.logLevel.String()}
	if cfg.Mode != 0 {
		out.Mode = cfg.Mode.String()
	}
	out.Config.Controller, out.Config.Logger = nil, nil
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		return fmt.Errorf("print config: %w", err)
	}
	return nil
}
