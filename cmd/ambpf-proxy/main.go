//go:build linux

// Command ambpf-proxy is the node's in-pod mesh proxy (ztunnel
// compatible): it connects to the node agent over ZDS and serves every
// enrolled pod from inside the pod's network namespace. See package
// github.com/ambpf/ambpf/pkg/proxy.
//
// Every flag can also be given in the environment as AMBPF_PROXY_<FLAG>,
// upper case with '-' as '_' (AMBPF_PROXY_DISCOVERY_FILE); a flag on the
// command line wins. An AMBPF_PROXY_ variable that names no flag is a
// startup error (pkg/envflag). --print-config prints the configuration
// the flags and environment make, as JSON, and exits.
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

	"github.com/ambpf/ambpf/pkg/caclient"
	"github.com/ambpf/ambpf/pkg/kubediscovery"
	"github.com/ambpf/ambpf/pkg/profiling"
	"github.com/ambpf/ambpf/pkg/proxy"
)

func main() {
	if err := run(os.Args[1:], os.Environ(), os.Stdout); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "ambpf-proxy:", err)
		os.Exit(1)
	}
}

// run is the whole command: flags and environment → Config → New → Run.
func run(args, environ []string, stdout io.Writer) error {
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
	if o.kubeconfig != "" || o.inCluster {
		if cfg.Kubernetes, err = kubediscovery.RESTConfig(o.kubeconfig); err != nil {
			return err
		}
	}
	if o.caClient.Address != "" {
		c, err := caclient.New(o.caClient)
		if err != nil {
			return err
		}
		defer c.Close()
		cfg.Authority = c
	}
	p, err := proxy.New(cfg)
	if err != nil {
		return err
	}
	stopProfile, err := profiling.Start()
	if err != nil {
		return err
	}
	defer stopProfile()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return p.Run(ctx)
}

// printed is what --print-config writes: the proxy.Config New would get,
// so tests of the chart check what the binary really parsed.
type printed struct {
	Config   printedConfig `json:"config"`
	LogLevel string        `json:"logLevel"`
	// CA is the remote CA client's configuration (Address empty: the
	// local CA of Config.CADir).
	CA caclient.Config `json:"ca"`
}

// printedConfig is proxy.Config with the fields built at startup shown as
// what they are built from (the outer fields hide the embedded ones).
type printedConfig struct {
	proxy.Config
	// Kubernetes is where the API is reached: "in-cluster", a kubeconfig
	// path, or empty for none.
	Kubernetes string
	// Logger hides Config.Logger (LogLevel says how it is built).
	Logger string `json:",omitempty"`
}

func printConfig(w io.Writer, cfg proxy.Config, o *options) error {
	out := printed{Config: printedConfig{Config: cfg}, LogLevel: o.logLevel.String(), CA: o.caClient}
	switch {
	case o.kubeconfig != "":
		out.Config.Kubernetes = o.kubeconfig
	case o.inCluster:
		out.Config.Kubernetes = "in-cluster"
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		return fmt.Errorf("print config: %w", err)
	}
	return nil
}
