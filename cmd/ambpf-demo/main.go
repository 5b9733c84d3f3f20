//go:build linux

// Command ambpf-demo runs ambpf's real parts on one machine: two nodes
// (network namespaces routed to each other), each with the ambpf-agent and
// ambpf-proxy binaries, pods in throwaway network namespaces created
// through CNI (cnitool, bridge, host-local, ambpf-cni), traffic on every
// path on one node and across nodes, then removes everything. It needs
// root. Ctrl-C stops it and still cleans up. hack/demo.sh (make demo) runs
// it with the binaries built.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/ambpf/ambpf/pkg/demo"
)

func main() {
	var cfg demo.Config
	self, err := os.Executable()
	if err != nil {
		self = os.Args[0]
	}
	binDir := filepath.Dir(self)
	tools := os.Getenv("AMBPF_TOOLS_DIR")
	if tools == "" {
		tools = filepath.Join(binDir, "..", ".cache", "tools")
	}
	flag.StringVar(&cfg.Prefix, "prefix", demo.DefaultPrefix, "name prefix of the network namespaces and CNI networks")
	flag.StringVar(&cfg.StateDir, "state-dir", demo.DefaultStateDir, "directory for the run's bpffs mount, state, sockets and logs")
	flag.StringVar(&cfg.BinDir, "bin-dir", binDir, "directory of ambpf-agent, ambpf-proxy, ambpfctl and ambpf-cni")
	flag.StringVar(&cfg.ToolsDir, "tools-dir", tools, "directory of cnitool and the bridge, host-local and loopback plugins ($AMBPF_TOOLS_DIR)")
	verbose := flag.Bool("v", false, "copy the agent's and proxy's logs to stderr")
	flag.Parse()
	if *verbose {
		cfg.Logs = os.Stderr
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// After the first signal the demo cleans up; a second one kills it.
	context.AfterFunc(ctx, stop)
	if err := demo.Run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "ambpf-demo:", err)
		os.Exit(1)
	}
}
