//go:build linux

// Command ambpf-demo shows ambpf's eBPF datapath capturing traffic between
// pods built in throwaway network namespaces, then removes everything.
// It needs root. Ctrl-C stops it and still cleans up.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/ambpf/ambpf/pkg/demo"
)

func main() {
	var cfg demo.Config
	flag.StringVar(&cfg.Prefix, "prefix", demo.DefaultPrefix, "name prefix of the network namespaces and cgroups")
	flag.StringVar(&cfg.StateDir, "state-dir", demo.DefaultStateDir, "directory for the private bpffs mount")
	verbose := flag.Bool("v", false, "log the datapath's and proxies' decisions to stderr")
	flag.Parse()
	if *verbose {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// After the first signal the demo cleans up; a second one kills it.
	context.AfterFunc(ctx, stop)
	if err := demo.Run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "ambpf-demo:", err)
		os.Exit(1)
	}
}
